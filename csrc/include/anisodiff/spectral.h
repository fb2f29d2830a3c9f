// Spectral (SAGD) part: planning the mixed-radix FFT that applies T_w to a plane on chip.
// T_w eps = Re(ifft2(w * fft2(eps))) with w real and symmetric is a REAL linear map, so two real
// planes are filtered at once as the real and imaginary parts of one complex plane.
#pragma once

#include "anisodiff/macros.h"

namespace anisodiff {

constexpr int kMaxFftStages = 32;

struct FftFactors {
  int count = 0;
  int radix[kMaxFftStages] = {};
};

// Radices for a Stockham FFT of length n: 8s first (fewest passes), then 4, 2, 3, 5 and any other
// prime factor (handled by a generic O(p^2) butterfly).
ANISO_HD FftFactors fft_factorize(int n) {
  FftFactors f;
  while (n % 8 == 0 && n > 1) { f.radix[f.count++] = 8; n /= 8; }
  while (n % 4 == 0 && n > 1) { f.radix[f.count++] = 4; n /= 4; }
  while (n % 2 == 0 && n > 1) { f.radix[f.count++] = 2; n /= 2; }
  for (int p = 3; n > 1; p += 2) {
    while (n % p == 0) { f.radix[f.count++] = p; n /= p; }
    if ((long long)p * p > n && n > 1) { f.radix[f.count++] = n; n = 1; }
  }
  return f;
}

}  // namespace anisodiff
