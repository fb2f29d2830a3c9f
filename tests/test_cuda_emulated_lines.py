"""fused_spectral_lines32 (csrc/cuda/noise_spectral_lines.cu), the whole-line fused spectral kernel for
32 x 32 planes on large batches, run by the host emulator (tests/cuda_emulation) against the CPU kernel.

A block takes two slices: their 2 C real planes as C complex planes, one warp each, a whole line per
thread in registers. Covered: C = 1 .. 8 (odd C pairs channels across the two slices), an odd slice
count (the last block's second slice empty), power laws / bands / HDM, k = 0 / 1 / 2, per-sample
normalisation (with and without spectral weights), a huge DC weight, add_noise targets and
shaped_noise, fp32 / fp16 / bf16, 5-D video (slices of different samples in one block), and the
planner's choice (which problems take it, the batch threshold, the overrides).
"""
import json

import pytest
import torch

import anisodiff as ad
from conftest import requires_compiled
from test_cpu_kernel import make_spec
from test_cuda_emulated import order_fixture, STREAM, check_pair, emu, kernel_common  # noqa: F401

pytestmark = requires_compiled
LINES = "fused_spectral_lines32"


order = order_fixture("fused_lines32")


def ran_lines(emu):  # noqa: F811
    assert emu.last_plan()[0] == "fused" and emu.last_kernel().startswith(LINES), emu.last_kernel()


def against_cpu(emu, shape, spec, schedule, t, dtypes=(torch.float32,)):  # noqa: F811
    common = kernel_common(spec, shape, schedule, t)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for dtype in dtypes:
        x0 = x.to(dtype)
        for target in (0, 1, 2):
            a = emu.add_noise(x0, *common, target, STREAM, None)
            ran_lines(emu)
            b = torch.ops.anisodiff.add_noise(x0, *common, target, STREAM, None)
            check_pair(a[0], b[0], dtype)
            check_pair(a[1], b[1], dtype)
    return common


CASES = [  # (shape, kind, k, normalize)
    ((2, 3, 32, 32), "sdm+pl_pos", 1, "calibrated"),   # C = 3 compiled in: channel 2 pairs with the next slice's 0
    ((3, 3, 32, 32), "hdm+band", 2, "per_sample"),     # 3 slices: the second block's second slice is empty
    ((1, 4, 32, 32), "pl_neg", 2, "calibrated"),       # C = 4 at run time, one slice
    ((2, 1, 32, 32), "band", 1, "per_sample"),         # grayscale: one warp, the two slices' planes as one
    ((3, 5, 32, 32), "sdm+two_shared", 2, "calibrated"),  # odd C at run time
    ((2, 8, 32, 32), "pl_pos", 1, "per_sample"),       # the most warps per block (256 threads); no squeeze: KA = 0
]


@pytest.mark.parametrize("shape,kind,k,normalize", CASES,
                         ids=[f"{c[1]}-{c[3]}-{'x'.join(map(str, c[0]))}" for c in CASES])
def test_lines_against_cpu(emu, order, schedule, shape, kind, k, normalize):
    spec = make_spec(kind, shape[1], k=k, normalize=normalize)
    common = against_cpu(emu, shape, spec, schedule, [999, 3, 500])
    ck = "CK=3" if shape[1] == 3 else "CK=0"
    ka = 0 if spec.squeeze is None or k == 0 else 2
    assert f"KA={ka},{ck}" in emu.last_kernel(), emu.last_kernel()
    if shape[1] == 3:
        assert emu.last_kernel().endswith(",dtype=fp32>")
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    ran_lines(emu)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    check_pair(a, b, torch.bfloat16)


def test_lines_fp16_and_bf16_io(emu, order, schedule):
    """The C = 3 variants compiled per dtype."""
    spec = make_spec("sdm+pl_neg", 3, k=1)
    against_cpu(emu, (2, 3, 32, 32), spec, schedule, [999, 3], (torch.float16, torch.bfloat16))
    assert emu.last_kernel().endswith(",dtype=bf16>"), emu.last_kernel()


def test_lines_per_sample_normalisation_without_weights(emu, order, schedule):
    """Per-sample normalisation alone (no FFT): the white planes' statistics."""
    spec = make_spec("sdm", 3, k=2, normalize="per_sample")
    against_cpu(emu, (3, 3, 32, 32), spec, schedule, [999, 3, 500])


def test_lines_huge_dc_weight(emu, order, schedule):
    """PowerLaw(-1): 1e10 on the DC bin, added after the inverse as w(0) mean(e) (the white planes'
    means in double) and left out of the per-sample statistics, as the CPU kernel."""
    spec = ad.NoiseSpec(None, ad.PowerLaw(-1.0), normalize="per_sample")
    common = kernel_common(spec, (2, 2, 32, 32), schedule, [999, 3])
    assert float(common[3][0, 0, 0]) > 1e9
    a = emu.shaped_noise([2, 2, 32, 32], *common, STREAM, None, torch.float32)
    ran_lines(emu)
    b = torch.ops.anisodiff.shaped_noise([2, 2, 32, 32], *common, STREAM, None, torch.float32)
    check_pair(a, b)


