// Device helpers shared by the CUDA kernels: the stream, strided I/O, the per-pixel epilogues
// (squeeze + mix, the DDPM step), block reductions and the shared-memory Stockham FFT. The math
// itself (Philox, squeeze, mix, dtype conversions, FFT factorisation) is the header-only code in
// csrc/include/anisodiff, identical to the CPU kernel's.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <utility>
#if !defined(ANISO_CUDA_EMULATOR)
#include <cooperative_groups.h>
#endif

#include "anisodiff/dtype.h"
#include "anisodiff/mix.h"
#include "anisodiff/philox.h"
#include "anisodiff/problem.h"
#include "anisodiff/spectral.h"
#include "anisodiff/squeeze.h"
#include "anisodiff/twiddle.h"

namespace anisodiff {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Stream, coefficients
// ---------------------------------------------------------------------------------------------
struct Stream {
  uint64_t seed, offset;
};

// A device stream tensor is read here, at run time (CUDA-graph replays see its current value);
// negative values are not checked on the device and act as their unsigned bit patterns.
__device__ __forceinline__ Stream read_stream(const NoiseProblem& p) {
  if (p.stream_ptr != nullptr) return Stream{(uint64_t)p.stream_ptr[0], (uint64_t)p.stream_ptr[1]};
  return Stream{p.seed, p.offset};
}

// Row of the coefficient table for sample b. Timesteps on the device are not validated on the host
// (that would synchronise); the index is clamped into [0, coef_rows) so it never reads out of bounds,
// and `valid` says whether it had to be: the caller then writes NaN for the sample (as the Triton
// kernels do), so a bad timestep shows up in the loss instead of silently reusing another row.
__device__ __forceinline__ const float* coef_row(const NoiseProblem& p, int64_t b, bool& valid) {
  int64_t t = __ldg(p.timesteps + b);
  valid = t >= 0 && t < p.coef_rows;
  t = t < 0 ? 0 : (t >= p.coef_rows ? p.coef_rows - 1 : t);
  return p.coef + t * (2 + p.k);
}

// Input perturbation (DDPM-IP, problem.h): add_noise with perturb != 0 puts n + perturb n' into x_t,
// n' = A(t) eps' with eps' draw d of the stream in counter word 2 = draws + d (never the caller's
// noise); shaped_noise and the step have none. The kernels that take it have a kPert template flag,
// so their perturb == 0 instantiations are the code without it.
__host__ __device__ __forceinline__ bool perturbed(const NoiseProblem& p) {
  return p.perturb != 0.f && p.x0.data != nullptr && p.step_params == nullptr;
}

// Element `lane` (0..3, known only at run time) of a 4-vector without dynamic register indexing.
__device__ __forceinline__ float pick4(const float v[4], int lane) {
  return lane == 0 ? v[0] : (lane == 1 ? v[1] : (lane == 2 ? v[2] : v[3]));
}

// ---------------------------------------------------------------------------------------------
// The canonical stream on the GPU (docs/cuda.md, "The stream on the GPU"). The Philox words are
// philox.h's bit for bit (the products as 32-bit multiply-high / low: one IMAD.WIDE each, where the
// 64-bit form left an add of zero per product); Box-Muller uses philox.h's uniform map and
// fast_logf (exact enough near u1 = 1, where the SFU's lg2 is not), and the SFU for the rest:
// rsqrt.approx (2 ulp) for the radius and __sincosf (2^-21.41 absolute on [-pi, pi]) for the angle,
// taken as 2 pi u2 - pi with both signs flipped. About half the instructions of philox.h's Cephes
// sin / cos + IEEE sqrt; each normal is within 6e-6 (absolute) of the CPU's: r <= 5.68 times the
// angle's roundings (4.5e-7) and the SFU's 3.6e-7, plus the radius' 2.5 ulp. The host emulator adds
// the documented worst-case error of both intrinsics, so its comparisons with the CPU kernel check
// the kernels' tolerance under it.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void philox_words(uint64_t seed, uint64_t counter, uint32_t draw, uint32_t w[4]) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = draw, c3 = 0u;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo_a = kPhiloxRoundA * c0, hi_a = __umulhi(kPhiloxRoundA, c0);
    const uint32_t lo_b = kPhiloxRoundB * c2, hi_b = __umulhi(kPhiloxRoundB, c2);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

#if defined(ANISO_CUDA_EMULATOR)
__device__ __forceinline__ float rsqrt_approx(float x) { return emu_rsqrt_approx(x); }
#else
__device__ __forceinline__ float rsqrt_approx(float x) {
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // x >= 1.19e-7 here: never subnormal
  return y;
}
#endif

__device__ __forceinline__ void box_muller_sfu(uint32_t w1, uint32_t w2, float& n1, float& n2) {
  const float u1 = fmaxf(uint32_to_uniform(w1), 1.0e-7f);  // philox.h: u1 > 1e-7 ? u1 : 1e-7
  const float u2 = uint32_to_uniform(w2);
  const float x = -2.0f * fast_logf(u1);                     // in [1.19e-7, 32.3]
  const float r = x * rsqrt_approx(x);
  float s, c;
  __sincosf(fmaf(6.283185307179586f, u2, -3.14159265358979f), &s, &c);  // = -sin, -cos of 2 pi u2
  n1 = -r * c;
  n2 = -r * s;
}

// Four standard normals for one 64-bit counter: philox.h's randn4 with the SFU Box-Muller above.
__device__ __forceinline__ void cuda_randn4(uint64_t seed, uint64_t counter, uint32_t draw, float out[4]) {
  uint32_t w[4];
  philox_words(seed, counter, draw, w);
  box_muller_sfu(w[0], w[1], out[0], out[1]);
  box_muller_sfu(w[2], w[3], out[2], out[3]);
}

// One white normal: element i of draw `draw` of the stream.
__device__ __forceinline__ float stream_normal(const Stream& st, uint32_t draw, int64_t i) {
  float v[4];
  cuda_randn4(st.seed, st.offset + (uint64_t)(i >> 2), draw, v);
  return pick4(v, (int)(i & 3));
}

// Elements i0 .. i0 + n - 1 (n <= 4) of draw `draw`: at most two Philox calls.
__device__ __forceinline__ void stream_quad(const Stream& st, uint32_t draw, int64_t i0, int n, float out[4]) {
  const uint64_t q = (uint64_t)(i0 >> 2);
  const int r = (int)(i0 & 3);
  float lo[4], hi[4] = {0.f, 0.f, 0.f, 0.f};
  cuda_randn4(st.seed, st.offset + q, draw, lo);
  if (r == 0) {
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = lo[l];
    return;
  }
  if (r + n > 4) cuda_randn4(st.seed, st.offset + q + 1, draw, hi);
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] = (r + l < 4) ? pick4(lo, r + l) : pick4(hi, r + l - 4);
}

// ---------------------------------------------------------------------------------------------
// Strided I/O of float32 / float16 / bfloat16 tensors
// ---------------------------------------------------------------------------------------------
// On the GPU the conversions are the hardware's cvt (round to nearest even, like dtype.h's software
// ones: the same bits for every non-NaN value; a NaN stays a NaN, its payload may differ) - one
// instruction instead of 5-20. The host emulator runs dtype.h's. (The dtype dispatch is shared, the
// leaves are per platform: the performance model weights the GPU's leaves by the host's dispatch.)
#if defined(ANISO_CUDA_EMULATOR)
__device__ __forceinline__ float f16_bits_to_float(uint16_t bits) { return fp16_to_float(bits); }
__device__ __forceinline__ uint16_t float_to_f16_bits(float v) { return float_to_fp16(v); }
__device__ __forceinline__ uint16_t float_to_bf16_bits(float v) { return float_to_bf16(v); }
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  return (uint32_t)float_to_fp16(lo) | ((uint32_t)float_to_fp16(hi) << 16);
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return (uint32_t)float_to_bf16(lo) | ((uint32_t)float_to_bf16(hi) << 16);
}
#else
__device__ __forceinline__ float f16_bits_to_float(uint16_t bits) {
  float f;
  asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(bits));
  return f;
}
__device__ __forceinline__ uint16_t float_to_f16_bits(float v) {
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
__device__ __forceinline__ uint16_t float_to_bf16_bits(float v) {
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
// lo in bits 0-15
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  uint32_t w;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}
#endif

__device__ __forceinline__ float to_float(uint16_t bits, DType dt) {
  if (dt == DType::kFloat16) {
    return f16_bits_to_float(bits);
  }
  return bf16_to_float(bits);
}

__device__ __forceinline__ uint16_t from_float(float v, DType dt) {
  if (dt == DType::kFloat16) {
    return float_to_f16_bits(v);
  }
  return float_to_bf16_bits(v);
}

// (lo, hi) as two 16-bit values in one word, lo in bits 0-15
__device__ __forceinline__ uint32_t pack_16x2(float lo, float hi, DType dt) {
  if (dt == DType::kFloat16) {
    return pack_f16x2(lo, hi);
  }
  return pack_bf16x2(lo, hi);
}

__device__ __forceinline__ float load_elem(const TensorArg& t, int64_t idx) {
  if (t.dtype == DType::kFloat32) return static_cast<const float*>(t.data)[idx];
  return to_float(static_cast<const uint16_t*>(t.data)[idx], t.dtype);
}

__device__ __forceinline__ void store_elem(const TensorArg& t, int64_t idx, float v) {
  if (t.dtype == DType::kFloat32) {
    static_cast<float*>(t.data)[idx] = v;
  } else {
    static_cast<uint16_t*>(t.data)[idx] = from_float(v, t.dtype);
  }
}

// n / d for 64-bit 0 <= n < 2^53 without the 64-bit division subroutine (a call: the kernels around it
// spilled registers): 32-bit division when both fit, else a double reciprocal and a +-1 correction.
struct Div64 {
  int64_t d;
  double rcp;
  __device__ __forceinline__ int64_t div(int64_t n) const {
    if (((n | d) >> 31) == 0) return (int64_t)((uint32_t)n / (uint32_t)d);
    int64_t q = (int64_t)((double)n * rcp);
    if (q * d > n) --q;
    if ((q + 1) * d <= n) ++q;
    return q;
  }
};
__device__ __forceinline__ Div64 make_div64(int64_t d) { return Div64{d, __drcp_rn((double)d)}; }

// A kernel slice (problem.h): sample b, frame f of a [B, C, F, H, W] tensor (f = 0 for 4-D ones).
struct Slice {
  int64_t b, f;
};

// The slice of flat slice index s (s = b * F + f); the division only when there are frames.
__device__ __forceinline__ Slice slice_of(int64_t s, int64_t frames, const Div64& dF) {
  Slice sl{s, 0};
  if (frames > 1) {
    sl.b = dF.div(s);
    sl.f = s - sl.b * frames;
  }
  return sl;
}

// The same for a slice index below 2^31 (a block's: grids are 32-bit), without the 64-bit division.
__device__ __forceinline__ Slice slice_of32(int64_t s, int64_t frames) {
  const uint32_t b = (uint32_t)s / (uint32_t)frames;
  return Slice{(int64_t)b, s - (int64_t)b * frames};
}

// Element (slice, c, h, w) of t.
__device__ __forceinline__ int64_t elem_at(const TensorArg& t, const Slice& sl, int64_t c, int64_t h, int64_t w) {
  return t.slice_offset(sl.b, sl.f) + c * t.stride[1] + h * t.stride[2] + w * t.stride[3];
}

// Stream index of element (slice, c, hw) of a [B, C, F, H, W] problem: ((b C + c) F + f) HW + hw.
__device__ __forceinline__ int64_t stream_index(const NoiseProblem& p, const Slice& sl, int64_t c, int64_t hw) {
  return ((sl.b * p.channels + c) * p.frames + sl.f) * (p.height * p.width) + hw;
}

// The (h, w) of 4 consecutive pixels hw0 .. hw0 + 3 of a plane (rows may wrap).
struct QuadPos {
  int64_t h[4], w[4];
};

__device__ __forceinline__ QuadPos quad_pos(int64_t hw0, const Div64& W) {
  QuadPos q;
  int64_t h = W.div(hw0), w = hw0 - h * W.d;
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    q.h[l] = h;
    q.w[l] = w;
    if (++w == W.d) {
      w = 0;
      ++h;
    }
  }
  return q;
}

