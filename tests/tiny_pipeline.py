"""A tiny Stable Diffusion checkpoint and a few instance images, written to disk for offline end-to-end tests.

``write_tiny_pipeline(path)`` saves a ``StableDiffusionPipeline`` whose parts are built from small configs (no
download): a UNet2DConditionModel with block_out_channels (32, 64), a two-level AutoencoderKL (downsampling by 2),
a two-layer CLIP text encoder and a ``CLIPTokenizer`` made from a generated ``vocab.json`` / ``merges.txt``
(printable ASCII characters plus a few merges), and a DDPMScheduler.  ``write_instance_images(path)`` saves crops
of scikit-image's sample photos as PNG files.  Both are deterministic (fixed seeds), so tests that train on them
are reproducible.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

TEXT_HIDDEN = 32  # the text encoder's width = the UNet's cross_attention_dim
LATENT_SCALE = 2  # the tiny VAE downsamples by 2 (two levels): resolution 16 -> latents 8x8
MERGES = ("s k", "sk s</w>", "p h", "o t", "ph ot", "phot o</w>", "d o", "do g</w>", "o f</w>")


def _tokenizer_files(directory: Path) -> tuple:
    """vocab.json / merges.txt for a byte-level BPE over printable ASCII (which byte-level BPE maps to itself)."""
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    tokens += ["".join(merge.split(" ")) for merge in MERGES]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return vocab_file, merges_file, len(vocab)


def build_tiny_components(seed: int = 0, sample_size: int = 8) -> dict:
    """The parts of a tiny StableDiffusionPipeline (unet, vae, text_encoder, tokenizer, scheduler), freshly built.

    ``sample_size`` is the UNet's latent size (the pipeline's default resolution is ``sample_size * 2``).
    """
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        norm_num_groups=16, sample_size=sample_size * LATENT_SCALE)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file, vocab_size = _tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=TEXT_HIDDEN))
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler)


def write_tiny_pipeline(path, seed: int = 0, sample_size: int = 8) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (no safety checker) to ``path``; returns ``path``."""
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(seed, sample_size)
    pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def write_instance_images(path, count: int = 3, size: int = 32) -> Path:
    """Save ``count`` (at most 4) RGB crops of scikit-image's sample photos, resized to ``size``, as PNG files."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    if not 1 <= count <= len(photos):
        raise ValueError(f"count must be in [1, {len(photos)}], got {count}")
    os.makedirs(path, exist_ok=True)
    for i, photo in enumerate(photos[:count]):
        side = min(photo.shape[:2])
        square = np.ascontiguousarray(photo[:side, :side, :3])
        Image.fromarray(square).resize((size, size), Image.BICUBIC).save(os.path.join(path, f"instance-{i}.png"))
    return Path(path)
