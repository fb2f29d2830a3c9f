"""Integrations: diffusers schedulers and pipelines, the k-diffusion and EDM adapters, the example.

The diffusers tests check the schedulers against diffusers itself (white spec: bit for bit; shaped
specs: the parent's arithmetic with the white noise replaced by the shaped noise, and the official
SDM code's "step in S^-1 coordinates" formulation), against anisodiff.reference, and run a real (tiny,
untrained) UNet2DModel through save -> load -> sample.
"""
import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import anisodiff as ad
from anisodiff import reference as R
from anisodiff.integrations import edm, kdiffusion
from anisodiff.integrations import noise_sampler, randn_like, sigma_to_timestep

from conftest import random_axes

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (pip install diffusers)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AXIS = random_axes(3, 1, seed=7)
SDM = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=-0.4))                     # time-varying ("beta")
SDM_STRONG = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=1.0))               # visible in statistics
SDM_CONST = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=1.0, schedule="constant"))
SDM_LINEAR = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=1.0, schedule="linear"))
SAGD = ad.NoiseSpec(spectral=ad.PowerLaw(-0.3))                                 # time-invariant
SDM_SAGD = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=-0.4), spectral=ad.PowerLaw(-0.3))
BAND = ad.NoiseSpec(spectral=ad.Band(0.0, 0.2))
TWO_IND = ad.NoiseSpec(spectral=ad.TwoBand(0.8, (0.0, 0.2), 0.6, (0.2, 0.8), mixture="independent"))
VP = ad.VPSchedule.linear(1000)


@pytest.fixture(autouse=True)
def _one_thread():
    """Everything here is tiny: on a loaded 2-core machine, intra-op threads only add spin-waits
    (a 4-step pipeline call measured 3.6 s with 2 threads, 0.01 s with 1). conftest restores it."""
    torch.set_num_threads(1)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _band_leak(noise: torch.Tensor, spec: ad.NoiseSpec) -> float:
    """max power outside the band / mean power inside (0 for an exact band-pass)."""
    H, W = noise.shape[-2:]
    mask = R.spectral_weights(spec, H, W)[0][0] > 0
    power = torch.fft.fft2(noise.double()).abs() ** 2
    return float(power[..., ~mask].max() / power[..., mask].mean())


def _axis_variances(noise: torch.Tensor, axis: torch.Tensor) -> tuple[float, float]:
    """Per-pixel variance of the noise along ``axis`` and per direction of its complement."""
    v = axis[:, 0].to(noise.dtype)
    along = torch.einsum("c,bchw->bhw", v, noise)
    total = noise.square().sum(dim=1)
    return float(along.square().mean()), float((total - along.square()).mean() / (noise.shape[1] - 1))


