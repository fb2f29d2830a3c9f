"""The implementations timed in each case: the fused op on every backend, the baselines of
:mod:`anisodiff.bench.baselines`, the torch.compile baselines and the two white floors, as
zero-argument callables (:func:`make_callable`), and which of them a case times (:func:`impls_for`,
:func:`case_impls`)."""
from __future__ import annotations

import warnings

import torch

from ..ops import add_noise, shaped_noise
from ..sampling import AnisotropicNoise
from ..spec import NoiseSpec
from . import baselines as bl
from .cases import (OPS, SPECTRAL_KINDS, SQUEEZE_ONLY_KINDS, STEP_PREV, STEP_T, TRAINER_BASELINE,
                    TRAINER_KINDS, op_backends)

__all__ = ["COMPILED_OPS", "FLOOR", "WHITE", "COMPILED", "CPU_COMPILED", "BASELINE_ORDER",
           "IMPL_ORDER", "IMPLS", "impls_for", "same_operator", "is_fused", "make_callable",
           "compiled_key", "compiled_fns", "case_impls", "trainer_sigmas"]


# ops with torch.compile baselines (compiled per op: add_noise's keys are the impl names,
# the others' "<op>:<impl>")
COMPILED_OPS = ("add_noise", "ddpm_step")
FLOOR = "isotropic_floor"
WHITE = "anisodiff_white"
COMPILED = ("compiled_eager", "compiled_eager_fallback_random", "compiled_eager_max_autotune")
CPU_COMPILED = COMPILED[:2]  # max-autotune is the GPU goal's baseline; on a CPU it only adds minutes

# every implementation's column in the table and slot in the plot, in this order (after the fused op)
BASELINE_ORDER = ("eager_vectorised", "eager_rfft", *COMPILED, "official_sdm", "sagd_appendix",
                  *TRAINER_BASELINE.values())
IMPL_ORDER = ("fused", "fused_alt", *BASELINE_ORDER, FLOOR, WHITE)
IMPLS = {
    "fused": "anisodiff.add_noise / shaped_noise / AnisotropicNoise.ddpm_step (mode='official') on "
             "each fused backend of the device that has the op (the JSON names them "
             "anisodiff_<backend>; the first one is the primary), canonical Philox stream, seed "
             "drawn from torch's generator",
    "eager_vectorised": "randn_like + fft2/ifft2 (calibrated w) + einsum S(t) (+ mix for add_noise; "
                        "+ x0_hat, clip in S^-1 coordinates and the DDPM update for ddpm_step)",
    "eager_rfft": "eager_vectorised with rfft2/irfft2 instead of fft2/ifft2 (spectral kinds)",
    "compiled_eager": "torch.compile(eager_vectorised), default inductor options (add_noise, "
                      "ddpm_step)",
    "compiled_eager_fallback_random": "torch.compile(eager_vectorised), inductor "
                                      "fallback_random=True (aten randn) (add_noise, ddpm_step)",
    "compiled_eager_max_autotune": "torch.compile(eager_vectorised, mode='max-autotune') (the "
                                   "baseline of issue 3's GPU goal; full CUDA runs only: its "
                                   "autotuning takes minutes)",
    "official_sdm": "official SDM code: per-sample .item() loop building S, bmm, diffusers add_noise "
                    "(add_noise, squeeze-only kinds); ddpm_step: the official sampler step "
                    "(the loop, linalg.inv, 4 bmm around diffusers DDPMScheduler.step; needs "
                    "diffusers)",
    "sagd_appendix": "SAGD App. E: randn, fftn/ifftn, per-plane std normalisation, diffusers "
                     "add_noise (add_noise, spectral kinds; only the spatial half of sdm_powerlaw)",
    FLOOR: "no anisotropy: torch.randn_like + diffusers add_noise (add_noise), torch.randn "
           "(shaped_noise), diffusers-style DDPMScheduler.step with torch.randn_like (ddpm_step)",
    WHITE: "anisodiff with NoiseSpec(): the fused op's own white-noise floor",
    "kohya_offset": "kohya sd-scripts / diffusers --noise_offset: randn_like + s * randn(B, C, 1, 1), "
                    "diffusers add_noise (trainer kind offset)",
    "kohya_offset_random": "kohya --noise_offset_random_strength: the same with s * torch.rand(1) "
                           "per step (trainer kind offset_random; fused: spec.draw_offset())",
    "kohya_pyramid": "kohya --multires_noise_iterations: randn_like, pyramid_noise_like (Python "
                     "random r per level, CPU randn, nn.Upsample bilinear, global std), diffusers "
                     "add_noise (trainer kind pyramid; fused: PyramidNoise, the same expected "
                     "power spectrum)",
    "ddpm_input_perturbation": "diffusers train_text_to_image --input_perturbation: noise + gamma * "
                               "randn_like(noise) into add_noise, target noise (trainer kind perturb; "
                               "fused: add_noise(..., input_perturbation=gamma))",
    "flow_matching": "diffusers SD3/Flux training step: randn_like, (1 - sigma) x0 + sigma n, "
                     "target n - x0 (trainer kind flow; fused: add_noise(x0, sigmas, spec, "
                     "FlowMatchEulerDiscreteScheduler(), target='flow'))",
}


