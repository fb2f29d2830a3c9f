"""`anisodiff bench`: the CI smoke test of the benchmark command (no timing assertions).

One in-process ``anisodiff bench --smoke`` run (a tiny case of every op - add_noise, shaped_noise,
ddpm_step -, spec kind and dtype; a few seconds) is checked for its JSON schema (machine info, command, every case with median / IQR / GB/s /
% of the copy bandwidth / speed-ups, a positive copy bandwidth), its arithmetic (GB/s recomputed
here from the op's traffic floor and the reported median, so a unit slip fails), its table and its
picture. The presets (--quick, the full matrix, the CUDA ones) are checked without running them.
Several fused backends side by side are checked with "reference" standing in for a second fused
backend (this machine has one); the issue-4 verdicts on synthetic cases.

With diffusers, one ``anisodiff bench --smoke --suite train sampling`` run checks the train-step and
sampling sections (every variant ran, finite times, losses and samples, the goal entries) and the
noise of every train-step variant is checked for its distribution (variance along and across the
squeeze axis, x_t = sqrt(abar) x0 + sqrt(1 - abar) target).
"""
import contextlib
import importlib.util
import io
import json
import math
import pathlib
import random
import sys

import pytest
import torch

from anisodiff import bench, cli
from anisodiff.bench import baselines, cases, sampling_suite, train_suite
from anisodiff.bench import models as model_suites
from conftest import requires_compiled

pytestmark = requires_compiled

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="the train/sampling suites need diffusers")
ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("add_noise", "shaped_noise", "ddpm_step")
KINDS = ("iso", "sdm", "hdm", "powerlaw", "band", "sdm_powerlaw")
# the trainers' noise flags: add_noise only, each against its training-script baseline
TRAINER = {"offset": "kohya_offset", "offset_random": "kohya_offset_random",
           "pyramid": "kohya_pyramid", "perturb": "ddpm_input_perturbation", "flow": "flow_matching"}
ALL_KINDS = KINDS + tuple(TRAINER)
TIMED_TRAINER = tuple(k for k in TRAINER if cases.trainer_kind_pending(k) is None)
ITEMSIZE = {"fp32": 4, "bf16": 2}
# add_noise: read x0 + write x_t + write target; shaped_noise: write noise; ddpm_step: read x_t and
# the model output + write x_prev and x0_hat
TENSORS = {"add_noise": 3, "shaped_noise": 1, "ddpm_step": 4}


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
    assert report["format"] == "anisodiff-bench" and report["version"] == 2
    assert report["device"] == "cpu" and report["suites"] == ["ops"]
    assert "train_step" not in report and "sampling" not in report
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
    assert keys == ({(op, k, dt) for op in OPS for k in KINDS for dt in ("fp32", "bf16")}
                    | {("add_noise", k, dt) for k in TIMED_TRAINER for dt in ("fp32", "bf16")})
    assert len(cases) == len(keys)
    for c in (c for c in cases if c["kind"] in KINDS):
        for key in ("median_ms", "iqr_ms", "gbps", "pct_copy_bw", "floor_ms"):
            assert isinstance(c[key], float) and math.isfinite(c[key]), (key, c)
        assert _finite_positive(c["median_ms"]) and c["iqr_ms"] >= 0
        assert _finite_positive(c["gbps"]) and _finite_positive(c["pct_copy_bw"])
        assert c["fused_impl"] == "anisodiff_cpu"
        assert set(c["backends"]) == {"cpu"} and c["backend_ratios"] == {}
        assert c["backends"]["cpu"]["median_ms"] == c["median_ms"]
        assert c["backends"]["cpu"]["speedups"] == c["speedups"]
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
        if c["op"] == "ddpm_step" and c["kind"] in ("sdm", "hdm"):
            assert ("official_sdm" in c["speedups"]) == HAVE_DIFFUSERS  # the sampler step pattern
        if c["op"] == "add_noise" and c["kind"] in ("powerlaw", "band", "sdm_powerlaw"):
            assert {"sagd_appendix", "eager_rfft"} <= set(c["speedups"])


