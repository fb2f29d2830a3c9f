"""scripts/cuda_perf_model.py: the parsers (ptxas -v, cuobjdump -sass, demangled names), the sm_90
occupancy arithmetic against hand-computed numbers, the launch-time formula, the labels (PREDICTED) of the
committed model output, and one real nvcc + cuobjdump run of a tiny kernel (when the toolchain is here)."""
import importlib.util
import json
import math
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_perf_model", REPO / "scripts" / "cuda_perf_model.py")
pm = importlib.util.module_from_spec(_spec)
sys.modules["cuda_perf_model"] = pm
_spec.loader.exec_module(pm)

MANGLED = "_ZN4demo39_GLOBAL__N__a01a4b43_7_tiny_cu_3ad7f98e5scaleILi3EEEvPfPKfi"
PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN4demo39_GLOBAL__N__a01a4b43_7_tiny_cu_3ad7f98e5scaleILi3EEEvPfPKfi' for 'sm_90'
ptxas info    : Function properties for _ZN4demo39_GLOBAL__N__a01a4b43_7_tiny_cu_3ad7f98e5scaleILi3EEEvPfPKfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 6.164 ms
ptxas info    : Compiling entry function '_ZN9anisodiff4cuda5spillEv' for 'sm_90'
ptxas info    : Function properties for _ZN9anisodiff4cuda5spillEv
    40 bytes stack frame, 76 bytes spill stores, 64 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 40 bytes cumulative stack size, 400 bytes cmem[0]
"""
# cuobjdump -sass of tiny.cu (below), encodings and NOP padding dropped
SASS = """
	code for sm_90
	.target	sm_90

		Function : _ZN4demo39_GLOBAL__N__a01a4b43_7_tiny_cu_3ad7f98e5scaleILi3EEEvPfPKfi
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                      /* 0x0000000000007919 */
        /*0020*/                   ULDC UR6, c[0x0][0x0] ;                   /* 0x0000000000067ab9 */
        /*0030*/                   ULDC UR8, c[0x0][0x220] ;                 /* 0x0000880000087ab9 */
        /*0040*/                   S2R R3, SR_TID.X ;                        /* 0x0000000000037919 */
        /*0050*/                   IMAD R0, R0, UR6, R3 ;                    /* 0x0000000600007c24 */
        /*0060*/                   ISETP.GE.AND P0, PT, R0, UR8, PT ;        /* 0x0000000800007c0c */
        /*0070*/               @P0 EXIT ;                                    /* 0x000000000000094d */
        /*0080*/                   S2UR UR5, SR_CgaCtaId ;                   /* 0x00000000000579c3 */
        /*0090*/                   UMOV UR4, 0x400 ;                         /* 0x0000040000047882 */
        /*00a0*/                   SHF.L.U32 R2, R3, 0x3, RZ ;               /* 0x0000000303027819 */
        /*00b0*/                   ULDC UR7, c[0x0][0xc] ;                   /* 0x0000030000077ab9 */
        /*00c0*/                   LOP3.LUT R11, R2, 0x3f8, RZ, 0xc0, !PT ;  /* 0x000003f8020b7812 */
        /*00d0*/                   LDC.64 R6, c[0x0][0x218] ;                /* 0x00008600ff067b82 */
        /*00e0*/                   LDC.64 R8, c[0x0][0x210] ;                /* 0x00008400ff087b82 */
        /*00f0*/                   ULEA UR4, UR5, UR4, 0x18 ;                /* 0x0000000405047291 */
        /*0100*/                   UIMAD UR5, UR6, UR7, URZ ;                /* 0x00000007060572a4 */
        /*0110*/                   ULDC.64 UR6, c[0x0][0x208] ;              /* 0x0000820000067ab9 */
        /*0120*/                   LEA R10, R3, UR4, 0x2 ;                   /* 0x00000004030a7c11 */
        /*0130*/                   IMAD.WIDE R2, R0, 0x4, R6 ;               /* 0x0000000400027825 */
        /*0140*/                   LDG.E.CONSTANT R3, desc[UR6][R2.64] ;     /* 0x0000000602037981 */
        /*0150*/                   WARPSYNC.ALL ;                            /* 0x0000000000007948 */
        /*0160*/                   IMAD.WIDE R4, R0.reuse, 0x4, R8 ;         /* 0x0000000400047825 */
        /*0170*/                   IADD3 R0, R0, UR5, RZ ;                   /* 0x0000000500007c10 */
        /*0180*/                   ISETP.GE.AND P0, PT, R0, UR8, PT ;        /* 0x0000000800007c0c */
        /*0190*/                   STS [R10], R3 ;                           /* 0x000000030a007388 */
        /*01a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;             /* 0x0000000000007b1d */
        /*01b0*/                   LDS R12, [R11+UR4] ;                      /* 0x000000040b0c7984 */
        /*01c0*/                   FMUL R13, R12, 3 ;                        /* 0x404000000c0d7820 */
        /*01d0*/                   STG.E desc[UR6][R4.64], R13 ;             /* 0x0000000d04007986 */
        /*01e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;             /* 0x0000000000007b1d */
        /*01f0*/              @!P0 BRA 0x130 ;                               /* 0xfffffffc00cc8947 */
        /*0200*/                   EXIT ;                                    /* 0x000000000000794d */
        /*0210*/                   BRA 0x210;                                /* 0xfffffffc00fc7947 */
		..........


