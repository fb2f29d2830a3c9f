"""The fused C++ CPU kernel against anisodiff.reference on the same noise stream.

Grid: odd and even plane sizes, C in {1, 3, 4}, k in {1, 2}, every spec kind and normalisation,
fp32/fp16/bf16, contiguous / channels_last / non-contiguous inputs, every target, every compiled
instruction set, 1 and 2 threads.
"""
import pytest
import torch

import anisodiff as ad
from anisodiff import reference as R

from conftest import random_axes, requires_compiled

pytestmark = requires_compiled

SEED, OFFSET = 1234, 7


def make_spec(kind: str, C: int, k: int = 1, normalize: str = "calibrated", radius: str = "cycles"):
    V = random_axes(C, max(k, 1), seed=C * 10 + k)
    sq = {
        "iso": None,
        "sdm": ad.Squeeze(V[:, :k], -0.4),
        "sdm_pos": ad.Squeeze(V[:, :k], [1.0, 0.5][:k]),
        "hdm": ad.Squeeze(V[:, :k], -0.4, variant="heisenberg") if k < C else None,
        "sdm_const": ad.Squeeze(V[:, :k], 0.7, schedule="constant"),
        "sdm_linear": ad.Squeeze(V[:, :k], -0.6, schedule="linear"),
    }
    spectral = {
        "pl_neg": ad.PowerLaw(-0.2),  # DC weight 100: float32-conditioned (-0.5 gives 1e5)
        "pl_pos": ad.PowerLaw(0.3),
        "band": ad.Band(0.1, 0.35),
        "two_shared": ad.TwoBand(0.3, (0.0, 0.25), 0.7, (0.25, 1.0)),
        "two_indep": ad.TwoBand(0.6, (0.0, 0.3), 0.4, (0.3, 1.0), mixture="independent"),
    }
    if kind in sq:
        return ad.NoiseSpec(sq[kind], normalize=normalize, radius=radius)
    if kind in spectral:
        return ad.NoiseSpec(None, spectral[kind], normalize=normalize, radius=radius)
    sqk, spk = kind.split("+")
    return ad.NoiseSpec(sq[sqk], spectral[spk], normalize=normalize, radius=radius)


