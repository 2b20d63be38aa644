"""L-BFGS (optkern.LBFGSHistory, optkern.lbfgs_minimize): the two-pass direction against a float64 NumPy
transcription of the two-loop recursion (Nocedal & Wright Alg. 7.4) and against the kernel-built two-loop; the
curvature guard; the sharded direction (allreduce); the minimizer on Moré-Garbow-Hillstrom problems against
scipy's L-BFGS-B; bad input.

Error measure: ``rel = ||d - d_ref||_2 / ||d_ref||_2``.  Measured (fallback xp kernels, this machine):
random SPD histories 3e-16 (float64) and 2e-7 (float32, the history rounded to float32 first, the reference on
those rounded values); fast path vs two-loop on histories from a quadratic of condition 1e8 at most 3e-13
(along an exact-line-search L-BFGS path, cond(R) up to 1e3) and 2e-15 (random pairs scaled by 10^±4,
cond(R) up to 1e15: diagonal scaling the triangular solves undo exactly).  Bounds: 1e-10, 1e-4, 1e-11.

Iteration counts: res.nit (accepted line-search steps) against scipy.optimize.minimize(method="L-BFGS-B",
options=dict(maxcor=10, gtol, ftol=0)).nit on the same start (ftol=0 for both, so both run to gtol).
The minimizer tests are ISA-independent in structure and run once, under the best path.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from conftest import AVAILABLE_ISAS

import optkern
from optkern import lbfgs as L

F32, F64 = np.float32, np.float64
scipy_optimize = pytest.importorskip("scipy.optimize", reason="scipy is needed for the L-BFGS-B comparisons")


def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent: runs once under the best path")


def _rel(a, ref):
    ref = np.asarray(ref, dtype=F64)
    return float(np.linalg.norm(np.asarray(a, dtype=F64) - ref) / np.linalg.norm(ref))


# ---- float64 NumPy reference: Nocedal & Wright Alg. 7.4 with H0 = (s.y / y.y) I of the newest pair ---------------
def two_loop_ref(pairs, g):
    g = np.asarray(g, dtype=F64)
    if not pairs:
        return -g
    pairs = [(np.asarray(s, F64), np.asarray(y, F64)) for s, y in pairs]
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = (y @ r) / (s @ y)
        r += (a - b) * s
    return -r


def spd(rng, n, cond):
    lam = np.logspace(0, math.log10(cond), n)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * lam) @ Q.T


def random_history(rng, h, A, npush, dtype):
    """Push npush pairs y = A s (SPD curvature); returns the pairs the history should hold (oldest first)."""
    kept = []
    for _ in range(npush):
        s = rng.standard_normal(A.shape[0]).astype(dtype)
        y = (A @ s.astype(F64)).astype(dtype)
        assert h.push(s, y) is True
        kept.append((s, y))
    return kept[-h.history_size:]


# ---- the direction -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 1e-4)])
@pytest.mark.parametrize("m,npush", [(1, 1), (1, 4), (5, 3), (5, 5), (5, 13), (10, 7), (10, 10), (10, 23)])
def test_direction_matches_two_loop_reference(rng, dtype, tol, m, npush):
    n = 67  # not a multiple of any SIMD width
    A = spd(rng, n, 1e3)
    h = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    kept = random_history(rng, h, A, npush, dtype)
    assert len(h) == min(m, npush)
    for _ in range(2):  # twice: the second call runs with no pending Gram updates
        g = rng.standard_normal(n).astype(dtype)
        ref = two_loop_ref(kept, g)
        d = h.direction(g)
        assert d.dtype == dtype and d.shape == (n,)
        assert _rel(d, ref) <= tol
        assert _rel(h.direction_two_loop(g), ref) <= tol


def test_direction_empty_history_is_steepest_descent(rng):
    h = optkern.LBFGSHistory(9, history_size=3)
    g = rng.standard_normal(9)
    np.testing.assert_array_equal(h.direction(g), -g)
    np.testing.assert_array_equal(h.direction_two_loop(g), -g)


def test_direction_out_and_interleaved_pushes(rng):
    """out= is written and returned; pushes between directions (several pending pairs) keep SY/YY current."""
    n, m = 40, 4
    A = spd(rng, n, 1e2)
    h = optkern.LBFGSHistory(n, history_size=m)
    kept = []
    out = np.empty(n)
    for step in range(11):
        for _ in range(step % 3):  # 0, 1 or 2 pushes before each direction
            kept += random_history(rng, h, A, 1, F64)
        kept = kept[-m:]
        g = rng.standard_normal(n)
        assert h.direction(g, out=out) is out
        assert _rel(out, two_loop_ref(kept, g)) <= 1e-10
    h.reset()
    assert len(h) == 0
    np.testing.assert_array_equal(h.direction(g), -g)


def test_direction_never_reads_the_lower_triangle_of_sy(rng):
    """Pass 1 fills only the upper triangle of SY (s_i . y_j, i pushed no later than j: the new y's column), as R
    needs: NaN in every lower-triangle entry, by age, must leave the direction equal to the two-loop's."""
    n, m = 40, 4
    A = spd(rng, n, 1e2)
    h = optkern.LBFGSHistory(n, history_size=m)
    kept = []
    for step in range(9):  # the ring wraps; 1 or 2 pushes before each direction
        kept = (kept + random_history(rng, h, A, 1 + step % 2, F64))[-m:]
        g = rng.standard_normal(n)
        h.direction(g)  # fills the pending columns
        order = h._order
        for i in range(len(order)):
            for j in range(i):
                h._SY[order[i], order[j]] = np.nan  # s_i . y_j with y_j older than s_i
        assert _rel(h.direction(g), two_loop_ref(kept, g)) <= 1e-10
        assert np.isfinite(h.direction_and_slope(g)[1])


# ---- the slope g.d from pass 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-14), (F32, 1e-6)])
@pytest.mark.parametrize("m,npush,n", [(1, 1, 67), (5, 3, 67), (10, 10, 67), (10, 23, 67), (32, 33, 67), (40, 45, 67),
                                       (10, 12, 8492)])
def test_direction_and_slope(rng, dtype, tol, m, npush, n):
    """d is bitwise the direction's; g.d (from the coefficients) matches float64 dot(d, g) to tol * |g| |d|, with
    and without pending pairs, in the ring after it wraps, at 2k = 64 stored (g in a second kernel call), beyond
    one kernel call (m = 40: 81 stored), and over several chunks and lane blocks (n = 8492)."""
    A = spd(rng, n, 1e3) if n < 1000 else np.diag(rng.uniform(1.0, 1e3, n))
    h1 = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    h2 = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    for s, y in random_history(rng, h1, A, npush, dtype):  # the pairs h1 kept
        assert h2.push(s, y)
    for _ in range(2):  # pending Gram entries, then none
        g = rng.standard_normal(n).astype(dtype)
        d1 = h1.direction(g)
        d2, gtd = h2.direction_and_slope(g)
        np.testing.assert_array_equal(d2, d1)
        exact = float(d1.astype(F64) @ g.astype(F64))
        assert gtd < 0
        assert abs(gtd - exact) <= tol * np.linalg.norm(g.astype(F64)) * np.linalg.norm(d1.astype(F64))


def test_direction_and_slope_empty_history_and_out(rng):
    h = optkern.LBFGSHistory(9, history_size=3)
    g = rng.standard_normal(9)
    out = np.empty(9)
    d, gtd = h.direction_and_slope(g, out=out)
    assert d is out
    np.testing.assert_array_equal(d, -g)
    assert abs(gtd + math.fsum(g * g)) <= 1e-15 * (g @ g)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 1e-5)])
