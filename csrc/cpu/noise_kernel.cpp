// The fused CPU noise kernel. This file is compiled once per instruction set (default, AVX2,
// AVX-512), each time into its own namespace (ANISO_CPU_CAPABILITY), and the dispatcher in
// noise_cpu.cpp picks one at run time. Everything here has internal linkage and uses no STL, so no
// inline function compiled for a wide instruction set can leak into the default path.
//
// One pass per sample: generate eps for the sample into a per-thread scratch buffer that stays in
// cache (or read the caller's eps), filter each pair of its planes with one complex 2-D FFT,
// normalise, apply the channel squeeze per pixel, mix with x0 and store x_t and the target. Main
// memory sees x0 read once and the outputs written once; the scratch holds one sample.
#include <math.h>
#include <string.h>

#include "anisodiff/philox.h"
#include "cpu_kernel.h"

#ifndef ANISO_CPU_CAPABILITY
#define ANISO_CPU_CAPABILITY cap_default
#endif

// Butterfly rows never overlap (distinct rows of one buffer); tell the vectoriser, which otherwise
// gives up on the many runtime alias checks between output rows.
#if defined(__GNUC__) && !defined(__clang__)
#define ANISO_IVDEP _Pragma("GCC ivdep")
#elif defined(__clang__)
#define ANISO_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define ANISO_IVDEP
#endif

