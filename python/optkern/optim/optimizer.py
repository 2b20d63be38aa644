"""The base class of optkern's optimizers: torch.optim's shape (param groups, per-param state, state_dict),
over the functional steps.

A subclass names its algorithm (``_algo``, ``_c_step``), its state buffers in the kernel's order and how they
start (``_state_spec_for``), and maps a group to the functional keywords (``_hyper_kwargs``); the hyperparameter
struct is built by the same function the functional layer uses.  A step is one compiled call per param group
(per step count, if params of a group have taken different numbers of steps).  ``step(grads)`` takes the gradients as a list aligned with all
params (in group order); a ``None`` entry skips that param, as torch skips a param whose ``.grad`` is None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _arrays
from ..functional import _scalar_args, build_hyper

_ndarray = np.ndarray


def _all_present(grads) -> bool:
    for g in grads:
        if g is None:
            return False
    return True


class ParamGroup(dict):
    """A param group: a dict (as in torch) that counts its modifications, so that a step rebuilds its
    hyperparameters only after the user changed one (e.g. ``group["lr"] = 0.01``)."""

    __slots__ = ("version",)

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.version = 0

    def _touch(self):
        self.version += 1

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        self.version += 1

    def __delitem__(self, k):
        super().__delitem__(k)
        self.version += 1

    def update(self, *a, **k):
        super().update(*a, **k)
        self.version += 1

    def setdefault(self, k, v=None):
        r = super().setdefault(k, v)
        self.version += 1
        return r

    def pop(self, *a):
        r = super().pop(*a)
        self.version += 1
        return r


class Optimizer:
    #: (state name, initial value or a callable(group) -> value) for every buffer; set by subclasses
    _state_spec: tuple = ()

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}  # keyed by the param's index over all groups
        self._group_cache: dict[int, dict] = {}  # per group: prebuilt lists for the common all-params step
        self._hyper_cache: dict[int, tuple] = {}
        self._flat_params: list = []
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
        group = ParamGroup(param_group)
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
        self._flat_params = [p for g in self.param_groups for p in g["params"]]

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
        return self._flat_params

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
    #: set by subclasses: the functional algorithm name (for build_hyper) and the compiled step
    _algo: str = ""
    _c_step = None

    def step(self, grads=None, *, grad_scale=1.0, found_inf=None, closure=None):
        """Update every param whose gradient is given, in place, in one fused pass per param group.

        grads: arrays aligned with all params (group order); None (the list) reads ``p.grad`` (torch tensors).
        grad_scale / found_inf: see :mod:`optkern.functional`; with found_inf true nothing changes, not even the
        step count.  closure: re-evaluates the loss and returns it (called first, as in torch).
        """
        loss = closure() if closure is not None else None
        params = self._flat_params
        if grads is None:
            grads = [getattr(p, "grad", None) for p in params]
        elif not isinstance(grads, list):
            grads = _arrays.as_list(grads)
        if len(grads) != len(params):
            raise ValueError(f"grads: expected {len(params)} arrays (one per param), got {len(grads)}")
        if found_inf is None and type(grad_scale) is float and grad_scale == 1.0:
            skip, gs, gs_dev, fi_dev = False, 1.0, None, None
        else:
            skip, gs, gs_dev, fi_dev = _scalar_args(grad_scale, found_inf)
        if skip:
            return loss
        plain = _arrays.plain
        offset = 0
        for gi, group in enumerate(self.param_groups):
            n = len(group["params"])
            gg = grads[offset:offset + n]
            cache = self._group_cache.get(gi)
            if cache is not None and cache["version"] == getattr(group, "version", None) and _all_present(gg):
                # Common case: every param of the group steps, all at the same count, state lists prebuilt.
                t = cache["step"] + 1
                self._call(group, t, cache["params"], [g if type(g) is _ndarray else plain(g) for g in gg],
                           cache["lists"], cache["states"], gs, gs_dev, fi_dev)
                cache["step"] = t
                for st in cache["states"]:
                    st["step"] = t
            else:
                self._general_group_step(gi, group, offset, gg, gs, gs_dev, fi_dev)
            offset += n
        return loss

    def _general_group_step(self, gi, group, offset, gg, gs, gs_dev, fi_dev):
        plain = _arrays.plain
        by_step: dict[int, list[int]] = {}
        for j, g in enumerate(gg):
            if g is None:
                continue
            st = self.state.get(offset + j)
            if st is None:
                st = self.state[offset + j] = self._init_state(offset + j, group["params"][j], group)
            by_step.setdefault(st["step"] + 1, []).append(j)
        spec = self._state_spec_for(group)
        keys = [k for k, _ in spec]
        for j, g in enumerate(gg):  # a buffer a changed hyperparameter now needs (e.g. amsgrad) starts as torch's does
            st = self.state.get(offset + j)
            if g is not None and st is not None:
                for k, init in spec:
                    if k not in st:
                        st[k] = _arrays.full_like(group["params"][j], float(init(group) if callable(init) else init))
        for t, js in by_step.items():
            states = [self.state[offset + j] for j in js]
            ps = [plain(group["params"][j]) for j in js]
            lists = [[st[k] for st in states] for k in keys]
            self._call(group, t, ps, [plain(gg[j]) for j in js], lists, states, gs, gs_dev, fi_dev)
            for st in states:
                st["step"] = t
        # Build the fast-path cache once every param of the group has state at one common step count.
        sts = [self.state.get(offset + j) for j in range(len(gg))]
        if all(st is not None for st in sts) and len({st["step"] for st in sts}) == 1:
            self._group_cache[gi] = {"step": sts[0]["step"], "states": sts, "version": getattr(group, "version", None),
                                     "params": [plain(p) for p in group["params"]],
                                     "lists": [[st[k] for st in sts] for k in keys]}
        else:
            self._group_cache.pop(gi, None)

    def _call(self, group, t, ps, gs_list, lists, states, gs, gs_dev, fi_dev):
        lr = group["lr"]
        if callable(lr):
            lr = self._lr_value(group, t - 1)
        hyper, names = self._hyper_cached(group, lr)
        stream = 0 if type(ps[0]) is _ndarray else _arrays.current_stream(ps[0])
        ret = self._c_call(ps, gs_list, lists, names, hyper, t, states, gs, bool(group["maximize"]), stream, gs_dev,
                           fi_dev)
        self._after_call(states, ret)

    def _c_call(self, ps, gs_list, lists, names, hyper, t, states, gs, maximize, stream, gs_dev, fi_dev):
        return type(self)._c_step(ps, gs_list, lists, names, hyper, t, gs, maximize, stream, gs_dev, fi_dev)

    def _after_call(self, states, ret) -> None:
        pass

    def _hyper_cached(self, group: dict, lr: float):
        # Rebuild (and re-validate) the hyperparameters only when the group was modified or the lr value changed.
        hit = self._hyper_cache.get(id(group))
        version = getattr(group, "version", None)
        if hit is not None and hit[0] == lr and version is not None and hit[1] == version:
            return hit[2]
        lr = self._lr_value(group, 0) if not isinstance(lr, float) else lr
        h = self._hyper(group, lr)
        names = tuple(k for k, _ in self._state_spec_for(group))
        self._hyper_cache[id(group)] = (lr, version, (h, names))
        return h, names

    def _hyper(self, group: dict, lr: float):
        """The validated C hyperparameter struct for this group at learning rate ``lr``."""
        return build_hyper(self._algo, **self._hyper_kwargs(group, lr))

    def _hyper_kwargs(self, group: dict, lr: float) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """For torch tensors: clear ``p.grad`` (optkern itself never owns gradients)."""
        for p in self._flat_params:
            if getattr(p, "grad", None) is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

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
        start = 0
        for saved, mine in zip(groups, self.param_groups):
            for j, old in enumerate(saved["params"]):
                index_map[old] = start + j
            start += len(mine["params"])
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
        self._group_cache.clear()
        self._hyper_cache.clear()

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
