"""The Triton backend: fused Bayesian kernels with on-the-fly Philox weight noise.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported).  The functions follow the backend contract of ``bnn_kernels.registry``:

* ``philox_normal``      -> philox.py (tl.randn(seed, offset + i), int64 counters)
* ``gaussian_kl_fwd/bwd`` -> kl.py (reduction with per-program partial sums; elementwise gradient)
* ``linear_fwd/bwd``     -> linear.py (reparam and lrt GEMMs with noise generated in registers, KL fused), and
  sample.py (the "transient" reparam variant: one weight sample per GEMM, fed to torch's matmul and dropped).
  ``BNN_TRITON_REPARAM`` = fused | transient | auto (default) picks the reparam variant at each call;
  ``reparam_variant(M, device, dtype)`` says which one a call with M rows of x runs.  ``BNN_TRITON_LRT`` = fused |
  composition | auto: the lrt GEMMs in linear.py's kernels or composition.py's (cuBLAS); auto composes where
  tl.dot has no tensor cores (below sm_80).
* ``lora_linear_fwd/bwd`` -> lora.py (the low-rank path in the base GEMM's K loop and epilogue, factor noise in
  registers); ``lora_conv2d_fwd/bwd`` -> lora.py (torch's convolutions with this backend's noise)
* ``conv_fwd/bwd``       -> conv.py (one weight sample / sigma^2 per convolution from sample.py's kernels, fed to
  torch's conv and dropped); its lrt: composition.py (output noise and weight-gradient epilogues as elementwise
  kernels)
"""
from __future__ import annotations

import os

import torch

NAME = "triton"

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - the backend is simply unavailable
    triton = None

if triton is not None:
    from . import common, conv, kl, linear, lora
    from .common import on_operands_device
    from .linear import reparam_variant
    from .philox import philox_normal  # launches on its ``device`` argument

    # Every other entry point launches on the device of its first tensor (the op's x, grad_y or mu).
    gaussian_kl_fwd, gaussian_kl_bwd = on_operands_device(kl.gaussian_kl_fwd), on_operands_device(kl.gaussian_kl_bwd)
    conv_fwd, conv_bwd = on_operands_device(conv.conv_fwd), on_operands_device(conv.conv_bwd)
    linear_fwd, linear_bwd = on_operands_device(linear.linear_fwd), on_operands_device(linear.linear_bwd)
    lora_linear_fwd = on_operands_device(lora.lora_linear_fwd)
    lora_linear_bwd = on_operands_device(lora.lora_linear_bwd)
    lora_conv2d_fwd = on_operands_device(lora.lora_conv2d_fwd)
    lora_conv2d_bwd = on_operands_device(lora.lora_conv2d_bwd)
else:  # pragma: no cover
    def _unavailable(*args, **kwargs):
        raise RuntimeError("the triton backend needs the triton package")

    philox_normal = gaussian_kl_fwd = gaussian_kl_bwd = linear_fwd = linear_bwd = reparam_variant = _unavailable
    conv_fwd = conv_bwd = _unavailable
    lora_linear_fwd = lora_linear_bwd = lora_conv2d_fwd = lora_conv2d_bwd = _unavailable


def is_available() -> bool:
    """triton imports, and there is a GPU, Triton's interpreter is on, or ``aot.capture`` compiles for a GPU."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                                   or capturing())


def capturing() -> bool:
    """Whether an ``aot.capture`` is active: launches (on CPU tensors too) compile for a GPU instead of running."""
    return triton is not None and common.compute_capability(None) is not None


__all__ = ["NAME", "is_available", "philox_normal", "gaussian_kl_fwd", "gaussian_kl_bwd", "linear_fwd",
           "linear_bwd", "reparam_variant", "conv_fwd", "conv_bwd",
           "lora_linear_fwd", "lora_linear_bwd", "lora_conv2d_fwd", "lora_conv2d_bwd"]
