"""``optkern.torch`` optimizers: the ``torch.optim`` classes, with optkern's fused kernel as their step.

    import optkern.torch
    opt = optkern.torch.AdamW(model.parameters(), lr=1e-3)     # isinstance(opt, torch.optim.AdamW) is True
    loss.backward(); opt.step(); opt.zero_grad()

Each class subclasses the ``torch.optim`` class of the same name and replaces only ``step``.  Construction,
defaults, validation messages, param groups (named parameters and extra keys included), ``state`` and its
``state_dict`` format, hooks, ``zero_grad``, ``add_param_group``, pickling and the schedulers are torch's own, so
a ``torch.optim`` state dict loads into ``optkern.torch`` and the reverse.  ``step`` reads ``p.grad`` and runs
one fused pass per (param group, dtype, device, step count): params and state are read and written once, in
place, by the same kernels as :mod:`optkern.functional`.

Implementation keywords: ``foreach``, ``fused`` and ``capturable`` are accepted and stored in the param groups as
torch stores them (a state dict saved here loads into torch with the same meaning), but optkern always runs its
own fused kernel.  ``differentiable=True`` is refused: the kernel writes memory autograd cannot see.  With
``capturable=True`` (or ``fused=True``) on CUDA params the ``step`` tensors (and NAdam's ``mu_product``) live on
the params' device, as in torch, and the kernel reads, uses and advances them there: no host sync, a device
``found_inf`` skips the step and the count alike, and the step can be captured in a CUDA graph (after one eager
warm-up step).

Exactness (torch 2.13, CPU): the per-element math is torch's; per-step scalars are computed on the host in
float64 as torch computes them from its float32 ``step`` tensors, and where torch keeps a scalar in a float32
tensor (NAdam's ``mu_product`` when the default dtype is float32) the product is rounded to float32 as torch
rounds it.  A tensor ``lr`` is read as the value it holds (torch's single-tensor path multiplies a float32 lr
into Adagrad's ``lr_decay`` factor in float32; optkern uses float64 there).

AMP: ``_step_supports_amp_scaling`` is True, so ``torch.amp.GradScaler.step(opt)`` hands ``grad_scale`` (the
loss scale, a divisor) and ``found_inf`` to the step as it does for torch's fused optimizers: the unscale is
folded into the step's single pass (multiplying by 1/scale, exact for GradScaler's power-of-two scales), and a
step with ``found_inf`` non-zero changes nothing, step counts included.  After a step, ``p.grad`` is left unscaled
as torch's fused optimizers leave it (a second pass over the grads: optkern's kernel only reads them).

Every tensor a step writes (params and state) has its autograd version bumped, so a backward through a graph
that saved the old values raises as it does after a torch step.  A step validates every group before it writes
anything: a bad gradient in the last group leaves the first group untouched.  Steps of one optimizer are
serialised by a lock.  The step counters (and NAdam's product) advance in the same compiled call as the kernel.

Host work: the first step (and any step after the optimizer changed) validates params and state in full and
caches them as step plans (``optkern._C.PointerPlan``, one per group, dtype, device and step count).  Later steps
read each ``p.grad`` and check its dtype, layout, alignment and overlap with the written buffers, check that no
param moved (``p.data = ...``), no watched state entry was replaced and no step counter changed, then run the
kernel.  ``load_state_dict``, ``add_param_group``, a changed group or a param gaining or losing its grad rebuild
the plans.  Replacing a param's whole state dict with one of the same length, or swapping ``.data`` of a state
tensor, is not seen: use ``load_state_dict`` for such surgery.

dtypes: float32, float64, bfloat16 and float16 params (one dtype per kernel call; a group may mix them).  Other
dtypes raise TypeError naming the param.

Mixed precision (16-bit params; :mod:`optkern.precision` defines the roundings).  Four keyword-only constructor
arguments beyond torch's signature (``inspect.signature`` still shows torch's), stored in ``defaults`` and every
param group where they differ from their defaults (an optimizer made without them has torch's exact groups); a
group may set its own; torch keeps unknown group keys, so they travel in ``state_dict``; a group loaded without
them, e.g. from ``torch.optim``, takes the constructor's values:

- ``state_dtype=None``: the dtype of the state this optimizer creates for bfloat16/float16 params: None (float32,
  the default), ``"param"`` (the param's own dtype: torch's fused optimizers' state), ``"float32"``,
  ``"bfloat16"`` (or ``"float16"`` for float16 params), as a name or a torch dtype.  State that exists (loaded, or
  made by torch) keeps its dtype.  float32/float64 params always keep state in their own dtype.
- ``master_weights=None | "fp32" | "split"``: None: the math in float32, the result rounded to nearest-even into
  the param; ``"fp32"``: a float32 master in ``state[p]["master_param"]`` (created from the param), the param is
  its rounding, written in the same pass; ``"split"`` (bfloat16 params only): an int16 ``state[p]["master_residual"]``
  that with the param holds the float32 master bit for bit (param = high half, residual = low half).
- ``stochastic_rounding=False`` (only with ``master_weights=None``) and ``seed=0``: the param is rounded
  stochastically, keyed by (seed, the step count, the param's index in its kernel call, the element), so results
  do not depend on threads or instruction sets.  The step count is ``state["step"]``; SGD keeps none, so a group
  of SGD with stochastic rounding counts its steps in ``group["sr_step"]``.  Params of different groups with the
  same seed and index share a stream: give groups different seeds to decorrelate them.
The keywords apply to 16-bit params; float32/float64 params of the same group step as before.

The offload step (ZeRO-Offload style, as DeepSpeed's ``DeepSpeedCPUAdam.step(fp16_param_groups=)``): float32
params, and ``step(param_copies=...)``: one entry per param group, each None, a list aligned with the group's
params (None where a param has no copy), or a single tensor for a one-param group.  Each copy (bfloat16 or
float16, on the param's device, its shape and layout) receives the updated param rounded to nearest-even, in the
same pass as the step.  torch cannot hold a 16-bit grad for a float32 param (``p.grad`` must match the param's
dtype), so 16-bit grads for float32 params are for :mod:`optkern.functional` only.
"""

from __future__ import annotations

import inspect
import math
import re
import threading

import torch

from .. import _C
from ..functional import build_hyper, storage_args
from ..precision import check_master_mode, dtype_name, resolve_state_dtype
from ..optim.algorithms import OGR_STATE_SPEC, _pick  # group keys -> build_hyper keywords, shared with the NumPy layer

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop", "OGR"]

_HALF = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, torch.float64) + _HALF
_PREC_DEFAULTS = {"state_dtype": None, "master_weights": None, "stochastic_rounding": False, "seed": 0}
_MASTER_KEY = {"fp32": "master_param", "split": "master_residual"}  # state[p] key of each mode's master
_MASTER_DTYPE = {"fp32": torch.float32, "split": torch.int16}
_STATE_DTYPES = (None, "param", "float32", "bfloat16", "float16")
_COUNTER_DTYPES = {torch.float32: False, torch.float64: True}  # -> counters_f64
_DEVICE_COUNT = -1  # the count of a bucket whose step tensors live on a CUDA device (never read on the host)
_LOCK_GUARD = threading.Lock()


def _number(v) -> float:
    """A hyperparameter as torch holds it (float, int, bool or one-element tensor) -> float."""
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


