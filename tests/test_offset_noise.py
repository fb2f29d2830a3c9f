"""Offset noise as a DC weight (docs/design.md section 6): ``NoiseSpec(offset=OffsetNoise(o))`` is
the trainers' ``noise + o * randn(B, C, 1, 1)`` in distribution, fused with any spectral part and
squeezed by S(t) like the rest."""
from __future__ import annotations

import json
import math

import pytest
import torch

import anisodiff as ad

from conftest import random_axes, requires_compiled, requires_triton

SCHEDULE = ad.VPSchedule.linear(T=1000)


def kohya_offset_noise(shape, strength, generator):
    """The pattern of kohya sd-scripts / diffusers' --noise_offset (written here): white noise plus
    a per-(sample, channel) constant."""
    B, C = shape[:2]
    return (torch.randn(shape, generator=generator, dtype=torch.float64)
            + strength * torch.randn(B, C, 1, 1, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("spectral", [None, ad.PowerLaw(-0.2), ad.Band(0.0, 0.3)],
                         ids=["white", "power_law", "band"])
def test_covariance_is_the_spectral_one_plus_strength_squared(spectral):
    """Sigma(offset) = Sigma(spectral part) + o^2 (1 1^T) per channel, exactly: a constant plane
    adds o^2 to every pixel pair of a channel and nothing across channels."""
    o, C, H, W = 0.35, 2, 4, 5
    spec = ad.NoiseSpec(spectral=spectral, offset=ad.OffsetNoise(o))
    base = ad.NoiseSpec(spectral=spectral)
    diff = ad.covariance(spec, (C, H, W)) - ad.covariance(base, (C, H, W))
    want = torch.kron(torch.eye(C, dtype=torch.float64), torch.full((H * W, H * W), o * o, dtype=torch.float64))
    torch.testing.assert_close(diff, want, rtol=0, atol=1e-12)


def test_squeezed_offset_covariance(schedule):
    """n = S(t) (T_w eps + o m): Sigma = S S^T (x) (Sigma_w + o^2 1 1^T)."""
    o, C, H, W = 0.5, 3, 3, 4
    sq = ad.Squeeze(random_axes(C, 1), -0.4)
    spec = ad.NoiseSpec(sq, ad.PowerLaw(0.3), offset=ad.OffsetNoise(o))
    t = torch.tensor([700])
    S = ad.reference.squeeze_matrices(sq, ad.reference.squeeze_strengths(sq, t, schedule))[0]
    spatial = ad.covariance(ad.NoiseSpec(spectral=ad.PowerLaw(0.3)), (1, H, W))
    want = torch.kron(S @ S.T, spatial + o * o)
    got = ad.covariance(spec, (C, H, W), timesteps=t, schedule=schedule)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@requires_compiled
@pytest.mark.slow
def test_kernel_noise_matches_the_trainers_recipe_in_distribution():
    """60,000 planes of the CPU kernel and of the trainers' recipe: the plane mean has variance
    1/HW + o^2 and the deviation from it variance 1 - 1/HW, each within 5 standard errors
    (~3%); a DC weight missing its H W factor would give (1 + o^2)/HW, 6x too small."""
    o, B, C, H, W = 0.3, 20000, 3, 8, 8
    n_planes = B * C
    spec = ad.NoiseSpec(offset=ad.OffsetNoise(o))
    ours = ad.shaped_noise((B, C, H, W), spec, seed=11, backend="cpu").double()
    theirs = kohya_offset_noise((B, C, H, W), o, torch.Generator().manual_seed(11))
    for name, n in (("anisodiff", ours), ("kohya recipe", theirs)):
        mean = n.mean(dim=(-2, -1))
        dev = n - mean[..., None, None]
        v_mean, v_dev = 1 / (H * W) + o * o, 1 - 1 / (H * W)
        se = math.sqrt(2 / n_planes)
        assert abs(float(mean.var()) / v_mean - 1) < 5 * se, name
        assert abs(float(dev.pow(2).mean() * H * W / (H * W - 1)) / v_dev - 1) < 5 * se, name
        # channels stay independent: the offset is per (sample, channel)
        corr = torch.corrcoef(mean.T)
        assert (corr - torch.eye(C, dtype=torch.float64)).abs().max() < 5 / math.sqrt(B), name


@requires_compiled
@pytest.mark.parametrize("spectral", [None, ad.PowerLaw(-0.04), ad.TwoBand(0.6, (0, 0.2), 0.4, (0.2, 1.0), mixture="independent")],
                         ids=["white", "power_law", "two_band_independent"])
@pytest.mark.parametrize("target", ["epsilon", "v"])
def test_fused_offset_matches_the_reference(spectral, target):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), spectral, offset=ad.OffsetNoise(0.1))
    x0 = torch.randn(4, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 999])
    got = ad.add_noise(x0, t, spec, SCHEDULE, seed=3, target=target, backend="cpu")
    want = ad.add_noise(x0, t, spec, SCHEDULE, seed=3, target=target, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    plain = ad.add_noise(x0, t, ad.NoiseSpec(spec.squeeze, spectral), SCHEDULE, seed=3, target=target,
                         backend="cpu")
    assert (plain[1] - got[1]).abs().max() > 1e-3  # the offset changes the noise


@requires_triton
def test_triton_offset_matches_the_reference():
    from anisodiff._ext import available_backends
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton interpreter not active")
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.2), offset=ad.OffsetNoise(0.2))
    got = ad.shaped_noise((2, 2, 8, 8), spec, seed=1, backend="triton")
    want = ad.shaped_noise((2, 2, 8, 8), spec, seed=1, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_offset_json_round_trip_and_old_files():
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.1), offset=ad.OffsetNoise(0.05))
    d = json.loads(spec.to_json())
    assert d["offset"] == {"strength": 0.05}
    assert ad.NoiseSpec.from_json(spec.to_json()) == spec
    # a spec without an offset writes no "offset" key: older anisodiff versions still read it
    assert "offset" not in json.loads(ad.NoiseSpec(spectral=ad.PowerLaw(-0.1)).to_json())
    assert ad.NoiseSpec(offset=ad.OffsetNoise(0.0)) == ad.NoiseSpec()
    assert ad.reference.spatial_stages(ad.NoiseSpec(offset=ad.OffsetNoise(0.0)), 4, 4) is None
    assert ad.NoiseSpec(offset=ad.OffsetNoise(0.1)) != ad.NoiseSpec()


