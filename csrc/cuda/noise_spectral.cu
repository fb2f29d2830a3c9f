// Spectral kernels (SAGD T_w and per-sample normalisation).
//
// fused:     one thread-block CLUSTER of R <= 8 blocks (128 threads each) per sample; block r owns a slab
//            of H / R rows of every channel plane, planar in shared memory (one float plane per channel,
//            line pitches padded to odd lengths); pairs of channels of the same sample are the real and
//            imaginary parts of one complex FFT (T_w is a real operator, so the two separate exactly).
//            Row FFTs on the slab, a transpose through distributed shared memory to column slabs, column
//            FFTs, weights (DC bin zeroed; w(0) mean(e) added after the inverse), inverse, transpose back,
//            inverse rows; normalisation statistics summed over the cluster; then the per-pixel epilogue
//            of the slab (every channel of a pixel is in the block, so the squeeze is local).
// two-pass:  one CTA per (sample, channel pair) filters its complex plane through a global workspace
//            in tiles of rows / columns that fit in shared memory, and writes the finished noise
//            planes into the fp32 workspace [B, C, H, W]; the elementwise kernels do the rest.
// Input perturbation: both filter the perturbation's draws too (the fused kernel in the same
// cluster before the noise's, the two-pass filter in a second set of CTAs into a second workspace).
#include "common.cuh"

