"""Bad input is rejected before anything is written.

Every check asserts the exception type, that the message names the offending argument, and that every buffer of
the call (params, grads and states) is bitwise unchanged afterwards.
"""

import math

import numpy as np
import pytest

import optkern
from optkern import optim

NAN, INF = math.nan, math.inf

# algorithm -> (function, state list names in positional order, keywords that make every state list required)
ALGOS = {
    "sgd": (optkern.sgd_step, ("momentum_buffers",), dict(momentum=0.9)),
    "adam": (optkern.adam_step, ("exp_avgs", "exp_avg_sqs"), {}),
    "amsgrad": (optkern.adam_step, ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), dict(amsgrad=True)),
    "adamw": (optkern.adamw_step, ("exp_avgs", "exp_avg_sqs"), {}),
    "adagrad": (optkern.adagrad_step, ("state_sums",), {}),
    "rmsprop": (optkern.rmsprop_step, ("square_avgs", "grad_avgs", "momentum_buffers"),
                dict(centered=True, momentum=0.9)),
    "adamax": (optkern.adamax_step, ("exp_avgs", "exp_infs"), {}),
    "nadam": (optkern.nadam_step, ("exp_avgs", "exp_avg_sqs"), {}),
    "adadelta": (optkern.adadelta_step, ("square_avgs", "acc_deltas"), {}),
    "rprop": (optkern.rprop_step, ("prevs", "step_sizes"), {}),
}
ALGO_NAMES = list(ALGOS)


def make(rng, algo, sizes=(7, 8, 9), dtype=np.float32):
    """Random non-zero params, grads and states for `algo` (states positive, as accumulators are)."""
    nstates = len(ALGOS[algo][1])
    params = [rng.standard_normal(n).astype(dtype) + dtype(3) for n in sizes]
    grads = [rng.standard_normal(n).astype(dtype) + dtype(0.5) for n in sizes]
    states = [[rng.uniform(0.1, 1.0, n).astype(dtype) for n in sizes] for _ in range(nstates)]
    return params, grads, states


def call(algo, params, grads, states, step=3, **kw):
    fn, _, base = ALGOS[algo]
    kw = {**base, **kw}
    return fn(params, grads, *states, step=step, **kw)


def snapshot(*arrays):
    return [np.array(a, copy=True, order="C") for a in arrays]


def all_arrays(params, grads, states):
    out = []
    for x in list(params) + list(grads) + [a for s in states for a in s]:
        if isinstance(x, np.ndarray):
            out.append(x)
    return out


def assert_unchanged(before, arrays):
    assert len(before) == len(arrays)
    for i, (b, a) in enumerate(zip(before, arrays)):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(b.view(np.uint8), np.ascontiguousarray(a).view(np.uint8)), f"buffer {i} was modified"


def expect_rejected(exc, match, algo, params, grads, states, **kw):
    arrays = all_arrays(params, grads, states)
    before = snapshot(*arrays)
    with pytest.raises(exc, match=match):
        call(algo, params, grads, states, **kw)
    assert_unchanged(before, arrays)


def test_valid_call_changes_params(rng):
    """Sanity check of the helpers: the same data without the defect is accepted and updates every param."""
    for algo in ALGO_NAMES:
        params, grads, states = make(rng, algo)
        before = snapshot(*params)
        call(algo, params, grads, states)
        for b, p in zip(before, params):
            assert not np.array_equal(b, p), algo


