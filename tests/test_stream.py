"""The canonical white-noise stream (docs/design.md section 2): Philox4x32-10 exactly as Triton's
``tl.randn4x``; element i is lane ``i & 3`` of ``randn4x(seed, offset + (i >> 2))``."""
import os

# Triton must see TRITON_INTERPRET before any kernel is decorated (no GPU in CI); set it before the
# import below.
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import anisodiff as ad  # noqa: E402
from anisodiff import reference as R  # noqa: E402
from conftest import random_axes, requires_triton  # noqa: E402

try:  # guarded: the rest of this file runs without triton
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
except ImportError:  # pragma: no cover
    triton = None

M32 = 0xFFFFFFFF

if triton is not None:
    @triton.jit
    def _philox_probe(seed, base, words_ptr, normals_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        offs = base + i.to(tl.int64)            # int64 offsets: randint4x uses the high counter word
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        n0, n1, n2, n3 = tl.randn4x(seed, offs)
        tl.store(words_ptr + 4 * i + 0, r0.to(tl.int32, bitcast=True))
        tl.store(words_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True))
        tl.store(words_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True))
        tl.store(words_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True))
        tl.store(normals_ptr + 4 * i + 0, n0)
        tl.store(normals_ptr + 4 * i + 1, n1)
        tl.store(normals_ptr + 4 * i + 2, n2)
        tl.store(normals_ptr + 4 * i + 3, n3)


BLOCK = 1024
TRITON_SEEDS = [0, 123, 2**40 + 7, 2**62 + 12345]
TRITON_OFFSETS = [0, 5, 2**32 - 3]


def _run_probe(seed, offset):
    """(uint32 words as int64 [BLOCK, 4], float32 normals [4 * BLOCK]) from tl.randint4x/randn4x."""
    words = torch.empty(4 * BLOCK, dtype=torch.int32)
    normals = torch.empty(4 * BLOCK, dtype=torch.float32)
    _philox_probe[(1,)](seed, offset, words, normals, BLOCK=BLOCK)   # one program (interpreter)
    return (words.to(torch.int64) & M32).reshape(BLOCK, 4), normals


def _library_is_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.randint4x, InterpretedFunction)


@pytest.fixture(scope="module")
def triton_probe(tmp_path_factory):
    """tl.randint4x / tl.randn4x results for every (seed, offset).

    Triton decides at decoration time whether a @jit function is interpreted. Importing anisodiff
    (torch.library registrations -> torch._dynamo) already imports triton, so when conftest did not
    set TRITON_INTERPRET=1 before that, triton.language's own jit functions (randint4x, philox, ...)
    are compiled-mode objects that an interpreted kernel cannot call. Then the probe runs in one
    fresh interpreter process (this file as a script, TRITON_INTERPRET=1 from the start)."""
    if _library_is_interpreted():
        return {(s, o): _run_probe(s, o) for s in TRITON_SEEDS for o in TRITON_OFFSETS}
    out = tmp_path_factory.mktemp("triton_probe") / "probe.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(out)


