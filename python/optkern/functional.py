"""The functional layer: one fused step per algorithm, on one array or on lists of arrays.

Every function updates ``params`` and the state arrays in place, in one pass over memory (every element of
param, grad and state read once and written once), and returns nothing (NAdam returns its running momentum
product).  ``step`` counts steps including this one (1 on the first step), like torch's ``state["step"]``.

Common keywords:
    grad_multiplier: multiplies the gradient inside the pass (a global-norm clip coefficient from
        :func:`optkern.clip_grad_norm`, or an AMP unscale 1/loss_scale).  A finite number, or a one-element
        float32 CUDA array (read on the device, no host sync).  It was called ``grad_scale`` before; that name is
        refused (TypeError), because torch's ``grad_scale`` (GradScaler, fused optimizers) is the loss scale, a
        divisor of the gradient.
    found_inf: when true, nothing is changed (the step is skipped, after every argument has been checked).  A
        bool, or a one-element float32 CUDA array read by the kernel (non-zero skips).
    maximize: ascend instead of descend (torch's ``maximize``).

Numbers: hyperparameters are real numbers (int, float, a NumPy integer or floating scalar, any
``numbers.Real``); a bool, a string, an array or None is refused with a TypeError naming the argument, and a
value out of float range with a ValueError.  ``step`` is an integer (Python or NumPy, not a bool or a float)
>= 1 and < 2**62.

Step counts kept in an array: ``step`` may instead be a one-element float32 or float64 array on the params' device
(CUDA or CPU) holding the count of steps *taken* so far (torch's ``state["step"]`` / ``state_steps``, 0 before the
first step), one for all params or a list with one per param.  The step reads it, computes this step's
coefficients from it + 1 (on a GPU: on the device, with the same code and in the same order as the host, so CPU
and GPU agree bit for bit) and advances it by one after the update, unless ``found_inf`` is true or, on a GPU, a
non-zero device flag; then nothing changes, the count included (as torch's capturable optimizers do).  On a GPU
nothing is read back to the host, so such a step can be captured in a CUDA graph and replayed (after one eager
warm-up step with the same params and states, which uploads the step's work plan).  A host ``step`` with a device
``found_inf`` is allowed, but the caller's count then advances even when the step is skipped; keep the count in an
array to avoid that.  NAdam's ``mu_product`` is then a one-element array too (advanced the same way).

All arrays of one call share a device; grads and states match their param's shape and layout.  Bad input raises
ValueError or TypeError naming the argument before anything is written.

Dtypes and 16-bit training (the roundings are defined once, in ``csrc/optkern/precision.h``; see
:mod:`optkern.precision`):
    params: float32, float64, bfloat16 or float16, one dtype per call.  16-bit params are computed in float32:
        each element is widened, updated by the same rule as float32 params and rounded back.
    grads: the params' dtype, or bfloat16/float16 for float32 params (the CPU-offload step).
    states: the params' dtype; for 16-bit params also float32 (the usual choice) or bfloat16.  One dtype for every
        state array of a call.
    master_weights (16-bit params): None (the float32 result rounded to nearest even into the param; torch's fused
        optimizers' behaviour), ``"fp32"`` (``masters=`` float32 arrays hold the master; the param is written as its
        rounding in the same pass) or ``"split"`` (bfloat16 params; ``masters=`` int16 arrays hold the float32
        master's low halves, the param its high half: the same master as ``"fp32"`` bit for bit, 2 bytes per
        element instead of 4).  :func:`optkern.init_masters` makes the arrays, :func:`optkern.master_values` reads
        the float32 master back.
    stochastic_rounding (16-bit params, master_weights None): round the param stochastically, from a Philox4x32-10
        stream keyed by ``seed`` and counted by (step, the tensor's position in the list, element): deterministic,
        the same on every instruction set, thread count and device.  On a GPU the step count must be a number
        (not a device counter).
    param_copies (float32 params): a list of bfloat16/float16 arrays written with the updated params rounded to
        nearest even, in the same pass (the offload step's 16-bit model copy).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _C
from ._arrays import as_list, current_stream, is_cuda, plain

_ndarray = np.ndarray

__all__ = [
    "sgd_step",
    "adam_step",
    "adamw_step",
    "adagrad_step",
    "rmsprop_step",
    "adamax_step",
    "nadam_step",
    "adadelta_step",
    "rprop_step",
    "ogr_step",
]


# ---- number checks (shared by the builders, the steps, optkern.optim, clip and schedules) -----------------------
MAX_STEP = 2**62  #: step counts are below this (the kernels take int64 and powers of beta in float64)


def _describe(v) -> str:
    """A short description of a refused value for an error message (never a 4000-digit integer)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"an integer of {v.bit_length()} bits (about 10**{int(v.bit_length() * 0.30103)})"
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def real_number(name: str, v, *, finite: bool = True) -> float:
    """``v`` as a float: an int, a float, a NumPy integer or floating scalar or another ``numbers.Real``.

    A bool (or ``numpy.bool_``), a string, None, an array or a tensor raises TypeError naming ``name``; an integer
    beyond float range raises ValueError, and so does a non-finite value when ``finite``.  Bools are refused
    although torch takes them as numbers in places: a bool where a number is due is a shifted argument.
    """
    t = type(v)
    if t is float:
        x = v
    elif t is int or (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))):
        try:
            x = float(v)
        except OverflowError:
            raise ValueError(f"{name}: expected a finite number, got {_describe(v)}, beyond float range") from None
    else:
        raise TypeError(f"{name}: expected a real number (int, float or NumPy scalar), got {_describe(v)}")
    if finite and not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    return x


