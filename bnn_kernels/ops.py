"""Public functional API: argument checks, backend dispatch, and the torch.library custom ops with their autograd.

Every public function validates its arguments (raising ValueError/TypeError that name the argument) before any
kernel launches, flattens leading dims, picks a backend (``bnn_kernels.registry.select``) and calls a custom op
``torch.ops.bnn.*``.  The custom ops carry fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them, and take the seed as a 0-dim int64 tensor, so a new seed each step does not recompile.  The ops
are not autocast ops: they compute in the dtypes they are given, inside ``torch.autocast`` as outside (cast x to
the autocast dtype first to run as nn.Linear would; the Bayesian layers of bnn_diffusion do).

Memory contract: the autograd graph keeps only the op's inputs (already alive), the seed and, for the lrt
estimator, the output standard deviation (output-sized).  Backward regenerates the noise from the seed.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import registry
from .checks import check_choice, check_prior_sigma
from .sigma import ESTIMATORS, SIGMA_PARAMS, compute_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT64_BACKENDS = ("cpu", "reference")  # float64 exists for gradcheck; the GPU kernels do not take it
SeedLike = Union[int, torch.Tensor]
_debug_checks = False


def set_debug_checks(enabled: bool) -> None:
    """Turn on checks that need a device sync (non-finite values in x, mu, rho); off by default."""
    global _debug_checks
    _debug_checks = bool(enabled)


# --------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------

def _seed_tensor(seed: SeedLike, device: torch.device) -> torch.Tensor:
    """The seed as a 0-dim int64 tensor on ``device``."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int or a 0-dim int64 tensor, got a tensor of shape "
                            f"{tuple(seed.shape)} and dtype {seed.dtype}")
        return seed.to(device)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a 0-dim int64 tensor, got {type(seed).__name__}")
    seed = int(seed)
    if not -2**63 <= seed < 2**63:  # an int64, as a tensor seed: its two's complement bits are the Philox key
        raise ValueError(f"seed must be in [-2**63, 2**63) (an int64), got {seed}")
    # a fill kernel on the device: torch.tensor(seed, device=gpu) would copy from pageable host memory, which
    # waits for the GPU's queued work first
    return torch.full((), seed, dtype=torch.int64, device=device)


def _check_float(name: str, tensor, allowed=SUPPORTED_DTYPES) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in allowed:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {tensor.dtype}")


def _check_same_device(device: torch.device, anchor: str = "mu", **tensors) -> None:
    """ValueError unless every tensor is on ``device``, the device of the tensor named ``anchor``."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {anchor} is on {device}: all tensors must share a "
                             f"device")


def _check_posterior(mu, rho, prior_mu, prior_sigma, sigma_param) -> float:
    """Checks shared by every op: mu/rho/prior_mu shapes, dtypes, devices; returns prior_sigma as float."""
    _check_float("mu", mu)
    _check_float("rho", rho)
    if rho.shape != mu.shape:
        raise ValueError(f"rho must have mu's shape {tuple(mu.shape)}, got {tuple(rho.shape)}")
    if rho.dtype != mu.dtype:
        raise ValueError(f"rho must have mu's dtype {mu.dtype}, got {rho.dtype}")
    if prior_mu is not None:
        _check_float("prior_mu", prior_mu)
        if prior_mu.shape != mu.shape:
            raise ValueError(f"prior_mu must have mu's shape {tuple(mu.shape)}, got {tuple(prior_mu.shape)}")
    _check_same_device(mu.device, rho=rho, prior_mu=prior_mu)
    check_choice("sigma_param", sigma_param, SIGMA_PARAMS)
    return check_prior_sigma(prior_sigma)


def _check_finite(**tensors) -> None:
    if not _debug_checks:
        return
    for name, tensor in tensors.items():
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or inf")


def _check_backend_dtypes(backend: str, **tensors) -> None:
    if backend in FLOAT64_BACKENDS:
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype == torch.float64:
            raise ValueError(f"{name} is float64, which only the {FLOAT64_BACKENDS} backends take; "
                             f"backend {backend!r} takes float32, float16 and bfloat16")


def _layer_backend(device: torch.device, empty: bool, **tensors) -> str:
    """The backend a layer op runs on: the selected one, or the reference backend for an empty batch (which still
    yields the KL; it handles zero-sized GEMMs).  The dtypes are checked against the selected backend either way,
    so a batch size does not change what is accepted."""
    backend = registry.select(device)
    _check_backend_dtypes(backend, **tensors)
    return "reference" if empty else backend


def _check_bias(bias, out_features: int) -> None:
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def _input_grad(ctx, dx: torch.Tensor) -> Optional[torch.Tensor]:
    """x's gradient from a backward op: None unless autograd asked for it (then dx has x's shape, even empty)."""
    return dx if ctx.needs_input_grad[0] else None


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _autocast_off(implementation):
    """A custom op's implementation, run with autocast off on its tensors' device: every backend computes in the
    dtypes ops hands it, whether or not the caller is inside ``torch.autocast`` and in eager and compiled code
    alike (a compiled graph calls the op outside the caller's autocast block)."""
    @functools.wraps(implementation)
    def run_without_autocast(*args):
        device_type = next(arg.device.type for arg in args if isinstance(arg, torch.Tensor))
        with torch.autocast(device_type, enabled=False):
            return implementation(*args)
    return run_without_autocast


# --------------------------------------------------------------------------------------------------------------
# custom-op pieces shared by the layer ops
# --------------------------------------------------------------------------------------------------------------

def _fake_dx(x: torch.Tensor, need_dx: bool) -> torch.Tensor:
    """The fake input gradient of a backward op: x's shape, or empty when not needed."""
    return torch.empty_like(x) if need_dx else x.new_empty(0)


def _backward_outputs(x: torch.Tensor, dx: Optional[torch.Tensor], *grads: torch.Tensor) -> tuple:
    """A backward op's outputs: dx (empty when the backend computed none) and the other gradients, contiguous."""
    dx = x.new_empty(0) if dx is None else dx.contiguous()
    return (dx, *(grad.contiguous() for grad in grads))


def _posterior_setup(ctx, inputs, output, config) -> None:
    """Autograd context of bayes_linear / bayes_conv2d, whose inputs start (x, mu, rho, bias, prior_mu, seed):
    the inputs, the seed and the lrt output std (output[2], not differentiable)."""
    x, mu, rho, bias, prior_mu, seed = inputs[:6]
    ctx.save_for_backward(x, mu, rho, prior_mu, seed, output[2])
    ctx.config = config
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[2])