def test_trainer_flag_rows(smoke):
    """Each trainer flag (offset, random-strength offset, pyramid; input perturbation and flow
    matching where the build has them) is an add_noise case: the fused op against the training
    scripts' eager code, the isotropic floor and anisodiff's white floor, and an issue-15 verdict
    per case; kinds the build cannot time are named, not dropped silently."""
    report = smoke[2]
    rows = [r for r in report["results"] if r["kind"] in TRAINER]
    assert {(r["op"], r["kind"], r["dtype"]) for r in rows} == {
        ("add_noise", k, dt) for k in TIMED_TRAINER for dt in ("fp32", "bf16")}
    for kind in TIMED_TRAINER:
        impls = {r["impl"] for r in rows if r["kind"] == kind and r["dtype"] == "fp32"}
        assert impls == {"anisodiff_cpu", TRAINER[kind], "isotropic_floor", "anisodiff_white"}
    for c in (c for c in report["cases"] if c["kind"] in TRAINER):
        assert c["fastest_baseline"] == TRAINER[c["kind"]]
        assert c["speedup_vs_fastest"] == c["speedups"][TRAINER[c["kind"]]]
    goals = report["trainer_goals"]
    assert {(g["kind"], g["dtype"]) for g in goals} == {(k, dt) for k in TIMED_TRAINER
                                                        for dt in ("fp32", "bf16")}
    for g in goals:
        assert g["issue"] == 15 and g["met"] == (g["value"] >= 1.0) and _finite_positive(g["value"])
    assert "issue 15 goal (fused add_noise with a trainer flag" in smoke[1]
    pending = report["settings"]["kinds_pending"]
    assert set(pending) == set(TRAINER) - set(TIMED_TRAINER)
    assert any(line.startswith(f"{'add_noise':<13}{'pyramid':<13}") for line in smoke[1].splitlines())


def test_trainer_baselines_are_the_flags():
    """The fused callables and the baselines of the trainer kinds compute what their flag means:
    the offset's plane-mean variance, pyramid noise's unit variance, the perturbation only in x_t,
    the flow path's mix and target."""
    from anisodiff.bench import impls as bench_impls

    B, C, H, W = 256, 3, 16, 16
    for kind in TIMED_TRAINER:
        case = cases.make_case(kind, B, C, H, W)
        for impl in ("fused", TRAINER[kind]):
            torch.manual_seed(0)
            random.seed(0)  # kohya's pyramid recipe draws its scale factors from Python's random
            x_t, target = bench_impls.make_callable("add_noise", impl, case, torch.float32, "cpu",
                                                    "cpu", {})()
            x0 = case.x0.double()
            if kind == "flow":
                sigma = bench_impls.trainer_sigmas(case).double()[:, None, None, None]
                n = target.double() + x0
                torch.testing.assert_close(x_t.double(), (1 - sigma) * x0 + sigma * n,
                                           rtol=0, atol=1e-5)
                assert abs(float(n.var()) - 1) < 0.02, (kind, impl)
                continue
            ac = case.schedule.alphas_cumprod[case.timesteps].double()[:, None, None, None]
            resid = x_t.double() - ac.sqrt() * x0 - (1 - ac).sqrt() * target.double()
            n = target.double()
            if kind == "perturb":  # the perturbation is in x_t only: resid = b gamma n'
                ratio = float((resid / (1 - ac).sqrt()).std())
                assert abs(ratio - baselines.INPUT_PERTURBATION) < 0.01, (kind, impl, ratio)
            else:
                assert float(resid.abs().max()) < 1e-4, (kind, impl)
            plane_mean_var = float(n.mean(dim=(-2, -1)).var())
            if kind == "offset":  # 1 / HW + s^2
                want = 1 / (H * W) + baselines.NOISE_OFFSET**2
                assert abs(plane_mean_var / want - 1) < 0.15, (kind, impl, plane_mean_var)
            if kind == "pyramid":  # unit variance, far more low-frequency power than white
                assert abs(float(n.var()) - 1) < 0.05, (kind, impl)
                assert plane_mean_var > 2.5 / (H * W), (kind, impl, plane_mean_var)


