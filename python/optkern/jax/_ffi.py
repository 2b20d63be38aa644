"""liboptkern_jax: loading, FFI target registration and the custom calls (steps, global norm, batch norm).

The library sits next to liboptkern in the package's ``lib/`` directory and links it, so the JAX handlers run
on the one C++ core of the process (liboptkern_core): :func:`optkern.set_num_threads` and
:func:`optkern.set_cpu_isa` apply to them too.  Only the host ("cpu" platform) handlers exist.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import optkern

LIB_NAME = "liboptkern_jax.so"
LIB_PATH = os.path.join(os.path.dirname(optkern.__file__), "lib", LIB_NAME)

if not os.path.exists(LIB_PATH):
    raise ImportError(
        f"optkern.jax: {LIB_PATH} was not built.  It is built when jax is installed before optkern "
        "(pip install jax; pip install optkern), or with OPTKERN_JAX=ON (OPTKERN_JAX_INCLUDE_DIR=<jax.ffi.include_dir()> "
        "when the build cannot import jax)."
    )
_lib = ctypes.cdll.LoadLibrary(LIB_PATH)

TARGETS = {
    "optkern_step": "optkern_jax_step",
    "optkern_global_norm": "optkern_jax_global_norm",
    "optkern_bn_forward": "optkern_jax_bn_forward",
    "optkern_bn_backward": "optkern_jax_bn_backward",
}
_registered = False

# A capsule of a handler's address, made through a private prototype of PyCapsule_New: jax.ffi.pycapsule sets
# argtypes on the process-wide ctypes.pythonapi.PyCapsule_New, which would change it for every other user.
_PyCapsule_New = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi))


def _capsule(fn):
    return _PyCapsule_New(ctypes.cast(fn, ctypes.c_void_p).value, None, None)


def _register() -> None:
    """Registers the FFI targets with XLA, once per process."""
    global _registered
    if _registered:
        return
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, _capsule(getattr(_lib, symbol)), platform="cpu")
    _registered = True


_register()

# ---- the algorithms: hyperparameters as optkern.h names them (torch's), with the C interface's defaults -----------
# Only the names are checked here; the values are checked by the core when the step runs (the defaults come from
# the C interface's optkern_<algo>_hyper_init, so they are not repeated).
HYPER_NAMES = {
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov", "velocity"),
    "adam": ("beta1", "beta2", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay", "eps_inside_sqrt",
             "bias_correction"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
    "rmsprop": ("alpha", "eps", "weight_decay", "momentum", "centered", "eps_inside_sqrt", "nesterov"),
    "adamax": ("beta1", "beta2", "eps", "weight_decay"),
    "nadam": ("beta1", "beta2", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay",
              "momentum_schedule"),
    "adadelta": ("rho", "eps", "weight_decay"),
    "rprop": ("etaminus", "etaplus", "step_size_min", "step_size_max"),
}
_FLAGS = {"nesterov", "velocity", "amsgrad", "decoupled_weight_decay", "eps_inside_sqrt", "bias_correction",
          "centered", "momentum_schedule"}
STATE_NAMES = {
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "adagrad": ("sum",),
    "rmsprop": ("square_avg", "grad_avg", "momentum_buffer"),
    "adamax": ("exp_avg", "exp_inf"),
    "nadam": ("exp_avg", "exp_avg_sq"),
    "adadelta": ("square_avg", "acc_delta"),
    "rprop": ("prev", "step_size"),
}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_HALVES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def num_states(algorithm: str, hyper: dict) -> int:
    """How many state buffers per tensor a step of `algorithm` with these hyperparameters uses (optkern.h)."""
    if algorithm == "sgd":
        return 1 if (hyper.get("momentum", 0.0) != 0.0 or hyper.get("velocity", False)) else 0
    if algorithm == "adam":
        return 3 if hyper.get("amsgrad", False) else 2
    if algorithm == "rmsprop":
        return 1 + bool(hyper.get("centered", False)) + (hyper.get("momentum", 0.0) > 0.0)
    return {"adagrad": 1, "adamax": 2, "nadam": 2, "adadelta": 2, "rprop": 2}[algorithm]


def check_hyper(algorithm: str, hyper: dict) -> None:
    if algorithm not in HYPER_NAMES:
        raise ValueError(f"algorithm: {algorithm!r} is not one of {sorted(HYPER_NAMES)}")
    for k, v in hyper.items():
        if k not in HYPER_NAMES[algorithm]:
            raise TypeError(f"{algorithm}: unknown hyperparameter {k!r} (expected one of {HYPER_NAMES[algorithm]})")
        if isinstance(v, jax.core.Tracer) or callable(v):
            raise TypeError(f"{algorithm}: hyperparameter {k!r} must be a static number (only lr, step and "
                            "grad_scale may be traced)")


def _attr(name: str, v: Any):
    return np.int64(bool(v)) if name in _FLAGS else np.float64(v)


def _float_dtype():
    """The canonical float dtype of scalar operands (float64 under jax_enable_x64, else float32)."""
    return jnp.zeros((), dtype=float).dtype


def _leaves(tree, what: str, ref_def=None, ref_leaves=None):
    """The leaves of `tree` (with their paths), checked against the params' structure and shapes."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if ref_def is not None and treedef != ref_def:
        raise ValueError(f"{what}: its tree structure {treedef} does not match params' {ref_def}")
    leaves = []
    for i, (path, x) in enumerate(leaves_with_path):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        if ref_leaves is not None and tuple(x.shape) != tuple(ref_leaves[i].shape):
            raise ValueError(f"{what}{jax.tree_util.keystr(path)}: shape {tuple(x.shape)} does not match the "
                             f"param's {tuple(ref_leaves[i].shape)}")
        leaves.append(x)
    return leaves_with_path, treedef, leaves


