"""The base class of optkern's optimizers: torch.optim's shape (param groups, per-param state, state_dict),
over the functional steps.

A subclass names its state buffers and how they start (``_state_spec``) and issues one functional call per
param group and step count (``_group_step``).  ``step(grads)`` takes the gradients as a list aligned with all
params (in group order); a ``None`` entry skips that param, as torch skips a param whose ``.grad`` is None.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _arrays


class Optimizer:
    #: (state name, initial value or a callable(group) -> value) for every buffer; set by subclasses
    _state_spec: tuple = ()

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}  # keyed by the param's index over all groups
        params = list(params) if not isinstance(params, list) else params
        if len(params) == 0:
            raise ValueError("params: optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for g in groups:
            self.add_param_group(g)

    # ---- groups ----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError("param_group: expected a dict")
        group = dict(param_group)
        ps = group["params"]
        group["params"] = list(ps) if isinstance(ps, (list, tuple)) else [ps]
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"param_group: unexpected keys {sorted(unknown)}")
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(group["params"]):
            if id(p) in existing:
                raise ValueError(f"params[{i}]: some parameters appear in more than one parameter group")
            existing.add(id(p))
        self._check_group(group)
        self.param_groups.append(group)

    def _check_group(self, group: dict) -> None:
        """Validate a group's hyperparameters by building its hyper struct (raises ValueError naming the arg)."""
        self._hyper(group, self._lr_value(group, 0))

    @staticmethod
    def _lr_value(group: dict, k: int) -> float:
        lr = group["lr"]
        v = float(lr(k)) if callable(lr) else float(lr)
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"lr: expected a finite number >= 0, got {v}" + (f" (schedule at step {k})" if callable(lr) else ""))
        return v

    def _params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    # ---- state -------------------------------------------------------------------------------------------
    def _init_state(self, index: int, p, group: dict) -> dict:
        st: dict[str, Any] = {"step": 0}
        for name, init in self._state_spec_for(group):
            value = init(group) if callable(init) else init
            st[name] = _arrays.full_like(p, float(value))
        st.update(self._extra_state(group))
        return st

    def _state_spec_for(self, group: dict):
        return self._state_spec

    def _extra_state(self, group: dict) -> dict:
        return {}

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self, grads=None, *, grad_scale=1.0, found_inf=None, closure=None):
        """Update every param whose gradient is given, in place.

        grads: arrays aligned with all params (group order); None (the list) reads ``p.grad`` (torch tensors).
        grad_scale / found_inf: see :mod:`optkern.functional`; with found_inf true nothing changes, not even the
        step count.  closure: re-evaluates the loss and returns it (called first, as in torch).
        """
        loss = closure() if closure is not None else None
        params = self._params()
        if grads is None:
            grads = [getattr(p, "grad", None) for p in params]
        else:
            grads = _arrays.as_list(grads)
        if len(grads) != len(params):
            raise ValueError(f"grads: expected {len(params)} arrays (one per param), got {len(grads)}")
        if found_inf is not None and not hasattr(found_inf, "__cuda_array_interface__") and bool(found_inf):
            return loss
        offset = 0
        for group in self.param_groups:
            n = len(group["params"])
            by_step: dict[int, list[int]] = {}
            for j in range(n):
                i = offset + j
                if grads[i] is None:
                    continue
                st = self.state.get(i)
                if st is None:
                    st = self.state[i] = self._init_state(i, group["params"][j], group)
                by_step.setdefault(st["step"] + 1, []).append(i)
            for t, idx in by_step.items():
                hyper = self._hyper_cached(group, self._lr_value(group, t - 1))
                ps = [params[i] for i in idx]
                gs = [grads[i] for i in idx]
                sts = [self.state[i] for i in idx]
                self._group_step(group, hyper, ps, gs, sts, t, grad_scale, found_inf)
                for s in sts:
                    s["step"] = t
            offset += n
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """For torch tensors: clear ``p.grad`` (optkern itself never owns gradients)."""
        for p in self._params():
            if getattr(p, "grad", None) is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _hyper_cached(self, group: dict, lr: float) -> dict:
        # Rebuild (and re-validate) the hyperparameters only when the group or the lr value changed.
        key = (lr,) + tuple(v for k, v in group.items() if k not in ("params", "lr"))
        cache = self.__dict__.setdefault("_hyper_cache", {})
        hit = cache.get(id(group))
        if hit is not None and hit[0] == key:
            return hit[1]
        h = self._hyper(group, lr)
        cache[id(group)] = (key, h)
        return h

    # Subclasses: build the hyperparameter dict for the functional call, and run it.
    def _hyper(self, group: dict, lr: float) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _group_step(self, group, hyper, params, grads, states, step, grad_scale, found_inf):  # pragma: no cover
        raise NotImplementedError

    # ---- state_dict ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot: hyperparameters by group, and per-param state with copies of the buffers (in the params'
        array library) so that later steps do not change it.  load_state_dict() of it resumes bit for bit."""
        groups = []
        start = 0
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(d)
        state = {}
        for i, st in self.state.items():
            state[i] = {k: (_arrays.copy_array(v) if _is_array(v) else v) for k, v in st.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() (of an optimizer of the same class over params of the same shapes)."""
        try:
            groups, state = state_dict["param_groups"], state_dict["state"]
        except (TypeError, KeyError):
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups'") from None
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict: param_groups[{gi}] has {len(saved['params'])} params, this optimizer's "
                                 f"has {len(mine['params'])}")
        params = self._params()
        index_map = {}
        for saved, mine in zip(groups, self.param_groups):
            start = sum(len(g["params"]) for g in self.param_groups[: self.param_groups.index(mine)])
            for j, old in enumerate(saved["params"]):
                index_map[old] = start + j
        new_state = {}
        for old, st in state.items():
            i = index_map.get(int(old))
            if i is None:
                raise ValueError(f"state_dict: state for unknown param index {old}")
            p = params[i]
            restored = {}
            for k, v in st.items():
                if _is_array(v):
                    if not _arrays.same_shape(v, p):
                        raise ValueError(f"state_dict: state[{old}][{k!r}] has shape {tuple(v.shape)}, "
                                         f"param has {tuple(p.shape)}")
                    restored[k] = _arrays.to_library_like(v, _arrays.plain(p))
                else:
                    restored[k] = v
            new_state[i] = restored
        for saved, mine in zip(groups, self.param_groups):
            trial = dict(mine)
            trial.update({k: v for k, v in saved.items() if k != "params"})
            self._check_group(trial)
        for saved, mine in zip(groups, self.param_groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")
