"""What the op benchmark times: the ops, the spec kinds, the dtypes, the inputs of one case
(:func:`make_case`), the matrix of cases of a run (:func:`case_matrix`) and the fused backends of a
device (:func:`fused_backends`, :func:`op_backends`)."""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import replace

import torch

from .._ext import available_backends, build_info
from ..spec import NoiseSpec, OffsetNoise, PyramidNoise
from . import baselines as bl
from .errors import BenchError

__all__ = ["OPS", "TRAFFIC_TENSORS", "STEP_T", "STEP_PREV", "STEP_BACKENDS", "KINDS", "KIND_TITLES",
           "SPECTRAL_KINDS", "SQUEEZE_ONLY_KINDS", "TRAINER_KINDS", "TRAINER_BASELINE", "TRAINER_OPS",
           "DTYPES", "make_case", "case_matrix", "trainer_spec", "trainer_kind_pending",
           "fused_backends", "op_backends"]


OPS = ("add_noise", "shaped_noise", "ddpm_step")

# bytes moved by the op at least, in tensors of the noise's shape: add_noise reads x0 and writes x_t
# and the target; shaped_noise writes the noise; ddpm_step reads x_t and the model output and writes
# x_prev and x0_hat
TRAFFIC_TENSORS = {"add_noise": 3, "shaped_noise": 1, "ddpm_step": 4}

# ddpm_step: one ancestral step (mode="official") at this fixed timestep, to STEP_PREV, with a random
# model output and x_t = sqrt(abar) x0 + sqrt(1 - abar) e (baselines.step_inputs)
STEP_T, STEP_PREV = 500, 499

# the fused backends that have the DDPM-step op (AnisotropicNoise.ddpm_step(backend=...));
# "reference" is anisodiff's vectorised float64 step (the tests stand it in for a second backend)
STEP_BACKENDS = ("cpu", "cuda", "triton", "reference")
# the trainers' noise flags (add_noise only): each against the eager code of today's training
# scripts (TRAINER_BASELINE, anisodiff.bench.baselines); perturb and flow time features of
# add_noise that a build may not have yet (trainer_kind_pending)
TRAINER_KINDS = ("offset", "offset_random", "pyramid", "perturb", "flow")
TRAINER_BASELINE = {"offset": "kohya_offset", "offset_random": "kohya_offset_random",
                    "pyramid": "kohya_pyramid", "perturb": "ddpm_input_perturbation",
                    "flow": "flow_matching"}
