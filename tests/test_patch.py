"""bnn_diffusion.patch / kl_loss / merge / unpatch with every preset, on tiny diffusers models built from configs.

The models (UNet2DConditionModel, DiT, SD3 and Flux transformers) are a few hundred thousand parameters at most, so
every test runs in seconds on CPU whatever backend bnn_kernels picks for CPU tensors.  Layer-level tests of the conv
and LoRA layers are in test_layers.py, save_lora in test_export.py.
"""
from __future__ import annotations

import copy
import math
import os
import pathlib
import pickle
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnn_diffusion as bd
import bnn_kernels as bk
from bnn_diffusion import BayesConv2d, BayesLinear, BayesLoRAConv2d, BayesLoRALinear

from tiny_models import MODELS, assert_same, build, run

# The paper-dreambooth set, written out independently of the preset's patterns.
_BLOCK_SELF_ATTN_FF = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
_JOINT = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
EXPECTED_DREAMBOOTH = {  # (regex a name must fullmatch after its prefix, how many layers)
    "unet": (r"(down_blocks\.0|up_blocks\.1|mid_block)\.attentions\.\d\." + _BLOCK_SELF_ATTN_FF, 4 * 6),
    "dit": (_BLOCK_SELF_ATTN_FF, 2 * 6),
    "sd3": (_JOINT, 2 * 6),
    "flux": (f"({_JOINT}|{_SINGLE})", 6 + 5),
}
# The LoRA presets: every attention projection (UNet / DiT: attn1 and attn2; SD3 / Flux: both streams of the joint
# attention; Flux single blocks: q/k/v).  SD3's last block is context_pre_only: no to_add_out there.
_UNET_ATTN = r"(down_blocks\.0|up_blocks\.1|mid_block)\.attentions\.\d\.transformer_blocks\.\d+\.attn[12]\."
_JOINT_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
EXPECTED_LORA = {
    "unet": (_UNET_ATTN + r"(to_q|to_k|to_v|to_out\.0)", 4 * 8),
    "dit": (r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)", 2 * 4),
    "sd3": (_JOINT_ATTN, 8 + 7),
    "flux": (rf"({_JOINT_ATTN}|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))", 8 + 3),
}
LORA_PRESETS = ("paper-lora", "bayes-lora")
# (model, preset) pairs for the tests that run the model in train mode: every model with the paper's DreamBooth set,
# and the other presets on a few (the UNet under "all" has ~60 convs: seconds per step on two cores).
SAMPLING_CASES = ([(kind, "paper-dreambooth") for kind in MODELS]
                  + [("dit", "paper-lora"), ("flux", "bayes-lora"), ("dit", "all")])
TRAINING_CASES = SAMPLING_CASES + [("unet", "paper-lora"), ("sd3", "paper-lora"), ("dit", "bayes-lora"), ("sd3", "all")]


def patch_mixed(model):
    """Every kind of Bayesian layer in one DiT: a LoRA conv (the patch embedding), LoRA linears with B and with A
    Bayesian, full-rank linears."""
    return (bd.patch(model, "paper-lora", targets=["pos_embed.proj", "attn1.to_q", "attn1.to_k"], rank=2)
            + bd.patch(model, "bayes-lora", targets=["attn1.to_v"], lora_alpha=8)
            + bd.patch(model, "paper-dreambooth", targets=["ff.net.2", "proj_out_2"]))


def linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def layer_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def is_lora(module):
    return isinstance(module, (BayesLoRALinear, BayesLoRAConv2d))


def param_buffer_bytes(model):
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers()))


