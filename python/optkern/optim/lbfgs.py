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
strong Wolfe search is optkern's own (the one ``lbfgs_minimize`` uses), not a transcription of torch's, so its
trial steps, and hence the iterates, can differ from torch's; both converge to the same points (tested).
"""

from __future__ import annotations

import math

import numpy as np

from .. import _arrays
from ..functional import sgd_step
from ..lbfgs import _DTYPES, LBFGSHistory, _dots, _lincomb, _strong_wolfe, _xp

__all__ = ["LBFGS"]

_TORCH_MIN_SY = 1e-10  # torch.optim.LBFGS stores a pair only when y.s > 1e-10


def _flat_view(p, name):
    """A 1-D NumPy/CuPy view sharing p's memory (p: a C-contiguous NumPy, CuPy or torch array)."""
    lib = _arrays._library(p)
    if lib == "torch":
        t = _arrays.plain(p)
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (LBFGS updates params through flat views)")
        if t.device.type == "cuda":
            import cupy

            return cupy.from_dlpack(t).reshape(-1)
        return np.from_dlpack(t).reshape(-1)
    if lib == "cupy" or isinstance(p, np.ndarray):
        if not p.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array (LBFGS updates params through flat views)")
        if not p.flags.writeable:
            raise ValueError(f"{name}: is read-only; LBFGS updates params in place")
        return p.reshape(-1)
    raise TypeError(f"{name}: expected a NumPy, CuPy or torch array, got {type(p).__name__}")


def _to_float(loss) -> float:
    """The closure's loss as a Python float (a torch tensor is detached first, as torch's float(loss) warns)."""
    detach = getattr(loss, "detach", None)
    return float(detach() if callable(detach) else loss)


def _check_number(name, v, lo, *, integer=False, lo_open=False):
    ok_type = isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.integer, np.floating))
    if isinstance(v, bool) or not ok_type or not math.isfinite(float(v)) or (v <= lo if lo_open else v < lo):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name}: expected {kind} {'>' if lo_open else '>='} {lo}, got {v!r}")


