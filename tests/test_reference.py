"""anisodiff.reference (the pure-PyTorch specification) against closed forms and statistics.

Every expectation below is computed independently of the code under test (closed forms written
out by hand, numpy FFTs, integer arithmetic), and every statistical bound is checked, inside the
test, to reject a deliberately wrong constant.
"""
import math
import zlib

import numpy as np
import pytest
import torch

import anisodiff as ad
from anisodiff import reference as R
from conftest import random_axes

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def sdm_matrix(V, r):
    """SDM closed form S = I + sum_k (e^{-r_k} - 1) v_k v_k^T, written out independently."""
    C, k = V.shape
    S = torch.eye(C, dtype=F64)
    for j in range(k):
        v = V[:, j:j + 1]
        S = S + (math.exp(-r[j]) - 1.0) * (v @ v.T)
    return S


def hdm_matrix(V, r):
    """HDM closed form S = g (I - P) + sum_k e^{-r_k} v_k v_k^T, g = exp(sum r / (C - k))."""
    C, k = V.shape
    P = V @ V.T
    g = math.exp(sum(r) / (C - k))
    S = g * (torch.eye(C, dtype=F64) - P)
    for j in range(k):
        v = V[:, j:j + 1]
        S = S + math.exp(-r[j]) * (v @ v.T)
    return S


def np_radius(H, W, convention="cycles"):
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.fftfreq(W)[None, :]
    r = np.sqrt(fx ** 2 + fy ** 2)
    return {"cycles": r, "nyquist1": 2 * r, "rmax1": r / r.max()}[convention]


def spatial_matrix(w):
    """Dense real operator T = F^-1 diag(w) F on a flattened H x W plane (numpy, float64)."""
    H, W = w.shape
    basis = np.eye(H * W).reshape(H * W, H, W)
    out = np.fft.ifft2(np.fft.fft2(basis, axes=(-2, -1)) * w, axes=(-2, -1))
    assert np.abs(out.imag).max() < 1e-12
    return torch.from_numpy(out.real.reshape(H * W, H * W).T.copy())  # column j = T e_j


Z_BOUND = 6.0         # |z| bound of every whitened covariance entry (see whitened_stats)
NULL_BOUND = 1e-12    # allowed energy fraction outside the range of Sigma


def whitened_stats(X, Sigma):
    """How far the empirical covariance of zero-mean samples ``X [n, N]`` is from ``Sigma``.

    In the eigenbasis of Sigma, restricted to its range, the whitened empirical covariance
    ``W = Lambda^-1/2 U^T Sigma_hat U Lambda^-1/2`` of Gaussian samples has diagonal entries with sd
    sqrt(2/n) and off-diagonal entries with sd 1/sqrt(n). Returns the largest |z| over all entries
    and the fraction of the sample energy that lies in the null space of Sigma (0 in theory).
    With N <= 64 there are <= ~2100 entries; P(|z| > 6) ~ 2e-9 each, so a correct Sigma fails the
    Z_BOUND with probability < 1e-5.
    """
    n = X.shape[0]
    lam, U = torch.linalg.eigh(Sigma)
    keep = lam > 1e-13 * lam.max()
    Y = X @ U
    Z = Y[:, keep] / lam[keep].sqrt()
    Wh = Z.T @ Z / n
    diag = (Wh.diagonal() - 1.0) / math.sqrt(2.0 / n)
    off = (Wh - torch.diag(Wh.diagonal())) * math.sqrt(n)
    zmax = max(diag.abs().max().item(), off.abs().max().item())
    null = 0.0 if keep.all() else ((Y[:, ~keep] ** 2).sum() / n / lam[keep].sum()).item()
    return zmax, null


def draws(spec, n, chw, timesteps=None, schedule=None, seed=0):
    """n samples of the reference's shaped noise, flattened to [n, C*H*W] (float64 math)."""
    ts = None if timesteps is None else torch.full((n,), timesteps, dtype=torch.int64)
    x = R.shaped_noise((n, *chw), spec, ts, schedule, seed=seed, dtype=F64)
    return x.reshape(n, -1)