def _posterior_backward(ctx, backward_op, grad_y, grad_kl, bias_dims) -> tuple:
    """Gradients of bayes_linear / bayes_conv2d's inputs: backward_op gives dx, dmu, drho; the bias gradient is
    grad_y summed over ``bias_dims`` (in float32)."""
    x, mu, rho, prior_mu, seed, std = ctx.saved_tensors
    grad_y = grad_y.to(x.dtype).contiguous()
    dx, dmu, drho = backward_op(grad_y, grad_kl.to(compute_dtype(mu.dtype)).contiguous(), x, mu, rho, prior_mu, seed,
                                std, *ctx.config, ctx.needs_input_grad[0])
    dbias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        dbias = grad_y.sum(bias_dims, dtype=torch.float32).to(ctx.bias_dtype)
    return (_input_grad(ctx, dx), dmu, drho, dbias) + (None,) * (len(ctx.needs_input_grad) - 4)


# --------------------------------------------------------------------------------------------------------------
# philox_normal
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("bnn::philox_normal", mutates_args=())
@_autocast_off
def _philox_normal_op(seed: torch.Tensor, numel: int, offset: int, backend: str) -> torch.Tensor:
    return registry.get(backend).philox_normal(seed, numel, offset, seed.device)


@_philox_normal_op.register_fake
def _(seed, numel, offset, backend):
    return seed.new_empty((numel,), dtype=torch.float32)


def philox_normal(seed: SeedLike, shape: Sequence[int], *, offset: int = 0, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal numbers ``offset .. offset + numel - 1`` of Philox stream ``seed``, shaped ``shape``.

    Element with row-major flat index i gets ``tl.randn(seed, offset + i)``: the same numbers on every backend.
    """
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    shape = tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in shape):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    numel = math.prod(shape)
    if offset + numel > 2**63:
        raise ValueError(f"offset + numel must stay below 2**63, got {offset} + {numel}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    seed_t = _seed_tensor(seed, device)
    out = _philox_normal_op(seed_t, numel, int(offset), registry.select(device))
    return out.view(shape).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# gaussian_kl
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("bnn::gaussian_kl", mutates_args=())
@_autocast_off
def _gaussian_kl_op(mu: torch.Tensor, rho: torch.Tensor, prior_mu: Optional[torch.Tensor], prior_sigma: float,
                    sigma_param: str, backend: str) -> torch.Tensor:
    return registry.get(backend).gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma, sigma_param)


@_gaussian_kl_op.register_fake
def _(mu, rho, prior_mu, prior_sigma, sigma_param, backend):
    return mu.new_empty((), dtype=compute_dtype(mu.dtype))


@torch.library.custom_op("bnn::gaussian_kl_backward", mutates_args=())
@_autocast_off
def _gaussian_kl_backward_op(grad_kl: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor,
                             prior_mu: Optional[torch.Tensor], prior_sigma: float, sigma_param: str,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dmu, drho = registry.get(backend).gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param)
    return dmu.contiguous(), drho.contiguous()


@_gaussian_kl_backward_op.register_fake
def _(grad_kl, mu, rho, prior_mu, prior_sigma, sigma_param, backend):
    return torch.empty_like(mu), torch.empty_like(rho)


def _gaussian_kl_setup(ctx, inputs, output):
    mu, rho, prior_mu, prior_sigma, sigma_param, backend = inputs
    ctx.save_for_backward(mu, rho, prior_mu)
    ctx.config = (prior_sigma, sigma_param, backend)


def _gaussian_kl_backward(ctx, grad_kl):
    mu, rho, prior_mu = ctx.saved_tensors
    prior_sigma, sigma_param, backend = ctx.config
    dmu, drho = _gaussian_kl_backward_op(grad_kl.to(compute_dtype(mu.dtype)).contiguous(), mu, rho, prior_mu,
                                         prior_sigma, sigma_param, backend)
    return dmu, drho, None, None, None, None


_gaussian_kl_op.register_autograd(_gaussian_kl_backward, setup_context=_gaussian_kl_setup)


def gaussian_kl(mu: torch.Tensor, rho: torch.Tensor, prior_mu: Optional[torch.Tensor] = None,
                prior_sigma: float = 1.0, *, sigma_param: str = "softplus") -> torch.Tensor:
    """KL(N(mu, s(rho)^2) || N(prior_mu, prior_sigma^2)) summed over elements, as a float32 0-dim tensor
    (float64 for float64 parameters)."""
    prior_sigma = _check_posterior(mu, rho, prior_mu, prior_sigma, sigma_param)
    _check_finite(mu=mu, rho=rho)
    backend = registry.select(mu.device)
    _check_backend_dtypes(backend, mu=mu, prior_mu=prior_mu)
    # The KL is a sum over elements, so any order serves that pairs mu, rho and prior_mu element by element: in
    # mu's memory order, three tensors laid out alike (contiguous, channels_last, transposed) flatten to views,
    # and the backends read them without a copy.  Otherwise they go in as they are, and the backends copy them
    # for the call only; a copy made here would be what autograd keeps, weight-sized.
    order = _memory_order(mu)
    tensors = (mu, rho, prior_mu)
    if all(t is None or t.permute(order).is_contiguous() for t in tensors):
        tensors = tuple(None if t is None else t.permute(order).reshape(-1) for t in tensors)
    return _gaussian_kl_op(*tensors, prior_sigma, sigma_param, backend)


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """tensor's dims from the largest stride to the smallest: permuted so, a dense tensor is contiguous."""
    return sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim))


