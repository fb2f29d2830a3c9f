// Shared-memory bank-conflict trace of the host emulation, for scripts/cuda_perf_model.py (built only by
// emulator.build_traced, never by the tests' emulator). The rewritten kernel sources are compiled with
// GCC's ThreadSanitizer *instrumentation* (-fsanitize=thread at compile time, no TSan runtime linked):
// every load / store in them calls __tsan_read<N> / __tsan_write<N>(addr), defined here. An access to the
// running block's dynamic shared memory, made on a kernel thread's coroutine stack, is recorded under
// (block, the thread's barrier phase, warp = 32 consecutive threads, access site = the caller's PC, the
// thread's n-th execution of that site in the phase): the accesses of one warp instruction on a GPU.
// When the block passes a barrier (emu_phase_hook) each such group is scored like sm_90's shared memory:
// 32 banks of 4-byte words; 4-byte (and narrower) accesses are served per warp, 8-byte per half-warp,
// 16-byte per quarter-warp; a sub-group needs as many wavefronts as the most distinct words any bank
// holds (threads reading one word share it). n-way of a warp access = wavefronts / sub-groups (1 = no
// conflict). Totals per (kernel, site): warp accesses, wavefronts, ideal wavefronts, the worst n-way.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cuda_runtime.h"

extern unsigned char* emu_smem;

namespace {
struct Key {
  int block;
  long phase;
  int warp;
  uintptr_t site;
  long ordinal;
  bool operator==(const Key& o) const {
    return block == o.block && phase == o.phase && warp == o.warp && site == o.site && ordinal == o.ordinal;
  }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<uintptr_t>()(k.site);
    h ^= std::hash<long>()(k.phase * 1000003 + k.ordinal) + 0x9e3779b9 + (h << 6) + (h >> 2);
    h ^= std::hash<long>()((long)k.block * 4099 + k.warp) + 0x9e3779b9 + (h << 6) + (h >> 2);
    return h;
  }
};
struct Access {
  uint32_t off;
  uint8_t width, lane;
};
struct Stat {
  double accesses = 0, wavefronts = 0, ideal = 0;
  long max_way = 0, remote = 0;
};
bool g_on = false;
std::unordered_map<Key, std::vector<Access>, KeyHash> g_pending;
std::unordered_map<uint64_t, std::pair<long, long>> g_ordinal;  // (thread, site) -> (phase, count)
std::map<std::pair<uintptr_t, uintptr_t>, Stat> g_stats;        // (kernel, site)
std::unordered_map<Key, const void*, KeyHash> g_kernel_of;

void score(const Key& k, const std::vector<Access>& acc) {
  Stat& st = g_stats[{(uintptr_t)g_emu.kernel, k.site}];
  const int width = acc.front().width;
  const int per = width <= 4 ? 32 : (width == 8 ? 16 : 8);  // threads served per wavefront
  double wf = 0, ideal = 0;
  for (int sub = 0; sub < 32 / per; ++sub) {
    std::vector<uint32_t> words;
    for (const Access& a : acc) {
      if (a.lane / per != sub) continue;
      const uint32_t w0 = a.off / 4, w1 = (a.off + std::max<int>(a.width, 1) - 1) / 4;
      for (uint32_t w = w0; w <= w1; ++w) words.push_back(w);
    }
    if (words.empty()) continue;
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    int banks[32] = {0};
    int most = 0;
    for (uint32_t w : words) most = std::max(most, ++banks[w % 32]);
    wf += most;
    ideal += 1;
  }
  st.accesses += 1;
  st.wavefronts += wf;
  st.ideal += ideal;
  st.max_way = std::max(st.max_way, (long)((wf + ideal - 1) / ideal));
}

void flush(int block) {
  for (auto it = g_pending.begin(); it != g_pending.end();) {
    if (block < 0 || it->first.block == block) {
      score(it->first, it->second);
      it = g_pending.erase(it);
    } else {
      ++it;
    }
  }
}

// Whether the caller runs on kernel thread g_emu.cur's coroutine stack, not the scheduler's main
// context. Here, not in the header: the kernels' objects are instrumented, and an instrumented copy of
// this check would call the hooks that call it.
inline bool on_kernel_thread() {
  const int t = g_emu.cur;
  if (g_emu.n == 0 || t < 0 || (size_t)t >= g_emu.stacks.size() || g_emu.stacks[t] == nullptr) return false;
  const uintptr_t sp = (uintptr_t)__builtin_frame_address(0), stack = (uintptr_t)g_emu.stacks[t];
  return sp >= stack && sp < stack + kEmuStack;
}

inline void record(void* addr, int width, uintptr_t site) {
  if (!g_on || g_emu.n == 0) return;
  const uintptr_t a = (uintptr_t)addr, base = (uintptr_t)emu_smem;
  if (a < base || a >= base + g_emu.smem_stride * (size_t)g_emu.cluster) return;
  if (!on_kernel_thread()) return;
  const int t = g_emu.cur;
  const int rank = (int)((a - base) / g_emu.smem_stride), tid = t % g_emu.block;
  if (rank != t / g_emu.block) {  // a peer block's shared memory (DSMEM): not a bank access of this SM
    g_stats[{(uintptr_t)g_emu.kernel, site}].remote += 1;
    return;
  }
  const long phase = g_emu.waits[t];
  auto& ord = g_ordinal[((uint64_t)t << 48) ^ (uint64_t)site];
  if (ord.first != phase) ord = {phase, 0};
  const Key k{(int)(g_emu.cluster_base + t / g_emu.block), phase, tid / 32, site, ord.second++};
  g_pending[k].push_back(Access{(uint32_t)((a - base) % g_emu.smem_stride), (uint8_t)width, (uint8_t)(tid % 32)});
}

