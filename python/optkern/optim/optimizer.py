"""The base class of optkern's optimizers: torch.optim's shape (param groups, per-param state, state_dict),
over the functional steps.

A subclass names its algorithm (``_algo``, ``_c_step``), its state buffers in the kernel's order and how they
start (``_state_spec_for``), and maps a group to the functional keywords (``_hyper_kwargs``); the hyperparameter
struct is built by the same function the functional layer uses.  A step is one compiled call per param group
(per step count, if params of a group have taken different numbers of steps).  ``step(grads)`` takes the gradients
as a list aligned with all params (in group order); a ``None`` entry skips that param, as torch skips a param whose
``.grad`` is None.

A step is all or nothing:

* it is planned first: every group's hyperparameters (an lr schedule evaluated at this step included), step counts
  and arrays are checked before the first kernel runs (the arrays of the first call by that call itself, those of
  any further call by ``_C.check_arrays``), and an error names the caller's indices (``grads[i]``, ``params[i]``
  counted over all groups, ``state[i]['exp_avg']``);
* each call's bookkeeping (the step counts, NAdam's momentum product, state created for a param's first step) is
  committed right after the kernel returns; the binding counts the kernel's run (its ``counters`` argument) in the
  same C call, so an exception at any bytecode (a KeyboardInterrupt) completes the commit if the kernel ran and
  leaves the state as before the step if it did not: counts and buffers never disagree;
* ``step`` holds a per-optimizer lock for its whole duration, so steps from several threads run one after the other.

16-bit training (issue 14; the roundings are :mod:`optkern.precision`'s, the kernels the functional layer's):

* every class takes ``state_dtype``, ``master_weights``, ``stochastic_rounding`` and ``seed``, kept in each group
  like the other hyperparameters (a group may set its own; state_dict saves them):
  ``state_dtype``: None (float32 state for bfloat16/float16 params, the param's dtype otherwise), "float32",
  "bfloat16", "param" (torch fused's choice) or a dtype object (kept in the group by name); it applies when a
  buffer is created.  ``master_weights``: None, "fp32" (a float32 copy of the param, made at its first step, in
  ``state[i]["master_param"]``) or "split" (bfloat16 params: ``state[i]["master_residual"]``, int16 zeros at first,
  holds the float32 master's low half).  ``stochastic_rounding`` (master_weights None only) and its ``seed``
  (an integer in [0, 2**64)).  They are checked against every param of a group when it is added, loaded or steps
  after a change, before anything is allocated: a master or stochastic rounding for float32/float64 params,
  "split" for float16 params, a 16-bit state for float32 params raise ValueError naming the keyword (put such
  params in a group of their own);
* ``step(grads, param_copies=...)`` is the offload step: float32 params may take bfloat16/float16 grads, and the
  16-bit arrays of ``param_copies`` (aligned with the params, None skips) receive the updated params rounded to
  nearest even in the same pass;
* a group steps in one call per (step count, param dtype and device, grad dtype, copy dtype);
* stochastic rounding is keyed by (seed, step count, the tensor's position in its call, element).  The compiled
  step takes no per-tensor key, so the position is the one in the call: the param's position in its group when
  the whole group steps in one call (every param has a grad, one count, one dtype), else among its call's params.
  Groups with equal seeds draw the same stream for their first tensors: give each group its own seed.

Optimizers deepcopy and pickle (the lock and the caches of C structs are rebuilt).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from .. import _C, _arrays
from ..functional import (
    MAX_STEP,
    _scalar_args,
    build_hyper,
    c_message,
    check_device_scalars,
    real_number,
    refuse_keywords,
    storage_args,
)
from ..precision import check_master_mode, dtype_name, init_masters, is_16bit, resolve_state_dtype, zeros_like_dtype

_ndarray = np.ndarray
_plain = _arrays.plain
# What the compiled step raises when it refuses its input, before it touches any memory.
_REFUSED = (ValueError, TypeError, MemoryError)
_INDEXED = re.compile(r"\b([A-Za-z_]\w*)\[(\d+)\]")
#: where each master mode keeps its master in a param's state (the functional layer's ``masters=``)
MASTER_KEYS = {"fp32": "master_param", "split": "master_residual"}


def _read_device_flag(x) -> bool:
    """A one-element device array (CuPy, torch or another __cuda_array_interface__ producer) as a bool."""
    item = getattr(x, "item", None)
    if item is None:
        import cupy

        item = cupy.asarray(x).item
    return bool(float(item()))


class ParamGroup(dict):
    """A param group: a dict (as in torch) that counts its modifications, so that a step rebuilds its
    hyperparameters only after the user changed one (e.g. ``group["lr"] = 0.01``)."""

    __slots__ = ("version",)

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.version = 0

    def __reduce__(self):  # pickle and copy as a fresh group (the version only keys caches)
        return type(self), (dict(self),)

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
    #: set by subclasses: the functional algorithm name (for build_hyper) and the compiled step
    _algo: str = ""
    _c_step = None
    #: a per-param state value passed to the kernel after the step count and replaced by its return value
    #: (NAdam's running momentum product); None for the other algorithms
    _ret_state: str | None = None

    def __init__(self, params, defaults: dict):
        self._lock = threading.RLock()
        self._new_run_record()
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}  # keyed by the param's index over all groups
        self._group_cache: dict[int, dict] = {}  # per group: prebuilt lists for the common all-params step
        self._hyper_cache: dict[int, tuple] = {}
        self._precision_checked: dict[int, int] = {}  # per group: the version its 16-bit keywords were checked at
        self._flat_params: list = []
        params = list(params) if not isinstance(params, list) else params
        if len(params) == 0:
            raise ValueError("params: optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for g in groups:
            self.add_param_group(g)

    # ---- copy and pickle: the lock and the caches (C structs, views) are not state ----------------------
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        for k in ("_lock", "_group_cache", "_hyper_cache", "_precision_checked", "_flat_params", "_done",
                  "_runs_committed"):
            d.pop(k, None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._lock = threading.RLock()
        self._new_run_record()
        self._group_cache, self._hyper_cache, self._precision_checked = {}, {}, {}
        self._flat_params = [p for g in self.param_groups for p in g["params"]]

    # ---- groups ----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError("param_group: expected a dict")
        with self._lock:
            group = ParamGroup(param_group)
            ps = group["params"]
            group["params"] = list(ps) if isinstance(ps, (list, tuple)) else [ps]
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            if group.get("state_dtype") is not None:
                group["state_dtype"] = _state_dtype_key(group["state_dtype"])
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
        self._check_precision(group)

    def _check_precision(self, group: dict) -> None:
        """The 16-bit keywords of a group against its params' dtypes (see the module docstring); a param is named by
        its index over all groups (a group being added counts after the existing ones)."""
        mw, sr = group.get("master_weights"), group.get("stochastic_rounding", False)
        check_master_mode(mw, sr)
        storage_args({"stochastic_rounding": sr, "seed": group.get("seed", 0)})
        sd = group.get("state_dtype")
        ps = group["params"]
        offset = next((k for k, o in _group_offsets(self.param_groups) if o is ps), len(self._flat_params))
        for j, p in enumerate(ps):
            pd, i = dtype_name(p), offset + j
            try:
                resolve_state_dtype(pd, sd)
            except ValueError as e:
                raise ValueError(f"{e} (params[{i}])") from None
            if mw is not None and not is_16bit(pd):
                raise ValueError(f"master_weights: a master copy ({mw!r}) is for bfloat16/float16 params, params[{i}] "
                                 f"is {pd} (give it a param group with master_weights=None)")
            if mw == "split" and pd != "bfloat16":
                raise ValueError(f"master_weights: 'split' needs bfloat16 params (the float32 master's high half), "
                                 f"params[{i}] is {pd}; use 'fp32'")
            if sr and not is_16bit(pd):
                raise ValueError(f"stochastic_rounding: rounds bfloat16/float16 params, params[{i}] is {pd} (give it "
                                 f"a param group with stochastic_rounding=False)")

    @staticmethod
    def _lr_value(group: dict, k: int) -> float:
        """The group's lr (a schedule's value at k steps taken): a finite number >= 0."""
        lr = group["lr"]
        where = ""
        if callable(lr):
            where = f" (the lr schedule's value at step {k})"
            try:
                v = real_number("lr", lr(k))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{e}{where}") from None
        else:
            v = lr if type(lr) is float else real_number("lr", lr, finite=False)
        if not (v >= 0.0 and v != float("inf")):
            raise ValueError(f"lr: expected a finite number >= 0, got {v}{where}")
        return v

    def _params(self) -> list:
        return self._flat_params

    # ---- state -------------------------------------------------------------------------------------------
    def _init_state(self, index: int, p, group: dict) -> dict:
        st: dict[str, Any] = {"step": 0}
        st.update(self._new_buffers(p, group, st))
        st.update(self._extra_state(group))
        return st

    def _new_buffers(self, p, group: dict, have) -> dict:
        """The buffers param ``p`` needs under ``group`` and lacks in ``have``: the state (in the group's state dtype,
        at its initial values) and the master copy of ``master_weights``."""
        sd = resolve_state_dtype(dtype_name(p), group.get("state_dtype"))
        out = {k: _full(p, float(init(group) if callable(init) else init), sd)
               for k, init in self._state_spec_for(group) if k not in have}
        mw = group.get("master_weights")
        if mw is not None and MASTER_KEYS[mw] not in have:
            out[MASTER_KEYS[mw]] = init_masters([_plain(p)], mw)[0]
        return out

    def _state_spec_for(self, group: dict):
        return self._state_spec

    def _extra_state(self, group: dict) -> dict:
        return {}

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self, grads=None, *, grad_multiplier=1.0, found_inf=None, closure=None, param_copies=None, **kw):
        """Update every param whose gradient is given, in place, in one fused pass per param group.

        grads: arrays aligned with all params (group order); None (the list) reads ``p.grad`` (torch tensors;
        NumPy and CuPy params have none and need ``step(grads)``).  Grads are in their param's dtype, or
        bfloat16/float16 for float32 params.  grad_multiplier / found_inf: see :mod:`optkern.functional`; with
        found_inf true nothing changes, not even the step count, once every argument has been checked.
        param_copies: None, or arrays aligned with all params (None entries allowed): bfloat16/float16 arrays of
        float32 params, written with the updated params (rounded to nearest even) in the same pass.
        closure: re-evaluates the loss and returns it (called first, as in torch).
        """
        if kw:
            refuse_keywords("step", kw)
        with self._lock:  # (a signal cannot leave it held: `with` releases it on any exception)
            loss = closure() if closure is not None else None
            params = self._flat_params
            if grads is None:
                grads = self._grads_of(params)
            elif type(grads) is not list:
                grads = _arrays.as_list(grads)
            if len(grads) != len(params):
                raise ValueError(f"grads: expected {len(params)} arrays (one per param), got {len(grads)}")
            if param_copies is not None:
                param_copies = _arrays.as_list(param_copies)
                if len(param_copies) != len(params):
                    raise ValueError(f"param_copies: expected {len(params)} entries (one per param, None for no copy), "
                                     f"got {len(param_copies)}")
            if found_inf is None and type(grad_multiplier) is float and grad_multiplier == 1.0:
                calls = self._plan(grads, param_copies)
                if len(calls) == 1:  # the common case: one call, which checks its own arrays before its kernel
                    self._run(calls[0], 1.0, None, None)
                    return loss
                skip, gm, gm_dev, fi_dev = False, 1.0, None, None
            else:
                skip, gm, gm_dev, fi_dev = _scalar_args(grad_multiplier, found_inf)
                if fi_dev is not None:
                    # The class keeps its step counts on the host, so a device flag is read here (one sync):
                    # a skipped step must not advance them.  (Device-resident counts that never sync: the
                    # functional steps with step= a CUDA array, or optkern.torch with capturable=True.)
                    check_device_scalars(self._flat_params, gm_dev, fi_dev)
                    skip, fi_dev = skip or _read_device_flag(fi_dev), None
                calls = self._plan(grads, param_copies)
            # The first call checks its own arrays before its kernel runs; the others are checked first.
            self._precheck(calls if skip else calls[1:], gm_dev, fi_dev)
            if not skip:
                for c in calls:
                    self._run(c, gm, gm_dev, fi_dev)
            return loss

    @staticmethod
    def _grads_of(params) -> list:
        """``p.grad`` of every param (torch tensors; a None grad skips its param, as in torch)."""
        grads = []
        for i, p in enumerate(params):
            try:
                grads.append(p.grad)
            except AttributeError:
                raise ValueError(f"grads: params[{i}] (a {type(p).__name__}) has no .grad; NumPy and CuPy params need "
                                 f"their gradients passed, opt.step(grads)") from None
        return grads

    def _plan(self, grads, copies=None) -> list:
        """The step's compiled calls, every hyperparameter, step count and state buffer ready (nothing changed).

        A call: (t, grads, stream, hyper, fixed, copies), fixed = (flat indices, params, state lists, state names,
        maximize, states, commit targets (the dicts that receive the new count), new states, added buffers, a group
        cache to register once the call is committed, the 16-bit keywords of the compiled step): what a group's cache
        keeps from step to step; copies: the call's param_copies (None: none)."""
        calls: list = []
        groups, caches = self.param_groups, self._group_cache
        offset = 0
        for gi, group in enumerate(groups):
            n = len(group["params"])
            gg = grads if gi == 0 and n == len(grads) else grads[offset:offset + n]
            cc = None if copies is None else copies[offset:offset + n]
            cache = caches.get(gi)
            if cache is not None and cache["version"] == getattr(group, "version", None):
                gl = gg  # the grads as given when all are NumPy arrays (the kernel only reads the list)
                gdt = cache["grad_dtype"]
                for g in gg:
                    if type(g) is not _ndarray:
                        if g is None or getattr(g, "dtype", None) is not gdt:
                            break
                        gl = None
                    elif g.dtype is not gdt:  # (a call has one grad dtype: regroup)
                        break
                else:  # the common case: every param of the group steps, all at one count, lists prebuilt
                    cl = _copies_of(cc, cache["copy_dtype"])
                    if cl is not False:
                        if gl is None:
                            gl = [_plain(g) for g in gg]
                        t = cache["step"] + 1
                        hyper, fixed = cache["hyper"], cache["fixed"]
                        if hyper is None or t >= MAX_STEP:
                            hyper = self._hyper_at(group, t, fixed[0])[0]
                        ps = fixed[1]
                        calls.append((t, gl, 0 if type(ps[0]) is _ndarray else _arrays.current_stream(ps[0]), hyper,
                                      fixed, cl))
                        offset += n
                        continue
            self._plan_group(gi, group, offset, gg, cc, calls)
            offset += n
        return calls

    def _plan_group(self, gi, group, offset, gg, cc, calls) -> None:
        """Calls for one group outside the fast path: params grouped by step count and dtypes (param, grad, copy)
        and device, first-step state allocated (not yet in ``self.state``), buffers a changed hyperparameter now
        needs (e.g. amsgrad, a master) created."""
        params, state = group["params"], self.state
        self._group_cache.pop(gi, None)  # its count would go stale once some params step without the others
        version = getattr(group, "version", None)
        if version is None or self._precision_checked.get(id(group)) != version:
            self._check_precision(group)  # a 16-bit keyword changed since the group was added
            if version is not None:
                self._precision_checked[id(group)] = version
        by_key: dict[tuple, list[int]] = {}
        for j, g in enumerate(gg):
            if g is not None:
                st = state.get(offset + j)
                c = None if cc is None else cc[j]
                p = params[j]
                key = (0 if st is None else self._taken(offset + j, st), _dtype_of(p), str(getattr(p, "device", "")),
                       _dtype_of(g), None if c is None else _dtype_of(c))
                by_key.setdefault(key, []).append(j)
        whole = len(by_key) == 1 and len(gg) > 0 and all(g is not None for g in gg) and version is not None
        maximize = bool(group["maximize"])
        mw = group.get("master_weights")
        mkey = MASTER_KEYS.get(mw)
        for (taken, _, _, gdt, cdt), js in by_key.items():
            t = taken + 1
            idx = [offset + j for j in js]
            hyper, names = self._hyper_at(group, t, idx)
            new, added, states, bufs = {}, [], [], []
            for j, i in zip(js, idx):
                st = state.get(i)
                if st is None:
                    st = new[i] = self._init_state(i, params[j], group)
                    b = st
                else:
                    missing = self._new_buffers(params[j], group, st)
                    b = st
                    if missing:  # starts as torch's does; put into the state only when the step runs
                        added.append((st, missing))
                        b = {**st, **missing}
                states.append(st)
                bufs.append(b)
            ps = [_plain(params[j]) for j in js]
            lists = [[b[k] for b in bufs] for k in names]
            stream = 0 if type(ps[0]) is _ndarray else _arrays.current_stream(ps[0])
            gl = [_plain(gg[j]) for j in js]
            cl = None if cdt is None else [_plain(cc[j]) for j in js]
            if mkey is not None:  # the functional layer's masters=
                storage = {"master_weights": mw, "masters": [b[mkey] for b in bufs]}
            elif group.get("stochastic_rounding", False):
                storage = {"stochastic_rounding": True, "seed": int(group.get("seed", 0))}
            else:
                storage = _NO_STORAGE
            if whole:  # after this call every param of the group is at count t: cache the lists for the fast path
                cache = {"step": taken, "version": version, "hyper": None if callable(group["lr"]) else hyper,
                         "grad_dtype": gdt, "copy_dtype": cdt}
                targets = states + [cache]
                cache["fixed"] = (idx, ps, lists, names, maximize, states, targets, None, None, None, storage)
                calls.append((t, gl, stream, hyper,
                              (idx, ps, lists, names, maximize, states, targets, new, added, (gi, cache), storage), cl))
            else:
                calls.append((t, gl, stream, hyper,
                              (idx, ps, lists, names, maximize, states, states, new, added, None, storage), cl))

    @staticmethod
    def _taken(i: int, st: dict) -> int:
        """The steps param i has taken (its state's count), checked: an integer the next step can follow."""
        s = st["step"]
        if not (type(s) is int or isinstance(s, np.integer)) or not 0 <= s < MAX_STEP - 1:
            raise ValueError(f"state[{i}]['step']: expected an integer >= 0 and < 2**62 - 1 (the steps taken), got "
                             f"{s!r}")
        return int(s)

    def _hyper_at(self, group: dict, t: int, idx) -> tuple:
        """(hyper struct, state names) for the group's call at step t."""
        if t >= MAX_STEP:
            raise ValueError(f"state[{idx[0]}]['step']: {t - 1} steps taken, the most a step count can be is 2**62 - 1")
        lr = group["lr"]
        return self._hyper_cached(group, self._lr_value(group, t - 1) if callable(lr) else lr)

    def _precheck(self, calls, gm_dev, fi_dev) -> None:
        """Check the arrays of calls whose kernels run after another one's (nothing is written)."""
        for _, gl, stream, _, fixed, cl in calls:
            idx, ps, lists, names, storage = fixed[0], fixed[1], fixed[2], fixed[3], fixed[10]
            try:
                check_device_scalars(ps, gm_dev, fi_dev)
                _C.check_arrays(ps, gl, lists, names, len(lists), stream, **_storage_kw(storage, cl))
            except _REFUSED as e:
                raise _named(e, idx, names, storage) from None

    def _run(self, c, gm, gm_dev, fi_dev) -> None:
        """One compiled call, and its bookkeeping committed with it (see the module docstring)."""
        t, gl, stream, hyper, (idx, ps, lists, names, maximize, states, targets, new, added, cache, storage), cl = c
        kw = _storage_kw(storage, cl)
        rk = self._ret_state
        done = self._done
        if rk is None:
            args = (ps, gl, lists, names, hyper, t, gm, maximize, stream, gm_dev, fi_dev, done[1], True)
        else:  # NAdam: the product after the step count; the binding also writes the new one to done[0][1]
            args = (ps, gl, lists, names, hyper, t, states[0][rk], gm, maximize, stream, gm_dev, fi_dev, done[1],
                    True, False, done[2], True)
        if new:  # first-step state, at count 0 until the commit (as torch creates it before its update)
            self.state.update(new)
        if added:
            for st, missing in added:
                st.update(missing)
        c_step = type(self)._c_step
        try:
            ret = c_step(*args, **kw)
            # The commit: every target (each param's state, and the group's cache) takes the new count.
            _commit(targets, t, rk, ret)
            self._runs_committed += 1
            if cache is not None:  # the group's lists, for the fast path of its next step
                self._group_cache[cache[0]] = cache[1]
        except BaseException as e:
            # A signal (KeyboardInterrupt) arrives at a bytecode boundary, the first one right after the kernel's C
            # call returns.  The binding counted the kernel's run in done[0][0] before it returned (no bytecode in
            # between): if it ran, the commit, which only assigns, is done in full (it may have been cut short).
            runs = done[0]
            if runs[0] > self._runs_committed:
                _commit(targets, t, rk, float(runs[1]))
                self._runs_committed = int(runs[0])
                raise
            if isinstance(e, _REFUSED):  # the binding refused its input: nothing was written
                self._undo(new, added)
                raise _named(e, idx, names, storage) from None
            raise  # (first-step state, if any, stays at count 0 with its initial buffers, as before a step)

    def _undo(self, new, added) -> None:
        if new:
            for i in new:
                self.state.pop(i, None)
        if added:
            for st, missing in added:
                for k in missing:
                    st.pop(k, None)

    def _new_run_record(self) -> None:
        """done: ([kernel runs, NAdam's last product] as float64, [address of the runs], [address of the product])
        for the binding's ``counters`` / ``mu_products`` (written in the kernel's C call); the runs committed."""
        runs = np.zeros(2)
        self._done = (runs, [runs.ctypes.data], [runs.ctypes.data + 8])
        self._runs_committed = 0

    def _hyper_cached(self, group: dict, lr):
        # Rebuild (and re-validate) the hyperparameters only when the group was modified or the lr value changed.
        hit = self._hyper_cache.get(id(group))
        version = getattr(group, "version", None)
        if hit is not None and hit[0] == lr and type(hit[0]) is type(lr) and version is not None and hit[1] == version:
            return hit[2]
        lr_value = self._lr_value({"lr": lr}, 0)
        h = self._hyper(group, lr_value)
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
        with self._lock:
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
        with self._lock:
            self._load(groups, state)

    def _load(self, groups, state) -> None:
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict: param_groups[{gi}] has {len(saved['params'])} params, this optimizer's "
                                 f"has {len(mine['params'])}")
        params = self._params()
        trials = []  # each group as it will be: checked before anything changes, and the dtypes of its state
        for saved, mine in zip(groups, self.param_groups):
            trial = dict(mine)
            trial.update({k: v for k, v in saved.items() if k != "params"})
            if trial.get("state_dtype") is not None:
                trial["state_dtype"] = _state_dtype_key(trial["state_dtype"])
            self._check_group(trial)
            trials.append(trial)
        index_map, group_of = {}, []
        start = 0
        for saved, mine, trial in zip(groups, self.param_groups, trials):
            for j, old in enumerate(saved["params"]):
                index_map[old] = start + j
            group_of += [trial] * len(mine["params"])
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
                    restored[k] = _restored(v, _arrays.plain(p), _state_dtype(k, p, group_of[i]))
                elif k == "step":
                    try:
                        restored[k] = self._taken(old, st)
                    except ValueError as e:
                        raise ValueError(f"state_dict: {e}") from None
                else:
                    restored[k] = v
            new_state[i] = restored
        for trial, mine in zip(trials, self.param_groups):
            mine.update({k: v for k, v in trial.items() if k != "params"})
        self.state = new_state
        self._group_cache.clear()
        self._hyper_cache.clear()
        self._precision_checked.clear()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


