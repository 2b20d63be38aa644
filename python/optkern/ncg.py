"""Nonlinear conjugate gradients (NCG): a fused direction kernel, a direction state with restarts, a minimizer.

    st = optkern.NCGState(n, beta="pr+", like=x)   # the direction v and the restart bookkeeping
    v, slope = st.direction(g, g_prev)             # v = beta v - g in place (one pass), slope = v.g
    res = optkern.ncg_minimize(fun_and_grad, x0)   # res.x, res.fun, res.grad, res.nit, res.nfev, res.nrestarts

From LeCun, Bottou, Orr & Mueller, "Efficient BackProp" (1998), "nonlinear conjugated gradients":
``v_t = beta_t v_{t-1} - grad F(theta_t)`` with a line search along v_t and restarts, beta_t by

- Fletcher-Reeves ``"fr"``: g_t.g_t / g_{t-1}.g_{t-1};
- Polak-Ribiere ``"pr"``: (g_t - g_{t-1}).g_t / g_{t-1}.g_{t-1};
- PR+ ``"pr+"`` (the default): max(PR, 0), the variant practitioners use.

Passes over memory per iteration (besides fun_and_grad and the line search's x + t v).  beta needs g_t.g_t and
g_t.g_{t-1} over ALL of g_t before any element of v_t can be written, so one pass cannot both finish beta's dots
and write v_t; the dots of the next beta are therefore taken in the pass that already reads the new gradient:

1. at each line-search trial, ONE dots call of [v, g_t, g_{t+1}] with the query g_{t+1} gives g_{t+1}.v (the
   slope the search needs anyway), g_{t+1}.g_{t+1} and g_{t+1}.g_t (beta's numerators; g_t.g_t, the denominator,
   is the previous iteration's): reads v, g_t and g_{t+1} once (3 n elements; L-BFGS's slope pass reads 2 n;
   FR without Powell's test reads 2 n, as g_t is not needed);
2. the direction: ONE fused kernel (``_C.ncg_direction``) reads g and v and writes v = beta v - g in place,
   returning v.g, the next search's initial slope, from the same pass (3 n elements: the bytes of an in-place add).

g_{t-1} is never copied: the minimizer keeps the previous gradient's buffer.  So the NCG work per iteration is
one 3 n pass plus one extra stream in each trial's slope pass; a standalone ``direction(g, g_prev)`` without
precomputed ``dots`` adds a read-only dots pass over g and g_prev (2 n) first.

Restarts (v = -g, beta = 0; the kernel then does not read v): the first direction and after ``reset()``; every
``restart`` directions (default n, the dimension); when ``powell`` is set and |g_t.g_{t-1}| >= powell g_t.g_t
(Powell's test; 0.2 is Powell's value); and when v is not a descent direction (v.g >= 0, or not finite), the
direction then rewritten as -g (a second pass, on that iteration only).  PR+ returning 0 is a restart by the rule.

``allreduce=fn`` serves vectors sharded across processes, as ``LBFGSHistory.direction``: each process holds its
shard of g, g_prev and v; ``fn`` receives the float64 partial dot products (a flat NumPy array) and returns their
sum over the shards.  One message for beta's dots (when not passed in), one for the slope.
"""

from __future__ import annotations

import math

import numpy as np

from . import _C
from ._arrays import _library, current_stream
from .lbfgs import (
    _DTYPES,
    _aligned_rows,
    _byte_range,
    _check_vector,
    _check_minimize_args,
    _descent,
    _dots,
    _reduce,
    _xp,
)

__all__ = ["NCGState", "ncg_minimize", "ncg_beta", "BETA_RULES"]

BETA_RULES = ("fr", "pr", "pr+")


def ncg_beta(rule, gg, ggp, gpgp):
    """beta from gg = g.g, ggp = g.g_prev, gpgp = g_prev.g_prev (the one formula, csrc/optkern/ncg_rules.h)."""
    return _C.ncg_beta(rule, float(gg), float(ggp), float(gpgp))


def _direction_kernel(g, v, beta):
    """v = beta v - g in place (beta 0: v = -g, v not read); returns v.g (bitwise _dots([v], [g]))."""
    return _C.ncg_direction(g, v, float(beta), current_stream(g))