def test_sharded_slope_matches_unsharded(rng, dtype, tol):
    """The slope is part of pass 1's one all-reduced message: (g + the 4 pending pairs' y) queries x (2k + 1) stored."""
    n, m = 80, 4
    A = spd(rng, n, 1e3)
    pairs = [(s.astype(dtype), (A @ s).astype(dtype)) for s in rng.standard_normal((5, n))]
    g = rng.standard_normal(n).astype(dtype)
    full = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    for s, y in pairs:
        full.push(s, y)
    d_full, gtd_full = full.direction_and_slope(g)

    def work(rank, lo, hi, allreduce):
        h = optkern.LBFGSHistory(hi - lo, history_size=m, dtype=dtype)
        for s, y in pairs:
            h.push(s[lo:hi].copy(), y[lo:hi].copy(), allreduce=allreduce)
        sizes = []

        def counted(v):
            sizes.append(v.size)
            return allreduce(v)

        d, gtd = h.direction_and_slope(g[lo:hi].copy(), allreduce=counted)
        return d, gtd, sizes

    results, _ = run_sharded([(0, 37), (37, 80)], work)
    assert all(r[2] == [(1 + m) * (2 * m + 1)] for r in results)  # g and 4 pending y; 2m + 1 stored
    assert _rel(np.concatenate([r[0] for r in results]), d_full) <= tol
    for r in results:
        assert abs(r[1] - gtd_full) <= tol * abs(gtd_full)

    def work_empty(rank, lo, hi, allreduce):  # no pairs: the slope is -g.g, one all-reduced value
        h = optkern.LBFGSHistory(hi - lo, history_size=m, dtype=dtype)
        sizes = []

        def counted(v):
            sizes.append(v.size)
            return allreduce(v)

        return h.direction_and_slope(g[lo:hi].copy(), allreduce=counted)[1], sizes

    results, _ = run_sharded([(0, 37), (37, 80)], work_empty)
    g64 = g.astype(F64)
    for gtd, sizes in results:
        assert sizes == [1] and abs(gtd + g64 @ g64) <= tol * (g64 @ g64)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("n", [1, 67, 1000])
