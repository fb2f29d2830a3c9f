"""Flow matching (rectified flow, SD3 / Flux): ``add_noise`` on float sigmas, the squeeze profile
``tau(sigma)``, the flow sampler, and the README's two-line change of the SD3 / Flux training loop.

Kernels (cpu; triton through its interpreter) against anisodiff.reference on the same stream; the
reference against the eager formula ``(1 - s) x0 + s n``; the sampler on Gaussian data, whose
velocity field is known in closed form.
"""
import importlib.util
import math

import pytest
import torch

import anisodiff as ad
from anisodiff import reference as R
from anisodiff.flow import FlowSchedule, flow_coefficients
from anisodiff.rng import stream_tensor

from conftest import random_axes, requires_compiled

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")
HAS_TRITON_CPU = "triton" in ad.available_backends(torch.device("cpu"))
needs_triton = pytest.mark.skipif(not HAS_TRITON_CPU, reason="triton (interpreter) unavailable")

FLOW = FlowSchedule()
V3 = random_axes(3, 1, seed=3)
V4 = random_axes(4, 2, seed=4)
SPECS = {
    "white": ad.NoiseSpec(),
    "sdm_beta": ad.NoiseSpec(ad.Squeeze(V3, -0.4)),
    "sdm_linear+pl": ad.NoiseSpec(ad.Squeeze(V3, 0.8, schedule="linear"), ad.PowerLaw(-0.2)),
    "hdm_table+band": ad.NoiseSpec(ad.Squeeze(V3, -0.6, variant="heisenberg",
                                              schedule=torch.linspace(0, 1, 7) ** 2), ad.Band(0.1, 0.35)),
    "const+two_indep": ad.NoiseSpec(ad.Squeeze(V3, 0.7, schedule="constant"),
                                    ad.TwoBand(0.6, (0.0, 0.3), 0.4, (0.3, 1.0), mixture="independent")),
    "offset+pl": ad.NoiseSpec(spectral=ad.PowerLaw(-0.1), offset=ad.OffsetNoise(0.1)),
}
SIGMAS = torch.tensor([0.0, 0.137, 0.5, 0.9937, 1.0])
SEED, OFFSET = 1234, 7


def close(actual, expected):
    """float32 kernels against the float64 reference: 1e-5 (a wrong constant is >= 1e-3)."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5)


def _x0(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the kernels == the reference on the stream, at float sigmas
# ---------------------------------------------------------------------------------------------
@requires_compiled
@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (5, 3, 7, 9)], ids=["8x8", "7x9"])
@pytest.mark.parametrize("target", ["epsilon", "flow", "x0"])
def test_cpu_kernel_matches_reference(kind, shape, target):
    spec, x0 = SPECS[kind], _x0(shape)
    kw = dict(seed=SEED, offset=OFFSET, target=target)
    out = ad.add_noise(x0, SIGMAS, spec, FLOW, backend="cpu", **kw)
    ref = ad.add_noise(x0, SIGMAS, spec, FLOW, backend="reference", **kw)
    for got, want in zip(out, ref):
        close(got, want)
    n = ad.shaped_noise(shape, spec, timesteps=SIGMAS, schedule=FLOW, seed=SEED, offset=OFFSET, backend="cpu")
    close(n, R.shaped_noise(shape, spec, SIGMAS, FLOW, seed=SEED, offset=OFFSET, dtype=torch.float64))


@requires_compiled
def test_caller_noise_and_sigma_layouts():
    """Caller-supplied white noise; a scalar sigma, ``[B]`` and the scripts' ``[B, 1, 1, 1]`` view."""
    spec, x0 = SPECS["sdm_linear+pl"], _x0((5, 3, 8, 8))
    white = _x0((5, 3, 8, 8), seed=9)
    out = ad.add_noise(x0, SIGMAS.view(-1, 1, 1, 1), spec, FLOW, noise=white, target="flow")
    ref = R.add_noise(x0, SIGMAS, spec, FLOW, noise=white, target="flow")
    for got, want in zip(out, ref):
        close(got, want)
    scalar = ad.add_noise(x0, 0.25, spec, FLOW, noise=white)
    full = ad.add_noise(x0, torch.full((5,), 0.25), spec, FLOW, noise=white)
    assert all(torch.equal(a, b) for a, b in zip(scalar, full))


