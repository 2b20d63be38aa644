"""optkern's optimizers, with torch.optim's names, keywords, defaults and math (torch 2.13).

Each class is a thin layer over its function in :mod:`optkern.functional` (the same hyperparameter builder and
compiled kernel): it owns the state buffers (allocated like each param, in the param's array library and device)
and the step count.  Options beyond torch reproduce the seeds' algorithm boxes exactly; each docstring says which.
``lr`` may be a number or a schedule (a callable of the number of steps already taken, see
:mod:`optkern.schedules`).

Every class also takes the 16-bit training keywords (group keys like the others; see :mod:`optkern.optim.optimizer`):
``state_dtype=None`` (float32 state for bfloat16/float16 params), ``master_weights=None | "fp32" | "split"``,
``stochastic_rounding=False`` and ``seed=0``; ``step(grads, param_copies=...)`` is the offload step.
"""

from __future__ import annotations

from .. import _C
from ..functional import real_number
from .optimizer import Optimizer

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop", "OGR"]


def _pick(group, keys, lr, **renamed):
    kw = {k: group[k] for k in keys}
    kw.update({new: group[old] for new, old in renamed.items()})
    kw["lr"] = lr
    return kw


def _precision(state_dtype, master_weights, stochastic_rounding, seed) -> dict:
    """The 16-bit training keywords as group keys."""
    return {"state_dtype": state_dtype, "master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
            "seed": seed}


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD; seeds' Algorithm 8.1).

    ``velocity=True`` gives the seeds' velocity form (Algorithm 8.2, and 8.3 with ``nesterov=True``, where the
    params hold the interim point at which the gradient is taken): v <- momentum v - lr g; theta <- theta + v.
    """

    _algo, _c_step = "sgd", _C.sgd_step

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, velocity=False, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, velocity=velocity,
                                      **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return (("momentum_buffer", 0.0),) if (group["momentum"] != 0 or group["velocity"]) else ()

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("momentum", "dampening", "weight_decay", "nesterov", "velocity"), lr)


class Adam(Optimizer):
    """Adam / AMSGrad (torch.optim.Adam), including ``decoupled_weight_decay``.

    ``eps_inside_sqrt=True`` is the seeds' Algorithm 8.7 exactly (delta inside the square root);
    ``bias_correction=False`` with ``amsgrad=True`` is seed 002's AMSGrad (Reddi et al.).
    """

    _algo, _c_step = "adam", _C.adam_step
    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=None, eps_inside_sqrt=False, bias_correction=True,
                 state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      eps_inside_sqrt=eps_inside_sqrt, bias_correction=bias_correction,
                                      **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        spec = (("exp_avg", 0.0), ("exp_avg_sq", 0.0))
        return spec + (("max_exp_avg_sq", 0.0),) if group["amsgrad"] else spec

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay", "eps_inside_sqrt",
                             "bias_correction"), lr)


class AdamW(Adam):
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay, default weight_decay=1e-2."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, eps_inside_sqrt=False, bias_correction=True, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, eps_inside_sqrt=eps_inside_sqrt,
                         bias_correction=bias_correction, state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed)


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad) with lr_decay and initial_accumulator_value; the seeds' Algorithm 8.4."""

    _algo, _c_step = "adagrad", _C.adagrad_step

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 *, maximize=False, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        v = real_number("initial_accumulator_value", initial_accumulator_value)
        if not v >= 0.0:
            raise ValueError(f"initial_accumulator_value: expected a finite number >= 0, got {v}")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize, **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return (("sum", lambda g: g["initial_accumulator_value"]),)

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("lr_decay", "weight_decay", "eps"), lr)


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop), centered and with momentum.

    ``eps_inside_sqrt=True`` is the seeds' Algorithm 8.5 (sqrt(delta + r)); ``nesterov=True`` (with momentum > 0)
    is Algorithm 8.6, RMSProp with Nesterov momentum in velocity form (params hold the interim point; with
    ``eps_inside_sqrt=True, eps=0`` the box exactly).
    """

    _algo, _c_step = "rmsprop", _C.rmsprop_step

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, eps_inside_sqrt=False, nesterov=False, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize, eps_inside_sqrt=eps_inside_sqrt,
                                      nesterov=nesterov, **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        spec = (("square_avg", 0.0),)
        if group["centered"]:
            spec += (("grad_avg", 0.0),)
        if real_number("momentum", group["momentum"], finite=False) > 0:
            spec += (("momentum_buffer", 0.0),)
        return spec

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("alpha", "eps", "weight_decay", "momentum", "centered", "eps_inside_sqrt", "nesterov"),
                     lr)


class Adamax(Optimizer):
    """Adamax (torch.optim.Adamax); AdaMax in seed 002 (eps=0 gives the seed's formula exactly)."""

    _algo, _c_step = "adamax", _C.adamax_step

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, maximize=False,
                 state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return (("exp_avg", 0.0), ("exp_inf", 0.0))

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("betas", "eps", "weight_decay"), lr)


