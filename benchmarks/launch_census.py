"""How many distinct Triton compilations a test run asks for: what the GPU suite's test stage will compile.

Under Triton's interpreter nothing compiles, so a run on CPU cannot time that; it can count it.  As a pytest plugin
(``-p launch_census``, with this folder on ``PYTHONPATH`` and ``LAUNCH_CENSUS=FILE``) it appends one JSON line per
interpreted kernel launch to FILE: the kernel's name and what Triton specialises a compiled launch on (each
tensor's dtype and 16-byte alignment, each integer's being 1 or a multiple of 16, the constexpr keywords other
than the interpreter's own tile sizes, which autotune supplies on a GPU).  Run as a script it sums FILE up:

    LAUNCH_CENSUS=/tmp/launches.jsonl PYTHONPATH=benchmarks BNN_TRITON_AUTOTUNE=0 TRITON_INTERPRET=1 \\
        python -m pytest -p launch_census tests/test_linear.py ... -k triton
    python benchmarks/launch_census.py /tmp/launches.jsonl [--compile-report benchmarks/results/sm90-compile-triton-3.6.0.json]

With ``--compile-report`` (benchmarks/sm90_compile.py's JSON) it also estimates the serial compile time from each
kernel's mean compile seconds there (kernels it does not list count ``--default-seconds``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os

_INTERPRETER_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _specialisation(value):
    import torch
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value == 1, value % 16 == 0]
    if isinstance(value, float):
        return ["float"]
    return ["other", repr(value)]


def _install(path: str) -> None:
    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        record = {"kernel": self.fn.__name__, "args": [_specialisation(a) for a in args],
                  "constexprs": sorted([k, repr(v)] for k, v in kwargs.items() if k not in _INTERPRETER_META)}
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def pytest_configure(config):
    path = os.environ.get("LAUNCH_CENSUS")
    if path:
        _install(path)


def census(path: str) -> collections.Counter:
    """Distinct specialisations per kernel."""
    seen, per_kernel = set(), collections.Counter()
    with open(path, encoding="utf-8") as log:
        for line in log:
            record = json.loads(line)
            key = json.dumps(record, sort_keys=True)
            if key not in seen:
                seen.add(key)
                per_kernel[record["kernel"]] += 1
    return per_kernel


def mean_compile_seconds(report_path: str) -> dict:
    """Mean compile seconds per kernel over the records of an sm90_compile.py report (cache hits left out)."""
    times = collections.defaultdict(list)
    for record in json.load(open(report_path, encoding="utf-8"))["records"]:
        if record["compile_seconds"] > 0.05:
            times[record["kernel"]].append(record["compile_seconds"])
    return {kernel: sum(values) / len(values) for kernel, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("census", help="the LAUNCH_CENSUS file of a test run")
    parser.add_argument("--compile-report", help="an sm90_compile.py JSON, for the compile-time estimate")
    parser.add_argument("--default-seconds", type=float, default=0.3,
                        help="compile seconds of a kernel the report does not list (default 0.3)")
    args = parser.parse_args(argv)
    per_kernel = census(args.census)
    seconds = mean_compile_seconds(args.compile_report) if args.compile_report else {}
    total = 0.0
    for kernel, count in per_kernel.most_common():
        estimate = count * seconds.get(kernel, args.default_seconds)
        total += estimate
        print(f"{kernel:<28} {count:>4} specialisations" + (f"  ~{estimate:6.1f} s" if seconds else ""))
    print(f"{'total':<28} {sum(per_kernel.values()):>4} specialisations"
          + (f"  ~{total:6.1f} s of serial compilation" if seconds else ""))


if __name__ == "__main__":
    main()