def perturb_posterior(model, seed=3):
    """Move every posterior away from its init, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in bd.bayesian_modules(model):
            trained = [module.lora_A, module.lora_B] if is_lora(module) else [module.weight_mu, module.bias]
            for tensor in trained:
                if tensor is not None:
                    tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
            module.rho.mul_(torch.rand(module.rho.shape, generator=gen) + 0.5)


def closed_form_kl(model):
    """Sum over Bayesian modules of log(sp/s) + (s^2 + (mu - mp)^2) / (2 sp^2) - 1/2, in float64."""
    total = 0.0
    for _, m in bd.bayesian_modules(model):
        rho = m.rho.detach().double()
        sigma = F.softplus(rho) if m.sigma_param == "softplus" else rho.clamp_min(1e-7)
        diff = m.mu.detach().double() - (0 if m.prior_mu is None else m.prior_mu.double())
        sp = m.prior_sigma
        total += (math.log(sp) - torch.log(sigma) + (sigma**2 + diff**2) / (2 * sp**2) - 0.5).sum().item()
    return total


# --------------------------------------------------------------------------------------------------------------
# presets and targets
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODELS)
def test_paper_dreambooth_patches_exactly_the_expected_names(kind):
    model, _ = build(kind)
    before = linear_names(model)
    regex, count = EXPECTED_DREAMBOOTH[kind]
    expected = [name for name in before if re.fullmatch(regex, name)]
    names = bd.patch(model, "paper-dreambooth")
    assert names == expected and len(names) == count
    for name in names:
        assert isinstance(model.get_submodule(name), BayesLinear)
    assert {n for n in linear_names(model)} == set(before) - set(names)
    # never cross-attention (UNet attn2), never the text stream of joint attention
    assert not [n for n in names if ".attn2." in n or "add_" in n or "ff_context" in n or "to_add_out" in n]


@pytest.mark.parametrize("kind", MODELS)
def test_all_linear_patches_every_linear(kind):
    model, inputs = build(kind)
    before = linear_names(model)
    assert bd.patch(model, "all-linear") == before
    assert linear_names(model) == []
    model.train()
    assert torch.isfinite(run(model, inputs)).all()


@pytest.mark.parametrize("kind", MODELS)
def test_all_patches_every_linear_and_conv(kind):
    model, _ = build(kind)
    before = {name: type(model.get_submodule(name)) for name in layer_names(model)}
    names = bd.patch(model, "all")
    assert names == list(before) and layer_names(model) == []
    expected = {nn.Linear: BayesLinear, nn.Conv2d: BayesConv2d}
    assert all(type(model.get_submodule(n)) is expected[before[n]] for n in names)
    assert (kind == "flux") == (BayesConv2d not in {type(model.get_submodule(n)) for n in names})  # Flux: no conv


@pytest.mark.parametrize("preset", LORA_PRESETS)
@pytest.mark.parametrize("kind", MODELS)
def test_lora_presets_patch_exactly_the_expected_names(kind, preset):
    model, _ = build(kind)
    before = linear_names(model)
    regex, count = EXPECTED_LORA[kind]
    expected = [name for name in before if re.fullmatch(regex, name)]
    names = bd.patch(model, preset)
    assert names == expected and len(names) == count
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, BayesLoRALinear) and layer.rank == 4 and layer.scale == 1.0
        assert layer.bayes == ("B" if preset == "paper-lora" else "A")
        assert layer.mu is (layer.lora_B if preset == "paper-lora" else layer.lora_A)
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))  # B mean starts at 0 in both presets
        assert layer.sigma_param == "direct" and layer.prior_sigma == 0.01 and torch.all(layer.sigma == 0.01)
    # explicit options override the preset's
    model, _ = build(kind)
    names = bd.patch(model, preset, rank=2, lora_alpha=8, bayes="A", sigma_param="softplus")
    layer = model.get_submodule(names[0])
    assert (layer.rank, layer.scale, layer.bayes, layer.lora_rho.shape) == (2, 4.0, "A", layer.lora_A.shape)


def test_lora_preset_targets_reach_convs():
    model, _ = build("unet")
    names = bd.patch(model, "paper-lora", targets=["conv_in", "resnets.0.conv1", "attn1.to_q"], rank=3)
    convs = [n for n in names if isinstance(model.get_submodule(n), BayesLoRAConv2d)]
    # conv_in + resnets.0.conv1 of the 2 down blocks, the mid block and the 2 up blocks
    assert convs[0] == "conv_in" and len(convs) == 1 + 5
    layer = model.get_submodule("conv_in")
    assert layer.lora_A.shape == (3, 4, 3, 3) and layer.lora_B.shape == (32, 3, 1, 1)


def test_presets_combine_in_one_model():
    model, inputs = build("dit")
    names = patch_mixed(model)
    kinds = {(type(model.get_submodule(n)).__name__, getattr(model.get_submodule(n), "bayes", None)) for n in names}
    assert kinds == {("BayesLoRAConv2d", "B"), ("BayesLoRALinear", "B"), ("BayesLoRALinear", "A"),
                     ("BayesLinear", None)}
    assert model.get_submodule("transformer_blocks.0.attn1.to_v").scale == 2.0


def test_targets_override_the_preset_glob_and_regex():
    model, _ = build("unet")
    names = bd.patch(model, targets=["attn2.to_k", "re:attn[12]\\.to_v"])
    assert len(names) == 4 * 3
    assert all(re.search(r"\.attn2\.to_k$|\.attn[12]\.to_v$", n) for n in names)
    # suffixes are matched at dot boundaries: "to_q" matches attn1.to_q / attn2.to_q, "o_q" matches nothing
    model, _ = build("unet")
    assert len(bd.patch(model, targets="to_q")) == 4 * 2
    model, _ = build("unet")
    with pytest.raises(ValueError, match="o_q"):
        bd.patch(model, targets=["o_q"])


def test_patching_more_layers_later_keeps_the_first_ones():
    model, _ = build("unet")
    first = bd.patch(model, "paper-dreambooth")
    second = bd.patch(model, targets=["attn2.to_q"])
    assert len(second) == 4 and not set(first) & set(second)
    assert len(bd.bayesian_modules(model)) == len(first) + len(second)
    with pytest.raises(ValueError, match="attn1.to_q \\(already Bayesian\\)"):
        bd.patch(model, "paper-dreambooth")


# --------------------------------------------------------------------------------------------------------------
# forward semantics
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["all-linear", "all", *LORA_PRESETS])
@pytest.mark.parametrize("kind", MODELS)
def test_eval_output_equals_unpatched_model_at_init(kind, preset):
    model, inputs = build(kind)
    reference = copy.deepcopy(model).eval()
    bd.patch(model, preset)
    model.eval()
    with torch.no_grad():
        assert_same(run(model, inputs), run(reference, inputs))


@pytest.mark.parametrize("kind, preset", SAMPLING_CASES)
def test_train_forward_samples_and_is_reproducible_under_manual_seed(kind, preset):
    model, inputs = build(kind)
    bd.patch(model, preset, sigma_init=0.05)
    perturb_posterior(model)  # B != 0, so that noise on A (bayes-lora) reaches the output
    model.eval()
    with torch.no_grad():
        mean = run(model, inputs)
        model.train()
        torch.manual_seed(1)
        a = run(model, inputs)
        torch.manual_seed(1)
        b = run(model, inputs)
        torch.manual_seed(2)
        c = run(model, inputs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, mean)


def test_layer_forward_is_the_kernel_op_with_a_seed_from_torch_rng():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)
    for sigma_param, estimator in [("direct", "reparam"), ("softplus", "reparam"), ("softplus", "lrt")]:
        layer = BayesLinear.from_linear(linear, sigma_init=0.03, prior_sigma=0.02, sigma_param=sigma_param,
                                        estimator=estimator)
        torch.manual_seed(5)
        y = layer(x)
        torch.manual_seed(5)
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        y_ref, kl_ref = bk.bayes_linear(x, layer.weight_mu, layer.weight_rho, layer.bias, seed=seed,
                                        prior_mu=linear.weight, prior_sigma=0.02, sigma_param=sigma_param,
                                        estimator=estimator)
        assert torch.equal(y, y_ref) and torch.equal(layer.last_kl, kl_ref)
        if estimator == "reparam":  # one weight sample mu + sigma * eps, eps = philox_normal(seed)
            weight = linear.weight + layer.sigma * bk.philox_normal(seed, linear.weight.shape)
            torch.testing.assert_close(y, F.linear(x, weight, linear.bias), atol=1e-5, rtol=1e-5)
    # eval: the mean, last_kl cleared; sample= overrides the mode both ways
    layer.eval()
    assert torch.equal(layer(x), linear(x)) and layer.last_kl is None
    layer.sample = True
    assert not torch.allclose(layer(x), linear(x)) and layer.last_kl is not None
    layer.train()
    layer.sample = False
    assert torch.equal(layer(x), linear(x)) and layer.last_kl is None
    # input in another dtype: the output follows x's dtype in both modes
    layer.sample = None
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.eval()
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_rho_init_gives_sigma_init_under_both_parameterisations():
    linear = nn.Linear(8, 4)
    direct = BayesLinear.from_linear(linear, sigma_init=0.02, sigma_param="direct")
    soft = BayesLinear.from_linear(linear, sigma_init=0.02, sigma_param="softplus")
    assert torch.all(direct.weight_rho == 0.02)
    torch.testing.assert_close(soft.sigma, torch.full((4, 8), 0.02))
    assert soft.weight_rho[0, 0].item() == pytest.approx(math.log(math.expm1(0.02)), rel=1e-6)


def test_extra_repr_shows_shapes_sigma_and_options():
    layer = BayesLinear.from_linear(nn.Linear(8, 4), sigma_init=0.02, estimator="lrt", sigma_param="softplus",
                                    prior_dtype=torch.bfloat16)
    text = repr(layer)
    for part in ("in_features=8", "out_features=4", "bias=True", "estimator=lrt", "sigma_param=softplus",
                 "sigma(mean=0.02", "min=0.02", "max=0.02", "prior_dtype=torch.bfloat16"):
        assert part in text, (part, text)


# --------------------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, preset", SAMPLING_CASES)
@pytest.mark.parametrize("sigma_param", ["direct", "softplus"])
def test_kl_loss_equals_the_closed_form_sum(kind, preset, sigma_param):
    model, inputs = build(kind)
    bd.patch(model, preset, sigma_param=sigma_param, prior_sigma=0.02)
    perturb_posterior(model)
    expected = closed_form_kl(model)
    # no forward yet: computed directly
    assert bd.kl_loss(model).item() == pytest.approx(expected, rel=1e-4)
    model.train()
    run(model, inputs)
    kl = bd.kl_loss(model)
    assert kl.dtype == torch.float32 and kl.dim() == 0 and kl.requires_grad
    assert kl.item() == pytest.approx(expected, rel=1e-4)
    # the train forward left each layer's KL from the op; an eval forward clears it and kl_loss recomputes
    assert all(m.last_kl is not None for _, m in bd.bayesian_modules(model))
    model.eval()
    with torch.no_grad():
        run(model, inputs)
    assert all(m.last_kl is None for _, m in bd.bayesian_modules(model))
    assert bd.kl_loss(model).item() == pytest.approx(expected, rel=1e-4)


def _sum_of_fresh_kl(model) -> float:
    return sum(module.kl().item() for _, module in bd.bayesian_modules(model))


@pytest.mark.parametrize("preset", ["all-linear", "paper-lora"])
def test_kl_loss_is_the_kl_of_the_current_parameters(preset):
    """The op's KL is reused only while it is the current one: written before this step's forward, after the
    optimizer step, or after a forward under no_grad (reentrant checkpointing), kl_loss computes it now; right
    after a sampling forward it is the op's own tensor (no second pass over the weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    bd.patch(model, preset, **({"targets": ["0", "2"]} if preset == "paper-lora" else {}))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    for _ in range(3):  # KL first in the expression: from step 2 on, the last forward's KL is stale
        x = torch.randn(5, 6)
        kl = bd.kl_loss(model)
        assert kl.item() == pytest.approx(_sum_of_fresh_kl(model), rel=1e-5)
        (1e-2 * kl + model(x).square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert bd.kl_loss(model).item() == pytest.approx(_sum_of_fresh_kl(model), rel=1e-5)  # after the step
    model(torch.randn(5, 6))
    (_, first), *_ = bd.bayesian_modules(model)
    assert sum(1 for _ in bd.bayesian_modules(model)) == 2
    reused = bd.kl_loss(model)
    assert reused.grad_fn is not None and first.current_kl() is first.last_kl
    with torch.no_grad():  # as a reentrant checkpoint runs its forward
        model(torch.randn(5, 6))
    kl = bd.kl_loss(model)
    assert kl.requires_grad, "a forward without autograd must not cut the KL's gradient"
    kl.backward()
    assert all(p.grad is not None for p in trainable if p is first.rho)


@pytest.mark.parametrize("update", ["fused-adamw", "data", "accumulate", "separate-backward", "cast"])
def test_kl_loss_after_backward_ran_through_the_forward(update):
    """Once backward has run through a forward, its KL is spent: kl_loss computes the KL afresh, whatever bumps no
    version counter after it (fused AdamW, a ``.data`` write, a cast), and a second backward never runs through
    a spent graph (kl_loss written before the forward with gradient accumulation, or backward on its own)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8))
    bd.patch(model, "all-linear")
    model.train()
    x = torch.randn(5, 6)
    if update in ("accumulate", "separate-backward"):
        for _ in range(2):
            kl = bd.kl_loss(model)  # before the forward: the previous micro-batch's KL is spent
            y = model(x)
            if update == "accumulate":
                (y.square().mean() + 1e-3 * kl).backward()
            else:  # the loss's backward, then the KL's own
                y.square().mean().backward()
                bd.kl_loss(model).backward()
        assert bd.kl_loss(model).item() == pytest.approx(_sum_of_fresh_kl(model), rel=1e-5)
        return
    (model(x).square().mean() + bd.kl_loss(model)).backward()
    if update == "fused-adamw":
        torch.optim.AdamW(model.parameters(), lr=0.5, fused=True).step()
    elif update == "data":
        model[0].weight_mu.data.add_(1.0)
    else:
        model.to(torch.bfloat16)
    kl = bd.kl_loss(model)
    assert kl.item() == pytest.approx(_sum_of_fresh_kl(model), rel=1e-5)
    assert kl.item() != 0.0  # the posterior moved away from the prior
    kl.backward()
    assert model[0].weight_rho.grad.dtype == model[0].weight_rho.dtype


@pytest.mark.parametrize("kind, preset", [("unet", "paper-dreambooth"), ("dit", "paper-lora"), ("dit", "all")])
@pytest.mark.parametrize("sigma_param", ["direct", "softplus"])
def test_kl_is_zero_at_init_when_the_posterior_is_the_prior(kind, preset, sigma_param):
    # mu = prior mean and sigma = prior sigma: log(sp/s) + s^2/(2 sp^2) - 1/2 = 0 + 1/2 - 1/2 per element (the
    # paper's LoRA: B = 0 = its prior mean)
    model, inputs = build(kind)
    bd.patch(model, preset, sigma_init=0.01, prior_sigma=0.01, sigma_param=sigma_param)
    numel = sum(m.mu.numel() for _, m in bd.bayesian_modules(model))
    model.train()
    run(model, inputs)
    assert abs(bd.kl_loss(model).item()) < 1e-6 * numel
    # sigma = 2 prior sigma: log(1/2) + 4/2 - 1/2 per element
    model, _ = build(kind)
    bd.patch(model, preset, sigma_init=0.02, prior_sigma=0.01, sigma_param=sigma_param)
    assert bd.kl_loss(model).item() == pytest.approx(numel * (math.log(0.5) + 1.5), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------
# gradients and freezing
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, preset", TRAINING_CASES)
def test_gradients_reach_mu_rho_bias_and_nothing_frozen(kind, preset):
    model, inputs = build(kind)
    bd.patch(model, preset)
    perturb_posterior(model)  # B != 0: at B = 0 the gradient of A (and of its rho, bayes-lora) is exactly 0
    model.train()
    loss = run(model, inputs).square().mean() + 1e-3 * bd.kl_loss(model)
    loss.backward()
    trained = set()
    for name, module in bd.bayesian_modules(model):
        expected = {"lora_A", "lora_B", "lora_rho"} if is_lora(module) else {"weight_mu", "weight_rho", "bias"}
        for pname, param in module.named_parameters():
            if pname not in expected:  # the frozen base of a LoRA layer
                assert is_lora(module) and not param.requires_grad and param.grad is None, f"{name}.{pname}"
                continue
            trained.add(id(param))
            assert param.requires_grad and param.grad is not None, f"{name}.{pname}"
            assert torch.isfinite(param.grad).all(), f"{name}.{pname}"
            # SD3's last block is context_pre_only: it drops its text-stream output, so the text queries get only
            # the KL's gradient (none for the deterministic factor)
            if not (kind == "sd3" and name == "transformer_blocks.1.attn.add_q_proj"):
                assert param.grad.abs().sum() > 0, f"{name}.{pname}"
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in trained]
    assert others or preset == "all"  # SD3's norms have no affine parameters: "all" leaves nothing else
    for name, param in others:
        assert not param.requires_grad and param.grad is None, name
    # prior means are buffers, never trained
    assert all(m.prior_mu is None or not m.prior_mu.requires_grad for _, m in bd.bayesian_modules(model))


def test_freeze_others_false_leaves_other_parameters_trainable():
    model, _ = build("unet")
    bd.patch(model, "paper-dreambooth", freeze_others=False)
    assert all(p.requires_grad for p in model.parameters())
    # the base of a LoRA layer stays frozen whatever freeze_others says
    model, _ = build("unet")
    names = bd.patch(model, "paper-lora", freeze_others=False)
    base = {f"{n}.{p}" for n in names for p in ("weight", "bias")} & set(dict(model.named_parameters()))
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == base


def test_gradient_checkpointing_recomputes_the_same_noise():
    grads = []
    for checkpointing in (False, True):
        model, inputs = build("unet")
        bd.patch(model, "paper-dreambooth", sigma_init=0.05)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        torch.manual_seed(7)
        run(model, inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------
# merge, unpatch, state dicts
# --------------------------------------------------------------------------------------------------------------

MERGE_CASES = ([(kind, preset) for preset in ("paper-dreambooth", "paper-lora") for kind in MODELS]
               + [("dit", "bayes-lora"), ("unet", "all"), ("dit", "all")])


@pytest.mark.parametrize("kind, preset", MERGE_CASES)
def test_merge_gives_a_plain_model_with_the_posterior_means(kind, preset):
    model, inputs = build(kind)
    pristine = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    types = {name: type(module) for name, module in model.named_modules()}
    names = bd.patch(model, preset)
    perturb_posterior(model)
    model.eval()
    with torch.no_grad():
        expected = run(model, inputs)
    assert bd.merge(model) == names
    assert not bd.bayesian_modules(model)
    assert all(type(model.get_submodule(n)) is types[n] for n in names)
    assert sum(p.numel() for p in model.parameters()) == n_params and set(model.state_dict()) == keys
    with torch.no_grad():
        merged = run(model, inputs)
        if preset in LORA_PRESETS:  # W + scale * B @ A folded into one weight: equal up to rounding
            assert_same(merged, expected)
        else:  # the same mean tensors run through the same ops
            assert torch.equal(merged, expected)
        # an unpatched model loaded with the merged weights gives the same outputs
        pristine.load_state_dict(model.state_dict())
        assert_same(run(pristine.eval(), inputs), expected)


@pytest.mark.parametrize("preset", ["paper-dreambooth", "paper-lora"])
def test_merge_hands_back_the_very_modules_patch_replaced(preset):
    """A forward hook registered before patching (and any attribute set on the module) works again after merge:
    the merged model's layers are the original module objects, holding the posterior means."""
    model, inputs = build("unet")
    originals = dict(model.named_modules())
    calls = []
    for module in originals.values():
        if type(module) in (nn.Linear, nn.Conv2d):
            module.register_forward_hook(lambda module, args, output: calls.append(module))
    names = bd.patch(model, preset)
    perturb_posterior(model)
    bd.merge(model)
    assert all(model.get_submodule(name) is originals[name] for name in names)
    with torch.no_grad():
        run(model.eval(), inputs)
    assert {id(module) for module in calls} >= {id(originals[name]) for name in names}


UNPATCH_CASES = ([(kind, "all-linear") for kind in MODELS]
                 + [("unet", "paper-lora"), ("flux", "bayes-lora"), ("dit", "all"), ("sd3", "all")])


@pytest.mark.parametrize("kind, preset", UNPATCH_CASES)
def test_unpatch_restores_the_original_modules_and_weights(kind, preset):
    model, inputs = build(kind)
    reference = copy.deepcopy(model).eval()
    originals = {name: model.get_submodule(name) for name in layer_names(model)}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = bd.patch(model, preset)
    # a few training steps change mu and bias (LoRA: the factors)
    perturb_posterior(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        run(model, inputs).square().mean().backward()
        opt.step()
    assert bd.unpatch(model) == names
    assert not bd.bayesian_modules(model)
    for name in names:
        assert model.get_submodule(name) is originals[name]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    model.eval()
    with torch.no_grad():
        assert_same(run(model, inputs), run(reference, inputs))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compiled", "data-parallel"])
def test_patch_and_unpatch_through_a_wrapper(wrap):
    """patch on the model and unpatch on its torch.compile / DDP wrapper (or the other way round) give back every
    parameter patch froze: both work on the model inside."""
    for patch_wrapped in (False, True):
        model, _ = build("unet")
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        names = bd.patch(wrap(model) if patch_wrapped else model, "paper-dreambooth")
        assert names and all(not n.startswith(("_orig_mod.", "module.")) for n in names)
        assert [n for n, _ in bd.bayesian_modules(wrap(model))] == names
        bd.unpatch(model if patch_wrapped else wrap(model))
        assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable


def test_unpatch_with_a_bfloat16_prior_restores_the_rounded_weights():
    model, _ = build("dit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = bd.patch(model, "paper-dreambooth", prior_dtype=torch.bfloat16)
    assert all(model.get_submodule(n).prior_mu.dtype == torch.bfloat16 for n in names)
    bd.unpatch(model)
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype
        if any(key.startswith(n + ".") for n in names):
            assert torch.equal(value, state[key].bfloat16().float()), key
        else:
            assert torch.equal(value, state[key]), key


STATE_KEYS = {BayesLinear: ("weight_mu", "weight_rho", "bias", "prior_mu", "prior_bias"),
              BayesConv2d: ("weight_mu", "weight_rho", "bias", "prior_mu", "prior_bias"),
              BayesLoRALinear: ("weight", "bias", "lora_A", "lora_B", "lora_rho"),
              BayesLoRAConv2d: ("weight", "bias", "lora_A", "lora_B", "lora_rho")}


@pytest.mark.parametrize("kind, preset, targets", [
    ("unet", "paper-dreambooth", None), ("flux", "paper-dreambooth", None), ("dit", "all", None),
    ("unet", "paper-lora", ["attn1.to_q", "attn2.to_out.0", "conv_in", "conv_out"]), ("sd3", "bayes-lora", None)])
def test_state_dict_of_a_patched_model_loads_into_a_freshly_patched_one(kind, preset, targets):
    model, inputs = build(kind)
    names = bd.patch(model, preset, targets=targets, sigma_param="softplus")
    perturb_posterior(model)
    state = model.state_dict()
    for name in names:  # the documented keys, nothing else
        layer = model.get_submodule(name)
        assert {k for k in state if k.startswith(name + ".")} == {
            f"{name}.{key}" for key in STATE_KEYS[type(layer)] if "bias" not in key or layer.bias is not None}
    fresh, _ = build(kind)
    bd.patch(fresh, preset, targets=targets, sigma_param="softplus")
    fresh.load_state_dict(state, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(fresh, mode)()
        with torch.no_grad():
            torch.manual_seed(11)
            a = run(model, inputs)
            torch.manual_seed(11)
            b = run(fresh, inputs)
        assert_same(a, b)
    assert bd.kl_loss(fresh).item() == pytest.approx(bd.kl_loss(model).item(), rel=1e-6)


def test_deepcopy_and_pickle_after_a_train_forward():
    model, inputs = build("dit")
    bd.patch(model, "paper-dreambooth")
    model.train()
    run(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(m.last_kl is None for _, m in bd.bayesian_modules(clone))
        clone.eval()
        model.eval()
        with torch.no_grad():
            assert_same(run(clone, inputs), run(model, inputs))
        model.train()
        assert bd.unpatch(clone)  # the kept original modules travel with the copy


# --------------------------------------------------------------------------------------------------------------
# training under autocast; estimator; memory
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, preset, estimator", [
    ("unet", "paper-dreambooth", "reparam"), ("unet", "paper-dreambooth", "lrt"), ("dit", "paper-lora", "reparam"),
    ("flux", "bayes-lora", "lrt"), ("dit", "all", "lrt")])
def test_training_steps_under_bfloat16_autocast(kind, preset, estimator):
    model, inputs = build(kind)
    bd.patch(model, preset, sigma_param="softplus", estimator=estimator)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    target = torch.randn_like(run(model.eval(), inputs))
    model.train()
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, inputs)
            loss = F.mse_loss(out.float(), target) + 1e-4 * bd.kl_loss(model)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    layers = [m for _, m in bd.bayesian_modules(model)]
    assert all(m.mu.dtype == torch.float32 and m.mu.grad.dtype == torch.float32 for m in layers)
    for name, param in model.named_parameters():
        if name in start:
            assert not torch.equal(param, start[name]), name
    assert torch.isfinite(bd.kl_loss(model))


@pytest.mark.parametrize("preset", ["paper-dreambooth", "mixed"])
def test_compiled_training_steps_match_eager(preset):
    # aot_eager traces the layers through dynamo and AOT autograd without a C++ compile step; inductor would
    # replace torch.randint by its own RNG (reproducible under manual_seed, but other seeds than eager).
    torch._dynamo.reset()
    layer = BayesLinear.from_linear(nn.Linear(16, 8), sigma_init=0.1)
    x = torch.randn(4, 16)
    compiled_layer = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        a = compiled_layer(x)
        torch.manual_seed(1)
        b = layer(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)

    losses = []
    for compiled in (False, True):
        model, inputs = build("dit")
        if preset == "mixed":
            patch_mixed(model)
        else:
            bd.patch(model, preset, sigma_init=0.05)
        perturb_posterior(model)
        model.train()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses.append([])
        for step in range(2):
            opt.zero_grad()
            torch.manual_seed(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(**inputs).sample.float().square().mean() + 1e-3 * bd.kl_loss(model)
            loss.backward()
            opt.step()
            losses[-1].append(loss.item())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-5)


CPU_BACKENDS = [b for b in bk.backends()
                if b in ("cpu", "reference") or (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1")]


@pytest.mark.parametrize("preset", ["paper-dreambooth", "mixed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_kernel_backend_does_not_change_a_training_step(backend, preset):
    # the integration only calls bnn_kernels' public API: every backend gives the same step (same noise stream)
    results = []
    for name in ("reference", backend):
        model, inputs = build("dit")
        if preset == "mixed":
            patch_mixed(model)
        else:
            bd.patch(model, preset, sigma_init=0.05, sigma_param="softplus")
        perturb_posterior(model)
        model.train()
        with bk.use_backend(name):
            torch.manual_seed(4)
            out = run(model, inputs)
            (out.square().mean() + 1e-3 * bd.kl_loss(model)).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-4, msg=name)


def test_layer_autograd_keeps_no_weight_sized_tensor_of_its_own():
    layer = BayesLinear.from_linear(nn.Linear(48, 64))
    own = {t.data_ptr() for t in (layer.weight_mu, layer.weight_rho, layer.prior_mu)}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(5, 48, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    big = [t for t in saved if t.numel() >= layer.weight_mu.numel() and t.data_ptr() not in own]
    assert not big, [tuple(t.shape) for t in big]
    (y.sum() + layer.last_kl).backward()
    assert layer.weight_rho.grad is not None and x.grad is not None


@pytest.mark.parametrize("kind, preset, prior_dtype", [
    ("unet", "paper-dreambooth", None), ("unet", "paper-dreambooth", torch.bfloat16), ("sd3", "paper-dreambooth", None),
    ("sd3", "paper-dreambooth", torch.bfloat16), ("unet", "all", None), ("unet", "all", torch.bfloat16),
    ("unet", "paper-lora", None), ("sd3", "bayes-lora", None)])
def test_patching_adds_only_sigma_and_the_prior_means(kind, preset, prior_dtype):
    model, _ = build(kind)
    before = param_buffer_bytes(model)
    weights = {n: (model.get_submodule(n).weight.data_ptr(), model.get_submodule(n).weight.nbytes)
               for n in layer_names(model)}
    names = bd.patch(model, preset, prior_dtype=prior_dtype)
    added = 0
    for name in names:
        layer = model.get_submodule(name)
        if is_lora(layer):  # the base IS the pretrained weight; the factors and sigma are new, the prior mean is 0
            added += layer.lora_A.nbytes + layer.lora_B.nbytes + layer.lora_rho.nbytes
            assert layer.weight.data_ptr() == weights[name][0] and layer.prior_mu is None
        else:
            added += layer.weight_rho.nbytes + layer.prior_mu.nbytes
            added += 0 if layer.prior_bias is None else layer.prior_bias.nbytes
            if prior_dtype is None:  # the prior IS the pretrained weight: shared, not copied
                assert layer.prior_mu.data_ptr() == weights[name][0]
                assert layer.weight_rho.nbytes + layer.prior_mu.nbytes == 2 * weights[name][1]
            else:
                assert layer.prior_mu.nbytes * 2 == weights[name][1]
        # the module kept for unpatch holds no memory
        kept = layer.__dict__["_original"]
        assert all(t.device.type == "meta" for t in kept.parameters())
    assert param_buffer_bytes(model) - before == added
    # merging gives the bytes of the unpatched model back
    bd.merge(model)
    assert param_buffer_bytes(model) == before


# --------------------------------------------------------------------------------------------------------------
# PEFT-wrapped layers
# --------------------------------------------------------------------------------------------------------------

class TunerLayer(nn.Module):
    """The structure of a PEFT LoRA tuner layer: the wrapped layer at .base_layer, adapters in ModuleDicts."""

    def __init__(self, base: nn.Linear, r: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_layers_wrapped_by_peft_are_looked_through():
    model, inputs = build("unet")
    for name, module in list(model.named_modules()):
        for attr in ("to_q", "to_k"):
            if name.endswith("attn1") and isinstance(getattr(module, attr), nn.Linear):
                setattr(module, attr, TunerLayer(getattr(module, attr)))
    model.eval()
    with torch.no_grad():
        expected = run(model, inputs)
    names = bd.patch(model, "paper-dreambooth")
    assert len(names) == 24 and sum(n.endswith(".base_layer") for n in names) == 8
    assert not [n for n in names if "lora_" in n]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        assert_same(run(model, inputs), expected)
    assert not [n for n in bd.patch(model, "all-linear") if "lora_" in n]
    bd.unpatch(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("base_layer"))
    with torch.no_grad():
        assert_same(run(model, inputs), expected)


def test_real_peft_adapter_is_looked_through():
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = build("unet")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    model.eval()
    with torch.no_grad():
        expected = run(model, inputs)
    names = bd.patch(model, "paper-dreambooth", freeze_others=False)
    assert len(names) == 24 and sum(n.endswith(".base_layer") for n in names) == 16
    with torch.no_grad():
        assert_same(run(model, inputs), expected)
    model.train()
    run(model, inputs).square().mean().backward()
    assert all(m.weight_rho.grad is not None for _, m in bd.bayesian_modules(model))


@pytest.mark.parametrize("preset", ["all", "paper-lora"])
def test_real_peft_adapter_on_convs_is_looked_through(preset):
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = build("unet")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["conv1", "to_q"]))
    model.eval()
    with torch.no_grad():
        expected = run(model, inputs)
    names = bd.patch(model, preset, targets=["resnets.0.conv1", "attn2.to_q"], freeze_others=False)
    assert len(names) == 5 + 4 and all(n.endswith(".base_layer") for n in names)
    conv = model.get_submodule("down_blocks.0.resnets.0.conv1.base_layer")
    assert isinstance(conv, BayesLoRAConv2d if preset == "paper-lora" else BayesConv2d)
    with torch.no_grad():
        assert_same(run(model, inputs), expected)
    model.train()
    run(model, inputs).square().mean().backward()
    assert all(m.rho.grad is not None for _, m in bd.bayesian_modules(model))


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(preset="paper"), ValueError, "unknown preset"),
    (dict(preset=bd.Preset("mine", ("*",), "full", (nn.Conv1d,), "")), ValueError, "kind 'full'.*Conv1d"),
    (dict(preset=bd.Preset("mine", ("*",), "sparse", (nn.Linear,), "")), ValueError, "kind 'sparse'"),
    (dict(targets=["attn1.to_q", "atn1.to_k"]), ValueError, r"\['atn1.to_k'\] matched no Linear"),
    (dict(targets=["conv_in"]), ValueError, "cannot be patched.*conv_in \\(Conv2d\\)"),
    (dict(targets=[]), ValueError, "at least one"),
    (dict(targets=[3]), TypeError, "targets"),
    (dict(targets=["re:attn1.("]), ValueError, "regular expression"),
    (dict(sigma_param="exp"), ValueError, "sigma_param"),
    (dict(estimator="flipout"), ValueError, "estimator"),
    (dict(sigma_init=0.0), ValueError, "sigma_init"),
    (dict(prior_sigma=-1.0), ValueError, "prior_sigma"),
    (dict(prior_sigma="0.01"), TypeError, "prior_sigma"),
    (dict(rank=0), ValueError, "rank"),
    (dict(bayes="C"), ValueError, "bayes"),
    (dict(preset="paper-lora", lora_alpha=0.0), ValueError, "lora_alpha"),
    (dict(prior_dtype=torch.int8), TypeError, "prior_dtype"),
    (dict(preset="paper-lora", lora_dtype="float32"), TypeError, "lora_dtype"),
])
def test_bad_arguments_raise_before_touching_the_model(kwargs, error, match):
    model, _ = build("unet")
    state = model.state_dict()
    with pytest.raises(error, match=match):
        bd.patch(model, **kwargs)
    assert not bd.bayesian_modules(model) and model.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_other_errors():
    with pytest.raises(TypeError, match="model"):
        bd.patch("unet")
    mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="preset 'paper-dreambooth' matched no Linear"):
        bd.patch(mlp)
    with pytest.raises(ValueError, match="no Bayesian module"):
        bd.kl_loss(mlp)
    assert bd.merge(mlp) == [] and bd.unpatch(mlp) == []
    assert bd.patch(mlp, "all-linear") == ["0", "2"]
    with pytest.raises(TypeError, match="nn.Linear"):
        BayesLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="meta"):
        BayesLinear.from_linear(nn.Linear(2, 2, device="meta"))
    # integer (quantised) weights: refused naming the layer, nothing replaced
    quantised = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    quantised[1].weight = nn.Parameter(torch.zeros(2, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="cannot patch 1: its weight is torch.int8"):
        bd.patch(quantised, "all-linear")
    assert type(quantised[0]) is nn.Linear
    # a large softplus sigma_init: its rho computed without overflow
    wide = nn.Sequential(nn.Linear(3, 3))
    bd.patch(wide, "all-linear", sigma_param="softplus", sigma_init=1000.0)
    torch.testing.assert_close(wide[0].sigma, torch.full((3, 3), 1000.0))
    # a layer a preset cannot turn Bayesian is refused before any layer is replaced: nothing changes
    convs = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="cannot patch 1: .*groups=1"):
        bd.patch(convs, "paper-lora", targets=["*"])
    assert type(convs[0]) is nn.Conv2d and convs[0].weight.requires_grad and convs[0].weight.device.type == "cpu"
    reflect = nn.Sequential(nn.Linear(2, 2), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="cannot patch 1: .*padding_mode='reflect'"):
        bd.patch(reflect, "all")
    assert type(reflect[0]) is nn.Linear


