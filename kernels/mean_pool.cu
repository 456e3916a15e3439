// Masked mean pooling over tokens, forward and backward (src/ops/mean_pool.rs).
//
//   forward:  out[b,h] = sum_t flag[b,t] * x[b,t,h] / max(count_b, 1e-9)
//   backward: dx[b,t,h] = flag[b,t] * dout[b,h] / max(count_b, 1e-9)
//
// flag[b,t] is 1 where mask[b,t] != 0, read from the mask in its own dtype (any
// integer or float dtype of 1, 2, 4 or 8 bytes: see Mask); count_b is the number
// of real tokens of row b.
//
// Both directions are bandwidth-bound: one pass over B*T*H elements. The grid is
// (B, H chunks); a block of 8 warps owns one row b and one chunk of 32*VEC
// columns. Each lane owns VEC adjacent columns (16 bytes on the `_vec` path:
// float4 / 8 halves / 2 doubles, one element on the strided path), and the warps
// split the tokens: warp w takes tokens w, w+8, w+16, ... The block first stages
// a tile of the row's mask in shared memory, so each flag is read from global
// memory once per block and padding tokens are never loaded (forward) or are
// written as zeros without a branch on global data (backward).
//
// Strides come as arguments (in elements), so strided inputs need no copy. The
// `_vec` kernels need unit stride on H and H, every other stride and the offset
// multiples of VEC (the host checks; allocations are 256-byte aligned).
#include "common.cuh"

namespace {

constexpr int WARPS = 8;
constexpr int BLOCK = 32 * WARPS;  // must match BLOCK in src/ops/mean_pool.rs
// Mask bytes staged in shared memory per pass: rows longer than this take
// several passes (BERT rows, T <= 512, take one).
constexpr int MASK_TILE = 2048;
// Tokens each warp loads before it adds: independent 16-byte loads in flight.
constexpr int UNROLL = 4;
constexpr float MIN_COUNT = 1e-9f;  // sentence-transformers' clamp on the count

// VEC elements moved as one access (a 16-byte load/store when VEC*sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Loads VEC elements starting at p: one vector load when VEC > 1 (unit stride,
// aligned), else one element.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T *__restrict__ p) {
  return *reinterpret_cast<const Pack<T, VEC> *>(p);
}

// A mask row in its own dtype: `width` bytes per element, strides in elements.
// An element is set when any bit of `magnitude` is: all bits for integers, all
// but the sign bit for floats (so -0.0 is unset and NaN is set, as `mask != 0`).
struct MaskRow {
  const uint8_t *row;
  long long stride;
  int width;
  unsigned long long magnitude;

  __device__ __forceinline__ bool at(long long t) const {
    const uint8_t *p = row + t * stride * width;
    unsigned long long bits;
    if (width == 1) {
      bits = *p;
    } else if (width == 2) {
      bits = *reinterpret_cast<const uint16_t *>(p);
    } else if (width == 4) {
      bits = *reinterpret_cast<const uint32_t *>(p);
    } else {
      bits = *reinterpret_cast<const unsigned long long *>(p);
    }
    return (bits & magnitude) != 0;
  }
};

__device__ __forceinline__ MaskRow mask_row(const uint8_t *mask, long long msb, long long mst, int width,
                                            unsigned long long magnitude) {
  return MaskRow{mask + (long long)blockIdx.x * msb * width, mst, width, magnitude};
}

// Stages flags t0 .. t0+tile-1 of the row in `flags` (1 = real token) and returns
// how many of them this thread saw set. Callers sync before and after.
__device__ __forceinline__ int stage_flags(uint8_t *flags, const MaskRow mask, int t0, int tile) {
  int seen = 0;
  for (int i = threadIdx.x; i < tile; i += BLOCK) {
    const uint8_t on = mask.at(t0 + i);
    flags[i] = on;
    seen += on;
  }
  return seen;
}

