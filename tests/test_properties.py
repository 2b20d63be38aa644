"""Property tests: one optkern step equals a float64 NumPy transcription of torch's formulas (torch 2.x
single-tensor Adam / SGD / RMSprop), invalid hyperparameters always raise ValueError with nothing changed, and a
class-layer step (optkern.optim, several param groups, params at different step counts) that fails on any defect
in any group changes no param, buffer or count, names the caller's index, and does not count as a step."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optkern
from optkern import optim

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    database=None, print_blob=False)

shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple).filter(lambda s: math.prod(s) <= 4000)
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)
steps = st.integers(1, 50)
unit = st.floats(0.0, 0.999)
small_pos = st.floats(0.0, 0.5)
lrs = st.floats(0.0, 1.0)
epss = st.floats(1e-8, 1e-2)


# ---- float64 references (torch.optim's single-tensor code paths) -------------------------------------------
def ref_adam(p, g, m, v, vmax, *, step, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled, grad_multiplier):
    p, g, m, v = (x.astype(np.float64) for x in (p, g, m, v))
    g = g * grad_multiplier
    if maximize:
        g = -g
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    b1, b2 = betas
    m = m + (g - m) * (1 - b1)
    v = v * b2 + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    if amsgrad:
        vmax = np.maximum(vmax.astype(np.float64), v)
        denom = np.sqrt(vmax) / math.sqrt(bc2) + eps
    else:
        denom = np.sqrt(v) / math.sqrt(bc2) + eps
    p = p - (lr / bc1) * m / denom
    return p, m, v, vmax


def ref_sgd(p, g, buf, *, step, lr, momentum, dampening, weight_decay, nesterov, maximize, grad_multiplier):
    p, g = p.astype(np.float64), g.astype(np.float64) * grad_multiplier
    if maximize:
        g = -g
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        buf = g.copy() if step == 1 else buf.astype(np.float64) * momentum + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


def ref_rmsprop(p, g, sq, ga, buf, *, lr, alpha, eps, weight_decay, momentum, centered, maximize, grad_multiplier):
    p, g, sq = p.astype(np.float64), g.astype(np.float64) * grad_multiplier, sq.astype(np.float64)
    if maximize:
        g = -g
    if weight_decay:
        g = g + weight_decay * p
    sq = alpha * sq + (1 - alpha) * g * g
    if centered:
        ga = ga.astype(np.float64) + (g - ga.astype(np.float64)) * (1 - alpha)
        avg = np.sqrt(sq - ga * ga) + eps
    else:
        avg = np.sqrt(sq) + eps
    if momentum > 0:
        buf = momentum * buf.astype(np.float64) + g / avg
        p = p - lr * buf
    else:
        p = p - lr * g / avg
    return p, sq, ga, buf


def close(actual, expected, dtype, scale=1.0):
    rtol = 2e-4 if dtype == np.float32 else 1e-10
    atol = rtol * scale
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def arrays(seed, shape, dtype, n):
    r = np.random.default_rng(seed)
    return [r.standard_normal(shape).astype(dtype) for _ in range(n)]


# ---- steps vs reference ------------------------------------------------------------------------------------------
@SETTINGS
@given(shape=shapes, dtype=dtypes, seed=seeds, step=steps, lr=lrs, b1=unit, b2=unit, eps=epss, wd=small_pos,
       amsgrad=st.booleans(), maximize=st.booleans(), decoupled=st.booleans(), gs=st.floats(0.1, 4.0))
def test_adam_matches_reference(shape, dtype, seed, step, lr, b1, b2, eps, wd, amsgrad, maximize, decoupled, gs):
    p, g, m, v0, vm0 = arrays(seed, shape, dtype, 5)
    v, vmax = np.array(np.abs(v0)), np.array(np.abs(vm0))
    args = (p.copy(), g.copy(), m.copy(), v.copy(), vmax.copy())
    kw = dict(step=step, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    ref = ref_adam(*args, decoupled=decoupled, grad_multiplier=gs, **kw)
    optkern.adam_step(p, g, m, v, vmax if amsgrad else None, decoupled_weight_decay=decoupled, grad_multiplier=gs,
                      **kw)
    # |update| <= lr * |m|/(sqrt(v)*...) can be large where v is tiny; scale the tolerance by the update size
    scale = 1.0 + float(np.max(np.abs(ref[0] - args[0]), initial=0.0))
    close(p, ref[0], dtype, scale)
    close(m, ref[1], dtype)
    close(v, ref[2], dtype)
    if amsgrad:
        close(vmax, ref[3], dtype)
    else:
        assert np.array_equal(vmax, args[4])


@SETTINGS
@given(shape=shapes, dtype=dtypes, seed=seeds, step=steps, lr=lrs, momentum=unit, dampening=st.floats(0.0, 1.0),
       wd=small_pos, nesterov=st.booleans(), maximize=st.booleans(), gs=st.floats(0.1, 4.0))
def test_sgd_matches_reference(shape, dtype, seed, step, lr, momentum, dampening, wd, nesterov, maximize, gs):
    if nesterov:
        momentum, dampening = max(momentum, 0.1), 0.0
    p, g, buf = arrays(seed, shape, dtype, 3)
    kw = dict(step=step, lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
              maximize=maximize, grad_multiplier=gs)
    rp, rbuf = ref_sgd(p.copy(), g.copy(), buf.copy(), **kw)
    optkern.sgd_step(p, g, buf if momentum else None, **kw)
    close(p, rp, dtype, 1.0 + float(np.max(np.abs(rp), initial=0.0)))
    if momentum:
        close(buf, rbuf, dtype, 1.0 + float(np.max(np.abs(rbuf), initial=0.0)))


@SETTINGS
@given(shape=shapes, dtype=dtypes, seed=seeds, step=steps, lr=st.floats(0.0, 0.1), alpha=st.floats(0.0, 1.0),
       eps=epss, wd=small_pos, momentum=st.sampled_from([0.0, 0.5, 0.9]), centered=st.booleans(),
       maximize=st.booleans(), gs=st.floats(0.1, 4.0))
def test_rmsprop_matches_reference(shape, dtype, seed, step, lr, alpha, eps, wd, momentum, centered, maximize, gs):
    if centered:  # sq - ga^2 cancels catastrophically in float32 as alpha -> 0 (in torch as well)
        alpha = 0.5 + alpha / 2
    p, g, sq0, ga0, buf = arrays(seed, shape, dtype, 5)
    # keep the centered variance sq - ga^2 positive, as it is when both are running averages of the same grads
    sq = np.array(np.abs(sq0) + ga0.astype(np.float64) ** 2 + 0.1, dtype=dtype)
    ga = ga0
    kw = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum, centered=centered, maximize=maximize,
              grad_multiplier=gs)
    ref = ref_rmsprop(p.copy(), g.copy(), sq.copy(), ga.copy(), buf.copy(), **kw)
    optkern.rmsprop_step(p, g, sq, ga if centered else None, buf if momentum else None, step=step, **kw)
    scale = 1.0 + float(np.max(np.abs(ref[0] - p.astype(np.float64)), initial=0.0)) + \
        float(np.max(np.abs(ref[0]), initial=0.0))
    close(p, ref[0], dtype, scale)
    close(sq, ref[1], dtype, 1.0 + float(np.max(ref[1], initial=0.0)))
    if centered:
        close(ga, ref[2], dtype)
    if momentum:
        close(buf, ref[3], dtype, 1.0 + float(np.max(np.abs(ref[3]), initial=0.0)))


# ---- invalid hyperparameters ----------------------------------------------------------------------------------
neg = st.one_of(st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=True), st.just(math.nan))
nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
out_of_unit_open = st.one_of(st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=-1e-12, allow_nan=False),
                             st.just(math.nan))
out_of_unit_closed = st.one_of(st.floats(min_value=1.0 + 1e-9, allow_nan=False),
                               st.floats(max_value=-1e-12, allow_nan=False), st.just(math.nan))

BAD = st.one_of(
    st.tuples(st.just("adam"), st.just("lr"), st.one_of(neg, nonfinite)),
    st.tuples(st.just("adam"), st.just("eps"), st.one_of(neg, st.just(math.inf))),
    st.tuples(st.just("adam"), st.just("weight_decay"), neg),
    st.tuples(st.just("adam"), st.just("beta1"), out_of_unit_open),
    st.tuples(st.just("adam"), st.just("beta2"), out_of_unit_open),
    st.tuples(st.just("adam"), st.just("step"), st.integers(-1000, 0)),
    st.tuples(st.just("adam"), st.just("grad_multiplier"), nonfinite),
    st.tuples(st.just("sgd"), st.just("lr"), st.one_of(neg, nonfinite)),
    st.tuples(st.just("sgd"), st.just("momentum"), st.one_of(neg, st.just(math.inf))),
    st.tuples(st.just("sgd"), st.just("weight_decay"), neg),
    st.tuples(st.just("sgd"), st.just("dampening"), nonfinite),
    st.tuples(st.just("sgd"), st.just("step"), st.integers(-1000, 0)),
    st.tuples(st.just("rmsprop"), st.just("lr"), st.one_of(neg, nonfinite)),
    st.tuples(st.just("rmsprop"), st.just("alpha"), out_of_unit_closed),
    st.tuples(st.just("rmsprop"), st.just("eps"), st.one_of(neg, st.just(math.inf))),
    st.tuples(st.just("rmsprop"), st.just("momentum"), neg),
    st.tuples(st.just("rmsprop"), st.just("weight_decay"), neg),
    st.tuples(st.just("rmsprop"), st.just("grad_multiplier"), nonfinite),
)


@SETTINGS
@given(shape=shapes.filter(lambda s: math.prod(s) > 0), dtype=dtypes, seed=seeds, bad=BAD)
def test_invalid_hyperparameters_raise_and_change_nothing(shape, dtype, seed, bad):
    algo, name, value = bad
    p, g, a, b, c = arrays(seed, shape, dtype, 5)
    b, c = np.array(np.abs(b)), np.array(np.abs(c))
    everything = [p, g, a, b, c]
    before = [x.copy() for x in everything]
    kw = {"step": 2}
    if name == "step":
        kw["step"] = value
    elif name == "grad_multiplier":
        kw["grad_multiplier"] = value
    elif name in ("beta1", "beta2"):
        kw["betas"] = (value, 0.999) if name == "beta1" else (0.9, value)
    else:
        kw[name] = value
    match = r"^[^:]*" + {"beta1": r"betas\[0\]", "beta2": r"betas\[1\]"}.get(name, name)
    with pytest.raises(ValueError, match=match):
        if algo == "adam":
            optkern.adam_step(p, g, a, b, c, amsgrad=True, **kw)
        elif algo == "sgd":
            optkern.sgd_step(p, g, a, **{"momentum": 0.9, **kw})
        else:
            optkern.rmsprop_step(p, g, b, a, c, centered=True, **{"momentum": 0.5, **kw})
    for x, y in zip(everything, before):
        assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


# ---- the class layer: a failing step changes nothing, in any group -------------------------------------------
CLASS_KW = {
    "SGD": (optim.SGD, dict(lr=0.1, momentum=0.9)),
    "Adam": (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "AdamW": (optim.AdamW, dict(lr=0.01)),
    "Adagrad": (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    "RMSprop": (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    "Adamax": (optim.Adamax, dict(lr=0.01)),
    "NAdam": (optim.NAdam, dict(lr=0.01)),
    "Adadelta": (optim.Adadelta, dict(lr=0.5)),
    "Rprop": (optim.Rprop, dict(lr=0.01)),
}
DEFECTS = ["grad_shape", "grad_dtype", "grad_not_array", "param_read_only", "grad_is_param", "state_read_only",
           "lr", "lr_schedule", "hyper", "found_inf_grad", "found_inf_lr", "multiplier", "grad_scale_keyword",
           "step_count"]
BAD_LR = [-1.0, math.nan, math.inf, 10**400, "0.1", True, None]
BAD_MULTIPLIER = [math.nan, -math.inf, 10**400, "2", True]
BAD_COUNT = [1.5, "3", -1, 2**62, None]


class BadAt:
    """An lr schedule that is fine until step k, where it returns a bad value (a number, then garbage)."""

    def __init__(self, k, bad):
        self.k, self.bad = k, bad

    def __call__(self, k):
        return self.bad if k >= self.k else 0.01


@st.composite
def class_setups(draw):
    name = draw(st.sampled_from(sorted(CLASS_KW)))
    sizes = draw(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3), min_size=1, max_size=3))
    dts = [draw(dtypes) for _ in sizes]
    n = sum(len(g) for g in sizes)
    prior = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), max_size=3))  # which params step before
    defect = draw(st.sampled_from(DEFECTS))
    return dict(name=name, sizes=sizes, dtypes=dts, prior=prior, defect=defect, target=draw(st.integers(0, n - 1)),
                group=draw(st.integers(0, len(sizes) - 1)), pick=draw(st.integers(0, 99)), seed=draw(seeds))


def build_class(setup):
    """The optimizer of a setup after its prior steps (some params skipped: different step counts), its params
    (flat, group order), the group index of each param, and the next step's valid gradients."""
    cls, kw = CLASS_KW[setup["name"]]
    r = np.random.default_rng(setup["seed"])
    groups, params, group_of = [], [], []
    for gi, (sizes, dt) in enumerate(zip(setup["sizes"], setup["dtypes"])):
        ps = [r.standard_normal(n).astype(dt) for n in sizes]
        groups.append({"params": ps, "lr": kw["lr"] * (1 + gi)})
        params += ps
        group_of += [gi] * len(ps)
    opt = cls(groups, **kw)
    for mask in setup["prior"]:
        opt.step([r.standard_normal(p.shape).astype(p.dtype) if m else None for p, m in zip(params, mask)])
    grads = [r.standard_normal(p.shape).astype(p.dtype) for p in params]
    return opt, params, group_of, grads


