"""Baselines: the forward-noise code users write today, without anisodiff.

The benchmark (``anisodiff bench``, :mod:`anisodiff.bench`) times the fused ops against these;
``benchmarks/baselines.py`` re-exports them for the scripts and tests in the source tree.

Every baseline has the same signature::

    fn(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
       variant="sdm", noise=None, generator=None) -> (x_t, target_noise)

* ``x0``: clean data ``[B, C, H, W]``; ``timesteps``: int64 ``[B]``.
* ``alphas_cumprod``, ``betas``: the schedule tensors ``[T]`` (what a diffusers ``DDPMScheduler``
  holds; float32).
* ``axes``: ``[C, k]`` orthonormal colour axes (SDM/HDM) or None; ``strength``: ``s`` (a float, or
  ``k`` floats). The squeeze strength at step t is ``r = s * beta_t / beta_max`` (the official
  SDM profile, ``Squeeze(schedule="beta")`` in anisodiff).
* ``weights``: the RAW spectral weight table ``[H, W]`` on the unshifted ``fftfreq`` grid (e.g.
  :func:`power_law_table`, :func:`band_table`), before any normalisation, or None.
* ``variant``: ``"sdm"`` or ``"heisenberg"`` (HDM).
* ``noise``: optional WHITE noise of x0's shape (default: drawn with ``torch.randn``, from
  ``generator`` if given). Passing the same white noise to a baseline and to
  ``anisodiff.add_noise(..., noise=eps)`` gives the same result up to float rounding; without it the
  two draw from different generators and only their distributions agree.

The returned target is the shaped noise ``n`` (epsilon prediction, what both papers train on) and
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n``.

The DDPM-step baselines (``anisodiff bench --ops ddpm_step``) share a second signature::

    fn(model_output, timestep, sample, alphas_cumprod, betas, axes=None, strength=0.0, weights=None,
       *, variant="sdm", prev_timestep=None, noise=None, generator=None, clip_sample=True,
       clip_range=1.0) -> (x_prev, x0_hat)

one ancestral step ``x_t -> x_prev`` for a model predicting the shaped noise, in the official SDM
sampler's math (anisodiff's ``mode="official"``): x0_hat clipped in ``S(t)^-1`` coordinates, the
isotropic DDPM posterior coefficients, fresh step noise ``sigma_t A(t) z``. :func:`eager_ddpm_step`
(vectorised eager) and :func:`isotropic_ddpm_step` (the white floor); the official sampler pattern
is :func:`official_sdm_ddpm_step` (a diffusers scheduler in place of the schedule tensors).

The trainers' noise flags (``anisodiff bench``'s trainer kinds, add_noise only) have baselines
with the first signature too, written as kohya sd-scripts and diffusers' training scripts write
them: :func:`kohya_offset` (``--noise_offset``), :func:`kohya_offset_random`
(``--noise_offset_random_strength``), :func:`kohya_pyramid` (``--multires_noise_iterations``),
:func:`ddpm_input_perturbation` (``--input_perturbation``); :func:`flow_matching` (the SD3 / Flux
scripts' rectified-flow step) takes the float sigmas instead of the schedule.

Nothing here is tuned against anisodiff: each function is written the way its source writes it, so
the benchmarks compare anisodiff against real user code. :func:`make_case` builds the benchmark and
test inputs (and the matching anisodiff ``NoiseSpec``) for the four spec kinds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "official_sdm", "official_sdm_squeeze_matrices", "official_sdm_apply", "official_sdm_prior",
    "official_sdm_ddpm_step", "sagd_appendix", "eager_vectorised", "eager_shaped_noise", "isotropic_floor",
    "eager_ddpm_step", "isotropic_ddpm_step", "step_inputs", "make_compiled_eager", "STEP_BASELINES",
    "power_law_table", "band_table", "radius_table", "SPEC_KINDS", "Case", "make_case",
    "BASELINES", "supports", "LUMINANCE_AXIS", "kohya_pyramid_noise_like", "kohya_offset",
    "kohya_offset_random", "kohya_pyramid", "ddpm_input_perturbation", "flow_matching",
    "TRAINER_BASELINES", "NOISE_OFFSET", "PYRAMID_ITERATIONS", "PYRAMID_DISCOUNT", "INPUT_PERTURBATION",
]

# The classic ImageNet RGB PCA top eigenvector (fb.resnet.torch lighting augmentation), normalised.
# Natural-image colour PCA puts v close to the luminance axis (docs/papers.md section 1.3).
LUMINANCE_AXIS = (-0.5675, -0.5808, -0.5836)


# ---------------------------------------------------------------------------------------------
# spectral weight tables (docs/papers.md section 2.7: unshifted fftfreq grid, r in cycles/pixel)
# ---------------------------------------------------------------------------------------------
def radius_table(H: int, W: int) -> torch.Tensor:
    """``r = sqrt(fx^2 + fy^2)`` in cycles/pixel on the unshifted ``fftfreq`` grid (float64)."""
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    return torch.sqrt(fx**2 + fy**2)


def power_law_table(H: int, W: int, alpha: float, eps: float = 1e-10) -> torch.Tensor:
    """SAGD power law ``w = (r + eps) ** alpha`` (float32 ``[H, W]``; computed in float64)."""
    return ((radius_table(H, W) + eps) ** alpha).to(torch.float32)


def band_table(H: int, W: int, a: float, b: float) -> torch.Tensor:
    """SAGD band mask ``w = 1{a <= r <= b}`` (inclusive edges; float32 ``[H, W]``)."""
    r = radius_table(H, W)
    return ((r >= a) & (r <= b)).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def _white(x0: torch.Tensor, noise, generator) -> torch.Tensor:
    if noise is not None:
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected shape {list(x0.shape)}, got {list(noise.shape)}")
        return noise
    if generator is None:
        return torch.randn_like(x0)
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)


def _diffusers_add_noise(alphas_cumprod: torch.Tensor, original_samples: torch.Tensor,
                         noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``DDPMScheduler.add_noise`` as diffusers writes it: move/cast the table, gather
    ``sqrt(abar)`` and ``sqrt(1 - abar)``, unsqueeze to 4-D, then ``a * x0 + b * noise``."""
    alphas_cumprod = alphas_cumprod.to(device=original_samples.device)
    alphas_cumprod = alphas_cumprod.to(dtype=original_samples.dtype)
    timesteps = timesteps.to(original_samples.device)
    sqrt_alpha_prod = alphas_cumprod[timesteps] ** 0.5
    sqrt_alpha_prod = sqrt_alpha_prod.flatten()
    while len(sqrt_alpha_prod.shape) < len(original_samples.shape):
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
    sqrt_one_minus_alpha_prod = (1 - alphas_cumprod[timesteps]) ** 0.5
    sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.flatten()
    while len(sqrt_one_minus_alpha_prod.shape) < len(original_samples.shape):
        sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def _strengths(strength, k: int, dtype, device) -> torch.Tensor:
    s = torch.as_tensor(strength, dtype=dtype, device=device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(k)
    if s.numel() != k:
        raise ValueError(f"strength: expected 1 or k={k} values, got {s.numel()}")
    return s


def _check_variant(variant: str) -> str:
    if variant not in ("sdm", "heisenberg"):
        raise ValueError(f"variant: must be 'sdm' or 'heisenberg', got {variant!r}")
    return variant


# ---------------------------------------------------------------------------------------------
# (a) the official SDM code pattern
# ---------------------------------------------------------------------------------------------
def _check_official_axes(axes) -> None:
    if axes is None:
        raise ValueError("axes: the official SDM code needs the principal axis")
    if axes.dim() != 2 or axes.shape[1] != 1:
        raise ValueError(f"axes: the official SDM code uses ONE principal axis ([C, 1]), got "
                         f"{list(axes.shape)}")


def official_sdm_squeeze_matrices(x, t, betas, axes, strength, variant="sdm") -> torch.Tensor:
    """``NoiseSqueezer.get_squeeze_matrix(x, t, scheduler)`` of the official SDM code (docs/papers.md
    section 1.4), with the same structure and cost: ``r = s * betas[t] / betas.max()`` viewed as
    ``[-1, 1, 1]``, then a Python loop over the batch (``B = x.shape[0]``) that calls ``.item()`` per
    sample (a 0-d ``t``, as in the sampler, reuses its single value for every sample, still one
    ``.item()`` each) and builds ``S_i = exp(-r_i) P + Q`` (SDM) or ``exp(-r_i) P + exp(r_i / (C -
    1)) Q`` (HDM, the code's "quantum_limited" branch with ``q = 1 / (n - 1)``), each exponential via
    ``torch.exp(torch.tensor(...))``; ``torch.stack`` to ``[B, C, C]`` (float32)."""
    _check_variant(variant)
    _check_official_axes(axes)
    B, C = x.shape[0], x.shape[1]
    device = x.device
    s = float(torch.as_tensor(strength).reshape(-1)[0])
    identity = torch.eye(C, device=device)
    principal_direction = axes[:, 0].to(device=device, dtype=torch.float32)
    projection = torch.outer(principal_direction, principal_direction)
    orthogonal_projection = identity - projection
    b = betas.to(device)
    beta_max = b.max()
    beta_t = b[t]
    time_scale = (beta_t / beta_max).view(-1, 1, 1)
    squeeze_param = s * time_scale
    n = squeeze_param.shape[0]
    matrices = []
    if variant == "heisenberg":
        q = 1.0 / (C - 1)
        for i in range(B):
            param = squeeze_param[i].item() if i < n else squeeze_param[-1].item()
            squeeze_factor = torch.exp(torch.tensor(-param, device=device))
            antisqueeze_factor = torch.exp(torch.tensor(q * param, device=device))
            matrices.append(squeeze_factor * projection + antisqueeze_factor * orthogonal_projection)
    else:
        for i in range(B):
            param = squeeze_param[i].item() if i < n else squeeze_param[-1].item()
            squeeze_factor = torch.exp(torch.tensor(-param, device=device))
            matrices.append(squeeze_factor * projection + orthogonal_projection)
    return torch.stack(matrices)


def official_sdm_apply(noise: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``NoiseSqueezer.apply_squeeze``: ``torch.bmm(S, noise.reshape(B, C, H * W))`` (S cast to the
    noise's dtype, which the official float32-only code does not need)."""
    B, C, H, W = noise.shape
    return torch.bmm(S.to(noise.dtype), noise.reshape(B, C, -1)).reshape(B, C, H, W)


def official_sdm(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
                 variant="sdm", noise=None, generator=None):
    """The official Squeezed Diffusion Models code pattern (arXiv 2508.14871; docs/papers.md
    section 1.4: ``NoiseSqueezer.get_squeeze_matrix`` / ``apply_squeeze`` and
    ``ConsistentCustomDDPMScheduler.add_noise``), re-written here with the same structure and cost:

    * the per-sample ``.item()`` loop building ``S`` (:func:`official_sdm_squeeze_matrices`);
    * ``torch.bmm(S, noise.reshape(B, C, H * W))`` (:func:`official_sdm_apply`);
    * the stock diffusers ``add_noise`` (gather ``sqrt(abar)``, 4 elementwise ops).

    Only one principal axis (``k = 1``) and no spectral part, as in the official code. White noise
    comes from ``torch.randn`` on the CPU, copied to the device (the official training loop:
    ``torch.randn(shape).to(device)``).
    """
    _check_variant(variant)
    if weights is not None:
        raise ValueError("weights: the official SDM code has no spectral part")
    _check_official_axes(axes)
    device = x0.device
    if noise is None:
        if generator is None:
            noise = torch.randn(x0.shape).to(device)
        else:
            noise = torch.randn(x0.shape, generator=generator).to(device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {list(x0.shape)}, got {list(noise.shape)}")
    s = float(torch.as_tensor(strength).reshape(-1)[0])
    if s != 0:  # the official code skips all squeeze logic when the strength is 0
        S = official_sdm_squeeze_matrices(x0, timesteps, betas, axes, s, variant)
        noise = official_sdm_apply(noise, S)
    x_t = _diffusers_add_noise(alphas_cumprod, x0, noise, timesteps)
    return x_t, noise


def official_sdm_prior(shape, betas, axes, strength, *, variant="sdm", device=None,
                       generator=None) -> torch.Tensor:
    """The official sampler's initial state (``evaluate_and_save_samples``): ``torch.randn(shape,
    device=device)``, then ``S(T - 1)`` applied through the per-sample loop with ``t =
    torch.full((B,), T - 1)``; plain white noise when the strength is 0."""
    noise = torch.randn(tuple(shape), device=device, generator=generator)
    if float(torch.as_tensor(strength).reshape(-1)[0]) == 0:
        return noise
    t = torch.full((noise.shape[0],), betas.shape[0] - 1, device=noise.device)
    return official_sdm_apply(noise, official_sdm_squeeze_matrices(noise, t, betas, axes, strength,
                                                                   variant))


def official_sdm_ddpm_step(scheduler, model_output, timestep, sample, axes, strength, *,
                           variant="sdm", generator=None):
    """``ConsistentCustomDDPMScheduler.step`` of the official SDM code (docs/papers.md section 1.4):
    ``S = get_squeeze_matrix(eps_sq, t)`` (the per-sample ``.item()`` loop, ``B`` syncs per step),
    ``S_inv = torch.linalg.inv(S)``, map the sample and the model output to unsqueezed coordinates
    (two ``bmm``), the stock ``DDPMScheduler.step`` (white noise from ``randn_tensor(generator=...)``,
    x0 clipped there), then map ``prev_sample`` and ``pred_original_sample`` back with ``S`` (two
    more ``bmm``). ``scheduler`` is a plain diffusers ``DDPMScheduler`` (its ``step`` is the parent
    class's ``super().step``). Returns ``(prev_sample, pred_original_sample)``; strength 0 is the
    parent's step unchanged."""
    if float(torch.as_tensor(strength).reshape(-1)[0]) == 0:
        out = scheduler.step(model_output, timestep, sample, generator=generator, return_dict=True)
        return out.prev_sample, out.pred_original_sample
    S = official_sdm_squeeze_matrices(model_output, timestep, scheduler.betas, axes, strength, variant)
    S_inv = torch.linalg.inv(S)
    x_t = official_sdm_apply(sample, S_inv)
    eps_pred = official_sdm_apply(model_output, S_inv)
    out = scheduler.step(eps_pred, timestep, x_t, generator=generator, return_dict=True)
    return official_sdm_apply(out.prev_sample, S), official_sdm_apply(out.pred_original_sample, S)


# ---------------------------------------------------------------------------------------------
# (b) the SAGD appendix recipe
# ---------------------------------------------------------------------------------------------
def sagd_appendix(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
                  variant="sdm", noise=None, generator=None):
    """The spectrally anisotropic Gaussian diffusion appendix recipe (SAGD, arXiv 2510.09660,
    App. E pseudo-code ``powerlaw_noise`` / ``bandpass_noise``; docs/papers.md section 2.7):
    ``torch.randn`` -> ``torch.fft.fftn`` over (-2, -1) -> ``* w`` -> ``ifftn`` -> ``.real`` ->
    divide each (b, c) plane by its spatial std (ddof=0) + 1e-8; then the stock diffusers
    ``add_noise``. Per-sample normalisation: compare with anisodiff's
    ``NoiseSpec(normalize="per_sample")``.

    Spatial part only (the paper has no colour squeeze): ``axes``/``strength`` must be absent or
    zero, ``weights`` is required.
    """
    if weights is None:
        raise ValueError("weights: the SAGD recipe needs a spectral weight table")
    if axes is not None and any(float(v) != 0 for v in torch.as_tensor(strength).reshape(-1)):
        raise ValueError("axes/strength: the SAGD appendix recipe has no colour squeeze")
    e = _white(x0, noise, generator)
    E = torch.fft.fftn(e, dim=(-2, -1))
    x = torch.fft.ifftn(E * weights.to(e.device), dim=(-2, -1)).real
    x = x / (x.std(dim=(-2, -1), keepdim=True, correction=0) + 1e-8)
    x_t = _diffusers_add_noise(alphas_cumprod, x0, x, timesteps)
    return x_t, x


# ---------------------------------------------------------------------------------------------
# (c) the vectorised eager PyTorch a careful user writes
# ---------------------------------------------------------------------------------------------
def eager_vectorised(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
                     variant="sdm", noise=None, generator=None, rfft=False):
    """Vectorised eager PyTorch, the way a careful user writes the combined operator
    ``n = (S(t) (x) T_w) eps`` (docs/design.md section 1; the foundation issue's baseline
    "randn + fft2/ifft2 + einsum + mix"):

    * ``eps = torch.randn_like(x0)``;
    * spatial part (if ``weights``): calibrated weights ``w / sqrt(mean(w^2))`` and
      ``ifft2(fft2(eps) * w).real`` (``rfft=True``: ``irfft2(rfft2(eps) * w[:, :W//2+1])``, the
      cheaper equivalent for a symmetric w, docs/papers.md section 2.7);
    * channel part (if ``axes``): ``r[b, k] = s_k * (betas / betas.max())[t_b]`` gathered in one op
      (no ``.item()``), ``S = I + V diag(exp(-r) - 1) V^T`` (SDM) or
      ``g (I - V V^T) + V diag(exp(-r)) V^T`` with ``g = exp(sum_k r_k / (C - k))`` (HDM), built
      with one ``einsum``, and applied with ``einsum("bij,bjhw->bihw")``;
    * mix: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) n`` with per-sample gathered coefficients.
    """
    _check_variant(variant)
    B, C, H, W = x0.shape
    n = _white(x0, noise, generator)
    n = _eager_operator(n, timesteps, betas, axes, strength, weights, variant, rfft, x0.dtype, x0.device)
    ac = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps]
    a = ac.sqrt().view(B, 1, 1, 1)
    sig = (1.0 - ac).sqrt().view(B, 1, 1, 1)
    x_t = a * x0 + sig * n
    return x_t, n


def _eager_operator(n, timesteps, betas, axes, strength, weights, variant, rfft, dtype, device):
    """The shaping steps of :func:`eager_vectorised` (spatial filter, then the squeeze) on white
    ``n``; ``dtype``/``device`` are x0's (the weights and the squeeze are built in them)."""
    B, C, H, W = n.shape
    if weights is not None:
        w = weights.to(device=device, dtype=dtype)
        w = w * torch.rsqrt(w.square().mean())
        if rfft:
            n = torch.fft.irfft2(torch.fft.rfft2(n) * w[:, : W // 2 + 1], s=(H, W))
        else:
            n = torch.fft.ifft2(torch.fft.fft2(n) * w).real
    if axes is not None:
        n = torch.einsum("bij,bjhw->bihw", _eager_squeeze(timesteps, betas, axes, strength, variant, C,
                                                          dtype, device), n)
    return n


def _eager_squeeze(timesteps, betas, axes, strength, variant, C, dtype, device, inverse=False):
    """``S(t)`` per sample ``[B, C, C]`` of :func:`eager_vectorised` (``inverse``: ``S(t)^-1``,
    the same formula with ``-r``: ``exp(+r)`` along the axes, ``1 / g`` across them)."""
    V = axes.to(device=device, dtype=dtype)
    k = V.shape[1]
    s = _strengths(strength, k, dtype, device)
    b = betas.to(device=device, dtype=dtype)
    r = (b / b.max())[timesteps][:, None] * s[None, :]                          # [B, k]
    if inverse:
        r = -r
    eye = torch.eye(C, dtype=dtype, device=device)
    if variant == "sdm":
        return eye + torch.einsum("ck,bk,dk->bcd", V, torch.exp(-r) - 1.0, V)
    g = torch.exp(r.sum(dim=1) / (C - k))
    return g[:, None, None] * (eye - V @ V.T) + torch.einsum("ck,bk,dk->bcd", V, torch.exp(-r), V)


def eager_shaped_noise(shape, timesteps, betas, axes=None, strength=0.0, weights=None, *,
                       variant="sdm", dtype=torch.float32, device=None, generator=None, rfft=False):
    """Shaped noise ``n = (S(t) (x) T_w) eps`` of ``shape = [B, C, H, W]`` the way
    :func:`eager_vectorised` computes it (``torch.randn``, then the same spatial filter and squeeze),
    without the mix: the eager counterpart of ``anisodiff.shaped_noise``."""
    _check_variant(variant)
    eps = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    device = eps.device
    return _eager_operator(eps, timesteps, betas, axes, strength, weights, variant, rfft, dtype, device)


def _step_timesteps(timestep, prev_timestep, B: int, device):
    """``t`` and ``prev`` as int64 ``[B]`` on ``device`` (an int or a 0-d tensor, as a sampler
    passes it, is broadcast; ``prev`` defaults to ``t - 1``)."""
    t = torch.as_tensor(timestep, device=device).reshape(-1).long().expand(B)
    if prev_timestep is None:
        return t, t - 1
    return t, torch.as_tensor(prev_timestep, device=device).reshape(-1).long().expand(B)


def eager_ddpm_step(model_output, timestep, sample, alphas_cumprod, betas, axes=None, strength=0.0,
                    weights=None, *, variant="sdm", prev_timestep=None, noise=None, generator=None,
                    clip_sample=True, clip_range=1.0, rfft=False):
    """One ancestral DDPM step the way a careful user vectorises the official SDM sampler's math
    (docs/papers.md section 1.4; anisodiff's ``mode="official"``) for the operator ``A(t) = S(t) (x) T_w``,
    no per-sample Python:

    * per-sample coefficients gathered from the float32 schedule (``abar_t``, ``abar_prev``; 1 for
      ``prev < 0``): ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``;
    * clipping in ``S(t)^-1`` coordinates: ``S einsum clamp(S^-1 einsum x0_hat)`` (``S`` and its
      closed-form inverse built as in :func:`eager_vectorised`), plain clamp without a squeeze;
    * the DDPM posterior mean ``c0 x0_hat + ct x_t`` (isotropic coefficients, as diffusers);
    * fresh noise ``sigma_t A(t) z``: ``randn_like`` + the same fft2/ifft2 filter and einsum squeeze
      as :func:`eager_vectorised` (``sigma_t^2`` diffusers' "fixed_small" variance, 0 at the last
      step).

    Returns ``(x_prev, x0_hat)`` in ``sample``'s dtype."""
    _check_variant(variant)
    B, C, H, W = sample.shape
    dtype, device = sample.dtype, sample.device
    t, prev = _step_timesteps(timestep, prev_timestep, B, device)
    ac = alphas_cumprod.to(device)                                               # float32 table
    ab_t = ac[t]
    ab_p = torch.where(prev >= 0, ac[prev.clamp_min(0)], torch.ones_like(ab_t))
    alpha = ab_t / ab_p

    def col(x):
        return x.to(dtype).view(B, 1, 1, 1)
    x0_hat = (sample - col((1 - ab_t).sqrt()) * model_output) / col(ab_t.sqrt())
    if clip_sample:
        if axes is not None:
            sq = (t, betas, axes, strength, variant, C, dtype, device)
            x0_hat = torch.einsum("bij,bjhw->bihw", _eager_squeeze(*sq), torch.einsum(
                "bij,bjhw->bihw", _eager_squeeze(*sq, inverse=True), x0_hat).clamp(-clip_range, clip_range))
        else:
            x0_hat = x0_hat.clamp(-clip_range, clip_range)
    c0 = ab_p.sqrt() * (1 - alpha) / (1 - ab_t)
    ct = alpha.sqrt() * (1 - ab_p) / (1 - ab_t)
    sigma = ((1 - ab_p) / (1 - ab_t) * (1 - alpha)).clamp_min(1e-20).sqrt() * (prev >= 0)
    x_prev = col(c0) * x0_hat + col(ct) * sample
    z = _white(sample, noise, generator)
    n = _eager_operator(z, t, betas, axes, strength, weights, variant, rfft, dtype, device)
    return x_prev + col(sigma) * n, x0_hat


def isotropic_ddpm_step(model_output, timestep, sample, alphas_cumprod, betas, axes=None, strength=0.0,
                        weights=None, *, variant="sdm", prev_timestep=None, noise=None, generator=None,
                        clip_sample=True, clip_range=1.0):
    """The white floor of a DDPM step: the stock diffusers ``DDPMScheduler.step`` as diffusers
    writes it (epsilon prediction, ``variance_type="fixed_small"``): one timestep for the batch,
    0-d float32 schedule values, ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` clamped,
    ``c0 x0 + ct x_t``, plus ``sqrt(var) * torch.randn_like`` for ``t > 0``. Ignores ``axes``,
    ``strength`` and ``weights``: what a sampler step costs WITHOUT any anisotropy."""
    t = int(timestep)
    prev_t = t - 1 if prev_timestep is None else int(prev_timestep)
    ac = alphas_cumprod.to(sample.device)
    alpha_prod_t = ac[t]
    alpha_prod_t_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0, device=sample.device)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if clip_sample:
        pred_original_sample = pred_original_sample.clamp(-clip_range, clip_range)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    if t > 0:
        variance_noise = _white(sample, noise, generator)
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        pred_prev_sample = pred_prev_sample + variance ** 0.5 * variance_noise
    return pred_prev_sample, pred_original_sample


# ---------------------------------------------------------------------------------------------
# (d) torch.compile of (c)
# ---------------------------------------------------------------------------------------------
def make_compiled_eager(device="cpu", op="add_noise", **compile_kwargs) -> tuple[Callable | None, str]:
    """``torch.compile(eager_vectorised)`` (``op="ddpm_step"``: of :func:`eager_ddpm_step`) if
    torch.compile works on this build and ``device``,
    else ``(None, reason)``. The check compiles and runs a tiny case on ``device`` (which also
    catches a missing C++ compiler for inductor on the CPU, or a missing Triton on CUDA). The
    compiled function recompiles per input shape and per spec structure (axes / weights present or
    not), so warm it up on each case before timing.

    Randomness: inside the compiled graph ``randn_like`` is inductor's own generator (not
    torch's); the distribution is the same.

    Benchmarks run one function over many shapes and spec structures; dynamo's default
    ``recompile_limit`` (8) would silently fall back to EAGER after that, so it is raised to 64
    here (a training run with one spec compiles once or twice).
    """
    if not hasattr(torch, "compile"):
        return None, "torch.compile not available"
    try:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < 64:
                setattr(dynamo_config, name, 64)
    except ImportError:  # pragma: no cover - very old torch
        pass
    if op not in ("add_noise", "ddpm_step"):
        raise ValueError(f"op: 'add_noise' or 'ddpm_step', got {op!r}")
    try:
        fn = torch.compile(eager_vectorised if op == "add_noise" else eager_ddpm_step, **compile_kwargs)
        x0 = torch.zeros(2, 3, 4, 4, device=device)
        t = torch.tensor([0, 1], device=device)
        betas = torch.linspace(1e-4, 0.02, 4, device=device)
        ac = torch.cumprod(1 - betas, 0)
        out = fn(x0, t, ac, betas) if op == "add_noise" else fn(x0, 2, x0, ac, betas)
        if not torch.isfinite(out[0]).all():
            return None, "torch.compile produced non-finite output"
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return None, f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return fn, "ok"


# ---------------------------------------------------------------------------------------------
# (e) the isotropic floor
# ---------------------------------------------------------------------------------------------
def isotropic_floor(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
                    variant="sdm", noise=None, generator=None):
    """The white-noise floor: plain ``torch.randn_like`` + the stock diffusers
    ``DDPMScheduler.add_noise`` (standard DDPM training, Ho et al. 2020 / diffusers). Ignores
    ``axes``, ``strength`` and ``weights``: it is what the same training step costs WITHOUT any
    anisotropy, the lower bound every anisotropic implementation is compared against."""
    eps = _white(x0, noise, generator)
    return _diffusers_add_noise(alphas_cumprod, x0, eps, timesteps), eps


# ---------------------------------------------------------------------------------------------
# (f) the trainers' noise flags, as the training scripts write them today (eager, 4-D)
# ---------------------------------------------------------------------------------------------
# The values the benchmark's trainer cases use: kohya's pyramid_noise_like defaults, a typical
# --noise_offset and --input_perturbation.
NOISE_OFFSET = 0.1
PYRAMID_ITERATIONS, PYRAMID_DISCOUNT = 6, 0.4
INPUT_PERTURBATION = 0.1


def kohya_pyramid_noise_like(noise, device, iterations=PYRAMID_ITERATIONS, discount=PYRAMID_DISCOUNT):
    """kohya sd-scripts' multi-resolution noise recipe (``--multires_noise_iterations`` /
    ``--multires_noise_discount``), re-written here with its structure and cost: one
    ``nn.Upsample(mode="bilinear")`` to the plane, per level a scale factor ``r = 2 + 2 u`` from
    Python's ``random``, a white ``torch.randn(b, c, h / r^i, w / r^i)`` drawn on the CPU and moved,
    bilinearly upsampled and added in place with weight ``discount^i``, an early stop at a 1-pixel
    side, then the division by the global std. (anisodiff's exact version, with a generator:
    ``anisodiff.reference.pyramid_noise_like``.)"""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear").to(device)
    for i in range(iterations):
        r = random.random() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        noise += up(torch.randn(b, c, hn, wn).to(device)) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def kohya_offset(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
                 variant="sdm", noise=None, generator=None, noise_offset=NOISE_OFFSET,
                 random_strength=False):
    """Offset noise as kohya sd-scripts (``apply_noise_offset``) and diffusers' training examples
    (``--noise_offset``) write it: ``noise + noise_offset * torch.randn(B, C, 1, 1)``;
    ``random_strength``: kohya's ``--noise_offset_random_strength``, the strength times one
    ``torch.rand(1)`` per step. Then the stock diffusers ``add_noise``; the target is the noise.
    (The offset is drawn in x0's dtype so the noise keeps it.)"""
    eps = _white(x0, noise, generator)
    offset = noise_offset
    if random_strength:
        offset = torch.rand(1, device=x0.device) * noise_offset
    B, C = x0.shape[:2]
    eps = eps + offset * torch.randn((B, C, 1, 1), device=x0.device, dtype=x0.dtype)
    return _diffusers_add_noise(alphas_cumprod, x0, eps, timesteps), eps


def kohya_offset_random(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None,
                        **kw):
    """:func:`kohya_offset` with ``--noise_offset_random_strength``."""
    return kohya_offset(x0, timesteps, alphas_cumprod, betas, axes, strength, weights,
                        random_strength=True, **kw)


def kohya_pyramid(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0, weights=None, *,
                  variant="sdm", noise=None, generator=None, iterations=PYRAMID_ITERATIONS,
                  discount=PYRAMID_DISCOUNT):
    """kohya's training step with multi-resolution noise: ``torch.randn_like``, then
    :func:`kohya_pyramid_noise_like` on it, then the stock diffusers ``add_noise``."""
    eps = _white(x0, noise, generator)
    if noise is not None:
        eps = eps.clone()  # the recipe adds in place; a caller's noise stays as it was
    eps = kohya_pyramid_noise_like(eps, x0.device, iterations, discount)
    return _diffusers_add_noise(alphas_cumprod, x0, eps, timesteps), eps


def ddpm_input_perturbation(x0, timesteps, alphas_cumprod, betas, axes=None, strength=0.0,
                            weights=None, *, variant="sdm", noise=None, generator=None,
                            gamma=INPUT_PERTURBATION):
    """Input perturbation (DDPM-IP) as diffusers' ``train_text_to_image.py`` writes it
    (``--input_perturbation``): ``new_noise = noise + gamma * torch.randn_like(noise)`` goes into
    ``add_noise``, the target stays ``noise``."""
    eps = _white(x0, noise, generator)
    new_noise = eps + gamma * torch.randn_like(eps)
    return _diffusers_add_noise(alphas_cumprod, x0, new_noise, timesteps), eps


def flow_matching(x0, sigmas, *, noise=None, generator=None):
    """The rectified-flow step of diffusers' SD3 / Flux training scripts: ``torch.randn_like``,
    the per-sample sigmas viewed to ``[B, 1, 1, 1]`` in x0's dtype, ``x = (1 - sigma) x0 + sigma
    noise``, target ``noise - x0``. (Their sigma lookup from the scheduler's timesteps is left out
    here and on the fused side alike: both take the float sigmas.)"""
    eps = _white(x0, noise, generator)
    sigma = sigmas.to(device=x0.device, dtype=x0.dtype).flatten()
    while sigma.dim() < x0.dim():
        sigma = sigma.unsqueeze(-1)
    return (1.0 - sigma) * x0 + sigma * eps, eps - x0


# the trainer flags' baselines with the schedule-tensor signature (flow_matching takes sigmas)
TRAINER_BASELINES = {
    "kohya_offset": kohya_offset,
    "kohya_offset_random": kohya_offset_random,
    "kohya_pyramid": kohya_pyramid,
    "ddpm_input_perturbation": ddpm_input_perturbation,
}


BASELINES = {
    "official_sdm": official_sdm,
    "sagd_appendix": sagd_appendix,
    "eager_vectorised": eager_vectorised,
    "isotropic_floor": isotropic_floor,
}
# the DDPM-step baselines with the schedule-tensor signature (the official sampler pattern,
# official_sdm_ddpm_step, takes a diffusers scheduler instead)
STEP_BASELINES = {
    "eager_vectorised": eager_ddpm_step,
    "isotropic_floor": isotropic_ddpm_step,
}


# ---------------------------------------------------------------------------------------------
# benchmark / test cases
# ---------------------------------------------------------------------------------------------
SPEC_KINDS = ("sdm", "sdm_powerlaw", "hdm", "band")
_KIND_TITLES = {
    "sdm": "SDM squeeze-only s=-0.4",
    "sdm_powerlaw": "SDM s=-0.4 + power-law alpha=-0.04",
    "hdm": "HDM (Heisenberg) s=-0.4",
    "band": "band [0, 0.25] cycles/px",
}


@dataclass
class Case:
    """One benchmark / test problem: the inputs every baseline takes, and the matching anisodiff
    spec and schedule (``anisodiff.add_noise(x0, timesteps, spec, schedule)``)."""

    kind: str
    title: str
    x0: torch.Tensor
    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    betas: torch.Tensor
    axes: torch.Tensor | None
    strength: float
    weights: torch.Tensor | None
    variant: str
    spec: object          # anisodiff.NoiseSpec
    schedule: object      # anisodiff.VPSchedule
    # a DDPM step's inputs (step_inputs; anisodiff.bench.cases.make_case(..., step=True)), else None
    model_output: torch.Tensor | None = None
    sample: torch.Tensor | None = None

    def baseline_args(self, impl: str | None = None) -> tuple:
        """Positional inputs for a baseline; ``sagd_appendix`` gets no squeeze (see :func:`supports`)."""
        axes, strength = self.axes, self.strength
        if impl == "sagd_appendix":
            axes, strength = None, 0.0
        return (self.x0, self.timesteps, self.alphas_cumprod, self.betas, axes, strength, self.weights)

    def baseline_kwargs(self) -> dict:
        return {"variant": self.variant}


def step_inputs(x0: torch.Tensor, alphas_cumprod: torch.Tensor, t: int, seed: int = 1):
    """``(model_output, sample)`` for one DDPM step at timestep ``t``: a random ``N(0, 1)``
    model output and ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e`` for an independent white ``e``
    (a realistic sample), in x0's dtype and device (drawn in float32 on the CPU, seeded)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(x0.shape)
    model_output = torch.randn(shape, generator=g)
    e = torch.randn(shape, generator=g)
    ab = alphas_cumprod[t].double()
    sample = (ab.sqrt() * x0.double().cpu() + (1 - ab).sqrt() * e.double()).float()
    return model_output.to(x0.device, x0.dtype), sample.to(x0.device, x0.dtype)


def supports(impl: str, kind: str) -> bool:
    """Which baseline can express which spec kind. ``official_sdm``: squeeze-only specs (the
    official code has no spectral part). ``sagd_appendix``: specs with a spectral part; for
    ``sdm_powerlaw`` it computes ONLY the spatial part (no published code does both), so its
    time there is a lower bound for user code doing the full operator."""
    if impl == "official_sdm":
        return kind in ("sdm", "hdm")
    if impl == "sagd_appendix":
        return kind in ("sdm_powerlaw", "band")
    return True


def make_case(kind: str, B: int = 64, C: int = 3, H: int = 32, W: int = 32, *, seed: int = 0,
              dtype=torch.float32, timesteps: torch.Tensor | None = None, normalize: str = "calibrated",
              strength: float = -0.4, alpha: float = -0.04, band: tuple[float, float] = (0.0, 0.25)) -> Case:
    """The inputs for spec ``kind`` (one of :data:`SPEC_KINDS`): x0 uniform in [-1, 1], timesteps
    uniform in [0, 1000), diffusers' linear beta schedule, the luminance-like principal axis
    (C = 3; otherwise a fixed random unit vector), ``Squeeze(schedule="beta")``."""
    import anisodiff as ad

    if kind not in SPEC_KINDS:
        raise ValueError(f"kind: must be one of {SPEC_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    schedule = ad.VPSchedule.linear(T=1000)
    x0 = (torch.rand(B, C, H, W, generator=g) * 2 - 1).to(dtype)
    if timesteps is None:
        timesteps = torch.randint(0, schedule.num_train_timesteps, (B,), generator=g)
    if C == 3:
        v = torch.tensor(LUMINANCE_AXIS, dtype=torch.float64)
    else:
        v = torch.randn(C, generator=g, dtype=torch.float64)
    axes = (v / v.norm())[:, None]
    squeeze = spectral = None
    weights = None
    variant = "sdm"
    s = 0.0
    if kind in ("sdm", "sdm_powerlaw", "hdm"):
        variant = "heisenberg" if kind == "hdm" else "sdm"
        s = float(strength)
        squeeze = ad.Squeeze(axes, s, variant=variant, schedule="beta")
    else:
        axes = None
    if kind == "sdm_powerlaw":
        spectral = ad.PowerLaw(alpha)
        weights = power_law_table(H, W, alpha)
    elif kind == "band":
        spectral = ad.Band(*band)
        weights = band_table(H, W, *band)
    spec = ad.NoiseSpec(squeeze, spectral, normalize=normalize)
    return Case(kind, _KIND_TITLES[kind], x0, timesteps.to(torch.int64), schedule.alphas_cumprod,
                schedule.betas, None if axes is None else axes.to(torch.float32), s, weights,
                variant, spec, schedule)

