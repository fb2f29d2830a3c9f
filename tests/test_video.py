"""5-D video tensors [B, C, F, H, W] and many channels (C = 16, 768) on every op and backend.

The semantics (docs/design.md section 6): the white stream is the row-major extension of the 4-D
one (element (b, c, f, h, w) has index ((b C + c) F + f) H W + h W + w), the squeeze acts on C at
every (f, h, w), the spatial filter and the per-sample normalisation on every (b, c, f) H x W plane.
Every kernel (cpu; triton under TRITON_INTERPRET=1 with tiny shapes) is compared with
anisodiff.reference on the same stream; F = 1 is the 4-D op bit for bit.
"""
import pytest
import torch

import anisodiff as ad
from anisodiff import _autoselect
from anisodiff import reference as R
from anisodiff.ops import _library
from anisodiff.sampling import step_op_args

from conftest import random_axes, requires_compiled
from test_cpu_kernel import close, make_spec

SEED, OFFSET = 1234, 7
KERNELS = [b for b in ("cpu", "triton") if b in ad.available_backends("cpu")]
# spec kinds of test_cpu_kernel.make_spec: elementwise, spectral, both, two draws, per-sample
VIDEO_KINDS = ["iso", "sdm", "hdm", "pl_neg", "two_indep", "sdm+pl_pos", "hdm+band"]
VIDEO_SHAPES = [(2, 3, 3, 5, 7), (2, 4, 2, 4, 8)]  # odd plane (per-element stream), 4-aligned rows


def _kernel_params(backend):
    return pytest.param(backend, marks=requires_compiled) if backend == "cpu" else backend


BACKENDS = [_kernel_params(b) for b in KERNELS]


def _spec_or_skip(kind, C):
    spec = make_spec(kind, C)
    if kind.startswith("hdm") and spec.squeeze is None:
        pytest.skip("hdm needs k < C")
    return spec


# ---------------------------------------------------------------------------------------------
# the reference's semantics: per-frame filter, squeeze on C, row-major stream
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sdm+pl_pos", "two_indep", "hdm+band"])
def test_reference_video_is_the_4d_operator_on_each_frame(kind, schedule):
    """n[:, :, f] = A(t) eps[:, :, f] with eps the 5-D row-major stream: frames are filtered alone,
    the squeeze mixes channels only."""
    B, C, F, H, W = 2, 3, 4, 6, 5
    spec = make_spec(kind, C)
    t = torch.tensor([700, 20])
    eps = torch.stack([R.white_noise((B, C, F, H, W), SEED, OFFSET, draw=d) for d in range(spec.draws)])
    eps = eps if spec.draws > 1 else eps[0]
    video = R.shaped_noise((B, C, F, H, W), spec, t, schedule, seed=SEED, offset=OFFSET, dtype=torch.float64)
    for f in range(F):
        frame = R.apply_operator(eps.select(-3, f).double(), spec, t, schedule)
        torch.testing.assert_close(video[:, :, f], frame, rtol=0, atol=1e-12)
    # the stream itself: element (b, c, f, h, w) is lane i & 3 of counter offset + i // 4
    white = R.white_noise((B, C, F, H, W), SEED, OFFSET)
    b, c, f, h, w = 1, 2, 3, 4, 1
    i = (((b * C + c) * F + f) * H + h) * W + w
    lanes = R.randn4x(SEED, torch.tensor([OFFSET + i // 4]))
    assert float(white[b, c, f, h, w]) == float(lanes[i % 4][0])


# ---------------------------------------------------------------------------------------------
# every op x kernel backend == reference on the stream
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", VIDEO_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_add_noise_and_shaped_noise_video_match_reference(backend, shape, kind, schedule):
    spec = _spec_or_skip(kind, shape[1])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 250])
    for target in (["epsilon", "v"] if backend == "cpu" else ["v"]):
        want = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, target=target, backend="reference")
        got = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, target=target, backend=backend)
        close(got[0], want[0])
        close(got[1], want[1])
    want = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, offset=OFFSET,
                           backend="reference")
    got = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, offset=OFFSET, backend=backend)
    assert got.shape == shape
    close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sdm", "pl_neg", "two_indep"])