# --------------------------------------------------------------------------------------------------------------
# bayes_linear
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("bnn::bayes_linear", mutates_args=())
@_autocast_off
def _bayes_linear_op(x: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor, bias: Optional[torch.Tensor],
                     prior_mu: Optional[torch.Tensor], seed: torch.Tensor, prior_sigma: float, sigma_param: str,
                     estimator: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, kl, std = registry.get(backend).linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param,
                                                   estimator)
    return y, kl, std


@_bayes_linear_op.register_fake
def _(x, mu, rho, bias, prior_mu, seed, prior_sigma, sigma_param, estimator, backend):
    y = x.new_empty((x.shape[0], mu.shape[0]))
    keeps_std = estimator == "lrt" and backend != "reference"  # else the backends return x.new_empty(0)
    std = (x.new_empty((x.shape[0], mu.shape[0]), dtype=compute_dtype(x.dtype)) if keeps_std else x.new_empty(0))
    return y, mu.new_empty((), dtype=compute_dtype(mu.dtype)), std


@torch.library.custom_op("bnn::bayes_linear_backward", mutates_args=())
@_autocast_off
def _bayes_linear_backward_op(grad_y: torch.Tensor, grad_kl: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                              rho: torch.Tensor, prior_mu: Optional[torch.Tensor], seed: torch.Tensor,
                              std: torch.Tensor, prior_sigma: float, sigma_param: str, estimator: str,
                              backend: str, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_outputs(x, *registry.get(backend).linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std,
                                                                  prior_sigma, sigma_param, estimator, need_dx))


@_bayes_linear_backward_op.register_fake
def _(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma, sigma_param, estimator, backend, need_dx):
    return _fake_dx(x, need_dx), torch.empty_like(mu), torch.empty_like(rho)


def _bayes_linear_setup(ctx, inputs, output):
    _posterior_setup(ctx, inputs, output, config=inputs[6:])  # (prior_sigma, sigma_param, estimator, backend)


def _bayes_linear_backward(ctx, grad_y, grad_kl, _grad_std):
    return _posterior_backward(ctx, _bayes_linear_backward_op, grad_y, grad_kl, bias_dims=0)


_bayes_linear_op.register_autograd(_bayes_linear_backward, setup_context=_bayes_linear_setup)


def bayes_linear(x: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 seed: SeedLike, prior_mu: Optional[torch.Tensor] = None, prior_sigma: float = 1.0,
                 sigma_param: str = "softplus", estimator: str = "reparam"):
    """Bayesian linear layer with on-the-fly weight noise; returns ``(y, kl)``.

    reparam: ``W = mu + s(rho) * philox_normal(seed, mu.shape)``, ``y = x @ W.T + bias`` (one sample per call,
    shared by the batch).  lrt: ``y = x @ mu.T + bias + sqrt((x*x) @ s(rho)^2.T) * philox_normal(seed, y.shape)``.
    ``kl = gaussian_kl(mu, rho, prior_mu, prior_sigma)``, produced by the same op.  ``x`` is ``(..., K)``;
    ``mu``/``rho`` are ``(N, K)``; ``y`` is ``(..., N)`` in x's dtype and ``kl`` a float32 0-dim tensor.
    """
    prior_sigma = _check_posterior(mu, rho, prior_mu, prior_sigma, sigma_param)
    check_choice("estimator", estimator, ESTIMATORS)
    _check_float("x", x)
    if mu.dim() != 2:
        raise ValueError(f"mu must be 2-D (out_features, in_features), got shape {tuple(mu.shape)}")
    out_features, in_features = mu.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}) to match mu {tuple(mu.shape)}, "
                         f"got {tuple(x.shape)}")
    _check_bias(bias, out_features)
    _check_same_device(mu.device, x=x, bias=bias)
    _check_finite(x=x, mu=mu, rho=rho)
    leading = x.shape[:-1]
    x2d = x.reshape(leading.numel(), in_features).contiguous()  # not -1: in_features may be 0
    backend = _layer_backend(mu.device, x2d.numel() == 0, x=x, mu=mu, bias=bias, prior_mu=prior_mu)
    seed_t = _seed_tensor(seed, mu.device)
    # mu, rho, prior_mu go in as they are (the backends read them contiguously): a copy of a transposed or tied
    # weight made here would be a weight-sized tensor kept for backward
    y, kl, _ = _bayes_linear_op(x2d, mu, rho, bias, prior_mu, seed_t, prior_sigma, sigma_param, estimator, backend)
    return y.view(*leading, out_features), kl


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


