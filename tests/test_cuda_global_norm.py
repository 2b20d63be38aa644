"""The global norm and the device clip on CUDA arrays, against the CPU executor.

The CUDA executor follows the order of global_norm_api.h (fixed by the sizes alone, no FMA), as the CPU does
(test_global_norm_plan.py checks the CPU against a NumPy transcription of that order), so the norms are expected to
equal the CPU's bitwise, on aligned arrays (16-byte loads) and on views at an odd element offset (element loads).
The results are one-element device arrays in the inputs' library: float64 norm, float32 grad_multiplier and
found_inf, usable directly by a step.  Skipped without CuPy and a CUDA device (torch cases: without torch CUDA).
"""

from __future__ import annotations

import math

import numpy as np
import optkern
import pytest
from optkern import _C
from optkern import optim as ok
from reference import rel_err, require_cupy_gpu
from test_global_norm_plan import PART, gn_reference

cupy = require_cupy_gpu("global norm")

SIZES = {
    "tails": [1, 17, 63, 64, 65, 1023, 1024, 1025, 4097, 0, 3],
    "parts": [PART - 5, 2 * PART + 17, 5, 1000, 64 * 1023, PART],
    "many_parts": [PART] * 300 + [7] * 5000,  # more parts than the 256 combine slots
}


def _host_and_device(rng, dtype, sizes, offset):
    """Fresh random arrays (magnitudes over six decades) on the host and the same values on the device, both views
    at `offset` elements into their buffer (offset 1: not 16-byte aligned on the device)."""
    host, dev = [], []
    for n in sizes:
        base = (rng.standard_normal(n + offset) * 10.0 ** rng.uniform(-3, 3, n + offset)).astype(dtype)
        host.append(base[offset:])
        dev.append(cupy.asarray(base)[offset:])
    return host, dev


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(SIZES))
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_cuda_norm_equals_cpu_bitwise(rng, dtype, case, offset, norm_type):
    host, dev = _host_and_device(rng, dtype, SIZES[case], offset)
    got = optkern.global_norm(dev, norm_type)
    assert isinstance(got, cupy.ndarray) and got.shape == (1,) and got.dtype == cupy.float64
    assert got.device.id == dev[0].device.id
    cpu = optkern.global_norm(host, norm_type)
    assert float(got[0]) == cpu
    if case != "many_parts":  # (the transcription is slow on 20M values; the host tests cover the CPU's order)
        assert cpu == gn_reference(host, norm_type)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_cuda_norm_many_small_tensors(rng, dtype):
    """70 000 small tensors (about 1100 parts: more than one wave of blocks, so the grid-stride loop turns), as views
    of one buffer (most of them not 16-byte aligned)."""
    sizes = [int(n) for n in rng.integers(0, 200, 70_000)] + [PART + 3]
    flat = (rng.standard_normal(sum(sizes)) * 10.0 ** rng.uniform(-3, 3, sum(sizes))).astype(dtype)
    gflat = cupy.asarray(flat)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    host = [flat[a:b] for a, b in zip(offs[:-1], offs[1:])]
    dev = [gflat[a:b] for a, b in zip(offs[:-1], offs[1:])]
    assert float(optkern.global_norm(dev)[0]) == optkern.global_norm(host)
    assert float(optkern.global_norm(dev, math.inf)[0]) == optkern.global_norm(host, math.inf)


def test_cuda_norm_empty_tensors_only(rng):
    dev = [cupy.zeros(0, cupy.float32), cupy.zeros(0, cupy.float32)]
    got = optkern.global_norm(dev)
    assert isinstance(got, cupy.ndarray) and float(got[0]) == 0.0
    r = optkern.clip_grad_norm(dev, 1.0)
    assert float(r.total_norm[0]) == 0.0 and float(r.grad_multiplier[0]) == 1.0 and float(r.found_inf[0]) == 0.0


def test_cuda_norm_on_a_side_stream(rng):
    """The kernels are ordered on CuPy's current stream (here a non-blocking one)."""
    host, dev = _host_and_device(rng, np.float64, SIZES["parts"], 0)
    cupy.cuda.Device().synchronize()  # the uploads above are done before the side stream reads them
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        got = optkern.global_norm(dev)
        r = optkern.clip_grad_norm(dev, 1.0)
    s.synchronize()
    want = optkern.global_norm(host)
    assert float(got[0]) == want and float(r.total_norm[0]) == want
    assert float(r.grad_multiplier[0]) == float(np.float32(min(1.0, 1.0 / (want + 1e-6))))


