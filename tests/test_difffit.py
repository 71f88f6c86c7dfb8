"""bnn_diffusion.difffit: trainable set, scale factors on residual branches, merge back to a plain model."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

import bnn_diffusion as bd
from bnn_diffusion import difffit
from bnn_diffusion.difffit import ScaledLinear

from tiny_models import MODELS, assert_same, build, run

# What DiffFit trains besides the biases and the gammas, and which layers get a gamma, written out per model
# independently of difffit's rules (fullmatch on parameter / module names).
_NORMS = r"(.*\.)?(norm\d?|conv_norm_out)\.weight"
_TEXT_AND_TIME = r"context_embedder\.weight|time_text_embed\.(text_embedder|timestep_embedder)\.linear_[12]\.weight"
EXPECTED_WEIGHTS = {
    "unet": f"{_NORMS}|time_embedding\\.linear_[12]\\.weight",
    "dit": r"transformer_blocks\.\d\.norm1\.emb\.(class_embedder\.embedding_table|timestep_embedder\.linear_[12])"
           r"\.weight",
    "sd3": _TEXT_AND_TIME,
    "flux": f"{_TEXT_AND_TIME}|.*\\.attn\\.norm_(added_)?[qk]\\.weight",
}
EXPECTED_SCALED = {
    "unet": (r".*\.transformer_blocks\.0\.(attn[12]\.to_out\.0|ff\.net\.2)", 4 * 3),
    "dit": (r"transformer_blocks\.\d\.(attn1\.to_out\.0|ff\.net\.2)", 2 * 2),
    # SD3's last block is context_pre_only: no text-stream attention output, no ff_context
    "sd3": (r"transformer_blocks\.0\.(attn\.to_out\.0|attn\.to_add_out|ff\.net\.2|ff_context\.net\.2)"
            r"|transformer_blocks\.1\.(attn\.to_out\.0|ff\.net\.2)", 4 + 2),
    "flux": (r"transformer_blocks\.0\.(attn\.to_out\.0|attn\.to_add_out|ff\.net\.2|ff_context\.net\.2)"
             r"|single_transformer_blocks\.0\.proj_out", 4 + 1),
}


def perturb_trainable(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("kind", MODELS)
def test_trainable_set_and_counts_are_exact(kind):
    model, _ = build(kind)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    regex, count = EXPECTED_SCALED[kind]
    expected_scaled = [name for name in linears if re.fullmatch(regex, name)]
    assert len(expected_scaled) == count
    original_names = [name for name, _ in model.named_parameters()]
    expected = [n for n in original_names if n.endswith(".bias") or re.fullmatch(EXPECTED_WEIGHTS[kind], n)]
    expected_numel = (sum(p.numel() for n, p in model.named_parameters() if n in expected)
                      + sum(linears[n].out_features for n in expected_scaled))

    names = difffit.prepare(model)
    assert [n for n, _ in difffit.scaled_layers(model)] == expected_scaled
    assert sorted(names) == sorted(expected + [f"{n}.gamma" for n in expected_scaled])
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_numel
    for name in expected_scaled:
        layer = model.get_submodule(name)
        assert isinstance(layer, ScaledLinear) and torch.equal(layer.gamma, torch.ones(layer.out_features))
        assert layer.weight is linears[name].weight  # shared, not copied
    if kind == "dit":
        # per block (dim 16): gammas 16 + 16; class table 11 x 16 and timestep MLP 256 x 16 + 16 x 16 = 4528;
        # biases q/k/v/out 4 x 16, ff 64 + 16, adaLN 96, timestep MLP 16 + 16 = 272.  Model: pos_embed 16,
        # proj_out_1 32, proj_out_2 32.
        assert expected_numel == 2 * (32 + 4528 + 272) + 80


@pytest.mark.parametrize("kind", MODELS)
def test_outputs_unchanged_at_init_and_gradients_only_to_the_trainable_set(kind):
    model, inputs = build(kind)
    reference = copy.deepcopy(model).eval()
    trainable = set(difffit.prepare(model))
    model.eval()
    with torch.no_grad():
        assert_same(run(model, inputs), run(reference, inputs))
    model.train()
    run(model, inputs).square().mean().backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None and not param.requires_grad, name
    # the gammas get a gradient of their own: one SGD step moves them
    gammas = [m.gamma for _, m in difffit.scaled_layers(model)]
    assert all(g.grad.abs().sum() > 0 for g in gammas)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(g, torch.ones_like(g)) for g in gammas)


@pytest.mark.parametrize("kind", MODELS)
def test_merge_folds_gamma_into_plain_linears(kind):
    model, inputs = build(kind)
    pristine = copy.deepcopy(model)
    keys = set(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    originals = {name: model.get_submodule(name) for name in
                 (n for n, m in model.named_modules() if isinstance(m, nn.Linear))}
    difffit.prepare(model)
    scaled = [n for n, _ in difffit.scaled_layers(model)]
    assert set(model.state_dict()) == keys | {f"{n}.gamma" for n in scaled}
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = run(model, inputs)
    assert difffit.merge(model) == scaled
    assert not difffit.scaled_layers(model)
    for name in scaled:  # the very modules that were wrapped, now holding the folded weights
        assert model.get_submodule(name) is originals[name] and type(originals[name]) is nn.Linear
    assert set(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        assert_same(run(model, inputs), expected)
        pristine.load_state_dict(model.state_dict())
        assert_same(run(pristine.eval(), inputs), expected)


def test_scaled_linear_forward_merge_and_dtypes():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = ScaledLinear(linear)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), linear(x))
    with torch.no_grad():
        layer.gamma.copy_(torch.linspace(0.5, 1.5, 5))
    y = layer(x)
    torch.testing.assert_close(y, linear(x) * layer.gamma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert "gamma(mean=1" in repr(layer) and "out_features=5" in repr(layer)
    plain = layer.to_linear()
    assert plain is linear
    torch.testing.assert_close(plain(x), y, rtol=1e-6, atol=1e-6)
    no_bias = ScaledLinear(nn.Linear(6, 5, bias=False))
    with torch.no_grad():
        no_bias.gamma.fill_(2.0)
    out = no_bias(x)
    assert no_bias.to_linear().bias is None
    torch.testing.assert_close(no_bias.to_linear()(x), out)


def test_gamma_trains_over_a_bfloat16_layer():
    """gamma is float32 over a bfloat16 weight: one Adam step of 5e-4 moves it (in bfloat16, 1.0 + 5e-4 is 1.0),
    and the output keeps the layer's dtype."""
    torch.manual_seed(0)
    layer = ScaledLinear(nn.Linear(6, 5).to(torch.bfloat16))
    assert layer.gamma.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    assert ScaledLinear(nn.Linear(6, 5).double()).gamma.dtype == torch.float64
    optimizer = torch.optim.AdamW([layer.gamma], lr=5e-4, weight_decay=0)
    y = layer(torch.randn(3, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    optimizer.step()
    assert (layer.gamma - 1).abs().min() > 4e-4


def test_prepare_twice_keeps_the_gammas_and_training_under_autocast_works():
    model, inputs = build("dit")
    names = difffit.prepare(model)
    perturb_trainable(model)
    gammas = {n: m.gamma.detach().clone() for n, m in difffit.scaled_layers(model)}
    assert difffit.prepare(model) == names
    assert all(torch.equal(m.gamma, gammas[n]) for n, m in difffit.scaled_layers(model))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(model, inputs).float().square().mean()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert all(m.gamma.dtype == torch.float32 for _, m in difffit.scaled_layers(model))


def test_errors():
    with pytest.raises(TypeError, match="model"):
        difffit.prepare("unet")
    with pytest.raises(TypeError, match="model"):
        difffit.merge(None)
    with pytest.raises(ValueError, match="no transformer block.*BasicTransformerBlock"):
        difffit.prepare(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(TypeError, match="nn.Linear"):
        ScaledLinear(nn.Conv2d(2, 2, 1))
    model, _ = build("dit")
    bd.patch(model, targets=["attn1.to_out.0"])
    with pytest.raises(TypeError, match="adapter layers.*transformer_blocks.0.attn1.to_out.0"):
        difffit.prepare(model)
    model, _ = build("dit")  # an adapter off the scaled branches would be frozen silently
    bd.patch(model, targets=["attn1.to_q"])
    with pytest.raises(TypeError, match="adapter layers.*attn1.to_q"):
        difffit.prepare(model)
    assert all(layer.weight_mu.requires_grad and layer.weight_rho.requires_grad
               for _, layer in bd.bayesian_modules(model))
    assert difffit.merge(nn.Linear(2, 2)) == []


def test_norm_and_embedding_rules():
    # leaf norms by class name, torch's batch norms; adaptive norms are not leaves; embeddings by name or type
    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    assert difffit._is_norm(MyRMSNorm()) and difffit._is_norm(nn.BatchNorm2d(3))
    assert difffit._is_norm(nn.GroupNorm(2, 4)) and not difffit._is_norm(nn.Linear(2, 2))
    adaptive = diffusers_module("normalization").AdaLayerNormZero(8)
    assert not difffit._is_norm(adaptive)
    assert difffit._is_condition_embedding("context_embedder", nn.Linear(2, 2))
    assert difffit._is_condition_embedding("x", diffusers_module("embeddings").TimestepEmbedding(4, 8))
    assert not difffit._is_condition_embedding("proj_out", nn.Linear(2, 2))


def diffusers_module(name):
    import importlib

    return importlib.import_module(f"diffusers.models.{name}")
