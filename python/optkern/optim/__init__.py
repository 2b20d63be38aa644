"""torch.optim-compatible optimizers running optkern's fused kernels."""

from .algorithms import OGR, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RMSprop, Rprop
from .lbfgs import LBFGS
from .ncg import NCG
from .optimizer import Optimizer

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop",
           "OGR", "LBFGS", "NCG"]
