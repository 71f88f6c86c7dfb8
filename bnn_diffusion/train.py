"""``bnn-diffusion finetune``: DreamBooth-style few-shot fine-tuning of a Stable Diffusion checkpoint, Bayesian or not.

Run it as ``bnn-diffusion finetune ...``, ``python -m bnn_diffusion.train ...`` or, on several GPUs,
``accelerate launch -m bnn_diffusion.train ...``.  The flags are those of diffusers' DreamBooth(-LoRA) examples
(``--pretrained_model_name_or_path``, ``--instance_data_dir``, ``--with_prior_preservation``, ``--rank``, ...) plus:

* ``--method full|lora|difffit``: what trains.  ``full``: the whole UNet (the layers of ``--preset`` Bayesian);
  ``lora``: LoRA factors on the attention projections (``--preset paper-lora``: B Bayesian; ``bayes-lora``: A
  Bayesian; ``none``: a plain PEFT LoRA, the baseline); ``difffit``: biases, norms, condition embeddings and
  per-channel residual scales (DiffFit), plus the Bayesian layers of ``--preset`` if one is given.
* ``--preset``: a ``bnn_diffusion.PRESETS`` name, or ``none`` for the plain (non-Bayesian) baseline;
  ``--sigma_init --prior_sigma --sigma_param --estimator``: the posterior and prior (``bnn_diffusion.patch``).
* ``--kl_weight``: loss = diffusion MSE (+ ``--prior_loss_weight`` x the class-image MSE) + kl_weight x KL(q || p).
  The default 0 is what the paper's scripts do (sigma then learns from the MSE alone).
* ``--cep gaussian|uniform --cep_gamma``: condition-embedding perturbation during training (``bnn_diffusion.cep``).

Outputs in ``--output_dir``: ``metrics.jsonl`` (one JSON record per optimizer step: loss, MSE, KL, sigma statistics,
learning rate, gradient norm), ``metrics.png`` (the curves), ``validation/step-<NNNNNN>.png`` (image grids of
``--validation_prompt`` every ``--validation_steps``, default at each checkpoint, and at the end),
``checkpoint-<N>/`` (every ``--checkpointing_steps``, written to a temporary directory and renamed into place),
``training_config.json``, and the result with the posterior means merged in: ``pytorch_lora_weights.safetensors``
for ``--method lora`` (load it with ``StableDiffusionPipeline.load_lora_weights``), otherwise ``unet/`` with the
checkpoint's other parts beside it (``StableDiffusionPipeline.from_pretrained(output_dir)``).

Reproducibility: every random draw of a step (VAE posterior sample, diffusion noise and timesteps, the Bayesian
layers' per-forward seeds, CEP noise) comes from torch's generators, which ``accelerate`` saves in each checkpoint;
batches come from ``bnn_diffusion.data.BatchStream``, a function of the step alone.  ``--resume_from_checkpoint
latest`` therefore continues with the loss curve an uninterrupted run has.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from bnn_kernels.checks import check_prior_sigma

from . import data as data_lib
from .patch import PRESETS, bayesian_modules, kl_loss, merge, patch

logger = logging.getLogger(__name__)

METHODS = ("full", "lora", "difffit")
DEFAULT_PRESET = {"full": "paper-dreambooth", "lora": "paper-lora", "difffit": "none"}
# diffusers' train_dreambooth.py (full) and train_dreambooth_lora.py defaults; DiffFit, which also trains a small
# parameter set, takes the LoRA one.
DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 5e-4, "difffit": 5e-4}
PRECISIONS = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable_parameters.safetensors"
STATE_FILE = "training_state.json"
CONFIG_FILE = "training_config.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Flags that must match between a checkpoint and the run resuming it (the trainable parameter set, the batch
# stream, the objective and the optimizer's kind of state); _resume_config adds the process count and the base
# model's and images' fingerprints.
RESUME_KEYS = ("method", "preset", "rank", "sigma_param", "estimator", "prior_dtype", "train_batch_size",
               "gradient_accumulation_steps", "with_prior_preservation", "resolution", "center_crop",
               "instance_prompt", "class_prompt", "prior_sigma", "kl_weight", "prior_loss_weight", "cep",
               "cep_gamma", "snr_gamma", "offset_noise", "use_8bit_adam", "num_processes")


class UsageError(ValueError):
    """A problem with the command line or the files it names; ``main`` reports it without a traceback."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the KL became NaN or infinite; the message names the step."""


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------

