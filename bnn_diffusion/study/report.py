"""The study's report: PNG figures (metric curves per method, training curves, sample grids over steps, the shots)
and ``report.md`` with the setup, the answers in words, the table and the figures.  Every number comes from the
result dictionary that ``run.run_study`` also writes as JSON.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .analysis import FIDELITY_TOLERANCE, MITIGATION, RISE
from .config import METHODS
from .metrics import METRICS

__all__ = ["write_report", "plot_curves", "plot_training", "plot_samples", "plot_shots"]

_COLORS = {"baseline": "black", "bnn": "tab:blue", "bnn-kl": "tab:purple", "cep": "tab:orange",
           "bnn-cep": "tab:green"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, steps, mean, std, label, color) -> None:
    mean = np.array([np.nan if v is None else v for v in mean], dtype=float)
    std = np.array([np.nan if v is None else v for v in std], dtype=float)
    ax.plot(steps, mean, label=label, color=color, lw=1.6)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, lw=0)


def plot_curves(result: dict, path: Path) -> None:
    """One panel per metric: the mean over seeds per method (band: +-1 std), real digits of the class dashed (for
    fidelity, those the classifier never saw)."""
    plt = _pyplot()
    names = list(METRICS)
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(16, 7), constrained_layout=True)
    real = result["real"]["mean"]
    for ax, name in zip(axes.flat, names):
        for method, run in result["runs"].items():
            agg = run["aggregate"]
            _band(ax, agg["steps"], agg["mean"][name], agg["std"][name], method, _COLORS.get(method))
        if name == "fidelity" and "fidelity_unseen" in real:  # a judge's own training images score too high
            ax.axhline(real["fidelity_unseen"], color="gray", ls="--", lw=1, label="real digits (unseen by the judge)")
        elif name in real and name != "memorisation":
            ax.axhline(real[name], color="gray", ls="--", lw=1, label="real digits")
        elif name == "memorisation":
            ax.axhline(real[name], color="gray", ls="--", lw=1, label="real digits (not the shots)")
        ax.set_title(METRICS[name][0], fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Few-shot fine-tuning on the held-out digit {result['config']['holdout_class']} "
                 f"(mean over {len(result['config']['seeds'])} seed(s))")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(result: dict, path: Path) -> None:
    """Training loss, relative weight change and (Bayesian methods) mean sigma and KL."""
    plt = _pyplot()
    panels = [("train_loss", "denoising loss (mean since last evaluation)"), ("drift", "||W - W0|| / ||W0||"),
              ("sigma_mean", "mean sigma (Bayesian layers)"), ("kl", "KL(q||p), summed")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        for method, run in result["runs"].items():
            agg = run["aggregate"]
            if key in agg["mean"] and any(v is not None for v in agg["mean"][key]):
                _band(ax, agg["steps"], agg["mean"][key], agg["std"][key], method, _COLORS.get(method))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(images) -> np.ndarray:
    """Images side by side, each framed by one mid-grey pixel."""
    return np.concatenate([np.pad(image, 1, constant_values=0.0) for image in images], axis=1)


def plot_samples(grids: dict, method: str, seed: int, path: Path, max_rows: int = 11) -> None:
    """Rows: evaluation steps (at most ``max_rows``, evenly chosen); columns: the same initial noises."""
    plt = _pyplot()
    steps = sorted(grids)
    if len(steps) > max_rows:
        steps = [steps[i] for i in np.unique(np.linspace(0, len(steps) - 1, max_rows).round().astype(int))]
    rows = [_row(grids[s]) for s in steps]
    height, width = rows[0].shape
    fig, ax = plt.subplots(figsize=(width / 16 * 0.9 + 0.8, height / 16 * 0.9 * len(rows) + 0.6),
                           constrained_layout=True)
    ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks([height * (i + 0.5) for i in range(len(steps))], [f"step {s}" for s in steps], fontsize=8)
    ax.set_xticks([])
    ax.set_title(f"{method}, seed {seed}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shots(shots: dict, path: Path) -> None:
    """The few-shot training images of every seed, one row per seed."""
    plt = _pyplot()
    rows = [_row(images) for images in shots.values()]
    height = rows[0].shape[0]
    fig, ax = plt.subplots(figsize=(rows[0].shape[1] / 16 * 0.9 + 0.8, len(rows) * 0.9 + 0.5),
                           constrained_layout=True)
    ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks([height * (i + 0.5) for i in range(len(rows))], [f"seed {s}" for s in shots], fontsize=8)
    ax.set_xticks([])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _answers(result: dict) -> list:
    """The plain-words answers, built from the verdict numbers."""
    v = result["verdict"]
    lines = []
    if v.get("corruption_stage") is None:
        return [f"- {v.get('note', 'no baseline run')}"]
    base = result["summary"]["baseline"]
    p = base["noise_profile"]
    shapes = list(v["baseline_seed_shapes"].values())
    seeds_text = f"per seed: {', '.join(shapes)}"
    if v["corruption_stage"]:
        lines.append(f"- **The corruption stage appears** in the baseline: the noise measure (high-frequency energy "
                     f"relative to real digits) goes from {p['start']:.2f} at step 0 to a peak of {p['peak']:.2f} "
                     f"at step {p['peak_step']} (fidelity {base['fidelity_at_noise_peak']:.2f} there) and falls back "
                     f"to {p['end']:.2f} by the end ({seeds_text}).")
    elif p["shape"] == "rise":
        final, real = base["final"], result["real"]["mean"]
        lines.append(f"- **No complete corruption stage.** The baseline's noise measure rises from {p['start']:.2f} "
                     f"at step 0 to {p['peak']:.2f} (step {p['peak_step']}, fidelity "
                     f"{base['fidelity_at_noise_peak']:.2f} there) but does not fall back by half within the run (end "
                     f"{p['end']:.2f}; {seeds_text}). At the end the samples lie "
                     f"{final['memorisation']['mean']:.3f} from the nearest shot (real digits of the class: "
                     f"{real['memorisation']:.3f}).")
    else:
        lines.append(f"- **No corruption stage.** The baseline's noise measure stays within {RISE:.1f}x of its "
                     f"start ({p['start']:.2f} -> peak {p['peak']:.2f} at step {p['peak_step']}, end "
                     f"{p['end']:.2f}; {seeds_text}).")
    for name, c in v["methods"].items():
        outcome = {"mitigates": "lowers the peak noise", "worsens": "raises the peak noise",
                   "no clear difference": "makes no clear difference to the peak noise"}[c["outcome"]]
        lines.append(f"- **{name}** {outcome}: {100 * c['peak_noise_change']:+.1f}% vs the baseline, lower in "
                     f"{c['seeds_with_lower_peak']} of {c['seeds']} seed(s); final fidelity "
                     f"{c['final_fidelity_change']:+.3f}, diversity {c['final_diversity_change']:+.3f}, "
                     f"distance to the shots {c['final_memorisation_change']:+.3f} (positive = less copying).")
    bayes = {k: c for k, c in v["methods"].items() if METHODS[k].bayesian}
    if bayes:
        helped = [k for k, c in bayes.items() if c["outcome"] == "mitigates"]
        if helped:
            lines.append(f"- By the rule below, the Bayesian variant(s) {', '.join(helped)} mitigate the noise "
                         f"in this setting.")
        else:
            lines.append("- By the rule below, **no Bayesian variant mitigates** the noise in this setting.")
    return lines


def _unseen_note(result: dict) -> str:
    """How optimistic the real digits' fidelity is: most of them are in the judging classifier's training split."""
    real = result["real"]
    if "fidelity_unseen" not in real["mean"]:
        return ""
    seen = real["count"] - real["unseen_by_classifier"]
    return (f" {seen} of those are in the classifier's training split, so their fidelity "
            f"({real['mean']['fidelity']:.3f}) is optimistic: on the {real['unseen_by_classifier']} it never saw it "
            f"is {real['mean']['fidelity_unseen']:.3f}.")


def _table(result: dict) -> list:
    header = ("| method | final fidelity | peak noise (hf ratio; per-seed peaks) | mean noise | peak TV ratio | "
              "best Fréchet | "
              "final Fréchet | final diversity | final NN distance to shots |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, s in result["summary"].items():
        f = s["final"]
        lines.append(f"| {method} | {_pm(f['fidelity'])} | {s['peak_noise_mean']:.2f} ± {s['peak_noise_std']:.2f} "
                     f"(step {s['noise_profile']['peak_step']}) | {s['mean_noise']:.2f} | {s['peak_tv_ratio']:.2f} | "
                     f"{s['best_frechet']:.1f} | {_pm(f['frechet'], 1)} | {_pm(f['diversity'])} | "
                     f"{_pm(f['memorisation'])} |")
    r = result["real"]["mean"]
    unseen = f" (unseen by the classifier: {r['fidelity_unseen']:.3f})" if "fidelity_unseen" in r else ""
    lines.append(f"| real digits of the class | {r['fidelity']:.3f}{unseen} | {r['hf_ratio']:.2f} | | "
                 f"{r['tv_ratio']:.2f} | {r['frechet']:.1f} ({result['config']['eval_samples']} vs the rest) | | "
                 f"{r['diversity']:.3f} | {r['memorisation']:.3f} |")
    return lines


REPORT_NAME = "report.md"
FIGURES = ("curves.png", "training.png", "shots.png")


def sample_figure(method: str) -> str:
    return f"samples-{method}.png"


def report_files(methods) -> list:
    """The names of the files ``write_report`` writes for a study of ``methods``: figures, then the report."""
    return [*FIGURES, *(sample_figure(m) for m in methods), REPORT_NAME]


def write_report(result: dict, grids: dict, shots: dict, out: Path, mark: str = "") -> list:
    """Write the figures and ``report.md`` (its first line ``mark``, when given) into ``out``; returns the paths
    written, the report's last.

    ``grids``: (method, seed) -> {step: (n, H, W) samples}; ``shots``: seed -> (shots, H, W) training images.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(result, out / "curves.png")
    plot_training(result, out / "training.png")
    plot_shots(shots, out / "shots.png")
    first_seed = result["config"]["seeds"][0]
    sample_figures = []
    for method in result["runs"]:
        name = sample_figure(method)
        plot_samples(grids[(method, first_seed)], method, first_seed, out / name)
        sample_figures.append((method, name))

    c, env, pre, clf = result["config"], result["environment"], result["pretraining"], result["classifier"]
    loaded = [what for what, info in (("pretraining", pre), ("classifier", clf)) if info["cached"]]
    lines = [
        *([mark] if mark else []),
        "# Corruption stage of few-shot fine-tuning, and Bayesian mitigation, on real digits",
        "",
        f"Produced by `{result['command']}` in {result['timing']['total_seconds'] / 60:.1f} min"
        + (f" ({' and '.join(loaded)} loaded from the cache)" if loaded else "")
        + f" on {env['machine']} ({env['torch_threads']} torch thread(s)); every number below is in "
        + " and ".join(f"`{name}`" for name in result["json_files"]) + ".",
        "",
        "## Answers",
        "",
        *_answers(result),
        "",
        f"Rules (bnn_diffusion/study/analysis.py): the noise measure is averaged over seeds and smoothed over 3 "
        f"evaluations; a *rise* is a peak at least {RISE:.1f}x the step-0 value; the *corruption stage* is a rise "
        f"that is not at the last evaluation and loses at least half its excess by the end.  A method *mitigates* "
        f"when its peak noise is lower than the baseline's in every seed and by at least {100 * MITIGATION:.0f}% "
        f"on average, with final fidelity within {FIDELITY_TOLERANCE} of the baseline's.",
        "",
        "## Setup",
        "",
        f"- Data: scikit-learn's 8x8 digits upsampled to {c['image_size']}x{c['image_size']}, in [-1, 1]. "
        f"Digit {c['holdout_class']} is held out of pretraining; each seed fine-tunes on {c['shots']} of its "
        f"images (`shots.png`; drawn from those the classifier below was not trained on) and is compared with the "
        f"other {result['real']['count']} images of the class." + _unseen_note(result),
        f"- Model: diffusers `UNet2DConditionModel` ({pre['parameters']:,} parameters, blocks "
        f"{tuple(c['block_out_channels'])}, cross-attention transformer blocks below full resolution), class "
        f"condition = {c['tokens']} learned token vector(s) of width {c['cross_attention_dim']} through a LayerNorm "
        f"as `encoder_hidden_states`, DDPM {c['beta_schedule']} schedule, {c['prediction_type']}. Pretrained "
        f"{pre['steps']} steps (batch {c['pretrain_batch']}, EMA {c['pretrain_ema']}) on the other nine digits: "
        f"the classifier gives its samples of those digits a mean probability of "
        f"{pre['seen_class_fidelity']:.3f} for the intended class.",
        f"- Fine-tuning (DreamBooth-like): a new token (initialised to the mean of the nine pretrained tokens) and "
        f"the `paper-dreambooth` layer set ({result['trained_layers']} linears: attn1 q/k/v/out and the "
        f"feed-forward of every transformer block), AdamW lr {c['finetune_lr']}, batch {c['finetune_batch']} "
        f"(the shots in turn), {c['finetune_steps']} steps, seeds {c['seeds']}.",
        "- Methods: " + "; ".join(f"**{m}**: {METHODS[m].description}" for m in c["methods"]) + ".",
        f"- Bayesian layers: sigma stored directly, init {c['sigma_init']}, prior N(pretrained, "
        f"{c['prior_sigma']}²), sigma learning rate {c['sigma_lr']}; the targeted weights have RMS "
        f"{result['target_weight_rms']:.4f}, so sigma is {c['sigma_init'] / result['target_weight_rms']:.0%} of it. "
        f"bnn-kl's KL weight: {c['kl_weight']}. CEP-G gamma: {c['cep_gamma']}. Sampling uses the posterior mean.",
        f"- Evaluation every {c['eval_every']} steps: {c['eval_samples']} DDIM samples ({c['sampler_steps']} steps, "
        f"guidance {c['guidance_scale']}) from the same initial noise for every method and step of a seed, judged "
        f"by a CNN trained on real digits of all ten classes (test accuracy {clf['test_accuracy']:.3f}).",
        "",
        "## Table",
        "",
        "Mean ± std over seeds (sample std, ddof 1). Noise = high-frequency energy of the samples / that of real "
        "digits of the class "
        "(1 = as smooth as real digits); peak noise = each seed's peak over steps > 0 after 3-point smoothing, "
        "averaged (the Answers give the peak of the seed-averaged curve; the step is that curve's). NN distance = "
        "RMS pixel distance to the nearest training shot (lower = closer to copying).",
        "",
        *_table(result),
        "",
        "## Figures",
        "",
        "Metric curves (mean ± sample std over seeds; dashed: real digits of the class, for fidelity those the "
        "classifier never saw):",
        "",
        "![curves](curves.png)",
        "",
        "Training curves:",
        "",
        "![training](training.png)",
        "",
        "Training shots per seed:",
        "",
        "![shots](shots.png)",
        "",
        f"Samples over fine-tuning (seed {first_seed}; each column keeps its initial noise):",
        "",
        *[f"![{m}]({name})" for m, name in sample_figures],
        "",
        "## Timing",
        "",
        f"Pretraining: {_trained_or_loaded(pre)}; classifier: {_trained_or_loaded(clf)}; fine-tuning and "
        f"evaluation {result['timing']['finetune_seconds']:.0f} s "
        f"({result['timing']['runs_cached']} of {result['timing']['runs']} run(s) loaded from the cache).",
        "",
    ]
    path = out / REPORT_NAME
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text("\n".join(lines))
    os.replace(temporary, path)
    return [out / name for name in report_files(result["runs"])]


def _trained_or_loaded(info: dict) -> str:
    seconds = f"{info.get('seconds', 0):.0f} s"
    return f"loaded from the cache (trained in {seconds} by an earlier run)" if info["cached"] else f"{seconds}"
