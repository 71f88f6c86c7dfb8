"""The study from end to end, and its command line:

    bnn-diffusion study --out DIR --preset quick|full [--seeds 0 1 2] [--methods baseline bnn ...]

Pretrain (or load from ``<out>/cache``) the diffusion model and the classifier, fine-tune every method on every
seed (each finished run is cached under ``<out>/cache/runs``, so an interrupted study resumes where it stopped),
then write ``<out>/report.md`` with its figures and the JSON of every number (``<out>/study-<preset>.json``, and
a copy wherever ``--json`` says).  A rerun of the same study (the same settings, whatever the thread count) into
the same ``--out`` rewrites them; one with other settings is refused unless ``--overwrite`` is given, so that
an earlier report is never replaced by accident.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .analysis import aggregate, summarize_method, verdict
from .classifier import unseen_by_classifier
from .config import CLASSIFIER_VERSION, METHODS, PRESETS, PRETRAIN_VERSION, StudyConfig, config_for
from .data import few_shot_indices, load_digits_images
from .finetune import RunResult, finetune_run
from .metrics import Reference
from .models import NUM_CLASSES, make_noise_scheduler, sample_images
from .pretrain import pretrained_classifier, pretrained_diffusion
from .report import REPORT_NAME, report_files, write_report

__all__ = ["run_study", "main", "build_parser"]

# settings that do not change what a single (method, seed) run computes
_NOT_RUN_FIELDS = {"preset", "methods", "seeds", "threads"}
# settings that do not change the study's numbers (up to float rounding)
_NOT_STUDY_FIELDS = {"threads"}
REPORT_MARK = "<!-- bnn-diffusion study {key} -->"
# part of a cached run's key: raised whenever a run computes something else for the same settings, so that runs
# cached by an earlier version are not mixed in (2: shots unseen by the classifier, drawn in turn; loss without KL)
RUN_VERSION = 2


def _progress_factory(enabled: bool):
    from tqdm.auto import tqdm

    def make(total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0)

    return make


def _environment(config: StudyConfig) -> dict:
    import diffusers
    import sklearn

    import bnn_kernels as bk

    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    return {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} logical cores ({platform.system()})",
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "numpy": np.__version__, "scikit_learn": sklearn.__version__, "torch_threads": torch.get_num_threads(),
        "bnn_kernels_backends": bk.backends(), "commit": commit,
    }


def _seen_class_fidelity(config: StudyConfig, pretrained, classifier) -> float:
    """Mean probability the classifier gives to the intended class for samples of the nine pretrained classes."""
    labels = torch.tensor([c for c in range(NUM_CLASSES) if c != config.holdout_class])
    per_class = max(2, config.eval_samples // 8)
    labels = labels.repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, config.image_size, config.image_size,
                        generator=torch.Generator().manual_seed(config.pretrain_seed))
    conditioner = pretrained.conditioner
    with torch.no_grad():
        null = conditioner(torch.tensor([conditioner.null_label]))
        samples = sample_images(pretrained.unet, conditioner(labels), null, noise,
                                noise_scheduler=make_noise_scheduler(config), steps=config.sampler_steps,
                                guidance_scale=config.guidance_scale)
    probs, _ = classifier.predict(samples)
    return probs[torch.arange(len(labels)), labels].mean().item()


def _target_weight_rms(pretrained) -> tuple:
    """(number of linears of the paper-dreambooth set, RMS of their pretrained weights)."""
    import copy

    import bnn_diffusion as bd

    unet = copy.deepcopy(pretrained.unet)
    names = bd.patch(unet, "paper-dreambooth")
    weights = torch.cat([unet.get_submodule(n).prior_mu.flatten() for n in names])
    return len(names), weights.square().mean().sqrt().item()


def study_key(config: StudyConfig) -> str:
    """A short hash of every setting that changes the study's numbers: what tells one study from another."""
    return config.key(tuple(f.name for f in dataclasses.fields(StudyConfig) if f.name not in _NOT_STUDY_FIELDS))


def _earlier_study(out: Path, config: StudyConfig) -> tuple:
    """``(files, conflict)``: the files earlier studies wrote into ``out`` (each study's ``study-<preset>.json``
    and the report and figures it lists; not ``--json`` copies), and a description of those that are another study
    than ``config`` (None when every one is the same study, or there is none).  Files that no study's JSON lists
    are never counted: a study only ever removes what a study wrote."""
    key = study_key(config)
    conflicts, files = [], []
    for path in sorted(out.glob("study-*.json")):
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not a study's (a study writes its JSON whole): left alone
        if not (isinstance(earlier, dict) and isinstance(earlier.get("config"), dict)):
            continue
        recorded = earlier["config"]
        listed = earlier.get("files") or report_files(recorded.get("methods", ()))  # before "files" was kept
        files += [out / name for name in listed if Path(name).name == name]
        if path.name == f"study-{recorded.get('preset')}.json":  # the study's own JSON, not a --json copy
            files.append(path)
        try:
            same = study_key(StudyConfig(**_as_config_fields(recorded))) == key
        except (TypeError, ValueError):  # settings an earlier version allowed
            same = False
        if not same:
            conflicts.append(f"{path.name}, written by `{earlier.get('command', '?')}`")
    report = out / REPORT_NAME
    if report.exists():
        first = report.read_text(errors="replace").splitlines()[:1]
        if not first or first[0] != REPORT_MARK.format(key=key):
            if not first or not first[0].startswith(REPORT_MARK.split("{")[0]):
                conflicts.append(f"{REPORT_NAME} (without the mark of this command's reports: written by hand or "
                                 f"by an older version)")
            elif not conflicts:
                conflicts.append(f"{REPORT_NAME}, the report of a study with other settings")
    return [f for f in files if f.exists()], ("; ".join(conflicts) or None)


