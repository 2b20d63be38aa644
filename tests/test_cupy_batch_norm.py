"""Batch norm on CUDA arrays (CuPy; torch CUDA tensors when available): the CPU suite's float64 reference checks,
layouts, staged (sharded) API, out=, determinism and stream ordering.  Skipped without CuPy and a CUDA device.

Tolerances and error measures are those of tests/test_batch_norm.py (imported from it): the per-element rules are
the same code on the GPU, and float32 statistics are held to the same float32-level bound.
"""

import os

import numpy as np
import optkern
import pytest
from reference import require_cupy_gpu

cupy = require_cupy_gpu("batch-norm")

from reference import rel_err
from test_batch_norm import (
    F32,
    F64,
    SHARD_CASES,
    STATS_TOL,
    TOL,
    WGRAD_TOL,
    dx_floor,
    make,
    ref_backward,
    ref_forward,
    stats_err,
)


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """CUDA kernels do not depend on the CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def gpu(a):
    return None if a is None else cupy.asarray(a)


def host(a):
    return None if a is None else cupy.asnumpy(a)


def gpu_like(a):
    """A CuPy array with the same values and the same memory layout (strides) as the dense NumPy array a."""
    order = np.argsort([-s for s in a.strides], kind="stable")  # axes from the largest stride to the smallest
    base = cupy.asarray(np.ascontiguousarray(a.transpose(order)))
    return base.transpose(tuple(np.argsort(order)))


LAYOUTS = [("NC", (1000, 7), 1), ("NC-odd", (33, 130), 1), ("NCL-rows", (5, 3, 63), 1), ("NCL-cf", (5, 3, 64), 1),
           ("cf-2chunks", (2, 3, 16385), 1), ("NCHW-rows", (3, 2, 4, 5), 1), ("NCHW-cf", (2, 3, 9, 9), 1),
           ("NHWC", (3, 5, 7, 6), -1), ("N2-C1", (2, 1), 1), ("C1-cf", (3, 1, 100), 1)]
MODES = [("train", True), ("eval", False)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("mode,training", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_matches_float64_reference(rng, name, shape, axis, mode, training, affine, dtype):
    x, dy, w, b, rm, rv = make(rng, shape, axis, dtype, affine=affine)
    ref_y, ref_mu, ref_invstd, ref_rm, ref_rv = ref_forward(x, w, b, rm, rv, training=training, axis=axis)
    ref_dx, ref_dw, ref_db = ref_backward(dy, x, w, ref_mu, ref_invstd, training=training, axis=axis)
    X, DY, W, B, RM, RV = (gpu(a) for a in (x, dy, w, b, rm, rv))
    y, mean, invstd = optkern.batch_norm_forward(X, W, B, RM, RV, training=training, axis=axis)
    dx, dw, db = optkern.batch_norm_backward(DY, X, W, mean, invstd, training=training, axis=axis)
    for out in (y, dx):
        assert isinstance(out, cupy.ndarray) and out.strides == X.strides and out.device.id == X.device.id
    assert isinstance(mean, cupy.ndarray) and mean.dtype == F64 and invstd.dtype == F64
    tol = TOL[dtype]
    assert rel_err(host(y), ref_y) <= tol
    assert max(stats_err(host(mean), host(invstd), ref_mu, ref_invstd)) <= STATS_TOL[dtype]
    assert rel_err(host(dx), ref_dx, floor=dx_floor(dy, w, ref_invstd)) <= tol
    if affine:
        assert rel_err(host(dw), ref_dw) <= WGRAD_TOL[dtype] and rel_err(host(db), ref_db) <= tol
    else:
        assert dw is None and db is None
    assert rel_err(host(RM), ref_rm) <= tol and rel_err(host(RV), ref_rv) <= tol


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_channels_last_view_and_momentum_none(rng, dtype):
    """An NCHW view of NHWC memory (axis 1) and momentum=None with num_batches_tracked."""
    x, dy, w, b, rm, rv = make(rng, (4, 6, 5, 7), 1, dtype)
    xv = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)
    dyv = np.ascontiguousarray(np.moveaxis(dy, 1, -1)).transpose(0, 3, 1, 2)
    ref_y, ref_mu, ref_invstd, ref_rm, ref_rv = ref_forward(x, w, b, rm, rv, momentum=None, num_batches_tracked=2)
    X, DY = gpu_like(xv), gpu_like(dyv)
    assert not X.flags.c_contiguous
    RM, RV = gpu(rm), gpu(rv)
    y, mean, invstd = optkern.batch_norm_forward(X, gpu(w), gpu(b), RM, RV, momentum=None, num_batches_tracked=2)
    assert y.strides == X.strides
    assert rel_err(host(y), ref_y) <= TOL[dtype]
    assert rel_err(host(RM), ref_rm) <= TOL[dtype] and rel_err(host(RV), ref_rv) <= TOL[dtype]
    dx, _, _ = optkern.batch_norm_backward(DY, X, gpu(w), mean, invstd)
    ref_dx, _, _ = ref_backward(dy, x, w, ref_mu, ref_invstd)
    assert dx.strides == X.strides
    assert rel_err(host(dx), ref_dx, floor=dx_floor(dy, w, ref_invstd)) <= TOL[dtype]


@pytest.mark.parametrize("shape,axis", [((4, 3, 80), 1), ((256, 5), 1), ((4, 6, 6, 8), -1), ((2, 2, 16400), 1)],
                         ids=["cf", "NC", "NHWC", "cf-2chunks"])
def test_large_offset_float32(rng, shape, axis):
    x = (1e4 + rng.standard_normal(shape)).astype(F32)
    dy = (0.3 + rng.standard_normal(shape)).astype(F32)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C).astype(F32), rng.standard_normal(C).astype(F32)
    ref_y, ref_mu, ref_invstd, _, _ = ref_forward(x, w, b, None, None, axis=axis)
    ref_dx, _, _ = ref_backward(dy, x, w, ref_mu, ref_invstd, axis=axis)
    y, mean, invstd = optkern.batch_norm_forward(gpu(x), gpu(w), gpu(b), None, None, axis=axis)
    err = float(np.max(np.abs(host(y).astype(F64) - ref_y)))
    assert err <= 1e-3 and err <= 5e-6, err
    assert rel_err(host(invstd), ref_invstd) <= STATS_TOL[F32]
    dx, _, _ = optkern.batch_norm_backward(gpu(dy), gpu(x), gpu(w), mean, invstd, axis=axis)
    assert rel_err(host(dx), ref_dx, floor=dx_floor(dy, w, ref_invstd)) <= TOL[F32]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,shape,axis,sizes", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_sharded_matches_unsharded(rng, name, shape, axis, sizes, dtype):
    x, dy, w, b, rm, rv = make(rng, shape, axis, dtype)
    cuts = np.cumsum(sizes)[:-1]
    xs = [gpu(s) for s in np.split(x, cuts, axis=0)]
    dys = [gpu(s) for s in np.split(dy, cuts, axis=0)]
    W, B = gpu(w), gpu(b)
    RMf, RVf = gpu(rm.copy()), gpu(rv.copy())
    y_full, mean_full, invstd_full = optkern.batch_norm_forward(gpu(x), W, B, RMf, RVf, axis=axis)
    dx_full, dw_full, db_full = optkern.batch_norm_backward(gpu(dy), gpu(x), W, mean_full, invstd_full, axis=axis)
    stats = [optkern.batch_norm_stats(s, axis=axis) for s in xs]
    count, mean, m2 = optkern.batch_norm_combine([c for c, _, _ in stats], cupy.stack([m for _, m, _ in stats]),
                                                 [q for _, _, q in stats])
    ys = []
    for s in xs:
        RM, RV = gpu(rm.copy()), gpu(rv.copy())  # each shard's own copy of the running statistics
        y, smean, sinv = optkern.batch_norm_normalize(s, W, B, count, mean, m2, RM, RV, axis=axis)
        ys.append(y)
        assert rel_err(host(RM), host(RMf)) <= TOL[dtype] and rel_err(host(RV), host(RVf)) <= TOL[dtype]
    assert rel_err(host(cupy.concatenate(ys, axis=0)), host(y_full)) <= TOL[dtype]
    sums = [optkern.batch_norm_backward_reduce(g, s, smean, axis=axis) for g, s in zip(dys, xs)]
    sum_dy, sum_dy_xmu = sum(a for a, _ in sums), sum(c for _, c in sums)
    outs = [optkern.batch_norm_backward_dx(g, s, W, smean, sinv, count, sum_dy, sum_dy_xmu, axis=axis)
            for g, s in zip(dys, xs)]
    _, _, ref_invstd, _, _ = ref_forward(x, w, b, None, None, axis=axis)
    dx = host(cupy.concatenate([o[0] for o in outs], axis=0))
    assert rel_err(dx, host(dx_full), floor=dx_floor(dy, w, ref_invstd)) <= TOL[dtype]
    assert rel_err(host(outs[0][1]), host(dw_full)) <= WGRAD_TOL[dtype]
    assert rel_err(host(outs[0][2]), host(db_full)) <= TOL[dtype]


@pytest.mark.parametrize("shape,axis", [((4, 8, 64, 64), 1), ((32, 32, 16, 8), -1)], ids=["NCHW", "NHWC"])
def test_out_and_determinism(rng, shape, axis):
    x, dy, w, b, rm, rv = (gpu(a) for a in make(rng, shape, axis, F32))
    r1 = optkern.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), axis=axis)
    buf = cupy.full_like(x, 7.0)
    r2 = optkern.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), axis=axis, out=buf)
    assert r2[0] is buf
    for a, c in zip(r1, r2):
        assert bool(cupy.all(a.view(cupy.uint8) == c.view(cupy.uint8)))
    g1 = optkern.batch_norm_backward(dy, x, w, r1[1], r1[2], axis=axis)
    gbuf = cupy.full_like(x, 7.0)
    g2 = optkern.batch_norm_backward(dy, x, w, r1[1], r1[2], axis=axis, out=gbuf)
    assert g2[0] is gbuf
    for a, c in zip(g1, g2):
        assert bool(cupy.all(a.view(cupy.uint8) == c.view(cupy.uint8)))


def test_runs_on_the_current_stream(rng):
    """Work is ordered on CuPy's current stream: results read on that stream after the call are complete."""
    x, _, w, b, _, _ = make(rng, (8, 16, 32, 32), 1, F32)
    ref_y, *_ = ref_forward(x, w, b, None, None)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        X = gpu(x)
        y, _, _ = optkern.batch_norm_forward(X, gpu(w), gpu(b), None, None)
        y_host = cupy.asnumpy(y, stream=stream)
        stream.synchronize()
    assert rel_err(y_host, ref_y) <= TOL[F32]