def impls_for(op: str, kind: str, compiled: tuple = (), extra_backends: tuple = ()) -> list[str]:
    """The implementations timed for one case: ``"fused"`` (the primary fused backend) first, then
    ``"fused:<backend>"`` for every other fused backend, then the baselines."""
    out = ["fused", *(f"fused:{b}" for b in extra_backends)]
    if kind in TRAINER_KINDS:  # a trainer flag: against today's training-script code
        return out + [TRAINER_BASELINE[kind], FLOOR, WHITE]
    if not (op == "shaped_noise" and kind == "iso"):  # there it is torch.randn, the floor itself
        out.append("eager_vectorised")
    if kind in SPECTRAL_KINDS:
        out.append("eager_rfft")
    if op == "add_noise":
        out += list(compiled)
        if kind in SQUEEZE_ONLY_KINDS:
            out.append("official_sdm")
        if kind in SPECTRAL_KINDS:
            out.append("sagd_appendix")
    if op == "ddpm_step":
        out += list(compiled)
        if kind in SQUEEZE_ONLY_KINDS and _have_diffusers():  # the sampler step calls diffusers
            out.append("official_sdm")
    out.append(FLOOR)
    if kind != "iso":  # for iso the fused op IS its white floor
        out.append(WHITE)
    return out


def _have_diffusers() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def same_operator(impl: str, kind: str) -> bool:
    """Whether ``impl`` computes the same noise operator as the fused op for ``kind`` (the
    candidates for "the fastest baseline"): not the white floors (except for ``iso``), not
    sagd_appendix on sdm_powerlaw (only the spatial half there)."""
    if is_fused(impl) or impl == WHITE:
        return False
    if impl == FLOOR:
        return kind == "iso"
    if kind in TRAINER_KINDS:
        return impl == TRAINER_BASELINE[kind]
    if impl == "sagd_appendix":
        return kind != "sdm_powerlaw"
    return True


def is_fused(impl: str) -> bool:
    """``impl`` is a fused backend (``"fused"``, ``"fused:<backend>"``)."""
    return impl == "fused" or impl.startswith("fused:")


def _note(op: str, kind: str, impl: str) -> str:
    if kind == "pyramid" and impl == "kohya_pyramid":
        return ("the fused op is PyramidNoise, the stationary Gaussian noise with the recipe's "
                "expected power spectrum, not the recipe itself")
    if kind == "offset_random" and impl == "fused":
        return "fused: spec.draw_offset() per call (a new DC weight: the lowering runs every call)"
    if impl == "sagd_appendix" and kind == "sdm_powerlaw":
        return "spatial part only (no published code does both): a lower bound"
    if impl == "sagd_appendix":
        return "per-plane std normalisation (SAGD appendix), fused uses calibrated weights"
    return ""