# =============================================================================================
# k-diffusion adapter
# =============================================================================================
def test_kdiffusion_shapes_band_and_stream():
    x = torch.zeros(8, 3, 16, 16)
    ns = noise_sampler(x, BAND, seed=1)
    a, b = ns(torch.tensor(5.0), torch.tensor(2.0)), ns(torch.tensor(2.0), torch.tensor(1.0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert _band_leak(a, BAND) < 1e-9                     # no power outside the band
    assert not torch.equal(a, b)                           # consecutive calls continue the stream
    again = noise_sampler(x, BAND, seed=1)
    assert torch.equal(again(5.0, 2.0), a)                 # reproducible from the seed
    assert torch.equal(a, ad.shaped_noise(x.shape, BAND, seed=1))
    white = noise_sampler(x, ad.NoiseSpec(), seed=1)(5.0, 2.0)
    assert _band_leak(white, BAND) > 0.1                   # the check can fail


def test_kdiffusion_squeeze_variance_and_float64():
    x = torch.zeros(64, 3, 16, 16, dtype=torch.float64)
    n = noise_sampler(x, SDM_CONST, generator=torch.Generator().manual_seed(0))(1.0, 0.5)
    assert n.dtype == torch.float64                        # the reference backend serves float64
    along, perp = _axis_variances(n, AXIS)
    assert along == pytest.approx(math.exp(-2.0), rel=0.06)   # S = I + (e^-1 - 1) v v^T
    assert perp == pytest.approx(1.0, rel=0.06)


def test_kdiffusion_time_varying_maps_sigma_next_to_timestep():
    sig = ((1 - VP.alphas_cumprod.double()) / VP.alphas_cumprod.double()).sqrt()
    assert torch.equal(sigma_to_timestep(sig, VP), torch.arange(1000))
    assert int(sigma_to_timestep(0.0, VP)[0]) == 0
    assert int(sigma_to_timestep(sig[500] * 1.0001, VP)[0]) == 500
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="schedule"):
        noise_sampler(x, SDM_STRONG)                       # time-varying needs the VP schedule
    ns = noise_sampler(x, SDM_STRONG, schedule=VP, seed=3)
    n = ns(sig[900], sig[500])
    t500 = torch.full((4,), 500)
    assert torch.equal(n, ad.shaped_noise(x.shape, SDM_STRONG, timesteps=t500, schedule=VP, seed=3))
    assert not torch.allclose(n, ad.shaped_noise(x.shape, SDM_STRONG, timesteps=torch.full((4,), 900),
                                                 schedule=VP, seed=3), atol=1e-3)


def test_kdiffusion_base_sampler_is_shaped():
    x = torch.zeros(2, 3, 8, 8)
    white = _randn(2, 3, 8, 8, seed=4)
    calls = []

    def base(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return white

    ns = noise_sampler(x, SDM_SAGD, schedule=VP, base=base)
    n = ns(3.0, 1.0)
    t = sigma_to_timestep(1.0, VP).expand(2)
    assert calls == [(3.0, 1.0)]
    assert torch.allclose(n, ad.apply_operator(white, SDM_SAGD, timesteps=t, schedule=VP), atol=1e-6)
    with pytest.raises(ValueError, match="two independent"):
        noise_sampler(x, TWO_IND, base=base)
    with pytest.raises(ValueError, match="one or the other"):
        noise_sampler(x, SAGD, base=base, seed=0)


# =============================================================================================
# EDM adapter
# =============================================================================================
def test_edm_randn_like_band_squeeze_and_base():
    x = torch.empty(64, 3, 16, 16)
    rl = randn_like(BAND, seed=2)
    a, b = rl(x), rl(x)
    assert a.shape == x.shape and not torch.equal(a, b)
    assert _band_leak(a, BAND) < 1e-9
    along, perp = _axis_variances(randn_like(SDM_CONST, seed=5)(x), AXIS)
    assert along == pytest.approx(math.exp(-2.0), rel=0.06) and perp == pytest.approx(1.0, rel=0.06)

    g = torch.Generator().manual_seed(9)
    rl = randn_like(TWO_IND, base=lambda y: torch.randn(y.shape, generator=g))  # two draws per call
    n = rl(torch.empty(2, 3, 8, 8))
    g.manual_seed(9)
    w = torch.stack([torch.randn(2, 3, 8, 8, generator=g) for _ in range(2)])
    assert torch.allclose(n, ad.apply_operator(w, TWO_IND), atol=1e-6)


def test_edm_time_varying_needs_a_fixed_timestep():
    with pytest.raises(ValueError, match="timesteps"):
        randn_like(SDM_STRONG)
    rl = randn_like(SDM_STRONG, timesteps=999, schedule=VP, seed=0)
    n = rl(torch.empty(4, 3, 8, 8))
    assert torch.equal(n, ad.shaped_noise((4, 3, 8, 8), SDM_STRONG, timesteps=torch.full((4,), 999),
                                          schedule=VP, seed=0))
    assert randn_like(SAGD)(torch.empty(2, 3, 8, 8)).shape == (2, 3, 8, 8)  # time-invariant: no t


@pytest.mark.parametrize("func", [kdiffusion.noise_sampler, edm.randn_like])
def test_docstring_snippets_run(func):
    doc = textwrap.dedent(func.__doc__.split("::", 1)[1])
    exec(compile(doc, f"<{func.__module__} docstring>", "exec"), {})


# =============================================================================================
# diffusers
# =============================================================================================
def test_core_never_imports_diffusers_and_missing_diffusers_is_explained():
    code = textwrap.dedent("""
        import sys
        import anisodiff, anisodiff.integrations
        assert 'diffusers' not in sys.modules, 'the core imported diffusers'
        sys.modules['diffusers'] = None        # simulate a machine without diffusers
        try:
            import anisodiff.integrations.diffusers
        except ImportError as exc:
            assert 'pip install diffusers' in str(exc), exc
        else:
            raise SystemExit('no ImportError')
        try:
            anisodiff.integrations.AnisoDDPMScheduler
        except ImportError as exc:
            assert 'pip install diffusers' in str(exc), exc
        else:
            raise SystemExit('no ImportError from the lazy name')
        """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr + res.stdout


@pytest.fixture(scope="module")
def dd():
    pytest.importorskip("diffusers")
    from anisodiff.integrations import diffusers as mod
    return mod


@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=4,
                        down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    return model.eval()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@needs_diffusers
@pytest.mark.parametrize("name", ["AnisoDDPMScheduler", "AnisoDDIMScheduler", "AnisoEulerDiscreteScheduler",
                                  "AnisoFlowMatchEulerDiscreteScheduler"])
def test_config_round_trip(dd, name, tmp_path):
    import json
    cls = getattr(dd, name)
    spec = SDM_LINEAR if "FlowMatch" in name else SDM_SAGD
    sched = cls(noise_spec=spec)
    assert sched.noise_spec == spec and isinstance(sched.config["noise_spec"], dict)
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert ad.NoiseSpec.from_dict(saved["noise_spec"]) == spec
    assert cls.from_pretrained(tmp_path).noise_spec == spec
    assert cls.from_config(sched.config).noise_spec == spec
    assert cls(noise_spec=spec.to_dict()).noise_spec == spec and cls(noise_spec=spec.to_json()).noise_spec == spec
    assert cls().noise_spec == ad.NoiseSpec() and cls().is_white
    bad = spec.to_dict()
    bad["spectral"] = {"type": "power_law", "alpha": "steep"}
    with pytest.raises(TypeError):
        cls(noise_spec=bad)
    with pytest.raises(TypeError, match="noise_spec"):
        cls(noise_spec=3)


@needs_diffusers
def test_config_validation(dd):
    from diffusers import DDPMScheduler
    s = dd.AnisoDDPMScheduler.from_config(DDPMScheduler(beta_schedule="scaled_linear").config,
                                          noise_spec=SDM, sampling_mode="exact")
    assert s.config.beta_schedule == "scaled_linear" and s.config.sampling_mode == "exact"
    assert torch.equal(s.betas, DDPMScheduler(beta_schedule="scaled_linear").betas)
    with pytest.raises(ValueError, match="sampling_mode"):
        dd.AnisoDDPMScheduler(sampling_mode="fast")
    table = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, 1.0, schedule=torch.ones(500)))
    with pytest.raises(ValueError, match="entries"):
        dd.AnisoDDPMScheduler(noise_spec=table)            # a table must have T entries
    # flow matching has no betas: "beta" is the SDM profile at the VP timestep of equal SNR (anisodiff.flow)
    assert dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=SDM).noise_spec == SDM
    dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=table)  # any table length: knots on sigma in [0, 1]


