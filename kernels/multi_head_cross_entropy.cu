// Fused N-head cross-entropy (see src/ops/multi_head_cross_entropy/ for the
// semantics): any number of classification heads side by side in one logits
// tensor [N, ΣC], labels [N, H], one launch for all heads (plus a finalize
// launch when the forward needs more than one block).
//
// The heads' settings come in a small table on the device (int64 words, built
// by the launch plan from the op's `CeHead`s):
//   word 6h + 0: the head's first column     word 6h + 3: its weight w_h (f64 bits)
//   word 6h + 1: its class count             word 6h + 4: where its class weights
//   word 6h + 2: its ignore index                         start in the table, or -1
//   word 6h + 5: its label smoothing eps (f64 bits)
// followed by the class weights (f64 bits).
//
// As in the dual-head kernels one thread owns one row (class counts are a
// handful): for each head in turn the grid strides over the rows, and the block
// reduces (weighted loss sum, weight sum) with shuffle trees. Heads are
// visited one after the other so that a thread's state stays a few registers
// whatever the number of heads.
//
// Kernels, per logits dtype and label dtype (`mhce_<stage>_<label>_<float>`,
// or `_<float>` for finalize):
//   mhce_fwd       per-block partials; a single-block grid writes the results
//   mhce_finalize  one block: reduces the partials, writes the results
//   mhce_bwd       every head's gradient, scaled by (g_h + w_h g_total) / W_h
//
// Results, left on the device: losses [H + 1] (each head's weighted mean,
// then Σ w_h loss_h; all NaN after a bad label), weight_sums [H] (f64: W_h,
// the backward's denominators, so a training step never waits for them) and
// status [2] (the first bad label's key row·H + head, or NO_BAD_LABEL, and its
// value). No atomics: partials go to global memory, a second launch reduces them.

#include "cross_entropy.cuh"

// Words per head in the settings table.
#define MHCE_HEAD_WORDS 6

// One head's settings, read from the table.
struct HeadSpec {
  size_t column, classes;
  long long ignore;
  double weight, smoothing;
  const long long *class_weights;  // f64 bits, or null for all 1

  __device__ __forceinline__ static HeadSpec read(const long long *table, int h) {
    const long long *w = table + MHCE_HEAD_WORDS * h;
    HeadSpec s;
    s.column = (size_t)w[0];
    s.classes = (size_t)w[1];
    s.ignore = w[2];
    s.weight = __longlong_as_double(w[3]);
    s.class_weights = w[4] >= 0 ? table + w[4] : nullptr;
    s.smoothing = __longlong_as_double(w[5]);
    return s;
  }

  __device__ __forceinline__ double class_weight(long long y) const {
    return class_weights ? __longlong_as_double(class_weights[y]) : 1.0;
  }

  template <typename T>
  __device__ __forceinline__ Head<T> logits(const T *base, size_t row_stride,
                                            size_t col_stride) const {
    return Head<T>{base + column * col_stride, row_stride, col_stride, classes};
  }
};

// The results from each head's (loss sum, weight sum) pair, sums[2h] and
// sums[2h + 1], in f64: every head's mean (0 where its weight sum is 0), the
// weighted total, NaN for all after a bad label; and the status record.
// Called by one thread.
template <typename T>
__device__ __forceinline__ void mhce_write(const long long *table, int heads, const double *sums,
                                           long long bad_key, long long bad_value, T *losses,
                                           double *weight_sums, long long *status) {
  typedef typename Elem<T>::acc_t A;
  const bool bad = bad_key != NO_BAD_LABEL;
  double total = 0.0;
  for (int h = 0; h < heads; ++h) {
    const double loss = sums[2 * h], weight = sums[2 * h + 1];
    const double mean = weight > 0.0 ? loss / weight : 0.0;
    total += HeadSpec::read(table, h).weight * mean;
    losses[h] = from_acc<T>(bad ? quiet_nan<A>() : A(mean));
    weight_sums[h] = weight;
  }
  losses[heads] = from_acc<T>(bad ? quiet_nan<A>() : A(total));
  status[0] = bad_key;
  status[1] = bad_value;
}

