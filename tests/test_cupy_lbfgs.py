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
@pytest.mark.parametrize("n,k,nq", [(1, 1, 1), (17, 3, 2), (4097, 10, 1), (100003, 20, 3),
                                    # the final fold (a warp per pair, 32 chunk partials per round): exactly 33
                                    # chunks, 70 chunks and a tail, and more pairs than the 32 of a pair batch
                                    (4096 * 33, 5, 2), (4096 * 70 + 13, 7, 5), (5000, 64, 2)])
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


def _pushes(rng, n, npush, dtype):
    """npush SPD-curvature pairs (y = A s with A diagonal, entries in [1, 100]): never rejected."""
    diag = rng.uniform(1.0, 100.0, n)
    out = []
    for _ in range(npush):
        s = (rng.standard_normal(n) + 0.1).astype(dtype)
        out.append((s, (diag * s.astype(np.float64)).astype(dtype)))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,npush", [(17, 1, 3), (4097, 5, 3), (100003, 10, 23)])
def test_history_direction_matches_cpu_bitwise(rng, dtype, n, m, npush):
    """An LBFGSHistory on the GPU given the same pushes as one on the CPU returns the same direction and slope,
    bitwise: both kernels match the CPU's bitwise (above) and the small solves are the same float64 host code.
    Covers fewer pairs than m, a wrapped ring and pending Gram columns (a push right before the direction)."""
    import optkern

    hc = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    hg = optkern.LBFGSHistory(n, history_size=m, like=cupy.zeros(1, dtype))
    for i, (s, y) in enumerate(_pushes(rng, n, npush, dtype)):
        assert hc.push(s, y) and hg.push(cupy.asarray(s), cupy.asarray(y))
        if i == npush // 2:  # a direction in between: the Gram columns filled so far
            g = rng.standard_normal(n).astype(dtype)
            np.testing.assert_array_equal(cupy.asnumpy(hg.direction(cupy.asarray(g))), hc.direction(g))
    g = rng.standard_normal(n).astype(dtype)
    dc, slope_c = hc.direction_and_slope(g)
    out = cupy.full(n, 7.0, dtype)
    dg, slope_g = hg.direction_and_slope(cupy.asarray(g), out=out)
    assert dg is out
    np.testing.assert_array_equal(cupy.asnumpy(dg), dc)
    assert slope_g == slope_c
    np.testing.assert_array_equal(cupy.asnumpy(hg.direction_two_loop(cupy.asarray(g))), hc.direction_two_loop(g))


def test_history_refuses_mixed_libraries_and_touches_nothing(rng):
    """NumPy vectors for a GPU history, and a CuPy out of the wrong dtype, raise naming the argument; the history
    and out are unchanged (the next direction is bitwise the one before)."""
    import optkern

    n = 1000
    h = optkern.LBFGSHistory(n, history_size=4, like=cupy.zeros(1))
    for s, y in _pushes(rng, n, 3, np.float64):
        assert h.push(cupy.asarray(s), cupy.asarray(y))
    g = cupy.asarray(rng.standard_normal(n))
    before = cupy.asnumpy(h.direction(g))
    s_np, y_np = _pushes(rng, n, 1, np.float64)[0]
    with pytest.raises(TypeError, match="^s:"):
        h.push(s_np, cupy.asarray(y_np))
    with pytest.raises(TypeError, match="^g:"):
        h.direction(cupy.asnumpy(g))
    bad_out = cupy.full(n, 7.0, np.float32)
    with pytest.raises(TypeError, match="^out:"):
        h.direction(g, out=bad_out)
    assert bool(cupy.all(bad_out == 7.0))
    assert len(h) == 3
    np.testing.assert_array_equal(cupy.asnumpy(h.direction(g)), before)


def test_minimize_refuses_numpy_gradient_for_cupy_x0():
    import optkern

    x0 = cupy.linspace(-1.0, 1.0, 50)
    with pytest.raises(TypeError, match="^fun_and_grad: expected the gradient as a cupy array"):
        optkern.lbfgs_minimize(lambda x: (float(cupy.sum(x * x)), cupy.asnumpy(2 * x)), x0)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
def test_minimize_cupy_follows_numpy(rng, line_search):
    """lbfgs_minimize on CuPy follows the NumPy run on a ridge-regularized logistic regression: the kernels agree
    bitwise, the objective's sums are each library's own (rounding differs). Both run to ||g||_inf <= 1e-8 (ftol
    off); the Hessian's eigenvalues are >= 1e-2 (the ridge), so ||x - x*||_2 <= sqrt(30) 1e-8 / 1e-2 = 5.5e-6 for
    each (a NumPy emulation with reordered sums gave 2e-8 to 1.4e-7 from the Newton minimizer and 1e-15 between
    the runs); the bound between the two is 2e-6, iteration counts within 20%."""
    import optkern

    X = rng.standard_normal((400, 30))
    yl = (X @ rng.standard_normal(30) + 0.5 * rng.standard_normal(400) > 0).astype(np.float64)

    def make(xp, X, yl):
        def fg(w):
            z = X @ w
            p = 1.0 / (1.0 + xp.exp(-z))
            f = float(xp.sum(xp.logaddexp(0.0, z) - yl * z)) / len(yl) + 0.5e-2 * float(w @ w)
            return f, X.T @ (p - yl) / len(yl) + 1e-2 * w
        return fg

    w0 = 0.1 * rng.standard_normal(30)
    r_np = optkern.lbfgs_minimize(make(np, X, yl), w0, line_search=line_search, gtol=1e-8, ftol=0.0)
    r_cp = optkern.lbfgs_minimize(make(cupy, cupy.asarray(X), cupy.asarray(yl)), cupy.asarray(w0),
                                  line_search=line_search, gtol=1e-8, ftol=0.0)
    assert r_np.success and r_cp.success, (r_np.message, r_cp.message)
    assert isinstance(r_cp.x, cupy.ndarray) and r_cp.x.device.id == cupy.cuda.Device().id
    assert abs(r_cp.nit - r_np.nit) <= max(3, r_np.nit // 5)
    assert np.max(np.abs(cupy.asnumpy(r_cp.x) - r_np.x)) <= 2e-6


@pytest.mark.skipif(not (cupy.cuda.runtime.getDeviceCount() >= 2), reason="needs two CUDA devices")
def test_minimize_on_a_non_current_device(rng):
    """x0 on device 1 while device 0 is current: the run works on device 1 (history, work arrays and result)."""
    import optkern

    with cupy.cuda.Device(1):
        x0 = cupy.asarray(rng.standard_normal(40))
    assert cupy.cuda.Device().id == 0
    seen = []

    def fg(x):
        seen.append(x.device.id)
        return float(cupy.sum((x - 1.0) ** 2)), 2 * (x - 1.0)

    res = optkern.lbfgs_minimize(fg, x0)
    assert res.success, res.message
    assert res.x.device.id == 1 and set(seen) == {1}
    assert cupy.cuda.Device().id == 0
    h = optkern.LBFGSHistory(40, history_size=3, like=x0)  # on device 1; device 0 current
    with pytest.raises(ValueError, match="^s: on device 0, the history on device 1"):
        h.push(cupy.ones(40), cupy.ones(40))
    with cupy.cuda.Device(1):  # used with its device current, it works
        s = cupy.asarray(rng.standard_normal(40))
        assert h.push(s, 2 * s) and h.direction(s).device.id == 1
