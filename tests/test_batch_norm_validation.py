"""Batch norm: bad input is rejected before anything is written.

Every check asserts the exception type, that the message names the offending argument (``match=``), and that every
caller buffer of the call (x, dy, weight, bias, out, running_mean, running_var, the saved statistics) is bitwise
unchanged afterwards (compared with copies taken before the call).
"""

import math

import numpy as np
import pytest

import optkern

F32, F64 = np.float32, np.float64
NAN, INF = math.nan, math.inf
C = 3


def data(rng, shape=(4, C, 5), dtype=F32, axis=1):
    """Valid, non-zero inputs: x, dy, weight, bias, running_mean, running_var and an out buffer of sentinels."""
    c = shape[axis]
    x = (rng.standard_normal(shape) * 1.5 + 0.7).astype(dtype)
    dy = (rng.standard_normal(shape) + 0.3).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = (rng.standard_normal(c) * 0.3 + 0.2).astype(dtype)
    rv = rng.uniform(0.5, 1.5, c).astype(dtype)
    out = np.full_like(x, 7.0)
    return dict(x=x, dy=dy, w=w, b=b, rm=rm, rv=rv, out=out)


def snapshot(arrays):
    return [(a, a.copy()) for a in arrays if isinstance(a, np.ndarray)]


def assert_unchanged(snap):
    for i, (a, before) in enumerate(snap):
        assert a.dtype == before.dtype and a.shape == before.shape
        assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(before).view(np.uint8)), \
            f"buffer {i} (shape {a.shape}) was modified"


def expect_rejected(exc, match, fn, *buffers):
    snap = snapshot(buffers)
    with pytest.raises(exc, match=match):
        fn()
    assert_unchanged(snap)


def forward(d, **kw):
    """A call of batch_norm_forward on d's buffers, with keyword overrides (x, weight, ..., out, eps, ...)."""
    a = dict(x=d["x"], weight=d["w"], bias=d["b"], running_mean=d["rm"], running_var=d["rv"], out=d["out"])
    a.update(kw)
    x, w, b, rm, rv = (a.pop(k) for k in ("x", "weight", "bias", "running_mean", "running_var"))
    return lambda: optkern.batch_norm_forward(x, w, b, rm, rv, **a)


def saved(d, axis=1):
    """Saved statistics of a valid training forward (on copies of the running stats)."""
    _, m, s = optkern.batch_norm_forward(d["x"], d["w"], d["b"], None, None, axis=axis)
    return m, s


def all_buffers(d):
    return [d[k] for k in ("x", "dy", "w", "b", "rm", "rv", "out")]


def test_valid_calls_write_their_outputs(rng):
    """Sanity check of the helpers: the same data without a defect is accepted, out and running stats change."""
    d = data(rng)
    before = snapshot([d["out"], d["rm"], d["rv"]])
    y, m, s = forward(d)()
    assert y is d["out"]
    for a, b in before:
        assert not np.array_equal(a, b)
    dx = np.full_like(d["x"], 7.0)
    g = optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, out=dx)
    assert g[0] is dx and not np.all(dx == 7.0)


# ---- channel counts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key", [("weight", "w"), ("bias", "b"), ("running_mean", "rm"),
                                      ("running_var", "rv")])
@pytest.mark.parametrize("n", [C - 1, C + 1])
def test_channel_count_mismatch_forward(rng, name, key, n):
    d = data(rng)
    d[key] = d[key][:n] if n < C else np.concatenate([d[key], d[key][:1]])
    expect_rejected(ValueError, rf"^{name}: expected shape \({C},\)", forward(d), *all_buffers(d))
    expect_rejected(ValueError, rf"^{name}: expected shape \({C},\)", forward(d, training=False), *all_buffers(d))


@pytest.mark.parametrize("name,key", [("weight", "w"), ("bias", "b"), ("running_mean", "rm"),
                                      ("running_var", "rv")])
def test_channel_count_mismatch_normalize(rng, name, key):
    d = data(rng)
    count, mean, m2 = optkern.batch_norm_stats(d["x"])
    d[key] = d[key][:C - 1]
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], count, mean, m2, d["rm"], d["rv"],
                                              out=d["out"])
    expect_rejected(ValueError, rf"^{name}: expected shape \({C},\)", fn, *all_buffers(d), mean, m2)