def _dense(t: torch.Tensor) -> bool:
    """The elements fill one contiguous block, in some axis order (no gaps, no repeats)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = a.stride(), b.stride()
    if sa == sb:
        return True
    return all(x == y for x, y, n in zip(sa, sb, b.shape) if n > 1)


_NAME_RE = re.compile(r"^(\w+)\[(\d+)\]")


def _prec_options(state_dtype, master_weights, stochastic_rounding, seed) -> dict:
    """The mixed-precision keywords, validated (ValueError/TypeError naming the keyword) and normalised: the
    state dtype as a name ("param", "float32", "bfloat16", "float16") or None."""
    sd = state_dtype
    if sd is not None and not (isinstance(sd, str) and sd == "param"):
        if not isinstance(sd, (str, torch.dtype)):
            raise TypeError(f"state_dtype: expected None, a name or a torch dtype, got {type(sd).__name__}")
        sd = dtype_name(sd)
        if sd not in _STATE_DTYPES:
            raise ValueError(f"state_dtype: expected None, 'param', 'float32', 'bfloat16' or 'float16' (or the torch "
                             f"dtype), got {state_dtype!r}")
    check_master_mode(master_weights, stochastic_rounding)
    seed = storage_args({"seed": seed})["seed"]
    return {"state_dtype": sd, "master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
            "seed": seed}


class _Prec:
    """What a param's kernel call keeps in 16 bits (part of the call's bucket key)."""

    __slots__ = ("state_dtype", "master", "stochastic", "seed", "copy_dtype")

    def __init__(self, state_dtype, master, stochastic, seed, copy_dtype):
        self.state_dtype, self.master, self.stochastic, self.seed, self.copy_dtype = \
            state_dtype, master, stochastic, seed, copy_dtype

    def key(self):
        return (self.state_dtype, self.master, self.stochastic, self.seed if self.stochastic else 0, self.copy_dtype)

    def storage(self, ps, states, copies) -> dict:
        """The step's storage keywords (empty when nothing is 16-bit: the call is as before)."""
        kw = {}
        if self.master is not None:
            mk = _MASTER_KEY[self.master]
            kw.update(masters=[st[mk].detach() for st in states], master_weights=self.master)
        if self.copy_dtype is not None:
            kw["param_copies"] = [c.detach() for c in copies]
        if self.stochastic:
            kw.update(stochastic_rounding=True, seed=self.seed)
        return kw


