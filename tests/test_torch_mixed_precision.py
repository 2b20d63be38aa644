"""optkern.torch with bfloat16/float16 params (issue 14): state dtypes, master weights, stochastic rounding, the
offload step's param copies, state dicts, AMP skips, refusals and the cached fast path.

References: torch 2.13's fused CPU Adam/AdamW/Adagrad (state in the param dtype), its for-loop SGD, and
optkern's functional layer on the same arrays.  Sizes 1, 7, 33, 1000, 4099 hit the SIMD tails.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optkern
import optkern.torch as okt
from conftest import AVAILABLE_ISAS

SIZES = (1, 7, 33, 1000, 4099)
HALF = (torch.bfloat16, torch.float16)
DT_ID = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "f32"}
NAMES = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop")
KW = {"SGD": dict(lr=0.05, momentum=0.9), "Adam": dict(lr=1e-2), "AdamW": dict(lr=1e-2), "Adagrad": dict(lr=0.05),
      "RMSprop": dict(lr=1e-2, momentum=0.5), "Adamax": dict(lr=1e-2), "NAdam": dict(lr=1e-2),
      "Adadelta": dict(lr=0.5), "Rprop": dict(lr=1e-2)}


@pytest.fixture
def gen(rng):
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


def params_of(dtype, gen, sizes=SIZES):
    return [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)) for n in sizes]


def clones(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def grads_for(ps, gen, scale=1.0):
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype) for p in ps]


def set_grads(ps, gs):
    for p, g in zip(ps, gs):
        p.grad = g.clone()


def bits(t):
    return t.detach().view(torch.int16) if t.element_size() == 2 else t.detach().view(torch.int32)


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.numel()} elements differ, first at {diff[0].tolist()}: " \
                              f"{a.flatten()[diff[0]].item()} vs {b.flatten()[diff[0]].item()}"


def ulp16(x: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of the 16-bit type at |x| (float64): 2^(e - 7) for bfloat16, 2^(e - 10) for
    float16, e = floor(log2 |x|), floored at the smallest subnormal."""
    x = x.abs().to(torch.float64)
    mant, tiny = (7, 2.0 ** -133) if dtype == torch.bfloat16 else (10, 2.0 ** -24)
    e = torch.floor(torch.log2(torch.where(x > 0, x, torch.ones_like(x))))
    return torch.clamp(torch.pow(2.0, e - mant), min=tiny)


def snapshot(opt, ps):
    return [p.detach().clone() for p in ps], copy.deepcopy({id(p): opt.state[p] for p in ps if p in opt.state})


# ==== against torch: master_weights=None, state in the param dtype ==================================================
@pytest.mark.parametrize("dtype", HALF, ids=DT_ID.get)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_param_state_bitwise_vs_torch_fused(name, dtype, gen):
    """Params bit for bit over 20 steps.  The 16-bit moments differ on a few elements (about 1 in 10^4) by <= 1
    ulp of the 16-bit type at max(|torch's result|, |its value before|): torch forms them as a lerp, optkern as
    b m + (1 - b) g, both in float32 then rounded; the params use the float32 moments before rounding."""
    ps = params_of(dtype, gen)
    pt = clones(ps)
    kw = dict(lr=1e-2, weight_decay=0.01)
    ok = getattr(okt, name)(ps, state_dtype="param", **kw)
    tt = getattr(torch.optim, name)(pt, fused=True, **kw)
    for step in range(20):
        gs = grads_for(ps, gen)
        set_grads(ps, gs)
        set_grads(pt, gs)
        before = {(i, k): tt.state[b][k].clone() for i, b in enumerate(pt) if b in tt.state
                  for k in ("exp_avg", "exp_avg_sq")}
        ok.step()
        tt.step()
        for i, (a, b) in enumerate(zip(ps, pt)):
            assert_bitwise(a, b, f"{name} step {step} param {i}")
            for k in ("exp_avg", "exp_avg_sq"):
                assert ok.state[a][k].dtype == dtype
                _within_ulp(before.get((i, k)), ok.state[a][k], tt.state[b][k], dtype, f"{name} step {step} {k} {i}")
        with torch.no_grad():  # resync the moments: the next step measures one step's error
            for a, b in zip(ps, pt):
                for k in ("exp_avg", "exp_avg_sq"):
                    ok.state[a][k].copy_(tt.state[b][k])