def test_channel_count_mismatch_backward_weight(rng):
    d = data(rng)
    m, s = saved(d)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"][:2], m, s, out=d["out"])
    expect_rejected(ValueError, r"^weight: expected shape \(3,\)", fn, *all_buffers(d), m, s)


# ---- one value per channel ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1)])
def test_training_with_one_value_per_channel(rng, shape):
    d = data(rng, shape)
    msg = "Expected more than 1 value per channel"
    expect_rejected(ValueError, msg, forward(d), *all_buffers(d))
    expect_rejected(ValueError, msg, forward(d, running_mean=None, running_var=None, weight=None, bias=None),
                    *all_buffers(d))
    m = np.zeros(C)
    s = np.ones(C)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, out=d["out"])
    expect_rejected(ValueError, msg, fn, *all_buffers(d), m, s)
    # staged: normalize and backward_dx with a global count of 1
    count, mean, m2 = optkern.batch_norm_stats(d["x"])  # local statistics of one value are fine
    assert count == 1
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], 1, mean, m2, d["rm"], d["rv"],
                                              out=d["out"])
    expect_rejected(ValueError, msg, fn, *all_buffers(d), mean, m2)
    sdy, sdyx = np.ones(C), np.ones(C)
    fn = lambda: optkern.batch_norm_backward_dx(d["dy"], d["x"], d["w"], m, s, 1, sdy, sdyx,
                                                out=d["out"])
    expect_rejected(ValueError, msg, fn, *all_buffers(d), m, s, sdy, sdyx)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1)])
def test_eval_with_one_value_per_channel_is_allowed(rng, shape):
    d = data(rng, shape)
    rm0, rv0 = d["rm"].copy(), d["rv"].copy()
    y, m, s = forward(d, training=False)()
    assert y is d["out"]
    inv = 1.0 / np.sqrt(rv0.astype(F64) + 1e-5)
    ref = (d["x"].astype(F64) - rm0.reshape(1, C, *shape[2:])) * (inv * d["w"]).reshape(1, C, *shape[2:]) + \
        d["b"].astype(F64).reshape(1, C, *shape[2:])
    assert np.max(np.abs(y - ref)) <= 2e-6 * np.max(np.abs(ref))
    assert np.array_equal(d["rm"], rm0) and np.array_equal(d["rv"], rv0)
    dx, dw, db = optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, training=False)
    bs = (1, C, *shape[2:])
    assert np.max(np.abs(dx - d["dy"] * (inv * d["w"]).reshape(bs))) <= 2e-6 * np.max(np.abs(dx))
    red = tuple(i for i in range(len(shape)) if i != 1)
    xhat = (d["x"].astype(F64) - rm0.reshape(bs)) * inv.reshape(bs)
    assert np.allclose(dw, (d["dy"] * xhat).sum(axis=red), rtol=2e-6, atol=0)
    assert np.allclose(db, d["dy"].astype(F64).sum(axis=red), rtol=2e-6, atol=0)


# ---- scalars ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, -1e-5, NAN, INF, -INF])
def test_bad_eps(rng, eps):
    d = data(rng)
    for training in (True, False):
        expect_rejected(ValueError, "^eps", forward(d, eps=eps, training=training), *all_buffers(d))
    m, s = saved(d)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, eps=eps, out=d["out"])
    expect_rejected(ValueError, "^eps", fn, *all_buffers(d), m, s)
    count, mean, m2 = optkern.batch_norm_stats(d["x"])
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], count, mean, m2, d["rm"], d["rv"],
                                              eps=eps, out=d["out"])
    expect_rejected(ValueError, "^eps", fn, *all_buffers(d), mean, m2)


@pytest.mark.parametrize("momentum", [NAN, INF, -INF])
def test_bad_momentum(rng, momentum):
    d = data(rng)
    expect_rejected(ValueError, "^momentum", forward(d, momentum=momentum), *all_buffers(d))
    count, mean, m2 = optkern.batch_norm_stats(d["x"])
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], count, mean, m2, d["rm"], d["rv"],
                                              momentum=momentum, out=d["out"])
    expect_rejected(ValueError, "^momentum", fn, *all_buffers(d), mean, m2)


