"""Property-based tests (hypothesis): every kernel backend available on the CPU (the fused C++ kernel,
and the Triton kernels when the interpreter is on) against anisodiff.reference over random shapes,
dtypes, memory layouts, spec kinds, normalisations, radius conventions and targets.

Every drawn case is either valid, and then both backends must agree (float32: 1e-5 relative to the
output's scale; float16/bfloat16: one rounding step of the storage type), or invalid, and then the
documented ValueError must come from the constructor or from BOTH backends. Invalid cases are
asserted, never filtered out. Examples are derandomised, so CI runs the same cases every time.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import anisodiff as ad
from anisodiff import reference as R

from conftest import random_axes, requires_compiled

pytestmark = requires_compiled

SCHEDULE = ad.VPSchedule.linear(T=1000)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RADIUS_MAX = {"cycles": math.sqrt(0.5), "nyquist1": 2 * math.sqrt(0.5), "rmax1": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One kernel thread: the comparisons here do not depend on it (test_robustness.py checks that
    every spec kind and op is bit-identical with 1 and 2 threads), and a loaded 2-core CI machine
    makes each 2-thread launch of these tiny problems wait for a descheduled thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# strategies: plain data describing a case; specs are built in the test so that invalid ones can
# be asserted to raise
# ---------------------------------------------------------------------------------------------
sizes = st.integers(1, 17)  # includes the primes 2, 3, 5, 7, 11, 13, 17 (generic FFT butterflies)


@st.composite
def squeeze_params(draw, C: int, variant: str):
    k = draw(st.integers(1, C))
    per_axis = draw(st.booleans())
    strength_st = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False)
    strength = draw(st.lists(strength_st, min_size=k, max_size=k)) if per_axis else draw(strength_st)
    schedule = draw(st.sampled_from(["beta", "constant", "linear", "table"]))
    return {"k": k, "variant": variant, "strength": strength, "schedule": schedule,
            "axes_seed": draw(st.integers(0, 10_000))}


def _edge(draw, radius: str, H: int, W: int) -> float:
    """A band edge: uniform, or exactly one of the grid's radii (inclusive edges are tested)."""
    if draw(st.booleans()):
        r = R.radius(H, W, radius).flatten().unique()
        return float(r[draw(st.integers(0, r.numel() - 1))])
    return draw(st.floats(0.0, RADIUS_MAX[radius] * 1.1, allow_nan=False))


@st.composite
def band_pair(draw, radius, H, W):
    a, b = sorted((_edge(draw, radius, H, W), _edge(draw, radius, H, W)))
    return (a, b)


@st.composite
def spectral_params(draw, kind: str | None, radius: str, H: int, W: int):
    if kind is None:
        return None
    if kind == "power_law":
        return {"kind": kind, "alpha": draw(st.floats(-0.3, 0.3, allow_nan=False)),
                "eps": draw(st.sampled_from([1e-10, 1e-3]))}
    if kind == "band":
        return {"kind": kind, "band": draw(band_pair(radius, H, W))}
    if kind == "two_band":
        gamma = st.one_of(st.just(0.0), st.floats(0.05, 1.0))
        return {"kind": kind, "gamma_low": draw(gamma), "low": draw(band_pair(radius, H, W)),
                "gamma_high": draw(gamma), "high": draw(band_pair(radius, H, W)),
                "mixture": draw(st.sampled_from(["shared", "independent"]))}
    # a symmetric table, sometimes built for the wrong plane size (must be refused)
    return {"kind": kind, "seed": draw(st.integers(0, 10_000)),
            "shape": draw(st.sampled_from([(H, W), (H, W), (H, W), (H + 1, W)]))}


