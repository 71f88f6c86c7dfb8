"""Every documented bad input raises a ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import bnn_kernels as bk
from helpers import BACKENDS, device_for


def _good():
    return dict(x=torch.randn(3, 4), mu=torch.randn(5, 4), rho=torch.full((5, 4), -3.0), bias=torch.zeros(5))


def _call(**overrides):
    args = _good()
    kwargs = dict(seed=1)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return bk.bayes_linear(args["x"], args["mu"], args["rho"], args["bias"], **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(x=torch.randn(3, 5)), ValueError, "x must have shape"),
    (dict(rho=torch.full((5, 3), -3.0)), ValueError, "rho must have mu's shape"),
    (dict(rho=torch.full((5, 4), -3.0, dtype=torch.float16)), ValueError, "rho must have mu's dtype"),
    (dict(mu=torch.randn(5, 4, 1), rho=torch.randn(5, 4, 1)), ValueError, "mu must be 2-D"),
    (dict(bias=torch.zeros(4)), ValueError, "bias must have shape"),
    (dict(x=torch.randn(3, 4).to(torch.int32)), ValueError, "x must have dtype"),
    (dict(mu=[[1.0]]), TypeError, "mu must be a torch.Tensor"),
    (dict(prior_mu=torch.randn(4, 5)), ValueError, "prior_mu must have mu's shape"),
    (dict(prior_sigma=0.0), ValueError, "prior_sigma"),
    (dict(prior_sigma=-1.0), ValueError, "prior_sigma"),
    (dict(prior_sigma=1e-20), ValueError, "prior_sigma must be in"),  # 1 / (2 ps^2) overflows float32
    (dict(prior_sigma="big"), TypeError, "prior_sigma"),
    (dict(sigma_param="exp"), ValueError, "sigma_param must be one of"),
    (dict(estimator="flipout"), ValueError, "estimator must be one of"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(seed=-2**63 - 1), ValueError, "seed must be in"),
    (dict(seed=2**63), ValueError, "seed must be in"),
    (dict(seed=torch.tensor([1, 2])), TypeError, "seed must be an int or a 0-dim int64 tensor"),
    (dict(seed=torch.tensor(1.0)), TypeError, "seed must be an int or a 0-dim int64 tensor"),
])
def test_bad_bayes_linear_arguments(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides)


def test_seed_is_required():
    good = _good()
    with pytest.raises(TypeError):
        bk.bayes_linear(good["x"], good["mu"], good["rho"])


def test_device_mix_is_rejected():
    good = _good()
    x_meta = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match="x is on meta"):
        bk.bayes_linear(x_meta, good["mu"], good["rho"], seed=1)


def test_unknown_or_unusable_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        with bk.use_backend("tpu"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not usable"):
            with bk.use_backend("cuda"):
                pass


def test_float64_only_on_backends_that_take_it():
    if "triton" not in bk.backends():
        pytest.skip("triton backend not usable here")
    device = device_for("triton")  # CPU tensors under the interpreter, the GPU's otherwise
    x, mu, rho = (torch.randn(*shape, dtype=torch.float64, device=device) for shape in ((2, 3), (4, 3), (4, 3)))
    with bk.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        bk.bayes_linear(x, mu, rho, seed=1)
    with bk.use_backend("triton"), pytest.raises(ValueError, match="float64"):  # an empty batch as well
        bk.bayes_linear(x[:0], mu, rho, seed=1)


@pytest.mark.parametrize("call, error, words", [
    (lambda: bk.gaussian_kl(torch.randn(3), torch.randn(4)), ValueError, "rho must have mu's shape"),
    (lambda: bk.gaussian_kl(torch.randn(3), torch.randn(3), prior_sigma=0), ValueError, "prior_sigma"),
    (lambda: bk.gaussian_kl(torch.randn(3), torch.randn(3), prior_sigma=2e18), ValueError, "prior_sigma must be in"),
    (lambda: bk.gaussian_kl(torch.randn(3), torch.randn(3), sigma_param="log"), ValueError, "sigma_param"),
    (lambda: bk.philox_normal(1.0, (3,)), TypeError, "seed must be an int"),
    (lambda: bk.philox_normal(1, (3,), offset=-1), ValueError, "offset"),
    (lambda: bk.philox_normal(1, (-3,)), ValueError, "shape"),
    (lambda: bk.philox_normal(1, (2.5, 3)), TypeError, "shape must be an int or a sequence of ints"),
    (lambda: bk.philox_normal(1, (3,), dtype=torch.int32), ValueError, "dtype"),
])
def test_bad_arguments_of_other_ops(call, error, words):
    with pytest.raises(error, match=words):
        call()


def _cpu_ops():
    pytest.importorskip("bnn_kernels._C")
    return torch.ops.bnn_cpu


def _lora_conv_bwd(stride):
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    lora_a, lora_b, rho = torch.randn(2, 2, 3, 3), torch.randn(3, 2, 1, 1), torch.full((3, 2, 1, 1), -3.0)
    h = torch.randn(1, 2, 3, 3)
    return _cpu_ops().lora_conv2d_bwd(torch.randn(1, 3, 3, 3), torch.tensor(1.0), x, weight, lora_a, lora_b, rho,
                                      torch.tensor(1), h, torch.empty(0), stride, [0, 0], [1, 1], 1.0, "B", 0.1,
                                      "softplus", "reparam", True)


@pytest.mark.parametrize("call, words", [
    (lambda: _lora_conv_bwd([0, 0]), "stride values must be at least 1"),
    (lambda: _cpu_ops().gaussian_kl_fwd(torch.randn(3), torch.randn(3), None, 0.0, "softplus"), "prior_sigma"),
    (lambda: _cpu_ops().gaussian_kl_fwd(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 3), 0.1, "softplus"),
     "prior_mu must have mu's shape"),
    (lambda: _cpu_ops().philox_normal(torch.tensor(1), 8, 2**63 - 4), "offset \\+ numel must be below 2\\*\\*63"),
])
def test_the_cpu_operators_check_their_arguments_when_called_directly(call, words):
    """torch.ops.bnn_cpu.* are public: a bad argument that bypasses bnn_kernels' checks is an error, never a
    crash (a stride of 0 used to divide by zero in lora_conv2d_bwd) or a silent NaN."""
    with pytest.raises((RuntimeError, ValueError), match=words):  # TORCH_CHECK / TORCH_CHECK_VALUE
        call()


def test_debug_checks_catch_non_finite_values():
    good = _good()
    rho = good["rho"].clone()
    rho[0, 0] = float("nan")
    bk.bayes_linear(good["x"], good["mu"], rho, seed=1)  # off by default: no sync, no check
    bk.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match="rho contains NaN or inf"):
            bk.bayes_linear(good["x"], good["mu"], rho, seed=1)
    finally:
        bk.set_debug_checks(False)


# --------------------------------------------------------------------------------------------------------------
# a NaN parameter is never hidden
# --------------------------------------------------------------------------------------------------------------


def _nan_rho(shape):
    rho = torch.full(shape, 0.02)
    rho.view(-1)[1] = float("nan")
    return rho


NAN_CALLS = {
    "linear": lambda d, **kw: bk.bayes_linear(torch.randn(3, 4, device=d), torch.randn(5, 4, device=d),
                                              _nan_rho((5, 4)).to(d), seed=1, **kw),
    "conv": lambda d, **kw: bk.bayes_conv2d(torch.randn(1, 2, 5, 5, device=d), torch.randn(3, 2, 3, 3, device=d),
                                            _nan_rho((3, 2, 3, 3)).to(d), padding=1, seed=1, **kw),
    "lora": lambda d, **kw: bk.bayes_lora_linear(torch.randn(3, 4, device=d), torch.randn(5, 4, device=d), None,
                                                 torch.randn(2, 4, device=d), torch.randn(5, 2, device=d),
                                                 _nan_rho((5, 2)).to(d), scale=1.0, bayes="B", seed=1, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(NAN_CALLS))
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("sigma_param", ["direct", "softplus"])
def test_a_nan_in_rho_reaches_the_output_and_the_kl(backend, op, estimator, sigma_param):
    """sigma of a NaN rho is NaN on every backend (the "direct" clamp at 1e-7 keeps it, as torch.clamp_min does),
    so a diverged posterior shows in the loss instead of training on at sigma = 1e-7."""
    with bk.use_backend(backend):
        y, kl = NAN_CALLS[op](device_for(backend), estimator=estimator, sigma_param=sigma_param, prior_sigma=0.1)
    assert torch.isnan(y).any(), "the NaN sigma must reach the output"
    assert torch.isnan(kl), "the NaN sigma must reach the KL"