class NAdam(Optimizer):
    """NAdam (torch.optim.NAdam) with momentum_decay and decoupled_weight_decay.

    ``momentum_schedule=False`` is seed 002's Nadam (constant beta1, no mu_t schedule).
    """

    _algo, _c_step = "nadam", _C.nadam_step

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, maximize=False, momentum_schedule=True, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize, momentum_schedule=momentum_schedule,
                                      **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return (("exp_avg", 0.0), ("exp_avg_sq", 0.0))

    def _extra_state(self, group):
        return {"mu_product": 1.0}

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay",
                             "momentum_schedule"), lr)

    # Params that share a step count have taken the same steps, so they share the momentum product: the kernel
    # takes it after the step count and returns the new one, which the step stores in every param's state.
    _ret_state = "mu_product"


class Adadelta(Optimizer):
    """Adadelta (torch.optim.Adadelta); seed 002's Adadelta with lr=1."""

    _algo, _c_step = "adadelta", _C.adadelta_step

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return (("square_avg", 0.0), ("acc_delta", 0.0))

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("rho", "eps", "weight_decay"), lr)


class Rprop(Optimizer):
    """Rprop (torch.optim.Rprop) with etas and step_sizes; seed 004's sign-based step adaptation."""

    _algo, _c_step = "rprop", _C.rprop_step

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *, maximize=False, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, etas=tuple(etas), step_sizes=tuple(step_sizes), maximize=maximize,
                                      **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return (("prev", 0.0), ("step_size", lambda g: self._lr_value(g, 0)))

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("etas",), lr, step_size_limits="step_sizes")


class OGR(Optimizer):
    """OGR, online gradient linear regression (seed 002; issue 16 part 2): per coordinate, a parabola fitted to the
    recent gradients by exponentially weighted least squares, and a step toward its vertex (lambda > 0) or away
    from it (lambda < 0, saddles).  :func:`optkern.ogr_step` gives the formulas and guards.

    ``lr`` is the step factor alpha (the fraction of the way to the vertex); ``sgd_lr`` the plain SGD step's
    learning rate, used for the first ``warmup`` steps and wherever a guard refuses the fit (var(theta) or lambda
    near zero, relative to ``eps``); ``trust`` bounds the regression step to trust * max(|previous step|,
    sgd_lr |g|); ``beta`` is the averages' factor.  State per param: ``mean_param``, ``mean_grad``, ``var_param``,
    ``cov_grad_param``, ``last_step``.
    """

    _algo, _c_step = "ogr", _C.ogr_step

    def __init__(self, params, lr=0.5, sgd_lr=1e-3, beta=0.9, warmup=5, trust=2.0, eps=1e-6, weight_decay=0.0, *,
                 maximize=False, state_dtype=None, master_weights=None, stochastic_rounding=False, seed=0):
        super().__init__(params, dict(lr=lr, sgd_lr=sgd_lr, beta=beta, warmup=warmup, trust=trust, eps=eps,
                                      weight_decay=weight_decay, maximize=maximize,
                                      **_precision(state_dtype, master_weights, stochastic_rounding, seed)))

    def _state_spec_for(self, group):
        return OGR_STATE_SPEC

    def _hyper_kwargs(self, group, lr):
        return _pick(group, ("sgd_lr", "beta", "warmup", "trust", "eps", "weight_decay"), lr)


#: OGR's state keys in the kernel's order, each starting at 0 (shared with optkern.torch.OGR).
OGR_STATE_SPEC = (("mean_param", 0.0), ("mean_grad", 0.0), ("var_param", 0.0), ("cov_grad_param", 0.0),
                  ("last_step", 0.0))
