#!/usr/bin/env bash
# GPU check: build anisodiff with CUDA, run the CUDA tests (+ the rest of the suite if time allows),
# compute-sanitizer memcheck on a small subset, and the CUDA benchmark. For a machine with an NVIDIA
# GPU and a CUDA build of torch, nvcc, cmake, ninja, pybind11 and scikit-build-core preinstalled (no
# network needed: pip installs nothing else). One command, under 10 minutes:
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Logs and results go to $OUT (default: /tmp/anisodiff-gpu-check), at most 8 files: build.log, build_info.json,
# test_cuda.log, suite.log, sanitizer.log, bench.log, bench-<device>.json, bench-<device>.png.
# Exit status: non-zero when the build or a test fails (the benchmark still runs after test failures).
# Environment: PYTHON (python3), CUDA_ARCHS (90), SUITE=0 skips the rest of the suite,
# BENCH_ARGS (default --quick), BUDGET (560 s in all), stage limits T_BUILD / T_CUDA / T_SAN / T_SUITE /
# T_BENCH (s; each stage also leaves time for the ones after it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/anisodiff-gpu-check}
mkdir -p "$OUT"
START=$(date +%s)
status=0
note() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
left() { echo $((${BUDGET:-560} - ($(date +%s) - START))); }
# limit DEFAULT [RESERVE]: a stage's time limit, never eating into the time kept for later stages.
limit() { local l=$(( $(left) - ${2:-90} )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo "$l"; }

# --- carried wheels (the GPU image has no package index: diffusers travels as .whl/*.whl) --------
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  note "carried wheels: $(ls .whl | tr '\n' ' ')"
fi

# --- build --------------------------------------------------------------------------------------
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break; done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # torch's CMake config adds these -gencode flags
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PYTHONUNBUFFERED=1
note "building (nvcc: $(command -v nvcc || echo none), GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
if ! timeout "$(limit "${T_BUILD:-300}" 240)" "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
      -Ccmake.define.ANISODIFF_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" \
      >"$OUT/build.log" 2>&1; then
  note "BUILD FAILED (tail of $OUT/build.log):"
  tail -40 "$OUT/build.log"
  exit 1
fi
grep -E "anisodiff:" "$OUT/build.log" | head -5
"$PY" - >"$OUT/build_info.json" <<'EOF'
import json, torch
import anisodiff as ad
info = ad.build_info()
info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
info["torch_cuda"] = torch.version.cuda
if info.get("cuda") and torch.cuda.is_available():
    plan = ad._ext._C.cuda_plan
    info["plans"] = {f"{B}x{C}x{H}x{W}": plan(B, C, H, W, True, 1, False, 0)
                     for B, C, H, W in [(64, 3, 32, 32), (64, 4, 64, 64), (16, 4, 128, 128), (8, 3, 256, 256)]}
print(json.dumps(info, indent=2, default=str))
EOF
cat "$OUT/build_info.json"
if ! "$PY" -c "import anisodiff as ad, sys; sys.exit(0 if ad.build_info()['cuda'] else 1)"; then
  note "anisodiff was built without CUDA ops"
  exit 1
fi

# --- tests --------------------------------------------------------------------------------------
note "tests/test_cuda.py"
if ! timeout "$(limit "${T_CUDA:-200}" 150)" "$PY" -m pytest tests/test_cuda.py -q -rfEs --durations=10 -p no:cacheprovider \
      >"$OUT/test_cuda.log" 2>&1; then
  status=1
  note "CUDA TESTS FAILED (or timed out)"
fi
tail -25 "$OUT/test_cuda.log"

note "compute-sanitizer memcheck on a subset"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SAN" ]; then
  MEMCHECK_K="(test_two_pass_path_matches_cpu and 2x3x7x9) or (test_memory_layouts and misaligned)"
  MEMCHECK_K+=" or (test_axes_count and 20-2-hdm) or (test_prime_and_mixed_radix_planes and 2x3x61x67)"
  MEMCHECK_K+=" or (test_ddpm_step_matches_cpu and two_indep_ps and official and True and 999)"
  # No caching allocator: every allocation is exact, so an out-of-bounds access is caught.
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit "${T_SAN:-120}" 120)" "$SAN" --tool memcheck --error-exitcode 7 \
        "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
        -k "$MEMCHECK_K" \
        >"$OUT/sanitizer.log" 2>&1; then
    status=1
    note "SANITIZER REPORTED ERRORS (or timed out)"
  fi
  # Shared-memory hazards of the fused and two-pass kernels (racecheck is slow: two small cases).
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit "${T_SAN:-120}" 90)" "$SAN" --tool racecheck --error-exitcode 7 \
        "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
        -k "test_two_pass_path_matches_cpu and 2x3x7x9 and hdm or (test_normalisation_and_radius and two_indep and cycles and per_sample and auto)" \
        >>"$OUT/sanitizer.log" 2>&1; then
    status=1
    note "RACECHECK REPORTED HAZARDS (or timed out)"
  fi
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -8
else
  echo "compute-sanitizer not found" >"$OUT/sanitizer.log"
fi

if [ "${SUITE:-1}" = "1" ] && [ "$(left)" -gt 150 ]; then
  note "the rest of the suite"
  if ! timeout "$(limit "${T_SUITE:-600}" 90)" "$PY" -m pytest -q -x -p no:cacheprovider --ignore=tests/test_cuda.py \
        >"$OUT/suite.log" 2>&1; then
    status=1
    note "SUITE FAILED (or timed out)"
  fi
  tail -15 "$OUT/suite.log"
else
  echo "skipped (SUITE=${SUITE:-1}, $(left)s left)" >"$OUT/suite.log"
fi

# --- benchmark (runs even after test failures) ---------------------------------------------------
DEVNAME=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower())")
note "anisodiff bench --device cuda (${BENCH_ARGS:---quick})"
mkdir -p benchmarks/results
# shellcheck disable=SC2086
if timeout "$(limit "${T_BENCH:-300}" 5)" "$PY" -m anisodiff.cli bench --device cuda ${BENCH_ARGS:---quick} \
      --json "$OUT/bench-$DEVNAME.json" --plot "$OUT/bench-$DEVNAME.png" >"$OUT/bench.log" 2>&1; then
  cp "$OUT/bench-$DEVNAME.json" "benchmarks/results/$DEVNAME.json" 2>/dev/null || true
else
  note "benchmark failed or timed out (see $OUT/bench.log)"
fi
tail -30 "$OUT/bench.log"
note "done, status $status"
exit $status
