// CPU executor: applies any rule of optim_rules.h to every element of a StepBatch, in one pass.
//
// This file is compiled three times, with OPTKERN_ISA_NS set to cpu_avx512, cpu_avx2 or cpu_scalar and the
// matching compiler flags (CMakeLists.txt): the rule is written once and the compiler vectorizes the loop
// for each instruction set (the scalar build has vectorization switched off).  cpu_dispatch picks one at
// run time by CPUID.  All builds use -ffp-contract=off, so the three give bitwise-identical results.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../executors.h"
#include "thread_pool.h"
#include "work_split.h"
#include "isa_kernel.h"


namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

// One contiguous range of one tensor: load, apply the rule, store.  The restrict qualifiers tell the
// compiler what the binding has checked (no two buffers overlap), so the loop vectorizes without aliasing
// checks.
template <class Rule, class T>
OK_KERNEL void apply_range(const typename Rule::template Coef<T>& c, T* __restrict p,
                                           const T* __restrict g, T* __restrict s0, T* __restrict s1,
                                           T* __restrict s2, int64_t n) {
  const typename Rule::template Coef<T> cc = c;  // local copy: scalars live in registers
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i];
    T a = T(0), b = T(0), d = T(0);
    if constexpr (Rule::kStates > 0) a = s0[i];
    if constexpr (Rule::kStates > 1) b = s1[i];
    if constexpr (Rule::kStates > 2) d = s2[i];
    Rule::apply(cc, pi, g[i], a, b, d);
    p[i] = pi;
    if constexpr (Rule::kStates > 0) s0[i] = a;
    if constexpr (Rule::kStates > 1) s1[i] = b;
    if constexpr (Rule::kStates > 2) s2[i] = d;
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
    T* s0 = Rule::kStates > 0 ? static_cast<T*>(t.ptr[2]) + r.begin : nullptr;
    T* s1 = Rule::kStates > 1 ? static_cast<T*>(t.ptr[3]) + r.begin : nullptr;
    T* s2 = Rule::kStates > 2 ? static_cast<T*>(t.ptr[4]) + r.begin : nullptr;
    apply_range<Rule, T>(c, p, g, s0, s1, s2, r.end - r.begin);
  };
  for_each_range_parallel(b, body);
}

// Sum of squares of one range.  float32: squares are summed in float32 lanes over blocks of 1024 elements (64
// per lane, so the block error stays near float32 epsilon), and each block sum is added in double; this runs
// at the speed of the loads.  float64: double lanes throughout.
template <class T>
OK_KERNEL double sum_squares_range(const T* __restrict x, int64_t n) {
  constexpr int kLanes = 16;
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    T acc[kLanes] = {};
    for (int64_t j = 0; j < kBlock; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        T v = x[i + j + l];
        acc[l] += v * v;
      }
    double block = 0.0;
    for (int l = 0; l < kLanes; ++l) block += static_cast<double>(acc[l]);
    total += block;
  }
  for (; i < n; ++i) {
    double v = static_cast<double>(x[i]);
    total += v * v;
  }
  return total;
}

template <class T>
OK_KERNEL double max_abs_range(const T* __restrict x, int64_t n) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int nan[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      T a = ok_abs(x[i + l]);
      nan[l] |= (a != a);
      acc[l] = ok_max(acc[l], a);
    }
  for (; i < n; ++i) {
    T a = ok_abs(x[i]);
    nan[0] |= (a != a);
    acc[0] = ok_max(acc[0], a);
  }
  T m = T(0);
  int any_nan = 0;
  for (int l = 0; l < kLanes; ++l) {
    m = ok_max(m, acc[l]);
    any_nan |= nan[l];
  }
  return any_nan ? NAN : static_cast<double>(m);
}

template <class T, class F>
double reduce_typed(const StepBatch& b, F range_fn, bool is_max) {
  const int nt = max_threads_for(b);
  std::vector<double> partial(static_cast<size_t>(nt), 0.0);
  auto body = [&](const ElementRange& r, int tid) {
    const T* x = static_cast<const T*>(b.tensors[r.tensor].ptr[0]) + r.begin;
    double v = range_fn(x, r.end - r.begin);
    double& acc = partial[static_cast<size_t>(tid)];
    if (is_max)
      acc = (std::isnan(v) || std::isnan(acc)) ? NAN : std::max(acc, v);
    else
      acc += v;
  };
  for_each_range_parallel_tid(b, nt, body);
  double total = 0.0;
  for (double v : partial) total = is_max ? ((std::isnan(v) || std::isnan(total)) ? NAN : std::max(total, v))
                                          : total + v;
  return total;
}

}  // namespace

template <class Rule>
void run_rule(const StepBatch& b, const CoefD<Rule>& c) {
  if (b.dtype == DType::f32)
    run_typed<Rule, float>(b, c);
  else
    run_typed<Rule, double>(b, c);
}

#define OPTKERN_INSTANTIATE(R) template void run_rule<R>(const StepBatch&, const CoefD<R>&);
OPTKERN_FOR_EACH_RULE(OPTKERN_INSTANTIATE)
#undef OPTKERN_INSTANTIATE

double sum_squares(const StepBatch& b) {
  if (b.dtype == DType::f32) return reduce_typed<float>(b, sum_squares_range<float>, false);
  return reduce_typed<double>(b, sum_squares_range<double>, false);
}

double max_abs(const StepBatch& b) {
  if (b.dtype == DType::f32) return reduce_typed<float>(b, max_abs_range<float>, true);
  return reduce_typed<double>(b, max_abs_range<double>, true);
}

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
