"""Parity of the anisodiff diffusers schedulers with their diffusers twins (issue 12, items 9 and 10).

With a white noise spec (the default) every Aniso scheduler must construct and behave exactly as
the diffusers scheduler it subclasses. Each test below builds the pair from the same arguments and
compares, BIT FOR BIT (``torch.equal``; NaNs must sit at the same places), over a grid of configs:

* construction: every attribute of the scheduler (betas, alphas_cumprod, sigmas, timesteps, ...)
  and the config (the Aniso config holds exactly the diffusers keys plus its own entries);
* ``set_timesteps`` (counts, spacings, custom timesteps / sigmas, flow-matching shifts);
* ``add_noise`` / ``scale_noise`` and ``get_velocity``;
* a full sampling loop of ``step`` calls with seeded generators (each output, both return forms,
  the generators' final states, the scheduler state after the loop);
* config save / load (``save_pretrained`` / ``from_pretrained``, ``from_config`` both ways);
* errors: the same exception type and message where diffusers refuses a call.

The behaviours follow what diffusers' own scheduler tests check; the tests are written here. Each
family also has a control, an anisotropic spec that DOES change the result, so that a broken
comparison cannot pass trivially.
"""
import json
import math
import re

import numpy as np
import pytest
import torch

import anisodiff as ad

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler)

from anisodiff.integrations import diffusers as dd  # noqa: E402
from conftest import random_axes  # noqa: E402

AXIS = random_axes(3, 1, seed=7)
SAGD = ad.NoiseSpec(spectral=ad.PowerLaw(-0.3))                        # time-invariant, no betas needed
SDM = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=-0.4))            # time-varying, the "beta" profile
SDM_LINEAR = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=1.0, schedule="linear"))
WHITE_SPECS = {"default": None, "NoiseSpec()": ad.NoiseSpec(),
               "s=0": ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=0.0))}
SHAPE = (2, 3, 8, 8)
T = 1000

# Aniso-only config entries and their defaults
EXTRA = {dd.AnisoDDPMScheduler: {"noise_spec": None, "sampling_mode": "official"},
         dd.AnisoDDIMScheduler: {"noise_spec": None},
         dd.AnisoEulerDiscreteScheduler: {"noise_spec": None},
         dd.AnisoFlowMatchEulerDiscreteScheduler: {"noise_spec": None}}
OURS_ONLY_ATTRS = {"noise_spec", "_noise_vp_cache"}
TWIN = {dd.AnisoDDPMScheduler: DDPMScheduler, dd.AnisoDDIMScheduler: DDIMScheduler,
        dd.AnisoEulerDiscreteScheduler: EulerDiscreteScheduler,
        dd.AnisoFlowMatchEulerDiscreteScheduler: FlowMatchEulerDiscreteScheduler}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine; conftest restores it


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# bit-for-bit comparison
# ---------------------------------------------------------------------------------------------
def _same(a, b, what="value"):
    """``a`` and ``b`` are identical: tensors by ``torch.equal`` (same dtype, shape and device;
    NaNs at the same places), arrays likewise, containers element-wise, the rest by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{what}: {type(a)} vs {type(b)}"
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), \
            f"{what}: {a.dtype} {tuple(a.shape)} {a.device} vs {b.dtype} {tuple(b.shape)} {b.device}"
        if a.is_floating_point() or a.is_complex():
            nan_a, nan_b = a.isnan(), b.isnan()
            assert torch.equal(nan_a, nan_b), f"{what}: NaNs at different places"
            a, b = a[~nan_a], b[~nan_b]
        assert torch.equal(a, b), f"{what}: differs (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{what}: differs"
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{what}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{what}: nan vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{what}: {a!r} vs {b!r}"


def _same_state(ours, theirs):
    """Every attribute diffusers' scheduler has, ours has, identical (plus only our own ones)."""
    a, b = dict(vars(ours)), dict(vars(theirs))
    a.pop("_internal_dict")
    b.pop("_internal_dict")
    assert set(a) - set(b) <= OURS_ONLY_ATTRS, f"extra attributes {set(a) - set(b) - OURS_ONLY_ATTRS}"
    assert set(b) <= set(a), f"missing attributes {set(b) - set(a)}"
    for k in b:
        _same(a[k], b[k], k)


def _same_config(ours, theirs, extra=None):
    """Our config is diffusers' plus our own entries (``extra``, by default their defaults).
    diffusers keeps unexpected entries of a loaded file in the config: a diffusers scheduler
    loaded from our file holds ours too, with the same values."""
    extra = EXTRA[type(ours)] if extra is None else extra
    a, b = dict(ours.config), dict(theirs.config)
    used_a, used_b = set(a.pop("_use_default_values", [])), set(b.pop("_use_default_values", []))
    assert used_a - set(extra) == used_b - set(extra)
    for k in ("_class_name", "_diffusers_version"):
        a.pop(k, None)
        b.pop(k, None)
    for k, v in extra.items():
        assert k in a, f"config[{k!r}] missing"
        _same(a.pop(k), v, f"config[{k!r}]")
        _same(b.pop(k, v), v, f"their config[{k!r}]")
    assert set(a) == set(b), f"config keys differ: {set(a) ^ set(b)}"
    for k in b:
        _same(a[k], b[k], f"config[{k!r}]")


