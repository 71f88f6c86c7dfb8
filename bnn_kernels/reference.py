"""Readable, materialising PyTorch implementations: the test oracle and the benchmark baseline.

``bayes_linear_materialised`` is the method written the obvious way (sample W = mu + sigma * eps, run F.linear,
let autograd do the rest).  It keeps eps and W alive for backward, which is exactly what the fused backends avoid.
The ``reference`` backend runs the same code through the custom-op plumbing: its forward runs under no_grad and
its backward recomputes the forward from the seed (nothing weight-sized is saved between the two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rng import philox_normal_reference
from .sigma import gaussian_kl_terms, sigma_from_rho

NAME = "reference"


def is_available() -> bool:
    return True


def philox_normal(seed: torch.Tensor, numel: int, offset: int, device) -> torch.Tensor:
    return philox_normal_reference(seed, numel, offset, device)


def gaussian_kl(mu, rho, prior_mu, prior_sigma: float, sigma_param: str) -> torch.Tensor:
    """Sum of the elementwise KL, accumulated in float32 at least (float64 stays float64)."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    sigma = sigma_from_rho(rho.to(acc), sigma_param)
    return gaussian_kl_terms(mu.to(acc), sigma, prior_mu, prior_sigma).sum()


def bayes_linear_materialised(x, mu, rho, bias, seed, prior_mu=None, prior_sigma=1.0,
                              sigma_param="softplus", estimator="reparam"):
    """(y, kl) of a Bayesian linear layer, materialising the noise; differentiable by plain autograd.

    The weight sample / output variance is formed in the parameters' dtype promoted to float32, then the GEMM runs
    in x's dtype, as autocast would run a paper-style layer.  Passing float64 everywhere gives the oracle.
    """
    acc = torch.promote_types(mu.dtype, torch.float32)
    sigma = sigma_from_rho(rho.to(acc), sigma_param)
    kl = gaussian_kl_terms(mu.to(acc), sigma, prior_mu, prior_sigma).sum()
    bias_x = None if bias is None else bias.to(x.dtype)
    if estimator == "reparam":
        eps = philox_normal_reference(seed, mu.numel(), 0, mu.device).view(mu.shape).to(acc)
        weight = mu.to(acc) + sigma * eps
        y = F.linear(x, weight.to(x.dtype), bias_x)
    else:
        mean = F.linear(x, mu.to(x.dtype), bias_x)
        var_dtype = torch.promote_types(x.dtype, torch.float32)
        var = F.linear(x.to(var_dtype) ** 2, (sigma * sigma).to(var_dtype))
        xi = philox_normal_reference(seed, mean.numel(), 0, mean.device).view(mean.shape)
        y = mean + (torch.sqrt(var) * xi.to(var_dtype)).to(mean.dtype)
    return y, kl


# --- the reference backend (2-D x, the conventions of bnn_kernels.backends) --------------------------------------

def gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma, sigma_param):
    return gaussian_kl(mu, rho, prior_mu, prior_sigma, sigma_param).float()


def gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param):
    with torch.enable_grad():
        mu_, rho_ = mu.detach().requires_grad_(), rho.detach().requires_grad_()
        kl = gaussian_kl(mu_, rho_, prior_mu, prior_sigma, sigma_param)
        return torch.autograd.grad(kl, (mu_, rho_), grad_kl.to(kl.dtype))


def linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator):
    with torch.no_grad():
        y, kl = bayes_linear_materialised(x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator)
    return y, kl.float(), x.new_empty(0)


def linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param, estimator, need_dx):
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(need_dx)
        mu_, rho_ = mu.detach().requires_grad_(), rho.detach().requires_grad_()
        y, kl = bayes_linear_materialised(x_, mu_, rho_, None, seed, prior_mu, prior_sigma, sigma_param, estimator)
        inputs = (x_, mu_, rho_) if need_dx else (mu_, rho_)
        grads = torch.autograd.grad((y, kl), inputs, (grad_y, grad_kl.to(kl.dtype)))
    return grads if need_dx else (None, *grads)