@requires_triton
@pytest.mark.parametrize("seed", TRITON_SEEDS)
@pytest.mark.parametrize("offset", TRITON_OFFSETS)
def test_bit_compatible_with_triton_randn4x(triton_probe, seed, offset):
    words, normals = triton_probe[(seed, offset)]
    counters = offset + torch.arange(BLOCK, dtype=torch.int64)
    if offset == 2**32 - 3:
        assert (counters >> 32).max() == 1 and (counters >> 32).min() == 0   # crosses the high word
    ref = torch.stack(R.philox4x32_10(seed, counters & M32, counters >> 32, 0, 0), dim=-1)
    assert torch.equal(words, ref)
    # the documented element mapping of the stream, same seed/offset
    torch.testing.assert_close(R.white_noise((4 * BLOCK,), seed, offset), normals, rtol=0, atol=2e-6)
    torch.testing.assert_close(torch.stack(R.randn4x(seed, counters), -1).reshape(-1), normals,
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(ad.white_noise((4 * BLOCK,), seed=seed, offset=offset), normals,
                               rtol=0, atol=2e-6)
    # not vacuous: a neighbouring seed gives other words
    other = torch.stack(R.philox4x32_10(seed ^ 1, counters & M32, counters >> 32, 0, 0), dim=-1)
    assert (other != words).float().mean() > 0.99


# Random123 known-answer vectors for Philox4x32-10: counter[4], key[2] -> output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    seed = key[0] | (key[1] << 32)                   # key = (seed_lo32, seed_hi32)
    got = R.philox4x32_10(seed, *ctr)
    assert tuple(int(x) for x in got) == want


def test_element_mapping_by_hand():
    """Element i = lane i & 3 of randn4x(seed, offset + (i >> 2)), row-major, incl. a ragged tail."""
    seed, offset = 987654321, 11
    shape = (2, 3, 5, 7)                              # 210 elements: not a multiple of 4
    n = math.prod(shape)
    flat = torch.empty(n)
    for i in range(n):
        lanes = R.randn4x(seed, torch.tensor([offset + (i >> 2)]))
        flat[i] = lanes[i & 3][0]
    assert torch.equal(R.white_noise(shape, seed, offset), flat.reshape(shape))
    torch.testing.assert_close(ad.white_noise(shape, seed=seed, offset=offset), flat.reshape(shape),
                               rtol=0, atol=2e-6)
    # white noise through the ops is the same stream (identity spec)
    torch.testing.assert_close(ad.shaped_noise((2, 3, 5, 7), ad.NoiseSpec(), seed=seed, offset=offset,
                                               backend="cpu"), flat.reshape(shape), rtol=0, atol=2e-6)
    assert torch.equal(ad.shaped_noise((2, 3, 5, 7), ad.NoiseSpec(), seed=seed, offset=offset,
                                       backend="reference"), flat.reshape(shape))


@pytest.mark.parametrize("offset", [0, 7, 2**32 - 2])
@pytest.mark.parametrize("n", [64, 1001])
def test_consecutive_offsets_continue_the_stream(offset, n):
    for white in (lambda k, o: ad.white_noise((k,), seed=31337, offset=o),
                  lambda k, o: R.white_noise((k,), 31337, o)):
        a = white(n, offset)
        b = white(n - 4, offset + 1)
        assert torch.equal(a[4:], b)
        assert not torch.equal(a[:n - 4], b)


def test_reference_and_cpu_stream_agree_to_float_ulps():
    a = R.white_noise((4, 3, 17, 19), 5, 3)
    b = ad.white_noise((4, 3, 17, 19), seed=5, offset=3)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


BATCH_SPECS = {  # id -> (spec factory, C)
    "sdm": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), -0.4)), 3),
    "hdm_k2": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 1), 0.5, "heisenberg")), 4),
    "powerlaw": (lambda: ad.NoiseSpec(spectral=ad.PowerLaw(-0.3)), 2),
    "band_per_sample": (lambda: ad.NoiseSpec(spectral=ad.Band(0.1, 0.4), normalize="per_sample"), 2),
    "twoband_indep": (lambda: ad.NoiseSpec(spectral=ad.TwoBand(0.3, (0, 0.3), 0.7, (0.3, 1.0),
                                                               "independent")), 2),
    "hdm_k2_and_band": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 3), 0.5, "heisenberg"),
                                             ad.Band(0.0, 0.3)), 4),
    "powerlaw_C3": (lambda: ad.NoiseSpec(spectral=ad.PowerLaw(0.5)), 3),
    "sdm_and_powerlaw_C3": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 2), 0.8), ad.PowerLaw(0.5)), 3),
    "twoband_indep_C1": (lambda: ad.NoiseSpec(spectral=ad.TwoBand(0.3, (0, 0.3), 0.7, (0.3, 1.0),
                                                                  "independent")), 1),
}

def _batch_params():
    out = []
    for backend in ("cpu", "reference"):
        for name, (make, C) in BATCH_SPECS.items():
            out.append(pytest.param(backend, name, id=f"{backend}-{name}"))
    return out


def _batch_pair(schedule, backend, name, hw):
    make, C = BATCH_SPECS[name]
    spec = make()
    t5 = torch.tensor([999, 0, 500, 250, 750])
    big = ad.shaped_noise((5, C, *hw), spec, timesteps=t5, schedule=schedule, seed=77, offset=9,
                          backend=backend)
    small = ad.shaped_noise((3, C, *hw), spec, timesteps=t5[:3], schedule=schedule, seed=77, offset=9,
                            backend=backend)
    assert not torch.equal(big[3], big[4])
    return small, big


@pytest.mark.parametrize("backend,name", _batch_params())
@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
def test_batch_split_invariance(schedule, backend, name, hw):
    """The noise of sample b depends on (seed, offset, b) only, never on B: bit for bit."""
    small, big = _batch_pair(schedule, backend, name, hw)
    assert torch.equal(small, big[:3])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", list(BATCH_SPECS))
def test_batch_split_invariance_within_float_tolerance(schedule, backend, name):
    small, big = _batch_pair(schedule, backend, name, (8, 8))
    torch.testing.assert_close(small, big[:3], rtol=0, atol=1e-6)
    # and a different offset really is different noise (the comparison is not vacuous)
    make, C = BATCH_SPECS[name]
    shifted = ad.shaped_noise((3, C, 8, 8), make(), timesteps=torch.tensor([999, 0, 500]),
                              schedule=schedule, seed=77, offset=10, backend=backend)
    assert (shifted - small).abs().max() > 0.1


