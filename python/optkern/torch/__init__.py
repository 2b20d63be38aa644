"""optkern.torch: the PyTorch-native front end.

* :mod:`optkern.torch.optim` (re-exported here): ``SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, Adadelta,
  Rprop, LBFGS`` (subclasses of the ``torch.optim`` classes of the same names) and ``OGR`` (a
  ``torch.optim.Optimizer``, no torch counterpart), whose step runs optkern's fused
  kernel (one call per param group, dtype and device).
* :class:`NCG` (:mod:`optkern.torch.ncg`): nonlinear conjugate gradients as a ``torch.optim.Optimizer`` with
  LBFGS's closure interface (optkern.optim.NCG's iteration).
* :mod:`optkern.torch.nn`: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and ``convert_batchnorm`` on optkern's
  batch-norm kernels, with autograd.

``import optkern`` never imports torch; ``import optkern.torch`` (or the attribute ``optkern.torch``) does.
"""

from __future__ import annotations

import torch  # noqa: F401  (the framework this front end is for)

from . import optim  # noqa: E402
from .lbfgs import LBFGS  # noqa: E402
from .ncg import NCG  # noqa: E402
from .optim import OGR, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RMSprop, Rprop  # noqa: E402

__all__ = ["optim", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop", "OGR", "LBFGS",
           "NCG"]
