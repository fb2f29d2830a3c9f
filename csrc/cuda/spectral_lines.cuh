// Geometry of the whole-line fused spectral kernel for 32 x 32 planes (noise_spectral_lines.cu), shared
// by the kernel and the planner (noise_cuda.cu). See the kernel file for the design.
#pragma once

#include <climits>

#include "common.cuh"

namespace anisodiff {
namespace cuda {

constexpr int kLinesSide = 32;            // H = W = 32: a line is one thread's, a plane one warp's
constexpr int kLinesPitch = kLinesSide + 1;  // float2 per buffer row: odd, so rows and columns are conflict-free
constexpr int kLinesMaxChannels = 8;      // a block is C warps (two slices' 2 C real planes as C complex ones)
constexpr int kLinesSlices = 2;           // slices per block
constexpr int kLinesMiscFloats = kLinesSlices * kPackedCoefFloats;  // per slice: its coefficients (pack_coef)

// The register budget (__launch_bounds__): C = 3 compiled in, 5 blocks of 3 warps per SM (up to 136
// registers); otherwise up to 8 warps per block and 2 blocks per SM (128 registers).
__host__ __device__ constexpr int lines_bound_threads(int ck) { return ck > 0 ? 32 * ck : 32 * kLinesMaxChannels; }
__host__ __device__ constexpr int lines_min_blocks(int ck) { return ck == 3 ? 5 : (ck > 0 ? 65536 / (128 * 32 * ck) : 2); }

struct LinesGeom {
  int C = 0;               // channels = warps per block
  size_t off_misc = 0, smem = 0;
};

// Whether the whole-line kernel can run p: 32 x 32 planes, at most 8 channels, k <= 2, one draw and one
// noise set from the canonical stream (no caller noise, no input perturbation), add_noise / shaped_noise
// (not the step) with vectorised I/O (vec: the launcher's vec_ok). The caller decides whether it should
// (enough warps to fill the GPU).
inline bool lines_geometry(const NoiseProblem& p, bool vec, LinesGeom& g) {
  if (p.height != kLinesSide || p.width != kLinesSide) return false;
  if (p.channels < 1 || p.channels > kLinesMaxChannels || p.k > 2) return false;
  if (p.step_params != nullptr || perturbed(p) || p.draws != 1 || p.noise[0].data != nullptr || !vec) return false;
  if ((p.batch * p.frames + kLinesSlices - 1) / kLinesSlices > (int64_t)INT_MAX) return false;
  g.C = (int)p.channels;
  g.off_misc = align_up(8 * (size_t)g.C * kLinesSide * kLinesPitch, 16);
  g.smem = align_up(g.off_misc + 4 * kLinesMiscFloats, 16);
  return true;
}

cudaError_t launch_fused_lines32(const NoiseProblem& p, const LinesGeom& g, size_t smem_cap, cudaStream_t stream);

}  // namespace cuda
}  // namespace anisodiff
