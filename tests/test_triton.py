"""The Triton backend against anisodiff.reference (and the C++ CPU kernel) on the same noise stream.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): ~10 ms
per program plus numpy work, so the grid stays small (B <= 3, planes 5x7 .. 32x32). A GPU run
exercises the same tests on CUDA tensors (DEVICE below).
Also here: the custom ops (opcheck, torch.compile), backend="auto" selection, and anisodiff without
triton installed.
"""
import os
import subprocess
import sys

import pytest
import torch

import anisodiff as ad
from anisodiff import _autoselect, _ext
from anisodiff import reference as R

from conftest import random_axes, requires_compiled, requires_triton
from test_cpu_kernel import make_spec  # the spec kinds of the CPU kernel tests
from test_sampling import FUSED_SPECS

SEED, OFFSET = 1234, 7
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = "triton" in ad.available_backends(DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable for " + DEVICE.type)


def close(actual, expected, dtype=torch.float32):
    """fp32: 1e-5 (as the CPU kernel tests; a wrong constant is O(1e-2) or more); half types: one
    rounding step of the storage type."""
    actual, expected = actual.cpu(), expected.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.float(), expected.float(), rtol=eps, atol=eps)


def _add_noise_pair(x0, t, spec, schedule, **kw):
    ref = ad.add_noise(x0, t, spec, schedule, backend="reference", **kw)
    out = ad.add_noise(x0.to(DEVICE), t, spec, schedule, backend="triton", **kw)
    return out, ref


def _shaped_pair(shape, spec, schedule, t, **kw):
    ref = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, backend="reference", **kw)
    out = ad.shaped_noise(shape, spec, timesteps=t, schedule=schedule, device=DEVICE, backend="triton", **kw)
    return out, ref


# ---------------------------------------------------------------------------------------------
# Triton == reference on the same stream
# ---------------------------------------------------------------------------------------------
ALL_KINDS = ["iso", "sdm", "hdm", "pl_neg", "band", "two_shared", "two_indep", "sdm+pl_pos",
             "hdm+band", "sdm_const", "sdm_linear"]
# every kind on an odd plane (per-element stream) and a 4-aligned one; fewer on the rest
CASES = ([((2, 3, 5, 7), kind) for kind in ALL_KINDS]
         + [((2, 4, 6, 12), kind) for kind in ["iso", "sdm", "hdm", "two_indep", "sdm+pl_pos", "hdm+band",
                                                  "sdm_linear"]]
         + [((3, 1, 8, 8), kind) for kind in ["iso", "pl_neg", "two_indep"]]
         + [((1, 3, 32, 32), kind) for kind in ["sdm", "hdm+band", "pl_neg"]]
         + [((2, 3, 16, 16), kind) for kind in ["sdm_pos", "two_shared"]])


@needs_triton
@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{'x'.join(map(str, s))}-{k}" for s, k in CASES])
def test_add_noise_matches_reference(shape, kind, schedule):
    B, C, H, W = shape
    spec = make_spec(kind, C)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 0, 500][:B])
    out, ref = _add_noise_pair(x0, t, spec, schedule, seed=SEED, offset=OFFSET)
    close(out[0], ref[0])
    close(out[1], ref[1])


AXES_CASES = [(3, 2, "sdm"), (3, 2, "hdm"), (4, 2, "sdm_pos"), (4, 2, "hdm+two_indep"),
              (4, 1, "hdm"), (1, 1, "sdm+pl_neg"), (3, 1, "sdm_pos")]


@needs_triton
@pytest.mark.parametrize("C,k,kind", AXES_CASES)
def test_axes_count(C, k, kind, schedule):
    spec = make_spec(kind, C, k=k)
    out, ref = _shaped_pair((2, C, 6, 10), spec, schedule, torch.tensor([999, 3]), seed=SEED)
    close(out, ref)


NORM_CASES = [("per_sample", "cycles", "two_indep"), ("per_sample", "nyquist1", "sdm+pl_pos"),
              ("per_sample", "rmax1", "band"), ("none", "rmax1", "pl_neg"),
              ("none", "cycles", "two_shared"), ("calibrated", "nyquist1", "two_shared"),
              ("calibrated", "rmax1", "two_indep"), ("per_sample", "cycles", "sdm")]


@needs_triton
@pytest.mark.parametrize("normalize,radius,kind", NORM_CASES)
def test_normalisation_and_radius(normalize, radius, kind, schedule):
    spec = make_spec(kind, 3, normalize=normalize, radius=radius)
    out, ref = _shaped_pair((2, 3, 9, 8), spec, schedule, torch.tensor([10, 999]), seed=SEED)
    close(out, ref)


@needs_triton
def test_spectral_table(schedule):
    H, W = 10, 7
    r = R.radius(H, W)
    w = 1.0 + torch.cos(9 * r) ** 2 + (r > 0.3).double()  # symmetric, radially varying
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), 0.5), ad.SpectralTable(w))
    out, ref = _shaped_pair((2, 3, H, W), spec, schedule, torch.tensor([999, 1]), seed=3)
    close(out, ref)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_neg"])
def test_dtypes(dtype, kind, schedule):
    spec = make_spec(kind, 3)
    x0 = torch.randn(2, 3, 8, 12).to(dtype)
    t = torch.tensor([1, 999])
    out, ref = _add_noise_pair(x0, t, spec, schedule, seed=SEED)
    assert out[0].dtype == out[1].dtype == dtype
    close(out[0], ref[0], dtype)
    close(out[1], ref[1], dtype)
    noise, ref_noise = _shaped_pair((2, 3, 8, 12), spec, schedule, t, seed=SEED, dtype=dtype)
    assert noise.dtype == dtype
    close(noise, ref_noise, dtype)


