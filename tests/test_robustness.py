"""Robustness (CPU): numerics at the edges, determinism and reproducibility, safe persistence.

* numerics: non-finite x0 stays in its own elements; half inputs are computed in float32 and
  rounded once; extreme strengths stay finite or get the documented float32-range error; int64
  indexing past 2^31 elements (slow);
* determinism: fresh processes, thread counts, batch splits, generators, torch.distributed ranks;
* persistence: specs load only from JSON, hostile or malformed files give a clear error naming the
  field, and version-1 files written today keep loading and reproduce their noise
  (tests/fixtures/, written by tests/fixtures/make_fixtures.py).

"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anisodiff as ad
from anisodiff import reference as R
from anisodiff.rng import MAX_SEED
from anisodiff.spec import SPEC_FORMAT, SPEC_VERSION

from conftest import random_axes, requires_compiled

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
SCHEDULE = ad.VPSchedule.linear(T=1000)
HALF = [torch.float16, torch.bfloat16]
TARGETS = ["epsilon", "v", "x0", "flow"]


def _sym_table(H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(H, W, dtype=torch.float64, generator=g) + 0.05
    return 0.5 * (u + torch.roll(torch.flip(u, (0, 1)), (1, 1), (0, 1)))


# name -> factory(H, W) -> (spec, C). Every spec kind, normalisation and radius convention.
KINDS = {
    "white": lambda H, W: (ad.NoiseSpec(), 3),
    "sdm": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), -0.4)), 3),
    "sdm_k2_pos": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 1), [1.0, 0.5])), 4),
    "hdm": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 2), 0.6, "heisenberg")), 3),
    "hdm_k2_linear": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 3), -0.5, "heisenberg",
                                                           schedule="linear")), 4),
    "sdm_constant": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 4), 0.7, schedule="constant")), 3),
    "sdm_table_schedule": lambda H, W: (ad.NoiseSpec(ad.Squeeze(
        random_axes(3, 1, 5), -0.6, schedule=torch.linspace(1.0, 0.0, 1000, dtype=torch.float64))), 3),
    "power_law_neg": lambda H, W: (ad.NoiseSpec(spectral=ad.PowerLaw(-0.2)), 3),
    "power_law_pos_nyquist1": lambda H, W: (ad.NoiseSpec(spectral=ad.PowerLaw(0.3), radius="nyquist1"), 2),
    "band": lambda H, W: (ad.NoiseSpec(spectral=ad.Band(0.1, 0.35)), 3),
    "band_rmax1_none": lambda H, W: (ad.NoiseSpec(spectral=ad.Band(0.2, 0.9), radius="rmax1",
                                                  normalize="none"), 1),
    "two_shared": lambda H, W: (ad.NoiseSpec(spectral=ad.TwoBand(0.3, (0.0, 0.25), 0.7, (0.25, 1.0))), 3),
    "two_independent": lambda H, W: (ad.NoiseSpec(spectral=ad.TwoBand(0.6, (0.0, 0.3), 0.4, (0.3, 1.0),
                                                                      "independent")), 3),
    "two_independent_per_sample": lambda H, W: (ad.NoiseSpec(
        spectral=ad.TwoBand(0.6, (0.0, 0.3), 0.4, (0.3, 1.0), "independent"), normalize="per_sample"), 2),
    "table": lambda H, W: (ad.NoiseSpec(spectral=ad.SpectralTable(_sym_table(H, W))), 3),
    "sdm+power_law_per_sample": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 6), -0.4),
                                                           ad.PowerLaw(0.3), normalize="per_sample"), 3),
    "hdm_k2+band": lambda H, W: (ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 7), 0.5, "heisenberg"),
                                              ad.Band(0.0, 0.3)), 4),
}
NAN_KINDS = ["white", "sdm", "hdm_k2_linear", "power_law_neg", "two_shared", "two_independent_per_sample",
             "table", "sdm+power_law_per_sample"]


def close(actual, expected, dtype=torch.float32, what=""):
    """float32: 1e-5 relative, absolute error scaled by the output's magnitude; half types: one
    rounding step of the storage type."""
    exp = expected.double()
    scale = max(1.0, float(exp.abs().max()))
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(actual.double(), exp, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def _x0(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# =============================================================================================
# 2. Numerics
# =============================================================================================
@requires_compiled
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", NAN_KINDS)
def test_nonfinite_x0_stays_in_its_own_elements(kind, backend):
    """NaN, +Inf and -Inf in x0 (first, middle and last element, different samples and channels)
    reach exactly their own elements of x_t and of the target, with the sign the formula gives;
    every other element equals the result for the clean x0 bit for bit; the epsilon target is
    all finite."""
    spec, C = KINDS[kind](9, 10)
    B = 3
    shape = (B, C, 9, 10)
    t = torch.tensor([0, 500, 998])
    for dtype in (torch.float32, torch.bfloat16):
        clean = _x0(shape, dtype, seed=1)
        bad = clean.clone()
        spots = {(0, 0, 0, 0): float("nan"), (1, C - 1, 4, 5): float("inf"),
                 (B - 1, C - 1, 8, 9): float("-inf"), (2, 0, 3, 0): float("nan")}
        for pos, v in spots.items():
            bad[pos] = v
        mask = ~torch.isfinite(bad)
        assert int(mask.sum()) == len(spots)
        for target in TARGETS if dtype == torch.float32 else ["v"]:
            x_t, tgt = ad.add_noise(bad, t, spec, SCHEDULE, seed=9, target=target, backend=backend)
            x_c, tgt_c = ad.add_noise(clean, t, spec, SCHEDULE, seed=9, target=target, backend=backend)
            what = f"{kind} {dtype} {target}"
            assert torch.equal(~torch.isfinite(x_t), mask), what
            assert torch.equal(x_t[~mask], x_c[~mask]), what
            tgt_mask = torch.zeros_like(mask) if target == "epsilon" else mask
            assert torch.equal(~torch.isfinite(tgt), tgt_mask), what
            assert torch.equal(tgt[~tgt_mask], tgt_c[~tgt_mask]), what
            # signs: x_t = a x0 + b n (a > 0); v = a n - b x0; x0; flow = n - x0
            sign = {"epsilon": None, "v": -1.0, "x0": 1.0, "flow": -1.0}[target]
            for pos, v in spots.items():
                if math.isnan(v):
                    assert math.isnan(float(x_t[pos])), what
                    if sign is not None:
                        assert math.isnan(float(tgt[pos])), what
                else:
                    assert float(x_t[pos]) == v, what
                    if sign is not None:
                        assert float(tgt[pos]) == sign * v, what


@requires_compiled
@pytest.mark.parametrize("kind", ["white", "sdm", "hdm_k2_linear", "power_law_neg", "two_independent",
                                  "two_independent_per_sample", "table", "hdm_k2+band"])
def test_half_inputs_are_computed_in_float32_and_rounded_once(kind):
    """fp16/bf16 in, fp16/bf16 out: exactly the float32 computation on the upcast input, cast once
    (cpu), and the float64 computation cast once (reference). Not vacuous: rounding the noise to
    the half type before mixing (double rounding) gives a different result."""
    spec, C = KINDS[kind](8, 12)
    shape = (4, C, 8, 12)
    t = torch.tensor([1, 999, 333, 600])
    for dtype in HALF:
        x0 = (3 * _x0(shape, seed=2)).to(dtype)
        for target in TARGETS:
            cpu = ad.add_noise(x0, t, spec, SCHEDULE, seed=5, target=target, backend="cpu")
            cpu32 = ad.add_noise(x0.float(), t, spec, SCHEDULE, seed=5, target=target, backend="cpu")
            ref = ad.add_noise(x0, t, spec, SCHEDULE, seed=5, target=target, backend="reference")
            ref64 = ad.add_noise(x0.double(), t, spec, SCHEDULE, seed=5, target=target, backend="reference")
            for i in range(2):
                assert cpu[i].dtype == ref[i].dtype == dtype
                assert torch.equal(cpu[i], cpu32[i].to(dtype)), f"cpu {kind} {dtype} {target} out {i}"
                assert torch.equal(ref[i], ref64[i].to(dtype)), f"reference {kind} {dtype} {target} out {i}"
        # double rounding would be visible: x_t from half-rounded noise differs somewhere
        a = SCHEDULE.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - SCHEDULE.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        n_half = ad.shaped_noise(shape, spec, timesteps=t, schedule=SCHEDULE, seed=5, dtype=dtype, backend="cpu")
        twice = (a * x0.float() + b * n_half.float()).to(dtype)
        assert not torch.equal(twice, ad.add_noise(x0, t, spec, SCHEDULE, seed=5, backend="cpu")[0])
        # shaped_noise and apply_operator: the same rule
        n32 = ad.shaped_noise(shape, spec, timesteps=t, schedule=SCHEDULE, seed=5, backend="cpu")
        assert torch.equal(n_half, n32.to(dtype))
        draws = (spec.draws,) if spec.draws > 1 else ()
        eps = _x0((*draws, *shape), dtype, seed=3)
        out = ad.apply_operator(eps, spec, timesteps=t, schedule=SCHEDULE, backend="cpu")
        out32 = ad.apply_operator(eps.float(), spec, timesteps=t, schedule=SCHEDULE, backend="cpu")
        assert out.dtype == dtype and torch.equal(out, out32.to(dtype))


EXTREME_SQUEEZES = [(C, k, variant, s, sched)
                    for C, k in [(1, 1), (3, 1), (3, 2), (4, 1), (4, 3)]
                    for variant in ("sdm", "heisenberg") if not (variant == "heisenberg" and k >= C)
                    for s in (-5.0, 5.0) for sched in ("beta", "constant")]


@requires_compiled
@pytest.mark.parametrize("C,k,variant,s,sched", EXTREME_SQUEEZES)
def test_extreme_squeeze_strengths_stay_finite_and_agree(C, k, variant, s, sched):
    """|s| = 5: S has eigenvalues up to e^5 (and e^15 on the heisenberg complement with k = 3):
    finite on both backends, and the kernel agrees with the reference to 1e-5 of the scale."""
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(C, k, 11), s, variant=variant, schedule=sched),
                        ad.PowerLaw(-1.0, eps=1e-2) if s < 0 else ad.PowerLaw(1.0))
    t = torch.tensor([0, 500, 999])
    x0 = _x0((3, C, 8, 9))
    ref = ad.add_noise(x0, t, spec, SCHEDULE, seed=3, target="v", backend="reference")
    cpu = ad.add_noise(x0, t, spec, SCHEDULE, seed=3, target="v", backend="cpu")
    for r, c in zip(ref, cpu):
        assert torch.isfinite(r).all() and torch.isfinite(c).all()
        close(c, r, what=f"{spec!r}")
    # the strength really is extreme (not clipped somewhere): at the last timestep (tau = 1 for both
    # profiles) the noise scale is e^{-s} on the axes and g = e^{k s / (C - k)} (heisenberg) or 1 on
    # the complement. Checked on the axes unless they sit more than 1e4 below the complement: then
    # their share of a float32 output is below its resolution (on either backend), so the complement
    # is checked instead.
    n = ad.shaped_noise((1, C, 64, 64), ad.NoiseSpec(spec.squeeze), timesteps=torch.tensor([999]),
                        schedule=SCHEDULE, seed=4, backend="cpu").double()
    V = spec.squeeze.axes
    f = math.exp(-s)
    g = math.exp(k * s / (C - k)) if variant == "heisenberg" else 1.0
    if k == C or g / f <= 1e4:
        proj = torch.einsum("c,bchw->bhw", V[:, 0], n)
        assert abs(float(proj.std()) / f - 1) < 0.1
    else:
        rest = n - torch.einsum("ck,dk,bdhw->bchw", V, V, n)
        rms = float((rest ** 2).sum(dim=1).mean() / (C - k)) ** 0.5
        assert abs(rms / g - 1) < 0.1


@requires_compiled
@pytest.mark.parametrize("normalize", ["calibrated", "none", "per_sample"])
@pytest.mark.parametrize("op", ["shaped_noise", "add_noise", "apply_operator"])
def test_extreme_power_laws_run_in_float32_and_match_the_reference(normalize, op):
    """PowerLaw(-1) with the papers' 1e-10 DC floor puts ~1e10 on the DC bin. The kernels apply the
    DC weight to the plane mean outside the FFT, so it runs in float32 at the reference's accuracy in
    every op and normalisation (it was refused before); so do PowerLaw(+1) and PowerLaw(-1, eps=1e-2).
    A table whose NON-DC bins span more than float32 resolves is still refused, naming 'spectral'."""
    shape, t = (2, 3, 16, 16), torch.tensor([10, 900])

    def run(spec, backend):
        if op == "shaped_noise":
            return ad.shaped_noise(shape, spec, seed=1, backend=backend)
        if op == "add_noise":
            return ad.add_noise(_x0(shape), t, spec, SCHEDULE, seed=1, target="v", backend=backend)[1]
        return ad.apply_operator(_x0(shape, seed=4), spec, backend=backend)

    for sp in (ad.PowerLaw(-1.0), ad.PowerLaw(1.0), ad.PowerLaw(-1.0, eps=1e-2)):
        spec = ad.NoiseSpec(spectral=sp, normalize=normalize)
        ref, cpu = run(spec, "reference"), run(spec, "cpu")
        assert torch.isfinite(cpu).all() and torch.isfinite(ref).all()
        close(cpu, ref, what=repr(spec))
    table = torch.ones(16, 16, dtype=torch.float64)
    table[4, 4] = table[-4, -4] = 1e6  # two non-DC bins 1e6 above the median
    bad = ad.NoiseSpec(spectral=ad.SpectralTable(table), normalize=normalize)
    with pytest.raises(ValueError, match=r"spectral: .*non-DC weights.*dynamic range.*backend='reference'"):
        run(bad, "cpu")
    assert torch.isfinite(run(bad, "reference")).all()


# ---------------------------------------------------------------------------------------------
# int64 indexing past 2^31 elements
# ---------------------------------------------------------------------------------------------
_BIG_ROW = 4096
_BIG_B = 2**31 // _BIG_ROW + 1          # 524289 samples of 4096: 2^31 + 4096 elements
_BIG_SEED, _BIG_OFFSET = 2**62 + 12345, 7
_BIG_CHECK = [0, 1, _BIG_B - 3, _BIG_B - 2, _BIG_B - 1]   # the last sample starts at element 2^31
_BIG_CHILD = textwrap.dedent(f"""
    import sys, torch, anisodiff as ad
    B, ROW = {_BIG_B}, {_BIG_ROW}
    check = {_BIG_CHECK}
    # x0 is bf16 [B, 1, 1, 4096] (4.3 GB); only the checked samples are written, the rest is never
    # touched by this process (the kernel still reads all of it)
    x0 = torch.empty(B, 1, 1, ROW, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for b in check:
        x0[b] = torch.randn(1, 1, ROW, generator=g).to(torch.bfloat16)
    t = torch.arange(B, dtype=torch.int64) % 1000
    spec = ad.NoiseSpec(ad.Squeeze([[1.0]], -0.4))
    x_t, v = ad.add_noise(x0, t, spec, ad.VPSchedule.linear(), seed={_BIG_SEED}, offset={_BIG_OFFSET},
                          target="v", backend="cpu")
    assert x_t.shape == v.shape == x0.shape and x_t.numel() > 2**31
    torch.save({{"x0": x0[check].clone(), "t": t[check].clone(), "x_t": x_t[check].clone(),
                "v": v[check].clone()}}, sys.argv[1])
""")


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@requires_compiled
@pytest.mark.slow
def test_int64_indexing_past_2_31_elements(tmp_path):
    """add_noise on a bf16 x0 of 2^31 + 4096 elements (x0, x_t and the target: 3 x 4.3 GB): the
    samples before and after element 2^31 match the reference computed on a small slice with the
    stream offset advanced accordingly, and the last elements match randn4x at their counters."""
    avail = _mem_available_gb()
    if avail < 16:
        pytest.skip(f"needs >= 16 GB of available memory for three 4.3 GB tensors, "
                    f"/proc/meminfo MemAvailable = {avail:.1f} GB")
    out = tmp_path / "big.pt"
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")  # huge pages: far fewer page faults
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _BIG_CHILD, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = torch.load(out, weights_only=True)
    spec = ad.NoiseSpec(ad.Squeeze([[1.0]], -0.4))
    for j, b in enumerate(_BIG_CHECK):
        x0 = got["x0"][j:j + 1]
        t = got["t"][j:j + 1]
        assert int(t) == b % 1000
        # sample b starts at element b * 4096, i.e. counter offset + b * 1024
        ref = ad.add_noise(x0, t, spec, SCHEDULE, seed=_BIG_SEED, offset=_BIG_OFFSET + b * (_BIG_ROW // 4),
                           target="v", backend="reference")
        close(got["x_t"][j:j + 1], ref[0], torch.bfloat16, f"x_t of sample {b}")
        close(got["v"][j:j + 1], ref[1], torch.bfloat16, f"v of sample {b}")
    # independently of the reference's white_noise: the last 8 elements and element 2^31 itself
    n_el = _BIG_B * _BIG_ROW
    idx = torch.tensor([2**31, 2**31 + 1] + list(range(n_el - 8, n_el)), dtype=torch.int64)
    lanes = torch.stack(R.randn4x(_BIG_SEED, _BIG_OFFSET + (idx >> 2)), dim=-1)
    eps = lanes[torch.arange(idx.numel()), idx & 3].double()
    tb = _BIG_B - 1
    ac = SCHEDULE.alphas_cumprod[tb % 1000].double()
    tau = (SCHEDULE.betas[tb % 1000] / SCHEDULE.betas.max()).double()
    n = math.exp(0.4 * float(tau)) * eps                       # S = e^{-r}, r = -0.4 tau
    cols = (idx - 2**31).tolist()
    x0 = got["x0"][-1, 0, 0, cols].double()
    want_xt = (ac.sqrt() * x0 + (1 - ac).sqrt() * n).to(torch.bfloat16)
    want_v = (ac.sqrt() * n - (1 - ac).sqrt() * x0).to(torch.bfloat16)
    close(got["x_t"][-1, 0, 0, cols], want_xt, torch.bfloat16, "x_t at the last counters")
    close(got["v"][-1, 0, 0, cols], want_v, torch.bfloat16, "v at the last counters")
    assert time.time() - start < 240


# =============================================================================================
# 3. Determinism and reproducibility
# =============================================================================================
_CHILD = textwrap.dedent("""
    import hashlib, json, sys, torch, anisodiff as ad
    torch.set_num_threads(int(sys.argv[1]))
    jobs = json.load(sys.stdin)
    out = {}
    for name, job in jobs.items():
        spec = ad.NoiseSpec.from_json(job["spec"])
        exec(job["code"], {"ad": ad, "torch": torch, "spec": spec, "job": job, "out": out, "name": name,
                           "hashlib": hashlib})
    print(json.dumps(out))
""")

# computes out[name] = {backend: sha256 of the outputs' bytes}; run in this process and in a child
_HASH_CODE = textwrap.dedent("""
    sched = ad.VPSchedule.linear(T=1000)
    B, C, H, W = job["shape"]
    t = torch.tensor(job["t"])
    x0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(3))
    res = {}
    for backend in ("cpu", "reference"):
        n = ad.shaped_noise((B, C, H, W), spec, timesteps=t, schedule=sched, seed=job["seed"],
                            offset=job["offset"], backend=backend)
        x_t, v = ad.add_noise(x0, t, spec, sched, seed=job["seed"], offset=job["offset"], target="v",
                              backend=backend)
        h = hashlib.sha256()
        for a in (n, x_t, v):
            h.update(a.contiguous().numpy().tobytes())
        res[backend] = h.hexdigest()
    out[name] = res
