"""pytest-benchmark microbenchmarks: noise stream, KL, and Bayesian linear (fwd+bwd) against its baselines.

CPU machines time the C++ and reference backends at small sizes (the Triton interpreter is a correctness tool,
not a speed one); GPU machines time the Triton backend at Stable Diffusion 1.5 shapes in bfloat16.
Run with ``make bench`` (CPU) or ``benchmarks/gpu_suite.sh`` (GPU).
"""
import pytest
import torch

import bnn_kernels as bk
from layers import CPU_LINEAR_SHAPES, FORCED_TRITON_REPARAM, SD15_LINEAR_SHAPES, forward_backward, make_layer

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = SD15_LINEAR_SHAPES if ON_GPU else CPU_LINEAR_SHAPES
BACKENDS = [b for b in bk.backends() if (b in ("triton", "cuda") if ON_GPU else b == "cpu")]


def _timed(benchmark, fn):
    if ON_GPU:
        def synced():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, warmup_rounds=3, rounds=20, iterations=1)
    else:
        benchmark(fn)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_philox_normal(benchmark, backend):
    numel = (1 << 24) if ON_GPU else (1 << 20)
    benchmark.group = f"philox_normal {numel}"
    with bk.use_backend(backend):
        _timed(benchmark, lambda: bk.philox_normal(1, numel, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_gaussian_kl_forward_backward(benchmark, backend):
    numel = 1280 * 5120 if ON_GPU else 320 * 1280
    mu = torch.randn(numel, device=DEVICE, requires_grad=True)
    rho = torch.full((numel,), -5.0, device=DEVICE, requires_grad=True)
    prior = mu.detach().clone()
    benchmark.group = f"gaussian_kl fwd+bwd {numel}"

    def step():
        bk.gaussian_kl(mu, rho, prior, 0.01).backward()
        mu.grad = rho.grad = None

    with bk.use_backend(backend):
        _timed(benchmark, step)


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("variant", ["F.linear", "paper-style", "fused-reparam", "fused-lrt",
                                     *(FORCED_TRITON_REPARAM if "triton" in BACKENDS else ())])
def test_linear_forward_backward(benchmark, shape, variant):
    m, n, k = SHAPES[shape]
    layer = make_layer(m, n, k, DTYPE, DEVICE)
    grad_y = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"linear fwd+bwd {shape} {DTYPE}"
    benchmark.extra_info.update(m=m, n=n, k=k, dtype=str(DTYPE), device=str(DEVICE), backends=bk.backends())
    _timed(benchmark, lambda: forward_backward(variant, *layer, grad_y))
