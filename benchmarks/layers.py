"""The baselines the fused ops are measured against: plain F.linear and a paper-style Bayesian layer.

``paper_style_linear`` is how the method is usually written: sample eps with torch.randn_like, materialise
W = mu + sigma * eps and let autograd keep both for backward; the KL is a separate pass over mu and sigma.
``paper_style_conv`` is the same for the Bayesian conv2d (against F.conv2d).
For the Bayesian LoRA op: ``peft_lora`` (PEFT's unfused LoRA: base linear plus two small linears) and
``paper_style_lora`` (the same with B = mu + sigma * randn_like(mu) materialised).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F

import bnn_kernels as bk
from bnn_kernels.sigma import sigma_from_rho

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")  # where the microbenchmarks run
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # and the activation dtype they time

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


def paper_kl(mu, sigma, prior_mu, prior_sigma: float) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)) summed, written as the method usually is:
    log(ps / sigma) + (sigma^2 + (mu - prior_mu)^2) / (2 ps^2) - 1/2 (the fused ops' guarded form costs a little
    more, so the baselines do not take it)."""
    diff = mu if prior_mu is None else mu - prior_mu
    return (math.log(prior_sigma) - torch.log(sigma)
            + (sigma * sigma + diff * diff) / (2.0 * prior_sigma * prior_sigma) - 0.5).sum()


