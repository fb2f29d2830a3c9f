// Branch-free float32 log and sincos (Cephes polynomials, ~1 ulp on the ranges Box-Muller uses).
// Written with plain arithmetic and bit operations so compilers vectorise the CPU loops that call
// them; the CUDA kernels use the same code so every backend computes the same stream.
#pragma once

#include <math.h>
#include <string.h>

#include "anisodiff/macros.h"

namespace anisodiff {

ANISO_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

ANISO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Natural log for normal positive x (Box-Muller feeds [1e-7, 1]).
ANISO_HD float fast_logf(float x) {
  const uint32_t bits = float_bits(x);
  float e = (float)((int32_t)(bits >> 23) - 126);
  float m = bits_float((bits & 0x807FFFFFu) | 0x3F000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// sin and cos of x for |x| up to a few thousand (Box-Muller feeds [0, 2 pi)).
ANISO_HD void fast_sincosf(float x, float& s, float& c) {
  const uint32_t sign_in = float_bits(x) & 0x80000000u;
  const float ax = fabsf(x);
  int32_t j = (int32_t)(ax * 1.27323954473516f);  // 4 / pi
  j = (j + 1) & ~1;
  const float y = (float)j;
  const float r = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = r * r;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  pc = pc * z * z - 0.5f * z + 1.0f;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  ps = ps * z * r + r;
  const bool swap = (j & 2) != 0;
  const uint32_t sign_sin = sign_in ^ ((uint32_t)(j & 4) << 29);
  const uint32_t sign_cos = ((uint32_t)(~(j - 2)) & 4u) << 29;
  s = bits_float(float_bits(swap ? pc : ps) ^ sign_sin);
  c = bits_float(float_bits(swap ? ps : pc) ^ sign_cos);
}

}  // namespace anisodiff
