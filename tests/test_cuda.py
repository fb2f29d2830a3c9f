"""The fused CUDA kernels against the CPU kernel and anisodiff.reference on the same noise stream.

Grid as tests/test_cpu_kernel.py (odd and prime sizes, 32x32, 64x64 (fused), 128x128 (two-pass),
C in {1, 3, 4} and larger, k in {1, 2}, every spec kind / normalisation / radius, fp32/fp16/bf16,
strided and channels_last layouts, targets, caller noise), every path (elementwise, fused,
two-pass forced with ANISODIFF_CUDA_PATH=two_pass), the fused DDPM step, opcheck, CUDA graphs with a
device stream tensor, no host synchronisation (torch.cuda.set_sync_debug_mode("error")), a second
device and > 2^31 elements. Skipped without a CUDA device or a CUDA build of anisodiff.
"""
import contextlib

import pytest
import torch

import anisodiff as ad
from anisodiff import reference as R

from conftest import random_axes
from test_cpu_kernel import KINDS, SHAPES, close, make_spec
from test_sampling import FUSED_SPECS

HAVE_CUDA = torch.cuda.is_available() and bool(ad.build_info().get("cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and anisodiff built with CUDA "
                                             "(scripts/gpu_check.sh)"),
]

SEED, OFFSET = 1234, 7
DEV = "cuda"
PATHS = ["auto", "two_pass"]


@contextlib.contextmanager
def no_sync():
    """Any host synchronisation inside raises (the ops must never read device values on the host)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def api(fn, *args, **kwargs):
    """Runs fn twice: once to warm the per-device argument cache (it copies tables to the device,
    which synchronises), then under no_sync(); returns the second result."""
    fn(*args, **kwargs)
    with no_sync():
        return fn(*args, **kwargs)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "two_pass":
        monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    else:
        monkeypatch.delenv("ANISODIFF_CUDA_PATH", raising=False)
    return request.param


def cuda_close(actual, expected, dtype=torch.float32):
    close(actual.cpu(), expected.cpu(), dtype)


def plan_path(shape, spec):
    """The CUDA path ("elementwise", "fused", "two_pass") the spec's spatial part takes."""
    B, C, H, W = shape
    args = ad.plan.kernel_args(R._spatial_spec(spec), None, C, H, W, "cpu")
    return ad._ext._C.cuda_plan(B, C, H, W, args.weights is not None, len(args.gammas),
                                args.normalize == 1, torch.cuda.current_device())["path"]


# ---------------------------------------------------------------------------------------------
# add_noise / shaped_noise / apply_operator
# ---------------------------------------------------------------------------------------------
CUDA_SHAPES = SHAPES + [(2, 3, 64, 64), (2, 4, 64, 64), (2, 4, 128, 128), (1, 3, 59, 61)]


@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_matches_cpu_and_reference(shape, kind, schedule):
    B, C, H, W = shape
    spec = make_spec(kind, C, k=1)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 0, 500, 250, 17][:B])
    try:
        expected = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="reference")
    except ValueError:  # a band with no bin on a tiny grid: refused before any kernel
        with pytest.raises(ValueError, match="spectral"):
            ad.add_noise(x0.to(DEV), t.to(DEV), spec, schedule, seed=SEED, offset=OFFSET, backend="cuda")
        return
    cpu = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cpu")
    out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, seed=SEED, offset=OFFSET, backend="cuda")
    assert out[0].device.type == "cuda"
    for got, want, ref in zip(out, cpu, expected):
        cuda_close(got, want)
        cuda_close(got, ref)


@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (2, 3, 7, 9), (2, 4, 12, 10), (1, 3, 11, 13),
                                   (2, 3, 32, 32), (3, 1, 5, 6), (2, 3, 1, 6), (3, 4, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["pl_neg", "two_indep", "hdm+band", "sdm+pl_pos"])
def test_two_pass_path_matches_cpu(shape, kind, schedule, monkeypatch):
    """The two-pass fallback, forced on planes that would run fused."""
    B, C, H, W = shape
    spec = make_spec(kind, C, k=1)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 0, 500][:B])
    try:
        cpu = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cpu")
    except ValueError:
        return
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "two_pass")
    assert plan_path(shape, spec) == "two_pass"
    out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, seed=SEED, offset=OFFSET, backend="cuda")
    cuda_close(out[0], cpu[0])
    cuda_close(out[1], cpu[1])


def test_paths_are_reported():
    V = random_axes(4, 1)
    assert plan_path((2, 4, 64, 64), ad.NoiseSpec(ad.Squeeze(V, 0.5))) == "elementwise"
    assert plan_path((2, 4, 64, 64), ad.NoiseSpec(None, ad.PowerLaw(0.3))) == "fused"
    assert plan_path((2, 4, 128, 128), ad.NoiseSpec(None, ad.PowerLaw(0.3))) == "fused"  # 16-block clusters
    assert plan_path((2, 16, 128, 128), ad.NoiseSpec(None, ad.PowerLaw(0.3))) == "two_pass"  # 1 block / SM at R=16
    assert plan_path((2, 3, 256, 256), ad.NoiseSpec(None, ad.PowerLaw(0.3))) == "two_pass"
    assert plan_path((2, 4, 130, 130), ad.NoiseSpec(None, ad.PowerLaw(0.3))) == "two_pass"  # clusters of <= 2
    assert "cuda_fused_smem_limit" in ad.build_info()