namespace anisodiff {
namespace cuda {
namespace {

// Per-plane sums over the whole SAMPLE (every block of the cluster), in an order fixed by (H, W)
// alone: segments of kSumSeg consecutive pixels of a row, then a row's segments, then the H rows in
// order, all in double. The result is the same for every cluster size R, so a sample's output does
// not depend on R (which the planner picks from the batch size). get(c, hl, w): the value at row hl
// of this block's slab. scratch: ceil(W / kSumSeg) x (C * Hs | 1) doubles of shared memory no peer
// reads (segment-major with an odd row count, so that neither the segments' writes nor the rows' reads
// share banks); rows: C * Hs doubles peers read (not reused within the launch); all: C * H doubles;
// tot[c]: the sums. Every thread of every block of the cluster calls it.
constexpr int kSumSeg = 8;
template <class Get>
__device__ __forceinline__ void sample_sums(const SpectralGeom& g, double* scratch, double* rows, double* all,
                                            double* tot, Get get) {
  const int C = g.C, Hs = g.Hs, W = g.W, H = g.H, R = g.R, nseg = (W + kSumSeg - 1) / kSumSeg;
  const int tid = threadIdx.x, nt = blockDim.x, CHq = (C * Hs) | 1;
  for (int it = tid; it < C * Hs * nseg; it += nt) {
    const int rest = g.dSeg.div(it), s = it - rest * nseg, c = g.dHs.div(rest), hl = rest - c * Hs;
    const int w1 = (s + 1) * kSumSeg < W ? (s + 1) * kSumSeg : W;
    double a = 0.0;
    for (int w = s * kSumSeg; w < w1; ++w) a += (double)get(c, hl, w);
    scratch[s * CHq + rest] = a;
  }
  __syncthreads();
  for (int it = tid; it < C * Hs; it += nt) {
    double a = 0.0;
    for (int s = 0; s < nseg; ++s) a += scratch[s * CHq + it];
    rows[it] = a;
  }
  if (R > 1) cluster_barrier(); else __syncthreads();
  for (int it = tid; it < C * H; it += nt) {
    const int c = g.dH.div(it), h = it - c * H, o = g.dHs.div(h);
    const double* src = R > 1 ? cluster_peer(rows, (unsigned)o) : rows;
    all[it] = src[c * Hs + (h - o * Hs)];
  }
  __syncthreads();
  for (int c = tid; c < C; c += nt) {
    double a = 0.0;
    for (int h = 0; h < H; ++h) a += all[c * H + h];
    tot[c] = a;
  }
  __syncthreads();
}

// One fused launch: block (b, r) = blockIdx.x (cluster of R blocks per sample b, rank r). See the
// layout in common.cuh (SpectralGeom / fused_layout) and docs/cuda.md. Phases per draw d:
//   1. white noise of the block's slab (rows r Hs .. r Hs + Hs - 1 of every channel) into planar planes
//   2. T_w: row FFTs; cluster barrier; gather the block's columns from the cluster's slabs (DSMEM);
//      column FFTs, weights with the DC bin zeroed (and the inverse's 1 / HW), inverse column FFTs;
//      cluster barrier; gather the block's rows back; inverse row FFTs; + w(0) * mean(e) per plane
//   3. per-plane std normalisation (statistics summed over the cluster), gains, second draw
// then the per-pixel epilogue of the block's slab (every channel of a pixel is in this block).
// KA: the most axes the epilogue handles (squeeze k or step_k <= KA); kStep: the ddpm_step epilogue;
// kPert: input perturbation (add_noise only): the perturbation's draws D + d of the stream go through
// the same phases first, their finished slab is kept in shared memory (pert), then the noise's draws.
template <int KA, bool kStep, bool kPert>
__global__ void __launch_bounds__(kFusedThreads, fused_min_blocks(KA, kStep))
    fused_spectral(const NoiseProblem p, const SpectralGeom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int C = g.C, H = g.H, W = g.W, P = g.P, R = g.R, Hs = g.Hs, Ws = g.Ws, Wp = g.Wp, Hp = g.Hp, PS = g.PS;
  const int HW = H * W, SL = Hs * W, NPL = 2 * P;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t slice = blockIdx.x / R;  // a cluster per slice (sample b, frame f)
  const int r = (int)(blockIdx.x - slice * R);
  const Slice sl = slice_of32(slice, p.frames);
  const int64_t b = sl.b;
  const bool spectral = p.weights != nullptr;
  float2* tw_h = reinterpret_cast<float2*>(smem + g.off_tw_h);
  float2* tw_w = reinterpret_cast<float2*>(smem + g.off_tw_w);
  float* const buf0 = reinterpret_cast<float*>(smem + g.off_buf);
  float* const buf1 = buf0 + (size_t)NPL * PS;
  float* const buf2 = buf1 + (size_t)NPL * PS;
  float* acc = reinterpret_cast<float*>(smem + g.off_acc);
  float* pert = reinterpret_cast<float*>(smem + g.off_pert);  // [C][SL], kPert only
  double* all = reinterpret_cast<double*>(smem + g.off_red);    // [C][H]
  double* part = reinterpret_cast<double*>(smem + g.off_part);  // [3 passes][C][Hs], read by peers
  double* mean = reinterpret_cast<double*>(smem + g.off_stat);
  double* tot = mean + C;
  float* scale = reinterpret_cast<float*>(tot + C);
  float* dcadd = scale + C;
  const Stream st = read_stream(p);
  if (spectral) {
    build_twiddles(tw_h, H);
    build_twiddles(tw_w, W);
  }
  // slab pixel i (row i / W, column i % W) in a plane buffer
  auto at = [&](int i) { const int hl = g.dW.div(i); return hl * Wp + (i - hl * W); };
  const PlanarLines rows{P * Hs, g.dHs, Wp, 2 * PS, g.dRowLines};
  const PlanarLines cols{P * Ws, g.dWs, Hp, 2 * PS, g.dColLines};
  float* X = buf0;
  // pass it: draw d of the perturbation (counter word D + d) for it < D when kPert, else draw d of the noise
  const int D = p.draws, passes = kPert ? 2 * D : D;
  for (int it = 0; it < passes; ++it) {
    const bool pert_pass = kPert && it < D;
    const int d = it >= D ? it - D : it;
    if (it > 0 && R > 1) cluster_barrier();  // peers may still read this block's buffers of the last pass
    X = buf0;
    float* scratch = buf1;  // a plane buffer no peer reads, for the sums (spectral: set below)
    // 1. white noise of draw d (the perturbation's always from the stream)
    if (C & 1)
      for (int i = tid; i < SL; i += nt) X[C * PS + at(i)] = 0.f;
    if (!pert_pass && p.noise[d].data != nullptr) {
      const TensorArg& nz = p.noise[d];
      for (int li = tid; li < C * SL; li += nt) {
        const int c = g.dSL.div(li), i = li - c * SL, hl = g.dW.div(i), w = i - hl * W;
        X[c * PS + hl * Wp + w] = load_elem(nz, elem_at(nz, sl, c, r * Hs + hl, w));
      }
    } else {
      generate_segments(
          st, (uint32_t)(pert_pass ? D + d : d), C, SL, [&](int c) { return stream_index(p, sl, c, (int64_t)r * SL); },
          [&](int c, int i, float v) { X[c * PS + at(i)] = v; }, [&](int it) { return g.dGen.div(it); });
    }
    __syncthreads();
    if (spectral) {
      const float dc = __ldg(p.weights + (size_t)d * HW);
      if (dc != 0.f) {  // the planes' means (buf2 is free until the column gather)
        sample_sums(g, reinterpret_cast<double*>(buf2), part + (size_t)(3 * it) * C * Hs, all, tot,
                    [&](int c, int hl, int w) { return X[c * PS + hl * Wp + w]; });
        for (int c = tid; c < C; c += nt) dcadd[c] = (float)(dc * (tot[c] / (double)HW));
      } else {
        for (int c = tid; c < C; c += nt) dcadd[c] = 0.f;
      }
      float* Xr = fft_planar(buf0, buf1, PS, W, g.sw, tw_w, 1.f, rows);
      float* Yr = Xr == buf0 ? buf1 : buf0;
      if (R > 1) cluster_barrier();  // every slab's row transforms (and DC partials) are complete
      // this block's columns r Ws .. r Ws + Ws - 1 of every plane, as column lines of the H rows
      for (int idx = tid; idx < NPL * Ws * H; idx += nt) {
        const int rest = g.dH.div(idx), h = idx - rest * H, pl = g.dWs.div(rest), wl = rest - pl * Ws;
        const int o = g.dHs.div(h);
        const int src = pl * PS + (h - o * Hs) * Wp + r * Ws + wl;
        const float* from = R > 1 ? cluster_peer(Xr, (unsigned)o) : Xr;
        buf2[pl * PS + wl * Hp + h] = from[src];
      }
      __syncthreads();
      float* Z = fft_planar(buf2, Yr, PS, H, g.sh, tw_h, 1.f, cols);
      const float* wd = p.weights + (size_t)d * HW;
      const float inv = 1.0f / (float)HW;
      for (int idx = tid; idx < Ws * H; idx += nt) {
        const int h = g.dWs.div(idx), wl = idx - h * Ws, w = r * Ws + wl;
        const float wv = (h == 0 && w == 0) ? 0.f : __ldg(wd + (size_t)h * W + w) * inv;  // DC: below
        for (int q = 0; q < P; ++q) {
          Z[2 * q * PS + wl * Hp + h] *= wv;
          Z[(2 * q + 1) * PS + wl * Hp + h] *= wv;
        }
      }
      __syncthreads();
      Z = fft_planar(Z, Z == buf2 ? Yr : buf2, PS, H, g.sh, tw_h, -1.f, cols);
      if (R > 1) cluster_barrier();  // every block's column transforms are complete, Xr is read
      for (int idx = tid; idx < NPL * Hs * W; idx += nt) {
        const int rest = g.dW.div(idx), w = idx - rest * W, pl = g.dHs.div(rest), hl = rest - pl * Hs;
        const int o = g.dWs.div(w);
        const float* from = R > 1 ? cluster_peer(Z, (unsigned)o) : Z;
        Xr[pl * PS + hl * Wp + w] = from[pl * PS + (w - o * Ws) * Hp + r * Hs + hl];
      }
      __syncthreads();
      // peers may still read Z: the inverse rows ping-pong with the other free buffer
      float* F = Z == buf2 ? Yr : buf2;
      X = fft_planar(Xr, F, PS, W, g.sw, tw_w, -1.f, rows);
      scratch = X == Xr ? F : Xr;
      // + w(0) mean(e), the DC bin outside the FFT, is added where the values are read (after the
      // statistics, as the CPU kernel's finish_plane: a huge DC term would cost the std its accuracy)
    } else {
      for (int c = tid; c < C; c += nt) dcadd[c] = 0.f;
    }
    // 3. per-plane normalisation (mean, then centred sum of squares, over the cluster), gains
    if (p.per_sample_norm) {
      double* sc = reinterpret_cast<double*>(scratch);
      sample_sums(g, sc, part + (size_t)(3 * it + 1) * C * Hs, all, tot,
                  [&](int c, int hl, int w) { return X[c * PS + hl * Wp + w]; });
      for (int c = tid; c < C; c += nt) mean[c] = tot[c] / (double)HW;
      __syncthreads();
      sample_sums(g, sc, part + (size_t)(3 * it + 2) * C * Hs, all, tot, [&](int c, int hl, int w) {
        const double v = (double)X[c * PS + hl * Wp + w] - mean[c];
        return v * v;
      });
      for (int c = tid; c < C; c += nt) scale[c] = (float)(1.0 / (sqrt(tot[c] / (double)HW) + 1e-8));
    } else {
      for (int c = tid; c < C; c += nt) scale[c] = 1.f;
    }
    __syncthreads();
    if (pert_pass) {  // the perturbation's sum_d gamma_d N(T_w eps'_d), finished
      const float gamma = p.gammas[d];
      for (int li = tid; li < C * SL; li += nt) {
        const int c = g.dSL.div(li);
        const float v = (X[c * PS + at(li - c * SL)] + dcadd[c]) * scale[c];
        pert[li] = d == 0 ? v * gamma : pert[li] + gamma * v;
      }
      __syncthreads();
    } else if (p.draws > 1) {
      const float gamma = p.gammas[d];
      for (int li = tid; li < C * SL; li += nt) {
        const int c = g.dSL.div(li);
        const float v = (X[c * PS + at(li - c * SL)] + dcadd[c]) * scale[c];
        acc[li] = d == 0 ? v * gamma : acc[li] + gamma * v;
      }
      __syncthreads();
    }
  }
  const float gamma0 = p.gammas[0];
  const bool two = p.draws > 1;
  const SampleCoef coef = kStep ? SampleCoef{} : sample_coef(p, b);
  const float* fin = X;
  // 4. epilogue: one pixel per thread, every channel (coalesced rows of the slab)
  for (int i = tid; i < SL; i += nt) {
    const int hl = g.dW.div(i), w = i - hl * W, h = r * Hs + hl;
    const int pos = hl * Wp + w;
    auto value = [&](int c) -> float {
      return two ? acc[c * SL + i] : ((fin[c * PS + pos] + dcadd[c]) * scale[c]) * gamma0;
    };
    if constexpr (kStep) {
      step_pixel<4, KA>(p, sl, h, w, value);
    } else {
      add_noise_pixel<KA, kPert>(p, coef, sl, h, w, value, [&](int c) -> float { return pert[c * SL + i]; });
    }
  }
  if (R > 1) cluster_barrier();  // no block leaves while a peer may still read its shared memory
}

// A CTA per (set, slice, channel pair): set 1 (perturbed problems only, the grid's second half)
// filters the input perturbation's draws D + d of the stream into the workspace's second half
// [slices, C, H, W] (two_pass_sets).
__global__ void __launch_bounds__(kSpectralThreads)
    two_pass_filter(const NoiseProblem p, const SpectralGeom g, float2* cws, float* ws) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int C = g.C, H = g.H, W = g.W, P = g.P, HW = H * W;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t pairs = p.batch * p.frames * P;  // CTAs per set
  const int set = (int64_t)blockIdx.x >= pairs ? 1 : 0;
  const int64_t bp = (int64_t)blockIdx.x - set * pairs, slice = bp / P;
  const int c0 = 2 * (int)(bp - slice * P);
  const Slice sl = slice_of32(slice, p.frames);
  const int ncomp = c0 + 1 < C ? 2 : 1;
  const TileLayout L = tile_layout(H, W, g.tile);
  float2* tw_h = reinterpret_cast<float2*>(smem + L.tw_h);
  float2* tw_w = reinterpret_cast<float2*>(smem + L.tw_w);
  float2* ta = reinterpret_cast<float2*>(smem + L.tile_a);
  float2* tb = reinterpret_cast<float2*>(smem + L.tile_b);
  double* red = reinterpret_cast<double*>(smem + L.red);
  float2* plane = cws + (int64_t)blockIdx.x * HW;  // written and read back by this CTA only
  const bool spectral = p.weights != nullptr;
  const Stream st = read_stream(p);
  if (spectral) {
    build_twiddles(tw_h, H);
    build_twiddles(tw_w, W);
  }
  __syncthreads();
  const int R = g.rows_per_tile, KC = g.cols_per_tile;
  const int64_t s0 = stream_index(p, sl, c0, 0), cstride = p.frames * (int64_t)HW;  // stream: c0, c0 + 1
  for (int d = 0; d < p.draws; ++d) {
    const float dc = spectral ? __ldg(p.weights + (int64_t)d * HW) : 0.f;
    double sum_re = 0.0, sum_im = 0.0;  // this thread's part of the planes' sums (the DC term)
    // rows: white noise of channels c0 (real) and c0 + 1 (imaginary), forward FFT along W
    for (int h0 = 0; h0 < H; h0 += R) {
      const int rr = H - h0 < R ? H - h0 : R, n = rr * W;
      float* tf = reinterpret_cast<float*>(ta);
      if (ncomp == 1)
        for (int i = tid; i < n; i += nt) tf[2 * i + 1] = 0.f;
      if (set == 0 && p.noise[d].data != nullptr) {  // the perturbation's draws come from the stream
        const TensorArg& nz = p.noise[d];
        for (int i = tid; i < ncomp * n; i += nt) {
          const int comp = i / n, rest = i - comp * n, r = rest / W, w = rest - r * W;
          tf[2 * rest + comp] = load_elem(nz, elem_at(nz, sl, c0 + comp, h0 + r, w));
        }
      } else {
        generate_segments(
            st, (uint32_t)(set * p.draws + d), ncomp * rr, W,
            [&](int s) {
              const int comp = s / rr, r = s - comp * rr;
              return s0 + comp * cstride + (int64_t)(h0 + r) * W;
            },
            [&](int s, int w, float v) {
              const int comp = s / rr, r = s - comp * rr;
              tf[2 * (r * W + w) + comp] = v;
            });
      }
      __syncthreads();
      if (dc != 0.f)
        for (int i = tid; i < n; i += nt) {
          sum_re += (double)ta[i].x;
          sum_im += (double)ta[i].y;
        }
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
          const float wv = (h == 0 && w0 + j == 0) ? 0.f : __ldg(wd + (int64_t)h * W + w0 + j) * inv;  // DC: below
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
    // + w(0) mean(e) (the DC bin outside the FFT, as the CPU kernel), normalisation and gain into
    // the workspace (the second draw adds on)
    float dcadd[2] = {0.f, 0.f};
    if (dc != 0.f) {
      dcadd[0] = (float)(dc * (block_sum(sum_re, red) / (double)HW));
      dcadd[1] = (float)(dc * (block_sum(sum_im, red) / (double)HW));
    }
    const float gamma = p.gammas[d];
    for (int comp = 0; comp < ncomp; ++comp) {
      const float add = comp ? dcadd[1] : dcadd[0];
      float s = 1.f;
      if (p.per_sample_norm)
        s = plane_inv_std(HW, red, [&](int i) {  // without the DC term (the CPU's finish_plane)
          const float2 v = plane[i];
          return comp ? v.y : v.x;
        });
      float* dst = ws + ((set * p.batch * p.frames + slice) * C + c0 + comp) * (int64_t)HW;  // [sets, slices, C, H, W]
      for (int i = tid; i < HW; i += nt) {
        const float2 v = plane[i];
        const float x = ((comp ? v.y : v.x) + add) * s;
        dst[i] = d == 0 ? x * gamma : dst[i] + gamma * x;
      }
    }
    __syncthreads();  // the next draw overwrites the plane
  }
}


template <int KA, bool kStep, bool kPert>
cudaError_t launch_fused_kernel(const NoiseProblem& p, const SpectralGeom& g, size_t smem_cap, cudaStream_t stream) {
  cudaError_t err = allow_smem(fused_spectral<KA, kStep, kPert>, g.smem, smem_cap);
  if (err != cudaSuccess) return err;
  if (g.R > kMaxPortableCluster) {
    err = cudaFuncSetAttribute(fused_spectral<KA, kStep, kPert>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
  }
  return launch_clusters(fused_spectral<KA, kStep, kPert>, (unsigned)(p.batch * p.frames * g.R), kFusedThreads, g.smem,
                         (unsigned)g.R, stream, p, g);
}

}  // namespace

cudaError_t launch_fused(const NoiseProblem& p, const SpectralGeom& g, size_t smem_cap, cudaStream_t stream) {
  const bool step = p.step_params != nullptr;
  const int k = step ? p.step_k : p.k;
  if (step) return k <= 2 ? launch_fused_kernel<2, true, false>(p, g, smem_cap, stream)
                          : launch_fused_kernel<kMaxAxes, true, false>(p, g, smem_cap, stream);
  if (perturbed(p)) {
    if (k == 0) return launch_fused_kernel<0, false, true>(p, g, smem_cap, stream);
    return k <= 2 ? launch_fused_kernel<2, false, true>(p, g, smem_cap, stream)
                  : launch_fused_kernel<kMaxAxes, false, true>(p, g, smem_cap, stream);
  }
  if (k == 0) return launch_fused_kernel<0, false, false>(p, g, smem_cap, stream);
  return k <= 2 ? launch_fused_kernel<2, false, false>(p, g, smem_cap, stream)
                : launch_fused_kernel<kMaxAxes, false, false>(p, g, smem_cap, stream);
}

cudaError_t launch_two_pass_filter(const NoiseProblem& p, const SpectralGeom& g, size_t smem, size_t smem_cap,
                                   float2* cws, float* ws, cudaStream_t stream) {
  const cudaError_t err = allow_smem(two_pass_filter, smem, smem_cap);
  if (err != cudaSuccess) return err;
  two_pass_filter<<<(unsigned)(two_pass_sets(p) * p.batch * p.frames * g.P), kSpectralThreads, smem, stream>>>(p, g, cws, ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace anisodiff
