// Fused multi-head self-attention on packed sentences, forward and backward
// (src/ops/attention/cuda.rs), flash-attention style: the T×T attention
// weights are never stored; each block streams key/value tiles through shared
// memory and keeps a running max and sum per query row (online softmax).
//
// Input: qkv [N, 3H] (row stride `rs`, unit column stride), the sentences'
// tokens one after the other; `offsets` [2S+1] (i64): the S+1 prefix sums of
// their lengths, then each sentence's key count K_s. Head h of token i: q at
// column h*D, k at H + h*D, v at 2H + h*D. Every token attends to the first
// K_s tokens of its own sentence (K_s = its length when packed; the real
// tokens of a right-padded row, whose padding keys then get weight 0 and
// dK = dV = 0), with weights softmax(q·kᵀ/√D) (f32 for f32/f16/bf16, f64 for
// f64), then dropout.
//
//   forward:  out [N, H] (contiguous), lse [heads, N] (log Σ exp of each row's
//             scaled scores, in the accumulation type) for the backward.
//   backward: dd [heads, N] = rowsum(dO ∘ O) (bwd_dot), then
//             dK, dV: one block per (key tile, head, sentence), looping over the
//                     sentence's query tiles (bwd_dkdv);
//             dQ:     one block per (query tile, head, sentence), looping over
//                     the key tiles (bwd_dq);
//             P is recomputed from q, k and lse. Every output element is written
//             by exactly one thread: no atomics, deterministic.
//
// Dropout on the weights is drawn here, not read: a counter-based generator
// (splitmix64's finaliser) of (seed, head, query row, key row) drops a weight
// when its 32-bit draw is below `threshold` and scales the rest by `scale`
// (f32 bits); the backward redraws the same multipliers. threshold = 0 means
// no dropout. `dropout_multiplier` in src/ops/attention.rs is the same function.
//
// Grid: x = sentence, y = tile of rows within it (blocks past the sentence's
// end return at once), z = head. Block: 4 warps. Within a tile loop, the lane
// is the key (forward, dQ) or the query (dK/dV) of a 32-wide tile, and each warp
// owns R rows of the block's tile; products over the head dimension read one
// operand per lane from a padded shared row (conflict-free) and broadcast the
// other. D is a template (32, 64, 128): each lane owns D/32 output columns.
#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int BLOCK = 32 * WARPS;  // must match BLOCK in src/ops/attention/cuda.rs
constexpr int TILE = 32;           // keys (forward, dQ) or queries (dK/dV) per inner tile

// Rows per warp, sized so that each kernel's static shared memory stays under
// 48 KiB; must match fwd_rows / bwd_rows in src/ops/attention/cuda.rs.
template <typename A, int D> struct Rows {
  static constexpr int fwd = sizeof(A) == 4 ? (D == 128 ? 4 : 8) : (D == 64 ? 4 : 8);
  static constexpr int bwd = sizeof(A) == 4 ? (D == 128 ? 2 : 8) : (D == 64 ? 2 : 4);
};

// A score that takes no weight: exp of it minus any real row maximum is 0.
template <typename A> __device__ __forceinline__ A no_score() { return A(-1e30); }

constexpr unsigned long long GOLDEN = 0x9E3779B97F4A7C15ull;

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The dropout multipliers of one head.
struct Dropout {
  unsigned long long head_key;
  unsigned int threshold;  // 0: no dropout
  float scale;

  __device__ __forceinline__ Dropout(unsigned long long seed, unsigned long long thr, int scale_bits, int head)
      : head_key(mix64(seed + (unsigned long long)(head + 1) * GOLDEN)),
        threshold((unsigned int)thr),
        scale(__int_as_float(scale_bits)) {}

  // The multiplier of the weight of (global) query row i on key row j.
  template <typename A> __device__ __forceinline__ A at(long long i, long long j) const {
    if (threshold == 0u) return A(1);
    const unsigned long long counter = ((unsigned long long)i << 32) | (unsigned long long)(unsigned int)j;
    const unsigned int draw = (unsigned int)(mix64(head_key + counter * GOLDEN) >> 32);
    return draw < threshold ? A(0) : A(scale);
  }
};

