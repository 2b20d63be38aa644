// CPU executor for the L-BFGS kernels: the rules and the reduction order of lbfgs_rules.h.
//
// Compiled three times like the other executors (isa_kernel.h).  Both kernels read with contiguous 16-lane
// vector loads (GCC vector types: one zmm of float on AVX-512, two ymm on AVX2, SSE2 pieces on the baseline
// build), and every lane does the same IEEE operations in the same order on every path, so the three builds
// agree bitwise.
//  - dots: the chunk range [0, nchunks) is split across threads (part_bounds).  For each chunk, the stored
//    chunks are dotted with the query chunks (which stay in L1/L2 across the stored vectors), so every stored
//    vector is read once from memory: with one query, 4 (float32) or 2 (float64) stored streams at a time; with
//    two on AVX2, 4 streams walked in two halves per lane block; otherwise one stored chunk against up to 4
//    queries.  Each (stored, query, lane block) has its own 16-lane accumulator, so the chains of a step are
//    independent.  Each chunk writes its nq * k partials to a per-chunk
//    buffer, which is summed on the calling thread in chunk order: the result does not depend on the thread count.
//  - lincomb: the element range is split across threads; each thread walks blocks of 16 KB per vector, adding
//    the terms 4 vectors at a time into a 16 KB running-sum buffer (4 input streams at once; the block's working
//    set, about 96 KB, stays in L2), the last group written to out (non-temporal for outputs too large for the
//    caches).
//  - ncg_direction (the NCG direction, ncg_rules.h): chunks split across threads as for the dots; each lane block
//    reads g and v, writes v = beta v - g back in place and accumulates v_new . g in the dots' lanes, so the
//    slope comes out of the same pass, bitwise the dots' v_new . g.
// Helpers are OK_ISA_INLINE functions, never lambdas: a lambda does not inherit the kernel's target attribute,
// and GCC then moved its 16-lane values through the stack (3-4x slower).
// lbfgs_rules.h and simd16.h pass 16-lane vectors between always-inlined helpers: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../lbfgs_executors.h"
#include "../lbfgs_rules.h"
#include "../ncg_rules.h"
#include "../work_plan.h"
#include "isa_kernel.h"
#include "thread_pool.h"
#include "work_split.h"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

#include "simd16.h"
static_assert(kLbLanes == 16, "16-lane vectors");

// Stored vectors dotted side by side with a single query (the steady-state direction's pass 1): a few streams at
// once keep more DRAM reads in flight than one.  Measured on 2 Zen 3 cores (AVX2), against the lincomb's read
// rate in the same run: float32 4 streams ~0.89x, 1 stream ~0.75x; float64 takes 2 (4 measured no faster).
template <class T>
constexpr int kDotGroup = sizeof(T) == 4 ? 4 : 2;

// One 16-lane step j of the lane blocks (stored chunks a[g] + o, query chunks qs[q] + o, o = block start + j).
template <class T, int GI, int NB, int QN>
OK_ISA_INLINE void lane_step(const T* const* a, const T* const* qs, int64_t o, V16<T> (&acc)[GI][NB][QN]) {
  V16<T> vq[NB][QN];
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < QN; ++q) vq[b][q] = load16(qs[q] + o + b * kLbLaneBlock);
  for (int g = 0; g < GI; ++g)
    for (int b = 0; b < NB; ++b) {
      const V16<T> va = load16(a[g] + o + b * kLbLaneBlock);
      for (int q = 0; q < QN; ++q) acc[g][b][q] = lb_dot_step(acc[g][b][q], va, vq[b][q]);
    }
}

