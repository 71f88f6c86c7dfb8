"""The functional ops are not autocast ops: inside ``torch.autocast`` every backend computes in the dtypes it is
given, exactly as outside, in eager and compiled code (the Bayesian layers cast x themselves, as nn.Linear would)."""
import pytest
import torch
import torch._dynamo

import bnn_kernels as bk
from helpers import BACKEND_VARIANTS, device_for


def _linear(estimator):
    def op(x, mu, rho, seed):
        return bk.bayes_linear(x, mu, rho, seed=seed, estimator=estimator)
    return op, (5, 7), (3, 7)


def _conv(estimator):
    def op(x, mu, rho, seed):
        return bk.bayes_conv2d(x, mu, rho, padding=1, seed=seed, estimator=estimator)
    return op, (2, 3, 5, 5), (4, 3, 3, 3)


def _lora_linear(estimator):
    """Bayesian A (rho has lora_a's shape); the frozen base and lora_b are fixed."""
    weight, lora_b = torch.randn(6, 7), torch.randn(6, 2) * 0.1

    def op(x, lora_a, rho, seed):
        return bk.bayes_lora_linear(x, weight.to(x.device), None, lora_a, lora_b.to(x.device), rho, scale=2.0,
                                    bayes="A", seed=seed, estimator=estimator)
    return op, (5, 7), (2, 7)


def _lora_conv(estimator):
    weight, lora_b = torch.randn(4, 3, 3, 3), torch.randn(4, 2, 1, 1) * 0.1

    def op(x, lora_a, rho, seed):
        return bk.bayes_lora_conv2d(x, weight.to(x.device), None, lora_a, lora_b.to(x.device), rho, scale=2.0,
                                    padding=1, bayes="A", seed=seed, estimator=estimator)
    return op, (2, 3, 5, 5), (2, 3, 3, 3)


OPS = {
    "linear-reparam": lambda: _linear("reparam"),
    "linear-lrt": lambda: _linear("lrt"),
    "conv-reparam": lambda: _conv("reparam"),
    "conv-lrt": lambda: _conv("lrt"),
    "lora-linear-lrt": lambda: _lora_linear("lrt"),
    "lora-linear-reparam": lambda: _lora_linear("reparam"),
    "lora-conv-lrt": lambda: _lora_conv("lrt"),
}


def _run(op, x, mu, rho, seed):
    """(y, kl, dx, dmu, drho) of one call, the loss y.sum() + kl."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, mu, rho)]
    y, kl = op(*leaves, seed)
    (y.float().sum() + kl).backward()
    return [y.detach(), kl.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("name", list(OPS))
def test_autocast_does_not_change_what_an_op_computes(backend, name):
    op, x_shape, mu_shape = OPS[name]()
    device = device_for(backend)
    x, mu = torch.randn(x_shape, device=device), torch.randn(mu_shape, device=device) * 0.3
    rho = torch.full(mu_shape, -3.0, device=device)
    seed = torch.tensor(7, device=device)
    with bk.use_backend(backend):
        plain = _run(op, x, mu, rho, seed)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            under_autocast = _run(op, x, mu, rho, seed)
    for value, expected in zip(under_autocast, plain):
        assert value.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear-lrt", "conv-reparam", "lora-linear-lrt"])
def test_compiled_op_under_autocast_matches_eager(name):
    op, x_shape, mu_shape = OPS[name]()
    x, mu, rho = torch.randn(x_shape), torch.randn(mu_shape) * 0.3, torch.full(mu_shape, -3.0)
    seed = torch.tensor(7)
    torch._dynamo.reset()
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    with bk.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _run(op, x, mu, rho, seed)
        traced = _run(compiled, x, mu, rho, seed)
    for value, expected in zip(traced, eager):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
