"""bayes_linear: forward and every gradient against the float64 materialising oracle, on every backend."""
import types

import pytest
import torch

import bnn_kernels as bk
from bnn_kernels.reference import bayes_linear_materialised
from helpers import (BACKEND_VARIANTS, BACKENDS, assert_layer_close_to_oracle, assert_lrt_rho_gradient_close,
                     device_for)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims of x, out_features N, in_features K): odd sizes around tile edges, 1s, and extra leading dims
SHAPES = [((1,), 1, 1), ((7,), 33, 127), ((33,), 127, 7), ((127,), 7, 33), ((2, 3, 5), 17, 64), ((64,), 48, 16)]
BIG_SEED = 2**40 + 3


def make_inputs(lead, n, k, dtype, param_dtype, device, sigma_param, with_bias=True, with_prior=True):
    """Random layer inputs in float64 first (so the oracle sees exactly the same values), then cast."""
    x = torch.randn(*lead, k, dtype=torch.float64)
    mu = torch.randn(n, k, dtype=torch.float64) / k**0.5
    rho = (torch.rand(n, k, dtype=torch.float64) * 0.05 + 0.01 if sigma_param == "direct"
           else torch.rand(n, k, dtype=torch.float64) - 4.0)
    bias = torch.randn(n, dtype=torch.float64) * 0.1 if with_bias else None
    prior = mu + 0.01 * torch.randn(n, k, dtype=torch.float64) if with_prior else None
    cast = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (cast(x, dtype), cast(mu, param_dtype), cast(rho, param_dtype), cast(bias, param_dtype),
            cast(prior, param_dtype))


def run_with_grads(fn, x, mu, rho, bias, grad_seed=1):
    """(y, kl, dx, dmu, drho, dbias) for upstream gradients drawn from a fixed generator."""
    x, mu, rho = (t.detach().clone().requires_grad_() for t in (x, mu, rho))
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y, kl = fn(x, mu, rho, bias)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    torch.autograd.backward((y, kl), (grad_y, torch.tensor(0.5, dtype=kl.dtype, device=kl.device)))
    return y.detach(), kl.detach(), x.grad, mu.grad, rho.grad, None if bias is None else bias.grad


def oracle_and_baseline(x, mu, rho, bias, prior, seed, sigma_param, estimator, prior_sigma):
    """The float64 oracle, and plain PyTorch materialising the sample in the inputs' own dtypes."""
    def materialised(prior_mu):
        return lambda x_, mu_, rho_, b_: bayes_linear_materialised(
            x_, mu_, rho_, b_, torch.tensor(seed), prior_mu, prior_sigma, sigma_param, estimator)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = run_with_grads(materialised(f64(prior)), f64(x), f64(mu), f64(rho), f64(bias))
    baseline = run_with_grads(materialised(prior), x, mu, rho, bias)
    return oracle, baseline


