"""Batch norm (optkern.batch_norm_*): correctness against a float64 NumPy transcription of seed 000's box and against
torch.nn.functional.batch_norm + autograd, on every layout and code path; the staged (sharded) API; out=, zero
copy, and bitwise determinism across calls, thread counts and CPU instruction-set paths.

Error measure, unless a test says otherwise: ``rel_err(a, ref) = max|a - ref| / max|ref|`` over the whole array
(tests/reference.py).  For dx the denominator is floored at ``max|gamma * invstd| * max|dy|``, the size of the
largest term of the gradient formula: with N = 2 values per channel the training dx is exactly zero in real
arithmetic (xhat = +-1), so its own maximum is rounding noise and says nothing about the kernel.  For random data
of more than a few values per channel the floor is about max|dx| itself, so it does not loosen the check.

The library switches between a channels-first kernel (inner = product of the dims after the channel axis >= 64)
and a rows kernel (inner < 64, including channels-last), and cuts channels-first runs into chunks of 16384
values; the shapes below are chosen to land on both sides of each switch and on every SIMD tail length.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import optkern
from reference import rel_err

F32, F64 = np.float32, np.float64
TORCH_REASON = "torch (pip install torch==2.13.0) is needed for the comparisons with torch.nn.functional.batch_norm"
BEST_ISA = optkern.cpu_best_isa()


# ---- float64 NumPy reference: seed 000's box, h'_kn = beta_k + gamma_k (h_kn - mu_k) / sqrt(eps + sigma_k^2) -----
def _geometry(x, axis):
    ndim = x.ndim
    ax = axis % ndim
    C = x.shape[ax]
    red = tuple(d for d in range(ndim) if d != ax)
    bshape = [1] * ndim
    bshape[ax] = C
    return ax, C, red, tuple(bshape), (x.size // C if C else 0)


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def ref_forward(x, weight, bias, running_mean, running_var, *, training=True, momentum=0.1, eps=1e-5, axis=1,
                num_batches_tracked=None):
    """Seed 000's formula in float64 from the same inputs (any dtype).

    Returns (y, mu, invstd, new_running_mean, new_running_var); the running statistics are None when not given.
    mu and sigma^2 are the batch's mean and biased variance in training, the running statistics in eval; the
    running update uses the unbiased variance (torch), with factor momentum or 1/num_batches_tracked."""
    h = _f64(x)
    _, C, red, bs, M = _geometry(h, axis)
    gamma = np.ones(C) if weight is None else _f64(weight)
    beta = np.zeros(C) if bias is None else _f64(bias)
    rm, rv = _f64(running_mean), _f64(running_var)
    if training:
        mu = h.mean(axis=red)
        sigma2 = ((h - mu.reshape(bs)) ** 2).mean(axis=red)
    else:
        mu, sigma2 = rm, rv
    y = beta.reshape(bs) + gamma.reshape(bs) * ((h - mu.reshape(bs)) / np.sqrt(eps + sigma2.reshape(bs)))
    invstd = 1.0 / np.sqrt(eps + sigma2)
    new_rm, new_rv = (None, None) if rm is None else (rm.copy(), rv.copy())
    if training and rm is not None:
        f = momentum if momentum is not None else 1.0 / num_batches_tracked
        new_rm = (1.0 - f) * rm + f * mu
        new_rv = (1.0 - f) * rv + f * sigma2 * M / (M - 1)
    return y, mu, invstd, new_rm, new_rv


def ref_backward(dy, x, weight, mean, invstd, *, training=True, axis=1):
    """The notes' formulas (shared/notes/batch-norm.md) in float64: returns (dx, dgamma, dbeta).

    training: dbeta = sum dy; dgamma = sum dy xhat; dx = gamma invstd / M (M dy - dbeta - xhat dgamma)
    eval:     dx = dy gamma invstd (the statistics are constants), same dgamma and dbeta."""
    g, h = _f64(dy), _f64(x)
    _, C, red, bs, M = _geometry(h, axis)
    gamma = np.ones(C) if weight is None else _f64(weight)
    mean, invstd = _f64(mean), _f64(invstd)
    xhat = (h - mean.reshape(bs)) * invstd.reshape(bs)
    dbeta = g.sum(axis=red)
    dgamma = (g * xhat).sum(axis=red)
    if training:
        dx = (gamma * invstd / M).reshape(bs) * (M * g - dbeta.reshape(bs) - xhat * dgamma.reshape(bs))
    else:
        dx = g * (gamma * invstd).reshape(bs)
    return dx, dgamma, dbeta


def dx_floor(dy, weight, invstd):
    """Scale of the dx formula's largest term: max|gamma invstd| max|dy| (see the module docstring)."""
    C = len(invstd)
    gamma = np.ones(C) if weight is None else _f64(weight)
    return float(np.max(np.abs(gamma * _f64(invstd)))) * float(np.max(np.abs(_f64(dy))))


# ---- data --------------------------------------------------------------------------------------------------------
def make(rng, shape, axis=1, dtype=F32, affine=True, running=True, offset=0.0):
    """Fresh random data with a non-zero mean per channel (never zeros): x, dy, weight, bias, rm, rv."""
    ax = axis % len(shape)
    C = shape[ax]
    bs = [1] * len(shape)
    bs[ax] = C
    chan_mean = rng.uniform(-2.0, 2.0, C).reshape(bs) + 0.5
    chan_std = rng.uniform(0.5, 2.0, C).reshape(bs)
    x = (offset + chan_mean + chan_std * rng.standard_normal(shape)).astype(dtype)
    dy = (0.3 + rng.standard_normal(shape)).astype(dtype)
    w = b = rm = rv = None
    if affine:
        w = (rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C)).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
    if running:
        rm = (0.5 * rng.standard_normal(C) + 0.1).astype(dtype)
        rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    return x, dy, w, b, rm, rv


def copy_or_none(a):
    return None if a is None else a.copy()


