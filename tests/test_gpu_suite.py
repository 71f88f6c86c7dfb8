"""benchmarks/gpu_suite.sh on this machine (no GPU): stage selection, the time budget and summary.json.

The GPU figures need a GPU; what is checked here is the plumbing one call on a GPU machine relies on.  No timing is
asserted: a stage's outcome is "ok", "not selected" or "skipped (budget)", never a race against its limit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STAGES = ["build", "kernel-tests", "linear-ratios", "lora-ratios", "conv-ratios", "e2e-unet", "microbench"]


def run_suite(out, **settings):
    # no carried wheels: a .whl/ in the checkout would put its diffusers ahead of what a test gives
    # a Triton cache of its own: new_cubins counts only this suite's compiles, not a parallel pass's
    env = {**os.environ, "PYTHON": sys.executable, "SUITE_WHEELS": str(out / "no-wheels"),
           "TRITON_CACHE_DIR": str(out / "triton-cache"), **settings}
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
    assert {row["new_cubins"] for row in summary["stages"]} == {0}  # the interpreter compiles no cubin
    environment = summary["environment"]
    assert environment["torch"] == torch.__version__ and environment["triton"] and environment["date"]
    assert environment["settings"]["SUITE_STAGES"] == "linear-ratios"
    assert len(environment["source_sha256"]) == 16  # what ran, committed or not
    ratios = json.loads((tmp_path / "linear_ratios.json").read_text())
    assert ratios["shapes"] and all(shape["ratios"] for shape in ratios["shapes"].values())
    for shape in ratios["shapes"].values():  # float32 on CPU: the fused ops agree with the float64 oracle
        errors = shape["errors_vs_float64"]
        assert set(errors) == {"fused-reparam", "fused-lrt"}
        assert {"y", "kl", "dx", "dmu", "drho", "dbias"} <= set(errors["fused-lrt"])
        assert all(ours < 1e-5 and plain < 1e-5 for outputs in errors.values() for ours, plain in outputs.values())
    assert "no GPU: nothing copied" in done.stdout


def test_a_spent_budget_skips_every_stage_without_failing(tmp_path):
    done, summary = run_suite(tmp_path, SUITE_BUDGET_S="10")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["budget_seconds"] == 10
    assert set(outcomes(summary).values()) == {"skipped (budget)"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.log", "summary.json"]
    assert "skipped" in (tmp_path / "suite.log").read_text()


def test_floors_keep_time_for_the_end_to_end_stage(tmp_path):
    """A stage gets what is left less the floors of the selected stages after it: with 229 s of budget the
    e2e stage's 210 s floor leaves the test stage under 20 s (skipped), and e2e-unet still runs, with the
    arguments SUITE_E2E_ARGS adds."""
    done, summary = run_suite(tmp_path, SUITE_BUDGET_S="229", SUITE_STAGES="kernel-tests e2e-unet",
                              SUITE_TESTS="tests/test_kl.py", SUITE_E2E_ARGS="--variants full-ft --checkpointing off")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert outcomes(summary)["kernel-tests"] == "skipped (budget)"
    assert outcomes(summary)["e2e-unet"] == "ok"
    assert "210s kept for the stages after it" in done.stdout
    runs = json.loads((tmp_path / "e2e_unet.json").read_text())["runs"]
    assert [(r["variant"], r["gradient_checkpointing"], r["status"]) for r in runs] == [("full-ft", False, "ok")]


def test_without_diffusers_the_e2e_stage_is_reported_and_its_floor_freed(tmp_path):
    """No diffusers (the GPU image has none unless its wheel travels in .whl/): the suite says so, marks e2e-unet
    as unable to run, fails, and the 210 s e2e floor no longer holds back the stage before it."""
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('diffusers is not installed here')\n")
    out = tmp_path / "out"
    done, summary = run_suite(out, SUITE_BUDGET_S="169", SUITE_STAGES="kernel-tests e2e-unet",
                              SUITE_TESTS="tests/test_kl.py::test_gaussian_kl_matches_float64_formula",
                              PYTHONPATH=str(tmp_path / "shadow"))
    assert done.returncode == 1
    assert "diffusers does not import" in done.stdout
    assert outcomes(summary)["e2e-unet"] == "cannot run here (see suite.log)"
    assert outcomes(summary)["kernel-tests"] == "ok"


def test_a_failing_variant_or_shape_is_recorded_and_the_table_goes_on(tmp_path, monkeypatch, capsys):
    """ratios.run_ratio_table on a first GPU launch: a variant that raises is left out of that shape's timing and
    ratios (recorded with its error), a shape whose case cannot be built is recorded as such, and the JSON holds the
    machine from the start and every shape's record, the last one's too."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ratios

    def make_case(shape, dtype, device):
        if shape == "broken":
            raise RuntimeError("first line\nCUDA error: an illegal memory access")

        def step(variant):
            if variant == "b" and shape == "one":
                raise ValueError("b cannot run this shape")

        return ratios.Case(step=step, saved=lambda variant: 0, record={"shape": shape})

    path = tmp_path / "table.json"
    results = ratios.run_ratio_table(
        ["--json", str(path), "--repeats", "1", "--warmup", "0"], description="test",
        gpu_shapes={}, cpu_shapes={"one": "one", "two": "two", "broken": "broken"},
        variants=lambda device: ["a", "b", "c"], make_case=make_case,
        ratios={"b_over_a": ("b", "a"), "c_over_a": ("c", "a")}, saved_unit="KiB", saved_variants=("a", "b"))
    assert json.loads(path.read_text())["shapes"] == results["shapes"]
    one, broken, two = (results["shapes"][name] for name in ("one", "broken", "two"))
    assert one["failed"] == {"b": "ValueError: b cannot run this shape"}
    assert set(one["seconds"]) == {"a", "c"} and set(one["ratios"]) == {"c_over_a"}
    assert broken == {"error": "RuntimeError: CUDA error: an illegal memory access"}
    assert set(two["seconds"]) == {"a", "b", "c"} and set(two["ratios"]) == {"b_over_a", "c_over_a"}
    assert "b failed: ValueError" in capsys.readouterr().out


