"""Ratios measured in one run: Bayesian LoRA linear fwd+bwd time and saved bytes against a PEFT-style LoRA and a
paper-style Bayesian LoRA (B materialised), all on the same frozen base.

    python benchmarks/lora_ratios.py                      # CPU: the C++ backend, small shapes, float32
    python benchmarks/lora_ratios.py --json out.json      # on a GPU: Triton, SD1.5 attention shapes, bfloat16

Rank 4, B Bayesian, float32 factors.  Each variant is timed as the median of ``--repeats`` steps after warm-up
(CUDA events on a GPU, perf_counter on CPU), interleaved round-robin (linear_ratios.time_variants).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bnn_kernels as bk  # noqa: E402
from layers import (CPU_LORA_SHAPES, LORA_RANK, LORA_VARIANTS, SD15_LORA_SHAPES, lora_forward_backward,  # noqa: E402
                    lora_saved_bytes, make_lora_layer)
from linear_ratios import environment, time_variants  # noqa: E402

RATIOS = {  # name: (numerator, denominator)
    "reparam_over_peft": ("fused-lora-reparam", "peft-lora"),
    "lrt_over_peft": ("fused-lora-lrt", "peft-lora"),
    "paper_over_reparam": ("paper-lora", "fused-lora-reparam"),
    "peft_over_base": ("peft-lora", "F.linear"),
    "reparam_over_base": ("fused-lora-reparam", "F.linear"),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    shapes = SD15_LORA_SHAPES if device.type == "cuda" else CPU_LORA_SHAPES
    variants = list(LORA_VARIANTS)
    results = {"environment": environment(device), "dtype": str(dtype), "rank": LORA_RANK, "repeats": repeats,
               "shapes": {}}
    print(f"# {results['environment']}  dtype={dtype}  rank={LORA_RANK}  backend={bk.registry.select(device)}")
    print(f"{'shape':>18} " + " ".join(f"{v + ' ms':>20}" for v in variants) + " "
          + " ".join(f"{name:>19}" for name in RATIOS) + f" {'saved KiB peft/paper/reparam/lrt':>34}")
    for name, (m, n, k) in shapes.items():
        layer = make_lora_layer(m, n, k, dtype, device)
        grad_y = torch.randn(m, n, device=device, dtype=dtype)
        seconds = time_variants(lambda variant: lora_forward_backward(variant, layer, grad_y), device, repeats,
                                args.warmup, variants)
        saved = {variant: lora_saved_bytes(variant, layer) for variant in variants}
        ratios = {ratio: seconds[top] / seconds[bottom] for ratio, (top, bottom) in RATIOS.items()}
        results["shapes"][name] = {"m": m, "n": n, "k": k, "seconds": seconds, "saved_bytes": saved,
                                   "ratios": ratios}
        kib = "/".join(f"{saved[v] / 2**10:.1f}" for v in ("peft-lora", "paper-lora", "fused-lora-reparam",
                                                           "fused-lora-lrt"))
        print(f"{name:>18} " + " ".join(f"{1e3 * seconds[v]:20.3f}" for v in variants) + " "
              + " ".join(f"{ratios[r]:19.2f}" for r in RATIOS) + f" {kib:>34}")
        del layer, grad_y
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
