"""BayesConv2d, BayesLoRALinear and BayesLoRAConv2d as layers: the fused op with a seed from torch's RNG when
sampling, the plain computation with the mean otherwise, initialisation, merge / restore, gradients, memory, errors.
(BayesLinear's own layer tests are in test_patch.py; model-level tests of every preset too.)"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnn_kernels as bk
from bnn_diffusion import BayesConv2d, BayesLinear, BayesLoRAConv2d, BayesLoRALinear
from bnn_diffusion.layers import SEED_HIGH

CONV_CONFIGS = {  # the convolutions of a diffusers UNet, and the other geometries nn.Conv2d allows
    "3x3": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "3x3-stride2": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1),
    "1x1": dict(in_channels=6, out_channels=8, kernel_size=1),
    "grouped-dilated": dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=2),
    "same-rect": dict(in_channels=6, out_channels=8, kernel_size=(3, 1), padding="same"),
}


def next_seed(seed):
    """The seed a layer draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64)


def saved_tensors_of(forward):
    """The tensors autograd saves while ``forward()`` runs, and its result."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return saved, result


def test_seeds_are_drawn_on_the_inputs_device(monkeypatch):
    """A CUDA input's seed comes from that GPU's generator (no host-to-device copy of a CPU seed, which waits
    for the GPU's queued work); a CPU input's from the CPU generator.  Checked through the device the layer asks
    draw_seed for, and draw_seed honouring it ("meta" standing in for a GPU here)."""
    from bnn_diffusion import layers

    asked = []
    real = layers.draw_seed
    monkeypatch.setattr(layers, "draw_seed", lambda device=None: asked.append(device) or real(device))
    layer = BayesLinear.from_linear(nn.Linear(4, 3))
    layer(torch.randn(2, 4))
    assert asked == [None]
    assert real(torch.device("meta")).device.type == "meta" and real().device.type == "cpu"


# --------------------------------------------------------------------------------------------------------------
# BayesConv2d
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_conv_forward_is_the_kernel_op_with_a_seed_from_torch_rng(config):
    conv = nn.Conv2d(**CONV_CONFIGS[config])
    x = torch.randn(2, 6, 9, 7)
    for sigma_param, estimator in [("direct", "reparam"), ("softplus", "lrt")]:
        layer = BayesConv2d.from_conv(conv, sigma_init=0.03, prior_sigma=0.02, sigma_param=sigma_param,
                                      estimator=estimator)
        torch.manual_seed(5)
        y = layer(x)
        seed = next_seed(5)
        y_ref, kl_ref = bk.bayes_conv2d(x, layer.weight_mu, layer.weight_rho, layer.bias, stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, seed=seed,
                                        prior_mu=conv.weight, prior_sigma=0.02, sigma_param=sigma_param,
                                        estimator=estimator)
        assert torch.equal(y, y_ref) and torch.equal(layer.last_kl, kl_ref)
        if estimator == "reparam":  # one kernel sample mu + sigma * eps, eps = philox_normal(seed)
            weight = conv.weight + layer.sigma * bk.philox_normal(seed, conv.weight.shape)
            torch.testing.assert_close(y, conv._conv_forward(x, weight, conv.bias), atol=1e-5, rtol=1e-5)
    # eval: the mean (F.conv2d with mu: exactly the conv), last_kl cleared; sample= overrides the mode
    layer.eval()
    assert torch.equal(layer(x), conv(x)) and layer.last_kl is None
    layer.sample = True
    assert not torch.allclose(layer(x), conv(x)) and layer.last_kl is not None
    # channels_last input: the same values
    layer.sample = None
    layer.train()
    torch.manual_seed(6)
    a = layer(x.contiguous(memory_format=torch.channels_last))
    torch.manual_seed(6)
    assert torch.equal(a, layer(x))


def test_conv_dtypes_extra_repr_and_constructor():
    layer = BayesConv2d.from_conv(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), sigma_init=0.02,
                                  sigma_param="softplus", estimator="lrt", prior_dtype=torch.bfloat16)
    x = torch.randn(2, 4, 8, 8)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    layer.eval()
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    text = repr(layer)
    for part in ("4, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)", "groups=2", "bias=True",
                 "estimator=lrt", "sigma_param=softplus", "sigma(mean=0.02", "prior_dtype=torch.bfloat16"):
        assert part in text, (part, text)
    # the constructor: nn.Conv2d's initialisation, prior = that initial kernel, sigma = sigma_init
    fresh = BayesConv2d(4, 8, 3, padding=1, bias=False, sigma_init=0.05)
    assert fresh.weight_mu.shape == (8, 4, 3, 3) and fresh.bias is None
    assert torch.equal(fresh.prior_mu, fresh.weight_mu) and torch.all(fresh.sigma == 0.05)
    assert set(fresh.state_dict()) == {"weight_mu", "weight_rho", "prior_mu"}
    bound = 1 / math.sqrt(4 * 9)  # kaiming-uniform(a=sqrt(5)) as nn.Conv2d
    assert fresh.weight_mu.abs().max() <= bound


def test_conv_to_conv_and_restore():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    expected = conv(x)
    pretrained = conv.weight.detach().clone()
    layer = BayesConv2d.from_conv(conv)
    layer.keep_original(conv)
    with torch.no_grad():
        layer.weight_mu.add_(0.1)
    plain = layer.to_conv()
    assert type(plain) is nn.Conv2d and plain.weight.data_ptr() == layer.weight_mu.data_ptr()
    assert (plain.stride, plain.padding, plain.dilation, plain.groups) == ((1, 1), (1, 1), (1, 1), 1)
    layer.eval()
    assert torch.equal(plain(x), layer(x))
    assert layer.to_conv(copy=True).weight.data_ptr() != layer.weight_mu.data_ptr()
    restored = layer.restore()
    assert restored is conv and torch.equal(restored.weight, pretrained) and torch.equal(restored(x), expected)


def test_conv_autograd_keeps_no_kernel_sized_tensor_of_its_own():
    layer = BayesConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1))
    own = {t.data_ptr() for t in (layer.weight_mu, layer.weight_rho, layer.prior_mu)}
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    saved, y = saved_tensors_of(lambda: layer(x))
    big = [t for t in saved if t.numel() >= layer.weight_mu.numel() and t.data_ptr() not in own]
    assert not big, [tuple(t.shape) for t in big]
    (y.sum() + layer.last_kl).backward()
    assert all(p.grad is not None for p in (layer.weight_mu, layer.weight_rho, layer.bias, x))


# --------------------------------------------------------------------------------------------------------------
# Bayesian LoRA
# --------------------------------------------------------------------------------------------------------------

def lora_layers(bayes="B", estimator="reparam", sigma_param="direct", rank=3, lora_alpha=6.0, **options):
    """(base, layer, x) for a linear and a conv LoRA layer."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(12, 10), nn.Conv2d(5, 7, 3, stride=2, padding=1)
    kwargs = dict(bayes=bayes, estimator=estimator, sigma_param=sigma_param, rank=rank, lora_alpha=lora_alpha,
                  sigma_init=0.03, prior_sigma=0.02, **options)
    return [(linear, BayesLoRALinear.from_linear(linear, **kwargs), torch.randn(3, 4, 12)),
            (conv, BayesLoRAConv2d.from_conv(conv, **kwargs), torch.randn(2, 5, 9, 9))]


def lora_op(layer, x, seed):
    if isinstance(layer, BayesLoRAConv2d):
        return bk.bayes_lora_conv2d(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_rho,
                                    scale=layer.scale, stride=layer.stride, padding=layer.padding,
                                    dilation=layer.dilation, bayes=layer.bayes, seed=seed, prior_sigma=0.02,
                                    sigma_param=layer.sigma_param, estimator=layer.estimator)
    return bk.bayes_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_rho,
                                scale=layer.scale, bayes=layer.bayes, seed=seed, prior_sigma=0.02,
                                sigma_param=layer.sigma_param, estimator=layer.estimator)


