// Helpers shared by the cross-entropy kernels (kernels/cross_entropy.cu, the
// dual-head op, and kernels/multi_head_cross_entropy.cu, the N-head op): one
// head's strided logits with a stable log-sum-exp, decoding a label against its
// head, the gradient row softmax - onehot, and the "first bad label" reduction
// (the smallest (key, value) pair over a thread, a block or the grid, the key
// ordering bad labels by row).
#pragma once

#include "common.cuh"

#define NO_BAD_LABEL 0x7fffffffffffffffLL

// One head's inputs: the logits (already offset), their strides and class count.
template <typename T> struct Head {
  const T *logits;
  size_t row_stride, col_stride, classes;

  __device__ __forceinline__ typename Elem<T>::acc_t at(size_t i, size_t j) const {
    return to_acc(logits[i * row_stride + j * col_stride]);
  }

  // logsumexp(row i) split as (max, sum exp(x - max)), for a stable log-sum-exp.
  __device__ __forceinline__ void log_sum_exp(size_t i, typename Elem<T>::acc_t &max_out,
                                              typename Elem<T>::acc_t &sum_out) const {
    typedef typename Elem<T>::acc_t A;
    A m = at(i, 0);
    for (size_t j = 1; j < classes; ++j) m = max(m, at(i, j));
    A s = A(0);
    for (size_t j = 0; j < classes; ++j) s += exp(at(i, j) - m);
    max_out = m;
    sum_out = s;
  }
};

// The row's class for a head: -1 when ignored, -2 when out of range.
__device__ __forceinline__ long long decode(long long label, long long ignore, size_t classes) {
  if (label == ignore) return -1;
  return (label >= 0 && (unsigned long long)label < classes) ? label : -2;
}

// Keeps the (key, value) pair with the smaller key: the first bad label by row.
__device__ __forceinline__ void min_pair(long long &key, long long &value, long long other_key,
                                         long long other_value) {
  if (other_key < key) {
    key = other_key;
    value = other_value;
  }
}

__device__ __forceinline__ void warp_min_pair(long long &key, long long &value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const long long k = __shfl_xor_sync(0xffffffffu, key, offset);
    const long long v = __shfl_xor_sync(0xffffffffu, value, offset);
    min_pair(key, value, k, v);
  }
}

// Block-wide min_pair; every thread gets the result (like block_sum).
__device__ __forceinline__ void block_min_pair(long long &key, long long &value) {
  __shared__ long long keys[32], values[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_min_pair(key, value);
  __syncthreads();
  if (lane == 0) {
    keys[warp] = key;
    values[warp] = value;
  }
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  key = lane < n_warps ? keys[lane] : NO_BAD_LABEL;
  value = lane < n_warps ? values[lane] : 0;
  warp_min_pair(key, value);
}

// The target's weight on class j of a row labelled y: 1 - eps + eps/C on the
// label, eps/C elsewhere (exactly 1 and 0 when eps is 0).
__device__ __forceinline__ double smoothed_target(double eps, size_t classes, long long y,
                                                  size_t j) {
  const double off = eps / (double)classes;
  return (long long)j == y ? 1.0 - eps + off : off;
}

// grad[i, :] = (softmax(row i) - target) * scale, the target one-hot or, with
// label smoothing eps, smoothed; 0 for an ignored row.
template <typename T>
__device__ __forceinline__ void head_grad(const Head<T> &head, size_t i, long long y,
                                          typename Elem<T>::acc_t scale, T *out,
                                          double smoothing = 0.0) {
  typedef typename Elem<T>::acc_t A;
  if (y < 0) {  // ignored (out of range cannot reach here: the forward rejects it)
    for (size_t j = 0; j < head.classes; ++j) out[j] = from_acc<T>(A(0));
    return;
  }
  A m, s;
  head.log_sum_exp(i, m, s);
  const A per_exp = scale / s;
  for (size_t j = 0; j < head.classes; ++j) {
    const A p = exp(head.at(i, j) - m) * per_exp;
    out[j] = from_acc<T>(p - scale * A(smoothed_target(smoothing, head.classes, y, j)));
  }
}
