"""The options of ``anisodiff bench`` (and ``benchmarks/run_cpu.py``): the presets of every suite
(full, ``--quick``, ``--smoke``; the CUDA presets on ``--device cuda``), the argparse options
(:func:`add_arguments`) and the settings of a run (:func:`resolve_settings`: the preset overridden
by the options)."""
from __future__ import annotations

import argparse
import pathlib

from .._argtypes import int_in, nonneg_float
from .cases import (DTYPES, KINDS, OPS, TRAINER_KINDS, TRAINER_OPS, case_matrix,
                    trainer_kind_pending)
from .errors import BenchError
from .impls import CPU_COMPILED
from .models import AMP, UNETS

__all__ = ["SUITES", "PRESETS", "GPU_SHAPES", "CUDA_PRESETS", "MODEL_PRESETS",
           "DEFAULT_MAX_OTHER_LOAD", "add_arguments", "add_model_arguments", "resolve_settings",
           "resolve_model_settings", "suites"]


SUITES = ("ops", "train", "sampling")

# Presets. "full" is the matrix of the benchmark issue; "quick" the headline size for every kind,
# op and dtype; "smoke" a tiny case of each for the test suite (it checks the plumbing, not speed).
# On --device cuda, CUDA_PRESETS replace them: the full matrix of issue 7 item 2 and a quick run
# sized for a target of about two minutes on an H100.
PRESETS = {
    "full": {"batch": [1, 16, 128, 512], "shapes": [(3, 32, 32), (3, 64, 64), (4, 64, 64)],
             "dtypes": ["fp32", "bf16"], "repeats": 15, "min_repeats": 3, "block_ms": 5.0,
             "warmup": 0.01, "group_s": 0.25, "max_group_s": 3.0, "max_rounds_factor": 2,
             "compile": True, "copy_mib": 256, "copy_repeats": 7},
    "quick": {"batch": [64], "shapes": [(3, 32, 32)], "dtypes": ["fp32", "bf16"], "repeats": 11,
              "min_repeats": 5, "block_ms": 5.0, "warmup": 0.02, "group_s": 0.4,
              "max_group_s": 2.0, "max_rounds_factor": 3, "compile": False, "copy_mib": 128,
              "copy_repeats": 7},
    "smoke": {"batch": [2], "shapes": [(3, 16, 16)], "dtypes": ["fp32", "bf16"], "repeats": 3,
              "min_repeats": 3, "block_ms": 0.5, "warmup": 0.0, "group_s": 0.01,
              "max_group_s": 0.3, "max_rounds_factor": 2, "compile": False, "copy_mib": 16,
              "copy_repeats": 3},
}
GPU_SHAPES = [(3, 32, 32), (3, 64, 64), (4, 64, 64), (4, 128, 128), (3, 256, 256)]
CUDA_PRESETS = {
    # 3 ops x 6 kinds x 4 B x 5 shapes x 2 dtypes = 720 cases; torch.compile (default options only:
    # fallback_random is a CPU matter) at fp32 and the first shape
    "full": {"batch": [1, 16, 128, 512], "shapes": GPU_SHAPES, "dtypes": ["fp32", "bf16"],
             "repeats": 11, "min_repeats": 3, "block_ms": 2.0, "warmup": 0.005, "group_s": 0.1,
             "max_group_s": 1.0, "max_rounds_factor": 2, "compile": True,
             "compile_impls": ["compiled_eager", "compiled_eager_max_autotune"], "copy_mib": 1024,
             "copy_repeats": 7},
    # 3 ops x 6 kinds x B 128 x {3x32x32, 4x64x64, 3x256x256} x 2 dtypes = 108 cases, torch.compile
    # once per kind (B = 128, fp32, 3x32x32)
    "quick": {"batch": [128], "shapes": [(3, 32, 32), (4, 64, 64), (3, 256, 256)],
              "dtypes": ["fp32", "bf16"], "repeats": 9, "min_repeats": 3, "block_ms": 2.0,
              "warmup": 0.005, "group_s": 0.1, "max_group_s": 0.6, "max_rounds_factor": 2,
              "compile": True, "compile_impls": ["compiled_eager"], "copy_mib": 1024,
              "copy_repeats": 7},
    "smoke": {**PRESETS["smoke"], "copy_mib": 64},
}

# the CPU-load filter: rounds during which other processes used more CPUs than this are dropped
# (a GPU run is launch-bound at worst, and GPU hosts run their own daemons: a looser default)
DEFAULT_MAX_OTHER_LOAD = {"cpu": 0.2, "cuda": 4.0}


