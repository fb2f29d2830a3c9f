"""The CUDA kernels (csrc/cuda/*.cu) run by the host emulator of tests/cuda_emulation against the CPU kernel.

No GPU needed: the .cu sources are compiled as C++; every block's threads run as coroutines with
__syncthreads as phase barriers, in forward and reverse thread order, on NaN-poisoned shared memory
and workspace (a read before its write shows up as NaN). Grid: elementwise path (k = 0, 1, 2, odd
H*W tails, channels_last / strided, fp16 / bf16), fused spectral path (power law, band, two bands
independent with per-sample normalisation, HDM, odd C, prime sizes), forced two-pass path (incl.
several tiles), ddpm_step; the path each case takes is asserted. Builds once (incrementally, into
build/cuda_emulation); skipped without a C++ compiler / ninja; a compile error in the kernels fails.
"""
import pytest
import torch

import anisodiff as ad
from conftest import random_axes, requires_compiled
from cuda_emulation import emulator
from test_cpu_kernel import close, make_spec

pytestmark = requires_compiled

ORDERS = ["fwd", "rev"]
STREAM = torch.tensor([1234, 7])


@pytest.fixture(scope="session")
def emu():
    try:
        emulator.build()
    except emulator.EnvironmentProblem as exc:
        pytest.skip(f"CUDA host emulator cannot be built here: {str(exc)[:400]}")
    except emulator.SourceError as exc:
        pytest.fail(f"the CUDA sources do not compile under the host emulator:\n{exc}", pytrace=False)
    return torch.ops.anisodiff_emu


def order_fixture(path=None):
    """An `order` fixture: every test that takes it runs once per thread order (EMU_ORDER), with the
    planner forced onto `path` if one is given (ANISODIFF_CUDA_PATH; the small test grids would not pick
    most kernels) and the cluster size always left to the planner (ANISODIFF_CUDA_CLUSTER unset, which
    only the pow2 suite's fixture did before: the others now run hermetic too)."""

    @pytest.fixture(params=ORDERS)
    def order(request, monkeypatch, emu):
        monkeypatch.setenv("EMU_ORDER", request.param)
        if path is not None:
            monkeypatch.setenv("ANISODIFF_CUDA_PATH", path)
        monkeypatch.delenv("ANISODIFF_CUDA_CLUSTER", raising=False)
        return request.param

    return order


order = order_fixture()


def kernel_common(spec, shape, schedule, t):
    B, C, H, W = shape
    args = ad.plan.kernel_args(spec, schedule, C, H, W, "cpu")
    return (torch.tensor(t[:B]), args.coef, args.axes, args.weights, list(args.gammas), args.variant,
            args.normalize)


def check_pair(emu_out, cpu_out, dtype=torch.float32):
    assert emu_out.dtype == cpu_out.dtype and emu_out.shape == cpu_out.shape
    assert emu_out.stride() == cpu_out.stride()
    bad = int((~torch.isfinite(emu_out.float())).sum())
    assert bad == 0, f"{bad} NaN/inf outputs: a read of poisoned (not yet written / unsynchronised) memory"
    close(emu_out, cpu_out, dtype)


def expect_path(emu, path):
    name, smem, tile, barriers = emu.last_plan()
    assert name == path
    return tile


def run_add_noise(emu, x0, common, target, noise=None):
    a = emu.add_noise(x0, *common, target, STREAM, noise)
    b = torch.ops.anisodiff.add_noise(x0, *common, target, STREAM, noise)
    check_pair(a[0], b[0], x0.dtype)
    check_pair(a[1], b[1], x0.dtype)
    return a


def layout(x, how):
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "strided":  # a slice: no vectorised I/O
        big = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])
        big[..., ::2] = x
        return big[..., ::2]
    return x


# -- elementwise path -------------------------------------------------------------------------------
ELEMENTWISE = [  # (shape, kind, k, layout, dtype, target)
    ((2, 3, 8, 8), "iso", 1, "contiguous", torch.float32, 1),          # k = 0, vectorised
    ((2, 3, 7, 9), "sdm", 1, "contiguous", torch.float32, 0),          # odd H*W: quad tails
    ((2, 4, 12, 10), "hdm", 2, "contiguous", torch.float32, 2),        # k = 2, heisenberg
    ((2, 3, 7, 9), "sdm_pos", 2, "channels_last", torch.float32, 3),
    ((2, 3, 6, 5), "sdm", 1, "strided", torch.float32, 1),
    ((2, 3, 8, 8), "sdm_linear", 1, "contiguous", torch.float16, 1),
    ((1, 4, 5, 7), "hdm", 2, "channels_last", torch.bfloat16, 0),
]