def bits_equal(a, b):
    a, b = to_numpy(a), to_numpy(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def to_numpy(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    return a.detach().cpu().numpy()  # torch


def offset_view(a):
    """The same values in a view that starts one element into a larger buffer (odd alignment)."""
    base = np.full(a.size + 3, 7.0, a.dtype)
    v = base[1:1 + a.size].reshape(a.shape)
    v[...] = a
    assert v.ctypes.data % 8 != 0 or a.dtype == F64
    return v


# Tolerances against float64 math on the same inputs (rel_err as in the module docstring).  float32: the output is
# a few roundings of float32 values (xhat, scale, shift) plus the float32-level error of the statistics (below);
# measured worst over 300 random draws per layout: y 8.6e-7, dx 5.3e-7, dbias 1.6e-7, running stats 2e-7.
TOL = {F64: 1e-12, F32: 2e-6}
# Weight gradients are float32 reductions of M products that cancel (sum dy xhat ~ sqrt(M) of sum |dy xhat|), so
# relative to their own maximum they carry about sqrt(M) times the per-term rounding: measured up to 2.5e-6
# (M = 272) and 8.2e-6 (M = 32800, offset data); float64 stays below 5e-14 of the NumPy reference.
WGRAD_TOL = {F64: 1e-12, F32: 2e-5}


def stats_err(mean, invstd, ref_mu, ref_invstd):
    """(max_c |mean - mu| invstd_c, rel_err(invstd)): the mean's error in units of the channel's sigma (a mean near
    zero makes a relative measure meaningless) and invstd's relative error.  float32 data: the kernels sum x - K in
    float32 lanes over short blocks (then in float64), so the statistics carry float32-level rounding (~1e-7), not
    float64's, even though they are returned as float64."""
    mu_err = float(np.max(np.abs(_f64(mean) - ref_mu) * ref_invstd))
    return mu_err, rel_err(invstd, ref_invstd)


STATS_TOL = {F64: 1e-12, F32: 2e-6}  # float32 measured up to 8.8e-7 (300 draws per layout)


# ---- 1. the seed formula in float64, optkern in float32 and float64 --------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((4, 3, 70), 1), ((3, 4, 5, 6), -1)],
                         ids=["NC", "NCL-cf", "NHWC"])
@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["m0.1", "m0.7", "mNone"])
def test_forward_train_matches_seed_formula(rng, dtype, shape, axis, momentum):
    x, _, w, b, rm, rv = make(rng, shape, axis, dtype)
    nbt = 3 if momentum is None else None
    ref_y, ref_mu, ref_invstd, ref_rm, ref_rv = ref_forward(x, w, b, rm, rv, training=True, momentum=momentum,
                                                            eps=1e-3, axis=axis, num_batches_tracked=nbt)
    y, mean, invstd = optkern.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=momentum, eps=1e-3,
                                                 axis=axis, num_batches_tracked=nbt)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == F64 and invstd.dtype == F64 and mean.shape == invstd.shape == (x.shape[axis],)
    assert rm.dtype == dtype and rv.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(y, ref_y) <= tol
    # statistics are float64 arrays whatever x's dtype
    assert max(stats_err(mean, invstd, ref_mu, ref_invstd)) <= STATS_TOL[dtype]
    # running statistics are stored in x's dtype: one rounding of the float64 update
    assert rel_err(rm, ref_rm) <= tol
    assert rel_err(rv, ref_rv) <= tol


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((4, 3, 70), 1), ((3, 4, 5, 6), -1)],
                         ids=["NC", "NCL-cf", "NHWC"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_eval_matches_seed_formula(rng, dtype, shape, axis, affine):
    x, dy, w, b, rm, rv = make(rng, shape, axis, dtype, affine=affine)
    rm0, rv0 = rm.copy(), rv.copy()
    ref_y, ref_mu, ref_invstd, _, _ = ref_forward(x, w, b, rm, rv, training=False, axis=axis)
    y, mean, invstd = optkern.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
    assert bits_equal(rm, rm0) and bits_equal(rv, rv0), "eval must not update the running statistics"
    assert rel_err(y, ref_y) <= TOL[dtype]
    # eval returns save_mean = running_mean and save_invstd = 1/sqrt(running_var + eps), in float64
    assert mean.dtype == F64 and np.array_equal(mean, rm.astype(F64))
    assert invstd.dtype == F64 and rel_err(invstd, ref_invstd) <= 1e-15
    # eval backward: dx = dy gamma invstd; dgamma = sum dy xhat; dbeta = sum dy (xhat with the running stats)
    ref_dx, ref_dw, ref_db = ref_backward(dy, x, w, ref_mu, ref_invstd, training=False, axis=axis)
    dx, dw, db = optkern.batch_norm_backward(dy, x, w, mean, invstd, training=False, axis=axis)
    assert rel_err(dx, ref_dx) <= TOL[dtype]
    if affine:
        assert dw.dtype == dtype and db.dtype == dtype
        assert rel_err(dw, ref_dw) <= WGRAD_TOL[dtype]
        assert rel_err(db, ref_db) <= TOL[dtype]
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((2, 3), 1), ((4, 3, 70), 1), ((3, 4, 5, 6), -1),
                                        ((2, 3, 16385), 1)], ids=["NC", "NC-N2", "NCL-cf", "NHWC", "cf-2chunks"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_train_matches_notes_formula(rng, dtype, shape, axis, affine):
    x, dy, w, b, _, _ = make(rng, shape, axis, dtype, affine=affine)
    _, ref_mu, ref_invstd, _, _ = ref_forward(x, w, b, None, None, training=True, axis=axis)
    ref_dx, ref_dw, ref_db = ref_backward(dy, x, w, ref_mu, ref_invstd, training=True, axis=axis)
    _, mean, invstd = optkern.batch_norm_forward(x, w, b, None, None, axis=axis)
    dx, dw, db = optkern.batch_norm_backward(dy, x, w, mean, invstd, axis=axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    tol = TOL[dtype]
    assert rel_err(dx, ref_dx, floor=dx_floor(dy, w, ref_invstd)) <= tol
    if affine:
        assert rel_err(dw, ref_dw) <= WGRAD_TOL[dtype]
        assert rel_err(db, ref_db) <= tol
    else:
        assert dw is None and db is None


def test_cumulative_average_over_batches(rng):
    """momentum=None: factor 1/num_batches_tracked (counting this batch), batch after batch."""
    C = 4
    rm = np.full(C, 0.25, F64)
    rv = np.full(C, 1.5, F64)
    ref_rm, ref_rv = rm.copy(), rv.copy()
    for k in range(1, 5):
        x, *_ = make(rng, (7, C, 3), 1, F64)
        optkern.batch_norm_forward(x, None, None, rm, rv, momentum=None, num_batches_tracked=k)
        _, _, _, ref_rm, ref_rv = ref_forward(x, None, None, ref_rm, ref_rv, momentum=None, num_batches_tracked=k)
        assert rel_err(rm, ref_rm) <= 1e-12 and rel_err(rv, ref_rv) <= 1e-12
    # after batch 1 (factor 1) the initial values are forgotten: rm is the mean of the batch means
    assert not np.allclose(rm, 0.25)


@pytest.mark.parametrize("n", range(1, 18))
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_tail_sizes(rng, n, dtype):
    """Sizes 1..17 in every position a SIMD loop can leave a tail: rows width (C), rows count (N), channels-first
    run length (64 + n, 16384 + n would be too slow per size) and the rows kernel's inner (n)."""
    cases = [((n + 1, n), 1), ((n + 1, 3, n), 1), ((2, 2, 64 + n), 1), ((n + 1, 2, 3, n), -1), ((3, n), 1)]
    for shape, axis in cases:
        x, dy, w, b, rm, rv = make(rng, shape, axis, dtype)
        ref_y, ref_mu, ref_invstd, ref_rm, ref_rv = ref_forward(x, w, b, rm, rv, axis=axis)
        y, mean, invstd = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis)
        assert rel_err(y, ref_y) <= TOL[dtype], shape
        assert max(stats_err(mean, invstd, ref_mu, ref_invstd)) <= STATS_TOL[dtype], shape
        assert rel_err(rm, ref_rm) <= TOL[dtype] and rel_err(rv, ref_rv) <= TOL[dtype], shape
        ref_dx, ref_dw, ref_db = ref_backward(dy, x, w, ref_mu, ref_invstd, axis=axis)
        dx, dw, db = optkern.batch_norm_backward(dy, x, w, mean, invstd, axis=axis)
        assert rel_err(dx, ref_dx, floor=dx_floor(dy, w, ref_invstd)) <= TOL[dtype], shape
        assert rel_err(dw, ref_dw) <= WGRAD_TOL[dtype] and rel_err(db, ref_db) <= TOL[dtype], shape


# ---- 2. against torch.nn.functional.batch_norm + autograd ---------------------------------------------------------
# (id, logical shape, axis, kind): kind "np" C-contiguous NumPy; "np_offset" a NumPy view one element into a larger
# buffer; "np_nchw_view" an NCHW NumPy view of NHWC memory (axis 1, inner 1); "np_hcnw_view" an NCHW view of
# (H, C, N, W) memory (outer H, inner N*W: 64 -> channels-first, 28 -> rows); "torch_cl" / "torch_cl3d" torch
# channels_last / channels_last_3d tensors passed directly.
LAYOUTS = [
    ("NC-1000x7", (1000, 7), 1, "np"),
    ("NC-33x130", (33, 130), 1, "np"),
    ("NC-2x1-minimal", (2, 1), 1, "np"),
    ("NCL-rows-inner63", (5, 3, 63), 1, "np"),
    ("NCL-cf-inner64", (5, 3, 64), 1, "np"),
    ("NCL-cf-2chunks", (2, 3, 16385), 1, "np"),
    ("NCL-C1-cf", (3, 1, 100), 1, "np"),
    ("NCHW-rows-inner20", (3, 2, 4, 5), 1, "np"),
    ("NCHW-cf-inner81", (2, 3, 9, 9), 1, "np"),
    ("NCDHW-cf-inner72", (2, 3, 3, 4, 6), 1, "np"),
    ("NHWC-axis-1", (3, 5, 7, 6), -1, "np"),
    ("NLC-axis-1", (4, 65, 3), -1, "np"),
    # rows whose width is 16/32/48/64 values take the register-resident narrow reduction
    ("NHWC-C16-narrow", (5, 3, 7, 16), -1, "np"),
    ("NC-300x48-narrow", (300, 48), 1, "np"),
    ("NHWC-C64-narrow", (3, 5, 6, 64), -1, "np"),
    ("NCL-C2-inner16-narrow", (40, 2, 16), 1, "np"),
    ("NCL-offset1", (5, 3, 67), 1, "np_offset"),
    ("NC-offset1", (9, 5), 1, "np_offset"),
    ("NCHW-view-of-NHWC", (3, 4, 5, 6), 1, "np_nchw_view"),
    ("NCHW-view-of-HCNW-cf", (4, 3, 5, 16), 1, "np_hcnw_view"),
    ("NCHW-view-of-HCNW-rows", (4, 3, 5, 7), 1, "np_hcnw_view"),
    ("torch-channels_last", (2, 5, 6, 7), 1, "torch_cl"),
    ("torch-channels_last-C17", (3, 17, 4, 3), 1, "torch_cl"),
    ("torch-channels_last_3d", (2, 3, 4, 5, 6), 1, "torch_cl3d"),
]
MODES = [("train-running", True, True), ("train-no-running", True, False), ("eval", False, True)]


def materialize(a, kind):
    """The logical array `a` in the memory layout of `kind` (same values)."""
    if a is None:
        return None
    if kind == "np":
        return a
    if kind == "np_offset":
        return offset_view(a) if a.ndim > 1 else a
    if kind == "np_nchw_view":
        if a.ndim == 1:
            return a
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(0, 3, 1, 2)
    if kind == "np_hcnw_view":
        if a.ndim == 1:
            return a
        return np.ascontiguousarray(a.transpose(2, 1, 0, 3)).transpose(2, 1, 0, 3)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    if a.ndim == 4 and kind == "torch_cl":
        t = t.contiguous(memory_format=torch.channels_last)
    if a.ndim == 5 and kind == "torch_cl3d":
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def strides_of(a):
    if isinstance(a, np.ndarray):
        return tuple(s // a.itemsize for s in a.strides)
    return tuple(a.stride())


def torch_reference(x, dy, w, b, rm, rv, *, training, axis, momentum=0.1, eps=1e-5, upcast=False):
    """F.batch_norm + autograd on channel-first copies; returns NumPy results with the channel back on `axis`.

    upcast: run torch in float64 on the same (float32) values; the running statistics come back in their dtype."""
    import torch
    import torch.nn.functional as F

    def t(a, grad=False):
        if a is None:
            return None
        a = np.moveaxis(a, axis, 1) if a.ndim > 1 else a
        return torch.tensor(a.astype(F64) if upcast else a, requires_grad=grad)

    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    rmt, rvt = t(rm), t(rv)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=momentum, eps=eps)
    yt.backward(t(dy))
    back = lambda a: None if a is None else np.moveaxis(a.detach().numpy(), 1, axis)
    vec = lambda a: None if a is None else a.detach().numpy()
    return dict(y=back(yt), dx=back(xt.grad), dw=vec(None if wt is None else wt.grad),
                db=vec(None if bt is None else bt.grad), rm=vec(rmt), rv=vec(rvt))


# Two torch references.  "same": torch in x's dtype.  "f64": torch in float64 on the same (float32) values, i.e.
# torch's semantics with rounding-free arithmetic, against which optkern's float32 is held to the same bounds as
# against the NumPy transcription (TOL).  Against torch's own float32 kernel the bound has to include torch's
# rounding: its variance loses precision when the values of a channel are close (N = 2: y off by up to 4.2e-5
# over 2000 random draws, where optkern stays within 2e-7 of float64 math), so that bound is 1e-4; any semantic
# difference (biased vs unbiased variance, momentum convention, eval-mode gradient) is larger than 1e-2.
TORCH_TOL = {"f64": {F64: 1e-12, F32: 2e-6}, "same": {F64: 1e-12, F32: 1e-4}}
# dweight against torch in x's dtype: torch's own float64 reduction of sum dy xhat is off by up to 1.7e-12 of
# max|dweight| at M = 32770 (20 draws; optkern is within 5e-14 of the NumPy reference there), hence 1e-11.
TORCH_DW_TOL = {F64: 1e-11, F32: 1e-4}
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("mode,training,running", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("lid,shape,axis,kind", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_matches_torch(rng, lid, shape, axis, kind, mode, training, running, affine, dtype):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    x, dy, w, b, rm, rv = make(rng, shape, axis, dtype, affine=affine, running=running)
    rm0, rv0 = copy_or_none(rm), copy_or_none(rv)
    ref = torch_reference(x, dy, w, b, copy_or_none(rm), copy_or_none(rv), training=training, axis=axis)

    X, DY, W, B, RM, RV = (materialize(a, kind) for a in (x, dy, w, b, rm, rv))
    y, mean, invstd = optkern.batch_norm_forward(X, W, B, RM, RV, training=training, axis=axis)
    dx, dw, db = optkern.batch_norm_backward(DY, X, W, mean, invstd, training=training, axis=axis)

    # zero copy: outputs are in x's library and laid out like x (same strides)
    is_torch = kind.startswith("torch")
    for out in (y, dx):
        assert isinstance(out, torch.Tensor) if is_torch else isinstance(out, np.ndarray)
        assert strides_of(out) == strides_of(X)
        assert tuple(out.shape) == tuple(X.shape)
    if kind in ("np_nchw_view", "np_hcnw_view"):
        assert not X.flags.c_contiguous and not y.flags.c_contiguous  # the permuted memory order, not a copy
    for v in (mean, invstd):
        assert (isinstance(v, torch.Tensor) if is_torch else isinstance(v, np.ndarray))
        assert str(v.dtype).endswith("float64") and tuple(v.shape) == (shape[axis],)

    _, _, ref_invstd, _, _ = ref_forward(x, w, b, rm, rv, training=training, axis=axis)
    got = dict(y=to_numpy(y), dx=to_numpy(dx), dw=to_numpy(dw), db=to_numpy(db), rm=to_numpy(RM),
               rv=to_numpy(RV))
    if not affine:
        assert dw is None and db is None
    refs = {"same": ref}
    if dtype == F32:
        refs["f64"] = torch_reference(x, dy, w, b, copy_or_none(rm0), copy_or_none(rv0), training=training,
                                      axis=axis, upcast=True)
    for which, r in refs.items():
        errs = {k: rel_err(got[k], r[k], floor=dx_floor(dy, w, ref_invstd) if k == "dx" else 0.0)
                for k in got if got[k] is not None and r[k] is not None}
        tol = {k: TORCH_TOL[which][dtype] for k in errs}
        if "dw" in tol:
            tol["dw"] = WGRAD_TOL[dtype] if which == "f64" else TORCH_DW_TOL[dtype]
        bad = {k: v for k, v in errs.items() if not v <= tol[k]}
        assert not bad, f"errors against torch ({which}) above {tol}: {bad}"


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_torch_saved_float32_stats_and_requires_grad(rng, dtype, fmt):
    """torch's own save_mean/save_invstd (float32 for float32 input) feed optkern's backward; x may require grad."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    x, dy, w, b, _, _ = make(rng, (4, 6, 5, 7), 1, dtype)
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    xt = torch.from_numpy(x).contiguous(memory_format=mf).requires_grad_(True)
    dyt = torch.from_numpy(dy).contiguous(memory_format=mf)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(xt.detach(), wt, bt, None, None, True, 0.1,
                                                                     1e-5)
    dx_ref, dw_ref, db_ref = torch.ops.aten.native_batch_norm_backward(dyt, xt.detach(), wt, None, None, save_mean,
                                                                       save_invstd, True, 1e-5, [True, True, True])
    # With grad mode on, the raw functions refuse a tensor that requires grad (they would cut the graph; the
    # modules in optkern.torch.nn carry autograd).  Under no_grad they read it in place.
    with pytest.raises(TypeError, match="optkern.torch.nn"):
        optkern.batch_norm_forward(xt, wt, bt, None, None)
    with torch.no_grad():
        y, mean, invstd = optkern.batch_norm_forward(xt, wt, bt, None, None)
    assert y.stride() == xt.stride() and not y.requires_grad
    assert rel_err(mean.numpy(), save_mean.numpy()) <= (1e-6 if dtype == F32 else 1e-12)
    assert rel_err(invstd.numpy(), save_invstd.numpy()) <= (1e-6 if dtype == F32 else 1e-12)
    with torch.no_grad():
        dx, dw, db = optkern.batch_norm_backward(dyt, xt, wt, save_mean, save_invstd)
    tol = TORCH_TOL["same"][dtype]
    assert dx.stride() == xt.stride()
    assert rel_err(dx.numpy(), dx_ref.numpy()) <= tol
    assert rel_err(dw.numpy(), dw_ref.numpy()) <= tol
    assert rel_err(db.numpy(), db_ref.numpy()) <= tol


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_cumulative_average_matches_torch_module(rng, dtype):
    """momentum=None with num_batches_tracked, against nn.BatchNorm2d(momentum=None) over several batches."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    C = 5
    m = torch.nn.BatchNorm2d(C, momentum=None).to(torch.float64 if dtype == F64 else torch.float32)
    rm, rv = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
    for _ in range(4):
        x, *_ = make(rng, (3, C, 4, 6), 1, dtype)
        with torch.no_grad():
            m(torch.from_numpy(x))
        optkern.batch_norm_forward(x, None, None, rm, rv, momentum=None,
                                   num_batches_tracked=int(m.num_batches_tracked))
    tol = 1e-12 if dtype == F64 else 1e-6  # float32: one rounding of the stored value plus torch's variance
    assert rel_err(rm, m.running_mean.numpy()) <= tol
    assert rel_err(rv, m.running_var.numpy()) <= tol


def test_odd_alignment_is_bitwise_like_aligned(rng):
    """A view one element into a larger buffer gives the same bits as an aligned copy (both layouts, both dtypes)."""
    for dtype in (F32, F64):
        for shape, axis in [((5, 3, 67), 1), ((9, 5), 1), ((3, 4, 5, 7), -1), ((2, 2, 16390), 1)]:
            x, dy, w, b, rm, rv = make(rng, shape, axis, dtype)
            xo, dyo = offset_view(x), offset_view(dy)
            rm2, rv2 = rm.copy(), rv.copy()
            r1 = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis)
            r2 = optkern.batch_norm_forward(xo, w, b, rm2, rv2, axis=axis, out=offset_view(np.zeros_like(x)))
            assert all(bits_equal(a, c) for a, c in zip(r1, r2)), shape
            assert bits_equal(rm, rm2) and bits_equal(rv, rv2)
            g1 = optkern.batch_norm_backward(dy, x, w, r1[1], r1[2], axis=axis)
            g2 = optkern.batch_norm_backward(dyo, xo, w, r1[1], r1[2], axis=axis)
            assert all(bits_equal(a, c) for a, c in zip(g1, g2)), shape


# ---- 3. data far from zero ---------------------------------------------------------------------------------------
OFFSET_SHAPES = [((4, 3, 80), 1), ((256, 5), 1), ((4, 6, 6, 8), -1), ((2, 2, 16400), 1)]


@pytest.mark.parametrize("shape,axis", OFFSET_SHAPES, ids=["cf", "NC", "NHWC", "cf-2chunks"])
def test_large_offset_forward_float32(rng, shape, axis):
    """float32 data at 1e4 with unit variance: y within 1e-3 (the design note's bar) of float64 math on the same
    float32 values.  Measured max abs error over 100 draws per shape: 1.9e-6 (a few float32 ulps of |y| <= ~6),
    so the test also asserts 5e-6.  E[x^2] - E[x]^2 in float32 would lose everything here (1e8 +- 1e4 with a
    24-bit mantissa: the variance is below the rounding of E[x^2])."""
    x = (1e4 + rng.standard_normal(shape)).astype(F32)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C).astype(F32), rng.standard_normal(C).astype(F32)
    rm, rv = np.full(C, 1e4, F32), np.ones(C, F32)
    ref_y, ref_mu, ref_invstd, ref_rm, ref_rv = ref_forward(x, w, b, rm, rv, axis=axis)
    y, mean, invstd = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    err = float(np.max(np.abs(y.astype(F64) - ref_y)))
    assert err <= 1e-3
    assert err <= 5e-6, f"max abs error {err}"
    # the mean: the shifted sums of x - K are exact here (multiples of 2^-10 below 2^14), measured error 0
    assert np.max(np.abs(mean - ref_mu)) <= 1e-9
    assert rel_err(invstd, ref_invstd) <= STATS_TOL[F32]  # the variance is not lost to the offset (measured 3e-7)
    assert rel_err(rm, ref_rm) <= 2e-7  # one float32 rounding at 1e4: <= 2^-24 * 2^14 / 1e4 = 9.8e-8
    assert rel_err(rv, ref_rv) <= TOL[F32]


@pytest.mark.parametrize("shape,axis", OFFSET_SHAPES, ids=["cf", "NC", "NHWC", "cf-2chunks"])
def test_large_offset_backward_float32(rng, shape, axis):
    """float32 backward at offset 1e4: dx against float64 math on the same float32 values.  The kernel centres
    x - mean with mean split into float32 hi + lo parts, so x - mean keeps float32 precision relative to sigma
    rather than to |x|: measured rel error (floored as in the module docstring) up to 3.3e-7 over 100 draws per
    shape, asserted 2e-6, the same bound as for data at zero.  x - float32(mean) alone would be off by up to
    ulp(1e4)/2 ~ 5e-4 per element, i.e. ~5e-4 relative to sigma."""
    x = (1e4 + rng.standard_normal(shape)).astype(F32)
    dy = (0.3 + rng.standard_normal(shape)).astype(F32)
    C = shape[axis]
    w = rng.uniform(0.5, 1.5, C).astype(F32)
    _, ref_mu, ref_invstd, _, _ = ref_forward(x, w, None, None, None, axis=axis)
    ref_dx, ref_dw, ref_db = ref_backward(dy, x, w, ref_mu, ref_invstd, axis=axis)
    _, mean, invstd = optkern.batch_norm_forward(x, w, None, None, None, axis=axis)
    dx, dw, db = optkern.batch_norm_backward(dy, x, w, mean, invstd, axis=axis)
    assert rel_err(dx, ref_dx, floor=dx_floor(dy, w, ref_invstd)) <= TOL[F32]
    assert rel_err(dw, ref_dw) <= WGRAD_TOL[F32]
    assert rel_err(db, ref_db) <= TOL[F32]


# (Outliers first or last, or sorted data: the statistics shift each block by its own rough mean, so the order of
# the values does not matter.)


def _outlier_data(rng, shape, axis, first):
    x = rng.standard_normal(shape).astype(F32)
    at = [0 if first else -1] * len(shape)
    at[axis] = slice(None)
    x[tuple(at)] = 300.0  # one outlier per channel, its first (or last) value in memory order
    return x


def _outlier_check(x, axis):
    ref_y, _, ref_invstd, _, _ = ref_forward(x, None, None, None, None, axis=axis)
    y, _, invstd = optkern.batch_norm_forward(x, None, None, None, None, axis=axis)
    assert rel_err(invstd, ref_invstd) <= 1e-5
    assert rel_err(y, ref_y) <= 1e-5


@pytest.mark.parametrize("shape,axis", [((4096, 2), 1), ((8, 2, 4096), 1)], ids=["rows", "cf"])
def test_last_value_outlier_float32(rng, shape, axis):
    """float32 with one outlier per channel in the last row: y within 1e-5 of float64 math on the same values
    (torch's float32 kernel: <= 4.6e-6 on such data; optkern measured 2e-7)."""
    _outlier_check(_outlier_data(rng, shape, axis, first=False), axis)


@pytest.mark.parametrize("shape,axis", [((4096, 2), 1), ((8, 2, 4096), 1)], ids=["rows", "cf"])
def test_first_value_outlier_float32(rng, shape, axis):
    """The same bound must hold whichever value of a channel comes first (the batch order is arbitrary)."""
    _outlier_check(_outlier_data(rng, shape, axis, first=True), axis)


@pytest.mark.parametrize("shape,axis", [((4096, 2), 1), ((8, 2, 4096), 1)], ids=["rows", "cf"])
def test_sorted_bimodal_float32(rng, shape, axis):
    """Sorted two-cluster data (every early block far from the channel mean): same 1e-5 bound."""
    x = rng.standard_normal(shape) + np.where(rng.random(shape) < 0.5, -50.0, 50.0)
    x = np.sort(x.reshape(-1, shape[axis]) if axis == 1 and len(shape) == 2 else x, axis=0)
    _outlier_check(np.ascontiguousarray(x.reshape(shape), dtype=np.float32), axis)


# ---- 4. staged API: shards, combine, normalize; backward reduce, all-reduce, dx ----------------------------------
SHARD_CASES = [("NC", (11, 6), 1, [1, 4, 2, 4]), ("NCHW-cf", (7, 3, 8, 9), 1, [3, 1, 3]),
               ("NHWC", (9, 4, 5, 6), -1, [2, 1, 5, 1]), ("NCL-rows", (6, 5, 7), 1, [1, 5])]
# Sharded against unsharded: both are within TOL of exact math; in float32 the shards' statistics are summed in
# other blocks than the whole batch's, so they differ at float32 level (measured y 2.8e-7, dx 3.8e-7).
SHARD_TOL = {F64: 1e-12, F32: 2e-6}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("name,shape,axis,sizes", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_sharded_matches_unsharded(rng, name, shape, axis, sizes, stacked, dtype):
    x, dy, w, b, rm, rv = make(rng, shape, axis, dtype)
    C = shape[axis]
    assert sum(sizes) == shape[0]
    cuts = np.cumsum(sizes)[:-1]
    xs, dys = np.split(x, cuts, axis=0), np.split(dy, cuts, axis=0)

    rm_full, rv_full = rm.copy(), rv.copy()
    y_full, mean_full, invstd_full = optkern.batch_norm_forward(x, w, b, rm_full, rv_full, axis=axis, momentum=0.3)
    dx_full, dw_full, db_full = optkern.batch_norm_backward(dy, x, w, mean_full, invstd_full, axis=axis)

    stats = [optkern.batch_norm_stats(s, axis=axis) for s in xs]
    counts = [c for c, _, _ in stats]
    assert counts == [s.size // C for s in xs]
    for s, (_, m, m2) in zip(xs, stats):  # the local statistics themselves (m2 = sum of squared deviations)
        _, _, red, bs, _ = _geometry(s, axis)
        ref_mu = _f64(s).mean(axis=red)
        ref_m2 = ((_f64(s) - ref_mu.reshape(bs)) ** 2).sum(axis=red)
        assert m.dtype == F64 and m2.dtype == F64
        sigma = np.sqrt(_f64(x).var(axis=red))  # the batch's sigma per channel (a 1-row shard has m2 = 0)
        assert np.max(np.abs(m - ref_mu) / sigma) <= STATS_TOL[dtype]
        assert rel_err(m2, ref_m2) <= STATS_TOL[dtype]
    means = [m for _, m, _ in stats]
    m2s = [m2 for _, _, m2 in stats]
    if stacked:
        means, m2s = np.stack(means), np.stack(m2s)
    count, mean, m2 = optkern.batch_norm_combine(counts, means, m2s)
    assert count == x.size // C

    ys, rms, rvs, saves = [], [], [], []
    for s in xs:  # every "process" holds its own copy of the running statistics and updates it once
        r_m, r_v = rm.copy(), rv.copy()
        y, smean, sinv = optkern.batch_norm_normalize(s, w, b, count, mean, m2, r_m, r_v, axis=axis, momentum=0.3)
        ys.append(y)
        rms.append(r_m)
        rvs.append(r_v)
        saves.append((smean, sinv))
    tol = SHARD_TOL[dtype]
    assert rel_err(np.concatenate(ys, axis=0), y_full) <= tol
    for smean, sinv in saves:
        assert max(stats_err(smean, sinv, mean_full, invstd_full)) <= STATS_TOL[dtype]
    for r_m, r_v in zip(rms, rvs):
        assert bits_equal(r_m, rms[0]) and bits_equal(r_v, rvs[0])
        assert rel_err(r_m, rm_full) <= tol and rel_err(r_v, rv_full) <= tol

    smean, sinv = saves[0]
    sums = [optkern.batch_norm_backward_reduce(g, s, smean, axis=axis) for g, s in zip(dys, xs)]
    sum_dy = np.sum([a for a, _ in sums], axis=0)  # the in-process all-reduce
    sum_dy_xmu = np.sum([c for _, c in sums], axis=0)
    assert sum_dy.dtype == F64 and sum_dy_xmu.dtype == F64
    dxs, dws, dbs = [], [], []
    for g, s in zip(dys, xs):
        dx, dw, db = optkern.batch_norm_backward_dx(g, s, w, smean, sinv, count, sum_dy, sum_dy_xmu, axis=axis)
        dxs.append(dx)
        dws.append(dw)
        dbs.append(db)
    _, _, ref_invstd, _, _ = ref_forward(x, w, b, None, None, axis=axis)
    assert rel_err(np.concatenate(dxs, axis=0), dx_full, floor=dx_floor(dy, w, ref_invstd)) <= tol
    for dw, db in zip(dws, dbs):
        assert bits_equal(dw, dws[0]) and bits_equal(db, dbs[0])
    assert rel_err(dws[0], dw_full) <= WGRAD_TOL[dtype]
    assert rel_err(dbs[0], db_full) <= tol


def test_sharded_no_affine_no_running(rng):
    """The staged path with weight/bias/running stats None gives None weight gradients."""
    x, dy, *_ = make(rng, (6, 3, 70), 1, F64)
    st = [optkern.batch_norm_stats(s) for s in (x[:2], x[2:])]
    count, mean, m2 = optkern.batch_norm_combine([c for c, _, _ in st], [m for _, m, _ in st],
                                                 [q for _, _, q in st])
    y, smean, sinv = optkern.batch_norm_normalize(x, None, None, count, mean, m2)
    y_ref, *_ = ref_forward(x, None, None, None, None)
    assert rel_err(y, y_ref) <= 1e-12
    sum_dy, sum_dy_xmu = optkern.batch_norm_backward_reduce(dy, x, smean)
    dx, dw, db = optkern.batch_norm_backward_dx(dy, x, None, smean, sinv, count, sum_dy, sum_dy_xmu)
    assert dw is None and db is None
    ref_dx, _, _ = ref_backward(dy, x, None, smean, sinv)
    assert rel_err(dx, ref_dx) <= 1e-12


# ---- 5. out=, determinism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis,kind", [((4, 3, 70), 1, "np"), ((6, 5), 1, "np"), ((3, 4, 5, 6), -1, "np"),
                                             ((2, 3, 5, 7), 1, "torch_cl")],
                         ids=["cf", "NC", "NHWC", "torch-channels_last"])
def test_out_writes_callers_buffer(rng, shape, axis, kind, dtype):
    if kind.startswith("torch"):
        pytest.importorskip("torch", reason=TORCH_REASON)
    x, dy, w, b, rm, rv = (materialize(a, kind) for a in make(rng, shape, axis, dtype))
    like = lambda a: a.clone() if not isinstance(a, np.ndarray) else a.copy()
    for training in (True, False):
        rm1, rv1, rm2, rv2 = like(rm), like(rv), like(rm), like(rv)
        buf = like(x) * 0 + 7
        y0, m0, s0 = optkern.batch_norm_forward(x, w, b, rm1, rv1, training=training, axis=axis)
        y, m, s = optkern.batch_norm_forward(x, w, b, rm2, rv2, training=training, axis=axis, out=buf)
        assert y is buf
        assert bits_equal(y0, y) and bits_equal(m0, m) and bits_equal(s0, s)
        assert bits_equal(rm1, rm2) and bits_equal(rv1, rv2)
        gbuf = like(x) * 0 + 7
        g0 = optkern.batch_norm_backward(dy, x, w, m0, s0, training=training, axis=axis)
        g = optkern.batch_norm_backward(dy, x, w, m0, s0, training=training, axis=axis, out=gbuf)
        assert g[0] is gbuf
        assert all(bits_equal(a, c) for a, c in zip(g0, g))
    # staged entry points
    c, mean, m2 = optkern.batch_norm_stats(x, axis=axis)
    buf = like(x) * 0 + 7
    y0, _, s0 = optkern.batch_norm_normalize(x, w, b, c, mean, m2, axis=axis)
    y, _, _ = optkern.batch_norm_normalize(x, w, b, c, mean, m2, axis=axis, out=buf)
    assert y is buf and bits_equal(y0, y)
    sdy, sdyx = optkern.batch_norm_backward_reduce(dy, x, mean, axis=axis)
    gbuf = like(x) * 0 + 7
    g0 = optkern.batch_norm_backward_dx(dy, x, w, mean, s0, c, sdy, sdyx, axis=axis)
    g = optkern.batch_norm_backward_dx(dy, x, w, mean, s0, c, sdy, sdyx, axis=axis, out=gbuf)
    assert g[0] is gbuf and all(bits_equal(a, q) for a, q in zip(g0, g))


def _everything(x, dy, w, b, rm, rv, axis):
    """Every output of forward (train and eval) and backward (train and eval), running stats included."""
    rm, rv = rm.copy(), rv.copy()
    y, m, s = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    dx, dw, db = optkern.batch_norm_backward(dy, x, w, m, s, axis=axis)
    ye, me, se = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis, training=False)
    dxe, dwe, dbe = optkern.batch_norm_backward(dy, x, w, me, se, axis=axis, training=False)
    _, mean, m2 = optkern.batch_norm_stats(x, axis=axis)
    sdy, sdyx = optkern.batch_norm_backward_reduce(dy, x, m, axis=axis)
    return [y, m, s, rm, rv, dx, dw, db, ye, dxe, dwe, dbe, mean, m2, sdy, sdyx]


