// CPU dispatcher: FFT plans, per-thread scratch and the choice of instruction set.
#include "noise_cpu.h"

#include <math.h>
#include <stdlib.h>

#include <complex>
#include <cstring>
#include <utility>
#include <string>

#include "cpu_kernel.h"

namespace anisodiff {
namespace cpu {

namespace {
// Lays out the scratch regions in use (a second draw and FFT buffers only when needed) and returns
// the total size; with base == nullptr it only measures.
int64_t layout_workspace(const NoiseProblem& p, float* base, Workspace* ws) {
  const int64_t HW = p.height * p.width, item = item_frames(p) * HW;  // one work item's plane(s)
  const int64_t sample = p.channels * item;
  const int64_t fft = p.weights != nullptr ? item : 0;
  int64_t blue = 0;  // Bluestein buffers for the longest of the transforms that need them
  if (p.weights != nullptr) {
    const int64_t mh = bluestein_length((int)p.height), mw = bluestein_length((int)p.width);
    blue = mh * p.width > mw * p.height ? mh * p.width : mw * p.height;
    if (p.temporal) {
      const int64_t mf = bluestein_length((int)p.frames) * HW;
      blue = mf > blue ? mf : blue;
    }
  }
  int64_t used = 0;
  auto take = [&](int64_t n) {
    float* at = base ? base + used : nullptr;
    used += n;
    return at;
  };
  Workspace w;
  w.eps[0] = take(sample);
  w.eps[1] = take(p.draws > 1 ? sample : 0);
  w.fft_re = take(fft);
  w.fft_im = take(fft);
  w.zero_plane = take(fft);
  w.dc_terms = take(p.channels);
  for (float*& buf : w.blue) buf = take(blue);
  const int64_t step_planes = p.step_params != nullptr ? sample : 0;
  w.proj = take((int64_t)(p.k > p.step_k ? p.k : p.step_k) * item);
  w.row = take(3 * p.width);
  w.step_x = take(step_planes);
  w.step_e = take(step_planes);
  w.pert = take(p.perturb != 0.f && p.x0.data != nullptr ? sample : 0);
  if (ws) *ws = w;
  return used;
}
}  // namespace

int64_t workspace_floats(const NoiseProblem& p) { return layout_workspace(p, nullptr, nullptr); }

Workspace carve_workspace(const NoiseProblem& p, float* base) {
  Workspace ws;
  layout_workspace(p, base, &ws);
  return ws;
}

namespace {

struct Capability {
  const char* name;
  ProcessFn fn;
};

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2();
#else
  return false;
#endif
}

Capability select_capability() {
  const char* env = getenv("ANISODIFF_CPU_CAPABILITY");
  const std::string want = env ? env : "";
  (void)want;
#if defined(ANISO_HAVE_AVX512)
  if (cpu_has_avx512() && (want.empty() || want == "avx512")) return {"avx512", cap_avx512::process_samples};
#endif
#if defined(ANISO_HAVE_AVX2)
  if (cpu_has_avx2() && (want.empty() || want == "avx512" || want == "avx2"))
    return {"avx2", cap_avx2::process_samples};
#endif
  return {"default", cap_default::process_samples};
}

// Appends the twiddle tables of one FFT length to `tables`; pointers are fixed up later.
struct PlanOffsets {
  int64_t tw[kMaxFftStages], root[kMaxFftStages];
  int64_t chirp = -1, bhat = -1;  // Bluestein tables (re block then im block)
};

PlanOffsets append_mixed_radix_tables(FftPlanView& view, int n, std::vector<float>& tables) {
  const FftFactors f = fft_factorize(n);
  PlanOffsets off{};
  view.n = n;
  view.stages = f.count;
  int span = 1;
  for (int s = 0; s < f.count; ++s) {
    const int p = f.radix[s];
    view.radix[s] = p;
    view.span[s] = span;
    off.tw[s] = (int64_t)tables.size();
    for (int k = 0; k < span; ++k)  // re block then im block
      for (int r = 1; r < p; ++r) tables.push_back((float)cos(-2.0 * M_PI * r * k / ((double)span * p)));
    for (int k = 0; k < span; ++k)
      for (int r = 1; r < p; ++r) tables.push_back((float)sin(-2.0 * M_PI * r * k / ((double)span * p)));
    off.root[s] = (int64_t)tables.size();
    for (int m = 0; m < p; ++m) tables.push_back((float)cos(-2.0 * M_PI * m / p));
    for (int m = 0; m < p; ++m) tables.push_back((float)sin(-2.0 * M_PI * m / p));
    span *= p;
  }
  return off;
}

// In-place forward DFT of a power-of-two length, in double (host-side table building only).
void fft_pow2_double(std::vector<std::complex<double>>& a) {
  const size_t n = a.size();
  for (size_t i = 1, j = 0; i < n; ++i) {
    size_t bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) std::swap(a[i], a[j]);
  }
  for (size_t len = 2; len <= n; len <<= 1) {
    for (size_t i = 0; i < n; i += len)
      for (size_t k = 0; k < len / 2; ++k) {
        const std::complex<double> w = std::polar(1.0, -2.0 * M_PI * (double)k / (double)len);
        const std::complex<double> u = a[i + k], v = a[i + k + len / 2] * w;
        a[i + k] = u + v;
        a[i + k + len / 2] = u - v;
      }
  }
}

// The tables of one transform length: mixed radix, or Bluestein through `inner` (spectral.h).
PlanOffsets append_fft_tables(FftPlanView& view, FftPlanView& inner, PlanOffsets& inner_off, int n,
                              std::vector<float>& tables) {
  const int m = bluestein_length(n);
  if (m == 0) return append_mixed_radix_tables(view, n, tables);
  inner_off = append_mixed_radix_tables(inner, m, tables);
  PlanOffsets off{};
  view.n = n;
  view.stages = 0;
  view.bluestein_m = m;
  view.inner = &inner;
  // c_j = exp(-i pi j^2 / n); j^2 mod 2n in integers keeps the angle exact for large j.
  std::vector<std::complex<double>> chirp(n), b(m, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t q = (j * j) % (2 * (int64_t)n);
    chirp[j] = std::polar(1.0, -M_PI * (double)q / (double)n);
  }
  for (int64_t j = 0; j < n; ++j) {
    b[j] = std::conj(chirp[j]);
    if (j > 0) b[m - j] = std::conj(chirp[j]);
  }
  fft_pow2_double(b);
  off.chirp = (int64_t)tables.size();
  for (int j = 0; j < n; ++j) tables.push_back((float)chirp[j].real());
  for (int j = 0; j < n; ++j) tables.push_back((float)chirp[j].imag());
  off.bhat = (int64_t)tables.size();
  for (int k = 0; k < m; ++k) tables.push_back((float)(b[k].real() / m));
  for (int k = 0; k < m; ++k) tables.push_back((float)(b[k].imag() / m));
  return off;
}

void fix_pointers(FftPlanView& view, const PlanOffsets& off, const float* base) {
  for (int s = 0; s < view.stages; ++s) {
    const int64_t count = (int64_t)view.span[s] * (view.radix[s] - 1);
    view.tw_re[s] = base + off.tw[s];
    view.tw_im[s] = base + off.tw[s] + count;
    view.root_re[s] = base + off.root[s];
    view.root_im[s] = base + off.root[s] + view.radix[s];
  }
  if (view.bluestein_m > 0) {
    view.chirp_re = base + off.chirp;
    view.chirp_im = base + off.chirp + view.n;
    view.bhat_re = base + off.bhat;
    view.bhat_im = base + off.bhat + view.bluestein_m;
  }
}

// Scratch a thread keeps between launches (floats): enough for every plane up to 3 x 256 x 256 with
// two draws; a larger problem's scratch is released after its launch, so one big call does not
// keep its memory for the life of the process.
constexpr size_t kKeptScratchFloats = (size_t)4 << 20;  // 16 MiB per thread

}  // namespace