def test_apply_operator_video_reads_the_callers_eps(backend, kind, schedule):
    shape = (2, 3, 2, 5, 6)
    spec = make_spec(kind, 3)
    g = torch.Generator().manual_seed(2)
    eps = torch.randn((spec.draws, *shape) if spec.draws > 1 else shape, generator=g)
    t = torch.tensor([10, 900])
    want = R.apply_operator(eps, spec, t, schedule)
    got = ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend=backend)
    close(got, want)
    x0 = torch.randn(shape, generator=g)
    want = R.add_noise(x0, t, spec, schedule, noise=eps)
    got = ad.add_noise(x0, t, spec, schedule, noise=eps, backend=backend)
    close(got[0], want[0])
    close(got[1], want[1])


def _video_step(backend, spec, schedule, sample, eps_hat, t, prev, mode, stream):
    B, C, F, H, W = sample.shape
    args = step_op_args(spec, schedule, t, prev, mode, True, 1.0, (B, C, H, W), sample.device)
    return _library(backend).ddpm_step(sample, eps_hat, *args, stream, None)  # (registers triton's ops)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos", "two_indep"])
@pytest.mark.parametrize("mode", ["official", "exact"])
def test_ddpm_step_video_matches_reference(backend, kind, mode, schedule):
    """The fused step on [B, C, F, H, W]: the step noise from the 5-D stream (draw d = counter word 2)."""
    if backend == "triton" and mode == "exact":
        pytest.skip("one mode is enough for the interpreter")
    shape = (2, 3, 3, 4, 5)
    spec = make_spec(kind, 3)
    g = torch.Generator().manual_seed(3)
    x_t, eps_hat = 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    z = torch.stack([R.white_noise(shape, 77, 5, draw=d) for d in range(spec.draws)])
    want = R.ddpm_step(eps_hat, 300, x_t, spec, schedule, prev_timestep=280, noise=z if spec.draws > 1 else z[0],
                       mode=mode)
    got = _video_step(backend, spec, schedule, x_t, eps_hat, 300, 280, mode, torch.tensor([77, 5]))
    close(got[0], want[0])
    close(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos", "two_indep"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 5), (2, 3, 4, 5)], ids=["video", "image"])
def test_anisotropic_noise_steps_video_on_the_fused_kernel(backend, kind, shape, schedule):
    """AnisotropicNoise.ddpm_step on [B, C, F, H, W] (and 4-D): auto picks the fused kernel, and the
    kernel's step equals the reference's for the same generator state (the same seed, and draw d of a
    two-draw spec in counter word 2 on both paths)."""
    spec = make_spec(kind, 3)
    g = torch.Generator().manual_seed(4)
    x_t, eps_hat = 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise = ad.AnisotropicNoise(spec, schedule)
    if backend == "cpu":
        assert ad.sampling.can_fuse_step(eps_hat, x_t, spec) == "cpu"
    got = noise.ddpm_step(eps_hat, 300, x_t, prev_timestep=280, backend=backend,
                          generator=torch.Generator().manual_seed(9))
    want = noise.ddpm_step(eps_hat, 300, x_t, prev_timestep=280, backend="reference",
                           generator=torch.Generator().manual_seed(9))
    close(got[0], want[0])
    close(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# layout promises
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos", "two_indep"])
def test_f1_video_is_the_4d_op_bit_for_bit(backend, kind, schedule):
    spec = make_spec(kind, 3)
    x0 = torch.randn(3, 3, 6, 7, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([5, 500, 999])
    four = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend=backend)
    five = ad.add_noise(x0[:, :, None], t, spec, schedule, seed=SEED, offset=OFFSET, backend=backend)
    for a, b in zip(four, five):
        assert b.shape == (3, 3, 1, 6, 7)
        assert torch.equal(a, b[:, :, 0])
    n4 = ad.shaped_noise((3, 3, 6, 7), spec, timesteps=t, schedule=schedule, seed=SEED, backend=backend)
    n5 = ad.shaped_noise((3, 3, 1, 6, 7), spec, timesteps=t, schedule=schedule, seed=SEED, backend=backend)
    assert torch.equal(n4, n5[:, :, 0])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos"])
def test_sample_b_does_not_depend_on_the_batch_size(backend, kind, schedule):
    """Sample b's noise is bit for bit the same in every batch that contains it (any thread split),
    and equals a batch of one started at counter offset + b C F H W / 4."""
    C, F, H, W = 3, 2, 4, 6  # C F H W divisible by 4
    spec = make_spec(kind, C)
    B = 5 if backend != "triton" else 3
    t = torch.arange(B) * 150
    full = ad.shaped_noise((B, C, F, H, W), spec, timesteps=t, schedule=schedule, seed=SEED, offset=OFFSET,
                           backend=backend)
    threads = torch.get_num_threads()
    try:
        for n, nthreads in ((1, 1), (B - 1, 2)):
            torch.set_num_threads(nthreads)
            part = ad.shaped_noise((n, C, F, H, W), spec, timesteps=t[:n], schedule=schedule, seed=SEED,
                                   offset=OFFSET, backend=backend)
            assert torch.equal(part, full[:n])
    finally:
        torch.set_num_threads(threads)
    b = B - 1
    alone = ad.shaped_noise((1, C, F, H, W), spec, timesteps=t[b:], schedule=schedule, seed=SEED,
                            offset=OFFSET + b * C * F * H * W // 4, backend=backend)
    assert torch.equal(alone[0], full[b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sdm", "hdm+band"])
def test_strided_and_channels_last_3d_video(backend, kind, schedule):
    """Outputs do not depend on the input's strides and keep its memory format."""
    shape = (2, 3, 3, 4, 8)
    spec = make_spec(kind, 3)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(shape, generator=g)
    t = torch.tensor([100, 800])
    want = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend=backend)
    views = {
        "channels_last_3d": x0.contiguous(memory_format=torch.channels_last_3d),
        "every_other_frame": torch.stack([x0, torch.zeros_like(x0)], dim=3).flatten(2, 3)[:, :, 0::2],
        "permuted": x0.permute(2, 0, 1, 3, 4).contiguous().permute(1, 2, 0, 3, 4),
        "bf16": x0.to(torch.bfloat16),
    }
    for name, x in views.items():
        assert torch.equal(x.float(), x0.to(x.dtype).float()), name
        got = ad.add_noise(x, t, spec, schedule, seed=SEED, backend=backend)
        if name == "bf16":
            ref = ad.add_noise(x, t, spec, schedule, seed=SEED, backend="reference")
            close(got[0], ref[0], torch.bfloat16)
            continue
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        if name == "channels_last_3d":
            assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    eps = torch.randn(shape, generator=g)
    got = ad.apply_operator(eps.contiguous(memory_format=torch.channels_last_3d), spec, timesteps=t,
                            schedule=schedule, backend=backend)
    close(got, R.apply_operator(eps, spec, t, schedule))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_per_sample_normalisation_is_per_frame(backend, schedule):
    """normalize="per_sample" divides each (b, c, f) plane by its own std: every frame has std 1."""
    spec = ad.NoiseSpec(spectral=ad.Band(0.1, 0.4), normalize="per_sample")
    n = ad.shaped_noise((2, 3, 4, 8, 8), spec, seed=SEED, backend=backend).double()
    std = n.std(dim=(-2, -1), correction=0)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=0, atol=1e-5)
    # the frames were not normalised jointly: a joint std would leave the frame stds spread out
    raw = ad.shaped_noise((2, 3, 4, 8, 8), ad.NoiseSpec(spectral=ad.Band(0.1, 0.4)), seed=SEED,
                          backend="reference").double()
    assert float(raw.std(dim=(-2, -1), correction=0).std()) > 0.05


@requires_compiled
def test_covariance_of_video_noise_matches_the_empirical_one(schedule):
    """covariance([B, C, F, H, W]) = S S^T (x) I_F (x) Sigma_w, against 200k draws of the cpu kernel:
    every entry within 5 standard errors (the cross-frame blocks are zero)."""
    C, F, H, W = 2, 2, 3, 4
    axes = random_axes(C, 1, 9)
    spec = ad.NoiseSpec(ad.Squeeze(axes, -0.8, schedule="constant"), ad.PowerLaw(-0.6))
    sigma = ad.covariance(spec, (1, C, F, H, W), timesteps=0, schedule=schedule)
    assert sigma.shape == (C * F * H * W,) * 2
    blocks = sigma.reshape(C, F, H * W, C, F, H * W)
    assert float(blocks[:, 0, :, :, 1].abs().max()) == 0.0
    assert float(blocks[:, 0, :, :, 0].abs().max()) > 0.5
    n = 200_000
    x = ad.shaped_noise((n, C, F, H, W), spec, seed=SEED, backend="cpu").double().reshape(n, -1)
    emp = x.T @ x / n
    d = sigma.diagonal()
    se = ((d[:, None] * d[None, :] + sigma**2) / n).sqrt()
    assert float(((emp - sigma).abs() / se).max()) < 5.0
    # a per-volume (not per-frame) filter would correlate the frames: the bound above rejects it
    assert float(se[:H * W, H * W:2 * H * W].max()) * 5 < 0.05


# ---------------------------------------------------------------------------------------------
# many channels: SD3 / Flux latents (16) and representation-autoencoder latents (768)
# ---------------------------------------------------------------------------------------------
def _many_channel_spec(C, k, spectral):
    axes = random_axes(C, max(k, 1), seed=C + k)
    squeeze = None if k == 0 else ad.Squeeze(axes[:, :k], [-0.5, 0.7, 0.3][:k],
                                             variant="heisenberg" if k == 2 else "sdm")
    sp = {None: None, "pl": ad.PowerLaw(-0.3), "band_ps": ad.Band(0.1, 0.4)}[spectral]
    return ad.NoiseSpec(squeeze, sp, normalize="per_sample" if spectral == "band_ps" else "calibrated")


def _check_against_reference(x0, t, spec, schedule, backend):
    want = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="reference")
    got = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend=backend)
    close(got[0], want[0])
    close(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [16, 768])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("spectral", [None, "pl", "band_ps"])
def test_many_channels_match_reference(backend, C, k, spectral, schedule):
    """The fused paths (elementwise and spectral) with 16 and 768 channels and a squeeze on k axes;
    16 channels also as video latents [B, 16, F, H, W]."""
    B = 2
    if backend == "triton" and C == 768 and spectral is not None:
        if k > 1 or spectral != "pl":  # interpreter time (~3 min each): the channel loop is also tested below
            pytest.skip("interpreter time: one 768-channel spectral case, the channel loop below")
        B = 1
    spec = _many_channel_spec(C, k, spectral)
    g = torch.Generator().manual_seed(C)
    _check_against_reference(torch.randn(B, C, 4, 5, generator=g), torch.tensor([999, 300][:B]), spec, schedule,
                             backend)
    if C == 16:
        _check_against_reference(torch.randn(2, C, 2, 4, 5, generator=g), torch.tensor([999, 300]), spec, schedule,
                                 backend)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("spectral", ["pl", "band_ps"])
def test_triton_channel_loop_matches_reference(k, spectral, schedule):
    """Samples too large to keep on chip (8 x 40 x 36, padded 8 x 64 x 64): the Triton noise ops loop
    over the channels (spectral_channels_kernel), with and without a squeeze, 4-D and video."""
    if "triton" not in KERNELS:
        pytest.skip("triton backend unavailable")
    C, H, W = 8, 40, 36
    assert not _autoselect.triton_supports("spectral", C, H, W)
    assert _autoselect.triton_channel_loop_supports(C, H, W, max(k, 1))
    spec = _many_channel_spec(C, k, spectral)
    g = torch.Generator().manual_seed(k)
    _check_against_reference(torch.randn(1, C, H, W, generator=g), torch.tensor([500]), spec, schedule, "triton")
    if k == 1:
        _check_against_reference(torch.randn(1, C, 2, H, W, generator=g), torch.tensor([40]), spec, schedule,
                                 "triton")
        want = ad.shaped_noise((1, C, H, W), spec, timesteps=torch.tensor([7]), schedule=schedule, seed=SEED,
                               backend="reference")
        got = ad.shaped_noise((1, C, H, W), spec, timesteps=torch.tensor([7]), schedule=schedule, seed=SEED,
                              backend="triton")
        close(got, want)
    # the fused step keeps the whole sample on chip: it refuses such a sample, naming the limit
    if k == 1 and spectral == "pl":
        x = torch.randn(1, C, H, W, generator=g)
        with pytest.raises(ValueError, match="shape: the Triton spectral kernel keeps one"):
            ad.AnisotropicNoise(spec, schedule).ddpm_step(x, 10, x, backend="triton")


def test_auto_keeps_many_channels_on_a_fused_path():
    assert _autoselect.choose("cpu", "spectral", ["cpu", "reference"], (768, 32, 32)) == "cpu"
    assert _autoselect.choose("cuda", "elementwise", ["triton", "reference"], (768, 32, 32)) == "triton"


# ---------------------------------------------------------------------------------------------
# backend choice and errors
# ---------------------------------------------------------------------------------------------
def test_auto_skips_backends_without_video_or_perturbation():
    avail = ["cuda", "triton", "reference"]
    assert _autoselect.choose("cuda", "elementwise", avail, (3, 8, 8)) == "cuda"
    assert _autoselect.choose("cuda", "elementwise", avail, (3, 8, 8), ("frames",)) == "cuda"
    assert _autoselect.choose("cuda", "spectral", avail, (3, 8, 8), ("frames",)) == "cuda"
    assert _autoselect.choose("cuda", "spectral", avail, (3, 8, 8), ("perturb",)) == "cuda"
    assert _autoselect.choose("cuda", "elementwise", avail, (3, 8, 8), ("frames", "perturb")) == "cuda"
    assert _autoselect.choose("cuda", "spectral", avail[1:], (3, 8, 8), ("perturb",)) == "reference"
    assert _autoselect.choose("cuda", "elementwise", avail[1:], (3, 8, 8), ("frames", "perturb")) == "triton"
    assert _autoselect.choose("cpu", "spectral", ["cpu", "reference"], (3, 8, 8), ("frames", "perturb")) == "cpu"
    assert _autoselect.missing_features("cuda", ("frames", "perturb", "temporal")) == ["temporal"]
    assert _autoselect.missing_features("reference", _autoselect.FEATURES) == []


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_video_errors_name_the_argument(backend, schedule):
    spec = make_spec("sdm", 3)
    t = torch.tensor([1, 2])
    for bad in (torch.randn(2, 3, 4), torch.randn(2, 3, 2, 2, 4, 4)):
        with pytest.raises(ValueError, match="x0: expected a 4-D .* or 5-D video"):
            ad.add_noise(bad, t, spec, schedule, backend=backend)
    for shape in ((2, 3, 4), (2, 3, 1, 2, 4, 4)):
        with pytest.raises(ValueError, match="shape: expected"):
            ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, backend=backend)
    with pytest.raises(ValueError, match="eps: expected"):
        ad.apply_operator(torch.randn(2, 3, 1, 2, 4, 4), spec, timesteps=t, schedule=schedule, backend=backend)
    x0 = torch.randn(2, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="noise: expected WHITE noise of shape"):
        ad.add_noise(x0, t, spec, schedule, noise=torch.randn(2, 3, 4, 4), backend=backend)
    with pytest.raises(ValueError, match="x0: has 4 channels"):
        ad.add_noise(torch.randn(2, 4, 2, 4, 4), t, spec, schedule, backend=backend)


