// The fused spectral kernel for power-of-two planes (H, W powers of two, 256 <= H W <= 4096: SD / SDXL
// latents at 32 - 64 pixels, CIFAR / ImageNet-32 / 64 pixel images): one CLUSTER per slice (sample,
// frame) with one block per complex plane (channels 2q, 2q + 1 as real and imaginary parts: T_w is a
// real operator, so they separate exactly) and HW / 8 threads per block. Every thread holds 8 complex
// values per FFT pass in registers: it reads them, the block synchronises, it writes the radix-8 / 4 / 2
// results (in place: every read of a pass is done before any write), so a plane needs one buffer and
// the passes cost one shared-memory read and write per element each. Sizes are powers of two, so every
// index is a shift or a mask. Layout: a plane is float2 [H][W + 1]; consecutive threads take
// neighbouring lines (rows: consecutive h; columns: consecutive w), which the odd pitch makes
// conflict-free for 8-byte accesses. The weights multiply the last forward column pass's outputs in
// registers; the DC bin is applied outside the FFT (w(0) * mean(e), the white planes' means in double,
// added after the statistics, as every backend); the per-plane statistics come from the last inverse pass's registers. Then the
// cluster synchronises and block q runs the epilogue of its share of the slice's pixel quads, reading
// every channel through distributed shared memory (the squeeze mixes channels).
// The general kernel (noise_spectral.cu: any size, row slabs per block) serves the other problems.
#include "spectral_pow2.cuh"

