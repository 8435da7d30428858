// Vectorizable generation of a tile of the normal stream on the CPU.
//
// The scalar path of philox.h calls libm's logf/sinf/cosf once per element, which no compiler can
// vectorize without fast-math. Here the tile is produced in three loops over structure-of-arrays
// buffers (Philox words, then Box-Muller) that GCC and Clang auto-vectorize, with branch-free
// float32 polynomial approximations of log and sin/cos accurate to about 1 ulp on the arguments
// Box-Muller gives them (u in [2^-24, 1), angle in (0, 2*pi)). Values agree with the PyTorch
// reference within float32 rounding (tests: 1e-6 absolute).
#pragma once

#include <cstdint>

#include "../philox.h"
#include "../dtypes.h"

namespace zo {
namespace cpu {

// Most Philox blocks one tile can touch: kTile / 4 + 1 (a tile that starts mid-block).
constexpr int kMaxTileBlocks = 2048 / 4 + 1;

// Natural log of a positive, normal float. Mantissa m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 +
// f^3 P(f) with f = m - 1 (minimax coefficients as in Cephes' logf), plus e * ln 2 in two parts.
inline float log_positive(float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t mantissa = bits & 0x007FFFFFu;
  // Mantissa above sqrt(2)'s (0x3504F3): halve m (exponent field 126 instead of 127) and add 1 to
  // e, with integer arithmetic rather than a branch so that the loop vectorizes.
  const uint32_t big = mantissa > 0x3504F3u ? 1u : 0u;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(big);
  const float m = bits_float(mantissa | (0x3F800000u - (big << 23)));
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = f * z * p;
  y += -2.12194440e-4f * fe;  // ln 2 = 0.693359375 - 2.12194440e-4
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

// sin and cos of t in [0, 2*pi): reduce by the nearest multiple of pi/2 (pi/2 split in three parts
// so the reduction is exact enough), evaluate both polynomials on [-pi/4, pi/4], then rotate by the
// quadrant.
inline void sincos_0_2pi(float t, float* s_out, float* c_out) {
  const int32_t q = static_cast<int32_t>(t * 0.636619772f + 0.5f);  // round(t / (pi/2)), t >= 0
  const float fq = static_cast<float>(q);
  float x = t - fq * 1.5703125f;
  x -= fq * 4.837512969970703125e-4f;
  x -= fq * 7.54978995489188216e-8f;
  const float z = x * x;
  const float s = x + x * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  // Quadrant q: odd quadrants swap sin and cos; sin is negated in quadrants 2, 3 and cos in 1, 2.
  // Done on the bits (mask blend, sign flip) so that the loop has no control flow.
  const uint32_t swap = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t sb = float_bits(s), cb = float_bits(c);
  const uint32_t sin_bits = (sb & ~swap) | (cb & swap);
  const uint32_t cos_bits = (cb & ~swap) | (sb & swap);
  *s_out = bits_float(sin_bits ^ (static_cast<uint32_t>(q & 2) << 30));
  *c_out = bits_float(cos_bits ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// Normals of blocks [block0, block0 + nblocks) of (seed, sample), lanes in order: out[4*i + l].
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
inline void normal_blocks(float* out, uint64_t seed, uint32_t sample, uint64_t block0, int nblocks) {
  uint32_t w0[kMaxTileBlocks], w1[kMaxTileBlocks], w2[kMaxTileBlocks], w3[kMaxTileBlocks];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < nblocks; ++i) {
    const uint64_t b = block0 + static_cast<uint64_t>(i);
    const Words w = philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), sample, 0u, k0, k1);
    w0[i] = w.x[0];
    w1[i] = w.x[1];
    w2[i] = w.x[2];
    w3[i] = w.x[3];
  }
  for (int i = 0; i < nblocks; ++i) {
    const float r0 = std::sqrt(-2.0f * log_positive(uniform_open01(w0[i])));
    const float r1 = std::sqrt(-2.0f * log_positive(uniform_open01(w2[i])));
    float s0, c0, s1, c1;
    sincos_0_2pi(kTwoPiF * uniform_open01(w1[i]), &s0, &c0);
    sincos_0_2pi(kTwoPiF * uniform_open01(w3[i]), &s1, &c1);
    out[4 * i + 0] = r0 * c0;
    out[4 * i + 1] = r0 * s0;
    out[4 * i + 2] = r1 * c1;
    out[4 * i + 3] = r1 * s1;
  }
}

}  // namespace cpu
}  // namespace zo
