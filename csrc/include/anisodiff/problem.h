// The launch interface of the fused noise kernels: raw pointers, sizes and flags, no torch types, so
// the CPU and CUDA kernels compile without torch headers. The torch glue (csrc/ops.cpp) fills it.
#pragma once

#include "anisodiff/dtype.h"
#include "anisodiff/macros.h"
#include "anisodiff/mix.h"
#include "anisodiff/squeeze.h"

namespace anisodiff {

// A strided [B, C, H, W] view of float32 / float16 / bfloat16 storage; data == nullptr means absent.
struct TensorArg {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride[4] = {0, 0, 0, 0};

  ANISO_HD int64_t index(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return b * stride[0] + c * stride[1] + h * stride[2] + w * stride[3];
  }
};

struct NoiseProblem {
  int64_t batch = 0, channels = 0, height = 0, width = 0;

  // Per-timestep coefficients, gathered per sample: row t of coef is (a_t, b_t, r_1(t) .. r_k(t)).
  const int64_t* timesteps = nullptr;  // [B], every value in [0, coef_rows)
  const float* coef = nullptr;         // [coef_rows, 2 + k] row-major
  int64_t coef_rows = 0;

  // Channel part: k principal axes, [C, k] row-major (k == 0: no squeeze).
  int k = 0;
  const float* axes = nullptr;
  SqueezeVariant variant = SqueezeVariant::kSDM;

  // Spatial part: n_sp = sum_d gammas[d] * N(T_{w_d} eps_d), weights [draws, H, W] with the
  // calibration already folded in (nullptr: T_w = identity); N = per-plane std normalisation.
  int draws = 1;
  const float* weights = nullptr;
  float gammas[2] = {1.f, 1.f};
  bool per_sample_norm = false;

  // White noise: the canonical stream (seed, offset), or the caller's draws when noise[d].data is set.
  uint64_t seed = 0, offset = 0;
  // CUDA only: when set, seed and offset are read by the kernel from this device pointer to the int64
  // [seed, offset] stream tensor (no host read, so CUDA-graph replays see the caller's updates).
  // The CPU kernel ignores it.
  const int64_t* stream_ptr = nullptr;
  TensorArg noise[2];

  // add_noise reads x0 and writes x_t and the target into out; shaped_noise writes the noise into out.
  TensorArg x0, x_t, out;
  Target target = Target::kEpsilon;

  // ddpm_step (step_params != nullptr): reads step_x (x_t) and step_eps (the model's shaped-noise
  // estimate), writes x_prev into out and x0_hat into out_x0. The generated noise gets no squeeze
  // (k == 0); the step's channel matrices use the step_k axes. Per sample, step_params holds
  // a_t, b_t, then (perp, axes[step_k]) of S(t), C0, Ct and Sig:
  //   x0_hat = (x_t - b_t eps) / a_t, clipped (1: as is, 2: in S(t)^-1 coordinates),
  //   x_prev = C0 x0_hat + Ct x_t + Sig N(T_w z).
  TensorArg step_x, step_eps, out_x0;
  const float* step_params = nullptr;
  int step_k = 0;
  int step_clip = 0;
  float clip_range = 1.f;
};

}  // namespace anisodiff
