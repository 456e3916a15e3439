// Shared device helpers for the sentence-mtl kernels: dtype traits (load/store
// through f32, or f64 for double), warp and block reductions, and the macro that
// instantiates one extern "C" kernel per dtype (`name_f32`, `name_f16`, ...).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Dynamic shared memory (sized by the launch) as `T *name`; the host harness
// defines its own form (kernels/host/cuda_host.h).
#ifndef SMTL_DYNAMIC_SHARED
#define SMTL_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// ---- dtype traits ---------------------------------------------------------
// acc_t: the type a kernel accumulates in (f32 for every type but double).
template <typename T> struct Elem;

template <> struct Elem<float> {
  typedef float acc_t;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};
template <> struct Elem<double> {
  typedef double acc_t;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
};
template <> struct Elem<__half> {
  typedef float acc_t;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};
template <> struct Elem<__nv_bfloat16> {
  typedef float acc_t;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

template <typename T> __device__ __forceinline__ typename Elem<T>::acc_t to_acc(T x) {
  return Elem<T>::to_acc(x);
}
template <typename T> __device__ __forceinline__ T from_acc(typename Elem<T>::acc_t x) {
  return Elem<T>::from_acc(x);
}

// A quiet NaN of the accumulator type (no <cmath> NAN on the device).
template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// ---- reductions ------------------------------------------------------------
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `scratch` must hold 32 values.
template <typename A> __device__ __forceinline__ A block_sum(A v, A *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = (lane < n_warps) ? scratch[lane] : A(0);
  return warp_sum(v);
}

// ---- instantiation -----------------------------------------------------------
// FOR_EACH_FLOAT(M) expands M(type, suffix) for every dtype the ops support.
#define FOR_EACH_FLOAT(M) \
  M(float, f32)           \
  M(__half, f16)          \
  M(__nv_bfloat16, bf16)  \
  M(double, f64)
