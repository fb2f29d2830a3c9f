"""The opt-in spatio-temporal spectrum, NoiseSpec(temporal=True) (docs/design.md section 6).

Each (b, c) F x H x W volume of a video tensor is filtered by a 3-D FFT with weights over
(f_t, f_y, f_x), radius sqrt(f_t^2 + f_y^2 + f_x^2) on each axis' own fftfreq grid; per-sample
normalisation is per volume, the DC bin (and the offset) the volume's. reference.py is the
specification; the kernels refuse the mode and "auto" runs the reference.
"""
import json
import math

import pytest
import torch

import anisodiff as ad
from anisodiff import _autoselect
from anisodiff import reference as R

from conftest import random_axes, requires_compiled

SEED, OFFSET = 99, 3


def _temporal(spec: ad.NoiseSpec) -> ad.NoiseSpec:
    return ad.NoiseSpec(spec.squeeze, spec.spectral, normalize=spec.normalize, radius=spec.radius,
                        offset=spec.offset, temporal=True)


def _unitary_dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n) / math.sqrt(n)


def _analytic_volume_covariance(F, H, W, alpha, eps, offset, convention="cycles"):
    """Sigma_w3 = U^H diag(P) U with U the unitary 3-D DFT (Kronecker of 1-D ones) and P the
    calibrated power on the 3-D radius, plus the offset's o^2 N on the DC bin; written from the
    definition, not through reference.py's FFT code."""
    ft = torch.fft.fftfreq(F, dtype=torch.float64)
    fy = torch.fft.fftfreq(H, dtype=torch.float64)
    fx = torch.fft.fftfreq(W, dtype=torch.float64)
    r = torch.sqrt(ft[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2)
    if convention == "rmax1":
        r = r / r.max()
    w = (r + eps) ** alpha
    P = (w**2 / (w**2).mean()).reshape(-1)
    P[0] += offset**2 * F * H * W
    U = torch.kron(torch.kron(_unitary_dft(F), _unitary_dft(H)), _unitary_dft(W))
    return (U.conj().T @ torch.diag(P.to(torch.complex128)) @ U).real


@pytest.mark.parametrize("convention", ["cycles", "rmax1"])
@pytest.mark.parametrize("offset", [0.0, 0.4])
def test_covariance_is_the_analytic_3d_one(convention, offset, schedule):
    F, H, W, C = 3, 4, 5, 3
    axes = random_axes(C, 1, seed=2)
    sq = ad.Squeeze(axes, 0.8, schedule="constant")
    spec = ad.NoiseSpec(sq, ad.PowerLaw(-1.2, eps=0.05), radius=convention,
                        offset=ad.OffsetNoise(offset) if offset else None, temporal=True)
    got = ad.covariance(spec, (1, C, F, H, W))
    S = R.squeeze_matrices(sq, R.squeeze_strengths(sq, None, None))[0]
    want = torch.kron(S @ S.T, _analytic_volume_covariance(F, H, W, -1.2, 0.05, offset, convention))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # calibrated: unit mean variance per element, plus the offset's o^2; frames are correlated
    assert abs(float(ad.covariance(spec.spatial_part(), (1, 1, F, H, W)).diagonal().mean())
               - (1 + offset**2)) < 1e-12
    per_frame = ad.covariance(ad.NoiseSpec(sq, spec.spectral, radius=convention), (1, C, F, H, W))
    assert (got - per_frame).abs().max() > 0.05


def test_empirical_spectrum_of_many_draws_is_the_3d_weights():
    """E |fftn(n)|^2 / N = c^2 w(f_t, f_y, f_x)^2 bin by bin over 4096 volumes (relative sd 1/64 per
    bin, bound 0.1); the per-frame spectrum (no f_t dependence) fails the same check."""
    B, C, F, H, W = 256, 16, 4, 8, 8
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-1.5, eps=0.05), temporal=True)
    n = ad.shaped_noise((B, C, F, H, W), spec, seed=SEED, dtype=torch.float64)
    power = (torch.fft.fftn(n, dim=(-3, -2, -1)).abs() ** 2).mean(dim=(0, 1)) / (F * H * W)
    (w, _), = R.spatial_stages(spec, H, W, F)
    ratio = power / w**2
    assert (ratio - 1).abs().max() < 0.1, float((ratio - 1).abs().max())
    per_frame = R.shaped_noise((B, C, F, H, W), ad.NoiseSpec(spectral=spec.spectral), seed=SEED,
                               dtype=torch.float64)
    pf_power = (torch.fft.fftn(per_frame, dim=(-3, -2, -1)).abs() ** 2).mean(dim=(0, 1)) / (F * H * W)
    assert (pf_power / w**2 - 1).abs().max() > 0.5


