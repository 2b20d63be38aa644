// CUDA executor for the optimizer steps: one launch per step, whatever the number of tensors (two with device
// step counters: first a tiny launch that makes each counter's coefficients and advances it, then the update).
//
// The work plan is host code (work_plan.h, tested on the CPU): the tensors' elements are cut into chunks of
// kChunk, and the device holds only an O(tensors) table: each tensor's pointers, size, counters and the index
// of its first chunk.  A block takes chunks grid-stride, finds a chunk's tensor by a binary search over the first
// chunks (chunk_tensor) and applies the same per-element rule as the CPU executor (optim_rules.h), with 16-byte
// loads and stores when every buffer of the chunk is aligned and one element at a time otherwise.
//
// The table is cached, keyed on the step's exact slots (device, dtype, every pointer, size and counter), so a
// training loop whose arrays stay put uploads it once: per-step host work is one comparison of the slots, no
// allocation, no copy.  A step whose grads moved (a new allocation) uploads a new table, O(tensors) bytes.
// Under capture into a CUDA graph nothing is uploaded: a table that differs only in its grads (backward allocated
// them inside the capture) is re-pointed by a captured kernel, anything else new is refused (run one step outside
// the capture first, as torch's own capturable optimizers ask), and the tables a graph uses are pinned.  With
// device counters nothing else in a step needs the host, so a captured step replays with the counts advancing on
// the device.
//
// Coefficients: a host-counted step takes the host's Coef (optim_coefs.h) as a kernel parameter; with device
// counters a one-thread-per-counter launch reads each distinct count (and NAdam's product), makes the
// coefficients with the same functions, in double (so the CPU and GPU agree bit for bit), stores them in the
// table's slots and advances the count; the update kernel loads its tensor's slot (keeping its registers as
// they are without counters).  found_inf (device) skips both launches' writes: nothing changes, counts included.
// Every CUDA call is checked and a failure throws; nothing falls back to the CPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../executors.h"
#include "../precision.h"
#include "../work_plan.h"
#include "cuda_util.cuh"

