"""The specification: every anisodiff op in plain PyTorch, written for clarity, not speed.

Every kernel (C++ CPU, CUDA, Triton) is tested against these functions on the same noise stream.
Formulas follow docs/design.md and docs/papers.md:

* noise stream: Philox4x32-10 exactly as Triton's ``tl.randn4x`` (docs/design.md section 2);
* spatial part (SAGD): ``T_w eps = c Re(ifft2(w * fft2(eps)))`` on the unshifted fftfreq grid;
* channel part (SDM/HDM): ``S(t) = I + sum_k (exp(-r_k) - 1) v_k v_k^T`` or the det-1 Heisenberg form;
* forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n`` with ``n = A(t) eps``.

Math runs in float64 (the white stream itself is float32, as on every backend); results are cast to
the caller's dtype at the end.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .pyramid import expected_power as _pyramid_power
from .pyramid import pyramid_noise_like  # noqa: F401 - the trainers' exact recipe, part of the spec
from .spec import Band, NoiseSpec, PowerLaw, PyramidNoise, SpectralTable, Squeeze, TwoBand

__all__ = [
    "philox4x32_10", "uint32_to_uniform", "box_muller", "randn4x", "white_noise",
    "radius", "spectral_weights", "calibration", "filter_planes", "spatial_noise",
    "squeeze_profile", "squeeze_strengths", "squeeze_matrices", "apply_operator",
    "shaped_noise", "add_noise", "perturbation_noise", "covariance", "TARGETS",
    "pyramid_noise_like",
    "mixing_coefficients", "is_flow", "flow_squeeze_profile", "flow_velocity", "flow_euler_step",
]

TARGETS = ("epsilon", "v", "x0", "flow")

# ---------------------------------------------------------------------------------------------
# 1. The noise stream (bit-compatible with triton.language.randn4x)
# ---------------------------------------------------------------------------------------------
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * x`` for a uint32 constant and uint32 values held in int64.
    Split into 16-bit halves so no intermediate leaves int64."""
    x_hi, x_lo = x >> 16, x & _M16
    p_lo = a * x_lo                      # < 2^48
    p_hi = a * x_hi                      # < 2^48
    high = (p_hi + (p_lo >> 16)) >> 16   # floor(a * x / 2^32)
    low = (p_lo + ((p_hi & _M16) << 16)) & _M32
    return high, low


def philox4x32_10(seed: int, c0, c1, c2, c3):
    """Philox4x32 with 10 rounds, key ``(seed_lo32, seed_hi32)``. Counter words are int64 tensors
    (or ints) holding uint32 values; returns four int64 tensors of uint32 values."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: reinterpret as int32, fold the sign
    (``x < 0 ? -x - 1 : x``) and scale by 4.6566127342e-10 in float32, giving [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` in float32."""
    u1 = torch.clamp_min(u1, torch.tensor(1.0e-7, dtype=torch.float32))
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def randn4x(seed: int, counters: torch.Tensor, draw: int = 0):
    """Four N(0, 1) float32 values per 64-bit counter: ``tl.randn4x(seed, counters)`` for
    ``draw = 0``. ``draw`` goes into the third counter word and gives independent streams."""
    counters = torch.as_tensor(counters, dtype=torch.int64)
    words = philox4x32_10(seed, counters & _M32, (counters >> 32) & _M32, draw, 0)
    u = [uint32_to_uniform(w) for w in words]
    n1, n2 = box_muller(u[0], u[1])
    n3, n4 = box_muller(u[2], u[3])
    return n1, n2, n3, n4


