"""Bayesian LoRA in Triton: the low-rank path rides on the frozen base GEMM.

Linear layer, x (M, K), frozen W (N, K) (any float dtype, converted tile by tile in registers: never as a whole),
A (r, K), B (N, r); R = the rank padded to a power of two >= 16 (tl.dot's minimum), the padding masked.  Noise
indices as in bnn_kernels.registry: reparam eps = philox_normal(seed, factor.shape); lrt xi[m, n] =
tl.randn(seed, m*N + n) (bayes "B") or xi[m, j] = tl.randn(seed, m*r + j) (bayes "A").

* The Bayesian factor goes through one small elementwise pass first (sample.py, KL fused): its sample for reparam,
  sigma^2 for lrt, r x K or N x r elements, dropped after the call.  The GEMM kernels then only load it.  Forming
  the sample inside them instead would redraw it in every program: (M/BM)(N/BN) times r x K normals for a Bayesian
  A in the forward (at M = 8192, N = K = 1280, BM = BN = 128: 640 x 16 x 1280 = 13 M normals, longer than the
  GEMM itself), where the small pass draws r x K once.
* ``_lora_fwd_kernel`` (grid M x N tiles, loop over K): acc += x @ W^T and acc_h += x @ A^T in the same K loop
  (lrt "A": also acc_v += x^2 @ (sigma^2)^T).  Epilogue: h (lrt "A": t = acc_h + sqrt(acc_v) * xi) is written by the
  first N-tile (kept for backward); y = acc + bias + scale * h @ B^T (lrt "B": + sqrt(h^2 @ (sigma^2)^T) * xi,
  one column half at a time), rounded once.
* ``_lora_rank_grad_kernel`` (grid M tiles, loop over N): dh = scale * g @ B; lrt "B" adds 2 h (u @ sigma^2) and
  writes u = scale g xi / (2 std) (std recomputed from h); lrt "A" writes u_t = dh xi_t / (2 std_t).
* ``_lora_dx_kernel`` (grid M x K tiles, loop over N): dx = g @ W, plus dh @ A in the epilogue (lrt "A": plus
  2 x (u_t @ sigma^2)).
* factor gradients: G_A = dh^T @ x and G_B = scale * g^T @ h are skinny GEMMs run by torch (cuBLAS on a GPU splits
  their long M reduction across the machine), then an elementwise epilogue adds the KL gradient: sample.py's
  ``reparam_weight_grads`` (regenerating eps) or ``_lrt_factor_grad_kernel`` (linear.py's lrt epilogue).

Memory: autograd keeps x, W, A, B, rho, the seed and h (M x r, float32; lrt "A" also std_t): nothing weight- or
output-sized.  Backward allocates dh (M x r) and, for lrt "B" only, u (M x N, float32) for the G_var GEMM.

The conv LoRA runs the reference composition (bnn_kernels.reference) on torch's convolutions (cuDNN, in x's dtype)
with this backend's Philox kernel: the base conv is cuDNN's, the low-rank path adds a conv with r output channels
and a 1x1 conv.  So does the linear LoRA (on cuBLAS) at padded ranks above FUSED_MAX_RANK and for float32 x, where
the fused kernels' tiles no longer fit the registers nor the 99 KiB of shared memory of a consumer GPU
(``lora_variant``, BNN_TRITON_LORA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (FP_FUSION, INTERPRET, dot_precision, dots_use_tensor_cores, gemm_configs, interpreter_meta,
                     lrt_var_dtype, mma, prior_constants, squared, to_dtype, tuned, var_in_float32, variant_setting)
from .composition import lrt_u
from .linear import _column_halves, _grouped_tile, _lrt_dw_epilogue, _to_var_dtype
from .philox import philox_normal
from .sample import _weight_grad, reparam_weight_grads, sample_weight, sigma_squared

GROUP = tl.constexpr(8)
MIN_DOT_RANK = 16  # tl.dot needs every dimension >= 16 on NVIDIA GPUs
FUSED_MAX_RANK = 64  # the largest padded rank of the fused kernels (``lora_variant``)
LORA_ENV = "BNN_TRITON_LORA"
LORA_VARIANTS = ("fused", "composition")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the forward holds the (BM, BN) base accumulator and a
# (BM, R) rank accumulator; dx tiles M x K and loops over N.
_FWD_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
]
_FWD_CONFIGS = gemm_configs(_FWD_TILES)
# A 4-byte frozen weight under 16-bit x (a float32 base, as the API allows) doubles the weight tile: the first tile
# then needs 100-104 KiB, over the 99 KiB an RTX 30xx/40xx/50xx block has (benchmarks/NOTES.md, "Shared memory on
# consumer GPUs").  The same tiles, led by one that fits there, so that BNN_TRITON_AUTOTUNE=0 runs on those GPUs too.
_FWD_WIDE_BASE_CONFIGS = gemm_configs([_FWD_TILES[1], _FWD_TILES[0], *_FWD_TILES[2:]])
_DX_CONFIGS = gemm_configs([
    (128, 64, 128, 8, 3), (128, 32, 128, 4, 4), (64, 64, 128, 4, 3),
    (128, 64, 64, 4, 4), (64, 32, 64, 4, 3),
])
# the rank-gradient kernel tiles M only (a skinny GEMM): small BLOCK_M keeps the machine busy
_RANK_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3))]
_FLAGS = ("BAYES_A", "LRT")


def padded_rank(rank: int) -> int:
    return max(MIN_DOT_RANK, triton.next_power_of_2(rank))


def lora_variant(rank: int, x_dtype: torch.dtype, device=None) -> str:
    """``"fused"`` (the kernels below) or ``"composition"`` (the reference formulas on cuBLAS with this backend's
    noise): the variant a linear LoRA call runs, per BNN_TRITON_LORA (read at every call).

    ``auto`` (the default) fuses 16-bit x at padded ranks up to FUSED_MAX_RANK.  Above it the (BLOCK_M x R)
    accumulators and R-wide tiles spill registers and need more shared memory than a consumer GPU gives a block;
    float32 x doubles every tile's bytes, and the first configs (tuned for 16-bit operands) spill 12-58 KB on sm_90
    and do not fit the 99 KiB of an RTX 30xx/40xx at any rank (benchmarks/NOTES.md, "Shared memory on consumer
    GPUs"); and where tl.dot has no tensor cores (sm_75: T4, RTX 20xx) every GEMM is cuBLAS's.  ``fused`` fuses
    every dtype up to FUSED_MAX_RANK; ``composition`` never fuses.
    """
    choice = variant_setting(LORA_ENV, LORA_VARIANTS)
    if choice == "composition" or padded_rank(rank) > FUSED_MAX_RANK:
        return "composition"
    if choice == "fused":
        return "fused"
    return "fused" if x_dtype.itemsize == 2 and dots_use_tensor_cores(device) else "composition"


@triton.jit
def _zero_tile(ROWS: tl.constexpr, COLS: tl.constexpr):
    return tl.zeros((ROWS, COLS), dtype=tl.float32)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _lora_fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s2_ptr, seed_ptr, y_ptr, h_ptr, aux_ptr,
                     M, N, K, r, scale,
                     HAS_BIAS: tl.constexpr, BAYES_A: tl.constexpr, LRT: tl.constexpr, VAR_FP32: tl.constexpr,
                     DOT_PREC: tl.constexpr, R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a_ptr / b_ptr: the factors as the up / down maps read them (the sample for reparam); s2_ptr: sigma^2 (lrt)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < r
    rows_x = offs_m.to(tl.int64) * K
    rows_w = offs_n.to(tl.int64) * K
    rows_a = offs_r.to(tl.int64) * K
    acc = _zero_tile(BLOCK_M, BLOCK_N)
    acc_h = _zero_tile(BLOCK_M, R)
    acc_v = _zero_tile(BLOCK_M, R)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows_x[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + rows_w[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = mma(x, tl.trans(to_dtype(w, x.dtype)), acc, DOT_PREC)
        a_off = rows_a[:, None] + offs_k[None, :]
        a_mask = mask_r[:, None] & mask_k[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        acc_h = mma(x, tl.trans(to_dtype(a, x.dtype)), acc_h, DOT_PREC)
        if BAYES_A:
            if LRT:
                xf = x.to(tl.float32)
                s2 = tl.load(s2_ptr + a_off, mask=a_mask, other=0.0)
                acc_v = mma(_to_var_dtype(xf * xf, VAR_FP32), tl.trans(_to_var_dtype(s2, VAR_FP32)), acc_v,
                            DOT_PREC)

    # the rank-space activation: h = x A^T, or the lrt "A" sample t; kept for backward by the first N-tile
    seed = tl.load(seed_ptr)
    t_off = offs_m.to(tl.int64)[:, None] * r + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    h = acc_h
    if BAYES_A:
        if LRT:
            std_t = tl.sqrt(acc_v)
            h = acc_h + std_t * tl.randn(seed, t_off)
            if pid_n == 0:
                tl.store(aux_ptr + t_off, std_t, mask=t_mask)
    if pid_n == 0:
        tl.store(h_ptr + t_off, h, mask=t_mask)

    # the low-rank output h @ B^T (+ the lrt "B" output noise), added to the base in the epilogue.  With the lrt "B"
    # noise the epilogue runs one column half at a time: four (BLOCK_M x BLOCK_N) float32 tiles (base, low-rank,
    # variance, noise) spill on sm_90 at every tile size tried (benchmarks/NOTES.md, "sm_90 compile report").
    if LRT and not BAYES_A:
        HALF: tl.constexpr = BLOCK_N // 2
        left, right = _column_halves(acc, BLOCK_M, BLOCK_N)
        cols = pid_n * BLOCK_N + tl.arange(0, HALF)
        _lora_fwd_epilogue(left, h, offs_m, cols, offs_r, b_ptr, s2_ptr, bias_ptr, seed, y_ptr, M, N, r, scale,
                           HAS_BIAS, LRT, VAR_FP32, DOT_PREC)
        _lora_fwd_epilogue(right, h, offs_m, cols + HALF, offs_r, b_ptr, s2_ptr, bias_ptr, seed, y_ptr, M, N, r,
                           scale, HAS_BIAS, LRT, VAR_FP32, DOT_PREC)
    else:
        _lora_fwd_epilogue(acc, h, offs_m, offs_n, offs_r, b_ptr, s2_ptr, bias_ptr, seed, y_ptr, M, N, r, scale,
                           HAS_BIAS, False, VAR_FP32, DOT_PREC)


# the autotuned forward, by whether the frozen weight has 4-byte elements (its config order; see above)
_FWD_KEY = ("M", "N", "K", "R", *_FLAGS)
_lora_fwd_tuned = tuned(_FWD_CONFIGS, key=_FWD_KEY)(_lora_fwd_kernel)
_lora_fwd_wide_base_tuned = tuned(_FWD_WIDE_BASE_CONFIGS, key=_FWD_KEY)(_lora_fwd_kernel)
_TUNED_FWD = {False: _lora_fwd_tuned, True: _lora_fwd_wide_base_tuned}


@triton.jit
def _lora_fwd_epilogue(acc, h, offs_m, offs_n, offs_r, b_ptr, s2_ptr, bias_ptr, seed, y_ptr, M, N, r, scale,
                       HAS_BIAS: tl.constexpr, NOISE_ON_OUTPUT: tl.constexpr, VAR_FP32: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """y = acc + scale * (h @ B^T [+ sqrt(h^2 @ (sigma^2)^T) * xi]) + bias on the columns ``offs_n``, rounded once."""
    x_dtype = y_ptr.dtype.element_ty
    mask_n = offs_n < N
    b_off = offs_n.to(tl.int64)[:, None] * r + offs_r[None, :]
    b_mask = mask_n[:, None] & (offs_r < r)[None, :]
    b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)
    lora = mma(to_dtype(h, x_dtype), tl.trans(to_dtype(b, x_dtype)), tl.zeros(acc.shape, dtype=tl.float32),
               DOT_PREC)
    y_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if NOISE_ON_OUTPUT:
        s2 = tl.load(s2_ptr + b_off, mask=b_mask, other=0.0)
        var = mma(_to_var_dtype(h * h, VAR_FP32), tl.trans(_to_var_dtype(s2, VAR_FP32)),
                  tl.zeros(acc.shape, dtype=tl.float32), DOT_PREC)
        lora += tl.sqrt(var) * tl.randn(seed, y_off)
    acc += scale * lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += to_dtype(bias, x_dtype).to(tl.float32)[None, :]
    tl.store(y_ptr + y_off, to_dtype(acc, x_dtype), mask=(offs_m < M)[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------

@tuned(_RANK_CONFIGS, key=("M", "N", "R", *_FLAGS))
@triton.jit
def _lora_rank_grad_kernel(g_ptr, b_ptr, s2_ptr, seed_ptr, h_ptr, aux_ptr, dh_ptr, u_ptr, M, N, r, scale,
                           BAYES_A: tl.constexpr, LRT: tl.constexpr, VAR_FP32: tl.constexpr,
                           DOT_PREC: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # output tile (BLOCK_M x R) of dh = scale * g @ B (+ the lrt "B" variance term), reduction over N
    seed = tl.load(seed_ptr)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    mask_m = offs_m < M
    mask_r = offs_r < r
    t_off = offs_m.to(tl.int64)[:, None] * r + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    rows_g = offs_m.to(tl.int64) * N
    acc = _zero_tile(BLOCK_M, R)
    acc_var = _zero_tile(BLOCK_M, R)
    h = tl.load(h_ptr + t_off, mask=t_mask, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y_off = rows_g[:, None] + offs_n[None, :]
        y_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + y_off, mask=y_mask, other=0.0)
        b_off = offs_n.to(tl.int64)[:, None] * r + offs_r[None, :]
        b_mask = mask_n[:, None] & mask_r[None, :]
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)
        acc = mma(g, to_dtype(b, g.dtype), acc, DOT_PREC)
        if not BAYES_A:
            if LRT:
                s2 = tl.load(s2_ptr + b_off, mask=b_mask, other=0.0)
                var = mma(_to_var_dtype(h * h, VAR_FP32), tl.trans(_to_var_dtype(s2, VAR_FP32)),
                          _zero_tile(BLOCK_M, BLOCK_N), DOT_PREC)
                u = scale * lrt_u(g, tl.sqrt(var), seed, y_off)
                tl.store(u_ptr + y_off, u, mask=y_mask)
                acc_var = mma(_to_var_dtype(u, VAR_FP32), _to_var_dtype(s2, VAR_FP32), acc_var, DOT_PREC)
    dh = scale * acc
    if LRT:
        if BAYES_A:
            std_t = tl.load(aux_ptr + t_off, mask=t_mask, other=0.0)
            tl.store(u_ptr + t_off, lrt_u(dh, std_t, seed, t_off), mask=t_mask)
        else:
            dh += 2.0 * h * acc_var
    tl.store(dh_ptr + t_off, dh, mask=t_mask)


@tuned(_DX_CONFIGS, key=("M", "N", "K", "R", *_FLAGS))
@triton.jit
def _lora_dx_kernel(g_ptr, w_ptr, x_ptr, dh_ptr, u_ptr, a_ptr, s2_ptr, dx_ptr, M, N, K, r,
                    BAYES_A: tl.constexpr, LRT: tl.constexpr, VAR_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
                    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # output tile (BLOCK_M x BLOCK_K) of dx = g @ W + dh @ A (+ 2 x (u_t @ sigma^2) for lrt "A"), reduction over N
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < r
    rows_g = offs_m.to(tl.int64) * N
    acc = _zero_tile(BLOCK_M, BLOCK_K)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(g_ptr + rows_g[:, None] + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = mma(g, to_dtype(w, g.dtype), acc, DOT_PREC)
    t_off = offs_m.to(tl.int64)[:, None] * r + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    a_off = offs_r.to(tl.int64)[:, None] * K + offs_k[None, :]
    a_mask = mask_r[:, None] & mask_k[None, :]
    x_off = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_mask = mask_m[:, None] & mask_k[None, :]
    dx_dtype = dx_ptr.dtype.element_ty
    dh = tl.load(dh_ptr + t_off, mask=t_mask, other=0.0)
    a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
    acc = mma(to_dtype(dh, dx_dtype), to_dtype(a, dx_dtype), acc, DOT_PREC)
    if BAYES_A:
        if LRT:
            u = tl.load(u_ptr + t_off, mask=t_mask, other=0.0)
            s2 = tl.load(s2_ptr + a_off, mask=a_mask, other=0.0)
            acc_u = mma(_to_var_dtype(u, VAR_FP32), _to_var_dtype(s2, VAR_FP32), _zero_tile(BLOCK_M, BLOCK_K),
                        DOT_PREC)
            x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
            acc += 2.0 * x * acc_u
    tl.store(dx_ptr + x_off, to_dtype(acc, dx_dtype), mask=x_mask)


@triton.jit
def _lrt_factor_grad_kernel(grad_mean_ptr, grad_var_ptr, mean_ptr, rho_ptr, gk_ptr, dmean_ptr, drho_ptr, ROWS, COLS,
                            inv_ps2, SOFTPLUS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """lrt factor gradients from G_mean and G_var (float32, the factor's shape): linear.py's lrt epilogue, prior 0."""
    offs_n = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_k = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    off = offs_n.to(tl.int64)[:, None] * COLS + offs_k[None, :]
    mask = (offs_n < ROWS)[:, None] & (offs_k < COLS)[None, :]
    grad_mean = tl.load(grad_mean_ptr + off, mask=mask, other=0.0)
    grad_var = tl.load(grad_var_ptr + off, mask=mask, other=0.0)
    gk = tl.load(gk_ptr).to(tl.float32)
    _lrt_dw_epilogue(grad_mean, grad_var, offs_n, offs_k, mean_ptr, rho_ptr, mean_ptr, gk, dmean_ptr, drho_ptr, ROWS,
                     COLS, inv_ps2, False, SOFTPLUS)


# ----------------------------------------------------------------------------------------------------------------
# launchers (the backend contract of bnn_kernels.registry)
# ----------------------------------------------------------------------------------------------------------------

def _grid(rows: int, cols: int, row_block: str, col_block: str):
    return lambda meta: (triton.cdiv(rows, meta[row_block]) * triton.cdiv(cols, meta[col_block]),)


def _flags(bayes, estimator, x_dtype):
    return dict(BAYES_A=bayes == "A", LRT=estimator == "lrt", VAR_FP32=var_in_float32(x_dtype),
                DOT_PREC=dot_precision())


def _factor_operands(x, lora_a, lora_b, rho, seed, bayes, prior_sigma, sigma_param, estimator, with_kl):
    """(A operand, B operand, sigma^2 or None, kl or None), each already in the dtype its tl.dot reads: one small
    elementwise pass over the Bayesian factor (sample.py), KL fused.  reparam: the factor sample in x's dtype
    replaces the factor; lrt: sigma^2 in the variance dtype (float32 for float32 x, else bfloat16).  The other
    factors are cast to x's dtype here, as the kernels would cast every tile they load: the same values, but each
    rank-sized tile a kernel stages in shared memory takes half the bytes (a float32 A or B tile was what made the
    large-rank configs overflow the 99 KiB of an RTX 30xx/40xx).  Transient: r x K and N x r elements, dropped after
    the call (backward draws the sample again from the seed)."""
    factor = lora_a if bayes == "A" else lora_b
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if estimator == "reparam":
        sample, kl = sample_weight(factor, rho, seed, x.dtype, sigma_param, None, prior_sigma, with_kl)
        return (sample, lora_b, None, kl) if bayes == "A" else (lora_a, sample, None, kl)
    s2, kl = sigma_squared(factor, rho, lrt_var_dtype(x.dtype), sigma_param, None, prior_sigma, with_kl)
    return lora_a, lora_b, s2, kl


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma, sigma_param, estimator):
    """(y, kl, h, aux): y (M, N) in x's dtype, kl float32 (), h (M, r) float32, aux (M, r) for lrt "A" else empty."""
    # the kernels step through rows by the row length
    x, weight, lora_a, lora_b, rho = (t.contiguous() for t in (x, weight, lora_a, lora_b, rho))
    bias = None if bias is None else bias.contiguous()
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    if min(M, N, K) == 0:  # nothing to launch; the reference handles empty GEMMs
        return reference.lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma,
                                         sigma_param, estimator)
    if lora_variant(r, x.dtype, x.device) == "composition":
        y, kl, h, aux = reference.lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes,
                                                  prior_sigma, sigma_param, estimator, **_composition(x))
        return y, kl.float(), h.float(), aux.float()
    a_op, b_op, s2, kl = _factor_operands(x, lora_a, lora_b, rho, seed, bayes, prior_sigma, sigma_param, estimator,
                                          with_kl=True)
    flags = _flags(bayes, estimator, x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, r), dtype=torch.float32, device=x.device)
    aux = torch.empty((M, r) if flags["BAYES_A"] and flags["LRT"] else (0,), dtype=torch.float32, device=x.device)
    _TUNED_FWD[weight.element_size() == 4][_grid(M, N, "BLOCK_M", "BLOCK_N")](
        x, weight, weight if bias is None else bias, a_op, b_op, a_op if s2 is None else s2, seed, y, h,
        h if aux.numel() == 0 else aux, M, N, K, r, float(scale), HAS_BIAS=bias is not None, R=padded_rank(r),
        **flags, **interpreter_meta(), **FP_FUSION)
    return y, kl, h, aux


