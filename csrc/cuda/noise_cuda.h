// Launch interface of the fused CUDA noise kernels: a NoiseProblem (raw pointers, sizes, flags) and a
// cudaStream_t, no torch types, so the kernels (*.cu) compile with nvcc alone. The torch glue
// (ops_cuda.cpp) fills the problem, allocates the workspace a plan asks for and launches.
//
// Paths (see docs/cuda.md):
//   elementwise  no spectral weights and no per-sample normalisation: one thread per 4 pixels of a
//                sample (one Philox call serves 4 lanes), every channel, squeeze + mix in registers.
//   fused        spectral weights or per-sample normalisation, and a slab of the sample fits in shared
//                memory. Power-of-two planes of 256 - 4096 pixels (C <= 16, k <= 2) take
//                fused_spectral_pow2 (noise_spectral_pow2.cu: a block per complex plane, FFT passes in
//                registers) when its grid leaves >= 8 warps per SM (ANISODIFF_CUDA_PATH=fused_pow2 forces
//                it). 32 x 32 planes of the hot path (C <= 8, one draw, no perturbation) take
//                fused_spectral_lines32 first (noise_spectral_lines.cu: a warp per complex plane, whole
//                lines in registers) when the batch gives >= 8 of its warps per SM
//                (ANISODIFF_CUDA_PATH=fused_lines32 forces it). 128 x 128 planes of the hot path (C <= 4)
//                take fused_spectral_slabs128 (noise_spectral_pow2.cu: four 32-row slabs of a cluster per
//                complex plane, DSMEM gathers to column slabs and back). The others the general kernel
//                below (ANISODIFF_CUDA_PATH=fused_general or ANISODIFF_CUDA_CLUSTER forces it):
//                memory: one cluster of R <= 8 blocks per sample (a slab of H / R rows each), 2-D FFTs
//                with transposes through distributed shared memory, then the per-pixel epilogue.
//   two_pass     the planes do not fit: one CTA per (sample, channel pair) filters through a global
//                fp32 workspace, then the elementwise epilogue reads it.
// Input perturbation (NoiseProblem::perturb) runs on every path: n' = A(t) eps' is generated (and on the
// spectral paths filtered and normalised) like n, from the stream's draws D + d.
#pragma once

#include <cuda_runtime.h>

#include <stddef.h>

#include "anisodiff/problem.h"

namespace anisodiff {
namespace cuda {

enum class Path : int { kNone = 0, kElementwise = 1, kFused = 2, kTwoPass = 3 };

struct LaunchPlan {
  Path path = Path::kNone;
  size_t smem_bytes = 0;       // dynamic shared memory per CTA of the fused / two-pass filter kernel
  size_t smem_limit = 0;       // the device's opt-in shared memory per block
  size_t workspace_bytes = 0;  // global scratch the caller allocates on the stream's device
  int tile = 0;                // two-pass: complex elements per row / column tile in shared memory
  const char* error = nullptr; // set when the problem cannot run on this device
  // The launch itself (for performance models and reports): the kernel's name with its template
  // arguments as in the sources, grid and block (threads), cluster size (blocks of one sample on the
  // fused path, cudaLaunchKernelEx cluster dimension; 1: a plain launch), slab rows per fused block.
  // Two-pass: kernel is the filter, kernel2 the elementwise second pass.
  const char* kernel = nullptr;
  unsigned grid = 0;
  int block = 0;
  int cluster = 1;
  int rows_per_block = 0;
  const char* kernel2 = nullptr;
  unsigned grid2 = 0;
  int block2 = 0;
  // Input perturbation (add_noise with perturb != 0): the kernels' kPert instantiations run (the names
  // above leave that template flag out), filtering the perturbation's draws too on the spectral paths.
  bool perturbed = false;
  // Fused path: the power-of-two kernel (cluster = complex planes, block = H W / 8 threads).
  bool pow2 = false;
  // Fused path: the whole-line 32 x 32 kernel (block = C warps for two slices, no cluster).
  bool lines32 = false;
  // Fused path: the 128 x 128 slab kernel (cluster = 2 planes x 4 slabs of 32 rows).
  bool slabs128 = false;
};

// Chooses the path for `p` on `device` (the current device). The environment variable
// ANISODIFF_CUDA_PATH=two_pass forces the two-pass path for spectral problems (tests use it to cover
// the fallback on small planes).
LaunchPlan plan_launch(const NoiseProblem& p, int device);

// Enqueues the kernels of `plan` on `stream`. `workspace`: plan.workspace_bytes on the device (256-byte
// aligned), or nullptr when none is needed. No host synchronisation; returns the launch status.
cudaError_t launch(const NoiseProblem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream);

const char* path_name(Path path);

// Shared memory a fused (one CTA per sample) launch needs for [C, H, W] planes; compare with the
// device's opt-in limit (227 KiB on sm_90).
size_t fused_smem_bytes(int channels, int height, int width, bool spectral, int draws);
size_t device_smem_limit(int device);

}  // namespace cuda
}  // namespace anisodiff
