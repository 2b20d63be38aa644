"""optkern's optimizers, with torch.optim's names, keywords, defaults and math (torch 2.13).

Each class is a thin layer over its function in :mod:`optkern.functional`: it owns the state buffers
(allocated like each param, in the param's array library and device) and the step count.  Options beyond torch
reproduce the seeds' algorithm boxes exactly; each docstring says which.  ``lr`` may be a number or a schedule
(a callable of the number of steps already taken, see :mod:`optkern.schedules`).
"""

from __future__ import annotations

from .. import functional as F
from .optimizer import Optimizer

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "Adadelta", "Rprop"]


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD).

    ``velocity=True`` gives the seeds' velocity form (Algorithm 8.2, and 8.3 with ``nesterov=True``, where the
    params hold the interim point at which the gradient is taken): v <- momentum v - lr g; theta <- theta + v.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, velocity=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, velocity=velocity))

    def _state_spec_for(self, group):
        return (("momentum_buffer", 0.0),) if (group["momentum"] != 0 or group["velocity"]) else ()

    def _hyper(self, group, lr):
        h = dict(lr=lr, momentum=group["momentum"], dampening=group["dampening"],
                 weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"],
                 velocity=group["velocity"])
        _check(F.sgd_step, int(float(h["momentum"]) != 0 or bool(h["velocity"])), h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        bufs = [s["momentum_buffer"] for s in states] if "momentum_buffer" in states[0] else None
        F.sgd_step(params, grads, bufs, step=step, grad_scale=grad_scale, found_inf=found_inf, **h)


class Adam(Optimizer):
    """Adam / AMSGrad (torch.optim.Adam), including ``decoupled_weight_decay``.

    ``eps_inside_sqrt=True`` is the seeds' Algorithm 8.7 exactly (delta inside the square root);
    ``bias_correction=False`` with ``amsgrad=True`` is seed 002's AMSGrad (Reddi et al.).
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=None, eps_inside_sqrt=False, bias_correction=True):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      eps_inside_sqrt=eps_inside_sqrt, bias_correction=bias_correction))

    def _state_spec_for(self, group):
        spec = (("exp_avg", 0.0), ("exp_avg_sq", 0.0))
        return spec + (("max_exp_avg_sq", 0.0),) if group["amsgrad"] else spec

    def _hyper(self, group, lr):
        h = {k: group[k] for k in ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay",
                                   "eps_inside_sqrt", "bias_correction")}
        h["lr"] = lr
        _check(F.adam_step, 2 + bool(group["amsgrad"]), h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        F.adam_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if h["amsgrad"] else None,
                    step=step, grad_scale=grad_scale, found_inf=found_inf, **h)


class AdamW(Adam):
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay, default weight_decay=1e-2."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, eps_inside_sqrt=False, bias_correction=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, eps_inside_sqrt=eps_inside_sqrt,
                         bias_correction=bias_correction)


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad) with lr_decay and initial_accumulator_value; the seeds' Algorithm 8.4."""

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 *, maximize=False):
        if not (float(initial_accumulator_value) >= 0.0):
            raise ValueError(f"initial_accumulator_value: expected a number >= 0, got {initial_accumulator_value}")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize))

    def _state_spec_for(self, group):
        return (("sum", lambda g: g["initial_accumulator_value"]),)

    def _hyper(self, group, lr):
        h = {k: group[k] for k in ("lr_decay", "weight_decay", "eps", "maximize")}
        h["lr"] = lr
        _check(F.adagrad_step, 1, h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        F.adagrad_step(params, grads, [s["sum"] for s in states], step=step, grad_scale=grad_scale,
                       found_inf=found_inf, **h)


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop), centered and with momentum.

    ``eps_inside_sqrt=True`` is the seeds' Algorithm 8.5 (sqrt(delta + r)); ``nesterov=True`` (with momentum > 0)
    is Algorithm 8.6, RMSProp with Nesterov momentum in velocity form (params hold the interim point).
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, eps_inside_sqrt=False, nesterov=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize, eps_inside_sqrt=eps_inside_sqrt,
                                      nesterov=nesterov))

    def _state_spec_for(self, group):
        spec = (("square_avg", 0.0),)
        if group["centered"]:
            spec += (("grad_avg", 0.0),)
        if group["momentum"] > 0:
            spec += (("momentum_buffer", 0.0),)
        return spec

    def _hyper(self, group, lr):
        h = {k: group[k] for k in ("alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
                                   "eps_inside_sqrt", "nesterov")}
        h["lr"] = lr
        _check(F.rmsprop_step, 1 + bool(group["centered"]) + (float(group["momentum"]) > 0), h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        F.rmsprop_step(params, grads, [s["square_avg"] for s in states],
                       [s["grad_avg"] for s in states] if h["centered"] else None,
                       [s["momentum_buffer"] for s in states] if h["momentum"] > 0 else None,
                       step=step, grad_scale=grad_scale, found_inf=found_inf, **h)


class Adamax(Optimizer):
    """Adamax (torch.optim.Adamax); AdaMax in seed 002 (eps=0 gives the seed's formula exactly)."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))

    _state_spec = (("exp_avg", 0.0), ("exp_inf", 0.0))

    def _hyper(self, group, lr):
        h = {k: group[k] for k in ("betas", "eps", "weight_decay", "maximize")}
        h["lr"] = lr
        _check(F.adamax_step, 2, h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        F.adamax_step(params, grads, [s["exp_avg"] for s in states], [s["exp_inf"] for s in states], step=step,
                      grad_scale=grad_scale, found_inf=found_inf, **h)


class NAdam(Optimizer):
    """NAdam (torch.optim.NAdam) with momentum_decay and decoupled_weight_decay.

    ``momentum_schedule=False`` is seed 002's Nadam (constant beta1, no mu_t schedule).
    """

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, maximize=False, momentum_schedule=True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize, momentum_schedule=momentum_schedule))

    _state_spec = (("exp_avg", 0.0), ("exp_avg_sq", 0.0))

    def _extra_state(self, group):
        return {"mu_product": 1.0}

    def _hyper(self, group, lr):
        h = {k: group[k] for k in ("betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay",
                                   "maximize", "momentum_schedule")}
        h["lr"] = lr
        _check(F.nadam_step, 2, h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        # Params that share a step count share the momentum product (they have taken the same steps).
        mu = states[0]["mu_product"]
        new = F.nadam_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                           step=step, mu_product=mu, grad_scale=grad_scale, found_inf=found_inf, **h)
        for s in states:
            s["mu_product"] = new


class Adadelta(Optimizer):
    """Adadelta (torch.optim.Adadelta); seed 002's Adadelta with lr=1."""

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize))

    _state_spec = (("square_avg", 0.0), ("acc_delta", 0.0))

    def _hyper(self, group, lr):
        h = {k: group[k] for k in ("rho", "eps", "weight_decay", "maximize")}
        h["lr"] = lr
        _check(F.adadelta_step, 2, h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        F.adadelta_step(params, grads, [s["square_avg"] for s in states], [s["acc_delta"] for s in states],
                        step=step, grad_scale=grad_scale, found_inf=found_inf, **h)


class Rprop(Optimizer):
    """Rprop (torch.optim.Rprop) with etas and step_sizes; seed 004's sign-based step adaptation."""

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *, maximize=False):
        super().__init__(params, dict(lr=lr, etas=tuple(etas), step_sizes=tuple(step_sizes), maximize=maximize))

    def _state_spec_for(self, group):
        return (("prev", 0.0), ("step_size", lambda g: self._lr_value(g, 0)))

    def _hyper(self, group, lr):
        h = {"lr": lr, "etas": group["etas"], "step_size_limits": group["step_sizes"], "maximize": group["maximize"]}
        _check(F.rprop_step, 2, h)
        return h

    def _group_step(self, group, h, params, grads, states, step, grad_scale, found_inf):
        F.rprop_step(params, grads, [s["prev"] for s in states], [s["step_size"] for s in states], step=step,
                     grad_scale=grad_scale, found_inf=found_inf, **h)


def _check(fn, nstates, h):
    """Validate hyperparameters by running the functional step on an empty list (touches nothing)."""
    fn([], [], *([[]] * nstates), step=1, **h)
