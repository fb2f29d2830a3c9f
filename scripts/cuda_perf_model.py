#!/usr/bin/env python3
"""A static performance model of anisodiff's CUDA (and Triton) kernels on sm_90, runnable without a GPU.

Every figure this script writes is PREDICTED by a model: nothing here is a measurement.

    python scripts/cuda_perf_model.py [--out benchmarks/results/model-sm90.json] [--markdown]
                                      [--no-trace] [--no-triton] [--batches 16 64 ...]

What it reads (see docs/cuda.md, "Performance model", for the formula and its assumptions):
  1. ptxas -v of every kernel instantiation of csrc/cuda/*.cu compiled for sm_90 (nvcc -cubin): registers,
     spill stores / loads, stack, static shared memory, barriers. Instantiations are discovered from the
     ptxas lines (demangled with c++filt), never hard-coded.
  2. cuobjdump -sass of the same cubins: static SASS instructions per kernel, by class, and its loops
     (backward branches); the main loop's instructions give the elementwise kernels' dynamic count.
  3. The planner, through the host emulator (tests/cuda_emulation, traced build): for each case the
     launches it really makes (kernel, grid, block, cluster, dynamic shared memory; EMU_PLAN_ONLY=1 logs
     them without running, EMU_SM_COUNT=132 so grids are sized for an H100/H200), and, from one traced
     run per plane shape (B = 1), the shared-memory accesses of every warp instruction, scored for bank
     conflicts (n-way) and counted (dynamic shared-memory wavefronts per sample).
  4. Triton (anisodiff/triton): the kernels compiled for sm_90 without a GPU (triton.compile with a
     GPUTarget): registers, spills, shared memory, SASS; launch grid from anisodiff.triton.ops.
It combines them into theoretical occupancy, SM fill and a predicted share of copy bandwidth per case.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = "anisodiff-perf-model"
VERSION = 1
LABEL = "PREDICTED (static model, no GPU measurement)"

# --- sm_90 (H100 / H200 SXM) limits and the model's machine constants ---------------------------------
SM90 = {
    "sms": 132,
    "regs_per_sm": 65536,
    "reg_quadrants": 4,          # the register file is split over the 4 schedulers (16384 each)
    "reg_alloc_unit": 256,       # registers per warp are allocated in units of 256
    "max_regs_per_thread": 255,
    "max_warps_per_sm": 64,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "smem_per_sm": 233472,       # 228 KiB
    "smem_per_block_optin": 232448,  # 227 KiB
    "smem_reserved_per_block": 1024,
    "smem_alloc_unit": 128,
    "schedulers": 4,             # warp instructions issued per clock per SM (1 per scheduler)
    "mufu_per_clk": 0.5,         # MUFU (sin, cos, lg2, ex2, rsqrt): 16 lanes / clk / SM = 0.5 warp instr
    "fp64_per_clk": 2.0,         # DFMA / DADD / DMUL: 64 lanes / clk / SM
    "smem_wavefronts_per_clk": 1.0,  # 32 banks x 4 B per clock
    "clock_ghz": 1.98,
}
MACHINE = {
    "name": "H200 SXM (sm_90, 132 SMs)",
    "dram_peak_Bps": 4.8e12,
    "copy_efficiency": 0.90,     # device-to-device copy reaches ~90 % of peak (the bench's copy baseline)
    "dram_latency_ns": 700.0,    # loaded DRAM latency: Little's law for the bytes each SM has in flight
    "sm_bw_cap_factor": 2.5,     # one SM can pull at most 2.5x its fair share of the copy bandwidth
    "launch_gap_us": 1.5,        # GPU time per launch beyond its work (ramp-up, drain, launch-to-launch)
    "host_call_us": 7.0,         # host time per eager op call (Python wrapper, dispatcher, launch)
    "warps_to_hide_latency": 4,  # per scheduler: fewer resident warps issue proportionally less often
}
CASE_BATCHES = [16, 64, 256, 1024]
CASE_SHAPES = [(3, 32, 32), (4, 64, 64), (16, 64, 64), (4, 128, 128)]
CASE_DTYPES = ["fp32", "bf16"]
CASE_KINDS = ["squeeze", "squeeze+spectral"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# the goals (issue 13): share of copy bandwidth, spills, conflicts, residency, fill
GOALS = {"squeeze_pct_copy": 85.0, "spectral_pct_copy": 60.0, "spectral_min_batch": 64,
         "spectral_shapes": [(3, 32, 32), (4, 64, 64)], "max_bank_way": 2.0, "min_resident_blocks": 2,
         "b16_fill": 0.5}


# ------------------------------------------------------------------------------------------------------
# occupancy
# ------------------------------------------------------------------------------------------------------
def occupancy(threads: int, regs: int, smem_dynamic: int = 0, smem_static: int = 0, hw: dict = SM90) -> dict:
    """Theoretical resident blocks per SM on sm_90 and what limits them (CUDA occupancy calculator rules:
    registers per warp rounded up to 256 per quadrant, shared memory per block plus 1 KiB reserved rounded
    up to 128 B, threads, warps, 32 blocks)."""
    warps = math.ceil(threads / 32)
    regs = max(int(regs), 1)
    per_warp_regs = math.ceil(regs * 32 / hw["reg_alloc_unit"]) * hw["reg_alloc_unit"]
    warps_by_regs = hw["reg_quadrants"] * ((hw["regs_per_sm"] // hw["reg_quadrants"]) // per_warp_regs)
    limits = {
        "registers": warps_by_regs // warps if regs <= hw["max_regs_per_thread"] else 0,
        "threads": hw["max_threads_per_sm"] // (warps * 32),
        "warps": hw["max_warps_per_sm"] // warps,
        "blocks": hw["max_blocks_per_sm"],
    }
    smem = smem_dynamic + smem_static
    if smem > 0:
        if smem > hw["smem_per_block_optin"]:
            limits["shared_memory"] = 0
        else:
            per_block = math.ceil((smem + hw["smem_reserved_per_block"]) / hw["smem_alloc_unit"]) * hw["smem_alloc_unit"]
            limits["shared_memory"] = hw["smem_per_sm"] // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks_per_sm": blocks, "limiter": limiter, "limits": limits, "warps_per_block": warps,
            "resident_warps": blocks * warps, "occupancy": blocks * warps / hw["max_warps_per_sm"]}


# ------------------------------------------------------------------------------------------------------
# ptxas -v and cuobjdump -sass
# ------------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict:
    """{mangled name: {registers, spill_stores, spill_loads, stack, smem_static, barriers, cmem}} from
    `ptxas -v` output (nvcc -Xptxas -v)."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = m.group(1)
            out[cur] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem_static": 0,
                        "barriers": 0, "cmem": 0, "arch": int(m.group(2))}
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            rec = out[cur]
            rec["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            c = re.search(r"(\d+) bytes cmem\[0\]", line)
            rec["barriers"] = int(b.group(1)) if b else 0
            rec["smem_static"] = int(s.group(1)) if s else 0
            rec["cmem"] = int(c.group(1)) if c else 0
    return out


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")
SASS_CLASSES = {
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "FRND", "FSET", "FSWZADD", "HFMA2",
             "HADD2", "HMUL2", "F2FP"),
    "fp64": ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"),
    "mufu": ("MUFU",),
    "int": ("IMAD", "IADD3", "IADD", "LOP3", "SHF", "LEA", "ISETP", "IMNMX", "IABS", "POPC", "FLO", "BREV",
            "PRMT", "SEL", "SGXT", "BMSK", "LEA_HI", "IMUL", "VIADD", "VIMNMX", "IDP", "I2F", "F2I", "F2F", "I2I",
            "FRND", "P2R", "R2P", "PLOP3", "UIADD3", "UIMAD", "ULOP3", "USHF", "ULEA", "UISETP", "USEL", "UPRMT",
            "UMOV", "MOV", "S2R", "S2UR", "CS2R", "R2UR", "SHFL", "VOTE", "VOTEU", "UFLO", "UPOPC", "UBMSK"),
    "gmem": ("LDG", "STG", "LD", "ST", "RED", "ATOM", "ATOMG", "LDGSTS", "UBLKCP", "UTMALDG", "UTMASTG"),
    "smem": ("LDS", "STS", "LDSM", "ATOMS", "STSM"),
    "local": ("LDL", "STL"),
    "const": ("LDC", "ULDC"),
    "tensor": ("HMMA", "IMMA", "DMMA", "HGMMA", "WGMMA", "UGMMA"),
    "sync": ("BAR", "BSSY", "BSYNC", "WARPSYNC", "MEMBAR", "DEPBAR", "SYNCS", "ERRBAR", "CCTL", "FENCE",
             "UCGABAR_ARV", "UCGABAR_WAIT", "CGAERRBAR"),
    "branch": ("BRA", "BRX", "JMP", "CALL", "RET", "EXIT", "BPT", "YIELD", "NANOSLEEP", "ACQBULK", "ELECT"),
    "nop": ("NOP",),
}
_CLASS_OF = {op: cls for cls, ops in SASS_CLASSES.items() for op in ops}


def sass_class(opcode: str) -> str:
    if opcode in _CLASS_OF:
        return _CLASS_OF[opcode]
    for prefix, cls in (("LDG", "gmem"), ("STG", "gmem"), ("LDS", "smem"), ("STS", "smem"), ("U", "int"),
                        ("HMMA", "tensor"), ("F", "fp32"), ("I", "int"), ("D", "fp64")):
        if opcode.startswith(prefix):
            return cls
    return "other"