@pytest.mark.parametrize("nbt", [None, 0, -2])
def test_cumulative_average_needs_num_batches_tracked(rng, nbt):
    d = data(rng)
    expect_rejected(ValueError, "^num_batches_tracked", forward(d, momentum=None, num_batches_tracked=nbt),
                    *all_buffers(d))
    count, mean, m2 = optkern.batch_norm_stats(d["x"])
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], count, mean, m2, d["rm"], d["rv"],
                                              momentum=None, num_batches_tracked=nbt, out=d["out"])
    expect_rejected(ValueError, "^num_batches_tracked", fn, *all_buffers(d), mean, m2)


def test_cumulative_average_without_running_stats_needs_nothing(rng):
    """momentum=None updates nothing when there are no running statistics: num_batches_tracked is not needed."""
    d = data(rng)
    y, _, _ = forward(d, momentum=None, running_mean=None, running_var=None)()
    assert y is d["out"]


# ---- dtypes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.int16, np.int32, np.int64])
def test_bad_x_dtype(rng, bad):
    d = data(rng)
    d["x"] = (d["x"] * 10).astype(bad)
    msg = "^x: expected float32, float64, bfloat16 or float16, got int"
    expect_rejected(TypeError, msg, forward(d, out=None), *all_buffers(d))
    expect_rejected(TypeError, msg, lambda: optkern.batch_norm_stats(d["x"]), d["x"])


@pytest.mark.parametrize("name,key", [("weight", "w"), ("bias", "b"), ("running_mean", "rm"), ("running_var", "rv"),
                                      ("out", "out")])
@pytest.mark.parametrize("bad", [np.float64, np.float16, np.int32])
def test_argument_dtype_unlike_x(rng, name, key, bad):
    d = data(rng)
    d[key] = d[key].astype(bad)
    expect_rejected(TypeError, rf"^{name}: expected float32 like x", forward(d), *all_buffers(d))


def test_float64_x_with_float32_weight(rng):
    d = data(rng, dtype=F64)
    d["w"] = d["w"].astype(F32)
    expect_rejected(TypeError, "^weight: expected float64 like x", forward(d), *all_buffers(d))


def test_dy_dtype_unlike_x(rng):
    d = data(rng)
    m, s = saved(d)
    dy = d["dy"].astype(F64)
    fn = lambda: optkern.batch_norm_backward(dy, d["x"], d["w"], m, s, out=d["out"])
    expect_rejected(TypeError, "^dy: expected float32 like x", fn, *all_buffers(d), dy, m, s)


# ---- read-only and aliased buffers -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key", [("out", "out"), ("running_mean", "rm"), ("running_var", "rv")])
def test_read_only_written_buffer(rng, name, key):
    d = data(rng)
    d[key].flags.writeable = False
    expect_rejected(ValueError, rf"^{name}: is read-only", forward(d), *all_buffers(d))


def test_read_only_running_stats_are_fine_in_eval(rng):
    """Eval reads the running statistics and never writes them."""
    d = data(rng)
    d["rm"].flags.writeable = False
    d["rv"].flags.writeable = False
    y, m, _ = forward(d, training=False)()
    assert y is d["out"] and np.array_equal(m, d["rm"].astype(F64))


def test_read_only_backward_out(rng):
    d = data(rng)
    m, s = saved(d)
    d["out"].flags.writeable = False
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, out=d["out"])
    expect_rejected(ValueError, "^out: is read-only", fn, *all_buffers(d), m, s)


def test_out_aliasing_x(rng):
    d = data(rng)
    expect_rejected(ValueError, "^out: overlaps x", forward(d, out=d["x"]), *all_buffers(d))
    # a partial overlap: out a view of the same buffer shifted by one element
    base = np.concatenate([d["x"].ravel(), [1.0]]).astype(F32)
    x, out = base[:-1].reshape(d["x"].shape), base[1:].reshape(d["x"].shape)
    expect_rejected(ValueError, "^out: overlaps x", forward(d, x=x, out=out), *all_buffers(d), base)


def test_out_aliasing_dy_or_x_in_backward(rng):
    d = data(rng)
    m, s = saved(d)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, out=d["dy"])
    expect_rejected(ValueError, "^out: overlaps dy", fn, *all_buffers(d), m, s)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, out=d["x"])
    expect_rejected(ValueError, "^out: overlaps x", fn, *all_buffers(d), m, s)


