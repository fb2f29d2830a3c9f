// The launch interface of the fused noise kernels: raw pointers, sizes and flags, no torch types, so
// the CPU and CUDA kernels compile without torch headers. The torch glue (csrc/ops.cpp) fills it.
#pragma once

#include "anisodiff/dtype.h"
#include "anisodiff/macros.h"
#include "anisodiff/mix.h"
#include "anisodiff/squeeze.h"

namespace anisodiff {

// A strided [B, C, H, W] view of float32 / float16 / bfloat16 storage; data == nullptr means absent.
// A 5-D video tensor [B, C, F, H, W] keeps stride[0..3] for (b, c, h, w) and its frame stride in
// frame_stride (docs/design.md section 6).
struct TensorArg {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t frame_stride = 0;

  ANISO_HD int64_t index(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return b * stride[0] + c * stride[1] + h * stride[2] + w * stride[3];
  }
  // Element offset of (b, f, 0, 0, 0): add c * stride[1] + h * stride[2] + w * stride[3].
  ANISO_HD int64_t slice_offset(int64_t b, int64_t f) const { return b * stride[0] + f * frame_stride; }
};

// Kernels work on "slices" s in [0, batch * frames): b = s / frames, f = s % frames. Slice s reads
// the timestep / coefficient row of b, element (s, c, h, w) at TensorArg::slice_offset(b, f) +
// c * stride[1] + h * stride[2] + w * stride[3], and its white value at stream index
// ((b * C + c) * F + f) * H * W + h * W + w (the row-major index of [B, C, F, H, W]; F = 1 is the
// 4-D stream). The spatial filter and the per-sample normalisation act on each slice's planes.
struct NoiseProblem {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t frames = 1;  // F of a [B, C, F, H, W] video tensor; 1 for [B, C, H, W]

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
  // The spatio-temporal spectrum (NoiseSpec(temporal=True), docs/design.md section 6): T_w is a 3-D
  // filter of each (b, c) F x H x W volume, weights are [draws, F, H, W] (DC = bin (0, 0, 0), the
  // volume's mean) and N divides each volume by its std. The work items are then whole samples
  // b in [0, batch) instead of (b, f) slices, since the transform along F couples the frames.
  // Only the CPU kernel implements it; false (the default) is the per-frame problem above, and the
  // shared glue (csrc/ops_common.cpp) refuses a temporal problem for the CUDA kernels.
  bool temporal = false;

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
  // Input perturbation (DDPM-IP, add_noise only): x_t = a x0 + b (n + perturb n'), the target from n.
  // n' = A(t) eps' with eps' draw d from the stream (seed, offset), counter word 2 = draws + d
  // (also when the caller gave eps); 0 = off.
  float perturb = 0.f;

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