def test_stream_moments():
    """2e6 samples: mean, variance, kurtosis and lane correlations within ~5 standard errors."""
    n = 2_000_000
    x = ad.white_noise((n,), seed=2024).double()
    se = 1 / math.sqrt(n)
    assert abs(x.mean().item()) < 5 * se                               # sd(mean) = 1/sqrt(n)
    assert abs(x.var(correction=0).item() - 1) < 5 * math.sqrt(2) * se   # sd(var) = sqrt(2/n)
    # Var(x^4) = 105 - 9 = 96; a uniform-to-normal mapping error shows up here first
    assert abs((x ** 4).mean().item() - 3) < 5 * math.sqrt(96) * se
    lanes = x.reshape(-1, 4)
    m = lanes.shape[0]
    corr = lanes.T @ lanes / m                                          # E[x_i x_j], unit variance
    off = corr - torch.diag(corr.diagonal())
    assert off.abs().max().item() < 5 / math.sqrt(m)
    # neighbouring counters are uncorrelated too (lane 3 of counter c vs lane 0 of c + 1)
    assert abs((lanes[:-1, 3] * lanes[1:, 0]).mean().item()) < 5 / math.sqrt(m)
    # Box-Muller pairs are independent, not just uncorrelated: E[x0^2 x1^2] = 1
    assert abs((lanes[:, 0] ** 2 * lanes[:, 1] ** 2).mean().item() - 1) < 5 * math.sqrt(8) / math.sqrt(m)


def test_stream_tail_is_clamped_like_triton():
    """u1 is clamped at 1e-7, so |x| <= sqrt(-2 ln 1e-7) = 5.68 (Triton's pair_uniform_to_normal)."""
    x = ad.white_noise((2_000_000,), seed=99)
    assert x.abs().max().item() <= math.sqrt(-2 * math.log(1e-7)) + 1e-5
    assert x.abs().max().item() > 4.5


# ---------------------------------------------------------------------------------------------
# generator / seed semantics
# ---------------------------------------------------------------------------------------------
SPEC = ad.NoiseSpec(spectral=ad.PowerLaw(0.3))
SHAPE = (2, 3, 8, 8)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_generator_advances_and_reseeding_reproduces(backend):
    g = torch.Generator().manual_seed(1234)
    a = ad.shaped_noise(SHAPE, SPEC, generator=g, backend=backend)
    b = ad.shaped_noise(SHAPE, SPEC, generator=g, backend=backend)
    assert not torch.equal(a, b)
    g.manual_seed(1234)
    assert torch.equal(ad.shaped_noise(SHAPE, SPEC, generator=g, backend=backend), a)
    assert torch.equal(ad.shaped_noise(SHAPE, SPEC, generator=g, backend=backend), b)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_global_generator_reproduces(backend):
    torch.manual_seed(7)
    a = ad.shaped_noise(SHAPE, SPEC, backend=backend)
    torch.manual_seed(7)
    b = ad.shaped_noise(SHAPE, SPEC, backend=backend)
    torch.manual_seed(8)
    c = ad.shaped_noise(SHAPE, SPEC, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # add_noise draws the same way
    torch.manual_seed(7)
    x0 = torch.zeros(SHAPE)
    sched = ad.VPSchedule.linear()
    _, n = ad.add_noise(x0, torch.full((2,), 999), SPEC, sched, backend=backend)
    assert torch.equal(n, a)


def test_explicit_seed_is_pure():
    """An explicit seed is a pure function of (seed, offset): repeatable, and it neither reads nor
    advances torch's global generator."""
    a = ad.shaped_noise(SHAPE, SPEC, seed=55, backend="cpu")
    torch.manual_seed(0)
    b = ad.shaped_noise(SHAPE, SPEC, seed=55, backend="cpu")
    after = torch.rand(3)
    torch.manual_seed(123)
    c = ad.shaped_noise(SHAPE, SPEC, seed=55, backend="cpu")
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, ad.shaped_noise(SHAPE, SPEC, seed=56, backend="cpu"))
    assert not torch.equal(a, ad.shaped_noise(SHAPE, SPEC, seed=55, offset=1, backend="cpu"))


def test_seed_and_generator_together_raise():
    with pytest.raises(ValueError, match="seed"):
        ad.shaped_noise(SHAPE, SPEC, seed=1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="seed"):
        ad.add_noise(torch.zeros(SHAPE), 0, SPEC, ad.VPSchedule.linear(), seed=1,
                     generator=torch.Generator())


@pytest.mark.parametrize("seed,match,exc", [(-1, "seed", ValueError), (2**63, "seed", ValueError),
                                            (1.5, "seed", TypeError), (True, "seed", TypeError)])
def test_bad_seeds(seed, match, exc):
    with pytest.raises(exc, match=match):
        ad.white_noise((4,), seed=seed)


