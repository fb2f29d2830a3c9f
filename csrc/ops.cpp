// torch glue: the anisodiff op schemas and their CPU implementations. The argument checks are shared
// with the CUDA glue (ops_common.cpp); the CUDA implementations live in cuda/ops_cuda.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/noise_cpu.h"
#include "ops_common.h"

namespace anisodiff {
namespace {

void launch_cpu(const NoiseProblem& p) {
  if (is_empty(p)) return;
  const cpu::CpuLaunch launch(p);
  at::parallel_for(0, launch.num_samples(), 1,
                   [&](int64_t begin, int64_t end) { launch.run(begin, end); });
}

std::tuple<at::Tensor, at::Tensor> add_noise_cpu(
    const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& coef, const at::Tensor& axes,
    const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas, int64_t variant,
    int64_t normalize, int64_t target, const at::Tensor& stream,
    const std::optional<at::Tensor>& noise, double perturb) {
  PreparedOp op = prepare_add_noise(KernelDevice::cpu(), x0, timesteps, coef, axes, weights, gammas,
                                    variant, normalize, target, stream, noise, perturb);
  launch_cpu(op.problem);
  return {op.out0, op.out1};
}

at::Tensor shaped_noise_cpu(c10::SymIntArrayRef shape, const at::Tensor& timesteps,
                            const at::Tensor& coef, const at::Tensor& axes,
                            const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                            int64_t variant, int64_t normalize, const at::Tensor& stream,
                            const std::optional<at::Tensor>& noise, at::ScalarType dtype) {
  PreparedOp op = prepare_shaped_noise(KernelDevice::cpu(), shape, timesteps, coef, axes, weights,
                                       gammas, variant, normalize, stream, noise, dtype);
  launch_cpu(op.problem);
  return op.out0;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& params,
    const at::Tensor& axes, const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
    int64_t normalize, int64_t clip, double clip_range, const at::Tensor& stream,
    const std::optional<at::Tensor>& noise) {
  PreparedOp op = prepare_ddpm_step(KernelDevice::cpu(), sample, model_output, params, axes, weights,
                                    gammas, normalize, clip, clip_range, stream, noise);
  launch_cpu(op.problem);
  return {op.out0, op.out1};
}

}  // namespace

// normalize: 0 (calibration folded into the weights, or none), 1 (per-sample std of each plane),
// 2 (per-sample std of each (b, c) F x H x W volume). weights: [D, H, W], or [D, F, H, W] for the
// spatio-temporal spectrum (a 3-D filter per volume); either spatio-temporal form makes the CPU
// kernel work on whole samples (csrc/ops_common.cpp fill_spatial, problem.h NoiseProblem::temporal).
TORCH_LIBRARY(anisodiff, m) {
  m.def(
      "add_noise(Tensor x0, Tensor timesteps, Tensor coef, Tensor axes, Tensor? weights, "
      "float[] gammas, int variant, int normalize, int target, Tensor stream, "
      "Tensor? noise, float perturb=0.0) -> (Tensor, Tensor)");
  m.def(
      "shaped_noise(SymInt[] shape, Tensor timesteps, Tensor coef, Tensor axes, Tensor? weights, "
      "float[] gammas, int variant, int normalize, Tensor stream, Tensor? noise, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "ddpm_step(Tensor sample, Tensor model_output, Tensor params, Tensor axes, Tensor? weights, "
      "float[] gammas, int normalize, int clip, float clip_range, Tensor stream, Tensor? noise) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(anisodiff, CPU, m) {
  m.impl("add_noise", &add_noise_cpu);
  m.impl("shaped_noise", &shaped_noise_cpu);
  m.impl("ddpm_step", &ddpm_step_cpu);
}

}  // namespace anisodiff
