"""`anisodiff bench`: the CI smoke test of the benchmark command (no timing assertions).

One in-process ``anisodiff bench --smoke`` run (a tiny case of every op, spec kind and dtype; a few
seconds) is checked for its JSON schema (machine info, command, every case with median / IQR / GB/s /
% of the copy bandwidth / speed-ups, a positive copy bandwidth), its arithmetic (GB/s recomputed
here from the op's traffic floor and the reported median, so a unit slip fails), its table and its
picture. The presets (--quick, the full matrix) are checked without running them.
"""
import contextlib
import importlib.util
import io
import json
import math
import pathlib
import sys

import pytest
import torch

from anisodiff import bench, cli
from conftest import requires_compiled

pytestmark = requires_compiled

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("add_noise", "shaped_noise")
KINDS = ("iso", "sdm", "hdm", "powerlaw", "band", "sdm_powerlaw")
ITEMSIZE = {"fp32": 4, "bf16": 2}
TENSORS = {"add_noise": 3, "shaped_noise": 1}   # read x0 + write x_t + write target; write noise


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `anisodiff bench --smoke` run: (exit code, stdout, report, png path or None)."""
    d = tmp_path_factory.mktemp("bench")
    png = d / "bench.png"
    argv = ["bench", "--smoke", "--json", str(d / "bench.json")]
    argv += ["--plot", str(png)] if HAVE_MATPLOTLIB else ["--no-plot"]
    code, out, _ = _main(argv)
    report = json.loads((d / "bench.json").read_text())
    return code, out, report, (png if HAVE_MATPLOTLIB else None)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_runs_and_records_machine_and_command(smoke):
    code, _, report, _ = smoke
    assert code == 0
    assert report["format"] == "anisodiff-bench" and report["version"] == 1
    assert report["device"] == "cpu"
    assert report["command"].startswith("anisodiff bench") and "--smoke" in report["command"]
    m = report["machine"]
    for key in ("cpu_model", "logical_cpus", "torch_version", "torch_num_threads",
                "anisodiff_version", "anisodiff_build_info", "python", "platform"):
        assert key in m, key
    assert m["torch_version"] == torch.__version__
    assert m["anisodiff_build_info"]["cpu"] is True
    assert report["settings"]["mode"] == "smoke"
    assert report["settings"]["threads"] >= 1
    assert report["timestamp"] and _finite_positive(report["elapsed_s"])


def test_copy_bandwidth_is_measured(smoke):
    cp = smoke[2]["copy_bandwidth"]
    assert _finite_positive(cp["GBps"])
    assert len(cp["samples_GBps"]) == cp["repeats"] >= 2
    assert all(_finite_positive(x) for x in cp["samples_GBps"])
    assert min(cp["samples_GBps"]) <= cp["GBps"] <= max(cp["samples_GBps"])
    assert cp["bytes_per_copy"] == 2 * cp["buffer_bytes"] > 0


def test_every_case_is_there_with_its_numbers(smoke):
    report = smoke[2]
    cases = report["cases"]
    keys = {(c["op"], c["kind"], c["dtype"]) for c in cases}
    assert keys == {(op, k, dt) for op in OPS for k in KINDS for dt in ("fp32", "bf16")}
    assert len(cases) == len(keys)
    for c in cases:
        for key in ("median_ms", "iqr_ms", "gbps", "pct_copy_bw", "floor_ms"):
            assert isinstance(c[key], float) and math.isfinite(c[key]), (key, c)
        assert _finite_positive(c["median_ms"]) and c["iqr_ms"] >= 0
        assert _finite_positive(c["gbps"]) and _finite_positive(c["pct_copy_bw"])
        assert c["fused_impl"] == "anisodiff_cpu"
        # speed-ups over every baseline of the case; the floor always runs, the eager code too
        # (except for white shaped_noise, where it is torch.randn: the floor itself)
        assert "isotropic_floor" in c["speedups"]
        assert ("eager_vectorised" in c["speedups"]) == ((c["op"], c["kind"]) != ("shaped_noise", "iso"))
        assert all(_finite_positive(x) for x in c["speedups"].values())
        assert c["fastest_baseline"] in c["speedups"]
        assert c["speedup_vs_fastest"] == pytest.approx(
            min(x for k, x in c["speedups"].items() if bench.same_operator(k, c["kind"])))
        assert c["overhead_vs_floor_ms"] == pytest.approx(c["median_ms"] - c["floor_ms"])
        if c["op"] == "add_noise" and c["kind"] in ("sdm", "hdm"):
            assert "official_sdm" in c["speedups"]
        if c["op"] == "add_noise" and c["kind"] in ("powerlaw", "band", "sdm_powerlaw"):
            assert {"sagd_appendix", "eager_rfft"} <= set(c["speedups"])


def test_gbps_is_bytes_over_the_reported_median(smoke):
    """Recomputed here from the shape, the dtype and the op's traffic floor: a unit mistake (ms vs
    s, GiB vs GB, bits vs bytes, the wrong tensor count) fails."""
    report = smoke[2]
    copy = report["copy_bandwidth"]["GBps"]
    for r in report["results"]:
        nbytes = TENSORS[r["op"]] * r["B"] * r["C"] * r["H"] * r["W"] * ITEMSIZE[r["dtype"]]
        assert r["bytes"] == nbytes, r
        assert r["gbps"] == pytest.approx(nbytes / (r["median_ms"] / 1e3) / 1e9, rel=1e-9), r
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / copy, rel=1e-9), r
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["iqr_ms"] == pytest.approx(r["q3_ms"] - r["q1_ms"])
        assert r["repeats"] >= 1 and r["calls_per_block"] >= 1
    for c in report["cases"]:
        rows = [r for r in report["results"] if (r["op"], r["kind"], r["B"], r["dtype"])
                == (c["op"], c["kind"], c["B"], c["dtype"])]
        fused = next(r for r in rows if r["fused"])
        assert fused["median_ms"] == c["median_ms"] and fused["gbps"] == c["gbps"]
        for r in rows:
            if not r["fused"]:
                assert c["speedups"][r["impl"]] == pytest.approx(r["median_ms"] / fused["median_ms"])
                assert r["speedup_vs_fused"] == pytest.approx(c["speedups"][r["impl"]])


def test_prints_a_table_line_per_case(smoke):
    out, report = smoke[1], smoke[2]
    assert "copy bandwidth" in out and "GB/s" in out and "%copy" in out
    for c in report["cases"]:
        assert any(line.startswith(f"{c['op']:<13}{c['kind']:<13}") and f" {c['dtype']} " in line
                   for line in out.splitlines()), c


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_writes_a_valid_png(smoke):
    import matplotlib.image

    png = smoke[3]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert 600 <= width <= 4000 and 400 <= height <= 4000


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_a_clear_error(tmp_path):
    code, out, err = _main(["bench", "--device", "cuda", "--smoke", "--json", str(tmp_path / "x.json"),
                            "--no-plot"])
    assert code == 2
    assert "no CUDA device" in err
    assert not (tmp_path / "x.json").exists()


def test_bad_options_fail_before_timing(tmp_path):
    code, _, err = _main(["bench", "--smoke", "--json", str(tmp_path / "missing" / "x.json")])
    assert code == 2 and "does not exist" in err
    code, _, err = _main(["bench", "--smoke", "--given-noise", "--ops", "shaped_noise",
                          "--json", str(tmp_path / "x.json"), "--no-plot"])
    assert code == 2 and "--given-noise" in err
    code, _, _ = _main(["bench", "--shapes", "3x32"])
    assert code == 2


def _settings(argv):
    return bench.resolve_settings(cli.build_parser().parse_args(["bench", *argv]))


def test_presets_cover_the_matrix():
    full = _settings([])
    assert full["batch"] == [1, 16, 128, 512]
    assert full["shapes"] == [(3, 32, 32), (3, 64, 64), (4, 64, 64)]
    assert full["dtypes"] == ["fp32", "bf16"] and full["ops"] == list(OPS)
    assert full["kinds"] == list(KINDS) and full["compile"] is True
    quick = _settings(["--quick"])
    assert quick["batch"] == [64] and quick["shapes"] == [(3, 32, 32)]
    assert quick["kinds"] == list(KINDS) and quick["ops"] == list(OPS)
    assert quick["compile"] is False
    custom = _settings(["--quick", "--batch", "8", "--size", "16", "--kinds", "sdm+powerlaw"])
    assert custom["batch"] == [8] and custom["shapes"] == [(3, 16, 16)]
    assert custom["kinds"] == ["sdm_powerlaw"]


def test_run_cpu_script_wraps_the_same_driver(tmp_path):
    """benchmarks/run_cpu.py is a thin wrapper: same options, same JSON."""
    spec = importlib.util.spec_from_file_location("anisodiff_run_cpu", ROOT / "benchmarks" / "run_cpu.py")
    run_cpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run_cpu
    spec.loader.exec_module(run_cpu)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = run_cpu.main(["--smoke", "--kinds", "sdm", "--dtypes", "fp32", "--json",
                             str(tmp_path / "r.json"), "--no-plot"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(c["op"], c["kind"]) for c in report["cases"]] == [(op, "sdm") for op in OPS]
    assert "run_cpu.py" in report["command"]
