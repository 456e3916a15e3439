// Kernels that tests/host_kernels/harness.rs runs to show what the host harness
// catches: code that a GPU may run wrongly must fail here too. Compiled for the
// host harness only, never for the GPU.
#include "common.cuh"

// A pre-Volta warp reduction that relies on the warp running in lockstep: no
// __syncwarp() between the steps, so a lane may read a partial sum before its
// owner has written it. Wrong under independent thread scheduling.
extern "C" __global__ void selftest_warp_sum_lockstep(const float *x, float *out) {
  __shared__ float s[32];
  const int lane = threadIdx.x & 31;
  s[lane] = x[lane];
  for (int offset = 16; offset > 0; offset >>= 1) {
    if (lane < offset) s[lane] += s[lane + offset];
  }
  if (lane == 0) out[0] = s[0];
}

// The same reduction done right: a __syncwarp() after every write.
extern "C" __global__ void selftest_warp_sum_synced(const float *x, float *out) {
  __shared__ float s[32];
  const int lane = threadIdx.x & 31;
  s[lane] = x[lane];
  __syncwarp();
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = lane < offset ? s[lane + offset] : 0.0f;
    __syncwarp();
    if (lane < offset) s[lane] += v;
    __syncwarp();
  }
  if (lane == 0) out[0] = s[0];
}

// Lane 0 shuffles with a full mask while lanes 1-31 have returned: a GPU hangs
// (or reads garbage); the harness reports a deadlock.
extern "C" __global__ void selftest_shuffle_after_exit(int *out) {
  int v = threadIdx.x;
  if (threadIdx.x != 0) return;
  out[0] = __shfl_xor_sync(0xffffffffu, v, 1);
}

// Shuffles, a ballot and a block barrier: out[t] = (t ^ 5, t - 1 from down by
// width 8, the ballot of even lanes, the sum of the block via shared memory).
extern "C" __global__ void selftest_warp_ops(int *out) {
  __shared__ int total;
  const int t = threadIdx.x;
  if (t == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, t);
  __syncthreads();
  out[4 * t] = __shfl_xor_sync(0xffffffffu, t, 5);
  out[4 * t + 1] = __shfl_down_sync(0xffffffffu, t, 1, 8);
  out[4 * t + 2] = (int)__ballot_sync(0xffffffffu, (t & 1) == 0);
  out[4 * t + 3] = total;
}

// Dynamic shared memory sized by the launch: each block reverses its slice.
extern "C" __global__ void selftest_reverse_in_shared(const float *x, float *out, int n) {
  SMTL_DYNAMIC_SHARED(float, tile);
  const int t = threadIdx.x;
  const long long base = (long long)blockIdx.x * n;
  if (t < n) tile[t] = x[base + t];
  __syncthreads();
  if (t < n) out[base + t] = tile[n - 1 - t];
}

// Every thread of every block adds 1: blocks run on several OS threads, so the
// count is right only if atomics are atomic.
extern "C" __global__ void selftest_count(long long *counter) {
  atomicAdd(reinterpret_cast<unsigned long long *>(counter), 1ull);
}

// f32 -> f16 / bf16 -> f32 through the dtype stand-ins: one element per thread.
extern "C" __global__ void selftest_round(const float *x, __half *h, __nv_bfloat16 *b, float *back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  h[i] = __float2half_rn(x[i]);
  b[i] = __float2bfloat16_rn(x[i]);
  back[2 * i] = __half2float(h[i]);
  back[2 * i + 1] = __bfloat162float(b[i]);
}