# --------------------------------------------------------------------------------------------------------------
# bayes_conv2d
# --------------------------------------------------------------------------------------------------------------

PADDING_MODES = ("valid", "same")


def _int_pair(name: str, value, minimum: int) -> list[int]:
    """An int or a pair of ints, each at least ``minimum``, as a 2-element list (F.conv2d's convention)."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return [int(v) for v in items]


def explicit_conv_padding(padding, kernel: Sequence[int], stride: list[int], dilation: list[int]) -> list[int]:
    """Explicit (symmetric) padding from an int, a pair, "valid" or "same"; ValueError / TypeError otherwise."""
    if not isinstance(padding, str):
        return _int_pair("padding", padding, 0)
    check_choice("padding", padding, PADDING_MODES)
    if padding == "valid":
        return [0, 0]
    if stride != [1, 1]:
        raise ValueError(f"padding='same' needs stride 1, got stride={tuple(stride)}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' is supported when dilation * (kernel_size - 1) is even (symmetric "
                         f"padding), got {tuple(total)}; pad x explicitly instead")
    return [t // 2 for t in total]


def _conv_output_shape(x_shape, mu_shape, stride, padding, dilation) -> tuple:
    """(N, C_out, H_out, W_out) of conv2d over NCHW ``x_shape`` (F.conv2d's formula)."""
    spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                    for size, k, s, p, d in zip(x_shape[2:], mu_shape[2:], stride, padding, dilation))
    return (x_shape[0], mu_shape[0], *spatial)


def _conv_geometry(x: torch.Tensor, weight_shape, stride, padding, dilation):
    """(x as a contiguous NCHW batch, stride, padding, dilation as 2-element lists) for a conv2d with a weight of
    ``weight_shape``; ValueError when x is too small for the kernel or has no pixels (torch's conv2d takes zero
    batch or zero channels only)."""
    kernel = tuple(weight_shape[2:])
    if min(x.shape[-2:]) == 0:
        raise ValueError(f"x has no pixels: spatial size {tuple(x.shape[-2:])}")
    stride = _int_pair("stride", stride, 1)
    dilation = _int_pair("dilation", dilation, 1)
    padding = explicit_conv_padding(padding, kernel, stride, dilation)
    x4 = (x if x.dim() == 4 else x.unsqueeze(0)).contiguous()  # NCHW, whatever x's memory format
    out_shape = _conv_output_shape(x4.shape, weight_shape, stride, padding, dilation)
    if min(out_shape[2:]) < 1:
        raise ValueError(f"x's spatial size {tuple(x.shape[-2:])} is too small for kernel {kernel} "
                         f"with padding={tuple(padding)}, dilation={tuple(dilation)}: the output would be "
                         f"{tuple(out_shape[2:])}")
    return x4, stride, padding, dilation