def _named(e: Exception, idx, state_names, storage=None) -> Exception:
    """The compiled core's error with the caller's indices: its ``params[k]`` / ``grads[k]`` / ``param_copies[k]`` /
    ``<state>[k]`` / ``masters[k]`` count the params of one call; the caller counts params over all groups and reads
    state as ``state[i][name]`` (a master as ``state[i]['master_param']`` or ``['master_residual']``)."""
    msg = str(c_message(e))
    mkey = MASTER_KEYS.get(storage.get("master_weights")) if storage else None

    def caller(m):
        name, k = m.group(1), int(m.group(2))
        if k >= len(idx):
            return m.group(0)
        if name in ("params", "grads", "param_copies"):
            return f"{name}[{idx[k]}]"
        if name in state_names:
            return f"state[{idx[k]}][{name!r}]"
        if name == "masters" and mkey is not None:
            return f"state[{idx[k]}][{mkey!r}]"
        return m.group(0)

    return type(e)(_INDEXED.sub(caller, msg))


def _commit(targets, t: int, rk, ret) -> None:
    """A call's bookkeeping: every target takes the new step count (and NAdam's returned product under rk)."""
    for d in targets:
        d["step"] = t
        if rk is not None:
            d[rk] = ret


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


_NO_STORAGE: dict = {}


