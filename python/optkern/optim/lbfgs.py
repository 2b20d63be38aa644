"""``optkern.optim.LBFGS``: torch.optim.LBFGS's interface and iteration on optkern's L-BFGS kernels.

    opt = optkern.optim.LBFGS(params, lr=1, max_iter=20, history_size=100, line_search_fn="strong_wolfe")
    opt.step(closure)       # up to max_iter L-BFGS iterations; returns the closure's first loss

The closure re-evaluates the objective at the current params:

* NumPy or CuPy params: ``closure() -> (loss, grads)``, grads a list aligned with params (``None``: zeros);
* torch tensors: ``closure() -> loss`` after ``loss.backward()``, the gradients read from ``p.grad`` (zeros when
  None), as torch does.

All params are updated in place (never copied into a new array).  The optimizer keeps flat n-vectors (n = the
total number of elements) for the gradient, the previous gradient and the direction, and, with a line search, the
params at the start of the search, as torch's flat tensors.

Each iteration, as ``torch.optim.LBFGS.step`` (torch 2.13) does it:

1. the pair s = t d, y = g - g_prev is stored when s.y > 1e-10 (the oldest dropped beyond ``history_size``);
2. d = -H g: ``LBFGSHistory.direction``, the two-pass compact form (all 2m dot products in one pass, one linear
   combination), with H0 = (s.y / y.y) I of the newest stored pair; d = -g on the very first iteration;
3. t = min(1, 1 / ||g||_1) lr on the very first iteration, else lr; stop if g.d > -tolerance_change;
4. ``line_search_fn=None``: params += t d, then one evaluation (skipped on the last iteration of the call);
   ``"strong_wolfe"``: optkern's strong Wolfe search (Nocedal & Wright Alg. 3.5/3.6, cubic interpolation, c1 =
   1e-4, c2 = 0.9, at most max_eval - evaluations so far trials), then params = params_start + t d;
5. stop after max_iter iterations or max_eval evaluations in this call, or when ||g||_inf <= tolerance_grad,
   ||t d||_inf <= tolerance_change or |f - f_prev| < tolerance_change.

With fixed steps the iterates are torch's up to rounding (tested against torch.optim.LBFGS in float64).  The
strong Wolfe search is optkern's own (the one ``lbfgs_minimize`` uses), not a transcription of torch's
``_strong_wolfe``; on smooth problems both accept the same steps (tested: logistic regression and Rosenbrock
agree with torch to 1e-10 and 1e-8, with equal counts), but they differ in details that show on hard or budget-
limited searches:

* trials: at most max_eval minus the evaluations so far (at least 1); torch allows one more;
* bracketing: a trial not lower than the previous one closes the bracket from the second trial on (Nocedal &
  Wright); torch does so from the third;
* giving up (budget spent, or a bracket narrower than tolerance_change / max|d|, torch's test): the lowest trial
  with sufficient decrease, else no move (t = 0); torch keeps the lower end of its bracket either way;
* a closure that raises during the search leaves the params at the search's start (torch: at the trial point).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .. import _arrays
from ..functional import sgd_step
from ..lbfgs import (
    _DTYPES,
    LBFGSHistory,
    _aligned_copy,
    _aligned_like,
    _aligned_rows,
    _dots,
    _lincomb,
    _max_abs,
    _strong_wolfe,
    _xp,
)

__all__ = ["LBFGS"]

_TORCH_MIN_SY = 1e-10  # torch.optim.LBFGS stores a pair only when y.s > 1e-10


def _xp_array(a):
    """a as a NumPy or CuPy array sharing its memory (torch tensors through DLPack; others as they are)."""
    if _arrays._library(a) != "torch":
        return a
    t = _arrays.plain(a)
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t)
    return np.from_dlpack(t)


def _flat_view(p, name):
    """A 1-D NumPy/CuPy view sharing p's memory (p: a C-contiguous, writable NumPy, CuPy or torch array)."""
    lib = _arrays._library(p)
    if lib == "torch":
        if not _arrays.plain(p).is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (LBFGS updates params through flat views)")
        return _xp_array(p).reshape(-1)
    if lib == "cupy" or isinstance(p, np.ndarray):
        if not p.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array (LBFGS updates params through flat views)")
        if not p.flags.writeable:
            raise ValueError(f"{name}: is read-only; LBFGS updates params in place")
        return p.reshape(-1)
    raise TypeError(f"{name}: expected a NumPy, CuPy or torch array, got {type(p).__name__}")


