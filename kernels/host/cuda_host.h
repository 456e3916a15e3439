// CUDA semantics on the CPU, for running the unmodified kernels/*.cu on the host
// (the `host-kernels` feature: build.rs force-includes this header and puts
// kernels/host/ first on the include path, so <cuda_fp16.h> and <cuda_bf16.h>
// are the stand-ins beside it).
//
// What it gives, and how (the scheduler is kernels/host/runtime.cpp):
// - Every thread of a block is a fiber; the block's fibers run concurrently on
//   one OS thread, switching only at synchronisation points, and blocks run in
//   parallel on several OS threads.
// - __syncthreads() is a barrier of the block's live threads (exited threads
//   drop out, as on Volta and later); a barrier that can never complete (some
//   threads wait at another barrier, or for exited lanes) is reported as a
//   deadlock, not hung.
// - Warp shuffles, votes and __syncwarp exchange values among the lanes of the
//   mask through a warp barrier: a value another lane writes to shared memory is
//   seen only after a barrier, so code that relies on implicit warp synchrony
//   reads stale values here, as it can on the GPU.
// - __shared__ variables belong to the block (each OS thread runs one block at a
//   time); dynamic shared memory is sized by the launch (SMTL_DYNAMIC_SHARED).
// - Atomics are real atomics; __half / __nv_bfloat16 round as the device does.
// - Math is the host's IEEE math: at least as precise as the device's fast-math
//   approximations (--use_fast_math), so the tests' dtype tolerances cover both.
//   The intrinsics below with device-specific edge cases (__fdividef) follow the
//   device's documented behaviour.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ---- keywords ----------------------------------------------------------------
// build.rs finds the kernels in the preprocessed source by `extern "C" [[gnu::used]] void`.
#define __global__ [[gnu::used]]
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__ static const

namespace smtl_host {

struct uint3_t {
  unsigned int x, y, z;
};

// The fiber (CUDA thread) and block being run by this OS thread.
struct ThreadCtx {
  uint3_t thread_idx;
  unsigned int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};
struct BlockCtx {
  uint3_t block_idx, block_dim, grid_dim;
  unsigned char *dynamic_shared;
};
extern thread_local ThreadCtx *current_thread;
extern thread_local BlockCtx *current_block;

// Synchronisation, implemented by the scheduler (runtime.cpp).
void sync_block();
// Writes `bytes` of `value` to this lane's exchange slot, waits for every lane of
// `mask`, and returns the 32 slots of this exchange (valid until the next one).
const uint64_t *warp_exchange(unsigned mask, const void *value, size_t bytes);
// Fails the launch with `message` (unwinds this block; the launch returns it).
[[noreturn]] void fail(const char *message);

inline unsigned lane() { return current_thread->linear & 31u; }

// The value of `value` in lane `src_lane` among the lanes of `mask`. A source
// outside this lane's width-segment gives this lane's own value, as on the GPU;
// `earlier_ok` (xor shuffles) lets a lane read from earlier segments.
template <typename T>
inline T shuffle_from(unsigned mask, T value, int src_lane, int width, bool earlier_ok = false) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32");
  const uint64_t *slots = warp_exchange(mask, &value, sizeof(T));
  const unsigned me = lane();
  const unsigned segment = me & ~static_cast<unsigned>(width - 1);
  unsigned src = static_cast<unsigned>(src_lane);
  const bool before = src_lane < 0 || src < segment;
  if ((before && !earlier_ok) || src >= segment + static_cast<unsigned>(width)) src = me;
  if (!((mask >> src) & 1u)) fail("shuffle reads a lane outside its mask");
  T out;
  std::memcpy(&out, &slots[src], sizeof(T));
  return out;
}

