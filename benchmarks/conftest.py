"""Benchmarks run the Triton backend interpreted on CPU-only machines (set before triton is imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def timed(benchmark):
    """``timed(fn)`` times fn with pytest-benchmark; on a GPU each call is synchronised (3 warm-up, 20 rounds)."""
    def run(fn):
        if torch.cuda.is_available():
            def synced():
                fn()
                torch.cuda.synchronize()
            benchmark.pedantic(synced, warmup_rounds=3, rounds=20, iterations=1)
        else:
            benchmark(fn)
    return run
