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


def _bayes_linear_and_lora(x, mu, rho, seed, prior_sigma, scale):
    y, kl = bk.bayes_linear(x, mu, rho, seed=seed, prior_sigma=prior_sigma, estimator="lrt")
    base, lora_a, lora_b = torch.ones(3, 16), torch.full((2, 16), 0.2), torch.full((3, 2), 0.1)
    z, kl_lora = bk.bayes_lora_linear(y, base, None, lora_a, lora_b, torch.full_like(lora_a, -4.0), scale=scale,
                                      bayes="A", seed=seed, prior_sigma=prior_sigma)
    return z, kl + kl_lora


def test_dynamic_shapes_compile_with_symbolic_floats():
    """torch.compile(dynamic=True) passes prior_sigma and the LoRA scale as symbolic floats: the checks take them."""
    torch._dynamo.reset()
    compiled = torch.compile(_bayes_linear_and_lora, backend="aot_eager", fullgraph=True, dynamic=True)
    mu = (torch.randn(16, 8) * 0.3).requires_grad_()
    rho = torch.full((16, 8), -4.0, requires_grad=True)
    with bk.use_backend("reference"):
        for batch, prior_sigma, scale in ((5, 0.5, 1.0), (9, 0.7, 2.0), (3, 1.3, 0.5)):
            x, seed = torch.randn(batch, 8), torch.tensor(batch)
            z, kl = compiled(x, mu, rho, seed, prior_sigma, scale)
            z_eager, kl_eager = _bayes_linear_and_lora(x, mu, rho, seed, prior_sigma, scale)
            torch.testing.assert_close(z, z_eager)
            torch.testing.assert_close(kl, kl_eager)
            (z.sum() + kl).backward()
    assert torch.isfinite(rho.grad).all()


def test_a_compiled_function_follows_a_later_use_backend(monkeypatch):
    """The backend choice is baked into a compiled graph, guarded on the forced backend: use_backend recompiles."""
    ran = []
    for name in ("cpu", "reference"):
        module = bk.registry.get(name)
        monkeypatch.setattr(module, "linear_fwd",
                            lambda *args, _run=module.linear_fwd, _name=name: ran.append(_name) or _run(*args))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, mu, rho: bk.bayes_linear(x, mu, rho, seed=1), backend="aot_eager",
                             fullgraph=True)
    x, mu, rho = torch.randn(5, 7), torch.randn(3, 7), torch.full((3, 7), -3.0)
    compiled(x, mu, rho)
    with bk.use_backend("reference"):
        compiled(x, mu, rho)
    compiled(x, mu, rho)
    assert ran == ["cpu", "reference", "cpu"]