class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags say in their help what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(prog: str = "bnn-diffusion finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_DefaultsHelpFormatter,
        description="DreamBooth-style few-shot fine-tuning of a local Stable Diffusion 1.x/2.x checkpoint, with "
                    "Bayesian layers (bnn_diffusion.patch), LoRA, DiffFit and condition-embedding perturbation.")
    model = parser.add_argument_group("model and data")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="a local diffusers Stable Diffusion checkpoint (a directory with model_index.json)")
    model.add_argument("--variant", default=None,
                       help="weight files of that variant, e.g. fp16 for a checkpoint saved with only "
                            "*.fp16.safetensors; the UNet still trains in float32")
    model.add_argument("--instance_data_dir", required=True, help="directory of the few subject images")
    model.add_argument("--instance_prompt", required=True, help='prompt naming the subject, e.g. "a photo of sks dog"')
    model.add_argument("--class_data_dir", default=None,
                       help="directory of class images for prior preservation (missing ones are generated)")
    model.add_argument("--class_prompt", default=None, help='prompt of the class, e.g. "a photo of dog"')
    model.add_argument("--with_prior_preservation", action="store_true",
                       help="add the class images' diffusion loss (DreamBooth prior preservation)")
    model.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior preservation loss")
    model.add_argument("--num_class_images", type=int, default=100,
                       help="class images wanted; with prior preservation, missing ones are generated with the "
                            "pretrained pipeline")
    model.add_argument("--sample_batch_size", type=int, default=4, help="batch size for generating class images")
    model.add_argument("--num_class_inference_steps", type=int, default=50,
                       help="denoising steps per generated class image")
    model.add_argument("--prior_generation_precision", choices=("no", "fp32", "fp16", "bf16"), default=None,
                       help="dtype for generating class images (default: fp16 on a GPU, fp32 on the CPU)")
    model.add_argument("--resolution", type=int, default=512, help="training resolution (square, multiple of the "
                                                                     "VAE's downsampling factor)")
    model.add_argument("--center_crop", action="store_true", help="centre-crop the images (default: random crop)")
    model.add_argument("--dataloader_num_workers", type=int, default=0, help="data loading worker processes")

    method = parser.add_argument_group("method (bnn-diffusion)")
    method.add_argument("--method", choices=METHODS, default="full",
                        help="what trains: the whole UNet, LoRA factors, or DiffFit's parameters")
    method.add_argument("--preset", default=None, choices=sorted(PRESETS) + ["none"],
                        help="Bayesian layers (bnn_diffusion.PRESETS) or 'none' for the plain baseline; default: "
                             + ", ".join(f"{m}: {p}" for m, p in DEFAULT_PRESET.items()))
    method.add_argument("--kl_weight", type=float, default=0.0,
                        help="weight of KL(q || p) in the loss (0 = the paper's scripts)")
    method.add_argument("--sigma_init", type=float, default=0.01, help="initial posterior sigma")
    method.add_argument("--prior_sigma", type=float, default=0.01, help="prior sigma")
    method.add_argument("--sigma_param", choices=("direct", "softplus"), default="direct",
                        help="sigma = rho (clamped at 1e-7, the paper) or softplus(rho)")
    method.add_argument("--estimator", choices=("reparam", "lrt"), default="reparam",
                        help="one weight sample per forward (reparam) or local reparameterisation (lrt)")
    method.add_argument("--prior_dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="dtype of the prior means of full-rank Bayesian layers (the pretrained weights): fp32 "
                             "shares the pretrained weights' storage; bf16/fp16 keep a rounded copy at half the "
                             "memory (SD 1.5 paper-dreambooth: 757 -> 378 MiB), the KL and the prior rounded to it")
    method.add_argument("--rank", type=int, default=4, help="LoRA rank (--method lora)")
    method.add_argument("--cep", choices=("none", "gaussian", "uniform"), default="none",
                        help="condition-embedding perturbation during training (CEP-G / CEP-U)")
    method.add_argument("--cep_gamma", type=float, default=1.0, help="CEP strength: delta scale gamma / sqrt(d)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--train_batch_size", type=int, default=4,
                     help="instance images per micro-batch and device (a step is --gradient_accumulation_steps "
                          "micro-batches)")
    opt.add_argument("--max_train_steps", type=int, default=None,
                     help="optimizer steps (overrides --num_train_epochs)")
    opt.add_argument("--num_train_epochs", type=int, default=1,
                     help="when --max_train_steps is not given: the steps of this many passes over the images, "
                          "counted as diffusers does (a pass's last batch counted as a step even when not full; "
                          "batches here are always full, so the metrics' epoch can run ahead)")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    opt.add_argument("--gradient_checkpointing", action="store_true",
                     help="recompute activations in backward (less memory, slower)")
    opt.add_argument("--learning_rate", type=float, default=None,
                     help="learning rate; default: " + ", ".join(f"{m}: {v:g}" for m, v in
                                                                DEFAULT_LEARNING_RATE.items()))
    opt.add_argument("--scale_lr", action="store_true",
                     help="multiply the learning rate by batch size x accumulation steps x processes")
    opt.add_argument("--lr_scheduler", default="constant",
                     choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                              "constant_with_warmup"), help="learning-rate schedule")
    opt.add_argument("--lr_warmup_steps", type=int, default=500,
                     help="warm-up steps of the schedule (ignored by 'constant', the default schedule)")
    opt.add_argument("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    opt.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    opt.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW")
    opt.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's first-moment decay")
    opt.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's second-moment decay")
    opt.add_argument("--adam_weight_decay", type=float, default=1e-2,
                     help="AdamW weight decay (never applied to the sigma parameters)")
    opt.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon")
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    opt.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                     help="autocast dtype (default: accelerate's configuration, else no); fp16 needs a GPU")
    opt.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    opt.add_argument("--snr_gamma", type=float, default=None,
                     help="Min-SNR loss weighting (Hang et al. 2023) of the instance loss: min(SNR, gamma) / SNR "
                          "for epsilon prediction, / (SNR + 1) for v-prediction; 5 is the usual value")
    opt.add_argument("--offset_noise", action="store_true",
                     help="add 0.1 x a per-channel normal to the noise (offset noise, as diffusers' flag)")
    opt.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default="bnn-dreambooth-model", help="where everything is written")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help="a checkpoint directory, or 'latest' (the newest in --output_dir; starts afresh if none "
                          "and no finished run is there)")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="let a fresh run replace the records and result of an earlier run in --output_dir "
                          "(metrics, validation grids, training_config.json, the weights); its checkpoints are "
                          "still refused")
    out.add_argument("--validation_prompt", default=None,
                     help="prompt for the image grids written every --validation_steps (default: at each "
                          "checkpoint) and at the end")
    out.add_argument("--validation_steps", type=int, default=None,
                     help="write a validation grid every N steps (default: at each checkpoint) and at the end")
    out.add_argument("--num_validation_images", type=int, default=4, help="images per validation grid")
    out.add_argument("--validation_inference_steps", type=int, default=25, help="denoising steps per validation image")
    return parser


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Parse and check the command line (argparse's usage error, SystemExit 2, for an inconsistent one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = DEFAULT_PRESET[args.method]
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.method]
    problem = _check_args(args)
    if problem:
        parser.error(problem)
    return args


