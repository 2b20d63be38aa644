"""``optkern.torch.LBFGS``: ``torch.optim.LBFGS`` (a subclass) whose iterations run on optkern's L-BFGS kernels.

    opt = optkern.torch.LBFGS(model.parameters(), history_size=10, line_search_fn="strong_wolfe")
    opt.step(closure)          # closure: zero_grad, forward, backward, return the loss

The iteration is :class:`optkern.optim.LBFGS`'s (torch's iteration on optkern's two-pass direction; its
docstring lists where optkern's strong Wolfe search differs from torch's on hard searches).  Construction and
validation are torch's.  ``state`` is torch's: after each step ``state[params[0]]`` holds ``func_evals`` and
``n_iter``; ``state_dict()`` (and pickling) fill in torch's remaining keys (``d``, ``t``, ``old_dirs`` (the y
vectors), ``old_stps`` (the s vectors), ``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``) as copies, so
that a state dict loads into ``torch.optim.LBFGS`` and the reverse.
"""

from __future__ import annotations

import threading

import torch

from ..optim.lbfgs import LBFGS as _Engine

__all__ = ["LBFGS"]

_HYPER = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn")
_LOCK_GUARD = threading.Lock()


def _tensor(a):
    """A torch tensor sharing a NumPy/CuPy array's memory."""
    return torch.from_dlpack(a)


class LBFGS(torch.optim.LBFGS):
    """torch.optim.LBFGS on optkern's L-BFGS kernels (see the module docstring)."""

    def _lock(self):
        lock = self.__dict__.get("_optkern_lock")
        if lock is None:
            with _LOCK_GUARD:
                lock = self.__dict__.setdefault("_optkern_lock", threading.RLock())
        return lock

    def _engine(self) -> _Engine:
        group = self.param_groups[0]
        eng = self.__dict__.get("_optkern_engine")
        if eng is None or any(a is not b for a, b in zip(eng.param_groups[0]["params"], group["params"])) \
                or len(eng.param_groups[0]["params"]) != len(group["params"]):
            hyper = {k: group[k] for k in _HYPER}
            hyper["lr"] = float(hyper["lr"])  # a tensor lr (torch accepts one) as the number it holds
            eng = _Engine(list(group["params"]), **hyper)
            st = self.state.get(group["params"][0])
            if st:
                eng.load_state_dict(self._engine_state(st, group))
            self.__dict__["_optkern_engine"] = eng
        return eng

    @staticmethod
    def _engine_state(st: dict, group: dict) -> dict:
        """torch's LBFGS state -> the engine's state_dict."""
        pairs = list(zip(st.get("old_stps") or [], st.get("old_dirs") or []))
        num = lambda v: None if v is None else float(v)  # noqa: E731
        d, g = st.get("d"), st.get("prev_flat_grad")
        state = {"func_evals": int(st.get("func_evals", 0)), "n_iter": int(st.get("n_iter", 0)), "t": num(st.get("t")),
                 "prev_loss": num(st.get("prev_loss")), "d": None if d is None else d.detach(),
                 "g_prev": None if g is None else g.detach(),
                 "pairs": [(s.detach(), y.detach()) for s, y in pairs], "num_skipped": 0}
        gr = {k: group[k] for k in _HYPER}
        gr["lr"] = float(gr["lr"])
        gr["params"] = list(range(len(group["params"])))
        return {"state": state, "param_groups": [gr]}

    def _sync_counters(self, eng: _Engine) -> dict:
        st = self.state[self.param_groups[0]["params"][0]]
        st["func_evals"] = eng.state["func_evals"]
        st["n_iter"] = eng.state["n_iter"]
        return st

    def _sync_full(self) -> None:
        """Fill torch's state keys from the engine (copies), for state_dict() and pickling."""
        eng = self.__dict__.get("_optkern_engine")
        if eng is None:
            return
        st = self._sync_counters(eng)
        if eng._d is None:
            return
        pairs = eng._pairs()
        copy = lambda a: _tensor(a).clone()  # noqa: E731
        st["d"] = copy(eng._d)
        st["t"] = eng._t
        st["old_stps"] = [copy(s) for s, _ in pairs]
        st["old_dirs"] = [copy(y) for _, y in pairs]
        st["ro"] = [1.0 / torch.dot(y, s) for s, y in zip(st["old_stps"], st["old_dirs"])]
        if pairs:
            s, y = st["old_stps"][-1], st["old_dirs"][-1]
            st["H_diag"] = torch.dot(y, s) / torch.dot(y, y)
        else:
            st["H_diag"] = 1
        st["prev_flat_grad"] = copy(eng._g_prev)
        st["prev_loss"] = eng._prev_loss

    @torch.no_grad()
    def step(self, closure):
        """Up to max_iter L-BFGS iterations on optkern's kernels; returns the closure's first loss."""
        if closure is None:
            raise RuntimeError("LBFGS requires a closure")  # torch asserts it
        with self._lock():
            eng = self._engine()
            eng.param_groups[0].update({k: self.param_groups[0][k] for k in _HYPER})
            eng.param_groups[0]["lr"] = float(eng.param_groups[0]["lr"])
            loss = eng.step(closure)
            self._sync_counters(eng)
            return loss

    def state_dict(self):
        with self._lock():
            self._sync_full()
            return super().state_dict()

    def load_state_dict(self, state_dict):
        with self._lock():
            super().load_state_dict(state_dict)
            self.__dict__.pop("_optkern_engine", None)  # rebuilt from torch's state at the next step

    def __getstate__(self):
        self._sync_full()
        return super().__getstate__()
