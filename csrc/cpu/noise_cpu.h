// Public entry of the fused CPU kernel (used by the torch glue in csrc/ops.cpp).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "anisodiff/problem.h"

namespace anisodiff {
namespace cpu {

struct SpectralPlan;
struct Workspace;

using ProcessFn = void (*)(const NoiseProblem&, const SpectralPlan&, const Workspace&, int64_t, int64_t);

// One launch: plans the FFTs and picks the instruction set once; run() may then be called
// concurrently on disjoint sample ranges (each call uses its own thread's scratch).
class CpuLaunch {
 public:
  explicit CpuLaunch(const NoiseProblem& problem);
  ~CpuLaunch();
  // Work items, each independent (problem.h): the slices (b, f) of [0, batch * frames), or the
  // whole samples of [0, batch) for a temporal problem (the transform along F couples the frames).
  int64_t num_samples() const { return problem_.temporal ? problem_.batch : problem_.batch * problem_.frames; }
  void run(int64_t sample_begin, int64_t sample_end) const;
  const char* capability_name() const { return capability_name_; }

 private:
  NoiseProblem problem_;
  std::unique_ptr<SpectralPlan> plan_;
  std::vector<float> tables_;  // twiddles, roots and transposed weights the plan points into
  ProcessFn process_ = nullptr;
  const char* capability_name_ = "default";
};

// The instruction set the kernel runs with: "avx512", "avx2" or "default". The environment
// variable ANISODIFF_CPU_CAPABILITY may lower it (e.g. to test the portable path).
const char* capability();
// The per-thread scratch kept between launches; a launch that needs more frees it when done.
size_t kept_scratch_bytes();
// Instruction sets compiled into this build.
std::vector<std::string> compiled_capabilities();

}  // namespace cpu
}  // namespace anisodiff