// Reinterprets an atomic target as std::atomic-capable storage.
template <typename T> inline T atomic_rmw_cas(T *address, T (*op)(T, T), T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(address, &old, op(old, value), true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}

template <typename F> inline F atomic_float_add(F *address, F value) {
  using Bits = typename std::conditional<sizeof(F) == 4, uint32_t, uint64_t>::type;
  Bits *bits = reinterpret_cast<Bits *>(address);
  Bits old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    F current, next;
    std::memcpy(&current, &old, sizeof(F));
    next = current + value;
    Bits next_bits;
    std::memcpy(&next_bits, &next, sizeof(F));
    if (__atomic_compare_exchange_n(bits, &old, next_bits, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return current;
  }
}

}  // namespace smtl_host

// ---- built-in variables --------------------------------------------------------
#define threadIdx (::smtl_host::current_thread->thread_idx)
#define blockIdx (::smtl_host::current_block->block_idx)
#define blockDim (::smtl_host::current_block->block_dim)
#define gridDim (::smtl_host::current_block->grid_dim)
static constexpr int warpSize = 32;

// Dynamic shared memory: `SMTL_DYNAMIC_SHARED(float, smem);` declares `smem` as
// the launch's dynamic shared bytes (common.cuh gives the device form).
#define SMTL_DYNAMIC_SHARED(T, name) T *name = reinterpret_cast<T *>(::smtl_host::current_block->dynamic_shared)

// ---- synchronisation -------------------------------------------------------------
inline void __syncthreads() { ::smtl_host::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const char none = 0;
  ::smtl_host::warp_exchange(mask, &none, 1);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int base = static_cast<int>(::smtl_host::lane()) & ~(width - 1);
  return ::smtl_host::shuffle_from(mask, v, base + (src_lane & (width - 1)), width);
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::smtl_host::shuffle_from(mask, v, static_cast<int>(::smtl_host::lane()) ^ lane_mask, width, true);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::smtl_host::shuffle_from(mask, v, static_cast<int>(::smtl_host::lane() + delta), width);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::smtl_host::shuffle_from(mask, v, static_cast<int>(::smtl_host::lane()) - static_cast<int>(delta), width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const char p = predicate != 0;
  const uint64_t *slots = ::smtl_host::warp_exchange(mask, &p, 1);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) && (slots[l] & 0xffu)) bits |= 1u << l;
  }
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// ---- atomics -------------------------------------------------------------------
template <typename T> inline T atomicAdd(T *address, T value) {
  if constexpr (std::is_floating_point<T>::value) {
    return ::smtl_host::atomic_float_add(address, value);
  } else {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  }
}
template <typename T> inline T atomicSub(T *address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicExch(T *address, T value) { return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicCAS(T *address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value, whether or not it was replaced
}
template <typename T> inline T atomicMax(T *address, T value) {
  return ::smtl_host::atomic_rmw_cas<T>(address, [](T a, T b) { return a > b ? a : b; }, value);
}
template <typename T> inline T atomicMin(T *address, T value) {
  return ::smtl_host::atomic_rmw_cas<T>(address, [](T a, T b) { return a < b ? a : b; }, value);
}
template <typename T> inline T atomicOr(T *address, T value) { return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicAnd(T *address, T value) { return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST); }

// ---- math ----------------------------------------------------------------------
// CUDA's overloaded max/min take any mix of arithmetic types.
template <typename A, typename B> inline typename std::common_type<A, B>::type max(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B> inline typename std::common_type<A, B>::type min(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
// Float overloads of the math functions in the global namespace, as on the device.
using std::abs;
using std::ceil;
using std::exp;
using std::exp2;
using std::expm1;
using std::fabs;
using std::floor;
using std::fma;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::log1p;
using std::log2;
using std::pow;
using std::sqrt;
using std::tanh;

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
// The device's approximate division: 0 (NaN for an infinite x) when 2^126 < |y| < 2^128.
inline float __fdividef(float x, float y) {
  const float ay = std::fabs(y);
  if (ay > 8.507059173023462e37f && ay < INFINITY) return std::isinf(x) ? NAN : 0.0f;
  return x / y;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}
inline unsigned __popc(unsigned x) { return static_cast<unsigned>(__builtin_popcount(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
