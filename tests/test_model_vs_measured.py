"""scripts/model_vs_measured.py: a benchmark's CUDA add_noise cases beside the performance model's
predictions for the same case, the ratio, and the 1.5x flag."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("model_vs_measured", REPO / "scripts" / "model_vs_measured.py")
mvm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mvm)

MODEL = {"source": {"commit": "abc1234"}, "cases": [
    {"kind": "squeeze+spectral", "B": 64, "C": 4, "H": 64, "W": 64, "dtype": "fp32",
     "cuda": {"predicted_pct_copy_call": 40.0, "predicted_pct_copy_gpu": 50.0, "predicted_call_us": 7.0,
              "launches": [{"kernel": "fused_spectral_pow2<...>"}]}},
    {"kind": "squeeze", "B": 64, "C": 4, "H": 64, "W": 64, "dtype": "bf16",
     "cuda": {"predicted_pct_copy_call": 20.0, "predicted_pct_copy_gpu": 47.7, "launches": []}}]}


def bench(cases):
    return {"device": "cuda", "machine": {"gpu": {"name": "NVIDIA H200"}}, "cases": cases}


def case(kind, dtype, pct, B=64, C=4, H=64, W=64, op="add_noise", backend="cuda"):
    return {"op": op, "kind": kind, "B": B, "C": C, "H": H, "W": W, "dtype": dtype,
            "backends": {backend: {"median_ms": 0.1, "pct_copy_bw": pct}}}


def test_rows_ratios_and_flags():
    rows = mvm.compare(MODEL, [bench([case("sdm_powerlaw", "fp32", 44.0), case("sdm", "bf16", 9.0),
                                      case("sdm", "fp32", 30.0, H=256, W=256),
                                      case("band", "fp32", 10.0), case("sdm", "bf16", 5.0, op="q_sample"),
                                      case("sdm", "bf16", 5.0, backend="triton")])])
    assert [(r["kind"], r["dtype"], r["H"]) for r in rows] == [("squeeze+spectral", "fp32", 64), ("squeeze", "bf16", 64),
                                                               ("squeeze", "fp32", 256)]
    spec, sq, other = rows
    assert spec["ratio"] == pytest.approx(1.1) and not spec["differs"] and spec["device"] == "NVIDIA H200"
    assert sq["ratio"] == pytest.approx(0.45) and sq["differs"]  # measured under half the prediction
    assert "no model case" in other["note"] and "ratio" not in other
    text = mvm.format_rows(rows, MODEL)
    assert "abc1234" in text and "DIFFERS by more than 1.5x" in text and "1 of 2 compared cases" in text


def test_command_line_without_measurements_writes_its_files(tmp_path):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(MODEL))
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "model_vs_measured.py"), str(model),
                        str(tmp_path / "missing.json"), "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "no CUDA add_noise measurements" in r.stdout
    assert json.loads(out.read_text())["rows"] == []
    # a truncated JSON (a killed run) is reported and the readable ones still compared
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text('{"cases": [')
    good.write_text(json.dumps(bench([case("sdm_powerlaw", "fp32", 44.0)])))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "model_vs_measured.py"), str(model), str(bad),
                        str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "not read:" in r.stdout and "bad.json" in r.stdout and "1.10" in r.stdout


def test_a_prediction_without_its_gpu_share_still_formats():
    model = {"cases": [{**MODEL["cases"][0], "cuda": {**MODEL["cases"][0]["cuda"], "predicted_pct_copy_gpu": None}}]}
    rows = mvm.compare(model, [bench([case("sdm_powerlaw", "fp32", 44.0)])])
    assert " - " in mvm.format_rows(rows, model)


def test_the_committed_model_has_the_goal_benchmarks_cases():
    """gpu_check.sh's goal benchmark (B = 64, 3x32x32 and 4x64x64, fp32 / bf16) finds its predictions."""
    model = json.loads((REPO / "benchmarks" / "results" / "model-sm90.json").read_text())
    idx = mvm.model_index(model)
    for kind in mvm.KIND_MAP.values():
        for shape in ((3, 32, 32), (4, 64, 64)):
            for dt in ("fp32", "bf16"):
                assert idx[(kind, 64, *shape, dt)]["cuda"]["predicted_pct_copy_call"] > 0
