"""End-to-end tests of ``bnn-diffusion finetune`` (bnn_diffusion.train) on a tiny Stable Diffusion written to disk.

Every run is offline and in-process: a tiny pipeline (tests/tiny_pipeline.py) and three photos from scikit-image,
resolution 16, two to four steps.  The outputs are reloaded the way a user would (``UNet2DConditionModel.
from_pretrained`` / ``StableDiffusionPipeline.load_lora_weights``) and compared with the merged model the run
returned.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

import bnn_diffusion as bd  # noqa: E402
from bnn_diffusion import train as trainer  # noqa: E402

import tiny_pipeline  # noqa: E402

PROMPT = "a photo of sks dog"
RECORD_KEYS = ("loss", "mse", "kl", "sigma_mean", "sigma_min", "sigma_max", "grad_norm", "lr")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd")
    model = tiny_pipeline.write_tiny_pipeline(root / "model")
    images = tiny_pipeline.write_instance_images(root / "instance", count=3, size=24)
    return model, images


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each run builds its own Accelerator (mixed precision differs between runs): start from a clean state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _argv(tiny_sd, output_dir, *extra) -> list:
    model, images = tiny_sd
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", PROMPT, "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
            "--checkpointing_steps", "2", "--seed", "0", "--output_dir", str(output_dir), *extra]


def _run(tiny_sd, output_dir, *extra) -> "trainer.TrainResult":
    return trainer.train(trainer.parse_args(_argv(tiny_sd, output_dir, *extra)))


def _records(output_dir) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _unet_inputs(unet, batch=2):
    generator = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    text = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 70]), text


@torch.no_grad()
def _unet_output(unet) -> torch.Tensor:
    sample, timesteps, text = _unet_inputs(unet)
    return unet.eval()(sample, timesteps, encoder_hidden_states=text).sample


def _generates(pipeline) -> None:
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(PROMPT, num_inference_steps=2, height=16, width=16, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _assert_png(path) -> None:
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


def _assert_records(records, steps, bayesian=True) -> None:
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert all(isinstance(record[k], float) and record[k] == record[k] for k in ("loss", "mse", "lr"))
        assert record["skipped"] is False  # float32 / bfloat16: no gradient scaler to skip a step
        if bayesian:
            assert record["kl"] >= 0 and 0 < record["sigma_min"] <= record["sigma_mean"] <= record["sigma_max"]
        else:
            assert record["kl"] is None and "sigma_mean" not in record


# ----------------------------------------------------------------------------------------------------------------
# full fine-tuning with Bayesian layers + CEP: outputs, resume, reload
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tiny_sd, tmp_path_factory):
    """4 steps of full fine-tuning, paper-dreambooth Bayesian layers, KL weight > 0, CEP-G, checkpoints at 2 and
    4, validation grids."""
    AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = tmp_path_factory.mktemp("full") / "out"
    result = _run(tiny_sd, output_dir, "--max_train_steps", "4", "--method", "full", "--preset", "paper-dreambooth",
                  "--kl_weight", "1e-3", "--cep", "gaussian", "--learning_rate", "1e-3", "--validation_prompt",
                  PROMPT, "--num_validation_images", "2", "--validation_inference_steps", "2")
    AcceleratorState._reset_state(reset_partial_state=True)
    return output_dir, result


def test_full_run_writes_metrics_plot_grids_checkpoints(full_run, tiny_sd):
    output_dir, result = full_run
    records = _records(output_dir)
    _assert_records(records, 4)
    assert records == result.metrics
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # mu = prior mean and sigma = prior sigma at step 1
    assert records[-1]["kl"] > records[0]["kl"]  # the update moved mu away from the prior
    assert records[0]["loss"] == pytest.approx(records[0]["mse"] + 1e-3 * records[0]["kl"], rel=1e-6)
    _assert_png(output_dir / "metrics.png")
    for step in (2, 4):
        _assert_png(output_dir / "validation" / f"step-{step:06d}.png")
        checkpoint = output_dir / f"checkpoint-{step}"
        state = json.loads((checkpoint / "training_state.json").read_text())
        assert state["global_step"] == step
        assert {"trainable_parameters.safetensors", "optimizer.bin", "random_states_0.pkl"} <= \
            {p.name for p in checkpoint.iterdir()}
    assert not [p.name for p in output_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"
    config = json.loads((output_dir / "training_config.json").read_text())
    base = UNet2DConditionModel.from_pretrained(tiny_sd[0] / "unet")
    blocks = [m for m in base.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert config["bayesian_layers"] == result.bayesian_layers and len(result.bayesian_layers) == 6 * len(blocks)


def test_full_run_reloads_as_the_merged_unet(full_run, tiny_sd):
    output_dir, result = full_run
    assert not bd.bayesian_modules(result.unet), "the returned UNet is merged"
    reloaded = UNet2DConditionModel.from_pretrained(output_dir / "unet")
    torch.testing.assert_close(_unet_output(reloaded), _unet_output(result.unet), rtol=0, atol=0)
    base = UNet2DConditionModel.from_pretrained(tiny_sd[0] / "unet")
    assert not torch.equal(_unet_output(reloaded), _unet_output(base)), "fine-tuning changed nothing"
    _generates(StableDiffusionPipeline.from_pretrained(tiny_sd[0], unet=reloaded))


def test_full_run_output_is_a_whole_pipeline(full_run, tiny_sd):
    """As diffusers' DreamBooth script: the output directory loads as the fine-tuned pipeline; the parts that did
    not train are the checkpoint's files (weight files hard links on the same file system, no second copy)."""
    output_dir, result = full_run
    pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
    torch.testing.assert_close(_unet_output(pipeline.unet), _unet_output(result.unet), rtol=0, atol=0)
    _generates(pipeline)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for source in (tiny_sd[0] / part).iterdir():
            target = output_dir / part / source.name
            assert target.read_bytes() == source.read_bytes()
            # weight files are links (one file system here); configs are copies: diffusers rewrites those in
            # place when a pipeline is saved over the folder, which must not rewrite the base model's
            assert target.samefile(source) == source.name.endswith(trainer.WEIGHT_SUFFIXES), target
    assert json.loads((output_dir / "model_index.json").read_text()) == \
        json.loads((tiny_sd[0] / "model_index.json").read_text())


