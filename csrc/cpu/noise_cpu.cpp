// CPU dispatcher: FFT plans, per-thread scratch and the choice of instruction set.
#include "noise_cpu.h"

#include <math.h>
#include <stdlib.h>

#include <cstring>
#include <string>

#include "cpu_kernel.h"

namespace anisodiff {
namespace cpu {

int64_t group_samples(const NoiseProblem& p) {
  // Planes are filtered in pairs (one complex FFT), and a plane's result depends in the last bit on
  // its partner. With an odd channel count and generated noise, samples 2m and 2m+1 share a group;
  // the partner of the last sample of an odd batch is the stream's next sample, generated and
  // discarded, so the noise of sample b never depends on the batch size. With caller noise there
  // is no such sample: pairs stay inside a sample and a lone plane gets a zero partner.
  const bool generated = p.noise[0].data == nullptr;
  return (p.weights != nullptr && p.channels % 2 == 1 && generated) ? 2 : 1;
}

namespace {
// Lays out the scratch regions in use (a second draw and FFT buffers only when needed) and returns
// the total size; with base == nullptr it only measures.
int64_t layout_workspace(const NoiseProblem& p, float* base, Workspace* ws) {
  const int64_t HW = p.height * p.width;
  const int64_t group = group_samples(p) * p.channels * HW;
  const int64_t fft = p.weights != nullptr ? HW : 0;
  int64_t used = 0;
  auto take = [&](int64_t n) {
    float* at = base ? base + used : nullptr;
    used += n;
    return at;
  };
  Workspace w;
  w.eps[0] = take(group);
  w.eps[1] = take(p.draws > 1 ? group : 0);
  w.fft_re = take(fft);
  w.fft_im = take(fft);
  w.zero_plane = take(fft);
  const int64_t step_planes = p.step_params != nullptr ? p.channels * HW : 0;
  w.proj = take((int64_t)(p.k > p.step_k ? p.k : p.step_k) * HW);
  w.row = take(3 * p.width);
  w.step_x = take(step_planes);
  w.step_e = take(step_planes);
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
  if (cpu_has_avx512() && (want.empty() || want == "avx512")) return {"avx512", cap_avx512::process_groups};
#endif
#if defined(ANISO_HAVE_AVX2)
  if (cpu_has_avx2() && (want.empty() || want == "avx512" || want == "avx2"))
    return {"avx2", cap_avx2::process_groups};
#endif
  return {"default", cap_default::process_groups};
}

// Appends the twiddle tables of one FFT length to `tables`; pointers are fixed up later.
struct PlanOffsets {
  int64_t tw[kMaxFftStages], root[kMaxFftStages];
};

PlanOffsets append_fft_tables(FftPlanView& view, int n, std::vector<float>& tables) {
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

void fix_pointers(FftPlanView& view, const PlanOffsets& off, const float* base) {
  for (int s = 0; s < view.stages; ++s) {
    const int64_t count = (int64_t)view.span[s] * (view.radix[s] - 1);
    view.tw_re[s] = base + off.tw[s];
    view.tw_im[s] = base + off.tw[s] + count;
    view.root_re[s] = base + off.root[s];
    view.root_im[s] = base + off.root[s] + view.radix[s];
  }
}

}  // namespace

CpuLaunch::CpuLaunch(const NoiseProblem& problem) : problem_(problem), plan_(new SpectralPlan()) {
  // Chosen per launch (not cached) so tests can switch it with the environment variable.
  const Capability cap = select_capability();
  process_ = cap.fn;
  capability_name_ = cap.name;
  if (problem_.weights == nullptr) return;
  const int64_t H = problem_.height, W = problem_.width, HW = H * W;
  const PlanOffsets rows = append_fft_tables(plan_->rows, (int)H, tables_);
  const PlanOffsets cols = append_fft_tables(plan_->cols, (int)W, tables_);
  const int64_t w_off = (int64_t)tables_.size();
  const float scale = 1.0f / (float)HW;  // the inverse FFT is unnormalised
  tables_.resize(tables_.size() + problem_.draws * HW);
  for (int d = 0; d < problem_.draws; ++d)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        tables_[w_off + d * HW + w * H + h] = problem_.weights[d * HW + h * W + w] * scale;
  fix_pointers(plan_->rows, rows, tables_.data());
  fix_pointers(plan_->cols, cols, tables_.data());
  plan_->weights_t = tables_.data() + w_off;
}

CpuLaunch::~CpuLaunch() = default;

int64_t CpuLaunch::num_groups() const {
  const int64_t G = group_samples(problem_);
  return (problem_.batch + G - 1) / G;
}

void CpuLaunch::run(int64_t group_begin, int64_t group_end) const {
  if (group_begin >= group_end) return;
  // Per-thread scratch, kept between launches: large planes would otherwise pay page faults and
  // zero-filling of several MB on every call. The kernel initialises everything it reads.
  thread_local std::vector<float> scratch;
  const size_t need = (size_t)workspace_floats(problem_);
  if (scratch.size() < need) scratch.resize(need);
  const Workspace ws = carve_workspace(problem_, scratch.data());
  process_(problem_, *plan_, ws, group_begin, group_end);
}

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