"""
TINY_CU = """namespace demo { namespace {
template <int N>
__global__ void __launch_bounds__(256) scale(float* __restrict__ y, const float* __restrict__ x, int n) {
  __shared__ float tile[256];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    tile[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = N * tile[(threadIdx.x * 2) % 256];
    __syncthreads();
  }
}
} void launch(float* y, const float* x, int n) { scale<3><<<4, 256>>>(y, x, n); } }
"""


def test_parse_ptxas():
    r = pm.parse_ptxas(PTXAS)
    assert r[MANGLED] == {"registers": 16, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem_static": 1024,
                          "barriers": 1, "cmem": 0, "arch": 90}
    s = r["_ZN9anisodiff4cuda5spillEv"]
    assert (s["registers"], s["spill_stores"], s["spill_loads"], s["stack"], s["cmem"]) == (128, 76, 64, 40, 400)


def test_parse_sass():
    r = pm.parse_sass(SASS)[MANGLED]
    assert r["total"] == 34  # before the NOP padding, the end-of-code `BRA` to itself included
    assert r["classes"]["smem"] == 2 and r["classes"]["gmem"] == 2 and r["classes"]["sync"] == 3
    assert r["classes"]["sync"] == 3  # WARPSYNC, 2 x BAR.SYNC
    assert r["loops"] == 1  # the grid-stride loop (0x130 .. 0x1f0); the self-branch trap is not a loop
    ml = r["main_loop"]
    assert (ml["start"], ml["end"], ml["instructions"]) == (0x130, 0x1F0, 13)
    assert ml["classes"]["fp32"] == 1 and ml["gmem_load_bytes"] == 4


# nvdisasm -g -c of tiny.cu compiled with -lineinfo (the path rewritten as if under csrc/cuda)
NVDISASM = """.text._ZN4demo39_GLOBAL__N__a01a4b43_7_tiny_cu_3ad7f98e5scaleILi3EEEvPfPKfi:
	//## File "/src/csrc/cuda/tiny.cu", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
	//## File "/src/csrc/cuda/tiny.cu", line 5
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   ULDC UR6, c[0x0][0x0] ;
        /*0030*/                   ULDC UR8, c[0x0][0x220] ;
        /*0040*/                   S2R R3, SR_TID.X ;
        /*0050*/                   IMAD R0, R0, UR6, R3 ;
        /*0060*/                   ISETP.GE.AND P0, PT, R0, UR8, PT ;
        /*0070*/               @P0 EXIT ;
        /*0080*/                   S2UR UR5, SR_CgaCtaId ;
        /*0090*/                   UMOV UR4, 0x400 ;
        /*00a0*/                   SHF.L.U32 R2, R3, 0x3, RZ ;
        /*00b0*/                   ULDC UR7, c[0x0][0xc] ;
        /*00c0*/                   LOP3.LUT R11, R2, 0x3f8, RZ, 0xc0, !PT ;
	//## File "/src/csrc/cuda/tiny.cu", line 6
        /*00d0*/                   LDC.64 R6, c[0x0][0x218] ;
	//## File "/src/csrc/cuda/tiny.cu", line 8
        /*00e0*/                   LDC.64 R8, c[0x0][0x210] ;
        /*00f0*/                   ULEA UR4, UR5, UR4, 0x18 ;
	//## File "/src/csrc/cuda/tiny.cu", line 5
        /*0100*/                   UIMAD UR5, UR6, UR7, URZ ;
        /*0110*/                   ULDC.64 UR6, c[0x0][0x208] ;
        /*0120*/                   LEA R10, R3, UR4, 0x2 ;
	//## File "/src/csrc/cuda/tiny.cu", line 6
        /*0130*/                   IMAD.WIDE R2, R0, 0x4, R6 ;
        /*0140*/                   LDG.E.CONSTANT R3, desc[UR6][R2.64] ;
	//## File "/src/csrc/cuda/tiny.cu", line 7
        /*0150*/                   WARPSYNC.ALL ;
	//## File "/src/csrc/cuda/tiny.cu", line 8
        /*0160*/                   IMAD.WIDE R4, R0.reuse, 0x4, R8 ;
	//## File "/src/csrc/cuda/tiny.cu", line 5
        /*0170*/                   IADD3 R0, R0, UR5, RZ ;
        /*0180*/                   ISETP.GE.AND P0, PT, R0, UR8, PT ;
	//## File "/src/csrc/cuda/tiny.cu", line 6
        /*0190*/                   STS [R10], R3 ;
	//## File "/src/csrc/cuda/tiny.cu", line 7
        /*01a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "/src/csrc/cuda/tiny.cu", line 8
        /*01b0*/                   LDS R12, [R11+UR4] ;
        /*01c0*/                   FMUL R13, R12, 3 ;
        /*01d0*/                   STG.E desc[UR6][R4.64], R13 ;
	//## File "/src/csrc/cuda/tiny.cu", line 9
        /*01e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "/src/csrc/cuda/tiny.cu", line 5
        /*01f0*/              @!P0 BRA `(.L_x_0) ;
	//## File "/src/csrc/cuda/tiny.cu", line 11
        /*0200*/                   EXIT ;
        /*0210*/                   BRA `(.L_x_1);
