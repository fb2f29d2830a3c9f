"""anisodiff.diagnostics.terminal_snr: the SNR of x_t per principal direction and per frequency band.

The formulas are checked against dense covariances: the noise covariance of reference.covariance
(S(t)^2 (x) Sigma_w, built from the impulse responses of the filter) and the data's dense second
moment about its channel means, projected on a frequency band (the real projector of the ring's DFT
modes) or on a principal channel direction. Then the case that motivates the check: with the papers'
1e-10 DC floor, PowerLaw(-0.3) on 4x4 planes puts almost all the noise on DC and every other band
keeps SNR > 1 at t = T.
"""
import math

import pytest
import torch

import anisodiff as ad
from anisodiff import bands, reference
from anisodiff.diagnostics import (SNR_THRESHOLD, DataStatistics, TerminalSNR, named_schedule,
                                   terminal_snr)

SCHEDULE = ad.VPSchedule.linear(T=1000)


def planted_data(N=96, C=3, H=4, W=5, seed=0):
    """Correlated channels, a spectral tilt and per-image mean offsets: nothing is white."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=g, dtype=torch.float64)
    z = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    tilt = (reference.radius(H, W) + 0.1) ** -0.7
    x = reference.filter_planes(torch.einsum("cd,ndhw->nchw", mix, z), tilt)
    return x + torch.randn(N, C, 1, 1, generator=g, dtype=torch.float64) + 2.0


def ring_projector(H, W, ring):
    """The real orthogonal projector [HW, HW] onto the DFT modes of ring ``ring``."""
    mask = (bands.ring_index(H, W) == ring).to(torch.complex128)
    basis = torch.eye(H * W, dtype=torch.float64).reshape(H * W, H, W)
    projected = torch.fft.ifft2(torch.fft.fft2(basis) * mask).real  # row j: P e_j
    return projected.reshape(H * W, H * W).T.contiguous()


def dense_snr(spec, x, t, schedule=SCHEDULE):
    """(band SNRs, direction SNRs, directions, joint [band, direction] SNRs) at timestep t from
    dense covariances."""
    N, C, H, W = x.shape
    mean = x.mean(dim=(0, 2, 3))
    flat = (x - mean[:, None, None]).reshape(N, -1)
    data = flat.T @ flat / N
    noise = reference.covariance(spec, (C, H, W), timesteps=t, schedule=schedule)
    ab = float(schedule.alphas_cumprod[t])
    a2, b2 = ab, 1 - ab
    band = []
    for ring in range(int(bands.ring_index(H, W).max()) + 1):
        P = torch.kron(torch.eye(C, dtype=torch.float64), ring_projector(H, W, ring))
        band.append(a2 * torch.trace(P @ data) / (b2 * torch.trace(P @ noise)))
    values, vectors = torch.linalg.eigh(flat.reshape(N, C, H * W).transpose(1, 2).reshape(-1, C).T
                                        .cov(correction=0))
    vectors = vectors.flip(1)
    direction = []
    for j in range(C):
        P = torch.kron(torch.outer(vectors[:, j], vectors[:, j]), torch.eye(H * W, dtype=torch.float64))
        direction.append(a2 * torch.trace(P @ data) / (b2 * torch.trace(P @ noise)))
    joint = torch.zeros(len(band), C, dtype=torch.float64)
    for ring in range(len(band)):
        Pr = ring_projector(H, W, ring)
        for j in range(C):
            P = torch.kron(torch.outer(vectors[:, j], vectors[:, j]), Pr)
            joint[ring, j] = a2 * torch.trace(P @ data) / (b2 * torch.trace(P @ noise))
    return torch.stack(band), torch.stack(direction), vectors, joint


def _orthonormal(C, k, seed):
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q[:, :k]


SPECS = {
    "sdm_power_law": lambda C, H, W: ad.NoiseSpec(ad.Squeeze(_orthonormal(C, 1, 1), -0.8),
                                                  ad.PowerLaw(-0.5, eps=0.01)),
    "hdm_offset": lambda C, H, W: ad.NoiseSpec(ad.Squeeze(_orthonormal(C, 2, 2), [1.5, -0.5],
                                                          variant="heisenberg"),
                                               ad.PowerLaw(0.3), offset=ad.OffsetNoise(0.4)),
    "two_band_independent": lambda C, H, W: ad.NoiseSpec(
        spectral=ad.TwoBand(0.8, (0, 0.3), 0.3, (0.25, 1), mixture="independent")),
    "table_uncalibrated": lambda C, H, W: ad.NoiseSpec(
        spectral=ad.SpectralTable(1 + reference.radius(H, W) ** 2), normalize="none"),
    "pyramid": lambda C, H, W: ad.NoiseSpec(spectral=ad.PyramidNoise(3, 0.6)),
    "white": lambda C, H, W: ad.NoiseSpec(),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 6, 6)])
def test_snr_matches_the_dense_covariances(name, shape):
    C, H, W = shape
    x = planted_data(C=C, H=H, W=W, seed=C + H)
    spec = SPECS[name](C, H, W)
    stats = ad.fit_statistics(x, k=1, progress=False)
    ts = [0, 300, 999]
    snr = terminal_snr(spec, SCHEDULE, stats, timesteps=ts)
    assert isinstance(snr, TerminalSNR) and snr.T == 1000 and snr.timesteps.tolist() == ts
    for row, t in enumerate(ts):
        band, direction, vectors, joint = dense_snr(spec, x, t)
        assert torch.allclose(snr.band_snr[row], band, rtol=1e-9, atol=0), (name, t)
        assert torch.allclose(snr.direction_snr[row], direction, rtol=1e-9, atol=0), (name, t)
        assert torch.allclose(snr.joint_snr[row], joint, rtol=1e-8, atol=0), (name, t)
        # same directions, up to sign
        assert torch.allclose((snr.directions * vectors).sum(0).abs(), torch.ones(C,
                              dtype=torch.float64), atol=1e-9)
    assert torch.equal(snr.terminal_band_snr, snr.band_snr[-1])
    assert torch.equal(snr.terminal_direction_snr, snr.direction_snr[-1])


def test_the_bands_are_not_interchangeable():
    """The dense check has teeth: a tilted spectrum gives every band a different SNR, and the
    per-band value is not the all-frequency (per-direction) one."""
    x = planted_data(C=3, H=6, W=6)
    snr = terminal_snr(SPECS["sdm_power_law"](3, 6, 6), SCHEDULE, ad.fit_statistics(x, progress=False))
    band = snr.terminal_band_snr
    assert (band.max() / band.min()) > 2
    assert not torch.allclose(band, snr.terminal_direction_snr.mean().expand_as(band), rtol=0.1)


def test_along_t_and_the_video_shape():
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.2, eps=0.05))
    snr = terminal_snr(spec, SCHEDULE, shape=(3, 8, 8))
    assert snr.band_snr.shape == (1000, 7) and snr.direction_snr.shape == (1000, 3)
    assert (snr.band_snr[1:] < snr.band_snr[:-1]).all()  # time-invariant spec: SNR falls with t
    ab = SCHEDULE.alphas_cumprod.double()
    white = terminal_snr(ad.NoiseSpec(), SCHEDULE, shape=(3, 8, 8))  # white data and noise
    assert torch.allclose(white.band_snr, (ab / (1 - ab))[:, None].expand(-1, 7), rtol=1e-12)
    video = terminal_snr(spec, SCHEDULE, shape=(3, 7, 8, 8))  # per frame: F does not enter
    assert torch.equal(video.band_snr, snr.band_snr) and video.shape == (3, 7, 8, 8)


# ---------------------------------------------------------------------------------------------
# the papers' DC floor: PowerLaw(-0.3) at 4x4
# ---------------------------------------------------------------------------------------------
BAD = ad.NoiseSpec(spectral=ad.PowerLaw(-0.3))               # eps = 1e-10, the papers' floor
GOOD = ad.NoiseSpec(spectral=ad.PowerLaw(-0.3, eps=0.125))   # half the lowest frequency


def test_the_papers_floor_leaves_every_band_but_dc_a_high_snr():
    snr = terminal_snr(BAD, SCHEDULE, shape=(3, 4, 4))
    power = reference.spatial_power(BAD, 4, 4)
    assert float(power[0, 0] / power.sum()) > 0.9999  # almost all the noise on DC
    band = snr.terminal_band_snr
    assert band.numel() == 4 and float(band[0]) < 1e-5
    assert (band[1:] > 1).all(), band  # every other band: SNR > 1 at t = T
    # closed form for white unit data: SNR_R = abar_T / (1 - abar_T) * bins_R / sum_R P_n
    ab = float(SCHEDULE.alphas_cumprod[-1])
    ring = bands.ring_index(4, 4)
    for r in range(1, 4):
        expected = ab / (1 - ab) * float((ring == r).sum()) / float(power[ring == r].sum())
        assert float(band[r]) == pytest.approx(expected, rel=1e-12)
    # the per-direction view (all frequencies) alone would miss it
    assert (snr.terminal_direction_snr < 1e-3).all()

    lines = snr.warnings()
    assert len(lines) == 3
    for r, line in zip((3, 2, 1), lines):  # worst first
        assert f"band r = {r}/4 cycles/pixel" in line and "t = 999" in line
        assert "raise the DC floor eps" in line and "eps=0.125" in line
        assert "rescale_betas_zero_snr" in line and "\n" not in line


def test_no_warning_for_a_good_floor_white_noise_or_a_zero_snr_schedule():
    assert terminal_snr(GOOD, SCHEDULE, shape=(3, 4, 4)).warnings() == []
    assert terminal_snr(ad.NoiseSpec(), SCHEDULE, shape=(3, 4, 4)).warnings() == []
    diffusers = pytest.importorskip("diffusers")
    zero = diffusers.DDPMScheduler(rescale_betas_zero_snr=True)
    snr = terminal_snr(BAD, zero, shape=(3, 4, 4))
    assert (snr.terminal_band_snr == 0).all() and snr.warnings() == []
    assert (snr.band_snr[500, 1:] > 0).all()  # only the end is at zero SNR


def test_flow_matching_schedule_ends_at_zero_snr():
    diffusers = pytest.importorskip("diffusers")
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    snr = terminal_snr(BAD, flow, shape=(3, 4, 4))
    assert snr.T == 1000 and (snr.terminal_band_snr == 0).all() and snr.warnings() == []
    sigmas = torch.sort(flow.sigmas.double()).values
    sigma = sigmas[100]
    white = terminal_snr(ad.NoiseSpec(), flow, shape=(3, 4, 4), timesteps=[100])
    assert torch.allclose(white.band_snr, ((1 - sigma) ** 2 / sigma**2).expand(1, 4), rtol=1e-12)
    # a squeeze that varies with sigma: the default FlowSchedule's profile, as add_noise reads it
    varying = ad.NoiseSpec(ad.Squeeze(torch.eye(3)[:, :1], 0.5))
    plain = diffusers.FlowMatchEulerDiscreteScheduler()  # sigmas i / 1000
    on_diffusers = terminal_snr(varying, plain, shape=(3, 4, 4))
    on_flow = terminal_snr(varying, ad.FlowSchedule(), shape=(3, 4, 4))
    assert torch.allclose(on_diffusers.direction_snr, on_flow.direction_snr, rtol=1e-5)
    constant = ad.NoiseSpec(ad.Squeeze(torch.eye(3)[:, :1], 0.5, schedule="constant"))
    assert terminal_snr(constant, flow, shape=(3, 4, 4)).warnings() == []


def test_threshold_changes_what_is_flagged():
    snr = terminal_snr(BAD, SCHEDULE, shape=(3, 4, 4))
    values = snr.terminal_band_snr[1:].sort().values  # ~1.21, 1.74, 2.05
    assert len(snr.warnings(float(values[1]) - 1e-6)) == 2
    assert snr.warnings(float(values[-1]) + 1e-6) == []
    assert SNR_THRESHOLD == 0.1 and len(snr.warnings()) == 3
    with pytest.raises(ValueError, match="threshold"):
        snr.warnings(0)


def test_a_strong_squeeze_is_named_as_a_direction():
    """s = 5 on the data's main axis: the noise there shrinks by e^-10, the SNR along it ~ 1."""
    x = planted_data(C=3, H=4, W=4)
    pca, spectrum = ad.fit_statistics(x, k=1, progress=False)
    spec = ad.NoiseSpec(pca.squeeze(5.0, schedule="constant"))
    snr = terminal_snr(spec, SCHEDULE, (pca, spectrum))
    ab = float(SCHEDULE.alphas_cumprod[-1])
    expected = ab / (1 - ab) * float(pca.eigenvalues[0]) / math.exp(-10)
    assert float(snr.terminal_direction_snr[0]) == pytest.approx(expected, rel=1e-9)
    assert expected > 1
    lines = [l for l in snr.warnings() if "principal direction" in l]
    assert lines and "principal direction 1 of the data" in lines[0] and "squeeze" in lines[0]
    assert terminal_snr(ad.NoiseSpec(pca.squeeze(-0.4)), SCHEDULE, (pca, spectrum)).warnings() == []