def test_ddpm_step_rows(smoke):
    """The DDPM step is the third op: every kind and dtype, the fused CPU op, the eager and
    isotropic-floor step baselines (the official sampler step on the squeeze-only kinds), white and
    rfft where they apply, Triton never; finite positive numbers; the step's inputs recorded."""
    report = smoke[2]
    rows = [r for r in report["results"] if r["op"] == "ddpm_step"]
    assert {(r["kind"], r["dtype"]) for r in rows} == {(k, dt) for k in KINDS for dt in ("fp32", "bf16")}
    for kind in KINDS:
        impls = {r["impl"] for r in rows if r["kind"] == kind and r["dtype"] == "fp32"}
        want = {"anisodiff_cpu", "eager_vectorised", "isotropic_floor"}
        want |= {"anisodiff_white"} if kind != "iso" else set()
        want |= {"eager_rfft"} if kind in ("powerlaw", "band", "sdm_powerlaw") else set()
        want |= {"official_sdm"} if kind in ("sdm", "hdm") and HAVE_DIFFUSERS else set()
        assert impls == want, (kind, impls)
    for r in rows:
        for key in ("median_ms", "q1_ms", "q3_ms", "gbps", "pct_copy_bw", "speedup_vs_fused",
                    "ratio_vs_floor"):
            assert _finite_positive(r[key]), (key, r)
        assert r["backend"] in (None, "cpu") and "triton" not in r["impl"]
    st = report["settings"]["ddpm_step"]
    assert (st["timestep"], st["prev_timestep"], st["mode"]) == (500, 499, "official")
    assert report["traffic"]["ddpm_step"].startswith("4 x")
    assert any(line.startswith(f"{'ddpm_step':<13}") for line in smoke[1].splitlines())


def test_ddpm_step_callables_run_the_users_math():
    """Every ddpm_step implementation of a case returns (x_prev, x0_hat) of the sample's shape and
    dtype, finite; the fused one runs the fused anisodiff::ddpm_step op (the path users get), and
    the anisotropic ones agree on x0_hat (the same clipping in S(t)^-1 coordinates: no noise in it)."""
    case = bench.make_case("sdm", 4, 3, 8, 8, torch.float32, "cpu", step=True)
    compiled = {}
    x0s = {}
    for impl in bench.impls_for("ddpm_step", "sdm"):
        fn = bench.make_callable("ddpm_step", impl, case, torch.float32, "cpu", "cpu", compiled)
        x_prev, x0_hat = fn()
        assert x_prev.shape == x0_hat.shape == case.sample.shape and x_prev.dtype == torch.float32
        assert torch.isfinite(x_prev).all() and torch.isfinite(x0_hat).all(), impl
        x0s[impl] = x0_hat
    assert sampling_suite._which_ddpm_step(bench.make_callable(
        "ddpm_step", "fused", case, torch.float32, "cpu", "cpu", {})).startswith("fused")
    for impl in ("eager_vectorised", "official_sdm"):
        if impl in x0s:
            torch.testing.assert_close(x0s[impl], x0s["fused"], rtol=1e-5, atol=1e-5)
    # bf16 through the upcast path (the FFT-free squeeze runs natively; the spectral one upcasts)
    case = bench.make_case("sdm_powerlaw", 2, 3, 8, 8, torch.bfloat16, "cpu", step=True)
    out = bench.make_callable("ddpm_step", "eager_rfft", case, torch.bfloat16, "cpu", "cpu", {},
                              upcast=True)()
    assert out[0].dtype == torch.bfloat16 and torch.isfinite(out[0].float()).all()


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
    for op in ("shaped_noise", "ddpm_step"):
        code, _, err = _main(["bench", "--smoke", "--given-noise", "--ops", op,
                              "--json", str(tmp_path / "x.json"), "--no-plot"])
        assert code == 2 and "--given-noise" in err
    code, _, _ = _main(["bench", "--shapes", "3x32"])
    assert code == 2
    # a trainer kind with an op it does not run for: nothing to time, said before any timing
    code, _, err = _main(["bench", "--smoke", "--ops", "shaped_noise", "--kinds", "offset", "pyramid",
                          "--json", str(tmp_path / "y.json"), "--no-plot"])
    assert code == 2 and "nothing to time" in err and "add_noise only" in err
    assert not (tmp_path / "y.json").exists()


def _settings(argv):
    return bench.resolve_settings(cli.build_parser().parse_args(["bench", *argv]))