def step_count(name: str, v) -> int:
    """``v`` as a step count: a Python or NumPy integer (not a bool, a float or a string), 1 <= v < 2**62."""
    if type(v) is not int:
        if isinstance(v, np.integer):
            v = int(v)
        else:
            raise TypeError(f"{name}: expected an integer (the count of steps including this one), got {_describe(v)}")
    if not 1 <= v < MAX_STEP:
        raise ValueError(f"{name}: expected an integer >= 1 and < 2**62 (the count of steps including this one), "
                         f"got {v if v.bit_length() <= 128 else _describe(v)}")
    return v


_RENAMED = ("grad_scale: renamed grad_multiplier in optkern's NumPy layer (it multiplies the gradient: "
            "clip_grad_norm's coefficient, or 1/loss_scale to unscale); torch's grad_scale (GradScaler, fused "
            "optimizers) is the loss scale, a divisor, so the old name is refused rather than guessed at")


def refuse_keywords(fn: str, kw: dict) -> None:
    """Raise the TypeError for keywords a step does not take (``grad_scale`` with the note that it was renamed)."""
    if "grad_scale" in kw:
        raise TypeError(_RENAMED)
    raise TypeError(f"{fn}() got an unexpected keyword argument {next(iter(kw))!r}")


_STORAGE_KEYS = ("masters", "master_weights", "param_copies", "stochastic_rounding", "seed")
_MAX_SEED = 2**64


def storage_args(kw: dict) -> dict:
    """Pop and check the 16-bit storage keywords (see the module docstring) from ``kw``: the binding's keywords."""
    st = {}
    for k in _STORAGE_KEYS:
        if k in kw:
            st[k] = kw.pop(k)
    if not st:
        return st
    mw = st.get("master_weights")
    if mw is not None and mw not in ("fp32", "split"):
        raise ValueError(f"master_weights: expected None, 'fp32' or 'split', got {mw!r}")
    if "masters" in st:
        st["masters"] = None if st["masters"] is None else _plain_list(st["masters"])
    if mw is not None and st.get("masters") is None:
        raise ValueError(f"masters: master_weights={mw!r} needs masters= (one array per param: float32 for 'fp32', "
                         f"int16 for 'split'; optkern.init_masters makes them)")
    if "param_copies" in st:
        st["param_copies"] = None if st["param_copies"] is None else _plain_list(st["param_copies"])
    sr = st.get("stochastic_rounding", False)
    if type(sr) not in (bool, np.bool_):
        raise TypeError(f"stochastic_rounding: expected a bool, got {_describe(sr)}")
    st["stochastic_rounding"] = bool(sr)
    seed = st.get("seed", 0)
    if type(seed) is not int and not isinstance(seed, np.integer) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed: expected an integer in [0, 2**64), got {_describe(seed)}")
    if not 0 <= int(seed) < _MAX_SEED:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {int(seed)}")
    st["seed"] = int(seed)
    return st