@pytest.mark.parametrize("shape,kind,k,how,dtype,target", ELEMENTWISE,
                         ids=[f"{c[1]}-k{c[2]}-{'x'.join(map(str, c[0]))}-{c[3]}-{str(c[4])[6:]}"
                              for c in ELEMENTWISE])
def test_elementwise(emu, order, schedule, shape, kind, k, how, dtype, target):
    common = kernel_common(make_spec(kind, shape[1], k=k), shape, schedule, [999, 0, 500])
    x0 = layout(torch.randn(shape, generator=torch.Generator().manual_seed(1)), how).to(dtype)
    run_add_noise(emu, x0, common, target)
    expect_path(emu, "elementwise")
    # caller noise through shaped_noise (apply_operator)
    eps = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2))
    a = emu.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    check_pair(a, b)
    expect_path(emu, "elementwise")


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # the plans' spelling
FAST = [  # (C, kind, k, dtype, target): the straight-line kernel add_noise_fast<CK = C, KK = k>
    (1, "iso", 0, torch.float32, 0),
    (2, "sdm", 1, torch.bfloat16, 1),
    (3, "sdm", 1, torch.float32, 0),
    (3, "sdm_pos", 2, torch.bfloat16, 2),
    (4, "sdm_linear", 1, torch.float16, 3),
    (4, "hdm", 2, torch.float32, 0),
    (16, "iso", 0, torch.float32, 0),
    (16, "sdm", 1, torch.float32, 1),
    (16, "hdm", 2, torch.bfloat16, 0),
]


@pytest.mark.parametrize("C,kind,k,dtype,target", FAST,
                         ids=[f"C{c[0]}-{c[1]}-k{c[2]}-{str(c[3])[6:]}-t{c[4]}" for c in FAST])
def test_elementwise_fast(emu, order, schedule, C, kind, k, dtype, target):
    """The compile-time-channel kernel (generated noise, vectorised tensors) against the CPU kernel:
    add_noise with every target and shaped_noise, fp32 / fp16 / bf16; the plan names the kernel."""
    import json

    shape = (3, C, 4, 12)
    common = kernel_common(make_spec(kind, C, k=max(k, 1)), shape, schedule, [999, 0, 500])
    assert (common[2].shape[-1] if common[2].numel() else 0) == k
    plan = json.loads(emu.plan(*shape, False, 1, False, k, dtype=dtype))
    assert plan["kernel"] == f"add_noise_fast<CK={C},KK={k},pert=0,dtype={DTYPE_NAMES[dtype]}>", plan
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(C)).to(dtype)
    run_add_noise(emu, x0, common, target)
    expect_path(emu, "elementwise")
    a = emu.shaped_noise(list(shape), *common, STREAM, None, dtype)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, dtype)
    check_pair(a, b, dtype)


def test_gpu_stream_stays_within_its_bound(emu, schedule):
    """The CUDA stream (SFU sqrt / sin / cos in Box-Muller, common.cuh) differs from the CPU's by at most
    6e-6 per normal (docs/cuda.md); the emulator adds the intrinsics' documented worst-case errors, so
    this holds on any GPU within them. The differences must also be there (the error model is active)."""
    shape = (8, 3, 32, 32)
    common = kernel_common(ad.NoiseSpec(), shape, schedule, [5] * 8)
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    diff = (a.double() - b.double()).abs().max().item()
    assert 1e-7 < diff <= 6e-6, diff


# -- spectral paths (fused, and the forced two-pass fallback) ---------------------------------------
SPECTRAL = [  # (shape, kind, k, normalize)
    ((2, 3, 16, 16), "pl_neg", 1, "calibrated"),         # power law, radix-4/2 FFT
    ((1, 4, 12, 10), "hdm+band", 2, "calibrated"),       # HDM + band, radix 3
    ((2, 5, 7, 11), "two_indep", 1, "per_sample"),       # odd C, primes, two draws, per-sample norm
    ((1, 3, 13, 9), "sdm+pl_pos", 1, "per_sample"),      # prime H
    ((1, 3, 1, 30), "band", 1, "calibrated"),            # rows of length 1
    ((1, 2, 30, 1), "pl_pos", 1, "per_sample"),          # columns of length 1
    ((1, 3, 64, 64), "sdm+two_indep", 1, "calibrated"),  # the largest fused case (177 KiB smem)
]