def test_device_mismatch_rejected(rng):
    x, _, w, b, rm, rv = make(rng, (4, 3, 5), 1, F32)
    X, RM, RV = gpu(x), gpu(rm), gpu(rv)
    rm0, rv0 = host(RM), host(RV)
    with pytest.raises(ValueError, match="^weight: expected an array on cuda"):
        optkern.batch_norm_forward(X, w, gpu(b), RM, RV)
    with pytest.raises(ValueError, match="^running_mean: expected an array on cuda"):
        optkern.batch_norm_forward(X, gpu(w), gpu(b), rm, RV)
    out = cupy.full_like(X, 7.0)
    with pytest.raises(ValueError, match="^out: overlaps x"):
        optkern.batch_norm_forward(X, gpu(w), gpu(b), RM, RV, out=X)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        optkern.batch_norm_forward(cupy.ascontiguousarray(X[:1, :, :1]), gpu(w), gpu(b), RM, RV)
    assert np.array_equal(host(RM), rm0) and np.array_equal(host(RV), rv0)
    assert bool(cupy.all(out == 7.0))


def test_torch_cuda_channels_last(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA")
    import torch.nn.functional as F

    x, dy, w, b, rm, rv = make(rng, (4, 6, 5, 7), 1, F32)
    xt = torch.from_numpy(x).cuda().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dyt = torch.from_numpy(dy).cuda().contiguous(memory_format=torch.channels_last)
    wt, bt = torch.from_numpy(w).cuda().requires_grad_(True), torch.from_numpy(b).cuda().requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm).cuda(), torch.from_numpy(rv).cuda()
    rm2, rv2 = rmt.clone(), rvt.clone()
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=True)
    yt.backward(dyt)
    with torch.no_grad():  # the raw functions refuse tensors that require grad under grad mode
        y, mean, invstd = optkern.batch_norm_forward(xt, wt, bt, rm2, rv2)
        dx, dw, db = optkern.batch_norm_backward(dyt, xt, wt, mean, invstd)
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.stride() == xt.stride() and dx.stride() == xt.stride()
    tol = 1e-4  # torch's own float32 kernel, as in test_batch_norm.TORCH_TOL["same"]
    assert rel_err(y.cpu().numpy(), yt.detach().cpu().numpy()) <= tol
    assert rel_err(dx.cpu().numpy(), xt.grad.cpu().numpy()) <= tol
    assert rel_err(dw.cpu().numpy(), wt.grad.cpu().numpy()) <= tol
    assert rel_err(db.cpu().numpy(), bt.grad.cpu().numpy()) <= tol
    assert rel_err(rm2.cpu().numpy(), rmt.cpu().numpy()) <= tol
    assert rel_err(rv2.cpu().numpy(), rvt.cpu().numpy()) <= tol


