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

// mix for 4 lanes with the target chosen once (a GPU epilogue otherwise branches per lane); the same
// arithmetic per lane as mix, so the results are bit for bit the same.
ANISO_HD void mix4(float a, float b, const float x0[4], const float n[4], Target target, float x_t[4],
                   float tgt[4]) {
  for (int l = 0; l < 4; ++l) x_t[l] = a * x0[l] + b * n[l];
  switch (target) {
    case Target::kV:
      for (int l = 0; l < 4; ++l) tgt[l] = a * n[l] - b * x0[l];
      break;
    case Target::kX0:
      for (int l = 0; l < 4; ++l) tgt[l] = x0[l];
      break;
    case Target::kFlow:
      for (int l = 0; l < 4; ++l) tgt[l] = n[l] - x0[l];
      break;
    default:
      for (int l = 0; l < 4; ++l) tgt[l] = n[l];
  }
}

}  // namespace anisodiff
