"""The one-run ratio tables of linear_ratios.py, conv_ratios.py and lora_ratios.py: the command line, the machine
description, the interleaved timing, the table printed per shape and the JSON written at the end.

Each variant is timed as the median of ``--repeats`` samples after warm-up, interleaved round-robin so that clock
drift hits every variant alike.  On CPU a sample is one step (perf_counter).  On a GPU it is a burst of steps
queued back to back between two CUDA events, with no synchronisation inside (as a training loop queues its
kernels), divided by the burst's length: long enough for the GPU to run about ``BURST_SECONDS``, so a small shape
is not timed as the host's launch latency after an empty queue.  Where the host cannot queue the steps as fast as
the GPU runs them, the sample is the host's time: the throughput a training loop would get.
"""
from __future__ import annotations

import argparse
import contextlib
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
        "backend": bk.registry.select(device),  # what the fused variants ran on
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


BURST_SECONDS = 2e-3  # GPU time per timed sample (module docstring)
MAX_BURST = 100


def time_variants(step, device, repeats: int, warmup: int, variants) -> dict:
    """Median seconds of ``step(variant)`` per variant, the variants interleaved round-robin (module docstring)."""
    def one(variant, burst=1):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(burst):
                step(variant)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / burst
        begin = time.perf_counter()
        step(variant)
        return time.perf_counter() - begin

    for _ in range(warmup):
        for variant in variants:
            one(variant)
    bursts = {variant: 1 for variant in variants}
    if device.type == "cuda":  # from one step each (warm: compiled and autotuned)
        bursts = {variant: max(1, min(MAX_BURST, round(BURST_SECONDS / max(one(variant), 1e-7))))
                  for variant in variants}
    samples = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            samples[variant].append(one(variant, bursts[variant]))
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
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile every Triton kernel (every autotune config) the table would launch, into "
                             "Triton's cache, and time nothing: run beside other work before the timed run")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    shapes = gpu_shapes if device.type == "cuda" else cpu_shapes
    timed = list(variants(device))
    if args.compile_only:
        return compile_table(shapes, make_case, timed, dtype, device)
    ratios = {name: pair for name, pair in ratios.items() if set(pair) <= set(timed)}
    info = dict(info or {})
    results = {"environment": environment(device), "dtype": str(dtype), **info, "repeats": repeats, "shapes": {}}
    row = _RowFormat(saved_unit, saved_variants, max(len("shape"), *(len(name) for name in shapes)), timed,
                     list(ratios))
    extras = "".join(f"  {key}={value}" for key, value in info.items())
    print(f"# {results['environment']}  dtype={dtype}{extras}  backend={bk.registry.select(device)}")
    print(row.header())
    if args.json:  # the machine and settings even if the first shape never finishes
        write_json(args.json, results)
    for name, shape in shapes.items():
        try:
            results["shapes"][name] = _measure_shape(name, shape, make_case, dtype, device, timed, repeats,
                                                     args.warmup, ratios, checked, row)
        finally:  # after every shape, whatever became of it: a run stopped by a time limit keeps what it measured
            if args.json:
                write_json(args.json, results)
    if args.json:
        print(f"wrote {args.json}")
    return results


class _RowFormat(NamedTuple):
    """How a table prints: the saved-bytes unit and variants, the shape column's width, the timed variants and
    the ratios (a variant or ratio a shape lacks prints as "-")."""
    saved_unit: str
    saved_variants: tuple
    name_width: int
    timed: list
    ratios: list

    def header(self) -> str:
        columns = [f"{variant} ms" for variant in self.timed]
        return (f"{'shape':>{self.name_width}}  " + "  ".join(columns) + "  " + "  ".join(self.ratios)
                + f"  {self.saved_title}")

    @property
    def saved_title(self) -> str:
        return f"saved {self.saved_unit} " + "/".join(self.saved_variants)

    def line(self, name: str, seconds: dict, ratios: dict, saved: dict) -> str:
        divisor, decimals = SAVED_UNITS[self.saved_unit]
        amounts = "/".join(f"{saved[v] / divisor:.{decimals}f}" if v in saved else "-" for v in self.saved_variants)
        times = (f"{1e3 * seconds[v]:>{len(v) + 3}.3f}" if v in seconds else f"{'-':>{len(v) + 3}}"
                 for v in self.timed)
        shown = (f"{ratios[r]:>{len(r)}.2f}" if r in ratios else f"{'-':>{len(r)}}" for r in self.ratios)
        return (f"{name:>{self.name_width}}  " + "  ".join(times) + "  " + "  ".join(shown)
                + f"  {amounts:>{len(self.saved_title)}}")

    def note(self, text: str) -> str:
        return f"{'':>{self.name_width}}  {text}"


