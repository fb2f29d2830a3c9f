"""`anisodiff demo`: the training demo (tiny UNet, four forward noises, metrics), run in-process
with --quick and tiny sizes; and its metrics against closed forms."""
import importlib.util
import json
import math
import sys

import pytest
import torch

import anisodiff as ad
from anisodiff import cli, demo

CONFIGS = {"isotropic", "sdm", "hdm", "power_law"}
METRICS = ("final_loss", "final_relative_loss", "fd_pixels", "fd_random_features",
           "spectrum_error")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = ["--quick", "--steps", "3", "--samples", "16", "--sample-steps", "2", "--no-plot"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine OpenMP's spinning
    threads make them many times slower (conftest restores the thread count afterwards)."""
    torch.set_num_threads(1)


def _run(out, *extra):
    code = cli.main(["demo", "--quick", "--out", str(out), *extra])
    report_path = out / "demo_report.json"
    return code, (json.loads(report_path.read_text()) if report_path.exists() else None)


def _results(report) -> dict:
    """Everything in the report that must not depend on timing."""
    return {"configs": {name: {k: v for k, v in c.items() if not k.endswith("_seconds")}
                        for name, c in report["configs"].items()},
            "real_vs_real": report["real_vs_real"], "fitted": report["fitted"]}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `anisodiff demo --quick` run with pictures: (exit code, output dir, report)."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread (a module fixture runs outside it)
    try:
        code, report = _run(out, "--seed", "5")
    finally:
        torch.set_num_threads(threads)
    return code, out, report


def test_quick_demo_reports_every_metric_for_every_config(quick):
    code, _, report = quick
    assert code == 0
    assert set(report["configs"]) == CONFIGS
    for name, config in report["configs"].items():
        for metric in METRICS:
            assert math.isfinite(config[metric]) and config[metric] >= 0, (name, metric)
        assert len(config["radial_power"]) == len(report["radii"])
        assert all(math.isfinite(v) and v > 0 for v in config["radial_power"])
        assert config["loss_curve"] and config["spec"]["format"] == "anisodiff.NoiseSpec"
    for metric in ("fd_pixels", "fd_random_features", "spectrum_error"):
        assert math.isfinite(report["real_vs_real"][metric])
    setting = report["setting"]
    assert (setting["steps"], setting["size"], setting["seed"]) == (demo.QUICK_PRESET.steps,
                                                                    demo.QUICK_PRESET.size, 5)
    assert "not which noise is better" in report["note"]


def test_quick_demo_trains_each_config_on_its_own_noise(quick):
    """Same weights, data, timesteps and white noise in every run: only the shaping differs, so the
    loss curves must differ, and the antisqueezed SDM target (|S e| >= |e| for s < 0, the same e and
    t) must carry more power than the isotropic one (final_loss / final_relative_loss)."""
    configs = quick[2]["configs"]
    curves = {name: tuple(c["loss_curve"]) for name, c in configs.items()}
    assert len(set(curves.values())) == len(curves), "two configs trained on the same noise"
    power = {name: c["final_loss"] / c["final_relative_loss"] for name, c in configs.items()}
    assert power["sdm"] > power["isotropic"]
    assert power["power_law"] != pytest.approx(power["sdm"])


def test_quick_demo_specs_follow_the_fitted_axis(quick):
    configs, fitted = quick[2]["configs"], quick[2]["fitted"]
    axis = torch.tensor(fitted["axis"])
    assert axis.norm() == pytest.approx(1.0) and (axis > 0.5).all()  # luminance: ~(1,1,1)/sqrt3
    sdm, hdm = (ad.NoiseSpec.from_dict(configs[n]["spec"]) for n in ("sdm", "hdm"))
    assert torch.allclose(sdm.squeeze.axes[:, 0].float(), axis)
    assert sdm.squeeze.strength == hdm.squeeze.strength == (-0.4,)
    assert (sdm.squeeze.variant, hdm.squeeze.variant) == ("sdm", "heisenberg")
    assert ad.NoiseSpec.from_dict(configs["power_law"]["spec"]).spectral.alpha == -0.04
    assert ad.NoiseSpec.from_dict(configs["isotropic"]["spec"]) == ad.NoiseSpec()


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_quick_demo_writes_the_pictures(quick):
    import matplotlib.image

    _, out, report = quick
    for key, name in (("samples", "demo_samples.png"), ("spectra", "demo_spectra.png")):
        path = out / name
        assert report["figures"][key] == str(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(path).shape[:2]
        assert width >= 600 and height >= 300


def test_quick_demo_prints_the_table_and_the_caveat(quick, tmp_path, capsys):
    code, _ = _run(tmp_path, *TINY)
    text = capsys.readouterr().out
    assert code == 0
    for row in (*CONFIGS, "real vs real"):
        assert row in text
    for column in ("final loss", "FD pixels", "FD rand. feat.", "spectrum err"):
        assert column in text
    assert "tiny models" in text and "no FID claim" in text
    assert not (tmp_path / "demo_samples.png").exists()


def test_demo_is_deterministic_for_a_seed(tmp_path):
    runs = [_run(tmp_path / name, *TINY, "--seed", seed)[1] for name, seed in
            (("a", "3"), ("b", "3"), ("c", "4"))]
    assert _results(runs[0]) == _results(runs[1])
    assert _results(runs[0])["configs"] != _results(runs[2])["configs"]


def test_demo_ddpm_sampler_and_threads(tmp_path):
    code, report = _run(tmp_path, *TINY, "--sampler", "ddpm", "--threads", "2")
    assert code == 0 and report["setting"]["sampler"] == "ddpm"
    assert report["setting"]["threads"] == torch.get_num_threads() == 2
    assert all(math.isfinite(c["fd_pixels"]) for c in report["configs"].values())


def _fake_probes(monkeypatch, train_ms: dict, sample_ms: dict, busy: float | None = 0.0):
    """Probe timings by thread count and the CPUs other processes keep busy, so the choice of
    --threads auto is tested whatever the machine does; records the thread counts probed."""
    ran = []
    monkeypatch.setattr(demo, "other_busy_cpus", lambda window_s=0.5: busy)

    def train(data, noise, settings, budget_s=None):
        ran.append(torch.get_num_threads())
        return train_ms[torch.get_num_threads()] / 1e3

    monkeypatch.setattr(demo, "_probe_train", train)
    monkeypatch.setattr(demo, "_probe_sample",
                        lambda *a: sample_ms[torch.get_num_threads()] / 1e3)
    return ran


@pytest.mark.parametrize("train_ms, sample_ms, want", [
    ({1: 30.0, 2: 200.0}, {1: 100.0, 2: 400.0}, (1, 1)),   # a busy machine: threads wait on each other
    ({1: 30.0, 2: 20.0}, {1: 100.0, 2: 60.0}, (2, 2)),     # an idle one: both cores help
    ({1: 30.0, 2: 20.0}, {1: 100.0, 2: 400.0}, (2, 1)),    # each phase keeps its own faster count
])
def test_threads_auto_keeps_the_faster_count_per_phase(monkeypatch, train_ms, sample_ms, want):
    ran = _fake_probes(monkeypatch, train_ms, sample_ms)
    data = demo.real_images(16, 8, 0)
    settings = demo.TrainSettings(1, 4, 1e-3, 0, torch.device("cpu"), width=8)
    noise = ad.AnisotropicNoise(ad.NoiseSpec(), demo.linear_schedule())
    before = torch.get_num_threads()
    choice = demo.choose_threads(data, noise, settings, 16, train_steps=3200, sample_steps=200,
                                 candidates=[1, 2])
    assert (choice.train_threads, choice.sample_threads) == want
    assert torch.get_num_threads() == before             # the probe leaves torch as it found it
    assert set(ran) == {1, 2} and ran[0] == 1
    clear = all(max(d.values()) > 1.5 * min(d.values()) for d in (train_ms, sample_ms))
    assert len(ran) == (2 if clear else 2 * demo.PROBE_ROUNDS)  # a clear answer stops after a round


def test_threads_auto_skips_the_probe_for_a_short_run(monkeypatch):
    ran = _fake_probes(monkeypatch, {1: 30.0, 2: 1.0}, {1: 10.0, 2: 1.0})
    data = demo.real_images(16, 8, 0)
    settings = demo.TrainSettings(1, 4, 1e-3, 0, torch.device("cpu"), width=8)
    noise = ad.AnisotropicNoise(ad.NoiseSpec(), demo.linear_schedule())
    choice = demo.choose_threads(data, noise, settings, 16, train_steps=32, sample_steps=16,
                                 candidates=[1, 2])
    assert ran == [1] and (choice.train_threads, choice.sample_threads) == (1, 1)


@pytest.mark.parametrize("busy, probed", [(1.6, [1]), (0.2, [1, 2]), (None, [1, 2])])
def test_threads_auto_stays_at_one_thread_on_a_busy_machine(monkeypatch, busy, probed):
    ran = _fake_probes(monkeypatch, {1: 30.0, 2: 20.0}, {1: 100.0, 2: 60.0}, busy=busy)
    data = demo.real_images(16, 8, 0)
    settings = demo.TrainSettings(1, 4, 1e-3, 0, torch.device("cpu"), width=8)
    noise = ad.AnisotropicNoise(ad.NoiseSpec(), demo.linear_schedule())
    choice = demo.choose_threads(data, noise, settings, 16, train_steps=3200, sample_steps=200,
                                 candidates=[1, 2])
    assert sorted(set(ran)) == probed and choice.busy_cpus == busy
    assert choice.reason == ("busy" if probed == [1] else "measured")
    assert choice.train_threads == (1 if probed == [1] else 2)


def test_demo_threads_auto_is_the_default_and_reported(tmp_path, monkeypatch, capsys):
    _fake_probes(monkeypatch, {1: 30.0, 2: 200.0}, {1: 10.0, 2: 40.0})
    monkeypatch.setattr(demo, "SHORT_RUN_S", 0.0)
    monkeypatch.setattr(demo, "thread_candidates", lambda available=None: [1, 2])
    code, report = _run(tmp_path, *TINY)
    assert code == 0
    auto = report["setting"]["threads_auto"]
    assert auto["train_threads"] == auto["sample_threads"] == 1
    assert report["setting"]["threads"] == {"train": 1, "sample": 1}
    out = " ".join(capsys.readouterr().out.split())  # the header is wrapped at 100 columns
    assert "threads: auto chose 1 for training" in out and "Expected time of training and sampling: about" in out


def test_demo_without_matplotlib_or_tqdm(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    code, report = _run(tmp_path, *TINY[:-1])      # pictures asked for, but no matplotlib
    captured = capsys.readouterr()
    assert code == 0 and report["figures"] is None
    assert "pip install matplotlib" in captured.out
    total = 4 * (3 + 2)
    assert f"sampling: {total}/{total}" in captured.err  # the plain progress fallback, last line
    assert captured.err.count("\n") <= 4 * 21            # throttled: ~20 lines per bar


def test_diverged_training_or_sampling_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "sample", lambda *a, **k: torch.full((16, 3, 8, 8), math.nan))
    code, report = _run(tmp_path, *TINY)
    err = capsys.readouterr().err
    assert code == 1 and report is None
    assert "isotropic: the samples are not finite" in err and "Traceback" not in err
    code, _ = _run(tmp_path, *TINY, "--lr", "1e30")
    err = capsys.readouterr().err
    assert code == 1 and "training loss became" in err and "--lr" in err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"),
    (["--steps", "many"], "expected an integer"),
    (["--device", "tpu"], "expected auto, cpu, cuda"),
    (["--device", "cuda:x"], "--device"),
    (["--device", "mps"], "mps is not supported"),
    (["--size", "10"], "multiple of 4"),
    (["--size", "4"], "--size"),
    (["--width", "6"], "--width 6"),
    (["--samples", "3"], "--samples"),
    (["--sample-steps", "1001"], "--sample-steps"),
    (["--batch-size", "300"], "larger than the training set"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--sampler", "euler"], "invalid choice"),
    (["--seed", "-2"], "--seed"),
    (["--threads", "0"], "--threads"),
])
def test_bad_flags_exit_with_code_2(argv, message, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "demo_report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "--device cpu" in err


def test_unwritable_out_exits_with_code_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def test_frechet_distance_of_commuting_gaussians():
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    exact = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert demo.gaussian_frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == \
        pytest.approx(exact, rel=1e-12)
    # a common rotation changes nothing
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    assert demo.gaussian_frechet_distance(q @ mu1.double(), q @ torch.diag(a).double() @ q.T,
                                          q @ mu2.double(), q @ torch.diag(b).double() @ q.T) == \
        pytest.approx(exact, rel=1e-10)


def test_frechet_distance_of_non_commuting_2x2_gaussians():
    """For 2x2 PSD matrices tr(sqrt(M)) = sqrt(tr M + 2 sqrt(det M)), so the cross term is
    sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) without any matrix square root."""
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.0])
    cross = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(s1.det() * s2.det())))
    exact = 0.25 + 1.0 + float(torch.trace(s1) + torch.trace(s2)) - 2 * cross
    assert demo.gaussian_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    assert demo.gaussian_frechet_distance(mu1, s1, mu2, s2) == \
        pytest.approx(demo.gaussian_frechet_distance(mu2, s2, mu1, s1), rel=1e-12)


def test_frechet_distance_of_samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 4, generator=g, dtype=torch.float64)
    assert demo.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(mu, 4 I) in 4-D: |mu|^2 + 4 (2 - 1)^2, estimated from 5000 draws each
    y = 2 * torch.randn(5000, 4, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0, 0, 0])
    assert demo.frechet_distance(x, y) == pytest.approx(1 + 4, rel=0.05)
    with pytest.raises(ValueError, match="same D"):
        demo.frechet_distance(x, y[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        demo.frechet_distance(x[:1], y)


def test_spectrum_error_is_zero_for_identical_data_and_log_ratio_otherwise():
    images = demo.real_images(32, 16, seed=2)
    radii, power = demo.radial_power(images)
    assert radii.numel() == 11  # rings 1..11 of a 16x16 grid (r up to 0.707 cycles/pixel)
    assert demo.spectrum_error(power, power) == 0.0
    _, same = demo.radial_power(images.clone())
    assert demo.spectrum_error(same, power) == 0.0
    _, doubled = demo.radial_power(2 * images)  # 4x the power in every ring
    assert demo.spectrum_error(doubled, power) == pytest.approx(math.log(4), rel=1e-9)
    with pytest.raises(ValueError, match="rings"):
        demo.spectrum_error(power[:-1], power)


def test_feature_spaces_are_fixed_functions():
    images = demo.real_images(8, 16, seed=0)
    assert demo.pixel_features(images).shape == (8, 3 * demo.PIXEL_GRID ** 2)
    first, second = demo.RandomFeatures()(images), demo.RandomFeatures()(images)
    assert first.shape == (8, demo.FEATURE_WIDTH) and torch.equal(first, second)
    with torch.random.fork_rng():
        torch.manual_seed(123)  # the global RNG does not touch the feature net
        assert torch.equal(demo.RandomFeatures()(images), first)


def test_sampling_timesteps_are_trailing_and_end_on_the_data():
    pairs = demo.sampling_timesteps(1000, 50)
    assert len(pairs) == 50 and pairs[0] == (999, 979) and pairs[-1] == (19, -1)
    assert all(t > prev for t, prev in pairs)
    assert demo.sampling_timesteps(1000, 1000)[-1] == (0, -1)
    with pytest.raises(ValueError, match="steps"):
        demo.sampling_timesteps(1000, 0)


def test_untrained_model_is_exact_at_pure_noise():
    """The output conv starts at zero, so eps_hat = sqrt(1 - abar_t) x_t: the skip term alone."""
    schedule = demo.linear_schedule()
    model = demo.TinyUNet(schedule, 3, 8)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([999, 10])
    b = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(model(x, t), b * x)
