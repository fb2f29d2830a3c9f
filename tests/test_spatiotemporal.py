"""The opt-in spatio-temporal spectrum, NoiseSpec(temporal=True) (docs/design.md section 6).

Each (b, c) F x H x W volume of a video tensor is filtered by a 3-D FFT with weights over
(f_t, f_y, f_x), radius sqrt(f_t^2 + f_y^2 + f_x^2) on each axis' own fftfreq grid; per-sample
normalisation is per volume, the DC bin (and the offset) the volume's. reference.py is the
specification. The CPU kernel runs the mode (whole samples as work items, a length-F FFT across the
frames) and is compared with the reference on the same stream; the Triton and CUDA kernels refuse it
and "auto" skips them.
"""
import json
import math

import pytest
import torch

import anisodiff as ad
from anisodiff import _autoselect
from anisodiff import reference as R

from conftest import random_axes, requires_compiled
from test_cpu_kernel import close

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
    n = ad.shaped_noise((B, C, F, H, W), spec, seed=SEED, dtype=torch.float64, backend="reference")
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
    got = ad.shaped_noise(shape, _temporal(spec), seed=SEED, dtype=torch.float64, backend="reference")
    want = ad.shaped_noise(shape, spec, seed=SEED, dtype=torch.float64, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(R.spatiotemporal_radius(1, 6, 5, "rmax1")[0], R.radius(6, 5, "rmax1"),
                               rtol=0, atol=0)


def test_per_sample_normalisation_and_offset_are_per_volume():
    B, C, F, H, W = 3, 2, 4, 6, 6
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(1.0), normalize="per_sample", temporal=True)
    n = ad.shaped_noise((B, C, F, H, W), spec, seed=SEED, dtype=torch.float64, backend="reference")
    vol_std = n.std(dim=(-3, -2, -1), correction=0)
    torch.testing.assert_close(vol_std, torch.ones_like(vol_std), rtol=0, atol=1e-6)
    assert (n.std(dim=(-2, -1), correction=0) - 1).abs().max() > 1e-3  # not per frame
    # the offset is one constant per (b, c) volume: the same DC in every frame
    off = ad.NoiseSpec(offset=ad.OffsetNoise(5.0), temporal=True)
    m = ad.shaped_noise((B, C, F, H, W), off, seed=SEED, dtype=torch.float64, backend="reference")
    white = R.white_noise((B, C, F, H, W), SEED)
    torch.testing.assert_close(m - white, (m - white)[:, :, :1, :1, :1].expand_as(m), rtol=0, atol=1e-10)


def test_add_noise_and_apply_operator_on_the_reference_and_auto(schedule):
    """backend="reference" is reference.py exactly; "auto" (the CPU kernel where built) agrees to
    float32 tolerance on the same stream."""
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, seed=1), 0.5), ad.PowerLaw(-0.5), temporal=True)
    x0, t = torch.randn(2, 3, 4, 8, 8), torch.tensor([5, 800])
    x_r, eps_r = R.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.1)
    white = R.white_noise(x0.shape, SEED, OFFSET)
    op_r = R.apply_operator(white, spec, t, schedule)
    for backend in ("reference", "auto"):
        check = (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)) if backend == "reference" else close
        x_t, eps = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.1,
                                backend=backend)
        check(x_t, x_r)
        check(eps, eps_r)
        check(ad.apply_operator(white, spec, timesteps=t, schedule=schedule, backend=backend), op_r)


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
    for backend in ("triton", "cuda"):
        if backend not in ad.available_backends("cpu"):
            continue
        with pytest.raises(ValueError, match="spec: the .* backend does not implement the spatio-temporal"):
            ad.shaped_noise((1, 3, 4, 8, 8), spec, seed=0, backend=backend)