def _check_dtypes(what: str, paths, leaves, allowed) -> np.dtype:
    dt = None
    for (path, _), x in zip(paths, leaves):
        d = np.dtype(x.dtype)
        if d not in allowed:
            raise TypeError(f"{what}{jax.tree_util.keystr(path)}: dtype {d} is not supported (expected "
                            f"{' or '.join(str(a) for a in allowed)})")
        if dt is None:
            dt = d
        elif d != dt:
            raise TypeError(f"{what}{jax.tree_util.keystr(path)}: dtype {d}, but the first leaf is {dt} (one "
                            "dtype per tree: one custom call updates the whole tree)")
    return dt


def _check_lr(lr) -> None:
    if isinstance(lr, (int, float, np.number)) and not (np.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr: the learning rate must be finite and >= 0, got {lr}")


def step(algorithm: str, params, grads, states: Sequence[Any] = (), *, lr, step, grad_scale=1.0, mu_product=None,
         maximize: bool = False, **hyper):
    """One fused optimizer step over a whole pytree: ONE XLA custom call updates every leaf.

    ``algorithm`` is one of the C interface's: sgd, adam (AdamW: ``decoupled_weight_decay=True``), adagrad,
    rmsprop, adamax, nadam, adadelta, rprop; ``hyper`` are its hyperparameters as ``optkern.h`` names them
    (torch.optim's: beta1, beta2, eps, weight_decay, ...; static: they are compiled into the call) and default as
    there.  ``lr`` (the learning rate), ``step`` (steps taken including this one: 1 on the first) and
    ``grad_scale`` (multiplies every gradient inside the pass: a clip coefficient) may be traced (an optax
    schedule's output); they are scalar operands read on the host.  ``states`` is a tuple of pytrees with the
    params' structure, in the algorithm's order (:data:`STATE_NAMES`), as many as :func:`num_states` says.
    NAdam also takes ``mu_product``, the product of its momentum coefficients so far (1.0 before the first step),
    and returns the next one.

    Params and states are aliased input -> output: under ``jax.jit(..., donate_argnums=...)`` with them donated
    the kernel updates their buffers in place, with no copy.  Without donation XLA copies them first (the
    caller's arrays are left unchanged), which costs one extra read and write of each.

    Returns ``(new_params, new_states)``, and ``new_mu_product`` third for NAdam.  float32 and float64 params
    (grads and states of the same dtype); bfloat16/float16 params with grads of their dtype and float32 states.
    """
    check_hyper(algorithm, hyper)
    _check_lr(lr)
    k = num_states(algorithm, hyper)
    states = tuple(states)
    if len(states) != k:
        names = STATE_NAMES[algorithm][:k] if algorithm != "rmsprop" else "square_avg[, grad_avg][, momentum_buffer]"
        raise ValueError(f"states: {algorithm} with these hyperparameters takes {k} state trees ({names}), got "
                         f"{len(states)}")
    p_paths, treedef, p_leaves = _leaves(params, "params")
    g_paths, _, g_leaves = _leaves(grads, "grads", treedef, p_leaves)
    pdt = _check_dtypes("params", p_paths, p_leaves, _FLOATS + _HALVES)
    half = pdt in _HALVES
    gdt = _check_dtypes("grads", g_paths, g_leaves, (pdt,) if pdt is not None else _FLOATS)
    del gdt
    s_leaves = []
    for j, s in enumerate(states):
        s_paths, _, leaves = _leaves(s, f"states[{j}]", treedef, p_leaves)
        want = (np.dtype(np.float32),) if half else ((pdt,) if pdt is not None else _FLOATS)
        _check_dtypes(f"states[{j}]", s_paths, leaves, want)
        s_leaves.append(leaves)
    is_nadam = algorithm == "nadam"
    if is_nadam and mu_product is None:
        raise ValueError("mu_product: nadam needs the product of its momentum coefficients so far (1.0 at first)")
    if not is_nadam and mu_product is not None:
        raise ValueError(f"mu_product: only nadam takes it, not {algorithm}")
    n = len(p_leaves)
    fdt = _float_dtype()
    scalars = [jnp.asarray(lr, fdt), jnp.asarray(step, jnp.int32), jnp.asarray(grad_scale, fdt)]
    if is_nadam:
        scalars.append(jnp.asarray(mu_product, fdt))
    first = len(scalars)
    flat_states = [x for leaves in s_leaves for x in leaves]
    out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in p_leaves + flat_states]
    if is_nadam:
        out_types.append(jax.ShapeDtypeStruct((), fdt))
    aliases = {first + i: i for i in range(n)}
    aliases.update({first + 2 * n + j: n + j for j in range(len(flat_states))})
    attrs = {name: _attr(name, v) for name, v in hyper.items()}
    call = jax.ffi.ffi_call("optkern_step", out_types, input_output_aliases=aliases, vmap_method=None)
    outs = call(*scalars, *p_leaves, *g_leaves, *flat_states, algo=algorithm, n=np.int64(n), n_states=np.int64(k),
                maximize=np.int64(bool(maximize)), has_mu_product=np.int64(is_nadam), **attrs)
    new_params = jax.tree_util.tree_unflatten(treedef, outs[:n])
    new_states = tuple(jax.tree_util.tree_unflatten(treedef, outs[n + j * n:n + (j + 1) * n]) for j in range(k))
    if is_nadam:
        return new_params, new_states, outs[-1]
    return new_params, new_states