@pytest.mark.parametrize("spec", [
    ad.NoiseSpec(spectral=ad.PowerLaw(-1.0)),
    ad.NoiseSpec(spectral=ad.Band(0.1, 0.3), normalize="per_sample", radius="rmax1"),
    ad.NoiseSpec(spectral=ad.TwoBand(0.7, (0, 0.2), 0.3, (0.2, 1), mixture="independent"),
                 radius="nyquist1"),
    ad.NoiseSpec(spectral=ad.PowerLaw(0.8), offset=ad.OffsetNoise(0.2)),
    ad.NoiseSpec(normalize="per_sample"),
], ids=["powerlaw", "band_per_sample_rmax1", "two_indep", "offset", "per_sample_only"])
def test_f1_is_the_per_frame_spectrum(spec, schedule):
    """F = 1 has only f_t = 0: the 3-D radius, its max, the DC bin and the volume are the frame's."""
    shape = (2, 3, 1, 6, 5)
    got = ad.shaped_noise(shape, _temporal(spec), seed=SEED, dtype=torch.float64)
    want = ad.shaped_noise(shape, spec, seed=SEED, dtype=torch.float64, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(R.spatiotemporal_radius(1, 6, 5, "rmax1")[0], R.radius(6, 5, "rmax1"),
                               rtol=0, atol=0)


def test_per_sample_normalisation_and_offset_are_per_volume():
    B, C, F, H, W = 3, 2, 4, 6, 6
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(1.0), normalize="per_sample", temporal=True)
    n = ad.shaped_noise((B, C, F, H, W), spec, seed=SEED, dtype=torch.float64)
    vol_std = n.std(dim=(-3, -2, -1), correction=0)
    torch.testing.assert_close(vol_std, torch.ones_like(vol_std), rtol=0, atol=1e-6)
    assert (n.std(dim=(-2, -1), correction=0) - 1).abs().max() > 1e-3  # not per frame
    # the offset is one constant per (b, c) volume: the same DC in every frame
    off = ad.NoiseSpec(offset=ad.OffsetNoise(5.0), temporal=True)
    m = ad.shaped_noise((B, C, F, H, W), off, seed=SEED, dtype=torch.float64)
    white = R.white_noise((B, C, F, H, W), SEED)
    torch.testing.assert_close(m - white, (m - white)[:, :, :1, :1, :1].expand_as(m), rtol=0, atol=1e-10)


def test_add_noise_and_apply_operator_run_the_reference(schedule):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, seed=1), 0.5), ad.PowerLaw(-0.5), temporal=True)
    x0, t = torch.randn(2, 3, 4, 8, 8), torch.tensor([5, 800])
    x_t, eps = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.1)
    x_r, eps_r = R.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.1)
    torch.testing.assert_close(x_t, x_r, rtol=0, atol=0)
    torch.testing.assert_close(eps, eps_r, rtol=0, atol=0)
    white = R.white_noise(x0.shape, SEED, OFFSET)
    torch.testing.assert_close(ad.apply_operator(white, spec, timesteps=t, schedule=schedule),
                               R.apply_operator(white, spec, t, schedule), rtol=0, atol=0)


