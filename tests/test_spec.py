"""NoiseSpec and its building blocks: JSON round-trips and validation with clear errors."""
import os
import json

import pytest
import torch

import anisodiff as ad
from anisodiff.spec import SPEC_FORMAT, SPEC_VERSION
from conftest import random_axes

F64 = torch.float64


def _sym_table(H, W, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(H, W, dtype=F64, generator=g) + 0.05
    return 0.5 * (u + torch.roll(torch.flip(u, (0, 1)), (1, 1), (0, 1)))


# id -> (spec factory, C). Planes are 8 x 8 (the table is built for that size). Squeeze strengths
# are float32-exact here so that these tests cover the schedules/variants; the float32 rounding
# of strengths is exposed separately by test_round_trip_keeps_strength_exactly.
SPECS = {
    "white": (lambda: ad.NoiseSpec(), 3),
    "sdm_beta": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 1), -0.375)), 3),
    "sdm_constant": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 2), 0.75, schedule="constant")), 3),
    "sdm_linear_k2": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 3), [0.25, -0.5],
                                                      schedule="linear")), 4),
    "hdm": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 4), 0.625, "heisenberg")), 3),
    "hdm_alias_table": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 5), -0.3125, "hdm",
                                                        schedule=torch.rand(1000, dtype=F64))), 4),
    "powerlaw": (lambda: ad.NoiseSpec(spectral=ad.PowerLaw(0.08)), 2),
    "powerlaw_eps": (lambda: ad.NoiseSpec(spectral=ad.PowerLaw(-0.04, eps=1e-6)), 2),
    "band_nyquist1": (lambda: ad.NoiseSpec(spectral=ad.Band(0.1, 0.4), radius="nyquist1"), 1),
    "band_rmax1_none": (lambda: ad.NoiseSpec(spectral=ad.Band(0.2, 0.9), radius="rmax1",
                                             normalize="none"), 1),
    "twoband_shared": (lambda: ad.NoiseSpec(spectral=ad.TwoBand(0.6, (0, 0.3), 0.4, (0.3, 1.0))), 2),
    "twoband_indep_per_sample": (lambda: ad.NoiseSpec(
        spectral=ad.TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1.0), mixture="independent"),
        normalize="per_sample"), 2),
    "table": (lambda: ad.NoiseSpec(spectral=ad.SpectralTable(_sym_table(8, 8, 0))), 2),
    "sdm_and_powerlaw_per_sample": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 6), -0.375),
                                                         ad.PowerLaw(-0.06), normalize="per_sample"), 3),
    "hdm_and_band": (lambda: ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 7), 0.3125, "heisenberg"),
                                          ad.Band(0.0, 0.35), radius="cycles"), 4),
}


def _noise(spec, C, schedule, backend):
    B = 3
    t = torch.tensor([0, 500, 999])
    return ad.shaped_noise((B, C, 8, 8), spec, timesteps=t, schedule=schedule, seed=2024, offset=5,
                           backend=backend)


def _assert_same_spec(a, b):
    assert a == b and hash(a) == hash(b)
    assert a.to_dict() == b.to_dict()
    assert a.normalize == b.normalize and a.radius == b.radius
    assert type(a.spectral) is type(b.spectral)
    if a.squeeze is not None:
        assert torch.equal(a.squeeze.axes, b.squeeze.axes)
        assert a.squeeze.strength == b.squeeze.strength and a.squeeze.variant == b.squeeze.variant
        if isinstance(a.squeeze.schedule, str):
            assert a.squeeze.schedule == b.squeeze.schedule
        else:
            assert torch.equal(a.squeeze.schedule, b.squeeze.schedule)
    if isinstance(a.spectral, ad.SpectralTable):
        assert torch.equal(a.spectral.weights, b.spectral.weights)