# ---- the rows scheme: CUDA equals the CPU bitwise ------------------------------------------------------------------
def offset_view(a, offset):
    """A CuPy copy of the C-contiguous array a that starts `offset` elements into its allocation (offset 1: not
    16-byte aligned, so the rows kernel takes scalar loads)."""
    flat = cupy.empty(a.size + offset, a.dtype)
    view = flat[offset:].reshape(a.shape)
    view[...] = cupy.asarray(a)
    return view


def all_ops(x, dy, w, b, rm, rv, axis, lib):
    """Every batch-norm op on one set of arrays (running statistics copied), results as NumPy arrays by name."""
    to_host = host if lib is cupy else (lambda a: a)
    out = {}
    RM, RV = rm.copy(), rv.copy()
    y, m, s = optkern.batch_norm_forward(x, w, b, RM, RV, axis=axis)
    out.update(y=y, mean=m, invstd=s, rm=RM, rv=RV)
    out["dx"], out["dw"], out["db"] = optkern.batch_norm_backward(dy, x, w, m, s, axis=axis)
    ye, me, se = optkern.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
    out["y_eval"] = ye
    out["dx_eval"], out["dw_eval"], out["db_eval"] = optkern.batch_norm_backward(dy, x, w, me, se, training=False,
                                                                                  axis=axis)
    n, sm, sm2 = optkern.batch_norm_stats(x, axis=axis)
    out["stats_mean"], out["stats_m2"] = sm, sm2
    out["sum_dy"], out["sum_dy_xmu"] = optkern.batch_norm_backward_reduce(dy, x, m, axis=axis)
    out["dx_staged"], _, _ = optkern.batch_norm_backward_dx(dy, x, w, m, s, n, out["sum_dy"], out["sum_dy_xmu"],
                                                            axis=axis)
    return {k: to_host(v) for k, v in out.items()}


