#!/usr/bin/env bash
# optkern on a GPU machine: build with CUDA, run the GPU tests, the CUDA benchmark, then the full test suite.
# No package registry is needed: pybind11, scikit-build-core, CuPy, PyTorch and pytest must be preinstalled.
#   bash bench/gpu_check.sh            (from the repository root; OUT=DIR puts the benchmark output and logs there)
#
# Device time is short, so the stages run in order of what they tell (the full suite, mostly CPU tests that CI
# also runs, comes last: on a host with AVX-512 it is the only run of that path), each stage's output is kept in
# $OUT/<stage>.log as it runs (so a run cut off by a time limit still brings back what it did), and a failing
# stage does not stop the later ones.  The exit status is that of the first failing stage (0 if none), and the
# last lines name every stage with its status and time.
set -uo pipefail
export PYTHONUNBUFFERED=1  # output reaches the logs even if the run is cut off

cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
status=0
summary=()

# stage NAME CMD...: run CMD with its output shown and kept in $out/NAME.log; record status and seconds.
stage() {
    local name="$1"
    shift
    echo "== $name ($(date -u +%H:%M:%S))"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    summary+=("$name: rc $rc, $((SECONDS - t0)) s")
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    return "$rc"
}

build() {
    OPTKERN_CUDA=ON python -m pip install --no-build-isolation --no-deps -v . > "$out/build_full.log" 2>&1
    local rc=$?
    tail -n 40 "$out/build_full.log"
    return "$rc"
}

# import the installed (CUDA) build, never the source tree's python/optkern
unset PYTHONPATH
check_import() {
    python - <<'PY'
import optkern
print("optkern", optkern.__version__, "from", optkern.__file__, "cpu_isa", optkern.cpu_isa(),
      "cuda_available", optkern.cuda_available())
if not optkern.cuda_available():
    raise SystemExit("optkern.cuda_available() is False after a build with OPTKERN_CUDA=ON")
PY
}

cuda_bench() {
    python -m optkern.bench --device cuda --out "$out" || return $?
    if [ ! -f "$out/bench_cuda.md" ]; then
        echo "CUDA benchmark wrote no $out/bench_cuda.md" >&2
        return 1
    fi
    echo "== table ($out/bench_cuda.md)"
    cat "$out/bench_cuda.md"
}

stage nvidia_smi nvidia-smi
if stage build build && stage import check_import; then
    stage gpu_tests python -m pytest -q -rs -p no:cacheprovider tests/test_cupy.py tests/test_cupy_batch_norm.py \
        tests/test_cupy_lbfgs.py tests/test_torch_cuda.py
    stage cuda_bench cuda_bench
    # the GPU tests ran above: a failure there must not stop the CPU tests before they start
    stage full_suite python -m pytest -q -x -p no:cacheprovider tests --ignore=tests/test_cupy.py \
        --ignore=tests/test_cupy_batch_norm.py --ignore=tests/test_cupy_lbfgs.py --ignore=tests/test_torch_cuda.py
else
    summary+=("gpu_tests, cuda_bench, full_suite: not run (build or import failed)")
fi

echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$status"
