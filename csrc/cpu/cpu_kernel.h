// Internal interface between the CPU dispatcher (noise_cpu.cpp, built once) and the fused kernel
// (noise_kernel.cpp, built once per instruction set: default, AVX2, AVX-512).
#pragma once

#include "anisodiff/problem.h"
#include "anisodiff/spectral.h"

namespace anisodiff {
namespace cpu {

// Twiddles of one Stockham FFT length (forward sign; the inverse conjugates them).
struct FftPlanView {
  int n = 1;
  int stages = 0;
  int radix[kMaxFftStages] = {};
  int span[kMaxFftStages] = {};            // product of the radices of earlier stages (Ns)
  const float* tw_re[kMaxFftStages] = {};  // [span * (radix - 1)]: exp(-2 pi i r k / (span radix))
  const float* tw_im[kMaxFftStages] = {};
  const float* root_re[kMaxFftStages] = {};  // [radix]: exp(-2 pi i m / radix)
  const float* root_im[kMaxFftStages] = {};
  // Bluestein (bluestein_m > 0, see spectral.h): X = c * IFFT_m(FFT_m(c * x) * B) with the chirp
  // c_j = exp(-i pi j^2 / n) and B = FFT_m(conj c) / m (the inverse conjugates c and B).
  int bluestein_m = 0;
  const FftPlanView* inner = nullptr;  // the power-of-two FFT of length bluestein_m
  const float* chirp_re = nullptr;     // [n]
  const float* chirp_im = nullptr;
  const float* bhat_re = nullptr;      // [bluestein_m]
  const float* bhat_im = nullptr;
};

struct SpectralPlan {
  FftPlanView rows;     // length H (transforms across rows, vectorised along W)
  FftPlanView cols;     // length W (after a transpose, vectorised along H)
  FftPlanView rows_inner, cols_inner;  // Bluestein's power-of-two FFTs, where used
  const float* weights_t = nullptr;  // [draws, W, H]: w transposed, scaled by 1 / (H W), DC bin 0
  float dc_weight[2] = {0.f, 0.f};   // w(0) per draw, applied to the plane mean
  // >= 0 where every non-DC weight of the draw equals it (offset noise on white noise): the
  // filter is then flat_gain * (x - mean(x)) plus the DC term, with no FFT.
  float flat_gain[2] = {-1.f, -1.f};
};

// Per-thread scratch, sized by workspace_floats().
struct Workspace {
  float* eps[2];     // [C * H * W] per draw: one sample
  float* fft_re;     // [H * W]
  float* fft_im;     // [H * W]
  float* zero_plane; // [H * W], stays zero (partner of an unpaired plane)
  float* dc_terms;   // [C]: each plane's DC contribution
  float* blue[4];    // Bluestein buffers: re, im and their ping-pong partners, [max(m_H W, m_W H)]
  float* proj;       // [max(k, step_k) * H * W]
  float* row;        // [3 * W]
  float* step_x;     // [C * H * W] (ddpm_step only)
  float* step_e;     // [C * H * W] (ddpm_step only)
  float* pert;       // [C * H * W]: the input perturbation n' (add_noise with perturb != 0 only)
};

int64_t workspace_floats(const NoiseProblem& p);
Workspace carve_workspace(const NoiseProblem& p, float* base);

#define ANISO_DECLARE_CAPABILITY(NS)                                                          \
  namespace NS {                                                                             \
  void process_samples(const NoiseProblem& p, const SpectralPlan& plan, const Workspace& ws, \
                       int64_t slice_begin, int64_t slice_end);                              \
  }
ANISO_DECLARE_CAPABILITY(cap_default)
ANISO_DECLARE_CAPABILITY(cap_avx2)
ANISO_DECLARE_CAPABILITY(cap_avx512)
#undef ANISO_DECLARE_CAPABILITY

}  // namespace cpu
}  // namespace anisodiff
