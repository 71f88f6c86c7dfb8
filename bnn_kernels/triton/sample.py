"""The "transient" reparam variant: one weight sample per GEMM, handed to torch's matmul (cuBLAS on a GPU).

The in-GEMM kernels of linear.py draw each weight tile's noise once per M-tile, about ceil(M / BLOCK_M) * N * K
normals per GEMM; here every GEMM draws the N * K normals of W once, and the GEMMs are torch's:

* forward: ``_sample_kernel`` writes W = mu + s(rho) * eps in x's dtype into a temporary (N, K) buffer and sums
  the KL of the elements it reads in the same pass (one float32 partial sum per program, added up afterwards:
  deterministic); y = F.linear(x, W, bias); W is dropped at once.
* backward: ``_sample_kernel`` writes W again (no KL) for dx = g @ W, and W is dropped; G = g^T @ x with float32
  output (see ``_weight_grad``); ``_reparam_grad_kernel`` reads G, mu, rho, prior_mu, regenerates eps and writes
  dmu = G + gk dKL/dmu and drho = (G eps + gk dKL/dsigma) s'(rho) in mu's dtype, dmu into G's own buffer when mu
  is float32.

The same launchers serve the Bayesian conv2d (conv.py): the weight sample / G there are (C_out, C_in / groups, kh, kw)
tensors fed to torch's convolutions, and ``sigma_squared`` (the same pass writing s(rho)^2 instead of a sample, KL
optionally fused) feeds its lrt variance convolution.

Memory: autograd keeps the op's inputs and the seed, nothing else (the memory contract); the buffers W (N * K in
x's dtype) and G (N * K float32) live only inside one call.  Noise: eps[n, k] = tl.randn(seed, n*K + k), the flat
index of the contiguous (N, K) weight, as in linear.py; W is formed in float32 and rounded to x's dtype as the
in-GEMM kernels round their tiles, so the two variants feed the GEMMs the same weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import FP_FUSION, prior_constants, to_dtype
from .kl import kl_terms, load_mu_sigma, load_posterior, load_prior, store_reparam_grads

_BLOCK = 1024  # weight elements per program
_NUM_WARPS = 4  # 8 elements (8 Philox states) per thread on a GPU

# torch.mm(a, b, out_dtype=torch.float32) with float16/bfloat16 a, b: a CUDA kernel in recent torch (aten::mm.dtype)
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


@triton.jit
def _sample_kernel(mu_ptr, rho_ptr, prior_ptr, seed_ptr, w_ptr, kl_ptr, numel, half_inv_ps2,
                   WITH_KL: tl.constexpr, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, VARIANCE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """w = mu + s(rho) * eps (or s(rho)^2 with VARIANCE: the lrt variance weights) in w's dtype; with WITH_KL,
    kl[pid] = the KL summed over this program's elements."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mu, sigma = load_mu_sigma(mu_ptr, rho_ptr, offs, mask, SOFTPLUS)
    if VARIANCE:
        w = sigma * sigma
    else:
        w = mu + sigma * tl.randn(tl.load(seed_ptr), offs)
    tl.store(w_ptr + offs, to_dtype(w, w_ptr.dtype.element_ty), mask=mask)
    if WITH_KL:
        prior = load_prior(prior_ptr, offs, mask, mu, HAS_PRIOR)
        terms = kl_terms(mu, sigma, prior, half_inv_ps2, HAS_PRIOR)
        tl.store(kl_ptr + pid, tl.sum(tl.where(mask, terms, 0.0), axis=0))


