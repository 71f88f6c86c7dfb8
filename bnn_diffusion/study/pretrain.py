"""Pretraining and caching: the class-conditional diffusion model (nine classes, the held-out one never seen) and
the digit classifier.  Both are saved under ``<out>/cache`` with a hash of the settings that determine them, and a
later run with the same settings loads them instead of training again.
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .classifier import DigitClassifier, train_classifier
from .config import CLASSIFIER_FIELDS, CLASSIFIER_VERSION, PRETRAIN_FIELDS, PRETRAIN_VERSION, StudyConfig
from .data import Digits
from .models import ClassConditioner, build_unet, diffusion_target, make_noise_scheduler

__all__ = ["Pretrained", "pretrained_diffusion", "pretrained_classifier", "atomic_save"]


class Pretrained:
    """The pretrained UNet and conditioner (EMA weights, eval mode) and what pretraining reported."""

    def __init__(self, unet, conditioner: ClassConditioner, info: dict) -> None:
        self.unet, self.conditioner, self.info = unet, conditioner, info

    def copy(self) -> tuple:
        """Fresh deep copies ``(unet, conditioner)`` to fine-tune."""
        return copy.deepcopy(self.unet), copy.deepcopy(self.conditioner)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file and rename it into place: a crash never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 50 steps (a tenth of the run for runs under 500 steps), then cosine decay to 10%."""
    warmup = max(1, min(50, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _train_diffusion(config: StudyConfig, data: Digits, progress) -> tuple:
    torch.manual_seed(config.pretrain_seed)
    generator = torch.Generator().manual_seed(config.pretrain_seed)
    unet = build_unet(config)
    conditioner = ClassConditioner(config.tokens, config.cross_attention_dim)
    scheduler = make_noise_scheduler(config)
    params = list(unet.parameters()) + list(conditioner.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.pretrain_steps))
    ema = [p.detach().clone() for p in params]
    losses = []
    unet.train()
    for _ in range(config.pretrain_steps):
        index = torch.randint(0, len(data.labels), (config.pretrain_batch,), generator=generator)
        images, labels = data.images[index], data.labels[index].clone()
        labels[torch.rand(len(labels), generator=generator) < config.uncond_prob] = conditioner.null_label
        noise = torch.randn(images.shape, generator=generator)
        t = torch.randint(0, config.train_timesteps, (len(labels),), generator=generator)
        noisy = scheduler.add_noise(images, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=conditioner(labels)).sample
        loss = F.mse_loss(prediction, diffusion_target(scheduler, images, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - config.pretrain_ema)
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    tail = losses[-min(100, len(losses)):]
    return unet.eval(), conditioner.eval(), {"final_loss": sum(tail) / len(tail)}


def pretrained_diffusion(config: StudyConfig, data: Digits, cache_dir: Path, progress_factory) -> Pretrained:
    """The pretrained model for ``config``: loaded from ``cache_dir`` when cached, else trained on ``data`` (which
    must not contain the held-out class) and cached.  ``progress_factory(total, desc)`` makes a progress bar."""
    if (data.labels == config.holdout_class).any():
        raise ValueError(f"pretraining data contains the held-out class {config.holdout_class}")
    path = Path(cache_dir) / f"diffusion-{config.key(PRETRAIN_FIELDS, PRETRAIN_VERSION)}.pt"
    unet, conditioner = build_unet(config), ClassConditioner(config.tokens, config.cross_attention_dim)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        unet.load_state_dict(saved["unet"])
        conditioner.load_state_dict(saved["conditioner"])
        info = dict(saved["info"], cached=True, path=str(path))
        return Pretrained(unet.eval(), conditioner.eval(), info)
    begin = time.perf_counter()
    with progress_factory(config.pretrain_steps, "pretrain diffusion (9 classes)") as bar:
        unet, conditioner, info = _train_diffusion(config, data, bar)
    info.update(seconds=time.perf_counter() - begin, steps=config.pretrain_steps,
                parameters=sum(p.numel() for p in unet.parameters()))
    atomic_save({"unet": unet.state_dict(), "conditioner": conditioner.state_dict(), "info": info}, path)
    return Pretrained(unet, conditioner, dict(info, cached=False, path=str(path)))


def pretrained_classifier(config: StudyConfig, digits: Digits, cache_dir: Path, progress_factory) -> tuple:
    """``(classifier, info)``: the digit classifier for ``config``, from the cache or trained on ``digits``."""
    path = Path(cache_dir) / f"classifier-{config.key(CLASSIFIER_FIELDS, CLASSIFIER_VERSION)}.pt"
    classifier = DigitClassifier()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        classifier.load_state_dict(saved["classifier"])
        return classifier.eval(), dict(saved["info"], cached=True, path=str(path))
    begin = time.perf_counter()
    with progress_factory(config.classifier_epochs, "train digit classifier") as bar:
        classifier, accuracy = train_classifier(digits, epochs=config.classifier_epochs, seed=config.pretrain_seed,
                                                progress=bar)
    info = {"test_accuracy": accuracy, "seconds": time.perf_counter() - begin, "epochs": config.classifier_epochs}
    atomic_save({"classifier": classifier.state_dict(), "info": info}, path)
    return classifier, dict(info, cached=False, path=str(path))
