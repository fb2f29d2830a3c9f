// The power-of-two FFT twiddles of the CUDA kernels, from one table: cos(2 pi e / 128) for e = 0 .. 32
// (a quarter turn), each the float rounding of the exact value, as the CPU plan rounds its double
// cosines. Every twiddle exp(-2 pi i e / n) of n | 128 is an entry of it up to a sign and a swap.
#pragma once

#include "anisodiff/macros.h"

namespace anisodiff {

constexpr int kTwiddleTurn = 128;  // the finest turn: n = 2^ln <= 128 reads every (128 / n)-th twiddle

// cos(2 pi e / 128), 0 <= e <= 32. Called with constant e only (unrolled code, constant initialisers):
// it then folds to an immediate.
ANISO_HD constexpr float quarter_cos128(int e) {
  constexpr float t[33] = {
      1.0f,          0.9987954562f, 0.9951847267f, 0.9891765100f, 0.9807852804f, 0.9700312532f, 0.9569403357f,
      0.9415440652f, 0.9238795325f, 0.9039892931f, 0.8819212643f, 0.8577286100f, 0.8314696123f, 0.8032075315f,
      0.7730104534f, 0.7409511254f, 0.7071067812f, 0.6715589548f, 0.6343932842f, 0.5956993045f, 0.5555702330f,
      0.5141027442f, 0.4713967368f, 0.4275550934f, 0.3826834324f, 0.3368898534f, 0.2902846773f, 0.2429801799f,
      0.1950903220f, 0.1467304745f, 0.0980171403f, 0.0490676743f, 0.0f};
  return t[e];
}

// -x, but +0 for 0: the zeros of the twiddle tables are positive
ANISO_HD constexpr float negate_nz(float x) { return 0.0f - x; }

// cos and sin of 2 pi e / 128 for any e (e mod 128), from the quarter table.
ANISO_HD constexpr float turn_cos128(int e) {
  e &= kTwiddleTurn - 1;
  const int q = e >> 5, r = e & 31;
  return q == 0 ? quarter_cos128(r)
                : (q == 1 ? negate_nz(quarter_cos128(32 - r)) : (q == 2 ? negate_nz(quarter_cos128(r)) : quarter_cos128(32 - r)));
}
ANISO_HD constexpr float turn_sin128(int e) { return turn_cos128(e - kTwiddleTurn / 4); }

}  // namespace anisodiff