def test_history_rows_and_new_vectors_are_64_byte_aligned(rng, dtype, n):
    """The history's rows, a direction's new output and the minimizer's vectors start on 64-byte boundaries (NumPy
    alone aligns to 16: the kernels' vector loads would straddle cache lines)."""
    h = optkern.LBFGSHistory(n, history_size=3, dtype=dtype)
    for rows in (h._S, h._Y):
        for r in rows:
            assert r.ctypes.data % 64 == 0 and r.flags.c_contiguous and r.shape == (n,)
    g = rng.standard_normal(n).astype(dtype)
    assert h.direction(g).ctypes.data % 64 == 0
    seen = []

    def fg(x):
        seen.append(x.ctypes.data % 64)
        return float(x @ x), 2 * x

    res = optkern.lbfgs_minimize(fg, g, max_iter=3)
    assert seen and set(seen) == {0} and res.x.ctypes.data % 64 == 0 and res.grad.ctypes.data % 64 == 0


@pytest.mark.parametrize("dtype", [F64, F32])
def test_curvature_guard_skips_and_reports(rng, dtype):
    n, m = 30, 3
    A = spd(rng, n, 10)
    h = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    kept = random_history(rng, h, A, 3, dtype)
    s = rng.standard_normal(n).astype(dtype)
    z = np.zeros(n, dtype)
    e = np.zeros(n, dtype)
    e[0] = 1
    bad = [(s, -(A @ s).astype(dtype)),  # negative curvature
           (e, np.roll(e, 1)),  # s.y = 0 exactly
           (s, np.full(n, np.nan, dtype)),  # non-finite
           (z, z)]  # s = y = 0
    for k, (bs, by) in enumerate(bad, 1):
        assert h.push(bs, by) is False
        assert h.num_skipped == k and len(h) == m
        g = rng.standard_normal(n).astype(dtype)
        assert _rel(h.direction(g), two_loop_ref(kept, g)) <= (1e-10 if dtype == F64 else 1e-4)
    # the guard's threshold: s.y <= eps * y.y is skipped
    h2 = optkern.LBFGSHistory(2, history_size=2, curvature_eps=0.5)
    assert h2.push(np.array([1.0, 0.0]), np.array([0.5, 1.0])) is False  # s.y = 0.5 <= 0.5 * 1.25
    assert h2.push(np.array([1.0, 0.0]), np.array([1.0, 1.0])) is False  # s.y = 1 <= 0.5 * 2
    assert h2.push(np.array([1.0, 0.0]), np.array([1.0, 0.5])) is True  # s.y = 1 > 0.5 * 1.25
    assert h2.num_skipped == 2 and len(h2) == 1