@torch.library.custom_op("bnn::bayes_conv2d", mutates_args=())
@_autocast_off
def _bayes_conv2d_op(x: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor, bias: Optional[torch.Tensor],
                     prior_mu: Optional[torch.Tensor], seed: torch.Tensor, stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, prior_sigma: float, sigma_param: str, estimator: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, kl, std = registry.get(backend).conv_fwd(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups,
                                                 prior_sigma, sigma_param, estimator)
    return y.contiguous(), kl, std.contiguous()


@_bayes_conv2d_op.register_fake
def _(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups, prior_sigma, sigma_param, estimator,
      backend):
    shape = _conv_output_shape(x.shape, mu.shape, stride, padding, dilation)
    keeps_std = estimator == "lrt" and backend != "reference"  # else the backends return x.new_empty(0)
    std = x.new_empty(shape, dtype=compute_dtype(x.dtype)) if keeps_std else x.new_empty(0)
    return x.new_empty(shape), mu.new_empty((), dtype=compute_dtype(mu.dtype)), std


@torch.library.custom_op("bnn::bayes_conv2d_backward", mutates_args=())
@_autocast_off
def _bayes_conv2d_backward_op(grad_y: torch.Tensor, grad_kl: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                              rho: torch.Tensor, prior_mu: Optional[torch.Tensor], seed: torch.Tensor,
                              std: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                              groups: int, prior_sigma: float, sigma_param: str, estimator: str, backend: str,
                              need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_outputs(x, *registry.get(backend).conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std,
                                                                stride, padding, dilation, groups, prior_sigma,
                                                                sigma_param, estimator, need_dx))


@_bayes_conv2d_backward_op.register_fake
def _(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups, prior_sigma, sigma_param,
      estimator, backend, need_dx):
    # contiguous, whatever mu's memory format
    return _fake_dx(x, need_dx), mu.new_empty(mu.shape), rho.new_empty(rho.shape)


def _bayes_conv2d_setup(ctx, inputs, output):
    # config: (stride, padding, dilation, groups, prior_sigma, sigma_param, estimator, backend)
    _posterior_setup(ctx, inputs, output, config=inputs[6:])


def _bayes_conv2d_backward(ctx, grad_y, grad_kl, _grad_std):
    return _posterior_backward(ctx, _bayes_conv2d_backward_op, grad_y, grad_kl, bias_dims=(0, 2, 3))


_bayes_conv2d_op.register_autograd(_bayes_conv2d_backward, setup_context=_bayes_conv2d_setup)


def bayes_conv2d(x: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, seed: SeedLike,
                 prior_mu: Optional[torch.Tensor] = None, prior_sigma: float = 1.0, sigma_param: str = "softplus",
                 estimator: str = "reparam"):
    """Bayesian 2-D convolution with on-the-fly weight noise; returns ``(y, kl)``.

    reparam: ``W = mu + s(rho) * philox_normal(seed, mu.shape)`` (flat index (co, ci, kh, kw) of the contiguous
    weight; one sample per call, shared by the batch), ``y = conv2d(x, W, bias)``.  lrt:
    ``y = conv2d(x, mu, bias) + sqrt(conv2d(x*x, s(rho)^2)) * philox_normal(seed, y.shape)`` (flat NCHW index of y).
    ``kl = gaussian_kl(mu, rho, prior_mu, prior_sigma)``, produced by the same op.

    ``x`` is ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; a channels_last x is accepted and read as NCHW
    (converted first).  ``mu``/``rho`` are ``(C_out, C_in / groups, kh, kw)`` in any memory format (channels_last
    parameters, as ``model.to(memory_format=torch.channels_last)`` makes them, are read without a kept copy).
    ``stride``/``dilation`` are an int or a pair, ``padding`` an int, a pair, ``"valid"`` or ``"same"`` (stride 1,
    symmetric padding only), as in F.conv2d.  ``y`` is a contiguous NCHW tensor in x's dtype; ``kl`` a float32
    0-dim tensor.
    """
    prior_sigma = _check_posterior(mu, rho, prior_mu, prior_sigma, sigma_param)
    check_choice("estimator", estimator, ESTIMATORS)
    _check_float("x", x)
    if mu.dim() != 4 or min(mu.shape) < 1:
        raise ValueError(f"mu must be 4-D (out_channels, in_channels / groups, kernel_h, kernel_w) with non-zero "
                         f"sizes, got shape {tuple(mu.shape)}")
    _check_int("groups", groups)
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    groups = int(groups)
    out_channels, group_channels = mu.shape[:2]
    if out_channels % groups:
        raise ValueError(f"mu's out_channels ({out_channels}) must be divisible by groups ({groups})")
    in_channels = group_channels * groups
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(f"x must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W) to match mu "
                         f"{tuple(mu.shape)} with groups={groups}, got {tuple(x.shape)}")
    _check_bias(bias, out_channels)
    _check_same_device(mu.device, x=x, bias=bias)
    x4, stride, padding, dilation = _conv_geometry(x, mu.shape, stride, padding, dilation)
    _check_finite(x=x, mu=mu, rho=rho)
    backend = _layer_backend(mu.device, x4.numel() == 0, x=x, mu=mu, bias=bias, prior_mu=prior_mu)
    seed_t = _seed_tensor(seed, mu.device)
    # mu, rho, prior_mu go in as they are (the backends read them contiguously): a channels_last weight copied here
    # would be a weight-sized tensor kept for backward
    y, kl, _ = _bayes_conv2d_op(x4, mu, rho, bias, prior_mu, seed_t, stride, padding, dilation, groups, prior_sigma,
                                sigma_param, estimator, backend)
    return (y if x.dim() == 4 else y.squeeze(0)), kl


# --------------------------------------------------------------------------------------------------------------
# Bayesian LoRA: bayes_lora_linear, bayes_lora_conv2d
# --------------------------------------------------------------------------------------------------------------
# y = base(x; weight) + bias + scale * up(down(x; lora_a); lora_b), one factor (``bayes``) Gaussian with mean = that
# factor, sigma = s(rho), prior N(0, prior_sigma^2).  The base layer is frozen: weight and bias get no gradient, and
# the ops refuse them when they require grad in grad mode (freeze them first, as PEFT does).  Autograd keeps the
# inputs, the seed and the rank-space activation h the up map consumed (M x r for the linear op, N x r x H_out x
# W_out for the conv; lrt "A" also keeps t's standard deviation, as large): nothing with the base weight's or the
# output's size.  Keeping h, a fraction r / out_features of the output, spares backward a pass over x to
# recompute down(x; A) before the gradients of B and of x can start.

LORA_FACTORS = ("A", "B")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not -math.inf < scale < math.inf:  # comparisons, not math.isfinite: they also take symbolic floats
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _rank_dtype(x_dtype: torch.dtype, factor_dtype: torch.dtype) -> torch.dtype:
    """dtype of the rank-space activation kept for backward: float32, or float64 when x or the factors are."""
    return torch.promote_types(torch.promote_types(x_dtype, factor_dtype), torch.float32)


def _check_lora(x, weight, bias, lora_a, lora_b, rho, scale, bayes, prior_sigma, sigma_param, estimator):
    """Checks shared by both LoRA ops (dtypes, the Bayesian factor, options, devices, the frozen base);
    returns (prior_sigma, scale) as floats."""
    check_choice("bayes", bayes, LORA_FACTORS)
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("sigma_param", sigma_param, SIGMA_PARAMS)
    prior_sigma = check_prior_sigma(prior_sigma)
    scale = _check_scale(scale)
    for name, tensor in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("rho", rho)):
        _check_float(name, tensor)
    if bias is not None:
        _check_float("bias", bias)
    if lora_b.dtype != lora_a.dtype:
        raise ValueError(f"lora_b must have lora_a's dtype {lora_a.dtype}, got {lora_b.dtype}")
    name, factor = ("lora_a", lora_a) if bayes == "A" else ("lora_b", lora_b)
    if rho.dtype != factor.dtype:
        raise ValueError(f"rho must have {name}'s dtype {factor.dtype}, got {rho.dtype}")
    _check_same_device(lora_a.device, "lora_a", x=x, weight=weight, bias=bias, lora_b=lora_b, rho=rho)
    if torch.is_grad_enabled():
        for frozen_name, frozen in (("weight", weight), ("bias", bias)):
            if frozen is not None and frozen.requires_grad:
                raise ValueError(f"{frozen_name} requires grad, but the base layer of a LoRA op is frozen and gets "
                                 f"no gradient: call {frozen_name}.requires_grad_(False) (as PEFT does), or train "
                                 f"a full-rank posterior with bayes_linear / bayes_conv2d")
    _check_finite(x=x, lora_a=lora_a, lora_b=lora_b, rho=rho)
    return prior_sigma, scale