_UNSET = object()


def _pair(cls, config, noise_spec=_UNSET):
    ours = cls(**config) if noise_spec is _UNSET else cls(**config, noise_spec=noise_spec)
    theirs = TWIN[cls](**config)
    _same_state(ours, theirs)
    return ours, theirs


def _both_raise(call_ours, call_theirs):
    """Both calls raise the same exception type with the same message (up to the class names)."""
    with pytest.raises(Exception) as theirs:
        call_theirs()
    with pytest.raises(type(theirs.value)) as ours:
        call_ours()
    assert type(ours.value) is type(theirs.value)

    def plain(e):  # "<class 'anisodiff....AnisoDDPMScheduler'>" -> "<class 'DDPMScheduler'>"
        return re.sub(r"[\w.]*\.(?:Aniso)?(\w+Scheduler)", r"\1", str(e)).replace("Aniso", "")
    assert plain(ours.value) == plain(theirs.value), (str(ours.value), str(theirs.value))


def test_the_comparison_can_fail():
    x = _randn(*SHAPE)
    _same(x, x.clone())
    _same(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    for other in (torch.nextafter(x, x + 1), x.double(), x[:1], torch.where(x > 0, x, float("nan"))):
        with pytest.raises(AssertionError):
            _same(x, other)
    with pytest.raises(AssertionError):
        _same([1.0, 2.0], [1.0, 2.0000001])
    with pytest.raises(AssertionError):
        _same(1, 1.0)
    a, b = _pair(dd.AnisoDDPMScheduler, {})
    b.betas = torch.nextafter(b.betas, b.betas + 1)
    with pytest.raises(AssertionError):
        _same_state(a, b)
    with pytest.raises(AssertionError):
        _same_config(dd.AnisoDDPMScheduler(sampling_mode="exact"), DDPMScheduler())


# ---------------------------------------------------------------------------------------------
# the save / load round trips (shared)
# ---------------------------------------------------------------------------------------------
def _check_save_load(ours, theirs, tmp_path):
    cls, parent = type(ours), type(theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ja = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    jb = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    assert ja.pop("_class_name") == cls.__name__ and jb.pop("_class_name") == parent.__name__
    assert {k: ja.pop(k) for k in list(ja) if k not in jb} == EXTRA[cls]
    assert ja == jb
    pairs = [(cls.from_pretrained(tmp_path / "ours"), parent.from_pretrained(tmp_path / "theirs")),
             (cls.from_config(theirs.config), theirs),          # diffusers config -> Aniso: white
             (ours, parent.from_config(ours.config)),           # Aniso config -> diffusers
             (cls.from_pretrained(tmp_path / "theirs"), parent.from_pretrained(tmp_path / "ours"))]
    for a, b in pairs:
        fresh_a, fresh_b = cls.from_config(a.config), parent.from_config(b.config)  # fresh state
        _same_state(fresh_a, fresh_b)
        _same_config(fresh_a, fresh_b)
        assert fresh_a.is_white


# ---------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------
LINEAR_BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64).tolist()
BETA_GRID = {  # shared by the VP schedulers
    "linear": {},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "extreme_0.1_2": {"beta_start": 0.1, "beta_end": 2.0},          # betas > 1: NaNs, as diffusers gives
    "extreme_tiny_to_1": {"beta_start": 1e-8, "beta_end": 1.0},     # ends on beta = 1
    "extreme_0.0001_0.5": {"beta_start": 0.0001, "beta_end": 0.5},
    "trained_betas": {"trained_betas": LINEAR_BETAS},
}

DDPM_CASES = {
    **{f"betas-{k}": (v, {"num_inference_steps": 10}) for k, v in BETA_GRID.items()},
    "betas-sigmoid": ({"beta_schedule": "sigmoid"}, {"num_inference_steps": 10}),  # DDPM only
    "pred-sample": ({"prediction_type": "sample"}, {"num_inference_steps": 10}),
    "pred-v": ({"prediction_type": "v_prediction"}, {"num_inference_steps": 10}),
    "pred-v-noclip": ({"prediction_type": "v_prediction", "clip_sample": False}, {"num_inference_steps": 10}),
    "var-fixed_small_log": ({"variance_type": "fixed_small_log"}, {"num_inference_steps": 10}),
    "var-fixed_large": ({"variance_type": "fixed_large"}, {"num_inference_steps": 10}),
    "var-fixed_large_log": ({"variance_type": "fixed_large_log"}, {"num_inference_steps": 10}),
    "var-learned": ({"variance_type": "learned"}, {"num_inference_steps": 10}),
    "var-learned_range": ({"variance_type": "learned_range"}, {"num_inference_steps": 10}),
    "clip-range-0.5": ({"clip_sample_range": 0.5}, {"num_inference_steps": 10}),
    "noclip": ({"clip_sample": False}, {"num_inference_steps": 10}),
    "thresholding": ({"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 1.5,
                      "clip_sample": False}, {"num_inference_steps": 10}),
    "spacing-linspace": ({"timestep_spacing": "linspace"}, {"num_inference_steps": 7}),
    "spacing-trailing": ({"timestep_spacing": "trailing"}, {"num_inference_steps": 7}),
    "spacing-leading-offset1": ({"steps_offset": 1}, {"num_inference_steps": 7}),
    "zero-snr-trailing": ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                          {"num_inference_steps": 10}),
    "zero-snr-v": ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
                   {"num_inference_steps": 10}),
    "T1": ({"num_train_timesteps": 1}, {"num_inference_steps": 1}),
    "T5": ({"num_train_timesteps": 5}, {"num_inference_steps": 5}),
    "custom-timesteps": ({}, {"timesteps": [999, 700, 420, 100, 3, 0]}),
    "no-set_timesteps": ({}, None),
}
# the cross product of the settings that interact in step(): prediction type x spacing x
# clipping / thresholding x steps_offset (6 steps each)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "linspace", "trailing")
CLIPPING = {"clip": {"clip_sample": True}, "noclip": {"clip_sample": False},
            "threshold": {"clip_sample": False, "thresholding": True, "dynamic_thresholding_ratio": 0.9,
                          "sample_max_value": 1.2}}