// The lane-block totals of GI stored vectors' chunks with QN query chunks, for NB consecutive full lane blocks
// starting at offset o.  Every (stored, query) pair keeps its own 16-lane accumulator per block and adds in
// exactly the documented order; the GI * NB * QN chains are independent, so they run side by side.
// An empty asm with a memory clobber after every 128 bytes of each stream (two float32 steps, one float64 step)
// keeps the loads in address order.  Without it GCC ran each 32-byte piece's chain to the end of the block
// before the next piece, so a stream's loads touched every other cache line first, which the hardware
// prefetchers follow poorly.  The barrier does not force the accumulators to memory (their address never
// escapes; AVX2 still spills some with several queries).  Measured on 2 Zen 3 cores (AVX2), pass 1 of m = 10,
// n = 2^22, medians of interleaved runs: float64 one query 16-19 -> 28-30 GB/s, three queries 14-18 -> 21-24
// GB/s; float32 one query +4-10%, three queries +3-15%.  Software prefetch gains nothing on top.
template <class T, int GI, int NB, int QN>
OK_ISA_INLINE void lane_blocks(const T* const* a, const T* const* qs, int64_t o, double (*s)[4]) {
  constexpr int kSteps = sizeof(V16<T>) >= 128 ? 1 : static_cast<int>(128 / sizeof(V16<T>));
  static_assert(kLbLaneBlock % (kSteps * kLbLanes) == 0, "whole step groups per lane block");
  V16<T> acc[GI][NB][QN] = {};
  for (int64_t j = 0; j < kLbLaneBlock; j += kSteps * kLbLanes) {
    for (int u = 0; u < kSteps; ++u) lane_step<T, GI, NB, QN>(a, qs, o + j + u * kLbLanes, acc);
    asm volatile("" ::: "memory");
  }
  for (int g = 0; g < GI; ++g)
    for (int b = 0; b < NB; ++b)  // block totals added in block order
      for (int q = 0; q < QN; ++q) s[g][q] += lane_tree<T>(acc[g][b][q]);
}

// Two queries on AVX2 (the direction right after a push: g and the new y): 4 stored streams at a time keep more
// DRAM reads in flight than one, but 4 x 2 sixteen-lane accumulators would take all 16 ymm registers (float) or
// twice that (double).  So each lane block is walked twice, in halves: half h takes the 32-byte pieces at bytes
// 32h and 64 + 32h of every 128-byte group (both cache lines of the group, in address order; the second walk
// reads from L1).  A half then needs 8 ymm accumulators for float and still 16 for double (some spill to L1;
// 4 streams still measured faster than 2 or 3).  Each lane still adds its own values in increasing j, so the
// totals are bitwise those of lane_blocks.  Measured on 2 Zen 3 cores, m = 10, n = 2^22, pass 1 with two
// queries against 21 stored vectors (separate processes, 3 rounds, medians of 11): one stream at a time 17-20 ms
// (float32) and 34-37 ms (float64) -> 12-15 ms and 24-32 ms, i.e. 1.1x the one-query pass instead of 1.3-1.4x.
// Half walks for one query (4 or 8 streams) measured no faster than lane_blocks.
template <class T>
struct Lanes8 {
  typedef T type __attribute__((vector_size(32)));
  typedef T unaligned __attribute__((vector_size(32), aligned(alignof(T)), may_alias));
};
template <class T>
using V8 = typename Lanes8<T>::type;
template <class T>
OK_ISA_INLINE V8<T> load8(const T* p) {
  return *reinterpret_cast<const typename Lanes8<T>::unaligned*>(p);
}

// Half h of the lane block at o, stored into lanes[g][q]: the pieces at bytes 32h and 64 + 32h of every 128-byte
// group.  Float: lanes 8h .. 8h + 7 of two consecutive steps (one accumulator); double: lanes 4h .. 4h + 3 and
// 8 + 4h .. 8 + 4h + 3 of one step (two accumulators).
template <class T, int GI, int QN>
OK_ISA_INLINE void half_lane_block(const T* const* a, const T* const* qs, int64_t o, int h,
                                   T (*lanes)[QN][kLbLanes]) {
  constexpr int64_t kPiece = 32 / sizeof(T);  // values per 32-byte piece
  constexpr int NA = sizeof(T) == 4 ? 1 : 2;  // accumulators per (stored, query) pair
  V8<T> acc[GI][QN][NA] = {};
  for (int64_t j = 0; j < kLbLaneBlock; j += 4 * kPiece) {  // 128-byte groups
    for (int u = 0; u < 2; ++u) {
      const int64_t off = o + j + (2 * u + h) * kPiece;
      const int r = NA == 1 ? 0 : u;
      V8<T> vq[QN];
      for (int q = 0; q < QN; ++q) vq[q] = load8(qs[q] + off);
      for (int g = 0; g < GI; ++g) {
        const V8<T> va = load8(a[g] + off);
        for (int q = 0; q < QN; ++q) acc[g][q][r] = lb_dot_step(acc[g][q][r], va, vq[q]);
      }
    }
    asm volatile("" ::: "memory");  // loads in address order, as in lane_blocks
  }
  for (int g = 0; g < GI; ++g)
    for (int q = 0; q < QN; ++q)
      for (int r = 0; r < NA; ++r)  // accumulator r: the lanes of piece 2r + h (float: 8h .., double: 8r + 4h ..)
        *reinterpret_cast<typename Lanes8<T>::unaligned*>(&lanes[g][q][(2 * r + h) * kPiece % kLbLanes]) =
            acc[g][q][r];
}

