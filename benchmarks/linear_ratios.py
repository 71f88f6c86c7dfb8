"""Ratios measured in one run: Bayesian linear fwd+bwd time and saved bytes against F.linear and a paper-style layer.

    python benchmarks/linear_ratios.py                      # CPU: the C++ backend, small shapes, float32
    python benchmarks/linear_ratios.py --json out.json      # on a GPU: Triton, SD1.5 shapes, bfloat16

Each variant is timed as the median of ``--repeats`` steps after warm-up (CUDA events on a GPU,
perf_counter on CPU), interleaved round-robin so that clock drift hits every variant alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bnn_kernels as bk  # noqa: E402
from layers import (CPU_LINEAR_SHAPES, FORCED_TRITON_REPARAM, SD15_LINEAR_SHAPES, forward_backward,  # noqa: E402
                    make_layer, saved_bytes)

BASE_VARIANTS = ["F.linear", "paper-style", "fused-reparam", "fused-lrt"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "backends": bk.backends(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def time_variants(step, device, repeats: int, warmup: int, variants) -> dict:
    """Median seconds of ``step(variant)`` per variant, the variants interleaved round-robin."""
    def one(variant):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(variant)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        step(variant)
        return time.perf_counter() - begin

    for _ in range(warmup):
        for variant in variants:
            one(variant)
    samples = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            samples[variant].append(one(variant))
    return {variant: statistics.median(times) for variant, times in samples.items()}


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
    shapes = SD15_LINEAR_SHAPES if device.type == "cuda" else CPU_LINEAR_SHAPES
    # on a GPU (the triton backend) both reparam variants are also timed on their own
    variants = BASE_VARIANTS + (list(FORCED_TRITON_REPARAM) if bk.registry.select(device) == "triton" else [])
    results = {"environment": environment(device), "dtype": str(dtype), "repeats": repeats, "shapes": {}}
    print(f"# {results['environment']}  dtype={dtype}  backend={bk.registry.select(device)}")
    print(f"{'shape':>22} {'F.linear ms':>12} {'paper ms':>9} {'reparam ms':>11} {'lrt ms':>8} "
          f"{'reparam/lin':>12} {'lrt/lin':>8} {'paper/reparam':>14} {'paper/lrt':>10} {'saved MB paper/reparam/lrt':>28}")
    for name, (m, n, k) in shapes.items():
        layer = make_layer(m, n, k, dtype, device)
        grad_y = torch.randn(m, n, device=device, dtype=dtype)
        seconds = time_variants(lambda variant: forward_backward(variant, *layer, grad_y), device, repeats,
                                args.warmup, variants)
        saved = {variant: saved_bytes(variant, *layer) for variant in variants}
        ratios = {
            "reparam_over_linear": seconds["fused-reparam"] / seconds["F.linear"],
            "lrt_over_linear": seconds["fused-lrt"] / seconds["F.linear"],
            "paper_over_reparam": seconds["paper-style"] / seconds["fused-reparam"],
            "paper_over_lrt": seconds["paper-style"] / seconds["fused-lrt"],
        }
        for variant in FORCED_TRITON_REPARAM:
            if variant in seconds:
                ratios[f"{variant}_over_linear"] = seconds[variant] / seconds["F.linear"]
        results["shapes"][name] = {"m": m, "n": n, "k": k, "seconds": seconds, "saved_bytes": saved, "ratios": ratios}
        ms = {v: 1e3 * s for v, s in seconds.items()}
        mb = "/".join(f"{saved[v] / 2**20:.2f}" for v in ("paper-style", "fused-reparam", "fused-lrt"))
        print(f"{name:>22} {ms['F.linear']:12.3f} {ms['paper-style']:9.3f} {ms['fused-reparam']:11.3f} "
              f"{ms['fused-lrt']:8.3f} {ratios['reparam_over_linear']:12.2f} {ratios['lrt_over_linear']:8.2f} "
              f"{ratios['paper_over_reparam']:14.2f} {ratios['paper_over_lrt']:10.2f} {mb:>28}")
        for variant in FORCED_TRITON_REPARAM:
            if variant in seconds:
                print(f"{'':>22} {variant}: {ms[variant]:.3f} ms, {ratios[variant + '_over_linear']:.2f}x F.linear")
        del layer, grad_y
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
