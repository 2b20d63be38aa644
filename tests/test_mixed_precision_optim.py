"""16-bit training in optkern.optim's classes (issue 14): state_dtype, master_weights ("fp32", "split"),
stochastic_rounding with its seed, and the offload step (float32 params, 16-bit grads, param_copies).

The functional layer is the reference: its kernels are checked against float64 transcriptions elsewhere, so here
every class, in every mode, must equal the functional step bit for bit (params, every state buffer, masters and
copies) over a few steps of fresh random data, with state buffers the test builds itself (initial values rounded to
the state dtype).  Then: state_dict round trips that continue bit for bit, "split" masters equal to "fp32" masters
over 50 steps, refusals that name the argument and touch nothing, stochastic rounding identical across thread
counts and instruction sets, on NumPy (ml_dtypes.bfloat16, float16) and torch CPU tensors.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import optkern
import pytest
from conftest import AVAILABLE_ISAS
from optkern import optim

torch = pytest.importorskip("torch")

BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
NP_DTYPES = {"bfloat16": BF16, "float16": F16, "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float64": torch.float64, "int16": torch.int16}

# class, its keywords, its functional step, its state buffers (name, initial value) in the functional order
CLASSES = [
    (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), optkern.sgd_step,
     (("momentum_buffer", 0.0),)),
    (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1), optkern.adam_step,
     (("exp_avg", 0.0), ("exp_avg_sq", 0.0), ("max_exp_avg_sq", 0.0))),
    (optim.AdamW, dict(lr=0.01, betas=(0.8, 0.9)), optkern.adamw_step, (("exp_avg", 0.0), ("exp_avg_sq", 0.0))),
    (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1), optkern.adagrad_step,
     (("sum", 0.1),)),
    (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5), optkern.rmsprop_step,
     (("square_avg", 0.0), ("grad_avg", 0.0), ("momentum_buffer", 0.0))),
    (optim.Adamax, dict(lr=0.01, weight_decay=0.01), optkern.adamax_step, (("exp_avg", 0.0), ("exp_inf", 0.0))),
    (optim.NAdam, dict(lr=0.01, momentum_decay=0.01), optkern.nadam_step, (("exp_avg", 0.0), ("exp_avg_sq", 0.0))),
    (optim.Adadelta, dict(lr=0.5, rho=0.8), optkern.adadelta_step, (("square_avg", 0.0), ("acc_delta", 0.0))),
    (optim.Rprop, dict(lr=0.01, etas=(0.4, 1.3)), optkern.rprop_step, (("prev", 0.0), ("step_size", 0.01))),
]
IDS = [c.__name__ for c, *_ in CLASSES]
SHAPES = [(5,), (3, 11), (37,)]  # SIMD tails (8 and 16 lanes) in every param

# mode: (param dtype, grad dtype, class / functional keywords, copy dtype or None)
MODES = {
    "bf16-state_f32": ("bfloat16", "bfloat16", {}, None),
    "bf16-state_bf16": ("bfloat16", "bfloat16", {"state_dtype": "bfloat16"}, None),
    "bf16-state_param": ("bfloat16", "bfloat16", {"state_dtype": "param"}, None),
    "fp16-state_f32": ("float16", "float16", {}, None),
    "fp16-state_bf16": ("float16", "float16", {"state_dtype": "bfloat16"}, None),
    "fp16-state_param": ("float16", "float16", {"state_dtype": "param"}, None),
    "bf16-master_fp32": ("bfloat16", "bfloat16", {"master_weights": "fp32"}, None),
    "fp16-master_fp32": ("float16", "float16", {"master_weights": "fp32"}, None),
    "bf16-master_split": ("bfloat16", "bfloat16", {"master_weights": "split"}, None),
    "bf16-sr": ("bfloat16", "bfloat16", {"stochastic_rounding": True, "seed": 1234}, None),
    "fp16-sr": ("float16", "float16", {"stochastic_rounding": True, "seed": 2**63 + 5}, None),
    "offload-bf16": ("float32", "bfloat16", {}, "bfloat16"),
    "offload-fp16": ("float32", "float16", {}, "float16"),
}
MASTER_KEYS = {"fp32": "master_param", "split": "master_residual"}


@pytest.fixture
def once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent (the class layer's bookkeeping): runs once under the best path")


# ---- arrays in NumPy, torch (CPU), torch CUDA ("cuda") or CuPy ------------------------------------------------------
def make(lib, values, dtype: str):
    """float64 values as an array of ``dtype`` (through float32, rounded to nearest even)."""
    a = np.asarray(values, dtype=np.float32).astype(NP_DTYPES[dtype])
    if lib == "numpy":
        return a
    if lib == "cupy":
        import cupy

        return cupy.asarray(a)
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(a)
    return t.cuda() if lib == "cuda" else t


def full(lib, shape, value, dtype: str):
    if lib == "numpy":
        return np.full(shape, value, dtype=NP_DTYPES[dtype])
    if lib == "cupy":
        import cupy

        return cupy.full(shape, value, dtype=dtype)
    return torch.full(shape, value, dtype=TORCH_DTYPES[dtype], device="cuda" if lib == "cuda" else "cpu")


def lib_of(a) -> str:
    if isinstance(a, np.ndarray):
        return "numpy"
    if isinstance(a, torch.Tensor):
        return "cuda" if a.is_cuda else "torch"
    return "cupy"


def dname(a) -> str:
    return optkern.precision.dtype_name(a)


def bits(a) -> np.ndarray:
    """The array's bytes (a copy), for bitwise comparison."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().contiguous()
        a = a.view(torch.int16).numpy() if a.dtype in (torch.bfloat16, torch.float16) else a.numpy()
    elif not isinstance(a, np.ndarray):
        a = a.get()  # CuPy
    return np.ascontiguousarray(a).view(np.uint8).copy()


