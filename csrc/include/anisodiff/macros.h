// Portability macros for the header-only math shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ANISO_HD __host__ __device__ __forceinline__
#else
#define ANISO_HD inline __attribute__((always_inline))
#endif

#include <stdint.h>
