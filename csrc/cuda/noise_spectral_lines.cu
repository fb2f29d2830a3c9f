// The whole-line fused spectral kernel for 32 x 32 planes (CIFAR / ImageNet-32 images) on large batches:
// every thread holds a whole line (32 complex values) in registers and runs its 32-point FFTs there,
// with the twiddles as compile-time constants; a complex plane is one warp's (line l = lane l), so the
// shared memory only transposes (rows <-> columns) and the statistics are warp reductions.
//
// A block takes two slices (samples or frames) and their 2 C real planes as C complex ones, warp q
// holding real planes 2q and 2q + 1 (real plane r = slice r / C, channel r % C): T_w is a real operator,
// so the two parts separate exactly, and an odd channel count leaves no half-empty plane (channel 2 of
// the first slice pairs with channel 0 of the second at C = 3). Per warp:
//   1. white noise: lane l draws row l of both real planes (8 Philox quads each) into registers
//   2. row FFTs in registers; rows -> shared memory -> columns (one barrier)
//   3. column FFTs, the weights (DC bin zeroed; w(0) mean(e) is added after the inverse), inverse column
//      FFTs, all in registers; columns -> shared memory -> rows (one barrier)
//   4. inverse row FFTs; statistics (warp sums in double), (v + DC) * scale * gain, rows into shared
//      memory (each thread its own positions)
//   5. after a barrier, the block's threads run the epilogue of both slices' pixel quads, reading every
//      channel from the block's planes.
// It is the hot path's kernel where the batch gives enough warps (noise_cuda.cu); it has 4x fewer warps
// per sample than fused_spectral_pow2 (noise_spectral_pow2.cu), which serves the smaller batches.
#include "spectral_lines.cuh"