namespace anisodiff {
namespace cpu {
namespace ANISO_CPU_CAPABILITY {
namespace {

// ------------------------------------------------------------------------------------------
// White noise
// ------------------------------------------------------------------------------------------
constexpr int kCounterBlock = 32;

// N(0, 1) for the linear indices [i0, i1) of draw `draw` of the stream, written to out[0, i1 - i0).
void generate_normals(float* __restrict out, int64_t i0, int64_t i1, uint64_t seed, uint64_t offset,
                      uint32_t draw) {
  const int64_t c_begin = i0 >> 2, c_end = (i1 + 3) >> 2;
  float lane[4][kCounterBlock];
  for (int64_t cb = c_begin; cb < c_end; cb += kCounterBlock) {
    // Always a full block, so the loop vectorises; surplus counters are discarded below.
    for (int j = 0; j < kCounterBlock; ++j) {
      float n[4];
      randn4(seed, offset + (uint64_t)(cb + j), draw, n);
      lane[0][j] = n[0];
      lane[1][j] = n[1];
      lane[2][j] = n[2];
      lane[3][j] = n[3];
    }
    const int64_t nb = (c_end - cb) < kCounterBlock ? (c_end - cb) : kCounterBlock;
    const int64_t e_begin = 4 * cb, e_end = 4 * (cb + nb);
    if (e_begin >= i0 && e_end <= i1) {
      float* dst = out + (e_begin - i0);
      for (int64_t j = 0; j < nb; ++j) {
        dst[4 * j + 0] = lane[0][j];
        dst[4 * j + 1] = lane[1][j];
        dst[4 * j + 2] = lane[2][j];
        dst[4 * j + 3] = lane[3][j];
      }
    } else {  // first or last block of an unaligned range
      for (int64_t j = 0; j < nb; ++j)
        for (int l = 0; l < 4; ++l) {
          const int64_t e = 4 * (cb + j) + l;
          if (e >= i0 && e < i1) out[e - i0] = lane[l][j];
        }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Strided row I/O with dtype conversion
// ------------------------------------------------------------------------------------------
// Row (c, h) of the slice at element offset `slice` (TensorArg::slice_offset) into dst[0, W).
void load_row(const TensorArg& t, int64_t slice, int64_t c, int64_t h, int64_t W, float* __restrict dst) {
  const int64_t base = slice + c * t.stride[1] + h * t.stride[2], sw = t.stride[3];
  switch (t.dtype) {
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(t.data) + base;
      if (sw == 1) {
        for (int64_t x = 0; x < W; ++x) dst[x] = src[x];
      } else {
        for (int64_t x = 0; x < W; ++x) dst[x] = src[x * sw];
      }
      break;
    }
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(t.data) + base;
      for (int64_t x = 0; x < W; ++x) dst[x] = fp16_to_float(src[x * sw]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(t.data) + base;
      for (int64_t x = 0; x < W; ++x) dst[x] = bf16_to_float(src[x * sw]);
      break;
    }
  }
}

void store_row(const TensorArg& t, int64_t slice, int64_t c, int64_t h, int64_t W, const float* __restrict src) {
  const int64_t base = slice + c * t.stride[1] + h * t.stride[2], sw = t.stride[3];
  switch (t.dtype) {
    case DType::kFloat32: {
      float* dst = static_cast<float*>(t.data) + base;
      if (sw == 1) {
        for (int64_t x = 0; x < W; ++x) dst[x] = src[x];
      } else {
        for (int64_t x = 0; x < W; ++x) dst[x * sw] = src[x];
      }
      break;
    }
    case DType::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(t.data) + base;
      for (int64_t x = 0; x < W; ++x) dst[x * sw] = float_to_fp16(src[x]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(t.data) + base;
      for (int64_t x = 0; x < W; ++x) dst[x * sw] = float_to_bf16(src[x]);
      break;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Spectral filter: Stockham FFTs whose "elements" are whole rows of L values, so every butterfly
// is a contiguous, vectorisable loop over L.
// ------------------------------------------------------------------------------------------
struct Planes {
  float* re;
  float* im;
};

void fft_stage(const float* __restrict xr, const float* __restrict xi, float* __restrict yr,
               float* __restrict yi, const FftPlanView& plan, int s, float sg, int64_t L) {
  const int n = plan.n, p = plan.radix[s], ns = plan.span[s], m = n / p;
  for (int j = 0; j < m; ++j) {
    const int k = j % ns;
    const int64_t out0 = (int64_t)(j / ns) * ns * p + k;
    const float* twr = plan.tw_re[s] + k * (p - 1);
    const float* twi = plan.tw_im[s] + k * (p - 1);
    if (p == 2) {
      const float t1r = twr[0], t1i = sg * twi[0];
      const float *ar = xr + j * L, *ai = xi + j * L, *br = xr + (j + m) * L, *bi = xi + (j + m) * L;
      float *y0r = yr + out0 * L, *y0i = yi + out0 * L;
      float *y1r = yr + (out0 + ns) * L, *y1i = yi + (out0 + ns) * L;
      ANISO_IVDEP
      for (int64_t l = 0; l < L; ++l) {
        const float vr = br[l] * t1r - bi[l] * t1i, vi = br[l] * t1i + bi[l] * t1r;
        y0r[l] = ar[l] + vr;
        y0i[l] = ai[l] + vi;
        y1r[l] = ar[l] - vr;
        y1i[l] = ai[l] - vi;
      }
    } else if (p == 4) {
      const float t1r = twr[0], t1i = sg * twi[0], t2r = twr[1], t2i = sg * twi[1];
      const float t3r = twr[2], t3i = sg * twi[2];
      const float *x0r = xr + j * L, *x0i = xi + j * L;
      const float *x1r = xr + (j + m) * L, *x1i = xi + (j + m) * L;
      const float *x2r = xr + (j + 2 * m) * L, *x2i = xi + (j + 2 * m) * L;
      const float *x3r = xr + (j + 3 * m) * L, *x3i = xi + (j + 3 * m) * L;
      float *y0r = yr + out0 * L, *y0i = yi + out0 * L;
      float *y1r = yr + (out0 + ns) * L, *y1i = yi + (out0 + ns) * L;
      float *y2r = yr + (out0 + 2 * ns) * L, *y2i = yi + (out0 + 2 * ns) * L;
      float *y3r = yr + (out0 + 3 * ns) * L, *y3i = yi + (out0 + 3 * ns) * L;
      ANISO_IVDEP
      for (int64_t l = 0; l < L; ++l) {
        const float a1r = x1r[l] * t1r - x1i[l] * t1i, a1i = x1r[l] * t1i + x1i[l] * t1r;
        const float a2r = x2r[l] * t2r - x2i[l] * t2i, a2i = x2r[l] * t2i + x2i[l] * t2r;
        const float a3r = x3r[l] * t3r - x3i[l] * t3i, a3i = x3r[l] * t3i + x3i[l] * t3r;
        const float s0r = x0r[l] + a2r, s0i = x0i[l] + a2i, d0r = x0r[l] - a2r, d0i = x0i[l] - a2i;
        const float s1r = a1r + a3r, s1i = a1i + a3i, d1r = a1r - a3r, d1i = a1i - a3i;
        y0r[l] = s0r + s1r;
        y0i[l] = s0i + s1i;
        y2r[l] = s0r - s1r;
        y2i[l] = s0i - s1i;
        // forward: y1 = d0 - i d1, y3 = d0 + i d1 (the inverse flips the sign of i)
        y1r[l] = d0r + sg * d1i;
        y1i[l] = d0i - sg * d1r;
        y3r[l] = d0r - sg * d1i;
        y3i[l] = d0i + sg * d1r;
      }
    } else if (p == 8) {  // two radix-4 DFTs on even/odd inputs, combined with w8^q
      const float h = 0.707106781186547524f;
      const float* xr_[8];
      const float* xi_[8];
      float* yr_[8];
      float* yi_[8];
      float tr_[8], ti_[8];
      for (int r = 0; r < 8; ++r) {
        xr_[r] = xr + (j + (int64_t)r * m) * L;
        xi_[r] = xi + (j + (int64_t)r * m) * L;
        yr_[r] = yr + (out0 + (int64_t)r * ns) * L;
        yi_[r] = yi + (out0 + (int64_t)r * ns) * L;
        tr_[r] = r ? twr[r - 1] : 1.f;
        ti_[r] = r ? sg * twi[r - 1] : 0.f;
      }
      ANISO_IVDEP
      for (int64_t l = 0; l < L; ++l) {
        float ar[8], ai[8];
        for (int r = 0; r < 8; ++r) {
          ar[r] = xr_[r][l] * tr_[r] - xi_[r][l] * ti_[r];
          ai[r] = xr_[r][l] * ti_[r] + xi_[r][l] * tr_[r];
        }
        float er[4], ei[4], orr[4], oi[4];  // DFT4 of the even and of the odd inputs
        for (int half = 0; half < 2; ++half) {
          const float *br = ar + half, *bi = ai + half;
          float* Yr = half ? orr : er;
          float* Yi = half ? oi : ei;
          const float s0r = br[0] + br[4], s0i = bi[0] + bi[4], d0r = br[0] - br[4], d0i = bi[0] - bi[4];
          const float s1r = br[2] + br[6], s1i = bi[2] + bi[6], d1r = br[2] - br[6], d1i = bi[2] - bi[6];
          Yr[0] = s0r + s1r; Yi[0] = s0i + s1i;
          Yr[2] = s0r - s1r; Yi[2] = s0i - s1i;
          Yr[1] = d0r + sg * d1i; Yi[1] = d0i - sg * d1r;
          Yr[3] = d0r - sg * d1i; Yi[3] = d0i + sg * d1r;
        }
        // w8^q * O_q for q = 0..3 (forward w8 = (1 - i) / sqrt 2; the inverse conjugates)
        const float w1r = h * (orr[1] + sg * oi[1]), w1i = h * (oi[1] - sg * orr[1]);
        const float w2r = sg * oi[2], w2i = -sg * orr[2];
        const float w3r = h * (sg * oi[3] - orr[3]), w3i = -h * (oi[3] + sg * orr[3]);
        yr_[0][l] = er[0] + orr[0]; yi_[0][l] = ei[0] + oi[0];
        yr_[4][l] = er[0] - orr[0]; yi_[4][l] = ei[0] - oi[0];
        yr_[1][l] = er[1] + w1r;    yi_[1][l] = ei[1] + w1i;
        yr_[5][l] = er[1] - w1r;    yi_[5][l] = ei[1] - w1i;
        yr_[2][l] = er[2] + w2r;    yi_[2][l] = ei[2] + w2i;
        yr_[6][l] = er[2] - w2r;    yi_[6][l] = ei[2] - w2i;
        yr_[3][l] = er[3] + w3r;    yi_[3][l] = ei[3] + w3i;
        yr_[7][l] = er[3] - w3r;    yi_[7][l] = ei[3] - w3i;
      }
    } else if (p == 3) {
      const float t1r = twr[0], t1i = sg * twi[0], t2r = twr[1], t2i = sg * twi[1];
      const float h = sg * 0.866025403784438647f;  // sin(2 pi / 3)
      const float *x0r = xr + j * L, *x0i = xi + j * L;
      const float *x1r = xr + (j + m) * L, *x1i = xi + (j + m) * L;
      const float *x2r = xr + (j + 2 * m) * L, *x2i = xi + (j + 2 * m) * L;
      float *y0r = yr + out0 * L, *y0i = yi + out0 * L;
      float *y1r = yr + (out0 + ns) * L, *y1i = yi + (out0 + ns) * L;
      float *y2r = yr + (out0 + 2 * ns) * L, *y2i = yi + (out0 + 2 * ns) * L;
      ANISO_IVDEP
      for (int64_t l = 0; l < L; ++l) {
        const float a1r = x1r[l] * t1r - x1i[l] * t1i, a1i = x1r[l] * t1i + x1i[l] * t1r;
        const float a2r = x2r[l] * t2r - x2i[l] * t2i, a2i = x2r[l] * t2i + x2i[l] * t2r;
        const float sr = a1r + a2r, si = a1i + a2i, dr = a1r - a2r, di = a1i - a2i;
        const float mr = x0r[l] - 0.5f * sr, mi = x0i[l] - 0.5f * si;
        y0r[l] = x0r[l] + sr;
        y0i[l] = x0i[l] + si;
        y1r[l] = mr + h * di;
        y1i[l] = mi - h * dr;
        y2r[l] = mr - h * di;
        y2i[l] = mi + h * dr;
      }
    } else {  // any other radix: y_q = sum_r (t_r w^{rq}) x_r, O(p^2) rows
      const float* rr = plan.root_re[s];
      const float* ri = plan.root_im[s];
      for (int q = 0; q < p; ++q) {
        float* oyr = yr + (out0 + (int64_t)q * ns) * L;
        float* oyi = yi + (out0 + (int64_t)q * ns) * L;
        ANISO_IVDEP
        for (int64_t l = 0; l < L; ++l) {
          oyr[l] = xr[j * L + l];
          oyi[l] = xi[j * L + l];
        }
        for (int r = 1; r < p; ++r) {
          const int e = (int)(((int64_t)r * q) % p);
          const float wr = rr[e], wi = sg * ri[e];
          const float tr = twr[r - 1], ti = sg * twi[r - 1];
          const float cr = tr * wr - ti * wi, ci = tr * wi + ti * wr;
          const float* ixr = xr + (j + (int64_t)r * m) * L;
          const float* ixi = xi + (j + (int64_t)r * m) * L;
          ANISO_IVDEP
          for (int64_t l = 0; l < L; ++l) {
            oyr[l] += ixr[l] * cr - ixi[l] * ci;
            oyi[l] += ixr[l] * ci + ixi[l] * cr;
          }
        }
      }
    }
  }
}

// Runs every stage, ping-ponging between cur and other; cur holds the result afterwards.
void run_stages(const FftPlanView& plan, Planes& cur, Planes& other, int64_t L, float sg) {
  for (int s = 0; s < plan.stages; ++s) {
    fft_stage(cur.re, cur.im, other.re, other.im, plan, s, sg, L);
    const Planes t = cur;
    cur = other;
    other = t;
  }
}

// dst row j = src row j * c_j (c conjugated for the inverse), for the n rows of a Bluestein length.
void chirp_rows(const FftPlanView& plan, float sg, const Planes& src, const Planes& dst, int64_t L) {
  for (int64_t j = 0; j < plan.n; ++j) {
    const float cr = plan.chirp_re[j], ci = sg * plan.chirp_im[j];
    const float *xr = src.re + j * L, *xi = src.im + j * L;
    float *yr = dst.re + j * L, *yi = dst.im + j * L;
    ANISO_IVDEP
    for (int64_t l = 0; l < L; ++l) {
      yr[l] = xr[l] * cr - xi[l] * ci;
      yi[l] = xr[l] * ci + xi[l] * cr;
    }
  }
}

// Bluestein's chirp-z transform of n rows of L values (in cur, result in cur): the rows are
// chirped into a zero-padded m-row buffer, convolved with the chirp through the inner power-of-two
// FFT and chirped back. sg = -1 (the inverse) conjugates both chirps.
void run_bluestein(const FftPlanView& plan, Planes& cur, int64_t L, float sg, float* const blue[4]) {
  const int64_t n = plan.n, m = plan.bluestein_m;
  Planes a{blue[0], blue[1]}, other{blue[2], blue[3]};
  chirp_rows(plan, sg, cur, a, L);
  for (int64_t i = n * L; i < m * L; ++i) a.re[i] = a.im[i] = 0.f;
  run_stages(*plan.inner, a, other, L, 1.f);
  for (int64_t k = 0; k < m; ++k) {
    const float br = plan.bhat_re[k], bi = sg * plan.bhat_im[k];
    float *yr = a.re + k * L, *yi = a.im + k * L;
    ANISO_IVDEP
    for (int64_t l = 0; l < L; ++l) {
      const float r = yr[l] * br - yi[l] * bi;
      yi[l] = yr[l] * bi + yi[l] * br;
      yr[l] = r;
    }
  }
  run_stages(*plan.inner, a, other, L, -1.f);
  chirp_rows(plan, sg, a, cur, L);
}

// One 1-D transform of n rows of L values: mixed radix, or Bluestein for large prime factors.
void run_fft(const FftPlanView& plan, Planes& cur, Planes& other, int64_t L, float sg,
             const Workspace& ws) {
  if (plan.bluestein_m > 0)
    run_bluestein(plan, cur, L, sg, ws.blue);
  else
    run_stages(plan, cur, other, L, sg);
}

double plane_mean(const float* __restrict x, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum / (double)n;
}

void transpose(const float* __restrict src, float* __restrict dst, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows;
      const int64_t c1 = c0 + kTile < cols ? c0 + kTile : cols;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * cols + c];
    }
}

void transpose_planes(Planes& cur, Planes& other, int64_t rows, int64_t cols) {
  transpose(cur.re, other.re, rows, cols);
  transpose(cur.im, other.im, rows, cols);
  const Planes t = cur;
  cur = other;
  other = t;
}

// The forward 2-D FFT of one pair of planes (cur), leaving the spectrum transposed ([W, H]) in cur;
// other is the ping-pong partner of the same size.
void fft2_forward(const SpectralPlan& plan, Planes& cur, Planes& other, const Workspace& ws, int64_t H,
                  int64_t W) {
  run_fft(plan.rows, cur, other, W, 1.f, ws);  // along H, rows of W
  transpose_planes(cur, other, H, W);          // now [W, H]
  run_fft(plan.cols, cur, other, H, 1.f, ws);  // along W, rows of H
}

// The inverse of fft2_forward (unnormalised): a transposed spectrum back to an [H, W] plane pair.
void fft2_inverse(const SpectralPlan& plan, Planes& cur, Planes& other, const Workspace& ws, int64_t H,
                  int64_t W) {
  run_fft(plan.cols, cur, other, H, -1.f, ws);
  transpose_planes(cur, other, W, H);
  run_fft(plan.rows, cur, other, W, -1.f, ws);
}

// A table whose non-DC bins all equal flat_gain: T_w' x = flat_gain * (x - mean x) on the n values
// of each input, with no FFT; the DC terms dc * mean go to dc_a / dc_b.
void filter_flat(float* a, float* b, int64_t n, float dc, float flat_gain, float& dc_a, float& dc_b) {
  const double mean_a = plane_mean(a, n), mean_b = plane_mean(b, n);
  dc_a = (float)(dc * mean_a);
  dc_b = (float)(dc * mean_b);
  const float ma = (float)mean_a, mb = (float)mean_b;
  for (int64_t i = 0; i < n; ++i) {
    a[i] = flat_gain * (a[i] - ma);
    b[i] = flat_gain * (b[i] - mb);
  }
}

// Filters planes a and b in place without their DC bin (w_t has it zeroed): a <- T_w' a,
// b <- T_w' b. The DC bin's contribution, dc * mean of each input plane, is returned in dc_a / dc_b
// for the caller to add (see spectral.h): the per-sample normalisation must see the planes without it.
void filter_pair(float* a, float* b, const SpectralPlan& plan, const float* __restrict w_t, float dc,
                 float flat_gain, const Workspace& ws, int64_t H, int64_t W, float& dc_a, float& dc_b) {
  const int64_t HW = H * W;
  if (flat_gain >= 0.f) {  // every non-DC bin has one weight
    filter_flat(a, b, HW, dc, flat_gain, dc_a, dc_b);
    return;
  }
  dc_a = dc != 0.f ? (float)(dc * plane_mean(a, HW)) : 0.f;
  dc_b = dc != 0.f ? (float)(dc * plane_mean(b, HW)) : 0.f;
  Planes cur{a, b}, other{ws.fft_re, ws.fft_im};
  fft2_forward(plan, cur, other, ws, H, W);
  for (int64_t i = 0; i < HW; ++i) {
    cur.re[i] *= w_t[i];
    cur.im[i] *= w_t[i];
  }
  fft2_inverse(plan, cur, other, ws, H, W);
  if (cur.re != a) {
    for (int64_t i = 0; i < HW; ++i) {
      a[i] = cur.re[i];
      b[i] = cur.im[i];
    }
  }
}

// The spatio-temporal filter of two F x H x W volumes a, b ([F][H][W] each), in place and without the
// DC bin, as filter_pair does for planes: the 3-D FFT is the per-frame 2-D FFT followed by a
// length-F FFT across the frames, whose "rows" are the frames' H W bins (contiguous, so the same
// vectorised Stockham / Bluestein stages run with L = H W). Each frame uses the slots of its own
// frame in ws.fft_re / fft_im as its ping-pong partner; every frame takes the same number of
// swaps, so after the frame loop all spectra sit in the same one of the two buffers.
void filter_volume_pair(float* a, float* b, const SpectralPlan& plan, const float* __restrict w_t,
                        float dc, float flat_gain, const Workspace& ws, int64_t F, int64_t H,
                        int64_t W, float& dc_a, float& dc_b) {
  const int64_t HW = H * W, N = F * HW;
  if (flat_gain >= 0.f) {
    filter_flat(a, b, N, dc, flat_gain, dc_a, dc_b);
    return;
  }
  dc_a = dc != 0.f ? (float)(dc * plane_mean(a, N)) : 0.f;
  dc_b = dc != 0.f ? (float)(dc * plane_mean(b, N)) : 0.f;
  Planes vol{a, b}, spare{ws.fft_re, ws.fft_im};
  bool in_spare = false;
  for (int64_t f = 0; f < F; ++f) {
    Planes cur{a + f * HW, b + f * HW}, other{spare.re + f * HW, spare.im + f * HW};
    fft2_forward(plan, cur, other, ws, H, W);
    in_spare = cur.re != a + f * HW;
  }
  if (in_spare) {
    const Planes t = vol;
    vol = spare;
    spare = t;
  }
  run_fft(plan.frames, vol, spare, HW, 1.f, ws);  // along F, rows of H W
  for (int64_t i = 0; i < N; ++i) {
    vol.re[i] *= w_t[i];
    vol.im[i] *= w_t[i];
  }
  run_fft(plan.frames, vol, spare, HW, -1.f, ws);
  for (int64_t f = 0; f < F; ++f) {
    Planes cur{vol.re + f * HW, vol.im + f * HW}, other{spare.re + f * HW, spare.im + f * HW};
    fft2_inverse(plan, cur, other, ws, H, W);
    in_spare = cur.re != vol.re + f * HW;
  }
  if (in_spare) vol = spare;
  if (vol.re != a) {
    for (int64_t i = 0; i < N; ++i) {
      a[i] = vol.re[i];
      b[i] = vol.im[i];
    }
  }
}

// Adds the plane's DC term and, for the SAGD appendix normalisation, divides by the plane's std
// (ddof=0) + 1e-8, statistics in double. The std is taken before the DC term is added (a constant
// does not change it), so a DC term far larger than the rest costs the std no float32 accuracy.
void finish_plane(float* __restrict x, int64_t n, float dc_term, bool normalize) {
  if (!normalize) {
    if (dc_term != 0.f)
      for (int64_t i = 0; i < n; ++i) x[i] += dc_term;
    return;
  }
  const double mean = plane_mean(x, n);
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = (double)x[i] - mean;
    ss += d * d;
  }
  const float scale = (float)(1.0 / (sqrt(ss / (double)n) + 1e-8));
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] + dc_term) * scale;
}

// ------------------------------------------------------------------------------------------
// Channel squeeze on one sample's planes e[C][HW], in place.
// ------------------------------------------------------------------------------------------
// e <- (g I + sum_i f_minus_g[i] v_i v_i^T) e for one sample's planes e[C][HW], with k axes.
void apply_channels(float* __restrict e, const float* axes, int k, int C, const SqueezeCoeffs& sc,
                    float* __restrict proj, int64_t HW) {
  for (int i = 0; i < k; ++i) {  // proj_i = v_i . e per pixel
    float* u = proj + (int64_t)i * HW;
    for (int64_t x = 0; x < HW; ++x) u[x] = 0.f;
    for (int c = 0; c < C; ++c) {
      const float v = axes[c * k + i];
      const float* ec = e + (int64_t)c * HW;
      for (int64_t x = 0; x < HW; ++x) u[x] += v * ec[x];
    }
  }
  for (int c = 0; c < C; ++c) {
    float* ec = e + (int64_t)c * HW;
    if (sc.g != 1.f)
      for (int64_t x = 0; x < HW; ++x) ec[x] *= sc.g;
    for (int i = 0; i < k; ++i) {
      const float coef = sc.f_minus_g[i] * axes[c * k + i];
      const float* u = proj + (int64_t)i * HW;
      for (int64_t x = 0; x < HW; ++x) ec[x] += coef * u[x];
    }
  }
}

void squeeze_sample(float* __restrict e, const NoiseProblem& p, const float* r, float* __restrict proj,
                    int64_t HW) {
  apply_channels(e, p.axes, p.k, (int)p.channels, squeeze_coeffs(r, p.k, (int)p.channels, p.variant), proj, HW);
}

// One DDPM step for the work item of frames [f0, f0 + nf) of sample b; n: its generated (spatially
// shaped) noise, [C][nf][H][W]. The step's channel matrices act per pixel, so nf frames are one
// plane of nf H W pixels to them.
void step_sample(const NoiseProblem& p, int64_t b, int64_t f0, int64_t nf, float* __restrict n,
                 const Workspace& ws) {
  const int64_t C = p.channels, H = p.height, W = p.width, HW = nf * H * W;
  const int k = p.step_k;
  const float* q = p.step_params + b * (2 + 4 * (1 + k));
  const float a = q[0], bt = q[1];
  const float *S = q + 2, *C0 = S + (1 + k), *Ct = C0 + (1 + k), *Sig = Ct + (1 + k);
  float* x = ws.step_x;
  float* x0 = ws.step_e;
  for (int64_t g = 0; g < nf; ++g) {
    const int64_t sx = p.step_x.slice_offset(b, f0 + g), se = p.step_eps.slice_offset(b, f0 + g);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h) {
        load_row(p.step_x, sx, c, h, W, x + ((c * nf + g) * H + h) * W);
        load_row(p.step_eps, se, c, h, W, x0 + ((c * nf + g) * H + h) * W);
      }
  }
  const int64_t total = C * HW;
  for (int64_t i = 0; i < total; ++i) x0[i] = (x[i] - bt * x0[i]) / a;
  if (p.step_clip != 0) {
    if (p.step_clip == 2) apply_channels(x0, p.axes, k, (int)C, step_matrix(S, k, true), ws.proj, HW);
    const float lo = -p.clip_range, hi = p.clip_range;
    for (int64_t i = 0; i < total; ++i) x0[i] = x0[i] < lo ? lo : (x0[i] > hi ? hi : x0[i]);
    if (p.step_clip == 2) apply_channels(x0, p.axes, k, (int)C, step_matrix(S, k, false), ws.proj, HW);
  }
  for (int64_t g = 0; g < nf; ++g) {
    const int64_t s0 = p.out_x0.slice_offset(b, f0 + g);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h) store_row(p.out_x0, s0, c, h, W, x0 + ((c * nf + g) * H + h) * W);
  }
  apply_channels(x0, p.axes, k, (int)C, step_matrix(C0, k, false), ws.proj, HW);
  apply_channels(x, p.axes, k, (int)C, step_matrix(Ct, k, false), ws.proj, HW);
  apply_channels(n, p.axes, k, (int)C, step_matrix(Sig, k, false), ws.proj, HW);
  for (int64_t i = 0; i < total; ++i) x[i] += x0[i] + n[i];
  for (int64_t g = 0; g < nf; ++g) {
    const int64_t sp = p.out.slice_offset(b, f0 + g);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h) store_row(p.out, sp, c, h, W, x + ((c * nf + g) * H + h) * W);
  }
}

// Mix the shaped noise n[C][nf][H][W] of frames [f0, f0 + nf) of sample b with x0 and store (or
// store the noise alone). n_in: the noise that goes into x_t (n + perturb n' under input
// perturbation, else n itself).
void store_sample(const NoiseProblem& p, int64_t b, int64_t f0, int64_t nf, const float* __restrict n,
                  const float* __restrict n_in, float a, float bcoef, float* __restrict row) {
  const int64_t C = p.channels, H = p.height, W = p.width;
  float* x0 = row;
  float* xt = row + W;
  float* tg = row + 2 * W;
  for (int64_t g = 0; g < nf; ++g) {
    const int64_t f = f0 + g, s_out = p.out.slice_offset(b, f);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h) {
        const float* nr = n + ((c * nf + g) * H + h) * W;
        if (p.x0.data == nullptr) {
          store_row(p.out, s_out, c, h, W, nr);
          continue;
        }
        load_row(p.x0, p.x0.slice_offset(b, f), c, h, W, x0);
        mix_n(a, bcoef, x0, nr, p.target, xt, tg, W);
        if (n_in != n) {  // x_t from the perturbed noise; the target stays that of n
          const float* pr = n_in + ((c * nf + g) * H + h) * W;
          for (int64_t x = 0; x < W; ++x) xt[x] = a * x0[x] + bcoef * pr[x];
        }
        store_row(p.x_t, p.x_t.slice_offset(b, f), c, h, W, xt);
        store_row(p.out, s_out, c, h, W, tg);
      }
  }
}

