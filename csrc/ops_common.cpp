// Argument checking and problem filling shared by the CPU (ops.cpp) and CUDA (cuda/ops_cuda.cpp) glue.
#include "ops_common.h"

#include <cmath>
#include <string>
#include <tuple>

namespace anisodiff {
namespace {

DType storage_dtype(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", st);
  }
}

// [B, C, H, W], or a [B, C, F, H, W] video tensor (any strides, channels_last_3d included): its
// frame stride goes to frame_stride, the others to stride[0..3] as (b, c, h, w).
TensorArg tensor_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, name, ": expected a 4-D [B, C, H, W] or 5-D [B, C, F, H, W] tensor, got ",
              t.dim(), "-D");
  TensorArg a;
  a.data = const_cast<void*>(t.data_ptr());
  a.dtype = storage_dtype(t.scalar_type(), name);
  const bool video = t.dim() == 5;
  a.stride[0] = t.stride(0);
  a.stride[1] = t.stride(1);
  a.stride[2] = t.stride(video ? 3 : 2);
  a.stride[3] = t.stride(video ? 4 : 3);
  a.frame_stride = video ? t.stride(2) : 0;
  return a;
}

// Sizes of [B, C, H, W] or [B, C, F, H, W] into the problem.
void fill_sizes(NoiseProblem& p, at::IntArrayRef sizes) {
  const bool video = sizes.size() == 5;
  p.batch = sizes[0];
  p.channels = sizes[1];
  p.frames = video ? sizes[2] : 1;
  p.height = sizes[video ? 3 : 2];
  p.width = sizes[video ? 4 : 3];
}

void check_on_device(const KernelDevice& dev, const at::Tensor& t) {
  TORCH_CHECK(t.device() == dev.device, "anisodiff ", dev.kernel, " kernel: every tensor must be on ",
              dev.where());
}

// [seed, offset] as int64. The CPU kernel reads it on the host. The CUDA kernel takes it either on
// the CPU (read here, passed by value) or on the data's device (read by the kernel through
// stream_ptr: no host synchronisation, and CUDA-graph replays pick up the caller's updates).
at::Tensor checked_stream(const KernelDevice& dev, const at::Tensor& stream) {
  if (dev.is_cuda()) {
    TORCH_CHECK((stream.device().is_cpu() || stream.device() == dev.device) &&
                    stream.scalar_type() == at::kLong && stream.numel() == 2,
                "stream: expected an int64 tensor [seed, offset] on the CPU or on ", dev.where());
  } else {
    TORCH_CHECK(stream.device().is_cpu() && stream.scalar_type() == at::kLong && stream.numel() == 2,
                "stream: expected an int64 CPU tensor [seed, offset]");
  }
  return stream.contiguous();
}

// The spatial part and the stream, shared by every op.
// The spatio-temporal spectrum (NoiseProblem::temporal) travels through the existing op arguments,
// so the schemas (and the CUDA and Triton libraries that share them) stay as they are: weights of
// shape [D, F, H, W] are a 3-D filter per (b, c) volume, and normalize = 2 is the per-sample std of
// each volume. Either makes the problem temporal; a temporal spec with a scalar gain and no
// per-sample std needs neither (it is the per-frame problem). Only the CPU kernel implements it.
void fill_spatial(const KernelDevice& dev, NoiseProblem& p, const std::optional<at::Tensor>& weights,
                  at::ArrayRef<double> gammas, int64_t normalize, const at::Tensor& st) {
  TORCH_CHECK(normalize >= 0 && normalize <= 2,
              "normalize: expected 0 (folded), 1 (per_sample, per plane) or 2 (per_sample, per F x H x W "
              "volume: the spatio-temporal spectrum)");
  const bool temporal = normalize == 2 || (weights.has_value() && weights->dim() == 4);
  TORCH_CHECK(!temporal || !dev.is_cuda(), "weights / normalize: the ", dev.kernel,
              " kernels do not implement the spatio-temporal spectrum ([D, F, H, W] weights, "
              "normalize=2); use the CPU kernel or backend='reference'");
  TORCH_CHECK(gammas.size() == 1 || gammas.size() == 2, "gammas: expected 1 or 2 values");
  if (weights.has_value()) check_on_device(dev, *weights);
  if (st.device().is_cpu()) {
    const int64_t seed = st.data_ptr<int64_t>()[0], offset = st.data_ptr<int64_t>()[1];
    TORCH_CHECK(seed >= 0 && offset >= 0, "stream: seed and offset must be non-negative");
    p.seed = (uint64_t)seed;
    p.offset = (uint64_t)offset;
  } else {
    p.stream_ptr = st.data_ptr<int64_t>();  // read (and used as unsigned) by the CUDA kernel
  }
  p.draws = (int)gammas.size();
  for (int d = 0; d < p.draws; ++d) p.gammas[d] = (float)gammas[d];
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    if (temporal) {
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 4 &&
                      w.size(0) == p.draws && w.size(1) == p.frames && w.size(2) == p.height &&
                      w.size(3) == p.width,
                  "weights: expected a contiguous float32 [", p.draws, ", ", p.frames, ", ", p.height, ", ",
                  p.width, "] tensor (spatio-temporal: [D, F, H, W])");
      TORCH_CHECK(normalize != 1, "normalize: 1 (per plane) does not apply to spatio-temporal [D, F, H, W] "
                  "weights; 2 normalises each F x H x W volume");
    } else {
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 3 &&
                      w.size(0) == p.draws && w.size(1) == p.height && w.size(2) == p.width,
                  "weights: expected a contiguous float32 [", p.draws, ", ", p.height, ", ", p.width,
                  "] tensor");
    }
    p.weights = w.data_ptr<float>();
  }
  TORCH_CHECK(weights.has_value() || p.draws == 1, "gammas: two draws need two weight tables");
  p.per_sample_norm = normalize != 0;
  p.temporal = temporal;
}

