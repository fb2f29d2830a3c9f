"""Pyramid (multi-resolution) noise (docs/design.md section 1, "Pyramid noise"; anisodiff/pyramid.py).

* ``reference.pyramid_noise_like`` IS the trainers' recipe (kohya sd-scripts' ``pyramid_noise_like``):
  checked draw for draw against an eager re-implementation written here the way the recipe is
  written (``nn.Upsample``, in-place adds), fed the same generator.
* ``PyramidNoise(iterations, discount)`` is the stationary Gaussian noise with the recipe's EXPECTED
  power spectrum: its quadrature against a brute-force enumeration of every combination of level
  sizes, and its power against the empirical spectrum of many recipe draws, with bounds that a
  discount off by 0.05 fails.
* The fused CPU kernel against the reference with a squeeze and an offset.
"""
from __future__ import annotations

import json

import pytest
import torch

import anisodiff as ad
from anisodiff import pyramid
from anisodiff.reference import pyramid_noise_like

from conftest import random_axes, requires_compiled, requires_triton

SCHEDULE = ad.VPSchedule.linear(T=1000)


def recipe_as_trainers_write_it(noise, iterations, discount, generator):
    """kohya's pyramid_noise_like pattern, re-written here: the upsampler built once for the
    plane, a random scale factor r in [2, 4) per level (from the generator instead of Python's
    ``random``), in-place adds, the early stop at a 1-pixel side, the global std at the end."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand((), generator=generator, dtype=torch.float64).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=generator).to(noise)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("shape,iterations,discount", [
    ((2, 3, 16, 16), 6, 0.4),     # kohya's defaults
    ((1, 4, 24, 40), 10, 0.8),    # non-square, stops early (40 / r^i reaches 1 late, 24 first)
    ((3, 2, 5, 64), 8, 0.3),      # a 5-pixel side: stops at level 2 at the latest
    ((2, 1, 1, 9), 4, 0.6),       # a 1-pixel side: level 0 only
    ((2, 2, 8, 8), 1, 1.0),       # one level: white + white
])
def test_reference_is_the_trainers_recipe_draw_for_draw(shape, iterations, discount):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    white = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = pyramid_noise_like(white, iterations, discount, generator=g1)
    theirs = recipe_as_trainers_write_it(white.clone(), iterations, discount, g2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # the same random numbers were consumed, in the same order
    assert torch.equal(g1.get_state(), g2.get_state())
    assert abs(float(ours.std()) - 1.0) < 1e-12                   # the global std normalisation
    assert not torch.equal(ours, white / white.std())             # the levels were added


def test_reference_leaves_its_input_alone_and_checks_arguments():
    white = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    before = white.clone()
    pyramid_noise_like(white, 3, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(white, before)
    with pytest.raises(ValueError, match="noise: expected"):
        pyramid_noise_like(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="iterations"):
        pyramid_noise_like(white, 0, 0.5)
    with pytest.raises(ValueError, match="discount"):
        pyramid_noise_like(white, 3, 1.5)


def _brute_force_power(H, W, iterations, discount):
    """E_r[P(f | r) / S(r)] by enumerating every combination of level sizes (and the stop rule)
    with its probability: exponential in the levels, so for small planes only."""
    levels = pyramid._pieces(H, W, iterations, discount)
    out = torch.zeros(H, W, dtype=torch.float64)

    def walk(i, prob, S, P):
        nonlocal out
        if i == iterations:
            out += prob * P / S
            return
        for p, _, _, stops, v, py, px in levels[i]:
            P2 = P + discount ** (2 * i) * torch.outer(py, px)
            if stops:
                out += prob * p * P2 / (S + v)
            else:
                walk(i + 1, prob * p, S + v, P2)
    walk(0, 1.0, 1.0, torch.ones(H, W, dtype=torch.float64))
    return out


@pytest.mark.parametrize("H,W,iterations,discount", [(12, 10, 4, 0.6), (16, 16, 6, 0.4),
                                                     (9, 20, 5, 0.9), (1, 8, 3, 0.5)])
def test_expected_power_quadrature_equals_the_enumeration(H, W, iterations, discount):
    got = pyramid.expected_power(H, W, iterations, discount)
    want = _brute_force_power(H, W, iterations, discount)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    assert abs(float(got.mean()) - 1.0) < 1e-11  # unit per-pixel variance, as the recipe's std
    torch.testing.assert_close(got, torch.roll(torch.flip(got, (0, 1)), (1, 1), (0, 1)))  # w(f) = w(-f)


@pytest.mark.parametrize("n_out", [1, 2, 7, 16, 45, 128])
def test_upsampled_power_is_the_per_column_spectrum(n_out):
    """The banded autocorrelation shortcut against its definition: the DFT power of every column
    of the 1-D bilinear upsampling matrix, summed (the matrix taken from F.interpolate itself)."""
    for n_in in sorted({1, 2, 3, max(1, n_out // 3), max(1, n_out // 2), n_out - 1, n_out} - {0}):
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
        cols = torch.nn.functional.interpolate(eye, size=(n_out, 1), mode="bilinear",
                                               align_corners=False)[:, 0, :, 0]
        want = (torch.fft.fft(cols, dim=1).abs() ** 2).sum(dim=0) / n_out
        torch.testing.assert_close(pyramid._upsampled_power(n_out, n_in), want, rtol=1e-12, atol=1e-12)


def test_level_size_probabilities_sum_to_one():
    for level in range(5):
        pieces = pyramid._joint_sizes(37, 64, level)
        assert abs(sum(p for p, _, _ in pieces) - 1.0) < 1e-12
    # level 1 of a 16-pixel side: floor(16 / r) for r in [2, 4) is 4..7 (8 only at r = 2 exactly)
    sizes = {h: p for p, h, _ in pyramid._joint_sizes(16, 16, 1)}
    assert set(sizes) == {4, 5, 6, 7}
    assert sizes[7] == pytest.approx((16 / 7 - 2.0) / 2)    # r <= 16/7
    assert sizes[4] == pytest.approx((4.0 - 16 / 5) / 2)    # r > 16/5


@pytest.mark.parametrize("discount", [0.4, 0.8])
def test_spectral_part_has_the_recipes_expected_spectrum(discount):
    """600 recipe calls of 32 planes each (16 x 16, 6 levels): the mean periodogram per frequency
    bin against PyramidNoise's power (what the kernels apply), in standard errors computed from
    the per-call means (calls are independent; planes of one call share r and the std). Every one
    of the 256 bins within 5 standard errors; the same spectrum for a discount 0.05 off misses by
    far more (at least 8 standard errors in some bin)."""
    H = W = 16
    B, C, calls, levels = 8, 4, 600, 6
    g = torch.Generator().manual_seed(1234)
    per_call = torch.empty(calls, H, W, dtype=torch.float64)
    for c in range(calls):
        n = pyramid_noise_like(torch.randn(B, C, H, W, generator=g), levels, discount, generator=g)
        per_call[c] = (torch.fft.fft2(n).abs() ** 2).mean(dim=(0, 1)) / (H * W)
    mean, se = per_call.mean(0), per_call.std(0) / calls**0.5
    spec = ad.NoiseSpec(spectral=ad.PyramidNoise(levels, discount))
    fused_power = ad.reference.spatial_power(spec, H, W)
    torch.testing.assert_close(fused_power, pyramid.expected_power(H, W, levels, discount),
                               rtol=1e-12, atol=0)
    z = ((mean - fused_power) / se).abs()
    assert float(z.max()) < 5.0, float(z.max())
    for wrong in (discount - 0.05, discount + 0.05):
        z_wrong = ((mean - pyramid.expected_power(H, W, levels, wrong)) / se).abs()
        assert float(z_wrong.max()) > 8.0, (wrong, float(z_wrong.max()))
    # and the spectrum is far from white: the low bins carry several times the mean power
    assert float(fused_power[0, 0]) > 3.0 and float(fused_power[0, 1]) > 1.5


@requires_compiled
@pytest.mark.parametrize("target", ["epsilon", "v"])
def test_fused_pyramid_matches_the_reference(target):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), ad.PyramidNoise(6, 0.5),
                        offset=ad.OffsetNoise(0.1))
    x0 = torch.randn(4, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 999])
    got = ad.add_noise(x0, t, spec, SCHEDULE, seed=3, target=target, backend="cpu")
    want = ad.add_noise(x0, t, spec, SCHEDULE, seed=3, target=target, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    white = ad.add_noise(x0, t, ad.NoiseSpec(spec.squeeze, offset=spec.offset), SCHEDULE, seed=3,
                         target=target, backend="cpu")
    assert (white[1] - got[1]).abs().max() > 0.1  # the pyramid spectrum changes the noise


@requires_triton
def test_triton_pyramid_matches_the_reference():
    from anisodiff._ext import available_backends
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton interpreter not active (TRITON_INTERPRET=1)")
    spec = ad.NoiseSpec(spectral=ad.PyramidNoise(5, 0.6), offset=ad.OffsetNoise(0.2))
    got = ad.shaped_noise((2, 2, 8, 12), spec, seed=1, backend="triton")
    want = ad.shaped_noise((2, 2, 8, 12), spec, seed=1, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pyramid_spec_json_and_errors():
    spec = ad.NoiseSpec(spectral=ad.PyramidNoise(8, 0.3))
    d = json.loads(spec.to_json())
    assert d["spectral"] == {"type": "pyramid", "iterations": 8, "discount": 0.3}
    assert ad.NoiseSpec.from_json(spec.to_json()) == spec
    assert ad.NoiseSpec.from_json(spec.to_json()).spectral.iterations == 8
    with pytest.raises(ValueError, match="iterations: must be in"):
        ad.PyramidNoise(0, 0.3)
    with pytest.raises(TypeError, match="iterations: expected an integer"):
        ad.PyramidNoise(2.5, 0.3)
    with pytest.raises(ValueError, match="discount: must be in"):
        ad.PyramidNoise(6, -0.1)
    with pytest.raises(ValueError, match="spectral.discount: missing"):
        ad.NoiseSpec.from_dict({"spectral": {"type": "pyramid", "iterations": 3}})
