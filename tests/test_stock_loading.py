"""Stock loading: ``diffusers.DiffusionPipeline.from_pretrained`` returns the anisodiff pipeline with
its noise spec, and a safetensors checkpoint's metadata carries the spec (and kohya's noise flags).

What works in which process is checked in subprocesses: one that imported only diffusers, and one
that imported anisodiff before or after diffusers. Every load is from a local folder, offline
(``HF_HUB_OFFLINE=1`` in the subprocesses, sockets refused in this one).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import anisodiff as ad
from anisodiff.integrations import checkpoint as ck

from conftest import random_axes

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixtures", "pipeline_v0")
FIXTURE_IMAGES = os.path.join(HERE, "fixtures", "pipeline_v0_images.safetensors")
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")

AXIS = random_axes(3, 1, seed=3)
SPEC = ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, strength=-0.4), spectral=ad.PowerLaw(-0.3),
                    offset=ad.OffsetNoise(0.1))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny work; conftest restores the count


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _run(code: str) -> subprocess.CompletedProcess:
    path = [os.path.join(HERE, "fixtures"), os.environ.get("PYTHONPATH", "")]  # make_pipeline_v0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def _fixture_copy(tmp_path) -> str:
    dst = str(tmp_path / "pipe")
    shutil.copytree(FIXTURE, dst)
    return dst


def _fixture_spec() -> ad.NoiseSpec:
    sys.path.insert(0, os.path.join(HERE, "fixtures"))
    try:
        from make_pipeline_v0 import fixture_spec
    finally:
        sys.path.pop(0)
    return fixture_spec()


# =============================================================================================
# DiffusionPipeline.from_pretrained
# =============================================================================================
@needs_diffusers
def test_a_process_with_only_diffusers_refuses_and_says_what_to_import(tmp_path):
    """Without anisodiff in the process no file can make diffusers load its classes (diffusers never
    imports a module that a repository names); the saved pipeline is refused, never silently
    loaded as a white pipeline, and the plain parts load."""
    path = _fixture_copy(tmp_path)
    res = _run(f"""
        import json, sys
        import diffusers
        from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel
        path = {path!r}
        try:
            DiffusionPipeline.from_pretrained(path)
        except AttributeError as exc:
            assert "AnisoDDPMPipeline" in str(exc), exc
        else:
            raise SystemExit("DiffusionPipeline.from_pretrained loaded it without anisodiff")
        try:
            DDPMPipeline.from_pretrained(path)
        except ValueError as exc:
            assert "import anisodiff.integrations.diffusers" in str(exc), exc
        else:
            raise SystemExit("DDPMPipeline.from_pretrained dropped the anisodiff scheduler")
        unet = UNet2DModel.from_pretrained(path, subfolder="unet")
        assert unet.config.in_channels == 3
        cfg = json.load(open(path + "/scheduler/scheduler_config.json"))
        assert cfg["noise_spec"]["format"] == "anisodiff.NoiseSpec"    # plain JSON, readable anywhere
        assert not any(m == "anisodiff" or m.startswith("anisodiff.") for m in sys.modules)
        print("ok")
        """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:] + res.stdout[-2000:]


@needs_diffusers
@pytest.mark.parametrize("order", ["anisodiff_first", "diffusers_first"])
def test_import_anisodiff_then_diffusers_loads_a_pipeline_saved_before_this_change(order, tmp_path):
    """``import anisodiff`` (before or after diffusers) is all it takes: the pipeline saved at
    d0fa7e7 loads with ``DiffusionPipeline.from_pretrained``, keeps its spec and schedule and samples
    the images it sampled then."""
    path = _fixture_copy(tmp_path)
    first, second = ("anisodiff", "diffusers") if order == "anisodiff_first" else ("diffusers", "anisodiff")
    res = _run(f"""
        import importlib, importlib.util, sys
        import torch
        torch.set_num_threads(1)
        {first} = importlib.import_module({first!r})
        if {first!r} == "anisodiff":
            from anisodiff.integrations import diffusers_registry
            assert diffusers_registry.installed() and "diffusers" not in sys.modules
            assert importlib.util.find_spec("diffusers") is not None   # a look-up imports nothing
            assert diffusers_registry.installed() and "diffusers" not in sys.modules
        {second} = importlib.import_module({second!r})
        from diffusers import DiffusionPipeline
        from safetensors.torch import load_file
        from make_pipeline_v0 import BATCH, SEED, STEPS, fixture_spec
        from anisodiff.integrations.diffusers import AnisoDDPMPipeline, AnisoDDPMScheduler
        assert diffusers.AnisoDDPMPipeline is AnisoDDPMPipeline
        pipe = DiffusionPipeline.from_pretrained({path!r})
        assert type(pipe) is AnisoDDPMPipeline and type(pipe.scheduler) is AnisoDDPMScheduler
        assert pipe.scheduler.noise_spec == fixture_spec(), pipe.scheduler.noise_spec
        assert pipe.scheduler.config.sampling_mode == "exact"
        assert pipe.scheduler.config.num_train_timesteps == 100
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(SEED),
                      num_inference_steps=STEPS, output_type="pt").images
        then = load_file({FIXTURE_IMAGES!r})["images"]
        err = (images - then).abs().max().item()
        assert err < 1e-5, err
        print("ok", err)
        """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:] + res.stdout[-2000:]


@pytest.fixture(scope="module")
def dd():
    pytest.importorskip("diffusers")
    from anisodiff.integrations import diffusers as mod
    return mod


@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(4, 8), norm_num_groups=2,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_round_trip_keeps_the_spec_the_schedule_and_the_noise_bits(dd, unet, kind, tmp_path, offline):
    from diffusers import DiffusionPipeline
    if kind == "ddpm":
        sched = dd.AnisoDDPMScheduler(num_train_timesteps=200, beta_schedule="scaled_linear",
                                      noise_spec=SPEC, sampling_mode="exact")
        pipe, kw = dd.AnisoDDPMPipeline(unet, sched), {}
    else:
        sched = dd.AnisoDDIMScheduler(num_train_timesteps=200, beta_end=0.03, noise_spec=SPEC)
        pipe, kw = dd.AnisoDDIMPipeline(unet, sched), {"eta": 1.0}
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe) and type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.scheduler.noise_spec == SPEC
    assert torch.equal(loaded.scheduler.betas, pipe.scheduler.betas)               # the schedule
    assert torch.equal(loaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    shape = (2, 3, 8, 8)
    a = pipe.scheduler.prior_noise(shape, generator=torch.Generator().manual_seed(5))
    b = loaded.scheduler.prior_noise(shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)                                                      # same noise bits
    before = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=3,
                  output_type="pt", **kw).images
    after = loaded(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=3,
                   output_type="pt", **kw).images
    assert torch.equal(before, after)
    white = type(pipe)(unet, type(pipe.scheduler).from_config(pipe.scheduler.config, noise_spec=None))
    white.set_progress_bar_config(disable=True)
    other = white(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=3,
                  output_type="pt", **kw).images
    assert (other - after).abs().max() > 1e-3                                     # the spec matters


@needs_diffusers
def test_a_corrupt_or_missing_spec_fails_naming_the_file(dd, tmp_path, offline):
    from diffusers import DiffusionPipeline
    path = _fixture_copy(tmp_path)
    cfg_file = os.path.join(path, "scheduler", "scheduler_config.json")
    good = json.load(open(cfg_file))

    def write(cfg):
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)

    write({**good, "noise_spec": {**good["noise_spec"], "spectral": {"type": "power_law", "alpha": "steep"}}})
    with pytest.raises(TypeError, match=r"scheduler_config\.json: noise_spec: alpha"):
        DiffusionPipeline.from_pretrained(path)
    write({**good, "noise_spec": {**good["noise_spec"], "version": 99}})
    with pytest.raises(ValueError, match=r"scheduler_config\.json: noise_spec: spec\.version: 99 is newer"):
        dd.AnisoDDPMScheduler.from_pretrained(path, subfolder="scheduler")
    write({k: v for k, v in good.items() if k != "noise_spec"})
    with pytest.raises(ValueError, match=r"scheduler_config\.json: noise_spec: missing"):
        DiffusionPipeline.from_pretrained(path)
    with open(cfg_file, "w") as f:
        f.write('{"_class_name": "AnisoDDPMScheduler", "noise_spec": {')          # truncated file
    with pytest.raises(OSError, match="not a valid JSON file"):
        DiffusionPipeline.from_pretrained(path)
    os.remove(cfg_file)
    with pytest.raises(OSError, match="scheduler_config.json"):
        DiffusionPipeline.from_pretrained(path)
    # a stock diffusers scheduler config has no spec: it loads as white noise (as from_config does)
    from diffusers import DDPMScheduler
    DDPMScheduler(num_train_timesteps=100).save_pretrained(os.path.join(path, "scheduler"))
    assert dd.AnisoDDPMScheduler.from_pretrained(path, subfolder="scheduler").is_white
    write(good)
    assert DiffusionPipeline.from_pretrained(path).scheduler.noise_spec == _fixture_spec()


@needs_diffusers
def test_registration_puts_every_class_on_the_diffusers_module(dd):
    import diffusers
    for name in ("AnisoDDPMPipeline", "AnisoDDIMPipeline", "AnisoDDPMScheduler", "AnisoDDIMScheduler",
                 "AnisoEulerDiscreteScheduler", "AnisoFlowMatchEulerDiscreteScheduler"):
        assert getattr(diffusers, name) is getattr(dd, name)
    from anisodiff.integrations import diffusers_registry
    assert not diffusers_registry.installed()          # the hook removed itself once diffusers ran
    diffusers_registry.install()                        # idempotent once registered
    assert not diffusers_registry.installed()


# =============================================================================================
# safetensors metadata
# =============================================================================================
def _save_plain(path, metadata):
    from safetensors.torch import save_file
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)


def test_safetensors_round_trip_keeps_spec_gamma_and_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = tmp_path / "lora.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    ck.save_file(tensors, path, SPEC, input_perturbation=0.05,
                 metadata={"ss_learning_rate": "0.0001", "ss_noise_offset": "None",
                           "ss_multires_noise_discount": "0.3"})
    assert ck.load_spec_from_safetensors(path) == SPEC
    noise = ck.load_noise_from_safetensors(path)
    assert noise.spec == SPEC and noise.input_perturbation == 0.05
    meta = ck.read_safetensors_metadata(path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta                         # the safetensors library reads the same
    assert meta[ck.SPEC_KEY] == SPEC.to_json() and meta[ck.VERSION_KEY] == ad.__version__
    assert meta["ss_noise_offset"] == "0.1" and meta["ss_ip_noise_gamma"] == "0.05"
    assert meta["ss_learning_rate"] == "0.0001"             # the trainer's own keys stay
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert ck.noise_metadata(ad.NoiseSpec()).keys() == {ck.SPEC_KEY, ck.VERSION_KEY}


KOHYA = {  # what kohya's train_network.py writes: str() of every flag, "None" when unset
    "ss_network_module": "networks.lora", "ss_noise_offset": "0.0357", "ss_multires_noise_iterations": "None",
    "ss_multires_noise_discount": "0.3", "ss_adaptive_noise_scale": "None", "ss_zero_terminal_snr": "False",
    "ss_ip_noise_gamma": "None", "ss_noise_offset_random_strength": "False",
    "ss_ip_noise_gamma_random_strength": "False", "ss_seed": "42",
}


def test_a_kohya_lora_noise_offset_becomes_the_equivalent_spec(tmp_path):
    path = tmp_path / "kohya.safetensors"
    _save_plain(path, KOHYA)
    spec = ck.load_spec_from_safetensors(path)
    assert spec == ad.NoiseSpec(offset=ad.OffsetNoise(0.0357))
    # kohya's noise + o * randn(B, C, 1, 1): per plane, covariance I + o^2 (all ones), channels apart
    C, H, W = 2, 3, 4
    plane = torch.eye(H * W, dtype=torch.float64) + 0.0357 ** 2 * torch.ones(H * W, H * W, dtype=torch.float64)
    expected = torch.block_diag(*[plane] * C)
    assert torch.allclose(ad.covariance(spec, (C, H, W)), expected, atol=1e-12, rtol=0)
    noise = ck.noise_from_metadata({**KOHYA, "ss_ip_noise_gamma": "0.1", "ss_noise_offset": "None"})
    assert noise.spec == ad.NoiseSpec() and noise.input_perturbation == 0.1


def test_kohya_random_strength_and_pyramid_flags_map_to_their_parts(tmp_path):
    meta = {**KOHYA, "ss_noise_offset_random_strength": "True"}
    assert ck.noise_from_metadata(meta).spec == ad.NoiseSpec(offset=ad.OffsetNoise(0.0357, random_strength=True))
    pyramid = {**KOHYA, "ss_noise_offset": "None", "ss_multires_noise_iterations": "6",
               "ss_multires_noise_discount": "0.4"}
    assert ck.noise_from_metadata(pyramid).spec == ad.NoiseSpec(spectral=ad.PyramidNoise(6, 0.4))
    del pyramid["ss_multires_noise_discount"]                                  # kohya's default: 0.3
    assert ck.noise_from_metadata(pyramid).spec == ad.NoiseSpec(spectral=ad.PyramidNoise(6, 0.3))
    offset = ad.OffsetNoise(0.05, random_strength=True)
    for spec, kohya_part in ((ad.NoiseSpec(spectral=ad.PyramidNoise(4, 0.25)),) * 2,     # spec, what kohya's
                             (ad.NoiseSpec(squeeze=ad.Squeeze(AXIS, 0.3), offset=offset),  # keys say of it
                              ad.NoiseSpec(offset=offset))):
        path = tmp_path / "s.safetensors"
        ck.save_file({"w": torch.ones(1)}, path, spec, metadata=dict(KOHYA, ss_noise_offset="None"))
        meta = ck.read_safetensors_metadata(path)
        assert ck.load_spec_from_safetensors(path) == spec
        kohya_only = {k: v for k, v in meta.items() if not k.startswith("anisodiff_")}
        assert ck.noise_from_metadata(kohya_only).spec == kohya_part
    assert meta["ss_noise_offset"] == "0.05" and meta["ss_noise_offset_random_strength"] == "True"


@pytest.mark.parametrize("key,value,parent", [("ss_adaptive_noise_scale", "0.00357", "ss_noise_offset"),
                                              ("ss_ip_noise_gamma_random_strength", "True", "ss_ip_noise_gamma")])
def test_kohya_flags_without_an_equivalent_are_refused_or_left_out(key, value, parent):
    meta = {**KOHYA, key: value, "ss_ip_noise_gamma": "0.1"}
    with pytest.raises(ValueError, match=key):
        ck.noise_from_metadata(meta)
    with pytest.warns(RuntimeWarning, match=key):
        noise = ck.noise_from_metadata(meta, strict=False)
    assert noise.spec == ad.NoiseSpec(offset=ad.OffsetNoise(0.0357)) and noise.input_perturbation == 0.1
    with pytest.raises(ValueError, match=key):          # writing one would claim what the spec is not
        ck.noise_metadata(SPEC, input_perturbation=0.1, metadata={key: value})
    # kohya ignores the flag when the one it modifies is off: so do we
    off = ck.noise_from_metadata({**meta, parent: "None"})
    assert (off.spec.offset is None) == (parent == "ss_noise_offset")
    assert (off.input_perturbation == 0.0) == (parent == "ss_ip_noise_gamma")


def test_kohya_offset_with_pyramid_noise_has_no_equivalent():
    meta = {**KOHYA, "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.4"}
    with pytest.raises(ValueError, match="ss_noise_offset.*one std"):
        ck.noise_from_metadata(meta)
    with pytest.warns(RuntimeWarning, match="ss_noise_offset"):
        assert ck.noise_from_metadata(meta, strict=False).spec == ad.NoiseSpec(spectral=ad.PyramidNoise(6, 0.4))


def test_metadata_that_contradicts_the_spec_is_refused():
    with pytest.raises(ValueError, match="ss_noise_offset.*disagrees"):
        ck.noise_metadata(SPEC, metadata={"ss_noise_offset": "0.05"})
    with pytest.raises(ValueError, match="ss_noise_offset.*no such part"):
        ck.noise_metadata(ad.NoiseSpec(), metadata={"ss_noise_offset": "0.05"})
    with pytest.raises(ValueError, match="ss_ip_noise_gamma.*disagrees"):
        ck.noise_metadata(SPEC, input_perturbation=0.2, metadata={"ss_ip_noise_gamma": "0.1"})
    assert ck.noise_metadata(SPEC, metadata={"ss_noise_offset": "0.10"})["ss_noise_offset"] == "0.1"
    edited = {**ck.noise_metadata(SPEC), "ss_noise_offset": "0.2"}    # the file edited after saving
    with pytest.raises(ValueError, match="ss_noise_offset.*disagrees"):
        ck.noise_from_metadata(edited)
    with pytest.raises(TypeError, match="metadata"):
        ck.noise_metadata(SPEC, metadata={"ss_seed": 42})
    with pytest.raises(ValueError, match="input_perturbation"):
        ck.noise_metadata(SPEC, input_perturbation=-0.1)
    with pytest.raises(TypeError, match="spec"):
        ck.noise_metadata(SPEC.to_dict())


def test_unreadable_metadata_gives_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    path.write_text("this is a text file, not a checkpoint")
    with pytest.raises(ValueError, match="x.safetensors.*larger than|x.safetensors: not a safetensors"):
        ck.load_spec_from_safetensors(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than the 8-byte"):
        ck.read_safetensors_metadata(path)
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="larger than 100000000"):
        ck.read_safetensors_metadata(path)
    path.write_bytes((50).to_bytes(8, "little") + b'{"__metadata__": {}}')
    with pytest.raises(ValueError, match="truncated"):
        ck.read_safetensors_metadata(path)
    for header, message in ((b"[1, 2]", "not a JSON object"), (b"{\"a\": ", "header is not JSON"),
                            (b'{"__metadata__": {"k": 1}}', "strings to strings")):
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match=message):
            ck.read_safetensors_metadata(path)
    _save_plain(path, {"ss_seed": "42"})
    with pytest.raises(ValueError, match="x.safetensors: metadata: no noise settings"):
        ck.load_spec_from_safetensors(path)
    _save_plain(path, {ck.SPEC_KEY: '{"format": "anisodiff.NoiseSpec", "spectral": {"type": "zigzag"}}'})
    with pytest.raises(ValueError, match="anisodiff_noise_spec.*spectral.type"):
        ck.load_spec_from_safetensors(path)
    _save_plain(path, {ck.SPEC_KEY: "{not json"})
    with pytest.raises(ValueError, match="anisodiff_noise_spec.*not valid JSON"):
        ck.load_spec_from_safetensors(path)
    monkeypatch.setattr(ck, "MAX_JSON_BYTES", 64)           # the cap on the spec's JSON, both ways
    with pytest.raises(ValueError, match="larger than"):
        ck.noise_metadata(SPEC)
    _save_plain(path, {ck.SPEC_KEY: SPEC.to_json()})
    with pytest.raises(ValueError, match="anisodiff_noise_spec.*larger than"):
        ck.load_spec_from_safetensors(path)