def global_norm(tree, norm_type: float = 2.0):
    """The norm of all the leaves of `tree` together (optkern_global_norm: one pass, deterministic), as a scalar
    of the leaves' float dtype (float32 for 16-bit leaves).  norm_type 2 or inf.  Leaves of different dtypes are
    normed per dtype (one custom call each) and combined."""
    if norm_type not in (2, 2.0, float("inf")):
        raise ValueError(f"norm_type: 2 or inf, got {norm_type}")
    paths, _, leaves = _leaves(tree, "tree")
    groups: dict = {}
    for (path, _), x in zip(paths, leaves):
        d = np.dtype(x.dtype)
        if d not in _FLOATS + _HALVES:
            raise TypeError(f"tree{jax.tree_util.keystr(path)}: dtype {d} is not supported (a floating dtype)")
        groups.setdefault(d, []).append(x)
    if not groups:
        return jnp.zeros((), _float_dtype())
    norms = []
    for d, xs in groups.items():
        out = np.float64 if d == np.float64 else np.float32
        call = jax.ffi.ffi_call("optkern_global_norm", jax.ShapeDtypeStruct((), out), vmap_method=None)
        norms.append(call(*xs, norm_type=np.float64(norm_type)))
    if len(norms) == 1:
        return norms[0]
    stacked = jnp.stack([jnp.asarray(v, jnp.result_type(*norms)) for v in norms])
    return jnp.max(stacked) if norm_type == float("inf") else jnp.sqrt(jnp.sum(stacked * stacked))


