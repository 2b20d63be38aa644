"""Batch norm forward and backward, fused, with torch.nn.functional.batch_norm's semantics.

Seed 000's formula, per channel k over the batch (and spatial positions):
``y = beta_k + gamma_k (h - mu_k) / sqrt(eps + sigma_k^2)``.

    y, save_mean, save_invstd = optkern.batch_norm_forward(x, weight, bias, running_mean, running_var)
    dx, dweight, dbias = optkern.batch_norm_backward(dy, x, weight, save_mean, save_invstd)

- ``x`` has rank >= 2 with the channel on ``axis`` (default 1: (N, C), (N, C, L), NCHW, NCDHW); channels-last
  arrays use ``axis=-1`` (NHWC), and a torch ``channels_last`` NCHW tensor works with ``axis=1``: any dense
  layout whose memory is (outer, channels, inner) blocks is read in place, never transposed or copied.
- Training normalizes with the batch's biased variance and updates the running statistics in place with the
  unbiased one: ``running = (1 - momentum) running + momentum batch``; ``momentum=None`` is the cumulative
  average, ``1 / num_batches_tracked`` (the count of batches including this one, as torch's module keeps it).
- Eval (``training=False``) normalizes with the running statistics; its backward is the eval-mode gradient.
- ``weight``/``bias`` may be None (then ``dweight``/``dbias`` are None); running statistics may be None in
  training.
- ``save_mean`` and ``save_invstd`` are float64 arrays of C values (statistics are kept in float64 so that data
  far from zero stays exact); the backward also accepts float32 ones, such as torch's.
- dtypes: x (and dy, y, dx) float32 or float64 with weight, bias and running statistics of x's dtype; or, as
  torch's mixed batch norm, x / dy / y / dx in bfloat16 or float16 (one dtype in a call; NumPy bfloat16 is
  ``ml_dtypes.bfloat16``) with weight, bias, running statistics and dweight / dbias in float32.  16-bit values
  are read exactly into float32, the statistics and the math are the float32 path's (same sums, same order), and
  y / dx are rounded to nearest-even once: a 16-bit call gives bitwise ``rne(float32 call on x.astype(float32))``.
  save_mean / save_invstd stay float64.  Any other combination is a TypeError naming the argument and the dtypes
  in words.
- Outputs are new arrays in x's library and on its device, laid out like x, unless ``out=`` gives one.

The staged entry points split the same kernels for data-parallel training (torch's SyncBatchNorm pattern):

    count, mean, m2 = batch_norm_stats(x_local)                       # per shard
    count, mean, m2 = batch_norm_combine(counts, means, m2s)          # gathered statistics, Chan's combine
    y, save_mean, save_invstd = batch_norm_normalize(x_local, weight, bias, count, mean, m2, running_mean, ...)
    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy_local, x_local, save_mean)   # all-reduce these by summing
    dx, dweight, dbias = batch_norm_backward_dx(dy_local, x_local, weight, save_mean, save_invstd, count,
                                                sum_dy, sum_dy_xmu)

Bad input raises ValueError or TypeError naming the argument before anything is written (and before anything
x-sized is allocated).  Arrays are NumPy, CuPy, torch or DLPack arrays; other buffer-protocol objects
(``memoryview``, ``array.array``) are read in place as NumPy views; anything else (a list, None for x) is a
TypeError.  Per-channel statistics passed in (``save_mean``, ``mean``, ``sum_dy``, ...) must be float32 or float64
(16-bit ones are a TypeError until 16-bit support lands); their shape is checked before any conversion.

Empty inputs follow torch: x with no values (N = 0 or an empty spatial axis, C >= 1) gives an empty y, leaves the
running statistics untouched, returns save_mean = 0 and save_invstd = 0 (an empty batch has no statistics), and
its backward gives an empty dx and zero dweight / dbias.  C = 0 is a ValueError naming x (torch raises too).

These are raw kernels, outside autograd: a torch tensor that requires grad, passed while grad mode is on, raises a
TypeError (its result would silently cut the autograd graph).  For autograd use :mod:`optkern.torch.nn`
(``BatchNorm1d/2d/3d``, ``SyncBatchNorm``); under ``torch.no_grad()``, or on ``.detach()``-ed tensors, these
functions take torch tensors as any other array.  ``import optkern`` never imports torch: torch tensors are told
apart by their type's module.
"""

from __future__ import annotations

import math

import numpy as np

from . import _C
from ._arrays import as_float64_vector, current_stream, empty_like, empty_vector, plain, stack_rows