def paper_style_linear(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
    sigma = sigma_from_rho(rho, "softplus")
    weight = mu + sigma * torch.randn_like(mu)
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y, paper_kl(mu, sigma, prior_mu, prior_sigma)


@contextlib.contextmanager
def triton_variant(setting):
    """Run the triton backend with ``setting`` = (environment variable, variant), e.g. ("BNN_TRITON_REPARAM",
    "transient"); None leaves the choice alone."""
    if setting is None:
        yield
        return
    env, variant = setting
    before = os.environ.get(env)
    os.environ[env] = variant
    try:
        yield
    finally:
        if before is None:
            del os.environ[env]
        else:
            os.environ[env] = before


@functools.lru_cache(maxsize=None)
def fixed_seed(device: torch.device) -> torch.Tensor:
    """The seed every fused call of a benchmark uses, made once per device: a tensor created inside the timed
    step would add a host-to-device copy (and its wait for the GPU) to every step."""
    return torch.full((), 1234, dtype=torch.int64, device=device)


def fused_linear(estimator):
    def run(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
        return bk.bayes_linear(x, mu, rho, bias, seed=fixed_seed(mu.device), prior_mu=prior_mu,
                               prior_sigma=prior_sigma, estimator=estimator)
    return run


def plain_linear(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
    return F.linear(x, mu.to(x.dtype), None if bias is None else bias.to(x.dtype)), None


VARIANTS = {
    "F.linear": plain_linear,
    "paper-style": paper_style_linear,
    "fused-reparam": fused_linear("reparam"),
    "fused-lrt": fused_linear("lrt"),
    # the triton backend's variants, forced (fused-reparam / fused-lrt above run whichever "auto" picks)
    "reparam-ingemm": fused_linear("reparam"),
    "reparam-transient": fused_linear("reparam"),
    "lrt-ingemm": fused_linear("lrt"),
    "lrt-composition": fused_linear("lrt"),
}
FORCED_TRITON_VARIANTS = {"reparam-ingemm": ("BNN_TRITON_REPARAM", "fused"),
                          "reparam-transient": ("BNN_TRITON_REPARAM", "transient"),
                          "lrt-ingemm": ("BNN_TRITON_LRT", "fused"),
                          "lrt-composition": ("BNN_TRITON_LRT", "composition")}


def make_layer(m, n, k, dtype, device):
    """Activations in ``dtype`` and float32 parameters (autocast-style mixed precision), all requiring grad."""
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    mu = (torch.randn(n, k, device=device) / k**0.5).requires_grad_()
    rho = torch.full((n, k), -5.0, device=device, requires_grad=True)
    bias = torch.zeros(n, device=device, requires_grad=True)
    prior_mu = mu.detach().clone()
    return x, mu, rho, bias, prior_mu


LAYER_NAMES = ("x", "mu", "rho", "bias", "prior_mu")
LORA_LAYER_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "rho")


def training_step(call, layer, names, grad_y, inputs=None) -> dict:
    """Forward ``call(*layer) -> (y, kl or None)``, backward through y (with ``grad_y``) and the KL (weight 1), then
    reset the gradients; returns y, the KL and the gradient of each tensor of ``layer`` that got one ("d" + its
    name from ``names``).  ``inputs``: backpropagate to these only."""
    y, kl = call(*layer)
    outputs, grads = [y], [grad_y]
    if kl is not None:
        outputs.append(kl)
        grads.append(torch.ones_like(kl))
    torch.autograd.backward(outputs, grads, inputs=inputs)
    results = {"y": y.detach(), "kl": None if kl is None else kl.detach()}
    for name, tensor in zip(names, layer):
        if tensor.grad is not None:
            results["d" + name] = tensor.grad
            tensor.grad = None
    return results


def forward_backward(variant, x, mu, rho, bias, prior_mu, grad_y, variants=VARIANTS) -> dict:
    """One training step of the layer ``variants[variant]`` (``training_step``).  ``variants``: VARIANTS (linear)
    or CONV_VARIANTS."""
    with triton_variant(FORCED_TRITON_VARIANTS.get(variant)):
        return training_step(variants[variant], (x, mu, rho, bias, prior_mu), LAYER_NAMES, grad_y)


def saved_bytes(variant, x, mu, rho, bias, prior_mu, variants=VARIANTS) -> int:
    """Bytes of the tensors autograd saves for backward that are not inputs of the layer ``variants[variant]``."""
    with triton_variant(FORCED_TRITON_VARIANTS.get(variant)):
        return bytes_saved_for_backward(lambda: variants[variant](x, mu, rho, bias, prior_mu),
                                        (x, mu, rho, bias, prior_mu))


def bytes_saved_for_backward(call, inputs) -> int:
    """Bytes of the tensors autograd saves while ``call()`` runs that are not (views of) one of ``inputs``."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    saved = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in input_storages:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(saved.values())


# --- Bayesian LoRA baselines ---------------------------------------------------------------------------------------
# A LoRA on a frozen base: x (M, K) and the base in the activation dtype, float32 factors (mixed-precision LoRA
# training, factors cast to x's dtype as autocast would), rank 4, B Bayesian (the paper's LoRA preset).

SD15_LORA_SHAPES = {name: SD15_LINEAR_SHAPES[name] for name in ("attn-320", "attn-640", "attn-1280")}
CPU_LORA_SHAPES = CPU_LINEAR_SHAPES
LORA_RANK = 4
LORA_SCALE = 1.0
LORA_PRIOR_SIGMA = 0.01


def peft_lora(x, weight, bias, lora_a, lora_b, rho):
    """PEFT's LoRA forward: the base layer, then lora_B(lora_A(x)) * scaling added (two small linears, unfused)."""
    y = F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * LORA_SCALE
    return y, None


def paper_style_lora(x, weight, bias, lora_a, lora_b, rho):
    """The paper's Bayesian LoRA: B = mu + sigma * randn_like(mu) materialised (autograd keeps eps and the sample),
    the PEFT-style unfused layer on top, the KL a separate pass."""
    sigma = sigma_from_rho(rho, "softplus")
    sample = lora_b + sigma * torch.randn_like(lora_b)
    y = F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a.to(x.dtype)), sample.to(x.dtype)) * LORA_SCALE
    return y, paper_kl(lora_b, sigma, None, LORA_PRIOR_SIGMA)


def fused_lora(estimator):
    def run(x, weight, bias, lora_a, lora_b, rho):
        return bk.bayes_lora_linear(x, weight, bias, lora_a, lora_b, rho, scale=LORA_SCALE, bayes="B",
                                    seed=fixed_seed(x.device), prior_sigma=LORA_PRIOR_SIGMA,
                                    estimator=estimator)
    return run


