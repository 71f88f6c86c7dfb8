"""The ``bnn-diffusion`` console script: ``bnn-diffusion finetune ...`` and ``bnn-diffusion study ...``.

Each subcommand hands the rest of the command line to its module's ``main(argv)``, imported only when chosen:
``finetune`` -> ``bnn_diffusion.train.main``, ``study`` -> ``bnn_diffusion.study.main``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from . import __version__

COMMANDS = {
    "finetune": ("bnn_diffusion.train", "DreamBooth-style few-shot fine-tuning of a Stable Diffusion checkpoint "
                                        "(Bayesian layers, LoRA, DiffFit, CEP)"),
    "study": ("bnn_diffusion.study", "the offline corruption-stage study (baseline / BNN / CEP on small data)"),
}


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="bnn-diffusion", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="bnn-diffusion {finetune,study} [options]   (bnn-diffusion <command> --help for its options)",
        description="Bayesian few-shot fine-tuning of diffusion models.", epilog=f"commands:\n{listing}")
    parser.add_argument("--version", action="version", version=f"bnn-diffusion {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv[:1])  # --help / --version exit here; anything else is a usage error
        parser.error("the first argument must be a command")
    command = parser.parse_args(argv[:1]).command
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"bnn-diffusion {command} is not available: cannot import {module_name} ({error})") from None
    entry = getattr(module, "main", None)
    if entry is None:
        raise SystemExit(f"bnn-diffusion {command} is not available: {module_name} has no main()")
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
