// Branch-free float32 exp / log / log1p / cos that compilers vectorise inside `#pragma omp simd` loops.
//
// Cephes-style range reduction and minimax polynomials, within a few ulp of the correctly rounded result on the
// ranges the ops use (log: positive normal and subnormal inputs; exp: any input; cos: |x| below ~1e4).  They use
// only IEEE +, -, *, /, sqrt and integer bit operations, so with -ffp-contract=off every instruction set gives the
// same bits.  Double precision uses the C library (float64 only serves gradcheck).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Small math helpers are forced inline so that the SIMD loops calling them vectorise.
#if defined(__GNUC__)
#define BNN_INLINE inline __attribute__((always_inline))
#else
#define BNN_INLINE inline
#endif

namespace bnn {
namespace vec {

BNN_INLINE uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

BNN_INLINE float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// 2**n for integer n in [-126, 127].
BNN_INLINE float pow2i(int32_t n) { return bits_float(static_cast<uint32_t>(n + 127) << 23); }

// Natural logarithm of x > 0 (subnormals included); log(0) = -inf.
BNN_INLINE float log(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float scaled = subnormal ? x * 8388608.0f : x;  // * 2**23
  const uint32_t bits = float_bits(scaled);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126 - (subnormal ? 23 : 0);
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // mantissa in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float f = low ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = f + y;
  r = r + fe * 0.693359375f;
  r = x == INFINITY ? INFINITY : r;
  return x > 0.0f ? r : (x == 0.0f ? -INFINITY : NAN);
}

// exp(x) for any float x: 0 below the subnormal range, inf above the float range.
BNN_INLINE float exp(float x) {
  float xc = x > -103.9f ? x : -103.9f;  // NaN goes to the bound here and comes back below
  xc = xc < 88.72f ? xc : 88.72f;
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2**23 shifts the fraction out)
  const int32_t n = static_cast<int32_t>(fn);
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * z + r + 1.0f;
  // 2**n in two normal factors, so that subnormal results come out right.
  const int32_t n1 = n / 2;
  const float result = poly * pow2i(n1) * pow2i(n - n1);
  const float bounded = x < -103.9f ? 0.0f : (x > 88.72f ? INFINITY : result);
  return x != x ? x : bounded;
}

// log(1 + t) for t >= 0 (the softplus argument exp(-|rho|) lies in (0, 1]).
BNN_INLINE float log1p(float t) {
  const float u = 1.0f + t;
  const float d = u - 1.0f;
  // log(u) * t / (u - 1) cancels the rounding of 1 + t; where 1 + t rounds to 1, log1p(t) = t.
  return d == 0.0f ? t : log(u) * (t / d);
}

// cos(x) for finite |x| up to ~1e4.
BNN_INLINE float cos(float x) {
  const float ax = x < 0.0f ? -x : x;
  int32_t j = static_cast<int32_t>(ax * 1.27323954473516f);  // 4 / pi
  j = j + (j & 1);
  const float y = static_cast<float>(j);
  j = j & 7;
  const bool flip_octant = j > 3;
  j = flip_octant ? j - 4 : j;
  const bool negative = flip_octant != (j > 1);
  float r = ax - y * 0.78515625f;
  r = r - y * 2.4187564849853515625e-4f;
  r = r - y * 3.77489497744594108e-8f;
  const float z = r * r;
  float c = 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  const float cos_poly = c * z * z - 0.5f * z + 1.0f;
  float s = -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  const float sin_poly = s * z * r + r;
  const float value = (j == 1 || j == 2) ? sin_poly : cos_poly;
  return negative ? -value : value;
}

// The same names for double, from the C library.
BNN_INLINE double log(double x) { return std::log(x); }
BNN_INLINE double exp(double x) { return std::exp(x); }
BNN_INLINE double log1p(double x) { return std::log1p(x); }
BNN_INLINE double cos(double x) { return std::cos(x); }

}  // namespace vec
}  // namespace bnn
