"""optkern.optim classes against torch.optim (CPU, single-tensor path) step for step.

Every test feeds the same fresh random gradients to both libraries for 40+ steps over tensors of sizes 1, 7, 64,
1000, 4099 and one 2-D (33 x 17), and compares every param and every state buffer by the relative error
max|a - b| / max|b| (<= 2e-5 in float32, <= 1e-11 in float64).  Also the displacement of the params from their
start, which is far more sensitive to the step's math than the params themselves when lr is small.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from optkern import optim as ok
from optkern import schedules
from reference import rel_err, torch_dtype

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the reference here: pip install torch==2.13.0")

SHAPES = [(1,), (7,), (64,), (1000,), (4099,), (33, 17)]
STEPS = 40
TOL = {np.float32: 2e-5, np.float64: 1e-11}
# the displacement p_T - p_0 (smaller than p itself, so its relative error is larger in float32)
DISP_TOL = {np.float32: 2e-4, np.float64: 1e-9}
DTYPES = [np.float32, np.float64]

TORCH_CLS = {
    "SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "Adagrad": torch.optim.Adagrad,
    "RMSprop": torch.optim.RMSprop, "Adamax": torch.optim.Adamax, "NAdam": torch.optim.NAdam,
    "Adadelta": torch.optim.Adadelta, "Rprop": torch.optim.Rprop,
}
# optkern state name -> torch state name (identical by design; listed so that a missing buffer fails)
STATE_NAMES = {
    "SGD": ["momentum_buffer"], "Adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    "AdamW": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], "Adagrad": ["sum"],
    "RMSprop": ["square_avg", "grad_avg", "momentum_buffer"], "Adamax": ["exp_avg", "exp_inf"],
    "NAdam": ["exp_avg", "exp_avg_sq", "mu_product"], "Adadelta": ["square_avg", "acc_delta"],
    "Rprop": ["prev", "step_size"],
}


def scale_floor(arrays, frac=0.1) -> float:
    return frac * max((float(np.max(np.abs(np.asarray(x, dtype=np.float64)))) for x in arrays if np.size(x)),
                      default=0.0)


def to_np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def make_params(rng, dtype, shapes=SHAPES):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def logu(rng, lo, hi) -> float:
    return float(10.0 ** rng.uniform(math.log10(lo), math.log10(hi)))


# ---- hyperparameter draws: (name, variant) -> kwargs (shared by both libraries) --------------------------------
def draw_config(name: str, variant: str, rng) -> dict:
    if name == "SGD":
        kw = dict(lr=u(rng, 0.01, 0.1))
        if variant == "plain":
            pass
        elif variant == "momentum_dampening":
            kw.update(momentum=u(rng, 0.5, 0.95), dampening=u(rng, 0.05, 0.5))
        elif variant == "nesterov":
            kw.update(momentum=u(rng, 0.5, 0.95), nesterov=True, weight_decay=u(rng, 0.0, 0.1))
        elif variant == "all":
            kw.update(momentum=u(rng, 0.5, 0.95), dampening=u(rng, 0.0, 0.5), weight_decay=u(rng, 0.01, 0.1),
                      maximize=True)
        elif variant == "wd_maximize_nomomentum":
            kw.update(weight_decay=u(rng, 0.01, 0.1), maximize=True)
        return kw
    if name in ("Adam", "AdamW"):
        kw = dict(lr=logu(rng, 1e-3, 2e-2), betas=(u(rng, 0.8, 0.95), u(rng, 0.9, 0.999)), eps=logu(rng, 1e-8, 1e-6))
        if name == "AdamW":
            kw["weight_decay"] = u(rng, 0.01, 0.2)
        if variant == "plain":
            pass
        elif variant == "amsgrad":
            kw.update(amsgrad=True)
        elif variant == "wd_maximize":
            kw.update(weight_decay=u(rng, 0.01, 0.2), maximize=True)
        elif variant == "all":
            kw.update(amsgrad=True, weight_decay=u(rng, 0.01, 0.2), maximize=True)
        return kw
    if name == "Adagrad":
        kw = dict(lr=logu(rng, 1e-2, 1e-1), eps=logu(rng, 1e-10, 1e-6))
        if variant == "plain":
            pass
        elif variant == "lr_decay_init":
            kw.update(lr_decay=u(rng, 0.01, 0.2), initial_accumulator_value=u(rng, 0.1, 1.0))
        elif variant == "all":
            kw.update(lr_decay=u(rng, 0.01, 0.2), initial_accumulator_value=u(rng, 0.1, 1.0),
                      weight_decay=u(rng, 0.01, 0.1), maximize=True)
        return kw
    if name == "RMSprop":
        kw = dict(lr=logu(rng, 1e-3, 1e-2), alpha=u(rng, 0.9, 0.99), eps=logu(rng, 1e-8, 1e-6))
        if variant == "plain":
            pass
        elif variant == "centered":
            kw.update(centered=True)
        elif variant == "momentum":
            kw.update(momentum=u(rng, 0.5, 0.95))
        elif variant == "centered_momentum":
            kw.update(centered=True, momentum=u(rng, 0.5, 0.95))
        elif variant == "all":
            kw.update(centered=True, momentum=u(rng, 0.5, 0.95), weight_decay=u(rng, 0.01, 0.1), maximize=True)
        return kw
    if name == "Adamax":
        kw = dict(lr=logu(rng, 1e-3, 1e-2), betas=(u(rng, 0.8, 0.95), u(rng, 0.9, 0.999)), eps=logu(rng, 1e-8, 1e-6))
        if variant == "all":
            kw.update(weight_decay=u(rng, 0.01, 0.1), maximize=True)
        return kw
    if name == "NAdam":
        kw = dict(lr=logu(rng, 1e-3, 1e-2), betas=(u(rng, 0.8, 0.95), u(rng, 0.9, 0.999)), eps=logu(rng, 1e-8, 1e-6))
        if variant == "plain":
            pass
        elif variant == "momentum_decay":
            kw.update(momentum_decay=logu(rng, 1e-3, 5e-2))
        elif variant == "wd":
            kw.update(momentum_decay=logu(rng, 1e-3, 5e-2), weight_decay=u(rng, 0.01, 0.1))
        elif variant == "decoupled_wd":
            kw.update(momentum_decay=logu(rng, 1e-3, 5e-2), weight_decay=u(rng, 0.01, 0.1),
                      decoupled_weight_decay=True)
        elif variant == "all":
            kw.update(momentum_decay=logu(rng, 1e-3, 5e-2), weight_decay=u(rng, 0.01, 0.1),
                      decoupled_weight_decay=True, maximize=True)
        return kw
    if name == "Adadelta":
        if variant == "plain":
            return dict(lr=1.0, rho=u(rng, 0.8, 0.95), eps=logu(rng, 1e-6, 1e-4))
        return dict(lr=u(rng, 0.1, 2.0), rho=u(rng, 0.8, 0.95), eps=logu(rng, 1e-6, 1e-4),
                    weight_decay=u(rng, 0.01, 0.1), maximize=True)
    if name == "Rprop":
        if variant == "plain":
            return dict(lr=logu(rng, 1e-3, 5e-2))
        return dict(lr=logu(rng, 1e-3, 5e-2), etas=(u(rng, 0.3, 0.7), u(rng, 1.05, 1.5)),
                    step_sizes=(logu(rng, 1e-5, 1e-3), u(rng, 0.03, 0.5)), maximize=variant == "all")
    raise AssertionError(name)


CASES = [
    ("SGD", "plain"), ("SGD", "momentum_dampening"), ("SGD", "nesterov"), ("SGD", "all"),
    ("SGD", "wd_maximize_nomomentum"),
    ("Adam", "plain"), ("Adam", "amsgrad"), ("Adam", "wd_maximize"), ("Adam", "all"),
    ("AdamW", "plain"), ("AdamW", "amsgrad"), ("AdamW", "all"),
    ("Adagrad", "plain"), ("Adagrad", "lr_decay_init"), ("Adagrad", "all"),
    ("RMSprop", "plain"), ("RMSprop", "centered"),
    ("RMSprop", "momentum"),
    ("RMSprop", "centered_momentum"), ("RMSprop", "all"),
    ("Adamax", "plain"), ("Adamax", "all"),
    ("NAdam", "plain"), ("NAdam", "momentum_decay"), ("NAdam", "wd"), ("NAdam", "decoupled_wd"), ("NAdam", "all"),
    ("Adadelta", "plain"), ("Adadelta", "all"),
    ("Rprop", "plain"), ("Rprop", "etas_step_sizes"), ("Rprop", "all"),
]


def torch_opt(name, params_t, kw):
    kw = dict(kw)
    if name not in ("Rprop",):
        kw.setdefault("foreach", False)
    else:
        kw["foreach"] = False
    return TORCH_CLS[name](params_t, **kw)


def compare_state(name, ok_opt, t_opt, t_params, dtype):
    tol = TOL[dtype]
    pairs: dict[str, list] = {}
    for i, tp in enumerate(t_params):
        t_st = t_opt.state.get(tp, {})
        o_st = ok_opt.state.get(i)
        if not t_st:
            # torch's SGD without momentum keeps no state at all; optkern may keep a step count, but no buffer
            if o_st is not None:
                assert name == "SGD" and not any(k in o_st for k in STATE_NAMES[name]), \
                    f"param {i}: optkern has state {sorted(o_st)}, torch has none"
            continue
        assert o_st is not None, f"param {i}: optkern has no state"
        if "step" in t_st:  # torch's SGD keeps no step count
            assert int(o_st["step"]) == int(to_np(t_st["step"])), f"param {i}: step count"
        for key in STATE_NAMES[name]:
            if key not in t_st:
                assert key not in o_st, f"param {i}: optkern has {key!r}, torch does not"
                continue
            assert key in o_st, f"param {i}: optkern lacks state {key!r}"
            a = o_st[key]
            if key != "mu_product":
                assert isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == tuple(tp.shape), f"{key} array"
            pairs.setdefault(key, []).append((i, a, to_np(t_st[key])))
    for key, lst in pairs.items():
        floor = scale_floor([b for _, _, b in lst])
        for i, a, b in lst:
            err = rel_err(a, b, floor)
            assert err <= tol, f"param {i} state {key!r}: rel err {err:.3g} > {tol}"


def compare_params(ok_params, t_params, starts, dtype):
    bs = [to_np(tp) for tp in t_params]
    floor = scale_floor(bs)
    dfloor = scale_floor([b.astype(np.float64) - p0 for b, p0 in zip(bs, starts)])
    for i, (a, b, p0) in enumerate(zip(ok_params, bs, starts)):
        assert a.dtype == dtype
        err = rel_err(a, b, floor)
        assert err <= TOL[dtype], f"param {i}: rel err {err:.3g} > {TOL[dtype]}"
        da, db = a.astype(np.float64) - p0, b.astype(np.float64) - p0
        # the displacement is known only to the param's own rounding: allow 8 ulps of the param on top
        slack = 8 * float(np.finfo(dtype).eps) * float(np.max(np.abs(b))) / max(float(np.max(np.abs(db))), dfloor)
        derr = rel_err(da, db, dfloor)
        assert derr <= DISP_TOL[dtype] + slack, \
            f"param {i}: displacement rel err {derr:.3g} > {DISP_TOL[dtype]} + {slack:.3g}"


def run_pair(name, kw, rng, dtype, steps=STEPS, none_prob=0.0, shapes=SHAPES, groups=None, ok_lr=None,
             torch_sched=None):
    """Run optkern and torch side by side; ``groups``: list of (indices, extra kwargs) param groups."""
    params = make_params(rng, dtype, shapes)
    starts = [p.astype(np.float64) for p in params]
    t_params = [torch.from_numpy(p.copy()) for p in params]
    ok_kw = dict(kw)
    if ok_lr is not None:
        ok_kw["lr"] = ok_lr
    if groups is None:
        ok_opt = getattr(ok, name)(params, **ok_kw)
        t_opt = torch_opt(name, t_params, kw)
    else:
        ok_opt = getattr(ok, name)([dict(params=[params[i] for i in idx], **extra) for idx, extra in groups], **ok_kw)
        t_opt = torch_opt(name, [dict(params=[t_params[i] for i in idx], **extra) for idx, extra in groups], kw)
        order = [i for idx, _ in groups for i in idx]
        assert sorted(order) == list(range(len(params)))
        params = [params[i] for i in order]
        t_params = [t_params[i] for i in order]
        starts = [starts[i] for i in order]
    sched = torch_sched(t_opt) if torch_sched is not None else None
    for _ in range(steps):
        grads = []
        for tp, p in zip(t_params, params):
            if none_prob and rng.random() < none_prob:
                grads.append(None)
                tp.grad = None
            else:
                g = rng.standard_normal(p.shape).astype(dtype)
                grads.append(g)
                tp.grad = torch.from_numpy(g.copy())
        ok_opt.step(grads)
        t_opt.step()
        if sched is not None:
            sched.step()
    compare_params(params, t_params, starts, dtype)
    compare_state(name, ok_opt, t_opt, t_params, dtype)
    return ok_opt, t_opt


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,variant", CASES)
def test_class_matches_torch(name, variant, dtype, rng):
    kw = draw_config(name, variant, rng)
    with torch_dtype(dtype):
        run_pair(name, kw, rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,variant", [("SGD", "all"), ("Adam", "all"), ("Adagrad", "lr_decay_init"),
                                          ("RMSprop", "all"), ("NAdam", "all"), ("Adamax", "plain"),
                                          ("Adadelta", "plain"), ("Rprop", "etas_step_sizes"), ("AdamW", "amsgrad")])
def test_none_grads_skip_params(name, variant, dtype, rng):
    """None entries skip a param (torch: p.grad = None), so params end up with different step counts; state
    that depends on the count (bias corrections, NAdam's mu_product, Adagrad's lr_decay) must follow each param."""
    kw = draw_config(name, variant, rng)
    with torch_dtype(dtype):
        ok_opt, _ = run_pair(name, kw, rng, dtype, steps=STEPS + 5, none_prob=0.3)
    counts = {st["step"] for st in ok_opt.state.values()}
    assert len(counts) > 1, "the None pattern should leave params at different step counts"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,variant", [("SGD", "momentum_dampening"), ("Adam", "amsgrad"), ("AdamW", "plain"),
                                          ("Adagrad", "lr_decay_init"), ("RMSprop", "centered_momentum"),
                                          ("Adamax", "all"), ("NAdam", "decoupled_wd"), ("Adadelta", "all"),
                                          ("Rprop", "plain")])
def test_param_groups_different_lr(name, variant, dtype, rng):
    kw = draw_config(name, variant, rng)
    lr2 = kw["lr"] * u(rng, 0.2, 0.6)
    extra2 = {"lr": lr2}
    if name in ("Adam", "AdamW", "SGD", "Adagrad", "NAdam"):
        extra2["weight_decay"] = u(rng, 0.01, 0.1)
    groups = [([0, 2, 5], {}), ([1, 3, 4], extra2)]
    with torch_dtype(dtype):
        ok_opt, t_opt = run_pair(name, kw, rng, dtype, groups=groups)
    assert ok_opt.param_groups[1]["lr"] == pytest.approx(lr2)
    assert len(t_opt.param_groups) == 2


def _exp_schedule(rng):
    lr0, beta = u(rng, 0.005, 0.02), u(rng, 0.02, 0.1)
    return lr0, schedules.exponential_decay(lr0, beta), (lambda k: math.exp(-beta * k))


def _linear_schedule(rng):
    alpha = u(rng, 0.005, 0.02)
    beta, t = alpha * 0.01, int(rng.integers(10, 30))
    return alpha, schedules.linear_decay(alpha, beta, t), (lambda k: ((1 - k / t) * alpha + (k / t) * beta) / alpha
                                                           if k <= t else beta / alpha)


def _inverse_schedule(rng):
    lr0 = u(rng, 0.005, 0.02)
    return lr0, schedules.inverse_time(lr0), (lambda k: 1.0 / (k + 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,variant,sched", [
    ("SGD", "all", _exp_schedule), ("SGD", "nesterov", _linear_schedule), ("Adam", "amsgrad", _inverse_schedule),
    ("Adam", "wd_maximize", _linear_schedule), ("RMSprop", "centered_momentum", _exp_schedule),
    ("NAdam", "momentum_decay", _linear_schedule), ("Adagrad", "lr_decay_init", _inverse_schedule),
    ("Adamax", "all", _exp_schedule), ("Adadelta", "all", _linear_schedule),
], ids=lambda x: getattr(x, "__name__", str(x)).strip("_"))
def test_schedule_matches_lambdalr(name, variant, sched, dtype, rng):
    """optkern lr=f(k) (k = steps taken) vs torch LambdaLR(base_lr, lambda k) stepped after each optimizer step."""
    kw = draw_config(name, variant, rng)
    base, f, lam = sched(rng)
    kw["lr"] = base
    with torch_dtype(dtype):
        run_pair(name, kw, rng, dtype, steps=STEPS, ok_lr=f,
                 torch_sched=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam))


def test_schedule_is_not_ignored(rng):
    """Guard for the test above: a decaying schedule must give a different result than its constant base lr."""
    p1 = [rng.standard_normal(64)]
    p2 = [p1[0].copy()]
    o1 = ok.SGD(p1, lr=schedules.exponential_decay(0.05, 0.2))
    o2 = ok.SGD(p2, lr=0.05)
    for _ in range(5):
        g = rng.standard_normal(64)
        o1.step([g])
        o2.step([g.copy()])
    assert rel_err(p1[0], p2[0]) > 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_grad_multiplier_matches_torch_scaled_grads(dtype, rng):
    """step(grads, grad_multiplier=s) equals torch stepping on s * grads (Adam, amsgrad + weight decay)."""
    kw = draw_config("Adam", "all", rng)
    params = make_params(rng, dtype)
    starts = [p.astype(np.float64) for p in params]
    t_params = [torch.from_numpy(p.copy()) for p in params]
    with torch_dtype(dtype):
        o = ok.Adam(params, **kw)
        t = torch_opt("Adam", t_params, kw)
        for _ in range(STEPS):
            s = u(rng, 0.1, 0.9)
            grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
            for tp, g in zip(t_params, grads):
                tp.grad = torch.from_numpy(g.copy()) * s
            o.step(grads, grad_multiplier=s)
            t.step()
        compare_params(params, t_params, starts, dtype)
        compare_state("Adam", o, t, t_params, dtype)
