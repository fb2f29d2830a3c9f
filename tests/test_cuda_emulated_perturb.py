"""Input perturbation (DDPM-IP) in the CUDA kernels, run by the host emulator (tests/cuda_emulation).

``add_noise(..., perturb=g)``: x_t = a x0 + b (n + g n'), the target from n alone, n' = A(t) eps' with
eps' draw d of the stream in counter word 2 = D + d (also when the caller gives eps). Every CUDA path
against the CPU kernel (tested against reference.py in tests/test_input_perturbation.py) and, for most
cases, reference.py itself on the same stream: the straight-line add_noise_fast<C, k> (C in 1, 3, 4,
16; k in 0, 1, 2), the general elementwise kernel (k > 2, C outside the fast set, odd planes,
channels_last / strided, caller noise, 5-D), the fused spectral cluster kernel and the two-pass path
(forced), two-draw specs, fp32 / bf16. n' is checked on its own against A(t) of the stream's draws
D + d, and against the wrong draws (those of n, and D + d + 1), so a wrong counter word fails; with
g = 0 the outputs are bit for bit those of the call without a perturbation.
"""
import json

import pytest
import torch

import anisodiff as ad
from anisodiff import reference as R
from conftest import random_axes, requires_compiled
from test_cpu_kernel import close
from test_cpu_kernel import make_spec as cpu_make_spec
from test_cuda_emulated import DTYPE_NAMES, order_fixture, STREAM, check_pair, emu, kernel_common, layout  # noqa: F401

pytestmark = requires_compiled

SEED, OFFSET = int(STREAM[0]), int(STREAM[1])
GAMMA = 0.5
TS = [999, 3, 500]
TARGETS = ["epsilon", "v", "x0", "flow"]


order = order_fixture()


def make_spec(kind, C, k=1, normalize="calibrated"):
    """test_cpu_kernel's specs; k > 2 (the kernels' 8-axis variants) for the SDM squeeze."""
    if k > 2:
        assert kind == "sdm"
        return ad.NoiseSpec(ad.Squeeze(random_axes(C, k, seed=C * 10 + k), -0.4), normalize=normalize)
    return cpu_make_spec(kind, C, k=k, normalize=normalize)


def force_path(monkeypatch, path, cluster=None):
    """path "fused" is the cluster kernel fused_spectral (power-of-two planes would take
    fused_spectral_pow2, which has its own tests), "two_pass" the two-pass path."""
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.delenv("ANISODIFF_CUDA_CLUSTER", raising=False)
    if path in ("two_pass", "fused"):
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass" if path == "two_pass" else "fused_general")
    if cluster:
        monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", str(cluster))


def expect_path(emu, path):  # noqa: F811
    assert emu.last_plan()[0] == path


def plane_shape(shape):
    """[B, C, H, W] of a 4-D or 5-D shape (the kernels' coefficient tables do not depend on F)."""
    return (shape[0], shape[1], shape[-2], shape[-1])


def check_case(emu, spec, schedule, x0, target, path, noise=None, reference=True):  # noqa: F811
    """The emulated op against the CPU kernel (and reference.py) with and without the perturbation."""
    common = kernel_common(spec, plane_shape(x0.shape), schedule, TS)
    code = TARGETS.index(target)
    got = emu.add_noise(x0, *common, code, STREAM, noise, GAMMA)
    expect_path(emu, path)
    cpu = torch.ops.anisodiff.add_noise(x0, *common, code, STREAM, noise, GAMMA)
    check_pair(got[0], cpu[0], x0.dtype)
    check_pair(got[1], cpu[1], x0.dtype)
    if reference:
        ref = R.add_noise(x0, common[0], spec, schedule, noise=None if noise is None else
                          (noise[0] if spec.draws == 1 else noise), seed=SEED, offset=OFFSET, target=target,
                          input_perturbation=GAMMA)
        close(got[0], ref[0], x0.dtype)
        close(got[1], ref[1], x0.dtype)
    # perturb = 0: the call without a perturbation, bit for bit; the target never depends on it
    plain = emu.add_noise(x0, *common, code, STREAM, noise)
    zero = emu.add_noise(x0, *common, code, STREAM, noise, 0.0)
    assert torch.equal(zero[0], plain[0]) and torch.equal(zero[1], plain[1])
    assert torch.equal(got[1], plain[1])
    assert (got[0].float() - plain[0].float()).abs().max() > 0.05  # the perturbation is there
    return got