// Basic-block coverage per warp: the traced kernels are also compiled with -fsanitize-coverage=trace-pc,
// so every basic block they enter calls __sanitizer_cov_trace_pc (below). Recorded on kernel threads only:
// (kernel, the block's first return address = site) -> the (block, warp) pairs that entered it, which
// the model turns into the share of a kernel's warps that issue each source line (thread 0's reductions
// run on one warp of the block, however many iterations gcov counts there).
std::map<std::pair<uintptr_t, uintptr_t>, std::unordered_set<int64_t>> g_bb;

bool g_in_hook = false;  // the containers' code may be the instrumented copy the kernels' objects have

inline void record_block(uintptr_t site) {
  if (!g_on || g_in_hook || !on_kernel_thread()) return;
  const int t = g_emu.cur;
  g_in_hook = true;
  const int64_t block = (int64_t)(g_emu.cluster_base + t / g_emu.block), warp = (t % g_emu.block) / 32;
  g_bb[{(uintptr_t)g_emu.kernel, site}].insert(block << 16 | warp);
  g_in_hook = false;
}

// (kernel address, site address, block << 16 | warp) per basic block entered since the last call; clears.
at::Tensor warp_coverage() {
  int64_t n = 0;
  for (const auto& kv : g_bb) n += (int64_t)kv.second.size();
  at::Tensor rows = at::empty({n, 3}, at::kLong);
  int64_t* r = rows.data_ptr<int64_t>();
  for (const auto& [key, warps] : g_bb)
    for (int64_t w : warps) {
      *r++ = (int64_t)key.first;
      *r++ = (int64_t)key.second;
      *r++ = w;
    }
  g_bb.clear();
  return rows;
}

// (kernel address, site address, worst n-way, DSMEM accesses) and (warp accesses, wavefronts, ideal)
// per (kernel, site) since the last call; clears them.
std::tuple<at::Tensor, at::Tensor> trace_report() {
  flush(-1);
  const int64_t n = (int64_t)g_stats.size();
  at::Tensor ids = at::empty({n, 4}, at::kLong), vals = at::empty({n, 3}, at::kDouble);
  int64_t* i = ids.data_ptr<int64_t>();
  double* v = vals.data_ptr<double>();
  for (const auto& [key, st] : g_stats) {
    *i++ = (int64_t)key.first;
    *i++ = (int64_t)key.second;
    *i++ = st.max_way;
    *i++ = st.remote;
    *v++ = st.accesses;
    *v++ = st.wavefronts;
    *v++ = st.ideal;
  }
  g_stats.clear();
  g_ordinal.clear();
  return {ids, vals};
}
void trace_enable(bool on) {
  g_on = on;
  emu_phase_hook = on ? &flush : nullptr;
}
}  // namespace

#define EMU_SITE ((uintptr_t)__builtin_return_address(0))
extern "C" {
void __sanitizer_cov_trace_pc() { record_block(EMU_SITE); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void*) {}
#define EMU_RW(N)                                                            \
  void __tsan_read##N(void* a) { record(a, N, EMU_SITE); }                   \
  void __tsan_write##N(void* a) { record(a, N, EMU_SITE); }                  \
  void __tsan_unaligned_read##N(void* a) { record(a, N, EMU_SITE); }         \
  void __tsan_unaligned_write##N(void* a) { record(a, N, EMU_SITE); }        \
  void __tsan_volatile_read##N(void* a) { record(a, N, EMU_SITE); }          \
  void __tsan_volatile_write##N(void* a) { record(a, N, EMU_SITE); }
EMU_RW(1)
EMU_RW(2)
EMU_RW(4)
EMU_RW(8)
EMU_RW(16)
void __tsan_read_range(void* a, unsigned long n) { record(a, (int)std::min<unsigned long>(n, 16), EMU_SITE); }
void __tsan_write_range(void* a, unsigned long n) { record(a, (int)std::min<unsigned long>(n, 16), EMU_SITE); }
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
// Atomics (the host-side caches of the planner): plain sequentially consistent builtins, not recorded.
#define EMU_ATOMIC(N, T)                                                                                  \
  T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }    \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* e, T v, int, int) {                  \
    return __atomic_compare_exchange_n(a, e, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
  }                                                                                                        \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* e, T v, int, int) {                    \
    return __atomic_compare_exchange_n(a, e, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
  }
EMU_ATOMIC(8, char)
EMU_ATOMIC(16, short)
EMU_ATOMIC(32, int)
EMU_ATOMIC(64, long)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}

// gcov line coverage of the kernel objects (compiled with -fprofile-arcs): reset the counters before a
// case, dump them (.gcda next to the objects) after it; `gcov --json-format` then lists the lines run.
extern "C" void __gcov_reset(void);
extern "C" void __gcov_dump(void);
namespace {
void coverage_reset() { __gcov_reset(); }
void coverage_dump() { __gcov_dump(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(anisodiff_emu, m) {
  m.def("trace_enable(bool on) -> ()", &trace_enable);
  m.def("trace_report() -> (Tensor, Tensor)", &trace_report);
  m.def("warp_coverage() -> Tensor", &warp_coverage);
  m.def("coverage_reset() -> ()", &coverage_reset);
  m.def("coverage_dump() -> ()", &coverage_dump);
}