namespace optkern {
namespace cuda_exec {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item (a multiple of every pack width)
constexpr int kThreads = 256;
constexpr size_t kPlanCacheSize = 16;  // cached tables (param sets x grad placements), least recently used evicted

template <class T>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  T v[kWidth];
};

constexpr size_t kCoefSlot = 128;  // bytes per coefficient slot (one per distinct device counter)

// One tensor in the device table.
struct DevTensor {
  void* ptr[2 + kMaxStates];
  void* master;  // StepBatch::prec: the float32 master or the int16 low halves
  void* copy;    // the 16-bit copy of the updated param
  int64_t numel;
  int64_t coef_index;  // device counters: its counter's slot in the table's coefficient array
  int64_t index;       // its index in the step's list (stochastic rounding's key)
};

// One distinct counter (a tensor's step count, and NAdam's product next to it) for the advance launch.
struct DevCounter {
  void* step;
  void* mu_product;
};

template <class Rule, class T>
__device__ __forceinline__ void apply_one(const typename Rule::template Coef<T>& c, T* p, const T* g,
                                          T* const* s, int64_t i) {
  T pi = p[i], v[kMaxStates] = {};
#pragma unroll
  for (int k = 0; k < Rule::kStates; ++k) v[k] = s[k][i];
  apply_rule<Rule, T>(c, pi, g[i], v[0], v[1], v[2], v[3], v[4]);
  p[i] = pi;
#pragma unroll
  for (int k = 0; k < Rule::kStates; ++k) s[k][i] = v[k];
}

template <class Rule, class T>
struct KernelArgs {
  typename Rule::template Coef<T> coef;  // the host's coefficients (host counts), converted to T on the host
  const float* grad_scale;
  const float* found_inf;
  const DevTensor* tensors;
  const int64_t* starts;  // first chunk of each table entry
  int64_t ntensors, nchunks;
  const unsigned char* coefs;  // device counters: Coef<T> per distinct counter, written by coef_kernel
};

// kCounters: the coefficients come from the table's slots (device counters) instead of the kernel parameter;
// a separate instantiation, so that a host-counted step keeps its coefficients in the parameter bank.
template <class Rule, class T, bool kCounters>
__global__ void __launch_bounds__(kThreads) step_kernel(const KernelArgs<Rule, T> a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // AMP / clip found inf or NaN: skip the step
  typename Rule::template Coef<T> c = a.coef;
  const T gmul = a.grad_scale != nullptr ? static_cast<T>(*a.grad_scale) : T(1);
  if (a.grad_scale != nullptr) c.gscale = c.gscale * gmul;
  int64_t coef_slot = -1;  // the slot the current coefficients were loaded from
  constexpr int W = Pack<T>::kWidth;
  for (int64_t ci = blockIdx.x; ci < a.nchunks; ci += gridDim.x) {
    const int64_t ti = chunk_tensor(a.starts, a.ntensors, ci);
    const DevTensor& t = a.tensors[ti];
    if (kCounters && t.coef_index != coef_slot) {  // block-uniform: once per tensor a block visits
      c = *reinterpret_cast<const typename Rule::template Coef<T>*>(a.coefs + t.coef_index * kCoefSlot);
      if (a.grad_scale != nullptr) c.gscale = c.gscale * gmul;
      coef_slot = t.coef_index;
    }
    int64_t begin, len;
    chunk_range(a.starts, ti, t.numel, kChunk, ci, &begin, &len);
    T* p = static_cast<T*>(t.ptr[0]) + begin;
    const T* g = static_cast<const T*>(t.ptr[1]) + begin;
    T* s[kMaxStates] = {};
    uintptr_t mis = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g);
#pragma unroll
    for (int k = 0; k < Rule::kStates; ++k) {
      s[k] = static_cast<T*>(t.ptr[2 + k]) + begin;
      mis |= reinterpret_cast<uintptr_t>(s[k]);
    }
    int64_t vec_end = 0;
    if ((mis & 15u) == 0) {  // every buffer 16-byte aligned: packed loads and stores
      const int64_t npacks = len / W;
      vec_end = npacks * W;
      for (int64_t k = threadIdx.x; k < npacks; k += blockDim.x) {
        Pack<T> P = reinterpret_cast<Pack<T>*>(p)[k];
        const Pack<T> G = reinterpret_cast<const Pack<T>*>(g)[k];
        Pack<T> S[kMaxStates] = {};
#pragma unroll
        for (int j = 0; j < Rule::kStates; ++j) S[j] = reinterpret_cast<Pack<T>*>(s[j])[k];
#pragma unroll
        for (int l = 0; l < W; ++l)
          apply_rule<Rule, T>(c, P.v[l], G.v[l], S[0].v[l], S[1].v[l], S[2].v[l], S[3].v[l], S[4].v[l]);
        reinterpret_cast<Pack<T>*>(p)[k] = P;
#pragma unroll
        for (int j = 0; j < Rule::kStates; ++j) reinterpret_cast<Pack<T>*>(s[j])[k] = S[j];
      }
    }
    for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) apply_one<Rule, T>(c, p, g, s, i);
  }
}

// 16-bit storage, masters and copies (StepBatch::prec): the same rule in float32 between precision.h's loads and
// stores.  A thread takes packs of 8 consecutive elements (16-byte loads and stores) when every buffer is 16-byte
// aligned at the chunk's start, one element at a time otherwise and for the chunk's tail.  Stochastic rounding
// draws the same Philox words as the CPU (precision.h: sr_block of index / 4; a pack starts at a multiple of 8).
struct MixedLayout {
  DType param, grad, state, copy_dtype;
  MasterMode master;
  bool copy, stochastic;
  SrKey key;
};
__device__ __forceinline__ float load_f32(DType d, const void* p, int64_t i) {
  return d == DType::f32 ? static_cast<const float*>(p)[i] : half_to_f32(d, static_cast<const uint16_t*>(p)[i]);
}
__device__ __forceinline__ void store_f32_rne(DType d, void* p, int64_t i, float x) {
  if (d == DType::f32) static_cast<float*>(p)[i] = x;
  else static_cast<uint16_t*>(p)[i] = f32_to_half_rne(d, x);
}

