// Multi-tensor work plans (see work_plan.h).
#include "work_plan.h"

#include <stdexcept>

namespace optkern {

std::vector<int64_t> prefix_offsets(const std::vector<int64_t>& numels) {
  std::vector<int64_t> off(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) off[i + 1] = off[i] + numels[i];
  return off;
}

void part_bounds(int64_t total, int part, int nparts, int64_t align, int64_t* lo, int64_t* hi) {
  auto bound = [&](int k) -> int64_t {
    if (k >= nparts) return total;
    int64_t x = total / nparts * k + (total % nparts) * k / nparts;  // the ideal boundary
    x = (2 * x + align - 1) / (2 * align) * align;                     // nearest multiple of align (ties down)
    return x < total ? x : total;
  };
  *lo = bound(part);
  *hi = bound(part + 1);
}

std::vector<std::vector<ElementRange>> cpu_plan(const std::vector<int64_t>& numels, int nparts, int64_t align) {
  if (nparts < 1 || align < 1) throw std::invalid_argument("cpu_plan: nparts and align must be >= 1");
  auto off = prefix_offsets(numels);
  std::vector<std::vector<ElementRange>> plan(static_cast<size_t>(nparts));
  for (int k = 0; k < nparts; ++k) {
    int64_t lo, hi;
    part_bounds(off.back(), k, nparts, align, &lo, &hi);
    for_each_range_in(off, lo, hi, [&](const ElementRange& r) { plan[static_cast<size_t>(k)].push_back(r); });
  }
  return plan;
}

std::vector<Chunk> cuda_chunk_plan(const std::vector<int64_t>& numels, int64_t chunk) {
  if (chunk < 4 || chunk % 4 != 0 || chunk > (int64_t(1) << 30))
    throw std::invalid_argument("cuda_chunk_plan: chunk must be a positive multiple of 4 below 2^30");
  std::vector<Chunk> plan;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t s = 0; s < numels[t]; s += chunk) {
      int64_t len = numels[t] - s < chunk ? numels[t] - s : chunk;
      plan.push_back(Chunk{static_cast<int32_t>(t), static_cast<int32_t>(len), s});
    }
  return plan;
}

std::vector<int64_t> chunk_starts(const std::vector<int64_t>& numels, int64_t chunk, int64_t* total) {
  if (chunk < 4 || chunk % 4 != 0 || chunk > (int64_t(1) << 30))
    throw std::invalid_argument("chunk_starts: chunk must be a positive multiple of 4 below 2^30");
  std::vector<int64_t> starts(numels.size());
  int64_t acc = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] < 0) throw std::invalid_argument("chunk_starts: negative tensor size");
    starts[t] = acc;
    acc += numels[t] / chunk + (numels[t] % chunk != 0 ? 1 : 0);
  }
  *total = acc;
  return starts;
}

}  // namespace optkern
