"""gaussian_kl: value and gradients against the float64 formula on every backend."""
import math

import pytest
import torch

import bnn_kernels as bk
from bnn_kernels.sigma import gaussian_kl_terms, sigma_from_rho
from helpers import BACKENDS, assert_close_to_oracle, device_for

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _posterior(shape, dtype, device, sigma_param):
    mu = torch.randn(shape, dtype=torch.float64) * 0.1
    rho = (torch.rand(shape, dtype=torch.float64) * 0.02 + 0.005 if sigma_param == "direct"
           else torch.rand(shape, dtype=torch.float64) * 2.0 - 5.0)
    prior = mu + torch.randn(shape, dtype=torch.float64) * 0.01
    return [t.to(device=device, dtype=dtype) for t in (mu, rho, prior)]


def _kl_with_grads(mu, rho, prior_mu, prior_sigma, sigma_param, fn):
    mu = mu.detach().clone().requires_grad_()
    rho = rho.detach().clone().requires_grad_()
    kl = fn(mu, rho, prior_mu, prior_sigma, sigma_param=sigma_param)
    kl.backward(torch.tensor(0.75, dtype=kl.dtype, device=kl.device))
    return kl.detach(), mu.grad, rho.grad


def _torch_kl(mu, rho, prior_mu, prior_sigma, *, sigma_param):
    return gaussian_kl_terms(mu, sigma_from_rho(rho, sigma_param), prior_mu, prior_sigma).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma_param", ["softplus", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (127, 5, 3), (4097,)])