@needs_triton
@pytest.mark.parametrize("target", ["epsilon", "v", "x0", "flow"])
@pytest.mark.parametrize("kind", ["sdm", "sdm+pl_pos"])
def test_targets(target, kind, schedule):
    spec = make_spec(kind, 3)
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 998])
    out, ref = _add_noise_pair(x0, t, spec, schedule, seed=SEED, target=target)
    close(out[0], ref[0])
    close(out[1], ref[1])
    # the target really is what its name says (a wrong mixing constant fails here)
    n = ref[1] if target == "epsilon" else ad.shaped_noise(x0.shape, spec, timesteps=t, schedule=schedule,
                                                           seed=SEED, backend="reference")
    a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    want = {"epsilon": n, "v": a * n - b * x0, "x0": x0, "flow": n - x0}[target]
    close(out[1], want)
    close(out[0], a * x0 + b * n)


LAYOUTS = [("channels_last", "sdm+pl_neg"), ("sliced", "sdm+pl_neg"), ("transposed_hw", "hdm+band"),
           ("expanded_noise", "sdm+pl_neg"), ("channels_last", "sdm"), ("expanded_noise", "sdm")]


@needs_triton
@pytest.mark.parametrize("layout,kind", LAYOUTS)
def test_memory_layouts(layout, kind, schedule):
    spec = make_spec(kind, 3)
    base = torch.randn(2, 3, 10, 12)
    t = torch.tensor([0, 999])
    noise = None
    if layout == "channels_last":
        x0 = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x0 = torch.randn(4, 6, 10, 24)[::2, ::2, :, ::2]
    elif layout == "transposed_hw":
        x0 = torch.randn(2, 3, 12, 10).transpose(2, 3)
    else:
        x0 = base
        noise = torch.randn(2, 3, 10, 24)[..., ::2]
    assert layout == "expanded_noise" or not x0.is_contiguous()
    stream = {"seed": SEED} if noise is None else {}
    ref = ad.add_noise(x0.contiguous(), t, spec, schedule, backend="reference",
                       noise=None if noise is None else noise.contiguous(), **stream)
    out = ad.add_noise(x0.to(DEVICE), t, spec, schedule, backend="triton",
                       noise=None if noise is None else noise.to(DEVICE), **stream)
    close(out[0], ref[0])
    close(out[1], ref[1])
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


@needs_triton
@pytest.mark.parametrize("kind", ["sdm+two_indep", "hdm"])
def test_caller_noise(kind, schedule):
    spec = make_spec(kind, 3)
    eps = torch.randn(spec.draws, 2, 3, 8, 8)[0 if spec.draws == 1 else slice(None)]
    t = torch.tensor([999, 1])
    ref = ad.apply_operator(eps, spec, timesteps=t, schedule=schedule, backend="reference")
    out = ad.apply_operator(eps.to(DEVICE), spec, timesteps=t, schedule=schedule, backend="triton")
    close(out, ref)


@needs_triton
def test_independent_two_band_uses_draws_zero_and_one(schedule):
    """Draw d of the stream has counter word 2 = d (like the CPU kernel and reference)."""
    shape, seed, offset = (2, 2, 8, 8), 4242, 13
    spec = ad.NoiseSpec(spectral=ad.TwoBand(0.6, (0, 0.3), 0.8, (0.3, 1.0), "independent"))
    d0 = R.white_noise(shape, seed, offset, draw=0)
    d1 = R.white_noise(shape, seed, offset, draw=1)
    got = ad.shaped_noise(shape, spec, seed=seed, offset=offset, device=DEVICE, backend="triton").cpu()
    close(got, R.apply_operator(torch.stack([d0, d1]), spec))
    assert (R.apply_operator(torch.stack([d0, d0]), spec) - got).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# the stream itself: tl.randn4x bit for bit
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _randn4x_probe(seed, offset, out_ptr, N: tl.constexpr):
        j = tl.arange(0, N)
        n0, n1, n2, n3 = tl.randn4x(seed, offset + j.to(tl.int64))
        tl.store(out_ptr + 4 * j + 0, n0)
        tl.store(out_ptr + 4 * j + 1, n1)
        tl.store(out_ptr + 4 * j + 2, n2)
        tl.store(out_ptr + 4 * j + 3, n3)


@needs_triton
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 5, 7)], ids=["aligned", "odd"])
@pytest.mark.parametrize("offset", [0, 2**32 - 5])
def test_white_stream_is_tl_randn4x_bit_for_bit(shape, offset):
    seed = 2**40 + 7
    n = torch.Size(shape).numel()
    probe = torch.empty(4 * 128, device=DEVICE)
    _randn4x_probe[(1,)](seed, offset, probe, N=128)
    got = ad.shaped_noise(shape, ad.NoiseSpec(), seed=seed, offset=offset, device=DEVICE, backend="triton")
    assert torch.equal(got.reshape(-1), probe[:n])
    torch.testing.assert_close(got.cpu(), R.white_noise(shape, seed, offset), rtol=0, atol=2e-6)


@needs_triton
def test_identity_specs_are_exact(schedule):
    """s = 0 and alpha = 0 reproduce the kernel's white stream bit for bit."""
    t = torch.tensor([999, 500])
    white = ad.shaped_noise((2, 3, 8, 8), ad.NoiseSpec(), seed=SEED, device=DEVICE, backend="triton")
    V = random_axes(3, 1)
    for spec in [ad.NoiseSpec(ad.Squeeze(V, 0.0)), ad.NoiseSpec(ad.Squeeze(V, 0.0, variant="heisenberg"),
                                                                ad.PowerLaw(0.0))]:
        n = ad.shaped_noise((2, 3, 8, 8), spec, timesteps=t, schedule=schedule, seed=SEED, device=DEVICE,
                            backend="triton")
        assert torch.equal(n, white)


@needs_triton
@pytest.mark.parametrize("kind", ["sdm", "two_indep"])
def test_batch_split_invariance(kind, schedule):
    spec = make_spec(kind, 3)
    t = torch.tensor([999, 0, 500])
    big = ad.shaped_noise((3, 3, 8, 8), spec, timesteps=t, schedule=schedule, seed=77, offset=9,
                          device=DEVICE, backend="triton")
    small = ad.shaped_noise((2, 3, 8, 8), spec, timesteps=t[:2], schedule=schedule, seed=77, offset=9,
                            device=DEVICE, backend="triton")
    assert torch.equal(small, big[:2])