// partial_sums: [grid][H][2] (loss, weight) in f64; partial_bad: [grid][2].
template <typename T, typename L>
__device__ __forceinline__ void mhce_fwd(const T *logits, size_t row_stride, size_t col_stride,
                                         const L *labels, size_t label_row_stride,
                                         size_t label_col_stride, size_t n,
                                         const long long *table, int heads,
                                         double *partial_sums, long long *partial_bad, T *losses,
                                         double *weight_sums, long long *status) {
  typedef typename Elem<T>::acc_t A;
  __shared__ A scratch[32];
  long long bad_key = NO_BAD_LABEL, bad_value = 0;
  for (int h = 0; h < heads; ++h) {
    const HeadSpec spec = HeadSpec::read(table, h);
    const Head<T> head = spec.logits(logits, row_stride, col_stride);
    A loss = A(0), weight = A(0);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
      const long long label = (long long)labels[i * label_row_stride + h * label_col_stride];
      const long long y = decode(label, spec.ignore, spec.classes);
      if (y >= 0) {
        A m, s;
        head.log_sum_exp(i, m, s);
        const A cw = A(spec.class_weight(y));
        // sum_j q_j (max - x_j) first (max - x_y alone, exact, without smoothing).
        A shifted = m - head.at(i, (size_t)y);
        if (spec.smoothing != 0.0) {
          shifted = A(0);
          for (size_t j = 0; j < spec.classes; ++j)
            shifted += A(smoothed_target(spec.smoothing, spec.classes, y, j)) * (m - head.at(i, j));
        }
        loss += cw * (shifted + log(s));
        weight += cw;
      } else if (y == -2) {
        min_pair(bad_key, bad_value, (long long)i * heads + h, label);
      }
    }
    loss = block_sum(loss, scratch);
    weight = block_sum(weight, scratch);
    if (threadIdx.x == 0) {
      double *pair = partial_sums + 2 * ((size_t)blockIdx.x * heads + h);
      pair[0] = (double)loss;
      pair[1] = (double)weight;
    }
  }
  block_min_pair(bad_key, bad_value);
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    mhce_write<T>(table, heads, partial_sums, bad_key, bad_value, losses, weight_sums, status);
  } else {
    partial_bad[2 * blockIdx.x] = bad_key;
    partial_bad[2 * blockIdx.x + 1] = bad_value;
  }
}

// One block folds the forward's per-block partials (the same sum on every
// run) into block 0's pairs, then writes the results.
template <typename T>
__device__ __forceinline__ void mhce_finalize(const long long *table, int heads,
                                              size_t n_partials, double *partial_sums,
                                              const long long *partial_bad, T *losses,
                                              double *weight_sums, long long *status) {
  __shared__ double scratch[32];
  long long bad_key = NO_BAD_LABEL, bad_value = 0;
  for (size_t p = threadIdx.x; p < n_partials; p += blockDim.x)
    min_pair(bad_key, bad_value, partial_bad[2 * p], partial_bad[2 * p + 1]);
  block_min_pair(bad_key, bad_value);
  for (int h = 0; h < heads; ++h) {
    double loss = 0.0, weight = 0.0;
    for (size_t p = threadIdx.x; p < n_partials; p += blockDim.x) {
      loss += partial_sums[2 * (p * heads + h)];
      weight += partial_sums[2 * (p * heads + h) + 1];
    }
    loss = block_sum(loss, scratch);
    weight = block_sum(weight, scratch);
    // Block 0's pair of head h: read above by thread 0 alone, in this iteration.
    if (threadIdx.x == 0) {
      partial_sums[2 * h] = loss;
      partial_sums[2 * h + 1] = weight;
    }
  }
  if (threadIdx.x == 0)
    mhce_write<T>(table, heads, partial_sums, bad_key, bad_value, losses, weight_sums, status);
}