def white_noise(shape: Sequence[int], seed: int, offset: int = 0, draw: int = 0,
                device=None) -> torch.Tensor:
    """The canonical white stream: element ``i`` (row-major in ``shape``) is lane ``i & 3`` of
    ``randn4x(seed, offset + (i >> 2))``."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    counters = offset + torch.arange((n + 3) // 4, dtype=torch.int64)
    lanes = torch.stack(randn4x(seed, counters, draw), dim=-1).reshape(-1)[:n]
    return lanes.reshape(shape).to(device)


# ---------------------------------------------------------------------------------------------
# 2. Spatial part (SAGD)
# ---------------------------------------------------------------------------------------------
def radius(H: int, W: int, convention: str = "cycles") -> torch.Tensor:
    """Radial frequency ``[H, W]`` (float64) on the unshifted ``fftfreq`` grid.
    ``"cycles"``: cycles/pixel (<= 0.7071); ``"nyquist1"``: 2r; ``"rmax1"``: r / r.max()."""
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    return _in_convention(torch.sqrt(fx**2 + fy**2), convention)


def spatiotemporal_radius(F: int, H: int, W: int, convention: str = "cycles") -> torch.Tensor:
    """The radius ``[F, H, W]`` of the spatio-temporal spectrum (``NoiseSpec(temporal=True)``):
    ``sqrt(f_t^2 + f_y^2 + f_x^2)`` with each axis on its own unshifted ``fftfreq`` grid (cycles per
    frame, per pixel), in the same ``convention`` as :func:`radius` (``"rmax1"`` divides by the
    largest 3-D radius). F = 1 has only ``f_t = 0``: exactly the 2-D radius of one frame."""
    ft = torch.fft.fftfreq(F, dtype=torch.float64)[:, None, None]
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[None, :, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, None, :]
    return _in_convention(torch.sqrt(ft**2 + fy**2 + fx**2), convention)


def _in_convention(r: torch.Tensor, convention: str) -> torch.Tensor:
    if convention == "cycles":
        return r
    if convention == "nyquist1":
        return 2.0 * r
    if convention == "rmax1":
        rmax = r.max()
        return r / rmax if rmax > 0 else r
    raise ValueError(f"radius: unknown convention {convention!r}")


def _mask(r: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    a, b = band
    return ((r >= a) & (r <= b)).to(torch.float64)


def spectral_weights(spec: NoiseSpec, H: int, W: int,
                     frames: int | None = None) -> tuple[torch.Tensor, list[float]] | None:
    """The raw weights ``[D, H, W]`` (float64, before normalisation) and the per-draw mixing
    gammas, or None when the spec has no spatial part. A spatio-temporal spec
    (``spec.temporal``) needs ``frames`` and gives ``[D, frames, H, W]`` weights over
    (f_t, f_y, f_x)."""
    sp = spec.spectral
    if sp is None:
        return None
    frames = _temporal_frames(spec, frames)
    r = radius(H, W, spec.radius) if frames is None else spatiotemporal_radius(frames, H, W, spec.radius)
    grid = f"{H}x{W}" if frames is None else f"{frames}x{H}x{W} (F x H x W)"
    if isinstance(sp, PowerLaw):
        planes, gammas = [(r + sp.eps) ** sp.alpha], [1.0]
    elif isinstance(sp, Band):
        planes, gammas = [_mask(r, (sp.a, sp.b))], [1.0]
    elif isinstance(sp, TwoBand):
        low, high = _mask(r, sp.low), _mask(r, sp.high)
        for gamma, mask, name in ((sp.gamma_low, low, "low"), (sp.gamma_high, high, "high")):
            if gamma > 0 and not (mask > 0).any():  # in either mixture: almost surely a unit mistake
                raise ValueError(f"spectral: the {name} band {getattr(sp, name)} of {sp!r} selects no "
                                 f"frequency bin on a {grid} grid with radius={spec.radius!r}")
        if sp.mixture == "shared":
            planes, gammas = [sp.gamma_low * low + sp.gamma_high * high], [1.0]
        else:
            planes, gammas = [low, high], [sp.gamma_low, sp.gamma_high]
    elif isinstance(sp, SpectralTable):
        if sp.shape != (H, W):
            raise ValueError(f"spectral: SpectralTable is {sp.shape[0]}x{sp.shape[1]} but the noise "
                             f"planes are {H}x{W}")
        planes, gammas = [sp.weights.to(torch.float64)], [1.0]
    elif isinstance(sp, PyramidNoise):  # the expected power spectrum of the trainers' recipe
        planes, gammas = [_pyramid_power(H, W, sp.iterations, sp.discount).sqrt()], [1.0]
    else:  # pragma: no cover - NoiseSpec validates the type
        raise TypeError(f"spectral: unsupported {type(sp).__name__}")
    for plane, gamma in zip(planes, gammas):
        if gamma > 0 and not (plane > 0).any():
            raise ValueError(f"spectral: {sp!r} selects no frequency bin on a {grid} grid with "
                             f"radius={spec.radius!r}")
    return torch.stack(planes), gammas


def _temporal_frames(spec: NoiseSpec, frames: int | None) -> int | None:
    """The frame count of a spatio-temporal spec's weight grid (None for a per-frame spec)."""
    if not spec.temporal:
        return None
    if frames is None:
        raise ValueError("spec.temporal: the spatio-temporal spectrum filters F x H x W video volumes; "
                         "this operation works on H x W planes only (the spatio-temporal spectrum is "
                         "implemented by add_noise, shaped_noise, apply_operator and covariance on "
                         "[B, C, F, H, W] tensors)")
    return int(frames)


def spatial_stages(spec: NoiseSpec, H: int, W: int,
                   frames: int | None = None) -> list[tuple[torch.Tensor | None, float]] | None:
    """Per white draw d: ``(w_d, gamma_d)``, the weight actually applied (calibration folded in for
    ``normalize="calibrated"``) and the gain after normalisation; None without a spatial part.

    ``w_d`` is None when the weight is constant: a constant weight is a scalar gain, not a
    transform, so ``PowerLaw(0)`` is white noise exactly. Its gain is then folded into gamma_d
    (except under per-sample normalisation, which divides any gain out).

    A spatio-temporal spec (``spec.temporal``) needs ``frames``; its ``w_d`` are ``[frames, H, W]``.
    """
    if spec.spectral is None and spec.offset is None:
        return None  # (no filter, per-frame or not)
    frames = _temporal_frames(spec, frames)
    grid = (H, W) if frames is None else (frames, H, W)
    sw = spectral_weights(spec, H, W, frames)
    if sw is None:
        if spec.offset is None:
            return None
        sw = torch.ones(1, *grid, dtype=torch.float64), [1.0]  # white, plus the offset below
    weights, gammas = sw
    stages = []
    for w, gamma in zip(weights, gammas):
        if gamma == 0:  # contributes nothing (its band may even be empty): no transform
            stages.append((None, 0.0))
            continue
        if spec.normalize == "calibrated":
            w = w * calibration(w)
        if bool((w == w.flatten()[0]).all()):
            gain = 1.0 if spec.normalize == "per_sample" else float(w.flatten()[0])
            stages.append((None, gamma * gain))
        else:
            stages.append((w, gamma))
    if spec.offset is not None:
        if spec.offset.random_strength:
            raise ValueError("offset: random_strength=True draws a new strength every training step; "
                             "pass the step's spec, spec.draw_offset(generator), to the op")
        stages = _with_offset(stages, spec.offset.strength, grid)
    return stages


def _with_offset(stages, strength: float, grid: tuple[int, ...]):
    """Offset noise as DC power: the first contributing stage's DC weight w0 becomes
    ``sqrt(w0^2 + strength^2 N / gamma^2)`` (N = H W, or F H W for a spatio-temporal volume), which
    adds variance ``strength^2`` per pixel, fully correlated over the plane (volume): the DC bin of
    ``T_w eps`` is ``w0 mean(eps)``, variance ``w0^2 / N``."""
    out = list(stages)
    dc = (0,) * len(grid)
    for d, (w, gamma) in enumerate(out):
        if gamma == 0:
            continue
        if w is None:  # a scalar gain: as a constant table (gamma keeps the gain)
            w = torch.ones(grid, dtype=torch.float64)
        w = w.clone()
        w[dc] = math.sqrt(float(w[dc]) ** 2 + strength**2 * math.prod(grid) / gamma**2)
        out[d] = (w, gamma)
        return out
    raise ValueError("offset: the spectral part contributes no draw to add it to")  # pragma: no cover


def calibration(w: torch.Tensor) -> float:
    """``c = mean(w^2)^-1/2``: unit mean per-pixel variance of ``c T_w eps``."""
    return float((w.double() ** 2).mean().rsqrt())


