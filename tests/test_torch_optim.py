"""optkern.torch optimizers (python/optkern/torch/optim.py) against torch.optim 2.13: numbers and drop-in API.

* Parity: every CPU configuration of torch's ``optim_db`` for the nine optimizers, float32 and float64, 40 steps,
  sizes hitting the SIMD tails (1, 7, 33, 1000, 4099), a 2-D (33, 17) and a channels_last (8, 3, 3, 3) param,
  grads missing in some steps, fresh random grads: every param and state tensor within max|a-b|/max|b| <= 2e-5
  (float32) / 1e-11 (float64), the same state keys in the same order, dtypes, devices and strides, and `step`
  identical.  Also two param groups of different hyperparameters and a group mixing float32 and float64.
* Drop-in API (isinstance, schedulers, hooks, zero_grad, add_param_group, named params, extra group keys,
  tensor lr/betas, foreach/fused/capturable, differentiable, constructor errors as torch's), state-dict interop
  both ways, torch.save/load(weights_only), deepcopy and pickle, AMP GradScaler, autograd version counters,
  validation before mutation, threads, KeyboardInterrupt atomicity, hyperparameters toggled mid-run, 0-d / empty /
  permuted params, and memory the user replaces between steps (p.data, p.set_, a state tensor, the step count).

Numerical tests run on every CPU path (conftest's ``cpu_isa``); pure API tests run once (``api_once``).
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import pickle
import re
import threading
import warnings

import pytest

torch = pytest.importorskip("torch", reason="optkern.torch needs torch; torch==2.13.0 is the reference: "
                                            "pip install torch==2.13.0")
_co = pytest.importorskip("torch.testing._internal.common_optimizers",
                          reason="torch's optim_db (torch.testing._internal.common_optimizers, needs expecttest) "
                                 "supplies the configurations")

import optkern  # noqa: E402
import optkern.torch as okt  # noqa: E402
from torch_optim_helpers import (  # noqa: E402
    NAMES, SHAPES, TOL, assert_groups_equal, assert_same_run, assert_state_close, assert_unchanged, clone_params,
    drive, grad_pattern, make_grad, make_params, rel_err, same_value, set_grads, snapshot, steps_of,
)

S = torch.optim.lr_scheduler
OK = {n: getattr(okt, n) for n in NAMES}
TORCH = {n: getattr(torch.optim, n) for n in NAMES}
INFOS = {info.optim_cls.__name__: info for info in _co.optim_db if info.optim_cls.__name__ in NAMES}
DTYPES = [torch.float32, torch.float64]
DT_ID = {torch.float32: "f32", torch.float64: "f64"}
STEPS = 40
FUSED = ("SGD", "Adam", "AdamW", "Adagrad")  # torch has a fused CPU kernel
HAS_MOMENTUM = ("SGD", "Adam", "AdamW", "RMSprop", "Adamax", "NAdam")  # momentum or betas (CyclicLR/OneCycleLR)

# modest non-default hyperparameters per optimizer (for the API tests)
BASE_KW = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "Adam": dict(lr=1e-2, weight_decay=0.05),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adagrad": dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True),
    "Adamax": dict(lr=2e-2, weight_decay=0.01),
    "NAdam": dict(lr=1e-2, weight_decay=0.01),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
    "Rprop": dict(lr=1e-2),
}
# a second param group with other hyperparameters
GROUP2_KW = {
    "SGD": dict(lr=0.01, momentum=0.5, dampening=0.1, nesterov=False, weight_decay=0.0),
    "Adam": dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True, maximize=True),
    "AdamW": dict(lr=5e-3, betas=(0.85, 0.98), weight_decay=0.3, amsgrad=True),
    "Adagrad": dict(lr=0.02, lr_decay=0.05, weight_decay=0.1, eps=1e-8),
    "RMSprop": dict(lr=3e-3, alpha=0.9, centered=False, momentum=0.0, weight_decay=0.1, maximize=True),
    "Adamax": dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6),
    "NAdam": dict(lr=3e-3, momentum_decay=0.008, decoupled_weight_decay=True, weight_decay=0.1),
    "Adadelta": dict(lr=0.3, rho=0.8, weight_decay=0.05, maximize=True),
    "Rprop": dict(lr=3e-3, etas=(0.4, 1.3), step_sizes=(1e-5, 1.0), maximize=True),
}


@pytest.fixture(scope="module", autouse=True)
def _torch_single_threaded():
    """torch's reference steps run on one thread: its OpenMP pool and optkern's pool would otherwise contend for
    the same cores (tiny tensors, thousands of alternating calls).  Elementwise results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def api_once(cpu_isa):
    if cpu_isa != optkern.cpu_best_isa() and not os.environ.get("OPTKERN_CPU_ISA"):
        pytest.skip("API test: ISA-independent, run once")


@pytest.fixture
def gen(rng):
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


def pair(name, params, kw=None, **extra):
    """(optkern opt, its params, torch opt, its params) on equal copies; params: a list or a list of groups."""
    kw = dict(BASE_KW[name] if kw is None else kw, **extra)
    if params and isinstance(params[0], dict):
        po = [dict(g, params=clone_params(g["params"])) for g in params]
        pt = [dict(g, params=clone_params(g["params"])) for g in params]
        flat_o = [p for g in po for p in g["params"]]
        flat_t = [p for g in pt for p in g["params"]]
        return OK[name](po, **copy.deepcopy(kw)), flat_o, TORCH[name](pt, **copy.deepcopy(kw)), flat_t
    po, pt = clone_params(params), clone_params(params)
    return OK[name](po, **copy.deepcopy(kw)), po, TORCH[name](pt, **copy.deepcopy(kw)), pt


def small_params(gen, dtype=torch.float64, shapes=((7,), (33,), (5, 3))):
    return make_params(dtype, gen, shapes=list(shapes), channels_last=())


# ==== 1. numbers vs torch.optim ===================================================================================
CONFIGS = [(n, i, inp.desc) for n in NAMES for i, inp in
           enumerate(INFOS[n].optim_inputs_func(device="cpu", dtype=torch.float32))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("name,idx,desc", CONFIGS, ids=[f"{n}-{i}-{d.replace(' ', '_')}" for n, i, d in CONFIGS])
def test_optim_db_parity(name, idx, desc, dtype, gen):
    inputs = INFOS[name].optim_inputs_func(device="cpu", dtype=dtype)
    assert inputs[idx].desc == desc
    kw = inputs[idx].kwargs  # verbatim (a Tensor lr included)
    params = make_params(dtype, gen)
    ok_opt, po, t_opt, pt = pair(name, params, kw)
    assert isinstance(ok_opt, TORCH[name])
    drive([ok_opt, t_opt], [po, pt], STEPS, gen, has_grad=grad_pattern)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} {desc!r} {dtype}")
    assert_groups_equal(ok_opt, t_opt)
    # the late param has its own count, the others theirs
    n_grads = [sum(grad_pattern(s, i) for s in range(STEPS)) for i in range(len(SHAPES))]
    if name != "SGD":
        assert [steps_of(ok_opt, p) for p in po] == [float(n) for n in n_grads]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("name", NAMES)
