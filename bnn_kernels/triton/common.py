"""Launch helpers shared by the Triton kernels: interpreter gating, autotune lists, GEMM precision, dtypes."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it is imported; read it once here as well.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Every kernel indexes its operands with these names; what they tile depends on the kernel (see linear.py).
_BLOCK_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")

# BNN_TRITON_AUTOTUNE=0 (read when bnn_kernels is imported): every autotuned kernel runs its first config, with no
# benchmarking.  Each new shape otherwise compiles and times every config (seconds per kernel and shape): right for
# training, where shapes repeat, and too slow for a test suite of many odd shapes on a GPU.
AUTOTUNE_ENV = "BNN_TRITON_AUTOTUNE"
# BNN_TRITON_AUTOTUNE_CACHE=0 (read at import; default 1) keeps autotune's picks in memory only.  By default each
# pick is also written to Triton's cache directory (Triton's cache_results), keyed by the Triton version, the GPU
# target, the kernel's source, the shape key and the configs: the next training run with the same shapes on the
# same kind of GPU starts without timing every config again.
AUTOTUNE_CACHE_ENV = "BNN_TRITON_AUTOTUNE_CACHE"


# A launch option every kernel passes: multiply-adds contracted into FMA instructions.  That is Triton's default
# up to 3.9, which warns that 3.10 turns it off; pinned here so that the compiled code, its speed and its rounding
# stay the same across Triton releases (the oracle tests' tolerances hold with FMA; TRITON_FORCE_DISABLE_FP_FUSION=1
# still turns it off).
FP_FUSION = {"enable_fp_fusion": True}


def _switch(name: str) -> bool:
    """An on/off environment setting ("0" or "1", default "1")."""
    value = os.environ.get(name, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def launching_on(device: torch.device):
    """A context that makes ``device`` the current CUDA device for the launches inside it.  Triton launches on the
    current device and its current stream, not on the tensors' device: without this, tensors on cuda:1 while
    cuda:0 is current (a model moved without torch.cuda.set_device) would be read by kernels on the wrong GPU.
    Nothing to do (the usual case) for CPU tensors or when the device is already current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_operands_device(function):
    """``function`` run with its first argument's device current (``launching_on``)."""
    @functools.wraps(function)
    def guarded(first, *args, **kwargs):
        with launching_on(first.device):
            return function(first, *args, **kwargs)
    return guarded


def autotune_enabled() -> bool:
    return _switch(AUTOTUNE_ENV)


def autotune_cache_enabled() -> bool:
    return _switch(AUTOTUNE_CACHE_ENV)


# Autotune times each config for about AUTOTUNE_WARMUP_MS + AUTOTUNE_REP_MS of runs (Triton's default: 25 + 100 ms).
# The kernels take 10 us to a few ms, so 25 ms of runs still gives a median over tens to thousands of them, and a
# first step that tunes every shape of a UNet waits about a fifth as long.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25


def time_config(kernel_call, quantiles):
    """How autotune times one config: Triton's do_bench over a shorter window."""
    import triton.testing
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def tuned(gpu_configs, key=("M", "N", "K")):
    """``triton.autotune`` over ``gpu_configs`` on a GPU (only the first with BNN_TRITON_AUTOTUNE=0, which Triton
    then launches without timing), its picks kept on disk unless BNN_TRITON_AUTOTUNE_CACHE=0; the plain kernel
    under the interpreter.

    The interpreter cannot autotune over several configs, so there the launcher passes ``interpreter_meta``.
    """
    configs = gpu_configs if autotune_enabled() else gpu_configs[:1]
    keep_picks = autotune_cache_enabled()

    def wrap(kernel):
        if INTERPRET:
            return kernel
        return triton.autotune(configs=configs, key=list(key), cache_results=keep_picks, do_bench=time_config)(kernel)
    return wrap


