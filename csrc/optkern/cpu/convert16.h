// The CPU executors' 16-bit load/store layer: tiles of bfloat16/float16 converted to and from float32 with the
// roundings of precision.h (included by an executor source after isa_kernel.h; the functions land in its
// OPTKERN_ISA_NS namespace).  The loops are plain integer code the compiler vectorizes for each instruction set; float16 uses
// F16C's VCVTPH2PS / VCVTPS2PH on the AVX2 and AVX-512 builds, which round exactly as precision.h's software
// conversion (tested bitwise on every float32 class: normals, subnormals, ties, overflow, infinities, NaN).
// bfloat16 uses the integer form on every build (AVX2 intrinsics on the AVX2 and AVX-512 builds, the same operations
// per lane): AVX512-BF16's VCVTNEPS2BF16 flushes subnormals to zero, so it would differ from round-to-nearest-even
// (and from the other paths) on them.  Stochastic rounding's Philox blocks are computed 8 at a time on those builds.
// No include guard: each executor namespace gets its own copy.
#include <immintrin.h>

#include <cstdint>

#include "../precision.h"

#if defined(OPTKERN_ISA_AVX2) || defined(OPTKERN_ISA_AVX512)
#define OK_CONVERT_AVX2 1
#else
#define OK_CONVERT_AVX2 0
#endif

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

#if OK_CONVERT_AVX2
// AVX2 forms of precision.h's integer bfloat16 roundings, 8 lanes (the same operations per lane: bitwise equal).
OK_ISA_INLINE __m256i bf16_rne8(__m256i u) {  // f32_to_bf16_rne, in the low 16 bits of each lane
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
  return _mm256_blendv_epi8(r, quiet, nan);
}
OK_ISA_INLINE void store8_bf16(uint16_t* p, __m256i v) {  // the low halves of 8 lanes (each <= 0xffff)
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
OK_ISA_INLINE __m256i load8_u16(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// Philox4x32-10 of 8 blocks at once (blocks blk0 .. blk0 + 7), written as 32 words in block order.
OK_ISA_INLINE __m256i mulhi_lo(__m256i a, __m256i m, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
OK_ISA_INLINE void philox8(const SrKey& k, uint32_t tensor, uint64_t blk0, uint32_t* out) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk0)));
  __m256i c0 = _mm256_add_epi32(base_lo, lane);
  // the high word carries when the low word wraps (blk0 low + lane overflows 32 bits)
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, _mm256_set1_epi32(INT32_MIN)),
                                             _mm256_xor_si256(c0, _mm256_set1_epi32(INT32_MIN)));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk0 >> 32))), wrapped);
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(k.step)), c3 = _mm256_set1_epi32(static_cast<int>(tensor));
  uint32_t k0 = static_cast<uint32_t>(k.seed), k1 = static_cast<uint32_t>(k.seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    __m256i lo0, lo1;
    const __m256i hi0 = mulhi_lo(c0, m0, &lo0), hi1 = mulhi_lo(c2, m1, &lo1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // transpose: lane j of (c0, c1, c2, c3) is block j's 4 words
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpacklo_epi32(c2, c3);
  const __m256i t2 = _mm256_unpackhi_epi32(c0, c1), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t1), u1 = _mm256_unpackhi_epi64(t0, t1);
  const __m256i u2 = _mm256_unpacklo_epi64(t2, t3), u3 = _mm256_unpackhi_epi64(t2, t3);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
}
#endif

OK_KERNEL void load_tile16(DType d, const uint16_t* __restrict src, int64_t m, float* __restrict dst) {
  int64_t i = 0;
  if (d == DType::bf16) {
#if OK_CONVERT_AVX2
    for (; i + 8 <= m; i += 8) {  // bits << 16
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(w, 16));
    }
#endif
    for (; i < m; ++i) dst[i] = bf16_to_f32(src[i]);
    return;
  }
#if OK_CONVERT_AVX2
  for (; i + 8 <= m; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < m; ++i) dst[i] = f16_to_f32(src[i]);
}

