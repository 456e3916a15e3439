// Host stand-in for CUDA's <cuda_bf16.h>: the `__nv_bfloat16` type and the
// conversions the kernels use, rounding to nearest even as the device does.
#pragma once

#include <cstdint>

#include "host_float_bits.h"

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(smtl_host::float_to_bf16_bits(f)) {}
  operator float() const { return smtl_host::bf16_bits_to_float(bits); }
};

inline float __bfloat162float(__nv_bfloat16 h) { return smtl_host::bf16_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