# ---------------------------------------------------------------------------------------------
# 1. closed forms of the channel part
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,k", [(3, 1), (4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("s", [-0.4, 1.0, -1.3])
def test_sdm_closed_form_and_eigenvalues(C, k, s):
    V = random_axes(C, k, seed=C + k)
    strengths = [s * (1 + 0.25 * j) for j in range(k)]       # distinct per axis
    sq = ad.Squeeze(V, strengths, "sdm", schedule="constant")
    r = torch.tensor([strengths], dtype=F64)
    S = R.squeeze_matrices(sq, r)[0]
    torch.testing.assert_close(S, sdm_matrix(V, strengths), rtol=0, atol=1e-14)
    # eigen-structure: e^{-r_k} on v_k, 1 on the orthogonal complement
    for j in range(k):
        torch.testing.assert_close(S @ V[:, j], math.exp(-strengths[j]) * V[:, j], rtol=0, atol=1e-13)
    Q, _ = torch.linalg.qr(torch.cat([V, torch.eye(C, dtype=F64)], dim=1))
    comp = Q[:, k:C]                                         # orthonormal basis of span(V)^perp
    torch.testing.assert_close(S @ comp, comp, rtol=0, atol=1e-13)
    expected = sorted([math.exp(-x) for x in strengths] + [1.0] * (C - k))
    torch.testing.assert_close(torch.linalg.eigvalsh(S), torch.tensor(expected, dtype=F64),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("C,k", [(3, 1), (4, 2), (4, 3), (5, 2)])
@pytest.mark.parametrize("s", [-0.4, 0.7])
def test_hdm_closed_form_det_one(C, k, s):
    V = random_axes(C, k, seed=10 + C + k)
    strengths = [s * (1 - 0.3 * j) for j in range(k)]
    sq = ad.Squeeze(V, strengths, "heisenberg", schedule="constant")
    S = R.squeeze_matrices(sq, torch.tensor([strengths], dtype=F64))[0]
    torch.testing.assert_close(S, hdm_matrix(V, strengths), rtol=0, atol=1e-14)
    assert abs(torch.linalg.det(S).item() - 1.0) < 1e-12
    g = math.exp(sum(strengths) / (C - k))
    Q, _ = torch.linalg.qr(torch.cat([V, torch.eye(C, dtype=F64)], dim=1))
    comp = Q[:, k:C]
    torch.testing.assert_close(S @ comp, g * comp, rtol=0, atol=1e-13)
    for j in range(k):
        torch.testing.assert_close(S @ V[:, j], math.exp(-strengths[j]) * V[:, j], rtol=0, atol=1e-13)


@pytest.mark.parametrize("r", [0.4, -0.4, 1.0, 0.005])
def test_hdm_rgb_matches_official_code(r):
    """C = 3, k = 1: the official code scales v-perp by e^{+r/2} (not e^{+r})."""
    v = torch.tensor([[1.0], [1.0], [1.0]], dtype=F64) / math.sqrt(3)
    sq = ad.Squeeze(v, 1.0, "heisenberg", schedule="constant")
    S = R.squeeze_matrices(sq, torch.tensor([[r]], dtype=F64))[0]
    u = torch.tensor([1.0, -1.0, 0.0], dtype=F64) / math.sqrt(2)
    torch.testing.assert_close(S @ u, math.exp(r / 2) * u, rtol=0, atol=1e-14)
    torch.testing.assert_close(S @ v[:, 0], math.exp(-r) * v[:, 0], rtol=0, atol=1e-14)
    # official: S_H = e^{-r} P + e^{r/2} (I - P)
    P = v @ v.T
    torch.testing.assert_close(S, math.exp(-r) * P + math.exp(r / 2) * (torch.eye(3, dtype=F64) - P),
                               rtol=0, atol=1e-14)


def test_beta_profile_hand_values(schedule):
    """r(t) = s * beta_t / beta_max with diffusers' linear betas: 0.005 + 0.995 t / 999."""
    V = random_axes(3, 1, 0)
    s = -0.4
    sq = ad.Squeeze(V, s)  # default schedule "beta"
    assert sq.schedule == "beta"
    t = torch.tensor([0, 499, 980, 999])
    r = R.squeeze_strengths(sq, t, schedule)[:, 0]
    hand = torch.tensor([0.005, 0.005 + 0.995 * 499 / 999, 0.005 + 0.995 * 980 / 999, 1.0], dtype=F64)
    # the digest's rounded values
    assert abs(hand[1] - 0.502) < 5e-4 and abs(hand[2] - 0.981) < 5e-4
    # float32 linspace: ~1e-7 relative; "linear" t/(T-1) differs by 5e-3 at t=0, 2.5e-3 at 499
    torch.testing.assert_close(r, s * hand, rtol=1e-6, atol=0)


@pytest.mark.parametrize("profile", ["linear", "constant", "table"])
def test_other_profiles(schedule, profile):
    V = random_axes(4, 2, 1)
    s = [0.75, -0.375]              # float32-exact (see test_per_axis_strengths_keep_float64)
    table = torch.linspace(0, 1, 1000, dtype=F64) ** 2
    sq = ad.Squeeze(V, s, schedule=table if profile == "table" else profile)
    t = torch.tensor([0, 1, 499, 998, 999])
    r = R.squeeze_strengths(sq, t, schedule)
    tau = {"linear": t.double() / 999, "constant": torch.ones(5, dtype=F64), "table": table[t]}[profile]
    torch.testing.assert_close(r, tau[:, None] * torch.tensor(s, dtype=F64)[None], rtol=1e-14, atol=0)


def test_per_axis_strengths_keep_float64():
    sq = ad.Squeeze(random_axes(4, 2, 1), [0.7, -0.3])
    assert sq.strength == (0.7, -0.3)


def test_scalar_strength_is_exact():
    sq = ad.Squeeze(random_axes(4, 2, 1), 0.7)
    assert sq.strength == (0.7, 0.7)


@pytest.mark.parametrize("variant", ["sdm", "heisenberg"])
@pytest.mark.parametrize("profile", ["beta", "linear", "constant"])
@pytest.mark.parametrize("t", [0, 499, 999])
def test_covariance_along_axis_follows_r_t(schedule, variant, profile, t):
    """v^T Sigma v = e^{-2 r(t)}, per pixel, through the public covariance()."""
    C, H, W = 3, 2, 2
    V = random_axes(C, 1, 3)
    s = 0.8
    spec = ad.NoiseSpec(ad.Squeeze(V, s, variant, schedule=profile))
    Sig = ad.covariance(spec, (C, H, W), timesteps=torch.tensor(t), schedule=schedule)
    tau = {"beta": (1e-4 + (0.02 - 1e-4) * t / 999) / 0.02, "linear": t / 999, "constant": 1.0}[profile]
    for p in range(H * W):
        e = torch.zeros(C, H * W, dtype=F64)
        e[:, p] = V[:, 0]
        e = e.reshape(-1)
        assert abs(e @ Sig @ e - math.exp(-2 * s * tau)) < 1e-6  # float32 betas: ~1e-7


@pytest.mark.parametrize("variant", ["sdm", "heisenberg"])
@pytest.mark.parametrize("s", [0.5, -0.5])
def test_sign_convention(schedule, variant, s):
    """s > 0 squeezes (less variance on v), s < 0 antisqueezes."""
    V = random_axes(3, 1, 4)
    spec = ad.NoiseSpec(ad.Squeeze(V, s, variant))
    Sig = ad.covariance(spec, (3, 1, 1), timesteps=999, schedule=schedule)
    var_v = (V[:, 0] @ Sig @ V[:, 0]).item()
    assert (var_v < 1.0) == (s > 0)
    assert abs(var_v - math.exp(-2 * s)) < 1e-12


@pytest.mark.parametrize("variant", ["sdm", "heisenberg"])
def test_apply_operator_uses_closed_form(schedule, variant):
    """The reference applies S(t_b) per sample and per pixel (checked against the hand closed form)."""
    B, C, H, W = 4, 4, 3, 5
    V = random_axes(C, 2, 5)
    s = [-0.375, 0.875]             # float32-exact (see test_per_axis_strengths_keep_float64)
    spec = ad.NoiseSpec(ad.Squeeze(V, s, variant))
    t = torch.tensor([0, 250, 731, 999])
    eps = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = R.apply_operator(eps, spec, t, schedule)
    betas = schedule.betas.double()
    form = sdm_matrix if variant == "sdm" else hdm_matrix
    for b in range(B):
        tau = (betas[t[b]] / betas.max()).item()
        S = form(V, [x * tau for x in s])
        torch.testing.assert_close(out[b], torch.einsum("ij,jhw->ihw", S, eps[b]), rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 2. s = 0 and alpha = 0 are the identity, bit for bit
# ---------------------------------------------------------------------------------------------
IDENTITY_SPECS = {
    "sdm_s0": lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), 0.0, "sdm")),
    "sdm_s0_k2": lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 0), [0.0, 0.0], "sdm")),
    "hdm_s0": lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), 0.0, "heisenberg")),
    "hdm_s0_k2": lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 0), 0.0, "heisenberg")),
    "powerlaw_a0": lambda: ad.NoiseSpec(spectral=ad.PowerLaw(0.0)),
    "powerlaw_a0_none": lambda: ad.NoiseSpec(spectral=ad.PowerLaw(0.0), normalize="none"),
}