def test_running_stats_aliasing(rng):
    d = data(rng)
    expect_rejected(ValueError, "^running_mean: overlaps running_var",
                    forward(d, running_var=d["rm"]), *all_buffers(d))
    expect_rejected(ValueError, "^running_var: overlaps weight", forward(d, running_var=d["w"]), *all_buffers(d))


# ---- out shape and layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, C, 6), (4, C), (3, C, 5), (4, C, 5, 1)])
def test_out_wrong_shape(rng, shape):
    d = data(rng)
    out = np.full(shape, 7.0, F32)
    expect_rejected(ValueError, r"^out: expected shape \(4, 3, 5\) like x", forward(d, out=out), *all_buffers(d), out)


def test_out_wrong_layout(rng):
    d = data(rng)
    out = np.asfortranarray(np.full(d["x"].shape, 7.0, F32))
    expect_rejected(ValueError, "^out: has a different memory layout from x", forward(d, out=out), *all_buffers(d),
                    out)
    # the other way round: x channels-last (NHWC memory viewed as NCHW), out C-contiguous
    x = np.ascontiguousarray(rng.standard_normal((2, 4, 5, C)).astype(F32)).transpose(0, 3, 1, 2)
    out = np.full(x.shape, 7.0, F32)
    expect_rejected(ValueError, "^out: has a different memory layout from x", forward(d, x=x, out=out),
                    *all_buffers(d), x, out)


def test_backward_out_wrong_layout(rng):
    d = data(rng)
    m, s = saved(d)
    out = np.asfortranarray(np.full(d["x"].shape, 7.0, F32))
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, out=out)
    expect_rejected(ValueError, "^out: has a different memory layout from x", fn, *all_buffers(d), out, m, s)


# ---- axis, rank, density -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_out_of_range(rng, axis):
    d = data(rng)
    expect_rejected(ValueError, "^axis", forward(d, axis=axis), *all_buffers(d))
    expect_rejected(ValueError, "^axis", lambda: optkern.batch_norm_stats(d["x"], axis=axis), d["x"])
    m, s = saved(d)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, s, axis=axis, out=d["out"])
    expect_rejected(ValueError, "^axis", fn, *all_buffers(d), m, s)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_x_with_fewer_than_two_dims(rng, shape):
    d = data(rng)
    x = np.full(shape, 1.5, F32)
    expect_rejected(ValueError, "^x: expected at least 2 dimensions", forward(d, x=x, out=None), *all_buffers(d), x)
    expect_rejected(ValueError, "^x: expected at least 2 dimensions", lambda: optkern.batch_norm_stats(x), x)


@pytest.mark.parametrize("view", ["every_other_L", "every_other_N", "broadcast", "reversed"])
def test_non_dense_x(rng, view):
    d = data(rng)
    big = (rng.standard_normal((8, C, 10)) + 0.5).astype(F32)
    x = {"every_other_L": big[:4, :, ::2], "every_other_N": big[::2, :, :5],
         "broadcast": np.broadcast_to(big[:1, :, :5], (4, C, 5)), "reversed": big[:4, :, :5][::-1]}[view]
    expect_rejected(ValueError, "^x: ", forward(d, x=x, out=None), *all_buffers(d), big)
    expect_rejected(ValueError, "^x: ", lambda: optkern.batch_norm_stats(x), big)


# ---- running statistics ------------------------------------------------------------------------------------------
def test_eval_without_running_stats(rng):
    d = data(rng)
    expect_rejected(ValueError, "^running_mean", forward(d, training=False, running_mean=None, running_var=None),
                    *all_buffers(d))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("missing", ["running_var", "running_mean"])
def test_running_stats_given_alone(rng, training, missing):
    d = data(rng)
    expect_rejected(ValueError, "^running_mean: running_mean and running_var must be given together",
                    forward(d, training=training, **{missing: None}), *all_buffers(d))
    count, mean, m2 = optkern.batch_norm_stats(d["x"])
    kw = dict(running_mean=d["rm"], running_var=d["rv"])
    kw[missing] = None
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], count, mean, m2, out=d["out"], **kw)
    expect_rejected(ValueError, "^running_mean", fn, *all_buffers(d), mean, m2)


