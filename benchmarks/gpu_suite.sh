#!/usr/bin/env bash
# One call on a GPU machine: build from source, the contract tests on the GPU, the one-run ratio tables, the
# end-to-end UNet training step and the pytest-benchmark microbenchmarks, in that order (the most decisive first),
# inside one time budget.  Every result lands as JSON in $1 (default /tmp/bnn-gpu-<date>) and in
# benchmarks/results/gpu-<date>-<name>.json; summary.json says what each stage did, tests.jsonl each test's outcome,
# suite.log holds the console output.  Uses the machine's own torch/triton (no venv) and installs nothing from the
# network (diffusers comes as a carried wheel, see below).
#
#   benchmarks/gpu_suite.sh [OUTPUT_DIR]
#
# SUITE_BUDGET_S (default 540) caps the whole suite: each stage gets min(its own cap, what is left less the floors
# kept for the selected stages after it) and is stopped (SIGTERM) at its limit, so a slow early stage cannot starve
# the end-to-end step; the benchmark scripts write their JSON after every shape or run, so a stopped stage keeps
# what it measured.  A stage that would get under 20 s is skipped.  SUITE_STAGES="build linear-ratios ..." runs only
# the stages named, SUITE_TESTS="tests/... ..." other tests in the kernel-tests stage, SUITE_E2E_ARGS="..." adds
# arguments to e2e_unet.py (e.g. "--resume FILE --batch-sizes 4": the runs a first call did not reach; later
# arguments win).  The suite also runs on a
# machine without a GPU (small CPU sizes, the Triton interpreter; the results then stay in OUTPUT_DIR), which is how
# tests/test_gpu_suite.py checks its plumbing.
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=${1:-/tmp/bnn-gpu-$stamp}
mkdir -p "$out"
exec > >(tee -a "$out/suite.log") 2>&1  # the whole log comes back with the results, also from a call cut short
tee_pid=$!
rm -f "$out/tests.jsonl"  # BNN_TEST_LOG appends
python=${PYTHON:-python3}
budget=${SUITE_BUDGET_S:-540}
export PYTHONUNBUFFERED=1
export PIP_BREAK_SYSTEM_PACKAGES=1  # the machine's own Python may be marked externally managed
if $python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=0
  on_gpu=1
else
  export TRITON_INTERPRET=1
  on_gpu=0
fi
status=0
stages=()

# The stages in the order they run, and the seconds each keeps back from the stages before it (its floor).
order=(build kernel-tests e2e-unet linear-ratios lora-ratios conv-ratios microbench)
declare -A floor=([e2e-unet]=150 [linear-ratios]=45 [lora-ratios]=30 [conv-ratios]=30)
unavailable=" "  # stages that cannot run here (their floors go to the others)

selected() { [[ (-z ${SUITE_STAGES:-} || " $SUITE_STAGES " == *" $1 "*) && $unavailable != *" $1 "* ]]; }

# reserved_after NAME: the floors of the selected stages that run after NAME
reserved_after() {
  local later=0 total=0 name
  for name in "${order[@]}"; do
    ((later)) && selected "$name" && total=$((total + ${floor[$name]:-0}))
    [[ $name == "$1" ]] && later=1
  done
  echo "$total"
}

# stage NAME CAP_SECONDS COMMAND...: run COMMAND under min(CAP, budget left - floors of later stages); record
# "name rc seconds"
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((budget - SECONDS)) limit
  if [[ $unavailable == *" $name "* ]]; then
    stages+=("$name unavailable 0")
    return
  fi
  if ! selected "$name"; then
    stages+=("$name not-selected 0")
    return
  fi
  local room=$((left - $(reserved_after "$name")))
  limit=$((cap < room ? cap : room))
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s of the budget left ($((left - room))s kept for the stages after it)"
    stages+=("$name skipped 0")
    return
  fi
  echo "== $name (limit ${limit}s)"
  local begin=$SECONDS rc
  timeout --signal=TERM --kill-after=15 "$limit" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "   $name stopped at its ${limit}s limit"
  ((rc != 0)) && status=1
  stages+=("$name $rc $((SECONDS - begin))")
}

# diffusers is not on the GPU image: its wheel travels in .whl/ (ignored by git; see benchmarks/NOTES.md, "GPU suite")
if compgen -G ".whl/*.whl" >/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || status=1
fi
if ! $python -c "import diffusers" 2>/dev/null; then
  echo "!! diffusers does not import (no wheel in .whl/? see benchmarks/NOTES.md, \"GPU suite\"): e2e-unet cannot run"
  unavailable+="e2e-unet "
  status=1
fi

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
$python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stage build 150 $python -m pip install --no-build-isolation --no-deps --no-index -e .
$python -c "import bnn_kernels as bk; print('backends', bk.backends())" || status=1