def _realigned(rows):
    """A 64-byte aligned copy of a (rows, n) array (the history's layout, lost when pickled)."""
    out = _aligned_rows(_xp(rows), rows.shape[0], rows.shape[1], rows.dtype)
    out[...] = rows
    return out


def _address(v) -> int:
    return int(v.__array_interface__["data"][0]) if isinstance(v, np.ndarray) else int(v.data.ptr)


def _to_float(loss) -> float:
    """The closure's loss as a Python float (a torch tensor is detached first, as torch's float(loss) warns)."""
    detach = getattr(loss, "detach", None)
    return float(detach() if callable(detach) else loss)


def _check_number(name, v, lo, *, integer=False, lo_open=False):
    ok_type = isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.integer, np.floating))
    if isinstance(v, bool) or not ok_type or not math.isfinite(float(v)) or (v <= lo if lo_open else v < lo):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name}: expected {kind} {'>' if lo_open else '>='} {lo}, got {v!r}")


def _check_group(group):
    _check_number("lr", group["lr"], 0.0)
    _check_number("max_iter", group["max_iter"], 1, integer=True)
    _check_number("max_eval", group["max_eval"], 1, integer=True)
    _check_number("tolerance_grad", group["tolerance_grad"], 0.0)
    _check_number("tolerance_change", group["tolerance_change"], 0.0)
    _check_number("history_size", group["history_size"], 1, integer=True)
    if group["line_search_fn"] not in (None, "strong_wolfe"):
        raise ValueError(f"line_search_fn: expected None or 'strong_wolfe', got {group['line_search_fn']!r}")


_HYPER = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn")


