"""OGR's CUDA kernel against the CPU (run by bench/gpu_check.sh's gpu_ogr stage on a GPU machine; skipped elsewhere).

The CPU path is checked against the float64 transcriptions in tests/test_ogr.py; the GPU applies the same rule
(optim_rules.h: OgrRule) without FMA contraction, so it must equal the CPU bit for bit: float32 and float64, sizes
hitting the 16-byte packs' and the 16384-element chunks' tails, arrays at odd element offsets (the unpacked path),
host step counts and device counters (the warm-up and first-step flags made on the device).  16-bit storage on the GPU
is tests/test_cuda_mixed_precision.py's 'ogr' case (tests/mixed_reference.py CASES).
"""

import os

import numpy as np
import pytest

import optkern

cp = pytest.importorskip("cupy", reason="CuPy is needed for the CUDA OGR tests")
if not optkern.cuda_available():
    pytest.skip("no CUDA device (or optkern built without CUDA kernels) on this machine", allow_module_level=True)

SIZES = [1, 3, 17, 1000, 16385, 40001]
HY = dict(lr=0.5, sgd_lr=0.05, beta=0.9, warmup=3, trust=2.0, eps=1e-6, weight_decay=0.01)


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("device_count", [False, True])
def test_ogr_gpu_equals_cpu_bitwise(rng, dtype, offset, device_count):
    a = [rng.uniform(-1.0, 2.0, n) for n in SIZES]  # curvatures of both signs: attract, repel, the clip
    ps = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    sts = [[np.zeros(n, dtype) for n in SIZES] for _ in range(5)]
    gps = [cp.asarray(p) for p in ps]
    if offset:  # odd element offsets: the kernel's unpacked path
        bufs = [cp.zeros(p.size + offset, dtype) for p in ps]
        gps = [b[offset:] for b in bufs]
        for g, p in zip(gps, ps):
            g[...] = cp.asarray(p)
    gsts = [[cp.zeros(n, dtype) for n in SIZES] for _ in range(5)]
    count = cp.zeros(1, cp.float32)
    for t in range(1, 12):
        gs = [(ai * p + 0.05 * rng.standard_normal(p.size)).astype(dtype) for ai, p in zip(a, ps)]
        optkern.ogr_step(ps, gs, *sts, step=t, **HY)
        ggs = [cp.asarray(g) for g in gs]
        optkern.ogr_step(gps, ggs, *gsts, step=count if device_count else t, **HY)
        for i, (p, gp) in enumerate(zip(ps, gps)):
            np.testing.assert_array_equal(p, gp.get(), err_msg=f"step {t} params[{i}]")
    if device_count:
        assert float(count.get()[0]) == 11.0
    for k in range(5):
        for s, gs_ in zip(sts[k], gsts[k]):
            np.testing.assert_array_equal(s, gs_.get())


