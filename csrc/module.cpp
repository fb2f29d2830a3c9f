// The importable extension module anisodiff._C. Importing it loads this shared library, whose static
// initialisers register the anisodiff ops (csrc/ops.cpp) with the dispatcher. It binds no tensors,
// so it needs no libtorch_python; it only reports what was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/noise_cpu.h"
#ifdef ANISO_WITH_CUDA
#include "cuda/noise_cuda.h"
#endif

#ifndef ANISO_VERSION
#define ANISO_VERSION "unknown"
#endif
#ifndef ANISO_TORCH_VERSION
#define ANISO_TORCH_VERSION "unknown"
#endif
#ifndef ANISO_CUDA_ARCHS
#define ANISO_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "anisodiff compiled ops (registered as torch.ops.anisodiff.*)";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = ANISO_VERSION;
    info["torch_version"] = ANISO_TORCH_VERSION;
    info["cpu"] = true;
#ifdef ANISO_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    std::vector<std::string> archs;
    std::string list = ANISO_CUDA_ARCHS, item;
    for (char ch : list + ";") {
      if (ch == ';') {
        if (!item.empty()) archs.push_back(item);
        item.clear();
      } else {
        item += ch;
      }
    }
    info["cuda_archs"] = archs;
#ifdef ANISO_WITH_CUDA
    // Spectral specs run fused (a cluster of blocks per sample, planes in shared memory) when the
    // planes fit, else two-pass through a global workspace; cuda_plan(...) tells per problem.
    info["cuda_paths"] = "see anisodiff._C.cuda_plan(B, C, H, W, ...) and docs/cuda.md";
#endif
    info["cpu_capability"] = anisodiff::cpu::capability();
    info["cpu_capabilities_compiled"] = anisodiff::cpu::compiled_capabilities();
    info["cpu_kept_scratch_bytes"] = anisodiff::cpu::kept_scratch_bytes();
    return info;
  });
#ifdef ANISO_WITH_CUDA
  // Which CUDA path a [B, C, H, W] problem takes on `device` (for benchmarks and reports).
  m.def(
      "cuda_plan",
      [](int64_t batch, int64_t channels, int64_t height, int64_t width, bool spectral, int draws,
         bool per_sample_norm, int device) {
        anisodiff::NoiseProblem p;
        p.batch = batch;
        p.channels = channels;
        p.height = height;
        p.width = width;
        p.draws = draws;
        static const float dummy = 0.f;  // only tested against nullptr by the planner
        p.weights = spectral ? &dummy : nullptr;
        p.per_sample_norm = per_sample_norm;
        const anisodiff::cuda::LaunchPlan plan = anisodiff::cuda::plan_launch(p, device);
        py::dict out;
        out["path"] = plan.error ? "unsupported" : anisodiff::cuda::path_name(plan.path);
        out["smem_bytes"] = plan.smem_bytes;
        out["smem_limit"] = plan.smem_limit;
        out["workspace_bytes"] = plan.workspace_bytes;
        if (plan.error) out["error"] = plan.error;
        return out;
      },
      py::arg("batch"), py::arg("channels"), py::arg("height"), py::arg("width"), py::arg("spectral") = true,
      py::arg("draws") = 1, py::arg("per_sample_norm") = false, py::arg("device") = 0);
#endif
}
