"""Benchmarks run the Triton backend interpreted on CPU-only machines (set before triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
