"""bayes_lora_linear / bayes_lora_conv2d: forward and every gradient against the float64 materialising oracle on
every backend, gradcheck, the memory contract, reproducibility, the frozen base, argument errors, torch.compile."""
import os

import pytest
import torch

import bnn_kernels as bk
from bnn_kernels.reference import bayes_lora_conv2d_materialised, bayes_lora_linear_materialised
from helpers import BACKENDS, LORA_BACKENDS, assert_close_to_oracle, assert_compiled_matches_eager, device_for
from test_memory_contract import SavedTensors

ESTIMATORS = ["reparam", "lrt"]
FACTORS = ["A", "B"]
# (leading dims of x, out_features N, in_features K, rank r, sigma_param, scale): odd sizes around tile edges, every
# rank of the contract (1, 4, 16, 64: below, at and above the padded rank 16; 80: above the triton backend's fused
# kernels, FUSED_MAX_RANK = 64, where it runs the composition), sigma_param alternating
LINEAR_CASES = [
    ((1,), 7, 33, 1, "softplus", 2.0),
    ((7,), 33, 7, 4, "direct", 0.5),
    ((33,), 7, 33, 16, "softplus", 1.0),
    ((2, 3), 33, 24, 64, "direct", 0.25),
    ((5,), 19, 40, 80, "softplus", 0.5),
]
LARGE_RANK = 80
# the conv configurations of a diffusers UNet: 3x3 s1 p1 (resnet), 3x3 s2 p1 (downsample), 1x1 (shortcut)
CONV_CASES = [
    dict(kernel=3, stride=1, padding=1, rank=4, sigma_param="softplus"),
    dict(kernel=3, stride=2, padding=1, rank=1, sigma_param="direct"),
    dict(kernel=1, stride=1, padding=0, rank=16, sigma_param="softplus"),
]
# (x dtype, base weight dtype, factor dtype): mixed-precision LoRA training and a 16-bit frozen base under float32 x
MIXED_PRECISION = [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
]
SEED = 2**40 + 17


def _rho(shape, sigma_param):
    if sigma_param == "direct":
        return torch.rand(shape, dtype=torch.float64) * 0.1 + 0.02
    return torch.rand(shape, dtype=torch.float64) - 3.0


def make_lora(x_shape, weight_shape, a_shape, b_shape, bayes, sigma_param, dtypes, device, with_bias=True):
    """(x, weight, bias, lora_a, lora_b, rho), drawn in float64 (so the oracle sees the same values) and cast to
    ``dtypes`` = (x dtype, base dtype, factor dtype)."""
    x_dtype, base_dtype, factor_dtype = dtypes
    fan_in = torch.Size(weight_shape[1:]).numel()
    x = torch.randn(x_shape, dtype=torch.float64)
    weight = torch.randn(weight_shape, dtype=torch.float64) / fan_in**0.5
    bias = torch.randn(weight_shape[0], dtype=torch.float64) * 0.1 if with_bias else None
    lora_a = torch.randn(a_shape, dtype=torch.float64) / fan_in**0.5
    lora_b = torch.randn(b_shape, dtype=torch.float64) / a_shape[0]**0.5
    rho = _rho(a_shape if bayes == "A" else b_shape, sigma_param)
    cast = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (cast(x, x_dtype), cast(weight, base_dtype), cast(bias, base_dtype), cast(lora_a, factor_dtype),
            cast(lora_b, factor_dtype), cast(rho, factor_dtype))


def linear_inputs(lead, n, k, r, bayes, sigma_param, dtypes=(torch.float32,) * 3, device="cpu", with_bias=True):
    return make_lora((*lead, k), (n, k), (r, k), (n, r), bayes, sigma_param, dtypes, device, with_bias)


def conv_inputs(case, bayes, dtypes=(torch.float32,) * 3, device="cpu", batch=2, channels=(5, 6), size=7):
    c_in, c_out = channels
    k, r = case["kernel"], case["rank"]
    return make_lora((batch, c_in, size, size), (c_out, c_in, k, k), (r, c_in, k, k), (c_out, r, 1, 1), bayes,
                     case["sigma_param"], dtypes, device)