def test_auto_picks_cpu_and_skips_the_gpu_kernels_for_the_temporal_mode():
    for backend in ("triton", "cuda"):
        assert "temporal" in _autoselect.missing_features(backend, ("temporal",))
    for backend in ("reference", "cpu"):
        assert not _autoselect.missing_features(backend, ("frames", "temporal", "perturb"))
    avail = ("cuda", "triton", "cpu", "reference")
    assert _autoselect.choose("cuda", "spectral", avail, (3, 8, 8), ("frames", "temporal")) == "reference"
    assert _autoselect.choose("cpu", "spectral", avail, (3, 8, 8), ("frames", "temporal")) == "cpu"
    assert _autoselect.choose("cpu", "spectral", ("reference",), (3, 8, 8), ("frames", "temporal")) == "reference"
    # white noise is white per frame or not: a temporal spec without a filter stays on the kernels
    white = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, seed=1), 0.5, schedule="constant"), temporal=True)
    shape = (2, 3, 4, 5, 6)
    torch.testing.assert_close(ad.shaped_noise(shape, white, seed=SEED),
                               ad.shaped_noise(shape, ad.NoiseSpec(white.squeeze), seed=SEED), rtol=0, atol=0)


@requires_compiled
@pytest.mark.parametrize("mode", ["official", "exact"])
def test_ddpm_step_of_a_temporal_spec_runs_on_the_cpu_kernel(mode):
    """The fused CPU step draws its step noise through the 3-D filter: auto fuses a spatio-temporal
    spec on the CPU kernel, equal to the reference step on the same stream."""
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, seed=4), -0.5), ad.PowerLaw(0.5), temporal=True)
    noise = ad.AnisotropicNoise(spec, ad.VPSchedule.linear())
    x = torch.randn(2, 3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    e = torch.randn(2, 3, 3, 5, 4, generator=torch.Generator().manual_seed(2))
    assert ad.sampling.can_fuse_step(e, x, spec) == "cpu"
    got = noise.ddpm_step(e, 10, x, mode=mode, generator=torch.Generator().manual_seed(1))
    want = noise.ddpm_step(e, 10, x, mode=mode, backend="reference", generator=torch.Generator().manual_seed(1))
    for g, w in zip(got, want):
        close(g, w)
    per_frame = ad.AnisotropicNoise(ad.NoiseSpec(spec.squeeze, spec.spectral), ad.VPSchedule.linear())
    pf = per_frame.ddpm_step(e, 10, x, mode=mode, generator=torch.Generator().manual_seed(1))
    assert (pf[0] - got[0]).abs().max() > 1e-3  # the step noise is the 3-D filter's, not per frame
    for backend in ("triton", "cuda"):
        if backend in ad.available_backends("cpu"):
            with pytest.raises(ValueError, match=rf"^spec: the {backend} backend does not implement the spatio-temporal"):
                noise.ddpm_step(e, 10, x, backend=backend)


# ---------------------------------------------------------------------------------------------
# the fused CPU kernel against the reference on the same stream
# ---------------------------------------------------------------------------------------------
def _kernel_spec(kind: str, C: int) -> ad.NoiseSpec:
    """Spatio-temporal specs covering the kernel's paths: one and two draws, DC / offset, per-volume
    std, squeeze variants, every radius convention, a flat non-DC table (the no-FFT path)."""
    V = random_axes(C, 1, seed=C + 7)
    sdm = ad.Squeeze(V, -0.4)
    hdm = ad.Squeeze(V, 0.6, variant="heisenberg") if C > 1 else None
    return _temporal({
        "pl": ad.NoiseSpec(spectral=ad.PowerLaw(-0.5, eps=0.05)),
        "sdm+band_rmax1": ad.NoiseSpec(sdm, ad.Band(0.1, 0.45), radius="rmax1"),
        "hdm+pl_per_sample": ad.NoiseSpec(hdm, ad.PowerLaw(0.8), normalize="per_sample"),
        "two_indep+offset": ad.NoiseSpec(spectral=ad.TwoBand(0.6, (0, 0.3), 0.4, (0.3, 1), mixture="independent"),
                                         radius="nyquist1", offset=ad.OffsetNoise(0.3)),
        "two_shared": ad.NoiseSpec(sdm, ad.TwoBand(0.3, (0.0, 0.25), 0.7, (0.25, 1.0))),
        "per_sample_only": ad.NoiseSpec(sdm, normalize="per_sample"),
        "offset_only": ad.NoiseSpec(offset=ad.OffsetNoise(0.5)),
    }[kind])


KERNEL_KINDS = ["pl", "sdm+band_rmax1", "hdm+pl_per_sample", "two_indep+offset", "two_shared",
                "per_sample_only", "offset_only"]
FRAMES = [1, 2, 3, 5]
# odd C (a lone last volume gets a zero partner), odd planes (per-element stream ranges), C = 1
KERNEL_SHAPES = [(2, 3, 6, 7), (3, 1, 5, 4), (1, 4, 8, 8)]


def _video(shape, F):
    B, C, H, W = shape
    return (B, C, F, H, W)


@requires_compiled
@pytest.mark.parametrize("F", FRAMES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_cpu_kernel_matches_reference(kind, shape, F, schedule):
    dims = _video(shape, F)
    spec = _kernel_spec(kind, dims[1])
    x0 = torch.randn(dims, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 250, 17][:dims[0]])
    for target in ("epsilon", "v"):
        want = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, target=target, backend="reference")
        got = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, target=target, backend="cpu")
        close(got[0], want[0])
        close(got[1], want[1])
    want = ad.shaped_noise(dims, spec, timesteps=t, schedule=schedule, seed=SEED, offset=OFFSET, backend="reference")
    got = ad.shaped_noise(dims, spec, timesteps=t, schedule=schedule, seed=SEED, offset=OFFSET, backend="cpu")
    close(got, want)
    # the caller's white draws ([2, ...] for a two-draw spec) through apply_operator
    eps = torch.randn((spec.draws, *dims) if spec.draws > 1 else dims, generator=torch.Generator().manual_seed(3))
    close(ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend="cpu"),
          ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend="reference"))


