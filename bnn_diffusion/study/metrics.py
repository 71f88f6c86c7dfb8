"""What the study measures on a set of generated samples, and the reference values of real images.

* fidelity: the classifier's mean probability of the held-out class (does the model draw the subject?);
* quality / corruption: the classifier's mean confidence and entropy, the Frechet distance between the classifier
  features of the samples and of real images of the class, and two noise-pattern measures relative to real images
  of the class: the fraction of spectral energy above a cut-off frequency (``hf_ratio``) and the total variation
  (``tv_ratio``); 1.0 means "as smooth as real digits";
* diversity: the mean pairwise distance between samples;
* memorisation: the mean distance from each sample to its nearest few-shot training image (0 = a copy).

Distances between images are root-mean-square pixel differences (images in [-1, 1]), so they do not grow with the
image size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .classifier import DigitClassifier

__all__ = ["rms_distances", "mean_pairwise_distance", "nearest_neighbour_distance", "total_variation",
           "high_frequency_fraction", "frechet_distance", "entropy", "Reference", "evaluate_samples",
           "METRICS"]

# name -> (label, which direction is better: +1 higher, -1 lower, 0 neither on its own)
METRICS = {
    "fidelity": ("P(held-out class)", +1),
    "confidence": ("classifier confidence", +1),
    "entropy": ("classifier entropy (nats)", -1),
    "frechet": ("Frechet distance (classifier features)", -1),
    "hf_ratio": ("high-frequency energy / real", -1),
    "tv_ratio": ("total variation / real", -1),
    "diversity": ("diversity (mean pairwise RMS distance)", 0),
    "memorisation": ("NN distance to the shots (RMS)", 0),
}


def _flat(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise ValueError(f"images must be a tensor (N, ...), got {type(images).__name__}")
    return images.reshape(images.shape[0], -1).double()


def rms_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) root-mean-square pixel distances between the images of ``a`` and of ``b``."""
    fa, fb = _flat(a), _flat(b)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"images of a and b differ in size: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    return torch.cdist(fa, fb).div(fa.shape[1] ** 0.5)


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean RMS distance over all pairs of distinct samples (0 when all samples are identical)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    distances = rms_distances(images, images)
    return (distances.sum() / (n * (n - 1))).item()


def nearest_neighbour_distance(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each image, the RMS distance to its nearest reference image (0 for an exact copy), (N,)."""
    return rms_distances(images, references).min(dim=1).values


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontally and vertically adjacent pixels, per image, (N,)."""
    x = images.double()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


def high_frequency_fraction(images: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Per image, the fraction of its spectral energy (mean removed) at radial frequencies above ``cutoff`` cycles
    per pixel (Nyquist = 0.5), (N,).  A flat image counts as 0."""
    if not 0 < cutoff < 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5) cycles per pixel, got {cutoff}")
    x = images.double().reshape(images.shape[0], images.shape[-2], images.shape[-1])
    x = x - x.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(x).abs().square()
    fy = torch.fft.fftfreq(x.shape[1], dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[2], dtype=torch.float64)
    radius = (fy[:, None].square() + fx[None, :].square()).sqrt()
    total = power.sum(dim=(1, 2))
    high = power[:, radius > cutoff].sum(dim=1)
    return torch.where(total > 0, high / total.clamp_min(1e-300), torch.zeros_like(total))


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), via symmetric eigendecompositions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be (N >= 2, F) arrays of the same F, got {a.shape} and {b.shape}")
    mean_term = float(np.square(a.mean(0) - b.mean(0)).sum())
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return max(mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2 * cross), 0.0)


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``probabilities``, (N,)."""
    p = probabilities.double()
    return -(p * p.clamp_min(1e-12).log()).sum(dim=1)


@dataclass
class Reference:
    """Real images of the held-out class (the shots excluded) and the few-shot training images, with the values the
    ratios are taken against."""

    target: int
    real: torch.Tensor
    shots: torch.Tensor
    real_features: np.ndarray
    real_tv: float
    real_hf: float
    cutoff: float

    @classmethod
    def build(cls, classifier: DigitClassifier, target: int, real: torch.Tensor, shots: torch.Tensor) -> "Reference":
        cutoff = min(0.25, 4.0 / real.shape[-1])  # above the Nyquist frequency of the original 8x8 digits
        _, features = classifier.predict(real)
        return cls(target, real, shots, features.double().numpy(), total_variation(real).mean().item(),
                   high_frequency_fraction(real, cutoff).mean().item(), cutoff)

    def real_values(self, classifier: DigitClassifier, samples: int, seed: int, unseen=None) -> dict:
        """The study's metrics on the real images of the class themselves (what a perfect model would score).
        ``frechet`` is then that of ``samples`` real images drawn by ``seed`` (as many as an evaluation generates,
        at most half) against the others: its floor at this sample size.  Most real images are in the
        classifier's training split, so their fidelity is optimistic; given ``unseen`` (those of them it never
        saw), ``fidelity_unseen`` is the fidelity of those alone."""
        values = evaluate_samples(self.real, classifier, self)
        if unseen is not None:
            values["fidelity_unseen"] = classifier.predict(unseen)[0][:, self.target].mean().item()
        _, features = classifier.predict(self.real)
        order = np.random.default_rng(seed).permutation(len(self.real))
        count = min(samples, len(self.real) // 2)
        features = features.double().numpy()
        values["frechet"] = frechet_distance(features[order[:count]], features[order[count:]])
        return values


def evaluate_samples(samples: torch.Tensor, classifier: DigitClassifier, reference: Reference) -> dict:
    """Every metric of ``METRICS`` on ``samples`` (N, 1, H, W) in [-1, 1], as floats."""
    probs, features = classifier.predict(samples.float())
    return {
        "fidelity": probs[:, reference.target].mean().item(),
        "confidence": probs.max(dim=1).values.mean().item(),
        "entropy": entropy(probs).mean().item(),
        "frechet": frechet_distance(features.double().numpy(), reference.real_features),
        "hf_ratio": high_frequency_fraction(samples, reference.cutoff).mean().item() / reference.real_hf,
        "tv_ratio": total_variation(samples).mean().item() / reference.real_tv,
        "diversity": mean_pairwise_distance(samples),
        "memorisation": nearest_neighbour_distance(samples, reference.shots).mean().item(),
    }