"""


def test_line_info_and_executed_instructions():
    lines = pm.parse_line_info(NVDISASM)[MANGLED]
    assert lines[0x0] == "csrc/cuda/tiny.cu:3" and lines[0x1b0] == "csrc/cuda/tiny.cu:8"
    assert lines[0x1f0] == "csrc/cuda/tiny.cu:5"
    instrs = pm.parse_sass(SASS)[MANGLED]["instructions"]
    everything = pm.executed_instructions(instrs, lines, None)
    assert everything["total"] == 34
    # only the loop's lines 5 and 8 ran (say): the loads / stores of line 6 and the barriers drop out
    loop = pm.executed_instructions(instrs, lines, {"csrc/cuda/tiny.cu:5", "csrc/cuda/tiny.cu:8"}, 0x130, 0x1F0)
    assert loop["total"] == 7 and loop.get("smem") == 1 and "sync" not in loop and loop["fp32"] == 1


NVDISASM_GI = """
.text._Z1kv:
	//## File "/src/csrc/cuda/k.cu", line 10
        /*0000*/                   IMAD R0, R1, R2, RZ ;
	//## File "/src/csrc/include/anisodiff/philox.h", line 30 inlined at "/src/csrc/cuda/k.cu", line 12
	//## File "/src/csrc/cuda/k.cu", line 12
        /*0010*/                   IMAD.WIDE.U32 R2, R3, 0x5, RZ ;
	//## File "/src/csrc/include/anisodiff/philox.h", line 30 inlined at "/src/csrc/cuda/k.cu", line 14
	//## File "/src/csrc/cuda/k.cu", line 14
        /*0020*/                   IMAD.WIDE.U32 R4, R3, 0x5, RZ ;
        /*0030*/                   LOP3.LUT R4, R4, R5, RZ, 0x3c, !PT ;
"""


def test_inline_chains_weight_a_shared_header_line_by_its_call_site():
    chains = pm.parse_inline_chains(NVDISASM_GI)["_Z1kv"]
    assert chains[0x0] == ["csrc/cuda/k.cu:10"]
    assert chains[0x10] == ["csrc/include/anisodiff/philox.h:30", "csrc/cuda/k.cu:12"]
    assert chains[0x30] == ["csrc/include/anisodiff/philox.h:30", "csrc/cuda/k.cu:14"]
    instrs = [(0x0, "IMAD"), (0x10, "IMAD"), (0x20, "IMAD"), (0x30, "LOP3")]
    line_of = {a: c[0] for a, c in chains.items()}
    # the header line ran (from the call at line 12); the call at line 14 never did
    ran = {"csrc/cuda/k.cu:10": 5, "csrc/cuda/k.cu:12": 5, "csrc/cuda/k.cu:14": 0,
           "csrc/include/anisodiff/philox.h:30": 5}
    assert pm.executed_instructions(instrs, line_of, ran, per=5)["total"] == 4  # innermost line alone
    assert pm.executed_instructions(instrs, line_of, ran, per=5, chain_of=chains)["total"] == 2
    # a header line with no host code (GPU-only inline PTX: absent from the counts) defers to its call sites
    gpu_only = {k: v for k, v in ran.items() if "philox" not in k}
    assert pm.executed_instructions(instrs, line_of, gpu_only, per=5, chain_of=chains)["total"] == 2
    # a loop kept rolled around 0x10 that runs 3 times per iteration of the main loop
    assert pm.executed_instructions(instrs, line_of, ran, per=5, chain_of=chains,
                                    inner_loops=[(0x10, 0x10, 3.0)])["total"] == 4


def test_shared_memory_kernels_count_pinned_loops_and_thread_shares(tmp_path, monkeypatch):
    """A `#pragma unroll 1` loop counts its iterations per thread (gcov: entries + iterations on the
    `for` line, the entries subtracted); a loop the compiler rolled on its own counts once; a line that
    ran on under 1 in 32 threads counts 32 x its share (thread 0's reduction: 1 warp of the block's)."""
    src = tmp_path / "csrc" / "cuda" / "k.cu"
    src.parent.mkdir(parents=True)
    src.write_text("\n".join(["// 1", "#pragma unroll 1", "for (int u = 0; u < 2; ++u) {", "}",
                              "for (int i = 0; i < nw; ++i) {", "}"]) + "\n")
    monkeypatch.setattr(pm, "REPO", tmp_path)
    line_of = {0x10: "csrc/cuda/k.cu:3", 0x20: "csrc/cuda/k.cu:3", 0x30: "csrc/cuda/k.cu:5",
               0x40: "csrc/cuda/k.cu:1"}
    sass = {"loop_list": [(0x10, 0x20, 2), (0x30, 0x30, 1)]}
    trace = {"plan_B1": {"launches": [{"kernel": "k", "grid": 2, "block": 512}]}}
    ran = {"csrc/cuda/k.cu:3": 3 * 1024, "csrc/cuda/k.cu:5": 17 * 1024, "csrc/cuda/k.cu:1": 1024}
    assert pm.traced_threads(trace, "k") == 1024
    assert pm.rolled_loop_iterations(sass, line_of, ran, trace, "k") == [(0x10, 0x20, 2.0)]  # 3 - 1 entry
    instrs = [(0x10, "FADD"), (0x20, "BRA"), (0x30, "DADD"), (0x40, "LDS")]
    rolled = pm.rolled_loop_iterations(sass, line_of, ran, trace, "k")
    assert pm.executed_instructions(instrs, line_of, ran, inner_loops=rolled, threads=1024)["total"] == 6
    thread0 = {**ran, "csrc/cuda/k.cu:5": 2}  # the unpinned loop's line on thread 0 of both blocks only
    got = pm.executed_instructions(instrs, line_of, thread0, inner_loops=rolled, threads=1024)
    assert got["total"] == pytest.approx(5 + 32 * 2 / 1024)


# a kernel calling two subroutines: a slow path (FCHK then a predicated branch over the call: libdevice's
# float division) and an unconditional call; the called code sits after EXIT, ending in RET
CALLS_SASS = """
		Function : _Z1kv
        /*0000*/                   MUFU.RCP R3, R6 ;
        /*0010*/                   FCHK P1, R7, R6 ;
        /*0020*/                   FFMA R2, -R6, R3, 1 ;
        /*0030*/              @!P1 BRA 0x60 ;
        /*0040*/                   MOV R12, 0x60 ;
        /*0050*/                   CALL.REL.NOINC 0xa0 ;
        /*0060*/                   MOV R20, 0x80 ;
        /*0070*/                   CALL.REL.NOINC 0xd0 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
        /*00a0*/                   SHF.R.U32.HI R7, RZ, 0x17, R6 ;
        /*00b0*/                   FFMA R2, R2, R3, R4 ;
        /*00c0*/                   RET.REL.NODEC R12 0x0 ;
        /*00d0*/                   DADD R2, R2, R4 ;
        /*00e0*/                   RET.REL.NODEC R20 0x0 ;
