"""optkern.torch.nn: batch norm modules on optkern's fused kernels, drop-in for torch.nn's.

    import optkern.torch.nn as onn
    bn = onn.BatchNorm2d(64)                    # torch.nn.BatchNorm2d's constructor, parameters, buffers, state_dict
    model = onn.convert_batchnorm(model)        # every torch BatchNorm1d/2d/3d/SyncBatchNorm swapped in place
    model = onn.convert_batchnorm(model, sync=True, process_group=pg)   # ... for optkern's SyncBatchNorm

``BatchNorm1d, BatchNorm2d, BatchNorm3d`` subclass the torch classes of the same names (``SyncBatchNorm``: see
below) and override ``forward`` only: constructor arguments, ``weight``/``bias``, the buffers ``running_mean``, ``running_var`` and
``num_batches_tracked``, ``state_dict`` keys, ``train()/eval()``, ``reset_parameters``, ``_check_input_dim`` and
``isinstance(m, torch.nn.BatchNorm2d)`` are torch's.  The forward and backward run through a
``torch.autograd.Function`` on optkern's kernels (:mod:`optkern.batch_norm`).

Math, per channel c over its M values (batch x spatial positions), as ``torch.nn.functional.batch_norm``:

* training: mu = mean(x), var = biased variance, invstd = 1 / sqrt(var + eps), y = gamma (x - mu) invstd + beta;
  the running estimates are updated in place with the unbiased variance:
  running_mean = (1 - f) running_mean + f mu, running_var = (1 - f) running_var + f var M / (M - 1), where the
  factor f is ``momentum``, or 1 / num_batches_tracked (this batch included) for ``momentum=None`` (the
  cumulative average).  ``num_batches_tracked`` goes up by one per training forward (also for an empty batch).
* eval: normalize with the running statistics; the gradient treats them as constants
  (dx = gamma invstd_running dy).  Without running statistics (``track_running_stats=False``) eval also uses
  the batch statistics, and nothing is updated, as in torch.
* backward (training): dbeta = sum dy, dgamma = invstd sum dy (x - mu),
  dx = gamma invstd (dy - dbeta / M - (x - mu) invstd dgamma / M).

Behaviour, and where it differs from torch:

* dtypes: float32 and float64 inputs run on optkern's kernels; the parameters and buffers must have the input's
  dtype and device (else TypeError / ValueError naming them).  bfloat16 and float16 inputs with float32
  parameters and buffers (torch's mixed batch norm: a convolution's output under ``torch.autocast``, or a 16-bit
  input to a float32 module) run on optkern's 16-bit kernels: output and input gradient in the input's dtype,
  float32 weight gradients and running statistics, the math in float32 with float64 statistics, each output
  rounded to nearest-even once.  A module whose parameters are themselves 16-bit (``module.to(torch.bfloat16)``),
  any other input dtype, and any device the kernels do not serve (CUDA when optkern was built without it, MPS,
  ...) fall back to torch's own forward (``F.batch_norm`` / torch's SyncBatchNorm), so the module computes exactly
  what torch's does there.  Under ``torch.autocast`` a float32 input stays float32, as in torch (batch norm is in
  neither of autocast's cast lists).
* layouts: contiguous and ``channels_last`` / ``channels_last_3d`` inputs are read in place, and the output has
  the input's layout (as torch's).  Any other strided input is made contiguous first (one copy; its output is
  contiguous), as torch's SyncBatchNorm does.
* errors before any change: a training batch with one value per channel raises torch's ValueError ("Expected
  more than 1 value per channel when training") with the buffers and ``num_batches_tracked`` untouched (torch
  bumps ``num_batches_tracked`` before it raises).
* an empty batch (N == 0) returns an empty output, leaves running_mean/running_var untouched and bumps
  ``num_batches_tracked`` (torch does the same); its weight and bias gradients are zeros.
* in-place writes: the running statistics are written by the kernel without bumping their autograd version
  counter, as torch's ``F.batch_norm`` does not bump it either; ``num_batches_tracked.add_(1)`` bumps its own.
* double backward is not supported: the Function is ``once_differentiable``, so a second-order gradient raises.

``SyncBatchNorm`` in a distributed run (``torch.distributed`` initialized, world size of its ``process_group`` >
1, training with batch statistics) follows torch's ``torch/nn/modules/_functions.py``: per-rank
``batch_norm_stats`` (count, mean, M2), one all-gather of the per-rank (mean, M2, count) on the process group,
``batch_norm_combine`` (Chan et al.) and ``batch_norm_normalize`` (running statistics updated with the global
unbiased variance); backward: ``batch_norm_backward_reduce``, ONE all-reduce (sum) of the concatenated
(sum dy, sum dy (x - mu)), ``batch_norm_backward_dx``.  The weight and bias gradients are the local ones (DDP
averages them, as with torch's).  Otherwise (not distributed, world size 1, eval) it is BatchNorm.  Unlike
torch's, it runs on CPU tensors (gloo), also inside ``DistributedDataParallel``; for that it is not a subclass of
``torch.nn.SyncBatchNorm`` (DDP refuses those in CPU modules) but of torch's ``_BatchNorm`` base, with
``torch.nn.SyncBatchNorm``'s constructor, checks and methods.  A rank may have an empty batch: it still takes part
in the collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

import optkern
from optkern.batch_norm import (
    batch_norm_backward,
    batch_norm_backward_dx,
    batch_norm_backward_reduce,
    batch_norm_combine,
    batch_norm_forward,
    batch_norm_normalize,
    batch_norm_stats,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert_batchnorm"]

_KERNEL_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)  # with float32 parameters and buffers (torch's mixed batch norm)


# ---- helpers ----------------------------------------------------------------------------------------------------
def _kernels_serve(x: torch.Tensor, tensors) -> bool:
    """True when optkern's kernels take x with the module's parameters and buffers `tensors` (None where absent):
    float32/float64 x, or bfloat16/float16 x whose tensors are all float32, on the CPU, or on CUDA when built with
    it.  (A float32/float64 x with tensors of another dtype is served, and refused by _check_tensors.)"""
    if x.dtype in _HALF_DTYPES:
        if any(t is not None and t.dtype != torch.float32 for t in tensors):
            return False  # a 16-bit module: torch's own path
    elif x.dtype not in _KERNEL_DTYPES:
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and optkern.cuda_available()


def _in_place_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels read its layout in place (contiguous, channels_last(_3d)), else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _like(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy in x's exact strides (the kernels take x and dy in one layout); a copy only when they differ."""
    if dy.stride() == x.stride():
        return dy
    out = torch.empty_like(x)
    out.copy_(dy)
    return out


