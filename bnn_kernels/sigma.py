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
    """Elementwise KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)); prior_mu None means 0.

    log(ps/sigma) + (sigma^2 + diff^2) / (2 ps^2) - 1/2 is evaluated as ((s - 1)(s + 1) - 2 log s) / 2
    + diff^2 / (2 ps^2) with s = sigma / ps:
    - one logarithm, no cancellation of two: 0 at the prior (exactly where sigma * (1/ps) rounds to 1, else at
      most 2e-14 per element in float32), no negative float32 sums near it;
    - no sigma^2 to underflow: the KL of a vanishing sigma stays finite (about -log sigma);
    - +inf below the dtype's smallest normal sigma (softplus rho < -87 in float32), where the gradient, through
      1 / sigma, is not finite either: a training loop stops at once instead of taking a non-finite step.
    """
    diff = mu if prior_mu is None else mu - prior_mu.to(mu.dtype)
    s = sigma * (1.0 / prior_sigma)
    log_s = torch.where(sigma < torch.finfo(sigma.dtype).tiny, -math.inf, torch.log(s))
    return 0.5 * ((s - 1.0) * (s + 1.0) - 2.0 * log_s) + diff * diff / (2.0 * prior_sigma * prior_sigma)
