#!/usr/bin/env bash
# Run the C++ CPU kernel under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# What it does:
#   1. configures a SEPARATE CMake build (never the pip/scikit-build one under build/) with
#      -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined,
#      RelWithDebInfo, Ninja and the pip `cmake` (the system cmake is too old), and builds `_C`;
#   2. stages a throw-away copy of the Python package (anisodiff/**/*.py + the sanitized _C*.so),
#      of tests/ and of pyproject.toml (pytest markers/options) in a temp dir;
#   3. runs the kernel test suite
#        python3 -m pytest tests/test_cpu_kernel.py tests/test_validation.py tests/test_stream.py \
#          tests/test_sampling.py (the fused ddpm_step) tests/test_plane_lengths.py (Bluestein)
#          tests/test_video.py tests/test_input_perturbation.py tests/test_spatiotemporal.py (5-D slices,
#          the perturbation's second set, whole-sample temporal work items)
#      from that dir with libasan (+ libubsan) preloaded, then a small edge-case sweep (odd / prime /
#      degenerate sizes, C = 1..5, caller noise with odd strides, channels_last, fp16/bf16 in and
#      out, independent two-band with per_sample normalisation, every compiled instruction set,
#      1 and 2 threads) against anisodiff.reference.
#
# The editable install (`pip install -e .`) puts an import hook for `anisodiff` at the FRONT of
# sys.meta_path, so PYTHONPATH alone does not win against it. The staged run therefore puts a
# sitecustomize.py first on PYTHONPATH that drops every non-standard meta-path finder claiming
# `anisodiff` (sitecustomize runs after site-packages' .pth files, and subprocesses inherit it), and
# both the pytest run (a `-p` plugin, loaded before tests/conftest.py) and the sweep verify that
# anisodiff and anisodiff._C come from the staged dir and that ASan is live in the process; they
# fail loudly otherwise.
#
# ASan reports go to log files (log_path), one per reporting process, subprocesses included. UBSan
# (gcc's runtime ignores log_path when ASan is present) reports on stderr: each step's stderr is
# teed to a log and pytest runs with --capture=sys, so a report is never swallowed by pytest's
# fd capture when the process dies. The script prints every report and exits 1 if there is any
# report, any test failure or any sweep failure. Exit 0 means: clean.
#
# Blind spot: the kernel's per-thread scratch is ONE std::vector carved into regions
# (csrc/cpu/noise_cpu.cpp, carve_workspace), so an overrun from one region into the next is not
# an ASan error; the edge sweep's comparison with anisodiff.reference is what catches those.
#
# Usage:
#   scripts/sanitize_cpu.sh [extra pytest args...]     e.g. scripts/sanitize_cpu.sh -x -k dtypes
#
# Environment:
#   PYTHON               interpreter (default: python3); torch must be importable
#   CXX                  C++ compiler (default: g++; its libasan/libubsan are preloaded)
#   SANITIZE_BUILD_DIR   CMake build dir (default: ${TMPDIR:-/tmp}/anisodiff-sanitize/build;
#                        kept between runs, so a re-run only recompiles what changed)
#   SANITIZE_STAGE_DIR   staging dir (default: a fresh mktemp dir, removed at exit); must be
#                        absent, empty or a previous staging dir of this script
#   SANITIZE_KEEP=1      keep the staging dir (and the sanitizer logs) after the run
#   SANITIZE_JOBS        build parallelism (default: nproc)
#   SANITIZE_EDGE=0      skip the edge-case sweep (default: 1, run it)
#   SANITIZE_TESTS       test files (default: the kernel test files above)
#   ASAN_OPTIONS / UBSAN_OPTIONS are appended to the script's own, so yours override them.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
t_start=$(date +%s)

PY=$(command -v "${PYTHON:-python3}") || { echo "sanitize_cpu: ${PYTHON:-python3} not found" >&2; exit 2; }
CXX_BIN=$(command -v "${CXX:-g++}") || { echo "sanitize_cpu: ${CXX:-g++} not found" >&2; exit 2; }
cmake_bin=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))") || {
  echo "sanitize_cpu: the pip cmake is needed (pip install cmake)" >&2; exit 2; }