""")


def _hash_jobs():
    jobs = {}
    for i, (name, make) in enumerate(KINDS.items()):
        spec, C = make(7, 10)
        jobs[name] = {"spec": spec.to_json(), "shape": [3, C, 7, 10], "t": [0, 999, 123],
                      "seed": 2**61 + i, "offset": 11 * i, "code": _HASH_CODE}
    return jobs


@requires_compiled
def test_same_seed_same_bytes_in_a_fresh_process():
    """(seed, offset) fixes the bytes: a fresh interpreter (one thread; this one runs two), given
    the specs as JSON, hashes the same shaped_noise / add_noise outputs for every spec kind and both
    backends."""
    jobs = _hash_jobs()
    torch.set_num_threads(2)
    here: dict = {}
    for name, job in jobs.items():
        exec(job["code"], {"ad": ad, "torch": torch, "spec": ad.NoiseSpec.from_json(job["spec"]),
                           "job": job, "out": here, "name": name, "hashlib": hashlib})
    proc = subprocess.run([sys.executable, "-c", _CHILD, "1"], input=json.dumps(jobs), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there == here
    # not vacuous: the hashes differ between kinds and backends
    assert len({h for r in here.values() for h in r.values()}) == 2 * len(here)


def _run_all_ops(spec, C, shape_hw, B, seed=21):
    H, W = shape_hw
    t = torch.arange(B) * 137 % 1000
    x0 = _x0((B, C, H, W), seed=5).contiguous(memory_format=torch.channels_last)
    draws = (2,) if spec.draws > 1 else ()
    eps = _x0((*draws, B, C, H, W), seed=6)
    return (ad.shaped_noise((B, C, H, W), spec, timesteps=t, schedule=SCHEDULE, seed=seed, offset=3,
                            backend="cpu"),
            *ad.add_noise(x0, t, spec, SCHEDULE, seed=seed, offset=3, target="v", backend="cpu"),
            ad.apply_operator(eps, spec, timesteps=t, schedule=SCHEDULE, backend="cpu"))


@requires_compiled
@pytest.mark.parametrize("kind", list(KINDS))
def test_thread_count_does_not_change_any_output(kind):
    """1 vs 2 threads, bit for bit, for every spec kind and every op (B = 7: more groups than
    threads, and an odd number of them)."""
    spec, C = KINDS[kind](9, 10)
    torch.set_num_threads(1)
    one = _run_all_ops(spec, C, (9, 10), 7)
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    two = _run_all_ops(spec, C, (9, 10), 7)
    for name, a, b in zip(("shaped_noise", "x_t", "v", "apply_operator"), one, two):
        assert torch.equal(a, b), f"{kind}: {name}"


@requires_compiled
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["sdm", "hdm_k2_linear", "power_law_neg", "two_independent",
                                  "two_independent_per_sample", "table", "sdm+power_law_per_sample"])
def test_add_noise_batch_splits(kind, backend):
    """Sample b of add_noise (x_t and target) is the same for every batch size B' > b, and a middle
    slice [2, 5) of the batch equals a call on that slice with the offset advanced by 2 samples'
    counters (2 C H W / 4), bit for bit. (shaped_noise prefixes: tests/test_stream.py.)"""
    spec, C = KINDS[kind](8, 8)
    B = 6
    x0 = _x0((B, C, 8, 8), seed=8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([999, 0, 500, 250, 750, 3])
    full = ad.add_noise(x0, t, spec, SCHEDULE, seed=77, offset=9, target="flow", backend=backend)
    for Bp in range(1, B):
        part = ad.add_noise(x0[:Bp], t[:Bp], spec, SCHEDULE, seed=77, offset=9, target="flow", backend=backend)
        assert torch.equal(part[0], full[0][:Bp]) and torch.equal(part[1], full[1][:Bp]), f"B'={Bp}"
    shift = 2 * C * 8 * 8 // 4
    mid = ad.add_noise(x0[2:5], t[2:5], spec, SCHEDULE, seed=77, offset=9 + shift, target="flow",
                       backend=backend)
    assert torch.equal(mid[0], full[0][2:5]) and torch.equal(mid[1], full[1][2:5])
    wrong = ad.add_noise(x0[2:5], t[2:5], spec, SCHEDULE, seed=77, offset=9 + shift + 1, target="flow",
                         backend=backend)
    assert (wrong[1] - full[1][2:5]).abs().max() > 0.1


@requires_compiled
@pytest.mark.parametrize("op", ["shaped_noise", "add_noise"])
def test_generator_draws_one_seed_per_call(op):
    """A torch.Generator advances by exactly one 63-bit seed draw per call (the same on both
    backends, so they stay in step), consecutive calls differ, and re-seeding reproduces."""
    spec, C = KINDS["sdm+power_law_per_sample"](8, 8)
    shape, t = (2, C, 8, 8), torch.tensor([5, 900])

    def call(backend, **kw):
        if op == "shaped_noise":
            return ad.shaped_noise(shape, spec, timesteps=t, schedule=SCHEDULE, backend=backend, **kw)
        return ad.add_noise(_x0(shape), t, spec, SCHEDULE, target="v", backend=backend, **kw)[1]

    g = torch.Generator().manual_seed(2024)
    shadow = torch.Generator().manual_seed(2024)
    outs = []
    for i in range(3):
        backend = ("cpu", "reference")[i % 2]
        seed = int(torch.randint(0, MAX_SEED, (1,), generator=shadow))
        outs.append(call(backend, generator=g))
        assert torch.equal(g.get_state(), shadow.get_state()), f"call {i}"
        close(outs[-1], call("cpu", seed=seed), what=f"call {i} = the drawn seed")
    assert (outs[0] - outs[1]).abs().max() > 0.1 and (outs[1] - outs[2]).abs().max() > 0.1
    g.manual_seed(2024)
    assert torch.equal(call("cpu", generator=g), outs[0])
    # the global generator too: consecutive calls differ, re-seeding reproduces
    torch.manual_seed(99)
    a, b = call("cpu"), call("cpu")
    torch.manual_seed(99)
    assert (a - b).abs().max() > 0.1 and torch.equal(call("cpu"), a)


_DIST_SHAPE = (2, 3, 8, 8)


def _dist_spec():
    return ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), -0.4), ad.PowerLaw(-0.04))


def _dist_worker(rank, world_size, init_file, out_dir):
    """One rank of test_distributed_ranks_get_different_noise (module level: spawn pickles it)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        spec, t = _dist_spec(), torch.tensor([10, 900])
        res = {}
        for backend in ("cpu", "reference"):
            torch.manual_seed(1234)  # every rank: the same global generator state
            res[f"default_{backend}"] = ad.shaped_noise(_DIST_SHAPE, spec, timesteps=t, schedule=SCHEDULE,
                                                        backend=backend)
            res[f"explicit_{backend}"] = ad.shaped_noise(_DIST_SHAPE, spec, timesteps=t, schedule=SCHEDULE,
                                                         seed=4321, backend=backend)
        torch.manual_seed(1234)
        res["add_noise_default"] = ad.add_noise(torch.zeros(_DIST_SHAPE), t, spec, SCHEDULE)[1]
        gathered = [torch.empty(_DIST_SHAPE) for _ in range(world_size)]
        dist.all_gather(gathered, res["default_cpu"])  # the process group really works
        res["gathered"] = torch.stack(gathered)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@requires_compiled
