// CPU executor: applies any rule of optim_rules.h to every element of a StepBatch, in one pass.
//
// This file is compiled three times, with OPTKERN_ISA_NS set to cpu_avx512, cpu_avx2 or cpu_scalar and the
// matching compiler flags (CMakeLists.txt): the rule is written once and the compiler vectorizes the loop
// for each instruction set (the scalar build has vectorization switched off).  cpu_dispatch picks one at
// run time by CPUID.  All builds use -ffp-contract=off, so the three give bitwise-identical results.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../executors.h"
#include "../global_norm_api.h"
#include "thread_pool.h"
#include "work_split.h"
#include "isa_kernel.h"
#include "convert16.h"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

// One contiguous range of one tensor: load, apply the rule, store.  The restrict qualifiers tell the
// compiler what the binding has checked (no two buffers overlap), so the loop vectorizes without aliasing
// checks.
template <class Rule, class T>
OK_KERNEL void apply_range(const typename Rule::template Coef<T>& c, T* __restrict p,
                                           const T* __restrict g, T* __restrict s0, T* __restrict s1,
                                           T* __restrict s2, T* __restrict s3, T* __restrict s4, int64_t n) {
  const typename Rule::template Coef<T> cc = c;  // local copy: scalars live in registers
  constexpr int K = Rule::kStates;
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i];
    T a = T(0), b = T(0), d = T(0), e = T(0), f = T(0);
    if constexpr (K > 0) a = s0[i];
    if constexpr (K > 1) b = s1[i];
    if constexpr (K > 2) d = s2[i];
    if constexpr (K > 3) e = s3[i];
    if constexpr (K > 4) f = s4[i];
    apply_rule<Rule, T>(cc, pi, g[i], a, b, d, e, f);
    p[i] = pi;
    if constexpr (K > 0) s0[i] = a;
    if constexpr (K > 1) s1[i] = b;
    if constexpr (K > 2) s2[i] = d;
    if constexpr (K > 3) s3[i] = e;
    if constexpr (K > 4) s4[i] = f;
  }
}

template <class Rule, class T>
void run_typed(const StepBatch& b, const CoefD<Rule>& cd) {
  const typename Rule::template Coef<T> c(cd);
  const auto& ts = b.tensors;
  auto body = [&](const ElementRange& r) {
    const TensorSlots& t = ts[r.tensor];
    T* p = static_cast<T*>(t.ptr[0]) + r.begin;
    const T* g = static_cast<const T*>(t.ptr[1]) + r.begin;
    T* s[kMaxStates] = {};
    for (int k = 0; k < Rule::kStates; ++k) s[k] = static_cast<T*>(t.ptr[2 + k]) + r.begin;
    apply_range<Rule, T>(c, p, g, s[0], s[1], s[2], s[3], s[4], r.end - r.begin);
  };
  for_each_range_parallel(b, body);
}

// ---- 16-bit storage, masters and copies (StepBatch::prec): the load/store layer around the same rule ----
//
// A range is walked in tiles of kTile elements.  Each buffer not stored as float32 is converted into a float32 tile
// on the stack (convert16.h); float32 buffers (float32 params, a float32 master, float32 states or grads) are used
// in place.  The rule runs on the tiles in float32 (apply_range, as for float32 params), then each converted buffer
// is stored back with its rounding.  Memory is read and written once; the tiles stay in L1.
constexpr int64_t kTile = 512;
constexpr int64_t kTilePad = kTile + 32;  // 2176 bytes apart
static_assert(kTile <= kSrMaxTile, "stochastic rounding's words cover a tile");