def _resynced_steps(ok, tt, ps, pt, keys, gen, steps, scale=1.0):
    """Per step: ours from torch's params and state, one step each; yields (i, state key or None for the param,
    torch's value before, ours, torch's) per param and state."""
    for step in range(steps):
        gs = grads_for(ps, gen, scale)
        set_grads(ps, gs)
        set_grads(pt, gs)
        before = [p.detach().clone() for p in pt]
        before_st = [{k: tt.state[b][k].clone() for k in keys if b in tt.state and k in tt.state[b]} for b in pt]
        tt.step()
        ok.step()
        for i, (a, b) in enumerate(zip(ps, pt)):
            yield i, None, before[i], a.detach(), b.detach()
            for k in keys:
                yield i, k, before_st[i].get(k), ok.state[a][k], tt.state[b][k]
        with torch.no_grad():  # resync: the next step measures one step's error
            for a, b in zip(ps, pt):
                a.copy_(b)
                for k in keys:
                    ok.state[a][k].copy_(tt.state[b][k])


def _within_ulp(before, ours, theirs, dtype, what, ulps=1):
    """|ours - theirs| <= ulps ulp of the 16-bit type at max(|theirs|, |before|) (before: the value the step read)."""
    ref = theirs.double().abs() if before is None else torch.maximum(theirs.double().abs(), before.double().abs())
    err = (ours.double() - theirs.double()).abs()
    bad = (err > ulps * ulp16(ref, dtype)).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.numel()} elements beyond {ulps} ulp, e.g. " \
                             f"{ours.flatten()[bad[0]].item()} vs {theirs.flatten()[bad[0]].item()}"


@pytest.mark.parametrize("dtype", HALF, ids=DT_ID.get)
def test_adagrad_param_state_within_ulps_of_torch_fused(dtype, gen):
    """Per step (resynced to torch's params and state): params within 2 ulps of the 16-bit type at
    max(|result|, |param before|), sums within 1 ulp; measured maxima (4 seeds x 15 steps, and this test's seeds):
    2.0 for params of either type, 0 for sums.  (With weight_decay torch's fused kernel rounds g + wd p to 16 bits before squaring it:
    the sums then differ by up to 64 ulps, so weight decay is left out.)"""
    ps = params_of(dtype, gen)
    pt = clones(ps)
    kw = dict(lr=0.05, lr_decay=0.01)
    ok = okt.Adagrad(ps, state_dtype="param", **kw)
    tt = torch.optim.Adagrad(pt, fused=True, **kw)
    for i, k, before, a, b in _resynced_steps(ok, tt, ps, pt, ("sum",), gen, 20):
        _within_ulp(before, a, b, dtype, f"Adagrad {k} {i}", 2 if k is None else 1)


@pytest.mark.parametrize("dtype", HALF, ids=DT_ID.get)
def test_sgd_param_within_ulps_of_torch_for_loop(dtype, gen):
    """Plain SGD against torch's for-loop path (foreach=False), per step (resynced): within 1 ulp (bfloat16) /
    2 ulps (float16, measured maximum 2.0 over 4 seeds x 15 steps) of max(|result|, |param before|).
    Not compared: momentum and weight decay.  torch's for-loop path rounds every tensor op to 16 bits (g + wd p,
    m buf, + g, the Nesterov direction) and then steps with the rounded direction, so its params differ from a
    single float32 pass by lr x (those roundings): measured up to 266 ulps of the param where lr |buf| >> |p|.
    optkern's SGD with momentum is checked against the functional layer instead (float32 rules, one rounding).
    torch 2.13's fused CPU SGD is no reference either: for n >= 64 it leaves most bfloat16 params unchanged."""
    ps = params_of(dtype, gen)
    pt = clones(ps)
    kw = dict(lr=0.05)
    ok = okt.SGD(ps, state_dtype="param", **kw)
    tt = torch.optim.SGD(pt, foreach=False, **kw)
    for i, _, before, a, b in _resynced_steps(ok, tt, ps, pt, (), gen, 15):
        _within_ulp(before, a, b, dtype, f"SGD {i}", 1 if dtype == torch.bfloat16 else 2)


