// LayerNorm over the last dimension H, with an optional residual added first,
// forward and backward (src/ops/layer_norm/).
//
//   s = x (+ r)                       the sum rounded to T, as `x + r` in candle
//   y = (s - mean) * rstd * w + b     mean, biased variance over the row's H values
//   rstd = 1 / sqrt(var + eps)
//
//   backward, per row (gw = dy * w, xhat = (s - mean) * rstd):
//     ds = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))   (= dx = dr)
//     dw = sum over rows of dy * xhat,  db = sum over rows of dy
//
// Statistics accumulate in f32 (f64 for double) with two passes (the mean, then
// the squared deviations), as the CPU op does. Inputs are contiguous rows (the op
// makes x, r and dy so); pointers come already offset. The forward writes y and
// the per-row statistics `stats` = [mean (rows) | rstd (rows)] in the accumulator
// type, which the backward reads. With a residual, the forward writes nothing
// else: the backward reads x and r again and recomputes s (one more input read
// instead of one more output write, and none when no gradient is wanted).
// `has_res` = 0 means no residual (then `r` is ignored: the plan passes x).
//
// Two forms per direction, by H:
//   _w<V> (H <= 32 * V): one warp per row, lane l owns columns l, l + 32, ...
//         (coalesced), the row's values in registers; 8 rows per block.
//   _block (any H, used above 1024): one block of 256 threads per row (forward)
//         or per row in turn (backward), values re-read from memory.
// The forward with `store_y` = 0 writes only the statistics: the backward's plan
// runs it so when the forward left none (it ran on the CPU path).
//
// The weight and bias gradients are reduced without atomics: each backward block
// sums its rows into registers (warp form: then the warps in order through shared
// memory) and writes its partial row [dw (H) | db (H)] to `partial` [blocks][2H];
// `layer_norm_bwd_finalize` then sums the partials per column in a fixed order and
// writes [dw | db] in T. Results depend on the grid size only (chosen from the
// shape by the plan), never on scheduling.
#include "common.cuh"

namespace {

constexpr int WARPS = 8;            // warps per block of the warp-per-row kernels
constexpr int BLOCK = 32 * WARPS;   // threads per block, every kernel (src/ops/layer_norm/cuda.rs)
constexpr int FINALIZE_WARPS = BLOCK / 32;

// Element i of the row sum s: x, or x + r rounded to T (what `x + r` gives).
template <typename T>
__device__ __forceinline__ typename Elem<T>::acc_t load_s(const T *__restrict__ x, const T *__restrict__ r,
                                                          int has_res, long long i) {
  if (has_res) return to_acc(from_acc<T>(to_acc(x[i]) + to_acc(r[i])));
  return to_acc(x[i]);
}

template <typename T, int V>
__device__ __forceinline__ void forward_warp(const T *__restrict__ x, const T *__restrict__ r, int has_res,
                                             const T *__restrict__ w, const T *__restrict__ b,
                                             T *__restrict__ y, typename Elem<T>::acc_t *__restrict__ stats,
                                             long long rows, int h, double eps, int store_y) {
  using A = typename Elem<T>::acc_t;
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp: no barrier below but the warp's own
  const long long base = row * h;

  A v[V];
  A sum = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int j = lane + 32 * k;
    v[k] = j < h ? load_s(x, r, has_res, base + j) : A(0);
    sum += v[k];
  }
  const A mean = warp_sum(sum) / A(h);
  A sq = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A d = v[k] - mean;
    if (lane + 32 * k < h) sq += d * d;
  }
  const A rstd = A(1) / sqrt(warp_sum(sq) / A(h) + A(eps));
  if (lane == 0) {
    stats[row] = mean;
    stats[rows + row] = rstd;
  }
  if (!store_y) return;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int j = lane + 32 * k;
    if (j < h) y[base + j] = from_acc<T>((v[k] - mean) * rstd * to_acc(w[j]) + to_acc(b[j]));
  }
}

