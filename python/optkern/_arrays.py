"""Array-library helpers: which library an array belongs to, state allocation in that library, streams.

optkern never copies a caller's array; these helpers only allocate optimizer state (like the param, in the
param's own library and device) and find the CUDA stream a GPU step should be ordered on.
"""

from __future__ import annotations

import numpy as np

_ndarray = np.ndarray


def as_list(x):
    """One array or a list/tuple of arrays -> a list."""
    if isinstance(x, list):
        return x
    if isinstance(x, tuple):
        return list(x)
    return [x]


def _library(a) -> str:
    if type(a) is _ndarray:
        return "numpy"
    mod = type(a).__module__.split(".")[0]
    return mod


def is_cuda(a) -> bool:
    if type(a) is _ndarray:
        return False
    lib = _library(a)
    if lib == "torch":
        return a.device.type == "cuda"
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    return bool(dev) and dev()[0] in (2, 13)


def plain(a):
    """A torch tensor that requires grad cannot export DLPack; its detached alias shares the same memory."""
    if type(a) is not _ndarray and getattr(a, "requires_grad", False):
        return a.detach()
    return a


def zeros_like(a):
    return full_like(a, 0.0)


def full_like(a, value: float):
    lib = _library(a)
    if lib == "numpy":
        return np.full_like(a, value)
    if lib == "cupy":
        import cupy

        return cupy.full_like(a, value)
    if lib == "torch":
        import torch

        return torch.full_like(plain(a), value, memory_format=torch.preserve_format)
    if isinstance(a, np.ndarray):  # a NumPy subclass
        return np.full_like(a, value)
    raise TypeError(f"cannot allocate optimizer state like an array of type {type(a).__name__}")


def copy_array(a):
    lib = _library(a)
    if lib == "torch":
        return plain(a).clone()
    return a.copy()


def to_library_like(value, like):
    """Convert a saved state array to the library/device/dtype of `like` (load_state_dict)."""
    lib = _library(like)
    if lib == "numpy" or isinstance(like, np.ndarray):
        if _library(value) == "cupy":
            value = value.get()
        elif _library(value) == "torch":
            value = value.detach().cpu().numpy()
        return np.array(value, dtype=like.dtype, copy=True)
    if lib == "cupy":
        import cupy

        return cupy.array(value, dtype=like.dtype, copy=True)
    if lib == "torch":
        import torch

        return torch.as_tensor(np.asarray(value) if _library(value) != "torch" else value, dtype=like.dtype,
                               device=like.device).clone()
    raise TypeError(f"cannot load optimizer state into an array of type {type(like).__name__}")


def same_shape(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape)


def current_stream(a) -> int:
    """The CUDA stream a step on `a` is ordered on: CuPy's or PyTorch's current stream (0 for the CPU)."""
    if type(a) is _ndarray:
        return 0
    lib = _library(a)
    if lib == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    if lib == "torch":
        if a.device.type != "cuda":
            return 0
        import torch

        return int(torch.cuda.current_stream(a.device).cuda_stream)
    return 0
