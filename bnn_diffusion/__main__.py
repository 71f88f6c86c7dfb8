"""``python -m bnn_diffusion finetune|study ...``: the ``bnn-diffusion`` console script."""
import sys

from .cli import main

sys.exit(main())