# -- DDPM ---------------------------------------------------------------------------------------
@needs_diffusers
def test_ddpm_white_is_diffusers_bit_for_bit(dd):
    from diffusers import DDPMScheduler
    ours = dd.AnisoDDPMScheduler(noise_spec=ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, 0.0)))  # s = 0: white
    theirs = DDPMScheduler()
    x0, white, x, eps = (_randn(4, 3, 8, 8, seed=s) for s in range(4))
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(ours.add_noise(x0, white, t), theirs.add_noise(x0, white, t))
    for s in (ours, theirs):
        s.set_timesteps(50)
    for ts in (980, 500, 20, 0):
        a = ours.step(eps, torch.tensor(ts), x, generator=_gen(ts))
        b = theirs.step(eps, torch.tensor(ts), x, generator=_gen(ts))
        assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.pred_original_sample, b.pred_original_sample)


@needs_diffusers
@pytest.mark.parametrize("mode", ["official", "exact"])
def test_ddpm_step_is_the_reference(dd, mode):
    s = dd.AnisoDDPMScheduler(noise_spec=SDM_SAGD, sampling_mode=mode)
    s.set_timesteps(50)                                    # strided: prev of 980 is 960
    x, eps = 1.5 * _randn(3, 3, 8, 8, seed=1), _randn(3, 3, 8, 8, seed=2)
    from diffusers.utils.torch_utils import randn_tensor
    for t in (980, 400, 0):
        g = _gen(t)
        out = s.step(eps, torch.tensor(t), x, generator=g)
        prev = t - 20 if t > 0 else -1
        assert int(s.previous_timestep(torch.tensor(t))) == prev
        z = randn_tensor(x.shape, generator=_gen(t)) if t > 0 else None
        ref = R.ddpm_step(eps, t, x, SDM_SAGD, VP, prev_timestep=prev, noise=z, mode=mode,
                          clip_sample=True, clip_range=1.0)
        # float32 tensors run the fused kernel (float32 math); float64 ones the reference itself
        a_t = float(VP.alphas_cumprod[t].sqrt())
        torch.testing.assert_close(out.prev_sample, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pred_original_sample, ref[1], rtol=1e-5, atol=1e-5 + 2e-6 * 3 / a_t)
        out64 = s.step(eps.double(), torch.tensor(t), x.double(), generator=_gen(t))
        ref64 = R.ddpm_step(eps.double(), t, x.double(), SDM_SAGD, VP, prev_timestep=prev,
                            noise=randn_tensor(x.shape, generator=_gen(t), dtype=torch.float64) if t > 0 else None, mode=mode, clip_sample=True, clip_range=1.0)
        assert torch.equal(out64.prev_sample, ref64[0])
        if t == 0:  # like diffusers: no draw at the last step
            assert torch.equal(g.get_state(), _gen(0).get_state())