class _FusedStep:
    """The step shared by every optkern.torch optimizer (placed before the torch class in the MRO).

    A subclass sets ``_algo`` (the functional name for ``build_hyper``), ``_c_step``, and implements
    ``_hyper_kwargs(group, lr)``, ``_kernel_state_keys(group)`` (the state tensors in the kernel's order) and
    ``_state_spec(group)`` (torch's state keys in torch's order, with their initial values: "step", "one", a
    number, "lr" or a function of (optimizer, group)).
    """

    _step_supports_amp_scaling = True
    _algo = ""
    _c_step = None
    _has_step_tensor = True  # state["step"] as torch keeps it (SGD keeps none)
    _fused_capable = False  # torch has a fused kernel for this class (its step tensor follows `fused`)
    _watch_extra = ()  # further state entries a cached plan relies on
    _hyper_keys: tuple = ()  # the group keys _hyper_kwargs reads
    _scalar_keys = ("step",)  # per-param scalar state tensors a step writes (their versions are bumped too)

    # ---- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _refuse_differentiable(kwargs: dict) -> None:
        if kwargs.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by optkern.torch optimizers: the fused kernel "
                             "updates memory in place outside autograd; use torch.optim with differentiable=True")

    # ---- pickling: torch's Optimizer.__getstate__ keeps defaults, state and param_groups only ---------------
    def _step_lock(self) -> threading.RLock:
        lock = self.__dict__.get("_optkern_lock")
        if lock is None:
            with _LOCK_GUARD:
                lock = self.__dict__.get("_optkern_lock")
                if lock is None:
                    lock = self.__dict__["_optkern_lock"] = threading.RLock()
        return lock

    # The cached step plans hold references to params and state: drop them as soon as either is replaced.
    def __setstate__(self, state):  # also the last act of torch's load_state_dict
        self.__dict__.pop("_optkern_plans", None)
        self.__dict__.pop("_optkern_hyper", None)
        self.__dict__.pop("_optkern_prec", None)
        super().__setstate__(state)
        defaults = self.__dict__.get("defaults", {})
        for group in self.param_groups:  # groups saved by torch.optim: the constructor's mixed-precision options
            for k in _PREC_DEFAULTS:
                if k in defaults:
                    group.setdefault(k, defaults[k])

    def load_state_dict(self, state_dict):
        """torch's, except that the state of 16-bit params and the masters keep their saved dtypes (torch casts
        every floating state tensor to its param's dtype: float32 state or masters of a bfloat16 param would be
        rounded, an int16 residual converted)."""
        keep = []
        saved_groups = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
        saved_ids = [i for g in saved_groups for i in g.get("params", [])]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params)) if len(saved_ids) == len(params) else {}
        for pid, st in (state_dict.get("state", {}) if by_id else {}).items():
            p = by_id.get(pid)
            if p is None or not isinstance(st, dict):
                continue
            for k, v in st.items():
                if (k != "step" and isinstance(v, torch.Tensor) and v.dtype != p.dtype
                        and (p.dtype in _HALF or k in _MASTER_KEY.values())):
                    keep.append((p, k, v))
        super().load_state_dict(state_dict)
        for p, k, v in keep:
            self.state[p][k] = v.to(device=p.device)

    def add_param_group(self, param_group):
        self.__dict__.pop("_optkern_plans", None)
        self.__dict__.pop("_optkern_hyper", None)
        self.__dict__.pop("_optkern_prec", None)
        super().add_param_group(param_group)

    # ---- the step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, param_copies=None):
        """One fused optimizer step over every param with a ``.grad`` (see the module docstring).

        closure: re-evaluates the model and returns the loss (run with grad enabled, first, as torch does).
        param_copies: the offload step's 16-bit copies of float32 params, written in the same pass: one entry per
        param group (None, a list aligned with the group's params with None where no copy, or one tensor for a
        one-param group).  Validated before the closure runs and before anything is written.
        """
        copies = self._copies_map(param_copies)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "capturable" in self.defaults and _cuda_usable():
            # torch's own check (its capturable optimizers make it): capture with capturable=False is refused,
            # since host step counts would be frozen into the graph; capturable=True run eagerly warns once.
            self._cuda_graph_capture_health_check()
        with self._step_lock():
            self._fused_step(copies)
        return loss

    def _copies_map(self, param_copies):
        """param_copies (see step) -> {id(param): (copy, its name)}, or None; structure and dtypes checked here,
        shape, layout, device and overlap by the C layer with the rest of the call."""
        if param_copies is None:
            return None
        groups = self.param_groups
        if not isinstance(param_copies, (list, tuple)) or len(param_copies) != len(groups):
            what = f"a {type(param_copies).__name__}" if not isinstance(param_copies, (list, tuple)) else \
                f"{len(param_copies)} entries"
            raise ValueError(f"param_copies: expected a list with one entry per param group ({len(groups)}), got "
                             f"{what}")
        out = {}
        for gi, (group, cs) in enumerate(zip(groups, param_copies)):
            if cs is None:
                continue
            ps = group["params"]
            if isinstance(cs, torch.Tensor) and len(ps) == 1:
                cs = [cs]
            if not isinstance(cs, (list, tuple)) or len(cs) != len(ps):
                raise ValueError(f"param_copies[{gi}]: expected None or a list of {len(ps)} entries aligned with "
                                 f"param_groups[{gi}]['params'] (None where a param has no copy)")
            for pi, (p, c) in enumerate(zip(ps, cs)):
                if c is None:
                    continue
                name = f"param_copies[{gi}][{pi}]"
                if not isinstance(c, torch.Tensor):
                    raise TypeError(f"{name}: expected a tensor or None, got {type(c).__name__}")
                if p.dtype != torch.float32:
                    raise ValueError(f"{name}: a 16-bit copy is for float32 params (the offload step); "
                                     f"param_groups[{gi}]['params'][{pi}] is {p.dtype}")
                if c.dtype not in _HALF:
                    raise TypeError(f"{name}: expected a bfloat16 or float16 tensor, got {c.dtype}")
                out[id(p)] = (c, name)
        return out

    def _check_groups(self) -> None:
        """Every group's mixed-precision options against its params (construction: a conflict raises there)."""
        for gi, group in enumerate(self.param_groups):
            opts = self._group_prec(gi, group)
            keys = self._kernel_state_keys(group)
            for pi, p in enumerate(group["params"]):
                self._param_prec(gi, f"param_groups[{gi}]['params'][{pi}]", p, opts, None, keys, None)

    def _retype_initial_state(self) -> None:
        """State torch made in its constructor (Adagrad's "sum", in the param dtype): for 16-bit params, remade in
        the group's state dtype from its initial value (not rounded through the param dtype)."""
        for gi, group in enumerate(self.param_groups):
            opts = self._group_prec(gi, group)
            for p in group["params"]:
                st = self.state.get(p)
                if p.dtype not in _HALF or not st:
                    continue
                sd = getattr(torch, resolve_state_dtype(dtype_name(p.dtype), opts["state_dtype"]))
                for key, init in self._state_spec(group):
                    v = st.get(key)
                    if key != "step" and isinstance(v, torch.Tensor) and v.shape == p.shape and v.dtype != sd:
                        value = init(self, group) if callable(init) else _number(group["lr"]) if init == "lr" \
                            else float(init)
                        st[key] = torch.full_like(p, value, dtype=sd, memory_format=torch.preserve_format)

    def _group_prec(self, gi: int, group: dict) -> dict:
        """A group's mixed-precision options, validated (errors name the group), cached while they hold."""
        cache = self.__dict__.setdefault("_optkern_prec", {})
        vals = tuple(group.get(k, self.defaults.get(k, v)) for k, v in _PREC_DEFAULTS.items())
        hit = cache.get(gi)
        if hit is not None and hit[0] == vals and hit[1] is group:
            return hit[2]
        try:
            opts = _prec_options(*vals)
        except (ValueError, TypeError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
        cache[gi] = (vals, group, opts)
        return opts

    def _param_prec(self, gi: int, name: str, p: torch.Tensor, opts: dict, st, keys, copies) -> _Prec:
        """The 16-bit storage of param p's call: its state dtype (the existing state's, else the group's choice),
        master mode, stochastic rounding and copy dtype; ValueError naming the group's keyword if they conflict."""
        half = p.dtype in _HALF
        copy = copies.get(id(p)) if copies else None
        mode = opts["master_weights"] if half else None
        if mode == "split" and p.dtype != torch.bfloat16:
            raise ValueError(f"param_groups[{gi}]['master_weights']: 'split' needs bfloat16 params (the float32 "
                             f"master's high half), {name} is {p.dtype}; use 'fp32'")
        sd = p.dtype
        if half:
            have = [st[k] for k in keys if st and isinstance(st.get(k), torch.Tensor)]
            if have:
                sd = have[0].dtype
                if sd not in (p.dtype, torch.float32, torch.bfloat16):
                    k = next(k for k in keys if st.get(k) is have[0])
                    raise ValueError(f"{name}: state[{k!r}] is {sd}; the state of {p.dtype} params is float32, "
                                     f"bfloat16 or {p.dtype}")
            else:
                try:
                    sd = getattr(torch, resolve_state_dtype(dtype_name(p.dtype), opts["state_dtype"]))
                except ValueError as e:
                    raise ValueError(f"param_groups[{gi}]['state_dtype'] for {name}: {e}") from None
        return _Prec(sd, mode, bool(opts["stochastic_rounding"]) and half, opts["seed"],
                     None if copy is None else copy[0].dtype)

    def _group_hyper(self, gi: int, group: dict):
        """The validated hyperparameter struct of a group, rebuilt only when one of its values changed (a value
        that is a tensor, e.g. a tensor lr a scheduler fills in place, is read every step)."""
        cache = self.__dict__.setdefault("_optkern_hyper", {})
        vals = tuple(group.get(k) for k in self._hyper_keys)
        hit = cache.get(gi)
        if hit is not None and hit[0] == vals and hit[1] is group:
            return hit[2]
        h = self._build_group_hyper(gi, group)
        if not any(isinstance(v, (torch.Tensor, list)) or (isinstance(v, tuple) and any(
                isinstance(x, torch.Tensor) for x in v)) for v in vals):
            cache[gi] = (vals, group, h)
        return h

    def _build_group_hyper(self, gi: int, group: dict):
        if group.get("differentiable", False):
            raise ValueError(f"param_groups[{gi}]['differentiable']: True is not supported by optkern.torch")
        try:
            lr = _number(group["lr"])
            return build_hyper(self._algo, **self._hyper_kwargs(group, lr))
        except (ValueError, TypeError, OverflowError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None

    def _check_grad(self, name: str, p: torch.Tensor, g: torch.Tensor) -> None:
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name}.grad)")
        if p.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name}: optkern.torch.{type(self).__name__} supports float32, float64, bfloat16 and "
                            f"float16 params, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"{name}.grad: expected {p.dtype} like the param, got {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{name}.grad: expected shape {tuple(p.shape)} like the param, got {tuple(g.shape)}")
        if g.device != p.device:
            raise ValueError(f"{name}.grad: expected a tensor on {p.device} like the param, got {g.device}")
        if not _dense(p):
            raise ValueError(f"{name}: expected a dense param (no gaps or repeated elements in memory), got strides "
                             f"{p.stride()}")
        if not _same_layout(g, p):
            raise ValueError(f"{name}.grad: has strides {g.stride()}, the param {p.stride()}; the fused step needs "
                             f"the grad in the param's memory layout")

    def _check_state(self, name: str, p: torch.Tensor, st: dict, keys, prec: _Prec | None = None) -> None:
        """The state tensors (and the master) a call reads: like the param, in the call's state dtype (a 16-bit
        param's state may be float32, bfloat16 or its own dtype, one dtype for all its state)."""
        want = {k: (p.dtype if prec is None else prec.state_dtype) for k in keys}
        if prec is not None and prec.master is not None:
            want[_MASTER_KEY[prec.master]] = _MASTER_DTYPE[prec.master]
        for k, dt in want.items():
            v = st.get(k)
            if v is None:
                continue  # created like torch's initial value in the write phase
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}: state[{k!r}] is a {type(v).__name__}, expected a tensor")
            if v.shape != p.shape or v.dtype != dt or v.device != p.device or not _same_layout(v, p):
                raise ValueError(f"{name}: state[{k!r}] has shape {tuple(v.shape)}, {v.dtype} on {v.device}, strides "
                                 f"{v.stride()}; expected the param's {tuple(p.shape)}, {dt} on {p.device}, "
                                 f"strides {p.stride()}")

    def _steps_taken(self, name: str, st: dict | None) -> tuple[int, object]:
        """(steps taken so far, the step tensor's (dtype, device) or None) from torch's state["step"].  A step
        tensor on a CUDA device (capturable / fused) is not read (no sync): its count is -1, and the kernel reads
        and advances it on the device."""
        if not st or "step" not in st:
            return 0, None
        s = st["step"]
        if isinstance(s, torch.Tensor) and s.device.type == "cuda":
            if s.numel() != 1 or s.dtype not in _COUNTER_DTYPES:
                raise ValueError(f"{name}: state['step'] is a {s.dtype} tensor of {s.numel()} elements on {s.device}; "
                                 f"expected one float32 or float64 element")
            return _DEVICE_COUNT, (s.dtype, s.device)
        v = _number(s)
        if not (math.isfinite(v) and v >= 0 and v == int(v) and v < 2.0 ** 53):
            raise ValueError(f"{name}: state['step'] = {v} is not a step count")
        if isinstance(s, torch.Tensor):
            if s.numel() != 1:
                raise ValueError(f"{name}: state['step'] has {s.numel()} elements, expected one")
            return int(v), (s.dtype, s.device)
        return int(v), None

    def _amp_args(self, device_counts: bool = False):
        """-> (skip, grad multiplier, device multiplier or None, device found_inf or None) from GradScaler's
        ``grad_scale`` (loss scale, a divisor) and ``found_inf`` attributes.  device_counts: every count of this
        step lives on the device (capturable / fused step tensors), so a device found_inf is handed to the kernel,
        which skips the update and the count advance alike (no sync)."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip, mult, mult_dev, fi_dev = False, 1.0, None, None
        if found_inf is not None:
            if isinstance(found_inf, torch.Tensor) and found_inf.device.type == "cuda" and device_counts:
                fi_dev = found_inf.detach().to(torch.float32).reshape(1)
            elif isinstance(found_inf, torch.Tensor) and found_inf.device.type != "cpu":
                # A device flag with host step counters: read it (one sync, as torch's non-capturable paths do)
                # to keep the counts exact.
                skip = bool(found_inf.item())
            else:
                skip = bool(_number(found_inf))
        if grad_scale is not None:
            if isinstance(grad_scale, torch.Tensor) and grad_scale.device.type == "cuda":
                mult_dev = torch.reciprocal(grad_scale.detach().to(torch.float32).reshape(1))
            else:
                s = _number(grad_scale)
                if not (math.isfinite(s) and s > 0):
                    raise ValueError(f"grad_scale: expected a finite loss scale > 0, got {s}")
                mult = 1.0 / s
        return skip, mult, mult_dev, fi_dev

    def _fused_step(self, copies=None) -> None:
        plans = self.__dict__.get("_optkern_plans")
        if plans is not None and self._fast_step(plans, copies):
            return
        self.__dict__.pop("_optkern_plans", None)
        if self._general_step(copies):
            self.__dict__["_optkern_plans"] = self._build_plans(copies)

    # ---- the cached path: one PointerPlan per (group, dtype, device, step count) -------------------------------
    def _fast_step(self, plans: "_Plans", copies=None) -> bool:
        """Step through the cached plans; False (nothing touched) when they no longer describe the optimizer."""
        if plans.state is not self.state or plans.state_len != len(self.state) \
                or len(self.param_groups) != len(plans.groups):
            return False
        hypers = []
        for gi, group in enumerate(self.param_groups):
            lst, ids, keys, opts = plans.groups[gi]  # the plans hold every param, so their ids stay unique
            if group["params"] is not lst or list(map(id, lst)) != ids:
                return False
            hypers.append(self._group_hyper(gi, group))
            if self._kernel_state_keys(group) != keys or self._group_prec(gi, group) is not opts:
                return False
        for p in plans.idle:
            if p.grad is not None:
                return False
        entries = plans.entries
        if (copies or plans.copies) and not _same_copies(entries, copies or {}):
            return False  # other copies (or none now): the general path steps and plans them
        try:
            for e in entries:
                if e.plan.gather(float(e.taken)) != -1:
                    raise LookupError  # a param without grad, or a stale plan: the general path decides
        except (LookupError, TypeError, ValueError, RuntimeError):
            # Nothing was written.  The general path re-validates everything and raises the canonical error
            # (naming the param as the caller's groups hold it) or steps and rebuilds the plans.
            for x in entries:
                x.plan.release_grads()
            return False
        skip, mult, mult_dev, fi_dev = self._amp_args(
            self._has_step_tensor and all(e.taken == _DEVICE_COUNT for e in entries))
        if skip:
            for x in entries:
                x.plan.release_grads()
            return True
        for e in entries:
            group = self.param_groups[e.gi]
            gs = _on_device(mult_dev, e.device)  # GradScaler's scalars live on one device: a copy per device
            fi = _on_device(fi_dev, e.device)
            self._plan_call(e, hypers[e.gi], mult, bool(group["maximize"]), _stream(e.device),
                            0 if gs is None else gs.data_ptr(), 0 if fi is None else fi.data_ptr())
            if e.taken != _DEVICE_COUNT:
                e.taken += 1
            torch.autograd.graph.increment_version(e.bump)
        self._after_step({e.gi for e in entries})
        if mult != 1.0 or mult_dev is not None:
            _unscale_grads([p.grad for e in entries for p in e.params], mult, mult_dev)
        return True

    def _plan_call(self, e, hyper, mult, maximize, stream, gs_ptr, fi_ptr):
        type(self)._plan_step(e.plan, hyper, self._kernel_step(self.param_groups[e.gi], e.taken, e.prec), mult,
                              maximize, stream, gs_ptr, fi_ptr)

    def _kernel_step(self, group, taken, prec) -> int:
        """The kernel's ``step``: steps taken + 1 (1 with device counts, which the kernel reads itself)."""
        return 1 if taken == _DEVICE_COUNT else taken + 1

    def _after_step(self, groups_run) -> None:
        """After a step that ran (not skipped) over the groups of index groups_run."""

    def _build_plans(self, copies=None):
        """Plans for the next steps, when every param with a grad has torch's state and host step counters."""
        entries, idle, groups = [], [], []
        for gi, group in enumerate(self.param_groups):
            keys = self._kernel_state_keys(group)
            opts = self._group_prec(gi, group)
            groups.append((group["params"], list(map(id, group["params"])), keys, opts))
            buckets: dict = {}
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    idle.append(p)
                    continue
                if not (keys or self._has_step_tensor or (p.dtype in _HALF and opts["master_weights"])):
                    st = {}  # nothing kept per param (SGD without momentum: torch keeps no state either)
                else:
                    st = self.state.get(p)
                    if not st or any(st.get(k) is None for k in keys):
                        return None
                if self._has_step_tensor:
                    s = st.get("step")
                    if not (isinstance(s, torch.Tensor) and s.dtype in _COUNTER_DTYPES and s.numel() == 1
                            and s.device.type in ("cpu", p.device.type)):
                        return None
                    # device-resident (capturable / fused) counts are never read here: the kernel's
                    taken, cdt = (_DEVICE_COUNT if s.device.type == "cuda" else int(s.item())), s.dtype
                else:
                    taken, cdt = self._sgd_taken(st), None
                extra = self._bucket_extra(st)
                if not self._plannable(st):
                    return None
                name = f"param_groups[{gi}]['params'][{pi}]"
                prec = self._param_prec(gi, name, p, opts, st, keys, copies)
                if prec.master is not None and st.get(_MASTER_KEY[prec.master]) is None:
                    return None
                key = (p.dtype, p.device, taken, cdt, extra, prec.key())
                buckets.setdefault(key, []).append((name, p, st, prec))
            for (dtype, device, taken, cdt, extra, _), items in buckets.items():
                entries.append(self._make_plan(gi, keys, device, taken, cdt, items, copies))
        return _Plans(self.state, len(self.state), groups, entries, idle, bool(copies))

    def _make_plan(self, gi, keys, device, taken, cdt, items, copies=None):
        ps = [p for _, p, _, _ in items]
        sts = [st for _, _, st, _ in items]
        prec = items[0][3]
        cps = [copies[id(p)][0] for p in ps] if prec.copy_dtype is not None else None
        lists = [[st[k] for st in sts] for k in keys]
        mkey = [_MASTER_KEY[prec.master]] if prec.master is not None else []
        watch = list(keys) + (["step"] if self._has_step_tensor else []) + list(self._watch_extra) + mkey
        counters = [st["step"].data_ptr() for st in sts] if self._has_step_tensor else []
        storage = prec.storage(ps, sts, cps)
        plan = _C.PointerPlan(ps, [p.detach() for p in ps], [p.grad.detach() for p in ps],
                              [[t.detach() for t in lst] for lst in lists], list(keys), _stream(device), counters,
                              cdt == torch.float64, [p.is_contiguous() for p in ps], [p.stride() for p in ps],
                              [p.shape for p in ps], ps[0].dtype, sts, watch, [[st.get(k) for k in watch] for st in sts],
                              taken == _DEVICE_COUNT, **storage)
        plan.release_grads()
        bump = list(ps)
        for k in self._scalar_keys + tuple(mkey):
            lists.append([st[k] for st in sts])
        if cps is not None:
            lists.append(cps)
        for lst in lists:  # state allocated by this front end shares one base per kind: one bump covers it
            base = lst[0]._base
            bump += [base] if base is not None and all(t._base is base for t in lst) else lst
        e = _PlanEntry(gi, keys, plan, taken, bump, device, [n for n, _, _, _ in items], ps)
        e.prec, e.copies = prec, cps
        self._plan_extra(e, sts)
        return e

    def _plan_extra(self, e, sts) -> None:
        pass

    def _plannable(self, st) -> bool:
        return True

    # ---- the general path --------------------------------------------------------------------------------------
    def _general_step(self, copies=None) -> bool:
        """Validate every group, then write.  True when a plan can be built for the next steps."""
        # 1. Validate every group before anything is written.
        work = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._group_hyper(gi, group)
            keys = self._kernel_state_keys(group)
            opts = self._group_prec(gi, group)
            buckets: dict = {}
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                name = f"param_groups[{gi}]['params'][{pi}]"
                self._check_grad(name, p, g)
                st = self.state.get(p)
                prec = self._param_prec(gi, name, p, opts, st, keys, copies)
                if st:
                    self._check_state(name, p, st, keys, prec)
                taken, counter = self._steps_taken(name, st) if self._has_step_tensor else (self._sgd_taken(st), None)
                key = (p.dtype, p.device, taken, counter, self._bucket_extra(st), prec.key())
                buckets.setdefault(key, []).append((name, p, g, prec))
            if buckets:
                work.append((gi, group, hyper, keys, buckets))
        device_counts = bool(work) and self._has_step_tensor and all(
            key[2] == _DEVICE_COUNT for _, _, _, _, buckets in work for key in buckets)
        skip, mult, mult_dev, fi_dev = self._amp_args(device_counts)
        if not work or skip:
            return False
        calls = []
        for gi, group, hyper, keys, buckets in work:
            for (dtype, device, taken, counter, extra, _), items in buckets.items():
                calls.append((group, hyper, keys, device, taken, counter, extra, items))
        if len(calls) > 1 or copies:  # the C layer's checks (aliasing, alignment) for every call before the first
            for group, hyper, keys, device, taken, counter, extra, items in calls:
                self._c_check(keys, items, device, copies)
        # 2. Write: lazy state (one buffer per state kind for the params starting together, in the call's state
        #    dtype), the masters a mode needs, then one kernel call per (group, dtype, device, step count, storage).
        for group, hyper, keys, device, taken, counter, extra, items in calls:
            prec = items[0][3]
            stateful = bool(keys) or self._has_step_tensor or prec.master is not None
            fresh = [p for _, p, _, _ in items if stateful and (not self.state.get(p)
                     or (self._has_step_tensor and "step" not in self.state[p]))]
            if fresh:
                for p, st in zip(fresh, self._new_states(group, fresh, dtype=prec.state_dtype)):
                    self.state[p].update(st)
            states = []
            for name, p, g, _ in items:
                st = self.state[p] if stateful else {}
                for k in keys:
                    if st.get(k) is None:  # a buffer a changed hyperparameter now needs (e.g. amsgrad)
                        st[k] = self._new_states(group, [p], only=k, dtype=prec.state_dtype)[0][k]
                states.append(st)
            if prec.master is not None:
                mk = _MASTER_KEY[prec.master]
                new = [(p, st) for (_, p, _, _), st in zip(items, states) if st.get(mk) is None]
                if new:
                    for (p, st), m in zip(new, _new_masters([p for p, _ in new], prec.master)):
                        st[mk] = m
            cps = [copies[id(p)][0] for _, p, _, _ in items] if prec.copy_dtype is not None else None
            self._run(group, hyper, keys, device, taken, items, states, mult, mult_dev, fi_dev, cps)
        self._after_step({gi for gi, _, _, _, _ in work})
        if mult != 1.0 or mult_dev is not None:
            _unscale_grads([g for call in calls for _, _, g, _ in call[-1]], mult, mult_dev)
        return True

    # ---- state as torch initialises it, each kind in one buffer for the params that start together ----------------
    def _new_states(self, group, ps, only=None, dtype=None) -> list:
        out = [{} for _ in ps]
        for key, init in self._state_spec(group):
            if only is not None and key != only:
                continue
            if init in ("step", "one"):  # 0-d tensors as torch makes them, as views of one buffer
                for d, t in zip(out, _scalars(group, ps, self._fused_capable and init == "step",
                                              0.0 if init == "step" else 1.0)):
                    d[key] = t
            else:
                value = _number(group["lr"]) if init == "lr" else init(self, group) if callable(init) \
                    else float(init)
                for d, t in zip(out, _filled_like(ps, value, dtype)):
                    d[key] = t
        return out

    def _c_check(self, keys, items, device, copies=None) -> None:
        ps = [p.detach() for _, p, _, _ in items]
        gs = [g.detach() for _, _, g, _ in items]
        prec = items[0][3]

        def entry(p, k, dtype):  # a missing buffer is validated as a fresh tensor like the one it will be
            st = self.state.get(p)
            if st and st.get(k) is not None:
                return st[k].detach()
            return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)

        lists = [[entry(p, k, prec.state_dtype) for _, p, _, _ in items] for k in keys]
        mk = _MASTER_KEY.get(prec.master)
        masters = [{mk: entry(p, mk, _MASTER_DTYPE[prec.master])} if mk else {} for _, p, _, _ in items]
        storage = prec.storage(ps, masters,
                               [copies[id(p)][0] for _, p, _, _ in items] if prec.copy_dtype is not None else None)
        stream = _stream(device)
        self._translate(lambda: _C.check_arrays(ps, gs, lists, list(keys), len(keys), stream, **storage), keys, items,
                        prec)

    @staticmethod
    def _translate(fn, keys, items, prec=None):
        """Run fn; a C-layer ValueError/TypeError naming 'params[i]' / 'grads[i]' / '<state>[i]' / 'masters[i]' /
        'param_copies[i]' of this call is re-raised naming the caller's param."""
        try:
            return fn()
        except (ValueError, TypeError) as e:
            msg = str(e)
            m = _NAME_RE.match(msg)
            if m and int(m.group(2)) < len(items):
                kind, i = m.group(1), int(m.group(2))
                name = items[i][0]
                if kind == "masters" and prec is not None and prec.master is not None:
                    kind = _MASTER_KEY[prec.master]
                who = name if kind == "params" else f"{name}.grad" if kind == "grads" else \
                    f"param_copies (the copy of {name})" if kind == "param_copies" else f"{name}: state[{kind!r}]"
                msg = who + msg[m.end():]
            raise type(e)(msg) from None

    def _run(self, group, hyper, keys, device, taken, items, states, mult, mult_dev, fi_dev, copies=None):
        ps = [p.detach() for _, p, _, _ in items]
        gs = [g.detach() for _, _, g, _ in items]
        prec = items[0][3]
        lists = [[st[k].detach() for st in states] for k in keys]
        counters, counters_f64, bump_after = self._counters(states)
        on_device = self._device_steps(states)
        args = (ps, gs, lists, list(keys), hyper, 1 if on_device else self._kernel_step(group, taken, prec))
        kw = dict(grad_scale=mult, maximize=bool(group["maximize"]), stream=_stream(device),
                  grad_scale_device=_on_device(mult_dev, device), found_inf_device=_on_device(fi_dev, device))
        if on_device:  # torch's capturable/fused step tensors (also fresh ones): read and advanced by the kernel
            kw["step_counters"] = [st["step"].detach() for st in states]
        else:
            kw.update(counters=counters, counters_f64=counters_f64)
        kw.update(self._extra_kwargs(states))
        kw.update(prec.storage(ps, states, copies))
        r = self._translate(lambda: self._c_step(*args, **kw), keys, items, prec)
        if bump_after:  # counters neither in host memory nor device counters (e.g. a mix, or Python numbers)
            torch._foreach_add_(bump_after, 1.0)
        scalars = [st[k] for st in states for k in self._scalar_keys if isinstance(st.get(k), torch.Tensor)]
        written = [st[_MASTER_KEY[prec.master]] for st in states] if prec.master is not None else []
        torch.autograd.graph.increment_version(ps + [t for lst in lists for t in lst] + scalars + written
                                               + list(copies or ()))
        return r

    def _device_steps(self, states) -> bool:
        """Every step tensor of the call is on a CUDA device (torch's capturable / fused state)."""
        return self._has_step_tensor and all(
            isinstance(st["step"], torch.Tensor) and st["step"].device.type == "cuda" for st in states)

    def _counters(self, states):
        """Host addresses of the step tensors (advanced inside the kernel call), or the tensors to add 1 to."""
        if not self._has_step_tensor:
            return None, False, []
        if self._device_steps(states):
            return None, False, []  # device counters (the caller passes them as step_counters)
        steps = [st["step"] for st in states]
        if all(isinstance(s, torch.Tensor) and s.device.type == "cpu" and s.dtype in _COUNTER_DTYPES
               for s in steps) and len({s.dtype for s in steps}) == 1:
            return [s.data_ptr() for s in steps], _COUNTER_DTYPES[steps[0].dtype], []
        tensors = [s for s in steps if isinstance(s, torch.Tensor)]
        for st in states:
            if not isinstance(st["step"], torch.Tensor):
                st["step"] = torch.tensor(float(st["step"]) + 1.0, dtype=_scalar_dtype())
        return None, False, tensors

    def _extra_kwargs(self, states) -> dict:
        return {}

    def _bucket_extra(self, st):
        return None

    def _sgd_taken(self, st) -> int:  # pragma: no cover - SGD overrides
        return 0



