#!/usr/bin/env bash
# The GPU machines' software stack (requirements-gpu-image.txt: Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# numpy 2.5) on this machine, without a GPU: build the extension against that torch, install diffusers from .whl/
# the way the device does (--no-deps into a target folder), run the test suite, then the benchmark stages of
# gpu_suite.sh at CPU sizes.  What it catches: a C++ or Python API that the newer pinned torch has and 2.11 lacks,
# a dependency the image misses, a script that breaks on that stack.  Downloads ~5 GB (torch's CUDA wheels) once.
#
#   benchmarks/gpu_image_check.sh [VENV_DIR]       (default /tmp/bnn-gpu-image; PYTHON312=... picks the interpreter)
#
# Triton 3.6's interpreter fails with numpy >= 2.4 (1-element arrays as Python ints): the triton-backend tests run
# with requirements-triton36.txt's numpy (2.3.5) first on the path, everything else with the image's numpy.  On the
# device itself the kernels are compiled, not interpreted, so the image's numpy is no problem there.  The build lands
# beside the sources as a cpython-312 library, next to (not over) the one `make` builds for its own Python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/bnn-gpu-image}
python=${PYTHON312:-python3.12}
if ! "$python" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
  echo "needs a working Python 3.12 interpreter: set PYTHON312 (tried '$python')"
  exit 2
fi
compgen -G ".whl/diffusers-*.whl" >/dev/null || { echo "needs the diffusers wheel in .whl/ (benchmarks/NOTES.md, 'GPU suite')"; exit 2; }
if [[ ! -x $venv/bin/python ]]; then
  "$python" -m venv "$venv"
fi
py=$venv/bin/python
"$py" -m pip install -q -r requirements-gpu-image.txt
"$py" -m pip install -q --no-deps --upgrade --target "$venv/numpy-2.3" "$(grep '^numpy==' requirements-triton36.txt)"
site=$venv/site  # where the device puts the carried wheels
"$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
"$py" -m pip install -q --no-build-isolation --no-deps --no-index -e .
PYTHONPATH=$site "$py" -c "import torch, triton, numpy, diffusers; print('torch', torch.__version__, 'triton',
triton.__version__, 'numpy', numpy.__version__, 'diffusers', diffusers.__version__)"
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n 2)
PYTHONPATH=$site TRITON_INTERPRET=1 "$py" -m pytest tests -q -p no:cacheprovider "${workers[@]}" -k "not triton"
PYTHONPATH=$venv/numpy-2.3:$site TRITON_INTERPRET=1 "$py" -m pytest tests -q -p no:cacheprovider "${workers[@]}" \
  -k "triton or sm90"
SUITE_STAGES="linear-ratios lora-ratios conv-ratios e2e-unet microbench" PYTHON=$py \
  bash benchmarks/gpu_suite.sh "$venv/suite-out"
