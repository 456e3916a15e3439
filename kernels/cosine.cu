// L2 normalisation and row-wise cosine similarity, forward and backward
// (src/ops/cosine.rs; the math is documented there).
//
// One warp per row, 8 rows per 256-thread block. Inputs have unit-stride rows
// (the host copies others first) and any row stride; outputs are contiguous. A
// row is read with 16-byte vector loads when all the row pointers it touches are
// 16-byte aligned (decided per row, so it is uniform across the warp), else
// element by element; either way consecutive lanes read consecutive addresses.
// Each kernel reads its inputs once from DRAM: the second pass over a row, which
// writes the output, re-reads it from L1/L2 right after the first.
//
// Nothing is divided by a product of two norms: under --use_fast_math `x / y` is
// __fdividef, which returns 0 once |y| > 2^126 (~8.5e37), a product that two f32
// norms of ~1e19 reach. Each norm's reciprocal is taken on its own (a norm is at
// most ~1.8e19 while its square sum is finite) and multiplied in.

#include "common.cuh"

#define NORM_EPS 1e-12

template <typename T> struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T> __device__ __forceinline__ bool aligned16(const T *p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The row this warp owns.
__device__ __forceinline__ long long warp_row() {
  return (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
}

// Calls f(x_j) for this lane's share of x[0..h), in the accumulator type.
template <typename T, typename F>
__device__ __forceinline__ void visit(const T *x, int h, bool vec, F &&f) {
  constexpr int P = Pack<T>::N;
  int done = 0;
  if (vec) {
    const int packs = h / P;
#pragma unroll 4
    for (int p = lane_id(); p < packs; p += 32) {
      const Pack<T> px = reinterpret_cast<const Pack<T> *>(x)[p];
#pragma unroll
      for (int k = 0; k < P; ++k) f(to_acc(px.v[k]));
    }
    done = packs * P;
  }
  for (int j = done + lane_id(); j < h; j += 32) f(to_acc(x[j]));
}

// Calls f(x_j, y_j) for this lane's share of j in [0, h).
template <typename T, typename F>
__device__ __forceinline__ void visit2(const T *x, const T *y, int h, bool vec, F &&f) {
  constexpr int P = Pack<T>::N;
  int done = 0;
  if (vec) {
    const int packs = h / P;
#pragma unroll 4
    for (int p = lane_id(); p < packs; p += 32) {
      const Pack<T> px = reinterpret_cast<const Pack<T> *>(x)[p];
      const Pack<T> py = reinterpret_cast<const Pack<T> *>(y)[p];
#pragma unroll
      for (int k = 0; k < P; ++k) f(to_acc(px.v[k]), to_acc(py.v[k]));
    }
    done = packs * P;
  }
  for (int j = done + lane_id(); j < h; j += 32) f(to_acc(x[j]), to_acc(y[j]));
}

// out_j = f(x_j) for this lane's share of j in [0, h).
template <typename T, typename F>
__device__ __forceinline__ void map(T *out, const T *x, int h, bool vec, F &&f) {
  constexpr int P = Pack<T>::N;
  int done = 0;
  if (vec) {
    const int packs = h / P;
#pragma unroll 4
    for (int p = lane_id(); p < packs; p += 32) {
      const Pack<T> px = reinterpret_cast<const Pack<T> *>(x)[p];
      Pack<T> po;
#pragma unroll
      for (int k = 0; k < P; ++k) po.v[k] = from_acc<T>(f(to_acc(px.v[k])));
      reinterpret_cast<Pack<T> *>(out)[p] = po;
    }
    done = packs * P;
  }
  for (int j = done + lane_id(); j < h; j += 32) out[j] = from_acc<T>(f(to_acc(x[j])));
}

// out_j = f(x_j, y_j) for this lane's share of j in [0, h).
template <typename T, typename F>
__device__ __forceinline__ void map_pair(T *out, const T *x, const T *y, int h, bool vec, F &&f) {
  constexpr int P = Pack<T>::N;
  int done = 0;
  if (vec) {
    const int packs = h / P;
#pragma unroll 4
    for (int p = lane_id(); p < packs; p += 32) {
      const Pack<T> px = reinterpret_cast<const Pack<T> *>(x)[p];
      const Pack<T> py = reinterpret_cast<const Pack<T> *>(y)[p];
      Pack<T> po;
#pragma unroll
      for (int k = 0; k < P; ++k) po.v[k] = from_acc<T>(f(to_acc(px.v[k]), to_acc(py.v[k])));
      reinterpret_cast<Pack<T> *>(out)[p] = po;
    }
    done = packs * P;
  }
  for (int j = done + lane_id(); j < h; j += 32) out[j] = from_acc<T>(f(to_acc(x[j]), to_acc(y[j])));
}

// (out1_j, out2_j) = f(x_j, y_j) for this lane's share of j in [0, h); f writes
// its two results through references.
template <typename T, typename F>
__device__ __forceinline__ void map2(T *out1, T *out2, const T *x, const T *y, int h, bool vec, F &&f) {
  typedef typename Elem<T>::acc_t A;
  constexpr int P = Pack<T>::N;
  int done = 0;
  A r1, r2;
  if (vec) {
    const int packs = h / P;
#pragma unroll 2
    for (int p = lane_id(); p < packs; p += 32) {
      const Pack<T> px = reinterpret_cast<const Pack<T> *>(x)[p];
      const Pack<T> py = reinterpret_cast<const Pack<T> *>(y)[p];
      Pack<T> p1, p2;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        f(to_acc(px.v[k]), to_acc(py.v[k]), r1, r2);
        p1.v[k] = from_acc<T>(r1);
        p2.v[k] = from_acc<T>(r2);
      }
      reinterpret_cast<Pack<T> *>(out1)[p] = p1;
      reinterpret_cast<Pack<T> *>(out2)[p] = p2;
    }
    done = packs * P;
  }
  for (int j = done + lane_id(); j < h; j += 32) {
    f(to_acc(x[j]), to_acc(y[j]), r1, r2);
    out1[j] = from_acc<T>(r1);
    out2[j] = from_acc<T>(r2);
  }
}

// max(sqrt(sq), eps): the divisor of a row with squared norm sq.
template <typename A> __device__ __forceinline__ A clamped_norm(A sq) {
  return max(sqrt(sq), A(NORM_EPS));
}

// y = x / max(||x||, eps) per row.
template <typename T>
__device__ __forceinline__ void l2_normalize_fwd(const T *x, long long x_stride, T *out, int n, int h) {
  typedef typename Elem<T>::acc_t A;
  const long long row = warp_row();
  if (row >= n) return;  // the whole warp leaves together
  x += row * x_stride;
  out += row * h;
  const bool vec = aligned16(x) && aligned16(out);
  A sq = 0;
  visit(x, h, vec, [&](A u) { sq += u * u; });
  const A inv = A(1) / clamped_norm(warp_sum(sq));
  map(out, x, h, vec, [&](A u) { return u * inv; });
}

// dx = g/n - x<x,g>/n^3 when n = ||x|| >= eps, else g/eps.
template <typename T>
__device__ __forceinline__ void l2_normalize_bwd(const T *x, long long x_stride, const T *g, long long g_stride,
                                                 T *out, int n, int h) {
  typedef typename Elem<T>::acc_t A;
  const long long row = warp_row();
  if (row >= n) return;
  x += row * x_stride;
  g += row * g_stride;
  out += row * h;
  const bool vec = aligned16(x) && aligned16(g) && aligned16(out);
  A xg = 0, xx = 0;
  visit2(x, g, h, vec, [&](A u, A v) {
    xg += u * v;
    xx += u * u;
  });
  xg = warp_sum(xg);
  xx = warp_sum(xx);
  const A norm = sqrt(xx);
  const A inv = A(1) / max(norm, A(NORM_EPS));
  // dx = (g - y<y,g>) / n with y = x/n: every factor stays a normal number for
  // large norms (inv^3 alone would flush to 0 under fast math's -ftz).
  const A proj = norm >= A(NORM_EPS) ? xg * inv : A(0);
  map_pair(out, x, g, h, vec, [&](A u, A v) { return inv * (v - (u * inv) * proj); });
}

// cos = <a,b> / (max(||a||,eps) max(||b||,eps)) per row.
template <typename T>
__device__ __forceinline__ void cosine_rows_fwd(const T *a, long long a_stride, const T *b, long long b_stride,
                                                T *out, int n, int h) {
  typedef typename Elem<T>::acc_t A;
  const long long row = warp_row();
  if (row >= n) return;
  a += row * a_stride;
  b += row * b_stride;
  const bool vec = aligned16(a) && aligned16(b);
  A ab = 0, aa = 0, bb = 0;
  visit2(a, b, h, vec, [&](A u, A v) {
    ab += u * v;
    aa += u * u;
    bb += v * v;
  });
  ab = warp_sum(ab);
  aa = warp_sum(aa);
  bb = warp_sum(bb);
  const A inv_a = A(1) / clamped_norm(aa), inv_b = A(1) / clamped_norm(bb);
  if (lane_id() == 0) out[row] = from_acc<T>(ab * inv_a * inv_b);
}

// With da, db the clamped norms and c the cosine of row i:
//   grad_a = g/(da db) b - [||a|| >= eps] g c/da^2 a, grad_b symmetrically
// (computed with 1/da and 1/db, never 1/(da db));
// out holds grad_a [n,h] then grad_b [n,h].
template <typename T>
__device__ __forceinline__ void cosine_rows_bwd(const T *a, long long a_stride, const T *b, long long b_stride,
                                                const T *grad, long long grad_stride, T *out, int n, int h) {
  typedef typename Elem<T>::acc_t A;
  const long long row = warp_row();
  if (row >= n) return;
  a += row * a_stride;
  b += row * b_stride;
  T *da_out = out + row * h;
  T *db_out = out + ((long long)n + row) * h;
  const bool vec = aligned16(a) && aligned16(b) && aligned16(da_out) && aligned16(db_out);
  A ab = 0, aa = 0, bb = 0;
  visit2(a, b, h, vec, [&](A u, A v) {
    ab += u * v;
    aa += u * u;
    bb += v * v;
  });
  ab = warp_sum(ab);
  aa = warp_sum(aa);
  bb = warp_sum(bb);
  const A g = to_acc(grad[row * grad_stride]);
  const A na = sqrt(aa), nb = sqrt(bb);
  const A inv_a = A(1) / max(na, A(NORM_EPS)), inv_b = A(1) / max(nb, A(NORM_EPS));
  const A cos = ab * inv_a * inv_b;
  // grad_a = g/da (b/db - c a/da): the normalised rows, never a product of two
  // reciprocals (which flushes to 0 for large norms under fast math's -ftz).
  const A ga_scale = g * inv_a, gb_scale = g * inv_b;
  const A ca = na >= A(NORM_EPS) ? cos : A(0), cb = nb >= A(NORM_EPS) ? cos : A(0);
  map2(da_out, db_out, a, b, h, vec, [&](A u, A v, A &ga, A &gb) {
    const A ua = u * inv_a, vb = v * inv_b;
    ga = ga_scale * (vb - ca * ua);
    gb = gb_scale * (ua - cb * vb);
  });
}

#define COSINE_KERNELS(T, S)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256)                                                            \
      l2_normalize_fwd_##S(const T *x, long long x_stride, T *out, int n, int h) {                             \
    l2_normalize_fwd<T>(x, x_stride, out, n, h);                                                               \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) l2_normalize_bwd_##S(                                      \
      const T *x, long long x_stride, const T *g, long long g_stride, T *out, int n, int h) {                  \
    l2_normalize_bwd<T>(x, x_stride, g, g_stride, out, n, h);                                                  \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) cosine_rows_fwd_##S(                                       \
      const T *a, long long a_stride, const T *b, long long b_stride, T *out, int n, int h) {                  \
    cosine_rows_fwd<T>(a, a_stride, b, b_stride, out, n, h);                                                   \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                                            \
      cosine_rows_bwd_##S(const T *a, long long a_stride, const T *b, long long b_stride, const T *grad,       \
                          long long grad_stride, T *out, int n, int h) {                                       \
    cosine_rows_bwd<T>(a, a_stride, b, b_stride, grad, grad_stride, out, n, h);                                \
  }

FOR_EACH_FLOAT(COSINE_KERNELS)
