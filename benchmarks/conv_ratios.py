"""Ratios measured in one run: Bayesian conv2d fwd+bwd time and saved bytes against F.conv2d and a paper-style layer.

    python benchmarks/conv_ratios.py                      # CPU: the C++ backend, small shapes, float32
    python benchmarks/conv_ratios.py --json out.json      # on a GPU: Triton + cuDNN, SD1.5 resnet shapes, bfloat16

A 3x3, stride 1, padding 1 conv, C_in = C_out, float32 parameters.  Each variant is timed as the median of
``--repeats`` steps after warm-up (CUDA events on a GPU, perf_counter on CPU), interleaved round-robin
(linear_ratios.time_variants).
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
from layers import (CONV_VARIANTS, CPU_CONV_SHAPES, SD15_CONV_SHAPES, forward_backward, make_conv_layer,  # noqa: E402
                    saved_bytes)
from linear_ratios import environment, time_variants  # noqa: E402

RATIOS = {  # name: (numerator, denominator)
    "reparam_over_conv": ("fused-reparam", "F.conv2d"),
    "lrt_over_conv": ("fused-lrt", "F.conv2d"),
    "paper_over_conv": ("paper-style", "F.conv2d"),
    "paper_over_reparam": ("paper-style", "fused-reparam"),
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
    shapes = SD15_CONV_SHAPES if device.type == "cuda" else CPU_CONV_SHAPES
    variants = list(CONV_VARIANTS)
    results = {"environment": environment(device), "dtype": str(dtype), "repeats": repeats, "shapes": {}}
    print(f"# {results['environment']}  dtype={dtype}  backend={bk.registry.select(device)}")
    print(f"{'shape':>16} " + " ".join(f"{v + ' ms':>16}" for v in variants) + " "
          + " ".join(f"{name:>18}" for name in RATIOS) + f" {'saved MiB paper/reparam/lrt':>28}")
    for name, (batch, channels, height, width) in shapes.items():
        layer = make_conv_layer(batch, channels, height, width, dtype, device)
        grad_y = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
        seconds = time_variants(lambda variant: forward_backward(variant, *layer, grad_y, variants=CONV_VARIANTS),
                                device, repeats, args.warmup, variants)
        saved = {variant: saved_bytes(variant, *layer, variants=CONV_VARIANTS) for variant in variants}
        ratios = {ratio: seconds[top] / seconds[bottom] for ratio, (top, bottom) in RATIOS.items()}
        results["shapes"][name] = {"batch": batch, "channels": channels, "height": height, "width": width,
                                   "kernel": 3, "seconds": seconds, "saved_bytes": saved, "ratios": ratios}
        mib = "/".join(f"{saved[v] / 2**20:.2f}" for v in ("paper-style", "fused-reparam", "fused-lrt"))
        print(f"{name:>16} " + " ".join(f"{1e3 * seconds[v]:16.3f}" for v in variants) + " "
              + " ".join(f"{ratios[r]:18.2f}" for r in RATIOS) + f" {mib:>28}")
        del layer, grad_y
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
