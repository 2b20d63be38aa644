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

Arrays = Sequence[Any]

# The steps' grad_scale / grad_scale_device multiply the gradient (the Python layers call it grad_multiplier; torch's
# grad_scale is a divisor).  counters: addresses of host float scalars (float64 if counters_f64, else float32), each
# incremented by 1 in the same call right after the kernel returns (the class layer counts kernel runs with it);
# NAdam's mu_products: addresses the new momentum product is written to.

def check_hyper(hyper: Any) -> None: ...
def sgd_num_states(h: SgdHyper) -> int: ...
def adam_num_states(h: AdamHyper) -> int: ...
def rmsprop_num_states(h: RmspropHyper) -> int: ...
def sgd_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str], hyper: SgdHyper,
             step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
             grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
             counters_f64: bool = ...) -> None: ...
def adam_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str], hyper: AdamHyper,
              step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
              grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
              counters_f64: bool = ...) -> None: ...
def adagrad_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                 hyper: AdagradHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                 grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                 counters_f64: bool = ...) -> None: ...
def rmsprop_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                 hyper: RmspropHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                 grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                 counters_f64: bool = ...) -> None: ...
def adamax_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                hyper: AdamaxHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                counters_f64: bool = ...) -> None: ...
def nadam_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
               hyper: NadamHyper, step: int, mu_product: float, grad_scale: float = ..., maximize: bool = ...,
               stream: int = ..., grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
               counters_f64: bool = ..., mu_product_float32: bool = ..., mu_products: Any = ...,
               mu_products_f64: bool = ...) -> float: ...
def adadelta_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
                  hyper: AdadeltaHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
                  grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
                  counters_f64: bool = ...) -> None: ...
def rprop_step(params: Arrays, grads: Arrays, states: Sequence[Arrays], state_names: Sequence[str],
               hyper: RpropHyper, step: int, grad_scale: float = ..., maximize: bool = ..., stream: int = ...,
               grad_scale_device: Any = ..., found_inf_device: Any = ..., counters: Any = ...,
               counters_f64: bool = ...) -> None: ...
def global_norm(arrays: Arrays, norm_type: float = ..., stream: int = ...) -> float: ...
def check_arrays(params: Arrays, grads: Arrays, states: Sequence[Arrays], names: Sequence[str], nstates: int,
                 stream: int) -> None: ...
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
# backward_train, backward_eval, backward_reduce, backward_dx.  Returns the values per channel of x.
def batch_norm(op: str, arrays: dict[str, Any], axis: int = ..., eps: float = ..., momentum: float = ...,
               count: int = ..., counts: Sequence[int] = ..., stream: int = ...) -> int: ...
def batch_norm_layout(x: Any, axis: int) -> tuple[int, int, int]: ...
def _bn_plan(outer: int, channels: int, inner: int) -> tuple[bool, int, int, int, int]: ...

# L-BFGS kernels (csrc/bindings/lbfgs_bindings.cpp): arrays of one dtype (float32/float64), element count and
# device, C-contiguous; at most 64 per list.
def lbfgs_dots(stored: Sequence[Any], queries: Sequence[Any], stream: int = ...) -> np.ndarray: ...
def lbfgs_lincomb(vecs: Sequence[Any], coefs: Sequence[float], out: Any, stream: int = ...) -> None: ...