# -- elementwise: the straight-line kernel add_noise_fast<C, k> (the shapes it takes unperturbed) -----
FAST = [  # (C, kind, k, dtype, target)
    (1, "iso", 0, torch.float32, "epsilon"),
    (1, "sdm", 1, torch.bfloat16, "v"),
    (3, "iso", 0, torch.bfloat16, "flow"),
    (3, "sdm", 1, torch.float32, "epsilon"),
    (3, "sdm_pos", 2, torch.float32, "x0"),
    (4, "iso", 0, torch.float32, "v"),
    (4, "sdm_linear", 1, torch.bfloat16, "epsilon"),
    (4, "hdm", 2, torch.float32, "flow"),
    (16, "iso", 0, torch.float32, "epsilon"),
    (16, "sdm", 1, torch.float32, "v"),
    (16, "hdm", 2, torch.bfloat16, "epsilon"),
]


@pytest.mark.parametrize("C,kind,k,dtype,target", FAST,
                         ids=[f"C{c[0]}-{c[1]}-k{c[2]}-{str(c[3])[6:]}-{c[4]}" for c in FAST])
def test_fast_kernel(emu, order, schedule, monkeypatch, C, kind, k, dtype, target):  # noqa: F811
    force_path(monkeypatch, None)
    shape = (3, C, 4, 12)
    plan = json.loads(emu.plan(*shape, False, 1, False, k, dtype=dtype, perturb=GAMMA))
    # the perturbed fast kernel only where its registers suffice (C k <= 6), else the general one
    dt = DTYPE_NAMES[dtype]
    want = (f"add_noise_fast<CK={C},KK={k},pert=1,dtype={dt}>" if C * k <= 6 else
            f"add_noise_elementwise<K={4 if C <= 4 else 16},KA=2,vec=1>")
    assert plan["kernel"] == want and plan["perturbed"], plan
    plain = json.loads(emu.plan(*shape, False, 1, False, k, dtype=dtype))
    assert plain["kernel"] == f"add_noise_fast<CK={C},KK={k},pert=0,dtype={dt}>" and not plain["perturbed"], plain
    spec = make_spec(kind, C, k=max(k, 1))
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(C)).to(dtype)
    check_case(emu, spec, schedule, x0, target, "elementwise")


# -- elementwise: the general kernel ------------------------------------------------------------------
GENERAL = [  # (shape, kind, k, layout, dtype, target)
    ((2, 3, 7, 9), "sdm", 1, "contiguous", torch.float32, "v"),           # odd H*W: quad tails
    ((2, 4, 12, 10), "hdm", 2, "channels_last", torch.float32, "epsilon"),
    ((2, 3, 6, 5), "sdm_pos", 2, "strided", torch.bfloat16, "flow"),
    ((2, 5, 8, 8), "sdm", 3, "contiguous", torch.float32, "flow"),        # k > 2: 8-axis variant
    ((2, 6, 4, 8), "iso", 0, "contiguous", torch.float32, "epsilon"),     # C = 6, no squeeze
    ((2, 20, 4, 4), "sdm", 2, "contiguous", torch.bfloat16, "v"),         # 16 cached, 4 fetched again
]


@pytest.mark.parametrize("shape,kind,k,how,dtype,target", GENERAL,
                         ids=[f"{c[1]}-k{c[2]}-{'x'.join(map(str, c[0]))}-{c[3]}-{str(c[4])[6:]}"
                              for c in GENERAL])
def test_general_kernel(emu, order, schedule, monkeypatch, shape, kind, k, how, dtype, target):  # noqa: F811
    force_path(monkeypatch, None)
    spec = make_spec(kind, shape[1], k=max(k, 1))
    x0 = layout(torch.randn(shape, generator=torch.Generator().manual_seed(2)), how).to(dtype)
    check_case(emu, spec, schedule, x0, target, "elementwise")


