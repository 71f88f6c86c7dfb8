"""Condition-embedding perturbation (CEP, Chen et al. 2024): noise on the condition embedding during training.

Few-shot fine-tuning sees each prompt embedding over and over; adding a small fresh perturbation to the condition
(the text-encoder output fed to the UNet / transformer as ``encoder_hidden_states``) at every training step spreads
the learned conditional distribution and delays overfitting.  Two variants:

* CEP-G (``kind="gaussian"``): delta ~ N(0, (gamma / sqrt(d))^2), elementwise;
* CEP-U (``kind="uniform"``): delta ~ U(-gamma / sqrt(d), gamma / sqrt(d)), elementwise;

with d the embedding dimension (the last dim) and gamma = 1 by default, so the perturbation's norm over the last dim
is about gamma (CEP-G) or gamma / sqrt(3) (CEP-U), whatever the width of the text encoder.

Training only: apply ``perturb`` to the embeddings of a training batch, never at inference (sampling uses the clean
embedding).  Each call draws new noise for every element, so every sample of the batch and every step gets its own
delta.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from bnn_kernels.checks import check_choice

__all__ = ["KINDS", "perturb", "noise_scale"]

KINDS = ("gaussian", "uniform")


def noise_scale(dim: int, gamma: float = 1.0) -> float:
    """gamma / sqrt(dim): the standard deviation of CEP-G's delta and the half-width of CEP-U's."""
    return gamma / math.sqrt(dim)


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a non-negative float, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a non-negative finite float, got {gamma}")
    return gamma


def perturb(embeddings: torch.Tensor, gamma: float = 1.0, kind: str = "gaussian",
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``embeddings + delta`` with a fresh elementwise delta of scale gamma / sqrt(d), d = ``embeddings.shape[-1]``.

    ``embeddings``: a floating tensor (..., d), e.g. the (batch, tokens, d) text-encoder output; its dtype and device
    are kept and it is not modified.  ``gamma``: the perturbation strength (0 returns ``embeddings`` itself).
    ``kind``: ``"gaussian"`` (CEP-G: delta ~ N(0, (gamma/sqrt(d))^2)) or ``"uniform"`` (CEP-U: delta ~
    U(-gamma/sqrt(d), gamma/sqrt(d))).  ``generator``: a ``torch.Generator`` on the embeddings' device to draw from
    (torch's default generator when None, so ``torch.manual_seed`` reproduces a run).  Gradients flow to
    ``embeddings`` unchanged; delta is a constant.  Use during training only.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating tensor, got dtype {embeddings.dtype}")
    if embeddings.dim() == 0 or embeddings.shape[-1] == 0:
        raise ValueError(f"embeddings must have a non-empty last dim (the embedding size), got shape "
                         f"{tuple(embeddings.shape)}")
    gamma = _check_gamma(gamma)
    check_choice("kind", kind, KINDS)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != embeddings.device.type:
            raise ValueError(f"generator is on {generator.device} but embeddings are on {embeddings.device}; "
                             f"pass a generator on the embeddings' device")
    if gamma == 0:
        return embeddings
    scale = noise_scale(embeddings.shape[-1], gamma)
    factory = dict(generator=generator, dtype=embeddings.dtype, device=embeddings.device)
    if kind == "gaussian":
        delta = torch.randn(embeddings.shape, **factory).mul_(scale)
    else:
        delta = torch.rand(embeddings.shape, **factory).mul_(2 * scale).sub_(scale)
    return embeddings + delta