def parse_sass(text: str) -> dict:
    """{mangled name: {total, classes, loops, main_loop}} from `cuobjdump -sass`. NOPs are not counted
    (padding). A loop is a backward branch: instructions [target, branch]; main_loop is the longest."""
    funcs, preds, cur = {}, {}, None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        if cur is None:
            continue
        m = _SASS_INSTR.search(line)
        if m:
            funcs[cur].append((int(m.group(1), 16), m.group(3), m.group(4), m.group(5)))
            if m.group(2):
                preds.setdefault(cur, {})[int(m.group(1), 16)] = m.group(2).strip()
    out = {}
    for name, instrs in funcs.items():
        instrs = [i for i in instrs if i[1] != "NOP"]
        addrs = [a for a, *_ in instrs]
        classes: dict[str, int] = {}
        for _, op, _, _ in instrs:
            c = sass_class(op)
            classes[c] = classes.get(c, 0) + 1
        diverged = diverged_paths(instrs)
        loops = []
        for k, (a, op, mods, args) in enumerate(instrs):
            if op != "BRA" or any(s <= a <= e for s, e in diverged):
                continue
            t = re.search(r"0x([0-9a-f]+)", args)
            if t and int(t.group(1), 16) < a:  # (a branch to itself is the end-of-code trap)
                lo = int(t.group(1), 16)
                body = [i for i in instrs if lo <= i[0] <= a]
                cls: dict[str, int] = {}
                for _, bop, bmods, _ in body:
                    c = sass_class(bop)
                    cls[c] = cls.get(c, 0) + 1
                loops.append({"start": lo, "end": a, "instructions": len(body), "classes": cls,
                              "gmem_load_bytes": sum(_ldg_bytes(bop, bmods) for _, bop, bmods, _ in body)})
        main = max(loops, key=lambda l: l["instructions"]) if loops else None
        out[name] = {"total": len(instrs), "classes": classes, "loops": len(loops), "main_loop": main,
                     "loop_list": [(l["start"], l["end"], l["instructions"]) for l in loops],
                     **subroutines(instrs, preds.get(name, {}), diverged),
                     "instructions": [(a, op) for a, op, _, _ in instrs],
                     "gmem_load_bytes": sum(_ldg_bytes(op, mods) for _, op, mods, _ in instrs),
                     "first_address": addrs[0] if addrs else 0}
    return out


def diverged_paths(instrs: list) -> list:
    """[(start, end)] of the code that only a diverged warp runs: ``BRA.DIV`` jumps, when the warp's
    threads are not all converged, to an out-of-line copy of a warp-collective operation (shuffles,
    cluster barriers under ``WARPSYNC.COLLECTIVE``) that ends in a branch back. The kernels call those
    operations from warp-uniform code only, so the copies never run; they are neither counted nor
    loops (their branch back would otherwise look like one spanning the kernel)."""
    out = []
    for a, op, mods, args in instrs:
        if op != "BRA" or ".DIV" not in mods:
            continue
        t = re.findall(r"0x([0-9a-f]+)", args)
        if not t or int(t[-1], 16) <= a:
            continue
        start = int(t[-1], 16)
        for b, bop, _bm, bargs in instrs:  # the first branch back after the copy's start
            if b < start or bop != "BRA":
                continue
            tb = re.search(r"0x([0-9a-f]+)", bargs)
            if tb and int(tb.group(1), 16) < start:
                out.append((start, b))
                break
    return out


def subroutines(instrs: list, predicated: dict, diverged: list = ()) -> dict:
    """The called code of a kernel (``CALL.REL`` target .. its first ``RET``), placed after the kernel's
    ``EXIT`` and attributed by the line info to the kernel's last line. ``slow_paths``: [(start, end)] of
    code that runs only off the fast path - a subroutine every call of which sits in a block that a
    predicated forward branch jumps over (libdevice's division and square root: FCHK or a range test
    sends only denormal, infinite or out-of-range operands there), with those call blocks; ``called``:
    [(start, end, [call addresses])] of the other subroutines, which run once per executed call.
    ``diverged`` (diverged_paths) are slow paths too."""
    calls: dict[int, list] = {}
    for k, (a, op, _mods, args) in enumerate(instrs):
        if op != "CALL" or ".REL" not in _mods:  # (CALL.ABS: vprintf / __assertfail, outside the kernel)
            continue
        t = re.search(r"0x([0-9a-f]+)", args)
        if not t or int(t.group(1), 16) <= a:  # called code sits after the kernel's EXIT
            continue
        # the nearest branch before the call in its block: predicated, forward and past the call
        guard = None
        for j in range(k - 1, max(k - 9, -1), -1):
            b, bop, _bm, bargs = instrs[j]
            if bop in ("BRA", "CALL", "RET", "EXIT", "BSYNC", "BAR"):
                tb = re.search(r"0x([0-9a-f]+)", bargs)
                if bop == "BRA" and tb and int(tb.group(1), 16) > a and predicated.get(b):
                    guard = instrs[j + 1][0]  # the call block's first instruction
                break
        calls.setdefault(int(t.group(1), 16), []).append((a, guard))
    rets = sorted(a for a, op, *_ in instrs if op == "RET")
    slow, called = [], []
    for start, sites in sorted(calls.items()):
        end = next((r for r in rets if r >= start), None)
        if end is None:
            continue
        if all(g is not None for _, g in sites):
            slow.append((start, end))
            slow.extend((g, a) for a, g in sites)
        else:
            called.append((start, end, [a for a, _ in sites]))
    slow.extend(d for d in diverged if d not in slow)
    n_slow = sum(1 for a, *_ in instrs if any(s <= a <= e for s, e in slow))
    return {"slow_paths": slow, "called": called, "slow_instructions": n_slow}


def _ldg_bytes(op: str, mods: str) -> int:
    """Bytes per thread of a global load instruction (LDG.E.128 = 16, .64 = 8, .U16 = 2, .U8 = 1, else 4)."""
    if op not in ("LDG", "LD"):
        return 0
    for tag, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if tag in mods:
            return n
    return 4


_ND_FUNC = re.compile(r"^\.text\.(\S+):\s*$")
_ND_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_ND_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def _rel_source(path: str) -> str:
    """A source path as ``csrc/...`` (the same from nvcc's line info and gcov's #line files)."""
    i = path.rfind("csrc/")
    return path[i:] if i >= 0 else os.path.basename(path)


def parse_line_info(text: str) -> dict:
    """{mangled: {address: "csrc/file:line"}} from `nvdisasm -g -c` (the innermost source line of every
    instruction; the cubin needs -lineinfo)."""
    out, cur, where = {}, None, None
    for line in text.splitlines():
        m = _ND_FUNC.match(line.strip())
        if m:
            cur, where = m.group(1), None
            out[cur] = {}
            continue
        m = _ND_LINE.search(line)
        if m:
            where = f"{_rel_source(m.group(1))}:{m.group(2)}"
            continue
        m = _ND_INSTR.search(line)
        if m and cur is not None and where is not None and m.group(2) != "NOP":
            out[cur][int(m.group(1), 16)] = where
    return out


_ND_CHAIN = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


def parse_inline_chains(text: str) -> dict:
    """{mangled: {address: ["csrc/file:line", ...]}} from `nvdisasm -gi -c`: every instruction's source line
    and the lines it is inlined at, innermost first (the cubin needs -lineinfo). A header function inlined
    at several call sites (or a dead one) is told apart by its call sites' lines."""
    out, cur, chain, collecting = {}, None, [], False
    for line in text.splitlines():
        m = _ND_FUNC.match(line.strip())
        if m:
            cur, chain, collecting = m.group(1), [], False
            out[cur] = {}
            continue
        m = _ND_CHAIN.search(line)
        if m:
            if not collecting:
                chain, collecting = [], True
            for f, ln in ((m.group(1), m.group(2)), (m.group(3), m.group(4))):
                if f is not None:
                    where = f"{_rel_source(f)}:{ln}"
                    if where not in chain:
                        chain.append(where)
            continue
        m = _ND_INSTR.search(line)
        if m and cur is not None and chain and m.group(2) != "NOP":
            collecting = False
            out[cur][int(m.group(1), 16)] = list(chain)
    return out


def executed_instructions(sass_instrs: list, line_of: dict, executed, lo: int | None = None,
                          hi: int | None = None, per: float | None = None, by_line: dict | None = None,
                          chain_of: dict | None = None, inner_loops: list | None = None,
                          threads: int | None = None, calls: dict | None = None,
                          warp_share: dict | None = None) -> dict:
    """Counts by class of the SASS instructions in [lo, hi] weighted by how often their source line ran
    in the emulator. ``executed``: {"csrc/file:line": executions} (or a set: executed or not; None: all
    count 1). ``per``: the executions of the loop (its closing branch's line): an instruction counts
    min(1, executions of its line / per) - 0 for a branch the case never takes, 1 for straight-line code
    and for every copy of an unrolled loop. With ``chain_of`` ({address: [line, call site, ...]}, from
    parse_inline_chains) the weight is the smallest over the instruction's line and every call site it is
    inlined at, so a shared header line (Philox, Box-Muller) inlined at a call site that never runs counts
    0 there; a line that has no host code at all (absent from ``executed``: the GPU-only side of an
    ``#if`` in the sources, e.g. inline PTX) leaves the weight to its call sites. ``inner_loops``: [(start, end, iterations per execution of the enclosing loop)] of the loops
    nested in [lo, hi] that the compiler kept rolled: an instruction inside one counts that many times
    (the innermost loop around it), times the weight above. ``threads`` (the traced run's, with no
    ``per``): a line that ran on fewer than 1 in 32 threads counts 32 x its share of them - an upper bound
    of the share of warps that issue it (thread 0's reduction: one warp per block). Lines outside csrc/
    (CUDA's headers) count 1. ``calls`` (parse_sass's ``slow_paths`` / ``called``): slow-path code counts
    0; a called subroutine (attributed to the kernel's last line) counts the sum of its calls' weights
    (those inside [lo, hi] where given). ``warp_share`` ({line: share of the kernel's warps that ran it},
    warp_shares) replaces the ``threads`` bound where it knows the line: thread 0's loop counts 1 warp of
    the block's, not every thread's iterations."""
    cls: dict[str, float] = {"total": 0}

    def weight(where):
        if executed is None or where is None or not where.startswith("csrc/"):
            return 1.0
        if isinstance(executed, dict) and chain_of is not None and where not in executed:
            return 1.0  # no host code on this line (GPU-only inline PTX): its call sites decide
        n = executed.get(where, 0) if isinstance(executed, dict) else (1 if where in executed else 0)
        if per:
            return min(1.0, n / per)
        if warp_share and n > 0 and where in warp_share:
            return warp_share[where]
        if threads and isinstance(executed, dict):
            return min(1.0, 32.0 * n / threads)
        return 1.0 if n > 0 else 0.0

    def weight_at(a):
        chain = (chain_of or {}).get(a) or [line_of.get(a)]
        w = min(weight(x) for x in chain)
        around = [l for l in (inner_loops or []) if l[0] <= a <= l[1]]
        if around and w > 0:
            w *= min(around, key=lambda l: l[1] - l[0])[2]
        return w

    slow = (calls or {}).get("slow_paths", [])
    called = (calls or {}).get("called", [])
    inside = (lambda a: lo is None or lo <= a <= hi)
    for a, op in sass_instrs:
        if any(s <= a <= e for s, e in slow):
            continue
        sub = next((c for c in called if c[0] <= a <= c[1]), None)
        if sub is not None:
            w = sum(weight_at(c) for c in sub[2] if inside(c))
        elif not inside(a):
            continue
        else:
            w = weight_at(a)
        where = line_of.get(a)
        if w <= 0:
            continue
        c = sass_class(op)
        cls[c] = cls.get(c, 0) + w
        cls["total"] += w
        if by_line is not None:
            by_line[where or "?"] = by_line.get(where or "?", 0) + w
    return cls