namespace anisodiff {
namespace cuda {
namespace {

// exp(-2 pi i e / 128), e < 128, from the quarter-turn cosines (anisodiff/twiddle.h); tw_pow2 reads the
// table of any n = 2^ln <= 128 as every (128 / n)-th entry. Global (read through L1): the threads of a
// warp read different entries, which the constant cache would serialise.
struct Twiddles128 {
  float2 v[kTwiddleTurn];
};
constexpr Twiddles128 make_twiddles128() {
  Twiddles128 t{};
  for (int e = 0; e < kTwiddleTurn; ++e) t.v[e] = float2{turn_cos128(e), negate_nz(turn_sin128(e))};
  return t;
}
__device__ const Twiddles128 kTwiddle128 = make_twiddles128();

__device__ __forceinline__ float2 tw_pow2(int e, int ln, float sg) {
  const float2 t = __ldg(&kTwiddle128.v[e << (7 - ln)]);
  return make_float2(t.x, sg * t.y);
}

// t, hidden from the optimiser where kPin (64-register variants): a stage's addresses are recomputed
// per stage (a few integer instructions) instead of hoisted out of the draw loop for every inlined stage
// at once, which spilled. The 128-register variants (pow2_roomy) keep them.
template <bool kPin>
__device__ __forceinline__ int opaque(int t) {
#if defined(ANISO_CUDA_EMULATOR)
  return t;
#else
  if constexpr (!kPin) return t;
  int r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(t));
  return r;
#endif
}

// In-register DFTs of a[o .. o + R) in natural output order (forward: sg = 1, exp(-2 pi i / R)).
__device__ __forceinline__ void dft2(float2& a0, float2& a1) {
  const float2 s = cadd(a0, a1);
  a1 = csub(a0, a1);
  a0 = s;
}

__device__ __forceinline__ void dft8(float2 (&a)[8], int o, float sg) {
  float2 e0 = a[o], e1 = a[o + 2], e2 = a[o + 4], e3 = a[o + 6];
  float2 o0 = a[o + 1], o1 = a[o + 3], o2 = a[o + 5], o3 = a[o + 7];
  dft4(e0, e1, e2, e3, sg);
  dft4(o0, o1, o2, o3, sg);
  const float h = 0.707106781186547524f;  // forward w8 = (1 - i) / sqrt 2; the inverse conjugates
  const float2 w1 = make_float2(h * (o1.x + sg * o1.y), h * (o1.y - sg * o1.x));
  const float2 w2 = make_float2(sg * o2.y, -sg * o2.x);
  const float2 w3 = make_float2(h * (sg * o3.y - o3.x), -h * (o3.y + sg * o3.x));
  a[o] = cadd(e0, o0);
  a[o + 4] = csub(e0, o0);
  a[o + 1] = cadd(e1, w1);
  a[o + 5] = csub(e1, w1);
  a[o + 2] = cadd(e2, w2);
  a[o + 6] = csub(e2, w2);
  a[o + 3] = cadd(e3, w3);
  a[o + 7] = csub(e3, w3);
}

// The plane's lines for one FFT direction: rows (n = W, lines along w) or columns (n = H).
struct Pow2Lines {
  int ln;        // log2 of the line length
  int lcount;    // log2 of the number of lines
  int lstride;   // buffer offset between neighbouring lines
  int estride;   // buffer offset between neighbouring elements of a line
  // stage_output's last-stage shortcut (the same positions, fewer instructions per recomputation; the
  // slab kernel and the run-time-C variants, tuned without it, spilled 4 - 12 B with it at 64 registers)
  bool last_direct = false;
};

// Radix of each stage of a line of 2^ln: 8s first, then one 4 or 2 (as fft_factorize).
__device__ __forceinline__ int stage_radix(int lleft) { return lleft >= 3 ? 8 : (lleft == 2 ? 4 : 2); }
__device__ __forceinline__ int radix_log2(int R) { return R == 8 ? 3 : (R == 4 ? 2 : 1); }

// Output i (< 8) of thread t in a radix-R stage of span ns: its line and element. Butterfly u = i / R of
// thread t is idx = t + u T (consecutive threads take neighbouring lines), output r = i % R.
template <int R>
__device__ __forceinline__ void stage_output(const Pow2Lines& L, int ns, int t, int T, int i, int& line, int& elem) {
  const int idx = t + (i / R) * T, j = idx >> L.lcount, k = j & (ns - 1);
  line = idx & ((1 << L.lcount) - 1);
  // In the last stage (ns R = n) j < ns, so k = j: the same element from one add (ptxas recomputes
  // these positions instead of keeping them in registers, so their cost repeats per value)
  elem = L.last_direct && ns * R == (1 << L.ln) ? j + (i % R) * ns : (j - k) * R + k + (i % R) * ns;
}

// One radix-R Stockham stage (span ns) over every line of the plane in buf, in place: each thread reads
// the inputs of its 8 / R butterflies into a, applies the twiddles and the DFTs, last(a) sees the
// outputs (weights, DC bin), the block synchronises (every read done), and unless keep the outputs go
// back to buf (then the block synchronises again). in_regs: a holds the inputs already (no reads, so
// no barrier before the writes; fft_lines_pow2's first_in_regs).
template <bool kPin, int R, class Last>
__device__ __forceinline__ void fft_stage(float2* buf, const Pow2Lines& L, int ns, float sg, int t, int T,
                                          float2 (&a)[8], bool keep, Last last, bool in_regs = false) {
  t = opaque<kPin>(t);
  const int m = (1 << L.ln) / R, tstep = (1 << L.ln) / (ns * R);
#pragma unroll
  for (int u = 0; u < 8 / R; ++u) {
    const int idx = t + u * T, l = idx & ((1 << L.lcount) - 1), j = idx >> L.lcount, k = j & (ns - 1);
    const float2* in = buf + l * L.lstride + j * L.estride;
    if (!in_regs)
#pragma unroll
      for (int r = 0; r < R; ++r) a[u * R + r] = in[r * m * L.estride];
    if (ns > 1)
#pragma unroll
      for (int r = 1; r < R; ++r) a[u * R + r] = cmul(a[u * R + r], tw_pow2(r * k * tstep, L.ln, sg));
    if (R == 8) {
      dft8(a, 0, sg);
    } else if (R == 4) {
      dft4(a[u * 4], a[u * 4 + 1], a[u * 4 + 2], a[u * 4 + 3], sg);
    } else {
      dft2(a[u * 2], a[u * 2 + 1]);
    }
  }
  last(a);
  if (!in_regs) __syncthreads();
  if (keep) return;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    int line, elem;
    stage_output<R>(L, ns, t, T, i, line, elem);
    buf[line * L.lstride + elem * L.estride] = a[i];
  }
  __syncthreads();
}

// The last stage of a line of 2^ln: its radix and span.
__device__ __forceinline__ void last_stage(int ln, int& R, int& ns) {
  int left = ln;
  ns = 1;
  R = stage_radix(left);
  while (left > radix_log2(R)) {
    left -= radix_log2(R);
    ns *= R;
    R = stage_radix(left);
  }
}

// Every stage of one direction over the plane. The last stage's outputs stay in a (not written) when
// keep_last; last(a, R, ns) runs on them first (weights, DC bin: stage_output<R> gives their place).
// first_in_regs: a holds the first stage's inputs (lines of radix-8 stages only: radix8_lines).
template <bool kPin, class Last>
__device__ __forceinline__ void fft_lines_pow2(float2* buf, const Pow2Lines& L, float sg, int t, int T, bool keep_last,
                                               float2 (&a)[8], Last last, bool first_in_regs = false) {
  int ns = 1;
#pragma unroll  // at most 3 stages; with a compile-time size (LH, LW) every radix and span is a constant
  for (int left = L.ln; left > 0;) {
    const int R = stage_radix(left);
    left -= radix_log2(R);
    const bool fin = left == 0, keep = fin && keep_last;
    auto post = [&](float2 (&x)[8]) {
      if (fin) last(x, R, ns);
    };
    if (R == 8) fft_stage<kPin, 8>(buf, L, ns, sg, t, T, a, keep, post, first_in_regs && ns == 1);
    else if (R == 4) fft_stage<kPin, 4>(buf, L, ns, sg, t, T, a, keep, post);
    else fft_stage<kPin, 2>(buf, L, ns, sg, t, T, a, keep, post);
    ns *= R;
  }
}

// Whether every stage of a line of 2^ln is radix 8 (8, 64). Then the last stage's output i of thread t
// (span n / 8: element j + i n / 8 of line l, j and l from t) is the first stage's input i of thread t
// (element j + r n / 8): one direction's outputs are the next direction's inputs in registers.
__device__ __forceinline__ bool radix8_lines(int ln) { return ln % 3 == 0; }

// Buffer position of output i of thread t in the last row stage (radix R, span ns).
__device__ __forceinline__ int row_output_pos(const Pow2Lines& rows, int R, int ns, int t, int T, int i) {
  int line, elem;
  if (R == 8) stage_output<8>(rows, ns, t, T, i, line, elem);
  else if (R == 4) stage_output<4>(rows, ns, t, T, i, line, elem);
  else stage_output<2>(rows, ns, t, T, i, line, elem);
  return line * rows.lstride + elem;
}

// Block-wide sums of a and b in double, finished by thread 0 alone: the warps' partials go through red
// (64 doubles), thread 0 adds them in warp order (a fixed order, so deterministic) and runs fin(a, b),
// which leaves what every thread needs in shared memory, read by all after the second barrier. (Every
// thread adding the 16 partials and running the double divisions and square roots itself: ~24 of the
// ~167 instructions per element at 4 x 64 x 64 in the performance model, a thread holding only 16 of
// the plane's values.) No leading
// barrier: red is read by thread 0 before the second barrier, and written again only after it.
// nw: the block's warps (a constant where the plane size is compiled in: thread 0's loop then unrolls
// into exactly nw copies, not a remainder loop around an unrolled body).
template <class Fin>
__device__ __forceinline__ void block_sum2(double a, double b, double* red, int nw, Fin fin) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xFFFFFFFFu, a, o);
    b += __shfl_xor_sync(0xFFFFFFFFu, b, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    red[2 * warp] = a;
    red[2 * warp + 1] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0;
    b = 0.0;
    for (int i = 0; i < nw; ++i) {
      a += red[2 * i];
      b += red[2 * i + 1];
    }
    fin(a, b);
  }
  __syncthreads();
}

