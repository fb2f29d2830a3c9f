"""The benchmark baselines (benchmarks/baselines.py) draw the SAME DISTRIBUTION as anisodiff.

The baselines use torch.randn, anisodiff its Philox stream, so outputs cannot match bitwise; each
baseline is compared with the analytic truth from ``anisodiff.covariance`` (and the fused kernel is
put through the same statistics). Shape: B = 4096, C = 3, 8 x 8; half the batch at t = 999
(r = s exactly), half at t = 400 (r = 0.4034 s), each half checked against its own covariance (this
also checks the per-sample timestep gather).

Statistics, per timestep group, of the shaped noise n (the returned target):

* ``var_v``: mean per-pixel variance of ``v^T n`` (along the squeeze axis);
* ``var_perp``: mean per-pixel variance of n in the orthogonal colour complement;
* the radial power spectrum of ``v^T n``: ``E|fft2(v^T n)(f)|^2 / HW`` averaged over each ring of
  equal |f|.

Bounds: ``|empirical - truth| <= 5 SE``. The standard error is exact for the variances
(``sqrt(2 tr(Sigma_v^2) / HW^2 / n_planes)``, n Gaussian) and the sample standard error over planes
for the spectra. The same seeds are used every run, so the tests are deterministic. Their power is
asserted too (``_assert_power``): each wrong constant below lies >= 10 SE outside the truth, i.e.
at least twice the acceptance band away from it:

* squeezing with ``e^{-r/2}`` instead of ``e^{-r}``: var_v at t = 999, s = -0.4 drops from
  e^{0.8} = 2.226 to e^{0.4} = 1.492 (-33 %; SE about 0.4 %, so > 80 SE);
* HDM orthogonal gain ``e^{r}`` instead of ``e^{r/2}``: var_perp 0.670 -> 0.449 (-33 %);
* missing calibration: power law alpha = -0.04 on 8x8 has mean(w^2) = 1.167 (+17 %, > 25 SE);
  band [0, 0.25] keeps 13 of 64 bins, mean(w^2) = 0.203 (-80 %).

``sagd_appendix`` normalises every (b, c) plane by its own std (ddof = 0): each plane's std must be 1
to 1e-5 (ddof = 1 would give sqrt(63/64) = 0.992), and its spectrum, var_v and channel correlation are
compared (two-sample, 5 SE) with anisodiff ``NoiseSpec(normalize="per_sample")`` draws.

Finally, given the SAME white noise every baseline reproduces ``anisodiff.reference.add_noise`` to
float32 rounding (x_t and target), which pins every constant exactly.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

import anisodiff as ad

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
_spec = importlib.util.spec_from_file_location("anisodiff_bench_baselines", _PATH)
bl = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bl
_spec.loader.exec_module(bl)

B, C, H, W = 4096, 3, 8, 8
HW = H * W
T_GROUPS = (999, 400)
Z = 5.0        # acceptance band, in standard errors
POWER = 10.0   # a wrong constant must lie at least this many SE from the truth

HAS_CPU = bool(ad.build_info().get("cpu"))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _timesteps() -> torch.Tensor:
    t = torch.empty(B, dtype=torch.int64)
    t[: B // 2] = T_GROUPS[0]
    t[B // 2:] = T_GROUPS[1]
    return t


def _case(kind: str, normalize: str = "calibrated"):
    return bl.make_case(kind, B, C, H, W, seed=1, timesteps=_timesteps(), normalize=normalize)


def _complement(v: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [C, C-1] of the complement of unit v."""
    q, _ = torch.linalg.qr(torch.cat([v[:, None], torch.eye(C, dtype=torch.float64)], dim=1))
    return q[:, 1:C]


def _axis(case) -> torch.Tensor:
    if case.axes is not None:
        return case.axes[:, 0].double()
    v = torch.tensor(bl.LUMINANCE_AXIS, dtype=torch.float64)
    return v / v.norm()


