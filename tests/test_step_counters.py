"""Step counts kept in arrays (StepInfo::device_counters), on the CPU.

A functional step given ``step=`` a one-element float32/float64 array (the steps taken) reads it, makes its
coefficients from it + 1 with ``counter_step`` (optim_coefs.h: the function each GPU thread of the CUDA executor
runs) and advances it; NAdam's product likewise.  Results must equal the integer-step path bit for bit, per counter
when params are at different counts, and a skipped step (found_inf) or a refused one changes nothing.
"""

import numpy as np
import pytest

import optkern
from optkern import _C

SIZES = [1, 7, 33, 1000]

# algorithm -> (state count, keywords)
ALGOS = {"sgd": (1, {"lr": 0.05, "momentum": 0.9}), "adam": (2, {"lr": 1e-2, "weight_decay": 0.01}),
         "adamw": (2, {"lr": 1e-2, "weight_decay": 0.01}), "adagrad": (1, {"lr": 0.1, "lr_decay": 0.01}),
         "rmsprop": (1, {"lr": 0.01}), "adamax": (2, {"lr": 0.01}), "adadelta": (2, {}), "rprop": (2, {})}


def _arrays(rng, dtype, nstate, sizes=SIZES):
    ps = [rng.standard_normal(n).astype(dtype) for n in sizes]
    states = [[np.abs(rng.standard_normal(n)).astype(dtype) * 0.1 + 0.01 for n in sizes] for _ in range(nstate)]
    return ps, states


def _copy(lst):
    return [a.copy() for a in lst]


@pytest.mark.parametrize("cdtype", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_counter_equals_integer_steps(rng, algo, dtype, cdtype):
    nstate, kw = ALGOS[algo]
    fn = getattr(optkern, f"{algo}_step")
    ps, states = _arrays(rng, dtype, nstate)
    qs, qstates = _copy(ps), [_copy(s) for s in states]
    count = np.zeros(1, cdtype)
    for t in range(1, 6):
        gs = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        fn(ps, gs, *states, step=t, **kw)
        fn(qs, gs, *qstates, step=count, **kw)
        assert count[0] == t
    for a, b in zip(ps + sum(states, []), qs + sum(qstates, [])):
        np.testing.assert_array_equal(a, b)


def test_one_counter_per_param_at_different_counts(rng):
    dtype = np.float32
    ps, (ms, vs) = _arrays(rng, dtype, 2)
    qs, qms, qvs = _copy(ps), _copy(ms), _copy(vs)
    taken = [0, 3, 3, 10]
    counters = [np.array([t], np.float32) for t in taken]
    gs = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    for i, t in enumerate(taken):  # the reference: each param at its own integer step
        optkern.adam_step([ps[i]], [gs[i]], [ms[i]], [vs[i]], step=t + 1, lr=1e-2)
    optkern.adam_step(qs, gs, qms, qvs, step=counters, lr=1e-2)
    assert [float(c[0]) for c in counters] == [t + 1 for t in taken]
    for a, b in zip(ps + ms + vs, qs + qms + qvs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pdtype", [np.float32, np.float64])
def test_nadam_product_array(rng, pdtype):
    dtype = np.float64
    ps, (ms, vs) = _arrays(rng, dtype, 2)
    qs, qms, qvs = _copy(ps), _copy(ms), _copy(vs)
    count, prod = np.zeros(1, np.float64), np.ones(1, pdtype)
    mu = 1.0
    h = optkern.functional.build_hyper("nadam", lr=1e-2)
    for t in range(1, 6):
        gs = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        # the reference: the host-counted binding, the product rounded to float32 as a float32 array rounds it
        mu = _C.nadam_step(ps, gs, [ms, vs], ["exp_avgs", "exp_avg_sqs"], h, t, mu,
                           mu_product_float32=pdtype == np.float32)
        optkern.nadam_step(qs, gs, qms, qvs, step=count, mu_product=prod, lr=1e-2)
    assert count[0] == 5 and prod[0] == pdtype(mu)
    for a, b in zip(ps + ms + vs, qs + qms + qvs):
        np.testing.assert_array_equal(a, b)


def test_found_inf_changes_nothing_count_included(rng):
    ps, (ms, vs) = _arrays(rng, np.float32, 2)
    before = _copy(ps + ms + vs)
    count = np.array([4.0], np.float32)
    gs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    optkern.adam_step(ps, gs, ms, vs, step=count, found_inf=True)
    assert count[0] == 4.0
    for a, b in zip(ps + ms + vs, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("counter,exc,msg", [
    (np.zeros(1, np.int32), TypeError, "float32 or float64"),
    (np.zeros(2, np.float32), TypeError, "one-element"),
    ([np.zeros(1, np.float32)] * 2, ValueError, "one counter per param"),
])
def test_bad_counters_refused_and_nothing_written(rng, counter, exc, msg):
    ps, (ms, vs) = _arrays(rng, np.float32, 2)
    before = _copy(ps + ms + vs)
    gs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    with pytest.raises(exc, match=msg):
        optkern.adam_step(ps, gs, ms, vs, step=counter)
    for a, b in zip(ps + ms + vs, before):
        np.testing.assert_array_equal(a, b)


def test_read_only_counter_refused(rng):
    ps, (ms, vs) = _arrays(rng, np.float32, 2)
    before = _copy(ps + ms + vs)
    count = np.zeros(1, np.float32)
    count.flags.writeable = False
    gs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    with pytest.raises(ValueError, match="read-only"):
        optkern.adam_step(ps, gs, ms, vs, step=count)
    for a, b in zip(ps + ms + vs, before):
        np.testing.assert_array_equal(a, b)


def test_nadam_needs_both_in_arrays(rng):
    ps, (ms, vs) = _arrays(rng, np.float32, 2)
    gs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    with pytest.raises(ValueError, match="mu_product"):
        optkern.nadam_step(ps, gs, ms, vs, step=np.zeros(1, np.float32), mu_product=1.0)


def test_torch_cpu_tensor_counter(rng):
    torch = pytest.importorskip("torch")
    ps, (ms, vs) = _arrays(rng, np.float32, 2)
    qs, qms, qvs = _copy(ps), _copy(ms), _copy(vs)
    count = torch.zeros((), dtype=torch.float32)  # torch's state["step"]: a 0-d float32 tensor
    for t in range(1, 4):
        gs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        optkern.adam_step(ps, gs, ms, vs, step=t)
        optkern.adam_step(qs, gs, qms, qvs, step=count)
    assert float(count) == 3.0
    for a, b in zip(ps + ms + vs, qs + qms + qvs):
        np.testing.assert_array_equal(a, b)


def test_a_float_step_is_still_refused():
    p = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="step"):
        optkern.adam_step(p, p.copy(), np.zeros(4, np.float32), np.zeros(4, np.float32), step=1.0)