def test_two_param_groups(name, dtype, gen):
    params = make_params(dtype, gen)
    groups = [{"params": [params[1], params[3], params[6]]},
              dict(GROUP2_KW[name], params=[params[0], params[2], params[4], params[5]])]
    ok_opt, po, t_opt, pt = pair(name, groups)
    order = [1, 3, 6, 0, 2, 4, 5]
    drive([ok_opt, t_opt], [po, pt], STEPS, gen, has_grad=lambda s, i: grad_pattern(s, order[i]))
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} two groups")
    assert_groups_equal(ok_opt, t_opt)


@pytest.mark.parametrize("name", NAMES)
def test_group_mixing_float32_and_float64(name, gen):
    dts = [torch.float32, torch.float64, torch.float64, torch.float32, torch.float64, torch.float32, torch.float64]
    params = make_params(dts, gen)
    groups = [{"params": params[:4]}, dict(GROUP2_KW[name], params=params[4:])]
    ok_opt, po, t_opt, pt = pair(name, groups)
    drive([ok_opt, t_opt], [po, pt], STEPS, gen, has_grad=grad_pattern)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} mixed dtypes")


@pytest.fixture
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name", NAMES)
def test_parity_default_dtype_float64(name, gen, default_float64):
    """Default dtype float64: torch's step (and NAdam's mu_product) tensors are float64."""
    params = make_params(torch.float64, gen, shapes=[(7,), (33,), (1000,)], channels_last=())
    ok_opt, po, t_opt, pt = pair(name, params)
    drive([ok_opt, t_opt], [po, pt], 25, gen, has_grad=lambda s, i: i != 1 or s % 2 == 0)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} default float64")


# ==== 9. hyperparameters toggled mid-run, late params ==============================================================
@pytest.mark.parametrize("what", ["maximize", "weight_decay"])
@pytest.mark.parametrize("name", NAMES)
def test_toggle_hyperparameter_mid_run(name, what, gen):
    if what == "weight_decay" and name == "Rprop":
        pytest.skip("Rprop has no weight_decay")
    params = small_params(gen)
    kw = dict(BASE_KW[name])
    kw.pop("weight_decay", None)
    ok_opt, po, t_opt, pt = pair(name, params, kw)

    def toggle(s):
        if s == 5:
            for o in (ok_opt, t_opt):
                o.param_groups[0][what] = True if what == "maximize" else 0.2
        if s == 12 and what == "maximize":
            for o in (ok_opt, t_opt):
                o.param_groups[0][what] = False

    drive([ok_opt, t_opt], [po, pt], 20, gen, before_step=toggle)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} {what} toggled")


@pytest.mark.parametrize("name,key,value,new_state", [
    ("Adam", "amsgrad", True, ("max_exp_avg_sq",)),
    ("AdamW", "amsgrad", True, ("max_exp_avg_sq",)),
    ("RMSprop", "centered", True, ("grad_avg",)),
    ("RMSprop", "momentum", 0.7, ("momentum_buffer",)),
])
def test_buffer_created_lazily_when_toggled_on(name, key, value, new_state, gen):
    """amsgrad / centered / momentum switched on after some steps: the buffer starts as zeros (torch would
    KeyError; its reference here gets the zeros inserted by hand)."""
    params = small_params(gen)
    kw = {"Adam": dict(lr=1e-2), "AdamW": dict(lr=1e-2), "RMSprop": dict(lr=1e-2)}[name]
    ok_opt, po, t_opt, pt = pair(name, params, kw)
    drive([ok_opt, t_opt], [po, pt], 6, gen)
    for o in (ok_opt, t_opt):
        o.param_groups[0][key] = value
    for p in pt:
        for k in new_state:
            t_opt.state[p][k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    grads = [make_grad(p, gen) for p in po]
    set_grads([po, pt], grads)
    ok_opt.step()
    t_opt.step()
    for p in po:
        for k in new_state:
            assert k in ok_opt.state[p]
    drive([ok_opt, t_opt], [po, pt], 10, gen)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} {key} toggled on")


@pytest.mark.parametrize("name", NAMES)
def test_late_params_and_missing_grads_have_own_counts(name, gen):
    params = small_params(gen, shapes=((7,), (33,), (12,)))

    def has(s, i):
        return i == 0 or (i == 1 and s >= 5) or (i == 2 and s % 3 == 0)

    ok_opt, po, t_opt, pt = pair(name, params)
    drive([ok_opt, t_opt], [po, pt], 15, gen, has_grad=has)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} late params")
    if name != "SGD":
        assert [steps_of(ok_opt, p) for p in po] == [15.0, 10.0, 5.0]
    if name not in ("Adagrad", "SGD"):
        params = small_params(gen, shapes=((7,), (9,)))
        ok_opt, po, _, _ = pair(name, params)
        drive([ok_opt], [po], 3, gen, has_grad=lambda s, i: i == 0)
        assert po[1] not in ok_opt.state, "a param that never had a grad got state"


@pytest.mark.parametrize("name", NAMES)
def test_edge_shapes_and_layouts(name, gen):
    """0-d, empty and permuted (dense, non-contiguous) params, with torch's results."""
    base = [torch.randn((), generator=gen, dtype=torch.float64), torch.randn(0, generator=gen, dtype=torch.float64),
            torch.randn(3, 0, generator=gen, dtype=torch.float64),
            torch.randn(17, 5, generator=gen, dtype=torch.float64).t(),
            torch.randn(4, 6, 5, generator=gen, dtype=torch.float64).permute(2, 0, 1)]
    params = [torch.nn.Parameter(t) for t in base]
    ok_opt, po, t_opt, pt = pair(name, params)
    assert po[3].stride() == (1, 5) and not po[3].is_contiguous()
    drive([ok_opt, t_opt], [po, pt], 12, gen, has_grad=lambda s, i: i != 0 or s % 2 == 0)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} edge shapes")