@pytest.mark.parametrize("name", list(IDENTITY_SPECS))
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 4, 7, 9)])
def test_identity_specs_are_bit_exact_white(schedule, name, shape):
    spec = IDENTITY_SPECS[name]()
    if spec.squeeze is not None and spec.squeeze.channels != shape[1]:
        shape = (shape[0], spec.squeeze.channels, *shape[2:])
    t = torch.arange(shape[0]) * 333
    out = R.shaped_noise(shape, spec, t, schedule, seed=1234, offset=17)
    white = R.white_noise(shape, 1234, 17)
    assert torch.equal(out, white)
    # and the op is not trivially returning white noise for every spec: s != 0 changes it
    if spec.squeeze is not None:
        moved = ad.NoiseSpec(ad.Squeeze(spec.squeeze.axes, 0.1, spec.squeeze.variant))
        assert not torch.equal(R.shaped_noise(shape, moved, t, schedule, seed=1234, offset=17), white)


@pytest.mark.parametrize("variant", ["sdm", "heisenberg"])
def test_identity_squeeze_bit_exact_in_float64(schedule, variant):
    """s = 0 must be the identity also when the caller asks for float64 noise (several axes: the
    SDM round-off depends on V; e.g. random_axes(4, 2, 1) gives S - I = 1.1e-16)."""
    t = torch.tensor([0, 999])
    for C, k in [(3, 1), (4, 2)]:
        shape = (2, C, 8, 8)
        eps = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        for axes_seed in range(4):
            spec = ad.NoiseSpec(ad.Squeeze(random_axes(C, k, axes_seed), 0.0, variant))
            out = R.shaped_noise(shape, spec, t, schedule, seed=9, dtype=F64)
            assert torch.equal(out, R.white_noise(shape, 9).double())
            assert torch.equal(R.apply_operator(eps, spec, t, schedule), eps)


# ---------------------------------------------------------------------------------------------
# 3. empirical covariance of many draws vs covariance()
# ---------------------------------------------------------------------------------------------
def _V(C, k, seed):
    return random_axes(C, k, seed)


def _hdm_wrong_g(V, s):
    """HDM with the complement scaled by exp(sum r / (C - 1)) instead of exp(sum r / (C - k))."""
    C, k = V.shape
    S = hdm_matrix(V, [s] * k)
    P = V @ V.T
    g_right = math.exp(k * s / (C - k))
    g_wrong = math.exp(k * s / (C - 1))
    S = S + (g_wrong - g_right) * (torch.eye(C, dtype=F64) - P)
    return torch.kron(S @ S.T, torch.eye(4, dtype=F64))


V42 = _V(4, 2, 21)
V31 = _V(3, 1, 22)

