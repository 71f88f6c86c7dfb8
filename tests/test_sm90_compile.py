"""Every Triton kernel compiles for sm_90 (H100/H200) with the real Triton compiler, no GPU needed.

The interpreter that runs the other triton-backend tests on CPU never lowers a kernel: type errors, layouts that
do not fit, tl.dot shapes below 16 only show when ptxas runs.  ``benchmarks/sm90_compile.py`` calls every launcher
of the backend inside ``bnn_kernels.triton.aot.capture`` (first autotune config, every dtype; both flag sets in
bfloat16, the paper presets' in the others) in a fresh process without TRITON_INTERPRET.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sm90_compile.py"
KERNEL_MODULES = ("conv", "kl", "linear", "lora", "philox", "sample")
RUNS = (["--dtypes", "bfloat16", "--flag-sets", "all"], ["--dtypes", "float32", "float16", "--flag-sets", "paper"])


def _compile(tmp_path, index, extra):
    out = tmp_path / f"sm90-{index}.json"
    command = [sys.executable, str(SCRIPT), "--configs", "first", "--json", str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, f"sm90_compile.py {extra} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sm90")
    results = [_compile(tmp_path, index, extra) for index, extra in enumerate(RUNS)]
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
    for result in results:
        assert result["environment"]["triton"] == triton.__version__
        assert result["environment"]["target"] == "cuda sm_90"
        assert result["settings"]["configs"] == "first"


def test_every_kernel_compiles_to_a_cubin(compiled):
    _, records = compiled
    kernels = set(_kernels())
    assert len(kernels) >= 15, kernels  # the parse found the kernels
    assert kernels <= {r["kernel"] for r in records}, f"never compiled: {sorted(kernels - {r['kernel'] for r in records})}"
    for record in records:
        assert record["registers"] is not None and 0 < record["registers"] <= 255, record
        assert record["stack_bytes"] >= 0 and record["spill_store_bytes"] >= 0 and record["spill_load_bytes"] >= 0


def test_16_bit_gemms_use_tensor_cores(compiled):
    """In bfloat16 / float16 every GEMM kernel's tl.dot lowers to Hopper's wgmma or mma.sync (HGMMA / HMMA)."""
    _, records = compiled
    gemms = {name for name, uses_dot in _kernels().items() if uses_dot}
    assert {"_reparam_fwd_kernel", "_lrt_dw_kernel", "_lora_fwd_kernel"} <= gemms, gemms
    # float32 activations are left out: their dots run in IEEE float32 (torch's default, allow_tf32 off)
    low_precision = [r for r in records if r["kernel"] in gemms and ("bfloat16" in r["case"] or "float16" in r["case"])]
    assert gemms == {r["kernel"] for r in low_precision}
    for record in low_precision:
        assert record["tensor_core_instructions"] > 0, record


def test_the_aot_capture_refuses_the_interpreter():
    """This process imported triton with TRITON_INTERPRET=1: capture says so instead of compiling nothing."""
    aot = importlib.import_module("bnn_kernels.triton.aot")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with aot.capture():
            pass