// The kernel's misc shared floats: a draw's DC terms, means and scales ((re, im) each; block_sum2's fin
// writes them, every thread reads them after its barrier), then the sample's epilogue coefficients
// (thread 0's sample_coef, pack_coef's layout).
enum : int { kMiscDc = 0, kMiscMean = 2, kMiscScale = 4, kMiscCoef = 8, kMiscSlices = 14 };

// t's data at slice sl (element slice_offset; null stays null), DT as load_quad's (-1: t's own dtype).
template <int DT>
__device__ __forceinline__ void* slice_data(const TensorArg& t, const Slice& sl) {
  if (t.data == nullptr) return nullptr;
  const int64_t bytes = DT >= 0 ? (DT == (int)DType::kFloat32 ? 4 : 2) : (t.dtype == DType::kFloat32 ? 4 : 2);
  return static_cast<char*>(t.data) + t.slice_offset(sl.b, sl.f) * bytes;
}

// The slice's launch: block q of the cluster of slice s = blockIdx.x / P owns complex plane q
// (channels 2q, 2q + 1). Per set (n; n' of the input perturbation) and draw d:
//   1. white noise of the plane into buf (caller's noise for set 0 when given)
//   2. T_w: row FFTs, column FFTs with the weights (DC bin zeroed, its value kept for w(0) mean(e)),
//      inverse columns, inverse rows kept in registers; + w(0) mean(e)
//   3. per-plane normalisation from the registers (statistics in double), gain; into buf (one draw,
//      one set) or summed into acc[set]
// then the cluster synchronises and each block runs the epilogue of its share of the quads (pixels for
// the step), reading every plane through DSMEM.
// LH, LW: log2 of H and W fixed at compile time (the hot sizes: every index, radix and stride of the
// passes a constant, the loads and stores immediate offsets from one base), or 0: taken from g.
// DT >= 0: the dtype of x0, x_t and out compiled in (io_dtype; with CK), -1: switched at run time.
template <int KA, bool kStep, bool kVec, bool kPert, int LH, int LW, int CK = 0, int DT = -1>
__global__ void __launch_bounds__(pow2_bound_threads(LH, LW), pow2_min_blocks(kStep, kPert, kVec, LH, LW))
    fused_spectral_pow2(const NoiseProblem p, const Pow2Geom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr bool kPin = !pow2_roomy(LH, LW);  // (opaque)
  const int lh = LH > 0 ? LH : g.lh, lw = LW > 0 ? LW : g.lw, H = 1 << lh, W = 1 << lw, HW = H * W;
  const int Wp = LW > 0 ? W + 1 : g.pitch;
  const int P = CK > 0 ? (CK + 1) / 2 : g.P;  // (a constant divisor where C is compiled in)
  const int t = threadIdx.x, T = LH > 0 ? HW / 8 : g.threads;
  const int64_t slice = blockIdx.x / P;
  const int q = (int)(blockIdx.x - slice * P);
  const Slice sl = slice_of32(slice, p.frames);
  const int C = (int)p.channels, c0 = 2 * q;
  const bool has_im = c0 + 1 < C;
  float2* const buf = reinterpret_cast<float2*>(smem);
  float2* const acc = reinterpret_cast<float2*>(smem + g.off_acc);
  double* const red = reinterpret_cast<double*>(smem + g.off_red);
  static_assert(kMiscCoef + kPackedCoefFloats <= kMiscSlices, "misc holds the sample's coefficients");
  static_assert(kMiscSlices % 2 == 0 && kMiscSlices + 6 <= kPow2MiscFloats, "and 3 aligned pointers");
  float* const misc = reinterpret_cast<float*>(smem + g.off_misc);  // kMisc*
  const size_t plane = (size_t)H * Wp;
  const Stream st = read_stream(p);
  const bool spectral = p.weights != nullptr;
  const Pow2Lines rows{lw, lh, Wp, 1, CK > 0};
  const Pow2Lines cols{lh, lw, 1, Wp, CK > 0};
  const float inv = 1.0f / (float)HW;
  const double inv_hw = 1.0 / (double)HW;  // x * inv_hw == x / HW exactly: HW is a power of two
  float2 v[8];
  int last_r, last_ns;  // the last row stage: where the thread's values of v sit in the plane
  last_stage(lw, last_r, last_ns);
  // tt: t through opaque, once per loop over i (hoisted out of the draw loop, the 8 positions spilled;
  // per i, each position was computed from scratch: ~4 SASS per element at 4 x 64 x 64). From one tt
  // the positions of a radix-8 stage are one base plus immediate offsets.
  // (The variants with a run-time C still recompute per i: with one base they spilled 4 B.)
  auto pos = [&](int tt, int i) {
    if constexpr (CK == 0) tt = opaque<kPin>(tt);
    if (spectral) return row_output_pos(rows, last_r, last_ns, tt, T, i);
    const int px = tt + i * T;
    return (px >> lw) * Wp + (px & (W - 1));
  };
  for (int s = 0; s < g.sets; ++s) {
    for (int d = 0; d < p.draws; ++d) {
      if (s > 0 || d > 0) __syncthreads();  // the previous draw's reads of buf are done
      // 1. white noise: quad u of thread t is row (t + u T) % H, columns 4 ((t + u T) / H) + 0..3
      const TensorArg& nz = p.noise[d];
      const bool given = s == 0 && nz.data != nullptr;
      const uint32_t word = (uint32_t)(s * p.draws + d);
      float e_re = 0.f, e_im = 0.f;  // this thread's part of the white planes' sums (the DC term)
#pragma unroll 1  // unrolled, the four Philox calls' live ranges overlap and spill at 64 registers
      for (int u = 0; u < 2; ++u) {
        const int qi = t + u * T, h = qi & (H - 1), w0 = (qi >> lh) << 2;
        float re[4], im[4] = {0.f, 0.f, 0.f, 0.f};
        if (given) {
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            re[l] = load_elem(nz, elem_at(nz, sl, c0, h, w0 + l));
            if (has_im) im[l] = load_elem(nz, elem_at(nz, sl, c0 + 1, h, w0 + l));
          }
        } else {
          const int64_t i0 = stream_index(p, sl, c0, (int64_t)h * W + w0);  // a multiple of 4
          cuda_randn4(st.seed, st.offset + (uint64_t)(i0 >> 2), word, re);
          if (has_im) cuda_randn4(st.seed, st.offset + (uint64_t)((i0 + (int64_t)p.frames * HW) >> 2), word, im);
        }
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          buf[h * Wp + w0 + l] = make_float2(re[l], im[l]);
          e_re += re[l];
          e_im += im[l];
        }
      }
      __syncthreads();
      // 2. the spatial filter
      float dc_re = 0.f, dc_im = 0.f;
      if (spectral) {
        const float* wd = p.weights + (size_t)d * HW;
        const float dc = __ldg(wd);
        if (dc != 0.f) {  // w(0) mean(e), the white planes' means in double (the CPU's plane_mean)
          block_sum2(e_re, e_im, red, T >> 5, [&](double a, double b) {  // read after the passes' barriers
            misc[kMiscDc] = (float)(dc * (a * inv_hw));
            misc[kMiscDc + 1] = (float)(dc * (b * inv_hw));
          });
        }
        auto none = [](float2(&)[8], int, int) {};
        fft_lines_pow2<kPin>(buf, rows, 1.f, t, T, false, v, none);
        // the weighted forward columns stay in registers as the inverse columns' inputs where the
        // columns are radix-8 lines (64 x 64: a shared-memory round trip and a barrier fewer); not in
        // the 64 x 64 variant with a run-time C, which then spilled 4 B at its 64 registers
        const bool fuse = radix8_lines(lh) && !(LH > 0 && CK == 0);
        fft_lines_pow2<kPin>(buf, cols, 1.f, t, T, fuse, v, [&](float2 (&a)[8], int R, int ns) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {  // column line = w, element el = h
            int w, h;
            if (R == 8) stage_output<8>(cols, ns, t, T, i, w, h);
            else if (R == 4) stage_output<4>(cols, ns, t, T, i, w, h);
            else stage_output<2>(cols, ns, t, T, i, w, h);
            const float wv = __ldg(wd + (h << lw) + w) * inv;
            a[i] = make_float2(a[i].x * wv, a[i].y * wv);
          }
          // the DC bin (w(0) mean(e) is added after the inverse): output 0 of thread 0, as (t, i) ->
          // (line, element) is one-to-one and (0, 0) goes to (0, 0); one test instead of one per value
          if (t == 0) a[0] = make_float2(0.f, 0.f);
        });
        fft_lines_pow2<kPin>(buf, cols, -1.f, t, T, false, v, none, fuse);
        fft_lines_pow2<kPin>(buf, rows, -1.f, t, T, true, v, none);
        if (dc != 0.f) {
          dc_re = misc[kMiscDc];
          dc_im = misc[kMiscDc + 1];
        }
      } else {
        const int tt = CK == 0 ? t : opaque<kPin>(t);  // (pos applies it per i for CK == 0)
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = buf[pos(tt, i)];
      }
      // 3. per-plane normalisation: 1 / (std + 1e-8) of the plane without its DC term (a constant; a
      // huge one would cost the statistics their float32 accuracy), then (v + DC) * gain, as the CPU's
      // finish_plane
      float sc_re = 1.f, sc_im = 1.f;
      if (p.per_sample_norm) {  // (per-thread partials of 8 values in float, the block's sum in double)
        float s_re = 0.f, s_im = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          s_re += v[i].x;
          s_im += v[i].y;
        }
        block_sum2(s_re, s_im, red, T >> 5, [&](double a, double b) {
          misc[kMiscMean] = (float)(a * inv_hw);
          misc[kMiscMean + 1] = (float)(b * inv_hw);
        });
        const float mr = misc[kMiscMean], mi = misc[kMiscMean + 1];
        float q_re = 0.f, q_im = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float a = v[i].x - mr, b = v[i].y - mi;
          q_re = fmaf(a, a, q_re);
          q_im = fmaf(b, b, q_im);
        }
        block_sum2(q_re, q_im, red, T >> 5, [&](double a, double b) {
          misc[kMiscScale] = (float)(1.0 / (sqrt(a * inv_hw) + 1e-8));
          misc[kMiscScale + 1] = (float)(1.0 / (sqrt(b * inv_hw) + 1e-8));
        });
        sc_re = misc[kMiscScale];
        sc_im = misc[kMiscScale + 1];
      }
      const float gamma = p.gammas[d];
      const int tt = CK == 0 ? t : opaque<kPin>(t);  // (pos applies it per i for CK == 0)
      if (!g.acc) {
        // one product per value: the gain folded into the scale (exactly (v + DC) gamma without the
        // per-sample normalisation, whose scale is 1; within an ulp of ((v + DC) scale) gamma with it)
        const float g_re = sc_re * gamma, g_im = sc_im * gamma;
#pragma unroll
        for (int i = 0; i < 8; ++i) buf[pos(tt, i)] = make_float2((v[i].x + dc_re) * g_re, (v[i].y + dc_im) * g_im);
      } else {
        float2* as = acc + s * plane;  // only this thread's positions: no barrier between draws
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float2 x = make_float2((v[i].x + dc_re) * sc_re, (v[i].y + dc_im) * sc_im);
          float2& y = as[pos(tt, i)];
          y = d == 0 ? make_float2(x.x * gamma, x.y * gamma) : make_float2(y.x + gamma * x.x, y.y + gamma * x.y);
        }
      }
    }
  }
  if constexpr (!kStep) {
    // the epilogue's coefficients (x0 scale, noise scale, S(t): k exponentials), once per block by
    // thread 0 (every thread computing them: ~3% of the 4 x 64 x 64 kernel's instructions); read by all
    // after the barrier below
    // and x0, x_t and out at this slice: each thread computing the 64-bit slice offsets itself cost
    // ~1.5 SASS per element at 4 x 64 x 64, where a thread has one quad of the slice
    if (t == 0) {
      pack_coef<KA>(sample_coef<KA>(p, sl.b), misc + kMiscCoef);
      uint64_t* at = reinterpret_cast<uint64_t*>(misc + kMiscSlices);
      const TensorArg* ts[3] = {&p.x0, &p.x_t, &p.out};
#pragma unroll
      for (int i = 0; i < 3; ++i) at[i] = (uint64_t)slice_data<DT>(*ts[i], sl);
    }
  }
  if (P > 1) cluster_barrier(); else __syncthreads();  // every plane of the slice is finished
  // 4. epilogue: block q's share of the slice's quads (pixels for the step), every channel
  float2* const fin = g.acc ? acc : buf;
  // (the rank hidden from the optimiser: hoisted out of the quad loop, the 64-bit peer addresses of
  // every cached channel spilled)
  auto plane_of = [&](int c) -> const float2* {
    return P > 1 ? cluster_peer(fin, (unsigned)opaque<kPin>(c >> 1)) : fin;
  };
  if constexpr (kStep) {
    const int per = (HW + P - 1) / P, end = (q + 1) * per < HW ? (q + 1) * per : HW;
    for (int px = q * per + t; px < end; px += T) {
      const int h = px >> lw, w = px & (W - 1), at = h * Wp + w;
      step_pixel<1, KA>(p, sl, h, w, [&](int c) {
        const float2 z = plane_of(c)[at];
        return (c & 1) ? z.y : z.x;
      });
    }
  } else {
    const SampleCoef coef = unpack_coef<KA>(misc + kMiscCoef);  // thread 0's (above)
    // the problem with its tensors moved to this slice (thread 0's pointers), addressed as slice (0, 0)
    NoiseProblem ps = p;
    const uint64_t* at0 = reinterpret_cast<const uint64_t*>(misc + kMiscSlices);
    ps.x0.data = reinterpret_cast<void*>(at0[0]);
    ps.x_t.data = reinterpret_cast<void*>(at0[1]);
    ps.out.data = reinterpret_cast<void*>(at0[2]);
    const Slice s0{0, 0};
    const int nq = HW / 4, per = (nq + P - 1) / P, end = (q + 1) * per < nq ? (q + 1) * per : nq;
    for (int qi = q * per + t; qi < end; qi += T) {
      const int hw0 = qi * 4, h = hw0 >> lw, w = hw0 & (W - 1), at = h * Wp + w;
      QuadPos qp;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        qp.h[l] = h;
        qp.w[l] = w + l;
      }
      PairedQuadReader rd;  // the channels come in order: a plane is read once per pass
      add_noise_quad<(CK > 0 ? CK : 1), KA, kVec, kPert, CK, DT>(
          ps, coef, s0, hw0, 4, qp, [&](int c, float out[4]) { rd.read(c, [&](int r) { return plane_of(r) + at; }, out); },
          [&](int c, float out[4]) {
            const float2* z = plane_of(c) + plane + at;  // acc[1]: the perturbation's set
#pragma unroll
            for (int l = 0; l < 4; ++l) out[l] = (c & 1) ? z[l].y : z[l].x;
          });
    }
  }
  if (P > 1) cluster_barrier();  // no block leaves while a peer may still read its shared memory
}