namespace anisodiff {
namespace cuda {
namespace {

// a * exp(-sg 2 pi i e / 32). e is a constant wherever this is called (unrolled loops): the branches and
// the table lookups (anisodiff/twiddle.h) fold, the quarter turns cost no multiplications.
__device__ __forceinline__ float2 rotate32(float2 a, int e, float sg) {
  e &= 31;
  if (e == 0) return a;
  if (e == 16) return make_float2(-a.x, -a.y);
  if (e == 8) return sg > 0.f ? make_float2(a.y, -a.x) : make_float2(-a.y, a.x);
  if (e == 24) return sg > 0.f ? make_float2(-a.y, a.x) : make_float2(a.y, -a.x);
  const int q = e >> 3, r = e & 7;
  const float cr = quarter_cos128(4 * r), sr = quarter_cos128(32 - 4 * r);  // cos, sin of r pi / 16
  const float c = q == 0 ? cr : (q == 1 ? -sr : (q == 2 ? -cr : sr));
  const float s = q == 0 ? sr : (q == 1 ? cr : (q == 2 ? -sr : -cr));
  const float ss = sg * s;  // exp(-sg i theta) = c - i sg s
  return make_float2(fmaf(a.x, c, a.y * ss), fmaf(a.y, c, -a.x * ss));
}

// Radix-2 decimation in time over a[o + S i], i < N (N a power of two, N S = 32): natural-order outputs
// in the same registers. Forward sg = 1 (exp(-2 pi i / N)), inverse -1 (unscaled).
template <int N, int S>
__device__ __forceinline__ void fft_line(float2 (&a)[kLinesSide], int o, float sg) {
  if constexpr (N > 1) {
    fft_line<N / 2, 2 * S>(a, o, sg);
    fft_line<N / 2, 2 * S>(a, o + S, sg);
    float2 t[N];
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const float2 e = a[o + 2 * S * k], d = rotate32(a[o + S + 2 * S * k], k * (kLinesSide / N), sg);
      t[k] = cadd(e, d);
      t[k + N / 2] = csub(e, d);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) a[o + S * k] = t[k];
  }
}

__device__ __forceinline__ void fft32(float2 (&a)[kLinesSide], float sg) { fft_line<kLinesSide, 1>(a, 0, sg); }

// The sum of v over the warp in double, in every lane (a fixed butterfly order: deterministic).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// KA: the most squeeze axes (0 or 2); CK: the channel count compiled in (0: p.channels); DT: the dtype of
// x0, x_t and out compiled in (io_dtype), -1: switched at run time.
template <int KA, int CK, int DT>
__global__ void __launch_bounds__(lines_bound_threads(CK), lines_min_blocks(CK))
    fused_spectral_lines32(const NoiseProblem p, const LinesGeom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int L = kLinesSide, Lp = kLinesPitch, HW = L * L;
  const int C = CK > 0 ? CK : g.C;
  const int lane = (int)(threadIdx.x & 31), q = (int)(threadIdx.x >> 5), T = 32 * C;
  const int64_t S = p.batch * p.frames, s0 = (int64_t)kLinesSlices * blockIdx.x;
  float2* const planes = reinterpret_cast<float2*>(smem);  // C planes [L][Lp]
  float2* const buf = planes + q * (L * Lp);
  float* const misc = reinterpret_cast<float*>(smem + g.off_misc);  // per slice: the epilogue's coefficients
  // this warp's real planes: r = 2 q (real part), 2 q + 1 (imaginary part)
  const int j_re = (2 * q) / C, c_re = 2 * q - j_re * C, j_im = (2 * q + 1) / C, c_im = 2 * q + 1 - j_im * C;
  const bool act_re = s0 + j_re < S, act_im = s0 + j_im < S;  // an odd slice count: the last block's second is empty
  const Slice sl_re = slice_of32(act_re ? s0 + j_re : 0, p.frames), sl_im = slice_of32(act_im ? s0 + j_im : 0, p.frames);
  const Stream st = read_stream(p);
  const bool spectral = p.weights != nullptr;
  const float inv = 1.0f / (float)HW;
  const double inv_hw = 1.0 / (double)HW;  // x * inv_hw == x / HW exactly: HW is a power of two

  // the epilogue's coefficients of slice j, by lane 0 of warp j (lane j of the one warp where C = 1);
  // read by all after the last barrier
  const int jc = C >= kLinesSlices ? q : lane;
  if ((C >= kLinesSlices ? lane == 0 : lane < kLinesSlices) && jc < kLinesSlices && s0 + jc < S) {
    pack_coef<KA>(sample_coef<KA>(p, slice_of32(s0 + jc, p.frames).b), misc + jc * kPackedCoefFloats);
  }

  // 1. white noise: lane l draws row l (8 quads of 4 consecutive pixels) of both real planes
  float2 a[L];
  float e_re = 0.f, e_im = 0.f;  // the lane's part of the white planes' sums (the DC term)
  {
    const uint64_t k_re = st.offset + (uint64_t)(stream_index(p, sl_re, c_re, (int64_t)lane * L) >> 2);
    const uint64_t k_im = st.offset + (uint64_t)(stream_index(p, sl_im, c_im, (int64_t)lane * L) >> 2);
#pragma unroll
    for (int u = 0; u < L / 4; ++u) {
      float re[4] = {0.f, 0.f, 0.f, 0.f}, im[4] = {0.f, 0.f, 0.f, 0.f};
      if (act_re) cuda_randn4(st.seed, k_re + u, 0u, re);
      if (act_im) cuda_randn4(st.seed, k_im + u, 0u, im);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        a[4 * u + l] = make_float2(re[l], im[l]);
        e_re += re[l];
        e_im += im[l];
      }
    }
  }
  // 2 - 4. the spatial filter: a holds row `lane` again at the end
  float dc_re = 0.f, dc_im = 0.f;
  if (spectral) {
    const float dc = __ldg(p.weights);
    if (dc != 0.f) {  // w(0) mean(e), the white planes' means in double (the CPU's plane_mean)
      dc_re = (float)(dc * (warp_sum(e_re) * inv_hw));
      dc_im = (float)(dc * (warp_sum(e_im) * inv_hw));
    }
    fft32(a, 1.f);
#pragma unroll
    for (int w = 0; w < L; ++w) buf[lane * Lp + w] = a[w];
    __syncthreads();
#pragma unroll
    for (int h = 0; h < L; ++h) a[h] = buf[h * Lp + lane];  // column `lane`
    fft32(a, 1.f);
#pragma unroll
    for (int h = 0; h < L; ++h) {  // bin (h, lane); the DC bin zeroed (w(0) mean(e) is added after the inverse)
      const float wv = (h == 0 && lane == 0) ? 0.f : __ldg(p.weights + h * L + lane) * inv;
      a[h] = make_float2(a[h].x * wv, a[h].y * wv);
    }
    fft32(a, -1.f);
#pragma unroll
    for (int h = 0; h < L; ++h) buf[h * Lp + lane] = a[h];  // the positions this thread read: no barrier before
    __syncthreads();
#pragma unroll
    for (int w = 0; w < L; ++w) a[w] = buf[lane * Lp + w];
    fft32(a, -1.f);
  }
  // per-plane normalisation: 1 / (std + 1e-8) of the plane without its DC term, then (v + DC) * gain, as
  // the CPU's finish_plane
  float sc_re = 1.f, sc_im = 1.f;
  if (p.per_sample_norm) {
    float s_re = 0.f, s_im = 0.f;
#pragma unroll
    for (int w = 0; w < L; ++w) {
      s_re += a[w].x;
      s_im += a[w].y;
    }
    const float mr = (float)(warp_sum(s_re) * inv_hw), mi = (float)(warp_sum(s_im) * inv_hw);
    float q_re = 0.f, q_im = 0.f;
#pragma unroll
    for (int w = 0; w < L; ++w) {
      const float x = a[w].x - mr, y = a[w].y - mi;
      q_re = fmaf(x, x, q_re);
      q_im = fmaf(y, y, q_im);
    }
    sc_re = (float)(1.0 / (sqrt(warp_sum(q_re) * inv_hw) + 1e-8));
    sc_im = (float)(1.0 / (sqrt(warp_sum(q_im) * inv_hw) + 1e-8));
  }
  // (v + DC) scale gain as one FMA per value: v (scale gain) + DC (scale gain)
  const float gamma = p.gammas[0], g_re = sc_re * gamma, g_im = sc_im * gamma;
  const float o_re = dc_re * g_re, o_im = dc_im * g_im;
#pragma unroll
  for (int w = 0; w < L; ++w)  // row `lane` (its own positions where spectral)
    buf[lane * Lp + w] = make_float2(fmaf(a[w].x, g_re, o_re), fmaf(a[w].y, g_im, o_im));
  __syncthreads();  // every plane of both slices is finished, and misc written

