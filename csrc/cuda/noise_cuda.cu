// Host side of the CUDA ops: choosing the path, sizing shared memory and the workspace, launching.
#include "noise_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <climits>

#include "common.cuh"
#include "spectral_lines.cuh"
#include "spectral_pow2.cuh"

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
  if (p.frames > 1 && t.frame_stride % 4 != 0) return false;
  const size_t bytes = t.dtype == DType::kFloat32 ? 16 : 8;
  return reinterpret_cast<uintptr_t>(t.data) % bytes == 0;
}

bool vec_ok(const NoiseProblem& p, bool reads_noise) {
  if (p.step_params != nullptr) return false;  // the step kernels use per-pixel I/O
  bool ok = quad_ok(p.x0, p) && quad_ok(p.x_t, p) && quad_ok(p.out, p);
  if (reads_noise) ok = ok && quad_ok(p.noise[0], p);
  return ok;
}

bool force_general_fused() {
  const char* env = getenv("ANISODIFF_CUDA_PATH");
  return env != nullptr && strcmp(env, "fused_general") == 0;
}

bool force_pow2() {
  const char* env = getenv("ANISODIFF_CUDA_PATH");
  return env != nullptr && strcmp(env, "fused_pow2") == 0;
}

// The power-of-two kernel when its grid leaves at least this many warps resident per busy SM (issue
// needs warps; fewer, and the cluster kernel's row slabs, 4 warps per block on up to 8 SMs per
// sample, keep the SMs busier: B = 16 or 64 at 3 x 32 x 32, whose 4-warp blocks number 32 / 128).
constexpr int kPow2MinWarpsPerSm = 8;

// The power-of-two fused kernel's name: its template arguments as in the sources (LH = LW = 0: the
// run-time-size variant), from a table built once (thread-safe static initialisation).
const char* pow2_kernel_name(const NoiseProblem& p, bool vec, const Pow2Geom& g) {
  struct Names {
    // [KA 0/2][step][vec][pert][fixed size: none, 16, 32, 64][C compiled in (3 at 32, 4 at 64): no, or
    // yes with the tensors' dtype switched at run time (mixed), fp32, fp16, bf16 (launch_pow2_dtype)]
    char text[2][2][2][2][4][5][84];
    Names() {
      static const char* dts[5] = {"", ",dtype=any", ",dtype=fp32", ",dtype=fp16", ",dtype=bf16"};
      for (int a = 0; a < 2; ++a)
        for (int st = 0; st < 2; ++st)
          for (int v = 0; v < 2; ++v)
            for (int pe = 0; pe < 2; ++pe)
              for (int f = 0; f < 4; ++f)
                for (int ck = 0; ck < 5; ++ck)
                  snprintf(text[a][st][v][pe][f][ck], sizeof text[a][st][v][pe][f][ck],
                           "fused_spectral_pow2<KA=%d,step=%d,vec=%d,pert=%d,LH=%d,LW=%d,CK=%d%s>", 2 * a, st, v,
                           pe, f ? f + 3 : 0, f ? f + 3 : 0, ck ? (f == 2 ? 3 : 4) : 0,
                           dts[ck]);
    }
  };
  static const Names names;
  const bool step = p.step_params != nullptr, pert = g.sets > 1;
  const bool v = !step && vec;  // the launcher's choice (launch_fused_pow2)
  const int fixed = v && !pert && pow2_fixed_size(g.lh, g.lw) ? g.lh - 3 : 0;
  const int a = step ? 1 : (p.k == 0 ? 0 : 1);
  const bool ck = (fixed == 2 && p.channels == 3) || (fixed == 3 && p.channels == 4);  // launch_pow2_hot
  return names.text[a][step ? 1 : 0][v ? 1 : 0][pert ? 1 : 0][fixed][ck ? 2 + io_dtype(p) : 0];
}