// Fills the parts of the problem shared by add_noise and shaped_noise and checks them.
void fill_operator(const KernelDevice& dev, NoiseProblem& p, const at::Tensor& timesteps,
                   const at::Tensor& coef, const at::Tensor& axes,
                   const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                   int64_t variant, int64_t normalize, const at::Tensor& stream, at::Tensor& st) {
  for (const at::Tensor* t : {&timesteps, &coef, &axes}) check_on_device(dev, *t);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.is_contiguous(),
              "coef: expected a contiguous float32 [T, 2 + k] table");
  TORCH_CHECK(axes.scalar_type() == at::kFloat && axes.dim() == 2 && axes.is_contiguous(),
              "axes: expected a contiguous float32 [C, k] tensor");
  const int64_t k = axes.size(1);
  TORCH_CHECK(axes.size(0) == p.channels, "axes: has ", axes.size(0), " rows but the noise has ",
              p.channels, " channels");
  TORCH_CHECK(k <= kMaxAxes, "axes: at most ", kMaxAxes, " principal axes are supported, got ", k);
  TORCH_CHECK(coef.size(1) == 2 + k, "coef: expected ", 2 + k, " columns, got ", coef.size(1));
  TORCH_CHECK(coef.size(0) >= 1, "coef: must have at least one row");
  TORCH_CHECK(timesteps.scalar_type() == at::kLong && timesteps.dim() == 1 &&
                  timesteps.size(0) == p.batch && timesteps.is_contiguous(),
              "timesteps: expected a contiguous int64 tensor of shape [", p.batch, "]");
  TORCH_CHECK(variant == 0 || variant == 1, "variant: expected 0 (sdm) or 1 (heisenberg)");
  TORCH_CHECK(variant == 0 || k < p.channels, "variant: heisenberg needs k < C");
  st = checked_stream(dev, stream);
  const int64_t* ts = timesteps.data_ptr<int64_t>();
  // Host check on the CPU only: reading device timesteps would synchronise. The CUDA kernel clamps
  // each row index into [0, coef_rows) instead, so it never reads out of bounds.
  if (!dev.is_cuda())
    for (int64_t b = 0; b < p.batch; ++b)
      TORCH_CHECK(ts[b] >= 0 && ts[b] < coef.size(0), "timesteps: value ", ts[b], " at index ", b,
                  " is outside [0, ", coef.size(0), ")");
  p.timesteps = ts;
  p.coef = coef.data_ptr<float>();
  p.coef_rows = coef.size(0);
  p.k = (int)k;
  p.axes = axes.data_ptr<float>();
  p.variant = variant == 1 ? SqueezeVariant::kHeisenberg : SqueezeVariant::kSDM;
  fill_spatial(dev, p, weights, gammas, normalize, st);
}

// The caller's white draws [D, *data shape]; data_dims: 4 or 5 (video).
void fill_noise(const KernelDevice& dev, NoiseProblem& p, const std::optional<at::Tensor>& noise,
                int64_t data_dims) {
  if (!noise.has_value()) return;
  const at::Tensor& n = *noise;
  TORCH_CHECK(n.device() == dev.device, "noise: the ", dev.kernel, " kernel needs it on ", dev.where());
  const bool video = data_dims == 5;
  TORCH_CHECK(n.dim() == data_dims + 1 && n.size(0) == p.draws && n.size(1) == p.batch &&
                  n.size(2) == p.channels && (!video || n.size(3) == p.frames) &&
                  n.size(n.dim() - 2) == p.height && n.size(n.dim() - 1) == p.width,
              "noise: expected shape [", p.draws, ", ", p.batch, ", ", p.channels, ", ",
              (video ? std::to_string(p.frames) + ", " : std::string()), p.height, ", ", p.width,
              "], got ", n.sizes());
  for (int d = 0; d < p.draws; ++d) p.noise[d] = tensor_arg(n.select(0, d), "noise");
}

}  // namespace

