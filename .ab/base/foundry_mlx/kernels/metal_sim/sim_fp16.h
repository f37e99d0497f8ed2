// Part of the runtime translation unit (included by sim_runtime.h).
#pragma once

#include <cstdint>
#include <cstring>

// Conversions for __fp16 (storage-only half) that clang emits as library
// calls; implemented here so no compiler-rt is needed. Round to nearest even.
namespace {

uint16_t double_to_half_bits(double value) {
  uint64_t x;
  std::memcpy(&x, &value, sizeof(x));
  const uint16_t sign = uint16_t((x >> 48) & 0x8000);
  const uint64_t magnitude = x & 0x7FFFFFFFFFFFFFFFull;
  const unsigned exponent = unsigned(magnitude >> 52);
  const uint64_t mantissa = magnitude & ((1ull << 52) - 1);
  if (exponent == 0x7FF) {
    return sign | (mantissa ? uint16_t(0x7E00 | (mantissa >> 42)) : 0x7C00);
  }
  if (magnitude >= 0x40EFFE0000000000ull) { // >= 65520 rounds to infinity
    return sign | 0x7C00;
  }
  uint64_t full;
  unsigned shift;
  if (exponent >= 1009) { // normal half
    full = uint64_t(exponent - 1008) << 52 | mantissa;
    shift = 42;
  } else { // subnormal half: units of 2^-24
    shift = 1051 - exponent;
    if (exponent == 0 || shift >= 64) {
      return sign;
    }
    full = mantissa | (1ull << 52);
  }
  uint64_t kept = full >> shift;
  const uint64_t rest = full & ((1ull << shift) - 1);
  const uint64_t halfway = 1ull << (shift - 1);
  if (rest > halfway || (rest == halfway && (kept & 1))) {
    kept++;
  }
  return sign | uint16_t(kept);
}

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0) {
    float magnitude = float(mantissa) * 0x1p-24f;
    std::memcpy(&bits, &magnitude, sizeof(bits));
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

} // namespace

extern "C" {
float __gnu_h2f_ieee(uint16_t h) {
  return half_bits_to_float(h);
}
uint16_t __gnu_f2h_ieee(float f) {
  return double_to_half_bits(double(f));
}
uint16_t __truncdfhf2(double d) {
  return double_to_half_bits(d);
}
}
