"""Which backend ``backend="auto"`` runs, per device type and spec kind.

The table lists, fastest first, the backends to try; "auto" takes the first one that is available
on the device (see :func:`anisodiff.available_backends`) and supports the problem. The Triton
spectral kernel runs one program per sample, accumulating the padded ``[CP, HP, WP]`` sample in
registers and filtering each plane with DFT loops of rank-1 updates (through a per-program scratch
that stays in L1/L2): the sample in registers bounds it, so it takes samples up to a size.
``backend="triton"`` takes samples up to TRITON_MAX_SAMPLE_ELEMENTS (beyond 4096 elements ptxas
spills to local memory: correct but slow); "auto" picks it only up to the smaller TRITON_AUTO_MAX_*
limits, where sm_90 ptxas keeps everything in registers, and falls through to the next entry (the
reference) beyond them.
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
  Measurements behind this table: none yet (CPU order from docs/design.md section 4 / `anisodiff bench`
  on the 2-core CI machine: the C++ kernel beats eager PyTorch).
"""
from __future__ import annotations

__all__ = ["PREFERENCE", "FALLBACK", "FEATURES", "BACKEND_FEATURES", "missing_features", "spec_kind",
           "choose", "triton_supports", "triton_channel_loop_supports", "cuda_supports",
           "CUDA_MAX_FFT_PRIME", "largest_prime_factor", "TRITON_MAX_SAMPLE_ELEMENTS",
           "TRITON_AUTO_MAX_SAMPLE_ELEMENTS", "TRITON_AUTO_MAX_PLANE_ELEMENTS", "TRITON_AUTO_MAX_CHANNELS"]

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

# Problem features beyond the [B, C, H, W] image case, and the backends that implement them. "auto"
# skips a backend that lacks a feature of the call; naming one raises (anisodiff.ops).
#   "frames":  a [B, C, F, H, W] video tensor with F > 1 (5-D with F = 1 is the 4-D problem)
#   "perturb": add_noise(..., input_perturbation=gamma) with gamma > 0
#   "temporal": a spatio-temporal spectrum, NoiseSpec(temporal=True) (a 3-D filter per (b, c) volume)
FEATURES = ("frames", "perturb", "temporal")
BACKEND_FEATURES: dict[str, frozenset] = {
    "reference": frozenset(FEATURES),
    "cpu": frozenset(FEATURES),  # temporal: whole samples as work items, the FFT along F (csrc/cpu)
    "triton": frozenset({"frames", "perturb"}),  # temporal: not yet (its programs hold H x W planes)
    "cuda": frozenset({"frames", "perturb"}),  # temporal: not yet (the kernels filter H x W planes)
}


def missing_features(backend: str, needs) -> list[str]:
    """The features of ``needs`` that ``backend`` does not implement (sorted)."""
    return sorted(set(needs) - BACKEND_FEATURES.get(backend, frozenset()))

# Sizes are of the padded sample [CP, HP, WP]: powers of two, H and W padded to >= 16.
# Hard limit of backend="triton": up to 4 x 64 x 64 (SD latents, 3 x 64 x 64 images). It works, but
# beyond 4096 elements ptxas spills to local memory.
TRITON_MAX_SAMPLE_ELEMENTS = 4 * 64 * 64
# Limits of backend="auto": no spill. Measured with sm_90 ptxas (triton 3.6, compiled without a GPU as
# tests/test_triton.py test_kernels_compile_for_sm90_without_a_gpu does; cuobjdump -res-usage and
# ptxas -v; DRAWS=2, FILTER, NORMALIZE, CLIP=2, K = CP axes (8 at most; HEISENBERG where K < C),
# launch options of ops._spectral_launch_options: 8 warps, maxnreg 255), spectral_kernel /
# step_spectral_kernel registers per thread, all with the fixed 32 B frame and 0 spill stores:
#   K=1:   16x32 CP=8 252/252, 32x16 CP=8 202/194, 32x32 CP=4 236/232, 32x64 CP=2 247/238,
#          64x32 CP=2 254/234, 64x64 CP=1 254/254
#   K=CP:  16x16 CP=8 ok, 32x32 CP=4 236/254, 64x32 CP=2 254/229, 64x64 CP=1 254/254
# and spilling: 16x32 CP=8 K=8 (the step: 280 B of stack; 16x16 CP=8 K=8 also at 4 warps, 280 B),
# 16x16 CP=16 K=8 (the step: 200 B at 8 warps, 448 B at 4), 2x64x64 and 4x64x64 at 16 warps
# (128 registers): 320-336 B / 328-1032 B; without maxnreg ptxas stops at 128 registers at 8 warps
# (4x32x32: 160 B).
# Before the rank-1 DFT loops (tl.dot DFTs, no maxnreg) 32x32 planes spilled ~600 B and 64x64 ~16 KB,
# and "auto" stopped at 16 x 32 planes / 4 x 16 x 32 samples. Now "auto" takes samples of at most
# 4096 padded elements (4 x 32 x 32, 2 x 64 x 32, 1 x 64 x 64) of at most 4 padded channels (the
# channel count and the axes drive the step's registers; 5-8 channels go to the next backend).
# Several sizes use 252-254 registers: no spill, but no margin; re-measure when the kernels change.
TRITON_AUTO_MAX_PLANE_ELEMENTS = 64 * 64
TRITON_AUTO_MAX_SAMPLE_ELEMENTS = 4 * 32 * 32
TRITON_AUTO_MAX_CHANNELS = 4


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