// lane_blocks<T, GI, 1, QN> for one lane block at o, in two half walks.
template <class T, int GI, int QN>
OK_ISA_INLINE void lane_block_halves(const T* const* a, const T* const* qs, int64_t o, double (*s)[4]) {
  alignas(64) T lanes[GI][QN][kLbLanes];
  half_lane_block<T, GI, QN>(a, qs, o, 0, lanes);
  half_lane_block<T, GI, QN>(a, qs, o, 1, lanes);
  for (int g = 0; g < GI; ++g)
    for (int q = 0; q < QN; ++q) s[g][q] += lane_tree<T>(load16(&lanes[g][q][0]));
}

// One lane block of blk <= kLbLaneBlock values (a short last block): the lanes, then the tail in order.
template <class T>
OK_ISA_INLINE double short_block(const T* a, const T* b, int64_t blk) {
  const int64_t vec = blk / kLbLanes * kLbLanes;
  V16<T> acc = {};
  for (int64_t j = 0; j < vec; j += kLbLanes) acc = lb_dot_step(acc, load16(a + j), load16(b + j));
  double t = lane_tree<T>(acc);
  for (int64_t j = vec; j < blk; ++j) t += static_cast<double>(lb_prod(a[j], b[j]));
  return t;
}

// The chunk partials s[g][q] of GI stored chunks a[g][0, len) with QN query chunks (chunk order of
// lbfgs_rules.h): the full blocks NB at a time, the remaining full blocks one at a time, then the short block.
// kHalves: the full blocks by lane_block_halves.
template <class T, int GI, int NB, int QN, bool kHalves = false>
OK_ISA_INLINE void group_chunk(const T* const* a, const T* const* qs, int64_t len, double (*s)[4]) {
  for (int g = 0; g < GI; ++g)
    for (int q = 0; q < QN; ++q) s[g][q] = 0.0;
  const int64_t full_end = len / kLbLaneBlock * kLbLaneBlock;
  int64_t o = 0;
  if constexpr (kHalves) {
    for (; o < full_end; o += kLbLaneBlock) lane_block_halves<T, GI, QN>(a, qs, o, s);
  } else {
    for (; o + NB * kLbLaneBlock <= full_end; o += NB * kLbLaneBlock) lane_blocks<T, GI, NB, QN>(a, qs, o, s);
    for (; o < full_end; o += kLbLaneBlock) lane_blocks<T, GI, 1, QN>(a, qs, o, s);
  }
  if (full_end < len)
    for (int g = 0; g < GI; ++g)
      for (int q = 0; q < QN; ++q) s[g][q] += short_block(a[g] + o, qs[q] + o, len - full_end);
}

// The two-query path by lane_block_halves, kTwoQueryGroup stored streams at a time: AVX2 only, where it was
// measured (AVX-512 has the registers for lane_blocks but was not measured; the baseline build is the fallback).
#if defined(OPTKERN_ISA_AVX2)
constexpr bool kTwoQueryHalves = true;
#else
constexpr bool kTwoQueryHalves = false;
#endif
constexpr int kTwoQueryGroup = 4;

