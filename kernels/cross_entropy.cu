// Fused dual-head cross-entropy (see src/ops/cross_entropy.rs for the semantics).
//
// The class counts are tiny (a handful per head), so one thread owns one row of
// BOTH heads: it reads the row's two labels and its Ca + Cb logits, and the block
// reduces (loss sum, labelled count) per head with shuffle trees. Rows are
// strided across the grid, so consecutive threads read consecutive rows: for
// contiguous logits a warp's loads of class j fall on the same few cache lines as
// its loads of class j+1, and DRAM sees every byte once.
//
// Strides and offsets are kernel arguments (element units), so strided and
// transposed inputs are read in place with no copy.
//
// Kernels, each instantiated per logits dtype and label dtype as
// `dual_ce_<stage>_<label>_<float>` (or `_<float>` for finalize):
//   dual_ce_fwd      per-block partials; a single-block grid writes the result
//   dual_ce_finalize one block: reduces the partials, writes losses and status
//   dual_ce_bwd      one pass: both heads' gradients, scaled by g[h] / n_h
//   dual_ce_empty    does nothing: the launch-overhead baseline of the benches
//
// Status record (4 x int64, left on the device): first bad label's key
// (2 * row + head, or NO_BAD_LABEL), its value, labelled rows of A, of B. The
// backward reads the counts from it, so a training step never waits for it; the
// host reads it only to report a bad label, whose losses are NaN meanwhile.
// No atomics: partials go to global memory and a second launch reduces them.

#include "cross_entropy.cuh"

// What a thread, a block, or the whole grid has seen.
template <typename S> struct Totals {
  S loss[2];
  long long count[2];
  long long bad_key, bad_value;

  __device__ __forceinline__ void reduce_block() {
    __shared__ S sums[32];
    __shared__ long long counts[32];
    for (int h = 0; h < 2; ++h) {
      loss[h] = block_sum(loss[h], sums);
      count[h] = block_sum(count[h], counts);
    }
    block_min_pair(bad_key, bad_value);
  }

  // Means (0 for a head with no labelled row; NaN for both after a bad label,
  // so that an unchecked result is never a plausible number) and the status.
  template <typename T> __device__ __forceinline__ void write(T *losses, long long *status) const {
    typedef typename Elem<T>::acc_t A;
    for (int h = 0; h < 2; ++h) {
      const A mean = count[h] > 0 ? A(loss[h] / S(count[h])) : A(0);
      losses[h] = from_acc<T>(bad_key != NO_BAD_LABEL ? quiet_nan<A>() : mean);
    }
    status[0] = bad_key;
    status[1] = bad_value;
    status[2] = count[0];
    status[3] = count[1];
  }
};

template <typename T, typename L>
__device__ __forceinline__ void dual_ce_fwd(const Head<T> a, const Head<T> b, const L *labels,
                                            size_t label_row_stride, size_t label_col_stride,
                                            size_t n, long long ignore, double *partial_loss,
                                            long long *partial_int, T *losses, long long *status) {
  typedef typename Elem<T>::acc_t A;
  Totals<A> t = {{A(0), A(0)}, {0, 0}, NO_BAD_LABEL, 0};
  const Head<T> heads[2] = {a, b};
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    for (int h = 0; h < 2; ++h) {
      const long long label = (long long)labels[i * label_row_stride + h * label_col_stride];
      const long long y = decode(label, ignore, heads[h].classes);
      if (y >= 0) {
        A m, s;
        heads[h].log_sum_exp(i, m, s);
        t.loss[h] += (m - heads[h].at(i, (size_t)y)) + log(s);  // max - x_y first: exact
        t.count[h] += 1;
      } else if (y == -2) {
        min_pair(t.bad_key, t.bad_value, 2 * (long long)i + h, label);
      }
    }
  }
  t.reduce_block();
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    t.template write<T>(losses, status);
  } else {
    partial_loss[2 * blockIdx.x] = (double)t.loss[0];
    partial_loss[2 * blockIdx.x + 1] = (double)t.loss[1];
    long long *ints = partial_int + 4 * blockIdx.x;
    ints[0] = t.count[0];
    ints[1] = t.count[1];
    ints[2] = t.bad_key;
    ints[3] = t.bad_value;
  }
}