# ---- between steps, the user replaces memory the optimizer works on (as torch allows) ---------------------------
@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("how", ["param_data", "param_set_", "state_tensor", "step_reset", "grad_zeroed_in_place"])
@pytest.mark.parametrize("name", NAMES)
def test_memory_replaced_between_steps(name, how, gen):
    """After some steps the user replaces a param's storage (p.data = ..., p.set_), a state tensor or the step
    count, or refills the same grad tensors in place; the run continues as torch's.  For a replaced param, the old
    memory is no longer the param's: here it becomes the next grad of another param of the same size (as the
    allocator may hand a freed block out again), which a step must not take for an overlap with the param."""
    ok_opt, po, t_opt, pt = pair(name, small_params(gen, shapes=((33,), (33,), (5, 3))))
    drive([ok_opt, t_opt], [po, pt], 4, gen)
    old = po[1].detach()  # keeps the old storage
    for opt, ps in ((t_opt, pt), (ok_opt, po)):
        p = ps[1]
        if how == "param_data":
            p.data = p.data.clone() * 0.5
        elif how == "param_set_":
            with torch.no_grad():
                p.set_(p.detach().clone() + 1.0)
        elif how == "state_tensor":
            st = opt.state[p]
            k = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
            if not k:
                pytest.skip(f"{name}: no state tensor with this configuration")
            st[k[0]] = st[k[0]].clone().mul_(0.5)
        elif how == "step_reset":
            st = opt.state[p]
            if "step" not in st:
                pytest.skip("SGD keeps no step")
            st["step"] = torch.tensor(1.0)
        elif how == "grad_zeroed_in_place":
            opt.zero_grad(set_to_none=False)
    if how in ("param_data", "param_set_"):
        assert po[1].data_ptr() != old.data_ptr()
        g0 = old.view_as(po[0])
        grads = [make_grad(p, gen) for p in po]
        g0.copy_(grads[0])
        set_grads([po, pt], grads)
        po[0].grad = g0
        ok_opt.step()
        t_opt.step()
    if how == "grad_zeroed_in_place":  # the same grad tensors, refilled in place each step
        for s in range(4):
            gs = [make_grad(p, gen) for p in po]
            for ps in (po, pt):
                for p, g in zip(ps, gs):
                    p.grad.copy_(g)
            ok_opt.step()
            t_opt.step()
    drive([ok_opt, t_opt], [po, pt], 4, gen)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} after {how}")


# ==== 2. drop-in API ===============================================================================================
@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_isinstance_and_signature(name, gen):
    opt = OK[name](small_params(gen))
    assert isinstance(opt, TORCH[name]) and isinstance(opt, torch.optim.Optimizer)
    assert type(opt).__name__ == name
    assert inspect.signature(OK[name].__init__) == inspect.signature(TORCH[name].__init__)


def _make_scheduler(kind, opt, name):
    mom = name in HAS_MOMENTUM
    if kind == "StepLR":
        return S.StepLR(opt, step_size=3, gamma=0.5)
    if kind == "MultiStepLR":
        return S.MultiStepLR(opt, milestones=[2, 5, 9], gamma=0.3)
    if kind == "ExponentialLR":
        return S.ExponentialLR(opt, gamma=0.85)
    if kind == "CosineAnnealingLR":
        return S.CosineAnnealingLR(opt, T_max=7, eta_min=1e-4)
    if kind == "CosineAnnealingWarmRestarts":
        return S.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2, eta_min=1e-4)
    if kind == "CyclicLR":
        return S.CyclicLR(opt, base_lr=1e-3, max_lr=2e-2, step_size_up=3, cycle_momentum=mom,
                          base_momentum=0.7, max_momentum=0.9)
    if kind == "OneCycleLR":
        return S.OneCycleLR(opt, max_lr=2e-2, total_steps=20, cycle_momentum=mom, base_momentum=0.7,
                            max_momentum=0.9)
    if kind == "LambdaLR":
        return S.LambdaLR(opt, lr_lambda=lambda e: 1.0 / (1.0 + e))
    if kind == "MultiplicativeLR":
        return S.MultiplicativeLR(opt, lr_lambda=lambda e: 0.9)
    if kind == "LinearLR":
        return S.LinearLR(opt, start_factor=0.25, total_iters=5)
    if kind == "ConstantLR":
        return S.ConstantLR(opt, factor=0.5, total_iters=4)
    if kind == "PolynomialLR":
        return S.PolynomialLR(opt, total_iters=8, power=2.0)
    if kind == "SequentialLR":
        return S.SequentialLR(opt, [S.ConstantLR(opt, factor=0.1, total_iters=2), S.ExponentialLR(opt, gamma=0.9)],
                              milestones=[3])
    if kind == "ChainedScheduler":
        return S.ChainedScheduler([S.ConstantLR(opt, factor=0.5, total_iters=3), S.ExponentialLR(opt, gamma=0.9)],
                                  optimizer=opt)
    if kind == "ReduceLROnPlateau":
        return S.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    raise AssertionError(kind)


SCHEDULERS = ["StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
              "CyclicLR", "OneCycleLR", "LambdaLR", "MultiplicativeLR", "LinearLR", "ConstantLR", "PolynomialLR",
              "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"]


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_trajectory(name, kind, gen):
    params = small_params(gen)
    kw = dict(BASE_KW[name])
    if name == "RMSprop":
        kw["momentum"] = 0.5
    ok_opt, po, t_opt, pt = pair(name, params, kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        s_ok, s_t = _make_scheduler(kind, ok_opt, name), _make_scheduler(kind, t_opt, name)
        metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
        for s in range(18):
            grads = [make_grad(p, gen) for p in po]
            set_grads([po, pt], grads)
            ok_opt.step()
            t_opt.step()
            for sch in (s_ok, s_t):
                sch.step(metrics[s]) if kind == "ReduceLROnPlateau" else sch.step()
            assert_groups_equal(ok_opt, t_opt, f"{kind} step {s}")
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} {kind}")
    assert ok_opt.param_groups[0]["lr"] != BASE_KW[name]["lr"] or kind in ("ConstantLR", "LinearLR")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_step_hooks(name, gen):
    params = small_params(gen)
    opt = OK[name](params, **BASE_KW[name])
    seen = []

    def pre(o, args, kwargs):
        assert o is opt
        seen.append(("pre", params[0].detach().clone()))

    def post(o, args, kwargs):
        assert o is opt
        seen.append(("post", params[0].detach().clone()))

    def gpre(o, args, kwargs):
        if o is opt:
            seen.append(("global_pre", None))

    def gpost(o, args, kwargs):
        if o is opt:
            seen.append(("global_post", None))

    h1, h2 = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    h3 = register_optimizer_step_pre_hook(gpre)
    h4 = register_optimizer_step_post_hook(gpost)
    try:
        p0 = params[0].detach().clone()
        set_grads([params], [make_grad(p, gen) for p in params])
        opt.step()
    finally:
        h3.remove()
        h4.remove()
    assert [k for k, _ in seen] == ["global_pre", "pre", "post", "global_post"]
    assert torch.equal(seen[1][1], p0) and torch.equal(seen[2][1], params[0].detach())
    assert not torch.equal(p0, params[0].detach())
    h1.remove()
    h2.remove()
    seen.clear()
    opt.step()
    assert seen == []


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks(name, gen):
    params = small_params(gen)
    opt = OK[name](params, **BASE_KW[name])
    set_grads([params], [make_grad(p, gen) for p in params])
    opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = copy.copy(sd)
        sd.pop("extra")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]
    opt.step()


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_both_modes(name, gen):
    params = small_params(gen)
    opt = OK[name](params, **BASE_KW[name])
    set_grads([params], [make_grad(p, gen) for p in params])
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    if name != "Rprop":  # zero grads still move params through weight decay / momentum (not Rprop)
        opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    snap = snapshot(opt, params)
    opt.step()  # no grads: nothing changes
    assert_unchanged(opt, params, snap, "step without grads")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure(name, gen):
    m_ok = _tiny_model()
    m_t = copy.deepcopy(m_ok)
    ok_opt, t_opt = OK[name](m_ok.parameters(), **BASE_KW[name]), TORCH[name](m_t.parameters(), **BASE_KW[name])
    for _ in range(4):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
        losses = []
        for m, o in ((m_ok, ok_opt), (m_t, t_opt)):
            def closure(m=m, o=o):
                assert torch.is_grad_enabled()
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss
            losses.append(o.step(closure))
        assert isinstance(losses[0], torch.Tensor)
        assert abs(losses[0].item() - losses[1].item()) <= 1e-12 * losses[1].item()
    assert_same_run(ok_opt, t_opt, list(m_ok.parameters()), list(m_t.parameters()), f"{name} closure")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_then_step(name, gen):
    params = small_params(gen)
    extra = small_params(gen, shapes=((11,), (4, 4)))
    ok_opt, po, t_opt, pt = pair(name, params)
    drive([ok_opt, t_opt], [po, pt], 4, gen)
    eo, et = clone_params(extra), clone_params(extra)
    g2 = dict(GROUP2_KW[name])
    g2.pop("initial_accumulator_value", None)
    ok_opt.add_param_group(dict(g2, params=eo))
    t_opt.add_param_group(dict(g2, params=et))
    assert_groups_equal(ok_opt, t_opt)
    drive([ok_opt, t_opt], [po + eo, pt + et], 8, gen)
    assert_same_run(ok_opt, t_opt, po + eo, pt + et, f"{name} add_param_group")