def test_distributed_ranks_get_different_noise(tmp_path, monkeypatch):
    """Two gloo ranks with the same torch.manual_seed: the default generator gives each rank its
    own noise (the rank is folded into the drawn seed: + rank * 0x9E3779B97F4A7C15 mod 2^63, see
    anisodiff/rng.py), identical on both backends; an explicit seed= gives identical noise on every
    rank."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if os.path.exists("/sys/class/net/lo") and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # both ranks live here; no DNS lookup needed
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for backend in ("cpu", "reference"):
        assert (r0[f"default_{backend}"] - r1[f"default_{backend}"]).abs().max() > 0.1
        assert torch.equal(r0[f"explicit_{backend}"], r1[f"explicit_{backend}"])
    close(r0["default_cpu"], r0["default_reference"])
    close(r1["default_cpu"], r1["default_reference"])
    assert torch.equal(r0["add_noise_default"], r0["default_cpu"])
    assert torch.equal(r1["add_noise_default"], r1["default_cpu"])
    assert torch.equal(r0["gathered"][1], r1["default_cpu"]) and torch.equal(r1["gathered"][0], r0["default_cpu"])
    # the documented folding, reproduced here without torch.distributed
    torch.manual_seed(1234)
    drawn = int(torch.randint(0, MAX_SEED, (1,)))
    spec, t = _dist_spec(), torch.tensor([10, 900])
    for rank, res in ((0, r0), (1, r1)):
        seed = (drawn + ((rank * 0x9E3779B97F4A7C15) & MAX_SEED)) & MAX_SEED
        want = ad.shaped_noise(_DIST_SHAPE, spec, timesteps=t, schedule=SCHEDULE, seed=seed, backend="cpu")
        assert torch.equal(res["default_cpu"], want), f"rank {rank}"
    assert torch.equal(r0["explicit_cpu"], ad.shaped_noise(_DIST_SHAPE, spec, timesteps=t, schedule=SCHEDULE,
                                                           seed=4321, backend="cpu"))


# =============================================================================================
# 5. Safe persistence
# =============================================================================================
def _valid():
    return ad.NoiseSpec(ad.Squeeze(random_axes(3, 1, 0), 0.5), ad.PowerLaw(0.1)).to_dict()


_SPECTRAL_BASES = {
    "power_law": {"type": "power_law", "alpha": 0.1, "eps": 1e-10},
    "band": {"type": "band", "a": 0.1, "b": 0.3},
    "two_band": {"type": "two_band", "gamma_low": 0.5, "low": [0.0, 0.3], "gamma_high": 0.5,
                 "high": [0.3, 1.0], "mixture": "shared"},
    "table": {"type": "table", "weights": [[1.0, 1.0], [1.0, 1.0]]},
}


def _mutated(path, value, spectral="power_law"):
    d = _valid()
    d["spectral"] = copy.deepcopy(_SPECTRAL_BASES[spectral])
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


class _Sentinel:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL, "torch.save"])
def test_pickle_files_are_refused_and_never_executed(tmp_path, protocol):
    sentinel = tmp_path / "code_ran"
    payload = {"format": SPEC_FORMAT, "version": 1, "spec": _Sentinel(str(sentinel))}
    path = tmp_path / "spec.json"
    if protocol == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        pickle.loads(path.read_bytes())["spec"].close()  # the payload is live: unpickling runs it
        assert sentinel.exists()
        sentinel.unlink()
    with pytest.raises(ValueError):
        ad.NoiseSpec.load(path)
    with pytest.raises((ValueError, TypeError)):
        ad.NoiseSpec.from_json(path.read_bytes().decode("latin-1"))
    assert not sentinel.exists()


@pytest.mark.parametrize("content", [pickle.dumps({"version": 1}, protocol=2), b"PK\x03\x04\x00\xff"])
def test_binary_file_error_names_the_file(tmp_path, content):
    path = tmp_path / "binary_spec.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"binary_spec\.json: .*spec"):
        ad.NoiseSpec.load(path)


def test_truncated_files_name_the_file(tmp_path):
    spec = ad.NoiseSpec(ad.Squeeze(random_axes(4, 2, 0), [0.25, -0.5], "heisenberg"),
                        ad.TwoBand(0.3, (0.0, 0.25), 0.7, (0.25, 1.0), "independent"), normalize="per_sample")
    full = tmp_path / "full.json"
    spec.save(full)
    text = full.read_text(encoding="utf-8")
    body = text.rstrip()
    cuts = sorted(set(range(0, len(body), max(1, len(body) // 60))) | {len(body) - 1})
    for cut in cuts:
        path = tmp_path / "truncated.json"
        path.write_text(body[:cut], encoding="utf-8")
        with pytest.raises(ValueError, match=r"truncated\.json: spec: not valid JSON") as info:
            ad.NoiseSpec.load(path)
        assert isinstance(info.value, ValueError)
    assert ad.NoiseSpec.load(full) == spec  # the untruncated file loads


@pytest.mark.parametrize("where", ["top", "axes"])
def test_huge_nesting_is_a_value_error(where):
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if where == "top" else '{"squeeze": {"axes": %s, "strength": 0.1}}' % deep
    with pytest.raises(ValueError, match="spec"):
        ad.NoiseSpec.from_json(text)


def test_moderate_nesting_is_refused_with_the_field_name():
    """Nesting the JSON parser accepts reaches the field's own check."""
    deep = "[" * 500 + "0.5" + "]" * 500
    with pytest.raises((ValueError, TypeError), match="axes"):
        ad.NoiseSpec.from_json('{"squeeze": {"axes": %s, "strength": 0.1}}' % deep)
    with pytest.raises((ValueError, TypeError), match="weights"):
        ad.NoiseSpec.from_json('{"spectral": {"type": "table", "weights": %s}}' % deep)


