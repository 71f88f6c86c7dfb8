"""From run records to numbers that answer the study's two questions, with the rules written down.

1. Does the corruption stage appear?  The noise-pattern measure (``hf_ratio``: high-frequency energy of the samples
   relative to real digits) is averaged over seeds and smoothed with a centred 3-point moving average (evaluation
   noise).  Its profile is a **rise** when its smoothed maximum after step 0 is at least ``RISE`` times its value at
   step 0 (not smoothed: every method and seed starts from the same pretrained model), and a **rise-and-fall**
   (the paper's corruption stage: noise appears, then recedes as the model overfits) when, besides, the maximum is
   not at the last evaluation and at least half of the excess over the start is gone by the end.  Anything else is
   **flat**.
2. Does a method mitigate it?  Paired with the baseline seed by seed: its peak noise (maximum over steps > 0 of the
   smoothed per-seed curve) must be lower in every seed and lower on average by at least ``MITIGATION`` (relative),
   while its final fidelity stays within ``FIDELITY_TOLERANCE`` of the baseline's (lower noise bought by not
   learning the subject does not count).  Higher peak noise by the same margin in every seed is "worsens";
   anything else is "no clear difference".
"""
from __future__ import annotations

import numpy as np

from .metrics import METRICS

__all__ = ["RISE", "MITIGATION", "FIDELITY_TOLERANCE", "NOISE_METRIC", "smooth", "profile", "aggregate",
           "summarize_method", "compare", "verdict"]

NOISE_METRIC = "hf_ratio"
RISE = 1.2
MITIGATION = 0.05
FIDELITY_TOLERANCE = 0.05


def smooth(values) -> np.ndarray:
    """Centred 3-point moving average; the first and last points average with their one neighbour."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 3:
        return v.copy()
    out = np.convolve(v, np.ones(3) / 3, mode="same")
    out[0], out[-1] = v[:2].mean(), v[-2:].mean()
    return out


def profile(steps, values) -> dict:
    """The shape of one noise curve (see the module docstring): start (the step-0 value), smoothed peak (after step
    0) and end, and the shape."""
    v = smooth(values)
    if len(v) < 2:
        raise ValueError("a profile needs at least two evaluations")
    peak_index = int(np.argmax(v[1:])) + 1
    start, peak, end = float(values[0]), float(v[peak_index]), float(v[-1])
    rises = peak >= RISE * start
    recovers = rises and peak_index < len(v) - 1 and (peak - end) >= 0.5 * (peak - start)
    return {"start": start, "peak": peak, "peak_step": int(steps[peak_index]), "end": end,
            "shape": "rise-and-fall" if recovers else ("rise" if rises else "flat")}


def aggregate(seed_records: dict) -> dict:
    """Mean and standard deviation over seeds of every metric and training curve, per evaluation step."""
    records = list(seed_records.values())
    steps = records[0]["steps"]
    if any(r["steps"] != steps for r in records):
        raise ValueError("runs of one method were evaluated at different steps")
    mean, std = {}, {}
    series = {name: [r["metrics"][name] for r in records] for name in METRICS}
    for key in ("train_loss", "kl", "sigma_mean", "drift"):
        if all(v is not None for r in records for v in r[key][1:]):
            series[key] = [[np.nan if v is None else v for v in r[key]] for r in records]
    for name, rows in series.items():
        array = np.asarray(rows, dtype=np.float64)
        mean[name] = [None if np.isnan(x) else float(x) for x in array.mean(0)]
        std[name] = [None if np.isnan(x) else float(x) for x in sample_std(array)]
    return {"steps": steps, "mean": mean, "std": std}


def sample_std(values: np.ndarray) -> np.ndarray:
    """The standard deviation over seeds (axis 0) with Bessel's correction (ddof 1); 0 for a single seed."""
    return values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(values[0], dtype=np.float64)


def _per_seed_peaks(seed_records: dict) -> dict:
    return {seed: float(smooth(r["metrics"][NOISE_METRIC])[1:].max()) for seed, r in seed_records.items()}