def test_bnn_diffusion_never_imports_triton():
    package = pathlib.Path(bd.__file__).parent
    for source in package.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+triton\b", source.read_text(), re.M), source


def test_a_module_used_at_a_place_the_targets_do_not_match_is_refused():
    """The place left would hold the replaced module, whose weights move into the Bayesian layer."""
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.a, model.b = shared, nn.Sequential(shared)
    with pytest.raises(ValueError, match=r"cannot patch a: the same module is also used at b\.0"):
        bd.patch(model, "all-linear", targets=["a"])
    assert shared.weight.device.type == "cpu" and not bd.bayesian_modules(model)  # untouched
    assert bd.patch(model, "all-linear", targets=["a", "b.0"]) == ["a", "b.0"]
    assert model.a is model.b[0]


def test_patch_refuses_a_conv_whose_same_padding_the_op_cannot_run():
    model = nn.Sequential(nn.Conv2d(2, 3, kernel_size=4, padding="same"))
    with pytest.raises(ValueError, match="cannot patch 0: padding='same' is supported when"):
        bd.patch(model, "all", targets=["0"])
    assert isinstance(model[0], nn.Conv2d)


def test_reset_parameters_leaves_the_pretrained_weight_intact():
    linear = nn.Linear(4, 3)
    pretrained = linear.weight.detach().clone()
    layer = bd.BayesLinear.from_linear(linear)
    layer.reset_parameters()
    assert torch.equal(linear.weight, pretrained)
    assert torch.equal(layer.prior_mu, layer.weight_mu)  # the prior is the new initial mean