@pytest.mark.parametrize("path", ["fused", "two_pass"])
@pytest.mark.parametrize("shape,kind,k,normalize", SPECTRAL,
                         ids=[f"{c[1]}-{c[3]}-{'x'.join(map(str, c[0]))}" for c in SPECTRAL])
def test_spectral(emu, order, schedule, monkeypatch, path, shape, kind, k, normalize):
    if path == "two_pass":
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    else:
        monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    common = kernel_common(make_spec(kind, shape[1], k=k, normalize=normalize), shape, schedule,
                           [999, 3, 500])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    run_add_noise(emu, x0, common, 1)
    expect_path(emu, path)
    run_add_noise(emu, x0.contiguous(memory_format=torch.channels_last).half(), common, 3)
    expect_path(emu, path)


CLUSTERED = [  # (shape, kind, k, normalize): the fused path with every cluster size R (slabs of H / R rows)
    ((2, 3, 16, 16), "hdm+pl_neg", 2, "calibrated"),
    ((1, 5, 16, 16), "sdm+two_indep", 1, "per_sample"),  # odd C, two draws, cluster statistics
    ((2, 2, 48, 16), "band", 1, "per_sample"),          # radix 3 columns, W / R = 1 at R = 16
]


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape,kind,k,normalize", CLUSTERED,
                         ids=[f"{c[1]}-{c[3]}-{'x'.join(map(str, c[0]))}" for c in CLUSTERED])
def test_fused_cluster_sizes(emu, order, schedule, monkeypatch, cluster, shape, kind, k, normalize):
    """Every cluster size of the fused kernel (the row slabs, the DSMEM transposes, the cluster-summed
    statistics) against the CPU kernel, forced with ANISODIFF_CUDA_CLUSTER."""
    import json

    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", str(cluster))
    common = kernel_common(make_spec(kind, shape[1], k=k, normalize=normalize), shape, schedule, [999, 3])
    plan = json.loads(emu.plan(*shape, common[3] is not None, len(common[4]), normalize == "per_sample", k))
    assert plan["path"] == "fused" and plan["cluster"] == cluster and plan["grid"] == shape[0] * cluster
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    run_add_noise(emu, x0, common, 1)
    expect_path(emu, "fused")
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    check_pair(a, b, torch.bfloat16)


@pytest.mark.parametrize("shape,kind,normalize", [((2, 5, 16, 16), "sdm+two_indep", "per_sample"),
                                                   ((1, 3, 32, 32), "hdm+pl_neg", "calibrated")])
def test_cluster_size_does_not_change_a_bit(emu, schedule, monkeypatch, shape, kind, normalize):
    """The planner picks the cluster size from the batch (more blocks per sample for small batches), so
    the fused result must not depend on it: transforms per row / column and the sums' fixed order."""
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.setenv("EMU_ORDER", "rev")
    common = kernel_common(make_spec(kind, shape[1], k=2, normalize=normalize), shape, schedule, [999, 3])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    outs = []
    for cluster in (1, 2, 4, 8, 16):
        monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", str(cluster))
        outs.append(emu.add_noise(x0, *common, 2, STREAM, None))
        assert emu.last_plan()[0] == "fused"
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])