# id: (spec, (C, H, W), timestep, wrong covariance: a spec, or a callable returning Sigma)
COV_CASES = {
    # squeeze only; wrong = exp(-r/2) instead of exp(-r), i.e. half the strength
    "sdm_antisqueeze": (ad.NoiseSpec(ad.Squeeze(V42, -0.4)), (4, 2, 2), 999,
                        ad.NoiseSpec(ad.Squeeze(V42, -0.2))),
    "sdm_squeeze": (ad.NoiseSpec(ad.Squeeze(V42, 1.0)), (4, 2, 2), 999,
                    ad.NoiseSpec(ad.Squeeze(V42, 0.5))),
    "hdm_k2": (ad.NoiseSpec(ad.Squeeze(V42, -0.4, "heisenberg")), (4, 2, 2), 999,
               lambda: _hdm_wrong_g(V42, -0.4)),
    "hdm_rgb": (ad.NoiseSpec(ad.Squeeze(V31, 1.0, "heisenberg", schedule="constant")), (3, 2, 2), None,
                ad.NoiseSpec(ad.Squeeze(V31, 0.5, "heisenberg", schedule="constant"))),
    # spectral; wrong = the calibration factor missing
    "powerlaw_+0.5": (ad.NoiseSpec(spectral=ad.PowerLaw(0.5)), (1, 8, 8), None,
                      ad.NoiseSpec(spectral=ad.PowerLaw(0.5), normalize="none")),
    "powerlaw_-0.5": (ad.NoiseSpec(spectral=ad.PowerLaw(-0.5)), (2, 4, 4), None,
                      ad.NoiseSpec(spectral=ad.PowerLaw(-0.5), normalize="none")),
    "powerlaw_-0.5_wrong_alpha": (ad.NoiseSpec(spectral=ad.PowerLaw(-0.5)), (1, 6, 6), None,
                                  ad.NoiseSpec(spectral=ad.PowerLaw(-0.45))),
    "band": (ad.NoiseSpec(spectral=ad.Band(0.1, 0.3)), (1, 8, 8), None,
             ad.NoiseSpec(spectral=ad.Band(0.1, 0.3), normalize="none")),
    "band_rmax1_wrong_radius": (ad.NoiseSpec(spectral=ad.Band(0.2, 0.6), radius="rmax1"), (1, 8, 8), None,
                                ad.NoiseSpec(spectral=ad.Band(0.2, 0.6), radius="nyquist1")),
    "twoband_shared": (ad.NoiseSpec(spectral=ad.TwoBand(0.7, (0, 0.25), 0.3, (0.25, 0.5))), (1, 8, 8), None,
                       ad.NoiseSpec(spectral=ad.TwoBand(0.7, (0, 0.25), 0.3, (0.25, 0.5), "independent"))),
    # independent: total variance gamma_l^2 + gamma_h^2 = 0.5; wrong = gamma instead of gamma^2
    "twoband_independent": (
        ad.NoiseSpec(spectral=ad.TwoBand(0.5, (0, 0.3), 0.5, (0.3, 1.0), "independent")), (1, 8, 8), None,
        ad.NoiseSpec(spectral=ad.TwoBand(0.5 ** 0.5, (0, 0.3), 0.5 ** 0.5, (0.3, 1.0), "independent"))),
    "none_powerlaw": (ad.NoiseSpec(spectral=ad.PowerLaw(0.5), normalize="none"), (1, 8, 8), None,
                      ad.NoiseSpec(spectral=ad.PowerLaw(0.5))),
    "none_twoband_shared": (ad.NoiseSpec(spectral=ad.TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1.0)),
                                         normalize="none"), (1, 8, 8), None,
                            ad.NoiseSpec(spectral=ad.TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1.0)))),
    "squeeze_and_powerlaw": (ad.NoiseSpec(ad.Squeeze(V31, -0.4), ad.PowerLaw(0.5)), (3, 4, 4), 999,
                             ad.NoiseSpec(ad.Squeeze(V31, -0.2), ad.PowerLaw(0.5))),
    "hdm_and_band": (ad.NoiseSpec(ad.Squeeze(V42, 0.6, "heisenberg"), ad.Band(0.2, 0.5)), (4, 4, 4), 999,
                     ad.NoiseSpec(ad.Squeeze(V42, 0.6, "sdm"), ad.Band(0.2, 0.5))),
}


@pytest.mark.parametrize("case", list(COV_CASES))
def test_empirical_covariance_matches_analytic(schedule, case):
    spec, chw, t, wrong = COV_CASES[case]
    n = 20000
    ts = None if t is None else torch.tensor(t)
    Sigma = ad.covariance(spec, chw, timesteps=ts, schedule=schedule)
    X = draws(spec, n, chw, t, schedule, seed=zlib.crc32(case.encode()))
    zmax, null = whitened_stats(X, Sigma)
    assert zmax < Z_BOUND, f"{case}: max |z| = {zmax:.2f}"
    assert null < NULL_BOUND, f"{case}: energy fraction outside range(Sigma) = {null:.3g}"
    # The bound has teeth: the same draws reject the wrong constant. Margins measured over 20
    # seeds: the right Sigma gives max |z| <= 4.5 in every case, the wrong one >= 23 (hdm_k2, the
    # smallest) and ~50 for exp(-r/2) instead of exp(-r) at r = 0.4; a wrong band radius puts
    # energy in the null space instead.
    Sigma_wrong = wrong() if callable(wrong) else ad.covariance(wrong, chw, timesteps=ts, schedule=schedule)
    zw, nullw = whitened_stats(X, Sigma_wrong)
    assert zw > Z_BOUND or nullw > NULL_BOUND, f"{case}: the wrong covariance passes (z={zw:.2f})"