def assert_bitwise(got, want):
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(np.ascontiguousarray(got[k]).view(np.uint8),
                              np.ascontiguousarray(want[k]).view(np.uint8)), f"{k} differs from the CPU's"


# (rows, C): several row blocks and groups (64-row blocks, groups of up to 4), odd and even column counts, widths
# the CPU's narrow path takes (16..64), a partial last block and a partial last column group.
ROWS_CASES = [(1000, 7), (4099, 130), (12544, 256), (3000, 64), (257, 33), (64, 4), (65, 1), (20, 5), (9001, 3)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("rows,C", ROWS_CASES, ids=[f"{r}x{c}" for r, c in ROWS_CASES])
def test_rows_scheme_equals_cpu_bitwise(rng, rows, C, offset, dtype):
    x, dy, w, b, rm, rv = make(rng, (rows, C), 1, dtype)
    want = all_ops(x, dy, w, b, rm, rv, 1, np)
    X, DY = offset_view(x, offset), offset_view(dy, offset)
    assert (X.data.ptr % 16 == 0) == (offset == 0)
    got = all_ops(X, DY, gpu(w), gpu(b), gpu(rm), gpu(rv), 1, cupy)
    assert_bitwise(got, want)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((8, 28, 28, 64), -1), ((4, 9, 7, 6), -1), ((33, 5, 3), 1), ((6, 3, 40), 1),
                                        ((2, 3, 16385), 1), ((4, 5, 9, 9), 1)],
                         ids=["NHWC64", "NHWC6", "rows-inner3", "rows-inner40", "cf-2chunks", "cf"])