# (path, value, spectral base, exception, regex naming the field)
WRONG_TYPES = [
    (("format",), 5, "power_law", ValueError, "spec.format"),
    (("format",), None, "power_law", ValueError, "spec.format"),
    (("version",), "1", "power_law", ValueError, "spec.version"),
    (("version",), 1.0, "power_law", ValueError, "spec.version"),
    (("version",), [1], "power_law", ValueError, "spec.version"),
    (("version",), -3, "power_law", ValueError, "spec.version"),
    pytest.param(("version",), True, "power_law", ValueError, "spec.version"),
    (("squeeze",), "sdm", "power_law", ValueError, "squeeze"),
    (("squeeze",), [1, 2], "power_law", ValueError, "squeeze"),
    (("squeeze", "axes"), "abc", "power_law", TypeError, "axes"),
    (("squeeze", "axes"), None, "power_law", TypeError, "axes"),
    (("squeeze", "axes"), {"a": 1}, "power_law", (TypeError, ValueError), "axes"),
    (("squeeze", "axes"), [["x"], [0.0], [0.0]], "power_law", TypeError, "axes"),
    (("squeeze", "strength"), True, "power_law", TypeError, "strength"),
    (("squeeze", "strength"), [0.1, 0.2], "power_law", ValueError, "strength"),
    pytest.param(("squeeze", "strength"), None, "power_law", TypeError, "strength"),
    pytest.param(("squeeze", "strength"), "abc", "power_law", TypeError, "strength"),
    pytest.param(("squeeze", "strength"), {"s": 1}, "power_law", TypeError, "strength"),
    pytest.param(("squeeze", "strength"), [True], "power_law", TypeError, "strength"),
    (("squeeze", "variant"), 1, "power_law", ValueError, "variant"),
    (("squeeze", "variant"), None, "power_law", ValueError, "variant"),
    (("squeeze", "schedule"), None, "power_law", TypeError, "schedule"),
    (("squeeze", "schedule"), 3, "power_law", ValueError, "schedule"),
    (("squeeze", "schedule"), {"t": 1}, "power_law", TypeError, "schedule"),
    (("squeeze", "schedule"), [[0.1]], "power_law", ValueError, "schedule"),
    pytest.param(("squeeze", "schedule"), [True], "power_law", TypeError, "schedule"),
    (("spectral",), 0.5, "power_law", ValueError, "spectral"),
    (("spectral",), "power_law", "power_law", ValueError, "spectral"),
    (("spectral", "type"), None, "power_law", ValueError, "spectral.type"),
    pytest.param(("spectral", "type"), ["band"], "power_law", (ValueError, TypeError), "spectral.type"),
    pytest.param(("spectral", "type"), {"band": 1}, "power_law", (ValueError, TypeError), "spectral.type"),
    (("spectral", "type"), 3, "power_law", ValueError, "spectral.type"),
    (("spectral", "alpha"), None, "power_law", TypeError, "alpha"),
    (("spectral", "alpha"), [0.1], "power_law", TypeError, "alpha"),
    (("spectral", "alpha"), True, "power_law", TypeError, "alpha"),
    (("spectral", "alpha"), "steep", "power_law", TypeError, "alpha"),
    pytest.param(("spectral", "alpha"), "0.5", "power_law", TypeError, "alpha"),
    (("spectral", "eps"), {}, "power_law", TypeError, "eps"),
    pytest.param(("spectral", "eps"), "1e-3", "power_law", TypeError, "eps"),
    (("spectral", "a"), None, "band", TypeError, "band"),
    (("spectral", "b"), [0.3], "band", TypeError, "band"),
    pytest.param(("spectral", "b"), "0.4", "band", TypeError, "band"),
    (("spectral", "gamma_low"), None, "two_band", TypeError, "gamma_low"),
    pytest.param(("spectral", "gamma_high"), "0.5", "two_band", TypeError, "gamma_high"),
    (("spectral", "low"), 0.3, "two_band", TypeError, "low"),
    (("spectral", "low"), [0.0, 0.3, 0.5], "two_band", TypeError, "low"),
    (("spectral", "high"), None, "two_band", TypeError, "high"),
    (("spectral", "high"), ["a", "b"], "two_band", TypeError, "high"),
    (("spectral", "mixture"), 2, "two_band", ValueError, "mixture"),
    (("spectral", "weights"), "ones", "table", TypeError, "weights"),
    (("spectral", "weights"), None, "table", TypeError, "weights"),
    (("spectral", "weights"), [1.0, 1.0], "table", ValueError, "weights"),
    (("spectral", "weights"), [[1.0, "x"], [1.0, 1.0]], "table", TypeError, "weights"),
    (("spectral", "weights"), [[1.0, 1.0], [1.0]], "table", TypeError, "weights"),
    (("normalize",), None, "power_law", ValueError, "normalize"),
    (("normalize",), 0, "power_law", ValueError, "normalize"),
    (("radius",), ["cycles"], "power_law", ValueError, "radius"),
]


