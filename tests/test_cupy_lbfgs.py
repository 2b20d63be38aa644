"""The L-BFGS kernels on CUDA arrays (CuPy): dots and linear combination against the CPU kernels.

The CUDA executor reproduces the CPU's documented summation order (lbfgs_rules.h: 16 lanes per 256-value lane
block, a fixed lane tree, chunk partials in chunk order) and is built without FMA contraction, so the results are
expected to equal the CPU's bitwise; the test checks that, and the float64 NumPy value within the CPU suite's
tolerance.  Skipped without CuPy and a CUDA device.
"""

import numpy as np
import pytest
from optkern import _C
from reference import require_cupy_gpu

cupy = require_cupy_gpu("L-BFGS kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,nq", [(1, 1, 1), (17, 3, 2), (4097, 10, 1), (100003, 20, 3)])
def test_dots_match_cpu_bitwise(rng, dtype, n, k, nq):
    stored = [rng.standard_normal(n).astype(dtype) + 0.5 for _ in range(k)]
    queries = [rng.standard_normal(n).astype(dtype) - 0.25 for _ in range(nq)]
    cpu = _C.lbfgs_dots(stored, queries)
    gpu = _C.lbfgs_dots([cupy.asarray(a) for a in stored], [cupy.asarray(a) for a in queries])
    np.testing.assert_array_equal(np.asarray(gpu), cpu)
    ref = np.array([[np.dot(q.astype(np.float64), s.astype(np.float64)) for s in stored] for q in queries])
    scale = np.array([[np.abs(q.astype(np.float64) * s).sum() for s in stored] for q in queries])
    tol = 18 * 2.0 ** -24 if dtype == np.float32 else 1e-13
    assert np.all(np.abs(np.asarray(gpu) - ref) <= tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m", [(1, 1), (17, 3), (4097, 21), (1 << 20, 21)])
def test_lincomb_matches_cpu_bitwise(rng, dtype, n, m):
    vecs = [rng.standard_normal(n).astype(dtype) for _ in range(m)]
    coefs = list(rng.standard_normal(m))
    out = np.empty(n, dtype)
    _C.lbfgs_lincomb(vecs, coefs, out)
    gout = cupy.empty(n, dtype)
    _C.lbfgs_lincomb([cupy.asarray(v) for v in vecs], coefs, gout, int(cupy.cuda.get_current_stream().ptr))
    np.testing.assert_array_equal(cupy.asnumpy(gout), out)
