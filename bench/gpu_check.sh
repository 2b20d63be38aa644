#!/usr/bin/env bash
# optkern on a GPU machine: build with CUDA, run the GPU tests and the full test suite, then the CUDA benchmark.
# No package registry is needed: pybind11, scikit-build-core, CuPy, PyTorch and pytest must be preinstalled.
#   bash bench/gpu_check.sh            (from the repository root; OUT=DIR puts the benchmark output there)
set -euo pipefail

cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"

echo "== nvidia-smi"
nvidia-smi

echo "== build and install optkern with OPTKERN_CUDA=ON"
OPTKERN_CUDA=ON python -m pip install --no-build-isolation --no-deps -v . 2>&1 | tail -n 40

# import the installed (CUDA) build, never the source tree's python/optkern
unset PYTHONPATH
python - <<'PY'
import optkern
print("optkern", optkern.__version__, "from", optkern.__file__, "cpu_isa", optkern.cpu_isa(),
      "cuda_available", optkern.cuda_available())
if not optkern.cuda_available():
    raise SystemExit("optkern.cuda_available() is False after a build with OPTKERN_CUDA=ON")
PY

echo "== GPU tests"
python -m pytest -q -p no:cacheprovider tests/test_cupy.py tests/test_cupy_batch_norm.py tests/test_cupy_lbfgs.py

echo "== full test suite"
python -m pytest -q -x -p no:cacheprovider tests

echo "== CUDA benchmark"
python -m optkern.bench --device cuda --out "$out"
if [ -f "$out/bench_cuda.md" ]; then
    echo "== table ($out/bench_cuda.md)"
    cat "$out/bench_cuda.md"
else
    echo "CUDA benchmark did not run (see above)" >&2
    exit 1
fi