def _check_args(args: argparse.Namespace) -> Optional[str]:
    """The first inconsistency of the options, as a message naming the flag, or None."""
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "rank",
                "num_validation_images", "validation_inference_steps", "sample_batch_size",
                "num_class_inference_steps", "num_train_epochs", "lr_num_cycles")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.max_train_steps is not None and args.max_train_steps < 1:
        return f"--max_train_steps must be >= 1, got {args.max_train_steps}"
    for name in ("checkpoints_total_limit", "validation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        return f"--snr_gamma must be a finite number > 0, got {args.snr_gamma}"
    for name in ("kl_weight", "prior_loss_weight", "cep_gamma", "max_grad_norm", "adam_weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            return f"--{name} must be a finite number >= 0, got {value}"
    for name in ("learning_rate", "sigma_init", "prior_sigma"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            return f"--{name} must be a finite number > 0, got {value}"
    try:
        check_prior_sigma(args.prior_sigma)
    except ValueError as error:
        return f"--{error}"
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            return f"--{name} must be in [0, 1), got {getattr(args, name)}"
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon >= 0):
        return f"--adam_epsilon must be a finite number >= 0, got {args.adam_epsilon}"
    # accelerate's set_seed(device_specific=True) adds the process index, and numpy takes seeds below 2**32
    if args.seed is not None and not 0 <= args.seed < 2**32 - 1024:
        return f"--seed must be in [0, 2**32 - 1024), got {args.seed}"
    if args.lr_warmup_steps < 0 or args.dataloader_num_workers < 0 or args.num_class_images < 0:
        return "--lr_warmup_steps, --dataloader_num_workers and --num_class_images must be >= 0"
    if args.validation_prompt is not None and not args.validation_prompt.strip():
        return "--validation_prompt is empty: leave it out to write no validation grids"
    if args.with_prior_preservation:
        if args.class_data_dir is None or args.class_prompt is None:
            return "--with_prior_preservation needs --class_data_dir and --class_prompt"
        if args.num_class_images < 1:
            return "--with_prior_preservation needs --num_class_images >= 1"
    if args.preset != "none":
        kind = PRESETS[args.preset].kind
        wanted = "lora" if args.method == "lora" else "full"
        if kind != wanted:
            fitting = sorted(name for name, p in PRESETS.items() if p.kind == wanted) + ["none"]
            return (f"--preset {args.preset} makes {kind} Bayesian layers, which --method {args.method} does not "
                    f"use; choose one of {fitting}")
    if args.kl_weight > 0 and args.preset == "none":
        return "--kl_weight > 0 needs Bayesian layers: pass a --preset other than 'none'"
    if args.prior_dtype != "fp32" and (args.preset == "none" or PRESETS[args.preset].kind != "full"):
        return (f"--prior_dtype {args.prior_dtype} applies to full-rank Bayesian layers (their prior mean is the "
                f"pretrained weight); --method {args.method} --preset {args.preset} stores no prior mean")
    return None


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``bnn-diffusion finetune``: parse ``argv``, train, return 0.  Bad options, files that are not
    what they should be, and a diverging loss end with a one-line message (SystemExit) instead of a traceback."""
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    try:
        train(args)
    except (UsageError, NonFiniteLossError) as error:
        raise SystemExit(f"bnn-diffusion finetune: error: {error}") from None
    return 0


# ----------------------------------------------------------------------------------------------------------------
# checks on the files
# ----------------------------------------------------------------------------------------------------------------

def _check_output_dir(output_dir: Path, pretrained: Path) -> None:
    """UsageError unless ``output_dir`` can be a directory (it, or its nearest existing ancestor, is one) that
    neither holds nor lies inside the pretrained checkpoint (the result's unet/ would overwrite the base model)."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists" if existing == output_dir else f"lies under {str(existing)!r}, which exists"
        raise UsageError(f"--output_dir {str(output_dir)!r} {what} and is not a directory")
    out, base = output_dir.resolve(), pretrained.resolve()
    if out == base or base in out.parents or out in base.parents:
        raise UsageError(f"--output_dir {str(output_dir)!r} overlaps --pretrained_model_name_or_path "
                         f"{str(pretrained)!r}: the result would overwrite the pretrained model; choose another "
                         f"directory")


def check_folders_apart(args: argparse.Namespace) -> None:
    """UsageError if an image folder is also --output_dir or its validation/ (the run's metrics.png or grids would
    become training images) or, under --with_prior_preservation, the class folder is the instance folder
    (generated class images would)."""
    folders = [("--instance_data_dir", args.instance_data_dir)]
    if args.with_prior_preservation:
        folders.append(("--class_data_dir", args.class_data_dir))
    out = Path(args.output_dir).resolve()
    for flag, folder in folders:
        if Path(folder).resolve() in (out, out / "validation"):
            raise UsageError(f"{flag} {folder!r} is --output_dir or its validation folder: the run's plots or "
                             f"grids would be read as training images; write the run elsewhere")
    if len(folders) == 2 and Path(folders[0][1]).resolve() == Path(folders[1][1]).resolve():
        raise UsageError(f"--class_data_dir {args.class_data_dir!r} is --instance_data_dir too: generated class "
                         f"images would be trained on as instance images; give them their own folder")


def check_pretrained(path) -> dict:
    """The ``model_index.json`` of a local diffusers Stable Diffusion checkpoint, or a UsageError saying what is
    wrong with ``path``."""
    flag = "--pretrained_model_name_or_path"
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is not a directory: pass a local diffusers checkpoint (a folder with "
                         f"model_index.json, e.g. one written by `huggingface-cli download` or save_pretrained)")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise UsageError(f"{flag} {str(path)!r} is not a diffusers checkpoint: it has no model_index.json")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag}: cannot read {index_file}: {error}") from None
    missing = [part for part in PIPELINE_PARTS if not (isinstance(index.get(part), list) and index[part][0]
                                                          and (root / part).is_dir())]
    if missing:
        raise UsageError(f"{flag} {str(path)!r} is not a Stable Diffusion checkpoint: it lacks {missing} (this "
                         f"trainer fine-tunes the UNet of Stable Diffusion 1.x/2.x pipelines; found "
                         f"{index.get('_class_name', 'an unknown pipeline')})")
    if index.get("unet", [None, None])[1] != "UNet2DConditionModel":
        raise UsageError(f"{flag}: the checkpoint's unet is a {index['unet'][1]}, not a UNet2DConditionModel")
    _check_text_to_image_unet(root, index)
    return index


def _check_text_to_image_unet(root: Path, index: dict) -> None:
    """UsageError for a UNet this trainer cannot condition: an inpainting / depth one (its input has more channels
    than the VAE's latents) or an SDXL-style one (extra embeddings, a second text encoder)."""
    flag = "--pretrained_model_name_or_path"
    configs = {}
    for part in ("unet", "vae"):
        try:
            configs[part] = json.loads((root / part / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UsageError(f"{flag}: cannot read {root / part / 'config.json'}: {error}") from None
    unet, vae = configs["unet"], configs["vae"]
    in_channels, latents = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if in_channels != latents:
        raise UsageError(f"{flag}: the UNet takes {in_channels} input channels but the VAE makes {latents}-channel "
                         f"latents (an inpainting or depth checkpoint?); this trainer fine-tunes text-to-image "
                         f"Stable Diffusion 1.x/2.x")
    extra = [key for key in ("addition_embed_type", "class_embed_type") if unet.get(key) is not None]
    if extra or "text_encoder_2" in index:
        found = extra + (["text_encoder_2"] if "text_encoder_2" in index else [])
        raise UsageError(f"{flag}: the checkpoint has {found} (SDXL or another conditioned UNet); this trainer "
                         f"fine-tunes text-to-image Stable Diffusion 1.x/2.x")


def _list_images(directory, flag: str) -> list:
    try:
        return data_lib.list_images(directory, flag)
    except ValueError as error:
        raise UsageError(str(error)) from None


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def vae_scale_factor(vae_config) -> int:
    """How many pixels a latent spans per side: 2 per down block after the first (8 for Stable Diffusion)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(pretrained, resolution: int) -> None:
    """UsageError unless ``resolution`` is a multiple of the checkpoint's VAE downsampling factor (read from its
    config: before class images are generated or the model loads)."""
    config = json.loads((Path(pretrained) / "vae" / "config.json").read_text(encoding="utf-8"))
    factor = vae_scale_factor(config)
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} must be a multiple of the VAE's downsampling factor {factor}")


def load_components(path, variant: Optional[str] = None) -> Components:
    """The pipeline's parts from a local checkpoint (``variant``: the weight files' variant, e.g. "fp16"); the UNet
    in float32, whatever the files hold."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant).float(),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"))
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--pretrained_model_name_or_path {str(path)!r}: cannot load the pipeline's parts "
                         f"({type(error).__name__}: {error})") from None


def _plain_lora(unet: torch.nn.Module, rank: int) -> None:
    """The plain LoRA baseline: PEFT LoRA on the layers of the paper-lora preset, initialised as the Bayesian LoRA
    layers are (A kaiming-uniform, B = 0, alpha = rank)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                target_modules=list(PRESETS["paper-lora"].patterns)))


def prepare_unet(unet: torch.nn.Module, args: argparse.Namespace) -> list:
    """Make ``unet`` trainable for ``args.method`` / ``args.preset`` in place; returns the Bayesian layer names."""
    bayes_options = dict(sigma_init=args.sigma_init, prior_sigma=args.prior_sigma, sigma_param=args.sigma_param,
                         estimator=args.estimator, rank=args.rank,
                         prior_dtype=None if args.prior_dtype == "fp32" else PRECISIONS[args.prior_dtype])
    if args.method == "full":
        unet.requires_grad_(True)
        if args.preset == "none":
            return []
        return patch(unet, args.preset, freeze_others=False, **bayes_options)
    if args.method == "lora":
        if args.preset == "none":
            _plain_lora(unet, args.rank)
            return []
        return patch(unet, args.preset, **bayes_options)
    from . import difffit

    difffit.prepare(unet)
    if args.preset == "none":
        return []
    # After DiffFit: its scaled branch outputs (attn1.to_out.0, ff.net.2) are no longer plain linears, so the preset
    # makes the other matched layers Bayesian; DiffFit's trainable set stays as it is.
    return patch(unet, args.preset, freeze_others=False, **bayes_options)


def steps_for_epochs(epochs: int, items: int, batch_size: int, accumulation: int, processes: int) -> int:
    """Optimizer steps of ``epochs`` passes, counted as diffusers' DreamBooth scripts count them: each process
    loads ceil(ceil(items / batch_size) / processes) batches per epoch, and a pass ends with a step even when
    fewer than ``accumulation`` batches are left."""
    batches = math.ceil(math.ceil(items / batch_size) / processes)
    return epochs * math.ceil(batches / accumulation)


def frozen_parameters_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that do not train to ``dtype`` (the autocast dtype, which their GEMMs run in anyway):
    SD 1.5's frozen UNet under LoRA takes 1.7 GB in bfloat16 instead of 3.4 GB; the trained ones stay float32."""
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def merged_unet(unet: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The fine-tuned UNet with every posterior mean, LoRA factor and DiffFit scale folded into plain layers."""
    if bayesian_modules(unet):
        merge(unet)
    if args.method == "difffit":
        from . import difffit

        difffit.merge(unet)
    return unet


def _sigma_parameter_names(model: torch.nn.Module) -> set:
    """Qualified names of the sigma parameters (rho) of the Bayesian layers: excluded from weight decay."""
    names = set()
    for prefix, module in bayesian_modules(model):
        for name, _ in module.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("rho"):
                names.add(f"{prefix}.{name}")
    return names


def _adamw_class(args: argparse.Namespace):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW for --use_8bit_adam (UsageError if bitsandbytes is missing)."""
    if not args.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("--use_8bit_adam needs the bitsandbytes package, which is not installed "
                         "(pip install bitsandbytes; it needs a CUDA GPU)") from None
    return bitsandbytes.optim.AdamW8bit


def make_optimizer(unet: torch.nn.Module, args: argparse.Namespace, learning_rate: float):
    """AdamW over the trainable parameters; the sigma parameters get no weight decay (it would shrink sigma)."""
    optimizer_class = _adamw_class(args)
    no_decay = _sigma_parameter_names(unet)
    decay, sigma = [], []
    for name, param in unet.named_parameters():
        if param.requires_grad:
            (sigma if name in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.adam_weight_decay}]
    if sigma:
        groups.append({"params": sigma, "weight_decay": 0.0})
    return optimizer_class(groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon)