// kVec: every tensor is plane-contiguous (stride[3] == 1, stride[2] == W), its batch and channel
// strides and base address are multiples of 4 elements and H * W % 4 == 0 (checked by the
// launcher), so the 4 pixels of a quad are one aligned 16-byte (fp32) or 8-byte (16-bit) access.
__device__ __forceinline__ void load4(const TensorArg& t, int64_t off, float out[4]);
__device__ __forceinline__ void store4(const TensorArg& t, int64_t off, const float v[4]);
template <DType DT>
__device__ __forceinline__ void load4_as(const TensorArg& t, int64_t off, float out[4]);
template <DType DT>
__device__ __forceinline__ void store4_as(const TensorArg& t, int64_t off, const float v[4]);

// 4 consecutive elements of t at element offset off: the dtype compiled in (DT >= 0) or switched.
template <int DT>
__device__ __forceinline__ void load4_dt(const TensorArg& t, int64_t off, float v[4]) {
  if constexpr (DT >= 0) load4_as<(DType)DT>(t, off, v);
  else load4(t, off, v);
}
template <int DT>
__device__ __forceinline__ void store4_dt(const TensorArg& t, int64_t off, const float v[4]) {
  if constexpr (DT >= 0) store4_as<(DType)DT>(t, off, v);
  else store4(t, off, v);
}

// DT >= 0: the tensor's dtype (a DType) known at compile time (load4_as), -1: switched at run time.
template <bool kVec, int DT = -1>
__device__ __forceinline__ void load_quad(const TensorArg& t, const Slice& sl, int64_t c, int64_t hw0, int n,
                                          const QuadPos& pos, float out[4]) {
  if (kVec) {
    load4_dt<DT>(t, t.slice_offset(sl.b, sl.f) + c * t.stride[1] + hw0, out);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = l < n ? load_elem(t, elem_at(t, sl, c, pos.h[l], pos.w[l])) : 0.f;
  }
}

template <bool kVec, int DT = -1>
__device__ __forceinline__ void store_quad(const TensorArg& t, const Slice& sl, int64_t c, int64_t hw0, int n,
                                           const QuadPos& pos, const float v[4]) {
  if (kVec) {
    store4_dt<DT>(t, t.slice_offset(sl.b, sl.f) + c * t.stride[1] + hw0, v);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (l < n) store_elem(t, elem_at(t, sl, c, pos.h[l], pos.w[l]), v[l]);
  }
}

// 4 consecutive elements at element offset `off` of t (16-byte fp32 / 8-byte 16-bit vectors; the
// caller guarantees the vectorised-I/O conditions of load_quad), the dtype DT a template argument (the
// hot-path kernels are instantiated per dtype, io_dtype picks one): no dtype switch per element, and
// bfloat16 -> float32 is a shift or a mask of the loaded word. load4 / store4 (below) switch at run time.
// (__stwb: one vector store with the default cache policy; a plain struct store was split into 4
// scalar stores by the compiler in the unrolled kernels.)
template <DType DT>
__device__ __forceinline__ void load4_as(const TensorArg& t, int64_t off, float out[4]) {
  if constexpr (DT == DType::kFloat32) {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(t.data) + off);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(t.data) + off);
    if constexpr (DT == DType::kBFloat16) {
      out[0] = __int_as_float((int)(v.x << 16));
      out[1] = __int_as_float((int)(v.x & 0xFFFF0000u));
      out[2] = __int_as_float((int)(v.y << 16));
      out[3] = __int_as_float((int)(v.y & 0xFFFF0000u));
    } else {
      out[0] = f16_bits_to_float((uint16_t)(v.x & 0xFFFFu));
      out[1] = f16_bits_to_float((uint16_t)(v.x >> 16));
      out[2] = f16_bits_to_float((uint16_t)(v.y & 0xFFFFu));
      out[3] = f16_bits_to_float((uint16_t)(v.y >> 16));
    }
  }
}

template <DType DT>
__device__ __forceinline__ void store4_as(const TensorArg& t, int64_t off, const float v[4]) {
  if constexpr (DT == DType::kFloat32) {
    __stwb(reinterpret_cast<float4*>(static_cast<float*>(t.data) + off), make_float4(v[0], v[1], v[2], v[3]));
  } else {
    uint2 o;
    if constexpr (DT == DType::kBFloat16) {
      o.x = pack_bf16x2(v[0], v[1]);
      o.y = pack_bf16x2(v[2], v[3]);
    } else {
      o.x = pack_f16x2(v[0], v[1]);
      o.y = pack_f16x2(v[2], v[3]);
    }
    __stwb(reinterpret_cast<uint2*>(static_cast<uint16_t*>(t.data) + off), o);
  }
}

__device__ __forceinline__ void load4(const TensorArg& t, int64_t off, float out[4]) {
  if (t.dtype == DType::kFloat32) load4_as<DType::kFloat32>(t, off, out);
  else if (t.dtype == DType::kFloat16) load4_as<DType::kFloat16>(t, off, out);
  else load4_as<DType::kBFloat16>(t, off, out);
}

__device__ __forceinline__ void store4(const TensorArg& t, int64_t off, const float v[4]) {
  if (t.dtype == DType::kFloat32) store4_as<DType::kFloat32>(t, off, v);
  else if (t.dtype == DType::kFloat16) store4_as<DType::kFloat16>(t, off, v);
  else store4_as<DType::kBFloat16>(t, off, v);
}

// The one dtype of the tensors a kernel reads and writes (x0, x_t, out; the absent ones do not count),
// or -1 when they differ (the kernels with the run-time switch take those problems).
inline int io_dtype(const NoiseProblem& p) {
  int dt = -1;
  for (const TensorArg* t : {&p.x0, &p.x_t, &p.out}) {
    if (t->data == nullptr) continue;
    if (dt >= 0 && dt != (int)t->dtype) return -1;
    dt = (int)t->dtype;
  }
  return dt < 0 ? (int)DType::kFloat32 : dt;
}

// ---------------------------------------------------------------------------------------------
// Channel loops with a register cache: channels c < K keep the values `load` produced in `cache`
// (compile-time indices, so the cache stays in registers); channels c >= K are loaded again.
// ---------------------------------------------------------------------------------------------
template <int K, class V, class Load, class Body>
__device__ __forceinline__ void channels_fill(int C, V (&cache)[K], Load load, Body body) {
#pragma unroll
  for (int c = 0; c < K; ++c)
    if (c < C) {
      cache[c] = load(c);
      body(c, cache[c]);
    }
  for (int c = K; c < C; ++c) body(c, load(c));
}

template <int K, class V, class Load, class Body>
__device__ __forceinline__ void channels_cached(int C, const V (&cache)[K], Load load, Body body) {
#pragma unroll
  for (int c = 0; c < K; ++c)
    if (c < C) body(c, cache[c]);
  for (int c = K; c < C; ++c) body(c, load(c));
}

// m e for one channel c of a pixel: g e_c + sum_i (f_i - g) v_ci u_i with u_i = v_i . e (the CPU
// kernel's apply_channels, same operation order).
// KA: the most axes the caller handles (k <= KA); register arrays are sized by it.
template <int KA>
__device__ __forceinline__ float apply_matrix(const SqueezeCoeffs& m, float e_c, const float* axes, int c, int k,
                                              const float (&u)[KA]) {
  float out = m.g * e_c;
#pragma unroll
  for (int i = 0; i < KA; ++i)
    if (i < k) out += (m.f_minus_g[i] * __ldg(axes + c * k + i)) * u[i];
  return out;
}