def test_bad_offsets():
    with pytest.raises(ValueError, match="offset"):
        ad.white_noise((4,), seed=0, offset=-1)
    with pytest.raises(ValueError, match="offset"):
        ad.white_noise((4,), seed=0, offset=2**62)


# ---------------------------------------------------------------------------------------------
# the draw index: counter word 2
# ---------------------------------------------------------------------------------------------
def _draw_by_hand(shape, seed, offset, draw):
    n = math.prod(shape)
    counters = offset + torch.arange((n + 3) // 4, dtype=torch.int64)
    lanes = torch.stack(R.randn4x(seed, counters, draw=draw), dim=-1).reshape(-1)[:n]
    return lanes.reshape(shape)


def test_draw_index_is_counter_word_two():
    seed, offset = 2**40 + 3, 6
    counters = offset + torch.arange(8, dtype=torch.int64)
    w1 = R.philox4x32_10(seed, counters & M32, counters >> 32, 1, 0)
    n1 = R.randn4x(seed, counters, draw=1)
    u = [R.uint32_to_uniform(w) for w in w1]
    torch.testing.assert_close(n1[0], R.box_muller(u[0], u[1])[0], rtol=0, atol=0)
    torch.testing.assert_close(n1[3], R.box_muller(u[2], u[3])[1], rtol=0, atol=0)
    assert not torch.equal(n1[0], R.randn4x(seed, counters, draw=0)[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_independent_two_band_second_draw(backend):
    """The independent two-band spec consumes draw 0 (low band) and draw 1 (high band) of the
    same (seed, offset)."""
    shape, seed, offset = (2, 2, 8, 8), 4242, 13
    spec = ad.NoiseSpec(spectral=ad.TwoBand(0.6, (0, 0.3), 0.8, (0.3, 1.0), "independent"))
    d0 = _draw_by_hand(shape, seed, offset, 0)
    d1 = _draw_by_hand(shape, seed, offset, 1)
    got = ad.shaped_noise(shape, spec, seed=seed, offset=offset, backend=backend)
    want = R.apply_operator(torch.stack([d0, d1]).double(), spec)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    # would fail if the second draw reused draw 0, or if draw 2 were used
    for wrong in (torch.stack([d0, d0]), torch.stack([d0, _draw_by_hand(shape, seed, offset, 2)])):
        assert (R.apply_operator(wrong.double(), spec) - got.double()).abs().max() > 0.1


if __name__ == "__main__":  # the triton_probe fixture's subprocess: python test_stream.py OUT
    assert _library_is_interpreted(), "run with TRITON_INTERPRET=1 in the environment"
    torch.save({(s, o): _run_probe(s, o) for s in TRITON_SEEDS for o in TRITON_OFFSETS}, sys.argv[1])


_ALONE_SPECS = {
    "power_law": lambda C: ad.NoiseSpec(spectral=ad.PowerLaw(-0.3)),
    "sdm+power_law_per_sample": lambda C: ad.NoiseSpec(
        ad.Squeeze(random_axes(C, 1), -0.4) if C > 1 else None, ad.PowerLaw(0.5), normalize="per_sample"),
    "two_band_independent": lambda C: ad.NoiseSpec(
        spectral=ad.TwoBand(0.6, (0.0, 0.25), 0.4, (0.25, 0.8), mixture="independent")),
}


@pytest.mark.skipif(not ad.build_info().get("cpu"), reason="compiled CPU ops not built")
@pytest.mark.parametrize("C", [1, 3, 5])
@pytest.mark.parametrize("name", list(_ALONE_SPECS))
def test_each_sample_alone_matches_the_full_batch_bit_for_bit(schedule, C, name):
    """Sample b of a [64, C, 15, 16] batch equals the same sample computed alone at the matching
    offset (offset + b C H W / 4), bit for bit, for odd C too: the CPU kernel pairs planes only
    within a sample (it used to pair sample 2m's last plane with sample 2m+1's first)."""
    spec = _ALONE_SPECS[name](C)
    B, H, W = 64, 15, 16
    t = torch.arange(B) * 15
    full = ad.shaped_noise((B, C, H, W), spec, timesteps=t, schedule=schedule, seed=31, offset=5,
                           backend="cpu")
    per_sample = C * H * W // 4
    for b in (0, 1, 30, 31, 62, 63):
        alone = ad.shaped_noise((1, C, H, W), spec, timesteps=t[b:b + 1], schedule=schedule, seed=31,
                                offset=5 + b * per_sample, backend="cpu")
        assert torch.equal(alone[0], full[b]), f"sample {b}"
    odd = ad.shaped_noise((3, C, H, W), spec, timesteps=t[1:4], schedule=schedule, seed=31,
                          offset=5 + per_sample, backend="cpu")
    assert torch.equal(odd, full[1:4])
    assert (full[1] - full[2]).abs().max() > 0.1  # distinct samples: the comparison is not vacuous
