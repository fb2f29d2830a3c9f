// The importable extension module anisodiff._C. Importing it loads this shared library, whose static
// initialisers register the anisodiff ops (csrc/ops.cpp) with the dispatcher. It binds no tensors,
// so it needs no libtorch_python; it only reports what was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/noise_cpu.h"

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
    info["cpu_capability"] = anisodiff::cpu::capability();
    info["cpu_capabilities_compiled"] = anisodiff::cpu::compiled_capabilities();
    return info;
  });
}