def _check_tensors(x: torch.Tensor, **tensors) -> None:
    """dtype (x's; float32 for 16-bit x), device and shape of the per-channel tensors against x, before anything is
    written."""
    C = x.shape[1]
    half = x.dtype in _HALF_DTYPES
    want = torch.float32 if half else x.dtype
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != want:
            like = f"(the parameters and buffers of {x.dtype} input)" if half else "like the input"
            raise TypeError(f"{name}: expected {want} {like}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like the input, got {t.device}")
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name}: expected shape ({C},) (one value per channel of the input), "
                             f"got {tuple(t.shape)}")


def _check_batch(x: torch.Tensor) -> None:
    """torch's error for a training batch of one value per channel (SyncBatchNorm: the kernels check the global
    count, so one value on a rank is fine when the ranks have more together, as in torch)."""
    size = x.numel() // x.shape[1] if x.shape[1] else 0
    if size == 1:
        raise ValueError(f"input: Expected more than 1 value per channel when training, got input size "
                         f"{x.shape}")


def _weight_grads(needs_w, needs_b, weight, bias, invstd, sum_dy, sum_dy_xmu):
    """dgamma = invstd sum dy (x - mu), dbeta = sum dy, from float64 per-channel sums."""
    dw = (invstd * sum_dy_xmu).to(weight.dtype) if needs_w and weight is not None else None
    db = sum_dy.to(bias.dtype) if needs_b and bias is not None else None
    return dw, db


def _empty_grads(ctx, x, weight, bias):
    """Gradients of an empty batch: an empty dx and zero weight/bias gradients (as torch)."""
    nx, nw, nb = ctx.needs_input_grad[:3]
    return (torch.empty_like(x) if nx else None, torch.zeros_like(weight) if nw and weight is not None else None,
            torch.zeros_like(bias) if nb and bias is not None else None)


