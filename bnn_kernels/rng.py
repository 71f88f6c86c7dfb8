"""The Philox4x32-10 normal stream in plain torch: the reference every backend must reproduce.

Element ``i`` of a request gets normal number ``offset + i`` of stream ``seed``, which is exactly what
Triton's ``tl.randn(seed, offset + i)`` returns: Philox4x32-10 with key (seed_lo, seed_hi) and counter
(offset_lo, offset_hi, 0, 0), the first two 32-bit outputs mapped to uniforms and turned into one normal by
Box-Muller.  The integers are bit-exact with the kernels; the float32 normals agree to the rounding of
log/cos/sqrt.  uint32 arithmetic is emulated in int64 (products of two uint32 fit in 64 bits modulo 2**64).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

_MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit integers and its Box-Muller constants.
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7

SeedLike = Union[int, torch.Tensor]


def _umul_hi_lo(a: torch.Tensor, b: int):
    """High and low 32 bits of the 64-bit product of uint32 values held in int64."""
    product = a * b  # wraps modulo 2**64: the bits are the full unsigned product
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 rounds on int64 tensors holding uint32 values; returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _umul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _umul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's mapping of a uint32 (held in int64) to a float32 uniform in [0, 1)."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """First output of Triton's Box-Muller transform, in float32."""
    u1 = torch.clamp_min(u1, MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta)


def seed_words(seed: torch.Tensor):
    """Philox key words (lo, hi) of a 0-dim int64 seed tensor (two's complement bits of the seed)."""
    return seed & _MASK32, (seed >> 32) & _MASK32


def philox_uint32(seed: torch.Tensor, offsets: torch.Tensor):
    """The four Philox output words for int64 counters ``offsets`` (any shape) under ``seed``."""
    k0, k1 = seed_words(seed.to(device=offsets.device, dtype=torch.int64))
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    zero = torch.zeros_like(offsets)
    return philox4x32(c0, c1, zero, zero, k0, k1)


def philox_normal_reference(seed: torch.Tensor, numel: int, offset: int = 0, device=None) -> torch.Tensor:
    """Float32 normals number ``offset .. offset + numel - 1`` of stream ``seed`` (1-D)."""
    device = torch.device(device) if device is not None else seed.device
    offsets = torch.arange(numel, device=device, dtype=torch.int64) + offset
    i1, i2, _, _ = philox_uint32(seed, offsets)
    return box_muller(uint32_to_uniform(i1), uint32_to_uniform(i2))


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)
