// Philox4x32-10 and the Box-Muller normal of Triton's tl.randn, for the C++ CPU ops.
//
// Normal number `offset` of stream `seed` is tl.randn(seed, offset): Philox4x32-10 with key
// (seed lo32, seed hi32) and counter (offset lo32, offset hi32, 0, 0); the first two output words are mapped to
// uniforms in [0, 1) with Triton's uint_to_uniform_float and combined by the first Box-Muller output, in float32.
// The integers are bit-exact with bnn_kernels/rng.py; the floats agree to the rounding of log/cos/sqrt.
#pragma once

#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace bnn {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's scale for 32-bit integers
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

// The Philox key of a seed: the two's-complement bits of the int64, low word first.
struct PhiloxKey {
  uint32_t k0;
  uint32_t k1;
};

BNN_INLINE PhiloxKey philox_key(int64_t seed) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(bits), static_cast<uint32_t>(bits >> 32)};
}

// The four output words of Philox4x32-10 for counter (c0, c1, c2, c3) under key (k0, k1), in place.
BNN_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(c2) * kPhiloxRoundB;
    const uint64_t prod_a = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint32_t next0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next0;
    c2 = next2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// The first two Philox words for counter `offset` (the ones tl.randn uses).
BNN_INLINE void philox_pair(PhiloxKey key, uint64_t offset, uint32_t& out0, uint32_t& out1) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  philox4x32_10(c0, c1, c2, c3, key.k0, key.k1);
  out0 = c0;
  out1 = c1;
}

// Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, ~x for negatives, scale into [0, 1).
BNN_INLINE float uint32_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// The first output of Triton's Box-Muller transform, in float32:
//   u1 = max(1e-7, u1); theta = 2 pi * u2; sqrt(-2 log(u1)) * cos(theta).
// log and cos are the vectorisable ones of vec_math.h (within a few ulp of logf/cosf), so loops over this
// function vectorise and give the same bits on every instruction set.
BNN_INLINE float box_muller(float u1, float u2) {
  u1 = u1 < kMinUniform ? kMinUniform : u1;
  const float theta = kTwoPi * u2;
  const float radius = std::sqrt(-2.0f * vec::log(u1));
  return radius * vec::cos(theta);
}

// tl.randn(seed, offset), for a key made by philox_key(seed).
BNN_INLINE float philox_normal(PhiloxKey key, uint64_t offset) {
  uint32_t a, b;
  philox_pair(key, offset, a, b);
  return box_muller(uint32_to_uniform(a), uint32_to_uniform(b));
}

}  // namespace bnn
