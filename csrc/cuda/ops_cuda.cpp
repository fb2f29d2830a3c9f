// torch glue of the CUDA ops: device guard, current stream, workspace from the caching allocator,
// TORCH_LIBRARY_IMPL(anisodiff, CUDA). Argument checks are shared with the CPU ops (ops_common.cpp).
// Nothing here synchronises with the host: device timesteps are clamped by the kernels instead of
// checked, and a [seed, offset] stream tensor on the device is read by the kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/noise_cuda.h"
#include "ops_common.h"

namespace anisodiff {
namespace {

// Video tensors [B, C, F, H, W] are slices of the kernels' grids and the input perturbation runs on
// every path (problem.h, noise_cuda.h); what the kernels lack is refused by the shared checks.
void launch_cuda(const PreparedOp& op, const at::Device& device) {
  const NoiseProblem& p = op.problem;
  if (is_empty(p)) return;
  const cuda::LaunchPlan plan = cuda::plan_launch(p, device.index());
  TORCH_CHECK(plan.error == nullptr, plan.error ? plan.error : "");
  at::Tensor workspace;  // stream-ordered: freeing it after the launch is safe on this stream
  if (plan.workspace_bytes > 0)
    workspace = at::empty({(int64_t)plan.workspace_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(cuda::launch(p, plan, workspace.defined() ? workspace.data_ptr() : nullptr, stream));
}

std::tuple<at::Tensor, at::Tensor> add_noise_cuda(
    const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& coef, const at::Tensor& axes,
    const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas, int64_t variant,
    int64_t normalize, int64_t target, const at::Tensor& stream,
    const std::optional<at::Tensor>& noise, double perturb) {
  TORCH_CHECK(x0.is_cuda(), "x0: the CUDA kernel needs it on a CUDA device");
  const c10::cuda::CUDAGuard guard(x0.device());
  const PreparedOp op = prepare_add_noise(KernelDevice::cuda(x0.device()), x0, timesteps, coef, axes, weights,
                                          gammas, variant, normalize, target, stream, noise, perturb);
  launch_cuda(op, x0.device());
  return {op.out0, op.out1};
}

at::Tensor shaped_noise_cuda(c10::SymIntArrayRef shape, const at::Tensor& timesteps,
                             const at::Tensor& coef, const at::Tensor& axes,
                             const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                             int64_t variant, int64_t normalize, const at::Tensor& stream,
                             const std::optional<at::Tensor>& noise, at::ScalarType dtype) {
  // The output goes where the coefficient table lives (as on the CPU).
  TORCH_CHECK(coef.is_cuda(), "coef: the CUDA kernel needs it on a CUDA device");
  const c10::cuda::CUDAGuard guard(coef.device());
  const PreparedOp op = prepare_shaped_noise(KernelDevice::cuda(coef.device()), shape, timesteps, coef, axes,
                                             weights, gammas, variant, normalize, stream, noise, dtype);
  launch_cuda(op, coef.device());
  return op.out0;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& params,
    const at::Tensor& axes, const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
    int64_t normalize, int64_t clip, double clip_range, const at::Tensor& stream,
    const std::optional<at::Tensor>& noise) {
  TORCH_CHECK(sample.is_cuda(), "sample: the CUDA kernel needs it on a CUDA device");
  const c10::cuda::CUDAGuard guard(sample.device());
  const PreparedOp op = prepare_ddpm_step(KernelDevice::cuda(sample.device()), sample, model_output, params,
                                          axes, weights, gammas, normalize, clip, clip_range, stream, noise);
  launch_cuda(op, sample.device());
  return {op.out0, op.out1};
}

}  // namespace

TORCH_LIBRARY_IMPL(anisodiff, CUDA, m) {
  m.impl("add_noise", &add_noise_cuda);
  m.impl("shaped_noise", &shaped_noise_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
}

}  // namespace anisodiff