template <int KA>
__device__ __forceinline__ void project_add(float (&u)[KA], const float* axes, int c, int k, float e_c) {
#pragma unroll
  for (int i = 0; i < KA; ++i)
    if (i < k) u[i] += __ldg(axes + c * k + i) * e_c;
}

// ---------------------------------------------------------------------------------------------
// Epilogue of add_noise / shaped_noise for 4 consecutive pixels hw0 .. hw0 + n - 1 of sample b:
// fetch(c, e) gives the shaped, not yet squeezed noise of channel c; apply S(t), then mix with x0
// and store x_t and the target, or store the noise.
// ---------------------------------------------------------------------------------------------
struct Quad {
  float v[4];
};

// The coefficients of sample b: a_t, b_t (NaN for a bad timestep, valid = false) and S(t)'s gains.
struct SampleCoef {
  float a, bc;
  bool valid;
  SqueezeCoeffs sc;
};

// KA: the most axes the caller's epilogue reads (k <= KA).
template <int KA = kMaxAxes>
__device__ __forceinline__ SampleCoef sample_coef(const NoiseProblem& p, int64_t b) {
  SampleCoef s;
  const float* row = coef_row(p, b, s.valid);
  const float nan = __int_as_float(0x7fc00000);
  s.a = s.valid ? __ldg(row) : nan;
  s.bc = s.valid ? __ldg(row + 1) : nan;
  s.sc = squeeze_coeffs<KA>(row + 2, p.k, (int)p.channels, p.variant);
  return s;
}

// KA (0, 2 or 8): the most axes handled (k <= KA; KA = 0 compiles the no-squeeze case only).
// kPert: fetch_p(c, e) gives the perturbation's channel c (not squeezed, like fetch's); x_t gets
// S (n + perturb n'), the target n alone. n' is fetched again in the squeeze's second pass instead of
// kept in registers (the cache of n is what the register budget is sized for).
// coef: sample_coef(p, b.b), which a kernel with one sample per block computes once. CK > 0: the
// channel count fixed at compile time (p.channels == CK; the channel loops unroll). DT >= 0: the dtype of
// x0, x_t and out fixed at compile time (io_dtype; load_quad).
template <int K, int KA, bool kVec, bool kPert, int CK = 0, int DT = -1, class Fetch, class FetchP>
__device__ __forceinline__ void add_noise_quad(const NoiseProblem& p, const SampleCoef& coef, const Slice& b,
                                               int64_t hw0, int n, const QuadPos& pos, Fetch fetch, FetchP fetch_p) {
  const int C = CK > 0 ? CK : (int)p.channels, k = p.k;
  const bool valid = coef.valid;
  const float nan = __int_as_float(0x7fc00000);
  const float a = coef.a, bc = coef.bc;
  const SqueezeCoeffs& sc = coef.sc;
  auto load = [&](int c) {
    Quad q;
    fetch(c, q.v);
    return q;
  };
  // pz: the squeezed perturbation of channel c (kPert only)
  // carried: nz_in holds a bad timestep's NaN already (the squeeze's g below), so no select per lane
  auto emit = [&](int c, const float nz_in[4], const float pz[4], bool carried) {
    float nz[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) nz[l] = (carried || valid) ? nz_in[l] : nan;
    if (p.x0.data != nullptr) {
      float x0[4], xt[4], tg[4];
      load_quad<kVec, DT>(p.x0, b, c, hw0, n, pos, x0);
      mix_n(a, bc, x0, nz, p.target, xt, tg, 4);
      if (kPert)  // x_t from n + perturb n' (the CPU kernel's store_sample)
#pragma unroll
        for (int l = 0; l < 4; ++l) xt[l] = a * x0[l] + bc * (nz[l] + p.perturb * pz[l]);
      store_quad<kVec, DT>(p.x_t, b, c, hw0, n, pos, xt);
      store_quad<kVec, DT>(p.out, b, c, hw0, n, pos, tg);
    } else {
      store_quad<kVec, DT>(p.out, b, c, hw0, n, pos, nz);
    }
  };
  if (KA == 0 || k == 0) {  // no squeeze (the CPU kernel skips it too, so s = 0 stays bit-exact)
    for (int c = 0; c < C; ++c) {
      Quad e = load(c), e_p;
      if (kPert) fetch_p(c, e_p.v);
      emit(c, e.v, e_p.v, false);
    }
    return;
  }
  // Two passes over the channels: the projections u_i = v_i . e, then S e per channel.
  constexpr int KU = KA > 0 ? KA : 1;
  constexpr int KP = kPert ? KU : 1;
  float u[KU][4], u_p[KP][4];
#pragma unroll
  for (int i = 0; i < KU; ++i)
#pragma unroll
    for (int l = 0; l < 4; ++l) u[i][l] = 0.f;
  Quad cache[K];
  channels_fill<K>(C, cache, load, [&](int c, const Quad& e) {
#pragma unroll
    for (int i = 0; i < KU; ++i)
      if (i < k) {
        const float v = __ldg(p.axes + c * k + i);
#pragma unroll
        for (int l = 0; l < 4; ++l) u[i][l] += v * e.v[l];
      }
  });
  if (kPert) {  // the perturbation's projections (same order as the CPU's apply_channels)
#pragma unroll
    for (int i = 0; i < KP; ++i)
#pragma unroll
      for (int l = 0; l < 4; ++l) u_p[i][l] = 0.f;
    for (int c = 0; c < C; ++c) {
      float e[4];
      fetch_p(c, e);
#pragma unroll
      for (int i = 0; i < KP; ++i)
        if (i < k) {
          const float v = __ldg(p.axes + c * k + i);
#pragma unroll
          for (int l = 0; l < 4; ++l) u_p[i][l] += v * e[l];
        }
    }
  }
  const float g = valid ? sc.g : nan;  // every S e (g e + ...) NaN for a bad timestep, as emit's select
  channels_cached<K>(C, cache, load, [&](int c, const Quad& e) {
    float s[4], s_p[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) s[l] = g * e.v[l];
    if (kPert) {
      fetch_p(c, s_p);
#pragma unroll
      for (int l = 0; l < 4; ++l) s_p[l] *= g;
    }
#pragma unroll
    for (int i = 0; i < KU; ++i)
      if (i < k) {
        const float coef = sc.f_minus_g[i] * __ldg(p.axes + c * k + i);
#pragma unroll
        for (int l = 0; l < 4; ++l) s[l] += coef * u[i][l];
        if (kPert)
#pragma unroll
          for (int l = 0; l < 4; ++l) s_p[l] += coef * u_p[kPert ? i : 0][l];
      }
    emit(c, s, s_p, true);
  });
}

template <int K, int KA, bool kVec, bool kPert, class Fetch, class FetchP>
__device__ __forceinline__ void add_noise_quad(const NoiseProblem& p, const Slice& b, int64_t hw0, int n,
                                               const QuadPos& pos, Fetch fetch, FetchP fetch_p) {
  add_noise_quad<K, KA, kVec, kPert>(p, sample_coef(p, b.b), b, hw0, n, pos, fetch, fetch_p);
}

// A sample's coefficients as shared-memory floats (one thread computes them, the block reads them after
// a barrier), for k <= 2 (the fused spectral kernels'): a, bc, valid, g, f_i - g.
constexpr int kPackedCoefFloats = 4 + 2;
template <int KA>
__device__ __forceinline__ void pack_coef(const SampleCoef& c, float* m) {
  static_assert(KA <= 2, "kPackedCoefFloats holds k <= 2");
  m[0] = c.a;
  m[1] = c.bc;
  m[2] = c.valid ? 1.f : 0.f;
  m[3] = c.sc.g;
#pragma unroll
  for (int i = 0; i < KA; ++i) m[4 + i] = c.sc.f_minus_g[i];
}
template <int KA>
__device__ __forceinline__ SampleCoef unpack_coef(const float* m) {
  SampleCoef c;
  c.a = m[0];
  c.bc = m[1];
  c.valid = m[2] != 0.f;
  c.sc.g = m[3];
#pragma unroll
  for (int i = 0; i < KA; ++i) c.sc.f_minus_g[i] = m[4 + i];
  return c;
}

// Reads the channels' noise quads in channel order from complex planes that hold two real planes each
// (real plane r: part r & 1 of complex plane r >> 1, as the fused spectral kernels pair them): the read
// of an even real plane keeps its odd partner (the same float2s), so a complex plane is read once per
// pass over the channels, not twice. One reader per quad; pair_at(r): the first of real plane r's 4 float2s.
struct PairedQuadReader {
  float odd[4];
  int odd_r = -1;
  template <class PairAt>
  __device__ __forceinline__ void read(int r, PairAt pair_at, float out[4]) {
    if (r == odd_r) {
#pragma unroll
      for (int l = 0; l < 4; ++l) out[l] = odd[l];
      odd_r = -1;
      return;
    }
    const float2* z = pair_at(r);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const float2 v = z[l];
      out[l] = (r & 1) ? v.y : v.x;
      odd[l] = v.y;
    }
    odd_r = (r & 1) ? -1 : r + 1;
  }
};

