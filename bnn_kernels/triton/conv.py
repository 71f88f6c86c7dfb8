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
* lrt forward: mean = conv2d(x, mu, bias); ``sample.sigma_squared`` writes s(rho)^2 (KL fused) for
  var = conv2d(x^2, s^2); ``_lrt_output_kernel``: std = sqrt(var), y = mean + std * xi.
* lrt backward: ``_lrt_u_kernel``: u = g xi / (2 std); the input / weight gradients of the mean conv (g, mu, x) and of
  the variance conv (u, s^2, x^2); dx = dx_mean + 2 x dx_var; ``_lrt_grad_kernel``: dmu = g-conv-x + gk dKL/dmu,
  drho = (2 sigma u-conv-x^2 + gk dKL/dsigma) s'(rho).

Noise: eps = tl.randn(seed, flat index of the contiguous (C_out, C_in / groups, kh, kw) weight) and
xi = tl.randn(seed, flat index of the contiguous NCHW output), as the other backends.  The lrt variance convolution
runs in float32 for float32 x and in bfloat16 otherwise (float16 cannot hold s^2 of small sigmas), as in linear.py.
Memory: autograd keeps the inputs, the seed and (lrt) the output-sized std; the weight-sized buffers (W or s^2, G)
live only inside one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..reference import conv2d_vjp
from .common import prior_constants, to_dtype, var_in_float32
from .kl import load_posterior, store_reparam_grads
from .linear import _lrt_u
from .sample import reparam_weight_grads, sample_weight, sigma_squared

_BLOCK = 1024  # elements per program of the elementwise kernels
_NUM_WARPS = 4


