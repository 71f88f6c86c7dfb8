"""Ratios measured in one run: Bayesian linear fwd+bwd time and saved bytes against F.linear and a paper-style layer.

    python benchmarks/linear_ratios.py                      # CPU: the C++ backend, small shapes, float32
    python benchmarks/linear_ratios.py --json out.json      # on a GPU: Triton, SD1.5 shapes, bfloat16

Each variant is timed as the median of ``--repeats`` samples after warm-up (on a GPU a burst of steps queued back
to back between CUDA events, on CPU one step), interleaved round-robin so that clock drift hits every variant alike
(ratios.time_variants).
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bnn_kernels as bk  # noqa: E402
from layers import (CPU_LINEAR_SHAPES, FORCED_TRITON_VARIANTS, SD15_LINEAR_SHAPES, forward_backward,  # noqa: E402
                    make_layer, saved_bytes)
from ratios import Case, errors_against_oracle, run_ratio_table  # noqa: E402

BASE_VARIANTS = ["F.linear", "paper-style", "fused-reparam", "fused-lrt"]
RATIOS = {  # name: (numerator, denominator); the forced triton variants only where they are timed
    "reparam_over_linear": ("fused-reparam", "F.linear"),
    "lrt_over_linear": ("fused-lrt", "F.linear"),
    "paper_over_reparam": ("paper-style", "fused-reparam"),
    "paper_over_lrt": ("paper-style", "fused-lrt"),
    **{f"{variant}_over_linear": (variant, "F.linear") for variant in FORCED_TRITON_VARIANTS},
}


def variants(device: torch.device) -> list:
    # on a GPU (the triton backend) each forced reparam and lrt variant is also timed on its own
    return BASE_VARIANTS + (list(FORCED_TRITON_VARIANTS) if bk.registry.select(device) == "triton" else [])


def make_case(shape, dtype, device) -> Case:
    m, n, k = shape
    layer = make_layer(m, n, k, dtype, device)
    grad_y = torch.randn(m, n, device=device, dtype=dtype)
    return Case(step=lambda variant: forward_backward(variant, *layer, grad_y),
                saved=lambda variant: saved_bytes(variant, *layer), record={"m": m, "n": n, "k": k},
                check=lambda names: errors_against_oracle(lambda v, ts, g: forward_backward(v, *ts, g), layer,
                                                          grad_y, names))


def main(argv=None) -> dict:
    return run_ratio_table(argv, description=__doc__.splitlines()[0], gpu_shapes=SD15_LINEAR_SHAPES,
                           cpu_shapes=CPU_LINEAR_SHAPES, variants=variants, make_case=make_case, ratios=RATIOS,
                           saved_unit="MiB", saved_variants=("paper-style", "fused-reparam", "fused-lrt"),
                           checked=("fused-reparam", "fused-lrt", *FORCED_TRITON_VARIANTS))


if __name__ == "__main__":
    main()