def test_layouts_equal_cpu_bitwise(rng, shape, axis, dtype):
    """Channels-last (axis=-1), rows layouts with inner > 1, and channels-first: CUDA equals the CPU bitwise."""
    x, dy, w, b, rm, rv = make(rng, shape, axis, dtype)
    want = all_ops(x, dy, w, b, rm, rv, axis, np)
    got = all_ops(gpu(x), gpu(dy), gpu(w), gpu(b), gpu(rm), gpu(rv), axis, cupy)
    assert_bitwise(got, want)


def test_torch_like_channels_last_view_equals_cpu_bitwise(rng):
    """An NCHW view of NHWC memory (axis=1) is the rows layout too."""
    x, dy, w, b, rm, rv = make(rng, (4, 6, 5, 7), 1, F32)
    xv = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)
    dyv = np.ascontiguousarray(np.moveaxis(dy, 1, -1)).transpose(0, 3, 1, 2)
    want = all_ops(xv, dyv, w, b, rm, rv, 1, np)
    got = all_ops(gpu_like(xv), gpu_like(dyv), gpu(w), gpu(b), gpu(rm), gpu(rv), 1, cupy)
    assert_bitwise(got, want)


@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 5), 1), ((2, 3, 0), 1), ((0, 3, 80), 1),
                                        ((0, 4, 4, 3), -1)], ids=["N0", "N0-rows", "width0", "N0-cf", "N0-NHWC"])
def test_zero_size_inputs_equal_cpu(rng, shape, axis):
    """Empty inputs on the GPU: y empty, running statistics untouched, zero statistics and weight gradients, as
    on the CPU (and as torch)."""
    x = np.empty(shape, F32)
    w, b = rng.uniform(0.5, 1.5, 3).astype(F32), rng.standard_normal(3).astype(F32)
    rm, rv = rng.standard_normal(3).astype(F32), rng.uniform(0.5, 1.5, 3).astype(F32)
    want = all_ops(x, x, w, b, rm, rv, axis, np)
    got = all_ops(gpu(x), gpu(x), gpu(w), gpu(b), gpu(rm), gpu(rv), axis, cupy)
    assert_bitwise(got, want)
    np.testing.assert_array_equal(got["rm"], rm)
    np.testing.assert_array_equal(got["rv"], rv)
    assert np.all(got["dw"] == 0) and np.all(got["db"] == 0) and np.all(got["invstd"] == 0)
