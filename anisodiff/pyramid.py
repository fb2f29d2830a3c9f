"""Pyramid (multi-resolution) noise, the trainers' ``--multires_noise_iterations`` /
``--multires_noise_discount`` (kohya sd-scripts' ``pyramid_noise_like``): the exact recipe, and
the expected power spectrum that :class:`~anisodiff.PyramidNoise` fuses as a spectral part
(docs/design.md section 1, "Pyramid noise").

The recipe, for white noise ``eps`` of shape ``[B, C, H, W]``: for level ``i = 0 .. L-1`` draw a
scale factor ``r_i ~ U[2, 4)`` (one per level and call, shared by the whole batch), a white
``z_i`` of size ``h_i x w_i`` with ``h_i = max(1, floor(H / r_i^i))``, ``w_i = max(1, floor(W /
r_i^i))``, and add ``discount^i * up(z_i)`` (``up``: bilinear, ``align_corners=False``, to
``H x W``); stop after the first level with ``h_i == 1`` or ``w_i == 1``; divide the sum by its
global standard deviation (over the whole batch tensor, unbiased). Level 0 has ``r^0 = 1``: a
second white draw at full size.

Its power spectrum. Given the scale factors, the sum is Gaussian with covariance
``I + sum_i discount^(2i) U_i U_i^T`` (``U_i`` the upsampling matrix). Bilinear upsampling is
separable, ``U_i = U_y (x) U_x``, so the diagonal of that covariance in the unitary DFT basis is
``P(f | r) = 1 + sum_i discount^(2i) p_y(f_y) p_x(f_x)`` with ``p_y(f) = sum_j |DFT(U_y[:, j])(f)|^2
/ H`` (and the same for x). The global std divides a draw by ``sqrt(S(r))``, ``S(r) = mean_f P(f |
r)`` (Parseval: the mean per-pixel variance), up to terms of order ``1 / (B C H W)``. So the expected
power spectrum of the trainers' noise is ``E_r[P(f | r) / S(r)]``, taken here exactly over the
piecewise-constant sizes ``(h_i, w_i)`` as ``r`` runs through ``[2, 4)`` and over the stopping rule,
with ``1 / S = integral_0^inf exp(-lambda S) d lambda`` (Gauss-Laguerre), which makes the levels
factorise. Its mean over the frequencies is 1 (unit per-pixel variance), as the recipe's.

What the spectral part does NOT keep: the recipe's noise is not stationary (bilinear
upsampling by a non-integer factor, clamped at the borders: off-diagonal terms in the Fourier
basis), not Gaussian (a mixture over ``r``), and its per-call scale factors and global std couple
the samples of a batch. :class:`~anisodiff.PyramidNoise` is the stationary Gaussian noise with the
same expected power spectrum.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["pyramid_noise_like", "expected_power", "MAX_ITERATIONS"]

MAX_ITERATIONS = 64  # far beyond any plane: r >= 2 reaches 1 x 1 after log2(max(H, W)) levels
_R_LOW, _R_HIGH = 2.0, 4.0  # r ~ U[2, 4): random.random() * 2 + 2 in the trainers' code
_QUADRATURE_NODES = 96


def pyramid_noise_like(noise: torch.Tensor, iterations: int = 6, discount: float = 0.4,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The trainers' pyramid noise of white ``noise`` ``[B, C, H, W]``, exactly as kohya's
    ``pyramid_noise_like`` computes it, with every random number from ``generator`` (torch's
    global generator when None) in the recipe's order: per level, first ``r = 2 + 2 u``
    (``u = torch.rand((), float64)``), then the level's white draw ``torch.randn(B, C, h, w)``
    (float32, torch's default dtype, as the recipe). Math in float64; returns a new float64
    tensor (the recipe adds in place to ``noise``; this function leaves ``noise`` alone)."""
    if noise.dim() != 4:
        raise ValueError(f"noise: expected [B, C, H, W], got shape {tuple(noise.shape)}")
    _check_args(iterations, discount)
    B, C, H, W = noise.shape
    out = noise.double().clone()
    drawn_on = generator.device if generator is not None else torch.device("cpu")
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, dtype=torch.float64, device=drawn_on)) * 2 + 2
        h, w = max(1, int(H / (r**i))), max(1, int(W / (r**i)))
        level = torch.randn(B, C, h, w, generator=generator, device=drawn_on).to(out.device, torch.float64)
        out += F.interpolate(level, size=(H, W), mode="bilinear", align_corners=False) * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def _check_args(iterations, discount) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations: must be an integer in [1, {MAX_ITERATIONS}], got {iterations!r}")
    if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not math.isfinite(discount) \
            or not 0 <= discount <= 1:
        raise ValueError(f"discount: must be a number in [0, 1], got {discount!r}")


def _joint_sizes(H: int, W: int, level: int) -> list[tuple[float, int, int]]:
    """``[(probability, h, w)]`` of one level: h and w come from the same r."""
    if level == 0:
        return [(1.0, H, W)]
    cuts = {_R_LOW, _R_HIGH}
    for n in (H, W):
        for k in range(1, n + 1):
            r = (n / k) ** (1.0 / level)
            if _R_LOW < r < _R_HIGH:
                cuts.add(r)
    cuts = sorted(cuts)
    out: dict[tuple[int, int], float] = {}
    for a, b in zip(cuts, cuts[1:]):
        m = (0.5 * (a + b)) ** level
        key = (max(1, int(H / m)), max(1, int(W / m)))
        out[key] = out.get(key, 0.0) + (b - a) / (_R_HIGH - _R_LOW)
    return [(p, h, w) for (h, w), p in sorted(out.items())]


