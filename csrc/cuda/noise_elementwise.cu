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

// K: channels kept in registers between the squeeze's two passes (more are fetched again);
// KA: the most squeeze axes handled (0: no squeeze); kPert: input perturbation (common.cuh,
// perturbed): n' from draw D of the stream, or the two-pass workspace's second set.
template <int K, int KA, bool kVec, bool kPert>
__global__ void __launch_bounds__(kThreads, elementwise_min_blocks(K, KA, kVec)) add_noise_elementwise(const NoiseProblem p, const float* ws) {
  const int64_t HW = p.height * p.width, C = p.channels;
  const int64_t quads = (HW + 3) / 4, total = p.batch * p.frames * quads;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  const bool ws_vec = HW % 4 == 0;  // the workspace is contiguous and 256-byte aligned
  // (slice, quad) advanced by the grid stride without a 64-bit division per item (one per thread here)
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const Div64 dq = make_div64(quads), dw = make_div64(p.width), dF = make_div64(p.frames);
  const int64_t stride_b = dq.div(stride), stride_j = stride - stride_b * quads;
  int64_t b = dq.div(first), j = first - b * quads;  // b: the flat slice index
  for (int64_t item = first; item < total; item += stride) {
    const Slice sl = slice_of(b, p.frames, dF);
    const int64_t hw0 = 4 * j;
    const int n = (int)(HW - hw0 < 4 ? HW - hw0 : 4);
    const QuadPos pos = kVec ? QuadPos{} : quad_pos(hw0, dw);
    auto read_ws = [&](const float* src, float e[4]) {
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
    };
    auto fetch = [&](int c, float e[4]) {
      if (ws != nullptr) {  // two-pass: filtered, normalised and scaled already
        read_ws(ws + (b * C + c) * HW + hw0, e);  // [slices, C, H, W]
        return;
      }
      if (p.noise[0].data != nullptr) {
        load_quad<kVec>(p.noise[0], sl, c, hw0, n, pos, e);
      } else {
        stream_quad(st, 0, stream_index(p, sl, c, hw0), n, e);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) e[l] *= gamma;  // a scalar spatial gain (x 1 is exact)
    };
    auto fetch_p = [&](int c, float e[4]) {  // the perturbation: never the caller's noise
      if (ws != nullptr) {  // the workspace's second set [slices, C, H, W]
        read_ws(ws + ((p.batch * p.frames + b) * C + c) * HW + hw0, e);
        return;
      }
      stream_quad(st, (uint32_t)p.draws, stream_index(p, sl, c, hw0), n, e);
#pragma unroll
      for (int l = 0; l < 4; ++l) e[l] *= gamma;
    };
    add_noise_quad<K, KA, kVec, kPert>(p, sl, hw0, n, pos, fetch, fetch_p);
    b += stride_b;
    j += stride_j;
    if (j >= quads) {
      j -= quads;
      ++b;
    }
  }
}