@pytest.mark.usefixtures("api_once")
def test_adagrad_add_param_group_initial_accumulator_value(gen):
    """torch creates the state of a group added later lazily from ``self.defaults['initial_accumulator_value']``
    (its __init__ uses the group's value for the groups it is given)."""
    params, extra = small_params(gen), small_params(gen, shapes=((11,),))
    ok_opt, po, t_opt, pt = pair("Adagrad", params, dict(lr=0.05, initial_accumulator_value=0.1))
    eo, et = clone_params(extra), clone_params(extra)
    ok_opt.add_param_group({"params": eo, "initial_accumulator_value": 0.5})
    t_opt.add_param_group({"params": et, "initial_accumulator_value": 0.5})
    drive([ok_opt, t_opt], [po + eo, pt + et], 5, gen)
    assert_same_run(ok_opt, t_opt, po + eo, pt + et, "Adagrad added group")


def _tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)


def _train(models_opts, steps, gen, dtype=torch.float64):
    for _ in range(steps):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(6, 2, generator=gen, dtype=torch.float64).to(dtype)
        for m, o in models_opts:
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_named_parameters(name, gen):
    m_ok = _tiny_model()
    m_t = copy.deepcopy(m_ok)
    ok_opt = OK[name](m_ok.named_parameters(), **BASE_KW[name])
    t_opt = TORCH[name](m_t.named_parameters(), **BASE_KW[name])
    assert ok_opt.param_groups[0]["param_names"] == t_opt.param_groups[0]["param_names"] == \
        [n for n, _ in m_ok.named_parameters()]
    _train([(m_ok, ok_opt), (m_t, t_opt)], 10, gen)
    assert_same_run(ok_opt, t_opt, list(m_ok.parameters()), list(m_t.parameters()), f"{name} named")
    sd_ok, sd_t = ok_opt.state_dict(), t_opt.state_dict()
    assert sd_ok["param_groups"][0]["param_names"] == sd_t["param_groups"][0]["param_names"]
    # and the named state dict loads into torch's class (and back)
    m2 = copy.deepcopy(m_t)
    t2 = TORCH[name](m2.named_parameters(), **BASE_KW[name])
    t2.load_state_dict(sd_ok)
    ok2 = OK[name](copy.deepcopy(m_t).named_parameters(), **BASE_KW[name])
    ok2.load_state_dict(sd_t)


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_extra_param_group_keys_kept(name, gen):
    params = small_params(gen)
    groups = [{"params": params[:2], "tag": "encoder", "custom": 3}, {"params": params[2:], "tag": "head"}]
    ok_opt, po, t_opt, pt = pair(name, groups)
    drive([ok_opt, t_opt], [po, pt], 5, gen)
    assert ok_opt.param_groups[0]["tag"] == "encoder" and ok_opt.param_groups[0]["custom"] == 3
    assert ok_opt.param_groups[1]["tag"] == "head"
    sd = ok_opt.state_dict()
    assert sd["param_groups"][0]["tag"] == "encoder" and sd["param_groups"][1]["tag"] == "head"
    assert_groups_equal(ok_opt, t_opt)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} extra keys")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_tensor_lr_and_tensor_betas(name, dtype, gen):
    params = small_params(gen, dtype)
    kw = dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.999)), weight_decay=0.01)
    ok_opt, po, t_opt, pt = pair(name, params, kw)
    drive([ok_opt, t_opt], [po, pt], 15, gen)
    if dtype == torch.float32:
        assert_same_run(ok_opt, t_opt, po, pt, f"{name} tensor lr/betas")
    else:
        # Documented difference (README, optkern.torch.optim's docstring): torch's single-tensor path computes the
        # bias corrections and the step size from float32 tensor betas/lr in float32 tensor arithmetic; optkern
        # takes their values into its float64 host math.  Measured 1.2e-7 (Adam) and 2.8e-7 (AdamW) after 15 steps.
        for i, (a, b) in enumerate(zip(po, pt)):
            e = rel_err(a, b)
            assert e <= 1e-6, f"{name} float64 param {i}: rel err {e:.3g} with float32 tensor betas"
    assert_groups_equal(ok_opt, t_opt)
    assert isinstance(ok_opt.param_groups[0]["betas"][0], torch.Tensor)