@triton.jit
def _reparam_grad_kernel(grad_ptr, mu_ptr, rho_ptr, prior_ptr, seed_ptr, gk_ptr, dmu_ptr, drho_ptr, numel, inv_ps2,
                         HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr):
    """dmu, drho from G (float32, ``grad_ptr``); dmu_ptr may be grad_ptr (each element is read before it is written)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    seed = tl.load(seed_ptr)
    gk = tl.load(gk_ptr).to(tl.float32)
    grad_w = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_sigma = grad_w * tl.randn(seed, offs)
    mu, prior, sigma, slope = load_posterior(mu_ptr, rho_ptr, prior_ptr, offs, mask, HAS_PRIOR, SOFTPLUS)
    store_reparam_grads(dmu_ptr, drho_ptr, offs, mask, grad_w, grad_sigma, mu, sigma, slope, prior, gk, inv_ps2,
                        HAS_PRIOR)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

def sample_weight(mu, rho, seed, dtype, sigma_param, prior=None, prior_sigma=1.0, with_kl=False):
    """(W, kl): W = mu + s(rho) * philox_normal(seed, mu.shape), a new tensor in ``dtype``; kl the float32 KL of
    (mu, rho) against N(prior, prior_sigma^2) when ``with_kl``, else None.  mu, rho, prior contiguous, not empty."""
    return _posterior_pass(mu, rho, seed, dtype, sigma_param, prior, prior_sigma, with_kl, variance=False)


def sigma_squared(mu, rho, dtype, sigma_param, prior=None, prior_sigma=1.0, with_kl=False):
    """(s(rho)^2 as a new tensor in ``dtype``, kl or None): the lrt variance weights, KL as in ``sample_weight``."""
    # no noise is drawn: mu stands in for the seed pointer
    return _posterior_pass(mu, rho, mu, dtype, sigma_param, prior, prior_sigma, with_kl, variance=True)


def _posterior_pass(mu, rho, seed, dtype, sigma_param, prior, prior_sigma, with_kl, variance):
    numel = mu.numel()
    grid = triton.cdiv(numel, _BLOCK)
    w = torch.empty(mu.shape, dtype=dtype, device=mu.device)
    partial = torch.empty(grid if with_kl else 0, dtype=torch.float32, device=mu.device)
    half_inv_ps2, _ = prior_constants(prior_sigma)
    _sample_kernel[(grid,)](mu, rho, mu if prior is None else prior, seed, w, partial, numel, half_inv_ps2,
                            WITH_KL=with_kl, HAS_PRIOR=prior is not None, SOFTPLUS=sigma_param == "softplus",
                            VARIANCE=variance, BLOCK=_BLOCK, num_warps=_NUM_WARPS, **FP_FUSION)
    return w, (partial.sum() if with_kl else None)


def reparam_weight_grads(grad_w, grad_kl, mu, rho, prior, seed, prior_sigma, sigma_param):
    """(dmu, drho) in mu's dtype from G = ``grad_w`` (contiguous, mu's shape; float32 here, x's dtype from a conv);
    when G has mu's dtype, dmu is G's buffer overwritten in place (one weight-sized allocation fewer).
    ``grad_kl``: float32 0-dim tensor on mu's device."""
    dmu = grad_w if grad_w.dtype == mu.dtype else torch.empty_like(mu)
    drho = torch.empty_like(rho)
    numel = mu.numel()
    _, inv_ps2 = prior_constants(prior_sigma)
    _reparam_grad_kernel[(triton.cdiv(numel, _BLOCK),)](
        grad_w, mu, rho, mu if prior is None else prior, seed, grad_kl, dmu, drho, numel, inv_ps2,
        HAS_PRIOR=prior is not None, SOFTPLUS=sigma_param == "softplus", BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        **FP_FUSION)
    return dmu, drho


def _weight_grad(g, x):
    """G = g^T @ x as a float32 (N, K) tensor: operands in x's dtype, float32 accumulation and float32 output.

    A 16-bit G would be rounded to 8 (bfloat16) or 11 (float16) bits before the epilogue adds the KL gradient and
    forms G * eps, and dmu would be rounded twice; a float32 G keeps this variant as accurate as the in-GEMM one
    (whose G stays in float32 registers), and for float32 mu it is dmu's buffer.  The price is writing N*K*4 bytes
    instead of N*K*2, small next to the GEMM's reads of g and x.
    """
    if x.dtype == torch.float32:
        return torch.mm(g.t(), x)
    if x.is_cuda and _MM_HAS_OUT_DTYPE:
        return torch.mm(g.t(), x, out_dtype=torch.float32)
    # CPU tensors (the interpreter) or a torch without aten::mm.dtype: products of 16-bit floats are exact in
    # float32, so upcasting first computes the same GEMM (up to the order of the float32 sums).
    return torch.mm(g.t().float(), x.float())


def transient_linear_fwd(x, mu, rho, bias, prior, seed, prior_sigma, sigma_param):
    """(y, kl) of the reparam estimator: x (M, K), mu/rho/prior (N, K), all contiguous and non-empty."""
    w, kl = sample_weight(mu, rho, seed, x.dtype, sigma_param, prior, prior_sigma, with_kl=True)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    del w  # transient: nothing weight-sized outlives the call
    return y, kl


def transient_linear_bwd(g, grad_kl, x, mu, rho, prior, seed, prior_sigma, sigma_param, need_dx):
    """(dx or None, dmu, drho) of the reparam estimator; g (M, N) in x's dtype, grad_kl float32 0-dim."""
    dx = None
    if need_dx:
        w, _ = sample_weight(mu, rho, seed, x.dtype, sigma_param)
        dx = torch.mm(g, w)
        del w  # freed before G is allocated: at most one weight-sized temporary at a time besides the gradients
    grad_w = _weight_grad(g, x).contiguous()
    return (dx, *reparam_weight_grads(grad_w, grad_kl, mu, rho, prior, seed, prior_sigma, sigma_param))