def _check_rule_args(beta, restart, powell):
    if beta not in BETA_RULES:
        raise ValueError(f"beta: expected one of {BETA_RULES}, got {beta!r}")
    if restart is not None and (isinstance(restart, bool) or not isinstance(restart, (int, np.integer))
                                or restart < 1):
        raise ValueError(f"restart: expected None (every n iterations) or an integer >= 1, got {restart!r}")
    if powell is not None and (isinstance(powell, bool) or not isinstance(powell, (int, float, np.integer,
                                                                                    np.floating))
                               or not (math.isfinite(float(powell)) and float(powell) > 0)):
        raise ValueError(f"powell: expected None (no Powell test) or a finite number > 0, got {powell!r}")


class NCGState:
    """The NCG direction v (owned, 64-byte aligned, on like's device) and its restart bookkeeping.

    ``n``: elements; ``dtype``: float32 or float64 (default like's, else float64); ``like``: a NumPy or CuPy
    array whose library and device hold v; ``beta``: "fr", "pr" or "pr+"; ``restart``: a steepest-descent
    restart every ``restart`` directions (None: n); ``powell``: None, or the threshold of Powell's restart test
    |g.g_prev| >= powell g.g.  ``nrestarts`` counts restarts by reason ("every", "powell", "descent").
    """

    def __init__(self, n, dtype=None, like=None, *, beta="pr+", restart=None, powell=None):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n!r}")
        if like is not None and _library(like) not in ("numpy", "cupy") and not isinstance(like, np.ndarray):
            raise TypeError(f"like: expected a NumPy or CuPy array, got {type(like).__name__}")
        dtype = np.dtype(dtype if dtype is not None else (like.dtype if like is not None else np.float64))
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        _check_rule_args(beta, restart, powell)
        self.n, self.dtype, self.rule = int(n), dtype, beta
        self.restart = self.n if restart is None else int(restart)
        self.powell = None if powell is None else float(powell)
        self._xp = np if like is None else _xp(like)
        self._device = None if self._xp is np else like.device.id
        if self._xp is np:
            self.v = _aligned_rows(np, 1, self.n, dtype)[0]
        else:
            with self._xp.cuda.Device(self._device):
                self.v = _aligned_rows(self._xp, 1, self.n, dtype)[0]
        self.nrestarts = {"every": 0, "powell": 0, "descent": 0}
        self.reset()

    @property
    def needs_g_prev(self):
        """True when beta or the restart test use g.g_prev (PR, PR+, Powell's test)."""
        return self.rule != "fr" or self.powell is not None

    def reset(self):
        """The next direction is -g (v's contents are then never read)."""
        self._gg_prev = None  # g_{t-1}.g_{t-1} of the last direction; None: start afresh
        self._k = 0  # directions since the last steepest-descent one
        self.beta = 0.0  # beta of the last direction (0: steepest descent)

    def _check(self, a, name):
        _check_vector(a, name, self, "the state")
        (a0, a1), (v0, v1) = _byte_range(a), _byte_range(self.v)
        if a0 < v1 and v0 < a1:
            raise ValueError(f"{name}: overlaps the state's direction v (which the kernel writes)")

    def beta_dots(self, g, g_prev=None, allreduce=None):
        """(g.g, g.g_prev) in one read-only pass (g.g_prev NaN when not needed); reduced with allreduce."""
        stored = [g] + ([g_prev] if self.needs_g_prev else [])
        d = _reduce(_dots(stored, [g]), allreduce)[0]
        return float(d[0]), (float(d[1]) if self.needs_g_prev else math.nan)

    def direction(self, g, g_prev=None, *, dots=None, allreduce=None):
        """(v, v.g): the next direction, written into ``self.v`` in one pass, and its slope (sharded total with
        ``allreduce``).  ``g_prev``: the previous gradient (needed by PR, PR+ and Powell's test unless ``dots``
        is given); ``dots``: (g.g, g.g_prev) already computed (and reduced), e.g. by the line search's slope pass.
        Every argument is checked before v is written."""
        self._check(g, "g")
        fresh = self._gg_prev is None
        if not fresh and dots is None and self.needs_g_prev:
            if g_prev is None:
                raise ValueError(f"g_prev: beta={self.rule!r}{' with powell' if self.powell else ''} needs the "
                                 f"previous gradient (or dots=(g.g, g.g_prev))")
            self._check(g_prev, "g_prev")
        if dots is not None:
            if len(dots) != 2:
                raise ValueError(f"dots: expected (g.g, g.g_prev), got {len(dots)} values")
            dots = (float(dots[0]), float(dots[1]))
        beta, reason = 0.0, None
        if not fresh:
            gg, ggp = dots if dots is not None else self.beta_dots(g, g_prev, allreduce)
            if self._k + 1 >= self.restart:
                reason = "every"
            elif self.powell is not None and abs(ggp) >= self.powell * gg:
                reason = "powell"
            else:
                beta = ncg_beta(self.rule, gg, ggp if self.needs_g_prev else 0.0, self._gg_prev)
                if not math.isfinite(beta):
                    beta = 0.0
        if reason is not None:
            self.nrestarts[reason] += 1
        slope = self._slope(g, beta, allreduce)
        if beta != 0.0 and not (slope < 0 and math.isfinite(slope)):
            self.nrestarts["descent"] += 1
            beta = 0.0
            slope = self._slope(g, 0.0, allreduce)
        self._gg_prev = -slope if beta == 0.0 else gg  # v = -g: v.g = -g.g exactly (bitwise the dots' g.g)
        self._k = 0 if beta == 0.0 else self._k + 1
        self.beta = beta
        return self.v, slope

    def _slope(self, g, beta, allreduce):
        s = _direction_kernel(g, self.v, beta)
        return float(_reduce(np.array([s]), allreduce)[0]) if allreduce is not None else float(s)