def _as_config_fields(recorded: dict) -> dict:
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in names}


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file and rename it into place: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _run_paths(cache: Path, config: StudyConfig, method: str, seed: int) -> tuple:
    fields = tuple(f.name for f in dataclasses.fields(StudyConfig) if f.name not in _NOT_RUN_FIELDS)
    # a run fine-tunes the pretrained model and is judged by the classifier: their code versions are in its key
    versions = f"v{RUN_VERSION}-p{PRETRAIN_VERSION}-c{CLASSIFIER_VERSION}"
    stem = cache / "runs" / f"{config.key(fields)}-{versions}" / f"{method}-seed{seed}"
    return stem.with_suffix(".json"), stem.with_suffix(".npz")


def _load_run(paths: tuple):
    record_path, grid_path = paths
    if not (record_path.exists() and grid_path.exists()):
        return None
    record = json.loads(record_path.read_text())
    with np.load(grid_path) as data:
        grids = {int(k.removeprefix("step")): data[k] for k in data.files}
    return RunResult(record, grids)


def _save_run(paths: tuple, result: RunResult) -> None:
    record_path, grid_path = paths
    record_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = grid_path.with_name(grid_path.stem + f".tmp{os.getpid()}.npz")
    np.savez_compressed(temporary, **{f"step{k}": v for k, v in result.grids.items()})
    os.replace(temporary, grid_path)
    temporary = record_path.with_name(record_path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(result.record))
    os.replace(temporary, record_path)