def test_patch_refuses_a_model_inside_ddp():
    """DDP averages the gradients of the parameters it was built with: a layer patched inside it would train apart
    on every process, so patch refuses and leaves the model as it is."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:  # one process, an in-memory store: no port
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        wrapped = nn.parallel.DistributedDataParallel(model)
        for outer in (wrapped, torch.compile(wrapped)):
            with pytest.raises(TypeError, match="inside DistributedDataParallel: .*patch the model first"):
                bd.patch(outer, "all-linear")
        assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())
        assert bd.patch(model, "all-linear") == ["0", "1"]  # patched first, then wrapped: fine
        nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)(torch.randn(3, 4)).sum().backward()
        assert model[0].weight_mu.grad is not None and model[0].weight_rho.grad is not None
    finally:
        if started:
            dist.destroy_process_group()


class _ScaledLinear(nn.Linear):
    """A linear with a forward of its own: a Bayesian layer in its place would drop the scaling."""

    def forward(self, x):
        return 2 * super().forward(x)


class _LinearWithChild(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.extra = nn.Linear(self.in_features, self.out_features, bias=False)


def test_subclasses_that_compute_more_than_the_plain_layer_are_refused():
    for layer, why in ((_ScaledLinear(4, 4), "_ScaledLinear has a forward of its own"),
                       (_LinearWithChild(4, 4), r"_LinearWithChild has submodules \(extra\)")):
        model = nn.Sequential(nn.Linear(4, 4), layer)
        with pytest.raises(ValueError, match=rf"cannot patch 1: (its )?{why}.*leave it out of targets"):
            bd.patch(model, "all-linear")
        assert type(model[0]) is nn.Linear and model[1] is layer and not bd.bayesian_modules(model)
        assert bd.patch(model, "all-linear", targets=["0"]) == ["0"]  # the others stay patchable


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")  # diffusers' pre-PEFT LoRA classes
def test_lora_compatible_layers_are_patched_only_without_a_lora_layer():
    lora = pytest.importorskip("diffusers.models.lora")
    plain = lora.LoRACompatibleLinear(4, 4)
    model = nn.Sequential(plain)
    assert bd.patch(model, "all-linear") == ["0"]
    with_lora = lora.LoRACompatibleLinear(4, 4)
    with_lora.set_lora_layer(lora.LoRALinearLayer(4, 4, rank=2))
    model = nn.Sequential(with_lora)
    with pytest.raises(ValueError, match=r"cannot patch 0: its LoRACompatibleLinear has submodules \(lora_layer\)"):
        bd.patch(model, "all-linear")
    assert model[0] is with_lora


def test_float8_weights_are_refused_before_any_layer_is_replaced():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(model[1].weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match="cannot patch 1: its weight is torch.float8_e4m3fn"):
        bd.patch(model, "all-linear")
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("preset", ["paper-dreambooth", "paper-lora"])
def test_merge_keeps_what_patch_froze_and_unpatch_gives_it_back(preset):
    """patch then merge is a plain fine-tune of the patched layer set (the study's baseline): only the merged
    full-rank layers train; a later unpatch gives every other parameter its gradient back."""
    model, _ = build("unet")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    names = bd.patch(model, preset)
    bd.merge(model)
    in_merged = lambda n: any(n.startswith(name + ".") for name in names)
    now = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(in_merged(n) for n in now)
    assert bool(now) == (preset == "paper-dreambooth")  # a merged LoRA layer stays frozen, as its base was
    assert bd.unpatch(model) == []
    assert {n for n, p in model.named_parameters() if p.requires_grad and not in_merged(n)} == {
        n for n in trainable if not in_merged(n)}
