"""Gradient clipping by global norm (seed 000), as one multi-tensor reduction.

Unlike ``torch.nn.utils.clip_grad_norm_``, this does not rewrite the gradients: it returns the clip coefficient,
and every optimizer step takes it as ``grad_multiplier`` and applies it inside its single pass over memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _C
from ._arrays import as_list, current_stream, plain
from .functional import real_number


class ClipResult(NamedTuple):
    total_norm: float  #: the global norm of all gradients
    grad_multiplier: float  #: min(1, max_norm / (total_norm + 1e-6)), torch's clip coefficient
    found_inf: bool  #: True when the norm is inf or NaN (a step given found_inf=True does nothing)

    @property
    def grad_scale(self):
        raise AttributeError("ClipResult.grad_scale was renamed grad_multiplier (it multiplies the gradient; "
                             "torch's grad_scale is the loss scale, a divisor)")


def global_norm(grads, norm_type: float = 2.0) -> float:
    """The norm of the concatenation of all ``grads`` (2-norm accumulated in float64, or the max-norm)."""
    norm_type = real_number("norm_type", norm_type, finite=False)
    grads = [plain(g) for g in as_list(grads)]
    return _C.global_norm(grads, norm_type, current_stream(grads[0]) if grads else 0)


def clip_grad_norm(grads, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> ClipResult:
    """Compute the clip of ``grads`` to global norm ``max_norm`` without touching them.

    ``opt.step(grads, grad_multiplier=r.grad_multiplier, found_inf=r.found_inf)`` then applies it inside the step,
    which equals ``torch.nn.utils.clip_grad_norm_(grads, max_norm)`` followed by the step, with one pass fewer.
    """
    max_norm = real_number("max_norm", max_norm)
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm: expected a finite number >= 0, got {max_norm}")
    total = global_norm(grads, norm_type)
    finite = math.isfinite(total)
    if not finite and error_if_nonfinite:
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped")
    multiplier = min(1.0, max_norm / (total + 1e-6)) if finite else 1.0
    return ClipResult(total, multiplier, not finite)