_R = bl.radius_table(H, W)
_RINGS = torch.unique(torch.round(_R * 1e9)).tolist()
_RING_IDX = [torch.round(_R * 1e9) == r for r in _RINGS]
_DFT1 = torch.fft.fft(torch.eye(H, dtype=torch.complex128), dim=0)  # [f, p]
_DFT = torch.kron(_DFT1, torch.fft.fft(torch.eye(W, dtype=torch.complex128), dim=0))  # [HW, HW]


def _truth(spec, t: int, v: torch.Tensor) -> dict:
    """Analytic statistics from anisodiff.covariance for timestep t."""
    sigma = ad.covariance(spec, (C, H, W), timesteps=t, schedule=ad.VPSchedule.linear(1000))
    s4 = sigma.reshape(C, HW, C, HW)
    sv = torch.einsum("c,cpdq,d->pq", v, s4, v)                         # [HW, HW] along v
    Q = _complement(v)
    so = torch.einsum("ck,cpdq,dk->pq", Q, s4, Q)                       # summed over C-1 axes
    power = torch.einsum("fp,pq,fq->f", _DFT, sv.to(torch.complex128), _DFT.conj()).real / HW
    power = power.reshape(H, W)
    return {
        "var_v": float(sv.diagonal().mean()),
        "se_v": math.sqrt(2 * float((sv @ sv).trace())) / HW,           # per plane; / sqrt(n) later
        "var_perp": float(so.diagonal().mean()) / (C - 1),
        "rings": [float(power[m].mean()) for m in _RING_IDX],
    }


def _empirical(n: torch.Tensor, v: torch.Tensor) -> dict:
    n = n.double()
    u = torch.einsum("c,bchw->bhw", v, n)
    o = torch.einsum("ck,bchw->bkhw", _complement(v), n)
    pw = torch.fft.fft2(u).abs().square() / HW                          # [b, H, W]
    rings = torch.stack([pw[:, m].mean(dim=1) for m in _RING_IDX], dim=1)  # [b, rings]
    m = u.shape[0]
    return {
        "var_v": float(u.square().mean()),
        "var_perp": float(o.square().mean()),
        "ring_mean": rings.mean(dim=0),
        "ring_se": rings.std(dim=0) / math.sqrt(m),
        "planes": m,
        "v_samples": u.square().mean(dim=(1, 2)),
        "perp_samples": o.square().mean(dim=(2, 3)).reshape(-1),
    }


def _close(emp: float, true: float, se: float, what: str) -> None:
    assert abs(emp - true) <= Z * se + 1e-12, (
        f"{what}: empirical {emp:.5f} vs truth {true:.5f} (|diff| = {abs(emp - true) / se:.1f} SE, "
        f"allowed {Z} SE; SE = {se:.2e})")


def _assert_power(wrong: float, true: float, se: float, what: str) -> None:
    assert abs(wrong - true) >= POWER * se, (
        f"test has no power against {what}: {wrong:.4f} vs {true:.4f} is only "
        f"{abs(wrong - true) / se:.1f} SE")


def _draw(impl: str, case, seed: int = 1234):
    """The shaped-noise target of one call."""
    if impl == "anisodiff_cpu":
        return ad.add_noise(case.x0, case.timesteps, case.spec, case.schedule, seed=seed,
                            backend="cpu")[1]
    g = torch.Generator().manual_seed(seed)
    fn = bl.BASELINES[impl]
    return fn(*case.baseline_args(impl), **case.baseline_kwargs(), generator=g)[1]


# ---------------------------------------------------------------------------------------------
# distribution: calibrated specs against anisodiff.covariance
# ---------------------------------------------------------------------------------------------
_IMPLS = {
    "sdm": ["official_sdm", "eager_vectorised", "anisodiff_cpu"],
    "hdm": ["official_sdm", "eager_vectorised", "anisodiff_cpu"],
    "sdm_powerlaw": ["eager_vectorised", "anisodiff_cpu"],
    "band": ["eager_vectorised", "anisodiff_cpu"],
}
_PARAMS = [(k, i) for k, impls in _IMPLS.items() for i in impls]