def trainable_state(unet: torch.nn.Module) -> dict:
    """The parameters that train, by qualified name (what a checkpoint stores; the rest is the base model)."""
    return {name: param.detach() for name, param in unet.named_parameters() if param.requires_grad}


def sigma_statistics(unet: torch.nn.Module) -> dict:
    """mean / min / max of sigma over every Bayesian weight element (empty without Bayesian layers), read from the
    device once (not three syncs per layer each step)."""
    per_layer, count = [], 0
    with torch.no_grad():
        for _, module in bayesian_modules(unet):
            sigma = module.sigma.detach()
            if sigma.numel():
                per_layer.append(torch.stack([sigma.sum(dtype=torch.float64), sigma.min().double(),
                                              sigma.max().double()]))
                count += sigma.numel()
    if not count:
        return {}
    device = per_layer[0].device
    sums, lows, highs = torch.stack([t.to(device) for t in per_layer]).cpu().unbind(1)
    return {"sigma_mean": sums.sum().item() / count, "sigma_min": lows.min().item(), "sigma_max": highs.max().item()}


@torch.no_grad()
def encode_prompt(components: Components, prompt: str, device) -> torch.Tensor:
    """The (1, tokens, dim) text-encoder output for ``prompt`` (padded to the tokenizer's max length)."""
    tokens = components.tokenizer(prompt, padding="max_length", truncation=True,
                                  max_length=components.tokenizer.model_max_length, return_tensors="pt")
    return components.text_encoder(tokens.input_ids.to(device))[0]


# ----------------------------------------------------------------------------------------------------------------
# class images (prior preservation)
# ----------------------------------------------------------------------------------------------------------------

def generate_class_images(args: argparse.Namespace, accelerator) -> None:
    """Fill ``--class_data_dir`` up to ``--num_class_images`` images of ``--class_prompt`` with the pretrained
    pipeline, the missing images split over the processes (each image is a function of --seed and its file
    index, so the folder is the same on any number of GPUs)."""
    directory = Path(args.class_data_dir)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--class_data_dir {str(directory)!r} is not a directory")
    have = data_lib.count_images(directory)
    if have >= args.num_class_images:
        return
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    targets = _new_class_image_indices(directory, args.num_class_images - have)
    accelerator.wait_for_everyone()  # every process listed the folder before any writes to it
    mine = targets[accelerator.process_index::accelerator.num_processes]
    if mine:
        from diffusers import StableDiffusionPipeline
        from tqdm.auto import tqdm

        precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, variant=args.variant, safety_checker=None,
            requires_safety_checker=False)
        pipeline.to(accelerator.device, PRECISIONS[precision])
        pipeline.set_progress_bar_config(disable=True)
        base_seed = args.seed if args.seed is not None else 0
        with tqdm(total=len(mine), desc="class images", unit="img",
                  disable=not accelerator.is_local_main_process) as progress:
            for start in range(0, len(mine), args.sample_batch_size):
                batch = mine[start:start + args.sample_batch_size]
                # one generator per image, seeded by its file's index: images added later to a folder (a run
                # stopped while generating, a larger --num_class_images) are new ones, not copies of the first
                generators = [torch.Generator(accelerator.device).manual_seed(_class_image_seed(base_seed, index))
                              for index in batch]
                images = pipeline([args.class_prompt] * len(batch), num_inference_steps=args.num_class_inference_steps,
                                  generator=generators).images
                for index, image in zip(batch, images):
                    _save_image_atomic(image, directory / f"class-{index:05d}.png")
                progress.update(len(batch))
        del pipeline
    accelerator.wait_for_everyone()


def _new_class_image_indices(directory: Path, count: int) -> list:
    """The ``count`` smallest indices i whose ``class-<i>.png`` does not exist (a file of the user's is never
    overwritten)."""
    indices, index = [], 0
    while len(indices) < count:
        if not (directory / f"class-{index:05d}.png").exists():
            indices.append(index)
        index += 1
    return indices


def _class_image_seed(seed: int, index: int) -> int:
    """A generator seed that is a function of (--seed, file index) alone, a different one for every index."""
    return data_lib.mix_seed(seed, index, 0xC1A55)


# ----------------------------------------------------------------------------------------------------------------
# files: atomic writes, checkpoints, metrics, plots, validation grids
# ----------------------------------------------------------------------------------------------------------------