// Packs of 8 elements: one 16-byte load or store per 16-bit buffer (8 bfloat16/float16), two per float32 buffer.
constexpr int kMixedPack = 8;
__device__ __forceinline__ void load8(DType d, const void* base, int64_t i0, float* out) {
  if (d == DType::f32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i0);
    const float4 a = q[0], b = q[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w; out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + i0);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      out[2 * l] = half_to_f32(d, static_cast<uint16_t>(w[l] & 0xffffu));
      out[2 * l + 1] = half_to_f32(d, static_cast<uint16_t>(w[l] >> 16));
    }
  }
}
__device__ __forceinline__ void store8_u16(void* base, int64_t i0, const uint16_t* h) {
  uint4 q;
  q.x = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
  q.y = static_cast<uint32_t>(h[2]) | (static_cast<uint32_t>(h[3]) << 16);
  q.z = static_cast<uint32_t>(h[4]) | (static_cast<uint32_t>(h[5]) << 16);
  q.w = static_cast<uint32_t>(h[6]) | (static_cast<uint32_t>(h[7]) << 16);
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i0) = q;
}
__device__ __forceinline__ void store8_rne(DType d, void* base, int64_t i0, const float* x) {
  if (d == DType::f32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(base) + i0);
    q[0] = make_float4(x[0], x[1], x[2], x[3]);
    q[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    uint16_t h[kMixedPack];
#pragma unroll
    for (int l = 0; l < kMixedPack; ++l) h[l] = f32_to_half_rne(d, x[l]);
    store8_u16(base, i0, h);
  }
}
__device__ __forceinline__ bool aligned16(const void* base, int64_t i0, DType d) {
  return ((reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(i0) * dtype_size(d)) & 15u) == 0;
}

template <class Rule, bool kCounters>
__global__ void __launch_bounds__(kThreads) mixed_step_kernel(const KernelArgs<Rule, float> a, const MixedLayout L) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  typename Rule::template Coef<float> c = a.coef;
  const float gmul = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  if (a.grad_scale != nullptr) c.gscale = c.gscale * gmul;
  int64_t coef_slot = -1;
  const bool half_params = L.param != DType::f32;
  for (int64_t ci = blockIdx.x; ci < a.nchunks; ci += gridDim.x) {
    const int64_t ti = chunk_tensor(a.starts, a.ntensors, ci);
    const DevTensor& t = a.tensors[ti];
    if (kCounters && t.coef_index != coef_slot) {
      c = *reinterpret_cast<const typename Rule::template Coef<float>*>(a.coefs + t.coef_index * kCoefSlot);
      if (a.grad_scale != nullptr) c.gscale = c.gscale * gmul;
      coef_slot = t.coef_index;
    }
    int64_t begin, len;
    chunk_range(a.starts, ti, t.numel, kChunk, ci, &begin, &len);
    // Packed: every buffer 16-byte aligned at the chunk's start (chunks start at multiples of kChunk elements).
    const DType src = !half_params || L.master == MasterMode::fp32 ? DType::f32 : L.param;
    bool packed = aligned16(t.ptr[0], begin, L.param) && aligned16(t.ptr[1], begin, L.grad);
    for (int k = 0; k < Rule::kStates; ++k) packed = packed && aligned16(t.ptr[2 + k], begin, L.state);
    if (L.master != MasterMode::none) packed = packed && aligned16(t.master, begin, src == DType::f32 ? DType::f32 : DType::i16);
    if (L.copy) packed = packed && aligned16(t.copy, begin, L.copy_dtype);
    int64_t vec_end = begin;
    if (packed) {
      const int64_t npacks = len / kMixedPack;
      vec_end = begin + npacks * kMixedPack;
      for (int64_t k = threadIdx.x; k < npacks; k += blockDim.x) {
        const int64_t i0 = begin + k * kMixedPack;
        float p[kMixedPack], g[kMixedPack], s[kMaxStates][kMixedPack] = {};
        if (L.master == MasterMode::split) {
          const uint4 hq = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(t.ptr[0]) + i0);
          const uint4 lq = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(t.master) + i0);
          const uint32_t hw[4] = {hq.x, hq.y, hq.z, hq.w}, lw[4] = {lq.x, lq.y, lq.z, lq.w};
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            p[2 * l] = f32_from_halves(static_cast<uint16_t>(hw[l] & 0xffffu), static_cast<uint16_t>(lw[l] & 0xffffu));
            p[2 * l + 1] = f32_from_halves(static_cast<uint16_t>(hw[l] >> 16), static_cast<uint16_t>(lw[l] >> 16));
          }
        } else {
          load8(src, L.master == MasterMode::fp32 ? t.master : t.ptr[0], i0, p);
        }
        load8(L.grad, t.ptr[1], i0, g);