@pytest.mark.parametrize("kind,impl", _PARAMS, ids=[f"{k}-{i}" for k, i in _PARAMS])
def test_distribution_matches_covariance(kind, impl):
    if impl == "anisodiff_cpu" and not HAS_CPU:
        pytest.skip("compiled CPU ops not built")
    case = _case(kind)
    v = _axis(case)
    n = _draw(impl, case)
    assert n.shape == case.x0.shape and n.dtype == torch.float32
    for gi, t in enumerate(T_GROUPS):
        sel = case.timesteps == t
        truth = _truth(case.spec, t, v)
        emp = _empirical(n[sel], v)
        m = emp["planes"]
        se_v = truth["se_v"] / math.sqrt(m)
        _close(emp["var_v"], truth["var_v"], se_v, f"{impl} {kind} t={t} var along v")
        se_o = float(emp["perp_samples"].std()) / math.sqrt(emp["perp_samples"].numel())
        _close(emp["var_perp"], truth["var_perp"], se_o, f"{impl} {kind} t={t} var orthogonal to v")
        for j, ring in enumerate(_RINGS):
            _close(float(emp["ring_mean"][j]), truth["rings"][j], float(emp["ring_se"][j]),
                   f"{impl} {kind} t={t} power on ring r={ring * 1e-9:.4f}")

        # the bounds above must reject the plausible wrong constants
        sq = case.spec.squeeze
        if sq is not None and t == 999:
            r = sq.strength[0]  # tau(999) = 1
            _assert_power(math.exp(-r) * truth["var_v"] / math.exp(-2 * r), truth["var_v"], se_v,
                          "squeezing with exp(-r/2)")
            if sq.variant == "heisenberg":
                _assert_power(math.exp(2 * r), truth["var_perp"], se_o, "HDM gain exp(r) (not exp(r/2))")
        if case.weights is not None:
            w = case.weights.double()
            _assert_power(truth["var_v"] * float(w.square().mean()), truth["var_v"], se_v,
                          "missing calibration")


def test_isotropic_floor_is_white():
    case = _case("sdm")
    v = _axis(case)
    n = _draw("isotropic_floor", case)
    emp = _empirical(n, v)
    se = math.sqrt(2 / (HW * emp["planes"]))
    _close(emp["var_v"], 1.0, se, "isotropic var along v")
    _close(emp["var_perp"], 1.0, se / math.sqrt(C - 1), "isotropic var orthogonal")
    for j in range(len(_RINGS)):
        _close(float(emp["ring_mean"][j]), 1.0, float(emp["ring_se"][j]), "isotropic ring power")


