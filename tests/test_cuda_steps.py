"""The CUDA step path's device-side behaviour (run by bench/gpu_check.sh on a GPU machine; skipped elsewhere).

Device step counters (the count read, used and advanced by the kernel; CPU and GPU coefficients equal bit for bit),
found_inf skipping the update and the count advance alike, CUDA-graph capture and replay of a capturable step over
200 tensors, and the cached device table when the arrays of a step change.  The host-side pieces (the table and its
lookup) are tested on the CPU in test_cuda_step_plan.py.
"""

import os

import numpy as np
import pytest

import optkern

cp = pytest.importorskip("cupy", reason="CuPy is needed for the CUDA step tests")
if not optkern.cuda_available():
    pytest.skip("no CUDA device (or optkern built without CUDA kernels) on this machine", allow_module_level=True)

SIZES = [1, 3, 17, 1000, 16385, 40001]  # tails of the 16-byte packs and of the 16384-element chunks


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """The CPU reference is exact on every CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def _arrays(rng, dtype, sizes=SIZES, nstate=2):
    ps = [rng.standard_normal(n).astype(dtype) for n in sizes]
    states = [[np.abs(rng.standard_normal(n)).astype(dtype) * 0.1 for n in sizes] for _ in range(nstate)]
    return ps, states


def _to_gpu(lst):
    return [cp.asarray(a) for a in lst]


def _grads(rng, dtype, sizes=SIZES):
    return [rng.standard_normal(n).astype(dtype) for n in sizes]


@pytest.mark.parametrize("dtype,cdtype", [(np.float32, np.float32), (np.float64, np.float64),
                                          (np.float32, np.float64)])
def test_adam_device_counter_equals_cpu_bitwise(rng, dtype, cdtype):
    ps, (ms, vs) = _arrays(rng, dtype)
    gps, gms, gvs = _to_gpu(ps), _to_gpu(ms), _to_gpu(vs)
    count = cp.zeros(1, cdtype)
    for t in range(1, 8):
        gs = _grads(rng, dtype)
        optkern.adam_step(ps, gs, ms, vs, step=t, lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)
        optkern.adam_step(gps, _to_gpu(gs), gms, gvs, step=count, lr=1e-2, weight_decay=0.01,
                          decoupled_weight_decay=True)
    assert float(count.get()[0]) == 7.0
    for a, b in zip(ps + ms + vs, gps + gms + gvs):
        np.testing.assert_array_equal(a, b.get())  # same rule, same coefficients (optim_coefs.h), no FMA


@pytest.mark.parametrize("algo", ["sgd", "adagrad", "rmsprop", "adamax", "adadelta", "rprop"])
def test_other_rules_device_counter_equal_cpu(rng, algo):
    dtype = np.float32
    spec = {"sgd": (1, dict(lr=0.05, momentum=0.9)), "adagrad": (1, dict(lr=0.1, lr_decay=0.01)),
            "rmsprop": (1, dict(lr=0.01)), "adamax": (2, dict(lr=0.01)), "adadelta": (2, dict()),
            "rprop": (2, dict())}
    nstate, kw = spec[algo]
    ps, states = _arrays(rng, dtype, nstate=nstate)
    if algo == "rprop":
        states[1] = [np.full_like(p, 0.01) for p in ps]
    gps, gstates = _to_gpu(ps), [_to_gpu(s) for s in states]
    fn = getattr(optkern, f"{algo}_step")
    count = cp.zeros(1, cp.float32)
    for t in range(1, 5):
        gs = _grads(rng, dtype)
        fn(ps, gs, *states, step=t, **kw)
        fn(gps, _to_gpu(gs), *gstates, step=count, **kw)
    assert float(count.get()[0]) == 4.0
    for a, b in zip(ps + sum(states, []), gps + sum(gstates, [])):
        np.testing.assert_array_equal(a, b.get())


def test_nadam_device_product_equals_cpu(rng):
    dtype = np.float64
    ps, (ms, vs) = _arrays(rng, dtype)
    gps, gms, gvs = _to_gpu(ps), _to_gpu(ms), _to_gpu(vs)
    count, prod = cp.zeros(1, cp.float64), cp.ones(1, cp.float64)
    mu = 1.0
    for t in range(1, 6):
        gs = _grads(rng, dtype)
        mu = optkern.nadam_step(ps, gs, ms, vs, step=t, mu_product=mu, lr=1e-2)
        optkern.nadam_step(gps, _to_gpu(gs), gms, gvs, step=count, mu_product=prod, lr=1e-2)
    assert float(count.get()[0]) == 5.0
    assert float(prod.get()[0]) == mu
    for a, b in zip(ps + ms + vs, gps + gms + gvs):
        np.testing.assert_array_equal(a, b.get())


def test_found_inf_skips_three_steps_and_the_count(rng):
    dtype = np.float32
    ps, (ms, vs) = _arrays(rng, dtype)
    gps, gms, gvs = _to_gpu(ps), _to_gpu(ms), _to_gpu(vs)
    count = cp.zeros(1, cp.float32)
    flag = cp.ones(1, cp.float32)
    for _ in range(3):  # skipped on the device: nothing changes, the count included
        optkern.adam_step(gps, _to_gpu(_grads(rng, dtype)), gms, gvs, step=count, found_inf=flag)
    assert float(count.get()[0]) == 0.0
    for a, b in zip(ps + ms + vs, gps + gms + gvs):
        np.testing.assert_array_equal(a, b.get())
    flag.fill(0)
    gs = _grads(rng, dtype)
    optkern.adam_step(ps, gs, ms, vs, step=1)  # the first real step is step 1, bias corrections included
    optkern.adam_step(gps, _to_gpu(gs), gms, gvs, step=count, found_inf=flag)
    assert float(count.get()[0]) == 1.0
    for a, b in zip(ps + ms + vs, gps + gms + gvs):
        np.testing.assert_array_equal(a, b.get())


def test_table_cache_follows_the_arrays(rng):
    """Two param sets of the same sizes, a grad that moves, a set that shrinks: each step uses its own arrays."""
    dtype = np.float32
    sets = [_arrays(rng, dtype) for _ in range(2)]
    gpu = [(_to_gpu(p), _to_gpu(m), _to_gpu(v)) for p, (m, v) in sets]
    kept = []  # every step's grads stay alive, so each step's grads really are at new addresses
    for t in range(1, 4):
        for (ps, (ms, vs)), (gps, gms, gvs) in zip(sets, gpu):
            gs = _grads(rng, dtype)
            optkern.adam_step(ps, gs, ms, vs, step=t)
            kept.append(_to_gpu(gs))
            optkern.adam_step(gps, kept[-1], gms, gvs, step=t)
    (ps, (ms, vs)), (gps, gms, gvs) = sets[0], gpu[0]
    gs = _grads(rng, dtype)[:3]
    optkern.adam_step(ps[:3], gs, ms[:3], vs[:3], step=4)
    optkern.adam_step(gps[:3], _to_gpu(gs), gms[:3], gvs[:3], step=4)
    for (ps, (ms, vs)), (gps, gms, gvs) in zip(sets, gpu):
        for a, b in zip(ps + ms + vs, gps + gms + gvs):
            np.testing.assert_array_equal(a, b.get())


def test_zero_size_tensors_in_a_step(rng):
    dtype = np.float32
    sizes = [0, 5, 0, 16384, 0]
    ps, (ms, vs) = _arrays(rng, dtype, sizes)
    gps, gms, gvs = _to_gpu(ps), _to_gpu(ms), _to_gpu(vs)
    count = cp.zeros(1, cp.float32)
    gs = _grads(rng, dtype, sizes)
    optkern.adam_step(ps, gs, ms, vs, step=1)
    optkern.adam_step(gps, _to_gpu(gs), gms, gvs, step=count)
    assert float(count.get()[0]) == 1.0
    for a, b in zip(ps + ms + vs, gps + gms + gvs):
        np.testing.assert_array_equal(a, b.get())