def same(a, b) -> bool:
    """Equal bit for bit (dtype and shape too; the library may differ)."""
    return dname(a) == dname(b) and tuple(a.shape) == tuple(b.shape) and np.array_equal(bits(a), bits(b))


def clone(a):
    return a.clone() if isinstance(a, torch.Tensor) else a.copy()


def snapshot(opt, params):
    """Params, state (arrays as bytes) and group settings: what a refused call must leave as it was."""
    state = {i: {k: (dname(v), bits(v)) if hasattr(v, "shape") else v for k, v in st.items()}
             for i, st in opt.state.items()}
    return [bits(p) for p in params], state, [{k: v for k, v in g.items() if k != "params"}
                                              for g in opt.param_groups]


def assert_snapshot_equal(a, b):
    assert len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0])), "params changed"
    assert a[1].keys() == b[1].keys(), "state entries changed"
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys(), i
        for k, v in a[1][i].items():
            w = b[1][i][k]
            if isinstance(v, tuple):
                assert v[0] == w[0] and np.array_equal(v[1], w[1]), (i, k)
            else:
                assert v == w, (i, k)
    assert a[2] == b[2], "group settings changed"


# ---- the reference: the functional layer on the test's own state ------------------------------------------------
class Functional:
    """The functional steps over states built here, stepping like the class (one call for all params)."""

    def __init__(self, fn, spec, kw, params, mode_kw):
        self.fn, self.spec, self.params = fn, spec, params
        self.kw = {k: v for k, v in kw.items() if k != "initial_accumulator_value"}
        pd = dname(params[0])
        sd = optkern.precision.resolve_state_dtype(pd, mode_kw.get("state_dtype"))
        lib = lib_of(params[0])
        self.states = [[full(lib, tuple(p.shape), v, sd) for p in params] for _, v in spec]
        self.mw = mode_kw.get("master_weights")
        self.masters = optkern.init_masters(params, self.mw) if self.mw else None
        self.sr = {k: mode_kw[k] for k in ("stochastic_rounding", "seed") if k in mode_kw}
        self.t, self.mu = 0, 1.0

    def step(self, grads, copies=None):
        self.t += 1
        extra = dict(self.sr)
        if self.mw:
            extra.update(master_weights=self.mw, masters=self.masters)
        if copies is not None:
            extra["param_copies"] = copies
        if self.fn is optkern.nadam_step:
            self.mu = self.fn(self.params, grads, *self.states, step=self.t, mu_product=self.mu, **self.kw, **extra)
        else:
            self.fn(self.params, grads, *self.states, step=self.t, **self.kw, **extra)

    def assert_matches(self, opt, params):
        for i, (p, q) in enumerate(zip(params, self.params)):
            assert same(p, q), f"params[{i}] differs from the functional step"
            st = opt.state[i]
            assert st["step"] == self.t
            for (name, _), arrays in zip(self.spec, self.states):
                assert same(st[name], arrays[i]), f"state[{i}][{name!r}]"
            if self.mw:
                assert same(st[MASTER_KEYS[self.mw]], self.masters[i]), f"state[{i}] master"
                assert MASTER_KEYS["fp32" if self.mw == "split" else "split"] not in st
            else:
                assert not set(st) & set(MASTER_KEYS.values())
            if self.fn is optkern.nadam_step:
                assert st["mu_product"] == self.mu