@needs_triton
def test_generator_advances_and_reseeding_reproduces():
    spec = make_spec("sdm_const", 3)
    g = torch.Generator().manual_seed(1234)
    a = ad.shaped_noise((1, 3, 8, 8), spec, generator=g, device=DEVICE, backend="triton")
    b = ad.shaped_noise((1, 3, 8, 8), spec, generator=g, device=DEVICE, backend="triton")
    assert not torch.equal(a, b)
    g.manual_seed(1234)
    assert torch.equal(ad.shaped_noise((1, 3, 8, 8), spec, generator=g, device=DEVICE, backend="triton"), a)


# ---------------------------------------------------------------------------------------------
# Triton == the C++ CPU kernel
# ---------------------------------------------------------------------------------------------
@needs_triton
@requires_compiled
@pytest.mark.parametrize("kind,shape", [("hdm+two_indep", (2, 4, 7, 9)), ("sdm_linear", (3, 3, 5, 6)),
                                        ("sdm+pl_neg", (2, 3, 16, 16))])
def test_matches_cpu_kernel(kind, shape, schedule):
    spec = make_spec(kind, shape[1])
    x0 = torch.randn(shape)
    t = torch.tensor([999, 17, 400][:shape[0]])
    cpu = ad.add_noise(x0, t, spec, schedule, seed=SEED, offset=OFFSET, target="v", backend="cpu")
    out = ad.add_noise(x0.to(DEVICE), t, spec, schedule, seed=SEED, offset=OFFSET, target="v", backend="triton")
    close(out[0], cpu[0])
    close(out[1], cpu[1])


# ---------------------------------------------------------------------------------------------
# the custom ops: autograd, opcheck, torch.compile, checks before launch
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_gradient_flows_to_x0(schedule):
    spec = make_spec("sdm", 3)
    x0 = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 999])
    a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).to(DEVICE)
    b = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1).to(DEVICE)
    g1, g2 = torch.randn(2, 3, 4, 4, device=DEVICE), torch.randn(2, 3, 4, 4, device=DEVICE)
    for target, d in [("epsilon", 0.0), ("v", -b), ("x0", 1.0), ("flow", -1.0)]:
        x_t, tgt = ad.add_noise(x0, t, spec, schedule, seed=1, target=target, backend="triton")
        (grad,) = torch.autograd.grad((x_t * g1).sum() + (tgt * g2).sum(), x0)
        torch.testing.assert_close(grad, a * g1 + d * g2)


def _op_samples(schedule, kind="sdm+pl_neg", B=2):
    spec = make_spec(kind, 3)
    args = ad.plan.kernel_args(spec, schedule, 3, 8, 8, DEVICE)
    x0 = torch.randn(B, 3, 8, 8, device=DEVICE)
    t = torch.tensor([3, 900][:B], device=DEVICE)
    common = (t, args.coef, args.axes, args.weights, list(args.gammas), args.variant, args.normalize)
    noise = torch.randn(1, B, 3, 8, 8, device=DEVICE)
    return x0, common, noise


@needs_triton
@pytest.mark.parametrize("kind", ["sdm+pl_neg", "sdm"])
def test_opcheck(kind, schedule):
    """Schema, fake tensors, autograd registration, aot_dispatch (each case runs the op ~8 times:
    one sample keeps the spectral case cheap in the interpreter)."""
    from anisodiff.triton import ops as triton_ops  # noqa: F401 (registers the ops)
    x0, common, noise = _op_samples(schedule, kind, B=1)
    stream = torch.tensor([5, 0])
    torch.library.opcheck(torch.ops.anisodiff_triton.add_noise.default,
                          (x0.requires_grad_(), *common, 1, stream, noise if kind == "sdm" else None))
    torch.library.opcheck(torch.ops.anisodiff_triton.shaped_noise.default,
                          ([1, 3, 8, 8], *common, stream, None, torch.float16))


@needs_triton
def test_torch_compile_training_step(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    model = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEVICE)

    def step(x0, t, seed):
        x_t, v = ad.add_noise(x0, t, spec, schedule, seed=seed, target="v", backend="triton")
        return torch.nn.functional.mse_loss(model(x_t), v)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x0 = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    t = torch.tensor([1, 999])
    grads = []
    for fn, seed in ((compiled, 5), (step, 5), (compiled, 6)):
        model.zero_grad()
        x0.grad = None
        loss = fn(x0, t, seed)
        loss.backward()
        grads.append((loss.detach(), model.weight.grad.clone(), x0.grad.clone()))
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want)
    assert not torch.equal(grads[2][0], grads[0][0])  # the seed is a graph input, not a constant


@needs_triton
def test_out_of_range_timestep_in_the_op_gives_nan_not_a_crash(schedule):
    """The host checks timesteps on CPU tensors; on device tensors (no sync) the kernel clamps its
    read and turns the sample into NaN."""
    from anisodiff.triton import ops as triton_ops
    for kind in ("sdm", "sdm+pl_neg"):  # the elementwise and the spectral kernel
        x0, (_, *rest), _ = _op_samples(schedule, kind)
        bad = torch.tensor([5, 10_000], device=DEVICE)
        x_t, eps = triton_ops.add_noise(x0, bad, *rest, 0, torch.tensor([1, 0]), None)
        assert torch.isfinite(x_t[0]).all() and torch.isnan(x_t[1]).all() and torch.isnan(eps[1]).all()