def filter_parts(x: torch.Tensor, w: torch.Tensor, ndim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``Re(ifftn(w * fftn(x)))`` over the last ``ndim`` dims (float64; 2: H x W planes, 3: the
    F x H x W volumes of the spatio-temporal spectrum) as its two parts: every bin but DC through the
    FFT, and the DC bin as ``w[0, .., 0] * mean(x)`` per plane (shape ``[..., 1, 1]``).

    DC is its own bin: its weight is applied outside the FFT, so one huge DC weight (the papers'
    ``(1e-10)^alpha`` floor, offset noise) never costs the other bins any accuracy."""
    x = x.double()
    w = w.double()
    dims = tuple(range(-ndim, 0))
    dc = w[(..., *([slice(0, 1)] * ndim))] * x.mean(dim=dims, keepdim=True)
    if x.numel() == 0:  # (MKL's FFT rejects empty batches)
        return x, dc
    w_ac = w.clone()
    w_ac[(..., *([0] * ndim))] = 0.0
    return torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * w_ac, dim=dims).real, dc


def filter_planes(x: torch.Tensor, w: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """``Re(ifftn(w * fftn(x)))`` over the last ``ndim`` dims (float64)."""
    ac, dc = filter_parts(x, w, ndim)
    return ac + dc


def _normalize_per_sample(x: torch.Tensor, dc: torch.Tensor | float = 0.0, ndim: int = 2) -> torch.Tensor:
    """The SAGD appendix code: divide each (b, c) plane ``x + dc`` by its spatial std (ddof = 0) +
    1e-8 (each F x H x W volume for ``ndim = 3``). The std is taken from ``x`` alone (a constant
    ``dc`` does not change it), so a DC term far larger than the rest costs it no accuracy."""
    return (x + dc) / (x.std(dim=tuple(range(-ndim, 0)), keepdim=True, correction=0) + 1e-8)


def spatial_noise(draws: torch.Tensor, spec: NoiseSpec) -> torch.Tensor:
    """``sum_d gamma_d N(c_d T_{w_d} eps_d)`` for white draws ``[D, B, C, H, W]`` or
    ``[D, B, C, F, H, W]`` (float64 out); a spatio-temporal spec filters each F x H x W volume."""
    H, W = draws.shape[-2:]
    frames, ndim = None, 2
    if spec.temporal:
        if draws.dim() != 6:
            raise ValueError("spec.temporal: the spatio-temporal spectrum needs video tensors "
                             f"[B, C, F, H, W], got {draws.dim() - 1}-D noise of shape "
                             f"{list(draws.shape[1:])} (use temporal=False for images)")
        frames, ndim = draws.shape[-3], 3
    stages = spatial_stages(spec, H, W, frames) or [(None, 1.0)]
    if draws.shape[0] != len(stages):
        raise ValueError(f"noise: this spec consumes {len(stages)} white draw(s), got {draws.shape[0]}")
    out = torch.zeros(draws.shape[1:], dtype=torch.float64, device=draws.device)
    for d, (w, gamma) in enumerate(stages):
        x, dc = draws[d].double(), 0.0
        if w is not None:
            x, dc = filter_parts(x, w.to(draws.device), ndim)
        if spec.normalize == "per_sample":
            x = _normalize_per_sample(x, dc, ndim)
        else:
            x = x + dc
        out += gamma * x
    return out


# ---------------------------------------------------------------------------------------------
# 3. Channel part (SDM / HDM)
# ---------------------------------------------------------------------------------------------
def squeeze_profile(squeeze: Squeeze, schedule) -> torch.Tensor:
    """``tau(t)`` for t = 0..T-1 (float64): ``beta_t / beta_max`` (default), 1, ``t / (T-1)`` or
    the user's table. A constant profile without a schedule has one entry (valid for every t)."""
    T = None if schedule is None else schedule.betas.numel()
    if not isinstance(squeeze.schedule, str):
        if T is not None and squeeze.schedule.numel() != T:
            raise ValueError(f"schedule: the squeeze table has {squeeze.schedule.numel()} entries but the "
                             f"diffusion schedule has T={T}")
        return squeeze.schedule.double()
    if squeeze.schedule == "constant":
        return torch.ones(1 if T is None else T, dtype=torch.float64)
    if schedule is None:
        raise ValueError(f"schedule: required for the squeeze schedule {squeeze.schedule!r}")
    betas = schedule.betas.double()
    if squeeze.schedule == "beta":
        return betas / betas.max()
    return torch.arange(T, dtype=torch.float64) / max(T - 1, 1)


def squeeze_strengths(squeeze: Squeeze, timesteps, schedule) -> torch.Tensor:
    """``r[b, k] = s_k tau(t_b)`` (float64 ``[B, k]``)."""
    if squeeze.is_identity:  # s = 0: r = 0 at every t, no profile (or schedule) needed, as in the kernels
        n = 1 if timesteps is None else torch.as_tensor(timesteps).reshape(-1).numel()
        return torch.zeros(n, squeeze.k, dtype=torch.float64)
    if is_flow(schedule):  # flow matching: ``timesteps`` are the float sigmas (section 6 below)
        return flow_squeeze_strengths(squeeze, timesteps, schedule)
    tau = squeeze_profile(squeeze, schedule)
    s = torch.tensor(squeeze.strength, dtype=torch.float64)
    if timesteps is None:
        if squeeze.time_varying and not squeeze.is_identity:
            raise ValueError("timesteps: required, the squeeze strength varies with t")
        return s[None, :] * tau[0]
    t = torch.as_tensor(timesteps).reshape(-1).long().cpu()
    if tau.numel() == 1:  # time-independent: every t reads the single entry
        t = torch.zeros_like(t)
    return tau[t][:, None] * s[None, :]


def squeeze_matrices(squeeze: Squeeze, r: torch.Tensor) -> torch.Tensor:
    """``S [B, C, C]`` for strengths ``r [B, k]``.

    SDM: ``S = I + V diag(exp(-r) - 1) V^T``. Heisenberg: ``S = g (I - V V^T) + V diag(exp(-r)) V^T``
    with ``g = exp(sum_k r_k / (C - k))``, so ``det S = 1``.
    """
    V = squeeze.axes.double()
    C, k = V.shape
    eye = torch.eye(C, dtype=torch.float64)
    f = torch.exp(-r)
    if squeeze.variant == "sdm":
        g = torch.ones(r.shape[0], dtype=torch.float64)
    else:
        g = torch.exp(r.sum(dim=1) / (C - k))
    # Written as g I + V diag(f - g) V^T: at s = 0, f - g is exactly 0, so S is exactly I.
    return g[:, None, None] * eye + torch.einsum("ck,bk,dk->bcd", V, f - g[:, None], V)


# ---------------------------------------------------------------------------------------------
# 4. The ops
# ---------------------------------------------------------------------------------------------
def _as_draws(eps: torch.Tensor, spec: NoiseSpec) -> torch.Tensor:
    """``[D, B, C, H, W]`` or ``[D, B, C, F, H, W]`` (video: docs/design.md section 6)."""
    if spec.draws == 1:
        if eps.dim() not in (4, 5):
            raise ValueError(f"eps: expected [B, C, H, W] or [B, C, F, H, W], got shape {tuple(eps.shape)}")
        return eps[None]
    if eps.dim() not in (5, 6) or eps.shape[0] != spec.draws:
        raise ValueError(f"eps: an independent two-band spec consumes two white draws, expected "
                         f"[2, B, C, H, W] or [2, B, C, F, H, W], got shape {tuple(eps.shape)}")
    return eps


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` vector shaped to broadcast over ``like`` (``[B, C, H, W]`` or
    ``[B, C, F, H, W]``)."""
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.device)


def _apply(eps: torch.Tensor, spec: NoiseSpec, timesteps, schedule) -> torch.Tensor:
    """``A(t) eps`` in float64."""
    n = spatial_noise(_as_draws(eps, spec), spec)
    sq = spec.squeeze
    if sq is not None:
        if sq.channels != n.shape[1]:
            raise ValueError(f"squeeze: axes have C={sq.channels} rows but the noise has "
                             f"{n.shape[1]} channels")
        r = squeeze_strengths(sq, timesteps, schedule)
        S = squeeze_matrices(sq, r).to(n.device)
        if S.shape[0] == 1:
            S = S.expand(n.shape[0], -1, -1)
        n = torch.einsum("bij,bj...->bi...", S, n)  # per pixel (and frame): the squeeze acts on C
    return n


def apply_operator(eps: torch.Tensor, spec: NoiseSpec, timesteps=None, schedule=None) -> torch.Tensor:
    """``A(t) eps`` for given white ``eps`` (``[B, C, H, W]``, or ``[2, B, C, H, W]`` for an
    independent two-band spec), in ``eps``'s dtype."""
    return _apply(eps, spec, timesteps, schedule).to(eps.dtype)


def _white_draws(shape, spec: NoiseSpec, seed: int, offset: int, device=None,
                 first_draw: int = 0) -> torch.Tensor:
    """The spec's white draws ``[D, *shape]``: draw d is counter word 2 = first_draw + d."""
    return torch.stack([white_noise(shape, seed, offset, draw=first_draw + d, device=device)
                        for d in range(spec.draws)])


def perturbation_noise(shape, spec: NoiseSpec, timesteps, schedule, *, seed: int, offset: int,
                       device=None) -> torch.Tensor:
    """The input perturbation ``n' = A(t) eps'`` (DDPM-IP, docs/design.md section 7), float64: the
    same operator as the noise, on the white draws ``eps'_d`` of the same stream ``(seed, offset)``
    and layout with counter word 2 = ``spec.draws + d``."""
    draws = _white_draws(shape, spec, seed, offset, device, first_draw=spec.draws)
    return _apply(draws if spec.draws > 1 else draws[0], spec, timesteps, schedule)


def shaped_noise(shape, spec: NoiseSpec, timesteps=None, schedule=None, *, seed: int = 0,
                 offset: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """``A(t) eps`` with ``eps`` from the canonical stream ``(seed, offset)``; draw ``d`` of an
    independent two-band spec uses counter word 2 = d."""
    draws = _white_draws(shape, spec, seed, offset, device)
    return _apply(draws if spec.draws > 1 else draws[0], spec, timesteps, schedule).to(dtype)


def mixing_coefficients(schedule, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [B], b [B])`` of ``x_t = a x0 + b n`` (float64): ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``
    for integer timesteps of a VP schedule; ``1 - sigma``, ``sigma`` for the float sigmas of a flow
    schedule (rectified flow, section 6 below)."""
    if is_flow(schedule):
        sigma = flow_sigmas(timesteps)
        return 1.0 - sigma, sigma
    t = torch.as_tensor(timesteps).reshape(-1).long().cpu()
    ac = schedule.alphas_cumprod[t]  # 1 - abar in the schedule's float32, as diffusers computes it
    return ac.double().sqrt(), (1.0 - ac).double().sqrt()


def add_noise(x0: torch.Tensor, timesteps, spec: NoiseSpec, schedule, *, noise=None, seed: int = 0,
              offset: int = 0, target: str = "epsilon",
              input_perturbation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = a x0 + b (n + gamma n')`` (:func:`mixing_coefficients`: ``sqrt(abar_t)``,
    ``sqrt(1 - abar_t)``; on a flow schedule ``1 - sigma``, ``sigma``) and the training target, from n
    alone: ``"epsilon"``: n; ``"v"``: ``a n - b x0``; ``"x0"``: x0; ``"flow"``: ``n - x0``.
    ``noise`` is WHITE noise (it is shaped here); by default it comes from the stream.
    ``input_perturbation`` gamma (DDPM-IP): ``n'`` is :func:`perturbation_noise` of the stream
    ``(seed, offset)``, also when ``noise`` is given; gamma = 0 adds nothing."""
    if target not in TARGETS:
        raise ValueError(f"target: must be one of {list(TARGETS)}, got {target!r}")
    if noise is None:
        noise = _white_draws(x0.shape, spec, seed, offset, x0.device)
        noise = noise if spec.draws > 1 else noise[0]
    n = _apply(noise, spec, timesteps, schedule)
    a, b = (_per_sample(c, x0) for c in mixing_coefficients(schedule, timesteps))
    x = x0.double()
    n_in = n
    if input_perturbation != 0:
        n_in = n + input_perturbation * perturbation_noise(x0.shape, spec, timesteps, schedule, seed=seed,
                                                           offset=offset, device=x0.device)
    x_t = a * x + b * n_in
    tgt = {"epsilon": lambda: n, "v": lambda: a * n - b * x,
           "x0": lambda: x, "flow": lambda: n - x}[target]()
    return x_t.to(x0.dtype), tgt.to(x0.dtype)


def _filter_matrices(spec: NoiseSpec, frames: int, H: int, W: int) -> list[tuple[float, torch.Tensor]]:
    """Per white draw ``(gamma, T)``: T the dense filter of one (b, c) channel's F H W values
    (column j = response to element j). Per frame: ``I_F (x) T_hw``; spatio-temporal: the 3-D
    filter of the whole F x H x W volume."""
    ndim, grid = (3, (frames, H, W)) if spec.temporal else (2, (H, W))
    N = math.prod(grid)
    basis = torch.eye(N, dtype=torch.float64).reshape(N, 1, *grid)
    out = []
    for w, gamma in spatial_stages(spec, H, W, frames if spec.temporal else None) or [(None, 1.0)]:
        T = torch.eye(N, dtype=torch.float64) if w is None else filter_planes(basis, w, ndim).reshape(N, N).T
        if not spec.temporal and frames > 1:
            T = torch.kron(torch.eye(frames, dtype=torch.float64), T.contiguous())
        out.append((gamma, T))
    return out


def covariance(spec: NoiseSpec, shape, timesteps=None, schedule=None) -> torch.Tensor:
    """Dense ``Sigma = A A^T`` (float64) of one flattened ``[C, H, W]`` noise sample (``shape`` is
    ``[C, H, W]`` or ``[B, C, H, W]``), or of one ``[C, F, H, W]`` video sample when ``shape`` is
    ``[B, C, F, H, W]``: ``Sigma = S S^T (x) I_F (x) Sigma_w`` (frames are independent, each
    filtered alone); for a spatio-temporal spec (``spec.temporal``) ``Sigma = S S^T (x) Sigma_w3``
    with ``Sigma_w3`` the 3-D filter's covariance over each (b, c) F x H x W volume.
    ``[N, N]`` for a scalar/None timestep, ``[B, N, N]`` for a 1-D tensor of timesteps.

    Defined for the linear normalisations ("calibrated", "none"); per-sample normalisation makes
    the noise non-Gaussian, so it has no covariance in closed form.
    """
    if spec.normalize == "per_sample":
        raise ValueError("spec.normalize: 'per_sample' normalisation is not linear; covariance() "
                         "is defined for 'calibrated' and 'none'")
    C, H, W = (tuple(shape)[-3:])
    frames = 1
    if len(tuple(shape)) == 5:
        C, frames = tuple(shape)[1:3]
    elif spec.temporal:
        raise ValueError(f"shape: the spatio-temporal spectrum (spec.temporal) needs a video shape "
                         f"[B, C, F, H, W], got {list(shape)}")
    spatial = _filter_matrices(spec, frames, H, W)
    batched = timesteps is not None and torch.as_tensor(timesteps).dim() == 1
    ts = torch.as_tensor(timesteps).reshape(-1) if timesteps is not None else None
    if spec.squeeze is None:
        S = torch.eye(C, dtype=torch.float64)[None]
    else:
        if spec.squeeze.channels != C:
            raise ValueError(f"shape: has C={C} channels but the squeeze axes have "
                             f"{spec.squeeze.channels} rows")
        S = squeeze_matrices(spec.squeeze, squeeze_strengths(spec.squeeze, ts, schedule))
    out = []
    for Sb in S:
        SS = Sb @ Sb.T
        out.append(sum(g * g * torch.kron(SS, T @ T.T) for g, T in spatial))
    sigma = torch.stack(out)
    if not batched:
        return sigma[0]
    return sigma.expand(ts.numel(), -1, -1) if sigma.shape[0] == 1 else sigma


# ---------------------------------------------------------------------------------------------
# 5. Sampling (docs/design.md section 1, "Sampling")
#
# S(t) = g(t) (I - V V^T) + sum_k f_k(t) v_k v_k^T has the same eigenbasis for every t, and the
# spatial covariance Sigma_w is time-invariant, so the reverse process splits into one scalar DDPM
# per channel eigen-direction j with noise scale lambda_j(t) in {g(t), f_k(t)}; every channel
# matrix below has the form  diag_c(e_perp, e_axes) = e_perp I + V diag(e_axes - e_perp) V^T.
# ---------------------------------------------------------------------------------------------
SAMPLING_MODES = ("official", "exact")


def squeeze_eigenvalues(spec: NoiseSpec, timesteps, schedule, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_perp [B], lambda_axes [B, k])``: the eigenvalues of S(t) on the orthogonal
    complement and on the axes (k = 0 and lambda = 1 without a squeeze). A timestep < 0 (the step
    past t = 0) gives S = I."""
    sq = spec.squeeze
    if sq is None:
        return torch.ones(batch, dtype=torch.float64), torch.ones(batch, 0, dtype=torch.float64)
    t = torch.as_tensor(timesteps).reshape(-1).long().cpu().expand(batch)
    r = squeeze_strengths(sq, t.clamp_min(0), schedule) * (t >= 0).double()[:, None]
    C, k = sq.axes.shape
    g = torch.exp(r.sum(dim=1) / (C - k)) if sq.variant == "heisenberg" else torch.ones(batch, dtype=torch.float64)
    return g, torch.exp(-r)


def channel_matrix(spec: NoiseSpec, e_perp: torch.Tensor, e_axes: torch.Tensor, channels: int) -> torch.Tensor:
    """``[B, C, C]`` matrix with eigenvalue e_perp on the complement of the axes and e_axes on them."""
    eye = torch.eye(channels, dtype=torch.float64)
    if spec.squeeze is None or e_axes.shape[1] == 0:
        return e_perp[:, None, None] * eye
    V = spec.squeeze.axes.double()
    return e_perp[:, None, None] * eye + torch.einsum("ck,bk,dk->bcd", V, e_axes - e_perp[:, None], V)


def _channels(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bij,bj...->bi...", M.to(x.device), x)


def _spatial_spec(spec: NoiseSpec) -> NoiseSpec:
    return spec.spatial_part()


def _alphas(schedule, timesteps, batch: int):
    """abar_t and abar_prev (1 past the end) as float64 [B]."""
    ac = schedule.alphas_cumprod.double()
    t = torch.as_tensor(timesteps).reshape(-1).long().cpu().expand(batch)
    return ac[t.clamp_min(0)] * (t >= 0) + (t < 0).double()


def _step_inputs(model_output, timestep, sample, schedule, prev_timestep):
    """Timesteps (``prev`` defaults to ``t - 1``), abar_t and abar_prev ([B] float64), the float64
    sample and model output, and ``x0_hat = (x - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``."""
    B = sample.shape[0]
    t = torch.as_tensor(timestep).reshape(-1).long().cpu().expand(B)
    prev = t - 1 if prev_timestep is None else torch.as_tensor(prev_timestep).reshape(-1).long().cpu().expand(B)
    ab_t, ab_p = _alphas(schedule, t, B), _alphas(schedule, prev, B)
    x, eps_hat = sample.double(), model_output.double()
    x0_hat = (x - _per_sample((1 - ab_t).sqrt(), x) * eps_hat) / _per_sample(ab_t.sqrt(), x)
    return t, prev, ab_t, ab_p, x, eps_hat, x0_hat


def ddpm_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, spec: NoiseSpec, schedule, *,
              prev_timestep=None, noise=None, mode: str = "official", clip_sample: bool = True,
              clip_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM step ``x_t -> x_prev`` for a network that predicts the SHAPED noise.

    ``timestep``/``prev_timestep``: ints or ``[B]`` (default ``t - 1``; strided schedules pass
    their own). ``noise``: WHITE noise for the fresh draw (``[2, ...]`` for an independent two-band
    spec), ignored at the last step. Returns ``(x_prev, x0_hat)`` in ``sample``'s dtype.

    ``mode="official"`` is the SDM code (docs/papers.md section 1.4): isotropic DDPM posterior
    coefficients, fresh noise ``sigma_t A(t) z``, x0_hat clipped in ``S(t)^-1`` coordinates.
    ``mode="exact"``: the exact Gaussian posterior of the time-varying marginal, per eigen-direction
    ``s_t = sqrt(1 - abar_t) lambda(t)``: ``delta = s_t^2 - alpha' s_prev^2``,
    ``mean = sqrt(abar_prev) delta / s_t^2 x0_hat + sqrt(alpha') s_prev^2 / s_t^2 x_t``,
    ``var = s_prev^2 delta / s_t^2`` (delta clamped at 0), x0_hat clipped as is. For a
    time-invariant spec both modes are standard DDPM with shaped step noise.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode: must be one of {list(SAMPLING_MODES)}, got {mode!r}")
    B, C = sample.shape[:2]
    t, prev, ab_t, ab_p, x, eps_hat, x0_hat = _step_inputs(model_output, timestep, sample, schedule,
                                                           prev_timestep)
    k = ddpm_coefficients(spec, schedule, t, prev, mode)
    if clip_sample:
        if mode == "official":  # clip in S(t)^-1 coordinates
            S_inv = channel_matrix(spec, 1 / k["s"][0], 1 / k["s"][1], C)
            x0_hat = _channels(channel_matrix(spec, *k["s"], C),
                               _channels(S_inv, x0_hat).clamp(-clip_range, clip_range))
        else:
            x0_hat = x0_hat.clamp(-clip_range, clip_range)
    x_prev = _channels(channel_matrix(spec, *k["c0"], C), x0_hat) + _channels(channel_matrix(spec, *k["ct"], C), x)
    if noise is not None and bool((prev >= 0).any()):
        spatial = _apply(noise, _spatial_spec(spec), None, None)  # N(T_w z): the channels still white
        x_prev = x_prev + _channels(channel_matrix(spec, *k["sig"], C), spatial)
    return x_prev.to(sample.dtype), x0_hat.to(sample.dtype)


def ddpm_coefficients(spec: NoiseSpec, schedule, t: torch.Tensor, prev: torch.Tensor, mode: str) -> dict:
    """The per-sample channel matrices of one DDPM step, each as ``(e_perp [B], e_axes [B, k])``
    (see :func:`channel_matrix`): ``x_prev = M(c0) x0_hat + M(ct) x_t + M(sig) N(T_w z)``, and
    ``s`` = S(t) (official mode clips x0_hat in S(t)^-1 coordinates)."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode: must be one of {list(SAMPLING_MODES)}, got {mode!r}")
    B = t.shape[0]
    ab_t, ab_p = _alphas(schedule, t, B), _alphas(schedule, prev, B)
    alpha = ab_t / ab_p
    lt_perp, lt_axes = squeeze_eigenvalues(spec, t, schedule, B)
    k = lt_axes.shape[1]
    if mode == "official":
        c0 = ab_p.sqrt() * (1 - alpha) / (1 - ab_t)
        ct = alpha.sqrt() * (1 - ab_p) / (1 - ab_t)
        sigma = ((1 - ab_p) / (1 - ab_t) * (1 - alpha)).clamp_min(1e-20).sqrt() * (prev >= 0).double()
        return {"s": (lt_perp, lt_axes), "c0": (c0, c0[:, None].expand(B, k)),
                "ct": (ct, ct[:, None].expand(B, k)),
                "sig": (sigma * lt_perp, sigma[:, None] * lt_axes)}
    lp_perp, lp_axes = squeeze_eigenvalues(spec, prev, schedule, B)

    def per_direction(l_t, l_p):
        shape = (-1, *([1] * (l_t.dim() - 1)))
        s_t2, s_p2 = (1 - ab_t).view(shape) * l_t**2, (1 - ab_p).view(shape) * l_p**2
        a = alpha.view(shape)
        delta = (s_t2 - a * s_p2).clamp_min(0)
        return ab_p.sqrt().view(shape) * delta / s_t2, a.sqrt() * s_p2 / s_t2, (s_p2 * delta).sqrt() / s_t2.sqrt()

    perp, axes = per_direction(lt_perp, lp_perp), per_direction(lt_axes, lp_axes)
    return {"s": (lt_perp, lt_axes), "c0": (perp[0], axes[0]), "ct": (perp[1], axes[1]),
            "sig": (perp[2], axes[2])}


def ddim_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, spec: NoiseSpec, schedule, *,
              prev_timestep=None, eta: float = 0.0, noise=None, clip_sample: bool = False,
              clip_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step, per eigen-direction with ``s_t = sqrt(1 - abar_t) lambda(t)``:
    ``x_prev = sqrt(abar_prev) x0_hat + sqrt(s_prev^2 - sigma^2) eps_hat / lambda(t) + sigma T_w z``
    with ``sigma = eta sqrt(s_prev^2 delta) / s_t`` (the exact posterior std times eta). For a
    time-invariant spec this is standard DDIM (eta = 0 needs no noise at all)."""
    B, C = sample.shape[:2]
    t, prev, ab_t, ab_p, x, eps_hat, x0_hat = _step_inputs(model_output, timestep, sample, schedule,
                                                           prev_timestep)
    alpha = ab_t / ab_p
    if clip_sample:
        x0_hat = x0_hat.clamp(-clip_range, clip_range)
    lt_perp, lt_axes = squeeze_eigenvalues(spec, t, schedule, B)
    lp_perp, lp_axes = squeeze_eigenvalues(spec, prev, schedule, B)

    def per_direction(l_t, l_p):
        shape = (-1, *([1] * (l_t.dim() - 1)))
        s_t2, s_p2 = (1 - ab_t).view(shape) * l_t**2, (1 - ab_p).view(shape) * l_p**2
        delta = (s_t2 - alpha.view(shape) * s_p2).clamp_min(0)
        sigma = eta * (s_p2 * delta).sqrt() / s_t2.sqrt()
        return (s_p2 - sigma**2).clamp_min(0).sqrt() / l_t, sigma

    d_perp, sd_perp = per_direction(lt_perp, lp_perp)
    d_axes, sd_axes = per_direction(lt_axes, lp_axes)
    x_prev = (_per_sample(ab_p.sqrt(), x) * x0_hat
              + _channels(channel_matrix(spec, d_perp, d_axes, C), eps_hat))
    if eta > 0 and noise is not None:
        spatial = _apply(noise, _spatial_spec(spec), None, None)
        x_prev = x_prev + _channels(channel_matrix(spec, sd_perp, sd_axes, C), spatial)
    return x_prev.to(sample.dtype), x0_hat.to(sample.dtype)


def spatial_power(spec: NoiseSpec, H: int, W: int) -> torch.Tensor:
    """The eigenvalues of Sigma_w on the fftfreq grid, ``sum_d gamma_d^2 w_d^2`` ([H, W] float64).
    Per-sample normalisation is taken as its calibrated expectation."""
    if spec.temporal:
        _temporal_frames(spec, None)  # raises: the sampler's score works on H x W planes
    if spec.normalize == "per_sample" and spec.spectral is not None:
        spec = NoiseSpec(None, spec.spectral, normalize="calibrated", radius=spec.radius)  # (no offset)
    stages = spatial_stages(spec, H, W) or [(None, 1.0)]
    power = torch.zeros(H, W, dtype=torch.float64)
    for w, gamma in stages:
        power += gamma**2 * (torch.ones(H, W, dtype=torch.float64) if w is None else w**2)
    return power


def score(model_output: torch.Tensor, timestep, sample: torch.Tensor, spec: NoiseSpec, schedule) -> torch.Tensor:
    """``grad log q_t(x_t) = -Sigma_t^+ eps_hat / sqrt(1 - abar_t)``, ``Sigma_t = S(t)^2 (x) Sigma_w``,
    with the pseudo-inverse on zero bands (``1 / P(f)`` where ``P > 0``, else 0)."""
    B, C = sample.shape[:2]
    H, W = sample.shape[-2:]
    t = torch.as_tensor(timestep).reshape(-1).long().cpu().expand(B)
    b_t = (1 - _alphas(schedule, t, B)).sqrt()
    l_perp, l_axes = squeeze_eigenvalues(spec, t, schedule, B)
    P = spatial_power(spec, H, W)
    P_inv = torch.where(P > 0, 1.0 / P.clamp_min(1e-300), torch.zeros_like(P)).to(sample.device)
    e = filter_planes(model_output.double(), P_inv)
    e = _channels(channel_matrix(spec, l_perp**-2, l_axes**-2, C), e)
    return (-e / _per_sample(b_t, e)).to(sample.dtype)


# ---------------------------------------------------------------------------------------------
# 6. Flow matching (rectified flow, SD3 / Flux; docs/design.md, "Flow matching")
#
# x_sigma = (1 - sigma) x0 + sigma n with n = A(sigma) eps and a float sigma in [0, 1] per sample.
# A schedule object with ``path == "flow"`` (anisodiff.flow.FlowSchedule) marks the ``timesteps``
# of the functions above as sigmas. A time-varying squeeze reads r_k = s_k tau(sigma), tau a
# piecewise-linear function given by knots (u_i, tau_i) in a coordinate u(sigma):
#   "constant": tau = 1;  "linear": tau = sigma;  a table of T values: tau_i at sigma = i / (T - 1);
#   "beta": the SDM profile beta_t / beta_max of a reference VP schedule, at the VP timestep of the
#   same signal-to-noise ratio: u = -log SNR, u(sigma) = log(sigma^2 / (1 - sigma)^2) and
#   u_t = log((1 - abar_t) / abar_t); outside the knots tau is held at the end values.
# ---------------------------------------------------------------------------------------------
def is_flow(schedule) -> bool:
    """True for a flow-matching schedule (``schedule.path == "flow"``)."""
    return getattr(schedule, "path", None) == "flow"


def flow_sigmas(sigmas) -> torch.Tensor:
    """The per-sample sigmas as a float64 ``[B]`` tensor (a ``[B, 1, ..., 1]`` view is flattened)."""
    if not isinstance(sigmas, torch.Tensor):  # Python floats: straight to float64
        return torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    return sigmas.detach().reshape(-1).double()


def flow_profile_knots(squeeze: Squeeze, reference_vp) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(u_knots, tau_knots, snr_coordinate)``: tau(sigma) of ``squeeze`` on a flow path as knots
    of a piecewise-linear function (float64, CPU), in u = sigma or, for the ``"beta"`` profile,
    in u = -log SNR (``snr_coordinate`` True). ``reference_vp``: the VP schedule whose
    ``beta_t / beta_max`` the "beta" profile carries over."""
    prof = squeeze.schedule
    if isinstance(prof, str) and prof == "constant":
        return torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), False
    if isinstance(prof, str) and prof == "linear":
        return torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), False
    if isinstance(prof, str):  # "beta"
        ac = reference_vp.alphas_cumprod.double()
        betas = reference_vp.betas.double()
        return torch.log1p(-ac) - torch.log(ac), betas / betas.max(), True
    table = prof.double()
    return torch.linspace(0.0, 1.0, table.numel(), dtype=torch.float64), table, False


def interpolate_knots(u: torch.Tensor, u_knots: torch.Tensor, v_knots: torch.Tensor):
    """``(v(u), dv/du)`` of the piecewise-linear function through the knots (increasing ``u_knots``),
    held constant (slope 0) outside them; NaN stays NaN. Works on any device and dtype."""
    if u_knots.numel() == 1:
        return v_knots[:1] + 0.0 * u, torch.zeros_like(u)
    lo, hi = u_knots[:1], u_knots[-1:]  # (slices, not items: torch.compile guards items of constants)
    uc = torch.minimum(torch.maximum(u, lo), hi)
    i = (torch.searchsorted(u_knots, uc.contiguous(), right=True) - 1).clamp(0, u_knots.numel() - 2)
    u0, v0 = u_knots[i], v_knots[i]
    slope = (v_knots[i + 1] - v0) / (u_knots[i + 1] - u0)
    inside = (u > lo) & (u < hi)
    return v0 + slope * (uc - u0), torch.where(inside, slope, torch.zeros_like(slope))


def flow_squeeze_profile(squeeze: Squeeze, sigmas, reference_vp) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau(sigma), dtau/dsigma)`` (float64, the sigmas' device) of ``squeeze`` on a flow path
    (see the section comment)."""
    s = torch.as_tensor(sigmas).double()
    u_knots, tau_knots, snr = flow_profile_knots(squeeze, reference_vp)
    u_knots, tau_knots = u_knots.to(s.device), tau_knots.to(s.device)
    if snr:
        u = 2.0 * (torch.log(s) - torch.log1p(-s))
        tau, slope = interpolate_knots(u, u_knots, tau_knots)
        du = 2.0 / (s * (1.0 - s))  # finite wherever the slope is not 0 (0 < sigma < 1)
        return tau, torch.where(slope == 0, torch.zeros_like(slope), slope * du)
    return interpolate_knots(s, u_knots, tau_knots)


def flow_squeeze_strengths(squeeze: Squeeze, sigmas, schedule) -> torch.Tensor:
    """``r[b, k] = s_k tau(sigma_b)`` (float64 ``[B, k]``, CPU) on a flow schedule."""
    s = torch.tensor(squeeze.strength, dtype=torch.float64)
    if sigmas is None:
        if squeeze.time_varying:
            raise ValueError("timesteps: required (the sigmas), the squeeze strength varies with sigma")
        return s[None, :]
    tau, _ = flow_squeeze_profile(squeeze, flow_sigmas(sigmas).cpu(), schedule.reference)
    return tau[:, None] * s[None, :]


def flow_log_derivatives(spec: NoiseSpec, sigmas, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d log lambda_perp / dsigma [B], d log lambda_axes / dsigma [B, k])``: how fast the
    eigenvalues of S(sigma) change along the path (0 for a time-invariant spec). S' S^-1 has these
    eigenvalues in the eigenbasis of S (the same for every sigma)."""
    s = flow_sigmas(sigmas).cpu()
    sq = spec.squeeze
    if sq is None or not spec.time_varying:
        k = 0 if sq is None else sq.k
        return torch.zeros(s.numel(), dtype=torch.float64), torch.zeros(s.numel(), k, dtype=torch.float64)
    _, dtau = flow_squeeze_profile(sq, s, schedule.reference)
    dr = dtau[:, None] * torch.tensor(sq.strength, dtype=torch.float64)[None, :]  # d r_k / dsigma
    C, k = sq.axes.shape
    d_perp = dr.sum(dim=1) / (C - k) if sq.variant == "heisenberg" else torch.zeros_like(s)
    return d_perp, -dr


def flow_velocity(model_output: torch.Tensor, sigma, sample: torch.Tensor, spec: NoiseSpec,
                  schedule) -> torch.Tensor:
    """The velocity of the flow ODE, ``dx/dsigma = E[d x_sigma / dsigma | x]`` (float64), for a
    network trained on the target ``"flow"`` (``v_hat = E[n - x0 | x]``).

    With n = A(sigma) eps, ``d x_sigma / dsigma = n - x0 + sigma S' S^-1 n``. The last term is 0 for
    a time-invariant spec (then the velocity is ``v_hat`` itself); for a time-varying squeeze it is
    added from ``E[n | x] = x + (1 - sigma) v_hat`` (exact: n and x0 are linear in (x, n - x0))."""
    v = model_output.double()
    if not spec.time_varying:
        return v
    s = flow_sigmas(sigma).expand(sample.shape[0]) if flow_sigmas(sigma).numel() == 1 else flow_sigmas(sigma)
    d_perp, d_axes = flow_log_derivatives(spec, s, schedule)
    n_hat = sample.double() + _per_sample(1.0 - s, sample) * v
    M = channel_matrix(spec, s * d_perp, s[:, None] * d_axes, sample.shape[1])
    return v + _channels(M, n_hat)


def flow_euler_step(model_output: torch.Tensor, sigma, sigma_next, sample: torch.Tensor, spec: NoiseSpec,
                    schedule, *, noise=None) -> torch.Tensor:
    """One Euler step of the flow ODE from ``sigma`` to ``sigma_next`` (float64 math, the sample's
    dtype out): ``x + (sigma_next - sigma) flow_velocity(...)``. With WHITE ``noise`` (``[2, ...]``
    for an independent two-band spec) the step is stochastic instead, as diffusers'
    ``stochastic_sampling``: ``x0_hat = x - sigma v_hat``, then
    ``(1 - sigma_next) x0_hat + sigma_next A(sigma_next) noise``."""
    B = sample.shape[0]
    s, s_next = (flow_sigmas(v).expand(B) if flow_sigmas(v).numel() == 1 else flow_sigmas(v)
                 for v in (sigma, sigma_next))
    x = sample.double()
    if noise is not None:
        x0_hat = x - _per_sample(s, x) * model_output.double()
        n = _apply(noise, spec, s_next, schedule)
        out = _per_sample(1.0 - s_next, x) * x0_hat + _per_sample(s_next, x) * n
    else:
        out = x + _per_sample(s_next - s, x) * flow_velocity(model_output, s, sample, spec, schedule)
    return out.to(sample.dtype)