@st.composite
def cases(draw, op: str, spectral_kind: str | None):
    B, C, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(sizes), draw(sizes)
    radius = draw(st.sampled_from(list(RADIUS_MAX)))
    case = {
        "op": op, "shape": (B, C, H, W),
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
        "target": draw(st.sampled_from(["epsilon", "v", "x0", "flow"])),
        "normalize": draw(st.sampled_from(["calibrated", "per_sample", "none"])),
        "radius": radius,
        "squeeze": None,
        "spectral": draw(spectral_params(spectral_kind, radius, H, W)),
        "seed": draw(st.integers(0, 2**63 - 1)),
        "offset": draw(st.integers(0, 2**40)),
        "timesteps": draw(st.lists(st.integers(0, 999), min_size=B, max_size=B)),
        "data_seed": draw(st.integers(0, 2**31)),
    }
    variant = draw(st.sampled_from([None, "sdm", "heisenberg"]))
    if variant is not None:
        case["squeeze"] = draw(squeeze_params(C, variant))
    return case


# ---------------------------------------------------------------------------------------------
# building the spec; the oracle of what is invalid
# ---------------------------------------------------------------------------------------------
def _sym_table(shape, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, dtype=torch.float64, generator=g) + 0.05
    return 0.5 * (u + torch.roll(torch.flip(u, (0, 1)), (1, 1), (0, 1)))


def _selects_bin(band, radius, H, W) -> bool:
    """Independent of anisodiff: does the inclusive band hold a bin of the unshifted fftfreq grid?"""
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    r = torch.sqrt(fx**2 + fy**2)
    r = {"cycles": r, "nyquist1": 2 * r, "rmax1": r / r.max() if r.max() > 0 else r}[radius]
    return bool(((r >= band[0]) & (r <= band[1])).any())


def build_spec(case):
    """The NoiseSpec of a case, or None after asserting that its construction raises."""
    B, C, H, W = case["shape"]
    sq = None
    if case["squeeze"] is not None:
        p = case["squeeze"]
        schedule = p["schedule"]
        if schedule == "table":
            g = torch.Generator().manual_seed(p["axes_seed"])
            schedule = torch.rand(SCHEDULE.num_train_timesteps, dtype=torch.float64, generator=g)
        args = (random_axes(C, p["k"], seed=p["axes_seed"]), p["strength"])
        if p["variant"] == "heisenberg" and p["k"] >= C:
            with pytest.raises(ValueError, match=r"variant: 'heisenberg' needs k < C"):
                ad.Squeeze(*args, variant="heisenberg", schedule=schedule)
            return None
        sq = ad.Squeeze(*args, variant=p["variant"], schedule=schedule)
    sp = None
    if case["spectral"] is not None:
        p = case["spectral"]
        if p["kind"] == "power_law":
            sp = ad.PowerLaw(p["alpha"], eps=p["eps"])
        elif p["kind"] == "band":
            sp = ad.Band(*p["band"])
        elif p["kind"] == "table":
            sp = ad.SpectralTable(_sym_table(p["shape"], p["seed"]))
        else:
            args = (p["gamma_low"], p["low"], p["gamma_high"], p["high"], p["mixture"])
            if p["gamma_low"] == 0 and p["gamma_high"] == 0:
                with pytest.raises(ValueError, match="gamma_low/gamma_high: at least one must be > 0"):
                    ad.TwoBand(*args)
                return None
            sp = ad.TwoBand(*args)
    return ad.NoiseSpec(sq, sp, normalize=case["normalize"], radius=case["radius"])


def expected_error(case) -> str | None:
    """The documented ValueError (a regex) that drawing noise for this case must raise, or None."""
    _, _, H, W = case["shape"]
    p, radius = case["spectral"], case["radius"]
    if p is None:
        return None
    if p["kind"] == "band" and not _selects_bin(p["band"], radius, H, W):
        return r"spectral: Band\(.*\) selects no frequency bin"
    if p["kind"] == "two_band":
        for name in ("low", "high"):
            if p[f"gamma_{name}"] > 0 and not _selects_bin(p[name], radius, H, W):
                return f"spectral: the {name} band .* selects no frequency bin"
    if p["kind"] == "table" and tuple(p["shape"]) != (H, W):
        return "spectral: SpectralTable is .* but the noise planes are"
    return None