def setup(lib, mode, cls, kw, fn, spec, rng, shapes=SHAPES):
    pd, gd, mkw, cd = MODES[mode]
    init = [rng.standard_normal(s) for s in shapes]
    params = [make(lib, v, pd) for v in init]
    opt = cls(params, **kw, **mkw)
    ref = Functional(fn, spec, kw, [clone(p) for p in params], mkw)

    def data():
        grads = [make(lib, rng.standard_normal(s), gd) for s in shapes]
        copies = None if cd is None else [full(lib, s, 0.0, cd) for s in shapes]
        return grads, copies

    return opt, params, ref, data


def step_both(opt, params, ref, grads, copies):
    """One class step and one functional step on the same data; the copies checked."""
    rc = None if copies is None else [clone(c) for c in copies]
    opt.step(grads, param_copies=copies)
    ref.step([clone(g) for g in grads], rc)
    if copies is not None:
        assert all(same(a, b) for a, b in zip(copies, rc)), "param_copies differ"
        for c, p in zip(copies, params):  # the copy is the updated float32 param rounded to nearest
            assert same(c, make("numpy", bits(p).view(np.float32).reshape(tuple(p.shape)), dname(c)))


# ---- class == functional, bit for bit ---------------------------------------------------------------------------
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cls,kw,fn,spec", CLASSES, ids=IDS)
def test_class_equals_functional_bitwise(once, rng, lib, mode, cls, kw, fn, spec):
    """(Once, under the best path: the kernels' paths are compared with each other by the functional layer's tests
    and, for stochastic rounding, below.)"""
    opt, params, ref, data = setup(lib, mode, cls, kw, fn, spec, rng)
    start = [bits(p) for p in params]
    for _ in range(4):
        step_both(opt, params, ref, *data())
        ref.assert_matches(opt, params)
    # (not every param: a 16-bit param may be stale, its updates under half an ulp, e.g. Adadelta's first steps)
    assert any(not np.array_equal(a, bits(p)) for a, p in zip(start, params)), "no param changed"
    pd, _, mkw, _ = MODES[mode]
    sd = optkern.precision.resolve_state_dtype(pd, mkw.get("state_dtype"))
    assert all(dname(opt.state[0][name]) == sd for name, _ in spec)
    g = opt.param_groups[0]
    assert {k: g[k] for k in ("state_dtype", "master_weights", "stochastic_rounding", "seed")} == \
        {"state_dtype": None, "master_weights": None, "stochastic_rounding": False, "seed": 0, **mkw}


def test_state_dtype_given_as_a_dtype_object_is_kept_by_name(once, rng):
    for lib, dt in (("numpy", BF16), ("numpy", ml_dtypes.bfloat16), ("torch", torch.bfloat16)):
        opt = optim.Adam([make(lib, rng.standard_normal(4), "float16")], state_dtype=dt)
        assert opt.param_groups[0]["state_dtype"] == "bfloat16"
        opt.step([make(lib, rng.standard_normal(4), "float16")])
        assert dname(opt.state[0]["exp_avg"]) == "bfloat16"


def test_per_group_modes_and_mixed_dtypes_in_one_group(once, rng):
    """Groups with their own modes; a group of bfloat16 and float32 params (default state dtype) steps in one call
    per dtype; each call equals the functional step on its params."""
    shapes = [(7,), (9,), (4, 5), (33,)]
    vals = [rng.standard_normal(s) for s in shapes]
    p = [make("numpy", vals[0], "bfloat16"), make("numpy", vals[1], "float32"), make("numpy", vals[2], "bfloat16"),
         make("numpy", vals[3], "float16")]
    opt = optim.Adam([{"params": p[:3]}, {"params": p[3:], "master_weights": "fp32", "state_dtype": "param"}],
                     lr=0.01)
    spec, kw = (("exp_avg", 0.0), ("exp_avg_sq", 0.0)), {"lr": 0.01}
    refs = [Functional(optkern.adam_step, spec, kw, [clone(p[0]), clone(p[2])], {}),
            Functional(optkern.adam_step, spec, kw, [clone(p[1])], {}),
            Functional(optkern.adam_step, spec, kw, [clone(p[3])], {"master_weights": "fp32", "state_dtype": "param"})]
    for _ in range(3):
        g = [make("numpy", rng.standard_normal(s), dname(q)) for s, q in zip(shapes, p)]
        opt.step(g)
        refs[0].step([clone(g[0]), clone(g[2])])
        refs[1].step([clone(g[1])])
        refs[2].step([clone(g[3])])
    for ref, idx in zip(refs, ([0, 2], [1], [3])):
        for k, i in enumerate(idx):
            assert same(p[i], ref.params[k])
            assert same(opt.state[i]["exp_avg_sq"], ref.states[1][k])
    assert same(opt.state[3]["master_param"], refs[2].masters[0])
    assert dname(opt.state[0]["exp_avg"]) == "float32" and dname(opt.state[3]["exp_avg"]) == "float16"


