"""The paper's Bayesian fine-tuning as its own code does it: the baseline (b) of the end-to-end benchmark.

Not part of the library.  It reproduces, on purpose, the two costs that bnn_diffusion removes (DESIGN.md section 1):

* **The weight sample is materialised and kept.**  Every forward draws ``eps = torch.randn_like(mu)`` and builds
  ``W = mu + sigma * eps``; autograd keeps ``eps`` (float32, for the gradient of sigma) and the sample that the
  matmul used (under bf16 autocast its bf16 copy, for the input gradient) until backward: 4 + 2 bytes per weight
  element of every Bayesian layer, per forward.
* **The prior mean is a frozen copy of the whole UNet**, made before the layers are replaced: every weight of the
  model, Bayesian or not, is held twice.

And its parameterisation: sigma is the parameter itself (clamped at 1e-7 in the forward), initialised to 0.01;
prior N(pretrained weight, 0.01^2); one weight sample per forward, shared by the batch; bias deterministic.  The KL
is the reverse one the paper's code computes, KL(prior || q) summed over the Bayesian weights,
``log(sigma / sigma_p) + (sigma_p^2 + (mu - mu_p)^2) / (2 sigma^2) - 1/2``, against the frozen copy's weights.  The
paper's scripts weight it by 0; the benchmark adds it with the same weight as bnn_diffusion's KL, so that both
compute and differentiate a KL term (the cost does not depend on the weight).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bnn_kernels.sigma import MIN_SIGMA


class PaperBayesLinear(nn.Module):
    """A linear layer with a Gaussian weight N(mu, sigma^2), sigma stored directly, sampled by materialising W."""

    def __init__(self, linear: nn.Linear, sigma_init: float = 0.01) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        self.weight_mu = nn.Parameter(weight.clone())
        self.weight_sigma = nn.Parameter(torch.full_like(weight, sigma_init))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight_mu, self.bias)
        sigma = self.weight_sigma.clamp(min=MIN_SIGMA)
        weight = self.weight_mu + sigma * torch.randn_like(self.weight_mu)
        return F.linear(x, weight, self.bias)


def reverse_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_mu: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """KL(N(prior_mu, prior_sigma^2) || N(mu, sigma^2)) summed over the elements (float32)."""
    mu, sigma, prior_mu = mu.float(), sigma.float(), prior_mu.float()
    return (torch.log(sigma) - math.log(prior_sigma)
            + (prior_sigma ** 2 + (mu - prior_mu) ** 2) / (2.0 * sigma * sigma) - 0.5).sum()


class PaperBayes:
    """A model patched the paper's way: its Bayesian layers (``names``) and the frozen copy of the whole model
    that holds their prior means.  The copy is deliberately not a submodule of the model (the optimizer and the
    state dict never see it), but it lives as long as this object."""

    def __init__(self, model: nn.Module, frozen: nn.Module, names: list, prior_sigma: float) -> None:
        self.model, self.frozen, self.names, self.prior_sigma = model, frozen, list(names), float(prior_sigma)

    def kl(self) -> torch.Tensor:
        """The paper's reverse KL summed over every Bayesian layer, against the frozen copy's weights."""
        total = None
        for name in self.names:
            layer = self.model.get_submodule(name)
            term = reverse_kl(layer.weight_mu, layer.weight_sigma.clamp(min=MIN_SIGMA),
                              self.frozen.get_submodule(name).weight, self.prior_sigma)
            total = term if total is None else total + term
        return total


def patch(model: nn.Module, names, *, sigma_init: float = 0.01, prior_sigma: float = 0.01) -> PaperBayes:
    """Patch ``model`` in place the paper's way: freeze a deep copy of the whole model (the prior), freeze the
    model, and replace each nn.Linear named in ``names`` by a trainable PaperBayesLinear."""
    names = list(names)
    if not names:
        raise ValueError("names must list at least one nn.Linear of the model")
    for name in names:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise TypeError(f"names: {name!r} is a {type(model.get_submodule(name)).__name__}, not an nn.Linear")
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    model.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PaperBayesLinear(getattr(parent, attr), sigma_init))
    return PaperBayes(model, frozen, names, prior_sigma)
