"""optax-compatible transformations over the fused custom-call steps.

Each constructor takes optax's argument names and defaults and maps optax's exact math onto one of the core's
variants; where optax computes something the core does not, it raises NotImplementedError saying what differs
(and, for adagrad and rprop, a torch-named variant the core does compute is offered under its own name).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi

try:
    import optax as _optax

    _Base = _optax.GradientTransformation
    EmptyState = _optax.EmptyState
except ImportError:  # a NamedTuple of the same shape
    _optax = None

    class _Base(NamedTuple):  # type: ignore[no-redef]
        init: Callable
        update: Callable

    class EmptyState(NamedTuple):  # type: ignore[no-redef]
        pass


ScalarOrSchedule = Union[float, Callable[[Any], Any]]


class OptkernState(NamedTuple):
    """The state of an optkern.jax transformation: ``count`` (int32 steps taken), ``states`` (a tuple of trees
    with the params' structure, the core's state buffers in its order) and ``mu_product`` (NAdam's running
    product of its momentum coefficients; None otherwise)."""

    count: Any
    states: Tuple[Any, ...]
    mu_product: Any = None


@dataclasses.dataclass(frozen=True)
class _Spec:
    algorithm: str
    hyper: dict
    learning_rate: ScalarOrSchedule
    init_values: Tuple[float, ...]  # the initial value of each state buffer
    max_norm: Optional[float] = None  # a global-norm clip folded into the step as grad_scale


class OptkernTransformation(_Base):
    """An ``optax.GradientTransformation`` (init, update) whose step is one optkern custom call.  Its ``spec``
    lets :func:`apply` run the fused, donation-friendly path."""

    spec: _Spec


def _make(spec: _Spec) -> OptkernTransformation:
    def init_fn(params):
        states = tuple(jax.tree.map(lambda p, v=v: jnp.full_like(p, v, dtype=_state_dtype(p)), params)
                       for v in spec.init_values)
        mu = jnp.ones((), _ffi._float_dtype()) if spec.algorithm == "nadam" else None
        return OptkernState(jnp.zeros((), jnp.int32), states, mu)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("params: optkern.jax transformations need params in update(grads, state, params)")
        new_params, new_state = _fused(spec, updates, state, params)
        return jax.tree.map(lambda n, p: n - p, new_params, params), new_state

    tx = OptkernTransformation(init_fn, update_fn)
    tx.spec = spec
    return tx


def _state_dtype(p):
    return jnp.float32 if np.dtype(p.dtype) in _ffi._HALVES else p.dtype


def _lr_value(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _clip_scale(grads, max_norm):
    """optax.clip_by_global_norm's factor: 1 when the norm is below max_norm, else max_norm / norm."""
    norm = _ffi.global_norm(grads)
    return jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)


def _fused(spec: _Spec, grads, state: OptkernState, params):
    if not isinstance(state, OptkernState):
        raise TypeError(f"state: expected the OptkernState made by this transformation's init, got {type(state)}")
    count = state.count
    step = count + 1
    lr = _lr_value(spec.learning_rate, count)
    scale = 1.0 if spec.max_norm is None else _clip_scale(grads, spec.max_norm)
    out = _ffi.step(spec.algorithm, params, grads, state.states, lr=lr, step=step, grad_scale=scale,
                    mu_product=state.mu_product, **spec.hyper)
    if spec.algorithm == "nadam":
        new_params, new_states, mu = out
    else:
        (new_params, new_states), mu = out, None
    return new_params, OptkernState(step, new_states, mu)


def apply(tx, grads, state, params):
    """The fused path: ``(new_params, new_state)`` straight from the kernels, no ``updates`` tree.

    Jit it with params and state donated (``jax.jit(step, donate_argnums=...)``) and the custom call updates
    their buffers in place: one read of grads and one read and write of params and state per step.  Put params
    before state in the jitted function's arguments, as in its outputs (``jax.jit(lambda p, s, g: apply(tx, g, s,
    p), donate_argnums=(0, 1))``): jax pairs each donated buffer with the first output of the same shape and dtype,
    in order, and a param paired with a state buffer of its shape costs a copy.  Without
    donation XLA copies params and state first (the caller's arrays are unchanged).  For a transformation that is
    not optkern's this is ``update`` then ``optax.apply_updates``."""
    spec = getattr(tx, "spec", None)
    if isinstance(spec, _Spec):
        return _fused(spec, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype), params, updates), state