const char* slabs_kernel_name(const NoiseProblem& p) {
  struct Names {
    char text[2][3][64];  // [KA 0/2][C at run time; C = 4 with fp32, bf16] (launch_fused_slabs128)
    Names() {
      static const char* tail[3] = {",CK=0", ",CK=4,dtype=fp32", ",CK=4,dtype=bf16"};
      for (int a = 0; a < 2; ++a)
        for (int ck = 0; ck < 3; ++ck)
          snprintf(text[a][ck], sizeof text[a][ck], "fused_spectral_slabs128<KA=%d%s>", 2 * a, tail[ck]);
    }
  };
  static const Names names;
  const int dt = io_dtype(p);
  const int ck = p.channels != 4 ? 0 : (dt == (int)DType::kFloat32 ? 1 : (dt == (int)DType::kBFloat16 ? 2 : 0));
  return names.text[p.k == 0 ? 0 : 1][ck];
}

bool force_lines32() {
  const char* env = getenv("ANISODIFF_CUDA_PATH");
  return env != nullptr && strcmp(env, "fused_lines32") == 0;
}

// The whole-line kernel when the batch gives at least this many of its warps per SM. Its warps have
// 32-way instruction-level parallelism in the FFTs (a whole line each), but 4x fewer of them per sample
// than fused_spectral_pow2's: smaller batches keep the latter (3 x 32 x 32: B >= 703 on 132 SMs).
constexpr int kLinesMinWarpsPerSm = 8;

const char* lines_kernel_name(const NoiseProblem& p) {
  struct Names {
    char text[2][5][64];  // [KA 0/2][C at run time; C = 3 with dtype any, fp32, fp16, bf16] (launch_lines_ka)
    Names() {
      static const char* dts[5] = {"", ",dtype=any", ",dtype=fp32", ",dtype=fp16", ",dtype=bf16"};
      for (int a = 0; a < 2; ++a)
        for (int ck = 0; ck < 5; ++ck)
          snprintf(text[a][ck], sizeof text[a][ck], "fused_spectral_lines32<KA=%d,CK=%d%s>", 2 * a, ck ? 3 : 0,
                   dts[ck]);
    }
  };
  static const Names names;
  return names.text[p.k == 0 ? 0 : 1][p.channels == 3 ? 2 + io_dtype(p) : 0];
}

bool force_two_pass() {
  const char* env = getenv("ANISODIFF_CUDA_PATH");
  return env != nullptr && strcmp(env, "two_pass") == 0;
}

size_t two_pass_offset(const NoiseProblem& p) {  // the fp32 sets [sets, slices, C, H, W] (two_pass_sets)
  return align_up(4 * (size_t)two_pass_sets(p) * (p.batch * p.frames) * p.channels * p.height * p.width, 256);
}

SpectralGeom geometry(const NoiseProblem& p, int tile, int cluster) {
  SpectralGeom g = {};
  g.C = (int)p.channels;
  g.H = (int)p.height;
  g.W = (int)p.width;
  g.P = (int)((p.channels + 1) / 2);
  g.fh = fft_factorize(g.H);
  g.fw = fft_factorize(g.W);
  g.tile = tile;
  g.rows_per_tile = tile > 0 ? std::max(1, std::min(g.H, tile / g.W)) : 0;
  g.cols_per_tile = tile > 0 ? std::max(1, std::min(g.W, tile / g.H)) : 0;
  g.R = cluster > 0 ? cluster : 1;
  if (cluster > 0) fused_layout(g, p.weights != nullptr, p.draws, perturbed(p));
  return g;
}

// Cluster sizes the fused path may take for an H x W plane: R <= 8 dividing H and W with at least one
// pixel per thread in a slab (R = 1 always). The sample's result is bit for bit the same for every R
// (row transforms, column transforms and the sums' order do not depend on it; see sample_sums), so
// the planner picks R from the batch: the smallest R that gives kFusedTargetBlocksPerSm blocks per SM
// for the grid and whose shared memory lets that many be resident, else the largest that fits. ANISODIFF_CUDA_CLUSTER=R forces R (tests) when it is a valid size.
constexpr int kFusedTargetBlocksPerSm = 4;
constexpr int kSmemPerSm = 228 * 1024;  // sm_90 (1 KiB of it reserved per block)

bool cluster_ok(int r, int64_t H, int64_t W) {
  return r == 1 || (r <= kMaxCluster && H % r == 0 && W % r == 0 && H * W / r >= kFusedThreads);
}