GRID = [(p, sp, c, off) for p in PREDICTIONS for sp in SPACINGS for c in CLIPPING for off in (0, 1)]
for _p, _sp, _c, _off in GRID:
    DDPM_CASES[f"grid-{_p}-{_sp}-{_c}-offset{_off}"] = (
        {"prediction_type": _p, "timestep_spacing": _sp, "steps_offset": _off, **CLIPPING[_c]},
        {"num_inference_steps": 6})


def _model(x, t, out_channels=None):
    """A deterministic stand-in network (depends on x and t; twice the channels for learned
    variances, the second half in [-1, 1])."""
    t = float(torch.as_tensor(t).double().reshape(-1)[0])
    eps = torch.tanh(0.7 * x) + 0.01 * math.cos(t)
    if out_channels is not None and out_channels != x.shape[1]:
        eps = torch.cat([eps, torch.sin(x + t)], dim=1)
    return eps


def _vp_noising(ours, theirs, timesteps):
    Tn = ours.config.num_train_timesteps
    x0, white = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    for t in (torch.tensor([0, Tn - 1]), torch.tensor([Tn // 2, Tn // 3]), timesteps[:2]):
        _same(ours.add_noise(x0, white, t), theirs.add_noise(x0, white, t), f"add_noise t={t.tolist()}")
        _same(ours.get_velocity(x0, white, t), theirs.get_velocity(x0, white, t), f"get_velocity t={t.tolist()}")
    return x0, white


@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_parity(case, tmp_path):
    config, set_kw = DDPM_CASES[case]
    ours, theirs = _pair(dd.AnisoDDPMScheduler, config)
    _same_config(ours, theirs)
    if set_kw is not None:
        ours.set_timesteps(**set_kw)
        theirs.set_timesteps(**set_kw)
        _same_state(ours, theirs)
        timesteps = theirs.timesteps
    else:
        timesteps = torch.tensor([999, 500, 1, 0])
    x0, white = _vp_noising(ours, theirs, timesteps)
    out_c = 6 if config.get("variance_type", "").startswith("learned") else None
    xa = xb = theirs.add_noise(x0, white, timesteps[:1])
    ga, gb = _gen(3), _gen(3)
    for t in timesteps:
        a = ours.step(_model(xa, t, out_c), t, xa, generator=ga)
        b = theirs.step(_model(xb, t, out_c), t, xb, generator=gb)
        _same(a.prev_sample, b.prev_sample, f"prev_sample t={int(t)}")
        _same(a.pred_original_sample, b.pred_original_sample, f"pred_original_sample t={int(t)}")
        ta = ours.step(_model(xa, t, out_c), t, xa, generator=_gen(int(t)), return_dict=False)
        tb = theirs.step(_model(xb, t, out_c), t, xb, generator=_gen(int(t)), return_dict=False)
        _same(ta, tb, f"step tuple t={int(t)}")
        xa, xb = a.prev_sample, b.prev_sample
    _same(ga.get_state(), gb.get_state(), "generator state")
    _same_state(ours, theirs)
    _check_save_load(ours, theirs, tmp_path)


@pytest.mark.parametrize("white", list(WHITE_SPECS))
@pytest.mark.parametrize("cls", list(TWIN), ids=lambda c: c.__name__)
def test_every_white_spec_is_diffusers(cls, white):
    """The three spellings of a white spec (None, NoiseSpec(), an identity squeeze), extreme betas
    included where the scheduler has betas."""
    flow = cls is dd.AnisoFlowMatchEulerDiscreteScheduler
    config = {"stochastic_sampling": True} if flow else dict(BETA_GRID["extreme_0.1_2"])
    if cls is dd.AnisoEulerDiscreteScheduler:
        config = {"beta_start": 0.0001, "beta_end": 0.9}  # sigmas must stay finite for the loop
    ours, theirs = _pair(cls, config, WHITE_SPECS[white])
    assert ours.is_white
    if white != "default":
        assert ad.NoiseSpec.from_dict(ours.config["noise_spec"]) == WHITE_SPECS[white]
    for s in (ours, theirs):
        s.set_timesteps(5)
    ts = theirs.timesteps
    x0, white_noise = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    if flow:
        _same(ours.scale_noise(x0, ts[:1], white_noise), theirs.scale_noise(x0, ts[:1], white_noise))
    else:
        _same(ours.add_noise(x0, white_noise, ts[:2]), theirs.add_noise(x0, white_noise, ts[:2]))
        _same(ours.get_velocity(x0, white_noise, ts[:2]), theirs.get_velocity(x0, white_noise, ts[:2]))
    kw = {dd.AnisoDDIMScheduler: {"eta": 1.0}, dd.AnisoEulerDiscreteScheduler: {"s_churn": 1.0}}.get(cls, {})
    xa = xb = white_noise
    ga, gb = _gen(1), _gen(1)
    for t in ts:
        xa = ours.step(_model(xa, t), t, xa, generator=ga, **kw).prev_sample
        xb = theirs.step(_model(xb, t), t, xb, generator=gb, **kw).prev_sample
        _same(xa, xb, f"prev_sample t={float(t)}")
    _same(ga.get_state(), gb.get_state())
    _same(ours.prior_noise(SHAPE, generator=_gen(2)), torch.randn(SHAPE, generator=_gen(2)))


def test_ddpm_errors_match():
    _both_raise(lambda: dd.AnisoDDPMScheduler(beta_schedule="cubic"), lambda: DDPMScheduler(beta_schedule="cubic"))
    ours, theirs = _pair(dd.AnisoDDPMScheduler, {})
    _both_raise(lambda: ours.set_timesteps(1001), lambda: theirs.set_timesteps(1001))
    _both_raise(lambda: ours.set_timesteps(timesteps=[0, 5]), lambda: theirs.set_timesteps(timesteps=[0, 5]))
    _both_raise(lambda: ours.set_timesteps(timesteps=[1000, 5]), lambda: theirs.set_timesteps(timesteps=[1000, 5]))
    _both_raise(lambda: ours.set_timesteps(3, timesteps=[5, 0]), lambda: theirs.set_timesteps(3, timesteps=[5, 0]))
    x = _randn(*SHAPE)
    bad = dd.AnisoDDPMScheduler(prediction_type="x0"), DDPMScheduler(prediction_type="x0")
    _both_raise(lambda: bad[0].step(x, 10, x), lambda: bad[1].step(x, 10, x))


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------
DDIM_CASES = {
    **{f"betas-{k}": (v, {"num_inference_steps": 10}, {"eta": 0.0}) for k, v in BETA_GRID.items()},
    "eta-0.5": ({}, {"num_inference_steps": 10}, {"eta": 0.5}),
    "eta-1-clipped-output": ({}, {"num_inference_steps": 10}, {"eta": 1.0, "use_clipped_model_output": True}),
    "eta-0.5-variance_noise": ({}, {"num_inference_steps": 10}, {"eta": 0.5, "variance_noise": True}),
    "extreme-eta-0.5": (BETA_GRID["extreme_0.1_2"], {"num_inference_steps": 10}, {"eta": 0.5}),
    "set_alpha_to_one-False": ({"set_alpha_to_one": False}, {"num_inference_steps": 10}, {"eta": 0.3}),
    "steps_offset-1": ({"steps_offset": 1}, {"num_inference_steps": 10}, {"eta": 0.0}),
    "spacing-linspace": ({"timestep_spacing": "linspace"}, {"num_inference_steps": 7}, {"eta": 0.5}),
    "spacing-trailing": ({"timestep_spacing": "trailing"}, {"num_inference_steps": 7}, {"eta": 0.5}),
    "pred-sample": ({"prediction_type": "sample"}, {"num_inference_steps": 10}, {"eta": 0.5}),
    "pred-v": ({"prediction_type": "v_prediction"}, {"num_inference_steps": 10}, {"eta": 0.0}),
    "noclip": ({"clip_sample": False}, {"num_inference_steps": 10}, {"eta": 0.0}),
    "clip-range-0.5": ({"clip_sample": True, "clip_sample_range": 0.5}, {"num_inference_steps": 10},
                       {"eta": 0.5, "use_clipped_model_output": True}),
    "thresholding": ({"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 1.5},
                     {"num_inference_steps": 10}, {"eta": 0.0}),
    "zero-snr-trailing-v": ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                             "prediction_type": "v_prediction"}, {"num_inference_steps": 10}, {"eta": 0.0}),
    "T5": ({"num_train_timesteps": 5}, {"num_inference_steps": 5}, {"eta": 1.0}),
}
for _i, (_p, _sp, _c, _off) in enumerate(GRID):
    DDIM_CASES[f"grid-{_p}-{_sp}-{_c}-offset{_off}"] = (
        {"prediction_type": _p, "timestep_spacing": _sp, "steps_offset": _off, **CLIPPING[_c],
         "set_alpha_to_one": _i % 2 == 0},
        {"num_inference_steps": 6}, {"eta": (0.0, 0.6, 1.0)[_i % 3], "use_clipped_model_output": _i % 4 == 1})


@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_parity(case, tmp_path):
    config, set_kw, step_kw = DDIM_CASES[case]
    ours, theirs = _pair(dd.AnisoDDIMScheduler, config)
    _same_config(ours, theirs)
    x = _randn(*SHAPE)
    _both_raise(lambda: ours.step(x, 10, x), lambda: theirs.step(x, 10, x))  # before set_timesteps
    ours.set_timesteps(**set_kw)
    theirs.set_timesteps(**set_kw)
    _same_state(ours, theirs)
    x0, white = _vp_noising(ours, theirs, theirs.timesteps)
    xa = xb = theirs.add_noise(x0, white, theirs.timesteps[:1])
    ga, gb = _gen(5), _gen(5)
    step_kw = dict(step_kw)
    given_noise = step_kw.pop("variance_noise", False)
    for i, t in enumerate(theirs.timesteps):
        kw_a, kw_b = dict(step_kw, generator=ga), dict(step_kw, generator=gb)
        if given_noise:
            kw_a = kw_b = dict(step_kw, variance_noise=_randn(*SHAPE, seed=100 + i))
        a = ours.step(_model(xa, t), t, xa, **kw_a)
        b = theirs.step(_model(xb, t), t, xb, **kw_b)
        _same(a.prev_sample, b.prev_sample, f"prev_sample t={int(t)}")
        _same(a.pred_original_sample, b.pred_original_sample, f"pred_original_sample t={int(t)}")
        _same(ours.step(_model(xa, t), t, xa, **dict(step_kw, generator=_gen(i)), return_dict=False),
              theirs.step(_model(xb, t), t, xb, **dict(step_kw, generator=_gen(i)), return_dict=False),
              f"step tuple t={int(t)}")
        xa, xb = a.prev_sample, b.prev_sample
    _same(ga.get_state(), gb.get_state(), "generator state")
    _same_state(ours, theirs)
    if step_kw.get("eta", 0) > 0:
        z = _randn(*SHAPE)
        _both_raise(lambda: ours.step(x, theirs.timesteps[0], x, eta=0.5, generator=_gen(), variance_noise=z),
                    lambda: theirs.step(x, theirs.timesteps[0], x, eta=0.5, generator=_gen(), variance_noise=z))
    _check_save_load(ours, theirs, tmp_path)


# ---------------------------------------------------------------------------------------------
# Euler
# ---------------------------------------------------------------------------------------------
EULER_CASES = {
    **{f"betas-{k}": (v, {"num_inference_steps": 10}, {}) for k, v in BETA_GRID.items()},
    "pred-v": ({"prediction_type": "v_prediction"}, {"num_inference_steps": 10}, {}),
    "pred-sample": ({"prediction_type": "sample"}, {"num_inference_steps": 10}, {}),
    "log_linear": ({"interpolation_type": "log_linear"}, {"num_inference_steps": 10}, {}),
    "karras": ({"use_karras_sigmas": True}, {"num_inference_steps": 10}, {}),
    "karras-sigma-range": ({"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
                           {"num_inference_steps": 10}, {}),
    "exponential": ({"use_exponential_sigmas": True}, {"num_inference_steps": 10}, {}),
    "beta-sigmas": ({"use_beta_sigmas": True}, {"num_inference_steps": 10}, {}),
    "spacing-leading-offset1": ({"timestep_spacing": "leading", "steps_offset": 1},
                                {"num_inference_steps": 10}, {}),
    "spacing-trailing": ({"timestep_spacing": "trailing"}, {"num_inference_steps": 10}, {}),
    "continuous-v": ({"timestep_type": "continuous", "prediction_type": "v_prediction"},
                     {"num_inference_steps": 10}, {}),
    "final-sigma_min": ({"final_sigmas_type": "sigma_min"}, {"num_inference_steps": 10}, {}),
    "zero-snr-trailing": ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                          {"num_inference_steps": 10}, {}),
    "churn": ({}, {"num_inference_steps": 10}, {"s_churn": 1.0}),
    "churn-window": ({"use_karras_sigmas": True}, {"num_inference_steps": 10},
                     {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 20.0, "s_noise": 1.003}),
    "custom-timesteps": ({}, {"timesteps": [999, 800, 500, 200, 10]}, {}),
    "custom-sigmas": ({}, {"sigmas": [14.0, 6.0, 2.0, 0.5, 0.1]}, {"s_churn": 1.0}),
}
EULER_SIGMAS = {"plain": {}, "karras": {"use_karras_sigmas": True}, "log_linear": {"interpolation_type": "log_linear"}}
for _i, (_p, _sp, _sig, _fin) in enumerate([(p, sp, sig, fin) for p in PREDICTIONS for sp in SPACINGS
                                             for sig in EULER_SIGMAS for fin in ("zero", "sigma_min")]):
    EULER_CASES[f"grid-{_p}-{_sp}-{_sig}-{_fin}"] = (
        {"prediction_type": _p, "timestep_spacing": _sp, "final_sigmas_type": _fin, "steps_offset": _i % 2,
         **EULER_SIGMAS[_sig]}, {"num_inference_steps": 6}, {"s_churn": 1.0} if _i % 3 == 0 else {})


@pytest.mark.parametrize("case", list(EULER_CASES))
def test_euler_parity(case, tmp_path):
    config, set_kw, step_kw = EULER_CASES[case]
    ours, theirs = _pair(dd.AnisoEulerDiscreteScheduler, config)
    _same_config(ours, theirs)
    ours.set_timesteps(**set_kw)
    theirs.set_timesteps(**set_kw)
    _same_state(ours, theirs)
    x0, white = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    ts = theirs.timesteps
    for t in (ts[:2], ts[-2:], ts[3:4]):
        _same(ours.add_noise(x0, white, t), theirs.add_noise(x0, white, t), "add_noise")
    for t in (ts[:2], ts[-1:]):
        _same(ours.get_velocity(x0, white, t), theirs.get_velocity(x0, white, t), "get_velocity")
    _same(ours.init_noise_sigma, theirs.init_noise_sigma, "init_noise_sigma")
    xa = xb = theirs.init_noise_sigma * white
    ga, gb = _gen(7), _gen(7)
    for t in ts:
        ia, ib = ours.scale_model_input(xa, t), theirs.scale_model_input(xb, t)
        _same(ia, ib, "scale_model_input")
        a = ours.step(_model(ia, t), t, xa, generator=ga, **step_kw)
        b = theirs.step(_model(ib, t), t, xb, generator=gb, **step_kw)
        _same(a.prev_sample, b.prev_sample, f"prev_sample t={float(t)}")
        _same(a.pred_original_sample, b.pred_original_sample, f"pred_original_sample t={float(t)}")
        _same_state(ours, theirs)
        xa, xb = a.prev_sample, b.prev_sample
    _same(ga.get_state(), gb.get_state(), "generator state")
    _same(ours.add_noise(x0, white, ts[:1]), theirs.add_noise(x0, white, ts[:1]), "add_noise after the loop")
    # the tuple form, on a fresh pass
    for s in (ours, theirs):
        s.set_timesteps(**set_kw)
    _same(ours.step(_model(x0, ts[0]), ts[0], x0, generator=_gen(1), return_dict=False, **step_kw),
          theirs.step(_model(x0, ts[0]), ts[0], x0, generator=_gen(1), return_dict=False, **step_kw))
    _both_raise(lambda: ours.step(x0, 3, x0), lambda: theirs.step(x0, 3, x0))  # integer indices refused
    _check_save_load(ours, theirs, tmp_path)


# ---------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------
FLOW_CASES = {
    "default": ({}, {"num_inference_steps": 10}),
    "shift-3": ({"shift": 3.0}, {"num_inference_steps": 10}),
    "shift-0.5": ({"shift": 0.5}, {"num_inference_steps": 10}),
    "dynamic-exponential": ({"use_dynamic_shifting": True}, {"num_inference_steps": 10, "mu": 0.8}),
    "dynamic-linear": ({"use_dynamic_shifting": True, "time_shift_type": "linear"},
                       {"num_inference_steps": 10, "mu": 1.2}),
    "shift_terminal": ({"shift": 3.0, "shift_terminal": 0.1}, {"num_inference_steps": 10}),
    "invert_sigmas": ({"invert_sigmas": True}, {"num_inference_steps": 10}),
    "karras": ({"use_karras_sigmas": True}, {"num_inference_steps": 10}),
    "exponential": ({"use_exponential_sigmas": True}, {"num_inference_steps": 10}),
    "beta-sigmas": ({"use_beta_sigmas": True}, {"num_inference_steps": 10}),
    "stochastic": ({"stochastic_sampling": True}, {"num_inference_steps": 10}),
    "stochastic-shift-3": ({"stochastic_sampling": True, "shift": 3.0}, {"num_inference_steps": 10}),
    "T100": ({"num_train_timesteps": 100}, {"num_inference_steps": 10}),
    "custom-sigmas": ({}, {"sigmas": [1.0, 0.8, 0.5, 0.2, 0.05]}),
    "custom-timesteps": ({"stochastic_sampling": True}, {"timesteps": [1000.0, 750.0, 400.0, 90.0]}),
}
FLOW_SHIFTS = {"shift1": ({}, {}), "shift3": ({"shift": 3.0}, {}),
               "dyn-exp": ({"use_dynamic_shifting": True}, {"mu": 0.7}),
               "dyn-lin": ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}),
               "terminal": ({"shift": 2.0, "shift_terminal": 0.2}, {})}