def test_compile_only_compiles_the_tables_kernels_without_timing_them(tmp_path):
    """ratios.py and e2e_unet.py --compile-only (what the suite runs beside the GPU tests, to warm Triton's cache):
    every kernel a table or a variant of ours launches compiles with the real compiler (here for sm_90, no GPU
    needed), and nothing is timed or written."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "BNN_TRITON_AUTOTUNE": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_ratios.py"), "--compile-only",
                           "--dtype", "bfloat16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = [int(line.split(": ")[1].split()[0]) for line in done.stdout.splitlines() if "kernel compiles" in line]
    assert len(counts) == 2 and min(counts) > 0, done.stdout
    assert "failed" not in done.stdout and "wrote" not in done.stdout
    assert any(tmp_path.rglob("*.cubin")), "nothing reached Triton's cache"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e_unet.py"), "--config", "tiny",
                           "--latent-size", "8", "--variants", "full-ft", "ours-dreambooth", "--compile-only"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "kernel compiles" in line]
    assert len(lines) == 1 and lines[0].startswith("ours-dreambooth: ") and int(lines[0].split()[1]) > 0, lines
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["0", "1"])
def test_autotune_switch_sets_the_config_lists(value):
    """BNN_TRITON_AUTOTUNE=0 leaves each autotuned kernel one config (what the suite's GPU tests run with)."""
    code = ("from bnn_kernels.triton import linear, lora; "
            "print(len(linear._reparam_fwd_kernel.configs), len(lora._lora_fwd_tuned.configs), "
            "len(lora._lora_fwd_wide_base_tuned.configs))")
    env = {**os.environ, "TRITON_INTERPRET": "0", "BNN_TRITON_AUTOTUNE": value}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(n) for n in done.stdout.split()]
    assert (counts == [1, 1, 1]) if value == "0" else min(counts) > 1


