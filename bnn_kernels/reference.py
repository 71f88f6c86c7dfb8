"""Readable, materialising PyTorch implementations: the test oracle and the benchmark baseline.

``bayes_linear_materialised`` / ``bayes_conv2d_materialised`` are the method written the obvious way (sample
W = mu + sigma * eps, run F.linear / F.conv2d, let autograd do the rest).  They keep eps and W alive for backward,
which is exactly what the fused backends avoid.
The ``reference`` backend runs the same code through the custom-op plumbing: its forward runs under no_grad and
its backward recomputes the forward from the seed (nothing weight-sized is saved between the two).
"""
from __future__ import annotations

import functools

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


def _materialised(layer, x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator):
    """(y, kl) of ``layer(input, weight, bias)`` (F.linear or a conv2d) with a Gaussian weight, noise materialised.

    The weight sample / output variance is formed in the parameters' dtype promoted to float32, then the layer runs
    in x's dtype, as autocast would run a paper-style layer.  Passing float64 everywhere gives the oracle.
    """
    acc = torch.promote_types(mu.dtype, torch.float32)
    sigma = sigma_from_rho(rho.to(acc), sigma_param)
    kl = gaussian_kl_terms(mu.to(acc), sigma, prior_mu, prior_sigma).sum()
    bias_x = None if bias is None else bias.to(x.dtype)
    if estimator == "reparam":
        eps = philox_normal_reference(seed, mu.numel(), 0, mu.device).view(mu.shape).to(acc)
        weight = mu.to(acc) + sigma * eps
        y = layer(x, weight.to(x.dtype), bias_x)
    else:
        mean = layer(x, mu.to(x.dtype), bias_x)
        var_dtype = torch.promote_types(x.dtype, torch.float32)
        # a sum of non-negative terms, but fast conv algorithms (Winograd, FFT) may round it slightly below 0
        var = layer(x.to(var_dtype) ** 2, (sigma * sigma).to(var_dtype), None).clamp_min(0.0)
        xi = philox_normal_reference(seed, mean.numel(), 0, mean.device).view(mean.shape)
        y = mean + (torch.sqrt(var) * xi.to(var_dtype)).to(mean.dtype)
    return y, kl


def bayes_linear_materialised(x, mu, rho, bias, seed, prior_mu=None, prior_sigma=1.0,
                              sigma_param="softplus", estimator="reparam"):
    """(y, kl) of a Bayesian linear layer, materialising the noise; differentiable by plain autograd."""
    return _materialised(F.linear, x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator)


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


def _linear_vjp(grad_y, x, weight, need_x):
    """(dx or None, dW) of x @ weight.T."""
    return (grad_y @ weight if need_x else None), grad_y.t() @ x


def linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param, estimator, need_dx):
    return _layer_bwd(F.linear, _linear_vjp, grad_y, grad_kl, x, mu, rho, prior_mu, seed, prior_sigma, sigma_param,
                      estimator, need_dx)


def _layer_bwd(layer, vjp, grad_y, grad_kl, x, mu, rho, prior_mu, seed, prior_sigma, sigma_param, estimator,
               need_dx):
    """(dx or None, dmu, drho) of a Bayesian ``layer(input, weight, bias)`` whose vector-Jacobian product is
    ``vjp(grad_output, input, weight, need_input) -> (grad_input or None, grad_weight)``: the formulas of
    bnn_kernels.registry, computed in float32 at least."""
    sigma, dsigma_drho, kl_dmu, kl_dsigma = _sigma_and_kl_grads(mu, rho, prior_mu, prior_sigma, sigma_param,
                                                                grad_kl)
    acc = sigma.dtype
    g, x_ = grad_y.to(acc), x.to(acc)
    dx = None
    if estimator == "reparam":
        eps = philox_normal_reference(seed, mu.numel(), 0, mu.device).view(mu.shape).to(acc)
        weight = (mu.to(acc) + sigma * eps).to(x.dtype).to(acc)
        dx, grad_weight = vjp(g, x_, weight, need_dx)
        dmu = grad_weight + kl_dmu
        dsigma = grad_weight * eps + kl_dsigma
    else:
        x_sq = x_ * x_
        var = layer(x_sq, sigma * sigma, None).clamp_min(0.0)
        std_ = torch.sqrt(var)
        xi = philox_normal_reference(seed, var.numel(), 0, var.device).view(var.shape).to(acc)
        u = torch.where(std_ > 0, g * xi / (2.0 * std_), torch.zeros_like(std_))
        dx_mean, grad_mean = vjp(g, x_, mu.to(x.dtype).to(acc), need_dx)
        dx_var, grad_var = vjp(u, x_sq, sigma * sigma, need_dx)
        if need_dx:
            dx = dx_mean + 2.0 * x_ * dx_var
        dmu = grad_mean + kl_dmu
        dsigma = 2.0 * sigma * grad_var + kl_dsigma
    drho = dsigma * dsigma_drho
    return (None if dx is None else dx.to(x.dtype)), dmu.to(mu.dtype), drho.to(rho.dtype)


# --- Bayesian conv2d (NCHW x, weights (C_out, C_in / groups, kh, kw); stride, padding, dilation as int pairs) -------

def _conv_layer(stride, padding, dilation, groups):
    """conv2d(input, weight, bias) with this geometry."""
    return functools.partial(F.conv2d, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv2d_vjp(grad_output, input, weight, stride, padding, dilation, groups, need_input=True):
    """(grad_input or None, grad_weight) of conv2d(input, weight) for ``grad_output`` (aten.convolution_backward).

    When ``need_input`` is False only weight's shape and dtype matter: a stand-in such as
    ``grad_output.new_empty(1).expand(shape)`` will do (as torch.nn.grad.conv2d_weight passes)."""
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_output, input, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_input, True, False])
    return grad_input, grad_weight


def bayes_conv2d_materialised(x, mu, rho, bias, seed, prior_mu=None, prior_sigma=1.0, sigma_param="softplus",
                              estimator="reparam", *, stride=1, padding=0, dilation=1, groups=1):
    """(y, kl) of a Bayesian conv2d, materialising the noise; differentiable by plain autograd.

    reparam: W = mu + sigma * philox_normal(seed, mu.shape), y = conv2d(x, W, bias).  lrt: y = conv2d(x, mu, bias)
    + sqrt(conv2d(x^2, sigma^2)) * philox_normal(seed, y.shape).  Geometry as in F.conv2d.
    """
    layer = _conv_layer(stride, padding, dilation, groups)
    return _materialised(layer, x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator)


def conv_fwd(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups, prior_sigma, sigma_param,
             estimator):
    y, kl = bayes_conv2d_materialised(x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator,
                                      stride=stride, padding=padding, dilation=dilation, groups=groups)
    return y, kl.to(kl_dtype(mu.dtype)), x.new_empty(0)


def conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups, prior_sigma,
             sigma_param, estimator, need_dx):
    def vjp(grad_output, input, weight, need_input):
        return conv2d_vjp(grad_output, input, weight, stride, padding, dilation, groups, need_input)

    return _layer_bwd(_conv_layer(stride, padding, dilation, groups), vjp, grad_y, grad_kl, x, mu, rho, prior_mu,
                      seed, prior_sigma, sigma_param, estimator, need_dx)
