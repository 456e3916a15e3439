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

// ---- top-k search ----------------------------------------------------------
// cosine_top_k (src/ops/cosine/mod.rs): the k corpus rows most similar to each
// query, best first, ties to the lower index, without an [Q, M] score matrix.
//
// Pass 1, cosine_topk_partial: a block per (query, corpus slice). Each tile of
// 256 corpus rows is scored (a warp per row, the query row re-read from L1),
// and when some score beats the block's current k-th best, the list and the
// tile are bitonic-sorted together in shared memory, keeping the best in front.
// Each block writes its slice's k best to scratch [Q, slices, k].
// Pass 2, cosine_topk_merge: a block per query merges its slices' lists the
// same way and writes [Q, k, 2] doubles (score, index), exact for both.

#define TOPK_TILE 256

// Candidate order: the higher score, then the lower index (NaN scores were
// made -inf, so the order is total).
template <typename A>
__device__ __forceinline__ bool topk_better(A sa, unsigned ia, A sb, unsigned ib) {
  return sa > sb || (sa == sb && ia < ib);
}

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(0xfff0000000000000LL);
}

// Sorts the p (a power of two) candidates in shared memory best first.
template <typename A> __device__ void topk_sort(A *score, unsigned *index, int p) {
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < p / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;
        // Runs with (i & size) == 0 go best first, the others worst first, so
        // that each pass merges bitonic runs; the last pass (size == p) is all
        // best first.
        const bool best_first = (i & size) == 0;
        const bool j_better = topk_better(score[j], index[j], score[i], index[i]);
        if (j_better == best_first) {
          const A s = score[i];
          score[i] = score[j];
          score[j] = s;
          const unsigned x = index[i];
          index[i] = index[j];
          index[j] = x;
        }
      }
      __syncthreads();
    }
  }
}

// The shared candidate buffer: [0, kp) the list so far (best first), [kp, kp +
// TOPK_TILE) the tile being merged, the rest padding; p a power of two.
template <typename A> struct TopkBuffer {
  A *score;
  unsigned *index;
  int k, kp, p;

  __device__ void init(unsigned char *smem, int k_, int kp_, int p_) {
    k = k_;
    kp = kp_;
    p = p_;
    score = reinterpret_cast<A *>(smem);
    index = reinterpret_cast<unsigned *>(smem + sizeof(A) * p);
    for (int i = threadIdx.x; i < p; i += blockDim.x) {
      score[i] = neg_inf<A>();
      index[i] = 0xffffffffu;
    }
    __syncthreads();
  }

  // Merges the tile written to [kp, kp + TOPK_TILE) into the list, if any of
  // it beats the k-th best; leaves the tile slots empty again.
  __device__ void merge_tile(int *count_scratch) {
    const A kth_score = score[k - 1];
    const unsigned kth_index = index[k - 1];
    int better = 0;
    for (int t = threadIdx.x; t < TOPK_TILE; t += blockDim.x)
      better += topk_better(score[kp + t], index[kp + t], kth_score, kth_index) ? 1 : 0;
    if (block_sum(better, count_scratch) > 0) topk_sort(score, index, p);
    for (int i = kp + threadIdx.x; i < p; i += blockDim.x) {
      score[i] = neg_inf<A>();
      index[i] = 0xffffffffu;
    }
    __syncthreads();
  }
};

// One block per (query blockIdx.x, slice blockIdx.y of rows_per_slice corpus rows).
template <typename T>
__device__ __forceinline__ void cosine_topk_partial(const T *q, long long q_stride, const T *c,
                                                    long long c_stride, typename Elem<T>::acc_t *part_score,
                                                    unsigned *part_index, int m, int h, int k, int kp, int p,
                                                    int rows_per_slice) {
  typedef typename Elem<T>::acc_t A;
  SMTL_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int count_scratch[32];
  TopkBuffer<A> buf;
  buf.init(smem, k, kp, p);

  const long long query = blockIdx.x;
  q += query * q_stride;
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // Every warp needs the query's norm: each computes it (one pass, from L1).
  const bool q_vec = aligned16(q);
  A qq = 0;
  visit(q, h, q_vec, [&](A u) { qq += u * u; });
  const A inv_q = A(1) / clamped_norm(warp_sum(qq));

  const long long begin = (long long)blockIdx.y * rows_per_slice;
  const long long end = min((long long)m, begin + rows_per_slice);
  for (long long tile = begin; tile < end; tile += TOPK_TILE) {
    for (int t = warp; t < TOPK_TILE; t += warps) {
      const long long row = tile + t;
      if (row >= end) continue;  // the slot stays empty; uniform per warp
      const T *cr = c + row * c_stride;
      const bool vec = q_vec && aligned16(cr);
      A qc = 0, cc = 0;
      visit2(q, cr, h, vec, [&](A u, A v) {
        qc += u * v;
        cc += v * v;
      });
      qc = warp_sum(qc);
      cc = warp_sum(cc);
      if (lane_id() == 0) {
        const A s = qc * inv_q * (A(1) / clamped_norm(cc));
        buf.score[kp + t] = s == s ? s : neg_inf<A>();
        buf.index[kp + t] = (unsigned)row;
      }
    }
    __syncthreads();
    buf.merge_tile(count_scratch);
  }
  const long long out = (query * gridDim.y + blockIdx.y) * k;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    part_score[out + i] = buf.score[i];
    part_index[out + i] = buf.index[i];
  }
}

// One block per query: the best k of its slices' lists.
template <typename A>
__device__ __forceinline__ void cosine_topk_merge(const A *part_score, const unsigned *part_index, double *out,
                                                  int slices, int k, int kp, int p) {
  SMTL_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int count_scratch[32];
  TopkBuffer<A> buf;
  buf.init(smem, k, kp, p);
  const long long query = blockIdx.x;
  const long long total = (long long)slices * k;
  part_score += query * total;
  part_index += query * total;
  for (long long tile = 0; tile < total; tile += TOPK_TILE) {
    for (int t = threadIdx.x; t < TOPK_TILE; t += blockDim.x) {
      if (tile + t < total) {
        buf.score[kp + t] = part_score[tile + t];
        buf.index[kp + t] = part_index[tile + t];
      }
    }
    __syncthreads();
    buf.merge_tile(count_scratch);
  }
  out += query * k * 2;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    out[2 * i] = (double)buf.score[i];
    out[2 * i + 1] = (double)buf.index[i];
  }
}

#define TOPK_PARTIAL_KERNEL(T, S)                                                                              \
  extern "C" __global__ void __launch_bounds__(256) cosine_topk_partial_##S(                                   \
      const T *q, long long q_stride, const T *c, long long c_stride, Elem<T>::acc_t *part_score,              \
      unsigned *part_index, int m, int h, int k, int kp, int p, int rows_per_slice) {                          \
    cosine_topk_partial<T>(q, q_stride, c, c_stride, part_score, part_index, m, h, k, kp, p, rows_per_slice);  \
  }

FOR_EACH_FLOAT(TOPK_PARTIAL_KERNEL)

#define TOPK_MERGE_KERNEL(A, S)                                                                                \
  extern "C" __global__ void __launch_bounds__(256) cosine_topk_merge_##S(                                     \
      const A *part_score, const unsigned *part_index, double *out, int slices, int k, int kp, int p) {        \
    cosine_topk_merge<A>(part_score, part_index, out, slices, k, kp, p);                                       \
  }

TOPK_MERGE_KERNEL(float, f32)
TOPK_MERGE_KERNEL(double, f64)
