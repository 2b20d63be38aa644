"""OGR (seed 002's online gradient linear regression, optim_rules.h: OgrRule) against float64 NumPy transcriptions.

* The seed's formulas literally (``seed_ogr_trajectory``: EMAs of theta, g, theta^2 and g theta, then lambda and p
  from them) on a noisy quadratic with curvatures of both signs: float64 iterates to 1e-9 relative, float64 states
  to the same (the raw-moment form loses a few digits to cancellation, the kernel's centered form does not).
* Each step from the stored state (``ref_ogr``) on fresh random states: float64 to 1e-12; float32 within 8
  float32 roundings of the terms the step is made of (the step is a difference: see ``f32_bound``).
* Sizes hitting every SIMD tail (AVX-512 / AVX2 widths of float32 and float64) and arrays at odd element offsets,
  on every CPU path (the ``cpu_isa`` fixture); the three paths are also compared bit for bit.
* Every guard, each with a case that fails if the guard were removed: warm-up, var(theta) ~ 0, lambda ~ 0, the trust
  clip, repel on lambda < 0, the first step ignoring stale state.
"""

from __future__ import annotations

import numpy as np
import pytest

import optkern
from optkern import optim as ok

from mixed_reference import OGR_HYPER, U32, ref_ogr, seed_ogr_trajectory

SIZES = [1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 257, 1031]
HY = dict(OGR_HYPER, warmup=3)
STATE_NAMES = ("mean_params", "mean_grads", "var_params", "cov_grad_params", "last_steps")


def _placed(rng, n, dtype, offset):
    """An n-element array starting ``offset`` elements into a larger buffer (misaligned for the vector paths)."""
    buf = rng.standard_normal(n + offset + 3).astype(dtype)
    return buf[offset:offset + n]


def _states(rng, n, dtype, offset=0):
    """A state some steps in: means near the params' scale, var > 0, cov of either sign, last step > 0."""
    out = []
    for k in range(5):
        a = _placed(rng, n, dtype, offset)
        if k == 2:
            a[:] = 0.01 + 0.1 * np.abs(rng.standard_normal(n))
        elif k == 3:
            a[:] = 0.1 * rng.standard_normal(n)
        elif k == 4:
            a[:] = 0.01 + 0.05 * np.abs(rng.standard_normal(n))
        out.append(a)
    return out


def _step(p, g, st, t, **hy):
    optkern.ogr_step([p], [g], *[[s] for s in st], step=t, **dict(HY, **hy))


def f32_bound(p, g, st, t, hy):
    """Float32's error allowance for one step from float32 inputs: 8 roundings of the magnitudes the step is made
    of (the param, the SGD step, and alpha (|mean(g)| var + |cov| |theta - mean(theta)|) / |cov|, the two terms
    of the regression step, which cancel where theta is near the fitted vertex)."""
    _, mt, mg, var, cov, _ = ref_ogr(*(a.astype(np.float64) for a in (p, g, *st)), step=t, **hy)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = hy["lr"] * (np.abs(mg) * var + np.abs(cov) * np.abs(p - mt)) / np.abs(cov)
    terms = np.where(np.isfinite(terms), terms, 0.0)
    return 8 * U32 * (np.abs(p) + hy["sgd_lr"] * np.abs(g) + terms + np.abs(mt) + np.abs(mg))


# ---- the seed's formulas ----------------------------------------------------------------------------------------
def test_trajectory_matches_seed_formulas_float64(rng):
    n = 257
    a = rng.uniform(-1.5, 2.0, n)  # curvatures of both signs: attract and repel
    a[np.abs(a) < 0.2] = 0.5
    centre = rng.standard_normal(n)
    noise = 0.05 * rng.standard_normal((40, n))

    def grad(k, x):  # f = a u^2 / 2 + u^4 / 4, u = x - centre: repelled coordinates settle at u = +-sqrt(-a)
        u = x - centre
        return a * u + u**3 + noise[k]

    hy = dict(lr=0.5, sgd_lr=0.1, beta=0.8, warmup=3, trust=2.0, eps=1e-6, weight_decay=0.0)
    want, (mt, mg, var, cov, last) = seed_ogr_trajectory(centre + rng.standard_normal(n), grad, 40, **hy)
    p = want[0].copy()
    st = [np.zeros(n) for _ in range(5)]
    for t in range(1, 41):
        g = grad(t - 1, p)
        _step(p, g, st, t, **hy)
        err = np.max(np.abs(p - want[t]) / (np.abs(want[t]) + 1e-3))
        # measured <= 2e-10: the raw moments cancel (<theta^2> - <theta>^2) and the step divides by lambda
        assert err <= 1e-9, f"step {t}: iterate off the seed's formulas by {err:.3g}"
    for name, got, w in zip(STATE_NAMES, st, (mt, mg, var, cov, last)):
        err = np.max(np.abs(got - w)) / np.max(np.abs(w))
        assert err <= 1e-9, f"{name}: off the seed's moments by {err:.3g}"
    # the problem exercised both branches and the clip: repelled coordinates moved away from the centre
    assert np.any(a < 0) and np.all(np.isfinite(p))


