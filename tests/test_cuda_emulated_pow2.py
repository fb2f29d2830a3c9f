"""fused_spectral_pow2 (csrc/cuda/noise_spectral_pow2.cu), the fused spectral kernel for power-of-two
planes of 256 - 4096 pixels, run by the host emulator (tests/cuda_emulation) against the CPU kernel.

One cluster per slice, one block per complex plane (channels 2q, 2q + 1), H W / 8 threads holding 8
values per in-place radix-8 / 4 / 2 pass, the epilogue through distributed shared memory. Covered: every
line length 4 - 128 (each radix sequence), odd C (a half-empty plane), C = 16 (8 blocks per cluster),
power laws / bands / HDM / two-draw specs, per-sample normalisation, the DC bin (offset noise), caller
noise, shaped_noise, add_noise targets, fp32 / fp16 / bf16, channels_last and strided tensors (the
scalar epilogue), 5-D video, ddpm_step, the input perturbation, batch independence bit for bit, and
the planner's choice (which problems take it, which stay on the general kernel).
"""
import json

import pytest
import torch

import anisodiff as ad
from conftest import random_axes, requires_compiled
from test_cpu_kernel import make_spec
from test_cuda_emulated import order_fixture, STREAM, check_dc_bin, check_pair, emu, kernel_common, layout  # noqa: F401

pytestmark = requires_compiled
POW2 = "fused_spectral_pow2"


order = order_fixture("fused_pow2")


def plan_of(emu, shape, spec, k=None, **kw):  # noqa: F811
    B, C, H, W = shape
    return json.loads(emu.plan(B, C, H, W, spec.spectral is not None, spec.draws, spec.normalize == "per_sample",
                               (spec.squeeze.k if spec.squeeze is not None else 0) if k is None else k, **kw))


def ran_pow2(emu):  # noqa: F811
    """The last launch ran fused_spectral_pow2."""
    assert emu.last_plan()[0] == "fused" and emu.last_kernel().startswith(POW2), emu.last_kernel()


def expect_pow2(emu, shape, spec):  # noqa: F811
    plan = plan_of(emu, shape, spec)
    assert plan["path"] == "fused" and plan["kernel"].startswith(POW2), plan
    P = (shape[1] + 1) // 2
    assert plan["cluster"] == P and plan["block"] == shape[2] * shape[3] // 8 and plan["grid"] == shape[0] * P
    ran_pow2(emu)


CASES = [  # (shape, kind, k, normalize): every line length and radix sequence of the pass loop
    ((2, 3, 16, 16), "pl_neg", 1, "calibrated"),       # 8 x 2 per side
    ((1, 4, 32, 32), "hdm+band", 2, "calibrated"),     # 8 x 4
    ((2, 5, 16, 32), "two_indep", 1, "per_sample"),    # odd C: a half-empty plane, two draws
    ((2, 2, 8, 32), "sdm+pl_pos", 1, "per_sample"),    # 8 rows: lines of one radix-8 stage
    ((1, 3, 64, 64), "sdm+two_indep", 1, "calibrated"),  # 8 x 8, the goal shape's planes
    ((2, 3, 32, 32), "sdm+pl_pos", 1, "calibrated"),   # the compiled-in C = 3 at 32 x 32 (images)
    ((1, 4, 64, 64), "hdm+band", 2, "per_sample"),     # the compiled-in C = 4 at 64 x 64 (SD latents)
    ((2, 1, 2, 128), "band", 1, "calibrated"),         # 128 = 8 x 8 x 2, columns of length 2
    ((2, 2, 128, 4), "pl_neg", 1, "per_sample"),       # lines of 4 (one radix-4 stage), C = 2
    ((1, 6, 32, 128), "sdm+pl_pos", 1, "calibrated"),  # 4096 pixels, run-time sizes: 512 threads
]


@pytest.mark.parametrize("shape,kind,k,normalize", CASES,
                         ids=[f"{c[1]}-{c[3]}-{'x'.join(map(str, c[0]))}" for c in CASES])