// The partials of chunks [c0, c1): part[c * nq * k + q * k + i].  Chunk by chunk, every stored chunk is read
// once from memory: with one query, kDotGroup stored streams advance together; with two on AVX2,
// kTwoQueryGroup streams in half walks; otherwise (and for the remainders) one stored chunk at a time against
// groups of up to 4 queries (the query chunks, and the stored chunk after its first group, come from L1/L2).
template <class T>
OK_KERNEL void chunk_dots(const T* const* stored, int k, const T* const* queries, int nq, int64_t n, int64_t c0,
                          int64_t c1, double* part) {
  constexpr int G = kDotGroup<T>, H = kTwoQueryGroup;
  double s[4][4];
  const T* a[4];
  const T* qs[4];
  const int64_t P = static_cast<int64_t>(k) * nq;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t off = c * kLbChunk, len = std::min<int64_t>(kLbChunk, n - off);
    double* pc = part + c * P;
    for (int i0 = 0; i0 < k;) {
      if (nq == 1 && k - i0 >= G) {
        for (int g = 0; g < G; ++g) a[g] = stored[i0 + g] + off;
        qs[0] = queries[0] + off;
        group_chunk<T, G, 1, 1>(a, qs, len, s);
        for (int g = 0; g < G; ++g) pc[i0 + g] = s[g][0];
        i0 += G;
        continue;
      }
      if constexpr (kTwoQueryHalves) {
        if (nq == 2 && k - i0 >= H) {
          for (int g = 0; g < H; ++g) a[g] = stored[i0 + g] + off;
          for (int q = 0; q < 2; ++q) qs[q] = queries[q] + off;
          group_chunk<T, H, 1, 2, true>(a, qs, len, s);
          for (int g = 0; g < H; ++g)
            for (int q = 0; q < 2; ++q) pc[q * k + i0 + g] = s[g][q];
          i0 += H;
          continue;
        }
      }
      a[0] = stored[i0] + off;
      for (int q0 = 0; q0 < nq; q0 += 4) {
        const int qn = std::min(4, nq - q0);
        for (int q = 0; q < qn; ++q) qs[q] = queries[q0 + q] + off;
        switch (qn) {
          case 1: group_chunk<T, 1, 2, 1>(a, qs, len, s); break;
          case 2: group_chunk<T, 1, 1, 2>(a, qs, len, s); break;
          case 3: group_chunk<T, 1, 1, 3>(a, qs, len, s); break;
          default: group_chunk<T, 1, 1, 4>(a, qs, len, s); break;
        }
        for (int q = 0; q < qn; ++q) pc[(q0 + q) * k + i0] = s[0][q];
      }
      ++i0;
    }
  }
}

// Outputs at least this large are written with non-temporal stores (they would not survive in L2 + L3 anyway).
constexpr int64_t kLbStreamBytes = int64_t(16) << 20;

// The running sum of the terms of one group at j: 16 values (comb16) or one (comb1).  kFirst: the group starts
// the sum (c[0] v[0], then the next terms); else it continues the partial sum src[j].  Each element's terms are
// added in order (lbfgs_rules.h).
template <class T, int G, bool kFirst>
OK_ISA_INLINE V16<T> comb16(const T* const* v, const T* c, const T* src, int64_t j) {
  V16<T> acc = kFirst ? lb_comb_first(c[0], load16(v[0] + j)) : load16(src + j);
  for (int i = kFirst ? 1 : 0; i < G; ++i) acc = lb_comb_step(acc, c[i], load16(v[i] + j));
  return acc;
}
template <class T, int G, bool kFirst>
OK_ISA_INLINE T comb1(const T* const* v, const T* c, const T* src, int64_t j) {
  T acc = kFirst ? lb_comb_first(c[0], v[0][j]) : src[j];
  for (int i = kFirst ? 1 : 0; i < G; ++i) acc = lb_comb_step(acc, c[i], v[i][j]);
  return acc;
}

// dst[0, len) = the group's running sums (comb16 / comb1); the group's pointers are already offset to the block.
// With nt, dst's 64-byte-aligned body is written with non-temporal stores.
template <class T, int G, bool kFirst>
OK_ISA_INLINE void comb_group(const T* const* v, const T* c, const T* src, T* dst, int64_t len, bool nt) {
  int64_t j = 0;
  if (nt) {
    for (; j < len && !aligned64(dst + j); ++j) dst[j] = comb1<T, G, kFirst>(v, c, src, j);
    for (; j + kLbLanes <= len; j += kLbLanes) stream16(dst + j, comb16<T, G, kFirst>(v, c, src, j));
  } else {
    for (; j + kLbLanes <= len; j += kLbLanes) store16(dst + j, comb16<T, G, kFirst>(v, c, src, j));
  }
  for (; j < len; ++j) dst[j] = comb1<T, G, kFirst>(v, c, src, j);
}

template <class T, int G>
OK_ISA_INLINE void comb_group_any(const T* const* v, const T* c, const T* src, T* dst, int64_t len, bool nt) {
  if (src == nullptr) comb_group<T, G, true>(v, c, src, dst, len, nt);
  else comb_group<T, G, false>(v, c, src, dst, len, nt);
}