def close(actual, expected, dtype=torch.float32):
    """fp32: 1e-5 relative (docs/design.md section 5); half types: one rounding step of the storage type."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.float(), expected.float(), rtol=eps, atol=eps)


SHAPES = [(3, 3, 8, 8), (2, 3, 7, 9), (3, 1, 5, 6), (2, 4, 12, 10), (1, 3, 11, 13), (2, 3, 32, 32),
          (2, 3, 1, 6), (3, 4, 16, 1)]
KINDS = ["iso", "sdm", "hdm", "pl_neg", "band", "two_shared", "two_indep", "sdm+pl_pos",
         "hdm+band", "sdm_const", "sdm_linear"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_matches_reference(shape, kind, schedule):
    B, C, H, W = shape
    spec = make_spec(kind, C, k=1)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 0, 500, 250, 17][:B])
    try:
        expected = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="reference")
    except ValueError as exc:  # a band with no bin on a tiny grid: both backends must refuse
        with pytest.raises(ValueError, match="spectral"):
            ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cpu")
        assert "spectral" in str(exc)
        return
    actual = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cpu")
    close(actual[0], expected[0])
    close(actual[1], expected[1])


AXES_CASES = [(C, k, kind) for C, k in [(3, 1), (3, 2), (4, 1), (4, 2), (1, 1)]
              for kind in ["sdm", "sdm_pos", "hdm", "sdm+pl_neg", "hdm+two_indep"]
              if not (kind.startswith("hdm") and k >= C)]  # heisenberg needs k < C


@pytest.mark.parametrize("C,k,kind", AXES_CASES)
def test_axes_count(C, k, kind, schedule):
    spec = make_spec(kind, C, k=k)
    shape = (3, C, 6, 10)
    t = torch.tensor([999, 400, 3])
    expected = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="reference")
    actual = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    close(actual, expected)


@pytest.mark.parametrize("normalize", ["calibrated", "per_sample", "none"])
@pytest.mark.parametrize("radius", ["cycles", "nyquist1", "rmax1"])
@pytest.mark.parametrize("kind", ["pl_neg", "band", "two_shared", "two_indep", "sdm+pl_pos"])
def test_normalisation_and_radius(normalize, radius, kind, schedule):
    spec = make_spec(kind, 3, normalize=normalize, radius=radius)
    shape, t = (3, 3, 9, 8), torch.tensor([10, 999, 500])
    expected = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="reference")
    actual = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    close(actual, expected)


def test_spectral_table(schedule):
    H, W = 10, 7
    r = R.radius(H, W)
    w = 1.0 + torch.cos(9 * r) ** 2 + (r > 0.3).double()  # symmetric, radially varying
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), 0.5), ad.SpectralTable(w))
    t = torch.tensor([999, 1])
    expected = ad.shaped_noise((2, 3, H, W), spec, timesteps=t, schedule=schedule, seed=3, backend="reference")
    actual = ad.shaped_noise((2, 3, H, W), spec, timesteps=t, schedule=schedule, seed=3, backend="cpu")
    close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_neg"])
def test_dtypes(dtype, kind, schedule):
    spec = make_spec(kind, 3)
    x0 = torch.randn(4, 3, 8, 12).to(dtype)
    t = torch.tensor([1, 999, 333, 600])
    ref = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="reference")
    out = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    assert out[0].dtype == out[1].dtype == dtype
    close(out[0], ref[0], dtype)
    close(out[1], ref[1], dtype)
    noise = ad.shaped_noise((4, 3, 8, 12), spec, timesteps=t, schedule=schedule, seed=SEED, dtype=dtype, backend="cpu")
    ref_noise = ad.shaped_noise((4, 3, 8, 12), spec, timesteps=t, schedule=schedule, seed=SEED, dtype=dtype,
                                backend="reference")
    assert noise.dtype == dtype
    close(noise, ref_noise, dtype)


@pytest.mark.parametrize("target", ["epsilon", "v", "x0", "flow"])
def test_targets(target, schedule):
    spec = make_spec("sdm+pl_pos", 3)
    x0 = torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 998, 400])
    ref = ad.add_noise(x0, t, spec, schedule, seed=SEED, target=target, backend="reference")
    out = ad.add_noise(x0, t, spec, schedule, seed=SEED, target=target, backend="cpu")
    close(out[0], ref[0])
    close(out[1], ref[1])
    # the target really is what its name says (a wrong mixing constant fails here)
    n = ad.shaped_noise(x0.shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    want = {"epsilon": n, "v": a * n - b * x0, "x0": x0, "flow": n - x0}[target]
    close(out[1], want)
    close(out[0], a * x0 + b * n)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw", "expanded_noise"])
def test_memory_layouts(layout, schedule):
    spec = make_spec("sdm+pl_neg", 3)
    base = torch.randn(4, 3, 10, 12)
    t = torch.tensor([0, 999, 10, 600])
    noise = None
    if layout == "channels_last":
        x0 = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x0 = torch.randn(8, 6, 10, 24)[::2, ::2, :, ::2]
    elif layout == "transposed_hw":
        x0 = torch.randn(4, 3, 12, 10).transpose(2, 3)
    else:
        x0 = base
        noise = torch.randn(4, 3, 10, 24)[..., ::2]
    assert layout == "expanded_noise" or not x0.is_contiguous()
    stream = {"seed": SEED} if noise is None else {}
    ref = ad.add_noise(x0.contiguous(), t, spec, schedule, backend="reference",
                       noise=None if noise is None else noise.contiguous(), **stream)
    out = ad.add_noise(x0, t, spec, schedule, backend="cpu", noise=noise, **stream)
    close(out[0], ref[0])
    close(out[1], ref[1])
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


def test_caller_noise_two_draws(schedule):
    spec = make_spec("sdm+two_indep", 3)
    eps = torch.randn(2, 3, 3, 8, 8)
    t = torch.tensor([999, 1, 500])
    ref = ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend="reference")
    out = ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend="cpu")
    close(out, ref)
    with pytest.raises(ValueError, match="eps"):
        ad.apply_operator(eps[0], spec, timesteps=t, schedule=schedule, backend="cpu")


def test_identity_specs_are_exact(schedule):
    """s = 0 and alpha = 0 reproduce the white stream bit for bit on the kernel too."""
    t = torch.tensor([999, 500])
    white = ad.white_noise((2, 3, 8, 8), seed=SEED)
    V = random_axes(3, 1)
    for spec in [ad.NoiseSpec(), ad.NoiseSpec(ad.Squeeze(V, 0.0)),
                 ad.NoiseSpec(ad.Squeeze(V, 0.0, variant="heisenberg"), ad.PowerLaw(0.0))]:
        n = ad.shaped_noise((2, 3, 8, 8), spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
        assert torch.equal(n, white)
    x0 = torch.randn(2, 3, 8, 8)
    _, eps = ad.add_noise(x0, t, ad.NoiseSpec(ad.Squeeze(V, 0.0)), schedule, seed=SEED, backend="cpu")
    assert torch.equal(eps, white)


def test_white_noise_matches_reference_stream():
    for n, offset in [(1, 0), (7, 3), (4099, 2**32 - 5)]:
        assert torch.allclose(ad.white_noise((n,), seed=99, offset=offset),
                              R.white_noise((n,), 99, offset), rtol=0, atol=2e-6)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_instruction_sets_agree(capability, monkeypatch, schedule):
    compiled = ad.build_info()["cpu_capabilities_compiled"]
    if capability not in compiled:
        pytest.skip(f"{capability} not compiled on this platform")
    spec = make_spec("hdm+band", 4, k=2)
    x0 = torch.randn(3, 4, 9, 16)
    t = torch.tensor([999, 0, 300])
    ref = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="reference")
    monkeypatch.setenv("ANISODIFF_CPU_CAPABILITY", capability)
    out = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    close(out[0], ref[0])
    close(out[1], ref[1])


def test_thread_count_does_not_change_the_noise(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.randn(16, 3, 16, 16)
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(0))
    torch.set_num_threads(1)
    one = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    torch.set_num_threads(2)
    two = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_nan_in_x0_stays_local(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.randn(2, 3, 8, 8)
    x0[1, 2, 3, 4] = float("nan")
    x_t, v = ad.add_noise(x0, torch.tensor([10, 20]), spec, schedule, seed=SEED, target="v", backend="cpu")
    assert torch.isnan(x_t).sum() == 1 and torch.isnan(x_t[1, 2, 3, 4])
    assert torch.isnan(v).sum() == 1


def test_empty_batch(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.empty(0, 3, 8, 8)
    x_t, eps = ad.add_noise(x0, torch.empty(0, dtype=torch.long), spec, schedule, seed=1, backend="cpu")
    assert x_t.shape == (0, 3, 8, 8) and eps.shape == (0, 3, 8, 8)
    assert ad.shaped_noise((0, 3, 8, 8), spec, timesteps=torch.empty(0, dtype=torch.long),
                           schedule=schedule, seed=1).shape == (0, 3, 8, 8)


def test_gradient_flows_to_x0(schedule):
    spec = make_spec("sdm", 3)
    x0 = torch.randn(3, 3, 4, 4, requires_grad=True)
    t = torch.tensor([0, 500, 999])
    a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    g1, g2 = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    for target, d in [("epsilon", 0.0), ("v", -b), ("x0", 1.0), ("flow", -1.0)]:
        x_t, tgt = ad.add_noise(x0, t, spec, schedule, seed=1, target=target, backend="cpu")
        (grad,) = torch.autograd.grad((x_t * g1).sum() + (tgt * g2).sum(), x0)
        torch.testing.assert_close(grad, a * g1 + d * g2)


def _op_samples(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    args = ad.plan.kernel_args(spec, schedule, 3, 8, 8, torch.device("cpu"))
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 900])
    common = (t, args.coef, args.axes, args.weights, list(args.gammas), args.variant, args.normalize)
    noise = torch.randn(1, 2, 3, 8, 8)
    return x0, common, noise


def test_opcheck_add_noise(schedule):
    x0, common, noise = _op_samples(schedule)
    for x, n in [(x0, None), (x0, noise), (x0.requires_grad_(), None)]:
        torch.library.opcheck(torch.ops.anisodiff.add_noise.default,
                              (x, *common, 1, torch.tensor([5, 0]), n))


def test_opcheck_shaped_noise(schedule):
    _, common, noise = _op_samples(schedule)
    for n in [None, noise]:
        torch.library.opcheck(torch.ops.anisodiff.shaped_noise.default,
                              ([2, 3, 8, 8], *common, torch.tensor([5, 0]), n, torch.float32))


def test_torch_compile_training_step(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)

    def step(x0, t, seed):
        x_t, eps = ad.add_noise(x0, t, spec, schedule, seed=seed, backend="cpu")
        return torch.nn.functional.mse_loss(model(x_t), eps)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x0, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 999])
    torch.testing.assert_close(compiled(x0, t, 5), step(x0, t, 5))