"""


def test_subroutines_slow_paths_count_zero_and_calls_count_per_call():
    # an absolute call (vprintf, __assertfail) is outside the kernel's code: not a subroutine of it
    absolute = CALLS_SASS.replace("        /*0080*/                   EXIT ;",
                                  "        /*0080*/                   CALL.ABS.NOINC 0x0 ;\n        /*0088*/                   EXIT ;")
    assert pm.parse_sass(absolute)["_Z1kv"]["called"] == [(0xD0, 0xE0, [0x70])]
    r = pm.parse_sass(CALLS_SASS)["_Z1kv"]
    assert r["slow_paths"] == [(0xA0, 0xC0), (0x40, 0x50)]  # the subroutine, and its call block
    assert r["called"] == [(0xD0, 0xE0, [0x70])]
    assert r["slow_instructions"] == 5
    line_of = {a: "csrc/cuda/k.cu:3" for a, _ in r["instructions"]}
    line_of.update({0x70: "csrc/cuda/k.cu:2", 0xD0: "csrc/cuda/k.cu:9", 0xE0: "csrc/cuda/k.cu:9"})
    ran = {"csrc/cuda/k.cu:3": 64, "csrc/cuda/k.cu:2": 2, "csrc/cuda/k.cu:9": 64}
    # without the call structure: every instruction counts 1 (the call line ran on 2 of 64 threads: 1)
    assert pm.executed_instructions(r["instructions"], line_of, ran, threads=64)["total"] == 15
    got = pm.executed_instructions(r["instructions"], line_of, ran, threads=64, calls=r)
    # 15 - 5 slow-path instructions; the called DADD + RET count as their one call does (32 x 2 / 64 = 1)
    assert got["total"] == 10
    ran["csrc/cuda/k.cu:2"] = 1  # the call on 1 of 64 threads: 0.5, and so the subroutine's 2 instructions
    got = pm.executed_instructions(r["instructions"], line_of, ran, threads=64, calls=r)
    assert got["total"] == pytest.approx(10 - 3 * 0.5)


# a warp shuffle the compiler could not prove converged: BRA.DIV jumps, on a diverged warp only, to an
# out-of-line WARPSYNC.COLLECTIVE copy placed after EXIT, which branches back
DIVERGED_SASS = """
		Function : _Z1kv
        /*0000*/                   UMOV UR6, 0xffffffff ;
        /*0010*/                   BRA.DIV UR6, 0x80 ;
        /*0020*/                   SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
        /*0030*/                   FADD R2, R2, R3 ;
        /*0040*/                   STG.E [R4.64], R2 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
        /*0070*/                   NOP;
        /*0080*/                   WARPSYNC.COLLECTIVE R5, 0xb0 ;
        /*0090*/                   SHFL.BFLY P0, R3, R2, R6, R7 ;
        /*00a0*/                   ENDCOLLECTIVE ;
        /*00b0*/                   BRA 0x30 ;
