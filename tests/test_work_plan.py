"""Host work plans: the CPU split across threads and the CUDA chunk table."""

import numpy as np
import pytest

import optkern

from optkern import _C


def _random_sizes(rng):
    k = int(rng.integers(0, 12))
    choices = [0, 1, 2, 3, 15, 16, 17, 63, 64, 65, 1000, 4097, 100_003]
    return [int(rng.choice(choices)) if rng.random() < 0.6 else int(rng.integers(0, 5000)) for _ in range(k)]


CASES = [[], [0], [1], [0, 0, 0], [5, 0, 100, 3], [1 << 20], [64] * 7, [1, 1, 1, 1, 1], [0, 1 << 16, 0, 7]]


def check_cpu_plan(numels, nparts, align):
    plan = _C._cpu_plan(numels, nparts, align)
    assert len(plan) == nparts
    offsets = np.concatenate([[0], np.cumsum(numels, dtype=np.int64)]).astype(np.int64)
    total = int(offsets[-1])
    covered = [np.zeros(n, np.int32) for n in numels]
    pos = 0  # the global position where the next range must start
    sizes = []
    for k, part in enumerate(plan):
        start = pos
        # each boundary lies within `align` elements of the ideal even split k * total / nparts
        assert abs(start - k * total / nparts) < align + 1, (k, start, total, nparts, align)
        for t, b, e in part:
            assert 0 <= t < len(numels) and 0 <= b < e <= numels[t], (t, b, e)
            g = int(offsets[t]) + b
            assert g == pos, "parts must be contiguous in global order"
            covered[t][b:e] += 1
            pos = int(offsets[t]) + e
        sizes.append(pos - start)
        if pos != total:
            assert pos % align == 0, f"boundary {pos} not a multiple of {align}"
    assert pos == total
    for t, c in enumerate(covered):
        assert np.all(c == 1), f"tensor {t} not covered exactly once"
    if total:
        assert max(sizes) - min(sizes) < 2 * align + 1, sizes
    return plan


def balance_slack(numels, nparts, align):
    plan = _C._cpu_plan(numels, nparts, align)
    sizes = [sum(e - b for _, b, e in part) for part in plan]
    total = sum(numels)
    return max(sizes) - min(sizes) - (align + -(-total // nparts) - total // nparts), sizes


def test_cpu_plan_balance_within_align_plus_rounding():
    slack, sizes = balance_slack([65543], 3, 16)
    assert slack <= 0, sizes


@pytest.mark.parametrize("numels", CASES)
@pytest.mark.parametrize("nparts", [1, 2, 3, 4])
@pytest.mark.parametrize("align", [1, 16, 64])
def test_cpu_plan_fixed_cases(numels, nparts, align):
    check_cpu_plan(numels, nparts, align)


@pytest.mark.parametrize("nparts", [1, 2, 3, 4])
@pytest.mark.parametrize("align", [1, 16, 64])
def test_cpu_plan_random(rng, nparts, align):
    for _ in range(30):
        check_cpu_plan(_random_sizes(rng), nparts, align)


def test_cpu_plan_known_split():
    assert _C._cpu_plan([5, 0, 100, 3], 3, 16) == [[(0, 0, 5), (2, 0, 27)], [(2, 27, 59)], [(2, 59, 100), (3, 0, 3)]]


def test_cpu_plan_single_part_is_everything():
    assert _C._cpu_plan([3, 0, 4], 1, 64) == [[(0, 0, 3), (2, 0, 4)]]


@pytest.mark.parametrize("nparts,align", [(0, 1), (2, 0), (-1, 16)])
def test_cpu_plan_bad_arguments(nparts, align):
    with pytest.raises(ValueError):
        _C._cpu_plan([10], nparts, align)


def check_chunk_plan(numels, chunk):
    plan = _C._cuda_chunk_plan(numels, chunk)
    covered = [np.zeros(n, np.int32) for n in numels]
    last = (-1, -1)
    for t, b, n in plan:
        assert 0 <= t < len(numels)
        assert 0 < n <= chunk and b % chunk == 0 and b + n <= numels[t]
        assert (t, b) > last, "chunks in tensor order"
        last = (t, b)
        covered[t][b:b + n] += 1
    for c in covered:
        assert np.all(c == 1)
    assert len(plan) == sum(-(-n // chunk) for n in numels)


@pytest.mark.parametrize("numels", CASES)
@pytest.mark.parametrize("chunk", [4, 8, 64, 4096, 65536])
def test_cuda_chunk_plan_fixed(numels, chunk):
    check_chunk_plan(numels, chunk)


def test_cuda_chunk_plan_random(rng):
    for _ in range(40):
        check_chunk_plan(_random_sizes(rng), int(rng.choice([4, 12, 64, 1024])))


def test_cuda_chunk_plan_known():
    assert _C._cuda_chunk_plan([5, 0, 10], 4) == [(0, 0, 4), (0, 4, 1), (2, 0, 4), (2, 4, 4), (2, 8, 2)]


@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 6, 10, -4])
def test_cuda_chunk_plan_bad_chunk(chunk):
    with pytest.raises(ValueError):
        _C._cuda_chunk_plan([10, 20], chunk)


# ---- batch norm: the reduction plan and the channel layout (host code shared with the CUDA executor) -----------
@pytest.mark.parametrize("outer,channels,inner", [(1024, 512, 1), (100352, 64, 1), (32, 64, 3136), (5, 3, 63),
                                                  (5, 3, 64), (1, 1, 1), (3, 7, 20), (100000, 2, 1)])
def test_bn_plan_covers_rows_in_fixed_blocks(outer, channels, inner):
    from optkern import _C

    cf, rows, width, row_block, nblocks = _C._bn_plan(outer, channels, inner)
    assert cf == (inner >= 64)
    assert (rows, width) == (outer, channels * inner)
    if not cf:
        assert 16 <= row_block <= 256
        assert nblocks * row_block >= rows > (nblocks - 1) * row_block
    # the plan depends on the shape only, never on the thread count (results are thread-count independent)
    saved = optkern.get_num_threads()
    try:
        optkern.set_num_threads(1)
        assert _C._bn_plan(outer, channels, inner) == (cf, rows, width, row_block, nblocks)
    finally:
        optkern.set_num_threads(saved)


def test_bn_layout_of_common_memory_formats():
    from optkern import _C

    x = np.zeros((2, 3, 4, 5), np.float32)
    assert _C.batch_norm_layout(x, 1) == (2, 3, 20)                                  # NCHW
    assert _C.batch_norm_layout(np.zeros((2, 4, 5, 3), np.float32), -1) == (40, 3, 1)  # NHWC, channel last
    nchw_view_of_nhwc = np.zeros((2, 4, 5, 3), np.float32).transpose(0, 3, 1, 2)
    assert _C.batch_norm_layout(nchw_view_of_nhwc, 1) == (40, 3, 1)                 # torch channels_last-like
    assert _C.batch_norm_layout(np.zeros((7, 1, 9), np.float32), 1) == (1, 1, 63)   # one channel: one block
    # any permutation of a dense array is (outer, C, inner) blocks: here (H, C, N, W) memory seen as NCHW
    assert _C.batch_norm_layout(np.zeros((4, 3, 2, 5), np.float32).transpose(2, 1, 0, 3), 1) == (4, 3, 10)
    with pytest.raises(ValueError, match="^x: the channel axis 1"):
        _C.batch_norm_layout(np.zeros((2, 3, 4, 10), np.float32)[..., ::2], 1)  # gaps: not one block