def check_against_oracle(backend, x, mu, rho, bias, prior, seed, sigma_param, estimator, prior_sigma=0.1):
    with bk.use_backend(backend):
        result = run_with_grads(
            lambda x_, mu_, rho_, b_: bk.bayes_linear(x_, mu_, rho_, b_, seed=seed, prior_mu=prior,
                                                      prior_sigma=prior_sigma, sigma_param=sigma_param,
                                                      estimator=estimator), x, mu, rho, bias)
    oracle, baseline = oracle_and_baseline(x, mu, rho, bias, prior, seed, sigma_param, estimator, prior_sigma)
    assert_layer_close_to_oracle(f"{backend}/{estimator}/{sigma_param}", result, oracle, baseline, x.dtype, mu.dtype)


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("sigma_param", ["softplus", "direct"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2]))))
def test_float32_matches_oracle(backend, estimator, sigma_param, shape):
    lead, n, k = shape
    inputs = make_inputs(lead, n, k, torch.float32, torch.float32, device_for(backend), sigma_param)
    check_against_oracle(backend, *inputs, BIG_SEED, sigma_param, estimator)


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("shape", [((7,), 33, 127), ((2, 3, 5), 17, 64)], ids=["7x33x127", "2x3x5x17x64"])
def test_low_precision_matches_oracle(backend, estimator, dtype, param_dtype, shape):
    """16-bit activations with float32 parameters (autocast-style mixed precision) or 16-bit parameters."""
    lead, n, k = shape
    params = torch.float32 if param_dtype == "float32" else dtype
    inputs = make_inputs(lead, n, k, dtype, params, device_for(backend), "softplus")
    check_against_oracle(backend, *inputs, 11, "softplus", estimator)


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_without_bias_and_prior(backend, estimator):
    inputs = make_inputs((9,), 20, 24, torch.float32, torch.float32, device_for(backend), "softplus",
                         with_bias=False, with_prior=False)
    check_against_oracle(backend, *inputs, 5, "softplus", estimator, prior_sigma=1.0)


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_same_noise_on_every_backend(backend, estimator):
    """Reproducibility contract: one seed, one output, whichever backend computes it."""
    x, mu, rho, bias, prior = make_inputs((6,), 10, 12, torch.float32, torch.float32, device_for(backend), "softplus")
    with bk.use_backend(backend):
        y, kl = bk.bayes_linear(x, mu, rho, bias, seed=123, prior_mu=prior, estimator=estimator)
    with bk.use_backend("reference"):
        y_ref, kl_ref = bk.bayes_linear(x, mu, rho, bias, seed=123, prior_mu=prior, estimator=estimator)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_determinism_and_seed_sensitivity(backend, estimator):
    x, mu, rho, bias, _ = make_inputs((5,), 8, 16, torch.float32, torch.float32, device_for(backend), "softplus")
    with bk.use_backend(backend):
        first, _ = bk.bayes_linear(x, mu, rho, bias, seed=7, estimator=estimator)
        again, _ = bk.bayes_linear(x, mu, rho, bias, seed=torch.tensor(7), estimator=estimator)
        other, _ = bk.bayes_linear(x, mu, rho, bias, seed=8, estimator=estimator)
        mean = torch.nn.functional.linear(x, mu, bias)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, mean)  # the noise is really there


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
def test_reparam_shares_one_weight_sample_across_the_batch(backend):
    """Feeding the identity recovers the sampled weight, W = mu + sigma * philox_normal(seed, mu.shape)."""
    k = 12
    mu = torch.randn(5, k, device=device_for(backend))
    rho = torch.full((5, k), -2.0, device=mu.device)
    with bk.use_backend(backend):
        y, _ = bk.bayes_linear(torch.eye(k, device=mu.device), mu, rho, seed=99)
    eps = bk.philox_normal(99, (5, k))
    expected = mu.cpu() + torch.nn.functional.softplus(torch.tensor(-2.0)) * eps
    torch.testing.assert_close(y.t().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKEND_VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lrt_gradient_of_a_small_posterior_sigma_in_16_bit(backend, dtype):
    """lrt's backward divides by the output std kept from the forward.  With sigma = 1e-5 and x ~ 1e-2 (a fresh
    posterior, small activations) std is ~1e-6: kept in float16 it would be subnormal, and drho off by ~7%."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=generator, dtype=torch.float64) * 1e-2
    mu = torch.randn(12, 16, generator=generator, dtype=torch.float64) / 4
    rho = torch.full((12, 16), 1e-5, dtype=torch.float64)

    def layer(x_, mu_, rho_):
        return bk.bayes_linear(x_, mu_, rho_, seed=5, prior_sigma=0.1, sigma_param="direct", estimator="lrt")

    assert_lrt_rho_gradient_close(layer, x, mu, rho, backend, dtype)


def test_empty_batch_gives_empty_output_the_kl_and_an_empty_input_gradient():
    x = torch.randn(0, 4, requires_grad=True)
    mu = torch.randn(3, 4, requires_grad=True)
    rho = torch.full((3, 4), -3.0, requires_grad=True)
    y, kl = bk.bayes_linear(x, mu, rho, seed=1)
    assert y.shape == (0, 3)
    torch.testing.assert_close(kl, bk.gaussian_kl(mu, rho))
    (y.sum() + kl).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert mu.grad is not None and rho.grad is not None


def test_zero_in_features_gives_the_bias():
    """nn.Linear(0, n): y is the bias, the KL that of an empty posterior (0)."""
    x = torch.randn(2, 3, 0)
    mu, rho = torch.randn(4, 0), torch.full((4, 0), -3.0)
    bias = torch.randn(4)
    for estimator in ("reparam", "lrt"):
        y, kl = bk.bayes_linear(x, mu, rho, bias, seed=1, estimator=estimator)
        torch.testing.assert_close(y, bias.expand(2, 3, 4))
        assert kl.item() == 0.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("sigma_param", ["softplus", "direct"])
def test_gradcheck_float64(backend, estimator, sigma_param):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    rho = ((torch.rand(3, 6, dtype=torch.float64) * 0.1 + 0.05) if sigma_param == "direct"
           else torch.rand(3, 6, dtype=torch.float64) - 2.0).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(3, 6, dtype=torch.float64)

    def layer(x_, mu_, rho_, b_):
        return bk.bayes_linear(x_, mu_, rho_, b_, seed=3, prior_mu=prior, prior_sigma=0.5,
                               sigma_param=sigma_param, estimator=estimator)

    with bk.use_backend(backend):
        assert torch.autograd.gradcheck(layer, (x, mu, rho, bias))


# --- the triton backend's variants: BNN_TRITON_REPARAM, BNN_TRITON_LRT, and the GPU's tensor cores ---------------

needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton needs a GPU or TRITON_INTERPRET=1")


@needs_triton
def test_triton_entry_points_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, so every backend function makes its first tensor's device
    current (here with a stand-in for torch.cuda.device: no GPU); CPU tensors (the interpreter) need no guard."""
    import bnn_kernels.triton as backend
    from bnn_kernels.triton.common import on_operands_device
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # what the guard reads of a tensor
    probe = on_operands_device(lambda first, *rest, **named: (first, rest, named))
    assert probe(on_gpu1, 2, key=3) == (on_gpu1, (2,), {"key": 3}) and entered == [torch.device("cuda", 1)]
    on_gpu0 = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert probe(on_gpu0)[0] is on_gpu0 and len(entered) == 1  # already the current device: no switch
    assert probe(torch.zeros(1), 2)[1] == (2,) and len(entered) == 1  # a CPU tensor: no CUDA call at all
    for name in ("gaussian_kl_fwd", "gaussian_kl_bwd", "linear_fwd", "linear_bwd", "conv_fwd", "conv_bwd",
                 "lora_linear_fwd", "lora_linear_bwd", "lora_conv2d_fwd", "lora_conv2d_bwd"):
        assert getattr(backend, name).__wrapped__.__name__ == name, f"{name} is not device-guarded"


@needs_triton
def test_triton_reparam_variant_follows_the_env_var(monkeypatch):
    from bnn_kernels.triton import linear
    above = linear.TRANSIENT_ABOVE_M + 1
    monkeypatch.delenv("BNN_TRITON_REPARAM", raising=False)  # default: auto
    assert (linear.reparam_variant(above - 1), linear.reparam_variant(above)) == ("fused", "transient")
    monkeypatch.setenv("BNN_TRITON_REPARAM", "fused")
    assert linear.reparam_variant(10**6) == "fused"
    monkeypatch.setenv("BNN_TRITON_REPARAM", "transient")
    assert linear.reparam_variant(1) == "transient"
    monkeypatch.setenv("BNN_TRITON_REPARAM", "ingemm")
    with pytest.raises(ValueError, match="BNN_TRITON_REPARAM"):
        linear.reparam_variant(1)


@needs_triton
@pytest.mark.parametrize("setting, rows, expected", [("auto", "few", "fused"), ("auto", "many", "transient"),
                                                     ("fused", "many", "fused"), ("transient", "few", "transient")])
def test_triton_runs_the_reparam_variant_it_selects(monkeypatch, setting, rows, expected):
    """Forward and backward take the transient path exactly when the variant is "transient", and match the oracle."""
    from bnn_kernels.triton import linear
    calls = []
    for name in ("transient_linear_fwd", "transient_linear_bwd"):
        real = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    monkeypatch.setenv("BNN_TRITON_REPARAM", setting)
    m = linear.TRANSIENT_ABOVE_M + 1 if rows == "many" else 8
    # bfloat16 x: auto fuses it on every tensor-core GPU (float32 only with tf32) and in the interpreter
    inputs = make_inputs((m,), 6, 16, torch.bfloat16, torch.float32, device_for("triton"), "softplus")
    check_against_oracle("triton", *inputs, 21, "softplus", "reparam")
    assert calls == (["transient_linear_fwd", "transient_linear_bwd"] if expected == "transient" else [])


@needs_triton
def test_triton_lrt_variant_follows_the_env_var_and_the_gpu(monkeypatch):
    from bnn_kernels.triton import common, linear
    monkeypatch.delenv("BNN_TRITON_LRT", raising=False)  # default: auto
    assert common.compute_capability(torch.device("cpu")) is None and linear.lrt_variant() == "fused"
    for arch, expected in ((75, "composition"), (80, "fused"), (90, "fused")):
        monkeypatch.setattr(common, "_capture_arch", arch)  # as inside aot.capture(arch=...)
        assert linear.lrt_variant() == expected, arch
    monkeypatch.setattr(common, "_capture_arch", 75)
    monkeypatch.setenv("BNN_TRITON_LRT", "fused")  # a forced variant holds on any GPU
    assert linear.lrt_variant() == "fused"
    monkeypatch.setattr(common, "_capture_arch", 90)
    monkeypatch.setenv("BNN_TRITON_LRT", "composition")
    assert linear.lrt_variant() == "composition"
    monkeypatch.setenv("BNN_TRITON_LRT", "cublas")
    with pytest.raises(ValueError, match="BNN_TRITON_LRT must be one of 'fused', 'composition', 'auto'"):
        linear.lrt_variant()


@needs_triton
def test_triton_reparam_auto_takes_cublas_where_dots_have_no_tensor_cores(monkeypatch):
    """Below sm_80 Triton lowers tl.dot to FMA loops: auto runs the transient variant even for a few rows."""
    from bnn_kernels.triton import common, linear
    monkeypatch.delenv("BNN_TRITON_REPARAM", raising=False)
    monkeypatch.setattr(common, "_capture_arch", 75)
    assert linear.reparam_variant(8) == "transient"
    monkeypatch.setattr(common, "_capture_arch", 86)
    assert linear.reparam_variant(8) == "fused"
    monkeypatch.setenv("BNN_TRITON_REPARAM", "fused")
    monkeypatch.setattr(common, "_capture_arch", 75)
    assert linear.reparam_variant(8) == "fused"


@needs_triton
def test_triton_auto_takes_cublas_for_float32_without_tf32(monkeypatch):
    """With torch's default allow_tf32=False a float32 tl.dot is an FMA loop even on sm_90: auto runs the cuBLAS
    variants for float32 x there (16-bit x keeps the fused kernels); the interpreter keeps the fused ones."""
    from bnn_kernels.triton import common, linear
    monkeypatch.delenv("BNN_TRITON_REPARAM", raising=False)
    monkeypatch.delenv("BNN_TRITON_LRT", raising=False)
    monkeypatch.setattr(common, "dot_precision", lambda: "ieee")  # torch.backends.cuda.matmul.allow_tf32 False
    assert (linear.reparam_variant(8, None, torch.float32), linear.lrt_variant(None, torch.float32)) == \
        ("fused", "fused")
    monkeypatch.setattr(common, "_capture_arch", 90)
    assert (linear.reparam_variant(8, None, torch.float32), linear.lrt_variant(None, torch.float32)) == \
        ("transient", "composition")
    for dtype in (torch.bfloat16, torch.float16):
        assert (linear.reparam_variant(8, None, dtype), linear.lrt_variant(None, dtype)) == ("fused", "fused")
    monkeypatch.setattr(common, "dot_precision", lambda: "tf32")
    assert (linear.reparam_variant(8, None, torch.float32), linear.lrt_variant(None, torch.float32)) == \
        ("fused", "fused")


@needs_triton
@pytest.mark.parametrize("setting, arch, expected", [("auto", None, "fused"), ("auto", 75, "composition"),
                                                     ("composition", None, "composition"), ("fused", 75, "fused")])
def test_triton_runs_the_lrt_variant_it_selects(monkeypatch, setting, arch, expected):
    """Forward and backward take composition.py's path exactly when the variant is "composition", and match the
    oracle either way."""
    from bnn_kernels.triton import common, linear
    calls = []
    for name in ("lrt_fwd", "lrt_bwd"):
        real = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    monkeypatch.setenv("BNN_TRITON_LRT", setting)
    monkeypatch.setattr(common, "_capture_arch", arch)
    inputs = make_inputs((9,), 6, 16, torch.bfloat16, torch.float32, device_for("triton"), "softplus")  # as above
    check_against_oracle("triton", *inputs, 21, "softplus", "lrt")
    assert calls == (["lrt_fwd", "lrt_bwd"] if expected == "composition" else [])