def _write_atomic(path: Path, write) -> None:
    """Write ``path`` through ``write(temporary_path)`` and an atomic rename."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _save_image_atomic(image, path: Path) -> None:
    _write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _write_json_atomic(obj, path: Path) -> None:
    _write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def list_checkpoints(output_dir) -> list:
    """``(step, path)`` of the complete checkpoints in ``output_dir``, oldest first."""
    found = []
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(spec: str, output_dir) -> Optional[Path]:
    """The checkpoint ``--resume_from_checkpoint spec`` names: 'latest' -> the newest in ``output_dir`` or None; a
    path (or a checkpoint name inside ``output_dir``) -> that directory, which must be a complete checkpoint."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(spec)
    if not path.is_dir() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {spec!r} is not a checkpoint of this trainer (no {STATE_FILE})")
    return path


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint of this trainer was written at."""
    return int(json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))["global_step"])


def check_no_later_checkpoints(output_dir, resume_from: Optional[Path]) -> None:
    """UsageError if ``output_dir`` holds checkpoints after the step this run starts from (0, or that of
    ``resume_from``): they belong to another run, whose steps this one would interleave with its own in the
    checkpoints, in ``--resume_from_checkpoint latest`` and in metrics.jsonl."""
    start = 0 if resume_from is None else checkpoint_step(resume_from)
    later = [path.name for step, path in list_checkpoints(output_dir) if step > start]
    if not later:
        return
    if resume_from is None:
        raise UsageError(f"--output_dir {str(output_dir)!r} holds the checkpoints of an earlier run "
                         f"({', '.join(later)}): continue it with --resume_from_checkpoint latest, or choose "
                         "another --output_dir")
    raise UsageError(f"--output_dir {str(output_dir)!r} holds checkpoints after {resume_from.name} "
                     f"({', '.join(later)}): resume from the newest (latest), or move those away first")


EARLIER_RUN_FILES = (CONFIG_FILE, "metrics.jsonl")  # what every run writes at its start
# what a finished run (or another trainer's) leaves: unet/ and the pipeline's other parts, or the LoRA file
RESULT_FILES = ("unet", "model_index.json", LORA_FILE, *PIPELINE_PARTS[1:])


def resumes_in_place(output_dir: Path, resume_from: Optional[Path]) -> bool:
    """Whether ``resume_from`` is a checkpoint of the run in ``output_dir`` (not one copied from elsewhere)."""
    # the folder it sits in, not where a checkpoint-N symlink points
    return resume_from is not None and Path(os.path.abspath(resume_from)).parent.resolve() == output_dir.resolve()


def check_no_earlier_run(output_dir: Path, resume_from: Optional[Path], args: argparse.Namespace) -> None:
    """UsageError if this run would replace the records or the result of another run in ``output_dir`` (a finished
    run that kept no checkpoint, one whose checkpoints were removed, another trainer's output, or any run when the
    checkpoint resumed comes from another folder), unless --overwrite_output_dir.  --resume_from_checkpoint
    latest without a checkpoint starts afresh over an earlier run's records, with a warning (a job requeued before
    its first checkpoint), but not over a finished run's result."""
    if resumes_in_place(output_dir, resume_from) or args.overwrite_output_dir:
        return
    records = [name for name in EARLIER_RUN_FILES if (output_dir / name).exists()]
    results = [name for name in RESULT_FILES if (output_dir / name).exists()]
    if not records and not results:
        return
    if resume_from is None and args.resume_from_checkpoint == "latest" and not results:
        logger.warning("%s holds an earlier run's records (%s) but no checkpoint: --resume_from_checkpoint latest "
                       "starts afresh and replaces them", output_dir, ", ".join(records))
        return
    what = "the result of an earlier run" if results else "the records of an earlier run"
    hint = "resume into an empty --output_dir, " if resume_from is not None else ""
    raise UsageError(f"--output_dir {str(output_dir)!r} holds {what} ({', '.join(records + results)}): {hint}"
                     f"choose another --output_dir, or pass --overwrite_output_dir to replace that run's records "
                     f"and result")


def remove_earlier_records(output_dir: Path, after_step: int = 0) -> None:
    """The validation grids of the steps after ``after_step`` go, and at a fresh start (``after_step`` 0) the
    metrics plot and an earlier result (--overwrite_output_dir: the LoRA file, or unet/, the pipeline's other parts
    and model_index.json): an earlier run's, or those a resumed run is about to redo, so that none is mixed into
    this run's."""
    stale = [path for path in sorted((output_dir / "validation").glob("step-*.png"))
             if not path.stem[5:].isdigit() or int(path.stem[5:]) > after_step]
    if after_step == 0:
        stale.append(output_dir / "metrics.png")
        for name in RESULT_FILES:  # present only where --overwrite_output_dir let this run start
            if (output_dir / name).is_dir() and not (output_dir / name).is_symlink():
                shutil.rmtree(output_dir / name)
            else:
                stale.append(output_dir / name)
    for path in stale:
        path.unlink(missing_ok=True)


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, limit: Optional[int]) -> Path:
    """``accelerator.save_state`` into a temporary directory renamed to ``checkpoint-<step>`` once complete."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(state, temporary / STATE_FILE)
        if final.exists():
            stale = output_dir / f".{final.name}.old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale)
        else:
            os.replace(temporary, final)
        if limit is not None:  # the one just written and the newest limit - 1 others stay
            others = [path for _, path in list_checkpoints(output_dir) if path != final]
            for old in others[:max(0, len(others) - (limit - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step, appended and flushed as training goes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.records = Path(path), enabled, []

    def start(self, resumed_step: int) -> None:
        """Keep the records up to ``resumed_step`` (a resumed run replaces what came after its checkpoint); a fresh
        run (step 0) starts an empty file."""
        if self.path.exists():
            self.records = [r for r in self._readable_records() if r.get("step", 0) <= resumed_step]
        if self.enabled:
            lines = "".join(json.dumps(r) + "\n" for r in self.records)
            _write_atomic(self.path, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))

    def _readable_records(self) -> list:
        """The file's records; a line that does not parse (cut off when a run was killed mid-write) is skipped
        with a warning."""
        records = []
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    logger.warning("%s: line %d is not a JSON record (cut off?): skipped", self.path, number)
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()


def plot_metrics(records: list, path: Path) -> None:
    """The loss, KL, sigma and learning-rate curves of ``records`` as one PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    series = lambda key: [r.get(key) if r.get(key) is not None else math.nan for r in records]
    panels = [("diffusion loss", [("loss", "total"), ("mse", "instance MSE"), ("prior_mse", "prior MSE")]),
              ("KL(q || p)", [("kl", "KL")]),
              ("posterior sigma", [("sigma_mean", "mean"), ("sigma_min", "min"), ("sigma_max", "max")]),
              ("learning rate", [("lr", "lr")])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for axis, (title, keys) in zip(axes, panels):
        drawn = False
        for key, label in keys:
            values = series(key)
            if any(math.isfinite(v) for v in values):
                axis.plot(steps, values, label=label)
                drawn = True
        finite = [v for key, _ in keys for v in series(key) if math.isfinite(v)]
        if drawn and min(finite) > 0 and max(finite) > 20 * min(finite):  # log scale for curves spanning decades
            axis.set_yscale("log")
        if not drawn:
            axis.text(0.5, 0.5, "no Bayesian layers" if title != "diffusion loss" else "no data",
                      ha="center", va="center", transform=axis.transAxes)
        elif len(keys) > 1:
            axis.legend(fontsize=8)
        axis.set_title(title)
        axis.set_xlabel("step")
    figure.tight_layout()
    _write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def image_grid(images: list):
    """Images side by side in one row (PIL)."""
    from PIL import Image

    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (i * width, 0))
    return grid


@torch.no_grad()
def validation_images(components: Components, unet: torch.nn.Module, args: argparse.Namespace, accelerator) -> list:
    """``--num_validation_images`` images of ``--validation_prompt`` from the current posterior means (the UNet in
    eval mode), with a fixed generator and torch's global random state left untouched.  One image at a time, as
    diffusers' DreamBooth scripts: a batch of them (twice that in the UNet, with guidance) and its VAE decode would
    come on top of the training state, and a GPU that fits training could run out of memory at the first grid."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), accelerator.autocast():
            generator = torch.Generator(accelerator.device).manual_seed(args.seed if args.seed is not None else 0)
            return [pipeline(args.validation_prompt, height=args.resolution, width=args.resolution,
                             num_inference_steps=args.validation_inference_steps, generator=generator).images[0]
                    for _ in range(args.num_validation_images)]
    finally:
        unet.train(was_training)
        if devices:
            torch.cuda.empty_cache()  # the sampling's activations, back before training goes on


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What ``train`` produced: the output directory, the steps run, the merged UNet (eval mode; with --method lora
    under --mixed_precision its frozen weights are in that dtype), the metric records, and the result file
    (``pytorch_lora_weights.safetensors`` or the ``unet/`` directory)."""

    output_dir: Path
    global_step: int
    unet: torch.nn.Module
    metrics: list
    weights_path: Path
    bayesian_layers: list = field(default_factory=list)