@lru_cache(maxsize=1024)
def _upsampled_power(n_out: int, n_in: int) -> torch.Tensor:
    """``p(f) = sum_j |DFT(U[:, j])(f)|^2 / n_out`` for the 1-D bilinear upsampling ``U``
    (``n_out x n_in``) that ``F.interpolate(mode="bilinear", align_corners=False)`` applies along
    one axis (float64 ``[n_out]``; its mean is the mean per-pixel variance of the upsampled white).

    ``p`` is the DFT of the circular autocorrelation ``c(d) = sum_y (U U^T)[y, y - d]``. Each
    output mixes at most two neighbouring inputs, so ``U U^T`` is banded and each lag of ``c`` is a
    sum over the output rows of the products of their (at most 2 x 2) matching weights."""
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    U = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T  # [n_out, n_in]
    k = min(2, n_in)
    w, j = torch.topk(U, k, dim=1)  # each row's (at most two) nonzero weights and their inputs
    # an input feeds the outputs whose source coordinate lies within 1 of it (clamped at the
    # borders): fewer than 2 n_out / n_in + 2 of them, so (U U^T)[y, y'] = 0 beyond this lag
    band = min(2 * -(-n_out // n_in) + 2, n_out - 1)
    c = torch.zeros(n_out, dtype=torch.float64)
    for d in range(band + 1):
        same = j[d:, :, None] == j[: n_out - d, None, :]
        v = float((w[d:, :, None] * w[: n_out - d, None, :] * same).sum())
        c[d] += v
        if d:
            c[-d] += v  # U U^T is symmetric: lag -d, folded mod n_out
    return torch.fft.fft(c).real / n_out


def _pieces(H: int, W: int, iterations: int, discount: float):
    """Per level: ``[(probability, h, w, stops, scaled variance, p_y, p_x)]``."""
    levels = []
    for i in range(iterations):
        g = discount ** (2 * i)
        row = []
        for p, h, w in _joint_sizes(H, W, i):
            py, px = _upsampled_power(H, h), _upsampled_power(W, w)
            row.append((p, h, w, h == 1 or w == 1, g * float(py.mean() * px.mean()), py, px))
        levels.append(row)
    return levels


def expected_power(H: int, W: int, iterations: int, discount: float) -> torch.Tensor:
    """The expected power spectrum ``E_r[P(f | r) / S(r)]`` of the trainers' pyramid noise on an
    ``H x W`` plane (module docstring): float64 ``[H, W]`` on the unshifted fftfreq grid, mean 1.
    Exact up to the quadrature of ``1 / S`` (relative error below 1e-11) and to terms of order
    ``1 / (B C H W)`` from the recipe's empirical std. Cached; returns a copy."""
    _check_args(iterations, discount)
    if H < 1 or W < 1:
        raise ValueError(f"plane: H and W must be >= 1, got {H}x{W}")
    return _expected_power(int(H), int(W), int(iterations), float(discount)).clone()


@lru_cache(maxsize=64)
def _expected_power(H: int, W: int, iterations: int, discount: float) -> torch.Tensor:
    levels = _pieces(H, W, iterations, discount)
    # 1 / S = int_0^inf exp(-lam S) d lam. S = 2 + (the levels >= 1): the white draw and level 0
    # (an identity upsampling) have variance 1 each. With lam = x / 2 this is Gauss-Laguerre,
    # int e^-x g(x) dx with g = exp(-lam (S - 2)) smooth and in (0, 1]; every exponent below is
    # <= 0 (level 0 enters with v - 1), so nothing overflows.
    x, wq = np.polynomial.laguerre.laggauss(_QUADRATURE_NODES)
    lam = torch.as_tensor(x / 2.0, dtype=torch.float64)
    base = torch.as_tensor(wq / 2.0, dtype=torch.float64)
    levels[0] = [(p, h, w, stops, v - 1.0, py, px) for p, h, w, stops, v, py, px in levels[0]]
    L = len(levels)
    # G[i](lam) = E[exp(-lam * sum of the levels >= i) | level i is drawn]; G[L] = 1
    G = [None] * (L + 1)
    G[L] = torch.ones_like(lam)
    for i in range(L - 1, -1, -1):
        acc = torch.zeros_like(lam)
        for p, _, _, stops, v, _, _ in levels[i]:
            acc += p * torch.exp(-lam * v) * (1.0 if stops else G[i + 1])
        G[i] = acc
    power = torch.full((H, W), float((base * G[0]).sum()), dtype=torch.float64)
    A = torch.ones_like(lam)                  # E[exp(-lam * levels < i) ; level i is drawn]
    ys, xs = [], []                           # power += sum_k ys[k] (x) xs[k], as one product
    for i in range(L):
        g = discount ** (2 * i)
        nxt = torch.zeros_like(lam)
        for p, _, _, stops, v, py, px in levels[i]:
            e = p * torch.exp(-lam * v)
            coeff = float((base * A * e * (1.0 if stops else G[i + 1])).sum())
            ys.append((coeff * g) * py)
            xs.append(px)
            if not stops:
                nxt += e
        A = A * nxt
    return power + torch.stack(ys).T @ torch.stack(xs)
