// The parameter dtypes of the fused kernels, shared by the CPU and CUDA code: their ids (DTYPE_IDS in
// zo_kernels/ops/spec.py), storage and accumulation types, and the conversions between them (Io<D>).
//
// float16 and bfloat16 are stored as raw 16-bit patterns. The CPU library converts them in software,
// so it needs no compiler support for them (and no libtorch); under nvcc, CUDA's conversions are used,
// on the host and the device alike. Both round to nearest even, like PyTorch's.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ZO_HD __host__ __device__ __forceinline__
#else
#define ZO_HD inline
#endif

namespace zo {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal: value = man * 2^-24.
    const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): scale so the integer part is the 10-bit mantissa, then round
    // to nearest even by adding and subtracting 0.5 (exact in float: the sum stays below 2^23).
    const float scaled = bits_float(a) * 16777216.0f;  // * 2^24
    const float magic = 8388608.0f;                      // 2^23 forces rounding at the unit
    const uint32_t man = float_bits(scaled + magic) - float_bits(magic);
    return static_cast<uint16_t>(sign | man);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

// Io<T>: the element type T in memory, the accumulation type Acc, and the conversions.
template <int D>
struct Io;

template <>
struct Io<kFloat32> {
  using T = float;
  using Acc = float;
  static ZO_HD Acc load(T v) { return v; }
  static ZO_HD T store(Acc v) { return v; }
};

template <>
struct Io<kFloat64> {
  using T = double;
  using Acc = double;
  static ZO_HD Acc load(T v) { return v; }
  static ZO_HD T store(Acc v) { return v; }
};

#if defined(__CUDACC__)
template <>
struct Io<kFloat16> {
  using T = unsigned short;
  using Acc = float;
  static ZO_HD Acc load(T v) { return __half2float(__ushort_as_half(v)); }
  static ZO_HD T store(Acc v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Io<kBFloat16> {
  using T = unsigned short;
  using Acc = float;
  static ZO_HD Acc load(T v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static ZO_HD T store(Acc v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
#else
template <>
struct Io<kFloat16> {
  using T = uint16_t;
  using Acc = float;
  static Acc load(T v) { return f16_to_float(v); }
  static T store(Acc v) { return float_to_f16(v); }
};

template <>
struct Io<kBFloat16> {
  using T = uint16_t;
  using Acc = float;
  static Acc load(T v) { return bf16_to_float(v); }
  static T store(Acc v) { return float_to_bf16(v); }
};
#endif

}  // namespace zo