__all__ = [
    "batch_norm_backward",
    "batch_norm_backward_dx",
    "batch_norm_backward_reduce",
    "batch_norm_combine",
    "batch_norm_forward",
    "batch_norm_normalize",
    "batch_norm_stats",
]


def _array(name: str, a, *, required: bool = False):
    """An array argument as the kernels read it, or a TypeError naming it: None stays None (a TypeError when
    required); NumPy, CuPy, torch and DLPack arrays pass through (a torch tensor's requires-grad alias detached);
    other buffer-protocol objects become NumPy views of the same memory."""
    if a is None:
        if required:
            raise TypeError(f"{name}: expected an array, got None")
        return None
    if isinstance(a, np.ndarray) or hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack__"):
        return plain(a)
    try:
        view = memoryview(a)
    except TypeError:
        raise TypeError(f"{name}: expected an array (NumPy, CuPy, torch or an object with __dlpack__), got "
                        f"{type(a).__name__}") from None
    return np.asarray(view)


def _x(x, axis):
    """x checked on its own (dtype, rank, axis, density, layout) before anything is allocated; returns (x, C)."""
    x = _array("x", x, required=True)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    _, C, _ = _C._bn_check_x(x, axis)
    return x, int(C)


def _per_channel(name: str, v, C: int):
    """A per-channel array (weight, bias, running stats: x's dtype, float32 for 16-bit x): its shape checked before
    an output like it is allocated (the dtype and the rest are the binding's checks)."""
    v = _array(name, v)
    if v is not None and tuple(v.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},) (one value per channel of x), got {tuple(v.shape)}")
    return v


_STAT_DTYPES = ("float32", "float64")


def _stat_dtype(v):
    """None when v's dtype is float32 or float64, else its name (NumPy/CuPy dtypes by their char: str(dtype) costs
    microseconds)."""
    dt = getattr(v, "dtype", None)
    if isinstance(dt, np.dtype):
        return None if dt.char in "fd" else dt.name
    name = str(dt).rsplit(".", 1)[-1]
    return None if name in _STAT_DTYPES else name


def _stat(name: str, v, x, C: int):
    """Per-channel statistics passed in: shape (C,) and float32/float64 checked first, then float64 in x's library
    (a copy only when the dtype differs)."""
    v = _array(name, v, required=True)
    if tuple(v.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},) (one value per channel of x), got {tuple(v.shape)}")
    bad = _stat_dtype(v)
    if bad is not None:
        raise TypeError(f"{name}: expected float32 or float64 statistics, got {bad}")
    return as_float64_vector(v, x)


def _factor(momentum, num_batches_tracked, updates: bool) -> float:
    """The running-statistics update factor."""
    if momentum is not None:
        m = float(momentum)
        if not math.isfinite(m):
            raise ValueError(f"momentum: expected a finite number or None, got {momentum!r}")
        return m
    if not updates:
        return 0.0
    if num_batches_tracked is None or int(num_batches_tracked) < 1:
        raise ValueError("num_batches_tracked: momentum=None (cumulative average) needs the number of batches "
                         f"seen including this one (>= 1), got {num_batches_tracked!r}")
    return 1.0 / int(num_batches_tracked)


def _eps(eps) -> float:
    e = float(eps)
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return e


def _count(count) -> int:
    """The global count of the staged calls: an int (the binding checks its value)."""
    if isinstance(count, bool) or not hasattr(count, "__index__"):
        raise TypeError(f"count: expected an int (values per channel over all shards), got {type(count).__name__}")
    return int(count)


def _refuse_graph(fn: str, **arrays) -> None:
    """TypeError for a torch tensor that requires grad while grad mode is on: the kernels would cut the graph."""
    for name, a in arrays.items():
        if a is None or type(a).__module__.split(".")[0] != "torch" or not getattr(a, "requires_grad", False):
            continue
        import torch  # already imported: a is one of its tensors

        if torch.is_grad_enabled():
            raise TypeError(f"{name}: a torch tensor that requires grad; {fn} is a raw kernel outside autograd and "
                            "would cut the graph.  Use optkern.torch.nn (BatchNorm1d/2d/3d, SyncBatchNorm) for "
                            "autograd, or call it under torch.no_grad() or on .detach()-ed tensors")


