"""CUDA array interfaces, streams and devices: a step is ordered after a __cuda_array_interface__ v3 producer's
stream, zero-size CUDA arrays carry their own device, and arrays on a device that is not the current one step on
that device's current stream with state allocated there.  Every result is compared with the same step on the CPU
(optkern's CPU path on host copies).  Skipped without CuPy and a GPU; the device-1 test needs two GPUs."""

import os

import numpy as np
import pytest

import optkern
from optkern import optim
from reference import require_cupy_gpu

cupy = require_cupy_gpu("array-interface and stream")

NGPU = int(cupy.cuda.runtime.getDeviceCount())
HYPER = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)
STEP = 3  # not a first step: the state read by the step matters too
WAIT_NS = 200_000_000  # the producer kernel spins this long (0.2 s) before it writes


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """CUDA kernels do not depend on the CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def tol(dtype):  # as tests/test_cupy.py: the GPU rounds like the CPU paths (no FMA contraction, IEEE div/sqrt)
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


# A copy of nbytes that first spins for wait_ns of GPU wall time (%globaltimer), on one block: a long write the
# step must wait for, leaving the rest of the GPU free so that an unordered step would run before it.
_SLOW_COPY_SRC = r"""
extern "C" __global__ void slow_copy(unsigned char* out, const unsigned char* src, long long nbytes,
                                     unsigned long long wait_ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < wait_ns);
  for (long long i = threadIdx.x; i < nbytes; i += blockDim.x) out[i] = src[i];
}
"""
_slow_copy = cupy.RawKernel(_SLOW_COPY_SRC, "slow_copy")


def slow_write(out, src, stream):
    """Queue `out[...] = src` on `stream` behind a 0.2 s spin (both CuPy arrays on the current device)."""
    assert out.nbytes == src.nbytes and out.flags.c_contiguous and src.flags.c_contiguous
    with stream:
        _slow_copy((1,), (256,), (out, src, np.int64(out.nbytes), np.uint64(WAIT_NS)))


class Producer:
    """A CuPy array exported as a CAI v3 producer whose pending work is on `stream` (None: no 'stream' entry, the
    producer promises nothing and the consumer orders nothing)."""

    def __init__(self, a, stream):
        self.a, self.stream, self.device = a, stream, a.device

    @property
    def __cuda_array_interface__(self):
        d = dict(self.a.__cuda_array_interface__)
        d["version"] = 3
        d["stream"] = None if self.stream is None else (self.stream.ptr or 1)  # CAI v3: 1 is the legacy stream
        return d


def host_data(rng, n, dtype):
    p = rng.standard_normal(n).astype(dtype)
    g_old = rng.standard_normal(n).astype(dtype)  # what the grad holds before the producer's write
    g_new = rng.standard_normal(n).astype(dtype)  # what the producer writes
    m = rng.standard_normal(n).astype(dtype)
    v = rng.uniform(0.1, 1.0, n).astype(dtype)
    return p, g_old, g_new, m, v


def cpu_adam(p, g, m, v):
    """The eager CPU reference: the same step on host copies."""
    p, m, v = p.copy(), m.copy(), v.copy()
    optkern.adam_step([p], [g], [m], [v], step=STEP, **HYPER)
    return p, m, v


def make_stream(kind):
    if kind == "non_blocking":
        return cupy.cuda.Stream(non_blocking=True)
    if kind == "legacy":
        return cupy.cuda.Stream.null
    ptds = getattr(cupy.cuda.Stream, "ptds", None)
    if ptds is None:
        pytest.skip("this CuPy has no per-thread default stream (cupy.cuda.Stream.ptds)")
    return ptds


# The legacy stream synchronises implicitly with blocking streams (the per-thread default stream among them), so
# those pairs are left out: each pair below is ordered only by the event optkern records and waits on.
@pytest.mark.parametrize("producer,consumer", [("non_blocking", "non_blocking"), ("legacy", "non_blocking"),
                                               ("ptds", "non_blocking"), ("non_blocking", "null")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_is_ordered_after_the_producer_stream(rng, producer, consumer, dtype):
    n = 4099
    p, g_old, g_new, m, v = host_data(rng, n, dtype)
    P, G, SRC, M, V = (cupy.asarray(x) for x in (p, g_old, g_new, m, v))
    cupy.cuda.Device().synchronize()
    prod = make_stream(producer)
    step_stream = cupy.cuda.Stream(non_blocking=True) if consumer == "non_blocking" else cupy.cuda.Stream.null
    slow_write(G, SRC, prod)
    with step_stream:
        optkern.adam_step([P], [Producer(G, prod)], [M], [V], step=STEP, **HYPER)
    step_stream.synchronize()
    prod.synchronize()
    rp, rm, rv = cpu_adam(p, g_new, m, v)
    np.testing.assert_allclose(cupy.asnumpy(P), rp, **tol(dtype))
    np.testing.assert_allclose(cupy.asnumpy(M), rm, **tol(dtype))
    np.testing.assert_allclose(cupy.asnumpy(V), rv, **tol(dtype))


@pytest.mark.skipif(os.environ.get("CUDA_LAUNCH_BLOCKING") == "1", reason="serialised launches order every step")
def test_without_a_producer_stream_the_step_is_not_ordered(rng):
    """The control for the test above: with no 'stream' entry nothing orders the step after the slow write, and
    the step reads the old gradient (so the ordering test can fail)."""
    dtype, n = np.float64, 4099
    p, g_old, g_new, m, v = host_data(rng, n, dtype)
    P, G, SRC, M, V = (cupy.asarray(x) for x in (p, g_old, g_new, m, v))
    cupy.cuda.Device().synchronize()
    prod, step_stream = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    slow_write(G, SRC, prod)
    with step_stream:
        optkern.adam_step([P], [Producer(G, None)], [M], [V], step=STEP, **HYPER)
    step_stream.synchronize()
    prod.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(G), g_new)  # the write did happen, after the step
    np.testing.assert_allclose(cupy.asnumpy(P), cpu_adam(p, g_old, m, v)[0], **tol(dtype))


def test_several_producer_streams_in_one_call(rng):
    """Grads from two producer streams (one of them twice): the step waits for both writes."""
    dtype, sizes = np.float32, (33, 1000, 7)
    data = [host_data(rng, n, dtype) for n in sizes]
    dev = [[cupy.asarray(x) for x in d] for d in data]
    cupy.cuda.Device().synchronize()
    s1, s2 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    streams = (s1, s2, s1)
    for (P, G, SRC, M, V), s in zip(dev, streams):
        slow_write(G, SRC, s)
    step_stream = cupy.cuda.Stream(non_blocking=True)
    with step_stream:
        optkern.adam_step([d[0] for d in dev], [Producer(d[1], s) for d, s in zip(dev, streams)],
                          [d[3] for d in dev], [d[4] for d in dev], step=STEP, **HYPER)
    step_stream.synchronize()
    cupy.cuda.Device().synchronize()
    for (p, g_old, g_new, m, v), (P, G, SRC, M, V) in zip(data, dev):
        rp, rm, rv = cpu_adam(p, g_new, m, v)
        np.testing.assert_allclose(cupy.asnumpy(P), rp, **tol(dtype))
        np.testing.assert_allclose(cupy.asnumpy(V), rv, **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_size_cuda_arrays_step_with_the_rest(rng, dtype):
    """Zero-size CuPy arrays (data pointer 0) in one call with non-empty ones: their device is read from the
    array, the step runs, the others match the CPU, and the norm counts nothing for them."""
    sizes = (0, 5, 0, 33, 0)
    data = [host_data(rng, n, dtype) for n in sizes]
    dev = [[cupy.asarray(x) for x in d] for d in data]
    optkern.adam_step([d[0] for d in dev], [d[1] for d in dev], [d[3] for d in dev], [d[4] for d in dev],
                      step=STEP, **HYPER)
    cupy.cuda.Device().synchronize()
    for (p, g_old, g_new, m, v), (P, G, SRC, M, V) in zip(data, dev):
        rp, rm, rv = cpu_adam(p, g_old, m, v)
        assert P.shape == rp.shape
        np.testing.assert_allclose(cupy.asnumpy(P), rp, **tol(dtype))
        np.testing.assert_allclose(cupy.asnumpy(M), rm, **tol(dtype))
    host_norm = float(np.sqrt(sum(float(np.sum(d[1].astype(np.float64) ** 2)) for d in data)))
    assert optkern.global_norm([d[1] for d in dev]) == pytest.approx(host_norm, rel=1e-12)


def test_zero_size_cuda_array_without_a_device_is_refused(rng):
    class Bare:  # the interface alone: pointer 0, no .device to say which GPU
        __cuda_array_interface__ = {"shape": (0,), "typestr": "<f4", "data": (0, False), "version": 3}

    P, G, M, V = (cupy.asarray(rng.standard_normal(4).astype(np.float32)) for _ in range(4))
    before = cupy.asnumpy(P)
    z = cupy.zeros((0,), np.float32)
    with pytest.raises(ValueError, match=r"^grads\[1\]: a zero-size CUDA array \(data pointer 0\) whose device is "
                                         r"unknown"):
        optkern.adam_step([P, z], [G, Bare()], [M, z.copy()], [V, z.copy()], step=1)
    np.testing.assert_array_equal(cupy.asnumpy(P), before)


@pytest.mark.skipif(NGPU < 2, reason="needs two GPUs: arrays on device 1 while device 0 is current")
def test_step_on_device_1_while_device_0_is_current(rng):
    """CuPy arrays on device 1, device 0 current: the class optimizer makes its state on device 1 and the step
    runs on device 1's current stream (here a non-blocking stream whose slow write the step must follow)."""
    dtype, sizes = np.float32, (33, 0, 1000)
    data = [host_data(rng, n, dtype)[:3] for n in sizes]  # p, g_old, g_new
    with cupy.cuda.Device(1):
        dev = [[cupy.asarray(x) for x in d] for d in data]
        s1 = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device(1).synchronize()
    assert cupy.cuda.runtime.getDevice() == 0
    params = [d[0] for d in dev]
    opt = optim.Adam(params, **HYPER)
    ref_params = [d[0].copy() for d in data]
    ref = optim.Adam(ref_params, **HYPER)
    with cupy.cuda.Device(1):
        with s1:  # device 1's current stream
            for P, G, SRC in dev:
                if G.size:
                    slow_write(G, SRC, s1)
            with cupy.cuda.Device(0):
                assert cupy.cuda.runtime.getDevice() == 0
                opt.step([d[1] for d in dev])
                opt.step([d[1] for d in dev])
        s1.synchronize()
    assert cupy.cuda.runtime.getDevice() == 0
    for _ in range(2):
        ref.step([d[2] for d in data])
    state_arrays = [s for st in opt.state.values() for s in st.values() if isinstance(s, cupy.ndarray)]
    assert len(state_arrays) >= 2 * (len(sizes) - 1) and all(s.device.id == 1 for s in state_arrays)
    for (P, G, SRC), rp in zip(dev, ref_params):
        assert P.device.id == 1
        np.testing.assert_allclose(cupy.asnumpy(P), rp, **tol(dtype))