@needs_triton
def test_bad_input_raises_before_any_kernel(schedule):
    spec = make_spec("sdm+pl_neg", 3)
    t = torch.tensor([1, 2])
    others = "'cuda' or 'reference'" if DEVICE.type == "cuda" else "'cpu' or 'reference'"
    with pytest.raises(ValueError, match=f"shape: the Triton spectral kernel keeps one.*backend={others}"):
        ad.add_noise(torch.randn(1, 3, 65, 64, device=DEVICE), 1, spec, schedule, seed=0, backend="triton")
    with pytest.raises(TypeError, match="noise: the triton kernel takes float32"):
        ad.add_noise(torch.randn(2, 3, 8, 8, device=DEVICE), t, spec, schedule,
                     noise=torch.randn(2, 3, 8, 8, device=DEVICE, dtype=torch.float64), backend="triton")
    with pytest.raises(TypeError, match="dtype: the triton kernel produces"):
        ad.shaped_noise((2, 3, 8, 8), spec, timesteps=t, schedule=schedule, seed=0, device=DEVICE,
                        dtype=torch.float64, backend="triton")
    from anisodiff.triton import ops as triton_ops
    args = ad.plan.kernel_args(spec, schedule, 3, 8, 8, DEVICE)
    with pytest.raises(ValueError, match="axes: has 3 rows but the noise has 4 channels"):
        triton_ops.add_noise(torch.randn(2, 4, 8, 8, device=DEVICE), t.to(DEVICE), args.coef, args.axes,
                             args.weights, list(args.gammas), 0, 0, 0, torch.tensor([0, 0]), None)


@needs_triton
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (1, 4, 60, 63)], ids=["64x64", "60x63"])
@pytest.mark.parametrize("kind,normalize", [("pl_neg", "calibrated"), ("band", "calibrated"),
                                            ("two_indep", "per_sample"), ("two_shared", "per_sample")])
def test_spectral_kernel_at_the_size_limit(shape, kind, normalize, schedule):
    """The largest sample backend="triton" takes (4 x 64 x 64 padded; the odd plane takes the
    per-element stream and zero padding): == the reference. "auto" does not pick it (it spills)."""
    B, C, H, W = shape
    assert _autoselect.triton_supports("spectral", C, H, W)
    assert not _autoselect.triton_supports("spectral", C, H, W, auto=True)
    spec = make_spec(kind, C, normalize=normalize)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out, ref = _add_noise_pair(x0, torch.tensor([640]), spec, schedule, seed=SEED, offset=OFFSET)
    close(out[0], ref[0])
    close(out[1], ref[1])


@needs_triton
def test_spectral_kernels_with_the_gpu_dft_loops(monkeypatch, schedule):
    """A GPU runs the DFT loops one table row at a time (DFT_BLOCK=1, the path compiled for sm_90
    below); the interpreter normally takes 16 rows per step. Run the GPU path here: == the reference,
    for the noise (non-square padding, both draws, per-sample normalisation) and the DDPM step."""
    from anisodiff.sampling import fused_ddpm_step
    from anisodiff.triton import ops as triton_ops
    monkeypatch.setattr(triton_ops, "_dft_block", lambda: 1)
    spec = make_spec("two_indep", 2, normalize="per_sample")
    x0 = torch.randn((1, 2, 20, 36), generator=torch.Generator().manual_seed(4))
    out, ref = _add_noise_pair(x0, torch.tensor([640]), spec, schedule, seed=SEED, offset=OFFSET)
    close(out[0], ref[0])
    close(out[1], ref[1])
    spec, x_t, eps_hat, z = _step_inputs("two_indep_ps", shape=(1, 3, 9, 8))
    want = R.ddpm_step(eps_hat, 999, x_t, spec, schedule, noise=z, prev_timestep=979)
    got = fused_ddpm_step(eps_hat.to(DEVICE), 999, x_t.to(DEVICE), spec, schedule, noise=z.to(DEVICE),
                          backend="triton", prev_timestep=979)
    _step_close(got, want, 999, x_t, schedule)


@needs_triton
@pytest.mark.parametrize("dft", [0, -1], ids=["dot-tf32x3", "dot-ieee"])
def test_spectral_kernels_with_the_dft_as_matmuls(monkeypatch, dft, schedule):
    """The DFT as matrix products (tl.dot; DFT_BLOCK 0: tf32x3 tensor cores, -1: ieee FMAs; the
    interpreter computes both in float32): == the reference at 1e-5, for the noise (non-square padding,
    both draws, per-sample normalisation, a DC weight 100x the rest) and the DDPM step."""
    from anisodiff.sampling import fused_ddpm_step
    from anisodiff.triton import ops as triton_ops
    monkeypatch.setattr(triton_ops, "_dft_block", lambda: dft)
    spec = make_spec("two_indep", 2, normalize="per_sample")
    x0 = torch.randn((1, 2, 20, 36), generator=torch.Generator().manual_seed(4))
    out, ref = _add_noise_pair(x0, torch.tensor([640]), spec, schedule, seed=SEED, offset=OFFSET)
    close(out[0], ref[0])
    close(out[1], ref[1])
    out, ref = _shaped_pair((2, 3, 16, 16), make_spec("sdm+pl_neg", 3), schedule, torch.tensor([3, 999]), seed=8)
    close(out, ref)
    spec, x_t, eps_hat, z = _step_inputs("two_indep_ps", shape=(1, 3, 9, 8))
    want = R.ddpm_step(eps_hat, 999, x_t, spec, schedule, noise=z, prev_timestep=979)
    got = fused_ddpm_step(eps_hat.to(DEVICE), 999, x_t.to(DEVICE), spec, schedule, noise=z.to(DEVICE),
                          backend="triton", prev_timestep=979)
    _step_close(got, want, 999, x_t, schedule)


@needs_triton
@pytest.mark.parametrize("hw", [(80, 72), (45, 47)], ids=["aligned", "odd"])
def test_elementwise_kernel_takes_large_planes_in_several_blocks(hw, schedule):
    """No size limit without a spatial part: a plane spans several programs (blocks of pixels)."""
    spec = make_spec("hdm", 3)
    out, ref = _shaped_pair((1, 3, *hw), spec, schedule, torch.tensor([700]), seed=9, offset=2**32 - 1)
    close(out, ref)


