#!/usr/bin/env bash
# The GPU suite (tests/gpu, pytest marker `gpu`): the fixture's pruning masks, GPTQ, quantized GGUFs, healing
# curves and step runs on this machine's CUDA device against the CPU. Writes
# tests/benchmarks/results/gpu-suite.md from the run (outcomes, measured values, the criteria they met).
# Without a CUDA device it refuses, exit 2, and writes nothing: the results file only ever holds a real run.
#
#   tests/gpu/run.sh                       # the default CUDA device
#   BIRDBONE_GPU_SUITE_DEVICE=cuda:1 tests/gpu/run.sh -k gptq      # another card; extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export BIRDBONE_GPU_SUITE_DEVICE=${BIRDBONE_GPU_SUITE_DEVICE:-cuda}
case "$BIRDBONE_GPU_SUITE_DEVICE" in
  cuda|cuda:*) ;;
  *) echo "error: BIRDBONE_GPU_SUITE_DEVICE=$BIRDBONE_GPU_SUITE_DEVICE: the results file is for a CUDA device" >&2; exit 2 ;;
esac
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: torch sees no CUDA device here; the GPU suite needs one (nothing written)" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export BIRDBONE_GPU_RESULTS="$tmp/measured.json" BIRDBONE_PROGRESS=0 HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}    # the CPU side's float sums as in the rest of the suite
set +e
"$PY" -m pytest tests/gpu -m gpu -p no:cacheprovider -q -rA --junitxml "$tmp/junit.xml" "$@" 2>&1 | tee "$tmp/pytest.txt"
rc=${PIPESTATUS[0]}
set -e
"$PY" tests/gpu/write_results.py "$tmp" tests/benchmarks/results/gpu-suite.md "$rc"
echo "wrote tests/benchmarks/results/gpu-suite.md (pytest exit status $rc)"
exit "$rc"