def _scalar_args(grad_multiplier, found_inf):
    """-> (skip, multiplier float, multiplier device array or None, found_inf device array or None)."""
    gm_dev = fi_dev = None
    if found_inf is None or found_inf is False:
        skip = False
    elif hasattr(found_inf, "__cuda_array_interface__") or _is_torch_cuda(found_inf):
        skip, fi_dev = False, found_inf
    else:
        skip = bool(found_inf)
    if type(grad_multiplier) is not float and (hasattr(grad_multiplier, "__cuda_array_interface__")
                                               or _is_torch_cuda(grad_multiplier)):
        gm, gm_dev = 1.0, grad_multiplier
    else:
        gm = real_number("grad_multiplier", grad_multiplier)
    return skip, gm, gm_dev, fi_dev


def _is_torch_cuda(x) -> bool:
    return type(x).__module__.startswith("torch") and getattr(getattr(x, "device", None), "type", None) == "cuda"


def check_device_scalars(params, gm_dev, fi_dev) -> None:
    """Device scalars go with CUDA params (checked here so that a step of several calls refuses before the first)."""
    if (gm_dev is not None or fi_dev is not None) and params and not is_cuda(params[0]):
        name = "grad_multiplier" if gm_dev is not None else "found_inf"
        raise ValueError(f"{name}: a device scalar is for CUDA arrays; pass a number (a bool for found_inf) on the "
                         f"CPU")


def c_message(e: Exception) -> Exception:
    """The compiled core's error with optkern's public names (its binding still calls the multiplier grad_scale)."""
    msg = str(e)
    if "grad_scale" not in msg:
        return e
    return type(e)(msg.replace("grad_scale", "grad_multiplier"))


def _plain_list(x) -> list:
    """One array or a list/tuple of arrays -> a list the binding reads (torch tensors that require grad detached);
    a list of NumPy arrays is passed through as it is."""
    if type(x) is list:
        for a in x:
            if type(a) is not _ndarray:
                return [plain(a) for a in x]
        return x
    return [plain(a) for a in as_list(x)]


def _lists(params, grads, states):
    return _plain_list(params), _plain_list(grads), [_plain_list(s) for s in states]


def _is_counter_array(x) -> bool:
    """An array given where a count is due (step=, NAdam's mu_product=): a counter the step reads and advances."""
    if isinstance(x, (bool, int, float, np.generic)):
        return False
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack__") or hasattr(x, "__array_interface__")


def _run(fn, params, grads, states, names, hyper, step, grad_multiplier, found_inf, maximize, **extra):
    if type(step) is not int or not 0 < step < MAX_STEP:
        if _is_counter_array(step) or (type(step) in (list, tuple) and step and _is_counter_array(step[0])):
            # the steps taken, in memory: read and advanced by the step itself
            extra["step_counters"] = [plain(c) for c in step] if type(step) in (list, tuple) else [plain(step)]
            step = 1
        else:
            step = step_count("step", step)
    if found_inf is None and type(grad_multiplier) is float and grad_multiplier == 1.0:
        skip, gm, gm_dev, fi_dev = False, grad_multiplier, None, None
    else:
        skip, gm, gm_dev, fi_dev = _scalar_args(grad_multiplier, found_inf)
    ps, gr, ss = _lists(params, grads, states)
    stream = current_stream(ps[0]) if ps else 0
    try:
        if skip:  # validate everything anyway, so that a skipped step still reports bad input
            check_device_scalars(ps, gm_dev, fi_dev)
            _C.check_arrays(ps, gr, ss, names, len(ss), stream,
                            **{k: extra[k] for k in _STORAGE_KEYS if k in extra})
            return None
        return fn(ps, gr, ss, names, hyper, step, grad_scale=gm, maximize=bool(maximize), stream=stream,
                  grad_scale_device=gm_dev, found_inf_device=fi_dev, **extra)
    except (ValueError, TypeError) as e:
        renamed = c_message(e)
        if renamed is e:
            raise
        raise renamed from None