def test_caller_noise_takes_the_general_kernel(emu, order, schedule, monkeypatch):  # noqa: F811
    """Caller eps: n from it, n' still from the stream (draw word D)."""
    force_path(monkeypatch, None)
    shape = (3, 4, 4, 12)
    spec = make_spec("sdm", 4)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(1, *shape, generator=torch.Generator().manual_seed(4))
    check_case(emu, spec, schedule, x0, "epsilon", "elementwise", noise=eps)


# -- spectral paths: the fused cluster kernel and the two-pass path -----------------------------------
SPECTRAL = [  # (shape, kind, k, normalize, cluster)
    ((2, 3, 16, 16), "sdm+pl_neg", 1, "calibrated", None),
    ((1, 4, 12, 10), "hdm+band", 2, "calibrated", None),           # radix 3
    ((2, 5, 7, 11), "two_indep", 1, "per_sample", None),           # odd C, primes, two draws
    ((1, 5, 16, 16), "sdm+two_indep", 1, "per_sample", 4),         # cluster-summed statistics
    ((2, 3, 9, 8), "sdm", 1, "per_sample", None),                  # normalisation without weights
    ((2, 3, 2, 12, 8), "hdm+band", 2, "per_sample", 2),            # 5-D: slices of (b, f)
]


@pytest.mark.parametrize("path", ["fused", "two_pass"])
@pytest.mark.parametrize("shape,kind,k,normalize,cluster", SPECTRAL,
                         ids=[f"{c[1]}-{c[3]}-{'x'.join(map(str, c[0]))}" for c in SPECTRAL])
def test_spectral_paths(emu, order, schedule, monkeypatch, path, shape, kind, k, normalize, cluster):  # noqa: F811
    force_path(monkeypatch, path, cluster if path == "fused" else None)
    spec = make_spec(kind, shape[1], k=k, normalize=normalize)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    check_case(emu, spec, schedule, x0, "v", path)
    check_case(emu, spec, schedule, x0.to(torch.bfloat16), "epsilon", path, reference=False)


@pytest.mark.parametrize("path", ["fused", "two_pass"])
def test_spectral_caller_noise_two_draws(emu, order, schedule, monkeypatch, path):  # noqa: F811
    force_path(monkeypatch, path)
    shape = (2, 3, 12, 10)
    spec = make_spec("sdm+two_indep", 3, normalize="per_sample")
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    eps = torch.randn(2, *shape, generator=torch.Generator().manual_seed(7))
    check_case(emu, spec, schedule, x0, "flow", path, noise=eps)


