"""Every Triton kernel compiles for sm_90 (H100/H200), sm_86 (RTX 30xx) and sm_120 (RTX 50xx) with the real Triton
compiler, no GPU needed, and its first autotune config fits the shared memory a block has there; on sm_75 (T4,
RTX 20xx) only the elementwise kernels launch.

The interpreter that runs the other triton-backend tests on CPU never lowers a kernel: type errors, layouts that
do not fit, tl.dot shapes below 16 only show when ptxas runs, and a config that needs more shared memory than the
GPU gives a block only fails at launch.  ``benchmarks/sm90_compile.py`` calls every launcher of the backend inside
``bnn_kernels.triton.aot.capture`` (first autotune config) in a fresh process without TRITON_INTERPRET: for sm_90
in every dtype (both flag sets in bfloat16, the paper presets' in the others); for sm_86, whose 99 KiB per block
is the least of the GPUs the fused kernels run on (RTX 40xx and 50xx have the same), in float32 (the largest tiles)
and float16 with the paper presets' flags (their prior-mean tile makes them the larger kernels) and the LoRA kernels
at rank 4 and at the largest fused rank, and the LoRA kernels in bfloat16 over a float32 frozen weight; for sm_120
bfloat16 likewise; for sm_75 the variants the library picks there, in float16 and float32.  So each 16-bit dtype
goes through mma.sync once: bfloat16 and float16 kernels take the same shared memory (all 37 pairs alike on sm_86
and on sm_120 when both were compiled, Triton 3.9).  The first config is what a run with BNN_TRITON_AUTOTUNE=0
launches, and what guarantees the autotuner, which drops the configs that do not fit, one config to keep.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sm90_compile.py"
KERNEL_MODULES = ("conv", "kl", "linear", "lora", "philox", "sample")
FUSED_MAX_RANK = importlib.import_module("bnn_kernels.triton.lora").FUSED_MAX_RANK
RUNS = (
    (90, ["--dtypes", "bfloat16", "--flag-sets", "all"]),
    (90, ["--dtypes", "float32", "float16", "--flag-sets", "paper", "--check-sass"]),
    # float32: the largest tiles; float16's mma.sync (bfloat16's, with the same bytes, is compiled for sm_120)
    (86, ["--dtypes", "float32", "float16", "--flag-sets", "paper", "--lora-ranks", "4", str(FUSED_MAX_RANK)]),
    # a float32 frozen weight under bfloat16 x: twice the weight tile's bytes
    (86, ["--dtypes", "bfloat16", "--flag-sets", "paper", "--cases", "^lora", "--lora-base-dtype", "float32",
          "--lora-ranks", "4", str(FUSED_MAX_RANK), "--check-sass"]),
    # RTX 50xx (consumer Blackwell): mma.sync, not Hopper's wgmma, and 99 KiB per block
    (120, ["--dtypes", "bfloat16", "--flag-sets", "paper", "--lora-ranks", "4", str(FUSED_MAX_RANK)]),
    # T4 / RTX 20xx: what the library launches there (its tl.dot has no tensor cores: the GEMMs go to cuBLAS)
    (75, ["--variants", "auto", "--dtypes", "float16", "float32", "--flag-sets", "paper"]),
)
SHARED_KIB = {90: 227, 86: 99, 120: 99, 75: 64}


def _compile(tmp_path, index, arch, extra):
    out = tmp_path / f"sm{arch}-{index}.json"
    command = [sys.executable, str(SCRIPT), "--arch", str(arch), "--configs", "first", "--json", str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, f"sm90_compile.py {extra} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The reports of RUNS, compiled side by side, one process per core (each compiles its kernels one by one)."""
    tmp_path = tmp_path_factory.mktemp("sm90")
    with ThreadPoolExecutor(max_workers=max(1, min(len(RUNS), len(os.sched_getaffinity(0))))) as pool:
        results = list(pool.map(lambda run: _compile(tmp_path, run[0], *run[1]), enumerate(RUNS)))
    return results, [record for result in results for record in result["records"]]


def _kernels():
    """{name: calls tl.dot (through the ``mma`` helper)} for the @triton.jit kernels of the backend's modules, read
    from their source (this process runs the interpreter, where the decorators return other objects)."""
    kernels = {}
    for module in KERNEL_MODULES:
        tree = ast.parse((ROOT / "bnn_kernels" / "triton" / f"{module}.py").read_text())
        for node in tree.body:
            jitted = any(ast.unparse(d) == "triton.jit" for d in getattr(node, "decorator_list", ()))
            if isinstance(node, ast.FunctionDef) and jitted and node.name.endswith("_kernel"):
                calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
                kernels[node.name] = bool(calls & {"mma", "tl.dot"})
    return kernels


def test_environment_is_recorded(compiled):
    results, _ = compiled
    for result, (arch, _) in zip(results, RUNS):
        assert result["environment"]["triton"] == triton.__version__
        assert result["environment"]["target"] == f"cuda sm_{arch}"
        assert result["environment"]["shared_memory_per_block"] == SHARED_KIB[arch] * 1024
        assert result["settings"]["configs"] == "first"