AXES_CASES = [(C, k, kind) for C, k in [(3, 1), (3, 2), (4, 1), (4, 2), (1, 1), (8, 2), (16, 1), (20, 2)]
              for kind in ["sdm", "sdm_pos", "hdm", "sdm+pl_neg", "hdm+two_indep"]
              if not (kind.startswith("hdm") and k >= C)]


@pytest.mark.parametrize("C,k,kind", AXES_CASES)
def test_axes_count(C, k, kind, schedule, path):
    spec = make_spec(kind, C, k=k)
    shape = (3, C, 6, 10)
    t = torch.tensor([999, 400, 3])
    expected = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="reference")
    cpu = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    out = api(ad.shaped_noise, shape, spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED, device=DEV,
              backend="cuda")
    cuda_close(out, cpu)
    cuda_close(out, expected)


@pytest.mark.parametrize("C,k", [(4, 3), (8, 5), (20, 8)])
@pytest.mark.parametrize("variant", ["sdm", "heisenberg"])
@pytest.mark.parametrize("spectral", [None, "pl"])
def test_many_axes(C, k, variant, spectral, schedule, path):
    """k > 2 axes (the kernels' 8-axis instantiations) and C beyond the register cache."""
    strengths = [0.5 - 0.2 * i for i in range(k)]
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(C, k, seed=C + k), strengths, variant=variant),
                        None if spectral is None else ad.PowerLaw(0.3))
    shape = (2, C, 6, 10)
    t = torch.tensor([999, 40])
    cpu = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    out = api(ad.shaped_noise, shape, spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED, device=DEV,
              backend="cuda")
    cuda_close(out, cpu)


@pytest.mark.parametrize("normalize", ["calibrated", "per_sample", "none"])
@pytest.mark.parametrize("radius", ["cycles", "nyquist1", "rmax1"])
@pytest.mark.parametrize("kind", ["pl_neg", "band", "two_shared", "two_indep", "sdm+pl_pos"])
def test_normalisation_and_radius(normalize, radius, kind, schedule, path):
    spec = make_spec(kind, 3, normalize=normalize, radius=radius)
    shape, t = (3, 3, 9, 8), torch.tensor([10, 999, 500])
    expected = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="reference")
    out = api(ad.shaped_noise, shape, spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED, device=DEV,
              backend="cuda")
    cuda_close(out, expected)


@pytest.mark.parametrize("shape", [(3, 3, 9, 8), (2, 4, 33, 31)], ids=lambda s: "x".join(map(str, s)))
def test_per_sample_normalisation_without_a_filter(shape, schedule, path):
    """PowerLaw(0) under per-sample normalisation: no transform, but each plane is normalised."""
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(shape[1], 1), 0.5), ad.PowerLaw(0.0), normalize="per_sample")
    t = torch.tensor([10, 999, 500][:shape[0]])
    cpu = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    out = api(ad.shaped_noise, shape, spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED, device=DEV,
              backend="cuda")
    cuda_close(out, cpu)


SPECTRAL_KERNELS = ["fused_pow2", "fused_general", "two_pass"]  # ANISODIFF_CUDA_PATH values


@pytest.mark.parametrize("kernel", SPECTRAL_KERNELS)
@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (4, 4, 32, 32), (2, 4, 64, 64), (2, 3, 32, 64), (2, 1, 32, 32),
                                   (2, 16, 32, 32)])  # C = 16: a cluster of 8 blocks
def test_every_spectral_kernel_on_power_of_two_planes(shape, kernel, schedule, monkeypatch):
    """fused_spectral_pow2 (compiled sizes 16 / 32 / 64 squared, run-time sizes, C = 1), the cluster
    kernel and the two-pass path, forced, against the CPU kernel (add_noise, a two-draw spec)."""
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", kernel)
    spec = make_spec("sdm+two_indep", shape[1], k=1)
    t = torch.tensor([999, 3, 500, 10, 700, 1, 250, 42][:shape[0]])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cpu = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="cpu")
    out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, seed=SEED, backend="cuda")
    cuda_close(out[0], cpu[0])
    cuda_close(out[1], cpu[1])


@pytest.mark.parametrize("kernel", SPECTRAL_KERNELS)
def test_huge_dc_weight_with_per_sample_normalisation(kernel, schedule, monkeypatch):
    """PowerLaw(-1): a 1e10 DC weight; the per-plane std must be taken without the DC term."""
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", kernel)
    spec = ad.NoiseSpec(None, ad.PowerLaw(-1.0), normalize="per_sample")
    t = torch.tensor([999, 3])
    cpu = ad.shaped_noise((2, 2, 32, 32), spec, timesteps=t, schedule=schedule, seed=SEED, backend="cpu")
    out = api(ad.shaped_noise, (2, 2, 32, 32), spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED,
              device=DEV, backend="cuda")
    cuda_close(out, cpu)