def test_covariance_video_shape_checks():
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.5))
    assert ad.covariance(spec, (1, 2, 3, 4, 4)).shape == (96, 96)
    with pytest.raises(ValueError, match="C\\*F\\*H\\*W = 8192 is too large"):
        ad.covariance(spec, (1, 2, 4, 32, 32))
    with pytest.raises(ValueError, match="shape: expected positive"):
        ad.covariance(spec, (1, 2, 0, 4, 4))
    with pytest.raises(ValueError, match="shape: has 2 channels"):
        ad.covariance(ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), 0.5, schedule="constant")), (1, 2, 2, 4, 4))


def test_auto_never_routes_to_cuda_what_its_glue_refuses():
    """What the CUDA glue refuses (source check: there is no GPU here) is missing from its features,
    so "auto" never sends such a call to it."""
    import pathlib
    source = pathlib.Path(__file__).parents[1] / "csrc" / "cuda" / "ops_cuda.cpp"
    if not source.exists():  # a staged copy of tests/ without the sources (scripts/sanitize_cpu.sh)
        pytest.skip("csrc/ is not beside tests/ here")
    glue = source.read_text()
    for feature, refusal in (("frames", "p.frames <= 1"), ("perturb", "p.perturb == 0.f")):
        if refusal in glue:
            assert feature not in _autoselect.BACKEND_FEATURES["cuda"], feature


@requires_compiled
def test_opcheck_video_and_perturbation(schedule):
    """The compiled ops with 5-D tensors and the perturb argument: fake kernels, autograd, schemas."""
    from anisodiff.plan import kernel_args
    spec = make_spec("sdm+pl_pos", 3)
    args = kernel_args(spec, schedule, 3, 4, 6, "cpu")
    t = torch.tensor([3, 900])
    common = (t, args.coef, args.axes, args.weights, list(args.gammas), args.variant, args.normalize)
    x0 = torch.randn(2, 3, 2, 4, 6)
    noise = torch.randn(1, 2, 3, 2, 4, 6)
    for x, n, perturb in [(x0, None, 0.0), (x0, noise, 0.0), (x0.clone().requires_grad_(), None, 0.25),
                          (x0.contiguous(memory_format=torch.channels_last_3d), noise, 0.5)]:
        torch.library.opcheck(torch.ops.anisodiff.add_noise.default, (x, *common, 1, torch.tensor([5, 0]), n, perturb))
    torch.library.opcheck(torch.ops.anisodiff.shaped_noise.default,
                          ([2, 3, 2, 4, 6], *common, torch.tensor([5, 0]), noise, torch.float32))
