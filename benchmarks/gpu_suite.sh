#!/usr/bin/env bash
# One call on a GPU machine: build from source, the contract tests on the GPU, the one-run ratio tables (linear,
# LoRA, conv), the end-to-end UNet training step and the pytest-benchmark microbenchmarks, in that order (the most
# decisive first), inside one time budget.  Every result lands as JSON in $1 (default /tmp/bnn-gpu-<date>) and, on
# a GPU, in benchmarks/results/gpu-<date>-<name>.json of the checkout it ran in; summary.json (rewritten after every
# stage) says what each stage did and on what machine, tests.jsonl each test's outcome, suite.log holds the console
# output.  Uses the machine's own torch/triton (no venv) and installs nothing from the network (diffusers comes as
# a carried wheel, see below).  SUITE_COMMIT names the commit in summary.json (the device copy has no .git).
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
if timeout 120 $python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=0
  on_gpu=1
elif command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi -L >/dev/null 2>&1; then
  # a GPU that torch cannot use: running the CPU sizes on the lease would waste it
  echo "!! nvidia-smi sees a GPU but torch does not:"
  reason=$(timeout 120 $python -c "import torch; torch.cuda.init()" 2>&1 | tail -3)
  echo "$reason"
  timeout 60 $python -c 'import json, subprocess, sys
smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
json.dump({"stamp": sys.argv[2], "error": "nvidia-smi sees a GPU but torch does not", "torch": sys.argv[3],
           "nvidia_smi": smi}, open(sys.argv[1], "w"), indent=1)' "$out/summary.json" "$stamp" "$reason" || true
  exit 2
else
  export TRITON_INTERPRET=1
  on_gpu=0
fi
status=0
stages=()

# The stages in the order they run, and the seconds each keeps back from the stages before it (its floor).
order=(build kernel-tests linear-ratios lora-ratios conv-ratios e2e-unet microbench)
declare -A floor=([linear-ratios]=45 [lora-ratios]=40 [conv-ratios]=30 [e2e-unet]=210)
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

# stage NAME CAP_SECONDS COMMAND...: run COMMAND under min(CAP, budget left - floors of later stages), stopped
# with $stage_signal (default TERM) at its limit; record "name rc seconds cubins" (the cubins added to Triton's
# cache while it ran: compiles no warmer had done beforehand; for kernel-tests, the warmers' own as well)
triton_cache=${TRITON_CACHE_DIR:-${HOME:-/root}/.triton/cache}
cubins() { find "$triton_cache" -name '*.cubin' 2>/dev/null | wc -l; }
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((budget - SECONDS)) limit
  if [[ $unavailable == *" $name "* ]]; then
    stages+=("$name unavailable 0 0")
    return
  fi
  if ! selected "$name"; then
    stages+=("$name not-selected 0 0")
    return
  fi
  local room=$((left - $(reserved_after "$name")))
  limit=$((cap < room ? cap : room))
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s of the budget left ($((left - room))s kept for the stages after it)"
    stages+=("$name skipped 0 0")
    return
  fi
  echo "== $name (limit ${limit}s)"
  local begin=$SECONDS rc compiled_before
  compiled_before=$(cubins)
  timeout --signal="${stage_signal:-TERM}" --kill-after=15 "$limit" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "   $name stopped at its ${limit}s limit"
  ((rc != 0)) && status=1
  stages+=("$name $rc $((SECONDS - begin)) $(($(cubins) - compiled_before))")
  write_summary
}

# summary.json: the machine, the settings and what each stage did so far (rewritten after every stage, so a call
# cut short still says what ran)
# (no torch import: the machine's description is worked out once, by describe_environment, into $environment)
write_summary() {
  rm -f "$out"/.*.tmp  # a JSON write cut off by a stage's limit: only 8 files come back from a call
  timeout 60 $python - "$out/summary.json" "$stamp" "$budget" "$environment" "${stages[@]}" <<'EOF'
import collections, json, os, sys
path, stamp, budget, environment, *stages = sys.argv[1:]
rows = [dict(zip(("stage", "rc", "seconds", "new_cubins"), s.split())) for s in stages]
for row in rows:  # timeout exits 124 at the limit, 137 when the stage also needed the KILL after it
    row["seconds"] = int(row["seconds"])
    row["new_cubins"] = int(row.get("new_cubins", 0))
    row["outcome"] = {"skipped": "skipped (budget)", "not-selected": "not selected", "0": "ok",
                      "unavailable": "cannot run here (see suite.log)",
                      "124": "stopped at its time limit", "137": "stopped at its time limit"}.get(row["rc"], "failed")
try:
    environment = json.loads(environment)
except ValueError:  # describe_environment failed or timed out: say so, and write the rest
    environment = {"error": "the environment could not be described (see suite.log)"}
summary = {"stamp": stamp, "budget_seconds": int(budget), "environment": environment, "stages": rows}
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
partial = os.path.join(os.path.dirname(path), ".summary.json.tmp")  # removed by the next call if cut off
with open(partial, "w") as part:
    json.dump(summary, part, indent=1)
os.replace(partial, path)
EOF
}

