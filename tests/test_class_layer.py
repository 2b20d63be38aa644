"""optkern.optim's classes never half-apply a step: errors are raised before any kernel runs and name the caller's
index, an interrupt delivered as a kernel returns leaves counts and buffers together, steps from two threads are
serialised, found_inf=True still validates, and every class deepcopies and pickles."""

from __future__ import annotations

import copy
import math
import pickle
import sys
import threading

import numpy as np
import pytest

import optkern
from conftest import AVAILABLE_ISAS
from optkern import optim
from optkern import schedules as S

CLASSES = [
    (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (optim.AdamW, dict(lr=0.01, betas=(0.8, 0.9))),
    (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    (optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    (optim.Adamax, dict(lr=0.01, weight_decay=0.01)),
    (optim.NAdam, dict(lr=0.01, momentum_decay=0.01)),
    (optim.Adadelta, dict(lr=0.5, rho=0.8)),
    (optim.Rprop, dict(lr=0.01, etas=(0.4, 1.3))),
]
IDS = [c.__name__ for c, _ in CLASSES]
SIZES = (5, 7, 12)


@pytest.fixture(autouse=True)
def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent (the class layer's bookkeeping): runs once under the best path")


def make(cls, kw, seed=0, groups=((0, 1), (2,)), dtype=np.float64):
    """An optimizer over three params in param groups (flat indices per group), and its params."""
    r = np.random.default_rng(seed)
    params = [r.standard_normal(n).astype(dtype) for n in SIZES]
    lr = kw["lr"]
    opt = cls([{"params": [params[i] for i in g], "lr": lr if callable(lr) else lr * (1 + k)}
               for k, g in enumerate(groups)], **kw)
    return opt, params


def grads_at(k, dtype=np.float64):
    r = np.random.default_rng(1000 + k)
    return [r.standard_normal(n).astype(dtype) for n in SIZES]


def snap(opt, params):
    """Per param: (its bytes, its state with buffers as bytes), for comparisons of everything a step changes."""
    def val(v):
        return (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v
    return [(p.tobytes(), {k: val(v) for k, v in opt.state.get(i, {}).items()}) for i, p in enumerate(params)]


# ---- a failing step leaves everything untouched ---------------------------------------------------------------
def test_issue_example_second_group_refused_first_untouched():
    p0, p1 = np.zeros(5), np.zeros(7)
    opt = optim.Adam([{"params": [p0]}, {"params": [p1]}])
    with pytest.raises(ValueError, match=r"^grads\[1\]: expected shape \(7,\) like params\[1\], got \(8,\)"):
        opt.step([np.ones(5), np.ones(8)])
    assert not p0.any() and not p1.any() and opt.state == {}
    opt.step([np.ones(5), np.ones(7)])
    assert opt.state[0]["step"] == opt.state[1]["step"] == 1 and p0.all() and p1.all()


@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_refused_in_the_last_call_after_steps(cls, kw):
    """Params at different counts (several calls in one group) and two groups: a bad grad in the last call."""
    opt, params = make(cls, kw)
    for k in range(3):
        g = grads_at(k)
        if k == 1:
            g[0] = None  # param 0 falls one step behind: its group now takes two calls
        opt.step(g)
    before = snap(opt, params)
    g = grads_at(3)
    g[1] = g[1].astype(np.float32)
    with pytest.raises(TypeError, match=r"^grads\[1\]: expected float64 like params\[1\]"):
        opt.step(g)
    assert snap(opt, params) == before
    g = grads_at(3)
    g[2] = np.ones(13)
    with pytest.raises(ValueError, match=r"^grads\[2\]: expected shape \(12,\) like params\[2\]"):
        opt.step(g)
    assert snap(opt, params) == before


def test_state_buffer_named_as_the_caller_reads_it():
    opt, params = make(optim.Adam, dict(lr=0.01))
    opt.step(grads_at(0))
    before = snap(opt, params)
    opt.state[2]["exp_avg_sq"].flags.writeable = False
    with pytest.raises(ValueError, match=r"^state\[2\]\['exp_avg_sq'\]: is read-only"):
        opt.step(grads_at(1))
    assert snap(opt, params) == before


def test_bad_schedule_value_in_a_later_group_is_caught_before_any_kernel():
    opt, params = make(optim.SGD, dict(lr=0.1, momentum=0.9))
    opt.step(grads_at(0))
    before = snap(opt, params)
    for bad, exc in [(-0.5, ValueError), (math.nan, ValueError), (10**400, ValueError), ("0.1", TypeError),
                     (None, TypeError)]:
        opt.param_groups[1]["lr"] = lambda k, bad=bad: bad if k >= 1 else 0.1
        with pytest.raises(exc, match=r"^lr: expected .*\(the lr schedule's value at step 1\)"):
            opt.step(grads_at(1))
        assert snap(opt, params) == before


def test_found_inf_true_validates_then_skips():
    opt, params = make(optim.Adam, dict(lr=0.01))
    opt.step(grads_at(0))
    before = snap(opt, params)
    g = grads_at(1)
    g[2] = np.ones(3, np.int32)
    with pytest.raises(TypeError, match=r"^grads\[2\]"):
        opt.step(g, found_inf=True)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"^lr"):
        opt.step(grads_at(1), found_inf=True)
    opt.param_groups[0]["lr"] = 0.01
    opt.step(grads_at(1), found_inf=True)  # valid: skipped, nothing changes
    assert snap(opt, params) == before
    # functional: int32 grads of the wrong shape and step=0 were accepted when skipping
    p, m, v = np.ones(4), np.zeros(4), np.zeros(4)
    with pytest.raises(ValueError, match=r"^step"):
        optkern.adam_step(p, np.ones(4), m, v, step=0, found_inf=True)
    with pytest.raises(TypeError, match=r"^grads\[0\]"):
        optkern.adam_step(p, np.ones(3, np.int32), m, v, step=1, found_inf=True)
    with pytest.raises(ValueError, match=r"^mu_product"):
        optkern.nadam_step(p, np.ones(4), m, v, step=1, mu_product=1.5, found_inf=True)
    assert (p == 1).all() and not m.any() and not v.any()


def test_step_without_grads_on_numpy_params_is_an_error():
    opt, params = make(optim.Adam, dict(lr=0.01))
    with pytest.raises(ValueError, match=r"NumPy and CuPy params need .*opt\.step\(grads\)"):
        opt.step()
    assert opt.state == {}
    opt.step([None, None, None])  # an explicit list of Nones skips every param, as in torch
    assert opt.state == {}


def test_step_without_grads_on_torch_params_without_grads_is_a_no_op():
    torch = pytest.importorskip("torch")
    ps = [torch.zeros(3), torch.zeros(4)]
    opt = optim.Adam(ps, lr=0.1)
    assert opt.step() is None and opt.state == {}
    ps[1].grad = torch.ones(4)
    opt.step()
    assert set(opt.state) == {1} and ps[1].ne(0).all() and ps[0].eq(0).all()


@pytest.mark.parametrize("value,exc", [(10**400, ValueError), ("0.1", TypeError), (True, TypeError),
                                       (None, TypeError), (math.inf, ValueError), (np.float32(0.5), None),
                                       (np.int64(1), None)])
def test_numbers_in_constructor_and_groups(value, exc):
    p = np.zeros(3)
    if exc is None:
        optim.SGD([p], lr=value).step([np.ones(3)])
        return
    with pytest.raises(exc, match=r"^lr"):
        optim.SGD([p], lr=value)
    opt = optim.SGD([p], lr=0.1)
    opt.param_groups[0]["lr"] = value
    with pytest.raises(exc, match=r"^lr"):
        opt.step([np.ones(3)])
    assert not p.any() and opt.state == {}


@pytest.mark.parametrize("step,exc", [(2**70, ValueError), (2**62, ValueError), (1.5, TypeError), (2.0, TypeError),
                                      ("3", TypeError), (True, TypeError), (0, ValueError), (np.int64(3), None)])
def test_functional_step_counts(step, exc):
    p, m, v = np.ones(4), np.zeros(4), np.zeros(4)
    if exc is None:
        optkern.adam_step(p, np.ones(4), m, v, step=step)
        assert not (p == 1).any()
        return
    with pytest.raises(exc, match=r"^step: expected an integer"):
        optkern.adam_step(p, np.ones(4), m, v, step=step)
    assert (p == 1).all() and not m.any()


def test_grad_multiplier_and_the_old_name():
    opt, params = make(optim.Adam, dict(lr=0.01))
    with pytest.raises(TypeError, match=r"^grad_scale: renamed grad_multiplier.*divisor"):
        opt.step(grads_at(0), grad_scale=0.5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'foo'"):
        opt.step(grads_at(0), foo=1)
    for bad, exc in [(10**400, ValueError), (math.nan, ValueError), ("0.5", TypeError)]:
        with pytest.raises(exc, match=r"^grad_multiplier"):
            opt.step(grads_at(0), grad_multiplier=bad)
    assert opt.state == {}
    r = optkern.clip_grad_norm(grads_at(0), 0.5)
    with pytest.raises(AttributeError, match="renamed grad_multiplier"):
        r.grad_scale
    half, ref = make(optim.SGD, dict(lr=0.1)), make(optim.SGD, dict(lr=0.1))
    half[0].step(grads_at(0), grad_multiplier=r.grad_multiplier)
    ref[0].step([g * r.grad_multiplier for g in grads_at(0)])
    for a, b in zip(half[1], ref[1]):
        np.testing.assert_allclose(a, b, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"^max_norm"):
        optkern.clip_grad_norm(grads_at(0), 10**400)


def test_a_device_scalar_on_cpu_params_is_refused_before_any_group_steps():
    class FakeDeviceScalar:  # looks like a CUDA array to the functional layer
        __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}

    opt, params = make(optim.Adam, dict(lr=0.01))
    with pytest.raises(ValueError, match=r"^found_inf: a device scalar is for CUDA arrays"):
        opt.step(grads_at(0), found_inf=FakeDeviceScalar())
    assert opt.state == {} and snap(opt, params) == snap(*make(optim.Adam, dict(lr=0.01)))


def test_groups_of_different_dtypes_step():
    r = np.random.default_rng(3)
    a, b = r.standard_normal(5).astype(np.float32), r.standard_normal(6)
    ra, rb = a.copy(), b.copy()
    opt = optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.01)
    one, two = optim.Adam([ra], lr=0.01), optim.Adam([rb], lr=0.01)
    for k in range(3):
        ga, gb = r.standard_normal(5).astype(np.float32), r.standard_normal(6)
        opt.step([ga, gb])
        one.step([ga])
        two.step([gb])
    assert np.array_equal(a, ra) and np.array_equal(b, rb)


# ---- threads ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", CLASSES[:2] + CLASSES[6:7], ids=IDS[:2] + IDS[6:7])
def test_two_threads_step_one_optimizer_as_some_sequential_order(cls, kw):
    """100 steps from two threads: 100 counted, and (the same grads every step) bitwise the 100 sequential steps."""
    opt, params = make(cls, kw, groups=((0, 1, 2),))
    ref, ref_params = make(cls, kw, groups=((0, 1, 2),))
    g = grads_at(0)
    start = threading.Barrier(2)

    def run():
        start.wait()
        for _ in range(50):
            opt.step(g)

    ts = [threading.Thread(target=run) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for _ in range(100):
        ref.step(g)
    assert [opt.state[i]["step"] for i in range(3)] == [100] * 3
    assert snap(opt, params) == snap(ref, ref_params)


# ---- interrupts -------------------------------------------------------------------------------------------------
class Interrupt:
    """Raise KeyboardInterrupt at the k-th bytecode a step executes (sys.settrace with opcode events), counted from
    the start of ``opt.step`` (after_kernel=False) or from the compiled step's return (after_kernel=True: k = 1 is
    where CPython delivers a signal that arrived while the kernel ran, its eval-breaker check right after the C
    call).  Any bytecode boundary is tried, also those where CPython never delivers one: stricter than signals."""

    def __init__(self, kernel, k, after_kernel):
        self.k, self.count, self.armed, self.fired = k, 0, not after_kernel, False

        def wrapped(*args, **kwargs):
            r = kernel(*args, **kwargs)
            self.armed = True
            return r

        self.wrapped = wrapped

    def _global(self, frame, event, arg):
        if frame.f_code is self.wrapped.__code__:
            return None  # the wrapper's own bytecodes are not the step's
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._local

    def _local(self, frame, event, arg):
        if event == "opcode" and self.armed and not self.fired:
            self.count += 1
            if self.count == self.k:
                self.fired = True
                raise KeyboardInterrupt
        return self._local

    def step(self, opt, *args, **kwargs):
        cls = type(opt)
        opt.__class__ = type(cls.__name__, (cls,), {"_c_step": staticmethod(self.wrapped)})
        sys.settrace(self._global)
        try:
            opt.step(*args, **kwargs)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
            opt.__class__ = cls


def _prepared(cls, kw, prior):
    opt, params = make(cls, kw)
    for k in range(prior):
        opt.step(grads_at(k))
    return opt, params


def _before_or_after(got, before, after, where):
    """Each param exactly as before the step or exactly as after it (value, count and buffers together); a param's
    first-step state may exist at count 0 (its initial buffers, the param untouched), as torch creates it."""
    for i, (g, b, a) in enumerate(zip(got, before, after)):
        fresh = not b[1] and g[1].get("step") == 0 and g[0] == b[0]
        assert g == b or g == a or fresh, f"param {i} half-stepped by an interrupt {where}"


@pytest.mark.parametrize("prior", [0, 2], ids=["first_step", "fast_path"])
@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_interrupt_as_the_kernel_returns_commits_its_bookkeeping(cls, kw, prior):
    """Old behaviour: buffers at step 3, state["step"] at 2.  Now the call whose kernel ran (group 0) is complete:
    counts, buffers and NAdam's product equal an uninterrupted step's; group 1, not run, is untouched."""
    opt, params = _prepared(cls, kw, prior)
    before = snap(opt, params)
    ref, ref_params = _prepared(cls, kw, prior)
    ref.step(grads_at(prior))
    after = snap(ref, ref_params)
    trap = Interrupt(cls._c_step, 1, after_kernel=True)
    trap.step(opt, grads_at(prior))
    assert trap.fired, "the interrupt was never raised"
    got = snap(opt, params)
    assert got[:2] == after[:2], "group 0 (its kernel ran) must be complete: counts with buffers"
    assert got[2] == before[2], "group 1 (not run) must be untouched"
    opt.step(grads_at(prior + 1))  # and the next step goes on from each param's own count
    assert [opt.state[i]["step"] for i in range(3)] == [prior + 2, prior + 2, prior + 1]


@pytest.mark.parametrize("cls,kw,prior", [CLASSES[1] + (0,), CLASSES[1] + (2,), CLASSES[6] + (2,)],
                         ids=["Adam-first_step", "Adam-fast_path", "NAdam-fast_path"])
def test_interrupt_at_every_bytecode_of_a_step_keeps_each_param_consistent(cls, kw, prior):
    ref, ref_params = _prepared(cls, kw, prior)
    ref.step(grads_at(prior))
    after = snap(ref, ref_params)
    k = 1
    while True:
        opt, params = _prepared(cls, kw, prior)
        before = snap(opt, params)
        trap = Interrupt(cls._c_step, k, after_kernel=False)
        trap.step(opt, grads_at(prior))
        _before_or_after(snap(opt, params), before, after, f"at bytecode {k}")
        if not trap.fired:
            break
        opt.step(grads_at(prior + 1))  # the interrupted optimizer keeps working
        k += 1
    assert k > 50


@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_interrupt_raised_by_a_python_kernel_wrapper_after_the_kernel(cls, kw):
    """The interrupt raised inside a Python wrapper around the kernel, after the real kernel returned (not where
    CPython delivers signals, but the test style of a wrapped _c_step): the binding counted the run, so the step
    is committed too."""
    opt, params = _prepared(cls, kw, 1)
    ref, ref_params = _prepared(cls, kw, 1)
    ref.step(grads_at(1))
    after = snap(ref, ref_params)
    real = cls._c_step

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    opt.__class__ = type(cls.__name__, (cls,), {"_c_step": staticmethod(interrupted)})
    with pytest.raises(KeyboardInterrupt):
        opt.step(grads_at(1))
    opt.__class__ = cls
    assert snap(opt, params)[:2] == after[:2]


def test_interrupt_while_the_binding_reads_its_arguments_changes_nothing():
    """A KeyboardInterrupt from Python code the binding runs before the kernel (e.g. torch's __dlpack__): no count
    moves, the params are untouched, and the next step is a first step."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    opt, params = make(optim.Adam, dict(lr=0.01), groups=((0, 1, 2),))
    ref, ref_params = make(optim.Adam, dict(lr=0.01), groups=((0, 1, 2),))
    before = snap(opt, params)
    opt.__class__ = type("Adam", (optim.Adam,), {"_c_step": staticmethod(interrupted)})
    with pytest.raises(KeyboardInterrupt):
        opt.step(grads_at(0))
    opt.__class__ = optim.Adam
    _before_or_after(snap(opt, params), before, before, "before the kernel")
    opt.step(grads_at(0))
    ref.step(grads_at(0))
    assert snap(opt, params) == snap(ref, ref_params)


# ---- copy and pickle --------------------------------------------------------------------------------------------
def _roundtrip(how, obj):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("prior", [0, 3])
@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_copy_continues_exactly_as_the_original(cls, kw, prior, how):
    opt, params = make(cls, dict(kw, lr=S.linear_warmup(2, S.exponential_decay(kw["lr"], 0.1))))
    for k in range(prior):
        opt.step(grads_at(k))
    twin = _roundtrip(how, opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(params, twin_params))
    assert snap(twin, twin_params) == snap(opt, params)
    for k in range(prior, prior + 3):
        opt.step(grads_at(k))
        twin.step(grads_at(k))
    assert snap(twin, twin_params) == snap(opt, params)
    assert repr(twin) == repr(opt)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_copy_continues_exactly(how, line_search):
    def closure_for(x):
        a = np.linspace(1.0, 3.0, x.size)
        return lambda: (float(np.sum(a * (x - 1) ** 2 + 0.1 * x ** 4)), [2 * a * (x - 1) + 0.4 * x ** 3])

    x = np.linspace(-1.0, 2.0, 9)
    opt = optim.LBFGS([x], max_iter=3, history_size=4, line_search_fn=line_search)
    opt.step(closure_for(x))
    twin = _roundtrip(how, opt)
    y = twin.param_groups[0]["params"][0]
    assert y is not x and np.array_equal(x, y)
    for _ in range(3):
        opt.step(closure_for(x))
        twin.step(closure_for(y))
    assert np.array_equal(x, y) and opt.state == twin.state


def test_state_dict_with_a_schedule_pickles_and_resumes():
    opt, params = make(optim.Adam, dict(lr=S.linear_decay(0.1, 0.001, 10)))
    opt.step(grads_at(0))
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    fresh, fresh_params = make(optim.Adam, dict(lr=0.5))
    for p, q in zip(fresh_params, params):
        p[...] = q
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == S.linear_decay(0.1, 0.001, 10)
    opt.step(grads_at(1))
    fresh.step(grads_at(1))
    assert snap(fresh, fresh_params) == snap(opt, params)


@pytest.mark.parametrize("bad", [1.5, "2", -1, 2**62, None, True])
def test_load_state_dict_refuses_a_step_count_that_is_not_one(bad):
    opt, params = make(optim.Adam, dict(lr=0.01))
    opt.step(grads_at(0))
    sd = opt.state_dict()
    before = snap(opt, params)
    sd["state"][1]["step"] = bad
    with pytest.raises(ValueError, match=r"^state_dict: state\[1\]\['step'\]"):
        opt.load_state_dict(sd)
    assert snap(opt, params) == before