"""


def test_diverged_warp_copies_are_slow_paths_not_loops():
    r = pm.parse_sass(DIVERGED_SASS)["_Z1kv"]
    assert pm.diverged_paths([(a, op, "", "") for a, op in r["instructions"]]) == []  # (needs the .DIV)
    assert r["loops"] == 0 and r["main_loop"] is None  # the branch back is not a loop
    assert (0x80, 0xB0) in r["slow_paths"] and r["slow_instructions"] == 4
    line_of = {a: "csrc/cuda/k.cu:3" for a, _ in r["instructions"]}
    got = pm.executed_instructions(r["instructions"], line_of, {"csrc/cuda/k.cu:3": 32}, threads=32, calls=r)
    assert got["total"] == 7  # the fast path (and the end-of-code trap), not the collective copy


def test_warp_shares_take_the_union_of_the_warps_of_a_lines_basic_blocks():
    """A basic block runs from its coverage call to the next; a line's share is the union of the warps
    that entered the blocks its line-table rows lie in, over the kernel's launched warps."""
    calls = [0x100, 0x200, 0x300]  # three blocks: [0x100, 0x200), [0x200, 0x300), [0x300, ...)
    table = [(0x108, "csrc/cuda/k.cu:10"), (0x120, "csrc/cuda/k.cu:11"), (0x208, "csrc/cuda/k.cu:11"),
             (0x210, "csrc/cuda/k.cu:12"), (0x308, "csrc/cuda/k.cu:13")]
    kern = 0xABC
    rows = [(kern, 0x105, (b << 16) | w) for b in range(2) for w in range(4)]  # every warp of both blocks
    rows += [(kern, 0x205, (b << 16) | 0) for b in range(2)]  # warp 0 of each block (thread 0's code)
    got = pm.warp_shares(rows, table, calls, {kern: 8})[kern]
    assert got == {"csrc/cuda/k.cu:10": 1.0, "csrc/cuda/k.cu:11": 1.0, "csrc/cuda/k.cu:12": 0.25}
    # the block at 0x300 never ran: its line has no share (the gcov bound decides there)
    assert "csrc/cuda/k.cu:13" not in got
    # in executed_instructions a share replaces the 32 x threads bound
    instrs = [(0x10, "LDS"), (0x20, "DADD")]
    line_of = {0x10: "csrc/cuda/k.cu:12", 0x20: "csrc/cuda/k.cu:13"}
    ran = {"csrc/cuda/k.cu:12": 64, "csrc/cuda/k.cu:13": 64}  # 16 iterations on 2 threads each: bound 1
    assert pm.executed_instructions(instrs, line_of, ran, threads=256)["total"] == 2
    assert pm.executed_instructions(instrs, line_of, ran, threads=256, warp_share=got)["total"] == 1.25


def test_loops_counted_needs_every_loop_pinned_or_run_once(tmp_path, monkeypatch):
    src = tmp_path / "csrc" / "cuda" / "k.cu"
    src.parent.mkdir(parents=True)
    src.write_text("\n".join(["// 1", "#pragma unroll 1", "for (int u = 0; u < 2; ++u) {", "}",
                              "for (int i = 0; i < n; ++i) {", "}"]) + "\n")
    monkeypatch.setattr(pm, "REPO", tmp_path)
    line_of = {0x10: "csrc/cuda/k.cu:3", 0x20: "csrc/cuda/k.cu:3", 0x30: "csrc/cuda/k.cu:5"}
    sass = {"loop_list": [(0x10, 0x20, 2), (0x30, 0x30, 1)]}
    trace = {"plan_B1": {"launches": [{"kernel": "k", "grid": 1, "block": 64}]}}
    once = {"csrc/cuda/k.cu:3": 3 * 64, "csrc/cuda/k.cu:5": 2 * 64}  # the unpinned loop: 1 iteration
    assert pm.loops_counted(sass, line_of, once, trace, "k")
    more = {**once, "csrc/cuda/k.cu:5": 5 * 64}  # 4 iterations of a loop the compiler may have rolled
    assert not pm.loops_counted(sass, line_of, more, trace, "k")
    # ... unless it is slow-path code
    assert pm.loops_counted(sass, line_of, more, trace, "k", {"slow_paths": [(0x30, 0x30)]})
    assert not pm.loops_counted(sass, line_of, once, None, "k")  # no trace: the ratio estimate
    # a loop that only some threads run (thread 0's): per warp that runs it. Without its warps: unknown
    thread0 = {**once, "csrc/cuda/k.cu:5": 5}  # thread 0 of the one block: 4 iterations (+ the entry)
    assert not pm.loops_counted(sass, line_of, thread0, trace, "k")
    assert not pm.loops_counted(sass, line_of, thread0, trace, "k", warp_share={"csrc/cuda/k.cu:5": 0.5})
    thread0_once = {**once, "csrc/cuda/k.cu:5": 2}  # one iteration on thread 0 (a k = 1 axis loop)
    assert pm.loops_counted(sass, line_of, thread0_once, trace, "k", warp_share={"csrc/cuda/k.cu:5": 0.5})
    # a loop whose closing line gcov does not give
    assert not pm.loops_counted(sass, {**line_of, 0x30: "sm_90_rt.hpp:5"}, once, trace, "k")


def test_ldg_bytes():
    assert pm._ldg_bytes("LDG", ".E.128.CONSTANT") == 16
    assert pm._ldg_bytes("LDG", ".E.64") == 8
    assert pm._ldg_bytes("LDG", ".E.U16") == 2
    assert pm._ldg_bytes("STG", ".E") == 0


@pytest.mark.parametrize("demangled,short", [
    ("void demo::(anonymous namespace)::scale<3>(float*, float const*, int)", "scale<3>"),
    ("void anisodiff::cuda::(anonymous namespace)::add_noise_elementwise<4, 0, true>(anisodiff::NoiseProblem, "
     "float const*)", "add_noise_elementwise<4, 0, true>"),
    ("anisodiff::cuda::(anonymous namespace)::two_pass_filter(anisodiff::NoiseProblem, anisodiff::cuda::SpectralGeom, "
     "float2*, float*)", "two_pass_filter"),
    ("void a::k<(anisodiff::cuda::Mode)1, true>(int)", "k<(anisodiff::cuda::Mode)1, true>"),
])
def test_short_name(demangled, short):
    assert pm.short_name(demangled) == short