def _unscale_grads(grads, mult: float, mult_dev) -> None:
    """Leave p.grad unscaled after a GradScaler step, as torch's fused optimizers do (their kernel writes the
    unscaled gradient back; optkern's only reads it, so this is a second pass over the grads, under AMP only)."""
    by_device: dict = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), gs in by_device.items():
        if mult_dev is not None and device.type == "cuda":
            torch._foreach_mul_(gs, mult_dev.to(device))
        else:
            torch._foreach_mul_(gs, mult)


class _PlanEntry:
    __slots__ = ("gi", "keys", "plan", "taken", "bump", "device", "names", "mu", "params", "prec", "copies")

    def __init__(self, gi, keys, plan, taken, bump, device, names, params):
        self.gi, self.keys, self.plan, self.taken, self.bump, self.device, self.names = \
            gi, keys, plan, taken, bump, device, names
        self.mu = None
        self.params = params
        self.prec = self.copies = None


class _Plans:
    """The cached step plans and what they assume of the optimizer (checked at every step)."""

    __slots__ = ("state", "state_len", "groups", "entries", "idle", "copies")

    def __init__(self, state, state_len, groups, entries, idle, copies=False):
        self.state, self.state_len, self.groups, self.entries, self.idle = state, state_len, groups, entries, idle
        self.copies = copies  # some plan writes param copies