@needs_triton
def test_elementwise_grid_is_one_dimensional_for_any_batch():
    """The elementwise grid is 1-D, sample-major (a grid's y dimension stops at 65535): B * blocks."""
    from anisodiff.triton import ops as triton_ops
    assert triton_ops.elementwise_grid(100_000, 64 * 64, 2048) == (200_000,)
    assert triton_ops.elementwise_grid(70_000, 3, 4) == (70_000,)
    assert triton_ops.spectral_grid(1_000_000) == (1_000_000,)
    with pytest.raises(ValueError, match="split the batch"):
        triton_ops.elementwise_grid(2**20, 2**12, 1)
    with pytest.raises(ValueError, match="grid holds"):
        triton_ops.spectral_grid(2**31)


@needs_triton
@pytest.mark.parametrize("kind", ["sdm", "iso"])
def test_elementwise_programs_split_into_sample_and_block(monkeypatch, kind, schedule):
    """Several samples of several blocks each (program id = sample * blocks + block): == the reference,
    also for the DDPM step's elementwise kernel."""
    from anisodiff.sampling import fused_ddpm_step
    from anisodiff.triton import ops as triton_ops
    monkeypatch.setattr(triton_ops, "_ELEMENTWISE_TILE_INTERPRETED", 16)  # 4 pixels x CP 4: 4 blocks a plane
    spec = make_spec(kind, 3)
    out, ref = _shaped_pair((3, 3, 3, 5), spec, schedule, torch.tensor([5, 500, 999]), seed=21, offset=3)
    close(out, ref)
    x0 = torch.randn((3, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    out, ref = _add_noise_pair(x0, torch.tensor([9, 99, 999]), spec, schedule, seed=SEED, offset=OFFSET)
    close(out[0], ref[0])
    spec, x_t, eps_hat, z = _step_inputs("sdm", shape=(3, 3, 3, 5))
    want = R.ddpm_step(eps_hat, 999, x_t, spec, schedule, noise=z, prev_timestep=979)
    got = fused_ddpm_step(eps_hat.to(DEVICE), 999, x_t.to(DEVICE), spec, schedule, noise=z.to(DEVICE),
                          backend="triton", prev_timestep=979)
    _step_close(got, want, 999, x_t, schedule)


def test_device_guard_makes_the_data_device_current(monkeypatch):
    """A launch on cuda:1 while cuda:0 is current: the guard makes cuda:1 current (Triton's launcher then
    takes that device and its current stream); nothing for the CPU interpreter. No GPU needed: mocked."""
    pytest.importorskip("triton")
    from anisodiff.triton import ops as triton_ops
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with triton_ops._device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    assert entered[-1] == "exit"
    entered.clear()
    with triton_ops._device_guard(torch.device("cpu")):
        pass
    assert entered == []


@needs_triton
def test_every_op_launches_inside_the_device_guard(monkeypatch, schedule):
    """add_noise, shaped_noise and ddpm_step run their kernels inside _device_guard(data device)."""
    import contextlib

    from anisodiff.sampling import fused_ddpm_step
    from anisodiff.triton import ops as triton_ops
    state = {"inside": None, "guards": [], "launches": 0}

    @contextlib.contextmanager
    def guard(device):
        state["guards"].append(device)
        state["inside"] = device
        try:
            yield
        finally:
            state["inside"] = None

    def wrap(fn):
        def launch(*a, **k):
            assert state["inside"] is not None, "kernel launched outside the device guard"
            state["launches"] += 1
            return fn(*a, **k)
        return launch

    monkeypatch.setattr(triton_ops, "_device_guard", guard)
    monkeypatch.setattr(triton_ops, "_launch", wrap(triton_ops._launch))
    monkeypatch.setattr(triton_ops, "_launch_step", wrap(triton_ops._launch_step))
    spec = make_spec("sdm", 3)
    x0 = torch.randn((1, 3, 4, 4))
    ad.add_noise(x0.to(DEVICE), torch.tensor([3]), spec, schedule, backend="triton", seed=1)
    ad.shaped_noise((1, 3, 4, 4), spec, timesteps=torch.tensor([3]), schedule=schedule, device=DEVICE,
                    backend="triton", seed=1)
    spec_s, x_t, eps_hat, z = _step_inputs("sdm", shape=(1, 3, 4, 4))
    fused_ddpm_step(eps_hat.to(DEVICE), 999, x_t.to(DEVICE), spec_s, schedule, noise=z.to(DEVICE),
                    backend="triton", prev_timestep=979)
    assert state["launches"] == 3 and state["guards"] == [DEVICE] * 3


@needs_triton
@pytest.mark.parametrize("normalize", ["none", "per_sample"])
def test_dc_is_its_own_bin(normalize, schedule):
    """A DC weight 1e6 times the others (the papers' floor, offset noise): the other bins keep float32
    accuracy (the DC term w[0, 0] mean(e) is added outside the DFTs; the per-sample std is that of the
    rest), as anisodiff.reference.filter_parts. normalize="none": not "calibrated", which would scale the
    DC weight down with the rest."""
    H, W = 12, 10
    w = torch.ones(H, W, dtype=torch.float64) + R.radius(H, W)
    w[0, 0] = 1e6
    spec = ad.NoiseSpec(None, ad.SpectralTable(w), normalize=normalize)
    out, ref = _shaped_pair((2, 2, H, W), spec, schedule, torch.tensor([3, 900]), seed=5)
    close(out, ref)  # per_sample: a std taken with the DC term in float32 would be off by ~1e-2


# ---------------------------------------------------------------------------------------------
# backend="auto" and availability
# ---------------------------------------------------------------------------------------------
def test_preference_table_is_well_formed():
    for device, rows in _autoselect.PREFERENCE.items():
        assert set(rows) == {"elementwise", "spectral"}, device
        for kind, order in rows.items():
            assert order[-1] == "reference" and len(set(order)) == len(order)
            assert set(order) <= {"cuda", "cpu", "triton", "reference"}
    assert "triton" not in _autoselect.PREFERENCE["cpu"]["spectral"]  # the interpreter is never "auto"


@pytest.mark.parametrize("device,kind,available,plane,want", [
    ("cuda", "spectral", ["cuda", "triton", "reference"], (3, 32, 32), "cuda"),
    ("cuda", "spectral", ["triton", "reference"], (3, 16, 16), "triton"),      # no CUDA build
    ("cuda", "spectral", ["triton", "reference"], (4, 9, 30), "triton"),       # pads to 4 x 16 x 32
    ("cuda", "spectral", ["triton", "reference"], (3, 32, 16), "triton"),
    ("cuda", "spectral", ["triton", "reference"], (8, 16, 16), "reference"),   # > 4 channels (axes: spills)
    ("cuda", "spectral", ["triton", "reference"], (5, 16, 32), "reference"),   # pads to 8 x 16 x 32
    ("cuda", "spectral", ["triton", "reference"], (2, 128, 16), "triton"),     # 4096: the auto limit
    ("cuda", "spectral", ["triton", "reference"], (3, 32, 32), "triton"),      # pads to 4 x 32 x 32
    ("cuda", "spectral", ["triton", "reference"], (2, 60, 17), "triton"),      # pads to 2 x 64 x 32
    ("cuda", "spectral", ["triton", "reference"], (1, 64, 64), "triton"),
    ("cuda", "spectral", ["triton", "reference"], (5, 32, 32), "reference"),   # pads to 8 x 32 x 32
    ("cuda", "spectral", ["triton", "reference"], (2, 64, 64), "reference"),   # 64x64 planes: C = 1 only
    ("cuda", "spectral", ["triton", "reference"], (4, 64, 64), "reference"),   # explicit "triton" only
    ("cuda", "spectral", ["triton", "reference"], (3, 128, 128), "reference"),  # too big for one program
    ("cuda", "elementwise", ["triton", "reference"], (3, 512, 512), "triton"),  # no size limit
    ("cuda", "elementwise", ["reference"], None, "reference"),                  # no triton either
    ("cpu", "spectral", ["cpu", "reference", "triton"], (3, 8, 8), "cpu"),
    ("cpu", "elementwise", ["reference", "triton"], (3, 8, 8), "reference"),   # interpreter: never auto
    ("mps", "spectral", ["reference"], (3, 8, 8), "reference"),
])
def test_auto_choice(device, kind, available, plane, want):
    assert _autoselect.choose(device, kind, available, plane) == want


def test_auto_limits_are_within_the_hard_limit():
    """"auto" takes a subset of what backend="triton" takes: 4 x 64 x 64 stays explicit-only."""
    assert _autoselect.TRITON_AUTO_MAX_SAMPLE_ELEMENTS <= _autoselect.TRITON_MAX_SAMPLE_ELEMENTS
    assert _autoselect.triton_supports("spectral", 4, 64, 64)
    assert not _autoselect.triton_supports("spectral", 4, 64, 64, auto=True)
    assert not _autoselect.triton_supports("spectral", 4, 65, 64)
    assert _autoselect.triton_supports("elementwise", 3, 512, 512, auto=True)


def test_spec_kind():
    assert _autoselect.spec_kind(make_spec("sdm", 3)) == "elementwise"
    assert _autoselect.spec_kind(make_spec("iso", 3)) == "elementwise"
    assert _autoselect.spec_kind(make_spec("sdm+pl_pos", 3)) == "spectral"
    assert _autoselect.spec_kind(make_spec("sdm", 3, normalize="per_sample")) == "spectral"


def test_available_backends_order_and_auto_on_cpu(schedule):
    avail = ad.available_backends("cpu")
    assert avail[0] != "triton" and "reference" in avail
    if _ext._TRITON["installed"] and _ext._TRITON["interpret"]:
        assert avail[-1] == "triton"
    if _ext._TRITON["installed"]:
        assert ad.available_backends("cuda")[0] in ("cuda", "triton")
    auto = _ext.require_backend("auto", torch.device("cpu"), "spectral", (3, 8, 8))
    assert auto == ("cpu" if "cpu" in avail else "reference")
    x0, t, spec = torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), make_spec("sdm+pl_neg", 3)
    a = ad.add_noise(x0, t, spec, schedule, seed=1, backend="auto")
    b = ad.add_noise(x0, t, spec, schedule, seed=1, backend=auto)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_backend_errors_name_the_argument(schedule):
    x0, t, spec = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), make_spec("sdm", 3)
    with pytest.raises(ValueError, match="backend: must be 'auto' or one of"):
        ad.shaped_noise((2, 3, 8, 8), spec, timesteps=t, schedule=schedule, seed=0, backend="gpu")
    with pytest.raises(RuntimeError, match="backend: 'cuda' is not available for device 'cpu'"):
        ad.add_noise(x0, t, spec, schedule, seed=0, backend="cuda")


