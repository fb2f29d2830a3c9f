"""Input perturbation (DDPM-IP): ``add_noise(..., input_perturbation=gamma)``.

x_t = a x0 + b (n + gamma n'), the target from n alone; n = A(t) eps and n' = A(t) eps' with the
same operator, eps' draw d from the same stream with counter word 2 = spec.draws + d (also when the
caller gives eps). Tested: the reference against diffusers' train_text_to_image recipe
(``new_noise = noise + gamma * randn_like(noise)``, ``target = noise``) in distribution; the CPU
kernel against the reference on the stream; the target and the x0 gradient unchanged by gamma;
video tensors, SDM / SAGD specs and offset noise; the errors.
"""
import pytest
import torch

import anisodiff as ad
from anisodiff import _autoselect
from anisodiff import reference as R

from conftest import random_axes, requires_compiled
from test_cpu_kernel import close, make_spec

SEED, OFFSET = 4321, 3
KERNELS = [pytest.param("cpu", marks=requires_compiled)] + (
    ["triton"] if "triton" in ad.available_backends("cpu") else [])


def _moments(u: torch.Tensor, v: torch.Tensor):
    """(Var u, Var v, Cov(u, v), Var(u - v), Cov(u - v, v)) over all elements (float64)."""
    u, v = u.double().reshape(-1), v.double().reshape(-1)
    d = u - v
    cov = lambda p, q: float(((p - p.mean()) * (q - q.mean())).mean())  # noqa: E731
    return cov(u, u), cov(v, v), cov(u, v), cov(d, d), cov(d, v)


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_white_spec_matches_the_diffusers_recipe_in_distribution(gamma, schedule):
    """With white noise the recipe is new_noise = noise + gamma randn_like(noise), target = noise:
    Var(new) = 1 + gamma^2, Cov(new, target) = 1, the perturbation independent of the target.
    2M elements: every moment within 5 standard errors of the recipe's, which tells gamma = 0.1
    from 0 (Var(new) - 1 = 0.01 is 7 standard errors)."""
    B, C, H, W = 512, 4, 32, 32
    x0 = torch.zeros(B, C, H, W)
    t = torch.full((B,), 500)
    x_t, target = ad.add_noise(x0, t, ad.NoiseSpec(), schedule, seed=SEED, input_perturbation=gamma,
                               backend="reference")
    b = float((1 - schedule.alphas_cumprod[500]).double().sqrt())
    new_noise = x_t.double() / b  # x0 = 0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, C, H, W, generator=g)
    recipe = noise + gamma * torch.randn(B, C, H, W, generator=g)  # diffusers' train_text_to_image
    ours, theirs = _moments(new_noise, target), _moments(recipe, noise)
    want = (1 + gamma**2, 1.0, 1.0, gamma**2, 0.0)
    n = new_noise.numel()
    # standard errors of the sample (co)variances of Gaussians: sqrt((s_pp s_qq + s_pq^2) / n)
    se = [((1 + gamma**2) ** 2 * 2 / n) ** 0.5, (2 / n) ** 0.5, ((1 + gamma**2 + 1) / n) ** 0.5,
          (2 * gamma**4 / n) ** 0.5, (gamma**2 / n) ** 0.5]
    for name, a, r, w, s in zip(("var new", "var target", "cov", "var pert", "cov pert-target"),
                                ours, theirs, want, se):
        assert abs(a - w) < 5 * s, (name, a, w)
        assert abs(r - w) < 5 * s, (name, r, w)  # the recipe itself, as a check of the bounds


@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos", "offset"])
def test_perturbation_has_the_spec_covariance_and_is_independent_of_the_target(kind, schedule):
    """Shaped specs: (x_t - a x0) / b - target = gamma n' has covariance gamma^2 Sigma(t) (the spec's,
    anisodiff.covariance) and zero covariance with the target; 100k draws of [3, 4, 4], every entry
    within 5 standard errors."""
    C, H, W = 3, 4, 4
    if kind == "offset":
        spec = ad.NoiseSpec(ad.Squeeze(random_axes(C, 1, 3), -0.6), ad.PowerLaw(-0.3),
                            offset=ad.OffsetNoise(0.3))
    else:
        spec = make_spec(kind, C)
    gamma, n = 0.5, 100_000
    t = torch.full((n,), 600)
    x_t, target = ad.add_noise(torch.zeros(n, C, H, W), t, spec, schedule, seed=SEED, input_perturbation=gamma)
    b = float((1 - schedule.alphas_cumprod[600]).double().sqrt())
    pert = ((x_t.double() / b - target.double()) / gamma).reshape(n, -1)
    tgt = target.double().reshape(n, -1)
    sigma = ad.covariance(spec, (C, H, W), timesteps=600, schedule=schedule)
    d = sigma.diagonal()
    se = ((d[:, None] * d[None, :] + sigma**2) / n).sqrt()
    assert float(((pert.T @ pert / n - sigma).abs() / se).max()) < 5.0
    assert float(((tgt.T @ tgt / n - sigma).abs() / se).max()) < 5.0
    cross_se = (d[:, None] * d[None, :] / n).sqrt()
    assert float(((pert.T @ tgt / n).abs() / cross_se).max()) < 5.0