// The training hot path: the canonical stream (no caller noise, no workspace), tensors that pass the
// vectorised-I/O conditions (kVec), exactly CK channels and KK axes (k) known at compile time. Every
// loop is unrolled without a run-time guard, so the grid-stride body is straight-line code: per item
// (4 pixels x CK channels) CK Philox calls with the SFU Box-Muller, the squeeze on registers, the mix,
// and one 16-byte (fp32) / 8-byte (16-bit) load and two stores per channel. The operation order is
// add_noise_quad's (the CPU kernel's). A bad timestep makes the gain NaN, so every output but an x0
// target is NaN (as in the general kernel).
// kPert: input perturbation (add_noise only): per channel a second Philox call gives n' (draw word
// D = 1), squeezed like n (its channels in registers between the squeeze's passes too); x_t =
// a x0 + b (n + perturb n'), the target from n. Only where that fits the budget (fast_perturb_ok).
// DT: the dtype of x0, x_t and out (io_dtype), so their I/O has no dtype switch.
template <int CK, int KK, bool kPert, DType DT>
__global__ void __launch_bounds__(kThreads, fast_min_blocks(CK)) add_noise_fast(const NoiseProblem p) {
  constexpr int KU = KK > 0 ? KK : 1;
  const int64_t HW = p.height * p.width, quads = HW / 4, F = p.frames, total = p.batch * F * quads;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  const bool mixing = p.x0.data != nullptr, eps_target = p.target == Target::kEpsilon;
  // the axes: in registers for the whole loop when few, else read per item (uniform, cached loads)
  constexpr bool kAxesInRegisters = CK * KU <= 8;
  float ax_reg[kAxesInRegisters ? CK : 1][KU];
#pragma unroll
  for (int c = 0; c < (kAxesInRegisters ? CK : 1); ++c)
#pragma unroll
    for (int i = 0; i < KU; ++i) ax_reg[c][i] = KK > 0 ? __ldg(p.axes + c * KK + i) : 0.f;
  auto axis = [&](int c, int i) { return kAxesInRegisters ? ax_reg[kAxesInRegisters ? c : 0][i] : __ldg(p.axes + c * KK + i); };
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const Div64 dq = make_div64(quads), dF = make_div64(F);
  const int64_t stride_b = dq.div(stride), stride_j = stride - stride_b * quads;
  int64_t b = dq.div(first), j = first - b * quads;  // b: the flat slice index
  for (int64_t item = first; item < total; item += stride) {
    const Slice sl = slice_of(b, F, dF);
    const int64_t hw0 = 4 * j;
    bool valid;
    const float* row = coef_row(p, sl.b, valid);
    const float a = __ldg(row), bc = __ldg(row + 1);
    // squeeze_coeffs' arithmetic, with HDM's scale of the complement computed for HDM only
    float sc_g = 1.0f, fmg[KU];
    if (KK > 0 && p.variant == SqueezeVariant::kHeisenberg) {
      float sum_r = 0.f;
#pragma unroll
      for (int i = 0; i < KK; ++i) sum_r += __ldg(row + 2 + i);
      sc_g = expf(sum_r / (float)(CK > KK ? CK - KK : 1));  // HDM has k < C (checked by the ops)
    }
#pragma unroll
    for (int i = 0; i < KU; ++i) fmg[i] = KK > 0 ? expf(-__ldg(row + 2 + i)) - sc_g : 0.f;
    const float gain = valid ? gamma : __int_as_float(0x7fc00000);
    // stream counter of channel c: ((b CK + c) F + f) HW / 4 + hw0 / 4 = ctr + c F quads
    const uint64_t ctr = st.offset + (uint64_t)(((sl.b * CK * F + sl.f) * HW + hw0) >> 2), cstep = F * quads;
    // the item's element in each tensor, once per item; channel c is c (a compile-time constant)
    // channel strides further
    const int64_t o_x0 = p.x0.slice_offset(sl.b, sl.f) + hw0, o_xt = p.x_t.slice_offset(sl.b, sl.f) + hw0,
                  o_out = p.out.slice_offset(sl.b, sl.f) + hw0;
    // nz: the noise of channel c; pz: its squeezed perturbation (kPert only)
    auto emit = [&](int c, const float (&nz)[4], const float (&pz)[4]) {
      if (!mixing) {
        store4_as<DT>(p.out, o_out + c * p.out.stride[1], nz);
        return;
      }
      float x0[4], xt[4], tg[4];
      load4_as<DT>(p.x0, o_x0 + c * p.x0.stride[1], x0);
      if (eps_target) {
#pragma unroll
        for (int l = 0; l < 4; ++l) xt[l] = a * x0[l] + bc * (kPert ? nz[l] + p.perturb * pz[l] : nz[l]);
        store4_as<DT>(p.x_t, o_xt + c * p.x_t.stride[1], xt);
        store4_as<DT>(p.out, o_out + c * p.out.stride[1], nz);
      } else {
#pragma unroll
        for (int l = 0; l < 4; ++l) mix(a, bc, x0[l], nz[l], p.target, xt[l], tg[l]);
        if (kPert)  // x_t from n + perturb n' (the CPU kernel's store_sample)
#pragma unroll
          for (int l = 0; l < 4; ++l) xt[l] = a * x0[l] + bc * (nz[l] + p.perturb * pz[l]);
        store4_as<DT>(p.x_t, o_xt + c * p.x_t.stride[1], xt);
        store4_as<DT>(p.out, o_out + c * p.out.stride[1], tg);
      }
    };
    // the perturbation's white noise of channel c: draw word D (= 1: one draw on this path)
    auto draw_p = [&](int c, float (&e)[4]) {
      cuda_randn4(st.seed, ctr + (uint64_t)c * cstep, (uint32_t)p.draws, e);
#pragma unroll
      for (int l = 0; l < 4; ++l) e[l] *= gain;
    };
    if (KK == 0) {  // no squeeze: each channel is finished as soon as it is drawn
#pragma unroll
      for (int c = 0; c < CK; ++c) {
        float e[4], e_p[4];
        cuda_randn4(st.seed, ctr + (uint64_t)c * cstep, 0u, e);
#pragma unroll
        for (int l = 0; l < 4; ++l) e[l] *= gain;
        if (kPert) draw_p(c, e_p);
        emit(c, e, e_p);
      }
    } else {  // S(t) e: the projections u_i = v_i . e, then g e_c + sum_i (f_i - g) v_ci u_i
      static_assert(!kPert || fast_perturb_ok(CK, KK), "a perturbed variant that spills");
      constexpr int KP = kPert ? KU : 1, CP = kPert ? CK : 1;
      float e[CK][4], u[KU][4], e_p[CP][4], u_p[KP][4];
#pragma unroll
      for (int i = 0; i < KU; ++i)
#pragma unroll
        for (int l = 0; l < 4; ++l) u[i][l] = 0.f;
#pragma unroll
      for (int i = 0; i < KP; ++i)
#pragma unroll
        for (int l = 0; l < 4; ++l) u_p[i][l] = 0.f;
#pragma unroll
      for (int c = 0; c < CK; ++c) {
        cuda_randn4(st.seed, ctr + (uint64_t)c * cstep, 0u, e[c]);
#pragma unroll
        for (int l = 0; l < 4; ++l) e[c][l] *= gain;
#pragma unroll
        for (int i = 0; i < KU; ++i)
#pragma unroll
          for (int l = 0; l < 4; ++l) u[i][l] += axis(c, i) * e[c][l];
        if (kPert) {
          float t[4];
          draw_p(c, t);
#pragma unroll
          for (int i = 0; i < KP; ++i)
#pragma unroll
            for (int l = 0; l < 4; ++l) u_p[i][l] += axis(c, i) * t[l];
#pragma unroll
          for (int l = 0; l < 4; ++l) e_p[kPert ? c : 0][l] = t[l];
        }
      }
#pragma unroll
      for (int c = 0; c < CK; ++c) {
        float s[4], s_p[4];
#pragma unroll
        for (int l = 0; l < 4; ++l) s[l] = sc_g * e[c][l];
        if (kPert)
#pragma unroll
          for (int l = 0; l < 4; ++l) s_p[l] = sc_g * e_p[kPert ? c : 0][l];
#pragma unroll
        for (int i = 0; i < KU; ++i) {
          const float coef = fmg[i] * axis(c, i);
#pragma unroll
          for (int l = 0; l < 4; ++l) s[l] += coef * u[i][l];
          if (kPert)
#pragma unroll
            for (int l = 0; l < 4; ++l) s_p[l] += coef * u_p[kPert ? i : 0][l];
        }
        emit(c, s, s_p);
      }
    }
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
  const int64_t H = p.height, W = p.width, HW = H * W, C = p.channels;
  const int64_t total = p.batch * p.frames * HW;
  const Stream st = read_stream(p);
  const float gamma = p.gammas[0];
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const Div64 dhw = make_div64(HW), dw = make_div64(W), dF = make_div64(p.frames);
  const int64_t stride_b = dhw.div(stride), stride_j = stride - stride_b * HW;
  int64_t b = dhw.div(first), hw = first - b * HW;  // b: the flat slice index
  for (int64_t item = first; item < total; item += stride, b += stride_b, hw += stride_j) {
    if (hw >= HW) {
      hw -= HW;
      ++b;
    }
    const Slice sl = slice_of(b, p.frames, dF);
    const int64_t h = dw.div(hw), w = hw - h * W;
    auto noise = [&](int c) -> float {
      if (ws != nullptr) return ws[(b * C + c) * HW + hw];
      if (p.noise[0].data != nullptr) return load_elem(p.noise[0], elem_at(p.noise[0], sl, c, h, w)) * gamma;
      return stream_normal(st, 0, stream_index(p, sl, c, hw)) * gamma;
    };
    step_pixel<4, KA>(p, sl, h, w, noise);
  }
}

template <int K, int KA, bool kPert>
void launch_add_variant(const NoiseProblem& p, const float* ws, bool vec, const ElementwiseLaunch& L,
                        cudaStream_t stream) {
  if (vec) {
    add_noise_elementwise<K, KA, true, kPert><<<L.grid, L.threads, 0, stream>>>(p, ws);
  } else {
    add_noise_elementwise<K, KA, false, kPert><<<L.grid, L.threads, 0, stream>>>(p, ws);
  }
}

template <int K, int KA>
void launch_add(const NoiseProblem& p, const float* ws, bool vec, const ElementwiseLaunch& L, cudaStream_t stream) {
  if (perturbed(p)) {
    launch_add_variant<K, KA, true>(p, ws, vec, L, stream);
  } else {
    launch_add_variant<K, KA, false>(p, ws, vec, L, stream);
  }
}

// (fast_channels sends the perturbed problems that fast_perturb_ok excludes to the general kernel, so
// those variants are not instantiated.)
template <int CK, bool kPert, DType DT>
void launch_fast_variant(const NoiseProblem& p, const ElementwiseLaunch& L, cudaStream_t stream) {
  if (p.k == 0) {
    add_noise_fast<CK, 0, kPert, DT><<<L.grid, L.threads, 0, stream>>>(p);
  } else if (p.k == 1) {
    if constexpr (!kPert || fast_perturb_ok(CK, 1))
      add_noise_fast<CK, 1, kPert, DT><<<L.grid, L.threads, 0, stream>>>(p);
  } else {
    if constexpr (!kPert || fast_perturb_ok(CK, 2))
      add_noise_fast<CK, 2, kPert, DT><<<L.grid, L.threads, 0, stream>>>(p);
  }
}

template <int CK, DType DT>
void launch_fast_dtype(const NoiseProblem& p, const ElementwiseLaunch& L, cudaStream_t stream) {
  if (perturbed(p)) {
    launch_fast_variant<CK, true, DT>(p, L, stream);
  } else {
    launch_fast_variant<CK, false, DT>(p, L, stream);
  }
}

// (fast_channels sends problems with mixed dtypes to the general kernel: io_dtype is one of the three.)
template <int CK>
void launch_fast(const NoiseProblem& p, const ElementwiseLaunch& L, cudaStream_t stream) {
  switch ((DType)io_dtype(p)) {
    case DType::kFloat32: launch_fast_dtype<CK, DType::kFloat32>(p, L, stream); break;
    case DType::kFloat16: launch_fast_dtype<CK, DType::kFloat16>(p, L, stream); break;
    default: launch_fast_dtype<CK, DType::kBFloat16>(p, L, stream); break;
  }
}

}  // namespace

