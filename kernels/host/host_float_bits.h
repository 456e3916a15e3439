// Bit-exact f32 <-> f16 / bf16 conversions for the host build of the kernels:
// round to nearest, ties to even, with overflow to infinity, subnormal halves,
// and NaN kept NaN (the results of __float2half_rn / __float2bfloat16_rn).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace smtl_host {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float value) {
  uint32_t f = float_bits(value);
  const uint32_t sign = (f >> 16) & 0x8000u;
  f &= 0x7fffffffu;
  if (f > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7fffu);  // NaN
  if (f >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (f >= 0x38800000u) {                                              // normal half
    const uint32_t odd = (f >> 13) & 1u;
    f += 0xc8000fffu + odd;  // rebias the exponent by -112, round half to even
    return static_cast<uint16_t>(sign | (f >> 13));
  }
  // Subnormal half (or zero): add 0.5, whose exponent puts the half's last
  // mantissa bit at the float's last bit; the FPU's addition rounds to even.
  const float magic = bits_float(126u << 23);
  const uint32_t r = float_bits(bits_float(f) + magic) - (126u << 23);
  return static_cast<uint16_t>(sign | r);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mant), -24);  // exact
    return bits_float(sign | float_bits(magnitude));
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_bf16_bits(float value) {
  const uint32_t f = float_bits(value);
  if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((f >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounded = f + 0x7fffu + ((f >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace smtl_host
