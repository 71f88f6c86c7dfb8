"""The one-run ratio tables of linear_ratios.py, conv_ratios.py and lora_ratios.py: the command line, the machine
description, the interleaved timing, the table printed per shape and the JSON written at the end.

Each variant is timed as the median of ``--repeats`` steps after warm-up (CUDA events on a GPU, perf_counter on
CPU), interleaved round-robin so that clock drift hits every variant alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

import bnn_kernels as bk

SAVED_UNITS = {"KiB": (2**10, 1), "MiB": (2**20, 2)}  # unit: (bytes, decimals printed)


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


class Case(NamedTuple):
    """One shape of a table: ``step(variant)`` runs a fwd+bwd step, ``saved(variant)`` gives the bytes autograd
    keeps for backward, ``record`` the shape's fields written to the JSON; ``check(variants)``, where given, the
    errors of those variants against a float64 oracle (``errors_against_oracle``)."""
    step: Callable[[str], object]
    saved: Callable[[str], int]
    record: dict
    check: Optional[Callable[[list], dict]] = None


def _relative_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    scale = oracle.abs().max().item()
    error = (value.double() - oracle).abs().max().item()
    return error / scale if scale > 0 else error


def errors_against_oracle(step: Callable[[str, tuple, torch.Tensor], dict], layer: tuple, grad_y: torch.Tensor,
                          variants: list) -> dict:
    """Per variant and output (y, the KL, every gradient): [its error, plain torch's error] against a float64
    oracle, each error max |value - oracle| / max |oracle|.  The variant runs as timed (after autotuning picked
    its kernels' configs); the oracle is the same call on the reference backend with float64 copies of the inputs
    (the same seed: the same noise); plain torch is the reference backend in the benchmark's own dtypes, the
    precision to judge the variant by (the tests' rule: at most about twice its error).  ``step(variant, layer,
    grad_y)`` returns the step's tensors by name."""
    def as_float64(tensor):
        return tensor.detach().double().requires_grad_(tensor.requires_grad)

    layer64 = tuple(as_float64(t) for t in layer)
    errors = {}
    for variant in variants:
        with bk.use_backend("reference"):
            oracle = step(variant, layer64, grad_y.double())
            plain = step(variant, layer, grad_y)
        measured = step(variant, layer, grad_y)
        errors[variant] = {name: [_relative_error(measured[name], value), _relative_error(plain[name], value)]
                           for name, value in oracle.items() if value is not None}
    return errors


def run_ratio_table(argv, *, description: str, gpu_shapes: dict, cpu_shapes: dict,
                    variants: Callable[[torch.device], list], make_case: Callable[..., Case], ratios: dict,
                    saved_unit: str, saved_variants: tuple, info: Optional[dict] = None,
                    checked: tuple = ()) -> dict:
    """Time every variant on every shape (``make_case(shape, dtype, device)``), print one table row per shape and
    return (and with ``--json``, write) the results.  ``ratios`` maps a name to (numerator, denominator) variants;
    a ratio whose variants are not timed here is left out.  ``info``: extra run-wide fields (printed and written).
    ``checked``: the variants whose results are compared with the float64 oracle (``Case.check``) per shape."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    shapes = gpu_shapes if device.type == "cuda" else cpu_shapes
    timed = list(variants(device))
    ratios = {name: pair for name, pair in ratios.items() if set(pair) <= set(timed)}
    info = dict(info or {})
    results = {"environment": environment(device), "dtype": str(dtype), **info, "repeats": repeats, "shapes": {}}
    divisor, decimals = SAVED_UNITS[saved_unit]
    saved_title = f"saved {saved_unit} " + "/".join(saved_variants)
    name_width = max(len("shape"), *(len(name) for name in shapes))
    columns = [f"{variant} ms" for variant in timed]
    extras = "".join(f"  {key}={value}" for key, value in info.items())
    print(f"# {results['environment']}  dtype={dtype}{extras}  backend={bk.registry.select(device)}")
    print(f"{'shape':>{name_width}}  " + "  ".join(columns) + "  " + "  ".join(ratios) + f"  {saved_title}")
    for name, shape in shapes.items():
        case = make_case(shape, dtype, device)
        seconds = time_variants(case.step, device, repeats, args.warmup, timed)
        saved = {variant: case.saved(variant) for variant in timed}
        shape_ratios = {ratio: seconds[top] / seconds[bottom] for ratio, (top, bottom) in ratios.items()}
        results["shapes"][name] = {**case.record, "seconds": seconds, "saved_bytes": saved, "ratios": shape_ratios}
        if case.check is not None:  # after the timing: the kernels' configs are the ones autotune picked
            errors = case.check([v for v in timed if v in checked])
            results["shapes"][name]["errors_vs_float64"] = errors
            print(f"{'':>{name_width}}  max relative error vs float64 (plain torch in {dtype}): " + "  ".join(
                f"{variant} {max(e[0] for e in values.values()):.2g} ({max(e[1] for e in values.values()):.2g})"
                for variant, values in errors.items()))
        amounts = "/".join(f"{saved[v] / divisor:.{decimals}f}" for v in saved_variants)
        print(f"{name:>{name_width}}  "
              + "  ".join(f"{1e3 * seconds[v]:>{len(c)}.3f}" for v, c in zip(timed, columns)) + "  "
              + "  ".join(f"{shape_ratios[r]:>{len(r)}.2f}" for r in ratios)
              + f"  {amounts:>{len(saved_title)}}")
        del case  # the shape's tensors go before the next shape allocates its own
        if args.json:  # after every shape: a run stopped by a time limit keeps what it measured
            write_json(args.json, results)
    if args.json:
        print(f"wrote {args.json}")
    return results


def write_json(path: str, results: dict) -> None:
    """``results`` to ``path`` through a temporary file and a rename: the file is whole at any moment."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(temporary, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(temporary, path)
