// 16-bit storage: the one place optkern's roundings are defined.  Every executor (the CPU builds for each
// instruction set, the CUDA kernels, batch norm, the global norm) loads bfloat16/float16 elements into float32
// and stores float32 results back through these functions, so the rules stay written once, in float32, and
// every path rounds the same way.  All of it is integer arithmetic on the bit patterns (no floating-point
// environment, no FTZ/DAZ, no FMA), so results are bitwise identical on every path and device.
//
//   f32 -> bf16 / f16, round to nearest, ties to even (IEEE 754 roundTiesToEven): overflow goes to +-inf as IEEE
//       says (bf16: above the largest finite value's rounding boundary; f16: |x| >= 65520), float16 subnormals
//       are kept (never flushed), and a NaN stays a NaN of the same sign, made quiet, with the top bits of its
//       payload (what x86's F16C VCVTPS2PH produces, so the AVX2/AVX-512 builds may use it).
//   bf16 / f16 -> f32: exact (a float16 NaN is made quiet, as F16C's VCVTPH2PS does).
//   "split" masters: a float32 master held as its high half (the bfloat16 param, the master rounded toward zero)
//       and its low half (an int16 residual), bit for bit.
//   Stochastic rounding: round up with probability equal to the fraction of the way to the next 16-bit value
//       (toward +-inf by magnitude), drawn from a counter-based generator (Philox4x32-10, keyed by a seed; the
//       counter is the step, the tensor's index in the call and the element's index), so a result does not
//       depend on threads, instruction sets or the device.  Infinities and NaN round as above.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__CUDACC__)
#define OK_BITS_HD __host__ __device__ __forceinline__
#else
#define OK_BITS_HD inline __attribute__((always_inline))
#endif

namespace optkern {

OK_BITS_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
OK_BITS_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// ---- bfloat16 ----------------------------------------------------------------------------------------------
OK_BITS_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

OK_BITS_HD uint16_t f32_to_bf16_rne(float x) {
  const uint32_t u = f32_bits(x);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // carries into the exponent: up to inf
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

// The high half of a float32, the bfloat16 it rounds to toward zero ("split" masters' param).
OK_BITS_HD uint16_t f32_high_half(float x) { return static_cast<uint16_t>(f32_bits(x) >> 16); }
OK_BITS_HD uint16_t f32_low_half(float x) { return static_cast<uint16_t>(f32_bits(x) & 0xffffu); }
OK_BITS_HD float f32_from_halves(uint16_t high, uint16_t low) {
  return f32_from_bits((static_cast<uint32_t>(high) << 16) | static_cast<uint32_t>(low));
}

// Stochastic rounding to bfloat16 with 32 random bits r (their top 16 are used).
OK_BITS_HD uint16_t f32_to_bf16_sr(float x, uint32_t r) {
  const uint32_t u = f32_bits(x);
  const bool finite = (u & 0x7f800000u) != 0x7f800000u;
  return finite ? static_cast<uint16_t>((u + (r >> 16)) >> 16) : f32_to_bf16_rne(x);
}

// ---- float16 -------------------------------------------------------------------------------------------------
OK_BITS_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1fu) u = sign | 0x7f800000u | (m != 0 ? 0x400000u : 0u) | (m << 13);  // inf; NaN made quiet
  else if (e != 0) u = sign | ((e + 112u) << 23) | (m << 13);      // normal: rebias 15 -> 127
  else {                                                           // zero or subnormal: m 2^-24, exact in float32
    const float mag = static_cast<float>(m) * 5.9604644775390625e-08f;  // 2^-24 (a normal float32 product)
    u = sign | f32_bits(mag);
  }
  return f32_from_bits(u);
}

OK_BITS_HD uint16_t f32_to_f16_rne(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) h = 0x7e00u | ((a >> 13) & 0x3ffu);            // NaN: quiet, payload's top bits
  else if (a >= 0x477ff000u) h = 0x7c00u;                               // rounds to inf (|x| >= 65520)
  else if (a >= 0x38800000u) {                                          // normal float16 (|x| >= 2^-14)
    h = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  } else if (a > 0x33000000u) {                                         // subnormal: units of 2^-24, ties to even
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - (a >> 23);                            // 14 .. 24
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    h = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  } else {
    h = 0;                                                              // |x| <= 2^-25: to zero
  }
  return static_cast<uint16_t>(sign | h);
}

// Stochastic rounding to float16 with 32 random bits r.
OK_BITS_HD uint16_t f32_to_f16_sr(float x, uint32_t r) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f32_to_f16_rne(x);                       // inf, NaN
  uint32_t h;
  if (a >= 0x47800000u) h = 0x7c00u;                                    // |x| >= 2^16: beyond float16's range
  else if (a >= 0x38800000u) h = (a - 0x38000000u + (r >> 19)) >> 13;   // normal: 13 dropped bits (carry: up to inf)
  else {                                                                // subnormal: 14 .. dropped bits
    uint32_t m = (a & 0x7fffffu) | (a >= 0x00800000u ? 0x800000u : 0u);
    uint32_t shift = (a >= 0x00800000u ? 126u - (a >> 23) : 125u);  // a float32 subnormal: m 2^-149
    if (shift > 31u) {  // below 2^-31 the probability keeps 31 bits
      m = shift - 31u < 32u ? m >> (shift - 31u) : 0u;
      shift = 31u;
    }
    h = static_cast<uint32_t>((static_cast<uint64_t>(m) + (r >> (32u - shift))) >> shift);
  }
  return static_cast<uint16_t>(sign | h);
}

// ---- one storage type's load and round-to-nearest store ---------------------------------------------------
OK_BITS_HD float half_to_f32(DType d, uint16_t h) { return d == DType::bf16 ? bf16_to_f32(h) : f16_to_f32(h); }
OK_BITS_HD uint16_t f32_to_half_rne(DType d, float x) { return d == DType::bf16 ? f32_to_bf16_rne(x) : f32_to_f16_rne(x); }
OK_BITS_HD uint16_t f32_to_half_sr(DType d, float x, uint32_t r) {
  return d == DType::bf16 ? f32_to_bf16_sr(x, r) : f32_to_f16_sr(x, r);
}

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) --------------------
struct Philox4 {
  uint32_t v[4];
};
OK_BITS_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}
OK_BITS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    philox_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The random word of element `index` of tensor `tensor` at step `step` under `seed`: word index % 4 of the Philox
// block whose counter is (index / 4 low, index / 4 high, step, tensor).
struct SrKey {
  uint64_t seed = 0;
  uint32_t step = 0;
};
OK_BITS_HD Philox4 sr_block(const SrKey& k, uint32_t tensor, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), k.step, tensor,
                       static_cast<uint32_t>(k.seed), static_cast<uint32_t>(k.seed >> 32));
}
OK_BITS_HD uint32_t sr_word(const SrKey& k, uint32_t tensor, uint64_t index) {
  return sr_block(k, tensor, index >> 2).v[index & 3u];
}

}  // namespace optkern