# ---- autograd Functions -----------------------------------------------------------------------------------------
class _BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x, weight, bias) on optkern's kernels; running statistics updated in place in training."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, bn_training, factor, eps):
        ctx.bn_training = bn_training
        if x.numel() == 0:
            # an empty batch: nothing to normalize, the running statistics stay as they are (torch)
            ctx.save_for_backward(x, weight, bias)
            ctx.empty = True
            return torch.empty_like(x)
        ctx.empty = False
        y, save_mean, save_invstd = batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                       training=bn_training, momentum=factor, eps=eps)
        ctx.save_for_backward(x, weight, bias, save_mean, save_invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if ctx.empty:
            x, weight, bias = ctx.saved_tensors
            return (*_empty_grads(ctx, x, weight, bias), None, None, None, None, None)
        x, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        dy = _like(dy, x)
        dx = dw = db = None
        if nx:
            # the kernel's dbias comes with a weight only: a bias without weight (F.batch_norm allows it) gets
            # gamma = 1 for the kernel
            w = weight if weight is not None or not nb else torch.ones_like(bias)
            dx, dw, db = batch_norm_backward(dy, x, w, save_mean, save_invstd, training=ctx.bn_training)
            dw = dw if nw and weight is not None else None
            db = db if nb and bias is not None else None
        elif nw or nb:
            # weight gradients only (an input that needs no gradient): one reduction, no dx written
            sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy, x, save_mean)
            dw, db = _weight_grads(nw, nb, weight, bias, save_invstd, sum_dy, sum_dy_xmu)
        return dx, dw, db, None, None, None, None, None


def _all_gather_rows(t: torch.Tensor, process_group, world_size: int) -> torch.Tensor:
    """(world_size, len(t)): every rank's t, in rank order.  gloo has no all_gather_into_tensor (torch's note)."""
    if dist.get_backend(process_group) == "gloo":
        rows = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(rows, t, group=process_group)
        return torch.stack(rows)
    out = torch.empty((world_size, t.numel()), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t, group=process_group)
    return out


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every rank's batch: gathered statistics forward, one all-reduce backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, process_group, world_size):
        C = x.shape[1]
        # 1. local statistics (count, mean, M2), float64; an empty batch gives count 0 and still takes part
        count, mean, m2 = batch_norm_stats(x)
        local = torch.cat([mean, m2, torch.full((1,), float(count), dtype=torch.float64, device=mean.device)])
        # 2. all-gather (mean, M2, count) of every rank
        rows = _all_gather_rows(local, process_group, world_size)
        counts = [int(c) for c in rows[:, 2 * C].tolist()]
        # 3. Chan's combine of the shards, 4. normalize and update the running statistics (global unbiased var)
        total, g_mean, g_m2 = batch_norm_combine(counts, rows[:, :C].contiguous(), rows[:, C:2 * C].contiguous())
        y, save_mean, save_invstd = batch_norm_normalize(x, weight, bias, total, g_mean, g_m2, running_mean,
                                                         running_var, momentum=factor, eps=eps)
        ctx.save_for_backward(x, weight, bias, save_mean, save_invstd)
        ctx.total, ctx.process_group = total, process_group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        C = x.shape[1]
        dy = _like(dy, x)
        # local sums: sum dy, sum dy (x - mu) (zeros for an empty batch); the weight gradients are the local ones
        sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy, x, save_mean)
        dw, db = _weight_grads(nw, nb, weight, bias, save_invstd, sum_dy, sum_dy_xmu)
        dx = None
        if nx:
            # ONE all-reduce of the concatenated sums, then dx from the global sums
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.process_group)
            dx, _, _ = batch_norm_backward_dx(dy, x, weight, save_mean, save_invstd, ctx.total, both[:C], both[C:])
        return dx, dw, db, None, None, None, None, None, None


# ---- modules ----------------------------------------------------------------------------------------------------
class _OptkernBatchNorm:
    """forward on optkern's kernels, the rest (constructor, buffers, state_dict, ...) the torch base class's."""

    def _statistics_args(self):
        """torch's _BatchNorm.forward decisions: (bn_training, running_mean, running_var, factor, bump)."""
        factor = 0.0 if self.momentum is None else float(self.momentum)
        bump = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if bump and self.momentum is None:
            factor = 1.0 / float(int(self.num_batches_tracked) + 1)  # cumulative average, this batch included
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        return bn_training, running_mean, running_var, factor, bump

    def _sync_world(self, bn_training):
        """(process_group, world_size) when this forward synchronizes, else None (as torch's SyncBatchNorm)."""

    def _torch_forward(self, input):
        return super().forward(input)  # the torch class after this mixin in the MRO

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not isinstance(input, torch.Tensor) or not _kernels_serve(
                input, (self.weight, self.bias, self.running_mean, self.running_var)):
            return self._torch_forward(input)  # torch's own path (other dtypes and devices): see the module docstring
        bn_training, running_mean, running_var, factor, bump = self._statistics_args()
        _check_tensors(input, weight=self.weight, bias=self.bias, running_mean=running_mean, running_var=running_var)
        sync = self._sync_world(bn_training)
        x = _in_place_layout(input)
        if sync is None:
            if bn_training:
                _check_batch(x)
            y = _BatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, bn_training, factor,
                                         float(self.eps))
        else:
            process_group, world_size = sync
            y = _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, factor,
                                             float(self.eps), process_group, world_size)
        if bump:
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_OptkernBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on optkern's kernels: (N, C) or (N, C, L) input.  See :mod:`optkern.torch.nn`."""


