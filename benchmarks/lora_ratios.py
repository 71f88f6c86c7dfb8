"""Ratios measured in one run: Bayesian LoRA linear fwd+bwd time and saved bytes against a PEFT-style LoRA and a
paper-style Bayesian LoRA (B materialised), all on the same frozen base.

    python benchmarks/lora_ratios.py                      # CPU: the C++ backend, small shapes, float32
    python benchmarks/lora_ratios.py --json out.json      # on a GPU: Triton, SD1.5 attention shapes, bfloat16

Rank 4, B Bayesian, float32 factors.  Each variant is timed as the median of ``--repeats`` samples after warm-up
(on a GPU a burst of steps queued back to back between CUDA events, on CPU one step), interleaved round-robin
(ratios.time_variants).
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layers import (CPU_LORA_SHAPES, LORA_RANK, LORA_VARIANTS, SD15_LORA_SHAPES, lora_forward_backward,  # noqa: E402
                    lora_saved_bytes, make_lora_layer)
from ratios import Case, errors_against_oracle, run_ratio_table  # noqa: E402

RATIOS = {  # name: (numerator, denominator)
    "reparam_over_peft": ("fused-lora-reparam", "peft-lora"),
    "lrt_over_peft": ("fused-lora-lrt", "peft-lora"),
    "paper_over_reparam": ("paper-lora", "fused-lora-reparam"),
    "peft_over_base": ("peft-lora", "F.linear"),
    "reparam_over_base": ("fused-lora-reparam", "F.linear"),
}


def make_case(shape, dtype, device) -> Case:
    m, n, k = shape
    layer = make_lora_layer(m, n, k, dtype, device)
    grad_y = torch.randn(m, n, device=device, dtype=dtype)
    return Case(step=lambda variant: lora_forward_backward(variant, layer, grad_y),
                saved=lambda variant: lora_saved_bytes(variant, layer), record={"m": m, "n": n, "k": k},
                check=lambda names: errors_against_oracle(lora_forward_backward, layer, grad_y, names))


def main(argv=None) -> dict:
    return run_ratio_table(argv, description=__doc__.splitlines()[0], gpu_shapes=SD15_LORA_SHAPES,
                           cpu_shapes=CPU_LORA_SHAPES, variants=lambda device: list(LORA_VARIANTS),
                           make_case=make_case, ratios=RATIOS, saved_unit="KiB",
                           saved_variants=("peft-lora", "paper-lora", "fused-lora-reparam", "fused-lora-lrt"),
                           info={"rank": LORA_RANK}, checked=("fused-lora-reparam", "fused-lora-lrt"))


if __name__ == "__main__":
    main()
