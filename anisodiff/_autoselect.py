"""Which backend ``backend="auto"`` runs, per device type and spec kind.

The table lists, fastest first, the backends to try; "auto" takes the first one that is available
on the device (see :func:`anisodiff.available_backends`) and supports the problem (the Triton
spectral kernel keeps a whole ``[C, H, W]`` sample on chip, so it takes planes up to a size).
A missing backend simply falls through to the next entry; "reference" (pure PyTorch, any device)
is always last, so "auto" never fails for lack of a compiled kernel.

Spec kinds:
  * ``"elementwise"``: no spatial part (white or squeeze-only noise). Memory-bound: read x0, write
    x_t and the target; the kernels differ only in how they generate the stream.
  * ``"spectral"``: spectral weights and/or per-sample normalisation: a per-plane transform.

Rationale of the current order (no GPU measurements yet; update the table from
``anisodiff bench`` results, one line per (device, kind), and note the run below):
  * CUDA: the hand-written CUDA kernels (when built) before Triton, Triton before the reference
    (the reference is several eager kernels plus cuFFT, ~5-10x the minimum traffic).
  * CPU: the compiled C++ kernel before the reference. Triton on the CPU runs in the interpreter
    (TRITON_INTERPRET=1): it is listed by available_backends for tests, never chosen by "auto".
  Measurements behind this table: none yet (CPU order from DESIGN.md section 4 / `anisodiff bench`
  on the 2-core CI machine: the C++ kernel beats eager PyTorch).
"""
from __future__ import annotations

__all__ = ["PREFERENCE", "FALLBACK", "spec_kind", "choose", "triton_supports", "TRITON_MAX_SAMPLE_ELEMENTS"]

# (device type) -> (spec kind) -> backends, fastest first
PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        "elementwise": ("cuda", "triton", "reference"),
        "spectral": ("cuda", "triton", "reference"),
    },
    "cpu": {
        "elementwise": ("cpu", "reference"),
        "spectral": ("cpu", "reference"),
    },
}
FALLBACK: tuple[str, ...] = ("reference",)  # any other device type (mps, xpu, ...)

# The Triton spectral kernel holds the padded sample [CP, HP, WP] (powers of two, H and W padded
# to >= 16) in registers: up to 4 x 64 x 64, e.g. SD latents (4 x 64 x 64) or 3 x 64 x 64 images.
TRITON_MAX_SAMPLE_ELEMENTS = 4 * 64 * 64


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


def spec_kind(spec) -> str:
    """"elementwise" when the noise has no per-plane step (no spectral weights, no per-sample
    normalisation), else "spectral"."""
    if spec.spectral is None and spec.normalize != "per_sample":
        return "elementwise"
    return "spectral"


def triton_supports(kind: str, channels: int, height: int, width: int) -> bool:
    """Whether the Triton kernels take this problem (the spectral kernel: one sample on chip)."""
    if kind == "elementwise":
        return True
    return _pow2(channels) * _pow2(height, 16) * _pow2(width, 16) <= TRITON_MAX_SAMPLE_ELEMENTS


def choose(device_type: str, kind: str, available, plane=None) -> str:
    """The first backend of the table row that is in ``available`` and supports the problem.
    ``plane``: ``(C, H, W)`` or None (unknown: no size limit applied)."""
    order = PREFERENCE.get(device_type, {}).get(kind, FALLBACK)
    for backend in (*order, *FALLBACK):
        if backend not in available:
            continue
        if backend == "triton" and plane is not None and not triton_supports(kind, *plane):
            continue
        return backend
    return "reference"
