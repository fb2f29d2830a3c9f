"""Bad input gets a clear Python exception naming the argument, before any kernel runs."""
import pytest
import torch

import anisodiff as ad

from conftest import random_axes

BACKENDS = [b for b in ("cpu", "reference") if b in ad.available_backends("cpu")]


@pytest.fixture
def spec():
    return ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), ad.PowerLaw(-0.04))


@pytest.mark.parametrize("backend", BACKENDS)
class TestAddNoise:
    def test_wrong_rank(self, backend, spec, schedule):
        with pytest.raises(ValueError, match="x0: expected a 4-D"):
            ad.add_noise(torch.randn(3, 8, 8), torch.tensor([1, 2, 3]), spec, schedule, seed=0, backend=backend)

    def test_channel_mismatch(self, backend, spec, schedule):
        with pytest.raises(ValueError, match="x0: has 4 channels but the squeeze axes have 3 rows"):
            ad.add_noise(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), spec, schedule, seed=0, backend=backend)

    def test_integer_x0(self, backend, spec, schedule):
        with pytest.raises(TypeError, match="x0: expected a floating-point tensor"):
            ad.add_noise(torch.ones(2, 3, 8, 8, dtype=torch.int64), torch.tensor([1, 2]), spec, schedule,
                         seed=0, backend=backend)

    def test_not_a_tensor(self, backend, spec, schedule):
        with pytest.raises(TypeError, match="x0: expected a torch.Tensor"):
            ad.add_noise([[1.0]], torch.tensor([1]), spec, schedule, seed=0, backend=backend)

    @pytest.mark.parametrize("bad", [[-1, 3], [0, 1000], [5, 2**40]])
    def test_timesteps_out_of_range(self, backend, spec, schedule, bad):
        with pytest.raises(ValueError, match=r"timesteps: values must lie in \[0, 1000\)"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor(bad), spec, schedule, seed=0, backend=backend)

    def test_float_timesteps(self, backend, spec, schedule):
        with pytest.raises(TypeError, match="timesteps: expected integer"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), spec, schedule, seed=0,
                         backend=backend)

    def test_timesteps_wrong_length(self, backend, spec, schedule):
        with pytest.raises(ValueError, match=r"timesteps: expected a scalar or shape \[2\]"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]), spec, schedule, seed=0, backend=backend)

    def test_scalar_timestep_broadcasts(self, backend, spec, schedule):
        x0 = torch.randn(2, 3, 8, 8)
        a = ad.add_noise(x0, 7, spec, schedule, seed=3, backend=backend)
        b = ad.add_noise(x0, torch.tensor([7, 7]), spec, schedule, seed=3, backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    def test_missing_schedule(self, backend, spec):
        with pytest.raises(ValueError, match="schedule: add_noise needs a schedule"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, None, seed=0, backend=backend)

    def test_bad_schedule_type(self, backend, spec):
        with pytest.raises(TypeError, match="schedule: expected anisodiff.VPSchedule"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, "linear", seed=0, backend=backend)

    def test_unknown_target(self, backend, spec, schedule):
        with pytest.raises(ValueError, match="target: must be one of"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, schedule, seed=0,
                         target="score", backend=backend)

    def test_noise_wrong_shape(self, backend, spec, schedule):
        with pytest.raises(ValueError, match="noise: expected WHITE noise of shape"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, schedule,
                         noise=torch.randn(2, 3, 8, 9), backend=backend)

    def test_seed_and_generator(self, backend, spec, schedule):
        with pytest.raises(ValueError, match="seed/generator"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, schedule, seed=1,
                         generator=torch.Generator(), backend=backend)

    @pytest.mark.parametrize("seed,exc", [(-1, ValueError), (2**63, ValueError), (1.5, TypeError), (True, TypeError)])
    def test_bad_seed(self, backend, spec, schedule, seed, exc):
        with pytest.raises(exc, match="seed"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, schedule, seed=seed, backend=backend)

    def test_bad_offset(self, backend, spec, schedule):
        with pytest.raises(ValueError, match="offset"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), spec, schedule, seed=1, offset=-5,
                         backend=backend)

    def test_empty_batch_returns_empty(self, backend, spec, schedule):
        x_t, eps = ad.add_noise(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long), spec, schedule,
                                seed=0, backend=backend)
        assert x_t.shape == eps.shape == (0, 3, 8, 8)

    def test_spec_type(self, backend, schedule):
        with pytest.raises(TypeError, match="spec: expected anisodiff.NoiseSpec"):
            ad.add_noise(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), {"squeeze": None}, schedule, seed=0,
                         backend=backend)


