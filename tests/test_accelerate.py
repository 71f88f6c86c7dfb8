"""Multi-process training: the end-to-end step (tiny UNet, bnn_diffusion's paper-dreambooth preset) under
``accelerate launch`` on two CPU processes (gloo), as a multi-GPU run would do it on two GPUs.

``benchmarks/e2e_step.py`` writes what each rank saw; the ranks train on different data, so identical gradients
and parameters after the step can only come from the all-reduce, and the all-reduced gradient must be the mean of
the ranks' own gradients (compared through a fixed random projection of all of them).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               str(ROOT / "benchmarks" / "e2e_step.py"), "--cpu", "--config", "tiny", "--latent-size", "8",
               "--variant", "ours-dreambooth", "--batch-size", "2", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"accelerate launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    reports = sorted(out.glob("rank-*.json"))
    return [json.loads(path.read_text()) for path in reports]


def test_both_ranks_ran_on_gloo(ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    for report in ranks:
        assert report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["distributed_type"].endswith("MULTI_CPU")
        assert report["device"].startswith("cpu")


def test_loss_and_kl_finite_and_every_trainable_parameter_has_a_gradient(ranks):
    for report in ranks:
        assert math.isfinite(report["loss"]) and math.isfinite(report["kl"])
        # before the first update mu = prior mean and sigma = prior sigma (0.01): the KL is 0 up to rounding
        assert abs(report["kl"]) < 1e-2
        assert report["missing_grads"] == 0


def test_gradients_were_all_reduced(ranks):
    first, second = ranks
    # different data on each rank: different losses and different local gradients ...
    assert first["local_loss"] != second["local_loss"]
    assert first["local_grad_probe"] != pytest.approx(second["local_grad_probe"], rel=1e-3)
    # ... but one all-reduced gradient, the mean of the local ones
    assert first["grad_digest"] == second["grad_digest"]
    mean = 0.5 * (first["local_grad_probe"] + second["local_grad_probe"])
    assert first["grad_probe"] == pytest.approx(mean, rel=1e-4, abs=1e-6 * abs(first["local_grad_probe"]))


def test_parameters_identical_across_ranks_after_the_step(ranks):
    first, second = ranks
    assert first["params_before"] == second["params_before"]
    assert first["params_after"] == second["params_after"]
    assert first["params_after"] != first["params_before"]