// The epilogue of one slice's quads qi = first, first + step, .. < end (pixels 4 qi .. 4 qi + 3) with the
// channel count CK > 0 compiled in, vectorised I/O and no perturbation: add_noise_quad's arithmetic
// (S e = g e + sum_i (f_i - g) v_i (v_i . e), then the mix) with what is the same for every quad of the
// slice hoisted out of the quad loop - the axes and (f_i - g) v_ci in registers, the tensors' slice
// offsets, the target's branch - and a bad timestep's NaN carried by g (every value then NaN, as
// add_noise_quad's). fetch(hw0, s): s[c][l], the shaped noise of channel c at pixel hw0 + l. DT: as
// add_noise_quad's. The quad loop is rolled: the performance model counts its iterations per source line.
template <int KA, int CK, int DT, class Fetch>
__device__ __forceinline__ void epilogue_quads(const NoiseProblem& p, const SampleCoef& coef, const Slice& sl,
                                               int first, int end, int step, Fetch fetch) {
  static_assert(CK > 0, "the channel count is compiled in");
  constexpr int KU = KA > 0 ? KA : 1;
  const int k = KA > 0 ? p.k : 0;
  const float a = coef.a, bc = coef.bc, g = coef.valid ? coef.sc.g : __int_as_float(0x7fc00000);
  float ax[CK][KU], cf[CK][KU];
#pragma unroll
  for (int c = 0; c < CK; ++c)
#pragma unroll
    for (int i = 0; i < KU; ++i) {
      ax[c][i] = i < k ? __ldg(p.axes + c * k + i) : 0.f;
      cf[c][i] = i < k ? coef.sc.f_minus_g[i] * ax[c][i] : 0.f;
    }
  const bool mixing = p.x0.data != nullptr, eps_target = p.target == Target::kEpsilon;
  const int64_t o_x0 = mixing ? p.x0.slice_offset(sl.b, sl.f) : 0, o_xt = mixing ? p.x_t.slice_offset(sl.b, sl.f) : 0;
  const int64_t o_out = p.out.slice_offset(sl.b, sl.f);
#pragma unroll 1
  for (int qi = first; qi < end; qi += step) {
    const int hw0 = qi * 4;
    float s[CK][4];
    fetch(hw0, s);
    if (k > 0) {
      float u[KU][4];
#pragma unroll
      for (int i = 0; i < KU; ++i)
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          u[i][l] = 0.f;
#pragma unroll
          for (int c = 0; c < CK; ++c) u[i][l] += ax[c][i] * s[c][l];
        }
#pragma unroll
      for (int c = 0; c < CK; ++c)
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          float v = g * s[c][l];
#pragma unroll
          for (int i = 0; i < KU; ++i)
            if (i < k) v += cf[c][i] * u[i][l];
          s[c][l] = v;
        }
    } else {
#pragma unroll
      for (int c = 0; c < CK; ++c)
#pragma unroll
        for (int l = 0; l < 4; ++l) s[c][l] *= g;  // g = 1 (or NaN)
    }