// ---------------------------------------------------------------------------------------------
// fused_spectral_slabs128: 128 x 128 planes (SDXL latents, C <= 4) for the hot path (one draw from the
// stream, no perturbation, vectorised I/O). A complex plane (channels 2 pl, 2 pl + 1) is too big for
// this kernel's 8 values per thread in one block, so it is split over kSlabQ = 4 blocks of a cluster of
// P x 4 (rank pl * 4 + q: rows 32 q .. 32 q + 31 of plane pl), each with the power-of-two stages above
// on 512 threads:
//   1. white noise of the row slab ([32][129] float2)
//   2. 128-point row FFTs on it; cluster barrier; the column slab ([128][33]: columns 32 q ..) gathered
//      from the plane's 4 row slabs through DSMEM; column FFTs, weights (DC bin zeroed), inverse columns;
//      cluster barrier; the row slab gathered back from the 4 column slabs; inverse rows in registers
//   3. the DC term and the per-plane statistics as cluster sums (slab_sum2: a fixed order, so every
//      block of the plane gets the same bits); (v + DC) scale gain into the row slab
//   4. cluster barrier; the epilogue of the slab's quads, shared by the P blocks of this q, every channel
//      read through DSMEM (PairedQuadReader), then a last cluster barrier.
// The general cluster kernel (noise_spectral.cu) keeps everything else at this size.
// ---------------------------------------------------------------------------------------------
// The plane's sums (re, im) over its kSlabQ blocks: each block's in slot k of part, read by all after a
// cluster barrier in rank order (deterministic, the same in every block).
template <class Fin>
__device__ __forceinline__ void slab_sum2(float a, float b, double* red, double* part, int k, int pl, Fin fin) {
  block_sum2(a, b, red, kSlabThreads >> 5, [&](double x, double y) {
    part[2 * k] = x;
    part[2 * k + 1] = y;
  });
  cluster_barrier();
  double x = 0.0, y = 0.0;
#pragma unroll
  for (int o = 0; o < kSlabQ; ++o) {
    const double* pp = cluster_peer(part, (unsigned)(pl * kSlabQ + o));
    x += pp[2 * k];
    y += pp[2 * k + 1];
  }
  fin(x, y);
}

