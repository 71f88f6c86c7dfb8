"""Shared test helpers: which backend runs on which device here, and the oracle tolerance rule."""
from __future__ import annotations

from typing import Optional

import torch

import bnn_kernels as bk

HAS_CUDA = torch.cuda.is_available()


def device_for(backend: str) -> torch.device:
    """The device whose tensors ``backend`` is tested on: the GPU where there is one, else the CPU."""
    if backend == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if HAS_CUDA else "cpu")


BACKENDS = bk.backends()
# The linear-layer tests run the triton backend twice: its fused kernels, and the variants on torch's maps (reparam
# "transient", lrt "composition"; BNN_TRITON_REPARAM / BNN_TRITON_LRT); parametrise "backend" over these with
# indirect=True: the conftest fixture sets the variants and hands the test the name.
BACKEND_VARIANTS = [v for b in BACKENDS for v in ((f"{b}:fused", f"{b}:maps") if b == "triton" else (b,))]
# The linear LoRA tests: plain "triton" runs BNN_TRITON_LORA=auto (float32 x and large ranks take the composition),
# "triton:lora-fused" the fused kernels wherever they hold the rank, float32 included (indirect=True as above).
LORA_BACKENDS = BACKENDS + (["triton:lora-fused"] if "triton" in BACKENDS else [])
LOW_PRECISION_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def max_abs_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    return (value.detach().double().cpu() - oracle.detach().double().cpu()).abs().max().item() if value.numel() else 0.0


def relative_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |value - oracle| / max |oracle|: for gradients far below 1, which an absolute tolerance would pass."""
    return max_abs_error(value, oracle) / oracle.detach().abs().max().item()


def lrt_loss_gradients(op, x, mu, rho):
    """(dx, dmu, drho) of ``op(x, mu, rho) -> (y, kl)`` for the loss y.sum() alone (KL weight 0): the gradients
    through lrt's output std, which the KL's gradient would otherwise outweigh."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, mu, rho)]
    y, _ = op(*leaves)
    y.float().sum().backward()
    return [leaf.grad for leaf in leaves]


def assert_lrt_rho_gradient_close(op, x, mu, rho, backend: str, dtype: torch.dtype, tolerance: float = 1e-2):
    """drho of ``lrt_loss_gradients`` on ``backend`` (x in ``dtype``, float32 parameters) within ``tolerance``
    (relative) of the float64 reference's; x, mu, rho are given in float64."""
    with bk.use_backend("reference"):
        oracle = lrt_loss_gradients(op, x, mu, rho)
    device = device_for(backend)
    with bk.use_backend(backend):
        grads = lrt_loss_gradients(op, x.to(device, dtype), mu.float().to(device), rho.float().to(device))
    assert relative_error(grads[2], oracle[2]) < tolerance


def assert_close_to_oracle(name: str, value, oracle, same_dtype_torch, dtype) -> None:
    """The rule of flash-attention: error vs the float64 oracle at most 2x that of plain PyTorch in the same dtype
    (``same_dtype_torch``), plus a small absolute tolerance scaled by the oracle's magnitude."""
    assert value.shape == oracle.shape, f"{name}: shape {tuple(value.shape)} != {tuple(oracle.shape)}"
    scale = 1.0 + oracle.detach().abs().max().item() if oracle.numel() else 1.0
    error = max_abs_error(value, oracle)
    baseline = max_abs_error(same_dtype_torch, oracle)
    bound = 2.0 * baseline + LOW_PRECISION_ATOL[dtype] * scale
    assert error <= bound, f"{name}: error {error:.3g} > bound {bound:.3g} (plain torch in {dtype}: {baseline:.3g})"


def assert_compiled_matches_eager(model, x, backend: str, compile_backend: Optional[str] = None,
                                  steps: int = 3) -> None:
    """``torch.compile(model, fullgraph=True)`` (tracing through the custom ops and their fake impls) returns the
    eager (y, kl) of ``model(x, seed)`` for ``steps`` new seed tensors, backward runs through the compiled graph,
    and a new seed does not recompile.  The compiled graph runs eagerly, or with ``compile_backend`` ("aot_eager"
    also traces the backward)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    if compile_backend is None:
        counter = torch._dynamo.testing.CompileCounter()
    else:
        counter = torch._dynamo.testing.CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with bk.use_backend(backend):
        for step in range(steps):
            seed = torch.tensor(100 + step)
            y, kl = compiled(x, seed)
            y_eager, kl_eager = model(x, seed)
            torch.testing.assert_close(y, y_eager)
            torch.testing.assert_close(kl, kl_eager)
            (y.sum() + kl).backward()
    assert counter.frame_count == 1


def assert_layer_close_to_oracle(label: str, result, oracle, same_dtype_torch, x_dtype, param_dtype) -> None:
    """A Bayesian layer's (y, kl, dx, dmu, drho, dbias) against the float64 oracle (``assert_close_to_oracle``;
    None entries skipped): the dtypes of the outputs, then each value in the dtype it was computed in.  The weight
    gradients of a low-precision x come from a GEMM / convolution in x's dtype."""
    y, kl, dx, dmu, drho, _ = result
    assert y.dtype == x_dtype and kl.dtype == torch.float32 and kl.dim() == 0
    assert dx.dtype == x_dtype and dmu.dtype == param_dtype and drho.dtype == param_dtype
    names = ("y", "kl", "dx", "dmu", "drho", "dbias")
    for name, value, reference, same_dtype in zip(names, result, oracle, same_dtype_torch):
        if value is None:
            continue
        dtype = {"y": x_dtype, "dx": x_dtype, "kl": torch.float32}.get(name, param_dtype)
        if name in ("dmu", "drho", "dbias") and x_dtype != torch.float32:
            dtype = x_dtype
        assert_close_to_oracle(f"{label}/{name}", value, reference, same_dtype, dtype)
