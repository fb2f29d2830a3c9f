// Spectral kernels (SAGD T_w and per-sample normalisation).
//
// fused:     one CTA per sample. The C channel planes sit in shared memory as ceil(C/2) complex planes
//            (channel 2q = real part, 2q + 1 = imaginary part of plane q: T_w is a real operator, so
//            the two separate exactly); 2-D Stockham FFT (rows, then columns), weights, inverse;
//            normalisation and gains; then the per-pixel epilogue writes the outputs.
// two-pass:  one CTA per (sample, channel pair) filters its complex plane through a global workspace
//            in tiles of rows / columns that fit in shared memory, and writes the finished noise
//            planes into the fp32 workspace [B, C, H, W]; the elementwise kernels do the rest.
#include "common.cuh"

namespace anisodiff {
namespace cuda {
namespace {

__device__ __forceinline__ float& plane_value(float2* planes, int HW, int c, int hw) {
  float* f = reinterpret_cast<float*>(planes + (size_t)(c >> 1) * HW + hw);
  return f[c & 1];
}

// KA: the most axes the epilogue handles (squeeze k or step_k <= KA).
template <int KA, bool kVec>
__global__ void __launch_bounds__(kSpectralThreads) fused_spectral(const NoiseProblem p, const SpectralGeom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int C = g.C, H = g.H, W = g.W, P = g.P, HW = H * W, CHW = C * HW;
  const int tid = threadIdx.x, nt = blockDim.x;
  const bool spectral = p.weights != nullptr;
  const FusedLayout L = fused_layout(C, H, W, spectral, p.draws);
  float2* tw_h = reinterpret_cast<float2*>(smem + L.tw_h);
  float2* tw_w = reinterpret_cast<float2*>(smem + L.tw_w);
  float2* buf_a = reinterpret_cast<float2*>(smem + L.buf_a);
  float2* buf_b = reinterpret_cast<float2*>(smem + L.buf_b);
  float* acc = reinterpret_cast<float*>(smem + L.acc);
  double* red = reinterpret_cast<double*>(smem + L.red);
  float* scale = reinterpret_cast<float*>(smem + L.scale);
  const int64_t b = blockIdx.x;
  const Stream st = read_stream(p);
  if (spectral) {
    build_twiddles(tw_h, H);
    build_twiddles(tw_w, W);
  }
  const Lines rows{P * H, P * H, W, 0, 1};  // line (q, h): W elements, contiguous
  const Lines cols{P * W, W, 1, HW, W};     // line (q, w): H elements, W apart
  float2* X = buf_a;
  for (int d = 0; d < p.draws; ++d) {
    // 1. white noise of draw d (an odd channel count leaves the last imaginary part zero)
    if (C & 1)
      for (int hw = tid; hw < HW; hw += nt) plane_value(buf_a, HW, C, hw) = 0.f;
    if (p.noise[d].data != nullptr) {
      const TensorArg& nz = p.noise[d];
      for (int li = tid; li < CHW; li += nt) {
        const int c = li / HW, hw = li - c * HW, h = hw / W, w = hw - h * W;
        plane_value(buf_a, HW, c, hw) = load_elem(nz, nz.index(b, c, h, w));
      }
    } else {
      generate_segments(
          st, (uint32_t)d, 1, CHW, [&](int) { return b * (int64_t)CHW; },
          [&](int, int li, float v) {
            const int c = li / HW;
            plane_value(buf_a, HW, c, li - c * HW) = v;
          });
    }
    __syncthreads();
    // 2. T_w: forward 2-D FFT, weights (with the inverse's 1 / HW), inverse
    X = buf_a;
    if (spectral) {
      X = fft_lines(X, X == buf_a ? buf_b : buf_a, W, g.fw, tw_w, 1.f, rows);
      X = fft_lines(X, X == buf_a ? buf_b : buf_a, H, g.fh, tw_h, 1.f, cols);
      const float* wd = p.weights + (size_t)d * HW;
      const float inv = 1.0f / (float)HW;
      for (int i = tid; i < P * HW; i += nt) {
        const float wv = __ldg(wd + i % HW) * inv;
        X[i].x *= wv;
        X[i].y *= wv;
      }
      __syncthreads();
      X = fft_lines(X, X == buf_a ? buf_b : buf_a, H, g.fh, tw_h, -1.f, cols);
      X = fft_lines(X, X == buf_a ? buf_b : buf_a, W, g.fw, tw_w, -1.f, rows);
    }
    // 3. per-plane normalisation, then the draw's gain (into acc when two draws add up)
    for (int c = 0; c < C; ++c) {
      float s = 1.f;
      if (p.per_sample_norm) s = plane_inv_std(HW, red, [&](int hw) { return plane_value(X, HW, c, hw); });
      if (tid == 0) scale[c] = s;
    }
    __syncthreads();
    if (p.draws > 1) {
      const float gamma = p.gammas[d];
      for (int li = tid; li < CHW; li += nt) {
        const int c = li / HW;
        const float v = plane_value(X, HW, c, li - c * HW) * scale[c];
        acc[li] = d == 0 ? v * gamma : acc[li] + gamma * v;
      }
      __syncthreads();
    }
  }
  const float gamma0 = p.gammas[0];
  auto value = [&](int c, int hw) -> float {
    if (p.draws > 1) return acc[c * HW + hw];
    return (plane_value(X, HW, c, hw) * scale[c]) * gamma0;
  };
  // 4. epilogue
  if (p.step_params != nullptr) {
    for (int hw = tid; hw < HW; hw += nt) {
      const int h = hw / W, w = hw - h * W;
      step_pixel<4, KA>(p, b, h, w, [&](int c) { return value(c, hw); });
    }
  } else {
    const int quads = (HW + 3) / 4;
    for (int j = tid; j < quads; j += nt) {
      const int hw0 = 4 * j, n = HW - hw0 < 4 ? HW - hw0 : 4;
      const QuadPos pos = kVec ? QuadPos{} : quad_pos(hw0, W);
      add_noise_quad<4, KA, kVec>(p, b, hw0, n, pos, [&](int c, float e[4]) {
#pragma unroll
        for (int l = 0; l < 4; ++l) e[l] = l < n ? value(c, hw0 + l) : 0.f;
      });
    }
  }
}

__global__ void __launch_bounds__(kSpectralThreads)
    two_pass_filter(const NoiseProblem p, const SpectralGeom g, float2* cws, float* ws) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int C = g.C, H = g.H, W = g.W, P = g.P, HW = H * W;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t bp = blockIdx.x, b = bp / P;
  const int c0 = 2 * (int)(bp - b * P);
  const int ncomp = c0 + 1 < C ? 2 : 1;
  const TileLayout L = tile_layout(H, W, g.tile);
  float2* tw_h = reinterpret_cast<float2*>(smem + L.tw_h);
  float2* tw_w = reinterpret_cast<float2*>(smem + L.tw_w);
  float2* ta = reinterpret_cast<float2*>(smem + L.tile_a);
  float2* tb = reinterpret_cast<float2*>(smem + L.tile_b);
  double* red = reinterpret_cast<double*>(smem + L.red);
  float2* plane = cws + bp * (int64_t)HW;  // written and read back by this CTA only
  const bool spectral = p.weights != nullptr;
  const Stream st = read_stream(p);
  if (spectral) {
    build_twiddles(tw_h, H);
    build_twiddles(tw_w, W);
  }
  __syncthreads();
  const int R = g.rows_per_tile, KC = g.cols_per_tile;
  for (int d = 0; d < p.draws; ++d) {
    // rows: white noise of channels c0 (real) and c0 + 1 (imaginary), forward FFT along W
    for (int h0 = 0; h0 < H; h0 += R) {
      const int rr = H - h0 < R ? H - h0 : R, n = rr * W;
      float* tf = reinterpret_cast<float*>(ta);
      if (ncomp == 1)
        for (int i = tid; i < n; i += nt) tf[2 * i + 1] = 0.f;
      if (p.noise[d].data != nullptr) {
        const TensorArg& nz = p.noise[d];
        for (int i = tid; i < ncomp * n; i += nt) {
          const int comp = i / n, rest = i - comp * n, r = rest / W, w = rest - r * W;
          tf[2 * rest + comp] = load_elem(nz, nz.index(b, c0 + comp, h0 + r, w));
        }
      } else {
        generate_segments(
            st, (uint32_t)d, ncomp * rr, W,
            [&](int s) {
              const int comp = s / rr, r = s - comp * rr;
              return ((b * C + c0 + comp) * H + h0 + r) * (int64_t)W;
            },
            [&](int s, int w, float v) {
              const int comp = s / rr, r = s - comp * rr;
              tf[2 * (r * W + w) + comp] = v;
            });
      }
      __syncthreads();
      const float2* T = spectral ? fft_lines(ta, tb, W, g.fw, tw_w, 1.f, Lines{rr, rr, W, 0, 1}) : ta;
      for (int i = tid; i < n; i += nt) plane[(int64_t)h0 * W + i] = T[i];
      __syncthreads();
    }
    if (spectral) {
      // columns: forward FFT along H, weights (with the inverse's 1 / HW), inverse
      const float* wd = p.weights + (int64_t)d * HW;
      const float inv = 1.0f / (float)HW;
      for (int w0 = 0; w0 < W; w0 += KC) {
        const int kc = W - w0 < KC ? W - w0 : KC, n = H * kc;
        for (int i = tid; i < n; i += nt) {
          const int h = i / kc, j = i - h * kc;
          ta[i] = plane[(int64_t)h * W + w0 + j];
        }
        __syncthreads();
        const Lines cl{kc, kc, 1, 0, kc};
        float2* T = fft_lines(ta, tb, H, g.fh, tw_h, 1.f, cl);
        for (int i = tid; i < n; i += nt) {
          const int h = i / kc, j = i - h * kc;
          const float wv = __ldg(wd + (int64_t)h * W + w0 + j) * inv;
          T[i].x *= wv;
          T[i].y *= wv;
        }
        __syncthreads();
        T = fft_lines(T, T == ta ? tb : ta, H, g.fh, tw_h, -1.f, cl);
        for (int i = tid; i < n; i += nt) {
          const int h = i / kc, j = i - h * kc;
          plane[(int64_t)h * W + w0 + j] = T[i];
        }
        __syncthreads();
      }
      // rows: inverse FFT along W
      for (int h0 = 0; h0 < H; h0 += R) {
        const int rr = H - h0 < R ? H - h0 : R, n = rr * W;
        for (int i = tid; i < n; i += nt) ta[i] = plane[(int64_t)h0 * W + i];
        __syncthreads();
        const float2* T = fft_lines(ta, tb, W, g.fw, tw_w, -1.f, Lines{rr, rr, W, 0, 1});
        for (int i = tid; i < n; i += nt) plane[(int64_t)h0 * W + i] = T[i];
        __syncthreads();
      }
    }
    // normalisation and gain into the workspace (the second draw adds on)
    const float gamma = p.gammas[d];
    for (int comp = 0; comp < ncomp; ++comp) {
      float s = 1.f;
      if (p.per_sample_norm)
        s = plane_inv_std(HW, red, [&](int i) {
          const float2 v = plane[i];
          return comp ? v.y : v.x;
        });
      float* dst = ws + (b * C + c0 + comp) * (int64_t)HW;
      for (int i = tid; i < HW; i += nt) {
        const float2 v = plane[i];
        const float x = (comp ? v.y : v.x) * s;
        dst[i] = d == 0 ? x * gamma : dst[i] + gamma * x;
      }
    }
    __syncthreads();  // the next draw overwrites the plane
  }
}

// The opt-in attribute is set to the device's limit (smem_cap), not to this launch's size: the attribute
// is per function, so two host threads launching the same kernel with different sizes would otherwise
// race (one lowering it between the other's set and launch). It is only a cap; the launch still
// reserves just `smem`.
template <class Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem, size_t smem_cap) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)(smem_cap > smem ? smem_cap : smem));
}

