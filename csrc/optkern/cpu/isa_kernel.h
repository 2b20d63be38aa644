// OK_KERNEL: the attribute that gives a CPU kernel function its instruction set.  Every CPU executor source is
// compiled three times (CMakeLists.txt), with OPTKERN_ISA_NS set to cpu_avx512, cpu_avx2 or cpu_scalar.  Only
// functions marked OK_KERNEL carry the instruction set; everything else in those files, including the
// standard-library templates they instantiate, is baseline x86-64 code, so no AVX-512 instruction can leak
// into code shared with the other paths.
#pragma once

#ifndef OPTKERN_ISA_NS
#error "OPTKERN_ISA_NS must name the instruction-set namespace"
#endif

// OK_ISA_INLINE: a helper inlined into kernels that may use the instruction set's intrinsics.
#if defined(OPTKERN_ISA_AVX512)
#define OK_KERNEL \
  __attribute__((noinline, target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c,prefer-vector-width=512")))
#define OK_ISA_INLINE \
  inline __attribute__((always_inline, target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c,prefer-vector-width=512")))
#elif defined(OPTKERN_ISA_AVX2)
#define OK_KERNEL __attribute__((noinline, target("avx2,fma,f16c")))
#define OK_ISA_INLINE inline __attribute__((always_inline, target("avx2,fma,f16c")))
#else
#define OK_KERNEL __attribute__((noinline))
#define OK_ISA_INLINE inline __attribute__((always_inline))
#endif