def make_callable(op: str, impl: str, case: bl.Case, dtype: torch.dtype, device: str, backend: str,
                  compiled: dict, noise=None, upcast: bool = False):
    """A zero-argument callable timing ``impl`` (a name of :func:`impls_for`) on ``case``; the
    fused op runs on ``backend`` (``"fused:<b>"`` on ``b``). ``upcast``: run the baseline in float32
    and cast its outputs to ``dtype`` (for dtypes torch's ops lack, e.g. bfloat16 FFTs on the CPU)."""
    x0, t, spec, sched = case.x0, case.timesteps, case.spec, case.schedule
    nkw = {} if noise is None else {"noise": noise}
    if impl.startswith("fused:"):
        impl, backend = "fused", impl.split(":", 1)[1]
    if op == "add_noise" and case.kind in TRAINER_KINDS:
        return _trainer_callable(impl, case, dtype, backend, nkw, upcast)
    if op == "add_noise":
        if impl == "fused":
            return lambda: add_noise(x0, t, spec, sched, backend=backend, **nkw)
        if impl == WHITE:
            white = NoiseSpec()
            return lambda: add_noise(x0, t, white, sched, backend=backend, **nkw)
        kw = {**case.baseline_kwargs(), **nkw}
        if impl == "eager_rfft":
            fn, kw = bl.eager_vectorised, {**kw, "rfft": True}
        elif impl in compiled:
            fn = compiled[impl]
        else:
            fn = bl.BASELINES[impl]
        args = case.baseline_args(impl)
        if not upcast:
            return lambda: fn(*args, **kw)
        rest = args[1:]
        kw32 = {**kw, "noise": kw["noise"].float()} if "noise" in kw else kw

        def run_upcast():
            x_t, n = fn(x0.float(), *rest, **kw32)
            return x_t.to(dtype), n.to(dtype)
        return run_upcast
    if op == "ddpm_step":
        return _step_callable(impl, case, dtype, backend, compiled, upcast)
    # shaped_noise
    shape = tuple(x0.shape)
    if impl == "fused":
        return lambda: shaped_noise(shape, spec, timesteps=t, schedule=sched, dtype=dtype,
                                    device=device, backend=backend)
    if impl == WHITE:
        white = NoiseSpec()
        return lambda: shaped_noise(shape, white, dtype=dtype, device=device, backend=backend)
    if impl == FLOOR:
        if upcast:
            return lambda: torch.randn(shape, device=device).to(dtype)
        return lambda: torch.randn(shape, dtype=dtype, device=device)
    rfft = impl == "eager_rfft"
    a = (shape, t, case.betas, case.axes, case.strength, case.weights)
    kw = {"variant": case.variant, "device": device, "rfft": rfft}
    if upcast:
        return lambda: bl.eager_shaped_noise(*a, **kw, dtype=torch.float32).to(dtype)
    return lambda: bl.eager_shaped_noise(*a, **kw, dtype=dtype)


def trainer_sigmas(case: bl.Case) -> torch.Tensor:
    """The flow kind's per-sample sigmas, from the case's timesteps: ``(t + 1) / T`` in (0, 1]."""
    T = case.schedule.num_train_timesteps
    return ((case.timesteps.double() + 1) / T).to(torch.float32)


def _trainer_callable(impl: str, case: bl.Case, dtype: torch.dtype, backend: str, nkw: dict,
                      upcast: bool):
    """:func:`make_callable` for add_noise on a trainer kind (:data:`TRAINER_KINDS`): the fused op
    with the flag (an offset / pyramid spec, ``input_perturbation=``, a flow schedule), the
    training scripts' eager code, the white floors."""
    x0, t, spec, sched, kind = case.x0, case.timesteps, case.spec, case.schedule, case.kind
    fused_kw = {"backend": backend, **nkw}
    if kind == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched, t = FlowMatchEulerDiscreteScheduler(), trainer_sigmas(case).to(x0.device)
        fused_kw["target"] = "flow"
    if impl == "fused":
        if kind == "offset_random":
            return lambda: add_noise(x0, t, spec.draw_offset(), sched, **fused_kw)
        if kind == "perturb":
            return lambda: add_noise(x0, t, spec, sched, input_perturbation=bl.INPUT_PERTURBATION,
                                     **fused_kw)
        return lambda: add_noise(x0, t, spec, sched, **fused_kw)
    if impl == WHITE:
        white = NoiseSpec()
        return lambda: add_noise(x0, t, white, sched, **fused_kw)
    if impl == "flow_matching":
        fn, args = bl.flow_matching, (t,)
    else:
        fn = bl.BASELINES[FLOOR] if impl == FLOOR else bl.TRAINER_BASELINES[impl]
        args = case.baseline_args(impl)[1:]
    if not upcast:
        return lambda: fn(x0, *args, **nkw)
    nkw32 = {"noise": nkw["noise"].float()} if nkw else {}

    def run_upcast():
        x_t, n = fn(x0.float(), *args, **nkw32)
        return x_t.to(dtype), n.to(dtype)
    return run_upcast