@pytest.mark.parametrize("value", [None, "0", "1"])
def test_autotune_picks_are_kept_on_disk_unless_switched_off(value):
    """BNN_TRITON_AUTOTUNE_CACHE (default 1): every autotuned kernel passes Triton's cache_results, and times
    its configs with common.time_config."""
    code = ("from bnn_kernels.triton import common, conv, linear, lora\n"
            "import triton\n"
            "tuners = [k for m in (linear, lora, conv) for k in vars(m).values()"
            " if isinstance(k, triton.runtime.Autotuner)]\n"
            "assert all(k._do_bench is common.time_config for k in tuners)\n"
            "print(len(tuners), *sorted({k.cache_results for k in tuners}))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("BNN_TRITON_AUTOTUNE_CACHE", None)
    env.pop("TRITON_CACHE_AUTOTUNING", None)  # Triton's own switch, which turns it on as well
    if value is not None:
        env["BNN_TRITON_AUTOTUNE_CACHE"] = value
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    count, *states = done.stdout.split()
    assert int(count) >= 9 and states == (["False"] if value == "0" else ["True"])


@pytest.mark.parametrize("name", ["BNN_TRITON_AUTOTUNE", "BNN_TRITON_AUTOTUNE_CACHE"])
def test_autotune_switches_reject_other_values(name):
    env = {**os.environ, "TRITON_INTERPRET": "0", name: "yes"}
    done = subprocess.run([sys.executable, "-c", "import bnn_kernels.triton.linear"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"{name} must be 0 or 1" in done.stderr


def test_result_log_writes_each_outcome_as_it_comes(tmp_path):
    """BNN_TEST_LOG (tests/result_log.py): a line per pass, failure (with its message) and skip, also under xdist
    (only the controller writes) - what the suite reads back when its test stage is stopped at a time limit."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes():\n    assert True\n"
        "def test_fails():\n    assert 1 + 1 == 3, 'arithmetic'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    log = tmp_path / "results.jsonl"
    extra = [[], ["-n", "2"]] if importlib.util.find_spec("xdist") else [[]]
    for args in extra:
        log.unlink(missing_ok=True)
        env = {**os.environ, "BNN_TEST_LOG": str(log), "PYTHONPATH": str(ROOT / "tests")}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "result_log", "-p", "no:cacheprovider",
                               str(tmp_path / "test_sample.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stdout[-3000:]
        records = {r["test"].split("::")[-1]: r for r in map(json.loads, log.read_text().splitlines())}
        assert sorted(records) == ["test_fails", "test_passes", "test_skipped"], records
        assert records["test_passes"]["outcome"] == "passed" and "message" not in records["test_passes"]
        assert records["test_fails"]["outcome"] == "failed" and "arithmetic" in records["test_fails"]["message"]
        assert records["test_skipped"]["outcome"] == "skipped" and "not here" in records["test_skipped"]["message"]


def test_launch_census_counts_the_specialisations_a_run_compiles(tmp_path):
    """benchmarks/launch_census.py: as a plugin it logs each interpreted launch; as a script it counts distinct
    specialisations per kernel (one KL test in float32 and one in bfloat16: two of the KL forward kernel)."""
    census = tmp_path / "launches.jsonl"
    env = {**os.environ, "LAUNCH_CENSUS": str(census), "PYTHONPATH": str(ROOT / "benchmarks"),
           "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "launch_census", "-p", "no:cacheprovider",
                           "tests/test_kl.py::test_gaussian_kl_matches_float64_formula", "-k",
                           "triton and softplus and shape1 and True and (dtype0 or dtype1)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout, done.stdout[-2000:]
    summary = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "launch_census.py"), str(census)],
                             capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    rows = dict(line.split()[:2] for line in summary.stdout.splitlines())
    assert rows["_kl_fwd_kernel"] == "2", summary.stdout


def test_test_stage_logs_each_outcome_and_counts_them_in_the_summary(tmp_path):
    """The kernel-tests stage on SUITE_TESTS (one KL test file here): tests.jsonl holds one line per outcome and
    summary.json their counts; suite.log holds the console output."""
    done, summary = run_suite(tmp_path, SUITE_STAGES="kernel-tests", SUITE_TESTS="tests/test_kl.py")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert outcomes(summary)["kernel-tests"] == "ok"
    records = [json.loads(line) for line in (tmp_path / "tests.jsonl").read_text().splitlines()]
    passed = sum(r["outcome"] == "passed" for r in records)
    assert passed > 0 and summary["kernel_tests"] == {"passed": passed} and summary["kernel_tests_failed"] == []
    assert all(r["test"].startswith("tests/test_kl.py::") for r in records)
    assert f"{passed} passed" in (tmp_path / "suite.log").read_text()