def class_snapshot(opt, params, grads):
    """Everything a step could change: every param's bytes, every state entry (buffers by bytes), the grads."""
    def val(v):
        return (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else repr(v)
    return ([val(p) for p in params], [val(g) for g in grads],
            {i: {k: val(v) for k, v in st.items()} for i, st in opt.state.items()})


def inject(setup, opt, params, group_of, grads):
    """Apply the setup's defect; -> (step keywords, exception type(s), message pattern, undo)."""
    d, i, pick = setup["defect"], setup["target"], setup["pick"]
    group = opt.param_groups[setup["group"]]
    p = params[i]
    kw, undo = {}, (lambda: None)
    buffers = sorted(k for k, v in opt.state.get(i, {}).items() if isinstance(v, np.ndarray))
    if d == "state_read_only" and not buffers:
        d = "grad_shape"
    if d == "step_count" and i not in opt.state:
        d = "grad_not_array"
    if d == "grad_shape":
        good, grads[i] = grads[i], np.ones(p.size + 1, p.dtype)
        return kw, ValueError, rf"^grads\[{i}\]: expected shape \({p.size},\) like params\[{i}\], got", \
            lambda: grads.__setitem__(i, good)
    if d in ("grad_dtype", "found_inf_grad"):
        good = grads[i]
        if d == "found_inf_grad":  # int32 of the wrong shape, with the step skipped: still refused
            grads[i], kw = np.ones(p.size + 2, np.int32), {"found_inf": True}
        else:
            # (float16 grads are valid for float32 params since 16-bit training: the offload step)
            other = np.float64 if p.dtype == np.float32 else np.float32
            grads[i] = grads[i].astype([np.int32, np.uint8, other][pick % 3])
        return kw, TypeError, rf"^grads\[{i}\]", lambda: grads.__setitem__(i, good)
    if d == "grad_not_array":
        good, grads[i] = grads[i], [1.0] * p.size
        return kw, TypeError, rf"^grads\[{i}\]", lambda: grads.__setitem__(i, good)
    if d == "param_read_only":
        p.flags.writeable = False
        return kw, ValueError, rf"^params\[{i}\]: is read-only", lambda: setattr(p.flags, "writeable", True)
    if d == "grad_is_param":
        good, grads[i] = grads[i], p
        return kw, ValueError, rf"^(params|grads)\[{i}\]: overlaps (params|grads)\[{i}\]", \
            lambda: grads.__setitem__(i, good)
    if d == "state_read_only":
        k = buffers[pick % len(buffers)]
        buf = opt.state[i][k]
        buf.flags.writeable = False
        return kw, ValueError, rf"^state\[{i}\]\[{k!r}\]: is read-only", lambda: setattr(buf.flags, "writeable", True)
    if d in ("lr", "found_inf_lr"):
        old, bad = group["lr"], BAD_LR[pick % len(BAD_LR)]
        group["lr"] = bad
        kw = {"found_inf": True} if d == "found_inf_lr" else {}
        exc = TypeError if isinstance(bad, (str, bool)) or bad is None else ValueError
        return kw, exc, r"^lr: expected", lambda: group.__setitem__("lr", old)
    if d == "lr_schedule":
        old, bad = group["lr"], BAD_LR[pick % len(BAD_LR)]
        counts = [opt.state[j]["step"] for j, g in enumerate(group_of) if g == setup["group"] and j in opt.state]
        group["lr"] = BadAt(min(counts, default=0), bad)  # bad from the lowest count the step runs at
        exc = TypeError if isinstance(bad, (str, bool)) or bad is None else ValueError
        return kw, exc, r"^lr: expected .*schedule's value at step", lambda: group.__setitem__("lr", old)
    if d == "hyper":
        key = {"SGD": "momentum", "Adagrad": "lr_decay", "RMSprop": "alpha", "Adadelta": "rho",
               "Rprop": "etas"}.get(setup["name"], "eps")
        old = group[key]
        if pick % 2:
            bad, exc = {"etas": (1.5, 1.2), "alpha": 1.5, "rho": -0.5}.get(key, -1.0), ValueError
        else:
            bad, exc = ("x", 1.2) if key == "etas" else "x", TypeError
        group[key] = bad
        return kw, exc, rf"^{key}|^etas\[0\]", lambda: group.__setitem__(key, old)
    if d == "multiplier":
        bad = BAD_MULTIPLIER[pick % len(BAD_MULTIPLIER)]
        exc = TypeError if isinstance(bad, (str, bool)) else ValueError
        return {"grad_multiplier": bad}, exc, r"^grad_multiplier: expected", undo
    if d == "grad_scale_keyword":
        return {"grad_scale": 0.5}, TypeError, r"^grad_scale: renamed grad_multiplier", undo
    assert d == "step_count"  # a saved count that is not one: load_state_dict refuses it, changing nothing
    sd = opt.state_dict()
    sd["state"][i]["step"] = BAD_COUNT[pick % len(BAD_COUNT)]
    return {"load": sd}, ValueError, rf"^state_dict: state\[{i}\]\['step'\]", undo


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None, print_blob=False)
@given(setup=class_setups())
def test_failed_class_step_changes_nothing_in_any_group(setup):
    opt, params, group_of, grads = build_class(setup)
    before = class_snapshot(opt, params, grads)
    kw, exc, match, undo = inject(setup, opt, params, group_of, grads)
    with pytest.raises(exc, match=match):
        if "load" in kw:
            opt.load_state_dict(kw["load"])
        else:
            opt.step(grads, **kw)
    undo()
    assert class_snapshot(opt, params, grads) == before
    # the refused step did not count: the next valid step equals that of an optimizer that never saw it
    ref, ref_params, _, ref_grads = build_class(setup)
    opt.step(grads)
    ref.step(ref_grads)
    assert class_snapshot(opt, params, grads) == class_snapshot(ref, ref_params, ref_grads)