# the train and sampling suites, per device and mode
MODEL_PRESETS = {
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


def _shape(text: str) -> tuple[int, int, int]:
    """argparse type: ``CxHxW`` (e.g. 3x32x32)."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or not all(1 <= d <= 4096 for d in dims) or dims[0] > 64:
        raise argparse.ArgumentTypeError(f"expected CxHxW (C <= 64, H, W <= 4096), got {text!r}")
    return dims


_POSITIVE_INT = int_in(1)


def add_arguments(p: argparse.ArgumentParser, *, json_help: str, plot_help: str) -> None:
    """The options of ``anisodiff bench`` (and ``benchmarks/run_cpu.py``). Matrix options left at
    None take the preset's value (:func:`resolve_settings`)."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default: %(default)s); cuda needs a CUDA device and a fused "
                        "CUDA backend, timed with CUDA events")
    p.add_argument("--suite", nargs="+", choices=SUITES + ("all",), default=None,
                   help="what to time (default: ops): ops = the fused ops against the baselines; "
                        "train = one optimizer step of the SDM paper's UNet with each noise "
                        "implementation; sampling = 50 DDPM steps with each sampler (train and "
                        "sampling need diffusers); all = the three, into one JSON")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="ops: B=64 at 3x32x32 for every kind, op and dtype, no torch.compile, "
                           "well under a minute on 2 cores (cuda: B=128 at 3x32x32, 4x64x64, "
                           "3x256x256 with torch.compile, about two minutes on an H100); train / "
                           "sampling: fewer rounds (cpu: the tiny UNet, small batches)")
    mode.add_argument("--smoke", action="store_true",
                      help="a tiny case of everything in a few seconds: checks that everything "
                           "runs (the test suite); its times mean little")
    p.add_argument("--json", type=pathlib.Path, default=None, metavar="OUT.json", help=json_help)
    p.add_argument("--plot", type=pathlib.Path, default=None, metavar="OUT.png", help=plot_help)
    p.add_argument("--no-plot", action="store_true", help="write no picture")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None,
                   help="ops (default: all: add_noise shaped_noise ddpm_step)")
    p.add_argument("--kinds", nargs="+", choices=KINDS + ("sdm+powerlaw",), default=None,
                   help="spec kinds (default: all)")
    p.add_argument("--batch", type=_POSITIVE_INT, nargs="+", default=None, metavar="B",
                   help="batch sizes (full: 1 16 128 512; quick: 64, cuda 128)")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="CxHxW",
                   help="per-sample shapes (full: 3x32x32 3x64x64 4x64x64, cuda also 4x128x128 "
                        "3x256x256; quick: 3x32x32, cuda 3x32x32 4x64x64 3x256x256)")
    p.add_argument("--size", type=_POSITIVE_INT, default=None, metavar="N",
                   help="shorthand for --shapes 3xNxN")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None,
                   help="dtypes of x0 and the noise (default: fp32 bf16)")
    p.add_argument("--threads", type=_POSITIVE_INT, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=_POSITIVE_INT, default=None,
                   help="timing rounds per case at most (full 15, quick 11)")
    p.add_argument("--min-repeats", type=_POSITIVE_INT, default=None,
                   help="timing rounds per case at least, however slow the case (full 3, quick 5)")
    p.add_argument("--block-ms", type=nonneg_float, default=None,
                   help="target duration of one timing block in ms (full and quick 5)")
    p.add_argument("--warmup", type=nonneg_float, default=None, metavar="SECONDS",
                   help="warm-up per implementation after its first call, at least one more call "
                        "(full 0.01, quick 0.02)")
    p.add_argument("--group-s", type=nonneg_float, default=None, metavar="SECONDS",
                   help="time for the rounds of one case: fewer rounds (down to --min-repeats) for "
                        "slow cases (full 0.25, quick 0.4)")
    p.add_argument("--max-group-s", type=nonneg_float, default=None, metavar="SECONDS",
                   help="stop collecting replacement rounds for one case after this long (full 3, "
                        "quick 2)")
    p.add_argument("--max-rounds-factor", type=_POSITIVE_INT, default=None,
                   help="run at most this many x the planned rounds to collect clean ones "
                        "(full 2, quick 3)")
    p.add_argument("--max-other-load", type=nonneg_float, default=None, metavar="CPUS",
                   help="drop rounds during which other processes used more than this many CPUs "
                        "(default: 0.2 on cpu, 4 on cuda)")
    p.add_argument("--wait-idle", type=nonneg_float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to SECONDS for other load to drop below 0.2 CPUs")
    p.add_argument("--given-noise", action="store_true",
                   help="add_noise only: pass the same pre-drawn white noise to every "
                        "implementation (noise=eps), timing the shaping + mix without the RNG")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="skip the torch.compile baselines (full run: add_noise and ddpm_step, "
                        "fp32, first shape)")
    p.add_argument("--copy-mib", type=_POSITIVE_INT, default=None, metavar="MIB",
                   help="buffer size of the copy-bandwidth measurement (full 256, quick 128)")
    p.add_argument("--details", action="store_true",
                   help="also print every implementation's row (median, IQR, GB/s, faults)")
    add_model_arguments(p)


