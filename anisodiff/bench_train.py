"""``anisodiff bench --suite train`` and ``--suite sampling``: the noise in a real training step and in
a real sampler, side by side (issue 7, item 5).

**train**: one optimizer step of the SDM paper's diffusers ``UNet2DModel`` (research/sdm.md
section 5: 32x32, ``block_out_channels=(128, 256, 512, 512)``, attention at 4x4; B = 128, bf16
autocast on cuda; AdamW with the paper's hyper-parameters) with each way of making the noisy input
and the target: the isotropic floor (``torch.randn_like`` + ``DDPMScheduler.add_noise``),
``anisodiff.add_noise`` for SDM, SAGD power law and SDM + power law, the official SDM code pattern,
the SAGD appendix recipe and the vectorised eager code. The step: ``t ~ U{0..T-1}`` on the device,
the noise (float32, outside autocast, as the official code), the forward pass under autocast, MSE
against the target, backward, AdamW step, ``zero_grad(set_to_none=True)``. No gradient clipping,
EMA or LR schedule: they cost every variant the same and would only shrink the relative overhead.
One model and optimizer serve every variant (same weights, same allocator state). Each variant's
noise alone is timed too (``noise_ms``), which says where its overhead comes from.

**sampling**: 50 DDPM steps (``DDPMScheduler.set_timesteps(50)``, t = 980 ... 0) at B = 1024 (cuda)
with each sampler, SDM s = -0.4: stock diffusers ``DDPMScheduler.step`` with white noise (the
isotropic floor), the official SDM sampler (``ConsistentCustomDDPMScheduler.step``: a per-sample
``.item()`` loop, ``linalg.inv``, four ``bmm`` around the stock step), anisodiff's
``AnisoDDPMScheduler.step`` and ``AnisotropicNoise.ddpm_step`` (the fused one-pass op where the
device has it; the JSON says which path ran). Each sampler runs twice: with a stand-in model (a fixed
tensor computed once, so the time is the sampler's alone: prior draw, 50 steps) and with the UNet
(its forward under autocast, the full sampling cost).

Variants are interleaved (one block of each per round, the order rotated every round) with the same
load filter as the op benchmark; statistics are the median and IQR over the kept rounds, overheads
relative to the isotropic variant both as a ratio of medians and as the median of per-round paired
ratios (robust to drift). Nothing here is hard-coded or extrapolated. Needs diffusers.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time

import torch

from . import bench as _b
from . import bench_baselines as bl
from ._argtypes import int_in

__all__ = [
    "UNETS", "PRESETS", "TRAIN_VARIANTS", "SAMPLERS", "TRAIN_GOAL_PCT", "add_arguments",
    "resolve_settings", "require_diffusers", "make_unet", "train_noise_fns", "make_train_steps",
    "make_samplers",
    "run_train", "run_sampling", "format_train", "format_sampling", "plot_models",
]

# research/sdm.md section 5 (the official code's UNet2DModel), and a tiny stand-in for the CPU
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
UNET_TITLES = {"sdm_paper": "the SDM paper's UNet2DModel (research/sdm.md section 5)",
               "tiny": "a tiny UNet2DModel (2 levels of 16/32 channels, attention at 8x8; CPU stand-in)"}

STRENGTH, ALPHA = -0.4, -0.04   # SDM s (the paper's mild antisqueeze), SAGD power-law alpha
T = 1000
ISO = "isotropic"
SAMPLER_ISO = "diffusers_ddpm"
# issue 7: an anisodiff training step within 2 % of the isotropic one
TRAIN_GOAL_PCT = 2.0
OPTIMIZER = {"lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "eps": 1e-8}

TRAIN_VARIANTS = {
    ISO: "torch.randn_like(x0) + diffusers DDPMScheduler.add_noise; target = the white noise "
         "(standard DDPM training, the floor)",
    "anisodiff_sdm": f"anisodiff.add_noise(x0, t, SDM s={STRENGTH}) on the primary fused backend",
    "anisodiff_powerlaw": f"anisodiff.add_noise, SAGD power law alpha={ALPHA} (calibrated)",
    "anisodiff_sdm_powerlaw": f"anisodiff.add_noise, SDM s={STRENGTH} + power law alpha={ALPHA}",
    "official_sdm": f"the official SDM code pattern, s={STRENGTH} (bench_baselines.official_sdm: "
                    "CPU randn copied to the device, per-sample .item() loop building S, bmm, "
                    "diffusers add_noise)",
    "sagd_appendix": f"the SAGD appendix recipe, power law alpha={ALPHA} (bench_baselines."
                     "sagd_appendix: randn, fftn, * w, ifftn, per-plane std, diffusers add_noise)",
    "eager_sdm_powerlaw": f"vectorised eager PyTorch, SDM s={STRENGTH} + power law alpha={ALPHA} "
                          "(bench_baselines.eager_vectorised: randn_like, fft2/ifft2, einsum, mix)",
}
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

PRESETS = {
    "cuda": {
        "full": {"train": {"unet": "sdm_paper", "batch": 128, "amp": "bf16", "rounds": 30,
                           "steps_per_block": 2, "warmup_steps": 5, "noise_rounds": 15,
                           "noise_block_ms": 2.0, "max_s": 240.0},
                 "sampling": {"unet": "sdm_paper", "batch": 1024, "steps": 50, "amp": "bf16",
                              "sampler_rounds": 7, "unet_rounds": 5, "max_s": 300.0}},
        "quick": {"train": {"unet": "sdm_paper", "batch": 128, "amp": "bf16", "rounds": 12,
                            "steps_per_block": 2, "warmup_steps": 3, "noise_rounds": 7,
                            "noise_block_ms": 2.0, "max_s": 90.0},
                  "sampling": {"unet": "sdm_paper", "batch": 1024, "steps": 50, "amp": "bf16",
                               "sampler_rounds": 4, "unet_rounds": 2, "max_s": 150.0}},
        "smoke": {"train": {"unet": "tiny", "batch": 8, "amp": "bf16", "rounds": 3,
                            "steps_per_block": 1, "warmup_steps": 1, "noise_rounds": 3,
                            "noise_block_ms": 0.5, "max_s": 20.0},
                  "sampling": {"unet": "tiny", "batch": 16, "steps": 5, "amp": "bf16",
                               "sampler_rounds": 2, "unet_rounds": 1, "max_s": 20.0}},
    },
    "cpu": {
        "full": {"train": {"unet": "tiny", "batch": 32, "amp": "none", "rounds": 15,
                           "steps_per_block": 1, "warmup_steps": 2, "noise_rounds": 9,
                           "noise_block_ms": 5.0, "max_s": 240.0},
                 "sampling": {"unet": "tiny", "batch": 64, "steps": 50, "amp": "none",
                              "sampler_rounds": 5, "unet_rounds": 3, "max_s": 300.0}},
        "quick": {"train": {"unet": "tiny", "batch": 8, "amp": "none", "rounds": 7,
                            "steps_per_block": 1, "warmup_steps": 2, "noise_rounds": 5,
                            "noise_block_ms": 5.0, "max_s": 30.0},
                  "sampling": {"unet": "tiny", "batch": 16, "steps": 50, "amp": "none",
                               "sampler_rounds": 3, "unet_rounds": 2, "max_s": 40.0}},
        "smoke": {"train": {"unet": "tiny", "batch": 2, "amp": "none", "rounds": 2,
                            "steps_per_block": 1, "warmup_steps": 1, "noise_rounds": 2,
                            "noise_block_ms": 0.5, "max_s": 10.0},
                  "sampling": {"unet": "tiny", "batch": 4, "steps": 3, "amp": "none",
                               "sampler_rounds": 2, "unet_rounds": 1, "max_s": 10.0}},
    },
}
_AMP = {"bf16": torch.bfloat16, "none": None}


class _Skip(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the train and sampling suites (``anisodiff bench``)."""
    g = p.add_argument_group("train and sampling suites (--suite train / sampling; need diffusers)")
    pos = int_in(1)
    g.add_argument("--unet", choices=tuple(UNETS), default=None,
                   help="the model: sdm_paper (research/sdm.md section 5, 32x32; default on cuda) "
                        "or tiny (16x16; default on cpu)")
    g.add_argument("--amp", choices=tuple(_AMP), default=None,
                   help="autocast dtype of the UNet (default: bf16 on cuda, none on cpu)")
    g.add_argument("--train-batch", type=pos, default=None, metavar="B",
                   help="training batch (cuda 128; cpu quick 8)")
    g.add_argument("--train-rounds", type=pos, default=None, metavar="N",
                   help="interleaved rounds of training steps (cuda full 30, quick 12)")
    g.add_argument("--sample-batch", type=pos, default=None, metavar="B",
                   help="sampling batch (cuda 1024; cpu quick 16)")
    g.add_argument("--sample-steps", type=pos, default=None, metavar="N",
                   help="DDPM steps per sampling run (50; smoke fewer)")
    g.add_argument("--sample-rounds", type=pos, default=None, metavar="N",
                   help="interleaved rounds of the sampler-only runs (cuda full 7, quick 4)")
    g.add_argument("--sample-unet-rounds", type=pos, default=None, metavar="N",
                   help="interleaved rounds of the sampling runs with the UNet (cuda full 5, quick 2)")