command -v ninja >/dev/null || { echo "sanitize_cpu: ninja not found (pip install ninja)" >&2; exit 2; }

build=${SANITIZE_BUILD_DIR:-${TMPDIR:-/tmp}/anisodiff-sanitize/build}
# never reuse scikit-build-core's build directory (build/{wheel_tag}) of the editable install
if [[ "$(realpath -m "$build")" == "$repo"/build/cp* ]]; then
  echo "sanitize_cpu: SANITIZE_BUILD_DIR=$build is the editable install's build dir; pick another" >&2
  exit 2
fi
jobs=${SANITIZE_JOBS:-$(nproc)}
mkdir -p "$build"

san_flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
san_link="-fsanitize=address,undefined"

# ---------------------------------------------------------------------------------------------
# 1. configure + build the sanitized extension
# ---------------------------------------------------------------------------------------------
echo "== sanitize_cpu: configuring $build"
"$cmake_bin" -S "$repo" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX_BIN" \
  -DCMAKE_CXX_FLAGS="$san_flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="$san_link" \
  -DCMAKE_MODULE_LINKER_FLAGS="$san_link" \
  -DCMAKE_EXE_LINKER_FLAGS="$san_link" \
  -DANISODIFF_CUDA=OFF \
  -DPython_EXECUTABLE="$PY" >"$build.configure.log" 2>&1 || {
  cat "$build.configure.log" >&2; echo "sanitize_cpu: configure failed" >&2; exit 1; }
echo "== sanitize_cpu: building _C"
"$cmake_bin" --build "$build" --target _C -j "$jobs"

so=$(find "$build" -maxdepth 1 -name '_C*.so' -print -quit)
[[ -n "$so" ]] || { echo "sanitize_cpu: no _C*.so in $build" >&2; exit 1; }
if ! nm -D --undefined-only "$so" | grep '__asan_' >/dev/null; then  # no -q: SIGPIPE + pipefail
  echo "sanitize_cpu: $so is not ASan-instrumented" >&2; exit 1
fi

# the sanitizer runtimes of the compiler that built it
libasan=$(readlink -f "$("$CXX_BIN" -print-file-name=libasan.so)")
libubsan=$(readlink -f "$("$CXX_BIN" -print-file-name=libubsan.so)")
for lib in "$libasan" "$libubsan"; do
  [[ -f "$lib" ]] || { echo "sanitize_cpu: sanitizer runtime $lib not found" >&2; exit 1; }
done
# ldd resolves the .so's own DT_NEEDED entries: preload exactly those files, so that one copy of
# each runtime is in the process.
needed_asan=$(ldd "$so" | awk '/libasan/ && !n++ {print $3}')
needed_ubsan=$(ldd "$so" | awk '/libubsan/ && !n++ {print $3}')
[[ -n "$needed_asan" ]] && libasan=$(readlink -f "$needed_asan")
[[ -n "$needed_ubsan" ]] && libubsan=$(readlink -f "$needed_ubsan")
preload="$libasan"
[[ -n "$needed_ubsan" ]] && preload="$preload:$libubsan"

# ---------------------------------------------------------------------------------------------
# 2. stage the package, the tests and the import guard
# ---------------------------------------------------------------------------------------------
if [[ -n "${SANITIZE_STAGE_DIR:-}" ]]; then
  stage=$SANITIZE_STAGE_DIR
  if [[ -d "$stage" && -n "$(ls -A "$stage")" && ! -f "$stage/.anisodiff-sanitize-stage" ]]; then
    echo "sanitize_cpu: SANITIZE_STAGE_DIR=$stage is not empty and not a staging dir; refusing" >&2
    exit 2
  fi
  rm -rf "$stage"
  mkdir -p "$stage"
else
  stage=$(mktemp -d "${TMPDIR:-/tmp}/anisodiff-sanitize-stage.XXXXXX")
fi
cleanup() {
  if [[ "${SANITIZE_KEEP:-0}" != 1 ]]; then rm -rf "$stage"; else echo "sanitize_cpu: kept $stage"; fi
}
trap cleanup EXIT
stage=$(cd "$stage" && pwd)
touch "$stage/.anisodiff-sanitize-stage"

