// The canonical noise stream (docs/design.md section 2): Philox4x32-10 + Box-Muller as in Triton's
// tl.randn4x (identical Philox words; the normals agree to ~1e-6, log/sincos rounding differs).
// Element i of a contiguous [B, C, H, W] tensor is lane (i & 3) of randn4x(seed, offset + (i >> 2));
// the 64-bit counter fills words 0 (low) and 1 (high), word 2 holds the draw index (0 for the
// canonical draw, 1 for the second draw of an independent two-band mix).
#pragma once

#include "anisodiff/fastmath.h"
#include "anisodiff/macros.h"

namespace anisodiff {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct Philox4 {
  uint32_t w[4];
};

// Same round structure as triton.language.random.philox_impl.
ANISO_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = (uint64_t)kPhiloxRoundA * c0;
    const uint64_t pb = (uint64_t)kPhiloxRoundB * c2;
    const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float for 32-bit words: int32 view, x < 0 ? -x - 1 : x, times
// 4.6566127342e-10 in float32. (~x == -x - 1 without signed overflow.)
ANISO_HD float uint32_to_uniform(uint32_t word) {
  const int32_t x = (int32_t)word;
  const int32_t folded = x < 0 ? ~x : x;
  return (float)folded * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal (Box-Muller on one word pair).
ANISO_HD void box_muller(float u1, float u2, float& n1, float& n2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float theta = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * fast_logf(u1));
  float s, c;
  fast_sincosf(theta, s, c);
  n1 = r * c;
  n2 = r * s;
}

// Four standard normals for one 64-bit counter of the stream.
ANISO_HD void randn4(uint64_t seed, uint64_t counter, uint32_t draw, float out[4]) {
  const Philox4 p = philox4x32_10((uint32_t)counter, (uint32_t)(counter >> 32), draw, 0u,
                                  (uint32_t)seed, (uint32_t)(seed >> 32));
  box_muller(uint32_to_uniform(p.w[0]), uint32_to_uniform(p.w[1]), out[0], out[1]);
  box_muller(uint32_to_uniform(p.w[2]), uint32_to_uniform(p.w[3]), out[2], out[3]);
}

}  // namespace anisodiff