@pytest.mark.parametrize("spec,chw", [
    (ad.NoiseSpec(ad.Squeeze(V31, -0.4, "heisenberg"), ad.PowerLaw(-0.3)), (3, 4, 5)),
    (ad.NoiseSpec(ad.Squeeze(V42, [0.3, -0.6]), ad.TwoBand(0.3, (0, 0.2), 0.9, (0.2, 0.6), "independent")),
     (4, 3, 4)),
    (ad.NoiseSpec(spectral=ad.Band(0.05, 0.4), radius="nyquist1", normalize="none"), (2, 5, 6)),
])
def test_covariance_matches_hand_built_operator(schedule, spec, chw):
    """Sigma = sum_d gamma_d^2 (S S^T) (x) (T_d T_d^T), T_d built from numpy FFTs and weights from
    numpy fftfreq (deterministic, 1e-12)."""
    C, H, W = chw
    t = 700
    r = np_radius(H, W, spec.radius)
    sp = spec.spectral
    if isinstance(sp, ad.PowerLaw):
        ws, gs = [(r + 1e-10) ** sp.alpha], [1.0]
    elif isinstance(sp, ad.Band):
        ws, gs = [((r >= sp.a) & (r <= sp.b)).astype(float)], [1.0]
    else:
        ws = [((r >= a) & (r <= b)).astype(float) for a, b in (sp.low, sp.high)]
        gs = [sp.gamma_low, sp.gamma_high]
    if spec.normalize == "calibrated":
        ws = [w / np.sqrt((w ** 2).mean()) for w in ws]
    if spec.squeeze is not None:
        tau = (schedule.betas[t].double() / schedule.betas.double().max()).item()
        sq = spec.squeeze
        form = sdm_matrix if sq.variant == "sdm" else hdm_matrix
        S = form(sq.axes, [s * tau for s in sq.strength])
    else:
        S = torch.eye(C, dtype=F64)
    expected = sum(g * g * torch.kron(S @ S.T, spatial_matrix(w) @ spatial_matrix(w).T) for w, g in zip(ws, gs))
    got = ad.covariance(spec, chw, timesteps=t if spec.squeeze is not None else None, schedule=schedule)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 4. calibrated normalisation: unit mean per-pixel variance
# ---------------------------------------------------------------------------------------------
def _sym_table(H, W, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(H, W, dtype=F64, generator=g) + 0.1
    return 0.5 * (u + torch.roll(torch.flip(u, (0, 1)), (1, 1), (0, 1)))


CALIBRATED = {
    "powerlaw+0.5": ad.PowerLaw(0.5),
    "powerlaw-0.08": ad.PowerLaw(-0.08),
    "powerlaw-0.5": ad.PowerLaw(-0.5),
    "band": ad.Band(0.1, 0.3),
    "twoband_shared": ad.TwoBand(0.7, (0, 0.25), 0.3, (0.25, 0.5)),
    "twoband_white": ad.TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1.0)),
    "table": None,
}


@pytest.mark.parametrize("name", list(CALIBRATED))
@pytest.mark.parametrize("radius", ["cycles", "nyquist1", "rmax1"])
@pytest.mark.parametrize("hw", [(8, 8), (5, 7)])
def test_calibrated_trace_is_exactly_one(name, radius, hw):
    H, W = hw
    sp = CALIBRATED[name] if CALIBRATED[name] is not None else ad.SpectralTable(_sym_table(H, W, 3))
    spec = ad.NoiseSpec(spectral=sp, radius=radius)
    try:
        Sig = ad.covariance(spec, (2, H, W))
    except ValueError as exc:           # a band can be empty on a small grid: that must say so
        assert "spectral" in str(exc)
        pytest.skip(f"empty band on {H}x{W}/{radius}")
    N = 2 * H * W
    assert abs(Sig.trace().item() / N - 1.0) < 1e-12
    # "none" is not calibrated: its trace is mean(w^2) of the raw weights
    raw = ad.covariance(ad.NoiseSpec(spectral=sp, radius=radius, normalize="none"), (2, H, W))
    w = R.spectral_weights(spec, H, W)[0][0]
    assert abs(raw.trace().item() / N - (w ** 2).mean().item()) < 1e-12 * max(1.0, (w ** 2).mean().item())


@pytest.mark.parametrize("gl,gh", [(0.5, 0.5), (0.3, 0.9), (1.0, 0.0)])
def test_independent_twoband_total_variance(gl, gh):
    spec = ad.NoiseSpec(spectral=ad.TwoBand(gl, (0, 0.3), gh, (0.3, 1.0), "independent"))
    Sig = ad.covariance(spec, (1, 8, 8))
    assert abs(Sig.trace().item() / 64 - (gl ** 2 + gh ** 2)) < 1e-12


@pytest.mark.parametrize("sp", [ad.PowerLaw(0.5), ad.PowerLaw(-0.08), ad.Band(0.1, 0.3),
                                ad.TwoBand(0.8, (0, 0.2), 0.2, (0.2, 0.5))], ids=repr)
def test_calibrated_empirical_unit_variance(sp):
    """Mean per-pixel variance of many draws is 1 within 5 standard errors; the uncalibrated
    variance mean(w^2) lies outside that bound (asserted)."""
    B, C, H, W = 2000, 2, 16, 16
    spec = ad.NoiseSpec(spectral=sp)
    x = ad.shaped_noise((B, C, H, W), spec, seed=77, backend="cpu").double()
    m = (x ** 2).mean().item()
    w = R.spectral_weights(spec, H, W)[0][0]
    lam = (w ** 2) / (w ** 2).mean()                     # eigenvalues of the calibrated plane covariance
    # Var(mean of x^2 over one plane) = 2 tr(Sigma^2) / (HW)^2; planes are independent
    se = math.sqrt(2 * (lam ** 2).sum().item()) / (H * W) / math.sqrt(B * C)
    assert abs(m - 1.0) < 5 * se, (m, se)
    assert abs((w ** 2).mean().item() - 1.0) > 10 * se   # missing calibration would fail by > 2x margin