def low_rank(layer, x, lora_a, lora_b):
    """scale * B(A(x)) with the given factors, written out."""
    if isinstance(layer, BayesLoRAConv2d):
        return layer.scale * F.conv2d(F.conv2d(x, lora_a, stride=layer.stride, padding=layer.padding), lora_b)
    return layer.scale * (x @ lora_a.T) @ lora_b.T


def perturb_factors(layer):
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))


def test_lora_initialisation_follows_peft_and_keeps_the_base():
    for bayes in ("A", "B"):
        for base, layer, _ in lora_layers(bayes=bayes):
            assert layer.weight.data_ptr() == base.weight.data_ptr() and not layer.weight.requires_grad
            assert layer.bias.data_ptr() == base.bias.data_ptr() and not layer.bias.requires_grad
            assert base.weight.requires_grad and base.bias.requires_grad  # the wrapped layer is left as it was
            fan_in = layer.lora_A[0].numel()
            assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
            assert 0.5 / math.sqrt(fan_in) < layer.lora_A.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming, a=sqrt(5)
            assert layer.mu is (layer.lora_A if bayes == "A" else layer.lora_B)
            assert layer.lora_rho.shape == layer.mu.shape and torch.all(layer.sigma == 0.03)
            assert layer.rank == 3 and layer.scale == 2.0 and layer.prior_mu is None
    _, conv_layer, _ = lora_layers()[1]
    assert conv_layer.lora_A.shape == (3, 5, 3, 3) and conv_layer.lora_B.shape == (7, 3, 1, 1)
    fresh = BayesLoRALinear(8, 6, rank=2)  # the constructor: nn.Linear's init for the base, scale 1
    assert fresh.scale == 1.0 and fresh.weight.abs().max() <= 1 / math.sqrt(8) and not fresh.weight.requires_grad
    assert set(fresh.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_rho"}


@pytest.mark.parametrize("bayes, estimator, sigma_param", [("B", "reparam", "direct"), ("A", "reparam", "softplus"),
                                                           ("B", "lrt", "softplus"), ("A", "lrt", "direct")])
def test_lora_forward_is_the_kernel_op_with_a_seed_from_torch_rng(bayes, estimator, sigma_param):
    for base, layer, x in lora_layers(bayes=bayes, estimator=estimator, sigma_param=sigma_param):
        perturb_factors(layer)
        torch.manual_seed(5)
        y = layer(x)
        seed = next_seed(5)
        y_ref, kl_ref = lora_op(layer, x, seed)
        assert torch.equal(y, y_ref) and torch.equal(layer.last_kl, kl_ref)
        if estimator == "reparam":  # one sample of the Bayesian factor, eps = philox_normal(seed, factor.shape)
            sample = layer.mu + layer.sigma * bk.philox_normal(seed, layer.mu.shape)
            a, b = (sample, layer.lora_B) if bayes == "A" else (layer.lora_A, sample)
            torch.testing.assert_close(y, base(x) + low_rank(layer, x, a, b), atol=1e-5, rtol=1e-5)
        # eval: base + scale * B A x with the means, no KL; sample= overrides the mode
        layer.eval()
        mean = layer(x)
        torch.testing.assert_close(mean, base(x) + low_rank(layer, x, layer.lora_A, layer.lora_B),
                                   atol=1e-6, rtol=1e-5)
        assert layer.last_kl is None
        layer.sample = True
        assert not torch.allclose(layer(x), mean) and layer.last_kl is not None


def test_lora_eval_at_init_is_the_base_layer():
    for base, layer, x in lora_layers() + lora_layers(bayes="A"):
        layer.eval()
        assert torch.equal(layer(x), base(x))


def test_lora_restore_hands_the_base_back():
    for base, layer, x in lora_layers():
        pretrained = base.weight.detach().clone()
        expected_base = base(x)
        layer.keep_original(base)
        perturb_factors(layer)
        restored = layer.restore()
        assert restored is base and restored.weight.data_ptr() == layer.weight.data_ptr()
        assert restored.weight.requires_grad and restored.bias.requires_grad
        assert torch.equal(restored.weight, pretrained) and torch.equal(restored(x), expected_base)


def test_lora_merge_folds_the_update_into_the_base_module_handed_over_for_good():
    """to_plain gives the very module patch replaced, holding the merged weight; a later restore builds a new
    layer with the pretrained weight rather than overwriting the merged one's."""
    for base, layer, x in lora_layers():
        pretrained = base.weight.detach().clone()
        expected_base = base(x)
        layer.keep_original(base)
        perturb_factors(layer)
        layer.eval()
        mean = layer(x)
        plain = layer.to_plain()
        assert plain is base and not plain.weight.requires_grad
        assert plain.bias.data_ptr() == layer.bias.data_ptr()
        torch.testing.assert_close(plain(x), mean, atol=1e-6, rtol=1e-5)
        delta = plain.weight - pretrained
        assert torch.linalg.matrix_rank(delta.reshape(delta.shape[0], -1)) == layer.rank
        restored = layer.restore()
        assert restored is not plain and type(restored) is type(base)
        assert torch.equal(restored(x), expected_base)
        torch.testing.assert_close(plain(x), mean, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bayes", ["A", "B"])
def test_lora_gradients_reach_the_factors_and_rho_never_the_base(bayes):
    for _, layer, x in lora_layers(bayes=bayes, sigma_param="softplus"):
        perturb_factors(layer)
        x.requires_grad_(True)
        (layer(x).square().mean() + layer.last_kl).backward()
        for tensor in (layer.lora_A, layer.lora_B, layer.lora_rho, x):
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0
        assert layer.weight.grad is None and layer.bias.grad is None
        # the KL: prior N(0, 0.02^2) on the Bayesian factor
        sigma = F.softplus(layer.lora_rho.detach().double())
        mu = layer.mu.detach().double()
        expected = (math.log(0.02) - sigma.log() + (sigma**2 + mu**2) / (2 * 0.02**2) - 0.5).sum().item()
        assert layer.kl().item() == pytest.approx(expected, rel=1e-5)
        assert layer.last_kl.item() == pytest.approx(expected, rel=1e-5)


def test_lora_float32_factors_over_a_bfloat16_base():
    for base, layer, x in lora_layers(lora_dtype=torch.float32):
        bf16 = type(layer)._wrap(base.to(torch.bfloat16), rank=3, lora_alpha=None, bayes="B", sigma_init=0.01,
                                 prior_sigma=0.01, sigma_param="direct", estimator="reparam",
                                 lora_dtype=torch.float32)
        assert bf16.weight.dtype == torch.bfloat16 and bf16.lora_A.dtype == bf16.lora_rho.dtype == torch.float32
        perturb_factors(bf16)
        y = bf16(x.bfloat16())
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        assert bf16.lora_B.grad.dtype == torch.float32
        bf16.eval()
        assert bf16(x.bfloat16()).dtype == torch.bfloat16


def test_lora_autograd_keeps_nothing_base_sized_of_its_own():
    torch.manual_seed(0)
    layer = BayesLoRALinear.from_linear(nn.Linear(64, 48), rank=4)
    own = {t.data_ptr() for t in (layer.weight, layer.lora_A, layer.lora_B, layer.lora_rho)}
    x = torch.randn(5, 64, requires_grad=True)
    saved, y = saved_tensors_of(lambda: layer(x))
    big = [t for t in saved if t.numel() >= layer.lora_A.numel() and t.data_ptr() not in own | {x.data_ptr()}]
    assert not big, [tuple(t.shape) for t in big]


def test_lora_extra_repr_and_deepcopy():
    _, layer, x = lora_layers(bayes="A")[1]
    text = repr(layer)
    for part in ("5, 7, kernel_size=(3, 3), stride=(2, 2)", "rank=3", "lora_alpha=6", "bayes=A", "sigma(mean=0.03"):
        assert part in text, (part, text)
    layer(x)
    clone = copy.deepcopy(layer)
    assert clone.last_kl is None and torch.equal(clone.lora_A, layer.lora_A)


@pytest.mark.parametrize("make, error, match", [
    (lambda: BayesLoRALinear(4, 4, rank=0), ValueError, "rank"),
    (lambda: BayesLoRALinear(4, 4, rank=2.0), ValueError, "rank"),
    (lambda: BayesLoRALinear(4, 4, bayes="C"), ValueError, "bayes"),
    (lambda: BayesLoRALinear(4, 4, lora_alpha=-1.0), ValueError, "lora_alpha"),
    (lambda: BayesLoRALinear(4, 4, lora_dtype=torch.int32), TypeError, "lora_dtype"),
    (lambda: BayesLoRALinear(4, 4, sigma_init=0.0), ValueError, "sigma_init"),
    (lambda: BayesLoRAConv2d(4, 4, 3, groups=2), ValueError, "groups=1"),
    (lambda: BayesLoRAConv2d.from_conv(nn.Linear(4, 4)), TypeError, "nn.Conv2d"),
    (lambda: BayesLoRALinear.from_linear(nn.Conv2d(4, 4, 1)), TypeError, "nn.Linear"),
    (lambda: BayesLoRALinear.from_linear(nn.Linear(4, 4, device="meta")), ValueError, "meta"),
    (lambda: BayesConv2d.from_conv(nn.Linear(4, 4)), TypeError, "nn.Conv2d"),
    (lambda: BayesConv2d.from_conv(nn.Conv2d(4, 4, 3, padding_mode="circular")), ValueError, "padding_mode"),
    (lambda: BayesConv2d(4, 4, 3, estimator="flipout"), ValueError, "estimator"),
    (lambda: BayesConv2d(4, 4, 3, prior_dtype=torch.int8), TypeError, "prior_dtype"),
])
def test_layer_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("make, x", [
    (lambda: BayesConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), sigma_init=0.1), torch.randn(2, 3, 6, 6)),
    (lambda: BayesLoRALinear.from_linear(nn.Linear(8, 6), bayes="A"), torch.randn(4, 8)),
    (lambda: BayesLoRAConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1)), torch.randn(2, 3, 6, 6)),
])
def test_layers_compile_with_fullgraph_and_give_the_eager_result(make, x):
    torch._dynamo.reset()
    layer = make()
    if hasattr(layer, "lora_B"):
        perturb_factors(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        a = compiled(x)
        torch.manual_seed(1)
        b = layer(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_layers_move_and_cast_like_any_module():
    torch.manual_seed(0)
    model = nn.Sequential(BayesConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1)),
                          BayesLoRAConv2d.from_conv(nn.Conv2d(4, 4, 1)), nn.Flatten(),
                          BayesLoRALinear.from_linear(nn.Linear(4 * 25, 6), bayes="A"))
    model.to(torch.float64)
    assert {t.dtype for t in [*model.parameters(), *model.buffers()]} == {torch.float64}
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert model(x).dtype == torch.float64 and model.eval()(x).dtype == torch.float64
    model.half().float().to("cpu")
    assert model[0].prior_mu.dtype == torch.float32 and model[3].lora_rho.dtype == torch.float32
