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
from .sigma import MIN_SIGMA, gaussian_kl_terms, kl_dtype, sigma_from_rho

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


# --- the reference backend (2-D x, the conventions of bnn_kernels.registry) ---------------------------------------
# Custom ops run below autograd, so the backward is written out with the formulas of bnn_kernels.registry; the
# tests check these against autograd through ``bayes_linear_materialised``.

def _sigma_and_kl_grads(mu, rho, prior_mu, prior_sigma, sigma_param, grad_kl):
    """sigma, s'(rho), and gk * dKL/dmu, gk * dKL/dsigma, all in float32 at least."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    mu_, rho_ = mu.to(acc), rho.to(acc)
    sigma = sigma_from_rho(rho_, sigma_param)
    dsigma_drho = torch.sigmoid(rho_) if sigma_param == "softplus" else (rho_ >= MIN_SIGMA).to(acc)
    diff = mu_ if prior_mu is None else mu_ - prior_mu.to(acc)
    gk = grad_kl.to(acc)
    return sigma, dsigma_drho, gk * diff / prior_sigma**2, gk * (sigma / prior_sigma**2 - 1.0 / sigma)


def gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma, sigma_param):
    return gaussian_kl(mu, rho, prior_mu, prior_sigma, sigma_param).to(kl_dtype(mu.dtype))


def gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param):
    _, dsigma_drho, kl_dmu, kl_dsigma = _sigma_and_kl_grads(mu, rho, prior_mu, prior_sigma, sigma_param, grad_kl)
    return kl_dmu.to(mu.dtype), (kl_dsigma * dsigma_drho).to(rho.dtype)


def linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator):
    y, kl = bayes_linear_materialised(x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator)
    return y, kl.to(kl_dtype(mu.dtype)), x.new_empty(0)


def linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param, estimator, need_dx):
    sigma, dsigma_drho, kl_dmu, kl_dsigma = _sigma_and_kl_grads(mu, rho, prior_mu, prior_sigma, sigma_param,
                                                                grad_kl)
    acc = sigma.dtype
    g, x_ = grad_y.to(acc), x.to(acc)
    dx = None
    if estimator == "reparam":
        eps = philox_normal_reference(seed, mu.numel(), 0, mu.device).view(mu.shape).to(acc)
        weight = (mu.to(acc) + sigma * eps).to(x.dtype).to(acc)
        if need_dx:
            dx = g @ weight
        grad_weight = g.t() @ x_
        dmu = grad_weight + kl_dmu
        dsigma = grad_weight * eps + kl_dsigma
    else:
        x_sq = x_ * x_
        var = x_sq @ (sigma * sigma).t()
        std_ = torch.sqrt(var)
        xi = philox_normal_reference(seed, var.numel(), 0, var.device).view(var.shape).to(acc)
        u = torch.where(std_ > 0, g * xi / (2.0 * std_), torch.zeros_like(std_))
        if need_dx:
            dx = g @ mu.to(x.dtype).to(acc) + 2.0 * x_ * (u @ (sigma * sigma))
        dmu = g.t() @ x_ + kl_dmu
        dsigma = 2.0 * sigma * (u.t() @ x_sq) + kl_dsigma
    drho = dsigma * dsigma_drho
    return (None if dx is None else dx.to(x.dtype)), dmu.to(mu.dtype), drho.to(rho.dtype)