def test_ill_conditioned_fast_path_vs_two_loop(rng):
    """Histories from a quadratic of condition 1e8: the pairs of an L-BFGS run with exact line searches (s
    vectors nearly A-conjugate, cond(R) grows to ~1e3) and random pairs scaled by 10^(+-4) (cond(R) ~1e15).
    Measured max rel differences: 3e-13 and 2e-15 (fast vs two-loop); bound 1e-11 (both also vs the NumPy
    reference)."""
    n, m = 60, 10
    A = spd(rng, n, 1e8)
    h = optkern.LBFGSHistory(n, history_size=m)
    kept = []
    x = rng.standard_normal(n)
    worst = 0.0
    for it in range(60):
        g = A @ x
        d = h.direction(g)
        if it:
            d2 = h.direction_two_loop(g)
            ref = two_loop_ref(kept[-m:], g)
            worst = max(worst, _rel(d, d2))
            assert _rel(d, ref) <= 1e-11 and _rel(d2, ref) <= 1e-11
        t = -(g @ d) / (d @ A @ d)
        s = t * d
        if h.push(s, A @ s):
            kept.append((s, A @ s))
    assert worst <= 1e-11
    h = optkern.LBFGSHistory(n, history_size=m)
    kept = []
    for _ in range(m):
        s = rng.standard_normal(n) * 10 ** rng.uniform(-4, 4)
        assert h.push(s, A @ s)
        kept.append((s, A @ s))
    g = A @ rng.standard_normal(n)
    assert _rel(h.direction(g), h.direction_two_loop(g)) <= 1e-11
    assert _rel(h.direction(g), two_loop_ref(kept, g)) <= 1e-11


# ---- sharded direction: each shard holds its slice of every vector; allreduce sums pass-1 partials ----------------
class ThreadAllreduce:
    """An in-process all-reduce over `size` threads: every rank deposits its partials, all wait, each gets the
    sum in rank order (so every rank sees bit-identical totals)."""

    def __init__(self, size):
        self.size = size
        self.parts = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)
        self.calls = [0] * size

    def fn(self, rank):
        def allreduce(v):
            assert isinstance(v, np.ndarray) and v.dtype == F64 and v.ndim == 1
            self.calls[rank] += 1
            self.parts[rank] = v.copy()
            self.barrier.wait()
            total = self.parts[0].copy()
            for p in self.parts[1:]:
                total += p
            self.barrier.wait()  # nobody overwrites parts before everyone has summed
            return total
        return allreduce


def run_sharded(bounds, work):
    """Run work(rank, lo, hi, allreduce) on one thread per shard; re-raise the first failure."""
    ar = ThreadAllreduce(len(bounds))
    errors, results = [], [None] * len(bounds)

    def target(rank):
        try:
            results[rank] = work(rank, *bounds[rank], ar.fn(rank))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            ar.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(bounds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, ar


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 1e-5)])
@pytest.mark.parametrize("cuts", [(0, 37, 80), (0, 20, 45, 80)])
def test_sharded_direction_matches_unsharded(rng, dtype, tol, cuts):
    n, m = 80, 4
    A = spd(rng, n, 1e3)
    seq = []  # pushes, including a rejected one, and directions interleaved
    for i in range(9):
        s = rng.standard_normal(n)
        y = A @ s if i != 4 else -(A @ s)
        seq.append(("push", s.astype(dtype), y.astype(dtype)))
        if i % 2:
            seq.append(("dir", rng.standard_normal(n).astype(dtype), None))
    full = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    expect = []
    for op, a, b in seq:
        expect.append(full.push(a, b) if op == "push" else full.direction(a))
    bounds = list(zip(cuts[:-1], cuts[1:]))

    def work(rank, lo, hi, allreduce):
        h = optkern.LBFGSHistory(hi - lo, history_size=m, dtype=dtype)
        out = []
        for op, a, b in seq:
            out.append(h.push(a[lo:hi].copy(), b[lo:hi].copy(), allreduce=allreduce) if op == "push"
                       else (h.direction(a[lo:hi].copy(), allreduce=allreduce),
                             h.direction_two_loop(a[lo:hi].copy(), allreduce=allreduce)))
        return out

    results, ar = run_sharded(bounds, work)
    assert len(set(ar.calls)) == 1
    for j, e in enumerate(expect):
        if isinstance(e, bool):
            assert all(r[j] is e for r in results)
        else:
            assert _rel(np.concatenate([r[j][0] for r in results]), e) <= tol
            assert _rel(np.concatenate([r[j][1] for r in results]), e) <= tol
    assert sum(e is False for e in expect) == 1


