// Fused bias + GELU (exact, erf form), forward and backward (src/ops/bias_gelu/).
//
//   forward:  y[r,h]   = gelu(z),  z = x[r,h] + bias[h],  gelu(z) = z·Φ(z)
//   backward: dx[r,h]  = dy[r,h]·gelu'(z),  gelu'(z) = Φ(z) + z·φ(z)
//             dbias[h] = Σ_r dx[r,h]   (the dx values as stored, rounded to T)
//
// Φ(z) = (1 + erf(z/√2))/2, φ(z) = exp(−z²/2)/√(2π), evaluated in f32 (f64 for
// double). The backward recomputes z from the saved x and bias (the op keeps x,
// not y). x, dy, the outputs are contiguous [rows, H] (the op makes x and dy
// contiguous; they may start at an offset).
//
// Both directions are bandwidth-bound elementwise passes. A block is 32 x 8
// threads: threadIdx.x picks VEC adjacent columns (one 16-byte access on the
// `_vec` path: float4, 8 halves, 2 doubles; one element otherwise), so a warp
// reads 32·VEC consecutive columns of one row; threadIdx.y picks every 8th row
// of the block's `rows_per_block` rows. Grid: x = row blocks (no 65535 cap),
// y = column chunks of 32·VEC. Each thread loads its bias values once.
//
// The bias gradient has no atomics: each block sums its rows' dx per column in
// registers (in row order), then over threadIdx.y in shared memory (in y order),
// and writes one partial row to `partials[blockIdx.x, :]` (f32, f64 for
// double); `bias_gelu_dbias` then sums the partials of each column in block
// order. The result is the same on every run.
//
// The `_vec` kernels need H and the offsets of x and dy to be multiples of VEC
// (the host checks; allocations are 256-byte aligned).
#include "common.cuh"

namespace {

constexpr int LANES = 32;    // threads along H: must match LANES in src/ops/bias_gelu/cuda.rs
constexpr int ROW_LANES = 8;  // threads along the rows: must match ROW_LANES there
constexpr int FINALIZE_BLOCK = 256;  // must match FINALIZE_BLOCK there

// VEC elements moved as one access (16 bytes when VEC·sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC> __device__ __forceinline__ Pack<T, VEC> load_pack(const T *p) {
  if (VEC > 1) return *reinterpret_cast<const Pack<T, VEC> *>(p);
  Pack<T, VEC> out;
  out.v[0] = p[0];
  return out;
}

template <typename T, int VEC> __device__ __forceinline__ void store_pack(T *p, const Pack<T, VEC> &v) {
  if (VEC > 1) {
    *reinterpret_cast<Pack<T, VEC> *>(p) = v;
  } else {
    p[0] = v.v[0];
  }
}

// erf, exp and the constants in the accumulator type.
template <typename A> struct Gauss;
template <> struct Gauss<float> {
  static __device__ __forceinline__ float erf_(float v) { return erff(v); }
  static __device__ __forceinline__ float exp_(float v) { return expf(v); }
};
template <> struct Gauss<double> {
  static __device__ __forceinline__ double erf_(double v) { return erf(v); }
  static __device__ __forceinline__ double exp_(double v) { return exp(v); }
};

// Φ(z) = (1 + erf(z/√2))/2.
template <typename A> __device__ __forceinline__ A normal_cdf(A z) {
  const A inv_sqrt2 = A(0.70710678118654752440);
  return A(0.5) * (A(1) + Gauss<A>::erf_(z * inv_sqrt2));
}

template <typename A> __device__ __forceinline__ A gelu(A z) { return z * normal_cdf(z); }

// gelu'(z) = Φ(z) + z·φ(z).
template <typename A> __device__ __forceinline__ A gelu_derivative(A z) {
  const A inv_sqrt_2pi = A(0.39894228040143267794);
  return normal_cdf(z) + z * inv_sqrt_2pi * Gauss<A>::exp_(A(-0.5) * z * z);
}