FLOW_SIGMAS = {"plain": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
               "beta": {"use_beta_sigmas": True}, "inverted": {"invert_sigmas": True}}
for _sh in FLOW_SHIFTS:
    for _sig in FLOW_SIGMAS:
        for _sto in (False, True):
            FLOW_CASES[f"grid-{_sh}-{_sig}-{'stochastic' if _sto else 'ode'}"] = (
                {**FLOW_SHIFTS[_sh][0], **FLOW_SIGMAS[_sig], "stochastic_sampling": _sto},
                {"num_inference_steps": 6, **FLOW_SHIFTS[_sh][1]})


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_flow_match_parity(case, tmp_path):
    config, set_kw = FLOW_CASES[case]
    ours, theirs = _pair(dd.AnisoFlowMatchEulerDiscreteScheduler, config)
    _same_config(ours, theirs)
    ours.set_timesteps(**set_kw)
    theirs.set_timesteps(**set_kw)
    _same_state(ours, theirs)
    x0, white = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    ts = theirs.timesteps
    for t in (ts[:1], ts[-1:], ts[2:3]):
        _same(ours.scale_noise(x0, t, white), theirs.scale_noise(x0, t, white), "scale_noise")
    xa = xb = white
    ga, gb = _gen(9), _gen(9)
    for t in ts:
        a = ours.step(_model(xa, t), t, xa, generator=ga)
        b = theirs.step(_model(xb, t), t, xb, generator=gb)
        _same(a.prev_sample, b.prev_sample, f"prev_sample t={float(t)}")
        _same_state(ours, theirs)
        xa, xb = a.prev_sample, b.prev_sample
    _same(ga.get_state(), gb.get_state(), "generator state")
    for s in (ours, theirs):
        s.set_timesteps(**set_kw)
    _same(ours.step(_model(x0, ts[0]), ts[0], x0, generator=_gen(1), return_dict=False),
          theirs.step(_model(x0, ts[0]), ts[0], x0, generator=_gen(1), return_dict=False))
    _both_raise(lambda: ours.step(x0, 3, x0), lambda: theirs.step(x0, 3, x0))
    _check_save_load(ours, theirs, tmp_path)