def _run(op, x, arrays, *, axis=1, eps=1e-5, momentum=0.0, count=0, counts=()):
    arrays = {k: plain(v) for k, v in arrays.items() if v is not None}
    return _C.batch_norm(op, arrays, axis, eps, momentum, count, list(counts), current_stream(x))


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
                       momentum=0.1, eps=1e-5, axis=1, out=None, num_batches_tracked=None):
    """Normalize x per channel; returns (y, save_mean, save_invstd).  See the module docstring.

    Not differentiable: torch tensors that require grad (grad mode on) raise TypeError; use optkern.torch.nn.
    """
    _refuse_graph("batch_norm_forward", x=x, weight=weight, bias=bias)
    x, C = _x(x, axis)
    weight, bias = _per_channel("weight", weight, C), _per_channel("bias", bias, C)
    running_mean, running_var = _per_channel("running_mean", running_mean, C), _per_channel("running_var", running_var, C)
    out = _array("out", out)
    eps = _eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean: running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("running_mean: running statistics are required when training=False")
    factor = _factor(momentum, num_batches_tracked, training and running_mean is not None)
    y = empty_like(x) if out is None else out
    mean, invstd = empty_vector(x, C), empty_vector(x, C)
    arrays = dict(x=x, out=y, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                  mean=mean, invstd=invstd)
    _run("forward_train" if training else "forward_eval", x, arrays, axis=axis, eps=eps, momentum=factor)
    return y, mean, invstd


def batch_norm_backward(dy, x, weight=None, save_mean=None, save_invstd=None, *, training=True, eps=1e-5, axis=1,
                        out=None):
    """Gradients of batch_norm_forward: returns (dx, dweight, dbias); dweight/dbias are None without weight.

    ``save_mean``/``save_invstd`` are what the forward returned (in eval mode: the running mean and
    1/sqrt(running_var + eps)).  ``eps`` is checked but not used: the saved invstd already holds it.
    Not differentiable: torch tensors that require grad (grad mode on) raise TypeError; use optkern.torch.nn.
    """
    _refuse_graph("batch_norm_backward", dy=dy, x=x, weight=weight, save_mean=save_mean, save_invstd=save_invstd)
    x, C = _x(x, axis)
    dy = _array("dy", dy, required=True)
    w = _per_channel("weight", weight, C)
    out = _array("out", out)
    eps = _eps(eps)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean: the statistics returned by batch_norm_forward are required")
    mean, invstd = _stat("save_mean", save_mean, x, C), _stat("save_invstd", save_invstd, x, C)
    dx = empty_like(x) if out is None else out
    dweight = empty_like(w) if w is not None else None
    dbias = empty_like(w) if w is not None else None
    arrays = dict(dy=dy, x=x, out=dx, weight=w, mean=mean, invstd=invstd, dweight=dweight, dbias=dbias)
    _run("backward_train" if training else "backward_eval", x, arrays, axis=axis, eps=eps)
    return dx, dweight, dbias


def batch_norm_stats(x, *, axis=1):
    """Local statistics of each channel: (count, mean, m2), m2 the sum of squared deviations (float64)."""
    _refuse_graph("batch_norm_stats", x=x)
    x, C = _x(x, axis)
    mean, m2 = empty_vector(x, C), empty_vector(x, C)
    count = _run("stats", x, dict(x=x, mean=mean, m2=m2), axis=axis)
    return int(count), mean, m2


def batch_norm_combine(counts, means, m2s):
    """Combine per-shard statistics (Chan et al., in shard order): returns (count, mean, m2).

    ``counts``: one int per shard; ``means``/``m2s``: a (shards, C) array or a sequence of (C,) arrays.
    """
    _refuse_graph("batch_norm_combine", means=means, m2s=m2s)
    try:
        counts = [int(c) for c in counts]
    except (TypeError, ValueError):
        raise TypeError(f"counts: expected a sequence of ints (one per shard), got {counts!r}") from None
    if not counts:
        raise ValueError("counts: expected statistics from at least one shard")
    means, m2s = _shard_rows("means", means), _shard_rows("m2s", m2s)
    like = means if not isinstance(means, list) else means[0]
    means2, m2s2 = stack_rows(means, like), stack_rows(m2s, like)
    C = int(means2.shape[-1])
    mean, m2 = empty_vector(means2, C), empty_vector(means2, C)
    _run("combine", means2, dict(means=means2, m2s=m2s2, mean=mean, m2=m2), counts=counts)
    return sum(counts), mean, m2


