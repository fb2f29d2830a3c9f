"""What every backend's ops share, whatever computes them: the fake (meta) kernels that
torch.compile and meta tensors run, and the autograd of ``add_noise`` with respect to x0.

Both op libraries have the same schemas, ``anisodiff::*`` (C++, registered by ``anisodiff._C``)
and ``anisodiff_triton::*`` (``anisodiff.triton.ops``); both import this module, and it imports
neither, so there is no import circle between the backends.

The fake kernels also check devices. A call whose tensors are on different devices, one of them
``meta``, is dispatched to the fake kernel (the Meta key wins), which would otherwise return an
uninitialised tensor on the data's device as if it were a result. Only the ``[seed, offset]``
stream may live on the CPU while the data is elsewhere.
"""
from __future__ import annotations

import torch

from .plan import TARGET_CODES

__all__ = ["add_noise_fake", "shaped_noise_fake", "ddpm_step_fake", "add_noise_setup_context",
           "add_noise_backward", "register_compiled_ops"]


def check_devices(op: str, anchor_name: str, anchor: torch.Tensor, stream: torch.Tensor,
                  **tensors) -> None:
    """Raise a ValueError naming the first tensor that is not on ``anchor``'s device."""
    device = anchor.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: is on {t.device} but {anchor_name} is on {device} ({op}: every "
                             f"tensor must be on one device)")
    if stream.device != device and stream.device.type != "cpu":
        also = "" if device.type == "cpu" else " or the CPU"
        raise ValueError(f"stream: is on {stream.device}; expected {device}{also} ({op})")


def add_noise_fake(x0, timesteps, coef, axes, weights, gammas, variant, normalize, target, stream,
                   noise, perturb=0.0):
    check_devices("add_noise", "x0", x0, stream, timesteps=timesteps, coef=coef, axes=axes,
                  weights=weights, noise=noise)
    return torch.empty_like(x0), torch.empty_like(x0)


def shaped_noise_fake(shape, timesteps, coef, axes, weights, gammas, variant, normalize, stream, noise,
                      dtype):
    check_devices("shaped_noise", "coef", coef, stream, timesteps=timesteps, axes=axes,
                  weights=weights, noise=noise)
    return coef.new_empty(shape, dtype=dtype)


def ddpm_step_fake(sample, model_output, params, axes, weights, gammas, normalize, clip, clip_range,
                   stream, noise):
    check_devices("ddpm_step", "sample", sample, stream, model_output=model_output, params=params,
                  axes=axes, weights=weights, noise=noise)
    return torch.empty_like(sample), torch.empty_like(sample)


def add_noise_setup_context(ctx, inputs, output):
    x0, timesteps, coef = inputs[:3]
    ctx.target = inputs[8]
    ctx.num_inputs = len(inputs)
    ctx.data_dims = x0.dim()  # 4, or 5 for video [B, C, F, H, W]
    ctx.save_for_backward(timesteps, coef)


def add_noise_backward(ctx, grad_xt, grad_target):
    """The add_noise autograd w.r.t. x0, shared by every backend's op (same schema)."""
    # x_t = a x0 + b n; d target / d x0 = 0 (epsilon), -b (v), 1 (x0), -1 (flow). The input
    # perturbation only changes n, so it does not enter the gradient.
    timesteps, coef = ctx.saved_tensors
    view = (-1,) + (1,) * (ctx.data_dims - 1)
    a = coef[timesteps, 0].view(view)
    b = coef[timesteps, 1].view(view)
    grad = None
    if grad_xt is not None:
        grad = grad_xt * a.to(grad_xt.dtype)
    if grad_target is not None and ctx.target != TARGET_CODES["epsilon"]:
        d = {TARGET_CODES["v"]: -b, TARGET_CODES["x0"]: torch.ones_like(b),
             TARGET_CODES["flow"]: -torch.ones_like(b)}[ctx.target].to(grad_target.dtype)
        grad = grad_target * d if grad is None else grad + grad_target * d
    return (grad,) + (None,) * (ctx.num_inputs - 1)


def register_compiled_ops() -> None:
    """Fake kernels and autograd for the C++ library ``anisodiff::*`` (once ``_C`` is loaded)."""
    torch.library.register_fake("anisodiff::add_noise")(add_noise_fake)
    torch.library.register_fake("anisodiff::shaped_noise")(shaped_noise_fake)
    torch.library.register_fake("anisodiff::ddpm_step")(ddpm_step_fake)
    torch.library.register_autograd("anisodiff::add_noise", add_noise_backward,
                                    setup_context=add_noise_setup_context)
