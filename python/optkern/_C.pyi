"""Type stubs for optkern's compiled core (see csrc/bindings/module.cpp)."""

from typing import Any, Sequence

import numpy as np

class SgdHyper:
    lr: float; momentum: float; dampening: float; weight_decay: float; nesterov: bool; velocity: bool
class AdamHyper:
    lr: float; beta1: float; beta2: float; eps: float; weight_decay: float; amsgrad: bool
    decoupled_weight_decay: bool; eps_inside_sqrt: bool; bias_correction: bool
class AdagradHyper:
    lr: float; lr_decay: float; weight_decay: float; eps: float
class RmspropHyper:
    lr: float; alpha: float; eps: float; weight_decay: float; momentum: float; centered: bool
    eps_inside_sqrt: bool; nesterov: bool
class AdamaxHyper:
    lr: float; beta1: float; beta2: float; eps: float; weight_decay: float
class NadamHyper:
    lr: float; beta1: float; beta2: float; eps: float; weight_decay: float; momentum_decay: float
    decoupled_weight_decay: bool; momentum_schedule: bool
class AdadeltaHyper:
    lr: float; rho: float; eps: float; weight_decay: float
class RpropHyper:
    lr: float; etaminus: float; etaplus: float; step_size_min: float; step_size_max: float
class OgrHyper:
    lr: float; sgd_lr: float; beta: float; trust: float; eps: float; weight_decay: float; warmup: int

Arrays = Sequence[Any]

# The steps' grad_scale / grad_scale_device multiply the gradient (the Python layers call it grad_multiplier; torch's
# grad_scale is a divisor).  counters: addresses of host float scalars (float64 if counters_f64, else float32), each
# incremented by 1 in the same call right after the kernel returns (the class layer counts kernel runs with it);
# NAdam's mu_products: addresses the new momentum product is written to.
# **storage (16-bit training, optim_api.h Precision): masters= (float32 masters for master_weights="fp32", int16 low
# halves for "split"), master_weights= None | "fp32" | "split", param_copies= (16-bit copies of float32 params),
# stochastic_rounding= bool, seed= int in [0, 2**64).

def check_hyper(hyper: Any) -> None: ...
def sgd_num_states(h: SgdHyper) -> int: ...
def adam_num_states(h: AdamHyper) -> int: ...
def rmsprop_num_states(h: RmspropHyper) -> int: ...
def sgd_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str], hyper: SgdHyper,
             step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
             grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
             counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def adam_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str], hyper: AdamHyper,
              step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
              grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
              counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def adagrad_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                 hyper: AdagradHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                 grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                 counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def rmsprop_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                 hyper: RmspropHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                 grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                 counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def adamax_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                hyper: AdamaxHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def nadam_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
               hyper: NadamHyper, step: int, mu_product: float, grad_scale: float = ..., maximize: bool = ...,
               stream: int = ..., grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
               counters_f64: bool = ..., mu_product_float32: bool = ..., mu_products: Any = ...,
               mu_products_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
               **storage: Any) -> float: ...
def adadelta_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                  hyper: AdadeltaHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                  grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                  counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def rprop_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
               hyper: RpropHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
               grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
               counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def ogr_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
             hyper: OgrHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
             grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
             counters_f64: bool = ..., step_counters: Any = ..., mu_product_counters: Any = ...,
             **storage: Any) -> None: ...
def global_norm(arrays: Arrays, norm_type: float = ..., stream: int = ...) -> float: ...
def global_norm_device(arrays: Arrays, norm_type: float, out: Any, stream: int = ..., max_norm: float = ...,
                       grad_multiplier: Any = ..., found_inf: Any = ...) -> None: ...
def _global_norm_plan(numels: Sequence[int]) -> tuple[list[tuple[int, int, int]], list[int]]: ...
def _cuda_chunk_lookup(numels: Sequence[int], chunk: int) -> tuple[list[int], int, list[tuple[int, int, int]]]: ...
def check_arrays(params: Arrays, grads: Arrays, states: Sequence[Arrays], names: Sequence[str], nstates: int,
                 stream: int = ..., **storage: Any) -> None: ...
def _convert_half(src: np.ndarray, dst: np.ndarray, dtype: str, op: int, seed: int = ..., step: int = ...,
                  tensor: int = ..., index0: int = ...) -> None: ...
def cpu_isa() -> str: ...
def cpu_best_isa() -> str: ...
def set_cpu_isa(isa: str) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def cuda_built() -> bool: ...
def cuda_available() -> bool: ...
def _cpu_plan(numels: Sequence[int], nparts: int, align: int) -> list[list[tuple[int, int, int]]]: ...
def _cuda_chunk_plan(numels: Sequence[int], chunk: int) -> list[tuple[int, int, int]]: ...

