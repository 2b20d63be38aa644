// CPU executor for the L-BFGS kernels: the rules and the reduction order of lbfgs_rules.h.
//
// Compiled three times like the other executors (isa_kernel.h).  Both kernels read with contiguous 16-lane
// vector loads (GCC vector types: one zmm of float on AVX-512, two ymm on AVX2, SSE2 pieces on the baseline
// build), and every lane does the same IEEE operations in the same order on every path, so the three builds
// agree bitwise.
//  - dots: the chunk range [0, nchunks) is split across threads (part_bounds); for each chunk and each stored
//    vector, the stored lane block (256 values, in L1) is dotted with every query's block (the query chunks,
//    nq * 4096 values, stay in L1/L2 across the stored vectors), so every stored vector is read once from memory.
//    Each chunk writes its nq * k partials to a per-chunk buffer, which is summed on the calling thread in chunk
//    order: the result does not depend on the thread count.
//  - lincomb: the element range is split across threads; each thread walks blocks of 1024 values, adding the
//    terms one vector at a time into an L1 buffer (one input stream at a time), the last term written to out.
// lbfgs_rules.h and simd16.h pass 16-lane vectors between always-inlined helpers: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cstring>
#include <vector>


#include "../lbfgs_executors.h"
#include "../lbfgs_rules.h"
#include "../work_plan.h"
#include "isa_kernel.h"
#include "thread_pool.h"
#include "work_split.h"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

#include "simd16.h"
static_assert(kLbLanes == 16, "16-lane vectors");

// The lanes widened to double and added as the fixed tree 8 + 8, 4 + 4, 2 + 2, 1 + 1 (lbfgs_rules.h).
template <class T>
inline __attribute__((always_inline)) double lane_tree(V16<T> v) {
  double h[kLbLanes];
  for (int l = 0; l < kLbLanes; ++l) h[l] = static_cast<double>(v[l]);
  for (int w = kLbLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) h[l] += h[l + w];
  return h[0];
}

// The dots of GI stored vectors' chunks with QN queries at once: every (stored, query) pair keeps its own
// accumulator and adds in exactly the documented order, but the GI * QN chains run side by side (independent adds)
// and GI stored streams advance together (the prefetchers follow a few streams better than one short run at a
// time).
template <class T, int GI, int QN>
inline __attribute__((always_inline)) void chunk_dots_g(const T* const* a, const T* const* qs, int64_t off,
                                                        int64_t len, double (*s)[4]) {
  for (int g = 0; g < GI; ++g)
    for (int q = 0; q < QN; ++q) s[g][q] = 0.0;
  for (int64_t b0 = 0; b0 < len; b0 += kLbLaneBlock) {
    const int64_t blk = std::min<int64_t>(kLbLaneBlock, len - b0);
    const int64_t vec = blk / kLbLanes * kLbLanes;
    const T* pa[GI];
    const T* pb[QN];
    for (int g = 0; g < GI; ++g) pa[g] = a[g] + off + b0;
    for (int q = 0; q < QN; ++q) pb[q] = qs[q] + off + b0;
    V16<T> acc[GI][QN] = {};
    for (int64_t j = 0; j < vec; j += kLbLanes) {
      V16<T> vb[QN];
      for (int q = 0; q < QN; ++q) vb[q] = load16(pb[q] + j);
      for (int g = 0; g < GI; ++g) {
        const V16<T> va = load16(pa[g] + j);
        for (int q = 0; q < QN; ++q) acc[g][q] = lb_dot_step(acc[g][q], va, vb[q]);
      }
    }
    for (int g = 0; g < GI; ++g)
      for (int q = 0; q < QN; ++q) {
        double t = lane_tree<T>(acc[g][q]);
        for (int64_t j = vec; j < blk; ++j) t += static_cast<double>(lb_prod(pa[g][j], pb[q][j]));
        s[g][q] += t;
      }
  }
}

template <class T, int GI>
inline __attribute__((always_inline)) void chunk_dots_gq(const T* const* a, const T* const* qs, int qn, int64_t off,
                                                         int64_t len, double (*s)[4]) {
  switch (qn) {
    case 1: chunk_dots_g<T, GI, 1>(a, qs, off, len, s); break;
    case 2: chunk_dots_g<T, GI, 2>(a, qs, off, len, s); break;
    case 3: chunk_dots_g<T, GI, 3>(a, qs, off, len, s); break;
    default: chunk_dots_g<T, GI, 4>(a, qs, off, len, s); break;
  }
}