@needs_diffusers
def test_ddpm_official_is_the_sdm_code(dd):
    """The official SDM sampler: map to S(t)^-1 coordinates, run diffusers' DDPMScheduler.step, map back."""
    from diffusers import DDPMScheduler
    ours = dd.AnisoDDPMScheduler(noise_spec=SDM_STRONG)
    theirs = DDPMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(50)
    x, eps = 2.0 * _randn(4, 3, 8, 8, seed=3), _randn(4, 3, 8, 8, seed=4)  # clipping is active
    for t in (980, 600, 100, 0):
        S = R.squeeze_matrices(SDM_STRONG.squeeze, R.squeeze_strengths(SDM_STRONG.squeeze, [t], VP))[0]
        S_inv = torch.linalg.inv(S)

        def ch(M, y):
            return torch.einsum("ij,bjhw->bihw", M.float(), y)

        ref = theirs.step(ch(S_inv, eps), torch.tensor(t), ch(S_inv, x), generator=_gen(t))
        out = ours.step(eps, torch.tensor(t), x, generator=_gen(t))
        torch.testing.assert_close(out.prev_sample, ch(S, ref.prev_sample), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out.pred_original_sample, ch(S, ref.pred_original_sample), atol=2e-5, rtol=1e-5)
    white_step = theirs.step(eps, torch.tensor(600), x, generator=_gen(600)).prev_sample
    assert (ours.step(eps, torch.tensor(600), x, generator=_gen(600)).prev_sample - white_step).abs().max() > 1e-2


