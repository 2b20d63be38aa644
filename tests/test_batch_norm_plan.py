"""Batch norm's rows plan (host code shared by the CPU and CUDA executors): row blocks, row groups, and the exact
order of every sum.

The CUDA rows kernel computes each row block's partials and each group's fold as the CPU executor does; here a
float32/float64 NumPy transcription of that order (column sums in T in row order, the shifted two-sweep moments
per block, BnAcc folds of blocks into groups and of groups into channels) must equal the CPU executor bitwise, so
the plan's order is pinned down on the CPU, and tests/test_cupy_batch_norm.py holds the GPU to the CPU bitwise.
"""

import math

import numpy as np
import optkern
import pytest
from optkern import _C

F32, F64 = np.float32, np.float64
ROW_BLOCK, SLICE, MAX_GROUP = 64, 16, 4


def plan(outer, channels, inner):
    cf, rows, width, row_block, nblocks = _C._bn_plan(outer, channels, inner)
    group, ngroups = _C._bn_row_groups(outer, channels, inner)
    return {"cf": cf, "rows": rows, "width": width, "row_block": row_block, "nblocks": nblocks, "group": group, "ngroups": ngroups}


@pytest.mark.parametrize("outer,channels,inner", [(1, 3, 1), (15, 3, 1), (16, 3, 1), (17, 5, 1), (256, 1000, 1),
                                                  (257, 7, 1), (1024, 512, 1), (4096, 3, 1), (4097, 3, 1),
                                                  (12544, 256, 1), (100352, 64, 1), (5, 3, 63), (0, 3, 1),
                                                  (3, 4, 0)])