IMPL_FLAGS = [(n, "foreach", True) for n in NAMES] + [(n, "foreach", False) for n in NAMES] + \
    [(n, "fused", True) for n in FUSED] + \
    [(n, "capturable", False) for n in NAMES if n not in ("SGD", "Adagrad")]


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name,flag,value", IMPL_FLAGS, ids=[f"{n}-{f}={v}" for n, f, v in IMPL_FLAGS])
def test_implementation_keywords_accepted(name, flag, value, gen):
    params = make_params(torch.float32, gen, shapes=[(7,), (33,), (1000,), (8, 3, 3, 3)], channels_last={3})
    ok_opt, po, t_opt, pt = pair(name, params, **{flag: value})
    assert ok_opt.param_groups[0][flag] is value and ok_opt.defaults[flag] is value
    # (a param that starts late would crash torch's own fused SGD with momentum: grads missing in later steps)
    drive([ok_opt, t_opt], [po, pt], 12, gen, has_grad=lambda s, i: i != 2 or s % 3 != 1)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} {flag}={value}")
    assert_groups_equal(ok_opt, t_opt)


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_differentiable_refused(name, gen):
    with pytest.raises(ValueError, match="differentiable"):
        OK[name](small_params(gen), differentiable=True)
    params = small_params(gen)
    opt = OK[name](params)
    opt.param_groups[0]["differentiable"] = True
    set_grads([params], [make_grad(p, gen) for p in params])
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        opt.step()
    assert_unchanged(opt, params, snap, "differentiable group")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_bare_tensor_params_type_error(name):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError) as t_exc:
        TORCH[name](p)
    with pytest.raises(TypeError) as o_exc:
        OK[name](p)
    assert str(o_exc.value) == str(t_exc.value)


def _construct(cls, params, kwargs):
    """-> ('ok', warnings) or (exception type, message)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            cls(params, **kwargs)
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
    return "ok", [(x.category, str(x.message)) for x in w]


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_constructor_errors_as_torch(name):
    info = INFOS[name]
    checked = 0
    for ei_t, ei_o in zip(info.optim_error_inputs_func(device="cpu", dtype=torch.float32),
                          info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
        if ei_t.error_on != _co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            continue
        inp_t, inp_o = ei_t.optimizer_error_input, ei_o.optimizer_error_input
        got_t = _construct(TORCH[name], inp_t.params, inp_t.kwargs)
        got_o = _construct(OK[name], inp_o.params, inp_o.kwargs)
        desc = inp_t.desc
        if issubclass(ei_t.error_type, Warning):
            assert got_o[0] == "ok", f"{desc}: optkern raised {got_o}"
            msgs = [m for c, m in got_o[1] if issubclass(c, ei_t.error_type)]
            assert any(re.search(ei_t.error_regex, m) for m in msgs), f"{desc}: {got_o[1]}"
            assert got_o[1] == got_t[1], f"{desc}: warnings {got_o[1]} != torch's {got_t[1]}"
        else:
            assert got_t[0] is ei_t.error_type, f"{desc}: torch itself gave {got_t}"
            assert got_o[0] is ei_t.error_type, f"{desc}: optkern gave {got_o}, torch {got_t}"
            assert re.search(ei_t.error_regex, got_o[1]), f"{desc}: {got_o[1]!r}"
            assert got_o[1] == got_t[1], f"{desc}: message {got_o[1]!r} != torch's {got_t[1]!r}"
        checked += 1
    assert checked >= 7


# ==== 3. state dict interop, save/load, deepcopy, pickle =========================================================
def _sd_params(gen):
    return make_params(torch.float64, gen, shapes=[(7,), (33,), (8, 3, 3, 3)], channels_last={2})


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_torch_state_dict_into_optkern(name, gen):
    """torch's state dict (after steps) loads into the optkern class; the run continues as torch's does.  The
    reference is torch's own class loading the same state dict (load_state_dict casts state to the params' dtype,
    e.g. NAdam's mu_product to float64), and the torch optimizer that made it, continuing."""
    t_src_params = clone_params(_sd_params(gen))
    t_src = TORCH[name](t_src_params, **BASE_KW[name])
    drive([t_src], [t_src_params], 6, gen, has_grad=lambda s, i: i != 1 or s >= 2)
    sd = copy.deepcopy(t_src.state_dict())
    po, pt = clone_params(t_src_params), clone_params(t_src_params)
    ok_opt, t_opt = OK[name](po, **BASE_KW[name]), TORCH[name](pt, **BASE_KW[name])
    ok_opt.load_state_dict(copy.deepcopy(sd))
    t_opt.load_state_dict(copy.deepcopy(sd))
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} loaded")
    drive([ok_opt, t_opt, t_src], [po, pt, t_src_params], 8, gen)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} continued from torch's state dict")
    for a, b in zip(po, t_src_params):  # and the original torch run (float32 mu_product there: float32-close)
        assert rel_err(a, b) <= 1e-6


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_optkern_state_dict_into_torch(name, gen):
    src_params = clone_params(_sd_params(gen))
    src = OK[name](src_params, **BASE_KW[name])
    drive([src], [src_params], 6, gen, has_grad=lambda s, i: i != 1 or s >= 2)
    sd = copy.deepcopy(src.state_dict())
    po, pt = clone_params(src_params), clone_params(src_params)
    ok_opt, t_opt = OK[name](po, **BASE_KW[name]), TORCH[name](pt, **BASE_KW[name])
    t_opt.load_state_dict(copy.deepcopy(sd))
    ok_opt.load_state_dict(copy.deepcopy(sd))
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} loaded")
    drive([ok_opt, t_opt, src], [po, pt, src_params], 8, gen)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} torch continued from optkern's state dict")
    for a, b in zip(src_params, pt):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_mid_run_restores(name, gen):
    """load_state_dict into the same optimizer mid-run (a checkpoint restore) and continue, as torch."""
    ok_opt, po, t_opt, pt = pair(name, small_params(gen))
    drive([ok_opt, t_opt], [po, pt], 4, gen)
    sd_o, sd_t = copy.deepcopy(ok_opt.state_dict()), copy.deepcopy(t_opt.state_dict())
    p_o, p_t = [p.detach().clone() for p in po], [p.detach().clone() for p in pt]
    drive([ok_opt, t_opt], [po, pt], 3, gen)
    with torch.no_grad():
        for p, v in zip(po, p_o):
            p.copy_(v)
        for p, v in zip(pt, p_t):
            p.copy_(v)
    ok_opt.load_state_dict(sd_o)
    t_opt.load_state_dict(sd_t)
    drive([ok_opt, t_opt], [po, pt], 4, gen)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} restored mid-run")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("kw_kind", ["base", "group2"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_format_equals_torch(name, kw_kind, gen):
    params = small_params(gen, torch.float32)
    kw = BASE_KW[name] if kw_kind == "base" else GROUP2_KW[name]
    if name == "SGD" and kw_kind == "group2":
        kw = dict(lr=0.1)  # no momentum: torch keeps no state at all
    ok_opt, po, t_opt, pt = pair(name, params, kw)
    drive([ok_opt, t_opt], [po, pt], 3, gen, has_grad=lambda s, i: i != 2)
    sd_o, sd_t = ok_opt.state_dict(), t_opt.state_dict()
    assert list(sd_o.keys()) == list(sd_t.keys())
    assert list(sd_o["state"].keys()) == list(sd_t["state"].keys()), \
        f"state dict 'state' entries {sd_o['state']} != torch's {sd_t['state']}"
    for k, st_t in sd_t["state"].items():
        st_o = sd_o["state"][k]
        assert_state_close(st_o, st_t, f"state[{k}]")
        if "step" in st_t:
            s = st_o["step"]
            assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32 and \
                s.device.type == "cpu"
    assert len(sd_o["param_groups"]) == len(sd_t["param_groups"])
    for go, gt in zip(sd_o["param_groups"], sd_t["param_groups"]):
        assert list(go.keys()) == list(gt.keys())
        for k in gt:
            assert same_value(go[k], gt[k]), f"param_groups {k}: {go[k]!r} != {gt[k]!r}"


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_torch_save_load_weights_only(name, gen):
    params = small_params(gen)
    po = clone_params(params)
    opt = OK[name](po, **BASE_KW[name])
    drive([opt], [po], 5, gen)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in po]}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    p2 = [torch.nn.Parameter(t.clone()) for t in loaded["params"]]
    opt2 = OK[name](p2, **BASE_KW[name])
    opt2.load_state_dict(loaded["opt"])
    # the same state dict loaded without the file round trip (load_state_dict casts state to the params' dtype)
    p3 = clone_params(po)
    opt3 = OK[name](p3, **BASE_KW[name])
    opt3.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_same_run(opt2, opt3, p2, p3, f"{name} reloaded")
    drive([opt, opt2, opt3], [po, p2, p3], 6, gen)
    assert_same_run(opt2, opt3, p2, p3, f"{name} continued after torch.load")
    for a, b in zip(p2, po):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_after_steps(name, gen):
    params = small_params(gen)
    opt = OK[name](params, **BASE_KW[name])
    drive([opt], [params], 5, gen)
    opt2 = copy.deepcopy(opt)
    assert type(opt2) is type(opt)
    p2 = [p for g in opt2.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(p2, params))
    assert_same_run(opt2, opt, p2, params, f"{name} deepcopy")
    drive([opt, opt2], [params, p2], 6, gen)
    assert_same_run(opt2, opt, p2, params, f"{name} deepcopy continued")
    # the copy's state is its own
    assert all(opt2.state[a] is not opt.state[b] for a, b in zip(p2, params))


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_pickle_after_steps(name, gen):
    model = _tiny_model()
    opt = OK[name](model.parameters(), **BASE_KW[name])
    _train([(model, opt)], 4, gen)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is type(opt)
    p1, p2 = list(model.parameters()), list(model2.parameters())
    assert all(a is b for a, b in zip([p for g in opt2.param_groups for p in g["params"]], p2))
    assert_same_run(opt2, opt, p2, p1, f"{name} unpickled")
    _train([(model, opt), (model2, opt2)], 5, gen)
    assert_same_run(opt2, opt, p2, p1, f"{name} unpickled continued")