def test_offload_grad_and_copy_dtypes_may_change_between_steps(once, rng):
    """float32 params: grads of several dtypes in one step, copies for some params only, and a different mix each
    step (the group's cached call is planned again when its dtypes do not fit): each call equals the functional
    step on its params."""
    shapes = [(6,), (17,), (3, 3)]
    p = [make("numpy", rng.standard_normal(s), "float32") for s in shapes]
    opt = optim.AdamW(p, lr=0.01)
    ref = [Functional(optkern.adamw_step, CLASSES[2][3], {"lr": 0.01}, [clone(q)], {}) for q in p]
    bf, none, mixed = ("bfloat16",) * 3, (None,) * 3, ("float32", "bfloat16", "float16")
    plans = [(bf, none), (bf, none), (mixed, none), (bf, bf), (bf, bf), (mixed, (None, "float16", "bfloat16")),
             (("float32",) * 3, none), (("float16",) * 3, ("float16", None, "float16")), (("float32",) * 3, none)]
    for gds, cds in plans:
        g = [make("numpy", rng.standard_normal(s), d) for s, d in zip(shapes, gds)]
        c = [None if d is None else full("numpy", s, 0.0, d) for s, d in zip(shapes, cds)]
        opt.step(g, param_copies=None if all(x is None for x in c) else c)
        for i in range(3):
            rc = None if c[i] is None else [clone(c[i])]
            ref[i].step([clone(g[i])], rc)
            assert same(p[i], ref[i].params[0]) and same(opt.state[i]["exp_avg"], ref[i].states[0][0])
            if c[i] is not None:
                assert same(c[i], rc[0]) and same(c[i], make("numpy", p[i], cds[i]))


def test_stochastic_rounding_is_keyed_by_the_position_in_the_call(once, rng):
    """The compiled step keys stochastic rounding by the tensor's position in its call (no per-tensor key can be
    passed): a group's first param draws what a functional call on that group alone draws, whatever the group's
    place among the groups; with one seed for both groups their first params share a stream, which a seed per
    group avoids."""
    v = rng.standard_normal(4096)
    g = rng.standard_normal(4096)
    a, b = make("numpy", v, "bfloat16"), make("numpy", v, "bfloat16")
    opt = optim.SGD([{"params": [a]}, {"params": [b]}], lr=1e-3, stochastic_rounding=True, seed=7)
    opt.step([make("numpy", g, "bfloat16"), make("numpy", g, "bfloat16")])
    r = make("numpy", v, "bfloat16")
    optkern.sgd_step([r], [make("numpy", g, "bfloat16")], step=1, lr=1e-3, stochastic_rounding=True, seed=7)
    assert same(a, r) and same(b, r)
    near = make("numpy", v, "bfloat16")
    optkern.sgd_step([near], [make("numpy", g, "bfloat16")], step=1, lr=1e-3)
    assert not same(r, near), "stochastic rounding rounded every element to nearest"
    c, d = make("numpy", v, "bfloat16"), make("numpy", v, "bfloat16")
    opt = optim.SGD([{"params": [c], "seed": 1}, {"params": [d], "seed": 2}], lr=1e-3, stochastic_rounding=True)
    opt.step([make("numpy", g, "bfloat16"), make("numpy", g, "bfloat16")])
    assert not same(c, d)


# ---- state_dict ---------------------------------------------------------------------------------------------------
def continue_together(opt, params, other, theirs, data, steps=2):
    """Two optimizers at the same point take the same steps: params, copies and every state entry stay equal."""
    for _ in range(steps):
        grads, copies = data()
        c2 = None if copies is None else [clone(c) for c in copies]
        opt.step(grads, param_copies=copies)
        other.step([clone(g) for g in grads], param_copies=c2)
        assert all(same(a, b) for a, b in zip(params, theirs))
        assert copies is None or all(same(a, b) for a, b in zip(copies, c2))
    for i, st in opt.state.items():
        assert other.state[i].keys() == st.keys()
        for k, v in st.items():
            assert same(other.state[i][k], v) if hasattr(v, "shape") else other.state[i][k] == v, (i, k)