def test_float64_rejected_by_kernel_but_not_reference(spec, schedule):
    x0 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    if "cpu" in BACKENDS:
        with pytest.raises(TypeError, match="x0: the cpu kernel takes float32, float16 or bfloat16"):
            ad.add_noise(x0, torch.tensor([1, 2]), spec, schedule, seed=0, backend="cpu")
    x_t, _ = ad.add_noise(x0, torch.tensor([1, 2]), spec, schedule, seed=0, backend="reference")
    assert x_t.dtype == torch.float64


def test_unknown_and_unavailable_backends(spec, schedule):
    x0 = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="backend: must be 'auto' or one of"):
        ad.add_noise(x0, torch.tensor([1, 2]), spec, schedule, seed=0, backend="fast")
    missing = ["cuda"] + ([] if "triton" in ad.available_backends("cpu") else ["triton"])
    for name in missing:  # not built / not for CPU tensors: never silently replaced
        with pytest.raises(RuntimeError, match=f"backend: '{name}' is not available"):
            ad.add_noise(x0, torch.tensor([1, 2]), spec, schedule, seed=0, backend=name)
    # Triton on the CPU only runs in its interpreter: listed (last) for tests, never "auto"
    interpreted = ad._ext._TRITON["installed"] and ad._ext._TRITON["interpret"]
    assert ("triton" in ad.available_backends("cpu")) == interpreted
    assert ad.available_backends("cpu")[0] != "triton"


def test_triton_unavailable_error_says_why(spec, schedule, monkeypatch):
    x0 = torch.randn(2, 3, 8, 8)
    monkeypatch.setitem(ad._ext._TRITON, "installed", True)
    monkeypatch.setitem(ad._ext._TRITON, "interpret", False)
    with pytest.raises(RuntimeError, match="backend: 'triton' is not available .*TRITON_INTERPRET=1"):
        ad.add_noise(x0, torch.tensor([1, 2]), spec, schedule, seed=0, backend="triton")
    monkeypatch.setitem(ad._ext._TRITON, "installed", False)
    with pytest.raises(RuntimeError, match="backend: 'triton' is not available .*triton is not installed"):
        ad.shaped_noise((2, 3, 8, 8), spec, timesteps=torch.tensor([1, 2]), schedule=schedule, seed=0,
                        backend="triton")


class TestShapedNoise:
    def test_shape_rank(self, spec, schedule):
        with pytest.raises(ValueError, match=r"shape: expected \[B, C, H, W\]"):
            ad.shaped_noise((3, 8, 8), spec, timesteps=0, schedule=schedule, seed=0)

    def test_negative_size(self, spec, schedule):
        with pytest.raises(ValueError, match="shape: sizes must be non-negative"):
            ad.shaped_noise((2, 3, -1, 8), spec, timesteps=0, schedule=schedule, seed=0)

    def test_time_varying_needs_timesteps(self, spec, schedule):
        with pytest.raises(ValueError, match="timesteps: required"):
            ad.shaped_noise((2, 3, 8, 8), spec, schedule=schedule, seed=0)

    def test_beta_profile_needs_schedule(self, spec):
        with pytest.raises(ValueError, match="schedule: required for the squeeze schedule 'beta'"):
            ad.shaped_noise((2, 3, 8, 8), spec, timesteps=torch.tensor([1, 2]), seed=0)

    def test_constant_squeeze_needs_no_timesteps(self):
        spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), 0.5, schedule="constant"))
        n = ad.shaped_noise((2, 3, 8, 8), spec, seed=0)
        assert n.shape == (2, 3, 8, 8) and torch.isfinite(n).all()

    def test_table_size_mismatch(self):
        spec = ad.NoiseSpec(spectral=ad.SpectralTable(torch.ones(8, 8)))
        with pytest.raises(ValueError, match="spectral: SpectralTable is 8x8 but the noise planes are 8x9"):
            ad.shaped_noise((1, 3, 8, 9), spec, seed=0)

    def test_bad_dtype(self, spec, schedule):
        if "cpu" not in BACKENDS:
            pytest.skip("compiled CPU ops not built")
        with pytest.raises(TypeError, match="dtype: the cpu kernel produces"):
            ad.shaped_noise((1, 3, 8, 8), spec, timesteps=0, schedule=schedule, seed=0, dtype=torch.float64)
        for backend in BACKENDS:
            with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
                ad.shaped_noise((1, 3, 8, 8), spec, timesteps=0, schedule=schedule, seed=0,
                                dtype=torch.int32, backend=backend)

    def test_apply_operator_needs_tensor(self, spec, schedule):
        with pytest.raises(TypeError, match="eps: expected a torch.Tensor"):
            ad.apply_operator([1.0], spec, timesteps=0, schedule=schedule)