# ==== 4. AMP: GradScaler ==============================================================================================
def _amp_run(name, gen, clip: bool):
    torch.manual_seed(1)
    m_ok = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    m_t = copy.deepcopy(m_ok)
    kw = dict(BASE_KW[name])
    t_kw = dict(kw, fused=True) if name in FUSED else kw
    ok_opt, t_opt = OK[name](m_ok.parameters(), **kw), TORCH[name](m_t.parameters(), **t_kw)
    sc_ok = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    sc_t = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    po, pt = list(m_ok.parameters()), list(m_t.parameters())
    bad_steps = {4: float("inf"), 7: float("nan")}
    for s in range(11):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randn(8, 3, generator=gen)
        for m, o, sc in ((m_ok, ok_opt, sc_ok), (m_t, t_opt, sc_t)):
            o.zero_grad()
            sc.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        if s in bad_steps:
            for p in (po[0], pt[0]):
                p.grad.view(-1)[3] = bad_steps[s]
            snap = snapshot(ok_opt, po)
        scale_before = sc_ok.get_scale()
        for m, o, sc in ((m_ok, ok_opt, sc_ok), (m_t, t_opt, sc_t)):
            if clip:
                sc.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            sc.step(o)
            sc.update()
        if s in bad_steps:
            assert_unchanged(ok_opt, po, snap, f"{name} step {s} with {bad_steps[s]} grads")
            assert sc_ok.get_scale() == scale_before * 0.5
        assert sc_ok.get_scale() == sc_t.get_scale()
        for a, b in zip(po, pt):
            e = rel_err(a, b)
            assert e <= TOL[torch.float32], f"{name} AMP step {s}: param rel err {e:.3g}"
    assert not hasattr(ok_opt, "grad_scale") and not hasattr(ok_opt, "found_inf")
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} AMP clip={clip}")
    if name != "SGD":
        assert steps_of(ok_opt, po[0]) == 11 - len(bad_steps)


@pytest.mark.parametrize("name", NAMES)
def test_amp_grad_scaler(name, gen):
    _amp_run(name, gen, clip=False)


@pytest.mark.parametrize("name", NAMES)
def test_amp_grad_scaler_unscale_clip(name, gen):
    _amp_run(name, gen, clip=True)


# ==== 5. autograd version counters ================================================================================
@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_version_counters_bumped(name, gen):
    params = small_params(gen)
    ok_opt, po, t_opt, pt = pair(name, params)
    drive([ok_opt, t_opt], [po, pt], 2, gen)
    grads = [make_grad(p, gen) for p in po]
    set_grads([po, pt], grads)

    def versions(opt, ps):
        return [p._version for p in ps], [{k: v._version for k, v in opt.state[p].items()
                                           if isinstance(v, torch.Tensor)} for p in ps]

    vo0, vt0 = versions(ok_opt, po), versions(t_opt, pt)
    ok_opt.step()
    t_opt.step()
    vo1, vt1 = versions(ok_opt, po), versions(t_opt, pt)
    assert all(b > a for a, b in zip(vo0[0], vo1[0])), "a param's _version did not increase"
    for i, (s0, s1) in enumerate(zip(vo0[1], vo1[1])):
        for k in s0:
            if k in ("step", "mu_product"):
                continue  # below
            assert s1[k] > s0[k], f"param {i}: state[{k!r}]._version did not increase"


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", [n for n in NAMES if n != "SGD"])
def test_version_counters_of_scalar_state_like_torch(name, gen):
    """state['step'] (and NAdam's mu_product) are written in place by the step; torch bumps their versions."""
    params = small_params(gen)
    ok_opt, po, t_opt, pt = pair(name, params)
    drive([ok_opt, t_opt], [po, pt], 2, gen)
    set_grads([po, pt], [make_grad(p, gen) for p in po])
    keys = [k for k in ("step", "mu_product") if k in t_opt.state[pt[0]]]
    v_o = {k: ok_opt.state[po[0]][k]._version for k in keys}
    v_t = {k: t_opt.state[pt[0]][k]._version for k in keys}
    ok_opt.step()
    t_opt.step()
    missed = [f"state[{k!r}]._version {v_o[k]} -> {ok_opt.state[po[0]][k]._version} (torch's {v_t[k]} -> "
              f"{t_opt.state[pt[0]][k]._version})" for k in keys
              if t_opt.state[pt[0]][k]._version > v_t[k] and not ok_opt.state[po[0]][k]._version > v_o[k]]
    assert not missed, "not bumped as torch bumps it: " + "; ".join(missed)


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", NAMES)
def test_backward_through_saved_param_raises(name, gen):
    for Cls in (TORCH[name], OK[name]):
        p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        x = torch.randn(5, dtype=torch.float64, requires_grad=True)
        opt = Cls([p], **BASE_KW[name])
        y = (p * x).sum()  # saves p for x's grad
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


