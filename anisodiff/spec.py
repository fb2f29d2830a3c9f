"""NoiseSpec and its building blocks: what shape the forward noise has.

A spec is plain data (floats, small tensors, strings). It validates itself on construction, so a
bad spec fails where it is written, and it round-trips through JSON (never pickle) so a saved model
keeps its noise. The math that turns a spec into noise lives in ``reference.py``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
from typing import Any, Sequence

import torch

__all__ = [
    "Squeeze",
    "PowerLaw",
    "Band",
    "TwoBand",
    "SpectralTable",
    "PyramidNoise",
    "OffsetNoise",
    "NoiseSpec",
    "SPEC_FORMAT",
    "SPEC_VERSION",
]

SPEC_FORMAT = "anisodiff.NoiseSpec"
SPEC_VERSION = 1

SQUEEZE_VARIANTS = ("sdm", "heisenberg")
SQUEEZE_SCHEDULES = ("beta", "constant", "linear")
NORMALIZE_MODES = ("calibrated", "per_sample", "none")
RADIUS_CONVENTIONS = ("cycles", "nyquist1", "rmax1")
MIXTURE_MODES = ("shared", "independent")

_ORTHONORMAL_TOL = 1e-5
# A spec is kilobytes; a full SpectralTable at 1024 x 1024 is ~20 MB of JSON text. Files are read
# up to this size and refused beyond it (reading /dev/zero must not exhaust memory).
MAX_JSON_BYTES = 64 << 20

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 8


def brief(value: Any) -> str:
    """repr() for error messages, cut to ~100 characters: a message never echoes a huge argument."""
    return _BRIEF.repr(value)


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES):
    """Parse a JSON file of at most ``max_bytes`` bytes. Every malformed input (too large, not
    UTF-8, not JSON, nested too deeply) raises a ValueError naming the file; no code runs."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"{name}: {what}: larger than {max_bytes >> 20} MiB; not a {what} file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {what}: not a UTF-8 JSON text file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: {what}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{name}: {what}: JSON nested too deeply") from None


def check_format_version(d: dict, where: str, fmt: str, newest: int) -> int:
    """The ``version`` field of a saved object: a positive int no newer than ``newest``."""
    if d.get("format", fmt) != fmt:
        raise ValueError(f"{where}.format: expected {fmt!r}, got {brief(d.get('format'))}")
    version = d.get("version", newest)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}.version: expected a positive integer, got {brief(version)}")
    if version > newest:
        raise ValueError(f"{where}.version: {version} is newer than this anisodiff understands "
                         f"({newest}); upgrade anisodiff")
    return version


class _Immutable:
    """Specs are values: once built they never change, so everything derived from them (kernel
    tables, compiled graphs, the cached JSON) stays valid. Build a new one instead of editing.

    A spec owns private copies of the tensors it is given, and its tensor attributes (``axes``,
    a tabulated ``schedule``, ``weights``) return fresh copies, so no mutation, of the caller's
    tensor or of what the spec hands out, can make two backends see different specs."""

    def _seal(self) -> None:
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_sealed", False):
            raise AttributeError(f"{type(self).__name__} is immutable; build a new one instead of "
                                 f"setting {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")


def _finite_float(value: Any, name: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}: must be finite, got {out}")
    return out


