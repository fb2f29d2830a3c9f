// Elementwise kernels: add_noise / shaped_noise without a spatial transform (one thread per 4
// consecutive pixels of a sample, every channel), the DDPM step without one (one thread per pixel),
// and the second pass of the two-pass path (the same kernels reading the filtered workspace).
#include <algorithm>
#include <climits>

#include "common.cuh"

namespace anisodiff {
namespace cuda {
namespace {

constexpr int kThreads = kElementwiseThreads;

// Blocks of 256 threads per SM the register budget is sized for: 3 (<= 85 registers) for the common
// variants (C <= 4 cached, k <= 2), which then compile without spills (ptxas left alone stopped at 64 /
// 80 registers and spilled 8-20 B); 1 for the 16-channel or 8-axis caches (176-220 registers).
constexpr int elementwise_min_blocks(int k_cache, int ka) { return k_cache > 4 || ka > 2 ? 1 : 3; }

// K: channels kept in registers between the squeeze's two passes (more are fetched again);
// KA: the most squeeze axes handled (0: no squeeze).
template <int K, int KA, bool kVec>
__global__ void __launch_bounds__(kThreads, elementwise_min_blocks(K, KA)) add_noise_elementwise(const NoiseProblem p, const float* ws) {
  const int64_t HW = p.height * p.width, C = p.channels, CHW = C * HW;
  const int64_t quads = (HW + 3) / 4, total = p.batch * quads;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  const bool ws_vec = HW % 4 == 0;  // the workspace is contiguous and 256-byte aligned
  // (b, quad) advanced by the grid stride without a 64-bit division per item (one per thread here)
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const Div64 dq = make_div64(quads), dw = make_div64(p.width);
  const int64_t stride_b = dq.div(stride), stride_j = stride - stride_b * quads;
  int64_t b = dq.div(first), j = first - b * quads;
  for (int64_t item = first; item < total; item += stride) {
    const int64_t hw0 = 4 * j;
    const int n = (int)(HW - hw0 < 4 ? HW - hw0 : 4);
    const QuadPos pos = kVec ? QuadPos{} : quad_pos(hw0, dw);
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
    b += stride_b;
    j += stride_j;
    if (j >= quads) {
      j -= quads;
      ++b;
    }
  }
}

// One thread per pixel: the step needs several channel vectors per pixel at once. Generated noise
// costs one Philox call per element here (4 lanes computed, one used).
template <int KA>
__global__ void __launch_bounds__(kThreads, KA > 2 ? 1 : 2) ddpm_step_elementwise(const NoiseProblem p, const float* ws) {
  const int64_t H = p.height, W = p.width, HW = H * W, C = p.channels, CHW = C * HW;
  const int64_t total = p.batch * HW;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const Div64 dhw = make_div64(HW), dw = make_div64(W);
  const int64_t stride_b = dhw.div(stride), stride_j = stride - stride_b * HW;
  int64_t b = dhw.div(first), hw = first - b * HW;
  for (int64_t item = first; item < total; item += stride, b += stride_b, hw += stride_j) {
    if (hw >= HW) {
      hw -= HW;
      ++b;
    }
    const int64_t h = dw.div(hw), w = hw - h * W;
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