# The kernel contract tests on the GPU.  BNN_TRITON_AUTOTUNE=0: one config per kernel (no autotune benchmarking over
# the many odd test shapes); pytest-xdist spreads the compiles over the CPUs where it is installed.
# BNN_TEST_LOG (tests/result_log.py): one JSON line per outcome, written as it comes, so that a run stopped at its
# limit still says what passed and why anything failed.
pytest_args=(-q -p no:cacheprovider -rfE)
if ((on_gpu)) && $python -c "import xdist" 2>/dev/null; then pytest_args+=(-n 8); fi
if $python -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout 300); fi
kernel_tests=(tests/test_rng.py tests/test_kl.py tests/test_linear.py tests/test_conv.py tests/test_lora.py
              tests/test_memory_contract.py tests/test_errors.py tests/test_compile.py)
# SUITE_TESTS="FILE_OR_NODE_ID ..." runs those instead (a second call that reruns what failed, from tests.jsonl)
if [[ -n ${SUITE_TESTS:-} ]]; then read -r -a kernel_tests <<<"$SUITE_TESTS"; fi
# OMP_NUM_THREADS=2: the 8 workers' cpu-backend tests would otherwise each start an OpenMP thread per core, against
# each other and the workers' Triton compiles.
BNN_TEST_LOG="$out/tests.jsonl" BNN_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=2 \
  stage kernel-tests 200 $python -m pytest "${kernel_tests[@]}" "${pytest_args[@]}"

# The end-to-end step before the ratio tables: a second call can then run those (shorter) where this one stopped;
# 5 timed steps after 2 (the first autotunes every shape), 24 runs.
if ((on_gpu)); then
  e2e_args=(--config sd15 --repeats 5 --warmup 2)
else
  e2e_args=(--config tiny --latent-size 8 --batch-sizes 1 --repeats 1 --warmup 0)
fi
read -r -a extra_e2e_args <<<"${SUITE_E2E_ARGS:-}"
stage e2e-unet 200 $python benchmarks/e2e_unet.py "${e2e_args[@]}" "${extra_e2e_args[@]}" --json "$out/e2e_unet.json"
stage linear-ratios 75 $python benchmarks/linear_ratios.py --json "$out/linear_ratios.json"
stage lora-ratios 60 $python benchmarks/lora_ratios.py --json "$out/lora_ratios.json"
stage conv-ratios 60 $python benchmarks/conv_ratios.py --json "$out/conv_ratios.json"
stage microbench 120 $python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$out/microbench.json"

rm -f "$out"/.*.tmp  # a JSON write cut off by a stage's limit: only 8 files come back from a call
$python - "$out/summary.json" "$stamp" "$budget" "${stages[@]}" <<'EOF'
import collections, json, os, sys
path, stamp, budget, *stages = sys.argv[1:]
rows = [dict(zip(("stage", "rc", "seconds"), s.split())) for s in stages]
for row in rows:  # timeout exits 124 at the limit, 137 when the stage also needed the KILL after it
    row["seconds"] = int(row["seconds"])
    row["outcome"] = {"skipped": "skipped (budget)", "not-selected": "not selected", "0": "ok",
                      "unavailable": "cannot run here (see suite.log)",
                      "124": "stopped at its time limit", "137": "stopped at its time limit"}.get(row["rc"], "failed")
summary = {"stamp": stamp, "budget_seconds": int(budget), "stages": rows}
log = os.path.join(os.path.dirname(path), "tests.jsonl")
if os.path.exists(log):  # the kernel tests' outcomes so far, from BNN_TEST_LOG
    records = []
    for line in open(log):
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut off when the stage was stopped
            pass
    summary["kernel_tests"] = dict(collections.Counter(r["outcome"] for r in records))
    summary["kernel_tests_failed"] = sorted({r["test"] for r in records if r["outcome"] == "failed"})
json.dump(summary, open(path, "w"), indent=1)
print("\n".join(f"{r['stage']:<14} {r['outcome']:<26} {r['seconds']:>4}s" for r in rows))
if "kernel_tests" in summary:
    print("kernel tests:", summary["kernel_tests"])
EOF

if ((on_gpu)); then
  mkdir -p benchmarks/results
  for file in "$out"/*.json; do
    [ -e "$file" ] && cp "$file" "benchmarks/results/gpu-$stamp-$(basename "$file")"
  done
  echo "results in $out and benchmarks/results/gpu-$stamp-*.json (status $status, ${SECONDS}s)"
else
  echo "results in $out (no GPU: nothing copied to benchmarks/results/; status $status, ${SECONDS}s)"
fi
exec >&- 2>&-  # tee sees the end of its input: the log is complete when the suite returns
wait "$tee_pid" 2>/dev/null
exit $status