def test_without_triton_installed(monkeypatch, schedule):
    """A missing triton removes the backend (a clear error if asked for), never breaks the rest."""
    monkeypatch.setitem(_ext._TRITON, "installed", False)
    assert "triton" not in ad.available_backends("cpu") and "triton" not in ad.available_backends("cuda")
    x0, t, spec = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), make_spec("sdm+pl_neg", 3)
    with pytest.raises(RuntimeError, match="backend: 'triton' is not available .*triton is not installed"):
        ad.add_noise(x0, t, spec, schedule, seed=0, backend="triton")
    assert _autoselect.choose("cuda", "spectral", ad.available_backends("cuda"), (3, 8, 8)) == "reference"
    ad.add_noise(x0, t, spec, schedule, seed=0)  # auto still works


def test_import_without_triton_in_a_fresh_process():
    """`import anisodiff` and every non-Triton backend work when triton cannot be imported at all."""
    code = "\n".join([
        "import sys",
        "sys.modules['triton'] = None  # import triton -> ImportError, find_spec -> None",
        "import torch, anisodiff as ad, anisodiff.triton",
        "assert not anisodiff.triton.is_installed()",
        "assert 'triton' not in ad.available_backends('cpu'), ad.available_backends('cpu')",
        "spec = ad.NoiseSpec(spectral=ad.PowerLaw(0.3))",
        "n = ad.shaped_noise((2, 3, 8, 8), spec, seed=0)",
        "assert n.shape == (2, 3, 8, 8)",
        "try:",
        "    ad.shaped_noise((2, 3, 8, 8), spec, seed=0, backend='triton')",
        "    raise SystemExit('no error')",
        "except RuntimeError as e:",
        "    assert 'triton is not installed' in str(e), e",
        "print('ok')",
    ])
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@requires_triton
def test_triton_package_imports_lazily():
    """anisodiff.triton itself imports no kernels; load() registers the ops."""
    import anisodiff.triton as at
    assert at.is_installed()
    if HAS_TRITON:
        ops = at.load()
        assert hasattr(torch.ops.anisodiff_triton, "add_noise") and callable(ops.dft_tables)


