"""Backend registry: which implementations exist here, which one an op runs on, and the contract they share.

A backend is a module exposing ``NAME``, ``is_available()`` and these functions.  Conventions (checked and
normalised by ``bnn_kernels.ops`` before any backend runs, so backends never validate):

* ``x`` is 2-D ``(M, K)`` and contiguous, float32/float16/bfloat16; ``mu`` and ``rho`` are ``(N, K)``, one
  floating dtype, any strides (a backend reads them contiguously, block by block or through its own temporary: a copy
  made by ops would be kept for backward); ``bias`` is ``(N,)`` or None; ``prior_mu`` is ``(N, K)`` (any float dtype,
  any strides) or None;
  ``seed`` is a 0-dim int64 tensor on the inputs' device; ``prior_sigma`` a float; ``sigma_param`` and
  ``estimator`` valid names.  float64 reaches only the cpu and reference backends (for gradcheck); the KL is
  float32, or float64 for float64 parameters.
* The weight noise is ``philox_normal(seed, mu.numel())`` viewed as ``mu.shape`` (reparam); the output noise
  is ``philox_normal(seed, M * N)`` viewed as ``(M, N)`` (lrt).  The weight sample / sigma^2 are formed in
  float32 and cast to x's dtype for the GEMM (to bfloat16 for the lrt variance GEMM when x is float16);
  accumulation is float32.

``philox_normal(seed, numel, offset, device) -> float32 (numel,)``
``gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma, sigma_param) -> float32 ()``
``gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param) -> (dmu, drho)`` in mu's dtype
``linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator) -> (y, kl, std)``:
    y ``(M, N)`` in x's dtype (bias added), kl float32 (), std ``(M, N)`` for lrt (the output standard deviation,
    kept for backward; float32, float64 for float64 x: ``sigma.compute_dtype``) or an empty tensor for reparam.
``linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param, estimator, need_dx)
    -> (dx or None, dmu, drho)``: grad_y contiguous ``(M, N)`` in x's dtype, grad_kl float32 ();
    dmu/drho include the KL gradient scaled by grad_kl.  The bias gradient is grad_y.sum(0), taken by ops.

Backward formulas (s = sigma_from_rho, s' its derivative: sigmoid(rho) for softplus, [rho >= 1e-7] for direct;
g = grad_y, gk = grad_kl, pm = prior_mu or 0, ps = prior_sigma):
    KL gradients:  dKL/dmu = (mu - pm) / ps^2 ;  dKL/dsigma = -1/sigma + sigma / ps^2
    reparam:  eps = noise, W = mu + sigma * eps;  dx = g @ W;  G = g^T @ x
              dmu = G + gk * dKL/dmu ;  drho = (G * eps + gk * dKL/dsigma) * s'(rho)
    lrt:      xi = noise (M, N);  u = g * xi / (2 * std)  (0 where std == 0)
              dx = g @ mu + 2 * x * (u @ sigma^2) ;  dmu = g^T @ x + gk * dKL/dmu
              drho = (2 * sigma * (u^T @ x^2) + gk * dKL/dsigma) * s'(rho)

Bayesian conv2d (``bnn_kernels.ops.bayes_conv2d``): ``x`` is contiguous NCHW ``(B, C_in, H, W)``; ``mu``, ``rho``,
``prior_mu`` are ``(C_out, C_in / groups, kh, kw)`` in any memory format (the backends read them contiguously: a
channels_last copy made by ops would be kept for backward); ``stride``, ``padding``, ``dilation`` are 2-element int
lists (explicit symmetric padding) and ``groups`` an int, all checked by ops.  The weight noise is
``philox_normal(seed, mu.numel())`` viewed as ``mu.shape`` (flat index (co, ci, kh, kw)); the lrt output noise is
``philox_normal(seed, y.numel())`` viewed as the contiguous NCHW y.  Dtypes and precision as for linear; dmu and drho
are returned contiguous.

``conv_fwd(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups, prior_sigma, sigma_param, estimator)
    -> (y, kl, std)``: y contiguous NCHW in x's dtype (bias added), kl as for linear, std output-sized (lrt; dtype as
    for linear) or empty.
``conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups, prior_sigma,
    sigma_param, estimator, need_dx) -> (dx or None, dmu, drho)``: grad_y contiguous NCHW in x's dtype; the bias
    gradient is grad_y.sum((0, 2, 3)), taken by ops.
Its backward is the linear one with ``a @ B^T`` read as conv2d(a, B), and ``g @ W`` / ``g^T @ x`` as the input /
weight vector-Jacobian products of that conv (aten.convolution_backward): reparam dx = vjp_input(g, W),
G = vjp_weight(g, x); lrt dx = vjp_input(g, mu) + 2 x vjp_input(u, sigma^2), dmu = vjp_weight(g, x) + gk dKL/dmu,
drho = (2 sigma vjp_weight(u, x^2) + gk dKL/dsigma) s'(rho).

Bayesian LoRA (``bnn_kernels.ops.bayes_lora_linear`` / ``bayes_lora_conv2d``): y = base(x; W) + bias +
scale * up(down(x; A); B).  Linear: base(x; W) = x @ W^T, down(x; A) = x @ A^T, up(h; B) = h @ B^T with x (M, K),
W (N, K), A = ``lora_a`` (r, K), B = ``lora_b`` (N, r).  Conv: base / down are conv2d with the op's stride, padding,
dilation (groups 1) and W (N, C, kh, kw), A (r, C, kh, kw); up is the 1x1 conv with B (N, r, 1, 1); x, y NCHW.  The
base ``weight`` / ``bias`` are frozen (no gradient) and may have any floating dtype (``weight`` any strides, as
``mu``); ``lora_a``, ``lora_b``, ``rho``
share one; ``rho`` has the shape of the Bayesian factor F (A for ``bayes`` "A", B for "B"), whose prior is
N(0, prior_sigma^2).  Precision: every map runs on operands rounded to x's dtype with float32 accumulation (the
weight is converted tile by tile or block by block, never as a whole); the factor sample / sigma^2 is formed in
float32; h is kept in float32 (float64 when x or the factors are float64: the "rank dtype") and rounded to x's
dtype as the up map's operand; y is formed in float32 and rounded once.  The lrt variance maps may take bfloat16
operands for 16-bit x (as linear's).  (The triton conv runs the maps on cuDNN in x's dtype: their outputs, h
included, are rounded to x's dtype before the float32 elementwise work.)
Noise, by estimator and factor (flat row-major / NCHW indices):
    reparam:  eps = philox_normal(seed, F.numel()) viewed as F.shape; F_s = F + sigma * eps (the other factor as is)
              h = down(x; A_s);  y_lora = up(h; B_s)
    lrt "B":  h = down(x; A);  std = sqrt(up(h^2; sigma^2));  y_lora = up(h; B) + std * xi,  xi over y's shape
    lrt "A":  std_t = sqrt(down(x^2; sigma^2));  h = t = down(x; A) + std_t * xi,  xi over t's shape (M, r) /
              (batch, r, H_out, W_out);  y_lora = up(t; B)

``lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma, sigma_param, estimator)
    -> (y, kl, h, aux)``: y in x's dtype; kl = KL(F) in the KL dtype of the factors; h the rank-space activation
    above in the rank dtype ((M, r), kept for backward); aux = std_t for lrt "A" (h's shape), else empty.
``lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes, prior_sigma,
    sigma_param, estimator, need_dx) -> (dx or None, dA, dB, drho)``: dA, dB, drho in the factors' dtype, the KL
    gradient included in the Bayesian factor's.
``lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation, scale, bayes, prior_sigma,
    sigma_param, estimator)`` / ``lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux,
    stride, padding, dilation, scale, bayes, prior_sigma, sigma_param, estimator, need_dx)``: the same for the conv.
Backward, with gl = scale * g and vjp_in / vjp_w the input / weight vector-Jacobian products of a map (for the
linear maps: vjp_in(d, A) = d @ A, vjp_w(d, x) = d^T @ x):
    reparam:  dh = vjp_in_up(gl, B_s);  G_B = vjp_w_up(gl, h);  G_A = vjp_w_down(dh, x)
              dx = vjp_in_base(g, W) + vjp_in_down(dh, A_s);  the other factor's gradient is its G
              dF = G_F + gk * dKL/dmu ;  drho = (G_F * eps + gk * dKL/dsigma) * s'(rho)
    lrt "B":  u = gl * xi / (2 std) (0 where std == 0);  dh = vjp_in_up(gl, B) + 2 h * vjp_in_up(u, sigma^2)
              dA = vjp_w_down(dh, x);  dx = vjp_in_base(g, W) + vjp_in_down(dh, A)
              dB = vjp_w_up(gl, h) + gk * dKL/dmu ;  drho = (2 sigma vjp_w_up(u, h^2) + gk * dKL/dsigma) * s'(rho)
    lrt "A":  dt = vjp_in_up(gl, B);  u = dt * xi / (2 std_t) (0 where std_t == 0);  dB = vjp_w_up(gl, t)
              dx = vjp_in_base(g, W) + vjp_in_down(dt, A) + 2 x * vjp_in_down(u, sigma^2)
              dA = vjp_w_down(dt, x) + gk * dKL/dmu ;  drho = (2 sigma vjp_w_down(u, x^2) + gk * dKL/dsigma) * s'(rho)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType

import torch

ALL_BACKENDS = ("cuda", "triton", "cpu", "reference")
_MODULES = {
    "cuda": "bnn_kernels.cuda_backend",
    "triton": "bnn_kernels.triton",
    "cpu": "bnn_kernels.cpu_backend",
    "reference": "bnn_kernels.reference",
}
_forced_name = None  # a plain global: torch.compile guards on it cheaply (see select)


@functools.lru_cache(maxsize=None)
def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def get(name: str) -> ModuleType:
    """The module of backend ``name``; ValueError if unknown or unusable here."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {ALL_BACKENDS}, got {name!r}")
    module = _load(name)
    if module is None or not module.is_available():
        raise ValueError(f"backend {name!r} is not usable here; usable backends: {backends()}")
    return module


