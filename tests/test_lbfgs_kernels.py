"""The fused L-BFGS kernels (_C.lbfgs_dots, _C.lbfgs_lincomb; csrc/optkern/lbfgs_*): float64 NumPy references, the
documented fixed order of lbfgs_rules.h emulated bit for bit, determinism across thread counts and instruction
sets, validation before any write, and zero-copy views.

Error bounds (u = 2**-24 for float32, 2**-53 for float64):
  dots: each product is rounded in T and each 16-lane accumulator adds at most 16 of them in T before everything
    is widened to double, so |err| <= 17 u sum_j |a_j b_j| (to first order).  Checked as 18 u sum|a b| for
    float32 (~1.07e-6 relative to the sum of |products|) and 1e-13 sum|a b| for float64 (the float64 NumPy
    reference has its own rounding, far below that).
  lincomb: the coefficient cast, the product and k - 1 additions in T: |err| <= (k + 1) u sum_i |c_i v_i|,
    checked as (k + 2) u sum|c v| (float32: ~1.3e-6 for k = 20) and 1e-13 sum|c v| for float64; and bitwise
    against the same formula evaluated in NumPy in T (acc = T(c0) v0, then acc + T(ci) vi in order; NumPy's
    elementwise float ops are single IEEE operations, no FMA).
"""

import numpy as np
import pytest

import optkern
from optkern import _C

NS = [1, 15, 16, 17, 4095, 4096, 4097, 100003]
KS = [1, 3, 10, 11, 20]
NQS = [1, 3]
DTYPES = [np.float32, np.float64]
U = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}
DOT_TOL = {np.float32: 18 * 2.0 ** -24, np.float64: 1e-13}


def _vecs(rng, m, n, dtype):
    # Never zeros: values in +-[0.5, 1.5] with random signs, plus an offset per vector so the sums do not cancel.
    out = []
    for _ in range(m):
        v = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n) + rng.uniform(-1, 1)
        v[v == 0] = 0.25
        out.append(v.astype(dtype))
    return out


# ---- exact emulation of the documented order (lbfgs_rules.h) ---------------------------------------------------

def _block_total(a, b):
    """One lane block (<= 256 values): 16 T lanes, tree 8+8, 4+4, 2+2, 1+1 in double, then the tail in double."""
    blk = len(a)
    vec = blk // 16 * 16
    T = a.dtype.type
    acc = np.zeros(16, dtype=a.dtype)
    p = (a[:vec] * b[:vec]).reshape(-1, 16)
    for r in range(p.shape[0]):
        acc = acc + p[r]
    h = acc.astype(np.float64)
    w = 8
    while w >= 1:
        h = h[:w] + h[w:2 * w]
        w //= 2
    t = float(h[0])
    for j in range(vec, blk):
        t += float(T(a[j] * b[j]))
    return t


def exact_dot(a, b):
    total = 0.0
    for c0 in range(0, len(a), 4096):
        s = 0.0
        for b0 in range(c0, min(len(a), c0 + 4096), 256):
            e = min(len(a), b0 + 256, c0 + 4096)
            s += _block_total(a[b0:e], b[b0:e])
        total += s
    return total


def exact_lincomb(vecs, coefs):
    T = vecs[0].dtype.type
    acc = T(coefs[0]) * vecs[0]
    for c, v in zip(coefs[1:], vecs[1:]):
        acc = acc + T(c) * v
    return acc


