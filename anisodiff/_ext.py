"""Loading the compiled extension (anisodiff._C) and reporting which backends exist."""
from __future__ import annotations

import importlib
import importlib.util

import torch

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
        from . import __version__
        return {"version": __version__, "torch_version": None, "cpu": False, "cuda": False,
                "cuda_archs": [], "cpu_capability": None, "cpu_capabilities_compiled": [],
                "error": f"compiled extension not importable: {_IMPORT_ERROR}"}
    info = dict(_C.build_info())
    info["triton"] = importlib.util.find_spec("triton") is not None
    return info


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first. "reference" is always there."""
    device = torch.device(device)
    out = []
    if device.type == "cpu" and _COMPILED["cpu"]:
        out.append("cpu")
    if device.type == "cuda" and _COMPILED["cuda"]:
        out.append("cuda")
    out.append("reference")
    return out


def require_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` ("auto" or a name) for ``device``; raise a clear error if unavailable."""
    avail = available_backends(device)
    if backend == "auto":
        return avail[0]
    known = ("reference", "cpu", "cuda", "triton")
    if backend not in known:
        raise ValueError(f"backend: must be 'auto' or one of {list(known)}, got {backend!r}")
    if backend not in avail:
        why = f" ({_IMPORT_ERROR})" if _C is None and backend in ("cpu", "cuda") else ""
        raise RuntimeError(f"backend: {backend!r} is not available for device {device.type!r}{why}; "
                           f"available: {avail}")
    return backend
