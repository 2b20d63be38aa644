"""Batch norm's inputs: what is not an array, 16-bit statistics, checks before conversion, and empty inputs.

Every public batch_norm_* function refuses bad input with a TypeError or ValueError that names the argument, and
writes nothing (outputs and running statistics are compared bitwise with copies taken before the call).  Empty
inputs follow torch (torch.nn.functional.batch_norm is the reference where it is defined).
"""

import tracemalloc

import numpy as np
import optkern
import pytest

F32, F64 = np.float32, np.float64
C = 3


def data(rng, shape=(6, C, 5), dtype=F32):
    x = (rng.standard_normal(shape) * 1.5 + 0.7).astype(dtype)
    dy = (rng.standard_normal(shape) + 0.3).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = (rng.standard_normal(C) * 0.3 + 0.2).astype(dtype)
    rv = rng.uniform(0.5, 1.5, C).astype(dtype)
    _, m, s = optkern.batch_norm_forward(x, w, b, None, None)
    return {"x": x, "dy": dy, "w": w, "b": b, "rm": rm, "rv": rv, "m": m, "s": s, "out": np.full_like(x, 7.0),
                "sdy": rng.standard_normal(C), "sdyx": rng.standard_normal(C)}


def expect_rejected(exc, match, fn, *buffers):
    snap = [(a, a.copy()) for a in buffers]
    with pytest.raises(exc, match=match):
        fn()
    for a, before in snap:
        assert np.array_equal(a.view(np.uint8), before.view(np.uint8)), "a buffer was written on refusal"


def calls(d, **over):
    """Every public function on d's arrays, with overrides by argument name; name -> (zero-arg call, buffers)."""
    g = dict(d)
    g.update(over)
    x, dy, w, b, rm, rv, m, s, out = (g[k] for k in ("x", "dy", "w", "b", "rm", "rv", "m", "s", "out"))
    n = 6 * 5
    bufs = [d[k] for k in ("out", "rm", "rv", "m", "s", "sdy", "sdyx")]
    return {
        "forward": (lambda: optkern.batch_norm_forward(x, w, b, rm, rv, out=out), bufs),
        "forward_eval": (lambda: optkern.batch_norm_forward(x, w, b, rm, rv, training=False, out=out), bufs),
        "backward": (lambda: optkern.batch_norm_backward(dy, x, w, m, s, out=out), bufs),
        "backward_eval": (lambda: optkern.batch_norm_backward(dy, x, w, m, s, training=False, out=out), bufs),
        "stats": (lambda: optkern.batch_norm_stats(x), bufs),
        "normalize": (lambda: optkern.batch_norm_normalize(x, w, b, n, m, g.get("m2", s), rm, rv, out=out), bufs),
        "backward_reduce": (lambda: optkern.batch_norm_backward_reduce(dy, x, m), bufs),
        "backward_dx": (lambda: optkern.batch_norm_backward_dx(dy, x, w, m, s, n, g.get("sdy", d["sdy"]),
                                                               g.get("sdyx", d["sdyx"]), out=out), bufs),
    }


ALL = ["forward", "forward_eval", "backward", "backward_eval", "stats", "normalize", "backward_reduce",
       "backward_dx"]
WITH_DY = ["backward", "backward_eval", "backward_reduce", "backward_dx"]
WITH_W = ["forward", "forward_eval", "backward", "backward_eval", "normalize", "backward_dx"]


# ---- not arrays --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("bad", [[[1.0, 2.0, 3.0]] * 4, None, 3.0, "x"], ids=["list", "None", "float", "str"])
def test_x_not_an_array(rng, fn, bad):
    d = data(rng)
    call, bufs = calls(d, x=bad)[fn]
    expect_rejected(TypeError, r"^x: expected an array", call, *bufs)


