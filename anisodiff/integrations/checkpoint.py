"""The noise a checkpoint was trained with, in its safetensors metadata (LoRA files, full weights).

Trainers record their noise flags as string metadata of the safetensors file they save: kohya
sd-scripts writes ``ss_noise_offset``, ``ss_multires_noise_iterations``,
``ss_multires_noise_discount``, ``ss_ip_noise_gamma``, ... (every value ``str()``-ed, ``"None"``
when unset). anisodiff does the same, with two kinds of keys:

* ``anisodiff_noise_spec``: the whole :class:`~anisodiff.NoiseSpec` as its JSON (the source of
  truth when the spec is read back), with ``anisodiff_version`` beside it;
* the kohya keys where the spec has an equivalent, so tools that show a LoRA's training flags see
  them: an :class:`~anisodiff.OffsetNoise` is ``ss_noise_offset`` (and
  ``ss_noise_offset_random_strength`` when its strength is random), a
  :class:`~anisodiff.PyramidNoise` spectral part
  ``ss_multires_noise_iterations`` / ``ss_multires_noise_discount`` (same expected power spectrum,
  not the recipe draw for draw), the ``input_perturbation`` of the training call ``ss_ip_noise_gamma``
  (it is an argument of ``add_noise``, not part of the spec).

Reading (:func:`load_spec_from_safetensors`, :func:`noise_from_metadata`) takes
``anisodiff_noise_spec`` when present (kohya keys that disagree with it raise) and otherwise turns a
kohya checkpoint's flags into the equivalent spec: ``ss_noise_offset = o`` is
``NoiseSpec(offset=OffsetNoise(o))``, exactly the distribution of kohya's
``noise + o * randn(B, C, 1, 1)`` (``OffsetNoise(o, random_strength=True)`` with
``ss_noise_offset_random_strength``); the multires keys become ``PyramidNoise(iterations,
discount)``, the fused part with the recipe's expected power spectrum (not the recipe draw for
draw). Flags with no equivalent (``ss_adaptive_noise_scale``, ``ss_ip_noise_gamma_random_strength``,
and an offset together with pyramid noise, which kohya normalises together by one std) raise
``ValueError`` naming the key, or with ``strict=False`` are left out with a warning. Only the
header is read (its size capped); no tensor is loaded, no code runs.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass

from .._version import __version__
from ..spec import MAX_JSON_BYTES, NoiseSpec, brief

__all__ = ["SPEC_KEY", "VERSION_KEY", "MAX_HEADER_BYTES", "CheckpointNoise", "noise_metadata",
           "save_file", "read_safetensors_metadata", "noise_from_metadata", "load_noise_from_safetensors",
           "load_spec_from_safetensors"]

SPEC_KEY = "anisodiff_noise_spec"
VERSION_KEY = "anisodiff_version"
# The safetensors library refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000

OFFSET = "ss_noise_offset"
MULTIRES_ITERATIONS = "ss_multires_noise_iterations"
MULTIRES_DISCOUNT = "ss_multires_noise_discount"
IP_GAMMA = "ss_ip_noise_gamma"
OFFSET_RANDOM = "ss_noise_offset_random_strength"
# kohya flags that change the noise but have no NoiseSpec equivalent: the flag they modify (kohya
# ignores them without it) and why
_NO_EQUIVALENT = {
    "ss_adaptive_noise_scale": (OFFSET, "the offset grows with the mean of each latent (data-dependent)"),
    "ss_ip_noise_gamma_random_strength": (IP_GAMMA, "gamma is drawn uniformly per step; "
                                                    "input_perturbation is fixed"),
}


def _unrepresentable(meta: dict[str, str]) -> list[tuple[str, str]]:
    """The (key, why) of the flags in ``meta`` that change the noise in a way no spec describes."""
    return [(key, why) for key, (parent, why) in _NO_EQUIVALENT.items()
            if _is_set(meta.get(key)) and _is_set(meta.get(parent))]


@dataclass(frozen=True)
class CheckpointNoise:
    """What a checkpoint's metadata says about its training noise: the spec and the input
    perturbation gamma of the training calls (``add_noise(..., input_perturbation=gamma)``)."""

    spec: NoiseSpec
    input_perturbation: float = 0.0


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _kohya_keys(spec: NoiseSpec, input_perturbation: float) -> dict[str, str]:
    keys = {}
    if spec.offset is not None:
        keys[OFFSET] = str(spec.offset.strength)
        if spec.offset.random_strength:
            keys[OFFSET_RANDOM] = "True"
    if getattr(spec.spectral, "kind", None) == "pyramid":
        keys[MULTIRES_ITERATIONS] = str(spec.spectral.iterations)
        keys[MULTIRES_DISCOUNT] = str(spec.spectral.discount)
    if input_perturbation > 0:
        keys[IP_GAMMA] = str(input_perturbation)
    return keys


def _check_gamma(input_perturbation) -> float:
    if isinstance(input_perturbation, (bool, str, bytes)):
        raise TypeError(f"input_perturbation: expected a number >= 0, got {type(input_perturbation).__name__}")
    try:
        gamma = float(input_perturbation)
    except (TypeError, ValueError):
        raise TypeError(f"input_perturbation: expected a number >= 0, got {brief(input_perturbation)}") from None
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"input_perturbation: expected a finite number >= 0, got {gamma}")
    return gamma


def noise_metadata(spec: NoiseSpec, *, input_perturbation: float = 0.0,
                   metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The safetensors metadata (str -> str) that records ``spec``: ``anisodiff_noise_spec`` (its
    JSON), ``anisodiff_version`` and the kohya keys it has an equivalent for, merged into a copy of
    ``metadata`` (e.g. a trainer's own ``ss_*`` keys). A key of ``metadata`` that says something else
    about the noise (``ss_noise_offset = 0.05`` for a spec with offset 0.1) raises ``ValueError``;
    kohya's ``"None"`` for an unset flag is replaced."""
    if not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
    gamma = _check_gamma(input_perturbation)
    out = {} if metadata is None else dict(metadata)
    for key, value in out.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata: safetensors metadata maps str to str, got {brief(key)}: "
                            f"{type(value).__name__}")
    text = spec.to_json()
    if len(text.encode("utf-8")) > MAX_JSON_BYTES:
        raise ValueError(f"spec: its JSON is larger than {MAX_JSON_BYTES >> 20} MiB, too large for metadata")
    kohya = _kohya_keys(spec, gamma)
    clash = _disagreement(kohya, out)
    if clash:
        raise ValueError(f"metadata[{clash[0]!r}] = {out[clash[0]]!r}: {clash[1]}; drop the key or fix the spec")
    out.update({SPEC_KEY: text, VERSION_KEY: __version__, **kohya})
    for key, why in _unrepresentable(out):  # the metadata must not claim what the spec is not
        raise ValueError(f"metadata[{key!r}] = {out[key]!r}: {why}, which the spec does not describe; "
                         "drop the key")
    return out