# >= 65536 elements: big enough to run on 2 threads.  channels-first with C >= threads (whole channels per thread)
# and C = 1 < threads (units reduced in parallel, combined in order); rows layouts (N, C) and NHWC.
BIG = [("NCHW-C8", (4, 8, 64, 64), 1), ("NCHW-C1", (8, 1, 128, 128), 1), ("NC", (8192, 9), 1),
       ("NHWC", (32, 32, 16, 8), -1)]


def test_two_calls_are_bitwise_identical(rng):
    for _, shape, axis in BIG[:1] + BIG[3:]:
        data = make(rng, shape, axis, F32)
        r1, r2 = _everything(*data, axis), _everything(*data, axis)
        assert all(bits_equal(a, c) for a, c in zip(r1, r2))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,shape,axis", BIG, ids=[c[0] for c in BIG])
def test_bitwise_across_thread_counts(rng, name, shape, axis, dtype):
    data = make(rng, shape, axis, dtype)
    before = optkern.get_num_threads()
    try:
        results = {}
        for nt in (1, 2):
            optkern.set_num_threads(nt)
            assert optkern.get_num_threads() == nt
            results[nt] = _everything(*data, axis)
    finally:
        optkern.set_num_threads(before)
    assert optkern.get_num_threads() == before
    for i, (a, c) in enumerate(zip(results[1], results[2])):
        assert bits_equal(a, c), f"output {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((5, 3, 70), 1), ((2, 3, 16400), 1), ((37, 13), 1), ((3, 5, 7, 19), -1),
                                        ((4, 8, 64, 64), 1), ((32, 32, 16, 8), -1)],
                         ids=["cf", "cf-2chunks", "NC", "NHWC", "big-cf", "big-NHWC"])
