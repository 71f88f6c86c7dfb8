"""What one study runs: the data, the model, pretraining, the few-shot fine-tuning methods and the evaluation.

A ``StudyConfig`` is plain data (a frozen dataclass) so that it goes into the JSON result as it is.  Three presets:
``quick`` (the ``make demo`` default: minutes on a 2-core CPU including pretraining), ``full`` (more seeds, steps and
samples) and ``smoke`` (seconds; the end-to-end test).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

__all__ = ["METHODS", "Method", "StudyConfig", "PRESETS", "config_for"]


@dataclass(frozen=True)
class Method:
    """One way to fine-tune: ``bayesian`` (the ``paper-dreambooth`` layers get a Gaussian posterior; otherwise the
    same layers are trained plainly), ``kl`` (use the KL term with the config's ``kl_weight``; otherwise weight 0,
    as the paper's scripts), ``cep`` (condition-embedding perturbation during training)."""

    name: str
    bayesian: bool
    kl: bool
    cep: bool
    description: str


METHODS = {m.name: m for m in (
    Method("baseline", False, False, False, "plain fine-tuning of the paper-dreambooth layers and the new token"),
    Method("bnn", True, False, False, "Bayesian paper-dreambooth layers, KL weight 0 (the paper's scripts)"),
    Method("bnn-kl", True, True, False, "Bayesian paper-dreambooth layers, KL(q||p) with weight kl_weight"),
    Method("cep", False, False, True, "plain fine-tuning with condition-embedding perturbation (CEP-G)"),
    Method("bnn-cep", True, False, True, "Bayesian layers (KL weight 0) and condition-embedding perturbation"),
)}


# seeds become torch.manual_seed(offset + seed) with offsets up to 30000: kept well inside the int64 range
MAX_SEED = 2 ** 32


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of a study run (see ``PRESETS`` for the named ones)."""

    preset: str = "quick"
    # data: sklearn's 8x8 digits, upsampled (bilinear) to image_size, scaled to [-1, 1]
    image_size: int = 16
    holdout_class: int = 7          # never seen in pretraining; the few-shot "subject"
    shots: int = 3                  # training images of the held-out class per fine-tuning run (drawn per seed)
    # model: a class-conditional UNet2DConditionModel; the condition is `tokens` learned vectors per class fed as
    # encoder_hidden_states (cross-attention), plus a null condition for classifier-free guidance
    block_out_channels: tuple = (16, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    tokens: int = 2
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # v-prediction (as Stable Diffusion 2): with epsilon prediction the first sampling steps, where the cosine
    # schedule leaves almost no signal, amplify the UNet's errors into noise already in the pretrained samples
    prediction_type: str = "v_prediction"
    # pretraining (cached under <out>/cache, keyed by the settings above and below)
    pretrain_steps: int = 800
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    pretrain_ema: float = 0.995
    uncond_prob: float = 0.1        # classifier-free guidance dropout during pretraining
    pretrain_seed: int = 0
    classifier_epochs: int = 12
    # few-shot fine-tuning
    methods: tuple = ("baseline", "bnn", "bnn-kl", "cep", "bnn-cep")
    seeds: tuple = (0, 1)
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    finetune_batch: int = 8         # the shots in turn (each with its own noise level and noise)
    # sigma stored directly as in the paper; the paper's 0.01 was set for Stable Diffusion's weights: the weights
    # this study makes Bayesian have an RMS of about 0.07, and 0.03 keeps the posterior noise a sizeable fraction
    # of them (the study records the ratio; --sigma-init 0.01 --prior-sigma 0.01 gives the paper's absolute values)
    sigma_init: float = 0.03
    prior_sigma: float = 0.03
    # Adam moves a parameter by about its learning rate per step: sigma_lr keeps sigma near sigma_init over the run,
    # as in the paper (lr 5e-6 over ~1000 steps lets sigma move by at most 0.005)
    sigma_lr: float = 1e-5
    kl_weight: float = 1e-6         # bnn-kl's weight on KL(q||p) (summed over the weights)
    cep_gamma: float = 1.0          # CEP-G's gamma: delta ~ N(0, (gamma/sqrt(d))^2)
    # evaluation: DDIM samples from the same initial noise at every evaluation (paired across methods and steps)
    eval_every: int = 20
    eval_samples: int = 48
    sampler_steps: int = 10
    guidance_scale: float = 2.0
    grid_samples: int = 8           # samples per evaluation kept for the sample grids
    # torch threads.  1 by default: on a shared 2-core machine two threads per process are many times slower
    # than one as soon as other processes compete for the cores; 0 keeps torch's default
    threads: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {sorted(METHODS)}, got {list(self.methods)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods are listed twice: {list(self.methods)}")
        if not self.seeds or any(not isinstance(s, int) or not 0 <= s < MAX_SEED for s in self.seeds):
            raise ValueError(f"seeds must be ints in 0..{MAX_SEED - 1}, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds are listed twice: {list(self.seeds)}")
        for name in ("sigma_init", "prior_sigma", "sigma_lr", "finetune_lr", "pretrain_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name in ("kl_weight", "cep_gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {value}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not 0 <= self.holdout_class <= 9:
            raise ValueError(f"holdout_class must be a digit 0-9, got {self.holdout_class}")
        if not 1 <= self.shots <= 20:
            raise ValueError(f"shots must be in 1..20, got {self.shots}")
        if self.image_size < 8 or self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"image_size must be >= 8 and divisible by {2 ** (len(self.block_out_channels) - 1)}, "
                             f"got {self.image_size}")
        for name in ("pretrain_steps", "finetune_steps", "eval_every", "eval_samples", "sampler_steps",
                     "pretrain_batch", "finetune_batch", "classifier_epochs", "grid_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_samples < 2:
            raise ValueError("eval_samples must be at least 2 (diversity and the Frechet distance need pairs)")

    @property
    def eval_steps(self) -> list:
        """The fine-tuning steps at which samples are drawn and measured: 0 (the pretrained model with the new
        token at its initial value), every ``eval_every`` steps, and the last step."""
        steps = list(range(0, self.finetune_steps + 1, self.eval_every))
        if steps[-1] != self.finetune_steps:
            steps.append(self.finetune_steps)
        return steps

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def key(self, fields: tuple, version: int = 1) -> str:
        """A short hash of the named settings (and of ``version``, for the code that uses them, when above 1): the
        cache key of what they determine."""
        values = {name: getattr(self, name) for name in fields}
        if version > 1:
            values["version"] = version
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=list).encode()).hexdigest()[:12]


PRETRAIN_FIELDS = ("image_size", "holdout_class", "block_out_channels", "layers_per_block", "norm_num_groups",
                   "attention_head_dim", "cross_attention_dim", "tokens", "train_timesteps", "beta_schedule",
                   "prediction_type", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_ema",
                   "uncond_prob", "pretrain_seed")
CLASSIFIER_FIELDS = ("image_size", "classifier_epochs", "pretrain_seed")
# part of the cache keys of the pretrained model and the classifier: raised whenever their training computes
# something else for the same settings (2: the warm-up shortened for runs under 500 steps)
PRETRAIN_VERSION = 2
CLASSIFIER_VERSION = 1

PRESETS = {
    "quick": StudyConfig(),
    "full": StudyConfig(preset="full", seeds=(0, 1, 2, 3), finetune_steps=400, eval_samples=64),
    "smoke": StudyConfig(preset="smoke", block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                         attention_head_dim=4, tokens=1, pretrain_steps=20, pretrain_batch=8, classifier_epochs=1,
                         methods=("baseline", "bnn"), seeds=(0,), shots=2, finetune_steps=4, finetune_batch=2,
                         eval_every=2, eval_samples=4, sampler_steps=2, grid_samples=2),
}


def config_for(preset: str, **overrides) -> StudyConfig:
    """The named preset with ``overrides`` (settings given as None keep the preset's value)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown study settings {unknown}")
    return dataclasses.replace(PRESETS[preset], **overrides)
