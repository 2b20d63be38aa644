"""Step-size schedules: callables of k, the number of steps already taken (0 on the first step).

Every optimizer accepts one of these (or any callable of k) as ``lr``; it is evaluated once per step on the
host, never per element.  Sources: seed 000 (1/k, and the linear decay from alpha to beta over t steps) and
seed 003 (exponential and quadratic decay, and eta_0/(k+1), which that seed calls linear decay).

Each schedule is a small class (``constant(0.1)`` builds one) holding its numbers, so it pickles and copies with
the optimizer whose ``lr`` it is (a ``state_dict()`` with one pickles), and its ``repr`` shows how to rebuild it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .functional import real_number

__all__ = ["constant", "inverse_time", "linear_decay", "exponential_decay", "quadratic_decay", "linear_warmup"]

Schedule = Callable[[int], float]


def _check(name: str, v, lo: float = 0.0) -> float:
    v = real_number(name, v)
    if not v >= lo:
        raise ValueError(f"{name}: expected a finite number >= {lo}, got {v}")
    return v


def _count(name: str, v, lo: int) -> int:
    """A number of steps: an integer, or a float with an integral value (t=1e4); a bool or a string is refused."""
    if type(v) is not int and not isinstance(v, np.integer):
        x = real_number(name, v)
        if not x.is_integer():
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        v = x
    v = int(v)
    if v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v}")
    return v


class _Schedule:
    """A schedule's numbers as attributes (in ``_fields`` order), a repr that rebuilds it, and equality by value."""

    _fields: tuple = ()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"optkern.schedules.{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self._fields)

    def __hash__(self) -> int:
        return hash((type(self), tuple(getattr(self, k) for k in self._fields)))


class constant(_Schedule):  # noqa: N801  (the schedules' names are the documented functions')
    """eps_k = lr."""

    _fields = ("lr",)

    def __init__(self, lr: float):
        self.lr = _check("lr", lr)

    def __call__(self, k: int) -> float:
        return self.lr


class inverse_time(_Schedule):  # noqa: N801
    """eps_k = lr0 / (k + 1): the 1/k rule of seed 000 (sum eps = inf, sum eps^2 < inf)."""

    _fields = ("lr0",)

    def __init__(self, lr0: float):
        self.lr0 = _check("lr0", lr0)

    def __call__(self, k: int) -> float:
        return self.lr0 / (k + 1)


class linear_decay(_Schedule):  # noqa: N801
    """Seed 000: eps_k = (1 - k/t) alpha + (k/t) beta for k <= t, then beta (typically beta ~ alpha / 100)."""

    _fields = ("alpha", "beta", "t")

    def __init__(self, alpha: float, beta: float, t: int):
        self.alpha, self.beta = _check("alpha", alpha), _check("beta", beta)
        self.t = _count("t", t, 1)

    def __call__(self, k: int) -> float:
        if k > self.t:
            return self.beta
        a = k / self.t
        return (1.0 - a) * self.alpha + a * self.beta


class exponential_decay(_Schedule):  # noqa: N801
    """Seed 003: eta_k = eta_0 exp(-beta k), beta > 0."""

    _fields = ("lr0", "beta")

    def __init__(self, lr0: float, beta: float):
        self.lr0, self.beta = _check("lr0", lr0), _check("beta", beta)

    def __call__(self, k: int) -> float:
        return self.lr0 * math.exp(-self.beta * k)


class quadratic_decay(_Schedule):  # noqa: N801
    """Seed 003: eta_k = eta_0 / (k + 1)^2."""

    _fields = ("lr0",)

    def __init__(self, lr0: float):
        self.lr0 = _check("lr0", lr0)

    def __call__(self, k: int) -> float:
        return self.lr0 / (k + 1) ** 2


class linear_warmup(_Schedule):  # noqa: N801
    """Ramp linearly from after(0)/warmup_steps up to after(warmup_steps) over the first warmup_steps steps, then
    follow ``after`` (counted from the start of training).  ``after``: a schedule, or a number (constant)."""

    _fields = ("warmup_steps", "after")

    def __init__(self, warmup_steps: int, after: Schedule | float):
        self.warmup_steps = _count("warmup_steps", warmup_steps, 0)
        self.after = after if callable(after) else constant(after)

    def __call__(self, k: int) -> float:
        if k < self.warmup_steps:
            return self.after(k) * (k + 1) / self.warmup_steps
        return self.after(k)