def _check_factor_shapes(lora_a, lora_b, rho, bayes: str, out_features: int, b_shape: tuple) -> None:
    """lora_a has a rank r >= 1 (checked against the base by the caller), lora_b has ``b_shape``, rho the shape of
    the Bayesian factor."""
    rank = lora_a.shape[0] if lora_a.dim() > 0 else 0
    if rank < 1:
        raise ValueError(f"lora_a must have at least one row (the rank r), got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != b_shape:
        raise ValueError(f"lora_b must have shape {b_shape} (out_features {out_features}, rank {rank} from "
                         f"lora_a), got {tuple(lora_b.shape)}")
    name, factor = ("lora_a", lora_a) if bayes == "A" else ("lora_b", lora_b)
    if rho.shape != factor.shape:
        raise ValueError(f"rho must have the shape {tuple(factor.shape)} of the Bayesian factor {name} "
                         f"(bayes={bayes!r}), got {tuple(rho.shape)}")


def _lora_fake_outputs(x, lora_a, rho, y_shape, h_shape, bayes, estimator):
    rank_dtype = _rank_dtype(x.dtype, lora_a.dtype)
    aux_shape = h_shape if (bayes == "A" and estimator == "lrt") else (0,)
    return (x.new_empty(y_shape), rho.new_empty((), dtype=compute_dtype(rho.dtype)),
            x.new_empty(h_shape, dtype=rank_dtype), x.new_empty(aux_shape, dtype=rank_dtype))


def _lora_backward_fake(x, lora_a, lora_b, rho, need_dx):
    return _fake_dx(x, need_dx), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(rho)


def _lora_backward(ctx, backward_op, grad_y, grad_kl) -> tuple:
    """Gradients of a LoRA op's inputs (x, weight, bias, lora_a, lora_b, rho, options...): the frozen base and the
    options get None."""
    dx, da, db, drho = backward_op(*_lora_saved_and_grads(ctx, grad_y, grad_kl), *ctx.config,
                                   ctx.needs_input_grad[0])
    return (_input_grad(ctx, dx), None, None, da, db, drho) + (None,) * (len(ctx.needs_input_grad) - 6)


def _lora_setup(ctx, x, weight, lora_a, lora_b, rho, seed, output, config):
    _, _, h, aux = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, rho, seed, h, aux)
    ctx.config = config
    ctx.mark_non_differentiable(h, aux)


def _lora_saved_and_grads(ctx, grad_y, grad_kl):
    """The saved tensors with grad_y / grad_kl in the dtypes the backward ops take."""
    x, weight, lora_a, lora_b, rho, seed, h, aux = ctx.saved_tensors
    grads = (grad_y.to(x.dtype).contiguous(), grad_kl.to(compute_dtype(rho.dtype)).contiguous())
    return grads + (x, weight, lora_a, lora_b, rho, seed, h, aux)


# --- bayes_lora_linear ---------------------------------------------------------------------------------------------

@torch.library.custom_op("bnn::bayes_lora_linear", mutates_args=())
@_autocast_off
def _bayes_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, rho: torch.Tensor, seed: torch.Tensor, scale: float, bayes: str,
                          prior_sigma: float, sigma_param: str, estimator: str,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, kl, h, aux = registry.get(backend).lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes,
                                                          prior_sigma, sigma_param, estimator)
    return y.contiguous(), kl, h.contiguous(), aux.contiguous()


@_bayes_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma, sigma_param, estimator, backend):
    return _lora_fake_outputs(x, lora_a, rho, (x.shape[0], weight.shape[0]), (x.shape[0], lora_a.shape[0]), bayes,
                              estimator)


