"""16-bit training: dtypes, state dtypes and master weights, shared by the functional layer and the classes.

The roundings themselves are defined once, in the core (``csrc/optkern/precision.h``): float32 -> bfloat16 /
float16 round to nearest, ties to even (NaN stays NaN, overflow goes to inf as IEEE says, float16 subnormals are
kept); the "split" master is the float32 master's high half (the bfloat16 param, rounded toward zero) and its low
half (an int16 residual); stochastic rounding rounds up with probability equal to the fraction of the way to the
next 16-bit value, from a Philox4x32-10 stream keyed by ``seed`` and counted by (step, tensor index in the call,
element index), so results do not depend on threads, instruction sets or the device.

Modes for 16-bit params (``master_weights=``):

=============  =========================================================  ==========================
mode           what is kept                                               extra bytes per param
=============  =========================================================  ==========================
``None``       the param itself, the float32 result rounded to nearest    0
               (or stochastically with ``stochastic_rounding=True``)
``"fp32"``     a float32 master in the state; the param is its rounding   4
``"split"``    bfloat16 params only: param = master's high half, an int16  2
               residual its low half: the float32 master bit for bit
=============  =========================================================  ==========================

State dtype (``state_dtype=``): float32 by default for 16-bit params; ``"bfloat16"`` (or the library's bfloat16
dtype) or ``"param"`` (the param's own dtype: torch's fused optimizers' behaviour).  float32 and float64 params keep
state in their own dtype.
"""

from __future__ import annotations

import numpy as np

from ._arrays import _cupy_device, _library, plain

__all__ = ["dtype_name", "is_16bit", "resolve_state_dtype", "init_masters", "master_values", "MASTER_MODES"]

MASTER_MODES = (None, "fp32", "split")
_NAMES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16", "half": "float16",
          "int16": "int16"}


def dtype_name(x) -> str:
    """The dtype of an array (or a dtype: NumPy, ml_dtypes, CuPy, torch, or a name) in words: 'bfloat16', ..."""
    if isinstance(x, str):
        return _NAMES.get(x, x)
    dt = x if isinstance(x, type) else getattr(x, "dtype", x)
    s = str(dt)
    if s.startswith("torch."):
        s = s[len("torch."):]
    else:
        try:
            s = np.dtype(dt).name
        except TypeError:
            pass
    return _NAMES.get(s, s)


def is_16bit(x) -> bool:
    return dtype_name(x) in ("bfloat16", "float16")


def resolve_state_dtype(param_dtype: str, state_dtype) -> str:
    """The state dtype (a name) for params of ``param_dtype`` given the ``state_dtype=`` keyword."""
    pd = dtype_name(param_dtype)
    if state_dtype is None:
        return "float32" if pd in ("bfloat16", "float16") else pd
    sd = pd if (isinstance(state_dtype, str) and state_dtype == "param") else dtype_name(state_dtype)
    if pd in ("float32", "float64"):
        if sd != pd:
            raise ValueError(f"state_dtype: {pd} params keep {pd} state, got {sd!r} (a 16-bit state is for 16-bit "
                             f"params)")
        return sd
    if sd not in ("float32", "bfloat16", pd):
        raise ValueError(f"state_dtype: expected None, 'float32', 'bfloat16' or 'param' for {pd} params, got "
                         f"{state_dtype!r}")
    return sd


def check_master_mode(master_weights, stochastic_rounding: bool = False) -> None:
    if master_weights not in MASTER_MODES:
        raise ValueError(f"master_weights: expected None, 'fp32' or 'split', got {master_weights!r}")
    if type(stochastic_rounding) is not bool:
        raise TypeError(f"stochastic_rounding: expected a bool, got {type(stochastic_rounding).__name__}")
    if stochastic_rounding and master_weights is not None:
        raise ValueError(f"stochastic_rounding: only without a master copy (master_weights=None), got "
                         f"master_weights={master_weights!r}")


def numpy_dtype(name: str):
    """The NumPy dtype of a name ('bfloat16' through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def zeros_like_dtype(a, name: str):
    """Zeros shaped (and laid out) like ``a``, in ``a``'s library and device, of dtype ``name``."""
    lib = _library(a)
    if lib == "torch":
        import torch

        return torch.zeros_like(plain(a), dtype=getattr(torch, name), memory_format=torch.preserve_format)
    if lib == "cupy":
        import cupy

        if name == "bfloat16":
            raise TypeError("CuPy has no bfloat16 dtype; use float32 state (the default) or torch tensors")
        with _cupy_device(a):
            return cupy.zeros_like(a, dtype=name)
    return np.zeros_like(a, dtype=numpy_dtype(name))


def init_masters(params, master_weights):
    """The master arrays ``master_weights=`` needs, one per param: float32 copies of the params for ``"fp32"``,
    int16 zeros for ``"split"`` (a bfloat16 value is exactly its own float32 master: the low half is 0)."""
    check_master_mode(master_weights)
    out = []
    for i, p in enumerate(params if isinstance(params, (list, tuple)) else [params]):
        pd = dtype_name(p)
        if pd not in ("bfloat16", "float16"):
            raise TypeError(f"params[{i}]: a master copy is for bfloat16/float16 params, got {pd}")
        if master_weights == "split":
            if pd != "bfloat16":
                raise ValueError(f"params[{i}]: master_weights='split' needs bfloat16 params, got {pd}; use 'fp32'")
            out.append(zeros_like_dtype(p, "int16"))
        else:
            lib = _library(p)
            if lib == "torch":
                out.append(plain(p).float().clone())
            elif lib == "cupy":
                with _cupy_device(p):
                    out.append(p.astype("float32"))
            else:
                out.append(np.asarray(p).astype(np.float32))
    return out if isinstance(params, (list, tuple)) else out[0]


def master_values(param, master, master_weights):
    """The float32 master a param and its master array hold (a new array, same library): the master itself for
    ``"fp32"``, (param bits << 16) | residual bits for ``"split"``, the param widened for None."""
    check_master_mode(master_weights)
    lib = _library(param)
    if master_weights == "fp32":
        return plain(master).clone() if lib == "torch" else master.copy()
    if master_weights is None:
        return plain(param).float() if lib == "torch" else param.astype("float32")
    if lib == "torch":
        import torch

        hi = plain(param).view(torch.int16).to(torch.int32) & 0xFFFF
        lo = plain(master).to(torch.int32) & 0xFFFF
        return ((hi << 16) | lo).view(torch.float32)
    xp = np if lib == "numpy" else __import__(lib)
    hi = param.view(xp.uint16).astype(xp.uint32)
    lo = master.view(xp.uint16).astype(xp.uint32)
    return ((hi << 16) | lo).view(xp.float32)