def _same_copies(entries, copies: dict) -> bool:
    """The step's param copies are the plans' (the same tensors, for the same params, none elsewhere)."""
    n = 0
    for e in entries:
        if e.copies is None:
            continue
        for p, c in zip(e.params, e.copies):
            got = copies.get(id(p))
            if got is None or got[0] is not c:
                return False
            n += 1
    return n == len(copies)


_ALIGN = 16  # elements: each param's slice of a shared state buffer starts on a 64-byte boundary (float32)


def _filled_like(ps, value: float, dtype=None) -> list:
    """Tensors like each p (shape, strides, device; dtype: the params' unless given), filled with value, as views
    of one buffer."""
    sizes = [p.numel() for p in ps]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    flat = torch.full((max(total, 1),), value, dtype=dtype or ps[0].dtype, device=ps[0].device)
    return [flat.as_strided(p.shape, p.stride(), o) for p, o in zip(ps, offsets)]


def _new_masters(ps, mode: str) -> list:
    """The masters of a mode for 16-bit params, as views of one buffer: float32 copies of the params ("fp32"), or
    int16 zeros ("split": a bfloat16 value is exactly its own float32 master, the low half is 0)."""
    out = _filled_like(ps, 0, _MASTER_DTYPE[mode])
    if mode == "fp32":
        torch._foreach_copy_(out, [p.detach() for p in ps])
    return out