class _NCGMethod:
    """ncg_minimize's part of the shared loop (lbfgs._descent): the fused direction, beta's dots folded into the
    line search's slope pass, the previous gradient kept by reference."""

    def __init__(self, state):
        self.st = state
        self.g_prev = None
        self.dots = None  # (g.g, g.g_prev) of the accepted point, from its trial's slope pass

    def direction(self, g):
        v, slope = self.st.direction(g, self.g_prev, dots=self.dots)
        return v, slope, self.st.beta == 0.0

    def first_step(self, gtd, steepest, f, f_old):
        # The first iteration: min(1, 1/||g||_2) (-gtd = ||g||^2); then Nocedal & Wright (3.60), as scipy's CG:
        # the step that would repeat the last decrease f_old - f along the new slope, at most 1.
        if f_old is None:
            return min(1.0, 1.0 / math.sqrt(-gtd))
        t = 1.01 * 2 * (f - f_old) / gtd
        return min(1.0, t) if t > 0 and math.isfinite(t) else 1.0

    def trial_slope(self, v, g, gt):
        stored = [v, gt] + ([g] if self.st.needs_g_prev else [])
        d = _dots(stored, [gt])[0]  # gt.v, gt.gt, gt.g: one read of v, gt (and g)
        return float(d[0]), (float(d[1]), float(d[2]) if self.st.needs_g_prev else math.nan)

    def reset(self):
        self.st.reset()

    def accept(self, x, g, x_new, g_new, extra):
        old, self.g_prev, self.dots = self.g_prev, g, extra
        return [] if old is None else [old]

    def info(self):
        return {"nrestarts": dict(self.st.nrestarts)}


def ncg_minimize(fun_and_grad, x0, *, beta="pr+", restart=None, powell=None, max_iter=None, gtol=1e-6,
                 ftol=2.220446049250313e-09, line_search="strong_wolfe", callback=None, c1=1e-4, c2=0.4,
                 max_ls=20):
    """Minimize f with nonlinear conjugate gradients; ``fun_and_grad(x) -> (f, g)`` as for ``lbfgs_minimize``.

    ``beta``: "fr", "pr" or "pr+" (module docstring); ``restart``: steepest descent every ``restart``
    iterations (None: n, the dimension); ``powell``: None (off) or the threshold of Powell's restart test
    |g_t.g_{t-1}| >= powell g_t.g_t (0.2 is Powell's).  A direction that does not descend is replaced by -g.
    ``max_iter``: None is scipy CG's 200 n.  ``c2`` defaults to 0.4 (scipy CG's; Fletcher-Reeves needs c2 < 1/2
    for its descent guarantee).  The line searches, the stopping tests (gtol, ftol), the failure handling and the
    result (``OptimizeResult`` with ``nrestarts``) are lbfgs_minimize's; a failed line search restarts from
    steepest descent once before giving up.  First trial step: min(1, 1/||g||_2), then
    min(1, 2.02 (f_t - f_{t-1}) / v_t.g_t) (Nocedal & Wright (3.60), as scipy's CG).
    """
    _check_rule_args(beta, restart, powell)
    if max_iter is None and _library(x0) in ("numpy", "cupy"):
        max_iter = 200 * int(np.prod(x0.shape))
    _check_minimize_args(x0, line_search, max_iter, gtol, ftol, c1, c2, max_ls)
    state = NCGState(int(np.prod(x0.shape)), x0.dtype, like=x0, beta=beta, restart=restart, powell=powell)
    return _descent(fun_and_grad, x0, _NCGMethod(state), max_iter, gtol, ftol, line_search, callback, c1, c2,
                    max_ls)