@pytest.mark.parametrize("name", list(SPECS))
def test_dict_and_json_round_trip(schedule, name):
    make, C = SPECS[name]
    spec = make()
    d = spec.to_dict()
    assert d["format"] == SPEC_FORMAT and d["version"] == SPEC_VERSION
    text = json.dumps(d, allow_nan=False)                     # plain, strict JSON
    back = ad.NoiseSpec.from_dict(json.loads(text))
    _assert_same_spec(spec, back)
    back2 = ad.NoiseSpec.from_json(spec.to_json())
    _assert_same_spec(spec, back2)
    # identical noise: the reference uses the objects directly (no caching by JSON)
    for backend in ("reference", "cpu"):
        assert torch.equal(_noise(spec, C, schedule, backend), _noise(back, C, schedule, backend))


@pytest.mark.parametrize("name", list(SPECS))
def test_save_load_round_trip(tmp_path, schedule, name):
    make, C = SPECS[name]
    spec = make()
    path = tmp_path / f"{name}.json"
    spec.save(path)
    raw = json.loads(path.read_text(encoding="utf-8"))         # human-readable JSON on disk
    assert raw["format"] == SPEC_FORMAT
    loaded = ad.NoiseSpec.load(path)
    _assert_same_spec(spec, loaded)
    assert torch.equal(_noise(spec, C, schedule, "reference"), _noise(loaded, C, schedule, "reference"))
    assert torch.equal(_noise(spec, C, schedule, "auto"), _noise(loaded, C, schedule, "auto"))
    loaded_str = ad.NoiseSpec.load(str(path))
    assert loaded_str == spec


@pytest.mark.parametrize("s", [-0.4, 0.3])
def test_round_trip_keeps_strength_exactly(tmp_path, schedule, s):
    k = 1 if isinstance(s, float) else len(s)
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(4, k, 0), s))
    path = tmp_path / "spec.json"
    spec.save(path)
    loaded = ad.NoiseSpec.load(path)
    assert loaded == spec
    assert torch.equal(_noise(spec, 4, schedule, "reference"), _noise(loaded, 4, schedule, "reference"))


def test_round_trip_distinguishes_specs():
    """Equality is not vacuous: a changed field changes the JSON and the noise."""
    a = ad.NoiseSpec(spectral=ad.PowerLaw(0.08))
    b = ad.NoiseSpec(spectral=ad.PowerLaw(0.08), radius="rmax1")
    c = ad.NoiseSpec(spectral=ad.PowerLaw(0.08), normalize="none")
    assert a != b and a != c and b != c
    na, nb = (ad.shaped_noise((1, 1, 8, 8), s, seed=1, backend="reference") for s in (a, b))
    assert not torch.equal(na, nb)


def test_hdm_alias_is_stored_as_heisenberg():
    sq = ad.Squeeze(random_axes(3, 1, 0), 0.4, "hdm")
    assert sq.variant == "heisenberg" and sq.to_dict()["variant"] == "heisenberg"


def test_missing_optional_fields_take_defaults():
    spec = ad.NoiseSpec.from_dict({"spectral": {"type": "power_law", "alpha": 0.5}})
    assert spec.normalize == "calibrated" and spec.radius == "cycles" and spec.squeeze is None
    assert spec.spectral.eps == 1e-10
    sq = ad.NoiseSpec.from_dict({"squeeze": {"axes": [[1.0], [0.0], [0.0]], "strength": [0.3]}})
    assert sq.squeeze.variant == "sdm" and sq.squeeze.schedule == "beta"


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_non_orthonormal_axes_rejected_and_fixed():
    A = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=F64)
    with pytest.raises(ValueError, match="axes.*orthonormal"):
        ad.Squeeze(A, 0.3)
    sq = ad.Squeeze(A, 0.3, orthonormalize=True)
    V = sq.axes
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
    # same span, and the first column keeps its direction and sign
    P = V @ V.T
    torch.testing.assert_close(P @ A, A, rtol=0, atol=1e-12)
    torch.testing.assert_close(V[:, 0], A[:, 0] / A[:, 0].norm(), rtol=0, atol=1e-12)
    # a merely non-unit column is also rejected
    with pytest.raises(ValueError, match="axes"):
        ad.Squeeze(torch.tensor([[2.0], [0.0], [0.0]]), 0.3)
    with pytest.raises(ValueError, match="axes"):
        ad.Squeeze(torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]), 0.3, orthonormalize=True)