@requires_compiled
@pytest.mark.parametrize("kind", ["pl", "hdm+pl_per_sample", "two_indep+offset"])
def test_cpu_kernel_is_not_the_per_frame_filter(kind, schedule):
    """The comparison above can fail: for F > 1 the per-frame spec gives different noise."""
    dims = (2, 3, 3, 6, 7)
    spec = _kernel_spec(kind, 3)
    per_frame = ad.NoiseSpec(spec.squeeze, spec.spectral, normalize=spec.normalize, radius=spec.radius,
                             offset=spec.offset)
    t = torch.tensor([999, 250])
    got = ad.shaped_noise(dims, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    other = ad.shaped_noise(dims, per_frame, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    assert (got - other).abs().max() > 0.05


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sdm+band_rmax1", "two_indep+offset"])
def test_cpu_kernel_half_types(kind, dtype, schedule):
    dims = (2, 3, 3, 5, 6)
    spec = _kernel_spec(kind, 3)
    x0 = torch.randn(dims, generator=torch.Generator().manual_seed(1)).to(dtype)
    t = torch.tensor([600, 3])
    want = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="reference")
    got = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cpu")
    assert got[0].dtype == dtype
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)
    want = ad.shaped_noise(dims, spec, timesteps=t, schedule=schedule, seed=SEED, dtype=dtype, backend="reference")
    close(ad.shaped_noise(dims, spec, timesteps=t, schedule=schedule, seed=SEED, dtype=dtype, backend="cpu"),
          want, dtype)


@requires_compiled
@pytest.mark.parametrize("layout", ["channels_last_3d", "frame_slice", "permuted"])
def test_cpu_kernel_strided_inputs(layout, schedule):
    """Any strides: channels_last_3d (outputs keep it), every other frame of a longer clip, and a
    view with frames and channels swapped in memory; the caller's eps strided as well."""
    B, C, F, H, W = 2, 3, 3, 5, 7
    spec = _kernel_spec("hdm+pl_per_sample", C)
    g = torch.Generator().manual_seed(1)
    if layout == "channels_last_3d":
        x0 = torch.randn(B, C, F, H, W, generator=g).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "frame_slice":
        x0 = torch.randn(B, C, 2 * F, H, W, generator=g)[:, :, ::2]
    else:
        x0 = torch.randn(B, F, C, H, W, generator=g).transpose(1, 2)
    assert not x0.is_contiguous()
    t = torch.tensor([100, 900])
    want = ad.add_noise(x0.contiguous(), t, spec, schedule, seed=SEED, offset=OFFSET, backend="reference")
    got = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cpu")
    close(got[0], want[0])
    close(got[1], want[1])
    if layout == "channels_last_3d":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    close(ad.apply_operator(x0, spec, timesteps=t, schedule=schedule, backend="cpu"),
          ad.apply_operator(x0.contiguous(), spec, timesteps=t, schedule=schedule, backend="reference"))