class BatchNorm2d(_OptkernBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on optkern's kernels: (N, C, H, W) input, contiguous or channels_last (read in
    place, output in the input's layout).  See :mod:`optkern.torch.nn`."""


class BatchNorm3d(_OptkernBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on optkern's kernels: (N, C, D, H, W) input, contiguous or channels_last_3d.
    See :mod:`optkern.torch.nn`."""


class SyncBatchNorm(_OptkernBatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on optkern's staged kernels and ``torch.distributed`` (any backend, CPU
    tensors included); ``process_group=None`` is the WORLD group.  See :mod:`optkern.torch.nn` for the algorithm.

    It has torch.nn.SyncBatchNorm's constructor, attributes, input checks and ``convert_sync_batchnorm``, but it
    subclasses torch's common base ``torch.nn.modules.batchnorm._BatchNorm`` (as torch.nn.SyncBatchNorm does),
    not torch.nn.SyncBatchNorm itself: ``DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm``
    instance in a CPU module ("SyncBatchNorm layers only work with GPU modules"), and this one runs on CPU
    tensors.  So ``isinstance(m, torch.nn.SyncBatchNorm)`` is False; ``isinstance(m, _BatchNorm)`` is True.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim  # >= 2-D input
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def _torch_forward(self, input):
        return torch.nn.SyncBatchNorm.forward(self, input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return super().forward(input)

    def _sync_world(self, bn_training):
        if not (bn_training and self.training and dist.is_available() and dist.is_initialized()):
            return None
        process_group = self.process_group if self.process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(process_group)
        return (process_group, world_size) if world_size > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch's classmethod, converting to optkern's SyncBatchNorm: ``convert_batchnorm(module, sync=True, ...)``."""
        return convert_batchnorm(module, sync=True, process_group=process_group)


# ---- conversion -------------------------------------------------------------------------------------------------
_TORCH_TO_OPTKERN = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


def _target(module, sync: bool):
    kind = type(module)
    if sync:
        if kind in _TORCH_TO_OPTKERN or kind in (BatchNorm1d, BatchNorm2d, BatchNorm3d):
            return SyncBatchNorm
        return None
    return _TORCH_TO_OPTKERN.get(kind)


def _swap(module, target, process_group, sync: bool):
    """A module of class target holding module's own Parameter and buffer objects (as torch's
    convert_sync_batchnorm does), so optimizers built on the old module keep updating the same tensors."""
    kwargs = {"bias": module.bias is not None, "device": "meta"}
    args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    if target is SyncBatchNorm:
        pg = process_group if sync else getattr(module, "process_group", None)
        new = SyncBatchNorm(*args, process_group=pg, **kwargs)
    else:
        new = target(*args, **kwargs)
    # every tensor of the meta-device shell is replaced by the old module's own (None where it has none)
    for name in ("weight", "bias"):
        new.register_parameter(name, module._parameters.get(name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, module._buffers.get(name), persistent=name not in module._non_persistent_buffers_set)
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_batchnorm(model: torch.nn.Module, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Swap the batch norms of ``model`` for optkern's; returns the model (a new module if ``model`` itself is one).

    * ``sync=False``: every module whose class is exactly ``torch.nn.BatchNorm1d/2d/3d`` becomes optkern's class of
      the same name, and a ``torch.nn.SyncBatchNorm`` optkern's SyncBatchNorm (keeping its process group).
    * ``sync=True``: every torch or optkern BatchNorm1d/2d/3d and torch SyncBatchNorm becomes optkern's
      ``SyncBatchNorm(process_group=process_group)`` (None: the WORLD group), as
      ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    The new modules hold the old modules' own Parameter and buffer objects (so weights, running statistics,
    ``num_batches_tracked``, ``requires_grad``, device and dtype are kept and an optimizer built on the old
    parameters still updates them), their training flag and ``qconfig``.  Subclasses of torch's classes (they may
    override forward) and lazy modules not yet initialized are left as they are.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sync, bool):
        raise TypeError(f"sync: expected a bool, got {type(sync).__name__}")
    if process_group is not None and not sync:
        raise ValueError("process_group: only used with sync=True (optkern's SyncBatchNorm)")
    return _convert(model, sync, process_group)


def _convert(module, sync, process_group):
    target = _target(module, sync)
    out = _swap(module, target, process_group, sync) if target is not None else module
    for name, child in module.named_children():
        new = _convert(child, sync, process_group)
        if new is not child:
            out._modules[name] = new
    return out