def _on_device(t, device):
    """A device scalar (GradScaler's scale / found_inf) on ``device``: itself, or a stream-ordered copy there."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


_CUDA_USABLE = None


def _cuda_usable() -> bool:
    global _CUDA_USABLE
    if _CUDA_USABLE is None:
        _CUDA_USABLE = bool(torch.cuda.is_available())
    return _CUDA_USABLE


def _stream(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.current_stream(device).cuda_stream)
    return 0


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _scalars(group, ps, fused_capable: bool, value: float) -> list:
    """torch's initial 0-d state scalars (state["step"], NAdam's "mu_product"): on the CPU in torch's scalar
    dtype, or on the params' device with capturable (or fused, float32), as views of one tensor (so that one
    version bump covers them)."""
    fused = fused_capable and group.get("fused")
    if group.get("capturable") or fused:
        dtype, device = (torch.float32 if fused else _scalar_dtype()), ps[0].device
    else:
        dtype, device = _scalar_dtype(), torch.device("cpu")
    flat = torch.full((len(ps),), value, dtype=dtype, device=device)
    return [flat[i] for i in range(len(ps))]


def _pair(v):
    a, b = v
    return _number(a), _number(b)


def _torch_signature(cls, torch_cls):
    """The class's constructor: torch's (its signature shown by help() and inspect) and the mixed-precision
    keywords (module docstring), refusing ``differentiable=True`` and bad mixed-precision options first; torch's
    docstring kept below optkern's."""
    def __init__(self, params, *args, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0,
                 **kwargs):
        _FusedStep._refuse_differentiable(kwargs)
        prec = _prec_options(state_dtype, master_weights, stochastic_rounding, seed)
        torch_cls.__init__(self, params, *args, **kwargs)
        # Stored where they differ from the defaults only: an optimizer made without them has torch's exact
        # defaults and group keys (and a group without a key reads the default).
        prec = {k: v for k, v in prec.items() if v != _PREC_DEFAULTS[k] or type(v) is not type(_PREC_DEFAULTS[k])}
        self.defaults.update(prec)
        for group in self.param_groups:
            for k, v in prec.items():
                group.setdefault(k, v)
        self._check_groups()
        self._retype_initial_state()

    __init__.__signature__ = inspect.signature(torch_cls.__init__)  # torch's (the keywords: the docstring)
    __init__.__qualname__ = f"{cls.__name__}.__init__"
    cls.__init__ = __init__
    cls.__doc__ = (cls.__doc__ or "") + "\n\ntorch's documentation:\n" + (torch_cls.__doc__ or "")
    return cls


