// bf16/fp16 <-> float conversions for the CPU path, bit-exact with the GPU's
// round-to-nearest-even conversions so both paths round outputs identically.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/params.h"

namespace jax_flash_mla {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof word);
  if (std::isnan(f)) return static_cast<uint16_t>((word >> 16) | 0x40);  // keep it a quiet NaN
  const uint32_t rounding = 0x7FFF + ((word >> 16) & 1);
  return static_cast<uint16_t>((word + rounding) >> 16);
}

inline float fp16_to_float(uint16_t bits) {
  const uint32_t sign = (bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1F;
  const uint32_t mantissa = bits & 0x3FF;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  uint32_t word;
  std::memcpy(&word, &magnitude, sizeof word);
  word |= sign;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

inline uint16_t float_to_fp16(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof word);
  const uint16_t sign = static_cast<uint16_t>((word >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7E00;
  if (a >= 65520.0f) return sign | 0x7C00;  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {
    // Subnormal: units of 2^-24, nearbyint rounds half to even in the default mode.
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24)));
  }
  int exp2;
  const float frac = std::frexp(a, &exp2);  // a = frac * 2^exp2, frac in [0.5, 1)
  uint32_t mantissa = static_cast<uint32_t>(std::nearbyint(std::ldexp(frac, 11)));  // 1024..2048
  int biased = exp2 + 14;
  if (mantissa == 2048) {
    mantissa = 1024;
    biased += 1;
  }
  return sign | static_cast<uint16_t>((biased << 10) | (mantissa & 0x3FF));
}

// float8_e4m3fn (no infinities; S.1111.111 is NaN), exactly.
inline float fp8_e4m3_to_float(uint8_t bits) {
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = NAN;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x8), exponent - 10);
  }
  return (bits & 0x80) ? -magnitude : magnitude;
}

// One token of DeepSeek-V3.2's FP8 cache (656 bytes: 512 e4m3 NoPE columns, 4 float32 scales,
// one per 128 of them, then 64 bfloat16 RoPE columns) as its 576 float columns, the fp8 value
// times its scale taken in float32 as jax_flash_mla.dequantize_fp8_kvcache takes it.
constexpr int kFp8NopeColumns = 512;
constexpr int kFp8ColumnsPerScale = 128;
constexpr int kFp8ScalesOffset = 512;
constexpr int kFp8RopeOffset = 528;
constexpr int kFp8RopeColumns = 64;

inline void dequantize_fp8_token(const uint8_t* token, float* columns) {
  float scales[kFp8NopeColumns / kFp8ColumnsPerScale];
  std::memcpy(scales, token + kFp8ScalesOffset, sizeof scales);  // little-endian, as the GPU's
  for (int c = 0; c < kFp8NopeColumns; ++c)
    columns[c] = fp8_e4m3_to_float(token[c]) * scales[c / kFp8ColumnsPerScale];
  for (int c = 0; c < kFp8RopeColumns; ++c) {
    uint16_t bits;
    std::memcpy(&bits, token + kFp8RopeOffset + 2 * c, sizeof bits);
    columns[kFp8NopeColumns + c] = bf16_to_float(bits);
  }
}

inline float load_element(const void* base, int64_t index, ElementType type) {
  const uint16_t bits = static_cast<const uint16_t*>(base)[index];
  return type == ElementType::kBF16 ? bf16_to_float(bits) : fp16_to_float(bits);
}

inline void store_element(void* base, int64_t index, float value, ElementType type) {
  static_cast<uint16_t*>(base)[index] =
      type == ElementType::kBF16 ? float_to_bf16(value) : float_to_fp16(value);
}

}  // namespace jax_flash_mla
