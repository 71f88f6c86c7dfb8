"""pytest-benchmark microbenchmarks: noise stream, KL, and Bayesian linear (fwd+bwd) against its baselines.

CPU machines time the C++ and reference backends at small sizes (the Triton interpreter is a correctness tool,
not a speed one); GPU machines time the Triton backend at Stable Diffusion 1.5 shapes in bfloat16.
Run with ``make bench`` (CPU) or ``benchmarks/gpu_suite.sh`` (GPU).
"""
import pytest
import torch

import bnn_kernels as bk
from layers import (CPU_LINEAR_SHAPES, DEVICE, DTYPE, FORCED_TRITON_VARIANTS, ON_GPU, SD15_LINEAR_SHAPES,
                    forward_backward, make_layer)

SHAPES = SD15_LINEAR_SHAPES if ON_GPU else CPU_LINEAR_SHAPES
BACKENDS = [b for b in bk.backends() if (b in ("triton", "cuda") if ON_GPU else b == "cpu")]


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_philox_normal(benchmark, timed, backend):
    numel = (1 << 24) if ON_GPU else (1 << 20)
    benchmark.group = f"philox_normal {numel}"
    with bk.use_backend(backend):
        timed(lambda: bk.philox_normal(1, numel, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_gaussian_kl_forward_backward(benchmark, timed, backend):
    numel = 1280 * 5120 if ON_GPU else 320 * 1280
    mu = torch.randn(numel, device=DEVICE, requires_grad=True)
    rho = torch.full((numel,), -5.0, device=DEVICE, requires_grad=True)
    prior = mu.detach().clone()
    benchmark.group = f"gaussian_kl fwd+bwd {numel}"

    def step():
        bk.gaussian_kl(mu, rho, prior, 0.01).backward()
        mu.grad = rho.grad = None

    with bk.use_backend(backend):
        timed(step)


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("variant", ["F.linear", "paper-style", "fused-reparam", "fused-lrt",
                                     *(FORCED_TRITON_VARIANTS if "triton" in BACKENDS else ())])
def test_linear_forward_backward(benchmark, timed, shape, variant):
    m, n, k = SHAPES[shape]
    layer = make_layer(m, n, k, DTYPE, DEVICE)
    grad_y = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"linear fwd+bwd {shape} {DTYPE}"
    benchmark.extra_info.update(m=m, n=n, k=k, dtype=str(DTYPE), device=str(DEVICE), backends=bk.backends())
    timed(lambda: forward_backward(variant, *layer, grad_y))