# ---------------------------------------------------------------------------------------------
# 5. realness: Hermitian-symmetric weights, real filter output
# ---------------------------------------------------------------------------------------------
REAL_SPECTRA = [ad.PowerLaw(0.5), ad.PowerLaw(-0.3), ad.Band(0.1, 0.35), ad.Band(0.0, 0.2),
                ad.TwoBand(0.6, (0, 0.25), 0.4, (0.2, 0.7)),
                ad.TwoBand(0.6, (0, 0.25), 0.4, (0.2, 0.7), "independent")]


@pytest.mark.parametrize("sp", REAL_SPECTRA, ids=repr)
@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (6, 9), (9, 10), (1, 6)])
@pytest.mark.parametrize("radius", ["cycles", "nyquist1", "rmax1"])
def test_weights_hermitian_and_filter_real(sp, hw, radius):
    H, W = hw
    spec = ad.NoiseSpec(spectral=sp, radius=radius)
    try:
        weights, _ = R.spectral_weights(spec, H, W)
    except ValueError as exc:
        assert "spectral" in str(exc)
        pytest.skip("empty band")
    iy = (-torch.arange(H)) % H
    ix = (-torch.arange(W)) % W
    x = torch.randn(3, H, W, dtype=F64, generator=torch.Generator().manual_seed(H * W))
    for w in weights:
        mirrored = w[iy][:, ix]                              # w(-f mod N)
        assert torch.equal(w, mirrored)
        out = torch.fft.ifft2(torch.fft.fft2(x) * w)
        assert out.imag.abs().max().item() < 1e-12
        # float64 rounding of the output's scale (the DC bin, applied to the plane mean outside
        # the FFT, may be ~1e3 times the rest)
        scale = max(1.0, float(out.real.abs().max()))
        torch.testing.assert_close(R.filter_planes(x, w), out.real, rtol=0, atol=1e-14 * scale)


def test_radius_grid_is_unshifted_fftfreq():
    """DC at [0, 0]; r from fftfreq, not linspace (App. C's 'equivalently' is false)."""
    # to 2 ulps: torch's float64 sqrt is not correctly rounded on every CPU (on some AVX-512 VMs
    # sqrt(0.03125) comes out one ulp below numpy's); a linspace grid differs by O(1e-2)
    def same(a, b):
        np.testing.assert_allclose(a, b, rtol=4.5e-16, atol=0)

    for H, W in [(8, 8), (7, 9), (5, 4)]:
        r = R.radius(H, W, "cycles")
        assert r[0, 0].item() == 0.0
        same(r.numpy(), np_radius(H, W))
        same(R.radius(H, W, "nyquist1").numpy(), 2 * np_radius(H, W))
        same(R.radius(H, W, "rmax1").numpy(), np_radius(H, W, "rmax1"))
    assert abs(R.radius(32, 32).max().item() - math.sqrt(0.5)) < 1e-15


# ---------------------------------------------------------------------------------------------
# 6. radius conventions: bin counts at 32 x 32 (docs/papers.md section 2.4)
# ---------------------------------------------------------------------------------------------
BANDS = [(round(0.1 * i, 1), round(0.1 * (i + 1), 1)) for i in range(1, 9)]
BIN_COUNTS = {
    "nyquist1": [28, 32, 60, 68, 100, 108, 108, 148],
    "rmax1": [48, 76, 108, 152, 176, 216, 142, 64],
}


@pytest.mark.parametrize("radius", list(BIN_COUNTS))
def test_band_bin_counts(radius):
    r = R.radius(32, 32, radius)
    counts = [int(((r >= a) & (r <= b)).sum()) for a, b in BANDS]
    assert counts == BIN_COUNTS[radius]
    # the same counts through the Band weights the ops use
    for (a, b), want in zip(BANDS, BIN_COUNTS[radius]):
        w, _ = R.spectral_weights(ad.NoiseSpec(spectral=ad.Band(a, b), radius=radius), 32, 32)
        assert int(w.sum()) == want


def test_band_bin_counts_cycles():
    r = R.radius(32, 32, "cycles")
    assert int(((r >= 0.7) & (r <= 0.8)).sum()) == 1
    assert int(((r >= 0.8) & (r <= 0.9)).sum()) == 0
    w, _ = R.spectral_weights(ad.NoiseSpec(spectral=ad.Band(0.7, 0.8)), 32, 32)
    assert int(w.sum()) == 1
    with pytest.raises(ValueError, match="spectral"):
        R.spectral_weights(ad.NoiseSpec(spectral=ad.Band(0.8, 0.9)), 32, 32)
    # r <= 0.5 covers 77.6% of the bins, 0.5 <= r <= 1 covers 22.6% (both contain the r=0.5 ring)
    assert int((r <= 0.5).sum()) == 795                     # 77.6% of 1024
    assert int((r >= 0.5).sum()) == 231                     # 22.6%
    assert int((r == 0.5).sum()) == 2                       # the ring counted in both


# ---------------------------------------------------------------------------------------------
# 7. SAGD appendix E compatibility
# ---------------------------------------------------------------------------------------------
def _appE_filter(eps, w):
    """App. E: fftn over (-2, -1), multiply, ifftn, .real, divide by per-(b, c) std (ddof=0) + 1e-8."""
    F = np.fft.fftn(eps, axes=(-2, -1))
    out = np.fft.ifftn(F * w, axes=(-2, -1)).real
    return out / (out.std(axis=(-2, -1), keepdims=True) + 1e-8)


def _appE_r(H, W):
    return np.sqrt(np.fft.fftfreq(W)[None, :] ** 2 + np.fft.fftfreq(H)[:, None] ** 2)