def _saved(sd):
    """A state_dict's copy that later steps cannot change (arrays copied in their library)."""
    return copy.deepcopy(sd)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("mode", ["bf16-state_bf16", "fp16-state_param", "fp16-master_fp32", "bf16-master_split",
                                  "bf16-sr", "offload-fp16"])
@pytest.mark.parametrize("cls,kw,fn,spec", CLASSES, ids=IDS)
def test_state_dict_round_trip_continues_bitwise(once, rng, lib, mode, cls, kw, fn, spec):
    opt, params, ref, data = setup(lib, mode, cls, kw, fn, spec, rng)
    for _ in range(2):
        step_both(opt, params, ref, *data())
    sd = _saved(opt.state_dict())
    for k, v in MODES[mode][2].items():
        assert sd["param_groups"][0][k] == v
    resumed_params = [clone(p) for p in params]
    resumed = cls(resumed_params, lr=0.5)  # default keywords: the state_dict brings the group's
    resumed.load_state_dict(sd)
    for i, st in opt.state.items():
        assert resumed.state[i].keys() == st.keys()
        for k, v in st.items():
            assert same(resumed.state[i][k], v) if hasattr(v, "shape") else resumed.state[i][k] == v, (i, k)
    assert {k: v for k, v in resumed.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    continue_together(opt, params, resumed, resumed_params, data)


def test_torch_state_dict_loads_into_numpy_params(once, rng):
    """A bfloat16 state_dict from torch tensors loads into NumPy (ml_dtypes) params: dtypes kept, bits kept."""
    vals = [rng.standard_normal(s) for s in SHAPES]
    tp = [make("torch", v, "bfloat16") for v in vals]
    opt = optim.Adam(tp, lr=0.01, master_weights="split", state_dtype="bfloat16")
    for _ in range(2):
        opt.step([make("torch", rng.standard_normal(s), "bfloat16") for s in SHAPES])
    npp = [make("numpy", p.float().numpy(), "bfloat16") for p in tp]
    other = optim.Adam(npp, lr=0.01)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["master_weights"] == "split"
    for i, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq", "master_residual"):
            assert isinstance(other.state[i][k], np.ndarray) and same(other.state[i][k], st[k]), (i, k)
    g = [rng.standard_normal(s) for s in SHAPES]
    opt.step([make("torch", x, "bfloat16") for x in g])
    other.step([make("numpy", x, "bfloat16") for x in g])
    assert all(same(a, b) for a, b in zip(tp, npp))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("mode", ["bf16-master_split", "fp16-master_fp32", "fp16-sr", "offload-bf16"])
def test_deepcopy_and_pickle_continue_bitwise(once, rng, mode, how):
    import pickle

    cls, kw, fn, spec = CLASSES[1]
    opt, params, ref, data = setup("numpy", mode, cls, kw, fn, spec, rng)
    step_both(opt, params, ref, *data())
    other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    continue_together(opt, params, other, [p for g in other.param_groups for p in g["params"]], data)


def test_found_inf_validates_the_16bit_arguments_then_skips(once, rng):
    opt, p = _stepped("numpy", rng)
    before = snapshot(opt, p)
    copies = [None, None, full("numpy", SHAPES[2], 0.0, "bfloat16")]
    opt.step(_grads("numpy", rng, p), param_copies=copies, found_inf=True)
    assert_snapshot_equal(snapshot(opt, p), before)
    assert not bits(copies[2]).any(), "a skipped step wrote the copy"
    copies[2] = full("numpy", SHAPES[2], 0.0, "float64")
    with pytest.raises(TypeError, match=r"^param_copies\[2\]"):
        opt.step(_grads("numpy", rng, p), param_copies=copies, found_inf=True)
    fresh = optim.Adam([make("numpy", rng.standard_normal(5), "bfloat16")], master_weights="fp32")
    fresh.step([make("numpy", rng.standard_normal(5), "bfloat16")], found_inf=True)
    assert fresh.state == {}, "a skipped first step created state"


# ---- split == fp32 masters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(optim.Adam, dict(lr=0.01, weight_decay=0.1)),
                                    (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5))],
                         ids=["Adam", "RMSprop"])