def test_trajectory_float32_follows_each_step(rng):
    """float32 over 30 steps on the noisy quadratic: every step within f32_bound of the float64 step from the same
    float32 inputs (a whole float32 trajectory drifts from the float64 one, as any optimizer's does)."""
    n = 1031
    a = rng.uniform(0.2, 2.0, n)
    p = rng.standard_normal(n).astype(np.float32)
    st = [np.zeros(n, np.float32) for _ in range(5)]
    for t in range(1, 31):
        g = (a * p + 0.05 * rng.standard_normal(n)).astype(np.float32)
        before = [p.copy()] + [s.copy() for s in st]
        _step(p, g, st, t)
        want = ref_ogr(*(x.astype(np.float64) for x in (before[0], g, *before[1:])), step=t, **HY)
        bound = f32_bound(before[0], g, before[1:], t, HY)
        for name, got, w in zip(("params",) + STATE_NAMES, [p] + st, want):
            excess = np.max(np.abs(got - w) - bound)
            assert excess <= 0, f"step {t} {name}: beyond the float32 bound by {excess:.3g}"


# ---- one step from random states: dtypes, tails, offsets, every ISA -----------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_step_matches_reference(rng, dtype, offset):
    ps = [_placed(rng, n, dtype, offset) for n in SIZES]
    gs = [_placed(rng, n, dtype, offset) for n in SIZES]
    sts = [_states(rng, n, dtype, offset) for n in SIZES]
    t = 7  # past the warm-up: the regression step, the guards and the clip all in play
    before = [(p.copy(), [s.copy() for s in st]) for p, st in zip(ps, sts)]
    optkern.ogr_step(ps, gs, *[[st[k] for st in sts] for k in range(5)], step=t, **HY)
    used = 0
    for i, n in enumerate(SIZES):
        p0, s0 = before[i]
        want = ref_ogr(*(x.astype(np.float64) for x in (p0, gs[i], *s0)), step=t, **HY)
        if dtype == np.float64:
            for name, got, w in zip(("params",) + STATE_NAMES, [ps[i]] + sts[i], want):
                err = np.max(np.abs(got - w) / (np.abs(w) + np.abs(p0) + 1e-300))
                assert err <= 1e-12, f"n={n} {name}: rel err {err:.3g}"
        else:
            bound = f32_bound(p0, gs[i], s0, t, HY)
            for name, got, w in zip(("params",) + STATE_NAMES, [ps[i]] + sts[i], want):
                excess = np.max(np.abs(got.astype(np.float64) - w) - bound)
                assert excess <= 0, f"n={n} {name}: beyond the float32 bound by {excess:.3g}"
        used += int(np.count_nonzero(np.abs(ps[i] - p0 + HY["sgd_lr"] * gs[i]) > 1e-3 * np.abs(p0)))
    assert used > 0, "no element took the regression step: the test would not see the rule"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_isas_bitwise_equal(rng, dtype):
    n = 1031
    args = [rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)] + _states(rng, n, dtype)
    results = {}
    best = optkern.cpu_isa()
    try:
        for isa in ("scalar", "avx2", "avx512"):
            try:
                optkern.set_cpu_isa(isa)
            except ValueError:
                continue
            a = [x.copy() for x in args]
            for t in (5, 6, 7):
                _step(a[0], a[1], a[2:], t)
            results[isa] = a
    finally:
        optkern.set_cpu_isa(best)
    ref = results["scalar"]
    for isa, a in results.items():
        for k, (x, y) in enumerate(zip(a, ref)):
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{isa} differs from scalar in array {k}"


# ---- the guards ---------------------------------------------------------------------------------------------
def _one(p, g, mt, mg, var, cov, last, t, **hy):
    arrs = [np.array(x, np.float64) for x in (p, g, mt, mg, var, cov, last)]
    _step(arrs[0], arrs[1], arrs[2:], t, **hy)
    return arrs


