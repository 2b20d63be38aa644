"""state_dict / load_state_dict: snapshots that resume bit for bit, in the params' own array library."""

import numpy as np
import pytest

from optkern import optim

torch = pytest.importorskip("torch")

CONFIGS = [
    (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.SGD, dict(lr=0.1)),
    (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (optim.AdamW, dict(lr=0.01, betas=(0.8, 0.9))),
    (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    (optim.Adamax, dict(lr=0.01, weight_decay=0.01)),
    (optim.NAdam, dict(lr=0.01, momentum_decay=0.01)),
    (optim.Adadelta, dict(lr=0.5, rho=0.8)),
    (optim.Rprop, dict(lr=0.01, etas=(0.4, 1.3))),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(CONFIGS)]
SHAPES = [(5,), (3, 4), (17,)]


def _bits_equal(a, b):
    a, b = _np(a), _np(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _np(a):
    if isinstance(a, torch.Tensor):
        return np.ascontiguousarray(a.detach().numpy())
    return np.ascontiguousarray(a)


def _grads(rng, k, dtype=np.float32):
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(k)]


def _assert_state_equal(s1, s2):
    assert set(s1) == set(s2)
    for i in s1:
        assert set(s1[i]) == set(s2[i]), i
        for key, v in s1[i].items():
            w = s2[i][key]
            if hasattr(v, "shape"):
                assert _bits_equal(v, w), (i, key)
            else:
                assert v == w, (i, key)


def _copy_sd(sd):
    return {"state": {i: {k: (_np(v).copy() if hasattr(v, "shape") else v) for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resume_is_bitwise_identical(rng, cls, kw, dtype):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    opt = cls(params, **kw)
    grads = _grads(rng, 7, dtype)
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()
    saved = _copy_sd(sd)
    at_k = [p.copy() for p in params]
    for g in grads[3:]:
        opt.step(g)
    # snapshot: later steps changed nothing in the state_dict
    _assert_state_equal(sd["state"], saved["state"])
    assert any(not _bits_equal(sd["state"][0][k], opt.state[0][k]) for k in sd["state"][0] if k != "step"
               and hasattr(sd["state"][0][k], "shape")) or not opt.state[0].keys() - {"step"}
    assert sd["state"][0]["step"] == 3 and opt.state[0]["step"] == 7

    fresh = cls(at_k, lr=123.0) if cls is not optim.Rprop else cls(at_k)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == kw.get("lr", opt.param_groups[0]["lr"])
    for g in grads[3:]:
        fresh.step(g)
    for a, b in zip(at_k, params):
        assert _bits_equal(a, b)
    _assert_state_equal(fresh.state, opt.state)
    for st in fresh.state.values():
        for v in st.values():
            if hasattr(v, "shape"):
                assert type(v) is np.ndarray and v.dtype == dtype
    # the loaded state is a copy: stepping the fresh optimizer did not write into the state_dict
    _assert_state_equal(sd["state"], saved["state"])


@pytest.mark.parametrize("cls,kw", CONFIGS[::2], ids=IDS[::2])
def test_resume_with_torch_tensors(rng, cls, kw):
    params = [torch.tensor(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = cls(params, **kw)
    grads = [[torch.tensor(g) for g in gs] for gs in _grads(rng, 5)]
    for g in grads[:2]:
        opt.step(g)
    sd = opt.state_dict()
    for st in sd["state"].values():
        for v in st.values():
            if hasattr(v, "shape"):
                assert isinstance(v, torch.Tensor)
    at_k = [p.clone() for p in params]
    for g in grads[2:]:
        opt.step(g)
    fresh = cls(at_k, **kw)
    fresh.load_state_dict(sd)
    for g in grads[2:]:
        fresh.step(g)
    for a, b in zip(at_k, params):
        assert _bits_equal(a, b)
    _assert_state_equal(fresh.state, opt.state)
    for st in fresh.state.values():
        for v in st.values():
            if hasattr(v, "shape"):
                assert isinstance(v, torch.Tensor)


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_state_is_numpy_for_numpy_params(rng, cls, kw):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = cls(params, **kw)
    opt.step(_grads(rng, 1)[0])
    assert set(opt.state) == {0, 1, 2}
    for i, st in opt.state.items():
        assert st["step"] == 1
        for v in st.values():
            if hasattr(v, "shape"):
                assert type(v) is np.ndarray and v.shape == SHAPES[i]
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1, 2]]
    for i, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                assert type(v) is np.ndarray and v is not opt.state[i][k]


WITH_BUFFERS = [(c, k) for c, k in CONFIGS if not (c is optim.SGD and "momentum" not in k)]  # plain SGD: no buffers


@pytest.mark.parametrize("cls,kw", WITH_BUFFERS, ids=[i for i, c in zip(IDS, CONFIGS) if c in WITH_BUFFERS])
def test_load_rejects_mismatching_shapes(rng, cls, kw):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = cls(params, **kw)
    opt.step(_grads(rng, 1)[0])
    sd = opt.state_dict()
    other = [rng.standard_normal(s).astype(np.float32) for s in [(5,), (4, 3), (17,)]]
    o2 = cls(other, **kw)
    state_before = o2.state_dict()
    with pytest.raises(ValueError, match="state_dict"):
        o2.load_state_dict(sd)
    _assert_state_equal(o2.state_dict()["state"], state_before["state"])


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_load_rejects_mismatching_groups(rng, cls, kw):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = cls(params, **kw)
    opt.step(_grads(rng, 1)[0])
    sd = opt.state_dict()
    two = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    o2 = cls([{"params": two[:2]}, {"params": two[2:]}], **kw)
    with pytest.raises(ValueError, match="state_dict"):
        o2.load_state_dict(sd)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict(o2.state_dict())
    fewer = cls(two[:2], **kw)
    with pytest.raises(ValueError, match="state_dict"):
        fewer.load_state_dict(sd)
    assert fewer.state == {}


def test_two_groups_round_trip(rng):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = optim.Adam([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "betas": (0.5, 0.6)}], lr=0.01)
    grads = _grads(rng, 4)
    for g in grads[:2]:
        opt.step(g)
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1, 2]]
    assert sd["param_groups"][0]["lr"] == 0.1 and sd["param_groups"][1]["betas"] == (0.5, 0.6)
    at_k = [p.copy() for p in params]
    fresh = optim.Adam([{"params": at_k[:1]}, {"params": at_k[1:]}], lr=0.5)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[1]["betas"] == (0.5, 0.6) and fresh.param_groups[1]["lr"] == 0.01
    for g in grads[2:]:
        opt.step(g)
        fresh.step(g)
    for a, b in zip(at_k, params):
        assert _bits_equal(a, b)


def test_load_rejects_bad_hyperparameters_in_state_dict(rng):
    params = [rng.standard_normal(5).astype(np.float32)]
    opt = optim.Adam(params, lr=0.01)
    sd = opt.state_dict()
    sd["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"betas"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