class TestCovariance:
    def test_too_large(self):
        with pytest.raises(ValueError, match="too large for a dense covariance"):
            ad.covariance(ad.NoiseSpec(), (3, 64, 64))

    def test_per_sample_is_not_linear(self):
        with pytest.raises(ValueError, match="per_sample"):
            ad.covariance(ad.NoiseSpec(spectral=ad.PowerLaw(0.5), normalize="per_sample"), (1, 4, 4))

    def test_needs_timesteps(self, spec, schedule):
        with pytest.raises(ValueError, match="timesteps: required"):
            ad.covariance(spec, (3, 4, 4), schedule=schedule)


def test_white_noise_arguments():
    with pytest.raises(TypeError, match="seed"):
        ad.white_noise((4,), seed="1")
    with pytest.raises(ValueError, match="shape: sizes must be non-negative"):
        ad.white_noise((4, -2), seed=1)
    assert ad.white_noise((0, 5), seed=1).shape == (0, 5)


def test_time_independent_spec_ignores_timesteps():
    """Without a schedule, a spec that does not depend on t accepts any timestep (a sampler passes t)."""
    for spec in [ad.NoiseSpec(spectral=ad.PowerLaw(-0.04)),
                 ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), 0.5, schedule="constant"))]:
        for backend in BACKENDS:
            a = ad.shaped_noise((2, 3, 8, 8), spec, timesteps=torch.tensor([10, 500]), seed=4, backend=backend)
            b = ad.shaped_noise((2, 3, 8, 8), spec, seed=4, backend=backend)
            assert torch.equal(a, b)


def test_float32_dynamic_range_refusal_ignores_the_dc_bin():
    """PowerLaw(-1) with the papers' 1e-10 DC floor puts a weight 1e10 on DC: the kernels apply it
    to the plane mean outside the FFT, so the kernel runs it. A table whose other bins span more than
    float32 resolves is refused; the float64 reference runs it."""
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-1.0), normalize="per_sample")
    table = torch.ones(16, 16, dtype=torch.float64)
    table[1, 0] = table[-1, 0] = 1e6
    bad = ad.NoiseSpec(spectral=ad.SpectralTable(table))
    if "cpu" in BACKENDS:
        assert torch.isfinite(ad.shaped_noise((1, 1, 16, 16), spec, seed=0, backend="cpu")).all()
        table_dc = torch.ones(16, 16, dtype=torch.float64)
        table_dc[0, 0] = 1e9  # a huge DC weight alone is fine
        ad.shaped_noise((1, 1, 16, 16), ad.NoiseSpec(spectral=ad.SpectralTable(table_dc)), seed=0,
                        backend="cpu")
        with pytest.raises(ValueError, match="spectral: .* dynamic range .* backend='reference'"):
            ad.shaped_noise((1, 1, 16, 16), bad, seed=0, backend="cpu")
    assert torch.isfinite(ad.shaped_noise((1, 1, 16, 16), bad, seed=0, backend="reference")).all()


def test_more_argument_errors(schedule):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), ad.PowerLaw(-0.04))
    with pytest.raises(TypeError, match="shape: expected a sequence of ints"):
        ad.shaped_noise((2.9, 3, 8, 8), spec, timesteps=0, schedule=schedule, seed=0)
    x0 = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="seed/generator: not used when white noise is passed"):
        ad.add_noise(x0, torch.tensor([1, 2]), spec, schedule, noise=torch.randn_like(x0), seed=1)
    with pytest.raises(TypeError, match="strength: expected a real number, got bool"):
        ad.Squeeze(random_axes(3, 1), True)
    if "cpu" in BACKENDS:
        with pytest.raises(TypeError, match="eps: the cpu kernel takes"):
            ad.apply_operator(torch.randn(2, 3, 8, 8, dtype=torch.float64), spec, timesteps=0,
                              schedule=schedule, backend="cpu")


def test_specs_are_immutable():
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), ad.PowerLaw(-0.04))
    with pytest.raises(AttributeError, match="Squeeze is immutable"):
        spec.squeeze.strength = (1.0,)
    with pytest.raises(AttributeError, match="NoiseSpec is immutable"):
        spec.normalize = "none"
    with pytest.raises(AttributeError, match="PowerLaw is immutable"):
        spec.spectral.alpha = 1.0


# ---------------------------------------------------------------------------------------------
# Raw ops with a tensor on another device (issue 12 item 1)
# ---------------------------------------------------------------------------------------------
def _raw_args(schedule):
    from anisodiff.plan import kernel_args
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), ad.PowerLaw(-0.2))
    a = kernel_args(spec, schedule, 3, 8, 8, "cpu")
    return {"x0": torch.randn(2, 3, 8, 8), "timesteps": torch.tensor([1, 2]), "coef": a.coef,
            "axes": a.axes, "weights": a.weights, "stream": torch.tensor([1, 0]),
            "noise": torch.randn(1, 2, 3, 8, 8), "model_output": torch.randn(2, 3, 8, 8),
            "params": torch.zeros(2, 2 + 4 * 2)}, list(a.gammas)


