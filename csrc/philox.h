// The zo_kernels noise stream (docs/noise.md), shared by the CPU (C++) and CUDA kernels.
//
// Philox4x32-10 keyed by the 64-bit seed, counters from (block, sample id), turned into float32
// standard normals (Box-Muller, 4 per block) or Rademacher signs (128 per block). Compiles as host
// C++ and as CUDA device code; every function is a pure function of its arguments.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtypes.h"  // ZO_HD

namespace zo {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// 2*pi rounded to float32; the reference multiplies by exactly this constant.
constexpr float kTwoPiF = 6.28318548202514648f;

enum Stream : int { kNormal = 0, kRademacher = 1 };

// Consecutive flat elements fed by one Philox call.
template <int S>
struct StreamTraits;
template <>
struct StreamTraits<kNormal> {
  static constexpr int kPerBlock = 4;
};
template <>
struct StreamTraits<kRademacher> {
  static constexpr int kPerBlock = 128;
};

struct Words {
  uint32_t x[4];
};

ZO_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  // The 64-bit product compiles to IMAD.WIDE.U32 plus a VIADD of its high word with zero per
  // multiply; the two 32-bit halves are the same bits in fewer instructions.
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds; key bumped before rounds 2..10 (Random123 order).
ZO_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, &hi0, &lo0);
    mulhilo32(kPhiloxM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// The four words of (seed, sample, block): counter (block lo, block hi, sample, 0), key (seed lo, seed hi).
ZO_HD Words block_words(uint64_t seed, uint32_t sample, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), sample, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Exact float32 uniform in (0, 1): ((x >> 9) + 0.5) * 2^-23.
ZO_HD float uniform_open01(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

ZO_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float r = sqrtf(-2.0f * logf(uniform_open01(a)));
  const float t = kTwoPiF * uniform_open01(b);
  *z0 = r * cosf(t);
  *z1 = r * sinf(t);
}

// The four normals of one block, lanes 0..3.
ZO_HD void normal_block(const Words& w, float* out) {
  box_muller(w.x[0], w.x[1], &out[0], &out[1]);
  box_muller(w.x[2], w.x[3], &out[2], &out[3]);
}

// Sign of element `lane` (0..127) of a Rademacher block: bit (lane % 32) of word (lane / 32).
ZO_HD float rademacher_sign(const Words& w, int lane) {
  return ((w.x[lane >> 5] >> (lane & 31)) & 1u) ? 1.0f : -1.0f;
}

}  // namespace zo