def suites(args) -> list[str]:
    chosen = getattr(args, "suite", None) or ["ops"]
    return list(SUITES) if "all" in chosen else [x for x in SUITES if x in chosen]


def resolve_settings(args) -> dict:
    """The settings of a run: the preset (full, quick or smoke; :data:`CUDA_PRESETS` on cuda)
    overridden by the options. The train / sampling suites' settings are under ``"train"`` and
    ``"sampling"`` (:func:`anisodiff.resolve_settings`)."""
    mode = "smoke" if getattr(args, "smoke", False) else "quick" if args.quick else "full"
    s = {"compile_impls": list(CPU_COMPILED),
         **(CUDA_PRESETS if args.device == "cuda" else PRESETS)[mode]}
    s["mode"] = mode
    for key in ("batch", "dtypes", "repeats", "min_repeats", "block_ms", "warmup", "group_s",
                "max_group_s", "max_rounds_factor", "copy_mib"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.shapes is not None and args.size is not None:
        raise BenchError("--shapes and --size: give one of them")
    if args.shapes is not None:
        s["shapes"] = [tuple(x) for x in args.shapes]
    elif args.size is not None:
        s["shapes"] = [(3, args.size, args.size)]
    if args.compile is not None:
        s["compile"] = args.compile
    s["kinds"] = [("sdm_powerlaw" if k == "sdm+powerlaw" else k) for k in (args.kinds or KINDS)]
    s["kinds"] = list(dict.fromkeys(s["kinds"]))
    s["ops"] = list(dict.fromkeys(args.ops or (("add_noise",) if args.given_noise else OPS)))
    if args.given_noise and set(s["ops"]) - {"add_noise"}:
        raise BenchError("--given-noise applies to add_noise only (shaped_noise and ddpm_step draw "
                         "the noise)")
    s["min_repeats"] = min(s["min_repeats"], s["repeats"])
    for key in ("device", "given_noise", "wait_idle"):
        s[key] = getattr(args, key)
    s["max_other_load"] = (args.max_other_load if args.max_other_load is not None
                           else DEFAULT_MAX_OTHER_LOAD[args.device])
    s["threads"] = args.threads
    s["suites"] = suites(args)
    if "ops" in s["suites"] and not case_matrix(s):
        why = [f"{k}: {trainer_kind_pending(k)}" for k in s["kinds"]
               if k in TRAINER_KINDS and trainer_kind_pending(k)]
        raise BenchError("--kinds/--ops: nothing to time (the trainer kinds "
                         f"{', '.join(TRAINER_KINDS)} run for {', '.join(TRAINER_OPS)} only"
                         + (f"; {'; '.join(why)}" if why else "") + ")")
    if "train" in s["suites"] or "sampling" in s["suites"]:
        s.update(resolve_model_settings(args, mode, s["suites"]))
    return s


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the train and sampling suites (``anisodiff bench``)."""
    g = p.add_argument_group("train and sampling suites (--suite train / sampling; need diffusers)")
    pos = int_in(1)
    g.add_argument("--unet", choices=tuple(UNETS), default=None,
                   help="the model: sdm_paper (docs/papers.md section 1.5, 32x32; default on cuda) "
                        "or tiny (16x16; default on cpu)")
    g.add_argument("--amp", choices=tuple(AMP), default=None,
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


def resolve_model_settings(args, mode: str, suites) -> dict:
    """``{"train": {...}, "sampling": {...}}``: the device's preset for ``mode`` overridden by the
    options (only the suites in ``suites``)."""
    preset = MODEL_PRESETS["cuda" if args.device == "cuda" else "cpu"][mode]
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
    return DEFAULT_MAX_OTHER_LOAD[args.device]