// grads: [n, width] row-major; grad_losses: [H + 1] (each head's, then the total's).
template <typename T, typename L>
__device__ __forceinline__ void mhce_bwd(const T *logits, size_t row_stride, size_t col_stride,
                                         const L *labels, size_t label_row_stride,
                                         size_t label_col_stride, size_t n,
                                         const long long *table, int heads,
                                         const T *grad_losses, const double *weight_sums,
                                         size_t width, T *grads) {
  typedef typename Elem<T>::acc_t A;
  const A g_total = to_acc(grad_losses[heads]);
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    for (int h = 0; h < heads; ++h) {
      const HeadSpec spec = HeadSpec::read(table, h);
      // d total / d loss_h = w_h; a head of weight sum 0 has no gradient.
      const double w_sum = weight_sums[h];
      const A scale = w_sum > 0.0
                          ? (to_acc(grad_losses[h]) + A(spec.weight) * g_total) / A(w_sum)
                          : A(0);
      const long long label = (long long)labels[i * label_row_stride + h * label_col_stride];
      const long long y = decode(label, spec.ignore, spec.classes);
      const A row_scale = y >= 0 ? scale * A(spec.class_weight(y)) : A(0);
      head_grad(spec.logits(logits, row_stride, col_stride), i, y, row_scale,
                grads + i * width + spec.column, spec.smoothing);
    }
  }
}

// ---- instantiation ---------------------------------------------------------

#define MHCE_INPUTS(TYPE, LTYPE)                                                               \
  const TYPE *logits, size_t row_stride, size_t col_stride, const LTYPE *labels,             \
      size_t label_row_stride, size_t label_col_stride, size_t n, const long long *table,     \
      int heads
#define MHCE_INPUT_ARGS                                                                        \
  logits, row_stride, col_stride, labels, label_row_stride, label_col_stride, n, table, heads

#define MHCE_LABEL_KERNELS(TYPE, SUFFIX, LTYPE, LSUFFIX)                                       \
  extern "C" __global__ void mhce_fwd_##LSUFFIX##_##SUFFIX(                                    \
      MHCE_INPUTS(TYPE, LTYPE), double *partial_sums, long long *partial_bad, TYPE *losses,   \
      double *weight_sums, long long *status) {                                                \
    mhce_fwd<TYPE, LTYPE>(MHCE_INPUT_ARGS, partial_sums, partial_bad, losses, weight_sums,    \
                          status);                                                             \
  }                                                                                            \
  extern "C" __global__ void mhce_bwd_##LSUFFIX##_##SUFFIX(                                    \
      MHCE_INPUTS(TYPE, LTYPE), const TYPE *grad_losses, const double *weight_sums,           \
      size_t width, TYPE *grads) {                                                             \
    mhce_bwd<TYPE, LTYPE>(MHCE_INPUT_ARGS, grad_losses, weight_sums, width, grads);           \
  }

#define MHCE_KERNELS(TYPE, SUFFIX)                                                             \
  MHCE_LABEL_KERNELS(TYPE, SUFFIX, int64_t, i64)                                               \
  MHCE_LABEL_KERNELS(TYPE, SUFFIX, int32_t, i32)                                               \
  MHCE_LABEL_KERNELS(TYPE, SUFFIX, int16_t, i16)                                               \
  MHCE_LABEL_KERNELS(TYPE, SUFFIX, uint32_t, u32)                                              \
  MHCE_LABEL_KERNELS(TYPE, SUFFIX, uint8_t, u8)                                                \
  extern "C" __global__ void mhce_finalize_##SUFFIX(const long long *table, int heads,        \
                                                    size_t n_partials, double *partial_sums,  \
                                                    const long long *partial_bad,              \
                                                    TYPE *losses, double *weight_sums,         \
                                                    long long *status) {                       \
    mhce_finalize<TYPE>(table, heads, n_partials, partial_sums, partial_bad, losses,          \
                        weight_sums, status);                                                  \
  }

FOR_EACH_FLOAT(MHCE_KERNELS)