def _choice(value: Any, name: str, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: must be one of {list(options)}, got {brief(value)}")
    return value


def _as_float_tensor(value: Any, name: str, ndim: int) -> torch.Tensor:
    """A private float64 CPU copy of ``value`` (never an alias of the caller's tensor)."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError("strings are not numbers")
        raw = torch.as_tensor(value)
        if raw.dtype == torch.bool:
            raise TypeError("booleans are not numbers")
        if raw.is_complex():
            raise TypeError("complex values have no place here (the weights must be real)")
        if isinstance(value, torch.Tensor):
            t = value.detach().to(device="cpu", dtype=torch.float64, copy=True)
        else:  # lists/arrays straight to float64 (inferring first would round lists to float32)
            t = torch.as_tensor(value, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a {ndim}-D array of real numbers ({brief(str(exc))})") from None
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: must not be empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


# --------------------------------------------------------------------------------------------
# Channel part (SDM / HDM)
# --------------------------------------------------------------------------------------------
class Squeeze(_Immutable):
    """Rescale the noise along the principal colour axes, with a time-varying strength.

    Args:
        axes: ``[C, k]`` tensor whose columns are orthonormal principal axes of the C x C pixel
            covariance of the data (see ``fit_channel_pca``).
        strength: ``s`` (one float, used for every axis) or ``k`` floats. ``s > 0`` squeezes (less
            variance on the axis), ``s < 0`` antisqueezes; ``s = 0`` is isotropic noise exactly.
        variant: ``"sdm"``: ``S = I + sum_k (exp(-r_k) - 1) v_k v_k^T`` (only the axes change);
            ``"heisenberg"`` (HDM): the orthogonal complement is scaled by
            ``g = exp(sum_k r_k / (C - k))`` so that ``det S = 1``.
        schedule: time profile ``tau(t)`` with ``r_k(t) = s_k * tau(t)``: ``"beta"``
            (``beta_t / beta_max``, the official SDM code), ``"constant"`` (1), ``"linear"``
            (``t / (T - 1)``) or a 1-D tensor of ``T`` values.
        orthonormalize: if True, non-orthonormal ``axes`` are orthonormalised (QR, column signs
            kept) instead of rejected.
    """

    def __init__(self, axes, strength=0.0, variant: str = "sdm", schedule="beta", *,
                 orthonormalize: bool = False):
        axes_t = _as_float_tensor(axes, "axes", 2)
        C, k = axes_t.shape
        if k > C:
            raise ValueError(f"axes: expected shape [C, k] with k <= C, got {tuple(axes_t.shape)}")
        gram = axes_t.T @ axes_t
        if not torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=_ORTHONORMAL_TOL, rtol=0):
            if not orthonormalize:
                err = (gram - torch.eye(k, dtype=torch.float64)).abs().max().item()
                raise ValueError(
                    f"axes: columns must be orthonormal (max |V^T V - I| = {err:.3g}); "
                    "pass orthonormalize=True to orthonormalise them")
            q, rr = torch.linalg.qr(axes_t)
            if (rr.diagonal().abs() < 1e-12).any():
                raise ValueError("axes: columns are linearly dependent, cannot orthonormalise")
            axes_t = q * torch.sign(rr.diagonal())
        self._axes = axes_t

        if isinstance(strength, numbers.Real):
            strengths = [_finite_float(strength, "strength")] * k
        else:
            if not isinstance(strength, (list, tuple, torch.Tensor)):
                raise TypeError(f"strength: expected a float or k floats, got {type(strength).__name__}")
            items = strength.reshape(-1).tolist() if isinstance(strength, torch.Tensor) else list(strength)
            strengths = [_finite_float(s, "strength") for s in items]  # Python floats: float64
            if len(strengths) != k:
                raise ValueError(f"strength: expected 1 or k={k} values, got {len(strengths)}")
        self.strength = tuple(strengths)

        if variant == "hdm":
            variant = "heisenberg"
        self.variant = _choice(variant, "variant", SQUEEZE_VARIANTS)
        if self.variant == "heisenberg" and k >= C:
            raise ValueError(f"variant: 'heisenberg' needs k < C to keep det S = 1 (got k={k}, C={C})")

        if isinstance(schedule, str):
            self._schedule = _choice(schedule, "schedule", SQUEEZE_SCHEDULES)
        else:
            self._schedule = _as_float_tensor(schedule, "schedule", 1)
        self._seal()

    @property
    def axes(self) -> torch.Tensor:
        """The ``[C, k]`` float64 axes (a copy: the spec's own cannot be changed)."""
        return self._axes.clone()

    @property
    def schedule(self):
        """The profile name, or a copy of the ``[T]`` float64 table."""
        return self._schedule if isinstance(self._schedule, str) else self._schedule.clone()

    @property
    def channels(self) -> int:
        return self._axes.shape[0]

    @property
    def k(self) -> int:
        return self._axes.shape[1]

    @property
    def is_identity(self) -> bool:
        return all(s == 0.0 for s in self.strength)

    @property
    def time_varying(self) -> bool:
        return not (isinstance(self._schedule, str) and self._schedule == "constant")

    def to_dict(self) -> dict:
        sched = self._schedule if isinstance(self._schedule, str) else self._schedule.tolist()
        return {"axes": self._axes.tolist(), "strength": list(self.strength),
                "variant": self.variant, "schedule": sched}

    @classmethod
    def from_dict(cls, d: dict) -> "Squeeze":
        _check_keys(d, "squeeze", {"axes", "strength", "variant", "schedule"})
        for key in ("axes", "strength"):
            if key not in d:
                raise ValueError(f"squeeze.{key}: missing")
        return cls(d["axes"], d["strength"], d.get("variant", "sdm"), d.get("schedule", "beta"))

    def __repr__(self) -> str:
        sched = self._schedule if isinstance(self._schedule, str) else f"tensor[{self._schedule.numel()}]"
        return (f"Squeeze(axes=[{self.channels}x{self.k}], strength={list(self.strength)}, "
                f"variant={self.variant!r}, schedule={sched!r})")


# --------------------------------------------------------------------------------------------
# Spatial part (SAGD): real weights w >= 0 on the unshifted fftfreq grid
# --------------------------------------------------------------------------------------------
class PowerLaw(_Immutable):
    """``w(f) = (r + eps) ** alpha``: alpha > 0 puts more noise in high frequencies, alpha < 0 in low
    ones, alpha = 0 is white noise exactly. ``eps = 1e-10`` is the papers' DC floor."""

    kind = "power_law"

    def __init__(self, alpha: float, eps: float = 1e-10):
        self.alpha = _finite_float(alpha, "alpha")
        self.eps = _finite_float(eps, "eps")
        if self.eps < 0:
            raise ValueError(f"eps: must be >= 0, got {self.eps}")
        if self.eps == 0 and self.alpha < 0:
            raise ValueError("eps: must be > 0 when alpha < 0 (the DC weight would be infinite)")
        self._seal()

    def to_dict(self) -> dict:
        return {"type": self.kind, "alpha": self.alpha, "eps": self.eps}

    def __repr__(self) -> str:
        return f"PowerLaw(alpha={self.alpha}, eps={self.eps})"


def _band(pair, name: str) -> tuple[float, float]:
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an (a, b) pair, got {brief(pair)}") from None
    a = _finite_float(a, f"{name}[0]")
    b = _finite_float(b, f"{name}[1]")
    if a < 0 or a > b:
        raise ValueError(f"{name}: need 0 <= a <= b, got ({a}, {b})")
    return a, b


class Band(_Immutable):
    """Band mask ``w = 1{a <= r <= b}`` (inclusive edges, radius in the spec's convention)."""

    kind = "band"

    def __init__(self, a: float, b: float):
        self.a, self.b = _band((a, b), "band")
        self._seal()

    def to_dict(self) -> dict:
        return {"type": self.kind, "a": self.a, "b": self.b}

    def __repr__(self) -> str:
        return f"Band({self.a}, {self.b})"


class TwoBand(_Immutable):
    """Two-band mixture ``gamma_low * M[low] + gamma_high * M[high]``.

    ``mixture="shared"`` (default) filters ONE white draw with the combined weight, so
    ``TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1))`` is white noise (up to the r = 0.5 ring, counted in both
    bands). ``mixture="independent"`` reproduces the SAGD appendix pseudo-code: two white draws, each
    band-filtered and normalised on its own, then mixed (total variance gamma_l^2 + gamma_h^2).
    """

    kind = "two_band"

    def __init__(self, gamma_low: float, low, gamma_high: float, high, mixture: str = "shared"):
        self.gamma_low = _finite_float(gamma_low, "gamma_low")
        self.gamma_high = _finite_float(gamma_high, "gamma_high")
        if self.gamma_low < 0 or self.gamma_high < 0:
            raise ValueError(f"gamma_low/gamma_high: must be >= 0, got {self.gamma_low}, {self.gamma_high}")
        if self.gamma_low == 0 and self.gamma_high == 0:
            raise ValueError("gamma_low/gamma_high: at least one must be > 0")
        self.low = _band(low, "low")
        self.high = _band(high, "high")
        self.mixture = _choice(mixture, "mixture", MIXTURE_MODES)
        self._seal()

    @property
    def draws(self) -> int:
        return 2 if self.mixture == "independent" else 1

    def to_dict(self) -> dict:
        return {"type": self.kind, "gamma_low": self.gamma_low, "low": list(self.low),
                "gamma_high": self.gamma_high, "high": list(self.high), "mixture": self.mixture}

    def __repr__(self) -> str:
        return (f"TwoBand({self.gamma_low}, {self.low}, {self.gamma_high}, {self.high}, "
                f"mixture={self.mixture!r})")


class SpectralTable(_Immutable):
    """An arbitrary weight table ``[H, W]`` on the unshifted ``fftfreq`` grid (e.g. fitted from
    data). It must be real, finite, >= 0 and symmetric, ``w(f) = w(-f)``, so the noise is real."""

    kind = "table"

    def __init__(self, weights):
        w = _as_float_tensor(weights, "weights", 2)
        if (w < 0).any():
            raise ValueError("weights: must be >= 0 everywhere")
        if not (w > 0).any():
            raise ValueError("weights: must not be all zero")
        mirrored = torch.roll(torch.flip(w, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))  # w(-f mod N)
        if not torch.allclose(w, mirrored, rtol=1e-6, atol=1e-12 * float(w.abs().max())):
            raise ValueError(
                "weights: must be symmetric on the unshifted fftfreq grid, w[i, j] == "
                "w[-i % H, -j % W]; symmetrise with 0.5 * (w + w(-f)) if that is what you want")
        self._weights = w
        self._seal()

    @property
    def weights(self) -> torch.Tensor:
        """The ``[H, W]`` float64 table (a copy: the spec's own cannot be changed)."""
        return self._weights.clone()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._weights.shape)

    def to_dict(self) -> dict:
        return {"type": self.kind, "weights": self._weights.tolist()}

    def __repr__(self) -> str:
        return f"SpectralTable([{self.shape[0]}x{self.shape[1]}])"


class PyramidNoise(_Immutable):
    """Pyramid (multi-resolution) noise as a spectral part: the trainers'
    ``--multires_noise_iterations`` / ``--multires_noise_discount`` (kohya sd-scripts'
    ``pyramid_noise_like``), as the stationary Gaussian noise with the SAME EXPECTED POWER SPECTRUM
    (``anisodiff/pyramid.py``: derived exactly over the recipe's random scale factors, its
    stopping rule and its global std; in the limit of many planes per call). It fuses like any
    spectral part. It is not the recipe draw for draw, nor in every statistic: the recipe's noise
    is non-stationary, non-Gaussian and couples a batch through its per-call scale factors and
    std. The exact recipe is :func:`anisodiff.reference.pyramid_noise_like`.

    Args:
        iterations: the recipe's levels ``L`` (an integer in [1, 64]).
        discount: the amplitude ratio between levels, in [0, 1].

    The weights are ``sqrt`` of that spectrum: mean square 1, so ``"calibrated"`` leaves them as
    they are. The radius convention of the spec does not apply (the spectrum is not radial).
    """

    kind = "pyramid"

    def __init__(self, iterations: int = 6, discount: float = 0.4):
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
            raise TypeError(f"iterations: expected an integer, got {type(iterations).__name__}")
        self.iterations = int(iterations)
        if not 1 <= self.iterations <= 64:
            raise ValueError(f"iterations: must be in [1, 64], got {self.iterations}")
        self.discount = _finite_float(discount, "discount")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount: must be in [0, 1], got {self.discount}")
        self._seal()

    def to_dict(self) -> dict:
        return {"type": self.kind, "iterations": self.iterations, "discount": self.discount}

    def __repr__(self) -> str:
        return f"PyramidNoise(iterations={self.iterations}, discount={self.discount})"


_SPECTRAL_TYPES = {"power_law": PowerLaw, "band": Band, "two_band": TwoBand, "table": SpectralTable,
                   "pyramid": PyramidNoise}


def _spectral_from_dict(d: dict):
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError("spectral: expected an object with a 'type' field")
    kind = d["type"]
    if not isinstance(kind, str) or kind not in _SPECTRAL_TYPES:
        raise ValueError(f"spectral.type: must be one of {list(_SPECTRAL_TYPES)}, got {brief(kind)}")
    args = {k: v for k, v in d.items() if k != "type"}
    fields = {"power_law": ({"alpha"}, {"eps"}), "band": ({"a", "b"}, set()),
              "two_band": ({"gamma_low", "low", "gamma_high", "high"}, {"mixture"}),
              "table": ({"weights"}, set()), "pyramid": ({"iterations", "discount"}, set())}
    required, optional = fields[kind]
    _check_keys(args, "spectral", required | optional)
    missing = sorted(required - set(args))
    if missing:
        raise ValueError(f"spectral.{missing[0]}: missing (a {kind!r} spectral part needs "
                         f"{sorted(required)})")
    return _SPECTRAL_TYPES[kind](**args)


def _check_keys(d: dict, where: str, allowed: set) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {brief(sorted(map(str, unknown)))}")


class OffsetNoise(_Immutable):
    """Offset noise, the trainers' ``noise + strength * randn(B, C, 1, 1)`` (kohya sd-scripts,
    diffusers' ``--noise_offset``): a per-(sample, channel) constant added to the spatial noise.

    A constant plane is the DC bin of the unitary DFT and nothing else, so it is a DC weight: the
    spatial part's DC power grows by ``strength^2 H W`` (per pixel: variance ``strength^2`` more,
    fully correlated across the plane). It fuses with any spectral part and is squeezed by
    ``S(t)`` like the rest: ``n = S(t) (T_w eps + strength m)``, ``m ~ N(0, 1)`` per (b, c). The
    calibration ``c`` is computed from the spectral part alone, so, as in the trainers' recipe,
    the offset ADDS ``strength^2`` per pixel. Equal to the trainers' noise in distribution (not
    draw for draw: the offset is the DC part of the same white draw, not a second one).

    ``random_strength=True`` is kohya's ``--noise_offset_random_strength``: every training step
    uses the strength ``u * strength``, ``u ~ U[0, 1)`` drawn once per step and shared by the
    batch. Such a spec is a family of specs, one per step: :meth:`NoiseSpec.draw_offset` gives the
    step's spec (a per-call DC weight; the fused ops run it in their single pass), and the ops
    refuse the family itself."""

    def __init__(self, strength: float, random_strength: bool = False):
        self.strength = _finite_float(strength, "strength")
        if self.strength < 0:
            raise ValueError(f"strength: must be >= 0, got {self.strength}")
        if not isinstance(random_strength, bool):
            raise TypeError(f"random_strength: expected a bool, got {type(random_strength).__name__}")
        self.random_strength = random_strength
        self._seal()

    def to_dict(self) -> dict:
        # "random_strength" only when set, so fixed offsets read in every anisodiff version
        return {"strength": self.strength, **({"random_strength": True} if self.random_strength else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "OffsetNoise":
        _check_keys(d, "offset", {"strength", "random_strength"})
        if "strength" not in d:
            raise ValueError("offset.strength: missing")
        return cls(d["strength"], d.get("random_strength", False))

    def __repr__(self) -> str:
        return f"OffsetNoise({self.strength}" + (", random_strength=True)" if self.random_strength else ")")


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------
class NoiseSpec(_Immutable):
    """The shape of the forward noise: ``n = A(t) eps`` with ``A(t) = S(t) (x) T_w``.

    Args:
        squeeze: a :class:`Squeeze` (channel part, SDM/HDM) or None.
        spectral: a :class:`PowerLaw`, :class:`Band`, :class:`TwoBand`, :class:`SpectralTable`
            (spatial part, SAGD) or :class:`PyramidNoise` (the trainers' multi-resolution noise)
            or None.
        normalize: how the spatial part is scaled. ``"calibrated"`` (default): ``c = mean(w^2)^-1/2``,
            exact ``N(0, Sigma_w)`` with unit mean per-pixel variance; ``"per_sample"``: each (b, c)
            plane divided by its spatial std (ddof=0) + 1e-8, as in the SAGD appendix code;
            ``"none"``: no scaling.
        radius: radial frequency convention for the weights: ``"cycles"`` (cycles/pixel,
            r <= 0.7071), ``"nyquist1"`` (2r, Nyquist = 1) or ``"rmax1"`` (r / r.max()).
        offset: an :class:`OffsetNoise` (a DC weight added to the spatial part) or None. Not with
            ``normalize="per_sample"`` (the plane std would divide it out again).
        temporal: False (default): video tensors ``[B, C, F, H, W]`` are filtered frame by frame.
            True: the spatio-temporal spectrum (docs/design.md section 6): the weights are over
            ``(f_t, f_y, f_x)``, radius ``sqrt(f_t^2 + f_y^2 + f_x^2)`` on each axis' own
            ``fftfreq`` grid in the ``radius`` convention, and each (b, c) ``F x H x W`` volume is
            filtered by a 3-D FFT (per-sample normalisation per volume, the DC bin and the offset
            are the volume's). Video tensors only; with a radial spectral part (PowerLaw, Band,
            TwoBand) or none (an offset, per-sample normalisation).

    ``NoiseSpec()`` is isotropic white noise.
    """

    def __init__(self, squeeze: Squeeze | None = None, spectral=None, *,
                 normalize: str = "calibrated", radius: str = "cycles",
                 offset: OffsetNoise | None = None, temporal: bool = False):
        if squeeze is not None and not isinstance(squeeze, Squeeze):
            raise TypeError(f"squeeze: expected anisodiff.Squeeze or None, got {type(squeeze).__name__}")
        if spectral is not None and not isinstance(spectral, tuple(_SPECTRAL_TYPES.values())):
            raise TypeError("spectral: expected PowerLaw, Band, TwoBand, SpectralTable, PyramidNoise "
                            f"or None, got {type(spectral).__name__}")
        self.squeeze = squeeze
        self.spectral = spectral
        self.normalize = _choice(normalize, "normalize", NORMALIZE_MODES)
        self.radius = _choice(radius, "radius", RADIUS_CONVENTIONS)
        if offset is not None and not isinstance(offset, OffsetNoise):
            raise TypeError(f"offset: expected anisodiff.OffsetNoise or None, got {type(offset).__name__}")
        if offset is not None and offset.strength == 0:
            offset = None  # zero offset is no offset: the same spec, the same JSON
        if offset is not None and self.normalize == "per_sample":
            raise ValueError("offset: not supported with normalize='per_sample' (the per-plane std "
                             "divides a constant plane out again)")
        self.offset = offset
        if not isinstance(temporal, bool):
            raise TypeError(f"temporal: expected a bool, got {type(temporal).__name__}")
        if temporal and isinstance(spectral, (SpectralTable, PyramidNoise)):
            raise ValueError(f"temporal: {type(spectral).__name__} is a 2-D (f_y, f_x) spectrum with no "
                             "temporal axis; the spatio-temporal spectrum takes PowerLaw, Band, TwoBand "
                             "(radial in (f_t, f_y, f_x)) or no spectral part")
        self.temporal = temporal
        self._seal()

    def draw_offset(self, generator: torch.Generator | None = None) -> "NoiseSpec":
        """The spec of one training step for a random-strength offset (kohya's
        ``--noise_offset_random_strength``): the offset strength ``u * strength`` with one
        ``u ~ U[0, 1)`` from ``generator`` (torch's global generator when None) for the whole call.
        Conditionally on u the noise is Gaussian with ``Sigma = S S^T (x) (Sigma_w + (u strength)^2
        1 1^T)``; over steps the offset variance averages to ``strength^2 / 3``. Any other spec is
        returned as it is."""
        if self.offset is None or not self.offset.random_strength:
            return self
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return NoiseSpec(self.squeeze, self.spectral, normalize=self.normalize, radius=self.radius,
                         offset=OffsetNoise(u * self.offset.strength), temporal=self.temporal)

    def spatial_part(self) -> "NoiseSpec":
        """This spec without its squeeze: the spatial filter (spectral part and offset)."""
        return NoiseSpec(None, self.spectral, normalize=self.normalize, radius=self.radius,
                         offset=self.offset, temporal=self.temporal)

    # -- properties used by the ops -----------------------------------------------------------
    @property
    def draws(self) -> int:
        """How many white draws one noise sample consumes (2 for an independent two-band mix)."""
        return self.spectral.draws if isinstance(self.spectral, TwoBand) else 1

    @property
    def time_varying(self) -> bool:
        return self.squeeze is not None and self.squeeze.time_varying and not self.squeeze.is_identity

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "squeeze": None if self.squeeze is None else self.squeeze.to_dict(),
            "spectral": None if self.spectral is None else self.spectral.to_dict(),
            "normalize": self.normalize,
            "radius": self.radius,
            # only when set, so specs without an offset read in every anisodiff version
            **({} if self.offset is None else {"offset": self.offset.to_dict()}),
            **({"temporal": True} if self.temporal else {}),  # only when set: old JSON unchanged
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSpec":
        if not isinstance(d, dict):
            raise ValueError(f"spec: expected a JSON object, got {type(d).__name__}")
        check_format_version(d, "spec", SPEC_FORMAT, SPEC_VERSION)
        _check_keys(d, "spec", {"format", "version", "squeeze", "spectral", "normalize", "radius",
                                "offset", "temporal"})
        squeeze = None if d.get("squeeze") is None else Squeeze.from_dict(d["squeeze"])
        spectral = None if d.get("spectral") is None else _spectral_from_dict(d["spectral"])
        offset = None if d.get("offset") is None else OffsetNoise.from_dict(d["offset"])
        return cls(squeeze, spectral, normalize=d.get("normalize", "calibrated"),
                   radius=d.get("radius", "cycles"), offset=offset, temporal=d.get("temporal", False))

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); computed once, the spec being immutable."""
        cached = self.__dict__.get("_json")
        if cached is None:
            cached = json.dumps(self.to_dict(), sort_keys=True)
            object.__setattr__(self, "_json", cached)
        return cached

    @classmethod
    def from_json(cls, text: str) -> "NoiseSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec: not valid JSON ({exc})") from None
        except RecursionError:
            raise ValueError("spec: JSON nested too deeply") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec as JSON (human-readable, no pickle)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NoiseSpec":
        """Read a spec written by :meth:`save` (at most ``MAX_JSON_BYTES``). Only JSON is parsed;
        no code runs."""
        d = read_json_file(path, "spec")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{os.fspath(path)}: {exc}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, NoiseSpec) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        tail = "" if self.offset is None else f", offset={self.offset!r}"
        tail += ", temporal=True" if self.temporal else ""
        return (f"NoiseSpec(squeeze={self.squeeze!r}, spectral={self.spectral!r}, "
                f"normalize={self.normalize!r}, radius={self.radius!r}{tail})")