def _pair(name, v):
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair of numbers, got {v!r}") from None
    return real_number(f"{name}[0]", a, finite=False), real_number(f"{name}[1]", b, finite=False)


def _f(name, v) -> float:
    """A hyperparameter field: type and float range checked here, its range by the core's check()."""
    return v if type(v) is float else real_number(name, v, finite=False)


# ---- hyperparameter builders (shared with optkern.optim and optkern.torch): kwargs -> validated C struct -------
_HYPER_CACHE: dict = {}


def build_hyper(algo: str, **kw):
    """The validated hyperparameter struct of ``algo`` ('sgd', 'adam', ...) from the functional keywords
    (except step/maximize/grad_multiplier/found_inf).  Raises TypeError for a value that is not a real number and
    ValueError for one out of range, naming the argument.

    Structs are memoized by their keywords and the keywords' types (a bool equals 1 but is refused), so a training
    loop calling a functional step with the same hyperparameters does not rebuild and re-check them every step."""
    try:
        key = (algo, tuple(kw.items()), tuple(map(type, kw.values())))
        hit = _HYPER_CACHE.get(key)
    except TypeError:  # an unhashable value (e.g. betas given as a list): build without the cache
        key, hit = None, None
    if hit is not None:
        return hit
    h = _BUILDERS[algo](**kw)
    _C.check_hyper(h)
    if key is not None:
        if len(_HYPER_CACHE) > 512:
            _HYPER_CACHE.clear()
        _HYPER_CACHE[key] = h
    return h


def _b_sgd(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, velocity=False):
    h = _C.SgdHyper()
    h.lr, h.momentum = _f("lr", lr), _f("momentum", momentum)
    h.dampening, h.weight_decay = _f("dampening", dampening), _f("weight_decay", weight_decay)
    h.nesterov, h.velocity = bool(nesterov), bool(velocity)
    return h


def _b_adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled_weight_decay=False,
            eps_inside_sqrt=False, bias_correction=True):
    h = _C.AdamHyper()
    h.beta1, h.beta2 = _pair("betas", betas)
    h.lr, h.eps, h.weight_decay = _f("lr", lr), _f("eps", eps), _f("weight_decay", weight_decay)
    h.amsgrad, h.decoupled_weight_decay = bool(amsgrad), bool(decoupled_weight_decay)
    h.eps_inside_sqrt, h.bias_correction = bool(eps_inside_sqrt), bool(bias_correction)
    return h


def _b_adagrad(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10):
    h = _C.AdagradHyper()
    h.lr, h.lr_decay = _f("lr", lr), _f("lr_decay", lr_decay)
    h.weight_decay, h.eps = _f("weight_decay", weight_decay), _f("eps", eps)
    return h


def _b_rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, eps_inside_sqrt=False,
               nesterov=False):
    h = _C.RmspropHyper()
    h.lr, h.alpha, h.eps = _f("lr", lr), _f("alpha", alpha), _f("eps", eps)
    h.weight_decay, h.momentum = _f("weight_decay", weight_decay), _f("momentum", momentum)
    h.centered, h.eps_inside_sqrt, h.nesterov = bool(centered), bool(eps_inside_sqrt), bool(nesterov)
    return h