def test_spectral_table(schedule, path):
    H, W = 10, 7
    r = R.radius(H, W)
    w = 1.0 + torch.cos(9 * r) ** 2 + (r > 0.3).double()
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), 0.5), ad.SpectralTable(w))
    t = torch.tensor([999, 1])
    expected = ad.shaped_noise((2, 3, H, W), spec, timesteps=t, schedule=schedule, seed=3, backend="reference")
    out = api(ad.shaped_noise, (2, 3, H, W), spec, timesteps=t.to(DEV), schedule=schedule, seed=3, device=DEV,
              backend="cuda")
    cuda_close(out, expected)


@pytest.mark.parametrize("shape", [(2, 3, 59, 61), (1, 4, 2 * 3 * 5 * 7, 11 * 13), (1, 1, 53, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_prime_and_mixed_radix_planes(shape, schedule, path):
    """Generic-radix butterflies (59, 61, 7, 11, 13, 53) and radix 3 / 5 against the reference."""
    spec = make_spec("sdm+pl_pos", shape[1])
    t = torch.tensor([999, 3][:shape[0]])
    expected = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, seed=SEED, backend="reference")
    out = api(ad.shaped_noise, shape, spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED, device=DEV,
              backend="cuda")
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 3, 97, 61), (2, 3, 61, 67), (1, 1, 257, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_large_prime_sides_are_refused(shape, schedule):
    """The CUDA FFT has no Bluestein transform: sides with a prime factor > 61 are refused with spectral
    weights (a clear error, nothing launched); per-sample normalisation alone needs no FFT and runs."""
    spec = make_spec("sdm+pl_pos", shape[1])
    assert plan_path(shape, spec) == "unsupported"
    t = torch.tensor([999, 3][:shape[0]])
    with pytest.raises(RuntimeError, match="prime factors"):
        ad.shaped_noise(shape, spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED, device=DEV, backend="cuda")
    assert plan_path(shape, ad.NoiseSpec(normalize="per_sample")) == "fused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_neg"])
def test_dtypes(dtype, kind, schedule, path):
    spec = make_spec(kind, 3)
    x0 = torch.randn(4, 3, 8, 12).to(dtype)
    t = torch.tensor([1, 999, 333, 600])
    ref = ad.add_noise(x0, t, spec, schedule, seed=SEED, backend="reference")
    out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, seed=SEED, backend="cuda")
    assert out[0].dtype == out[1].dtype == dtype
    cuda_close(out[0], ref[0], dtype)
    cuda_close(out[1], ref[1], dtype)
    noise = api(ad.shaped_noise, (4, 3, 8, 12), spec, timesteps=t.to(DEV), schedule=schedule, seed=SEED,
                dtype=dtype, device=DEV, backend="cuda")
    ref_noise = ad.shaped_noise((4, 3, 8, 12), spec, timesteps=t, schedule=schedule, seed=SEED, dtype=dtype,
                                backend="reference")
    assert noise.dtype == dtype
    cuda_close(noise, ref_noise, dtype)


@pytest.mark.parametrize("target", ["epsilon", "v", "x0", "flow"])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos"])
def test_targets(target, kind, schedule):
    spec = make_spec(kind, 3)
    x0 = torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 998, 400])
    ref = ad.add_noise(x0, t, spec, schedule, seed=SEED, target=target, backend="reference")
    out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, seed=SEED, target=target, backend="cuda")
    cuda_close(out[0], ref[0])
    cuda_close(out[1], ref[1])


def _layout(layout):
    """(x0, white noise or None) on the device, built there so the strides survive."""
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(4, 3, 10, 12, generator=g).to(DEV)
    if layout == "contiguous":
        return dense, None
    if layout == "channels_last":
        return dense.to(memory_format=torch.channels_last), None
    if layout == "sliced":
        return torch.randn(8, 6, 10, 24, generator=g).to(DEV)[::2, ::2, :, ::2], None
    if layout == "transposed_hw":
        return torch.randn(4, 3, 12, 10, generator=g).to(DEV).transpose(2, 3), None
    if layout == "misaligned":  # a storage offset of one element defeats the vectorised path
        return torch.randn(4 * 3 * 10 * 12 + 1, generator=g).to(DEV)[1:].view(4, 3, 10, 12), None
    if layout == "expanded_noise":
        return dense, torch.randn(4, 3, 10, 24, generator=g).to(DEV)[..., ::2]
    return dense, torch.randn(4, 3, 10, 12, generator=g).to(DEV)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed_hw",
                                    "misaligned", "expanded_noise", "aligned_noise"])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_neg"])
def test_memory_layouts(layout, kind, schedule, path):
    spec = make_spec(kind, 3)
    t = torch.tensor([0, 999, 10, 600])
    x0, noise = _layout(layout)
    assert layout in ("contiguous", "expanded_noise", "aligned_noise") or not x0.is_contiguous() \
        or x0.storage_offset() == 1
    stream = {"seed": SEED} if noise is None else {}
    ref = ad.add_noise(x0.cpu().contiguous(), t, spec, schedule, backend="reference",
                       noise=None if noise is None else noise.cpu().contiguous(), **stream)
    out = api(ad.add_noise, x0, t.to(DEV), spec, schedule, backend="cuda", noise=noise, **stream)
    cuda_close(out[0], ref[0])
    cuda_close(out[1], ref[1])
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["sdm+two_indep", "two_indep"])
def test_caller_noise_two_draws(kind, schedule, path):
    spec = make_spec(kind, 3)
    eps = torch.randn(2, 3, 3, 8, 8)
    t = torch.tensor([999, 1, 500])
    ref = ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend="reference")
    out = api(ad.apply_operator, eps.to(DEV), spec, timesteps=t.to(DEV), schedule=schedule, backend="cuda")
    cuda_close(out, ref)
    with pytest.raises(ValueError, match="eps"):
        ad.apply_operator(eps[0].to(DEV), spec, timesteps=t.to(DEV), schedule=schedule, backend="cuda")


