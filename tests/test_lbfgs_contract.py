"""L-BFGS contract tests (optkern.LBFGSHistory, optkern.lbfgs_minimize and their internals in optkern.lbfgs).

Covered: the default curvature guard at its threshold (s.y vs eps * y.y, float32 and float64); allreduce replies
of the wrong size; validation before any state change (history, out buffer); lbfgs_minimize's gradient checks
(_check_gradient) and conversions; x0 never modified; res.nskipped against an independent recount of the
curvature test; the strong Wolfe (_strong_wolfe) and Armijo (_armijo) searches on 1-D functions, among them the
six of More & Thuente (1994); the fast path vs the two-loop recursion on float32 histories of condition 1e8;
_lincomb on inputs and outputs at odd element offsets; LBFGSHistory(like=...) type errors; the default ftol stop;
and _dots/_lincomb bitwise equal on every CPU path to the scalar path.

Tests that do not depend on the kernels' instruction set run once, under the best path (``_once``); the others
run under every path the autouse fixture of conftest.py forces.  Tolerances are stated at each test.
"""

from __future__ import annotations

import math

import numpy as np
import optkern
import pytest
from optkern import lbfgs as L
from test_lbfgs import _once, _rel, ext_rosenbrock, two_loop_ref
from test_lbfgs_kernels import exact_lincomb

F32, F64 = np.float32, np.float64
U = {F32: 2.0 ** -24, F64: 2.0 ** -53}  # unit roundoff
SENTINEL = 12345.0
_ISA_ORDER = ("scalar", "avx2", "avx512")
# Every path this CPU runs (independent of an OPTKERN_CPU_ISA restriction of the fixture).
ALL_ISAS = [i for i in _ISA_ORDER if _ISA_ORDER.index(i) <= _ISA_ORDER.index(optkern.cpu_best_isa())]


def _vec(rng, n, dtype=F64):
    """Random entries in +-[0.5, 1.5]: never zero."""
    return (rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)).astype(dtype)