// The key count of this block's sentence (x = sentence; S = gridDim.x).
__device__ __forceinline__ int key_count(const long long *__restrict__ offsets) {
  return (int)offsets[gridDim.x + 1 + blockIdx.x];
}

// Rows r0 .. r0+ROWS-1 of a head slice (row stride rs, D wide) into shared
// `dst` (row stride LD), times `mul`; rows at or past `len` are zeros.
template <typename T, typename A, int D, int ROWS, int LD>
__device__ __forceinline__ void stage_rows(A *dst, const T *__restrict__ src, long long rs, int r0, int len, A mul) {
  for (int e = threadIdx.x; e < ROWS * D; e += BLOCK) {
    const int r = e / D, c = e % D;
    dst[r * LD + c] = (r0 + r < len) ? to_acc(src[(long long)(r0 + r) * rs + c]) * mul : A(0);
  }
}

template <typename T, int D>
__device__ __forceinline__ void attention_forward(const T *__restrict__ qkv, long long rs,
                                                  const long long *__restrict__ offsets, T *__restrict__ out,
                                                  typename Elem<T>::acc_t *__restrict__ lse, int n_rows,
                                                  const Dropout drop) {
  using A = typename Elem<T>::acc_t;
  constexpr int R = Rows<A, D>::fwd;
  constexpr int BQ = WARPS * R;
  constexpr int C = D / 32;
  __shared__ A q_s[BQ][D];
  __shared__ A k_s[TILE][D + 1];
  __shared__ A v_s[TILE][D];
  __shared__ A p_s[WARPS][R][TILE];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long start = offsets[blockIdx.x];
  const int len = (int)(offsets[blockIdx.x + 1] - start);
  const int keys = key_count(offsets);
  const int q0 = blockIdx.y * BQ;
  if (q0 >= len) return;
  const int h = blockIdx.z;
  const int hidden = gridDim.z * D;
  const T *q_base = qkv + start * rs + h * D;
  const T *k_base = q_base + hidden;
  const T *v_base = q_base + 2 * hidden;
  const A scale = A(1) / sqrt(A(D));

  stage_rows<T, A, D, BQ, D>(&q_s[0][0], q_base, rs, q0, len, scale);

  A m[R], l[R], acc[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = no_score<A>();
    l[r] = A(0);
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = A(0);
  }

  for (int k0 = 0; k0 < keys; k0 += TILE) {
    __syncthreads();  // the previous tile is consumed
    stage_rows<T, A, D, TILE, D + 1>(&k_s[0][0], k_base, rs, k0, keys, A(1));
    stage_rows<T, A, D, TILE, D>(&v_s[0][0], v_base, rs, k0, keys, A(1));
    __syncthreads();
    const int key = k0 + lane;
    A s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = A(0);
#pragma unroll 8
    for (int c = 0; c < D; ++c) {
      const A kv = k_s[lane][c];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] += q_s[warp * R + r][c] * kv;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const A sr = key < keys ? s[r] : no_score<A>();
      const A m_new = max(m[r], warp_max(sr));
      const A p = exp(sr - m_new);
      const A correction = exp(m[r] - m_new);
      l[r] = l[r] * correction + p;  // this lane's share of the row sum
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] *= correction;
      m[r] = m_new;
      const int qi = q0 + warp * R + r;
      p_s[warp][r][lane] = key < keys ? p * drop.at<A>(start + qi, start + key) : A(0);
    }
    __syncwarp();