def demangle(names) -> dict:
    names = list(names)
    if not names:
        return {}
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::kern<4, 0, true>(args)`` -> ``kern<4, 0, true>``: the unqualified
    name with its template arguments (the same from nvcc's and the host compiler's symbols)."""
    s = demangled.strip()
    # drop the parameter list: the last top-level (...) group
    depth, cut = 0, len(s)
    for i in range(len(s) - 1, -1, -1):
        ch = s[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            depth -= 1
            if depth == 0:
                cut = i
                break
    s = s[:cut]
    # split at top-level "::" and spaces (return type)
    parts, depth, cur = [], 0, ""
    i = 0
    while i < len(s):
        ch = s[i]
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if depth == 0 and s.startswith("::", i):
            parts.append(cur)
            cur = ""
            i += 2
            continue
        if depth == 0 and ch == " " and not cur.endswith(","):
            cur = ""
            i += 1
            continue
        cur += ch
        i += 1
    parts.append(cur)
    return re.sub(r"\s+", " ", parts[-1]).strip()


# ------------------------------------------------------------------------------------------------------
# CUDA: compile every .cu for sm_90
# ------------------------------------------------------------------------------------------------------
def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/local/cuda/bin", "/usr/local/cuda-13.0/bin"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    try:
        from triton import knobs  # triton bundles cuobjdump / nvdisasm / ptxas
        tool = getattr(knobs.nvidia, name, None)
        if tool is not None and tool.path:
            return tool.path
    except Exception:  # noqa: BLE001 - optional
        pass
    return None


def compile_cuda(root: Path, cache: Path, log=print) -> tuple[dict, dict]:
    """Per kernel (short name): ptxas resources + SASS summary; and the sources' fingerprint."""
    nvcc, cuobjdump, nvdisasm = _tool("nvcc"), _tool("cuobjdump"), _tool("nvdisasm")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc and cuobjdump (nvcc: {nvcc}, cuobjdump: {cuobjdump})")
    srcs = sorted((root / "csrc" / "cuda").glob("*.cu"))
    deps = srcs + sorted((root / "csrc" / "cuda").glob("*.cuh")) + sorted((root / "csrc" / "cuda").glob("*.h")) \
        + sorted((root / "csrc" / "include").rglob("*.h"))
    flags = ["-arch=sm_90", "-cubin", "-O3", "-std=c++17", "-lineinfo", f"-I{root / 'csrc' / 'include'}",
             f"-I{root / 'csrc'}", "-Xptxas", "-v"]
    fingerprint = hashlib.sha256("\n".join([f"v{VERSION}.5", *flags[:5], *(p.read_text() for p in deps)]).encode()
                                 ).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"cuda-{fingerprint}.json"
    if cached.exists():
        return json.loads(cached.read_text()), {"fingerprint": fingerprint, "cached": True}
    procs = []
    for src in srcs:
        cubin = cache / f"{src.stem}-{fingerprint}.cubin"
        procs.append((src, cubin, subprocess.Popen([nvcc, *flags, str(src), "-o", str(cubin)],
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    kernels = {}
    for src, cubin, p in procs:
        text = p.communicate()[0]
        if p.returncode != 0:
            raise RuntimeError(f"nvcc {src.name} failed:\n{text[-3000:]}")
        res = parse_ptxas(text)
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)
        chains = {}
        if nvdisasm:
            chains = parse_inline_chains(subprocess.run([nvdisasm, "-gi", "-c", str(cubin)], capture_output=True,
                                                        text=True).stdout)
        lines = {f: {a: c[0] for a, c in per.items()} for f, per in chains.items()}
        dem = demangle(res)
        for mangled, r in res.items():
            name = short_name(dem[mangled])
            kernels[name] = {"source": f"csrc/cuda/{src.name}", "mangled": mangled, "demangled": dem[mangled],
                             **r, "sass": sass.get(mangled),
                             "line_of": {str(a): w for a, w in lines.get(mangled, {}).items()},
                             "chain_of": {str(a): c for a, c in chains.get(mangled, {}).items()}}
        log(f"  {src.name}: {len(res)} kernel(s)")
    cached.write_text(json.dumps(kernels, indent=1))
    return kernels, {"fingerprint": fingerprint, "cached": False}


# ------------------------------------------------------------------------------------------------------
# the planner and the bank trace, through the traced host emulator (a child process)
# ------------------------------------------------------------------------------------------------------
def _case_spec(kind: str, C: int):
    import torch

    import anisodiff as ad
    g = torch.Generator().manual_seed(C)
    V = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))[0][:, :1].contiguous()
    squeeze = ad.Squeeze(V, -0.4)
    return ad.NoiseSpec(squeeze, ad.PowerLaw(0.3) if kind == "squeeze+spectral" else None)