def test_allreduce_identity_unsharded(rng):
    n = 25
    A = spd(rng, n, 10)
    h = optkern.LBFGSHistory(n, history_size=3)
    seen = []

    def ident(v):
        seen.append(v.size)
        return v.copy()

    kept = []
    for _ in range(4):
        s = rng.standard_normal(n)
        assert h.push(s, A @ s, allreduce=ident)
        kept.append((s, A @ s))
    g = rng.standard_normal(n)
    assert _rel(h.direction(g, allreduce=ident), two_loop_ref(kept[-3:], g)) <= 1e-12
    # 4 push checks of 2 values, then ONE pass-1 result: (g + 3 pending pairs' y) queries x 2k stored
    assert seen == [2, 2, 2, 2, (1 + 3) * 6]


# ---- the kernels' wrappers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32])
def test_dots_and_lincomb_wrappers_beyond_64_vectors(rng, dtype):
    n = 33
    vecs = [rng.standard_normal(n).astype(dtype) for _ in range(150)]
    qs = [rng.standard_normal(n).astype(dtype) for _ in range(70)]
    D = L._dots(vecs, qs)
    ref = np.array(qs, F64) @ np.array(vecs, F64).T
    assert D.shape == (70, 150) and D.dtype == F64
    assert np.abs(D - ref).max() <= (1e-12 if dtype == F64 else 1e-4) * np.abs(ref).max()
    c = rng.standard_normal(150)
    out = np.empty(n, dtype)
    assert L._lincomb(vecs, list(c), out) is out
    lc = np.array(vecs, F64).T @ c
    assert np.abs(out - lc).max() <= (1e-12 if dtype == F64 else 1e-4) * np.abs(lc).max()
    for k in (64, 65, 127, 128):  # block boundaries of the >64 path
        L._lincomb(vecs[:k], list(c[:k]), out)
        lc = np.array(vecs[:k], F64).T @ c[:k]
        assert np.abs(out - lc).max() <= (1e-12 if dtype == F64 else 1e-4) * np.abs(lc).max()


def test_history_larger_than_one_kernel_call(rng):
    """history_size 40: 80 stored vectors, more than the kernels take at once (64)."""
    n, m = 50, 40
    A = spd(rng, n, 1e2)
    h = optkern.LBFGSHistory(n, history_size=m)
    kept = random_history(rng, h, A, 45, F64)
    g = rng.standard_normal(n)
    assert _rel(h.direction(g), two_loop_ref(kept, g)) <= 1e-10


# ---- Moré-Garbow-Hillstrom problems and friends -----------------------------------------------------------------
def ext_rosenbrock(x):
    a, b = x[0::2], x[1::2]
    t1, t2 = b - a * a, 1 - a
    g = np.empty_like(x)
    g[0::2] = -400 * a * t1 - 2 * t2
    g[1::2] = 200 * t1
    return float(np.sum(100 * t1 * t1 + t2 * t2)), g


def ext_powell(x):
    x1, x2, x3, x4 = x[0::4], x[1::4], x[2::4], x[3::4]
    t1, t2, t3, t4 = x1 + 10 * x2, x3 - x4, x2 - 2 * x3, x1 - x4
    g = np.empty_like(x)
    g[0::4] = 2 * t1 + 40 * t4 ** 3
    g[1::4] = 20 * t1 + 4 * t3 ** 3
    g[2::4] = 10 * t2 - 8 * t3 ** 3
    g[3::4] = -10 * t2 - 40 * t4 ** 3
    return float(np.sum(t1 ** 2 + 5 * t2 ** 2 + t3 ** 4 + 10 * t4 ** 4)), g