// The nq * k partials of one chunk [off, off + len): part[q * k + i].
template <class T>
OK_KERNEL void chunk_dots(const T* const* stored, int k, const T* const* queries, int nq, int64_t off, int64_t len,
                          double* part) {
  double s[4][4];
  for (int i0 = 0; i0 < k; i0 += 4) {
    const int gi = std::min(4, k - i0);
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const int qn = std::min(4, nq - q0);
      switch (gi) {
        case 1: chunk_dots_gq<T, 1>(stored + i0, queries + q0, qn, off, len, s); break;
        case 2: chunk_dots_gq<T, 2>(stored + i0, queries + q0, qn, off, len, s); break;
        case 3: chunk_dots_gq<T, 3>(stored + i0, queries + q0, qn, off, len, s); break;
        default: chunk_dots_gq<T, 4>(stored + i0, queries + q0, qn, off, len, s); break;
      }
      for (int g = 0; g < gi; ++g)
        for (int q = 0; q < qn; ++q) part[(q0 + q) * k + i0 + g] = s[g][q];
    }
  }
}

// Outputs at least this large are written with non-temporal stores (they would not survive in L2 + L3 anyway).
constexpr int64_t kLbStreamBytes = int64_t(16) << 20;

// out[lo, hi) = sum_i c[i] v[i][lo, hi), each element's terms added in order.  The range is walked in blocks of
// kBlock values; within a block the terms are taken kGroup vectors at a time (a few input streams at once, which
// the prefetchers follow), the running sum kept in an L1 buffer between groups.  With nt (an output too large to
// stay in cache) the last group writes the aligned body with non-temporal stores: no read-for-ownership of out.
template <class T>
OK_KERNEL void lincomb_range(const T* const* v, const T* c, int m, T* __restrict out, int64_t lo, int64_t hi,
                             bool nt) {
  constexpr int64_t kBlock = 2048;
  constexpr int kGroup = 4;
  alignas(64) T tmp[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, hi - b0);
    for (int g0 = 0; g0 < m; g0 += kGroup) {
      const int g1 = std::min(m, g0 + kGroup);
      const bool last = g1 == m;
      T* dst = last ? out + b0 : tmp;
      auto one = [&](int64_t j) {
        T acc = g0 == 0 ? lb_comb_first(c[0], v[0][b0 + j]) : tmp[j];
        for (int i = g0 == 0 ? 1 : g0; i < g1; ++i) acc = lb_comb_step(acc, c[i], v[i][b0 + j]);
        dst[j] = acc;
      };
      auto sixteen = [&](int64_t j) {
        V16<T> acc = g0 == 0 ? lb_comb_first(c[0], load16(v[0] + b0 + j)) : load16(tmp + j);
        for (int i = g0 == 0 ? 1 : g0; i < g1; ++i) acc = lb_comb_step(acc, c[i], load16(v[i] + b0 + j));
        return acc;
      };
      int64_t j = 0;
      if (last && nt) {
        for (; j < len && !aligned64(dst + j); ++j) one(j);
        for (; j + kLbLanes <= len; j += kLbLanes) stream16(dst + j, sixteen(j));
      } else {
        for (; j + kLbLanes <= len; j += kLbLanes) store16(dst + j, sixteen(j));
      }
      for (; j < len; ++j) one(j);
    }
  }
  if (nt) stream_fence();
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
  const int64_t nchunks = lb_num_chunks(n);
  std::vector<double> part(static_cast<size_t>(nchunks * P));
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t off = c * kLbChunk;
      chunk_dots<T>(sp.data(), k, qp.data(), nq, off, std::min<int64_t>(kLbChunk, n - off), part.data() + c * P);
    }
  };
  int nt = threads_for_total(n * (k + nq));
  if (nt > nchunks) nt = static_cast<int>(nchunks);
  if (nt <= 1) {
    run(0, nchunks);
  } else {
    parallel_run(nt, [&](int tid, int nth) {
      int64_t lo, hi;
      part_bounds(nchunks, tid, nth, 1, &lo, &hi);
      run(lo, hi);
    });
  }
  // Chunk partials in chunk order (lbfgs_rules.h).
  for (int64_t p = 0; p < P; ++p) out[p] = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const double* pc = part.data() + c * P;
    for (int64_t p = 0; p < P; ++p) out[p] += pc[p];
  }
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

}  // namespace

void lbfgs_dots(const VecBatch& stored, const VecBatch& queries, double* out) {
  if (stored.dtype == DType::f32) dots_typed<float>(stored, queries, out);
  else dots_typed<double>(stored, queries, out);
}

void lbfgs_lincomb(const VecBatch& vecs, const std::vector<double>& coef, void* out) {
  if (vecs.dtype == DType::f32) lincomb_typed<float>(vecs, coef, out);
  else lincomb_typed<double>(vecs, coef, out);
}

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
