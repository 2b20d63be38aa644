"""Gradient clipping by global norm (seed 000), as one multi-tensor reduction.

Unlike ``torch.nn.utils.clip_grad_norm_``, this does not rewrite the gradients: it returns the clip coefficient,
and every optimizer step takes it as ``grad_multiplier`` and applies it inside its single pass over memory.

The norm is computed in one order fixed by the tensor sizes alone (see ``csrc/optkern/global_norm_api.h``): the
same bits for any CPU thread count or instruction set, and on CUDA for any GPU, equal to the CPU's.  On CUDA
arrays the results stay on the device (no host synchronization), in the arrays' library (CuPy or torch).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _C
from ._arrays import as_list, current_stream, empty_vector, is_cuda, plain
from .functional import real_number


class ClipResult(NamedTuple):
    """The clip of :func:`clip_grad_norm`.  CPU grads: Python numbers.  CUDA grads: one-element device arrays in
    the grads' library and on their device, usable directly as a step's ``grad_multiplier=`` and ``found_inf=``."""

    total_norm: Any  #: the global norm: a float, or a one-element float64 device array
    grad_multiplier: Any  #: min(1, max_norm / (total_norm + 1e-6)): a float, or a one-element float32 device array
    found_inf: Any  #: the norm is inf or NaN: a bool, or a one-element float32 device array (1.0 or 0.0)

    @property
    def grad_scale(self):
        raise AttributeError("ClipResult.grad_scale was renamed grad_multiplier (it multiplies the gradient; "
                             "torch's grad_scale is the loss scale, a divisor)")


def global_norm(grads, norm_type: float = 2.0):
    """The norm of the concatenation of all ``grads``: the 2-norm (squares summed in float32 or float64 lanes of
    at most 16 values each, the lane sums added in float64) or the max-norm (``norm_type=inf``, NaN propagates).

    CPU grads (or an empty list): a Python float.  CUDA grads (CuPy or torch): a one-element float64 array on
    their device in their library, computed on their current stream with no host synchronization (``float()``
    of it waits for the result).
    """
    norm_type = real_number("norm_type", norm_type, finite=False)
    grads = [plain(g) for g in as_list(grads)]
    stream = current_stream(grads[0]) if grads else 0
    if grads and is_cuda(grads[0]):
        out = empty_vector(grads[0], 1, "float64")
        _C.global_norm_device(grads, norm_type, out, stream)
        return out
    return _C.global_norm(grads, norm_type, stream)


def clip_grad_norm(grads, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> ClipResult:
    """Compute the clip of ``grads`` to global norm ``max_norm`` without touching them.

    ``opt.step(grads, grad_multiplier=r.grad_multiplier, found_inf=r.found_inf)`` then applies it inside the step,
    which equals ``torch.nn.utils.clip_grad_norm_(grads, max_norm)`` followed by the step, with one pass fewer.

    CPU grads: ``total_norm`` a float, ``grad_multiplier`` a float (torch's coefficient, 1.0 when the norm is not
    finite), ``found_inf`` a bool.  CUDA grads: one-element arrays on the grads' device in their library, written
    by the norm's own small kernels with no host synchronization: ``total_norm`` float64, ``grad_multiplier``
    float32 (min(1, max_norm / (norm + 1e-6)) computed in float64 on the device, then rounded), ``found_inf``
    float32 (1.0 when the norm is inf or NaN, else 0.0).  ``error_if_nonfinite=True`` has to read the norm on the
    host, so on CUDA it synchronizes the stream once.
    """
    max_norm = real_number("max_norm", max_norm)
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm: expected a finite number >= 0, got {max_norm}")
    norm_type = real_number("norm_type", norm_type, finite=False)
    grads = [plain(g) for g in as_list(grads)]
    if grads and is_cuda(grads[0]):
        total = empty_vector(grads[0], 1, "float64")
        multiplier = empty_vector(grads[0], 1, "float32")
        found_inf = empty_vector(grads[0], 1, "float32")
        _C.global_norm_device(grads, norm_type, total, current_stream(grads[0]), max_norm, multiplier, found_inf)
        if error_if_nonfinite and not math.isfinite(float(total[0])):  # the one host read (a sync)
            raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                               f"clipped")
        return ClipResult(total, multiplier, found_inf)
    total = global_norm(grads, norm_type)
    finite = math.isfinite(total)
    if not finite and error_if_nonfinite:
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped")
    multiplier = min(1.0, max_norm / (total + 1e-6)) if finite else 1.0
    return ClipResult(total, multiplier, not finite)