def test_pow2_against_cpu(emu, order, schedule, shape, kind, k, normalize):
    spec = make_spec(kind, shape[1], k=k, normalize=normalize)
    common = kernel_common(spec, shape, schedule, [999, 3, 500])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for target in (0, 1, 2):
        a = emu.add_noise(x0, *common, target, STREAM, None)
        b = torch.ops.anisodiff.add_noise(x0, *common, target, STREAM, None)
        check_pair(a[0], b[0])
        check_pair(a[1], b[1])
    expect_pow2(emu, shape, spec)
    fixed = {(3, 32): "LH=5,LW=5,CK=3", (4, 64): "LH=6,LW=6,CK=4"}.get((shape[1], shape[2]))
    if fixed and shape[2] == shape[3]:  # the channel count and the dtype compiled in
        assert emu.last_kernel().endswith(fixed + ",dtype=fp32>"), emu.last_kernel()
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    if fixed and shape[2] == shape[3]:
        assert emu.last_kernel().endswith(fixed + ",dtype=bf16>"), emu.last_kernel()
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    check_pair(a, b, torch.bfloat16)
    if fixed and shape[2] == shape[3]:  # fp16 x0: add_noise through the fp16 variant
        x16 = x0.half()
        a = emu.add_noise(x16, *common, 1, STREAM, None)
        assert emu.last_kernel().endswith(fixed + ",dtype=fp16>"), emu.last_kernel()
        b = torch.ops.anisodiff.add_noise(x16, *common, 1, STREAM, None)
        check_pair(a[0], b[0], torch.float16)
        check_pair(a[1], b[1], torch.float16)


@pytest.mark.parametrize("how", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pow2_layouts_and_dtypes(emu, order, schedule, how, dtype):
    """The scalar (non-vectorised) epilogue for tensors that are not plane-contiguous."""
    shape = (2, 3, 32, 16)
    spec = make_spec("hdm+band", 3, k=2)
    common = kernel_common(spec, shape, schedule, [999, 3])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    if how == "strided":  # a slice of a wider tensor: no vectorised I/O
        x0 = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype)[..., ::2]
        x0.copy_(x)
    else:
        x0 = layout(x, how)
    assert not x0.is_contiguous() and x0.dtype == dtype
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    b = torch.ops.anisodiff.add_noise(x0, *common, 1, STREAM, None)
    check_pair(a[0], b[0], dtype)
    check_pair(a[1], b[1], dtype)
    ran_pow2(emu)
    assert ",vec=0," in emu.last_kernel()  # the scalar-I/O variant


@pytest.mark.parametrize("C", [3, 16])
def test_pow2_caller_noise(emu, order, schedule, C):
    """eps given by the caller (read per element instead of the stream; odd C: the last plane's
    imaginary part is zero, never a channel past the end), and C = 16 (SD3 / Flux latents: a cluster
    of 8 blocks)."""
    shape = (1, C, 16, 16)
    spec = make_spec("sdm+pl_pos", C, k=1)
    common = kernel_common(spec, shape, schedule, [500])
    eps = torch.randn((spec.draws, *shape), generator=torch.Generator().manual_seed(5))
    a = emu.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    check_pair(a, b)
    expect_pow2(emu, shape, spec)
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    check_pair(a, b)


@pytest.mark.parametrize("dc", [0.0, 50.0, 1.0e6])
def test_pow2_dc_bin(emu, order, schedule, dc):
    """T_w e = IFFT(w' FFT(e)) + w(0) mean(e) (w' without its DC bin, the mean of the white plane in
    double): against a float64 FFT of the same noise, for a zero, a moderate and a huge DC weight (a
    mean taken from the float FFT's bin 0 fails the huge one)."""
    shape = (2, 3, 16, 16)
    common = list(kernel_common(make_spec("pl_neg", 3), shape, schedule, [999, 3]))
    weights = common[3].clone()
    weights[:, 0, 0] = dc
    common[3] = weights
    gamma = common[4][0]
    eps = torch.randn(1, *shape, generator=torch.Generator().manual_seed(9))
    out = emu.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    ran_pow2(emu)
    check_dc_bin(out, eps[0], weights[0], gamma, dc)


