"""The offline corruption-stage study: a tiny end-to-end run (the smoke preset) and the metrics and rules it relies
on, checked on inputs whose answers are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bnn_diffusion.study import METHODS, config_for, main
from bnn_diffusion.study.analysis import compare, profile, summarize_method
from bnn_diffusion.study.classifier import train_classifier, unseen_by_classifier
from bnn_diffusion.study.data import few_shot_indices, load_digits_images
from bnn_diffusion.study.finetune import shot_batch
from bnn_diffusion.study.metrics import (METRICS, Reference, entropy, evaluate_samples, frechet_distance,
                                         high_frequency_fraction, mean_pairwise_distance, nearest_neighbour_distance,
                                         total_variation)
from bnn_diffusion.study.pretrain import pretrained_diffusion


@pytest.fixture(scope="module")
def digits():
    return load_digits_images(16)


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------

def test_smoke_study_end_to_end(tmp_path, capsys):
    out, copy = tmp_path / "study", tmp_path / "results" / "study.json"
    assert main(["--out", str(out), "--preset", "smoke", "--no-progress", "--json", str(copy)]) == 0
    assert "report.md" in capsys.readouterr().out

    result = json.loads((out / "study-smoke.json").read_text())
    assert json.loads(copy.read_text()) == result
    assert {"runs", "config", "environment", "summary", "verdict", "real", "pretraining"} <= set(result)
    config = config_for("smoke")
    assert set(result["runs"]) == set(config.methods) == {"baseline", "bnn"}
    assert result["config"]["methods"] == list(config.methods)
    for method, run in result["runs"].items():
        record = run["seeds"]["0"]
        assert record["steps"] == config.eval_steps
        for name in METRICS:
            values = record["metrics"][name]
            assert len(values) == len(config.eval_steps)
            assert all(math.isfinite(v) for v in values), (method, name, values)
        assert all(math.isfinite(v) and v >= 0 for v in record["drift"])
        assert record["drift"][0] == 0 and record["drift"][-1] > 0  # it trained, starting from the pretrained model
        assert len(record["shot_indices"]) == config.shots
        # the shots are images of the class the judging classifier was not trained on
        labels = load_digits_images(8).labels.numpy()
        in_class = np.flatnonzero(labels == config.holdout_class)
        assert unseen_by_classifier(len(labels), config.pretrain_seed)[in_class[record["shot_indices"]]].all()
    bnn, baseline = result["runs"]["bnn"]["seeds"]["0"], result["runs"]["baseline"]["seeds"]["0"]
    assert all(s == pytest.approx(config.sigma_init, rel=0.05) for s in bnn["sigma_mean"])
    assert all(s is None for s in baseline["sigma_mean"])
    assert bnn["kl"][-1] > 0 and baseline["kl"] == [0.0] * len(config.eval_steps)
    assert bnn["drift"] != baseline["drift"]  # the weight noise changed the training
    assert result["verdict"]["methods"]["bnn"]["outcome"] in {"mitigates", "worsens", "no clear difference"}

    report = (out / "report.md").read_text()
    for figure in ("curves.png", "training.png", "shots.png", "samples-baseline.png", "samples-bnn.png"):
        assert (out / figure).stat().st_size > 1000
        assert f"({figure})" in report
    assert "## Answers" in report and "| baseline |" in report
    # the real digits' fidelity is also given on those the classifier never saw (the shots excluded)
    real = result["real"]
    labels = load_digits_images(8).labels.numpy()
    unseen_in_class = unseen_by_classifier(len(labels), config.pretrain_seed)[labels == config.holdout_class]
    assert real["unseen_by_classifier"] == unseen_in_class.sum() - config.shots
    assert 0 <= real["mean"]["fidelity_unseen"] <= 1
    assert f"on the {real['unseen_by_classifier']} it never saw it is {real['mean']['fidelity_unseen']:.3f}" in report

    # a second run reuses the cached pretraining and runs, and reproduces every number; it removes nothing a study
    # did not write (a figure of the user's, a JSON copy kept beside the report)
    (out / "samples-mine.png").write_bytes(b"mine")
    (out / "study-notes.json").write_text('{"my": "notes"}')
    inside_copy = out / "study-copy.json"
    assert main(["--out", str(out), "--preset", "smoke", "--no-progress", "--json", str(inside_copy)]) == 0
    assert main(["--out", str(out), "--preset", "smoke", "--no-progress"]) == 0
    assert (out / "samples-mine.png").read_bytes() == b"mine" and (out / "study-notes.json").exists()
    assert json.loads(inside_copy.read_text())["runs"] == result["runs"]
    again = json.loads((out / "study-smoke.json").read_text())
    assert again["pretraining"]["cached"] and again["classifier"]["cached"]
    assert again["timing"]["runs_cached"] == again["timing"]["runs"] == 2
    assert again["files"] == ["curves.png", "training.png", "shots.png", "samples-baseline.png", "samples-bnn.png",
                              "report.md"]
    assert again["runs"] == result["runs"] and again["summary"] == result["summary"]

    # a study with other settings does not replace this one's report unless asked to
    report_before = (out / "report.md").read_bytes()
    assert report_before.startswith(b"<!-- bnn-diffusion study ")
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(out), "--preset", "smoke", "--no-progress", "--steps", "6", "--methods", "bnn"])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "holds another study: " in message
    assert "study-smoke.json, written by `bnn-diffusion study --out" in message
    assert "--overwrite" in message
    assert (out / "report.md").read_bytes() == report_before and (out / "samples-baseline.png").exists()
    assert main(["--out", str(out), "--preset", "smoke", "--no-progress", "--steps", "6", "--methods", "bnn",
                 "--overwrite"]) == 0
    replaced = json.loads((out / "study-smoke.json").read_text())
    assert replaced["config"]["finetune_steps"] == 6 and list(replaced["runs"]) == ["bnn"]
    assert not (out / "samples-baseline.png").exists()  # the figure of a method the new report does not show
    assert (out / "samples-mine.png").exists() and (out / "study-notes.json").exists()
    assert (out / "report.md").read_bytes() != report_before


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--methods", "nonsense"])
    for bad in (["--seeds", "-1"], ["--seeds", "0", "0"], ["--methods", "bnn", "bnn"], ["--sigma-init", "0"],
                ["--prior-sigma", "-1"], ["--lr", "-1"], ["--kl-weight", "nan"], ["--kl-weight", "-1"],
                ["--cep-gamma", "-1"], ["--threads", "-1"], ["--seeds", str(2 ** 64 - 1)]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--preset", "smoke", *bad])
    assert not any(tmp_path.iterdir())  # refused before anything ran
    (tmp_path / "report.md").write_text("# my notes\n")
    with pytest.raises(SystemExit):  # a report.md this command did not write
        main(["--out", str(tmp_path), "--preset", "smoke", "--no-progress"])
    assert "report.md (without the mark of this command's reports" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "# my notes\n" and not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="preset"):
        config_for("huge")
    with pytest.raises(ValueError, match="unknown study settings"):
        config_for("quick", learning_rate=1.0)


def test_pretraining_refuses_the_held_out_class(tmp_path, digits):
    config = config_for("smoke")
    with pytest.raises(ValueError, match="held-out class"):
        pretrained_diffusion(config, digits, tmp_path, None)


# ---------------------------------------------------------------------------------------------------------------
# data and metrics on known inputs
# ---------------------------------------------------------------------------------------------------------------

def test_digits_and_shots(digits):
    assert digits.images.shape == (1797, 1, 16, 16) and digits.labels.shape == (1797,)
    assert digits.images.min() == -1 and digits.images.max() == 1
    assert set(digits.labels.tolist()) == set(range(10))
    assert 7 not in digits.without_class(7).labels.tolist()
    first = few_shot_indices(179, 3, seed=5)
    assert len(set(first.tolist())) == 3 and np.array_equal(first, few_shot_indices(179, 3, seed=5))
    assert not np.array_equal(first, few_shot_indices(179, 3, seed=6))
    with pytest.raises(ValueError, match="shots"):
        few_shot_indices(2, 3, seed=0)


@pytest.mark.parametrize("shots, batch", [(3, 8), (10, 8), (5, 2), (4, 4)])
def test_every_shot_is_trained_on_equally_often(shots, batch):
    steps = 60
    counts = torch.bincount(torch.cat([shot_batch(shots, batch, step) for step in range(1, steps + 1)]),
                            minlength=shots)
    assert counts.sum() == steps * batch and counts.max() - counts.min() <= 1
    assert torch.equal(shot_batch(shots, batch, 1), torch.arange(batch) % shots)


def test_distances_on_known_inputs(digits):
    shots = digits.images[:4]
    assert torch.allclose(nearest_neighbour_distance(shots[:2], shots), torch.zeros(2, dtype=torch.float64))
    shifted = (shots[:1] + 0.5)
    assert nearest_neighbour_distance(shifted, shots[:1]).item() == pytest.approx(0.5)
    assert mean_pairwise_distance(shots[:1].repeat(5, 1, 1, 1)) == pytest.approx(0.0, abs=1e-12)
    pair = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.25)])
    assert mean_pairwise_distance(pair) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mean_pairwise_distance(shots[:1])


def test_noise_measures_on_known_inputs():
    flat = torch.full((2, 1, 16, 16), 0.3)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).float().mul(2).sub(1)[None, None]
    wave = torch.cos(2 * math.pi * torch.arange(16) / 16).repeat(16, 1)[None, None]  # 1/16 cycle per pixel
    assert torch.equal(total_variation(flat), torch.zeros(2, dtype=torch.float64))
    assert total_variation(checker).item() == pytest.approx(2.0)
    assert torch.equal(high_frequency_fraction(flat, 0.25), torch.zeros(2, dtype=torch.float64))
    assert high_frequency_fraction(checker, 0.25).item() == pytest.approx(1.0)
    assert high_frequency_fraction(wave, 0.25).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_fraction(wave, 0.5)


def test_frechet_and_entropy_on_known_inputs():
    features = np.random.default_rng(0).normal(size=(200, 5))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert frechet_distance(features, 2 * features) > 1.0  # same mean, different spread
    assert entropy(torch.full((3, 10), 0.1)).tolist() == pytest.approx([math.log(10)] * 3)
    assert entropy(torch.eye(10)[:2]).tolist() == pytest.approx([0.0, 0.0], abs=1e-9)


def test_classifier_recognises_real_digits(digits):
    classifier, accuracy = train_classifier(digits, epochs=config_for("quick").classifier_epochs, seed=0)
    assert accuracy > 0.9
    real, shots = digits.of_class(3)[3:], digits.of_class(3)[:3]
    reference = Reference.build(classifier, 3, real, shots)
    values = reference.real_values(classifier, 48, seed=0)
    assert values["fidelity"] > 0.8
    assert values["hf_ratio"] == pytest.approx(1.0) and values["tv_ratio"] == pytest.approx(1.0)
    noisy = (real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    corrupted = evaluate_samples(noisy, classifier, reference)
    assert corrupted["hf_ratio"] > 2 and corrupted["tv_ratio"] > 1.5
    assert corrupted["frechet"] > values["frechet"]


# ---------------------------------------------------------------------------------------------------------------
# the rules that answer the study's questions
# ---------------------------------------------------------------------------------------------------------------

def test_noise_profiles():
    steps = list(range(0, 80, 10))
    assert profile(steps, [1, 1.4, 2, 2.2, 2, 1.4, 1.1, 1.0])["shape"] == "rise-and-fall"
    rising = profile(steps, [1, 1.4, 2, 2.2, 2.3, 2.3, 2.4, 2.4])
    assert rising["shape"] == "rise" and rising["peak_step"] == 70
    assert profile(steps, [1, 1.05, 1.1, 1.0, 1.05, 1.1, 1.0, 1.0])["shape"] == "flat"
    # the start is the step-0 value itself: smoothing it with step 1 would hide this 50% rise that recedes
    receding = profile(steps[:6], [1, 1.5, 1.5, 1.2, 1, 1])
    assert receding["start"] == 1 and receding["shape"] == "rise-and-fall"


def _records(peaks_by_seed: dict, fidelity: float) -> dict:
    steps = [0, 10, 20, 30, 40]
    records = {}
    for seed, peak in peaks_by_seed.items():
        metrics = {name: [0.5] * 5 for name in METRICS}
        metrics["hf_ratio"] = [1.0, peak, peak, peak, 1.0]
        metrics["fidelity"] = [0.0, fidelity, fidelity, fidelity, fidelity]
        records[seed] = {"steps": steps, "metrics": metrics, "train_loss": [None, 1, 1, 1, 1], "kl": [0.0] * 5,
                         "sigma_mean": [None] * 5, "drift": [0.0, 0.1, 0.2, 0.3, 0.4]}
    return records


def test_mitigation_rule():
    baseline = summarize_method(_records({"0": 2.0, "1": 2.2}, fidelity=0.9))
    assert compare(summarize_method(_records({"0": 1.5, "1": 1.6}, fidelity=0.9)), baseline) == "mitigates"
    # lower noise bought by not learning the subject does not count
    assert compare(summarize_method(_records({"0": 1.5, "1": 1.6}, fidelity=0.5)), baseline) == "no clear difference"
    # lower in one seed only
    assert compare(summarize_method(_records({"0": 1.5, "1": 2.4}, fidelity=0.9)), baseline) == "no clear difference"
    assert compare(summarize_method(_records({"0": 2.5, "1": 2.6}, fidelity=0.9)), baseline) == "worsens"


def test_methods_cover_the_brief():
    assert {"baseline", "bnn", "bnn-kl", "cep", "bnn-cep"} <= set(METHODS)
    assert METHODS["bnn"].bayesian and not METHODS["bnn"].kl and METHODS["bnn-kl"].kl
    assert METHODS["bnn-cep"].bayesian and METHODS["bnn-cep"].cep and not METHODS["baseline"].bayesian
