#!/usr/bin/env bash
# The whole GPU window in one command, on the GPU machine, from the checkout root:
#
#   bash bench/gpu_run.sh [BUDGET_S]       # default 480; needs .whl/ from bench/gpu_prepare.sh
#
# Installs the carried wheel into /tmp/site (the machine is bare and offline), then runs
# bench/gpu_report.py with the budget, writing everything under $OUT/gpu-report (the device
# tool's output folder; ./gpu-report where $OUT is unset). Give the device command a timeout
# of the budget plus about 80 s: imports, the install, and the parts' grace period.
set -uo pipefail
cd "$(dirname "$0")/.."
budget="${1:-480}"
out="${OUT:-.}/gpu-report"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_run.sh: could not install .whl/*.whl (run bash bench/gpu_prepare.sh here first)"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv || true
python3 bench/gpu_report.py --budget "$budget" --out "$out"
status=$?
# the device tool returns the end of the output: end with the report's own Markdown section
[ -f "$out/benchmarks.md" ] && tail -n 80 "$out/benchmarks.md"
exit $status
