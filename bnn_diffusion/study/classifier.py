"""The study's judge: a small CNN trained on real digits of all ten classes (the held-out one included).

Its class probabilities measure fidelity (probability of the held-out class) and quality (confidence, entropy) of
generated samples; its penultimate features feed the Frechet distance to real images.  It is trained on 80% of the
digits (small random shifts as augmentation; no noise augmentation, so that noisy samples lower its confidence) and
its accuracy on the other 20% is reported with the study.  The few-shot training images are drawn from those 20%
(``unseen_by_classifier``): a model that copies its shots must not be judged on images the judge has learnt.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Digits

__all__ = ["DigitClassifier", "train_classifier", "split_indices", "unseen_by_classifier"]

FEATURES = 32


class DigitClassifier(nn.Module):
    """Two conv layers, a 32-d feature layer and the 10-way output; any input size >= 8."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> tuple:
        """``(probabilities (N, 10), features (N, 32))`` in eval mode."""
        self.eval()
        probs, feats = [], []
        for chunk in images.split(batch):
            f = self.features(chunk)
            feats.append(f)
            probs.append(F.softmax(self.head(f), dim=1))
        return torch.cat(probs), torch.cat(feats)


def split_indices(count: int, seed: int, test_fraction: float = 0.2) -> tuple:
    """A fixed random ``(train, test)`` split of ``count`` items."""
    order = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * (1 - test_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def unseen_by_classifier(count: int, seed: int) -> np.ndarray:
    """Boolean mask over the ``count`` digits: True for the test split of ``train_classifier(..., seed=seed)``."""
    mask = np.zeros(count, dtype=bool)
    mask[split_indices(count, seed)[1]] = True
    return mask


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch moved by one random shift of up to one pixel in each direction, the same for every image
    (background fill)."""
    size = images.shape[-1]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + size, dx:dx + size]


def train_classifier(digits: Digits, *, epochs: int, seed: int, progress=None) -> tuple:
    """A ``DigitClassifier`` trained on the train split; returns ``(classifier, test_accuracy)``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train, test = split_indices(len(digits.labels), seed)
    images, labels = digits.images[train], digits.labels[train]
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = 64
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            loss = F.cross_entropy(model(_shift(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress.update(1)
    probs, _ = model.predict(digits.images[test])
    accuracy = (probs.argmax(1) == digits.labels[test]).float().mean().item()
    return model.eval(), accuracy
