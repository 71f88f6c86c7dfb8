"""The baselines the fused ops are measured against: plain F.linear and a paper-style Bayesian layer.

``paper_style_linear`` is how the method is usually written: sample eps with torch.randn_like, materialise
W = mu + sigma * eps and let autograd keep both for backward; the KL is a separate pass over mu and sigma.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

import bnn_kernels as bk
from bnn_kernels.sigma import gaussian_kl_terms, sigma_from_rho

SD15_LINEAR_SHAPES = {  # (name, M, N, K): 64x64 latents at batch 2 give M = 8192 tokens in the first UNet stage
    "attn-320": (8192, 320, 320),
    "attn-640": (8192, 640, 640),
    "attn-1280": (8192, 1280, 1280),
    "ff-up-1280x5120": (8192, 5120, 1280),
    "ff-down-5120x1280": (8192, 1280, 5120),
}
CPU_LINEAR_SHAPES = {
    "cpu-256x320x320": (256, 320, 320),
    "cpu-256x1280x320": (256, 1280, 320),
}


def paper_style_linear(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
    sigma = sigma_from_rho(rho, "softplus")
    weight = mu + sigma * torch.randn_like(mu)
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y, gaussian_kl_terms(mu, sigma, prior_mu, prior_sigma).sum()


@contextlib.contextmanager
def triton_reparam_variant(variant):
    """Run the triton backend's reparam estimator as ``variant`` (BNN_TRITON_REPARAM); None leaves the choice alone."""
    if variant is None:
        yield
        return
    before = os.environ.get("BNN_TRITON_REPARAM")
    os.environ["BNN_TRITON_REPARAM"] = variant
    try:
        yield
    finally:
        if before is None:
            del os.environ["BNN_TRITON_REPARAM"]
        else:
            os.environ["BNN_TRITON_REPARAM"] = before


def fused_linear(estimator):
    def run(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
        return bk.bayes_linear(x, mu, rho, bias, seed=torch.tensor(1234, device=mu.device), prior_mu=prior_mu,
                               prior_sigma=prior_sigma, estimator=estimator)
    return run


def plain_linear(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
    return F.linear(x, mu.to(x.dtype), None if bias is None else bias.to(x.dtype)), None


VARIANTS = {
    "F.linear": plain_linear,
    "paper-style": paper_style_linear,
    "fused-reparam": fused_linear("reparam"),
    "fused-lrt": fused_linear("lrt"),
    # the triton backend's two reparam variants, forced (fused-reparam above runs whichever "auto" picks)
    "reparam-ingemm": fused_linear("reparam"),
    "reparam-transient": fused_linear("reparam"),
}
FORCED_TRITON_REPARAM = {"reparam-ingemm": "fused", "reparam-transient": "transient"}


def make_layer(m, n, k, dtype, device):
    """Activations in ``dtype`` and float32 parameters (autocast-style mixed precision), all requiring grad."""
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    mu = (torch.randn(n, k, device=device) / k**0.5).requires_grad_()
    rho = torch.full((n, k), -5.0, device=device, requires_grad=True)
    bias = torch.zeros(n, device=device, requires_grad=True)
    prior_mu = mu.detach().clone()
    return x, mu, rho, bias, prior_mu


def forward_backward(variant, x, mu, rho, bias, prior_mu, grad_y):
    """One training step of the layer: forward, backward through y and the KL; gradients are reset."""
    with triton_reparam_variant(FORCED_TRITON_REPARAM.get(variant)):
        y, kl = VARIANTS[variant](x, mu, rho, bias, prior_mu)
        outputs, grads = [y], [grad_y]
        if kl is not None:
            outputs.append(kl)
            grads.append(torch.ones_like(kl))
        torch.autograd.backward(outputs, grads)
    for tensor in (x, mu, rho, bias):
        tensor.grad = None


def saved_bytes(variant, x, mu, rho, bias, prior_mu) -> int:
    """Bytes of the tensors autograd saves for backward that are not inputs of the layer."""
    inputs = {t.untyped_storage().data_ptr() for t in (x, mu, rho, bias, prior_mu)}
    saved = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in inputs:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            triton_reparam_variant(FORCED_TRITON_REPARAM.get(variant)):
        VARIANTS[variant](x, mu, rho, bias, prior_mu)
    return sum(saved.values())
