// Mixing the shaped noise with the data: x_t = a x0 + b n, and the training target.
#pragma once

#include "anisodiff/macros.h"

namespace anisodiff {

enum class Target : int { kEpsilon = 0, kV = 1, kX0 = 2, kFlow = 3 };

ANISO_HD void mix(float a, float b, float x0, float n, Target target, float& x_t, float& tgt) {
  x_t = a * x0 + b * n;
  switch (target) {
    case Target::kV: tgt = a * n - b * x0; break;
    case Target::kX0: tgt = x0; break;
    case Target::kFlow: tgt = n - x0; break;
    default: tgt = n;
  }
}

// mix for n lanes with the target chosen once (an epilogue otherwise branches per lane): each case
// calls mix with a constant target, so the arithmetic is mix's and the results are bit for bit the same.
ANISO_HD void mix_n(float a, float b, const float* x0, const float* n, Target target, float* x_t, float* tgt,
                    int64_t count) {
  switch (target) {
    case Target::kV:
      for (int64_t i = 0; i < count; ++i) mix(a, b, x0[i], n[i], Target::kV, x_t[i], tgt[i]);
      break;
    case Target::kX0:
      for (int64_t i = 0; i < count; ++i) mix(a, b, x0[i], n[i], Target::kX0, x_t[i], tgt[i]);
      break;
    case Target::kFlow:
      for (int64_t i = 0; i < count; ++i) mix(a, b, x0[i], n[i], Target::kFlow, x_t[i], tgt[i]);
      break;
    default:
      for (int64_t i = 0; i < count; ++i) mix(a, b, x0[i], n[i], Target::kEpsilon, x_t[i], tgt[i]);
  }
}

}  // namespace anisodiff