LORA_VARIANTS = {
    "F.linear": lambda x, weight, bias, *factors: (F.linear(x, weight, bias), None),  # the frozen base alone
    "peft-lora": peft_lora,
    "paper-lora": paper_style_lora,
    "fused-lora-reparam": fused_lora("reparam"),
    "fused-lora-lrt": fused_lora("lrt"),
}


def make_lora_layer(m, n, k, dtype, device, rank=LORA_RANK):
    """(x, weight, bias, lora_a, lora_b, rho): x requires grad; the base is frozen in ``dtype``; float32 factors."""
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = torch.zeros(n, device=device, dtype=dtype)
    lora_a = (torch.randn(rank, k, device=device) / k**0.5).requires_grad_()
    lora_b = (torch.randn(n, rank, device=device) * 0.01).requires_grad_()
    rho = torch.full((n, rank), -5.0, device=device, requires_grad=True)
    return x, weight, bias, lora_a, lora_b, rho


def lora_forward_backward(variant, layer, grad_y) -> dict:
    """One training step of the LoRA layer (``training_step``)."""
    inputs = [layer[0]] if variant == "F.linear" else None  # the frozen base has no parameter: to x only
    return training_step(LORA_VARIANTS[variant], layer, LORA_LAYER_NAMES, grad_y, inputs=inputs)


def lora_saved_bytes(variant, layer) -> int:
    return bytes_saved_for_backward(lambda: LORA_VARIANTS[variant](*layer), layer)


# --- Bayesian conv2d baselines -------------------------------------------------------------------------------------
# The 3x3, stride 1, padding 1 conv of the SD 1.5 UNet's resnet blocks (C_in = C_out), x NCHW in the activation dtype,
# float32 parameters (autocast-style mixed precision).  Same layer signature as the linear variants, so
# forward_backward / saved_bytes serve both (variants=CONV_VARIANTS).

SD15_CONV_SHAPES = {  # name: (batch, channels, height, width) of x; 64x64 latents at batch 2 in the first UNet stage
    "64x64x320": (2, 320, 64, 64),
    "32x32x640": (2, 640, 32, 32),
    "16x16x1280": (2, 1280, 16, 16),
}
CPU_CONV_SHAPES = {
    "cpu-2x64x32x32": (2, 64, 32, 32),
    "cpu-2x128x16x16": (2, 128, 16, 16),
}
CONV_PADDING = 1


def paper_style_conv(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
    """W = mu + sigma * randn_like(mu) materialised (autograd keeps eps and W), F.conv2d, the KL a separate pass."""
    sigma = sigma_from_rho(rho, "softplus")
    weight = mu + sigma * torch.randn_like(mu)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=CONV_PADDING)
    return y, paper_kl(mu, sigma, prior_mu, prior_sigma)


def fused_conv(estimator):
    def run(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
        return bk.bayes_conv2d(x, mu, rho, bias, padding=CONV_PADDING, seed=fixed_seed(mu.device),
                               prior_mu=prior_mu, prior_sigma=prior_sigma, estimator=estimator)
    return run


def plain_conv(x, mu, rho, bias, prior_mu, prior_sigma=0.01):
    return F.conv2d(x, mu.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=CONV_PADDING), None


CONV_VARIANTS = {
    "F.conv2d": plain_conv,
    "paper-style": paper_style_conv,
    "fused-reparam": fused_conv("reparam"),
    "fused-lrt": fused_conv("lrt"),
}


def make_conv_layer(batch, channels, height, width, dtype, device):
    """(x, mu, rho, bias, prior_mu) of a 3x3 conv: x in ``dtype``, float32 parameters, all requiring grad."""
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype, requires_grad=True)
    mu = (torch.randn(channels, channels, 3, 3, device=device) / (9 * channels)**0.5).requires_grad_()
    rho = torch.full(mu.shape, -5.0, device=device, requires_grad=True)
    bias = torch.zeros(channels, device=device, requires_grad=True)
    prior_mu = mu.detach().clone()
    return x, mu, rho, bias, prior_mu