def _good_fit_state(n=9):
    """A state on the line g = 2 (theta - 1) (lambda = 2, vertex 1), theta far from the vertex and a big last step."""
    p = np.full(n, 3.0)
    g = 2.0 * (p - 1.0)
    mt = p - 0.1
    return p, g, mt, 2.0 * (mt - 1.0), np.full(n, 0.04), np.full(n, 0.08), np.full(n, 10.0)


def test_guard_warmup():
    p, g, *st = _good_fit_state()
    sgd = p - HY["sgd_lr"] * (g + HY["weight_decay"] * p)
    for t in (2, 3):  # t <= warmup: plain SGD although the fit is good
        got = _one(p, g, *st, t)[0]
        np.testing.assert_array_equal(got, sgd)
    got = _one(p, g, *st, 4)[0]  # after the warm-up: the regression step, toward the vertex at 1
    assert np.all(np.abs(got - sgd) > 0.1) and np.all(got < p) and np.all(got > 1.0)


def test_guard_var_near_zero():
    p, g, mt, mg, var, cov, last = _good_fit_state()
    tiny = np.full_like(var, 1e-14)  # var(theta) after the update ~ beta * 1e-14 + ... < (eps (1 + |mt|))^2
    mt2 = p.copy()  # theta at its mean: no deviation adds variance
    got = _one(p, g, mt2, mg, tiny, tiny * 2.0, last, 5)[0]
    gw = g + HY["weight_decay"] * p
    np.testing.assert_array_equal(got, p - HY["sgd_lr"] * gw)
    # the same lambda = 2 with a usable spread: the regression step
    got2 = _one(p, g, mt2, mg, var, var * 2.0, last, 5)[0]
    assert np.all(np.abs(got2 - (p - HY["sgd_lr"] * gw)) > 1e-3)


def test_guard_lambda_near_zero():
    p, g, mt, mg, var, cov, last = _good_fit_state()
    flat = np.full_like(cov, 0.0)  # cov ~ 0: |lambda| sgd_lr <= eps after the update (the deviation term is tiny)
    mt2 = p.copy()
    got = _one(p, g, mt2, mg, var, flat + 1e-12, last, 5)[0]
    gw = g + HY["weight_decay"] * p
    np.testing.assert_array_equal(got, p - HY["sgd_lr"] * gw)
    # without the guard the step would be alpha |g^| / |lambda|, clipped at trust * last = 20: far from SGD's


def test_guard_trust_clip():
    p, g, mt, mg, var, cov, _ = _good_fit_state()
    gw = g + HY["weight_decay"] * p
    small = np.full_like(p, 1e-3)
    got, *st = _one(p, g, mt, mg, var, cov, small, 5)
    limit = HY["trust"] * np.maximum(small, HY["sgd_lr"] * np.abs(gw))  # the SGD step's length is the floor
    np.testing.assert_allclose(got, p - limit, rtol=0, atol=1e-15)
    np.testing.assert_allclose(st[-1], limit, rtol=0, atol=1e-15)
    unclipped = _one(p, g, mt, mg, var, cov, np.full_like(p, 10.0), 5)[0]
    assert np.all(p - unclipped > 1.5 * limit)  # the regression step itself is longer than the radius


def test_guard_repel_on_negative_lambda():
    """f = -(theta - 1)^2 (a maximum at 1, lambda = -2): the step goes away from the vertex, where attracting would
    go toward it."""
    n = 9
    p = np.full(n, 1.5)
    mt = p - 0.1
    g = -2.0 * (p - 1.0)
    mg = -2.0 * (mt - 1.0)
    got = _one(p, g, mt, mg, np.full(n, 0.04), np.full(n, -0.08), np.full(n, 10.0), 5, weight_decay=0.0)[0]
    assert np.all(got > p + 0.1), "lambda < 0: the step must move away from the vertex p = 1"
    # the seed's step: alpha sign(lambda) (p - theta), lambda from the updated moments
    want = ref_ogr(p, g, mt, mg, np.full(n, 0.04), np.full(n, -0.08), np.full(n, 10.0), step=5,
                   **dict(HY, weight_decay=0.0))[0]
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_first_step_ignores_stale_state(rng):
    n = 33
    p, g = rng.standard_normal(n), rng.standard_normal(n)
    stale = [rng.standard_normal(n) for _ in range(5)]
    got, _, mt, mg, var, cov, last = _one(p, g, *stale, 1, warmup=0)
    gw = g + HY["weight_decay"] * p
    np.testing.assert_array_equal(got, p - HY["sgd_lr"] * gw)
    np.testing.assert_array_equal(mt, p)
    np.testing.assert_array_equal(mg, gw)
    assert not var.any() and not cov.any()
    np.testing.assert_array_equal(last, np.abs(HY["sgd_lr"] * gw))