def test_resume_continues_the_same_loss_curve(full_run, tiny_sd, tmp_path):
    """A run interrupted after its step-2 checkpoint and resumed with `latest` gives the uninterrupted run's
    records for steps 3 and 4 and the same final weights (the later records of the interrupted run are dropped),
    also with the base model moved to another folder; training_config.json keeps the interrupted run's record."""
    output_dir, _ = full_run
    resumed = tmp_path / "out"
    shutil.copytree(output_dir, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "unet")
    with open(resumed / "metrics.jsonl", "a") as handle:  # a record the interrupted run wrote after its checkpoint
        handle.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
        handle.write('{"step": 4, "lo')  # and a line cut off when it was killed mid-write
    moved = (shutil.copytree(tiny_sd[0], tmp_path / "moved-model"), tiny_sd[1])
    _run(moved, resumed, "--max_train_steps", "4", "--method", "full", "--preset", "paper-dreambooth",
         "--kl_weight", "1e-3", "--cep", "gaussian", "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest")
    expected, got = _records(output_dir), _records(resumed)
    config = json.loads((resumed / "training_config.json").read_text())
    assert (config["resumed_from"], config["resumed_at_step"]) == ("checkpoint-2", 2)
    assert [run["args"]["pretrained_model_name_or_path"] for run in config["earlier_runs"]] == [str(tiny_sd[0])]
    assert config["args"]["pretrained_model_name_or_path"] == str(moved[0])
    assert config["checks"]["base_unet"] == config["earlier_runs"][0]["checks"]["base_unet"]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # the interrupted run's grid after the checkpoint went (this resume writes none)
    assert sorted(path.name for path in (resumed / "validation").iterdir()) == ["step-000002.png"]
    for want, have in zip(expected, got):
        for key in RECORD_KEYS:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (have["step"], key)
    first = UNet2DConditionModel.from_pretrained(output_dir / "unet").state_dict()
    second = UNet2DConditionModel.from_pretrained(resumed / "unet").state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_trains_at_the_learning_rate_and_schedule_of_its_flags(full_run, tiny_sd, tmp_path, capsys):
    """The optimizer state a checkpoint restores carries its learning rate and Adam settings: a resume with another
    --learning_rate and schedule trains at the new ones from the resumed step on (records give the rate each step
    trained at: the linear schedule of 4 steps at 1e-2 is 5e-3 at step 3), with the checkpoint's moments."""
    output_dir, _ = full_run
    resumed = tmp_path / "out"
    shutil.copytree(output_dir, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "unet")
    _run(tiny_sd, resumed, "--max_train_steps", "4", "--method", "full", "--preset", "paper-dreambooth",
         "--kl_weight", "1e-3", "--cep", "gaussian", "--learning_rate", "1e-2", "--lr_scheduler", "linear",
         "--lr_warmup_steps", "0", "--resume_from_checkpoint", "latest")
    assert [r["lr"] for r in _records(resumed)] == pytest.approx([1e-3, 1e-3, 5e-3, 2.5e-3], rel=1e-9)
    assert "learning rate 0.01 from the flags (the checkpoint's: 0.001)" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_curve(full_run, tiny_sd, tmp_path):
    """Recomputing activations redraws the same per-layer seeds (torch's RNG is restored for the recomputation) and
    the KL gradient still flows: the first two steps match the run without checkpointing."""
    output_dir, _ = full_run
    _run(tiny_sd, tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "100", "--method", "full",
         "--preset", "paper-dreambooth", "--kl_weight", "1e-3", "--cep", "gaussian", "--learning_rate", "1e-3",
         "--gradient_checkpointing")
    got = _records(tmp_path / "out")
    assert len(got) == 2
    for want, have in zip(_records(output_dir), got):  # a constant learning rate: the first steps do not depend
        for key in RECORD_KEYS:                         # on --max_train_steps
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), (have["step"], key)