def test_bitwise_across_isa_paths(rng, cpu_isa, shape, axis, dtype):
    """The fixture's path gives the same bits as the best path (avx512 here), computed in this test."""
    data = make(rng, shape, axis, dtype)
    mine = _everything(*data, axis)
    optkern.set_cpu_isa(BEST_ISA)
    try:
        best = _everything(*data, axis)
    finally:
        optkern.set_cpu_isa(cpu_isa)
    for i, (a, c) in enumerate(zip(mine, best)):
        assert bits_equal(a, c), f"output {i} differs between {cpu_isa} and {BEST_ISA}"


# ---- 6. zero copy ------------------------------------------------------------------------------------------------
def _peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("shape,axis", [((16, 4, 128, 128), 1), ((64, 32, 32, 16), -1)], ids=["NCHW", "NHWC"])
def test_out_allocates_nothing_x_sized(rng, shape, axis):
    x = (rng.standard_normal(shape) + 1.0).astype(F32)
    dy = (rng.standard_normal(shape) + 0.3).astype(F32)
    C = shape[axis]
    w, b = np.ones(C, F32) * 1.5, np.full(C, 0.25, F32)
    rm, rv = np.zeros(C, F32) + 0.1, np.ones(C, F32)
    y, dx = np.empty_like(x), np.empty_like(x)
    box = {}

    def steps():
        box["fwd"] = optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis, out=y)
        m, s = box["fwd"][1], box["fwd"][2]
        optkern.batch_norm_backward(dy, x, w, m, s, axis=axis, out=dx)
        optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis, out=y, training=False)
        c, mean, m2 = optkern.batch_norm_stats(x, axis=axis)
        optkern.batch_norm_normalize(x, w, b, c, mean, m2, rm, rv, axis=axis, out=y)
        sdy, sdyx = optkern.batch_norm_backward_reduce(dy, x, mean, axis=axis)
        optkern.batch_norm_backward_dx(dy, x, w, mean, s, c, sdy, sdyx, axis=axis, out=dx)

    peak = _peak(steps)
    assert box["fwd"][0] is y
    assert peak < x.nbytes / 100, f"traced {peak} bytes for a {x.nbytes}-byte x"
    # control: without out= the x-sized output shows up in the same measurement
    assert _peak(lambda: optkern.batch_norm_forward(x, w, b, rm, rv, axis=axis)) >= x.nbytes


