"""The study's data: scikit-learn's handwritten digits (1797 images, 8x8, ten classes), shipped with the package.

Images are upsampled (bilinear) to the study's size and scaled to [-1, 1]: the upsampled digits are smooth, so the
high-frequency noise patterns of the corruption stage stand out against real images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Digits", "load_digits_images", "few_shot_indices"]

_MAX_PIXEL = 16.0  # load_digits stores intensities 0..16


@dataclass
class Digits:
    """All digit images, ``images`` (N, 1, size, size) float32 in [-1, 1], and their ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def of_class(self, digit: int) -> torch.Tensor:
        return self.images[self.labels == digit]

    def without_class(self, digit: int) -> "Digits":
        keep = self.labels != digit
        return Digits(self.images[keep], self.labels[keep])


def load_digits_images(size: int = 16) -> Digits:
    """scikit-learn's digits at ``size`` x ``size`` (bilinear upsampling from 8x8), in [-1, 1]."""
    from sklearn.datasets import load_digits

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / _MAX_PIXEL).unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).mul(2).sub(1)
    return Digits(images.contiguous(), torch.from_numpy(bunch.target.astype(np.int64)))


def few_shot_indices(count: int, shots: int, seed: int) -> np.ndarray:
    """``shots`` distinct indices into ``count`` images, drawn by ``seed`` (each seed fine-tunes on other images)."""
    if shots > count:
        raise ValueError(f"shots ({shots}) exceeds the {count} images available")
    return np.sort(np.random.default_rng(seed).choice(count, size=shots, replace=False))
