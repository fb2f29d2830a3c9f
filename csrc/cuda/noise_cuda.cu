// Host side of the CUDA ops: choosing the path, sizing shared memory and the workspace, launching.
#include "noise_cuda.h"

#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <climits>

#include "common.cuh"

namespace anisodiff {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;
constexpr int kMinTile = 8192;  // two-pass tile: complex elements per row / column tile

int cached_attribute(std::atomic<int>* cache, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= kMaxDevices) {
    int v = 0;
    cudaDeviceGetAttribute(&v, attr, device);
    return v;
  }
  int v = cache[device].load(std::memory_order_relaxed);
  if (v < 0) {
    v = 0;
    if (cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess) {
      cudaGetLastError();  // clear it; 0 makes every shared-memory path report "too large"
      v = 0;
    }
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

std::atomic<int> g_smem_optin[kMaxDevices];
std::atomic<int> g_sm_count[kMaxDevices];
struct CacheInit {
  CacheInit() {
    for (int i = 0; i < kMaxDevices; ++i) {
      g_smem_optin[i].store(-1);
      g_sm_count[i].store(-1);
    }
  }
} g_cache_init;

int sm_count(int device) { return cached_attribute(g_sm_count, cudaDevAttrMultiProcessorCount, device); }

// True when `t` can be read / written 4 pixels at a time (see load_quad): plane-contiguous, with
// batch / channel strides and base address aligned to 4 elements, and H * W % 4 == 0.
bool quad_ok(const TensorArg& t, const NoiseProblem& p) {
  if (t.data == nullptr) return true;
  const int64_t H = p.height, W = p.width;
  if ((H * W) % 4 != 0) return false;
  if (!(W == 1 || t.stride[3] == 1) || !(H == 1 || t.stride[2] == W)) return false;
  if (!(p.batch == 1 || t.stride[0] % 4 == 0) || !(p.channels == 1 || t.stride[1] % 4 == 0)) return false;
  const size_t bytes = t.dtype == DType::kFloat32 ? 16 : 8;
  return reinterpret_cast<uintptr_t>(t.data) % bytes == 0;
}

bool vec_ok(const NoiseProblem& p, bool reads_noise) {
  if (p.step_params != nullptr) return false;  // the step kernels use per-pixel I/O
  bool ok = quad_ok(p.x0, p) && quad_ok(p.x_t, p) && quad_ok(p.out, p);
  if (reads_noise) ok = ok && quad_ok(p.noise[0], p);
  return ok;
}

bool force_two_pass() {
  const char* env = getenv("ANISODIFF_CUDA_PATH");
  return env != nullptr && strcmp(env, "two_pass") == 0;
}

size_t two_pass_offset(const NoiseProblem& p) {
  return align_up(4 * (size_t)p.batch * p.channels * p.height * p.width, 256);
}

SpectralGeom geometry(const NoiseProblem& p, int tile) {
  SpectralGeom g;
  g.C = (int)p.channels;
  g.H = (int)p.height;
  g.W = (int)p.width;
  g.P = (int)((p.channels + 1) / 2);
  g.fh = fft_factorize(g.H);
  g.fw = fft_factorize(g.W);
  g.tile = tile;
  g.rows_per_tile = tile > 0 ? std::max(1, std::min(g.H, tile / g.W)) : 0;
  g.cols_per_tile = tile > 0 ? std::max(1, std::min(g.W, tile / g.H)) : 0;
  return g;
}

}  // namespace

size_t device_smem_limit(int device) { return (size_t)cached_attribute(g_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device); }

size_t fused_smem_bytes(int channels, int height, int width, bool spectral, int draws) {
  return fused_layout(channels, height, width, spectral, draws).total;
}

const char* path_name(Path path) {
  switch (path) {
    case Path::kElementwise: return "elementwise";
    case Path::kFused: return "fused";
    case Path::kTwoPass: return "two_pass";
    default: return "none";
  }
}

LaunchPlan plan_launch(const NoiseProblem& p, int device) {
  LaunchPlan plan;
  if (p.batch == 0 || p.channels == 0 || p.height == 0 || p.width == 0) return plan;
  plan.smem_limit = device_smem_limit(device);
  if (p.weights == nullptr && !p.per_sample_norm) {
    plan.path = Path::kElementwise;
    return plan;
  }
  // Plane kernels index a plane (and the fused kernel a whole sample) with 32-bit ints.
  const int64_t H = p.height, W = p.width, HW = H * W, C = p.channels;
  if (HW > INT_MAX / 2 || C > INT_MAX / 2 || p.batch * ((C + 1) / 2) > INT_MAX) {
    plan.error = "anisodiff CUDA kernel: a plane of more than 2^30 pixels (or a batch of more than 2^31 "
                 "channel pairs) is not supported with a spectral spec or per-sample normalisation";
    return plan;
  }
  if (C * HW <= INT_MAX / 2 && !force_two_pass()) {
    const size_t fused = fused_smem_bytes((int)C, (int)H, (int)W, p.weights != nullptr, p.draws);
    if (fused <= plan.smem_limit) {
      plan.path = Path::kFused;
      plan.smem_bytes = fused;
      return plan;
    }
  }
  // Two-pass: tiles of whole rows / columns must fit in shared memory.
  const int longest = (int)std::max(H, W);
  int tile = std::max(kMinTile, longest);
  if (tile_layout((int)H, (int)W, tile).total > plan.smem_limit) tile = longest;
  const size_t smem = tile_layout((int)H, (int)W, tile).total;
  if (smem > plan.smem_limit) {
    plan.error = "anisodiff CUDA kernel: the plane is too large for the spectral path (a row and a column "
                 "of the plane, twice, plus twiddles must fit in the device's shared memory per block; "
                 "max(H, W) up to about 7000 on sm_90)";
    return plan;
  }
  plan.path = Path::kTwoPass;
  plan.smem_bytes = smem;
  plan.tile = tile;
  plan.workspace_bytes = two_pass_offset(p) + 8 * (size_t)p.batch * ((C + 1) / 2) * HW;
  return plan;
}

cudaError_t launch(const NoiseProblem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  switch (plan.path) {
    case Path::kNone:
      return cudaSuccess;
    case Path::kElementwise:
      return launch_elementwise(p, nullptr, vec_ok(p, true), sm_count(device), stream);
    case Path::kFused:
      return launch_fused(p, geometry(p, 0), plan.smem_bytes, plan.smem_limit, vec_ok(p, false), stream);
    case Path::kTwoPass: {
      if (workspace == nullptr) return cudaErrorInvalidValue;
      float* ws = static_cast<float*>(workspace);
      float2* cws = reinterpret_cast<float2*>(static_cast<char*>(workspace) + two_pass_offset(p));
      err = launch_two_pass_filter(p, geometry(p, plan.tile), plan.smem_bytes, plan.smem_limit, cws, ws, stream);
      if (err != cudaSuccess) return err;
      return launch_elementwise(p, ws, vec_ok(p, false), sm_count(device), stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace anisodiff