def _spd(rng, n, lo, hi):
    """A random SPD matrix with eigenvalues logspaced in [lo, hi]."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.logspace(math.log10(lo), math.log10(hi), n)) @ Q.T


def _twins(rng, n=37, m=4, npush=6, dtype=F64):
    """Two histories given the same pushes (the ring wrapped, the last pairs' Gram entries still pending)."""
    A = _spd(rng, n, 1.0, 1e2)
    h = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    twin = optkern.LBFGSHistory(n, history_size=m, dtype=dtype)
    for i in range(npush):
        s = _vec(rng, n, dtype)
        y = (A @ s.astype(F64)).astype(dtype)
        assert h.push(s, y) and twin.push(s, y)
        if i == npush - 4:
            h.direction(s), twin.direction(s)  # some pairs' Gram entries filled, later ones pending
    return h, twin


def _assert_same_history(h, twin, g):
    """h holds what twin holds: same size, same skip count, bitwise the same directions (both methods)."""
    assert len(h) == len(twin) and h.num_skipped == twin.num_skipped
    np.testing.assert_array_equal(h.direction(g), twin.direction(g))
    np.testing.assert_array_equal(h.direction_and_slope(g)[1], twin.direction_and_slope(g)[1])
    np.testing.assert_array_equal(h.direction_two_loop(g), twin.direction_two_loop(g))


# ---- 1. the default curvature guard ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
def test_default_curvature_guard_threshold(rng, dtype):
    """Default curvature_eps = the dtype's machine epsilon; push stores a pair iff s.y > eps * y.y.  s = a y / |y|^2
    + w (w orthogonal to y, |w| = |a y| / |y|^2) sets s.y to a = factor * eps * y.y; the ratio actually seen, from
    the same _dots call push makes, is within 1e-3 of factor (rounding of s and of the dots: ~1e-6 relative), so
    factors 0.5 and 0.99 (skipped) and 1.01 and 2 (stored) are unambiguous.  A float64 eps used for float32 (or
    eps = 0) stores the 0.99 pair; a float32 eps used for float64 skips the 2x pair."""
    n = 41
    eps = float(np.finfo(dtype).eps)
    for factor, stored in ((0.5, False), (0.99, False), (1.01, True), (2.0, True)):
        h = optkern.LBFGSHistory(n, history_size=3, dtype=dtype)
        assert h.curvature_eps == eps
        y0 = _vec(rng, n, dtype)
        assert h.push((0.5 * y0.astype(F64)).astype(dtype), y0)  # one stored pair: s.y = y.y / 2
        y = _vec(rng, n, dtype)
        y64 = y.astype(F64)
        yy = float(y64 @ y64)
        w = rng.standard_normal(n)
        w -= (w @ y64) / yy * y64
        s_par = factor * eps * y64  # (a / y.y) y with a = factor * eps * y.y
        w *= np.linalg.norm(s_par) / np.linalg.norm(w)
        s = (s_par + w).astype(dtype)
        sy, yy_k = L._dots([y], [s, y])[:, 0]
        ratio = sy / (eps * yy_k)
        assert abs(ratio - factor) <= 1e-3, ratio
        g = _vec(rng, n, dtype)
        d_before = h.direction(g)
        assert h.push(s, y) is stored
        assert len(h) == (2 if stored else 1) and h.num_skipped == (0 if stored else 1)
        if not stored:
            np.testing.assert_array_equal(h.direction(g), d_before)


def test_default_curvature_eps_follows_like_dtype(cpu_isa):
    _once(cpu_isa)
    assert optkern.LBFGSHistory(5, like=np.ones(5, F32)).curvature_eps == float(np.finfo(F32).eps)
    assert optkern.LBFGSHistory(5).curvature_eps == float(np.finfo(F64).eps)
    assert optkern.LBFGSHistory(5, dtype=F32).curvature_eps == float(np.finfo(F32).eps)


# ---- 2. allreduce replies of the wrong size --------------------------------------------------------------------
_BAD_REPLIES = {
    "one_short": lambda v: v[:-1].copy(),
    "doubled": lambda v: np.concatenate([v, v]),
    "empty": lambda v: np.zeros(0),
    "sum_scalar": lambda v: np.float64(v.sum()),  # size 1: wrong for push and the two-pass directions' messages
}


@pytest.mark.parametrize("reply", list(_BAD_REPLIES))
@pytest.mark.parametrize("call", ["push", "direction", "direction_and_slope", "direction_two_loop"])
def test_allreduce_wrong_size_raises_and_changes_nothing(cpu_isa, rng, reply, call):
    """ValueError naming allreduce; afterwards the history is bitwise its untouched twin's (pending Gram entries
    included) and out keeps its sentinel.  Without _reduce's size check, reshape raises a ValueError that does not
    name allreduce (checked by removing it in a copy of the package)."""
    _once(cpu_isa)
    h, twin = _twins(rng)
    n = h.n
    bad = _BAD_REPLIES[reply]
    g = _vec(rng, n)
    out = np.full(n, SENTINEL)
    if call == "direction_two_loop" and reply == "sum_scalar":
        # Every two-loop message is one dot product: a scalar reply is the right size, and unsharded its sum is the
        # value itself, so the direction is the plain one.
        np.testing.assert_array_equal(h.direction_two_loop(g, out=out, allreduce=bad), twin.direction_two_loop(g))
        return
    with pytest.raises(ValueError, match="allreduce"):
        if call == "push":
            h.push(_vec(rng, n), _vec(rng, n), allreduce=bad)
        else:
            getattr(h, call)(g, out=out, allreduce=bad)
    assert np.all(out == SENTINEL)
    _assert_same_history(h, twin, g)


def test_allreduce_wrong_size_empty_history(cpu_isa, rng):
    """With no pairs the slope's message is one value (-g.g); an empty reply is refused, nothing is stored."""
    _once(cpu_isa)
    h = optkern.LBFGSHistory(9, history_size=3)
    g = _vec(rng, 9)
    out = np.full(9, SENTINEL)
    with pytest.raises(ValueError, match="allreduce"):
        h.direction_and_slope(g, out=out, allreduce=lambda v: v[:0])
    assert np.all(out == SENTINEL) and len(h) == 0 and h.num_skipped == 0
    with pytest.raises(ValueError, match="allreduce"):
        h.push(_vec(rng, 9), _vec(rng, 9), allreduce=lambda v: v[:1])
    assert len(h) == 0 and h.num_skipped == 0


# ---- 3. validate before mutate -----------------------------------------------------------------------------------
def _readonly(a):
    a.flags.writeable = False
    return a


def _bad_push(case, n, rng):
    s, y = _vec(rng, n), _vec(rng, n)
    if case == "s_short":
        return (s[:-1].copy(), y), ValueError, r"^s: expected shape"
    if case == "y_long":
        return (s, np.append(y, 1.0)), ValueError, r"^y: expected shape"
    if case == "s_float32":
        return (s.astype(F32), y), TypeError, r"^s: expected float64"
    if case == "y_float32":
        return (s, y.astype(F32)), TypeError, r"^y: expected float64"
    if case == "s_2d":
        return (np.append(s, 1.0)[:n].reshape(1, n), y), ValueError, r"^s: expected shape"
    if case == "y_strided":
        return (s, np.repeat(y, 2)[::2]), ValueError, r"^y: expected a contiguous"
    if case == "s_int":
        return (np.arange(1, n + 1), y), TypeError, r"^s: expected float64"
    if case == "s_torch":
        torch = pytest.importorskip("torch", reason="the torch case needs torch")
        return (torch.from_numpy(s), y), TypeError, r"^s:"
    raise AssertionError(case)


PUSH_CASES = ["s_short", "y_long", "s_float32", "y_float32", "s_2d", "y_strided", "s_int", "s_torch"]


@pytest.mark.parametrize("case", PUSH_CASES)
def test_push_validates_before_storing(cpu_isa, rng, case):
    """Each bad push raises, naming its argument, and the history equals its twin's (bitwise directions)."""
    _once(cpu_isa)
    h, twin = _twins(rng)
    args, exc, msg = _bad_push(case, h.n, rng)
    with pytest.raises(exc, match=msg):
        h.push(*args)
    _assert_same_history(h, twin, _vec(rng, h.n))


def test_push_accepts_readonly_inputs_and_copies_them(cpu_isa, rng):
    """s and y are only read (copied): read-only arrays are accepted, and later changes to them change nothing."""
    _once(cpu_isa)
    h, twin = _twins(rng)
    s = _vec(rng, h.n)
    y = 1.5 * s
    assert h.push(_readonly(s.copy()), _readonly(y.copy())) and twin.push(s, y)
    s *= -1.0  # the caller reuses its buffers
    y[:] = 0.0
    _assert_same_history(h, twin, _vec(rng, h.n))


@pytest.mark.parametrize("where", ["push_s", "push_y", "direction_g", "direction_out"])
def test_non_array_argument_raises_type_error_naming_it(cpu_isa, rng, where):
    _once(cpu_isa)
    h, twin = _twins(rng)
    v, lst = _vec(rng, h.n), list(_vec(rng, h.n))
    name = where.split("_")[1]
    with pytest.raises(TypeError, match=f"^{name}:"):
        if where == "push_s":
            h.push(lst, v)
        elif where == "push_y":
            h.push(v, lst)
        elif where == "direction_g":
            h.direction(lst)
        else:
            h.direction(v, out=lst)
    _assert_same_history(h, twin, v)


DIRECTION_CASES = ["g_short", "g_float32", "g_strided", "g_2d", "out_float32", "out_short", "out_readonly",
                   "out_is_g", "out_view_of_g", "out_strided"]


@pytest.mark.parametrize("method", ["direction", "direction_and_slope", "direction_two_loop"])
@pytest.mark.parametrize("case", DIRECTION_CASES)
@pytest.mark.parametrize("empty", [False, True], ids=["pairs", "empty"])
def test_direction_validates_before_writing(cpu_isa, rng, method, case, empty):
    """Each bad g or out raises, naming it (g, out); out keeps its sentinel, g its values, and the history equals
    its twin's (bitwise directions afterwards), also with an empty history (the -g shortcut)."""
    _once(cpu_isa)
    if empty:
        n = 37
        h, twin = optkern.LBFGSHistory(n, 4), optkern.LBFGSHistory(n, 4)
    else:
        h, twin = _twins(rng)
        n = h.n
    g = _vec(rng, n)
    out = np.full(n, SENTINEL)
    exc = ValueError
    if case == "g_short":
        g, msg = g[:-1].copy(), r"^g: expected shape"
    elif case == "g_float32":
        g, exc, msg = g.astype(F32), TypeError, r"^g: expected float64"
    elif case == "g_strided":
        g, msg = np.repeat(g, 2)[::2], r"^g: expected a contiguous"
    elif case == "g_2d":
        g, msg = g.reshape(1, n), r"^g: expected shape"
    elif case == "out_float32":
        out, exc, msg = np.full(n, SENTINEL, F32), TypeError, r"^out: expected float64"
    elif case == "out_short":
        out, msg = np.full(n - 1, SENTINEL), r"^out: expected shape"
    elif case == "out_readonly":
        out, msg = _readonly(out), r"^out: is read-only"
    elif case == "out_is_g":
        out, msg = g, r"^out: overlaps"
    elif case == "out_view_of_g":
        out, msg = g[:], r"^out: overlaps"
    elif case == "out_strided":
        out, msg = np.full(2 * n, SENTINEL)[::2], r"^out: expected a contiguous"
    g_before = np.array(g, copy=True)
    with pytest.raises(exc, match=msg):
        getattr(h, method)(g, out=out)
    np.testing.assert_array_equal(g, g_before)
    if not case.startswith("out_is") and not case.startswith("out_view"):
        assert np.all(out == SENTINEL)
    _assert_same_history(h, twin, _vec(rng, n))


# ---- 4. lbfgs_minimize's gradient checks ----------------------------------------------------------------------
def _quad(n, rng, dtype=F64):
    A = _spd(rng, n, 1.0, 10.0)
    xs = rng.uniform(-2, 2, n)

    def fg(x):
        e = x.astype(F64).reshape(-1) - xs
        return 0.5 * float(e @ A @ e), (A @ e).reshape(x.shape).astype(dtype)
    return fg, xs


def _grad_case(case, x):
    g = np.ones(x.shape)
    if case == "list":
        return g.tolist(), TypeError
    if case == "flat_shape":
        return g.reshape(-1), ValueError
    if case == "transposed_shape":
        return g.T.copy(), ValueError
    if case == "complex":
        return g.astype(np.complex128), TypeError
    if case == "bool":
        return g.astype(bool), TypeError
    if case == "torch":
        torch = pytest.importorskip("torch", reason="the torch case needs torch")
        return torch.ones(x.shape, dtype=torch.float64), TypeError
    if case == "scalar":
        return 1.0, TypeError
    raise AssertionError(case)


GRAD_CASES = ["list", "flat_shape", "transposed_shape", "complex", "bool", "torch", "scalar"]


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
@pytest.mark.parametrize("at", ["x0", "later"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_minimize_rejects_bad_gradients(cpu_isa, case, at, line_search):
    """A list, a gradient of another shape with x0's size ((12,) or (4, 3) for x0 of shape (3, 4)), a complex, a
    bool, a torch tensor or a Python float raise TypeError/ValueError naming fun_and_grad, at x0 and in a line
    search (the third evaluation)."""
    _once(cpu_isa)
    x0 = np.linspace(-1.0, 1.5, 12).reshape(3, 4)
    calls = []

    def fg(x):
        calls.append(1)
        if at == "x0" or len(calls) == 3:
            return 1.0, _grad_case(case, x)[0]
        return float(np.sum(x * x)), 2 * x

    with pytest.raises(_grad_case(case, x0)[1], match="fun_and_grad"):
        optkern.lbfgs_minimize(fg, x0, line_search=line_search)
    assert len(calls) == (1 if at == "x0" else 3)


@pytest.mark.parametrize("xdtype,gdtype", [(F64, F32), (F32, F64), (F64, np.int64), (F64, np.int32),
                                           (F32, np.uint8), (F64, np.float16)])
def test_minimize_converts_real_gradients(cpu_isa, xdtype, gdtype):
    """A real gradient of another dtype is converted to x0's: res.grad has x0's dtype and the exact values (gtol
    stops at x0 here; the values 1..12 are exact in every dtype used)."""
    _once(cpu_isa)
    x0 = np.linspace(-1.0, 1.5, 12).reshape(3, 4).astype(xdtype)
    gvals = np.arange(1, 13).reshape(3, 4)
    res = optkern.lbfgs_minimize(lambda x: (1.0, gvals.astype(gdtype)), x0, gtol=20.0)
    assert res.success and res.nit == 0
    assert res.grad.dtype == xdtype and res.grad.shape == (3, 4)
    np.testing.assert_array_equal(res.grad, gvals.astype(xdtype))


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
def test_minimize_converges_with_float32_gradient_for_float64_x0(cpu_isa, rng, line_search):
    """f = 0.5 (x - x*)' A (x - x*), cond(A) = 10, gradient returned in float32: converges to gtol 1e-5 (float32
    gradient values near the optimum still carry ~7 digits of themselves), |x - x*| <= 1e-4 (cond 10 x gtol)."""
    _once(cpu_isa)
    fg, xs = _quad(20, rng, dtype=F32)
    x0 = rng.uniform(-2, 2, 20)
    res = optkern.lbfgs_minimize(fg, x0, gtol=1e-5, ftol=0.0, line_search=line_search)
    assert res.success and "GTOL" in res.message, res.message
    assert res.grad.dtype == F64 and res.x.dtype == F64
    assert np.abs(res.x - xs).max() <= 1e-4


def test_minimize_integer_gradient_one_exact_step(cpu_isa):
    """f = |x - c|^2 / 2 with c integer and x0 = c + e_3: the int64 gradient is e_3 at x0 (unit norm: first step
    1) and 0 at c, reached exactly in one iteration."""
    _once(cpu_isa)
    c = np.array([3.0, -2.0, 7.0, 1.0, -5.0])
    x0 = c.copy()
    x0[3] += 1.0
    res = optkern.lbfgs_minimize(lambda x: (0.5 * float((x - c) @ (x - c)), (x - c).astype(np.int64)), x0)
    assert res.success and res.nit == 1 and res.grad.dtype == F64
    np.testing.assert_array_equal(res.x, c)
    np.testing.assert_array_equal(res.grad, np.zeros(5))


# ---- 5. x0 is never modified -------------------------------------------------------------------------------------
def _rosen_nd(x):
    """Chained Rosenbrock on any shape (dtype preserved)."""
    v = x.reshape(-1)
    g = np.zeros_like(v)
    t = v[1:] - v[:-1] ** 2
    g[:-1] += -400 * v[:-1] * t - 2 * (1 - v[:-1])
    g[1:] += 200 * t
    return float(np.sum(100.0 * t.astype(F64) ** 2 + (1 - v[:-1].astype(F64)) ** 2)), g.reshape(x.shape)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
@pytest.mark.parametrize("layout", ["f64_1d", "f32_2d", "f64_strided", "f32_readonly", "f64_optimal"])
def test_minimize_never_modifies_x0(cpu_isa, rng, line_search, layout):
    """After a run x0 equals a copy taken before (assert_array_equal), its buffer's neighbours too (strided view),
    and neither res.x, res.grad nor any x given to fun_and_grad shares memory with x0; a read-only x0 works."""
    _once(cpu_isa)
    base = None
    if layout == "f64_1d":
        x0 = rng.uniform(-1.5, 1.5, 10)
    elif layout == "f32_2d":
        x0 = rng.uniform(-1.5, 1.5, (3, 4)).astype(F32)
    elif layout == "f64_strided":
        base = rng.uniform(-1.5, 1.5, 20)
        x0 = base[::2]
    elif layout == "f32_readonly":
        x0 = _readonly(rng.uniform(-1.5, 1.5, 8).astype(F32))
    else:  # already optimal: the early return must not hand back x0 itself
        x0 = np.ones(6)
    copy = x0.copy()
    base_copy = None if base is None else base.copy()
    seen = []

    def fg(x):
        seen.append(np.shares_memory(x, x0))
        return _rosen_nd(x)

    res = optkern.lbfgs_minimize(fg, x0, line_search=line_search, max_iter=50)
    np.testing.assert_array_equal(x0, copy)
    if base is not None:
        np.testing.assert_array_equal(base, base_copy)
    assert x0.dtype == copy.dtype and res.x.dtype == x0.dtype and res.x.shape == x0.shape
    assert seen and not any(seen)
    assert not np.shares_memory(res.x, x0) and not np.shares_memory(res.grad, x0)
    if layout != "f64_optimal":
        assert res.nit > 0
    res.x[...] = -7.0  # the result is the caller's to modify
    np.testing.assert_array_equal(x0, copy)


# ---- 6. res.nskipped ----------------------------------------------------------------------------------------------
def _recount_skipped(fg, x0, **kw):
    """Run lbfgs_minimize and recount the curvature test on its accepted steps from the iterates (callback) and
    the gradients fun_and_grad returned there, computing s, y, s.y and y.y exactly as the minimizer does
    (_lincomb, one _dots call): the count of pairs with not (s.y > eps y.y and s.y > 0) (or non-finite)."""
    grads = {}

    def rec(x):
        f, g = fg(x)
        grads[x.tobytes()] = np.array(g, dtype=x.dtype).reshape(-1)
        return f, g

    xs = [x0.reshape(-1).copy()]
    res = optkern.lbfgs_minimize(rec, x0, callback=lambda x: xs.append(x.reshape(-1).copy()) and None, **kw)
    eps = float(np.finfo(x0.dtype).eps)
    skipped = 0
    for xa, xb in zip(xs[:-1], xs[1:]):
        s, y = np.empty_like(xa), np.empty_like(xa)
        L._lincomb([xb, xa], [1.0, -1.0], s)
        L._lincomb([grads[xb.tobytes()], grads[xa.tobytes()]], [1.0, -1.0], y)
        sy, yy = L._dots([y], [s, y])[:, 0]
        skipped += not (math.isfinite(sy) and math.isfinite(yy) and sy > eps * yy and sy > 0)
    assert len(xs) == res.nit + 1
    return res, skipped


def _double_well(x):
    """sum x^4 / 4 - x^2: concave near 0, so a step from near 0 across the concave region has s.y < 0."""
    return float(np.sum(x ** 4 / 4 - x ** 2)), x ** 3 - 2 * x


def test_nskipped_counts_rejected_pairs(cpu_isa, rng):
    """Armijo on extended Rosenbrock (n = 100, the standard start) rejects one pair (measured); Armijo on a
    separable double well from near its local maximum rejects at least one (s.y < 0 on the first step).  In both,
    res.nskipped equals the independent recount, and is > 0."""
    _once(cpu_isa)
    res, skipped = _recount_skipped(ext_rosenbrock, np.tile([-1.2, 1.0], 50), line_search="armijo", gtol=1e-6)
    assert res.success and res.nskipped == skipped and res.nskipped >= 1, (res.nskipped, skipped)
    res, skipped = _recount_skipped(_double_well, rng.uniform(0.05, 0.15, 8), line_search="armijo", ftol=0.0)
    assert res.success and res.nskipped == skipped and res.nskipped >= 1, (res.nskipped, skipped)
    # the wells' minima at +-sqrt(2); ftol = 0, so gtol = 1e-6 stops it: |x - x*| <= 1e-6 / f''(x*) = 2.5e-7
    assert np.abs(np.abs(res.x) - math.sqrt(2)).max() <= 1e-6


@pytest.mark.parametrize("dtype", [F64, F32])
def test_nskipped_zero_on_convex_quadratic_strong_wolfe(cpu_isa, rng, dtype):
    """Strictly convex quadratic (eigenvalues 0.1 .. 100) with strong Wolfe: s.y = s'As > 0 well above eps y.y at
    every step (s.y / y.y >= 1 / 100), so nothing is skipped, and the recount agrees."""
    _once(cpu_isa)
    n = 30
    A = _spd(rng, n, 0.1, 100.0)
    xs = rng.uniform(-1, 1, n)

    def fg(x):
        e = x.astype(F64) - xs
        return 0.5 * float(e @ A @ e), (A @ e).astype(x.dtype)

    gtol = 1e-6 if dtype == F64 else 1e-3
    res, skipped = _recount_skipped(fg, rng.uniform(-1, 1, n).astype(dtype), gtol=gtol, ftol=0.0)
    assert res.success and res.nit > 5, res.message
    assert res.nskipped == 0 and skipped == 0


# ---- 7. the line searches on 1-D functions ----------------------------------------------------------------------
def _mt3(a, b=0.01, l=39):
    if a <= 1 - b:
        p0, d0 = 1 - a, -1.0
    elif a >= 1 + b:
        p0, d0 = a - 1, 1.0
    else:
        p0, d0 = (a - 1) ** 2 / (2 * b) + b / 2, (a - 1) / b
    return p0 + 2 * (1 - b) / (l * math.pi) * math.sin(l * math.pi * a / 2), d0 + (1 - b) * math.cos(l * math.pi * a / 2)


def _mt_gamma(b1, b2):
    def gam(b):
        return math.sqrt(1 + b * b) - b

    def phi(a):
        r1, r2 = math.sqrt((1 - a) ** 2 + b2 ** 2), math.sqrt(a * a + b1 ** 2)
        return gam(b1) * r1 + gam(b2) * r2, -gam(b1) * (1 - a) / r1 + gam(b2) * a / r2
    return phi


PHIS = {  # phi(t) -> (phi, phi'); phi'(0) < 0 for all
    "mt1": lambda a: (-a / (a * a + 2.0), (a * a - 2.0) / (a * a + 2.0) ** 2),
    "mt2": lambda a: ((a + 0.004) ** 5 - 2 * (a + 0.004) ** 4, 5 * (a + 0.004) ** 4 - 8 * (a + 0.004) ** 3),
    "mt3": _mt3,
    "mt4": _mt_gamma(0.001, 0.001),
    "mt5": _mt_gamma(0.01, 0.001),
    "mt6": _mt_gamma(0.001, 0.01),
    "too_short": lambda t: ((t - 50.0) ** 2, 2 * (t - 50.0)),  # first trial 1: far short, extrapolation
    "overshoot": lambda t: ((t - 0.01) ** 2, 2 * (t - 0.01)),  # first trial 1: f rises, zoom
    "quartic": lambda t: ((t - 1.5) ** 4 - 2 * (t - 1.5) ** 2, 4 * (t - 1.5) ** 3 - 4 * (t - 1.5)),
}
T0S = [1e-3, 1e-1, 1.0, 10.0, 1e3]


def _recording(phi):
    calls = []

    def ev(t):
        f, d = phi(t)
        calls.append((t, f, d))
        return f, d, ("point", t)
    return ev, calls


@pytest.mark.parametrize("c2", [0.9, 0.1])
@pytest.mark.parametrize("name", list(PHIS))
def test_strong_wolfe_conditions(cpu_isa, name, c2):
    """At the returned t: phi(t) <= phi(0) + c1 t phi'(0) and |phi'(t)| <= c2 |phi'(0)| (c1 = 1e-4), found within
    max_ls = 20 evaluations from every first trial in 1e-3 .. 1e3; the returned f, phi' and point are ev(t)'s;
    a first trial that already meets both conditions is returned after one evaluation."""
    _once(cpu_isa)
    phi, c1, max_ls = PHIS[name], 1e-4, 20
    f0, d0 = phi(0.0)
    assert d0 < 0
    for t0 in T0S:
        ev, calls = _recording(phi)
        (t, f, d, point), ok = L._strong_wolfe(ev, f0, d0, t0, c1, c2, max_ls, 1e-9)
        assert ok, (name, t0)
        assert f <= f0 + c1 * t * d0 and abs(d) <= c2 * abs(d0), (name, t0, t)
        assert 1 <= len(calls) <= max_ls
        assert point == ("point", t) and (t, f, d) in calls
        f1, d1 = phi(t0)
        if f1 <= f0 + c1 * t0 * d0 and abs(d1) <= c2 * abs(d0):
            assert len(calls) == 1 and t == t0


@pytest.mark.parametrize("max_ls", [1, 2, 3])
@pytest.mark.parametrize("name", list(PHIS))
def test_strong_wolfe_gives_up_within_max_ls(cpu_isa, name, max_ls):
    """With a small max_ls: never more than max_ls evaluations; when unsatisfied, the returned point is the lowest
    evaluated one with sufficient decrease, else the start (t = 0, phi(0), point None)."""
    _once(cpu_isa)
    phi, c1, c2 = PHIS[name], 1e-4, 0.1
    f0, d0 = phi(0.0)
    for t0 in T0S:
        ev, calls = _recording(phi)
        (t, f, d, point), ok = L._strong_wolfe(ev, f0, d0, t0, c1, c2, max_ls, 1e-9)
        assert 1 <= len(calls) <= max_ls
        if ok:
            assert f <= f0 + c1 * t * d0 and abs(d) <= c2 * abs(d0)
            continue
        sd = [c for c in calls if c[1] <= f0 + c1 * c[0] * d0]
        if sd:
            assert point == ("point", t) and f == min(c[1] for c in sd), (name, t0, max_ls)
        else:
            assert (t, f, d, point) == (0.0, f0, d0, None)


@pytest.mark.parametrize("name", list(PHIS))
def test_armijo_sufficient_decrease(cpu_isa, name):
    """At the returned t, phi(t) <= phi(0) + c1 t phi'(0) (c1 = 1e-4); the first trial is t0, each later one is in
    [0.1, 0.5] times the one before (1e-12 relative slack), every trial before the returned one failed the test,
    and at most max_ls = 20 evaluations."""
    _once(cpu_isa)
    phi, c1, max_ls = PHIS[name], 1e-4, 20
    f0, d0 = phi(0.0)
    for t0 in T0S:
        ev, calls = _recording(phi)
        (t, f, d, point), ok = L._armijo(ev, f0, d0, t0, c1, max_ls)
        assert ok and f <= f0 + c1 * t * d0, (name, t0)
        assert 1 <= len(calls) <= max_ls and calls[0][0] == t0 and calls[-1] == (t, f, d)
        assert point == ("point", t)
        for (ta, fa, _), (tb, _, _) in zip(calls[:-1], calls[1:]):
            assert fa > f0 + c1 * ta * d0
            assert 0.1 * ta * (1 - 1e-12) <= tb <= 0.5 * ta * (1 + 1e-12)


@pytest.mark.parametrize("max_ls", [1, 3, 20])
def test_armijo_gives_up_after_max_ls(cpu_isa, max_ls):
    """A slope that lies (phi rises although phi'(0) < 0): exactly max_ls evaluations, then the start."""
    _once(cpu_isa)
    ev, calls = _recording(lambda t: (2.0 + t, 1.0))
    assert L._armijo(ev, 2.0, -1.0, 1.0, 1e-4, max_ls) == ((0.0, 2.0, -1.0, None), False)
    assert len(calls) == max_ls


# ---- 8. float32 fast path vs two-loop, condition 1e8 ------------------------------------------------------------
def test_ill_conditioned_float32_fast_path_vs_two_loop(rng):
    """Quadratic with eigenvalues 1e-4 .. 1e4 (condition 1e8), float32 histories, n = 60, m = 10:
    (a) the pairs of a float64 exact-line-search L-BFGS run, rounded to float32 (cond(R) up to ~7e2);
    (b) random s scaled by 10^(+-2), y = A s rounded.
    Compared: fast path (direction), kernel two-loop (direction_two_loop) and the float64 NumPy two-loop on the
    same rounded pairs and g (so only the float32 arithmetic differs).  Measured over 10 other seeds (40 steps),
    max rel (2-norm; this test's own seed: <= 8e-6):
    (a) fast-vs-two-loop 1.4e-5, fast-vs-ref 1.3e-5, two-loop-vs-ref 2.0e-5; (b) 5e-7, 4e-7, 3e-7.  That is
    ~cond(R) u (7e2 * 6e-8 = 4e-5), not cond(A) u (6: meaningless), so float32 IS meaningful at condition 1e8 for
    these histories.  Bounds: (a) 1e-4, (b) 1e-5 (5x and 20x the worst seen).  Note the scaling: with eigenvalues
    1 .. 1e8 instead, s.y / y.y falls below float32's eps and the default guard rejects every random pair."""
    n, m, cond = 60, 10, 1e8
    A = _spd(rng, n, 1.0 / math.sqrt(cond), math.sqrt(cond))
    h = optkern.LBFGSHistory(n, history_size=m, dtype=F32)
    h64 = optkern.LBFGSHistory(n, history_size=m)
    kept = []
    x = rng.standard_normal(n)
    worst = [0.0, 0.0, 0.0]
    for it in range(30):
        g = A @ x
        if it:
            g32 = g.astype(F32)
            d, d2 = h.direction(g32), h.direction_two_loop(g32)
            ref = two_loop_ref(kept[-m:], g32)
            worst = [max(w, e) for w, e in zip(worst, (_rel(d, d2), _rel(d, ref), _rel(d2, ref)))]
        dd = h64.direction(g)
        s = -(g @ dd) / (dd @ A @ dd) * dd  # exact line search in float64
        x = x + s
        assert h64.push(s, A @ s)
        s32, y32 = s.astype(F32), (A @ s).astype(F32)
        assert h.push(s32, y32)
        kept.append((s32, y32))
    assert max(worst) <= 1e-4, worst
    h = optkern.LBFGSHistory(n, history_size=m, dtype=F32)
    kept = []
    for _ in range(m):
        s = rng.standard_normal(n) * 10 ** rng.uniform(-2, 2)
        s32, y32 = s.astype(F32), (A @ s).astype(F32)
        assert h.push(s32, y32)
        kept.append((s32, y32))
    for _ in range(3):
        g32 = (A @ rng.standard_normal(n)).astype(F32)
        d, d2, ref = h.direction(g32), h.direction_two_loop(g32), two_loop_ref(kept, g32)
        assert _rel(d, d2) <= 1e-5 and _rel(d, ref) <= 1e-5 and _rel(d2, ref) <= 1e-5


# ---- 9. _lincomb at odd offsets ---------------------------------------------------------------------------------
def _placed(v, shift, fill=7.0):
    """A copy of v starting `shift` elements past a 64-byte boundary, inside a buffer filled with `fill`; returns
    (view, buffer)."""
    item = v.dtype.itemsize
    buf = np.full(v.size + shift + 2 * 64 // item, fill, v.dtype)
    start = (-buf.ctypes.data // item) % (64 // item) + shift
    buf[start:start + v.size] = v
    return buf[start:start + v.size], buf


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [17, 4097, 100003])
def test_lincomb_at_odd_offsets(rng, dtype, n):
    """Every input starts 1, 3 or 5 elements past a 64-byte boundary (cycling), out 1, 3 or 5 too; k = 1, 2, 21.
    vs float64 NumPy: |err| <= (k + 2) u sum_i |c_i v_i| per element for float32 (u = 2^-24), 1e-13 sum|c v| for
    float64; and bitwise the documented formula in T.  Out's neighbours keep their sentinel."""
    K = 21
    raw = [_vec(rng, n, dtype) + dtype(rng.uniform(-0.2, 0.2)) for _ in range(K)]
    vecs = [_placed(v, (1, 3, 5)[i % 3])[0] for i, v in enumerate(raw)]
    assert all(v.ctypes.data % 64 == (1, 3, 5)[i % 3] * v.itemsize for i, v in enumerate(vecs))
    coefs = list(rng.uniform(-2, 2, K) + 0.05)
    V64 = np.stack([v.astype(F64) for v in vecs])
    for k in (1, 2, K):
        for shift in (1, 3, 5):
            out, buf = _placed(np.zeros(n, dtype), shift, fill=SENTINEL)
            out[...] = SENTINEL
            assert L._lincomb(vecs[:k], coefs[:k], out) is out
            terms = np.asarray(coefs[:k])[:, None] * V64[:k]
            ref, scale = terms.sum(axis=0), np.abs(terms).sum(axis=0)
            tol = (k + 2) * U[F32] if dtype == F32 else 1e-13
            assert np.all(np.abs(out - ref) <= tol * scale), (k, shift)
            np.testing.assert_array_equal(out, exact_lincomb(vecs[:k], coefs[:k]))
            start = (out.ctypes.data - buf.ctypes.data) // out.itemsize
            assert np.all(buf[:start] == SENTINEL) and np.all(buf[start + n:] == SENTINEL)


# ---- 10. LBFGSHistory(like=...) --------------------------------------------------------------------------------
def test_like_unsupported_type_raises(cpu_isa):
    """A list, a torch tensor (optkern.lbfgs supports NumPy and CuPy only) and a Python float raise TypeError
    naming like; a NumPy array is accepted and gives its dtype."""
    _once(cpu_isa)
    torch = pytest.importorskip("torch", reason="the torch case needs torch")
    for like in ([1.0, 2.0], torch.ones(4, dtype=torch.float64), 3.0, (np.ones(4),)):
        with pytest.raises(TypeError, match="^like:"):
            optkern.LBFGSHistory(4, like=like)
    assert optkern.LBFGSHistory(4, like=np.ones(4, F32)).dtype == F32


# ---- 11. the default ftol stop ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
def test_default_ftol_stops(cpu_isa, rng, line_search):
    """gtol = 0, so only the relative-reduction test can stop with success: res.success, REL_REDUCTION_OF_F in the
    message, and the stop is the first iteration with (f_k - f_{k+1}) <= ftol max(|f_k|, |f_{k+1}|, 1) for the
    default ftol = 1e7 * eps (f recomputed at each iterate from the callback).  f has minimum 5 (so the relative
    test is active); with ftol = 0 the same run ends ABNORMAL instead (checked)."""
    _once(cpu_isa)
    n = 30
    A = _spd(rng, n, 0.03, 30.0)
    xs = rng.standard_normal(n)

    def fg(x):
        e = x - xs
        return 0.5 * float(e @ A @ e) + 5.0, A @ e

    x0 = rng.standard_normal(n)
    fs = [fg(x0)[0]]
    res = optkern.lbfgs_minimize(fg, x0, gtol=0.0, line_search=line_search,
                                 callback=lambda x: fs.append(fg(x)[0]) and None)
    assert res.success and res.status == 0 and "REL_REDUCTION_OF_F" in res.message, res.message
    assert len(fs) == res.nit + 1 and fs[-1] == res.fun
    ftol = 1e7 * float(np.finfo(F64).eps)
    stop = [(a - b) <= ftol * max(abs(a), abs(b), 1.0) for a, b in zip(fs[:-1], fs[1:])]
    assert stop[-1] and not any(stop[:-1])
    assert res.fun - 5.0 <= 1e-4  # near the minimum (from f(x0) - 5 of order 10-100), not stopped by accident
    res0 = optkern.lbfgs_minimize(fg, x0, gtol=0.0, ftol=0.0, line_search=line_search, max_iter=3000)
    assert "REL_REDUCTION" not in res0.message


# ---- bitwise equality of every CPU path with the scalar path ----------------------------------------------------
def test_kernels_bitwise_equal_to_scalar_path(cpu_isa, rng):
    """For each path this CPU has, _dots (k = 21 stored, 1 and 2 queries) and _lincomb (21 vectors) on the same
    inputs (n = 100003 and 4097, float32 and float64, aligned and 3 elements past a 64-byte boundary) are bitwise
    the scalar path's.  (test_lbfgs_kernels.py::test_bitwise_across_isas compares with the best path, i.e. the best
    path with itself on its own turn; this compares with 'scalar' explicitly.)  The ISA is restored after."""
    _once(cpu_isa)
    if len(ALL_ISAS) < 2:
        pytest.skip("this CPU has the scalar path only")
    k = 21
    cases = []
    for dtype in (F32, F64):
        for n in (100003, 4097):
            for shift in (0, 3):
                S = [_placed(_vec(rng, n, dtype) + dtype(0.1), shift)[0] for _ in range(k)]
                Q = [_placed(_vec(rng, n, dtype), shift)[0] for _ in range(2)]
                cases.append((S, Q, list(rng.uniform(-1.5, 1.5, k))))

    def run():
        got = []
        for S, Q, c in cases:
            out = np.empty(S[0].size, S[0].dtype)
            L._lincomb(S, c, out)
            got.append((L._dots(S, Q[:1]).tobytes(), L._dots(S, Q).tobytes(), out.tobytes()))
        return got

    results = {}
    try:
        for isa in ALL_ISAS:
            optkern.set_cpu_isa(isa)
            assert optkern.cpu_isa() == isa
            results[isa] = run()
    finally:
        optkern.set_cpu_isa(cpu_isa)
    assert optkern.cpu_isa() == cpu_isa
    for isa in ALL_ISAS[1:]:
        for j, (a, b) in enumerate(zip(results[isa], results["scalar"])):
            assert a == b, (isa, j)


# ---- out against g: overlap by address, read-only refused before any pass ----------------------------------------
@pytest.mark.parametrize("method", ["direction", "direction_and_slope", "direction_two_loop"])
def test_out_overlap_by_address_and_readonly_refused_first(cpu_isa, rng, method):
    """An out overlapping g by one element is refused; an out adjacent to g (sharing the buffer, not the bytes) is
    accepted and g keeps its values; a read-only out is refused before pass 1 (no allreduce call) with the
    history unchanged."""
    _once(cpu_isa)
    h, twin = _twins(rng)
    n = h.n
    buf = _vec(rng, 2 * n + 1)
    g = buf[:n]
    g_before = g.copy()
    with pytest.raises(ValueError, match="^out: overlaps g"):
        getattr(h, method)(g, out=buf[1:n + 1])
    np.testing.assert_array_equal(g, g_before)
    got = getattr(h, method)(g, out=buf[n:2 * n])
    d = got[0] if method == "direction_and_slope" else got
    assert np.shares_memory(d, buf)
    np.testing.assert_array_equal(g, g_before)
    np.testing.assert_array_equal(d, getattr(twin, method)(g_before.copy())[0] if method == "direction_and_slope"
                                  else getattr(twin, method)(g_before.copy()))
    calls = []

    def allreduce(v):
        calls.append(1)
        return v

    ro = np.full(n, SENTINEL)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="^out: is read-only"):
        getattr(h, method)(g, out=ro, allreduce=allreduce)
    assert not calls and np.all(ro == SENTINEL)
    _assert_same_history(h, twin, _vec(rng, n))