@requires_compiled
def test_cpu_kernel_input_perturbation_and_flow(schedule):
    """Input perturbation (n' through the same 3-D filter) and a flow-matching call with a sigma-varying
    squeeze (the flow lowering keeps the temporal mode) against the reference."""
    dims = (3, 3, 4, 6, 5)
    spec = _temporal(ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, seed=6), -0.5, schedule="linear"),
                                  ad.PowerLaw(-0.7, eps=0.05), offset=ad.OffsetNoise(0.2)))
    x0 = torch.randn(dims, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500, 0])
    want = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.2, backend="reference")
    got = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.2, backend="cpu")
    close(got[0], want[0])
    close(got[1], want[1])
    flow = ad.FlowSchedule()
    sigmas = torch.tensor([0.9, 0.35, 0.05], dtype=torch.float64)
    want = ad.add_noise(x0, sigmas, spec, flow, seed=SEED, target="flow", backend="reference")
    got = ad.add_noise(x0, sigmas, spec, flow, seed=SEED, target="flow", backend="cpu")
    close(got[0], want[0])
    close(got[1], want[1])


@requires_compiled
def test_cpu_kernel_bluestein_frame_and_plane_lengths(schedule):
    """Lengths with a prime factor above 61 go through Bluestein's transform: F = 67 frames, and a
    67-pixel side inside a temporal volume."""
    spec = _kernel_spec("pl", 2)
    for dims in [(1, 2, 67, 3, 4), (1, 1, 3, 67, 2)]:
        close(ad.shaped_noise(dims, spec, seed=SEED, backend="cpu"),
              ad.shaped_noise(dims, spec, seed=SEED, backend="reference"))


@requires_compiled
def test_cpu_kernel_sample_does_not_depend_on_the_batch():
    """Sample b's noise is bit for bit the same alone or in a batch (volumes pair within a sample)."""
    spec = _kernel_spec("two_indep+offset", 3)
    full = ad.shaped_noise((3, 3, 4, 5, 6), spec, seed=SEED, offset=OFFSET, backend="cpu")
    per = 3 * 4 * 5 * 6  # stream counters per sample: C F H W / 4
    for b in range(3):
        alone = ad.shaped_noise((1, 3, 4, 5, 6), spec, seed=SEED, offset=OFFSET + b * per // 4, backend="cpu")
        torch.testing.assert_close(alone[0], full[b], rtol=0, atol=0)


@requires_compiled
def test_cpu_kernel_statistics_are_the_3d_spectrum():
    """The kernel's own draws (float32) have the 3-D power spectrum bin by bin (as the reference's
    do above), with the bound that fails for the per-frame spectrum."""
    B, C, F, H, W = 256, 16, 4, 8, 8
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-1.5, eps=0.05), temporal=True)
    n = ad.shaped_noise((B, C, F, H, W), spec, seed=SEED, backend="cpu").double()
    power = (torch.fft.fftn(n, dim=(-3, -2, -1)).abs() ** 2).mean(dim=(0, 1)) / (F * H * W)
    (w, _), = R.spatial_stages(spec, H, W, F)
    assert ((power / w**2) - 1).abs().max() < 0.1


@requires_compiled
def test_auto_runs_the_cpu_kernel_for_temporal_specs(schedule):
    spec = _kernel_spec("sdm+band_rmax1", 3)
    dims = (2, 3, 3, 6, 5)
    assert ad.ops._backend_for("auto", torch.device("cpu"), spec, dims, 0.0, "shape") == "cpu"
    assert ad.ops._backend_for("auto", torch.device("cpu"), spec, dims, 0.3, "x0") == "cpu"
    torch.testing.assert_close(ad.shaped_noise(dims, spec, seed=SEED, timesteps=torch.tensor([1, 2]), schedule=schedule),
                               ad.shaped_noise(dims, spec, seed=SEED, timesteps=torch.tensor([1, 2]), schedule=schedule,
                                               backend="cpu"), rtol=0, atol=0)


