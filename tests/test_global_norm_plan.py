"""The global norm's order (csrc/optkern/global_norm_api.h), host side: the partition against a Python transcription
of its rule, and the CPU's norm against a NumPy transcription of the whole order, bit for bit (float32 lanes in
float32, the joins in float64), on every instruction set (autouse fixture) and for 1 and 2 threads; and against a
float64 NumPy norm with a stated tolerance.  The CUDA side (test_cuda_global_norm.py) follows the same order."""

from __future__ import annotations

import math

import numpy as np
import optkern
import pytest
from optkern import _C

PART, BLOCK, PART_BLOCKS, SLOTS = 65536, 1024, 64, 256  # lanes: 256 bytes of the dtype (64 float, 32 double)


def plan_reference(numels):
    """The partition by its rule: pieces at tensor-local multiples of PART; parts packed greedily by lane blocks."""
    pieces, bounds, used = [], [0], 0
    for t, n in enumerate(numels):
        for s in range(0, n, PART):
            ln = min(PART, n - s)
            nb = -(-ln // BLOCK)
            if used and used + nb > PART_BLOCKS:
                bounds.append(len(pieces))
                used = 0
            pieces.append((t, s, ln))
            used += nb
    if used:
        bounds.append(len(pieces))
    return pieces, bounds


def _tree(h, join):
    """h[:, l] = join(h[:, l], h[:, l + w]) for l < w, w = width / 2 .. 1 (rows independent); -> h[:, 0]."""
    h = h.copy()
    w = h.shape[1] // 2
    while w >= 1:
        h[:, :w] = join(h[:, :w], h[:, w:2 * w])
        w //= 2
    return h[:, 0]


def gn_reference(arrays, norm_type=2.0, partial_order="tree"):
    """The norm in the documented order, vectorized over lane blocks.  partial_order="sequential" instead adds the
    part partials one after another (a different order: the tests check that it gives other bits, so the bitwise
    comparison can tell orders apart)."""
    kmax = math.isinf(norm_type)
    arrays = [np.ascontiguousarray(a).ravel() for a in arrays]
    T = arrays[0].dtype.type if arrays else np.float64
    LANES = 256 // np.dtype(T).itemsize  # noqa: N806 - the header's name
    join = np.maximum if kmax else np.add  # np.maximum propagates NaN like ok_max
    lane = (lambda acc, x: np.maximum(acc, np.abs(x))) if kmax else (lambda acc, x: acc + x * x)
    pieces, bounds = plan_reference([a.size for a in arrays])
    # every lane block: (array, start, blk), with its part and slot
    blocks, where = [], []
    for p in range(len(bounds) - 1):
        slot = 0
        for t, s, ln in pieces[bounds[p]:bounds[p + 1]]:
            for o in range(0, ln, BLOCK):
                blocks.append((t, s + o, min(BLOCK, ln - o)))
                where.append((p, slot))
                slot += 1
    nparts = len(bounds) - 1
    if not blocks:
        return 0.0
    nb = len(blocks)
    with_lanes = [b for b, (_, _, blk) in enumerate(blocks) if blk >= LANES]
    body = np.zeros((len(with_lanes), BLOCK), T)  # values j < vec (lanes), zero beyond (exact padding)
    tail = np.zeros((nb, LANES), T)  # values vec <= j < blk, zero beyond
    tail_len = np.zeros(nb, np.int64)
    for b, (t, s, blk) in enumerate(blocks):
        vec = blk // LANES * LANES
        tail[b, :blk - vec] = arrays[t][s + vec:s + blk]
        tail_len[b] = blk - vec
    for i, b in enumerate(with_lanes):
        t, s, blk = blocks[b]
        body[i, :blk // LANES * LANES] = arrays[t][s:s + blk // LANES * LANES]
    acc = np.zeros((nb, LANES), T)
    lane_acc = np.zeros((len(with_lanes), LANES), T)
    for r in range(BLOCK // LANES):  # lane j % LANES accumulates in T, in increasing j
        lane_acc = lane(lane_acc, body[:, r * LANES:(r + 1) * LANES])
    acc[with_lanes] = lane_acc
    tot = _tree(acc.astype(np.float64), join)
    for j in range(LANES):  # the tail in order, as float64 of the T lane value of (0, x)
        tot = np.where(j < tail_len, join(tot, lane(np.zeros(nb, T), tail[:, j]).astype(np.float64)), tot)
    slots = np.zeros((nparts, PART_BLOCKS))
    for b, (p, s) in enumerate(where):
        slots[p, s] = tot[b]
    partial = _tree(slots, join)
    if partial_order == "sequential":
        r = 0.0
        for v in partial:
            r = join(r, v)
    else:
        padded = np.zeros(-(-nparts // SLOTS) * SLOTS)
        padded[:nparts] = partial
        acc2 = np.zeros(SLOTS)
        for row in padded.reshape(-1, SLOTS):  # slot s: partials s, s + 256, ... in order
            acc2 = join(acc2, row)
        r = _tree(acc2[None, :], join)[0]
    return float(r) if kmax else math.sqrt(r)


# ---- the partition ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numels", [
    [], [0], [0, 0], [1], [3, 0, 5], [PART], [PART + 1], [PART - 1, 2], [BLOCK] * 64, [BLOCK] * 64 + [1],
    [BLOCK + 1] * 40, [2 * PART + 17, 5, 3 * PART, 1], [1023, 1025, 64, 63, 65, 0, 4 * PART - 3],
], ids=lambda n: f"{len(n)}sizes")
def test_plan_matches_rule(numels):
    pieces, bounds = _C._global_norm_plan(numels)
    assert (pieces, bounds) == plan_reference(numels)
    _check_plan_invariants(numels, pieces, bounds)


def _check_plan_invariants(numels, pieces, bounds):
    # the pieces cover every tensor exactly, in order, starting at multiples of PART
    covered = {}
    for t, s, ln in pieces:
        assert s % PART == 0 and 1 <= ln <= PART
        assert covered.get(t, 0) == s
        covered[t] = s + ln
    assert covered == {t: n for t, n in enumerate(numels) if n}
    assert [t for t, _, _ in pieces] == sorted(t for t, _, _ in pieces)
    # parts: contiguous, non-empty, at most PART_BLOCKS lane blocks, and greedy (the next piece did not fit)
    assert bounds[0] == 0 and bounds[-1] == len(pieces)
    blocks = [-(-ln // BLOCK) for _, _, ln in pieces]
    for p in range(len(bounds) - 1):
        assert bounds[p] < bounds[p + 1]
        used = sum(blocks[bounds[p]:bounds[p + 1]])
        assert used <= PART_BLOCKS
        if p + 2 < len(bounds):
            assert used + blocks[bounds[p + 1]] > PART_BLOCKS


def test_plan_empty_and_single():
    assert _C._global_norm_plan([]) == ([], [0])
    assert _C._global_norm_plan([0, 0]) == ([], [0])
    assert _C._global_norm_plan([1]) == ([(0, 0, 1)], [0, 1])
    assert _C._global_norm_plan([PART + 1]) == ([(0, 0, PART), (0, PART, 1)], [0, 1, 2])


def test_plan_1e5_tensors(rng):
    numels = list(rng.integers(0, 3000, 100_000))
    numels[17] = 5 * PART + 11  # a few large ones among them
    numels[5000] = PART
    pieces, bounds = _C._global_norm_plan(numels)
    assert (pieces, bounds) == plan_reference(numels)
    _check_plan_invariants(numels, pieces, bounds)
    total_blocks = sum(-(-ln // BLOCK) for _, _, ln in pieces)
    assert len(bounds) - 1 <= 2 * total_blocks // PART_BLOCKS + 1  # greedy: two neighbours overfill one part


def test_plan_depends_on_sizes_only():
    numels = [5, PART * 3 + 1, 0, 700, 70000]
    first = _C._global_norm_plan(numels)
    before = optkern.get_num_threads()
    try:
        for nt in (1, 2):
            optkern.set_num_threads(nt)
            assert _C._global_norm_plan(numels) == first
    finally:
        optkern.set_num_threads(before)


def test_plan_refuses_negative_size():
    with pytest.raises(ValueError, match="negative"):
        _C._global_norm_plan([3, -1])


# ---- the CPU's norm: the documented order, bit for bit --------------------------------------------------------

def _arrays(rng, dtype, sizes, offset=1):
    """Fresh random arrays of these sizes with magnitudes spread over several decades; views at an element offset
    (odd addresses for the SIMD loads)."""
    out = []
    for n in sizes:
        base = rng.standard_normal(n + offset) * 10.0 ** rng.uniform(-3, 3, n + offset)
        out.append(base.astype(dtype)[offset:])
    return out


CASES = {
    "tails": [1, 17, 63, 64, 65, 1023, 1024, 1025, 4097, 0, 3],
    "parts": [PART - 5, 2 * PART + 17, 5, 1000, 64 * 1023],
    "many_small": [7] * 3000 + [1025] * 70,
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_cpu_follows_documented_order_bitwise(rng, dtype, case, norm_type):
    xs = _arrays(rng, dtype, CASES[case])
    want = gn_reference(xs, norm_type)
    assert optkern.global_norm(xs, norm_type) == want


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_reference_distinguishes_orders(rng, dtype):
    """Guard for the bitwise test above: another order of the same partials gives other bits here (so a CPU that
    combined its partials differently would fail), and the CPU matches the documented one."""
    # 300 parts of 64 one-element tensors (more parts than the 256 slots).  float64: values of one magnitude, so
    # that no partial dominates and rounding differences survive the square root; float32: squares over 16
    # decades (of one magnitude, the float64 sums of float32 squares would be exact in any order)
    n = 64 * 300
    v = 10.0 ** rng.uniform(-4, 4, n) if dtype == np.float32 else rng.uniform(1.0, 2.0, n)
    xs = [np.array([x], dtype) for x in v]
    tree, seq = gn_reference(xs), gn_reference(xs, partial_order="sequential")
    assert tree != seq
    assert optkern.global_norm(xs) == tree


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_cpu_thread_count_invariant(rng, dtype):
    xs = _arrays(rng, dtype, [PART * 5 + 3, 1, 100_000, 4097] + [33] * 500)
    before = optkern.get_num_threads()
    try:
        got = {}
        for nt in (1, 2):
            optkern.set_num_threads(nt)
            got[nt] = (optkern.global_norm(xs), optkern.global_norm(xs, math.inf))
    finally:
        optkern.set_num_threads(before)
    assert got[1] == got[2]
    assert got[1][0] == gn_reference(xs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_cpu_isas_agree(rng, dtype):
    xs = _arrays(rng, dtype, [PART + 129, 999, 3, 1 << 18])
    isas = [i for i in ("scalar", "avx2", "avx512") if ("scalar", "avx2", "avx512").index(i)
            <= ("scalar", "avx2", "avx512").index(optkern.cpu_best_isa())]
    now = optkern.cpu_isa()
    try:
        got = set()
        for isa in isas:
            optkern.set_cpu_isa(isa)
            got.add((optkern.global_norm(xs), optkern.global_norm(xs, math.inf)))
    finally:
        optkern.set_cpu_isa(now)
    assert len(got) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_cpu_vs_float64_numpy(rng, dtype):
    """Tolerance: float32 lanes sum at most 16 squares before the float64 joins, so the sum of squares is within
    16 * 2^-24 relative (the norm within half of that); float64 within 1e-13."""
    xs = _arrays(rng, dtype, [1, 4097, 3 * PART + 7, 100, 0, 65])
    want = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in xs))
    tol = 8 * 2.0 ** -24 if dtype == np.float32 else 1e-13
    assert abs(optkern.global_norm(xs) - want) <= tol * want
    assert optkern.global_norm(xs, math.inf) == max(float(np.max(np.abs(x))) for x in xs if x.size)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_nonfinite_propagates(rng, bad, norm_type):
    xs = _arrays(rng, np.float32, [5000, PART + 3, 17])
    xs[1][PART + 1] = bad  # in the second piece of the tensor, in a lane block's tail
    got = optkern.global_norm(xs, norm_type)
    assert (math.isnan(got) if (np.isnan(bad)) else got == math.inf)


def test_device_entry_point_refuses_cpu_arrays(rng):
    out = np.zeros(1)
    with pytest.raises(ValueError, match=r"^grads: global_norm_device needs CUDA arrays"):
        _C.global_norm_device([rng.standard_normal(5)], 2.0, out)
    with pytest.raises(ValueError, match=r"^grads: global_norm_device needs CUDA arrays"):
        _C.global_norm_device([], 2.0, out)
    assert out[0] == 0.0
