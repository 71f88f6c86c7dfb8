"""Build bnn-diffusion from source: the C++ CPU extension always, CUDA sources only where they can be built.

* ``bnn_kernels._C``: csrc/*.cpp (Philox stream, fused CPU ops with OpenMP), registered as ``torch.ops.bnn_cpu``.
* ``bnn_kernels._C_cuda``: csrc/cuda/*.cu (+ csrc/cuda/*.cpp), only when torch was built with CUDA, ``nvcc`` is
  found (CUDA_HOME) and such sources exist.

The extensions link against the torch installed in this environment, so install torch first and build with
``pip install --no-build-isolation .`` (or ``-e .`` for development: the libraries land next to the sources).
Project metadata lives in pyproject.toml.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - a clear message instead of a traceback
    raise SystemExit(
        f"bnn-diffusion builds C++ extensions against an installed torch, but torch could not be imported "
        f"({error}). Install torch first, then run `pip install --no-build-isolation .`."
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CUDA_DIR = os.path.join(CSRC, "cuda")


def _sources(pattern: str) -> list[str]:
    """Paths relative to the project root (setuptools wants relative paths), sorted for reproducible builds."""
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


def _cxx_flags() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/openmp", "/fp:precise"]
    # -ffp-contract=off: no FMA contraction, so the SIMD clones of csrc/kernels.cpp agree bit for bit;
    # -fno-math-errno -fno-trapping-math: lets the compiler vectorise sqrt and if-convert the math loops;
    # -g0: no debug info (Python's CFLAGS carry -g, which makes the library ~18x larger).
    flags = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    if sys.platform == "darwin":
        flags.append("-fopenmp-simd")  # Apple clang ships no OpenMP runtime: SIMD loops only, single-threaded
    else:
        flags.append("-fopenmp")
    return flags


def _link_args() -> tuple[list[str], list[str]]:
    """(extra link args, libraries): libgomp, the OpenMP runtime torch's Linux wheels ship and load."""
    if sys.platform.startswith("linux"):
        return ["-fopenmp"], ["gomp"]
    return [], []


def cpu_extension() -> CppExtension:
    link_args, libraries = _link_args()
    return CppExtension(
        name="bnn_kernels._C",
        sources=_sources(os.path.join(CSRC, "*.cpp")),
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": _cxx_flags()},
        extra_link_args=link_args,
        libraries=libraries,
    )


def _nvcc() -> str | None:
    if CUDA_HOME is not None:
        candidate = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def cuda_extension() -> tuple[CUDAExtension | None, str]:
    """The CUDA extension, or None and the reason it is skipped."""
    if torch.version.cuda is None:
        return None, "torch has no CUDA"
    if _nvcc() is None:
        return None, f"nvcc not found (torch has CUDA {torch.version.cuda}; set CUDA_HOME to build it)"
    sources = _sources(os.path.join(CUDA_DIR, "*.cu")) + _sources(os.path.join(CUDA_DIR, "*.cpp"))
    if not any(path.endswith(".cu") for path in sources):
        return None, f"no CUDA sources in {CUDA_DIR}/"
    extension = CUDAExtension(
        name="bnn_kernels._C_cuda",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return extension, f"building CUDA extension (CUDA {torch.version.cuda})"


def extensions() -> tuple[list, str]:
    """The extensions to build and the one line that says so."""
    modules = [cpu_extension()]
    cuda, reason = cuda_extension()
    if cuda is None:
        return modules, f"bnn-diffusion: building C++ CPU extension; CUDA extension skipped: {reason}"
    modules.append(cuda)
    return modules, f"bnn-diffusion: building C++ CPU extension; {reason}"


EXTENSIONS, BUILD_SUMMARY = extensions()


class BuildExtensions(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension (ninja), saying once what it builds."""

    def run(self):
        print(BUILD_SUMMARY, flush=True)
        super().run()


# The packages of the project, plus every regular subpackage added later (bnn_diffusion.study, ...).
NAMED_PACKAGES = ["bnn_kernels", "bnn_kernels.triton", "bnn_diffusion"]
PACKAGES = sorted(
    {name for name in NAMED_PACKAGES if os.path.isdir(os.path.join(ROOT, *name.split(".")))}
    | set(find_packages(where=ROOT, include=["bnn_kernels", "bnn_kernels.*", "bnn_diffusion", "bnn_diffusion.*"]))
)

setup(
    packages=PACKAGES,
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildExtensions},
    zip_safe=False,
)
