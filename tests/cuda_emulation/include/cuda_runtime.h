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
template <class T> inline void __stwb(T* p, T v) { *p = v; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __int_as_float(int i) { float f; __builtin_memcpy(&f, &i, 4); return f; }
inline void sincospi(double x, double* s, double* c) { *s = sin(M_PI * x); *c = cos(M_PI * x); }
// The SFU intrinsics with their documented worst-case error ADDED (sign from a hash of the argument),
// so the emulator's comparisons with the CPU kernel hold for any GPU within those bounds:
// __sincosf: 2^-21.41 absolute on [-pi, pi] (CUDA programming guide); rsqrt.approx.ftz.f32 (rsqrtf):
// 2 ulp, i.e. a relative 2^-22.
inline float emu_worst_sign(float x, unsigned salt) {
  unsigned u;
  __builtin_memcpy(&u, &x, 4);
  return ((u ^ salt) * 2654435761u) >> 31 ? 1.0f : -1.0f;
}
inline void __sincosf(float x, float* s, float* c) {
  const float e = 3.6e-7f;  // > 2^-21.41 = 3.57e-7
  *s = sinf(x) + e * emu_worst_sign(x, 0x5u);
  *c = cosf(x) + e * emu_worst_sign(x, 0xc0u);
}
inline float emu_rsqrt_approx(float x) { return (1.0f / sqrtf(x)) * (1.0f + 2.4e-7f * emu_worst_sign(x, 0x71u)); }
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize, cudaFuncAttributeNonPortableClusterSizeAllowed };
// EMU_SM_COUNT: the SM count the planner sees (default 4; scripts/cuda_perf_model.py sets 132, sm_90).
inline int emu_sm_count() { const char* e = getenv("EMU_SM_COUNT"); return e && atoi(e) > 0 ? atoi(e) : 4; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448 : emu_sm_count();
  return 0;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
template <class F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
extern unsigned char* emu_smem;
#define ANISO_CUDA_EMULATOR 1

// Thread-block clusters (sm_90): the blocks of one cluster run together as one set of coroutines;
// __syncthreads waits for the thread's own block, emu_cluster_sync for every thread of the cluster.
// Each block of a cluster has its own poisoned shared memory (emu_block_smem); emu_cluster_map gives
// a peer block's copy of a shared-memory address (distributed shared memory).
struct EmuSched {
  int n = 0, cur = 0, block = 1, cluster = 1;
  size_t smem_stride = 0;
  std::vector<ucontext_t> ctx;
  std::vector<int> state;  // 0 runnable, 1 at a block barrier, 2 done, 3 at a cluster barrier
  std::vector<char*> stacks;
  ucontext_t main;
  const std::function<void()>* body = nullptr;
  std::vector<double> xchg;
  long barriers = 0, cluster_barriers = 0;
  std::vector<const char*> site_file;
  std::vector<int> site_line;
  unsigned cluster_base = 0;
  const void* kernel = nullptr;  // the running kernel (for the launch log and the access trace)
  std::vector<long> waits;       // barriers each thread has waited at (its phase)
  std::vector<char> exited;      // blocks of the running cluster that have exited
};
inline EmuSched g_emu;
constexpr size_t kEmuStack = 256 * 1024;  // bytes of each kernel thread's coroutine stack
// Instrumentation for scripts/cuda_perf_model.py: every launch is logged (kernel, grid, block, smem,
// cluster); EMU_PLAN_ONLY=1 logs launches without running them; emu_phase_hook (set by the traced
// build, emu_trace.cpp) runs when a block (>= 0) or the whole cluster (-1) passes a barrier or ends.
struct EmuLaunchRecord { const void* kernel; unsigned grid, block, cluster; size_t smem; };
inline std::vector<EmuLaunchRecord> emu_launch_log;
inline void (*emu_phase_hook)(int block) = nullptr;
inline void emu_entry() {
  (*g_emu.body)();
  g_emu.state[g_emu.cur] = 2;
}  // returns to uc_link (main)
inline void emu_wait(int state, const char* file, int line) {
  g_emu.state[g_emu.cur] = state;
  ++g_emu.waits[g_emu.cur];
  g_emu.site_file[g_emu.cur] = file;
  g_emu.site_line[g_emu.cur] = line;
  swapcontext(&g_emu.ctx[g_emu.cur], &g_emu.main);
}
inline void emu_sync(const char* file, int line) { emu_wait(1, file, line); }
inline void emu_cluster_sync(const char* file, int line) { emu_wait(3, file, line); }
#define __syncthreads() emu_sync(__FILE__, __LINE__)
inline unsigned emu_cluster_rank() { return (unsigned)(g_emu.cur / g_emu.block); }
inline unsigned char* emu_block_smem() { return emu_smem + emu_cluster_rank() * g_emu.smem_stride; }
inline void* emu_cluster_map(void* ptr, unsigned rank) {
  unsigned char* mine = emu_block_smem();
  const ptrdiff_t off = (unsigned char*)ptr - mine;
  if (off < 0 || (size_t)off >= g_emu.smem_stride || rank >= (unsigned)g_emu.cluster) {
    fprintf(stderr, "EMU: cluster_map of a non-shared address or rank %u of %d\n", rank, g_emu.cluster);
    abort();
  }
  return emu_smem + rank * g_emu.smem_stride + off;
}
inline double __shfl_xor_sync(unsigned, double v, int o) {
  g_emu.xchg[g_emu.cur] = v;
  __syncthreads();
  const int base = g_emu.cur - g_emu.cur % g_emu.block;
  const double r = g_emu.xchg[base + ((g_emu.cur - base) ^ o) % g_emu.block];
  __syncthreads();
  return r;
}
constexpr size_t kEmuGuard = 65536;
inline bool emu_same_site(int a, int b) {
  return g_emu.site_line[a] == g_emu.site_line[b] && !strcmp(g_emu.site_file[a], g_emu.site_file[b]);
}
template <class F> inline void emu_launch_cluster(unsigned grid, unsigned block, size_t smem, unsigned cluster, F f,
                                                  const void* kernel = nullptr) {
  emu_launch_log.push_back(EmuLaunchRecord{kernel, grid, block, cluster, smem});
  if (getenv("EMU_PLAN_ONLY") && !strcmp(getenv("EMU_PLAN_ONLY"), "1")) return;
  const char* order_env = getenv("EMU_ORDER");  // read per launch: tests switch it within a process
  const int order = !order_env ? 0 : (!strcmp(order_env, "rev") ? 1 : (!strcmp(order_env, "mix") ? 2 : 0));
  if (cluster == 0 || grid % cluster != 0) { fprintf(stderr, "EMU: grid %u not a multiple of the cluster %u\n", grid, cluster); abort(); }
  EmuSched& S = g_emu;
  const unsigned n = block * cluster;
  S.n = (int)n;
  S.block = (int)block;
  S.cluster = (int)cluster;
  S.smem_stride = (smem + kEmuGuard + 255) / 256 * 256;
  if (S.smem_stride * cluster > (64u << 20)) { fprintf(stderr, "EMU: cluster smem too large\n"); abort(); }
  S.ctx.resize(n);
  S.state.assign(n, 0);
  S.xchg.assign(n, 0.0);
  S.site_file.assign(n, "");
  S.site_line.assign(n, 0);
  S.waits.assign(n, 0);
  S.kernel = kernel;
  while (S.stacks.size() < n) S.stacks.push_back((char*)malloc(kEmuStack));
  std::function<void()> body = f;
  S.body = &body;
  gridDim.x = grid; blockDim.x = block;
  if (smem > 48 * 1024 && smem > 232448) { fprintf(stderr, "EMU: smem %zu over the limit\n", smem); abort(); }
  for (unsigned c0 = 0; c0 < grid; c0 += cluster) {
    S.cluster_base = c0;
    memset(emu_smem, 0xFF, S.smem_stride * cluster);  // poison: NaN floats
    S.exited.assign(cluster, 0);
    for (unsigned t = 0; t < n; ++t) {
      getcontext(&S.ctx[t]);
      S.ctx[t].uc_stack.ss_sp = S.stacks[t];
      S.ctx[t].uc_stack.ss_size = kEmuStack;
      S.ctx[t].uc_link = &S.main;
      makecontext(&S.ctx[t], (void (*)())emu_entry, 0);
      S.state[t] = 0;
    }
    for (int phase = 0;; ++phase) {
      // Blocks of a cluster do not run in lockstep: one block (the first with runnable threads, in
      // rank order for fwd, reverse for rev, rotating for mix) runs alone until all its threads wait
      // at a cluster barrier, so a peer read that no cluster barrier orders after its write sees the
      // peer's old data or the poison.
      int lead = -1;
      for (unsigned q = 0; cluster > 1 && q < cluster && lead < 0; ++q) {
        const unsigned r = order == 1 ? cluster - 1 - q : (order == 2 ? (q + (unsigned)phase) % cluster : q);
        for (unsigned t = r * block; t < (r + 1) * block; ++t)
          if (S.state[t] == 0) { lead = (int)r; break; }
      }
      for (unsigned i = 0; i < n; ++i) {
        unsigned t = order == 0 ? i : (order == 1 ? n - 1 - i : ((phase & 1) ? n - 1 - i : i));
        if (order == 2 && (phase & 2)) t = (i * 97 + phase) % n;  // a scattered order (97 coprime to 2^k)
        if (lead >= 0 && (int)(t / block) != lead) continue;
        if (S.state[t] != 0) continue;
        S.cur = (int)t;
        threadIdx.x = t % block;
        blockIdx.x = c0 + t / block;
        swapcontext(&S.main, &S.ctx[t]);
      }
      // Release every block whose threads all wait at one block barrier, or the whole cluster when
      // every thread waits at one cluster barrier.
      int at_cluster = 0, done_all = 0;
      bool released = false;
      for (unsigned r = 0; r < cluster; ++r) {
        const unsigned t0 = r * block;
        int at = 0, at3 = 0, done = 0;
        for (unsigned t = t0; t < t0 + block; ++t) { at += S.state[t] == 1; at3 += S.state[t] == 3; done += S.state[t] == 2; }
        at_cluster += at3;
        done_all += done;
        if (done == (int)block && cluster > 1 && !S.exited[r]) {  // an exited block's smem is gone: poison it
          S.exited[r] = 1;
          memset(emu_smem + r * S.smem_stride, 0xFF, S.smem_stride);
        }
        if (done != 0 && done != (int)block) {
          fprintf(stderr, "EMU: barrier divergence in block %u phase %d: %d at a barrier, %d exited\n", c0 + r, phase, at + at3, done);
          abort();
        }
        if (at == (int)block) {
          for (unsigned t = t0 + 1; t < t0 + block; ++t)
            if (!emu_same_site(t, t0)) {
              fprintf(stderr, "EMU: threads %u and %u of block %u wait at different barriers (%s:%d vs %s:%d)\n", 0u, t - t0, c0 + r, S.site_file[t0], S.site_line[t0], S.site_file[t], S.site_line[t]);
              abort();
            }
          ++S.barriers;
          if (emu_phase_hook) emu_phase_hook((int)(c0 + r));
          for (unsigned t = t0; t < t0 + block; ++t) S.state[t] = 0;
          released = true;
        }
      }
      if (done_all == (int)n) {
        if (emu_phase_hook) emu_phase_hook(-1);
        break;
      }
      if (at_cluster == (int)n) {
        for (unsigned t = 1; t < n; ++t)
          if (!emu_same_site(t, 0)) {
            fprintf(stderr, "EMU: threads 0 and %u of cluster %u wait at different cluster barriers (%s:%d vs %s:%d)\n", t, c0 / cluster, S.site_file[0], S.site_line[0], S.site_file[t], S.site_line[t]);
            abort();
          }
        ++S.barriers;
        ++S.cluster_barriers;
        if (emu_phase_hook) emu_phase_hook(-1);
        for (unsigned t = 0; t < n; ++t) S.state[t] = 0;
        released = true;
      }
      bool runnable = false;  // blocks that did not lead this phase
      for (unsigned t = 0; t < n && !runnable && !released; ++t) runnable = S.state[t] == 0;
      if (!released && !runnable) {
        fprintf(stderr, "EMU: deadlock in cluster %u phase %d (threads at block and cluster barriers, or a cluster barrier after some blocks exited)\n", c0 / cluster, phase);
        abort();
      }
    }
    for (unsigned r = 0; r < cluster; ++r)
      for (size_t i = smem; i < smem + kEmuGuard; ++i)
        if (emu_smem[r * S.smem_stride + i] != 0xFF) { fprintf(stderr, "EMU: write past the dynamic smem (%zu bytes) at %zu in block %u\n", smem, i, c0 + r); abort(); }
  }
}
template <class F> inline void emu_launch(unsigned grid, unsigned block, size_t smem, F f, const void* kernel = nullptr) {
  emu_launch_cluster(grid, block, smem, 1u, f, kernel);
}

// cudaLaunchKernelEx with a cluster dimension (the only launch attribute the kernels use).
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};
template <class... P, class... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) cluster = cfg->attrs[i].val.clusterDim.x;
  emu_launch_cluster(cfg->gridDim.x, cfg->blockDim.x, cfg->dynamicSmemBytes, cluster, [&] { kernel(args...); },
                     (const void*)kernel);
  return 0;
}