@triton.jit
def _lrt_output_kernel(mean_ptr, var_ptr, seed_ptr, y_ptr, std_ptr, numel, BLOCK: tl.constexpr):
    """std = sqrt(var) (var clamped at 0: a fast conv algorithm may round it below), y = mean + std * xi.
    y_ptr may be mean_ptr (each element is read before it is written)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    std = tl.sqrt(tl.maximum(var, 0.0))
    y = mean + std * tl.randn(tl.load(seed_ptr), offs)
    tl.store(y_ptr + offs, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(std_ptr + offs, to_dtype(std, std_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrt_u_kernel(g_ptr, std_ptr, seed_ptr, u_ptr, numel, BLOCK: tl.constexpr):
    """u = g * xi / (2 std), 0 where std == 0, in u's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    std = tl.load(std_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = _lrt_u(g, std, tl.load(seed_ptr), offs)
    tl.store(u_ptr + offs, to_dtype(u, u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrt_grad_kernel(grad_mean_ptr, grad_var_ptr, mu_ptr, rho_ptr, prior_ptr, gk_ptr, dmu_ptr, drho_ptr, numel,
                     inv_ps2, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr):
    """dmu = grad_mean + gk dKL/dmu, drho = (2 sigma grad_var + gk dKL/dsigma) s'(rho); dmu_ptr may be
    grad_mean_ptr."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gk = tl.load(gk_ptr).to(tl.float32)
    grad_mean = tl.load(grad_mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_var = tl.load(grad_var_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mu, prior, sigma, slope = load_posterior(mu_ptr, rho_ptr, prior_ptr, offs, mask, HAS_PRIOR, SOFTPLUS)
    store_reparam_grads(dmu_ptr, drho_ptr, offs, mask, grad_mean, 2.0 * sigma * grad_var, mu, sigma, slope, prior, gk,
                        inv_ps2, HAS_PRIOR)


# ----------------------------------------------------------------------------------------------------------------
# launchers (the backend contract of bnn_kernels.registry)
# ----------------------------------------------------------------------------------------------------------------

def _grid(numel: int):
    return (triton.cdiv(numel, _BLOCK),)


def _var_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if var_in_float32(x_dtype) else torch.bfloat16


def _squared(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * x in ``dtype``, squared in float32 (no float16 overflow, one rounding)."""
    return x.float().square().to(dtype)


def _weight_stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A weight argument for a convolution backward that needs only the weight gradient (shape and dtype count)."""
    return like.new_empty(1).expand(shape)


def conv_fwd(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups, prior_sigma, sigma_param,
             estimator):
    """(y, kl, std): y NCHW in x's dtype, kl float32 (), std shaped like y in x's dtype for lrt, else empty."""
    x, mu, rho = x.contiguous(), mu.contiguous(), rho.contiguous()
    prior = None if prior_mu is None else prior_mu.contiguous()
    geometry = (stride, padding, dilation, groups)
    bias_x = None if bias is None else bias.to(x.dtype)
    if estimator == "reparam":
        w, kl = sample_weight(mu, rho, seed, x.dtype, sigma_param, prior, prior_sigma, with_kl=True)
        y = F.conv2d(x, w, bias_x, *geometry)
        del w  # transient: nothing weight-sized outlives the call
        return y.contiguous(), kl, x.new_empty(0)
    var_dtype = _var_dtype(x.dtype)
    s2, kl = sigma_squared(mu, rho, var_dtype, sigma_param, prior, prior_sigma, with_kl=True)
    var = F.conv2d(_squared(x, var_dtype), s2, None, *geometry).contiguous()
    del s2
    y = F.conv2d(x, mu.to(x.dtype), bias_x, *geometry).contiguous()  # the mean, turned into y in place
    std = torch.empty_like(y)
    _lrt_output_kernel[_grid(y.numel())](y, var, seed, y, std, y.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return y, kl, std


def conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups, prior_sigma,
             sigma_param, estimator, need_dx):
    """(dx or None, dmu, drho); dmu/drho in mu's dtype and include grad_kl times the KL gradient."""
    g, x, mu, rho = grad_y.contiguous(), x.contiguous(), mu.contiguous(), rho.contiguous()
    prior = None if prior_mu is None else prior_mu.contiguous()
    grad_kl = grad_kl.to(device=x.device, dtype=torch.float32).contiguous()
    geometry = (stride, padding, dilation, groups)
    if estimator == "reparam":
        w = sample_weight(mu, rho, seed, x.dtype, sigma_param)[0] if need_dx else _weight_stand_in(g, mu.shape)
        dx, grad_w = conv2d_vjp(g, x, w, *geometry, need_dx)
        del w
        return (dx, *reparam_weight_grads(grad_w.contiguous(), grad_kl, mu, rho, prior, seed, prior_sigma,
                                          sigma_param))
    var_dtype = _var_dtype(x.dtype)
    numel = g.numel()
    u = torch.empty(g.shape, dtype=var_dtype, device=g.device)
    _lrt_u_kernel[_grid(numel)](g, std.contiguous(), seed, u, numel, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    mu_x = mu.to(x.dtype) if need_dx else _weight_stand_in(g, mu.shape)
    dx_mean, grad_mean = conv2d_vjp(g, x, mu_x, *geometry, need_dx)
    del mu_x
    s2 = sigma_squared(mu, rho, var_dtype, sigma_param)[0] if need_dx else _weight_stand_in(u, mu.shape)
    dx_var, grad_var = conv2d_vjp(u, _squared(x, var_dtype), s2, *geometry, need_dx)
    del s2, u
    dx = None
    if need_dx:  # vjp(g, mu) + 2 x vjp(u, s^2)
        dx = torch.addcmul(dx_mean.float(), x.float(), dx_var.float(), value=2.0).to(x.dtype)
    grad_mean, grad_var = grad_mean.contiguous(), grad_var.contiguous()
    dmu = grad_mean if grad_mean.dtype == mu.dtype else torch.empty_like(mu)
    drho = torch.empty_like(rho)
    _, _, inv_ps2 = prior_constants(prior_sigma)
    _lrt_grad_kernel[_grid(mu.numel())](grad_mean, grad_var, mu, rho, mu if prior is None else prior, grad_kl, dmu,
                                        drho, mu.numel(), inv_ps2, HAS_PRIOR=prior is not None,
                                        SOFTPLUS=sigma_param == "softplus", BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return dx, dmu, drho