def channel_layout(shape: Sequence[int], axis: int):
    """(outer, channels, inner) of an array of `shape` whose channel axis is `axis` (C-contiguous)."""
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"x: batch norm needs at least 2 dimensions (a batch and channels), got shape {tuple(shape)}")
    if not -nd <= axis < nd:
        raise ValueError(f"axis: {axis} is out of range for x of {nd} dimensions")
    axis %= nd
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, int(shape[axis]), inner


def bn_forward(x, weight, bias, running_mean, running_var, *, training: bool, momentum: float, eps: float, axis: int):
    """(y, stats, new_running_mean, new_running_var): one optkern_batch_norm_forward_train/_eval call.  `stats`
    is opaque (mean and invstd, 2 * channels float64 carried as uint32 pairs) for :func:`bn_backward`."""
    outer, channels, inner = channel_layout(x.shape, axis)
    has_rs = running_mean is not None
    ops = [x] + [a for a in (weight, bias) if a is not None] + ([running_mean, running_var] if has_rs else [])
    first_rs = len(ops) - 2
    out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((4 * channels,), np.uint32)]
    aliases = {}
    if has_rs:
        out_types += [jax.ShapeDtypeStruct(running_mean.shape, running_mean.dtype),
                      jax.ShapeDtypeStruct(running_var.shape, running_var.dtype)]
        aliases = {first_rs: 2, first_rs + 1: 3}
    call = jax.ffi.ffi_call("optkern_bn_forward", out_types, input_output_aliases=aliases, vmap_method=None)
    outs = call(*ops, training=np.int64(training), has_weight=np.int64(weight is not None),
                has_bias=np.int64(bias is not None), has_running=np.int64(has_rs), outer=np.int64(outer),
                channels=np.int64(channels), inner=np.int64(inner), eps=np.float64(eps), momentum=np.float64(momentum))
    y, stats = outs[0], outs[1]
    return (y, stats, outs[2], outs[3]) if has_rs else (y, stats, None, None)


def bn_backward(x, dy, weight, stats, *, training: bool, eps: float, axis: int, want_dweight: bool, param_dtype):
    """(dx, dweight, dbias) from the forward's stats (dweight/dbias None unless want_dweight)."""
    outer, channels, inner = channel_layout(x.shape, axis)
    ops = [x, dy] + ([weight] if weight is not None else []) + [stats]
    out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if want_dweight:
        out_types += [jax.ShapeDtypeStruct((channels,), param_dtype)] * 2
    call = jax.ffi.ffi_call("optkern_bn_backward", out_types, vmap_method=None)
    outs = call(*ops, training=np.int64(training), has_weight=np.int64(weight is not None),
                want_dweight=np.int64(want_dweight), outer=np.int64(outer), channels=np.int64(channels),
                inner=np.int64(inner), eps=np.float64(eps))
    return (outs[0], outs[1], outs[2]) if want_dweight else (outs[0], None, None)