# ---- dtypes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("bad", [np.int32, np.int64, np.float16])
def test_bad_param_dtype(rng, algo, bad):
    params, grads, states = make(rng, algo)
    params[1] = (params[1] * 10).astype(bad)
    expect_rejected(TypeError, r"^params\[1\]", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("bad", [np.int32, np.float16, np.float64])
def test_bad_grad_dtype(rng, algo, bad):
    params, grads, states = make(rng, algo)
    grads[1] = (grads[1] * 10).astype(bad)
    expect_rejected(TypeError, r"^grads\[1\]", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_bad_state_dtype(rng, algo):
    params, grads, states = make(rng, algo)
    name = ALGOS[algo][1][-1]
    states[-1][2] = states[-1][2].astype(np.float64)
    expect_rejected(TypeError, rf"^{name}\[2\]", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_mixed_param_dtypes(rng, algo):
    params, grads, states = make(rng, algo)
    params[2] = params[2].astype(np.float64)
    grads[2] = grads[2].astype(np.float64)
    for s in states:
        s[2] = s[2].astype(np.float64)
    expect_rejected(TypeError, r"^params\[2\]", algo, params, grads, states)


def test_float64_everywhere_is_accepted(rng):
    params, grads, states = make(rng, "adam", dtype=np.float64)
    before = snapshot(*params)
    call("adam", params, grads, states)
    assert all(not np.array_equal(b, p) for b, p in zip(before, params))


# ---- shapes and list lengths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_grad_shape_mismatch(rng, algo):
    params, grads, states = make(rng, algo)
    grads[1] = rng.standard_normal(9).astype(np.float32)
    expect_rejected(ValueError, r"^grads\[1\]: expected shape \(8,\) like params\[1\], got \(9,\)", algo, params,
                    grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_state_shape_mismatch_same_numel(rng, algo):
    params, grads, states = make(rng, algo)
    name = ALGOS[algo][1][0]
    states[0][1] = states[0][1].reshape(2, 4)
    expect_rejected(ValueError, rf"^{name}\[1\]", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_grads_list_length_mismatch(rng, algo):
    params, grads, states = make(rng, algo)
    expect_rejected(ValueError, r"^grads", algo, params, grads[:2], states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_state_list_length_mismatch(rng, algo):
    params, grads, states = make(rng, algo)
    name = ALGOS[algo][1][-1]
    states[-1] = states[-1][:2]
    expect_rejected(ValueError, rf"^{name}", algo, params, grads, states)


# ---- writability --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_read_only_param(rng, algo):
    params, grads, states = make(rng, algo)
    params[2].flags.writeable = False
    expect_rejected(ValueError, r"^params\[2\]: is read-only", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_read_only_state(rng, algo):
    params, grads, states = make(rng, algo)
    for k, name in enumerate(ALGOS[algo][1]):
        p, g, s = make(rng, algo)
        s[k][0].flags.writeable = False
        expect_rejected(ValueError, rf"^{name}\[0\]: is read-only", algo, p, g, s)


def test_read_only_grads_are_accepted(rng):
    params, grads, states = make(rng, "adam")
    for g in grads:
        g.flags.writeable = False
    gbefore = snapshot(*grads)
    pbefore = snapshot(*params)
    call("adam", params, grads, states)
    assert_unchanged(gbefore, grads)
    assert all(not np.array_equal(b, p) for b, p in zip(pbefore, params))


# ---- aliasing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_param_passed_twice(rng, algo):
    params, grads, states = make(rng, algo, sizes=(8, 8, 8))
    params[1] = params[0]
    expect_rejected(ValueError, r"^params\[[01]\]: overlaps params\[[01]\] in memory", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_state_is_param(rng, algo):
    params, grads, states = make(rng, algo)
    name = ALGOS[algo][1][0]
    states[0][1] = params[1]
    expect_rejected(ValueError, rf"^(params\[1\]|{name}\[1\]): overlaps", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_grad_view_overlapping_a_param(rng, algo):
    params, grads, states = make(rng, algo, sizes=(8, 8, 8))
    base = rng.standard_normal(16).astype(np.float32) + 1
    params[0] = base[:8]
    grads[2] = base[4:12]
    expect_rejected(ValueError, r"^(params\[0\]|grads\[2\]): overlaps (params\[0\]|grads\[2\])", algo, params, grads,
                    states)


def test_states_of_different_tensors_overlapping(rng):
    params, grads, states = make(rng, "adam", sizes=(8, 8))
    base = rng.uniform(0.1, 1, 12).astype(np.float32)
    states[0][0] = base[:8]
    states[1][1] = base[4:]
    expect_rejected(ValueError, r"overlaps", "adam", params, grads, states)


def test_grads_may_alias_each_other(rng):
    params, grads, states = make(rng, "adam", sizes=(8, 8))
    grads[1] = grads[0]
    ref_p, ref_g, ref_s = [p.copy() for p in params], [grads[0].copy(), grads[0].copy()], \
        [[a.copy() for a in s] for s in states]
    call("adam", params, grads, states)
    call("adam", ref_p, ref_g, ref_s)
    for a, b in zip(params, ref_p):
        assert np.array_equal(a, b)


# ---- layout and alignment -----------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_non_contiguous_param(rng, algo):
    params, grads, states = make(rng, algo, sizes=(7, 16, 9))
    params[1] = params[1][::2]
    grads[1] = grads[1][::2]
    for s in states:
        s[1] = s[1][::2]
    arrays = all_arrays(params, grads, states)
    bases = [a.base for a in arrays if a.base is not None]
    before_bases = snapshot(*bases)
    expect_rejected(ValueError, r"^params\[1\]: expected a contiguous", algo, params, grads, states)
    assert_unchanged(before_bases, bases)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_non_contiguous_grad(rng, algo):
    params, grads, states = make(rng, algo)
    grads[1] = rng.standard_normal(16).astype(np.float32)[::2]
    expect_rejected(ValueError, r"^grads\[1\]", algo, params, grads, states)


def test_layout_mismatch_c_vs_f(rng):
    p = rng.standard_normal((4, 5)).astype(np.float32)
    g = np.asfortranarray(rng.standard_normal((4, 5)).astype(np.float32))
    m, v = np.ones_like(p), np.ones_like(p)
    expect_rejected(ValueError, r"^grads\[0\]", "adam", [p], [g], [[m], [v]])


def misaligned(rng, n, dtype=np.float32):
    item = np.dtype(dtype).itemsize
    buf = bytearray(n * item + 1)
    a = np.frombuffer(buf, dtype=dtype, count=n, offset=1)
    assert a.flags.writeable and a.__array_interface__["data"][0] % item != 0
    a[...] = rng.uniform(0.5, 1.5, n)
    return a


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_misaligned_param(rng, algo):
    params, grads, states = make(rng, algo)
    params[1] = misaligned(rng, 8)
    expect_rejected(ValueError, r"^params\[1\]: data pointer is not aligned", algo, params, grads, states)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_misaligned_state(rng, algo):
    params, grads, states = make(rng, algo, dtype=np.float64)
    name = ALGOS[algo][1][-1]
    states[-1][0] = misaligned(rng, 7, np.float64)
    expect_rejected(ValueError, rf"^{name}\[0\]: data pointer is not aligned", algo, params, grads, states)


# ---- not arrays ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("obj", [[1.0, 2.0, 3.0], None, "abc", 3.5])
def test_non_array_grad(rng, algo, obj):
    params, grads, states = make(rng, algo, sizes=(7, 3, 9))
    grads[1] = obj
    expect_rejected(TypeError, r"^grads\[1\]", algo, params, grads, states)


def test_non_array_param(rng):
    params, grads, states = make(rng, "sgd", sizes=(3,))
    params[0] = object()
    expect_rejected(TypeError, r"^params\[0\]", "sgd", params, grads, states)


# ---- a bad item late in a list ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("defect", ["shape", "read_only_state", "dtype", "overlap"])
def test_bad_item_late_in_list(rng, algo, defect):
    sizes = (5, 17, 64, 1000, 3, 33)
    params, grads, states = make(rng, algo, sizes=sizes)
    name = ALGOS[algo][1][-1]
    if defect == "shape":
        grads[5] = rng.standard_normal(34).astype(np.float32)
        exc, match = ValueError, r"^grads\[5\]"
    elif defect == "read_only_state":
        states[-1][5].flags.writeable = False
        exc, match = ValueError, rf"^{name}\[5\]"
    elif defect == "dtype":
        states[-1][5] = states[-1][5].astype(np.float64)
        exc, match = TypeError, rf"^{name}\[5\]"
    else:
        states[-1][5] = params[5]
        exc, match = ValueError, r"overlaps"
    expect_rejected(exc, match, algo, params, grads, states)


# ---- missing optional states ---------------------------------------------------------------------------------
def test_amsgrad_without_max_exp_avg_sqs(rng):
    params, grads, states = make(rng, "adam")
    arrays = all_arrays(params, grads, states)
    before = snapshot(*arrays)
    with pytest.raises(ValueError, match=r"^max_exp_avg_sqs"):
        optkern.adam_step(params, grads, *states, step=1, amsgrad=True)
    assert_unchanged(before, arrays)


def test_sgd_momentum_without_buffers(rng):
    params, grads, _ = make(rng, "sgd")
    arrays = params + grads
    before = snapshot(*arrays)
    with pytest.raises(ValueError, match=r"^momentum_buffers"):
        optkern.sgd_step(params, grads, step=1, momentum=0.9)
    assert_unchanged(before, arrays)


def test_rmsprop_centered_without_grad_avgs(rng):
    params, grads, states = make(rng, "adagrad")
    arrays = all_arrays(params, grads, states)
    before = snapshot(*arrays)
    with pytest.raises(ValueError, match=r"^grad_avgs"):
        optkern.rmsprop_step(params, grads, states[0], step=1, centered=True)
    assert_unchanged(before, arrays)


# ---- hyperparameters -----------------------------------------------------------------------------------------
BAD_HYPER = [
    ("sgd", dict(lr=-1.0), "lr"), ("sgd", dict(lr=NAN), "lr"), ("sgd", dict(lr=INF), "lr"),
    ("sgd", dict(momentum=-0.5), "momentum"), ("sgd", dict(momentum=NAN), "momentum"),
    ("sgd", dict(momentum=INF), "momentum"),
    ("sgd", dict(dampening=NAN), "dampening"), ("sgd", dict(dampening=INF), "dampening"),
    ("sgd", dict(weight_decay=-1e-3), "weight_decay"), ("sgd", dict(weight_decay=NAN), "weight_decay"),
    ("sgd", dict(weight_decay=INF), "weight_decay"),
    ("sgd", dict(nesterov=True, momentum=0.0), "nesterov"), ("sgd", dict(nesterov=True, dampening=0.5), "nesterov"),
    ("sgd", dict(velocity=True, dampening=0.1), "dampening"),
    ("adam", dict(lr=-1e-3), "lr"), ("adam", dict(lr=NAN), "lr"), ("adam", dict(lr=INF), "lr"),
    ("adam", dict(betas=(1.0, 0.999)), r"betas\[0\]"), ("adam", dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    ("adam", dict(betas=(NAN, 0.999)), r"betas\[0\]"), ("adam", dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    ("adam", dict(betas=(0.9, 1.5)), r"betas\[1\]"), ("adam", dict(betas=(0.9, NAN)), r"betas\[1\]"),
    ("adam", dict(betas=(0.9,)), "betas"), ("adam", dict(betas=0.9), "betas"),
    ("adam", dict(eps=-1e-8), "eps"), ("adam", dict(eps=NAN), "eps"), ("adam", dict(eps=INF), "eps"),
    ("adam", dict(weight_decay=-0.1), "weight_decay"), ("adam", dict(weight_decay=NAN), "weight_decay"),
    ("amsgrad", dict(betas=(0.9, 1.0)), r"betas\[1\]"), ("amsgrad", dict(lr=-1.0), "lr"),
    ("adamw", dict(lr=-1.0), "lr"), ("adamw", dict(weight_decay=-0.01), "weight_decay"),
    ("adamw", dict(weight_decay=INF), "weight_decay"), ("adamw", dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    ("adamw", dict(eps=INF), "eps"),
    ("adagrad", dict(lr=-1.0), "lr"), ("adagrad", dict(lr=INF), "lr"), ("adagrad", dict(lr_decay=-0.1), "lr_decay"),
    ("adagrad", dict(lr_decay=NAN), "lr_decay"), ("adagrad", dict(weight_decay=-1.0), "weight_decay"),
    ("adagrad", dict(eps=-1e-10), "eps"), ("adagrad", dict(eps=NAN), "eps"),
    ("rmsprop", dict(lr=-1.0), "lr"), ("rmsprop", dict(lr=NAN), "lr"), ("rmsprop", dict(alpha=-0.1), "alpha"),
    ("rmsprop", dict(alpha=1.1), "alpha"), ("rmsprop", dict(alpha=NAN), "alpha"), ("rmsprop", dict(eps=-1.0), "eps"),
    ("rmsprop", dict(eps=INF), "eps"), ("rmsprop", dict(weight_decay=-1.0), "weight_decay"),
    ("rmsprop", dict(momentum=-0.9), "momentum"), ("rmsprop", dict(momentum=NAN), "momentum"),
    ("rmsprop", dict(momentum=0.0, nesterov=True), "nesterov"),
    ("adamax", dict(lr=-1.0), "lr"), ("adamax", dict(lr=INF), "lr"), ("adamax", dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    ("adamax", dict(betas=(0.9, 1.0)), r"betas\[1\]"), ("adamax", dict(eps=-1.0), "eps"),
    ("adamax", dict(eps=NAN), "eps"), ("adamax", dict(weight_decay=-1.0), "weight_decay"),
    ("nadam", dict(lr=-1.0), "lr"), ("nadam", dict(lr=NAN), "lr"), ("nadam", dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    ("nadam", dict(betas=(0.9, -0.1)), r"betas\[1\]"), ("nadam", dict(eps=INF), "eps"),
    ("nadam", dict(weight_decay=NAN), "weight_decay"), ("nadam", dict(momentum_decay=-1e-3), "momentum_decay"),
    ("nadam", dict(momentum_decay=INF), "momentum_decay"),
    ("adadelta", dict(lr=-1.0), "lr"), ("adadelta", dict(lr=INF), "lr"), ("adadelta", dict(rho=-0.1), "rho"),
    ("adadelta", dict(rho=1.01), "rho"), ("adadelta", dict(rho=NAN), "rho"), ("adadelta", dict(eps=-1.0), "eps"),
    ("adadelta", dict(eps=NAN), "eps"), ("adadelta", dict(weight_decay=-1.0), "weight_decay"),
    ("rprop", dict(lr=-1.0), "lr"), ("rprop", dict(lr=NAN), "lr"), ("rprop", dict(etas=(0.0, 1.2)), r"etas\[0\]"),
    ("rprop", dict(etas=(1.0, 1.2)), r"etas\[0\]"), ("rprop", dict(etas=(NAN, 1.2)), r"etas\[0\]"),
    ("rprop", dict(etas=(0.5, 1.0)), r"etas\[1\]"), ("rprop", dict(etas=(0.5, INF)), r"etas\[1\]"),
    ("rprop", dict(etas=(0.5, NAN)), r"etas\[1\]"), ("rprop", dict(etas=0.5), "etas"),
    ("rprop", dict(step_size_limits=(-1e-6, 50.0)), r"step_size"),
    ("rprop", dict(step_size_limits=(1.0, 0.5)), r"step_size"),
    ("rprop", dict(step_size_limits=(0.0, INF)), r"step_size"),
    ("rprop", dict(step_size_limits=(NAN, 1.0)), r"step_size"),
]


@pytest.mark.parametrize("algo,kw,name", BAD_HYPER, ids=[f"{a}-{n}-{i}" for i, (a, _, n) in enumerate(BAD_HYPER)])
def test_bad_hyperparameter(rng, algo, kw, name):
    params, grads, states = make(rng, algo)
    expect_rejected(ValueError, rf"^[^:]*{name}", algo, params, grads, states, **kw)


@pytest.mark.parametrize("algo,kw,name", BAD_HYPER[::7])
def test_bad_hyperparameter_even_when_step_is_skipped(rng, algo, kw, name):
    params, grads, states = make(rng, algo)
    expect_rejected(ValueError, rf"^[^:]*{name}", algo, params, grads, states, found_inf=True, **kw)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_lr_message_format(rng, algo):
    params, grads, states = make(rng, algo)
    expect_rejected(ValueError, r"^lr: expected a finite number >= 0, got -1", algo, params, grads, states, lr=-1.0)


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("step", [0, -1])
def test_bad_step(rng, algo, step):
    params, grads, states = make(rng, algo)
    expect_rejected(ValueError, r"^step", algo, params, grads, states, step=step)


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("gm", [NAN, INF, -INF, 10**400])
def test_non_finite_grad_multiplier(rng, algo, gm):
    params, grads, states = make(rng, algo)
    expect_rejected(ValueError, r"^grad_multiplier", algo, params, grads, states, grad_multiplier=gm)


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("gm", ["0.5", True, None, [0.5]])
def test_grad_multiplier_not_a_number(rng, algo, gm):
    params, grads, states = make(rng, algo)
    expect_rejected(TypeError, r"^grad_multiplier", algo, params, grads, states, grad_multiplier=gm)


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("value", [1.0, 0.5, NAN])
def test_grad_scale_is_refused_as_renamed(rng, algo, value):
    """The old name grad_scale (a multiplier here, a divisor in torch) fails loudly whatever its value."""
    params, grads, states = make(rng, algo)
    expect_rejected(TypeError, r"^grad_scale: renamed grad_multiplier.*divisor", algo, params, grads, states,
                    grad_scale=value)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_unknown_keyword_is_refused(rng, algo):
    params, grads, states = make(rng, algo)
    expect_rejected(TypeError, r"unexpected keyword argument 'learning_rate'", algo, params, grads, states,
                    learning_rate=0.1)


def test_found_inf_true_skips_step(rng):
    """Counterpart of the rejection tests: a valid skipped step also leaves everything unchanged."""
    params, grads, states = make(rng, "adam")
    arrays = all_arrays(params, grads, states)
    before = snapshot(*arrays)
    call("adam", params, grads, states, found_inf=True)
    assert_unchanged(before, arrays)
    call("adam", params, grads, states, found_inf=False)
    assert not np.array_equal(before[0], params[0])


# ---- the optimizer classes ----------------------------------------------------------------------------------
BAD_CTOR = [
    (optim.SGD, dict(lr=-0.1)), (optim.SGD, dict(lr=NAN)), (optim.SGD, dict(momentum=-0.9)),
    (optim.SGD, dict(weight_decay=-1.0)), (optim.SGD, dict(nesterov=True)),
    (optim.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1)),
    (optim.Adam, dict(lr=-1.0)), (optim.Adam, dict(lr=INF)), (optim.Adam, dict(betas=(1.0, 0.999))),
    (optim.Adam, dict(betas=(0.9, 1.0))), (optim.Adam, dict(eps=-1.0)), (optim.Adam, dict(weight_decay=-1.0)),
    (optim.AdamW, dict(lr=-1.0)), (optim.AdamW, dict(betas=(0.9, NAN))), (optim.AdamW, dict(weight_decay=-0.1)),
    (optim.Adagrad, dict(lr=-1.0)), (optim.Adagrad, dict(lr_decay=-1.0)), (optim.Adagrad, dict(eps=-1.0)),
    (optim.Adagrad, dict(initial_accumulator_value=-1.0)), (optim.Adagrad, dict(weight_decay=NAN)),
    (optim.RMSprop, dict(lr=-1.0)), (optim.RMSprop, dict(alpha=1.5)), (optim.RMSprop, dict(alpha=-0.1)),
    (optim.RMSprop, dict(eps=-1.0)), (optim.RMSprop, dict(momentum=-1.0)), (optim.RMSprop, dict(weight_decay=-1.0)),
    (optim.Adamax, dict(lr=-1.0)), (optim.Adamax, dict(betas=(1.0, 0.9))), (optim.Adamax, dict(eps=NAN)),
    (optim.NAdam, dict(lr=-1.0)), (optim.NAdam, dict(betas=(0.9, 1.0))), (optim.NAdam, dict(momentum_decay=-1.0)),
    (optim.Adadelta, dict(lr=-1.0)), (optim.Adadelta, dict(rho=1.5)), (optim.Adadelta, dict(eps=-1.0)),
    (optim.Rprop, dict(lr=-1.0)), (optim.Rprop, dict(etas=(1.5, 1.2))), (optim.Rprop, dict(etas=(0.5, 0.9))),
    (optim.Rprop, dict(step_sizes=(1.0, 0.1))),
]


@pytest.mark.parametrize("cls,kw", BAD_CTOR, ids=[f"{c.__name__}-{sorted(k)[0]}-{i}" for i, (c, k) in enumerate(BAD_CTOR)])
def test_constructor_rejects_bad_hyperparameters(rng, cls, kw):
    params = [rng.standard_normal(5).astype(np.float32)]
    before = snapshot(*params)
    with pytest.raises(ValueError):
        cls(params, **kw)
    assert_unchanged(before, params)


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW, optim.Adagrad, optim.RMSprop, optim.Adamax,
                                 optim.NAdam, optim.Adadelta, optim.Rprop])
def test_constructor_accepts_defaults(rng, cls):
    cls([rng.standard_normal(5).astype(np.float32)])


def test_constructor_rejects_bad_group_hyperparameter(rng):
    p0, p1 = rng.standard_normal(5).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        optim.Adam([{"params": [p0]}, {"params": [p1], "betas": (0.9, 1.0)}])
    opt = optim.Adam([p0])
    with pytest.raises(ValueError, match=r"^lr"):
        opt.add_param_group({"params": [p1], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_constructor_rejects_empty_params():
    with pytest.raises(ValueError, match=r"^params"):
        optim.Adam([])


def test_param_in_two_groups_rejected(rng):
    p = rng.standard_normal(5).astype(np.float32)
    with pytest.raises(ValueError, match=r"params"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.RMSprop, optim.Rprop])
@pytest.mark.parametrize("ngrads", [1, 3])
def test_step_with_wrong_number_of_grads(rng, cls, ngrads):
    params = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(6).astype(np.float32)]
    grads = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(6).astype(np.float32),
             rng.standard_normal(7).astype(np.float32)][:ngrads]
    kw = dict(lr=0.1, momentum=0.9) if cls is optim.SGD else {}
    opt = cls(params, **kw)
    before = snapshot(*params, *grads)
    with pytest.raises(ValueError, match=r"^grads"):
        opt.step(grads)
    assert_unchanged(before, params + grads)


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.RMSprop, optim.Rprop])
def test_failed_class_step_changes_nothing(rng, cls):
    """A step rejected for a bad gradient leaves the params alone and does not count as a step."""
    kw = dict(lr=0.1, momentum=0.9) if cls is optim.SGD else {}
    params = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(6).astype(np.float32)]
    grads = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(6).astype(np.float32)]
    ref = [p.copy() for p in params]
    opt, ref_opt = cls(params, **kw), cls(ref, **kw)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        opt.step([grads[0], grads[1][:5]])
    assert_unchanged([r.copy() for r in ref], params)
    opt.step(grads)
    ref_opt.step(grads)
    opt.step(grads)
    ref_opt.step(grads)
    for a, b in zip(params, ref):
        assert np.array_equal(a, b)


# ---- numbers: types and float range (one helper, functional.real_number / step_count) ---------------------------
@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("value,exc", [(10**400, ValueError), (-(10**400), ValueError), ("0.1", TypeError),
                                       (True, TypeError), (None, TypeError), ([0.1], TypeError), (1j, TypeError)])
def test_lr_must_be_a_real_number(rng, algo, value, exc):
    params, grads, states = make(rng, algo)
    expect_rejected(exc, r"^lr: expected", algo, params, grads, states, lr=value)


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("value", [np.float32(0.01), np.float64(0.01), np.int64(0), 0])
def test_numpy_scalars_and_ints_are_numbers(rng, algo, value):
    params, grads, states = make(rng, algo)
    call(algo, params, grads, states, lr=value, step=np.int32(3))


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("step,exc", [(1.5, TypeError), (3.0, TypeError), ("3", TypeError), (True, TypeError),
                                      (None, TypeError), (2**70, ValueError), (2**62, ValueError)])
def test_step_must_be_an_integer_in_range(rng, algo, step, exc):
    params, grads, states = make(rng, algo)
    expect_rejected(exc, r"^step: expected an integer", algo, params, grads, states, step=step)
    expect_rejected(exc, r"^step: expected an integer", algo, params, grads, states, step=step, found_inf=True)


@pytest.mark.parametrize("kw,name", [(dict(betas=(0.9, "0.999")), r"betas\[1\]"), (dict(eps=10**400), "eps"),
                                     (dict(weight_decay=False), "weight_decay")])
def test_adam_fields_are_real_numbers(rng, kw, name):
    params, grads, states = make(rng, "adam")
    expect_rejected((TypeError, ValueError), rf"^{name}", "adam", params, grads, states, **kw)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_skipped_step_still_validates_arrays(rng, algo):
    """found_inf=True skips the update after every check: a wrong-shape int32 grad is refused."""
    params, grads, states = make(rng, algo)
    grads[2] = np.ones(3, np.int32)
    expect_rejected(TypeError, r"^grads\[2\]", algo, params, grads, states, found_inf=True)