def sagd_powerlaw_noise(eps, alpha, eps_floor=1e-10):
    H, W = eps.shape[-2:]
    return _appE_filter(eps, (_appE_r(H, W) + eps_floor) ** alpha)


def sagd_bandpass_noise(eps, a, b):
    H, W = eps.shape[-2:]
    r = _appE_r(H, W)
    return _appE_filter(eps, ((r >= a) & (r <= b)).astype(np.float64))


def sagd_two_band(eps2, gl, low, gh, high):
    return gl * sagd_bandpass_noise(eps2[0], *low) + gh * sagd_bandpass_noise(eps2[1], *high)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 9, 12), (1, 2, 32, 32)])
@pytest.mark.parametrize("alpha", [0.5, 0.08, -0.08])
def test_appendix_e_power_law(shape, alpha):
    eps = R.white_noise(shape, 42).double()
    want = torch.from_numpy(sagd_powerlaw_noise(eps.numpy(), alpha))
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(alpha), normalize="per_sample")
    torch.testing.assert_close(R.apply_operator(eps, spec), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.apply_operator(eps, spec, backend="reference"), want, rtol=0, atol=1e-6)
    # calibrated (the default) is a different, deterministic scale: it must not match
    other = R.apply_operator(eps, ad.NoiseSpec(spectral=ad.PowerLaw(alpha)))
    assert (other - want).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 1, 11, 10)])
@pytest.mark.parametrize("band", [(0.1, 0.3), (0.0, 0.25), (0.3, 0.71)])
def test_appendix_e_bandpass(shape, band):
    eps = R.white_noise(shape, 7).double()
    want = torch.from_numpy(sagd_bandpass_noise(eps.numpy(), *band))
    spec = ad.NoiseSpec(spectral=ad.Band(*band), normalize="per_sample")
    torch.testing.assert_close(R.apply_operator(eps, spec), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 2, 9, 8)])
@pytest.mark.parametrize("gl,low,gh,high", [(0.5, (0, 0.5), 0.5, (0.5, 1.0)),
                                            (0.3, (0, 0.2), 0.7, (0.2, 0.6))])
def test_appendix_e_two_band_independent(shape, gl, low, gh, high):
    eps2 = torch.stack([R.white_noise(shape, 5, draw=0), R.white_noise(shape, 5, draw=1)]).double()
    want = torch.from_numpy(sagd_two_band(eps2.numpy(), gl, low, gh, high))
    spec = ad.NoiseSpec(spectral=ad.TwoBand(gl, low, gh, high, "independent"), normalize="per_sample")
    torch.testing.assert_close(R.apply_operator(eps2, spec), want, rtol=0, atol=1e-6)
    # the draw order matters (low band from draw 0, high band from draw 1)
    swapped = R.apply_operator(eps2.flip(0), spec)
    assert (swapped - want).abs().max() > 1e-2
    # and shaped_noise draws exactly these two streams
    got = R.shaped_noise(shape, spec, seed=5, dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. shared two-band 0.5/0.5, (0, 0.5) + (0.5, 1): white except the r == 0.5 ring
# ---------------------------------------------------------------------------------------------
def _ring_exact(H, W):
    """Bins with r == 0.5 exactly, by integer arithmetic: (ky/H)^2 + (kx/W)^2 = 1/4."""
    ky = np.array([i if i < (H + 1) // 2 else i - H for i in range(H)])[:, None]
    kx = np.array([i if i < (W + 1) // 2 else i - W for i in range(W)])[None, :]
    return 4 * (ky ** 2 * W ** 2 + kx ** 2 * H ** 2) == H ** 2 * W ** 2


@pytest.mark.parametrize("hw,ring", [((8, 8), 2), ((10, 10), 10), ((7, 9), 0), ((6, 8), 2), ((12, 5), 1)])
def test_shared_two_band_is_white_except_ring(hw, ring):
    H, W = hw
    ring_mask = _ring_exact(H, W)
    assert int(ring_mask.sum()) == ring
    spec = ad.NoiseSpec(spectral=ad.TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1.0)), normalize="none")
    Sig = ad.covariance(spec, (1, H, W)).numpy()
    # unitary 2-D DFT of the flattened plane: D = F Sigma F^H must be diagonal with |w|^2
    Fh = np.fft.fft(np.eye(H), norm="ortho")
    Fw = np.fft.fft(np.eye(W), norm="ortho")
    F = np.kron(Fh, Fw)
    D = F @ Sig @ F.conj().T
    diag = D.diagonal().real.reshape(H, W)
    assert np.abs(D - np.diag(D.diagonal())).max() < 1e-12
    expected = np.where(ring_mask, 1.0, 0.25)         # (0.5 + 0.5)^2 on the ring, 0.5^2 elsewhere
    np.testing.assert_allclose(diag, expected, rtol=0, atol=1e-12)
    # calibrated: exactly the identity when there is no ring
    cal = ad.covariance(ad.NoiseSpec(spectral=spec.spectral), (1, H, W)).numpy()
    if ring == 0:
        np.testing.assert_allclose(cal, np.eye(H * W), rtol=0, atol=1e-12)
    else:
        assert np.abs(cal - np.eye(H * W)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 9. add_noise targets
# ---------------------------------------------------------------------------------------------
def test_alphas_cumprod_by_hand(schedule):
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(schedule.alphas_cumprod.double().numpy(), abar, rtol=1e-4, atol=0)
    assert abs(abar[999] - 4.036e-5) < 1e-8                 # the well-known linear-schedule endpoint


def _hand_shaped(eps, spec, t, schedule):
    """n = S(t) (x) (c T_w) eps written out with numpy FFTs and the closed-form S."""
    B, C, H, W = eps.shape
    x = eps.numpy()
    sp = spec.spectral
    if sp is not None:
        w = (np_radius(H, W, spec.radius) + sp.eps) ** sp.alpha
        w = w / np.sqrt((w ** 2).mean())
        x = np.fft.ifft2(np.fft.fft2(x, axes=(-2, -1)) * w, axes=(-2, -1)).real
    x = torch.from_numpy(np.ascontiguousarray(x))
    sq = spec.squeeze
    betas = schedule.betas.double()
    out = torch.empty_like(x)
    for b in range(B):
        tau = (betas[t[b]] / betas.max()).item()
        form = sdm_matrix if sq.variant == "sdm" else hdm_matrix
        S = form(sq.axes, [s * tau for s in sq.strength])
        out[b] = torch.einsum("ij,jhw->ihw", S, x[b])
    return out


@pytest.mark.parametrize("target", ["epsilon", "v", "x0", "flow"])
@pytest.mark.parametrize("variant", ["sdm", "heisenberg"])
def test_add_noise_targets(schedule, target, variant):
    B, C, H, W = 4, 3, 8, 6
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(B, C, H, W, dtype=F64, generator=g) * 2 - 1
    eps = torch.randn(B, C, H, W, dtype=F64, generator=g)
    t = torch.tensor([0, 499, 999, 250])
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(C, 1, 8), -0.4, variant), ad.PowerLaw(0.3))
    x_t, tgt = ad.add_noise(x0, t, spec, schedule, noise=eps, target=target, backend="reference")
    n = _hand_shaped(eps, spec, t, schedule)
    abar = schedule.alphas_cumprod[t]                       # float32, as diffusers keeps it
    a = abar.double().sqrt()[:, None, None, None]
    b = (1 - abar).double().sqrt()[:, None, None, None]    # 1 - abar in float32, as diffusers
    torch.testing.assert_close(x_t, a * x0 + b * n, rtol=0, atol=1e-12)
    want = {"epsilon": n, "v": a * n - b * x0, "x0": x0, "flow": n - x0}[target]
    torch.testing.assert_close(tgt, want, rtol=0, atol=1e-12)
    # the noise really was shaped (the target is not the white input)
    assert (n - eps).abs().max() > 1e-2


def test_add_noise_uses_the_stream(schedule):
    """Without noise=, add_noise shapes white_noise(seed, offset) — the same noise as shaped_noise."""
    B, C, H, W = 3, 3, 8, 8
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(C, 1, 2), 0.5), ad.Band(0.0, 0.4))
    x0 = torch.zeros(B, C, H, W)
    t = torch.tensor([999, 999, 999])
    x_t, n = ad.add_noise(x0, t, spec, schedule, seed=11, offset=3, backend="reference")
    want = R.shaped_noise((B, C, H, W), spec, t, schedule, seed=11, offset=3)
    assert torch.equal(n, want)
    b = (1 - schedule.alphas_cumprod[999].double()).sqrt()
    torch.testing.assert_close(x_t.double(), b * want.double(), rtol=1e-6, atol=1e-7)


