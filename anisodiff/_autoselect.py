"""Which backend ``backend="auto"`` runs, per device type and spec kind.

The table lists, fastest first, the backends to try; "auto" takes the first one that is available
on the device (see :func:`anisodiff.available_backends`) and supports the problem. The Triton
spectral kernel runs one program per sample, accumulating the padded ``[CP, HP, WP]`` sample in
registers and filtering each plane with DFT matmuls whose tables it loads per plane: registers and
on-chip memory bound it, so it takes planes up to a size. ``backend="triton"`` takes samples up to
TRITON_MAX_SAMPLE_ELEMENTS (beyond that ptxas spills to local memory: correct but slow); "auto" picks
it only up to the smaller TRITON_AUTO_MAX_* limits, where sm_90 ptxas keeps everything in registers,
and falls through to the next entry (the reference) beyond them.
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

__all__ = ["PREFERENCE", "FALLBACK", "spec_kind", "choose", "triton_supports", "TRITON_MAX_SAMPLE_ELEMENTS",
           "TRITON_AUTO_MAX_SAMPLE_ELEMENTS", "TRITON_AUTO_MAX_PLANE_ELEMENTS"]

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

# Sizes are of the padded sample [CP, HP, WP]: powers of two, H and W padded to >= 16.
# Hard limit of backend="triton": up to 4 x 64 x 64 (SD latents, 3 x 64 x 64 images). It works, but
# from 32 x 32 planes on ptxas spills to local memory.
TRITON_MAX_SAMPLE_ELEMENTS = 4 * 64 * 64
# Limits of backend="auto": no spill. Measured with sm_90 ptxas (triton 3.6, compiled without a GPU as
# tests/test_triton.py test_kernels_compile_for_sm90_without_a_gpu does; cuobjdump -res-usage and
# the ptxas -v log; worst case DRAWS=2, FILTER, NORMALIZE, K=1, ieee dots, warps of
# ops._spectral_warps), spectral_kernel / step_spectral_kernel, registers + stack per thread:
#   16x16, 4 warps:  CP=1 165/168 regs, CP=4 168/168, CP=8 226/168, CP=16 246/254   + 32 B stack
#   16x32, 8 warps:  CP=4 190/182, CP=8 176/174                                     + 32 B stack
#   32x16, 8 warps:  CP=4 247/246                                                   + 32 B stack
#   32x32, 8 warps:  CP=1 255 + 608/624 B (744/764 B spill stores), CP=4 255 + 592/576 B
#   32x64, 8 warps:  CP=1 80 + 3.9/3.8 KB;  64x64, 8 warps: CP=1..4 32 + ~16.3 KB (all spills)
# The 32 B frame up to 32x16 is a fixed frame: ptxas reports 0 bytes spill stores there. So "auto"
# takes planes of at most 16 x 32 / 32 x 16 padded pixels (32 x 32 already spills, whatever CP),
# and samples of at most 4 x 16 x 32 = 8 x 16 x 16 elements (CP=16 at 16x16 reaches 254 registers:
# no margin left, so it is not chosen automatically).
TRITON_AUTO_MAX_PLANE_ELEMENTS = 16 * 32
TRITON_AUTO_MAX_SAMPLE_ELEMENTS = 4 * 16 * 32


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


def spec_kind(spec) -> str:
    """"elementwise" when the noise has no per-plane step (no spectral weights, no per-sample
    normalisation), else "spectral"."""
    if spec.spectral is None and spec.normalize != "per_sample":
        return "elementwise"
    return "spectral"


def triton_supports(kind: str, channels: int, height: int, width: int, auto: bool = False) -> bool:
    """Whether the Triton kernels take this problem (the spectral kernel: one sample per program).
    ``auto``: whether "auto" should pick them, i.e. the stricter no-spill limits."""
    if kind == "elementwise":
        return True
    plane = _pow2(height, 16) * _pow2(width, 16)
    sample = _pow2(channels) * plane
    if auto:
        return plane <= TRITON_AUTO_MAX_PLANE_ELEMENTS and sample <= TRITON_AUTO_MAX_SAMPLE_ELEMENTS
    return sample <= TRITON_MAX_SAMPLE_ELEMENTS


def choose(device_type: str, kind: str, available, plane=None) -> str:
    """The first backend of the table row that is in ``available`` and supports the problem.
    ``plane``: ``(C, H, W)`` or None (unknown: no size limit applied)."""
    order = PREFERENCE.get(device_type, {}).get(kind, FALLBACK)
    for backend in (*order, *FALLBACK):
        if backend not in available:
            continue
        if backend == "triton" and plane is not None and not triton_supports(kind, *plane, auto=True):
            continue
        return backend
    return "reference"
