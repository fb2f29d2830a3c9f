// Elementwise kernels: add_noise / shaped_noise without a spatial transform (one thread per 4
// consecutive pixels of a sample, every channel), the DDPM step without one (one thread per pixel),
// and the second pass of the two-pass path (the same kernels reading the filtered workspace).
#include <algorithm>

#include "common.cuh"

namespace anisodiff {
namespace cuda {
namespace {

constexpr int kThreads = kElementwiseThreads;

// K: channels kept in registers between the squeeze's two passes (more are fetched again);
// KA: the most squeeze axes handled (0: no squeeze).
template <int K, int KA, bool kVec>
__global__ void __launch_bounds__(kThreads) add_noise_elementwise(const NoiseProblem p, const float* ws) {
  const int64_t HW = p.height * p.width, C = p.channels, CHW = C * HW;
  const int64_t quads = (HW + 3) / 4, total = p.batch * quads;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  const bool ws_vec = HW % 4 == 0;  // the workspace is contiguous and 256-byte aligned
  for (int64_t item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; item < total;
       item += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = item / quads, hw0 = 4 * (item - b * quads);
    const int n = (int)(HW - hw0 < 4 ? HW - hw0 : 4);
    const QuadPos pos = kVec ? QuadPos{} : quad_pos(hw0, p.width);
    auto fetch = [&](int c, float e[4]) {
      if (ws != nullptr) {  // two-pass: filtered, normalised and scaled already
        const float* src = ws + (b * C + c) * HW + hw0;
        if (ws_vec) {
          const float4 v = *reinterpret_cast<const float4*>(src);
          e[0] = v.x;
          e[1] = v.y;
          e[2] = v.z;
          e[3] = v.w;
        } else {
#pragma unroll
          for (int l = 0; l < 4; ++l) e[l] = l < n ? src[l] : 0.f;
        }
        return;
      }
      if (p.noise[0].data != nullptr) {
        load_quad<kVec>(p.noise[0], b, c, hw0, n, pos, e);
      } else {
        stream_quad(st, 0, b * CHW + c * HW + hw0, n, e);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) e[l] *= gamma;  // a scalar spatial gain (x 1 is exact)
    };
    add_noise_quad<K, KA, kVec>(p, b, hw0, n, pos, fetch);
  }
}

// One thread per pixel: the step needs several channel vectors per pixel at once. Generated noise
// costs one Philox call per element here (4 lanes computed, one used).
template <int KA>
__global__ void __launch_bounds__(kThreads) ddpm_step_elementwise(const NoiseProblem p, const float* ws) {
  const int64_t H = p.height, W = p.width, HW = H * W, C = p.channels, CHW = C * HW;
  const int64_t total = p.batch * HW;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  for (int64_t item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; item < total;
       item += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = item / HW, hw = item - b * HW;
    const int64_t h = hw / W, w = hw - h * W;
    auto noise = [&](int c) -> float {
      if (ws != nullptr) return ws[(b * C + c) * HW + hw];
      if (p.noise[0].data != nullptr) return load_elem(p.noise[0], p.noise[0].index(b, c, h, w)) * gamma;
      return stream_normal(st, 0, b * CHW + c * HW + hw) * gamma;
    };
    step_pixel<4, KA>(p, b, h, w, noise);
  }
}

unsigned grid_for(int64_t items, int sm_count) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  const int64_t cap = (int64_t)(sm_count > 0 ? sm_count : 1) * 32;  // grid-stride beyond this
  return (unsigned)std::max<int64_t>(1, std::min(blocks, cap));
}

template <int K, int KA>
void launch_add(const NoiseProblem& p, const float* ws, bool vec, unsigned grid, cudaStream_t stream) {
  if (vec) {
    add_noise_elementwise<K, KA, true><<<grid, kThreads, 0, stream>>>(p, ws);
  } else {
    add_noise_elementwise<K, KA, false><<<grid, kThreads, 0, stream>>>(p, ws);
  }
}

}  // namespace

cudaError_t launch_elementwise(const NoiseProblem& p, const float* ws, bool vec, int sm_count,
                               cudaStream_t stream) {
  const int64_t HW = p.height * p.width;
  if (p.step_params != nullptr) {
    const unsigned grid = grid_for(p.batch * HW, sm_count);
    if (p.step_k <= 2) {
      ddpm_step_elementwise<2><<<grid, kThreads, 0, stream>>>(p, ws);
    } else {
      ddpm_step_elementwise<kMaxAxes><<<grid, kThreads, 0, stream>>>(p, ws);
    }
    return cudaGetLastError();
  }
  const unsigned grid = grid_for(p.batch * ((HW + 3) / 4), sm_count);
  const bool few = p.channels <= 4;
  if (p.k == 0) {
    launch_add<4, 0>(p, ws, vec, grid, stream);
  } else if (p.k <= 2) {
    if (few) launch_add<4, 2>(p, ws, vec, grid, stream);
    else launch_add<16, 2>(p, ws, vec, grid, stream);
  } else {
    if (few) launch_add<4, kMaxAxes>(p, ws, vec, grid, stream);
    else launch_add<16, kMaxAxes>(p, ws, vec, grid, stream);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace anisodiff
