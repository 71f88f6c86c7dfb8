"""pytest-benchmark: Bayesian LoRA linear (fwd+bwd) against a PEFT-style unfused LoRA and a paper-style Bayesian
LoRA, on the same frozen base (rank 4, B Bayesian, float32 factors).

CPU machines time the C++ backend at small sizes (float32); GPU machines time the Triton backend at the Stable
Diffusion 1.5 attention shapes (M = 8192, N = K in {320, 640, 1280}) in bfloat16.
"""
import pytest
import torch

import bnn_kernels as bk
from layers import (CPU_LORA_SHAPES, DEVICE, DTYPE, LORA_VARIANTS, ON_GPU, SD15_LORA_SHAPES, lora_forward_backward,
                    make_lora_layer)

SHAPES = SD15_LORA_SHAPES if ON_GPU else CPU_LORA_SHAPES


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_linear_forward_backward(benchmark, timed, shape, variant):
    m, n, k = SHAPES[shape]
    layer = make_lora_layer(m, n, k, DTYPE, DEVICE)
    grad_y = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"lora linear fwd+bwd {shape} {DTYPE}"
    benchmark.extra_info.update(m=m, n=n, k=k, rank=layer[3].shape[0], dtype=str(DTYPE), device=str(DEVICE),
                                backend=bk.registry.select(DEVICE))
    timed(lambda: lora_forward_backward(variant, layer, grad_y))