@needs_diffusers
def test_ddpm_time_invariant_spec_is_diffusers_with_shaped_step_noise(dd):
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor
    ours, theirs = dd.AnisoDDPMScheduler(noise_spec=SAGD, clip_sample=False), DDPMScheduler(clip_sample=False)
    for s in (ours, theirs):
        s.set_timesteps(25)                                # leading spacing, step 40
    x, eps = _randn(2, 3, 8, 8, seed=5), _randn(2, 3, 8, 8, seed=6)
    t = 400
    z = randn_tensor(x.shape, generator=_gen(1))
    sigma = theirs._get_variance(t) ** 0.5
    expected = theirs.step(eps, torch.tensor(t), x, generator=_gen(1)).prev_sample + sigma * (ad.apply_operator(z, SAGD) - z)
    torch.testing.assert_close(ours.step(eps, torch.tensor(t), x, generator=_gen(1)).prev_sample, expected,
                               atol=1e-5, rtol=1e-5)


@needs_diffusers
def test_ddpm_add_noise_shape_noise_velocity(dd):
    s = dd.AnisoDDPMScheduler(noise_spec=SDM_SAGD)
    x0, white = _randn(4, 3, 8, 8, seed=7), _randn(4, 3, 8, 8, seed=8)
    t = torch.tensor([1, 250, 700, 999])
    x_t, target = ad.add_noise(x0, t, SDM_SAGD, s, noise=white)
    assert torch.equal(s.add_noise(x0, white, t), x_t)
    torch.testing.assert_close(s.shape_noise(white, t), target, atol=1e-6, rtol=1e-6)
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.get_velocity(x0, white, t), ab.sqrt() * target - (1 - ab).sqrt() * x0,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="timesteps"):
        s.shape_noise(white)
    two = dd.AnisoDDPMScheduler(noise_spec=TWO_IND)
    with pytest.raises(ValueError, match="two white draws"):
        two.add_noise(x0, white, t)
    w2 = torch.stack([white, x0])
    assert torch.equal(two.add_noise(x0, w2, t), ad.add_noise(x0, t, TWO_IND, VP, noise=w2)[0])


@needs_diffusers
def test_ddpm_refuses_what_it_does_not_implement(dd):
    x, eps = _randn(1, 3, 8, 8), _randn(1, 3, 8, 8, seed=1)
    for kwargs, match in (({"prediction_type": "v_prediction"}, "prediction_type"),
                          ({"thresholding": True}, "thresholding"),
                          ({"variance_type": "fixed_large"}, "variance_type")):
        with pytest.raises(NotImplementedError, match=match):
            dd.AnisoDDPMScheduler(noise_spec=SDM, **kwargs).step(eps, 10, x)
        dd.AnisoDDPMScheduler(**kwargs).step(eps, 10, x)   # white: the parent handles everything


# -- DDIM ---------------------------------------------------------------------------------------
@needs_diffusers
def test_ddim_white_bit_for_bit_and_time_invariant_eta0(dd):
    from diffusers import DDIMScheduler
    x, eps = _randn(3, 3, 8, 8, seed=1), _randn(3, 3, 8, 8, seed=2)
    pairs = [(dd.AnisoDDIMScheduler(), DDIMScheduler()),
             (dd.AnisoDDIMScheduler(noise_spec=SAGD), DDIMScheduler())]
    for ours, theirs in pairs:
        for s in (ours, theirs):
            s.set_timesteps(20)
    for t in (950, 300, 0):
        a = pairs[0][0].step(eps, torch.tensor(t), x, eta=0.7, generator=_gen(t))
        b = pairs[0][1].step(eps, torch.tensor(t), x, eta=0.7, generator=_gen(t))
        assert torch.equal(a.prev_sample, b.prev_sample)
        # time-invariant covariance, eta = 0: the DDIM update itself is unchanged
        a = pairs[1][0].step(eps, torch.tensor(t), x, eta=0.0)
        b = pairs[1][1].step(eps, torch.tensor(t), x, eta=0.0)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)