# anisodiff/**/*.py (no compiled artefacts, no caches) + the sanitized extension
(cd "$repo" && find anisodiff -name '*.py' -not -path '*/__pycache__/*' -print0 |
  xargs -0 -I{} cp --parents {} "$stage/")
cp "$so" "$stage/anisodiff/"
staged_so="$stage/anisodiff/$(basename "$so")"
mkdir -p "$stage/tests"
(cd "$repo/tests" && find . -name '*.py' -not -path '*/__pycache__/*' -print0 |
  xargs -0 -I{} cp --parents {} "$stage/tests/")
cp "$repo/pyproject.toml" "$stage/"  # [tool.pytest.ini_options]: markers, addopts

boot="$stage/_sanitize_boot"
mkdir -p "$boot"
cat >"$boot/sitecustomize.py" <<'EOF'
# Staged sanitizer run: make the staged anisodiff win over the editable install. The editable
# install's .pth registers a meta-path finder (at index 0) that claims `anisodiff`; site runs this
# module after the .pth files, so the finder is already there: drop every meta-path finder other
# than the standard ones that would resolve `anisodiff`.
import sys


def _drop_foreign_anisodiff_finders():
    import importlib.machinery as m
    standard = (m.BuiltinImporter, m.FrozenImporter, m.PathFinder)
    for finder in list(sys.meta_path):
        if isinstance(finder, type) and issubclass(finder, standard):
            continue
        if isinstance(finder, standard):
            continue
        try:
            spec = finder.find_spec("anisodiff", None)
        except Exception:  # a finder that cannot answer is not ours to judge
            continue
        if spec is not None:
            sys.meta_path.remove(finder)


_drop_foreign_anisodiff_finders()
EOF
cat >"$boot/_sanitize_guard.py" <<'EOF'
"""Fails loudly unless the staged, sanitized anisodiff._C is the one imported, with ASan live.
Loaded as a pytest plugin (-p _sanitize_guard, before tests/conftest.py) and by the edge sweep."""
import os
import sys

_stage = os.path.realpath(os.environ["ANISO_SANITIZE_STAGE"])
_so = os.path.realpath(os.environ["ANISO_SANITIZE_SO"])


def check():
    import anisodiff
    import anisodiff._ext as ext
    pkg = os.path.realpath(anisodiff.__file__)
    c = ext._C
    problems = []
    if not pkg.startswith(_stage + os.sep):
        problems.append(f"anisodiff imported from {pkg}, not from the staged dir {_stage}")
    if c is None:
        problems.append(f"anisodiff._C failed to import: {ext._IMPORT_ERROR}")
    elif os.path.realpath(c.__file__) != _so:
        problems.append(f"anisodiff._C is {c.__file__}, not the sanitized {_so}")
    with open("/proc/self/maps") as f:
        maps = f.read()
    if "libasan" not in maps:
        problems.append("libasan is not mapped in this process (LD_PRELOAD not in effect?)")
    if _so not in maps and (c is None or os.path.realpath(c.__file__) not in maps):
        problems.append("the sanitized _C is not mapped in this process")
    if problems:
        msg = "sanitize_cpu: WRONG anisodiff under test:\n  " + "\n  ".join(problems)
        sys.stderr.write(msg + "\n")
        raise SystemExit(msg)
    return c.__file__


_file = check()
sys.stderr.write(f"sanitize_cpu guard: pid {os.getpid()} runs anisodiff._C = {_file} (ASan + UBSan live)\n")


def pytest_report_header(config):
    return f"sanitize_cpu: anisodiff._C = {_file} (ASan + UBSan)"
EOF

# ---------------------------------------------------------------------------------------------
# 3. the sanitized environment
# ---------------------------------------------------------------------------------------------
logs="$stage/_sanitizer_logs"
mkdir -p "$logs"
export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: CPython leaks by design at exit. log_path: one file per process with a report.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:log_path=$logs/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# UBSan: with gcc's combined ASan + UBSan the UBSan runtime ignores log_path and always reports on
# stderr, so every step's stderr is also teed to $logs/stderr.* (see logged) and searched below;
# pytest runs with --capture=sys so that fd-level writes (the reports) are not swallowed by its
# capture when the process dies.
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