#pragma unroll 4
    for (int j = 0; j < TILE; ++j) {
      A vv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) vv[c] = v_s[j][lane + 32 * c];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const A pj = p_s[warp][r][j];
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] += pj * vv[c];
      }
    }
  }

  const int hidden_out = hidden;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const A total = warp_sum(l[r]);
    const int qi = q0 + warp * R + r;
    if (qi < len) {
      const A inv = A(1) / total;
      T *o = out + (start + qi) * hidden_out + h * D;
#pragma unroll
      for (int c = 0; c < C; ++c) o[lane + 32 * c] = from_acc<T>(acc[r][c] * inv);
      if (lane == 0) lse[(long long)h * n_rows + start + qi] = m[r] + log(total);
    }
  }
}

// dd[h, i] = Σ_c dO[i, h*D + c]·O[i, h*D + c]: one warp per (row, head).
template <typename T>
__device__ __forceinline__ void attention_bwd_dot(const T *__restrict__ out, const T *__restrict__ dout,
                                                  typename Elem<T>::acc_t *__restrict__ dd, int n_rows, int heads,
                                                  int head_dim) {
  using A = typename Elem<T>::acc_t;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long pair = (long long)blockIdx.x * WARPS + warp;
  if (pair >= (long long)n_rows * heads) return;
  const long long i = pair / heads;
  const int h = (int)(pair % heads);
  const long long at = i * heads * head_dim + (long long)h * head_dim;
  A sum = A(0);
  for (int c = lane; c < head_dim; c += 32) sum += to_acc(dout[at + c]) * to_acc(out[at + c]);
  sum = warp_sum(sum);
  if (lane == 0) dd[(long long)h * n_rows + i] = sum;
}

// dK and dV of one tile of WARPS*R keys of one head of one sentence.
template <typename T, int D>
__device__ __forceinline__ void attention_bwd_dkdv(const T *__restrict__ qkv, long long rs,
                                                   const long long *__restrict__ offsets, const T *__restrict__ dout,
                                                   const typename Elem<T>::acc_t *__restrict__ lse,
                                                   const typename Elem<T>::acc_t *__restrict__ dd,
                                                   T *__restrict__ dqkv, int n_rows, const Dropout drop) {
  using A = typename Elem<T>::acc_t;
  constexpr int R = Rows<A, D>::bwd;
  constexpr int BK = WARPS * R;
  constexpr int C = D / 32;
  __shared__ A q_s[TILE][D + 1];
  __shared__ A do_s[TILE][D + 1];
  __shared__ A k_s[BK][D];
  __shared__ A v_s[BK][D];
  __shared__ A pm_s[WARPS][R][TILE];
  __shared__ A ds_s[WARPS][R][TILE];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long start = offsets[blockIdx.x];
  const int len = (int)(offsets[blockIdx.x + 1] - start);
  const int keys = key_count(offsets);
  const int k0 = blockIdx.y * BK;
  if (k0 >= len) return;
  const int h = blockIdx.z;
  const int hidden = gridDim.z * D;
  const T *q_base = qkv + start * rs + h * D;
  const T *do_base = dout + start * hidden + h * D;
  const A scale = A(1) / sqrt(A(D));

  stage_rows<T, A, D, BK, D>(&k_s[0][0], q_base + hidden, rs, k0, len, A(1));
  stage_rows<T, A, D, BK, D>(&v_s[0][0], q_base + 2 * hidden, rs, k0, len, A(1));

  A dk[R][C], dv[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) dk[r][c] = dv[r][c] = A(0);

  // A tile of masked keys only (k0 >= keys) takes no weight: dK = dV = 0.
  for (int i0 = 0; k0 < keys && i0 < len; i0 += TILE) {
    __syncthreads();
    stage_rows<T, A, D, TILE, D + 1>(&q_s[0][0], q_base, rs, i0, len, scale);
    stage_rows<T, A, D, TILE, D + 1>(&do_s[0][0], do_base, hidden, i0, len, A(1));
    __syncthreads();
    const int qi = i0 + lane;
    const bool q_in = qi < len;
    const A row_lse = q_in ? lse[(long long)h * n_rows + start + qi] : A(0);
    const A row_dd = q_in ? dd[(long long)h * n_rows + start + qi] : A(0);
    A s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = dp[r] = A(0);
#pragma unroll 8
    for (int c = 0; c < D; ++c) {
      const A qv = q_s[lane][c], dov = do_s[lane][c];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] += qv * k_s[warp * R + r][c];
        dp[r] += dov * v_s[warp * R + r][c];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int key = k0 + warp * R + r;
      const bool valid = q_in && key < keys;
      const A p = valid ? exp(s[r] - row_lse) : A(0);
      const A mult = valid ? drop.at<A>(start + qi, start + key) : A(0);
      pm_s[warp][r][lane] = p * mult;
      ds_s[warp][r][lane] = p * (dp[r] * mult - row_dd);
    }
    __syncwarp();
#pragma unroll 4
    for (int q = 0; q < TILE; ++q) {
      A dov[C], qv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        dov[c] = do_s[q][lane + 32 * c];
        qv[c] = q_s[q][lane + 32 * c];
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const A pm = pm_s[warp][r][q], ds = ds_s[warp][r][q];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          dv[r][c] += pm * dov[c];
          dk[r][c] += ds * qv[c];
        }
      }
    }
  }

  const long long width = 3LL * hidden;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int key = k0 + warp * R + r;
    if (key < len) {
      T *row = dqkv + (start + key) * width + h * D;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        row[hidden + lane + 32 * c] = from_acc<T>(dk[r][c]);
        row[2 * hidden + lane + 32 * c] = from_acc<T>(dv[r][c]);
      }
    }
  }
}