@torch.library.custom_op("bnn::bayes_lora_linear_backward", mutates_args=())
@_autocast_off
def _bayes_lora_linear_backward_op(grad_y: torch.Tensor, grad_kl: torch.Tensor, x: torch.Tensor,
                                   weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                                   rho: torch.Tensor, seed: torch.Tensor, h: torch.Tensor, aux: torch.Tensor,
                                   scale: float, bayes: str, prior_sigma: float, sigma_param: str, estimator: str,
                                   backend: str, need_dx: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = registry.get(backend).lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux,
                                                  scale, bayes, prior_sigma, sigma_param, estimator, need_dx)
    return _backward_outputs(x, *grads)


@_bayes_lora_linear_backward_op.register_fake
def _(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale, bayes, prior_sigma, sigma_param,
      estimator, backend, need_dx):
    return _lora_backward_fake(x, lora_a, lora_b, rho, need_dx)


def _bayes_lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, rho, seed, scale, bayes, prior_sigma, sigma_param, estimator, backend = inputs
    _lora_setup(ctx, x, weight, lora_a, lora_b, rho, seed, output,
                (scale, bayes, prior_sigma, sigma_param, estimator, backend))


def _bayes_lora_linear_backward(ctx, grad_y, grad_kl, _grad_h, _grad_aux):
    return _lora_backward(ctx, _bayes_lora_linear_backward_op, grad_y, grad_kl)


_bayes_lora_linear_op.register_autograd(_bayes_lora_linear_backward, setup_context=_bayes_lora_linear_setup)


def bayes_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                      lora_b: torch.Tensor, rho: torch.Tensor, *, scale: float, bayes: str = "B", seed: SeedLike,
                      prior_sigma: float = 1.0, sigma_param: str = "softplus", estimator: str = "reparam"):
    """Frozen linear layer plus a Bayesian low-rank update; returns ``(y, kl)``.

    ``y = x @ weight.T + bias + scale * (x @ A.T) @ B.T`` with ``A = lora_a`` ``(r, K)``, ``B = lora_b`` ``(N, r)``.
    The factor named by ``bayes`` ("A", as BLoB, or "B", as the paper) is Gaussian: mean = that factor, sigma =
    s(rho) (rho has its shape), prior N(0, prior_sigma^2); the other factor is deterministic.
    reparam: the factor is sampled once per call, ``F = mean + sigma * philox_normal(seed, F.shape)``.
    lrt (in rank space): bayes "B": ``h = x @ A.T``, low-rank output ``h @ B.T + sqrt((h*h) @ (sigma^2).T) * xi``
    with ``xi = philox_normal(seed, (M, N))``; bayes "A": ``t = x @ A.T + sqrt((x*x) @ (sigma^2).T) * xi`` with
    ``xi = philox_normal(seed, (M, r))``, low-rank output ``t @ B.T``.
    ``kl = gaussian_kl(factor, rho, None, prior_sigma)``, produced by the same op.

    ``x`` is ``(..., K)`` in float32/float16/bfloat16; ``weight`` ``(N, K)`` and ``bias`` ``(N,)`` may have another
    floating dtype (a 16-bit frozen base with float32 factors, as in mixed-precision LoRA training) and are frozen:
    they get no gradient, and must not require grad in grad mode.  Gradients flow to x, lora_a, lora_b and rho.
    ``y`` is ``(..., N)`` in x's dtype; ``kl`` float32 (float64 for float64 factors).
    """
    prior_sigma, scale = _check_lora(x, weight, bias, lora_a, lora_b, rho, scale, bayes, prior_sigma, sigma_param,
                                     estimator)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    _check_bias(bias, out_features)
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must have shape (r, {in_features}), got {tuple(lora_a.shape)}")
    _check_factor_shapes(lora_a, lora_b, rho, bayes, out_features, (out_features, lora_a.shape[0]))
    leading = x.shape[:-1]
    x2d = x.reshape(leading.numel(), in_features).contiguous()  # not -1: in_features may be 0
    backend = _layer_backend(lora_a.device, x2d.numel() == 0, x=x, weight=weight, bias=bias, lora_a=lora_a,
                             lora_b=lora_b)
    seed_t = _seed_tensor(seed, lora_a.device)
    # the frozen weight goes in as it is (see bayes_linear); the factors are small
    y, kl, _, _ = _bayes_lora_linear_op(x2d, weight, _contiguous(bias), lora_a.contiguous(),
                                        lora_b.contiguous(), rho.contiguous(), seed_t, scale, bayes, prior_sigma,
                                        sigma_param, estimator, backend)
    return y.view(*leading, out_features), kl


# --- bayes_lora_conv2d ---------------------------------------------------------------------------------------------

@torch.library.custom_op("bnn::bayes_lora_conv2d", mutates_args=())
@_autocast_off
def _bayes_lora_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, rho: torch.Tensor, seed: torch.Tensor, stride: list[int],
                          padding: list[int], dilation: list[int], scale: float, bayes: str, prior_sigma: float,
                          sigma_param: str, estimator: str,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, kl, h, aux = registry.get(backend).lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, stride,
                                                          padding, dilation, scale, bayes, prior_sigma, sigma_param,
                                                          estimator)
    return y.contiguous(), kl, h.contiguous(), aux.contiguous()


@_bayes_lora_conv2d_op.register_fake
def _(x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation, scale, bayes, prior_sigma, sigma_param,
      estimator, backend):
    y_shape = _conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return _lora_fake_outputs(x, lora_a, rho, y_shape, (y_shape[0], lora_a.shape[0], *y_shape[2:]), bayes,
                              estimator)