def test_torch_cuda_result_is_a_torch_tensor(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA: the torch device-result check needs a CUDA build of torch")
    host, _ = _host_and_device(rng, np.float32, SIZES["tails"], 1)
    dev = [torch.from_numpy(np.ascontiguousarray(h)).cuda() for h in host]
    got = optkern.global_norm(dev)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and tuple(got.shape) == (1,)
    assert got.device == dev[0].device
    assert got.item() == optkern.global_norm(host)
    r = optkern.clip_grad_norm(dev, 0.5)
    assert r.grad_multiplier.dtype == torch.float32 and r.found_inf.dtype == torch.float32
    assert r.grad_multiplier.device == dev[0].device and r.found_inf.device == dev[0].device
    assert r.grad_multiplier.item() == float(np.float32(min(1.0, 0.5 / (got.item() + 1e-6))))
    assert r.found_inf.item() == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_clip_then_adam_on_cupy_matches_cpu(rng, dtype):
    """clip_grad_norm on CuPy grads gives device arrays that a CuPy Adam step reads directly; the run equals the CPU
    run given the same float32 multiplier (tolerance: the CUDA and CPU Adam kernels' rounding, as in test_cupy)."""
    shapes = [(1,), (7,), (4099,), (33, 17), (70000,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    gparams = [cupy.asarray(p) for p in params]
    kw = {"lr": 0.01, "betas": (0.85, 0.99), "eps": 1e-7, "weight_decay": 0.05, "amsgrad": True}
    opt, gopt = ok.Adam(params, **kw), ok.Adam(gparams, **kw)
    clipped = 0
    for step in range(6):
        scale = 3.0 if step % 2 else 0.001  # some steps clip, some do not
        grads = [(scale * rng.standard_normal(s)).astype(dtype) for s in shapes]
        ggrads = [cupy.asarray(g) for g in grads]
        r = optkern.clip_grad_norm(grads, 5.0)
        gr = optkern.clip_grad_norm(ggrads, 5.0)
        assert isinstance(gr, optkern.ClipResult)
        for a, dt in ((gr.total_norm, cupy.float64), (gr.grad_multiplier, cupy.float32), (gr.found_inf, cupy.float32)):
            assert isinstance(a, cupy.ndarray) and a.shape == (1,) and a.dtype == dt and a.device.id == gparams[0].device.id
        assert float(gr.total_norm[0]) == r.total_norm
        m32 = float(np.float32(r.grad_multiplier))
        assert float(gr.grad_multiplier[0]) == m32 and float(gr.found_inf[0]) == 0.0
        clipped += r.grad_multiplier < 1.0
        opt.step(grads, grad_multiplier=m32)
        gopt.step(ggrads, grad_multiplier=gr.grad_multiplier, found_inf=gr.found_inf)
    assert 0 < clipped < 6
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for i, (p, gp) in enumerate(zip(params, gparams)):
        err = rel_err(cupy.asnumpy(gp), p)
        assert err <= tol, f"param {i}: {err:.3g}"
    # a non-finite gradient: found_inf 1.0, multiplier 1.0, and the step changes no param
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads[3][5, 2] = np.nan
    ggrads = [cupy.asarray(g) for g in grads]
    gr = optkern.clip_grad_norm(ggrads, 5.0)
    assert math.isnan(float(gr.total_norm[0]))
    assert float(gr.found_inf[0]) == 1.0 and float(gr.grad_multiplier[0]) == 1.0
    before = [gp.copy() for gp in gparams]
    gopt.step(ggrads, grad_multiplier=gr.grad_multiplier, found_inf=gr.found_inf)
    for gp, b in zip(gparams, before):
        assert cupy.asnumpy(gp).tobytes() == cupy.asnumpy(b).tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_if_nonfinite_on_cuda(rng, bad):
    _host, dev = _host_and_device(rng, np.float32, SIZES["tails"], 0)
    assert float(optkern.clip_grad_norm(dev, 1.0, error_if_nonfinite=True).found_inf[0]) == 0.0
    dev[8][100] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        optkern.clip_grad_norm(dev, 1.0, error_if_nonfinite=True)
    r = optkern.clip_grad_norm(dev, 1.0, norm_type=math.inf)
    assert float(r.found_inf[0]) == 1.0


def test_device_outputs_validated_before_anything_is_written(rng):
    dev = [cupy.asarray(rng.standard_normal(100))]
    out = cupy.full(1, 7.0)
    gm, fi = cupy.full(1, 7.0, cupy.float32), cupy.full(1, 7.0, cupy.float32)
    cases = [
        ({"out": cupy.zeros(1, cupy.float32)}, "out: expected a one-element float64 CUDA array"),
        ({"out": cupy.zeros(2)}, "out: expected a one-element float64 CUDA array"),
        ({"out": np.zeros(1)}, "out: expected a one-element float64 CUDA array"),
        ({"grad_multiplier": gm}, "grad_multiplier: give grad_multiplier and found_inf together"),
        ({"grad_multiplier": gm, "found_inf": cupy.zeros(1)}, "found_inf: expected a one-element float32"),
        ({"grad_multiplier": gm, "found_inf": fi, "max_norm": -1.0}, "max_norm: expected a finite number >= 0"),
        ({"grad_multiplier": gm, "found_inf": fi, "max_norm": math.inf}, "max_norm: expected a finite number >= 0"),
        ({"norm_type": 1.0}, "norm_type: expected 2.0 or inf"),
    ]
    for kw, msg in cases:
        args = {"out": out, "norm_type": 2.0}
        args.update(kw)
        with pytest.raises(ValueError, match="^" + msg):
            _C.global_norm_device(dev, args.pop("norm_type"), args.pop("out"), 0, **args)
    assert float(out[0]) == 7.0 and float(gm[0]) == 7.0 and float(fi[0]) == 7.0
    with pytest.raises((TypeError, ValueError), match=r"^grads\[1\]"):
        optkern.global_norm([dev[0], np.zeros(3)])