def _b_adamax(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    h = _C.AdamaxHyper()
    h.beta1, h.beta2 = _pair("betas", betas)
    h.lr, h.eps, h.weight_decay = _f("lr", lr), _f("eps", eps), _f("weight_decay", weight_decay)
    return h


def _b_nadam(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
             decoupled_weight_decay=False, momentum_schedule=True):
    h = _C.NadamHyper()
    h.beta1, h.beta2 = _pair("betas", betas)
    h.lr, h.eps, h.weight_decay = _f("lr", lr), _f("eps", eps), _f("weight_decay", weight_decay)
    h.momentum_decay = _f("momentum_decay", momentum_decay)
    h.decoupled_weight_decay, h.momentum_schedule = bool(decoupled_weight_decay), bool(momentum_schedule)
    return h


def _b_adadelta(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
    h = _C.AdadeltaHyper()
    h.lr, h.rho, h.eps, h.weight_decay = _f("lr", lr), _f("rho", rho), _f("eps", eps), _f("weight_decay", weight_decay)
    return h


def _b_rprop(lr=1e-2, etas=(0.5, 1.2), step_size_limits=(1e-6, 50.0)):
    h = _C.RpropHyper()
    h.lr = _f("lr", lr)
    h.etaminus, h.etaplus = _pair("etas", etas)
    h.step_size_min, h.step_size_max = _pair("step_sizes", step_size_limits)
    return h


def _b_ogr(lr=0.5, sgd_lr=1e-3, beta=0.9, warmup=5, trust=2.0, eps=1e-6, weight_decay=0.0):
    h = _C.OgrHyper()
    h.lr, h.sgd_lr, h.beta = _f("lr", lr), _f("sgd_lr", sgd_lr), _f("beta", beta)
    h.trust, h.eps, h.weight_decay = _f("trust", trust), _f("eps", eps), _f("weight_decay", weight_decay)
    if type(warmup) is not int:
        if not isinstance(warmup, np.integer) or isinstance(warmup, (bool, np.bool_)):
            raise TypeError(f"warmup: expected an integer (the number of plain SGD steps), got {_describe(warmup)}")
        warmup = int(warmup)
    if not 0 <= warmup < MAX_STEP:
        raise ValueError(f"warmup: expected an integer >= 0 and < 2**62, got {warmup if warmup.bit_length() <= 128 else _describe(warmup)}")
    h.warmup = warmup
    return h


_BUILDERS = {"sgd": _b_sgd, "adam": _b_adam, "adagrad": _b_adagrad, "rmsprop": _b_rmsprop, "adamax": _b_adamax,
             "nadam": _b_nadam, "adadelta": _b_adadelta, "rprop": _b_rprop, "ogr": _b_ogr}

#: OGR's state buffers, in the kernel's order (optim_rules.h: OgrRule): the functional keywords' names.
OGR_STATE_ARGS = ("mean_params", "mean_grads", "var_params", "cov_grad_params", "last_steps")


# ---- the steps ---------------------------------------------------------------------------------------------------
def sgd_step(params, grads, momentum_buffers=None, *, step, lr=1e-3, momentum=0.0, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, velocity=False, grad_multiplier=1.0, found_inf=None,
             **kw):
    """SGD (torch.optim.SGD; seeds' Algorithm 8.1), with momentum, dampening and Nesterov.

    g <- g + wd p;  buf <- g (step 1) or momentum buf + (1 - dampening) g;  d <- g + momentum buf (nesterov) or buf;
    p <- p - lr d.

    ``velocity=True`` is the seeds' velocity form (Algorithms 8.2 and 8.3): v <- momentum v - lr g; p <- p + v.
    With ``nesterov=True`` as well (Algorithm 8.3), ``params`` hold the interim point theta + momentum v, where the
    caller evaluates the gradient; theta is recovered as params - momentum v.  ``momentum_buffers`` holds v
    (start from zeros).
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("sgd_step", kw)
    h = build_hyper("sgd", lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=nesterov, velocity=velocity)
    n = _C.sgd_num_states(h)
    if n and momentum_buffers is None:
        raise ValueError("momentum_buffers: required when momentum != 0 or velocity=True")
    states = [momentum_buffers] if n else []
    _run(_C.sgd_step, params, grads, states, ("momentum_buffers",)[:n], h, step, grad_multiplier, found_inf,
         maximize, **st)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3, betas=(0.9, 0.999),
              eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False,
              eps_inside_sqrt=False, bias_correction=True, grad_multiplier=1.0, found_inf=None, **kw):
    """Adam (Kingma & Ba 2015; torch.optim.Adam; seeds' Algorithm 8.7), AMSGrad (Reddi et al. 2018).

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2;  (AMSGrad: v_max <- max(v_max, v), used for v)
    p <- p - lr/(1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t) + eps).

    ``eps_inside_sqrt=True`` is Algorithm 8.7 exactly: p <- p - lr m_hat / sqrt(v_hat + eps).
    ``bias_correction=False`` drops both corrections (with amsgrad, seed 002's AMSGrad).
    ``decoupled_weight_decay=True`` is AdamW: p <- p (1 - lr wd) before the step.
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("adam_step", kw)
    h = build_hyper("adam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt,
                    bias_correction=bias_correction)
    states = [exp_avgs, exp_avg_sqs]
    names = ("exp_avgs", "exp_avg_sqs")
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("max_exp_avg_sqs: required when amsgrad=True")
        states.append(max_exp_avg_sqs)
        names += ("max_exp_avg_sqs",)
    _run(_C.adam_step, params, grads, states, names, h, step, grad_multiplier, found_inf, maximize, **st)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False, grad_multiplier=1.0, found_inf=None, **kw):
    """AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW): Adam with decoupled weight decay p <- p (1 - lr wd)."""
    st = storage_args(kw)
    if kw:
        refuse_keywords("adamw_step", kw)
    adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr, betas=betas, eps=eps,
              weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
              grad_multiplier=grad_multiplier, found_inf=found_inf, **st)


def adagrad_step(params, grads, state_sums, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                 maximize=False, grad_multiplier=1.0, found_inf=None, **kw):
    """Adagrad (Duchi et al. 2011; torch.optim.Adagrad; seeds' Algorithm 8.4).

    r <- r + g^2;  p <- p - lr / (1 + (t - 1) lr_decay) g / (sqrt(r) + eps).  ``state_sums`` start at
    ``initial_accumulator_value``.
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("adagrad_step", kw)
    h = build_hyper("adagrad", lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)
    _run(_C.adagrad_step, params, grads, [state_sums], ("state_sums",), h, step, grad_multiplier, found_inf,
         maximize, **st)


def rmsprop_step(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None, *, step, lr=1e-2, alpha=0.99,
                 eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False, eps_inside_sqrt=False,
                 nesterov=False, grad_multiplier=1.0, found_inf=None, **kw):
    """RMSprop (Hinton's lecture 6e; torch.optim.RMSprop; seeds' Algorithms 8.5 and 8.6).

    r <- alpha r + (1 - alpha) g^2;  (centered: ga <- alpha ga + (1 - alpha) g; r_c = r - ga^2);
    p <- p - lr g / (sqrt(r_c) + eps), or with momentum buf <- momentum buf + g / (sqrt(r_c) + eps); p <- p - lr buf.

    ``eps_inside_sqrt=True``: the denominator is sqrt(r_c + eps), as in Algorithm 8.5 (and 8.6 with eps=0).
    ``nesterov=True`` (needs momentum > 0) is Algorithm 8.6: v <- momentum v - lr g / denom, and ``params`` hold the
    interim point theta + momentum v where the caller evaluates the gradient.
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("rmsprop_step", kw)
    h = build_hyper("rmsprop", lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                    centered=centered, eps_inside_sqrt=eps_inside_sqrt, nesterov=nesterov)
    states, names = [square_avgs], ("square_avgs",)
    if centered:
        if grad_avgs is None:
            raise ValueError("grad_avgs: required when centered=True")
        states.append(grad_avgs)
        names += ("grad_avgs",)
    if h.momentum > 0:
        if momentum_buffers is None:
            raise ValueError("momentum_buffers: required when momentum > 0")
        states.append(momentum_buffers)
        names += ("momentum_buffers",)
    _run(_C.rmsprop_step, params, grads, states, names, h, step, grad_multiplier, found_inf, maximize, **st)


def adamax_step(params, grads, exp_avgs, exp_infs, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.0, maximize=False, grad_multiplier=1.0, found_inf=None, **kw):
    """Adamax (Kingma & Ba 2015, sec. 7; torch.optim.Adamax; AdaMax in seed 002).

    m <- beta1 m + (1 - beta1) g;  u <- max(beta2 u, |g| + eps);  p <- p - lr / (1 - beta1^t) m / u.
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("adamax_step", kw)
    h = build_hyper("adamax", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    _run(_C.adamax_step, params, grads, [exp_avgs, exp_infs], ("exp_avgs", "exp_infs"), h, step, grad_multiplier,
         found_inf, maximize, **st)


def nadam_step(params, grads, exp_avgs, exp_avg_sqs, *, step, mu_product=1.0, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False, momentum_schedule=True,
               maximize=False, grad_multiplier=1.0, found_inf=None, **kw) -> float:
    """NAdam (Dozat 2016; torch.optim.NAdam; Nadam in seed 002).  Returns the new ``mu_product`` (with device
    counters: the ``mu_product`` array, advanced in place on the device).

    mu_t = beta1 (1 - 0.5 * 0.96^(t momentum_decay));  ``mu_product`` is mu_1 ... mu_{t-1} (1.0 before step 1):
    p <- p - lr (1 - mu_t) / (1 - prod mu) g / denom - lr mu_{t+1} / (1 - prod mu * mu_{t+1}) m / denom,
    denom = sqrt(v / (1 - beta2^t)) + eps.

    ``momentum_schedule=False`` is seed 002's form with a constant beta1:
    p <- p - lr / denom (beta1 m + (1 - beta1) g) / (1 - beta1^t).
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("nadam_step", kw)
    def counted(x):
        return _is_counter_array(x) or (type(x) in (list, tuple) and bool(x) and _is_counter_array(x[0]))

    if counted(step) or counted(mu_product):
        if not (counted(step) and counted(mu_product)):
            raise ValueError("mu_product: with a step count in an array (step= an array) mu_product must be a "
                             "one-element array too, and the other way round")
        h = build_hyper("nadam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                        momentum_schedule=momentum_schedule)
        products = [plain(c) for c in mu_product] if type(mu_product) in (list, tuple) else [plain(mu_product)]
        _run(_C.nadam_step, params, grads, [exp_avgs, exp_avg_sqs], ("exp_avgs", "exp_avg_sqs"), h, step,
             grad_multiplier, found_inf, maximize, mu_product=1.0, mu_product_counters=products, **st)
        return mu_product
    mu_product = real_number("mu_product", mu_product)
    if not 0.0 <= mu_product <= 1.0:
        raise ValueError(f"mu_product: expected a number in [0, 1] (the product of mu_1..mu_{{t-1}}; 1 before the "
                         f"first step), got {mu_product}")
    h = build_hyper("nadam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                    decoupled_weight_decay=decoupled_weight_decay, momentum_schedule=momentum_schedule)
    out = _run(_C.nadam_step, params, grads, [exp_avgs, exp_avg_sqs], ("exp_avgs", "exp_avg_sqs"), h, step,
               grad_multiplier, found_inf, maximize, mu_product=mu_product, **st)
    return mu_product if out is None else out


def adadelta_step(params, grads, square_avgs, acc_deltas, *, step, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0,
                  maximize=False, grad_multiplier=1.0, found_inf=None, **kw):
    """Adadelta (Zeiler 2012; torch.optim.Adadelta; seed 002).

    sq <- rho sq + (1 - rho) g^2;  dx <- sqrt(acc + eps) / sqrt(sq + eps) g;  acc <- rho acc + (1 - rho) dx^2;
    p <- p - lr dx.
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("adadelta_step", kw)
    h = build_hyper("adadelta", lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)
    _run(_C.adadelta_step, params, grads, [square_avgs, acc_deltas], ("square_avgs", "acc_deltas"), h, step,
         grad_multiplier, found_inf, maximize, **st)


def rprop_step(params, grads, prevs, step_sizes, *, step, lr=1e-2, etas=(0.5, 1.2), step_size_limits=(1e-6, 50.0),
               maximize=False, grad_multiplier=1.0, found_inf=None, **kw):
    """Rprop (Riedmiller & Braun 1993; torch.optim.Rprop; seed 004).

    s = g prev;  step <- clamp(step * (etaplus if s > 0, etaminus if s < 0, else 1), *step_size_limits);
    g <- 0 where s < 0;  p <- p - sign(g) step;  prev <- g.  ``prevs`` start at 0, ``step_sizes`` at lr (``lr`` is
    only used to check the value; the step sizes carry it).
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("rprop_step", kw)
    h = build_hyper("rprop", lr=lr, etas=etas, step_size_limits=step_size_limits)
    _run(_C.rprop_step, params, grads, [prevs, step_sizes], ("prevs", "step_sizes"), h, step, grad_multiplier,
         found_inf, maximize, **st)


def ogr_step(params, grads, mean_params, mean_grads, var_params, cov_grad_params, last_steps, *, step, lr=0.5,
             sgd_lr=1e-3, beta=0.9, warmup=5, trust=2.0, eps=1e-6, weight_decay=0.0, maximize=False,
             grad_multiplier=1.0, found_inf=None, **kw):
    """OGR, online gradient linear regression (seed 002, the lecture notes' end; diagonal, per coordinate).

    Per coordinate the gradients are fitted by exponentially weighted (factor ``beta``) least squares with the line
    g = lambda (theta - p), i.e. the parabola f = lambda (theta - p)^2 / 2:
    lambda = cov(g, theta) / var(theta), p = mean(theta) - mean(g) / lambda; the step moves the fraction ``lr``
    (the seed's alpha) of the way to p where lambda > 0 and as far away from p where lambda < 0 (saddles):
    theta <- theta + lr sign(lambda) (p - theta) = theta - lr g^ / |lambda|, g^ the fitted gradient at theta.

    State (zeros before step 1; allocate like the params): ``mean_params`` mean(theta), ``mean_grads`` mean(g),
    ``var_params`` var(theta), ``cov_grad_params`` cov(g, theta) (centered moments updated Welford-style, never as
    mean(theta^2) - mean(theta)^2), ``last_steps`` |the previous step|.  Step 1 sets the means to the sample, so
    the weights always sum to one (no bias correction).

    Guards, each giving the plain SGD step -sgd_lr g instead: steps t <= ``warmup``; var(theta) <= (eps (1 +
    |mean(theta)|))^2; |lambda| sgd_lr <= eps.  Trust radius: the regression step is clipped to
    ``trust`` * max(|previous step|, sgd_lr |g|).  g includes ``weight_decay`` * theta (L2).
    """
    st = storage_args(kw)
    if kw:
        refuse_keywords("ogr_step", kw)
    h = build_hyper("ogr", lr=lr, sgd_lr=sgd_lr, beta=beta, warmup=warmup, trust=trust, eps=eps,
                    weight_decay=weight_decay)
    _run(_C.ogr_step, params, grads, [mean_params, mean_grads, var_params, cov_grad_params, last_steps],
         OGR_STATE_ARGS, h, step, grad_multiplier, found_inf, maximize, **st)