def save_file(tensors: dict, filename: str | os.PathLike, spec: NoiseSpec, *, input_perturbation: float = 0.0,
              metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file(tensors, filename, metadata=...)`` with the spec recorded
    (:func:`noise_metadata`)."""
    from safetensors.torch import save_file as _save_file  # optional dependency, only here
    _save_file(tensors, os.fspath(filename),
               metadata=noise_metadata(spec, input_perturbation=input_perturbation, metadata=metadata))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_safetensors_metadata(filename: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header only (8-byte little-endian
    length, then that many bytes of JSON; at most ``MAX_HEADER_BYTES``). Anything that is not a
    well-formed header raises ``ValueError`` naming the file."""
    name = os.fspath(filename)
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{name}: not a safetensors file (shorter than the 8-byte header length)")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{name}: safetensors header of {length} bytes is larger than {MAX_HEADER_BYTES} "
                             "(not a safetensors file, or a corrupt one)")
        if 8 + length > size:
            raise ValueError(f"{name}: truncated safetensors file (header of {length} bytes, file of {size})")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{name}: not a safetensors file (header is not JSON: {brief(str(exc))})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}: not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{name}: __metadata__ must map strings to strings")
    return meta


def _is_set(value) -> bool:
    """kohya writes str(args.flag): "None" / "False" / "0" / "0.0" mean the flag was off."""
    return value is not None and value.strip() not in ("", "None", "False", "false", "0", "0.0")