@pytest.mark.parametrize("fn", WITH_DY)
@pytest.mark.parametrize("bad", [[[1.0]], None], ids=["list", "None"])
def test_dy_not_an_array(rng, fn, bad):
    d = data(rng)
    call, bufs = calls(d, dy=bad)[fn]
    expect_rejected(TypeError, r"^dy: expected an array", call, *bufs)


@pytest.mark.parametrize("fn", WITH_W)
def test_weight_a_list_is_refused(rng, fn):
    d = data(rng)
    call, bufs = calls(d, w=[1.0, 1.0, 1.0])[fn]
    expect_rejected(TypeError, r"^weight: expected an array", call, *bufs)


def test_memoryview_arrays_are_read_in_place(rng):
    """A memoryview (or any buffer-protocol object) is a NumPy view of the same memory: same results, and a
    writable one is updated in place."""
    d = data(rng)
    ref = optkern.batch_norm_forward(d["x"], d["w"], d["b"], d["rm"].copy(), d["rv"].copy())
    rm, rv = d["rm"].copy(), d["rv"].copy()
    got = optkern.batch_norm_forward(d["x"], memoryview(d["w"]), memoryview(d["b"]), memoryview(rm), memoryview(rv))
    for a, c in zip(ref, got):
        np.testing.assert_array_equal(a, c)
    ref_rm, ref_rv = d["rm"].copy(), d["rv"].copy()
    optkern.batch_norm_forward(d["x"], d["w"], d["b"], ref_rm, ref_rv)
    np.testing.assert_array_equal(rm, ref_rm)  # updated in place through the memoryview
    np.testing.assert_array_equal(rv, ref_rv)
    gref = optkern.batch_norm_backward(d["dy"], d["x"], d["w"], d["m"], d["s"])
    gmv = optkern.batch_norm_backward(d["dy"], d["x"], memoryview(d["w"]), memoryview(d["m"]), memoryview(d["s"]))
    for a, c in zip(gref, gmv):
        np.testing.assert_array_equal(a, c)


# ---- statistics passed in: dtype and shape, checked before any conversion ----------------------------------------
STAT_ARGS = [("backward", "m", "save_mean"), ("backward", "s", "save_invstd"), ("normalize", "m", "mean"),
             ("normalize", "m2", "m2"), ("backward_reduce", "m", "save_mean"), ("backward_dx", "s", "save_invstd"),
             ("backward_dx", "sdy", "sum_dy"), ("backward_dx", "sdyx", "sum_dy_xmu")]


@pytest.mark.parametrize("fn,key,name", STAT_ARGS, ids=[f"{a}-{c}" for a, _, c in STAT_ARGS])
def test_float16_statistics_are_a_type_error(rng, fn, key, name):
    d = data(rng)
    call, bufs = calls(d, **{key: d["s"].astype(np.float16)})[fn]
    expect_rejected(TypeError, rf"^{name}: expected float32 or float64 statistics, got float16", call, *bufs)


@pytest.mark.parametrize("fn,key,name", STAT_ARGS, ids=[f"{a}-{c}" for a, _, c in STAT_ARGS])
def test_bfloat16_torch_statistics_are_a_type_error(rng, fn, key, name):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    d = data(rng)
    call, bufs = calls(d, **{key: torch.from_numpy(d["s"]).to(torch.bfloat16)})[fn]
    expect_rejected(TypeError, rf"^{name}: expected float32 or float64 statistics, got bfloat16", call, *bufs)