def run_study(config: StudyConfig, out, *, progress: bool = True, command: str = "", json_copy=None,
              overwrite: bool = False) -> dict:
    """Run the study described by ``config`` into the directory ``out``; returns the result dictionary (also
    written to ``<out>/study-<preset>.json``, and to ``json_copy`` when given) with the report path under
    ``"report"``.

    ``out`` may hold the report of the same study (rewritten) or none; FileExistsError, before anything runs, when
    it holds another study's report or JSON, unless ``overwrite``.  Either way the earlier study's JSON and
    figures are removed once the new results are written, so none of them is left stale beside the new report."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file, not a directory")
    earlier_files, conflict = _earlier_study(out, config) if out.is_dir() else ([], None)
    if conflict and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} holds another study: {conflict}. Choose another --out, or pass "
                              f"--overwrite to replace it (the cache under {str(out / 'cache')!r} is kept)")
    if config.threads:
        torch.set_num_threads(config.threads)
    cache = out / "cache"
    bar = _progress_factory(progress)
    begin = time.perf_counter()

    digits = load_digits_images(config.image_size)
    classifier, classifier_info = pretrained_classifier(config, digits, cache, bar)
    pretrained = pretrained_diffusion(config, digits.without_class(config.holdout_class), cache, bar)
    pretrain_info = dict(pretrained.info, seen_class_fidelity=_seen_class_fidelity(config, pretrained, classifier))
    trained_layers, weight_rms = _target_weight_rms(pretrained)
    pretrain_seconds = time.perf_counter() - begin

    real_all = digits.of_class(config.holdout_class)
    # the shots are drawn from the class's images the classifier was not trained on
    in_class = (digits.labels == config.holdout_class).numpy()
    shot_pool = np.flatnonzero(unseen_by_classifier(len(digits.labels), config.pretrain_seed)[in_class])
    runs = {m: {"description": METHODS[m].description, "seeds": {}} for m in config.methods}
    grids, shots, real_values = {}, {}, {}
    cached_runs = 0
    finetune_begin = time.perf_counter()
    total = len(config.seeds) * len(config.methods) * config.finetune_steps
    with bar(total, "fine-tune") as progress_bar:
        for seed in config.seeds:
            index = shot_pool[few_shot_indices(len(shot_pool), config.shots, seed)]
            rest = np.ones(len(real_all), dtype=bool)
            rest[index] = False
            reference = Reference.build(classifier, config.holdout_class, real_all[torch.from_numpy(rest)],
                                        real_all[torch.from_numpy(index)])
            unseen = real_all[torch.from_numpy(np.setdiff1d(shot_pool, index))]
            real_values[str(seed)] = reference.real_values(classifier, config.eval_samples, seed, unseen=unseen)
            shots[seed] = reference.shots[:, 0].numpy()
            for method in config.methods:
                progress_bar.set_description(f"fine-tune {method} seed {seed}")
                paths = _run_paths(cache, config, method, seed)
                result = _load_run(paths)
                if result is None:
                    result = finetune_run(config, method, seed, pretrained, classifier, reference,
                                          progress=progress_bar)
                    _save_run(paths, result)
                else:
                    cached_runs += 1
                    progress_bar.update(config.finetune_steps)
                result.record["shot_indices"] = index.tolist()
                runs[method]["seeds"][str(seed)] = result.record
                grids[(method, seed)] = result.grids

    for method, run in runs.items():
        run["aggregate"] = aggregate(run["seeds"])
    summaries = {method: summarize_method(run["seeds"]) for method, run in runs.items()}
    real_mean = {name: float(np.mean([v[name] for v in real_values.values()])) for name in next(
        iter(real_values.values()))}
    json_name = f"study-{config.preset}.json"
    result = {
        "runs": runs,
        "summary": summaries,
        "verdict": verdict(summaries),
        "real": {"per_seed": real_values, "mean": real_mean, "count": int(len(real_all) - config.shots),
                 "unseen_by_classifier": int(len(shot_pool) - config.shots)},
        "pretraining": pretrain_info,
        "classifier": classifier_info,
        "trained_layers": trained_layers,
        "target_weight_rms": weight_rms,
        "config": config.to_dict(),
        "environment": _environment(config),
        "command": command or "bnn_diffusion.study.run_study",
        "json_files": [str(out / json_name)] + ([str(json_copy)] if json_copy is not None else []),
        "report": str(out / REPORT_NAME),
        "files": report_files(config.methods),  # what this study writes into out, besides this JSON
        "timing": {"pretrain_seconds": pretrain_seconds, "finetune_seconds": time.perf_counter() - finetune_begin,
                   "total_seconds": time.perf_counter() - begin, "runs": len(config.seeds) * len(config.methods),
                   "runs_cached": cached_runs},
    }
    # the numbers first: a crash while drawing the figures leaves the JSON of this study, never a report without it
    text = json.dumps(result, indent=1)
    _write_text_atomic(out / json_name, text)
    if json_copy is not None:
        _write_text_atomic(Path(json_copy), text)
    written = write_report(result, grids, shots, out, mark=REPORT_MARK.format(key=study_key(config)))
    keep = {*written, out / json_name, *([Path(json_copy)] if json_copy is not None else [])}
    keep = {path.resolve() for path in keep}
    for stale in earlier_files:
        if stale.resolve() not in keep:
            stale.unlink(missing_ok=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnn-diffusion study",
        description="Offline study of the corruption stage of few-shot diffusion fine-tuning and its mitigation by "
                    "Bayesian fine-tuning (bnn_diffusion.patch) and CEP, on scikit-learn's digits.")
    parser.add_argument("--out", default="bnn-study", help="output directory (report, figures, JSON, cache)")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="quick: minutes on a CPU (make demo); full: more seeds and steps; smoke: seconds")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (each draws its own shots)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="methods to compare")
    parser.add_argument("--steps", type=int, dest="finetune_steps", help="fine-tuning steps")
    parser.add_argument("--shots", type=int, help="training images of the held-out class")
    parser.add_argument("--holdout", type=int, dest="holdout_class", help="the held-out digit (0-9)")
    parser.add_argument("--lr", type=float, dest="finetune_lr", help="fine-tuning learning rate")
    parser.add_argument("--sigma-init", type=float, dest="sigma_init", help="initial sigma of the Bayesian layers")
    parser.add_argument("--prior-sigma", type=float, dest="prior_sigma", help="prior sigma of the Bayesian layers")
    parser.add_argument("--kl-weight", type=float, dest="kl_weight", help="bnn-kl's weight on KL(q||p)")
    parser.add_argument("--cep-gamma", type=float, dest="cep_gamma", help="CEP-G's gamma")
    parser.add_argument("--eval-every", type=int, dest="eval_every", help="evaluate every this many steps")
    parser.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the result JSON here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report of a study with other settings in --out (refused without it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    """Entry point of ``python -m bnn_diffusion.study`` and ``bnn-diffusion study``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in {"out", "preset", "json", "no_progress", "overwrite"}}
    for key in ("seeds", "methods"):
        if overrides.get(key) is not None:
            overrides[key] = tuple(overrides[key])
    try:
        config = config_for(args.preset, **overrides)
    except ValueError as error:
        parser.error(str(error))
    shown = sys.argv[1:] if argv is None else list(argv)
    command = f"{parser.prog} " + " ".join(shlex.quote(a) for a in shown)
    try:
        result = run_study(config, args.out, progress=not args.no_progress, command=command.strip(),
                           json_copy=args.json, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"report: {result['report']}")
    print(f"data:   {Path(args.out) / f'study-{config.preset}.json'}" + (f" and {args.json}" if args.json else ""))
    return 0