@pytest.mark.parametrize("axes,match", [
    (torch.zeros(2, 3), "axes"),                       # k > C
    (torch.ones(3), "axes"),                           # not 2-D
    (torch.tensor([[float("nan")], [0.0], [0.0]]), "axes"),
])
def test_bad_axes(axes, match):
    with pytest.raises(ValueError, match=match):
        ad.Squeeze(axes, 0.1)


def test_spectral_table_validation():
    good = _sym_table(6, 5, 1)
    ad.SpectralTable(good)
    nan = good.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights"):
        ad.SpectralTable(nan)
    neg = good.clone()
    neg[0, 0] = -0.1
    with pytest.raises(ValueError, match="weights.*>= 0"):
        ad.SpectralTable(neg)
    asym = good.clone()
    asym[1, 2] += 0.5                                  # its mirror [-1 % 6, -2 % 5] = [5, 3] unchanged
    with pytest.raises(ValueError, match="weights.*symmetric"):
        ad.SpectralTable(asym)
    with pytest.raises(ValueError, match="weights"):
        ad.SpectralTable(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="weights"):
        ad.SpectralTable(torch.ones(4))


def test_spectral_table_size_mismatch_names_spectral():
    spec = ad.NoiseSpec(spectral=ad.SpectralTable(_sym_table(6, 6, 0)))
    with pytest.raises(ValueError, match="spectral"):
        ad.shaped_noise((1, 1, 8, 8), spec, seed=0, backend="reference")


@pytest.mark.parametrize("ctor,match", [
    (lambda: ad.Band(0.5, 0.2), "band"),
    (lambda: ad.Band(-0.1, 0.2), "band"),
    (lambda: ad.Band(float("nan"), 0.2), "band"),
    (lambda: ad.TwoBand(0.5, (0.3, 0.1), 0.5, (0.5, 1.0)), "low"),
    (lambda: ad.TwoBand(0.5, (0.0, 0.5), 0.5, (-0.5, 1.0)), "high"),
    (lambda: ad.TwoBand(-0.1, (0, 0.5), 0.5, (0.5, 1.0)), "gamma_low"),
    (lambda: ad.TwoBand(0.5, (0, 0.5), -1.0, (0.5, 1.0)), "gamma_high"),
    (lambda: ad.TwoBand(0.0, (0, 0.5), 0.0, (0.5, 1.0)), "gamma"),
    (lambda: ad.TwoBand(0.5, (0, 0.5), 0.5, (0.5, 1.0), mixture="sum"), "mixture"),
    (lambda: ad.PowerLaw(-0.1, eps=0.0), "eps"),
    (lambda: ad.PowerLaw(0.1, eps=-1e-3), "eps"),
    (lambda: ad.PowerLaw(float("inf")), "alpha"),
    (lambda: ad.Squeeze(random_axes(3, 1, 0), 0.1, variant="quantum"), "variant"),
    (lambda: ad.Squeeze(random_axes(3, 1, 0), 0.1, schedule="cosine"), "schedule"),
    (lambda: ad.Squeeze(random_axes(3, 3, 0), 0.1, variant="heisenberg"), "variant"),
    (lambda: ad.Squeeze(random_axes(4, 2, 0), [0.1, 0.2, 0.3]), "strength"),
    (lambda: ad.Squeeze(random_axes(4, 2, 0), float("nan")), "strength"),
    (lambda: ad.Squeeze(random_axes(3, 1, 0), 0.1, schedule=torch.tensor([[0.1]])), "schedule"),
    (lambda: ad.NoiseSpec(normalize="std"), "normalize"),
    (lambda: ad.NoiseSpec(radius="pixels"), "radius"),
])
def test_invalid_arguments_raise_with_name(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="squeeze"):
        ad.NoiseSpec(squeeze="sdm")
    with pytest.raises(TypeError, match="spectral"):
        ad.NoiseSpec(spectral=0.5)
    with pytest.raises(TypeError, match="band"):
        ad.Band(0.1, "x")
    with pytest.raises(TypeError, match="low"):
        ad.TwoBand(0.5, 0.3, 0.5, (0.5, 1.0))
    with pytest.raises(TypeError, match="low"):
        ad.TwoBand(0.5, (0.0, 0.5, 0.7), 0.5, (0.5, 1.0))
    with pytest.raises(TypeError, match="alpha"):
        ad.PowerLaw("steep")


