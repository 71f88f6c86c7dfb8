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
from .sigma import MIN_SIGMA, compute_dtype, gaussian_kl_terms, sigma_from_rho

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
    """sigma, s'(rho), and gk * dKL/dmu, gk * dKL/dsigma, all in float32 at least (dKL/dsigma 0 for gk = 0, also
    where sigma underflowed to 0)."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    mu_, rho_ = mu.to(acc), rho.to(acc)
    sigma = sigma_from_rho(rho_, sigma_param)
    dsigma_drho = torch.sigmoid(rho_) if sigma_param == "softplus" else (rho_ >= MIN_SIGMA).to(acc)
    diff = mu_ if prior_mu is None else mu_ - prior_mu.to(acc)
    gk = grad_kl.to(acc)
    kl_dsigma = torch.where(gk != 0, gk * (sigma / prior_sigma**2 - 1.0 / sigma), 0.0)
    return sigma, dsigma_drho, gk * diff / prior_sigma**2, kl_dsigma


def gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma, sigma_param):
    return gaussian_kl(mu, rho, prior_mu, prior_sigma, sigma_param).to(compute_dtype(mu.dtype))


def gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param):
    _, dsigma_drho, kl_dmu, kl_dsigma = _sigma_and_kl_grads(mu, rho, prior_mu, prior_sigma, sigma_param, grad_kl)
    return kl_dmu.to(mu.dtype), (kl_dsigma * dsigma_drho).to(rho.dtype)


def linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator):
    y, kl = bayes_linear_materialised(x, mu, rho, bias, seed, prior_mu, prior_sigma, sigma_param, estimator)
    return y, kl.to(compute_dtype(mu.dtype)), x.new_empty(0)


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
    return y, kl.to(compute_dtype(mu.dtype)), x.new_empty(0)


def conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups, prior_sigma,
             sigma_param, estimator, need_dx):
    def vjp(grad_output, input, weight, need_input):
        return conv2d_vjp(grad_output, input, weight, stride, padding, dilation, groups, need_input)

    return _layer_bwd(_conv_layer(stride, padding, dilation, groups), vjp, grad_y, grad_kl, x, mu, rho, prior_mu,
                      seed, prior_sigma, sigma_param, estimator, need_dx)


# --- Bayesian LoRA: y = base(x; W) + bias + scale * up(down(x; A); B), one factor Gaussian -------------------------
# Linear: x (M, K), W (N, K), A (r, K), B (N, r).  Conv: x NCHW, W (N, C, kh, kw), A (r, C, kh, kw) with the base's
# stride / padding / dilation, B (N, r, 1, 1).  The factor named by ``bayes`` has mean = that tensor, sigma = s(rho)
# and prior N(0, prior_sigma^2); the base is frozen.  Noise: reparam eps = philox_normal(seed, factor.shape);
# lrt draws it in rank space: bayes "B" over the output y (y's shape), bayes "A" over t = down(x; A) (t's shape).

class LinearLoRAMaps:
    """The three maps of a LoRA linear layer on 2-D x and their vector-Jacobian products."""

    @staticmethod
    def base(x, weight, bias=None):
        return F.linear(x, weight, bias)

    @staticmethod
    def base_input_grad(grad, x, weight):
        return grad @ weight

    @staticmethod
    def down(x, a):
        return F.linear(x, a)

    @staticmethod
    def down_vjp(grad, x, a, need_x):
        """(d x or None, d A) of x @ A.T."""
        return (grad @ a if need_x else None), grad.t() @ x

    @staticmethod
    def up(h, b):
        return F.linear(h, b)

    @staticmethod
    def up_vjp(grad, h, b):
        """(d h, d B) of h @ B.T."""
        return grad @ b, grad.t() @ h


class Conv2dLoRAMaps:
    """The maps of a LoRA conv2d (groups 1): base and down share the base's geometry, up is a 1x1 conv."""

    def __init__(self, stride, padding, dilation):
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)

    def base(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def base_input_grad(self, grad, x, weight):
        return torch.ops.aten.convolution_backward(grad, x, weight, None, self.stride, self.padding, self.dilation,
                                                   False, [0, 0], 1, [True, False, False])[0]

    def down(self, x, a):
        return F.conv2d(x, a, None, self.stride, self.padding, self.dilation)

    def down_vjp(self, grad, x, a, need_x):
        return conv2d_vjp(grad, x, a, self.stride, self.padding, self.dilation, 1, need_x)

    @staticmethod
    def up(h, b):
        return F.conv2d(h, b)

    @staticmethod
    def up_vjp(grad, h, b):
        b2 = b.reshape(b.shape[0], b.shape[1])
        return torch.einsum("nchw,cr->nrhw", grad, b2), torch.einsum("nchw,nrhw->cr", grad, h).reshape(b.shape)


def _bayes_lora_materialised(maps, x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma,
                             sigma_param, estimator):
    """(y, kl) of a Bayesian LoRA layer, noise materialised, differentiable by plain autograd.

    The factor sample / rank-space variance is formed in the factors' dtype promoted to float32; every map runs in
    x's dtype (as autocast runs a paper-style layer).  Passing float64 everywhere gives the oracle.
    """
    acc = torch.promote_types(rho.dtype, torch.float32)
    var_dtype = torch.promote_types(x.dtype, torch.float32)
    factor = lora_a if bayes == "A" else lora_b
    sigma = sigma_from_rho(rho.to(acc), sigma_param)
    kl = gaussian_kl_terms(factor.to(acc), sigma, None, prior_sigma).sum()
    a, b = lora_a.to(acc), lora_b.to(acc)
    in_x = lambda t: t.to(x.dtype)  # noqa: E731

    def noise_like(t):
        return philox_normal_reference(seed, t.numel(), 0, t.device).view(t.shape).to(t.dtype)

    if estimator == "reparam":
        eps = philox_normal_reference(seed, factor.numel(), 0, factor.device).view(factor.shape).to(acc)
        sample = factor.to(acc) + sigma * eps
        a, b = (sample, b) if bayes == "A" else (a, sample)
        lora = maps.up(maps.down(x, in_x(a)), in_x(b))
    elif bayes == "B":
        h = maps.down(x, in_x(a))
        var = maps.up(h.to(var_dtype) ** 2, (sigma * sigma).to(var_dtype)).clamp_min(0.0)
        lora = maps.up(h, in_x(b)) + (torch.sqrt(var) * noise_like(var)).to(x.dtype)
    else:
        var = maps.down(x.to(var_dtype) ** 2, (sigma * sigma).to(var_dtype)).clamp_min(0.0)
        t = maps.down(x, in_x(a)) + (torch.sqrt(var) * noise_like(var)).to(x.dtype)
        lora = maps.up(t, in_x(b))
    y = maps.base(x, in_x(weight), None if bias is None else in_x(bias))
    return y + scale * lora, kl


def bayes_lora_linear_materialised(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes="B", prior_sigma=1.0,
                                   sigma_param="softplus", estimator="reparam"):
    """(y, kl) of a Bayesian LoRA linear layer (x (..., K)), noise materialised; differentiable by autograd."""
    return _bayes_lora_materialised(LinearLoRAMaps, x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes,
                                    prior_sigma, sigma_param, estimator)


def bayes_lora_conv2d_materialised(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes="B", prior_sigma=1.0,
                                   sigma_param="softplus", estimator="reparam", *, stride=1, padding=0,
                                   dilation=1):
    """(y, kl) of a Bayesian LoRA conv2d (NCHW x), noise materialised; differentiable by autograd."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    maps = Conv2dLoRAMaps(pair(stride), pair(padding), pair(dilation))
    return _bayes_lora_materialised(maps, x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma,
                                    sigma_param, estimator)


# The reference backend's LoRA ops: the formulas of bnn_kernels.registry written out.  Every map runs on operands
# rounded to x's dtype and held in ``compute`` (default: the rank dtype, float32 or float64: exact float32
# accumulation); the elementwise work runs in the rank dtype.  ``h`` is the rank-space activation the up map consumed:
# down(x; A) for bayes "B", down(x; A sample) for reparam "A", the sampled t for lrt "A"; ``aux`` is t's standard
# deviation for lrt "A" and empty otherwise.  ``noise(seed, shape)`` draws the Philox normals (float32).  The triton
# backend runs the conv, and the linear where it does not fuse (float32 x, ranks above 64: triton/lora.py's
# ``lora_variant``), through the same code with compute = x's dtype (cuDNN / cuBLAS) and its own noise kernel.

def reference_noise(seed, shape, device):
    return philox_normal_reference(seed, torch.Size(shape).numel(), 0, device).view(shape)


class _LoRAArithmetic:
    """The dtypes and the noise source of one LoRA call."""

    def __init__(self, x, factor, compute=None, noise=reference_noise):
        self.x_dtype = x.dtype
        self.rank = torch.promote_types(torch.promote_types(x.dtype, factor.dtype), torch.float32)
        self.compute = compute or self.rank
        # float16 cannot hold sigma^2 of small sigmas: 16-bit variance maps take bfloat16 (as the linear kernels)
        self.variance = self.compute if self.compute.itemsize >= 4 else torch.bfloat16
        self.device = x.device
        self._noise = noise

    def operand(self, t):
        """t rounded to x's dtype, held in the compute dtype: a map's input."""
        return t.to(self.x_dtype).to(self.compute)

    def var_operand(self, t):
        """t (squares, sigma^2, the lrt gradient u) as an input of a variance map."""
        return t.to(self.variance)

    def noise(self, seed, shape):
        return self._noise(seed, shape, self.device).to(self.rank)


_WEIGHT_BLOCK_ELEMENTS = 1 << 18


def _weight_blocks(weight, arith):
    """(first output channel, channel count, the channels as a map operand) over blocks of the frozen weight: the
    weight whole when it already is an operand, else about 2**18 elements at a time, so that no converted copy of
    the whole weight exists."""
    channels = weight.shape[0]
    if weight.dtype == arith.x_dtype == arith.compute or channels == 0:
        yield 0, channels, arith.operand(weight)  # no copy when it already is an operand; nothing to copy if empty
        return
    step = max(1, _WEIGHT_BLOCK_ELEMENTS // max(1, weight[0].numel()))
    for first in range(0, channels, step):
        count = min(step, channels - first)
        yield first, count, arith.operand(weight[first:first + count])


def _base_forward(maps, x_, weight, bias, arith):
    y = torch.cat([maps.base(x_, w) for _, _, w in _weight_blocks(weight, arith)], dim=1).to(arith.rank)
    if bias is not None:
        y = y + arith.operand(bias).to(arith.rank).view(-1, *([1] * (y.dim() - 2)))
    return y


def _base_input_grad(maps, g, x_, weight, arith):
    g_ = g.to(arith.compute)
    return sum(maps.base_input_grad(g_[:, first:first + count], x_, w).to(arith.rank)
               for first, count, w in _weight_blocks(weight, arith))


def _lora_fwd(maps, x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma, sigma_param, estimator,
              **arithmetic):
    factor = lora_a if bayes == "A" else lora_b
    arith = _LoRAArithmetic(x, factor, **arithmetic)
    acc, op, var_op = arith.rank, arith.operand, arith.var_operand
    x_ = x.to(arith.compute)
    sigma = sigma_from_rho(rho.to(acc), sigma_param)
    kl = gaussian_kl_terms(factor.to(acc), sigma, None, prior_sigma).sum().to(compute_dtype(factor.dtype))
    a, b = lora_a.to(acc), lora_b.to(acc)
    aux = x.new_empty(0, dtype=acc)
    if estimator == "reparam":
        sample = factor.to(acc) + sigma * arith.noise(seed, factor.shape)
        a, b = (sample, b) if bayes == "A" else (a, sample)
        h = maps.down(x_, op(a)).to(acc)
        lora = maps.up(op(h), op(b)).to(acc)
    elif bayes == "B":
        h = maps.down(x_, op(a)).to(acc)
        std = maps.up(var_op(h * h), var_op(sigma * sigma)).to(acc).clamp_min(0.0).sqrt()
        lora = maps.up(op(h), op(b)).to(acc) + std * arith.noise(seed, std.shape)
    else:
        aux = maps.down(var_op(x.to(acc) ** 2), var_op(sigma * sigma)).to(acc).clamp_min(0.0).sqrt()
        h = maps.down(x_, op(a)).to(acc) + aux * arith.noise(seed, aux.shape)
        lora = maps.up(op(h), op(b)).to(acc)
    y = _base_forward(maps, x_, weight, bias, arith) + scale * lora
    return y.to(x.dtype), kl, h, aux


def _lora_bwd(maps, grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes, prior_sigma,
              sigma_param, estimator, need_dx, **arithmetic):
    bayes_a = bayes == "A"
    factor = lora_a if bayes_a else lora_b
    arith = _LoRAArithmetic(x, factor, **arithmetic)
    acc, op, var_op = arith.rank, arith.operand, arith.var_operand
    sigma, dsigma_drho, kl_dmu, kl_dsigma = (t.to(acc) for t in _sigma_and_kl_grads(
        factor, rho, None, prior_sigma, sigma_param, grad_kl))
    x_, h = x.to(arith.compute), h.to(acc)
    g_lora = scale * grad_y.to(acc)  # the gradient reaching the low-rank path's output
    a, b = lora_a.to(acc), lora_b.to(acc)

    def up_vjp(grad, h_, b_):
        return (t.to(acc) for t in maps.up_vjp(grad, h_, b_))

    def down_vjp(grad, x__, a_):
        dx_, da_ = maps.down_vjp(grad, x__, a_, need_dx)
        return (None if dx_ is None else dx_.to(acc)), da_.to(acc)

    dx_extra = 0.0
    if estimator == "reparam":
        eps = arith.noise(seed, factor.shape)
        sample = factor.to(acc) + sigma * eps
        a, b = (sample, b) if bayes_a else (a, sample)
        dh, grad_b = up_vjp(op(g_lora), op(h), op(b))
        dx_lora, grad_a = down_vjp(op(dh), x_, op(a))
        grad_factor, grad_other = (grad_a, grad_b) if bayes_a else (grad_b, grad_a)
        dmean = grad_factor + kl_dmu
        dsigma = grad_factor * eps + kl_dsigma
    elif not bayes_a:
        std = maps.up(var_op(h * h), var_op(sigma * sigma)).to(acc).clamp_min(0.0).sqrt()
        xi = arith.noise(seed, std.shape)
        u = torch.where(std > 0, g_lora * xi / (2.0 * std), torch.zeros_like(std))
        dh_mean, grad_mean = up_vjp(op(g_lora), op(h), op(b))
        dh_var, grad_var = up_vjp(var_op(u), var_op(h * h), var_op(sigma * sigma))
        dh = dh_mean + 2.0 * h * dh_var
        dx_lora, grad_other = down_vjp(op(dh), x_, op(a))
        dmean = grad_mean + kl_dmu
        dsigma = 2.0 * sigma * grad_var + kl_dsigma
    else:
        dt, grad_other = up_vjp(op(g_lora), op(h), op(b))
        xi = arith.noise(seed, aux.shape)
        u = torch.where(aux > 0, dt * xi / (2.0 * aux), torch.zeros_like(aux))
        dx_lora, grad_mean = down_vjp(op(dt), x_, op(a))
        dx_var, grad_var = down_vjp(var_op(u), var_op(x.to(acc) ** 2), var_op(sigma * sigma))
        if need_dx:
            dx_extra = 2.0 * x.to(acc) * dx_var
        dmean = grad_mean + kl_dmu
        dsigma = 2.0 * sigma * grad_var + kl_dsigma
    dx = None
    if need_dx:
        dx = (_base_input_grad(maps, grad_y, x_, weight, arith) + dx_lora + dx_extra).to(x.dtype)
    da, db = (dmean, grad_other) if bayes_a else (grad_other, dmean)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), (dsigma * dsigma_drho).to(rho.dtype)


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma, sigma_param, estimator,
                    **arithmetic):
    return _lora_fwd(LinearLoRAMaps, x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma,
                     sigma_param, estimator, **arithmetic)


def lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes, prior_sigma,
                    sigma_param, estimator, need_dx, **arithmetic):
    return _lora_bwd(LinearLoRAMaps, grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes,
                     prior_sigma, sigma_param, estimator, need_dx, **arithmetic)


def lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation, scale, bayes,
                    prior_sigma, sigma_param, estimator, **arithmetic):
    return _lora_fwd(Conv2dLoRAMaps(stride, padding, dilation), x, weight, bias, lora_a, lora_b, rho, seed, scale,
                     bayes, prior_sigma, sigma_param, estimator, **arithmetic)


def lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, stride, padding, dilation, scale,
                    bayes, prior_sigma, sigma_param, estimator, need_dx, **arithmetic):
    return _lora_bwd(Conv2dLoRAMaps(stride, padding, dilation), grad_y, grad_kl, x, weight, lora_a, lora_b, rho,
                     seed, h, aux, scale, bayes, prior_sigma, sigma_param, estimator, need_dx, **arithmetic)