# ---- the optimizers ---------------------------------------------------------------------------------------------
class SGD(_FusedStep, torch.optim.SGD):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize) on optkern's fused SGD kernel."""

    _algo, _c_step, _has_step_tensor = "sgd", _C.sgd_step, False
    _scalar_keys = ()
    _plan_step = _C.plan_sgd_step
    _hyper_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "differentiable")

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("momentum", "dampening", "weight_decay", "nesterov"), lr)

    def _kernel_state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _sgd_taken(self, st) -> int:
        # torch keeps no step count: a momentum buffer exists from the first step on (which copies the grad)
        return 1 if st and st.get("momentum_buffer") is not None else 0

    def _kernel_step(self, group, taken, prec) -> int:
        if prec is None or not prec.stochastic:
            return taken + 1
        # The rounding's key takes the step count, which torch's SGD does not keep: the group counts its steps in
        # group["sr_step"].  The rule itself only asks whether this is the momentum buffer's first step.
        return 1 if taken == 0 and group["momentum"] != 0 else 2 + int(group.get("sr_step", 0))

    def _after_step(self, groups_run) -> None:
        for gi in groups_run:
            group = self.param_groups[gi]
            if group.get("stochastic_rounding"):
                group["sr_step"] = int(group.get("sr_step", 0)) + 1

    def _state_spec(self, group):
        return (("momentum_buffer", 0.0),) if group["momentum"] != 0 else ()


class Adam(_FusedStep, torch.optim.Adam):
    """torch.optim.Adam (amsgrad, weight decay, decoupled_weight_decay, maximize) on optkern's fused Adam."""

    _algo, _c_step = "adam", _C.adam_step
    _plan_step = _C.plan_adam_step
    _hyper_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay", "differentiable")
    _fused_capable = True

    def _hyper_kwargs(self, group, lr):
        kw = _pick(group, ("eps", "weight_decay", "amsgrad", "decoupled_weight_decay"), lr)
        kw["betas"] = _pair(group["betas"])
        return kw

    def _kernel_state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _state_spec(self, group):
        spec = (("step", "step"), ("exp_avg", 0.0), ("exp_avg_sq", 0.0))
        return spec + (("max_exp_avg_sq", 0.0),) if group["amsgrad"] else spec


class AdamW(_FusedStep, torch.optim.AdamW):
    """torch.optim.AdamW (Adam with decoupled weight decay) on optkern's fused Adam kernel."""

    _algo, _c_step = "adam", _C.adam_step
    _plan_step = _C.plan_adam_step
    _hyper_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay", "differentiable")
    _fused_capable = True
    _hyper_kwargs = Adam._hyper_kwargs
    _kernel_state_keys = Adam._kernel_state_keys
    _state_spec = Adam._state_spec


class Adagrad(_FusedStep, torch.optim.Adagrad):
    """torch.optim.Adagrad (lr_decay, initial_accumulator_value, weight decay, maximize) on optkern's kernel."""

    _algo, _c_step = "adagrad", _C.adagrad_step
    _plan_step = _C.plan_adagrad_step
    _hyper_keys = ("lr", "lr_decay", "weight_decay", "eps", "differentiable")
    _fused_capable = True

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("lr_decay", "weight_decay", "eps"), lr)

    def _kernel_state_keys(self, group):
        return ("sum",)

    def _state_spec(self, group):  # torch creates it in __init__; for groups added later from the defaults, as torch
        return (("step", "step"), ("sum", lambda opt, g: _number(opt.defaults["initial_accumulator_value"])))