def test_heisenberg_k_less_than_c_is_fine():
    sq = ad.Squeeze(random_axes(3, 2, 0), 0.1, variant="heisenberg")
    assert sq.k == 2 and sq.variant == "heisenberg"


# -- deserialisation errors -------------------------------------------------------------------
def _valid_dict():
    return ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), 0.5), ad.PowerLaw(0.1)).to_dict()


def _with(path, value):
    d = _valid_dict()
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


@pytest.mark.parametrize("d,match", [
    (_with(("version",), SPEC_VERSION + 1), "version.*newer"),
    (_with(("version",), 0), "version"),
    (_with(("version",), "1"), "version"),
    (_with(("format",), "diffusers.Scheduler"), "format"),
    (_with(("extra",), 1), "unknown field"),
    (_with(("squeeze", "bogus"), 1), "squeeze.*unknown field"),
    (_with(("spectral", "beta"), 1), "spectral.*unknown field"),
    (_with(("spectral", "type"), "gaussian"), "spectral.type"),
    (_with(("spectral",), {"alpha": 0.1}), "spectral"),
    (_with(("spectral",), [0.1]), "spectral"),
    (_with(("normalize",), "l2"), "normalize"),
    (_with(("radius",), "nyq"), "radius"),
    (_with(("squeeze", "variant"), "xdm"), "variant"),
    (_with(("squeeze", "schedule"), "cosine"), "schedule"),
    (_with(("squeeze", "axes"), [[1.0], [1.0], [0.0]]), "axes"),
    ([1, 2, 3], "spec"),
    ("a string", "spec"),
])
def test_from_dict_rejects(d, match):
    with pytest.raises(ValueError, match=match):
        ad.NoiseSpec.from_dict(d)


def test_from_dict_valid_baseline():
    """The mutations above start from a dict that loads."""
    assert ad.NoiseSpec.from_dict(_valid_dict()).spectral.alpha == 0.1


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[]", "spec"),
    ('{"format": "anisodiff.NoiseSpec", "version": 99}', "version"),
    ('{"format": "anisodiff.NoiseSpec", "version": 1, "colour": true}', "unknown field"),
])
def test_from_json_and_load_reject(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        ad.NoiseSpec.from_json(text)
    path = tmp_path / "bad_spec.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        ad.NoiseSpec.load(path)
    assert "bad_spec.json" in str(info.value)                 # load names the file


@pytest.mark.parametrize("betas", [
    [0.0, 0.1], [-0.01, 0.1], [0.5, 1.5], [0.1, float("nan")], [0.1, float("inf")],
])
def test_vp_schedule_betas_outside_half_open_unit_interval(betas):
    with pytest.raises(ValueError, match="betas"):
        ad.VPSchedule(torch.tensor(betas))


def test_vp_schedule_zero_terminal_snr():
    """beta_T = 1 (diffusers rescale_betas_zero_snr) is a valid schedule: abar_T = 0, x_T = n."""
    s = ad.VPSchedule(torch.tensor([0.1, 0.5, 1.0]))
    assert s.alphas_cumprod[-1] == 0
    x0 = torch.randn(2, 3, 4, 4)
    x_t, eps = ad.add_noise(x0, torch.tensor([2, 2]), ad.NoiseSpec(), s, seed=1)
    assert torch.equal(x_t, eps)


def test_vp_schedule_valid_and_shape_errors():
    s = ad.VPSchedule(torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.72]))
    with pytest.raises(ValueError, match="betas"):
        ad.VPSchedule(torch.zeros(2, 2) + 0.1)
    with pytest.raises(ValueError, match="betas"):
        ad.VPSchedule(torch.tensor([]))