  // 5. epilogue: the block's threads over each slice's 256 pixel quads, every channel. Channel c of slice
  // j is real plane j C + c: part (j C + c) & 1 of warp (j C + c) / 2's plane. One copy of the quad loop
  // (j at run time): the performance model counts a rolled loop's iterations per source line, so two
  // copies, one per slice, would each be charged both slices' iterations.
  auto at_of = [](int hw0) { return (hw0 >> 5) * Lp + (hw0 & (L - 1)); };
#pragma unroll 1
  for (int j = 0; j < kLinesSlices; ++j) {
    if (s0 + j >= S) break;
    const Slice sl = slice_of32(s0 + j, p.frames);
    const SampleCoef coef = unpack_coef<KA>(misc + j * kPackedCoefFloats);
    if constexpr (CK > 0) {
      const float* zc[CK];  // channel c's part of its plane (float index 2 (pixel) + part)
#pragma unroll
      for (int c = 0; c < CK; ++c) {
        const int r = j * CK + c;
        zc[c] = reinterpret_cast<const float*>(planes + (r >> 1) * (L * Lp)) + (r & 1);
      }
      epilogue_quads<KA, CK, DT>(p, coef, sl, (int)threadIdx.x, HW / 4, T, [&](int hw0, float (&v)[CK][4]) {
        const int at = at_of(hw0);
#pragma unroll
        for (int c = 0; c < CK; ++c)
#pragma unroll
          for (int l = 0; l < 4; ++l) v[c][l] = zc[c][2 * (at + l)];
      });
    } else {  // C at run time: add_noise_quad
#pragma unroll 1  // 2 - 3 quads per thread (counted per iteration by the performance model)
      for (int qi = (int)threadIdx.x; qi < HW / 4; qi += T) {
        const int hw0 = qi * 4, at = at_of(hw0);
        QuadPos qp;
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          qp.h[l] = hw0 >> 5;
          qp.w[l] = (hw0 & (L - 1)) + l;
        }
        PairedQuadReader rd;
        add_noise_quad<1, KA, true, false, CK, DT>(
            p, coef, sl, hw0, 4, qp,
            [&](int c, float out[4]) { rd.read(j * C + c, [&](int r) { return planes + (r >> 1) * (L * Lp) + at; }, out); },
            [](int, float*) {});
      }
    }
  }
}

template <int KA, int CK, int DT>
cudaError_t launch_lines_kernel(const NoiseProblem& p, const LinesGeom& g, size_t smem_cap, cudaStream_t stream) {
  auto kernel = fused_spectral_lines32<KA, CK, DT>;
  const cudaError_t err = allow_smem(kernel, g.smem, smem_cap);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.batch * p.frames + kLinesSlices - 1) / kLinesSlices;
  return launch_clusters(kernel, (unsigned)blocks, (unsigned)(32 * g.C), g.smem, 1u, stream, p, g);
}

// C = 3 (RGB images) compiled in, per dtype of the tensors (mixed dtypes: switched); other C at run time.
template <int KA>
cudaError_t launch_lines_ka(const NoiseProblem& p, const LinesGeom& g, size_t smem_cap, cudaStream_t stream) {
  if (p.channels != 3) return launch_lines_kernel<KA, 0, -1>(p, g, smem_cap, stream);
  switch (io_dtype(p)) {
    case (int)DType::kFloat32: return launch_lines_kernel<KA, 3, 0>(p, g, smem_cap, stream);
    case (int)DType::kFloat16: return launch_lines_kernel<KA, 3, 1>(p, g, smem_cap, stream);
    case (int)DType::kBFloat16: return launch_lines_kernel<KA, 3, 2>(p, g, smem_cap, stream);
    default: return launch_lines_kernel<KA, 3, -1>(p, g, smem_cap, stream);
  }
}

}  // namespace

cudaError_t launch_fused_lines32(const NoiseProblem& p, const LinesGeom& g, size_t smem_cap, cudaStream_t stream) {
  return p.k == 0 ? launch_lines_ka<0>(p, g, smem_cap, stream) : launch_lines_ka<2>(p, g, smem_cap, stream);
}

}  // namespace cuda
}  // namespace anisodiff