def test_leaves_a_saddle():
    """f = x^2 - y^2 + y^4 / 4 from (1, 1e-3): OGR reaches the minimum y = +-sqrt(2) and x = 0."""
    xy = np.array([1.0, 1e-3])
    opt = ok.OGR([xy], lr=0.5, sgd_lr=0.05)
    for _ in range(60):
        x, y = xy
        opt.step([np.array([2 * x, -2 * y + y**3])])
    assert abs(xy[0]) < 1e-3 and abs(abs(xy[1]) - np.sqrt(2)) < 1e-3


# ---- validation before mutation -------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, text", [
    (dict(beta=1.0), ValueError, "beta"), (dict(beta=0.0), ValueError, "beta"),
    (dict(trust=0.0), ValueError, "trust"), (dict(trust=float("inf")), ValueError, "trust"),
    (dict(lr=-1.0), ValueError, "lr"), (dict(sgd_lr=float("nan")), ValueError, "sgd_lr"),
    (dict(eps=-1e-3), ValueError, "eps"), (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(warmup=-1), ValueError, "warmup"), (dict(warmup=2.0), TypeError, "warmup"),
    (dict(warmup=True), TypeError, "warmup"), (dict(beta="0.9"), TypeError, "beta"),
])
def test_bad_hyperparameters_touch_nothing(rng, kw, exc, text):
    p, g, st = rng.standard_normal(17), rng.standard_normal(17), _states(rng, 17, np.float64)
    before = [p.copy()] + [s.copy() for s in st]
    with pytest.raises(exc, match=text):
        optkern.ogr_step([p], [g], *[[s] for s in st], step=5, **dict(HY, **kw))
    for a, b in zip([p] + st, before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(exc, match=text):
        ok.OGR([p], **kw)


def test_bad_state_names_the_argument(rng):
    p, g = rng.standard_normal(17), rng.standard_normal(17)
    st = _states(rng, 17, np.float64)
    st[3] = np.zeros(16)
    before = p.copy()
    with pytest.raises(ValueError, match=r"cov_grad_params\[0\]"):
        optkern.ogr_step([p], [g], *[[s] for s in st], step=2)
    np.testing.assert_array_equal(p, before)


# ---- the class layers --------------------------------------------------------------------------------------------
def test_class_equals_functional_and_roundtrips(rng):
    n = 65
    a = rng.uniform(0.5, 2.0, n)
    p1 = rng.standard_normal(n)
    p2 = p1.copy()
    st = [np.zeros(n) for _ in range(5)]
    opt = ok.OGR([p1], lr=0.5, sgd_lr=0.05, warmup=2, weight_decay=0.01)
    for t in range(1, 12):
        noise = 0.01 * rng.standard_normal(n)
        opt.step([a * p1 + noise])
        optkern.ogr_step([p2], [a * p2 + noise], *[[s] for s in st], step=t, lr=0.5, sgd_lr=0.05, warmup=2,
                         weight_decay=0.01)
        np.testing.assert_array_equal(p1, p2)
    sd = opt.state_dict()
    q = p1.copy()
    opt2 = ok.OGR([q], lr=0.5, sgd_lr=0.05, warmup=2, weight_decay=0.01)
    opt2.load_state_dict(sd)
    g = a * p1
    opt.step([g])
    opt2.step([g.copy()])
    np.testing.assert_array_equal(p1, q)


def test_torch_ogr_equals_numpy_ogr(rng):
    torch = pytest.importorskip("torch", reason="torch is needed for optkern.torch.OGR")
    import optkern.torch as okt

    n = 65
    a = rng.uniform(0.5, 2.0, n)
    x = rng.standard_normal(n).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(x.copy()))
    opt_t = okt.OGR([tp], lr=0.5, sgd_lr=0.05, warmup=2, maximize=False)
    assert isinstance(opt_t, torch.optim.Optimizer)
    opt_n = ok.OGR([x], lr=0.5, sgd_lr=0.05, warmup=2)
    for _ in range(10):
        g = (a * x).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        opt_t.step()
        opt_n.step([g])
        np.testing.assert_array_equal(tp.detach().numpy(), x)
    assert float(opt_t.state[tp]["step"]) == 10.0
    assert set(opt_t.state[tp]) == {"step", "mean_param", "mean_grad", "var_param", "cov_grad_param", "last_step"}
    with pytest.raises(ValueError, match="beta"):
        okt.OGR([tp], beta=1.5)
