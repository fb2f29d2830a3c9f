"""Loading the compiled extension (anisodiff._C) and reporting which backends exist."""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import _autoselect

__all__ = ["build_info", "available_backends", "has_compiled_ops", "require_backend"]

_C = None
_IMPORT_ERROR: Exception | None = None
try:  # importing _C registers torch.ops.anisodiff.* (C++ static initialisers)
    _C = importlib.import_module("anisodiff._C")
except ImportError as exc:  # a source checkout that was never built
    _IMPORT_ERROR = exc
# Read once: plain data is cheap to consult on every call and traceable by torch.compile.
_COMPILED = dict(_C.build_info()) if _C is not None else {"cpu": False, "cuda": False}


def has_compiled_ops() -> bool:
    return _C is not None


def build_info() -> dict:
    """What this install was built with: version, the torch it was compiled against, whether the
    CPU and CUDA ops are compiled, CUDA architectures, the CPU instruction set in use."""
    if _C is None:
        from ._version import __version__
        return {"version": __version__, "torch_version": None, "cpu": False, "cuda": False,
                "cuda_archs": [], "cpu_capability": None, "cpu_capabilities_compiled": [],
                "error": f"compiled extension not importable: {_IMPORT_ERROR}"}
    info = dict(_C.build_info())
    info["triton"] = _triton_state()["installed"]
    return info


# Read once at import (find_spec does not import triton): whether triton can be imported, and whether
# its interpreter is on (TRITON_INTERPRET=1: the kernels then run on CPU tensors). Plain data, so
# torch.compile traces the backend choice; tests patch it to simulate a missing triton.
_TRITON = {"installed": importlib.util.find_spec("triton") is not None,
           "interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}


def _triton_state() -> dict:
    return _TRITON


_KNOWN = ("reference", "cpu", "cuda", "triton")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device``, in the order "auto" prefers them (anisodiff._autoselect);
    "reference" is always there. "triton" is listed on CUDA devices when triton is installed, and on
    the CPU only under Triton's interpreter (TRITON_INTERPRET=1), after every other backend: it is
    there for tests and is never chosen by "auto" on the CPU."""
    device = torch.device(device)
    present = ["reference"]
    if device.type == "cpu" and _COMPILED["cpu"]:
        present.append("cpu")
    if device.type == "cuda" and _COMPILED["cuda"]:
        present.append("cuda")
    triton = _triton_state()
    if triton["installed"] and (device.type == "cuda" or (device.type == "cpu" and triton["interpret"])):
        present.append("triton")
    order = _autoselect.PREFERENCE.get(device.type, {}).get("spectral", _autoselect.FALLBACK)
    ranked = [b for b in order if b in present]
    return ranked + [b for b in present if b not in ranked]


def _why_missing(backend: str, device: torch.device) -> str:
    if backend in ("cpu", "cuda") and _C is None:
        return f" (the compiled extension is not importable: {_IMPORT_ERROR})"
    if backend == "cuda" and device.type == "cuda" and not _COMPILED["cuda"]:
        return " (this install was built without CUDA)"
    if backend == "triton":
        if not _triton_state()["installed"]:
            return " (triton is not installed: pip install triton)"
        if device.type == "cpu":
            return " (on the CPU it runs only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton)"
    return ""


def require_backend(backend: str, device: torch.device, kind: str = "spectral", plane=None,
                    needs=()) -> str:
    """Resolve ``backend`` ("auto" or a name) for ``device``; raise a clear error if unavailable.

    ``kind``: "elementwise" or "spectral" (anisodiff._autoselect.spec_kind); ``plane``: (C, H, W),
    so "auto" skips a backend that cannot take the problem; ``needs``: the features of
    anisodiff._autoselect.FEATURES the call uses ("auto" skips backends without them)."""
    device = torch.device(device)
    avail = available_backends(device)
    if backend == "auto":
        return _autoselect.choose(device.type, kind, avail, plane, needs)
    if backend not in _KNOWN:
        raise ValueError(f"backend: must be 'auto' or one of {list(_KNOWN)}, got {backend!r}")
    if backend not in avail:
        raise RuntimeError(f"backend: {backend!r} is not available for device {device.type!r}"
                           f"{_why_missing(backend, device)}; available: {avail}")
    return backend
