"""optkern.jax: optkern's fused kernels as XLA custom calls (the XLA FFI, over optkern's C interface).

    import optkern.jax as okj
    tx = okj.adam(1e-3)                      # an optax.GradientTransformation: switch an optax loop in one line
    state = tx.init(params)
    updates, state = tx.update(grads, state, params); params = optax.apply_updates(params, updates)
    params, state = okj.apply(tx, grads, state, params)   # the fused path (jit it with params, state donated)

- optimizer steps: :func:`step` (the C interface's 8 algorithms, one custom call for a whole pytree, params
  and states aliased input -> output so donated buffers are updated in place), and optax-compatible
  transformations (sgd, adam, adamw, nadam, nadamw, adagrad, rmsprop, adamax, adadelta; adagrad_torch and
  rprop_torch where optax computes something else) with :func:`apply`, :func:`chain`, :func:`clip_by_global_norm`;
- :func:`global_norm` (optkern_global_norm);
- :func:`batch_norm` (forward and a custom VJP).

Importing this module imports jax (``import optkern`` never does), loads ``optkern/lib/liboptkern_jax.so`` and
registers its FFI targets for the "cpu" platform, once.  The handlers run on the process's one optkern core, so
optkern.set_num_threads / optkern.set_cpu_isa apply to them.  ImportError when the library was not built.
"""

from __future__ import annotations

from ._ffi import HYPER_NAMES, STATE_NAMES, LIB_PATH, global_norm, num_states, step
from ._optax import (
    OptkernState,
    OptkernTransformation,
    adadelta,
    adagrad,
    adagrad_torch,
    adam,
    adamax,
    adamw,
    apply,
    chain,
    clip_by_global_norm,
    nadam,
    nadamw,
    rmsprop,
    rprop,
    rprop_torch,
    sgd,
)
from ._batch_norm import batch_norm

__all__ = [
    "HYPER_NAMES", "STATE_NAMES", "LIB_PATH", "OptkernState", "OptkernTransformation", "adadelta", "adagrad",
    "adagrad_torch", "adam", "adamax", "adamw", "apply", "batch_norm", "chain", "clip_by_global_norm",
    "global_norm", "nadam", "nadamw", "num_states", "rmsprop", "rprop", "rprop_torch", "sgd", "step",
]