def _lrt_factor_grads(grad_mean, grad_var, grad_kl, mean, rho, prior_sigma, sigma_param):
    dmean, drho = torch.empty_like(mean), torch.empty_like(rho)
    rows, cols = mean.shape
    _, inv_ps2 = prior_constants(prior_sigma)
    block = 32
    _lrt_factor_grad_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](
        grad_mean.contiguous(), grad_var.contiguous(), mean, rho, grad_kl, dmean, drho, rows, cols, inv_ps2,
        SOFTPLUS=sigma_param == "softplus", BLOCK_ROWS=block, BLOCK_COLS=block, num_warps=4, **FP_FUSION)
    return dmean, drho


def lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes, prior_sigma,
                    sigma_param, estimator, need_dx):
    """(dx or None, dA, dB, drho); the Bayesian factor's gradients include grad_kl times the KL gradient."""
    x, weight, lora_a, lora_b, rho, h, aux = (t.contiguous() for t in (x, weight, lora_a, lora_b, rho, h, aux))
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    if min(M, N, K) == 0:
        return reference.lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes,
                                         prior_sigma, sigma_param, estimator, need_dx)
    if lora_variant(r, x.dtype, x.device) == "composition":
        return reference.lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes,
                                         prior_sigma, sigma_param, estimator, need_dx, **_composition(x))
    g = grad_y.contiguous()
    grad_kl = grad_kl.to(device=x.device, dtype=torch.float32).contiguous()
    a_op, b_op, s2, _ = _factor_operands(x, lora_a, lora_b, rho, seed, bayes, prior_sigma, sigma_param, estimator,
                                         with_kl=False)
    s2_arg = a_op if s2 is None else s2
    flags = _flags(bayes, estimator, x.dtype)
    bayes_a, lrt = flags["BAYES_A"], flags["LRT"]
    rank_pad = padded_rank(r)
    meta = interpreter_meta()
    dh = torch.empty((M, r), dtype=torch.float32, device=x.device)
    u_shape = ((M, r) if bayes_a else (M, N)) if lrt else (0,)
    u = torch.empty(u_shape, dtype=torch.float32, device=x.device)
    u_arg = dh if u.numel() == 0 else u
    rank_meta = {key: meta[key] for key in ("BLOCK_M", "BLOCK_N")} if INTERPRET else {}
    _lora_rank_grad_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]),)](
        g, b_op, s2_arg, seed, h, h if aux.numel() == 0 else aux, dh, u_arg, M, N, r, float(scale), R=rank_pad,
        **flags, **rank_meta, **FP_FUSION)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        _lora_dx_kernel[_grid(M, K, "BLOCK_M", "BLOCK_K")](g, weight, x, dh, u_arg, a_op, s2_arg, dx, M, N, K, r,
                                                           R=rank_pad, **flags, **meta, **FP_FUSION)
    del a_op, b_op, s2, s2_arg  # the transient factor operands
    # factor gradients: skinny GEMMs with float32 output, operands in x's dtype, then the KL epilogue
    grad_a = _weight_grad(dh.to(x.dtype), x)            # dh^T @ x, (r, K)
    grad_b = _weight_grad(g, h.to(x.dtype)).mul_(scale)  # scale * g^T @ h, (N, r)
    factor = lora_a if bayes_a else lora_b
    grad_factor, grad_other = (grad_a, grad_b) if bayes_a else (grad_b, grad_a)
    if not lrt:
        dmean, drho = reparam_weight_grads(grad_factor.contiguous(), grad_kl, factor, rho, None, seed, prior_sigma,
                                           sigma_param)
    else:
        if bayes_a:  # u_t^T @ x^2
            var_dtype = lrt_var_dtype(x.dtype)
            grad_var = _weight_grad(u.to(var_dtype), squared(x, var_dtype))
        else:        # u^T @ h^2
            grad_var = torch.mm(u.t(), h * h)
        dmean, drho = _lrt_factor_grads(grad_factor, grad_var, grad_kl, factor, rho, prior_sigma, sigma_param)
    grad_other = grad_other.to(lora_b.dtype)
    return (dx, dmean, grad_other, drho) if bayes_a else (dx, grad_other, dmean, drho)


# --- the reference composition on torch's GEMMs and convolutions, with this backend's noise ----------------------
# (the conv LoRA, and the linear where ``lora_variant`` says "composition")

def _noise(seed, shape, device):
    return philox_normal(seed, torch.Size(shape).numel(), 0, device).view(shape)


def _composition(x):
    """Maps in x's dtype on a GPU (cuBLAS / cuDNN, float32 accumulation); float32 on CPU tensors (the interpreter)."""
    return dict(compute=x.dtype if x.is_cuda else None, noise=_noise)


def lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation, scale, bayes, prior_sigma,
                    sigma_param, estimator):
    y, kl, h, aux = reference.lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation,
                                              scale, bayes, prior_sigma, sigma_param, estimator,
                                              **_composition(x))
    return y, kl.float(), h.float(), aux.float()


def lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, stride, padding, dilation, scale,
                    bayes, prior_sigma, sigma_param, estimator, need_dx):
    return reference.lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, stride, padding,
                                     dilation, scale, bayes, prior_sigma, sigma_param, estimator, need_dx,
                                     **_composition(x))