@pytest.mark.parametrize("make,error,match", [
    (lambda: ad.OffsetNoise(-0.1), ValueError, "strength: must be >= 0"),
    (lambda: ad.OffsetNoise(float("nan")), ValueError, "strength: must be finite"),
    (lambda: ad.OffsetNoise("0.1"), TypeError, "strength: expected a real number"),
    (lambda: ad.NoiseSpec(offset=0.1), TypeError, "offset: expected anisodiff.OffsetNoise"),
    (lambda: ad.NoiseSpec(spectral=ad.PowerLaw(0.1), normalize="per_sample", offset=ad.OffsetNoise(0.1)),
     ValueError, "offset: not supported with normalize='per_sample'"),
    (lambda: ad.NoiseSpec.from_dict({"offset": {}}), ValueError, "offset.strength: missing"),
    (lambda: ad.NoiseSpec.from_dict({"offset": {"strength": 0.1, "x": 1}}), ValueError, "offset: unknown"),
])
def test_offset_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# kohya's --noise_offset_random_strength: one strength u * s per step, u ~ U[0, 1)
# ---------------------------------------------------------------------------------------------
def kohya_random_strength_offset_noise(shape, strength, generator):
    """The random-strength pattern (written here): ONE uniform factor per step for the whole
    batch, then the offset noise with strength u * s."""
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    return kohya_offset_noise(shape, float(u) * strength, generator)


def test_random_strength_is_recorded_and_drawn_per_step():
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.1), offset=ad.OffsetNoise(0.2, random_strength=True))
    d = json.loads(spec.to_json())
    assert d["offset"] == {"strength": 0.2, "random_strength": True}
    assert ad.NoiseSpec.from_json(spec.to_json()) == spec
    assert spec != ad.NoiseSpec(spectral=ad.PowerLaw(-0.1), offset=ad.OffsetNoise(0.2))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    step = spec.draw_offset(g1)
    u = float(torch.rand((), generator=g2, dtype=torch.float64))
    assert step.offset.strength == pytest.approx(0.2 * u, rel=1e-15)
    assert not step.offset.random_strength and step.spectral == spec.spectral
    assert spec.draw_offset(g1).offset.strength != step.offset.strength  # a new u every step
    fixed = ad.NoiseSpec(offset=ad.OffsetNoise(0.2))
    assert fixed.draw_offset(g1) is fixed  # nothing to draw
    # the family itself has no single noise: the ops refuse it, naming the fix
    with pytest.raises(ValueError, match=r"random_strength=True .*spec.draw_offset\(generator\)"):
        ad.shaped_noise((1, 1, 4, 4), spec, seed=0, backend="reference")
    with pytest.raises(TypeError, match="random_strength: expected a bool"):
        ad.OffsetNoise(0.1, random_strength=1)


@requires_compiled
@pytest.mark.slow
def test_random_strength_matches_the_trainers_recipe_in_distribution():
    """300 steps of 1,500 planes (8 x 8): per step, the excess variance of the plane means over
    the white 1/HW estimates (u s)^2. Over the steps its mean is s^2 E[u^2] = s^2 / 3 and its
    mean square s^4 E[u^4] = s^4 / 5 (a fixed strength sqrt(1/3) s would give s^4 / 9), each
    within 5 standard errors of the steps, and its distribution is that of u^2, for the fused
    kernel and the trainers' recipe."""
    s, steps, B, C, H, W = 0.5, 300, 500, 3, 8, 8
    spec = ad.NoiseSpec(offset=ad.OffsetNoise(s, random_strength=True))
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    est = {"anisodiff": [], "kohya recipe": []}
    for step in range(steps):
        ours = ad.shaped_noise((B, C, H, W), spec.draw_offset(g_ours), seed=1000 + step, backend="cpu")
        theirs = kohya_random_strength_offset_noise((B, C, H, W), s, g_theirs)
        for name, n in (("anisodiff", ours), ("kohya recipe", theirs)):
            est[name].append(float(n.double().mean(dim=(-2, -1)).var()) - 1 / (H * W))
    for name, e in est.items():
        e = torch.tensor(e, dtype=torch.float64) / s**2
        for moment, want in ((e, 1 / 3), (e**2, 1 / 5)):
            se = float(moment.std()) / steps**0.5
            assert abs(float(moment.mean()) - want) < 5 * se, (name, float(moment.mean()), want, se)
        # and u is uniform: Kolmogorov-Smirnov distance of the estimated u^2 to P(u^2 <= x) = sqrt(x)
        # below 0.12 (p ~ 5e-4 at 300 steps); a fixed strength gives ~0.58, u^2 uniform 0.25
        x = e.sort().values
        cdf = x.clamp(0, 1).sqrt()
        k = torch.arange(1, steps + 1, dtype=torch.float64)
        ks = float(torch.maximum(k / steps - cdf, cdf - (k - 1) / steps).max())
        assert ks < 0.12, (name, ks)
