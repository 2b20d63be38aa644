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
#include <algorithm>
#include <cstring>
#include <vector>

// The 16-lane vector helpers are always inlined, so the vector-argument ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "../lbfgs_executors.h"
#include "../lbfgs_rules.h"
#include "../work_plan.h"
#include "isa_kernel.h"
#include "thread_pool.h"
#include "work_split.h"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

template <class T>
struct Lanes16 {
  typedef T type __attribute__((vector_size(16 * sizeof(T))));
};
template <class T>
using V16 = typename Lanes16<T>::type;
static_assert(kLbLanes == 16, "16-lane vectors");

template <class T>
inline __attribute__((always_inline)) V16<T> load16(const T* p) {
  V16<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class T>
inline __attribute__((always_inline)) void store16(T* p, V16<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// The lanes widened to double and added as the fixed tree 8 + 8, 4 + 4, 2 + 2, 1 + 1 (lbfgs_rules.h).
template <class T>
inline __attribute__((always_inline)) double lane_tree(V16<T> v) {
  double h[kLbLanes];
  for (int l = 0; l < kLbLanes; ++l) h[l] = static_cast<double>(v[l]);
  for (int w = kLbLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) h[l] += h[l + w];
  return h[0];
}

// The dots of one stored vector's chunk with QN queries at once: each query keeps its own accumulator and adds
// in exactly the documented order, but the QN chains run side by side (independent adds, one load of the stored
// vector for all of them).
template <class T, int QN>
inline __attribute__((always_inline)) void chunk_dots_q(const T* a, const T* const* qs, int64_t off, int64_t len,
                                                        double* s) {
  for (int q = 0; q < QN; ++q) s[q] = 0.0;
  for (int64_t b0 = 0; b0 < len; b0 += kLbLaneBlock) {
    const int64_t blk = std::min<int64_t>(kLbLaneBlock, len - b0);
    const int64_t vec = blk / kLbLanes * kLbLanes;
    const T* pa = a + b0;
    const T* pb[QN];
    for (int q = 0; q < QN; ++q) pb[q] = qs[q] + off + b0;
    V16<T> acc[QN] = {};
    for (int64_t j = 0; j < vec; j += kLbLanes) {
      const V16<T> va = load16(pa + j);
      for (int q = 0; q < QN; ++q) acc[q] = lb_dot_step(acc[q], va, load16(pb[q] + j));
    }
    for (int q = 0; q < QN; ++q) {
      double t = lane_tree<T>(acc[q]);
      for (int64_t j = vec; j < blk; ++j) t += static_cast<double>(lb_prod(pa[j], pb[q][j]));
      s[q] += t;
    }
  }
}

// The nq * k partials of one chunk [off, off + len): part[q * k + i].
template <class T>
OK_KERNEL void chunk_dots(const T* const* stored, int k, const T* const* queries, int nq, int64_t off, int64_t len,
                          double* part) {
  double s[4];
  for (int i = 0; i < k; ++i) {
    const T* a = stored[i] + off;
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const int qn = std::min(4, nq - q0);
      switch (qn) {
        case 1: chunk_dots_q<T, 1>(a, queries + q0, off, len, s); break;
        case 2: chunk_dots_q<T, 2>(a, queries + q0, off, len, s); break;
        case 3: chunk_dots_q<T, 3>(a, queries + q0, off, len, s); break;
        default: chunk_dots_q<T, 4>(a, queries + q0, off, len, s); break;
      }
      for (int q = 0; q < qn; ++q) part[(q0 + q) * k + i] = s[q];
    }
  }
}

// out[lo, hi) = sum_i c[i] v[i][lo, hi), in blocks of kBlock values.
template <class T>
OK_KERNEL void lincomb_range(const T* const* v, const T* c, int m, T* __restrict out, int64_t lo, int64_t hi) {
  constexpr int64_t kBlock = 1024;
  alignas(64) T tmp[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, hi - b0);
    const int64_t vec = len / kLbLanes * kLbLanes;
    for (int i = 0; i < m; ++i) {
      const T* x = v[i] + b0;
      const T ci = c[i];
      T* dst = i == m - 1 ? out + b0 : tmp;  // the last term goes straight to out
      if (i == 0) {
        for (int64_t j = 0; j < vec; j += kLbLanes) store16(dst + j, lb_comb_first(ci, load16(x + j)));
        for (int64_t j = vec; j < len; ++j) dst[j] = lb_comb_first(ci, x[j]);
      } else {
        for (int64_t j = 0; j < vec; j += kLbLanes)
          store16(dst + j, lb_comb_step(load16(tmp + j), ci, load16(x + j)));
        for (int64_t j = vec; j < len; ++j) dst[j] = lb_comb_step(tmp[j], ci, x[j]);
      }
    }
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
  if (nt <= 1) {
    lincomb_range<T>(vp.data(), c.data(), m, out, 0, n);
    return;
  }
  parallel_run(nt, [&](int tid, int nth) {
    int64_t lo, hi;
    part_bounds(n, tid, nth, kSplitAlign, &lo, &hi);
    if (lo < hi) lincomb_range<T>(vp.data(), c.data(), m, out, lo, hi);
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