_UPDATE_DOC = """

    Use it as any optax transformation (``updates, state = tx.update(grads, state, params)`` then
    ``optax.apply_updates``), or through :func:`optkern.jax.apply` for the fused path.  The kernels update params
    in place, so ``update`` returns ``updates = new_params - params``: under jit XLA copies params for the call
    (aliased, not donated), then the subtraction and optax's ``params + updates`` are two more passes over the
    params.  ``p + (new - p)`` gives ``new`` back exactly wherever ``new - p`` is exact, which Sterbenz's lemma
    guarantees when ``p/2 <= new <= 2p`` (an optimizer step small relative to the param); elsewhere (a param
    crossing zero) the result may differ from ``new`` in its last bit.  ``apply`` returns ``new`` itself.
    learning_rate may be a float or an optax schedule (a callable of the step count), traced into the step."""


def _doc(f):
    f.__doc__ = (f.__doc__ or "") + _UPDATE_DOC
    return f


def _static(name, v):
    if callable(v) or isinstance(v, jax.core.Tracer):
        raise NotImplementedError(f"{name}: must be a number here (only learning_rate may be a schedule)")
    return float(v)


def _check_lr(learning_rate):
    if not callable(learning_rate):
        _ffi._check_lr(learning_rate)


def _no_dtype(name, v):
    if v is not None:
        raise NotImplementedError(f"{name}: the core keeps its states in the params' dtype (float32 for 16-bit "
                                  "params); pass None")


def _no_mask(name, v):
    if v is not None:
        raise NotImplementedError(f"{name}: masks are not supported (one fused call updates the whole tree); "
                                  "use optax.masked around two optkern transformations")


@_doc
def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None, nesterov: bool = False,
        accumulator_dtype=None):
    """optax.sgd: ``t <- g + momentum t`` (``t = g`` on the first step: optax's zero trace gives the same),
    ``p <- p - lr (g + momentum t)`` with nesterov else ``p - lr t``: the core's SGD with dampening 0 (torch's)."""
    _check_lr(learning_rate)
    _no_dtype("accumulator_dtype", accumulator_dtype)
    m = 0.0 if momentum is None else _static("momentum", momentum)
    hyper = {"momentum": m, "nesterov": bool(nesterov) and m != 0.0}
    return _make(_Spec("sgd", hyper, learning_rate, (0.0,) if m != 0.0 else ()))


def _adam_spec(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, weight_decay, decoupled):
    _check_lr(learning_rate)
    _no_dtype("mu_dtype", mu_dtype)
    b1, b2, eps, eps_root = (_static(n, v) for n, v in (("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)))
    wd = {"weight_decay": _static("weight_decay", weight_decay), "decoupled_weight_decay": decoupled}
    if nesterov:
        # optax's NAdam: (b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps).
        # That is the core's NAdam with torch's momentum schedule mu_t = b1 (1 - 0.5 * 0.96^(t psi)) held at the
        # constant b1: psi = 1e4 makes 0.96^(t psi) < 1e-177, so mu_t == b1 exactly in double precision, and
        # torch's coefficients (1 - mu_t) / (1 - prod mu) and mu_{t+1} / (1 - prod mu * mu_{t+1}) become
        # (1 - b1) / (1 - b1^t) and b1 / (1 - b1^(t+1)): optax's bias corrections.
        if eps_root != 0.0:
            raise NotImplementedError("eps_root: the core's NAdam has no epsilon inside the square root")
        return _Spec("nadam", dict(beta1=b1, beta2=b2, eps=eps, momentum_decay=1e4, momentum_schedule=True, **wd),
                     learning_rate, (0.0, 0.0))
    if eps_root != 0.0 and eps != 0.0:
        raise NotImplementedError("eps_root and eps both non-zero: the core computes sqrt(v_hat) + eps (torch's) or "
                                  "sqrt(v_hat + eps) (eps_inside_sqrt), not sqrt(v_hat + eps_root) + eps")
    inside = eps_root != 0.0
    hyper = dict(beta1=b1, beta2=b2, eps=eps_root if inside else eps, eps_inside_sqrt=inside, **wd)
    return _Spec("adam", hyper, learning_rate, (0.0, 0.0))


@_doc
def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0, mu_dtype=None, *, nesterov: bool = False):
    """optax.adam: ``p <- p - lr m_hat / (sqrt(v_hat) + eps)``; the core's Adam computes
    ``(lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)``, the same expression.  eps_root (with eps = 0) maps to
    eps_inside_sqrt; nesterov=True (optax.nadam) to the core's NAdam (see the source for the exact mapping)."""
    return _make(_adam_spec(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, 0.0, False))


@_doc
def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, mu_dtype=None, weight_decay: float = 1e-4, mask=None, *, nesterov: bool = False):
    """optax.adamw: ``p <- p - lr (adam_update + weight_decay p)`` = the core's decoupled weight decay
    ``p (1 - lr weight_decay)`` then the Adam step."""
    _no_mask("mask", mask)
    return _make(_adam_spec(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, weight_decay, True))


def nadam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, mu_dtype=None):
    """optax.nadam (adam with nesterov=True)."""
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=True)


def nadamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           eps_root: float = 0.0, mu_dtype=None, weight_decay: float = 1e-4, mask=None):
    """optax.nadamw (adamw with nesterov=True)."""
    return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=True)


@_doc
def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1, eps: float = 1e-7):
    """optax.adagrad: ``s <- s + g^2``, ``p <- p - lr g rsqrt(s + eps)`` -- epsilon INSIDE the square root.  The
    core computes torch's ``g / (sqrt(s) + eps)``, epsilon outside, so only eps=0.0 is accepted here (the two
    are then the same expression wherever s > 0, which initial_accumulator_value > 0 guarantees); any other eps
    raises NotImplementedError rather than silently computing the other formula.  :func:`adagrad_torch` is
    torch's Adagrad (eps outside, lr_decay, weight_decay)."""
    _check_lr(learning_rate)
    eps, init = _static("eps", eps), _static("initial_accumulator_value", initial_accumulator_value)
    if eps != 0.0:
        raise NotImplementedError(
            f"eps={eps}: optax's Adagrad divides by sqrt(sum + eps); optkern's core computes torch's "
            "g / (sqrt(sum) + eps).  Pass eps=0.0 (identical when initial_accumulator_value > 0) or use "
            "optkern.jax.adagrad_torch")
    if init <= 0.0:
        raise NotImplementedError("initial_accumulator_value: must be > 0 with eps=0.0 (optax skips the update "
                                  "where the sum is 0; the core would divide 0 by 0)")
    return _make(_Spec("adagrad", {"eps": 0.0}, learning_rate, (init,)))


@_doc
def adagrad_torch(learning_rate: ScalarOrSchedule, lr_decay: float = 0.0, weight_decay: float = 0.0,
                  initial_accumulator_value: float = 0.0, eps: float = 1e-10):
    """torch.optim.Adagrad (the core's): ``g <- g + wd p``, ``s <- s + g^2``,
    ``p <- p - lr / (1 + (t - 1) lr_decay) g / (sqrt(s) + eps)``.  Not optax.adagrad (see :func:`adagrad`)."""
    _check_lr(learning_rate)
    hyper = {"lr_decay": _static("lr_decay", lr_decay), "weight_decay": _static("weight_decay", weight_decay),
             "eps": _static("eps", eps)}
    return _make(_Spec("adagrad", hyper, learning_rate, (_static("initial_accumulator_value",
                                                                  initial_accumulator_value),)))


@_doc
def rmsprop(learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
            eps_in_sqrt: bool = True, centered: bool = False, momentum: Optional[float] = None,
            nesterov: bool = False, bias_correction: bool = False):
    """optax.rmsprop: ``nu <- decay nu + (1 - decay) g^2`` (from initial_scale), ``u = -lr g / sqrt(nu + eps)``
    (or ``/ (sqrt(nu) + eps)``; centered: ``nu - mu^2``), then optax's trace: ``t <- momentum t + u``, ``p += t``
    (nesterov: ``p += u + momentum t``).  The core's RMSprop: eps_inside_sqrt, centered, and for momentum
    torch's buffer ``b <- momentum b + g / denom``, ``p -= lr b`` (equal to optax's trace ``t = -lr b`` for a
    constant learning rate) or, with nesterov, the velocity form with a look-ahead, which is optax's nesterov trace
    exactly (also under a schedule).  Not supported: bias_correction, and momentum without nesterov under a
    learning-rate schedule (optax's trace accumulates ``-lr_t g_t / d_t``, torch's buffer scales the whole sum
    by the current lr)."""
    _check_lr(learning_rate)
    if bias_correction:
        raise NotImplementedError("bias_correction: the core's RMSprop has no bias correction")
    m = 0.0 if momentum is None else _static("momentum", momentum)
    if m != 0.0 and not nesterov and callable(learning_rate):
        raise NotImplementedError("momentum without nesterov under a learning-rate schedule: optax's trace sums "
                                  "-lr_t g_t / d_t, the core's (torch's) buffer multiplies the sum by the current "
                                  "lr; use a constant learning_rate or nesterov=True")
    hyper = dict(alpha=_static("decay", decay), eps=_static("eps", eps), eps_inside_sqrt=bool(eps_in_sqrt),
                 centered=bool(centered), momentum=m, nesterov=bool(nesterov) and m != 0.0)
    init = (_static("initial_scale", initial_scale),) + ((0.0,) if centered else ()) + ((0.0,) if m != 0.0 else ())
    return _make(_Spec("rmsprop", hyper, learning_rate, init))