def beale(x):
    X, Y = x
    a, b, c = 1.5 - X + X * Y, 2.25 - X + X * Y * Y, 2.625 - X + X * Y ** 3
    g = np.array([2 * a * (Y - 1) + 2 * b * (Y * Y - 1) + 2 * c * (Y ** 3 - 1),
                  2 * a * X + 4 * b * X * Y + 6 * c * X * Y * Y], dtype=x.dtype)
    return float(a * a + b * b + c * c), g


def quadratic(cond, n=20, seed=7):
    r = np.random.default_rng(seed)
    A = spd(r, n, cond) / math.sqrt(cond)  # eigenvalues 1e-3 .. 1e3
    xs = r.standard_normal(n)

    def fg(x):
        e = x - xs
        Ae = A @ e
        return 0.5 * float(e @ Ae), Ae
    return fg


def logistic(lam=1e-3):
    try:
        from sklearn.datasets import load_digits

        X, digit = load_digits(return_X_y=True)
        X, y = X / 16.0, np.where(digit >= 5, 1.0, -1.0)
    except ImportError:  # random data of the same shape
        r = np.random.default_rng(3)
        X = r.random((1797, 64))
        y = np.where(X @ r.standard_normal(64) + 0.3 * r.standard_normal(1797) > 0, 1.0, -1.0)
    X = np.hstack([X, np.ones((len(X), 1))])

    def fg(w):
        z = y * (X @ w)
        f = np.mean(np.logaddexp(0, -z)) + 0.5 * lam * (w @ w)
        sig = -y * np.exp(-np.logaddexp(0, z))
        return float(f), X.T @ sig / len(y) + lam * w
    return fg, X.shape[1]


_LOGREG, _LOGREG_N = logistic()
PROBLEMS = {
    "rosenbrock2": (ext_rosenbrock, np.array([-1.2, 1.0])),
    "rosenbrock100": (ext_rosenbrock, np.tile([-1.2, 1.0], 50)),
    "rosenbrock1000": (ext_rosenbrock, np.tile([-1.2, 1.0], 500)),
    "powell4": (ext_powell, np.array([3.0, -1.0, 0.0, 1.0])),
    "powell100": (ext_powell, np.tile([3.0, -1.0, 0.0, 1.0], 25)),
    "beale": (beale, np.array([1.0, 1.0])),
    "quadratic_cond1e6": (quadratic(1e6), np.zeros(20)),
    "logistic_digits": (_LOGREG, np.zeros(_LOGREG_N)),
}


def scipy_nit(fg, x0, gtol):
    r = scipy_optimize.minimize(fg, x0, jac=True, method="L-BFGS-B",
                                options={"maxcor": 10, "gtol": gtol, "ftol": 0.0, "maxiter": 20000})
    return r.nit


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_minimize_mgh_vs_scipy(cpu_isa, name, line_search):
    _once(cpu_isa)
    fg, x0 = PROBLEMS[name]
    gtol = 1e-6
    res = optkern.lbfgs_minimize(fg, x0.copy(), history_size=10, gtol=gtol, ftol=0.0, max_iter=20000,
                                 line_search=line_search)
    assert res.success, res.message
    assert "GTOL" in res.message
    assert np.abs(res.grad).max() <= gtol
    assert res.x.shape == x0.shape and res.x.dtype == F64
    assert res.fun == pytest.approx(fg(res.x)[0], rel=0, abs=0)
    assert res.nfev >= res.nit
    ref = scipy_nit(fg, x0, gtol)
    assert res.nit <= 1.5 * ref, (res.nit, ref)