# Hand-computed with sm_90's rules: registers per warp rounded up to 256, 4 quadrants of 16384; shared
# memory + 1 KiB reserved per block, rounded up to 128 B, of 228 KiB; 2048 threads, 64 warps, 32 blocks.
@pytest.mark.parametrize("threads,regs,smem,blocks,limiter,occ", [
    (256, 123, 0, 2, "registers", 0.25),      # 128 x 32 = 4096 / warp: 4 warps per quadrant, 16 per SM
    (512, 64, 132368, 1, "shared_memory", 0.25),  # 133392 B per block: 1 of 233472; registers allow 2
    (256, 32, 0, 8, "registers", 1.0),        # 1024 / warp: 64 warps; threads and warps also allow 8
    (128, 255, 0, 2, "registers", 0.125),     # 8192 / warp: 2 per quadrant, 8 warps = 2 blocks of 4
    (512, 92, 33552, 1, "registers", 0.25),   # 3072 / warp: 5 per quadrant = 20 warps: 1 block of 16
    (1024, 16, 0, 2, "threads", 1.0),         # threads: 2048 / 1024 = 2 (registers allow 4)
    (64, 16, 0, 32, "blocks", 1.0),           # 32 blocks of 2 warps
    (256, 40, 116000, 1, "shared_memory", 0.125),  # 117024 B: one per SM (two need 234048 > 233472)
])
def test_occupancy_sm90(threads, regs, smem, blocks, limiter, occ):
    r = pm.occupancy(threads, regs, smem)
    assert r["blocks_per_sm"] == blocks
    assert r["occupancy"] == pytest.approx(occ)
    assert r["limits"][limiter] == blocks
    if limiter == "shared_memory":
        assert r["limiter"] == "shared_memory"


def test_occupancy_smem_too_large_for_a_block():
    assert pm.occupancy(256, 32, 232449)["blocks_per_sm"] == 0
    assert pm.occupancy(256, 32, 232448 - 1024)["blocks_per_sm"] == 1


def test_launch_time_memory_bound_and_fill():
    occ = pm.occupancy(256, 32)
    nbytes = 3 * 2**30
    t = pm.launch_time(grid=4224, threads=256, occ=occ, bytes_dram=nbytes, bytes_read=nbytes / 3, warp_instr=1e6,
                       mufu=0, fp64=0, wavefronts=0, inflight_per_warp=32 * 16)
    copy = pm.MACHINE["dram_peak_Bps"] * pm.MACHINE["copy_efficiency"]
    assert t["bound"] == "dram"
    assert t["seconds"] == pytest.approx(nbytes / copy + pm.MACHINE["launch_gap_us"] * 1e-6)
    # one block on each of 16 SMs: the DRAM share is capped per SM, and issue runs on 16 SMs only
    few = pm.launch_time(grid=16, threads=256, occ=occ, bytes_dram=nbytes, bytes_read=nbytes / 3, warp_instr=1e6,
                         mufu=0, fp64=0, wavefronts=0, inflight_per_warp=32 * 16)
    assert few["active_sms"] == 16 and few["seconds"] > 5 * t["seconds"]
    # shared-memory wavefronts bound a kernel that moves little
    sm = pm.launch_time(grid=132, threads=512, occ=pm.occupancy(512, 64, 100000), bytes_dram=1e6, bytes_read=0,
                        warp_instr=1e5, mufu=0, fp64=0, wavefronts=1e9, inflight_per_warp=0)
    assert sm["bound"] == "shared_memory"
    assert sm["parts_us"]["shared_memory"] == pytest.approx(1e9 / (132 * pm.SM90["clock_ghz"] * 1e9) * 1e6, rel=1e-3)


def test_cases_grid():
    cases = pm.make_cases(pm.CASE_BATCHES, pm.CASE_SHAPES, pm.CASE_DTYPES, pm.CASE_KINDS)
    assert len(cases) == 4 * 4 * 2 * 2
    assert {c["B"] for c in cases} == {16, 64, 256, 1024}


def test_committed_model_output_is_labelled_predicted():
    path = REPO / "benchmarks" / "results" / "model-sm90.json"
    if not path.exists():
        pytest.skip("no committed model output yet")
    rep = json.loads(path.read_text())
    assert rep["format"] == pm.FORMAT and "PREDICTED" in rep["label"] and "PREDICTED" in rep["note"]
    assert rep["source"]["commit"] and rep["cases"]
    assert all(g["verdict"].startswith("PREDICTED") for g in rep["goals"])
    assert all(k.startswith("predicted") for c in rep["cases"] for k in c["cuda"] if "pct" in k)
    md = pm.markdown(rep)
    assert md.startswith("PREDICTED") and "PREDICTED % copy" in md


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_real_ptxas_and_sass_of_a_tiny_kernel(tmp_path):
    cuobjdump = pm._tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump")
    (tmp_path / "tiny.cu").write_text(TINY_CU)
    p = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "-Xptxas", "-v", str(tmp_path / "tiny.cu"), "-o",
                        str(tmp_path / "tiny.cubin")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    res = pm.parse_ptxas(p.stdout + p.stderr)
    (name,) = res
    assert pm.short_name(pm.demangle([name])[name]) == "scale<3>"
    assert res[name]["smem_static"] == 1024 and res[name]["spill_stores"] == 0 and res[name]["registers"] > 0
    sass = pm.parse_sass(subprocess.run([cuobjdump, "-sass", str(tmp_path / "tiny.cubin")], capture_output=True,
                                        text=True, check=True).stdout)[name]
    assert sass["loops"] == 1 and sass["classes"]["smem"] == 2 and sass["main_loop"]["classes"]["sync"] == 3