template <typename T>
__device__ __forceinline__ void forward_block(const T *__restrict__ x, const T *__restrict__ r, int has_res,
                                              const T *__restrict__ w, const T *__restrict__ b,
                                              T *__restrict__ y, typename Elem<T>::acc_t *__restrict__ stats,
                                              long long rows, int h, double eps, int store_y) {
  using A = typename Elem<T>::acc_t;
  __shared__ A scratch[32];
  const long long row = blockIdx.x;
  const long long base = row * h;
  A sum = A(0);
  for (int j = threadIdx.x; j < h; j += BLOCK) sum += load_s(x, r, has_res, base + j);
  const A mean = block_sum(sum, scratch) / A(h);
  A sq = A(0);
  for (int j = threadIdx.x; j < h; j += BLOCK) {
    const A d = load_s(x, r, has_res, base + j) - mean;
    sq += d * d;
  }
  const A rstd = A(1) / sqrt(block_sum(sq, scratch) / A(h) + A(eps));
  if (threadIdx.x == 0) {
    stats[row] = mean;
    stats[rows + row] = rstd;
  }
  if (!store_y) return;
  for (int j = threadIdx.x; j < h; j += BLOCK) {
    const A s = load_s(x, r, has_res, base + j);
    y[base + j] = from_acc<T>((s - mean) * rstd * to_acc(w[j]) + to_acc(b[j]));
  }
}

template <typename T, int V>
__device__ __forceinline__ void backward_warp(const T *__restrict__ x, const T *__restrict__ r, int has_res,
                                              const T *__restrict__ w, const T *__restrict__ dy,
                                              const typename Elem<T>::acc_t *__restrict__ stats,
                                              T *__restrict__ dx, typename Elem<T>::acc_t *__restrict__ partial,
                                              long long rows, int h) {
  using A = typename Elem<T>::acc_t;
  // The block's [dw | db] sums, column j at [j] and [32 * V + j].
  __shared__ A block_acc[2 * 32 * V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  A pw[V], pb[V];
#pragma unroll
  for (int k = 0; k < V; ++k) pw[k] = pb[k] = A(0);

  for (long long row = (long long)blockIdx.x * WARPS + warp; row < rows; row += (long long)gridDim.x * WARPS) {
    const long long base = row * h;
    const A mean = stats[row], rstd = stats[rows + row];
    A xhat[V], gw[V];
    A sum_gw = A(0), sum_gw_xhat = A(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int j = lane + 32 * k;
      if (j < h) {
        xhat[k] = (load_s(x, r, has_res, base + j) - mean) * rstd;
        const A g = to_acc(dy[base + j]);
        gw[k] = g * to_acc(w[j]);
        sum_gw += gw[k];
        sum_gw_xhat += gw[k] * xhat[k];
        pw[k] += g * xhat[k];
        pb[k] += g;
      } else {
        xhat[k] = gw[k] = A(0);
      }
    }
    const A a = warp_sum(sum_gw) / A(h), c = warp_sum(sum_gw_xhat) / A(h);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int j = lane + 32 * k;
      if (j < h) dx[base + j] = from_acc<T>(rstd * (gw[k] - a - xhat[k] * c));
    }
  }

  // The warps' sums, added in warp order (deterministic).
  for (int turn = 0; turn < WARPS; ++turn) {
    if (warp == turn) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int j = lane + 32 * k;
        block_acc[j] = turn == 0 ? pw[k] : block_acc[j] + pw[k];
        block_acc[32 * V + j] = turn == 0 ? pb[k] : block_acc[32 * V + j] + pb[k];
      }
    }
    __syncthreads();
  }
  A *out = partial + (long long)blockIdx.x * 2 * h;
  for (int j = threadIdx.x; j < h; j += BLOCK) {
    out[j] = block_acc[j];
    out[h + j] = block_acc[32 * V + j];
  }
}

template <typename T>
__device__ __forceinline__ void backward_block(const T *__restrict__ x, const T *__restrict__ r, int has_res,
                                               const T *__restrict__ w, const T *__restrict__ dy,
                                               const typename Elem<T>::acc_t *__restrict__ stats,
                                               T *__restrict__ dx, typename Elem<T>::acc_t *__restrict__ partial,
                                               long long rows, int h) {
  using A = typename Elem<T>::acc_t;
  __shared__ A scratch[32];
  // The block's partial row, summed in place: thread t alone owns columns
  // t, t + BLOCK, ... of it, so no barrier guards it.
  A *out = partial + (long long)blockIdx.x * 2 * h;
  for (int j = threadIdx.x; j < h; j += BLOCK) out[j] = out[h + j] = A(0);

  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = row * h;
    const A mean = stats[row], rstd = stats[rows + row];
    A sum_gw = A(0), sum_gw_xhat = A(0);
    for (int j = threadIdx.x; j < h; j += BLOCK) {
      const A xhat = (load_s(x, r, has_res, base + j) - mean) * rstd;
      const A g = to_acc(dy[base + j]);
      const A gw = g * to_acc(w[j]);
      sum_gw += gw;
      sum_gw_xhat += gw * xhat;
      out[j] += g * xhat;
      out[h + j] += g;
    }
    const A a = block_sum(sum_gw, scratch) / A(h);
    const A c = block_sum(sum_gw_xhat, scratch) / A(h);
    for (int j = threadIdx.x; j < h; j += BLOCK) {
      const A xhat = (load_s(x, r, has_res, base + j) - mean) * rstd;
      const A gw = to_acc(dy[base + j]) * to_acc(w[j]);
      dx[base + j] = from_acc<T>(rstd * (gw - a - xhat * c));
    }
  }
}

