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

}  // namespace anisodiff