def test_spectral_goal_names_the_cases_the_launch_gap_caps():
    """A case whose ideal traffic takes less time than the launch gap can reach the goal at no kernel
    speed (a copy of the same bytes neither): the verdict says which; the kernel-time goal excludes it."""
    def case(B, C, H, W, pct, cap, kernel):
        return {"kind": "squeeze+spectral", "B": B, "C": C, "H": H, "W": W, "dtype": "fp32",
                "cuda": {"launches": [{"kernel": "k", "grid": 264, "block": 128}], "path": "fused",
                         "predicted_pct_copy_gpu": pct, "predicted_pct_copy_call": pct,
                         "predicted_pct_copy_kernel": kernel, "predicted_pct_copy_cap": cap}}
    cases = [case(64, 3, 32, 32, 20.0, 26.7, 70.0), case(1024, 4, 64, 64, 65.0, 97.0, 67.0)]
    goals = {g["goal"]: g for g in pm.goal_verdicts(cases)}
    gpu = next(g for k, g in goals.items() if "spectral" in k and "GPU time" in k)
    assert gpu["verdict"] == "PREDICTED NOT MET" and gpu["met"] == 1
    assert "1 of 2 cases" in gpu["note"] and "B=64 3x32x32" in gpu["note"] and "B=1024" not in gpu["note"]
    kern = next(g for k, g in goals.items() if "spectral" in k and "kernel time" in k)
    assert kern["verdict"] == "PREDICTED MET" and "note" not in kern
    # the cap itself: copy time over copy time plus one gap per launch
    gap = pm.MACHINE["launch_gap_us"] * 1e-6
    copy_t = 3 * 64 * 3 * 32 * 32 * 4 / (pm.MACHINE["dram_peak_Bps"] * pm.MACHINE["copy_efficiency"])
    assert 100 * copy_t / (copy_t + gap) < 30  # B=64 3x32x32 fp32: ~27%, whatever the kernel does


@pytest.mark.parametrize("kernel,force,batch", [
    ("fused_spectral_pow2<KA=2,step=0,vec=1,pert=0,LH=5,LW=5,CK=3,dtype=fp32>", "fused_pow2", 1),
    ("fused_spectral_lines32<KA=2,CK=3,dtype=fp32>", "fused_lines32", 2),
    ("fused_spectral<KA=2,step=0>", "fused_general", 1),
    ("add_noise_fast<3, 1, false, (anisodiff::DType)0>", None, 1),
])
def test_trace_runs_the_cases_kernel_on_a_batch_that_fills_its_blocks(kernel, force, batch):
    """The bank / coverage trace of a case forces the kernel its batch is planned on, with a batch that
    leaves no block half empty: the whole-line kernel's blocks take two slices (at B = 1 the second's
    skipped noise would count as the batch's)."""
    case = {"kind": "squeeze+spectral", "C": 3, "H": 32, "W": 32, "dtype": "fp32"}
    key, f = pm.trace_key(case, {"launches": [{"kernel": kernel}]})
    assert f == force and (f is None or key.endswith("|" + f))
    assert pm.trace_batch(f) == batch


def test_fft_min_instructions_is_the_row_column_split_radix_count():
    """4 n log2 n - 6 n + 8 flops per n-point complex FFT, 4 passes per complex point (2 channels), 2 flops
    per instruction: 14.25 per element at 32 x 32, 18.125 at 64 x 64."""
    assert pm.fft_min_instructions_per_elem(32, 32) == pytest.approx(14.25)
    assert pm.fft_min_instructions_per_elem(64, 64) == pytest.approx(18.125)
    assert pm.fft_min_instructions_per_elem(64, 32) == pytest.approx((14.25 + 18.125) / 2)


def test_noise_source_lines_are_the_philox_and_box_muller_code():
    """The noise floor's lines: philox.h and fastmath.h whole, and exactly the bodies of the noise functions
    in common.cuh (their signatures through their closing braces), nothing of the epilogue."""
    keys = pm.noise_source_lines()
    common = (pm.REPO / "csrc" / "cuda" / "common.cuh").read_text().splitlines()
    mine = [int(k.rsplit(":", 1)[1]) for k in keys if k.startswith("csrc/cuda/common.cuh:")]
    text = "\n".join(common[i - 1] for i in sorted(mine))
    for fn in pm.NOISE_FUNCTIONS:
        assert f" {fn}(" in text
    assert "add_noise_quad" not in text and "stream_index" not in text and "load4" not in text
    assert "kPhiloxRoundA" in text and "__sincosf" in text
    n = len((pm.REPO / "csrc/include/anisodiff/philox.h").read_text().splitlines())
    assert f"csrc/include/anisodiff/philox.h:{n}" in keys