@pytest.mark.parametrize("path", ["fused_pow2", "fused_general", "two_pass"])
def test_huge_dc_weight_with_per_sample_normalisation(emu, schedule, monkeypatch, path):
    """PowerLaw(-1) puts 1e10 on the DC bin; with normalize="per_sample" the plane's std must be taken
    without the DC term (a constant: the CPU's finish_plane), or float32 loses the rest of the plane.
    Every spectral CUDA kernel against the CPU kernel."""
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", path)
    shape = (1, 2, 32, 32)
    spec = ad.NoiseSpec(None, ad.PowerLaw(-1.0), normalize="per_sample")
    common = kernel_common(spec, shape, schedule, [999])
    assert float(common[3][0, 0, 0]) > 1e9
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    check_pair(a, b)
    assert emu.last_plan()[0] == ("two_pass" if path == "two_pass" else "fused")
    if path == "fused_pow2":
        ran_pow2(emu)


def test_pow2_equals_general_kernel(emu, schedule, monkeypatch):
    """The power-of-two kernel and the general cluster kernel filter the same noise (float rounding)."""
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_pow2")
    shape = (2, 4, 32, 32)
    spec = make_spec("two_indep", 4, k=1, normalize="per_sample")
    common = kernel_common(spec, shape, schedule, [999, 3])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    ran_pow2(emu)
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_general")
    b = emu.add_noise(x0, *common, 1, STREAM, None)
    assert emu.last_kernel().startswith("fused_spectral<")
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


def test_pow2_sample_does_not_depend_on_the_batch(emu, schedule, monkeypatch):
    monkeypatch.setenv("EMU_ORDER", "rev")
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_pow2")
    shape = (3, 3, 16, 32)
    spec = make_spec("sdm+two_indep", 3, k=1)
    common = kernel_common(spec, shape, schedule, [999, 3, 500])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    full = emu.add_noise(x0, *common, 1, STREAM, None)
    for b in range(3):
        part = emu.add_noise(x0[b:b + 1].clone(), common[0][b:b + 1], *common[1:], 1,
                             STREAM + torch.tensor([0, b * 3 * 16 * 32 // 4]), None)
        assert torch.equal(part[0][0], full[0][b]) and torch.equal(part[1][0], full[1][b])


def test_pow2_video(emu, order, schedule):
    """[B, C, F, H, W]: a cluster per (sample, frame) slice, the frame's stream offset."""
    shape = (2, 3, 3, 16, 16)
    spec = make_spec("sdm+pl_pos", 3, k=1, normalize="per_sample")
    common = kernel_common(spec, (2, 3, 16, 16), schedule, [999, 3])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    a = emu.add_noise(x0, *common, 1, STREAM, None)
    b = torch.ops.anisodiff.add_noise(x0, *common, 1, STREAM, None)
    check_pair(a[0], b[0])
    check_pair(a[1], b[1])
    ran_pow2(emu)


def test_pow2_ddpm_step(emu, order, schedule):
    from test_cuda import step_args

    shape = (2, 3, 16, 16)
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 8), 0.5),
                        ad.TwoBand(0.6, (0, 0.3), 0.4, (0.3, 1.0), "independent"), normalize="per_sample")
    args = step_args(spec, schedule, 5, -1, "exact", shape, "cpu", False)
    g = torch.Generator().manual_seed(11)
    x, e = 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a = emu.ddpm_step(x, e, *args, STREAM, None)
    ran_pow2(emu)
    b = torch.ops.anisodiff.ddpm_step(x, e, *args, STREAM, None)
    check_pair(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)
    plan = plan_of(emu, shape, spec, k=0, step=True, step_k=1)
    assert plan["kernel"] == "fused_spectral_pow2<KA=2,step=1,vec=0,pert=0,LH=0,LW=0,CK=0>"


