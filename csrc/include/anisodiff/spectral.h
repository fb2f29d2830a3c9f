// Spectral (SAGD) part: planning the mixed-radix FFT that applies T_w to a plane on chip.
// T_w eps = Re(ifft2(w * fft2(eps))) with w real and symmetric is a REAL linear map, so two real
// planes are filtered at once as the real and imaginary parts of one complex plane (always two
// planes of the same sample, so a sample's noise never depends on its neighbours in the batch).
// The DC bin is applied outside the FFT, as w(0) * mean(plane): one huge DC weight (the papers'
// 1e-10 floor, offset noise) then costs the other bins no float32 accuracy.
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

// Lengths whose largest prime factor exceeds this go through Bluestein's chirp-z transform (a
// power-of-two FFT of length >= 2n - 1) instead of an O(p) per-element generic butterfly, so every
// length runs in O(n log n).
constexpr int kMaxDirectPrime = 61;

ANISO_HD int fft_largest_prime(int n) {
  int largest = 1;
  for (int p = 2; (long long)p * p <= n; ++p)
    while (n % p == 0) { largest = p; n /= p; }
  return n > largest ? n : largest;
}

// The inner power-of-two length of Bluestein's algorithm for length n, or 0 when n is transformed
// directly (mixed radix).
ANISO_HD int bluestein_length(int n) {
  if (fft_largest_prime(n) <= kMaxDirectPrime) return 0;
  int m = 1;
  while (m < 2 * n - 1) m *= 2;
  return m;
}

}  // namespace anisodiff