# ---------------------------------------------------------------------------------------------
# kernel == reference on the stream
# ---------------------------------------------------------------------------------------------
SPECS = ["iso", "sdm", "hdm", "pl_neg", "two_indep", "sdm+pl_pos", "hdm+band"]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (2, 4, 8, 8), (2, 3, 3, 5, 6)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("target", ["epsilon", "v", "flow"])
def test_kernel_matches_reference(backend, kind, shape, target, schedule):
    if backend == "triton" and target != "v":
        pytest.skip("interpreter time: one target covers the Triton kernels")
    spec = make_spec(kind, shape[1])
    if spec.squeeze is None and kind.startswith("hdm"):
        pytest.skip("hdm needs k < C")
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 10, 400][:shape[0]])
    kw = dict(seed=SEED, offset=OFFSET, target=target, input_perturbation=0.3)
    want = ad.add_noise(x0, t, spec, schedule, backend="reference", **kw)
    got = ad.add_noise(x0, t, spec, schedule, backend=backend, **kw)
    close(got[0], want[0])
    close(got[1], want[1])


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
@pytest.mark.parametrize("kind", ["sdm+pl_pos", "two_indep"])
def test_the_perturbation_is_draws_D_plus_d_of_the_stream_and_the_target_is_unchanged(backend, kind, schedule):
    shape = (2, 3, 2, 6, 5)
    spec = make_spec(kind, 3)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700, 50])
    plain = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend=backend)
    pert = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.2, backend=backend)
    assert torch.equal(pert[1], plain[1])  # the target: bit for bit
    assert not torch.equal(pert[0], plain[0])
    zero = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, input_perturbation=0.0, backend=backend)
    assert torch.equal(zero[0], plain[0]) and torch.equal(zero[1], plain[1])
    # (x_t(gamma) - x_t(0)) / (b gamma) = A(t) eps' with eps' = draws D .. 2D - 1 of the stream
    eps2 = torch.stack([R.white_noise(shape, SEED, OFFSET, draw=spec.draws + d) for d in range(spec.draws)])
    n2 = R.apply_operator(eps2 if spec.draws > 1 else eps2[0], spec, t, schedule).double()
    b = (1 - schedule.alphas_cumprod[t]).double().sqrt().view(-1, 1, 1, 1, 1)
    got = (pert[0].double() - plain[0].double()) / (b * 0.2)
    torch.testing.assert_close(got, n2, rtol=0, atol=2e-4)  # float32 x_t differences over b gamma


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
def test_callers_noise_with_perturbation(backend, schedule):
    """noise= gives n; the perturbation still comes from the stream (seed / generator used)."""
    spec = make_spec("sdm+pl_pos", 3)
    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([300, 900])
    got = ad.add_noise(x0, t, spec, schedule, noise=eps, seed=SEED, input_perturbation=0.4, backend=backend)
    want = R.add_noise(x0, t, spec, schedule, noise=eps, seed=SEED, input_perturbation=0.4)
    close(got[0], want[0])
    close(got[1], R.apply_operator(eps, spec, t, schedule))
    other = ad.add_noise(x0, t, spec, schedule, noise=eps, seed=SEED + 1, input_perturbation=0.4, backend=backend)
    assert torch.equal(other[1], got[1]) and not torch.equal(other[0], got[0])
    gen = ad.add_noise(x0, t, spec, schedule, noise=eps, generator=torch.Generator().manual_seed(5),
                       input_perturbation=0.4, backend=backend)
    assert torch.equal(gen[1], got[1])


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
def test_gradient_to_x0_is_unchanged(backend, schedule):
    spec = make_spec("sdm", 3)
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.tensor([100, 800])
    x_t, tgt = ad.add_noise(x0, t, spec, schedule, seed=1, target="v", input_perturbation=0.3, backend=backend)
    (x_t.sum() + tgt.sum()).backward()
    a = schedule.alphas_cumprod[t].double().sqrt().view(-1, 1, 1, 1)
    b = (1 - schedule.alphas_cumprod[t]).double().sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x0.grad.double(), (a - b).expand(2, 3, 4, 4), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# backend choice and errors
# ---------------------------------------------------------------------------------------------
def test_auto_and_named_backends():
    """Every kernel backend has it; on a GPU "auto" takes the CUDA kernels, and without them Triton
    for elementwise specs only (its perturbed spectral kernel's registers are not measured yet)."""
    avail = ["cuda", "triton", "reference"]
    assert all("perturb" in _autoselect.BACKEND_FEATURES[b] for b in ("cpu", "triton", "cuda"))
    assert _autoselect.choose("cuda", "elementwise", avail, (3, 8, 8), ("perturb",)) == "cuda"
    assert _autoselect.choose("cuda", "spectral", avail, (3, 8, 8), ("perturb",)) == "cuda"
    assert _autoselect.choose("cuda", "elementwise", avail[1:], (3, 8, 8), ("perturb",)) == "triton"
    assert _autoselect.choose("cuda", "spectral", avail[1:], (3, 8, 8), ("perturb",)) == "reference"
    assert _autoselect.choose("cuda", "spectral", avail, (3, 8, 8)) == "cuda"


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_gamma_is_refused(bad, schedule):
    with pytest.raises(ValueError, match="input_perturbation: expected a finite number >= 0"):
        ad.add_noise(torch.zeros(1, 3, 4, 4), 5, ad.NoiseSpec(), schedule, input_perturbation=bad)


def test_triton_channel_loop_refuses_perturbation_clearly(schedule):
    """Samples too large to keep on chip (the Triton channel loop) do not take it yet."""
    if "triton" not in ad.available_backends("cpu"):
        pytest.skip("triton backend unavailable")
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.3))
    with pytest.raises(ValueError, match="input_perturbation: the Triton channel-loop kernel"):
        ad.add_noise(torch.zeros(1, 8, 40, 36), 5, spec, schedule, input_perturbation=0.1, backend="triton")
