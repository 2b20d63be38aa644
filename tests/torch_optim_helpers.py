"""Helpers for tests/test_torch_optim.py: the optkern.torch optimizers against torch.optim.

Imported only after ``pytest.importorskip("torch")`` has succeeded in the test module.
"""

from __future__ import annotations

import copy
import math

import torch

NAMES = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop")
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}

# the 7 params of the parity runs: SIMD tails (1, 7, 33, 4099), a 2-D one and a channels_last conv weight
SHAPES = [(1,), (7,), (33,), (1000,), (4099,), (33, 17), (8, 3, 3, 3)]
CHANNELS_LAST = {6}


def grad_pattern(step: int, i: int) -> bool:
    """Whether param i has a grad in step `step` (0-based) of a parity run: some params skip some steps, one starts
    late; between the changes the set of params with grads stays the same for a while (the steady state)."""
    if i == 1:
        return not (3 <= step < 6) and step != 20
    if i == 3:
        return not (10 <= step < 15)
    if i == 5:
        return step not in (12, 30)
    if i == 6:
        return step >= 5              # grads (and state) only from step 5 on
    return True


def make_params(dtypes, gen: torch.Generator, shapes=SHAPES, channels_last=CHANNELS_LAST):
    """Parameters with the given shapes; dtypes is one dtype or a list aligned with shapes."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    out = []
    for i, (s, dt) in enumerate(zip(shapes, dtypes)):
        t = torch.randn(s, generator=gen, dtype=torch.float64).to(dt)
        if i in channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t))
    return out


def clone_params(params):
    """Independent copies (clone keeps the memory format)."""
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grad(p: torch.Tensor, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A fresh random grad in the param's dtype and memory layout."""
    g = torch.empty_like(p.detach())
    g.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).mul_(scale))
    return g


def set_grads(param_lists, grads):
    """param_lists: several aligned lists of params; grads: one entry per param (None: no grad)."""
    for ps in param_lists:
        for p, g in zip(ps, grads):
            p.grad = None if g is None else g.clone()


def drive(opts, param_lists, steps, gen, has_grad=lambda s, i: True, before_step=None, after_step=None,
          start=0):
    """Steps every optimizer `steps` times with the same fresh grads (param_lists[k] are opts[k]'s params)."""
    for s in range(start, start + steps):
        if before_step is not None:
            before_step(s)
        grads = [make_grad(p, gen) if has_grad(s, i) else None for i, p in enumerate(param_lists[0])]
        set_grads(param_lists, grads)
        for o in opts:
            o.step()
        if after_step is not None:
            after_step(s)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (NaNs must sit at the same places; b == 0 everywhere needs a == b)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return math.inf
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return math.inf
    a = torch.where(na, torch.zeros_like(a), a)
    b = torch.where(nb, torch.zeros_like(b), b)
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().max())
    den = float(b.abs().max())
    if den == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / den


