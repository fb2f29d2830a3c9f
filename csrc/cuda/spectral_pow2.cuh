// Geometry of the power-of-two fused spectral kernel (noise_spectral_pow2.cu), shared by the kernel
// and the planner (noise_cuda.cu). See the kernel file for the design.
#pragma once

#include <climits>

#include "common.cuh"

namespace anisodiff {
namespace cuda {

// H W / 8 threads per block (8 complex values each): one warp .. 1024 threads.
constexpr int kPow2MinPixels = 256;
constexpr int kPow2MaxPixels = 8192;
constexpr int kPow2MaxSide = 128;  // the twiddle table's length (kTwiddle128)
constexpr int kPow2MaxThreads = kPow2MaxPixels / 8;
// The ddpm_step epilogue needs more registers: at most 512 threads (128 registers each), H W <= 4096.
constexpr int kPow2MaxStepThreads = 512;

struct Pow2Geom {
  int lh = 0, lw = 0;  // log2 H, log2 W
  int P = 0;           // complex planes of a slice = blocks of its cluster
  int threads = 0;     // H W / 8
  int pitch = 0;       // float2 per plane row: W + 1 (odd: neighbouring lines in different banks)
  int sets = 1;        // noise sets: n, and n' of the input perturbation
  bool acc = false;    // more than one draw or set: the finished sets are summed in acc
  size_t off_acc = 0, off_red = 0, off_misc = 0, smem = 0;
};

inline int log2_exact(int64_t n) {
  int l = 0;
  while (((int64_t)1 << l) < n && l < 62) ++l;
  return n > 0 && ((int64_t)1 << l) == n ? l : -1;
}

// Whether the power-of-two kernel runs p (spectral weights or per-sample normalisation are the
// caller's condition), and its geometry in g.
inline bool pow2_geometry(const NoiseProblem& p, Pow2Geom& g) {
  const int64_t H = p.height, W = p.width, HW = H * W;
  const int lh = log2_exact(H), lw = log2_exact(W);
  if (lh < 1 || lw < 2 || H > kPow2MaxSide || W > kPow2MaxSide || HW < kPow2MinPixels || HW > kPow2MaxPixels)
    return false;
  const int64_t P = (p.channels + 1) / 2;
  if (P < 1 || P > kMaxPortableCluster) return false;
  if ((p.step_params != nullptr ? p.step_k : p.k) > 2) return false;
  if (p.step_params != nullptr && HW / 8 > kPow2MaxStepThreads) return false;
  if (p.batch * p.frames * P > (int64_t)INT_MAX) return false;
  g.lh = lh;
  g.lw = lw;
  g.P = (int)P;
  g.threads = (int)(HW / 8);
  g.pitch = (int)W + 1;
  g.sets = perturbed(p) ? 2 : 1;
  g.acc = p.draws > 1 || g.sets > 1;
  const size_t plane = 8 * (size_t)H * g.pitch;
  size_t o = align_up(plane, 16);
  g.off_acc = o;
  o = align_up(o + (g.acc ? g.sets * plane : 0), 16);
  g.off_red = o;
  o = align_up(o + 8 * 32, 16);
  g.off_misc = o;
  o = align_up(o + 4 * 4, 16);
  g.smem = o;
  return true;
}

cudaError_t launch_fused_pow2(const NoiseProblem& p, const Pow2Geom& g, bool vec, size_t smem_cap,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace anisodiff