def test_numpy_reference_sanity():
    """The reference itself: y has zero mean and unit biased variance per channel (gamma=1, beta=0, tiny eps)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 4)) * 3 + 2
    y, mu, _, _, _ = ref_forward(x, None, None, None, None, eps=1e-300)
    assert np.allclose(y.mean(axis=(0, 2)), 0, atol=1e-14) and np.allclose(y.var(axis=(0, 2)), 1, rtol=1e-13)
    assert math.isclose(mu[0], x[:, 0].mean(), rel_tol=1e-14)


def test_empty_shard_contributes_nothing(rng):
    """A data-parallel rank with no local values (torch's SyncBatchNorm allows it): count 0, and the combine of
    its statistics with the others' equals the others' alone."""
    x = (rng.standard_normal((9, 4)) + 2.0).astype(np.float64)
    empty = np.empty((0, 4), np.float64)
    n0, m0, q0 = optkern.batch_norm_stats(empty)
    assert n0 == 0 and np.all(m0 == 0) and np.all(q0 == 0)
    n1, m1, q1 = optkern.batch_norm_stats(x)
    n, mean, m2 = optkern.batch_norm_combine([n0, n1], [m0, m1], [q0, q1])
    assert n == 9
    np.testing.assert_array_equal(mean, m1)
    np.testing.assert_array_equal(m2, q1)