@pytest.mark.parametrize("kind,normalize", [("sdm+pl_pos", "calibrated"), ("two_indep", "per_sample")])
def test_pow2_input_perturbation(emu, order, schedule, kind, normalize):
    """x_t from n + g n' (n' from the stream's draws D + d, filtered like n), the target from n."""
    shape = (2, 3, 16, 16)
    spec = make_spec(kind, 3, k=1, normalize=normalize)
    common = kernel_common(spec, shape, schedule, [999, 3])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    a = emu.add_noise(x0, *common, 0, STREAM, None, 0.3)
    ran_pow2(emu)
    assert ",pert=1," in emu.last_kernel()
    b = torch.ops.anisodiff.add_noise(x0, *common, 0, STREAM, None, 0.3)
    check_pair(a[0], b[0])
    check_pair(a[1], b[1])
    plain = emu.add_noise(x0, *common, 0, STREAM, None)
    assert torch.equal(plain[1], a[1]) and not torch.allclose(plain[0], a[0], atol=1e-2)
    assert plan_of(emu, shape, spec, perturb=0.3)["perturbed"]


@pytest.mark.parametrize("shape,k,why", [
    ((2, 4, 128, 128), 1, "16384 pixels: more than 512 threads"),
    ((2, 4, 64, 128), 1, "8192 pixels: more than 512 threads"),
    ((2, 3, 24, 32), 1, "24 rows: not a power of two"),
    ((2, 3, 8, 16), 1, "128 pixels: fewer than a warp of threads"),
    ((1, 18, 16, 16), 1, "9 complex planes: more than a portable cluster"),
    ((2, 8, 16, 16), 3, "k = 3: the 8-axis epilogue"),
    ((2, 3, 256, 16), 1, "a side longer than the twiddle table"),
])
def test_pow2_planner_leaves_the_rest_to_the_general_kernel(emu, shape, k, why):
    B, C, H, W = shape
    plan = json.loads(emu.plan(B, C, H, W, True, 1, False, k))
    assert plan["path"] in ("fused", "two_pass") and not plan["kernel"].startswith(POW2), why


def test_pow2_planner_choice_and_overrides(emu, monkeypatch):
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.delenv("ANISODIFF_CUDA_CLUSTER", raising=False)
    plan = json.loads(emu.plan(64, 4, 64, 64, True, 1, False, 1))
    assert plan["kernel"] == "fused_spectral_pow2<KA=2,step=0,vec=1,pert=0,LH=6,LW=6,CK=4,dtype=fp32>"
    assert (plan["grid"], plan["block"], plan["cluster"]) == (128, 512, 2)
    assert json.loads(emu.plan(64, 4, 64, 64, False, 1, True, 0))["kernel"].startswith(POW2)  # norm only
    # fewer than 8 warps per SM (the emulator has 4 SMs) take the cluster kernel: its slabs fill more
    small = json.loads(emu.plan(4, 3, 32, 32, True, 1, False, 1))  # 8 blocks of 4 warps: 8 per SM
    assert small["kernel"].startswith(POW2), small
    small = json.loads(emu.plan(2, 3, 32, 32, True, 1, False, 1))  # 4 blocks of 4 warps: 4 per SM
    assert small["kernel"].startswith("fused_spectral<") and small["grid"] > 4, small
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_pow2")
    assert json.loads(emu.plan(2, 3, 32, 32, True, 1, False, 1))["kernel"].startswith(POW2)
    monkeypatch.delenv("ANISODIFF_CUDA_PATH")
    # the perturbed epilogue is compiled for 512 threads (128 registers): planes up to 4096 pixels
    assert json.loads(emu.plan(2, 4, 64, 64, True, 1, False, 1, perturb=0.3))["kernel"].startswith(POW2)
    assert not json.loads(emu.plan(2, 4, 64, 128, True, 1, False, 1, perturb=0.3))["kernel"].startswith(POW2)
    # so are the run-time-size variants (sizes other than 16, 32, 64 squared)
    assert not json.loads(emu.plan(2, 4, 64, 128, True, 1, False, 1))["kernel"].startswith(POW2)
    assert json.loads(emu.plan(2, 4, 32, 128, True, 1, False, 1))["kernel"].startswith(POW2)
    monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", "2")
    assert json.loads(emu.plan(64, 4, 64, 64, True, 1, False, 1))["kernel"].startswith("fused_spectral<")
    monkeypatch.delenv("ANISODIFF_CUDA_CLUSTER")
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    assert json.loads(emu.plan(64, 4, 64, 64, True, 1, False, 1))["path"] == "two_pass"