@needs_diffusers
def test_ddim_eta_is_the_reference_with_shaped_noise(dd):
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor
    s = dd.AnisoDDIMScheduler(noise_spec=SDM_SAGD)
    s.set_timesteps(20)
    x, eps = _randn(2, 3, 8, 8, seed=3), _randn(2, 3, 8, 8, seed=4)
    out = s.step(eps, torch.tensor(500), x, eta=0.5, generator=_gen(2))
    z = randn_tensor(x.shape, generator=_gen(2))
    ref = R.ddim_step(eps, 500, x, SDM_SAGD, VP, prev_timestep=450, eta=0.5, noise=z, clip_sample=True)
    assert torch.equal(out.prev_sample, ref[0])
    assert torch.equal(s.step(eps, torch.tensor(500), x, eta=0.5, variance_noise=z).prev_sample, ref[0])
    with pytest.raises(ValueError, match="both generator and variance_noise"):
        s.step(eps, torch.tensor(500), x, eta=0.5, generator=_gen(0), variance_noise=z)
    # time-invariant spec, eta > 0: diffusers' DDIM with the white variance noise replaced by A z
    sa, plain = dd.AnisoDDIMScheduler(noise_spec=SAGD), DDIMScheduler()
    for q in (sa, plain):
        q.set_timesteps(20)
    expected = plain.step(eps, torch.tensor(500), x, eta=0.5, variance_noise=ad.apply_operator(z, SAGD)).prev_sample
    torch.testing.assert_close(sa.step(eps, torch.tensor(500), x, eta=0.5, generator=_gen(2)).prev_sample,
                               expected, atol=1e-5, rtol=1e-5)
    # use_clipped_model_output (Glide) and set_alpha_to_one=False follow DDIMScheduler
    for kw in ({"set_alpha_to_one": False}, {}):
        a, b = dd.AnisoDDIMScheduler(noise_spec=SAGD, **kw), DDIMScheduler(**kw)
        for q in (a, b):
            q.set_timesteps(20)
        big = 3.0 * eps
        torch.testing.assert_close(a.step(big, torch.tensor(0), x, use_clipped_model_output=True).prev_sample,
                                   b.step(big, torch.tensor(0), x, use_clipped_model_output=True).prev_sample,
                                   atol=1e-5, rtol=1e-5)


# -- Euler ---------------------------------------------------------------------------------------
def _euler_expected(sched, spec, eps, x, i, s_churn, z, index=None):
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    gamma = min(s_churn / (len(sched.sigmas) - 1), 2**0.5 - 1)
    sigma_hat = sigma * (gamma + 1)
    n = ad.apply_operator(z, spec, timesteps=index, schedule=VP)
    x_hat = x + n * (sigma_hat**2 - sigma**2) ** 0.5
    x0 = x_hat - sigma_hat * eps
    return x_hat + (x_hat - x0) / sigma_hat * (sigma_next - sigma_hat)


@needs_diffusers
def test_euler_churn_noise(dd):
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor
    x, eps = _randn(2, 3, 8, 8, seed=1), _randn(2, 3, 8, 8, seed=2)
    runs = {}
    for name, sched in (("white", dd.AnisoEulerDiscreteScheduler()), ("diffusers", EulerDiscreteScheduler()),
                        ("sagd", dd.AnisoEulerDiscreteScheduler(noise_spec=SAGD)),
                        ("sdm", dd.AnisoEulerDiscreteScheduler(noise_spec=SDM_STRONG))):
        sched.set_timesteps(10)
        sched.is_scale_input_called = True
        out = [sched.step(eps, sched.timesteps[i], x, s_churn=2.0, generator=_gen(i)).prev_sample for i in range(3)]
        runs[name] = (sched, out)
    for i in range(3):
        assert torch.equal(runs["white"][1][i], runs["diffusers"][1][i])
        z = randn_tensor(x.shape, generator=_gen(i))
        s = runs["sagd"][0]
        torch.testing.assert_close(runs["sagd"][1][i], _euler_expected(s, SAGD, eps, x, i, 2.0, z), atol=1e-5, rtol=1e-5)
        s = runs["sdm"][0]
        t = torch.full((2,), int(s.timesteps[i].round()))  # the squeeze at the current timestep
        torch.testing.assert_close(runs["sdm"][1][i], _euler_expected(s, SDM_STRONG, eps, x, i, 2.0, z, t),
                                   atol=1e-5, rtol=1e-5)
    s = runs["sdm"][0]
    other = _euler_expected(s, SDM_STRONG, eps, x, 2, 2.0, randn_tensor(x.shape, generator=_gen(2)), torch.zeros(2, dtype=torch.long))
    assert (other - runs["sdm"][1][2]).abs().max() > 1e-3   # the timestep matters