template <int KA, bool kVec>
cudaError_t launch_fused_kernel(const NoiseProblem& p, const SpectralGeom& g, size_t smem, size_t smem_cap,
                                cudaStream_t stream) {
  const cudaError_t err = allow_smem(fused_spectral<KA, kVec>, smem, smem_cap);
  if (err != cudaSuccess) return err;
  fused_spectral<KA, kVec><<<(unsigned)p.batch, kSpectralThreads, smem, stream>>>(p, g);
  return cudaGetLastError();
}

// The step epilogue has no vectorised I/O (vec is false for it).
template <int KA>
cudaError_t launch_fused_as(const NoiseProblem& p, const SpectralGeom& g, size_t smem, size_t smem_cap, bool vec,
                            cudaStream_t stream) {
  return vec ? launch_fused_kernel<KA, true>(p, g, smem, smem_cap, stream)
             : launch_fused_kernel<KA, false>(p, g, smem, smem_cap, stream);
}

}  // namespace

cudaError_t launch_fused(const NoiseProblem& p, const SpectralGeom& g, size_t smem, size_t smem_cap, bool vec,
                         cudaStream_t stream) {
  const int k = p.step_params != nullptr ? p.step_k : p.k;
  if (k <= 2) return launch_fused_as<2>(p, g, smem, smem_cap, vec, stream);
  return launch_fused_as<kMaxAxes>(p, g, smem, smem_cap, vec, stream);
}

cudaError_t launch_two_pass_filter(const NoiseProblem& p, const SpectralGeom& g, size_t smem, size_t smem_cap,
                                   float2* cws, float* ws, cudaStream_t stream) {
  const cudaError_t err = allow_smem(two_pass_filter, smem, smem_cap);
  if (err != cudaSuccess) return err;
  two_pass_filter<<<(unsigned)(p.batch * g.P), kSpectralThreads, smem, stream>>>(p, g, cws, ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace anisodiff