def test_flow_match_errors_match():
    ours, theirs = _pair(dd.AnisoFlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True})
    _both_raise(lambda: ours.set_timesteps(10), lambda: theirs.set_timesteps(10))  # mu required


# ---------------------------------------------------------------------------------------------
# controls: an anisotropic spec does change the result (the comparisons above are not vacuous)
# ---------------------------------------------------------------------------------------------
def _differs(a, b):
    with pytest.raises(AssertionError):
        _same(a, b)


def test_an_anisotropic_spec_changes_every_family():
    x0, white, x = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), _randn(*SHAPE, seed=3)
    t = torch.tensor([10, 700])
    for cls in (dd.AnisoDDPMScheduler, dd.AnisoDDIMScheduler):
        ours, theirs = cls(noise_spec=SAGD), TWIN[cls]()
        assert not ours.is_white
        _differs(ours.add_noise(x0, white, t), theirs.add_noise(x0, white, t))
        _differs(ours.get_velocity(x0, white, t), theirs.get_velocity(x0, white, t))
        for s in (ours, theirs):
            s.set_timesteps(10)
        tt = theirs.timesteps[2]
        kw = {"eta": 1.0} if cls is dd.AnisoDDIMScheduler else {}
        _differs(ours.step(_model(x, tt), tt, x, generator=_gen(), **kw).prev_sample,
                 theirs.step(_model(x, tt), tt, x, generator=_gen(), **kw).prev_sample)
    ours, theirs = dd.AnisoEulerDiscreteScheduler(noise_spec=SAGD), EulerDiscreteScheduler()
    for s in (ours, theirs):
        s.set_timesteps(10)
    ts = theirs.timesteps
    _differs(ours.add_noise(x0, white, ts[:2]), theirs.add_noise(x0, white, ts[:2]))
    _differs(ours.step(_model(x, ts[0]), ts[0], x, generator=_gen(), s_churn=1.0).prev_sample,
             theirs.step(_model(x, ts[0]), ts[0], x, generator=_gen(), s_churn=1.0).prev_sample)
    ours = dd.AnisoFlowMatchEulerDiscreteScheduler(noise_spec=SAGD, stochastic_sampling=True)
    theirs = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    for s in (ours, theirs):
        s.set_timesteps(10)
    ts = theirs.timesteps
    _differs(ours.scale_noise(x0, ts[:1], white), theirs.scale_noise(x0, ts[:1], white))
    _differs(ours.step(_model(x, ts[0]), ts[0], x, generator=_gen()).prev_sample,
             theirs.step(_model(x, ts[0]), ts[0], x, generator=_gen()).prev_sample)


