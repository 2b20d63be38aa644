#!/usr/bin/env bash
# optkern on a GPU machine, in one call: versions, a build with CUDA, the GPU tests, the CUDA benchmark, the full
# test suite.  No package registry is needed: pybind11, scikit-build-core, CuPy, PyTorch and pytest must be
# preinstalled (pytest-timeout is used when present).
#   OUT=DIR bash bench/gpu_check.sh     (OUT defaults to bench/out; GPU_CHECK_BUDGET_S, default 540, is the
#                                        wall-time budget of the whole run; GPU_CHECK_SKIP_BUILD=1 tests the optkern
#                                        already installed, e.g. on a rerun on the same machine)
#
# Device time is short (one command may run 10 minutes), so every stage runs under `timeout`, capped by its own
# limit and by what is left of the budget, and the stages run in order of what they tell: versions, build, import,
# GPU tests, CUDA benchmark, then the full suite (mostly CPU tests that run everywhere; on a host with AVX-512 it is
# the only run of that path).  Each stage's output goes to $OUT/<stage>.log as it runs, and $OUT/summary.txt is
# rewritten after every stage, so a run cut off still brings back what it did.  A failing stage does not stop the
# later ones (except that nothing runs against a failed build).  The exit status is the first failing stage's (0
# if none); the last lines name every stage with its status and time.
set -uo pipefail
export PYTHONUNBUFFERED=1  # output reaches the logs even if the run is cut off

cd "$(dirname "$0")/.." || exit 1
out="${OUT:-bench/out}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
export out
budget="${GPU_CHECK_BUDGET_S:-540}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
status=0
summary=()

write_summary() { printf '%s\n' "${summary[@]}" > "$out/summary.txt"; }

# stage NAME LIMIT_S CMD...: CMD under `timeout` (LIMIT_S, or the budget left if less), its output shown and kept
# in $out/NAME.log; records the status and seconds.  Returns CMD's exit status (124: timed out).
stage() {
    local name="$1" cap="$2"
    shift 2
    local left=$((budget - SECONDS))
    local lim=$((cap < left ? cap : left))
    if [ "$lim" -lt 15 ]; then
        summary+=("$name: NOT RUN (the ${budget} s budget is spent)")
        write_summary
        if [ "$status" -eq 0 ]; then status=124; fi
        return 124
    fi
    echo "== $name (limit ${lim} s, $(date -u +%H:%M:%S) UTC, ${SECONDS} s into the run)"
    local t0=$SECONDS
    # SIGINT first: pytest then prints the failures it has so far, Python code its traceback; SIGKILL 15 s later
    timeout -s INT -k 15 "$lim" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT (limit ${lim} s)"
    elif [ "$rc" -ne 0 ]; then
        what="FAILED (rc $rc)"
    fi
    summary+=("$name: $what, $((SECONDS - t0)) s")
    write_summary
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    return "$rc"
}

