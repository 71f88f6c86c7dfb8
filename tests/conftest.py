"""Test set-up: Triton runs in its CPU interpreter unless the caller says otherwise (TRITON_INTERPRET=0 on a GPU).

The variable must be set before anything imports triton, hence here, before the package is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from result_log import pytest_configure, pytest_runtest_logreport  # noqa: E402,F401  (BNN_TEST_LOG: hooks by name)

# On a GPU, float32 convolutions would otherwise run on TF32 tensor cores (cuDNN's default; matmuls default to
# float32): the float32 oracle tests compare against float32 arithmetic.
torch.backends.cudnn.allow_tf32 = False
# and cuDNN may pick a non-deterministic backward algorithm (atomics): the tests that compare two runs bit for bit
# (test_autocast) need the same result from the same inputs
torch.backends.cudnn.deterministic = True


@pytest.fixture(autouse=True)
def _fixed_torch_seed():
    torch.manual_seed(0)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend name of an indirect "backend" parameter from helpers.BACKEND_VARIANTS or LORA_BACKENDS.

    "triton:fused" sets BNN_TRITON_REPARAM=fused and BNN_TRITON_LRT=fused for the test (undone afterwards);
    "triton:maps" the variants whose GEMMs are torch's (cuBLAS on a GPU): BNN_TRITON_REPARAM=transient,
    BNN_TRITON_LRT=composition.  "triton:lora-fused" sets BNN_TRITON_LORA=fused.
    """
    name, _, variant = request.param.partition(":")
    if variant.startswith("lora-"):
        monkeypatch.setenv("BNN_TRITON_LORA", variant[len("lora-"):])
    elif variant:
        fused = variant == "fused"
        monkeypatch.setenv("BNN_TRITON_REPARAM", "fused" if fused else "transient")
        monkeypatch.setenv("BNN_TRITON_LRT", "fused" if fused else "composition")
    return name