#pragma unroll
        for (int j = 0; j < Rule::kStates; ++j) load8(L.state, t.ptr[2 + j], i0, s[j]);
#pragma unroll
        for (int l = 0; l < kMixedPack; ++l)
          apply_rule<Rule, float>(c, p[l], g[l], s[0][l], s[1][l], s[2][l], s[3][l], s[4][l]);
#pragma unroll
        for (int j = 0; j < Rule::kStates; ++j) store8_rne(L.state, t.ptr[2 + j], i0, s[j]);
        if (!half_params) {
          store8_rne(DType::f32, t.ptr[0], i0, p);
        } else if (L.master == MasterMode::split) {
          uint16_t hi[kMixedPack], lo[kMixedPack];
#pragma unroll
          for (int l = 0; l < kMixedPack; ++l) {
            hi[l] = f32_high_half(p[l]);
            lo[l] = f32_low_half(p[l]);
          }
          store8_u16(t.ptr[0], i0, hi);
          store8_u16(t.master, i0, lo);
        } else {
          if (L.master == MasterMode::fp32) store8_rne(DType::f32, t.master, i0, p);
          if (L.stochastic) {
            const uint32_t key_tensor = static_cast<uint32_t>(t.index);
            const Philox4 r0 = sr_block(L.key, key_tensor, static_cast<uint64_t>(i0) >> 2);
            const Philox4 r1 = sr_block(L.key, key_tensor, (static_cast<uint64_t>(i0) >> 2) + 1);
            uint16_t h[kMixedPack];
#pragma unroll
            for (int l = 0; l < 4; ++l) {
              h[l] = f32_to_half_sr(L.param, p[l], r0.v[l]);
              h[4 + l] = f32_to_half_sr(L.param, p[4 + l], r1.v[l]);
            }
            store8_u16(t.ptr[0], i0, h);
          } else {
            store8_rne(L.param, t.ptr[0], i0, p);
          }
        }
        if (L.copy) store8_rne(L.copy_dtype, t.copy, i0, p);
      }
    }
    for (int64_t i = vec_end + threadIdx.x; i < begin + len; i += blockDim.x) {
      float p;
      if (!half_params) p = static_cast<const float*>(t.ptr[0])[i];
      else if (L.master == MasterMode::fp32) p = static_cast<const float*>(t.master)[i];
      else if (L.master == MasterMode::split)
        p = f32_from_halves(static_cast<const uint16_t*>(t.ptr[0])[i], static_cast<const uint16_t*>(t.master)[i]);
      else p = half_to_f32(L.param, static_cast<const uint16_t*>(t.ptr[0])[i]);
      const float g = load_f32(L.grad, t.ptr[1], i);
      float s[kMaxStates] = {};
#pragma unroll
      for (int j = 0; j < Rule::kStates; ++j) s[j] = load_f32(L.state, t.ptr[2 + j], i);
      apply_rule<Rule, float>(c, p, g, s[0], s[1], s[2], s[3], s[4]);
#pragma unroll
      for (int j = 0; j < Rule::kStates; ++j) store_f32_rne(L.state, t.ptr[2 + j], i, s[j]);
      if (!half_params) {
        static_cast<float*>(t.ptr[0])[i] = p;
      } else {
        uint16_t* dst = static_cast<uint16_t*>(t.ptr[0]);
        if (L.master == MasterMode::split) {
          dst[i] = f32_high_half(p);
          static_cast<uint16_t*>(t.master)[i] = f32_low_half(p);
        } else {
          if (L.master == MasterMode::fp32) static_cast<float*>(t.master)[i] = p;
          dst[i] = L.stochastic
                       ? f32_to_half_sr(L.param, p, sr_word(L.key, static_cast<uint32_t>(t.index), static_cast<uint64_t>(i)))
                       : f32_to_half_rne(L.param, p);
        }
      }
      if (L.copy) static_cast<uint16_t*>(t.copy)[i] = f32_to_half_rne(L.copy_dtype, p);
    }
  }
}