@_doc
def adamax(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """optax.adamax: ``u <- max(b2 u, |g| + eps)``, ``p <- p - lr m_hat / u``: the core's Adamax."""
    _check_lr(learning_rate)
    hyper = dict(beta1=_static("b1", b1), beta2=_static("b2", b2), eps=_static("eps", eps))
    return _make(_Spec("adamax", hyper, learning_rate, (0.0, 0.0)))


@_doc
def adadelta(learning_rate: Optional[ScalarOrSchedule] = None, rho: float = 0.9, eps: float = 1e-6,
             weight_decay: float = 0.0, weight_decay_mask=None):
    """optax.adadelta: ``g <- g + wd p``, ``E[g^2]``, ``dx = sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) g``,
    ``p <- p - lr dx``: the core's Adadelta.  learning_rate=None (optax then applies ``+dx`` unscaled, an ascent
    step) is refused: pass a learning rate."""
    if learning_rate is None:
        raise NotImplementedError("learning_rate=None: optax then adds the Adadelta direction unscaled (no sign "
                                  "flip); the core steps by -lr dx, so pass a learning rate (torch's default is 1.0)")
    _check_lr(learning_rate)
    _no_mask("weight_decay_mask", weight_decay_mask)
    hyper = dict(rho=_static("rho", rho), eps=_static("eps", eps), weight_decay=_static("weight_decay", weight_decay))
    return _make(_Spec("adadelta", hyper, learning_rate, (0.0, 0.0)))


def rprop(learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2, min_step_size: float = 1e-6,
          max_step_size: float = 50.0):
    """optax.rprop is NOT computed: optax 0.2.8's update at step t is the previous step's ``step_size * sign(g)``
    (zeroed where the gradient's sign flipped), so the first step moves nothing and each move lags one step
    behind its gradient.  The core computes Rprop as torch (and Riedmiller & Braun) do, moving by this step's
    sign; that is :func:`rprop_torch`.  Always raises NotImplementedError."""
    raise NotImplementedError("optkern.jax.rprop: optax's rprop applies the previous step's update (it lags one "
                              "step); the core computes torch's Rprop: use optkern.jax.rprop_torch")


@_doc
def rprop_torch(learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2, min_step_size: float = 1e-6,
                max_step_size: float = 50.0):
    """torch.optim.Rprop (the core's), with optax's argument names: per element, the step size (from
    learning_rate) grows by eta_plus where the gradient kept its sign, shrinks by eta_minus where it flipped (and
    that element does not move this step), clamped to [min_step_size, max_step_size]; ``p <- p - sign(g) step``.
    learning_rate is the initial step size (a number, not a schedule)."""
    lr = _static("learning_rate", learning_rate)
    _ffi._check_lr(lr)
    hyper = dict(etaminus=_static("eta_minus", eta_minus), etaplus=_static("eta_plus", eta_plus),
                 step_size_min=_static("min_step_size", min_step_size),
                 step_size_max=_static("max_step_size", max_step_size))
    return _make(_Spec("rprop", hyper, lr, (0.0, lr)))


def clip_by_global_norm(max_norm: float):
    """optax.clip_by_global_norm: ``g <- g`` when ``||g|| < max_norm``, else ``g / ||g|| * max_norm``, with the
    norm from optkern_global_norm (one custom call over the whole tree).  As the first element of
    :func:`chain` before an optkern transformation, the factor is folded into that step's single pass
    (``grad_scale``) instead of rewriting the gradients."""
    max_norm = _static("max_norm", max_norm)
    if not max_norm > 0:
        raise ValueError(f"max_norm: must be > 0, got {max_norm}")

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scale = _clip_scale(updates, max_norm)
        return jax.tree.map(lambda g: (g * scale.astype(g.dtype)), updates), state

    clip = _ClipTransformation(init_fn, update_fn)
    clip.max_norm = max_norm
    return clip


class _ClipTransformation(_Base):
    max_norm: float


def chain(*txs):
    """optax.chain; ``chain(clip_by_global_norm(m), <an optkern transformation>)`` becomes one optkern
    transformation whose step folds the clip factor into its pass (grad_scale), with that transformation's
    state.  Any other combination is optax.chain (requires optax)."""
    if len(txs) == 2 and isinstance(txs[0], _ClipTransformation) and isinstance(getattr(txs[1], "spec", None), _Spec):
        return _make(dataclasses.replace(txs[1].spec, max_norm=txs[0].max_norm))
    if _optax is None:
        raise ImportError("optkern.jax.chain: only chain(clip_by_global_norm(m), tx) works without optax")
    return _optax.chain(*txs)