def _wrong_type_id(case):
    path, value = (case.values if hasattr(case, "values") else case)[:2]
    return f"{'.'.join(path)}={json.dumps(value)[:16]}"


@pytest.mark.parametrize("path,value,spectral,exc,field", WRONG_TYPES,
                         ids=[_wrong_type_id(c) for c in WRONG_TYPES])
def test_wrong_types_name_the_field(tmp_path, path, value, spectral, exc, field):
    d = _mutated(path, value, spectral)
    with pytest.raises(exc, match=field):
        ad.NoiseSpec.from_dict(d)
    file = tmp_path / "wrong.json"
    file.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(exc, match=field):
        ad.NoiseSpec.load(file)


def test_wrong_type_table_base_is_valid():
    """Every mutation above starts from a dict that loads."""
    for base in _SPECTRAL_BASES:
        assert ad.NoiseSpec.from_dict(_mutated(("normalize",), "calibrated", base)).spectral is not None


@pytest.mark.parametrize("missing", ["axes", "strength"])
def test_missing_required_squeeze_field(missing):
    d = _valid()
    del d["squeeze"][missing]
    with pytest.raises(ValueError, match=missing):
        ad.NoiseSpec.from_dict(d)


@pytest.mark.parametrize("spectral,missing", [("power_law", "alpha"), ("band", "a"), ("band", "b"),
                                              ("two_band", "gamma_low"), ("two_band", "high"),
                                              ("table", "weights")])