# ==== 6. validate before mutate =====================================================================================
BAD_HYPER = {
    "SGD": ("momentum", -0.5), "Adam": ("betas", (1.5, 0.9)), "AdamW": ("betas", (1.5, 0.9)),
    "Adagrad": ("lr_decay", -1.0), "RMSprop": ("alpha", -0.1), "Adamax": ("betas", (1.5, 0.9)),
    "NAdam": ("betas", (1.5, 0.9)), "Adadelta": ("rho", 1.5), "Rprop": ("etas", (1.5, 0.5)),
}
BAD_KINDS = {"grad_dtype": TypeError, "grad_strides": ValueError, "sparse_grad": RuntimeError,
             "complex_param": TypeError, "negative_lr": ValueError, "bad_hyper": ValueError,
             "eps_negative": ValueError}


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("path", ["new_param", "same_params"])
@pytest.mark.parametrize("kind", list(BAD_KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_validate_before_mutate(name, kind, path, gen):
    """A bad grad, param or hyperparameter in group 1 raises naming param_groups[1] and nothing changes in any
    group.  new_param: group 0 also has a param stepping for the first time (no state may be created for it);
    same_params: every param stepped before (the steady state a step may have cached)."""
    a, b, c = small_params(gen, torch.float32, shapes=((7,), (33,), (9,)))  # group 0 (c: no state yet)
    d, e = small_params(gen, torch.float32, shapes=((3, 4), (5,)))          # group 1
    g1 = [d, e]
    if kind == "complex_param":  # (bfloat16/float16 params are stepped since 16-bit training; complex is refused)
        bf = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
        g1.append(bf)
    opt = OK[name]([{"params": [a, b, c]}, dict(GROUP2_KW[name], params=g1)], **BASE_KW[name])
    allp = [a, b, c] + g1
    warm = (a, b, d, e) if path == "new_param" else (a, b, c, d, e)
    for _ in range(3):
        for p in warm:
            p.grad = make_grad(p, gen)
        opt.step()
    for p in (a, b, c, d, e):
        p.grad = make_grad(p, gen)
    if kind == "grad_dtype":
        d.grad_dtype = None
        d.grad = torch.randn(3, 4, dtype=torch.float64)
    elif kind == "grad_strides":
        d.grad = torch.randn(4, 3).t()
        assert d.grad.shape == d.shape and d.grad.stride() != d.stride()
    elif kind == "sparse_grad":
        e.grad = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([1.0, -2.0]), (5,),
                                         check_invariants=True)
    elif kind == "complex_param":
        bf.grad = torch.randn(6, dtype=torch.complex64)
    elif kind == "negative_lr":
        opt.param_groups[1]["lr"] = -1.0
    elif kind == "bad_hyper":
        key, value = BAD_HYPER[name]
        opt.param_groups[1][key] = value
    elif kind == "eps_negative":
        if "eps" not in opt.param_groups[1]:
            pytest.skip(f"{name} has no eps")
        opt.param_groups[1]["eps"] = -1e-8
    snap = snapshot(opt, allp)
    assert name == "Adagrad" or (c not in opt.state) == (path == "new_param")  # (Adagrad: state from __init__)
    with pytest.raises(BAD_KINDS[kind], match=r"param_groups\[1\]"):
        opt.step()
    assert_unchanged(opt, allp, snap, f"{name} {kind}")  # (also: no state created for c)


# ==== 7. threads ==================================================================================================
def _threaded(opt, n_threads=2, per_thread=50):
    barrier = threading.Barrier(n_threads)
    errors = []

    def work():
        try:
            barrier.wait()
            for _ in range(per_thread):
                opt.step()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a stepping thread hangs"
    assert not errors, errors


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_threads_share_one_optimizer(name, gen):
    n = 1 << 17
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    q = torch.nn.Parameter(torch.randn(1000, generator=gen))
    p0, q0 = p.detach().clone(), q.detach().clone()
    kw = dict(lr=1e-3) if name == "SGD" else dict(lr=1e-3, weight_decay=0.01)
    opt = OK[name]([p, q], **kw)
    p.grad, q.grad = torch.randn(n, generator=gen), torch.randn(1000, generator=gen)
    _threaded(opt)
    # the same 100 steps, sequential
    ps, qs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    ps.grad, qs.grad = p.grad.clone(), q.grad.clone()
    seq = OK[name]([ps, qs], **kw)
    for _ in range(100):
        seq.step()
    assert torch.equal(p.detach(), ps.detach()) and torch.equal(q.detach(), qs.detach())
    if name == "SGD":
        expect = p0.double() - 100 * 1e-3 * p.grad.double()
        assert rel_err(p.detach() - p0, expect - p0.double()) < 1e-4
    else:
        assert steps_of(opt, p) == 100.0 and steps_of(opt, q) == 100.0
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], seq.state[ps][k])


# ==== 8. KeyboardInterrupt atomicity ==========================================================================
def _buffers_changed(before, after, keys):
    return {k: not torch.equal(before[k], after[k]) for k in keys}


