"""optkern.schedules against their formulas (seeds 000 and 003), and used as an optimizer's lr.

k is the number of steps already taken (0 on the first step).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import optkern
from optkern import optim as ok
from optkern import schedules as S

KS = [0, 1, 2, 3, 7, 10, 25, 99, 100, 101, 1000]


def test_constant():
    f = S.constant(0.037)
    assert all(f(k) == 0.037 for k in KS)


def test_inverse_time():
    f = S.inverse_time(0.5)
    for k in KS:
        assert f(k) == pytest.approx(0.5 / (k + 1), rel=1e-15)
    assert f(0) == 0.5


@pytest.mark.parametrize("t", [1, 10, 100])
def test_linear_decay(t):
    alpha, beta = 0.1, 0.001  # seed 000: beta ~ alpha / 100
    f = S.linear_decay(alpha, beta, t)
    for k in KS + [t - 1, t, t + 1]:
        if k < 0:
            continue
        want = (1 - k / t) * alpha + (k / t) * beta if k <= t else beta
        assert f(k) == pytest.approx(want, rel=1e-14), k
    assert f(0) == pytest.approx(alpha, rel=1e-15)
    assert f(t) == pytest.approx(beta, rel=1e-14)
    assert f(t + 50) == beta
    if t >= 2:  # strictly between the ends in the middle
        assert beta < f(t // 2) < alpha


def test_exponential_decay():
    f = S.exponential_decay(0.2, 0.05)
    for k in KS:
        assert f(k) == pytest.approx(0.2 * math.exp(-0.05 * k), rel=1e-14)


def test_quadratic_decay():
    f = S.quadratic_decay(0.3)
    for k in KS:
        assert f(k) == pytest.approx(0.3 / (k + 1) ** 2, rel=1e-14)
    assert f(1) == pytest.approx(0.075)


@pytest.mark.parametrize("w", [1, 4, 10])
def test_linear_warmup_over_schedule(w):
    after = S.exponential_decay(0.1, 0.02)
    f = S.linear_warmup(w, after)
    for k in list(range(0, w + 5)) + [50]:
        want = after(k) * (k + 1) / w if k < w else after(k)
        assert f(k) == pytest.approx(want, rel=1e-14), k
    assert f(0) == pytest.approx(after(0) / w)


def test_linear_warmup_over_float_and_zero_warmup():
    f = S.linear_warmup(5, 0.01)
    assert [f(k) for k in range(7)] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.01, 0.01])
    g = S.linear_warmup(0, 0.01)
    assert g(0) == pytest.approx(0.01)


@pytest.mark.parametrize("call", [
    lambda: S.constant(-1.0), lambda: S.constant(float("nan")), lambda: S.constant(float("inf")),
    lambda: S.inverse_time(-0.1), lambda: S.inverse_time(float("nan")),
    lambda: S.linear_decay(-0.1, 0.01, 10), lambda: S.linear_decay(0.1, -0.01, 10),
    lambda: S.linear_decay(0.1, 0.01, 0), lambda: S.linear_decay(0.1, 0.01, -5), lambda: S.linear_decay(0.1, 0.01, 2.5),
    lambda: S.exponential_decay(-0.1, 0.1), lambda: S.exponential_decay(0.1, -0.1),
    lambda: S.exponential_decay(0.1, float("inf")),
    lambda: S.quadratic_decay(-1.0), lambda: S.quadratic_decay(float("nan")),
    lambda: S.linear_warmup(-1, 0.1), lambda: S.linear_warmup(2.5, 0.1),
], ids=lambda c: "")
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def _manual_sgd(p0, grads, sched, momentum, dtype):
    p = p0.astype(dtype)
    buf = np.zeros_like(p) if momentum else None
    for k, g in enumerate(grads):
        optkern.sgd_step(p, g.astype(dtype), buf, step=k + 1, lr=sched(k), momentum=momentum)
    return p


SCHEDS = {
    "constant": lambda: S.constant(0.05),
    "inverse_time": lambda: S.inverse_time(0.1),
    "linear_decay": lambda: S.linear_decay(0.1, 0.001, 12),
    "exponential_decay": lambda: S.exponential_decay(0.1, 0.1),
    "quadratic_decay": lambda: S.quadratic_decay(0.2),
    "linear_warmup": lambda: S.linear_warmup(5, S.linear_decay(0.1, 0.001, 15)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", sorted(SCHEDS))
def test_schedule_drives_sgd(name, momentum, dtype, rng):
    """SGD(lr=schedule) equals a manual loop over sgd_step with lr = schedule(k) at step k + 1 (bitwise: the same
    kernel with the same scalars), and differs from the loop with the schedule shifted by one step."""
    sched = SCHEDS[name]()
    p0 = rng.standard_normal(300)
    grads = [rng.standard_normal(300) for _ in range(20)]
    p = p0.astype(dtype)
    opt = ok.SGD([p], lr=sched, momentum=momentum)
    for g in grads:
        opt.step([g.astype(dtype)])
    want = _manual_sgd(p0, grads, sched, momentum, dtype)
    np.testing.assert_array_equal(p, want)
    # the closed-form check in float64 without momentum: p = p0 - sum_k lr_k g_k
    if momentum == 0.0 and dtype == np.float64:
        closed = p0 - sum(sched(k) * g for k, g in enumerate(grads))
        np.testing.assert_allclose(p, closed, rtol=1e-12, atol=1e-12)
    if name != "constant":
        shifted = _manual_sgd(p0, grads, lambda k: sched(k + 1), momentum, dtype)
        assert np.max(np.abs(p.astype(np.float64) - shifted)) > 1e-5


@pytest.mark.parametrize("name", ["inverse_time", "linear_decay", "exponential_decay"])
def test_schedule_drives_adam(name, rng):
    """Adam(lr=schedule) matches adam_step with lr = schedule(k) (the bias corrections use the step count)."""
    sched = SCHEDS[name]()
    p0 = rng.standard_normal(129)
    p = p0.copy()
    opt = ok.Adam([p], lr=sched, betas=(0.85, 0.99))
    q = p0.copy()
    m, v = np.zeros_like(q), np.zeros_like(q)
    for k in range(15):
        g = rng.standard_normal(129)
        opt.step([g])
        optkern.adam_step(q, g.copy(), m, v, step=k + 1, lr=sched(k), betas=(0.85, 0.99))
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"], m)


def test_schedule_negative_value_rejected(rng):
    """A schedule whose value goes negative is caught when the step uses it (ValueError)."""
    p = [rng.standard_normal(8)]
    opt = ok.SGD(p, lr=lambda k: 0.1 - 0.06 * k)
    opt.step([rng.standard_normal(8)])
    opt.step([rng.standard_normal(8)])
    before = p[0].copy()
    with pytest.raises(ValueError):
        opt.step([rng.standard_normal(8)])
    np.testing.assert_array_equal(p[0], before)


@pytest.mark.parametrize("name", sorted(SCHEDS))
def test_schedules_pickle_copy_and_repr(name):
    """Schedules are small classes: they pickle (so does a state_dict whose lr is one), compare by value, and their
    repr rebuilds them; the copy's values are the original's bits."""
    import copy
    import pickle

    f = SCHEDS[name]()
    for g in (pickle.loads(pickle.dumps(f)), copy.deepcopy(f), eval(repr(f), {"optkern": optkern})):
        assert g == f and hash(g) == hash(f) and type(g) is type(f)
        assert all(g(k) == f(k) for k in KS + list(range(30)))
    opt = ok.SGD([np.zeros(3)], lr=f)
    opt.step([np.ones(3)])
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    assert sd["param_groups"][0]["lr"] == f


@pytest.mark.parametrize("call,exc", [
    (lambda: S.constant("0.1"), TypeError), (lambda: S.constant(True), TypeError),
    (lambda: S.constant(None), TypeError),
    (lambda: S.constant(10**400), ValueError), (lambda: S.inverse_time([0.1]), TypeError),
    (lambda: S.linear_decay(0.1, 0.01, "10"), TypeError), (lambda: S.linear_decay(0.1, 0.01, True), TypeError),
    (lambda: S.linear_decay(0.1, 0.01, math.inf), ValueError), (lambda: S.linear_warmup(None, 0.1), TypeError),
    (lambda: S.exponential_decay(0.1, "0.1"), TypeError),
], ids=lambda c: "")
def test_bad_argument_types_raise(call, exc):
    with pytest.raises(exc):
        call()


def test_integral_float_lengths_are_accepted():
    assert S.linear_decay(0.1, 0.001, 1e4).t == 10000 and S.linear_warmup(np.int64(5), 0.1).warmup_steps == 5