def _storage_kw(storage: dict, copies) -> dict:
    """The compiled step's 16-bit keywords for one call: the group's (masters, stochastic rounding) and the step's
    param copies."""
    return storage if copies is None else {**storage, "param_copies": copies}


def _copies_of(cc, cdt):
    """A group's param_copies for its cached call, whose copies are all of dtype ``cdt`` (None: no copies): the list
    to pass (None for none), or False when they do not fit that call (the group is planned again)."""
    if cc is None:
        return None if cdt is None else False
    if cdt is None:
        return None if all(c is None for c in cc) else False
    for c in cc:
        if c is None or getattr(c, "dtype", None) is not cdt:
            return False
    return [_plain(c) for c in cc]


def _dtype_of(a):
    """An array's dtype, as a grouping key (the dtype's name for what is not an array: the binding refuses it)."""
    dt = getattr(a, "dtype", None)
    return type(a).__name__ if dt is None else dt


def _group_offsets(groups):
    """(index of its first param over all groups, its params list) for each group."""
    k = 0
    for g in groups:
        yield k, g["params"]
        k += len(g["params"])


def _state_dtype_key(v):
    """A ``state_dtype=`` as kept in a group: None, 'param' or the dtype's name (a dtype object by its name, so
    that state_dict holds plain strings); anything else is kept for the check to refuse."""
    if v is None or (isinstance(v, str) and v == "param"):
        return v
    name = dtype_name(v)
    return name if name in ("float32", "float64", "bfloat16", "float16") else v