// out[lo, hi) = sum_i c[i] v[i][lo, hi), each element's terms added in order.  The range is walked in blocks of
// kBlock values; within a block the terms are taken kGroup vectors at a time (a few input streams at once), the
// running sum kept in a 16 KB buffer between groups (rounded in T, as in registers: the same order and results).
// With nt (an output too large to stay in cache) the last group writes with non-temporal stores: no
// read-for-ownership of out.
template <class T>
OK_KERNEL void lincomb_range(const T* const* v, const T* c, int m, T* __restrict out, int64_t lo, int64_t hi,
                             bool nt) {
  constexpr int64_t kBlock = 16384 / sizeof(T);
  constexpr int kGroup = 4;
  alignas(64) T tmp[kBlock];
  const T* vb[kGroup];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, hi - b0);
    for (int g0 = 0; g0 < m; g0 += kGroup) {
      const int gn = std::min(m - g0, kGroup);
      const bool last = g0 + gn == m;
      T* dst = last ? out + b0 : tmp;
      const T* src = g0 == 0 ? nullptr : tmp;
      const bool s = last && nt;
      for (int i = 0; i < gn; ++i) vb[i] = v[g0 + i] + b0;
      switch (gn) {
        case 1: comb_group_any<T, 1>(vb, c + g0, src, dst, len, s); break;
        case 2: comb_group_any<T, 2>(vb, c + g0, src, dst, len, s); break;
        case 3: comb_group_any<T, 3>(vb, c + g0, src, dst, len, s); break;
        default: comb_group_any<T, 4>(vb, c + g0, src, dst, len, s); break;
      }
    }
  }
  if (nt) stream_fence();
}

// The chunk-ordered reduction shared by the dots and the NCG direction: run(c0, c1, part) fills the P partials
// of each chunk c in [c0, c1) at part[c * P ..]; chunk ranges are split across threads (nt from the `work`
// elements touched), and the partials are summed on the calling thread in chunk order from 0.0 (lbfgs_rules.h),
// so out[0, P) does not depend on the thread count.
template <class Run>
void chunked_sums(int64_t n, int64_t work, int64_t P, double* out, Run&& run) {
  const int64_t nchunks = lb_num_chunks(n);
  std::vector<double> part(static_cast<size_t>(nchunks * P));
  int nt = threads_for_total(work);
  if (nt > nchunks) nt = static_cast<int>(nchunks);
  if (nt <= 1) {
    run(int64_t(0), nchunks, part.data());
  } else {
    parallel_run(nt, [&](int tid, int nth) {
      int64_t lo, hi;
      part_bounds(nchunks, tid, nth, 1, &lo, &hi);
      run(lo, hi, part.data());
    });
  }
  for (int64_t p = 0; p < P; ++p) out[p] = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const double* pc = part.data() + c * P;
    for (int64_t p = 0; p < P; ++p) out[p] += pc[p];
  }
}

template <class T>
void dots_typed(const VecBatch& stored, const VecBatch& queries, double* out) {
  const int k = static_cast<int>(stored.vecs.size());
  const int nq = static_cast<int>(queries.vecs.size());
  const int64_t P = static_cast<int64_t>(k) * nq;
  std::vector<const T*> sp(static_cast<size_t>(k)), qp(static_cast<size_t>(nq));
  for (int i = 0; i < k; ++i) sp[static_cast<size_t>(i)] = static_cast<const T*>(stored.vecs[static_cast<size_t>(i)]);
  for (int q = 0; q < nq; ++q) qp[static_cast<size_t>(q)] = static_cast<const T*>(queries.vecs[static_cast<size_t>(q)]);
  const int64_t n = stored.n;
  chunked_sums(n, n * (k + nq), P, out, [&](int64_t c0, int64_t c1, double* part) {
    chunk_dots<T>(sp.data(), k, qp.data(), nq, n, c0, c1, part);
  });
}