def _resume_config(args: argparse.Namespace, num_processes: int, base_unet: Optional[str], instance_images: str,
                   class_images: Optional[str]) -> dict:
    """What a checkpoint records and a resume must match: the flags of RESUME_KEYS, the process count, and
    fingerprints of the base UNet's weights and of the image lists (the batch stream indexes the images)."""
    config = {key: getattr(args, key) for key in RESUME_KEYS if key != "num_processes"}
    config["num_processes"] = num_processes
    config.update(base_unet=base_unet, instance_images=instance_images, class_images=class_images)
    return config


def weights_fingerprint(model: torch.nn.Module, samples: int = 16) -> str:
    """A short hash of ``model``'s state: names, shapes, dtypes and ``samples`` + 1 evenly spaced values of each
    tensor.  Cheap (no pass over the weights) and unchanged when the checkpoint folder moves; two checkpoints
    that differ anywhere but between the sampled values of every tensor give different fingerprints."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picked = flat[::max(1, flat.numel() // samples)].to("cpu", torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype};".encode())
        digest.update(picked.numpy().tobytes())
    return "weights " + digest.hexdigest()[:16]


def images_fingerprint(images: Optional[list], sizes: bool = True) -> Optional[str]:
    """The count and a hash of the names (and, with ``sizes``, the byte sizes) of ``images``; None for no list.
    Class images are fingerprinted without sizes: regenerated on another GPU or with another batch size, they
    differ by a rounding in a few pixels, which changes their PNG bytes but not what the batch stream indexes."""
    if images is None:
        return None
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{Path(image).name}\0{Path(image).stat().st_size if sizes else ''}\0".encode())
    return f"{len(images)} files {digest.hexdigest()[:16]}"


def check_resume_config(checkpoint: Path, config: dict) -> dict:
    """The checkpoint's training state, after checking that it was written with ``config`` (the keys of ``config``
    it records; a UsageError naming every one that differs)."""
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    recorded = state["config"]
    changed = {k: (recorded[k], v) for k, v in config.items() if k in recorded and recorded[k] != v}
    if changed:
        raise UsageError(f"--resume_from_checkpoint {str(checkpoint)!r} was written with other settings: "
                         + ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in changed.items()))
    return state


def check_class_image_count(checkpoint: Path, state: dict, args: argparse.Namespace) -> None:
    """Before any class image is generated: a resume under --with_prior_preservation trains on as many class images
    as the checkpoint's run (``generate_class_images`` fills the folder up to --num_class_images, so that run used
    exactly its own count); UsageError otherwise, instead of generating images for a resume that is then refused."""
    recorded = state["config"].get("class_images")
    if not args.with_prior_preservation or recorded is None:
        return
    count = int(recorded.split(" ", 1)[0])
    if count != args.num_class_images:
        raise UsageError(f"--resume_from_checkpoint {str(checkpoint)!r} was written with {count} class images "
                         f"(now --num_class_images {args.num_class_images}): resume with --num_class_images {count}")


def _optimizer_settings(optimizer) -> list:
    """Each parameter group's settings, everything but its parameters (lr, initial_lr, betas, eps, weight_decay)."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def _apply_optimizer_settings(optimizer, lr_scheduler, settings: list) -> None:
    """After ``load_state``, which restores the checkpoint's learning rates and Adam settings with its moments: this
    run's ``settings`` (``_optimizer_settings`` of the optimizer as built from the flags) again, and the schedule's
    base rates from them, with the rate at the resumed step; the moments and the step count stay the checkpoint's.
    A resume may so change --learning_rate, --scale_lr, the Adam flags and the schedule."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the torch schedule
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # what diffusers' get_scheduler makes
        raise TypeError(f"cannot re-base a {type(scheduler).__name__} schedule on resume")
    for group, fresh in zip(optimizer.param_groups, settings, strict=True):
        group.update(fresh)
    scheduler.base_lrs = [fresh["initial_lr"] for fresh in settings]
    for group, base, rate in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * rate(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _start_or_resume(accelerator, args: argparse.Namespace, checkpoint: Optional[Path], config: dict,
                     optimizer=None, lr_scheduler=None) -> tuple:
    """(step, data seed) to start from: (0, --seed or a random seed shared by all processes) for a fresh run; for
    a resumed one, the checkpoint's, after checking it was written with the same ``config`` and loading it (model,
    optimizer moments, schedule position and every random generator; the learning rates and Adam settings are this
    run's flags, ``_apply_optimizer_settings``)."""
    if checkpoint is None:
        seed = [args.seed if args.seed is not None else secrets.randbits(62)]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(seed)
        return 0, int(seed[0])
    state = check_resume_config(checkpoint, config)
    unrecorded = [key for key in config if key not in state["config"]]  # written by an earlier version
    if unrecorded:
        logger.warning("%s does not record %s: not checked", checkpoint, ", ".join(unrecorded))
    if getattr(accelerator, "scaler", None) is not None and not (checkpoint / "scaler.pt").exists():
        raise UsageError(f"--resume_from_checkpoint {str(checkpoint)!r} was not written under --mixed_precision fp16 "
                         f"(it has no gradient scaler state): resume with the precision of that run")
    settings = _optimizer_settings(optimizer) if optimizer is not None else None
    accelerator.load_state(str(checkpoint))
    if settings is not None:
        recorded = [group["initial_lr"] for group in optimizer.param_groups]  # the checkpoint's, as loaded
        _apply_optimizer_settings(optimizer, lr_scheduler, settings)
        if recorded != [fresh["initial_lr"] for fresh in settings]:
            accelerator.print(f"learning rate {settings[0]['initial_lr']:g} from the flags (the checkpoint's: "
                              f"{recorded[0]:g})")
    accelerator.print(f"resumed from {checkpoint} at step {state['global_step']}")
    return int(state["global_step"]), int(state["data_seed"])


