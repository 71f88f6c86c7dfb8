"""The lrt estimator composed from torch's maps: the layer's own map computes the mean and the variance (cuDNN for a
conv, cuBLAS for a linear layer), elementwise kernels draw the output noise and finish the gradients.

* forward: ``sample.sigma_squared`` writes s(rho)^2 (KL fused) for var = map(x^2, s^2); mean = map(x, mu, bias);
  ``_lrt_output_kernel``: std = sqrt(var), y = mean + std * xi, written over the mean.
* backward: ``_lrt_u_kernel``: u = g xi / (2 std); the vector-Jacobian products of the mean map (g, x, mu) and of
  the variance map (u, x^2, s^2); dx = dx_mean + 2 x dx_var; ``_lrt_grad_kernel``: dmu = G_mean + gk dKL/dmu,
  drho = (2 sigma G_var + gk dKL/dsigma) s'(rho).

It serves every conv (conv.py) and the linear layer where ``linear.lrt_variant`` says "composition": on GPUs whose
tl.dot has no tensor cores (``common.dots_use_tensor_cores``), or with BNN_TRITON_LRT=composition.  Noise:
xi = tl.randn(seed, flat index of the contiguous output), as the fused linear kernels and the other backends draw it,
so the variants agree.  The variance map runs in float32 for float32 x and in bfloat16 otherwise (float16 cannot hold
s^2 of small sigmas), as the fused kernels' variance GEMMs.  Memory: autograd keeps the inputs, the seed and the
output-sized std; s^2 and the weight gradients of the two maps live only inside one call.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, clamp_min, lrt_var_dtype, prior_constants, squared, to_dtype
from .kl import load_posterior, store_reparam_grads
from .sample import sigma_squared

_BLOCK = 1024  # elements per program of the elementwise kernels
_NUM_WARPS = 4


class Maps(NamedTuple):
    """A layer's map and its vector-Jacobian product, in the input's dtype (cuBLAS / cuDNN on a GPU)."""

    forward: Callable  # (input, weight, bias or None) -> output
    vjp: Callable      # (grad_output, input, weight, need_input) -> (grad_input or None, grad_weight)


@triton.jit
def lrt_u(g, std, seed, y_off):
    """u = g * xi / (2 std), 0 where std == 0 (masked elements load std = 0); xi = tl.randn(seed, y_off)."""
    xi = tl.randn(seed, y_off)
    positive = std > 0.0
    return tl.where(positive, g.to(tl.float32) * xi / tl.where(positive, 2.0 * std, 1.0), 0.0)


@triton.jit
def _lrt_output_kernel(mean_ptr, var_ptr, seed_ptr, y_ptr, std_ptr, numel, BLOCK: tl.constexpr):
    """std = sqrt(var) (var clamped at 0: a fast conv algorithm may round it below), y = mean + std * xi.
    y_ptr may be mean_ptr (each element is read before it is written)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    std = tl.sqrt(clamp_min(var, 0.0))
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
    u = lrt_u(g, std, tl.load(seed_ptr), offs)
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


def _grid(numel: int):
    return (triton.cdiv(numel, _BLOCK),)


def weight_stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A weight argument for a vjp that needs only the weight gradient (shape and dtype count)."""
    return like.new_empty(1).expand(shape)


def lrt_fwd(maps: Maps, x, mu, rho, bias, prior, seed, prior_sigma, sigma_param):
    """(y, kl, std): y and std shaped like the map's output, y in x's dtype, std and kl float32.  x, mu, rho, prior
    contiguous."""
    var_dtype = lrt_var_dtype(x.dtype)
    s2, kl = sigma_squared(mu, rho, var_dtype, sigma_param, prior, prior_sigma, with_kl=True)
    var = maps.forward(squared(x, var_dtype), s2, None).contiguous()
    del s2
    bias_x = None if bias is None else bias.to(x.dtype)
    y = maps.forward(x, mu.to(x.dtype), bias_x).contiguous()  # the mean, turned into y in place
    std = torch.empty_like(y, dtype=torch.float32)
    _lrt_output_kernel[_grid(y.numel())](y, var, seed, y, std, y.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
                                         **FP_FUSION)
    return y, kl, std


def lrt_bwd(maps: Maps, g, grad_kl, x, mu, rho, prior, seed, std, prior_sigma, sigma_param, need_dx):
    """(dx or None, dmu, drho); dmu/drho in mu's dtype and include grad_kl times the KL gradient.  g, x, mu, rho,
    prior contiguous; grad_kl float32 0-dim on x's device."""
    var_dtype = lrt_var_dtype(x.dtype)
    numel = g.numel()
    u = torch.empty(g.shape, dtype=var_dtype, device=g.device)
    _lrt_u_kernel[_grid(numel)](g, std.contiguous(), seed, u, numel, BLOCK=_BLOCK, num_warps=_NUM_WARPS, **FP_FUSION)
    mu_x = mu.to(x.dtype) if need_dx else weight_stand_in(g, mu.shape)
    dx_mean, grad_mean = maps.vjp(g, x, mu_x, need_dx)
    del mu_x
    s2 = sigma_squared(mu, rho, var_dtype, sigma_param)[0] if need_dx else weight_stand_in(u, mu.shape)
    dx_var, grad_var = maps.vjp(u, squared(x, var_dtype), s2, need_dx)
    del s2, u
    dx = None
    if need_dx:  # vjp(g, mu) + 2 x vjp(u, s^2)
        dx = torch.addcmul(dx_mean.float(), x.float(), dx_var.float(), value=2.0).to(x.dtype)
    grad_mean, grad_var = grad_mean.contiguous(), grad_var.contiguous()
    dmu = grad_mean if grad_mean.dtype == mu.dtype else torch.empty_like(mu)
    drho = torch.empty_like(rho)
    _, inv_ps2 = prior_constants(prior_sigma)
    _lrt_grad_kernel[_grid(mu.numel())](grad_mean, grad_var, mu, rho, mu if prior is None else prior, grad_kl, dmu,
                                        drho, mu.numel(), inv_ps2, HAS_PRIOR=prior is not None,
                                        SOFTPLUS=sigma_param == "softplus", BLOCK=_BLOCK, num_warps=_NUM_WARPS,
                                        **FP_FUSION)
    return dx, dmu, drho