template <int KA, int CK, int DT>
__global__ void __launch_bounds__(kSlabThreads, 2) fused_spectral_slabs128(const NoiseProblem p, const SlabGeom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int H = kSlabSide, W = kSlabSide, HW = H * W, T = kSlabThreads;
  const int P = CK > 0 ? (CK + 1) / 2 : g.P, Q = kSlabQ;
  const int t = threadIdx.x;
  const int64_t slice = blockIdx.x / (P * Q);
  const int rank = (int)(blockIdx.x - slice * (P * Q)), pl = rank / Q, q = rank - pl * Q;
  const Slice sl = slice_of32(slice, p.frames);
  const int C = CK > 0 ? CK : (int)p.channels, c0 = 2 * pl;
  const bool has_im = c0 + 1 < C;
  float2* const rowb = reinterpret_cast<float2*>(smem);  // [32][129]: rows 32 q .. of plane pl
  float2* const colb = reinterpret_cast<float2*>(smem + g.off_col);  // [128][33]: columns 32 q ..
  double* const red = reinterpret_cast<double*>(smem + g.off_red);
  double* const part = reinterpret_cast<double*>(smem + g.off_part);
  float* const misc = reinterpret_cast<float*>(smem + g.off_misc);
  const Stream st = read_stream(p);
  const bool spectral = p.weights != nullptr;
  const Pow2Lines rows{7, 5, kSlabRowPitch, 1};  // 32 lines of 128 along w
  const Pow2Lines cols{7, 5, 1, kSlabColPitch};  // 32 lines of 128 along h
  const float inv = 1.0f / (float)HW;
  const double inv_hw = 1.0 / (double)HW;
  float2 v[8];
  int last_r, last_ns;
  last_stage(7, last_r, last_ns);
  auto pos = [&](int i) {
    if (spectral) return row_output_pos(rows, last_r, last_ns, t, T, i);
    const int px = t + i * T;
    return (px >> 7) * kSlabRowPitch + (px & (W - 1));
  };
  // 1. white noise of the slab: quad u of thread t is slab row (t + u T) % 32, columns 4 ((t + u T) / 32) ..
  float e_re = 0.f, e_im = 0.f;
#pragma unroll 1
  for (int u = 0; u < 2; ++u) {
    const int qi = t + u * T, hl = qi & (kSlabRows - 1), w0 = (qi >> 5) << 2;
    float re[4], im[4] = {0.f, 0.f, 0.f, 0.f};
    const int64_t i0 = stream_index(p, sl, c0, (int64_t)(q * kSlabRows + hl) * W + w0);
    cuda_randn4(st.seed, st.offset + (uint64_t)(i0 >> 2), 0u, re);
    if (has_im) cuda_randn4(st.seed, st.offset + (uint64_t)((i0 + (int64_t)p.frames * HW) >> 2), 0u, im);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      rowb[hl * kSlabRowPitch + w0 + l] = make_float2(re[l], im[l]);
      e_re += re[l];
      e_im += im[l];
    }
  }
  __syncthreads();
  float dc_re = 0.f, dc_im = 0.f;
  if (spectral) {
    const float dc = __ldg(p.weights);
    if (dc != 0.f)
      slab_sum2(e_re, e_im, red, part, 0, pl, [&](double a, double b) {
        dc_re = (float)(dc * (a * inv_hw));
        dc_im = (float)(dc * (b * inv_hw));
      });
    auto none = [](float2(&)[8], int, int) {};
    fft_lines_pow2<true>(rowb, rows, 1.f, t, T, false, v, none);
    cluster_barrier();  // every slab's rows are transformed
    // the column slab: rows h of every block's row slab, columns 32 q ..
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int idx = t + i * T, h = idx >> 5, wl = idx & (kSlabRows - 1);
      const float2* from = cluster_peer(rowb, (unsigned)(pl * Q + (h >> 5)));
      colb[h * kSlabColPitch + wl] = from[(h & (kSlabRows - 1)) * kSlabRowPitch + q * kSlabRows + wl];
    }
    __syncthreads();
    fft_lines_pow2<true>(colb, cols, 1.f, t, T, false, v, [&](float2 (&a)[8], int R, int ns) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // column line wl, element h
        int wl, h;
        if (R == 8) stage_output<8>(cols, ns, t, T, i, wl, h);
        else if (R == 4) stage_output<4>(cols, ns, t, T, i, wl, h);
        else stage_output<2>(cols, ns, t, T, i, wl, h);
        const int w = q * kSlabRows + wl;
        if ((w | h) == 0) {
          a[i] = make_float2(0.f, 0.f);
        } else {
          const float wv = __ldg(p.weights + h * W + w) * inv;
          a[i] = make_float2(a[i].x * wv, a[i].y * wv);
        }
      }
    });
    fft_lines_pow2<true>(colb, cols, -1.f, t, T, false, v, none);
    cluster_barrier();  // every column slab is transformed back, and no peer reads a row slab any more
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int idx = t + i * T, hl = idx >> 7, w = idx & (W - 1);
      const float2* from = cluster_peer(colb, (unsigned)(pl * Q + (w >> 5)));
      rowb[hl * kSlabRowPitch + w] = from[(q * kSlabRows + hl) * kSlabColPitch + (w & (kSlabRows - 1))];
    }
    __syncthreads();
    fft_lines_pow2<true>(rowb, rows, -1.f, t, T, true, v, none);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = rowb[pos(i)];
  }
  float sc_re = 1.f, sc_im = 1.f;
  if (p.per_sample_norm) {
    float s_re = 0.f, s_im = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s_re += v[i].x;
      s_im += v[i].y;
    }
    float mr = 0.f, mi = 0.f;
    slab_sum2(s_re, s_im, red, part, 1, pl, [&](double a, double b) {
      mr = (float)(a * inv_hw);
      mi = (float)(b * inv_hw);
    });
    float q_re = 0.f, q_im = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float a = v[i].x - mr, b = v[i].y - mi;
      q_re = fmaf(a, a, q_re);
      q_im = fmaf(b, b, q_im);
    }
    slab_sum2(q_re, q_im, red, part, 2, pl, [&](double a, double b) {
      sc_re = (float)(1.0 / (sqrt(a * inv_hw) + 1e-8));
      sc_im = (float)(1.0 / (sqrt(b * inv_hw) + 1e-8));
    });
  }
  const float gamma = p.gammas[0];
  // (the inverse rows' last stage synchronised after its reads of rowb; each thread writes its own positions)
  const float g_re = sc_re * gamma, g_im = sc_im * gamma;  // (fused_spectral_pow2's gain fold)