def summarize_method(seed_records: dict) -> dict:
    """The numbers of the table for one method: per seed and averaged."""
    agg = aggregate(seed_records)
    m = agg["mean"]
    peaks = _per_seed_peaks(seed_records)
    finals = {name: [r["metrics"][name][-1] for r in seed_records.values()] for name in METRICS}
    noise_profile = profile(agg["steps"], m[NOISE_METRIC])
    return {
        "noise_profile": noise_profile,
        "seed_shapes": {seed: profile(r["steps"], r["metrics"][NOISE_METRIC])["shape"]
                        for seed, r in seed_records.items()},
        "peak_noise_per_seed": peaks,
        "peak_noise_mean": float(np.mean(list(peaks.values()))),
        "peak_noise_std": float(sample_std(np.asarray(list(peaks.values())))),
        "mean_noise": float(np.mean(m[NOISE_METRIC][1:])),
        "fidelity_at_noise_peak": m["fidelity"][agg["steps"].index(noise_profile["peak_step"])],
        "peak_tv_ratio": float(smooth(m["tv_ratio"])[1:].max()),
        "best_frechet": float(np.min(m["frechet"][1:])),
        "final": {name: {"mean": float(np.mean(v)), "std": float(sample_std(np.asarray(v)))}
                  for name, v in finals.items()},
        "max_fidelity": float(np.max(m["fidelity"])),
    }


def compare(method: dict, baseline: dict) -> str:
    """"mitigates", "worsens" or "no clear difference" (the rule of the module docstring) for two summaries."""
    seeds = baseline["peak_noise_per_seed"].keys() & method["peak_noise_per_seed"].keys()
    if not seeds:
        raise ValueError("the method and the baseline share no seed")
    mine = np.array([method["peak_noise_per_seed"][s] for s in sorted(seeds)])
    base = np.array([baseline["peak_noise_per_seed"][s] for s in sorted(seeds)])
    change = (mine.mean() - base.mean()) / base.mean()
    fidelity_gap = baseline["final"]["fidelity"]["mean"] - method["final"]["fidelity"]["mean"]
    if np.all(mine < base) and change <= -MITIGATION and fidelity_gap <= FIDELITY_TOLERANCE:
        return "mitigates"
    if np.all(mine > base) and change >= MITIGATION:
        return "worsens"
    return "no clear difference"


def verdict(summaries: dict) -> dict:
    """The answers, as data: the baseline's noise profile and each other method's comparison with it."""
    if "baseline" not in summaries:
        return {"corruption_stage": None, "note": "no baseline run: nothing to compare with", "methods": {}}
    base = summaries["baseline"]
    shape = base["noise_profile"]["shape"]
    answer = {
        "corruption_stage": shape == "rise-and-fall",
        "baseline_noise_shape": shape,
        "baseline_seed_shapes": base["seed_shapes"],
        "methods": {},
    }
    for name, summary in summaries.items():
        if name == "baseline":
            continue
        seeds = sorted(base["peak_noise_per_seed"].keys() & summary["peak_noise_per_seed"].keys())
        answer["methods"][name] = {
            "outcome": compare(summary, base),
            "peak_noise_change": (summary["peak_noise_mean"] - base["peak_noise_mean"]) / base["peak_noise_mean"],
            "seeds_with_lower_peak": sum(summary["peak_noise_per_seed"][s] < base["peak_noise_per_seed"][s]
                                         for s in seeds),
            "seeds": len(seeds),
            "final_fidelity_change": (summary["final"]["fidelity"]["mean"]
                                      - base["final"]["fidelity"]["mean"]),
            "final_memorisation_change": (summary["final"]["memorisation"]["mean"]
                                          - base["final"]["memorisation"]["mean"]),
            "final_diversity_change": (summary["final"]["diversity"]["mean"]
                                       - base["final"]["diversity"]["mean"]),
        }
    return answer