# diffusers is not on the GPU image: its wheel travels in .whl/ (ignored by git; see benchmarks/NOTES.md, "GPU
# suite"); SUITE_WHEELS names another folder
wheels=${SUITE_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  timeout 120 $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || status=1
fi
if ! timeout 120 $python -c "import diffusers" 2>/dev/null; then
  echo "!! diffusers does not import (no wheel in .whl/? see benchmarks/NOTES.md, \"GPU suite\"): e2e-unet cannot run"
  unavailable+="e2e-unet "
  status=1
fi

# describe_environment: one JSON line (versions, device, driver, the commit and a hash of the source that ran, the
# date and the SUITE_ settings), worked out once for summary.json
describe_environment() {
  timeout 120 $python - "$on_gpu" <<'EOF'
import datetime, hashlib, json, os, pathlib, subprocess, sys
on_gpu = sys.argv[1] == "1"
environment = {"python": sys.version.split()[0], "commit": os.environ.get("SUITE_COMMIT"),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "settings": {k: v for k, v in os.environ.items() if k.startswith("SUITE_") and k != "SUITE_COMMIT"}}
# what ran, committed or not: SUITE_COMMIT names a commit, this hash the files themselves
digest = hashlib.sha256()
for path in sorted(p for top in ("setup.py", "csrc", "bnn_kernels", "bnn_diffusion", "benchmarks", "tests")
                   for p in ([pathlib.Path(top)] if top.endswith(".py") else pathlib.Path(top).rglob("*"))
                   if p.is_file() and p.suffix in (".py", ".h", ".cpp", ".sh")):
    digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
environment["source_sha256"] = digest.hexdigest()[:16]
try:
    import torch
    import triton
    environment.update(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__)
    if on_gpu:
        environment["device"] = torch.cuda.get_device_name()
except Exception as error:  # the summary is still written
    environment["versions_error"] = repr(error)
try:
    from importlib.metadata import version
    environment["diffusers"] = version("diffusers")
except Exception:
    environment["diffusers"] = None
if on_gpu:
    try:
        environment["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as error:
        environment["nvidia_smi"] = repr(error)
print(json.dumps(environment))
EOF
}

echo "== environment"
environment=$(describe_environment) || true
echo "$environment"

# the source tree first on the path: the benchmark scripts import the package even if the editable install fails
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
MAX_JOBS=${MAX_JOBS:-$(nproc)} stage build 150 $python -m pip install --no-build-isolation --no-deps --no-index -e .
# On a GPU the fused variants must run on the triton backend: if triton did not import, the registry falls back to
# the reference backend, and the tables would time materialising code under the fused variants' names.
if ! timeout 120 $python -c "
import sys, torch, bnn_kernels as bk
print('backends', bk.backends())
if 'cpu' not in bk.backends():
    print('!! the C++ extension did not build: the cpu backend and its tests are missing')
if torch.cuda.is_available() and bk.registry.select(torch.device('cuda')) != 'triton':
    print('!! the triton backend is not usable on this GPU: the benchmarks would time the reference backend')
    sys.exit(1)
"; then
  echo "!! benchmarks skipped: see above"
  unavailable+="linear-ratios lora-ratios conv-ratios e2e-unet microbench "
  status=1
fi

# The kernel contract tests on the GPU.  BNN_TRITON_AUTOTUNE=0: one config per kernel (no autotune benchmarking over
# the many odd test shapes); pytest-xdist spreads the compiles over the CPUs where it is installed.
# BNN_TEST_LOG (tests/result_log.py): one JSON line per outcome, written as it comes, so that a run stopped at its
# limit still says what passed and why anything failed.
pytest_args=(-q -p no:cacheprovider -rfE)
if ((on_gpu)) && $python -c "import xdist" 2>/dev/null; then pytest_args+=(-n 8); fi
# a hung test fails alone, named, instead of using up the stage
if $python -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout 90); fi
# The triton backend's tests (-k triton): the cpu and reference backends' run in CI, and on CPU tensors here too.
# (test_compile.py runs on CPU tensors only: CI covers it)
kernel_tests=(tests/test_rng.py tests/test_kl.py tests/test_linear.py tests/test_conv.py tests/test_lora.py
              tests/test_memory_contract.py tests/test_errors.py tests/test_autocast.py -k triton)
# SUITE_TESTS="FILE_OR_NODE_ID ..." runs those instead (a second call that reruns what failed, from tests.jsonl)
if [[ -n ${SUITE_TESTS:-} ]]; then read -r -a kernel_tests <<<"$SUITE_TESTS"; fi
# OMP_NUM_THREADS=2: the 8 workers' cpu-backend tests would otherwise each start an OpenMP thread per core, against
# each other and the workers' Triton compiles.
# While the tests run (8 of the CPUs), the kernels of the ratio tables and of the end-to-end variants of ours
# compile into Triton's cache in the background: every autotune config at the benchmarks' own shapes and dtypes
# (--compile-only), which a cold cache would otherwise compile inside their time (50-60 s for the linear or the
# LoRA table, serially for sm_90 on a CPU).  They only compile (nothing of theirs is timed) and are stopped when
# the tests end, before anything is timed.
if ((on_gpu)); then
  e2e_args=(--config sd15 --repeats 5 --warmup 2)
else
  e2e_args=(--config tiny --latent-size 8 --batch-sizes 1 --repeats 1 --warmup 0)
fi
read -r -a extra_e2e_args <<<"${SUITE_E2E_ARGS:-}"
warmers=()
if ((on_gpu)) && selected kernel-tests; then
  for table in linear lora conv; do
    if selected "$table-ratios"; then
      timeout -k 10 300 $python "benchmarks/${table}_ratios.py" --compile-only \
        > >(sed -u "s/^/[compile $table] /") 2>&1 &
      warmers+=($!)
    fi
  done
  if selected e2e-unet; then  # the same for the end-to-end variants of ours (a UNet of its own on the GPU)
    timeout -k 10 300 $python benchmarks/e2e_unet.py "${e2e_args[@]}" "${extra_e2e_args[@]}" --compile-only \
      > >(sed -u "s/^/[compile e2e] /") 2>&1 &
    warmers+=($!)
  fi
fi
BNN_TEST_LOG="$out/tests.jsonl" BNN_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=2 \
  stage kernel-tests 120 $python -m pytest "${kernel_tests[@]}" "${pytest_args[@]}"
if ((${#warmers[@]})); then
  # tests that ended early leave the warmers up to 60 s more (compiles they finish are not done inside a table's
  # limit); then those still compiling stop: nothing of theirs may run beside a timing
  waited=0
  any_warmer() { local pid; for pid in "${warmers[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
  while ((waited < 60 && budget - SECONDS > $(reserved_after kernel-tests) + 60)) && any_warmer; do
    sleep 2
    waited=$((waited + 2))
  done
  kill -TERM "${warmers[@]}" 2>/dev/null
  wait "${warmers[@]}" 2>/dev/null
  echo "   compile warmers done or stopped (${waited}s waited after the tests; $(cubins) cubins in the cache)"
fi

# The kernels' one-run ratio tables (the targets of the linear, LoRA and conv ops), then the end-to-end step with
# what is left (at least its floor): 5 timed steps after 2 (the first autotunes every shape), the issue's variants
# first (24 runs), (c') last.
stage linear-ratios 75 $python benchmarks/linear_ratios.py --json "$out/linear_ratios.json"
stage lora-ratios 60 $python benchmarks/lora_ratios.py --json "$out/lora_ratios.json"
stage conv-ratios 45 $python benchmarks/conv_ratios.py --json "$out/conv_ratios.json"
stage e2e-unet 300 $python benchmarks/e2e_unet.py "${e2e_args[@]}" "${extra_e2e_args[@]}" --json "$out/e2e_unet.json"
# SIGINT at the limit: pytest ends its session, and pytest-benchmark writes what it measured
stage_signal=INT stage microbench 120 $python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$out/microbench.json"

write_summary
timeout 60 $python - "$out/summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
print("\n".join(f"{r['stage']:<14} {r['outcome']:<26} {r['seconds']:>4}s" for r in summary["stages"]))
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
