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


# ---------------------------------------------------------------------------------------------
# The whole demo (``anisodiff demo``): options, threads, training, sampling, scores, report
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoPreset:
    """Defaults of the options that set the size of the demo (the full run, or --quick)."""

    steps: int
    batch_size: int
    size: int
    samples: int
    sample_steps: int
    train_images: int
    width: int


# Full run: about 2 minutes on 2 idle CPU cores (measured: see README); --quick: a few seconds.
DEMO_PRESET = DemoPreset(steps=800, batch_size=64, size=16, samples=1000, sample_steps=50,
                         train_images=8192, width=16)
QUICK_PRESET = DemoPreset(steps=8, batch_size=16, size=8, samples=64, sample_steps=4,
                          train_images=256, width=8)
SAMPLE_GRID_COLUMNS = 12
SAMPLE_CHUNK = 500           # images per forward pass while sampling (see sample())
PROBE_STEPS = 3              # --threads auto: timed steps per thread count and round
PROBE_ROUNDS = 2             # ... rounds, alternating the thread counts
PROBE_SAMPLES = 128          # images of the timed sampling step (scaled to --samples)
SHORT_RUN_S = 15.0           # a run expected to be shorter at 1 thread is not probed further
BUSY_CPUS = 0.75             # other processes keeping this many CPUs busy: 1 thread, no more probing


