"""``--suite sampling``: 50 DDPM steps (``DDPMScheduler.set_timesteps(50)``, t = 980 ... 0) at B =
1024 (cuda) with each sampler of :data:`SAMPLERS`, SDM s = -0.4: stock diffusers
``DDPMScheduler.step`` with white noise (the isotropic floor), the official SDM sampler
(``ConsistentCustomDDPMScheduler.step``: a per-sample ``.item()`` loop, ``linalg.inv``, four
``bmm`` around the stock step), anisodiff's ``AnisoDDPMScheduler.step`` and
``AnisotropicNoise.ddpm_step`` (the fused one-pass op where the device has it; the JSON says which
path ran). Each sampler runs twice: with a stand-in model (a fixed tensor computed once, so the
time is the sampler's alone: prior draw, 50 steps) and with the UNet (its forward under autocast,
the full sampling cost). Interleaved and filtered like the train-step suite. Needs diffusers.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import baselines as bl
from . import cases
from .machine import machine_info
from .models import (SAMPLER_ISO, STRENGTH, T, UNETS, autocast, interleaved, make_unet, model_cases,
                     model_info, paired_pct, require_diffusers, stats_ms)
from .timing import Timer, first_call, make_clock, progress_line

__all__ = ["SAMPLERS", "make_samplers", "run_sampling"]


SAMPLERS = {
    SAMPLER_ISO: "stock diffusers DDPMScheduler.step, white prior and step noise (the floor)",
    "official_sdm": "the official SDM sampler (ConsistentCustomDDPMScheduler.step): per-sample "
                    ".item() loop building S, linalg.inv, 2 bmm, DDPMScheduler.step, 2 bmm; prior "
                    "S(T-1) randn",
    "aniso_ddpm_scheduler": "anisodiff.integrations.diffusers.AnisoDDPMScheduler.step "
                            "(sampling_mode='official') and its prior_noise",
    "anisodiff_ddpm_step": "anisodiff.AnisotropicNoise.ddpm_step (mode='official'; the fused op where "
                           "the device has it) and sample_prior",
}


def _which_ddpm_step(fn) -> str:
    """Which fused DDPM-step op one call of ``fn`` ran (``anisodiff::ddpm_step`` or
    ``anisodiff_triton::ddpm_step``), if any (every op dispatched during the call is recorded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    with _Ops() as ops:
        fn()
    fused = sorted(n.split(".")[0] for n in ops.names
                   if n.startswith(("anisodiff::ddpm_step", "anisodiff_triton::ddpm_step")))
    return f"fused {fused[0]}" if fused else "reference.ddpm_step (vectorised PyTorch)"


def make_samplers(B: int, size: int, steps: int, device: str, model_fn) -> dict:
    """``{sampler: fn() -> x_0}`` for :data:`SAMPLERS`: a whole sampling run (prior + ``steps``
    DDPM steps, diffusers' "leading" spacing) at ``[B, 3, size, size]`` with ``model_fn(x, t) ->
    eps_hat`` (float32), SDM s = -0.4 on the luminance axis."""
    from diffusers import DDPMScheduler

    import anisodiff as ad
    from ..integrations.diffusers import AnisoDDPMScheduler

    sdm, _ = model_cases(1, size, device)
    shape = (B, 3, size, size)
    axes = sdm.axes
    stock = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    stock.set_timesteps(steps)
    official = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    official.set_timesteps(steps)
    aniso = AnisoDDPMScheduler(num_train_timesteps=T, beta_schedule="linear", noise_spec=sdm.spec)
    aniso.set_timesteps(steps)
    noise = ad.AnisotropicNoise(sdm.spec, sdm.schedule)
    ts = [int(t) for t in stock.timesteps]
    prevs = ts[1:] + [-1]

    def run_stock():
        x = torch.randn(shape, device=device)
        for t in stock.timesteps:
            x = stock.step(model_fn(x, t), t, x).prev_sample
        return x

    def run_official():
        x = bl.official_sdm_prior(shape, official.betas, axes, STRENGTH, device=device)
        for t in official.timesteps:
            x, _ = bl.official_sdm_ddpm_step(official, model_fn(x, t), t, x, axes, STRENGTH)
        return x

    def run_aniso():
        x = aniso.init_noise_sigma * aniso.prior_noise(shape, device=device)
        for t in aniso.timesteps:
            x = aniso.step(model_fn(x, t), t, x).prev_sample
        return x

    def run_fused():
        x = noise.sample_prior(shape, device=device)
        for t, prev in zip(ts, prevs):
            x, _ = noise.ddpm_step(model_fn(x, t), t, x, prev_timestep=prev)
        return x

    return {SAMPLER_ISO: run_stock, "official_sdm": run_official, "aniso_ddpm_scheduler": run_aniso,
            "anisodiff_ddpm_step": run_fused}


def run_sampling(s: dict, *, backends=None, progress=None) -> dict:
    """The sampling suite with settings ``s`` (:func:`resolve_settings` ``["sampling"]``)."""
    require_diffusers()
    device = s["device"]
    backends = list(backends or cases.fused_backends(device)[0])
    clock = make_clock(device)
    t_start = time.perf_counter()
    size, B, steps = UNETS[s["unet"]]["sample_size"], s["batch"], s["steps"]
    shape = (B, 3, size, size)
    eps_const = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    stand_in = make_samplers(B, size, steps, device, lambda x, t: eps_const)
    model = make_unet(s["unet"], device)
    model.eval()

    @torch.no_grad()
    def unet_fn(x, t):
        t_batch = torch.full((B,), int(t), device=device, dtype=torch.long)
        with autocast(device, s["amp"]):
            return model(x, t_batch).sample.float()

    with_unet = make_samplers(B, size, steps, device, unet_fn)
    # which step the anisodiff samplers ran (fused op or reference): a 2-step run each (t = 500
    # draws step noise, t = 0 does not), every dispatched op recorded
    two_steps = make_samplers(B, size, 2, device, lambda x, t: eps_const)
    paths = {name: _which_ddpm_step(two_steps[name]) if name.startswith("aniso") else None
             for name in SAMPLERS}

    # 1. the samplers alone (stand-in model)
    timers, finite = [], {}
    for name, fn in stand_in.items():
        first = first_call(fn, clock)
        x = fn()  # warm, and check the result
        finite[name] = bool(torch.isfinite(x).all())
        timers.append(Timer(name, fn, clock, 0.0, 0.0, first, inner=1))
        progress_line(f"sampling: {name} sampler alone {first:.2f} s (first run)", progress)
    group = interleaved(timers, s["sampler_rounds"], s)
    keep = group.pop("keep")
    alone = {tm.name: [tm.samples[i] for i in keep] for tm in timers}

    # 2. with the UNet (warm-up: a few forwards at this batch; the samplers are warm already)
    for _ in range(3):
        first_unet = clock.time_block(lambda: unet_fn(eps_const, 500), 1)
    utimers, finite_unet = [], {}
    for name, fn in with_unet.items():
        utimers.append(Timer(name, fn, clock, 0.0, 0.0, first_unet, inner=1))
    ugroup = interleaved(utimers, s["unet_rounds"], s)
    ukeep = ugroup.pop("keep")
    total = {tm.name: [tm.samples[i] for i in ukeep] for tm in utimers}
    for name, fn in with_unet.items():  # finiteness of one UNet run (outside the timing)
        finite_unet[name] = bool(torch.isfinite(fn()).all()) if s["unet_rounds"] else None
    progress_line(f"sampling: {group['rounds']} sampler-only rounds, {ugroup['rounds']} rounds with the "
              "UNet", progress)

    ref_alone, ref_total = statistics.median(alone[SAMPLER_ISO]), statistics.median(total[SAMPLER_ISO])
    variants = []
    for name in SAMPLERS:
        a, u = stats_ms(alone[name]), stats_ms(total[name])
        over = a["median_ms"] - ref_alone * 1e3
        variants.append({
            "name": name, "title": SAMPLERS[name], "path": paths[name],
            "sampler_only": {**a, "per_step_ms": a["median_ms"] / steps,
                             "samples_ms": [x * 1e3 for x in alone[name]],
                             "overhead_ms": over, "ratio": a["median_ms"] / (ref_alone * 1e3),
                             **paired_pct(alone[name], alone[SAMPLER_ISO])},
            "with_unet": {**u, "samples_ms": [x * 1e3 for x in total[name]],
                          "overhead_ms": u["median_ms"] - ref_total * 1e3,
                          "overhead_pct": 100 * (u["median_ms"] / (ref_total * 1e3) - 1),
                          **paired_pct(total[name], total[SAMPLER_ISO])},
            "sampler_overhead_pct_of_total": 100 * over / (ref_total * 1e3),
            "output_finite": finite[name], "output_finite_with_unet": finite_unet[name],
        })
    return {
        "suite": "sampling",
        "machine": machine_info(device),
        "settings": {**s, "fused_backends": backends, "clock": clock.name},
        "model": model_info(s["unet"], model),
        "shape": list(shape),
        "spec": {"kind": "sdm", "strength": STRENGTH, "axis": list(bl.LUMINANCE_AXIS),
                 "profile": "r = s * beta_t / beta_max", "mode": "official"},
        "timesteps": f"DDPMScheduler(num_train_timesteps={T}, beta_schedule='linear')"
                     f".set_timesteps({steps}) (leading spacing, t = 980 ... 0 for 50 steps)",
        "stand_in": "sampler only: the model output is one fixed N(0, 1) tensor of the sample's shape, "
                    "computed once, so the time is the sampler's alone (prior draw + every step)",
        "with_unet": f"the UNet's forward (torch.no_grad, autocast {s['amp']}) at every step, "
                     "t broadcast with torch.full as the official sampler",
        "reference": SAMPLER_ISO,
        "timing": f"{clock.name} around one whole sampling run per variant per round, order rotated",
        "sampler_rounds": group["rounds"], "sampler_reliable": group["reliable"],
        "unet_rounds": ugroup["rounds"], "unet_reliable": ugroup["reliable"],
        "reliable": group["reliable"] and ugroup["reliable"],
        "unet_forward_ms": (ref_total - ref_alone) * 1e3 / steps,
        "variants": variants,
        "elapsed_s": time.perf_counter() - t_start,
    }
