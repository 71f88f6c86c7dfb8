"""Compile the Triton kernels for a CUDA GPU on a machine that has none, and read what ptxas made of them.

``capture(arch=90)`` is a context manager: inside it every launch of a Triton kernel (``kernel[grid](...)``, also
through ``triton.autotune``) is compiled by Triton's own JIT for ``sm_<arch>`` - the same signature, constexprs and
alignment specialisation a real launch would get - and recorded instead of run.  The launchers of this backend can
therefore be called on CPU tensors (their outputs are left unwritten) to check that every kernel lowers to PTX and
a cubin with the real compiler, which Triton's interpreter never does, and to read the registers, stack frame,
spills (``ptxas -v``) and tensor-core instructions of each kernel with the CUDA tools that ship with Triton.  Inside
it the launchers also choose their variants as on that GPU (``common.compute_capability``).
``benchmarks/sm90_compile.py`` is the report; ``tests/test_sm90_compile.py`` the test.

The tensor-core instructions are counted in the PTX (``mma.sync``, ``wgmma.mma_async``).
``sass_tensor_core_count`` counts them in the cubin's SASS instead (``cuobjdump``: HMMA, HGMMA): the same number on
all 344 kernels of the test's compiles with Triton 3.9, but about 0.7 s a kernel on a 2-core machine, a third of
the average compile, so the test compares the two on a sample only.

Needs ``TRITON_INTERPRET`` unset (or 0) when triton is imported, and the ``ptxas``/``cuobjdump`` binaries of the
Triton wheel (``triton/backends/nvidia/bin``).  Where ptxas ``-v`` reports a stack frame but no spill bytes, the
frame is libdevice's sin/cos slow path (Payne-Hanek range reduction for |x| > 105615, a local array that
Box-Muller's arguments in [0, 2 pi) never reach), not register spilling.  Uses Triton's
``runtime.driver.set_active`` and the ``run`` methods of ``JITFunction`` and ``Autotuner``, which Triton 3.6 to
3.9 share (checked with both).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import common
from .common import INTERPRET

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# The shared memory one block may use (the opt-in maximum), by compute capability x10, from the CUDA C++
# Programming Guide's table of technical specifications: T4 / RTX 20xx 75, A100 80, RTX 30xx 86, RTX 40xx 89,
# H100/H200 90, B200 100, RTX 50xx 120.  A launch above it raises OutOfResources: Triton's autotuner drops such a
# config, but a kernel run with a single config (BNN_TRITON_AUTOTUNE=0) fails.
SHARED_MEMORY_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                           90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
_SASS_TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA|UTC\w*MMA)(\.\w+)*\b")  # UTC*MMA: Blackwell's tcgen05
# an instruction at the start of a line, after an opening brace or a predicate (%p1, !%p1, an inline-asm p)
_PTX_TENSOR_CORE = re.compile(r"^\s*(?:\{\s*)?(?:@!?%?\w+\s+)?(?:mma(?:\.sp)?\.sync|wgmma\.mma_async|tcgen05\.mma)\b",
                              re.MULTILINE)
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


@dataclass
class CompiledLaunch:
    """One kernel compiled for one launch: its name, the constexprs it was specialised on (BLOCK_* and flags), the
    pointer dtypes, and what the cubin holds (filled by ``resources``)."""

    kernel: str
    constexprs: dict
    options: dict
    pointer_dtypes: dict
    compile_seconds: float
    shared_bytes: int
    asm: dict = field(repr=False)
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None
    spill_store_bytes: Optional[int] = None
    spill_load_bytes: Optional[int] = None
    tensor_core_instructions: Optional[int] = None
    ptxas: Optional[str] = None  # the version of the ptxas that read the registers and spills

    def resources(self) -> "CompiledLaunch":
        """Fill registers, stack frame and spill bytes (ptxas -v on the kernel's PTX, the ptxas Triton compiled
        it with) and the tensor-core instructions of the PTX (Hopper's wgmma, mma.sync)."""
        target = re.search(r"^\.target\s+(\w+)", self.asm["ptx"], re.MULTILINE).group(1)
        arch = int(re.match(r"sm_(\d+)", target).group(1))  # sm_90a -> 90: Triton 3.9 ships one ptxas per range
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as handle:
                handle.write(self.asm["ptx"])
            ptxas = ptxas_path(arch)
            report = _run(ptxas, f"-arch={target}", "-v", ptx, "-o", os.path.join(tmp, "again.cubin"))
        registers = re.search(r"Used (\d+) registers", report)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
        if registers is None or frame is None:
            raise RuntimeError(f"cannot read ptxas -v for {self.kernel}: {report[-500:]}")
        self.registers = int(registers.group(1))
        self.stack_bytes, self.spill_store_bytes, self.spill_load_bytes = (int(g) for g in frame.groups())
        self.tensor_core_instructions = len(_PTX_TENSOR_CORE.findall(self.asm["ptx"]))
        self.ptxas = _version_of(ptxas)
        return self

    def sass_tensor_core_count(self) -> int:
        """The tensor-core instructions (HGMMA: Hopper's wgmma; HMMA: mma.sync) of the cubin's SASS."""
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as handle:
                handle.write(self.asm["cubin"])
            return len(_SASS_TENSOR_CORE.findall(_run(os.path.join(_TOOLS, "cuobjdump"), "--dump-sass", cubin)))

    def summary(self) -> dict:
        """The JSON-able record (no assembly)."""
        return {"kernel": self.kernel, "constexprs": self.constexprs, "options": self.options,
                "pointer_dtypes": self.pointer_dtypes, "compile_seconds": round(self.compile_seconds, 3),
                "shared_bytes": self.shared_bytes, "registers": self.registers, "stack_bytes": self.stack_bytes,
                "spill_store_bytes": self.spill_store_bytes, "spill_load_bytes": self.spill_load_bytes,
                "tensor_core_instructions": self.tensor_core_instructions, "ptxas": self.ptxas}


def ptxas_path(arch: int = 90) -> str:
    """The ptxas Triton compiles for ``sm_<arch>`` with (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def ptxas_version(arch: int = 90) -> str:
    """E.g. "cuda_13.4.r13.4/compiler.38657139_0": the version of the ptxas Triton compiles ``sm_<arch>`` with."""
    return _version_of(ptxas_path(arch))


@functools.lru_cache(maxsize=None)
def _version_of(ptxas: str) -> str:
    """The last line of ``ptxas --version``, without "Build "."""
    return _run(ptxas, "--version").strip().splitlines()[-1].replace("Build ", "")


def _run(tool: str, *args: str) -> str:
    """stdout + stderr of a CUDA tool (ptxas -v reports on stderr)."""
    done = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()[-1000:]}")
    return done.stdout + done.stderr


class _TargetOnlyDriver:
    """What Triton's JIT asks of the active driver to compile (not to launch): a device, a stream, a target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _describe(fn: JITFunction, args, kwargs) -> tuple:
    """(constexprs, pointer dtypes) of one launch, by parameter name."""
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    constexprs, pointers = {}, {}
    for param in fn.params:
        value = values.get(param.name)
        if param.is_constexpr:
            constexprs[param.name] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
        elif isinstance(value, torch.Tensor):
            pointers[param.name] = str(value.dtype).replace("torch.", "")
    return constexprs, pointers


@contextlib.contextmanager
def capture(arch: int = 90, autotune_configs: str = "all") -> Iterator[List[CompiledLaunch]]:
    """Inside: Triton launches compile for ``sm_<arch>`` instead of running; yields the list of CompiledLaunch.

    ``autotune_configs``: ``"all"`` compiles every config of an autotuned kernel, ``"first"`` only its first.
    """
    if INTERPRET:
        raise RuntimeError("bnn_kernels.triton.aot compiles for a GPU: import triton without TRITON_INTERPRET=1")
    if autotune_configs not in ("all", "first"):
        raise ValueError(f"autotune_configs must be 'all' or 'first', got {autotune_configs!r}")
    launches: List[CompiledLaunch] = []
    original_run, original_autotune_run = JITFunction.run, Autotuner.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        constexprs, pointers = _describe(self, args, kwargs)
        start = time.perf_counter()
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        seconds = time.perf_counter() - start
        options = {key: kwargs[key] for key in _LAUNCH_OPTIONS if key in kwargs}
        launches.append(CompiledLaunch(self.__name__, constexprs, options, pointers, seconds,
                                       int(kernel.metadata.shared), dict(kernel.asm)))
        return kernel

    def compile_configs(self, *args, **kwargs):
        configs = self.configs if autotune_configs == "all" else self.configs[:1]
        for config in configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    previous_driver = getattr(driver, "_active", None)  # None: Triton creates its default driver when asked
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run, Autotuner.run = compile_only, compile_configs
    previous_arch, common._capture_arch = common._capture_arch, arch  # the launchers route as on that GPU
    try:
        yield launches
    finally:
        common._capture_arch = previous_arch
        JITFunction.run, Autotuner.run = original_run, original_autotune_run
        driver.set_active(previous_driver)