// sum_d gamma_d N(T_{w_d} eps_d) for the work item of frames [f0, f0 + nf) of sample b (nf = 1: the
// slice (b, f0); nf = F: the whole sample, temporal) into ws.eps[0], [C][nf][H][W] (ws.eps[1] holds
// a second draw). Draw d is the caller's eps when given and use_caller, else the stream with
// counter word 2 = first_draw + d. The white value of (b, c, f, h, w) is stream index
// ((b C + c) F + f) H W + h W + w.
void spatial_slice(const NoiseProblem& p, const SpectralPlan& plan, const Workspace& ws, int64_t b,
                   int64_t f0, int64_t nf, int first_draw, bool use_caller) {
  const int64_t C = p.channels, F = p.frames, H = p.height, W = p.width, HW = H * W;
  const int64_t N = nf * HW, CN = C * N;  // values per plane (volume), per work item
  for (int d = 0; d < p.draws; ++d) {
    float* e = ws.eps[d];
    const uint32_t draw = (uint32_t)(first_draw + d);
    if (use_caller && p.noise[d].data != nullptr) {
      for (int64_t g = 0; g < nf; ++g) {
        const int64_t slice = p.noise[d].slice_offset(b, f0 + g);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t h = 0; h < H; ++h) load_row(p.noise[d], slice, c, h, W, e + ((c * nf + g) * H + h) * W);
      }
    } else if (nf == F) {  // the whole sample (F = 1, or temporal): one contiguous range of the stream
      generate_normals(e, b * CN, (b + 1) * CN, p.seed, p.offset, draw);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t start = ((b * C + c) * F + f0) * HW;
        generate_normals(e + c * HW, start, start + HW, p.seed, p.offset, draw);
      }
    }
    float* dc_terms = ws.dc_terms;  // per plane (volume): the DC bin's contribution, added last
    for (int64_t q = 0; q < C; ++q) dc_terms[q] = 0.f;
    if (p.weights != nullptr) {
      // Planes (volumes) are paired within the work item only (a lone last one gets a zero
      // partner), so a sample's noise is bit for bit the same whatever the batch around it.
      const float* w_t = plan.weights_t + d * N;
      for (int64_t q = 0; q < C; q += 2) {
        float* partner = ws.zero_plane;
        float unused = 0.f;
        float& dc_b = q + 1 < C ? dc_terms[q + 1] : unused;
        if (q + 1 < C) {
          partner = e + (q + 1) * N;
        } else {
          for (int64_t i = 0; i < N; ++i) partner[i] = 0.f;
        }
        if (p.temporal)
          filter_volume_pair(e + q * N, partner, plan, w_t, plan.dc_weight[d], plan.flat_gain[d], ws, nf,
                             H, W, dc_terms[q], dc_b);
        else
          filter_pair(e + q * N, partner, plan, w_t, plan.dc_weight[d], plan.flat_gain[d], ws, H, W,
                      dc_terms[q], dc_b);
      }
    }
    for (int64_t q = 0; q < C; ++q) finish_plane(e + q * N, N, dc_terms[q], p.per_sample_norm);
    const float gamma = p.gammas[d];
    float* acc = ws.eps[0];
    if (d == 0) {
      if (gamma != 1.f)
        for (int64_t i = 0; i < CN; ++i) acc[i] *= gamma;
    } else {
      for (int64_t i = 0; i < CN; ++i) acc[i] += gamma * e[i];
    }
  }
}

}  // namespace