template <class Rule>
void run_mixed(const StepBatch& b, const CoefD<Rule>& cd, int64_t sr_step) {
  const typename Rule::template Coef<float> c(cd);
  const Precision& pr = b.prec;
  const bool half_params = b.dtype != DType::f32;
  const DType gd = pr.grad, sd = pr.state;
  const SrKey key{pr.seed, static_cast<uint32_t>(sr_step)};
  auto body = [&](const ElementRange& r) {
    const TensorSlots& t = b.tensors[r.tensor];
    // One block of tiles, each kTilePad floats apart: offsets that differ mod 4 KiB (no 4K aliasing between the
    // loads of one tile and the stores of another in the rule's loop).
    alignas(64) float tiles[2 + kMaxStates][kTilePad];
    float *pt = tiles[0], *gt = tiles[1], *st[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) st[k] = tiles[2 + k];
    for (int64_t off = r.begin; off < r.end; off += kTile) {
      const int64_t m = r.end - off < kTile ? r.end - off : kTile;
      float* P = pt;
      if (!half_params) P = static_cast<float*>(t.ptr[0]) + off;
      else if (pr.master == MasterMode::fp32) P = static_cast<float*>(t.master) + off;
      else if (pr.master == MasterMode::split)
        load_tile_split(static_cast<const uint16_t*>(t.ptr[0]) + off, static_cast<const uint16_t*>(t.master) + off, m, pt);
      else load_tile16(b.dtype, static_cast<const uint16_t*>(t.ptr[0]) + off, m, pt);
      const float* G = gt;
      if (gd == DType::f32) G = static_cast<const float*>(t.ptr[1]) + off;
      else load_tile16(gd, static_cast<const uint16_t*>(t.ptr[1]) + off, m, gt);
      float* S[kMaxStates] = {};
      for (int k = 0; k < Rule::kStates; ++k) {
        if (sd == DType::f32) {
          S[k] = static_cast<float*>(t.ptr[2 + k]) + off;
        } else {
          S[k] = st[k];
          load_tile16(sd, static_cast<const uint16_t*>(t.ptr[2 + k]) + off, m, st[k]);
        }
      }
      apply_range<Rule, float>(c, P, G, S[0], S[1], S[2], S[3], S[4], m);
      if (sd != DType::f32)
        for (int k = 0; k < Rule::kStates; ++k) store_tile16_rne(sd, static_cast<uint16_t*>(t.ptr[2 + k]) + off, st[k], m);
      if (half_params) {
        uint16_t* dst = static_cast<uint16_t*>(t.ptr[0]) + off;
        if (pr.master == MasterMode::split) store_tile_split(dst, static_cast<uint16_t*>(t.master) + off, P, m);
        else if (pr.stochastic)
          store_tile16_sr(b.dtype, dst, P, m, key,
                          static_cast<uint32_t>(t.key_index >= 0 ? t.key_index : static_cast<int64_t>(r.tensor)),
                          static_cast<uint64_t>(off));
        else store_tile16_rne(b.dtype, dst, P, m);  // from the float32 result or the float32 master
      }
      if (pr.copy) store_tile16_rne(pr.copy_dtype, static_cast<uint16_t*>(t.copy) + off, P, m);
    }
  };
  for_each_range_parallel(b, body);
}

// ---- the global norm's reductions, in the order of global_norm_api.h ----

// One lane block of blk <= kGnBlock values: L = gn_lanes<T> lanes of T (256 bytes: 8 AVX2 registers; value j to
// lane j % L), widened to double and joined as the tree w = L / 2, ..., 1, then the tail in order.  The lane loop
// vectorizes (the lanes are independent), and every lane does the same IEEE operations on every instruction set.
template <bool kMax, class T>
OK_KERNEL double gn_lane_block(const T* __restrict x, int64_t blk) {
  constexpr int L = gn_lanes<T>;
  const int64_t vec = blk / L * L;
  T acc[L] = {};
  for (int64_t j = 0; j < vec; j += L)
    for (int l = 0; l < L; ++l) acc[l] = gn_lane<kMax>(acc[l], x[j + l]);
  double h[L];
  for (int l = 0; l < L; ++l) h[l] = static_cast<double>(acc[l]);
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) h[l] = gn_join<kMax>(h[l], h[l + w]);
  double t = h[0];
  for (int64_t j = vec; j < blk; ++j) t = gn_join<kMax>(t, static_cast<double>(gn_lane<kMax>(T(0), x[j])));
  return t;
}

