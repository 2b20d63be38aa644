// The CPU executors' 16-bit load/store layer: tiles of bfloat16/float16 converted to and from float32 with the
// roundings of precision.h (included by an executor source after isa_kernel.h; the functions land in its
// OPTKERN_ISA_NS namespace).  The loops are plain integer code the compiler vectorizes for each instruction set; float16 uses
// F16C's VCVTPH2PS / VCVTPS2PH on the AVX2 and AVX-512 builds, which round exactly as precision.h's software
// conversion (tested bitwise on every float32 class: normals, subnormals, ties, overflow, infinities, NaN).
// bfloat16 uses the integer form on every build: AVX512-BF16's VCVTNEPS2BF16 flushes subnormals to zero, so it
// would differ from round-to-nearest-even (and from the other paths) on them.
// No include guard: each executor namespace gets its own copy.
#include <immintrin.h>

#include <cstdint>

#include "../precision.h"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

OK_KERNEL void load_tile16(DType d, const uint16_t* __restrict src, int64_t m, float* __restrict dst) {
  int64_t i = 0;
  if (d == DType::bf16) {
    for (; i < m; ++i) dst[i] = bf16_to_f32(src[i]);
    return;
  }
#if defined(OPTKERN_ISA_AVX2) || defined(OPTKERN_ISA_AVX512)
  for (; i + 8 <= m; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < m; ++i) dst[i] = f16_to_f32(src[i]);
}

OK_KERNEL void store_tile16_rne(DType d, uint16_t* __restrict dst, const float* __restrict src, int64_t m) {
  int64_t i = 0;
  if (d == DType::bf16) {
    for (; i < m; ++i) dst[i] = f32_to_bf16_rne(src[i]);
    return;
  }
#if defined(OPTKERN_ISA_AVX2) || defined(OPTKERN_ISA_AVX512)
  for (; i + 8 <= m; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < m; ++i) dst[i] = f32_to_f16_rne(src[i]);
}

// "split" masters: float32 = (high half << 16) | low half.
OK_KERNEL void load_tile_split(const uint16_t* __restrict hi, const uint16_t* __restrict lo, int64_t m,
                               float* __restrict dst) {
  for (int64_t i = 0; i < m; ++i) dst[i] = f32_from_halves(hi[i], lo[i]);
}
OK_KERNEL void store_tile_split(uint16_t* __restrict hi, uint16_t* __restrict lo, const float* __restrict src,
                                int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    hi[i] = f32_high_half(src[i]);
    lo[i] = f32_low_half(src[i]);
  }
}

// Stochastic rounding of elements index0 .. index0 + m - 1 of tensor `tensor` (precision.h's key).
constexpr int64_t kSrMaxTile = 1024;
OK_KERNEL void store_tile16_sr(DType d, uint16_t* __restrict dst, const float* __restrict src, int64_t m,
                               const SrKey& key, uint32_t tensor, uint64_t index0) {
  uint32_t words[kSrMaxTile + 8];
  const uint64_t first = index0 >> 2, last = (index0 + static_cast<uint64_t>(m) - 1) >> 2;
  const SrKey k = key;
  for (uint64_t blk = first; blk <= last; ++blk) {  // one Philox block per 4 elements
    const Philox4 r = sr_block(k, tensor, blk);
    uint32_t* w = words + 4 * (blk - first);
    w[0] = r.v[0];
    w[1] = r.v[1];
    w[2] = r.v[2];
    w[3] = r.v[3];
  }
  const uint32_t* rw = words + (index0 & 3u);
  if (d == DType::bf16)
    for (int64_t i = 0; i < m; ++i) dst[i] = f32_to_bf16_sr(src[i], rw[i]);
  else
    for (int64_t i = 0; i < m; ++i) dst[i] = f32_to_f16_sr(src[i], rw[i]);
}

}  // namespace
}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
