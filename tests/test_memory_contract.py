"""Memory contract: the autograd graph of an op keeps its inputs and a seed, never a weight-sized new tensor."""
import pytest
import torch

import bnn_kernels as bk
from bnn_kernels.reference import bayes_linear_materialised
from helpers import BACKEND_VARIANTS, BACKENDS, device_for


class SavedTensors:
    """Records every tensor autograd saves while the block runs (torch.autograd.graph.saved_tensors_hooks)."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        self.saved.append(tensor)
        return tensor

    def new_tensors(self, *inputs):
        """Saved tensors that are not (views of the storage of) one of ``inputs``."""
        storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
        return [t for t in self.saved if t.untyped_storage().data_ptr() not in storages]


def _layer_inputs(device):
    # M * N < N * K, so an output-sized tensor (allowed: lrt keeps the output std) is told apart from a weight-sized one
    x = torch.randn(4, 64, device=device, requires_grad=True)
    mu = torch.randn(48, 64, device=device, requires_grad=True)
    rho = torch.full((48, 64), -3.0, device=device, requires_grad=True)
    bias = torch.zeros(48, device=device, requires_grad=True)
    prior = torch.randn(48, 64, device=device)
    return x, mu, rho, bias, prior


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_bayes_linear_saves_no_weight_sized_tensor(backend, estimator):
    x, mu, rho, bias, prior = _layer_inputs(device_for(backend))
    with bk.use_backend(backend), SavedTensors() as record:
        y, kl = bk.bayes_linear(x, mu, rho, bias, seed=5, prior_mu=prior, estimator=estimator)
    new = record.new_tensors(x, mu, rho, bias, prior)
    assert all(t.numel() < mu.numel() for t in new), [tuple(t.shape) for t in new]
    assert sum(t.numel() for t in new) <= 1 + (y.numel() if estimator == "lrt" else 0)  # the seed (+ lrt's std)
    (y.sum() + kl).backward()  # and backward still works from what was kept
    assert mu.grad is not None and rho.grad is not None


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_bayes_linear_reads_strided_parameters_without_a_kept_copy(backend, estimator):
    """Transposed mu / rho / prior_mu (a tied or transposed weight): the results of their contiguous copies, and
    autograd keeps the parameters themselves, not weight-sized copies of them."""
    inputs = _layer_inputs(device_for(backend))
    results = []
    for strided in (False, True):
        x, mu, rho, bias, prior = (t.detach().clone() for t in inputs)
        if strided:
            mu, rho, prior = (t.t().contiguous().t() for t in (mu, rho, prior))
            assert not mu.is_contiguous()
        x, mu, rho, bias = (t.requires_grad_() for t in (x, mu, rho, bias))
        with bk.use_backend(backend), SavedTensors() as record:
            y, kl = bk.bayes_linear(x, mu, rho, bias, seed=5, prior_mu=prior, estimator=estimator)
        assert all(t.numel() < mu.numel() for t in record.new_tensors(x, mu, rho, bias, prior))
        (y.square().sum() + kl).backward()
        results.append((y, kl, x.grad, mu.grad, rho.grad))
    for contiguous, strided in zip(*results):
        torch.testing.assert_close(strided, contiguous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_kl_saves_only_its_inputs(backend):
    _, mu, rho, _, prior = _layer_inputs(device_for(backend))
    with bk.use_backend(backend), SavedTensors() as record:
        bk.gaussian_kl(mu, rho, prior, 0.1)
    assert record.new_tensors(mu, rho, prior) == []


def test_the_check_catches_a_materialising_layer():
    """The same check flags the paper-style layer, which keeps eps and the weight sample for backward."""
    x, mu, rho, bias, prior = _layer_inputs("cpu")
    with SavedTensors() as record:
        bayes_linear_materialised(x, mu, rho, bias, torch.tensor(5), prior, 0.1, "softplus", "reparam")
    assert any(t.numel() >= mu.numel() for t in record.new_tensors(x, mu, rho, bias, prior))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("relaid_tensors", ["all", "mu", "rho", "prior"])
def test_gaussian_kl_reads_a_strided_posterior_without_a_kept_copy(backend, layout, relaid_tensors):
    """A channels_last conv weight or a transposed linear one (all three tensors, or one laid out unlike the
    others): the KL and gradients of its contiguous copy, and autograd keeps the parameters themselves."""
    device = device_for(backend)
    shape = (6, 4, 3, 3) if layout == "channels_last" else (8, 5)
    contiguous = [torch.randn(shape, device=device) * 0.3, torch.randn(shape, device=device) - 3.0,
                  torch.randn(shape, device=device) * 0.3]

    def relaid(tensor):
        if layout == "channels_last":
            return tensor.to(memory_format=torch.channels_last)
        return tensor.t().contiguous().t()

    results = []
    chosen = [relaid_tensors in ("all", name) for name in ("mu", "rho", "prior")]
    for tensors in (contiguous, [relaid(t) if c else t for t, c in zip(contiguous, chosen)]):
        mu, rho, prior = (t.clone().requires_grad_(i < 2) for i, t in enumerate(tensors))
        with bk.use_backend(backend), SavedTensors() as record:
            kl = bk.gaussian_kl(mu, rho, prior, 0.5)
        assert record.new_tensors(mu, rho, prior) == []
        kl.backward()
        results.append((kl, mu.grad, rho.grad))
    assert [not t.is_contiguous() for t in (mu, rho, prior)] == chosen  # the second pass ran on the relaid ones
    for strided, plain in zip(results[1], results[0]):
        torch.testing.assert_close(strided, plain)
