"""The command line, run in-process: `anisodiff check` (table, JSON report, picture),
`anisodiff info`, `fit` and `show` (`anisodiff demo` is in test_demo.py).

The analytic values in the report are checked against closed forms computed here, independently of
anisodiff: at t = 999 of the linear VP schedule tau = beta_t / beta_max = 1, so SDM with s = -0.4
has variance e^{0.8} along the luminance axis and 1 orthogonal to it, HDM e^{0.8} and e^{-0.4}.
"""
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import anisodiff as ad
from anisodiff import check as check_module
from anisodiff import cli

SAMPLES = 4000
OPERATORS = {"isotropic", "sdm", "hdm", "power_law", "band_pass"}
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """One `anisodiff check` run: (exit code, output directory, parsed report)."""
    out = tmp_path_factory.mktemp("check")
    code = cli.main(["check", "--out", str(out), "--samples", str(SAMPLES), "--size", "32",
                     "--seed", "3"])
    report = json.loads((out / "check_report.json").read_text())
    return code, out, report


def test_check_succeeds_and_every_operator_passes(check):
    code, _, report = check
    assert code == 0
    assert set(report["operators"]) == OPERATORS
    assert all(op["status"] == "PASS" for op in report["operators"].values())
    assert report["all_passed"] is True
    assert report["setting"]["samples"] == SAMPLES


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_check_writes_a_valid_png(check):
    import matplotlib.image

    _, out, report = check
    png = out / "check.png"
    assert report["figure"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 1_000_000
    height, width = matplotlib.image.imread(png).shape[:2]
    assert 600 <= width <= 2000 and 600 <= height <= 2000


def test_check_squeeze_variances_match_closed_forms(check):
    ops = check[2]["operators"]
    cases = {"isotropic": (1.0, 1.0), "sdm": (math.exp(0.8), 1.0),
             "hdm": (math.exp(0.8), math.exp(-0.4)),
             "power_law": (1.0, 1.0), "band_pass": (1.0, 1.0)}
    for name, (along, orthogonal) in cases.items():
        for key, exact in (("axis_variance", along), ("orthogonal_variance", orthogonal)):
            entry = ops[name][key]
            assert entry["analytic"] == pytest.approx(exact, rel=1e-9), (name, key)
            # about 8 standard errors at N = 4000 (the report's own tolerance is 5)
            assert abs(entry["measured"] - exact) < 0.02 * exact + 0.02, (name, key, entry)


def _low_share_closed_form(weight_squared) -> float:
    """Share of sum_f weight_squared(r) at r < 0.25 on the 8x8 fftfreq grid."""
    f = np.fft.fftfreq(8)
    r = np.hypot(f[:, None], f[None, :])
    p = weight_squared(r)
    return float(p[r < 0.25].sum() / p.sum())


def test_check_spectral_shares_match_closed_forms(check):
    ops = check[2]["operators"]
    exact = {
        "isotropic": 9 / 64,   # bins with kx^2 + ky^2 < 4
        "band_pass": 8 / 20,   # of the 20 bins with 0.1 <= r <= 0.3, 8 have r < 0.25
        "power_law": _low_share_closed_form(lambda r: (r + check_module.POWER_LAW_EPS) ** -1.0),
    }
    for name, share in exact.items():
        low = ops[name]["low_frequency_share"]
        assert low["analytic"] == pytest.approx(share, rel=1e-9), name
        assert abs(low["measured"] - share) < 0.02, name
        assert ops[name]["high_frequency_share"]["analytic"] == pytest.approx(1 - share, rel=1e-9)


def test_check_frobenius_error_is_at_the_sampling_level(check):
    ops = check[2]["operators"]
    n = 3 * 8 * 8
    expected_isotropic = math.sqrt((n + n * n) / SAMPLES / n)  # Sigma = I
    iso = ops["isotropic"]["rel_frobenius_error"]
    assert expected_isotropic < iso["tolerance"] < 1.1 * expected_isotropic
    for name, op in ops.items():
        err = op["rel_frobenius_error"]
        assert 0 < err["measured"] <= err["tolerance"] < 0.5, name


def test_check_prints_the_table(check, capsys):
    code = cli.main(["check", "--out", str(check[1] / "again"), "--samples", "500", "--no-plot"])
    text = capsys.readouterr().out
    assert code == 0
    for name in OPERATORS:
        assert name in text
    assert text.count("PASS") >= 5 and "FAIL" not in text
    assert "standard errors" in text
    assert not (check[1] / "again" / "check.png").exists()


def test_check_without_matplotlib_or_tqdm(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert cli.main(["check", "--out", str(tmp_path), "--samples", "500"]) == 0
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.out and "anisodiff[viz]" in captured.out
    assert "covariance check: 5/5" in captured.err  # the plain progress fallback
    assert json.loads((tmp_path / "check_report.json").read_text())["figure"] is None
    assert not (tmp_path / "check.png").exists()


def test_info_prints_version_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"anisodiff {ad.__version__}" in out
    assert "reference" in out


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["check", "--samples", "0"], "--samples"),
    (["check", "--samples", "many"], "expected an integer"),
    (["check", "--size", "4"], "--size"),
    (["check", "--seed", "-1"], "--seed"),
    (["check", "--bogus"], "unrecognized arguments"),
    (["demo", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_out_exits_with_code_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["check", "--out", str(blocker / "sub"), "--samples", "500"]) == 2
    assert "--out" in capsys.readouterr().err


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "anisodiff.cli", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert ad.__version__ in result.stdout


def test_covariance_check_rejects_a_wrong_operator():
    """The check's PASS means something: samples of SDM s = -0.4 fail against a slightly different
    strength (axis variance), an added spectral tilt (power share) and the HDM variant."""
    from anisodiff import viz

    schedule = ad.VPSchedule.linear()
    v = torch.ones(3, 1, dtype=torch.float64) / math.sqrt(3)
    drawn = ad.NoiseSpec(ad.Squeeze(v, -0.4))
    samples = ad.shaped_noise((SAMPLES, 3, 8, 8), drawn, timesteps=999, schedule=schedule, seed=1)
    sigma_emp, n = viz.empirical_covariance([samples])

    def check(spec):
        sigma = ad.covariance(spec, (3, 8, 8), timesteps=999, schedule=schedule)
        return viz.check_covariance(sigma, sigma_emp, n, v.reshape(-1), (3, 8, 8))

    assert check(drawn).passed
    assert not check(ad.NoiseSpec(ad.Squeeze(v, -0.36))).axis_variance.passed
    assert not check(ad.NoiseSpec(ad.Squeeze(v, -0.4), ad.PowerLaw(0.1))).low_share.passed
    assert not check(ad.NoiseSpec(ad.Squeeze(v, -0.4, variant="heisenberg"))).passed


# ---------------------------------------------------------------------------------------------
# anisodiff fit / anisodiff show
# ---------------------------------------------------------------------------------------------
def _procedural_uint8(n=12, size=16):
    """[n, size, size, 3] uint8 pictures from the procedural dataset."""
    from anisodiff import datasets

    images = torch.stack(datasets.ProceduralImages(n, size=size, seed=1).__getitems__(range(n)))
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pngs")
    pixels = _procedural_uint8()
    for i, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"{i:02d}.png")
    return folder, pixels


def _expected_pca(pixels_uint8, k=1):
    from anisodiff.fit import fit_channel_pca

    x = torch.from_numpy(pixels_uint8).permute(0, 3, 1, 2).double() / 127.5 - 1
    return fit_channel_pca(x, k=k, progress=False)


def test_fit_on_a_png_folder_writes_the_fitted_spec(png_folder, tmp_path, capsys):
    folder, pixels = png_folder
    out = tmp_path / "spec.json"
    assert cli.main(["fit", str(folder), "-o", str(out), "--batch-size", "5"]) == 0
    spec = ad.NoiseSpec.load(out)
    expected = _expected_pca(pixels)
    assert torch.allclose(spec.squeeze.axes, expected.axes, atol=1e-6)
    assert spec.squeeze.strength == (-0.4,) and spec.squeeze.variant == "sdm"
    assert spec.spectral is None and spec.radius == "cycles"
    text = capsys.readouterr().out
    assert "12 images of 3x16x16" in text and "alpha =" in text and "eigenvalues" in text
    assert "axis v1" in text and str(out) in text


def test_fit_on_npy_arrays_uint8_and_float(png_folder, tmp_path):
    _, pixels = png_folder
    expected = _expected_pca(pixels, k=2)
    np.save(tmp_path / "u8.npy", pixels)
    floats = (pixels.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1)
    np.savez(tmp_path / "f.npz", images=floats, labels=np.arange(len(floats)))
    for name in ("u8.npy", "f.npz"):
        out = tmp_path / f"{name}.json"
        assert cli.main(["fit", str(tmp_path / name), "-o", str(out), "--k", "2",
                         "--variant", "heisenberg", "--strength", "0.3", "--limit", "12"]) == 0
        squeeze = ad.NoiseSpec.load(out).squeeze
        assert torch.allclose(squeeze.axes, expected.axes, atol=1e-6)
        assert squeeze.variant == "heisenberg" and squeeze.strength == (0.3, 0.3)


def test_fit_procedural_spectral_parts(tmp_path):
    law, table = tmp_path / "law.json", tmp_path / "table.json"
    common = ["procedural", "--limit", "256", "--size", "16"]
    assert cli.main(["fit", *common, "-o", str(law), "--spectral", "power_law",
                     "--radius", "nyquist1"]) == 0
    spec = ad.NoiseSpec.load(law)
    assert isinstance(spec.spectral, ad.PowerLaw) and abs(spec.spectral.alpha + 1) < 0.05
    assert spec.radius == "nyquist1" and spec.spectral.eps == pytest.approx(2 * 0.5 / 16)
    assert cli.main(["fit", *common, "-o", str(table), "--spectral", "table"]) == 0
    assert ad.NoiseSpec.load(table).spectral.shape == (16, 16)


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_show_writes_a_valid_png(tmp_path, capsys):
    import matplotlib.image

    spec_path, png = tmp_path / "spec.json", tmp_path / "noise.png"
    v = torch.ones(3, 1, dtype=torch.float64) / math.sqrt(3)
    ad.NoiseSpec(ad.Squeeze(v, -0.4), ad.PowerLaw(-0.3, eps=0.01)).save(spec_path)
    assert cli.main(["show", str(spec_path), "-o", str(png), "--size", "16",
                     "--timesteps", "0,999"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 600 and height > 400
    text = capsys.readouterr().out
    assert "t = 0:" in text and "t = 999:" in text
    line = next(s for s in text.splitlines() if "t = 999:" in s)
    assert f"exact {math.exp(0.8):.4f}" in line  # SDM at tau = 1: variance e^0.8 along v


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_show_draws_a_time_invariant_spec_once(tmp_path, capsys):
    spec_path, png = tmp_path / "spec.json", tmp_path / "noise.png"
    ad.NoiseSpec(spectral=ad.Band(0.1, 0.3)).save(spec_path)
    assert cli.main(["show", str(spec_path), "-o", str(png), "--size", "16",
                     "--channels", "4"]) == 0
    text = capsys.readouterr().out
    assert text.count("variance along the axis") == 1 and "every t" in text
    assert png.exists()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files that `anisodiff fit` must refuse with exit code 2."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad")
    (root / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(root / "mixed" / "a.png")
    Image.new("RGB", (10, 8)).save(root / "mixed" / "b.png")
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    np.save(root / "rank3.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    np.save(root / "nhwc.npy", np.zeros((4, 8, 8, 3), dtype=np.float32))
    np.savez(root / "two.npz", a=np.zeros((2, 3, 4, 4)), b=np.zeros(2))
    (root / "notes.txt").write_text("hello")
    table = ad.NoiseSpec(spectral=ad.SpectralTable(torch.ones(8, 8)))
    table.save(root / "table.json")
    ad.NoiseSpec(ad.Squeeze(torch.eye(3)[:, :1])).save(root / "rgb.json")
    ad.NoiseSpec(ad.Squeeze(torch.eye(3)[:, :1], 0.5, schedule=torch.linspace(0, 1, 50))).save(
        root / "table50.json")
    (root / "bad.json").write_text('{"format": "anisodiff.NoiseSpec", "squeeze": 3}')
    (root / "no_axes.json").write_text('{"squeeze": {"strength": [0.5]}}')
    return root


@pytest.mark.parametrize("argv, message", [
    (["fit", "{root}/missing"], "no such file or folder"),
    (["fit", "{root}/mixed"], "--size N"),
    (["fit", "{root}/broken"], "not a readable image"),
    (["fit", "{root}/empty"], "no image files"),
    (["fit", "{root}/rank3.npy"], "4-D array"),
    (["fit", "{root}/nhwc.npy"], "channels-last"),
    (["fit", "{root}/two.npz"], "2 arrays"),
    (["fit", "{root}/notes.txt"], "unsupported file"),
    (["fit", "{root}/rank3.npy", "--size", "8"], "used as stored"),
    (["fit", "procedural", "--limit", "4", "--k", "4"], "cannot fit 4 axes"),
    (["fit", "procedural", "--limit", "4", "--k", "3", "--variant", "heisenberg"], "k < C"),
    (["fit", "procedural", "--eps", "0.1"], "--eps applies only"),
    (["fit", "procedural", "-o", "{root}/nowhere/spec.json"], "does not exist"),
    (["fit", "procedural", "--strength", "nan"], "finite"),
    (["fit", "procedural", "--spectral", "gauss"], "invalid choice"),
    (["fit"], "required"),
    (["show", "{root}/missing.json"], "cannot read the spec"),
    (["show", "{root}/bad.json"], "squeeze"),
    (["show", "{root}/no_axes.json"], "axes"),
    (["show", "{root}/table.json", "--size", "16"], "SpectralTable is 8x8"),
    (["show", "{root}/rgb.json", "--channels", "4"], "3 channels"),
    (["show", "{root}/rgb.json", "--timesteps", "0,1000"], "--timesteps"),
    (["show", "{root}/rgb.json", "--channels", "1"], "--channels"),
    (["show", "{root}/rgb.json", "-o", "{root}"], "is a folder"),
    (["show", "{root}/table50.json"], "50 entries"),
])
def test_fit_and_show_bad_input_exit_with_code_2(bad_inputs, argv, message, capsys):
    argv = [a.replace("{root}", str(bad_inputs)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# terminal-SNR warnings of `fit` and `show`; `fit` on cached latents
# ---------------------------------------------------------------------------------------------
def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": warning: terminal SNR" in line]


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_show_warns_for_the_papers_dc_floor_and_not_for_a_good_one(tmp_path, capsys):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    ad.NoiseSpec(spectral=ad.PowerLaw(-0.3)).save(bad)              # eps = 1e-10
    ad.NoiseSpec(spectral=ad.PowerLaw(-0.3, eps=0.125)).save(good)
    png = str(tmp_path / "noise.png")
    assert cli.main(["show", str(bad), "-o", png, "--size", "8"]) == 0
    captured = capsys.readouterr()
    lines = _warnings(captured.err)
    assert len(lines) == 6  # rings 1..6 of the 8x8 plane; DC is drowned
    for ring in range(1, 7):
        line = next(l for l in lines if f"band r = {ring}/8 cycles/pixel" in l)
        assert line.startswith("anisodiff show: warning: terminal SNR ")
        assert "raise the DC floor eps" in line and "rescale_betas_zero_snr" in line
    assert "white unit-variance data" in captured.out and "6 above" in captured.out
    assert cli.main(["show", str(good), "-o", png, "--size", "8"]) == 0
    captured = capsys.readouterr()
    assert _warnings(captured.err) == [] and "threshold 0.1: ok" in captured.out
    # the threshold option: the six SNRs are ~0.20, 0.29, 0.35, 0.42, 0.48, 0.51
    assert cli.main(["show", str(bad), "-o", png, "--size", "8", "--snr-threshold", "0.4"]) == 0
    assert len(_warnings(capsys.readouterr().err)) == 3
    assert cli.main(["show", str(bad), "-o", png, "--size", "8", "--snr-threshold", "0.6"]) == 0
    assert _warnings(capsys.readouterr().err) == []


def test_fit_warns_when_the_fitted_power_law_has_the_papers_floor(tmp_path, capsys):
    common = ["fit", "procedural", "--limit", "64", "--size", "8", "--spectral", "power_law"]
    assert cli.main([*common, "-o", str(tmp_path / "a.json"), "--eps", "1e-10"]) == 0
    captured = capsys.readouterr()
    lines = _warnings(captured.err)
    assert lines and all(l.startswith("anisodiff fit: warning: terminal SNR") for l in lines)
    assert all("band r = " in l and "raise the DC floor eps" in l for l in lines)
    assert "terminal SNR at t = 999" in captured.out
    assert cli.main([*common, "-o", str(tmp_path / "b.json")]) == 0  # the default floor
    captured = capsys.readouterr()
    assert _warnings(captured.err) == [] and "threshold 0.1: ok" in captured.out


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_fit_on_latents_with_a_report_and_show_with_its_stats(tmp_path, capsys):
    import safetensors.torch

    from anisodiff.fit import fit_statistics

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(20, 16, 8, 8, generator=g) * torch.linspace(0.5, 2, 16)[:, None, None]
    (tmp_path / "cache").mkdir()
    for i, part in enumerate(latents.split(7)):
        safetensors.torch.save_file({"latents": part.contiguous()},
                                    str(tmp_path / "cache" / f"{i}.safetensors"))
    spec_path, report = tmp_path / "spec.json", tmp_path / "stats.json"
    assert cli.main(["fit", str(tmp_path / "cache"), "-o", str(spec_path), "--k", "2",
                     "--report", str(report), "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "20 images of 16x8x8" in out and "per channel: mean, std, alpha" in out
    assert "    c15 " in out and "more channels" not in out  # 16 channels: all listed
    pca, spectrum = fit_statistics(latents, k=2, progress=False)
    stats = json.loads(report.read_text())
    assert stats["shape"] == [16, 8, 8] and stats["pixels"] == 20 * 64
    assert stats["channels"]["std"] == pytest.approx(pca.std.tolist(), rel=1e-6)
    assert stats["channels"]["mean"] == pytest.approx(pca.mean.tolist(), rel=1e-6, abs=1e-9)
    assert torch.allclose(torch.tensor(stats["spectrum"]["radial_power"], dtype=torch.float64),
                          spectrum.radial_power, rtol=1e-6)
    assert stats["terminal_snr"]["warnings"] == []
    assert ad.NoiseSpec.load(spec_path).squeeze.axes.shape == (16, 2)
    # show reads the data statistics (channels and plane size from them)
    bad = tmp_path / "bad.json"
    ad.NoiseSpec(spectral=ad.PowerLaw(-0.3)).save(bad)
    assert cli.main(["show", str(bad), "-o", str(tmp_path / "n.png"), "--stats", str(report),
                     "--timesteps", "999"]) == 0
    captured = capsys.readouterr()
    assert "16x8x8 planes" in captured.out and "the --stats data" in captured.out
    assert len(_warnings(captured.err)) >= 3


def test_fit_on_video_latents_prints_frames(tmp_path, capsys):
    video = torch.randn(3, 4, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save({"latents": video}, tmp_path / "video.pt")
    assert cli.main(["fit", str(tmp_path / "video.pt"), "-o", str(tmp_path / "s.json")]) == 0
    assert "3 videos of 4x5x8x8 (15 frames)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def snr_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("snr")
    torch.save({"mu": torch.zeros(2, 4, 8, 8), "logvar": torch.zeros(2, 4, 8, 8)}, root / "two.pt")
    ad.NoiseSpec(spectral=ad.PowerLaw(-0.3)).save(root / "spec.json")
    ad.NoiseSpec(ad.Squeeze(torch.eye(3)[:, :1])).save(root / "rgb.json")
    (root / "stats.json").write_text('{"data_statistics": {"shape": [8, 8], "covariance": [[1.0]]}}')
    return root


@pytest.mark.parametrize("argv, message", [
    (["fit", "procedural", "--snr-threshold", "0"], "--snr-threshold"),
    (["fit", "procedural", "--snr-threshold", "nan"], "--snr-threshold"),
    (["fit", "procedural", "--snr-schedule", "cosine"], "invalid choice"),
    (["fit", "procedural", "--limit", "4", "--key", "latents"], "--key applies only"),
    (["fit", "{root}/two.pt"], "pass key="),
    (["fit", "{root}/two.pt", "--key", "z"], "no entry 'z'"),
    (["fit", "{root}/two.pt", "--key", "mu", "--size", "8"], "used as stored"),
    (["fit", "procedural", "--report", "{root}/nowhere/r.json"], "does not exist"),
    (["show", "{root}/spec.json", "--stats", "{root}/missing.json"], "cannot read"),
    (["show", "{root}/spec.json", "--stats", "{root}/stats.json"], "band_power: missing"),
])
def test_snr_and_latent_options_bad_input_exit_with_code_2(snr_inputs, argv, message, capsys):
    argv = [a.replace("{root}", str(snr_inputs)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