@pytest.mark.parametrize("with_prior", [False, True])
def test_gaussian_kl_matches_float64_formula(backend, sigma_param, dtype, shape, with_prior):
    device = device_for(backend)
    mu, rho, prior = _posterior(shape, dtype, device, sigma_param)
    prior = prior if with_prior else None
    prior_sigma = 0.05
    with bk.use_backend(backend):
        kl, dmu, drho = _kl_with_grads(mu, rho, prior, prior_sigma, sigma_param, bk.gaussian_kl)
    assert kl.dtype == torch.float32 and kl.dim() == 0
    assert dmu.dtype == dtype and drho.dtype == dtype
    oracle = _kl_with_grads(mu.double(), rho.double(), None if prior is None else prior.double(), prior_sigma,
                            sigma_param, _torch_kl)
    # plain torch in the same dtype (computing in float32, as the ops do for 16-bit inputs, keeps the KL usable)
    same_dtype = _kl_with_grads(mu, rho, prior, prior_sigma, sigma_param,
                                lambda m, r, p, s, sigma_param: _torch_kl(m.float(), r.float(), p, s,
                                                                          sigma_param=sigma_param))
    for name, value, reference, baseline in zip(("kl", "dmu", "drho"), (kl, dmu, drho), oracle, same_dtype):
        assert_close_to_oracle(name, value, reference, baseline, dtype if name != "kl" else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_near_the_prior_keeps_its_precision(backend):
    """A fresh posterior sits at its prior (sigma = prior_sigma, mu = the pretrained weights): the KL is exactly 0
    there, and near it a float32 sum over 200k weights stays within 1e-3 of float64 (log(ps) - log(sigma) summed
    as two logarithms lost the 2e-1 total to cancellation: 7% off here, negative closer in)."""
    device = device_for(backend)
    for prior_sigma in (0.05, 0.1, 1.0 / 3.0, 1.0):  # s = sigma * (1 / ps) rounds to exactly 1 for these
        mu = torch.randn(1000, dtype=torch.float32, device=device)
        sigma = torch.full_like(mu, prior_sigma)
        with bk.use_backend(backend):
            assert bk.gaussian_kl(mu, sigma, mu, prior_sigma, sigma_param="direct").item() == 0.0, prior_sigma
    generator = torch.Generator().manual_seed(0)
    prior = torch.randn(640, 320, generator=generator, dtype=torch.float64)
    rho = torch.full((640, 320), 0.01, dtype=torch.float64)
    near_rho = rho * (1 + 0.001 * torch.randn(rho.shape, generator=generator, dtype=torch.float64))
    near_mu = prior + 1e-5 * torch.randn(prior.shape, generator=generator, dtype=torch.float64)
    f32 = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    with bk.use_backend(backend):
        assert bk.gaussian_kl(f32(prior), f32(rho), f32(prior), 0.01, sigma_param="direct").item() == 0.0
        kl = bk.gaussian_kl(f32(near_mu), f32(near_rho), f32(prior), 0.01, sigma_param="direct").item()
        _, layer_kl = bk.bayes_linear(f32(torch.randn(2, 320, dtype=torch.float64)), f32(near_mu), f32(near_rho),
                                      seed=1, prior_mu=f32(prior), prior_sigma=0.01, sigma_param="direct")
    oracle = _torch_kl(near_mu, near_rho, prior, 0.01, sigma_param="direct").item()
    assert kl == pytest.approx(oracle, rel=1e-3) and layer_kl.item() == pytest.approx(oracle, rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prior_sigma", [1.0, 0.01])
def test_kl_of_a_vanishing_sigma_stays_finite(backend, prior_sigma):
    """softplus(rho) for rho of -45 to -80 is 3e-20 to 2e-35: sigma^2 underflows in float32, and log(sigma^2 / ps^2)
    used to make the KL infinite where it is about -rho.  The KL (alone and from bayes_linear) and its gradients
    match the float64 value of log(ps / sigma) + (sigma^2 + d^2) / (2 ps^2) - 1/2."""
    device = device_for(backend)
    rho64 = torch.tensor([-45.0, -60.0, -80.0, -3.0], dtype=torch.float64)
    mu64 = torch.tensor([0.01, -0.02, 0.03, 0.0], dtype=torch.float64)
    sigma64 = torch.nn.functional.softplus(rho64)
    expected = (math.log(prior_sigma) - torch.log(sigma64) + (sigma64**2 + mu64**2) / (2 * prior_sigma**2) - 0.5)
    grad_rho = (sigma64 / prior_sigma**2 - 1 / sigma64) * torch.sigmoid(rho64)
    f32 = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    with bk.use_backend(backend):
        kl, dmu, drho = _kl_with_grads(f32(mu64), f32(rho64), None, prior_sigma, "softplus", bk.gaussian_kl)
        _, layer_kl = bk.bayes_linear(f32(torch.ones(2, 4, dtype=torch.float64)), f32(mu64.view(1, 4)),
                                      f32(rho64.view(1, 4)), seed=3, prior_sigma=prior_sigma)
    assert kl.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert layer_kl.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    torch.testing.assert_close(drho.double().cpu(), 0.75 * grad_rho, rtol=1e-4, atol=0)
    torch.testing.assert_close(dmu.double().cpu(), 0.75 * mu64 / prior_sigma**2, rtol=1e-5, atol=0)
    # below float32's smallest normal sigma (rho < -87) 1 / sigma, and so the gradient, overflows: the KL is
    # infinite there, as before, so that a training loop stops at once instead of taking a non-finite step
    with bk.use_backend(backend):
        assert bk.gaussian_kl(f32(torch.zeros(2)), f32(torch.tensor([-95.0, -3.0])), None, prior_sigma,
                              sigma_param="softplus").item() == math.inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_a_sigma_underflowed_to_zero_gets_no_kl_gradient_when_the_kl_is_not_in_the_loss(backend, estimator):
    """softplus(-200) is 0 in float32: the KL is +inf there, but a loss that leaves the KL out (a KL weight of 0)
    gets a zero gradient of KL, not 0 * (sigma / ps^2 - 1 / sigma) = NaN: rho's gradient is the materialising
    oracle's, 0, not NaN."""
    device = device_for(backend)
    x = torch.randn(3, 4, device=device)
    mu = torch.randn(5, 4, device=device, requires_grad=True)
    rho = torch.full((5, 4), -200.0, device=device).index_fill_(1, torch.tensor([0], device=device), -3.0)
    rho.requires_grad_(True)
    with bk.use_backend(backend):
        y, kl = bk.bayes_linear(x, mu, rho, seed=1, prior_sigma=0.1, sigma_param="softplus", estimator=estimator)
        y.sum().backward()
        kl_alone = bk.gaussian_kl(mu, rho, None, 0.1, sigma_param="softplus")
        (0.0 * kl_alone).backward()  # gk = 0 through gaussian_kl's own backward
    assert kl.item() == math.inf
    assert torch.isfinite(rho.grad).all() and torch.isfinite(mu.grad).all()
    assert (rho.grad[:, 1:] == 0).all() and (rho.grad[:, 0] != 0).all()  # rho = -3 keeps its data gradient


def test_kl_closed_form_single_element():
    mu, sigma, prior_sigma = 0.3, 0.2, 0.5
    expected = math.log(prior_sigma / sigma) + (sigma**2 + mu**2) / (2 * prior_sigma**2) - 0.5
    kl = bk.gaussian_kl(torch.tensor([mu]), torch.tensor([sigma]), None, prior_sigma, sigma_param="direct")
    assert kl.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
def test_gaussian_kl_gradcheck_float64(backend):
    mu = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    rho = (torch.rand(6, 5, dtype=torch.float64) - 2.0).requires_grad_()
    prior = torch.randn(6, 5, dtype=torch.float64)
    with bk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda m, r: bk.gaussian_kl(m, r, prior, 0.3), (mu, rho))