def test_split_master_equals_fp32_master_over_50_steps(rng, cls, kw):
    vals = [rng.standard_normal(s) for s in SHAPES]
    ps = [make("numpy", v, "bfloat16") for v in vals]
    pf = [make("numpy", v, "bfloat16") for v in vals]
    split, fp32 = cls(ps, **kw, master_weights="split"), cls(pf, **kw, master_weights="fp32")
    for _ in range(50):
        g = [make("numpy", rng.standard_normal(s), "bfloat16") for s in SHAPES]
        split.step(g)
        fp32.step([clone(x) for x in g])
    for i in range(len(SHAPES)):
        m_split = optkern.master_values(ps[i], split.state[i]["master_residual"], "split")
        m_fp32 = fp32.state[i]["master_param"]
        assert same(m_split, m_fp32), f"params[{i}]: the split master differs from the fp32 master"
        assert not same(m_fp32, make("numpy", vals[i], "float32")), "the master never moved"
        for k, v in fp32.state[i].items():
            if k != "master_param" and hasattr(v, "shape"):
                assert same(split.state[i][k], v), (i, k)
        # the params: the master's high half (split), its nearest bfloat16 (fp32)
        assert np.array_equal(ps[i].view(np.uint16), (m_split.view(np.uint32) >> 16).astype(np.uint16))
        assert same(pf[i], m_fp32.astype(BF16))


# ---- refusals -----------------------------------------------------------------------------------------------------
CONSTRUCTION_REFUSALS = [
    ("float16", dict(master_weights="split"), "master_weights"),
    ("float32", dict(master_weights="fp32"), "master_weights"),
    ("float64", dict(master_weights="fp32"), "master_weights"),
    ("float32", dict(master_weights="split"), "master_weights"),
    ("bfloat16", dict(master_weights="fp16"), "master_weights"),
    ("bfloat16", dict(master_weights="fp32", stochastic_rounding=True), "stochastic_rounding"),
    ("float32", dict(stochastic_rounding=True), "stochastic_rounding"),
    ("float32", dict(state_dtype="bfloat16"), "state_dtype"),
    ("float64", dict(state_dtype="float32"), "state_dtype"),
    ("bfloat16", dict(state_dtype="float16"), "state_dtype"),
    ("bfloat16", dict(state_dtype="float64"), "state_dtype"),
    ("bfloat16", dict(stochastic_rounding=True, seed=-1), "seed"),
    ("bfloat16", dict(stochastic_rounding=True, seed=2**64), "seed"),
]


@pytest.mark.parametrize("pd,bad,name", CONSTRUCTION_REFUSALS,
                         ids=[f"{pd}-{'-'.join(f'{k}={v}' for k, v in b.items())}" for pd, b, _ in
                              CONSTRUCTION_REFUSALS])
@pytest.mark.parametrize("cls,kw,fn,spec", CLASSES, ids=IDS)
def test_construction_refusal_names_the_argument(once, rng, pd, bad, name, cls, kw, fn, spec):
    p = [make("numpy", rng.standard_normal(6), pd)]
    with pytest.raises(ValueError, match=rf"^{name}: .*"):
        cls(p, **kw, **bad)


@pytest.mark.parametrize("bad,exc,name", [(dict(stochastic_rounding=1), TypeError, "stochastic_rounding"),
                                          (dict(stochastic_rounding=True, seed=1.5), TypeError, "seed")])
def test_construction_refusal_of_types(once, bad, exc, name):
    with pytest.raises(exc, match=rf"^{name}: "):
        optim.Adam([make("numpy", np.ones(3), "bfloat16")], **bad)


def _stepped(lib="numpy", rng=None):
    """An Adam over two groups (bfloat16 with an fp32 master; float32, the offload step) after two steps."""
    rng = rng or np.random.default_rng(5)
    p = [make(lib, rng.standard_normal(s), "bfloat16") for s in SHAPES[:2]] + \
        [make(lib, rng.standard_normal(SHAPES[2]), "float32")]
    opt = optim.Adam([{"params": p[:2], "master_weights": "fp32"}, {"params": p[2:]}], lr=0.01)
    for _ in range(2):
        opt.step(_grads(lib, rng, p), param_copies=[None, None, full(lib, SHAPES[2], 0.0, "bfloat16")])
    return opt, p


def _grads(lib, rng, p, gd2="bfloat16"):
    return [make(lib, rng.standard_normal(tuple(q.shape)), d) for q, d in zip(p, ("bfloat16", "bfloat16", gd2))]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_add_param_group_refusal_touches_nothing(once, rng, lib):
    opt, p = _stepped(lib, rng)
    before = snapshot(opt, p)
    for group, name in (({"params": [make(lib, np.ones(4), "float16")], "master_weights": "split"}, "master_weights"),
                        ({"params": [make(lib, np.ones(4), "float32")], "stochastic_rounding": True},
                         "stochastic_rounding"),
                        ({"params": [make(lib, np.ones(4), "float32")], "state_dtype": "bfloat16"}, "state_dtype")):
        with pytest.raises(ValueError, match=rf"^{name}: .*params\[3\]"):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 2 and len(opt._flat_params) == 3
        assert_snapshot_equal(snapshot(opt, p), before)