PreparedOp prepare_add_noise(const KernelDevice& dev, const at::Tensor& x0, const at::Tensor& timesteps,
                             const at::Tensor& coef, const at::Tensor& axes,
                             const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                             int64_t variant, int64_t normalize, int64_t target, const at::Tensor& stream,
                             const std::optional<at::Tensor>& noise, double perturb) {
  TORCH_CHECK(x0.dim() == 4 || x0.dim() == 5, "x0: expected a 4-D [B, C, H, W] or 5-D [B, C, F, H, W] tensor, got ",
              x0.dim(), "-D");
  TORCH_CHECK(target >= 0 && target <= 3, "target: expected 0..3");
  TORCH_CHECK(std::isfinite(perturb) && perturb >= 0.0, "perturb: expected a finite value >= 0, got ", perturb);
  TORCH_CHECK(x0.device() == dev.device, "x0: the ", dev.kernel, " kernel needs it on ", dev.where());
  PreparedOp op;
  NoiseProblem& p = op.problem;
  fill_sizes(p, x0.sizes());
  fill_operator(dev, p, timesteps, coef, axes, weights, gammas, variant, normalize, stream, op.stream);
  fill_noise(dev, p, noise, x0.dim());
  op.out0 = at::empty_like(x0);
  op.out1 = at::empty_like(x0);
  p.x0 = tensor_arg(x0, "x0");
  p.x_t = tensor_arg(op.out0, "x_t");
  p.out = tensor_arg(op.out1, "target");
  p.target = static_cast<Target>(target);
  p.perturb = (float)perturb;
  return op;
}

PreparedOp prepare_shaped_noise(const KernelDevice& dev, c10::SymIntArrayRef shape,
                                const at::Tensor& timesteps, const at::Tensor& coef, const at::Tensor& axes,
                                const std::optional<at::Tensor>& weights, at::ArrayRef<double> gammas,
                                int64_t variant, int64_t normalize, const at::Tensor& stream,
                                const std::optional<at::Tensor>& noise, at::ScalarType dtype) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(shape);
  TORCH_CHECK(sizes.size() == 4 || sizes.size() == 5, "shape: expected [B, C, H, W] or [B, C, F, H, W], got ",
              sizes);
  for (int64_t s : sizes) TORCH_CHECK(s >= 0, "shape: sizes must be non-negative, got ", sizes);
  PreparedOp op;
  NoiseProblem& p = op.problem;
  fill_sizes(p, sizes);
  fill_operator(dev, p, timesteps, coef, axes, weights, gammas, variant, normalize, stream, op.stream);
  fill_noise(dev, p, noise, (int64_t)sizes.size());
  op.out0 = at::empty(sizes, coef.options().dtype(dtype));
  p.out = tensor_arg(op.out0, "out");
  return op;
}

PreparedOp prepare_ddpm_step(const KernelDevice& dev, const at::Tensor& sample,
                             const at::Tensor& model_output, const at::Tensor& params,
                             const at::Tensor& axes, const std::optional<at::Tensor>& weights,
                             at::ArrayRef<double> gammas, int64_t normalize, int64_t clip,
                             double clip_range, const at::Tensor& stream,
                             const std::optional<at::Tensor>& noise) {
  TORCH_CHECK(sample.dim() == 4 || sample.dim() == 5,
              "sample: expected a 4-D [B, C, H, W] or 5-D [B, C, F, H, W] tensor, got ", sample.dim(), "-D");
  TORCH_CHECK(model_output.sizes() == sample.sizes(), "model_output: expected shape ", sample.sizes(),
              ", got ", model_output.sizes());
  for (const at::Tensor* t : {&sample, &model_output, &params, &axes}) check_on_device(dev, *t);
  PreparedOp op;
  NoiseProblem& p = op.problem;
  fill_sizes(p, sample.sizes());
  TORCH_CHECK(axes.scalar_type() == at::kFloat && axes.dim() == 2 && axes.is_contiguous() &&
                  axes.size(0) == p.channels && axes.size(1) <= kMaxAxes,
              "axes: expected a contiguous float32 [C, k] tensor with k <= ", kMaxAxes);
  const int64_t k = axes.size(1);
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.is_contiguous() && params.dim() == 2 &&
                  params.size(0) == p.batch && params.size(1) == 2 + 4 * (1 + k),
              "params: expected a contiguous float32 [", p.batch, ", ", 2 + 4 * (1 + k), "] tensor");
  TORCH_CHECK(clip >= 0 && clip <= 2, "clip: expected 0 (none), 1 (plain) or 2 (in S^-1 coordinates)");
  op.stream = checked_stream(dev, stream);
  fill_spatial(dev, p, weights, gammas, normalize, op.stream);
  fill_noise(dev, p, noise, sample.dim());
  p.axes = axes.data_ptr<float>();
  p.step_k = (int)k;
  p.step_params = params.data_ptr<float>();
  p.step_clip = (int)clip;
  p.clip_range = (float)clip_range;
  p.step_x = tensor_arg(sample, "sample");
  p.step_eps = tensor_arg(model_output, "model_output");
  op.out0 = at::empty_like(sample);
  op.out1 = at::empty_like(sample);
  p.out = tensor_arg(op.out0, "x_prev");
  p.out_x0 = tensor_arg(op.out1, "x0_hat");
  return op;
}

}  // namespace anisodiff