// dQ of one tile of WARPS*R queries of one head of one sentence.
template <typename T, int D>
__device__ __forceinline__ void attention_bwd_dq(const T *__restrict__ qkv, long long rs,
                                                 const long long *__restrict__ offsets, const T *__restrict__ dout,
                                                 const typename Elem<T>::acc_t *__restrict__ lse,
                                                 const typename Elem<T>::acc_t *__restrict__ dd,
                                                 T *__restrict__ dqkv, int n_rows, const Dropout drop) {
  using A = typename Elem<T>::acc_t;
  constexpr int R = Rows<A, D>::bwd;
  constexpr int BQ = WARPS * R;
  constexpr int C = D / 32;
  __shared__ A q_s[BQ][D];
  __shared__ A do_s[BQ][D];
  __shared__ A k_s[TILE][D + 1];
  __shared__ A v_s[TILE][D + 1];
  __shared__ A ds_s[WARPS][R][TILE];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long start = offsets[blockIdx.x];
  const int len = (int)(offsets[blockIdx.x + 1] - start);
  const int keys = key_count(offsets);
  const int q0 = blockIdx.y * BQ;
  if (q0 >= len) return;
  const int h = blockIdx.z;
  const int hidden = gridDim.z * D;
  const T *q_base = qkv + start * rs + h * D;
  const T *do_base = dout + start * hidden + h * D;
  const A scale = A(1) / sqrt(A(D));

  stage_rows<T, A, D, BQ, D>(&q_s[0][0], q_base, rs, q0, len, scale);
  stage_rows<T, A, D, BQ, D>(&do_s[0][0], do_base, hidden, q0, len, A(1));

  A row_lse[R], row_dd[R], dq[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int qi = q0 + warp * R + r;
    row_lse[r] = qi < len ? lse[(long long)h * n_rows + start + qi] : A(0);
    row_dd[r] = qi < len ? dd[(long long)h * n_rows + start + qi] : A(0);
#pragma unroll
    for (int c = 0; c < C; ++c) dq[r][c] = A(0);
  }

  for (int k0 = 0; k0 < keys; k0 += TILE) {
    __syncthreads();
    stage_rows<T, A, D, TILE, D + 1>(&k_s[0][0], q_base + hidden, rs, k0, keys, A(1));
    stage_rows<T, A, D, TILE, D + 1>(&v_s[0][0], q_base + 2 * hidden, rs, k0, keys, A(1));
    __syncthreads();
    const int key = k0 + lane;
    A s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = dp[r] = A(0);
#pragma unroll 8
    for (int c = 0; c < D; ++c) {
      const A kv = k_s[lane][c], vv = v_s[lane][c];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] += q_s[warp * R + r][c] * kv;
        dp[r] += do_s[warp * R + r][c] * vv;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int qi = q0 + warp * R + r;
      const bool valid = qi < len && key < keys;
      const A p = valid ? exp(s[r] - row_lse[r]) : A(0);
      const A mult = valid ? drop.at<A>(start + qi, start + key) : A(0);
      ds_s[warp][r][lane] = p * (dp[r] * mult - row_dd[r]);
    }
    __syncwarp();
#pragma unroll 4
    for (int j = 0; j < TILE; ++j) {
      A kv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) kv[c] = k_s[j][lane + 32 * c];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const A ds = ds_s[warp][r][j];
#pragma unroll
        for (int c = 0; c < C; ++c) dq[r][c] += ds * kv[c];
      }
    }
  }

  const long long width = 3LL * hidden;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int qi = q0 + warp * R + r;
    if (qi < len) {
      T *row = dqkv + (start + qi) * width + h * D;
#pragma unroll
      for (int c = 0; c < C; ++c) row[lane + 32 * c] = from_acc<T>(dq[r][c] * scale);
    }
  }
}

}  // namespace

