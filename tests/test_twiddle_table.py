"""The CUDA kernels' one twiddle table (csrc/include/anisodiff/twiddle.h), compiled on the host: every
entry is the float rounding of the exact cos / sin of 2 pi e / 128, and its zeros are +0 (the power-of-two
kernel's table, built from it, had them so; a sign flip changes the sign of zero results and slips past
the emulator's tolerances)."""
import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <cstdint>
#include "anisodiff/twiddle.h"
static uint32_t bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
int main() {
  for (int e = 0; e < anisodiff::kTwiddleTurn; ++e)
    std::printf("%08x %08x %08x\n", bits(anisodiff::turn_cos128(e)), bits(anisodiff::negate_nz(anisodiff::turn_sin128(e))),
                e <= 32 ? bits(anisodiff::quarter_cos128(e)) : 0u);
}
"""


def f32_bits(x: float) -> int:
    if x == 0.0:
        x = 0.0  # +0
    return struct.unpack("<I", struct.pack("<f", x))[0]


def exact(v: float) -> float:
    """cos / sin of a multiple of pi / 64 rounded to float, exact zeros at the quarter turns."""
    return 0.0 if abs(v) < 1e-12 else v


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("tw")
    (d / "tw.cpp").write_text(PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", str(d / "tw.cpp"), "-o", str(d / "tw")],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(d / "tw")], check=True, capture_output=True, text=True).stdout.split("\n")
    return [tuple(int(x, 16) for x in line.split()) for line in out if line]


def test_twiddles_are_the_rounded_exact_values_with_positive_zeros(table):
    assert len(table) == 128
    for e, (c, ms, q) in enumerate(table):
        th = 2 * math.pi * e / 128
        assert c == f32_bits(exact(math.cos(th))), e
        assert ms == f32_bits(exact(-math.sin(th))), e  # the table's imaginary part: -sin (forward FFT)
        if e <= 32:
            assert q == c, e
    # the zeros (e = 32, 96 in the real part; 0, 64 in the imaginary part) are +0
    assert table[32][0] == 0 and table[96][0] == 0 and table[0][1] == 0 and table[64][1] == 0