def _change(opt, key, value):
    opt.param_groups[0][key] = value


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("case", ["master_on_float32", "sr_with_master", "copy_of_a_16bit_param",
                                  "copies_wrong_length", "copy_wrong_shape", "bf16_grad_for_float64",
                                  "master_wrong_dtype", "master_read_only", "state_dtype_on_float32", "bad_seed"])
def test_step_refusal_names_the_argument_and_touches_nothing(once, rng, lib, case):
    """Refusals at a step (a keyword changed in a group, a bad copy or grad, a corrupted master) raise before any
    kernel: params, state (buffers, masters, counts) and groups are as before, and the next good step works."""
    opt, p = _stepped(lib, rng)
    grads = _grads(lib, rng, p)
    copies = [None, None, full(lib, SHAPES[2], 0.0, "bfloat16")]
    exc, match = ValueError, None
    if case == "master_on_float32":
        opt.param_groups[1]["master_weights"] = "fp32"
        match = r"^master_weights: .*params\[2\] is float32"
    elif case == "sr_with_master":
        _change(opt, "stochastic_rounding", True)
        match = r"^stochastic_rounding: only without a master copy"
    elif case == "copy_of_a_16bit_param":
        copies[0] = full(lib, SHAPES[0], 0.0, "bfloat16")
        match = r"^param_copies: only for float32 params"
    elif case == "copies_wrong_length":
        copies = copies[:2]
        match = r"^param_copies: expected 3 entries"
    elif case == "copy_wrong_shape":
        copies[2] = full(lib, (36,), 0.0, "bfloat16")
        match = r"param_copies\[2\]"
    elif case == "bf16_grad_for_float64":
        opt.add_param_group({"params": [make(lib, np.ones(4), "float64")]})
        p.append(opt.param_groups[2]["params"][0])
        grads.append(make(lib, np.ones(4), "bfloat16"))
        copies.append(None)
        exc, match = TypeError, r"grads\[3\]"
    elif case == "master_wrong_dtype":
        opt.state[1]["master_param"] = full(lib, SHAPES[1], 0.0, "bfloat16")
        _change(opt, "lr", 0.01)  # (a group change: its next step plans it again, reading the state)
        exc, match = TypeError, r"^state\[1\]\['master_param'\]: expected float32"
    elif case == "master_read_only":
        if lib == "torch":
            pytest.skip("torch tensors have no read-only flag")
        opt.state[1]["master_param"].flags.writeable = False
        match = r"^state\[1\]\['master_param'\]: is read-only"
    elif case == "state_dtype_on_float32":
        opt.param_groups[1]["state_dtype"] = "bfloat16"
        match = r"^state_dtype: float32 params keep float32 state.*params\[2\]"
    elif case == "bad_seed":
        _change(opt, "master_weights", None)
        _change(opt, "stochastic_rounding", True)
        _change(opt, "seed", 2**64)
        match = r"^seed: "
    before = snapshot(opt, p)
    with pytest.raises(exc, match=match):
        opt.step(grads, param_copies=copies)
    assert_snapshot_equal(snapshot(opt, p), before)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_split_switched_on_for_float16_params_is_refused_at_the_step(once, rng, lib):
    p = [make(lib, rng.standard_normal(s), "float16") for s in SHAPES]
    opt = optim.NAdam(p, lr=0.01, master_weights="fp32")
    opt.step([make(lib, rng.standard_normal(s), "float16") for s in SHAPES])
    opt.param_groups[0]["master_weights"] = "split"
    before = snapshot(opt, p)
    with pytest.raises(ValueError, match=r"^master_weights: 'split' needs bfloat16 params.*params\[0\] is float16"):
        opt.step([make(lib, rng.standard_normal(s), "float16") for s in SHAPES])
    assert_snapshot_equal(snapshot(opt, p), before)
    opt.param_groups[0]["master_weights"] = "fp32"
    opt.step([make(lib, rng.standard_normal(s), "float16") for s in SHAPES])
    assert opt.state[0]["step"] == 2


def test_load_state_dict_refusal_touches_nothing(once, rng):
    opt, p = _stepped("numpy", rng)
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["param_groups"][1]["master_weights"] = "split"  # float32 params
    before = snapshot(opt, p)
    with pytest.raises(ValueError, match=r"^master_weights: .*params\[2\] is float32"):
        opt.load_state_dict(bad)
    assert_snapshot_equal(snapshot(opt, p), before)
    opt.load_state_dict(sd)
    assert_snapshot_equal(snapshot(opt, p), before)


