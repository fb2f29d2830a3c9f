"""Builds the host emulation of the CUDA kernels (see README.md) and registers torch.ops.anisodiff_emu.*.

The .cu sources of csrc/cuda are rewritten (kernel launches `k<<<grid, block, smem, s>>>(args);` become
`emu_launch(grid, block, smem, [&] { k(args); });`, the dynamic shared memory becomes the emulator's
poisoned buffer) into <build_dir>/gen/*.cu.cpp, with `#line` directives so compiler errors point at
the original .cu lines, and compiled as C++ with include/cuda_runtime.h (the runtime shim) by
torch.utils.cpp_extension.load into <build_dir> (default: <repo>/build/cuda_emulation, git-ignored),
which ninja reuses on later runs.

By hand:  python tests/cuda_emulation/emulator.py   (builds, prints the library path)
"""
from __future__ import annotations

import os
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
SOURCES = ["noise_elementwise.cu", "noise_spectral.cu", "noise_spectral_pow2.cu", "noise_spectral_lines.cu", "noise_cuda.cu"]
NAME = "anisodiff_cuda_emu"


class EnvironmentProblem(RuntimeError):
    """The build cannot run here (no compiler / ninja / headers): not a defect of the sources."""


class SourceError(RuntimeError):
    """The kernel sources (or the harness) do not compile / link as host C++."""


def default_build_dir() -> Path:
    return Path(os.environ.get("ANISODIFF_EMU_BUILD_DIR", REPO / "build" / "cuda_emulation"))


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<":
            depth += 1
        if ch in ")>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


_LAUNCH = re.compile(r"([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);")
_SMEM = "extern __shared__ __align__(16) unsigned char smem[];"


def rewrite(name: str, text: str) -> str:
    """One .cu source as emulator C++ (line numbers preserved)."""

    def launch(m):
        kern, cfg, args = m.group(1), m.group(2), m.group(3)
        parts = _split_top(cfg)
        smem = parts[2] if len(parts) > 2 else "0"
        return f"emu_launch({parts[0]}, {parts[1]}, {smem}, [&] {{ {kern}({args}); }}, (const void*)&{kern});"

    out, n_launch = _LAUNCH.subn(launch, text)
    if "<<<" in out:
        raise SourceError(f"{name}: a kernel launch the rewriter does not understand (one line, "
                          "`kernel<<<grid, block[, smem[, stream]]>>>(args);` expected)")
    out = out.replace(_SMEM, "unsigned char* smem = emu_block_smem();")
    if "extern __shared__" in out:
        raise SourceError(f"{name}: a shared-memory declaration other than `{_SMEM}`")
    return f'#line 1 "{(CSRC / "cuda" / name).as_posix()}"\n' + out


def generate(gen_dir: Path) -> list[Path]:
    gen_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SOURCES:
        text = rewrite(name, (CSRC / "cuda" / name).read_text())
        path = gen_dir / (name + ".cpp")
        if not path.exists() or path.read_text() != text:  # keep mtimes: ninja rebuilds what changed
            path.write_text(text)
        paths.append(path)
    return paths


def check_environment() -> None:
    if not sys.platform.startswith("linux"):
        raise EnvironmentProblem("the emulator's scheduler uses glibc ucontext (Linux only)")
    from torch.utils import cpp_extension as ce

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise EnvironmentProblem(f"no C++ compiler ({cxx!r} not on PATH)")
    if not ce.is_ninja_available():
        raise EnvironmentProblem("ninja is not available (pip install ninja)")
    if not any((Path(p) / "ATen" / "ATen.h").exists() for p in ce.include_paths()):
        raise EnvironmentProblem("torch's C++ headers are not installed")


# A compile or link error located in the kernel sources / the harness: the sources are at fault.
_OUR_ERROR = re.compile(r"(csrc|cuda_emulation)/[^\s:]+:\d+(:\d+)?:\s+(fatal )?error|undefined reference")


