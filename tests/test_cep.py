"""bnn_diffusion.cep.perturb: statistics of CEP-G / CEP-U, dtype/device, reproducibility, errors."""
from __future__ import annotations

import math

import pytest
import torch

import bnn_diffusion as bd
from bnn_diffusion import cep

# 4096 x 64 = 262144 draws: the sample std of a normal is within ~0.3% of sigma (1 std error ~0.14%), the uniform's
# within ~0.2%; the tolerances below are several standard errors wide.
ROWS, DIM = 4096, 64


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_gaussian_delta_has_std_gamma_over_sqrt_d(gamma):
    x = torch.randn(ROWS, DIM)
    delta = cep.perturb(x, gamma) - x
    scale = gamma / math.sqrt(DIM)
    assert cep.noise_scale(DIM, gamma) == pytest.approx(scale)
    assert delta.std().item() == pytest.approx(scale, rel=0.01)
    assert abs(delta.mean().item()) < 0.01 * scale
    # Gaussian tails: about 0.27% of the draws lie beyond 3 sigma, none beyond 6
    beyond = (delta.abs() > 3 * scale).float().mean().item()
    assert 0.0015 < beyond < 0.004
    assert delta.abs().max().item() < 6 * scale


@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_uniform_delta_fills_the_symmetric_interval(gamma):
    x = torch.randn(ROWS, DIM)
    delta = cep.perturb(x, gamma, kind="uniform") - x
    bound = gamma / math.sqrt(DIM)
    assert delta.abs().max().item() <= bound * (1 + 1e-6)
    assert delta.max().item() > 0.999 * bound and delta.min().item() < -0.999 * bound
    assert delta.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert abs(delta.mean().item()) < 0.01 * bound
    # flat: each of 8 equal bins holds 1/8 of the draws
    counts = torch.histc(delta, bins=8, min=-bound, max=bound) / delta.numel()
    torch.testing.assert_close(counts, torch.full((8,), 1 / 8), atol=0.005, rtol=0)


def test_scale_follows_the_last_dim_and_noise_is_fresh_per_sample_and_call():
    x = torch.zeros(2, 77, 768)  # a CLIP text-encoder output's shape
    a, b = cep.perturb(x), cep.perturb(x)
    assert a.std().item() == pytest.approx(1 / math.sqrt(768), rel=0.01)
    assert not torch.equal(a, b)           # a new delta every call (every step)
    assert not torch.equal(a[0], a[1])     # and for every sample of the batch
    assert torch.equal(x, torch.zeros_like(x))  # the input is not modified


def test_gamma_zero_is_the_identity():
    x = torch.randn(3, 5, 16)
    for kind in cep.KINDS:
        assert cep.perturb(x, 0.0, kind) is x
        assert cep.perturb(x, 0, kind) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", cep.KINDS)
def test_dtype_and_device_are_kept(dtype, kind):
    x = torch.randn(64, 32).to(dtype)
    y = cep.perturb(x, kind=kind)
    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    assert not torch.equal(y, x)
    bound = 1 / math.sqrt(32)
    delta = (y.double() - x.double()).abs().max().item()
    assert delta < (6 * bound if kind == "gaussian" else bound * 1.01 + 1e-2)


def test_generator_and_manual_seed_reproduce_the_noise():
    x = torch.randn(4, 8, 16)
    gen = torch.Generator().manual_seed(3)
    a = cep.perturb(x, kind="uniform", generator=gen)
    b = cep.perturb(x, kind="uniform", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c = cep.perturb(x)
    torch.manual_seed(5)
    assert torch.equal(cep.perturb(x), c)


def test_gradient_flows_to_the_embeddings_unchanged():
    x = torch.randn(2, 3, 8, requires_grad=True)
    weights = torch.randn(2, 3, 8)
    (cep.perturb(x) * weights).sum().backward()
    assert torch.equal(x.grad, weights)


def test_exported_from_the_package():
    assert bd.cep.perturb is cep.perturb


@pytest.mark.parametrize("args, kwargs, error, match", [
    (([1.0, 2.0],), {}, TypeError, "embeddings must be a torch.Tensor"),
    ((torch.ones(3, 4, dtype=torch.int64),), {}, TypeError, "floating"),
    ((torch.tensor(1.0),), {}, ValueError, "last dim"),
    ((torch.ones(3, 0),), {}, ValueError, "last dim"),
    ((torch.ones(3, 4), -0.1), {}, ValueError, "gamma"),
    ((torch.ones(3, 4), float("nan")), {}, ValueError, "gamma"),
    ((torch.ones(3, 4), float("inf")), {}, ValueError, "gamma"),
    ((torch.ones(3, 4), "1"), {}, TypeError, "gamma"),
    ((torch.ones(3, 4), True), {}, TypeError, "gamma"),
    ((torch.ones(3, 4),), dict(kind="laplace"), ValueError, "kind"),
    ((torch.ones(3, 4),), dict(kind="G"), ValueError, "kind"),
    ((torch.ones(3, 4),), dict(generator=3), TypeError, "generator"),
    ((torch.ones(3, 4, device="meta"),), dict(generator=torch.Generator()), ValueError, "generator"),
])
def test_errors_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cep.perturb(*args, **kwargs)