int fused_cluster_forced(int64_t H, int64_t W) {
  const char* env = getenv("ANISODIFF_CUDA_CLUSTER");
  if (env == nullptr) return 0;
  const int r = atoi(env);
  return r >= 1 && r <= kMaxCluster && H % r == 0 && W % r == 0 ? r : 0;  // may leave threads without a pixel
}

// The kernel launch_elementwise picks (names as in the sources' templates).
// two_pass_input: the second pass of the two-pass path (reads the filtered workspace).
void describe_elementwise(const NoiseProblem& p, bool vec, bool two_pass_input, int sms, const char*& kernel,
                          unsigned& grid, int& block) {
  const int64_t HW = p.height * p.width;
  if (p.step_params != nullptr) {
    kernel = p.step_k <= 2 ? "ddpm_step_elementwise<KA=2>" : "ddpm_step_elementwise<KA=8>";
    const ElementwiseLaunch L = elementwise_launch(p.batch * p.frames * HW, sms,
                                                   elementwise_residency(p, two_pass_input, vec));
    grid = L.grid;
    block = L.threads;
    return;
  }
  const ElementwiseLaunch L = elementwise_launch(p.batch * p.frames * ((HW + 3) / 4), sms,
                                                 elementwise_residency(p, two_pass_input, vec));
  grid = L.grid;
  block = L.threads;
  const int ck = fast_channels(p, two_pass_input, vec);
  if (ck > 0) {  // add_noise_fast<CK, KK, kPert, DT>, from a table built once (thread-safe static init)
    struct Names {
      char text[5][3][2][3][64];  // [CK 1, 2, 3, 4, 16][KK][pert][dtype]
      Names() {
        static const int cks[5] = {1, 2, 3, 4, 16};
        static const char* dts[3] = {"fp32", "fp16", "bf16"};  // DType's order
        for (int c = 0; c < 5; ++c)
          for (int k = 0; k < 3; ++k)
            for (int pe = 0; pe < 2; ++pe)
              for (int d = 0; d < 3; ++d)
                snprintf(text[c][k][pe][d], sizeof text[c][k][pe][d], "add_noise_fast<CK=%d,KK=%d,pert=%d,dtype=%s>",
                         cks[c], k, pe, dts[d]);
      }
    };
    static const Names names;
    kernel = names.text[ck == 16 ? 4 : ck - 1][p.k][perturbed(p) ? 1 : 0][io_dtype(p)];
    return;
  }
  static const char* names[2][5] = {
      {"add_noise_elementwise<K=4,KA=0,vec=0>", "add_noise_elementwise<K=4,KA=2,vec=0>",
       "add_noise_elementwise<K=16,KA=2,vec=0>", "add_noise_elementwise<K=4,KA=8,vec=0>",
       "add_noise_elementwise<K=16,KA=8,vec=0>"},
      {"add_noise_elementwise<K=4,KA=0,vec=1>", "add_noise_elementwise<K=4,KA=2,vec=1>",
       "add_noise_elementwise<K=16,KA=2,vec=1>", "add_noise_elementwise<K=4,KA=8,vec=1>",
       "add_noise_elementwise<K=16,KA=8,vec=1>"}};
  const bool few = p.channels <= 4;
  const int v = p.k == 0 ? 0 : (p.k <= 2 ? (few ? 1 : 2) : (few ? 3 : 4));
  kernel = names[vec ? 1 : 0][v];
}

const char* fused_kernel_name(const NoiseProblem& p) {
  if (p.step_params != nullptr)
    return p.step_k <= 2 ? "fused_spectral<KA=2,step=1>" : "fused_spectral<KA=8,step=1>";
  return p.k == 0 ? "fused_spectral<KA=0,step=0>"
                  : (p.k <= 2 ? "fused_spectral<KA=2,step=0>" : "fused_spectral<KA=8,step=0>");
}

}  // namespace

size_t device_smem_limit(int device) { return (size_t)cached_attribute(g_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device); }