def _earlier_runs(path: Path) -> list:
    """The runs recorded in the ``training_config.json`` a resumed run replaces, oldest first (each without its
    own history), so that a resume with other flags (a longer schedule, another learning rate) loses none."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        logger.warning("cannot read %s (%s): its record of the earlier runs is dropped", path, error)
        return []
    earlier = previous.pop("earlier_runs", [])
    return [*earlier, previous] if isinstance(earlier, list) else [previous]


def _diffusion_target(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UsageError(f"the checkpoint's scheduler predicts {kind!r}; supported: 'epsilon', 'v_prediction'")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per sample: min(SNR(t), gamma) / SNR(t) for a UNet that
    predicts the noise, min(SNR(t), gamma) / (SNR(t) + 1) for v-prediction; SNR(t) = alpha_bar / (1 - alpha_bar)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp_max(snr, gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return torch.where(snr > 0, clipped / snr, 1.0)  # the limit 1 at a zero terminal SNR


def batch_loss(unet, base_unet, components: Components, batch: dict, instance_embedding, class_embedding,
               args: argparse.Namespace, weight_dtype, has_kl: bool) -> tuple:
    """(loss, instance MSE, prior MSE, KL) of one batch, as 0-dim float32 tensors; ``loss`` carries the graph.

    The DreamBooth objective: encode the images (VAE posterior sample), noise them at random timesteps, predict with
    the UNet conditioned on the prompt embeddings (CEP-perturbed with --cep), MSE against the scheduler's target;
    the class images (prior preservation) follow the instance images in the batch.  ``base_unet`` is the unwrapped
    ``unet``, whose Bayesian layers hold the KL of this forward."""
    scheduler = components.noise_scheduler
    device = instance_embedding.device
    pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
    num_instance = batch["num_instance"]
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.sample() * components.vae.config.scaling_factor
    latents = latents.float()
    noise = torch.randn_like(latents)
    if args.offset_noise:  # diffusers' --offset_noise: a per-sample, per-channel shift of the noise
        noise = noise + 0.1 * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    text = instance_embedding.expand(num_instance, -1, -1)
    if class_embedding is not None:
        text = torch.cat([text, class_embedding.expand(latents.shape[0] - num_instance, -1, -1)])
    if args.cep != "none":
        from . import cep

        text = cep.perturb(text, gamma=args.cep_gamma, kind=args.cep)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample.float()
    target = _diffusion_target(scheduler, latents, noise, timesteps).float()
    zero = torch.zeros((), device=device)
    mse = F.mse_loss(prediction[:num_instance], target[:num_instance])
    instance_loss = mse
    if args.snr_gamma is not None:
        per_sample = (prediction[:num_instance] - target[:num_instance]).square().mean(dim=(1, 2, 3))
        weights = min_snr_weights(scheduler, timesteps[:num_instance], args.snr_gamma)
        instance_loss = (per_sample * weights).mean()
    prior_mse = F.mse_loss(prediction[num_instance:], target[num_instance:]) if class_embedding is not None else zero
    kl = kl_loss(base_unet).to(device) if has_kl else zero
    loss = instance_loss + args.prior_loss_weight * prior_mse + args.kl_weight * kl
    return loss, mse, prior_mse, kl


def train(args: argparse.Namespace) -> TrainResult:
    """Fine-tune as ``args`` says (see ``build_parser``) and write the outputs; returns a ``TrainResult``.

    Raises UsageError for files that are not what the flags say, NonFiniteLossError when the loss or the KL stops
    being finite (naming the step)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    # --- check the inputs before anything heavy runs
    check_pretrained(args.pretrained_model_name_or_path)
    check_resolution(args.pretrained_model_name_or_path, args.resolution)
    instance_images = _list_images(args.instance_data_dir, "--instance_data_dir")
    if args.with_prior_preservation and args.class_data_dir is not None and Path(args.class_data_dir).is_file():
        raise UsageError(f"--class_data_dir {args.class_data_dir!r} is not a directory")
    output_dir = Path(args.output_dir)
    _check_output_dir(output_dir, Path(args.pretrained_model_name_or_path))
    check_folders_apart(args)
    _adamw_class(args)
    resume_from = None
    if args.resume_from_checkpoint is not None:
        resume_from = find_checkpoint(args.resume_from_checkpoint, output_dir)
        if resume_from is None:
            logger.info("no checkpoint in %s: starting a new run", output_dir)
    check_no_later_checkpoints(output_dir, resume_from)
    check_no_earlier_run(output_dir, resume_from, args)
    # Accelerator() takes the precision from the flag or from accelerate launch's config (this variable); fp8
    # would need transformer-engine or MS-AMP there and has no autocast dtype here
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    source = "--mixed_precision" if args.mixed_precision else "the accelerate config"
    if precision not in PRECISIONS:
        raise UsageError(f"mixed precision {precision!r} (from {source}) is not supported: use no, fp16 or bf16")
    if precision == "fp16" and not torch.cuda.is_available():
        raise UsageError(f"mixed precision fp16 (from {source}) needs a CUDA GPU; use bf16 on the CPU")

    # The prior means are buffers equal on every rank: DDP's default re-broadcast of all buffers each forward would
    # send a pretrained copy of every patched weight per step for nothing.
    try:
        accelerator = Accelerator(mixed_precision=args.mixed_precision,
                                  project_config=ProjectConfiguration(project_dir=str(output_dir)),
                                  kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    except ValueError as error:  # e.g. bf16 on a GPU without it
        raise UsageError(f"accelerate: {error}") from None
    weight_dtype = PRECISIONS[accelerator.mixed_precision]
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)
    if resume_from is not None:  # the flags, instance images and class image count now; the rest once known
        early = _resume_config(args, accelerator.num_processes, None, images_fingerprint(instance_images), None)
        state = check_resume_config(resume_from, {k: v for k, v in early.items()
                                                  if k not in ("base_unet", "class_images")})
        check_class_image_count(resume_from, state, args)

    class_images = None
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
        class_images = _list_images(args.class_data_dir, "--class_data_dir")[:args.num_class_images]

    # --- the model
    components = load_components(args.pretrained_model_name_or_path, args.variant)
    for frozen in (components.vae, components.text_encoder):  # inference only: in the autocast dtype
        frozen.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    unet = components.unet
    base_fingerprint = weights_fingerprint(unet)  # before any layer is replaced
    bayesian_layers = prepare_unet(unet, args)
    if args.method == "lora":  # as diffusers' LoRA scripts: only the factors are trained and exported
        frozen_parameters_to(unet, weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    instance_embedding = encode_prompt(components, args.instance_prompt, accelerator.device)
    class_embedding = (encode_prompt(components, args.class_prompt, accelerator.device)
                       if args.with_prior_preservation else None)

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(unet, args, learning_rate)
    trainable = trainable_state(unet)
    if not trainable:
        raise UsageError(f"--method {args.method} --preset {args.preset} leaves nothing to train")

    dataset = data_lib.DreamBoothDataset(instance_images, args.resolution, class_images, args.center_crop)
    if args.max_train_steps is None:
        args.max_train_steps = steps_for_epochs(args.num_train_epochs, len(dataset), args.train_batch_size,
                                                args.gradient_accumulation_steps, accelerator.num_processes)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    base_unet = accelerator.unwrap_model(unet)
    _register_checkpoint_hooks(accelerator, base_unet)

    config = _resume_config(args, accelerator.num_processes, base_fingerprint, images_fingerprint(instance_images),
                            images_fingerprint(class_images, sizes=False))
    global_step, data_seed = _start_or_resume(accelerator, args, resume_from, config, optimizer, lr_scheduler)
    # a run resumed from another folder's checkpoint keeps none of this folder's records (its own are there)
    in_place = resumes_in_place(output_dir, resume_from)
    kept_step = global_step if in_place else 0
    if accelerator.is_main_process:
        remove_earlier_records(output_dir, kept_step)
    metrics = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process)
    metrics.start(kept_step)

    accumulation = args.gradient_accumulation_steps
    stream = data_lib.BatchStream(len(dataset), args.train_batch_size, data_seed,
                                  start=global_step * accumulation * accelerator.num_processes
                                  + accelerator.process_index, stride=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=stream, collate_fn=data_lib.collate,
                                         num_workers=args.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(data_seed))
    batches = iter(loader)

    if accelerator.is_main_process:
        run_config = {"args": vars(args), "bayesian_layers": bayesian_layers,
                      "trainable_parameters": sum(t.numel() for t in trainable.values()),
                      "data_seed": data_seed, "num_processes": accelerator.num_processes, "checks": config}
        if resume_from is not None:
            run_config.update(resumed_from=resume_from.name if in_place else str(resume_from.resolve()),
                              resumed_at_step=global_step,
                              earlier_runs=_earlier_runs(resume_from.parent / CONFIG_FILE))
        _write_json_atomic(run_config, output_dir / CONFIG_FILE)
    accelerator.print(
        f"finetune: method {args.method}, preset {args.preset}, {len(bayesian_layers)} Bayesian layers, "
        f"{sum(t.numel() for t in trainable.values()):,} trainable parameters, {len(instance_images)} instance "
        f"images{f', {len(class_images)} class images' if class_images else ''}, steps {global_step} -> "
        f"{args.max_train_steps}")

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="finetune", unit="step",
                    disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        step = global_step + 1
        totals = {"loss": 0.0, "mse": 0.0, "prior_mse": 0.0, "kl": 0.0}
        for micro in range(accumulation):
            batch = next(batches)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(unet):
                loss, mse, prior_mse, kl = batch_loss(unet, base_unet, components, batch, instance_embedding,
                                                      class_embedding, args, weight_dtype, has_kl=bool(bayesian_layers))
                values = accelerator.reduce(torch.stack([loss, mse, prior_mse, kl]).detach(), "mean").tolist()
                if not all(math.isfinite(v) for v in values):
                    raise NonFiniteLossError(
                        f"step {step}: the loss is not finite (loss {values[0]}, instance MSE {values[1]}, prior "
                        f"MSE {values[2]}, KL {values[3]}); stopped. Lower --learning_rate or --sigma_init, or use "
                        f"--mixed_precision no")
                accelerator.backward(loss / accumulation)
            for key, value in zip(totals, values):
                totals[key] += value / accumulation
        grad_norm = None
        if args.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], args.max_grad_norm)
            grad_norm = float(norm) if norm is not None and math.isfinite(float(norm)) else None  # JSON: no inf
        learning_rate_now = lr_scheduler.get_last_lr()[0]  # the rate this step trains at
        optimizer.step()
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # fp16: the scaler found inf/NaN gradients
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step = step
        progress.update(1)

        record = {"step": step, "epoch": stream.passes(step * accumulation * accelerator.num_processes),
                  "loss": totals["loss"], "mse": totals["mse"],
                  "prior_mse": totals["prior_mse"] if class_embedding is not None else None,
                  "kl": totals["kl"] if bayesian_layers else None, "kl_weight": args.kl_weight,
                  "lr": learning_rate_now, "grad_norm": grad_norm, "skipped": skipped,
                  **sigma_statistics(base_unet)}
        metrics.append(record)
        progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "kl", "sigma_mean")
                              if record.get(k) is not None})

        if step % args.checkpointing_steps == 0:
            path = save_checkpoint(accelerator, output_dir, step,
                                   {"global_step": step, "data_seed": data_seed, "config": config},
                                   args.checkpoints_total_limit)
            if accelerator.is_local_main_process:
                progress.write(f"saved {path}")
        if step % args.checkpointing_steps == 0 or validates_at(args, step):
            _report(args, accelerator, components, base_unet, metrics, output_dir, step,
                    validate=validates_at(args, step))
    progress.close()

    # --- the result: posterior means merged
    accelerator.wait_for_everyone()
    base_unet.eval()
    _report(args, accelerator, components, base_unet, metrics, output_dir, global_step,
            validate=not validates_at(args, global_step))  # unless that step has its grid already
    weights_path = _save_result(args, base_unet, output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"wrote {weights_path} and {metrics.path}")
    return TrainResult(output_dir, global_step, base_unet, metrics.records, weights_path, bayesian_layers)


