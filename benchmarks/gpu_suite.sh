#!/usr/bin/env bash
# One call on a GPU machine: build from source, run the contract tests on the GPU, the microbenchmarks, the
# one-run ratio script and the end-to-end UNet training step (benchmarks/e2e_unet.py); every result lands as JSON
# in $1 (default /tmp/bnn-gpu-<date>) and in benchmarks/results/.  Uses the machine's own torch/triton (no venv):
# pip installs nothing from the network (diffusers comes as a carried wheel, see below).
#
#   benchmarks/gpu_suite.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=${1:-/tmp/bnn-gpu-$stamp}
mkdir -p "$out" benchmarks/results
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

# diffusers is not on the GPU image: its wheel travels in .whl/ (ignored by git; see benchmarks/NOTES.md, "GPU suite")
if compgen -G ".whl/*.whl" >/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || status=1
fi

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build"
$python -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3 || status=1
$python -c "import bnn_kernels as bk; print('backends', bk.backends())" || status=1

echo "== contract tests on the GPU"
$python -m pytest tests -q -x --junitxml="$out/tests.xml" 2>&1 | tail -15 || status=1

echo "== microbenchmarks"
$python -m pytest benchmarks -q --benchmark-only --benchmark-json="$out/microbench.json" 2>&1 | tail -40 || status=1

echo "== ratios in one run"
$python benchmarks/linear_ratios.py --json "$out/linear_ratios.json" || status=1
$python benchmarks/conv_ratios.py --json "$out/conv_ratios.json" || status=1
$python benchmarks/lora_ratios.py --json "$out/lora_ratios.json" || status=1

echo "== end-to-end training step (SD 1.5 UNet, 64x64 latents)"
$python benchmarks/e2e_unet.py --config sd15 --json "$out/e2e_unet.json" 2>&1 | tee "$out/e2e_unet.log" || status=1

for file in "$out"/*.json; do
  [ -e "$file" ] && cp "$file" "benchmarks/results/gpu-$stamp-$(basename "$file")"
done
echo "results in $out and benchmarks/results/ (status $status)"
exit $status
