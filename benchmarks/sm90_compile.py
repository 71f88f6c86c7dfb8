"""Every Triton kernel of bnn_kernels compiled for sm_90 (H100/H200), or another GPU (``--arch``), by the real
Triton compiler on a machine without a GPU: registers, stack frame, spills, tensor-core instructions, shared memory
against what one block may use on that GPU.

    python benchmarks/sm90_compile.py                          # every autotune config, bfloat16, the layer ops
    python benchmarks/sm90_compile.py --configs first --dtypes float32 bfloat16 float16 --json out.json
    python benchmarks/sm90_compile.py --arch 86 --cases '^lora' --lora-ranks 16 64   # RTX 30xx, the LoRA kernels
    python benchmarks/sm90_compile.py --arch 86 --cases '^lora' --lora-ranks 128 --fused-max-rank 128  # what-if
    python benchmarks/sm90_compile.py --arch 75 --variants auto --dtypes float16   # what a T4 runs

Each launcher of the triton backend is called on CPU tensors inside ``bnn_kernels.triton.aot.capture``: its kernel
launches compile (nothing runs; the outputs stay unwritten) with the signature, constexprs and alignment a launch
of the same arguments on a GPU would get.  Spills are ptxas's "bytes spill stores/loads"; a stack frame without
them is libdevice's sin/cos slow path, which Box-Muller never takes (bnn_kernels/triton/aot.py).  Tensor-core
instructions are counted in the PTX; ``--check-sass`` also counts them in the SASS (``cuobjdump``, slower) into
each record's ``sass_tensor_core_instructions``.  Compile seconds are near 0 where Triton's cache (~/.triton/cache)
already held the kernel.  The sizes are SD 1.5-like multiples of 16 (the alignment-specialised code the UNet runs);
they do not change the code otherwise.  Prints one row per compiled kernel and config, and a summary per kernel;
``--json`` writes every record with the Triton version.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Iterator, List, NamedTuple

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, before anything imports triton

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bnn_kernels.triton as backend  # noqa: E402
from bnn_kernels.triton import aot  # noqa: E402
from ratios import environment  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (bias, prior mean, sigma_param): the first is the paper presets' layer (bias, pretrained prior, sigma stored
# directly); the second takes every other branch of the kernels' flags
FLAG_SETS = ((True, True, "direct"), (False, False, "softplus"))


class Case(NamedTuple):
    """One call of a backend launcher pair (forward then backward) on CPU tensors."""

    label: str
    run: Callable[[], None]


def _seed() -> torch.Tensor:
    return torch.tensor(1234, dtype=torch.int64)


def _posterior(shape, has_prior):
    mu = torch.randn(shape) * 0.05
    rho = torch.full(shape, 0.01)
    return mu, rho, (mu.clone() if has_prior else None)


def _linear(dtype, estimator, variant, has_bias, has_prior, sigma_param, m=512, n=1280, k=320):
    def run():
        os.environ[backend.linear.REPARAM_ENV if estimator == "reparam" else backend.linear.LRT_ENV] = variant
        x = torch.randn(m, k, dtype=dtype)
        mu, rho, prior = _posterior((n, k), has_prior)
        bias = torch.randn(n) if has_bias else None
        y, _, std = backend.linear_fwd(x, mu, rho, bias, prior, _seed(), 0.01, sigma_param, estimator)
        backend.linear_bwd(torch.randn_like(y), torch.tensor(1.0), x, mu, rho, prior, _seed(), std, 0.01,
                           sigma_param, estimator, True)
    return run


def _conv(dtype, estimator, has_bias, has_prior, sigma_param):
    def run():
        x = torch.randn(2, 64, 16, 16, dtype=dtype)
        mu, rho, prior = _posterior((64, 64, 3, 3), has_prior)
        bias = torch.randn(64) if has_bias else None
        geometry = ((1, 1), (1, 1), (1, 1), 1)  # stride, padding, dilation, groups as ops.py normalises them
        y, _, std = backend.conv_fwd(x, mu, rho, bias, prior, _seed(), *geometry, 0.01, sigma_param, estimator)
        backend.conv_bwd(torch.randn_like(y), torch.tensor(1.0), x, mu, rho, prior, _seed(), std, *geometry, 0.01,
                         sigma_param, estimator, True)
    return run


def _lora(dtype, estimator, bayes, has_bias, sigma_param, m=512, n=640, k=320, rank=4, base_dtype=None):
    def run():
        x = torch.randn(m, k, dtype=dtype)
        weight = torch.randn(n, k, dtype=base_dtype or dtype) * 0.05
        bias = torch.randn(n, dtype=base_dtype or dtype) if has_bias else None
        lora_a, lora_b = torch.randn(rank, k) * 0.05, torch.randn(n, rank) * 0.05
        rho = torch.full((rank, k) if bayes == "A" else (n, rank), 0.01)
        y, _, h, aux = backend.lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, _seed(), 0.25, bayes, 0.01,
                                               sigma_param, estimator)
        backend.lora_linear_bwd(torch.randn_like(y), torch.tensor(1.0), x, weight, lora_a, lora_b, rho, _seed(), h,
                                aux, 0.25, bayes, 0.01, sigma_param, estimator, True)
    return run


def _kl_and_noise(has_prior, sigma_param):
    def run():
        mu, rho, prior = _posterior((1280, 320), has_prior)
        backend.gaussian_kl_fwd(mu, rho, prior, 0.01, sigma_param)
        backend.gaussian_kl_bwd(torch.tensor(1.0), mu, rho, prior, 0.01, sigma_param)
        backend.philox_normal(_seed(), 4096, 7, "cpu")
    return run


# (estimator, variant) of the linear cases: each variant forced, or what the library picks on the target ("auto")
LINEAR_VARIANTS = {"every": (("reparam", "fused"), ("reparam", "transient"), ("lrt", "fused"), ("lrt", "composition")),
                   "auto": (("reparam", "auto"), ("lrt", "auto"))}


def cases(dtypes: List[str], flag_sets=FLAG_SETS, lora_ranks=(4,), variants="every",
          lora_base: str = "same") -> Iterator[Case]:
    """Every launcher and estimator (and each linear variant, or the library's pick), per dtype and flag set; the
    LoRA ops at each rank, over a frozen weight in x's dtype (``lora_base`` "same") or in ``lora_base``."""
    base_dtype = None if lora_base == "same" else DTYPES[lora_base]
    base = "" if base_dtype is None else f" base={lora_base}"
    for has_prior, sigma_param in sorted({(prior, sigma) for _, prior, sigma in flag_sets}):
        yield Case(f"kl+philox prior={has_prior} {sigma_param}", _kl_and_noise(has_prior, sigma_param))
    for name in dtypes:
        dtype = DTYPES[name]
        for has_bias, has_prior, sigma_param in flag_sets:
            flags = f"{name} bias={has_bias} prior={has_prior} {sigma_param}"
            for estimator, variant in LINEAR_VARIANTS[variants]:
                label = f"linear {estimator}/{variant}"
                yield Case(f"{label} {flags}", _linear(dtype, estimator, variant, has_bias, has_prior, sigma_param))
            for estimator in ("reparam", "lrt"):
                yield Case(f"conv {estimator} {flags}", _conv(dtype, estimator, has_bias, has_prior, sigma_param))
                for bayes in ("A", "B"):
                    for rank in lora_ranks:
                        yield Case(f"lora r{rank} {estimator} bayes={bayes} {name}{base} bias={has_bias} "
                                   f"{sigma_param}",
                                   _lora(dtype, estimator, bayes, has_bias, sigma_param, rank=rank,
                                         base_dtype=base_dtype))


def compile_all(dtypes: List[str], configs: str, arch: int, flag_sets=FLAG_SETS, lora_ranks=(4,),
                case_pattern: str = "", variants: str = "every", lora_base: str = "same",
                check_sass: bool = False) -> List[dict]:
    """Run every case (those whose label matches ``case_pattern``, a regular expression) inside ``aot.capture``; one
    record per compiled (kernel, specialisation, config), with the SASS's tensor-core count too if ``check_sass``."""
    records, seen = [], set()
    variant_envs = (backend.linear.REPARAM_ENV, backend.linear.LRT_ENV)
    saved = {env: os.environ.get(env) for env in variant_envs}
    try:
        for case in cases(dtypes, flag_sets, lora_ranks, variants, lora_base):
            if not re.search(case_pattern, case.label):
                continue
            with aot.capture(arch=arch, autotune_configs=configs) as launches:
                case.run()
            for launch in launches:
                key = (launch.kernel, json.dumps(launch.constexprs, sort_keys=True),
                       json.dumps(launch.options, sort_keys=True), json.dumps(launch.pointer_dtypes, sort_keys=True))
                if key in seen:  # the same kernel again (Triton's in-process cache): one record
                    continue
                seen.add(key)
                record = {"case": case.label, **launch.resources().summary()}
                record["fits_shared_memory"] = record["shared_bytes"] <= aot.SHARED_MEMORY_PER_BLOCK[arch]
                if check_sass:
                    record["sass_tensor_core_instructions"] = launch.sass_tensor_core_count()
                records.append(record)
    finally:
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value
    return records


def _config_text(record: dict) -> str:
    """E.g. "M128 N64 K32 w8 s3": the tile sizes (BLOCK_M -> M, BLOCK -> B, ...), warps and pipeline stages."""
    blocks = " ".join(f"{k.replace('BLOCK_', '').replace('BLOCK', 'B')}{v}"
                      for k, v in record["constexprs"].items() if k.startswith("BLOCK"))
    options = record["options"]
    return f"{blocks} w{options.get('num_warps', '-')} s{options.get('num_stages', '-')}"


def print_table(records: List[dict]) -> None:
    """One row per record: registers, stack frame and spill bytes (ptxas -v), tensor-core instructions (SASS),
    shared memory, compile seconds."""
    print(f"{'kernel':<26} {'config':<22} {'case':<46} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} "
          f"{'TC':>4} {'smem KiB':>8} {'fits':>4} {'s':>5}")
    for r in records:
        print(f"{r['kernel']:<26} {_config_text(r):<22} {r['case'][:46]:<46} {r['registers']:>4} "
              f"{r['stack_bytes']:>5} {r['spill_store_bytes']:>8} {r['spill_load_bytes']:>8} "
              f"{r['tensor_core_instructions']:>4} {r['shared_bytes'] / 1024:>8.1f} "
              f"{'yes' if r['fits_shared_memory'] else 'NO':>4} {r['compile_seconds']:>5.1f}")


def kernel_summary(records: List[dict]) -> dict:
    """Per kernel: compiled specialisations, max registers, how many of them spill (and the most spilled bytes),
    how many need more shared memory than the GPU gives a block, the fewest tensor-core instructions of any, total
    compile seconds."""
    summary = {}
    for r in records:
        s = summary.setdefault(r["kernel"], {"compiled": 0, "max_registers": 0, "spilling": 0,
                                             "max_spill_store_bytes": 0, "over_shared_memory": 0,
                                             "max_shared_bytes": 0, "min_tensor_core_instructions": None,
                                             "compile_seconds": 0.0})
        s["compiled"] += 1
        s["over_shared_memory"] += int(not r["fits_shared_memory"])
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"])
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["spilling"] += int(r["spill_store_bytes"] > 0)
        s["max_spill_store_bytes"] = max(s["max_spill_store_bytes"], r["spill_store_bytes"])
        tc = r["tensor_core_instructions"]
        s["min_tensor_core_instructions"] = tc if s["min_tensor_core_instructions"] is None else min(
            s["min_tensor_core_instructions"], tc)
        s["compile_seconds"] = round(s["compile_seconds"] + r["compile_seconds"], 2)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(aot.SHARED_MEMORY_PER_BLOCK),
                        help="CUDA compute capability x10 (90: H100/H200; 86, 89, 120: RTX 30xx, 40xx, 50xx; 75: T4, "
                             "RTX 20xx)")
    parser.add_argument("--configs", choices=["all", "first"], default="all",
                        help="autotuned kernels: every config, or only the first")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16"])
    parser.add_argument("--flag-sets", choices=["all", "paper"], default="all",
                        help="kernel flags: the paper presets' (bias, prior mean, sigma direct) and the other branch "
                             "of each flag, or the paper's alone")
    parser.add_argument("--lora-ranks", nargs="+", type=int, default=[4], help="LoRA ranks of the lora cases")
    parser.add_argument("--cases", default="", help="only the cases whose label matches this regular expression, "
                                                   "e.g. '^lora' (default: every case)")
    parser.add_argument("--variants", choices=sorted(LINEAR_VARIANTS), default="every",
                        help="linear cases: each reparam and lrt variant forced, or what the library picks on this "
                             "arch (auto: e.g. cuBLAS below sm_80)")
    parser.add_argument("--lora-variant", choices=["auto", "fused"], default="auto",
                        help="BNN_TRITON_LORA for the lora cases: what the library runs, or the fused kernels in every "
                             "dtype")
    parser.add_argument("--lora-base-dtype", choices=["same", *sorted(DTYPES)], default="same",
                        help="the lora cases' frozen weight: in x's dtype, or in this one (float32: a float32 base "
                             "under 16-bit x)")
    parser.add_argument("--fused-max-rank", type=int, default=None,
                        help="what-if: fuse the LoRA kernels up to this padded rank instead of FUSED_MAX_RANK")
    parser.add_argument("--check-sass", action="store_true",
                        help="also count each kernel's tensor-core instructions in its SASS (cuobjdump), not only in "
                             "its PTX")
    parser.add_argument("--json", default=None, help="write every record here")
    args = parser.parse_args(argv)
    os.environ[backend.lora.LORA_ENV] = args.lora_variant
    if args.fused_max_rank is not None:
        backend.lora.FUSED_MAX_RANK = args.fused_max_rank
    flag_sets = FLAG_SETS if args.flag_sets == "all" else FLAG_SETS[:1]
    records = compile_all(args.dtypes, args.configs, args.arch, flag_sets, tuple(args.lora_ranks), args.cases,
                          args.variants, args.lora_base_dtype, args.check_sass)
    print_table(records)
    summary = kernel_summary(records)
    limit = aot.SHARED_MEMORY_PER_BLOCK[args.arch]
    print("\n# per kernel: specialisations compiled, max registers, how many spill (max spill-store bytes), how many "
          f"need more than the {limit // 1024} KiB of shared memory a block has on sm_{args.arch} (max KiB), "
          "min tensor-core instructions, compile time")
    for name, s in summary.items():
        print(f"{name:<28} {s['compiled']:>3}  regs<={s['max_registers']:<4} spilling {s['spilling']:>2} "
              f"(<= {s['max_spill_store_bytes']:>4} B)  over smem {s['over_shared_memory']:>2} "
              f"(max {s['max_shared_bytes'] / 1024:.0f})  TC>={s['min_tensor_core_instructions']:<3} "
              f"{s['compile_seconds']:.1f} s")
    result = {"environment": {**environment(torch.device("cpu")), "triton": triton.__version__,
                              "ptxas": aot.ptxas_version(args.arch), "target": f"cuda sm_{args.arch}",
                              "shared_memory_per_block": limit},
              "settings": {"configs": args.configs, "dtypes": args.dtypes, "flag_sets": args.flag_sets,
                           "lora_ranks": args.lora_ranks, "cases": args.cases, "variants": args.variants,
                           "lora_variant": args.lora_variant, "lora_base_dtype": args.lora_base_dtype,
                           "fused_max_rank": backend.lora.FUSED_MAX_RANK, "check_sass": args.check_sass},
              "kernels": summary, "records": records}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
