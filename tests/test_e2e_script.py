"""The end-to-end benchmark script at its smallest size (tiny UNet, 8x8 latents, batch 1, one timed step), and its
paper-style baseline.  Checks what the JSON holds and the byte counts that do not depend on timing; no timing is
asserted.
"""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_bayes  # noqa: E402
from e2e_step import VARIANTS  # noqa: E402

TARGETS = {"c-memory-vs-a", "c'-memory-vs-a", "c-memory-vs-b", "c-time-vs-a", "e-time-vs-d", "e-memory-vs-d"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "e2e_unet.py"), "--config", "tiny", "--latent-size", "8",
               "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"e2e_unet.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "# targets" in done.stdout
    return json.loads(out.read_text())


def test_environment_and_settings(results):
    env = results["environment"]
    for key in ("device", "torch", "triton", "diffusers", "peft", "date"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert results["config"] == "tiny" and results["latent_size"] == 8
    assert results["unet_config"]["block_out_channels"] == [32, 64]
    assert "bfloat16 autocast" in results["precision"]


def test_one_run_per_variant_and_checkpointing_mode(results):
    runs = results["runs"]
    assert sorted((r["variant"], r["gradient_checkpointing"]) for r in runs) == sorted(
        (v, ckpt) for v in VARIANTS for ckpt in (False, True))
    for run in runs:
        assert run["batch_size"] == 1
        assert run["status"] == "ok", (run["variant"], run.get("reason"))
        assert run["step_seconds"]["median"] > 0 and len(run["step_seconds"]["all"]) == 1
        assert math.isfinite(run["loss"])
        accounted = run["accounted"]
        assert accounted["total_bytes"] == sum(accounted[k] for k in (
            "model_bytes", "frozen_copy_bytes", "grad_bytes", "optimizer_state_bytes", "saved_tensor_bytes"))
        # AdamW keeps two moments per trainable element; gradients are as large as the trainable parameters
        assert accounted["optimizer_state_bytes"] == 2 * accounted["trainable_param_bytes"]
        assert accounted["grad_bytes"] == accounted["trainable_param_bytes"] == 4 * run["trainable_params"]


def _runs(results, checkpointing):
    return {r["variant"]: r for r in results["runs"] if r["gradient_checkpointing"] == checkpointing}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layer_sets_and_inherent_bytes(results, checkpointing):
    runs = _runs(results, checkpointing)
    full, paper, ours = runs["full-ft"], runs["paper"], runs["ours-dreambooth"]
    assert full["layers"] == paper["layers"] == ours["layers"] > 0
    # ours trains the same weights and biases (as mu) plus one sigma per weight element
    assert ours["trainable_params"] == full["trainable_params"] + ours["sigma_params"]
    assert paper["trainable_params"] == ours["trainable_params"]
    # the inherent extra: sigma, its gradient and AdamW's two moments, float32
    assert ours["inherent_sigma_bytes"] == 4 * 4 * ours["sigma_params"]
    assert runs["ours-dreambooth-bf16prior"]["prior_mean_bytes"] * 2 == ours["prior_mean_bytes"]
    # the paper's copy of the whole model: every parameter and buffer of the unpatched UNet
    assert paper["frozen_copy_bytes"] == full["accounted"]["model_bytes"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_tensor_bytes(results, checkpointing):
    runs = _runs(results, checkpointing)
    full, paper, ours = (runs[v]["accounted"]["saved_tensor_bytes"] for v in ("full-ft", "paper", "ours-dreambooth"))
    paper_kl = runs["paper"]["accounted"]["saved_by_kl_bytes"]
    weights = runs["ours-dreambooth"]["sigma_params"]
    # ours keeps nothing weight-sized for backward: no more than the deterministic layers (which keep bf16 weights)
    assert ours <= full
    assert runs["ours-dreambooth"]["accounted"]["saved_by_kl_bytes"] == 0  # the KL comes out of the fused ops
    # the paper's KL graph keeps weight-sized float32 tensors; without checkpointing its forward also keeps eps
    # (float32) and the bf16 sample of every Bayesian weight (with it they live inside the checkpointed blocks)
    assert paper_kl >= 4 * weights
    if not checkpointing:
        assert paper - paper_kl - ours >= 4 * weights


def test_targets_evaluated_for_every_pair(results):
    targets = results["targets"]
    for checkpointing in (False, True):
        names = {t["target"] for t in targets if t["gradient_checkpointing"] == checkpointing}
        assert names == TARGETS
    for target in targets:
        assert target["status"] in ("met", "missed")
        if target["target"] == "c-memory-vs-a":
            assert target["limit_bytes"] == target["a_bytes"] + target["allowance_bytes"]


E2E_TINY = ["--config", "tiny", "--latent-size", "8", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0"]


def run_e2e(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e_unet.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_resume_keeps_earlier_runs_and_runs_the_missing_and_failed_ones(results, tmp_path):
    """--resume (what a second GPU call uses when the first was stopped at its limit): the earlier runs stay as
    they were, a run that is missing or ended in an error runs again, the targets cover both."""
    def key(run):
        return run["variant"], run["gradient_checkpointing"]
    missing, failed = ("peft-lora", True), ("ours-lora", True)
    earlier = dict(results, runs=[dict(r, status="error", reason="RuntimeError: x") if key(r) == failed else r
                                  for r in results["runs"] if key(r) != missing])
    partial, out = tmp_path / "partial.json", tmp_path / "resumed.json"
    partial.write_text(json.dumps(earlier))
    done = run_e2e(*E2E_TINY, "--resume", str(partial), "--json", str(out))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"{len(results['runs']) - 2} runs kept, 2 to run" in done.stdout
    resumed = json.loads(out.read_text())
    assert [key(r) for r in resumed["runs"]] == [key(r) for r in results["runs"]]  # the uninterrupted order
    for before, after in zip(results["runs"], resumed["runs"]):
        assert after["status"] == "ok"
        if key(before) in (missing, failed):
            assert after["step_seconds"] != before["step_seconds"]  # measured again (float timings never repeat)
        else:
            assert after == before
    assert {t["status"] for t in resumed["targets"]} <= {"met", "missed"} and len(resumed["targets"]) == 12
    assert resumed["resumed_from"] == {"path": str(partial), "runs_kept": len(results["runs"]) - 2}


def test_resume_refuses_a_file_measured_differently(results, tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(results))
    done = run_e2e(*E2E_TINY, "--repeats", "2", "--resume", str(partial))
    assert done.returncode == 2 and "measured differently: repeats (1 there, 2 here)" in done.stderr, done.stderr
    partial.write_text("{not json")
    done = run_e2e(*E2E_TINY, "--resume", str(partial))
    assert done.returncode == 2 and "cannot read it" in done.stderr, done.stderr


# --------------------------------------------------------------------------------------------------------------
# the paper-style baseline
# --------------------------------------------------------------------------------------------------------------

def test_paper_layer_samples_in_train_and_uses_mu_in_eval():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5)
    layer = paper_bayes.PaperBayesLinear(linear, sigma_init=0.01)
    x = torch.randn(3, 7)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    assert (first - linear(x)).abs().max() < 0.2
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x))


def test_paper_patch_keeps_a_frozen_copy_and_computes_the_reverse_kl():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    pretrained = model[2].weight.detach().clone()
    bayes = paper_bayes.patch(model, ["2"], sigma_init=0.02, prior_sigma=0.01)
    assert isinstance(model[2], paper_bayes.PaperBayesLinear) and isinstance(model[0], nn.Linear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["2.weight_mu", "2.weight_sigma", "2.bias"]
    assert all(not p.requires_grad for p in bayes.frozen.parameters())
    with torch.no_grad():
        model[2].weight_mu.add_(0.05)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(pretrained.double(), 0.01),
        torch.distributions.Normal(model[2].weight_mu.detach().double(), 0.02)).sum()
    kl = bayes.kl()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    kl.backward()
    assert model[2].weight_mu.grad is not None and model[2].weight_sigma.grad is not None
    with pytest.raises(TypeError, match="names"):
        paper_bayes.patch(model, ["1"])


@pytest.mark.parametrize("adamw", ["default", "fused", "foreach", "for-loop"])
def test_the_library_warm_up_runs_with_every_adamw(adamw):
    """warm_up_libraries (run on a GPU before the first measured run) with every --adamw, here on CPU tensors."""
    import e2e_unet

    e2e_unet.warm_up_libraries(torch.device("cpu"), adamw)
