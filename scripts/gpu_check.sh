#!/usr/bin/env bash
# GPU check: build anisodiff with CUDA, run the CUDA correctness tests, then at once the benchmark of
# issue 3's goal cases, then (time permitting) a compute-sanitizer subset and the quick benchmark of
# every op; the rest of the test suite only on request. For a 16-core H100/H200 machine with a CUDA
# torch, nvcc, cmake, ninja, pybind11 and scikit-build-core preinstalled (no package index needed:
# pip installs only the wheels carried in .whl/). One command, at most BUDGET (480 s) end to end,
# build included:
#
#   OUT=/some/dir bash scripts/gpu_check.sh [--dry-run] [--suite] [--no-optional] [--budget S]
#
# Everything lands in $OUT (default /tmp/anisodiff-gpu-check) while it is produced, also when a stage
# fails or the run is killed (each stage's log is written as it runs; summary.txt gets a line per
# stage as the stage ends, and a last line on exit or on SIGTERM / SIGINT):
#   summary.txt         stages (status, seconds), the goal verdicts, the final status
#   build.log, build_info.json (anisodiff.build_info(), GPU, torch CUDA, git commit, cuda_plan of goal cases)
#   test_cuda.log       tests/test_cuda.py
#   bench-goals-<shape>.log, bench-goals-<shape>-<gpu>.json   `anisodiff bench` of the goal cases, one run
#                       per shape (a killed run loses one shape, not all) (add_noise, B=64, 3x32x32 4x64x64 3x256x256, fp32 and bf16, every kind, no torch.compile)
#   goals.txt, goals.json   the goal verdicts of that run (from its JSON; from its log if it was killed)
#   model_vs_measured.txt/.json   those cases beside benchmarks/results/model-sm90.json's predictions
#   sanitizer.log       compute-sanitizer memcheck on a subset (optional stage)
#   racecheck.log       compute-sanitizer racecheck on two cases (optional; only with >= 150 s left)
#   bench.log, bench-<gpu>.json/png   `anisodiff bench --device cuda --quick` (optional stage)
#   suite.log           the rest of the suite (only with --suite or SUITE=1)
# --dry-run: the whole flow on a machine without a GPU (tests/test_gpu_check.py): no build and no GPU
# stage, but every file above is written (logs say what would run), build_info.json comes from the
# installed package, and the benchmark's flags are checked against `anisodiff bench --help`.
# Carried wheels (the GPU image has torch, triton, pytest, hypothesis, matplotlib, no diffusers): before
# the run, `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
# importlib_metadata`, and carry [".whl"]; the script installs .whl/*.whl into /tmp/site first.
# Exit status: 0 when every stage that ran passed; 1 when the build or a test failed; 2 for a bad
# argument. The benchmarks run even after test failures.
# Environment: PYTHON (python3), CUDA_ARCHS (90), BUDGET (480), SUITE=1 (= --suite), OPTIONAL=0
# (= --no-optional), GOAL_ARGS (the goal benchmark's selection, see below), BENCH_ARGS (--quick),
# stage limits T_BUILD / T_CUDA / T_GOALS / T_SAN / T_RACE / T_BENCH / T_SUITE (s; each stage also leaves the
# time the stages after it need).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
SUITE=${SUITE:-0}
OPTIONAL=${OPTIONAL:-1}
BUDGET=${BUDGET:-480}
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --suite) SUITE=1 ;;
    --no-optional) OPTIONAL=0 ;;
    --budget) shift; BUDGET=${1:-}; [[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs seconds" >&2; exit 2; } ;;
    --budget=*) BUDGET=${1#--budget=}; [[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs seconds" >&2; exit 2; } ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-/tmp/anisodiff-gpu-check}
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
START=$(date +%s)
status=0
STAGE=start
SUMMARY="$OUT/summary.txt"
GOAL_ARGS=${GOAL_ARGS:---ops add_noise --batch 64 --dtypes fp32 bf16 --no-compile --repeats 7 --min-repeats 3 --block-ms 2 --group-s 0.1 --max-group-s 0.5 --warmup 0.005 --copy-mib 1024}
GOAL_SHAPES=${GOAL_SHAPES:-3x32x32 4x64x64 3x256x256}  # spectral goal shapes first; 3x256x256: >= 32 MB per tensor
BENCH_ARGS=${BENCH_ARGS:---quick}
elapsed() { echo $(($(date +%s) - START)); }
note() { echo "[gpu_check $(elapsed)s] $*"; }
left() { echo $((BUDGET - $(elapsed))); }
# limit DEFAULT RESERVE: a stage's time limit, never eating into the RESERVE kept for later stages.
limit() { local l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo "$l"; }
record() { echo "$*" >>"$SUMMARY"; }  # one line of summary.txt, written at once

finish() {  # the last line of summary.txt (EXIT trap; also after a signal)
  local why=$1
  [ -n "${FINISHED:-}" ] && return
  FINISHED=1
  record "final: $why, status $status, $(elapsed) s of a ${BUDGET} s budget$([ "$DRY" = 1 ] && echo ' (dry run)')"
}
on_signal() {
  status=143
  record "stage $STAGE: KILLED after $(elapsed) s (signal)"
  [ -n "${CHILD:-}" ] && kill -TERM "$CHILD" 2>/dev/null
  finish "killed during $STAGE"
  exit 143
}
trap on_signal TERM INT HUP
trap 'finish "exited"' EXIT

# run_stage NAME LOG LIMIT CMD...: runs CMD under `timeout LIMIT`, output to LOG (as it is produced),
# a summary line when it ends; returns CMD's status. In a dry run it only writes what it would run.
run_stage() {
  local name=$1 log=$2 lim=$3 t0 rc; shift 3
  STAGE=$name
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    { echo "DRY RUN: stage $name would run (limit ${lim}s):"; printf ' %q' "$@"; echo; } >"$log"
    if [ "${DRY_SLEEP:-0}" != 0 ]; then  # the tests' stand-in for a stage's work (to kill it midway)
      sleep "$DRY_SLEEP" & CHILD=$!; wait "$CHILD"; CHILD=
    fi
    record "stage $name: dry-run (limit ${lim}s)"
    return 0
  fi
  note "$name (limit ${lim}s) -> $log"
  timeout -k 10 "$lim" "$@" >"$log" 2>&1 &
  CHILD=$!
  wait "$CHILD"; rc=$?
  CHILD=
  local verdict=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && verdict="TIMED OUT"
  [ "$rc" != 0 ] && [ "$verdict" = ok ] && verdict="FAILED (rc $rc)"
  record "stage $name: $verdict, $(( $(date +%s) - t0 )) s"
  return "$rc"
}
skip_stage() {  # skip_stage NAME LOG WHY
  echo "skipped: $3" >"$2"
  record "stage $1: skipped ($3)"
}

: >"$SUMMARY"
record "anisodiff gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) host $(hostname) args: budget=${BUDGET} suite=${SUITE} optional=${OPTIONAL} dry_run=${DRY}"
record "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ -n "$(git status --porcelain 2>/dev/null | head -1)" ] && echo ' (+ uncommitted changes)')"
record "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
export PYTHONUNBUFFERED=1

# --- carried wheels (the GPU image has no package index: diffusers travels as .whl/*.whl) --------
if ls .whl/*.whl >/dev/null 2>&1; then
  if run_stage wheels "$OUT/wheels.log" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# --- build --------------------------------------------------------------------------------------
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break; done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # torch's CMake config adds these -gencode flags
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# the build may use what is left once the CUDA tests (60 s) and the goal benchmark (120 s) are kept
if ! run_stage build "$OUT/build.log" "$(limit "${T_BUILD:-240}" 180)" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
    -Ccmake.define.ANISODIFF_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}"; then
  status=1
  note "BUILD FAILED (tail of $OUT/build.log):"
  tail -40 "$OUT/build.log"
  exit 1
fi
STAGE=build_info
DRY=$DRY "$PY" - >"$OUT/build_info.json" 2>>"$OUT/build.log" <<'EOF'
import json, os, subprocess
import torch
import anisodiff as ad
info = ad.build_info()
info["dry_run"] = os.environ.get("DRY") == "1"
info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
info["torch_cuda"] = torch.version.cuda
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    info["commit"] = None
if info.get("cuda") and torch.cuda.is_available():
    try:  # the planner's choice for the goal shapes (its signature may change: never fail the run here)
        plan = ad._ext._C.cuda_plan
        info["plans"] = {f"{B}x{C}x{H}x{W}": plan(B, C, H, W, True, 1, False, 0)
                         for B, C, H, W in [(64, 3, 32, 32), (64, 4, 64, 64), (16, 4, 128, 128), (8, 3, 256, 256)]}
    except Exception as exc:  # noqa: BLE001
        info["plans"] = f"cuda_plan failed: {type(exc).__name__}: {exc}"
print(json.dumps(info, indent=2, default=str))
EOF
record "build_info: $OUT/build_info.json"
grep -E "anisodiff:" "$OUT/build.log" | head -5
if [ "$DRY" = 0 ] && ! "$PY" -c "import anisodiff as ad, sys; sys.exit(0 if ad.build_info()['cuda'] else 1)"; then
  status=1
  record "stage build: anisodiff was built WITHOUT the CUDA ops"
  note "anisodiff was built without CUDA ops"
  exit 1
fi
DEVNAME=gpu
if [ "$DRY" = 0 ]; then
  DEVNAME=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower())" 2>/dev/null || echo gpu)
fi

# --- CUDA correctness ---------------------------------------------------------------------------
if ! run_stage test_cuda "$OUT/test_cuda.log" "$(limit "${T_CUDA:-150}" 120)" \
    "$PY" -m pytest tests/test_cuda.py -q -rfEs --durations=10 -p no:cacheprovider; then
  status=1
  note "CUDA TESTS FAILED (or timed out)"
fi
[ "$DRY" = 0 ] && tail -15 "$OUT/test_cuda.log"

# --- the goal benchmark: right after the correctness tests, before anything optional --------------
n_shapes=$(wc -w <<<"$GOAL_SHAPES")
i=0
for shape in $GOAL_SHAPES; do
  i=$((i + 1))
  # this shape's share of what is left of T_GOALS (180 s in all), keeping 10 s for the rest
  share=$(( (${T_GOALS:-180} - ($(date +%s) - ${GOALS_T0:=$(date +%s)})) / (n_shapes - i + 1) ))
  [ "$share" -lt 20 ] && share=20
  # shellcheck disable=SC2086
  run_stage "bench_goals_$shape" "$OUT/bench-goals-$shape.log" "$(limit "$share" 10)" \
    "$PY" -m anisodiff.cli bench --device cuda $GOAL_ARGS --shapes "$shape" --json "$OUT/bench-goals-$shape-$DEVNAME.json" \
    --no-plot || note "goal benchmark $shape failed or timed out (see $OUT/bench-goals-$shape.log)"
done
if [ "$DRY" = 1 ]; then  # the benchmark's flags must exist: check them against its --help
  # shellcheck disable=SC2086
  flags=$(printf '%s\n' $GOAL_ARGS $BENCH_ARGS --device --json --no-plot --plot --shapes | grep -E '^--' | sort -u)
  if ! help=$("$PY" -m anisodiff.cli bench --help 2>&1); then
    status=1
    record "dry-run: 'anisodiff bench --help' FAILED: $(tail -1 <<<"$help")"
  else
    missing=0
    for f in $flags; do
      grep -qE -- "(^|[][ ])${f}([][ =,]|$)" <<<"$help" || { status=1; missing=1; record "dry-run: anisodiff bench has NO flag $f"; }
    done
    record "dry-run: $(wc -w <<<"$flags") benchmark flags checked against anisodiff bench --help: $([ $missing = 0 ] && echo ok || echo MISSING)"
  fi
fi
STAGE=goals
"$PY" - "$OUT" "$DEVNAME" "$OUT/goals.json" $GOAL_SHAPES >"$OUT/goals.txt" 2>&1 <<'EOF'
# The goal verdicts of the goal benchmark, from its JSONs (backend_goals, every shape's run), or from
# its logs when no JSON was written (killed runs): plain json, no anisodiff import (the bench modules
# may move).
import json, pathlib, sys
outdir, dev, out, shapes = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4:]
jsons = [outdir / f"bench-goals-{s}-{dev}.json" for s in shapes]
logs = [outdir / f"bench-goals-{s}.log" for s in shapes]
record = {"source": None, "goals": [], "lines": [], "missing": [str(j) for j in jsons if not j.exists()]}
if any(j.exists() for j in jsons):
    record["source"] = ", ".join(str(j) for j in jsons if j.exists())
    goals = [g for j in jsons if j.exists() for g in json.loads(j.read_text()).get("backend_goals", [])]
    by = {}
    for g in goals:
        by.setdefault(g["goal"], []).append(g)
    for name, gs in by.items():
        met = sum(bool(g["met"]) for g in gs)
        worst = (max if name == "triton_within_cuda" else min)(gs, key=lambda g: g["value"])
        line = (f"{name}: met in {met} of {len(gs)} cases -> {'MET' if met == len(gs) else 'NOT MET'}; worst "
                f"{worst['value']:.2f} (target {worst['target']:g}) at {worst['kind']} B={worst['B']} "
                f"{worst['C']}x{worst['H']}x{worst['W']} {worst['dtype']}")
        record["goals"].append({"goal": name, "met": met, "cases": len(gs), "worst": worst})
        record["lines"].append(line)
    if not goals:
        record["lines"].append("no goal lines in the benchmark JSON (no CUDA backend timed?)")
    if record["missing"]:
        record["lines"].append(f"NO JSON (failed or killed): {', '.join(record['missing'])}")
elif any(l.exists() and "DRY RUN" not in l.read_text() for l in logs):
    record["source"] = ", ".join(str(l) for l in logs if l.exists()) + " (no JSON: the benchmark failed or was killed)"
    record["lines"] = [x.strip() for l in logs if l.exists() for x in l.read_text().splitlines()
                       if " goal " in x or "goal (" in x]
    if not record["lines"]:
        record["lines"].append("no goal verdicts: the benchmark wrote no JSON and no goal lines")
else:
    record["source"] = "dry run: no benchmark ran"
    record["lines"].append("dry run: no verdicts (the benchmark did not run)")
out.write_text(json.dumps(record, indent=2, default=str))
print(f"goal verdicts (source: {record['source']}):")
print("\n".join("  " + l for l in record["lines"]))
EOF
cat "$OUT/goals.txt"
sed 's/^/  /' "$OUT/goals.txt" >>"$SUMMARY"
# the goal cases beside the static model's predictions (docs/cuda.md: say why where they differ > 1.5x)
STAGE=model_vs_measured
"$PY" scripts/model_vs_measured.py benchmarks/results/model-sm90.json "$OUT"/bench-goals-*-"$DEVNAME".json \
  --json "$OUT/model_vs_measured.json" >"$OUT/model_vs_measured.txt" 2>&1 \
  || echo "model_vs_measured.py failed (see above)" >>"$OUT/model_vs_measured.txt"
tail -1 "$OUT/model_vs_measured.txt" | sed 's/^ */model vs measured: /' >>"$SUMMARY"

# --- optional stages, while the budget lasts -----------------------------------------------------
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
MEMCHECK_K="(test_two_pass_path_matches_cpu and 2x3x7x9) or (test_memory_layouts and misaligned)"
MEMCHECK_K+=" or (test_prime_and_mixed_radix_planes and 2x3x61x67)"
MEMCHECK_K+=" or (test_ddpm_step_matches_cpu and two_indep_ps and official and True and 999)"
if [ "$OPTIONAL" != 1 ]; then
  skip_stage sanitizer "$OUT/sanitizer.log" "--no-optional"
elif [ "$DRY" = 0 ] && [ ! -x "$SAN" ]; then
  skip_stage sanitizer "$OUT/sanitizer.log" "compute-sanitizer not found"
elif [ "$(left)" -lt 75 ]; then
  skip_stage sanitizer "$OUT/sanitizer.log" "$(left) s left"
else
  # No caching allocator: every allocation is exact, so an out-of-bounds access is caught.
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitizer "$OUT/sanitizer.log" "$(limit "${T_SAN:-90}" 5)" \
      "$SAN" --tool memcheck --error-exitcode 7 "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
      -k "$MEMCHECK_K"; then
    status=1
    note "SANITIZER REPORTED ERRORS (or timed out)"
  fi
fi

# Shared-memory / DSMEM hazards of the fused (cluster) and two-pass kernels: racecheck is slow, two cases.
RACE_K="(test_two_pass_path_matches_cpu and 2x3x7x9 and hdm) or (test_normalisation_and_radius and two_indep and cycles and per_sample and auto)"
if [ "$OPTIONAL" != 1 ]; then
  skip_stage racecheck "$OUT/racecheck.log" "--no-optional"
elif [ "$DRY" = 0 ] && [ ! -x "$SAN" ]; then
  skip_stage racecheck "$OUT/racecheck.log" "compute-sanitizer not found"
elif [ "$(left)" -lt 150 ]; then
  skip_stage racecheck "$OUT/racecheck.log" "$(left) s left"
else
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage racecheck "$OUT/racecheck.log" "$(limit "${T_RACE:-60}" 90)" \
      "$SAN" --tool racecheck --error-exitcode 7 "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
      -k "$RACE_K"; then
    status=1
    note "RACECHECK REPORTED HAZARDS (or timed out)"
  fi
fi

if [ "$OPTIONAL" != 1 ]; then
  skip_stage bench "$OUT/bench.log" "--no-optional"
elif [ "$(left)" -lt 90 ]; then
  skip_stage bench "$OUT/bench.log" "$(left) s left"
else
  # shellcheck disable=SC2086
  run_stage bench "$OUT/bench.log" "$(limit "${T_BENCH:-300}" 5)" \
    "$PY" -m anisodiff.cli bench --device cuda $BENCH_ARGS \
    --json "$OUT/bench-$DEVNAME.json" --plot "$OUT/bench-$DEVNAME.png" \
    || note "benchmark failed or timed out (see $OUT/bench.log)"
  grep -E "goal" "$OUT/bench.log" | sed 's/^/  bench: /' >>"$SUMMARY"
fi

if [ "$SUITE" != 1 ]; then
  skip_stage suite "$OUT/suite.log" "opt-in: --suite or SUITE=1"
elif [ "$(left)" -lt 60 ]; then
  skip_stage suite "$OUT/suite.log" "$(left) s left"
else
  if ! run_stage suite "$OUT/suite.log" "$(limit "${T_SUITE:-600}" 5)" \
      "$PY" -m pytest -q -x -p no:cacheprovider --ignore=tests/test_cuda.py; then
    status=1
    note "SUITE FAILED (or timed out)"
  fi
fi
STAGE=done
note "done, status $status (summary: $SUMMARY)"
cat "$SUMMARY"
exit $status
