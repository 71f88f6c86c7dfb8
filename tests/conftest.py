"""Test set-up: Triton runs in its CPU interpreter unless the caller says otherwise (TRITON_INTERPRET=0 on a GPU).

The variable must be set before anything imports triton, hence here, before the package is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_torch_seed():
    torch.manual_seed(0)