// One block folds the forward's per-block partials (in f64: they are few).
template <typename T>
__device__ __forceinline__ void dual_ce_finalize(const double *partial_loss,
                                                 const long long *partial_int, size_t n_partials,
                                                 T *losses, long long *status) {
  Totals<double> t = {{0.0, 0.0}, {0, 0}, NO_BAD_LABEL, 0};
  for (size_t p = threadIdx.x; p < n_partials; p += blockDim.x) {
    t.loss[0] += partial_loss[2 * p];
    t.loss[1] += partial_loss[2 * p + 1];
    const long long *ints = partial_int + 4 * p;
    t.count[0] += ints[0];
    t.count[1] += ints[1];
    min_pair(t.bad_key, t.bad_value, ints[2], ints[3]);
  }
  t.reduce_block();
  if (threadIdx.x == 0) t.template write<T>(losses, status);
}

// Writes grad_a ([n, Ca], row-major) then grad_b ([n, Cb]) into `grads`.
template <typename T, typename L>
__device__ __forceinline__ void dual_ce_bwd(const Head<T> a, const Head<T> b, const L *labels,
                                            size_t label_row_stride, size_t label_col_stride,
                                            size_t n, long long ignore, const T *grad_losses,
                                            const long long *status, T *grads) {
  typedef typename Elem<T>::acc_t A;
  // The labelled-row counts from the forward's status record (still on the device).
  const long long labelled_a = status[2], labelled_b = status[3];
  const A scale_a = labelled_a > 0 ? to_acc(grad_losses[0]) / A(labelled_a) : A(0);
  const A scale_b = labelled_b > 0 ? to_acc(grad_losses[1]) / A(labelled_b) : A(0);
  T *grads_b = grads + n * a.classes;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const L *row_labels = labels + i * label_row_stride;
    const long long ya = decode((long long)row_labels[0], ignore, a.classes);
    const long long yb = decode((long long)row_labels[label_col_stride], ignore, b.classes);
    head_grad(a, i, ya, scale_a, grads + i * a.classes);
    head_grad(b, i, yb, scale_b, grads_b + i * b.classes);
  }
}

// ---- instantiation ---------------------------------------------------------

#define HEAD_PARAMS(T, x) const T *x, size_t x##_row_stride, size_t x##_col_stride, size_t x##_classes
#define HEAD_ARG(T, x) Head<T>{x, x##_row_stride, x##_col_stride, x##_classes}

#define DUAL_CE_LABEL_KERNELS(TYPE, SUFFIX, LTYPE, LSUFFIX)                                       \
  extern "C" __global__ void dual_ce_fwd_##LSUFFIX##_##SUFFIX(                                    \
      HEAD_PARAMS(TYPE, a), HEAD_PARAMS(TYPE, b), const LTYPE *labels, size_t label_row_stride,               \
      size_t label_col_stride, size_t n, long long ignore, double *partial_loss,                  \
      long long *partial_int, TYPE *losses, long long *status) {                                  \
    dual_ce_fwd<TYPE, LTYPE>(HEAD_ARG(TYPE, a), HEAD_ARG(TYPE, b), labels, label_row_stride, label_col_stride,   \
                          n, ignore, partial_loss, partial_int, losses, status);                  \
  }                                                                                               \
  extern "C" __global__ void dual_ce_bwd_##LSUFFIX##_##SUFFIX(                                    \
      HEAD_PARAMS(TYPE, a), HEAD_PARAMS(TYPE, b), const LTYPE *labels, size_t label_row_stride,               \
      size_t label_col_stride, size_t n, long long ignore, const TYPE *grad_losses,               \
      const long long *status, TYPE *grads) {                                                     \
    dual_ce_bwd<TYPE, LTYPE>(HEAD_ARG(TYPE, a), HEAD_ARG(TYPE, b), labels, label_row_stride, label_col_stride,   \
                          n, ignore, grad_losses, status, grads);                                 \
  }

#define DUAL_CE_KERNELS(TYPE, SUFFIX)                                                             \
  DUAL_CE_LABEL_KERNELS(TYPE, SUFFIX, int64_t, i64)                                               \
  DUAL_CE_LABEL_KERNELS(TYPE, SUFFIX, int32_t, i32)                                               \
  DUAL_CE_LABEL_KERNELS(TYPE, SUFFIX, int16_t, i16)                                               \
  DUAL_CE_LABEL_KERNELS(TYPE, SUFFIX, uint32_t, u32)                                              \
  DUAL_CE_LABEL_KERNELS(TYPE, SUFFIX, uint8_t, u8)                                                \
  extern "C" __global__ void dual_ce_finalize_##SUFFIX(const double *partial_loss,                \
                                                       const long long *partial_int,              \
                                                       size_t n_partials, TYPE *losses,           \
                                                       long long *status) {                       \
    dual_ce_finalize<TYPE>(partial_loss, partial_int, n_partials, losses, status);                \
  }

FOR_EACH_FLOAT(DUAL_CE_KERNELS)

extern "C" __global__ void dual_ce_empty() {}
