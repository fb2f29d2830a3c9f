#!/usr/bin/env bash
# Compile every CUDA kernel (csrc/cuda/*.cu) with nvcc, without a GPU and without a CUDA torch:
# the kernel files include only CUDA headers and csrc/include/, so the CPU torch wheel suffices.
# Exits 0 with a message when nvcc or the kernels are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvcc >/dev/null 2>&1; then echo "cuda_compile_check: no nvcc, skipped"; exit 0; fi
if ! ls csrc/cuda/*.cu >/dev/null 2>&1; then echo "cuda_compile_check: no CUDA kernels yet"; exit 0; fi
cmake_bin=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))")
build=build/cuda-compile-check
"$cmake_bin" -S . -B "$build" -G Ninja -DPython_EXECUTABLE="$(command -v "$PY")" \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" >/dev/null
"$cmake_bin" --build "$build" --target anisodiff_cuda_compile_check
echo "cuda_compile_check: every kernel in csrc/cuda compiled"
