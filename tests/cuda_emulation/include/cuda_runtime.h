// tests/cuda_emulation: host emulation of the CUDA runtime subset the anisodiff kernels use, with MANY threads per block:
// every thread of a block is a ucontext coroutine; __syncthreads switches back to the scheduler, which
// runs the next phase once every thread has arrived. Thread order per phase: EMU_ORDER=fwd|rev|mix.
// __shfl_xor_sync is emulated as a block-wide exchange (two barriers): valid when every thread of the
// block calls it (which full-mask shuffles in block reductions require anyway).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>
#include <vector>
#include <functional>
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
struct EmuIdx { unsigned x = 0, y = 0, z = 0; };
inline EmuIdx threadIdx, blockIdx, blockDim, gridDim;
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) { float f; __builtin_memcpy(&f, &i, 4); return f; }
inline void sincospi(double x, double* s, double* c) { *s = sin(M_PI * x); *c = cos(M_PI * x); }
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448 : 4;
  return 0;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
template <class F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
extern unsigned char* emu_smem;

struct EmuSched {
  int n = 0, cur = 0;
  std::vector<ucontext_t> ctx;
  std::vector<int> state;  // 0 runnable, 1 at barrier, 2 done
  std::vector<char*> stacks;
  ucontext_t main;
  const std::function<void()>* body = nullptr;
  double xchg[1024];
  long barriers = 0;
  const char* site_file[1024];
  int site_line[1024];
};
inline EmuSched g_emu;
inline void emu_entry() {
  (*g_emu.body)();
  g_emu.state[g_emu.cur] = 2;
}  // returns to uc_link (main)
inline void emu_sync(const char* file, int line) {
  g_emu.state[g_emu.cur] = 1;
  g_emu.site_file[g_emu.cur] = file;
  g_emu.site_line[g_emu.cur] = line;
  swapcontext(&g_emu.ctx[g_emu.cur], &g_emu.main);
}
#define __syncthreads() emu_sync(__FILE__, __LINE__)
inline double __shfl_xor_sync(unsigned, double v, int o) {
  g_emu.xchg[g_emu.cur] = v;
  __syncthreads();
  const double r = g_emu.xchg[(g_emu.cur ^ o) % g_emu.n];
  __syncthreads();
  return r;
}
template <class F> inline void emu_launch(unsigned grid, unsigned block, size_t smem, F f) {
  const char* order_env = getenv("EMU_ORDER");  // read per launch: tests switch it within a process
  const int order = !order_env ? 0 : (!strcmp(order_env, "rev") ? 1 : (!strcmp(order_env, "mix") ? 2 : 0));
  const size_t kStack = 256 * 1024;
  EmuSched& S = g_emu;
  S.n = (int)block;
  S.ctx.resize(block);
  S.state.assign(block, 0);
  while (S.stacks.size() < block) S.stacks.push_back((char*)malloc(kStack));
  std::function<void()> body = f;
  S.body = &body;
  gridDim.x = grid; blockDim.x = block;
  if (smem > 48 * 1024 && smem > 232448) { fprintf(stderr, "EMU: smem %zu over the limit\n", smem); abort(); }
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    memset(emu_smem, 0xFF, smem + 65536);  // poison: NaN floats
    for (unsigned t = 0; t < block; ++t) {
      getcontext(&S.ctx[t]);
      S.ctx[t].uc_stack.ss_sp = S.stacks[t];
      S.ctx[t].uc_stack.ss_size = kStack;
      S.ctx[t].uc_link = &S.main;
      makecontext(&S.ctx[t], (void (*)())emu_entry, 0);
      S.state[t] = 0;
    }
    for (int phase = 0;; ++phase) {
      for (unsigned i = 0; i < block; ++i) {
        unsigned t = order == 0 ? i : (order == 1 ? block - 1 - i : ((phase & 1) ? block - 1 - i : i));
        if (order == 2 && (phase & 2)) t = (i * 97 + phase) % block;  // a scattered order (97 coprime to 2^k)
        if (S.state[t] != 0) continue;
        S.cur = (int)t;
        threadIdx.x = t;
        swapcontext(&S.main, &S.ctx[t]);
      }
      int at = 0, done = 0;
      for (unsigned t = 0; t < block; ++t) { at += S.state[t] == 1; done += S.state[t] == 2; }
      if (done == (int)block) break;
      if (at + done != (int)block || done != 0) {
        fprintf(stderr, "EMU: barrier divergence in block %u phase %d: %d at barrier, %d exited\n", b, phase, at, done);
        abort();
      }
      for (unsigned t = 1; t < block; ++t)
        if (S.site_line[t] != S.site_line[0] || strcmp(S.site_file[t], S.site_file[0])) {
          fprintf(stderr, "EMU: threads 0 and %u wait at different barriers (%s:%d vs %s:%d)\n", t, S.site_file[0], S.site_line[0], S.site_file[t], S.site_line[t]);
          abort();
        }
      ++S.barriers;
      for (unsigned t = 0; t < block; ++t) S.state[t] = 0;
    }
    for (size_t i = smem; i < smem + 65536; ++i)
      if (emu_smem[i] != 0xFF) { fprintf(stderr, "EMU: write past the dynamic smem (%zu bytes) at %zu\n", smem, i); abort(); }
  }
}
