"""Host-side pieces of the CUDA step path, tested on the CPU.

The CUDA executor uploads an O(tensors) table (each tensor's first chunk) and each block finds its chunk's tensor by
a binary search (work_plan.h: chunk_starts, chunk_tensor, chunk_range).  `_C._cuda_chunk_lookup` walks that table
exactly as the kernel does; it must produce the chunks of the reference plan (`_C._cuda_chunk_plan`, one entry per
chunk) in the same order, for 1 to 10^5 tensors, zero-size tensors included.
"""

import numpy as np
import pytest

import optkern
from optkern import _C


def _lookup_plan(numels, chunk):
    starts, total, chunks = _C._cuda_chunk_lookup(numels, chunk)
    assert len(starts) == len(numels)
    assert total == sum(-(-n // chunk) for n in numels)
    return starts, [c for c in chunks]


@pytest.mark.parametrize("numels", [[1], [0], [5, 0, 10], [0, 0, 7], [7, 0, 0], [16384], [16385, 1, 16383],
                                    [3] * 17, [0] * 5 + [9]])
@pytest.mark.parametrize("chunk", [4, 8, 16384])
def test_lookup_equals_reference_plan(numels, chunk):
    _, chunks = _lookup_plan(numels, chunk)
    assert chunks == [(t, b, n) for t, b, n in _C._cuda_chunk_plan(numels, chunk)]


@pytest.mark.parametrize("count", [1, 10, 1000, 100000])
def test_lookup_many_tensors(count, cpu_isa):
    if cpu_isa != optkern.cpu_best_isa():
        pytest.skip("ISA-independent (host plan code): runs once under the best path")
    rng = np.random.default_rng(count)
    numels = rng.integers(0, 40, size=count).tolist()
    numels[rng.integers(0, count)] = 1000  # one tensor of several chunks
    starts, chunks = _lookup_plan(numels, 16)
    assert chunks == [(t, b, n) for t, b, n in _C._cuda_chunk_plan(numels, 16)]
    # the starts are the exclusive prefix sums of the chunk counts: O(tensors) entries, whatever the sizes
    counts = [-(-n // 16) for n in numels]
    assert starts == np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()


def test_lookup_huge_tensor_sizes():
    # sizes past 2^31 elements: chunk begins are int64 (only the table is built; nothing is allocated)
    n = 3 * 2**31 + 5
    starts, total, _ = _C._cuda_chunk_lookup([10, n], 2**30)
    assert starts == [0, 1] and total == 1 + 7


@pytest.mark.parametrize("chunk", [0, 2, 6, -4])
def test_lookup_bad_chunk(chunk):
    with pytest.raises(ValueError):
        _C._cuda_chunk_lookup([10], chunk)


def test_host_and_device_counters_exclusive(rng):
    p = rng.standard_normal(8).astype(np.float32)
    g, m, v = (rng.standard_normal(8).astype(np.float32) for _ in range(3))
    with pytest.raises(ValueError, match="counters"):
        _C.adam_step([p], [g], [[m], [v]], ["exp_avgs", "exp_avg_sqs"], optkern.functional.build_hyper("adam"), 1,
                     counters=[np.zeros(1).ctypes.data], step_counters=[np.zeros(1, np.float32)])