@pytest.mark.parametrize("path", ["fused", "two_pass"])
def test_batch_splits_are_bit_exact(emu, schedule, monkeypatch, path):
    """Planes pair only within a sample and the cluster size depends on (H, W) only: a sample's output
    is bit for bit the same in a batch of 3 and alone (its stream offset moved by its position)."""
    if path == "two_pass":
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    else:
        monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.setenv("EMU_ORDER", "rev")
    shape = (3, 3, 16, 16)
    C, H, W = shape[1:]
    common = kernel_common(make_spec("sdm+two_indep", C, normalize="per_sample"), shape, schedule, [999, 3, 500])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    full = emu.add_noise(x0, *common, 1, STREAM, None)
    expect_path(emu, path)
    for b in range(3):
        part = emu.add_noise(x0[b:b + 1].clone(), common[0][b:b + 1], *common[1:], 1,
                             torch.tensor([1234, 7 + b * C * H * W // 4]), None)
        assert torch.equal(part[0], full[0][b:b + 1]) and torch.equal(part[1], full[1][b:b + 1])


@pytest.mark.parametrize("path", ["fused", "two_pass"])
@pytest.mark.parametrize("dc", [0.0, 50.0, 1.0e6])
def test_dc_bin_outside_the_fft(emu, order, schedule, monkeypatch, path, dc):
    """T_w e = IFFT(w' FFT(e)) + w(0) mean(e) with w' = w with its DC bin zeroed: checked against a
    float64 FFT of the same white noise, for a zero, a moderate and a huge DC weight."""
    if path == "two_pass":
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    else:
        monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    shape = (2, 3, 16, 12)
    common = list(kernel_common(make_spec("pl_neg", 3), shape, schedule, [999, 3]))
    weights = common[3].clone()
    weights[:, 0, 0] = dc
    common[3] = weights
    gamma = common[4][0]
    eps = torch.randn(1, *shape, generator=torch.Generator().manual_seed(9))
    out = emu.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    expect_path(emu, path)
    check_dc_bin(out, eps[0], weights[0], gamma, dc)


def check_dc_bin(out, e, w, gamma, dc):
    """out = gamma (IFFT(w' FFT(e)) + w(0) mean(e)), w' = w without its DC bin, against float64, to 2e-6
    of the spread around the DC term."""
    e, w0 = e.double(), w.double().clone()
    w0[0, 0] = 0.0
    mean = e.mean(dim=(-2, -1), keepdim=True)
    want = (torch.fft.ifft2(w0 * torch.fft.fft2(e)).real + dc * mean) * gamma
    assert torch.isfinite(out).all()
    spread = (want - dc * gamma * mean).abs().max()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=2e-6 * float(spread))


def test_two_pass_natural(emu, schedule, monkeypatch):
    """130 = 2 x 5 x 13 allows clusters of 2 blocks at most: 65 rows of 4 planes do not fit in shared
    memory, so the plane goes two-pass without forcing it."""
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.setenv("EMU_ORDER", "mix")
    shape = (1, 4, 130, 130)
    common = kernel_common(make_spec("hdm+pl_neg", 4, k=2), shape, schedule, [400])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    run_add_noise(emu, x0, common, 1)
    expect_path(emu, "two_pass")


def test_two_pass_multi_tile(emu, schedule, monkeypatch):
    """A plane larger than one tile (8192 complex elements): rows and columns in two tiles each."""
    monkeypatch.setenv("EMU_ORDER", "rev")
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    shape = (1, 1, 40, 260)
    common = kernel_common(make_spec("pl_pos", 1), shape, schedule, [700])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    run_add_noise(emu, x0, common, 1)
    tile = expect_path(emu, "two_pass")
    assert 0 < tile < shape[2] * shape[3]


# -- ddpm_step --------------------------------------------------------------------------------------
STEP_SPECS = {
    "white": (lambda C: ad.NoiseSpec(), "elementwise"),
    "hdm_k2": (lambda C: ad.NoiseSpec(ad.Squeeze(random_axes(C, 2, 6), [-0.4, 0.8], "heisenberg")),
               "elementwise"),
    "sdm_band": (lambda C: ad.NoiseSpec(ad.Squeeze(random_axes(C, 1, 7), -0.6), ad.Band(0.1, 0.4)),
                 "fused"),
    "two_indep_ps": (lambda C: ad.NoiseSpec(ad.Squeeze(random_axes(C, 1, 8), 0.5),
                                            ad.TwoBand(0.6, (0, 0.3), 0.4, (0.3, 1.0), "independent"),
                                            normalize="per_sample"), "fused"),
}


@pytest.mark.parametrize("name,mode,clip,t", [("white", "official", True, (999, 979)),
                                              ("hdm_k2", "exact", False, (5, -1)),
                                              ("hdm_k2", "official", True, (999, 979)),
                                              ("sdm_band", "official", True, (999, 979)),
                                              ("two_indep_ps", "exact", False, (5, -1))])
def test_ddpm_step(emu, order, schedule, name, mode, clip, t):
    from test_cuda import step_args

    make, path = STEP_SPECS[name]
    shape = (2, 4 if name == "hdm_k2" else 3, 9, 8)
    spec = make(shape[1])
    args = step_args(spec, schedule, t[0], t[1], mode, shape, "cpu", clip)
    g = torch.Generator().manual_seed(11)
    x, e = 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    z = torch.randn((spec.draws, *shape), generator=g)
    for noise in (z, None):
        a = emu.ddpm_step(x, e, *args, STREAM, noise)
        b = torch.ops.anisodiff.ddpm_step(x, e, *args, STREAM, noise)
        expect_path(emu, path)
        check_pair(a[0], b[0])
        assert torch.isfinite(a[1]).all()
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)  # x0 estimate: 1/sqrt(ab) gain


@pytest.mark.parametrize("cluster", [2, 8])
def test_ddpm_step_clustered(emu, order, schedule, monkeypatch, cluster):
    """The step epilogue on slabs of a cluster (per-sample normalisation summed over the cluster)."""
    from test_cuda import step_args

    monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", str(cluster))
    spec = STEP_SPECS["two_indep_ps"][0](3)
    shape = (2, 3, 16, 8)
    args = step_args(spec, schedule, 5, -1, "exact", shape, "cpu", False)
    g = torch.Generator().manual_seed(12)
    x, e = 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a = emu.ddpm_step(x, e, *args, STREAM, None)
    b = torch.ops.anisodiff.ddpm_step(x, e, *args, STREAM, None)
    expect_path(emu, "fused")
    check_pair(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


# -- video tensors [B, C, F, H, W]: every kernel takes the B x F slices (problem.h) ---------------------
VIDEO = [  # (shape [B, C, F, H, W], kind, k, normalize, layout, path, cluster)
    ((2, 3, 3, 8, 8), "sdm", 1, "calibrated", "contiguous", "elementwise", None),    # add_noise_fast
    ((2, 3, 2, 7, 9), "hdm", 2, "calibrated", "contiguous", "elementwise", None),    # odd H*W: general
    ((2, 3, 2, 6, 8), "sdm", 1, "calibrated", "strided", "elementwise", None),       # strided I/O
    ((2, 3, 3, 16, 16), "sdm+pl_neg", 1, "calibrated", "contiguous", "fused", "4"),  # clusters per slice
    ((1, 5, 2, 16, 12), "sdm+two_indep", 1, "per_sample", "strided", "fused", None),  # per-(b, c, f) norm
    ((2, 3, 2, 12, 10), "hdm+band", 2, "per_sample", "contiguous", "two_pass", None),
]


def video_layout(x, how):
    if how == "strided":  # a slice along W: frame, batch and channel strides of a bigger tensor
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


@pytest.mark.parametrize("shape,kind,k,normalize,how,path,cluster", VIDEO,
                         ids=[f"{c[1]}-{c[3]}-{'x'.join(map(str, c[0]))}-{c[4]}-{c[5]}" for c in VIDEO])
def test_video(emu, order, schedule, monkeypatch, shape, kind, k, normalize, how, path, cluster):
    """5-D tensors against the CPU kernel (which is tested against the reference): the stream is the
    row-major [B, C, F, H, W] one, the squeeze acts at every (f, h, w), the filter and the per-sample
    normalisation on every (b, c, f) plane, the timestep row is b's."""
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    if path == "two_pass":
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    if cluster:
        monkeypatch.setenv("ANISODIFF_CUDA_CLUSTER", cluster)
    B, C, F, H, W = shape
    common = kernel_common(make_spec(kind, C, k=k, normalize=normalize), (B, C, H, W), schedule, [999, 3])
    x0 = video_layout(torch.randn(shape, generator=torch.Generator().manual_seed(21)), how)
    for target in (0, 1):
        run_add_noise(emu, x0, common, target)
        expect_path(emu, path)
    run_add_noise(emu, x0.to(torch.bfloat16), common, 3)
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    check_pair(a, b)
    eps = torch.randn(len(common[4]), *shape, generator=torch.Generator().manual_seed(22))
    a = emu.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, eps, torch.float32)
    check_pair(a, b)


def test_video_frames_are_the_4d_stream_in_row_major_order(emu, schedule):
    """Frame f of sample b of a [B, C, F, H, W] call is a [1, C, H, W] call whose stream element
    (c, h, w) is the video's ((b C + c) F + f) H W + h W + w: for white noise, the 4-D call with C F
    channels gives the same values in the same order (bit for bit)."""
    B, C, F, H, W = 2, 3, 4, 8, 8
    common5 = kernel_common(ad.NoiseSpec(), (B, C, H, W), schedule, [5, 5])
    common4 = kernel_common(ad.NoiseSpec(), (B, C * F, H, W), schedule, [5, 5])
    v = emu.shaped_noise([B, C, F, H, W], *common5, STREAM, None, torch.float32)
    flat = emu.shaped_noise([B, C * F, H, W], *common4, STREAM, None, torch.float32)
    assert torch.equal(v.reshape(B, C * F, H, W), flat)


@pytest.mark.parametrize("name,mode,clip,t", [("hdm_k2", "exact", False, (5, -1)),
                                              ("sdm_band", "official", True, (999, 979))])
def test_video_ddpm_step(emu, order, schedule, name, mode, clip, t):
    from test_cuda import step_args

    make, path = STEP_SPECS[name]
    B, C, F, H, W = 2, 4 if name == "hdm_k2" else 3, 3, 8, 8
    spec = make(C)
    args = step_args(spec, schedule, t[0], t[1], mode, (B, C, H, W), "cpu", clip)
    g = torch.Generator().manual_seed(13)
    x, e = 1.5 * torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g)
    a = emu.ddpm_step(x, e, *args, STREAM, None)
    b = torch.ops.anisodiff.ddpm_step(x, e, *args, STREAM, None)
    expect_path(emu, path)
    check_pair(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


# -- channel counts: 16 (Flux / SD3 latents) and 768 (embeddings) on every CUDA path ------------------
@pytest.mark.parametrize("C,kind,k,shape_hw,path", [
    (16, "sdm", 2, (8, 8), "elementwise"),          # add_noise_fast<16, 2>
    (16, "hdm+pl_neg", 2, (16, 16), "fused"),
    (768, "sdm", 2, (4, 6), "elementwise"),         # the general kernel: 16 cached, the rest regenerated
    (768, "iso", 1, (4, 6), "elementwise"),
    (768, "sdm+pl_pos", 1, (2, 4), "two_pass"),     # 768 planes do not fit a slab (384 CTAs: slow here)
])
def test_many_channels(emu, schedule, monkeypatch, C, kind, k, shape_hw, path):
    monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    monkeypatch.setenv("EMU_ORDER", "rev")
    shape = (1 if path == "two_pass" else 2, C, *shape_hw)
    common = kernel_common(make_spec(kind, C, k=k), shape, schedule, [999, 40])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(C))
    run_add_noise(emu, x0, common, 1)
    expect_path(emu, path)
    if path == "two_pass":
        return
    a = emu.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    b = torch.ops.anisodiff.shaped_noise(list(shape), *common, STREAM, None, torch.bfloat16)
    check_pair(a, b, torch.bfloat16)