# ---------------------------------------------------------------------------------------------
# item 9: betas are validated only where the spec needs them; prev_timestep < -1 is the last step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [dd.AnisoDDPMScheduler, dd.AnisoDDIMScheduler, dd.AnisoEulerDiscreteScheduler])
def test_white_spec_accepts_the_betas_diffusers_accepts(cls):
    for kwargs in ({"beta_start": 0.1, "beta_end": 2}, {"trained_betas": [0.5, 1.5, 3.0]},
                   {"trained_betas": [0.0, 0.1, 0.2]}):
        kwargs = dict(kwargs, num_train_timesteps=len(kwargs.get("trained_betas", [0] * 1000)))
        for white in WHITE_SPECS.values():
            ours = cls(**kwargs) if white is None else cls(**kwargs, noise_spec=white)
            _same_state(ours, TWIN[cls](**kwargs))
            assert ours.is_white
    # a spec that needs the VP schedule still refuses betas outside (0, 1], at construction
    spec = SAGD if cls is not dd.AnisoEulerDiscreteScheduler else SDM
    with pytest.raises(ValueError, match="betas"):
        cls(beta_start=0.1, beta_end=2, noise_spec=spec)
    with pytest.raises(ValueError, match="betas"):
        cls(beta_start=0.1, beta_end=2, noise_spec=SDM_LINEAR)


