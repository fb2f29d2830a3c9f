"""``torch.ops.anisodiff_triton``: the Triton kernels as torch.library custom ops.

The ops take exactly the arguments of ``torch.ops.anisodiff.*`` (anisodiff/plan.py KernelArgs), so
anisodiff.ops calls either library the same way. They are ``torch.library.custom_op`` (opaque to
torch.compile, with fake tensors and the x0 autograd of anisodiff.ops), not ``triton_op``: under the
interpreter triton_op touches FakeTensor storage and breaks torch.compile and opcheck
(research/ecosystem.md section 2.2).

The checks here are the last line of defence (anisodiff.ops validates first, with friendlier
messages): nothing reaches a kernel that could make it read out of bounds.
"""
import contextlib
import functools
import math
from typing import List, Optional, Tuple

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from .. import _autoselect, op_support
from ..plan import MAX_AXES
from . import kernels

__all__ = ["add_noise", "shaped_noise", "ddpm_step", "dft_tables"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements (CP x BLOCK_PIX) per program of the elementwise kernel: enough work per program on a
# GPU without spilling; the interpreter (~10 ms per program) gets bigger blocks.
_ELEMENTWISE_TILE = 2048
_ELEMENTWISE_TILE_INTERPRETED = 8192
ELEMENTWISE_WARPS = 4
# A 1-D launch grid has at most 2**31 - 1 programs (its y / z dimensions only 65535: the elementwise grid
# is 1-D, sample-major, so any batch size fits).
MAX_GRID_PROGRAMS = 2**31 - 1
# Launch options of the spectral kernels: 8 warps, and maxnreg = the register file of one such CTA
# (65536 / 256 threads: 255, the most a thread can have). Without maxnreg sm_90 ptxas caps itself at
# 128 registers at 8 warps (an occupancy heuristic) and spills (4 x 32 x 32: 160 B of stack); with it
# nothing spills up to the "auto" limits. 4 warps spill at 16 x 16 x 8 with 8 axes (the step: 280 B),
# 16 warps (128 registers) at 64 x 64 (the measured table is in anisodiff._autoselect). To be tuned on
# the GPU (see the report of issue 4).
_SPECTRAL_WARPS = 8


def _spectral_launch_options(HP: int, WP: int, interpreted: Optional[bool] = None) -> dict:
    """num_warps (and on a GPU maxnreg) of spectral_kernel / step_spectral_kernel (the same for
    every plane size HP x WP for now)."""
    warps = _SPECTRAL_WARPS
    if _interpreted_default(interpreted):
        return dict(num_warps=warps)
    return dict(num_warps=warps, maxnreg=min(255, 65536 // (32 * warps)))


def _device_guard(device: torch.device):
    """The launch context of a kernel on ``device``: its CUDA device made current, so that Triton's
    launcher (which takes the current device and that device's current stream) launches on the data's
    GPU, on the caller's stream, whatever device is current outside (a tensor on cuda:1 while cuda:0 is
    current). Nothing to do for the interpreter on the CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def elementwise_grid(B: int, HW: int, block: int) -> Tuple[int]:
    """The 1-D grid of the elementwise kernels: ``B * cdiv(HW, block)`` programs, sample-major
    (kernels._block_coords splits the program id); any B up to 2**31 - 1 programs in all."""
    programs = int(B) * triton.cdiv(int(HW), int(block))
    if programs > MAX_GRID_PROGRAMS:
        raise ValueError(f"shape: {B} samples of {HW} pixels need {programs} Triton programs, more than a grid "
                         f"holds ({MAX_GRID_PROGRAMS}); split the batch")
    return (programs,)


def spectral_grid(B: int) -> Tuple[int]:
    """The grid of the spectral kernels: one program per sample (1-D: any B up to 2**31 - 1)."""
    if int(B) > MAX_GRID_PROGRAMS:
        raise ValueError(f"shape: a batch of {B} samples is more than a Triton grid holds ({MAX_GRID_PROGRAMS})")
    return (int(B),)


def spectral_config(C: int, H: int, W: int, interpreted: Optional[bool] = None) -> dict:
    """What a launch of spectral_kernel uses for a [C, H, W] sample (scripts/cuda_perf_model.py compiles
    the same): kernel name, the size constexprs, the launch options and the grid function of B."""
    interp = _interpreted_default(interpreted)
    HP, WP = _pow2(H, 16), _pow2(W, 16)
    return {"kernel": "spectral_kernel",
            "constexprs": dict(DRAWS=1, FILTER=True, NORMALIZE=False, HP=HP, WP=WP,
                               DFT_BLOCK=16 if interp else 1),
            "options": _spectral_launch_options(HP, WP, interpreted=interp), "grid": spectral_grid}


def _interpreted_default(interpreted: Optional[bool]) -> bool:
    return interpreted_mode() if interpreted is None else bool(interpreted)


def _dft_block() -> int:
    """The spectral kernels' DFT (kernels._spatial_plane's DFT_BLOCK): >= 1, loops of rank-DFT_BLOCK
    updates through the per-program scratch (1 on a GPU: two live accumulators; 16 in the interpreter:
    each step is a numpy call, 16x fewer of them); 0 / -1, the DFT as 12 matrix products per plane
    (tl.dot, input_precision "tf32x3" on tensor cores / "ieee" FMAs). A GPU keeps the loops: sm_90
    ptxas (triton 3.6, 8 warps, maxnreg 255) spills the tl.dot version, whose operands and accumulators
    live in registers next to the [CP, HP, WP] sample: stack per thread (cuobjdump -res-usage; 32 B is the
    fixed frame) 752 B at 4 x 32 x 32 (ieee: 536 B), 656 B at 1 x 32 x 32, 2296-2696 B at 64 x 64; only
    16 x 16 planes fit (4 warps: 0-32 B). scripts/cuda_perf_model.py reports both designs."""
    return 16 if interpreted() else 1


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def interpreted() -> bool:
    """Whether the kernels were decorated in interpreter mode (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernels.spectral_kernel, InterpretedFunction)


interpreted_mode = interpreted


@functools.lru_cache(maxsize=32)
def dft_tables(n: int, padded: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos(2 pi k m / n)`` and ``sin(2 pi k m / n)`` as float32 ``[padded, padded]``, zero outside
    ``n x n``. The angle is reduced mod n in integers, so large k m lose no precision."""
    k = torch.arange(n, dtype=torch.int64)
    angle = (2 * math.pi / n) * ((k[:, None] * k[None, :]) % n).double()
    cos = torch.zeros(padded, padded, dtype=torch.float64)
    sin = torch.zeros(padded, padded, dtype=torch.float64)
    cos[:n, :n] = torch.cos(angle)
    sin[:n, :n] = torch.sin(angle)
    return cos.float().to(device), sin.float().to(device)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: is on {t.device} but the op runs on {device}")


def _check_interpreter(device) -> None:
    if device.type == "cpu" and not interpreted():
        raise RuntimeError("backend: 'triton' on the CPU needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported")


def _check_problem(B, C, H, W, device, timesteps, coef, axes, weights, gammas, variant, normalize,
                   stream, noise, frames=None) -> None:
    _check_interpreter(device)
    for t, name in ((timesteps, "timesteps"), (coef, "coef"), (axes, "axes")):
        _check_device(t, name, device)
    if coef.dtype != torch.float32 or coef.dim() != 2 or not coef.is_contiguous() or coef.shape[0] < 1:
        raise ValueError("coef: expected a contiguous float32 [T, 2 + k] table with T >= 1")
    if axes.dtype != torch.float32 or axes.dim() != 2 or not axes.is_contiguous():
        raise ValueError("axes: expected a contiguous float32 [C, k] tensor")
    k = axes.shape[1]
    if axes.shape[0] != C:
        raise ValueError(f"axes: has {axes.shape[0]} rows but the noise has {C} channels")
    if k > MAX_AXES:
        raise ValueError(f"axes: at most {MAX_AXES} principal axes are supported, got {k}")
    if coef.shape[1] != 2 + k:
        raise ValueError(f"coef: expected {2 + k} columns, got {coef.shape[1]}")
    if timesteps.dtype != torch.int64 or timesteps.dim() != 1 or timesteps.shape[0] != B:
        raise ValueError(f"timesteps: expected an int64 tensor of shape [{B}]")
    if variant not in (0, 1) or (variant == 1 and k >= C):
        raise ValueError("variant: expected 0 (sdm) or 1 (heisenberg, which needs k < C)")
    _check_spatial(B, C, H, W, device, weights, gammas, normalize, stream, noise, frames, k)


def _check_spatial(B, C, H, W, device, weights, gammas, normalize, stream, noise, frames=None,
                   axes_k=None) -> None:
    """frames: F of video data [B, C, F, H, W], None for [B, C, H, W]. axes_k: the noise ops' k (they
    can loop over the channels, spectral_channels_kernel); None for ddpm_step (sample on chip only)."""
    """The spatial part, the stream and the caller's noise (shared by every op)."""
    if normalize not in (0, 1):
        raise ValueError("normalize: expected 0 (folded) or 1 (per_sample)")
    if len(gammas) not in (1, 2):
        raise ValueError("gammas: expected 1 or 2 values")
    draws = len(gammas)
    if weights is None:
        if draws != 1:
            raise ValueError("gammas: two draws need two weight tables")
    else:
        _check_device(weights, "weights", device)
        if (weights.dtype != torch.float32 or not weights.is_contiguous()
                or tuple(weights.shape) != (draws, H, W)):
            raise ValueError(f"weights: expected a contiguous float32 [{draws}, {H}, {W}] tensor")
    if stream.dtype != torch.int64 or stream.numel() != 2:
        raise ValueError("stream: expected an int64 tensor [seed, offset]")
    if noise is not None:
        _check_device(noise, "noise", device)
        if noise.dtype not in _DTYPES:
            raise TypeError(f"noise: expected float32, float16 or bfloat16, got {noise.dtype}")
        want = [draws, B, C, H, W] if frames is None else [draws, B, C, frames, H, W]
        if list(noise.shape) != want:
            raise ValueError(f"noise: expected shape {want}, got {list(noise.shape)}")
    if weights is not None or normalize == 1:
        if not _autoselect.triton_supports("spectral", C, H, W) and not (
                axes_k is not None and _autoselect.triton_channel_loop_supports(C, H, W, axes_k)):
            others = "'cuda' or 'reference'" if device.type == "cuda" else "'cpu' or 'reference'"
            raise ValueError(
                f"shape: the Triton spectral kernel keeps one [C, H, W] sample on chip, padded to "
                f"powers of two of at most {_autoselect.TRITON_MAX_SAMPLE_ELEMENTS} elements; "
                f"[{C}, {H}, {W}] is too large (use backend={others})"
                + ("" if axes_k is None else f"; looping over the channels it holds k = {axes_k} projections "
                   f"of the plane, padded to at most {_autoselect.TRITON_MAX_SAMPLE_ELEMENTS} elements"))


def _strides(t: Optional[torch.Tensor], n: int = 4) -> Tuple[int, ...]:
    """(b, c, h, w) strides of a [B, C, H, W] or [B, C, F, H, W] tensor (with a leading draw dim
    for n = 5: (d, b, c, h, w)); zeros for an absent tensor."""
    if t is None:
        return (0,) * n
    st = tuple(t.stride())
    if t.dim() == n + 1:  # video: drop the frame stride (see _frame_stride)
        st = st[:n - 2] + st[n - 1:]
    return st


def _frame_stride(t: Optional[torch.Tensor], n: int = 4) -> int:
    """The frame stride of a [B, C, F, H, W] tensor (its dim n - 2), 0 for 4-D or absent tensors."""
    return t.stride(n - 2) if t is not None and t.dim() == n + 1 else 0


def _split(shape) -> Tuple[int, int, int, int, int]:
    """(B, C, F, H, W) of [B, C, H, W] (F = 1) or [B, C, F, H, W]."""
    if len(shape) == 5:
        return tuple(int(v) for v in shape)
    B, C, H, W = (int(v) for v in shape)
    return B, C, 1, H, W


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------
def _elementwise_block(HW: int, CP: int, interpreted: Optional[bool] = None) -> int:
    """BLOCK_PIX of the elementwise kernels: CP x BLOCK_PIX elements per program."""
    tile = _ELEMENTWISE_TILE_INTERPRETED if _interpreted_default(interpreted) else _ELEMENTWISE_TILE
    return min(_pow2(HW, 4), max(4, tile // CP))


def _spectral_tables(B, H, W, weights, device, placeholder):
    """(HP, WP, cos_h, sin_h, cos_w, sin_w, scratch) of the spectral kernels (planes padded to powers
    of two of at least 16). ``scratch``: float32 ``[B, 2, HP, WP]``, each program's complex plane
    between the one-dimensional DFTs (kernels._filter_plane): written and read back by the same
    program, so it stays in L1/L2 (extra traffic: none to DRAM beyond evictions). Without a filter
    (per-sample normalisation only) the tables and the scratch are unused: ``placeholder``."""
    HP, WP = _pow2(H, 16), _pow2(W, 16)
    if weights is not None:
        cos_h, sin_h = dft_tables(H, HP, str(device))
        cos_w, sin_w = dft_tables(W, WP, str(device))
        scratch = torch.empty(B, 2, HP, WP, device=device, dtype=torch.float32)
    else:
        cos_h = sin_h = cos_w = sin_w = scratch = placeholder
    return HP, WP, cos_h, sin_h, cos_w, sin_w, scratch


def _launch(shape, x0, x_t, out, timesteps, coef, axes, weights, gammas, variant, normalize, target,
            stream, noise, perturb: float = 0.0) -> None:
    """One launch over the slices (b, f) of [B, C, H, W] or [B, C, F, H, W] (kernels._slice_offset)."""
    B, C, F, H, W = _split(shape)
    device = out.device
    k = axes.shape[1]
    # The kernel reads [seed, offset] at run time. A stream drawn from a CUDA generator is already
    # on the device (anisodiff.rng.stream_tensor): no copy, no host sync, and a CUDA graph replay
    # draws a fresh seed. A CPU stream (an int seed, the default CPU generator, the caller's) is
    # copied host-to-device here: NOT CUDA-graph safe (a replay re-reads that temporary host buffer).
    stream = stream.to(device, non_blocking=True)
    timesteps = timesteps.contiguous()
    has_x0, has_noise = x0 is not None, noise is not None
    x0_arg = x0 if has_x0 else out  # unused pointers still need a tensor
    noise_arg = noise if has_noise else out
    x_t_arg = x_t if x_t is not None else out
    common = dict(C=C, K=k, HEISENBERG=variant == 1, HAS_X0=has_x0, HAS_NOISE=has_noise, TARGET=target,
                  CP=_pow2(C))
    x0_s, xt_s, out_s = _strides(x0), _strides(x_t), _strides(out)
    frame_s = (F, _frame_stride(x0), _frame_stride(noise, 5), _frame_stride(x_t), _frame_stride(out))

    if weights is None and normalize == 0:  # elementwise: white or squeeze-only
        block = _elementwise_block(H * W, common["CP"])
        n_s = _strides(noise, 5)[1:]
        kernels.squeeze_mix_kernel[elementwise_grid(B * F, H * W, block)](
            x0_arg, noise_arg, x_t_arg, out, timesteps, coef, axes, stream,
            H, W, coef.shape[0], float(gammas[0]),
            *x0_s, *n_s, *xt_s, *out_s, *frame_s, float(perturb),
            ALIGNED=(H * W) % 4 == 0, BLOCK_PIX=block, num_warps=ELEMENTWISE_WARPS, PERTURB=perturb != 0,
            **common)
        return

    HP, WP, cos_h, sin_h, cos_w, sin_w, scratch = _spectral_tables(B * F, H, W, weights, device, coef)
    gamma1 = float(gammas[1]) if len(gammas) == 2 else 0.0
    n_s = _strides(noise, 5)
    if not _autoselect.triton_supports("spectral", C, H, W):  # too large to keep on chip: loop over C
        if perturb != 0:
            raise ValueError(f"input_perturbation: the Triton channel-loop kernel (samples too large to keep on "
                             f"chip, here [{C}, {H}, {W}]) does not implement it; use backend='cpu' or 'reference'")
        del common["CP"]
        kernels.spectral_channels_kernel[spectral_grid(B * F)](
            x0_arg, noise_arg, x_t_arg, out, timesteps, coef, axes, stream,
            weights if weights is not None else coef, cos_h, sin_h, cos_w, sin_w, scratch,
            H, W, coef.shape[0], float(gammas[0]), gamma1,
            *x0_s, *n_s, *xt_s, *out_s, *frame_s,
            DRAWS=len(gammas), FILTER=weights is not None, NORMALIZE=normalize == 1,
            ALIGNED=W % 4 == 0, KP=_pow2(k), HP=HP, WP=WP, DFT_BLOCK=_dft_block(),
            **_spectral_launch_options(HP, WP), **common)
        return
    kernels.spectral_kernel[spectral_grid(B * F)](
        x0_arg, noise_arg, x_t_arg, out, timesteps, coef, axes, stream,
        weights if weights is not None else coef, cos_h, sin_h, cos_w, sin_w, scratch,
        H, W, coef.shape[0], float(gammas[0]), gamma1,
        *x0_s, *n_s, *xt_s, *out_s, *frame_s, float(perturb),
        DRAWS=len(gammas), FILTER=weights is not None, NORMALIZE=normalize == 1,
        ALIGNED=W % 4 == 0, HP=HP, WP=WP, DFT_BLOCK=_dft_block(), PERTURB=perturb != 0,
        **_spectral_launch_options(HP, WP), **common)


def _launch_step(sample, model_output, params, axes, weights, gammas, normalize, clip, clip_range, stream,
                 noise, x_prev, x0_hat) -> None:
    """ddpm_step: the step noise of the shaped_noise path with no squeeze, then the step per pixel."""
    B, C, F, H, W = _split(sample.shape)
    device = sample.device
    stream = stream.to(device, non_blocking=True)  # graph-safe only if already on the device (_launch)
    has_noise = noise is not None
    noise_arg = noise if has_noise else x_prev
    common = dict(C=C, K=axes.shape[1], CLIP=clip, HAS_NOISE=has_noise, CP=_pow2(C))
    io_s = (*_strides(sample), *_strides(model_output))
    out_s = (*_strides(x_prev), *_strides(x0_hat))
    frame_s = (F, _frame_stride(sample), _frame_stride(model_output), _frame_stride(noise, 5),
               _frame_stride(x_prev), _frame_stride(x0_hat))
    if weights is None and normalize == 0:  # white step noise: elementwise
        block = _elementwise_block(H * W, common["CP"])
        n_s = _strides(noise, 5)[1:]
        kernels.step_elementwise_kernel[elementwise_grid(B * F, H * W, block)](
            sample, model_output, noise_arg, x_prev, x0_hat, params, axes, stream,
            H, W, float(gammas[0]), float(clip_range), *io_s, *n_s, *out_s, *frame_s,
            ALIGNED=(H * W) % 4 == 0, BLOCK_PIX=block, num_warps=ELEMENTWISE_WARPS, **common)
        return
    HP, WP, cos_h, sin_h, cos_w, sin_w, scratch = _spectral_tables(B * F, H, W, weights, device, params)
    gamma1 = float(gammas[1]) if len(gammas) == 2 else 0.0
    n_s = _strides(noise, 5)
    kernels.step_spectral_kernel[spectral_grid(B * F)](
        sample, model_output, noise_arg, x_prev, x0_hat, params, axes, stream,
        weights if weights is not None else params, cos_h, sin_h, cos_w, sin_w, scratch,
        H, W, float(gammas[0]), gamma1, float(clip_range), *io_s, *n_s, *out_s, *frame_s,
        DRAWS=len(gammas), FILTER=weights is not None, NORMALIZE=normalize == 1,
        ALIGNED=W % 4 == 0, HP=HP, WP=WP, DFT_BLOCK=_dft_block(),
        **_spectral_launch_options(HP, WP), **common)


# ---------------------------------------------------------------------------------------------
# the custom ops (same schemas as torch.ops.anisodiff.add_noise / shaped_noise / ddpm_step)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("anisodiff_triton::add_noise", mutates_args=())
def add_noise(x0: torch.Tensor, timesteps: torch.Tensor, coef: torch.Tensor, axes: torch.Tensor,
              weights: Optional[torch.Tensor], gammas: List[float], variant: int, normalize: int,
              target: int, stream: torch.Tensor,
              noise: Optional[torch.Tensor], perturb: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    if x0.dim() not in (4, 5):
        raise ValueError(f"x0: expected a 4-D [B, C, H, W] or 5-D [B, C, F, H, W] tensor, got {x0.dim()}-D")
    if x0.dtype not in _DTYPES:
        raise TypeError(f"x0: expected float32, float16 or bfloat16, got {x0.dtype}")
    if target not in (0, 1, 2, 3):
        raise ValueError("target: expected 0..3")
    if not (math.isfinite(perturb) and perturb >= 0):
        raise ValueError(f"perturb: expected a finite value >= 0, got {perturb}")
    B, C, F, H, W = _split(x0.shape)
    _check_problem(B, C, H, W, x0.device, timesteps, coef, axes, weights, gammas, variant, normalize,
                   stream, noise, F if x0.dim() == 5 else None)
    x_t, out = torch.empty_like(x0), torch.empty_like(x0)
    if x0.numel() > 0:
        with _device_guard(x0.device):
            _launch(tuple(x0.shape), x0, x_t, out, timesteps, coef, axes, weights, gammas, variant, normalize,
                    target, stream, noise, perturb)
    return x_t, out


add_noise.register_fake(op_support.add_noise_fake)


@torch.library.custom_op("anisodiff_triton::shaped_noise", mutates_args=())
def shaped_noise(shape: List[int], timesteps: torch.Tensor, coef: torch.Tensor, axes: torch.Tensor,
                 weights: Optional[torch.Tensor], gammas: List[float], variant: int, normalize: int,
                 stream: torch.Tensor, noise: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if len(shape) not in (4, 5) or any(s < 0 for s in shape):
        raise ValueError(f"shape: expected non-negative [B, C, H, W] or [B, C, F, H, W], got {list(shape)}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype: the triton kernel produces float32, float16 or bfloat16, got {dtype}")
    B, C, F, H, W = _split(shape)
    _check_problem(B, C, H, W, coef.device, timesteps, coef, axes, weights, gammas, variant, normalize,
                   stream, noise, F if len(shape) == 5 else None)
    out = torch.empty(list(shape), device=coef.device, dtype=dtype)
    if out.numel() > 0:
        with _device_guard(out.device):
            _launch(tuple(shape), None, None, out, timesteps, coef, axes, weights, gammas, variant,
                    normalize, 0, stream, noise)
    return out


shaped_noise.register_fake(op_support.shaped_noise_fake)


@torch.library.custom_op("anisodiff_triton::ddpm_step", mutates_args=())
def ddpm_step(sample: torch.Tensor, model_output: torch.Tensor, params: torch.Tensor, axes: torch.Tensor,
              weights: Optional[torch.Tensor], gammas: List[float], normalize: int, clip: int,
              clip_range: float, stream: torch.Tensor,
              noise: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused DDPM step, as ``torch.ops.anisodiff.ddpm_step``: ``(x_prev, x0_hat)`` in the
    sample's dtype (params: per sample a_t, b_t, then (perp, axes[k]) of S(t), C0, Ct and Sig)."""
    if sample.dim() not in (4, 5):
        raise ValueError(f"sample: expected a 4-D [B, C, H, W] or 5-D [B, C, F, H, W] tensor, got {sample.dim()}-D")
    for t, name in ((sample, "sample"), (model_output, "model_output")):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output: expected shape {list(sample.shape)}, got {list(model_output.shape)}")
    B, C, F, H, W = _split(sample.shape)
    device = sample.device
    _check_interpreter(device)
    for t, name in ((model_output, "model_output"), (params, "params"), (axes, "axes")):
        _check_device(t, name, device)
    if (axes.dtype != torch.float32 or axes.dim() != 2 or not axes.is_contiguous()
            or axes.shape[0] != C or axes.shape[1] > MAX_AXES):
        raise ValueError(f"axes: expected a contiguous float32 [C, k] tensor with k <= {MAX_AXES}")
    k = axes.shape[1]
    if (params.dtype != torch.float32 or not params.is_contiguous()
            or tuple(params.shape) != (B, 2 + 4 * (1 + k))):
        raise ValueError(f"params: expected a contiguous float32 [{B}, {2 + 4 * (1 + k)}] tensor")
    if clip not in (0, 1, 2):
        raise ValueError("clip: expected 0 (none), 1 (plain) or 2 (in S^-1 coordinates)")
    _check_spatial(B, C, H, W, device, weights, gammas, normalize, stream, noise,
                   F if sample.dim() == 5 else None)
    x_prev, x0_hat = torch.empty_like(sample), torch.empty_like(sample)
    if sample.numel() > 0:
        with _device_guard(sample.device):
            _launch_step(sample, model_output, params, axes, weights, gammas, normalize, clip, clip_range,
                         stream, noise, x_prev, x0_hat)
    return x_prev, x0_hat


ddpm_step.register_fake(op_support.ddpm_step_fake)


# the same backward as anisodiff::add_noise
add_noise.register_autograd(op_support.add_noise_backward, setup_context=op_support.add_noise_setup_context)