template <class T>
void lincomb_typed(const VecBatch& vecs, const std::vector<double>& coef, void* out_) {
  const int m = static_cast<int>(vecs.vecs.size());
  std::vector<const T*> vp(static_cast<size_t>(m));
  std::vector<T> c(static_cast<size_t>(m));
  for (int i = 0; i < m; ++i) {
    vp[static_cast<size_t>(i)] = static_cast<const T*>(vecs.vecs[static_cast<size_t>(i)]);
    c[static_cast<size_t>(i)] = static_cast<T>(coef[static_cast<size_t>(i)]);
  }
  T* out = static_cast<T*>(out_);
  const int64_t n = vecs.n;
  const int nt = threads_for_total(n * (m + 1));
  const bool stream = n * static_cast<int64_t>(sizeof(T)) >= kLbStreamBytes;
  if (nt <= 1) {
    lincomb_range<T>(vp.data(), c.data(), m, out, 0, n, stream);
    return;
  }
  parallel_run(nt, [&](int tid, int nth) {
    int64_t lo, hi;
    part_bounds(n, tid, nth, kSplitAlign, &lo, &hi);
    if (lo < hi) lincomb_range<T>(vp.data(), c.data(), m, out, lo, hi, stream);
  });
}


// ---- NCG direction -------------------------------------------------------------------------------------------

// One lane block of blk <= kLbLaneBlock values: v = ncg_dir(beta, v, g) (kSteepest: -g, v not read) written in
// place, and the block's total of v_new * g in the dot order (16 lanes, the tree, then the tail in order): the
// block total of lbfgs_dots({v_new}, {g}).  The new value is rounded to T before it is multiplied, as the dots
// read it back from memory.
template <class T, bool kSteepest>
OK_ISA_INLINE double ncg_block(const T* g, T* v, T beta, int64_t blk) {
  const int64_t vec = blk / kLbLanes * kLbLanes;
  V16<T> acc = {};
  for (int64_t j = 0; j < vec; j += kLbLanes) {
    const V16<T> gj = load16(g + j);
    const V16<T> vn = kSteepest ? ncg_steepest(gj) : ncg_dir(beta, load16(v + j), gj);
    store16(v + j, vn);
    acc = lb_dot_step(acc, vn, gj);
  }
  double t = lane_tree<T>(acc);
  for (int64_t j = vec; j < blk; ++j) {
    const T vn = kSteepest ? ncg_steepest(g[j]) : ncg_dir(beta, v[j], g[j]);
    v[j] = vn;
    t += static_cast<double>(lb_prod(vn, g[j]));
  }
  return t;
}

// Chunks [c0, c1): the direction written in place, part[c] = the chunk's slope partial (block totals in order).
template <class T, bool kSteepest>
OK_KERNEL void ncg_chunks(const T* g, T* v, T beta, int64_t n, int64_t c0, int64_t c1, double* part) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t off = c * kLbChunk, len = std::min<int64_t>(kLbChunk, n - off);
    double s = 0.0;
    for (int64_t o = 0; o < len; o += kLbLaneBlock)
      s += ncg_block<T, kSteepest>(g + off + o, v + off + o, beta, std::min<int64_t>(kLbLaneBlock, len - o));
    part[c] = s;
  }
}

template <class T>
void ncg_typed(const VecBatch& gb, void* v_, double beta, double* slope) {
  const T* g = static_cast<const T*>(gb.vecs[0]);
  T* v = static_cast<T*>(v_);
  const T b = static_cast<T>(beta);
  const int64_t n = gb.n;
  chunked_sums(n, 3 * n, 1, slope, [&](int64_t c0, int64_t c1, double* part) {
    if (beta == 0.0) ncg_chunks<T, true>(g, v, b, n, c0, c1, part);
    else ncg_chunks<T, false>(g, v, b, n, c0, c1, part);
  });
}

}  // namespace

void lbfgs_dots(const VecBatch& stored, const VecBatch& queries, double* out) {
  if (stored.dtype == DType::f32) dots_typed<float>(stored, queries, out);
  else dots_typed<double>(stored, queries, out);
}

void lbfgs_lincomb(const VecBatch& vecs, const std::vector<double>& coef, void* out) {
  if (vecs.dtype == DType::f32) lincomb_typed<float>(vecs, coef, out);
  else lincomb_typed<double>(vecs, coef, out);
}

void ncg_direction(const VecBatch& g, void* v, double beta, double* slope) {
  if (g.dtype == DType::f32) ncg_typed<float>(g, v, beta, slope);
  else ncg_typed<double>(g, v, beta, slope);
}

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