# ---------------------------------------------------------------------------------------------
# inputs with a layout
# ---------------------------------------------------------------------------------------------
def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` held in the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() != 4:  # [2, B, C, H, W] caller noise: no 5-D channels_last, use a permuted view
            return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return t.contiguous(memory_format=torch.channels_last)
    # a sliced view: every other element of a twice-as-wide buffer, offset by one
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
    view = wide[..., 1::2]
    view.copy_(t)
    assert t.shape[-1] == 1 or not view.is_contiguous()
    return view


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """float32: 1e-5 relative, absolute error scaled by the output's magnitude (the spatial filter
    mixes a whole plane, so errors follow the plane's scale); half types: one rounding step."""
    assert actual.dtype == expected.dtype == dtype, what
    assert actual.shape == expected.shape, what
    exp = expected.double()
    finite = torch.isfinite(exp)
    scale = max(1.0, float(exp[finite].abs().max())) if finite.any() else 1.0
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(actual.double(), exp, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def make_input(case, spec):
    """x0 (add_noise) or white eps (apply_operator) in the case's dtype and layout; None otherwise."""
    B, C, H, W = case["shape"]
    dtype = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(case["data_seed"])
    if case["op"] == "add_noise":
        return with_layout((2 * torch.randn(B, C, H, W, generator=g)).to(dtype), case["layout"])
    if case["op"] == "apply_operator":
        shape = (B, C, H, W) if spec.draws == 1 else (spec.draws, B, C, H, W)
        return with_layout(torch.randn(shape, generator=g).to(dtype), case["layout"])
    return None


def run_one(case, spec, backend, data=None):
    """The case's op on one backend, as a tuple of tensors."""
    B, C, H, W = case["shape"]
    dtype = DTYPES[case["dtype"]]
    t = torch.tensor(case["timesteps"], dtype=torch.int64)
    if case["op"] == "add_noise":
        x0 = torch.zeros(B, C, H, W, dtype=dtype) if data is None else data
        return ad.add_noise(x0, t, spec, SCHEDULE, seed=case["seed"], offset=case["offset"],
                            target=case["target"], backend=backend)
    if case["op"] == "shaped_noise":
        return (ad.shaped_noise((B, C, H, W), spec, timesteps=t, schedule=SCHEDULE, seed=case["seed"],
                                offset=case["offset"], dtype=dtype, backend=backend),)
    if data is None:
        shape = (B, C, H, W) if spec.draws == 1 else (spec.draws, B, C, H, W)
        data = torch.zeros(shape, dtype=dtype)
    return (ad.apply_operator(data, spec, timesteps=t, schedule=SCHEDULE, backend=backend),)


def check_case(case, backend: str = "cpu"):
    spec = build_spec(case)
    if spec is None:  # refused at construction (asserted in build_spec)
        event("invalid: refused by the constructor")
        return
    err = expected_error(case)
    event(f"spectral={None if case['spectral'] is None else case['spectral']['kind']}, "
          f"squeeze={None if case['squeeze'] is None else case['squeeze']['variant']}")
    if err is not None:  # each backend must refuse on its own, with the documented message
        event("invalid: refused by both backends")
        for each in (backend, "reference"):
            with pytest.raises(ValueError, match=err):
                run_one(case, spec, each)
        return
    data = make_input(case, spec)
    cpu = run_one(case, spec, backend, data)
    ref = run_one(case, spec, "reference", data)
    if case["op"] == "add_noise" and case["layout"] == "channels_last":
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in cpu)
    dtype = DTYPES[case["dtype"]]
    names = ("x_t", case["target"]) if case["op"] == "add_noise" else (case["op"],)
    for name, a, e in zip(names, cpu, ref):
        close(a, e, dtype, f"{name} of {spec!r}, shape {case['shape']}, {case['layout']}")
        assert torch.equal(torch.isfinite(a), torch.isfinite(e)), name
    assert cpu[0].abs().max() > 0  # not vacuous: noise (or x_t) really came out


# ---------------------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------------------
SPECTRAL_KINDS = [None, "power_law", "band", "two_band", "table"]
PER_KIND_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=20)  # x 5 kinds = 100 per op


@pytest.mark.parametrize("spectral_kind", SPECTRAL_KINDS, ids=str)
@pytest.mark.parametrize("op", ["add_noise", "shaped_noise", "apply_operator"])
def test_cpu_matches_reference(op, spectral_kind):
    @PER_KIND_SETTINGS
    @given(case=cases(op, spectral_kind))
    def prop(case):
        check_case(case)

    prop()


TRITON_INTERPRETED = "triton" in ad.available_backends("cpu")
# The interpreter runs one Triton program at ~10 ms: fewer examples, the same strategies.
TRITON_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=5)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="triton not installed or TRITON_INTERPRET unset")
@pytest.mark.parametrize("spectral_kind", SPECTRAL_KINDS, ids=str)
@pytest.mark.parametrize("op", ["add_noise", "shaped_noise", "apply_operator"])
def test_triton_matches_reference(op, spectral_kind):
    @TRITON_SETTINGS
    @given(case=cases(op, spectral_kind))
    def prop(case):
        check_case(case, "triton")

    prop()


@st.composite
def tiny_band_cases(draw):
    """Tiny grids, where bands easily select nothing: both backends must refuse with the documented
    error exactly when the independent oracle says so, and agree otherwise."""
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    radius = draw(st.sampled_from(list(RADIUS_MAX)))
    if draw(st.booleans()):
        spectral = {"kind": "band", "band": draw(band_pair(radius, H, W))}
    else:
        spectral = {"kind": "two_band", "gamma_low": draw(st.floats(0.05, 1.0)),
                    "low": draw(band_pair(radius, H, W)), "gamma_high": draw(st.floats(0.05, 1.0)),
                    "high": draw(band_pair(radius, H, W)),
                    "mixture": draw(st.sampled_from(["shared", "independent"]))}
    B, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return {"op": "shaped_noise", "shape": (B, C, H, W), "dtype": "float32",
            "layout": "contiguous", "target": "epsilon",
            "normalize": draw(st.sampled_from(["calibrated", "per_sample", "none"])),
            "radius": radius, "squeeze": None, "spectral": spectral,
            "seed": draw(st.integers(0, 2**40)), "offset": 0, "timesteps": [0] * B,
            "data_seed": 0}


@PROPERTY_SETTINGS
@given(case=tiny_band_cases())
def test_bands_on_tiny_grids_refuse_or_agree(case):
    spec = build_spec(case)
    err = expected_error(case)
    covariance_ok = case["normalize"] != "per_sample"
    event("refused" if err is not None else "valid")
    if err is not None:
        for backend in ("cpu", "reference"):
            with pytest.raises(ValueError, match=err):
                run_one(case, spec, backend)
        if covariance_ok:
            with pytest.raises(ValueError, match=err):
                ad.covariance(spec, case["shape"][1:])
        return
    cpu, ref = run_one(case, spec, "cpu"), run_one(case, spec, "reference")
    close(cpu[0], ref[0], torch.float32, repr(spec))
    assert torch.isfinite(cpu[0]).all() and cpu[0].abs().max() > 0


def test_heisenberg_needs_k_less_than_c_for_every_c():
    """The invalid squeeze of the drawn cases, exhaustively: k >= C is refused for every C <= 4,
    k < C is accepted (and then runs on both backends)."""
    for C in range(1, 5):
        for k in range(1, C + 1):
            axes = random_axes(C, k, seed=C + k)
            if k >= C:
                with pytest.raises(ValueError, match=r"variant: 'heisenberg' needs k < C"):
                    ad.Squeeze(axes, 0.3, variant="heisenberg")
                continue
            spec = ad.NoiseSpec(ad.Squeeze(axes, 0.3, variant="heisenberg"))
            t = torch.tensor([999])
            a = ad.shaped_noise((1, C, 3, 5), spec, timesteps=t, schedule=SCHEDULE, seed=1, backend="cpu")
            b = ad.shaped_noise((1, C, 3, 5), spec, timesteps=t, schedule=SCHEDULE, seed=1,
                                backend="reference")
            close(a, b, torch.float32, f"heisenberg C={C} k={k}")