versions() {
    nvidia-smi || echo "nvidia-smi failed (rc $?)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv || true
    command -v nvcc && nvcc --version || echo "nvcc not on PATH"
    python - <<'PY'
import os, platform, sys
print("python", sys.version.split()[0], "on", platform.platform())
for mod in ("numpy", "torch", "cupy", "pytest", "pytest_timeout", "scikit_build_core", "pybind11"):
    try:
        print(mod, getattr(__import__(mod), "__version__", "(no __version__)"))
    except Exception as e:  # noqa: BLE001
        print(mod, "NOT importable:", type(e).__name__, e)
try:
    import torch
    print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(), "cuDNN",
          torch.backends.cudnn.version(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:  # noqa: BLE001
    print("torch CUDA: not usable:", type(e).__name__, e)
try:
    import cupy
    rt = cupy.cuda.runtime
    print("CuPy runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(), "devices", rt.getDeviceCount(),
          rt.getDeviceProperties(0)["name"].decode())
except Exception as e:  # noqa: BLE001
    print("CuPy CUDA: not usable:", type(e).__name__, e)
print("cpus", os.cpu_count(), "usable", len(os.sched_getaffinity(0)))
PY
    grep -m1 "model name" /proc/cpuinfo
    grep -m1 -o -w avx512f /proc/cpuinfo || echo "no avx512f"
    free -g | head -2
}

build() {
    # nvcc --threads=0 compiles the CUDA architectures of one file in parallel
    OPTKERN_CUDA=ON CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_FLAGS=--threads=0" \
        python -m pip install --no-build-isolation --no-deps -v . > "$out/build_full.log" 2>&1
    local rc=$?
    grep -E -i "error|warning:" "$out/build_full.log" | grep -v -E "^ *(-- |Werror)" | head -40
    tail -n 25 "$out/build_full.log"
    echo "build: rc $rc (full log: build_full.log)"
    return "$rc"
}

check_import() {
    python - <<'PY'
import pathlib
import optkern
src = pathlib.Path.cwd() / "python"
print("optkern", optkern.__version__, "from", optkern.__file__, "cpu_isa", optkern.cpu_isa(), "best",
      optkern.cpu_best_isa(), "threads", optkern.get_num_threads(), "cuda_available", optkern.cuda_available())
if src in pathlib.Path(optkern.__file__).resolve().parents:
    raise SystemExit("imported the source tree's python/optkern, not the installed build")
if not optkern.cuda_available():
    raise SystemExit("optkern.cuda_available() is False after a build with OPTKERN_CUDA=ON")
PY
}

cuda_bench() {
    python -m optkern.bench --device cuda --out "$out"
    local rc=$?
    local table
    table="$(ls "$out"/gpu_*.md 2>/dev/null | head -n 1)"
    if [ -z "$table" ]; then
        echo "the CUDA benchmark wrote no gpu_<device>.md under $out" >&2
        return $((rc ? rc : 1))
    fi
    mkdir -p bench/results && cp -f "$table" bench/results/  # the file to commit (it comes back under $OUT)
    echo "== table: $table (copied to bench/results/)"
    return "$rc"
}
export -f versions build check_import cuda_bench

# import the installed (CUDA) build, never the source tree's python/optkern
unset PYTHONPATH
# the GPU test files that exist (among the test_cuda_*.py: test_cuda_mixed_precision.py, the 16-bit modes on torch
# CUDA and CuPy against the CPU, ~300 short tests), and pytest-timeout's per-test limit where it is installed
gpu_tests=()
for f in tests/test_cupy*.py tests/test_torch_cuda.py tests/test_cuda_*.py; do
    [ -f "$f" ] && gpu_tests+=("$f")
done
per_test=()
if python -c "import pytest_timeout" 2> /dev/null; then per_test=(--timeout=120); fi
ignore=()
for f in "${gpu_tests[@]}"; do ignore+=("--ignore=$f"); done

if [ "${#gpu_tests[@]}" -eq 0 ]; then echo "no GPU test files under tests/" >&2; fi

stage versions 60 bash -c versions
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    summary+=("build: skipped (GPU_CHECK_SKIP_BUILD=1)")
    build_ok=0
else
    stage build 330 bash -c build
    build_ok=$?
fi
if [ "$build_ok" -eq 0 ] && stage import 60 bash -c check_import; then
    best_isa="$(python -c 'import optkern; print(optkern.cpu_best_isa())')"
    # OPTKERN_CPU_ISA: the GPU tests run once (their CPU-path fixture has one value), not once per CPU path
    # OGR's kernel first (issue 16 part 2: its CUDA path has not run on a GPU before); it runs again in gpu_tests
    if [ -f tests/test_cuda_ogr.py ]; then
        stage gpu_ogr 90 env OPTKERN_CPU_ISA="$best_isa" python -m pytest -q -rs -p no:cacheprovider \
            ${per_test[@]+"${per_test[@]}"} tests/test_cuda_ogr.py
    fi
    if [ "${#gpu_tests[@]}" -gt 0 ]; then
        stage gpu_tests 180 env OPTKERN_CPU_ISA="$best_isa" python -m pytest -q -rs --durations=15 \
            -p no:cacheprovider ${per_test[@]+"${per_test[@]}"} "${gpu_tests[@]}"
    else
        summary+=("gpu_tests: FAILED (no tests/test_cupy*.py, test_torch_cuda.py or test_cuda_*.py)")
        if [ "$status" -eq 0 ]; then status=1; fi
    fi
    stage cuda_bench 210 bash -c cuda_bench
    # the GPU tests ran above: a failure there must not stop the CPU tests before they start
    # -rfE: failures and errors in the short summary (the project's -ra would list a thousand known skips)
    stage full_suite 420 python -m pytest -q -rfE -p no:cacheprovider --maxfail=20 --durations=10 \
        ${per_test[@]+"${per_test[@]}"} tests ${ignore[@]+"${ignore[@]}"}
else
    summary+=("gpu_tests, cuda_bench, full_suite: not run (the build or the import failed)")
fi
write_summary

echo "== summary ($SECONDS s in all; logs, the table and summary.txt under $out)"
printf '%s\n' "${summary[@]}"
exit "$status"