template <typename T, int VEC>
__device__ __forceinline__ void bias_gelu_forward(const T *__restrict__ x, const T *__restrict__ bias,
                                                  T *__restrict__ y, long long rows, int hidden,
                                                  int rows_per_block) {
  using A = typename Elem<T>::acc_t;
  const int col = (blockIdx.y * LANES + threadIdx.x) * VEC;
  if (col >= hidden) return;  // the whole pack is out (H % VEC == 0); no barrier below
  const long long r0 = (long long)blockIdx.x * rows_per_block;
  const long long r1 = min(r0 + rows_per_block, rows);
  const Pack<T, VEC> b = load_pack<T, VEC>(bias + col);
  A bv[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) bv[k] = to_acc(b.v[k]);
  for (long long r = r0 + threadIdx.y; r < r1; r += ROW_LANES) {
    const long long at = r * hidden + col;
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + at);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_acc<T>(gelu(to_acc(xv.v[k]) + bv[k]));
    store_pack<T, VEC>(y + at, out);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void bias_gelu_backward(const T *__restrict__ x, const T *__restrict__ bias,
                                                   const T *__restrict__ dy, T *__restrict__ dx,
                                                   typename Elem<T>::acc_t *__restrict__ partials,
                                                   long long rows, int hidden, int rows_per_block) {
  using A = typename Elem<T>::acc_t;
  __shared__ A sums[ROW_LANES][VEC][LANES];  // [row lane][element][lane]: conflict-free
  const int col = (blockIdx.y * LANES + threadIdx.x) * VEC;
  const bool active = col < hidden;  // the whole pack is in range (H % VEC == 0)
  const long long r0 = (long long)blockIdx.x * rows_per_block;
  const long long r1 = min(r0 + rows_per_block, rows);
  A acc[VEC];
  A bv[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = A(0);
  if (active) {
    const Pack<T, VEC> b = load_pack<T, VEC>(bias + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) bv[k] = to_acc(b.v[k]);
    for (long long r = r0 + threadIdx.y; r < r1; r += ROW_LANES) {
      const long long at = r * hidden + col;
      const Pack<T, VEC> xv = load_pack<T, VEC>(x + at);
      const Pack<T, VEC> g = load_pack<T, VEC>(dy + at);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = from_acc<T>(to_acc(g.v[k]) * gelu_derivative(to_acc(xv.v[k]) + bv[k]));
        acc[k] += to_acc(out.v[k]);  // the stored value: dbias is the sum of dx as returned
      }
      store_pack<T, VEC>(dx + at, out);
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) sums[threadIdx.y][k][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    A *row = partials + (long long)blockIdx.x * hidden + col;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      A s = A(0);
#pragma unroll
      for (int w = 0; w < ROW_LANES; ++w) s += sums[w][k][threadIdx.x];
      row[k] = s;
    }
  }
}

// dbias[h] = Σ_p partials[p, h], p in order: one thread per column.
template <typename T>
__device__ __forceinline__ void bias_gelu_dbias(const typename Elem<T>::acc_t *__restrict__ partials,
                                                int n_partials, int hidden, T *__restrict__ dbias) {
  using A = typename Elem<T>::acc_t;
  const int col = blockIdx.x * FINALIZE_BLOCK + threadIdx.x;
  if (col >= hidden) return;
  A s = A(0);
  for (int p = 0; p < n_partials; ++p) s += partials[(long long)p * hidden + col];
  dbias[col] = from_acc<T>(s);
}

}  // namespace

// Elements per 16-byte access for the `_vec` kernels.
#define VEC_OF(T) (16 / (int)sizeof(T))

#define BIAS_GELU_KERNELS(T, S)                                                                    \
  extern "C" __global__ void __launch_bounds__(LANES *ROW_LANES) bias_gelu_fwd_##S(                \
      const T *x, const T *bias, T *y, long long rows, int hidden, int rows_per_block) {           \
    bias_gelu_forward<T, 1>(x, bias, y, rows, hidden, rows_per_block);                             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(LANES *ROW_LANES) bias_gelu_fwd_vec_##S(            \
      const T *x, const T *bias, T *y, long long rows, int hidden, int rows_per_block) {           \
    bias_gelu_forward<T, VEC_OF(T)>(x, bias, y, rows, hidden, rows_per_block);                     \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(LANES *ROW_LANES) bias_gelu_bwd_##S(                \
      const T *x, const T *bias, const T *dy, T *dx, Elem<T>::acc_t *partials, long long rows,     \
      int hidden, int rows_per_block) {                                                            \
    bias_gelu_backward<T, 1>(x, bias, dy, dx, partials, rows, hidden, rows_per_block);             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(LANES *ROW_LANES) bias_gelu_bwd_vec_##S(            \
      const T *x, const T *bias, const T *dy, T *dx, Elem<T>::acc_t *partials, long long rows,     \
      int hidden, int rows_per_block) {                                                            \
    bias_gelu_backward<T, VEC_OF(T)>(x, bias, dy, dx, partials, rows, hidden, rows_per_block);     \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(FINALIZE_BLOCK) bias_gelu_dbias_##S(                \
      const Elem<T>::acc_t *partials, int n_partials, int hidden, T *dbias) {                      \
    bias_gelu_dbias<T>(partials, n_partials, hidden, dbias);                                       \
  }

FOR_EACH_FLOAT(BIAS_GELU_KERNELS)
