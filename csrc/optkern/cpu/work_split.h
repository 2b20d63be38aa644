// How a CPU step is split across the thread pool: the concatenation of all tensors is cut into one
// contiguous part per thread (boundaries on 64-element multiples), so a list of 1000 small tensors is one
// parallel region, and a single large tensor is split evenly.  Small work runs on the calling thread.
#pragma once

#include "../optim_api.h"
#include "../work_plan.h"
#include "thread_pool.h"

namespace optkern {

constexpr int64_t kParallelMinElements = 1 << 15;  // below this, thread start-up costs more than it saves
constexpr int64_t kSplitAlign = 64;                // part boundaries: whole cache lines for both dtypes

inline int threads_for_total(int64_t total) {
  if (total < kParallelMinElements) return 1;
  int n = pool_num_threads();
  int64_t useful = total / (kParallelMinElements / 2);
  return useful < n ? static_cast<int>(useful < 1 ? 1 : useful) : n;
}

inline std::vector<int64_t> batch_offsets(const StepBatch& b) {
  std::vector<int64_t> off(b.tensors.size() + 1, 0);
  for (size_t i = 0; i < b.tensors.size(); ++i) off[i + 1] = off[i] + b.tensors[i].numel;
  return off;
}

inline int max_threads_for(const StepBatch& b) {
  int64_t total = 0;
  for (const auto& t : b.tensors) total += t.numel;
  return threads_for_total(total);
}

template <class F>  // fn(const ElementRange&, int thread); nt from threads_for_total(), computed once by the caller
void for_each_range_parallel_tid(const StepBatch& b, int nt, F&& fn) {
  std::vector<int64_t> off = batch_offsets(b);
  int64_t total = off.back();
  if (nt <= 1) {
    for_each_range_in(off, 0, total, [&](const ElementRange& r) { fn(r, 0); });
    return;
  }
  parallel_run(nt, [&](int tid, int n) {
    int64_t lo, hi;
    part_bounds(total, tid, n, kSplitAlign, &lo, &hi);
    for_each_range_in(off, lo, hi, [&](const ElementRange& r) { fn(r, tid); });
  });
}

template <class F>  // fn(const ElementRange&)
void for_each_range_parallel(const StepBatch& b, F&& fn) {
  for_each_range_parallel_tid(b, max_threads_for(b), [&](const ElementRange& r, int) { fn(r); });
}

}  // namespace optkern