def test_a_band_without_noise_has_infinite_snr():
    snr = terminal_snr(ad.NoiseSpec(spectral=ad.Band(0.1, 0.3)), SCHEDULE, shape=(3, 8, 8))
    outside = snr.noise_band_power == 0
    assert outside.any() and torch.isinf(snr.terminal_band_snr[outside]).all()
    assert any("puts no noise in this band" in line for line in snr.warnings())


def test_data_statistics_round_trip_and_bad_input():
    x = planted_data(C=3, H=4, W=5)
    pca, spectrum = ad.fit_statistics(x, progress=False)
    stats = DataStatistics.from_fit(pca, spectrum)
    assert stats.shape == (4, 5) and stats.channels == 3
    assert float(stats.band_power.sum()) == pytest.approx(float(spectrum.power.sum()), rel=1e-12)
    again = DataStatistics.from_dict(stats.to_dict())
    assert torch.equal(again.covariance, stats.covariance) and torch.equal(again.band_power,
                                                                           stats.band_power)
    a = terminal_snr(BAD, SCHEDULE, stats)
    b = terminal_snr(BAD, SCHEDULE, (pca, spectrum), shape=(3, 4, 5))
    assert torch.equal(a.band_snr, b.band_snr)
    cases = [
        (lambda: terminal_snr(BAD, SCHEDULE), ValueError, "shape: required"),
        (lambda: terminal_snr(BAD, SCHEDULE, stats, shape=(3, 8, 8)), ValueError, "does not match"),
        (lambda: terminal_snr(BAD, SCHEDULE, shape=(3, 4)), ValueError, "shape"),
        (lambda: terminal_snr("spec", SCHEDULE, shape=(3, 4, 4)), TypeError, "spec"),
        (lambda: terminal_snr(BAD, SCHEDULE, "stats"), TypeError, "data_stats"),
        (lambda: terminal_snr(BAD, None, shape=(3, 4, 4)), ValueError, "schedule"),
        (lambda: terminal_snr(BAD, SCHEDULE, shape=(3, 4, 4), timesteps=[1000]), ValueError,
         "timesteps"),
        (lambda: terminal_snr(ad.NoiseSpec(ad.Squeeze(torch.eye(4)[:, :1])), SCHEDULE, stats),
         ValueError, "4"),
        (lambda: DataStatistics.from_dict({"shape": [4, 5], "covariance": [[1.0]]}), ValueError,
         "band_power: missing"),
        (lambda: DataStatistics(torch.eye(2, dtype=torch.float64), torch.ones(2), (4, 4)),
         ValueError, "bands"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_named_schedules_are_the_diffusers_ones():
    diffusers = pytest.importorskip("diffusers")
    sd = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(named_schedule("scaled_linear").betas, sd.betas)
    assert torch.equal(named_schedule("linear").betas, diffusers.DDPMScheduler().betas)
    with pytest.raises(ValueError, match="schedule"):
        named_schedule("cosine")


def test_a_random_strength_offset_enters_with_its_mean_covariance():
    """Sigma(u) is affine in u^2 and E u^2 = 1/3 for u ~ U[0, 1): the mean covariance is the fixed
    strength o / sqrt(3)'s, checked here against the dense covariances at u = 0 and u = 1."""
    x = planted_data(C=3, H=4, W=4)
    stats = ad.fit_statistics(x, progress=False)
    spatial = ad.PowerLaw(-0.4, eps=0.05)
    random = ad.NoiseSpec(spectral=spatial, offset=ad.OffsetNoise(0.8, random_strength=True))
    snr = terminal_snr(random, SCHEDULE, stats, timesteps=[999])
    lo = reference.covariance(ad.NoiseSpec(spectral=spatial), (3, 4, 4), timesteps=999,
                              schedule=SCHEDULE)
    hi = reference.covariance(ad.NoiseSpec(spectral=spatial, offset=ad.OffsetNoise(0.8)), (3, 4, 4),
                              timesteps=999, schedule=SCHEDULE)
    mean_noise = lo + (hi - lo) / 3
    dc = torch.kron(torch.eye(3, dtype=torch.float64), ring_projector(4, 4, 0))
    ab = float(SCHEDULE.alphas_cumprod[999])
    flat = (x - x.mean(dim=(0, 2, 3))[:, None, None]).reshape(x.shape[0], -1)
    data = flat.T @ flat / x.shape[0]
    expected = ab * torch.trace(dc @ data) / ((1 - ab) * torch.trace(dc @ mean_noise))
    assert float(snr.band_snr[0, 0]) == pytest.approx(float(expected), rel=1e-9)
    fixed = ad.NoiseSpec(spectral=spatial, offset=ad.OffsetNoise(0.8))
    assert float(terminal_snr(fixed, SCHEDULE, stats).terminal_band_snr[0]) < float(snr.band_snr[0, 0])


def test_a_squeezed_direction_in_one_band_is_found_where_both_marginals_miss_it():
    """Luminance (variance 1) lives in ring 1 of 8x8 planes only, and a squeeze s = 3 shrinks the
    noise along it by e^-6: along luminance over all bands, and in ring 1 over all channels, the
    SNR is below 0.1, but in ring 1 along luminance it is ~0.13."""
    g = torch.Generator().manual_seed(4)
    Q = _orthonormal(3, 3, 5)
    ring1 = (bands.ring_index(8, 8) == 1).double()
    z = torch.randn(400, 3, 8, 8, generator=g, dtype=torch.float64)
    lum = reference.filter_planes(z[:, :1], ring1 * (64 / ring1.sum()) ** 0.5)
    x = torch.einsum("ck,bkhw->bchw", Q, torch.cat([lum, 0.1 * z[:, 1:]], dim=1))
    pca, spectrum = ad.fit_statistics(x, k=1, progress=False)
    spec = ad.NoiseSpec(pca.squeeze(3.0, schedule="constant"))
    snr = terminal_snr(spec, SCHEDULE, (pca, spectrum))
    assert float(snr.terminal_direction_snr.max()) < 0.1 and float(snr.terminal_band_snr.max()) < 0.1
    joint = snr.terminal_joint_snr
    assert float(joint[1, 0]) > 0.1 and float(joint.max()) == float(joint[1, 0])
    _, _, _, dense = dense_snr(spec, x, 999)
    assert torch.allclose(joint, dense, rtol=1e-8)
    assert snr.offenders() == [("band_direction", (1, 0), pytest.approx(float(joint[1, 0])))]
    (line,) = snr.warnings()
    assert "band r = 1/8" in line and "principal direction 1 of the data" in line
    assert "squeeze" in line and "rescale_betas_zero_snr" in line
    # without the cross-spectra only the marginals are known: nothing is flagged
    stats = DataStatistics.from_fit(pca, spectrum)
    blind = DataStatistics(stats.covariance, stats.band_power, stats.shape)
    assert terminal_snr(spec, SCHEDULE, blind).warnings() == []


def test_flow_schedule_with_a_sigma_varying_squeeze_matches_the_dense_covariances():
    """anisodiff.FlowSchedule: x = (1 - sigma) x0 + sigma n, the squeeze at tau(sigma); the SNR
    at sigma = i / 1000 against reference.covariance on the flow path, and 0 at sigma = 1."""
    x = planted_data(C=3, H=4, W=5)
    stats = ad.fit_statistics(x, k=1, progress=False)
    flow = ad.FlowSchedule()
    spec = ad.NoiseSpec(ad.Squeeze(_orthonormal(3, 1, 3), 1.2, variant="heisenberg"),
                        ad.PowerLaw(-0.5, eps=0.01))
    snr = terminal_snr(spec, flow, stats, timesteps=[99, 499, 899])
    assert snr.T == 1000 and (snr.terminal_band_snr == 0).all() and snr.warnings() == []
    N = x.shape[0]
    flat = (x - x.mean(dim=(0, 2, 3))[:, None, None]).reshape(N, -1)
    data = flat.T @ flat / N
    for row, i in enumerate((99, 499, 899)):
        sigma = (i + 1) / 1000
        noise = reference.covariance(spec, (3, 4, 5), timesteps=torch.tensor([sigma],
                                     dtype=torch.float64), schedule=flow)[0]
        for ring in range(snr.band_snr.shape[1]):
            P = torch.kron(torch.eye(3, dtype=torch.float64), ring_projector(4, 5, ring))
            expected = (1 - sigma) ** 2 * torch.trace(P @ data) / (sigma**2 * torch.trace(P @ noise))
            assert float(snr.band_snr[row, ring]) == pytest.approx(float(expected), rel=1e-9)
    # the squeeze varies with sigma: the along-axis noise differs between rows
    constant = ad.NoiseSpec(ad.Squeeze(_orthonormal(3, 1, 3), 1.2, variant="heisenberg",
                                       schedule="constant"), ad.PowerLaw(-0.5, eps=0.01))
    assert not torch.allclose(snr.direction_snr,
                              terminal_snr(constant, flow, stats, timesteps=[99, 499, 899]).direction_snr)


@pytest.mark.parametrize("random_strength", [False, True])
def test_spatiotemporal_specs_are_refused_not_computed_per_frame(random_strength):
    """terminal_snr works on H x W planes: a spec with the spatio-temporal spectrum is refused (also
    through the mean-strength rewrite of a random-strength offset, which must keep `temporal`)."""
    offset = ad.OffsetNoise(0.1, random_strength=True) if random_strength else None
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(0.5), offset=offset, temporal=True)
    with pytest.raises(ValueError, match="spec.temporal"):
        ad.terminal_snr(spec, ad.VPSchedule.linear(), shape=(3, 8, 8))