class RMSprop(_FusedStep, torch.optim.RMSprop):
    """torch.optim.RMSprop (centered, momentum, weight decay, maximize) on optkern's fused RMSprop kernel."""

    _algo, _c_step = "rmsprop", _C.rmsprop_step
    _plan_step = _C.plan_rmsprop_step
    _hyper_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "differentiable")

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("alpha", "eps", "weight_decay", "momentum", "centered"), lr)

    def _kernel_state_keys(self, group):
        keys = ("square_avg",)
        if group["centered"]:
            keys += ("grad_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        return keys

    def _state_spec(self, group):
        spec = (("step", "step"), ("square_avg", 0.0))
        if group["momentum"] > 0:
            spec += (("momentum_buffer", 0.0),)
        if group["centered"]:
            spec += (("grad_avg", 0.0),)
        return spec


class Adamax(_FusedStep, torch.optim.Adamax):
    """torch.optim.Adamax (weight decay, maximize) on optkern's fused Adamax kernel."""

    _algo, _c_step = "adamax", _C.adamax_step
    _plan_step = _C.plan_adamax_step
    _hyper_keys = ("lr", "betas", "eps", "weight_decay", "differentiable")

    def _hyper_kwargs(self, group, lr):
        kw = _pick(group, ("eps", "weight_decay"), lr)
        kw["betas"] = _pair(group["betas"])
        return kw

    def _kernel_state_keys(self, group):
        return ("exp_avg", "exp_inf")

    def _state_spec(self, group):
        return (("step", "step"), ("exp_avg", 0.0), ("exp_inf", 0.0))


class NAdam(_FusedStep, torch.optim.NAdam):
    """torch.optim.NAdam (momentum_decay, decoupled_weight_decay, maximize) on optkern's fused NAdam kernel.

    The running product of the momentum coefficients lives in ``state["mu_product"]`` as in torch; when that
    tensor is float32 (torch's default) the product is rounded to float32 after each step exactly as torch's
    in-place multiply rounds it, so float64 params follow torch to float64 rounding."""

    _algo, _c_step = "nadam", _C.nadam_step
    _plan_step = _C.plan_nadam_step
    _hyper_keys = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "differentiable")

    def _hyper_kwargs(self, group, lr):
        kw = _pick(group, ("eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"), lr)
        kw["betas"] = _pair(group["betas"])
        return kw

    def _kernel_state_keys(self, group):
        return ("exp_avg", "exp_avg_sq")

    def _state_spec(self, group):
        return (("step", "step"), ("mu_product", "one"), ("exp_avg", 0.0), ("exp_avg_sq", 0.0))

    def _bucket_extra(self, st):
        if not st or "mu_product" not in st:
            return (1.0, _scalar_dtype(), torch.device("cpu"))
        mp = st["mu_product"]
        if isinstance(mp, torch.Tensor) and mp.device.type == "cuda":  # read and advanced on the device
            if mp.numel() != 1 or mp.dtype not in _COUNTER_DTYPES:
                raise ValueError(f"state['mu_product'] is a {mp.dtype} tensor of {mp.numel()} elements; expected "
                                 f"one float32 or float64 element")
            return (None, mp.dtype, mp.device)
        if isinstance(mp, torch.Tensor):
            if mp.numel() != 1:
                raise ValueError(f"state['mu_product'] has {mp.numel()} elements, expected one")
            return (_number(mp), mp.dtype, mp.device)
        return (float(mp), None, None)

    def _extra_kwargs(self, states):
        mp = states[0]["mu_product"]
        if self._device_steps(states):
            products = [st["mu_product"] for st in states]
            if not all(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in products):
                raise ValueError("state['mu_product']: with step tensors on the device (capturable) the products "
                                 "must be device tensors too")
            return {"mu_product": 1.0, "mu_product_counters": [t.detach() for t in products]}
        kw = {"mu_product": _number(mp)}
        products = [st["mu_product"] for st in states]
        if all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in _COUNTER_DTYPES
               for t in products) and len({t.dtype for t in products}) == 1:
            kw.update(mu_product_float32=products[0].dtype == torch.float32,
                      mu_products=[t.data_ptr() for t in products],
                      mu_products_f64=products[0].dtype == torch.float64)
        else:
            kw["mu_product_float32"] = isinstance(mp, torch.Tensor) and mp.dtype == torch.float32
        return kw

    _watch_extra = ("mu_product",)
    _scalar_keys = ("step", "mu_product")

    def _plannable(self, st) -> bool:
        t, s = st.get("mu_product"), st.get("step")
        return (isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and t.device == s.device
                and t.dtype in _COUNTER_DTYPES and t.numel() == 1)

    def _plan_extra(self, e, sts) -> None:
        products = [st["mu_product"] for st in sts]
        dt = products[0].dtype
        e.mu = (products[0], dt == torch.float32, [t.data_ptr() for t in products], dt == torch.float64)
        if e.taken == _DEVICE_COUNT:  # (one product dtype per plan: _bucket_extra keys on it)
            e.plan.set_device_products(e.mu[2], dt == torch.float64)

    def _plan_call(self, e, hyper, mult, maximize, stream, gs_ptr, fi_ptr):
        first, f32, addrs, f64 = e.mu
        if e.taken == _DEVICE_COUNT:  # the products live on the device: never read here
            _C.plan_nadam_step(e.plan, hyper, 1, 1.0, f32, [], f64, mult, maximize, stream, gs_ptr, fi_ptr)
            return
        _C.plan_nadam_step(e.plan, hyper, e.taken + 1, float(first.item()), f32, addrs, f64, mult, maximize, stream,
                           gs_ptr, fi_ptr)

    def _run(self, group, hyper, keys, device, taken, items, states, mult, mult_dev, fi_dev, copies=None):
        r = super()._run(group, hyper, keys, device, taken, items, states, mult, mult_dev, fi_dev, copies)
        if self._device_steps(states):
            return r  # the kernel advanced the device products
        for st in states:  # products not in host memory (capturable, on a device) or kept as Python floats
            t = st["mu_product"]
            if not isinstance(t, torch.Tensor):
                st["mu_product"] = torch.tensor(r, dtype=_scalar_dtype())
            elif t.device.type != "cpu":
                t.fill_(r)
        return r


class Adadelta(_FusedStep, torch.optim.Adadelta):
    """torch.optim.Adadelta (weight decay, maximize) on optkern's fused Adadelta kernel."""

    _algo, _c_step = "adadelta", _C.adadelta_step
    _plan_step = _C.plan_adadelta_step
    _hyper_keys = ("lr", "rho", "eps", "weight_decay", "differentiable")

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("rho", "eps", "weight_decay"), lr)

    def _kernel_state_keys(self, group):
        return ("square_avg", "acc_delta")

    def _state_spec(self, group):
        return (("step", "step"), ("square_avg", 0.0), ("acc_delta", 0.0))


class Rprop(_FusedStep, torch.optim.Rprop):
    """torch.optim.Rprop (etas, step_sizes, maximize) on optkern's fused Rprop kernel."""

    _algo, _c_step = "rprop", _C.rprop_step
    _plan_step = _C.plan_rprop_step
    _hyper_keys = ("lr", "etas", "step_sizes", "differentiable")

    def _hyper_kwargs(self, group, lr):
        return {"lr": lr, "etas": _pair(group["etas"]), "step_size_limits": _pair(group["step_sizes"])}

    def _kernel_state_keys(self, group):
        return ("prev", "step_size")

    def _state_spec(self, group):
        return (("step", "step"), ("prev", 0.0), ("step_size", "lr"))


class _TorchOGR(torch.optim.Optimizer):
    """OGR as torch.optim would write it (torch has none): the constructor, defaults and group keys, with torch's
    implementation keywords (``foreach``, ``capturable``, ``differentiable``) stored as the other classes store
    them.  Hyperparameters are checked by the same builder as :func:`optkern.ogr_step` (ValueError / TypeError
    naming the argument)."""

    def __init__(self, params, lr=0.5, sgd_lr=1e-3, beta=0.9, warmup=5, trust=2.0, eps=1e-6, weight_decay=0.0, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False):
        build_hyper("ogr", lr=lr, sgd_lr=sgd_lr, beta=beta, warmup=warmup, trust=trust, eps=eps,
                    weight_decay=weight_decay)
        defaults = dict(lr=lr, sgd_lr=sgd_lr, beta=beta, warmup=warmup, trust=trust, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in (("maximize", False), ("foreach", None), ("capturable", False), ("differentiable", False)):
                group.setdefault(k, v)


class OGR(_FusedStep, _TorchOGR):
    """OGR, online gradient linear regression (seed 002; :func:`optkern.ogr_step` has the formulas, guards and
    parameters), as a ``torch.optim.Optimizer`` on optkern's fused OGR kernel.  There is no torch.optim
    counterpart: the class follows the conventions of the others here (state in ``state[p]``, ``step`` a float32
    tensor, AMP, plans, mixed precision).  State per param: ``step``, ``mean_param``, ``mean_grad``, ``var_param``,
    ``cov_grad_param``, ``last_step``."""

    _algo, _c_step = "ogr", _C.ogr_step
    _plan_step = _C.plan_ogr_step
    _hyper_keys = ("lr", "sgd_lr", "beta", "warmup", "trust", "eps", "weight_decay", "differentiable")

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("sgd_lr", "beta", "warmup", "trust", "eps", "weight_decay"), lr)

    def _kernel_state_keys(self, group):
        return tuple(k for k, _ in OGR_STATE_SPEC)

    def _state_spec(self, group):
        return (("step", "step"),) + OGR_STATE_SPEC


for _cls in (SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, Adadelta, Rprop, OGR):
    _torch_signature(_cls, _cls.__mro__[2])
del _cls