@pytest.mark.slow
def test_compiled_eager_distribution():
    """torch.compile of eager_vectorised draws its noise with inductor's own generator
    (~10 s of cold compile: the benchmarks quote this baseline, so it is checked like the others)."""
    fn, why = bl.make_compiled_eager()
    assert fn is not None, why
    case = _case("sdm_powerlaw")
    v = _axis(case)
    n = fn(*case.baseline_args(), **case.baseline_kwargs())[1]
    t = T_GROUPS[0]
    sel = case.timesteps == t
    truth = _truth(case.spec, t, v)
    emp = _empirical(n[sel], v)
    _close(emp["var_v"], truth["var_v"], truth["se_v"] / math.sqrt(emp["planes"]),
           "compiled_eager var along v")
    for j in range(len(_RINGS)):
        _close(float(emp["ring_mean"][j]), truth["rings"][j], float(emp["ring_se"][j]),
               "compiled_eager ring power")
    # and with the same white noise it is the eager function
    eps = torch.randn_like(case.x0)
    got = fn(*case.baseline_args(), **case.baseline_kwargs(), noise=eps)
    want = bl.eager_vectorised(*case.baseline_args(), **case.baseline_kwargs(), noise=eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the SAGD appendix recipe: per-sample normalisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sdm_powerlaw", "band"])
def test_sagd_appendix_per_sample(kind):
    case = _case(kind, normalize="per_sample")
    n = _draw("sagd_appendix", case).double()
    std = n.std(dim=(-2, -1), correction=0)
    assert (std - 1).abs().max() < 1e-5, f"plane std (ddof=0) not 1: max dev {(std - 1).abs().max():.2e}"
    assert abs(math.sqrt((HW - 1) / HW) - 1) > 100 * 1e-5  # ddof=1 would be caught

    # two-sample comparison with anisodiff's per-sample normalisation (spatial part only, as the
    # recipe has no squeeze)
    spec = ad.NoiseSpec(None, case.spec.spectral, normalize="per_sample")
    if HAS_CPU:
        ref = ad.add_noise(case.x0, case.timesteps, spec, case.schedule, seed=99, backend="cpu")[1]
    else:
        ref = ad.add_noise(case.x0[:1024], case.timesteps[:1024], spec, case.schedule, seed=99,
                           backend="reference")[1]
    ref = ref.double()
    v = _axis(case)
    a, b = _empirical(n, v), _empirical(ref, v)
    for j, ring in enumerate(_RINGS):
        se = math.hypot(float(a["ring_se"][j]), float(b["ring_se"][j]))
        _close(float(a["ring_mean"][j]), float(b["ring_mean"][j]), se,
               f"sagd_appendix vs anisodiff per_sample, ring r={ring * 1e-9:.4f}")
    se_v = math.hypot(float(a["v_samples"].std()) / math.sqrt(a["planes"]),
                      float(b["v_samples"].std()) / math.sqrt(b["planes"]))
    _close(a["var_v"], b["var_v"], se_v, "sagd_appendix vs anisodiff per_sample, var along v")
    # channels are independent: the cross-channel correlation of each pixel is ~0
    corr = (n[:, 0] * n[:, 1]).mean()
    assert abs(float(corr)) < Z * math.sqrt(1 / (n.shape[0] * 13)), f"channel correlation {corr:.4f}"


# ---------------------------------------------------------------------------------------------
# same white noise -> same numbers as the reference
# ---------------------------------------------------------------------------------------------
_SAME = [("sdm", "official_sdm"), ("hdm", "official_sdm"), ("sdm", "eager_vectorised"),
         ("hdm", "eager_vectorised"), ("sdm_powerlaw", "eager_vectorised"), ("band", "eager_vectorised"),
         ("sdm_powerlaw", "eager_rfft"), ("band", "eager_rfft"),
         ("sdm_powerlaw", "sagd_appendix"), ("band", "sagd_appendix"), ("sdm", "isotropic_floor")]


@pytest.mark.parametrize("kind,impl", _SAME, ids=[f"{k}-{i}" for k, i in _SAME])
def test_same_white_noise_matches_reference(kind, impl):
    case = bl.make_case(kind, 16, C, 12, 10, seed=3)  # odd-ish plane: 12 x 10
    spec = case.spec
    if impl == "sagd_appendix":
        spec = ad.NoiseSpec(None, spec.spectral, normalize="per_sample")
    elif impl == "isotropic_floor":
        spec = ad.NoiseSpec()
    eps = torch.randn(case.x0.shape, generator=torch.Generator().manual_seed(5))
    kw = {}
    if impl == "eager_rfft":
        impl, kw = "eager_vectorised", {"rfft": True}
    got = bl.BASELINES[impl](*case.baseline_args(impl), **case.baseline_kwargs(), noise=eps, **kw)
    want = ad.add_noise(case.x0, case.timesteps, spec, case.schedule, noise=eps, backend="reference")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_weight_tables_match_anisodiff():
    for spectral, table in [(ad.PowerLaw(-0.04), bl.power_law_table(12, 10, -0.04)),
                            (ad.PowerLaw(0.7), bl.power_law_table(12, 10, 0.7)),
                            (ad.Band(0.1, 0.3), bl.band_table(12, 10, 0.1, 0.3))]:
        w, _ = ad.reference.spectral_weights(ad.NoiseSpec(None, spectral), 12, 10)
        torch.testing.assert_close(table, w[0].float())


def test_baselines_reject_what_their_source_cannot_do():
    case = bl.make_case("sdm_powerlaw", 2, C, 8, 8)
    with pytest.raises(ValueError, match="spectral"):
        bl.official_sdm(*case.baseline_args())
    with pytest.raises(ValueError, match="squeeze"):
        bl.sagd_appendix(*case.baseline_args())
    two_axes = torch.eye(C)[:, :2]
    with pytest.raises(ValueError, match="ONE principal axis"):
        bl.official_sdm(case.x0, case.timesteps, case.alphas_cumprod, case.betas, two_axes, -0.4)
    assert bl.supports("official_sdm", "sdm") and not bl.supports("official_sdm", "band")
    assert bl.supports("sagd_appendix", "band") and not bl.supports("sagd_appendix", "hdm")


# ---------------------------------------------------------------------------------------------
# the official SDM sampler pattern (the sampling benchmark's baseline)
# ---------------------------------------------------------------------------------------------
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def test_official_squeeze_matrices_one_per_sample():
    """A 0-d t (the sampler) gives the same S for every sample, a [B] t (training) one each; S is
    exp(-r) P + (I - P) with r = s beta_t / beta_max (HDM: exp(r / 2) on the complement)."""
    case = _case("sdm")
    x = torch.zeros(5, C, 2, 2)
    v = case.axes[:, 0].double()
    P = torch.outer(v, v)
    betas = case.betas.double()
    for t in (torch.tensor(980), torch.tensor([0, 1, 500, 980, 999])):
        S = bl.official_sdm_squeeze_matrices(x, t, case.betas, case.axes, -0.4)
        Sh = bl.official_sdm_squeeze_matrices(x, t, case.betas, case.axes, -0.4, "heisenberg")
        assert S.shape == Sh.shape == (5, C, C)
        for i in range(5):
            r = -0.4 * float(betas[t if t.dim() == 0 else t[i]] / betas.max())
            I = torch.eye(C, dtype=torch.float64)
            assert torch.allclose(S[i].double(), math.exp(-r) * P + (I - P), atol=1e-6)
            assert torch.allclose(Sh[i].double(), math.exp(-r) * P + math.exp(r / 2) * (I - P), atol=1e-6)


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="needs diffusers")
def test_official_sampler_step_matches_aniso_ddpm_scheduler():
    """The official ConsistentCustomDDPMScheduler.step pattern (S^-1, stock step, S) and
    anisodiff's AnisoDDPMScheduler.step (sampling_mode="official", the closed form of
    docs/papers.md section 1.4) draw the same white noise from the same generator and must agree, clipping
    included, at every step of a 50-step run; the official prior is S(T-1) z."""
    from diffusers import DDPMScheduler

    from anisodiff.integrations.diffusers import AnisoDDPMScheduler

    case = bl.make_case("sdm", 8, C, 4, 4, seed=2)
    stock = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    aniso = AnisoDDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", noise_spec=case.spec)
    stock.set_timesteps(50)
    aniso.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 4, 4, generator=g) * 1.5       # large enough that clipping happens
    for t in stock.timesteps:
        eps = torch.randn(8, C, 4, 4, generator=g)
        a, a0 = bl.official_sdm_ddpm_step(stock, eps, t, x, case.axes, -0.4,
                                          generator=torch.Generator().manual_seed(int(t)))
        out = aniso.step(eps, t, x, generator=torch.Generator().manual_seed(int(t)))
        assert torch.allclose(a, out.prev_sample, atol=2e-5), int(t)
        assert torch.allclose(a0, out.pred_original_sample, atol=2e-5), int(t)
        x = a
    prior = bl.official_sdm_prior((4096, C, 2, 2), case.betas, case.axes, -0.4)
    u = torch.einsum("c,bchw->bhw", case.axes[:, 0], prior)
    assert u.var().item() == pytest.approx(math.exp(0.8), rel=0.05)   # r(999) = s exactly