size_t fused_smem_bytes(int channels, int height, int width, bool spectral, int draws) {
  NoiseProblem p;
  p.channels = channels;
  p.height = height;
  p.width = width;
  p.draws = draws;
  static const float dummy = 0.f;
  p.weights = spectral ? &dummy : nullptr;
  int r = kMaxCluster;  // the smallest footprint: the largest valid cluster
  while (r > 1 && !cluster_ok(r, height, width)) r /= 2;
  return geometry(p, 0, r).smem;
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
  if (p.batch == 0 || p.frames == 0 || p.channels == 0 || p.height == 0 || p.width == 0) return plan;
  const int64_t S = p.batch * p.frames;  // slices (problem.h): B x F of a [B, C, F, H, W] video
  plan.perturbed = perturbed(p);
  plan.smem_limit = device_smem_limit(device);
  const int sms = sm_count(device);
  if (p.weights == nullptr && !p.per_sample_norm) {
    plan.path = Path::kElementwise;
    describe_elementwise(p, vec_ok(p, true), false, sms, plan.kernel, plan.grid, plan.block);
    return plan;
  }
  // Plane kernels index a plane (and the fused kernel a whole sample) with 32-bit ints.
  const int64_t H = p.height, W = p.width, HW = H * W, C = p.channels;
  if (HW > INT_MAX / 2 || C > INT_MAX / 2 || two_pass_sets(p) * S * ((C + 1) / 2) > INT_MAX) {
    plan.error = "anisodiff CUDA kernel: a plane of more than 2^30 pixels (or a batch of more than 2^31 "
                 "channel pairs) is not supported with a spectral spec or per-sample normalisation";
    return plan;
  }
  // Sides that the CPU kernel would send through Bluestein (spectral.h) have no CUDA FFT yet.
  if (p.weights != nullptr && (bluestein_length((int)H) > 0 || bluestein_length((int)W) > 0)) {
    plan.error = "anisodiff CUDA kernel: spectral weights need plane sides whose prime factors are all <= 61 "
                 "(the CUDA FFT has no Bluestein transform for larger primes; the CPU and reference "
                 "backends take any size)";
    return plan;
  }
  Pow2Geom pg;
  const bool pow2 = !force_two_pass() && !force_general_fused() && fused_cluster_forced(H, W) == 0 &&
                    pow2_geometry(p, pg) && pg.smem <= plan.smem_limit;
  auto take_pow2 = [&]() {
    plan.path = Path::kFused;
    plan.pow2 = true;
    plan.smem_bytes = pg.smem;
    plan.kernel = pow2_kernel_name(p, vec_ok(p, false), pg);
    plan.grid = (unsigned)(S * pg.P);
    plan.block = pg.threads;
    plan.cluster = pg.P;
    plan.rows_per_block = (int)H;
    return plan;
  };
  SlabGeom sg;
  if (!force_two_pass() && !force_general_fused() && !force_pow2() && !force_lines32() &&
      fused_cluster_forced(H, W) == 0 && slab_geometry(p, vec_ok(p, false), sg) && sg.smem <= plan.smem_limit) {
    plan.path = Path::kFused;
    plan.slabs128 = true;
    plan.smem_bytes = sg.smem;
    plan.kernel = slabs_kernel_name(p);
    plan.grid = (unsigned)(S * sg.P * kSlabQ);
    plan.block = kSlabThreads;
    plan.cluster = sg.P * kSlabQ;
    plan.rows_per_block = kSlabRows;
    return plan;
  }
  LinesGeom lg;
  const bool lines = !force_two_pass() && !force_general_fused() && !force_pow2() && fused_cluster_forced(H, W) == 0 &&
                     lines_geometry(p, vec_ok(p, false), lg) && lg.smem <= plan.smem_limit;
  if (lines) {
    const int64_t sm = sms > 0 ? sms : 1, blocks = (S + kLinesSlices - 1) / kLinesSlices;
    if (force_lines32() || blocks * lg.C >= (int64_t)kLinesMinWarpsPerSm * sm) {
      plan.path = Path::kFused;
      plan.lines32 = true;
      plan.smem_bytes = lg.smem;
      plan.kernel = lines_kernel_name(p);
      plan.grid = (unsigned)blocks;
      plan.block = 32 * lg.C;
      plan.cluster = 1;
      plan.rows_per_block = (int)H;
      return plan;
    }
  }
  if (pow2) {
    const int64_t sm = sms > 0 ? sms : 1, blocks_per_sm = (S * pg.P + sm - 1) / sm;
    if (force_pow2() || blocks_per_sm * (pg.threads / 32) >= kPow2MinWarpsPerSm) return take_pow2();
  }
  if (C * HW <= INT_MAX / 2 && !force_two_pass()) {
    const int forced = fused_cluster_forced(H, W);
    const int64_t target = (int64_t)kFusedTargetBlocksPerSm * (sms > 0 ? sms : 1);
    int best = 0;
    // 16-block clusters (non-portable) only where 8 would leave fewer than kFusedTargetBlocksPerSm blocks
    // per SM by shared memory (16 x 64 x 64, 4 x 128 x 128 and up), never just to fill the GPU.
    const size_t smem8 = cluster_ok(8, H, W) ? geometry(p, 0, 8).smem : 0;
    const bool allow16 = smem8 > 0 && kSmemPerSm / (smem8 + 1024) < (size_t)kFusedTargetBlocksPerSm;
    for (int R = 1; R <= kMaxCluster; R *= 2) {
      if (forced != 0 ? R != forced : (!cluster_ok(R, H, W) || (R > kMaxPortableCluster && !allow16))) continue;
      const size_t smem = geometry(p, 0, R).smem;
      if (smem > plan.smem_limit || S * R > (int64_t)INT_MAX) continue;
      const int per_sm = (int)(kSmemPerSm / (smem + 1024));
      // A 16-block cluster must fit on half a GPC (2 blocks per SM): not every GPC of an H100 has 16
      // SMs free, and a cluster that cannot be co-scheduled fails to launch.
      if (R > kMaxPortableCluster && per_sm < 2) continue;
      best = R;
      if (S * R >= target && per_sm >= kFusedTargetBlocksPerSm) break;
    }
    if (best > 0) {
      const SpectralGeom g = geometry(p, 0, best);
      plan.path = Path::kFused;
      plan.smem_bytes = g.smem;
      plan.kernel = fused_kernel_name(p);
      plan.grid = (unsigned)(S * best);
      plan.block = kFusedThreads;
      plan.cluster = best;
      plan.rows_per_block = g.Hs;
      return plan;
    }
  }
  if (pow2) return take_pow2();
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
  plan.workspace_bytes = two_pass_offset(p) + 8 * (size_t)two_pass_sets(p) * S * ((C + 1) / 2) * HW;
  plan.kernel = "two_pass_filter";
  plan.grid = (unsigned)(two_pass_sets(p) * S * ((C + 1) / 2));
  plan.block = kSpectralThreads;
  describe_elementwise(p, vec_ok(p, false), true, sms, plan.kernel2, plan.grid2, plan.block2);
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
      if (plan.slabs128) {
        SlabGeom sg;
        if (!slab_geometry(p, vec_ok(p, false), sg)) return cudaErrorInvalidValue;
        return launch_fused_slabs128(p, sg, plan.smem_limit, stream);
      }
      if (plan.lines32) {
        LinesGeom lg;
        if (!lines_geometry(p, vec_ok(p, false), lg)) return cudaErrorInvalidValue;
        return launch_fused_lines32(p, lg, plan.smem_limit, stream);
      }
      if (plan.pow2) {
        Pow2Geom pg;
        if (!pow2_geometry(p, pg)) return cudaErrorInvalidValue;
        return launch_fused_pow2(p, pg, vec_ok(p, false), plan.smem_limit, stream);
      }
      return launch_fused(p, geometry(p, 0, plan.cluster), plan.smem_limit, stream);
    case Path::kTwoPass: {
      if (workspace == nullptr) return cudaErrorInvalidValue;
      float* ws = static_cast<float*>(workspace);
      float2* cws = reinterpret_cast<float2*>(static_cast<char*>(workspace) + two_pass_offset(p));
      err = launch_two_pass_filter(p, geometry(p, plan.tile, 0), plan.smem_bytes, plan.smem_limit, cws, ws, stream);
      if (err != cudaSuccess) return err;
      return launch_elementwise(p, ws, vec_ok(p, false), sm_count(device), stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace anisodiff