// Before the update (same stream), one thread per distinct device counter: make the coefficients of its count + 1
// (the host's functions, optim_coefs.h) into its slot, then advance the count by one and NAdam's product by mu_t,
// unless found_inf skips the step (the update kernel then skips too, and reads no slot).
template <class Rule, class T>
__global__ void coef_kernel(const DevCounter* counters, int64_t n, const CudaStep<Rule> st, unsigned char* coefs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (st.found_inf != nullptr && *st.found_inf != 0.0f) return;
  const DevCounter c = counters[i];
  const bool has_product = c.mu_product != nullptr;
  CoefD<Rule> cd;
  double next_taken, next_product;
  counter_step(st.hyper, st.scalars, load_counter(c.step, st.counter_dtype), has_product,
               has_product ? load_counter(c.mu_product, st.product_dtype) : 1.0, &cd, &next_taken, &next_product);
  *reinterpret_cast<typename Rule::template Coef<T>*>(coefs + i * kCoefSlot) = typename Rule::template Coef<T>(cd);
  if (has_product) store_counter(c.mu_product, st.product_dtype, next_product);
  store_counter(c.step, st.counter_dtype, next_taken);
}

// ---- the cached device table -------------------------------------------------------------------------------------
struct DeviceTable {
  int device = 0;
  DType dtype = DType::f32;
  bool counters = false;
  std::vector<TensorSlots> key;  // the slots it was built from, compared in full on lookup
  std::vector<int64_t> row_of;   // key index -> row in the device table (-1: a zero-size tensor, not uploaded)
  DeviceBuffer mem;  // [DevTensor x n][int64 starts x n][DevCounter x ncounters][coefficient slots x ncounters]
  const DevTensor* tensors = nullptr;
  const int64_t* starts = nullptr;
  const DevCounter* counter_list = nullptr;
  unsigned char* coefs = nullptr;
  int64_t ntensors = 0, nchunks = 0, ncounters = 0;
  size_t upload_bytes = 0;
  // Used by a CUDA graph being captured: a replay reads it, so it is never evicted (nor freed) afterwards.
  bool pinned = false;
  // Its grad pointers were re-pointed inside a capture (patch_grads_kernel, run by the graph's replays): its device
  // rows match `key` only once a replay has run, so an eager step that finds it uploads the rows again first.
  bool patched_in_capture = false;
};

bool same_slots(const std::vector<TensorSlots>& a, const std::vector<TensorSlots>& b, bool grads_too) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const TensorSlots &x = a[i], &y = b[i];
    if (x.numel != y.numel || x.step != y.step || x.mu_product != y.mu_product || x.master != y.master ||
        x.copy != y.copy || x.key_index != y.key_index)
      return false;
    for (int k = 0; k < 2 + kMaxStates; ++k)
      if (x.ptr[k] != y.ptr[k] && (grads_too || k != 1)) return false;
  }
  return true;
}