def run_with_grads(fn, x, weight, bias, lora_a, lora_b, rho, grad_seed=1):
    """(y, kl, dx, dA, dB, drho) for upstream gradients drawn from a fixed generator (0.5 on the KL)."""
    x, lora_a, lora_b, rho = (t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, rho))
    y, kl = fn(x, weight, bias, lora_a, lora_b, rho)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    torch.autograd.backward((y, kl), (grad_y, torch.tensor(0.5, dtype=kl.dtype, device=kl.device)))
    return y.detach(), kl.detach(), x.grad, lora_a.grad, lora_b.grad, rho.grad


def check_against_oracle(backend, op, materialised, inputs, **options):
    """Forward and gradients of ``op`` on ``backend`` against the float64 oracle, with the tolerance rule of
    helpers.assert_close_to_oracle (plain PyTorch materialising the sample in the inputs' own dtypes)."""
    options = dict(dict(scale=1.0, prior_sigma=0.1), **options)
    seed = options.pop("seed", SEED)
    geometry = {key: options.pop(key) for key in ("stride", "padding", "dilation") if key in options}

    def fused(*args):
        return op(*args, seed=seed, **options, **geometry)

    def plain(*args):
        return materialised(*args, torch.tensor(seed), options["scale"], options["bayes"], options["prior_sigma"],
                            options["sigma_param"], options["estimator"], **geometry)

    with bk.use_backend(backend):
        result = run_with_grads(fused, *inputs)
    f64 = [None if t is None else t.detach().cpu().double() for t in inputs]
    oracle = run_with_grads(plain, *f64)
    baseline = run_with_grads(plain, *[None if t is None else t.detach().cpu() for t in inputs])
    x, factor_dtype = inputs[0], inputs[3].dtype
    y, kl, dx, da, db, drho = result
    assert y.dtype == x.dtype and y.is_contiguous() and kl.dtype == torch.float32 and kl.dim() == 0
    assert dx.dtype == x.dtype and da.dtype == db.dtype == drho.dtype == factor_dtype
    label = f"{backend}/{options['bayes']}/{options['estimator']}/{options['sigma_param']}"
    for name, value, reference, same_dtype in zip(("y", "kl", "dx", "dA", "dB", "drho"), result, oracle, baseline):
        dtype = {"y": x.dtype, "dx": x.dtype, "kl": torch.float32}.get(name, factor_dtype)
        if name in ("dA", "dB", "drho") and x.dtype != torch.float32:
            dtype = x.dtype  # factor gradients come from GEMMs in x's dtype
        assert_close_to_oracle(f"{label}/{name}", value, reference, same_dtype, dtype)


def lora_linear(*args, **kwargs):
    return bk.bayes_lora_linear(*args, **kwargs)


def lora_conv(*args, **kwargs):
    return bk.bayes_lora_conv2d(*args, **kwargs)


# --- oracle tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "x".join(map(str, (*c[0], c[1], c[2]))) + f"-r{c[3]}")
def test_linear_float32_matches_oracle(backend, estimator, bayes, case):
    lead, n, k, r, sigma_param, scale = case
    inputs = linear_inputs(lead, n, k, r, bayes, sigma_param, device=device_for(backend))
    check_against_oracle(backend, lora_linear, bayes_lora_linear_materialised, inputs, bayes=bayes,
                         estimator=estimator, sigma_param=sigma_param, scale=scale)