# ---- backward arguments ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, C, 5), (4, C, 6), (4, C), (4, C, 5, 1)])
def test_dy_shape_mismatch(rng, shape):
    d = data(rng)
    m, s = saved(d)
    dy = np.full(shape, 0.5, F32)
    fn = lambda: optkern.batch_norm_backward(dy, d["x"], d["w"], m, s, out=d["out"])
    expect_rejected(ValueError, r"^dy: expected shape \(4, 3, 5\) like x", fn, *all_buffers(d), dy, m, s)
    fn = lambda: optkern.batch_norm_backward_reduce(dy, d["x"], m)
    expect_rejected(ValueError, "^dy: expected shape", fn, *all_buffers(d), dy, m)


def test_dy_wrong_layout(rng):
    d = data(rng)
    m, s = saved(d)
    dy = np.asfortranarray(d["dy"])
    fn = lambda: optkern.batch_norm_backward(dy, d["x"], d["w"], m, s, out=d["out"])
    expect_rejected(ValueError, "^dy: has a different memory layout from x", fn, *all_buffers(d), dy, m, s)


@pytest.mark.parametrize("name", ["save_mean", "save_invstd"])
@pytest.mark.parametrize("n", [C - 1, C + 1])
def test_saved_stats_wrong_length(rng, name, n):
    d = data(rng)
    m, s = saved(d)
    bad = np.resize(m if name == "save_mean" else s, n)
    args = dict(save_mean=m, save_invstd=s)
    args[name] = bad
    for training in (True, False):
        fn = lambda training=training: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], out=d["out"],
                                                                   training=training, **args)
        expect_rejected(ValueError, rf"^{name}: expected shape \({C},\)", fn, *all_buffers(d), m, s, bad)


def test_saved_stats_missing(rng):
    d = data(rng)
    m, _ = saved(d)
    fn = lambda: optkern.batch_norm_backward(d["dy"], d["x"], d["w"], m, None, out=d["out"])
    expect_rejected(ValueError, "^save_mean", fn, *all_buffers(d), m)


def test_staged_stats_wrong_length(rng):
    d = data(rng)
    count, mean, m2 = optkern.batch_norm_stats(d["x"])
    short = mean[:2].copy()
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], count, short, m2, d["rm"], d["rv"],
                                              out=d["out"])
    expect_rejected(ValueError, r"^mean: expected shape \(3,\)", fn, *all_buffers(d), short, m2)
    m, s = saved(d)
    sdy, sdyx = optkern.batch_norm_backward_reduce(d["dy"], d["x"], m)
    fn = lambda: optkern.batch_norm_backward_dx(d["dy"], d["x"], d["w"], m, s, count, sdy[:2].copy(), sdyx,
                                                out=d["out"])
    expect_rejected(ValueError, r"^sum_dy: expected shape \(3,\)", fn, *all_buffers(d), m, s, sdy, sdyx)


# ---- combine -----------------------------------------------------------------------------------------------------
def _shard_stats(rng, shards=3):
    return [optkern.batch_norm_stats((rng.standard_normal((4, C, 5)) + 1).astype(F32)) for _ in range(shards)]


@pytest.mark.parametrize("counts_len", [2, 4])
@pytest.mark.parametrize("stacked", [False, True])
def test_combine_counts_length(rng, counts_len, stacked):
    st = _shard_stats(rng)
    means, m2s = [m for _, m, _ in st], [q for _, _, q in st]
    if stacked:
        means, m2s = np.stack(means), np.stack(m2s)
    counts = [20] * counts_len
    buffers = [means, m2s] if stacked else [*means, *m2s]
    expect_rejected(ValueError, "^counts: expected 3 counts", lambda: optkern.batch_norm_combine(counts, means, m2s),
                    *buffers)


def test_combine_bad_counts_and_rows(rng):
    st = _shard_stats(rng)
    means, m2s = np.stack([m for _, m, _ in st]), np.stack([q for _, _, q in st])
    expect_rejected(ValueError, "^counts", lambda: optkern.batch_norm_combine([], means, m2s), means, m2s)
    expect_rejected(ValueError, "^counts", lambda: optkern.batch_norm_combine([20, -1, 20], means, m2s), means, m2s)
    expect_rejected(ValueError, r"^m2s: expected shape \(3, 3\)",
                    lambda: optkern.batch_norm_combine([20] * 3, means, m2s[:2]), means, m2s)
    expect_rejected(ValueError, r"^m2s: expected shape \(3, 3\)",
                    lambda: optkern.batch_norm_combine([20] * 3, means, m2s[:, :2]), means, m2s)