class LBFGS:
    """L-BFGS with torch.optim.LBFGS's keywords and defaults (see the module docstring for the iteration).

    ``params``: the arrays to optimize (one dtype, float32 or float64; one device), or a list holding one param
    group dict, as torch accepts (torch's LBFGS supports one group only).  ``lr``: the step scale (> 0);
    ``max_iter``: iterations per ``step`` call; ``max_eval``: evaluations per call (default max_iter * 5 // 4);
    ``tolerance_grad``, ``tolerance_change``: the stopping tests; ``history_size``: stored pairs;
    ``line_search_fn``: None (fixed steps) or "strong_wolfe".

    ``state`` holds torch's counters: ``func_evals`` and ``n_iter`` (over all calls).
    """

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None):
        _check_number("lr", lr, 0.0, lo_open=True)
        _check_number("max_iter", max_iter, 1, integer=True)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        _check_number("max_eval", max_eval, 1, integer=True)
        _check_number("tolerance_grad", tolerance_grad, 0.0)
        _check_number("tolerance_change", tolerance_change, 0.0)
        _check_number("history_size", history_size, 1, integer=True)
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn: expected None or 'strong_wolfe', got {line_search_fn!r}")
        params = list(params) if not isinstance(params, list) else params
        if len(params) == 0:
            raise ValueError("params: optimizer got an empty parameter list")
        if isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError(f"params: LBFGS supports one param group (as torch), got {len(params)}")
            extra = set(params[0]) - {"params"}
            if extra:
                raise ValueError(f"params: per-group options are not supported by LBFGS, got {sorted(extra)}")
            params = list(params[0]["params"]) if isinstance(params[0]["params"], (list, tuple)) else [
                params[0]["params"]]
        self.defaults = dict(lr=lr, max_iter=int(max_iter), max_eval=int(max_eval), tolerance_grad=tolerance_grad,
                             tolerance_change=tolerance_change, history_size=int(history_size),
                             line_search_fn=line_search_fn)
        self.param_groups = [dict(self.defaults, params=params)]
        views = [_flat_view(p, f"params[{i}]") for i, p in enumerate(params)]
        self._torch = [_arrays._library(p) == "torch" for p in params]
        dtype = views[0].dtype
        xp = _xp(views[0])
        for i, v in enumerate(views):
            if v.dtype not in _DTYPES:
                raise TypeError(f"params[{i}]: expected float32 or float64, got {v.dtype}")
            if v.dtype != dtype:
                raise TypeError(f"params[{i}]: expected {dtype} like params[0], got {v.dtype}")
            if _xp(v) is not xp or _arrays.is_cuda(params[i]) != _arrays.is_cuda(params[0]):
                raise ValueError(f"params[{i}]: expected the device of params[0]")
        self._views, self._xp, self._dtype = views, xp, dtype
        self._offsets = np.cumsum([0] + [v.size for v in views]).tolist()
        self._n = self._offsets[-1]
        if self._n == 0:
            raise ValueError("params: expected at least one element in all")
        self.state = {"func_evals": 0, "n_iter": 0}
        self._hist = None  # created on the first step (history_size may be changed before it, as in torch)
        self._g = xp.empty(self._n, dtype)  # the gradient at the current params
        self._g_prev = None
        self._d = None
        self._t = None
        self._prev_loss = None

    # -- flat vectors <-> params -----------------------------------------------------------------------------

    def _slices(self, flat):
        """flat[o:o + n_i] shaped like params[i]: the per-param views of a flat vector."""
        o = self._offsets
        return [flat[o[i]:o[i + 1]].reshape(tuple(p.shape)) for i, p in enumerate(self.param_groups[0]["params"])]

    def _evaluate(self, closure):
        """Call the closure; gather its gradient into self._g (checked before anything is written).  -> loss."""
        params = self.param_groups[0]["params"]
        out = closure()
        if any(self._torch):
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
            if g is None:
                flat.append(None)
                continue
            gv = np.from_dlpack(_arrays.plain(g)) if _arrays._library(g) == "torch" and not _arrays.is_cuda(g) else g
            if _arrays._library(g) == "torch" and _arrays.is_cuda(g):
                import cupy

                gv = cupy.from_dlpack(_arrays.plain(g))
            if _xp(gv) is not self._xp:
                raise TypeError(f"grads[{i}]: expected a {self._xp.__name__} array like the params, got "
                                f"{type(g).__name__}")
            if tuple(gv.shape) != tuple(p.shape):
                raise ValueError(f"grads[{i}]: expected shape {tuple(p.shape)} like params[{i}], got {tuple(gv.shape)}")
            flat.append(gv)
        for s, gv in zip(self._slices(self._g), flat):
            if gv is None:
                s[...] = 0
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

    def _max_abs(self, v):
        return float(self._xp.abs(v).max())

    # -- the step ----------------------------------------------------------------------------------------------

    def step(self, closure):
        """Up to max_iter L-BFGS iterations (see the module docstring); returns the closure's first loss."""
        group = self.param_groups[0]
        lr, max_iter, max_eval = float(group["lr"]), int(group["max_iter"]), int(group["max_eval"])
        tol_grad, tol_change = float(group["tolerance_grad"]), float(group["tolerance_change"])
        line_search_fn, history_size = group["line_search_fn"], int(group["history_size"])
        _check_number("lr", lr, 0.0, lo_open=True)
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn: expected None or 'strong_wolfe', got {line_search_fn!r}")
        state, xp = self.state, self._xp
        if self._hist is None or self._hist.history_size != history_size:
            self._hist = LBFGSHistory(self._n, history_size, self._dtype, like=self._g, curvature_eps=0.0,
                                      min_sy=_TORCH_MIN_SY)
        hist = self._hist

        orig_loss = self._evaluate(closure)
        loss = _to_float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        g = self._g
        if self._max_abs(g) <= tol_grad:
            return orig_loss
        if self._d is None:
            self._d = xp.empty_like(g)
            self._g_prev = xp.empty_like(g)
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
                x0 = self._gather_params(xp.empty_like(g))
                count = [0]

                def ev(tt, x0=x0, count=count):
                    self._add_step(tt, d)
                    try:
                        ft = _to_float(self._evaluate(closure))
                    finally:
                        self._set_params(x0)
                    count[0] += 1
                    gt = g.copy()
                    return ft, float(_dots([d], [gt])[0, 0]), gt

                (t_ls, f_ls, _, g_ls), _ = _strong_wolfe(ev, loss, gtd, t, 1e-4, 0.9, max(1, max_eval - current_evals),
                                                         1e-9 if self._dtype == _DTYPES[1] else 1e-5)
                ls_evals = count[0]
                if g_ls is None:  # no trial point with sufficient decrease: stay at the start of the search
                    t = 0.0
                    g[...] = g_prev
                else:
                    t, loss = t_ls, f_ls
                    g[...] = g_ls
                    self._add_step(t, d)
                opt_cond = self._max_abs(g) <= tol_grad
            else:
                self._add_step(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    loss = _to_float(self._evaluate(closure))
                    opt_cond = self._max_abs(g) <= tol_grad
                    ls_evals = 1
            current_evals += ls_evals
            state["func_evals"] += ls_evals
            self._t = t
            # the stopping tests
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if abs(t) * self._max_abs(d) <= tol_change:
                break
            if abs(loss - self._prev_loss) < tol_change:
                break
        return orig_loss