template <typename T, int VEC>
__device__ __forceinline__ void pool_forward(const T *__restrict__ x, long long xsb, long long xst,
                                             long long xsh, const MaskRow mask, T *__restrict__ out,
                                             int n_tokens, int hidden) {
  using A = typename Elem<T>::acc_t;
  __shared__ uint8_t flags[MASK_TILE];
  __shared__ A partial[WARPS][VEC][32];  // [warp][element][lane]: conflict-free
  __shared__ int count_scratch[32];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long b = blockIdx.x;
  const int col = (blockIdx.y * 32 + lane) * VEC;
  const bool active = col < hidden;  // the whole pack is in range (H % VEC == 0)
  const T *x_col = x + b * xsb + (long long)col * xsh;

  A acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = A(0);
  int count = 0;

  for (int t0 = 0; t0 < n_tokens; t0 += MASK_TILE) {
    const int tile = min(MASK_TILE, n_tokens - t0);
    __syncthreads();  // the previous tile's flags are consumed
    count += stage_flags(flags, mask, t0, tile);
    __syncthreads();
    for (int i = warp; i < tile; i += WARPS * UNROLL) {
      Pack<T, VEC> p[UNROLL];
      bool on[UNROLL];
      // All loads first, then all adds: UNROLL loads in flight per thread.
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int ti = i + u * WARPS;
        on[u] = active && ti < tile && flags[ti];
        if (on[u]) {
          const T *src = x_col + (long long)(t0 + ti) * xst;
          if (VEC > 1) {
            p[u] = load_pack<T, VEC>(src);
          } else {
            p[u].v[0] = src[0];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (on[u]) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += to_acc(p[u].v[k]);
        }
      }
    }
  }

  // Every thread staged a share of the flags: their sum is the row's count.
  const int total = block_sum(count, count_scratch);
#pragma unroll
  for (int k = 0; k < VEC; ++k) partial[warp][k][lane] = acc[k];
  __syncthreads();
  if (warp == 0 && active) {
    const A denom = max(A(total), A(MIN_COUNT));
    Pack<T, VEC> result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      A sum = A(0);
#pragma unroll
      for (int w = 0; w < WARPS; ++w) sum += partial[w][k][lane];
      result.v[k] = from_acc<T>(sum / denom);
    }
    // out is contiguous [B,H]; on the `_vec` path H % VEC == 0 keeps this aligned.
    *reinterpret_cast<Pack<T, VEC> *>(out + b * hidden + col) = result;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void pool_backward(const T *__restrict__ grad, long long gsb,
                                              long long gsh, const MaskRow mask,
                                              T *__restrict__ grad_x, int n_tokens, int hidden) {
  using A = typename Elem<T>::acc_t;
  __shared__ uint8_t flags[MASK_TILE];
  __shared__ int count_scratch[32];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long b = blockIdx.x;
  const int col = (blockIdx.y * 32 + lane) * VEC;
  const bool active = col < hidden;

  // The count must be known before the first write: one pass over the mask row
  // (B*T bytes per H chunk: noise next to the B*T*H written).
  int seen = 0;
  for (int i = threadIdx.x; i < n_tokens; i += BLOCK) seen += mask.at(i);
  const int total = block_sum(seen, count_scratch);
  const A denom = max(A(total), A(MIN_COUNT));

  // This lane's share of the gradient, and the zeros that padding tokens get.
  Pack<T, VEC> share, zero;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const A g = active ? to_acc(grad[b * gsb + (long long)(col + k) * gsh]) : A(0);
    share.v[k] = from_acc<T>(g / denom);
    zero.v[k] = from_acc<T>(A(0));
  }

  T *dst_col = grad_x + b * n_tokens * (long long)hidden + col;
  for (int t0 = 0; t0 < n_tokens; t0 += MASK_TILE) {
    const int tile = min(MASK_TILE, n_tokens - t0);
    __syncthreads();
    stage_flags(flags, mask, t0, tile);
    __syncthreads();
    if (!active) continue;
#pragma unroll 4
    for (int ti = warp; ti < tile; ti += WARPS) {
      T *dst = dst_col + (long long)(t0 + ti) * hidden;
      const Pack<T, VEC> value = flags[ti] ? share : zero;
      if (VEC > 1) {
        *reinterpret_cast<Pack<T, VEC> *>(dst) = value;
      } else {
        dst[0] = value.v[0];
      }
    }
  }
}

}  // namespace

// Elements per 16-byte access for the `_vec` kernels.
#define VEC_OF(T) (16 / (int)sizeof(T))

#define MASK_PARAMS \
  const uint8_t *mask, long long msb, long long mst, int mask_width, unsigned long long mask_magnitude
#define MASK_ROW mask_row(mask, msb, mst, mask_width, mask_magnitude)

#define MEAN_POOL_KERNELS(T, S)                                                                    \
  extern "C" __global__ void __launch_bounds__(BLOCK) mean_pool_fwd_##S(                           \
      const T *x, long long xsb, long long xst, long long xsh, MASK_PARAMS, T *out, int n_tokens,  \
      int hidden) {                                                                                \
    pool_forward<T, 1>(x, xsb, xst, xsh, MASK_ROW, out, n_tokens, hidden);                         \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(BLOCK) mean_pool_fwd_vec_##S(                       \
      const T *x, long long xsb, long long xst, long long xsh, MASK_PARAMS, T *out, int n_tokens,  \
      int hidden) {                                                                                \
    pool_forward<T, VEC_OF(T)>(x, xsb, xst, xsh, MASK_ROW, out, n_tokens, hidden);                 \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(BLOCK) mean_pool_bwd_##S(                           \
      const T *grad, long long gsb, long long gsh, MASK_PARAMS, T *grad_x, int n_tokens,           \
      int hidden) {                                                                                \
    pool_backward<T, 1>(grad, gsb, gsh, MASK_ROW, grad_x, n_tokens, hidden);                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(BLOCK) mean_pool_bwd_vec_##S(                       \
      const T *grad, long long gsb, long long gsh, MASK_PARAMS, T *grad_x, int n_tokens,           \
      int hidden) {                                                                                \
    pool_backward<T, VEC_OF(T)>(grad, gsb, gsh, MASK_ROW, grad_x, n_tokens, hidden);               \
  }

FOR_EACH_FLOAT(MEAN_POOL_KERNELS)
