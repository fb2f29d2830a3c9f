"""Any plane length runs in O(N log N): mixed radix for small prime factors, Bluestein (chirp-z
through a power-of-two FFT) for lengths with a prime factor above 61 (csrc/include/anisodiff/
spectral.h). Every length is checked against the float64 reference on the same stream; a wrong
chirp, a wrong convolution length or a wrong inverse sign changes the noise by O(1)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import anisodiff as ad

from conftest import requires_compiled

SCHEDULE = ad.VPSchedule.linear(T=1000)

# (H, W): primes above and below the Bluestein threshold (61), semi-primes of two large primes,
# a large prime times small factors, powers of two, and 1-pixel-wide planes.
LENGTHS = [
    (61, 8),       # largest direct prime: generic butterfly
    (67, 8),       # smallest Bluestein prime
    (97, 89),      # both directions Bluestein
    (134, 15),     # 2 * 67: Bluestein on a composite length
    (8, 4087),     # 61 * 67: semi-prime of two large primes
    (64, 128),     # powers of two
    (257, 4),
    (1, 1009),
    (1009, 1),
]
SPECS = {
    "power_law": lambda: ad.NoiseSpec(spectral=ad.PowerLaw(-0.3)),
    "band_per_sample": lambda: ad.NoiseSpec(spectral=ad.Band(0.05, 0.3), normalize="per_sample"),
    "two_band_independent": lambda: ad.NoiseSpec(
        spectral=ad.TwoBand(0.7, (0.0, 0.2), 0.3, (0.2, 0.8), mixture="independent")),
}


def close(actual, expected, what=""):
    exp = expected.double()
    scale = max(1.0, float(exp.abs().max()))
    torch.testing.assert_close(actual.double(), exp, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


@requires_compiled
@pytest.mark.parametrize("hw", LENGTHS, ids=[f"{h}x{w}" for h, w in LENGTHS])
@pytest.mark.parametrize("name", list(SPECS))
def test_any_plane_length_matches_the_reference(hw, name):
    spec = SPECS[name]()
    shape = (2, 3, *hw)
    got = ad.shaped_noise(shape, spec, seed=5, offset=3, backend="cpu")
    want = ad.shaped_noise(shape, spec, seed=5, offset=3, backend="reference")
    close(got, want, f"{name} {hw}")
    assert float(got.std()) > 0.1  # not vacuous: real noise came out


@requires_compiled
@pytest.mark.parametrize("hw", [(67, 8), (97, 89), (8, 4087)])
def test_bluestein_lengths_are_bit_stable(hw):
    """The same length gives the same bits on every call and any thread count."""
    spec = SPECS["power_law"]()
    x0 = torch.randn(3, 2, *hw, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 500, 999])
    first = ad.add_noise(x0, t, spec, SCHEDULE, seed=9, backend="cpu")
    torch.set_num_threads(1)
    again = ad.add_noise(x0, t, spec, SCHEDULE, seed=9, backend="cpu")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@requires_compiled
def test_bluestein_add_noise_and_apply_operator_match_the_reference():
    spec = ad.NoiseSpec(ad.Squeeze(torch.tensor([[0.6], [0.8]]), -0.4), ad.PowerLaw(-0.5))
    x0 = torch.randn(2, 2, 67, 131, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 800])
    for target in ("epsilon", "v"):
        got = ad.add_noise(x0, t, spec, SCHEDULE, seed=4, target=target, backend="cpu")
        want = ad.add_noise(x0, t, spec, SCHEDULE, seed=4, target=target, backend="reference")
        close(got[0], want[0], f"x_t {target}")
        close(got[1], want[1], target)
    eps = torch.randn(2, 2, 67, 131, generator=torch.Generator().manual_seed(3))
    close(ad.apply_operator(eps, spec, timesteps=t, schedule=SCHEDULE, backend="cpu"),
          ad.apply_operator(eps, spec, timesteps=t, schedule=SCHEDULE, backend="reference"), "apply")


_HANG_CHILD = textwrap.dedent("""
    import torch, anisodiff as ad
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.04))
    x0 = torch.zeros(1, 1, 1, 1048573)   # a prime length: O(p^2) before Bluestein (hours)
    xt, n = ad.add_noise(x0, 0, spec, ad.VPSchedule.linear(1000), seed=0, backend="cpu")
    ref = ad.add_noise(x0, 0, spec, ad.VPSchedule.linear(1000), seed=0, backend="reference")[1]
    err = float((n.double() - ref.double()).abs().max() / ref.double().abs().max())
    print("ERR", err, float(n.std()))
""")


@requires_compiled
def test_a_million_point_prime_plane_finishes():
    """[1, 1, 1, 1048573] (a prime) used to run for hours; it now finishes in about two seconds.
    The generous limit only keeps a regression from hanging the suite; it is no speed test."""
    out = subprocess.run([sys.executable, "-c", _HANG_CHILD], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    _, err, std = out.stdout.split()
    assert float(err) < 1e-5 and float(std) > 0.5


def test_auto_skips_cuda_for_sides_with_large_prime_factors():
    """The CUDA planner refuses spectral planes whose sides have a prime factor above 61 (no
    Bluestein there yet); "auto" on a CUDA device then falls through instead of failing."""
    from anisodiff import _autoselect as A
    assert A.largest_prime_factor(4087) == 67 and A.largest_prime_factor(64) == 2
    assert A.largest_prime_factor(61) == 61 and A.largest_prime_factor(1) == 1
    available = ("cuda", "reference")
    assert A.choose("cuda", "spectral", available, (3, 67, 8)) == "reference"
    assert A.choose("cuda", "spectral", available, (3, 8, 4087)) == "reference"
    assert A.choose("cuda", "spectral", available, (3, 61, 64)) == "cuda"
    assert A.choose("cuda", "elementwise", available, (3, 67, 8)) == "cuda"
    assert A.choose("cuda", "spectral", ("cuda", "triton", "reference"), (1, 67, 8)) == "triton"
