"""Few-shot fine-tuning of the pretrained model on a held-out class, one method and seed at a time, measured as it
goes.

DreamBooth's situation: a new token (here ``tokens`` raw vectors, initialised to the mean of the pretrained classes'
vectors: "a digit") is bound to a few images of an unseen class by training it together with the paper's layer set,
the self-attention (attn1) q/k/v/out and feed-forward linears of every transformer block.  Every method trains the
very same parameters:

* plain methods: ``bnn_diffusion.patch(unet, "paper-dreambooth")`` followed at once by ``bnn_diffusion.merge`` leaves
  exactly those layers as plain ``nn.Linear`` modules holding the pretrained weights, trainable, and everything
  else frozen;
* Bayesian methods keep the patched layers: mean mu (from the pretrained weight) and sigma (stored directly,
  ``sigma_init``), prior N(pretrained, ``prior_sigma``^2), one weight sample per forward; sampling uses mu;
* CEP adds ``bnn_diffusion.cep.perturb`` (CEP-G) to the condition during training only.

Pairing: for a given seed every method sees the same few-shot images, the same diffusion timesteps and noise in
training, and the same initial noise for its evaluation samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnn_diffusion as bd

from .classifier import DigitClassifier
from .config import METHODS, StudyConfig
from .metrics import METRICS, Reference, evaluate_samples
from .models import NUM_CLASSES, diffusion_target, make_noise_scheduler, sample_images
from .pretrain import Pretrained

__all__ = ["RunResult", "finetune_run", "subject_init", "shot_batch"]

_PAPER_PRESET = "paper-dreambooth"


@dataclass
class RunResult:
    """One method x seed: ``record`` (JSON-ready numbers per evaluation step) and ``grids`` (eval step -> the first
    ``grid_samples`` samples, (n, H, W) in [-1, 1], for the sample-grid figures)."""

    record: dict
    grids: dict


def subject_init(conditioner, holdout_class: int) -> torch.Tensor:
    """The new token's starting value: the mean raw vectors of the pretrained classes (the held-out class and the
    null condition excluded), (tokens, dim)."""
    seen = torch.tensor([c for c in range(NUM_CLASSES) if c != holdout_class])
    with torch.no_grad():
        return conditioner.raw(seen).mean(0)


def shot_batch(shots: int, batch: int, step: int) -> torch.Tensor:
    """The shot indices of training step ``step`` (from 1): the shots in turn, continuing from the last step's, so
    that every shot is trained on equally often (to within one) whatever the batch size."""
    return (torch.arange(batch) + (step - 1) * batch) % shots


def _setup(unet, config: StudyConfig, bayesian: bool) -> list:
    """Make the paper's layer set trainable (Bayesian or plain) and freeze everything else; returns the names."""
    names = bd.patch(unet, _PAPER_PRESET, sigma_init=config.sigma_init, prior_sigma=config.prior_sigma,
                     sigma_param="direct")
    if not bayesian:
        bd.merge(unet)
    return names


def _drift(unet, pretrained_state: dict) -> float:
    """||W - W_pretrained|| / ||W_pretrained|| over the trained weights and biases of the UNet (the mean for a
    Bayesian layer)."""
    change = base = 0.0
    for name, param in unet.named_parameters():
        if not param.requires_grad or name.endswith("weight_rho"):
            continue
        original = pretrained_state[name.replace("weight_mu", "weight")]
        change += (param.detach() - original).square().sum().item()
        base += original.square().sum().item()
    return (change / base) ** 0.5 if base > 0 else 0.0


def _sigma_mean(unet) -> float:
    sigmas = [m.sigma.detach().flatten() for _, m in bd.bayesian_modules(unet)]
    return torch.cat(sigmas).mean().item() if sigmas else float("nan")