def test_minimize_float32(cpu_isa):
    _once(cpu_isa)

    def fg32(x):
        f, g = _LOGREG(x.astype(F64))
        return f, g.astype(F32)

    x0 = np.zeros(_LOGREG_N, F32)
    res = optkern.lbfgs_minimize(fg32, x0, gtol=1e-4, ftol=0.0)
    assert res.success and "GTOL" in res.message, res.message
    assert res.x.dtype == F32 and res.grad.dtype == F32
    assert np.abs(res.grad).max() <= 1e-4
    assert res.nit <= 1.5 * scipy_nit(_LOGREG, x0.astype(F64), 1e-4)
    res2 = optkern.lbfgs_minimize(lambda x: ext_rosenbrock(x), np.tile([-1.2, 1.0], 8).astype(F32), gtol=1e-3)
    assert res2.success and res2.x.dtype == F32
    np.testing.assert_allclose(res2.x, 1.0, atol=1e-2)


def test_minimize_ftol_maxiter_callback_shape(cpu_isa):
    _once(cpu_isa)
    x0 = np.tile([-1.2, 1.0], 3).reshape(2, 3)  # any shape: fun_and_grad sees x0's shape
    shapes = []

    def fg(x):
        shapes.append(x.shape)
        f, g = ext_rosenbrock(x.reshape(-1))
        return f, g.reshape(x.shape)

    res = optkern.lbfgs_minimize(fg, x0)  # default ftol: scipy's factr 1e7 * eps
    assert res.success and set(shapes) == {(2, 3)} and res.x.shape == (2, 3)
    np.testing.assert_allclose(res.x, 1.0, atol=1e-4)
    res = optkern.lbfgs_minimize(fg, x0, max_iter=5)
    assert not res.success and res.status == 1 and res.nit == 5 and "ITERATIONS" in res.message
    seen = []
    res = optkern.lbfgs_minimize(fg, x0, callback=lambda x: seen.append(x.copy()) or len(seen) == 3)
    assert res.success and res.nit == 3 and len(seen) == 3 and "CALLBACK" in res.message
    np.testing.assert_array_equal(seen[-1], res.x)
    res = optkern.lbfgs_minimize(fg, np.ones((2, 3)))
    assert res.success and res.nit == 0 and res.nfev == 1
    assert x0[0, 0] == -1.2  # x0 is not modified


# ---- bad input --------------------------------------------------------------------------------------------------
def test_bad_inputs(cpu_isa):
    _once(cpu_isa)
    fg = ext_rosenbrock
    for bad in (np.zeros(4, np.int64), np.zeros(4, np.float16), np.zeros(4, np.complex128)):
        with pytest.raises(TypeError, match="x0"):
            optkern.lbfgs_minimize(fg, bad)
    with pytest.raises(TypeError, match="x0"):
        optkern.lbfgs_minimize(fg, [1.0, 2.0])
    for hs in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="history_size"):
            optkern.lbfgs_minimize(fg, np.zeros(2), history_size=hs)
        with pytest.raises(ValueError, match="history_size"):
            optkern.LBFGSHistory(4, history_size=hs)
    with pytest.raises(ValueError, match="line_search"):
        optkern.lbfgs_minimize(fg, np.zeros(2), line_search="hager_zhang")
    with pytest.raises(TypeError, match="dtype"):
        optkern.LBFGSHistory(4, dtype=np.int32)
    h = optkern.LBFGSHistory(4, history_size=2)
    with pytest.raises(ValueError, match="g: expected shape"):
        h.direction(np.zeros(5))
    with pytest.raises(TypeError, match="g: expected float64"):
        h.direction(np.zeros(4, F32))
    with pytest.raises(ValueError, match="s: expected shape"):
        h.push(np.zeros(3), np.zeros(4))
    g = np.ones(4)
    with pytest.raises(ValueError, match="out"):
        h.direction(g, out=g)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
def test_non_finite_from_fun_and_grad_fails(cpu_isa, line_search):
    _once(cpu_isa)
    res = optkern.lbfgs_minimize(lambda x: (math.nan, x.copy()), np.ones(3), line_search=line_search)
    assert not res.success and res.status == 2 and "non-finite" in res.message and res.nit == 0

    def grad_nan(x):
        f, g = ext_rosenbrock(x)
        g[0] = np.nan
        return f, g
    res = optkern.lbfgs_minimize(grad_nan, np.array([-1.2, 1.0]), line_search=line_search)
    assert not res.success and "non-finite gradient" in res.message

    def blows_up(x):  # finite at the start, inf once x moves far enough
        f, g = ext_rosenbrock(x)
        return (f if abs(x[0]) < 1.0 else math.inf), g
    res = optkern.lbfgs_minimize(blows_up, np.array([-0.5, 1.0]), line_search=line_search)
    assert not res.success and "non-finite" in res.message
    assert np.all(np.isfinite(res.x)) and math.isfinite(res.fun) and np.all(np.isfinite(res.grad))
    assert res.fun == ext_rosenbrock(res.x)[0]