def _wrap_kernels(monkeypatch, cls, make):
    """Replace every compiled step entry point the class can reach -- its ``_c_step`` (the brief's hook), its
    cached-plan ``_plan_step``, and optkern._C's ``*_step`` functions looked up at call time -- by make(real)."""
    for attr in ("_c_step", "_plan_step"):
        real = cls.__dict__.get(attr, getattr(cls, attr, None))
        if real is not None:
            monkeypatch.setattr(cls, attr, staticmethod(make(real)))
    for n in dir(optkern._C):
        if n.endswith("_step") and callable(getattr(optkern._C, n)):
            monkeypatch.setattr(optkern._C, n, make(getattr(optkern._C, n)))


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("when", ["first_step", "after_call", "before_call"])
@pytest.mark.parametrize("name", NAMES)
def test_keyboard_interrupt_atomic(name, when, gen, monkeypatch):
    """A KeyboardInterrupt surfacing right after the compiled call returns (as a Ctrl-C during the kernel does)
    leaves a complete step -- buffers written AND step counts advanced -- and the run continues as torch's with
    that step taken; one raised before the call leaves nothing changed."""
    params = small_params(gen)
    ok_opt, po, t_opt, pt = pair(name, params)
    warm = 0 if when == "first_step" else 3
    drive([ok_opt, t_opt], [po, pt], warm, gen)
    set_grads([po, pt], [make_grad(p, gen) for p in po])
    before = snapshot(ok_opt, po)
    calls = []

    def make(real):
        def interrupted(*args, **kwargs):
            calls.append(1)
            if when != "before_call":
                real(*args, **kwargs)
            raise KeyboardInterrupt
        return interrupted

    _wrap_kernels(monkeypatch, type(ok_opt), make)
    with pytest.raises(KeyboardInterrupt):
        ok_opt.step()
    monkeypatch.undo()
    assert len(calls) == 1, "expected one compiled call for one group of one dtype"
    if when == "before_call":
        if warm:
            assert_unchanged(ok_opt, po, before, "interrupted before the kernel")
        drive([ok_opt, t_opt], [po, pt], 3, gen)
        assert_same_run(ok_opt, t_opt, po, pt, f"{name} continued after KeyboardInterrupt")
        return
    t_opt.step()  # the interrupted step was complete: torch takes it too
    pos = {id(p): i for i, p in enumerate(po)}
    for p in po:
        st0, st = before[1].get(pos[id(p)], {}), ok_opt.state[p]
        if "step" in st:
            assert float(st["step"]) == float(st0["step"]) + 1 if st0 else float(st["step"]) == 1.0, \
                "buffers written but step not advanced"
        if st0:
            bufs = [k for k in st0 if k not in ("step", "mu_product")]
            changed = _buffers_changed(st0, st, bufs)
            assert all(changed.values()), f"step advanced but buffers not written: {changed}"
            if "mu_product" in st0:
                assert float(st["mu_product"]) != float(st0["mu_product"])
        assert not torch.equal(p.detach(), before[0][pos[id(p)]])
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} after the interrupted step")
    # the lock was released and the run continues as torch's
    drive([ok_opt, t_opt], [po, pt], 3, gen)
    assert_same_run(ok_opt, t_opt, po, pt, f"{name} continued after KeyboardInterrupt")


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", [n for n in NAMES if n != "SGD"])
def test_keyboard_interrupt_between_kernel_calls(name, gen, monkeypatch):
    """Two groups -> two kernel calls; interrupted after the first: group 0 advanced (buffers and steps), group 1
    untouched (buffers and steps) -- never a step count without its buffers."""
    params = small_params(gen)
    groups = [{"params": params[:2]}, dict(GROUP2_KW[name], params=params[2:])]
    opt = OK[name](groups, **BASE_KW[name])
    drive([opt], [params], 3, gen)
    set_grads([params], [make_grad(p, gen) for p in params])
    before = snapshot(opt, params)
    calls = []

    def make(real):
        def once(*args, **kwargs):
            calls.append(1)
            real(*args, **kwargs)
            raise KeyboardInterrupt
        return once

    _wrap_kernels(monkeypatch, type(opt), make)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    monkeypatch.undo()
    assert len(calls) == 1
    for i, p in enumerate(params):
        st0, st = before[1][i], opt.state[p]
        advanced = float(st["step"]) == float(st0["step"]) + 1
        bufs = [k for k in st0 if k not in ("step", "mu_product")]
        changed = _buffers_changed(st0, st, bufs)
        assert advanced == (i < 2), f"param {i}: step advanced={advanced}"
        assert all(v == advanced for v in changed.values()), f"param {i}: step {advanced}, buffers {changed}"


# ---- regressions from review (cached plans) ------------------------------------------------------------------
@pytest.mark.usefixtures("api_once")
def test_cached_plan_refuses_a_resized_grad():
    """p.grad.set_(smaller) bypasses torch's size check on assignment; the cached plan must not read past it."""
    p = torch.nn.Parameter(torch.randn(4099))
    opt = okt.Adam([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(4099)
        opt.step()
    p.grad = torch.randn(4099)
    p.grad.set_(torch.zeros(4))
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]\.grad: expected shape"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.usefixtures("api_once")
def test_cached_plan_sees_a_param_shrunk_in_place():
    """p.data = p.data[:k] keeps the address; the plan must see the new shape (torch then fails on the state)."""
    p = torch.nn.Parameter(torch.randn(1000))
    opt = okt.Adam([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(1000)
        opt.step()
    storage = p.detach()  # the whole old storage
    p.data = p.data[:16]
    p.grad = torch.randn(16)
    tail = storage[16:].clone()
    with pytest.raises(ValueError, match="state"):
        opt.step()
    assert torch.equal(storage[16:], tail)


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_param_replaced_in_its_group_list_is_stepped(name):
    def run(cls):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(4))
        opt = cls([a], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (a * a).sum().backward()
            opt.step()
        new = torch.nn.Parameter(torch.ones(4))
        opt.param_groups[0]["params"][0] = new
        opt.zero_grad()
        (new * new).sum().backward()
        opt.step()
        return a.detach(), new.detach()

    (a_ok, new_ok), (a_t, new_t) = run(OK[name]), run(getattr(torch.optim, name))
    assert torch.equal(new_ok, new_t) and torch.equal(a_ok, a_t)


@pytest.mark.usefixtures("api_once")
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_grads_unscaled_after_grad_scaler_step_as_torch_fused(name):
    """torch's fused optimizers leave p.grad unscaled after GradScaler.step; so does optkern (a skipped step leaves
    them scaled in both)."""
    def run(make):
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 4)
        opt = make(m.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = torch.randn(16, 8), torch.randn(16, 4)
        grads = []
        for it in range(4):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if it == 2:
                m.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            grads.append([p.grad.clone() for p in m.parameters()])
        return grads, [p.detach() for p in m.parameters()]

    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    g_ok, p_ok = run(lambda ps: OK[name](ps, **kw))
    g_t, p_t = run(lambda ps: getattr(torch.optim, name)(ps, fused=True, **kw))
    for step_ok, step_t in zip(g_ok, g_t):
        for a, b in zip(step_ok, step_t):
            assert torch.equal(a.isinf(), b.isinf()) and rel_err(a.nan_to_num(posinf=0), b.nan_to_num(posinf=0)) <= 1e-6
    for a, b in zip(p_ok, p_t):
        assert rel_err(a, b) <= 2e-5