def resolve_options(quick: bool = False, **given) -> dict:
    """The size options (:class:`DemoPreset` fields): the preset's value unless given (None means
    not given), then the checks argparse cannot do (``ValueError`` with the option's name)."""
    preset = QUICK_PRESET if quick else DEMO_PRESET
    unknown = set(given) - set(DemoPreset.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown demo options: {sorted(unknown)}")
    opts = {name: given[name] if given.get(name) is not None else getattr(preset, name)
            for name in DemoPreset.__dataclass_fields__}
    if opts["size"] % 4:
        raise ValueError(f"--size {opts['size']}: must be a multiple of 4 (the UNet halves the "
                         "image twice)")
    if opts["width"] % 4:
        raise ValueError(f"--width {opts['width']}: must be a multiple of 4 (group norm)")
    if opts["batch_size"] > opts["train_images"]:
        raise ValueError(f"--batch-size {opts['batch_size']}: larger than the training set "
                         f"(--train-images {opts['train_images']})")
    return opts


def resolve_device(text: str) -> torch.device:
    """The torch device for ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or a ``ValueError``
    saying why it cannot be used."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device


@dataclass
class DemoData:
    train: torch.Tensor       # [N, 3, H, W]
    real: torch.Tensor        # held-out set the generated images are compared with
    real_floor: torch.Tensor  # a second held-out set: real vs real gives the metrics' floor


def load_data(opts: dict, seed: int) -> DemoData:
    n, size, m = opts["train_images"], opts["size"], opts["samples"]
    images = real_images(n + 2 * m, size, seed)
    return DemoData(images[:n], images[n:n + m], images[n + m:])


# --- threads: torch's OpenMP threads wait on each other when other jobs hold the cores ----------
def thread_candidates(available: int | None = None) -> list[int]:
    """The thread counts ``--threads auto`` tries: 1 and torch's default (one per usable core)."""
    n = available if available is not None else torch.get_num_threads()
    return sorted({1, max(1, n)})


@dataclass
class ThreadChoice:
    """What ``--threads auto`` measured: seconds per training step and per sampling step (of the
    whole sample set) at each thread count, and the count kept for each phase."""

    train: dict[int, float]
    sample: dict[int, float]
    train_threads: int
    sample_threads: int
    seconds: float            # spent measuring
    reason: str = "measured"  # "short" run, "busy" machine (1 thread, not probed further), "measured"
    busy_cpus: float | None = None  # CPUs other processes kept busy (None: not looked at)

    def to_dict(self) -> dict:
        return {"train_s_per_step": {str(k): v for k, v in self.train.items()},
                "sample_s_per_step": {str(k): v for k, v in self.sample.items()},
                "train_threads": self.train_threads, "sample_threads": self.sample_threads,
                "probe_seconds": self.seconds, "reason": self.reason,
                "other_busy_cpus": self.busy_cpus}


class _ProbeDone(Exception):
    """Stops a probe that has already spent its time budget."""


def _probe_train(data: torch.Tensor, noise: AnisotropicNoise, settings: TrainSettings,
                 budget_s: float | None = None) -> float:
    """Median seconds of a training step (after one warm-up step) on a throwaway model (learning
    rate 0: the same work as a real step, and it cannot diverge). A probe that runs past
    ``budget_s`` stops there and reports the steps it timed (the warm-up step if no other)."""
    stamps = [time.perf_counter()]

    def on_step():
        stamps.append(time.perf_counter())
        if budget_s is not None and stamps[-1] - stamps[0] > budget_s:
            raise _ProbeDone

    try:
        train(data, noise, TrainSettings(PROBE_STEPS + 1, settings.batch_size, 0.0, settings.seed,
                                         settings.device, width=settings.width), on_step=on_step)
    except _ProbeDone:
        pass
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])] or [stamps[1] - stamps[0]]
    return sorted(steps)[len(steps) // 2]


def _probe_sample(model: nn.Module, noise: AnisotropicNoise, n: int, shape, device) -> float:
    """Seconds of one sampling step of ``n`` images (the model and the DDIM update), extrapolated
    from one batch of up to PROBE_SAMPLES images after a warm-up pass."""
    m = min(n, PROBE_SAMPLES)
    x = torch.randn(m, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((m,), 500, dtype=torch.int64, device=device)
    with torch.no_grad():
        model(x, t)
        start = time.perf_counter()
        noise.ddim_step(model(x, t), 500, x, prev_timestep=480)
        return (time.perf_counter() - start) * n / m


def other_busy_cpus(window_s: float = 0.5) -> float | None:
    """CPUs that OTHER processes keep busy, measured over ``window_s`` seconds (None where
    /proc/stat cannot be read)."""
    from .bench.machine import busy_cpus

    return busy_cpus(window_s)


def choose_threads(data: torch.Tensor, noise: AnisotropicNoise, settings: TrainSettings, samples: int,
                   *, train_steps: int, sample_steps: int, candidates=None) -> ThreadChoice:
    """``--threads auto``: the thread count per phase (training, sampling) that runs the demo
    fastest on this machine now.

    1. Time a few training steps and one sampling step at 1 thread (the estimate of the run).
    2. A run expected to take under :data:`SHORT_RUN_S` stays at 1 thread: probing more would cost
       more than it can save.
    3. When other processes keep at least :data:`BUSY_CPUS` CPUs busy, stay at 1 thread: torch's
       OpenMP threads wait for each other at every parallel region, and a thread that shares its
       core with another job makes the others wait (measured on a 2-core VM at load 8-14: 0.2-0.9 s
       per training step at 1 thread, 1.3-8.7 s at 2).
    4. Otherwise time the other counts of ``candidates`` (default :func:`thread_candidates`) the
       same way, alternating the counts over up to :data:`PROBE_ROUNDS` rounds so a change of
       load hits them alike (one round when they differ by more than 1.5x in both phases; a count
       whose training probe runs 1.5x longer than the best one's is stopped there and its sampling
       not probed), and keep the faster count per phase (ties go to the larger count).

    Leaves torch at its thread count."""
    candidates = sorted(set(candidates or thread_candidates()))
    before, start = torch.get_num_threads(), time.perf_counter()
    shape = tuple(data.shape[1:])
    model = build_model(settings, noise.schedule, shape[0]).eval()
    probe_data = data[:max(settings.batch_size, 1)]
    train_s = {n: [] for n in candidates}
    sample_s = {n: [] for n in candidates}
    probe_s: dict[int, float] = {}  # seconds the training probe took, per count
    busy = None

    def measure(n: int) -> None:
        budget = 1.5 * min(probe_s.values(), default=math.inf)
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        train_s[n].append(_probe_train(probe_data, noise, settings, budget))
        probe_s[n] = min(time.perf_counter() - t0, probe_s.get(n, math.inf))
        if train_s[n][-1] <= 1.5 * min(min(v) for v in train_s.values() if v):
            sample_s[n].append(_probe_sample(model, noise, samples, shape, settings.device))

    def choice(reason: str) -> ThreadChoice:
        train_m = {n: min(v) for n, v in train_s.items() if v}
        sample_m = {n: min(v) for n, v in sample_s.items() if v}
        best = lambda d: min(sorted(d, reverse=True), key=d.get)  # noqa: E731
        return ThreadChoice(train_m, sample_m, best(train_m), best(sample_m),
                            time.perf_counter() - start, reason, busy)

    def clear(d: dict) -> bool:
        values = [min(v) for v in d.values() if v]
        return len(values) < 2 or max(values) > 1.5 * min(values)

    try:
        first = candidates[0]
        measure(first)
        if train_steps * train_s[first][0] + sample_steps * sample_s[first][0] < SHORT_RUN_S:
            return choice("short")
        busy = other_busy_cpus()
        if busy is not None and busy >= BUSY_CPUS and first == 1:
            return choice("busy")
        for n in candidates[1:]:
            measure(n)
        for r in range(1, PROBE_ROUNDS):
            if clear(train_s) and clear(sample_s):
                break
            for n in (candidates[::-1] if r % 2 else candidates):
                measure(n)
        return choice("measured")
    finally:
        torch.set_num_threads(before)


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``."""
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class _Remaining:
    """The expected remaining time of the run: the steps left of each phase times its time per step
    (the probe's estimate, replaced by the measured mean once a phase has run a few steps)."""

    def __init__(self, bar, train_steps: int, sample_steps: int, estimate: dict[str, float]):
        self.bar, self.estimate = bar, dict(estimate)
        self.left = {"train": train_steps, "sample": sample_steps}
        self.spent = {"train": [0.0, 0], "sample": [0.0, 0]}
        self.last = self.shown = time.perf_counter()

    def seconds(self) -> float:
        per = {k: (s / n if n >= 5 else self.estimate[k]) for k, (s, n) in self.spent.items()}
        return sum(self.left[k] * per[k] for k in self.left)

    def start(self) -> None:  # a new phase: the time since the last step is not a step
        self.last = time.perf_counter()

    def step(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[phase][0] += now - self.last
        self.spent[phase][1] += 1
        self.left[phase] -= 1
        self.last = now
        self.bar.update()
        if now - self.shown >= 2.0 or not any(self.left.values()):
            self.shown = now
            self.bar.set_postfix_str(f"~{format_duration(self.seconds())} left")


def train_and_sample(configs, data: DemoData, opts: dict, *, sampler: str, lr: float, seed: int,
                     device, schedule, threads: ThreadChoice | None = None,
                     estimate: dict[str, float] | None = None) -> list[RunResult]:
    """Train and sample every configuration (a progress bar with the expected remaining time).
    ``threads``: the thread counts of the training and the sampling phases (None: leave torch's)."""
    per_run = opts["steps"] + opts["sample_steps"]
    bar = _progress(len(configs) * per_run, "demo")
    remaining = _Remaining(bar, len(configs) * opts["steps"], len(configs) * opts["sample_steps"],
                           estimate or {"train": 0.0, "sample": 0.0})
    settings = TrainSettings(opts["steps"], opts["batch_size"], lr, seed, device,
                             width=opts["width"])
    shape = tuple(data.train.shape[1:])
    runs = []
    try:
        for i, config in enumerate(configs, 1):
            bar.set_description(f"[{i}/{len(configs)}] {config.name}: training")
            noise = AnisotropicNoise(config.spec, schedule)
            if threads is not None:
                torch.set_num_threads(threads.train_threads)
            remaining.start()
            model, run = train(data.train, noise, settings, name=config.name,
                               on_step=lambda: remaining.step("train"))
            bar.set_description(f"[{i}/{len(configs)}] {config.name}: sampling")
            if threads is not None:
                torch.set_num_threads(threads.sample_threads)
            remaining.start()
            start = time.perf_counter()
            run.samples = sample(model, noise, opts["samples"], shape, steps=opts["sample_steps"],
                                 sampler=sampler, seed=seed, device=device, chunk=SAMPLE_CHUNK,
                                 on_step=lambda: remaining.step("sample"))
            run.sample_seconds = time.perf_counter() - start
            if not torch.isfinite(run.samples).all():
                raise TrainingDiverged(
                    f"{config.name}: the samples are not finite (NaN or Inf): the model did not "
                    "train well; try a smaller --lr or more --steps")
            runs.append(run)
    finally:
        bar.close()
    return runs


def _progress(total: int, desc: str):
    from ._progress import progress

    return progress(total, desc)


def evaluate(samples: torch.Tensor, data: DemoData, features, real_features, real_power) -> dict:
    """The three sample metrics of one set of images against the held-out real set."""
    _, power = radial_power(samples)
    return {
        "fd_pixels": frechet_distance(pixel_features(samples), pixel_features(data.real)),
        "fd_random_features": frechet_distance(features(samples), real_features),
        "spectrum_error": spectrum_error(power, real_power),
        "radial_power": power.tolist(),
    }


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def format_table(configs, runs, metrics: dict, floor: dict) -> str:
    header = ("config", "final loss", "rel. loss", "FD pixels", "FD rand. feat.", "spectrum err",
              "train s", "sample s")
    rows = [(c.name, _fmt(r.final_loss()), _fmt(r.final_relative_loss()),
             _fmt(metrics[c.name]["fd_pixels"]), _fmt(metrics[c.name]["fd_random_features"]),
             _fmt(metrics[c.name]["spectrum_error"]), f"{r.train_seconds:.1f}",
             f"{r.sample_seconds:.1f}") for c, r in zip(configs, runs)]
    rows.append(("real vs real", "-", "-", _fmt(floor["fd_pixels"]),
                 _fmt(floor["fd_random_features"]), _fmt(floor["spectrum_error"]), "-", "-"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


DEMO_NOTES = (
    "final loss: training MSE between the predicted and the true (shaped) noise, mean over the "
    "last 10% of the steps; rel. loss: the same divided by the mean square of the noise target "
    "(antisqueezed noise has more variance, so raw losses of different noises do not compare).",
    f"FD pixels: Fréchet distance between Gaussians fitted to generated and held-out real images, "
    f"each image reduced to its {PIXEL_GRID}x{PIXEL_GRID} block means per channel "
    f"({3 * PIXEL_GRID ** 2} numbers). FD rand. feat.: the same on {FEATURE_WIDTH} "
    "features of a fixed random conv net (2 conv layers, global pooling; the same weights in every "
    "run). spectrum err: mean over the rings of |ln(P_generated / P_real)| of the radially "
    "averaged power spectrum (0.1 = about 10% off).",
    "real vs real: the same metrics between two disjoint held-out sets of real images of the same "
    "size: what the finite sample size alone gives; a model can only be judged above it.",
)


def honesty_note(params: int, opts: dict) -> str:
    return (f"These are tiny models ({params:,} parameters) trained for {opts['steps']} steps on "
            f"synthetic {opts['size']}x{opts['size']} images: the demo shows the machinery working "
            "end to end, not which noise is better. Treat differences between the rows as "
            "anecdotal (rerun with another --seed to see how much they move); no FID claim is "
            "made.")


def _header(opts: dict, *, quick: bool, lr: float, sampler: str, device, pca, spectrum,
            model_params: int) -> list[str]:
    size, n = opts["size"], opts["samples"]
    share = float(pca.eigenvalues[0] / pca.eigenvalues.sum())
    axis = ", ".join(f"{x:+.3f}" for x in pca.axes[:, 0].tolist())
    return [
        f"anisodiff demo{' --quick' if quick else ''}: a tiny diffusion model trained with 4 "
        f"kinds of forward noise on the built-in procedural images ({size}x{size} RGB, 1/f^2 "
        "spectrum, ImageNet colour statistics; no download), same seed for every run: same "
        "initial weights, data order, timesteps and white noise; only the shaping differs.",
        f"data: {opts['train_images']:,} training images, 2 x {n:,} held-out real images. Fitted "
        f"on the training set: principal colour axis v1 = ({axis}) ({100 * share:.1f}% of the colour "
        f"variance; SDM/HDM squeeze along it), spectrum P(r) ~ r^(2 alpha) with alpha = "
        f"{spectrum.alpha:.3f} (the power-law run uses the papers' mild alpha = "
        f"{POWER_LAW_ALPHA}, not the fitted one).",
        f"model: TinyUNet, {model_params:,} parameters, predicts the shaped noise; {opts['steps']} "
        f"steps x {opts['batch_size']} images, AdamW lr {lr:g} (warm-up, cosine), EMA weights "
        f"sampled; linear VP schedule, T = 1000. Sampling: {n:,} images, {opts['sample_steps']} "
        f"{'DDIM (eta = 0)' if sampler == 'ddim' else 'DDPM (exact posterior)'} steps from "
        f"the shaped prior; device {device}.",
    ]


def _threads_line(choice: ThreadChoice | None, fixed: int | None) -> str:
    if choice is None:
        return f"threads: {fixed if fixed is not None else torch.get_num_threads()} (fixed)"
    per = lambda d: ", ".join(f"{n}: {1e3 * s:.0f} ms" for n, s in d.items())  # noqa: E731
    if choice.reason in ("short", "busy"):
        (n, train_s), (_, sample_s) = *choice.train.items(), *choice.sample.items()
        why = ("a short run" if choice.reason == "short" else
               f"other processes keep {choice.busy_cpus:.1f} CPUs busy, and torch's threads would "
               "wait for each other")
        return (f"threads: auto chose {n}: {why} ({1e3 * train_s:.0f} ms per training step, "
                f"{1e3 * sample_s:.0f} ms per sampling step at {n} thread); --threads N fixes the "
                "count")
    return (f"threads: auto chose {choice.train_threads} for training (ms per step at each thread "
            f"count: {per(choice.train)}) and {choice.sample_threads} for sampling (ms per "
            f"sampling step: {per(choice.sample)}), measured in {choice.seconds:.1f} s; "
            "--threads N fixes the count")


def _report(*, opts, quick, sampler, lr, seed, device, configs, runs, metrics, floor, fitted, radii,
            real_power, figures, note, wall, cpu, threads, choice) -> dict:
    from ._version import __version__

    def curve(losses):  # about 100 points: the JSON stays small
        stride = max(1, len(losses) // 100)
        return [sum(losses[i:i + stride]) / len(losses[i:i + stride])
                for i in range(0, len(losses), stride)]

    return {
        "anisodiff_version": __version__,
        "note": note,
        "setting": {**opts, "sampler": sampler, "lr": lr, "seed": seed,
                    "device": str(device), "quick": quick,
                    "schedule": "VPSchedule.linear(T=1000)",
                    "sampling_timesteps": [t for t, _ in sampling_timesteps(
                        1000, opts["sample_steps"])],
                    "model": "anisodiff.demo.TinyUNet", "torch": torch.__version__,
                    "threads": threads,
                    "threads_auto": choice.to_dict() if choice is not None else None},
        "metric_definitions": {"final_loss": DEMO_NOTES[0], "metrics": DEMO_NOTES[1],
                               "real_vs_real": DEMO_NOTES[2]},
        "fitted": fitted,
        "real_vs_real": floor,
        "radii": radii.tolist(),
        "real_radial_power": real_power.tolist(),
        "configs": {c.name: {"title": c.title, "spec": c.spec.to_dict(),
                             "final_loss": r.final_loss(),
                             "final_relative_loss": r.final_relative_loss(),
                             **metrics[c.name], "loss_curve": curve(r.losses),
                             "train_seconds": r.train_seconds, "sample_seconds": r.sample_seconds}
                    for c, r in zip(configs, runs)},
        "figures": figures,
        "seconds": {"wall": wall, "cpu": cpu},
    }


def _figures(configs, runs, data: DemoData, metrics, radii, real_power, floor_power, out, opts,
             sampler: str, seed: int) -> dict:
    from . import viz

    cols = min(SAMPLE_GRID_COLUMNS, opts["samples"])
    rows = [(f"{c.title}   (FD pixels {metrics[c.name]['fd_pixels']:.3g}, FD random features "
             f"{metrics[c.name]['fd_random_features']:.3g}, spectrum error "
             f"{metrics[c.name]['spectrum_error']:.3g})", r.samples[:cols])
            for c, r in zip(configs, runs)]
    rows.append(("real (held-out) images", data.real[:cols]))
    size = opts["size"]
    what = (f"{opts['steps']} training steps, {opts['sample_steps']} {sampler.upper()} steps, "
            f"seed {seed}")
    samples = viz.plot_sample_grid(
        rows, out / "demo_samples.png",
        title=f"anisodiff demo: samples of a tiny UNet per forward noise ({size}x{size}, {what}; "
              "same white prior draw in every row)")
    spectra = viz.plot_radial_spectra(
        radii, real_power, {c.title: metrics[c.name]["radial_power"] for c in configs},
        out / "demo_spectra.png", floor=floor_power,
        title=f"anisodiff demo: radially averaged power spectra, generated vs real ({what})")
    return {"samples": samples, "spectra": spectra}


def run(opts: dict, out, *, sampler: str = "ddim", lr: float = 2e-3, seed: int = 0,
        device="cpu", threads: int | str | None = "auto", plot: bool = True,
        quick: bool = False) -> int:
    """The whole demo with the size options ``opts`` (:func:`resolve_options`): fit, train and
    sample the four configurations, score them, print the table, write ``out/demo_report.json``
    and (``plot``, matplotlib installed) the two pictures. ``threads``: ``"auto"``
    (:func:`choose_threads`, on the CPU), a count, or None (torch's). Returns the exit code (1: the
    training diverged). ``out`` must exist."""
    import importlib.util
    import json
    import sys
    import textwrap
    from pathlib import Path

    from .fit import fit_statistics

    out, device = Path(out), torch.device(device)
    can_plot = plot and importlib.util.find_spec("matplotlib") is not None
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if isinstance(threads, int):
        torch.set_num_threads(threads)
    if device.type == "cuda":  # the same numbers on every run (cuDNN picks kernels otherwise)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    data = load_data(opts, seed)
    pca, spectrum = fit_statistics(data.train.split(1024), k=1, progress=False)
    configs = demo_configs(pca.axes)
    schedule = linear_schedule()
    params = sum(p.numel() for p in TinyUNet(schedule, 3, opts["width"]).parameters())
    for line in _header(opts, quick=quick, lr=lr, sampler=sampler, device=device, pca=pca,
                        spectrum=spectrum, model_params=params):
        print(textwrap.fill(line, width=100))

    settings = TrainSettings(opts["steps"], opts["batch_size"], lr, seed, device,
                             width=opts["width"])
    probe_noise = AnisotropicNoise(configs[-1].spec, schedule)
    auto = threads == "auto" and device.type == "cpu" and len(thread_candidates()) > 1
    choice = (choose_threads(data.train, probe_noise, settings, opts["samples"],
                             train_steps=len(configs) * opts["steps"],
                             sample_steps=len(configs) * opts["sample_steps"]) if auto else None)
    if choice is not None:
        estimate = {"train": choice.train[choice.train_threads],
                    "sample": choice.sample[choice.sample_threads]}
    else:
        estimate = {"train": _probe_train(data.train[:opts["batch_size"]], probe_noise, settings),
                    "sample": _probe_sample(build_model(settings, schedule).eval(), probe_noise,
                                            opts["samples"], tuple(data.train.shape[1:]), device)}
    expected = len(configs) * (opts["steps"] * estimate["train"]
                               + opts["sample_steps"] * estimate["sample"])
    print(textwrap.fill(_threads_line(choice, threads if isinstance(threads, int) else None)
                        + f". Expected time of training and sampling: about "
                        f"{format_duration(expected)}.", width=100))
    print()

    try:
        runs = train_and_sample(configs, data, opts, sampler=sampler, lr=lr, seed=seed,
                                device=device, schedule=schedule, threads=choice,
                                estimate=estimate)
    except TrainingDiverged as exc:
        print(f"anisodiff demo: error: {exc}", file=sys.stderr)
        return 1
    features = RandomFeatures()
    real_features = features(data.real)
    radii, real_power = radial_power(data.real)
    floor = evaluate(data.real_floor, data, features, real_features, real_power)
    floor_power = floor.pop("radial_power")
    metrics = {c.name: evaluate(r.samples, data, features, real_features, real_power)
               for c, r in zip(configs, runs)}

    print(format_table(configs, runs, metrics, floor))
    print()
    note = honesty_note(params, opts)
    for paragraph in (*DEMO_NOTES, note):
        print(textwrap.fill(paragraph, width=100))
    print()

    figures = None
    if plot and not can_plot:
        print("No pictures: matplotlib is not installed. Install it with `pip install matplotlib` "
              "(or `pip install anisodiff[viz]`).")
    elif can_plot:
        figures = _figures(configs, runs, data, metrics, radii, real_power,
                           torch.tensor(floor_power), out, opts, sampler, seed)
        print(f"pictures: {figures['samples']}, {figures['spectra']}")
    fitted = {"axis": pca.axes[:, 0].tolist(), "eigenvalues": pca.eigenvalues.tolist(),
              "alpha": spectrum.alpha}
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    used = (f"{choice.train_threads} training, {choice.sample_threads} sampling" if choice
            else str(torch.get_num_threads()))
    report = _report(opts=opts, quick=quick, sampler=sampler, lr=lr, seed=seed, device=device,
                     configs=configs, runs=runs, metrics=metrics, floor=floor, fitted=fitted,
                     radii=radii, real_power=real_power, figures=figures, note=note, wall=wall,
                     cpu=cpu, threads=torch.get_num_threads() if choice is None else
                     {"train": choice.train_threads, "sample": choice.sample_threads},
                     choice=choice)
    report_path = out / "demo_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"report:   {report_path}")
    print(f"took {format_duration(wall)} ({cpu:.0f} s of CPU time, threads: {used})")
    return 0
