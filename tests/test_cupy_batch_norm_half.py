"""16-bit batch norm on CUDA arrays (issue 14): CuPy float16 and torch CUDA bfloat16 / float16 x, dy, y, dx with
float32 parameters, statistics and weight gradients.  Skipped without CuPy and a CUDA device.

The CUDA executor loads every 16-bit element with precision.h's exact conversion and stores y / dx rounded to
nearest-even, around the float32 kernels (same sums, same order as the CPU executor), so every output equals the
CPU's bitwise; the CPU's 16-bit results are themselves checked against the float64 reference and torch in
tests/test_batch_norm_half.py.
"""

import os

import numpy as np
import optkern
import pytest
from reference import require_cupy_gpu

cupy = require_cupy_gpu("16-bit batch-norm")

from test_batch_norm_half import BF16, F16, all_ops, assert_bits, half_data
from test_cupy_batch_norm import gpu, gpu_like, host, offset_view


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """CUDA kernels do not depend on the CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


# Rows layouts (several row blocks and groups, narrow and wide rows, partial column packs of 8), channels-last and
# channels-first (SIMD tails, two chunks).
CASES = [((1000, 7), 1), ((4099, 130), 1), ((3000, 64), 1), ((257, 33), 1), ((33, 5, 3), 1), ((8, 28, 28, 64), -1),
         ((4, 9, 7, 6), -1), ((2, 3, 16385), 1), ((4, 5, 9, 9), 1), ((3, 4, 77), 1)]
IDS = ["NC7", "NC130", "NC64", "NC33", "rows-inner3", "NHWC64", "NHWC6", "cf-2chunks", "cf", "cf-tail"]


def host_all(out):
    return {k: host(v) for k, v in out.items()}


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_cupy_float16_equals_cpu_bitwise(rng, shape, axis, offset):
    x, dy, w, b, rm, rv = half_data(rng, shape, axis, F16)
    want = all_ops(x, dy, w, b, rm, rv, axis)
    if axis == 1 and offset:
        X, DY = offset_view(x, offset), offset_view(dy, offset)  # not 16-byte aligned: scalar loads
    else:
        X, DY = gpu_like(x), gpu_like(dy)
    got = host_all(all_ops(X, DY, gpu(w), gpu(b), gpu(rm), gpu(rv), axis))
    for k, v in want.items():
        assert_bits(got[k], v, k)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_torch_cuda_16bit_equals_cpu_bitwise(rng, shape, axis, dtype_name):
    torch = pytest.importorskip("torch", reason="torch is needed for the torch CUDA bfloat16 checks")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch (torch CPU build): torch CUDA 16-bit batch norm skipped")
    npdt = BF16 if dtype_name == "bfloat16" else F16
    x, dy, w, b, rm, rv = half_data(rng, shape, axis, npdt)
    want = all_ops(x, dy, w, b, rm, rv, axis)
    tdt = getattr(torch, dtype_name)

    def cuda(a):  # 16-bit arrays through float32 (exact), the rest as they are
        t = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32) if a.dtype.itemsize == 2 else a.copy())
        return t.to("cuda").to(tdt) if a.dtype.itemsize == 2 else t.to("cuda")

    with torch.no_grad():
        got = all_ops(cuda(x), cuda(dy), cuda(w), cuda(b), cuda(rm), cuda(rv), axis)
    for k, v in want.items():
        g = got[k].cpu()
        g = g.float().numpy().astype(npdt) if g.dtype == tdt else g.numpy()
        assert_bits(g, v, k)