def spec_kind(spec) -> str:
    """"elementwise" when the noise has no per-plane step (no spectral weights, no per-sample
    normalisation), else "spectral"."""
    if spec.spectral is None and spec.offset is None and spec.normalize != "per_sample":
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
        return (plane <= TRITON_AUTO_MAX_PLANE_ELEMENTS and sample <= TRITON_AUTO_MAX_SAMPLE_ELEMENTS
                and _pow2(channels) <= TRITON_AUTO_MAX_CHANNELS)
    return sample <= TRITON_MAX_SAMPLE_ELEMENTS


def triton_channel_loop_supports(channels: int, height: int, width: int, k: int) -> bool:
    """Whether the Triton channel-loop spectral kernel (anisodiff.triton.kernels.spectral_channels_kernel,
    for samples too large for the on-chip kernel: many channels) takes the problem: it holds the k
    squeeze projections of one padded plane, ``pow2(k) HP WP <= TRITON_MAX_SAMPLE_ELEMENTS``, at any
    channel count. backend="triton" only: "auto" does not pick it until its registers are measured on
    sm_90 (ptxas), as those of the on-chip kernel were."""
    plane = _pow2(height, 16) * _pow2(width, 16)
    return plane <= TRITON_AUTO_MAX_PLANE_ELEMENTS and _pow2(k) * plane <= TRITON_MAX_SAMPLE_ELEMENTS


# csrc/include/anisodiff/spectral.h kMaxDirectPrime: larger prime factors need Bluestein's transform,
# which the CPU kernel has and the CUDA kernels do not yet (their planner refuses such sides).
CUDA_MAX_FFT_PRIME = 61


def largest_prime_factor(n: int) -> int:
    largest, q = 1, 2
    while q * q <= n:
        while n % q == 0:
            largest, n = q, n // q
        q += 1
    return max(largest, n)


def cuda_supports(kind: str, channels: int, height: int, width: int) -> bool:
    """Whether the CUDA kernels take this problem: any elementwise one; spectral ones whose sides
    have no prime factor above CUDA_MAX_FFT_PRIME (conservative: per-sample normalisation without
    weights would run too)."""
    return kind == "elementwise" or max(largest_prime_factor(height),
                                        largest_prime_factor(width)) <= CUDA_MAX_FFT_PRIME


def choose(device_type: str, kind: str, available, plane=None, needs=()) -> str:
    """The first backend of the table row that is in ``available`` and supports the problem.
    ``plane``: ``(C, H, W)`` or None (unknown: no size limit applied); ``needs``: features of
    :data:`FEATURES` the call uses."""
    order = PREFERENCE.get(device_type, {}).get(kind, FALLBACK)
    for backend in (*order, *FALLBACK):
        if backend not in available or missing_features(backend, needs):
            continue
        if backend == "triton" and plane is not None and not triton_supports(kind, *plane, auto=True):
            continue
        # the perturbed on-chip spectral kernel holds a second [CP, HP, WP] accumulator: its registers
        # are not measured on sm_90 yet, so "auto" leaves it to backend="triton"
        if backend == "triton" and kind == "spectral" and "perturb" in needs:
            continue
        if backend == "cuda" and plane is not None and not cuda_supports(kind, *plane):
            continue
        return backend
    return "reference"