def _step_callable(impl: str, case: bl.Case, dtype: torch.dtype, backend: str, compiled: dict,
                   upcast: bool):
    """:func:`make_callable` for ``ddpm_step``: one step ``STEP_T -> STEP_PREV`` of
    ``case.sample`` with ``case.model_output`` (:func:`make_case` with ``step=True``)."""
    mo, x = case.model_output, case.sample
    if mo is None or x is None:
        raise ValueError("ddpm_step: the case has no step inputs (make_case(..., step=True))")
    if impl in ("fused", WHITE):
        noise = AnisotropicNoise(case.spec if impl == "fused" else NoiseSpec(), case.schedule)
        return lambda: noise.ddpm_step(mo, STEP_T, x, prev_timestep=STEP_PREV, mode="official",
                                       backend=backend)
    if impl == "official_sdm":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=case.schedule.num_train_timesteps,
                              beta_schedule="linear")
        t = torch.tensor(STEP_T)  # as the sampler loop passes it: a 0-d element of sched.timesteps

        def fn(m, xt):
            return bl.official_sdm_ddpm_step(sched, m, t, xt, case.axes, case.strength,
                                             variant=case.variant)
    else:
        kw = {"variant": case.variant, "prev_timestep": STEP_PREV}
        if impl == "eager_rfft":
            base, kw = bl.eager_ddpm_step, {**kw, "rfft": True}
        elif impl in compiled:
            base = compiled[impl]
        else:
            base = bl.STEP_BASELINES[impl]
        rest = (case.alphas_cumprod, case.betas, case.axes, case.strength, case.weights)

        def fn(m, xt):
            return base(m, STEP_T, xt, *rest, **kw)
    if not upcast:
        return lambda: fn(mo, x)

    def run_upcast():  # the casts are part of the timed call, as for add_noise
        x_prev, x0_hat = fn(mo.float(), x.float())
        return x_prev.to(dtype), x0_hat.to(dtype)
    return run_upcast


_COMPILE_OPTIONS = {"compiled_eager": {},
                    "compiled_eager_fallback_random": {"options": {"fallback_random": True}},
                    "compiled_eager_max_autotune": {"mode": "max-autotune"}}


def compiled_key(op: str, name: str) -> str:
    """The key of ``op``'s torch.compile baseline ``name`` in :func:`compiled_fns`' dict:
    ``name`` for add_noise (as before ddpm_step had one), ``"<op>:<name>"`` otherwise."""
    return name if op == "add_noise" else f"{op}:{name}"


def compiled_fns(s: dict) -> tuple[dict, dict]:
    """``({key: compiled fn}, {key: "ok" or why not})`` for every op of the run with torch.compile
    baselines (:data:`COMPILED_OPS`) and every name of ``s["compile_impls"]``; keys from
    :func:`compiled_key`. Empty when ``s["compile"]`` is off."""
    compiled, notes = {}, {}
    if not s["compile"]:
        return compiled, notes
    warnings.filterwarnings("ignore",
                            message=".*Torchinductor does not support code generation for complex.*")
    for op in (o for o in COMPILED_OPS if o in s.get("ops", OPS)):
        for name in s.get("compile_impls", COMPILED):
            key = compiled_key(op, name)
            fn, why = bl.make_compiled_eager(device=s["device"], op=op, **_COMPILE_OPTIONS[name])
            notes[key] = why
            if fn is not None:
                compiled[key] = fn
    return compiled, notes


def case_impls(op: str, kind: str, shape, dtype_name: str, s: dict, compiled: dict,
               backends) -> tuple[list[str], dict]:
    """The implementations of one case (:func:`impls_for`; the fused ones on
    :func:`op_backends` of ``backends``) and the compiled callables it uses, ``{impl name: fn}``:
    torch.compile baselines only for add_noise and ddpm_step at fp32 and the run's first shape
    (``compiled``: :func:`compiled_fns`' dict)."""
    use = {}
    if op in COMPILED_OPS and dtype_name == "fp32" and tuple(shape) == tuple(s["shapes"][0]):
        use = {name: compiled[compiled_key(op, name)] for name in s.get("compile_impls", COMPILED)
               if compiled_key(op, name) in compiled}
    return impls_for(op, kind, tuple(use), tuple(op_backends(op, backends)[0][1:])), use
