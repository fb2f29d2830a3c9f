"""The README's code blocks run as pasted, in order, and the docs point only at files that exist.

Every fenced block of README.md with a language is handled:

* ``python``: executed in ONE namespace, in the order of the README (a later block sees what an
  earlier one defined, as a reader pasting them into one session would), in a temporary folder.
  Names the README leaves to the reader (``model``, ``loader``, ``clean_images``, ``sigmas``,
  ``net``, ``rnd``, ``edm_sampler``) get tiny stand-ins, and so do packages that are not installed
  (``k_diffusion``): :data:`STAND_INS` lists them.
* ``diff``: its added lines are executed (the README shows them as a change to a training script).
* ``bash``: the commands are run in a shell in the same folder, except the install-and-run blocks
  of "Two commands", which take minutes: those are checked to name scripts and commands that exist,
  and ``.ci/run`` runs the test command itself.

Blocks without a language (program output, the layout) are text. Also: every relative link and
every path under ``docs/``, ``scripts/``, ``benchmarks/`` or ``examples/`` that README.md and docs/*.md
name exists, and none of them points outside the repository; docs/papers.md's table of bins per band
is recounted from ``anisodiff.reference.radius``.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import types

import pytest
import torch

import anisodiff as ad

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)

needs_ops = pytest.mark.skipif(not ad.build_info()["cpu"], reason="needs the compiled CPU ops")
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="the README's diffusers blocks need diffusers")


def readme_blocks() -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block of README.md, in order."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


# ---------------------------------------------------------------------------------------------
# stand-ins for what the README leaves to the reader
# ---------------------------------------------------------------------------------------------
def _eps_model(x, t):
    """A noise-prediction model: predicts zero noise."""
    return torch.zeros_like(x)


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def _k_diffusion_stub() -> types.ModuleType:
    """``k_diffusion.sampling.sample_euler_ancestral`` (eta = 1), enough to run the README's call."""
    def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               eta=1.0, s_noise=1.0, noise_sampler=None):
        noise_sampler = noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = model(x, sigma * x.new_ones([x.shape[0]]))
            sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                              / sigma ** 2) ** 0.5)
            sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
            if sigma_next > 0:
                x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        return x

    module = types.ModuleType("k_diffusion")
    module.sampling = types.SimpleNamespace(sample_euler_ancestral=sample_euler_ancestral)
    return module