def same_value(a, b) -> bool:
    """Exact equality of hyperparameters / state entries (tensors by value, dtype and device)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and \
            bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assert_state_close(ok_st, t_st, where: str) -> None:
    """One param's state: same keys in the same order, same dtypes/devices/shapes/strides, `step` identical,
    every tensor within TOL of its dtype."""
    if t_st is None or len(t_st) == 0:
        assert not ok_st, f"{where}: optkern has state {list(ok_st.keys())}, torch has none"
        return
    assert ok_st is not None and len(ok_st) > 0, f"{where}: torch has state {list(t_st.keys())}, optkern none"
    assert list(ok_st.keys()) == list(t_st.keys()), f"{where}: state keys {list(ok_st.keys())} != torch's " \
                                                    f"{list(t_st.keys())}"
    for k, tv in t_st.items():
        ov = ok_st[k]
        if not isinstance(tv, torch.Tensor):
            assert same_value(ov, tv), f"{where}: state[{k!r}] = {ov!r}, torch {tv!r}"
            continue
        assert isinstance(ov, torch.Tensor), f"{where}: state[{k!r}] is {type(ov).__name__}, torch has a tensor"
        assert ov.dtype == tv.dtype and ov.device == tv.device and ov.shape == tv.shape, \
            f"{where}: state[{k!r}] {ov.dtype}/{ov.device}/{tuple(ov.shape)} != torch's " \
            f"{tv.dtype}/{tv.device}/{tuple(tv.shape)}"
        if ov.dim() > 0:
            assert ov.stride() == tv.stride(), f"{where}: state[{k!r}] strides {ov.stride()} != {tv.stride()}"
        if k == "step":
            assert torch.equal(ov, tv), f"{where}: step {ov} != torch's {tv}"
            continue
        e = rel_err(ov, tv)
        assert e <= TOL[tv.dtype], f"{where}: state[{k!r}] rel err {e:.3g} > {TOL[tv.dtype]:g}"


def assert_groups_equal(ok_opt, t_opt, where: str = "") -> None:
    """Every param group's hyperparameters (everything but `params`) equal, keys in the same order."""
    assert len(ok_opt.param_groups) == len(t_opt.param_groups)
    for gi, (og, tg) in enumerate(zip(ok_opt.param_groups, t_opt.param_groups)):
        ok_keys = [k for k in og if k != "params"]
        t_keys = [k for k in tg if k != "params"]
        assert ok_keys == t_keys, f"{where} param_groups[{gi}] keys {ok_keys} != torch's {t_keys}"
        for k in t_keys:
            assert same_value(og[k], tg[k]), f"{where} param_groups[{gi}][{k!r}]: {og[k]!r} != torch's {tg[k]!r}"


def assert_same_run(ok_opt, t_opt, ok_params, t_params, where: str = "") -> None:
    """Params within TOL, per-param state as assert_state_close, the same params holding state."""
    for i, (po, pt) in enumerate(zip(ok_params, t_params)):
        assert po.dtype == pt.dtype and po.stride() == pt.stride()
        e = rel_err(po, pt)
        assert e <= TOL[pt.dtype], f"{where} param {i} {tuple(pt.shape)} {pt.dtype}: rel err {e:.3g}"
        assert_state_close(ok_opt.state.get(po), t_opt.state.get(pt), f"{where} param {i} {tuple(pt.shape)}")


def snapshot(opt, params):
    """Deep copies of params and of the whole state (keyed by the params' positions)."""
    pos = {id(p): i for i, p in enumerate(params)}
    state = {}
    for p, st in opt.state.items():
        state[pos[id(p)]] = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                             for k, v in st.items()}
    return [p.detach().clone() for p in params], state


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def assert_unchanged(opt, params, snap, where: str = "") -> None:
    """Params, every state tensor and step count bitwise equal to the snapshot; no state created."""
    ps, state = snap
    for i, (p, p0) in enumerate(zip(params, ps)):
        assert _identical(p.detach(), p0), f"{where}: param {i} changed"
    pos = {id(p): i for i, p in enumerate(params)}
    now = {pos[id(p)]: st for p, st in opt.state.items()}
    assert sorted(i for i, st in now.items() if st) == sorted(i for i, st in state.items() if st), \
        f"{where}: params holding state changed: {sorted(now)} (was {sorted(state)})"
    for i, st0 in state.items():
        st = now.get(i, {})
        assert list(st.keys()) == list(st0.keys()), f"{where}: param {i} state keys {list(st)} != {list(st0)}"
        for k, v0 in st0.items():
            v = st[k]
            if isinstance(v0, torch.Tensor):
                assert isinstance(v, torch.Tensor) and _identical(v.detach(), v0), \
                    f"{where}: param {i} state[{k!r}] changed"
            else:
                assert v == v0, f"{where}: param {i} state[{k!r}] changed: {v0!r} -> {v!r}"


def steps_of(opt, p) -> float | None:
    st = opt.state.get(p)
    if not st or "step" not in st:
        return None
    s = st["step"]
    return float(s.item()) if isinstance(s, torch.Tensor) else float(s)
