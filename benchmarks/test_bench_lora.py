"""pytest-benchmark: Bayesian LoRA linear (fwd+bwd) against a PEFT-style unfused LoRA and a paper-style Bayesian
LoRA, on the same frozen base (rank 4, B Bayesian, float32 factors).

CPU machines time the C++ backend at small sizes (float32); GPU machines time the Triton backend at the Stable
Diffusion 1.5 attention shapes (M = 8192, N = K in {320, 640, 1280}) in bfloat16.
"""
import pytest
import torch

import bnn_kernels as bk
from layers import CPU_LORA_SHAPES, LORA_VARIANTS, SD15_LORA_SHAPES, lora_forward_backward, make_lora_layer

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = SD15_LORA_SHAPES if ON_GPU else CPU_LORA_SHAPES


def _timed(benchmark, fn):
    if ON_GPU:
        def synced():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, warmup_rounds=3, rounds=20, iterations=1)
    else:
        benchmark(fn)


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_linear_forward_backward(benchmark, shape, variant):
    m, n, k = SHAPES[shape]
    layer = make_lora_layer(m, n, k, DTYPE, DEVICE)
    grad_y = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"lora linear fwd+bwd {shape} {DTYPE}"
    benchmark.extra_info.update(m=m, n=n, k=k, rank=layer[3].shape[0], dtype=str(DTYPE), device=str(DEVICE),
                                backend=bk.registry.select(DEVICE))
    _timed(benchmark, lambda: lora_forward_backward(variant, layer, grad_y))