def test_euler_time_invariant_spec_needs_no_betas():
    """Euler only reads the betas for a time-varying squeeze: a spectral spec constructs and
    shapes its noise whatever the betas."""
    odd = dd.AnisoEulerDiscreteScheduler(beta_start=0.1, beta_end=2, noise_spec=SAGD)
    plain = dd.AnisoEulerDiscreteScheduler(noise_spec=SAGD)
    white = _randn(*SHAPE, seed=2)
    _same(odd.shape_noise(white), plain.shape_noise(white))
    _differs(odd.shape_noise(white), white)
    for s in (odd, plain):
        s.set_timesteps(4)
    _same(odd.prior_noise(SHAPE, generator=_gen(1)), plain.prior_noise(SHAPE, generator=_gen(1)))


def test_prev_timestep_below_minus_one_is_the_last_step():
    """A ported diffusers DDIM/DDPM loop computes ``prev = t - T // n`` (``-20`` at t = 0 with 50
    steps): any prev < 0 is the step past t = 0, the same as -1, on every step path."""
    from anisodiff.sampling import fused_ddpm_step
    spec = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=-0.4), spectral=ad.PowerLaw(-0.3))
    vp = ad.VPSchedule.linear(T)
    noise = ad.AnisotropicNoise(spec, vp)
    x, eps = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    backends = ["reference"] + (["auto"] if ad.build_info().get("cpu") else [])
    for t in (0, 3):
        for backend in backends:
            for mode in ("official", "exact"):
                last = noise.ddpm_step(eps, t, x, prev_timestep=-1, generator=_gen(), mode=mode, backend=backend)
                for prev in (-20, torch.tensor(-19), torch.tensor([-20, -1])):
                    _same(noise.ddpm_step(eps, t, x, prev_timestep=prev, generator=_gen(), mode=mode,
                                          backend=backend), last, f"ddpm_step prev={prev}")
        _same(noise.ddim_step(eps, t, x, prev_timestep=-20, eta=0.5, generator=_gen()),
              noise.ddim_step(eps, t, x, prev_timestep=-1, eta=0.5, generator=_gen()))
        if ad.build_info().get("cpu"):
            stream = torch.tensor([5, 0])
            _same(fused_ddpm_step(eps, t, x, spec, vp, prev_timestep=-20, stream=stream),
                  fused_ddpm_step(eps, t, x, spec, vp, prev_timestep=-1, stream=stream))
    with pytest.raises(ValueError, match="prev_timestep"):
        noise.ddpm_step(eps, 5, x, prev_timestep=T)  # the upper bound still holds
    with pytest.raises(ValueError, match="timestep"):
        noise.ddpm_step(eps, -1, x)
    # the Aniso DDIM scheduler's own last step (leading spacing, set_alpha_to_one): prev = -20
    s = dd.AnisoDDIMScheduler(noise_spec=spec)
    s.set_timesteps(50)
    assert int(s.timesteps[-1]) == 0
    out = s.step(eps, s.timesteps[-1], x, eta=0.5, generator=_gen())
    ref = ad.reference.ddim_step(eps, 0, x, spec, vp, prev_timestep=-1, eta=0.5, noise=None, clip_sample=True)
    _same(out.prev_sample, ref[0])