@pytest.mark.parametrize("band,radius", [((0.8, 0.9), "cycles"), ((0.72, 1.0), "cycles"),
                                         ((0.01, 0.02), "cycles"), ((1.5, 2.0), "nyquist1")])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_band_raises_when_drawn(band, radius, backend):
    """A band that selects no bin on the grid is a spec valid in general (it depends on H, W) but
    must fail with an error naming 'spectral' when noise is drawn, not silently give zeros/NaNs."""
    spec = ad.NoiseSpec(spectral=ad.Band(*band), radius=radius)
    with pytest.raises(ValueError, match="spectral"):
        ad.shaped_noise((1, 1, 32, 32), spec, seed=0, backend=backend)
    with pytest.raises(ValueError, match="spectral"):
        ad.covariance(spec, (1, 8, 8))
    # an empty band of a two-band mix with gamma > 0 is also an error, in either mixture: for an
    # independent mix that draw would be 0/0 after its own normalisation, and a shared mix would
    # silently become a single band (almost surely a radius-convention mistake)
    for mixture in ("independent", "shared"):
        two = ad.NoiseSpec(spectral=ad.TwoBand(0.5, (0.0, 0.3), 0.5, band, mixture), radius=radius)
        with pytest.raises(ValueError, match="spectral: the high band"):
            ad.shaped_noise((1, 1, 32, 32), two, seed=0, backend=backend)


def test_nonempty_band_on_same_grid_draws():
    """Control for the test above: [0.7, 0.8] holds one bin (the corner) at 32 x 32."""
    spec = ad.NoiseSpec(spectral=ad.Band(0.7, 0.8))
    x = ad.shaped_noise((1, 1, 32, 32), spec, seed=0, backend="reference")
    assert torch.isfinite(x).all() and x.abs().max() > 0
    # a single corner bin (-1/2, -1/2): the noise is a checkerboard
    sign = (-1.0) ** (torch.arange(32)[:, None] + torch.arange(32)[None, :])
    ratio = x[0, 0] / (x[0, 0, 0, 0] * sign)
    torch.testing.assert_close(ratio, torch.ones(32, 32), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Specs own their tensors (issue 12 item 2)
# ---------------------------------------------------------------------------------------------
def test_spec_tensors_cannot_be_changed_from_outside(schedule):
    """Mutating the caller's tensors, or the tensors a spec hands out, changes nothing: the cpu
    kernel (which caches the lowering by the spec's JSON) and the reference still agree, and the
    spec still equals a fresh copy of itself. Before, ``spec.squeeze.axes[...] = ...`` changed what
    the reference saw while the kernel kept the old lowering (relative difference 0.86)."""
    axes = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    sched_table = torch.linspace(0, 1, 1000, dtype=torch.float64)
    table = torch.ones(4, 4, dtype=torch.float64)
    spec = ad.NoiseSpec(ad.Squeeze(axes, -0.4, schedule=sched_table), ad.SpectralTable(table))
    frozen = spec.to_json()
    t = torch.tensor([500])
    before = ad.shaped_noise((1, 3, 4, 4), spec, timesteps=t, seed=0, backend="reference")
    for tensor in (axes, sched_table, table, spec.squeeze.axes, spec.squeeze.schedule,
                   spec.spectral.weights):
        tensor.mul_(-3.0).add_(0.5)
    assert spec.to_json() == frozen and spec == ad.NoiseSpec.from_json(frozen)
    assert torch.equal(spec.squeeze.axes, torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64))
    ref = ad.shaped_noise((1, 3, 4, 4), spec, timesteps=t, seed=0, backend="reference")
    assert torch.equal(ref, before)
    if ad.build_info().get("cpu"):
        cpu = ad.shaped_noise((1, 3, 4, 4), spec, timesteps=t, seed=0, backend="cpu")
        torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-5)