def _measure_shape(name, shape, make_case, dtype, device, timed, repeats, warmup, ratios, checked,
                   row: _RowFormat) -> dict:
    """One shape's record: each variant's median time, saved bytes and ratios, the float64 check, and what failed.
    A variant that raises (once, alone, synchronised so that an asynchronous fault is its own) is recorded under
    "failed" and left out; a case that cannot be built or timed gives {"error": ...}: the table goes on."""
    try:
        case = make_case(shape, dtype, device)
    except Exception as error:  # noqa: BLE001 - recorded; the other shapes still run
        print(row.note(f"{name}: cannot build the case: {_describe_error(error)}"))
        return {"error": _describe_error(error)}
    failed = {}
    for variant in timed:
        try:
            case.step(variant)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as error:  # noqa: BLE001
            failed[variant] = _describe_error(error)
            print(row.note(f"{name}: {variant} failed: {failed[variant]}"))
    running = [v for v in timed if v not in failed]
    try:
        seconds = time_variants(case.step, device, repeats, warmup, running) if running else {}
    except Exception as error:  # noqa: BLE001 - a variant that ran once but not again: the shape is lost
        print(row.note(f"{name}: timing failed: {_describe_error(error)}"))
        return {**case.record, "error": _describe_error(error), "failed": failed}
    saved = {}
    for variant in running:
        try:
            saved[variant] = case.saved(variant)
        except Exception as error:  # noqa: BLE001 - its time stands; its saved bytes are unknown
            failed[variant] = f"saved bytes: {_describe_error(error)}"
    shape_ratios = {ratio: seconds[top] / seconds[bottom] for ratio, (top, bottom) in ratios.items()
                    if top in seconds and bottom in seconds}
    record = {**case.record, "seconds": seconds, "saved_bytes": saved, "ratios": shape_ratios,
              **({"failed": failed} if failed else {})}
    if case.check is not None:  # after the timing: the kernels' configs are the ones autotune picked
        try:
            errors = case.check([v for v in running if v in checked])
        except Exception as error:  # noqa: BLE001
            errors = {"error": _describe_error(error)}
            print(row.note(f"the float64 check failed: {errors['error']}"))
        else:
            print(row.note(f"max relative error vs float64 (plain torch in {dtype}): " + "  ".join(
                f"{variant} {max(e[0] for e in values.values()):.2g} ({max(e[1] for e in values.values()):.2g})"
                for variant, values in errors.items())))
        record["errors_vs_float64"] = errors
    print(row.line(name, seconds, shape_ratios, saved))
    return record


def _describe_error(error: Exception) -> str:
    """The exception's type and the last line of its message (Triton's compile errors run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500]


@contextlib.contextmanager
def compiling_for_this_gpu(device: torch.device):
    """Inside: the ops run on the triton backend, and every Triton launch compiles (every autotune config) for
    ``device``'s GPU, sm_90 where there is none, into Triton's cache instead of running
    (``bnn_kernels.triton.aot.capture``: the JIT's own path, so the same cache entries as real launches); yields
    the list of compiles.  The import needs TRITON_INTERPRET=0."""
    from bnn_kernels.triton import aot, common

    with aot.capture(arch=common.compute_capability(device) or 90, autotune_configs="all") as launches, \
            bk.use_backend("triton"):
        yield launches


def compile_table(shapes: dict, make_case: Callable[..., Case], variants: list, dtype, device) -> dict:
    """--compile-only: run each variant's step once per shape inside ``compiling_for_this_gpu``, so that the timed
    run that follows finds its kernels in Triton's cache: the same shapes, dtypes and flags, so the same
    specialisations.  Returns {shape: kernels compiled}."""
    compiled, begin = {}, time.perf_counter()
    for name, shape in shapes.items():
        with compiling_for_this_gpu(device) as launches:
            case = make_case(shape, dtype, device)
            for variant in variants:
                try:
                    case.step(variant)
                    if device.type == "cuda":  # an asynchronous fault is this variant's, not the next one's
                        torch.cuda.synchronize(device)
                except Exception as error:  # noqa: BLE001 - the timed run reports it
                    print(f"{name}: {variant} failed to compile: {_describe_error(error)}")
        compiled[name] = len(launches)
        print(f"{name}: {len(launches)} kernel compiles ({time.perf_counter() - begin:.0f} s so far)")
        del case
    return compiled


def write_json(path: str, results: dict) -> None:
    """``results`` to ``path`` through a temporary file and a rename: the file is whole at any moment."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(temporary, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(temporary, path)