#pragma unroll
  for (int i = 0; i < 8; ++i) rowb[pos(i)] = make_float2((v[i].x + dc_re) * g_re, (v[i].y + dc_im) * g_im);
  if (t == 0) pack_coef<KA>(sample_coef<KA>(p, sl.b), misc + kMiscCoef);
  cluster_barrier();  // every slab of every plane is finished
  // epilogue: the slab's quads (rows 32 q ..), shared among the P blocks of this q, every channel
  const SampleCoef coef = unpack_coef<KA>(misc + kMiscCoef);
  const int nq = kSlabRows * W / 4, per = (nq + P - 1) / P, end = (pl + 1) * per < nq ? (pl + 1) * per : nq;
  for (int qi = pl * per + t; qi < end; qi += T) {
    const int hw0l = qi * 4, hl = hw0l >> 7, w = hw0l & (W - 1), at = hl * kSlabRowPitch + w;
    const int hw0 = (q * kSlabRows + hl) * W + w;
    QuadPos qp;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      qp.h[l] = q * kSlabRows + hl;
      qp.w[l] = w + l;
    }
    PairedQuadReader rd;
    add_noise_quad<(CK > 0 ? CK : 1), KA, true, false, CK, DT>(
        p, coef, sl, hw0, 4, qp,
        [&](int c, float out[4]) {
          rd.read(c, [&](int r) { return cluster_peer(rowb, (unsigned)((r >> 1) * Q + q)) + at; }, out);
        },
        [](int, float*) {});
  }
  cluster_barrier();  // no block leaves while a peer may still read its shared memory
}