def reach_case(B, C, H, W, dtype, pct_gpu, sass):
    return {"kind": "squeeze+spectral", "B": B, "C": C, "H": H, "W": W, "dtype": dtype,
            "cuda": {"launches": [{"kernel": "k", "grid": 264, "block": 512, "sass_per_output_element": sass}],
                     "path": "fused", "predicted_pct_copy_gpu": pct_gpu, "predicted_pct_copy_cap": 94.0}}


def twin_of(noise, total):
    return {"cuda": {"launches": [{"sass_per_output_element": total, "noise_sass_per_output_element": noise}]}}


def test_spectral_reach_budget_is_what_meets_the_goal_and_classifies_the_cases():
    """The budget is the SASS per element at which one launch on all SMs at full issue efficiency takes
    exactly copy time / 60% with the DRAM time of the ideal bytes beside it (launch_time, inverted); the
    verdicts: met; launch gap (one-launch cap below 60%: no budget at all); no room beside the noise
    generation for the FFT's count; open."""
    B, C, H, W = 1024, 4, 64, 64
    elems = B * C * H * W
    case = reach_case(B, C, H, W, "bf16", 32.0, 137.0)
    r = pm.spectral_reach(case, twin_of(20.0, 49.5))
    copy_t = 3 * elems * 2 / (pm.MACHINE["dram_peak_Bps"] * pm.MACHINE["copy_efficiency"])
    occ = {"blocks_per_sm": 2, "warps_per_block": 16}
    t = pm.launch_time(grid=2 * pm.SM90["sms"], threads=512, occ=occ, bytes_dram=3 * elems * 2, bytes_read=elems * 2,
                       warp_instr=r["budget_sass_per_elem"] * elems / 32, mufu=0.0, fp64=0.0, wavefronts=0.0,
                       inflight_per_warp=1e6)
    assert t["bound"] == "issue" and copy_t / t["seconds"] == pytest.approx(0.60, abs=0.002)
    assert r["reach"] == "open" and r["fft_min_sass_per_elem"] == pytest.approx(18.12, abs=0.01)
    assert r["one_launch_cap_pct"] == pytest.approx(100 * copy_t / (copy_t + 1.5e-6), abs=0.05)
    assert "beside the noise generation" in r["why"] and "squeeze-only kernel's 49.5" in r["why"]
    # a noise floor that leaves less than the FFT's count: no room
    heavy = twin_of(r["budget_sass_per_elem"] - 10, 100.0)
    assert pm.spectral_reach(case, heavy)["reach"] == "no room on CUDA cores"
    # no twin: the FFT's count alone is checked against the budget (not skipped)
    tiny = reach_case(64, 3, 32, 32, "fp32", 10.0, 600.0)
    small = dict(tiny, B=700)
    rs = pm.spectral_reach(small, None)
    assert rs["noise_sass_per_elem"] is None and rs["reach"] in ("open", "no room on CUDA cores")
    # the one-launch cap decides, whatever the plan's cap says: B=64 3x32x32 fp32 has no budget
    rt = pm.spectral_reach(tiny, twin_of(20.0, 49.0))
    assert rt["reach"] == "launch gap" and rt["budget_sass_per_elem"] is None and rt["one_launch_cap_pct"] < 30
    met = reach_case(B, C, H, W, "bf16", 61.0, 137.0)
    assert pm.spectral_reach(met, twin_of(20.0, 49.5))["reach"] == "met"
    # a capped case that would also have no room is "launch gap" (checked first)
    assert pm.spectral_reach(tiny, twin_of(1e9, 1e9))["reach"] == "launch gap"


def test_goal_verdicts_attach_the_reach_and_name_the_open_cases():
    """goal_verdicts puts spectral_reach on every spectral goal case (its squeeze-only twin by B, shape and
    dtype) and names the no-room and the open ones in the goal's note; the markdown gets the reach table
    with '-' for a missing figure."""
    B, C, H, W = 1024, 4, 64, 64
    sq = {"kind": "squeeze", "B": B, "C": C, "H": H, "W": W, "dtype": "bf16", "ideal_bytes_per_tensor": 0,
          "cuda": {"launches": [{"kernel": "k", "grid": 1, "block": 32, "sass_per_output_element": 49.5,
                                 "noise_sass_per_output_element": 21.0}],
                   "path": "elementwise", "predicted_pct_copy_gpu": 90.0}}
    sp = reach_case(B, C, H, W, "bf16", 32.0, 137.0)
    capped = reach_case(64, 3, 32, 32, "bf16", 5.0, 625.0)
    goals = pm.goal_verdicts([sp, capped, sq])
    gpu = next(g for g in goals if "spectral" in g["goal"] and "GPU time" in g["goal"])
    assert "open" in gpu["note"] and "B=1024 4x64x64 bf16" in gpu["note"]
    assert sp["cuda"]["spectral_reach"]["noise_sass_per_elem"] == 21.0
    assert capped["cuda"]["spectral_reach"]["noise_sass_per_elem"] is None  # no twin in the grid
    report = {"source": {"commit": "abc"}, "hardware": {"machine": {"name": "H200"}}, "cases": [sp, capped, sq],
              "goals": goals}
    md = pm.markdown(report)
    row = next(l for l in md.splitlines() if l.startswith("| 64 | 3x32x32 | bf16 |"))
    assert "launch gap" in row and "| - |" in row and "None" not in md.split("reach of the spectral goal")[1]