# logged NAME CMD...: run CMD with its stderr also copied to $logs/stderr.NAME; CMD's exit status.
logged() {
  local name=$1; shift
  { "$@" 2>&1 1>&3 3>&- | tee -a "$logs/stderr.$name" >&2; } 3>&1
}
export PYTHONPATH="$boot:$stage${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export ANISO_SANITIZE_STAGE="$stage" ANISO_SANITIZE_SO="$staged_so"
unset ANISODIFF_CPU_CAPABILITY  # the tests choose the instruction set themselves

echo "== sanitize_cpu: staged at $stage"
echo "   _C:         $staged_so"
echo "   LD_PRELOAD: $LD_PRELOAD"
(cd "$stage" && logged guard "$PY" -c "import _sanitize_guard, anisodiff; print('   build_info:', anisodiff.build_info())")

status=0
read -r -a tests <<<"${SANITIZE_TESTS:-tests/test_cpu_kernel.py tests/test_validation.py tests/test_stream.py tests/test_sampling.py tests/test_plane_lengths.py tests/test_video.py tests/test_input_perturbation.py tests/test_spatiotemporal.py}"
echo "== sanitize_cpu: pytest ${tests[*]} $*"
t0=$(date +%s)
(cd "$stage" && logged pytest "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider --capture=sys \
  -p _sanitize_guard "$@") ||
  { echo "sanitize_cpu: pytest FAILED (exit $?)"; status=1; }
echo "   pytest: $(($(date +%s) - t0)) s"

if [[ "${SANITIZE_EDGE:-1}" == 1 ]]; then
  cat >"$stage/_sanitize_edge.py" <<'EOF'
"""Edge-case sweep of the CPU kernel under the sanitizers, checked against anisodiff.reference."""
import itertools
import os
import sys
import time

import _sanitize_guard  # noqa: F401  (verifies the staged, sanitized build first)
import torch

import anisodiff as ad

torch.manual_seed(0)
sched = ad.VPSchedule.linear(T=1000)
CAPS = ad.build_info()["cpu_capabilities_compiled"]
failures = []
ncalls = 0


def axes(C, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    return q[:, :k].contiguous()


def specs(C):
    V = axes(C, min(C, 2), C)
    out = {
        "iso": ad.NoiseSpec(),
        "sdm": ad.NoiseSpec(ad.Squeeze(V[:, :1], -0.4)),
        "pl": ad.NoiseSpec(None, ad.PowerLaw(-0.2)),
        "pl_dc": ad.NoiseSpec(None, ad.PowerLaw(-1.0)),  # DC weight ~1e10: the DC bin outside the FFT
        "band_ps": ad.NoiseSpec(None, ad.Band(0.1, 0.35), normalize="per_sample"),
        "two_shared": ad.NoiseSpec(ad.Squeeze(V[:, :1], 0.3), ad.TwoBand(0.3, (0.0, 0.25), 0.7, (0.25, 1.0))),
        "two_indep_ps": ad.NoiseSpec(ad.Squeeze(V[:, :1], 0.5),
                                     ad.TwoBand(0.6, (0.0, 0.3), 0.4, (0.3, 1.0), mixture="independent"),
                                     normalize="per_sample"),
        "two_indep": ad.NoiseSpec(None, ad.TwoBand(0.6, (0.0, 0.3), 0.4, (0.3, 1.0), mixture="independent"),
                                  radius="rmax1"),
    }
    if C >= 2:
        out["sdm2+pl"] = ad.NoiseSpec(ad.Squeeze(V[:, :2], [-0.4, 0.6]), ad.PowerLaw(0.3))
    if C >= 3:
        out["hdm+two_indep_ps"] = ad.NoiseSpec(
            ad.Squeeze(V[:, :1], -0.5, variant="heisenberg"),
            ad.TwoBand(0.5, (0.0, 0.2), 0.5, (0.2, 1.0), mixture="independent"), normalize="per_sample")
    return out


def tol(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    e = torch.finfo(dtype).eps
    return dict(rtol=2 * e, atol=2 * e)


def check(name, actual, expected, dtype=torch.float32):
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        failures.append(f"{name}: dtype/shape {actual.dtype}{tuple(actual.shape)} vs "
                        f"{expected.dtype}{tuple(expected.shape)}")
        return
    try:
        torch.testing.assert_close(actual.float(), expected.float(), **tol(dtype))
    except AssertionError as exc:
        failures.append(f"{name}: {str(exc).splitlines()[0:4]}")


def odd_noise(draws, shape, variant, dtype):
    """White noise of `shape` (with a leading draw dim when draws > 1) in an odd memory layout."""
    B, C, H, W = shape
    lead = (draws,) if draws > 1 else ()
    if variant == 0:    # W stride 3, H offset by one row, storage larger than the view
        n = torch.randn(*lead, B, C, H + 2, 3 * W + 1)[..., 1:H + 1, : 3 * W : 3]
    elif variant == 1:  # channels_last-like (C innermost)
        n = torch.randn(*lead, B, H, W, C).movedim(-1, -3)
    elif variant == 2:  # H and W transposed
        n = torch.randn(*lead, B, C, W, H).transpose(-1, -2)
    else:               # batch broadcast (stride 0) + draw dim not outermost
        if draws > 1:
            n = torch.randn(B, draws, C, H, W).transpose(0, 1)
        else:
            n = torch.randn(1, C, H, W).expand(B, C, H, W)
    return n.to(dtype)


def cpu(fn):
    global ncalls
    ncalls += 1
    return fn()


SIZES = [(1, 1), (1, 7), (11, 1), (1, 2), (2, 1), (7, 11), (13, 17), (17, 13), (7, 7), (64, 64), (67, 5), (3, 131)]  # last two: Bluestein
TARGETS = ["epsilon", "v", "x0", "flow"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
t0 = time.time()
case = 0
for C in [1, 2, 3, 4, 5]:
    sp = specs(C)
    sizes = SIZES + ([(256, 256)] if C in (1, 3, 5) else [])
    for (H, W), (sname, spec) in itertools.product(sizes, sp.items()):
        big = H * W >= 64 * 64
        if big and sname not in ("two_indep_ps", "hdm+two_indep_ps", "sdm2+pl", "pl"):
            continue
        B = 1 if big else (1 + case % 3)
        shape = (B, C, H, W)
        cap = CAPS[(case // 3) % len(CAPS)]  # not in step with the dtype cycle
        dtype = DTYPES[case % 3]
        target = TARGETS[case % 4]
        torch.set_num_threads(1 + case % 2)
        os.environ["ANISODIFF_CPU_CAPABILITY"] = cap
        case += 1
        tag = f"C={C} {H}x{W} B={B} {sname} cap={cap} {dtype} {target}"
        t = torch.randint(0, 1000, (B,))
        seed = [0, 2**63 - 1, 12345][case % 3]
        offset = [0, 2**32 - 3, 2**62 - 1][(case // 2) % 3]
        try:
            ref_n = ad.shaped_noise(shape, spec, timesteps=t, schedule=sched, seed=seed, offset=offset,
                                    dtype=dtype, backend="reference")
        except ValueError as exc:  # a band with no frequency bin on this grid: cpu must refuse too
            try:
                cpu(lambda: ad.shaped_noise(shape, spec, timesteps=t, schedule=sched, seed=seed,
                                            offset=offset, backend="cpu"))
                failures.append(f"{tag}: reference refused ({exc}) but cpu did not")
            except ValueError:
                pass
            continue
        # generated stream, output dtype fp32/fp16/bf16
        n = cpu(lambda: ad.shaped_noise(shape, spec, timesteps=t, schedule=sched, seed=seed,
                                        offset=offset, dtype=dtype, backend="cpu"))
        check(f"{tag} shaped_noise", n, ref_n, dtype)
        # fused add_noise: x0 channels_last in fp32/fp16/bf16
        x0 = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        ref = ad.add_noise(x0.contiguous(), t, spec, sched, seed=seed, offset=offset, target=target,
                           backend="reference")
        out = cpu(lambda: ad.add_noise(x0, t, spec, sched, seed=seed, offset=offset, target=target,
                                       backend="cpu"))
        check(f"{tag} add_noise x_t", out[0], ref[0], dtype)
        check(f"{tag} add_noise target", out[1], ref[1], dtype)
        # caller noise in odd layouts (input dtype varies too), through apply_operator and add_noise
        for variant in range(4):
            ndt = DTYPES[(case + variant) % 3]
            eps = odd_noise(spec.draws, shape, variant, ndt)
            ref_o = ad.apply_operator(eps.contiguous(), spec, timesteps=t, schedule=sched,
                                      backend="reference")
            out_o = cpu(lambda: ad.apply_operator(eps, spec, timesteps=t, schedule=sched, backend="cpu"))
            check(f"{tag} apply_operator noise-layout={variant} {ndt}", out_o, ref_o, ndt)
            if variant in (0, 3):
                x0f = torch.randn(B, C, W, H).transpose(2, 3)  # non-contiguous fp32 x0
                ref_a = ad.add_noise(x0f.contiguous(), t, spec, sched, noise=eps.contiguous(),
                                     target=target, backend="reference")
                out_a = cpu(lambda: ad.add_noise(x0f, t, spec, sched, noise=eps, target=target,
                                                 backend="cpu"))
                check(f"{tag} add_noise noise-layout={variant} {ndt} x_t", out_a[0], ref_a[0])
                check(f"{tag} add_noise noise-layout={variant} {ndt} target", out_a[1], ref_a[1])
os.environ.pop("ANISODIFF_CPU_CAPABILITY", None)

# odd batches with generated noise and odd C (samples are paired across the batch end)
for B, C in [(1, 1), (1, 3), (3, 3), (5, 5), (7, 1)]:
    spec = specs(C)["two_indep_ps"]
    t = torch.arange(B) * 100
    ref = ad.shaped_noise((B, C, 9, 5), spec, timesteps=t, schedule=sched, seed=3, backend="reference")
    for cap in CAPS:
        os.environ["ANISODIFF_CPU_CAPABILITY"] = cap
        out = cpu(lambda: ad.shaped_noise((B, C, 9, 5), spec, timesteps=t, schedule=sched, seed=3,
                                          backend="cpu"))
        check(f"odd batch B={B} C={C} cap={cap}", out, ref)
os.environ.pop("ANISODIFF_CPU_CAPABILITY", None)

# a long 1-D white stream through the kernel (1 x 1 x 1 x n planes, unaligned ends)
for n, off in [(1, 0), (3, 1), (4097, 2**32 - 1), (100003, 5)]:
    check(f"white_noise n={n}", ad.white_noise((n,), seed=7, offset=off),
          ad.reference.white_noise((n,), 7, off))
    ncalls += 1

print(f"edge sweep: {case} configurations, {ncalls} kernel calls, {len(failures)} failures, "
      f"{time.time() - t0:.1f} s")
for f in failures:
    print("  FAIL", f)
sys.exit(1 if failures else 0)
EOF
  echo "== sanitize_cpu: edge-case sweep"
  t0=$(date +%s)
  (cd "$stage" && logged edge "$PY" _sanitize_edge.py) || { echo "sanitize_cpu: edge sweep FAILED (exit $?)"; status=1; }
  echo "   edge sweep: $(($(date +%s) - t0)) s"
fi

# ---------------------------------------------------------------------------------------------
# 4. sanitizer reports
# ---------------------------------------------------------------------------------------------
reports=0
report_re='ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer|ERROR: LeakSanitizer'
shopt -s nullglob
for f in "$logs"/asan* "$logs"/ubsan*; do  # one file per process that logged (ASan log_path)
  if grep -qE "$report_re" "$f"; then
    reports=$((reports + 1))
    echo "======== sanitizer report: $(basename "$f")"
  else
    echo "-------- sanitizer log without an error report (warnings only): $(basename "$f")"
  fi
  cat "$f"
done
for f in "$logs"/stderr.*; do  # UBSan (and anything else written to stderr) of each step
  if grep -qE "$report_re" "$f"; then
    reports=$((reports + 1))
    echo "======== sanitizer report on the stderr of step '${f##*stderr.}':"
    grep -E -A 60 "$report_re" "$f"
  fi
done
shopt -u nullglob
if ((reports > 0)); then
  echo "sanitize_cpu: $reports process(es) with sanitizer reports"
  status=1
fi

echo "== sanitize_cpu: $( ((status == 0)) && echo CLEAN || echo FAILED ) in $(($(date +%s) - t_start)) s"
exit $status