def test_identity_specs_are_exact(schedule):
    """s = 0 and alpha = 0 reproduce the white stream bit for bit on the CUDA kernel too (and the
    CPU's white stream to float rounding: log / sincos contract differently)."""
    t = torch.tensor([999, 500], device=DEV)
    white = api(ad.shaped_noise, (2, 3, 8, 8), ad.NoiseSpec(), seed=SEED, device=DEV, backend="cuda")
    torch.testing.assert_close(white.cpu(), ad.white_noise((2, 3, 8, 8), seed=SEED), rtol=0, atol=2e-6)
    V = random_axes(3, 1)
    for spec in [ad.NoiseSpec(ad.Squeeze(V, 0.0)),
                 ad.NoiseSpec(ad.Squeeze(V, 0.0, variant="heisenberg"), ad.PowerLaw(0.0))]:
        n = api(ad.shaped_noise, (2, 3, 8, 8), spec, timesteps=t, schedule=schedule, seed=SEED, device=DEV,
                backend="cuda")
        assert torch.equal(n, white)
    x0 = torch.randn(2, 3, 8, 8, device=DEV)
    _, eps = api(ad.add_noise, x0, t, ad.NoiseSpec(ad.Squeeze(V, 0.0)), schedule, seed=SEED, backend="cuda")
    assert torch.equal(eps, white)


def test_white_stream_offsets():
    for n, offset in [(1, 0), (7, 3), (4099, 2**32 - 5)]:
        got = api(ad.shaped_noise, (1, 1, 1, n), ad.NoiseSpec(), seed=99, offset=offset, device=DEV,
                  backend="cuda")
        # the SFU Box-Muller of the CUDA stream: within 6e-6 of the CPU's (docs/cuda.md), which is
        # within 5e-7 of the reference's float32 stream
        torch.testing.assert_close(got.cpu().reshape(-1), R.white_noise((n,), 99, offset), rtol=0, atol=6.5e-6)


def test_stream_on_the_gpu_stays_within_its_bound():
    """docs/cuda.md, "The stream on the GPU": the SFU Box-Muller differs from the CPU kernel's normals by
    at most 6e-6 (and the Philox words are the same: never by more than that)."""
    n = 1 << 20
    got = ad.shaped_noise((1, 1, 1, n), ad.NoiseSpec(), seed=5, offset=11, device=DEV, backend="cuda").cpu()
    want = ad.shaped_noise((1, 1, 1, n), ad.NoiseSpec(), seed=5, offset=11, backend="cpu")
    assert (got.double() - want.double()).abs().max().item() <= 6e-6


@pytest.mark.parametrize("kind", ["sdm", "hdm+pl_neg", "sdm+two_indep"])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_video_tensors(kind, layout, schedule, path):
    """[B, C, F, H, W]: the kernels' slices (problem.h) against the CPU kernel, through the op."""
    B, C, F, H, W = 2, 4, 3, 16, 16
    spec = make_spec(kind, C, k=2 if kind.startswith("hdm") else 1,
                     normalize="per_sample" if "two" in kind else "calibrated")
    args = ad.plan.kernel_args(spec, schedule, C, H, W, "cpu")
    dargs = ad.plan.kernel_args(spec, schedule, C, H, W, DEV)
    x0 = torch.randn(B, C, F, H, 2 * W if layout == "sliced" else W)
    if layout == "sliced":
        x0 = x0[..., ::2]
    t = torch.tensor([999, 40])
    stream = torch.tensor([SEED, OFFSET])
    want = torch.ops.anisodiff.add_noise(x0, t, args.coef, args.axes, args.weights, list(args.gammas),
                                         args.variant, args.normalize, 0, stream, None)
    got = torch.ops.anisodiff.add_noise(x0.to(DEV), t.to(DEV), dargs.coef, dargs.axes, dargs.weights,
                                        list(dargs.gammas), dargs.variant, dargs.normalize, 0, stream, None)
    cuda_close(got[0], want[0])
    cuda_close(got[1], want[1])


# input perturbation (DDPM-IP): x_t = a x0 + b (n + g n'), n' from the stream's draws D + d
PERTURB_SHAPES = [(3, 1, 8, 8), (3, 3, 8, 8), (2, 4, 12, 10), (2, 3, 7, 9), (2, 16, 8, 8), (2, 5, 8, 8),
                  (2, 3, 32, 32), (2, 4, 64, 64), (1, 3, 59, 61), (2, 3, 2, 16, 16)]