@pytest.mark.parametrize("fn,key,name", STAT_ARGS, ids=[f"{a}-{c}" for a, _, c in STAT_ARGS])
def test_statistics_shape_is_checked_before_conversion(rng, fn, key, name):
    """A float32 zero-stride view of 2^31 elements is refused by its shape, without converting it (17 GB)."""
    d = data(rng)
    huge = np.broadcast_to(np.float32(1.0), (2**31,))
    call, bufs = calls(d, **{key: huge})[fn]
    tracemalloc.start()
    try:
        expect_rejected(ValueError, rf"^{name}: expected shape \(3,\)", call, *bufs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


@pytest.mark.parametrize("fn", WITH_W)
def test_weight_shape_is_checked_before_allocating_like_it(rng, fn):
    d = data(rng)
    call, bufs = calls(d, w=np.broadcast_to(np.float32(1.0), (2**31,)))[fn]
    tracemalloc.start()
    try:
        expect_rejected(ValueError, r"^weight: expected shape \(3,\)", call, *bufs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


@pytest.mark.parametrize("fn", ALL)
def test_x_dtype_and_layout_are_checked_before_allocating(rng, fn):
    d = data(rng)
    call, bufs = calls(d, x=d["x"].astype(np.int32), out=None)[fn]
    expect_rejected(TypeError, r"^x: expected float32, float64, bfloat16 or float16, got int32", call, *bufs)
    big = np.broadcast_to(np.float32(1.0), (2**16, C, 2**15))  # 2^32 elements, zero strides: not dense
    call, bufs = calls(d, x=big, out=None)[fn]
    tracemalloc.start()
    try:
        expect_rejected(ValueError, r"^x: expected a dense array", call, *bufs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_combine_refuses_what_is_not_statistics(rng):
    m = rng.standard_normal((2, C))
    with pytest.raises(TypeError, match=r"^means: expected an array"):
        optkern.batch_norm_combine([3, 4], None, m)
    with pytest.raises(TypeError, match=r"^m2s\[1\]: expected an array"):
        optkern.batch_norm_combine([3, 4], [m[0], m[1]], [m[0], "m"])
    with pytest.raises(TypeError, match=r"^means: expected float32 or float64 statistics, got float16"):
        optkern.batch_norm_combine([3, 4], m.astype(np.float16), m)
    with pytest.raises(ValueError, match=r"^m2s\[1\]: expected shape \(3,\)"):
        optkern.batch_norm_combine([3, 4], [m[0], m[1]], [m[0], m[1, :2]])
    with pytest.raises(TypeError, match=r"^counts: expected a sequence of ints"):
        optkern.batch_norm_combine([3, "four"], m, m)


def test_staged_count_covers_the_local_values(rng):
    d = data(rng)
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], 29, d["m"], d["s"], d["rm"], d["rv"],
                                              out=d["out"])
    expect_rejected(ValueError, r"^count: expected the number of values per channel over all shards \(at least "
                    r"the local 30\), got 29", fn, d["out"], d["rm"], d["rv"])
    fn = lambda: optkern.batch_norm_backward_dx(d["dy"], d["x"], d["w"], d["m"], d["s"], 0, d["sdy"], d["sdyx"],
                                                out=d["out"])
    expect_rejected(ValueError, r"^count: ", fn, d["out"])
    fn = lambda: optkern.batch_norm_normalize(d["x"], d["w"], d["b"], 30.0, d["m"], d["s"])
    expect_rejected(TypeError, r"^count: expected an int", fn, d["out"])


# ---- empty inputs ------------------------------------------------------------------------------------------------
EMPTY = [((0, C), 1), ((0, C, 5), 1), ((2, C, 0), 1), ((0, C, 80), 1), ((0, 4, 4, C), -1), ((2, 0, 4, C), -1)]
EMPTY_IDS = ["N0-NC", "N0-rows", "L0-width0", "N0-cf", "N0-NHWC", "H0-NHWC"]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", EMPTY, ids=EMPTY_IDS)
def test_empty_input_follows_torch(rng, shape, axis, dtype):
    """numel 0 with C >= 1 (the rows layout with width 0 among them): y empty, running statistics untouched,
    save_mean = save_invstd = 0, backward dx empty and zero dweight/dbias; in training and in eval."""
    x = np.empty(shape, dtype)
    dy = np.empty(shape, dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm0, rv0 = (rng.standard_normal(C) * 0.3).astype(dtype), rng.uniform(0.5, 1.5, C).astype(dtype)
    for training in (True, False):
        rm, rv = rm0.copy(), rv0.copy()
        y, m, s = optkern.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
        assert y.shape == shape and y.dtype == dtype
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
        if training:
            np.testing.assert_array_equal(m, np.zeros(C))
            np.testing.assert_array_equal(s, np.zeros(C))
        else:
            np.testing.assert_array_equal(m, rm0.astype(F64))
        dx, dw, db = optkern.batch_norm_backward(dy, x, w, m, s, training=training, axis=axis)
        assert dx.shape == shape
        np.testing.assert_array_equal(dw, np.zeros(C, dtype))
        np.testing.assert_array_equal(db, np.zeros(C, dtype))
    # the staged calls: an empty shard
    n, m, m2 = optkern.batch_norm_stats(x, axis=axis)
    assert n == 0 and np.all(m == 0) and np.all(m2 == 0)
    sdy, sdyx = optkern.batch_norm_backward_reduce(dy, x, m, axis=axis)
    np.testing.assert_array_equal(sdy, np.zeros(C))
    np.testing.assert_array_equal(sdyx, np.zeros(C))
    rm, rv = rm0.copy(), rv0.copy()
    y, _, _ = optkern.batch_norm_normalize(x, w, b, 0, m, m2, rm, rv, axis=axis)
    assert y.shape == shape
    np.testing.assert_array_equal(rm, rm0)
    dx, dw, db = optkern.batch_norm_backward_dx(dy, x, w, m, s, 0, sdy, sdyx, axis=axis)
    assert dx.shape == shape and np.all(dw == 0) and np.all(db == 0)


@pytest.mark.parametrize("shape", [(0, C), (2, C, 0)], ids=["N0", "L0"])
def test_empty_input_matches_torch_module(rng, shape):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    F = torch.nn.functional
    w = rng.uniform(0.5, 1.5, C).astype(F32)
    b = rng.standard_normal(C).astype(F32)
    rm, rv = np.full(C, 0.25, F32), np.full(C, 2.0, F32)
    xt = torch.empty(shape, requires_grad=True)
    wt, bt = torch.from_numpy(w.copy()).requires_grad_(True), torch.from_numpy(b.copy()).requires_grad_(True)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = F.batch_norm(xt, trm, trv, wt, bt, training=True)
    yt.sum().backward()
    y, m, s = optkern.batch_norm_forward(np.empty(shape, F32), w, b, rm, rv)
    assert y.shape == tuple(yt.shape)
    np.testing.assert_array_equal(rm, trm.numpy())
    np.testing.assert_array_equal(rv, trv.numpy())
    _, dw, db = optkern.batch_norm_backward(np.empty(shape, F32), np.empty(shape, F32), w, m, s)
    np.testing.assert_array_equal(dw, wt.grad.numpy())
    np.testing.assert_array_equal(db, bt.grad.numpy())


@pytest.mark.parametrize("shape,axis", [((4, 0), 1), ((4, 0, 5), 1), ((2, 5, 0), -1)], ids=["NC", "NCL", "NHWC"])
def test_no_channels_is_a_value_error(rng, shape, axis):
    x = np.empty(shape, F32)
    for call in (lambda: optkern.batch_norm_forward(x, None, None, None, None, axis=axis),
                 lambda: optkern.batch_norm_stats(x, axis=axis),
                 lambda: optkern.batch_norm_backward(x, x, None, np.zeros(0), np.zeros(0), axis=axis)):
        with pytest.raises(ValueError, match=r"^x: expected at least one channel"):
            call()


def test_one_value_per_channel_is_still_refused_in_training(rng):
    """torch refuses exactly one value per channel (not zero)."""
    x = rng.standard_normal((1, C)).astype(F32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        optkern.batch_norm_forward(x, None, None, None, None)
