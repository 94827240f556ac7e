#!/usr/bin/env bash
# Ahead-of-time compile check of every kernel under another triton release, on a CPU-only machine.
#
# The GPU machine runs triton 3.6 (Python 3.12, torch 2.11, CUDA 13); this machine has a newer
# triton. Register allocation differs between releases (each wheel bundles its own ptxas), so
# a tile that fits under one can spill under the other. This script builds a virtual
# environment that sees the system packages (the CPU torch among them) but has its own triton
# and its own editable install of this checkout, then runs `python -m llama_mini.kernels.aot`
# (the checker behind `llama-mini aot`) for each kernel module with that environment's python.
#
#   bench/triton_compat.sh                          # triton 3.6.0, all six modules, sm_80 and sm_90
#   bench/triton_compat.sh --triton 3.9.0 flash_attention
#   bench/triton_compat.sh --jobs 1 --arch "90" rms_norm rotary
#
# Options:
#   --triton VERSION  triton release to install in the environment (default 3.6.0). The system's
#                     own version works too: pip then keeps the system wheel.
#   --venv DIR        where the environment lives (default /tmp/llama-mini-triton-VERSION); it is
#                     reused when it already has that triton.
#   --out DIR         where each module's report goes as MODULE.txt (default out/triton-VERSION
#                     in the checkout; out/ is ignored by git).
#   --jobs N          parallel compile processes per module (default 2).
#   --arch "80 90"    compute capabilities (default "80 90").
#   MODULE...         kernel modules (default: flash_attention rms_norm cross_entropy
#                     linear_cross_entropy rotary swiglu).
#   PYTHON=...        (environment) the interpreter that creates the environment (default
#                     python3); the environment has its Python version.
#
# Needs: python with torch (CPU build is fine) and pip that can reach the package index for
# triton and for setuptools (the editable install builds in isolation). Nothing outside the
# environment is installed or changed. Exit status 1 if any module has a configuration with a
# problem (spills, shared memory over the limit, no tensor-core instructions, compile error).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TRITON_VERSION="3.6.0"
VENV=""
OUT=""
JOBS=2
ARCHS="80 90"
MODULES=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --triton) TRITON_VERSION="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --arch) ARCHS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "triton_compat.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) MODULES+=("$1"); shift ;;
  esac
done
[[ ${#MODULES[@]} -gt 0 ]] || MODULES=(flash_attention rms_norm cross_entropy linear_cross_entropy rotary swiglu)
VENV="${VENV:-/tmp/llama-mini-triton-$TRITON_VERSION}"
OUT="${OUT:-$ROOT/out/triton-$TRITON_VERSION}"
PY="$VENV/bin/python"

installed() { "$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || true; }

# 1. The environment: system packages visible (torch), triton and this checkout its own.
if [[ ! -x "$PY" ]]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
if [[ "$(installed)" != "$TRITON_VERSION" ]]; then
  "$PY" -m pip install --quiet --no-deps "triton==$TRITON_VERSION"
fi
# The system's editable install may point at another checkout; this one maps llama_mini,
# llama_mini.kernels and llama_mini.data to the folders here, ahead of the system's.
if [[ "$(cd /tmp && "$PY" -c 'import llama_mini.kernels, os; print(os.path.dirname(llama_mini.kernels.__file__))' 2>/dev/null)" != "$ROOT/kernels" ]]; then
  "$PY" -m pip install --quiet --no-deps -e "$ROOT"
fi
got="$(installed)"
if [[ "$got" != "$TRITON_VERSION" ]]; then
  echo "triton_compat.sh: $VENV has triton ${got:-none}, not $TRITON_VERSION" >&2
  exit 1
fi
(cd /tmp && "$PY" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__} ({triton.__file__})")')

# 2. The check, one module at a time, from outside the checkout (the installed names only).
mkdir -p "$OUT"
status=0
summary=()
for module in "${MODULES[@]}"; do
  report="$OUT/$module.txt"
  echo "== $module (sm_${ARCHS// /, sm_}) -> $report"
  # shellcheck disable=SC2086  # ARCHS is a list of numbers
  if (cd /tmp && env -u TRITON_INTERPRET "$PY" -m llama_mini.kernels.aot "$module" --arch $ARCHS --jobs "$JOBS") >"$report" 2>&1; then
    :
  else
    status=1
  fi
  grep -v ' ok$' "$report" | grep -v '^#' || true
  summary+=("$module: $(tail -n 1 "$report")")
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
