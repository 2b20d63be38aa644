"""The L-BFGS kernels on CUDA arrays (CuPy): dots and linear combination against the CPU kernels.

The CUDA executor reproduces the CPU's documented summation order (lbfgs_rules.h: 16 lanes per 256-value lane
block, a fixed lane tree, chunk partials in chunk order) and is built without FMA contraction, so the results are
expected to equal the CPU's bitwise; the test checks that, and the float64 NumPy value within the CPU suite's
tolerance.  Skipped without CuPy and a CUDA device.
"""

import numpy as np
import pytest
from optkern import _C
from reference import require_cupy_gpu

cupy = require_cupy_gpu("L-BFGS kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,nq", [(1, 1, 1), (17, 3, 2), (4097, 10, 1), (100003, 20, 3)])
def test_dots_match_cpu_bitwise(rng, dtype, n, k, nq):
    stored = [rng.standard_normal(n).astype(dtype) + 0.5 for _ in range(k)]
    queries = [rng.standard_normal(n).astype(dtype) - 0.25 for _ in range(nq)]
    cpu = _C.lbfgs_dots(stored, queries)
    gpu = _C.lbfgs_dots([cupy.asarray(a) for a in stored], [cupy.asarray(a) for a in queries])
    np.testing.assert_array_equal(np.asarray(gpu), cpu)
    ref = np.array([[np.dot(q.astype(np.float64), s.astype(np.float64)) for s in stored] for q in queries])
    scale = np.array([[np.abs(q.astype(np.float64) * s).sum() for s in stored] for q in queries])
    tol = 18 * 2.0 ** -24 if dtype == np.float32 else 1e-13
    assert np.all(np.abs(np.asarray(gpu) - ref) <= tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m", [(1, 1), (17, 3), (4097, 21), (1 << 20, 21)])
def test_lincomb_matches_cpu_bitwise(rng, dtype, n, m):
    vecs = [rng.standard_normal(n).astype(dtype) for _ in range(m)]
    coefs = list(rng.standard_normal(m))
    out = np.empty(n, dtype)
    _C.lbfgs_lincomb(vecs, coefs, out)
    gout = cupy.empty(n, dtype)
    _C.lbfgs_lincomb([cupy.asarray(v) for v in vecs], coefs, gout, int(cupy.cuda.get_current_stream().ptr))
    np.testing.assert_array_equal(cupy.asnumpy(gout), out)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_optim_lbfgs_cupy_matches_numpy(rng, line_search_fn):
    """optkern.optim.LBFGS on CuPy params follows the NumPy run: the kernels agree bitwise, the rest (|g|_1 of the
    first step, max|g|) and the closure's matrix products are the array library's, so the iterates agree to rounding
    (1e-9 relative after 3 calls on a well-conditioned least-squares problem; not yet run on a GPU)."""
    import optkern

    A = rng.standard_normal((300, 40))
    b = rng.standard_normal(300)
    w0 = rng.standard_normal(40) * 0.1

    def fg(xp, A, b, w):
        r = A @ w - b
        return float(0.5 * (r @ r) / len(b) + 0.01 * (w @ w)), [A.T @ r / len(b) + 0.02 * w]

    w_np, w_cp = w0.copy(), cupy.asarray(w0)
    gA, gb = cupy.asarray(A), cupy.asarray(b)
    opt_np = optkern.optim.LBFGS([w_np], history_size=5, max_iter=15, line_search_fn=line_search_fn)
    opt_cp = optkern.optim.LBFGS([w_cp], history_size=5, max_iter=15, line_search_fn=line_search_fn)
    for _ in range(3):
        opt_np.step(lambda: fg(np, A, b, w_np))
        opt_cp.step(lambda: fg(cupy, gA, gb, w_cp))
    got = cupy.asnumpy(w_cp)
    assert np.max(np.abs(got - w_np)) <= 1e-9 * np.max(np.abs(w_np))
    assert abs(opt_cp.state["n_iter"] - opt_np.state["n_iter"]) <= 1


def test_bench_direction_device_cuda():
    """What ``python -m optkern.bench --device cuda`` runs for L-BFGS, small: the CUDA direction agrees with the
    torch two-loop on CUDA tensors (when torch has CUDA), with its timings and roofline."""
    from optkern.bench import lbfgs as lbfgs_bench
    from optkern.bench.runner import cupy_event_times, torch_event_times

    try:
        import torch

        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None

    def timer(fn, reps, warmup):
        return cupy_event_times(cupy, fn, reps, warmup)

    def torch_timer(fn, reps, warmup):
        return torch_event_times(torch, fn, reps, warmup)

    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-10)):
        row = lbfgs_bench.bench_direction_device(cupy, torch, "cuda", 100003, 10, dtype, 3, 1, timer, torch_timer)
        assert row["optkern_s"] > 0 and row["roofline_gbs"] > 0
        if torch is not None:
            assert row["rel_diff_vs_torch"] <= tol and row["ratio"] > 0
