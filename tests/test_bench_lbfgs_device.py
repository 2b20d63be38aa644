"""The device L-BFGS benchmark case (optkern.bench.lbfgs.bench_direction_device, what ``--device cuda`` runs with
CuPy and CUDA tensors) run on the CPU with NumPy and CPU torch: the row it reports is complete, its figures follow
from its own timings, and optkern's direction agrees with the torch two-loop's.  The CuPy run is in
tests/test_cupy_lbfgs.py."""


import numpy as np
import pytest
from conftest import AVAILABLE_ISAS

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the benchmark's reference")
from optkern.bench import lbfgs as lbfgs_bench
from optkern.bench.cuda import wall_times


@pytest.fixture(autouse=True)
def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent: runs once under the best path (the kernels are checked per path elsewhere)")


_timer = wall_times  # the benchmark's own host-clock timer (its CPU stand-in for CUDA events)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("torch_only_ratio", [False, True])
def test_device_case_on_cpu(dtype, tol, torch_only_ratio):
    n, m = 4099, 10
    row = lbfgs_bench.bench_direction_device(np, torch, "cpu", n, m, dtype, 3, 1, _timer, _timer,
                                             torch_only_ratio=torch_only_ratio, ratio_target=3.0)
    assert row["kind"] == "lbfgs_device" and row["n"] == n and row["dtype"] == np.dtype(dtype).name
    assert row["rel_diff_vs_torch"] <= tol  # the same direction as the torch two-loop
    med = row["median_s"]
    assert set(med) == {"optkern", "optkern_after_push", "roof_dram_add", "torch"}
    item = np.dtype(dtype).itemsize
    assert row["bytes"] == (4 * m + 3) * n * item
    assert row["optkern_gbs"] == pytest.approx(row["bytes"] / med["optkern"] / 1e9)
    assert row["roofline_gbs"] == pytest.approx(3 * item * n / med["roof_dram_add"] / 1e9)
    assert row["ratio"] == pytest.approx(med["torch"] / med["optkern"])
    whats = [t["what"] for t in row["targets"]]
    assert whats[-1] == ">= 3x torch two-loop (cpu)" and row["targets"][-1]["met"] == (row["ratio"] >= 3.0)
    assert len(whats) == (1 if torch_only_ratio else 2)
    lines = lbfgs_bench.markdown_details([row])
    assert any(row["case"] in line for line in lines)
    assert all(line.count("|") in (0, 8) for line in lines if line.startswith("|"))  # 7 cells in every row


def test_device_case_without_torch():
    row = lbfgs_bench.bench_direction_device(np, None, "cpu", 300, 3, np.float64, 2, 0, _timer, None)
    assert row["rel_diff_vs_torch"] is None and "ratio" not in row
    assert [t["what"] for t in row["targets"]] == [">= 80% of cpu DRAM add ((4m+3)n elements)"]