@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
@pytest.mark.parametrize("dtypes", MIXED_PRECISION, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("rank", [4, LARGE_RANK])
def test_linear_mixed_precision_matches_oracle(backend, estimator, bayes, dtypes, rank):
    inputs = linear_inputs((2, 5), 17, 24, rank, bayes, "softplus", dtypes, device_for(backend))
    check_against_oracle(backend, lora_linear, bayes_lora_linear_materialised, inputs, bayes=bayes,
                         estimator=estimator, sigma_param="softplus", scale=2.0, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c['kernel']}x{c['kernel']}s{c['stride']}p{c['padding']}")
def test_conv_float32_matches_oracle(backend, estimator, bayes, case):
    inputs = conv_inputs(case, bayes, device=device_for(backend))
    check_against_oracle(backend, lora_conv, bayes_lora_conv2d_materialised, inputs, bayes=bayes,
                         estimator=estimator, sigma_param=case["sigma_param"], scale=0.5, stride=case["stride"],
                         padding=case["padding"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
@pytest.mark.parametrize("dtypes", MIXED_PRECISION[::2], ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_conv_mixed_precision_matches_oracle(backend, estimator, bayes, dtypes):
    inputs = conv_inputs(CONV_CASES[0], bayes, dtypes, device_for(backend))
    check_against_oracle(backend, lora_conv, bayes_lora_conv2d_materialised, inputs, bayes=bayes,
                         estimator=estimator, sigma_param="softplus", scale=2.0, padding=1, seed=5)


@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_without_bias(backend, estimator):
    inputs = linear_inputs((9,), 20, 24, 4, "B", "softplus", device=device_for(backend), with_bias=False)
    check_against_oracle(backend, lora_linear, bayes_lora_linear_materialised, inputs, bayes="B",
                         estimator=estimator, sigma_param="softplus", prior_sigma=1.0)


@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("bayes, estimator", [("B", "reparam"), ("A", "lrt")])
def test_factor_gradients_without_dx(backend, bayes, estimator):
    """When x needs no gradient the backward skips dx; the factor gradients do not change."""
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((7,), 9, 12, 4, bayes, "softplus", device=device_for(backend))

    def grads(x_requires_grad):
        params = [t.detach().clone().requires_grad_() for t in (lora_a, lora_b, rho)]
        x_ = x.detach().clone().requires_grad_(x_requires_grad)
        with bk.use_backend(backend):
            y, kl = bk.bayes_lora_linear(x_, weight, bias, *params, scale=1.5, bayes=bayes, seed=8,
                                         estimator=estimator)
        torch.autograd.backward((y, kl), (torch.ones_like(y), torch.tensor(0.5)))
        return [p.grad for p in params] + [x_.grad]

    *with_dx, dx = grads(True)
    *without_dx, no_dx = grads(False)
    assert dx is not None and no_dx is None
    for full, partial in zip(with_dx, without_dx):
        torch.testing.assert_close(partial, full)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_gradcheck_float64(backend, estimator, bayes, layer):
    dtypes = (torch.float64,) * 3
    if layer == "linear":
        x, weight, bias, lora_a, lora_b, rho = linear_inputs((4,), 5, 6, 3, bayes, "softplus", dtypes)
        op, geometry = bk.bayes_lora_linear, {}
    else:
        case = dict(kernel=3, stride=2, padding=1, rank=2, sigma_param="softplus")
        x, weight, bias, lora_a, lora_b, rho = conv_inputs(case, bayes, dtypes, batch=1, channels=(2, 3), size=3)
        op, geometry = bk.bayes_lora_conv2d, dict(stride=2, padding=1)

    def layer_fn(x_, a_, b_, rho_):
        return op(x_, weight, bias, a_, b_, rho_, scale=1.5, bayes=bayes, seed=3, prior_sigma=0.5,
                  estimator=estimator, **geometry)

    with bk.use_backend(backend):
        # the conv's Jacobian is checked through random projections (gradcheck's fast mode): a tenth of the time
        assert torch.autograd.gradcheck(layer_fn, tuple(t.requires_grad_() for t in (x, lora_a, lora_b, rho)),
                                        fast_mode=layer == "conv")


# --- reproducibility -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
def test_same_noise_on_every_backend_and_determinism(backend, estimator, bayes):
    """One seed, one output whichever backend computes it; the same seed twice gives the same bits, another seed
    another output, and the noise is really there."""
    device = device_for(backend)
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((6,), 10, 12, 4, bayes, "softplus", device=device)
    rho = rho + 2.0  # sigma around 0.3: noise well above the rounding

    def run(seed):
        return bk.bayes_lora_linear(x, weight, bias, lora_a, lora_b, rho, scale=1.0, bayes=bayes, seed=seed,
                                    estimator=estimator)

    with bk.use_backend(backend):
        (y, kl), (again, _), (other, _) = run(123), run(torch.tensor(123)), run(124)
    with bk.use_backend("reference"):
        y_ref, kl_ref = run(123)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(y, again)
    assert not torch.allclose(y, other)
    mean = torch.nn.functional.linear(x, weight, bias) + (x @ lora_a.t()) @ lora_b.t()
    assert not torch.allclose(y, mean, atol=1e-3)


@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("bayes", FACTORS)
def test_reparam_samples_the_factor_from_the_philox_stream(backend, bayes):
    """With x = I, W = 0 and the other factor I, y recovers the factor sample mean + sigma * philox_normal(seed)."""
    device = device_for(backend)
    r, k, n = 4, 4, 4
    eye = torch.eye(4, device=device)
    factor = torch.randn(4, 4, device=device)
    rho = torch.full((4, 4), -1.0, device=device)
    lora_a, lora_b = (factor, eye) if bayes == "A" else (eye, factor)
    with bk.use_backend(backend):
        y, _ = bk.bayes_lora_linear(eye, torch.zeros(n, k, device=device), None, lora_a, lora_b, rho, scale=1.0,
                                    bayes=bayes, seed=99)
    sample = factor.cpu() + torch.nn.functional.softplus(torch.tensor(-1.0)) * bk.philox_normal(99, (r, k))
    # y = (x A^T) B^T with x = I: y = A^T B^T = (B A)^T, so y^T is the sampled B (bayes "B") or A (bayes "A")
    torch.testing.assert_close(y.t().cpu(), sample, rtol=1e-5, atol=1e-5)


# --- memory contract -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes", FACTORS)
@pytest.mark.parametrize("layer", ["linear", "conv", "linear-large-rank"])
def test_saves_nothing_weight_or_output_sized(backend, estimator, bayes, layer):
    """Autograd keeps the inputs, the seed and the rank-space activation (plus t's std for lrt "A"): no tensor with
    the base weight's size (N*K) or the output's size."""
    if backend == "triton" and layer == "conv" and "BNN_TRITON_LORA" in os.environ:
        pytest.skip("BNN_TRITON_LORA concerns the linear LoRA only")
    device = device_for(backend)
    if layer.startswith("linear"):
        # M * r < N * r < M * N < N * K: rank-sized, factor-sized, output-sized and weight-sized tensors differ
        m, n, k, r = (96, 200, 240, LARGE_RANK) if layer == "linear-large-rank" else (6, 40, 48, 2)
        inputs = linear_inputs((m,), n, k, r, bayes, "softplus", device=device)
        op, geometry = bk.bayes_lora_linear, {}
    else:
        inputs = conv_inputs(CONV_CASES[0], bayes, device=device, channels=(24, 24), size=3)
        op, geometry = bk.bayes_lora_conv2d, dict(padding=1)
    x, weight, bias, lora_a, lora_b, rho = inputs
    x, lora_a, lora_b, rho = (t.requires_grad_() for t in (x, lora_a, lora_b, rho))
    with bk.use_backend(backend), SavedTensors() as record:
        y, kl = op(x, weight, bias, lora_a, lora_b, rho, scale=1.0, bayes=bayes, seed=5, estimator=estimator,
                   **geometry)
    new = record.new_tensors(x, weight, bias, lora_a, lora_b, rho)
    rank_numel = y.numel() // weight.shape[0] * lora_a.shape[0]
    assert rank_numel < min(weight.numel(), y.numel())
    kept = sorted(t.numel() for t in new if t.numel() > 0)
    assert kept == [1, rank_numel] + [rank_numel] * (bayes == "A" and estimator == "lrt")  # seed, h (, t's std)
    (y.sum() + kl).backward()  # and backward still works from what was kept
    assert all(t.grad is not None for t in (x, lora_a, lora_b, rho))


@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_a_strided_base_weight_is_read_without_a_kept_copy(backend, layer):
    """A channels_last conv base (model.to(memory_format=torch.channels_last)) or a transposed linear base: the
    results of its contiguous copy, and autograd keeps the weight itself, not a weight-sized copy of it."""
    if backend == "triton" and layer == "conv" and "BNN_TRITON_LORA" in os.environ:
        pytest.skip("BNN_TRITON_LORA concerns the linear LoRA only")
    device = device_for(backend)
    if layer == "linear":
        x, weight, bias, lora_a, lora_b, rho = linear_inputs((6,), 40, 48, 2, "B", "softplus", device=device)
        strided = weight.t().contiguous().t()
        op, geometry = bk.bayes_lora_linear, {}
    else:
        x, weight, bias, lora_a, lora_b, rho = conv_inputs(CONV_CASES[0], "B", device=device, channels=(24, 24),
                                                           size=3)
        strided = weight.contiguous(memory_format=torch.channels_last)
        op, geometry = bk.bayes_lora_conv2d, dict(padding=1)
    assert not strided.is_contiguous()
    results = []
    for base in (weight, strided):
        with bk.use_backend(backend), SavedTensors() as record:
            results.append(run_with_grads(
                lambda *inputs: op(*inputs, scale=1.0, seed=5, **geometry), x, base, bias, lora_a, lora_b, rho))
        assert all(t.numel() < weight.numel() for t in record.new_tensors(x, base, bias, lora_a, lora_b, rho))
    for contiguous, strided_result in zip(*results):
        torch.testing.assert_close(strided_result, contiguous)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("setting, rank, dtype, fused", [
    (None, 64, torch.bfloat16, True), (None, 65, torch.bfloat16, False), (None, LARGE_RANK, torch.float16, False),
    (None, 4, torch.float32, False), ("fused", 4, torch.float32, True), ("fused", 65, torch.bfloat16, False),
    ("composition", 4, torch.bfloat16, False), ("auto", 16, torch.float16, True),
])
def test_triton_lora_variant_follows_the_rank_the_dtype_and_the_setting(monkeypatch, setting, rank, dtype, fused):
    """BNN_TRITON_LORA=auto (the default) fuses 16-bit x up to FUSED_MAX_RANK; fused adds float32; composition never
    fuses; no setting fuses above FUSED_MAX_RANK.  Backward takes the path forward took."""
    from bnn_kernels.triton import lora as triton_lora
    if setting is None:
        monkeypatch.delenv("BNN_TRITON_LORA", raising=False)
    else:
        monkeypatch.setenv("BNN_TRITON_LORA", setting)
    launches = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    for name in ("_lora_rank_grad_kernel", "_lora_dx_kernel"):
        monkeypatch.setattr(triton_lora, name, Recording(getattr(triton_lora, name)))
    for wide_base, forward in list(triton_lora._TUNED_FWD.items()):  # the forward, by the base weight's width
        monkeypatch.setitem(triton_lora._TUNED_FWD, wide_base, Recording(forward))
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((3,), 9, 16, rank, "B", "softplus",
                                                         (dtype, dtype, torch.float32), device_for("triton"))
    lora_b.requires_grad_()
    x.requires_grad_()
    with bk.use_backend("triton"):
        y, kl = bk.bayes_lora_linear(x, weight, bias, lora_a, lora_b, rho, scale=1.0, bayes="B", seed=3)
        (y.float().sum() + kl).backward()
    assert triton_lora.lora_variant(rank, dtype) == ("fused" if fused else "composition")
    assert len(launches) == (3 if fused else 0), launches
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(lora_b.grad).all()


def test_triton_lora_auto_composes_where_dots_have_no_tensor_cores(monkeypatch):
    """Below sm_80 (T4, RTX 20xx) tl.dot has no tensor cores: auto runs the LoRA GEMMs on cuBLAS in every dtype."""
    pytest.importorskip("triton")
    from bnn_kernels.triton import common, lora as triton_lora
    monkeypatch.delenv("BNN_TRITON_LORA", raising=False)
    for arch, expected in ((75, "composition"), (80, "fused"), (120, "fused")):
        monkeypatch.setattr(common, "_capture_arch", arch)
        assert triton_lora.lora_variant(4, torch.float16) == expected, arch
    monkeypatch.setattr(common, "_capture_arch", 75)
    monkeypatch.setenv("BNN_TRITON_LORA", "fused")
    assert triton_lora.lora_variant(4, torch.float16) == "fused"


def test_a_bad_triton_lora_setting_is_refused(monkeypatch):
    pytest.importorskip("triton")
    from bnn_kernels.triton import lora as triton_lora
    monkeypatch.setenv("BNN_TRITON_LORA", "always")
    with pytest.raises(ValueError, match="BNN_TRITON_LORA must be one of"):
        triton_lora.lora_variant(4, torch.bfloat16)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("estimator", ["reparam", "lrt"])
@pytest.mark.parametrize("bayes", ["A", "B"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_composition_in_x_dtype_matches_float32_to_its_rounding(layer, estimator, bayes, x_dtype):
    """The triton backend's LoRA composition runs its maps in x's dtype on a GPU (cuBLAS / cuDNN): the same code
    with compute=x.dtype gives the float32 composition's outputs and gradients to 16-bit rounding."""
    from bnn_kernels import reference
    torch.manual_seed(3)
    dtypes = (x_dtype, x_dtype, torch.float32)
    if layer == "linear":
        inputs, geometry = linear_inputs((9,), 12, 20, 4, bayes, "softplus", dtypes), ()
        fwd, bwd = reference.lora_linear_fwd, reference.lora_linear_bwd
    else:
        case = {"kernel": 3, "rank": 4, "sigma_param": "softplus"}
        inputs, geometry = conv_inputs(case, bayes, dtypes), ((1, 1), (1, 1), (1, 1))
        fwd, bwd = reference.lora_conv2d_fwd, reference.lora_conv2d_bwd
    x, weight, bias, lora_a, lora_b, rho = inputs
    seed, options = torch.tensor(11), (1.5, bayes, 0.05, "softplus", estimator)
    results = {}
    for compute in (None, x_dtype):
        y, kl, h, aux = fwd(x, weight, bias, lora_a, lora_b, rho, seed, *geometry, *options, compute=compute)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        grads = bwd(grad_y, torch.tensor(0.5), x, weight, lora_a, lora_b, rho, seed, h, aux, *geometry, *options,
                    True, compute=compute)
        results[compute] = (y, kl, *grads)
    for name, want, have in zip(("y", "kl", "dx", "dA", "dB", "drho"), results[None], results[x_dtype]):
        assert have.dtype == want.dtype and have.shape == want.shape, name
        scale = want.float().abs().max().item() + 1e-6
        error = (have.float() - want.float()).abs().max().item() / scale
        assert error < 0.03, (name, error)


def test_the_check_catches_a_materialising_lora_layer():
    """The same check flags the paper-style layer, which keeps the factor sample and eps for backward."""
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((6,), 40, 48, 2, "B", "softplus")
    lora_b.requires_grad_()
    rho.requires_grad_()
    with SavedTensors() as record:
        bayes_lora_linear_materialised(x, weight, bias, lora_a, lora_b, rho, torch.tensor(5), 1.0, "B")
    assert any(t.numel() == lora_b.numel() for t in record.new_tensors(x, weight, bias, lora_a, lora_b, rho))


# --- the frozen base, the empty batch ----------------------------------------------------------------------------

@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_base_that_requires_grad_is_refused_in_grad_mode(frozen):
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((3,), 5, 4, 2, "B", "softplus")
    {"weight": weight, "bias": bias}[frozen].requires_grad_()
    with pytest.raises(ValueError, match=f"{frozen} requires grad, but the base layer of a LoRA op is frozen"):
        bk.bayes_lora_linear(x, weight, bias, lora_a, lora_b, rho, scale=1.0, seed=1)
    with torch.no_grad():  # inference on an unfrozen module is fine
        y, _ = bk.bayes_lora_linear(x, weight, bias, lora_a, lora_b, rho, scale=1.0, seed=1)
    assert y.shape == (3, 5)


def test_empty_batch_gives_empty_output_the_kl_and_an_empty_input_gradient():
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((0,), 5, 4, 2, "B", "softplus")
    x.requires_grad_()
    lora_b.requires_grad_()
    rho.requires_grad_()
    y, kl = bk.bayes_lora_linear(x, weight, bias, lora_a, lora_b, rho, scale=1.0, seed=1)
    assert y.shape == (0, 5)
    torch.testing.assert_close(kl, bk.gaussian_kl(lora_b, rho))
    (y.sum() + kl).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert lora_b.grad is not None and rho.grad is not None


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("empty", ["in_features", "out_features"])
def test_zero_features(backend, empty):
    """nn.Linear(0, n) / nn.Linear(k, 0) as a LoRA base, with a float16 weight (converted block by block)."""
    n, k = (5, 0) if empty == "in_features" else (0, 4)
    x, weight, bias, lora_a, lora_b, rho = linear_inputs((3,), n, k, 2, "B", "softplus")
    with bk.use_backend(backend):
        y, kl = bk.bayes_lora_linear(x.half(), weight.half(), None, lora_a, lora_b, rho, scale=1.0, seed=1)
    assert y.shape == (3, n) and y.dtype == torch.float16
    assert torch.all(y == 0)
    torch.testing.assert_close(kl, bk.gaussian_kl(lora_b, rho))


def test_unbatched_channels_last_conv_input():
    case = CONV_CASES[0]
    x, weight, bias, lora_a, lora_b, rho = conv_inputs(case, "B")
    kwargs = dict(scale=1.0, padding=1, seed=4)
    y, _ = bk.bayes_lora_conv2d(x, weight, bias, lora_a, lora_b, rho, **kwargs)
    y_cl, _ = bk.bayes_lora_conv2d(x.to(memory_format=torch.channels_last), weight, bias, lora_a, lora_b, rho,
                                   **kwargs)
    y_one, _ = bk.bayes_lora_conv2d(x[0], weight, bias, lora_a, lora_b, rho, **kwargs)
    torch.testing.assert_close(y_cl, y)
    torch.testing.assert_close(y_one, y[0])  # reparam: one factor sample, shared by the batch


# --- argument errors -----------------------------------------------------------------------------------------------

def _linear_args():
    return dict(x=torch.randn(3, 4), weight=torch.randn(5, 4), bias=torch.zeros(5), lora_a=torch.randn(2, 4),
                lora_b=torch.randn(5, 2), rho=torch.full((5, 2), -3.0))


def _call_linear(**overrides):
    args, kwargs = _linear_args(), dict(scale=1.0, seed=1)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return bk.bayes_lora_linear(*args.values(), **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(x=torch.randn(3, 5)), ValueError, r"x must have shape \(\.\.\., 4\)"),
    (dict(weight=torch.randn(5, 4, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.zeros(4)), ValueError, "bias must have shape"),
    (dict(lora_a=torch.randn(2, 3)), ValueError, r"lora_a must have shape \(r, 4\)"),
    (dict(lora_a=torch.randn(0, 4)), ValueError, "lora_a must have at least one row"),
    (dict(lora_b=torch.randn(5, 3)), ValueError, r"lora_b must have shape \(5, 2\)"),
    (dict(rho=torch.full((2, 4), -3.0)), ValueError, "rho must have the shape .* of the Bayesian factor lora_b"),
    (dict(bayes="A"), ValueError, "rho must have the shape .* of the Bayesian factor lora_a"),
    (dict(bayes="C"), ValueError, "bayes must be one of"),
    (dict(bayes="b"), ValueError, "bayes must be one of"),
    (dict(rho=torch.full((5, 2), -3.0, dtype=torch.float64)), ValueError, "rho must have lora_b's dtype"),
    (dict(lora_b=torch.randn(5, 2).half(), rho=torch.full((5, 2), -3.0).half()), ValueError,
     "lora_b must have lora_a's dtype"),
    (dict(x=torch.randn(3, 4).to(torch.int32)), ValueError, "x must have dtype"),
    (dict(weight=torch.ones(5, 4, dtype=torch.int8)), ValueError, "weight must have dtype"),
    (dict(lora_a=[[1.0]]), TypeError, "lora_a must be a torch.Tensor"),
    (dict(scale="2"), TypeError, "scale must be a real number"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(prior_sigma=0.0), ValueError, "prior_sigma"),
    (dict(sigma_param="exp"), ValueError, "sigma_param must be one of"),
    (dict(estimator="flipout"), ValueError, "estimator must be one of"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=2**63), ValueError, "seed must be in"),
    (dict(x=torch.randn(3, 4, device="meta")), ValueError, "x is on meta but lora_a is on cpu"),
])
def test_bad_bayes_lora_linear_arguments(overrides, error, words):
    with pytest.raises(error, match=words):
        _call_linear(**overrides)


def test_scale_and_seed_are_required():
    args = _linear_args()
    with pytest.raises(TypeError):
        bk.bayes_lora_linear(*args.values(), seed=1)
    with pytest.raises(TypeError):
        bk.bayes_lora_linear(*args.values(), scale=1.0)


def _conv_args():
    return dict(x=torch.randn(2, 3, 6, 6), weight=torch.randn(4, 3, 3, 3), bias=None, lora_a=torch.randn(2, 3, 3, 3),
                lora_b=torch.randn(4, 2, 1, 1), rho=torch.full((4, 2, 1, 1), -3.0))


@pytest.mark.parametrize("overrides, error, words", [
    (dict(groups=2), ValueError, "groups must be 1 for a LoRA conv"),
    (dict(groups=1.0), TypeError, "groups must be an int"),
    (dict(x=torch.randn(2, 4, 6, 6)), ValueError, r"x must have shape \(N, 3, H, W\)"),
    (dict(weight=torch.randn(4, 3, 3)), ValueError, "weight must be 4-D"),
    (dict(lora_a=torch.randn(2, 3, 1, 1)), ValueError, r"lora_a must have shape \(r, 3, 3, 3\)"),
    (dict(lora_b=torch.randn(4, 2)), ValueError, r"lora_b must have shape \(4, 2, 1, 1\)"),
    (dict(stride=0), ValueError, "stride must be at least 1"),
    (dict(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (dict(x=torch.randn(2, 3, 2, 2)), ValueError, "too small for kernel"),
    (dict(x=torch.randn(2, 3, 6, 0), padding=1), ValueError, "x has no pixels"),
    (dict(bayes="A"), ValueError, "Bayesian factor lora_a"),
    (dict(prior_sigma=1e19), ValueError, "prior_sigma must be in"),
])
def test_bad_bayes_lora_conv2d_arguments(overrides, error, words):
    args, kwargs = _conv_args(), dict(scale=1.0, seed=1)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=words):
        bk.bayes_lora_conv2d(*args.values(), **kwargs)


def test_float64_only_on_backends_that_take_it():
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not usable here")
    args = {name: t.double().to(device_for("triton")) for name, t in _linear_args().items()}
    with bk.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        bk.bayes_lora_linear(*args.values(), scale=1.0, seed=1)


# --- torch.compile -------------------------------------------------------------------------------------------------

class TinyLoRANet(torch.nn.Module):
    """A frozen two-layer base with a Bayesian LoRA on each layer (B Bayesian, then A Bayesian with lrt)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
        self.linear = torch.nn.Linear(4, 5).requires_grad_(False)
        self.conv_a = torch.nn.Parameter(torch.randn(2, 3, 3, 3) * 0.2)
        self.conv_b = torch.nn.Parameter(torch.randn(4, 2, 1, 1) * 0.2)
        self.conv_rho = torch.nn.Parameter(torch.full((4, 2, 1, 1), -4.0))
        self.lin_a = torch.nn.Parameter(torch.randn(2, 4) * 0.2)
        self.lin_b = torch.nn.Parameter(torch.randn(5, 2) * 0.2)
        self.lin_rho = torch.nn.Parameter(torch.full((2, 4), -4.0))

    def forward(self, x, seed):
        h, kl1 = bk.bayes_lora_conv2d(x, self.conv.weight, self.conv.bias, self.conv_a, self.conv_b, self.conv_rho,
                                      scale=0.5, padding=1, seed=seed)
        y, kl2 = bk.bayes_lora_linear(torch.relu(h).mean((2, 3)), self.linear.weight, self.linear.bias, self.lin_a,
                                      self.lin_b, self.lin_rho, scale=2.0, bayes="A", seed=seed + 1, estimator="lrt")
        return y, kl1 + kl2


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
def test_compiled_model_matches_eager_and_does_not_recompile(backend):
    model = TinyLoRANet()
    assert_compiled_matches_eager(model, torch.randn(2, 3, 5, 5), backend)
    assert model.conv.weight.grad is None and model.linear.weight.grad is None
    assert all(p.grad is not None for p in (model.conv_a, model.conv_b, model.conv_rho, model.lin_a, model.lin_rho))


@pytest.mark.parametrize("backend", LORA_BACKENDS, indirect=True)
def test_backends_read_non_contiguous_operands_by_value(backend):
    """A backend called directly (not through bk.bayes_lora_linear, which passes contiguous tensors) with
    transposed views of x, the weight and the factors computes what it does on contiguous copies."""
    from bnn_kernels import registry
    device = device_for(backend)
    generator = torch.Generator().manual_seed(3)

    def operand(*shape):  # a transposed view of a (shape reversed) tensor: same values, other strides
        return torch.randn(*reversed(shape), generator=generator).to(device).t()

    x, weight, lora_a, lora_b, rho = operand(9, 20), operand(24, 20), operand(4, 20), operand(24, 4), operand(24, 4)
    rho = rho.abs() * 0.1
    seed = torch.tensor(5, dtype=torch.int64, device=device)
    options = (0.5, "B", 0.1, "direct", "reparam")  # scale, bayes, prior_sigma, sigma_param, estimator
    module = registry.get(backend)
    with bk.use_backend(backend):
        strided = module.lora_linear_fwd(x, weight, None, lora_a, lora_b, rho, seed, *options)
        dense = module.lora_linear_fwd(*(t.contiguous() for t in (x, weight)), None,
                                       *(t.contiguous() for t in (lora_a, lora_b, rho)), seed, *options)
    assert not x.is_contiguous() and not weight.is_contiguous()
    for got, want in zip(strided[:2], dense[:2]):
        torch.testing.assert_close(got, want)