@requires_compiled
def test_composes_with_video_and_input_perturbation():
    """The per-call rows are read per sample: video frames [B, C, F, H, W] and DDPM-IP's second
    draw take them as they take the VP table."""
    spec, x0 = SPECS["sdm_linear+pl"], _x0((2, 3, 3, 8, 8))
    s = torch.tensor([0.3, 0.9])
    kw = dict(seed=SEED, target="flow", input_perturbation=0.1)
    for got, want in zip(ad.add_noise(x0, s, spec, FLOW, backend="cpu", **kw),
                         ad.add_noise(x0, s, spec, FLOW, backend="reference", **kw)):
        close(got, want)
    n = R.shaped_noise(x0.shape, spec, s, FLOW, seed=SEED, dtype=torch.float64)
    close(ad.add_noise(x0, s, spec, FLOW, **kw)[1], n - x0.double())  # the target ignores the perturbation


@needs_triton
@pytest.mark.parametrize("kind", ["sdm_beta", "sdm_linear+pl", "hdm_table+band", "const+two_indep"])
def test_triton_matches_reference(kind):
    spec, x0 = SPECS[kind], _x0((2, 3, 5, 7))
    s = torch.tensor([0.3, 0.98])
    out = ad.add_noise(x0, s, spec, FLOW, seed=SEED, offset=OFFSET, target="flow", backend="triton")
    ref = ad.add_noise(x0, s, spec, FLOW, seed=SEED, offset=OFFSET, target="flow", backend="reference")
    for got, want in zip(out, ref):
        close(got, want)
    n = ad.shaped_noise((2, 3, 5, 7), spec, timesteps=s, schedule=FLOW, seed=SEED, backend="triton")
    close(n, R.shaped_noise((2, 3, 5, 7), spec, s, FLOW, seed=SEED, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# the formula: x_t = (1 - s) x0 + s n, target n - x0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["white", "sdm_beta", "hdm_table+band"])
def test_reference_is_the_eager_formula(kind):
    spec, x0 = SPECS[kind], _x0((5, 3, 6, 6))
    eps = R.white_noise(x0.shape, SEED, OFFSET)
    n = R.apply_operator(eps.double(), spec, SIGMAS, FLOW)
    s = SIGMAS.double().view(-1, 1, 1, 1)
    for target, want in (("epsilon", n), ("flow", n - x0.double()), ("x0", x0.double())):
        x_t, tgt = R.add_noise(x0.double(), SIGMAS, spec, FLOW, noise=eps.double(), target=target)
        torch.testing.assert_close(x_t, (1 - s) * x0.double() + s * n, rtol=0, atol=1e-12)
        torch.testing.assert_close(tgt, want, rtol=0, atol=1e-12)
    if kind == "white":
        torch.testing.assert_close(n, eps.double(), rtol=0, atol=0)


@requires_compiled
@needs_diffusers
def test_white_spec_is_the_training_scripts_formula_on_shifted_sigmas():
    """SD3's shift 3 and a dynamic (Flux-style) shift: the sigmas the real scheduler produces."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0 = _x0((6, 4, 8, 8))
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(6, mu=0.8)
    for sched, sigmas in ((static, static.sigmas[torch.tensor([0, 17, 250, 500, 900, 999])]),
                          (dynamic, dynamic.sigmas[:6])):
        assert sigmas.dtype == torch.float32 and 0 <= float(sigmas.min()) and float(sigmas.max()) <= 1
        s = sigmas.view(-1, 1, 1, 1)
        noise = ad.white_noise(x0.shape, seed=SEED)
        x_t, target = ad.add_noise(x0, s, ad.NoiseSpec(), sched, seed=SEED, target="flow")
        torch.testing.assert_close(x_t, (1.0 - s) * x0 + s * noise, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(target, noise - x0, rtol=1e-6, atol=1e-6)
        spec = ad.NoiseSpec(ad.Squeeze(random_axes(4, 1), -0.4), ad.PowerLaw(-0.04))
        for got, want in zip(ad.add_noise(x0, s, spec, sched, seed=SEED, target="flow"),
                             R.add_noise(x0, sigmas, spec, FLOW, seed=SEED, target="flow")):
            close(got, want)


# ---------------------------------------------------------------------------------------------
# the squeeze profile tau(sigma)
# ---------------------------------------------------------------------------------------------
def _vp_sigma(ac: torch.Tensor) -> torch.Tensor:
    """The flow sigma with the SNR of abar: (1 - s)^2 / s^2 = abar / (1 - abar)."""
    return (1 - ac).sqrt() / (ac.sqrt() + (1 - ac).sqrt())


def test_profiles_as_functions_of_sigma():
    s = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.8, 1.0], dtype=torch.float64)
    tau = lambda schedule: R.flow_squeeze_profile(ad.Squeeze(V3, 1.0, schedule=schedule), s, FLOW.reference)[0]
    torch.testing.assert_close(tau("linear"), s, rtol=0, atol=0)
    torch.testing.assert_close(tau("constant"), torch.ones_like(s), rtol=0, atol=0)
    table = torch.tensor([0.0, 2.0, 1.0])  # knots at sigma = 0, 0.5, 1
    want = torch.tensor([0.0, 0.4, 1.48, 2.0, 1.4, 1.0], dtype=torch.float64)
    torch.testing.assert_close(tau(table), want, rtol=0, atol=1e-12)
    # "beta": at the sigma of VP timestep t's SNR, tau is the SDM profile beta_t / beta_max
    vp = FLOW.reference
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    at_knots = R.flow_squeeze_profile(ad.Squeeze(V3, 1.0), _vp_sigma(vp.alphas_cumprod[t].double()), vp)[0]
    torch.testing.assert_close(at_knots, vp.betas[t].double() / vp.betas.double().max(), rtol=1e-9, atol=1e-12)
    ends = R.flow_squeeze_profile(ad.Squeeze(V3, 1.0), torch.tensor([0.0, 1e-6, 1.0]), vp)[0]
    torch.testing.assert_close(ends, torch.tensor([0.005, 0.005, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "beta", "table"])
def test_profile_derivative_is_the_slope(schedule):
    prof = torch.linspace(0, 1, 9) ** 3 if schedule == "table" else schedule
    sq = ad.Squeeze(V3, 1.0, schedule=prof)
    s = torch.tensor([0.03, 0.21, 0.55, 0.77, 0.9], dtype=torch.float64)  # between knots
    h = 1e-7
    _, d = R.flow_squeeze_profile(sq, s, FLOW.reference)
    fd = (R.flow_squeeze_profile(sq, s + h, FLOW.reference)[0] - R.flow_squeeze_profile(sq, s - h, FLOW.reference)[0]) / (2 * h)
    torch.testing.assert_close(d, fd, rtol=1e-5, atol=1e-7)
    assert (d > 0).all()


def test_covariance_at_a_sigma():
    """covariance(..., timesteps=sigma, schedule=flow) is the squeeze frozen at s tau(sigma)."""
    pl = ad.PowerLaw(-0.2)
    spec = ad.NoiseSpec(ad.Squeeze(V3, 0.8, schedule="linear"), pl)
    frozen = ad.NoiseSpec(ad.Squeeze(V3, 0.8 * 0.3, schedule="constant"), pl)
    torch.testing.assert_close(ad.covariance(spec, (3, 4, 4), timesteps=0.3, schedule=FLOW),
                               ad.covariance(frozen, (3, 4, 4)), rtol=1e-12, atol=1e-12)
    both = ad.covariance(spec, (3, 4, 4), timesteps=torch.tensor([0.3, 1.0], dtype=torch.float64), schedule=FLOW)
    torch.testing.assert_close(both[0], ad.covariance(frozen, (3, 4, 4)), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="timesteps"):
        ad.covariance(spec, (3, 4, 4), timesteps=torch.tensor([1]), schedule=FLOW)
    with pytest.raises(ValueError, match="timesteps: required"):
        ad.covariance(spec, (3, 4, 4), schedule=FLOW)


@requires_compiled
@pytest.mark.parametrize("schedule,sigma", [("beta", 0.5), ("beta", 0.95), ("linear", 0.6)])
def test_kernel_noise_has_the_profiles_variance(schedule, sigma):
    """60k pixels of the kernel's noise at one sigma: the variance along the axis is exp(-2 s tau)
    (the VP-timestep reading of "beta", tau = t / (T - 1) at sigma, would be off by > 20%)."""
    spec = ad.NoiseSpec(ad.Squeeze(V3, 1.0, schedule=schedule))
    tau = float(R.flow_squeeze_profile(spec.squeeze, torch.tensor([sigma]), FLOW.reference)[0][0])
    n = ad.shaped_noise((3750, 3, 4, 4), spec, timesteps=torch.full((3750,), sigma), schedule=FLOW, seed=5)
    along = torch.einsum("c,bchw->bhw", V3[:, 0].float(), n).double()
    var = float((along ** 2).mean())
    assert var == pytest.approx(math.exp(-2 * tau), rel=0.03)
    perp = n.double() - torch.einsum("c,bhw->bchw", V3[:, 0], along)
    assert float((perp ** 2).sum(1).mean()) / 2 == pytest.approx(1.0, rel=0.03)


# ---------------------------------------------------------------------------------------------
# errors: the argument is named, ambiguous input refused
# ---------------------------------------------------------------------------------------------
def test_bad_sigmas_are_refused_naming_the_argument():
    spec, x0 = SPECS["sdm_beta"], _x0((3, 3, 4, 4))
    with pytest.raises(TypeError, match="timesteps: .*ambiguous"):
        ad.add_noise(x0, torch.tensor([1, 500, 999]), spec, FLOW)
    with pytest.raises(TypeError, match="timesteps"):
        ad.add_noise(x0, 1, spec, FLOW)
    with pytest.raises(ValueError, match="timesteps: .*sigmas_from_timesteps"):
        ad.add_noise(x0, torch.tensor([1000.0, 500.0, 3.0]), spec, FLOW)  # scheduler.timesteps
    for bad in (torch.tensor([-0.1, 0.5, 0.5]), torch.tensor([0.5, float("nan"), 0.5])):
        with pytest.raises(ValueError, match=r"timesteps: sigmas must lie in \[0, 1\]"):
            ad.add_noise(x0, bad, spec, FLOW, backend="reference")
    with pytest.raises(ValueError, match="timesteps: expected sigmas of shape"):
        ad.add_noise(x0, torch.full((3, 2), 0.5), spec, FLOW)
    with pytest.raises(ValueError, match="timesteps: required"):
        ad.add_noise(x0, None, spec, FLOW)
    with pytest.raises(ValueError, match="timesteps: required"):
        ad.shaped_noise((3, 3, 4, 4), spec, schedule=FLOW)   # the squeeze varies with sigma
    ad.shaped_noise((3, 3, 4, 4), SPECS["const+two_indep"], schedule=FLOW)  # nothing varies: fine
    with pytest.raises(ValueError, match="target: 'v'"):
        ad.add_noise(x0, torch.full((3,), 0.5), spec, FLOW, target="v")
    torch.testing.assert_close(FlowSchedule.sigmas_from_timesteps(torch.tensor([1000.0, 3.0])),
                               torch.tensor([1.0, 0.003]))
    with pytest.raises(ValueError, match="reference"):
        FlowSchedule(ad.VPSchedule(torch.tensor([0.1, 1.0])))   # zero terminal SNR
    with pytest.raises(TypeError, match="reference"):
        FlowSchedule("linear")


def test_out_of_range_device_sigmas_give_nan_not_garbage():
    """On an accelerator (and in a compiled graph) sigmas are not read on the host: the per-call
    table gets a NaN row instead, so the sample comes out NaN."""
    s = torch.tensor([0.5, 1.5, -0.2, float("nan"), 1.0], dtype=torch.float64)
    coef = flow_coefficients(s, torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                             torch.tensor([0.0, 1.0], dtype=torch.float64), False)
    assert coef.shape == (5, 3) and coef.dtype == torch.float32
    torch.testing.assert_close(coef[[0, 4]], torch.tensor([[0.5, 0.5, 0.15], [0.0, 1.0, 0.3]]))
    assert torch.isnan(coef[1:4]).all()


# ---------------------------------------------------------------------------------------------
# torch.compile (the tests/test_compile.py pattern)
# ---------------------------------------------------------------------------------------------
@requires_compiled
@needs_diffusers
def test_compiled_training_step_with_changing_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = ad.NoiseSpec(ad.Squeeze(V3, -0.4), ad.PowerLaw(-0.04))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def step(x0, sigmas, seed):
        return ad.add_noise(x0, sigmas, spec, sched, seed=seed, target="flow")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x0 = _x0((3, 3, 8, 8))
    with torch._dynamo.config.patch(recompile_limit=2):
        for i in range(4):
            sigmas = torch.rand(3, generator=torch.Generator().manual_seed(i)).view(-1, 1, 1, 1)
            for got, want in zip(compiled(x0, sigmas, 10 + i), step(x0, sigmas, 10 + i)):
                assert torch.equal(got, want)
    out = compiled(x0, torch.tensor([0.5, 2.0, 0.5]), 3)[0]  # no host check in the graph: NaN
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# ---------------------------------------------------------------------------------------------
# sampling: Gaussian data, the exact velocity field
# ---------------------------------------------------------------------------------------------
C, H, W = 3, 8, 8
_A = torch.randn(C, C, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 0.5
SIGMA0 = _A @ _A.T + 0.2 * torch.eye(C, dtype=torch.float64)  # data: N(0, SIGMA0) per pixel, white in space
AXIS = torch.ones(C, 1, dtype=torch.float64) / math.sqrt(C)
PL = ad.PowerLaw(-0.5, eps=0.05)  # every band keeps power (a zero band could not be sampled)


def exact_velocity(x: torch.Tensor, sigma: float, spec: ad.NoiseSpec) -> torch.Tensor:
    """E[n - x0 | x_sigma] for x0 ~ N(0, SIGMA0 (x) I), n = A(sigma) eps: per frequency f of the
    unitary DFT, x has covariance K = (1 - s)^2 SIGMA0 + s^2 P(f) S^2, E[x0 | x] = (1 - s) SIGMA0
    K^-1 x and E[n | x] = s P(f) S^2 K^-1 x."""
    s = sigma
    if spec.squeeze is None:
        S = torch.eye(C, dtype=torch.float64)
    else:
        S = R.squeeze_matrices(spec.squeeze, R.flow_squeeze_strengths(spec.squeeze, torch.tensor([s]), FLOW))[0]
    P = R.spatial_power(spec, H, W)[..., None, None]
    K_inv = torch.linalg.inv((1 - s) ** 2 * SIGMA0 + s ** 2 * P * (S @ S))
    M = (s * P * (S @ S) - (1 - s) * SIGMA0) @ K_inv
    xf = torch.fft.fft2(x.double(), norm="ortho")
    return torch.fft.ifft2(torch.einsum("hwij,bjhw->bihw", M.to(torch.complex128), xf), norm="ortho").real


def _shifted_sigmas(n: int) -> torch.Tensor:
    """SD3's inference grid (shift 3): sigma_i = 3 u / (1 + 2 u), u linear from 1 to 1/n, then 0."""
    u = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    return torch.cat([3 * u / (1 + 2 * u), torch.zeros(1, dtype=torch.float64)])


def _channel_cov(x: torch.Tensor) -> torch.Tensor:
    xs = x.double().permute(0, 2, 3, 1).reshape(-1, C)
    return xs.T @ xs / xs.shape[0]


def _sample(spec, step, B=128, steps=64, seed=1):
    noise = ad.AnisotropicNoise(spec, FLOW)
    x = noise.sample_prior((B, C, H, W), generator=torch.Generator().manual_seed(seed)).double()
    sig = _shifted_sigmas(steps)
    for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        x = step(noise, exact_velocity(x, s, spec), s, s_next, x)
    return x


@requires_compiled
@pytest.mark.parametrize("profile", ["linear", "beta", None], ids=["sdm_linear", "sdm_beta", "sagd"])
def test_flow_sampler_recovers_gaussian_data(profile):
    """From the shaped prior at sigma = 1, 64 Euler steps on SD3's shifted grid with the exact
    velocity recover the data covariance (8192 pixel vectors: ~1.5% sampling error; 64 Euler steps
    leave < 5%). For a time-varying squeeze, Euler on the network's v_hat alone (the plain diffusers
    step) misses the path's sigma S' S^-1 n term and lands > 25% off along the squeezed axis."""
    spec = ad.NoiseSpec(None if profile is None else ad.Squeeze(AXIS, 1.0, schedule=profile), PL)
    x = _sample(spec, lambda noise, v, s, s_next, x: noise.flow_step(v, s, s_next, x))
    cov = _channel_cov(x)
    assert float((cov - SIGMA0).abs().max() / SIGMA0.abs().max()) < 0.08
    along = float(AXIS.T @ cov @ AXIS) / float(AXIS.T @ SIGMA0 @ AXIS)
    assert along == pytest.approx(1.0, abs=0.08)
    if profile is not None:
        naive = _sample(spec, lambda noise, v, s, s_next, x: x + (s_next - s) * v)
        along_naive = float(AXIS.T @ _channel_cov(naive) @ AXIS) / float(AXIS.T @ SIGMA0 @ AXIS)
        assert abs(along_naive - 1) > 0.25


@requires_compiled
def test_stochastic_flow_step_renoises_with_shaped_noise():
    """stochastic=True: (1 - s') (x - s v) + s' A(s') z, z from the stream the generator seeds."""
    spec = SPECS["sdm_linear+pl"]
    noise = ad.AnisotropicNoise(spec, FLOW)
    x, v = _x0((4, 3, 8, 8), 1), _x0((4, 3, 8, 8), 2)
    out = noise.flow_step(v, 0.8, 0.6, x, stochastic=True, generator=torch.Generator().manual_seed(3))
    seed = int(stream_tensor(None, torch.Generator().manual_seed(3), 0)[0])
    n = R.shaped_noise(x.shape, spec, torch.full((4,), 0.6), FLOW, seed=seed, dtype=torch.float64)
    close(out, 0.4 * (x.double() - 0.8 * v.double()) + 0.6 * n)
    plain = ad.AnisotropicNoise(SPECS["const+two_indep"], FLOW)   # time-invariant: x + dt v in float32
    assert torch.equal(plain.flow_step(v, 0.8, 0.6, x), x + (0.6 - 0.8) * v)


def test_flow_noise_saves_and_refuses_vp_steps(tmp_path):
    noise = ad.AnisotropicNoise(SPECS["sdm_beta"], FLOW)
    noise.save_pretrained(tmp_path)
    back = ad.AnisotropicNoise.from_pretrained(tmp_path)
    assert back.is_flow and back.schedule == FLOW and back.spec == SPECS["sdm_beta"]
    x = torch.zeros(2, 3, 4, 4)
    for call in (lambda: noise.ddpm_step(x, 5, x), lambda: noise.ddim_step(x, 5, x), lambda: noise.score(x, 5, x)):
        with pytest.raises(TypeError, match="schedule: .*flow_step"):
            call()
    with pytest.raises(TypeError, match="schedule: flow_step needs a flow"):
        ad.AnisotropicNoise(SPECS["sdm_beta"], ad.VPSchedule.linear(10)).flow_step(x, 0.5, 0.4, x)


@needs_diffusers
def test_diffusers_scheduler_step_is_the_exact_flow_sampler():
    """AnisoFlowMatchEulerDiscreteScheduler: the prior at the first sigma, its deterministic step
    for a time-varying squeeze = reference.flow_euler_step, and it samples the Gaussian data."""
    from anisodiff.integrations.diffusers import AnisoFlowMatchEulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    spec = ad.NoiseSpec(ad.Squeeze(AXIS, 1.0, schedule="linear"), PL)
    sched = AnisoFlowMatchEulerDiscreteScheduler(shift=3.0, noise_spec=spec)
    sched.set_timesteps(64)
    prior = sched.prior_noise((128, C, H, W), generator=torch.Generator().manual_seed(1))
    z = randn_tensor((128, C, H, W), generator=torch.Generator().manual_seed(1))
    close(prior, ad.apply_operator(z, spec, timesteps=torch.ones(128), schedule=FLOW))
    x = prior
    for i, t in enumerate(sched.timesteps):
        v = exact_velocity(x, float(sched.sigmas[i]), spec).float()
        if i == 0:
            want = R.flow_euler_step(v, sched.sigmas[0], sched.sigmas[1], x, spec, FLOW)
        x = sched.step(v, t, x).prev_sample
        if i == 0:
            close(x, want)
    cov = _channel_cov(x)
    assert float((cov - SIGMA0).abs().max() / SIGMA0.abs().max()) < 0.08


# ---------------------------------------------------------------------------------------------
# the README: diffusers' SD3 / Flux DreamBooth loop, with and without the two-line change
# ---------------------------------------------------------------------------------------------
def _dreambooth_loop(spec, steps=2, seed=0, B=4):
    """The loop of diffusers' train_dreambooth_sd3.py / _flux.py (logit-normal sigmas through the
    shifted scheduler, get_sigmas, the flow target, the weighted MSE), on a tiny conv model.
    ``spec=None`` runs it as written (the white noise taken from the canonical stream so both runs
    see the same draws); otherwise with the README's change. Returns per step the loss, the target
    and what is needed to recompute them, and the final weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    torch.manual_seed(seed)
    transformer = torch.nn.Conv2d(4, 4, 3, padding=1)
    optimizer = torch.optim.SGD(transformer.parameters(), lr=0.1)
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(seed + 1)

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(dtype=dtype)
        step_indices = [(noise_scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    record = []
    for step in range(steps):
        model_input = torch.randn(B, 4, 8, 8, generator=g)
        stream_seed = 100 + step
        if spec is None:
            noise = ad.white_noise(model_input.shape, seed=stream_seed)  # (the script: torch.randn_like)
        u = compute_density_for_timestep_sampling("logit_normal", B, logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=None, generator=g)
        indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = noise_scheduler_copy.timesteps[indices]
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        if spec is None:
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        else:  # the README's line
            noisy_model_input, noise = ad.add_noise(model_input, sigmas, spec, noise_scheduler_copy, seed=stream_seed)
        model_pred = transformer(noisy_model_input) + 0 * timesteps.view(-1, 1, 1, 1)
        weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(B, -1), 1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record.append(dict(loss=loss.item(), target=target.detach(), x_t=noisy_model_input.detach(),
                           x0=model_input, sigmas=sigmas.flatten(), pred=model_pred.detach(), seed=stream_seed))
    return record, [p.detach().clone() for p in transformer.parameters()]


@requires_compiled
@needs_diffusers
def test_readme_two_line_change_of_the_sd3_training_loop():
    # white spec: the changed loop is the original loop, step for step (same draws)
    original, w_orig = _dreambooth_loop(None)
    changed, w_changed = _dreambooth_loop(ad.NoiseSpec())
    for a, b in zip(original, changed):
        torch.testing.assert_close(b["x_t"], a["x_t"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b["target"], a["target"], rtol=1e-6, atol=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert 0 < float(a["sigmas"].min()) and float(a["sigmas"].max()) < 1
    for p, q in zip(w_orig, w_changed):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # anisotropic spec: x_t, target and loss are what the formula says
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(4, 1), -0.4), ad.PowerLaw(-0.04))
    shaped, _ = _dreambooth_loop(spec)
    for r in shaped:
        n = R.shaped_noise(r["x0"].shape, spec, r["sigmas"], FLOW, seed=r["seed"], dtype=torch.float64)
        s = r["sigmas"].double().view(-1, 1, 1, 1)
        close(r["x_t"], (1 - s) * r["x0"].double() + s * n)
        close(r["target"], n - r["x0"].double())
        assert not torch.allclose(r["target"], original[0]["target"], atol=0.1)
        loss = torch.mean(((r["pred"].double() - (n - r["x0"].double())) ** 2).reshape(4, -1), 1).mean()
        assert r["loss"] == pytest.approx(float(loss), rel=1e-5)
        _, flow_target = ad.add_noise(r["x0"], r["sigmas"], spec, FLOW, seed=r["seed"], target="flow")
        close(flow_target, n - r["x0"].double())