@pytest.mark.parametrize("shape", PERTURB_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["iso", "sdm", "hdm", "sdm_pos", "pl_neg", "two_indep", "sdm+pl_pos",
                                  "hdm+band"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_perturbation_matches_cpu_and_reference(shape, kind, dtype, schedule, path):
    """Every CUDA path (add_noise_fast, the general elementwise kernel, fused, two-pass) with the
    perturbation against the CPU kernel and the reference; the target does not depend on it."""
    C = shape[1]
    k = 2 if kind in ("hdm", "sdm_pos") and C > 2 else 1
    spec = make_spec(kind, C, k=k, normalize="per_sample" if "two" in kind else "calibrated")
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    t = torch.tensor([999, 40, 500][:shape[0]])
    for target in ("epsilon", "v"):
        kw = dict(seed=SEED, offset=OFFSET, target=target, input_perturbation=0.3)
        try:
            ref = ad.add_noise(x0, t, spec, schedule, backend="reference", **kw)
        except ValueError:  # a band with no bin on a tiny grid
            return
        cpu = ad.add_noise(x0, t, spec, schedule, backend="cpu", **kw)
        out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, backend="cuda", **kw)
        for got, want, r in zip(out, cpu, ref):
            cuda_close(got, want, dtype)
            cuda_close(got, r, dtype)
        plain = ad.add_noise(x0.to(DEV), t.to(DEV), spec, schedule, backend="cuda", seed=SEED, offset=OFFSET,
                             target=target)
        cuda_close(out[1], plain[1], dtype)  # the target from n alone
        assert (out[0].float() - plain[0].float()).abs().max() > 0.05


@pytest.mark.parametrize("kind", ["sdm", "hdm", "sdm+pl_neg", "sdm+two_indep"])
def test_input_perturbation_uses_draws_D_plus_d(kind, schedule, path):
    """(x_t / b - target) / g with x0 = 0 is n' alone: A(t) of the stream's draws D + d (shaped by the
    CUDA kernel from those white draws), far from A(t) of the draws d of n or of D + d + 1."""
    shape = (2, 4, 16, 16)
    spec = make_spec(kind, 4, k=2 if kind == "hdm" else 1,
                     normalize="per_sample" if "two" in kind else "calibrated")
    t = torch.tensor([500, 200])
    gamma = 0.5
    x_t, tgt = api(ad.add_noise, torch.zeros(shape, device=DEV), t.to(DEV), spec, schedule, seed=SEED,
                   offset=OFFSET, input_perturbation=gamma, backend="cuda")
    b = (1 - schedule.alphas_cumprod[t]).double().sqrt().view(-1, 1, 1, 1)
    measured = (x_t.cpu().double() / b - tgt.cpu().double()) / gamma
    D = spec.draws

    def shaped(first):
        white = torch.stack([R.white_noise(shape, SEED, OFFSET, draw=first + d) for d in range(D)])
        white = white if D > 1 else white[0]
        return ad.apply_operator(white.to(DEV), spec, timesteps=t.to(DEV), schedule=schedule,
                                 backend="cuda").cpu().double()

    right = shaped(D)
    assert (measured - right).abs().max().item() < 2e-4 * right.abs().max().item()
    for wrong in (0, D + 1):
        assert (measured - shaped(wrong)).abs().max().item() > 0.5


def test_input_perturbation_with_caller_noise(schedule, path):
    """Caller eps makes n; n' still comes from the stream (as on the CPU)."""
    spec = make_spec("sdm+two_indep", 3, normalize="per_sample")
    x0 = torch.randn(2, 3, 16, 16)
    eps = torch.randn(2, 2, 3, 16, 16)
    t = torch.tensor([999, 10])
    kw = dict(noise=eps, seed=SEED, offset=OFFSET, input_perturbation=0.4)
    cpu = ad.add_noise(x0, t, spec, schedule, backend="cpu", **kw)
    kw["noise"] = eps.to(DEV)
    out = api(ad.add_noise, x0.to(DEV), t.to(DEV), spec, schedule, backend="cuda", **kw)
    cuda_close(out[0], cpu[0])
    cuda_close(out[1], cpu[1])


def test_nan_in_x0_stays_local(schedule, path):
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.randn(2, 3, 8, 8)
    x0[1, 2, 3, 4] = float("nan")
    x_t, v = api(ad.add_noise, x0.to(DEV), torch.tensor([10, 20], device=DEV), spec, schedule, seed=SEED,
                 target="v", backend="cuda")
    assert torch.isnan(x_t).sum() == 1 and torch.isnan(x_t[1, 2, 3, 4])
    assert torch.isnan(v).sum() == 1


def test_empty_batch(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.empty(0, 3, 8, 8, device=DEV)
    t = torch.empty(0, dtype=torch.long, device=DEV)
    x_t, eps = api(ad.add_noise, x0, t, spec, schedule, seed=1, backend="cuda")
    assert x_t.shape == (0, 3, 8, 8) and eps.shape == (0, 3, 8, 8) and x_t.device.type == "cuda"
    args = ad.plan.kernel_args(spec, schedule, 3, 8, 8, DEV)
    with no_sync():
        out = torch.ops.anisodiff.shaped_noise([0, 3, 8, 8], t, args.coef, args.axes, args.weights,
                                               list(args.gammas), args.variant, args.normalize,
                                               torch.tensor([1, 0]), None, torch.float32)
    assert out.shape == (0, 3, 8, 8)


@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_neg"])
def test_device_timesteps_out_of_range_give_nan(kind, schedule, path):
    """Device timesteps are not checked on the host (that would synchronise): the kernel clamps the
    row index (never reads out of bounds) and writes NaN for that sample, like the Triton kernels,
    so the error shows up in the loss; the other samples are untouched."""
    spec = make_spec(kind, 3)
    args = ad.plan.kernel_args(spec, schedule, 3, 8, 8, DEV)
    x0 = torch.randn(3, 3, 8, 8, device=DEV)
    weights = args.weights
    normalize = args.normalize

    def run(t):
        t = torch.tensor(t, device=DEV)  # (the host-to-device copy itself synchronises)
        with no_sync():
            return torch.ops.anisodiff.add_noise(x0, t, args.coef, args.axes, weights, list(args.gammas),
                                                 args.variant, normalize, 0, torch.tensor([5, 0]), None)
    bad, good = run([5000, 10, -3]), run([0, 10, 0])
    for out_bad, out_good in zip(bad, good):
        assert torch.isnan(out_bad[0]).all() and torch.isnan(out_bad[2]).all()
        assert torch.equal(out_bad[1], out_good[1])


@pytest.mark.parametrize("kind,target", [("sdm+pl_neg", 0), ("hdm+band", 1), ("pl_pos", 2)])
def test_lines32_timesteps_out_of_range_give_nan(kind, schedule, monkeypatch, target):
    """The whole-line 32 x 32 kernel (forced: a small batch) carries a bad timestep's NaN through its
    hoisted coefficients: that sample's x_t and noise-dependent target are NaN, its block partner is
    untouched bit for bit. (The host emulator cannot run this: its CPU op checks timesteps.)"""
    monkeypatch.setenv("ANISODIFF_CUDA_PATH", "fused_lines32")
    spec = make_spec(kind, 3, k=2 if kind.startswith("hdm") else 1)
    args = ad.plan.kernel_args(spec, schedule, 3, 32, 32, DEV)
    x0 = torch.randn(3, 3, 32, 32, device=DEV)

    def run(t):
        t = torch.tensor(t, device=DEV)
        return torch.ops.anisodiff.add_noise(x0, t, args.coef, args.axes, args.weights, list(args.gammas),
                                             args.variant, args.normalize, target, torch.tensor([5, 0]), None)
    bad, good = run([5000, 10, -3]), run([0, 10, 0])
    for b in (0, 2):
        assert torch.isnan(bad[0][b]).all()
        assert torch.equal(bad[1][b], x0[b]) if target == 2 else torch.isnan(bad[1][b]).all()
    assert torch.equal(bad[0][1], good[0][1]) and torch.equal(bad[1][1], good[1][1])


def test_gradient_flows_to_x0(schedule):
    spec = make_spec("sdm", 3)
    x0 = torch.randn(3, 3, 4, 4, device=DEV, requires_grad=True)
    t = torch.tensor([0, 500, 999], device=DEV)
    a = schedule.alphas_cumprod[t.cpu()].sqrt().view(-1, 1, 1, 1).to(DEV)
    x_t, _ = ad.add_noise(x0, t, spec, schedule, seed=1, backend="cuda")
    (grad,) = torch.autograd.grad(x_t.sum(), x0)
    torch.testing.assert_close(grad, a.expand_as(grad).float())


# ---------------------------------------------------------------------------------------------
# ddpm_step
# ---------------------------------------------------------------------------------------------
STEP_SPECS = {  # the CPU step tests' grid, and C = 8 with k = 3
    **FUSED_SPECS,
    "hdm_k3_c8": lambda C: ad.NoiseSpec(ad.Squeeze(random_axes(C, 3, 9), [0.3, -0.2, 0.5], "heisenberg"),
                                        ad.PowerLaw(0.2)),
}


def step_args(spec, schedule, t, prev, mode, shape, device, clip_sample=True):
    """The ddpm_step op's tensor arguments, as anisodiff.sampling.fused_ddpm_step builds them, on
    `device`."""
    from anisodiff.sampling import step_op_args
    return step_op_args(spec, schedule, t, prev, mode, clip_sample, 1.0, shape, device)


def step_shape(name):
    C = {"hdm_k2": 4, "hdm_k3_c8": 8}.get(name, 3)
    return (3, C, 9, 8)


@pytest.mark.parametrize("name", list(STEP_SPECS))
@pytest.mark.parametrize("mode", ["official", "exact"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t,prev", [(999, 979), (5, -1)])
def test_ddpm_step_matches_cpu(name, mode, clip, t, prev, schedule, path):
    shape = step_shape(name)
    spec = STEP_SPECS[name](shape[1])
    g = torch.Generator().manual_seed(11)
    x_t = 1.5 * torch.randn(shape, generator=g)
    eps_hat = torch.randn(shape, generator=g)
    z = torch.randn((spec.draws, *shape), generator=g)
    cpu_args = step_args(spec, schedule, t, prev, mode, shape, "cpu", clip)
    dev_args = step_args(spec, schedule, t, prev, mode, shape, DEV, clip)
    x_d, e_d, z_d = x_t.to(DEV), eps_hat.to(DEV), z.to(DEV)
    for noise, noise_d, stream in [(z, z_d, torch.tensor([0, 0])), (None, None, torch.tensor([77, 5]))]:
        want = torch.ops.anisodiff.ddpm_step(x_t, eps_hat, *cpu_args, stream, noise)
        with no_sync():
            got = torch.ops.anisodiff.ddpm_step(x_d, e_d, *dev_args, stream, noise_d)
        a_t = float(schedule.alphas_cumprod[t].sqrt())
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-5,
                                   atol=1e-5 + 2e-6 * float(x_t.abs().max()) / a_t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddpm_step_dtypes_and_layouts(dtype, schedule):
    spec = STEP_SPECS["sdm_band"](3)
    shape = (2, 3, 16, 16)
    g = torch.Generator().manual_seed(12)
    x_t = torch.randn(shape, generator=g).to(dtype).to(memory_format=torch.channels_last)
    eps_hat = torch.randn(shape, generator=g).to(dtype)
    cpu_args = step_args(spec, schedule, 500, 499, "exact", shape, "cpu")
    dev_args = step_args(spec, schedule, 500, 499, "exact", shape, DEV)
    want = torch.ops.anisodiff.ddpm_step(x_t, eps_hat, *cpu_args, torch.tensor([3, 9]), None)
    x_d, e_d = x_t.to(DEV), eps_hat.to(DEV)
    with no_sync():
        got = torch.ops.anisodiff.ddpm_step(x_d, e_d, *dev_args, torch.tensor([3, 9]), None)
    eps = torch.finfo(dtype).eps
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=eps, atol=eps)


def test_ddpm_step_matches_reference(schedule):
    spec = STEP_SPECS["two_indep_ps"](3)
    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(13)
    x_t, eps_hat = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    z = torch.stack([R.white_noise(shape, 77, 5, draw=d) for d in range(2)])
    want = R.ddpm_step(eps_hat, 500, x_t, spec, schedule, noise=z, mode="exact")
    args = step_args(spec, schedule, 500, 499, "exact", shape, DEV)
    x_d, e_d = x_t.to(DEV), eps_hat.to(DEV)
    with no_sync():
        got = torch.ops.anisodiff.ddpm_step(x_d, e_d, *args, torch.tensor([77, 5]), None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# opcheck, CUDA graphs, devices, int64 indexing
# ---------------------------------------------------------------------------------------------
def _op_samples(schedule, kind="sdm+pl_neg", H=8, W=8):
    spec = make_spec(kind, 3)
    args = ad.plan.kernel_args(spec, schedule, 3, H, W, DEV)
    x0 = torch.randn(2, 3, H, W, device=DEV)
    t = torch.tensor([3, 900], device=DEV)
    common = (t, args.coef, args.axes, args.weights, list(args.gammas), args.variant, args.normalize)
    noise = torch.randn(1, 2, 3, H, W, device=DEV)
    return x0, common, noise


@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_neg"])
def test_opcheck_add_noise(kind, schedule):
    x0, common, noise = _op_samples(schedule, kind)
    for x, n, st in [(x0, None, torch.tensor([5, 0])), (x0, noise, torch.tensor([5, 0])),
                     (x0.clone().requires_grad_(), None, torch.tensor([5, 0])),
                     (x0, None, torch.tensor([5, 0], device=DEV))]:
        torch.library.opcheck(torch.ops.anisodiff.add_noise.default, (x, *common, 1, st, n))


def test_opcheck_shaped_noise(schedule):
    _, common, noise = _op_samples(schedule)
    for n in [None, noise]:
        torch.library.opcheck(torch.ops.anisodiff.shaped_noise.default,
                              ([2, 3, 8, 8], *common, torch.tensor([5, 0], device=DEV), n, torch.float32))


def test_opcheck_ddpm_step(schedule):
    spec = STEP_SPECS["sdm_band"](3)
    shape = (2, 3, 8, 8)
    x, e = torch.randn(shape, device=DEV), torch.randn(shape, device=DEV)
    args = step_args(spec, schedule, 400, 399, "official", shape, DEV)
    torch.library.opcheck(torch.ops.anisodiff.ddpm_step.default, (x, e, *args, torch.tensor([3, 0]), None))
    torch.library.opcheck(torch.ops.anisodiff.ddpm_step.default,
                          (x, e, *args, torch.tensor([3, 0], device=DEV), torch.randn(1, *shape, device=DEV)))


def _graph(fn):
    """Capture fn() into a CUDA graph (after warm-up on a side stream); returns (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("kind,H", [("sdm", 16), ("sdm+pl_neg", 16), ("sdm+two_indep", 128)])
def test_cuda_graph_add_noise_fresh_noise_per_replay(kind, H, schedule, path):
    x0, common, _ = _op_samples(schedule, kind, H, H)
    stream = torch.tensor([SEED, OFFSET], dtype=torch.int64, device=DEV)
    graph, out = _graph(lambda: torch.ops.anisodiff.add_noise(x0, *common, 0, stream, None))
    for seed, offset in [(SEED, OFFSET), (SEED + 1, OFFSET + 1000), (2**40 + 3, 2**33)]:
        stream.copy_(torch.tensor([seed, offset]))
        graph.replay()
        want = torch.ops.anisodiff.add_noise(x0, *common, 0, torch.tensor([seed, offset]), None)
        torch.cuda.synchronize()
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    stream.copy_(torch.tensor([SEED, OFFSET]))
    graph.replay()
    first = out[1].clone()
    stream.copy_(torch.tensor([SEED, OFFSET + 1]))
    graph.replay()
    assert not torch.equal(first, out[1])


@pytest.mark.parametrize("name", ["sdm", "sdm_band"])
def test_cuda_graph_ddpm_step(name, schedule, path):
    spec = STEP_SPECS[name](3)
    shape = (2, 3, 16, 16)
    x, e = torch.randn(shape, device=DEV), torch.randn(shape, device=DEV)
    args = step_args(spec, schedule, 400, 399, "official", shape, DEV)
    stream = torch.tensor([1, 0], dtype=torch.int64, device=DEV)
    graph, out = _graph(lambda: torch.ops.anisodiff.ddpm_step(x, e, *args, stream, None))
    for seed in (1, 2):
        stream.copy_(torch.tensor([seed, 64]))
        graph.replay()
        want = torch.ops.anisodiff.ddpm_step(x, e, *args, torch.tensor([seed, 64]), None)
        torch.cuda.synchronize()
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


def test_device_stream_tensor_equals_host_stream(schedule):
    x0, common, _ = _op_samples(schedule, "sdm+pl_neg", 32, 32)
    stream = torch.tensor([9, 4], device=DEV)
    with no_sync():
        a = torch.ops.anisodiff.add_noise(x0, *common, 1, stream, None)
        b = torch.ops.anisodiff.add_noise(x0, *common, 1, torch.tensor([9, 4]), None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cuda_generator_keeps_the_stream_on_the_device(schedule):
    """A seed drawn from a CUDA generator stays on the data's device: no host sync, and the same
    generator state gives the same noise while consecutive calls differ."""
    from anisodiff.rng import stream_tensor
    g = torch.Generator(DEV).manual_seed(3)
    assert stream_tensor(None, g, 5, DEV).device.type == "cuda"
    assert stream_tensor(None, g, 5, "cpu").device.type == "cpu"        # for a CPU kernel: moved
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.randn(4, 3, 32, 32, device=DEV)
    t = torch.tensor([0, 10, 500, 999], device=DEV)
    second = api(ad.add_noise, x0, t, spec, schedule, generator=torch.Generator(DEV).manual_seed(4))
    g = torch.Generator(DEV).manual_seed(4)
    first_again = ad.add_noise(x0, t, spec, schedule, generator=g)
    second_again = ad.add_noise(x0, t, spec, schedule, generator=g)
    assert torch.equal(second[1], second_again[1])                      # same state, same noise
    assert (first_again[1] - second_again[1]).abs().max() > 0.1         # the generator advanced


def test_sampler_step_runs_the_cuda_kernel(schedule):
    """AnisotropicNoise.ddpm_step on CUDA tensors takes the fused CUDA op and matches the CPU one."""
    spec = make_spec("sdm+pl_neg", 3)
    noise = ad.AnisotropicNoise(spec, schedule)
    g = torch.Generator().manual_seed(8)
    x, eps = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    want = noise.ddpm_step(eps, 500, x, generator=torch.Generator().manual_seed(1), backend="cpu")
    got = noise.ddpm_step(eps.to(DEV), 500, x.to(DEV), generator=torch.Generator().manual_seed(1),
                          backend="cuda")
    close(got[0].cpu(), want[0])
    close(got[1].cpu(), want[1])


def test_device_mismatch_is_refused(schedule):
    x0, common, _ = _op_samples(schedule)
    with pytest.raises(RuntimeError, match="every tensor must be on"):
        torch.ops.anisodiff.add_noise(x0, common[0].cpu(), *common[1:], 1, torch.tensor([5, 0]), None)
    with pytest.raises(RuntimeError, match="stream"):
        torch.ops.anisodiff.add_noise(x0, *common, 1, torch.tensor([5, 0], dtype=torch.int32, device=DEV), None)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    x0 = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 900])
    ref = api(ad.add_noise, x0.to("cuda:0"), t.to("cuda:0"), spec, schedule, seed=SEED, backend="cuda")
    with torch.cuda.device(0):  # the op must guard the data's device itself
        out = api(ad.add_noise, x0.to("cuda:1"), t.to("cuda:1"), spec, schedule, seed=SEED, backend="cuda")
    assert out[0].device == torch.device("cuda:1")
    assert torch.equal(out[0].cpu(), ref[0].cpu()) and torch.equal(out[1].cpu(), ref[1].cpu())


def test_int64_indexing_beyond_2_31_elements(schedule):
    shape = (2, 1, 32769, 32769)  # 2^31 + 2^17 + 2 elements; H * W odd (the unaligned quad path)
    n = 2 * 32769 * 32769
    need = 3 * n * 2  # x_t and target in float16, plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(1, 1), 0.0))
    x0 = torch.zeros(1, dtype=torch.float16, device=DEV).expand(shape)  # no storage, stride 0
    t = torch.tensor([500, 999], device=DEV)
    _, eps = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, backend="cuda")
    flat = eps.reshape(-1)
    for i in [0, 5, 2**31 - 3, 2**31, 2**31 + 1, n - 7, n - 1]:
        lanes = R.randn4x(SEED, torch.tensor([OFFSET + (i >> 2)], dtype=torch.int64))
        want = float(lanes[i & 3][0])
        got = float(flat[i])
        assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), (i, got, want)
    del eps, flat
    torch.cuda.empty_cache()