// Part p's partial: its lane block totals in slots (padded with 0.0), joined by the tree w = 32, ..., 1.
template <bool kMax, class T>
double gn_part(const StepBatch& b, const GnPlan& plan, int p) {
  double h[kGnPartBlocks] = {};
  int slot = 0;
  for (int32_t k = plan.part_begin[p]; k < plan.part_begin[p + 1]; ++k) {
    const GnPiece& pc = plan.pieces[static_cast<size_t>(k)];
    const void* base = b.tensors[static_cast<size_t>(pc.tensor)].ptr[0];
    for (int64_t o = 0; o < pc.len; o += kGnBlock) {
      const int64_t blk = pc.len - o < kGnBlock ? pc.len - o : kGnBlock;
      if constexpr (std::is_same<T, uint16_t>::value) {  // 16-bit grads: the block in float32, summed as float32
        alignas(64) float tile[kGnBlock];
        load_tile16(b.dtype, static_cast<const uint16_t*>(base) + pc.begin + o, blk, tile);
        h[slot++] = gn_lane_block<kMax, float>(tile, blk);
      } else {
        h[slot++] = gn_lane_block<kMax, T>(static_cast<const T*>(base) + pc.begin + o, blk);
      }
    }
  }
  for (int w = kGnPartBlocks / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) h[l] = gn_join<kMax>(h[l], h[l + w]);
  return h[0];
}

// The parts are split across threads (each part's partial is computed by one thread, whatever the count), then
// joined on the calling thread: kGnSlots strided slots in part order, and their tree.
template <bool kMax, class T>
double gn_reduce(const StepBatch& b, const GnPlan& plan) {
  const int np = plan.nparts();
  std::vector<double> partial(static_cast<size_t>(np));
  int64_t total = 0;
  for (const auto& t : b.tensors) total += t.numel;
  int nt = threads_for_total(total);
  if (nt > np) nt = np;
  if (nt <= 1) {
    for (int p = 0; p < np; ++p) partial[static_cast<size_t>(p)] = gn_part<kMax, T>(b, plan, p);
  } else {
    parallel_run(nt, [&](int tid, int n) {
      int64_t lo, hi;
      part_bounds(np, tid, n, 1, &lo, &hi);
      for (int64_t p = lo; p < hi; ++p) partial[static_cast<size_t>(p)] = gn_part<kMax, T>(b, plan, static_cast<int>(p));
    });
  }
  double slot[kGnSlots] = {};
  for (int p = 0; p < np; ++p) slot[p % kGnSlots] = gn_join<kMax>(slot[p % kGnSlots], partial[static_cast<size_t>(p)]);
  for (int w = kGnSlots / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) slot[l] = gn_join<kMax>(slot[l], slot[l + w]);
  return slot[0];
}

}  // namespace

template <class Rule>
void run_rule(const StepBatch& b, const CoefD<Rule>& c, int64_t sr_step) {
  if (b.prec.mixed)
    run_mixed<Rule>(b, c, sr_step);
  else if (b.dtype == DType::f32)
    run_typed<Rule, float>(b, c);
  else
    run_typed<Rule, double>(b, c);
}

#define OPTKERN_INSTANTIATE(R) template void run_rule<R>(const StepBatch&, const CoefD<R>&, int64_t);
OPTKERN_FOR_EACH_RULE(OPTKERN_INSTANTIATE)
#undef OPTKERN_INSTANTIATE

double sum_squares(const StepBatch& b, const GnPlan& plan) {
  if (b.dtype == DType::f32) return gn_reduce<false, float>(b, plan);
  if (is_half(b.dtype)) return gn_reduce<false, uint16_t>(b, plan);
  return gn_reduce<false, double>(b, plan);
}

double max_abs(const StepBatch& b, const GnPlan& plan) {
  if (b.dtype == DType::f32) return gn_reduce<true, float>(b, plan);
  if (is_half(b.dtype)) return gn_reduce<true, uint16_t>(b, plan);
  return gn_reduce<true, double>(b, plan);
}

void convert_half(int op, DType d, const void* src, void* dst, int64_t n, uint64_t seed, uint32_t step,
                  uint32_t tensor, uint64_t index0) {
  const SrKey key{seed, step};
  for (int64_t o = 0; o < n; o += kTile) {  // in tiles, as the steps convert
    const int64_t m = n - o < kTile ? n - o : kTile;
    if (op == 0) load_tile16(d, static_cast<const uint16_t*>(src) + o, m, static_cast<float*>(dst) + o);
    else if (op == 1) store_tile16_rne(d, static_cast<uint16_t*>(dst) + o, static_cast<const float*>(src) + o, m);
    else store_tile16_sr(d, static_cast<uint16_t*>(dst) + o, static_cast<const float*>(src) + o, m, key, tensor,
                         index0 + static_cast<uint64_t>(o));
  }
}

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
