// 16-lane SIMD helpers shared by the CPU executors (included inside their OPTKERN_ISA_NS namespace, after
// isa_kernel.h): GCC vector types of 16 lanes (one zmm of float on AVX-512, two ymm on AVX2, SSE2 pieces on the
// baseline build), so every path does the same IEEE operations per lane and results agree bitwise; unaligned
// loads and stores; and non-temporal stores for outputs too large to stay in cache.
// No include guard: each executor namespace gets its own copy, compiled for its instruction set.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

// The helpers are always inlined, so the vector-argument ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <class T>
struct Lanes16 {
  typedef T type __attribute__((vector_size(16 * sizeof(T))));
  // The same vector at T's alignment, allowed to alias T: the type of an unaligned load or store.  (A memcpy
  // into a vector made GCC move some values through the stack in 16-byte pieces.)
  typedef T unaligned __attribute__((vector_size(16 * sizeof(T)), aligned(alignof(T)), may_alias));
};
template <class T>
using V16 = typename Lanes16<T>::type;

template <class T>
inline __attribute__((always_inline)) V16<T> load16(const T* p) {
  return *reinterpret_cast<const typename Lanes16<T>::unaligned*>(p);
}
template <class T>
inline __attribute__((always_inline)) void store16(T* p, V16<T> v) {
  *reinterpret_cast<typename Lanes16<T>::unaligned*>(p) = v;
}
// The 16 lanes widened to double and added as the fixed tree 8 + 8, 4 + 4, 2 + 2, 1 + 1 (h[l] += h[l + w] for
// l < w), on vector halves so it stays in registers (the L-BFGS dots and the batch-norm reductions).  The halves
// are taken with memcpy, which GCC turns into register extracts (__builtin_convertvector needs GCC >= 9 or clang).
typedef double D16 __attribute__((vector_size(128)));
typedef double D8 __attribute__((vector_size(64)));
typedef double D4 __attribute__((vector_size(32)));
typedef double D2 __attribute__((vector_size(16)));
template <class H, class V>
inline __attribute__((always_inline)) H half_sum(const V& v) {
  H lo, hi;
  std::memcpy(&lo, &v, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
  return lo + hi;
}
template <class T>
OK_ISA_INLINE double lane_tree(V16<T> v) {
  const D16 h = __builtin_convertvector(v, D16);
  const D2 h2 = half_sum<D2>(half_sum<D4>(half_sum<D8>(h)));
  return h2[0] + h2[1];
}

// Non-temporal store of 16 values to a 64-byte-aligned address (large outputs: no read-for-ownership, no cache
// pollution).  The baseline build stores normally.  Callers end with stream_fence().
template <class T>
OK_ISA_INLINE void stream16(T* p, V16<T> v) {
#if defined(OPTKERN_ISA_AVX512)
  if constexpr (sizeof(T) == 4) {
    __m512 a;
    std::memcpy(&a, &v, 64);
    _mm512_stream_ps(reinterpret_cast<float*>(p), a);
  } else {
    __m512d a, b;
    std::memcpy(&a, &v, 64);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + 64, 64);
    _mm512_stream_pd(reinterpret_cast<double*>(p), a);
    _mm512_stream_pd(reinterpret_cast<double*>(p) + 8, b);
  }
#elif defined(OPTKERN_ISA_AVX2)
  constexpr int kPieces = static_cast<int>(sizeof(V16<T>)) / 32;
  for (int k = 0; k < kPieces; ++k) {
    __m256i a;
    std::memcpy(&a, reinterpret_cast<const char*>(&v) + 32 * k, 32);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(p) + 32 * k), a);
  }
#else
  store16(p, v);
#endif
}
inline void stream_fence() { _mm_sfence(); }
inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