def test_missing_required_spectral_field(spectral, missing):
    d = _mutated(("normalize",), "calibrated", spectral)
    del d["spectral"][missing]
    with pytest.raises((ValueError, TypeError), match=missing):
        ad.NoiseSpec.from_dict(d)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["weights", "alpha", "eps", "band.a", "gamma_high", "axes", "strength",
                                   "schedule"])
def test_nan_and_infinity_literals(field, literal):
    """Python's json accepts NaN/Infinity (and 1e999 overflows to inf): every numeric field refuses
    them with a ValueError naming it."""
    spectral = {"type": "power_law", "alpha": 0.1, "eps": 1e-3}
    squeeze = {"axes": [[1.0], [0.0], [0.0]], "strength": 0.1, "schedule": "beta"}
    L = literal
    if field == "weights":
        spectral = {"type": "table", "weights": [[1.0, L], [1.0, 1.0]]}
        name = "weights"
    elif field in ("alpha", "eps"):
        spectral[field] = L
        name = field
    elif field == "band.a":
        spectral = {"type": "band", "a": L, "b": 0.3}
        name = "band"
    elif field == "gamma_high":
        spectral = {"type": "two_band", "gamma_low": 0.5, "low": [0, 0.3], "gamma_high": L, "high": [0.3, 1]}
        name = "gamma_high"
    elif field == "axes":
        squeeze["axes"] = [[L], [0.0], [0.0]]
        name = "axes"
    elif field == "strength":
        squeeze["strength"] = [L]
        name = "strength"
    else:
        squeeze["schedule"] = [0.5] * 999 + [L]
        name = "schedule"
    text = ('{"format": "anisodiff.NoiseSpec", "version": 1, "squeeze": %s, "spectral": %s}'
            % (json.dumps(squeeze).replace(f'"{L}"', L), json.dumps(spectral).replace(f'"{L}"', L)))
    assert L in text and f'"{L}"' not in text
    with pytest.raises(ValueError, match=rf"{name}.*(finite|NaN or Inf|got -?inf|got nan)"):
        ad.NoiseSpec.from_json(text)