_SM90_COMPILE = r'''
import os, re, subprocess, sys, tempfile
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from anisodiff.triton import kernels as k

def compile_for_sm90(fn, constexprs, num_warps, **options):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("timesteps_ptr", "stream_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name.startswith("gamma") or name == "clip_range" else "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **options})

def stack_bytes(compiled):
    """Per-thread stack (local memory) of the cubin, from cuobjdump -res-usage (no driver needed)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.remove(f.name)
    return int(re.search(r"STACK:(\d+)", out).group(1))

compile_for_sm90(k.squeeze_mix_kernel, dict(C=3, K=1, HEISENBERG=True, HAS_X0=True, HAS_NOISE=False,
                                            TARGET=1, ALIGNED=True, CP=4, BLOCK_PIX=256, PERTURB=False), 4)
compile_for_sm90(k.squeeze_mix_kernel, dict(C=3, K=1, HEISENBERG=True, HAS_X0=True, HAS_NOISE=True,
                                            TARGET=1, ALIGNED=True, CP=4, BLOCK_PIX=256, PERTURB=True), 4)
compile_for_sm90(k.step_elementwise_kernel, dict(C=3, K=1, CLIP=2, HAS_NOISE=False, ALIGNED=True, CP=4,
                                                 BLOCK_PIX=256), 4)
# the spectral kernels at every padded plane shape backend="auto" picks, each at its largest CP, with
# the launch options of ops (warps, maxnreg; the DFT loops of a GPU, DFT_BLOCK=1), worst case
# constexprs (two filtered draws, normalisation, clip in S^-1 coordinates, as many axes as the channels
# allow, up to 8): no local-memory spill. Two threads: ptxas runs as a subprocess.
from concurrent.futures import ThreadPoolExecutor
from anisodiff import _autoselect as sel
from anisodiff.triton import ops
shapes = [(HP, WP) for HP in (16, 32, 64, 128) for WP in (16, 32, 64, 128)
          if HP * WP <= sel.TRITON_AUTO_MAX_PLANE_ELEMENTS]
assert (32, 32) in shapes and (64, 64) in shapes
assert not sel.triton_supports("spectral", 1, 128, 64, auto=True)

def check(shape):
    HP, WP = shape
    CP = min(sel.TRITON_AUTO_MAX_SAMPLE_ELEMENTS // (HP * WP), sel.TRITON_AUTO_MAX_CHANNELS)
    assert sel.triton_supports("spectral", CP, HP, WP, auto=True)
    assert not sel.triton_supports("spectral", 2 * CP, HP, WP, auto=True)
    K = min(8, CP)
    launch = ops._spectral_launch_options(HP, WP)
    noise = compile_for_sm90(k.spectral_kernel, dict(
        C=CP, K=K, HEISENBERG=K < CP, DRAWS=2, FILTER=True, NORMALIZE=True, HAS_X0=True, HAS_NOISE=False,
        TARGET=1, ALIGNED=False, CP=CP, HP=HP, WP=WP, DFT_BLOCK=1, PERTURB=False), **launch)
    step = compile_for_sm90(k.step_spectral_kernel, dict(
        C=CP, K=K, CLIP=2, DRAWS=2, FILTER=True, NORMALIZE=True, HAS_NOISE=False, ALIGNED=False, CP=CP,
        HP=HP, WP=WP, DFT_BLOCK=1), **launch)
    for name, compiled in (("spectral_kernel", noise), ("step_spectral_kernel", step)):
        # ptxas -v: a fixed 32 B stack frame with 0 bytes spill stores (triton 3.6); a spill is more
        # (the tl.dot DFT this replaced: 32x32 planes ~600 B, 64x64 ~16 KB)
        stack = stack_bytes(compiled)
        assert stack <= 32, f"{name} CP={CP} {HP}x{WP}: {stack} B of stack per thread (spill)"

with ThreadPoolExecutor(2) as pool:
    list(pool.map(check, shapes))
print("ok")
'''