class LBFGS:
    """L-BFGS with torch.optim.LBFGS's keywords and defaults (see the module docstring for the iteration).

    ``params``: an iterable of arrays to optimize (one dtype, float32 or float64; one library and device), or of
    one param group dict (torch's LBFGS supports one group; its keys override the defaults).  ``lr``: the step
    scale (>= 0); ``max_iter``: iterations per ``step`` call; ``max_eval``: evaluations per call (default
    max_iter * 5 // 4); ``tolerance_grad``, ``tolerance_change``: the stopping tests; ``history_size``: stored
    pairs (changing it between calls keeps the newest pairs); ``line_search_fn``: None (fixed steps) or
    "strong_wolfe".

    ``state`` holds torch's counters: ``func_evals`` and ``n_iter`` (over all calls).  ``state_dict()`` /
    ``load_state_dict()`` save and restore them with the stored pairs, the last direction and step.

    ``step`` holds a per-optimizer lock (steps from several threads run one after the other), and the optimizer
    deepcopies and pickles (a copy continues exactly as the original would, on its own copy of the params).
    """

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None):
        self.defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                             tolerance_change=tolerance_change, history_size=history_size,
                             line_search_fn=line_search_fn)
        self._setup(params)

    _HYPER = _HYPER
    _check_group = staticmethod(_check_group)

    def _setup(self, params):
        """The param group (one, as torch's LBFGS), the flat views and the buffers, from self.defaults; every
        check (the group's hyperparameters by ``_check_group``) before anything is kept.  Shared with NCG."""
        name = type(self).__name__
        if hasattr(params, "shape") or isinstance(params, dict):
            raise TypeError(f"params: expected an iterable of arrays or of one dict, got {type(params).__name__}")
        params = list(params)
        if len(params) == 0:
            raise ValueError("params: optimizer got an empty parameter list")
        if isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError(f"params: {name} supports one param group (as torch's LBFGS), got {len(params)}")
            unknown = set(params[0]) - set(self._HYPER) - {"params"}
            if unknown:
                raise TypeError(f"params: unexpected param group keys {sorted(unknown)}")
            group = dict(self.defaults, **params[0])
            ps = group["params"]
            group["params"] = [ps] if hasattr(ps, "shape") else list(ps)
        else:
            group = dict(self.defaults, params=params)
        if group["max_eval"] is None:
            group["max_eval"] = group["max_iter"] * 5 // 4 if isinstance(group["max_iter"], int) else None
        self._check_group(group)
        if self.defaults["max_eval"] is None:
            self.defaults["max_eval"] = group["max_eval"]
        self.param_groups = [group]
        params = group["params"]
        if len(params) == 0:
            raise ValueError("params: optimizer got an empty parameter list")
        views = [_flat_view(p, f"params[{i}]") for i, p in enumerate(params)]
        lib = _arrays._library(params[0])
        dtype, xp = views[0].dtype, _xp(views[0])
        for i, (p, v) in enumerate(zip(params, views)):
            if _arrays._library(p) != lib:
                raise TypeError(f"params[{i}]: expected a {lib} array like params[0], got {type(p).__name__}")
            if v.dtype not in _DTYPES:
                raise TypeError(f"params[{i}]: expected float32 or float64, got {v.dtype}")
            if v.dtype != dtype:
                raise TypeError(f"params[{i}]: expected {dtype} like params[0], got {v.dtype}")
            if _xp(v) is not xp or (xp is not np and v.device.id != views[0].device.id):
                raise ValueError(f"params[{i}]: expected the device of params[0]")
        spans = sorted((_address(v), _address(v) + v.nbytes, i) for i, v in enumerate(views) if v.size)
        for (b0, e0, i0), (b1, _, i1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ValueError(f"params[{max(i0, i1)}]: shares memory with params[{min(i0, i1)}]")
        self._torch = lib == "torch"
        self._views, self._xp, self._dtype = views, xp, dtype
        self._offsets = np.cumsum([0] + [v.size for v in views]).tolist()
        self._n = self._offsets[-1]
        if self._n == 0:
            raise ValueError("params: expected at least one element in all")
        self.state = {"func_evals": 0, "n_iter": 0}
        self._hist = None  # created by the first step (or load_state_dict), with the group's history_size
        self._g = _aligned_rows(xp, 1, self._n, dtype)[0]  # the gradient at the current params (64-byte aligned)
        self._g_prev = self._d = self._x0 = None  # allocated by the first step
        self._t = None
        self._prev_loss = None
        self._lock = threading.RLock()

    # -- copy and pickle: the flat views, the array module and the lock are rebuilt; buffers realigned --------------

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("_lock", "_views", "_xp"):
            d.pop(k, None)
        if self._hist is not None:
            h = dict(self._hist.__dict__)
            h.pop("_xp", None)
            h["_work"] = None  # scratch, reallocated on use
            d["_hist"] = h
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.RLock()
        self._views = [_flat_view(p, f"params[{i}]") for i, p in enumerate(self.param_groups[0]["params"])]
        self._xp = _xp(self._views[0])
        for k in ("_g", "_g_prev", "_d", "_x0"):
            if getattr(self, k) is not None:
                setattr(self, k, _aligned_copy(getattr(self, k)))
        if self._hist is not None:
            h = LBFGSHistory.__new__(LBFGSHistory)
            h.__dict__.update(self._hist)
            h._xp = _xp(h._S)
            h._S, h._Y = _realigned(h._S), _realigned(h._Y)
            self._hist = h

    # -- flat vectors <-> params -----------------------------------------------------------------------------

    def _slices(self, flat):
        """flat[o:o + n_i] shaped like params[i]: the per-param views of a flat vector."""
        o = self._offsets
        return [flat[o[i]:o[i + 1]].reshape(tuple(p.shape)) for i, p in enumerate(self.param_groups[0]["params"])]

    def _evaluate(self, closure):
        """Call the closure; gather its gradient into self._g (checked before anything is written).  -> loss."""
        params = self.param_groups[0]["params"]
        out = closure()
        if self._torch:
            loss, grads = out, [p.grad for p in params]
        else:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("closure: expected it to return (loss, grads) for NumPy/CuPy params")
            loss, grads = out
            grads = _arrays.as_list(grads)
            if len(grads) != len(params):
                raise ValueError(f"closure: expected {len(params)} gradients (one per param), got {len(grads)}")
        flat = []
        for i, (g, p) in enumerate(zip(grads, params)):
            gv = None if g is None else _xp_array(g)
            if gv is not None and _xp(gv) is not self._xp:
                raise TypeError(f"grads[{i}]: expected a {self._xp.__name__} array like the params, got "
                                f"{type(g).__name__}")
            if gv is not None and tuple(gv.shape) != tuple(p.shape):
                raise ValueError(f"grads[{i}]: expected shape {tuple(p.shape)} like params[{i}], got {tuple(gv.shape)}")
            flat.append(gv)
        for s, gv in zip(self._slices(self._g), flat):
            if gv is None:
                s[...] = 0  # a param without a gradient, as torch's zeros
            else:
                s[...] = gv
        return loss

    def _gather_params(self, out):
        for s, v in zip(self._slices(out), self._views):
            s.reshape(-1)[...] = v
        return out

    def _set_params(self, flat):
        for s, v in zip(self._slices(flat), self._views):
            v[...] = s.reshape(-1)

    def _add_step(self, t, d):
        """params += t d: one fused multi-tensor pass (SGD's kernel: p - t (-d))."""
        sgd_step(self.param_groups[0]["params"], self._slices(d), step=1, lr=float(t), maximize=True)

    def _make_history(self, history_size, pairs=()):
        """A new history holding the newest ``history_size`` of ``pairs`` ((s, y) oldest first), re-pushed."""
        hist = LBFGSHistory(self._n, history_size, self._dtype, like=self._g, curvature_eps=0.0,
                            min_sy=_TORCH_MIN_SY)
        for s, y in list(pairs)[-history_size:]:
            hist.push(s, y)
        return hist

    def _pairs(self):
        h = self._hist
        return [] if h is None else [(h._S[i], h._Y[i]) for i in h._order]

    # -- torch's Optimizer methods -----------------------------------------------------------------------------

    def zero_grad(self, set_to_none=True):
        """torch params: clear ``p.grad`` (set it to None, or zero it).  NumPy/CuPy params: nothing to clear (their
        gradients come back from the closure)."""
        if not self._torch:
            return
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    def state_dict(self):
        """The counters, the stored pairs (copies, oldest first), the last direction, step, gradient and loss, and
        the group's hyperparameters (params as indices, as torch)."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self):
        copy = (lambda a: None if a is None else a.copy())
        state = dict(self.state, t=self._t, prev_loss=self._prev_loss, d=copy(self._d), g_prev=copy(self._g_prev),
                     pairs=[(s.copy(), y.copy()) for s, y in self._pairs()],
                     num_skipped=0 if self._hist is None else self._hist.num_skipped)
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.param_groups[0]["params"])))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()`` of an LBFGS over params of the same sizes (checked before anything changes)."""
        with self._lock:
            self._load_state_dict(state_dict)

    def _loaded_groups(self, state_dict):
        """state_dict's param groups, checked to be one group over as many params as this optimizer's."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.param_groups[0]["params"]):
            raise ValueError("state_dict: expected one param group with as many params as this optimizer's")
        return groups

    def _search_start(self, g):
        """The params gathered into the reused buffer x0 (allocated once, like g): a line search's start."""
        if self._x0 is None:
            self._x0 = _aligned_like(g)
        return self._gather_params(self._x0)

    def _loss_at(self, tt, d, x0, closure):
        """The closure's loss at params = x0 + tt d; the params are put back to x0, also when the closure raises."""
        self._add_step(tt, d)
        try:
            return _to_float(self._evaluate(closure))
        finally:
            self._set_params(x0)

    def _load_common(self, state_dict, vectors):
        """Checks ``vectors`` (name: array or None) against this optimizer's size and the saved group's
        hyperparameters, then restores what LBFGS and NCG share: hyperparameters, counters, t, prev_loss, g_prev.
        Returns the merged group and the saved state."""
        groups = self._loaded_groups(state_dict)
        st = state_dict["state"]
        for name, a in vectors.items():
            if a is not None and tuple(a.shape) != (self._n,):
                raise ValueError(f"state_dict: {name} has shape {tuple(a.shape)}, expected ({self._n},)")
        group = dict(self.param_groups[0], **{k: v for k, v in groups[0].items() if k != "params"})
        self._check_group(group)
        self.param_groups[0].update({k: group[k] for k in self._HYPER})
        self.state = {"func_evals": int(st["func_evals"]), "n_iter": int(st["n_iter"])}
        self._t, self._prev_loss = st["t"], st["prev_loss"]
        self._g_prev = None if st["g_prev"] is None else _aligned_copy(self._xp.asarray(st["g_prev"],
                                                                                         dtype=self._dtype))
        return group, st

    def _load_state_dict(self, state_dict):
        st = state_dict["state"]
        group, st = self._load_common(state_dict, {"d": st["d"], "g_prev": st["g_prev"]})
        xp, dt = self._xp, self._dtype
        self._d = None if st["d"] is None else _aligned_copy(xp.asarray(st["d"], dtype=dt))
        self._hist = self._make_history(int(group["history_size"]),
                                        [(xp.asarray(s, dtype=dt), xp.asarray(y, dtype=dt)) for s, y in st["pairs"]])
        self._hist.num_skipped = int(st["num_skipped"])

    # -- the step ----------------------------------------------------------------------------------------------

    def step(self, closure):
        """Up to max_iter L-BFGS iterations (see the module docstring); returns the closure's first loss."""
        with self._lock:
            return self._step(closure)

    def _step(self, closure):
        group = self.param_groups[0]
        _check_group(group)
        lr, max_iter, max_eval = float(group["lr"]), int(group["max_iter"]), int(group["max_eval"])
        tol_grad, tol_change = float(group["tolerance_grad"]), float(group["tolerance_change"])
        line_search_fn, history_size = group["line_search_fn"], int(group["history_size"])
        state, xp = self.state, self._xp
        if self._hist is None or self._hist.history_size != history_size:
            self._hist = self._make_history(history_size, self._pairs())
        hist = self._hist
        closure, orig_loss, loss = self._first_evaluation(closure)
        current_evals = 1
        g = self._g
        if _max_abs(g) <= tol_grad:
            return orig_loss
        if self._d is None:
            self._d, self._g_prev = _aligned_like(g), _aligned_like(g)
        d, g_prev = self._d, self._g_prev

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            # the direction
            if state["n_iter"] == 1:
                hist.reset()
                _lincomb([g], [-1.0], d)
            else:
                s, y = hist._staged()
                _lincomb([d], [self._t], s)  # s = t d
                _lincomb([g, g_prev], [1.0, -1.0], y)  # y = g - g_prev
                hist._commit()  # stored when s.y > 1e-10
                hist.direction(g, out=d)
            g_prev[...] = g
            self._prev_loss = loss
            # the step length
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / float(xp.abs(g).sum())) * lr
            else:
                t = lr
            self._t = t
            gtd = float(_dots([d], [g])[0, 0])
            if gtd > -tol_change:
                break
            ls_evals = 0
            if line_search_fn == "strong_wolfe":
                x0 = self._search_start(g)
                count = [0]

                def ev(tt, x0=x0, count=count):
                    ft = self._loss_at(tt, d, x0, closure)
                    count[0] += 1
                    gt = _aligned_copy(g)
                    return ft, float(_dots([d], [gt])[0, 0]), gt

                # The search gives up on a bracket narrower than tolerance_change / max|d| (torch's test).
                (t_ls, f_ls, _, g_ls), _ = _strong_wolfe(ev, loss, gtd, t, 1e-4, 0.9, max(1, max_eval - current_evals),
                                                         1e-9 if self._dtype == _DTYPES[1] else 1e-5,
                                                         width_tol=tol_change / max(_max_abs(d), 1e-300),
                                                         rounding=np.float32 if self._dtype == _DTYPES[0] else float)
                ls_evals = count[0]
                if g_ls is None:  # no trial point with sufficient decrease: stay at the start of the search
                    t = 0.0
                    g[...] = g_prev
                else:
                    t, loss = t_ls, f_ls
                    g[...] = g_ls
                    self._add_step(t, d)
                opt_cond = _max_abs(g) <= tol_grad
            else:
                self._add_step(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    loss = _to_float(self._evaluate(closure))
                    opt_cond = _max_abs(g) <= tol_grad
                    ls_evals = 1
            current_evals += ls_evals
            if self._stop(ls_evals, n_iter == max_iter or current_evals >= max_eval or opt_cond, t, d, loss,
                          tol_change):
                break
        return orig_loss

    def _first_evaluation(self, closure):
        """The step's first evaluation (shared with NCG): the closure (under torch.enable_grad for torch params,
        as torch), its loss and the loss as a float; counts func_evals."""
        if self._torch:
            import torch

            closure = torch.enable_grad()(closure)  # as torch: the closure runs with grad enabled
        orig_loss = self._evaluate(closure)
        self.state["func_evals"] += 1
        return closure, orig_loss, _to_float(orig_loss)

    def _stop(self, ls_evals, budget_or_converged, t, d, loss, tol_change):
        """The end of an iteration (shared with NCG): its evaluations counted, its step length kept, then torch's
        stopping tests: the budget or ||g||_inf, then ||t d||_inf <= tolerance_change, then
        |f - f_prev| < tolerance_change."""
        self.state["func_evals"] += ls_evals
        self._t = t
        return budget_or_converged or abs(t) * _max_abs(d) <= tol_change or abs(loss - self._prev_loss) < tol_change