@needs_diffusers
def test_euler_add_noise_and_prior(dd):
    s = dd.AnisoEulerDiscreteScheduler(noise_spec=SDM_STRONG)
    s.set_timesteps(10)
    x0, white = _randn(2, 3, 8, 8, seed=1), _randn(2, 3, 8, 8, seed=2)
    t = s.timesteps[[0, 5]]
    idx = t.round().long()
    sigma = s.sigmas[[0, 5]].view(-1, 1, 1, 1)
    expected = x0 + sigma * ad.apply_operator(white, SDM_STRONG, timesteps=idx, schedule=VP)
    torch.testing.assert_close(s.add_noise(x0, white, t), expected, atol=1e-5, rtol=1e-5)
    from diffusers.utils.torch_utils import randn_tensor
    prior = s.init_noise_sigma * s.prior_noise((2, 3, 8, 8), generator=_gen(0))
    z = randn_tensor((2, 3, 8, 8), generator=_gen(0))
    torch.testing.assert_close(prior, s.init_noise_sigma * ad.apply_operator(
        z, SDM_STRONG, timesteps=torch.full((2,), 999), schedule=VP), atol=1e-4, rtol=1e-5)


# -- Flow matching -------------------------------------------------------------------------------
@needs_diffusers
def test_flow_match_scale_noise_and_stochastic_step(dd):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor
    x, v = _randn(2, 3, 8, 8, seed=1), _randn(2, 3, 8, 8, seed=2)
    out = {}
    for name, sched in (("white", dd.AnisoFlowMatchEulerDiscreteScheduler(stochastic_sampling=True)),
                        ("diffusers", FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)),
                        ("sagd", dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=SAGD, stochastic_sampling=True)),
                        ("sdm", dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=SDM_LINEAR, stochastic_sampling=True)),
                        ("deterministic", dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=SAGD)),
                        ("plain", FlowMatchEulerDiscreteScheduler())):
        sched.set_timesteps(8)
        out[name] = (sched, [sched.step(v, sched.timesteps[i], x, generator=_gen(i)).prev_sample for i in range(2)])
    for i in range(2):
        assert torch.equal(out["white"][1][i], out["diffusers"][1][i])
        assert torch.equal(out["deterministic"][1][i], out["plain"][1][i])
        z = randn_tensor(x.shape, generator=_gen(i))
        s = out["sdm"][0]
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        for name, spec, t in (("sagd", SAGD, None), ("sdm", SDM_LINEAR, torch.full((2,), float(sigma_next)))):
            expected = (1 - sigma_next) * (x - sigma * v) + sigma_next * ad.apply_operator(
                z, spec, timesteps=t, schedule=ad.FlowSchedule())  # the squeeze at tau(sigma_next) = sigma_next
            torch.testing.assert_close(out[name][1][i], expected, atol=1e-5, rtol=1e-5)
    s = dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=SDM_LINEAR)
    s.set_timesteps(8)
    t = s.timesteps[[1, 4]]
    expected_sigma = s.sigmas[[1, 4]].view(-1, 1, 1, 1)
    x0, white = _randn(2, 3, 8, 8, seed=3), _randn(2, 3, 8, 8, seed=4)
    shaped = ad.apply_operator(white, SDM_LINEAR, timesteps=t / 1000, schedule=ad.FlowSchedule())
    torch.testing.assert_close(s.shape_noise(white, t), shaped)
    torch.testing.assert_close(s.scale_noise(x0, t, white), (1 - expected_sigma) * x0 + expected_sigma * shaped,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        s.scale_noise(x0, t)


# -- priors and pipelines ---------------------------------------------------------------------------
@needs_diffusers
def test_prior_noise_is_shaped(dd):
    s = dd.AnisoDDPMScheduler(noise_spec=BAND)
    assert _band_leak(s.prior_noise((16, 3, 16, 16), generator=_gen(0)), BAND) < 1e-9
    s = dd.AnisoDDIMScheduler(noise_spec=SDM_STRONG)         # prior at T - 1: tau = 1, r = s
    along, perp = _axis_variances(s.prior_noise((64, 3, 16, 16), generator=_gen(1)), AXIS)
    assert along == pytest.approx(math.exp(-2.0), rel=0.06) and perp == pytest.approx(1.0, rel=0.06)
    two = dd.AnisoDDPMScheduler(noise_spec=TWO_IND).prior_noise((2, 3, 8, 8), generator=[_gen(0), _gen(1)])
    assert two.shape == (2, 3, 8, 8)                            # per-sample generators, two draws


@needs_diffusers
def test_pipelines_white_equal_diffusers(dd, unet):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
    for ours, theirs, kw in ((dd.AnisoDDPMPipeline(unet, dd.AnisoDDPMScheduler()), DDPMPipeline(unet, DDPMScheduler()), {}),
                             (dd.AnisoDDIMPipeline(unet, dd.AnisoDDIMScheduler()), DDIMPipeline(unet, DDIMScheduler()),
                              {"eta": 0.5})):
        for p in (ours, theirs):
            p.set_progress_bar_config(disable=True)
        a = ours(batch_size=2, generator=_gen(0), num_inference_steps=4, output_type="pt", **kw).images
        b = theirs(batch_size=2, generator=_gen(0), num_inference_steps=4, output_type="pt", **kw).images
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="anisodiff scheduler"):
        dd.AnisoDDPMPipeline(unet, DDPMScheduler())


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pipeline_save_load_sample(dd, unet, kind, tmp_path):
    if kind == "ddpm":
        pipe = dd.AnisoDDPMPipeline(unet, dd.AnisoDDPMScheduler(noise_spec=SDM_SAGD, sampling_mode="exact"))
        kw = {}
    else:  # from an AnisoDDPMScheduler, as DDIMPipeline converts any scheduler: the spec carries over
        pipe = dd.AnisoDDIMPipeline(unet, dd.AnisoDDPMScheduler(noise_spec=SDM_SAGD))
        assert isinstance(pipe.scheduler, dd.AnisoDDIMScheduler)
        kw = {"eta": 1.0}
    pipe.set_progress_bar_config(disable=True)
    before = pipe(batch_size=2, generator=_gen(3), num_inference_steps=5, output_type="pt", **kw).images
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.scheduler.noise_spec == SDM_SAGD
    assert loaded.scheduler.config.get("sampling_mode") == pipe.scheduler.config.get("sampling_mode")
    after = loaded(batch_size=2, generator=_gen(3), num_inference_steps=5, output_type="pt", **kw).images
    assert torch.equal(before, after)
    white = type(pipe)(unet, type(pipe.scheduler)())
    white.set_progress_bar_config(disable=True)
    other = white(batch_size=2, generator=_gen(3), num_inference_steps=5, output_type="pt", **kw).images
    assert (other - after).abs().max() > 1e-3                  # the spec changes the samples


# =============================================================================================
# the example
# =============================================================================================
@needs_diffusers
def test_example_train_diffusers_runs(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "train_diffusers.py"), "--steps", "2",
                          "--inference-steps", "3", "--num-images", "2", "--output", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert re.search(r"trained 2 steps", res.stdout)
    import json
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    spec = ad.NoiseSpec.from_dict(cfg["noise_spec"])
    assert spec.squeeze is not None and spec.squeeze.strength == (-0.4,)
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == [
        "anisodiff.integrations.diffusers", "AnisoDDPMScheduler"]
