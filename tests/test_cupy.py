"""CUDA arrays (CuPy, and torch CUDA tensors when available): Adam / SGD steps against a NumPy reference, in place,
ordered on the current stream.  Skipped without CuPy and a CUDA device."""

import math
import os

import numpy as np
import pytest

import optkern

try:
    import cupy
except Exception:  # noqa: BLE001 - any import failure means no CuPy here
    cupy = None

if cupy is None or not optkern.cuda_available():
    pytest.skip("CuPy with a CUDA device is not available on this machine", allow_module_level=True)

try:
    import torch

    HAVE_TORCH_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    torch, HAVE_TORCH_CUDA = None, False


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """CUDA kernels do not depend on the CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def ref_adam(p, g, m, v, *, step, lr, betas, eps, weight_decay, decoupled=False, grad_multiplier=1.0,
             maximize=False):
    p, g, m, v = (np.asarray(x, np.float64) for x in (p, g, m, v))
    g = g * grad_multiplier * (-1 if maximize else 1)
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    b1, b2 = betas
    m = m + (g - m) * (1 - b1)
    v = v * b2 + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** step) + eps
    return p - lr / (1 - b1 ** step) * m / denom, m, v


def ref_sgd(p, g, buf, *, step, lr, momentum, weight_decay, nesterov):
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    g = g + weight_decay * p
    buf = g.copy() if step == 1 else momentum * np.asarray(buf, np.float64) + g
    d = g + momentum * buf if nesterov else buf
    return p - lr * d, buf


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def _ptr(a):
    return a.__cuda_array_interface__["data"][0]


class CupyLib:
    name = "cupy"

    @staticmethod
    def to(a):
        return cupy.asarray(a)

    @staticmethod
    def host(a):
        return cupy.asnumpy(a)

    ptr = staticmethod(_ptr)


class TorchLib:
    name = "torch"

    @staticmethod
    def to(a):
        return torch.tensor(a, device="cuda")

    @staticmethod
    def host(a):
        return a.detach().cpu().numpy()

    @staticmethod
    def ptr(a):
        return a.data_ptr()


LIBS = [CupyLib] + ([TorchLib] if HAVE_TORCH_CUDA else [])


@pytest.mark.parametrize("lib", LIBS, ids=lambda l: l.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 17, 4097, (1 << 20) + 3])
def test_adam_matches_reference_in_place(rng, lib, dtype, n):
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    m, v = rng.standard_normal(n).astype(dtype), rng.uniform(0, 1, n).astype(dtype)
    dp, dg, dm, dv = (lib.to(a) for a in (p, g, m, v))
    ptrs = [lib.ptr(a) for a in (dp, dg, dm, dv)]
    kw = dict(step=3, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    optkern.adam_step(dp, dg, dm, dv, **kw)
    rp, rm, rv = ref_adam(p, g, m, v, **kw)
    assert [lib.ptr(a) for a in (dp, dg, dm, dv)] == ptrs
    np.testing.assert_allclose(lib.host(dp), rp, **tol(dtype))
    np.testing.assert_allclose(lib.host(dm), rm, **tol(dtype))
    np.testing.assert_allclose(lib.host(dv), rv, **tol(dtype))
    assert np.array_equal(lib.host(dg), g)


@pytest.mark.parametrize("lib", LIBS, ids=lambda l: l.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_two_steps_multi_tensor(rng, lib, dtype):
    sizes = [0, 1, 5, 1000, 70000]
    ps = [rng.standard_normal(n).astype(dtype) for n in sizes]
    g1 = [rng.standard_normal(n).astype(dtype) for n in sizes]
    g2 = [rng.standard_normal(n).astype(dtype) for n in sizes]
    dps, dbufs = [lib.to(p) for p in ps], [lib.to(np.zeros_like(p)) for p in ps]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    optkern.sgd_step(dps, [lib.to(g) for g in g1], dbufs, step=1, **kw)
    optkern.sgd_step(dps, [lib.to(g) for g in g2], dbufs, step=2, **kw)
    for i, p in enumerate(ps):
        rp, rb = ref_sgd(p, g1[i], None, step=1, **kw)
        rp, rb = ref_sgd(rp, g2[i], rb, step=2, **kw)
        np.testing.assert_allclose(lib.host(dps[i]), rp, **tol(dtype))
        np.testing.assert_allclose(lib.host(dbufs[i]), rb, **tol(dtype))


def test_cupy_matches_cpu_float64(rng):
    """The GPU and CPU kernels compute the same function (close; not necessarily bitwise)."""
    n = 3000
    p, g = rng.standard_normal(n), rng.standard_normal(n)
    m, v = np.zeros(n), np.zeros(n)
    dp, dg, dm, dv = (cupy.asarray(a) for a in (p, g, m, v))
    optkern.adam_step(dp, dg, dm, dv, step=1, lr=0.01)
    optkern.adam_step(p, g, m, v, step=1, lr=0.01)
    np.testing.assert_allclose(cupy.asnumpy(dp), p, rtol=1e-13, atol=1e-15)


def test_stream_ordering(rng):
    """A step is ordered after earlier work on the current (non-default) stream and before later work."""
    n = 1 << 22
    s = cupy.cuda.Stream(non_blocking=True)
    g_host = rng.standard_normal(n).astype(np.float32)
    with s:
        p = cupy.zeros(n, cupy.float32)
        g = cupy.empty(n, cupy.float32)
        m, v = cupy.zeros_like(p), cupy.zeros_like(p)
        for _ in range(20):  # keep the stream busy before the grads are written
            p *= 1.0
        g.set(g_host, stream=s)
        optkern.adam_step(p, g, m, v, step=1, lr=0.5)
        out = p * 2.0  # later work on the same stream sees the update
        s.synchronize()
    rp, rm, _ = ref_adam(np.zeros(n, np.float32), g_host, np.zeros(n), np.zeros(n), step=1, lr=0.5,
                         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    np.testing.assert_allclose(cupy.asnumpy(m), rm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cupy.asnumpy(out), 2 * rp, rtol=1e-5, atol=1e-6)


def test_device_scalars(rng):
    n = 100
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    dp, dg = cupy.asarray(p), cupy.asarray(g)
    dm, dv = cupy.zeros_like(dp), cupy.zeros_like(dp)
    optkern.adam_step(dp, dg, dm, dv, step=1, lr=0.1, found_inf=cupy.ones(1, cupy.float32))
    assert np.array_equal(cupy.asnumpy(dp), p) and not cupy.any(dm)
    optkern.adam_step(dp, dg, dm, dv, step=1, lr=0.1, grad_multiplier=cupy.full(1, 0.5, cupy.float32),
                      found_inf=cupy.zeros(1, cupy.float32))
    rp, rm, _ = ref_adam(p, g, np.zeros(n), np.zeros(n), step=1, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=0.0, grad_multiplier=0.5)
    np.testing.assert_allclose(cupy.asnumpy(dm), rm, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(cupy.asnumpy(dp), rp, rtol=1e-5, atol=1e-6)


def test_validation_on_gpu_changes_nothing(rng):
    p = cupy.asarray(rng.standard_normal(8).astype(np.float32))
    g = cupy.asarray(rng.standard_normal(9).astype(np.float32))
    m, v = cupy.ones_like(p), cupy.ones_like(p)
    before = [cupy.asnumpy(a) for a in (p, g, m, v)]
    with pytest.raises(ValueError, match=r"^grads\[0\]"):
        optkern.adam_step(p, g, m, v, step=1)
    with pytest.raises(ValueError, match=r"^lr"):
        optkern.adam_step(p, g[:8], m, v, step=1, lr=-1.0)
    with pytest.raises(ValueError, match=r"overlaps"):
        optkern.adam_step(p, g[:8], p, v, step=1)
    for a, b in zip((p, g, m, v), before):
        assert np.array_equal(cupy.asnumpy(a), b)


def test_mixed_devices_message(rng):
    p = rng.standard_normal(8).astype(np.float32)
    g = cupy.asarray(rng.standard_normal(8).astype(np.float32))
    with pytest.raises(ValueError, match=r"^grads\[0\]") as e:
        optkern.sgd_step(p, g, step=1, lr=0.1)
    assert "an_str()" not in str(e.value)


def test_state_allocated_on_gpu_by_optimizer(rng):
    p = cupy.asarray(rng.standard_normal(10).astype(np.float32))
    opt = optkern.optim.Adam([p], lr=0.1)
    opt.step([cupy.asarray(rng.standard_normal(10).astype(np.float32))])
    assert isinstance(opt.state[0]["exp_avg"], cupy.ndarray)
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["exp_avg"], cupy.ndarray)


def test_class_step_on_gpu_all_or_nothing(rng):
    """optkern.optim on CuPy: a bad grad in the second group refuses the step before the first group's kernel, a
    device found_inf / grad_multiplier reach the kernel (the host counts advance with each kernel call)."""
    from optkern import optim

    ps = [cupy.asarray(rng.standard_normal(n)) for n in (7, 9)]
    opt = optim.Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    before = [p.get() for p in ps]
    with pytest.raises(ValueError, match=r"^grads\[1\]: expected shape \(9,\) like params\[1\]"):
        opt.step([cupy.ones(7), cupy.ones(10)])
    assert all(np.array_equal(p.get(), b) for p, b in zip(ps, before)) and opt.state == {}
    opt.step([cupy.ones(7), cupy.ones(9)], found_inf=cupy.ones(1, cupy.float32))  # skipped on the device
    assert all(np.array_equal(p.get(), b) for p, b in zip(ps, before))
    assert [st["step"] for st in opt.state.values()] == [1, 1]  # (host counts still advance: a known limitation)
    opt.step([cupy.ones(7), cupy.ones(9)], grad_multiplier=cupy.full(1, 0.5, cupy.float32))
    assert [st["step"] for st in opt.state.values()] == [2, 2]
    for p, b in zip(ps, before):
        q, m, v = b.copy(), np.zeros_like(b), np.zeros_like(b)
        optkern.adam_step(q, np.full_like(b, 0.5), m, v, step=2, lr=0.1)
        np.testing.assert_allclose(p.get(), q, rtol=1e-12, atol=0)