cudaError_t launch_elementwise(const NoiseProblem& p, const float* ws, bool vec, int sm_count,
                               cudaStream_t stream) {
  const int64_t HW = p.height * p.width;
  if (p.step_params != nullptr) {
    const ElementwiseLaunch L = elementwise_launch(p.batch * p.frames * HW, sm_count,
                                                   elementwise_residency(p, ws != nullptr, vec));
    if (p.step_k <= 2) {
      ddpm_step_elementwise<2><<<L.grid, L.threads, 0, stream>>>(p, ws);
    } else {
      ddpm_step_elementwise<kMaxAxes><<<L.grid, L.threads, 0, stream>>>(p, ws);
    }
    return cudaGetLastError();
  }
  const ElementwiseLaunch grid = elementwise_launch(p.batch * p.frames * ((HW + 3) / 4), sm_count,
                                                    elementwise_residency(p, ws != nullptr, vec));
  switch (fast_channels(p, ws != nullptr, vec)) {
    case 1: launch_fast<1>(p, grid, stream); return cudaGetLastError();
    case 2: launch_fast<2>(p, grid, stream); return cudaGetLastError();
    case 3: launch_fast<3>(p, grid, stream); return cudaGetLastError();
    case 4: launch_fast<4>(p, grid, stream); return cudaGetLastError();
    case 16: launch_fast<16>(p, grid, stream); return cudaGetLastError();
    default: break;
  }
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
