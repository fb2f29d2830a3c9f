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
  // Spatio-temporal problems (NoiseProblem::temporal): length F, across the frames of a volume
  // [F][H W], vectorised along the H W bins of each frame.
  FftPlanView frames, frames_inner;
  // [draws, W, H] (per frame: [draws, F, W, H]): w transposed per frame, scaled by 1 / (F H W),
  // DC bin 0
  const float* weights_t = nullptr;
  float dc_weight[2] = {0.f, 0.f};   // w(0) per draw, applied to the plane (volume) mean
  // >= 0 where every non-DC weight of the draw equals it (offset noise on white noise): the
  // filter is then flat_gain * (x - mean(x)) plus the DC term, with no FFT.
  float flat_gain[2] = {-1.f, -1.f};
};

// Per-thread scratch, sized by workspace_floats(). A work item holds nf frames of one sample,
// [C][nf][H][W]: nf = 1 (a (b, f) slice) or F (temporal: the whole sample, C volumes).
struct Workspace {
  float* eps[2];     // [C * nf * H * W] per draw: one work item
  float* fft_re;     // [nf * H * W]
  float* fft_im;     // [nf * H * W]
  float* zero_plane; // [nf * H * W], stays zero (partner of an unpaired plane or volume)
  float* dc_terms;   // [C]: each plane's (volume's) DC contribution
  float* blue[4];    // Bluestein buffers: re, im and their ping-pong partners,
                     // [max(m_H W, m_W H, m_F H W)]
  float* proj;       // [max(k, step_k) * nf * H * W]
  float* row;        // [3 * W]
  float* step_x;     // [C * nf * H * W] (ddpm_step only)
  float* step_e;     // [C * nf * H * W] (ddpm_step only)
  float* pert;       // [C * nf * H * W]: the input perturbation n' (add_noise with perturb != 0 only)
};

// Frames per work item: all F of a sample for a temporal problem, else one.
inline int64_t item_frames(const NoiseProblem& p) { return p.temporal ? p.frames : 1; }

int64_t workspace_floats(const NoiseProblem& p);
Workspace carve_workspace(const NoiseProblem& p, float* base);

#define ANISO_DECLARE_CAPABILITY(NS)                                                          \
  namespace NS {                                                                             \
  void process_samples(const NoiseProblem& p, const SpectralPlan& plan, const Workspace& ws, \
                       int64_t item_begin, int64_t item_end);                                \
  }
ANISO_DECLARE_CAPABILITY(cap_default)
ANISO_DECLARE_CAPABILITY(cap_avx2)
ANISO_DECLARE_CAPABILITY(cap_avx512)
#undef ANISO_DECLARE_CAPABILITY

}  // namespace cpu
}  // namespace anisodiff