def _shard_rows(name: str, rows):
    """means / m2s of batch_norm_combine: a (shards, C) array, or a list of (C,) float32/float64 arrays."""
    if isinstance(rows, (list, tuple)):
        if not rows:
            raise ValueError(f"{name}: expected statistics from at least one shard")
        out = [_array(f"{name}[{i}]", r, required=True) for i, r in enumerate(rows)]
        C = tuple(out[0].shape)
        for i, r in enumerate(out):
            if len(r.shape) != 1 or tuple(r.shape) != C:
                raise ValueError(f"{name}[{i}]: expected shape {C} like {name}[0], got {tuple(r.shape)}")
            bad = _stat_dtype(r)
            if bad is not None:
                raise TypeError(f"{name}[{i}]: expected float32 or float64 statistics, got {bad}")
        return out
    rows = _array(name, rows, required=True)
    if len(rows.shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array (shards, channels), got shape {tuple(rows.shape)}")
    bad = _stat_dtype(rows)
    if bad is not None:
        raise TypeError(f"{name}: expected float32 or float64 statistics, got {bad}")
    return rows


def batch_norm_normalize(x, weight, bias, count, mean, m2, running_mean=None, running_var=None, *, momentum=0.1,
                         eps=1e-5, axis=1, out=None, num_batches_tracked=None):
    """Normalize with combined statistics (count values per channel over all shards) and update the running
    statistics; returns (y, save_mean, save_invstd) like batch_norm_forward in training."""
    _refuse_graph("batch_norm_normalize", x=x, weight=weight, bias=bias, mean=mean, m2=m2)
    x, C = _x(x, axis)
    weight, bias = _per_channel("weight", weight, C), _per_channel("bias", bias, C)
    running_mean, running_var = _per_channel("running_mean", running_mean, C), _per_channel("running_var", running_var, C)
    out = _array("out", out)
    eps = _eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean: running_mean and running_var must be given together (or both None)")
    factor = _factor(momentum, num_batches_tracked, running_mean is not None)
    count = _count(count)
    mean, m2 = _stat("mean", mean, x, C), _stat("m2", m2, x, C)
    y = empty_like(x) if out is None else out
    invstd = empty_vector(x, C)
    arrays = dict(x=x, out=y, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                  mean=mean, m2=m2, invstd=invstd)
    _run("normalize", x, arrays, axis=axis, eps=eps, momentum=factor, count=count)
    return y, mean, invstd


def batch_norm_backward_reduce(dy, x, save_mean, *, axis=1):
    """Local gradient sums per channel: (sum_dy, sum_dy_xmu) = (sum dy, sum dy (x - mean)), float64.

    Sum them over the shards (an all-reduce) before batch_norm_backward_dx.
    """
    _refuse_graph("batch_norm_backward_reduce", dy=dy, x=x, save_mean=save_mean)
    x, C = _x(x, axis)
    dy = _array("dy", dy, required=True)
    mean = _stat("save_mean", save_mean, x, C)
    sum_dy, sum_dy_xmu = empty_vector(x, C), empty_vector(x, C)
    _run("backward_reduce", x, dict(dy=dy, x=x, mean=mean, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu), axis=axis)
    return sum_dy, sum_dy_xmu


def batch_norm_backward_dx(dy, x, weight, save_mean, save_invstd, count, sum_dy, sum_dy_xmu, *, axis=1, out=None):
    """Training-mode dx from the gradient sums over all shards (count values per channel in all);
    returns (dx, dweight, dbias), the weight gradients None without weight."""
    _refuse_graph("batch_norm_backward_dx", dy=dy, x=x, weight=weight, save_mean=save_mean, save_invstd=save_invstd,
                  sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    x, C = _x(x, axis)
    dy = _array("dy", dy, required=True)
    w = _per_channel("weight", weight, C)
    out = _array("out", out)
    count = _count(count)
    mean, invstd = _stat("save_mean", save_mean, x, C), _stat("save_invstd", save_invstd, x, C)
    sdy, sdyx = _stat("sum_dy", sum_dy, x, C), _stat("sum_dy_xmu", sum_dy_xmu, x, C)
    dx = empty_like(x) if out is None else out
    dweight = empty_like(w) if w is not None else None
    dbias = empty_like(w) if w is not None else None
    arrays = dict(dy=dy, x=x, out=dx, weight=w, mean=mean, invstd=invstd, sum_dy=sdy, sum_dy_xmu=sdyx,
                  dweight=dweight, dbias=dbias)
    _run("backward_dx", x, arrays, axis=axis, count=count)
    return dx, dweight, dbias
