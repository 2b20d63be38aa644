"""optkern: fused optimizer steps on CPU (AVX-512/AVX2) and CUDA, in place on NumPy, CuPy and DLPack arrays.

    import numpy as np, optkern
    opt = optkern.optim.Adam(params, lr=1e-3)
    opt.step(grads)          # one fused pass over params, grads and state

Layers: :mod:`optkern.optim` (torch.optim-named classes) over :mod:`optkern.functional` (one function per
algorithm) over the compiled core ``optkern._C``.  Also :func:`clip_grad_norm` (global-norm clipping folded into
the step as ``grad_multiplier``) and :mod:`optkern.schedules`.
The C interface (liboptkern, ``optkern/optkern.h``) ships in the package: :func:`library_path`,
:func:`include_dir`, :func:`lib_dir`, :func:`cmake_dir` and :func:`pkgconfig_dir` say where (``python -m optkern
--cmake-dir`` etc. print them).
:mod:`optkern.torch` (imported on first use, never by ``import optkern``) is the PyTorch front end.
"""

from __future__ import annotations

import os as _os

from . import _C

_isa = _os.environ.get("OPTKERN_CPU_ISA")
if _isa:
    try:
        _C.set_cpu_isa(_isa)
    except ValueError as e:  # a forced path this CPU lacks, or a typo: fail loudly, never fall back
        raise ImportError(f"OPTKERN_CPU_ISA={_isa!r}: {e}") from None

from . import batch_norm, functional, lbfgs, ncg, optim, precision, schedules  # noqa: E402
from .precision import init_masters, master_values  # noqa: E402
from .batch_norm import (  # noqa: E402
    batch_norm_backward,
    batch_norm_backward_dx,
    batch_norm_backward_reduce,
    batch_norm_combine,
    batch_norm_forward,
    batch_norm_normalize,
    batch_norm_stats,
)
from .lbfgs import LBFGSHistory, LBFGSResult, OptimizeResult, lbfgs_minimize  # noqa: E402
from .ncg import NCGState, ncg_minimize  # noqa: E402
from ._paths import cmake_dir, include_dir, lib_dir, library_path, pkgconfig_dir  # noqa: E402
from .clip import ClipResult, clip_grad_norm, global_norm  # noqa: E402
from .functional import (  # noqa: E402
    adadelta_step,
    adagrad_step,
    adam_step,
    adamax_step,
    adamw_step,
    nadam_step,
    ogr_step,
    rmsprop_step,
    rprop_step,
    sgd_step,
)

__version__ = "0.1.0"


def cpu_isa() -> str:
    """The CPU instruction-set path in use: 'avx512', 'avx2' or 'scalar' (force one with OPTKERN_CPU_ISA)."""
    return _C.cpu_isa()


def cpu_best_isa() -> str:
    """The best path this CPU supports."""
    return _C.cpu_best_isa()


def set_cpu_isa(isa: str) -> None:
    """Switch the CPU path ('avx512', 'avx2', 'scalar'); ValueError if this CPU lacks it."""
    _C.set_cpu_isa(isa)


def set_num_threads(n: int) -> None:
    """Threads used by CPU kernels for large work (default: every CPU this process may run on)."""
    _C.set_num_threads(int(n))


def get_num_threads() -> int:
    return _C.get_num_threads()


def cuda_available() -> bool:
    """True when the CUDA kernels were built and a CUDA device is present."""
    return _C.cuda_available()


def __getattr__(name: str):
    # optkern.torch (the PyTorch front end) is imported on first use: `import optkern` never imports torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'optkern' has no attribute {name!r}")


__all__ = [
    "optim", "functional", "schedules", "clip_grad_norm", "global_norm", "ClipResult", "cpu_isa", "cpu_best_isa",
    "set_cpu_isa", "set_num_threads", "get_num_threads", "cuda_available", "sgd_step", "adam_step", "adamw_step",
    "adagrad_step", "rmsprop_step", "adamax_step", "nadam_step", "adadelta_step", "rprop_step", "ogr_step",
    "batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_norm_stats", "batch_norm_combine",
    "batch_norm_normalize", "batch_norm_backward_reduce", "batch_norm_backward_dx",
    "lbfgs", "LBFGSHistory", "LBFGSResult", "OptimizeResult", "lbfgs_minimize", "ncg", "NCGState",
    "ncg_minimize", "precision", "init_masters", "master_values",
    "cmake_dir", "include_dir", "lib_dir", "library_path", "pkgconfig_dir",
]