def resolve_settings(args, mode: str, suites) -> dict:
    """``{"train": {...}, "sampling": {...}}``: the device's preset for ``mode`` overridden by the
    options (only the suites in ``suites``)."""
    preset = PRESETS["cuda" if args.device == "cuda" else "cpu"][mode]
    out = {}
    over = {"train": {"unet": "unet", "amp": "amp", "batch": "train_batch", "rounds": "train_rounds"},
            "sampling": {"unet": "unet", "amp": "amp", "batch": "sample_batch",
                         "steps": "sample_steps", "sampler_rounds": "sample_rounds",
                         "unet_rounds": "sample_unet_rounds"}}
    for suite in ("train", "sampling"):
        if suite not in suites:
            continue
        s = dict(preset[suite])
        for key, opt in over[suite].items():
            if getattr(args, opt, None) is not None:
                s[key] = getattr(args, opt)
        s.update(device=args.device, mode=mode, max_other_load=_max_load(args))
        out[suite] = s
    return out


def _max_load(args) -> float:
    if getattr(args, "max_other_load", None) is not None:
        return args.max_other_load
    return _b.DEFAULT_MAX_OTHER_LOAD[args.device]


def require_diffusers() -> None:
    """Raise :class:`anisodiff.bench.BenchError` when diffusers is missing (before any timing)."""
    if importlib.util.find_spec("diffusers") is None:
        raise _b.BenchError("--suite train / sampling need diffusers (UNet2DModel, DDPMScheduler, "
                            "AnisoDDPMScheduler): pip install diffusers (or anisodiff[diffusers]); "
                            "the op benchmark (--suite ops) runs without it")


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------
def make_unet(name: str, device: str, seed: int = 0):
    """A freshly initialised ``diffusers.UNet2DModel`` of :data:`UNETS` ``[name]`` (seeded)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNETS[name]).to(device)


def _cases(B: int, size: int, device: str):
    """The SDM and SDM + power-law cases of the op benchmark (luminance axis, s = -0.4, alpha =
    -0.04, linear schedule) at ``[B, 3, size, size]``, on ``device``."""
    sdm = _b.make_case("sdm", B, 3, size, size, torch.float32, device)
    spl = _b.make_case("sdm_powerlaw", B, 3, size, size, torch.float32, device)
    return sdm, spl


def train_noise_fns(B: int, size: int, device: str, backends=("cpu",)) -> dict:
    """``{variant: fn(x0, t) -> (x_t, target)}`` for :data:`TRAIN_VARIANTS` at ``[B, 3, size,
    size]``; the anisodiff variants run on ``backends[0]``, and ``anisodiff_sdm`` also on every
    other backend (``anisodiff_sdm_<backend>``). Each fn draws its own noise, as in training."""
    from diffusers import DDPMScheduler

    import anisodiff as ad

    sdm, spl = _cases(B, size, device)
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
    from .integrations.diffusers import AnisoDDPMScheduler

    sdm, _ = _cases(1, size, device)
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


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def _stats_ms(xs: list[float]) -> dict:
    q1, q2, q3 = _b._quantiles(xs)
    return {"median_ms": q2 * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(xs) * 1e3}


def _paired_pct(xs: list[float], ref: list[float]) -> dict:
    """Median and quartiles of the per-round ratios ``xs[i] / ref[i]`` as % over the reference."""
    q1, q2, q3 = _b._quantiles([x / r for x, r in zip(xs, ref)])
    return {"paired_overhead_pct": 100 * (q2 - 1), "paired_overhead_q1_pct": 100 * (q1 - 1),
            "paired_overhead_q3_pct": 100 * (q3 - 1)}


def _interleaved(timers, planned: int, s: dict) -> dict:
    """Up to 2 x ``planned`` rounds to collect ``planned`` clean ones (smoke: no extra rounds)."""
    factor = 1 if s["mode"] == "smoke" else 2
    return _b.interleave(timers, planned, max_rounds=factor * planned, max_s=s["max_s"],
                         max_other_load=s["max_other_load"])


def _progress(msg: str, stream) -> None:
    if stream is not None:
        print(msg, file=stream, flush=True)


def _autocast(device: str, amp: str):
    dtype = _AMP[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def _model_info(name: str, model) -> dict:
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in UNETS[name].items()}
    return {"name": name, "title": UNET_TITLES[name], "class": "diffusers.UNet2DModel",
            "config": cfg, "parameters": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
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
            with _autocast(device, s["amp"]):
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
    backends = list(backends or _b.fused_backends(device)[0])
    clock = _b._clock(device)
    t_start = time.perf_counter()
    steps, fns, x0, model = make_train_steps(s, backends)
    B, size = x0.shape[0], x0.shape[-1]
    timers, info = [], {}
    for name in fns:
        first = _b._first_call(steps[name], clock)
        for _ in range(max(0, s["warmup_steps"] - 1)):
            steps[name]()
        loss = float(steps[name]())  # one more step, its loss read back (a sync)
        info[name] = {"first_step_s": first, "loss_finite": math.isfinite(loss)}
        timers.append(_b.Timer(name, steps[name], clock, 0.0, 0.0, first, inner=s["steps_per_block"]))
        _progress(f"train: warmed up {name} (first step {first:.2f} s)", progress)
    group = _interleaved(timers, s["rounds"], s)
    keep = group.pop("keep")
    samples = {tm.name: [tm.samples[i] for i in keep] for tm in timers}
    _progress(f"train: {group['rounds']} rounds of {len(timers)} variants x {s['steps_per_block']} "
              f"steps ({group['clean_rounds']} clean)", progress)

    # the noise alone, same inputs, interleaved the same way (fixed t: one draw of the step's t)
    t_fixed = torch.randint(0, T, (B,), device=device)
    ntimers = []
    for name, fn in fns.items():
        call = (lambda f: lambda: f(x0, t_fixed))(fn)
        first = _b._first_call(call, clock)
        ntimers.append(_b.Timer(name, call, clock, 0.01, s["noise_block_ms"] / 1e3, first))
    ngroup = _interleaved(ntimers, s["noise_rounds"], s)
    nkeep = ngroup.pop("keep")
    noise_stats = {tm.name: _stats_ms([tm.samples[i] for i in nkeep]) for tm in ntimers}

    ref = samples[ISO]
    ref_med = statistics.median(ref)
    variants = []
    for name in fns:
        st = _stats_ms(samples[name])
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
            **_paired_pct(samples[name], ref),
            "noise_ms": noise_stats[name]["median_ms"], "noise_iqr_ms": noise_stats[name]["iqr_ms"],
            **info[name],
        })
    goal = [{"issue": 7, "variant": v["name"], "overhead_pct": v["paired_overhead_pct"],
             "overhead_pct_of_medians": v["overhead_pct"], "target_pct": TRAIN_GOAL_PCT,
             "met": v["paired_overhead_pct"] <= TRAIN_GOAL_PCT, "reliable": group["reliable"]}
            for v in variants if v["anisodiff"]]
    return {
        "suite": "train_step",
        "machine": _b.machine_info(device),
        "settings": {**s, "fused_backends": backends, "clock": clock.name,
                     "cudnn_benchmark": torch.backends.cudnn.benchmark if device == "cuda" else None},
        "model": _model_info(s["unet"], model),
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


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def run_sampling(s: dict, *, backends=None, progress=None) -> dict:
    """The sampling suite with settings ``s`` (:func:`resolve_settings` ``["sampling"]``)."""
    require_diffusers()
    device = s["device"]
    backends = list(backends or _b.fused_backends(device)[0])
    clock = _b._clock(device)
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
        with _autocast(device, s["amp"]):
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
        first = _b._first_call(fn, clock)
        x = fn()  # warm, and check the result
        finite[name] = bool(torch.isfinite(x).all())
        timers.append(_b.Timer(name, fn, clock, 0.0, 0.0, first, inner=1))
        _progress(f"sampling: {name} sampler alone {first:.2f} s (first run)", progress)
    group = _interleaved(timers, s["sampler_rounds"], s)
    keep = group.pop("keep")
    alone = {tm.name: [tm.samples[i] for i in keep] for tm in timers}

    # 2. with the UNet (warm-up: a few forwards at this batch; the samplers are warm already)
    for _ in range(3):
        first_unet = clock.time_block(lambda: unet_fn(eps_const, 500), 1)
    utimers, finite_unet = [], {}
    for name, fn in with_unet.items():
        utimers.append(_b.Timer(name, fn, clock, 0.0, 0.0, first_unet, inner=1))
    ugroup = _interleaved(utimers, s["unet_rounds"], s)
    ukeep = ugroup.pop("keep")
    total = {tm.name: [tm.samples[i] for i in ukeep] for tm in utimers}
    for name, fn in with_unet.items():  # finiteness of one UNet run (outside the timing)
        finite_unet[name] = bool(torch.isfinite(fn()).all()) if s["unet_rounds"] else None
    _progress(f"sampling: {group['rounds']} sampler-only rounds, {ugroup['rounds']} rounds with the "
              "UNet", progress)

    ref_alone, ref_total = statistics.median(alone[SAMPLER_ISO]), statistics.median(total[SAMPLER_ISO])
    variants = []
    for name in SAMPLERS:
        a, u = _stats_ms(alone[name]), _stats_ms(total[name])
        over = a["median_ms"] - ref_alone * 1e3
        variants.append({
            "name": name, "title": SAMPLERS[name], "path": paths[name],
            "sampler_only": {**a, "per_step_ms": a["median_ms"] / steps,
                             "samples_ms": [x * 1e3 for x in alone[name]],
                             "overhead_ms": over, "ratio": a["median_ms"] / (ref_alone * 1e3),
                             **_paired_pct(alone[name], alone[SAMPLER_ISO])},
            "with_unet": {**u, "samples_ms": [x * 1e3 for x in total[name]],
                          "overhead_ms": u["median_ms"] - ref_total * 1e3,
                          "overhead_pct": 100 * (u["median_ms"] / (ref_total * 1e3) - 1),
                          **_paired_pct(total[name], total[SAMPLER_ISO])},
            "sampler_overhead_pct_of_total": 100 * over / (ref_total * 1e3),
            "output_finite": finite[name], "output_finite_with_unet": finite_unet[name],
        })
    return {
        "suite": "sampling",
        "machine": _b.machine_info(device),
        "settings": {**s, "fused_backends": backends, "clock": clock.name},
        "model": _model_info(s["unet"], model),
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


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _head(sec: dict) -> str:
    m, st = sec["machine"], sec["settings"]
    gpu = f" | GPU {m['gpu']['name']}" if "gpu" in m else ""
    return (f"{m['cpu_model']} ({m['logical_cpus']} logical CPUs){gpu} | torch {m['torch_version']}, "
            f"{m['torch_num_threads']} threads | fused backends {', '.join(st['fused_backends'])}")


def format_train(sec: dict) -> str:
    st, mo = sec["settings"], sec["model"]
    B, C, H, W = sec["input"]["shape"]
    lines = [
        f"train step ({st['mode']} run, {sec['settings']['device']}): {mo['name']} UNet2DModel "
        f"({mo['parameters'] / 1e6:.1f} M parameters), B={B}, {C}x{H}x{W}, autocast {st['amp']}, "
        f"AdamW | {_head(sec)}",
        f"median [IQR] per step over {len(sec['variants'][0]['samples_ms'])} kept of "
        f"{sec['rounds']} interleaved rounds of {st['steps_per_block']} step(s); vs isotropic: "
        "ratio of medians and median of the per-round paired ratios [IQR]; noise ms: the "
        "variant's noise alone",
        "",
    ]
    head = (f"{'variant':<26}{'step ms':>10}{'[IQR]':>9}{'vs iso':>9}{'paired':>9}"
            f"{'[IQR]':>17}{'noise ms':>10}  backend")
    lines += [head, "-" * len(head)]
    for v in sec["variants"]:
        lines.append(
            f"{v['name']:<26}{v['median_ms']:>10.2f}{v['iqr_ms']:>9.2f}{v['overhead_pct']:>+8.1f}%"
            f"{v['paired_overhead_pct']:>+8.1f}%  [{v['paired_overhead_q1_pct']:+6.1f}, "
            f"{v['paired_overhead_q3_pct']:+6.1f}]{v['noise_ms']:>10.3f}  {v['backend'] or '-'}"
            + ("" if v["loss_finite"] else "  NON-FINITE LOSS"))
    lines.append("")
    for g in sec["goal"]:
        verdict = _b.goal_verdict(g["met"], g["reliable"])
        lines.append(f"issue 7 goal (anisodiff train step within {g['target_pct']:g} % of the "
                     f"isotropic step): {g['variant']} {g['overhead_pct']:+.2f} % -> {verdict}")
    if not sec["reliable"]:
        lines.append("WARNING: other processes kept the CPUs busy in most rounds: all rounds kept, "
                     "the overheads are unreliable")
    return "\n".join(lines)


def format_sampling(sec: dict) -> str:
    st, mo = sec["settings"], sec["model"]
    B, C, H, W = sec["shape"]
    lines = [
        f"sampling ({st['mode']} run, {st['device']}): {st['steps']} DDPM steps, B={B}, {C}x{H}x{W}, "
        f"SDM s={sec['spec']['strength']}; with the {mo['name']} UNet2DModel "
        f"({mo['parameters'] / 1e6:.1f} M parameters, autocast {st['amp']}; its forward "
        f"{sec['unet_forward_ms']:.2f} ms per step) | {_head(sec)}",
        f"median [IQR] per sampling run: sampler alone over {sec['sampler_rounds']} rounds (stand-in "
        f"model: a fixed tensor), with the UNet over {sec['unet_rounds']} rounds; overheads vs "
        f"{sec['reference']}",
        "",
    ]
    head = (f"{'sampler':<22}{'alone ms':>11}{'[IQR]':>9}{'ms/step':>9}{'overhead':>11}"
            f" |{'+UNet ms':>11}{'[IQR]':>9}{'overhead':>10}{'% of total':>11}  path")
    lines += [head, "-" * len(head)]
    for v in sec["variants"]:
        a, u = v["sampler_only"], v["with_unet"]
        lines.append(
            f"{v['name']:<22}{a['median_ms']:>11.2f}{a['iqr_ms']:>9.2f}{a['per_step_ms']:>9.3f}"
            f"{a['overhead_ms']:>+9.1f}ms |{u['median_ms']:>11.1f}{u['iqr_ms']:>9.1f}"
            f"{u['overhead_pct']:>+9.1f}%{v['sampler_overhead_pct_of_total']:>+10.1f}%  "
            f"{v['path'] or '-'}" + ("" if v["output_finite"] else "  NON-FINITE OUTPUT"))
    lines += ["", "% of total: the sampler-only overhead over the isotropic sampler as a share of the "
              "isotropic run with the UNet"]
    if not sec["reliable"]:
        lines.append("WARNING: other processes kept the CPUs busy in most rounds: all rounds kept, "
                     "the overheads are unreliable")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# picture
# ---------------------------------------------------------------------------------------------
def plot_models(report: dict, path):
    """One panel per suite present: the train step's median time per variant (whiskers IQR,
    labels: % over the isotropic step, the dashed line at +2 %), and each sampler's time alone and
    with the UNet (log scale). Needs matplotlib."""
    import pathlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    secs = [k for k in ("train_step", "sampling") if k in report]
    fig, axes = plt.subplots(1, len(secs), figsize=(7.5 * len(secs), 5.2), squeeze=False)
    for ax, key in zip(axes[0], secs):
        sec = report[key]
        vs = sec["variants"]
        if key == "train_step":
            names = [v["name"] for v in vs]
            med = [v["median_ms"] for v in vs]
            err = [[v["median_ms"] - v["q1_ms"] for v in vs], [v["q3_ms"] - v["median_ms"] for v in vs]]
            colors = ["#7f7f7f" if n == ISO else "#d62728" if v["anisodiff"] else "#1f77b4"
                      for n, v in zip(names, vs)]
            ax.barh(range(len(vs)), med, xerr=err, color=colors, error_kw={"elinewidth": 0.8})
            ref = next(v["median_ms"] for v in vs if v["name"] == ISO)
            ax.axvline(ref * (1 + TRAIN_GOAL_PCT / 100), color="black", linestyle="--", linewidth=0.8,
                       label=f"isotropic + {TRAIN_GOAL_PCT:g} %")
            for i, v in enumerate(vs):
                ax.text(v["q3_ms"], i, f"  {v['paired_overhead_pct']:+.1f} %", va="center", fontsize=8)
            ax.set_yticks(range(len(vs)))
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, max(v["q3_ms"] for v in vs) * 1.25)
            ax.set_xlabel("median ms per training step (whiskers: IQR)", fontsize=8)
            mo, st = sec["model"], sec["settings"]
            B, C, H, W = sec["input"]["shape"]
            ax.set_title(f"train step: {mo['name']} UNet ({mo['parameters'] / 1e6:.1f} M), B={B}, "
                         f"{C}x{H}x{W}, amp {st['amp']}\nlabel: paired overhead vs isotropic",
                         fontsize=9, loc="left")
            ax.legend(fontsize=8, loc="lower right")
        else:
            names = [v["name"] for v in vs]
            x = range(len(vs))
            alone = [v["sampler_only"]["median_ms"] for v in vs]
            tot = [v["with_unet"]["median_ms"] for v in vs]
            ax.bar([i - 0.2 for i in x], alone, 0.4, color="#ff7f0e", label="sampler alone (stand-in model)")
            ax.bar([i + 0.2 for i in x], tot, 0.4, color="#1f77b4", label="with the UNet")
            for i, v in enumerate(vs):
                ax.text(i - 0.2, alone[i], f"{alone[i]:.0f}", ha="center", va="bottom", fontsize=7)
                ax.text(i + 0.2, tot[i], f"{v['with_unet']['overhead_pct']:+.1f}%", ha="center",
                        va="bottom", fontsize=7)
            ax.set_yscale("log")
            ax.set_ylim(min(alone + tot) / 2, max(alone + tot) * 8)
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, fontsize=8, rotation=12)
            ax.set_ylabel("median ms per sampling run", fontsize=8)
            B, C, H, W = sec["shape"]
            ax.set_title(f"sampling: {sec['settings']['steps']} DDPM steps, B={B}, {C}x{H}x{W}, SDM "
                         f"s={sec['spec']['strength']}\nlabels: ms alone; % over the isotropic run "
                         "with the UNet", fontsize=9, loc="left")
            ax.legend(fontsize=8, loc="upper left")
    m = report["machine"]
    gpu = f", GPU {m['gpu']['name']}" if "gpu" in m else ""
    fig.suptitle(f"anisodiff {m['anisodiff_version']} bench ({report['device']}{gpu}): {m['cpu_model']}, "
                 f"torch {m['torch_version']}, {report['timestamp'][:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
