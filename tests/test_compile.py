"""torch.compile(fullgraph=True) traces through the custom ops; a new seed tensor does not recompile."""
import pytest
import torch
import torch._dynamo

import bnn_kernels as bk
from helpers import BACKENDS, assert_compiled_matches_eager


class TinyBayesMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mu1 = torch.nn.Parameter(torch.randn(16, 8) * 0.3)
        self.rho1 = torch.nn.Parameter(torch.full((16, 8), -4.0))
        self.mu2 = torch.nn.Parameter(torch.randn(4, 16) * 0.3)
        self.rho2 = torch.nn.Parameter(torch.full((4, 16), -4.0))

    def forward(self, x, seed):
        h, kl1 = bk.bayes_linear(x, self.mu1, self.rho1, seed=seed)
        y, kl2 = bk.bayes_linear(torch.relu(h), self.mu2, self.rho2, seed=seed + 1, estimator="lrt")
        return y, kl1 + kl2


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
def test_compiled_model_matches_eager_and_does_not_recompile(backend):
    assert_compiled_matches_eager(TinyBayesMLP(), torch.randn(5, 8), backend)


def test_inductor_compiles_forward_and_backward():
    torch._dynamo.reset()
    model = TinyBayesMLP()
    x = torch.randn(5, 8)
    compiled = torch.compile(model, fullgraph=True)
    y, kl = compiled(x, torch.tensor(3))
    y_eager, kl_eager = model(x, torch.tensor(3))
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    (y.sum() + kl).backward()
    assert model.rho1.grad is not None and torch.isfinite(model.rho1.grad).all()