# ==== default float32 state: the functional layer on the same arrays ================================================
FUNCTIONAL = {  # name -> (functional step, its state keys in order, kwargs)
    "Adam": (optkern.adam_step, ("exp_avg", "exp_avg_sq"), dict(lr=1e-2, weight_decay=0.01)),
    "SGD": (optkern.sgd_step, ("momentum_buffer",), dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "Adagrad": (optkern.adagrad_step, ("sum",), dict(lr=0.05, lr_decay=0.01)),
    "RMSprop": (optkern.rmsprop_step, ("square_avg",), dict(lr=1e-2, alpha=0.9)),
    "Adadelta": (optkern.adadelta_step, ("square_avg", "acc_delta"), dict(lr=0.5, rho=0.8)),
}


@pytest.mark.parametrize("dtype", HALF, ids=DT_ID.get)
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_default_float32_state_matches_functional(name, dtype, gen):
    fn, keys, kw = FUNCTIONAL[name]
    ps = params_of(dtype, gen)
    pf = [p.detach().clone() for p in ps]
    states = [[torch.zeros_like(p, dtype=torch.float32) for p in pf] for _ in keys]
    opt = getattr(okt, name)(ps, **kw)
    for step in range(1, 8):
        gs = grads_for(ps, gen)
        set_grads(ps, gs)
        opt.step()
        fn(pf, gs, *states, step=step, **kw)
        for i, (a, b) in enumerate(zip(ps, pf)):
            assert_bitwise(a, b, f"{name} step {step} param {i}")
            for k, lst in zip(keys, states):
                assert opt.state[a][k].dtype == torch.float32
                assert_bitwise(opt.state[a][k], lst[i], f"{name} step {step} {k}[{i}]")


# ==== masters ==========================================================================================================
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_split_master_equals_fp32_master_over_50_steps(name, gen):
    ps = params_of(torch.bfloat16, gen)
    pf = clones(ps)
    a = getattr(okt, name)(ps, master_weights="split", **KW[name])
    b = getattr(okt, name)(pf, master_weights="fp32", **KW[name])
    for step in range(50):
        gs = grads_for(ps, gen, 0.01)  # small updates: plain bfloat16 would stall, the masters move
        set_grads(ps, gs)
        set_grads(pf, gs)
        a.step()
        b.step()
        for i, (p, q) in enumerate(zip(ps, pf)):
            res, m = a.state[p]["master_residual"], b.state[q]["master_param"]
            assert res.dtype == torch.int16 and m.dtype == torch.float32
            assert_bitwise(optkern.master_values(p.detach(), res, "split"), m, f"{name} step {step} master {i}")
            assert_bitwise(q.detach(), m.to(torch.bfloat16), f"{name} step {step}: param = rne(master) {i}")
    moved = sum(int((b.state[q]["master_param"] != q.detach().float()).sum()) for q in pf)
    assert moved > 0  # the master holds bits the param cannot


@pytest.mark.parametrize("dtype", HALF, ids=DT_ID.get)
def test_fp32_master_matches_functional(dtype, gen):
    ps = params_of(dtype, gen)
    pf = [p.detach().clone() for p in ps]
    masters = optkern.init_masters(pf, "fp32")
    st = [[torch.zeros_like(m) for m in masters] for _ in range(2)]
    opt = okt.Adam(ps, lr=1e-2, master_weights="fp32")
    for step in range(1, 6):
        gs = grads_for(ps, gen)
        set_grads(ps, gs)
        opt.step()
        optkern.adam_step(pf, gs, *st, step=step, lr=1e-2, masters=masters, master_weights="fp32")
        for i, p in enumerate(ps):
            assert_bitwise(p, pf[i], f"param {i}")
            assert_bitwise(opt.state[p]["master_param"], masters[i], f"master {i}")


# ==== stochastic rounding ==============================================================================================
def _sr_run(name, ps0, grads, seed, threads, isa):
    prev_isa, prev_threads = optkern.cpu_isa(), optkern.get_num_threads()
    optkern.set_cpu_isa(isa)
    optkern.set_num_threads(threads)
    try:
        ps = clones(ps0)
        opt = getattr(okt, name)(ps, stochastic_rounding=True, seed=seed, **KW[name])
        for gs in grads:
            set_grads(ps, gs)
            opt.step()
        return [p.detach().clone() for p in ps]
    finally:
        optkern.set_cpu_isa(prev_isa)
        optkern.set_num_threads(prev_threads)


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
def test_stochastic_rounding_reproducible_across_threads_and_isas(name, gen):
    ps0 = params_of(torch.bfloat16, gen, sizes=(7, 4099, 33))
    grads = [grads_for(ps0, gen, 0.05) for _ in range(5)]
    ref = _sr_run(name, ps0, grads, 1234, 1, AVAILABLE_ISAS[0])
    for isa in AVAILABLE_ISAS:
        for threads in (1, 2):
            got = _sr_run(name, ps0, grads, 1234, threads, isa)
            for i, (a, b) in enumerate(zip(got, ref)):
                assert_bitwise(a, b, f"{name} {isa} {threads} threads param {i}")
    other = _sr_run(name, ps0, grads, 1235, 2, AVAILABLE_ISAS[-1])
    assert any((bits(a) != bits(b)).any() for a, b in zip(other, ref)), "another seed, the same roundings"
    rne = clones(ps0)
    opt = getattr(okt, name)(rne, **KW[name], state_dtype="float32")
    for gs in grads:
        set_grads(rne, gs)
        opt.step()
    assert any((bits(a) != bits(b)).any() for a, b in zip(rne, ref)), "stochastic rounding = round to nearest"


def test_sgd_stochastic_rounding_keys_each_step(gen):
    """torch's SGD keeps no step count; the group counts SR steps, so the same update rounds differently."""
    p = torch.nn.Parameter(torch.full((4099,), 1.0, dtype=torch.bfloat16))
    opt = okt.SGD([p], lr=1.0, stochastic_rounding=True, seed=7)
    ups = []
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.full_like(p, -2.0 ** -10)  # 1/8 of a bfloat16 ulp at 1.0: rounds up 1/8 of the time
        opt.step()
        ups.append(p.detach() != before)
        assert opt.param_groups[0]["sr_step"] == step + 1
    assert not torch.equal(ups[0], ups[1]) and not torch.equal(ups[1], ups[2])
    frac = float(torch.stack(ups).double().mean())
    assert abs(frac - 0.125) < 4 * (0.125 * 0.875 / (3 * 4099)) ** 0.5


# ==== AMP: found_inf skips everything ==================================================================================
MODES = {"param": dict(state_dtype="param"), "f32": {}, "bf16": dict(state_dtype="bfloat16"),
         "fp32": dict(master_weights="fp32"), "split": dict(master_weights="split"),
         "sr": dict(stochastic_rounding=True, seed=3)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", NAMES)
def test_found_inf_skips_everything(name, mode, gen):
    ps = params_of(torch.bfloat16, gen, sizes=(7, 33))
    opt = getattr(okt, name)(ps, **KW[name], **MODES[mode])
    for _ in range(2):  # the general path, then the cached plan
        set_grads(ps, grads_for(ps, gen))
        opt.step()
    for _ in range(2):
        before_p, before_s = snapshot(opt, ps)
        groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        set_grads(ps, grads_for(ps, gen))
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        for i, p in enumerate(ps):
            assert_bitwise(p, before_p[i], f"param {i}")
            for k, v in before_s[id(p)].items():
                assert torch.equal(opt.state[p][k], v) and opt.state[p][k].dtype == v.dtype, f"state[{k!r}]"
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_grad_scaler_skips_and_steps(gen):
    ps = params_of(torch.bfloat16, gen, sizes=(33,))
    opt = okt.Adam(ps, lr=1e-2, master_weights="fp32")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(torch.tensor(1.0))  # (GradScaler makes its scale tensor here)
    set_grads(ps, [torch.full_like(ps[0], float("inf"))])
    scaler.step(opt)
    scaler.update()
    assert not opt.state[ps[0]]  # skipped before any state existed
    g = grads_for(ps, gen)[0]
    ps[0].grad = (g.float() * scaler.get_scale()).to(torch.bfloat16)
    ref = clones(ps)
    ro = okt.Adam(ref, lr=1e-2, master_weights="fp32")
    ref[0].grad = ps[0].grad.clone()
    scaler.step(opt)
    ro.grad_scale, ro.found_inf = torch.tensor(scaler.get_scale()), torch.tensor(0.0)
    ro.step()
    assert_bitwise(ps[0], ref[0], "GradScaler step = the step with its scale")
    assert_bitwise(opt.state[ps[0]]["master_param"], ro.state[ref[0]]["master_param"], "master")


# ==== refusals: named argument, nothing touched =======================================================================
def test_constructor_refusals_name_the_argument(gen):
    h = params_of(torch.float16, gen, sizes=(7,))
    b = params_of(torch.bfloat16, gen, sizes=(7,))
    with pytest.raises(ValueError, match="master_weights.*split.*bfloat16"):
        okt.Adam(h, master_weights="split")
    with pytest.raises(ValueError, match="stochastic_rounding"):
        okt.Adam(b, master_weights="fp32", stochastic_rounding=True)
    with pytest.raises(ValueError, match="state_dtype"):
        okt.Adam(b, state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype"):
        okt.Adam(b, state_dtype=torch.float64)
    with pytest.raises(ValueError, match="state_dtype"):
        okt.Adam(b, state_dtype="float16")  # float16 state is for float16 params
    with pytest.raises(ValueError, match="master_weights"):
        okt.SGD(b, master_weights="fp16")
    with pytest.raises((TypeError, ValueError), match="seed"):
        okt.SGD(b, stochastic_rounding=True, seed=-1)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*master_weights"):
        okt.Adam([{"params": b}, {"params": h, "master_weights": "split"}])


def test_step_refusals_touch_nothing(gen):
    h = params_of(torch.float16, gen, sizes=(7, 33))
    f = params_of(torch.float32, gen, sizes=(7,))
    opt = okt.Adam([{"params": f}, {"params": h}], lr=1e-2)
    set_grads(f + h, grads_for(f + h, gen))
    opt.step()
    before_p, before_s = snapshot(opt, f + h)

    def unchanged():
        for i, p in enumerate(f + h):
            assert_bitwise(p, before_p[i], f"param {i}")
            assert set(opt.state[p]) == set(before_s[id(p)])
            for k, v in before_s[id(p)].items():
                assert torch.equal(opt.state[p][k], v)

    set_grads(f + h, grads_for(f + h, gen))
    opt.param_groups[1]["master_weights"] = "split"
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['master_weights'\]"):
        opt.step()
    unchanged()
    opt.param_groups[1]["master_weights"] = None
    opt.param_groups[1]["state_dtype"] = "float64"
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step()
    unchanged()
    opt.param_groups[1]["state_dtype"] = None
    bad = [[torch.zeros(7, dtype=torch.bfloat16)], None]
    for copies, err, pat in [
        ([[torch.zeros(8, dtype=torch.bfloat16)], None], ValueError, r"param_copies.*shape"),
        ([[torch.zeros(7, dtype=torch.float32)], None], TypeError, r"param_copies\[0\]\[0\]"),
        ([None, [torch.zeros(7, dtype=torch.bfloat16), None]], ValueError, r"param_copies\[1\]\[0\].*float32"),
        ([bad[0]], ValueError, "one entry per param group"),
    ]:
        with pytest.raises(err, match=pat):
            opt.step(param_copies=copies)
        unchanged()
    opt.step(param_copies=bad)  # and a good one steps


# ==== the offload step: float32 params, 16-bit copies ===================================================================
@pytest.mark.parametrize("cdtype", HALF, ids=DT_ID.get)
@pytest.mark.parametrize("name", NAMES)
def test_param_copies_written_in_the_same_pass(name, cdtype, gen):
    ps = params_of(torch.float32, gen)
    ref = clones(ps)
    opt = getattr(okt, name)(ps, **KW[name])
    ro = getattr(okt, name)(ref, **KW[name])
    cps = [torch.full_like(p, 7.0, dtype=cdtype) for p in ps]
    for step in range(4):
        gs = grads_for(ps, gen)
        set_grads(ps, gs)
        set_grads(ref, gs)
        opt.step(param_copies=[cps])
        ro.step()
        for i, (p, q, c) in enumerate(zip(ps, ref, cps)):
            assert_bitwise(p, q, f"step {step} param {i}")
            assert_bitwise(c, p.detach().to(cdtype), f"step {step} copy {i} = rne(param)")
        assert opt.__dict__.get("_optkern_plans") is not None and opt.__dict__["_optkern_plans"].copies


def test_param_copies_change_between_steps(gen):
    ps = params_of(torch.float32, gen, sizes=(7, 33))
    opt = okt.Adam(ps, lr=1e-2)
    for step in range(4):
        cps = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps]
        set_grads(ps, grads_for(ps, gen))
        if step == 2:
            opt.step()  # no copies this step: none written, the plans re-made
        else:
            opt.step(param_copies=[[cps[0], None]])
            assert_bitwise(cps[0], ps[0].detach().to(torch.bfloat16), f"step {step}")
        assert not cps[1].any()


# ==== state dicts ======================================================================================================
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", ["Adam", "SGD", "NAdam", "Rprop"])
def test_state_dict_round_trip_exact(name, mode, gen):
    ps = params_of(torch.bfloat16, gen, sizes=(7, 1000))
    opt = getattr(okt, name)(ps, **KW[name], **MODES[mode])
    for _ in range(3):
        set_grads(ps, grads_for(ps, gen))
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    qs = clones(ps)
    fresh = getattr(okt, name)(qs, **KW[name])  # constructed without the options: the groups bring them
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0].get("master_weights") == opt.param_groups[0].get("master_weights")
    for p, q in zip(ps, qs):
        assert set(fresh.state[q]) == set(opt.state[p])
        for k, v in opt.state[p].items():
            w = fresh.state[q][k]
            assert isinstance(w, torch.Tensor) and w.dtype == v.dtype, k
            assert_bitwise(w.reshape(-1), v.detach().reshape(-1), k)
    for _ in range(3):
        gs = grads_for(ps, gen)
        set_grads(ps, gs)
        set_grads(qs, gs)
        opt.step()
        fresh.step()
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert_bitwise(p, q, f"continued param {i}")


def test_torch_state_dict_loads_and_masters_start_from_params(gen):
    ps = params_of(torch.bfloat16, gen, sizes=(33,))
    tt = torch.optim.Adam(clones(ps), fused=True, lr=1e-2)
    tt.param_groups[0]["params"][0].grad = grads_for(ps, gen)[0]
    tt.step()
    opt = okt.Adam(ps, lr=1e-2, master_weights="fp32")
    with torch.no_grad():
        ps[0].copy_(tt.param_groups[0]["params"][0])
    opt.load_state_dict(tt.state_dict())
    assert opt.param_groups[0]["master_weights"] == "fp32"  # the constructor's, for a group torch saved
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16  # torch's state keeps its dtype
    set_grads(ps, grads_for(ps, gen))
    opt.step()
    assert opt.state[ps[0]]["master_param"].dtype == torch.float32
    assert_bitwise(ps[0], opt.state[ps[0]]["master_param"].to(torch.bfloat16), "param = rne(master)")
    back = torch.optim.Adam(clones(ps), lr=1e-2)
    back.load_state_dict(opt.state_dict())  # and the reverse loads into torch
    assert isinstance(opt, torch.optim.Adam)


# ==== the cached fast path =============================================================================================
@pytest.mark.parametrize("mode", sorted(MODES) + ["copies"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_plan_equals_fresh_plan(name, mode, gen):
    dtype = torch.float32 if mode == "copies" else torch.bfloat16
    ps = params_of(dtype, gen, sizes=(7, 4099))
    qs = clones(ps)
    kw = {} if mode == "copies" else MODES[mode]
    a = getattr(okt, name)(ps, **KW[name], **kw)
    b = getattr(okt, name)(qs, **KW[name], **kw)
    ca = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps] if mode == "copies" else None
    cb = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps] if mode == "copies" else None
    for step in range(6):
        gs = grads_for(ps, gen)
        set_grads(ps, gs)
        set_grads(qs, gs)
        a.step(param_copies=ca and [ca])
        b.__dict__.pop("_optkern_plans", None)  # a fresh plan (the general path) every step
        b.step(param_copies=cb and [cb])
        assert a.__dict__.get("_optkern_plans") is not None, "the cached path is not in use"
        if step == 3:  # rebuild after load_state_dict
            a.load_state_dict(copy.deepcopy(a.state_dict()))
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert_bitwise(p, q, f"step {step} param {i}")
            for k, v in b.state[q].items():
                if isinstance(v, torch.Tensor) and v.dim():
                    assert_bitwise(a.state[p][k], v, f"step {step} {k}[{i}]")
        if ca:
            for x, y in zip(ca, cb):
                assert_bitwise(x, y, f"step {step} copies")


def test_isinstance_and_group_keys(gen):
    ps = params_of(torch.bfloat16, gen, sizes=(7,))
    for name in NAMES:
        plain, mixed = getattr(okt, name)(ps), getattr(okt, name)(ps, master_weights="fp32", seed=5)
        assert isinstance(mixed, getattr(torch.optim, name))
        assert "master_weights" not in plain.param_groups[0] and "master_weights" not in plain.defaults
        assert mixed.param_groups[0]["master_weights"] == "fp32" and mixed.param_groups[0]["seed"] == 5
        assert "stochastic_rounding" not in mixed.param_groups[0]  # stored where they differ from the defaults
    assert np.isfinite(float(ps[0].detach().float().sum()))
