"""Global-norm clipping: optkern.global_norm / clip_grad_norm against NumPy and torch, the clip folded into the
step as grad_multiplier against torch.nn.utils.clip_grad_norm_ + torch's step, and found_inf skipping."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import optkern
from optkern import optim as ok
from reference import rel_err, torch_dtype

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the reference here: pip install torch==2.13.0")

SIZES = [0, 1, 17, 4097, 3, 1000, 0, 64]
TOL = {np.float32: 2e-5, np.float64: 1e-11}


def make_grads(rng, dtype, sizes=SIZES, scale=1.0):
    gs = [(scale * rng.standard_normal(n)).astype(dtype) for n in sizes]
    gs.append((scale * rng.standard_normal((33, 17))).astype(dtype))
    return gs


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_global_norm_l2(dtype, rng):
    gs = make_grads(rng, dtype, scale=rng.uniform(0.1, 10))
    want = np.linalg.norm(np.concatenate([g.ravel().astype(np.float64) for g in gs]))
    got = optkern.global_norm(gs, 2.0)
    assert got == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13)
    assert optkern.global_norm(gs) == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_global_norm_inf(dtype, rng):
    gs = make_grads(rng, dtype)
    gs[3][5] = -7.25  # the max-abs entry is a negative one, deep in a large tensor
    want = np.max(np.abs(np.concatenate([g.ravel() for g in gs])))
    assert optkern.global_norm(gs, math.inf) == want == 7.25


def test_global_norm_single_array_and_empty(rng):
    g = rng.standard_normal(100)
    assert optkern.global_norm(g, 2.0) == pytest.approx(np.linalg.norm(g), rel=1e-13)
    assert optkern.global_norm([np.zeros(0), np.zeros(5)], 2.0) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_clip_grad_norm_matches_torch(dtype, norm_type, rng):
    gs = make_grads(rng, dtype, scale=3.0)
    before = [g.copy() for g in gs]
    ts = []  # clip_grad_norm_ takes the params and clips their .grad
    for g in gs:
        t = torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype)
        t.grad = torch.from_numpy(g.copy())
        ts.append(t)
    max_norm = 0.1 * float(np.linalg.norm(np.concatenate([g.ravel() for g in gs]))) if norm_type == 2.0 else 1.5
    with torch_dtype(dtype):
        # (torch's inf norm refuses empty tensors; they add nothing to either norm, optkern still gets them)
        tot_t = torch.nn.utils.clip_grad_norm_([t for t in ts if t.numel()], max_norm, norm_type=norm_type)
    r = optkern.clip_grad_norm(gs, max_norm, norm_type=norm_type)
    assert isinstance(r, optkern.ClipResult)
    assert r.total_norm == pytest.approx(float(tot_t), rel=1e-6 if dtype == np.float32 else 1e-12)
    assert r.grad_multiplier == pytest.approx(min(1.0, max_norm / (r.total_norm + 1e-6)), rel=1e-15)
    assert r.grad_multiplier < 1.0 and r.found_inf is False
    for g, b in zip(gs, before):  # the grads are not modified
        np.testing.assert_array_equal(g, b)
    for g, t in zip(gs, ts):  # torch's clipped grads are the same scale times the grads
        if g.size:
            np.testing.assert_allclose(t.grad.numpy(), g * r.grad_multiplier,
                                       rtol=1e-6 if dtype == np.float32 else 1e-13,
                                       atol=1e-30)


def test_clip_no_clipping_when_below(rng):
    gs = make_grads(rng, np.float64)
    n = optkern.global_norm(gs)
    r = optkern.clip_grad_norm(gs, 10 * n)
    assert r.grad_multiplier == 1.0 and not r.found_inf


def _torch_cls(name):
    return {"Adam": torch.optim.Adam, "SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}[name]


CLIP_CASES = {
    "Adam": dict(lr=0.01, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=True),
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "AdamW"])
def test_clip_then_step_matches_torch(name, norm_type, dtype, rng):
    kw = CLIP_CASES[name]
    shapes = [(1,), (7,), (64,), (1000,), (4099,), (33, 17)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tps = [torch.from_numpy(p.copy()) for p in params]
    clipped = 0
    with torch_dtype(dtype):
        opt = getattr(ok, name)(params, **kw)
        topt = _torch_cls(name)(tps, foreach=False, **kw)
        for step in range(40):
            scale = 3.0 if step % 3 else 0.01  # some steps clip, some do not
            grads = [(scale * rng.standard_normal(p.shape)).astype(dtype) for p in params]
            max_norm = 5.0 if norm_type == 2.0 else 2.0
            for tp, g in zip(tps, grads):
                tp.grad = torch.from_numpy(g.copy())
            torch.nn.utils.clip_grad_norm_(tps, max_norm, norm_type=norm_type)
            topt.step()
            r = optkern.clip_grad_norm(grads, max_norm, norm_type=norm_type)
            clipped += r.grad_multiplier < 1.0
            opt.step(grads, grad_multiplier=r.grad_multiplier, found_inf=r.found_inf)
    assert 0 < clipped < 40
    for i, (p, tp) in enumerate(zip(params, tps)):
        err = rel_err(p, tp.numpy())
        assert err <= TOL[dtype], f"param {i}: {err:.3g}"
    for i, tp in enumerate(tps):
        for key, tv in topt.state[tp].items():
            if key == "step":
                assert opt.state[i]["step"] == int(tv)
                continue
            tv = tv.numpy()
            # a 1-element exp_avg may sit near 0 by cancellation: floor the denominator at the buffer's scale
            floor = 0.1 * max(float(np.max(np.abs(topt.state[q][key].numpy()))) for q in tps)
            err = float(np.max(np.abs(opt.state[i][key].astype(np.float64) - tv)) / max(np.max(np.abs(tv)), floor))
            assert err <= TOL[dtype], f"param {i} {key}: {err:.3g}"


def test_clip_folded_differs_from_unclipped(rng):
    """Guard: grad_multiplier must actually be applied (a step with the scale differs from one without)."""
    p1 = [rng.standard_normal(50)]
    p2 = [p1[0].copy()]
    g = [10 * rng.standard_normal(50)]
    r = optkern.clip_grad_norm(g, 1.0)
    ok.SGD(p1, lr=0.1).step(g, grad_multiplier=r.grad_multiplier)
    ok.SGD(p2, lr=0.1).step(g)
    assert r.grad_multiplier < 0.1
    np.testing.assert_allclose(p1[0], p2[0] + 0.1 * g[0] * (1 - r.grad_multiplier), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_found_inf_detected(bad, norm_type, rng):
    gs = make_grads(rng, np.float32)
    gs[3][1234] = bad
    r = optkern.clip_grad_norm(gs, 1.0, norm_type=norm_type)
    assert r.found_inf is True
    assert not math.isfinite(r.total_norm)
    with pytest.raises(RuntimeError):
        optkern.clip_grad_norm(gs, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    ok_r = optkern.clip_grad_norm(make_grads(rng, np.float32), 1.0, error_if_nonfinite=True)
    assert ok_r.found_inf is False


def _snapshot(opt):
    return copy.deepcopy(opt.state)


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            if isinstance(a[i][k], np.ndarray):
                assert a[i][k].tobytes() == b[i][k].tobytes(), (i, k)
            else:
                assert a[i][k] == b[i][k], (i, k)


OPTS = {
    "SGD": lambda ps: ok.SGD(ps, lr=0.1, momentum=0.9),
    "Adam": lambda ps: ok.Adam(ps, lr=0.01, amsgrad=True),
    "AdamW": lambda ps: ok.AdamW(ps, lr=0.01),
    "Adagrad": lambda ps: ok.Adagrad(ps, lr=0.1, lr_decay=0.01),
    "RMSprop": lambda ps: ok.RMSprop(ps, lr=0.01, centered=True, momentum=0.5),
    "Adamax": lambda ps: ok.Adamax(ps),
    "NAdam": lambda ps: ok.NAdam(ps),
    "Adadelta": lambda ps: ok.Adadelta(ps),
    "Rprop": lambda ps: ok.Rprop(ps),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(OPTS))
def test_found_inf_step_changes_nothing(name, dtype, rng):
    params = [rng.standard_normal(n).astype(dtype) for n in (1, 17, 4097)]
    opt = OPTS[name](params)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(dtype) for p in params])
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
    grads[1][3] = np.nan
    r = optkern.clip_grad_norm(grads, 1.0)
    assert r.found_inf
    p_before = [p.copy() for p in params]
    s_before = _snapshot(opt)
    opt.step(grads, grad_multiplier=r.grad_multiplier, found_inf=r.found_inf)
    opt.step(grads, found_inf=True)
    for p, q in zip(params, p_before):
        assert p.tobytes() == q.tobytes()
    _assert_state_equal(opt.state, s_before)
    assert all(st["step"] == 3 for st in opt.state.values())
    # and a normal step afterwards still moves things (the guard above is not vacuous)
    opt.step([rng.standard_normal(p.shape).astype(dtype) for p in params])
    assert all(st["step"] == 4 for st in opt.state.values())
    assert any(p.tobytes() != q.tobytes() for p, q in zip(params, p_before))


def test_found_inf_before_first_step_creates_no_progress(rng):
    params = [rng.standard_normal(10)]
    before = params[0].copy()
    opt = ok.Adam(params)
    opt.step([rng.standard_normal(10)], found_inf=True)
    assert params[0].tobytes() == before.tobytes()
    assert all(st["step"] == 0 for st in opt.state.values())


def test_found_inf_functional(rng):
    p = rng.standard_normal(100)
    m, v = rng.standard_normal(100) ** 2, rng.standard_normal(100) ** 2
    copies = [x.copy() for x in (p, m, v)]
    g = rng.standard_normal(100)
    optkern.adam_step(p, g, m, v, step=5, lr=0.1, found_inf=True)
    for x, c in zip((p, m, v), copies):
        assert x.tobytes() == c.tobytes()
    optkern.adam_step(p, g, m, v, step=5, lr=0.1, found_inf=False)
    assert p.tobytes() != copies[0].tobytes()


@pytest.mark.parametrize("max_norm", [-1.0, -1e-9, float("nan"), float("inf")])
def test_bad_max_norm_raises(max_norm, rng):
    with pytest.raises(ValueError):
        optkern.clip_grad_norm([rng.standard_normal(5)], max_norm)


@pytest.mark.parametrize("norm_type", [1.0, 0.0, 3.0, -math.inf])
def test_unsupported_norm_type_raises(norm_type, rng):
    with pytest.raises(ValueError):
        optkern.clip_grad_norm([rng.standard_normal(5)], 1.0, norm_type=norm_type)
    with pytest.raises(ValueError):
        optkern.global_norm([rng.standard_normal(5)], norm_type)


def test_clip_result_field_renamed_and_numbers_checked():
    """ClipResult.grad_multiplier (the old name grad_scale meant a divisor in torch: it fails loudly); max_norm and
    norm_type are real numbers."""
    r = optkern.clip_grad_norm([np.ones(4)], 1.0)
    assert r._fields == ("total_norm", "grad_multiplier", "found_inf")
    with pytest.raises(AttributeError, match="renamed grad_multiplier"):
        r.grad_scale
    for bad, exc in [(10**400, ValueError), ("1", TypeError), (True, TypeError), (None, TypeError)]:
        with pytest.raises(exc, match=r"^max_norm"):
            optkern.clip_grad_norm([np.ones(4)], bad)
        with pytest.raises(exc, match=r"^norm_type"):
            optkern.global_norm([np.ones(4)], bad)
    with pytest.raises(TypeError, match=r"^grad_scale: renamed grad_multiplier"):
        ok.SGD([np.zeros(4)], lr=0.1).step([np.ones(4)], grad_scale=r.grad_multiplier)
