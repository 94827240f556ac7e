#!/usr/bin/env bash
# Prepare a GPU window, on this machine (no GPU needed): build llama-mini's wheel into .whl/
# (ignored by git), which the device call carries and bench/gpu_run.sh installs there. The GPU
# machine has torch, triton, pytest and matplotlib but not this project, and cannot download.
# The report imports neither fairscale nor zstandard, so their wheels are not needed for it.
#
#   bash bench/gpu_prepare.sh          # then, on the device: bash bench/gpu_run.sh  (carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python -m pip wheel --quiet --no-deps --no-build-isolation -w .whl .
ls -l .whl