def test_spills_are_read_with_the_ptxas_that_compiled_the_target(compiled):
    """Triton 3.9 ships ptxas 12.9 for targets below sm_90 and 13.4 from sm_90: each record's registers and spills
    come from the one Triton compiled it with, the version the report's environment names."""
    results, _ = compiled
    for result in results:
        versions = {r["ptxas"] for r in result["records"]}
        assert versions == {result["environment"]["ptxas"]}, (result["environment"]["target"], versions)


def test_first_configs_fit_the_shared_memory_of_a_block(compiled):
    """On sm_90, on sm_86 and sm_120 (RTX 30xx and 50xx; 40xx has the same 99 KiB), LoRA kernels at the largest
    fused rank included, and on sm_75 (64 KiB)."""
    results, _ = compiled
    for result in results:
        limit = result["environment"]["shared_memory_per_block"]
        over = [(r["kernel"], r["case"], r["shared_bytes"]) for r in result["records"] if r["shared_bytes"] > limit]
        assert not over, f"{result['environment']['target']}: first configs over {limit} B of shared memory: {over}"
    sm86 = [r for result, (arch, _) in zip(results, RUNS) if arch == 86 for r in result["records"]]
    assert {f"R{FUSED_MAX_RANK}", "R16"} <= {f"R{r['constexprs']['R']}" for r in sm86 if "R" in r["constexprs"]}


def test_every_kernel_compiles_to_a_cubin(compiled):
    _, records = compiled
    kernels = set(_kernels())
    assert len(kernels) >= 15, kernels  # the parse found the kernels
    compiled_kernels = {r["kernel"] for r in records}
    assert kernels <= compiled_kernels, f"never compiled: {sorted(kernels - compiled_kernels)}"
    for record in records:
        assert record["registers"] is not None and 0 < record["registers"] <= 255, record
        assert record["stack_bytes"] >= 0 and record["spill_store_bytes"] >= 0 and record["spill_load_bytes"] >= 0


def test_every_launch_pins_fp_fusion(compiled):
    """Each launch asks for FMA contraction itself (common.FP_FUSION), so no kernel follows Triton's default, which
    3.10 changes."""
    _, records = compiled
    unpinned = sorted({r["kernel"] for r in records if r["options"].get("enable_fp_fusion") is not True})
    assert not unpinned, f"launched without enable_fp_fusion=True: {unpinned}"


def test_no_gemm_kernel_runs_where_dots_have_no_tensor_cores(compiled):
    """On sm_75 Triton lowers tl.dot to FMA loops (measured: no HMMA, kilobytes of spills), so the launchers run
    every GEMM on cuBLAS there and launch only elementwise kernels; on sm_86 the same calls use the fused GEMMs."""
    results, _ = compiled
    gemms = {name for name, uses_dot in _kernels().items() if uses_dot}
    by_arch = {}  # arch -> the kernels every run for it launched
    for result, (arch, _) in zip(results, RUNS):
        by_arch.setdefault(arch, set()).update(r["kernel"] for r in result["records"])
    assert by_arch[75] and not by_arch[75] & gemms, sorted(by_arch[75] & gemms)
    assert {"_sample_kernel", "_lrt_output_kernel", "_reparam_grad_kernel"} <= by_arch[75]
    assert {"_reparam_fwd_kernel", "_lrt_fwd_kernel", "_lora_fwd_kernel"} <= by_arch[86]


def test_16_bit_gemms_use_tensor_cores(compiled):
    """In bfloat16 / float16 every GEMM kernel's tl.dot lowers to Hopper's wgmma or mma.sync (HGMMA / HMMA)."""
    results, _ = compiled
    records = [r for result, (arch, _) in zip(results, RUNS) if arch >= 80 for r in result["records"]]
    gemms = {name for name, uses_dot in _kernels().items() if uses_dot}
    assert {"_reparam_fwd_kernel", "_lrt_dw_kernel", "_lora_fwd_kernel"} <= gemms, gemms
    # float32 activations are left out: their dots run in IEEE float32 (torch's default, allow_tf32 off)
    low_precision = [r for r in records if r["kernel"] in gemms and ("bfloat16" in r["case"] or "float16" in r["case"])]
    assert gemms == {r["kernel"] for r in low_precision}
    for record in low_precision:
        assert record["tensor_core_instructions"] > 0, record


def test_the_ptx_count_of_tensor_core_instructions_is_the_sass_count(compiled):
    """The PTX's mma.sync / wgmma.mma_async, counted for every record, against the HMMA / HGMMA of the cubin's
    SASS on the runs that ask cuobjdump too (a Hopper run and an mma.sync run, GEMM and elementwise kernels)."""
    results, _ = compiled
    checked = [r for result in results if result["settings"]["check_sass"] for r in result["records"]]
    assert {r["kernel"] for r in checked if r["sass_tensor_core_instructions"]} >= {"_reparam_fwd_kernel",
                                                                                       "_lora_fwd_kernel"}
    differ = [(r["kernel"], r["case"], r["tensor_core_instructions"], r["sass_tensor_core_instructions"])
              for r in checked if r["tensor_core_instructions"] != r["sass_tensor_core_instructions"]]
    assert not differ, differ


def test_the_aot_capture_refuses_the_interpreter():
    """This process imported triton with TRITON_INTERPRET=1: capture says so instead of compiling nothing."""
    aot = importlib.import_module("bnn_kernels.triton.aot")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with aot.capture():
            pass