def finetune_run(config: StudyConfig, method_name: str, seed: int, pretrained: Pretrained,
                 classifier: DigitClassifier, reference: Reference, progress=None) -> RunResult:
    """Fine-tune a copy of ``pretrained`` on ``reference.shots`` with one method and seed, evaluating at
    ``config.eval_steps``."""
    if method_name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method_name!r}")
    method = METHODS[method_name]
    begin = time.perf_counter()
    torch.manual_seed(seed)  # the Bayesian layers draw their per-forward seeds from torch's default generator
    data_generator = torch.Generator().manual_seed(10_000 + seed)
    cep_generator = torch.Generator().manual_seed(20_000 + seed)
    eval_noise = torch.randn(config.eval_samples, 1, config.image_size, config.image_size,
                             generator=torch.Generator().manual_seed(30_000 + seed))

    unet, conditioner = pretrained.copy()
    pretrained_state = {k: v.detach() for k, v in pretrained.unet.state_dict().items()}
    conditioner.requires_grad_(False)
    _setup(unet, config, method.bayesian)
    subject = nn.Parameter(subject_init(conditioner, config.holdout_class))
    weights = [p for n, p in unet.named_parameters() if p.requires_grad and not n.endswith("weight_rho")]
    sigmas = [p for n, p in unet.named_parameters() if p.requires_grad and n.endswith("weight_rho")]
    groups = [{"params": weights + [subject], "lr": config.finetune_lr}]
    if sigmas:
        groups.append({"params": sigmas, "lr": config.sigma_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = make_noise_scheduler(config)
    null_condition = conditioner(torch.tensor([conditioner.null_label]))
    shots = reference.shots

    record = {"method": method_name, "seed": seed, "steps": [], "metrics": {m: [] for m in METRICS},
              "train_loss": [], "kl": [], "sigma_mean": [], "drift": []}
    grids, window = {}, []

    def evaluate(step: int) -> None:
        unet.eval()
        with torch.no_grad():
            condition = conditioner.encode(subject.detach()).unsqueeze(0)
            samples = sample_images(unet, condition, null_condition, eval_noise, noise_scheduler=scheduler,
                                    steps=config.sampler_steps, guidance_scale=config.guidance_scale)
            values = evaluate_samples(samples, classifier, reference)
            kl = bd.kl_loss(unet).item() if method.bayesian else 0.0
        record["steps"].append(step)
        for name in METRICS:
            record["metrics"][name].append(values[name])
        record["train_loss"].append(float(np.mean(window)) if window else None)
        record["kl"].append(kl)
        record["sigma_mean"].append(_sigma_mean(unet) if method.bayesian else None)
        record["drift"].append(_drift(unet, pretrained_state))
        grids[step] = samples[:config.grid_samples, 0].numpy().copy()
        window.clear()
        unet.train()

    eval_steps = set(config.eval_steps)
    evaluate(0)
    for step in range(1, config.finetune_steps + 1):
        batch_images = shots[shot_batch(len(shots), config.finetune_batch, step)]
        noise = torch.randn(batch_images.shape, generator=data_generator)
        t = torch.randint(0, config.train_timesteps, (len(batch_images),), generator=data_generator)
        noisy = scheduler.add_noise(batch_images, noise, t)
        condition = conditioner.encode(subject).unsqueeze(0).expand(len(batch_images), -1, -1)
        if method.cep:
            condition = bd.cep.perturb(condition, config.cep_gamma, "gaussian", generator=cep_generator)
        prediction = unet(noisy, t, encoder_hidden_states=condition).sample
        denoising_loss = F.mse_loss(prediction, diffusion_target(scheduler, batch_images, noise, t))
        loss = denoising_loss + config.kl_weight * bd.kl_loss(unet) if method.kl else denoising_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method_name} seed {seed}: the loss is not finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(denoising_loss.item())  # the same measure for every method (the KL is recorded apart)
        if step in eval_steps:
            evaluate(step)
        if progress is not None:
            progress.update(1)
    record["seconds"] = time.perf_counter() - begin
    return RunResult(record, grids)