TRAINER_OPS = ("add_noise",)
KINDS = ("iso", "sdm", "hdm", "powerlaw", "band", "sdm_powerlaw", *TRAINER_KINDS)
KIND_TITLES = {
    "iso": "isotropic (white)",
    "sdm": "SDM squeeze s=-0.4",
    "hdm": "HDM (Heisenberg) s=-0.4",
    "powerlaw": "power law alpha=-0.04",
    "band": "band [0, 0.25] cycles/px",
    "sdm_powerlaw": "SDM s=-0.4 + power law alpha=-0.04",
    "offset": f"offset noise {bl.NOISE_OFFSET} (--noise_offset)",
    "offset_random": f"offset noise {bl.NOISE_OFFSET}, random strength",
    "pyramid": f"pyramid noise {bl.PYRAMID_ITERATIONS} levels, discount {bl.PYRAMID_DISCOUNT}",
    "perturb": f"input perturbation gamma={bl.INPUT_PERTURBATION}",
    "flow": "flow matching (1 - sigma) x0 + sigma n",
}
SPECTRAL_KINDS = ("powerlaw", "band", "sdm_powerlaw")
SQUEEZE_ONLY_KINDS = ("sdm", "hdm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def trainer_spec(kind: str) -> NoiseSpec:
    """The anisodiff spec of a trainer kind: the offset as a DC weight, pyramid noise as its
    spectral part (same expected power spectrum), white noise for perturb and flow (their flag is
    an argument of add_noise / the schedule)."""
    if kind == "offset":
        return NoiseSpec(offset=OffsetNoise(bl.NOISE_OFFSET))
    if kind == "offset_random":
        return NoiseSpec(offset=OffsetNoise(bl.NOISE_OFFSET, random_strength=True))
    if kind == "pyramid":
        return NoiseSpec(spectral=PyramidNoise(bl.PYRAMID_ITERATIONS, bl.PYRAMID_DISCOUNT))
    if kind in ("perturb", "flow"):
        return NoiseSpec()
    raise ValueError(f"kind: not a trainer kind {TRAINER_KINDS}: {kind!r}")


def trainer_kind_pending(kind: str) -> str | None:
    """Why a trainer kind cannot be timed with this anisodiff / environment, or None."""
    if kind == "perturb":
        from .. import ops

        if "input_perturbation" not in inspect.signature(ops.add_noise).parameters:
            return "add_noise(..., input_perturbation=gamma) is not in this anisodiff yet"
    if kind == "flow":
        if importlib.util.find_spec("anisodiff.flow") is None:
            return "flow matching (anisodiff.flow) is not in this anisodiff yet"
        if importlib.util.find_spec("diffusers") is None:
            return "needs diffusers (FlowMatchEulerDiscreteScheduler)"
    return None


def make_case(kind: str, B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float32,
              device: str = "cpu", step: bool = False) -> bl.Case:
    """The inputs of one case (:func:`anisodiff.baselines.make_case`, seed 0) for ``kind``
    in :data:`KINDS`: ``iso`` is the sdm case without its squeeze (``NoiseSpec()``), ``powerlaw``
    the sdm_powerlaw case without its squeeze. ``step``: also the DDPM step's inputs at
    :data:`STEP_T` (``case.model_output``, ``case.sample``; :func:`~anisodiff.baselines.step_inputs`)."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    base = {"iso": "sdm", "powerlaw": "sdm_powerlaw"}.get(kind, "sdm" if kind in TRAINER_KINDS else kind)
    case = bl.make_case(base, B, C, H, W, seed=0, dtype=dtype)
    if kind in TRAINER_KINDS:  # the sdm case's data and timesteps, the trainer flag's spec
        case = replace(case, axes=None, strength=0.0, spec=trainer_spec(kind))
    elif kind == "iso":
        case = replace(case, axes=None, strength=0.0, spec=NoiseSpec())
    elif kind == "powerlaw":
        case = replace(case, axes=None, strength=0.0, spec=NoiseSpec(spectral=case.spec.spectral))
    case = replace(case, kind=kind, title=KIND_TITLES[kind])
    if device != "cpu":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        case = replace(case, x0=move(case.x0), timesteps=move(case.timesteps),
                       alphas_cumprod=move(case.alphas_cumprod), betas=move(case.betas),
                       axes=move(case.axes), weights=move(case.weights))
    if step:
        case.model_output, case.sample = bl.step_inputs(case.x0, case.alphas_cumprod.cpu(), STEP_T)
    return case


def case_matrix(s: dict) -> list[tuple]:
    """The cases of a run with settings ``s``, in the order they run: ``(op, kind, B, (C, H, W),
    dtype name)``. ``anisodiff bench`` and the pytest-benchmark suite (benchmarks/) share it. The
    trainer kinds run for :data:`TRAINER_OPS` only, and not while :func:`trainer_kind_pending`."""
    return [(op, kind, B, tuple(shape), dt) for op in s["ops"] for shape in s["shapes"]
            for dt in s["dtypes"] for kind in s["kinds"] for B in s["batch"]
            if kind not in TRAINER_KINDS or (op in TRAINER_OPS and trainer_kind_pending(kind) is None)]


def fused_backends(device: str) -> tuple[list[str], dict]:
    """The fused backends the benchmark times on ``device``: ``available_backends(device)`` minus
    ``"reference"``, fastest first (the first is the primary), and ``{backend: why}`` for those
    skipped (Triton under ``TRITON_INTERPRET=1`` on the CPU: an interpreter, not a kernel).
    Raises :class:`BenchError` when nothing is left to time."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device cuda: no CUDA device (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'})")
    avail = available_backends(device)
    skipped = {}
    if device == "cpu" and "triton" in avail:
        skipped["triton"] = ("Triton on the CPU runs under TRITON_INTERPRET=1 (the interpreter, "
                             "for tests): not a kernel worth timing; skipped")
    fused = [b for b in avail if b != "reference" and b not in skipped]
    if not fused:
        if device == "cuda":
            raise BenchError("--device cuda: this anisodiff build has no fused CUDA backend "
                             f"(available: {', '.join(avail)}); nothing to time")
        raise BenchError("anisodiff's compiled CPU ops are not built: nothing to benchmark "
                         f"({build_info().get('error')})")
    return fused, skipped


def op_backends(op: str, backends) -> tuple[list[str], dict]:
    """The fused backends of ``backends`` (:func:`fused_backends`) that time ``op``, in order, and
    ``{backend: why}`` for those without the op: ``ddpm_step`` runs on :data:`STEP_BACKENDS`
    (interpreted Triton on the CPU is already left out by :func:`fused_backends`)."""
    if op != "ddpm_step":
        return list(backends), {}
    step = STEP_BACKENDS
    keep = [b for b in backends if b in step]
    why = {b: f"{b} has no ddpm_step op (AnisotropicNoise.ddpm_step runs on "
              f"{', '.join(x for x in step if x != 'reference')}): ddpm_step not timed there"
           for b in backends if b not in step}
    return keep, why
