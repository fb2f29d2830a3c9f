"""fused_spectral_slabs128 (noise_spectral_pow2.cu), 128 x 128 planes as four
32-row slabs of a cluster per complex plane, run by the host emulator against the CPU kernel."""
import pytest
import torch

from conftest import requires_compiled
from test_cpu_kernel import make_spec
from test_cuda_emulated import STREAM, check_pair, emu, kernel_common, order_fixture  # noqa: F401

pytestmark = requires_compiled
SLABS = "fused_spectral_slabs128"
order = order_fixture()

CASES = [  # (shape, kind, k, normalize)
    ((1, 4, 128, 128), "sdm+pl_pos", 1, "calibrated"),   # SDXL latents: C = 4 compiled in
    ((1, 3, 128, 128), "hdm+band", 2, "per_sample"),     # odd C at run time: the second plane half empty
    ((1, 1, 128, 128), "pl_neg", 1, "per_sample"),       # one plane, no squeeze: KA = 0
]


@pytest.mark.parametrize("shape,kind,k,normalize", CASES, ids=[f"{c[1]}-{c[3]}-C{c[0][1]}" for c in CASES])
def test_slabs_against_cpu(emu, order, schedule, shape, kind, k, normalize):
    spec = make_spec(kind, shape[1], k=k, normalize=normalize)
    common = kernel_common(spec, shape, schedule, [700])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for target in (0, 1):
        a = emu.add_noise(x, *common, target, STREAM, None)
        assert emu.last_kernel().startswith(SLABS), emu.last_kernel()
        b = torch.ops.anisodiff.add_noise(x, *common, target, STREAM, None)
        check_pair(a[0], b[0], torch.float32)
        check_pair(a[1], b[1], torch.float32)


def test_slabs_batch_dtypes_and_shaped_noise(emu, order, schedule):
    """Two samples (their own clusters, timesteps and stream offsets), fp16 / bf16 I/O (C = 4 in bf16 is
    compiled in, fp16 switched), and shaped_noise."""
    shape = (2, 4, 128, 128)
    spec = make_spec("sdm+pl_neg", 4, k=2, normalize="calibrated")
    common = kernel_common(spec, shape, schedule, [999, 40])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    for dtype, name in ((torch.bfloat16, ",CK=4,dtype=bf16>"), (torch.float16, ",CK=0>")):
        a = emu.add_noise(x.to(dtype), *common, 2, STREAM, None)
        assert emu.last_kernel().startswith(SLABS) and emu.last_kernel().endswith(name), emu.last_kernel()
        b = torch.ops.anisodiff.add_noise(x.to(dtype), *common, 2, STREAM, None)
        check_pair(a[0], b[0], dtype)
        check_pair(a[1], b[1], dtype)
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    assert emu.last_kernel().startswith(SLABS)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    check_pair(a, b, torch.float32)
    # a sample alone gives what it gives in its batch, bit for bit (a cluster per sample, no pairing)
    one = emu.add_noise(x[1:2].clone(), common[0][1:2], *common[1:], 2,
                        STREAM + torch.tensor([0, 4 * 128 * 128 // 4]), None)
    full = emu.add_noise(x, *common, 2, STREAM, None)
    assert torch.equal(one[0][0], full[0][1]) and torch.equal(one[1][0], full[1][1])


def test_slabs_video(emu, order, schedule):
    """[B, C, F, H, W]: a cluster per frame, with its sample's timestep and its own stream offset."""
    shape = (1, 2, 2, 128, 128)
    spec = make_spec("pl_pos", 2, k=1, normalize="per_sample")
    common = kernel_common(spec, (1, 2, 128, 128), schedule, [500])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    assert emu.last_kernel().startswith(SLABS)
    b = torch.ops.anisodiff.add_noise(x0, *common, 1, STREAM, None)
    check_pair(a[0], b[0])
    check_pair(a[1], b[1])


def plan(emu, B, C=4, H=128, W=128, spectral=True, draws=1, norm=False, k=1, **kw):  # noqa: F811
    return __import__("json").loads(emu.plan(B, C, H, W, spectral, draws, norm, k, **kw))


def test_slabs_planner_choice(emu, monkeypatch):
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.delenv("ANISODIFF_CUDA_CLUSTER", raising=False)
    p = plan(emu, 3)
    assert p["kernel"] == "fused_spectral_slabs128<KA=2,CK=4,dtype=fp32>", p
    assert (p["grid"], p["block"], p["cluster"]) == (3 * 8, 512, 8)
    assert plan(emu, 3, C=3)["kernel"] == "fused_spectral_slabs128<KA=2,CK=0>"
    assert plan(emu, 3, C=1)["cluster"] == 4
    assert plan(emu, 3, k=0)["kernel"].startswith("fused_spectral_slabs128<KA=0,")
    assert plan(emu, 3, spectral=False, norm=True)["kernel"].startswith(SLABS)  # normalisation alone
    for why, kw in [("two draws", dict(draws=2)), ("k = 3", dict(k=3)), ("5 channels", dict(C=5)),
                    ("64 x 64", dict(H=64, W=64)), ("128 x 64", dict(W=64)), ("the perturbation", dict(perturb=0.3)),
                    ("the step", dict(step=True, step_k=1))]:
        assert not plan(emu, 3, **kw)["kernel"].startswith(SLABS), why
    for forced in ("fused_general", "two_pass"):
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", forced)
        assert not plan(emu, 3)["kernel"].startswith(SLABS), forced