def test_rows_plan_blocks_and_groups(outer, channels, inner):
    p = plan(outer, channels, inner)
    assert not p["cf"]
    assert p["row_block"] == ROW_BLOCK
    assert p["nblocks"] == -(-outer // ROW_BLOCK)
    g = p["group"]
    assert g in (1, 2, 4)
    assert p["ngroups"] == -(-p["nblocks"] // g)
    # the fewest blocks per group that keep about 16 groups (so small batches still split over threads), and
    # groups of at most 256 rows (so the per-channel fold stays short); blocks of 4 slices of 16 rows
    assert g == MAX_GROUP or p["nblocks"] <= 16 * g
    assert g == 1 or p["nblocks"] > 16 * (g // 2)
    assert g * ROW_BLOCK <= 256


def test_rows_plan_gives_the_gpu_many_threads():
    """One CUDA thread per (16-row slice, 16 bytes of columns): the issue's shapes get 4x the threads of the old
    256-row blocks, each moving 16 bytes per load."""
    for (rows, C), want in (((12544, 256), 784 * 64), ((32 * 56 * 56, 64), 6272 * 16)):
        p = plan(rows, C, 1)
        assert p["nblocks"] * (ROW_BLOCK // SLICE) * -(-C // 4) == want  # float32: 4 columns per thread
        old = -(-rows // 256) * C                 # the old plan: one thread per (256-row block, column)
        assert want >= 4 * old


def test_rows_plan_depends_on_the_shape_only():
    saved = optkern.get_num_threads()
    try:
        ref = [plan(*s) for s in [(1024, 512, 1), (100352, 64, 1), (257, 7, 3)]]
        optkern.set_num_threads(1)
        assert [plan(*s) for s in [(1024, 512, 1), (100352, 64, 1), (257, 7, 3)]] == ref
    finally:
        optkern.set_num_threads(saved)


# ---- the order of every sum, transcribed -------------------------------------------------------------------------
class Acc:
    """BnAcc of batch_norm_rules.h, per column (float64 arrays): moments as shifted sums around the first
    partial's mean, or plain sums."""

    def __init__(self, width, moments):
        self.n = 0.0
        self.a, self.b, self.K = np.zeros(width), np.zeros(width), np.zeros(width)
        self.moments = moments

    def add(self, pn, pa, pb):
        if self.moments:
            if self.n == 0.0:
                self.K = pa.copy()
            d = pa - self.K
            self.n += pn
            self.a = self.a + pn * d
            self.b = self.b + (pb + (pn * d) * d)
        else:
            self.n += pn
            self.a = self.a + pa
            self.b = self.b + pb

    def mean(self):
        return self.K + self.a / self.n

    def m2(self):
        v = self.b - self.a * (self.a / self.n)
        return np.where(v > 0.0, v, 0.0)


def slice_sums(xb, T, term):
    """sum over the block's rows of term(row) in T: each 16-row slice in row order from 0, the 4 slices added as
    (s0 + s1) + (s2 + s3) (bn_slices_sum; an empty slice is 0)."""
    s = [np.zeros(xb.shape[-1], T) for _ in range(4)]
    for q in range(4):
        for r in range(q * SLICE, min(len(xb), (q + 1) * SLICE)):
            s[q] = s[q] + term(r)
    return (s[0] + s[1]) + (s[2] + s[3])


def block_moments(xb, T):
    """One row block: sweep 1 sums x (slice sums in T), K = sum * T(1 / nr) (bn_block_shift); sweep 2 sums
    d = x - K and d^2 in T the same way.  The partial: (K, sum d, sum d^2) widened to double."""
    nr = float(xb.shape[0])
    K = slice_sums(xb, T, lambda r: xb[r]) * T(1.0 / nr)
    a1 = slice_sums(xb, T, lambda r: xb[r] - K)
    a2 = slice_sums(xb, T, lambda r: (xb[r] - K) * (xb[r] - K))
    return K.astype(F64), a1.astype(F64), a2.astype(F64)


class GroupFold:
    """A row group's fold of its blocks (bn_group_add): shifted sums around G, the first block's K, no division
    per block; then (mean, m2) (bn_group_moments).  Gradient sums (moments False): the sums added from 0."""

    def __init__(self, width, moments):
        self.n, self.G, self.a, self.b = 0.0, None, np.zeros(width), np.zeros(width)
        self.moments = moments

    def add(self, nb, K, s1, s2):
        if not self.moments:
            self.a, self.b = self.a + s1, self.b + s2
        else:
            if self.G is None:
                self.G = K.copy()
            e = K - self.G
            self.a = self.a + (s1 + nb * e)
            self.b = self.b + ((s2 + (2.0 * e) * s1) + (nb * e) * e)
        self.n += nb

    def partial(self):
        if not self.moments:
            return self.a, self.b
        v = self.b - self.a * (self.a / self.n)
        return self.G + self.a / self.n, np.where(v > 0.0, v, 0.0)


def block_grad_sums(gb, xb, mh, ml):
    T = xb.dtype.type
    a1 = slice_sums(xb, T, lambda r: gb[r])
    a2 = slice_sums(xb, T, lambda r: gb[r] * ((xb[r] - mh) - ml))
    return None, a1.astype(F64), a2.astype(F64)


def transcribed(x2, p, block, moments):
    """x2: the (rows, width) view; block(r0, r1) -> the block's per-column partials (K, s1, s2).  Returns the
    per-column channel folds (inner == 1: one column per channel) as an Acc."""
    rows, width = x2.shape
    tot = Acc(width, moments)
    gr = p["group"] * p["row_block"]
    for g in range(p["ngroups"]):
        fold = GroupFold(width, moments)
        for b in range(g * p["group"], min(p["nblocks"], (g + 1) * p["group"])):
            r0, r1 = b * p["row_block"], min(rows, (b + 1) * p["row_block"])
            fold.add(float(r1 - r0), *block(r0, r1))
        assert fold.n == float(min(rows, (g + 1) * gr) - g * gr)
        tot.add(fold.n, *fold.partial())
    return tot


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1000, 7), (257, 130), (4099, 5), (12544 // 4, 33), (31, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rows_statistics_follow_the_plan_bitwise(rng, shape, dtype):
    rows, C = shape
    x = (rng.standard_normal(shape) * 1.5 + 3.0).astype(dtype)
    dy = (rng.standard_normal(shape) + 0.2).astype(dtype)
    p = plan(rows, C, 1)
    ref = transcribed(x, p, lambda r0, r1: block_moments(x[r0:r1], dtype), True)
    count, mean, m2 = optkern.batch_norm_stats(x)
    assert count == rows
    np.testing.assert_array_equal(mean, ref.mean())
    np.testing.assert_array_equal(m2, ref.m2())
    # the fused forward keeps the same statistics and derives invstd from them
    _, fmean, finvstd = optkern.batch_norm_forward(x, None, None, None, None, eps=1e-5)
    np.testing.assert_array_equal(fmean, mean)
    np.testing.assert_array_equal(finvstd, 1.0 / np.sqrt(ref.m2() / rows + 1e-5))
    # gradient sums: dy and dy (x - mean), mean split into T hi and lo parts
    mh = mean.astype(dtype)
    ml = (mean - mh.astype(F64)).astype(dtype)
    gref = transcribed(x, p, lambda r0, r1: block_grad_sums(dy[r0:r1], x[r0:r1], mh, ml), False)
    sum_dy, sum_dy_xmu = optkern.batch_norm_backward_reduce(dy, x, mean)
    np.testing.assert_array_equal(sum_dy, gref.a)
    np.testing.assert_array_equal(sum_dy_xmu, gref.b)


def test_rows_transcription_is_a_float64_reference_too(rng):
    """Sanity of the transcription itself (so the bitwise test cannot pass on a shared mistake): it agrees with
    NumPy's float64 mean and M2 to float64 rounding."""
    x = rng.standard_normal((1000, 7)) * 2 + 5
    ref = transcribed(x, plan(1000, 7, 1), lambda r0, r1: block_moments(x[r0:r1], F64), True)
    mu = x.mean(axis=0)
    assert np.max(np.abs(ref.mean() - mu)) <= 1e-13 * 5
    m2 = ((x - mu) ** 2).sum(axis=0)
    assert np.max(np.abs(ref.m2() / m2 - 1)) <= 1e-12
    assert math.isclose(ref.n, 1000.0)
