"""Bayesian linear layer in Triton: weight noise generated inside the GEMMs, never stored.

Shapes: x (M, K), mu/rho/prior_mu (N, K), y/std/grad_y (M, N).  Noise: eps[n, k] = tl.randn(seed, n*K + k)
(reparam, the weight noise) and xi[m, n] = tl.randn(seed, m*N + n) (lrt, the output noise), int64 counters.

Kernels (one program per output tile, grouped tile order for L2 reuse, fp32 accumulation):

* ``_reparam_fwd_kernel`` (grid M x N tiles, loop over K): each (BLOCK_N x BLOCK_K) tile of
  W = mu + s(rho) * eps is formed in registers in float32, cast to x's dtype and fed to tl.dot; bias in the
  epilogue.  The programs of the first M-tile also sum the KL of the tiles they read, per weight row.
* ``_lrt_fwd_kernel`` (grid M x N tiles, loop over K): mean = x @ mu^T and var = x^2 @ (s^2)^T in the same loop;
  epilogue std = sqrt(var), y = mean + bias + std * xi; writes y and std.  KL as above.
* ``_reparam_dx_kernel`` (grid M x K tiles, loop over N): dx = g @ W with W tiles regenerated.
* ``_reparam_dw_kernel`` (grid N x K tiles, loop over M): G = g^T @ x; epilogue regenerates eps for the tile,
  dmu = G + gk dKL/dmu, drho = (G eps + gk dKL/dsigma) s'(rho).
* ``_lrt_dx_kernel`` (grid M x K tiles, loop over N): u = g xi / (2 std) formed per tile from the regenerated
  xi; dx = g @ mu + 2 x (u @ s^2).
* ``_lrt_dw_kernel`` (grid N x K tiles, loop over M): g^T @ x and u^T @ x^2 in one loop; epilogue
  dmu = g^T x + gk dKL/dmu, drho = (2 s (u^T x^2) + gk dKL/dsigma) s'(rho).

GEMM operands are in x's dtype; the lrt variance operands (x^2, s^2, u) are float32 for float32 x and bfloat16
otherwise (float16 cannot hold s^2 of small sigmas).  Nothing weight-sized is allocated besides dmu and drho.

Two variants of the reparam estimator, chosen per call by ``reparam_variant(M, device, dtype)``:

* ``"fused"``: the in-GEMM kernels above.  They draw each weight tile's noise once per M-tile
  (about ceil(M / BLOCK_M) * N * K normals per GEMM): cheapest when M fits in one or two tiles.
* ``"transient"`` (sample.py): one elementwise kernel writes the weight sample in x's dtype into a temporary
  buffer (KL fused), torch's matmul (cuBLAS on a GPU) runs the GEMM and the buffer is dropped; backward samples
  again for dx and runs an elementwise epilogue over G = g^T x.  N * K normals per GEMM whatever M.

The environment variable ``BNN_TRITON_REPARAM`` = ``fused`` | ``transient`` | ``auto`` (default) picks the variant;
it is read at every call.  ``auto`` takes ``transient`` when M > ``TRANSIENT_ABOVE_M``, else ``fused``.

Two of the lrt estimator, chosen by ``lrt_variant(device, dtype)`` (``BNN_TRITON_LRT`` = ``fused`` | ``composition`` |
``auto``): the kernels above, or composition.py (mean and variance GEMMs on cuBLAS, output noise and gradient
epilogues elementwise, as the conv's lrt).

``auto`` picks the cuBLAS variants (transient, composition) wherever tl.dot has no tensor cores
(``common.fused_dots_use_tensor_cores``: below sm_80, i.e. a T4 or an RTX 20xx, and for float32 x unless torch
allows tf32), whose fused kernels would run their GEMMs as FMA loops.  All variants honour the memory contract
(autograd keeps the inputs and the seed; lrt also the output-sized std) and give the same noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import reference
from ..sigma import compute_dtype
from .common import (FP_FUSION, dot_precision, fused_dots_use_tensor_cores, gemm_configs, interpreter_meta, mma,
                     prior_constants, to_dtype, tuned, var_in_float32, variant_setting)
from .kl import kl_grads, kl_terms, load_mu_sigma, load_posterior, load_prior, sigma_of, store_reparam_grads
from .composition import Maps, lrt_bwd, lrt_fwd, lrt_u
from .sample import _weight_grad, transient_linear_bwd, transient_linear_fwd

REPARAM_ENV = "BNN_TRITON_REPARAM"
REPARAM_VARIANTS = ("fused", "transient")
# auto: the transient variant for more than this many rows of x.  A prediction (benchmarks/NOTES.md): at M <= 256 the
# in-GEMM kernels draw each normal once or twice per GEMM and save the pass that writes and reads the sample;
# beyond, their noise cost grows with M while the transient variant's stays N * K.  To be measured on a GPU.
TRANSIENT_ABOVE_M = 256
LRT_ENV = "BNN_TRITON_LRT"
LRT_VARIANTS = ("fused", "composition")

GROUP = tl.constexpr(8)  # tiles along the first grid axis per group (grouped ordering)

# Autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen so that the Philox states of a tile
# stay in registers on sm_90 (<= ~16 noise elements per thread at a time).  benchmarks/sm90_compile.py measures it:
# with Triton 3.6 and 3.9 none of these spills in bfloat16 except a few bytes (<= 20) in three lrt tiles.
# Forward kernels tile M x N and loop over K; the reparam noise tile is BLOCK_N x BLOCK_K (drawn once per M-tile,
# so a large BLOCK_M amortises it).
_REPARAM_FWD_CONFIGS = gemm_configs([
    (128, 128, 16, 8, 3), (256, 128, 16, 8, 3), (128, 64, 32, 8, 3),
    (128, 64, 16, 4, 4), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3),
])
# lrt forward: two accumulators (mean, var); the output noise is drawn in the epilogue, one column half at a time.
_LRT_FWD_CONFIGS = gemm_configs([
    (128, 64, 32, 8, 3), (128, 128, 16, 8, 3), (128, 64, 16, 4, 4),
    (64, 64, 32, 4, 3), (32, 64, 32, 4, 3),
])
# dx kernels tile M x K and loop over N.
_REPARAM_DX_CONFIGS = gemm_configs([
    (128, 16, 128, 8, 3), (128, 32, 128, 8, 3), (128, 32, 64, 4, 3),
    (64, 32, 64, 4, 3), (32, 32, 64, 4, 3),
])
_LRT_DX_CONFIGS = gemm_configs([
    (128, 16, 128, 8, 3), (128, 32, 128, 8, 3), (64, 32, 128, 4, 3),
    (64, 32, 64, 4, 3), (32, 32, 64, 4, 3),
])
# dw kernels tile N x K and loop over M; the epilogue (noise for reparam) runs one column half at a time.
# (A 32 x 128 x 128 tile, 8 warps, spilled 4-272 bytes in both dw kernels on sm_90: dropped.)
_DW_CONFIGS = gemm_configs([
    (32, 128, 64, 8, 3), (64, 128, 64, 8, 3),
    (64, 64, 64, 4, 3), (32, 64, 64, 4, 3),
])


@triton.jit
def _grouped_tile(pid, tiles_a, tiles_b, GROUP_A: tl.constexpr):
    """(a, b) tile indices of program ``pid`` walking GROUP_A rows of tiles at a time (L2 reuse along b)."""
    per_group = GROUP_A * tiles_b
    group = pid // per_group
    first_a = group * GROUP_A
    size_a = tl.minimum(tiles_a - first_a, GROUP_A)
    a = first_a + (pid % per_group) % size_a
    b = (pid % per_group) // size_a
    return a, b


@triton.jit
def _to_var_dtype(t, VAR_FP32: tl.constexpr):
    if VAR_FP32:
        out = t.to(tl.float32)
    else:
        out = to_dtype(t, tl.bfloat16)
    return out


@triton.jit
def _column_halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The left and right (ROWS, COLS // 2) halves of a (ROWS, COLS) tile.

    Epilogues that draw noise run once per half: half as many Philox states live at once (fewer spills).
    """
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _weight_tile(offs_n, offs_k, mu_ptr, rho_ptr, prior_ptr, N, K, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Offsets, mask, mu, prior (mu when absent), sigma and s'(rho) of one weight tile, in float32."""
    w_off = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    mu, prior, sigma, slope = load_posterior(mu_ptr, rho_ptr, prior_ptr, w_off, w_mask, HAS_PRIOR, SOFTPLUS)
    return w_off, w_mask, mu, prior, sigma, slope


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------

@tuned(_REPARAM_FWD_CONFIGS, key=("M", "N", "K", "HAS_BIAS", "HAS_PRIOR", "SOFTPLUS", "DOT_PREC"))
@triton.jit
def _reparam_fwd_kernel(x_ptr, mu_ptr, rho_ptr, bias_ptr, prior_ptr, seed_ptr, y_ptr, kl_ptr,
                        M, N, K, half_inv_ps2,
                        HAS_BIAS: tl.constexpr, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr,
                        DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_x = offs_m.to(tl.int64) * K
    rows_w = offs_n.to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kl_rows = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows_x[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_off = rows_w[:, None] + offs_k[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        mu, sigma = load_mu_sigma(mu_ptr, rho_ptr, w_off, w_mask, SOFTPLUS)
        w = tl.where(w_mask, mu + sigma * tl.randn(seed, w_off), 0.0)
        acc = mma(x, tl.trans(to_dtype(w, x.dtype)), acc, DOT_PREC)
        if pid_m == 0:
            prior = load_prior(prior_ptr, w_off, w_mask, mu, HAS_PRIOR)
            terms = kl_terms(mu, sigma, prior, half_inv_ps2, HAS_PRIOR)
            kl_rows += tl.sum(tl.where(w_mask, terms, 0.0), axis=1)
    if pid_m == 0:
        tl.store(kl_ptr + offs_n, kl_rows, mask=mask_n)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += to_dtype(bias, y_ptr.dtype.element_ty).to(tl.float32)[None, :]
    y_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptr + y_off, to_dtype(acc, y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@tuned(_LRT_FWD_CONFIGS, key=("M", "N", "K", "HAS_BIAS", "HAS_PRIOR", "SOFTPLUS", "VAR_FP32", "DOT_PREC"))
@triton.jit
def _lrt_fwd_kernel(x_ptr, mu_ptr, rho_ptr, bias_ptr, prior_ptr, seed_ptr, y_ptr, std_ptr, kl_ptr,
                    M, N, K, half_inv_ps2,
                    HAS_BIAS: tl.constexpr, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr,
                    VAR_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_x = offs_m.to(tl.int64) * K
    rows_w = offs_n.to(tl.int64) * K
    mean = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    var = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kl_rows = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows_x[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_off = rows_w[:, None] + offs_k[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        mu, sigma = load_mu_sigma(mu_ptr, rho_ptr, w_off, w_mask, SOFTPLUS)
        mean = mma(x, tl.trans(to_dtype(mu, x.dtype)), mean, DOT_PREC)
        xf = x.to(tl.float32)
        var_w = tl.where(w_mask, sigma * sigma, 0.0)
        var = mma(_to_var_dtype(xf * xf, VAR_FP32), tl.trans(_to_var_dtype(var_w, VAR_FP32)), var,
                  DOT_PREC)
        if pid_m == 0:
            prior = load_prior(prior_ptr, w_off, w_mask, mu, HAS_PRIOR)
            terms = kl_terms(mu, sigma, prior, half_inv_ps2, HAS_PRIOR)
            kl_rows += tl.sum(tl.where(w_mask, terms, 0.0), axis=1)
    if pid_m == 0:
        tl.store(kl_ptr + offs_n, kl_rows, mask=mask_n)
    seed = tl.load(seed_ptr)
    HALF: tl.constexpr = BLOCK_N // 2
    mean_left, mean_right = _column_halves(mean, BLOCK_M, BLOCK_N)
    var_left, var_right = _column_halves(var, BLOCK_M, BLOCK_N)
    cols = pid_n * BLOCK_N + tl.arange(0, HALF)
    _lrt_fwd_epilogue(mean_left, var_left, offs_m, cols, bias_ptr, seed, y_ptr, std_ptr, M, N, HAS_BIAS)
    _lrt_fwd_epilogue(mean_right, var_right, offs_m, cols + HALF, bias_ptr, seed, y_ptr, std_ptr, M, N, HAS_BIAS)


@triton.jit
def _lrt_fwd_epilogue(mean, var, offs_m, offs_n, bias_ptr, seed, y_ptr, std_ptr, M, N, HAS_BIAS: tl.constexpr):
    """std = sqrt(var), y = mean + bias + std * xi on one (rows x cols) tile."""
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        mean += to_dtype(bias, y_ptr.dtype.element_ty).to(tl.float32)[None, :]
    std = tl.sqrt(var)
    y_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    y = mean + std * tl.randn(seed, y_off)
    y_mask = (offs_m < M)[:, None] & mask_n[None, :]
    tl.store(y_ptr + y_off, to_dtype(y, y_ptr.dtype.element_ty), mask=y_mask)
    tl.store(std_ptr + y_off, to_dtype(std, std_ptr.dtype.element_ty), mask=y_mask)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------

@tuned(_REPARAM_DX_CONFIGS, key=("M", "N", "K", "SOFTPLUS", "DOT_PREC"))
@triton.jit
def _reparam_dx_kernel(g_ptr, mu_ptr, rho_ptr, seed_ptr, dx_ptr, M, N, K,
                       SOFTPLUS: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # output tile (BLOCK_M x BLOCK_K) of dx = g @ W, reduction over N
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows_g = offs_m.to(tl.int64) * N
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(g_ptr + rows_g[:, None] + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_off = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        mu, sigma = load_mu_sigma(mu_ptr, rho_ptr, w_off, w_mask, SOFTPLUS)
        w = tl.where(w_mask, mu + sigma * tl.randn(seed, w_off), 0.0)
        acc = mma(g, to_dtype(w, g.dtype), acc, DOT_PREC)
    dx_off = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(dx_ptr + dx_off, to_dtype(acc, dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@tuned(_DW_CONFIGS, key=("M", "N", "K", "HAS_PRIOR", "SOFTPLUS", "DOT_PREC"))
@triton.jit
def _reparam_dw_kernel(g_ptr, x_ptr, mu_ptr, rho_ptr, prior_ptr, seed_ptr, gk_ptr, dmu_ptr, drho_ptr,
                       M, N, K, inv_ps2,
                       HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # output tile (BLOCK_N x BLOCK_K) of G = g^T @ x, reduction over M
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64)
        g = tl.load(g_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = mma(tl.trans(g), x, acc, DOT_PREC)
    seed = tl.load(seed_ptr)
    gk = tl.load(gk_ptr).to(tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    left, right = _column_halves(acc, BLOCK_N, BLOCK_K)
    cols = pid_k * BLOCK_K + tl.arange(0, HALF)
    _reparam_dw_epilogue(left, offs_n, cols, mu_ptr, rho_ptr, prior_ptr, seed, gk, dmu_ptr, drho_ptr, N, K, inv_ps2,
                         HAS_PRIOR, SOFTPLUS)
    _reparam_dw_epilogue(right, offs_n, cols + HALF, mu_ptr, rho_ptr, prior_ptr, seed, gk, dmu_ptr, drho_ptr, N, K,
                         inv_ps2, HAS_PRIOR, SOFTPLUS)


@triton.jit
def _reparam_dw_epilogue(grad_w, offs_n, offs_k, mu_ptr, rho_ptr, prior_ptr, seed, gk, dmu_ptr, drho_ptr, N, K,
                         inv_ps2, HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dmu = G + gk dKL/dmu, drho = (G eps + gk dKL/dsigma) s'(rho) on one weight tile (G = grad_w)."""
    # the noise first, while only the gradient tile is live
    grad_sigma = grad_w * tl.randn(seed, offs_n.to(tl.int64)[:, None] * K + offs_k[None, :])
    w_off, w_mask, mu, prior, sigma, slope = _weight_tile(offs_n, offs_k, mu_ptr, rho_ptr, prior_ptr, N, K,
                                                          HAS_PRIOR, SOFTPLUS)
    store_reparam_grads(dmu_ptr, drho_ptr, w_off, w_mask, grad_w, grad_sigma, mu, sigma, slope, prior, gk, inv_ps2,
                        HAS_PRIOR)


@tuned(_LRT_DX_CONFIGS, key=("M", "N", "K", "SOFTPLUS", "VAR_FP32", "DOT_PREC"))
@triton.jit
def _lrt_dx_kernel(g_ptr, x_ptr, std_ptr, mu_ptr, rho_ptr, seed_ptr, dx_ptr, M, N, K,
                   SOFTPLUS: tl.constexpr, VAR_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # output tile (BLOCK_M x BLOCK_K) of dx = g @ mu + 2 x (u @ s^2), reduction over N
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows_y = offs_m.to(tl.int64) * N
    acc_mu = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y_off = rows_y[:, None] + offs_n[None, :]
        y_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + y_off, mask=y_mask, other=0.0)
        std = tl.load(std_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
        u = lrt_u(g, std, seed, y_off)
        w_off = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        mu = tl.load(mu_ptr + w_off, mask=w_mask, other=0.0)
        rho = tl.load(rho_ptr + w_off, mask=w_mask, other=1.0).to(tl.float32)
        sigma = sigma_of(rho, SOFTPLUS)
        var_w = tl.where(w_mask, sigma * sigma, 0.0)
        acc_mu = mma(g, to_dtype(mu, g.dtype), acc_mu, DOT_PREC)
        acc_u = mma(_to_var_dtype(u, VAR_FP32), _to_var_dtype(var_w, VAR_FP32), acc_u, DOT_PREC)
    x_off = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
    dx = acc_mu + 2.0 * x * acc_u
    tl.store(dx_ptr + x_off, to_dtype(dx, dx_ptr.dtype.element_ty), mask=x_mask)


@tuned(_DW_CONFIGS, key=("M", "N", "K", "HAS_PRIOR", "SOFTPLUS", "VAR_FP32", "DOT_PREC"))
@triton.jit
def _lrt_dw_kernel(g_ptr, x_ptr, std_ptr, mu_ptr, rho_ptr, prior_ptr, seed_ptr, gk_ptr, dmu_ptr, drho_ptr,
                   M, N, K, inv_ps2,
                   HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr, VAR_FP32: tl.constexpr,
                   DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # output tiles (BLOCK_N x BLOCK_K) of g^T @ x and u^T @ x^2, reduction over M
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    seed = tl.load(seed_ptr)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc_mu = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64)
        y_off = rows[:, None] * N + offs_n[None, :]
        y_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + y_off, mask=y_mask, other=0.0)
        std = tl.load(std_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
        u = lrt_u(g, std, seed, y_off)
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        xf = x.to(tl.float32)
        acc_mu = mma(tl.trans(g), x, acc_mu, DOT_PREC)
        acc_s = mma(tl.trans(_to_var_dtype(u, VAR_FP32)), _to_var_dtype(xf * xf, VAR_FP32), acc_s,
                     DOT_PREC)
    gk = tl.load(gk_ptr).to(tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    mu_left, mu_right = _column_halves(acc_mu, BLOCK_N, BLOCK_K)
    s_left, s_right = _column_halves(acc_s, BLOCK_N, BLOCK_K)
    cols = pid_k * BLOCK_K + tl.arange(0, HALF)
    _lrt_dw_epilogue(mu_left, s_left, offs_n, cols, mu_ptr, rho_ptr, prior_ptr, gk, dmu_ptr, drho_ptr, N, K, inv_ps2,
                     HAS_PRIOR, SOFTPLUS)
    _lrt_dw_epilogue(mu_right, s_right, offs_n, cols + HALF, mu_ptr, rho_ptr, prior_ptr, gk, dmu_ptr, drho_ptr, N, K,
                     inv_ps2, HAS_PRIOR, SOFTPLUS)


@triton.jit
def _lrt_dw_epilogue(grad_mu, u_x2, offs_n, offs_k, mu_ptr, rho_ptr, prior_ptr, gk, dmu_ptr, drho_ptr, N, K, inv_ps2,
                     HAS_PRIOR: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dmu = g^T x + gk dKL/dmu, drho = (2 sigma (u^T x^2) + gk dKL/dsigma) s'(rho) on one weight tile."""
    w_off, w_mask, mu, prior, sigma, slope = _weight_tile(offs_n, offs_k, mu_ptr, rho_ptr, prior_ptr, N, K,
                                                          HAS_PRIOR, SOFTPLUS)
    kl_dmu, kl_dsigma = kl_grads(mu, sigma, prior, gk, inv_ps2, HAS_PRIOR)
    tl.store(dmu_ptr + w_off, to_dtype(grad_mu + kl_dmu, dmu_ptr.dtype.element_ty), mask=w_mask)
    drho = (2.0 * sigma * u_x2 + kl_dsigma) * slope
    tl.store(drho_ptr + w_off, to_dtype(drho, drho_ptr.dtype.element_ty), mask=w_mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers (the backend contract of bnn_kernels.registry)
# ----------------------------------------------------------------------------------------------------------------

def reparam_variant(M: int, device=None, dtype: torch.dtype = torch.bfloat16) -> str:
    """``"fused"`` or ``"transient"``: the reparam variant a call with ``M`` rows of ``dtype`` x on ``device``
    runs, per BNN_TRITON_REPARAM.  ``auto``: transient above TRANSIENT_ABOVE_M rows, and wherever tl.dot on x's
    dtype has no tensor cores (cuBLAS has them; ``common.fused_dots_use_tensor_cores``)."""
    choice = variant_setting(REPARAM_ENV, REPARAM_VARIANTS)
    if choice == "auto":
        fused = M <= TRANSIENT_ABOVE_M and fused_dots_use_tensor_cores(device, dtype)
        return "fused" if fused else "transient"
    return choice


def lrt_variant(device=None, dtype: torch.dtype = torch.bfloat16) -> str:
    """``"fused"`` (the lrt kernels above) or ``"composition"`` (composition.py: the mean and variance GEMMs on
    cuBLAS, output noise elementwise): the lrt variant a call with ``dtype`` x on ``device`` runs, per
    BNN_TRITON_LRT.  ``auto``: composition wherever tl.dot on x's dtype has no tensor cores, else fused."""
    choice = variant_setting(LRT_ENV, LRT_VARIANTS)
    if choice == "auto":
        return "fused" if fused_dots_use_tensor_cores(device, dtype) else "composition"
    return choice


def _linear_vjp(g, x, w, need_x):
    """(dx = g @ w or None, G = g^T @ x in float32): the vjp of F.linear for composition.py."""
    return (torch.mm(g, w) if need_x else None), _weight_grad(g, x)


LINEAR_MAPS = Maps(forward=F.linear, vjp=_linear_vjp)


def _grid(rows: int, cols: int, row_block: str, col_block: str):
    return lambda meta: (triton.cdiv(rows, meta[row_block]) * triton.cdiv(cols, meta[col_block]),)


def linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator):
    """(y, kl, std): y (M, N) in x's dtype, kl float32 (), std (M, N) float32 for lrt, else empty."""
    x, mu, rho = x.contiguous(), mu.contiguous(), rho.contiguous()
    bias = None if bias is None else bias.contiguous()
    prior = None if prior_mu is None else prior_mu.contiguous()
    M, K = x.shape
    N = mu.shape[0]
    if min(M, N, K) == 0:  # nothing to launch; the reference handles empty GEMMs
        y, kl, _ = reference.linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator)
        return y, kl, (x.new_zeros((M, N), dtype=compute_dtype(x.dtype)) if estimator == "lrt" else x.new_empty(0))
    if estimator == "reparam" and reparam_variant(M, x.device, x.dtype) == "transient":
        y, kl = transient_linear_fwd(x, mu, rho, bias, prior, seed, prior_sigma, sigma_param)
        return y, kl, x.new_empty(0)
    if estimator == "lrt" and lrt_variant(x.device, x.dtype) == "composition":
        return lrt_fwd(LINEAR_MAPS, x, mu, rho, bias, prior, seed, prior_sigma, sigma_param)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    kl_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    half_inv_ps2, _ = prior_constants(prior_sigma)
    common = dict(HAS_BIAS=bias is not None, HAS_PRIOR=prior is not None, SOFTPLUS=sigma_param == "softplus",
                  DOT_PREC=dot_precision(), **interpreter_meta(), **FP_FUSION)
    bias_arg = mu if bias is None else bias
    prior_arg = mu if prior is None else prior
    grid = _grid(M, N, "BLOCK_M", "BLOCK_N")
    if estimator == "reparam":
        _reparam_fwd_kernel[grid](x, mu, rho, bias_arg, prior_arg, seed, y, kl_rows, M, N, K, half_inv_ps2,
                                  **common)
        std = x.new_empty(0)
    else:
        std = torch.empty((M, N), dtype=compute_dtype(x.dtype), device=x.device)
        _lrt_fwd_kernel[grid](x, mu, rho, bias_arg, prior_arg, seed, y, std, kl_rows, M, N, K, half_inv_ps2,
                              VAR_FP32=var_in_float32(x.dtype), **common)
    return y, kl_rows.sum(), std


def linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param, estimator, need_dx):
    """(dx or None, dmu, drho); dmu/drho in mu's dtype and include grad_kl times the KL gradient."""
    g, x, mu, rho = grad_y.contiguous(), x.contiguous(), mu.contiguous(), rho.contiguous()
    prior = None if prior_mu is None else prior_mu.contiguous()
    grad_kl = grad_kl.to(device=x.device, dtype=torch.float32).contiguous()
    M, K = x.shape
    N = mu.shape[0]
    if min(M, N, K) == 0:
        return reference.linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param,
                                    estimator, need_dx)
    if estimator == "reparam" and reparam_variant(M, x.device, x.dtype) == "transient":
        return transient_linear_bwd(g, grad_kl, x, mu, rho, prior, seed, prior_sigma, sigma_param, need_dx)
    if estimator == "lrt" and lrt_variant(x.device, x.dtype) == "composition":
        return lrt_bwd(LINEAR_MAPS, g, grad_kl, x, mu, rho, prior, seed, std, prior_sigma, sigma_param, need_dx)
    _, inv_ps2 = prior_constants(prior_sigma)
    softplus = sigma_param == "softplus"
    precision = dot_precision()
    meta = {**interpreter_meta(), **FP_FUSION}
    prior_arg = mu if prior is None else prior
    dmu = torch.empty_like(mu)
    drho = torch.empty_like(rho)
    dx = torch.empty_like(x) if need_dx else None
    dx_grid = _grid(M, K, "BLOCK_M", "BLOCK_K")
    dw_grid = _grid(N, K, "BLOCK_N", "BLOCK_K")
    if estimator == "reparam":
        if need_dx:
            _reparam_dx_kernel[dx_grid](g, mu, rho, seed, dx, M, N, K, SOFTPLUS=softplus, DOT_PREC=precision, **meta)
        _reparam_dw_kernel[dw_grid](g, x, mu, rho, prior_arg, seed, grad_kl, dmu, drho, M, N, K, inv_ps2,
                                    HAS_PRIOR=prior is not None, SOFTPLUS=softplus, DOT_PREC=precision, **meta)
    else:
        std = std.contiguous()
        var_fp32 = var_in_float32(x.dtype)
        if need_dx:
            _lrt_dx_kernel[dx_grid](g, x, std, mu, rho, seed, dx, M, N, K, SOFTPLUS=softplus, VAR_FP32=var_fp32,
                                    DOT_PREC=precision, **meta)
        _lrt_dw_kernel[dw_grid](g, x, std, mu, rho, prior_arg, seed, grad_kl, dmu, drho, M, N, K, inv_ps2,
                                HAS_PRIOR=prior is not None, SOFTPLUS=softplus, VAR_FP32=var_fp32,
                                DOT_PREC=precision, **meta)
    return dx, dmu, drho
