"""Helpers shared by the reference tests (comparisons against torch.optim and NumPy transcriptions)."""

from __future__ import annotations

import contextlib
import math

import numpy as np


@contextlib.contextmanager
def torch_dtype(dtype):
    """float64 runs set torch's default dtype so that torch keeps its scalar state (step, mu_product) in float64."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def rel_err(a, b, floor: float = 0.0) -> float:
    """max|a - b| / max(max|b|, floor).

    ``floor`` is a fraction of the same quantity's scale over all tensors of the model: a 1-element buffer such as
    an exp_avg can sit near zero by cancellation, and its ulp-level noise divided by its own tiny value says
    nothing about the kernel."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return 0.0
    diff = float(np.max(np.abs(a - b)))
    if not np.isfinite(diff):
        return math.inf
    denom = max(float(np.max(np.abs(b))), floor)
    return diff / denom if denom > 0 else diff


def require_cupy_gpu(what: str):
    """CuPy, or skip the calling test module (with a reason) when CuPy, a CUDA device or optkern's CUDA kernels are
    missing.  Call at module level: ``cupy = require_cupy_gpu("batch-norm")``."""
    import optkern
    import pytest

    cupy = pytest.importorskip("cupy", reason=f"CuPy is not installed; the CUDA {what} checks need CuPy and a GPU")
    try:
        ngpu = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no driver, no device
        ngpu = 0
    if not optkern.cuda_available() or ngpu < 1:
        pytest.skip(f"no CUDA device (or this optkern build has no CUDA kernels): CUDA {what} checks skipped",
                    allow_module_level=True)
    return cupy
