"""bayes_conv2d: forward and every gradient against the float64 materialising oracle on every backend, gradcheck, the
memory contract, reproducibility, input layouts, argument errors and torch.compile."""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import bnn_kernels as bk
from bnn_kernels.reference import bayes_conv2d_materialised
from helpers import (BACKENDS, assert_compiled_matches_eager, assert_layer_close_to_oracle,
                     assert_lrt_rho_gradient_close, device_for)
from test_linear import run_with_grads
from test_memory_contract import SavedTensors

BIG_SEED = 2**40 + 3


class Conv(NamedTuple):
    batch: int
    c_in: int
    c_out: int
    size: tuple
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1

    def geometry(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


# the conv configurations of a diffusers UNet, at small channel counts, odd spatial sizes, batch 1 and 3
CONFIGS = {
    "3x3-s1-p1": Conv(3, 8, 12, (9, 9), (3, 3), 1, 1),
    "3x3-s2-p1-downsample": Conv(1, 8, 8, (9, 7), (3, 3), 2, 1),
    "1x1-shortcut": Conv(3, 12, 16, (7, 7), (1, 1)),
    "3x3-groups4": Conv(1, 8, 12, (7, 9), (3, 3), 1, 1, 1, 4),
    "3x3-dilation2": Conv(3, 4, 6, (9, 9), (3, 3), 1, 2, 2),
    "3x1-pairs-groups2": Conv(1, 6, 4, (8, 9), (3, 1), (2, 1), (1, 0), (1, 2), 2),
}
# the cpu backend works one block of output channels at a time (64..256 channels, ~2**18 weight elements, see
# csrc/conv_ops.cpp); these layers span several blocks
BLOCK_CONFIGS = {
    "blocks-64-64-8": Conv(1, 480, 136, (5, 5), (3, 3), 1, 1),
    "blocks-inside-groups": Conv(1, 960, 272, (5, 4), (3, 3), 1, 1, 1, 2),
    "blocks-of-3-groups": Conv(2, 1920, 80, (4, 5), (3, 3), 1, 1, 1, 4),
}
FLOAT64_BACKENDS = [b for b in BACKENDS if b in ("cpu", "reference")]


def make_inputs(conv, dtype, param_dtype, device, sigma_param, with_bias=True, with_prior=True):
    """Random layer inputs in float64 first (so the oracle sees exactly the same values), then cast."""
    x = torch.randn(conv.batch, conv.c_in, *conv.size, dtype=torch.float64)
    weight_shape = (conv.c_out, conv.c_in // conv.groups, *conv.kernel)
    fan_in = weight_shape[1] * weight_shape[2] * weight_shape[3]
    mu = torch.randn(weight_shape, dtype=torch.float64) / fan_in**0.5
    rho = (torch.rand(weight_shape, dtype=torch.float64) * 0.05 + 0.01 if sigma_param == "direct"
           else torch.rand(weight_shape, dtype=torch.float64) - 4.0)
    bias = torch.randn(conv.c_out, dtype=torch.float64) * 0.1 if with_bias else None
    prior = mu + 0.01 * torch.randn(weight_shape, dtype=torch.float64) if with_prior else None
    cast = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (cast(x, dtype), cast(mu, param_dtype), cast(rho, param_dtype), cast(bias, param_dtype),
            cast(prior, param_dtype))


def check_against_oracle(backend, conv, x, mu, rho, bias, prior, seed, sigma_param, estimator, prior_sigma=0.1):
    """y, kl and every gradient of the backend against the float64 oracle, within 2x plain torch's error."""
    def fused(x_, mu_, rho_, b_):
        return bk.bayes_conv2d(x_, mu_, rho_, b_, seed=seed, prior_mu=prior, prior_sigma=prior_sigma,
                               sigma_param=sigma_param, estimator=estimator, **conv.geometry())

    def materialised(prior_mu):
        return lambda x_, mu_, rho_, b_: bayes_conv2d_materialised(
            x_, mu_, rho_, b_, torch.tensor(seed), prior_mu, prior_sigma, sigma_param, estimator, **conv.geometry())

    with bk.use_backend(backend):
        result = run_with_grads(fused, x, mu, rho, bias)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = run_with_grads(materialised(f64(prior)), f64(x), f64(mu), f64(rho), f64(bias))
    baseline = run_with_grads(materialised(prior), x, mu, rho, bias)
    assert result[0].is_contiguous()
    assert_layer_close_to_oracle(f"{backend}/{estimator}/{sigma_param}", result, oracle, baseline, x.dtype, mu.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("sigma_param", ["softplus", "direct"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_float32_matches_oracle(backend, estimator, sigma_param, config):
    conv = CONFIGS[config]
    inputs = make_inputs(conv, torch.float32, torch.float32, device_for(backend), sigma_param)
    check_against_oracle(backend, conv, *inputs, BIG_SEED, sigma_param, estimator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("config", ["3x3-s1-p1", "3x3-groups4"])
def test_low_precision_matches_oracle(backend, estimator, dtype, param_dtype, config):
    """16-bit activations with float32 parameters (autocast-style mixed precision) or 16-bit parameters."""
    conv = CONFIGS[config]
    params = torch.float32 if param_dtype == "float32" else dtype
    inputs = make_inputs(conv, dtype, params, device_for(backend), "softplus")
    check_against_oracle(backend, conv, *inputs, 11, "softplus", estimator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lrt_gradient_of_a_small_posterior_sigma_in_16_bit(backend, dtype):
    """As for the linear op: the output std kept for backward must not round to a float16 subnormal."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64) * 1e-2
    mu = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64) / 6
    rho = torch.full((6, 4, 3, 3), 1e-5, dtype=torch.float64)

    def layer(x_, mu_, rho_):
        return bk.bayes_conv2d(x_, mu_, rho_, padding=1, seed=5, prior_sigma=0.1, sigma_param="direct",
                               estimator="lrt")

    assert_lrt_rho_gradient_close(layer, x, mu, rho, backend, dtype)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("config", list(BLOCK_CONFIGS))
def test_cpu_channel_blocks_match_oracle(estimator, config):
    conv = BLOCK_CONFIGS[config]
    inputs = make_inputs(conv, torch.float32, torch.float32, torch.device("cpu"), "softplus")
    check_against_oracle("cpu", conv, *inputs, 17, "softplus", estimator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_without_bias_and_prior(backend, estimator):
    conv = CONFIGS["3x3-s2-p1-downsample"]
    inputs = make_inputs(conv, torch.float32, torch.float32, device_for(backend), "softplus", with_bias=False,
                         with_prior=False)
    check_against_oracle(backend, conv, *inputs, 5, "softplus", estimator, prior_sigma=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_weight_grads_without_input_grad(backend, estimator):
    """x that needs no gradient (a first layer): dx is skipped, dmu / drho unchanged."""
    conv = CONFIGS["3x3-groups4"]
    x, mu, rho, bias, prior = make_inputs(conv, torch.float32, torch.float32, device_for(backend), "softplus")
    grads = []
    for x_requires_grad in (True, False):
        mu_, rho_ = mu.clone().requires_grad_(), rho.clone().requires_grad_()
        with bk.use_backend(backend):
            y, kl = bk.bayes_conv2d(x.clone().requires_grad_(x_requires_grad), mu_, rho_, bias, seed=4,
                                    prior_mu=prior, estimator=estimator, **conv.geometry())
        (y.square().sum() + kl).backward()
        grads.append((mu_.grad, rho_.grad))
    for with_dx, without_dx in zip(*grads):
        torch.testing.assert_close(without_dx, with_dx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_noise_is_the_contract_stream_on_every_backend(backend, estimator):
    """Reproducibility contract: reparam uses W = mu + sigma * philox_normal(seed, mu.shape) (flat (co, ci, kh, kw)
    index), lrt adds sqrt(conv(x^2, sigma^2)) * philox_normal(seed, y.shape) (flat NCHW index), on every backend."""
    conv = CONFIGS["3x1-pairs-groups2"]
    x, mu, rho, bias, prior = make_inputs(conv, torch.float32, torch.float32, device_for(backend), "softplus")
    with bk.use_backend(backend):
        y, kl = bk.bayes_conv2d(x, mu, rho, bias, seed=123, prior_mu=prior, prior_sigma=0.1, estimator=estimator,
                                **conv.geometry())
    x, mu, rho, bias, prior, y, kl = (t.cpu() for t in (x, mu, rho, bias, prior, y, kl))
    sigma = F.softplus(rho)
    args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if estimator == "reparam":
        expected = F.conv2d(x, mu + sigma * bk.philox_normal(123, mu.shape), bias, **args)
    else:
        std = F.conv2d(x * x, sigma * sigma, None, **args).sqrt()
        expected = F.conv2d(x, mu, bias, **args) + std * bk.philox_normal(123, std.shape)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, bk.gaussian_kl(mu, rho, prior, 0.1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_determinism_and_seed_sensitivity(backend, estimator):
    conv = CONFIGS["3x3-s1-p1"]
    x, mu, rho, bias, _ = make_inputs(conv, torch.float32, torch.float32, device_for(backend), "softplus")
    with bk.use_backend(backend):
        first, _ = bk.bayes_conv2d(x, mu, rho, bias, seed=7, estimator=estimator, padding=1)
        again, _ = bk.bayes_conv2d(x, mu, rho, bias, seed=torch.tensor(7), estimator=estimator, padding=1)
        other, _ = bk.bayes_conv2d(x, mu, rho, bias, seed=8, estimator=estimator, padding=1)
    mean = F.conv2d(x, mu, bias, padding=1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, mean)  # the noise is really there


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_channels_last_input(backend, estimator):
    """A channels_last x gives the same output and gradients as its NCHW copy; y is contiguous NCHW."""
    conv = CONFIGS["3x3-s2-p1-downsample"]
    x, mu, rho, bias, _ = make_inputs(conv, torch.float32, torch.float32, device_for(backend), "softplus")
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x_ = x.clone().contiguous(memory_format=layout).requires_grad_()
        with bk.use_backend(backend):
            y, kl = bk.bayes_conv2d(x_, mu, rho, bias, seed=3, estimator=estimator, **conv.geometry())
        y.square().sum().backward()
        assert y.is_contiguous()
        results.append((y, x_.grad))
    assert results[1][1].shape == x.shape
    for nchw, channels_last in zip(*results):
        torch.testing.assert_close(channels_last, nchw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_channels_last_parameters(backend, estimator):
    """channels_last mu / rho / prior_mu (what model.to(memory_format=torch.channels_last) makes of them): the same
    results, contiguous gradients, and no weight-sized copy kept for backward."""
    device = device_for(backend)
    x = torch.randn(1, 16, 4, 4, device=device)
    mu, prior = torch.randn(2, 32, 16, 3, 3, device=device) * 0.1
    rho = torch.rand(32, 16, 3, 3, device=device) - 4.0
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x_ = x.clone().requires_grad_()
        mu_, rho_ = (t.clone(memory_format=layout).requires_grad_() for t in (mu, rho))
        prior_ = prior.clone(memory_format=layout)
        assert mu_.is_contiguous() == (layout == torch.contiguous_format)
        with bk.use_backend(backend), SavedTensors() as record:
            y, kl = bk.bayes_conv2d(x_, mu_, rho_, stride=2, padding=1, seed=6, prior_mu=prior_, estimator=estimator)
        kept = sum(t.numel() for t in record.new_tensors(x_, mu_, rho_, prior_))
        assert kept <= 1 + (y.numel() if estimator == "lrt" else 0)  # the seed (+ lrt's std)
        (y.square().sum() + kl).backward()
        results.append((y, kl, x_.grad, mu_.grad, rho_.grad))
    for contiguous, channels_last in zip(*results):
        torch.testing.assert_close(channels_last, contiguous)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("sigma_param", ["softplus", "direct"])
def test_gradcheck_float64(backend, estimator, sigma_param):
    conv = Conv(1, 4, 4, (5, 5), (3, 3), 2, 1, 1, 2)
    x, mu, rho, bias, prior = make_inputs(conv, torch.float64, torch.float64, torch.device("cpu"), sigma_param)
    rho = rho + (0.05 if sigma_param == "direct" else 2.0)  # away from the clamp; larger sigma for lrt's sqrt

    def layer(x_, mu_, rho_, b_):
        return bk.bayes_conv2d(x_, mu_, rho_, b_, seed=3, prior_mu=prior, prior_sigma=0.5, sigma_param=sigma_param,
                               estimator=estimator, **conv.geometry())

    inputs = tuple(t.requires_grad_() for t in (x, mu, rho, bias))
    with bk.use_backend(backend):  # fast mode: random projections of the Jacobian instead of all of it
        assert torch.autograd.gradcheck(layer, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
def test_saves_no_weight_sized_tensor(backend, estimator):
    """Memory contract: autograd keeps the inputs, the seed and (lrt) the output-sized std; no eps, no W."""
    device = device_for(backend)
    x = torch.randn(1, 16, 4, 4, device=device, requires_grad=True)  # output 1x32x2x2: smaller than the weight
    mu = torch.randn(32, 16, 3, 3, device=device, requires_grad=True)
    rho = torch.full((32, 16, 3, 3), -3.0, device=device, requires_grad=True)
    bias = torch.zeros(32, device=device, requires_grad=True)
    prior = torch.randn(32, 16, 3, 3, device=device)
    with bk.use_backend(backend), SavedTensors() as record:
        y, kl = bk.bayes_conv2d(x, mu, rho, bias, stride=2, padding=1, seed=5, prior_mu=prior, estimator=estimator)
    new = record.new_tensors(x, mu, rho, bias, prior)
    assert all(t.numel() < mu.numel() for t in new), [tuple(t.shape) for t in new]
    assert sum(t.numel() for t in new) <= 1 + (y.numel() if estimator == "lrt" else 0)  # the seed (+ lrt's std)
    (y.sum() + kl).backward()
    assert mu.grad is not None and rho.grad is not None and x.grad is not None


def test_the_memory_check_catches_a_materialising_conv():
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    mu = torch.randn(32, 16, 3, 3, requires_grad=True)
    rho = torch.full((32, 16, 3, 3), -3.0, requires_grad=True)
    with SavedTensors() as record:
        bayes_conv2d_materialised(x, mu, rho, None, torch.tensor(5), stride=2, padding=1)
    assert any(t.numel() >= mu.numel() for t in record.new_tensors(x, mu, rho))


# --- shapes and argument forms --------------------------------------------------------------------------------------

def test_unbatched_input_matches_a_batch_of_one():
    x, mu, rho = torch.randn(4, 6, 6), torch.randn(5, 4, 3, 3), torch.full((5, 4, 3, 3), -3.0)
    y, kl = bk.bayes_conv2d(x, mu, rho, seed=2, padding=1)
    y_batched, kl_batched = bk.bayes_conv2d(x[None], mu, rho, seed=2, padding=1)
    assert y.shape == (5, 6, 6)
    torch.testing.assert_close(y, y_batched[0])
    torch.testing.assert_close(kl, kl_batched)


@pytest.mark.parametrize("padding, explicit, dilation", [("same", 1, 1), ("same", 2, 2), ("valid", 0, 1)])
def test_padding_strings(padding, explicit, dilation):
    x, mu, rho = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3), torch.full((6, 4, 3, 3), -3.0)
    y, _ = bk.bayes_conv2d(x, mu, rho, padding=padding, dilation=dilation, seed=9)
    y_explicit, _ = bk.bayes_conv2d(x, mu, rho, padding=(explicit, explicit), dilation=(dilation, dilation), seed=9)
    torch.testing.assert_close(y, y_explicit)
    if padding == "same":
        assert y.shape == x.shape[:1] + (6,) + x.shape[2:]


def test_empty_batch_gives_empty_output_the_kl_and_an_empty_input_gradient():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    mu = torch.randn(3, 4, 3, 3, requires_grad=True)
    rho = torch.full((3, 4, 3, 3), -3.0, requires_grad=True)
    y, kl = bk.bayes_conv2d(x, mu, rho, seed=1, padding=1)
    assert y.shape == (0, 3, 5, 5)
    torch.testing.assert_close(kl, bk.gaussian_kl(mu, rho))
    (y.sum() + kl).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert mu.grad is not None and rho.grad is not None


def _good():
    return dict(x=torch.randn(2, 4, 6, 6), mu=torch.randn(6, 2, 3, 3), rho=torch.full((6, 2, 3, 3), -3.0),
                bias=torch.zeros(6), groups=2)


def _call(**overrides):
    args = _good()
    kwargs = dict(seed=1, groups=args.pop("groups"))
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return bk.bayes_conv2d(args["x"], args["mu"], args["rho"], args["bias"], **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(x=torch.randn(2, 3, 6, 6)), ValueError, r"x must have shape \(N, 4, H, W\)"),
    (dict(x=torch.randn(4, 6)), ValueError, "x must have shape"),
    (dict(x=torch.randn(2, 4, 6, 6).to(torch.int32)), ValueError, "x must have dtype"),
    (dict(mu=torch.randn(6, 18), rho=torch.randn(6, 18)), ValueError, "mu must be 4-D"),
    (dict(mu=torch.randn(0, 2, 3, 3), rho=torch.randn(0, 2, 3, 3)), ValueError, "non-zero sizes"),
    (dict(mu=torch.randn(5, 2, 3, 3), rho=torch.randn(5, 2, 3, 3), bias=torch.zeros(5)), ValueError,
     "divisible by groups"),
    (dict(rho=torch.full((6, 2, 1, 1), -3.0)), ValueError, "rho must have mu's shape"),
    (dict(rho=torch.full((6, 2, 3, 3), -3.0, dtype=torch.float16)), ValueError, "rho must have mu's dtype"),
    (dict(prior_mu=torch.randn(6, 2, 1, 1)), ValueError, "prior_mu must have mu's shape"),
    (dict(bias=torch.zeros(4)), ValueError, "bias must have shape"),
    (dict(mu=[[1.0]]), TypeError, "mu must be a torch.Tensor"),
    (dict(stride=0), ValueError, "stride must be at least 1"),
    (dict(stride=(1, 2, 1)), TypeError, "stride must be an int or a pair"),
    (dict(stride=1.5), TypeError, "stride must be an int or a pair"),
    (dict(padding=-1), ValueError, "padding must be at least 0"),
    (dict(padding=(1, True)), TypeError, "padding must be an int or a pair"),
    (dict(padding="full"), ValueError, "padding must be one of"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(padding="same", mu=torch.randn(6, 2, 2, 2), rho=torch.randn(6, 2, 2, 2)), ValueError,
     "padding='same' is supported when"),
    (dict(dilation=0), ValueError, "dilation must be at least 1"),
    (dict(groups=0), ValueError, "groups must be at least 1"),
    (dict(groups=2.0), TypeError, "groups must be an int"),
    (dict(x=torch.randn(2, 4, 2, 2)), ValueError, "too small for kernel"),
    (dict(x=torch.randn(2, 4, 0, 6), padding=1), ValueError, "x has no pixels"),  # padding: an output of 2 x 6
    (dict(prior_sigma=0.0), ValueError, "prior_sigma"),
    (dict(prior_sigma=1e-20), ValueError, r"prior_sigma must be in \[1e-18, 1e\+18\]"),
    (dict(prior_sigma="big"), TypeError, "prior_sigma"),
    (dict(sigma_param="exp"), ValueError, "sigma_param must be one of"),
    (dict(estimator="flipout"), ValueError, "estimator must be one of"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=2**63), ValueError, "seed must be in"),
    (dict(seed=torch.tensor([1, 2])), TypeError, "seed must be an int or a 0-dim int64 tensor"),
    (dict(x=torch.randn(2, 4, 6, 6, device="meta")), ValueError, "x is on meta"),
])
def test_bad_arguments(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides)


def test_seed_is_required():
    good = _good()
    with pytest.raises(TypeError):
        bk.bayes_conv2d(good["x"], good["mu"], good["rho"], groups=2)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not usable here")
def test_float64_only_on_backends_that_take_it():
    device = device_for("triton")
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device)
    mu = torch.randn(3, 2, 1, 1, dtype=torch.float64, device=device)
    with bk.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        bk.bayes_conv2d(x, mu, torch.zeros_like(mu), seed=1)


# --- torch.compile --------------------------------------------------------------------------------------------------

class TinyBayesConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mu1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.rho1 = torch.nn.Parameter(torch.full((8, 3, 3, 3), -4.0))
        self.bias1 = torch.nn.Parameter(torch.zeros(8))
        self.mu2 = torch.nn.Parameter(torch.randn(4, 4, 1, 1) * 0.2)
        self.rho2 = torch.nn.Parameter(torch.full((4, 4, 1, 1), -4.0))

    def forward(self, x, seed):
        h, kl1 = bk.bayes_conv2d(x, self.mu1, self.rho1, self.bias1, stride=2, padding=1, seed=seed)
        y, kl2 = bk.bayes_conv2d(torch.relu(h), self.mu2, self.rho2, groups=2, seed=seed + 1, estimator="lrt")
        return y, kl1 + kl2


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_compiled_model_matches_eager_and_does_not_recompile(backend):
    """fullgraph tracing through both custom ops and their fake impls (aot_eager traces the backward too)."""
    model = TinyBayesConvNet()
    assert_compiled_matches_eager(model, torch.randn(2, 3, 9, 9), backend, compile_backend="aot_eager")
    assert model.rho1.grad is not None and torch.isfinite(model.rho1.grad).all()
