"""Bayesian conv2d in Triton: one weight sample per convolution, fed to torch's conv (cuDNN on a GPU) and dropped.

Why this design ("transient", as sample.py does for the linear layer) rather than an implicit-GEMM conv with the noise
drawn in its inner loop: a conv weight element is used B * H_out * W_out times per convolution (M >= 4096 at the
conv shapes of a diffusers UNet), so an in-kernel noise draw per (M-tile, weight tile) pair would cost
ceil(M / BLOCK_M) draws per weight element where one suffices, and cuDNN's convolutions are hard to match.  Here each
convolution reads a weight sample that an elementwise kernel wrote in one pass over mu and rho (the KL summed in the
same pass), and the buffer is freed as soon as the convolution returns.  See benchmarks/NOTES.md.

* reparam forward: ``sample.sample_weight`` writes W = mu + s(rho) * eps in x's dtype (KL fused);
  y = F.conv2d(x, W, bias); W is dropped.
* reparam backward: W is sampled again and one ``aten.convolution_backward`` gives dx and G = dL/dW (x's dtype,
  float32 accumulation, as an autocast conv's weight gradient); W is dropped; ``sample.reparam_weight_grads``
  regenerates eps and writes dmu = G + gk dKL/dmu, drho = (G eps + gk dKL/dsigma) s'(rho).
* lrt: composition.py over the conv's maps: mean = conv2d(x, mu, bias), var = conv2d(x^2, s(rho)^2), output noise
  and weight-gradient epilogues as elementwise kernels.

Noise: eps = tl.randn(seed, flat index of the contiguous (C_out, C_in / groups, kh, kw) weight) and
xi = tl.randn(seed, flat index of the contiguous NCHW output), as the other backends.  The lrt variance convolution
runs in float32 for float32 x and in bfloat16 otherwise (float16 cannot hold s^2 of small sigmas), as in linear.py.
Memory: autograd keeps the inputs, the seed and (lrt) the output-sized std; the weight-sized buffers (W or s^2, G)
live only inside one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import conv2d_vjp
from .composition import Maps, lrt_bwd, lrt_fwd, weight_stand_in
from .sample import reparam_weight_grads, sample_weight


def _conv_maps(stride, padding, dilation, groups) -> Maps:
    """F.conv2d and its vjp (one aten.convolution_backward) with this geometry."""
    return Maps(forward=lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups),
                vjp=lambda g, x, w, need_x: conv2d_vjp(g, x, w, stride, padding, dilation, groups, need_x))


def conv_fwd(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups, prior_sigma, sigma_param,
             estimator):
    """(y, kl, std): y NCHW in x's dtype, kl float32 (), std shaped like y in float32 for lrt, else empty."""
    x, mu, rho = x.contiguous(), mu.contiguous(), rho.contiguous()
    prior = None if prior_mu is None else prior_mu.contiguous()
    maps = _conv_maps(stride, padding, dilation, groups)
    if estimator == "lrt":
        return lrt_fwd(maps, x, mu, rho, bias, prior, seed, prior_sigma, sigma_param)
    w, kl = sample_weight(mu, rho, seed, x.dtype, sigma_param, prior, prior_sigma, with_kl=True)
    y = maps.forward(x, w, None if bias is None else bias.to(x.dtype))
    del w  # transient: nothing weight-sized outlives the call
    return y.contiguous(), kl, x.new_empty(0)


def conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups, prior_sigma,
             sigma_param, estimator, need_dx):
    """(dx or None, dmu, drho); dmu/drho in mu's dtype and include grad_kl times the KL gradient."""
    g, x, mu, rho = grad_y.contiguous(), x.contiguous(), mu.contiguous(), rho.contiguous()
    prior = None if prior_mu is None else prior_mu.contiguous()
    grad_kl = grad_kl.to(device=x.device, dtype=torch.float32).contiguous()
    maps = _conv_maps(stride, padding, dilation, groups)
    if estimator == "lrt":
        return lrt_bwd(maps, g, grad_kl, x, mu, rho, prior, seed, std, prior_sigma, sigma_param, need_dx)
    w = sample_weight(mu, rho, seed, x.dtype, sigma_param)[0] if need_dx else weight_stand_in(g, mu.shape)
    dx, grad_w = maps.vjp(g, x, w, need_dx)
    del w
    return (dx, *reparam_weight_grads(grad_w.contiguous(), grad_kl, mu, rho, prior, seed, prior_sigma, sigma_param))