# ---- accuracy ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", NS)
def test_dots_vs_float64(rng, n, dtype):
    S = _vecs(rng, max(KS), n, dtype)
    Q = _vecs(rng, max(NQS), n, dtype)
    S64 = np.stack([s.astype(np.float64) for s in S])
    Q64 = np.stack([q.astype(np.float64) for q in Q])
    for k in KS:
        for nq in NQS:
            got = _C.lbfgs_dots(S[:k], Q[:nq])
            assert got.shape == (nq, k) and got.dtype == np.float64
            ref = Q64[:nq] @ S64[:k].T
            scale = np.abs(Q64[:nq]) @ np.abs(S64[:k]).T
            err = np.abs(got - ref)
            assert np.all(err <= DOT_TOL[dtype] * scale), (k, nq, float(np.max(err / scale)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", NS)
def test_lincomb_vs_float64(rng, n, dtype):
    V = _vecs(rng, max(KS), n, dtype)
    coefs_all = list(rng.uniform(-2, 2, max(KS)) + 0.1)
    for k in KS:
        coefs = coefs_all[:k]
        out = np.full(n, np.nan, dtype=dtype)
        assert _C.lbfgs_lincomb(V[:k], coefs, out) is None
        terms = np.stack([c * v.astype(np.float64) for c, v in zip(coefs, V[:k])])
        ref = terms.sum(axis=0)
        tol = ((k + 2) * U[dtype] if dtype == np.float32 else 1e-13) * np.abs(terms).sum(axis=0)
        assert np.all(np.abs(out - ref) <= tol), k
        np.testing.assert_array_equal(out, exact_lincomb(V[:k], coefs))  # the documented formula, bitwise


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 17, 255, 256, 257, 4095, 4097, 9000])
def test_dots_follow_documented_order_bitwise(rng, n, dtype):
    S = _vecs(rng, 2, n, dtype)
    Q = _vecs(rng, 1, n, dtype)
    got = _C.lbfgs_dots(S, Q)
    for i in range(2):
        assert got[0, i] == exact_dot(S[i], Q[0]), i


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n,shift", [(17, 0), (257, 0), (4097, 0), (5000, 0), (5000, 3)])
def test_dots_every_grouping_follows_documented_order(rng, n, shift, dtype):
    # The executor takes 4 (float32) / 2 (float64) stored streams at once with one query, 4 stored streams in
    # two half walks per lane block with two queries on AVX2, single streams against up to 4 queries otherwise:
    # every such grouping and its remainders must give the documented sums bitwise.  n = 5000: a second chunk of
    # 3 full lane blocks and a short one; shift 3: every vector starts 3 elements past a 64-byte boundary.
    item = np.dtype(dtype).itemsize

    def placed(v):  # a copy of v starting `shift` elements past a 64-byte boundary
        buf = np.full(n + shift + 64 // item, 7, dtype)
        start = (-buf.ctypes.data // item) % (64 // item) + shift
        buf[start:start + n] = v
        return buf[start:start + n]

    S = [placed(v) for v in _vecs(rng, 9, n, dtype)]
    Q = [placed(v) for v in _vecs(rng, 5, n, dtype)]
    assert all(v.ctypes.data % 64 == shift * item for v in S + Q)
    ref = np.array([[exact_dot(S[i], Q[q]) for i in range(9)] for q in range(5)])
    for k in (1, 3, 4, 5, 6, 7, 9):
        for nq in (1, 2, 4, 5):
            np.testing.assert_array_equal(_C.lbfgs_dots(S[:k], Q[:nq]), ref[:nq, :k], err_msg=f"k={k} nq={nq}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_lincomb_streaming_output_misaligned(rng, dtype):
    # Outputs >= 16 MB take the non-temporal path; out starts one element past a 64-byte boundary, so the path
    # writes a scalar head before its aligned body, and a tail after it.  Neighbours stay untouched.
    n = (16 << 20) // np.dtype(dtype).itemsize + 13
    V = [rng.uniform(-1, 1, n).astype(dtype) for _ in range(5)]
    coefs = list(rng.uniform(-2, 2, 5))
    buf = np.full(n + 2, 7.0, dtype)
    out = buf[1:1 + n]
    _C.lbfgs_lincomb(V, coefs, out)
    np.testing.assert_array_equal(out, exact_lincomb(V, coefs))
    assert buf[0] == 7.0 and buf[-1] == 7.0


def test_zero_length():
    S = [np.zeros(0), np.zeros(0)]
    np.testing.assert_array_equal(_C.lbfgs_dots(S, [np.zeros(0)]), np.zeros((1, 2)))
    _C.lbfgs_lincomb(S, [1.0, 2.0], np.zeros(0))


# ---- determinism -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_thread_count_independent(rng, dtype):
    n = 300007
    S = _vecs(rng, 6, n, dtype)
    Q = _vecs(rng, 2, n, dtype)
    coefs = list(rng.uniform(-1, 1, 6))
    before = optkern.get_num_threads()
    try:
        res = {}
        for nt in (1, 2):
            optkern.set_num_threads(nt)
            out = np.empty(n, dtype=dtype)
            _C.lbfgs_lincomb(S, coefs, out)
            res[nt] = (_C.lbfgs_dots(S, Q), out)
    finally:
        optkern.set_num_threads(before)
    assert res[1][0].tobytes() == res[2][0].tobytes()
    assert res[1][1].tobytes() == res[2][1].tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_bitwise_across_isas(rng, cpu_isa, dtype):
    n = 50021
    S = _vecs(rng, 5, n, dtype)
    Q = _vecs(rng, 3, n, dtype)
    coefs = list(rng.uniform(-1, 1, 5))

    def run():
        out = np.empty(n, dtype=dtype)
        _C.lbfgs_lincomb(S, coefs, out)
        return np.concatenate([_C.lbfgs_dots(S, Q), _C.lbfgs_dots(S, Q[:2])]), out  # 3 queries, and 2 (AVX2 halves)

    mine = run()
    optkern.set_cpu_isa(optkern.cpu_best_isa())  # avx512 where the machine has it
    try:
        best = run()
    finally:
        optkern.set_cpu_isa(cpu_isa)
    assert mine[0].tobytes() == best[0].tobytes()
    assert mine[1].tobytes() == best[1].tobytes()


# ---- validation: errors name the argument and nothing is written -----------------------------------------------

def _check_untouched(out, sentinel=7.0):
    assert np.all(out == sentinel)


@pytest.mark.parametrize("case", ["dtype", "int", "numel", "noncontig", "empty", "too_many", "not_list", "misaligned"])
def test_dots_validation(case):
    n = 64
    a, b, q = np.ones(n), np.ones(n), np.ones(n)
    stored, queries, exc, msg = [a, b], [q], ValueError, None
    if case == "dtype":
        stored, exc, msg = [a, b.astype(np.float32)], TypeError, "stored[1]: expected float64 like stored[0]"
    elif case == "int":
        queries, exc, msg = [np.ones(n, dtype=np.int64)], TypeError, "queries[0]: expected float32 or float64"
    elif case == "numel":
        queries, msg = [q, np.ones(n + 1)], "queries[1]: expected 64 elements like stored[0]"
    elif case == "noncontig":
        stored, msg = [np.ones(2 * n)[::2], b], "stored[0]: expected a C-contiguous array"
    elif case == "empty":
        stored, msg = [], "stored: expected 1 to 64 arrays, got 0"
    elif case == "too_many":
        queries, msg = [q] * 65, "queries: expected 1 to 64 arrays, got 65"
    elif case == "not_list":
        stored, exc, msg = a, TypeError, "stored: expected a list of arrays"
    elif case == "misaligned":
        raw = np.zeros(8 * n + 8, dtype=np.uint8)
        mis = np.frombuffer(raw.data, dtype=np.float64, count=n, offset=1)
        stored, msg = [a, mis], "stored[1]: data pointer is not aligned"
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        _C.lbfgs_dots(stored, queries)


@pytest.mark.parametrize("case", ["coefs", "dtype", "out_dtype", "out_numel", "readonly", "overlap", "noncontig",
                                  "device_like_numel_2d_ok"])
def test_lincomb_validation_leaves_out_untouched(case):
    n = 64
    base = np.full(3 * n, 7.0)
    v0, v1 = np.arange(1.0, n + 1), np.arange(2.0, n + 2)
    vecs, coefs, out = [v0, v1], [1.0, 2.0], base[n:2 * n]
    exc, msg = ValueError, None
    if case == "coefs":
        coefs, msg = [1.0], "coefs: expected 2 coefficients"
    elif case == "dtype":
        vecs, exc, msg = [v0, v1.astype(np.float32)], TypeError, "vecs[1]: expected float64 like vecs[0]"
    elif case == "out_dtype":
        out, exc, msg = np.full(n, 7.0, dtype=np.float32), TypeError, "out: expected float64 like vecs[0]"
    elif case == "out_numel":
        out, msg = base[:n + 1], "out: expected 64 elements like vecs[0]"
    elif case == "readonly":
        out = np.full(n, 7.0)
        out.flags.writeable = False
        msg = "out: is read-only"
    elif case == "overlap":
        vecs = [v0, base[n // 2:n // 2 + n]]  # overlaps out = base[n:2n]
        vecs[1].flags.writeable = False
        msg = "out: overlaps vecs[1] in memory"
    elif case == "noncontig":
        out, msg = base[::3], "out: expected a C-contiguous array"
    elif case == "device_like_numel_2d_ok":  # any shape with the same element count is accepted (no error)
        out = base[n:2 * n].reshape(8, 8)
        _C.lbfgs_lincomb(vecs, coefs, out)
        np.testing.assert_array_equal(out.ravel(), v0 + 2.0 * v1)
        return
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        _C.lbfgs_lincomb(vecs, coefs, out)
    _check_untouched(base)
    _check_untouched(out)


def test_core_errors_are_value_errors():
    with pytest.raises(ValueError, match="coefs"):
        _C.lbfgs_lincomb([np.ones(4)], [], np.empty(4))


# ---- zero-copy -----------------------------------------------------------------------------------------------------

def test_zero_copy_views(rng):
    n, k = 1000, 4
    hist = rng.standard_normal((2 * k, n))           # rows are C-contiguous views of one buffer
    g = rng.standard_normal((10, n // 10))           # any shape with n elements
    d = _C.lbfgs_dots([hist[i] for i in range(k)], [g])
    np.testing.assert_allclose(d[0], hist[:k] @ g.ravel(), rtol=1e-12)
    buf = np.full(n + 32, 7.0)
    out = buf[16:16 + n]                              # written in place, neighbours untouched
    _C.lbfgs_lincomb([hist[0], hist[1]], [0.5, -1.0], out)
    np.testing.assert_array_equal(out, 0.5 * hist[0] + -1.0 * hist[1])
    assert np.all(buf[:16] == 7.0) and np.all(buf[16 + n:] == 7.0)
    # A strided view is refused rather than silently copied.
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.lbfgs_dots([hist[:, ::2][0]], [hist[1, ::2]])
