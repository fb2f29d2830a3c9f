"""Fit a noise spec to data: the principal colour axes (SDM/HDM) and the power spectrum (SAGD).

Input: any iterable of ``[B, C, H, W]`` batches, e.g. a ``torch.utils.data.DataLoader``. A batch may
be a tensor (or NumPy array), a tuple/list whose first entry is the images (``(images, labels)``), or
a dict holding them under ``"image"``, ``"img"``, ``"images"``, ``"pixel_values"`` or ``"latents"``.
A single ``[N, C, H, W]`` tensor is one batch. Video batches ``[B, C, F, H, W]`` give per-frame
statistics (the default noise filters every frame on its own): the channel PCA over every pixel of
every frame, the spectrum over the ``B F`` frames. A path (``str`` / ``os.PathLike``) to cached
latents (``.npy``, ``.npz``, ``.pt``, ``.safetensors``, or a folder of them;
:class:`anisodiff.datasets.LatentFiles`) is read in chunks of ``batch_size``. Statistics are of the
values as given, so feed the data exactly as the model sees it (same scaling, e.g. ``[-1, 1]`` or a
VAE's ``scaling_factor``, same resolution).

Both fits read the data once, accumulate in float64 on the data's device (CPU for MPS, which has no
float64; each batch is converted to float64, and the spectrum takes its complex128 FFT, so pick the
batch size with that memory in mind) and show a tqdm progress bar when the number of batches is
known. When
``torch.distributed`` is initialised, every rank passes its own shard and gets the same result, that
of the union of the shards (empty shards are fine).

Numerics: the pixel covariance is never formed as ``E[x x^T] - mu mu^T`` (which cancels
catastrophically when the mean is large compared with the spread); each batch is centred on its own
mean and the batches are combined with the exact pairwise update of Chan, Golub and LeVeque (1979).

Turning the statistics into a spec::

    pca, spectrum = fit_statistics(loader, k=1)
    spec = NoiseSpec(squeeze=pca.squeeze(-0.4),                  # SDM, mild antisqueeze
                     spectral=spectrum.power_law(),               # or spectrum.table()
                     radius=spectrum.radius)
"""
from __future__ import annotations

import json
import math
import operator
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import bands, reference
from ._progress import progress as _progress
from .spec import RADIUS_CONVENTIONS, NoiseSpec, PowerLaw, SpectralTable, Squeeze

__all__ = ["ChannelPCA", "Spectrum", "fit_channel_pca", "fit_spectrum", "fit_statistics",
           "IMAGE_KEYS", "SPECTRAL_CHOICES", "run"]