// The rows, starts and counters of a table for these slots (what is uploaded), and its sizes.
std::vector<unsigned char> table_bytes(const StepBatch& b, bool counters, DeviceTable* t, size_t* coef_offset) {
  std::vector<DevTensor> rows;
  std::vector<int64_t> numels;
  std::vector<DevCounter> distinct;
  std::unordered_map<const void*, int64_t> slot_of;
  t->row_of.assign(b.tensors.size(), -1);
  for (size_t i = 0; i < b.tensors.size(); ++i) {
    const TensorSlots& s = b.tensors[i];
    int64_t slot = -1;
    if (counters) {
      auto ins = slot_of.emplace(s.step, static_cast<int64_t>(distinct.size()));
      if (ins.second) distinct.push_back(DevCounter{s.step, s.mu_product});
      slot = ins.first->second;
    }
    if (s.numel == 0) continue;  // zero-size tensors own no chunk and stay out (their counters still advance)
    DevTensor r;
    for (int k = 0; k < 2 + kMaxStates; ++k) r.ptr[k] = s.ptr[k];
    r.master = s.master;
    r.copy = s.copy;
    r.numel = s.numel;
    r.coef_index = slot;
    r.index = s.key_index >= 0 ? s.key_index : static_cast<int64_t>(i);
    t->row_of[i] = static_cast<int64_t>(rows.size());
    rows.push_back(r);
    numels.push_back(s.numel);
  }
  std::vector<int64_t> starts = chunk_starts(numels, kChunk, &t->nchunks);
  t->ntensors = static_cast<int64_t>(rows.size());
  t->ncounters = static_cast<int64_t>(distinct.size());
  const size_t tb = rows.size() * sizeof(DevTensor), sb = starts.size() * sizeof(int64_t),
               cb = distinct.size() * sizeof(DevCounter);
  *coef_offset = (tb + sb + cb + 15) / 16 * 16;  // coefficient slots, 16-byte aligned, not uploaded
  std::vector<unsigned char> host(tb + sb + cb);
  if (tb) std::memcpy(host.data(), rows.data(), tb);
  if (sb) std::memcpy(host.data() + tb, starts.data(), sb);
  if (cb) std::memcpy(host.data() + tb + sb, distinct.data(), cb);
  return host;
}

std::shared_ptr<DeviceTable> build_table(const StepBatch& b, bool counters, cudaStream_t stream) {
  auto t = std::make_shared<DeviceTable>();
  t->device = b.device.index;
  t->dtype = b.dtype;
  t->counters = counters;
  t->key = b.tensors;
  size_t coff = 0;
  std::vector<unsigned char> host = table_bytes(b, counters, t.get(), &coff);
  t->upload_bytes = host.size();
  if (!host.empty()) {
    t->mem.allocate(coff + static_cast<size_t>(t->ncounters) * kCoefSlot, stream);
    // Pageable source, once per table: the driver stages the bytes before the call returns.
    OK_CUDA_CHECK(cudaMemcpyAsync(t->mem.as<void>(), host.data(), host.size(), cudaMemcpyHostToDevice, stream));
    unsigned char* base = t->mem.as<unsigned char>();
    const size_t tb = static_cast<size_t>(t->ntensors) * sizeof(DevTensor), sb = tb / sizeof(DevTensor) * 8;
    t->tensors = reinterpret_cast<const DevTensor*>(base);
    t->starts = reinterpret_cast<const int64_t*>(base + tb);
    t->counter_list = reinterpret_cast<const DevCounter*>(base + tb + sb);
    t->coefs = base + coff;
  }
  return t;
}

// Re-point rows' grads inside a capture: the new pointers travel as kernel parameters (captured with the graph),
// so every replay writes them before its step kernels read the rows.  kPatch pairs per launch (< 4 KB).
constexpr int kPatch = 240;
struct GradPatch {
  int64_t row[kPatch];
  const void* grad[kPatch];
  int n;
};
__global__ void patch_grads_kernel(DevTensor* rows, const GradPatch patch) {
  const int i = static_cast<int>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < patch.n) rows[patch.row[i]].ptr[1] = const_cast<void*>(patch.grad[i]);
}