# ---- stochastic rounding: the same on every thread count and instruction set ----------------------------------------
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("cls,kw,pd", [(optim.AdamW, dict(lr=1e-3), "bfloat16"),
                                       (optim.SGD, dict(lr=1e-2, momentum=0.9), "float16"),
                                       (optim.Adagrad, dict(lr=1e-2), "bfloat16")], ids=["AdamW", "SGD", "Adagrad"])
def test_stochastic_rounding_same_on_threads_and_isas(once, lib, cls, kw, pd):
    """n = 100003: two threads split the work (checked by the CPU plan), each ISA has a tail."""
    n = 100003
    assert len(optkern._C._cpu_plan([n], 2, 16)) == 2, "the test needs a size two threads share"
    rng = np.random.default_rng(11)
    init = [rng.standard_normal(n), rng.standard_normal(17)]
    grads = [[rng.standard_normal(x.shape) for x in init] for _ in range(3)]
    threads, isa = optkern.get_num_threads(), optkern.cpu_isa()
    results = {}
    try:
        for run_isa in AVAILABLE_ISAS:  # scalar, avx2 (and avx512 where the CPU has it)
            optkern.set_cpu_isa(run_isa)
            for nt in (1, 2):
                optkern.set_num_threads(nt)
                p = [make(lib, v, pd) for v in init]
                opt = cls(p, **kw, stochastic_rounding=True, seed=99)
                for g in grads:
                    opt.step([make(lib, x, pd) for x in g])
                results[(run_isa, nt)] = [bits(x) for x in p]
    finally:
        optkern.set_num_threads(threads)
        optkern.set_cpu_isa(isa)
    first = next(iter(results.values()))
    for key, r in results.items():
        assert all(np.array_equal(a, b) for a, b in zip(first, r)), f"{key} differs from {next(iter(results))}"
    near = [make(lib, v, pd) for v in init]
    opt = cls(near, **kw)
    for g in grads:
        opt.step([make(lib, x, pd) for x in g])
    assert not np.array_equal(bits(near[0]), first[0]), "stochastic rounding gave round-to-nearest's result"


# ---- CUDA: the same classes on torch CUDA tensors and CuPy arrays --------------------------------------------------
CUDA_MODES = ["bf16-state_f32", "fp16-state_param", "bf16-master_fp32", "bf16-master_split", "bf16-sr", "fp16-sr",
              "offload-bf16", "offload-fp16"]


def _need_cuda(lib, mode):
    if not optkern.cuda_available():
        pytest.skip("no CUDA device (or optkern built without CUDA): bench/gpu_check.sh runs these on a GPU")
    if lib == "cupy":
        pytest.importorskip("cupy", reason="CuPy is not installed")
        if "bf16" in mode:
            pytest.skip("CuPy has no bfloat16 dtype")


@pytest.mark.parametrize("lib", ["cuda", "cupy"])
@pytest.mark.parametrize("mode", CUDA_MODES)
@pytest.mark.parametrize("cls,kw,fn,spec", [CLASSES[1], CLASSES[4], CLASSES[6]], ids=["Adam", "RMSprop", "NAdam"])
def test_cuda_class_equals_functional_bitwise(once, rng, lib, mode, cls, kw, fn, spec):
    _need_cuda(lib, mode)
    opt, params, ref, data = setup(lib, mode, cls, kw, fn, spec, rng)
    for _ in range(3):
        step_both(opt, params, ref, *data())
        ref.assert_matches(opt, params)


@pytest.mark.parametrize("lib", ["cuda", "cupy"])
@pytest.mark.parametrize("mode", ["bf16-sr", "fp16-sr", "bf16-master_split", "offload-fp16"])
def test_cuda_steps_equal_cpu_steps(once, lib, mode):
    """The same class steps on the CPU and on the GPU give the same bits (stochastic rounding included: its key
    does not depend on the device)."""
    _need_cuda(lib, mode)
    pd, gd, mkw, cd = MODES[mode]
    rng = np.random.default_rng(3)
    shapes = [(1000,), (33, 7)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    out = []
    for where in ("numpy", lib):
        p = [make(where, v, pd) for v in init]
        opt = optim.AdamW(p, lr=1e-3, **mkw)
        copies = None if cd is None else [full(where, s, 0.0, cd) for s in shapes]
        for g in grads:
            opt.step([make(where, x, gd) for x in g], param_copies=copies)
        out.append([bits(x) for x in p] + ([] if copies is None else [bits(c) for c in copies]))
    assert all(np.array_equal(a, b) for a, b in zip(*out))