def _state_dtype(key: str, p, group: dict) -> str:
    """The dtype a param's state entry has under ``group``: float32 for the "fp32" master, int16 for the "split"
    residual, the group's state dtype for the other buffers."""
    if key == MASTER_KEYS["fp32"]:
        return "float32"
    if key == MASTER_KEYS["split"]:
        return "int16"
    return resolve_state_dtype(dtype_name(p), group.get("state_dtype"))


def _restored(v, p, dtype: str):
    """A saved state array ``v`` as ``p``'s library and device keep it, of dtype ``dtype`` (a copy)."""
    like = p if dtype == dtype_name(p) else zeros_like_dtype(p[..., :0] if p.ndim else p, dtype)
    if _arrays._library(v) != _arrays._library(like) and is_16bit(v):
        v = v.float() if _arrays._library(v) == "torch" else v.astype(np.float32)  # exact, and every library reads it
    return _arrays.to_library_like(v, like)


def _full(p, value: float, dtype: str):
    """A state buffer like ``p`` (library, device, layout) of dtype ``dtype``, filled with ``value``."""
    if dtype == dtype_name(p):
        return _arrays.full_like(p, value)
    z = zeros_like_dtype(p, dtype)
    if value != 0.0:
        z.fill_(value) if hasattr(z, "fill_") else z.fill(value)
    return z