CpuLaunch::CpuLaunch(const NoiseProblem& problem) : problem_(problem), plan_(new SpectralPlan()) {
  // Chosen per launch (not cached) so tests can switch it with the environment variable.
  const Capability cap = select_capability();
  process_ = cap.fn;
  capability_name_ = cap.name;
  if (problem_.weights == nullptr) return;
  const int64_t H = problem_.height, W = problem_.width, HW = H * W;
  // A temporal problem's table is [draws, F, H, W]; each frame's block is transposed like a plane's.
  const int64_t F = item_frames(problem_), N = F * HW;
  PlanOffsets rows_inner{}, cols_inner{}, frames_inner{}, frames{};
  const PlanOffsets rows = append_fft_tables(plan_->rows, plan_->rows_inner, rows_inner, (int)H, tables_);
  const PlanOffsets cols = append_fft_tables(plan_->cols, plan_->cols_inner, cols_inner, (int)W, tables_);
  if (problem_.temporal)
    frames = append_fft_tables(plan_->frames, plan_->frames_inner, frames_inner, (int)F, tables_);
  const int64_t w_off = (int64_t)tables_.size();
  const float scale = 1.0f / (float)N;  // the inverse FFT is unnormalised
  tables_.resize(tables_.size() + problem_.draws * N);
  for (int d = 0; d < problem_.draws; ++d) {
    for (int64_t f = 0; f < F; ++f)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          tables_[w_off + d * N + f * HW + w * H + h] = problem_.weights[d * N + f * HW + h * W + w] * scale;
    plan_->dc_weight[d] = problem_.weights[d * N];  // applied to the plane (volume) mean, outside the FFT
    tables_[w_off + d * N] = 0.f;
    const float* wd = problem_.weights + d * N;
    const float g = N > 1 ? wd[1] : 0.f;
    bool flat = g >= 0.f;
    for (int64_t i = 2; flat && i < N; ++i) flat = wd[i] == g;
    if (flat) plan_->flat_gain[d] = g;
  }
  fix_pointers(plan_->rows, rows, tables_.data());
  fix_pointers(plan_->cols, cols, tables_.data());
  fix_pointers(plan_->rows_inner, rows_inner, tables_.data());
  fix_pointers(plan_->cols_inner, cols_inner, tables_.data());
  if (problem_.temporal) {
    fix_pointers(plan_->frames, frames, tables_.data());
    fix_pointers(plan_->frames_inner, frames_inner, tables_.data());
  }
  plan_->weights_t = tables_.data() + w_off;
}

CpuLaunch::~CpuLaunch() = default;

void CpuLaunch::run(int64_t sample_begin, int64_t sample_end) const {
  if (sample_begin >= sample_end) return;
  // Per-thread scratch, kept between launches up to kKeptScratchFloats: small planes would
  // otherwise pay page faults and zero-filling on every call. The kernel initialises all it reads.
  thread_local std::vector<float> scratch;
  const size_t need = (size_t)workspace_floats(problem_);
  if (scratch.size() < need) scratch.resize(need);
  const Workspace ws = carve_workspace(problem_, scratch.data());
  process_(problem_, *plan_, ws, sample_begin, sample_end);
  if (scratch.size() > kKeptScratchFloats) std::vector<float>().swap(scratch);
}

size_t kept_scratch_bytes() { return kKeptScratchFloats * sizeof(float); }

const char* capability() { return select_capability().name; }

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> out{"default"};
#if defined(ANISO_HAVE_AVX2)
  out.push_back("avx2");
#endif
#if defined(ANISO_HAVE_AVX512)
  out.push_back("avx512");
#endif
  return out;
}

}  // namespace cpu
}  // namespace anisodiff