def test_cuda_presets_cover_issue_7_item_2():
    """--device cuda resolves (without a GPU) to the full matrix of issue 7 item 2 and a short
    quick run; the default suite stays the op benchmark."""
    full = _settings(["--device", "cuda"])
    assert full["suites"] == ["ops"]
    assert full["batch"] == [1, 16, 128, 512]
    assert full["shapes"] == [(3, 32, 32), (3, 64, 64), (4, 64, 64), (4, 128, 128), (3, 256, 256)]
    assert full["dtypes"] == ["fp32", "bf16"] and full["kinds"] == list(ALL_KINDS)
    assert full["compile"] is True
    assert full["compile_impls"] == ["compiled_eager", "compiled_eager_max_autotune"]  # issue 3's baseline
    assert _settings([])["compile_impls"] == ["compiled_eager", "compiled_eager_fallback_random"]
    assert full["max_other_load"] > 0.2            # GPU hosts: CPU load matters little
    quick = _settings(["--device", "cuda", "--quick"])
    assert set(quick["shapes"]) <= set(full["shapes"]) and quick["batch"] == [128]
    assert _settings(["--max-other-load", "1.5"])["max_other_load"] == 1.5
    assert _settings([])["max_other_load"] == 0.2
    allx = _settings(["--device", "cuda", "--quick", "--suite", "all"])
    assert allx["suites"] == ["ops", "train", "sampling"]
    assert allx["train"]["unet"] == "sdm_paper" and allx["train"]["batch"] == 128
    assert allx["train"]["amp"] == "bf16"
    assert allx["sampling"]["batch"] == 1024 and allx["sampling"]["steps"] == 50
    cpu = _settings(["--quick", "--suite", "train", "--train-batch", "4", "--unet", "tiny"])
    assert cpu["suites"] == ["train"] and "sampling" not in cpu
    assert cpu["train"]["batch"] == 4 and cpu["train"]["amp"] == "none"


def test_every_fused_backend_is_timed(tmp_path, monkeypatch):
    """Every fused backend runs side by side: a second one ("reference" standing in for Triton)
    gets its own row, its speed-ups and its time ratio to the primary."""
    monkeypatch.setattr(cases, "fused_backends", lambda device: (["cpu", "reference"], {}))
    code, out, _ = _main(["bench", "--smoke", "--kinds", "sdm", "--dtypes", "fp32", "--ops",
                          "add_noise", "--json", str(tmp_path / "b.json"), "--no-plot"])
    assert code == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["settings"]["fused_backends"] == ["cpu", "reference"]
    (c,) = report["cases"]
    fused = [r for r in report["results"] if r["fused"]]
    assert [(r["impl"], r["backend"], r["primary"]) for r in fused] == [
        ("anisodiff_cpu", "cpu", True), ("anisodiff_reference", "reference", False)]
    assert c["fused_impl"] == "anisodiff_cpu" and set(c["backends"]) == {"cpu", "reference"}
    ref, cpu = c["backends"]["reference"], c["backends"]["cpu"]
    assert c["backend_ratios"]["reference/cpu"] == pytest.approx(ref["median_ms"] / cpu["median_ms"])
    assert "anisodiff_reference" not in c["speedups"]          # a backend is not a baseline
    for name in ("eager_vectorised", "official_sdm", "isotropic_floor"):
        base = next(r for r in report["results"] if r["impl"] == name)
        assert ref["speedups"][name] == pytest.approx(base["median_ms"] / ref["median_ms"])
    assert "reference/cpu" in out


def test_ddpm_step_on_every_backend_with_the_op(tmp_path, monkeypatch):
    """ddpm_step runs on every fused backend that has the op ("reference" standing in for a second
    one; Triton has it too, but interpreted Triton is not timed on the CPU) and skips a backend
    without it with the reason recorded and printed."""
    monkeypatch.setattr(cases, "fused_backends",
                        lambda device: (["cpu", "nostep", "reference"], {}))
    code, out, _ = _main(["bench", "--smoke", "--kinds", "sdm", "--dtypes", "fp32", "--ops",
                          "ddpm_step", "--json", str(tmp_path / "d.json"), "--no-plot"])
    assert code == 0
    report = json.loads((tmp_path / "d.json").read_text())
    (c,) = report["cases"]
    assert c["op"] == "ddpm_step" and set(c["backends"]) == {"cpu", "reference"}
    assert [r["impl"] for r in report["results"] if r["fused"]] == ["anisodiff_cpu", "anisodiff_reference"]
    why = report["settings"]["op_skipped_backends"]["ddpm_step"]["nostep"]
    assert "no ddpm_step op" in why and "ddpm_step: nostep skipped" in out
    assert c["backend_ratios"].keys() == {"reference/cpu"}
    assert bench.op_backends("add_noise", ["cuda", "triton"]) == (["cuda", "triton"], {})
    assert bench.op_backends("ddpm_step", ["cuda", "triton"]) == (["cuda", "triton"], {})