@pytest.mark.parametrize("axes", [
    [1.0, 0.0, 0.0],                      # 1-D
    [[[1.0], [0.0], [0.0]]],              # 3-D
    0.5,                                  # scalar
    [],                                   # empty 1-D
    [[]],                                 # [1, 0]
    [[1.0], [0.0, 1.0], [0.0]],           # ragged
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0]],
    [{"x": 1.0}],                         # objects inside
    [[1.0], [1.0], [0.0]],                # a matrix, but not orthonormal
    [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]],   # k > C
])
def test_squeeze_axes_that_are_not_an_orthonormal_matrix(axes):
    d = _valid()
    d["squeeze"]["axes"] = axes
    with pytest.raises((ValueError, TypeError), match="axes"):
        ad.NoiseSpec.from_json(json.dumps(d))


@pytest.mark.parametrize("defect", ["ragged_last_row", "nan_in_the_middle", "asymmetric", "three_d",
                                    "negative", "strings"])
def test_enormous_malformed_spectral_table(tmp_path, defect):
    """A 512 x 512 table (5 MB of JSON) with one defect: refused with an error naming 'weights',
    quickly (no quadratic work, no partial spec)."""
    n = 512
    g = torch.Generator().manual_seed(0)
    w = _sym_table(n, n).tolist() if defect != "three_d" else None
    if defect == "ragged_last_row":
        w[-1] = w[-1][:-1]
    elif defect == "nan_in_the_middle":
        w[n // 2][n // 3] = float("nan")
    elif defect == "asymmetric":
        w[1][2] += float(torch.rand((), generator=g)) + 0.5
    elif defect == "three_d":
        w = [[[1.0] * 8] * 8] * 16
    elif defect == "negative":
        w[7][0] = -1e-3
        w[-7][0] = -1e-3
    else:
        w[3][4] = "1.0"
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": SPEC_FORMAT, "version": 1,
                                "spectral": {"type": "table", "weights": w}}), encoding="utf-8")
    start = time.time()
    with pytest.raises((ValueError, TypeError), match="weights"):
        ad.NoiseSpec.load(path)
    assert time.time() - start < 20


# -- fuzzing: a mutated spec either loads or raises ValueError/TypeError ----------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                          max_leaves=12)
FIELDS = [("format",), ("version",), ("squeeze",), ("squeeze", "axes"), ("squeeze", "strength"),
          ("squeeze", "variant"), ("squeeze", "schedule"), ("spectral",), ("spectral", "type"),
          ("normalize",), ("radius",),
          ("spectral", "alpha"), ("spectral", "eps"), ("spectral", "a"), ("spectral", "b"),
          ("spectral", "gamma_low"), ("spectral", "low"), ("spectral", "high"), ("spectral", "mixture"),
          ("spectral", "weights"), ("extra",)]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(list(_SPECTRAL_BASES)), path=st.sampled_from(FIELDS), value=json_value)
def test_fuzzed_specs_load_or_raise_value_or_type_error(base, path, value):
    """Any JSON value in any field: the loader raises nothing but a ValueError/TypeError that names
    the field, or what loads is a valid spec that round-trips."""
    d = _mutated(("normalize",), "calibrated", base)
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = json.dumps(d)
    try:
        spec = ad.NoiseSpec.from_json(text)
    except (ValueError, TypeError) as exc:
        if path != ("squeeze",):  # a whole squeeze object may fail on any of its fields
            names = {path[-1], {"a": "band", "b": "band"}.get(path[-1], path[-1])}
            assert any(name in str(exc) for name in names), f"{path}={value!r}: {exc}"
        return
    assert ad.NoiseSpec.from_json(spec.to_json()) == spec
    json.loads(spec.to_json(), parse_constant=lambda c: pytest.fail(f"saved spec holds {c}"))


# -- version N files load in version N + 1 -----------------------------------------------------
def _fixture_names():
    return sorted(f[len("spec_v1_"):-len(".json")] for f in os.listdir(FIXTURES)
                  if f.startswith("spec_v1_") and f.endswith(".json"))


def _fixture_data():
    return torch.load(os.path.join(FIXTURES, "noise_v1.pt"), weights_only=True)


def _same_environment(keys) -> bool:
    """Whether the fixtures' environment (make_fixtures.environment) matches this one in `keys`, where
    bit-identical results are owed. A key the fixtures predate counts as different (cpu_vendor: fixtures
    of before it was recorded check the reference backend to tolerance only)."""
    with open(os.path.join(FIXTURES, "environment_v1.json"), encoding="utf-8") as f:
        then = json.load(f)
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURES, "make_fixtures.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    now = gen.environment()
    return all(k in then and then[k] == now[k] for k in keys)


# The keys bit-identity depends on: the reference runs torch's math (MKL's VML: vendor-dependent bits),
# the CPU kernel anisodiff's own code.
REFERENCE_KEYS = ["torch", "aten_cpu_capability", "cpu_vendor"]
KERNEL_KEYS = ["torch", "anisodiff", "anisodiff_cpu_capability"]


