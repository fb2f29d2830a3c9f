"""scripts/gpu_check.sh --dry-run: the GPU check's whole flow on a machine without a GPU (argument
handling, every file it writes to $OUT, the summary with the goal verdicts, the kill path)."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
FILES = ["summary.txt", "build.log", "build_info.json", "test_cuda.log", "bench-goals-3x32x32.log",
         "bench-goals-4x64x64.log", "bench-goals-3x256x256.log", "goals.txt",
         "goals.json", "model_vs_measured.txt", "model_vs_measured.json", "sanitizer.log", "racecheck.log",
         "bench.log", "suite.log"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _env(out, **extra):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **extra)
    env.pop("SUITE", None)
    env.pop("BUDGET", None)
    return env


def _run(args, out, timeout=120, **extra):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=_env(out, **extra), capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_writes_every_file_and_the_verdict_summary(tmp_path):
    out = tmp_path / "out"
    r = _run(["--dry-run", "--suite", "--budget", "300"], out)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in FILES:
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    # the goal benchmark comes right after the CUDA tests, before the optional stages
    order = [summary.index(f"stage {s}:") for s in ("build", "test_cuda", "bench_goals_3x32x32", "bench_goals_3x256x256",
                                                    "sanitizer", "racecheck",
                                                    "bench", "suite")]
    assert order == sorted(order), summary
    assert "goal verdicts" in summary
    assert "benchmark flags checked against anisodiff bench --help: ok" in summary
    assert "final: exited, status 0" in summary and "budget=300" in summary
    info = json.loads((out / "build_info.json").read_text())
    assert info["dry_run"] is True and "cuda" in info
    goals = json.loads((out / "goals.json").read_text())
    assert goals["lines"] and "dry run" in goals["source"]
    assert "DRY RUN" in (out / "test_cuda.log").read_text()
    assert "anisodiff.cli bench --device cuda" in (out / "bench-goals-4x64x64.log").read_text()
    assert "DRY RUN" in (out / "suite.log").read_text()  # --suite: the opt-in stage is on


def test_the_full_suite_is_opt_in(tmp_path):
    r = _run(["--dry-run", "--no-optional"], tmp_path)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # (1: the bench CLI check, tested above)
    assert (tmp_path / "suite.log").read_text().startswith("skipped: opt-in")
    assert (tmp_path / "sanitizer.log").read_text().startswith("skipped: --no-optional")
    assert "stage bench: skipped" in (tmp_path / "summary.txt").read_text()


def test_goal_summary_from_a_benchmark_json(tmp_path):
    """The verdict summariser reads backend_goals of the goal benchmark's JSON (plain json)."""
    script = SCRIPT.read_text()
    body = script.split("<<'EOF'\n# The goal verdicts")[1].split("\nEOF\n")[0]
    goal = {"goal": "cuda_spectral_pct_copy", "kind": "powerlaw", "B": 64, "C": 3, "H": 32, "W": 32,
            "dtype": "fp32", "target": 60.0}
    (tmp_path / "bench-goals-3x32x32-h200.json").write_text(json.dumps({"backend_goals": [
        {**goal, "value": 71.0, "met": True}, {**goal, "value": 42.5, "met": False, "dtype": "bf16"}]}))
    (tmp_path / "bench-goals-4x64x64.log").write_text("killed mid-run\n")
    r = subprocess.run([sys.executable, "-c", "# The goal verdicts" + body, str(tmp_path), "h200",
                        str(tmp_path / "g.json"), "3x32x32", "4x64x64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cuda_spectral_pct_copy: met in 1 of 2 cases -> NOT MET; worst 42.50" in r.stdout
    assert "bf16" in r.stdout and "NO JSON (failed or killed)" in r.stdout and "4x64x64-h200.json" in r.stdout
    assert json.loads((tmp_path / "g.json").read_text())["goals"][0]["met"] == 1


@pytest.mark.parametrize("args", [["--bogus"], ["--budget", "soon"], ["--budget"]])
def test_bad_arguments(tmp_path, args):
    r = _run(args, tmp_path)
    assert r.returncode == 2 and "gpu_check:" in r.stderr


def test_help(tmp_path):
    r = _run(["--help"], tmp_path)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "summary.txt" in r.stdout


def test_killed_run_keeps_its_files(tmp_path):
    """SIGTERM in the middle of a stage: what was produced stays, and summary.txt says where it died."""
    p = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=_env(tmp_path, DRY_SLEEP="30"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "build.log").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
    finally:
        if p.poll() is None:
            p.kill()
    summary = (tmp_path / "summary.txt").read_text()
    assert "stage build: KILLED" in summary and "final: killed during build" in summary
    assert (tmp_path / "build.log").is_file()
