"""The offline corruption-stage study: few-shot fine-tuning of a small class-conditional diffusers UNet on a digit
it never saw, plain vs Bayesian (``bnn_diffusion.patch``) vs CEP, measured step by step.

    python -m bnn_diffusion.study --out study --preset quick

``run_study(config, out)`` runs it from Python; ``main(argv)`` is the command line.  Modules: ``config`` (presets),
``data`` (scikit-learn's digits), ``models`` (UNet, class conditioner, DDIM sampler), ``classifier`` (the judge),
``pretrain`` (pretraining and its cache), ``finetune`` (one method x seed), ``metrics``, ``analysis`` (the rules
that answer the study's questions), ``report`` (figures and report.md), ``run`` (orchestration, command line).
"""
from .config import METHODS, PRESETS, StudyConfig, config_for
from .run import main, run_study

__all__ = ["main", "run_study", "StudyConfig", "PRESETS", "METHODS", "config_for"]
