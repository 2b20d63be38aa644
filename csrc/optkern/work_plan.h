// Multi-tensor work plans: which elements of which tensor each CPU thread or CUDA block handles.
// Host code only, shared by the executors and tested from Python through the binding (_C._work_plan).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace optkern {

struct ElementRange {
  int32_t tensor;
  int64_t begin, end;  // element offsets inside that tensor, end exclusive
};

// Exclusive prefix sums of the tensor sizes; back() is the total element count.
std::vector<int64_t> prefix_offsets(const std::vector<int64_t>& numels);

// The global element interval [lo, hi) of part `part` when the concatenation of all tensors is split into
// `nparts` nearly equal contiguous parts whose boundaries are multiples of `align` elements.
void part_bounds(int64_t total, int part, int nparts, int64_t align, int64_t* lo, int64_t* hi);

// Calls fn(ElementRange) for every piece of a tensor that lies inside the global interval [lo, hi).
template <class F>
void for_each_range_in(const std::vector<int64_t>& offsets, int64_t lo, int64_t hi, F&& fn) {
  if (lo >= hi) return;
  // first tensor whose end is beyond lo
  int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  int64_t a = 0, b = n;  // find largest t with offsets[t] <= lo
  while (b - a > 1) {
    int64_t mid = (a + b) / 2;
    if (offsets[mid] <= lo) a = mid; else b = mid;
  }
  for (int64_t t = a; t < n && offsets[t] < hi; ++t) {
    int64_t tb = offsets[t], te = offsets[t + 1];
    int64_t s = lo > tb ? lo : tb, e = hi < te ? hi : te;
    if (s < e) fn(ElementRange{static_cast<int32_t>(t), s - tb, e - tb});
  }
}

// The CPU plan as a list: every range of every part (used by tests; the executor walks it lazily).
std::vector<std::vector<ElementRange>> cpu_plan(const std::vector<int64_t>& numels, int nparts, int64_t align);

// The CUDA plan: chunks of at most `chunk` elements (chunk a multiple of 4), in tensor order.  One launch walks
// the whole table, whatever the number of tensors.
struct Chunk {
  int32_t tensor;
  int32_t len;
  int64_t begin;
};
std::vector<Chunk> cuda_chunk_plan(const std::vector<int64_t>& numels, int64_t chunk);

// The CUDA executor uploads only an O(tensors) table: for each tensor the index of its first chunk
// (chunk_starts, an exclusive prefix sum of ceil(numel / chunk)); a block finds the tensor of chunk `ci` by a
// binary search (chunk_tensor) and the chunk's elements from the tensor's size.  Both walk the same chunks, in
// the same order, as cuda_chunk_plan (which the tests compare them with).
// Returns starts (one per tensor) and the total chunk count in *total.  Throws for a negative size.
std::vector<int64_t> chunk_starts(const std::vector<int64_t>& numels, int64_t chunk, int64_t* total);

// The tensor that chunk ci (0 <= ci < total) belongs to: the largest t with starts[t] <= ci (a zero-size tensor
// owns no chunk, so the search passes over it).  n >= 1.
OK_HD int64_t chunk_tensor(const int64_t* starts, int64_t n, int64_t ci) {
  int64_t lo = 0, hi = n;  // invariant: starts[lo] <= ci, and every t >= hi has starts[t] > ci
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (starts[mid] <= ci) lo = mid; else hi = mid;
  }
  return lo;
}

// Chunk ci's element range inside its tensor t: [begin, begin + len).
OK_HD void chunk_range(const int64_t* starts, int64_t t, int64_t numel, int64_t chunk, int64_t ci, int64_t* begin,
                       int64_t* len) {
  *begin = (ci - starts[t]) * chunk;
  const int64_t rest = numel - *begin;
  *len = rest < chunk ? rest : chunk;
}

}  // namespace optkern