OK_KERNEL void store_tile16_rne(DType d, uint16_t* __restrict dst, const float* __restrict src, int64_t m) {
  int64_t i = 0;
  if (d == DType::bf16) {
#if OK_CONVERT_AVX2
    for (; i + 8 <= m; i += 8) store8_bf16(dst + i, bf16_rne8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
    for (; i < m; ++i) dst[i] = f32_to_bf16_rne(src[i]);
    return;
  }
#if OK_CONVERT_AVX2
  for (; i + 8 <= m; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < m; ++i) dst[i] = f32_to_f16_rne(src[i]);
}

// "split" masters: float32 = (high half << 16) | low half.
OK_KERNEL void load_tile_split(const uint16_t* __restrict hi, const uint16_t* __restrict lo, int64_t m,
                               float* __restrict dst) {
  int64_t i = 0;
#if OK_CONVERT_AVX2
  for (; i + 8 <= m; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_or_si256(_mm256_slli_epi32(load8_u16(hi + i), 16), load8_u16(lo + i)));
#endif
  for (; i < m; ++i) dst[i] = f32_from_halves(hi[i], lo[i]);
}
OK_KERNEL void store_tile_split(uint16_t* __restrict hi, uint16_t* __restrict lo, const float* __restrict src,
                                int64_t m) {
  int64_t i = 0;
#if OK_CONVERT_AVX2
  for (; i + 8 <= m; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    store8_bf16(hi + i, _mm256_srli_epi32(u, 16));
    store8_bf16(lo + i, _mm256_and_si256(u, _mm256_set1_epi32(0xffff)));
  }
#endif
  for (; i < m; ++i) {
    hi[i] = f32_high_half(src[i]);
    lo[i] = f32_low_half(src[i]);
  }
}

// Stochastic rounding of elements index0 .. index0 + m - 1 of tensor `tensor` (precision.h's key).
constexpr int64_t kSrMaxTile = 1024;
OK_KERNEL void store_tile16_sr(DType d, uint16_t* __restrict dst, const float* __restrict src, int64_t m,
                               const SrKey& key, uint32_t tensor, uint64_t index0) {
  alignas(32) uint32_t words[kSrMaxTile + 64];
  const uint64_t first = index0 >> 2, last = (index0 + static_cast<uint64_t>(m) - 1) >> 2;
  const SrKey k = key;
  uint64_t blk = first;
#if OK_CONVERT_AVX2
  for (; blk + 8 <= last + 1; blk += 8) philox8(k, tensor, blk, words + 4 * (blk - first));
#endif
  for (; blk <= last; ++blk) {  // one Philox block per 4 elements
    const Philox4 r = sr_block(k, tensor, blk);
    uint32_t* w = words + 4 * (blk - first);
    w[0] = r.v[0];
    w[1] = r.v[1];
    w[2] = r.v[2];
    w[3] = r.v[3];
  }
  const uint32_t* rw = words + (index0 & 3u);
  if (d == DType::bf16) {
    int64_t i = 0;
#if OK_CONVERT_AVX2
    for (; i + 8 <= m; i += 8) {  // finite: (bits + r >> 16) >> 16, else round to nearest
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m256i r = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rw + i)), 16);
      const __m256i expo = _mm256_and_si256(u, _mm256_set1_epi32(0x7f800000));
      const __m256i nonfinite = _mm256_cmpeq_epi32(expo, _mm256_set1_epi32(0x7f800000));
      const __m256i sr = _mm256_srli_epi32(_mm256_add_epi32(u, r), 16);
      store8_bf16(dst + i, _mm256_blendv_epi8(sr, bf16_rne8(u), nonfinite));
    }
#endif
    for (; i < m; ++i) dst[i] = f32_to_bf16_sr(src[i], rw[i]);
  } else {
    for (int64_t i = 0; i < m; ++i) dst[i] = f32_to_f16_sr(src[i], rw[i]);
  }
}

}  // namespace
}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