def test_spec_tensor_attributes_are_copies_of_the_right_values():
    axes = torch.tensor([[0.6], [0.8]], dtype=torch.float32)
    sq = ad.Squeeze(axes, 0.3)
    assert sq.axes.dtype == torch.float64 and torch.allclose(sq.axes, axes.double())
    assert sq.axes.data_ptr() != sq.axes.data_ptr()  # a fresh copy every time
    assert sq.channels == 2 and sq.k == 1 and sq.schedule == "beta"
    w = ad.SpectralTable(torch.ones(3, 3)).weights
    assert torch.equal(w, torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(AttributeError, match="immutable"):
        sq.axes = axes


# ---------------------------------------------------------------------------------------------
# Bounded reads and the kind of error (issue 12 items 7 and 8)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_load_and_from_pretrained_read_a_bounded_amount(tmp_path):
    with pytest.raises(ValueError, match=r"/dev/zero: spec: larger than 64 MiB"):
        ad.NoiseSpec.load("/dev/zero")
    (tmp_path / "anisodiff_noise.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"noise config: larger than 64 MiB"):
        ad.AnisotropicNoise.from_pretrained(tmp_path)


@pytest.mark.parametrize("content,match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"\xff\xfe\x00 not utf-8", "not a UTF-8 JSON text file"),
    (b'{"format": "anisodiff.AnisotropicNoise", "version": "2"}', r"version: expected a positive integer, got '2'"),
    (b'{"format": "anisodiff.AnisotropicNoise", "version": 7}', "newer than this anisodiff"),
    (b"{not json", "not valid JSON"),
])
def test_from_pretrained_malformed_files_raise_value_error(tmp_path, content, match):
    (tmp_path / "anisodiff_noise.json").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        ad.AnisotropicNoise.from_pretrained(tmp_path)
    (tmp_path / "spec.json").write_bytes(content)
    if b"AnisotropicNoise" not in content:
        with pytest.raises(ValueError, match=match):
            ad.NoiseSpec.load(tmp_path / "spec.json")


@pytest.mark.parametrize("spectral,match", [
    ({"type": "power_law"}, r"spectral\.alpha: missing"),
    ({"type": "band", "a": 0.1}, r"spectral\.b: missing"),
    ({"type": "two_band", "gamma_low": 1, "low": [0, 0.2], "gamma_high": 1}, r"spectral\.high: missing"),
    ({"type": "table"}, r"spectral\.weights: missing"),
])
def test_from_dict_missing_spectral_fields_name_the_field(spectral, match):
    with pytest.raises(ValueError, match=match):
        ad.NoiseSpec.from_dict({"spectral": spectral})


def test_complex_spectral_table_is_refused():
    with pytest.raises(TypeError, match="weights: .*real numbers.*complex"):
        ad.SpectralTable(torch.ones(4, 4, dtype=torch.complex64))


def test_error_messages_do_not_echo_huge_arguments():
    huge = "x" * 10_000_000
    for make in (lambda: ad.NoiseSpec(normalize=huge), lambda: ad.NoiseSpec(radius=huge),
                 lambda: ad.Squeeze(torch.eye(3)[:, :1], variant=huge),
                 lambda: ad.NoiseSpec.from_dict({"spectral": {"type": huge}}),
                 lambda: ad.NoiseSpec.from_dict({"version": huge}),
                 lambda: ad.NoiseSpec.from_dict({huge: 1}),
                 lambda: ad.Band(*[huge, 1])):
        with pytest.raises((ValueError, TypeError)) as info:
            make()
        assert len(str(info.value)) < 400, str(info.value)[:200]
