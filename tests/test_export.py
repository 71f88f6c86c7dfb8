"""bnn_diffusion.save_lora: the posterior-mean LoRA file loads into an unpatched model (diffusers + PEFT) and
reproduces the merged model."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import bnn_diffusion as bd
from bnn_diffusion.export import LORA_WEIGHT_NAME, lora_state_dict

from tiny_models import assert_same, build, run

pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")


def train_factors(model, seed=1):
    """Move every LoRA factor away from its init (B != 0), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bd.bayesian_modules(model):
            layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=gen))
            layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))


def merged_outputs(model, inputs):
    """Outputs of the model in eval mode, before and after ``merge`` (which must agree)."""
    model.eval()
    with torch.no_grad():
        mean = run(model, inputs)
        bd.merge(model)
        merged = run(model, inputs)
    assert_same(merged, mean)
    return merged


@pytest.mark.parametrize("kind, preset, targets, prefix", [
    # the UNet with convs too (conv_in 3x3, a resnet 3x3, the 1x1 proj_in of the transformers)
    ("unet", "paper-lora", ["attn1.to_q", "attn2.to_v", "attn2.to_out.0", "conv_in", "resnets.0.conv1", "proj_in"],
     "unet"),
    ("unet", "bayes-lora", None, "unet"),
    ("sd3", "paper-lora", None, "transformer"),
    ("flux", "bayes-lora", None, "transformer"),
])
def test_load_lora_adapter_reproduces_the_merged_model(tmp_path, kind, preset, targets, prefix):
    model, inputs = build(kind)
    pristine = copy.deepcopy(model)
    names = bd.patch(model, preset, targets=targets, rank=3, lora_alpha=5.0)  # scale 5/3: folded into lora_B
    train_factors(model)
    path = bd.save_lora(model, tmp_path, prefix=prefix)
    assert path == str(tmp_path / LORA_WEIGHT_NAME)
    expected = merged_outputs(model, inputs)

    pristine.load_lora_adapter(path, prefix=prefix)
    loaded = {n for n, m in pristine.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert loaded == set(names)
    pristine.eval()
    with torch.no_grad():
        assert_same(run(pristine, inputs), expected)


def test_pipeline_load_lora_weights_reproduces_the_merged_unet(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from tiny_pipeline import build_tiny_components

    def pipeline():
        return diffusers.StableDiffusionPipeline(**build_tiny_components(seed=0), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)

    trained, fresh = pipeline(), pipeline()
    bd.patch(trained.unet, "paper-lora")
    train_factors(trained.unet)
    bd.save_lora(trained.unet, tmp_path)
    inputs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 70]),
                  encoder_hidden_states=torch.randn(2, 5, 32))
    expected = merged_outputs(trained.unet, inputs)
    fresh.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        assert_same(fresh.unet(**inputs).sample, expected)


def test_file_content_keys_scale_metadata_and_dtype(tmp_path):
    model, _ = build("dit")
    names = bd.patch(model, "paper-lora", rank=2, lora_alpha=6.0)
    train_factors(model)
    path = bd.save_lora(model, tmp_path / "sub" / "mine.safetensors", dtype=torch.float16)
    assert path == str(tmp_path / "sub" / "mine.safetensors")
    state = safetensors.load_file(path)
    assert set(state) == {f"unet.{n}.lora_{f}.weight" for n in names for f in "AB"}
    for name in names:
        layer = model.get_submodule(name)
        a, b = state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"]
        assert a.dtype == b.dtype == torch.float16 and a.shape == (2, layer.in_features)
        assert torch.equal(a, layer.lora_A.detach().half())
        assert torch.equal(b, (3.0 * layer.lora_B.detach()).half())  # scale 6 / 2 folded in
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and json.loads(metadata["bnn_diffusion"])["ranks"] == [2]
    # unprefixed keys; the factors' own dtype by default
    plain = lora_state_dict(model, prefix=None)
    assert set(plain) == {f"{n}.lora_{f}.weight" for n in names for f in "AB"}
    assert all(v.dtype == torch.float32 for v in plain.values())


def test_peft_wrapper_names_are_dropped_from_the_keys():
    from peft import LoraConfig, inject_adapter_in_model

    model, _ = build("dit")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["attn1.to_q"]), model)
    names = bd.patch(model, "paper-lora", targets=["attn1.to_q"])
    assert all(n.endswith("attn1.to_q.base_layer") for n in names)
    keys = set(lora_state_dict(model))
    assert keys == {f"unet.{n.removesuffix('.base_layer')}.lora_{f}.weight" for n in names for f in "AB"}


def test_errors(tmp_path):
    model, _ = build("dit")
    with pytest.raises(ValueError, match="no Bayesian LoRA layer"):
        bd.save_lora(model, tmp_path)
    bd.patch(model, "paper-lora")
    with pytest.raises(ValueError, match="prefix"):
        bd.save_lora(model, tmp_path, prefix="unet.")
    with pytest.raises(TypeError, match="dtype"):
        bd.save_lora(model, tmp_path, dtype=torch.int8)
    with pytest.raises(TypeError, match="model"):
        bd.save_lora("model", tmp_path)
    bd.patch(model, "paper-dreambooth", targets=["ff.net.2"])
    with pytest.raises(ValueError, match="full-rank Bayesian layers.*ff.net.2"):
        bd.save_lora(model, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written on error


def test_a_lora_over_a_dilated_conv_is_refused(tmp_path):
    """PEFT builds a conv's lora_A without the base's dilation: such a file would load without a warning and
    compute another function (or fail at the first forward), so it is not written."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 3, padding=2, dilation=2))
    bd.patch(model, "paper-lora", targets=["0", "1"])
    with pytest.raises(ValueError, match=r"dilated convs.*\['1'\]"):
        bd.save_lora(model, tmp_path)
    assert not list(tmp_path.iterdir())
    bd.unpatch(model)
    bd.patch(model, "paper-lora", targets=["0"])
    assert set(lora_state_dict(model, prefix=None)) == {"0.lora_A.weight", "0.lora_B.weight"}


@pytest.mark.parametrize("wrap", [torch.compile, torch.nn.DataParallel], ids=["compiled", "data-parallel"])
def test_keys_of_a_wrapped_model_are_the_models_own(wrap):
    """save_lora on the model training holds (torch.compile's or DDP's wrapper) writes the keys a loader finds:
    without ``_orig_mod.`` / ``module.``, which load_lora_adapter would only warn about, loading nothing."""
    model, _ = build("unet")
    bd.patch(model, "paper-lora")
    train_factors(model)
    wrapped = lora_state_dict(wrap(model))
    plain = lora_state_dict(model)
    assert list(wrapped) == list(plain)
    for key, tensor in plain.items():
        assert torch.equal(wrapped[key], tensor), key