#define DROPOUT_PARAMS unsigned long long seed, unsigned long long threshold, int scale_bits
#define DROPOUT Dropout(seed, threshold, scale_bits, blockIdx.z)

#define ATTENTION_KERNELS(T, S, D)                                                                        \
  extern "C" __global__ void __launch_bounds__(BLOCK)                                                     \
      attention_fwd_d##D##_##S(const T *qkv, long long rs, const long long *offsets, T *out,               \
                               Elem<T>::acc_t *lse, int n_rows, DROPOUT_PARAMS) {                         \
    attention_forward<T, D>(qkv, rs, offsets, out, lse, n_rows, DROPOUT);                                 \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(BLOCK) attention_bwd_dkdv_d##D##_##S(                      \
      const T *qkv, long long rs, const long long *offsets, const T *dout, const Elem<T>::acc_t *lse,     \
      const Elem<T>::acc_t *dd, T *dqkv, int n_rows, DROPOUT_PARAMS) {                                     \
    attention_bwd_dkdv<T, D>(qkv, rs, offsets, dout, lse, dd, dqkv, n_rows, DROPOUT);                     \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(BLOCK) attention_bwd_dq_d##D##_##S(                        \
      const T *qkv, long long rs, const long long *offsets, const T *dout, const Elem<T>::acc_t *lse,     \
      const Elem<T>::acc_t *dd, T *dqkv, int n_rows, DROPOUT_PARAMS) {                                     \
    attention_bwd_dq<T, D>(qkv, rs, offsets, dout, lse, dd, dqkv, n_rows, DROPOUT);                       \
  }

#define ATTENTION_DOT_KERNEL(T, S)                                                                        \
  extern "C" __global__ void __launch_bounds__(BLOCK) attention_bwd_dot_##S(                               \
      const T *out, const T *dout, Elem<T>::acc_t *dd, int n_rows, int heads, int head_dim) {             \
    attention_bwd_dot<T>(out, dout, dd, n_rows, heads, head_dim);                                         \
  }

FOR_EACH_FLOAT(ATTENTION_DOT_KERNEL)

// Head dims 32, 64, 128; f64 has no D = 128 (its tiles would not fit in 48 KiB).
#define ATTENTION_HEAD_DIMS(T, S) \
  ATTENTION_KERNELS(T, S, 32)     \
  ATTENTION_KERNELS(T, S, 64)     \
  ATTENTION_KERNELS(T, S, 128)

ATTENTION_HEAD_DIMS(float, f32)
ATTENTION_HEAD_DIMS(__half, f16)
ATTENTION_HEAD_DIMS(__nv_bfloat16, bf16)
ATTENTION_KERNELS(double, f64, 32)
ATTENTION_KERNELS(double, f64, 64)
