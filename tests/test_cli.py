"""The command line, run in-process: `anisodiff demo` (table, JSON report, picture) and
`anisodiff info`.

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
from anisodiff import cli

SAMPLES = 4000
OPERATORS = {"isotropic", "sdm", "hdm", "power_law", "band_pass"}
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One `anisodiff demo` run: (exit code, output directory, parsed report)."""
    out = tmp_path_factory.mktemp("demo")
    code = cli.main(["demo", "--out", str(out), "--samples", str(SAMPLES), "--size", "32",
                     "--seed", "3"])
    report = json.loads((out / "demo_report.json").read_text())
    return code, out, report


def test_demo_succeeds_and_every_operator_passes(demo):
    code, _, report = demo
    assert code == 0
    assert set(report["operators"]) == OPERATORS
    assert all(op["status"] == "PASS" for op in report["operators"].values())
    assert report["all_passed"] is True
    assert report["setting"]["samples"] == SAMPLES


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_demo_writes_a_valid_png(demo):
    import matplotlib.image

    _, out, report = demo
    png = out / "demo.png"
    assert report["figure"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 1_000_000
    height, width = matplotlib.image.imread(png).shape[:2]
    assert 600 <= width <= 2000 and 600 <= height <= 2000


def test_demo_squeeze_variances_match_closed_forms(demo):
    ops = demo[2]["operators"]
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


def test_demo_spectral_shares_match_closed_forms(demo):
    ops = demo[2]["operators"]
    exact = {
        "isotropic": 9 / 64,   # bins with kx^2 + ky^2 < 4
        "band_pass": 8 / 20,   # of the 20 bins with 0.1 <= r <= 0.3, 8 have r < 0.25
        "power_law": _low_share_closed_form(lambda r: (r + cli.POWER_LAW_EPS) ** -1.0),
    }
    for name, share in exact.items():
        low = ops[name]["low_frequency_share"]
        assert low["analytic"] == pytest.approx(share, rel=1e-9), name
        assert abs(low["measured"] - share) < 0.02, name
        assert ops[name]["high_frequency_share"]["analytic"] == pytest.approx(1 - share, rel=1e-9)


def test_demo_frobenius_error_is_at_the_sampling_level(demo):
    ops = demo[2]["operators"]
    n = 3 * 8 * 8
    expected_isotropic = math.sqrt((n + n * n) / SAMPLES / n)  # Sigma = I
    iso = ops["isotropic"]["rel_frobenius_error"]
    assert expected_isotropic < iso["tolerance"] < 1.1 * expected_isotropic
    for name, op in ops.items():
        err = op["rel_frobenius_error"]
        assert 0 < err["measured"] <= err["tolerance"] < 0.5, name


def test_demo_prints_the_table(demo, capsys):
    code = cli.main(["demo", "--out", str(demo[1] / "again"), "--samples", "500", "--no-plot"])
    text = capsys.readouterr().out
    assert code == 0
    for name in OPERATORS:
        assert name in text
    assert text.count("PASS") >= 5 and "FAIL" not in text
    assert "standard errors" in text
    assert not (demo[1] / "again" / "demo.png").exists()


def test_demo_without_matplotlib_or_tqdm(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert cli.main(["demo", "--out", str(tmp_path), "--samples", "500"]) == 0
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.out and "anisodiff[viz]" in captured.out
    assert "covariance check: 5/5" in captured.err  # the plain progress fallback
    assert json.loads((tmp_path / "demo_report.json").read_text())["figure"] is None
    assert not (tmp_path / "demo.png").exists()


def test_info_prints_version_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"anisodiff {ad.__version__}" in out
    assert "reference" in out


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--samples", "0"], "--samples"),
    (["demo", "--samples", "many"], "expected an integer"),
    (["demo", "--size", "4"], "--size"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_out_exits_with_code_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "sub"), "--samples", "500"]) == 2
    assert "--out" in capsys.readouterr().err


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "anisodiff.cli", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert ad.__version__ in result.stdout


def test_covariance_check_rejects_a_wrong_operator():
    """The demo's PASS means something: samples of SDM s = -0.4 fail against a slightly different
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