def test_fixtures_are_present_and_version_1():
    names = _fixture_names()
    assert len(names) >= 10
    data = _fixture_data()
    assert set(data["noise"]) == set(names)
    kinds = set()
    for name in names:
        with open(os.path.join(FIXTURES, f"spec_v1_{name}.json"), encoding="utf-8") as f:
            raw = json.load(f)
        assert raw["format"] == SPEC_FORMAT and raw["version"] == 1
        kinds.add((raw["squeeze"] or {}).get("variant"))
        kinds.add((raw["spectral"] or {}).get("type"))
    assert {"sdm", "heisenberg", "power_law", "band", "two_band", "table"} <= kinds


@pytest.mark.parametrize("name", _fixture_names())
def test_version_1_fixture_loads_and_reproduces_its_noise(name):
    """A spec saved by version 1 loads in this version, means the same thing (the loaded spec
    writes the same JSON back, only the version may grow) and reproduces the stored noise:
    bit for bit in the environment that wrote it (same torch, same instruction sets), within
    float32 rounding (1e-5 of the scale) anywhere else. A changed stream, counter layout, weight,
    calibration or squeeze formula changes the noise by O(1) and fails here."""
    path = os.path.join(FIXTURES, f"spec_v1_{name}.json")
    spec = ad.NoiseSpec.load(path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    again = spec.to_dict()
    assert again.pop("version") == SPEC_VERSION >= 1 and raw.pop("version") == 1
    assert again == raw
    data = _fixture_data()
    stored = data["noise"][name]
    C = stored["channels"]
    t = torch.tensor(data["timesteps"])
    for backend in ("reference", "cpu"):
        if backend not in ad.available_backends("cpu"):
            continue
        n = ad.shaped_noise((len(data["timesteps"]), C, *data["hw"]), spec, timesteps=t, schedule=SCHEDULE,
                            seed=data["seed"], offset=data["offset"], backend=backend)
        close(n, stored[backend], what=f"{name} on {backend}")
        close(n, stored["reference"], what=f"{name} on {backend} vs the stored reference")
        if _same_environment(REFERENCE_KEYS if backend == "reference" else KERNEL_KEYS):
            assert torch.equal(n, stored[backend]), f"{name} on {backend}: not bit-identical"


def test_version_1_fixture_reproduces_add_noise():
    data = _fixture_data()
    add = data["add_noise"]
    spec = ad.NoiseSpec.load(os.path.join(FIXTURES, f"spec_v1_{add['spec']}.json"))
    t = torch.tensor(data["timesteps"])
    for backend in ad.available_backends("cpu"):
        out = ad.add_noise(add["x0"], t, spec, SCHEDULE, seed=data["seed"], offset=data["offset"],
                           target=add["target"], backend=backend)
        for i in range(2):
            close(out[i], add["reference"][i], what=f"add_noise output {i} on {backend} vs the stored reference")
            if backend not in add:  # a backend newer than the fixture (triton): the reference decides
                continue
            close(out[i], add[backend][i], what=f"add_noise output {i} on {backend}")
            if _same_environment(REFERENCE_KEYS if backend == "reference" else KERNEL_KEYS):
                assert torch.equal(out[i], add[backend][i])
    # not vacuous: another seed is far away
    other = ad.add_noise(add["x0"], t, spec, SCHEDULE, seed=data["seed"] + 1, offset=data["offset"],
                         target=add["target"], backend="reference")
    assert (other[1] - add["reference"][1]).abs().max() > 0.1


def _same_json(a, b, path="") -> None:
    """Equal JSON values; floats to 4 ulps (the generator's QR runs through the machine's LAPACK,
    whose builds differ in the last bit)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), path
        assert math.isclose(a, b, rel_tol=4 * sys.float_info.epsilon, abs_tol=1e-300), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _same_json(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_json(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_fixture_generator_writes_what_is_stored(tmp_path):
    """tests/fixtures/make_fixtures.py (the only sanctioned way to change the fixtures) still
    writes the stored specs: the same fields and values (floats to 4 ulps across LAPACK builds)."""
    sys.path.insert(0, FIXTURES)
    try:
        import make_fixtures
    finally:
        sys.path.remove(FIXTURES)
    for name, (spec, C) in make_fixtures.fixture_specs().items():
        spec.save(tmp_path / "s.json")
        with open(os.path.join(FIXTURES, f"spec_v1_{name}.json"), encoding="utf-8") as f:
            stored = json.load(f)
        _same_json(json.loads((tmp_path / "s.json").read_text(encoding="utf-8")), stored, name)


# =============================================================================================
# regressions: bugs these tests found (fixed)
# =============================================================================================
@requires_compiled
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_twoband_zero_gamma_on_an_empty_band(backend):
    spec = ad.NoiseSpec(spectral=ad.TwoBand(0.0, (0.9, 0.95), 1.0, (0.0, 0.5), mixture="independent"))
    # expected: the gamma = 0 draw contributes nothing, so this is the high band alone
    want = ad.NoiseSpec(spectral=ad.TwoBand(0.0, (0.0, 0.5), 1.0, (0.0, 0.5), mixture="independent"))
    n = ad.shaped_noise((1, 1, 8, 8), spec, seed=0, backend=backend)
    assert torch.isfinite(n).all()
    close(n, ad.shaped_noise((1, 1, 8, 8), want, seed=0, backend="reference"))


_SCRATCH_CHILD = textwrap.dedent("""
    import gc, torch, anisodiff as ad
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    spec = ad.NoiseSpec(spectral=ad.PowerLaw(-0.04))
    sched = ad.VPSchedule.linear(1000)
    x0 = torch.zeros(1, 3, 2048, 2048)
    ad.add_noise(torch.zeros(1, 3, 8, 8), 0, spec, sched, seed=0)   # warm-up: ops, plans
    gc.collect()
    before = rss_mib()
    out = ad.add_noise(x0, 0, spec, sched, seed=0)
    del out
    gc.collect()
    print(rss_mib() - before, ad.build_info()["cpu_kept_scratch_bytes"] / 2**20)
""")


@requires_compiled
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_one_big_call_does_not_keep_its_scratch():
    """The per-thread scratch of a [1, 3, 2048, 2048] spectral call (~150 MB) is released after the
    call: what stays is the cached 16 MiB weight table of the plan (plan.py) and at most the kept
    scratch (build_info()['cpu_kept_scratch_bytes'] per thread). It used to grow RSS by ~190 MB."""
    out = subprocess.run([sys.executable, "-c", _SCRATCH_CHILD], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    grown, kept = (float(v) for v in out.stdout.split())
    assert kept == 16.0
    assert grown < 16 + 2 * kept, f"RSS grew by {grown:.0f} MiB after the call"