def test_interpreted_triton_is_skipped_on_the_cpu(monkeypatch):
    monkeypatch.setattr(cases, "available_backends", lambda device: ["cpu", "triton", "reference"])
    fused, skipped = bench.fused_backends("cpu")
    assert fused == ["cpu"] and "TRITON_INTERPRET" in skipped["triton"]


def test_issue_4_goals_from_the_cases():
    """Triton within 1.3x of CUDA, and faster than torch.compile, per case (synthetic numbers)."""
    def case(tri, cu, comp=None):
        base = {"op": "add_noise", "kind": "sdm", "B": 128, "C": 3, "H": 32, "W": 32,
                "dtype": "fp32", "reliable": True}
        sp = {} if comp is None else {"compiled_eager": comp / tri}
        return {**base, "bytes": 3 * 128 * 3 * 32 * 32 * 4,
                "backends": {"cuda": {"median_ms": cu, "speedups": {}, "pct_copy_bw": 50.0},
                             "triton": {"median_ms": tri, "speedups": sp}}}
    goals = bench.backend_goals([case(1.2, 1.0, comp=2.0), case(1.4, 1.0), {"backends": {"cpu": {}}}])
    within = [g for g in goals if g["goal"] == "triton_within_cuda"]
    assert [g["met"] for g in within] == [True, False]
    assert within[1]["value"] == pytest.approx(1.4)
    (beats,) = [g for g in goals if g["goal"] == "triton_beats_compile"]
    assert beats["met"] and beats["value"] == pytest.approx(2.0 / 1.2)
    lines = "\n".join(bench.backend_goal_lines(goals))
    assert "met in 1 of 2 cases -> NOT MET" in lines and "worst 1.40 x CUDA" in lines


def test_issue_3_goals_from_the_cases():
    """CUDA add_noise: % of copy bandwidth where the issue sets it, speed-ups over the baselines."""
    def case(kind, B, C, H, pct, dtype="fp32", **speedups):
        return {"op": "add_noise", "kind": kind, "B": B, "C": C, "H": H, "W": H, "dtype": dtype,
                "reliable": True, "bytes": 3 * B * C * H * H * 4,
                "backends": {"cuda": {"median_ms": 1.0, "pct_copy_bw": pct, "speedups": speedups}}}
    cases = [case("sdm", 512, 4, 128, 90.0),                 # 128 MB per tensor: counted, met
             case("sdm", 16, 3, 32, 10.0),                   # 196 KB per tensor: not counted
             case("hdm", 512, 4, 128, 80.0, dtype="bf16"),   # bf16: not counted
             case("sdm_powerlaw", 128, 3, 64, 59.0),         # spectral 64x64: counted, missed
             case("band", 128, 3, 128, 10.0),                # 128x128: not counted
             case("sdm", 128, 3, 32, 30.0, official_sdm=60.0, eager_vectorised=3.9, compiled_eager=2.5),
             case("hdm", 128, 3, 32, 30.0, compiled_eager=2.5, compiled_eager_max_autotune=1.5)]
    goals = bench.cuda_goals(cases)
    by = {}
    for g in goals:
        by.setdefault(g["goal"], []).append((g["kind"], g["value"], g["met"]))
    assert by["cuda_squeeze_pct_copy"] == [("sdm", 90.0, True)]
    assert by["cuda_spectral_pct_copy"] == [("sdm_powerlaw", 59.0, False)]
    assert by["cuda_vs_official_sdm"] == [("sdm", 60.0, True)]
    assert by["cuda_vs_eager"] == [("sdm", 3.9, False)]
    assert by["cuda_vs_compile"] == [("sdm", 2.5, True), ("hdm", 1.5, False)]  # max-autotune first
    assert [g["baseline"] for g in goals if g["goal"] == "cuda_vs_compile"] == [
        "compiled_eager", "compiled_eager_max_autotune"]
    assert all(g["issue"] == 3 for g in goals)
    lines = "\n".join(bench.backend_goal_lines(goals))
    assert "issue 3 goal (CUDA spectral 32x32/64x64 >= 60% of copy bandwidth): met in 0 of 1" in lines
    assert "issue 3 goal (CUDA >= 4x eager PyTorch): met in 0 of 1 cases -> NOT MET; worst 3.90" in lines