def _lib_symbols(lib: Path) -> tuple[int, dict, list]:
    """(load base of lib in this process, {offset: demangled function}, sorted offsets)."""
    base = None
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and os.path.realpath(parts[5]) == os.path.realpath(lib) and int(parts[2], 16) == 0:
            base = int(parts[0].split("-")[0], 16)
            break
    nm = subprocess.run(["nm", "-C", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    syms = {}
    for line in nm.splitlines():
        m = re.match(r"([0-9a-f]+) [tTwW] (.+)$", line)
        if m:
            syms[int(m.group(1), 16)] = m.group(2)
    return base, syms, sorted(syms)


def _addr2line(lib: Path, offsets: list[int]) -> dict:
    tool = shutil.which("addr2line")
    if tool is None or not offsets:
        return {}
    out = subprocess.run([tool, "-e", str(lib), *[hex(o - 1) for o in offsets]], capture_output=True,
                         text=True).stdout.splitlines()
    res = {}
    for o, line in zip(offsets, out):
        line = line.split(" (discriminator")[0]
        m = re.search(r"(csrc/.*)$", line)
        res[o] = m.group(1) if m else line
    return res


def _line_table(lib: Path) -> list:
    """[(offset, "csrc/file:line")] of the library's DWARF line table, sorted (objdump --dwarf=decodedline
    names files by their base name: mapped back to the csrc/ file of that name)."""
    tool = shutil.which("objdump")
    if tool is None:
        return []
    names = {}
    for f in (REPO / "csrc").rglob("*"):
        if f.suffix in (".cu", ".cuh", ".h"):
            names.setdefault(f.name, str(f.relative_to(REPO)))
    out = subprocess.run([tool, "--dwarf=decodedline", "--wide", str(lib)], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"(\S+)\s+(\d+)\s+0x([0-9a-f]+)", line)
        if m and m.group(1) in names:
            rows.append((int(m.group(3), 16), f"{names[m.group(1)]}:{m.group(2)}"))
    return sorted(rows)


def _coverage_calls(lib: Path) -> list:
    """Sorted offsets of every __sanitizer_cov_trace_pc call in the library: where each basic block of the
    traced build begins (objdump -d)."""
    tool = shutil.which("objdump")
    if tool is None:
        return []
    out = subprocess.run([tool, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True).stdout
    return sorted(int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+call\s+\S+ <__sanitizer_cov_trace_pc",
                                                          out, re.M))


def warp_shares(rows: list, table: list, calls: list, warps_of: dict) -> dict:
    """{kernel address: {"csrc/file:line": share of the kernel's warps that ran it}} from the traced
    build's basic-block coverage (rows: (kernel, site offset = its coverage call's return address, block
    << 16 | warp)). A basic block spans from its coverage call (``calls``, 5 bytes each) to the next one;
    a line-table row from its address to the next row's; a line's warps are the union over the executed
    blocks its rows overlap. warps_of: {kernel address: warps launched}."""
    import bisect
    by_site: dict[int, dict[int, set]] = {}
    for k, site, w in rows:
        by_site.setdefault(site, {}).setdefault(k, set()).add(w)
    lines: dict[int, dict[str, set]] = {}
    for n, (addr, where) in enumerate(table):
        end = table[n + 1][0] if n + 1 < len(table) else addr + 1  # a row's code runs to the next row
        first = bisect.bisect_right(calls, addr) - 1
        last = max(first, bisect.bisect_left(calls, end) - 1)
        for i in range(max(first, 0), last + 1):
            for k, ws in by_site.get(calls[i] + 5, {}).items():
                lines.setdefault(k, {}).setdefault(where, set()).update(ws)
    return {k: {where: min(1.0, len(ws) / warps_of[k]) for where, ws in per.items()}
            for k, per in lines.items() if warps_of.get(k)}


def _executed_lines(build_dir: Path, since: float) -> dict:
    """{"csrc/file:line": executions} since ``since`` (gcov of the .gcda files the traced build just
    dumped; every thread's executions summed)."""
    gcov = shutil.which("gcov")
    files = [p for p in build_dir.glob("*.gcda") if p.stat().st_mtime >= since - 1]
    if gcov is None or not files:
        return {}
    out = subprocess.run([gcov, "--json-format", "--stdout", *map(str, files)], capture_output=True, text=True,
                         cwd=build_dir).stdout
    lines: dict[str, int] = {}
    for chunk in out.splitlines():
        chunk = chunk.strip()
        if not chunk.startswith("{"):
            continue
        for f in json.loads(chunk).get("files", []):
            rel = _rel_source(f["file"])
            for ln in f.get("lines", []):
                key = f"{rel}:{ln['line_number']}"
                lines[key] = lines.get(key, 0) + int(ln.get("count", 0))
    return lines


def emulator_worker(cases: list[dict], trace: bool, out_path: str) -> None:
    """Child process: plan-only launches of every case, and one traced run per distinct plane problem."""
    os.environ["EMU_SM_COUNT"] = str(SM90["sms"])
    sys.path.insert(0, str(REPO / "tests"))
    import torch

    import anisodiff as ad
    from cuda_emulation import emulator
    lib = emulator.build_traced()
    emu = torch.ops.anisodiff_emu
    base, syms, offsets = _lib_symbols(lib)
    sched = ad.VPSchedule.linear(T=1000)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names: dict[int, str] = {}

    def kernel_name(addr: int) -> str:
        if addr not in names:
            off = addr - base
            names[addr] = short_name(syms[off]) if off in syms else hex(addr)
        return names[addr]

    def run(case, B):
        C, H, W = case["C"], case["H"], case["W"]
        a = ad.plan.kernel_args(_case_spec(case["kind"], C), sched, C, H, W, "cpu")
        x0 = torch.empty(B, C, H, W, dtype=dtypes[case["dtype"]])
        if os.environ.get("EMU_PLAN_ONLY") != "1":
            x0.normal_()
        emu.launch_log()
        emu.add_noise(x0, torch.full((B,), 500), a.coef, a.axes, a.weights, list(a.gammas), a.variant,
                      a.normalize, 0, torch.tensor([1, 2]), None)
        log = emu.launch_log().tolist()
        plan = emu.last_plan()
        return ({"path": plan[0], "smem": plan[1], "tile": plan[2], "workspace_bytes": emu.last_workspace_bytes(),
                 "launches": [{"kernel": kernel_name(k), "grid": g, "block": b, "cluster": c, "smem": s}
                              for k, g, b, c, s in log]})

    result = {"plans": [], "traces": {}}
    os.environ["EMU_PLAN_ONLY"] = "1"
    for case in cases:
        result["plans"].append(run(case, case["B"]))
    os.environ.pop("EMU_PLAN_ONLY")
    if trace:
        seen = set()
        table, bb_calls = _line_table(lib), _coverage_calls(lib)
        for case, case_plan in zip(cases, result["plans"]):
            key, force = trace_key(case, case_plan)
            if key in seen:
                continue
            seen.add(key)
            t0 = time.time()
            emu.coverage_reset()
            emu.trace_enable(True)
            if force:  # the kernel the case's batch gets (at B = 1 the planner may pick another)
                os.environ["ANISODIFF_CUDA_PATH"] = force
            nb = trace_batch(force)
            plan = run(case, nb)
            os.environ.pop("ANISODIFF_CUDA_PATH", None)
            emu.trace_enable(False)
            for old in lib.parent.glob("*.gcda"):  # gcov merges a dump into existing files: start empty,
                old.unlink()                       # so the counts are this case's alone
            emu.coverage_dump()
            executed = _executed_lines(lib.parent, t0)
            cov = emu.warp_coverage().tolist()
            ids, vals = emu.trace_report()
            per_kernel: dict[str, dict] = {}
            site_offsets = [int(s) - base for s in ids[:, 1].tolist()]
            lines = _addr2line(lib, site_offsets)
            for (kaddr, site, worst, remote), (acc, wf, ideal), off in zip(ids.tolist(), vals.tolist(), site_offsets):
                k = per_kernel.setdefault(kernel_name(kaddr), {"warp_accesses": 0.0, "wavefronts": 0.0, "ideal": 0.0,
                                                               "max_way": 0, "dsmem_accesses": 0, "sites": []})
                k["warp_accesses"] += acc
                k["wavefronts"] += wf
                k["ideal"] += ideal
                k["max_way"] = max(k["max_way"], worst)
                k["dsmem_accesses"] += remote
                k["sites"].append({"site": lines.get(off, hex(off)), "warp_accesses": acc,
                                   "n_way": wf / ideal if ideal else 0.0, "max_way": worst})
            for k in per_kernel.values():
                k["avg_way"] = k["wavefronts"] / k["ideal"] if k["ideal"] else 0.0
                for f in ("warp_accesses", "wavefronts", "ideal", "dsmem_accesses"):  # per sample
                    k[f] /= nb
                for site in k["sites"]:
                    site["warp_accesses"] /= nb
                # merge the sites by source line, the worst first
                by: dict[str, dict] = {}
                for s in k["sites"]:
                    d = by.setdefault(s["site"], {"site": s["site"], "warp_accesses": 0.0, "wf": 0.0, "max_way": 0})
                    d["warp_accesses"] += s["warp_accesses"]
                    d["wf"] += s["n_way"] * s["warp_accesses"]
                    d["max_way"] = max(d["max_way"], s["max_way"])
                sites = [{"site": d["site"], "warp_accesses": d["warp_accesses"],
                          "avg_way": d["wf"] / d["warp_accesses"] if d["warp_accesses"] else 0, "max_way": d["max_way"]}
                         for d in by.values()]
                k["sites"] = sorted(sites, key=lambda s: -s["avg_way"] * s["warp_accesses"])[:8]
            warps_of: dict[int, int] = {}
            for kaddr in {r[0] for r in cov}:
                warps_of[kaddr] = sum(L["grid"] * -(-L["block"] // 32) for L in plan["launches"]
                                      if L["kernel"] == kernel_name(kaddr))
            shares = warp_shares([(k, s - base, w) for k, s, w in cov], table, bb_calls, warps_of)
            result["traces"][key] = {"plan_B1": plan, "batch": nb, "kernels": per_kernel, "seconds": round(time.time() - t0, 2),
                                     "executed_lines": executed,
                                     "warp_shares": {kernel_name(k): v for k, v in shares.items()}}
    Path(out_path).write_text(json.dumps(result))


def trace_batch(force: str | None) -> int:
    """The batch of a case's trace: 1, or 2 for the whole-line kernel, whose blocks take two slices (at
    B = 1 the second slice's planes are empty, and their skipped noise would count as the batch's)."""
    return 2 if force == "fused_lines32" else 1


def trace_key(case: dict, plan: dict) -> tuple[str, str | None]:
    """The bank trace a case uses: one per (kind, shape, dtype) and fused kernel, with the
    ANISODIFF_CUDA_PATH value that makes the B = 1 trace run the kernel the case's batch is planned on
    (the planner picks the fused kernel from the batch)."""
    first = (plan.get("launches") or [{}])[0].get("kernel", "")
    force = ("fused_pow2" if first.startswith("fused_spectral_pow2") else
             "fused_lines32" if first.startswith("fused_spectral_lines32") else
             "fused_general" if first.startswith("fused_spectral<") else None)
    key = f"{case['kind']}|{case['C']}x{case['H']}x{case['W']}|{case['dtype']}"
    return (f"{key}|{force}" if force else key), force


def run_emulator(cases, trace: bool, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cases.json"
        out = Path(tmp) / "out.json"
        cfg.write_text(json.dumps({"cases": cases, "trace": trace}))
        env = {k: v for k, v in os.environ.items() if k not in ("EMU_PLAN_ONLY", "EMU_ORDER")}
        p = subprocess.run([sys.executable, __file__, "--_emu-worker", str(cfg), str(out)], env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"emulator worker failed:\n{(p.stdout + p.stderr)[-4000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------
# Triton: compile for sm_90 without a GPU
# ------------------------------------------------------------------------------------------------------
_TRITON_WORKER = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from anisodiff.triton import kernels as k, ops

def compile_for_sm90(fn, constexprs, sig_dtype, **options):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("timesteps_ptr", "stream_ptr"):
            sig[name] = "*i64"
        elif name in ("x0_ptr", "xt_ptr", "out_ptr", "noise_ptr"):
            sig[name] = sig_dtype
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name.startswith("gamma") or name == "clip_range" else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

requests = json.loads(sys.argv[1])
out = []
for r in requests:
    fn = getattr(k, r["kernel"])
    try:
        c = compile_for_sm90(fn, r["constexprs"], r["sig_dtype"], **r["options"])
    except Exception as exc:  # report, do not stop
        out.append({"id": r["id"], "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        continue
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    try:
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.remove(f.name)
    md = c.metadata
    use = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    reg, stack, shared, local = (int(g) for g in use.groups()) if use else (0, None, md.shared, None)
    # cuobjdump -res-usage (no driver needed; CompiledKernel.n_regs needs one). LOCAL: local memory per
    # thread (spills); STACK: Triton's fixed 32 B frame plus any spill.
    out.append({"id": r["id"], "name": md.name, "registers": reg, "spills": local, "stack": stack,
                "smem_static": md.shared, "num_warps": md.num_warps, "sass": sass})
print(json.dumps(out))
'''


def triton_requests(cases: list[dict]) -> list[dict]:
    """One compile request per distinct Triton kernel specialisation of the cases (the launch options
    and block sizes anisodiff.triton.ops uses on a GPU)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from anisodiff import _autoselect
    from anisodiff.triton import ops as tops
    reqs, seen = [], {}
    for case in cases:
        C, H, W = case["C"], case["H"], case["W"]
        CP = tops._pow2(C)
        sig = "*fp32" if case["dtype"] == "fp32" else "*bf16"
        base = dict(C=C, K=1, HEISENBERG=False, HAS_X0=True, HAS_NOISE=False, TARGET=0, CP=CP)
        if case["kind"] == "squeeze":
            block = tops._elementwise_block(H * W, CP, interpreted=False)
            req = {"kernel": "squeeze_mix_kernel", "constexprs": {**base, "ALIGNED": (H * W) % 4 == 0,
                                                                  "BLOCK_PIX": block},
                   "options": {"num_warps": tops.ELEMENTWISE_WARPS}, "sig_dtype": sig}
            launch = {"grid": tops.elementwise_grid(B=case["B"], HW=H * W, block=block), "block_pix": block}
        else:
            if not _autoselect.triton_supports("spectral", C, H, W):
                case["triton_note"] = "not supported by the Triton spectral kernel (sample too large)"
                continue
            spec = tops.spectral_config(C, H, W, interpreted=False)
            req = {"kernel": spec["kernel"], "constexprs": {**base, **spec["constexprs"], "ALIGNED": W % 4 == 0},
                   "options": spec["options"], "sig_dtype": sig}
            launch = {"grid": spec["grid"](case["B"])}
            # the alternative design: the DFT as tl.dot matrix products (tf32x3), resources only
            dot = {**req, "constexprs": {**req["constexprs"], "DFT_BLOCK": 0}}
            dkey = json.dumps(dot, sort_keys=True)
            if dkey not in seen:
                seen[dkey] = len(reqs)
                reqs.append({**dot, "id": len(reqs)})
            case["triton_dot_request"] = seen[dkey]
        key = json.dumps(req, sort_keys=True)
        if key not in seen:
            seen[key] = len(reqs)
            reqs.append({**req, "id": len(reqs)})
        case["triton_request"] = seen[key]
        case["triton_launch"] = launch
    return reqs


def compile_triton(reqs: list[dict], log=print) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_CACHE_DIR", str(REPO / "build" / "perf_model" / "triton-cache"))
    p = subprocess.run([sys.executable, "-c", _TRITON_WORKER, json.dumps(reqs)], env=env, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"triton compile worker failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for r in res:
        if "sass" in r:
            parsed = parse_sass(r.pop("sass"))
            r["sass"] = next(iter(parsed.values())) if parsed else None
    return res


# ------------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------------
def launch_time(*, grid: int, threads: int, occ: dict, bytes_dram: float, bytes_read: float, warp_instr: float,
                mufu: float, fp64: float, wavefronts: float, inflight_per_warp: float, hw=SM90, m=MACHINE) -> dict:
    """GPU time of one launch (seconds) and which resource bounds it (docs/cuda.md, "Performance model")."""
    f = hw["clock_ghz"] * 1e9
    S = hw["sms"]
    R = max(occ["blocks_per_sm"], 0)
    if R == 0:
        return {"seconds": math.inf, "bound": "does not fit on an SM"}
    active = min(S, grid)                               # SMs with work
    per_sm_blocks = min(R, math.ceil(grid / S))         # blocks resident on a busy SM
    warps_res = per_sm_blocks * occ["warps_per_block"]
    waves = math.ceil(grid / (S * R))
    # a block-synchronous kernel whose blocks run once (grid <= S R): time = waves x per-wave time, every
    # resource divided among `active` SMs; grid-stride kernels (grid capped) the same with waves = 1.
    issue_eff = min(1.0, warps_res / (hw["schedulers"] * m["warps_to_hide_latency"]))
    t_issue = warp_instr / (active * hw["schedulers"] * issue_eff * f)
    t_mufu = mufu / (active * hw["mufu_per_clk"] * f)
    t_fp64 = fp64 / (active * hw["fp64_per_clk"] * f)
    t_smem = wavefronts / (active * hw["smem_wavefronts_per_clk"] * f)
    copy_bw = m["dram_peak_Bps"] * m["copy_efficiency"]
    dram_bw = min(copy_bw, active * m["sm_bw_cap_factor"] * copy_bw / S)
    t_dram = bytes_dram / dram_bw
    lat = m["dram_latency_ns"] * 1e-9
    inflight = warps_res * inflight_per_warp            # bytes a busy SM has in flight (reads)
    t_lat = bytes_read / (active * inflight / lat) if inflight > 0 else 0.0
    parts = {"dram": t_dram, "latency": t_lat, "issue": t_issue, "mufu": t_mufu, "fp64": t_fp64,
             "shared_memory": t_smem}
    bound = max(parts, key=parts.get)
    # wave quantisation of block-synchronous launches: the last wave may run with few blocks
    quant = 1.0
    if waves > 1 and grid < S * R * waves:
        quant = waves / (grid / (S * R))
    t = parts[bound] * quant + m["launch_gap_us"] * 1e-6
    return {"seconds": t, "bound": bound, "parts_us": {k: round(v * 1e6, 3) for k, v in parts.items()},
            "waves": waves, "active_sms": active, "resident_blocks_per_sm": per_sm_blocks,
            "resident_warps_per_sm": warps_res, "issue_efficiency": round(issue_eff, 3),
            "wave_quantisation": round(quant, 3)}


def _sass_counts(sass: dict | None) -> dict:
    if not sass:
        return {"total": 0, "main_loop": 0}
    ml = sass.get("main_loop")
    return {"total": sass["total"], "main_loop": ml["instructions"] if ml else 0}


def traced_threads(trace: dict | None, kernel: str) -> int:
    """Threads the traced run (B = 1) launched of a kernel: the reference of its gcov line counts."""
    if not trace:
        return 0
    return sum(l["grid"] * l["block"] for l in trace.get("plan_B1", {}).get("launches", []) if l["kernel"] == kernel)


def _pinned(where: str | None, cache: dict) -> bool:
    """Whether the source line before `where` (a loop's `for`) is `#pragma unroll 1`."""
    path, _, num = (where or "").rpartition(":")
    if not path.startswith("csrc/") or not num.isdigit():
        return False
    if path not in cache:
        f = REPO / path
        cache[path] = f.read_text().splitlines() if f.exists() else []
    text, n = cache[path], int(num)
    return 2 <= n <= len(text) and text[n - 2].strip().startswith("#pragma unroll 1")


def loop_runs(sass: dict, line_of: dict, executed: dict, threads: int) -> list:
    """[(start, end, closing line, runs, iterations)] of a kernel's loops, outer first, from the traced run
    (B = 1): gcov counts a `for` line once per entry plus once per iteration, so runs = executions of the
    loop's closing branch's line / threads, and its source iterations per thread = runs - its entries per
    thread (the enclosing loop's iterations that ran, else 1), at least 1. runs 0: the loop did not run
    (or its line has no count)."""
    out = []
    for lo, hi, _n in sorted(sass.get("loop_list", []), key=lambda l: l[1] - l[0], reverse=True):
        where = line_of.get(hi)
        runs = executed.get(where, 0) / threads if where is not None else 0.0
        parent = [o for o in out if o[0] <= lo and hi <= o[1] and o[3] > 0]
        entries = min(parent, key=lambda o: o[1] - o[0])[4] if parent else 1.0
        out.append((lo, hi, where, runs, max(1.0, runs - entries)))
    return out


def rolled_loop_iterations(sass: dict, line_of: dict, executed: dict | None, trace: dict | None,
                           kernel: str) -> list:
    """[(start, end, iterations per thread)] of the loops a kernel's source keeps rolled (`#pragma unroll
    1` on the line before the loop's `for`: one copy of the body in the SASS, so a source iteration is a
    SASS iteration; loop_runs gives the iterations; at least 1 where it ran). The shared-memory kernels'
    executed SASS counts each instruction of such a loop that many times (the power-of-two kernel's noise
    loop: 2). Loops the compiler rolled on its own (it may have unrolled them by a factor the SASS does
    not name) count once per thread, as do loops only some threads run (thread 0's reduction:
    conservative, the other warps skip it)."""
    threads = traced_threads(trace, kernel)
    if not executed or not threads:
        return []
    cache: dict[str, list] = {}
    return [(lo, hi, n) for lo, hi, where, runs, n in loop_runs(sass, line_of, executed, threads)
            if runs > 0 and _pinned(where, cache)]


def loops_counted(sass: dict, line_of: dict, executed: dict | None, trace: dict | None, kernel: str,
                  calls: dict | None = None, warp_share: dict | None = None) -> bool:
    """Whether the static count (executed_instructions with the pinned loops' iterations) is the kernel's
    whole dynamic count: every loop that ran is pinned (`#pragma unroll 1`, counted per iteration) or ran
    one iteration per entry (the draw and set loops of one draw, the epilogue of one quad per thread).
    A loop that only some threads run (thread 0's) is judged per warp that runs it (``warp_share`` of its
    closing line: at most executions / those warps per warp, the entries included). Slow-path loops do
    not count."""
    threads = traced_threads(trace, kernel)
    if not executed or not threads:
        return False
    cache: dict[str, list] = {}
    slow = (calls or {}).get("slow_paths", [])
    for lo, hi, where, runs, n in loop_runs(sass, line_of, executed, threads):
        if any(s <= lo and hi <= e for s, e in slow):
            continue
        if where is None or where not in executed:
            return False  # a loop whose runs gcov does not give: no direct count
        if runs <= 0:
            continue
        if runs < 1.0 - 1e-9:  # only some threads run it: its iterations per warp that does, at most
            share = (warp_share or {}).get(where)
            if not share:
                return False
            n = max(1.0, executed[where] / (share * threads / 32) - 1.0)
        if n > 1.0 + 1e-9 and not _pinned(where, cache):
            return False
    return True


# The noise generation of every kernel: the Philox rounds, Box-Muller and their float helpers (whole files
# in csrc/include, these functions in csrc/cuda/common.cuh). Its SASS per element is a floor for any kernel
# that draws the same stream (spectral_reach).
NOISE_FILES = ("csrc/include/anisodiff/philox.h", "csrc/include/anisodiff/fastmath.h")
NOISE_FUNCTIONS = ("philox_words", "rsqrt_approx", "box_muller_sfu", "cuda_randn4")


def noise_source_lines(root: Path = REPO) -> set:
    """'file:line' keys (the per-line counts' keys) of the noise generation's source lines."""
    keys = set()
    for f in NOISE_FILES:
        n = len((root / f).read_text().splitlines())
        keys |= {f"{f}:{i}" for i in range(1, n + 1)}
    rel = "csrc/cuda/common.cuh"
    lines = (root / rel).read_text().splitlines()
    sig = re.compile(r"__device__.*\b(" + "|".join(NOISE_FUNCTIONS) + r")\(")
    i = 0
    while i < len(lines):
        if sig.search(lines[i]):
            j = i
            if not lines[i].rstrip().endswith("}"):  # a one-line definition ends on its own line
                while j + 1 < len(lines) and lines[j] != "}":
                    j += 1
            keys |= {f"{rel}:{k + 1}" for k in range(i, j + 1)}
            i = j
        i += 1
    return keys


def model_cuda_case(case: dict, plan: dict, kernels: dict, trace: dict | None) -> dict:
    B, C, H, W, dt = case["B"], case["C"], case["H"], case["W"], case["dtype"]
    elems = B * C * H * W
    ideal = 3 * elems * DTYPE_BYTES[dt]                 # read x0, write x_t and the target
    n_launch = len(plan["launches"])
    ws = plan.get("workspace_bytes", 0)
    launches, total = [], 0.0
    for li, L in enumerate(plan["launches"]):
        k = kernels.get(L["kernel"])
        info = {"kernel": L["kernel"], "grid": L["grid"], "block": L["block"], "cluster": L["cluster"],
                "smem_dynamic": L["smem"]}
        if k is None:
            info["error"] = "kernel not found in the ptxas output"
            launches.append(info)
            total = math.inf
            continue
        occ = occupancy(L["block"], k["registers"], L["smem"], k["smem_static"])
        info.update(registers=k["registers"], spill_stores=k["spill_stores"], spill_loads=k["spill_loads"],
                    stack=k["stack"], smem_static=k["smem_static"], occupancy=occ)
        sass = k.get("sass") or {}
        ml = sass.get("main_loop")
        tr = (trace or {}).get("kernels", {}).get(L["kernel"]) if trace else None
        # DRAM traffic of this launch. One launch: the ideal tensors. Two passes (the plan has a workspace:
        # fp32 noise [B, C, H, W] + a complex plane workspace): the filter writes and reads back its complex
        # workspace twice (rows, columns) and writes the fp32 noise; the second pass reads that noise too.
        fp32_ws = 4 * elems if ws else 0
        complex_ws = max(ws - fp32_ws, 0)
        if n_launch == 1:
            bytes_dram, bytes_read = ideal, elems * DTYPE_BYTES[dt]
        elif li < n_launch - 1:
            bytes_dram, bytes_read = 4 * complex_ws + fp32_ws, 2 * complex_ws
        else:
            bytes_dram, bytes_read = ideal + fp32_ws, elems * DTYPE_BYTES[dt] + fp32_ws
        # the SASS whose source lines the emulator ran for this case (gcov of the traced build; all of it
        # without a trace): drops the code of the dtypes, layouts and options the case does not use
        executed = trace["executed_lines"] if trace and trace.get("executed_lines") else None
        line_of = {int(a): w for a, w in (k.get("line_of") or {}).items()}
        chain_of = {int(a): c for a, c in (k.get("chain_of") or {}).items()}
        instrs = sass.get("instructions", [])
        rolled = rolled_loop_iterations(sass, line_of, executed, trace, L["kernel"])
        cls_lines: dict = {}  # executed SASS per warp by source line (the direct count's breakdown)
        cls = executed_instructions(instrs, line_of, executed, chain_of=chain_of, inner_loops=rolled,
                                    threads=traced_threads(trace, L["kernel"]), calls=sass,
                                    warp_share=(trace or {}).get("warp_shares", {}).get(L["kernel"]),
                                    by_line=cls_lines)
        smem_static_ops = cls.get("smem", 0)
        if smem_static_ops > 0 and L["smem"] > 0 and not (tr and tr["warp_accesses"] > 0):
            # a shared-memory kernel is counted through its trace; the elementwise estimate would be
            # meaningless (the case's B = 1 trace ran another kernel: trace_key forces the same one)
            info["error"] = "no emulator trace of this kernel for the case's shape"
            launches.append(info)
            total = math.inf
            continue
        shares = (trace or {}).get("warp_shares", {}).get(L["kernel"])
        once = trace is not None and sum(l["kernel"] == L["kernel"] for l in trace["plan_B1"]["launches"]) == 1
        if tr and tr["warp_accesses"] > 0 and smem_static_ops > 0 and shares and once and \
                loops_counted(sass, line_of, executed, trace, L["kernel"], sass, shares):
            # every loop is unrolled, pinned or runs once: the executed SASS, each instruction weighted by
            # the share of the warps that ran its line (x a pinned loop's iterations), is the whole count
            warps = L["grid"] * -(-L["block"] // 32)  # this launch's (the traced one ran once)
            warp_instr = cls["total"] * warps
            mufu = cls.get("mufu", 0) * warps
            fp64 = cls.get("fp64", 0) * warps
            wavefronts = tr["wavefronts"] * B
            how = (f"direct: {cls['total']:.0f} executed SASS per warp (weighted by the share of warps that ran "
                   f"each line) x {warps} warps")
            info["hot_source_lines"] = [{"line": k, "sass_per_output_element": round(v * warps * 32 / elems, 2)}
                                        for k, v in sorted(cls_lines.items(), key=lambda kv: -kv[1])[:16]]
        elif tr and tr["warp_accesses"] > 0 and smem_static_ops > 0:
            # shared-memory kernels: dynamic instructions ~ dynamic smem accesses x (all / smem) of the SASS
            ratio = cls["total"] / smem_static_ops
            warp_instr = tr["warp_accesses"] * B * ratio
            mufu = warp_instr * cls.get("mufu", 0) / max(cls["total"], 1)
            fp64 = warp_instr * cls.get("fp64", 0) / max(cls["total"], 1)
            wavefronts = tr["wavefronts"] * B
            how = (f"trace: {tr['warp_accesses']:.0f} smem warp accesses / sample x {ratio:.1f} executed SASS "
                   f"per smem op")
        else:
            # elementwise: the main (grid-stride) loop once per item of 4 pixels x all channels
            items = B * math.ceil(H * W / 4)
            per = None
            if ml and executed:  # iterations of the grid-stride loop: the line of its closing branch
                per = executed.get(line_of.get(ml["end"], ""), 0) or None
            by_line: dict = {}
            inner = []  # loops the compiler kept rolled inside the main loop, with their iterations per item
            if ml and executed and per:
                for lo, hi, _n in sass.get("loop_list", []):
                    if ml["start"] <= lo and hi <= ml["end"] and (lo, hi) != (ml["start"], ml["end"]):
                        inner.append((lo, hi, executed.get(line_of.get(hi, ""), 0) / per))
            bcls = executed_instructions(instrs, line_of, executed, ml["start"], ml["end"], per, by_line,
                                         chain_of, inner, calls=sass) if ml else cls
            info["hot_source_lines"] = [{"line": k, "sass_per_item": round(v, 1)}
                                        for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])[:10]]
            noise = noise_source_lines()
            info["noise_sass_per_output_element"] = round(sum(v for k, v in by_line.items() if k in noise) / (4 * C), 2)
            body = bcls["total"]
            warp_instr = items / 32 * body
            mufu = items / 32 * bcls.get("mufu", 0)
            fp64 = items / 32 * bcls.get("fp64", 0)
            wavefronts = 0.0
            how = (f"main loop: {body:.0f} of {ml['instructions'] if ml else sass.get('total', 0)} SASS per item "
                   f"(4 pixels x {C} channels), weighted by how often the emulator ran their lines")
        gl = (ml or {}).get("gmem_load_bytes") or sass.get("gmem_load_bytes", 0)
        t = launch_time(grid=L["grid"], threads=L["block"], occ=occ, bytes_dram=bytes_dram, bytes_read=bytes_read,
                        warp_instr=warp_instr, mufu=mufu, fp64=fp64, wavefronts=wavefronts,
                        inflight_per_warp=32 * gl)
        info.update(predicted=t, dynamic_warp_instructions=warp_instr, instructions_how=how,
                    sass_per_output_element=round(warp_instr * 32 / elems, 2),
                    smem_wavefronts=wavefronts, dram_bytes=bytes_dram,
                    bank_conflicts=({"avg_way": round(tr["avg_way"], 3), "max_way": tr["max_way"],
                                     "warp_accesses_per_sample": tr["warp_accesses"], "worst_sites": tr["sites"][:4]}
                                    if tr and tr["warp_accesses"] else None))
        total += t["seconds"]
        launches.append(info)
    copy_t = ideal / (MACHINE["dram_peak_Bps"] * MACHINE["copy_efficiency"])
    call_t = max(total, MACHINE["host_call_us"] * 1e-6)
    # The launch gap every launch pays: no kernel (a copy neither) gets above copy_t / (copy_t + gaps),
    # and the kernels' own throughput is the time without it (back-to-back launches in a CUDA graph).
    gaps = len(launches) * MACHINE["launch_gap_us"] * 1e-6
    work = total - gaps
    return {"path": plan["path"], "launches": launches, "ideal_bytes": ideal,
            "predicted_gpu_us": round(total * 1e6, 3), "predicted_call_us": round(call_t * 1e6, 3),
            "predicted_pct_copy_gpu": round(100 * copy_t / total, 1) if total else None,
            "predicted_pct_copy_call": round(100 * copy_t / call_t, 1) if call_t else None,
            "predicted_pct_copy_cap": round(100 * copy_t / (copy_t + gaps), 1),
            "predicted_pct_copy_kernel": round(100 * copy_t / work, 1) if work > 0 else None}


def model_triton_case(case: dict, comp: dict | None) -> dict | None:
    if comp is None:
        return {"note": case.get("triton_note", "not compiled")}
    if "error" in comp:
        return {"error": comp["error"]}
    B, C, H, W, dt = case["B"], case["C"], case["H"], case["W"], case["dtype"]
    elems = B * C * H * W
    ideal = 3 * elems * DTYPE_BYTES[dt]
    launch = case["triton_launch"]
    grid = math.prod(launch["grid"])
    threads = comp["num_warps"] * 32
    occ = occupancy(threads, comp["registers"], 0, comp["smem_static"])
    sass = comp.get("sass") or {}
    cls = sass.get("classes", {})
    if case["kind"] == "squeeze":
        # straight-line program: every warp runs the whole SASS once
        warp_instr = grid * comp["num_warps"] * (sass.get("total", 0) - sass.get("slow_instructions", 0))
        how = "straight-line: SASS (slow paths excluded) x warps x programs"
    else:
        # DFT loops: every innermost loop (one per transform) runs HP times per plane, once per plane (C)
        ll = sass.get("loop_list", [])
        innermost = [l for l in ll if not any(o is not l and l[0] <= o[0] and o[1] <= l[1] for o in ll)]
        HP = max(16, 1 << (H - 1).bit_length())
        planes = C if len(innermost) < 4 * C else 1  # >= 4 C innermost loops: the channel loop is unrolled
        inner = sum(n for _, _, n in innermost) * HP * planes
        warp_instr = grid * comp["num_warps"] * (sass.get("total", 0) - sass.get("slow_instructions", 0) + inner)
        how = (f"{len(ll)} loops; {len(innermost)} innermost ({sum(n for _, _, n in innermost)} SASS) x {HP} "
               f"iterations x {planes} (channel loop {'rolled' if planes > 1 else 'unrolled'}) + the rest once")
    mufu = warp_instr * cls.get("mufu", 0) / max(sass.get("total", 1), 1)
    t = launch_time(grid=grid, threads=threads, occ=occ, bytes_dram=ideal, bytes_read=elems * DTYPE_BYTES[dt],
                    warp_instr=warp_instr, mufu=mufu, fp64=0.0, wavefronts=0.0,
                    inflight_per_warp=32 * sass.get("gmem_load_bytes", 0))
    copy_t = ideal / (MACHINE["dram_peak_Bps"] * MACHINE["copy_efficiency"])
    call_t = max(t["seconds"], MACHINE["host_call_us"] * 1e-6)
    return {"kernel": comp["name"], "grid": launch["grid"], "num_warps": comp["num_warps"],
            "registers": comp["registers"], "spills": comp["spills"], "stack": comp["stack"],
            "smem_static": comp["smem_static"], "occupancy": occ, "sass_total": sass.get("total"),
            "sass_classes": cls, "instructions_how": how, "sass_per_output_element": round(warp_instr * 32 / elems, 2),
            "predicted": t, "predicted_gpu_us": round(t["seconds"] * 1e6, 3),
            "predicted_pct_copy_gpu": round(100 * copy_t / t["seconds"], 1),
            "predicted_pct_copy_call": round(100 * copy_t / call_t, 1)}


def fft_min_instructions_per_elem(H: int, W: int) -> float:
    """The row-column split-radix count of the spectral filter per output element, as instructions: the
    flops of an n-point complex FFT (4 n log2 n - 6 n + 8) for the forward and the inverse 2-D transform
    (2 row + 2 column passes per complex point), a complex point holding 2 channels, every instruction an
    FMA (2 flops). A yardstick, not a strict bound: the modified split radix needs a few percent fewer
    flops, and a tensor-core DFT is not counted in CUDA-core instructions at all."""
    def per_point(n):
        return (4 * n * math.log2(n) - 6 * n + 8) / n if n > 1 else 0.0
    return (2 * per_point(W) + 2 * per_point(H)) / 2 / 2


def spectral_reach(case: dict, squeeze_twin: dict | None) -> dict:
    """Whether any kernel could meet the spectral goal in this case, by the model's own formulas (docs/cuda.md,
    "Reach of the spectral goal"). PREDICTED, like the rest:
    * cap: what a copy of the same bytes gets in one launch (copy time / (copy time + gap)); below the goal,
      no kernel meets it ("launch gap", and there is no budget);
    * budget: the SASS per element at which one launch on all SMs at full issue efficiency, issue-bound
      with no wave tail, takes exactly copy time / goal (launch_time inverted);
    * noise floor: the noise generation's SASS per element (Philox, Box-Muller) in the squeeze-only kernel
      of the same case - any kernel draws the same stream; with the FFT's row-column split-radix count
      beside it over the budget: "no room on CUDA cores";
    * otherwise "open"; the squeeze-only kernel's whole count (noise + epilogue + its loop) is reported
      beside it as what an epilogue has cost so far."""
    cu = case["cuda"]
    goal = GOALS["spectral_pct_copy"] / 100
    elems = case["B"] * case["C"] * case["H"] * case["W"]
    copy_t = 3 * elems * DTYPE_BYTES[case["dtype"]] / (MACHINE["dram_peak_Bps"] * MACHINE["copy_efficiency"])
    gap = MACHINE["launch_gap_us"] * 1e-6
    cap = copy_t / (copy_t + gap)
    issue_t = copy_t / goal - gap
    budget = (issue_t * SM90["sms"] * SM90["schedulers"] * SM90["clock_ghz"] * 1e9 * 32 / elems
              if cap >= goal else None)
    spent = sum(L.get("sass_per_output_element", 0) for L in cu.get("launches", []))
    tw = (squeeze_twin or {}).get("cuda", {}).get("launches") or [{}]
    noise, elementwise = tw[0].get("noise_sass_per_output_element"), tw[0].get("sass_per_output_element")
    fft_min = fft_min_instructions_per_elem(case["H"], case["W"])
    out = {"one_launch_cap_pct": round(100 * cap, 1),
           "budget_sass_per_elem": round(budget, 1) if budget is not None else None,
           "kernel_sass_per_elem": round(spent, 1), "noise_sass_per_elem": noise,
           "elementwise_sass_per_elem": elementwise, "fft_min_sass_per_elem": round(fft_min, 2)}
    if (cu.get("predicted_pct_copy_gpu") or 0) >= GOALS["spectral_pct_copy"]:
        out["reach"], out["why"] = "met", "the kernel meets it"
    elif budget is None:
        out["reach"] = "launch gap"
        out["why"] = f"a copy of the same bytes in one launch gets {100 * cap:.1f}%: no kernel can"
    elif budget - (noise or 0) < fft_min:
        out["reach"] = "no room on CUDA cores"
        out["why"] = (f"the noise generation ({noise or 0:g}) leaves {budget - (noise or 0):.1f} of the {budget:.1f} SASS "
                      f"per element, less than the FFT's {fft_min:.2f} (row-column split radix, all FMAs)")
    else:
        out["reach"] = "open"
        out["why"] = (f"<= {budget:.1f} SASS per element ({budget - (noise or 0):.1f} beside the noise generation"
                      + (f", {budget - elementwise:.1f} beside the squeeze-only kernel's {elementwise:g}" if elementwise else "")
                      + f"); the kernel spends {spent:g}")
    return out


def goal_verdicts(cases: list[dict]) -> list[dict]:
    out = []

    def add(goal, case_list, ok, worst, note=None):
        out.append({"goal": goal, "cases": len(case_list), "met": sum(ok(c) for c in case_list),
                    "verdict": ("PREDICTED n/a (no case in the grid)" if not case_list else
                                "PREDICTED MET" if all(ok(c) for c in case_list) else "PREDICTED NOT MET"),
                    "worst": worst(case_list) if case_list else None, **({"note": note} if note else {})})

    def cid(c):
        return f"{c['kind']} B={c['B']} {c['C']}x{c['H']}x{c['W']} {c['dtype']}"

    cu = [c for c in cases if c.get("cuda") and "launches" in c["cuda"]]
    sq = [c for c in cu if c["kind"] == "squeeze" and c["ideal_bytes_per_tensor"] >= 32 * 2**20]
    add(f"squeeze-only >= {GOALS['squeeze_pct_copy']:g}% of copy bandwidth (>= 32 MB per tensor, GPU time)", sq,
        lambda c: (c["cuda"]["predicted_pct_copy_gpu"] or 0) >= GOALS["squeeze_pct_copy"],
        lambda cs: (lambda w: f"{w['cuda']['predicted_pct_copy_gpu']}% at {cid(w)}")(
            min(cs, key=lambda c: c["cuda"]["predicted_pct_copy_gpu"] or 0)))
    sp = [c for c in cu if c["kind"] == "squeeze+spectral" and (c["C"], c["H"], c["W"]) in GOALS["spectral_shapes"]
          and c["B"] >= GOALS["spectral_min_batch"]]
    twins = {(c["B"], c["C"], c["H"], c["W"], c["dtype"]): c for c in cu if c["kind"] == "squeeze"}
    for c in sp:
        c["cuda"]["spectral_reach"] = spectral_reach(c, twins.get((c["B"], c["C"], c["H"], c["W"], c["dtype"])))
    capped = [c for c in sp if c["cuda"].get("predicted_pct_copy_cap", 100) < GOALS["spectral_pct_copy"]]
    no_room = [c for c in sp if c["cuda"]["spectral_reach"]["reach"] == "no room on CUDA cores"]
    opened = [c for c in sp if c["cuda"]["spectral_reach"]["reach"] == "open"]
    cap_note = (f"{len(capped)} of {len(sp)} cases cannot reach it at any kernel speed: the launch gap "
                f"({MACHINE['launch_gap_us']:g} us) alone caps them below {GOALS['spectral_pct_copy']:g}% ("
                + ", ".join(f"{cid(c)}: {c['cuda']['predicted_pct_copy_cap']}%" for c in capped) + ")") if capped else None
    if no_room:
        cap_note = ((cap_note + "; ") if cap_note else "") + (
            f"{len(no_room)} more cannot on CUDA cores: beside the noise generation the issue budget leaves less "
            "than the FFT's row-column split-radix count (" + ", ".join(
                f"{cid(c)}: {c['cuda']['spectral_reach']['why']}" for c in no_room) + ")")
    if opened:
        cap_note = ((cap_note + "; ") if cap_note else "") + "open (the budget leaves room): " + ", ".join(
            f"{cid(c)} ({c['cuda']['spectral_reach']['why']})" for c in opened)
    for key, what in (("predicted_pct_copy_gpu", "GPU time"), ("predicted_pct_copy_call", "per eager call"),
                      ("predicted_pct_copy_kernel", "kernel time, the launch gap excluded")):
        add(f"squeeze + spectral >= {GOALS['spectral_pct_copy']:g}% of copy bandwidth (3x32x32, 4x64x64, B >= 64, "
            f"{what})", sp, lambda c, key=key: (c["cuda"].get(key) or 0) >= GOALS["spectral_pct_copy"],
            lambda cs, key=key: (lambda w: f"{w['cuda'].get(key)}% at {cid(w)}")(
                min(cs, key=lambda c: c["cuda"].get(key) or 0)),
            cap_note if key == "predicted_pct_copy_gpu" else None)
    ls = [(c, L) for c in cu for L in c["cuda"]["launches"] if "registers" in L]
    add("no spills (every launched kernel)", ls, lambda cl: cl[1]["spill_stores"] == 0 and cl[1]["spill_loads"] == 0,
        lambda cls: max((f"{L['kernel']}: {L['spill_stores']} B spill stores" for _, L in cls), key=len))
    bk = [(c, L) for c, L in ls if L.get("bank_conflicts")]
    add(f"<= {GOALS['max_bank_way']:g}-way bank conflicts (average over the kernel)", bk,
        lambda cl: cl[1]["bank_conflicts"]["avg_way"] <= GOALS["max_bank_way"],
        lambda cls: (lambda w: f"{w[1]['bank_conflicts']['avg_way']}-way ({w[1]['kernel']}, {cid(w[0])})")(
            max(cls, key=lambda cl: cl[1]["bank_conflicts"]["avg_way"])))
    fs = [(c, c["cuda"]["launches"][0]) for c in cu if c["kind"] == "squeeze+spectral" and c["cuda"]["path"] == "fused"
          and "occupancy" in c["cuda"]["launches"][0]]
    add(f">= {GOALS['min_resident_blocks']} resident blocks / SM on the fused spectral path", fs,
        lambda cl: cl[1]["occupancy"]["blocks_per_sm"] >= GOALS["min_resident_blocks"],
        lambda cls: (lambda w: f"{w[1]['occupancy']['blocks_per_sm']} ({w[1]['occupancy']['limiter']}) at {cid(w[0])}")(
            min(cls, key=lambda cl: cl[1]["occupancy"]["blocks_per_sm"])))
    b16 = [c for c in cu if c["B"] == 16 and (c["H"], c["W"]) == (32, 32)]
    add(f"B=16 at 32x32 fills most SMs (>= {GOALS['b16_fill']:.0%} of 132 busy)", b16,
        lambda c: min(c["cuda"]["launches"][0].get("grid", 0), SM90["sms"]) / SM90["sms"] >= GOALS["b16_fill"],
        lambda cs: (lambda w: f"{min(w['cuda']['launches'][0]['grid'], 132)} SMs at {cid(w)}")(
            min(cs, key=lambda c: c["cuda"]["launches"][0].get("grid", 0))))
    return out


def make_cases(batches, shapes, dtypes, kinds) -> list[dict]:
    return [{"kind": k, "B": B, "C": C, "H": H, "W": W, "dtype": dt,
             "ideal_bytes_per_tensor": B * C * H * W * DTYPE_BYTES[dt]}
            for k in kinds for (C, H, W) in shapes for dt in dtypes for B in batches]


def git_commit(root: Path) -> dict:
    def g(*a):
        try:
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    dirty = g("status", "--porcelain", "--", "csrc/cuda", "csrc/include", "anisodiff/triton")
    return {"commit": g("rev-parse", "HEAD") or None, "kernel_sources_modified": bool(dirty),
            "modified": dirty.splitlines()[:20]}


def run_model(args, log=print) -> dict:
    t0 = time.time()
    cases = make_cases(args.batches, [tuple(map(int, s.split("x"))) for s in args.shapes], args.dtypes, args.kinds)
    cache = REPO / "build" / "perf_model"
    log("compiling csrc/cuda/*.cu for sm_90 (nvcc -cubin -Xptxas -v) ...")
    kernels, fp = compile_cuda(REPO, cache, log)
    log(f"  {len(kernels)} kernel instantiations")
    log("planner launches (emulator, EMU_PLAN_ONLY) and bank trace (B=1) ...")
    emu = run_emulator(cases, trace=not args.no_trace, log=log)
    for case, plan in zip(cases, emu["plans"]):
        case["cuda"] = model_cuda_case(case, plan, kernels, emu["traces"].get(trace_key(case, plan)[0]))
    triton_info = None
    if not args.no_triton:
        log("compiling the Triton kernels for sm_90 ...")
        try:
            reqs = triton_requests(cases)
            comps = {r["id"]: r for r in compile_triton(reqs, log)}
            for case in cases:
                rid = case.pop("triton_request", None)
                case["triton"] = model_triton_case(case, comps.get(rid) if rid is not None else None)
                did = case.pop("triton_dot_request", None)
                if did is not None and did in comps and "error" not in comps[did]:
                    d = comps[did]
                    case["triton"]["dot_dft_variant"] = {
                        "what": "DFT_BLOCK=0: the DFT as tl.dot (tf32x3) matrix products; resources only",
                        "registers": d["registers"], "stack": d["stack"], "spills": d["spills"],
                        "smem_static": d["smem_static"],
                        "tensor_core_sass": (d.get("sass") or {}).get("classes", {}).get("tensor", 0),
                        "sass_total": (d.get("sass") or {}).get("total")}
                case.pop("triton_launch", None)
                case.pop("triton_note", None)
            triton_info = {"compiled": len(comps), "how": "triton.compile(ASTSource, GPUTarget('cuda', 90, 32)) without a GPU"}
        except Exception as exc:  # noqa: BLE001 - the CUDA part stands alone
            triton_info = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            log(f"  Triton part failed: {triton_info['error'][:300]}")
    report = {
        "format": FORMAT, "version": VERSION, "label": LABEL,
        "note": ("PREDICTED by scripts/cuda_perf_model.py from ptxas -v, cuobjdump -sass, the planner and the host "
                 "emulator's bank trace; a model, never a measurement (docs/cuda.md, 'Performance model')."),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {**(git_commit(REPO) if not args.source_commit else
                      {"commit": args.source_commit, "kernel_sources_modified": False,
                       "snapshot": "a `git archive` of that commit (--source-commit)"}),
                   "cuda_fingerprint": fp["fingerprint"]},
        "hardware": {"sm90": SM90, "machine": MACHINE},
        "kernels": {n: {k: v for k, v in r.items() if k not in ("sass", "line_of", "chain_of")} | {"sass": _sass_summary(r.get("sass"))}
                    for n, r in sorted(kernels.items())},
        "bank_traces": {k: {"plan_B1": v["plan_B1"]["path"], "seconds": v["seconds"],
                            "executed_source_lines": len(v.get("executed_lines", [])),
                            "kernels": v["kernels"]} for k, v in emu["traces"].items()},
        "triton": triton_info,
        "cases": cases,
        "goals": goal_verdicts(cases),
        "model_seconds": round(time.time() - t0, 1),
    }
    return report


def _sass_summary(s: dict | None) -> dict | None:
    """The SASS summary without the per-instruction list (kept out of the JSON)."""
    if not s:
        return None
    ml = s.get("main_loop")
    return {"total": s["total"], "classes": s["classes"], "loops": s["loops"],
            "main_loop_instructions": ml["instructions"] if ml else None,
            "main_loop_classes": ml["classes"] if ml else None}


def markdown(report: dict) -> str:
    """The table of docs/cuda.md: one row per case, every figure PREDICTED."""
    src = report["source"]
    lines = [f"PREDICTED by `scripts/cuda_perf_model.py` (a static model, no GPU measurement) for "
             f"{report['hardware']['machine']['name']}; kernels of commit `{(src['commit'] or '?')[:10]}`"
             + (" with uncommitted kernel changes" if src.get("kernel_sources_modified") else "") + ".",
             "",
             "| kind | B | C x H x W | dtype | path | kernel (grid x block) | regs | spill | smem KiB | blocks/SM (limit) | "
             "SMs busy | banks avg / max way | SASS / elem | bound | PREDICTED % copy (GPU) | PREDICTED % copy (call) | "
             "PREDICTED % copy (kernel) | cap (launch gap) | Triton PREDICTED % copy (GPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        cu = c["cuda"]
        L = cu["launches"][0] if cu.get("launches") else {}
        occ = L.get("occupancy", {})
        bc = next((x["bank_conflicts"] for x in cu.get("launches", []) if x.get("bank_conflicts")), None)
        kern = " + ".join(f"`{x['kernel'].split('<')[0]}` ({x['grid']} x {x['block']})" for x in cu.get("launches", []))
        spill = max((x.get("spill_stores", 0) for x in cu.get("launches", [])), default=0)
        regs = "/".join(str(x.get("registers", "?")) for x in cu.get("launches", []))
        smem = "/".join(f"{(x.get('smem_dynamic', 0) + x.get('smem_static', 0)) / 1024:.1f}" for x in cu.get("launches", []))
        busy = min(L.get("grid", 0), SM90["sms"])
        spe = "/".join(f"{x.get('sass_per_output_element', 0):g}" for x in cu.get("launches", []))
        bound = "/".join(x.get("predicted", {}).get("bound", "?") for x in cu.get("launches", []))
        tr = c.get("triton") or {}
        lines.append(
            f"| {c['kind']} | {c['B']} | {c['C']}x{c['H']}x{c['W']} | {c['dtype']} | {cu.get('path')} | {kern} | {regs} | "
            f"{spill} | {smem} | {occ.get('blocks_per_sm', '?')} ({occ.get('limiter', '?')}) | {busy} | "
            f"{'%.2f / %d' % (bc['avg_way'], bc['max_way']) if bc else '-'} | {spe} | {bound} | "
            f"{cu.get('predicted_pct_copy_gpu')} | {cu.get('predicted_pct_copy_call')} | "
            f"{cu.get('predicted_pct_copy_kernel', '-')} | {cu.get('predicted_pct_copy_cap', '-')} | "
            f"{tr.get('predicted_pct_copy_gpu', '-') if 'predicted_pct_copy_gpu' in tr else '-'} |")
    lines += ["", "PREDICTED goal verdicts:", ""]
    for g in report["goals"]:
        lines.append(f"* {g['goal']}: {g['verdict']} ({g['met']} of {g['cases']}; worst: {g['worst']})"
                     + (f". {g['note']}" if g.get("note") else ""))
    reach = [c for c in report["cases"] if c.get("cuda", {}).get("spectral_reach")]
    if reach:
        lines += ["", "PREDICTED reach of the spectral goal per goal case (`spectral_reach`, docs/cuda.md: the one-launch "
                  "cap; the SASS per element at which one launch on all SMs at full issue efficiency meets it; the "
                  "noise generation and the whole squeeze-only kernel of the same case; the FFT's row-column "
                  "split-radix count, all FMAs):", "",
                  "| B | C x H x W | dtype | % copy (GPU) | one-launch cap | budget SASS / elem | kernel | noise | "
                  "squeeze-only kernel | FFT count | reach |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in reach:
            r = c["cuda"]["spectral_reach"]

            def f(v):
                return "-" if v is None else f"{v:g}"
            lines.append(f"| {c['B']} | {c['C']}x{c['H']}x{c['W']} | {c['dtype']} | {c['cuda'].get('predicted_pct_copy_gpu')} | "
                         f"{r['one_launch_cap_pct']:g} | {f(r['budget_sass_per_elem'])} | {f(r['kernel_sass_per_elem'])} | "
                         f"{f(r['noise_sass_per_elem'])} | {f(r['elementwise_sass_per_elem'])} | "
                         f"{r['fft_min_sass_per_elem']:g} | {r['reach']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_emu-worker"]:
        cfg = json.loads(Path(argv[1]).read_text())
        emulator_worker(cfg["cases"], cfg["trace"], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model-sm90.json"))
    ap.add_argument("--markdown", metavar="FILE", help="also write the markdown table (PREDICTED) to FILE ('-': stdout)")
    ap.add_argument("--no-trace", action="store_true", help="skip the emulator's bank-conflict trace")
    ap.add_argument("--source-commit", metavar="SHA",
                    help="the commit the sources are (when run on a `git archive` snapshot without .git)")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--batches", type=int, nargs="+", default=CASE_BATCHES)
    ap.add_argument("--shapes", nargs="+", default=[f"{C}x{H}x{W}" for C, H, W in CASE_SHAPES])
    ap.add_argument("--dtypes", nargs="+", default=CASE_DTYPES, choices=list(DTYPE_BYTES))
    ap.add_argument("--kinds", nargs="+", default=CASE_KINDS, choices=CASE_KINDS)
    args = ap.parse_args(argv)
    report = run_model(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    if args.markdown == "-":
        print(md)
    elif args.markdown:
        Path(args.markdown).write_text(md + "\n")
    for g in report["goals"]:
        print(f"{g['verdict']}: {g['goal']} ({g['met']}/{g['cases']}; worst {g['worst']})", file=sys.stderr)
    print(f"wrote {args.out} (PREDICTED, {report['model_seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
