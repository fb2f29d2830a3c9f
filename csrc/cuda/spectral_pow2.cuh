// Geometry of the power-of-two fused spectral kernel (noise_spectral_pow2.cu), shared by the kernel
// and the planner (noise_cuda.cu). See the kernel file for the design.
#pragma once

#include <climits>

#include "common.cuh"

namespace anisodiff {
namespace cuda {

// H W / 8 threads per block (8 complex values each): one warp .. 512 threads.
constexpr int kPow2MinPixels = 256;
constexpr int kPow2MaxPixels = 4096;
constexpr int kPow2MaxSide = kTwiddleTurn;  // the twiddle table's length (kTwiddle128)
constexpr int kPow2MaxThreads = kPow2MaxPixels / 8;
constexpr int kPow2MiscFloats = 20;  // the kernel's misc shared floats (noise_spectral_pow2.cu's kMisc*)

// The sizes the hot variant (vectorised add_noise / shaped_noise, no perturbation) is compiled for:
// square planes of 16, 32 and 64 (log2 sides 4 - 6).
__host__ __device__ constexpr bool pow2_fixed_size(int lh, int lw) { return lh == lw && lh >= 4 && lh <= 6; }

// The register budget each variant is compiled for (__launch_bounds__). Planes of up to 32 x 32 with
// the size compiled in: blocks of HW / 8 <= 128 threads, up to 128 registers (at 32 x 32 4-5 blocks of
// 128 threads per SM, 16-20 warps: enough to issue every cycle in the performance model); with them the
// compiler keeps each thread's stage addresses instead of recomputing them (opaque: ~8% fewer
// instructions at 3 x 32 x 32). Otherwise blocks of up to kPow2MaxThreads: 2 resident blocks leave 64
// registers, which the hot variant with compile-time sizes fits (2 blocks per SM at 64 x 64); the step,
// the perturbed, the scalar-I/O and the run-time-size epilogues need more (they spilled 8 - 140 B at 64)
// and get 128 registers.
__host__ __device__ constexpr bool pow2_roomy(int lh, int lw) { return lh > 0 && lh + lw <= 10; }
__host__ __device__ constexpr int pow2_bound_threads(int lh, int lw) {
  return pow2_roomy(lh, lw) ? (1 << (lh + lw)) / 8 : kPow2MaxThreads;
}
__host__ __device__ constexpr int pow2_min_blocks(bool step, bool pert, bool vec, int lh, int lw) {
  return pow2_roomy(lh, lw) ? 65536 / (128 * pow2_bound_threads(lh, lw)) : (step || pert || !vec || lh == 0 ? 1 : 2);
}

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
  o = align_up(o + 16 * 32, 16);  // block_sum2: 2 doubles per warp
  g.off_misc = o;
  o = align_up(o + kPow2MiscFloats * 4, 16);  // misc: the DC terms, means, scales, sample coefficients
  g.smem = o;
  return true;
}

// 128 x 128 planes as 32-row slabs of a cluster (fused_spectral_slabs128, noise_spectral_pow2.cu).
constexpr int kSlabQ = 4, kSlabRows = 32, kSlabSide = 128;
constexpr int kSlabRowPitch = kSlabSide + 1, kSlabColPitch = kSlabRows + 1;
constexpr int kSlabThreads = kSlabRows * kSlabSide / 8;  // 512: 8 complex values each

struct SlabGeom {
  int P = 0;  // complex planes per slice
  size_t off_col = 0, off_red = 0, off_part = 0, off_misc = 0, smem = 0;
};

// Whether the slab kernel runs p: 128 x 128 planes, C <= 4 (a cluster of 2 planes x 4 slabs), k <= 2, one
// draw from the canonical stream (no caller noise, no perturbation), add_noise / shaped_noise with
// vectorised I/O; its geometry in g.
inline bool slab_geometry(const NoiseProblem& p, bool vec, SlabGeom& g) {
  if (p.height != kSlabSide || p.width != kSlabSide || p.channels < 1 || p.channels > 4 || p.k > 2) return false;
  if (p.step_params != nullptr || perturbed(p) || p.draws != 1 || p.noise[0].data != nullptr || !vec) return false;
  g.P = (int)(p.channels + 1) / 2;
  if (p.batch * p.frames * g.P * kSlabQ > (int64_t)INT_MAX) return false;
  size_t o = align_up((size_t)8 * kSlabRows * kSlabRowPitch, 16);
  g.off_col = o;
  o = align_up(o + (size_t)8 * kSlabSide * kSlabColPitch, 16);
  g.off_red = o;
  o = align_up(o + 16 * 32, 16);
  g.off_part = o;
  o = align_up(o + 8 * 6, 16);  // the block's partial sums: DC, mean, square (re, im)
  g.off_misc = o;
  g.smem = align_up(o + kPow2MiscFloats * 4, 16);
  return true;
}

cudaError_t launch_fused_slabs128(const NoiseProblem& p, const SlabGeom& g, size_t smem_cap, cudaStream_t stream);

cudaError_t launch_fused_pow2(const NoiseProblem& p, const Pow2Geom& g, bool vec, size_t smem_cap,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace anisodiff