def test_lines_video(emu, order, schedule):
    """[B, C, F, H, W] with an odd F: a block's two slices may be frames of different samples (their
    own timesteps and stream offsets)."""
    shape = (2, 3, 3, 32, 32)
    spec = make_spec("sdm+pl_pos", 3, k=1, normalize="per_sample")
    common = kernel_common(spec, (2, 3, 32, 32), schedule, [999, 3])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    ran_lines(emu)
    b = torch.ops.anisodiff.add_noise(x0, *common, 1, STREAM, None)
    check_pair(a[0], b[0])
    check_pair(a[1], b[1])


def test_lines_equals_pow2_kernel(emu, schedule, monkeypatch):
    """The whole-line kernel and fused_spectral_pow2 filter the same noise (float rounding); a sample
    depends on its block partner only through rounding (T_w is real: the paired parts separate)."""
    shape = (4, 3, 32, 32)
    spec = make_spec("hdm+band", 3, k=2, normalize="per_sample")
    common = kernel_common(spec, shape, schedule, [999, 3, 500, 20])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_lines32")
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    ran_lines(emu)
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_pow2")
    b = emu.add_noise(x0, *common, 1, STREAM, None)
    assert emu.last_kernel().startswith("fused_spectral_pow2<")
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_lines32")
    one = emu.add_noise(x0[1:2].clone(), common[0][1:2], *common[1:], 1,
                        STREAM + torch.tensor([0, 3 * 32 * 32 // 4]), None)  # sample 1 alone (no partner)
    torch.testing.assert_close(one[0][0], a[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[1][0], a[1][1], rtol=1e-5, atol=1e-5)


def plan(emu, B, C=3, H=32, W=32, spectral=True, draws=1, norm=False, k=1, **kw):  # noqa: F811
    return json.loads(emu.plan(B, C, H, W, spectral, draws, norm, k, **kw))


def test_lines_planner_choice_and_overrides(emu, monkeypatch):
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.delenv("ANISODIFF_CUDA_CLUSTER", raising=False)
    # the emulator has 4 SMs: the whole-line kernel from 8 x 4 = 32 warps (C warps per two slices)
    big = plan(emu, 22)  # 11 blocks of 3 warps
    assert big["kernel"] == "fused_spectral_lines32<KA=2,CK=3,dtype=fp32>", big
    assert (big["grid"], big["block"], big["cluster"]) == (11, 96, 1)
    assert big["smem_bytes"] == 3 * 32 * 33 * 8 + 48
    assert plan(emu, 20)["kernel"].startswith("fused_spectral_pow2<"), "10 blocks of 3 warps: 30 < 32"
    assert plan(emu, 22, k=0)["kernel"] == "fused_spectral_lines32<KA=0,CK=3,dtype=fp32>"
    assert plan(emu, 22, dtype=torch.bfloat16)["kernel"].endswith(",dtype=bf16>")
    assert plan(emu, 16, C=4)["kernel"] == "fused_spectral_lines32<KA=2,CK=0>"  # 8 blocks of 4 warps
    assert plan(emu, 22, spectral=False, norm=True)["kernel"].startswith(LINES)  # normalisation alone
    # what it does not run: the general kernels take these
    for why, kw in [("two draws", dict(draws=2)), ("k = 3", dict(k=3)), ("9 channels", dict(C=9)),
                    ("64 x 64", dict(H=64, W=64)), ("32 x 64", dict(W=64)), ("the perturbation", dict(perturb=0.3)),
                    ("the step", dict(step=True, step_k=1))]:
        assert not plan(emu, 64, **kw)["kernel"].startswith(LINES), why
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_lines32")
    assert plan(emu, 1)["kernel"].startswith(LINES)
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_pow2")
    assert plan(emu, 64)["kernel"].startswith("fused_spectral_pow2<")
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_general")
    assert plan(emu, 64)["kernel"].startswith("fused_spectral<")
    monkeypatch.delenv("ANISODIFF_CUDA_PATH")
    monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", "2")
    assert plan(emu, 64)["kernel"].startswith("fused_spectral<")


def test_lines_leaves_caller_noise_and_strided_tensors_to_the_others(emu, schedule, monkeypatch):
    """Caller noise (eps given) and tensors without vectorised I/O: never the whole-line kernel, even
    when forced (its inputs are the stream and aligned quads)."""
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_lines32")
    shape = (2, 3, 32, 32)
    spec = make_spec("sdm+pl_pos", 3, k=1)
    common = kernel_common(spec, shape, schedule, [999, 3])
    eps = torch.randn((1, *shape), generator=torch.Generator().manual_seed(5))
    a = emu.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    assert not emu.last_kernel().startswith(LINES)
    check_pair(a, torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, eps, torch.float32))
    x0 = torch.zeros(2, 3, 32, 64)[..., ::2]
    x0.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(4)))
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    assert not emu.last_kernel().startswith(LINES)
    b = torch.ops.anisodiff.add_noise(x0, *common, 1, STREAM, None)
    check_pair(a[0], b[0])
    check_pair(a[1], b[1])