# -- the emulator itself ------------------------------------------------------------------------------
def test_emulator_catches_missing_barrier(emu, monkeypatch):
    """Shared memory starts as NaN, threads run to the next barrier one after another: a read that is
    not ordered after its write by __syncthreads reads NaN in at least one thread order."""
    n = 64
    expect = torch.arange(1, n + 1, dtype=torch.float32) % n
    for order in ORDERS:
        monkeypatch.setenv("EMU_ORDER", order)
        torch.testing.assert_close(emu.race_selftest(n, True), expect)
    monkeypatch.setenv("EMU_ORDER", "fwd")  # threads 0..n-2 read before their neighbour wrote
    assert torch.isnan(emu.race_selftest(n, False)[:-1]).all()
    monkeypatch.setenv("EMU_ORDER", "rev")  # thread n-1 runs first and reads s[0] before thread 0
    out = emu.race_selftest(n, False)
    assert torch.isnan(out[-1]) and torch.equal(out[:-1], expect[:-1])


def test_barriers_exercised(emu, schedule):
    """The fused kernel really runs as phases separated by barriers (not one thread at a time)."""
    shape = (1, 3, 8, 8)
    common = kernel_common(make_spec("pl_neg", 3), shape, schedule, [10])
    before = emu.last_plan()[3]
    emu.shaped_noise(list(shape), *common, STREAM, None, torch.float32)
    name, smem, _, after = emu.last_plan()
    assert name == "fused" and smem > 0 and after - before >= 4