// Work items s in [item_begin, item_end): the slices of [0, batch * frames) (b = s / frames,
// f = s % frames), or for a temporal problem the samples b = s of [0, batch), all F frames at once.
void process_samples(const NoiseProblem& p, const SpectralPlan& plan, const Workspace& ws,
                     int64_t item_begin, int64_t item_end) {
  const int64_t nf = item_frames(p), N = nf * p.height * p.width, CN = p.channels * N;
  const int64_t ncoef = 2 + p.k;
  const bool perturbed = p.perturb != 0.f && p.x0.data != nullptr;
  for (int64_t s = item_begin; s < item_end; ++s) {
    const int64_t b = p.temporal ? s : s / p.frames, f0 = p.temporal ? 0 : s % p.frames;
    float* pert = ws.pert;
    if (perturbed) {  // n'_sp first (it needs the eps buffers too), kept in ws.pert
      spatial_slice(p, plan, ws, b, f0, nf, p.draws, false);
      for (int64_t i = 0; i < CN; ++i) pert[i] = ws.eps[0][i];
    }
    spatial_slice(p, plan, ws, b, f0, nf, 0, true);
    float* e = ws.eps[0];
    if (p.step_params != nullptr) {
      step_sample(p, b, f0, nf, e, ws);
      continue;
    }
    const float* row = p.coef + p.timesteps[b] * ncoef;
    if (p.k > 0) {  // per pixel: the item's nf frames are one plane of N pixels to the squeeze
      squeeze_sample(e, p, row + 2, ws.proj, N);
      if (perturbed) squeeze_sample(pert, p, row + 2, ws.proj, N);
    }
    if (perturbed)  // n + gamma n', both through the same operator A(t)
      for (int64_t i = 0; i < CN; ++i) pert[i] = e[i] + p.perturb * pert[i];
    store_sample(p, b, f0, nf, e, perturbed ? pert : e, row[0], row[1], ws.row);
  }
}

}  // namespace ANISO_CPU_CAPABILITY
}  // namespace cpu
}  // namespace anisodiff
