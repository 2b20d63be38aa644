"""Step-size schedules: plain functions of k, the number of steps already taken (0 on the first step).

Every optimizer accepts one of these (or any callable of k) as ``lr``; it is evaluated once per step on the
host, never per element.  Sources: seed 000 (1/k, and the linear decay from alpha to beta over t steps) and
seed 003 (exponential and quadratic decay, and eta_0/(k+1), which that seed calls linear decay).
"""

from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]


def _check(name: str, v: float, lo: float = 0.0) -> float:
    v = float(v)
    if not (math.isfinite(v) and v >= lo):
        raise ValueError(f"{name}: expected a finite number >= {lo}, got {v}")
    return v


def constant(lr: float) -> Schedule:
    """eps_k = lr."""
    lr = _check("lr", lr)
    return lambda k: lr


def inverse_time(lr0: float) -> Schedule:
    """eps_k = lr0 / (k + 1): the 1/k rule of seed 000 (sum eps = inf, sum eps^2 < inf)."""
    lr0 = _check("lr0", lr0)
    return lambda k: lr0 / (k + 1)


def linear_decay(alpha: float, beta: float, t: int) -> Schedule:
    """Seed 000: eps_k = (1 - k/t) alpha + (k/t) beta for k <= t, then beta (typically beta ~ alpha / 100)."""
    alpha, beta = _check("alpha", alpha), _check("beta", beta)
    if int(t) != t or t < 1:
        raise ValueError(f"t: expected an integer >= 1, got {t}")
    t = int(t)

    def f(k: int) -> float:
        if k > t:
            return beta
        a = k / t
        return (1.0 - a) * alpha + a * beta

    return f


def exponential_decay(lr0: float, beta: float) -> Schedule:
    """Seed 003: eta_k = eta_0 exp(-beta k), beta > 0."""
    lr0, beta = _check("lr0", lr0), _check("beta", beta)
    return lambda k: lr0 * math.exp(-beta * k)


def quadratic_decay(lr0: float) -> Schedule:
    """Seed 003: eta_k = eta_0 / (k + 1)^2."""
    lr0 = _check("lr0", lr0)
    return lambda k: lr0 / (k + 1) ** 2


def linear_warmup(warmup_steps: int, after: Schedule | float) -> Schedule:
    """Ramp linearly from after(0)/warmup_steps up to after(warmup_steps) over the first warmup_steps steps, then
    follow ``after`` (counted from the start of training)."""
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps}")
    w = int(warmup_steps)
    base = after if callable(after) else constant(after)

    def f(k: int) -> float:
        if k < w:
            return base(k) * (k + 1) / w
        return base(k)

    return f