# ----------------------------------------------------------------------------------------------------------------
# LoRA and DiffFit
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, extra", [("none", ()), ("paper-lora", ("--kl_weight", "1e-3")),
                                           ("bayes-lora", ("--cep", "uniform"))])
def test_lora_file_loads_into_the_pipeline(tiny_sd, tmp_path, preset, extra):
    if preset != "none" and preset not in bd.PRESETS:
        pytest.skip(f"preset {preset} not available")
    output_dir = tmp_path / "out"
    result = _run(tiny_sd, output_dir, "--method", "lora", "--preset", preset, "--rank", "4", *extra)
    _assert_records(_records(output_dir), 2, bayesian=preset != "none")
    assert result.weights_path == output_dir / "pytorch_lora_weights.safetensors" and result.weights_path.is_file()
    assert not (output_dir / "unet").exists()
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd[0])
    base = _unet_output(pipeline.unet)
    pipeline.load_lora_weights(output_dir)
    with_lora = _unet_output(pipeline.unet)
    torch.testing.assert_close(with_lora, _unet_output(result.unet), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(with_lora, base), "the LoRA file changes nothing"
    _generates(pipeline)


@pytest.mark.parametrize("preset", ["none", "paper-lora"])
def test_lora_under_mixed_precision_keeps_the_frozen_unet_in_its_dtype(tiny_sd, tmp_path, preset):
    """As diffusers' LoRA scripts: under --mixed_precision bf16 the frozen UNet is stored in bfloat16 (half the
    memory), the factors train and are exported in float32."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "out"
    result = _run(tiny_sd, output_dir, "--method", "lora", "--preset", preset, "--mixed_precision", "bf16",
                  "--learning_rate", "1e-3")
    _assert_records(_records(output_dir), 2, bayesian=preset != "none")
    assert result.unet.conv_in.weight.dtype == torch.bfloat16
    exported = load_file(str(result.weights_path))
    assert exported and {t.dtype for t in exported.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for name, t in exported.items() if "lora_B" in name or "lora.up" in name)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd[0])
    pipeline.load_lora_weights(output_dir)
    _generates(pipeline)


@pytest.mark.parametrize("preset, extra", [("none", ()), ("paper-dreambooth", ()),
                                           ("paper-dreambooth", ("--prior_dtype", "bf16"))])
def test_difffit_merges_into_a_plain_unet(tiny_sd, tmp_path, preset, extra):
    output_dir = tmp_path / "out"
    result = _run(tiny_sd, output_dir, "--method", "difffit", "--preset", preset, "--learning_rate", "1e-2", *extra)
    _assert_records(_records(output_dir), 2, bayesian=preset != "none")
    reloaded = UNet2DConditionModel.from_pretrained(output_dir / "unet")
    assert type(reloaded.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]) is torch.nn.Linear
    torch.testing.assert_close(_unet_output(reloaded), _unet_output(result.unet), rtol=0, atol=0)
    base = UNet2DConditionModel.from_pretrained(tiny_sd[0] / "unet")
    assert not torch.equal(_unet_output(reloaded), _unet_output(base))
    config = json.loads((output_dir / "training_config.json").read_text())
    total = sum(p.numel() for p in base.parameters())
    assert 0 < config["trainable_parameters"] < (total if preset != "none" else total // 10)


def test_prior_preservation_generates_class_images_and_accumulates(tiny_sd, tmp_path):
    """... and a resume asking for another class image count is refused before any image is generated."""
    class_dir = tmp_path / "class"
    output_dir = tmp_path / "out"
    flags = ("--method", "full", "--preset", "none", "--with_prior_preservation", "--class_data_dir", str(class_dir),
             "--class_prompt", "a photo of dog", "--sample_batch_size", "2", "--num_class_inference_steps", "2",
             "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--checkpointing_steps", "1")
    _run(tiny_sd, output_dir, "--max_train_steps", "1", "--num_class_images", "2", *flags)
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-00000.png", "class-00001.png"]
    (record,) = _records(output_dir)
    assert record["prior_mse"] > 0 and record["kl"] is None
    assert record["loss"] == pytest.approx(record["mse"] + record["prior_mse"], rel=1e-5)
    assert record["epoch"] == pytest.approx(2 * 2 / 3)  # two batches of two over three images
    with pytest.raises(SystemExit, match="written with 2 class images \\(now --num_class_images 3\\)"):
        trainer.main(_argv(tiny_sd, output_dir, "--max_train_steps", "2", "--num_class_images", "3",
                           "--resume_from_checkpoint", "latest", *flags))
    assert len(list(class_dir.iterdir())) == 2


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    timesteps = torch.tensor([0, 10, 500, 999])
    for prediction in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(prediction_type=prediction)
        alpha_bar = scheduler.alphas_cumprod[timesteps].double()
        snr = alpha_bar / (1 - alpha_bar)
        expected = torch.clamp_max(snr, 5.0) / (snr + 1 if prediction == "v_prediction" else snr)
        torch.testing.assert_close(trainer.min_snr_weights(scheduler, timesteps, 5.0).double(), expected,
                                   rtol=1e-5, atol=0)
    zero_terminal = DDPMScheduler(rescale_betas_zero_snr=True)
    assert trainer.min_snr_weights(zero_terminal, torch.tensor([999]), 5.0).item() == 1.0  # the limit, not NaN


def test_snr_weighting_offset_noise_and_validation_steps(tiny_sd, tmp_path):
    """--snr_gamma weights the instance loss (the records' mse stays the plain MSE), --offset_noise trains,
    --validation_steps 1 writes a grid at every step and none twice at the end."""
    output_dir = tmp_path / "out"
    _run(tiny_sd, output_dir, "--method", "full", "--preset", "paper-dreambooth", "--snr_gamma", "5",
         "--offset_noise", "--validation_steps", "1", "--checkpointing_steps", "100", "--validation_prompt", PROMPT,
         "--num_validation_images", "1", "--validation_inference_steps", "2")
    records = _records(output_dir)
    _assert_records(records, 2)
    for record in records:  # weights <= 1 for epsilon prediction
        assert record["loss"] <= record["mse"] * (1 + 1e-6) and record["loss"] != record["mse"]
    assert sorted(p.name for p in (output_dir / "validation").iterdir()) == ["step-000001.png", "step-000002.png"]


def test_variant_loads_the_weight_files_of_that_variant(tiny_sd, tmp_path):
    """A checkpoint saved with only *.fp16.safetensors: --variant fp16 loads it (the UNet trains in float32);
    without it, the one-line error."""
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd[0]).to(torch.float16)
    model = tmp_path / "model-fp16"
    pipeline.save_pretrained(str(model), variant="fp16")
    assert list((model / "unet").glob("*.fp16.safetensors"))
    with pytest.raises(SystemExit, match="cannot load the pipeline's parts"):
        trainer.main(_argv((model, tiny_sd[1]), tmp_path / "no-variant"))
    AcceleratorState._reset_state(reset_partial_state=True)
    result = _run((model, tiny_sd[1]), tmp_path / "out", "--variant", "fp16", "--method", "full", "--preset",
                  "paper-dreambooth")
    _assert_records(_records(tmp_path / "out"), 2)
    assert {p.dtype for p in result.unet.parameters()} == {torch.float32}
    reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), variant="fp16")  # as README says
    for name, tensor in result.unet.state_dict().items():
        torch.testing.assert_close(reloaded.unet.state_dict()[name], tensor, msg=name)


@pytest.mark.parametrize("epochs, items, batch, accumulation, processes, steps", [
    (10, 5, 4, 1, 1, 20),   # two batches (4 + 1) per pass
    (3, 8, 4, 1, 1, 6),
    (2, 5, 1, 2, 1, 6),     # five batches, the last step of a pass on one batch
    (1, 200, 1, 1, 2, 100),
    (4, 9, 2, 2, 2, 8),     # ceil(ceil(9 / 2) / 2) = 3 batches per process, 2 steps per pass
])
def test_epochs_count_steps_as_diffusers_does(epochs, items, batch, accumulation, processes, steps):
    assert trainer.steps_for_epochs(epochs, items, batch, accumulation, processes) == steps


def test_batch_stream_is_a_function_of_position(tmp_path):
    from bnn_diffusion import data

    stream = data.BatchStream(length=5, batch_size=3, seed=7)
    batches = [batch for batch, _ in zip(stream, range(10))]
    indices = [index for batch in batches for index, _ in batch]
    for start in range(0, 30, 5):  # every pass is a permutation of the items
        assert sorted(indices[start:start + 5]) == list(range(5))
    assert indices[:5] != indices[5:10] or indices[5:10] != indices[10:15]  # passes are reshuffled
    resumed = data.BatchStream(length=5, batch_size=3, seed=7, start=4)
    assert next(iter(resumed)) == batches[4]
    ranks = [data.BatchStream(length=5, batch_size=3, seed=7, start=r, stride=2) for r in (0, 1)]
    interleaved = [b for pair, _ in zip(zip(*(iter(r) for r in ranks)), range(5)) for b in pair]
    assert interleaved == batches
    assert [b for b, _ in zip(data.BatchStream(5, 3, seed=8), range(10))] != batches

    from PIL import Image
    wide = tmp_path / "wide.png"
    Image.fromarray((torch.arange(24 * 40 * 3) % 251).to(torch.uint8).reshape(24, 40, 3).numpy()).save(wide)
    crops = {tuple(data.load_image(wide, 16, center_crop=False, crop_seed=s).flatten()[:8].tolist()) for s in range(8)}
    assert len(crops) > 1  # the random crop moves with the seed ...
    again = data.load_image(wide, 16, center_crop=False, crop_seed=3)
    torch.testing.assert_close(again, data.load_image(wide, 16, center_crop=False, crop_seed=3))  # ... and only
    center = data.load_image(wide, 16)
    assert center.shape == (3, 16, 16) and -1 <= center.min() and center.max() <= 1


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_wide_grey_images_keep_their_range(tmp_path, mode):
    """16-bit and float grey images (scans, medical and astronomy data) load over [-1, 1], not clipped to white."""
    from PIL import Image

    from bnn_diffusion import data
    full = 65535 if mode == "I;16" else 1.0
    ramp = torch.linspace(0, 1, 16 * 16, dtype=torch.float64).reshape(16, 16) * full
    path = tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif")
    Image.fromarray(ramp.numpy().astype("uint16" if mode == "I;16" else "float32")).save(path)
    assert Image.open(path).mode == mode
    image = data.load_image(path, 16)
    assert image.min() == -1 and image.max() == 1
    torch.testing.assert_close(image[0], (ramp / full * 2 - 1).float(), atol=1 / 127.5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# errors and the command line
# ----------------------------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step(tiny_sd, tmp_path):
    with pytest.raises(SystemExit, match=r"step 1: the loss is not finite"):
        trainer.main(_argv(tiny_sd, tmp_path / "out", "--method", "full", "--preset", "paper-dreambooth",
                           "--sigma_init", "1e30"))


def test_a_fresh_run_does_not_silently_replace_an_earlier_run(tiny_sd, tmp_path):
    """A finished run that kept no checkpoint (the default --checkpointing_steps 500 outlasts many runs) still
    has its records and result in --output_dir: a fresh run there is refused, and with --overwrite_output_dir
    replaces them, leaving none of the earlier run's metrics or grids mixed into its own."""
    out = tmp_path / "out"
    grids = ("--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", "1")
    _run(tiny_sd, out, "--checkpointing_steps", "100", *grids)
    assert [r["step"] for r in _records(out)] == [1, 2] and (out / "validation" / "step-000002.png").exists()
    finished = (r"holds the result of an earlier run \(training_config.json, metrics.jsonl, unet, model_index.json, "
                r"vae, text_encoder, tokenizer, scheduler\)")
    for latest in ((), ("--resume_from_checkpoint", "latest")):  # latest finds no checkpoint: a fresh run too
        with pytest.raises(SystemExit, match=finished + ": choose another --output_dir, or pass "
                                                        "--overwrite_output_dir"):
            trainer.main(_argv(tiny_sd, out, "--max_train_steps", "1", *latest))
        AcceleratorState._reset_state(reset_partial_state=True)
    assert [r["step"] for r in _records(out)] == [1, 2]
    _run(tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "100", "--overwrite_output_dir", *grids)
    assert [r["step"] for r in _records(out)] == [1]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001.png"]
    # the records of a run killed before its first checkpoint (no result yet): --resume_from_checkpoint latest
    # with no checkpoint to resume asks to start afresh (a job requeued): it does, with a warning; a plain run
    # is refused
    for part in (*trainer.PIPELINE_PARTS, "model_index.json"):
        shutil.rmtree(out / part) if (out / part).is_dir() else (out / part).unlink()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match=r"holds the records of an earlier run \(training_config.json, "
                                         r"metrics.jsonl\): choose another"):
        trainer.main(_argv(tiny_sd, out, "--max_train_steps", "1"))
    AcceleratorState._reset_state(reset_partial_state=True)
    _run(tiny_sd, out, "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest")
    assert [r["step"] for r in _records(out)] == [1, 2]


def test_another_trainers_result_or_a_run_resumed_from_elsewhere_does_not_write_over_a_folder(full_run, tiny_sd,
                                                                                             tmp_path):
    """A folder holding another trainer's result (say diffusers' DreamBooth unet/) is refused, and so is a resume
    from a checkpoint in another folder into one with records; with --overwrite_output_dir that resume keeps none
    of the folder's records and records the checkpoint's own run."""
    output_dir, _ = full_run
    other = tmp_path / "diffusers-run"
    (other / "unet").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"holds the result of an earlier run \(unet\)"):
        trainer.main(_argv(tiny_sd, other))
    AcceleratorState._reset_state(reset_partial_state=True)
    target = tmp_path / "target"
    target.mkdir()
    (target / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": -1.0}) + "\n")
    flags = ("--max_train_steps", "3", "--method", "full", "--preset", "paper-dreambooth", "--kl_weight", "1e-3",
             "--cep", "gaussian", "--learning_rate", "1e-3", "--resume_from_checkpoint",
             str(output_dir / "checkpoint-2"))
    with pytest.raises(SystemExit, match=r"holds the records of an earlier run \(metrics.jsonl\): resume into an "
                                         r"empty --output_dir"):
        trainer.main(_argv(tiny_sd, target, *flags))
    AcceleratorState._reset_state(reset_partial_state=True)
    (target / trainer.LORA_FILE).write_bytes(b"a LoRA run's result")  # another kind of result: replaced too
    _run(tiny_sd, target, *flags, "--overwrite_output_dir")
    assert [r["step"] for r in _records(target)] == [3]
    assert not (target / trainer.LORA_FILE).exists() and (target / "unet").is_dir()
    config = json.loads((target / "training_config.json").read_text())
    assert config["resumed_from"] == str((output_dir / "checkpoint-2").resolve())
    assert [run["args"]["output_dir"] for run in config["earlier_runs"]] == [str(output_dir)]


def test_an_fp8_accelerate_config_is_refused_in_one_line(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")  # what accelerate launch passes from its config
    with pytest.raises(SystemExit, match=r"mixed precision 'fp8' \(from the accelerate config\) is not supported"):
        trainer.main(_argv(tiny_sd, tmp_path / "out"))


def test_a_resolution_the_vae_cannot_take_is_refused_before_class_images_are_generated(tiny_sd, tmp_path):
    class_dir = tmp_path / "class"
    with pytest.raises(SystemExit, match=r"--resolution 15 must be a multiple of the VAE's downsampling factor"):
        trainer.main(_argv(tiny_sd, tmp_path / "out", "--resolution", "15", "--with_prior_preservation",
                           "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a dog",
                           "--num_class_images", "2"))
    assert not class_dir.exists() or not any(class_dir.iterdir())


def test_clear_errors(tiny_sd, tmp_path, capsys):
    model, images = tiny_sd
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork, not a JPEG")  # as macOS leaves
    truncated = tmp_path / "truncated"
    shutil.copytree(images, truncated)
    photo = sorted(truncated.iterdir())[0]
    photo.write_bytes(photo.read_bytes()[:len(photo.read_bytes()) // 2])  # a download cut off half-way
    inpainting = tmp_path / "inpainting"
    shutil.copytree(model, inpainting)
    config = json.loads((inpainting / "unet" / "config.json").read_text())
    (inpainting / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    as_grids = shutil.copytree(images, tmp_path / "run" / "validation")
    cases = [
        (["--instance_data_dir", str(truncated)], rf"--instance_data_dir: .*{photo.name}' is not a readable image"),
        (["--pretrained_model_name_or_path", str(inpainting)], r"the UNet takes 9 input channels but the VAE makes 4"),
        (["--output_dir", str(model)], r"--output_dir .* overlaps --pretrained_model_name_or_path"),
        (["--output_dir", str(a_file / "out")], r"--output_dir .*out' lies under .*a-file', which exists and is not"),
        (["--instance_data_dir", str(tmp_path / "missing")], r"--instance_data_dir .*missing' does not exist"),
        (["--instance_data_dir", str(broken)], r"--instance_data_dir: .*\._photo\.jpg' is not a readable image"),
        (["--instance_data_dir", str(empty)], r"--instance_data_dir .*empty' holds no image"),
        (["--pretrained_model_name_or_path", str(images)], r"not a diffusers checkpoint: it has no model_index"),
        (["--pretrained_model_name_or_path", str(tmp_path / "nope")], r"is not a directory"),
        (["--pretrained_model_name_or_path", str(model / "unet" / "config.json")], r"is not a directory"),
        (["--use_8bit_adam"], r"--use_8bit_adam needs the bitsandbytes package"),
        (["--resolution", "15"], r"--resolution 15 must be a multiple"),
        (["--output_dir", str(images)], r"--instance_data_dir .* is --output_dir or its validation folder"),
        (["--instance_data_dir", str(as_grids), "--output_dir", str(as_grids.parent)],
         r"--instance_data_dir .*validation' is --output_dir or its validation folder"),
        (["--with_prior_preservation", "--class_data_dir", str(images), "--class_prompt", "a dog",
          "--num_class_images", "2"], r"--class_data_dir .* is --instance_data_dir too"),
    ]
    if _installed("bitsandbytes"):
        cases = [c for c in cases if "8bit" not in c[0][0]]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            trainer.main(_argv(tiny_sd, tmp_path / "out", *extra))
        AcceleratorState._reset_state(reset_partial_state=True)
    usage = [["--method", "lora", "--preset", "paper-dreambooth"], ["--preset", "none", "--kl_weight", "1"],
             ["--with_prior_preservation"], ["--max_train_steps", "0"], ["--cep_gamma", "-1"],
             ["--method", "lora", "--prior_dtype", "bf16"], ["--preset", "none", "--prior_dtype", "fp16"],
             ["--adam_beta1", "1.5"], ["--adam_epsilon", "-1"], ["--seed", "-1"], ["--seed", str(2**32)],
             ["--lr_num_cycles", "0"], ["--validation_prompt", " "]]
    for extra in usage:
        with pytest.raises(SystemExit) as exit_info:
            trainer.main(_argv(tiny_sd, tmp_path / "out", *extra))
        assert exit_info.value.code == 2, extra
    assert "--preset paper-dreambooth makes full Bayesian layers" in capsys.readouterr().err


@pytest.mark.parametrize("prior_dtype, stored", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                 ("fp16", torch.float16)])
def test_prior_dtype_is_the_dtype_of_the_stored_prior_means(tiny_sd, prior_dtype, stored):
    """fp32 shares the pretrained weights' storage; bf16/fp16 keep them rounded at half the bytes; mu stays
    float32 at the pretrained values either way."""
    args = trainer.parse_args(_argv(tiny_sd, "unused", "--preset", "paper-dreambooth", "--prior_dtype", prior_dtype))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd[0] / "unet")
    pretrained = {name: p.detach().clone() for name, p in unet.named_parameters()}
    names = trainer.prepare_unet(unet, args)
    assert names
    for name in names:
        layer = unet.get_submodule(name)
        weight = pretrained[name + ".weight"]
        assert layer.prior_mu.dtype == stored and layer.prior_mu.nbytes == weight.nbytes * stored.itemsize // 4
        torch.testing.assert_close(layer.prior_mu, weight.to(stored), rtol=0, atol=0)
        torch.testing.assert_close(layer.weight_mu.detach(), weight, rtol=0, atol=0)
        assert torch.isfinite(layer.kl())


def test_resume_refuses_a_checkpoint_of_another_configuration(full_run, tiny_sd, tmp_path):
    output_dir, _ = full_run
    other = tmp_path / "out"
    shutil.copytree(output_dir / "checkpoint-2", other / "checkpoint-2")
    with pytest.raises(SystemExit, match=r"was written with other settings: preset 'paper-dreambooth' \(now 'none'\)"):
        trainer.main(_argv(tiny_sd, other, "--preset", "none", "--resume_from_checkpoint", "latest"))
    # another objective: the prompt, the KL weight and the prior
    with pytest.raises(SystemExit, match=r"other settings: instance_prompt .*, prior_sigma 0.01 \(now 0.1\), "
                                         r"kl_weight 0.001 \(now 0.01\)"):
        trainer.main(_argv(tiny_sd, other, "--method", "full", "--preset", "paper-dreambooth", "--kl_weight", "1e-2",
                           "--cep", "gaussian", "--prior_sigma", "0.1", "--instance_prompt", "a photo of a cat",
                           "--resume_from_checkpoint", "latest"))
    with pytest.raises(SystemExit, match=r"is not a checkpoint of this trainer"):
        trainer.main(_argv(tiny_sd, other, "--resume_from_checkpoint", str(tmp_path)))


def test_resume_refuses_another_base_model_or_other_images(full_run, tiny_sd, tmp_path, caplog, monkeypatch):
    """The checkpoint's trainable state belongs to its base UNet, and the batch stream indexes its image list: a
    resume with other base weights, or with images added or replaced, is refused, naming what changed; a
    checkpoint that records neither is resumed with a warning."""
    output_dir, _ = full_run
    other = tmp_path / "out"
    shutil.copytree(output_dir / "checkpoint-2", other / "checkpoint-2")
    flags = ("--method", "full", "--preset", "paper-dreambooth", "--kl_weight", "1e-3", "--cep", "gaussian",
             "--resume_from_checkpoint", "latest")  # the full run's objective
    retrained = tiny_pipeline.write_tiny_pipeline(tmp_path / "other-model", seed=1)
    with pytest.raises(SystemExit, match=r"other settings: base_unet 'weights [0-9a-f]{16}' \(now 'weights "):
        trainer.main(_argv((retrained, tiny_sd[1]), other, *flags))
    more = shutil.copytree(tiny_sd[1], tmp_path / "more-images")
    shutil.copy(more / sorted(p.name for p in more.iterdir())[0], more / "zz-copy.png")
    loads = []
    with monkeypatch.context() as patched:
        real_load = trainer.load_components
        patched.setattr(trainer, "load_components", lambda *a, **k: loads.append(a) or real_load(*a, **k))
        with pytest.raises(SystemExit, match=r"other settings: instance_images '3 files [0-9a-f]{16}' \(now '4 "):
            trainer.main(_argv((tiny_sd[0], more), other, *flags))
    assert loads == []  # refused before the model was loaded
    replaced = shutil.copytree(tiny_sd[1], tmp_path / "replaced-images")
    first = sorted(replaced.iterdir())[0]
    tiny_pipeline.write_instance_images(tmp_path / "fresh", count=4, size=20)
    shutil.copy(sorted((tmp_path / "fresh").iterdir())[-1], first)
    with pytest.raises(SystemExit, match=r"other settings: instance_images '3 files [0-9a-f]{16}' \(now '3 files "):
        trainer.main(_argv((tiny_sd[0], replaced), other, *flags))
    state_file = other / "checkpoint-2" / trainer.STATE_FILE  # as an earlier version of the trainer wrote it
    state = json.loads(state_file.read_text())
    for key in ("base_unet", "instance_images", "class_images"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        assert trainer.main(_argv((retrained, more), other, *flags)) == 0  # step 2 of 2: nothing left to train
    assert "does not record base_unet, instance_images, class_images: not checked" in caplog.text


def test_sigma_statistics_are_those_of_every_bayesian_weight_element():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    bd.patch(model, "all-linear", targets=["0", "1"], sigma_param="softplus")
    with torch.no_grad():
        for module in (model[0], model[1]):
            module.weight_rho.uniform_(-6.0, 1.0)
    sigmas = torch.cat([model[0].sigma.flatten(), model[1].sigma.flatten()]).double()
    stats = trainer.sigma_statistics(model)
    assert stats["sigma_mean"] == pytest.approx(sigmas.mean().item(), rel=1e-12)
    assert (stats["sigma_min"], stats["sigma_max"]) == (sigmas.min().item(), sigmas.max().item())
    assert trainer.sigma_statistics(torch.nn.Linear(2, 2)) == {}


def test_images_fingerprint_counts_names_and_sizes_or_names_only(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"12345")
    second.write_bytes(b"123")
    before = trainer.images_fingerprint([first, second])
    names_only = trainer.images_fingerprint([first, second], sizes=False)
    assert before.startswith("2 files ") and trainer.images_fingerprint(None) is None
    second.write_bytes(b"1234")  # a class image regenerated elsewhere: other bytes, the same file
    assert trainer.images_fingerprint([first, second]) != before
    assert trainer.images_fingerprint([first, second], sizes=False) == names_only
    assert trainer.images_fingerprint([first], sizes=False) != names_only


def test_weights_fingerprint_sees_one_changed_value_at_a_sampled_place():
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30))
    before = trainer.weights_fingerprint(model)
    assert trainer.weights_fingerprint(model) == before and before.startswith("weights ")
    with torch.no_grad():
        model[0].weight.view(-1)[0] += 1e-6
    assert trainer.weights_fingerprint(model) != before


def test_checkpoints_of_another_run_are_refused_not_mixed_in(full_run, tiny_sd, tmp_path):
    """A fresh run into a directory with checkpoints, or a resume from a checkpoint older than others there, would
    interleave two runs (in the checkpoints, in `latest`, in metrics.jsonl): refused with what to do instead."""
    output_dir, _ = full_run
    other = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(output_dir / name, other / name)
    with pytest.raises(SystemExit, match=r"holds the checkpoints of an earlier run \(checkpoint-2, checkpoint-4\): "
                                         r"continue it with --resume_from_checkpoint latest"):
        trainer.main(_argv(tiny_sd, other, "--preset", "paper-dreambooth"))
    with pytest.raises(SystemExit, match=r"holds checkpoints after checkpoint-2 \(checkpoint-4\)"):
        trainer.main(_argv(tiny_sd, other, "--resume_from_checkpoint", "checkpoint-2"))


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd, tmp_path):
    output_dir = tmp_path / "out"
    _run(tiny_sd, output_dir, "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit",
         "2", "--method", "full", "--preset", "none")
    assert sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-2", "checkpoint-3"]


class _ProcessOnCpu:
    """What generate_class_images asks of an Accelerator: process ``index`` of ``count`` on the CPU."""
    device = torch.device("cpu")

    def __init__(self, index=0, count=1):
        self.process_index, self.num_processes = index, count
        self.is_main_process = self.is_local_main_process = index == 0

    def wait_for_everyone(self):
        pass


def test_class_images_are_a_function_of_seed_and_index(tiny_sd, tmp_path):
    """Topping a class folder up (a stopped generation, a larger --num_class_images) adds new images, not copies
    of the first ones; each file is the same whatever images are already there and however many processes share
    the work, and the same but for the rounding of a batched UNet whatever the batch size."""
    import numpy as np
    from PIL import Image
    import argparse

    def generate(directory, count, batch, process=_ProcessOnCpu()):
        args = argparse.Namespace(class_data_dir=str(directory), num_class_images=count, class_prompt="a photo of dog",
                                  prior_generation_precision="fp32", pretrained_model_name_or_path=str(tiny_sd[0]),
                                  seed=3, sample_batch_size=batch, num_class_inference_steps=2, variant=None)
        trainer.generate_class_images(args, process)
        return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}

    generate(tmp_path / "topped", 1, 1)
    topped = generate(tmp_path / "topped", 3, 1)
    at_once = generate(tmp_path / "at-once", 3, 1)
    assert list(topped) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert topped == at_once
    assert len(set(topped.values())) == 3, "an image was generated twice"
    (tmp_path / "second-of-two").mkdir()  # by the main process, which process 1 of 2 waits for
    second_of_two = generate(tmp_path / "second-of-two", 3, 1, _ProcessOnCpu(1, 2))  # its share on two GPUs
    assert second_of_two == {"class-00001.png": topped["class-00001.png"]}
    batched = generate(tmp_path / "batched", 3, 3)
    for name, data in batched.items():
        pixels = [np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16) for b in (data, topped[name])]
        assert np.abs(pixels[0] - pixels[1]).max() <= 2, name
    (tmp_path / "with-folder" / "old.png").mkdir(parents=True)  # a folder is not a class image
    assert list(generate(tmp_path / "with-folder", 1, 1)) == ["class-00000.png"]


def test_cli_dispatches_subcommands(monkeypatch, capsys):
    from bnn_diffusion import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--help"])
    assert exit_info.value.code == 0 and "--with_prior_preservation" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(trainer, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["finetune", "--seed", "3"]) == 0 and seen == [["--seed", "3"]]
    monkeypatch.setitem(sys.modules, "bnn_diffusion.study", None)  # as if the study were not installed
    with pytest.raises(SystemExit, match="bnn-diffusion study is not available"):
        cli.main(["study"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nonsense"])
    assert exit_info.value.code == 2


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-running an imported module
@pytest.mark.parametrize("module, argv", [("bnn_diffusion.train", ["--help"]),
                                          ("bnn_diffusion", ["finetune", "--help"])])
def test_python_dash_m_entry_points(module, argv, monkeypatch, capsys):
    """``python -m bnn_diffusion.train`` and ``python -m bnn_diffusion finetune`` (run in-process with runpy)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume_from_checkpoint" in out and "--cep_gamma" in out
