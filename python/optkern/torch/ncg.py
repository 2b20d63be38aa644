"""``optkern.torch.NCG``: nonlinear conjugate gradients as a ``torch.optim.Optimizer`` (torch has no NCG class).

    opt = optkern.torch.NCG(model.parameters(), beta="pr+", line_search_fn="strong_wolfe")
    opt.step(closure)          # closure: zero_grad, forward, backward, return the loss

The iteration is :class:`optkern.optim.NCG`'s (torch.optim.LBFGS's closure protocol and stopping tests, one
param group).  ``state[params[0]]`` holds ``func_evals`` and ``n_iter`` after each step; ``state_dict()`` also
saves the engine's direction, previous gradient and restart bookkeeping under ``state[params[0]]["ncg"]``.
"""

from __future__ import annotations

import threading

import torch

from ..optim.ncg import NCG as _Engine

__all__ = ["NCG"]

_HYPER = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "beta", "restart", "powell",
          "line_search_fn")


def _tensors(obj):
    """The engine's state dict with its NumPy/CuPy arrays as torch tensors (copies), which torch's state dict
    machinery (casting, saving) handles."""
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    if hasattr(obj, "__dlpack__") and not isinstance(obj, torch.Tensor):
        return torch.from_dlpack(obj).clone()
    return obj


class NCG(torch.optim.Optimizer):
    """NCG on optkern's fused direction kernel (see the module docstring); arguments as optkern.optim.NCG."""

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 beta="pr+", restart=None, powell=None, line_search_fn="strong_wolfe"):
        if max_eval is None and isinstance(max_iter, int):
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, beta=beta, restart=restart, powell=powell,
                        line_search_fn=line_search_fn)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"params: NCG supports one param group (as torch's LBFGS), got {len(self.param_groups)}")
        self._engine()  # validates the params and hyperparameters now

    def _lock(self):
        return self.__dict__.setdefault("_optkern_lock", threading.RLock())

    def _engine(self) -> _Engine:
        group = self.param_groups[0]
        eng = self.__dict__.get("_optkern_engine")
        if eng is None or len(eng.param_groups[0]["params"]) != len(group["params"]) \
                or any(a is not b for a, b in zip(eng.param_groups[0]["params"], group["params"])):
            hyper = {k: group[k] for k in _HYPER}
            hyper["lr"] = float(hyper["lr"])  # a tensor lr as the number it holds
            eng = _Engine(list(group["params"]), **hyper)
            st = self.state.get(group["params"][0])
            if st and "ncg_state" in st:
                gr = dict(hyper, params=list(range(len(group["params"]))))
                eng.load_state_dict({"state": st["ncg_state"], "param_groups": [gr]})
            self.__dict__["_optkern_engine"] = eng
        return eng

    @torch.no_grad()
    def step(self, closure):
        """Up to max_iter NCG iterations; returns the closure's first loss."""
        if closure is None:
            raise RuntimeError("NCG requires a closure")
        with self._lock():
            eng = self._engine()
            eng.param_groups[0].update({k: self.param_groups[0][k] for k in _HYPER})
            eng.param_groups[0]["lr"] = float(eng.param_groups[0]["lr"])
            loss = eng.step(closure)
            st = self.state[self.param_groups[0]["params"][0]]
            st["func_evals"], st["n_iter"] = eng.state["func_evals"], eng.state["n_iter"]
            return loss

    def state_dict(self):
        with self._lock():
            eng = self.__dict__.get("_optkern_engine")
            if eng is not None and eng.state["n_iter"]:
                self.state[self.param_groups[0]["params"][0]]["ncg_state"] = _tensors(eng.state_dict()["state"])
            return super().state_dict()

    def load_state_dict(self, state_dict):
        with self._lock():
            super().load_state_dict(state_dict)
            self.__dict__.pop("_optkern_engine", None)  # rebuilt from the loaded state at the next step

    def __setstate__(self, state):
        state = {k: v for k, v in state.items() if k not in ("_optkern_engine", "_optkern_lock")}
        super().__setstate__(state)