# ---------------------------------------------------------------------------------------------
# the DDPM-step baselines (anisodiff bench --ops ddpm_step) against anisodiff's step
# ---------------------------------------------------------------------------------------------
from anisodiff.bench import baselines as abl  # noqa: E402  (the step baselines: not re-exported)
from anisodiff import reference  # noqa: E402

STEP_T, STEP_PREV = 500, 499
_STEP_SAME = [("sdm", "eager"), ("hdm", "eager"), ("sdm_powerlaw", "eager"), ("band", "eager"),
              ("sdm_powerlaw", "eager_rfft"), ("band", "eager_rfft"), ("sdm", "isotropic_floor"),
              ("sdm", "official_sdm"), ("hdm", "official_sdm")]


def _stock_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def _step(impl: str, case, mo, x, *, noise=None, seed=None):
    """One step ``STEP_T -> STEP_PREV`` with a baseline; ``seed``: its own white noise from a seeded
    generator (the official step draws it inside diffusers' ``DDPMScheduler.step``)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    if impl == "official_sdm":
        assert noise is None
        return abl.official_sdm_ddpm_step(_stock_scheduler(), mo, torch.tensor(STEP_T), x, case.axes,
                                          case.strength, variant=case.variant, generator=g)
    fn = abl.isotropic_ddpm_step if impl == "isotropic_floor" else abl.eager_ddpm_step
    kw = {"rfft": True} if impl == "eager_rfft" else {}
    return fn(mo, STEP_T, x, case.alphas_cumprod, case.betas, case.axes, case.strength, case.weights,
              variant=case.variant, prev_timestep=STEP_PREV, noise=noise, generator=g, **kw)


@pytest.mark.parametrize("kind,impl", _STEP_SAME, ids=[f"{k}-{i}" for k, i in _STEP_SAME])
def test_step_same_white_noise_matches_reference(kind, impl):
    """Given the same white noise, every DDPM-step baseline reproduces ``anisodiff.reference.
    ddpm_step(mode="official")`` to float32 rounding, x_prev and x0_hat (the sample is scaled up so
    that the clipping in S(t)^-1 coordinates happens); the fused CPU kernel too. The official
    sampler step draws its noise from the generator inside diffusers: the same seed gives the same
    ``torch.randn``."""
    if impl == "official_sdm" and not HAVE_DIFFUSERS:
        pytest.skip("the official sampler step needs diffusers")
    case = abl.make_case(kind, 16, C, 12, 10, seed=3)  # odd-ish plane: 12 x 10
    mo, x = abl.step_inputs(case.x0, case.alphas_cumprod, STEP_T)
    x = 1.5 * x
    spec = ad.NoiseSpec() if impl == "isotropic_floor" else case.spec
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    want = reference.ddpm_step(mo, STEP_T, x, spec, case.schedule, prev_timestep=STEP_PREV, noise=eps)
    assert float((want[1].abs() >= 1 - 1e-6).float().mean()) > 0.05   # clipping is exercised
    got = _step(impl, case, mo, x, seed=5) if impl == "official_sdm" else _step(impl, case, mo, x, noise=eps)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    if HAS_CPU:
        from anisodiff.sampling import fused_ddpm_step

        fused = fused_ddpm_step(mo, STEP_T, x, spec, case.schedule, prev_timestep=STEP_PREV, noise=eps)
        torch.testing.assert_close(fused[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[1], want[1], rtol=1e-5, atol=1e-5)


_STEP_DIST = {
    "sdm": ["official_sdm", "eager", "anisodiff_cpu"],
    "hdm": ["official_sdm", "eager", "anisodiff_cpu"],
    "sdm_powerlaw": ["eager", "anisodiff_cpu"],
    "band": ["eager", "anisodiff_cpu"],
}
_STEP_DIST_PARAMS = [(k, i) for k, impls in _STEP_DIST.items() for i in impls]


@pytest.mark.parametrize("kind,impl", _STEP_DIST_PARAMS, ids=[f"{k}-{i}" for k, i in _STEP_DIST_PARAMS])
def test_step_distribution_matches_anisodiff(kind, impl):
    """Each DDPM-step baseline, drawing its own noise (torch.randn / diffusers' generator), and the
    fused step as users call it (``AnisotropicNoise.ddpm_step(backend="cpu")``, its Philox stream)
    give the same distribution of x_prev: the same mean (anisodiff's noise-free step, to float32
    rounding: x0_hat is deterministic, and the noise has mean zero, checked to 5 SE) and step noise
    ``(x_prev - mean) / sigma_t`` with the covariance of ``A(t) z`` from ``anisodiff.covariance``
    (variance along and across the squeeze axis, radial power spectrum; 5 SE), at t = 500 for 4096
    samples of 3x8x8 (the mean's SE from the per-plane means). Power: unshaped step noise (var 1 along v instead of e^{-2 r(500)} = 1.50
    for s = -0.4, or the uncalibrated filter) lies >= 10 SE away."""
    if impl == "official_sdm" and not HAVE_DIFFUSERS:
        pytest.skip("the official sampler step needs diffusers")
    if impl == "anisodiff_cpu" and not HAS_CPU:
        pytest.skip("compiled CPU ops not built")
    case = abl.make_case(kind, B, C, H, W, seed=1)
    mo, x = abl.step_inputs(case.x0, case.alphas_cumprod, STEP_T)
    mean, x0_want = reference.ddpm_step(mo, STEP_T, x, case.spec, case.schedule, prev_timestep=STEP_PREV)
    if impl == "anisodiff_cpu":
        noise = ad.AnisotropicNoise(case.spec, case.schedule)
        x_prev, x0_hat = noise.ddpm_step(mo, STEP_T, x, prev_timestep=STEP_PREV, mode="official",
                                         generator=torch.Generator().manual_seed(11), backend="cpu")
    else:
        x_prev, x0_hat = _step(impl, case, mo, x, seed=11)
    assert x_prev.shape == x.shape and x_prev.dtype == torch.float32
    torch.testing.assert_close(x0_hat, x0_want, rtol=1e-5, atol=1e-5)
    ab = case.alphas_cumprod.double()
    ab_t, ab_p = ab[STEP_T], ab[STEP_PREV]
    sigma = math.sqrt(float((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)))
    n = (x_prev.double() - mean.double()) / sigma
    v = _axis(case)
    truth = _truth(case.spec, STEP_T, v)
    emp = _empirical(n, v)
    m = emp["planes"]
    se_v = truth["se_v"] / math.sqrt(m)
    what = f"{impl} {kind} ddpm_step t={STEP_T}"
    plane_means = n.mean(dim=(-2, -1))  # [B, C]: the SE of the mean from the per-plane means
    _close(float(plane_means.mean()), 0.0, float(plane_means.std()) / math.sqrt(plane_means.numel()),
           f"{what} noise mean")
    _close(emp["var_v"], truth["var_v"], se_v, f"{what} var along v")
    se_o = float(emp["perp_samples"].std()) / math.sqrt(emp["perp_samples"].numel())
    _close(emp["var_perp"], truth["var_perp"], se_o, f"{what} var orthogonal to v")
    for j, ring in enumerate(_RINGS):
        _close(float(emp["ring_mean"][j]), truth["rings"][j], float(emp["ring_se"][j]),
               f"{what} power on ring r={ring * 1e-9:.4f}")
    if case.spec.squeeze is not None:
        _assert_power(truth["var_v"] / math.exp(-2 * case.strength * float(
            case.betas[STEP_T] / case.betas.max())), truth["var_v"], se_v, "unshaped step noise")
    if case.weights is not None:
        _assert_power(truth["var_v"] * float(case.weights.double().square().mean()), truth["var_v"],
                      se_v, "uncalibrated step filter")


def test_isotropic_step_is_white_and_is_diffusers():
    """The isotropic floor of the step is the stock diffusers ``DDPMScheduler.step`` (same
    generator: the same numbers) and its step noise is white."""
    case = abl.make_case("sdm", B, C, H, W, seed=1)
    mo, x = abl.step_inputs(case.x0, case.alphas_cumprod, STEP_T)
    got = _step("isotropic_floor", case, mo, x, seed=4)
    if HAVE_DIFFUSERS:
        out = _stock_scheduler().step(mo, torch.tensor(STEP_T), x,
                                      generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(got[0], out.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], out.pred_original_sample, rtol=1e-6, atol=1e-6)
    mean, _ = reference.ddpm_step(mo, STEP_T, x, ad.NoiseSpec(), case.schedule)
    ab = case.alphas_cumprod.double()
    sigma = math.sqrt(float((1 - ab[STEP_PREV]) / (1 - ab[STEP_T]) * (1 - ab[STEP_T] / ab[STEP_PREV])))
    emp = _empirical((got[0].double() - mean.double()) / sigma, _axis(case))
    se = math.sqrt(2 / (HW * emp["planes"]))
    _close(emp["var_v"], 1.0, se, "isotropic step var along v")
    _close(emp["var_perp"], 1.0, se / math.sqrt(C - 1), "isotropic step var orthogonal")


@pytest.mark.slow
def test_compiled_eager_ddpm_step():
    """torch.compile of eager_ddpm_step (the benchmark's compiled_eager for ddpm_step): given the
    same white noise it is the eager step (cold compile: several seconds)."""
    fn, why = abl.make_compiled_eager(op="ddpm_step")
    assert fn is not None, why
    case = abl.make_case("sdm_powerlaw", 64, C, 8, 8, seed=2)
    mo, x = abl.step_inputs(case.x0, case.alphas_cumprod, STEP_T)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    args = (mo, STEP_T, x, case.alphas_cumprod, case.betas, case.axes, case.strength, case.weights)
    got = fn(*args, variant=case.variant, prev_timestep=STEP_PREV, noise=eps)
    want = abl.eager_ddpm_step(*args, variant=case.variant, prev_timestep=STEP_PREV, noise=eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(fn(*args, variant=case.variant, prev_timestep=STEP_PREV)[0]).all()


# ---------------------------------------------------------------------------------------------
# the trainers' noise flags (anisodiff bench's trainer kinds)
# ---------------------------------------------------------------------------------------------
def test_kohya_pyramid_is_the_reference_recipe(monkeypatch):
    """The benchmark's kohya pattern (Python random, torch's global randn) and anisodiff's exact
    recipe (a generator) are the same computation: with Python's random.random drawing from torch's
    global generator, both consume the same numbers in the same order and agree to float32
    rounding, including a plane that stops early."""
    import random as pyrandom

    monkeypatch.setattr(pyrandom, "random", lambda: float(torch.rand((), dtype=torch.float64)))
    for shape, levels, discount in (((2, 3, 16, 16), 6, 0.4), ((1, 2, 6, 40), 8, 0.7)):
        white = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(11)
        ours = ad.reference.pyramid_noise_like(white, levels, discount)
        torch.manual_seed(11)
        theirs = bl.kohya_pyramid_noise_like(white.clone(), "cpu", levels, discount)
        # the recipe upsamples each float32 level in float32, the reference in float64
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_trainer_baselines_with_the_same_white_noise():
    """Given the white noise, each flag's baseline adds exactly what the flag means: a per-(b, c)
    constant (offset), the perturbation in x_t only (target = the noise), the flow mix."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    sched = ad.VPSchedule.linear(T=1000)
    ac = sched.alphas_cumprod
    a, b = ac[t].sqrt()[:, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None]
    for fn in (bl.kohya_offset, bl.kohya_offset_random):
        x_t, n = fn(x0, t, ac, sched.betas, noise=eps)
        d = n - eps
        assert float((d - d.mean(dim=(-2, -1), keepdim=True)).abs().max()) < 1e-6  # constant planes
        assert float(d.abs().max()) > 0 or fn is bl.kohya_offset_random
        torch.testing.assert_close(x_t, a * x0 + b * n, rtol=1e-5, atol=1e-5)
    x_t, n = bl.ddpm_input_perturbation(x0, t, ac, sched.betas, noise=eps)
    assert torch.equal(n, eps)
    perturb = (x_t - a * x0 - b * eps) / b
    assert abs(float(perturb.std()) - bl.INPUT_PERTURBATION) < 0.02
    sigmas = torch.rand(8, generator=g)
    x_t, v = bl.flow_matching(x0, sigmas, noise=eps)
    s = sigmas[:, None, None, None]
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(v, eps - x0)
    # kohya's pyramid with given noise leaves the caller's tensor alone
    before = eps.clone()
    bl.kohya_pyramid(x0, t, ac, sched.betas, noise=eps)
    assert torch.equal(eps, before)