def _as_number(value: str, key: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metadata[{key!r}]: expected a number, got {brief(value)}") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"metadata[{key!r}]: expected a finite number >= 0, got {brief(value)}")
    return out


def _disagreement(ours: dict[str, str], theirs: dict[str, str]) -> tuple[str, str] | None:
    """The first kohya key of ``theirs`` that says something else than ``ours`` (the keys a spec
    maps to) about the noise, with the reason; None when they agree."""
    for key in (OFFSET, OFFSET_RANDOM, MULTIRES_ITERATIONS, MULTIRES_DISCOUNT, IP_GAMMA):
        mine, old = ours.get(key), theirs.get(key)
        if key == MULTIRES_DISCOUNT and not _is_set(theirs.get(MULTIRES_ITERATIONS)):
            continue  # kohya writes its default discount even without pyramid noise
        if mine is None:
            if _is_set(old):
                return key, "the spec (or input_perturbation) has no such part"
        elif key == OFFSET_RANDOM:
            continue  # a flag: set in ours, so whatever theirs says is replaced by "True"
        elif old is not None and old != mine and (_is_set(old) or key == MULTIRES_DISCOUNT) \
                and _as_number(old, key) != float(mine):
            return key, f"disagrees with the spec ({mine})"
    return None


def _kohya_noise(meta: dict[str, str], strict: bool) -> CheckpointNoise:
    """The spec equivalent to a kohya checkpoint's noise flags."""
    skipped = []

    def refuse(key: str, why: str) -> None:
        if strict:
            raise ValueError(f"metadata[{key!r}] = {meta[key]!r}: {why}; no NoiseSpec is equivalent "
                             "(strict=False leaves it out)")
        skipped.append(key)

    for key, why in _unrepresentable(meta):
        refuse(key, why)
    offset = _as_number(meta[OFFSET], OFFSET) if _is_set(meta.get(OFFSET)) else 0.0
    random_strength = _is_set(meta.get(OFFSET_RANDOM))  # kohya ignores it without an offset
    spectral = None
    if _is_set(meta.get(MULTIRES_ITERATIONS)):
        iterations = _as_number(meta[MULTIRES_ITERATIONS], MULTIRES_ITERATIONS)
        if iterations != int(iterations):
            raise ValueError(f"metadata[{MULTIRES_ITERATIONS!r}]: expected an integer, "
                             f"got {meta[MULTIRES_ITERATIONS]!r}")
        discount = _as_number(meta.get(MULTIRES_DISCOUNT, "0.3"), MULTIRES_DISCOUNT)  # kohya's default
        spectral = {"type": "pyramid", "iterations": int(iterations), "discount": discount}
        if offset > 0:
            refuse(OFFSET, "kohya adds the offset before the pyramid levels and divides both by one std")
            offset = 0.0
    gamma = _as_number(meta[IP_GAMMA], IP_GAMMA) if _is_set(meta.get(IP_GAMMA)) else 0.0
    try:
        spec = NoiseSpec.from_dict({"spectral": spectral,
                                    "offset": {"strength": offset, "random_strength": random_strength}
                                    if offset > 0 else None})
    except (TypeError, ValueError) as exc:  # e.g. an anisodiff without pyramid noise
        raise ValueError(f"metadata: the kohya noise flags have no equivalent here ({exc})") from None
    if skipped:
        warnings.warn(f"metadata: left out {skipped}: no NoiseSpec is equivalent", RuntimeWarning, stacklevel=3)
    return CheckpointNoise(spec, gamma)


def noise_from_metadata(metadata: dict[str, str], *, strict: bool = True) -> CheckpointNoise:
    """The training noise recorded in safetensors metadata: ``anisodiff_noise_spec`` if present
    (kohya keys beside it must agree), else the spec equivalent to the kohya flags (module
    docstring). No noise key at all raises ``ValueError``."""
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a dict of str to str, got {type(metadata).__name__}")
    if SPEC_KEY in metadata:
        text = metadata[SPEC_KEY]
        if not isinstance(text, str):
            raise ValueError(f"metadata[{SPEC_KEY!r}]: expected the spec's JSON text, got {type(text).__name__}")
        if len(text.encode("utf-8")) > MAX_JSON_BYTES:
            raise ValueError(f"metadata[{SPEC_KEY!r}]: larger than {MAX_JSON_BYTES >> 20} MiB; not a spec")
        try:
            spec = NoiseSpec.from_json(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata[{SPEC_KEY!r}]: {exc}") from None
        gamma = _as_number(metadata[IP_GAMMA], IP_GAMMA) if _is_set(metadata.get(IP_GAMMA)) else 0.0
        clash = _disagreement(_kohya_keys(spec, gamma), metadata)
        if clash:
            raise ValueError(f"metadata[{clash[0]!r}] = {metadata[clash[0]]!r}: {clash[1]} (was the file "
                             "edited after saving?)")
        return CheckpointNoise(spec, gamma)
    if not any(key in metadata for key in (OFFSET, MULTIRES_ITERATIONS, IP_GAMMA)):
        raise ValueError(f"metadata: no noise settings ({SPEC_KEY} or kohya's ss_noise_offset, "
                         "ss_multires_noise_iterations, ss_ip_noise_gamma)")
    return _kohya_noise(metadata, strict)


def load_noise_from_safetensors(filename: str | os.PathLike, *, strict: bool = True) -> CheckpointNoise:
    """:func:`noise_from_metadata` of a safetensors file (header only); errors name the file."""
    meta = read_safetensors_metadata(filename)
    try:
        return noise_from_metadata(meta, strict=strict)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(filename)}: {exc}") from None


def load_spec_from_safetensors(filename: str | os.PathLike, *, strict: bool = True) -> NoiseSpec:
    """The :class:`~anisodiff.NoiseSpec` recorded in a safetensors file's metadata (written by
    :func:`save_file` / :func:`noise_metadata`, or a kohya LoRA's ``ss_noise_offset`` and friends)."""
    return load_noise_from_safetensors(filename, strict=strict).spec
