"""Ratios measured in one run: Bayesian conv2d fwd+bwd time and saved bytes against F.conv2d and a paper-style layer.

    python benchmarks/conv_ratios.py                      # CPU: the C++ backend, small shapes, float32
    python benchmarks/conv_ratios.py --json out.json      # on a GPU: Triton + cuDNN, SD1.5 resnet shapes, bfloat16

A 3x3, stride 1, padding 1 conv, C_in = C_out, float32 parameters.  Each variant is timed as the median of
``--repeats`` samples after warm-up (on a GPU a burst of steps queued back to back between CUDA events, on CPU one
step), interleaved round-robin (ratios.time_variants).
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layers import (CONV_VARIANTS, CPU_CONV_SHAPES, SD15_CONV_SHAPES, forward_backward, make_conv_layer,  # noqa: E402
                    saved_bytes)
from ratios import Case, errors_against_oracle, run_ratio_table  # noqa: E402

RATIOS = {  # name: (numerator, denominator)
    "reparam_over_conv": ("fused-reparam", "F.conv2d"),
    "lrt_over_conv": ("fused-lrt", "F.conv2d"),
    "paper_over_conv": ("paper-style", "F.conv2d"),
    "paper_over_reparam": ("paper-style", "fused-reparam"),
}


def make_case(shape, dtype, device) -> Case:
    batch, channels, height, width = shape
    layer = make_conv_layer(batch, channels, height, width, dtype, device)
    grad_y = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
    return Case(step=lambda variant: forward_backward(variant, *layer, grad_y, variants=CONV_VARIANTS),
                saved=lambda variant: saved_bytes(variant, *layer, variants=CONV_VARIANTS),
                record={"batch": batch, "channels": channels, "height": height, "width": width, "kernel": 3},
                check=lambda names: errors_against_oracle(
                    lambda v, ts, g: forward_backward(v, *ts, g, variants=CONV_VARIANTS), layer, grad_y, names))


def main(argv=None) -> dict:
    return run_ratio_table(argv, description=__doc__.splitlines()[0], gpu_shapes=SD15_CONV_SHAPES,
                           cpu_shapes=CPU_CONV_SHAPES, variants=lambda device: list(CONV_VARIANTS),
                           make_case=make_case, ratios=RATIOS, saved_unit="MiB",
                           saved_variants=("paper-style", "fused-reparam", "fused-lrt"),
                           checked=("fused-reparam", "fused-lrt"))


if __name__ == "__main__":
    main()
