"""Tiny diffusers models built from configs (no downloads) and their inputs, shared by the bnn_diffusion tests.

UNet2DConditionModel, DiT, SD3 and Flux transformers of a few hundred thousand parameters at most: every forward
runs in milliseconds on CPU.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")


def tiny_unet():
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=16, attention_head_dim=8, in_channels=4, out_channels=4)


def unet_inputs():
    return dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, 32))


def tiny_dit():
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                           norm_num_groups=2)


def dit_inputs():
    return dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 5]),
                class_labels=torch.tensor([0, 3]))


def tiny_sd3():
    return diffusers.SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2,
                                           attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                           joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)


def sd3_inputs():
    return dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([1, 5]))


def tiny_flux():
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def flux_inputs():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=-1)
    return dict(hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=torch.randn(2, 5, 32),
                pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.1, 0.5]), img_ids=img_ids,
                txt_ids=torch.zeros(5, 3))


MODELS = {"unet": (tiny_unet, unet_inputs), "dit": (tiny_dit, dit_inputs), "sd3": (tiny_sd3, sd3_inputs),
          "flux": (tiny_flux, flux_inputs)}


def build(kind, seed=0):
    """A tiny model of ``kind`` (a key of MODELS) with weights from ``torch.manual_seed(seed)``, and its inputs."""
    torch.manual_seed(seed)
    make, inputs = MODELS[kind]
    model = make()
    torch.manual_seed(seed + 100)
    return model, inputs()


def run(model, inputs):
    """The model's prediction (``.sample``) for ``inputs``."""
    return model(**inputs).sample


def assert_same(actual, expected):
    """Equal up to float32 rounding: two models holding equal weights in different storages may take different
    BLAS paths (alignment), so outputs can differ in the last bits; the posterior noise moves them by ~1e-2."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