def test_kernel_args_key_on_frames_for_temporal_specs_only(schedule):
    from anisodiff.plan import kernel_args
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-1.0, eps=0.05), normalize="per_sample", temporal=True)
    a3, a5 = (kernel_args(spec, schedule, 3, 6, 5, "cpu", frames=F) for F in (3, 5))
    assert a3.weights.shape == (1, 3, 6, 5) and a5.weights.shape == (1, 5, 6, 5)
    assert a3.normalize == a5.normalize == 2
    (w, _), = R.spatial_stages(spec, 6, 5, 5)
    torch.testing.assert_close(a5.weights[0], w.float(), rtol=0, atol=0)
    a1 = kernel_args(spec, schedule, 3, 6, 5, "cpu", frames=1)  # F = 1: the per-frame lowering
    plain = kernel_args(ad.NoiseSpec(spectral=spec.spectral, normalize="per_sample"), schedule, 3, 6, 5, "cpu")
    assert a1.weights.shape == (1, 6, 5) and a1.normalize == 1
    torch.testing.assert_close(a1.weights, plain.weights, rtol=0, atol=0)
    per_frame = kernel_args(ad.NoiseSpec(spectral=spec.spectral), schedule, 3, 6, 5, "cpu", frames=7)
    assert per_frame.weights.shape == (1, 6, 5)  # per-frame specs ignore F
    with pytest.raises(ValueError, match="spec.temporal: .*frames"):
        kernel_args(spec, schedule, 3, 6, 5, "cpu")


@requires_compiled
def test_compiled_op_checks_the_temporal_arguments(schedule):
    """The glue's own checks (the last line of defence), and opcheck on the temporal arguments."""
    from anisodiff.plan import kernel_args
    spec = _kernel_spec("hdm+pl_per_sample", 3)
    args = kernel_args(spec, schedule, 3, 4, 6, "cpu", frames=2)
    t = torch.tensor([3, 900])
    x0 = torch.randn(2, 3, 2, 4, 6)
    stream = torch.tensor([5, 0])
    common = (t, args.coef, args.axes)
    tail = (list(args.gammas), args.variant)
    torch.library.opcheck(torch.ops.anisodiff.add_noise.default,
                          (x0, *common, args.weights, *tail, args.normalize, 0, stream, None, 0.25))
    torch.library.opcheck(torch.ops.anisodiff.shaped_noise.default,
                          ([2, 3, 2, 4, 6], *common, args.weights, *tail, args.normalize, stream, None, torch.float32))
    with pytest.raises(RuntimeError, match="normalize: 1 \\(per plane\\) does not apply"):
        torch.ops.anisodiff.add_noise(x0, *common, args.weights, *tail, 1, 0, stream, None)
    with pytest.raises(RuntimeError, match="weights: expected a contiguous float32 \\[1, 3, 4, 6\\]"):
        torch.ops.anisodiff.add_noise(torch.randn(2, 3, 3, 4, 6), *common, args.weights, *tail, 2, 0, stream, None)
    with pytest.raises(RuntimeError, match="normalize: expected 0"):
        torch.ops.anisodiff.add_noise(x0, *common, args.weights, *tail, 3, 0, stream, None)


@requires_compiled
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_kernel_every_instruction_set(capability, monkeypatch, schedule):
    if capability not in ad.build_info()["cpu_capabilities_compiled"]:
        pytest.skip(f"{capability} not compiled on this platform")
    spec = _kernel_spec("two_indep+offset", 3)
    x0 = torch.randn(2, 3, 5, 9, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 300])
    ref = ad.add_noise(x0, t, spec, schedule, seed=SEED, input_perturbation=0.1, backend="reference")
    monkeypatch.setenv("ANISODIFF_CPU_CAPABILITY", capability)
    out = ad.add_noise(x0, t, spec, schedule, seed=SEED, input_perturbation=0.1, backend="cpu")
    close(out[0], ref[0])
    close(out[1], ref[1])


@requires_compiled
def test_cpu_kernel_thread_count_does_not_change_the_noise(schedule):
    spec = _kernel_spec("hdm+pl_per_sample", 3)
    x0 = torch.randn(6, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
        torch.set_num_threads(2)
        two = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@requires_compiled
def test_cpu_kernel_under_torch_compile(schedule):
    """fullgraph: the temporal lowering (keyed on F) is a trace-time constant like the per-frame one."""
    spec = _kernel_spec("hdm+pl_per_sample", 3)
    x0, t = torch.randn(2, 3, 4, 8, 8), torch.tensor([3, 700])
    compiled = torch.compile(lambda x, ts: ad.add_noise(x, ts, spec, schedule, seed=SEED), fullgraph=True)
    got, eager = compiled(x0, t), ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
