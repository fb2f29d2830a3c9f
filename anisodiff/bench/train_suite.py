"""``--suite train``: one optimizer step of the SDM paper's diffusers ``UNet2DModel`` (docs/design.md,
"The papers' settings": 32x32, ``block_out_channels=(128, 256, 512, 512)``, attention at 4x4; B =
128, bf16 autocast on cuda; AdamW with the paper's hyper-parameters) with each way of making the
noisy input and the target (:data:`TRAIN_VARIANTS`): the isotropic floor (``torch.randn_like`` +
``DDPMScheduler.add_noise``), ``anisodiff.add_noise`` for SDM, SAGD power law and SDM + power law,
the official SDM code pattern, the SAGD appendix recipe and the vectorised eager code.

The step: ``t ~ U{0..T-1}`` on the device, the noise (float32, outside autocast, as the official
code), the forward pass under autocast, MSE against the target, backward, AdamW step,
``zero_grad(set_to_none=True)``. No gradient clipping, EMA or LR schedule: they cost every variant
the same and would only shrink the relative overhead. One model and optimizer serve every variant
(same weights, same allocator state). Each variant's noise alone is timed too (``noise_ms``), which
says where its overhead comes from. Variants are interleaved (one block of each per round, the order
rotated every round) with the op benchmark's load filter; overheads are relative to the isotropic
variant, as a ratio of medians and as the median of per-round paired ratios. Needs diffusers.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from . import baselines as bl
from . import cases
from .goals import train_goals
from .machine import machine_info
from .models import (ALPHA, ISO, STRENGTH, T, UNETS, autocast, interleaved, make_unet, model_cases,
                     model_info, paired_pct, require_diffusers, stats_ms)
from .timing import Timer, first_call, make_clock, progress_line

__all__ = ["OPTIMIZER", "TRAIN_VARIANTS", "train_noise_fns", "make_train_steps", "run_train"]


OPTIMIZER = {"lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "eps": 1e-8}
TRAIN_VARIANTS = {
    ISO: "torch.randn_like(x0) + diffusers DDPMScheduler.add_noise; target = the white noise "
         "(standard DDPM training, the floor)",
    "anisodiff_sdm": f"anisodiff.add_noise(x0, t, SDM s={STRENGTH}) on the primary fused backend",
    "anisodiff_powerlaw": f"anisodiff.add_noise, SAGD power law alpha={ALPHA} (calibrated)",
    "anisodiff_sdm_powerlaw": f"anisodiff.add_noise, SDM s={STRENGTH} + power law alpha={ALPHA}",
    "official_sdm": f"the official SDM code pattern, s={STRENGTH} (baselines.official_sdm: "
                    "CPU randn copied to the device, per-sample .item() loop building S, bmm, "
                    "diffusers add_noise)",
    "sagd_appendix": f"the SAGD appendix recipe, power law alpha={ALPHA} (baselines."
                     "sagd_appendix: randn, fftn, * w, ifftn, per-plane std, diffusers add_noise)",
    "eager_sdm_powerlaw": f"vectorised eager PyTorch, SDM s={STRENGTH} + power law alpha={ALPHA} "
                          "(baselines.eager_vectorised: randn_like, fft2/ifft2, einsum, mix)",
}


def train_noise_fns(B: int, size: int, device: str, backends=("cpu",)) -> dict:
    """``{variant: fn(x0, t) -> (x_t, target)}`` for :data:`TRAIN_VARIANTS` at ``[B, 3, size,
    size]``; the anisodiff variants run on ``backends[0]``, and ``anisodiff_sdm`` also on every
    other backend (``anisodiff_sdm_<backend>``). Each fn draws its own noise, as in training."""
    from diffusers import DDPMScheduler

    import anisodiff as ad

    sdm, spl = model_cases(B, size, device)
    stock = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    ac, betas, axes, w = sdm.alphas_cumprod, sdm.betas, sdm.axes, spl.weights
    vp = sdm.schedule
    specs = {"sdm": sdm.spec, "powerlaw": ad.NoiseSpec(spectral=spl.spec.spectral),
             "sdm_powerlaw": spl.spec}
    primary = backends[0]

    def iso(x0, t):
        noise = torch.randn_like(x0)
        return stock.add_noise(x0, noise, t), noise

    def fused(spec, backend):
        return lambda x0, t: ad.add_noise(x0, t, spec, vp, backend=backend)

    fns = {ISO: iso}
    fns.update({f"anisodiff_{k}": fused(spec, primary) for k, spec in specs.items()})
    fns.update({f"anisodiff_sdm_{b}": fused(specs["sdm"], b) for b in backends[1:]})
    fns["official_sdm"] = lambda x0, t: bl.official_sdm(x0, t, ac, betas, axes, STRENGTH)
    fns["sagd_appendix"] = lambda x0, t: bl.sagd_appendix(x0, t, ac, betas, None, 0.0, w)
    fns["eager_sdm_powerlaw"] = lambda x0, t: bl.eager_vectorised(x0, t, ac, betas, axes, STRENGTH, w)
    return fns


def make_train_steps(s: dict, backends) -> tuple[dict, dict, torch.Tensor, object]:
    """``({variant: step()}, {variant: noise fn}, x0, model)`` for train settings ``s``: one model
    and AdamW optimizer shared by every variant; ``step()`` runs one optimizer step and returns
    the loss (a tensor, not synchronised)."""
    require_diffusers()
    import torch.nn.functional as F

    device = s["device"]
    model = make_unet(s["unet"], device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), **OPTIMIZER)
    size, B = UNETS[s["unet"]]["sample_size"], s["batch"]
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(B, 3, size, size, generator=g) * 2 - 1).to(device)
    fns = train_noise_fns(B, size, device, list(backends))

    def step_fn(noise_fn):
        def step():
            t = torch.randint(0, T, (B,), device=device)
            x_t, target = noise_fn(x0, t)          # float32, outside autocast (the official code)
            with autocast(device, s["amp"]):
                pred = model(x_t, t).sample
            loss = F.mse_loss(pred.float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    return {name: step_fn(fn) for name, fn in fns.items()}, fns, x0, model


def run_train(s: dict, *, backends=None, progress=None) -> dict:
    """The train-step suite with settings ``s`` (:func:`resolve_settings` ``["train"]``)."""
    device = s["device"]
    backends = list(backends or cases.fused_backends(device)[0])
    clock = make_clock(device)
    t_start = time.perf_counter()
    steps, fns, x0, model = make_train_steps(s, backends)
    B, size = x0.shape[0], x0.shape[-1]
    timers, info = [], {}
    for name in fns:
        first = first_call(steps[name], clock)
        for _ in range(max(0, s["warmup_steps"] - 1)):
            steps[name]()
        loss = float(steps[name]())  # one more step, its loss read back (a sync)
        info[name] = {"first_step_s": first, "loss_finite": math.isfinite(loss)}
        timers.append(Timer(name, steps[name], clock, 0.0, 0.0, first, inner=s["steps_per_block"]))
        progress_line(f"train: warmed up {name} (first step {first:.2f} s)", progress)
    group = interleaved(timers, s["rounds"], s)
    keep = group.pop("keep")
    samples = {tm.name: [tm.samples[i] for i in keep] for tm in timers}
    progress_line(f"train: {group['rounds']} rounds of {len(timers)} variants x {s['steps_per_block']} "
              f"steps ({group['clean_rounds']} clean)", progress)

    # the noise alone, same inputs, interleaved the same way (fixed t: one draw of the step's t)
    t_fixed = torch.randint(0, T, (B,), device=device)
    ntimers = []
    for name, fn in fns.items():
        call = (lambda f: lambda: f(x0, t_fixed))(fn)
        first = first_call(call, clock)
        ntimers.append(Timer(name, call, clock, 0.01, s["noise_block_ms"] / 1e3, first))
    ngroup = interleaved(ntimers, s["noise_rounds"], s)
    nkeep = ngroup.pop("keep")
    noise_stats = {tm.name: stats_ms([tm.samples[i] for i in nkeep]) for tm in ntimers}

    ref = samples[ISO]
    ref_med = statistics.median(ref)
    variants = []
    for name in fns:
        st = stats_ms(samples[name])
        base = name if name in TRAIN_VARIANTS else "anisodiff_sdm"
        backend = None
        if name.startswith("anisodiff_"):
            backend = name.rsplit("_", 1)[1] if name not in TRAIN_VARIANTS else backends[0]
        variants.append({
            "name": name, "title": TRAIN_VARIANTS[base] + (f" (backend {backend})" if backend else ""),
            "anisodiff": name.startswith("anisodiff_"), "backend": backend,
            **st, "samples_ms": [x * 1e3 for x in samples[name]],
            "overhead_ms": st["median_ms"] - ref_med * 1e3,
            "overhead_pct": 100 * (st["median_ms"] / (ref_med * 1e3) - 1),
            **paired_pct(samples[name], ref),
            "noise_ms": noise_stats[name]["median_ms"], "noise_iqr_ms": noise_stats[name]["iqr_ms"],
            **info[name],
        })
    goal = train_goals(variants, group["reliable"])
    return {
        "suite": "train_step",
        "machine": machine_info(device),
        "settings": {**s, "fused_backends": backends, "clock": clock.name,
                     "cudnn_benchmark": torch.backends.cudnn.benchmark if device == "cuda" else None},
        "model": model_info(s["unet"], model),
        "input": {"shape": [B, 3, size, size], "dtype": "float32", "x0": "uniform [-1, 1], fixed",
                  "timesteps": f"torch.randint(0, {T}, (B,)) on the device, every step"},
        "optimizer": "torch.optim.AdamW(" + ", ".join(f"{k}={v}" for k, v in OPTIMIZER.items()) + ")",
        "step": "t ~ U{0..T-1}; (x_t, target) from the variant (float32, outside autocast); "
                f"pred = unet(x_t, t).sample under autocast({s['amp']}); "
                "loss = mse(pred.float(), target.float()); backward; AdamW step; "
                "zero_grad(set_to_none=True). No grad clipping, EMA or LR schedule.",
        "reference": ISO,
        "timing": f"{clock.name} around blocks of {s['steps_per_block']} steps, one block per "
                  "variant per round, order rotated every round; noise_ms: the variant's noise "
                  "alone, interleaved the same way in calibrated blocks",
        **group,
        "noise_rounds": ngroup["rounds"], "noise_reliable": ngroup["reliable"],
        "variants": variants,
        "goal": goal,
        "elapsed_s": time.perf_counter() - t_start,
    }
