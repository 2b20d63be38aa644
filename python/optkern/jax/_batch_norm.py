"""optkern.jax.batch_norm: optkern's batch-norm kernels as custom calls, differentiable through jax.custom_vjp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi


@functools.lru_cache(maxsize=None)
def _make(training: bool, momentum: float, eps: float, axis: int, has_w: bool, has_b: bool, has_rs: bool):
    """The custom_vjp function of one static configuration: f(x, weight, bias, rm, rv) -> (y, new_rm, new_rv)."""

    def fwd_impl(x, w, b, rm, rv):
        y, stats, nrm, nrv = _ffi.bn_forward(x, w if has_w else None, b if has_b else None,
                                             rm if has_rs else None, rv if has_rs else None,
                                             training=training, momentum=momentum, eps=eps, axis=axis)
        return (y, nrm, nrv), stats

    @jax.custom_vjp
    def f(x, w, b, rm, rv):
        return fwd_impl(x, w, b, rm, rv)[0]

    def f_fwd(x, w, b, rm, rv):
        out, stats = fwd_impl(x, w, b, rm, rv)
        return out, (x, w, b, rm, rv, stats)

    def f_bwd(res, cts):
        x, w, b, rm, rv, stats = res
        dy = cts[0]
        pdt = w.dtype if has_w else (b.dtype if has_b else x.dtype)
        dx, dw, db = _ffi.bn_backward(x, jnp.asarray(dy, x.dtype), w if has_w else None, stats, training=training,
                                      eps=eps, axis=axis, want_dweight=has_w or has_b, param_dtype=pdt)
        zeros = lambda a: None if a is None else jnp.zeros_like(a)  # noqa: E731
        # The running statistics are buffers, not parameters: no gradient flows into them (torch's convention).
        return (dx, dw if has_w else zeros(w), db if has_b else zeros(b), zeros(rm), zeros(rv))

    f.defvjp(f_fwd, f_bwd)
    return f


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, training: bool,
               momentum: float = 0.1, eps: float = 1e-5, axis: int = 1):
    """Batch normalization over every axis of ``x`` but ``axis`` (the channels: 1 for NCHW / (N, C), -1 for
    channels-last), as torch.nn.functional.batch_norm computes it, in one optkern custom call.

    Returns ``(y, new_running_mean, new_running_var)``.  training=True normalizes with the batch statistics and
    updates the running ones (``(1 - momentum) running + momentum batch``, unbiased variance); training=False
    normalizes with the running statistics (required) and returns them unchanged.  running stats are aliased
    input -> output (donate them to update in place).  weight/bias None mean 1 and 0; with running stats None
    (training only) the new ones are None.

    Differentiable (jax.grad, under jit) through a custom VJP whose backward is optkern_batch_norm_backward_train
    (or _eval); no gradient flows into the running statistics.  float32 and float64 (weight, bias and running
    stats of x's dtype)."""
    x = jnp.asarray(x)
    if np.dtype(x.dtype) not in _ffi._FLOATS:
        raise TypeError(f"x: dtype {x.dtype} is not supported (float32 or float64)")
    outer, channels, inner = _ffi.channel_layout(x.shape, axis)
    del outer, inner
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: pass both or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean: evaluation (training=False) normalizes with the running statistics")
    args = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, a in args.items():
        if a is None:
            continue
        a = jnp.asarray(a)
        if a.shape != (channels,):
            raise ValueError(f"{name}: shape {a.shape}, expected ({channels},) (x's channels on axis {axis})")
        if a.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {a.dtype}, expected x's {x.dtype}")
        args[name] = a
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: must be finite and >= 0, got {eps}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: must be in [0, 1], got {momentum}")
    f = _make(bool(training), float(momentum), float(eps), int(axis) % x.ndim, weight is not None, bias is not None,
              running_mean is not None)
    return f(x, args["weight"], args["bias"], args["running_mean"], args["running_var"])
