"""benchmarks/gpu_suite.sh on this machine (no GPU): stage selection, the time budget and summary.json.

The GPU figures need a GPU; what is checked here is the plumbing one call on a GPU machine relies on.  No timing is
asserted: a stage's outcome is "ok", "not selected" or "skipped (budget)", never a race against its limit.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STAGES = ["build", "kernel-tests", "linear-ratios", "lora-ratios", "conv-ratios", "e2e-unet", "microbench"]


def run_suite(out, **settings):
    env = {**os.environ, "PYTHON": sys.executable, **settings}
    done = subprocess.run(["bash", str(SUITE), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    return done, summary


def outcomes(summary):
    return {row["stage"]: row["outcome"] for row in summary["stages"]}


def test_selected_stage_runs_and_writes_its_json(tmp_path):
    done, summary = run_suite(tmp_path, SUITE_STAGES="linear-ratios")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [row["stage"] for row in summary["stages"]] == STAGES
    assert outcomes(summary) == {s: "ok" if s == "linear-ratios" else "not selected" for s in STAGES}
    ratios = json.loads((tmp_path / "linear_ratios.json").read_text())
    assert ratios["shapes"] and all(shape["ratios"] for shape in ratios["shapes"].values())
    assert "no GPU: nothing copied" in done.stdout


def test_a_spent_budget_skips_every_stage_without_failing(tmp_path):
    done, summary = run_suite(tmp_path, SUITE_BUDGET_S="10")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["budget_seconds"] == 10
    assert set(outcomes(summary).values()) == {"skipped (budget)"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("value", ["0", "1"])
def test_autotune_switch_sets_the_config_lists(value):
    """BNN_TRITON_AUTOTUNE=0 leaves each autotuned kernel one config (what the suite's GPU tests run with)."""
    code = ("from bnn_kernels.triton import linear, lora; "
            "print(len(linear._reparam_fwd_kernel.configs), len(lora._lora_fwd_kernel.configs))")
    env = {**os.environ, "TRITON_INTERPRET": "0", "BNN_TRITON_AUTOTUNE": value}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(n) for n in done.stdout.split()]
    assert (counts == [1, 1]) if value == "0" else min(counts) > 1


def test_autotune_switch_rejects_other_values():
    env = {**os.environ, "TRITON_INTERPRET": "0", "BNN_TRITON_AUTOTUNE": "yes"}
    done = subprocess.run([sys.executable, "-c", "import bnn_kernels.triton.linear"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "BNN_TRITON_AUTOTUNE must be 0 or 1" in done.stderr
