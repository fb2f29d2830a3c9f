// Channel part of the operator (SDM / HDM): S(t) = g (I - V V^T) + V diag(f) V^T with
// f_k = exp(-r_k); SDM has g = 1, the Heisenberg variant g = exp(sum_k r_k / (C - k)) (det S = 1).
// Applied per pixel as  S e = g e + sum_k (f_k - g) (v_k . e) v_k.
#pragma once

#include <math.h>

#include "anisodiff/macros.h"

namespace anisodiff {

enum class SqueezeVariant : int { kSDM = 0, kHeisenberg = 1 };

constexpr int kMaxAxes = 8;  // k <= 8 principal axes (checked by the ops)

struct SqueezeCoeffs {
  float g;                 // scale of the orthogonal complement
  float f_minus_g[kMaxAxes];  // per-axis extra scale
};

// r: the k strengths r_k(t) of one sample. KA (<= kMaxAxes): the most axes the caller reads (a GPU
// kernel compiled for k <= 2 then has 2 exponentials in its code, not 8); entries past KA stay unset.
template <int KA = kMaxAxes>
ANISO_HD SqueezeCoeffs squeeze_coeffs(const float* r, int k, int channels, SqueezeVariant variant) {
  SqueezeCoeffs out;
  float sum_r = 0.f;
  for (int i = 0; i < KA && i < k; ++i) sum_r += r[i];  // (k <= KA: a bound the compiler can unroll by)
  out.g = variant == SqueezeVariant::kHeisenberg ? expf(sum_r / (float)(channels - k)) : 1.0f;
  for (int i = 0; i < KA; ++i) out.f_minus_g[i] = i < k ? expf(-r[i]) - out.g : 0.f;
  return out;
}

// S e for one pixel's channel vector e[C] (axes: [C, k] row-major), written to out[C].
ANISO_HD void squeeze_pixel(const float* e, float* out, const float* axes, int channels, int k,
                            const SqueezeCoeffs& sc) {
  for (int c = 0; c < channels; ++c) out[c] = sc.g * e[c];
  for (int i = 0; i < k; ++i) {
    float u = 0.f;
    for (int c = 0; c < channels; ++c) u += axes[c * k + i] * e[c];
    const float coef = sc.f_minus_g[i] * u;
    for (int c = 0; c < channels; ++c) out[c] += coef * axes[c * k + i];
  }
}

// A ddpm_step channel matrix given by its eigenvalues (perp, axes[k]): m[0] on the orthogonal
// complement, m[1 + i] on axis i (or their reciprocals, for the inverse).
ANISO_HD SqueezeCoeffs step_matrix(const float* m, int k, bool inverse) {
  SqueezeCoeffs sc;
  sc.g = inverse ? 1.f / m[0] : m[0];
  for (int i = 0; i < kMaxAxes; ++i) sc.f_minus_g[i] = i < k ? (inverse ? 1.f / m[1 + i] : m[1 + i]) - sc.g : 0.f;
  return sc;
}

}  // namespace anisodiff
