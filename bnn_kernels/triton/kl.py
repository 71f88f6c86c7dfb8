"""sigma = s(rho), s'(rho) and the Gaussian KL in Triton: the jit helpers every kernel uses, and the KL ops.

The helpers are the one Triton definition of the formulas of ``bnn_kernels.sigma`` and of the reparam weight
gradients of ``bnn_kernels.registry`` (linear.py calls them in its GEMM loops and epilogues, sample.py in its
elementwise kernels).  All of them work on float32 tiles.

* ``gaussian_kl_fwd``: a reduction; each program writes the float32 sum of its block to a small buffer that the
  host sums (deterministic: no atomics).
* ``gaussian_kl_bwd``: elementwise dmu, drho, scaled by grad_kl loaded from a pointer (no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, INTERPRET, clamp_min, prior_constants, to_dtype

MIN_SIGMA = 1e-7  # bnn_kernels.sigma.MIN_SIGMA: the "direct" parameterisation clamps sigma here


@triton.jit
def _softplus_parts(rho):
    """softplus(rho) and z = exp(-|rho|), with log1p(z) computed accurately (log(u) * z / (u - 1), u = 1 + z)."""
    z = tl.exp(-tl.abs(rho))
    u = 1.0 + z
    log1p_z = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(rho, 0.0) + log1p_z, z


@triton.jit
def sigma_of(rho, SOFTPLUS: tl.constexpr):
    """sigma = softplus(rho), or rho clamped at 1e-7 ("direct")."""
    if SOFTPLUS:
        sigma, _ = _softplus_parts(rho)
    else:
        sigma = clamp_min(rho, 1e-7)
    return sigma


@triton.jit
def sigma_and_slope(rho, SOFTPLUS: tl.constexpr):
    """(sigma, d sigma / d rho): sigmoid(rho) for softplus, [rho >= 1e-7] for direct."""
    if SOFTPLUS:
        sigma, z = _softplus_parts(rho)
        slope = tl.where(rho >= 0.0, 1.0 / (1.0 + z), z / (1.0 + z))
    else:
        sigma = clamp_min(rho, 1e-7)
        slope = tl.where(rho >= 1e-7, 1.0, 0.0)
    return sigma, slope


@triton.jit
def kl_terms(mu, sigma, prior, half_inv_ps2, HAS_PRIOR: tl.constexpr):
    """Elementwise KL(N(mu, sigma^2) || N(prior, ps^2)) = ((s - 1)(s + 1) - 2 log s) / 2 + (mu - prior)^2 / (2 ps^2)
    with s = sigma / ps, as sigma.gaussian_kl_terms: one logarithm, 0 for the posterior at the prior (to within
    2e-14 per element: s is sigma times sqrt(1 / ps^2), which rounds to 1 for most prior sigmas), no
    sigma^2 to underflow; +inf below float32's smallest normal sigma, where the gradient (1 / sigma) is not finite
    either."""
    if HAS_PRIOR:
        diff = mu - prior
    else:
        diff = mu
    s = sigma * tl.sqrt_rn(2.0 * half_inv_ps2)
    log_s = tl.where(sigma < 1.1754943508222875e-38, float("-inf"), tl.log(s))
    return 0.5 * ((s - 1.0) * (s + 1.0) - 2.0 * log_s) + diff * diff * half_inv_ps2


@triton.jit
def kl_grads(mu, sigma, prior, gk, inv_ps2, HAS_PRIOR: tl.constexpr):
    """gk * dKL/dmu = gk (mu - prior) / ps^2 and gk * dKL/dsigma = gk (sigma / ps^2 - 1 / sigma); 0 for gk = 0 (no
    KL in the loss), also where sigma underflowed to 0 (gk / sigma would be 0 / 0)."""
    if HAS_PRIOR:
        diff = mu - prior
    else:
        diff = mu
    return gk * diff * inv_ps2, tl.where(gk != 0.0, gk * (sigma * inv_ps2 - 1.0 / sigma), 0.0)


@triton.jit
def load_prior(prior_ptr, offs, mask, mu, HAS_PRIOR: tl.constexpr):
    """The prior mean at ``offs`` in float32; without a prior, ``mu`` stands in (kl_terms / kl_grads then read 0)."""
    prior = mu
    if HAS_PRIOR:
        prior = tl.load(prior_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return prior


@triton.jit
def load_mu_sigma(mu_ptr, rho_ptr, offs, mask, SOFTPLUS: tl.constexpr):
    """mu and sigma = s(rho) at ``offs`` in float32 (masked elements read mu = 0, rho = 1)."""
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rho = tl.load(rho_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    return mu, sigma_of(rho, SOFTPLUS)


@triton.jit
def load_posterior(mu_ptr, rho_ptr, prior_ptr, offs, mask, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(mu, prior, sigma, s'(rho)) at ``offs`` in float32: what the posterior-gradient epilogues read."""
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rho = tl.load(rho_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    sigma, slope = sigma_and_slope(rho, SOFTPLUS)
    return mu, load_prior(prior_ptr, offs, mask, mu, HAS_PRIOR), sigma, slope


@triton.jit
def store_reparam_grads(dmu_ptr, drho_ptr, offs, mask, grad_w, grad_sigma, mu, sigma, slope, prior, gk, inv_ps2,
                        HAS_PRIOR: tl.constexpr):
    """Store the reparam weight gradients at ``offs``, given G = dL/dW (``grad_w``) and G * eps (``grad_sigma``):
    dmu = G + gk dKL/dmu, drho = (G eps + gk dKL/dsigma) s'(rho), each in its pointer's dtype."""
    kl_dmu, kl_dsigma = kl_grads(mu, sigma, prior, gk, inv_ps2, HAS_PRIOR)
    tl.store(dmu_ptr + offs, to_dtype(grad_w + kl_dmu, dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(drho_ptr + offs, to_dtype((grad_sigma + kl_dsigma) * slope, drho_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_fwd_kernel(mu_ptr, rho_ptr, prior_ptr, partial_ptr, numel, half_inv_ps2,
                   HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mu, sigma = load_mu_sigma(mu_ptr, rho_ptr, offs, mask, SOFTPLUS)
    terms = kl_terms(mu, sigma, load_prior(prior_ptr, offs, mask, mu, HAS_PRIOR), half_inv_ps2, HAS_PRIOR)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, terms, 0.0), axis=0))


@triton.jit
def _kl_bwd_kernel(gk_ptr, mu_ptr, rho_ptr, prior_ptr, dmu_ptr, drho_ptr, numel, inv_ps2,
                   HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gk = tl.load(gk_ptr).to(tl.float32)
    mu, prior, sigma, slope = load_posterior(mu_ptr, rho_ptr, prior_ptr, offs, mask, HAS_PRIOR, SOFTPLUS)
    dmu, dsigma = kl_grads(mu, sigma, prior, gk, inv_ps2, HAS_PRIOR)
    tl.store(dmu_ptr + offs, to_dtype(dmu, dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(drho_ptr + offs, to_dtype(dsigma * slope, drho_ptr.dtype.element_ty), mask=mask)


_FWD_BLOCK = 1024 if INTERPRET else 4096
_BWD_BLOCK = 1024


def gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma, sigma_param):
    mu = mu.contiguous().view(-1)
    rho = rho.contiguous().view(-1)
    prior = None if prior_mu is None else prior_mu.contiguous().view(-1)
    numel = mu.numel()
    if numel == 0:
        return torch.zeros((), dtype=torch.float32, device=mu.device)
    half_inv_ps2, _ = prior_constants(prior_sigma)
    grid = triton.cdiv(numel, _FWD_BLOCK)
    partial = torch.empty(grid, dtype=torch.float32, device=mu.device)
    _kl_fwd_kernel[(grid,)](mu, rho, mu if prior is None else prior, partial, numel, half_inv_ps2,
                            HAS_PRIOR=prior is not None, SOFTPLUS=sigma_param == "softplus", BLOCK=_FWD_BLOCK,
                            num_warps=8, **FP_FUSION)
    return partial.sum()


def gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param):
    shape = mu.shape
    mu = mu.contiguous().view(-1)
    rho = rho.contiguous().view(-1)
    prior = None if prior_mu is None else prior_mu.contiguous().view(-1)
    dmu = torch.empty_like(mu)
    drho = torch.empty_like(rho)
    numel = mu.numel()
    if numel > 0:
        _, inv_ps2 = prior_constants(prior_sigma)
        grad_kl = grad_kl.to(device=mu.device, dtype=torch.float32).contiguous()
        _kl_bwd_kernel[(triton.cdiv(numel, _BWD_BLOCK),)](
            grad_kl, mu, rho, mu if prior is None else prior, dmu, drho, numel, inv_ps2,
            HAS_PRIOR=prior is not None, SOFTPLUS=sigma_param == "softplus", BLOCK=_BWD_BLOCK, num_warps=4, **FP_FUSION)
    return dmu.view(shape), drho.view(shape)
