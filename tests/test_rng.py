"""The Philox normal stream: equal to Triton's tl.randn on every backend, offsets, seeds, distribution."""
import math

import pytest
import torch

import bnn_kernels as bk
from bnn_kernels.rng import philox_normal_reference, philox_uint32
from helpers import BACKENDS, device_for

SEEDS = [0, 1, 12345, 2**32 + 7, 2**62 + 12345, -5, -2**63]  # negative: two's complement bits, as tl.randn
OFFSETS = [0, 3, 2**31 - 5, 2**32 + 11, 2**40]

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _randn_and_bits_kernel(seed_ptr, normals_ptr, bits_ptr, offset, numel, BLOCK: tl.constexpr):
    seed = tl.load(seed_ptr)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    counter = index.to(tl.int64) + offset
    tl.store(normals_ptr + index, tl.randn(seed, counter), mask=index < numel)
    bits, _, _, _ = tl.randint4x(seed, counter)
    tl.store(bits_ptr + index, bits.to(tl.int64) & 0xFFFFFFFF, mask=index < numel)


def _triton_randn(seed: int, numel: int, offset: int, device):
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    normals = torch.empty(numel, device=device)
    bits = torch.empty(numel, dtype=torch.int64, device=device)
    _randn_and_bits_kernel[(triton.cdiv(numel, 128),)](seed_t, normals, bits, offset, numel, BLOCK=128)
    return normals, bits


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_reference_stream_equals_triton_randn(seed, offset):
    device = device_for("triton")
    normals, bits = _triton_randn(seed, 1000, offset, device)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    reference_bits, _, _, _ = philox_uint32(seed_t, torch.arange(1000, dtype=torch.int64) + offset)
    assert torch.equal(bits.cpu(), reference_bits), "Philox integers must be bit-exact"
    reference = philox_normal_reference(seed_t, 1000, offset)
    assert (normals.cpu() - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 2**32 + 11])
def test_every_backend_draws_the_same_stream(backend, seed, offset):
    device = device_for(backend)
    with bk.use_backend(backend):
        normals = bk.philox_normal(seed, (37, 29), offset=offset, device=device)
    reference = philox_normal_reference(torch.tensor(seed), 37 * 29, offset).view(37, 29)
    assert normals.shape == (37, 29) and normals.dtype == torch.float32
    assert (normals.cpu() - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_continues_the_stream(backend):
    device = device_for(backend)
    with bk.use_backend(backend):
        whole = bk.philox_normal(7, 500, device=device)
        tail = bk.philox_normal(7, 200, offset=300, device=device)
    assert torch.equal(whole[300:], tail)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_as_tensor_equals_seed_as_int(backend):
    device = device_for(backend)
    with bk.use_backend(backend):
        from_int = bk.philox_normal(2**40 + 5, 300, device=device)
        from_tensor = bk.philox_normal(torch.tensor(2**40 + 5, device=device), 300)
    assert torch.equal(from_int, from_tensor)


def test_different_seeds_and_offsets_differ():
    a = bk.philox_normal(1, 1000)
    b = bk.philox_normal(2, 1000)
    c = bk.philox_normal(1, 1000, offset=1000)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_requested_dtype_and_shape():
    out = bk.philox_normal(3, (4, 5, 6), dtype=torch.bfloat16)
    assert out.shape == (4, 5, 6) and out.dtype == torch.bfloat16
    assert bk.philox_normal(3, (0, 5)).shape == (0, 5)


def _normal_cdf(values: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(values / math.sqrt(2.0)))


@pytest.mark.parametrize("seed", [0, 99, 2**50 + 1])
def test_distribution_is_standard_normal(seed):
    """Mean, standard deviation and a Kolmogorov-Smirnov test on 200k draws (fixed seeds, so deterministic)."""
    n = 200_000
    draws = bk.philox_normal(seed, n).double()
    assert abs(draws.mean().item()) < 5.0 / math.sqrt(n)  # 5 standard errors
    assert abs(draws.std().item() - 1.0) < 5.0 * math.sqrt(0.5 / n)
    ordered, _ = torch.sort(draws)
    cdf = _normal_cdf(ordered)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks_statistic = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert ks_statistic < 1.63 / math.sqrt(n)  # the 1% critical value
    # the tails exist but stay where Box-Muller with u1 >= 1e-7 puts them
    assert draws.abs().max().item() < math.sqrt(-2.0 * math.log(1e-7)) + 1e-4
    assert (draws.abs() > 3.0).double().mean().item() == pytest.approx(0.0027, abs=0.0008)
