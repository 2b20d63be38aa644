"""``optkern.optim.NCG``: nonlinear conjugate gradients with ``optkern.optim.LBFGS``'s closure interface.

    opt = optkern.optim.NCG(params, beta="pr+", max_iter=20, line_search_fn="strong_wolfe")
    opt.step(closure)       # up to max_iter NCG iterations; returns the closure's first loss

The closure is LBFGS's: NumPy/CuPy params ``closure() -> (loss, grads)``; torch tensors ``closure() -> loss``
after ``loss.backward()``.  Params are updated in place.  Flat n-vectors kept: the gradient, the previous
gradient (the buffers swap, never copied), the direction (``optkern.NCGState``) and, with a line search, the
params at the start of the search.

Each iteration (LBFGS's loop with NCG's direction, see ``optkern.ncg``):

1. v = beta v - g (one fused pass, also giving g.v), beta by ``beta`` ("fr", "pr", "pr+") from g.g and g.g_prev,
   restarts (v = -g) on the first iteration, every ``restart`` directions (None: n), by Powell's test
   (``powell``), and when v does not descend;
2. t = min(1, 1 / ||g||_2) lr on the very first iteration, else min(1, 2.02 (f - f_prev) / g.v) lr (Nocedal &
   Wright (3.60)); stop if g.v > -tolerance_change;
3. ``line_search_fn="strong_wolfe"`` (the default; c1 = 1e-4, c2 = 0.4, at most max_eval - evaluations so far
   trials, each trial's slope pass also giving beta's next dots), then params = params_start + t v; ``None``:
   params += t v, then one evaluation (skipped on the last iteration of the call);
4. stop after max_iter iterations or max_eval evaluations in this call, or when ||g||_inf <= tolerance_grad,
   ||t v||_inf <= tolerance_change or |f - f_prev| < tolerance_change.
"""

from __future__ import annotations

import numpy as np

from ..lbfgs import _DTYPES, _aligned_copy, _aligned_like, _dots, _max_abs, _strong_wolfe
from ..ncg import NCGState, _check_rule_args
from .lbfgs import LBFGS, _check_number, _to_float

__all__ = ["NCG"]

_HYPER = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "beta", "restart", "powell",
          "line_search_fn")


def _check_group(group):
    for name, lo, integer in (("lr", 0.0, False), ("max_iter", 1, True), ("max_eval", 1, True),
                              ("tolerance_grad", 0.0, False), ("tolerance_change", 0.0, False)):
        _check_number(name, group[name], lo, integer=integer)
    _check_rule_args(group["beta"], group["restart"], group["powell"])
    if group["line_search_fn"] not in (None, "strong_wolfe"):
        raise ValueError(f"line_search_fn: expected None or 'strong_wolfe', got {group['line_search_fn']!r}")