@torch.library.custom_op("bnn::bayes_lora_conv2d_backward", mutates_args=())
@_autocast_off
def _bayes_lora_conv2d_backward_op(grad_y: torch.Tensor, grad_kl: torch.Tensor, x: torch.Tensor,
                                   weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                                   rho: torch.Tensor, seed: torch.Tensor, h: torch.Tensor, aux: torch.Tensor,
                                   stride: list[int], padding: list[int], dilation: list[int], scale: float,
                                   bayes: str, prior_sigma: float, sigma_param: str, estimator: str, backend: str,
                                   need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = registry.get(backend).lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux,
                                                  stride, padding, dilation, scale, bayes, prior_sigma, sigma_param,
                                                  estimator, need_dx)
    return _backward_outputs(x, *grads)


@_bayes_lora_conv2d_backward_op.register_fake
def _(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, stride, padding, dilation, scale, bayes,
      prior_sigma, sigma_param, estimator, backend, need_dx):
    return _lora_backward_fake(x, lora_a, lora_b, rho, need_dx)


def _bayes_lora_conv2d_setup(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation, scale, bayes, prior_sigma, sigma_param,
     estimator, backend) = inputs
    _lora_setup(ctx, x, weight, lora_a, lora_b, rho, seed, output,
                (stride, padding, dilation, scale, bayes, prior_sigma, sigma_param, estimator, backend))


def _bayes_lora_conv2d_backward(ctx, grad_y, grad_kl, _grad_h, _grad_aux):
    return _lora_backward(ctx, _bayes_lora_conv2d_backward_op, grad_y, grad_kl)


_bayes_lora_conv2d_op.register_autograd(_bayes_lora_conv2d_backward, setup_context=_bayes_lora_conv2d_setup)


def bayes_lora_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                      lora_b: torch.Tensor, rho: torch.Tensor, *, scale: float, stride=1, padding=0, dilation=1,
                      groups: int = 1, bayes: str = "B", seed: SeedLike, prior_sigma: float = 1.0,
                      sigma_param: str = "softplus", estimator: str = "reparam"):
    """Frozen conv2d plus a Bayesian low-rank update; returns ``(y, kl)``.

    ``y = conv2d(x, weight, bias) + scale * conv1x1(conv2d(x, A), B)``: ``A = lora_a`` ``(r, C_in, kh, kw)`` is a
    conv with r output channels and the base's stride / padding / dilation, ``B = lora_b`` ``(C_out, r, 1, 1)`` a
    1x1 conv.  The factor named by ``bayes`` is Gaussian as in ``bayes_lora_linear`` (reparam noise
    ``philox_normal(seed, factor.shape)``); lrt works in rank space: bayes "B" adds
    ``sqrt(conv1x1(h*h, sigma^2)) * philox_normal(seed, y.shape)`` with ``h = conv2d(x, A)``, bayes "A" samples
    ``t = conv2d(x, A) + sqrt(conv2d(x*x, sigma^2)) * philox_normal(seed, t.shape)`` (t: (N, r, H_out, W_out)),
    flat NCHW indices.  The base conv must be ungrouped (``groups=1``): a grouped base has no low-rank update of
    this form.  ``x`` is ``(N, C_in, H, W)`` or ``(C_in, H, W)`` (channels_last is read as NCHW); geometry
    arguments as in F.conv2d (``padding`` also "valid" / "same").  weight and bias are frozen (see
    ``bayes_lora_linear``).  ``y`` is a contiguous NCHW tensor in x's dtype.
    """
    prior_sigma, scale = _check_lora(x, weight, bias, lora_a, lora_b, rho, scale, bayes, prior_sigma, sigma_param,
                                     estimator)
    _check_int("groups", groups)
    if groups != 1:
        raise ValueError(f"groups must be 1 for a LoRA conv (A is an ungrouped conv with r output channels, B a 1x1 "
                         f"conv), got groups={groups}")
    if weight.dim() != 4 or min(weight.shape) < 1:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels, kernel_h, kernel_w) with non-zero sizes, "
                         f"got shape {tuple(weight.shape)}")
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(f"x must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    _check_bias(bias, out_channels)
    if lora_a.dim() != 4 or tuple(lora_a.shape[1:]) != (in_channels, kernel_h, kernel_w):
        raise ValueError(f"lora_a must have shape (r, {in_channels}, {kernel_h}, {kernel_w}) (the base's kernel), "
                         f"got {tuple(lora_a.shape)}")
    _check_factor_shapes(lora_a, lora_b, rho, bayes, out_channels, (out_channels, lora_a.shape[0], 1, 1))
    x4, stride, padding, dilation = _conv_geometry(x, weight.shape, stride, padding, dilation)
    backend = _layer_backend(lora_a.device, x4.numel() == 0, x=x, weight=weight, bias=bias, lora_a=lora_a,
                             lora_b=lora_b)
    seed_t = _seed_tensor(seed, lora_a.device)
    # the frozen weight goes in as it is: a channels_last base (model.to(memory_format=torch.channels_last)) copied
    # here would be kept for backward
    y, kl, _, _ = _bayes_lora_conv2d_op(x4, weight, _contiguous(bias), lora_a.contiguous(),
                                        lora_b.contiguous(), rho.contiguous(), seed_t, stride, padding, dilation,
                                        scale, bayes, prior_sigma, sigma_param, estimator, backend)
    return (y if x.dim() == 4 else y.squeeze(0)), kl