def test_json_round_trip_and_old_json_unchanged(tmp_path):
    spec = ad.NoiseSpec(spectral=ad.Band(0.05, 0.4), radius="nyquist1", temporal=True)
    d = json.loads(spec.to_json())
    assert d["temporal"] is True
    assert ad.NoiseSpec.from_json(spec.to_json()) == spec
    spec.save(tmp_path / "s.json")
    back = ad.NoiseSpec.load(tmp_path / "s.json")
    assert back.temporal and back == spec
    plain = ad.NoiseSpec(spectral=ad.Band(0.05, 0.4), radius="nyquist1")
    assert "temporal" not in json.loads(plain.to_json()) and plain != spec
    assert "temporal=True" in repr(spec) and "temporal" not in repr(plain)
    assert spec.spatial_part().temporal
    assert ad.NoiseSpec(offset=ad.OffsetNoise(0.5, random_strength=True), temporal=True).draw_offset().temporal


def test_errors_name_the_argument(schedule):
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-1.0), temporal=True)
    with pytest.raises(ValueError, match="shape: the spatio-temporal spectrum"):
        ad.shaped_noise((2, 3, 8, 8), spec, seed=0)
    with pytest.raises(ValueError, match="x0: the spatio-temporal spectrum"):
        ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, schedule)
    with pytest.raises(ValueError, match="eps: the spatio-temporal spectrum"):
        ad.apply_operator(torch.randn(2, 3, 8, 8), spec)
    with pytest.raises(ValueError, match="shape: the spatio-temporal spectrum"):
        ad.covariance(spec, (1, 2, 4, 4))
    with pytest.raises(ValueError, match="temporal: SpectralTable"):
        ad.NoiseSpec(spectral=ad.SpectralTable(torch.ones(4, 4)), temporal=True)
    with pytest.raises(ValueError, match="temporal: PyramidNoise"):
        ad.NoiseSpec(spectral=ad.PyramidNoise(3, 0.5), temporal=True)
    with pytest.raises(TypeError, match="temporal: expected a bool"):
        ad.NoiseSpec(temporal="yes")
    with pytest.raises(ValueError, match="spec.temporal"):  # the sampler's score is per H x W plane
        R.spatial_power(spec, 8, 8)
    for backend in ("cpu", "triton", "cuda"):
        if backend not in ad.available_backends("cpu"):
            continue
        with pytest.raises(ValueError, match="spec: the .* backend does not implement the spatio-temporal"):
            ad.shaped_noise((1, 3, 4, 8, 8), spec, seed=0, backend=backend)


def test_auto_skips_every_kernel_for_the_temporal_mode():
    for backend in ("cpu", "triton", "cuda"):
        assert "temporal" in _autoselect.missing_features(backend, ("temporal",))
    assert not _autoselect.missing_features("reference", ("frames", "temporal"))
    for device_type in ("cpu", "cuda"):
        avail = ("cuda", "triton", "cpu", "reference")
        assert _autoselect.choose(device_type, "spectral", avail, (3, 8, 8), ("frames", "temporal")) == "reference"
    # white noise is white per frame or not: a temporal spec without a filter stays on the kernels
    white = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, seed=1), 0.5, schedule="constant"), temporal=True)
    shape = (2, 3, 4, 5, 6)
    torch.testing.assert_close(ad.shaped_noise(shape, white, seed=SEED),
                               ad.shaped_noise(shape, ad.NoiseSpec(white.squeeze), seed=SEED), rtol=0, atol=0)


@requires_compiled
def test_ddpm_step_of_a_temporal_spec_runs_in_the_reference():
    """The fused step filters per frame: auto steps a spatio-temporal spec in the reference (the same
    result as naming it), and a named kernel backend refuses it, naming the spec."""
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(0.5), temporal=True)
    noise = ad.AnisotropicNoise(spec, ad.VPSchedule.linear())
    x = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert ad.sampling.can_fuse_step(x, x, spec) is None
    got = noise.ddpm_step(x, 10, x, generator=torch.Generator().manual_seed(1))
    want = noise.ddpm_step(x, 10, x, backend="reference", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^spec: the cpu backend does not implement the spatio-temporal"):
        noise.ddpm_step(x, 10, x, backend="cpu")