class NCG(LBFGS):
    """Nonlinear conjugate gradients (see the module docstring); LBFGS's params, closure, ``state``
    (``func_evals``, ``n_iter``), ``zero_grad``, copying and pickling.  ``state_dict()`` holds the counters, the
    direction, the previous gradient and the restart bookkeeping."""

    _HYPER = _HYPER
    _check_group = staticmethod(_check_group)

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 beta="pr+", restart=None, powell=None, line_search_fn="strong_wolfe"):
        self.defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                             tolerance_change=tolerance_change, beta=beta, restart=restart, powell=powell,
                             line_search_fn=line_search_fn)
        self._setup(params)
        self._ncg = None  # the NCGState, made by the first step
        self._dots = None  # (g.g, g.g_prev) of the accepted point, from the search's slope pass

    def _state_for(self, group):
        """The NCGState for the group's rule (a new one, restarting, when beta, restart or powell changed)."""
        st = self._ncg
        restart = self._n if group["restart"] is None else int(group["restart"])
        powell = None if group["powell"] is None else float(group["powell"])
        if st is None or (st.rule, st.restart, st.powell) != (group["beta"], restart, powell):
            old = st
            st = NCGState(self._n, self._dtype, like=self._g, beta=group["beta"], restart=group["restart"],
                          powell=group["powell"])
            if old is not None:
                st.nrestarts = old.nrestarts
            self._ncg, self._dots = st, None
        return st

    # -- copy and pickle, state dict ---------------------------------------------------------------------------

    def __getstate__(self):
        d = super().__getstate__()
        if self._ncg is not None:
            h = dict(self._ncg.__dict__)
            h.pop("_xp", None)
            d["_ncg"] = h
        return d

    def __setstate__(self, d):
        h = d.pop("_ncg", None)
        super().__setstate__(d)
        self._ncg = None
        if h is not None:
            st = NCGState.__new__(NCGState)
            st.__dict__.update(h)
            st._xp = self._xp
            st.v = _aligned_copy(st.v)
            self._ncg = st

    def _state_dict(self):
        copy = (lambda a: None if a is None else a.copy())
        st = self._ncg
        ncg = None if st is None else dict(v=st.v.copy(), gg_prev=st._gg_prev, k=st._k, beta=st.beta,
                                           nrestarts=dict(st.nrestarts))
        state = dict(self.state, t=self._t, prev_loss=self._prev_loss, g_prev=copy(self._g_prev), ncg=ncg,
                     dots=self._dots)
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.param_groups[0]["params"])))
        return {"state": state, "param_groups": [group]}

    def _load_state_dict(self, state_dict):
        st = state_dict["state"]
        ncg = st.get("ncg")
        _, st = self._load_common(state_dict, {"g_prev": st.get("g_prev"),
                                               "ncg.v": None if ncg is None else ncg["v"]})
        xp, dt = self._xp, self._dtype
        self._ncg = None
        self._dots = st.get("dots")
        if ncg is not None:
            s = self._state_for(self.param_groups[0])
            s.v[...] = xp.asarray(ncg["v"], dtype=dt)
            s._gg_prev, s._k, s.beta = ncg["gg_prev"], int(ncg["k"]), float(ncg["beta"])
            s.nrestarts = dict(ncg["nrestarts"])
            self._dots = st.get("dots")

    # -- the step ----------------------------------------------------------------------------------------------

    def _step(self, closure):
        group = self.param_groups[0]
        _check_group(group)
        lr, max_iter, max_eval = float(group["lr"]), int(group["max_iter"]), int(group["max_eval"])
        tol_grad, tol_change = float(group["tolerance_grad"]), float(group["tolerance_change"])
        line_search_fn = group["line_search_fn"]
        state = self.state
        ncg = self._state_for(group)
        closure, orig_loss, loss = self._first_evaluation(closure)
        current_evals = 1
        if _max_abs(self._g) <= tol_grad:
            return orig_loss
        if self._g_prev is None:
            self._g_prev = _aligned_like(self._g)
        d = ncg.v
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            g = self._g
            if state["n_iter"] == 1:
                ncg.reset()
            # the direction (beta's dots from the last search's slope pass, else a dots pass of its own)
            _, gtd = ncg.direction(g, self._g_prev, dots=self._dots)
            self._dots = None
            # the step length
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / float(np.sqrt(-gtd))) * lr
            else:
                t0 = 2.02 * (loss - self._prev_loss) / gtd if self._prev_loss is not None else 1.0
                t = (min(1.0, t0) if t0 > 0 and np.isfinite(t0) else 1.0) * lr
            self._prev_loss = loss
            self._t = t
            if gtd > -tol_change:
                break
            ls_evals = 0
            if line_search_fn == "strong_wolfe":
                x0 = self._search_start(g)
                count = [0]
                needs = ncg.needs_g_prev

                scratch = self._g_prev  # free once the direction is made: the trials' evaluations land there
                self._g = scratch

                def ev(tt, x0=x0, count=count, g=g):
                    ft = self._loss_at(tt, d, x0, closure)
                    count[0] += 1
                    gt = _aligned_copy(scratch)
                    dd = _dots([d, gt] + ([g] if needs else []), [gt])[0]  # gt.v, gt.gt, gt.g: one pass
                    return ft, float(dd[0]), (gt, (float(dd[1]), float(dd[2]) if needs else float("nan")))

                try:
                    (t_ls, f_ls, _, pt), _ = _strong_wolfe(ev, loss, gtd, t, 1e-4, 0.4,
                                                           max(1, max_eval - current_evals),
                                                           1e-9 if self._dtype == _DTYPES[1] else 1e-5,
                                                           width_tol=tol_change / max(_max_abs(d), 1e-300),
                                                           rounding=np.float32 if self._dtype == _DTYPES[0] else float)
                finally:
                    self._g = g  # the start's gradient, until a trial is accepted
                ls_evals = count[0]
                if pt is None:  # no trial point with sufficient decrease: stay, and restart the direction
                    t = 0.0
                    ncg.reset()
                else:
                    t, loss = t_ls, f_ls
                    self._g_prev, self._g = g, pt[0]  # the start's gradient becomes g_prev (no copy)
                    self._dots = pt[1]
                    self._add_step(t, d)
                opt_cond = _max_abs(self._g) <= tol_grad
            else:
                self._add_step(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    self._g_prev, self._g = g, self._g_prev  # evaluate fills the other buffer
                    loss = _to_float(self._evaluate(closure))
                    opt_cond = _max_abs(self._g) <= tol_grad
                    ls_evals = 1
            current_evals += ls_evals
            if self._stop(ls_evals, n_iter == max_iter or current_evals >= max_eval or opt_cond, t, d, loss,
                          tol_change):
                break
        return orig_loss
