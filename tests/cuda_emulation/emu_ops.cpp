// Torch glue of the host emulation of the CUDA kernels (tests/cuda_emulation): the ops of csrc/ops.cpp
// as torch.ops.anisodiff_emu.*, argument handling shared with the CPU/CUDA glue (ops_common), launches
// through the rewritten .cu sources (kernels run by the coroutine scheduler of include/cuda_runtime.h).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <string>
#include <tuple>
#include <vector>
#include "ops_common.h"
#include "cuda/noise_cuda.h"

static std::vector<unsigned char> g_smem(64 << 20);
unsigned char* emu_smem = g_smem.data();

namespace anisodiff {
namespace {
cuda::LaunchPlan g_last_plan;  // the plan of the last launch, for the tests' path assertions

void launch_emu(const PreparedOp& op) {
  g_last_plan = cuda::LaunchPlan{};
  if (is_empty(op.problem)) return;
  const cuda::LaunchPlan plan = cuda::plan_launch(op.problem, 0);
  g_last_plan = plan;
  TORCH_CHECK(plan.error == nullptr, plan.error ? plan.error : "");
  TORCH_CHECK(plan.smem_bytes <= g_smem.size(), "emu smem");
  at::Tensor ws;
  if (plan.workspace_bytes > 0) {
    ws = at::empty({(int64_t)plan.workspace_bytes}, at::kByte);
    if (!(getenv("EMU_PLAN_ONLY") && !strcmp(getenv("EMU_PLAN_ONLY"), "1"))) ws.fill_(255);  // not run: untouched
  }
  TORCH_CHECK(cuda::launch(op.problem, plan, ws.defined() ? ws.data_ptr() : nullptr, nullptr) == 0);
}
std::tuple<at::Tensor, at::Tensor> add_noise_emu(
    const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& coef, const at::Tensor& axes,
    const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas, int64_t variant,
    int64_t normalize, int64_t target, const at::Tensor& stream, const std::optional<at::Tensor>& noise,
    double perturb) {
  PreparedOp op = prepare_add_noise(KernelDevice::cpu(), x0, timesteps, coef, axes, weights, gammas, variant,
                                    normalize, target, stream, noise, perturb);
  launch_emu(op);
  return {op.out0, op.out1};
}
at::Tensor shaped_noise_emu(c10::SymIntArrayRef shape, const at::Tensor& timesteps, const at::Tensor& coef,
                            const at::Tensor& axes, const std::optional<at::Tensor>& weights,
                            at::ArrayRef<double> gammas, int64_t variant, int64_t normalize,
                            const at::Tensor& stream, const std::optional<at::Tensor>& noise, at::ScalarType dtype) {
  PreparedOp op = prepare_shaped_noise(KernelDevice::cpu(), shape, timesteps, coef, axes, weights, gammas, variant,
                                       normalize, stream, noise, dtype);
  launch_emu(op);
  return op.out0;
}
std::tuple<at::Tensor, at::Tensor> ddpm_step_emu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& params, const at::Tensor& axes,
    const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas, int64_t normalize, int64_t clip,
    double clip_range, const at::Tensor& stream, const std::optional<at::Tensor>& noise) {
  PreparedOp op = prepare_ddpm_step(KernelDevice::cpu(), sample, model_output, params, axes, weights, gammas,
                                    normalize, clip, clip_range, stream, noise);
  launch_emu(op);
  return {op.out0, op.out1};
}
// (path, dynamic smem bytes, tile, barriers completed so far in this process) of the last launch.
std::tuple<std::string, int64_t, int64_t, int64_t> last_plan() {
  return {cuda::path_name(g_last_plan.path), (int64_t)g_last_plan.smem_bytes, (int64_t)g_last_plan.tile,
          (int64_t)g_emu.barriers};
}

// Workspace bytes of the last launch's plan (the performance model's DRAM traffic of the two-pass path).
int64_t last_workspace_bytes() { return (int64_t)g_last_plan.workspace_bytes; }

// The kernel the last launch ran (its name as the planner gives it, e.g. fused_spectral_pow2<...>).
std::string last_kernel() { return g_last_plan.kernel != nullptr ? g_last_plan.kernel : ""; }

// The launches since the last call, as int64 [n, 5] rows (kernel address, grid, block, cluster, smem
// bytes); clears the log. scripts/cuda_perf_model.py maps the addresses to kernel names.
at::Tensor launch_log() {
  at::Tensor out = at::empty({(int64_t)emu_launch_log.size(), 5}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const EmuLaunchRecord& r : emu_launch_log) {
    *o++ = (int64_t)(uintptr_t)r.kernel;
    *o++ = r.grid;
    *o++ = r.block;
    *o++ = r.cluster;
    *o++ = (int64_t)r.smem;
  }
  emu_launch_log.clear();
  return out;
}

// The planner's answer for a [B, C, H, W] problem without running anything, as a JSON object:
// path, kernel (name with template arguments as in the sources), grid, block, cluster, smem_bytes,
// rows_per_block, tile, workspace_bytes, kernel2 / grid2 / block2 (the two-pass path's elementwise
// second pass), perturbed (add_noise with input perturbation `perturb`), error. Tensors are assumed
// contiguous and aligned (vectorised I/O where H*W % 4 == 0).
// The SM count is the emulator's (EMU_SM_COUNT); the shared-memory limit is sm_90's 227 KiB.
std::string plan_query(int64_t B, int64_t C, int64_t H, int64_t W, bool spectral, int64_t draws,
                       bool per_sample_norm, int64_t k, bool step, int64_t step_k, at::ScalarType dtype,
                       double perturb) {
  NoiseProblem p;
  p.perturb = (float)perturb;
  p.batch = B;
  p.channels = C;
  p.height = H;
  p.width = W;
  p.draws = (int)draws;
  static const float dummy = 0.f;  // only tested against nullptr by the planner
  p.weights = spectral ? &dummy : nullptr;
  p.per_sample_norm = per_sample_norm;
  p.k = (int)k;
  static const float params = 0.f;
  if (step) {
    p.step_params = &params;
    p.step_k = (int)step_k;
  }
  alignas(16) static float base[4];
  auto tensor = [&](TensorArg& t) {
    t.data = base;
    t.dtype = dtype == at::kHalf ? DType::kFloat16 : (dtype == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32);
    t.stride[3] = 1;
    t.stride[2] = W;
    t.stride[1] = H * W;
    t.stride[0] = C * H * W;
  };
  tensor(p.x0);
  tensor(p.x_t);
  tensor(p.out);
  const cuda::LaunchPlan plan = cuda::plan_launch(p, 0);
  auto str = [](const char* v) { return v ? "\"" + std::string(v) + "\"" : std::string("null"); };
  std::string out = "{";
  out += "\"path\": " + str(plan.error ? "unsupported" : cuda::path_name(plan.path));
  out += ", \"kernel\": " + str(plan.kernel);
  out += ", \"grid\": " + std::to_string(plan.grid);
  out += ", \"block\": " + std::to_string(plan.block);
  out += ", \"cluster\": " + std::to_string(plan.cluster);
  out += ", \"smem_bytes\": " + std::to_string(plan.smem_bytes);
  out += ", \"rows_per_block\": " + std::to_string(plan.rows_per_block);
  out += ", \"tile\": " + std::to_string(plan.tile);
  out += ", \"workspace_bytes\": " + std::to_string(plan.workspace_bytes);
  out += ", \"kernel2\": " + str(plan.kernel2);
  out += ", \"grid2\": " + std::to_string(plan.grid2);
  out += ", \"block2\": " + std::to_string(plan.block2);
  out += ", \"perturbed\": " + std::string(plan.perturbed ? "true" : "false");
  out += ", \"error\": " + str(plan.error);
  return out + "}";
}

// Self-test of the scheduler: a block of `threads` threads; thread t writes s[t] = t, then (with or
// without a barrier) reads s[(t + 1) % threads]. Without the barrier the read races with the write
// and, depending on EMU_ORDER, sees the NaN poison of the shared memory.
at::Tensor race_selftest(int64_t threads, bool barrier) {
  at::Tensor out = at::empty({threads}, at::kFloat);
  float* o = out.data_ptr<float>();
  const unsigned n = (unsigned)threads;
  emu_launch(1u, n, n * sizeof(float), [&] {
    float* s = reinterpret_cast<float*>(emu_smem);
    const unsigned t = threadIdx.x;
    s[t] = (float)t;
    if (barrier) __syncthreads();
    o[t] = s[(t + 1) % n];
  });
  return out;
}
}  // namespace
TORCH_LIBRARY(anisodiff_emu, m) {
  m.def("last_plan() -> (str, int, int, int)", &last_plan);
  m.def("race_selftest(int threads, bool barrier) -> Tensor", &race_selftest);
  m.def("launch_log() -> Tensor", &launch_log);
  m.def("last_workspace_bytes() -> int", &last_workspace_bytes);
  m.def("last_kernel() -> str", &last_kernel);
  m.def("plan(int B, int C, int H, int W, bool spectral=True, int draws=1, bool per_sample_norm=False, int k=1, "
        "bool step=False, int step_k=0, ScalarType dtype=float32, float perturb=0.0) -> str", &plan_query);
  m.def("add_noise(Tensor x0, Tensor timesteps, Tensor coef, Tensor axes, Tensor? weights, "
        "float[] gammas, int variant, int normalize, int target, Tensor stream, Tensor? noise, "
        "float perturb=0.0) -> (Tensor, Tensor)");
  m.def("shaped_noise(SymInt[] shape, Tensor timesteps, Tensor coef, Tensor axes, Tensor? weights, "
        "float[] gammas, int variant, int normalize, Tensor stream, Tensor? noise, ScalarType dtype) -> Tensor");
  m.def("ddpm_step(Tensor sample, Tensor model_output, Tensor params, Tensor axes, Tensor? weights, "
        "float[] gammas, int normalize, int clip, float clip_range, Tensor stream, Tensor? noise) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(anisodiff_emu, CPU, m) {
  m.impl("add_noise", &add_noise_emu);
  m.impl("shaped_noise", &shaped_noise_emu);
  m.impl("ddpm_step", &ddpm_step_emu);
}
}  // namespace anisodiff