def gemm_configs(shapes):
    """triton.Config list from (block_m, block_n, block_k, num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(_BLOCK_NAMES, shape[:3])), num_warps=shape[3], num_stages=shape[4])
            for shape in shapes]


def interpreter_meta(block_m=32, block_n=32, block_k=32):
    """Meta-parameters passed explicitly when interpreting (empty on a GPU, where autotune picks them)."""
    if not INTERPRET:
        return {}
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}


# The compute capability (x10) that bnn_kernels.triton.aot.capture compiles for while it is active, else None.
_capture_arch = None


def compute_capability(device):
    """The compute capability x10 (75, 80, 86, 90, ...) the kernels for tensors on ``device`` compile for; None for
    CPU tensors (the interpreter), unless an ``aot.capture`` is compiling them for a GPU."""
    if _capture_arch is not None:
        return _capture_arch
    if device is None or torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dots_use_tensor_cores(device) -> bool:
    """Whether tl.dot runs on tensor cores there: from sm_80.  Triton 3's NVIDIA backend has no MMA lowering below
    Ampere, so on a T4 or an RTX 20xx (sm_75) a dot becomes FMA loops, while cuBLAS uses the tensor cores
    (``benchmarks/sm90_compile.py --arch 75``: no HMMA in any GEMM kernel, up to 19 KB of spills).  True under the
    interpreter, whose fused kernels are what the CPU tests check."""
    capability = compute_capability(device)
    return capability is None or capability >= 80


def fused_dots_use_tensor_cores(device, dtype: torch.dtype) -> bool:
    """Whether the fused kernels' tl.dot on ``dtype`` operands run on tensor cores on ``device``: as
    ``dots_use_tensor_cores``, and for float32 only as tf32 (``dot_precision``).  With torch's default
    ``allow_tf32=False`` a float32 dot is an FMA loop even on sm_90, and the fused linear kernels spill 0.8-13.5 KB
    there (benchmarks/NOTES.md, "float32 on tensor-core GPUs"), while cuBLAS runs float32 GEMMs at full speed.
    True under the interpreter."""
    if not dots_use_tensor_cores(device):
        return False
    return dtype != torch.float32 or dot_precision() == "tf32" or compute_capability(device) is None


def variant_setting(env: str, variants) -> str:
    """The variant the environment variable ``env`` names ("auto" when unset), checked against ``variants``; read at
    every call, so a test or a benchmark can switch variants between calls."""
    choice = os.environ.get(env, "auto").strip().lower() or "auto"
    if choice != "auto" and choice not in variants:
        raise ValueError(f"{env} must be one of {', '.join(map(repr, variants))}, 'auto', got {choice!r}")
    return choice


def dot_precision() -> str:
    """tl.dot input precision for float32 operands: tf32 only where torch allows it for matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def var_in_float32(x_dtype: torch.dtype) -> bool:
    """The lrt variance GEMM runs in float32 for float32 x, else in bfloat16 (float16 cannot hold sigma^2)."""
    return x_dtype == torch.float32


def lrt_var_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the lrt variance operands for x of ``x_dtype`` (see ``var_in_float32``)."""
    return torch.float32 if var_in_float32(x_dtype) else torch.bfloat16


def squared(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * x in ``dtype``, squared in float32 (no float16 overflow, one rounding)."""
    return x.float().square().to(dtype)


def prior_constants(prior_sigma: float):
    """(1 / (2 ps^2), 1 / ps^2), computed in float64 on the host."""
    prior_sigma = float(prior_sigma)
    return 0.5 / (prior_sigma * prior_sigma), 1.0 / (prior_sigma * prior_sigma)


# ----------------------------------------------------------------------------------------------------------------
# jit helpers that keep the interpreter numerically faithful to the GPU
# ----------------------------------------------------------------------------------------------------------------
# The interpreter stores bfloat16 as uint16: its float32 -> bfloat16 cast truncates (the GPU rounds to nearest
# even) and its tl.dot cannot multiply bfloat16.  On a GPU both helpers reduce to a plain cast / tl.dot.
IS_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def clamp_min(t, floor):
    """max(t, floor) that keeps a NaN, as torch.clamp_min does (tl.maximum returns the number, as fmax does)."""
    return tl.where(t < floor, floor, t)


@triton.jit
def to_dtype(t, dtype: tl.constexpr):
    """t cast to ``dtype``, rounding to nearest even (as the GPU does)."""
    if IS_INTERPRET:
        if dtype == tl.bfloat16:
            bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            t = bits.to(tl.float32, bitcast=True)
    return t.to(dtype)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b with float32 accumulation."""
    if IS_INTERPRET:
        if a.dtype == tl.bfloat16:  # exact: bfloat16 products are exact in float32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)