# batch norm (csrc/bindings/batch_norm_bindings.cpp); ops: forward_train, forward_eval, stats, combine, normalize,
# backward_train, backward_eval, backward_reduce, backward_dx.  x / dy / out: float32, float64, or bfloat16 / float16
# (then weight, bias, running stats, dweight, dbias float32); per-channel statistics float64.  Returns the values per
# channel of x.
def batch_norm(op: str, arrays: dict[str, Any], axis: int = ..., eps: float = ..., momentum: float = ...,
               count: int = ..., counts: Sequence[int] = ..., stream: int = ...) -> int: ...
def batch_norm_layout(x: Any, axis: int) -> tuple[int, int, int]: ...
def _bn_plan(outer: int, channels: int, inner: int) -> tuple[bool, int, int, int, int]: ...

# L-BFGS kernels (csrc/bindings/lbfgs_bindings.cpp): arrays of one dtype (float32/float64), element count and
# device, C-contiguous; at most 64 per list.
def lbfgs_dots(stored: Sequence[Any], queries: Sequence[Any], stream: int = ...) -> np.ndarray: ...
def lbfgs_lincomb(vecs: Sequence[Any], coefs: Sequence[float], out: Any, stream: int = ...) -> None: ...

# cached step plans for optkern.torch (csrc/bindings/pointer_step.cpp): params and state validated once and kept as
# pointers; gather() reads each param's .grad (-1: all present and valid; i >= 0: params[i] has none; -2 - i: the
# plan is stale at params[i]).  The plan_*_step functions run one kernel over a gathered plan and advance its
# counters in the same call.  masters / master_weights / param_copies / stochastic_rounding / seed: the 16-bit
# storage (as the *_step functions take it), validated once and kept in the plan.
class PointerPlan:
    def __init__(self, params: list, arrays: list, grads: list, states: list, state_names: list, stream: int,
                 counters: list[int], counters_f64: bool, contiguous: list[bool], strides: list, shapes: list,
                 dtype: Any,
                 state_dicts: list[dict], watch_keys: list[str], watched: list[list], device_counters: bool = ...,
                 *, masters: list | None = ..., master_weights: str | None = ..., param_copies: list | None = ...,
                 stochastic_rounding: bool = ..., seed: int = ...) -> None: ...
    def gather(self, steps_taken: float) -> int: ...
    def release_grads(self) -> None: ...
    def __len__(self) -> int: ...
def plan_sgd_step(plan: PointerPlan, hyper: SgdHyper, step: int, grad_multiplier: float = ..., maximize: bool = ...,
                  stream: int = ..., grad_scale_device: int = ..., found_inf_device: int = ...) -> None: ...
def plan_adam_step(plan: PointerPlan, hyper: AdamHyper, step: int, grad_multiplier: float = ..., maximize: bool = ...,
                   stream: int = ..., grad_scale_device: int = ..., found_inf_device: int = ...) -> None: ...
def plan_adagrad_step(plan: PointerPlan, hyper: AdagradHyper, step: int, grad_multiplier: float = ...,
                      maximize: bool = ..., stream: int = ..., grad_scale_device: int = ...,
                      found_inf_device: int = ...) -> None: ...
def plan_rmsprop_step(plan: PointerPlan, hyper: RmspropHyper, step: int, grad_multiplier: float = ...,
                      maximize: bool = ..., stream: int = ..., grad_scale_device: int = ...,
                      found_inf_device: int = ...) -> None: ...
def plan_adamax_step(plan: PointerPlan, hyper: AdamaxHyper, step: int, grad_multiplier: float = ...,
                     maximize: bool = ..., stream: int = ..., grad_scale_device: int = ...,
                     found_inf_device: int = ...) -> None: ...
def plan_adadelta_step(plan: PointerPlan, hyper: AdadeltaHyper, step: int, grad_multiplier: float = ...,
                       maximize: bool = ..., stream: int = ..., grad_scale_device: int = ...,
                       found_inf_device: int = ...) -> None: ...
def plan_rprop_step(plan: PointerPlan, hyper: RpropHyper, step: int, grad_multiplier: float = ...,
                    maximize: bool = ..., stream: int = ..., grad_scale_device: int = ...,
                    found_inf_device: int = ...) -> None: ...
def plan_ogr_step(plan: PointerPlan, hyper: OgrHyper, step: int, grad_multiplier: float = ...,
                  maximize: bool = ..., stream: int = ..., grad_scale_device: int = ...,
                  found_inf_device: int = ...) -> None: ...
def plan_nadam_step(plan: PointerPlan, hyper: NadamHyper, step: int, mu_product: float, mu_product_float32: bool,
                    mu_products: list[int], mu_products_f64: bool, grad_multiplier: float = ..., maximize: bool = ...,
                    stream: int = ..., grad_scale_device: int = ..., found_inf_device: int = ...) -> float: ...
def _bn_check_x(x: object, axis: int) -> tuple[int, int, int]: ...
def _bn_row_groups(outer: int, channels: int, inner: int) -> tuple[int, int]: ...