@requires_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter does not lower to a GPU, so GPU-only codegen errors (layouts, tl.dot shapes,
    dtypes) would pass here unnoticed: compile the kernels (noise and ddpm_step) to an H100 cubin with the ptxas bundled
    in triton (no driver needed), in a process without TRITON_INTERPRET. The spectral kernels are
    compiled at the largest sizes backend="auto" picks, and must not spill there (cuobjdump -res-usage,
    also bundled: the stack per thread)."""
    import importlib.util
    nvidia = importlib.util.find_spec("triton.backends.nvidia")
    if nvidia is None:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(ad.__file__))),
                                         env.get("PYTHONPATH", "")])
    # a loaded 2-core machine (several ptxas at once) took over 10 minutes (its idle time: not measured)
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# ddpm_step: torch.ops.anisodiff_triton.ddpm_step == reference.ddpm_step (== the C++ CPU step)
# ---------------------------------------------------------------------------------------------
STEP_SPECS = FUSED_SPECS  # the spec grid of the CPU step tests


def _step_inputs(name, shape=None, dtype=torch.float32):
    C = 4 if name == "hdm_k2" else 3
    spec = STEP_SPECS[name](C)
    shape = shape or (3, C, 9, 8)
    g = torch.Generator().manual_seed(11)
    x_t = (1.5 * torch.randn(shape, generator=g)).to(dtype)
    eps_hat = torch.randn(shape, generator=g).to(dtype)
    z = torch.randn((spec.draws, *shape) if spec.draws > 1 else shape, generator=g)
    return spec, x_t, eps_hat, z


def _step_close(got, want, t, x_t, schedule):
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5)
    # x0_hat = (x_t - b eps) / a: float32 cancellation amplified by 1 / a (157 at t = 999)
    a_t = float(schedule.alphas_cumprod[t].sqrt())
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-5, atol=1e-5 + 2e-6 * float(x_t.abs().max()) / a_t)


@needs_triton
@pytest.mark.parametrize("name", list(STEP_SPECS))
@pytest.mark.parametrize("mode", ["official", "exact"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t,prev", [(999, 979), (5, -1)])
def test_ddpm_step_matches_reference(name, mode, clip, t, prev, schedule):
    """Caller's white noise: == reference.ddpm_step; the canonical stream: == the C++ CPU step."""
    from anisodiff.sampling import fused_ddpm_step
    spec, x_t, eps_hat, z = _step_inputs(name)
    kw = dict(prev_timestep=prev, mode=mode, clip_sample=clip)
    want = R.ddpm_step(eps_hat, t, x_t, spec, schedule, noise=z, **kw)
    got = fused_ddpm_step(eps_hat.to(DEVICE), t, x_t.to(DEVICE), spec, schedule, noise=z.to(DEVICE),
                          backend="triton", **kw)
    _step_close(got, want, t, x_t, schedule)
    if clip and _ext.has_compiled_ops() and "cpu" in ad.available_backends("cpu"):
        stream = torch.tensor([SEED, OFFSET])
        cpu = fused_ddpm_step(eps_hat, t, x_t, spec, schedule, stream=stream, backend="cpu", **kw)
        out = fused_ddpm_step(eps_hat.to(DEVICE), t, x_t.to(DEVICE), spec, schedule, stream=stream.to(DEVICE),
                              backend="triton", **kw)
        close(out[0], cpu[0])
        close(out[1], cpu[1])


@needs_triton
@pytest.mark.parametrize("name", ["sdm", "two_indep_ps"])
def test_ddpm_step_stream_dtype_layout_and_api(name, schedule):
    """The generated step noise is the canonical stream (draw d in counter word 2); half storage
    and non-contiguous inputs; AnisotropicNoise.ddpm_step(backend="triton") uses the op."""
    from anisodiff.rng import stream_tensor
    from anisodiff.sampling import AnisotropicNoise, fused_ddpm_step
    spec, x_t, eps_hat, _ = _step_inputs(name, (2, 3, 8, 8), torch.bfloat16)
    z = torch.stack([R.white_noise(x_t.shape, 77, 5, draw=d) for d in range(spec.draws)])
    want = R.ddpm_step(eps_hat, 500, x_t, spec, schedule, noise=z if spec.draws > 1 else z[0], mode="exact")
    x_d = x_t.to(DEVICE).contiguous(memory_format=torch.channels_last)
    e_d = eps_hat.to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
    got = fused_ddpm_step(e_d, 500, x_d, spec, schedule, stream=torch.tensor([77, 5]), mode="exact",
                          backend="triton")
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and a.shape == x_t.shape
        close(a, b, torch.bfloat16)
    noise = AnisotropicNoise(spec, schedule)
    api = noise.ddpm_step(e_d, 500, x_d, mode="exact", generator=torch.Generator().manual_seed(3),
                          backend="triton")
    direct = fused_ddpm_step(e_d, 500, x_d, spec, schedule, mode="exact", backend="triton",
                             stream=stream_tensor(None, torch.Generator().manual_seed(3), 0, DEVICE))
    for a, b in zip(api, direct):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="sample: the triton ddpm_step takes float32"):
        noise.ddpm_step(e_d.double(), 500, x_d.double(), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        fused_ddpm_step(e_d, 500, x_d, spec, schedule, stream=torch.tensor([1, 0]), backend="bogus")


@needs_triton
def test_ddpm_step_opcheck_and_checks(schedule):
    """Schema and fake tensors of anisodiff_triton::ddpm_step (the args of anisodiff::ddpm_step);
    bad inputs raise before any kernel."""
    from anisodiff.triton import ops as triton_ops  # noqa: F401 (registers the ops)
    for name, B, noise in (("sdm_band", 1, False), ("hdm_k2", 2, True)):
        spec, x, e, _ = _step_inputs(name, (B, 4 if name == "hdm_k2" else 3, 8, 8))
        C = x.shape[1]
        t = torch.full((B,), 400)
        coeffs = R.ddpm_coefficients(spec, schedule, t, t - 1, "official")
        ab = R._alphas(schedule, t, B)
        cols = [ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]]
        for key in ("s", "c0", "ct", "sig"):
            cols += [coeffs[key][0][:, None], coeffs[key][1]]
        params = torch.cat(cols, 1).float().contiguous().to(DEVICE)
        spatial = ad.plan.kernel_args(R._spatial_spec(spec), None, C, 8, 8, DEVICE)
        args = [x.to(DEVICE), e.to(DEVICE), params, spec.squeeze.axes.float().contiguous().to(DEVICE),
                spatial.weights, list(spatial.gammas), spatial.normalize, 2, 1.0, torch.tensor([3, 0], device=DEVICE),
                torch.randn(1, *x.shape, device=DEVICE) if noise else None]
        torch.library.opcheck(torch.ops.anisodiff_triton.ddpm_step.default, tuple(args))
    bad = {0: (x.to(DEVICE)[0], "sample: expected a 4-D"),
           2: (params[:, :-1], "params: expected a contiguous float32"),
           7: (3, "clip: expected 0"),
           10: (torch.randn(2, *x.shape, device=DEVICE), "noise: expected shape")}
    for i, (value, message) in bad.items():
        with pytest.raises((ValueError, TypeError), match=message):
            torch.ops.anisodiff_triton.ddpm_step(*[value if j == i else a for j, a in enumerate(args)])