def build(build_dir: Path | None = None, verbose: bool = False) -> Path:
    """Generates, compiles (incrementally) and loads the emulator; returns the shared library."""
    check_environment()
    import torch
    from torch.utils import cpp_extension as ce

    build_dir = Path(build_dir or default_build_dir())
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "emu_ops.cpp", CSRC / "ops_common.cpp", *generate(build_dir / "gen")]
    try:
        ce.load(name=NAME, sources=[str(s) for s in sources],
                extra_include_paths=[str(HERE / "include"), str(CSRC / "include"), str(CSRC),
                                     str(CSRC / "cuda")],
                extra_cflags=["-O1", "-Wno-unknown-pragmas"], build_directory=str(build_dir),
                is_python_module=False, verbose=verbose)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        text = str(exc)
        if _OUR_ERROR.search(text):
            raise SourceError(text) from exc
        raise EnvironmentProblem(text) from exc
    lib = build_dir / f"{NAME}.so"
    if not hasattr(torch.ops.anisodiff_emu, "add_noise"):
        torch.ops.load_library(str(lib))
    return lib


TRACED_NAME = NAME + "_traced"


def build_traced(build_dir: Path | None = None, verbose: bool = False) -> Path:
    """The emulator with the shared-memory access trace of emu_trace.cpp (scripts/cuda_perf_model.py):
    the rewritten kernels are compiled here with GCC's ThreadSanitizer instrumentation only (no TSan
    runtime: emu_trace.cpp defines the hooks) and gcov line coverage, and linked into a library that also
    registers ``torch.ops.anisodiff_emu.trace_enable / trace_report / warp_coverage / coverage_reset /
    coverage_dump``
    (the .gcda files land next to the objects, ``traced_objects(build_dir)``). It registers the same ops as :func:`build`,
    so a process loads one or the other. Default directory: <repo>/build/cuda_emulation_traced."""
    check_environment()
    import torch
    from torch.utils import cpp_extension as ce

    build_dir = Path(build_dir or default_build_dir().with_name("cuda_emulation_traced"))
    build_dir.mkdir(parents=True, exist_ok=True)
    includes = [HERE / "include", CSRC / "include", CSRC, CSRC / "cuda"]
    # + gcov line coverage (coverage_reset / coverage_dump): which source lines a case executes
    # + basic-block coverage per warp (warp_coverage: -fsanitize-coverage=trace-pc, hooks in emu_trace.cpp)
    flags = ["-O1", "-g", "-std=c++17", "-fPIC", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
             "-fsanitize-coverage=trace-pc", "-fprofile-arcs", "-ftest-coverage", "-Wno-unknown-pragmas", *[f"-I{p}" for p in includes]]
    headers = sorted([*(HERE / "include").glob("*.h"), *(CSRC / "cuda").glob("*.cuh"), *(CSRC / "cuda").glob("*.h"),
                      *(CSRC / "include").rglob("*.h")])
    stamp = hashlib.sha256("\n".join([*flags, *(p.read_text() for p in headers)]).encode()).hexdigest()[:16]
    objects = []
    for src in generate(build_dir / "gen"):
        # the source's text in the name too: a changed kernel is a new object, so the library (whose
        # link flags name the objects) is linked again and its gcov counters match the new .gcno
        own = hashlib.sha256((stamp + src.read_text()).encode()).hexdigest()[:16]
        obj = build_dir / f"{src.stem}.{own}.o"
        if not obj.exists():
            cmd = [os.environ.get("CXX", "c++"), *flags, "-c", str(src), "-o", str(obj)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SourceError(f"{src.name} (traced): {r.stderr[-4000:]}")
        objects.append(str(obj))
    try:
        ce.load(name=TRACED_NAME, sources=[str(HERE / "emu_ops.cpp"), str(CSRC / "ops_common.cpp"),
                                           str(HERE / "emu_trace.cpp")],
                extra_include_paths=[str(p) for p in includes], extra_cflags=["-O1", "-Wno-unknown-pragmas"],
                extra_ldflags=[*objects, "-lgcov"], build_directory=str(build_dir), is_python_module=False,
                verbose=verbose)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        text = str(exc)
        if _OUR_ERROR.search(text):
            raise SourceError(text) from exc
        raise EnvironmentProblem(text) from exc
    lib = build_dir / f"{TRACED_NAME}.so"
    if not hasattr(torch.ops.anisodiff_emu, "trace_report"):
        torch.ops.load_library(str(lib))
    return lib


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
