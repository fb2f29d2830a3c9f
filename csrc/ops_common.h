// Argument checking shared by the CPU and CUDA torch glue: each op's checks run once, here, and fill
// a NoiseProblem plus its output tensors; the device-specific files only launch. Checks are the last
// line of defence (the Python layer validates first with friendlier messages): nothing reaches a
// kernel that could make it read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "anisodiff/problem.h"

namespace anisodiff {

// The device a kernel runs on; it words the device errors ("the CPU" / "cuda:1").
struct KernelDevice {
  at::Device device;
  const char* kernel;  // "CPU" or "CUDA"
  static KernelDevice cpu() { return {at::Device(at::kCPU), "CPU"}; }
  static KernelDevice cuda(at::Device d) { return {d, "CUDA"}; }
  bool is_cuda() const { return device.is_cuda(); }
  std::string where() const { return is_cuda() ? device.str() : std::string("the CPU"); }
};

// A filled problem, the tensors it writes, and the tensors it reads that must outlive the launch.
struct PreparedOp {
  NoiseProblem problem;
  at::Tensor out0, out1;  // add_noise: (x_t, target); shaped_noise: (noise, -); ddpm_step: (x_prev, x0_hat)
  at::Tensor stream;      // the [seed, offset] tensor problem.stream_ptr may point into
};

PreparedOp prepare_add_noise(const KernelDevice& dev, const at::Tensor& x0, const at::Tensor& timesteps,
                             const at::Tensor& coef, const at::Tensor& axes,
                             const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                             int64_t variant, int64_t normalize, int64_t target, const at::Tensor& stream,
                             const std::optional<at::Tensor>& noise, double perturb = 0.0);

PreparedOp prepare_shaped_noise(const KernelDevice& dev, c10::SymIntArrayRef shape,
                                const at::Tensor& timesteps, const at::Tensor& coef, const at::Tensor& axes,
                                const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                                int64_t variant, int64_t normalize, const at::Tensor& stream,
                                const std::optional<at::Tensor>& noise, at::ScalarType dtype);

PreparedOp prepare_ddpm_step(const KernelDevice& dev, const at::Tensor& sample,
                             const at::Tensor& model_output, const at::Tensor& params,
                             const at::Tensor& axes, const std::optional<at::Tensor>& weights,
                             at::ArrayRef<double> gammas, int64_t normalize, int64_t clip,
                             double clip_range, const at::Tensor& stream,
                             const std::optional<at::Tensor>& noise);

inline bool is_empty(const NoiseProblem& p) {
  return p.batch == 0 || p.channels == 0 || p.frames == 0 || p.height == 0 || p.width == 0;
}

}  // namespace anisodiff