template <int KA, int CK, int DT>
cudaError_t launch_slabs_kernel(const NoiseProblem& p, const SlabGeom& g, size_t smem_cap, cudaStream_t stream) {
  auto kernel = fused_spectral_slabs128<KA, CK, DT>;
  const cudaError_t err = allow_smem(kernel, g.smem, smem_cap);
  if (err != cudaSuccess) return err;
  const unsigned cl = (unsigned)(g.P * kSlabQ);
  return launch_clusters(kernel, (unsigned)(p.batch * p.frames) * cl, (unsigned)kSlabThreads, g.smem, cl, stream, p, g);
}

template <int KA, bool kStep, bool kVec, bool kPert, int LH = 0, int LW = 0, int CK = 0, int DT = -1>
cudaError_t launch_pow2_kernel(const NoiseProblem& p, const Pow2Geom& g, size_t smem_cap, cudaStream_t stream) {
  auto kernel = fused_spectral_pow2<KA, kStep, kVec, kPert, LH, LW, CK, DT>;
  const cudaError_t err = allow_smem(kernel, g.smem, smem_cap);
  if (err != cudaSuccess) return err;
  return launch_clusters(kernel, (unsigned)(p.batch * p.frames * g.P), (unsigned)g.threads, g.smem, (unsigned)g.P,
                         stream, p, g);
}

