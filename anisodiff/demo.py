"""The training demo behind ``anisodiff demo``: a tiny diffusion model trained with four kinds of
forward noise on the same data, from the same seed, then sampled and scored.

Everything here is plain PyTorch (no diffusers) and deliberately small, so that the whole comparison
runs in a few minutes on a laptop CPU:

* data: :class:`anisodiff.datasets.ProceduralImages` (1/f^2 spectrum, ImageNet colour statistics,
  no download), split into a training set and two disjoint held-out sets of real images;
* model: :class:`TinyUNet`, a two-level UNet with a sinusoidal time embedding, trained to predict
  the (shaped) noise with the MSE loss, as both papers do (its output has a skip term that is exact
  at pure noise, so a few hundred steps give sensible samples);
* noise: one :class:`anisodiff.AnisotropicNoise` per configuration, used for ``add_noise`` in
  training, for the shaped prior and for the DDIM / DDPM steps in sampling;
* metrics: Fréchet distances between generated and held-out real images in two fixed feature spaces
  (4x4 block means of the pixels, and a fixed-seed random conv net), and the error of the radially
  averaged power spectrum. The same metrics between the two held-out real sets give the floor that
  finite sample sizes alone produce.

Fairness: every configuration starts from the same initial weights and sees the same images in the
same order, the same timesteps and the same white noise (only its shaping differs), and is sampled
from the same white prior draw. Everything is deterministic for a given seed, device and thread
count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import datasets
from .sampling import AnisotropicNoise
from .schedule import VPSchedule
from .spec import NoiseSpec, PowerLaw, Squeeze

__all__ = [
    "DemoConfig", "demo_configs", "TinyUNet", "TrainSettings", "RunResult", "train", "sample",
    "sampling_timesteps", "frechet_distance", "gaussian_frechet_distance", "pixel_features",
    "RandomFeatures", "radial_power", "spectrum_error", "SAMPLERS", "SQUEEZE_STRENGTH",
    "POWER_LAW_ALPHA", "PIXEL_GRID", "FEATURE_SEED", "FEATURE_WIDTH", "real_images", "build_model",
    "linear_schedule", "TrainingDiverged",
]

SQUEEZE_STRENGTH = -0.4     # mild antisqueeze, the setting of the official SDM code
POWER_LAW_ALPHA = -0.04     # the SAGD paper's best power law (FID is U-shaped in alpha)
SAMPLERS = ("ddim", "ddpm")
PIXEL_GRID = 4              # pixel features: the means of PIXEL_GRID^2 blocks per channel
FEATURE_SEED = 20251022     # the random-feature net's weights: one fixed function for every run
FEATURE_WIDTH = 64          # random features per image


# ---------------------------------------------------------------------------------------------
# The four noise configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoConfig:
    """One configuration: the key in the table and the report, a row title, and its noise spec."""

    name: str
    title: str
    spec: NoiseSpec


def demo_configs(axes: torch.Tensor) -> list[DemoConfig]:
    """Isotropic, SDM and HDM (``s = -0.4`` along ``axes``, the fitted principal colour axis
    ``[C, 1]``) and the SAGD power law ``alpha = -0.04`` (the papers' DC floor ``eps = 1e-10``)."""
    s = SQUEEZE_STRENGTH
    return [
        DemoConfig("isotropic", "isotropic (standard DDPM)", NoiseSpec()),
        DemoConfig("sdm", f"SDM, s = {s}", NoiseSpec(Squeeze(axes, s, "sdm"))),
        DemoConfig("hdm", f"HDM (Heisenberg), s = {s}", NoiseSpec(Squeeze(axes, s, "heisenberg"))),
        DemoConfig("power_law", f"SAGD power law, alpha = {POWER_LAW_ALPHA}",
                   NoiseSpec(spectral=PowerLaw(POWER_LAW_ALPHA))),
    ]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def real_images(n: int, size: int, seed: int, start: int = 0) -> torch.Tensor:
    """Images ``start .. start + n - 1`` of the procedural dataset as one ``[n, 3, size, size]``
    float32 tensor (disjoint index ranges give disjoint, independent sets)."""
    dataset = datasets.ProceduralImages(start + n, size=size, seed=seed)
    chunk = 1024
    parts = [torch.stack(dataset.__getitems__(range(i, min(i + chunk, start + n))))
             for i in range(start, start + n, chunk)]
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t_emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TinyUNet(nn.Module):
    """A two-level UNet (``width`` channels at full resolution, ``2 width`` at 1/2 and 1/4) with a
    sinusoidal timestep embedding; input and output ``[B, channels, H, W]``, H and W multiples of 4.
    About 120k parameters at ``width = 16``."""

    def __init__(self, schedule: VPSchedule, channels: int = 3, width: int = 16):
        super().__init__()
        # eps_hat = sqrt(1 - abar_t) x_t + sqrt(abar_t) F(x_t, t): exact at pure noise, so the net
        # never has to learn the identity there, and an error in F at large t does not blow up in
        # x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (F is a v-prediction).
        abar = schedule.alphas_cumprod.double()
        coefficients = torch.stack([(1 - abar).sqrt(), abar.sqrt()], dim=1).float()
        self.register_buffer("coefficients", coefficients, persistent=False)
        w, w2, time_dim = width, 2 * width, 4 * width
        self.width = w
        self.time = nn.Sequential(nn.Linear(w, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.inp = nn.Conv2d(channels, w, 3, padding=1)
        self.down1, self.pool1 = _ResBlock(w, w, time_dim), nn.Conv2d(w, w2, 3, stride=2, padding=1)
        self.down2 = _ResBlock(w2, w2, time_dim)
        self.pool2 = nn.Conv2d(w2, w2, 3, stride=2, padding=1)
        self.mid = _ResBlock(w2, w2, time_dim)
        self.up2_conv, self.up2 = nn.Conv2d(w2, w2, 3, padding=1), _ResBlock(2 * w2, w2, time_dim)
        self.up1_conv, self.up1 = nn.Conv2d(w2, w, 3, padding=1), _ResBlock(2 * w, w, time_dim)
        self.out_norm, self.out = _norm(w), nn.Conv2d(w, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start by predicting 0: a calm first few steps
        nn.init.zeros_(self.out.bias)

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.time(torch.cat([angles.sin(), angles.cos()], dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self._embed(t)
        skip_coef, out_coef = self.coefficients[t].T[:, :, None, None, None]
        return skip_coef * x + out_coef * self._net(x, emb)

    def _net(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.pool2(h2), emb)
        h = self.up2(torch.cat([self.up2_conv(F.interpolate(h, scale_factor=2.0)), h2], 1), emb)
        h = self.up1(torch.cat([self.up1_conv(F.interpolate(h, scale_factor=2.0)), h1], 1), emb)
        return self.out(F.silu(self.out_norm(h)))


# ---------------------------------------------------------------------------------------------
# Training and sampling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int
    device: torch.device
    width: int = 16
    warmup: int = 20            # linear warm-up steps, then cosine decay to lr / 10
    ema_max_decay: float = 0.995
    grad_clip: float = 1.0


@dataclass
class RunResult:
    """One configuration's training and sampling outcome (samples on the CPU, float32)."""

    name: str
    losses: list[float]                 # per training step
    target_power: list[float]           # per step: mean square of the noise target
    samples: torch.Tensor = field(repr=False, default=None)
    train_seconds: float = 0.0
    sample_seconds: float = 0.0

    def final_loss(self) -> float:
        """Mean training loss over the last 10% of the steps (at least 1)."""
        n = max(1, len(self.losses) // 10)
        return sum(self.losses[-n:]) / n

    def final_relative_loss(self) -> float:
        """:meth:`final_loss` over the mean square of the noise target on the same steps: the
        configurations' targets differ in variance (SDM's antisqueeze adds some), this does not."""
        n = max(1, len(self.losses) // 10)
        return sum(self.losses[-n:]) / sum(self.target_power[-n:])


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def build_model(settings: TrainSettings, schedule: VPSchedule, channels: int = 3) -> TinyUNet:
    """The initial model: built on the CPU from ``settings.seed`` (the same weights on every
    device and for every configuration), then moved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = TinyUNet(schedule, channels, settings.width)
    return model.to(settings.device)


def _learning_rate(step: int, settings: TrainSettings) -> float:
    warmup = min(settings.warmup, max(1, settings.steps // 10))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(data: torch.Tensor, noise: AnisotropicNoise, settings: TrainSettings, *, name: str = "",
          on_step=None) -> tuple[TinyUNet, RunResult]:
    """Train a :class:`TinyUNet` on ``data`` (``[N, C, H, W]``) to predict the shaped noise of
    ``noise``. Returns the EMA of its weights (what is sampled) and the losses. ``on_step()`` is
    called after every step (progress bars). A non-finite loss raises :class:`TrainingDiverged`."""
    device = settings.device
    model = build_model(settings, noise.schedule, data.shape[1])
    ema = build_model(settings, noise.schedule, data.shape[1]).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    # One generator per stream, so the data order, timesteps and white noise are the same for
    # every configuration: only the shaping of the noise differs.
    order_gen = torch.Generator().manual_seed(settings.seed + 1)
    time_gen = torch.Generator().manual_seed(settings.seed + 2)
    noise_gen = torch.Generator().manual_seed(settings.seed + 3)
    T = noise.num_train_timesteps
    result = RunResult(name, [], [])
    order, cursor = torch.randperm(len(data), generator=order_gen), 0
    start = time.perf_counter()
    for step in range(settings.steps):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=order_gen), 0
        x0 = data[order[cursor:cursor + settings.batch_size]].to(device)
        cursor += settings.batch_size
        t = torch.randint(0, T, (x0.shape[0],), generator=time_gen)
        x_t, target = noise.add_noise(x0, t.to(device), generator=noise_gen)
        loss = F.mse_loss(model(x_t, t.to(device)), target)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{name}: the training loss became {loss.item()} at step "
                                   f"{step + 1}; try a smaller --lr")
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        decay = min(settings.ema_max_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1.0 - decay)
        result.losses.append(loss.item())
        result.target_power.append(target.detach().square().mean().item())
        if on_step is not None:
            on_step()
    result.train_seconds = time.perf_counter() - start
    return ema.eval(), result


def sampling_timesteps(num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """``steps`` evenly spaced ``(t, t_prev)`` pairs from ``T - 1`` down to ``-1`` ("trailing"
    spacing: the first step starts where the prior is defined, the last one ends on the data)."""
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps: must be in [1, {T}], got {steps}")
    ts = [T - 1 - (i * T) // steps for i in range(steps)]
    return list(zip(ts, ts[1:] + [-1]))


@torch.no_grad()
def sample(model: nn.Module, noise: AnisotropicNoise, n: int, shape: tuple[int, int, int], *,
           steps: int, sampler: str = "ddim", seed: int = 0, device=None, chunk: int = 500,
           on_step=None) -> torch.Tensor:
    """``n`` samples ``[n, *shape]`` (float32, CPU): x_T from the shaped prior, then ``steps``
    DDIM (eta = 0) or DDPM steps (ancestral, ``mode="exact"``) on the strided schedule of
    :func:`sampling_timesteps`, processed ``chunk`` images at a time. ``on_step()`` is called once
    per step of the whole set (the chunks advance together)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {list(SAMPLERS)}, got {sampler!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    pairs = sampling_timesteps(noise.num_train_timesteps, steps)
    prior_gen = torch.Generator().manual_seed(seed + 4)
    step_gen = torch.Generator().manual_seed(seed + 5)
    xs = [noise.sample_prior((min(chunk, n - i), *shape), generator=prior_gen).to(device)
          for i in range(0, n, chunk)]
    for t, prev in pairs:
        for i, x in enumerate(xs):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=device)
            eps_hat = model(x, t_batch)
            if sampler == "ddim":
                xs[i], _ = noise.ddim_step(eps_hat, t, x, prev_timestep=prev)
            else:
                # exact posterior per eigen-direction of the (time-varying) covariance; no clipping:
                # the procedural images are not confined to [-1, 1]
                xs[i], _ = noise.ddpm_step(eps_hat, t, x, prev_timestep=prev, generator=step_gen,
                                           mode="exact", clip_sample=False)
        if on_step is not None:
            on_step()
    return torch.cat([x.float().cpu() for x in xs])


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, in float64 with symmetric
    eigendecompositions (exact for PSD matrices; no complex sqrtm round-off as in scipy)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return max(float(distance), 0.0)


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors ``[N, D]`` (the FID
    formula, here in the feature spaces below). Needs at least 2 vectors per set."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features: expected two [N, D] sets with the same D, got "
                         f"{list(features_a.shape)} and {list(features_b.shape)}")
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("features: need at least 2 vectors per set")
    return gaussian_frechet_distance(*_moments(features_a), *_moments(features_b))


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """``[N, C * PIXEL_GRID^2]``: each channel averaged over a ``PIXEL_GRID x PIXEL_GRID`` grid of
    blocks (48 numbers for RGB), few enough for the covariance to be well estimated from a few
    hundred images."""
    return F.adaptive_avg_pool2d(images.double(), PIXEL_GRID).flatten(1)


class RandomFeatures:
    """A fixed random conv net: 3x3 conv (C -> 32), ReLU, 2x2 average pool, 3x3 conv (32 -> 64),
    ReLU, global average pool: 64 features per image. The weights are drawn from
    ``FEATURE_SEED`` (He-normal), never trained, so the feature space is the same function in every
    run and on every machine. A stand-in for Inception features that needs no download; it sees
    local colour and texture statistics, not object shape."""

    def __init__(self, channels: int = 3):
        g = torch.Generator().manual_seed(FEATURE_SEED)
        self.w1 = torch.randn(32, channels, 3, 3, generator=g, dtype=torch.float64)
        self.w1 *= math.sqrt(2.0 / (channels * 9))
        self.b1 = 0.1 * torch.randn(32, generator=g, dtype=torch.float64)
        self.w2 = torch.randn(FEATURE_WIDTH, 32, 3, 3, generator=g, dtype=torch.float64)
        self.w2 *= math.sqrt(2.0 / (32 * 9))
        self.b2 = 0.1 * torch.randn(FEATURE_WIDTH, generator=g, dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.double().cpu()
        x = F.avg_pool2d(F.relu(F.conv2d(x, self.w1, self.b1, padding=1)), 2)
        return F.relu(F.conv2d(x, self.w2, self.b2, padding=1)).mean(dim=(2, 3))


def radial_power(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged power spectrum ``(radii, power)`` of ``[N, C, H, W]`` images, averaged over
    images and channels, DC excluded (rings of width ``1 / min(H, W)`` cycles/pixel; white unit
    noise has power 1)."""
    from .viz import power_spectrum, radial_average

    return radial_average(power_spectrum(images))


def spectrum_error(power: torch.Tensor, reference_power: torch.Tensor) -> float:
    """Mean over the rings of ``|ln(power / reference_power)|``: 0 for identical spectra, ~0.1 when
    every ring is off by 10%."""
    if power.shape != reference_power.shape:
        raise ValueError(f"power: expected {list(reference_power.shape)} rings, got "
                         f"{list(power.shape)}")
    ratio = power.double() / reference_power.double()
    return float(ratio.log().abs().mean())


def linear_schedule() -> VPSchedule:
    """The demo's diffusion schedule: DDPM's linear betas 1e-4 .. 0.02 over T = 1000 steps."""
    return VPSchedule.linear(1000)
