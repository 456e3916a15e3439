// Host stand-in for CUDA's <cuda_fp16.h>: the `__half` type and the conversions
// the kernels use, rounding to nearest even exactly as the device does. Only the
// host build of the kernels (kernels/host/, the `host-kernels` feature) sees it.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_float_bits.h"

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) : bits(smtl_host::float_to_half_bits(f)) {}
  operator float() const { return smtl_host::half_bits_to_float(bits); }
};

inline float __half2float(__half h) { return smtl_host::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(static_cast<float>(d)); }