class _StackedRandomGenerator:
    """EDM's ``StackedRandomGenerator`` (one generator per sample), for ``rnd``."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, size, **kwargs):
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


def _edm_sampler(net, latents, randn_like=torch.randn_like, num_steps=3, sigma_min=0.002,
                 sigma_max=80, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """EDM's ``edm_sampler`` loop (Euler steps with churn), calling ``randn_like`` as EDM does."""
    sigmas = torch.linspace(sigma_max, sigma_min, num_steps).tolist() + [0.0]
    x = latents.double() * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(S_churn / num_steps, 2 ** 0.5 - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise * randn_like(x)
        d = (x - net(x, t_hat)) / t_hat
        x = x + (t_next - t_hat) * d
    return x


def _loader():
    images = torch.utils.data.TensorDataset(torch.rand(32, 3, 16, 16) * 2 - 1)
    return torch.utils.data.DataLoader(images, batch_size=8)


# name -> (the block needs it when its code contains one of these, a factory)
STAND_INS = {
    "model": (("model(", "sample_euler_ancestral(model"), lambda: _eps_model),
    "loader": ("fit_statistics(loader", _loader),
    "clean_images": ("clean_images", lambda: torch.rand(4, 3, 8, 8) * 2 - 1),
    "timesteps": ("clean_images, timesteps", lambda: torch.randint(0, 1000, (4,))),
    # (k-diffusion's VE sigmas; the flow-matching blocks define their own)
    "sigmas": ("sample_euler_ancestral(", lambda: torch.tensor([10.0, 2.0, 0.5, 0.0])),
    "net": ("edm_sampler(net", lambda: (lambda x, sigma: torch.zeros_like(x))),
    "rnd": ("rnd.", lambda: _StackedRandomGenerator(range(16))),
    "edm_sampler": ("edm_sampler(", lambda: _edm_sampler),
}
# blocks whose `model` is a diffusers UNet (a pipeline's unet=), not a noise-prediction function
UNET_BLOCK = "AnisoDDPMPipeline(unet=model"


def _python_code(lang: str, code: str) -> str:
    if lang == "diff":  # the lines the README adds to the training script
        return "\n".join(line[1:] for line in code.splitlines() if line.startswith("+"))
    return code


def _make_images(folder: pathlib.Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")


def _run_bash(code: str, cwd: pathlib.Path, line: int) -> None:
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in code.splitlines():
        command = command.split("#", 1)[0].strip()
        if not command:
            continue
        words = shlex.split(command)
        for i, word in enumerate(words):  # a folder of images where the README names one
            if word.startswith("path/to/") and not (cwd / word).exists():
                _make_images(cwd / word)
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (f"README line {line}: `{command}` failed ({done.returncode}):\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def _check_install_block(code: str, line: int) -> None:
    """The "Two commands" blocks: the scripts exist, the commands parse; CI runs the test command."""
    ci = (ROOT / ".ci" / "run").read_text()
    for command in filter(None, (c.split("#", 1)[0].strip() for c in code.splitlines())):
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[0] == "bash":
                assert (ROOT / words[1]).is_file(), f"README line {line}: {words[1]} does not exist"
            elif words[0] == "anisodiff":
                from anisodiff import cli

                cli.build_parser().parse_args(words[1:])
            elif words[:3] == ["python3", "-m", "pytest"]:
                assert "python3 -m pytest" in ci, "CI no longer runs the README's test command"
            else:
                raise AssertionError(f"README line {line}: unexpected command {part!r}")
    assert "bash scripts/install.sh --dev" in ci, "CI no longer runs the README's install command"


@needs_ops
@needs_diffusers
def test_every_readme_block_runs_in_order(tmp_path, monkeypatch):
    blocks = [b for b in readme_blocks() if b[0]]
    assert {lang for lang, _, _ in blocks} <= {"python", "bash", "diff"}, "a new kind of block"
    assert sum(lang == "python" for lang, _, _ in blocks) >= 6
    monkeypatch.chdir(tmp_path)
    if importlib.util.find_spec("k_diffusion") is None:
        monkeypatch.setitem(sys.modules, "k_diffusion", _k_diffusion_stub())
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits (conftest restores it)
    namespace: dict = {"__name__": "__readme__", "k_diffusion": sys.modules.get("k_diffusion")}
    ran = []
    for lang, code, line in blocks:
        if lang == "bash":
            if "scripts/install.sh" in code:
                _check_install_block(code, line)
            else:
                _run_bash(code, tmp_path, line)
            ran.append(line)
            continue
        source = _python_code(lang, code)
        for name, (triggers, make) in STAND_INS.items():
            triggers = (triggers,) if isinstance(triggers, str) else triggers
            if any(t in source for t in triggers) and not re.search(rf"^\s*{name}\s*=", source, re.M):
                namespace[name] = make()
        if UNET_BLOCK in source:
            namespace["model"] = _tiny_unet()
        try:
            exec(compile(source, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the README block at line {line} fails as pasted: "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran.append(line)
    assert len(ran) == len(blocks)
    assert (tmp_path / "noise.json").is_file() and (tmp_path / "my_model").is_dir()


# ---------------------------------------------------------------------------------------------
# the docs stand alone
# ---------------------------------------------------------------------------------------------
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`((?:docs|scripts|benchmarks|examples|tests|anisodiff|csrc)/[\w./-]*\w)`")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_docs_point_only_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "shared/" not in text and "DESIGN.md" not in text and "research/" not in text
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (page.parent / target).resolve()
        assert ROOT in path.parents or path == ROOT, f"{page.name}: {target} is outside the repository"
        assert path.exists(), f"{page.name}: the link {target} points at nothing"
    for target in PATH.findall(text):
        if "*" in target or "<" in target:
            continue
        if page != README and target.startswith("benchmarks/results/"):
            continue  # docs/ may name the record a GPU run will write (docs/cuda.md)
        assert (ROOT / target).exists(), f"{page.name}: `{target}` does not exist"


def test_papers_band_table_is_the_bin_count():
    from anisodiff.reference import radius

    text = (ROOT / "docs" / "papers.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[(\d\.\d), (\d\.\d)\] \| (\d+) \| (\d+) \| (\d+) \|$", text, re.M)
    assert len(rows) == 8
    for a, b, *counts in rows:
        a, b = float(a), float(b)
        for convention, count in zip(("cycles", "nyquist1", "rmax1"), counts):
            r = radius(32, 32, convention)
            assert int(((r >= a - 1e-9) & (r <= b + 1e-9)).sum()) == int(count), (a, b, convention)


def test_backends_feature_table_matches_autoselect():
    """README "Backends": the feature table says what anisodiff._autoselect.BACKEND_FEATURES says."""
    from anisodiff import _autoselect

    rows = {"video tensors": "frames", "`input_perturbation=`": "perturb",
            "spatio-temporal spectrum": "temporal"}
    text = README.read_text()
    header = re.search(r"^\| feature \| (.+) \|$", text, re.M)
    assert header, "README: the backends' feature table is missing"
    backends = [b.strip() for b in header.group(1).split("|")]
    seen = set()
    for line in text[header.end():].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        feature = next(f for key, f in rows.items() if cells[0].startswith(key))
        seen.add(feature)
        for backend, cell in zip(backends, cells[1:]):
            has = feature in _autoselect.BACKEND_FEATURES[backend]
            assert cell == ("yes" if has else "not yet"), f"README: {backend} / {feature} says {cell!r}"
    assert seen == set(_autoselect.FEATURES)
