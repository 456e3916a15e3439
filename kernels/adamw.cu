// AdamW over many parameter tensors in one launch (see src/ops/adamw/ for the
// update and its API). Each tensor's buffers are reached through a table of
// device addresses. The table (int64 words) starts with the constants of the
// update, as f64 bits: beta1, beta2, eps and the gradients' scale (clipping);
// then one record of ADAMW_WORDS words per tensor:
//   0 parameter      (T *, updated in place)
//   1 gradient       (const T *)
//   2 first moment   (acc_t *, updated in place)
//   3 second moment  (acc_t *, updated in place)
//   4 master weights (acc_t *, updated in place; 0 when the parameter is its own)
//   5 element count
//   6 the tensor's first block in the grid
//   7 decay          (f64 bits: 1 - lr * weight_decay)
//   8 step size      (f64 bits: lr / (1 - beta1^t))
//   9 bias correction of the second moment, square-rooted (f64 bits)
// Block b updates ADAMW_CHUNK elements of the tensor whose range of blocks
// holds b (a binary search over word 6: tensors are in grid order). acc_t is
// f32 (f64 for f64 parameters): moments and master weights are kept in it, and
// a parameter with master weights is the master rounded to T.

#include "common.cuh"

#define ADAMW_HEADER_WORDS 4
#define ADAMW_WORDS 10
#define ADAMW_CHUNK 4096

template <typename T>
__device__ __forceinline__ void adamw_step(const long long *table, int tensors) {
  typedef typename Elem<T>::acc_t A;
  const A b1 = A(__longlong_as_double(table[0])), b2 = A(__longlong_as_double(table[1]));
  const A eps = A(__longlong_as_double(table[2])), scale = A(__longlong_as_double(table[3]));
  table += ADAMW_HEADER_WORDS;
  int lo = 0, hi = tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[ADAMW_WORDS * mid + 6] <= (long long)blockIdx.x) lo = mid;
    else hi = mid - 1;
  }
  const long long *rec = table + ADAMW_WORDS * lo;
  T *param = (T *)rec[0];
  const T *grad = (const T *)rec[1];
  A *m = (A *)rec[2];
  A *v = (A *)rec[3];
  A *master = (A *)rec[4];
  const size_t n = (size_t)rec[5];
  const A decay = A(__longlong_as_double(rec[7]));
  const A step_size = A(__longlong_as_double(rec[8]));
  const A bc2_sqrt = A(__longlong_as_double(rec[9]));
  const size_t start = ((size_t)blockIdx.x - (size_t)rec[6]) * ADAMW_CHUNK;
  const size_t end = start + ADAMW_CHUNK < n ? start + ADAMW_CHUNK : n;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const A g = to_acc(grad[i]) * scale;
    const A mi = b1 * m[i] + (A(1) - b1) * g;
    const A vi = b2 * v[i] + (A(1) - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const A p = (master ? master[i] : to_acc(param[i])) * decay -
                step_size * mi / (sqrt(vi) / bc2_sqrt + eps);
    if (master) master[i] = p;
    param[i] = from_acc<T>(p);
  }
}

#define ADAMW_KERNELS(TYPE, SUFFIX)                                                            \
  extern "C" __global__ void adamw_step_##SUFFIX(const long long *table, int tensors) {     \
    adamw_step<TYPE>(table, tensors);                                                          \
  }

FOR_EACH_FLOAT(ADAMW_KERNELS)