def validates_at(args: argparse.Namespace, step: int) -> bool:
    """Whether step ``step`` writes a validation grid: every --validation_steps, else at each checkpoint."""
    return step % (args.validation_steps or args.checkpointing_steps) == 0


def _report(args, accelerator, components, unet, metrics: MetricsLog, output_dir: Path, step: int,
            validate: bool) -> None:
    """The curves plot and (``validate`` and --validation_prompt) a validation grid for ``step`` (main process)."""
    if not accelerator.is_main_process:
        return
    if metrics.records:
        plot_metrics(metrics.records, output_dir / "metrics.png")
    if validate and args.validation_prompt:
        images = validation_images(components, unet, args, accelerator)
        (output_dir / "validation").mkdir(exist_ok=True)
        _save_image_atomic(image_grid(images), output_dir / "validation" / f"step-{step:06d}.png")


def _register_checkpoint_hooks(accelerator, unet: torch.nn.Module) -> None:
    """Checkpoints hold the trainable parameters only (``trainable_parameters.safetensors``): the frozen rest, and
    the Bayesian layers' prior means, are the pretrained weights that every run loads anyway."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {name: tensor.contiguous().cpu() for name, tensor in trainable_state(unet).items()}
            save_file(state, os.path.join(output_dir, TRAINABLE_FILE))
        weights.clear()

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, TRAINABLE_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"checkpoint {input_dir!r} has no {TRAINABLE_FILE}")
        state = load_file(path)
        expected = set(trainable_state(unet))
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UsageError(f"checkpoint {input_dir!r} does not fit this model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        unet.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_result(args, unet: torch.nn.Module, output_dir: Path, is_main: bool) -> Path:
    """Write the fine-tuned weights with the posterior means merged (for full and DiffFit, as a whole pipeline);
    returns the LoRA file's or the ``unet/`` directory's path.  ``unet`` ends merged."""
    if args.method == "lora":
        path = output_dir / LORA_FILE
        if args.preset == "none":
            if is_main:
                from diffusers import StableDiffusionPipeline
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft.utils import get_peft_model_state_dict

                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
                temporary = output_dir / ".lora.tmp"
                StableDiffusionPipeline.save_lora_weights(str(temporary), unet_lora_layers=layers,
                                                          safe_serialization=True)
                os.replace(temporary / LORA_FILE, path)
                shutil.rmtree(temporary)
            return path
        from . import save_lora

        if is_main:
            _write_atomic(path, lambda tmp: save_lora(unet, str(tmp)))
        merged_unet(unet, args)
        return path
    merged_unet(unet, args)
    path = output_dir / "unet"
    if is_main:
        _replace_directory(path, lambda tmp: unet.save_pretrained(str(tmp), safe_serialization=True))
        _complete_pipeline(Path(args.pretrained_model_name_or_path), output_dir)
    return path


def _replace_directory(path: Path, write) -> None:
    """Write a directory through ``write(temporary_path)``, then put it in ``path``'s place."""
    temporary = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    if path.exists():
        shutil.rmtree(path)
    os.replace(temporary, path)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def _link_or_copy(source: str, target: str) -> None:
    """A weight file: a hard link (no second copy of its bytes on the same file system), else a copy.  Any other
    file (configs, tokenizer files: a few kB) is copied, since diffusers and transformers rewrite those in place
    when a pipeline is saved over this folder, which through a link would rewrite the base model's."""
    if str(source).endswith(WEIGHT_SUFFIXES):
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def _complete_pipeline(pretrained: Path, output_dir: Path) -> None:
    """Make ``output_dir`` (holding the fine-tuned ``unet/``) a whole pipeline, as diffusers' DreamBooth script
    does: the checkpoint's other parts (their weight files hard-linked where the file system allows) and its
    model_index.json, so that ``StableDiffusionPipeline.from_pretrained(output_dir)`` loads the fine-tuned model
    (with the run's ``variant=`` when ``--variant`` was given: the other parts are that variant's files)."""
    index = json.loads((pretrained / "model_index.json").read_text(encoding="utf-8"))
    for part, entry in index.items():
        if part == "unet" or not (isinstance(entry, list) and entry[0] and (pretrained / part).is_dir()):
            continue
        _replace_directory(output_dir / part,
                           lambda tmp, source=pretrained / part: shutil.copytree(source, tmp,
                                                                                 copy_function=_link_or_copy))
    _write_atomic(output_dir / "model_index.json", lambda tmp: shutil.copy2(pretrained / "model_index.json", tmp))


if __name__ == "__main__":
    sys.exit(main())
