"""sigma = s(rho), its derivative, and the closed-form Gaussian KL: the formulas every backend implements.

These torch versions are what the reference backend and the test oracle run; the C++ and Triton kernels
implement the same formulas.  Everything is evaluated in the dtype of its inputs (the oracle passes float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGMA_PARAMS = ("softplus", "direct")
ESTIMATORS = ("reparam", "lrt")
MIN_SIGMA = 1e-7  # the "direct" parameterisation clamps sigma here, as the paper does


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 tensors (gradcheck): the dtype the kernels accumulate in, of the KL (for the
    parameters' dtype) and of the lrt output std kept for backward (for x's dtype; a float16 std would round to a
    subnormal, and 1 / std in backward blow up, for the small sigmas of a fresh posterior)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sigma_from_rho(rho: torch.Tensor, sigma_param: str) -> torch.Tensor:
    """sigma = softplus(rho) or, for "direct", rho clamped at MIN_SIGMA (gradient 0 below the clamp)."""
    if sigma_param == "softplus":
        return F.softplus(rho)
    return torch.clamp_min(rho, MIN_SIGMA)


def gaussian_kl_terms(mu: torch.Tensor, sigma: torch.Tensor, prior_mu, prior_sigma: float) -> torch.Tensor:
    """Elementwise KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)); prior_mu None means 0."""
    diff = mu if prior_mu is None else mu - prior_mu.to(mu.dtype)
    # log(ps/sigma) + (sigma^2 + diff^2) / (2 ps^2) - 1/2 as (r - 1 - log r) / 2 + diff^2 / (2 ps^2), r = sigma^2/ps^2:
    # no cancellation of two logarithms (0 at the prior; no negative float32 sums near it)
    ratio = sigma * sigma / (prior_sigma * prior_sigma)
    return 0.5 * (ratio - 1.0 - log_ratio(ratio, sigma, prior_sigma)) + diff * diff / (2.0 * prior_sigma * prior_sigma)


# Below it, sigma^2 nears float32's underflow and log r is taken as 2 (log sigma - log ps) instead.
LOG_RATIO_FLOOR = 1e-30


def log_ratio(ratio: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """log r, r = sigma^2 / ps^2: log(ratio) (exact near the prior, where the KL term is r - 1 - log r ~ (r-1)^2/2),
    and 2 (log sigma - log ps) where ratio < LOG_RATIO_FLOOR (a softplus rho below about -44 in float32: sigma^2
    underflows, and log(0) would make a finite KL infinite).  A sigma below the dtype's smallest normal number
    (softplus rho < -87 in float32) gives -inf, so an infinite KL: its gradient, through 1 / sigma, is not finite
    there either, and a finite KL would let it into the weights."""
    tiny = ratio < LOG_RATIO_FLOOR
    fallback = torch.where(sigma < torch.finfo(sigma.dtype).tiny, -math.inf,
                           2.0 * (torch.log(sigma) - math.log(prior_sigma)))
    return torch.where(tiny, fallback, torch.log(torch.where(tiny, 1.0, ratio)))