IMAGE_KEYS = ("image", "img", "images", "pixel_values", "latents")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ChannelPCA:
    """Principal axes of the centred C x C pixel covariance (every pixel of every image is one
    C-vector; population covariance, divided by ``count``). All tensors are float64 on the CPU.

    Sign convention: each axis is flipped so that its largest-magnitude component is positive (the
    first one on a tie), so the luminance axis of RGB data points towards ``+(1, 1, 1)``.
    """

    axes: torch.Tensor          # [C, k] orthonormal columns, by descending eigenvalue
    eigenvalues: torch.Tensor   # [C] all eigenvalues, descending (the first k belong to axes)
    mean: torch.Tensor          # [C] mean pixel
    covariance: torch.Tensor    # [C, C]
    count: int                  # number of pixel vectors

    @property
    def std(self) -> torch.Tensor:
        """``[C]`` per-channel standard deviation (of the pixels, about the channel mean)."""
        return self.covariance.diagonal().clamp_min(0).sqrt()

    def squeeze(self, strength, variant: str = "sdm", schedule="beta") -> Squeeze:
        """A :class:`~anisodiff.Squeeze` on these axes (see its arguments); the papers' best
        setting is ``strength=-0.4`` (mild antisqueeze)."""
        return Squeeze(self.axes, strength, variant, schedule)


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The power spectrum of the data, ``P(f) = E |fft2(x - m)(f)|^2 / (H W)`` per channel (white
    unit noise has ``P = 1``; the mean of P over the bins is the per-pixel variance).

    ``m`` is the per-channel dataset mean, a constant: it only touches the DC bin, which therefore
    holds ``H W`` times the variance of the images' mean colours. Every other bin is the power of
    the image content itself; the DC bin is excluded from the radial profile and the fit.

    Radial profile: rings of width ``1 / min(H, W)`` cycles/pixel; a ring's radius and power are the
    geometric means over its frequency bins (log-averages: exact for a power law, where arithmetic
    ring means are biased by up to ~10% in the lowest rings). ``alpha``: least-squares slope of
    ``log P`` against ``log r`` over the non-DC rings of the channel-mean power, halved, i.e.
    ``P ~ r^(2 alpha)`` and ``PowerLaw(alpha)`` makes noise with the data's slope. Natural images have
    ``P ~ r^-2``, ``alpha ~ -1``. Rings with zero power are left out; ``nan`` if fewer than 2 remain.

    All tensors are float64 on the CPU, on the unshifted ``fftfreq`` grid. ``images``: the number
    of ``[C, H, W]`` planes averaged (for video: samples times frames); ``frames``: F of video data
    (0 for ``[B, C, H, W]`` data). ``band_cross``: ``[R + 1, C, C]`` per band of
    :func:`anisodiff.bands.ring_index` (0 = DC) the cross-spectral matrix summed over the band's
    bins, ``sum_f Re E[X(f) X(f)^H] / (H W)`` (its diagonal sums :attr:`power` over the band; what
    the terminal SNR per band and principal direction reads), for data with at most
    :data:`CROSS_SPECTRUM_CHANNELS` channels, else None.
    """

    power: torch.Tensor         # [C, H, W]
    radius: str                 # radius convention of `radii` (and of power_law's eps)
    radii: torch.Tensor         # [R] ring radii, non-DC
    radial_power: torch.Tensor  # [C, R]
    alpha: float                # fitted on the channel-mean power
    channel_alpha: tuple        # per channel
    images: int
    frames: int = 0
    band_cross: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.power.shape[-2:])

    def table(self, radial: bool = False) -> SpectralTable:
        """A :class:`~anisodiff.SpectralTable` whose noise has the data's spectrum: SAGD weights are
        amplitudes, so ``w = sqrt(P)`` of the channel-mean power (symmetrised over ``+-f``).
        ``radial=True`` uses the ring profile instead (isotropic and smoother; DC kept). The table
        fixes the plane size to :attr:`shape`."""
        power = self.power.mean(dim=0)
        if radial:
            ring = bands.ring_index(*self.shape)
            power = torch.where(ring > 0, _ring_log_means(power, ring).exp()[ring], power)
        mirrored = torch.roll(torch.flip(power, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
        return SpectralTable((0.5 * (power + mirrored)).sqrt())

    def power_law(self, eps: float | None = None) -> PowerLaw:
        """``PowerLaw(alpha, eps)``; use it with ``NoiseSpec(radius=self.radius)``. ``eps`` default:
        half the smallest non-zero radius of the grid, which keeps the DC weight finite (the papers'
        1e-10 would give DC the weight ``1e10`` at ``alpha = -1``, all the noise would be a flat
        colour)."""
        if math.isnan(self.alpha):
            raise ValueError("spectrum: alpha could not be fitted (fewer than 2 radial bins with "
                             "power)")
        if eps is None:
            r = reference.radius(*self.shape, self.radius)
            eps = 0.5 * float(r[r > 0].min())
        return PowerLaw(self.alpha, eps)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def _images(batch, index: int) -> torch.Tensor:
    """The ``[B, C, H, W]`` (or video ``[B, C, F, H, W]``) tensor of one batch."""
    if isinstance(batch, Mapping):
        key = next((k for k in IMAGE_KEYS if k in batch), None)
        if key is None:
            raise TypeError(f"batch {index}: a dict without any of the keys {list(IMAGE_KEYS)} "
                            f"(keys: {list(batch)[:8]}); pass the images themselves")
        batch = batch[key]
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch {index}: expected a [B, C, H, W] tensor, or a tuple/list (first "
                        f"entry) or dict (keys {list(IMAGE_KEYS)}) holding one; got "
                        f"{type(batch).__name__}")
    if batch.dim() not in (4, 5):
        hint = " (a single image? add a batch dimension)" if batch.dim() == 3 else ""
        raise ValueError(f"batch {index}: expected [B, C, H, W] (or video [B, C, F, H, W]), got "
                         f"shape {list(batch.shape)}{hint}")
    if batch.is_complex() or batch.dtype == torch.bool:
        raise TypeError(f"batch {index}: expected real numbers, got {batch.dtype}")
    return batch


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _progress_bar(data, desc: str):
    """A progress bar over the batches when their number is known (rank 0 only), else None (tqdm,
    or a plain line on stderr every 5% without it)."""
    try:
        total = len(data)
    except TypeError:  # no __len__ (iterable datasets, generators)
        return None
    if _is_distributed() and dist.get_rank() != 0:
        return None
    return _progress(total, desc)


def _as_batches(data, batch_size: int, key: str | None):
    """``data`` itself, or the chunks of the latent files a path names."""
    if isinstance(data, (str, os.PathLike)):
        from . import datasets

        return datasets.LatentFiles(data, key=key).batches(batch_size)
    if key is not None:
        raise ValueError("key: applies only when data is a path to latent files")
    return [data] if isinstance(data, torch.Tensor) else data


def _accumulate(data, accumulators, *, progress: bool, desc: str) -> None:
    """Feed every batch of ``data`` (float64, on the first batch's device; video batches as their
    ``B F`` frames) to the accumulators, then combine them across ranks when torch.distributed is
    initialised."""
    bar = _progress_bar(data, desc) if progress else None
    device, frames = None, None
    try:
        for index, batch in enumerate(data):
            x = _images(batch, index)
            if device is None:
                device = torch.device("cpu") if x.device.type == "mps" else x.device
            f = x.shape[2] if x.dim() == 5 else 0
            if frames is None:
                frames = f
            elif f != frames:
                raise ValueError(f"batch {index}: shape {list(x.shape)}, but the first batch had "
                                 + (f"{frames} frames" if frames else "no frame axis")
                                 + "; every batch must have the same layout")
            x = x.to(device=device, dtype=torch.float64)
            if f:  # [B, C, F, H, W] -> the B F frames [B F, C, H, W]
                x = x.transpose(1, 2).reshape(-1, *x.shape[1:2], *x.shape[3:])
            for acc in accumulators:
                acc.update(x, f)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    for acc in accumulators:
        if _is_distributed():
            acc.all_reduce(_collective_device(device))
        elif acc.shape is None:
            raise ValueError("data: no images")


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
def _collective_device(device: torch.device | None) -> torch.device:
    """Where this rank's collectives run: its data's device, else the backend's default."""
    if device is not None:
        return device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_shape(shape: tuple | None, ndim: int, device: torch.device) -> tuple:
    """The common per-sample shape of all ranks (ranks without data contribute nothing). Raises the
    same error on every rank when no rank has data or the ranks disagree."""
    none = (0,) * ndim + (-(2**62),) * ndim
    local = none if shape is None else tuple(shape) + tuple(-s for s in shape)
    bounds = torch.tensor(local, dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    high, low = bounds[:ndim].tolist(), [-v for v in bounds[ndim:].tolist()]
    if not any(high):
        raise ValueError(f"data: no images on any of the {dist.get_world_size()} ranks")
    if high != low:
        raise ValueError(f"data: the ranks' images differ in shape (from {low} to {high} per "
                         "sample); every rank must see the same C (and H, W for the spectrum)")
    return tuple(high)


# ---------------------------------------------------------------------------------------------
# Accumulators
# ---------------------------------------------------------------------------------------------
class _Moments:
    """Count, mean and centred scatter ``sum (x - mean)(x - mean)^T`` of D-vectors in float64,
    combined with the exact pairwise update of Chan, Golub and LeVeque."""

    def __init__(self, dim: int, device: torch.device):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add_batch(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Merge in ``n`` vectors with the given mean and centred scatter."""
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def all_gather(self) -> "_Moments":
        """The moments of all ranks, merged in rank order (so every rank gets bit-identical ones)."""
        dim, device = self.mean.numel(), self.mean.device
        count = torch.tensor([float(self.n)], dtype=torch.float64, device=device)
        state = torch.cat([count, self.mean, self.scatter.reshape(-1)])
        states = [torch.empty_like(state) for _ in range(dist.get_world_size())]
        dist.all_gather(states, state)
        merged = _Moments(dim, device)
        for s in states:
            merged.add_batch(int(s[0].item()), s[1:1 + dim], s[1 + dim:].reshape(dim, dim))
        return merged


class _PixelCovariance:
    """Moments of the C-vectors of all pixels."""

    def __init__(self, k: int):
        self.k = k
        self.shape = None       # (C,) once data arrived
        self.moments = None

    def update(self, x: torch.Tensor, frames: int = 0) -> None:
        B, C, H, W = x.shape
        if self.shape is None:
            if self.k > C:
                raise ValueError(f"k: cannot fit {self.k} axes to data with C = {C} channels")
            self.shape, self.moments = (C,), _Moments(C, x.device)
        elif C != self.shape[0]:
            raise ValueError(f"data: a batch has {C} channels, the first had {self.shape[0]}")
        mean = x.mean(dim=(0, 2, 3))
        centred = x - mean[:, None, None]
        scatter = torch.einsum("bchw,bdhw->cd", centred, centred)
        self.moments.add_batch(B * H * W, mean, scatter)

    def all_reduce(self, device: torch.device) -> None:
        (C,) = _agree_on_shape(self.shape, 1, device)
        if self.k > C:  # only ranks without data have not checked k yet
            raise ValueError(f"k: cannot fit {self.k} axes to data with C = {C} channels")
        if self.moments is None:
            self.shape, self.moments = (C,), _Moments(C, device)
        self.moments = self.moments.all_gather()

    def result(self) -> ChannelPCA:
        m = self.moments
        covariance = (m.scatter / m.n).cpu()
        if not torch.isfinite(covariance).all():
            raise ValueError("data: contains NaN or Inf")
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
        pivot = vectors.abs().argmax(dim=0)
        vectors = vectors * torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
        return ChannelPCA(vectors[:, :self.k].contiguous(), eigenvalues, m.mean.cpu(), covariance,
                          m.n)


# the per-band C x C cross-spectra are kept up to this many channels (SD/SDXL: 4, SD3/Flux: 16): they
# cost B C^2 H W per batch, beside the B C H W log(H W) of the FFT
CROSS_SPECTRUM_CHANNELS = 16


class _PowerSpectrum:
    """Sum over images of ``|fft2(x - image mean)|^2`` per channel, per band the sum of
    ``Re(X X^H)`` over its bins (up to CROSS_SPECTRUM_CHANNELS channels), and the moments of the
    images' mean colours (for the DC bin)."""

    def __init__(self):
        self.shape = None       # (C, H, W) once data arrived
        self.frames = 0         # F of video data
        self.power = None
        self.cross = None       # [R + 1, C, C]
        self.means = None

    def _start(self, shape: tuple, device: torch.device) -> None:
        self.shape = shape
        C, H, W = shape
        self.power = torch.zeros(shape, dtype=torch.float64, device=device)
        self.means = _Moments(C, device)
        if C <= CROSS_SPECTRUM_CHANNELS:
            ring = bands.ring_index(H, W).reshape(-1)
            self._bins = [torch.nonzero(ring == r).reshape(-1).to(device)
                          for r in range(int(ring.max()) + 1)]
            self.cross = torch.zeros(len(self._bins), C, C, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, frames: int = 0) -> None:
        B, C, H, W = x.shape
        if self.shape is None:
            self._start((C, H, W), x.device)
            self.frames = frames
        elif (C, H, W) != self.shape:
            raise ValueError(f"data: a batch has images of shape {[C, H, W]}, the first had "
                             f"{list(self.shape)}; the spectrum needs one size (resize or crop)")
        means = x.mean(dim=(2, 3))
        spectrum = torch.fft.fft2(x - means[:, :, None, None])
        self.power += (spectrum.real ** 2 + spectrum.imag ** 2).sum(dim=0)
        if self.cross is not None:
            flat = spectrum.reshape(B, C, H * W)
            for r, bins in enumerate(self._bins[1:], start=1):  # DC (ring 0) comes from the means
                z = flat[:, :, bins]
                self.cross[r] += (torch.einsum("bcf,bdf->cd", z.real, z.real)
                                  + torch.einsum("bcf,bdf->cd", z.imag, z.imag))
        centred = means - means.mean(dim=0)
        self.means.add_batch(B, means.mean(dim=0), centred.T @ centred)

    def all_reduce(self, device: torch.device) -> None:
        local = None if self.shape is None else (*self.shape, self.frames)
        *shape, self.frames = _agree_on_shape(local, 4, device)
        shape = tuple(shape)
        if self.power is None:
            self._start(shape, device)
        dist.all_reduce(self.power)
        if self.cross is not None:
            dist.all_reduce(self.cross)
        self.means = self.means.all_gather()

    def result(self, radius: str) -> Spectrum:
        C, H, W = self.shape
        n = self.means.n
        power = (self.power / (n * H * W)).cpu()
        power[:, 0, 0] = H * W * self.means.scatter.diagonal().cpu() / n
        if not torch.isfinite(power).all():
            raise ValueError("data: contains NaN or Inf")
        cross = None
        if self.cross is not None:
            cross = (self.cross / (n * H * W)).cpu()
            cross[0] = H * W * self.means.scatter.cpu() / n
        ring = bands.ring_index(H, W)
        log_radii = _ring_log_means(reference.radius(H, W, radius), ring)
        rings = ~torch.isnan(log_radii)  # the non-empty rings, DC excluded
        radii = log_radii[rings].exp()
        log_power = torch.stack([_ring_log_means(p, ring)[rings] for p in power])
        mean_log_power = _ring_log_means(power.mean(dim=0), ring)[rings]
        return Spectrum(power, radius, radii, log_power.exp(),
                        _half_slope(radii, mean_log_power),
                        tuple(_half_slope(radii, lp) for lp in log_power), n, self.frames, cross)


def _ring_log_means(values: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """Per ring number: the mean of ``log(values)`` over the ring's bins (``-inf`` if a value is 0);
    ``nan`` for ring 0 (DC) and for empty rings."""
    size = int(ring.max()) + 1
    count = torch.bincount(ring.reshape(-1), minlength=size).double()
    total = torch.bincount(ring.reshape(-1), weights=values.reshape(-1).log(), minlength=size)
    means = total / count
    means[count == 0] = math.nan
    means[0] = math.nan
    return means


def _half_slope(radii: torch.Tensor, log_power: torch.Tensor) -> float:
    """Half the least-squares slope of ``log_power`` against ``log(radii)`` over the finite points,
    ``nan`` with fewer than 2."""
    keep = torch.isfinite(log_power)
    if int(keep.sum()) < 2:
        return math.nan
    x, y = radii[keep].log(), log_power[keep]
    x = x - x.mean()
    return float((x @ (y - y.mean())) / (x @ x)) / 2


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _check_k(k) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k: expected an integer, got {type(k).__name__}") from None
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    return k


def _check_radius(radius) -> str:
    if radius not in RADIUS_CONVENTIONS:
        raise ValueError(f"radius: must be one of {list(RADIUS_CONVENTIONS)}, got {radius!r}")
    return radius


def fit_channel_pca(data, k: int = 1, *, progress: bool = True, batch_size: int = 256,
                    key: str | None = None) -> ChannelPCA:
    """Principal colour axes of ``data`` for :class:`~anisodiff.Squeeze` (SDM/HDM).

    Args:
        data: iterable of ``[B, C, H, W]`` / ``[B, C, F, H, W]`` batches, a DataLoader, or a path
            to latent files (see the module docstring).
        k: number of axes (``1 <= k <= C``).
        progress: show a progress bar when the number of batches is known.
        batch_size, key: for a path: latents per chunk, and the entry of multi-tensor files.

    Returns a :class:`ChannelPCA`; ``.squeeze(strength)`` builds the Squeeze.
    """
    pca = _PixelCovariance(_check_k(k))
    _accumulate(_as_batches(data, batch_size, key), [pca], progress=progress, desc="channel PCA")
    return pca.result()


def fit_spectrum(data, radius: str = "cycles", *, progress: bool = True, batch_size: int = 256,
                 key: str | None = None) -> Spectrum:
    """Power spectrum of ``data`` and its power-law slope, for the SAGD weights.

    Args:
        data: iterable of ``[B, C, H, W]`` / ``[B, C, F, H, W]`` batches, a DataLoader, or a path
            to latent files (see the module docstring); all images must share one size.
        radius: convention of the reported radii and of :meth:`Spectrum.power_law`'s ``eps``
            (``"cycles"``, ``"nyquist1"``, ``"rmax1"``; alpha does not depend on it). Build the spec
            with the same ``radius``.
        progress: show a progress bar when the number of batches is known.
        batch_size, key: for a path: latents per chunk, and the entry of multi-tensor files.

    Returns a :class:`Spectrum`; ``.power_law()`` and ``.table()`` build the spectral part.
    """
    spectrum = _PowerSpectrum()
    radius = _check_radius(radius)
    _accumulate(_as_batches(data, batch_size, key), [spectrum], progress=progress,
                desc="power spectrum")
    return spectrum.result(radius)


def fit_statistics(data, k: int = 1, radius: str = "cycles", *, progress: bool = True,
                   batch_size: int = 256, key: str | None = None) -> tuple[ChannelPCA, Spectrum]:
    """:func:`fit_channel_pca` and :func:`fit_spectrum` in one pass over ``data`` (batches, a
    DataLoader or a path to latent files; see the module docstring)."""
    pca, spectrum = _PixelCovariance(_check_k(k)), _PowerSpectrum()
    radius = _check_radius(radius)
    _accumulate(_as_batches(data, batch_size, key), [pca, spectrum], progress=progress,
                desc="fitting")
    return pca.result(), spectrum.result(radius)


# ---------------------------------------------------------------------------------------------
# ``anisodiff fit``: a folder, an array or a built-in dataset -> spec.json
# ---------------------------------------------------------------------------------------------
SPECTRAL_CHOICES = ("none", "power_law", "table")


def run(source: str, out, *, k: int = 1, strength: float = -0.4, variant: str = "sdm",
        schedule: str = "beta", spectral: str = "none", eps: float | None = None,
        radius: str = "cycles", size: int | None = None, limit: int | None = None,
        batch_size: int = 256, seed: int = 0, key: str | None = None, report=None,
        snr_threshold: float | None = None, snr_schedule: str = "linear") -> int:
    """``anisodiff fit``: read ``source`` once (:func:`anisodiff.datasets.open_images`: images,
    arrays, cached latents or a built-in), fit the principal colour axes and the power spectrum,
    print them with the per-channel statistics and write the spec (the SDM squeeze on the fitted
    axes, plus the spectral part ``spectral`` asks for) to ``out``; ``report``: also write every
    statistic as JSON. Then the terminal SNR of the written spec on the data (the ``snr_schedule``
    VP schedule) is checked: one warning line on stderr per band or principal direction above
    ``snr_threshold`` (default :data:`anisodiff.diagnostics.SNR_THRESHOLD`). A bad source or option
    raises :class:`~anisodiff._argtypes.UsageError`. Returns the exit code."""
    from pathlib import Path

    from . import datasets, diagnostics
    from ._argtypes import UsageError

    if eps is not None and spectral != "power_law":
        raise UsageError("--eps applies only to --spectral power_law")
    threshold = diagnostics.SNR_THRESHOLD if snr_threshold is None else snr_threshold
    try:
        data = datasets.open_images(source, size=size, limit=limit, seed=seed, key=key)
        if isinstance(data, datasets.LatentFiles):
            batches = data.batches(batch_size)
        else:
            if key is not None:
                raise datasets.DataError("--key applies only to latent files")
            batches = torch.utils.data.DataLoader(data, batch_size=batch_size)
        pca, spectrum = fit_statistics(batches, k=k, radius=radius)
        spec = _fitted_spec(pca, spectrum, strength, variant, schedule, spectral, eps, radius)
        stats = diagnostics.DataStatistics.from_fit(pca, spectrum)
        snr = diagnostics.terminal_snr(spec, diagnostics.named_schedule(snr_schedule), stats)
    except ValueError as exc:  # datasets.DataError, k > C, heisenberg with k = C, bad eps ...
        raise UsageError(str(exc)) from None
    spec.save(Path(out))
    _print_fit(source, radius, spectral, pca, spectrum, spec, out)
    _print_snr(snr, threshold, snr_schedule)
    if report is not None:
        _write_report(Path(report), source, pca, spectrum, stats, snr, threshold, snr_schedule)
        print(f"wrote {report}: the statistics as JSON")
    diagnostics.print_warnings(snr, threshold, "fit")
    return 0


def _fitted_spec(pca, spectrum, strength, variant, schedule, spectral, eps, radius):
    """The spec the options ask for, from the fitted statistics."""
    squeeze = pca.squeeze(strength, variant, schedule)
    part = None
    if spectral == "power_law":
        part = spectrum.power_law(eps)
    elif spectral == "table":
        part = spectrum.table()
    return NoiseSpec(squeeze, part, radius=radius)


MAX_LISTED_CHANNELS = 16  # the per-channel table lists this many (the --report has all)


def _print_fit(source: str, radius: str, spectral: str, pca, spectrum, spec, out) -> None:
    C, H, W = spectrum.power.shape
    share = pca.eigenvalues / pca.eigenvalues.sum()
    if spectrum.frames:
        what = (f"{spectrum.images // spectrum.frames:,} videos of {C}x{spectrum.frames}x{H}x{W} "
                f"({spectrum.images:,} frames)")
    else:
        what = f"{spectrum.images:,} images of {C}x{H}x{W}"
    print(f"anisodiff fit: {what} from {source} ({pca.count:,} pixels)")
    print(f"  mean pixel:  {_vector(pca.mean)}")
    print("  eigenvalues: " + "  ".join(f"{e:.4g} ({100 * p:.1f}%)" for e, p in
                                        zip(pca.eigenvalues[:MAX_LISTED_CHANNELS].tolist(),
                                            share[:MAX_LISTED_CHANNELS].tolist()))
          + ("  ..." if C > MAX_LISTED_CHANNELS else ""))
    for i in range(pca.axes.shape[1]):
        print(f"  axis v{i + 1}:     {_vector(pca.axes[:, i])}  (sign: largest component > 0)")
    per_channel = ", ".join(f"{a:.3f}" for a in spectrum.channel_alpha[:MAX_LISTED_CHANNELS])
    print(f"  spectrum:    P(r) ~ r^(2 alpha), alpha = {spectrum.alpha:.3f} (per channel "
          f"{per_channel}{', ...' if C > MAX_LISTED_CHANNELS else ''}); least squares over "
          f"{spectrum.radii.numel()} radial bins, r = {float(spectrum.radii[0]):.3g}.."
          f"{float(spectrum.radii[-1]):.3g} ({radius}), DC excluded")
    _print_channels(pca, spectrum)
    if spectral == "none":
        print(textwrap.fill(
            "  spectral part: none (the default). To make the noise follow the data spectrum use "
            "--spectral power_law or table; the SAGD papers gained with mild tilts, |alpha| <= 0.08.",
            width=100, subsequent_indent="  "))
    print(f"wrote {out}: {spec!r}")


def _print_channels(pca, spectrum) -> None:
    """Per channel: mean, std, fitted alpha and the radial power at the lowest, middle and highest
    ring (what the squeeze and the spectral part are built from)."""
    radial = spectrum.radial_power
    rings = sorted({0, radial.shape[1] // 2, radial.shape[1] - 1})
    radii = "  ".join(f"P(r={float(spectrum.radii[i]):.3g})" for i in rings)
    print(f"  per channel: mean, std, alpha, radial power {radii}")
    C = radial.shape[0]
    for c in range(min(C, MAX_LISTED_CHANNELS)):
        powers = "  ".join(f"{float(radial[c, i]):.4g}" for i in rings)
        print(f"    c{c:<3d} {float(pca.mean[c]):+.4f}  {float(pca.std[c]):.4f}  "
              f"{spectrum.channel_alpha[c]:+.3f}  {powers}")
    if C > MAX_LISTED_CHANNELS:
        print(f"    ... {C - MAX_LISTED_CHANNELS} more channels (--report writes them all)")


def _print_snr(snr, threshold: float, schedule: str) -> None:
    band, direction = snr.terminal_band_snr, snr.terminal_direction_snr
    worst_band, worst_dir = int(band.argmax()), int(direction.argmax())
    verdict = ("ok" if not snr.offenders(threshold)
               else f"{len(snr.offenders(threshold))} above, see the warnings")
    joint = ("" if snr.terminal_joint_snr is None else
             f", over (band, direction) pairs {float(snr.terminal_joint_snr.max()):.3g}")
    print(f"  terminal SNR at t = {snr.T - 1} ({schedule} VP schedule, T = {snr.T}) of this spec "
          f"on this data: max over bands {float(band[worst_band]):.3g} (ring {worst_band}), over "
          f"principal directions {float(direction[worst_dir]):.3g} (v{worst_dir + 1}){joint}; "
          f"threshold {threshold:g}: {verdict}")


def _write_report(path, source, pca, spectrum, stats, snr, threshold, schedule) -> None:
    """Every fitted statistic as JSON; ``data_statistics`` is what ``anisodiff show --stats``
    reads."""
    C, H, W = spectrum.power.shape
    report = {
        "format": "anisodiff.FitReport", "version": 1, "source": str(source),
        "shape": [C, spectrum.frames, H, W] if spectrum.frames else [C, H, W],
        "planes": spectrum.images, "frames": spectrum.frames, "pixels": pca.count,
        "channels": {"mean": pca.mean.tolist(), "std": pca.std.tolist(),
                     "alpha": list(spectrum.channel_alpha),
                     "dc_power": spectrum.power[:, 0, 0].tolist()},
        "pca": {"eigenvalues": pca.eigenvalues.tolist(), "axes": pca.axes.tolist()},
        # the covariance is data_statistics.covariance
        "spectrum": {"radius": spectrum.radius, "alpha": spectrum.alpha,
                     "radii": spectrum.radii.tolist(),
                     "radial_power": spectrum.radial_power.tolist()},
        "data_statistics": stats.to_dict(),
        "terminal_snr": {"schedule": schedule, "t": snr.T - 1, "threshold": threshold,
                         "band_radius": snr.band_radius.tolist(),
                         "band_snr": _finite_list(snr.terminal_band_snr),
                         "direction_snr": _finite_list(snr.terminal_direction_snr),
                         "band_direction_snr": None if snr.terminal_joint_snr is None else
                         [_finite_list(row) for row in snr.terminal_joint_snr],
                         "warnings": snr.warnings(threshold)},
    }
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def _finite_list(values: torch.Tensor) -> list:
    """JSON has no inf: an infinite SNR (a band without noise) is written as null."""
    return [v if math.isfinite(v) else None for v in values.tolist()]


def _vector(v: torch.Tensor) -> str:
    shown = ", ".join(f"{x:+.4f}" for x in v[:MAX_LISTED_CHANNELS].tolist())
    return "[" + shown + (", ..." if v.numel() > MAX_LISTED_CHANNELS else "") + "]"