def test_presets_cover_the_matrix():
    full = _settings([])
    assert full["batch"] == [1, 16, 128, 512]
    assert full["shapes"] == [(3, 32, 32), (3, 64, 64), (4, 64, 64)]
    assert full["dtypes"] == ["fp32", "bf16"] and full["ops"] == list(OPS)
    assert full["kinds"] == list(ALL_KINDS) and full["compile"] is True
    quick = _settings(["--quick"])
    assert quick["batch"] == [64] and quick["shapes"] == [(3, 32, 32)]
    assert quick["kinds"] == list(ALL_KINDS) and quick["ops"] == list(OPS)
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


# ---------------------------------------------------------------------------------------------
# the train-step and sampling suites (need diffusers)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One `anisodiff bench --smoke --suite train sampling --threads 1` run (tiny UNet, a few
    steps; one thread: a 2-thread pool on a shared 2-core CI machine makes it several times slower)."""
    if not HAVE_DIFFUSERS:
        pytest.skip("the train/sampling suites need diffusers")
    d = tmp_path_factory.mktemp("bench_models")
    argv = ["bench", "--smoke", "--suite", "train", "sampling", "--threads", "1",
            "--json", str(d / "m.json")]
    argv += ["--plot", str(d / "m.png")] if HAVE_MATPLOTLIB else ["--no-plot"]
    threads = torch.get_num_threads()
    try:
        code, out, err = _main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    assert code == 0, err
    return json.loads((d / "m.json").read_text()), out, d


def _finite_ms(d: dict, *keys) -> None:
    for key in keys:
        assert isinstance(d[key], float) and math.isfinite(d[key]) and d[key] >= 0, (key, d)


@needs_diffusers
def test_train_step_section(models):
    report, out, _ = models
    assert report["version"] == 2 and report["suites"] == ["train", "sampling"]
    assert report["cases"] == [] and report["copy_bandwidth"] is None  # the op suite did not run
    sec = report["train_step"]
    assert sec["suite"] == "train_step" and sec["reference"] == "isotropic"
    for key in ("cpu_model", "torch_version", "anisodiff_build_info"):
        assert key in sec["machine"]
    assert sec["model"]["name"] == "tiny" and sec["model"]["parameters"] > 0
    names = [v["name"] for v in sec["variants"]]
    assert names == list(train_suite.TRAIN_VARIANTS)      # every variant ran, none dropped
    for v in sec["variants"]:
        _finite_ms(v, "median_ms", "q1_ms", "q3_ms", "iqr_ms", "noise_ms")
        assert v["median_ms"] > 0 and v["q1_ms"] <= v["median_ms"] <= v["q3_ms"]
        assert len(v["samples_ms"]) >= 1 and all(math.isfinite(x) and x > 0 for x in v["samples_ms"])
        assert math.isfinite(v["overhead_pct"]) and math.isfinite(v["paired_overhead_pct"])
        assert v["loss_finite"] is True
        assert v["anisodiff"] == v["name"].startswith("anisodiff_")
        assert (v["backend"] == "cpu") == v["anisodiff"]
    iso = next(v for v in sec["variants"] if v["name"] == "isotropic")
    assert iso["overhead_pct"] == 0 and iso["paired_overhead_pct"] == 0
    assert {g["variant"] for g in sec["goal"]} == {n for n in names if n.startswith("anisodiff_")}
    assert all(g["target_pct"] == 2.0 for g in sec["goal"])
    assert "train step" in out and "issue 7 goal" in out


@needs_diffusers
def test_sampling_section(models):
    report, out, _ = models
    sec = report["sampling"]
    assert sec["suite"] == "sampling" and sec["reference"] == "diffusers_ddpm"
    assert [v["name"] for v in sec["variants"]] == list(sampling_suite.SAMPLERS)
    assert sec["shape"][0] == sec["settings"]["batch"]
    assert math.isfinite(sec["unet_forward_ms"])
    for v in sec["variants"]:
        _finite_ms(v["sampler_only"], "median_ms", "iqr_ms", "per_step_ms")
        _finite_ms(v["with_unet"], "median_ms", "iqr_ms")
        assert math.isfinite(v["sampler_overhead_pct_of_total"])
        assert v["output_finite"] is True and v["output_finite_with_unet"] is True
    paths = {v["name"]: v["path"] for v in sec["variants"]}
    assert paths["anisodiff_ddpm_step"].startswith(("fused", "reference"))
    assert "sampling" in out and "official_sdm" in out


@needs_diffusers
@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_models_picture(models):
    report, _, d = models
    assert report["pictures"] == [str(d / "m.png")]
    assert (d / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_diffusers
def test_train_variants_draw_the_right_noise():
    """Every train-step variant's target has the variance its spec says along the squeeze axis v
    (e^{-2r} with r = s = -0.4 at t = 999: 2.2255 for the SDM kinds, 1 otherwise) and across it (1),
    and x_t = sqrt(abar) x0 + sqrt(1 - abar) target. 4096 samples of 3x8x8: the per-pixel variance
    has a relative s.e. under 1 %, the bound is 6 %; e^{-r/2} instead of e^{-r} (1.49) fails.
    The SAGD appendix recipe divides each plane by its std, which leaves out the DC bin (np.std
    subtracts the mean, docs/papers.md section 2.5): its mean square is sum(w^2) / sum_{f != 0}(w^2),
    1.092 for alpha = -0.04 on 8x8."""
    B, size = 4096, 8
    fns = train_suite.train_noise_fns(B, size, "cpu")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(B, 3, size, size, generator=g) * 2 - 1
    t = torch.full((B,), 999, dtype=torch.int64)
    case = bench.make_case("sdm", 1, 3, size, size)
    v = case.axes[:, 0].double()
    ab = case.alphas_cumprod[999].double()
    w2 = baselines.power_law_table(size, size, model_suites.ALPHA).double().square()
    dc_excluded = (w2.sum() / (w2.sum() - w2[0, 0])).item()
    torch.manual_seed(0)
    for name, fn in fns.items():
        x_t, target = fn(x0, t)
        n = target.double()
        assert torch.allclose(x_t.double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * n,
                              atol=1e-5), name
        along = torch.einsum("c,bchw->bhw", v, n)
        perp = n - v[None, :, None, None] * along[:, None]
        var_v = along.var().item()
        var_perp = perp.square().sum(1).mean().item() / 2
        scale = dc_excluded if name == "sagd_appendix" else 1.0
        want = math.exp(0.8) if "sdm" in name else 1.0
        assert var_v == pytest.approx(want * scale, rel=0.06), (name, var_v)
        assert var_perp == pytest.approx(scale, rel=0.06), (name, var_perp)


def test_train_and_sampling_say_when_diffusers_is_missing(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(model_suites.importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real(name, *a))
    for suite in ("train", "sampling", "all"):
        code, _, err = _main(["bench", "--smoke", "--suite", suite, "--json",
                              str(tmp_path / "x.json"), "--no-plot"])
        assert code == 2 and "need diffusers" in err and "pip install diffusers" in err
        assert not (tmp_path / "x.json").exists()


def test_pytest_benchmark_suite_times_the_same_cases(smoke, monkeypatch):
    """benchmarks/test_bench_cpu.py (pytest-benchmark) is generated from the driver's case list:
    at the smoke preset its cases are exactly the (case, implementation) rows of `anisodiff bench
    --smoke`."""
    monkeypatch.setenv("ANISODIFF_BENCH_PRESET", "smoke")
    spec = importlib.util.spec_from_file_location("anisodiff_bench_pytest",
                                                  ROOT / "benchmarks" / "test_bench_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ours = {(op, kind, B, tuple(shape), dt, mod._impl_label(impl))
            for op, kind, B, shape, dt, impl in mod.CASES}
    theirs = {(r["op"], r["kind"], r["B"], (r["C"], r["H"], r["W"]), r["dtype"], r["impl"])
              for r in smoke[2]["results"]}
    assert ours == theirs