// The goal shapes' variants (C compiled in) also per dtype of the tensors (mixed dtypes: switched).
template <int KA, int LH, int CK>
cudaError_t launch_pow2_dtype(const NoiseProblem& p, const Pow2Geom& g, size_t smem_cap, cudaStream_t stream) {
  switch (io_dtype(p)) {
    case (int)DType::kFloat32: return launch_pow2_kernel<KA, false, true, false, LH, LH, CK, 0>(p, g, smem_cap, stream);
    case (int)DType::kFloat16: return launch_pow2_kernel<KA, false, true, false, LH, LH, CK, 1>(p, g, smem_cap, stream);
    case (int)DType::kBFloat16: return launch_pow2_kernel<KA, false, true, false, LH, LH, CK, 2>(p, g, smem_cap, stream);
    default: return launch_pow2_kernel<KA, false, true, false, LH, LH, CK>(p, g, smem_cap, stream);
  }
}

// The training hot path (add_noise / shaped_noise with vectorised I/O, no perturbation) with the
// square sizes 16, 32, 64 compiled in (pow2_fixed_size); everything else with run-time sizes.
template <int KA>
cudaError_t launch_pow2_hot(const NoiseProblem& p, const Pow2Geom& g, size_t smem_cap, cudaStream_t stream) {
  if (g.lh == 4 && g.lw == 4) return launch_pow2_kernel<KA, false, true, false, 4, 4>(p, g, smem_cap, stream);
  if (g.lh == 5 && g.lw == 5) {  // 3 x 32 x 32 images: the channel count compiled in too
    if (p.channels == 3) return launch_pow2_dtype<KA, 5, 3>(p, g, smem_cap, stream);
    return launch_pow2_kernel<KA, false, true, false, 5, 5>(p, g, smem_cap, stream);
  }
  if (g.lh == 6 && g.lw == 6) {  // 4 x 64 x 64 latents
    if (p.channels == 4) return launch_pow2_dtype<KA, 6, 4>(p, g, smem_cap, stream);
    return launch_pow2_kernel<KA, false, true, false, 6, 6>(p, g, smem_cap, stream);
  }
  return launch_pow2_kernel<KA, false, true, false>(p, g, smem_cap, stream);
}

}  // namespace

cudaError_t launch_fused_slabs128(const NoiseProblem& p, const SlabGeom& g, size_t smem_cap, cudaStream_t stream) {
  if (p.channels == 4) {
    switch (io_dtype(p)) {
      case (int)DType::kFloat32: return p.k == 0 ? launch_slabs_kernel<0, 4, 0>(p, g, smem_cap, stream)
                                                 : launch_slabs_kernel<2, 4, 0>(p, g, smem_cap, stream);
      case (int)DType::kBFloat16: return p.k == 0 ? launch_slabs_kernel<0, 4, 2>(p, g, smem_cap, stream)
                                                  : launch_slabs_kernel<2, 4, 2>(p, g, smem_cap, stream);
      default: break;
    }
  }
  return p.k == 0 ? launch_slabs_kernel<0, 0, -1>(p, g, smem_cap, stream) : launch_slabs_kernel<2, 0, -1>(p, g, smem_cap, stream);
}

cudaError_t launch_fused_pow2(const NoiseProblem& p, const Pow2Geom& g, bool vec, size_t smem_cap,
                              cudaStream_t stream) {
  if (p.step_params != nullptr) return launch_pow2_kernel<2, true, false, false>(p, g, smem_cap, stream);
  const bool pert = g.sets > 1;
  if (p.k == 0) {
    if (pert) return vec ? launch_pow2_kernel<0, false, true, true>(p, g, smem_cap, stream)
                         : launch_pow2_kernel<0, false, false, true>(p, g, smem_cap, stream);
    return vec ? launch_pow2_hot<0>(p, g, smem_cap, stream) : launch_pow2_kernel<0, false, false, false>(p, g, smem_cap, stream);
  }
  if (pert) return vec ? launch_pow2_kernel<2, false, true, true>(p, g, smem_cap, stream)
                       : launch_pow2_kernel<2, false, false, true>(p, g, smem_cap, stream);
  return vec ? launch_pow2_hot<2>(p, g, smem_cap, stream) : launch_pow2_kernel<2, false, false, false>(p, g, smem_cap, stream);
}

}  // namespace cuda
}  // namespace anisodiff
