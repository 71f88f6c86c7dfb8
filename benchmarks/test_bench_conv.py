"""pytest-benchmark: Bayesian conv2d (fwd+bwd, reparam and lrt) against F.conv2d and a paper-style Bayesian conv.

A 3x3, stride 1, padding 1 conv with C_in = C_out.  CPU machines time the C++ backend at small sizes (float32); GPU
machines time the Triton backend (one weight sample per convolution fed to cuDNN) at the Stable Diffusion 1.5
resnet shapes (batch 2: 64x64x320, 32x32x640, 16x16x1280) in bfloat16, float32 parameters.
"""
import pytest
import torch

import bnn_kernels as bk
from layers import (CONV_VARIANTS, CPU_CONV_SHAPES, DEVICE, DTYPE, ON_GPU, SD15_CONV_SHAPES, forward_backward,
                    make_conv_layer)

SHAPES = SD15_CONV_SHAPES if ON_GPU else CPU_CONV_SHAPES


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_conv2d_forward_backward(benchmark, timed, shape, variant):
    batch, channels, height, width = SHAPES[shape]
    layer = make_conv_layer(batch, channels, height, width, DTYPE, DEVICE)
    grad_y = torch.randn(batch, channels, height, width, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"conv2d 3x3 fwd+bwd {shape} {DTYPE}"
    benchmark.extra_info.update(batch=batch, channels=channels, height=height, width=width, dtype=str(DTYPE),
                                device=str(DEVICE), backend=bk.registry.select(DEVICE))
    timed(lambda: forward_backward(variant, *layer, grad_y, variants=CONV_VARIANTS))