def backends() -> list[str]:
    """Names of the backends usable on this machine, fastest first."""
    usable = []
    for name in ALL_BACKENDS:
        module = _load(name)
        if module is not None and module.is_available():
            usable.append(name)
    return usable


@contextlib.contextmanager
def use_backend(name: str):
    """Force every op inside the block onto backend ``name`` (ValueError if unusable here)."""
    global _forced_name
    get(name)
    previous = _forced_name
    _forced_name = name
    try:
        yield
    finally:
        _forced_name = previous


def forced_backend():
    return _forced_name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` takes tensors on ``device``."""
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if device.type == "cpu" and not triton_interpreted():  # under aot.capture they compile for a GPU instead
        module = _load("triton")
        return module is not None and module.capturing()
    return device.type in ("cuda", "cpu")


def select(device: torch.device) -> str:
    """The backend an op on ``device`` runs on: the forced one, else the fastest usable for that device.

    torch.compile reads the forced name here, in traced code, so the graph guards on it (a later ``use_backend``
    recompiles), and evaluates the choice once while tracing and bakes it into the graph.
    """
    return _select(device, _forced_name)


@torch.compiler.assume_constant_result
def _select(device: torch.device, forced) -> str:
    if forced is not None:
        if not runs_on(forced, device):
            hint = " (set TRITON_INTERPRET=1 before importing triton)" if forced == "triton" else ""
            raise ValueError(f"backend {forced!r} cannot run on {device.type} tensors{hint}")
        return forced
    preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    usable = backends()
    for name in preference:
        if name in usable:
            return name
    return "reference"