void patch_grads_captured(DeviceTable& t, const StepBatch& b, cudaStream_t stream) {
  GradPatch patch;
  patch.n = 0;
  auto flush = [&] {
    if (patch.n == 0) return;
    patch_grads_kernel<<<(patch.n + 127) / 128, 128, 0, stream>>>(const_cast<DevTensor*>(t.tensors), patch);
    OK_CUDA_CHECK(cudaGetLastError());
    patch.n = 0;
  };
  for (size_t i = 0; i < b.tensors.size(); ++i) {
    if (t.row_of[i] < 0 || t.key[i].ptr[1] == b.tensors[i].ptr[1]) continue;
    patch.row[patch.n] = t.row_of[i];
    patch.grad[patch.n] = b.tensors[i].ptr[1];
    if (++patch.n == kPatch) flush();
  }
  flush();
  for (size_t i = 0; i < b.tensors.size(); ++i) t.key[i].ptr[1] = b.tensors[i].ptr[1];
  t.patched_in_capture = true;
}

// Eager: upload a table's rows again from its key (after a capture re-pointed them; see patched_in_capture).
void refresh_rows(DeviceTable& t, const StepBatch& b, cudaStream_t stream) {
  size_t coff = 0;
  DeviceTable scratch;
  std::vector<unsigned char> host = table_bytes(b, t.counters, &scratch, &coff);
  if (!host.empty())
    OK_CUDA_CHECK(cudaMemcpyAsync(t.mem.as<void>(), host.data(), host.size(), cudaMemcpyHostToDevice, stream));
  t.patched_in_capture = false;
}

// The table for this step: a cached one when the slots are unchanged, else a new one.  Under capture, a table that
// differs only in its grads (torch's recipe: zero_grad(set_to_none=True), then backward allocates the grads inside
// the capture) is re-pointed by a captured kernel; anything else new is refused.  Tables a capture used are pinned.
std::shared_ptr<DeviceTable> table_for(const StepBatch& b, bool counters, cudaStream_t stream, bool capturing) {
  static std::mutex mu;
  static std::list<std::shared_ptr<DeviceTable>> cache;  // most recently used first
  auto matches = [&](const DeviceTable& t, bool grads_too) {
    return t.device == b.device.index && t.dtype == b.dtype && t.counters == counters &&
           same_slots(t.key, b.tensors, grads_too);
  };
  std::vector<std::shared_ptr<DeviceTable>> evicted;  // freed outside the lock, each under its own device
  std::shared_ptr<DeviceTable> found;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end() && !found; ++it)
      if (matches(**it, true)) {
        found = *it;
        cache.splice(cache.begin(), cache, it);
      }
    if (!found && capturing)
      for (auto it = cache.begin(); it != cache.end() && !found; ++it)
        if (matches(**it, false)) {
          found = *it;
          cache.splice(cache.begin(), cache, it);
          patch_grads_captured(*found, b, stream);
        }
    if (found) {
      if (capturing) found->pinned = true;
      else if (found->patched_in_capture) refresh_rows(*found, b, stream);
      if (!found->pinned) found->mem.set_stream(stream);  // freed, when evicted, after this step's work
      return found;
    }
  }
  if (capturing)
    throw std::runtime_error(
        "optkern: this step's params and states are not the ones of any step run before, and its work plan cannot "
        "be uploaded while the stream is being captured into a CUDA graph: run one step with the same params and "
        "states outside the capture first (a warm-up step, as torch's capturable optimizers need; the grads may "
        "change)");
  std::shared_ptr<DeviceTable> t = build_table(b, counters, stream);
  {
    std::lock_guard<std::mutex> lock(mu);
    cache.push_front(t);
    size_t unpinned = 0;
    for (const auto& e : cache) unpinned += e->pinned ? 0 : 1;
    for (auto it = std::prev(cache.end()); unpinned > kPlanCacheSize && it != cache.begin();) {
      auto cur = it--;
      if ((*cur)->pinned) continue;
      evicted.push_back(*cur);  // least recently used first
      cache.erase(cur);
      --unpinned;
    }
  }
  for (auto& e : evicted) {
    if (e.use_count() == 1) {  // freed stream-ordered on its last stream, with its own device current
      DeviceGuard guard(e->device);
      e.reset();
    }
  }
  return t;
}

// Grid: enough blocks to fill the device at the kernel's occupancy, never more than there are chunks.
template <class K>
int grid_for(K kernel, int64_t nchunks, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> resident;  // (kernel, device) -> blocks resident on the device
  int cap;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
    auto it = resident.find(key);
    if (it == resident.end())
      it = resident.emplace(key, resident_blocks_per_sm(kernel, kThreads) * sm_count(device)).first;
    cap = it->second;
  }
  return static_cast<int>(nchunks < cap ? nchunks : cap);
}