def test_perturbed_plans(emu):  # noqa: F811
    """The perturbed fused kernel keeps the perturbation's slab in shared memory (more per block); the
    two-pass path runs a second set of filter CTAs into a second workspace set."""
    base = json.loads(emu.plan(2, 3, 16, 16, True, 2, True, 1))
    pert = json.loads(emu.plan(2, 3, 16, 16, True, 2, True, 1, perturb=GAMMA))
    assert base["path"] == pert["path"] == "fused" and pert["perturbed"] and not base["perturbed"]
    assert pert["smem_bytes"] > base["smem_bytes"]
    big = (1, 4, 130, 130)  # two-pass without forcing it
    base = json.loads(emu.plan(*big, True, 1, False, 2))
    pert = json.loads(emu.plan(*big, True, 1, False, 2, perturb=GAMMA))
    assert base["path"] == pert["path"] == "two_pass"
    S, C, HW = big[0], big[1], big[2] * big[3]
    sets = lambda n: -(-4 * n * S * C * HW // 256) * 256 + 8 * n * S * (C // 2) * HW  # noqa: E731
    assert pert["grid"] == 2 * base["grid"]
    assert (base["workspace_bytes"], pert["workspace_bytes"]) == (sets(1), sets(2))


def test_two_pass_natural_with_perturbation(emu, schedule, monkeypatch):  # noqa: F811
    force_path(monkeypatch, None)
    monkeypatch.setenv("EMU_ORDER", "mix")
    x0 = torch.randn(1, 4, 130, 130, generator=torch.Generator().manual_seed(8))
    check_case(emu, make_spec("hdm+pl_neg", 4, k=2), schedule, x0, "epsilon", "two_pass", reference=False)


# -- n' on its own: the right draws of the stream -----------------------------------------------------
DRAW_CASES = [  # (shape, kind, k, normalize, path)
    ((2, 3, 8, 8), "sdm", 1, "calibrated", "fast"),
    ((2, 16, 4, 4), "iso", 0, "calibrated", "fast"),
    ((2, 3, 4, 8), "hdm", 2, "calibrated", "fast"),
    ((2, 16, 4, 4), "hdm", 2, "calibrated", "elementwise"),  # the general kernel (16 cached)
    ((2, 5, 7, 9), "sdm", 3, "calibrated", "elementwise"),
    ((2, 3, 16, 16), "sdm+pl_neg", 1, "calibrated", "fused"),
    ((2, 3, 16, 16), "sdm+pl_neg", 1, "calibrated", "two_pass"),
    ((2, 5, 12, 10), "sdm+two_indep", 1, "per_sample", "fused"),
    ((2, 5, 12, 10), "sdm+two_indep", 1, "per_sample", "two_pass"),
    ((2, 3, 2, 8, 8), "hdm+band", 2, "per_sample", "fused"),
]


@pytest.mark.parametrize("shape,kind,k,normalize,path", DRAW_CASES,
                         ids=[f"{c[1]}-{'x'.join(map(str, c[0]))}-{c[4]}" for c in DRAW_CASES])
def test_perturbation_uses_draws_D_plus_d(emu, schedule, monkeypatch, shape, kind, k, normalize, path):  # noqa: F811
    """With x0 = 0 and the epsilon target, (x_t / b - target) / g is n' alone: it must be A(t) of the
    stream's draws D + d (shaped by the CPU kernel from those white draws), and it is far from A(t) of
    the draws of n (d) and of the next ones (D + d + 1)."""
    force_path(monkeypatch, path)
    monkeypatch.setenv("EMU_ORDER", "rev")
    spec = make_spec(kind, shape[1], k=max(k, 1), normalize=normalize)
    common = kernel_common(spec, plane_shape(shape), schedule, [500, 200])
    D = spec.draws
    x_t, tgt = emu.add_noise(torch.zeros(shape), *common, 0, STREAM, None, GAMMA)
    assert emu.last_plan()[0] == ("elementwise" if path in ("fast", "elementwise") else path)
    if path == "fast":
        plan = json.loads(emu.plan(*plane_shape(shape), False, 1, False, k, perturb=GAMMA))
        assert plan["kernel"].startswith("add_noise_fast")
    b = common[1][common[0], 1].double().view(-1, *[1] * (len(shape) - 1))
    measured = (x_t.double() / b - tgt.double()) / GAMMA

    def shaped(first):
        white = torch.stack([R.white_noise(shape, SEED, OFFSET, draw=first + d) for d in range(D)])
        return torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, white, torch.float32).double()

    right = shaped(D)
    err = (measured - right).abs().max().item()
    assert err < 2e-4 * right.abs().max().item(), err
    for wrong in (0, D + 1):
        assert (measured - shaped(wrong)).abs().max().item() > 0.5


@pytest.mark.parametrize("shape,kind,k,normalize", [((2, 3, 16, 16), "sdm+pl_neg", 1, "calibrated"),
                                                     ((1, 4, 32, 32), "hdm+two_indep", 2, "per_sample")])
def test_planner_default_fused_kernel(emu, order, schedule, monkeypatch, shape, kind, k, normalize):  # noqa: F811
    """Power-of-two planes unforced: whichever fused kernel the planner picks takes the perturbation."""
    force_path(monkeypatch, None)
    spec = make_spec(kind, shape[1], k=k, normalize=normalize)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    check_case(emu, spec, schedule, x0, "v", "fused")