def _call_raw(op, kw, gammas):
    lib = torch.ops.anisodiff
    if op == "add_noise":
        return lib.add_noise(kw["x0"], kw["timesteps"], kw["coef"], kw["axes"], kw["weights"], gammas,
                             0, 0, 0, kw["stream"], kw["noise"])
    if op == "shaped_noise":
        return lib.shaped_noise([2, 3, 8, 8], kw["timesteps"], kw["coef"], kw["axes"], kw["weights"],
                                gammas, 0, 0, kw["stream"], kw["noise"], torch.float32)
    return lib.ddpm_step(kw["x0"], kw["model_output"], kw["params"], kw["axes"], kw["weights"], gammas, 0,
                         0, 1.0, kw["stream"], kw["noise"])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled CPU ops not built")
@pytest.mark.parametrize("op,moved", [
    ("add_noise", "weights"), ("add_noise", "stream"), ("add_noise", "coef"), ("add_noise", "timesteps"),
    ("add_noise", "axes"), ("add_noise", "noise"), ("add_noise", "x0"),
    ("shaped_noise", "weights"), ("shaped_noise", "timesteps"), ("shaped_noise", "stream"),
    ("ddpm_step", "weights"), ("ddpm_step", "model_output"), ("ddpm_step", "axes"),
])
def test_raw_ops_with_one_tensor_on_meta_raise(schedule, op, moved):
    """One tensor on meta sends the call to the fake kernel; it used to return an uninitialised
    CPU tensor (values up to 1e32) as if it were the result. Now a ValueError names the tensor."""
    kw, gammas = _raw_args(schedule)
    kw[moved] = kw[moved].to("meta")
    named = {"x0": "timesteps" if op != "ddpm_step" else "model_output"}.get(moved, moved)
    with pytest.raises(ValueError, match=rf"^{named}: is on (meta|cpu)"):
        _call_raw(op, kw, gammas)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled CPU ops not built")
@pytest.mark.parametrize("op", ["add_noise", "shaped_noise", "ddpm_step"])
def test_raw_ops_all_on_meta_give_meta_results(schedule, op):
    kw, gammas = _raw_args(schedule)
    kw = {k: v.to("meta") for k, v in kw.items()}
    out = _call_raw(op, kw, gammas)
    for t in (out if isinstance(out, tuple) else (out,)):
        assert t.device.type == "meta" and t.shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# The kind of error (issue 12 item 8)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timesteps,error,match", [
    ([5000], ValueError, r"timesteps: values must lie in \[0, 1000\)"),
    ([-1], ValueError, r"timesteps: values must lie in \[0, 1000\)"),
    ([[1, 2]], ValueError, "timesteps: expected a scalar or a 1-D tensor"),
    ([True], TypeError, "timesteps: expected integer timesteps"),
    (torch.tensor([1.5]), TypeError, "timesteps: expected integer timesteps"),
])
def test_covariance_timesteps_are_checked(schedule, timesteps, error, match):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4))
    with pytest.raises(error, match=match):
        ad.covariance(spec, (3, 2, 2), timesteps=timesteps, schedule=schedule)
    # the valid edges still work, and t = 999 is not t = -1's silent wrap-around
    last = ad.covariance(spec, (3, 2, 2), timesteps=[999], schedule=schedule)
    first = ad.covariance(spec, (3, 2, 2), timesteps=[0], schedule=schedule)
    assert last.shape == (1, 12, 12) and not torch.allclose(last, first)


def test_sampler_steps_refuse_integer_tensors_and_bad_eta(schedule):
    noise = ad.AnisotropicNoise(ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4)), schedule)
    ints = torch.ones(1, 3, 4, 4, dtype=torch.int64)
    floats = torch.ones(1, 3, 4, 4)
    with pytest.raises(TypeError, match="model_output: expected a floating-point tensor"):
        noise.ddpm_step(ints, 5, floats)
    with pytest.raises(TypeError, match="sample: expected a floating-point tensor"):
        noise.ddpm_step(floats, 5, ints)
    with pytest.raises(TypeError, match="model_output: expected a floating-point tensor"):
        noise.ddim_step(ints, 5, floats)
    for eta in (float("nan"), float("inf"), -0.1, "1"):
        with pytest.raises(ValueError, match="eta: expected a finite number >= 0"):
            noise.ddim_step(floats, 5, floats, eta=eta)
    x, x0 = noise.ddim_step(floats, 5, floats, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