template <class Rule, class T>
void launch(const StepBatch& b, const CudaStep<Rule>& s) {
  DeviceGuard guard(b.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(b.stream);
  const bool capturing = stream_capturing(stream);
  if (s.step_dependent && !s.device_counters && capturing)
    throw std::runtime_error(
        "optkern: a step captured in a CUDA graph needs its step count on the device (torch: capturable=True; "
        "functional: step= a one-element CUDA array of the steps taken): a host count would be frozen into the "
        "graph and every replay would repeat this step's coefficients");
  if (b.prec.mixed && b.prec.stochastic && capturing)
    throw std::runtime_error(
        "optkern: stochastic_rounding keys each step's rounding by its host step count, which a CUDA graph would "
        "freeze (every replay would draw the same random numbers); run such steps outside the capture");
  std::shared_ptr<DeviceTable> table = table_for(b, s.device_counters, stream, capturing);
  static_assert(sizeof(typename Rule::template Coef<double>) <= kCoefSlot, "a coefficient slot holds a Coef");
  if (s.device_counters && table->ncounters > 0) {  // coefficients from the device counts, counts advanced
    const int threads = 128;
    const int blocks = static_cast<int>((table->ncounters + threads - 1) / threads);
    coef_kernel<Rule, T><<<blocks, threads, 0, stream>>>(table->counter_list, table->ncounters, s, table->coefs);
    OK_CUDA_CHECK(cudaGetLastError());
  }
  KernelArgs<Rule, T> a{typename Rule::template Coef<T>(s.coef), s.grad_scale, s.found_inf, table->tensors,
                        table->starts, table->ntensors, table->nchunks, table->coefs};
  if (table->nchunks > 0 && b.prec.mixed) {
    if constexpr (std::is_same<T, float>::value) {
      const Precision& pr = b.prec;
      const MixedLayout L{b.dtype, pr.grad, pr.state, pr.copy_dtype, pr.master, pr.copy, pr.stochastic,
                          SrKey{pr.seed, static_cast<uint32_t>(s.sr_step)}};
      if (s.device_counters)
        mixed_step_kernel<Rule, true><<<grid_for(mixed_step_kernel<Rule, true>, table->nchunks, b.device.index),
                                        kThreads, 0, stream>>>(a, L);
      else
        mixed_step_kernel<Rule, false><<<grid_for(mixed_step_kernel<Rule, false>, table->nchunks, b.device.index),
                                         kThreads, 0, stream>>>(a, L);
      OK_CUDA_CHECK(cudaGetLastError());
    } else {
      throw std::logic_error("optkern: 16-bit storage computes in float32 (run_rule dispatches it so)");
    }
  } else if (table->nchunks > 0) {
    if (s.device_counters)
      step_kernel<Rule, T, true><<<grid_for(step_kernel<Rule, T, true>, table->nchunks, b.device.index), kThreads, 0,
                                   stream>>>(a);
    else
      step_kernel<Rule, T, false><<<grid_for(step_kernel<Rule, T, false>, table->nchunks, b.device.index), kThreads,
                                    0, stream>>>(a);
    OK_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

template <class Rule>
void run_rule(const StepBatch& b, const CudaStep<Rule>& s) {
  if (b.prec.mixed || b.dtype == DType::f32)  // 16-bit storage computes in float32
    launch<Rule, float>(b, s);
  else
    launch<Rule, double>(b, s);
}

#define OPTKERN_INSTANTIATE(R) template void run_rule<R>(const StepBatch&, const CudaStep<R>&);
OPTKERN_FOR_EACH_RULE(OPTKERN_INSTANTIATE)
#undef OPTKERN_INSTANTIATE

bool available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return false;
  }
  return n > 0;
}

}  // namespace cuda_exec

bool cuda_built() { return true; }
bool cuda_available() { return cuda_exec::available(); }

}  // namespace optkern
