"""What the train-step and sampling suites share: the UNets (the SDM paper's ``UNet2DModel`` and a
tiny CPU stand-in), the spec cases they use, autocast, and their statistics over interleaved
rounds (median and IQR, per-round paired overheads). Everything that touches diffusers imports it
when it runs."""
from __future__ import annotations

import importlib.util

import torch

from .cases import make_case
from .errors import BenchError
from .timing import interleave, quantiles

__all__ = ["UNETS", "UNET_TITLES", "STRENGTH", "ALPHA", "T", "ISO", "SAMPLER_ISO", "AMP",
           "require_diffusers", "make_unet", "model_cases", "stats_ms", "paired_pct", "interleaved",
           "autocast", "model_info"]


# docs/papers.md section 1.5 (the official code's UNet2DModel), and a tiny stand-in for the CPU
UNETS = {
    "sdm_paper": {"sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
                  "block_out_channels": (128, 256, 512, 512),
                  "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")},
    "tiny": {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
             "block_out_channels": (16, 32), "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
             "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
}
UNET_TITLES = {"sdm_paper": "the SDM paper's UNet2DModel (docs/papers.md section 1.5)",
               "tiny": "a tiny UNet2DModel (2 levels of 16/32 channels, attention at 8x8; CPU stand-in)"}
STRENGTH, ALPHA = -0.4, -0.04   # SDM s (the paper's mild antisqueeze), SAGD power-law alpha
T = 1000
ISO = "isotropic"
SAMPLER_ISO = "diffusers_ddpm"
AMP = {"bf16": torch.bfloat16, "none": None}


def require_diffusers() -> None:
    """Raise :class:`~anisodiff.bench.errors.BenchError` when diffusers is missing (before any timing)."""
    if importlib.util.find_spec("diffusers") is None:
        raise BenchError("--suite train / sampling need diffusers (UNet2DModel, DDPMScheduler, "
                            "AnisoDDPMScheduler): pip install diffusers (or anisodiff[diffusers]); "
                            "the op benchmark (--suite ops) runs without it")


def make_unet(name: str, device: str, seed: int = 0):
    """A freshly initialised ``diffusers.UNet2DModel`` of :data:`UNETS` ``[name]`` (seeded)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNETS[name]).to(device)


def model_cases(B: int, size: int, device: str):
    """The SDM and SDM + power-law cases of the op benchmark (luminance axis, s = -0.4, alpha =
    -0.04, linear schedule) at ``[B, 3, size, size]``, on ``device``."""
    sdm = make_case("sdm", B, 3, size, size, torch.float32, device)
    spl = make_case("sdm_powerlaw", B, 3, size, size, torch.float32, device)
    return sdm, spl


def stats_ms(xs: list[float]) -> dict:
    q1, q2, q3 = quantiles(xs)
    return {"median_ms": q2 * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(xs) * 1e3}


def paired_pct(xs: list[float], ref: list[float]) -> dict:
    """Median and quartiles of the per-round ratios ``xs[i] / ref[i]`` as % over the reference."""
    q1, q2, q3 = quantiles([x / r for x, r in zip(xs, ref)])
    return {"paired_overhead_pct": 100 * (q2 - 1), "paired_overhead_q1_pct": 100 * (q1 - 1),
            "paired_overhead_q3_pct": 100 * (q3 - 1)}


def interleaved(timers, planned: int, s: dict) -> dict:
    """Up to 2 x ``planned`` rounds to collect ``planned`` clean ones (smoke: no extra rounds)."""
    factor = 1 if s["mode"] == "smoke" else 2
    return interleave(timers, planned, max_rounds=factor * planned, max_s=s["max_s"],
                         max_other_load=s["max_other_load"])


def autocast(device: str, amp: str):
    dtype = AMP[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def model_info(name: str, model) -> dict:
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in UNETS[name].items()}
    return {"name": name, "title": UNET_TITLES[name], "class": "diffusers.UNet2DModel",
            "config": cfg, "parameters": sum(p.numel() for p in model.parameters())}