// out[c] = sum over p of partial[p][c], c < width: a block per 32 columns, warp
// k summing partials k, k + 8, ..., then the 8 warps' sums in order.
template <typename T>
__device__ __forceinline__ void backward_finalize(const typename Elem<T>::acc_t *__restrict__ partial,
                                                  int n_partials, int width, T *__restrict__ out) {
  using A = typename Elem<T>::acc_t;
  __shared__ A sums[FINALIZE_WARPS][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = blockIdx.x * 32 + lane;
  A s = A(0);
  if (col < width) {
#pragma unroll 4
    for (int p = warp; p < n_partials; p += FINALIZE_WARPS) s += partial[(long long)p * width + col];
  }
  sums[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && col < width) {
    A total = A(0);
#pragma unroll
    for (int k = 0; k < FINALIZE_WARPS; ++k) total += sums[k][lane];
    out[col] = from_acc<T>(total);
  }
}

}  // namespace

#define LN_FWD_PARAMS(T)                                                                                  \
  const T *x, const T *r, int has_res, const T *w, const T *b, T *y, typename Elem<T>::acc_t *stats,      \
      long long rows, int h, unsigned long long eps_bits, int store_y
#define LN_FWD_ARGS x, r, has_res, w, b, y, stats, rows, h, __longlong_as_double((long long)eps_bits), store_y

#define LN_BWD_PARAMS(T)                                                                                  \
  const T *x, const T *r, int has_res, const T *w, const T *dy, const typename Elem<T>::acc_t *stats,     \
      T *dx, typename Elem<T>::acc_t *partial, long long rows, int h
#define LN_BWD_ARGS x, r, has_res, w, dy, stats, dx, partial, rows, h

// The warp-per-row forms, one per register budget V (H <= 32 * V): the plan
// picks the smallest that fits (src/ops/layer_norm/cuda.rs, WARP_FORMS).
#define LN_WARP_KERNELS(T, S, V)                                                                          \
  extern "C" __global__ void __launch_bounds__(BLOCK) layer_norm_fwd_w##V##_##S(LN_FWD_PARAMS(T)) {       \
    forward_warp<T, V>(LN_FWD_ARGS);                                                                      \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(BLOCK) layer_norm_bwd_w##V##_##S(LN_BWD_PARAMS(T)) {       \
    backward_warp<T, V>(LN_BWD_ARGS);                                                                     \
  }

#define LAYER_NORM_KERNELS(T, S)                                                                          \
  LN_WARP_KERNELS(T, S, 1)                                                                                \
  LN_WARP_KERNELS(T, S, 4)                                                                                \
  LN_WARP_KERNELS(T, S, 8)                                                                                \
  LN_WARP_KERNELS(T, S, 12)                                                                               \
  LN_WARP_KERNELS(T, S, 16)                                                                               \
  LN_WARP_KERNELS(T, S, 24)                                                                               \
  LN_WARP_KERNELS(T, S, 32)                                                                               \
  extern "C" __global__ void __launch_bounds__(BLOCK) layer_norm_fwd_block_##S(LN_FWD_PARAMS(T)) {        \
    forward_block<T>(LN_FWD_ARGS);                                                                        \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(BLOCK) layer_norm_bwd_block_##S(LN_BWD_PARAMS(T)) {        \
    backward_block<T>(LN_BWD_ARGS);                                                                       \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(BLOCK) layer_norm_bwd_finalize_##S(                        \
      const typename Elem<T>::acc_t *partial, int n_partials, int width, T *out) {                        \
    backward_finalize<T>(partial, n_partials, width, out);                                                \
  }

FOR_EACH_FLOAT(LAYER_NORM_KERNELS)