#pragma unroll
    for (int c = 0; c < CK; ++c) {
      if (!mixing) {
        store4_dt<DT>(p.out, o_out + c * p.out.stride[1] + hw0, s[c]);
        continue;
      }
      float x0[4], xt[4], tg[4];
      load4_dt<DT>(p.x0, o_x0 + c * p.x0.stride[1] + hw0, x0);
      if (eps_target) {
#pragma unroll
        for (int l = 0; l < 4; ++l) xt[l] = a * x0[l] + bc * s[c][l];
        store4_dt<DT>(p.x_t, o_xt + c * p.x_t.stride[1] + hw0, xt);
        store4_dt<DT>(p.out, o_out + c * p.out.stride[1] + hw0, s[c]);
      } else {
#pragma unroll
        for (int l = 0; l < 4; ++l) mix(a, bc, x0[l], s[c][l], p.target, xt[l], tg[l]);
        store4_dt<DT>(p.x_t, o_xt + c * p.x_t.stride[1] + hw0, xt);
        store4_dt<DT>(p.out, o_out + c * p.out.stride[1] + hw0, tg);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue of add_noise / shaped_noise for one pixel (b, h, w) of the fused kernel: value(c) gives
// the shaped, not yet squeezed noise of channel c (from shared memory, so it is read again instead of
// cached in registers). The sample's coefficients come precomputed (SampleCoef, once per thread), the
// x0 of the first 4 channels is loaded before any store (the tensors may alias as far as the compiler
// knows, so it could not hoist those loads itself).
// ---------------------------------------------------------------------------------------------

// kPert: value_p(c) gives the perturbation's channel c (not squeezed); x_t gets S (n + perturb n').
template <int KA, bool kPert, class Value, class ValueP>
__device__ __forceinline__ void add_noise_pixel(const NoiseProblem& p, const SampleCoef& sc, const Slice& b, int64_t h,
                                                int64_t w, Value value, ValueP value_p) {
  const int C = (int)p.channels, k = KA == 0 ? 0 : p.k;
  const float nan = __int_as_float(0x7fc00000);
  const bool mixing = p.x0.data != nullptr;
  float x0v[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) x0v[c] = (mixing && c < C) ? load_elem(p.x0, elem_at(p.x0, b, c, h, w)) : 0.f;
  constexpr int KU = KA > 0 ? KA : 1;
  constexpr int KP = kPert ? KU : 1;
  float u[KU], u_p[KP];
#pragma unroll
  for (int i = 0; i < KU; ++i) u[i] = 0.f;
#pragma unroll
  for (int i = 0; i < KP; ++i) u_p[i] = 0.f;
  if (k > 0)
    for (int c = 0; c < C; ++c) {
      project_add(u, p.axes, c, k, value(c));
      if (kPert) project_add(u_p, p.axes, c, k, value_p(c));
    }
  auto emit = [&](int c, float x0) {
    float nz = value(c);
    if (k > 0) nz = apply_matrix(sc.sc, nz, p.axes, c, k, u);
    nz = sc.valid ? nz : nan;
    if (mixing) {
      float xt, tg;
      mix(sc.a, sc.bc, x0, nz, p.target, xt, tg);
      if (kPert) {  // x_t from n + perturb n' (the CPU kernel's store_sample)
        float pz = value_p(c);
        if (k > 0) pz = apply_matrix(sc.sc, pz, p.axes, c, k, u_p);
        xt = sc.a * x0 + sc.bc * (nz + p.perturb * pz);
      }
      store_elem(p.x_t, elem_at(p.x_t, b, c, h, w), xt);
      store_elem(p.out, elem_at(p.out, b, c, h, w), tg);
    } else {
      store_elem(p.out, elem_at(p.out, b, c, h, w), nz);
    }
  };
#pragma unroll
  for (int c = 0; c < 4; ++c)
    if (c < C) emit(c, x0v[c]);
  for (int c = 4; c < C; ++c) emit(c, mixing ? load_elem(p.x0, elem_at(p.x0, b, c, h, w)) : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Epilogue of ddpm_step for one pixel (b, h, w); noise(c): the shaped step noise of channel c.
//   x0_hat = (x_t - b_t eps) / a_t, clipped (1: as is, 2: in S(t)^-1 coordinates),
//   x_prev = Ct x_t + (C0 x0_hat + Sig n)          (the CPU kernel's step_sample)
// ---------------------------------------------------------------------------------------------
struct StepVals {
  float x, x0, n;
};

__device__ __forceinline__ float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <int K, int KA, class Noise>
__device__ __forceinline__ void step_pixel(const NoiseProblem& p, const Slice& b, int64_t h, int64_t w, Noise noise) {
  const int C = (int)p.channels, k = p.step_k;
  const float* q = p.step_params + b.b * (2 + 4 * (1 + k));
  const float a = __ldg(q), bt = __ldg(q + 1);
  const float* S = q + 2;
  const float* C0 = S + (1 + k);
  const float* Ct = C0 + (1 + k);
  const float* Sig = Ct + (1 + k);
  const float lo = -p.clip_range, hi = p.clip_range;
  const float* axes = p.axes;
  auto load = [&](int c) {
    const float x = load_elem(p.step_x, elem_at(p.step_x, b, c, h, w));
    const float e = load_elem(p.step_eps, elem_at(p.step_eps, b, c, h, w));
    return StepVals{x, (x - bt * e) / a, noise(c)};
  };
  float u0[KA], uy[KA], uc0[KA], uct[KA], usig[KA];
#pragma unroll
  for (int i = 0; i < KA; ++i) u0[i] = uy[i] = uc0[i] = uct[i] = usig[i] = 0.f;
  StepVals cache[K];
  channels_fill<K>(C, cache, load, [&](int c, const StepVals& s) {
    if (p.step_clip == 2) project_add(u0, axes, c, k, s.x0);
    project_add(uct, axes, c, k, s.x);
    project_add(usig, axes, c, k, s.n);
  });
  SqueezeCoeffs inv_s{}, mat_s{};
  if (p.step_clip == 2) {
    inv_s = step_matrix(S, k, true);
    mat_s = step_matrix(S, k, false);
    channels_cached<K>(C, cache, load, [&](int c, const StepVals& s) {
      project_add(uy, axes, c, k, clampf(apply_matrix(inv_s, s.x0, axes, c, k, u0), lo, hi));
    });
  }
  auto x0_hat = [&](int c, const StepVals& s) {
    if (p.step_clip == 2) {
      const float y = clampf(apply_matrix(inv_s, s.x0, axes, c, k, u0), lo, hi);
      return apply_matrix(mat_s, y, axes, c, k, uy);
    }
    return p.step_clip == 1 ? clampf(s.x0, lo, hi) : s.x0;
  };
  channels_cached<K>(C, cache, load, [&](int c, const StepVals& s) {
    const float x0 = x0_hat(c, s);
    store_elem(p.out_x0, elem_at(p.out_x0, b, c, h, w), x0);
    project_add(uc0, axes, c, k, x0);
  });
  const SqueezeCoeffs m0 = step_matrix(C0, k, false), mt = step_matrix(Ct, k, false),
                      ms = step_matrix(Sig, k, false);
  channels_cached<K>(C, cache, load, [&](int c, const StepVals& s) {
    const float x0 = x0_hat(c, s);
    const float xt = apply_matrix(mt, s.x, axes, c, k, uct);
    const float out = xt + (apply_matrix(m0, x0, axes, c, k, uc0) + apply_matrix(ms, s.n, axes, c, k, usig));
    store_elem(p.out, elem_at(p.out, b, c, h, w), out);
  });
}

// ---------------------------------------------------------------------------------------------
// Block-wide double sum (blockDim.x a multiple of 32, at most 1024). Every thread returns the total;
// the summation order is fixed, so the result is deterministic.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ double block_sum(double v, double* red /* [32] shared */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double t = 0.0;
  for (int i = 0; i < nw; ++i) t += red[i];
  return t;
}

// 1 / (std(x, ddof=0) + 1e-8) of n values get(i), statistics in double (the CPU's normalize_plane).
template <class Get>
__device__ __forceinline__ float plane_inv_std(int n, double* red, Get get) {
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += (double)get(i);
  const double mean = block_sum(s, red) / (double)n;
  double ss = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const double d = (double)get(i) - mean;
    ss += d * d;
  }
  ss = block_sum(ss, red);
  return (float)(1.0 / (sqrt(ss / (double)n) + 1e-8));
}

// ---------------------------------------------------------------------------------------------
// White noise into shared / global buffers: `nseg` segments of `len` consecutive stream elements,
// segment s starting at element start(s); write(s, pos, value). One Philox call per counter.
// ---------------------------------------------------------------------------------------------
template <class Start, class Write, class Div>
__device__ __forceinline__ void generate_segments(const Stream& st, uint32_t draw, int nseg, int len, Start start,
                                                  Write write, Div per_seg_div) {
  const int per_seg = len / 4 + 2;  // counters a segment of len elements can touch
  const int total = nseg * per_seg;
  for (int it = threadIdx.x; it < total; it += blockDim.x) {
    const int s = per_seg_div(it), jq = it - s * per_seg;
    const int64_t first = start(s);
    const int64_t q = (first >> 2) + jq;
    if (4 * q >= first + len) continue;
    float v[4];
    cuda_randn4(st.seed, st.offset + (uint64_t)q, draw, v);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = 4 * q + l;
      if (i >= first && i < first + len) write(s, (int)(i - first), v[l]);
    }
  }
}

template <class Start, class Write>
__device__ __forceinline__ void generate_segments(const Stream& st, uint32_t draw, int nseg, int len, Start start,
                                                  Write write) {
  const int per_seg = len / 4 + 2;
  generate_segments(st, draw, nseg, len, start, write, [per_seg](int it) { return it / per_seg; });
}

// ---------------------------------------------------------------------------------------------
// Stockham FFT on lines held in shared memory. A line set addresses `count` lines of n complex
// elements: line l starts at (l / inner) * outer_stride + (l % inner) * inner_stride, elements are
// estride apart. tw[e] = exp(-2 pi i e / n) for e < n (sg = -1 conjugates: the inverse, unscaled).
// Stage s with radix p and span ns: y[out0 + q ns] = sum_r (W_L^{r k} x[j + r m]) W_p^{r q},
// L = ns p, k = j % ns, out0 = (j - k) p + k (as the CPU kernel's fft_stage).
// ---------------------------------------------------------------------------------------------
struct Lines {
  int count, inner, inner_stride, outer_stride, estride;
  __device__ __forceinline__ int base(int line) const {
    const int o = line / inner;
    return o * outer_stride + (line - o * inner) * inner_stride;
  }
};

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
__device__ __forceinline__ float2 cadd(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ float2 csub(float2 a, float2 b) { return make_float2(a.x - b.x, a.y - b.y); }

__device__ __forceinline__ float2 twiddle(const float2* tw, int e, float sg) {
  const float2 t = tw[e];
  return make_float2(t.x, sg * t.y);
}

// DFT4 of (a0, a1, a2, a3) in place; forward (sg = 1): y1 = d0 - i d1, y3 = d0 + i d1.
__device__ __forceinline__ void dft4(float2& a0, float2& a1, float2& a2, float2& a3, float sg) {
  const float2 s0 = cadd(a0, a2), d0 = csub(a0, a2), s1 = cadd(a1, a3), d1 = csub(a1, a3);
  a0 = cadd(s0, s1);
  a2 = csub(s0, s1);
  a1 = make_float2(d0.x + sg * d1.y, d0.y - sg * d1.x);
  a3 = make_float2(d0.x - sg * d1.y, d0.y + sg * d1.x);
}

// One butterfly (line base, j) of a radix-2/3/4/8 stage.
__device__ __forceinline__ void butterfly(const float2* x, float2* y, int base, int es, int j, int m, int ns, int p,
                                          int tstep, const float2* tw, float sg) {
  const int k = j % ns;
  const int out0 = (j - k) * p + k;
  const float2* xin = x + base + j * es;
  float2* yout = y + base + out0 * es;
  const int xs = m * es, ys = ns * es;
  if (p == 2) {
    const float2 a = xin[0];
    const float2 bb = cmul(xin[xs], twiddle(tw, k * tstep, sg));
    yout[0] = cadd(a, bb);
    yout[ys] = csub(a, bb);
  } else if (p == 3) {
    const float h = sg * 0.866025403784438647f;  // sin(2 pi / 3)
    const float2 a0 = xin[0];
    const float2 a1 = cmul(xin[xs], twiddle(tw, k * tstep, sg));
    const float2 a2 = cmul(xin[2 * xs], twiddle(tw, 2 * k * tstep, sg));
    const float2 s = cadd(a1, a2), d = csub(a1, a2);
    const float2 mm = make_float2(a0.x - 0.5f * s.x, a0.y - 0.5f * s.y);
    yout[0] = cadd(a0, s);
    yout[ys] = make_float2(mm.x + h * d.y, mm.y - h * d.x);
    yout[2 * ys] = make_float2(mm.x - h * d.y, mm.y + h * d.x);
  } else if (p == 4) {
    float2 a0 = xin[0];
    float2 a1 = cmul(xin[xs], twiddle(tw, k * tstep, sg));
    float2 a2 = cmul(xin[2 * xs], twiddle(tw, 2 * k * tstep, sg));
    float2 a3 = cmul(xin[3 * xs], twiddle(tw, 3 * k * tstep, sg));
    dft4(a0, a1, a2, a3, sg);
    yout[0] = a0;
    yout[ys] = a1;
    yout[2 * ys] = a2;
    yout[3 * ys] = a3;
  } else {  // p == 8: DFT4 of the even and of the odd inputs, combined with w8^q
    float2 a[8];
    a[0] = xin[0];
#pragma unroll
    for (int r = 1; r < 8; ++r) a[r] = cmul(xin[r * xs], twiddle(tw, r * k * tstep, sg));
    float2 e0 = a[0], e1 = a[2], e2 = a[4], e3 = a[6];
    float2 o0 = a[1], o1 = a[3], o2 = a[5], o3 = a[7];
    dft4(e0, e1, e2, e3, sg);
    dft4(o0, o1, o2, o3, sg);
    const float h = 0.707106781186547524f;
    // forward w8 = (1 - i) / sqrt 2; the inverse conjugates
    const float2 w1 = make_float2(h * (o1.x + sg * o1.y), h * (o1.y - sg * o1.x));
    const float2 w2 = make_float2(sg * o2.y, -sg * o2.x);
    const float2 w3 = make_float2(h * (sg * o3.y - o3.x), -h * (o3.y + sg * o3.x));
    yout[0] = cadd(e0, o0);
    yout[4 * ys] = csub(e0, o0);
    yout[ys] = cadd(e1, w1);
    yout[5 * ys] = csub(e1, w1);
    yout[2 * ys] = cadd(e2, w2);
    yout[6 * ys] = csub(e2, w2);
    yout[3 * ys] = cadd(e3, w3);
    yout[7 * ys] = csub(e3, w3);
  }
}

// One output q of a generic-radix butterfly (any p): y_q = sum_r x_r W_L^{r (k + q ns) mod L}.
__device__ __forceinline__ void butterfly_generic(const float2* x, float2* y, int base, int es, int j, int q, int m,
                                                  int ns, int p, int tstep, const float2* tw, float sg) {
  const int k = j % ns;
  const int out0 = (j - k) * p + k;
  const int L = ns * p;
  const int step = k + q * ns;  // < L
  const float2* xin = x + base + j * es;
  float2 acc = xin[0];
  int e = 0;
  for (int r = 1; r < p; ++r) {
    e += step;
    if (e >= L) e -= L;
    const float2 t = twiddle(tw, e * tstep, sg);
    const float2 v = xin[r * m * es];
    acc.x += v.x * t.x - v.y * t.y;
    acc.y += v.x * t.y + v.y * t.x;
  }
  y[base + (out0 + q * ns) * es] = acc;
}

// Transforms every line of `lines` (length n, factors f) ping-ponging between x and y; returns the
// buffer that holds the result. Called by all threads of the block (it synchronises per stage).
__device__ __forceinline__ float2* fft_lines(float2* x, float2* y, int n, const FftFactors& f, const float2* tw,
                                             float sg, const Lines& lines) {
  int ns = 1;
  for (int s = 0; s < f.count; ++s) {
    const int p = f.radix[s], m = n / p, tstep = n / (ns * p);
    const bool special = p == 2 || p == 3 || p == 4 || p == 8;
    const int per_q = lines.count * m;
    const int total = special ? per_q : per_q * p;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int qq = special ? 0 : idx / per_q;
      const int rest = idx - qq * per_q;
      int line, j;
      if (lines.estride == 1) {  // rows: consecutive threads walk along the line
        line = rest / m;
        j = rest - line * m;
      } else {  // columns: consecutive threads take neighbouring lines
        j = rest / lines.count;
        line = rest - j * lines.count;
      }
      const int base = lines.base(line);
      if (special) {
        butterfly(x, y, base, lines.estride, j, m, ns, p, tstep, tw, sg);
      } else {
        butterfly_generic(x, y, base, lines.estride, j, qq, m, ns, p, tstep, tw, sg);
      }
    }
    __syncthreads();
    float2* t = x;
    x = y;
    y = t;
    ns *= p;
  }
  return x;
}

// tw[e] = exp(-2 pi i e / n), e < n, computed in double (as the CPU plan's tables) and rounded.
__device__ __forceinline__ void build_twiddles(float2* tw, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    double s, c;
    sincospi(-2.0 * (double)e / (double)n, &s, &c);
    tw[e] = make_float2((float)c, (float)s);
  }
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): cluster_barrier() synchronises every thread of the cluster (and
// orders shared-memory writes before it with peer reads after it); cluster_peer(p, r) is block r's
// copy of the shared-memory address p (distributed shared memory). Under the host emulator
// (tests/cuda_emulation) the blocks of a cluster run together as coroutines.
// ---------------------------------------------------------------------------------------------
#if defined(ANISO_CUDA_EMULATOR)
#define cluster_barrier() emu_cluster_sync(__FILE__, __LINE__)
template <class T>
inline T* cluster_peer(T* p, unsigned rank) {
  return static_cast<T*>(emu_cluster_map((void*)p, rank));
}
#else
__device__ __forceinline__ void cluster_barrier() { cooperative_groups::this_cluster().sync(); }
template <class T>
__device__ __forceinline__ T* cluster_peer(T* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
#endif

// ---------------------------------------------------------------------------------------------
// n / d for 0 <= n < 2^31 and a divisor fixed on the host: a multiply-high and a shift instead of a
// ~20-instruction integer division (the multiplier of CUTLASS's FastDivmod). The fused kernel's index
// maps (slab rows, transposes, FFT stages) divide by H, W, their slab sizes and the stages' spans.
// ---------------------------------------------------------------------------------------------
struct FastDiv {
  int d;
  uint32_t mul, shr;
  __device__ __forceinline__ int div(int n) const {
    return d == 1 ? n : (int)(__umulhi((uint32_t)n, mul) >> shr);
  }
};

inline FastDiv make_fastdiv(int v) {
  FastDiv f{v, 0u, 0u};
  if (v > 1) {
    uint32_t l = 0;
    while ((1ull << l) < (unsigned long long)v) ++l;
    const uint32_t p = 31 + l;
    f.mul = (uint32_t)(((1ull << p) + (unsigned long long)v - 1) / (unsigned long long)v);
    f.shr = p - 32;
  }
  return f;
}

// The stages of a length-n FFT with their spans as fast divisors: stage s has radix radix[s],
// m[s] = n / radix[s] butterflies per line and span ns[s] (the product of the earlier radices).
struct FftStages {
  int count;
  int radix[kMaxFftStages];
  FastDiv m[kMaxFftStages], ns[kMaxFftStages];
  // bit s set: stage s gives consecutive threads consecutive LINES (the same butterfly j of up to 32
  // lines) instead of consecutive butterflies of one line; fused_layout picks it per stage from the
  // stage's modelled bank conflicts (fft_stage_wavefronts). Only which thread runs which butterfly
  // changes, not a butterfly's operations: the result is the same bit for bit.
  uint32_t by_line;
};

inline FftStages make_stages(int n) {
  const FftFactors f = fft_factorize(n);
  FftStages st{};
  st.count = f.count;
  st.by_line = 0u;
  int ns = 1;
  for (int s = 0; s < f.count; ++s) {
    st.radix[s] = f.radix[s];
    st.m[s] = make_fastdiv(n / f.radix[s]);
    st.ns[s] = make_fastdiv(ns);
    ns *= f.radix[s];
  }
  return st;
}

// ---------------------------------------------------------------------------------------------
// Stockham FFT on PLANAR complex lines in shared memory: the real parts of a line set in one float
// array, the imaginary parts `ps` floats later (no 8-byte interleaving: consecutive threads hit
// consecutive banks). Line l starts at (l / inner) * outer_stride + (l % inner) * pitch, elements
// contiguous. Same stages and butterflies as fft_lines (below), so the same operation order.
// ---------------------------------------------------------------------------------------------
struct PlanarLines {
  int count;
  FastDiv inner;
  int pitch, outer_stride;
  FastDiv lines;  // count, as a divisor (the stages FftStages::by_line maps line-fastest)
  __device__ __forceinline__ int base(int line) const {
    const int o = inner.div(line);
    return o * outer_stride + (line - o * inner.d) * pitch;
  }
};

__device__ __forceinline__ float2 ld2(const float* __restrict__ x, int i, int ps) {
  return make_float2(x[i], x[i + ps]);
}
__device__ __forceinline__ void st2(float* __restrict__ y, int i, int ps, float2 v) {
  y[i] = v.x;
  y[i + ps] = v.y;
}

__device__ __forceinline__ void butterfly_planar(const float* __restrict__ x, float* __restrict__ y, int ps, int base,
                                                 int j, int m, int ns, int k, int p, int tstep,
                                                 const float2* __restrict__ tw, float sg) {
  const int out0 = (j - k) * p + k;
  const int ib = base + j, ob = base + out0;
  if (p == 2) {
    const float2 a = ld2(x, ib, ps);
    const float2 bb = cmul(ld2(x, ib + m, ps), twiddle(tw, k * tstep, sg));
    st2(y, ob, ps, cadd(a, bb));
    st2(y, ob + ns, ps, csub(a, bb));
  } else if (p == 3) {
    const float h = sg * 0.866025403784438647f;  // sin(2 pi / 3)
    const float2 a0 = ld2(x, ib, ps);
    const float2 a1 = cmul(ld2(x, ib + m, ps), twiddle(tw, k * tstep, sg));
    const float2 a2 = cmul(ld2(x, ib + 2 * m, ps), twiddle(tw, 2 * k * tstep, sg));
    const float2 s = cadd(a1, a2), d = csub(a1, a2);
    const float2 mm = make_float2(a0.x - 0.5f * s.x, a0.y - 0.5f * s.y);
    st2(y, ob, ps, cadd(a0, s));
    st2(y, ob + ns, ps, make_float2(mm.x + h * d.y, mm.y - h * d.x));
    st2(y, ob + 2 * ns, ps, make_float2(mm.x - h * d.y, mm.y + h * d.x));
  } else if (p == 4) {
    float2 a0 = ld2(x, ib, ps);
    float2 a1 = cmul(ld2(x, ib + m, ps), twiddle(tw, k * tstep, sg));
    float2 a2 = cmul(ld2(x, ib + 2 * m, ps), twiddle(tw, 2 * k * tstep, sg));
    float2 a3 = cmul(ld2(x, ib + 3 * m, ps), twiddle(tw, 3 * k * tstep, sg));
    dft4(a0, a1, a2, a3, sg);
    st2(y, ob, ps, a0);
    st2(y, ob + ns, ps, a1);
    st2(y, ob + 2 * ns, ps, a2);
    st2(y, ob + 3 * ns, ps, a3);
  } else {  // p == 8
    float2 a[8];
    a[0] = ld2(x, ib, ps);
#pragma unroll
    for (int r = 1; r < 8; ++r) a[r] = cmul(ld2(x, ib + r * m, ps), twiddle(tw, r * k * tstep, sg));
    float2 e0 = a[0], e1 = a[2], e2 = a[4], e3 = a[6];
    float2 o0 = a[1], o1 = a[3], o2 = a[5], o3 = a[7];
    dft4(e0, e1, e2, e3, sg);
    dft4(o0, o1, o2, o3, sg);
    const float h = 0.707106781186547524f;
    const float2 w1 = make_float2(h * (o1.x + sg * o1.y), h * (o1.y - sg * o1.x));
    const float2 w2 = make_float2(sg * o2.y, -sg * o2.x);
    const float2 w3 = make_float2(h * (sg * o3.y - o3.x), -h * (o3.y + sg * o3.x));
    st2(y, ob, ps, cadd(e0, o0));
    st2(y, ob + 4 * ns, ps, csub(e0, o0));
    st2(y, ob + ns, ps, cadd(e1, w1));
    st2(y, ob + 5 * ns, ps, csub(e1, w1));
    st2(y, ob + 2 * ns, ps, cadd(e2, w2));
    st2(y, ob + 6 * ns, ps, csub(e2, w2));
    st2(y, ob + 3 * ns, ps, cadd(e3, w3));
    st2(y, ob + 7 * ns, ps, csub(e3, w3));
  }
}

__device__ __forceinline__ void butterfly_generic_planar(const float* __restrict__ x, float* __restrict__ y, int ps,
                                                         int base, int j, int q, int m, int ns, int k, int p,
                                                         int tstep, const float2* __restrict__ tw, float sg) {
  const int out0 = (j - k) * p + k;
  const int L = ns * p;
  const int step = k + q * ns;  // < L
  float2 acc = ld2(x, base + j, ps);
  int e = 0;
  for (int r = 1; r < p; ++r) {
    e += step;
    if (e >= L) e -= L;
    const float2 t = twiddle(tw, e * tstep, sg);
    const float2 v = ld2(x, base + j + r * m, ps);
    acc.x += v.x * t.x - v.y * t.y;
    acc.y += v.x * t.y + v.y * t.x;
  }
  st2(y, base + out0 + q * ns, ps, acc);
}

// Transforms every line of `lines` (length n), ping-ponging between x and y; returns the buffer that
// holds the result (x after an even number of stages). All threads of the block call it.
__device__ __forceinline__ float* fft_planar(float* x, float* y, int ps, int n, const FftStages& f,
                                             const float2* tw, float sg, const PlanarLines& lines) {
  for (int s = 0; s < f.count; ++s) {
    const int p = f.radix[s];
    const FastDiv fm = f.m[s], fns = f.ns[s];
    const int m = fm.d, ns = fns.d, tstep = n / (ns * p);
    const bool special = p == 2 || p == 3 || p == 4 || p == 8;
    const int per_q = lines.count * m;
    const int total = special ? per_q : per_q * p;
    const bool by_line = (f.by_line >> s) & 1u;  // consecutive threads: lines (else butterflies of a line)
    const FastDiv fo = by_line ? lines.lines : fm;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int qq = special ? 0 : idx / per_q;  // generic radices only
      const int rest = idx - qq * per_q;
      const int hi = fo.div(rest), lo = rest - hi * fo.d;
      const int line = by_line ? lo : hi, j = by_line ? hi : lo;
      const int k = j - fns.div(j) * ns;
      const int base = lines.base(line);
      if (special) {
        butterfly_planar(x, y, ps, base, j, m, ns, k, p, tstep, tw, sg);
      } else {
        butterfly_generic_planar(x, y, ps, base, j, qq, m, ns, k, p, tstep, tw, sg);
      }
    }
    __syncthreads();
    float* t = x;
    x = y;
    y = t;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (host and device agree on them).
// ---------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

constexpr int kSpectralThreads = 512;  // two-pass filter kernel
constexpr int kElementwiseThreads = 256;

// Fused path: one CLUSTER of R blocks per sample (R = 1: one block), kFusedThreads each. Block r of
// the cluster owns rows [r Hs, (r + 1) Hs) of every channel plane (Hs = H / R) for the noise, the
// row FFTs, the normalisation and the epilogue, and columns [r Ws, (r + 1) Ws) (Ws = W / R) for the
// column FFTs and the weights; the transposes between the two go through distributed shared memory.
constexpr int kFusedThreads = 128;
constexpr int kFusedMinBlocks = 8;  // __launch_bounds__: at most 64 registers per thread
// Resident blocks per SM the register budget is sized for (__launch_bounds__): the add_noise /
// shaped_noise variants fit 64 registers without spilling (8 blocks of 128 threads per SM); the
// ddpm_step epilogue holds several channel vectors per pixel and gets 128 (k <= 2) / 255 registers.
__host__ __device__ constexpr int fused_min_blocks(int ka, bool step) {
  return step ? (ka > 2 ? 2 : 4) : kFusedMinBlocks;
}
constexpr int kMaxPortableCluster = 8;
constexpr int kMaxCluster = 16;  // sm_90's non-portable limit: only when 8 blocks would leave < 2 per SM

// Geometry and shared-memory layout of a spectral launch (computed on the host, read by the kernels).
struct SpectralGeom {
  int C, H, W, P;
  FftFactors fh, fw;
  int tile;           // two-pass: complex elements per tile
  int rows_per_tile;  // two-pass row phases
  int cols_per_tile;  // two-pass column phase
  // fused: cluster size, slab rows / columns per block, padded line pitches (row lines of Wp floats,
  // column lines of Hp floats), floats per plane in a buffer (planes: channel c at c * PS, the pairs'
  // real parts at even c, imaginary parts at odd c; an odd C has a zero plane C).
  int R, Hs, Ws, Wp, Hp, PS;
  FastDiv dW, dH, dHs, dWs, dSL, dSeg;  // W, H, Hs, Ws, Hs * W, ceil(W / 8) (the sums' segments)
  FastDiv dGen;                         // Hs * W / 4 + 2: Philox counters per slab plane (generate_segments)
  FastDiv dRowLines, dColLines;         // P * Hs, P * Ws: the row and column FFTs' line counts
  FftStages sw, sh;                     // the row (length W) and column (length H) FFT stages
  int nbuf;           // plane buffers: 3 with spectral weights (row, row / column ping-pong, column), else 1
  // off_pert: the input perturbation's finished slab [C][Hs * W] (perturbed problems only)
  uint32_t off_tw_h, off_tw_w, off_buf, off_acc, off_pert, off_red, off_part, off_stat, smem;
};

// Padded pitch of lines of n floats: n rounded up to `residue` (mod 32), by default 5. Consecutive lines
// then start 5 banks apart: the Stockham stages of short lines (several lines per warp) average <= 2-way
// bank conflicts at 32 and 64 (an odd pitch gave 3.5-way), and the transposes (one element per line per
// thread) and the weights (Ws columns x 32 / Ws rows per warp) stay <= 2-way (modelled with the stages'
// index maps). fused_layout also models residue 4.
__host__ __device__ __forceinline__ int line_pitch(int n, int residue = 5) {
  return n + ((residue - n % 32) + 32) % 32;
}

// Modelled shared-memory wavefronts (sm_90: 32 banks of 4-byte words; as tests/cuda_emulation/emu_trace
// scores a warp access) of the first 16 warps of stage s of fft_planar on `count` lines of length n
// (line l at (l / inner) * outer + (l % inner) * pitch), with consecutive threads on consecutive
// butterflies of a line (by_line false) or on consecutive lines: the real and imaginary loads and
// stores and the twiddle reads (two words each) in the butterflies' order. Host only.
inline long fft_stage_wavefronts(int n, const FftStages& st, int s, int count, int inner, int pitch, int outer,
                                 bool by_line) {
  const int p = st.radix[s], m = st.m[s].d, ns = st.ns[s].d, tstep = n / (ns * p);
  const bool special = p == 2 || p == 3 || p == 4 || p == 8;
  const int per_q = count * m, total = special ? per_q : per_q * p;
  const int warps = std::min((total + 31) / 32, 16);
  int base[32], jj[32], kk[32], qv[32];
  int lanes = 0;
  auto score = [&](auto word) {  // the most distinct words any bank holds
    int w[32];
    for (int l = 0; l < lanes; ++l) w[l] = word(l);
    std::sort(w, w + lanes);
    int cnt[32] = {0}, most = 0;
    for (int l = 0; l < lanes; ++l)
      if (l == 0 || w[l] != w[l - 1]) most = std::max(most, ++cnt[((w[l] % 32) + 32) % 32]);
    return (long)most;
  };
  long wf = 0;
  for (int wp = 0; wp < warps; ++wp) {
    lanes = 0;
    for (int t = 0; t < 32 && 32 * wp + t < total; ++t, ++lanes) {
      const int idx = 32 * wp + t, q = special ? 0 : idx / per_q, rest = idx - q * per_q;
      const int d = by_line ? count : m, hi = rest / d, lo = rest - hi * d;
      const int line = by_line ? lo : hi, j = by_line ? hi : lo;
      base[lanes] = (line / inner) * outer + (line % inner) * pitch;
      jj[lanes] = j;
      kk[lanes] = j % ns;
      qv[lanes] = q;
    }
    auto out = [&](int l, int q) { return base[l] + (jj[l] - kk[l]) * p + kk[l] + q * ns; };
    if (special) {
      for (int r = 0; r < p; ++r) {
        wf += 2 * score([&](int l) { return base[l] + jj[l] + r * m; });
        if (r > 0)
          for (int c = 0; c < 2; ++c) wf += score([&](int l) { return 2 * (r * kk[l] * tstep) + c; });
      }
      for (int q = 0; q < p; ++q) wf += 2 * score([&](int l) { return out(l, q); });
    } else {
      const int L = ns * p;
      wf += 2 * score([&](int l) { return base[l] + jj[l]; });
      for (int r = 1; r < p; ++r) {
        for (int c = 0; c < 2; ++c)
          wf += score([&](int l) { return 2 * (((r * (kk[l] + qv[l] * ns)) % L) * tstep) + c; });
        wf += 2 * score([&](int l) { return base[l] + jj[l] + r * m; });
      }
      wf += 2 * score([&](int l) { return out(l, qv[l]); });
    }
  }
  return wf;
}

// Sets st.by_line to the thread map of each stage with the fewer modelled wavefronts (ties: butterflies
// of a line, the original map) and returns the FFT's modelled wavefronts. Memoised (host, thread-safe).
inline long fft_choose_maps(int n, FftStages& st, int count, int inner, int pitch, int outer) {
  static std::mutex mu;
  static std::map<std::array<int, 5>, std::pair<uint32_t, long>> memo;
  const std::array<int, 5> key{n, count, inner, pitch, outer};
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = memo.find(key);
    if (it != memo.end()) {
      st.by_line = it->second.first;
      return it->second.second;
    }
  }
  uint32_t mask = 0;
  long total = 0;
  for (int s = 0; s < st.count; ++s) {
    const long a = fft_stage_wavefronts(n, st, s, count, inner, pitch, outer, false);
    const long b = count > 1 ? fft_stage_wavefronts(n, st, s, count, inner, pitch, outer, true) : a;
    if (b < a) mask |= 1u << s;
    total += std::min(a, b);
  }
  st.by_line = mask;
  std::lock_guard<std::mutex> lock(mu);
  memo[key] = {mask, total};
  return total;
}

// perturb: the kernel also filters the input perturbation's draws (first, into off_pert), so the
// sums' per-draw row partials are kept for twice the draws.
inline void fused_layout(SpectralGeom& g, bool spectral, int draws, bool perturb = false) {
  const int R = g.R;
  const int passes = perturb ? 2 * draws : draws;  // filtered draws (each with its own sums)
  g.Hs = g.H / R;
  g.Ws = g.W / R;
  g.Wp = line_pitch(g.W);
  g.Hp = line_pitch(g.H);
  const int rows = g.Hs * g.Wp, cols = spectral ? g.Ws * g.Hp : 0;
  g.PS = (int)align_up((size_t)(rows > cols ? rows : cols), 4);
  const int ps_alloc = g.PS;  // the buffers' shared memory: the same for either pitch choice below
  g.sw = make_stages(g.W);
  g.sh = make_stages(g.H);
  const int P = g.P;
  if (spectral) {
    // The FFTs' thread map per stage (FftStages::by_line) and the pitches, from the modelled bank
    // conflicts: the pitches above, or lines of n rounded up to 4 (mod 32) with an odd plane size (the
    // complex planes' real parts 2 PS = 2 (mod 4) floats apart), taken when it needs no more shared
    // memory (the buffers keep the first choice's size, so the planner's sizes and choices do not
    // change) and models fewer wavefronts. It is used for slabs of at most 8 rows / columns (R >= H / 8):
    // a transpose's local reads (one element of each of Hs / Ws lines) then stay conflict-free.
    // Only where each butterfly runs changes, so every choice gives the same result bit for bit.
    FftStages sw = g.sw, sh = g.sh;
    const long cost = fft_choose_maps(g.W, sw, P * g.Hs, g.Hs, g.Wp, 2 * g.PS) +
                      fft_choose_maps(g.H, sh, P * g.Ws, g.Ws, g.Hp, 2 * g.PS);
    const int Wp4 = line_pitch(g.W, 4), Hp4 = line_pitch(g.H, 4);
    const int PS4 = (g.Hs * Wp4 > g.Ws * Hp4 ? g.Hs * Wp4 : g.Ws * Hp4) | 1;
    FftStages sw4 = g.sw, sh4 = g.sh;
    long cost4 = cost;
    if (g.Hs <= 8 && g.Ws <= 8 && PS4 <= g.PS)
      cost4 = fft_choose_maps(g.W, sw4, P * g.Hs, g.Hs, Wp4, 2 * PS4) +
              fft_choose_maps(g.H, sh4, P * g.Ws, g.Ws, Hp4, 2 * PS4);
    if (cost4 < cost) {
      g.Wp = Wp4;
      g.Hp = Hp4;
      g.PS = PS4;
      g.sw = sw4;
      g.sh = sh4;
    } else {
      g.sw = sw;
      g.sh = sh;
    }
  }
  g.dRowLines = make_fastdiv(P * g.Hs);
  g.dColLines = make_fastdiv(P * g.Ws);
  g.dW = make_fastdiv(g.W);
  g.dH = make_fastdiv(g.H);
  g.dHs = make_fastdiv(g.Hs);
  g.dWs = make_fastdiv(g.Ws);
  g.dSL = make_fastdiv(g.Hs * g.W);
  g.dSeg = make_fastdiv((g.W + 7) / 8);
  g.dGen = make_fastdiv(g.Hs * g.W / 4 + 2);
  g.nbuf = spectral ? 3 : 2;  // without weights the second buffer is the sums' scratch
  const size_t planes = 2 * (size_t)g.P;
  size_t o = 0;
  g.off_tw_h = (uint32_t)o;
  o = align_up(o + (spectral ? 8 * (size_t)g.H : 0), 16);
  g.off_tw_w = (uint32_t)o;
  o = align_up(o + (spectral ? 8 * (size_t)g.W : 0), 16);
  g.off_buf = (uint32_t)o;
  o = align_up(o + 4 * (size_t)g.nbuf * planes * ps_alloc, 16);
  g.off_acc = (uint32_t)o;
  o = align_up(o + (draws > 1 ? 4 * (size_t)g.C * g.Hs * g.W : 0), 16);
  g.off_pert = (uint32_t)o;
  o = align_up(o + (perturb ? 4 * (size_t)g.C * g.Hs * g.W : 0), 16);
  g.off_red = (uint32_t)o;                     // the sums' row totals of the whole sample [C][H]
  o = align_up(o + 8 * (size_t)g.C * g.H, 16);
  g.off_part = (uint32_t)o;                    // the slab's row sums per draw and statistic [3 passes][C][Hs]
  o = align_up(o + 8 * 3 * (size_t)passes * g.C * g.Hs, 16);
  g.off_stat = (uint32_t)o;                    // mean, total (double), scale, dc term (float) per channel
  o = align_up(o + 24 * (size_t)g.C, 16);
  g.smem = (uint32_t)o;
}

// Two-pass path: the filter's sets of CTAs and the workspace's [slices, C, H, W] sets (the noise, and
// the input perturbation's second set for perturbed problems).
inline int two_pass_sets(const NoiseProblem& p) { return perturbed(p) ? 2 : 1; }

// Two-pass filter kernel: twiddles, two tiles of `tile` complex elements, the reduction scratch.
struct TileLayout {
  size_t tw_h, tw_w, tile_a, tile_b, red, total;
};

__host__ __device__ __forceinline__ TileLayout tile_layout(int H, int W, int tile) {
  TileLayout L;
  L.tw_h = 0;
  L.tw_w = align_up(8 * (size_t)H, 16);
  L.tile_a = align_up(L.tw_w + 8 * (size_t)W, 16);
  L.tile_b = align_up(L.tile_a + 8 * (size_t)tile, 16);
  L.red = align_up(L.tile_b + 8 * (size_t)tile, 16);
  L.total = L.red + 32 * sizeof(double);
  return L;
}


// ---------------------------------------------------------------------------------------------
// Elementwise launches (host). Resident blocks of 256 threads per SM each kernel's register budget is
// sized for (__launch_bounds__): add_noise_fast 3 (C <= 4: <= 85 registers) / 2 (C = 16); the general
// kernel 3 for the common vectorised variants (C <= 4 cached, k <= 2), 2 for their strided I/O (79
// registers spilled 16 B at 85), 1 for the 16-channel or 8-axis caches (144-220 registers); the step
// 2 (k <= 2) / 1.
// ---------------------------------------------------------------------------------------------
__host__ __device__ constexpr int fast_min_blocks(int ck) { return ck > 4 ? 2 : 3; }

// Whether add_noise_fast<CK, k> also takes the input perturbation: it keeps the perturbation's CK x 4
// values and k projections in registers too, which fits its budget without spilling for CK k <= 6
// (ptxas sm_90: <4, 2> spilled 32 B at 80 registers, <16, 1> and <16, 2> 0.6-1.5 KB at 128, also when
// drawing the perturbation again instead of keeping it); the others run the general kernel.
__host__ __device__ constexpr bool fast_perturb_ok(int ck, int k) { return ck * k <= 6; }
__host__ __device__ constexpr int elementwise_min_blocks(int k_cache, int ka, bool vec) {
  return k_cache > 4 || ka > 2 ? 1 : (vec ? 3 : 2);
}

// The channel count of the straight-line kernel add_noise_fast<CK, k> for this problem, or 0 for the
// general one: generated noise of one draw (no caller noise, not the two-pass workspace), vectorised
// I/O, k <= 2, C in {1, 2, 3, 4, 16}; with the input perturbation only where fast_perturb_ok.
inline int fast_channels(const NoiseProblem& p, bool two_pass_input, bool vec) {
  if (two_pass_input || p.noise[0].data != nullptr || !vec || p.k > 2 || p.step_params != nullptr) return 0;
  const int64_t C = p.channels;
  if (perturbed(p) && !fast_perturb_ok((int)C, p.k)) return 0;
  if (io_dtype(p) < 0) return 0;  // mixed dtypes: the kernels with the run-time dtype switch
  return (C >= 1 && C <= 4) || C == 16 ? (int)C : 0;
}

// Resident 256-thread blocks per SM of the kernel launch_elementwise runs for p.
inline int elementwise_residency(const NoiseProblem& p, bool two_pass_input, bool vec) {
  if (p.step_params != nullptr) return p.step_k <= 2 ? 2 : 1;
  const int ck = fast_channels(p, two_pass_input, vec);
  if (ck > 0) return fast_min_blocks(ck);
  const int K = (p.k == 0 || p.channels <= 4) ? 4 : 16, KA = p.k == 0 ? 0 : (p.k <= 2 ? 2 : kMaxAxes);
  return elementwise_min_blocks(K, KA, vec);
}

// 256 threads per block, halved (down to 32) while the grid would leave SMs idle, so a small batch
// still spreads over the GPU (B=16 at 3x32x32: 128 blocks of 32). At most the blocks that are
// resident at once (residency blocks of 256 threads per SM): the rest grid-strides, so no block
// waits for a second wave.
struct ElementwiseLaunch {
  unsigned grid;
  int threads;
};

inline ElementwiseLaunch elementwise_launch(int64_t items, int sm_count, int residency) {
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  int threads = kElementwiseThreads;
  while (threads > 32 && (items + threads - 1) / threads < sms) threads /= 2;
  const int64_t blocks = (items + threads - 1) / threads;
  const int64_t cap = sms * residency * (kElementwiseThreads / threads);
  return ElementwiseLaunch{(unsigned)(blocks < 1 ? 1 : (blocks < cap ? blocks : cap)), threads};
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

// `grid` blocks of `block` threads in clusters of `cluster` blocks (cudaLaunchKernelEx with a cluster
// dimension; a plain launch for 1), `smem` bytes of dynamic shared memory each.
template <class... P, class... A>
cudaError_t launch_clusters(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, unsigned cluster,
                            cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(block, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<A&&>(args)...);
}

// ---------------------------------------------------------------------------------------------
// Launchers (defined in noise_elementwise.cu / noise_spectral.cu, used by noise_cuda.cu)
// ---------------------------------------------------------------------------------------------
// Elementwise add_noise / shaped_noise / ddpm_step; ws: the two-pass workspace [B, C, H, W] fp32
// holding the finished spatial noise, or nullptr to generate / read the white noise here.
cudaError_t launch_elementwise(const NoiseProblem& p, const float* ws, bool vec, int sm_count,
                               cudaStream_t stream);
// smem: the launch's dynamic shared memory; smem_cap: the device's opt-in limit (the kernels' opt-in
// attribute is set to it, see allow_smem above).
cudaError_t launch_fused(const NoiseProblem& p, const SpectralGeom& g, size_t smem_cap, cudaStream_t stream);
cudaError_t launch_two_pass_filter(const NoiseProblem& p, const SpectralGeom& g, size_t smem, size_t smem_cap,
                                   float2* cws, float* ws, cudaStream_t stream);

}  // namespace cuda
}  // namespace anisodiff
