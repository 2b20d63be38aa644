"""Array-library helpers: which library an array belongs to, state allocation in that library, streams.

optkern never copies a caller's array; these helpers only allocate optimizer state (like the param, in the
param's own library and on its own device) and find the CUDA stream a GPU step should be ordered on: the current
stream of the array's own device, which need not be the current device.  CuPy allocates and reports streams for
the current device, so every CuPy call here runs under the array's device (``_cupy_device``).
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


def _cupy_device(a):
    """A context that makes a CuPy array's device current (CuPy allocates on, and reports streams of, the current
    device)."""
    import cupy

    return cupy.cuda.Device(a.device.id)


def zeros_like(a):
    return full_like(a, 0.0)


def full_like(a, value: float):
    lib = _library(a)
    if lib == "numpy":
        return np.full_like(a, value)
    if lib == "cupy":
        import cupy

        with _cupy_device(a):
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
    if lib == "cupy":
        with _cupy_device(a):  # CuPy copies to the current device
            return a.copy()
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

        with _cupy_device(like):
            return cupy.array(value, dtype=like.dtype, copy=True)
    if lib == "torch":
        import torch

        return torch.as_tensor(np.asarray(value) if _library(value) != "torch" else value, dtype=like.dtype,
                               device=like.device).clone()
    raise TypeError(f"cannot load optimizer state into an array of type {type(like).__name__}")


def same_shape(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape)


def current_stream(a) -> int:
    """The CUDA stream a step on `a` is ordered on: CuPy's or PyTorch's current stream of `a`'s own device (0 for
    the CPU, and for other libraries: the legacy default stream; the binding orders the step after a
    ``__cuda_array_interface__`` producer's ``stream``)."""
    if type(a) is _ndarray:
        return 0
    lib = _library(a)
    if lib == "cupy":
        import cupy

        device = a.device.id
        if device == cupy.cuda.runtime.getDevice():
            return int(cupy.cuda.get_current_stream().ptr)
        with cupy.cuda.Device(device):  # CuPy keeps one current stream per device
            return int(cupy.cuda.get_current_stream().ptr)
    if lib == "torch":
        if a.device.type != "cuda":
            return 0
        import torch

        return int(torch.cuda.current_stream(a.device).cuda_stream)
    return 0


def empty_like(a):
    """An uninitialised array like `a`: same library, device, dtype, shape and memory layout (strides)."""
    lib = _library(a)
    if lib == "torch":
        import torch

        return torch.empty_like(plain(a), memory_format=torch.preserve_format)
    if lib == "cupy":
        import cupy

        with _cupy_device(a):
            return cupy.empty_like(a)
    if isinstance(a, np.ndarray):
        return np.empty_like(a)
    if not is_cuda(a):  # another DLPack producer on the CPU: results come back as NumPy arrays
        return np.empty_like(np.from_dlpack(a))
    raise TypeError(f"cannot allocate an output like an array of type {type(a).__name__}; pass out=")


def empty_vector(like, n: int, dtype="float64"):
    """An uninitialised 1-D array of n elements in the library and on the device of `like`."""
    lib = _library(like)
    if lib == "torch":
        import torch

        return torch.empty((n,), dtype=getattr(torch, str(dtype)), device=like.device)
    if lib == "cupy":
        import cupy

        with _cupy_device(like):
            return cupy.empty((n,), dtype=dtype)
    if isinstance(like, np.ndarray) or not is_cuda(like):
        return np.empty((n,), dtype=dtype)
    raise TypeError(f"cannot allocate an output like an array of type {type(like).__name__}")


def as_float64_vector(v, like):
    """A per-channel vector as float64 in the library of `like` (a copy only when its dtype differs)."""
    lib = _library(like)
    if lib == "torch":
        import torch

        v = plain(v) if _library(v) == "torch" else torch.as_tensor(np.asarray(v), device=like.device)
        return v if v.dtype == torch.float64 else v.to(torch.float64)
    if lib == "cupy":
        import cupy

        with _cupy_device(like):
            return cupy.asarray(v, dtype=cupy.float64)
    if _library(v) not in ("numpy", "builtins") and not isinstance(v, np.ndarray) and hasattr(v, "__dlpack__"):
        v = np.from_dlpack(v)
    return np.asarray(v, dtype=np.float64)


def stack_rows(vectors, like):
    """Stack a sequence of 1-D arrays (or pass a 2-D array through) as a C-contiguous float64 2-D array."""
    lib = _library(like)
    if lib == "torch":
        import torch

        if _library(vectors) == "torch":
            return plain(vectors).to(torch.float64).contiguous()
        return torch.stack([as_float64_vector(v, like) for v in vectors]).contiguous()
    if lib == "cupy":
        import cupy

        with _cupy_device(like):
            if _library(vectors) == "cupy":
                return cupy.ascontiguousarray(vectors, dtype=cupy.float64)
            return cupy.ascontiguousarray(cupy.stack([cupy.asarray(v, dtype=cupy.float64) for v in vectors]))
    if isinstance(vectors, np.ndarray):
        return np.ascontiguousarray(vectors, dtype=np.float64)
    return np.ascontiguousarray(np.stack([as_float64_vector(v, like) for v in vectors]))