# ---- CuPy (skipped without a CUDA device) -------------------------------------------------------------------------
def _cupy():
    try:
        import cupy

        usable = cupy.cuda.runtime.getDeviceCount() > 0 and optkern.cuda_available()
    except Exception:  # noqa: BLE001 - any failure means no usable CuPy here
        usable = False
    if usable:
        return cupy
    pytest.skip("CuPy with a CUDA device (and optkern's CUDA kernels) is not available on this machine")


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 1e-4)])
def test_cupy_direction_and_minimize(cpu_isa, rng, dtype, tol):
    _once(cpu_isa)
    cp = _cupy()
    n, m = 300, 5
    A = spd(rng, n, 1e3)
    like = cp.zeros(n, dtype)
    h = optkern.LBFGSHistory(n, history_size=m, like=like)
    assert h.dtype == dtype
    kept = []
    for _ in range(8):
        s = rng.standard_normal(n).astype(dtype)
        y = (A @ s.astype(F64)).astype(dtype)
        assert h.push(cp.asarray(s), cp.asarray(y))
        kept.append((s, y))
    g = rng.standard_normal(n).astype(dtype)
    d = h.direction(cp.asarray(g))
    assert isinstance(d, cp.ndarray)
    assert _rel(d.get(), two_loop_ref(kept[-m:], g)) <= tol
    assert _rel(h.direction_two_loop(cp.asarray(g)).get(), two_loop_ref(kept[-m:], g)) <= tol

    def fg(x):
        a, b = x[0::2], x[1::2]
        t1, t2 = b - a * a, 1 - a
        gr = cp.empty_like(x)
        gr[0::2] = -400 * a * t1 - 2 * t2
        gr[1::2] = 200 * t1
        return float(cp.sum(100 * t1 * t1 + t2 * t2)), gr

    x0 = cp.asarray(np.tile([-1.2, 1.0], 50).astype(dtype))
    gtol = 1e-6 if dtype == F64 else 1e-3
    res = optkern.lbfgs_minimize(fg, x0, gtol=gtol, ftol=0.0)
    assert res.success, res.message
    assert isinstance(res.x, cp.ndarray) and res.x.dtype == dtype
    assert float(cp.abs(res.grad).max()) <= gtol


def test_gradient_buffer_reused_by_the_callback(cpu_isa):
    """fun_and_grad may refill and return the same gradient array every call: the minimizer keeps its own copy."""
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent: runs once under the best path")
    buf = np.empty(20)

    def fg(x):
        f = float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))
        buf[:] = 0.0
        buf[:-1] += -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
        buf[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
        return f, buf

    res = optkern.lbfgs_minimize(fg, np.full(20, -1.2), max_iter=1000)
    assert res.success, res.message
    assert res.nit < 300 and res.nskipped == 0


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
def test_recycled_gradient_copies_never_leak(cpu_isa, line_search):
    """The minimizer recycles its gradient copies of rejected trials and of old iterates: the gradient it returns is
    still exactly the one fun_and_grad returned for res.x, and the run converges as usual.  (A copy recycled while
    still in use corrupts y = g_new - g: the MGH and scipy comparisons above then fail, as checked by mutation.)"""
    _once(cpu_isa)
    seen = {}

    def fg(x):
        f = float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))
        g = np.zeros_like(x)
        g[:-1] += -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
        g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
        seen[x.tobytes()] = g.copy()
        return f, g

    res = optkern.lbfgs_minimize(fg, np.full(30, -1.2), max_iter=500, line_search=line_search)
    assert res.success and res.nfev > res.nit  # some trials were rejected, so copies were recycled
    np.testing.assert_array_equal(res.grad, seen[res.x.tobytes()])