def test_add_noise_rejects_unknown_target(schedule):
    with pytest.raises(ValueError, match="target"):
        R.add_noise(torch.zeros(1, 1, 2, 2), torch.tensor([0]), ad.NoiseSpec(), schedule, target="score")


# ---------------------------------------------------------------------------------------------
# 10. covariance() API
# ---------------------------------------------------------------------------------------------
def test_covariance_per_sample_raises():
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(0.5), normalize="per_sample")
    with pytest.raises(ValueError, match="per_sample"):
        ad.covariance(spec, (1, 4, 4))


def test_covariance_requires_timesteps_when_time_varying(schedule):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), 0.5))
    with pytest.raises(ValueError, match="timesteps"):
        ad.covariance(spec, (3, 2, 2), schedule=schedule)


def test_covariance_batched_and_time_varying(schedule):
    C, H, W = 3, 2, 3
    V = random_axes(C, 1, 6)
    s = 1.0
    spec = ad.NoiseSpec(ad.Squeeze(V, s), ad.PowerLaw(0.4))
    ts = torch.tensor([0, 999, 499])
    Sig = ad.covariance(spec, (5, C, H, W), timesteps=ts, schedule=schedule)   # leading B ignored
    N = C * H * W
    assert Sig.shape == (3, N, N)
    for i, t in enumerate(ts.tolist()):
        single = ad.covariance(spec, (C, H, W), timesteps=t, schedule=schedule)
        assert single.shape == (N, N)
        assert torch.equal(Sig[i], single)
    assert (Sig[0] - Sig[1]).abs().max() > 0.3
    # along v (x) any spatial vector u: u^T Sigma u = e^{-2 s tau(t)} u^T Sigma_w u
    Sw = ad.covariance(ad.NoiseSpec(spectral=spec.spectral), (1, H, W))
    u = torch.randn(H * W, dtype=F64, generator=torch.Generator().manual_seed(0))
    vu = torch.kron(V[:, 0], u)
    for i, tau in enumerate([0.005, 1.0, 0.005 + 0.995 * 499 / 999]):
        got = (vu @ Sig[i] @ vu).item()
        assert abs(got / (u @ Sw @ u).item() - math.exp(-2 * s * tau)) < 1e-6
    # a time-invariant spec broadcasts over the batch of timesteps
    Sc = ad.covariance(ad.NoiseSpec(spectral=ad.PowerLaw(0.4)), (1, H, W), timesteps=ts)
    assert Sc.shape == (3, H * W, H * W) and torch.equal(Sc[0], Sc[2])
