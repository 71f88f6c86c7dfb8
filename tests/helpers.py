"""Shared test helpers: which backend runs on which device here, and the oracle tolerance rule."""
from __future__ import annotations

import torch

import bnn_kernels as bk

HAS_CUDA = torch.cuda.is_available()


def device_for(backend: str) -> torch.device:
    """The device whose tensors ``backend`` is tested on: the GPU where there is one, else the CPU."""
    if backend == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if HAS_CUDA else "cpu")


BACKENDS = bk.backends()
# The linear-layer tests run the triton backend once per reparam variant (BNN_TRITON_REPARAM); parametrise
# "backend" over these with indirect=True: the conftest fixture sets the variant and hands the test the name.
BACKEND_VARIANTS = [v for b in BACKENDS for v in ((f"{b}:fused", f"{b}:transient") if b == "triton" else (b,))]
LOW_PRECISION_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def max_abs_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    return (value.detach().double().cpu() - oracle.detach().double().cpu()).abs().max().item() if value.numel() else 0.0


def assert_close_to_oracle(name: str, value, oracle, same_dtype_torch, dtype) -> None:
    """The rule of flash-attention: error vs the float64 oracle at most 2x that of plain PyTorch in the same dtype
    (``same_dtype_torch``), plus a small absolute tolerance scaled by the oracle's magnitude."""
    assert value.shape == oracle.shape, f"{name}: shape {tuple(value.shape)} != {tuple(oracle.shape)}"
    scale = 1.0 + oracle.detach().abs().max().item() if oracle.numel() else 1.0
    error = max_abs_error(value, oracle)
    baseline = max_abs_error(same_dtype_torch, oracle)
    bound = 2.0 * baseline + LOW_PRECISION_ATOL[dtype] * scale
    assert error <= bound, f"{name}: error {error:.3g} > bound {bound:.3g} (plain torch in {dtype}: {baseline:.3g})"
