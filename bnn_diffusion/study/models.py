"""The study's diffusion model: a small class-conditional diffusers ``UNet2DConditionModel`` and its sampler.

The class enters as ``encoder_hidden_states``, the way a text prompt enters Stable Diffusion: a ``ClassConditioner``
maps a class to ``tokens`` learned vectors (an embedding table) followed by a LayerNorm (as CLIP's final norm), and
the UNet's transformer blocks read them through cross-attention (attn2).  The transformer blocks therefore have the
layers the paper makes Bayesian (self-attention attn1 and the feed-forward), and fine-tuning a new class is
DreamBooth's situation: a new token, few images.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import StudyConfig

__all__ = ["ClassConditioner", "build_unet", "make_noise_scheduler", "diffusion_target", "sample_images"]

NUM_CLASSES = 10


class ClassConditioner(nn.Module):
    """Class label -> (tokens, dim) condition.  Row ``NUM_CLASSES`` of the table is the null condition used for
    classifier-free guidance.  ``encode`` applies the LayerNorm to raw token vectors (a new, trained token)."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.table = nn.Embedding(NUM_CLASSES + 1, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    @property
    def null_label(self) -> int:
        return NUM_CLASSES

    def raw(self, labels: torch.Tensor) -> torch.Tensor:
        """The token vectors of ``labels`` before the norm, (B, tokens, dim)."""
        return self.table(labels).view(-1, self.tokens, self.dim)

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        return self.norm(raw)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.encode(self.raw(labels))


def build_unet(config: StudyConfig):
    """A UNet2DConditionModel for 1-channel ``image_size`` images: plain ResNet blocks at full resolution and
    cross-attention transformer blocks at every lower resolution and in the middle."""
    from diffusers import UNet2DConditionModel

    levels = len(config.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=config.image_size, in_channels=1, out_channels=1, block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block, down_block_types=down, up_block_types=up,
        cross_attention_dim=config.cross_attention_dim, norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim)


def make_noise_scheduler(config: StudyConfig):
    """The training noise schedule (DDPM with the config's beta schedule and prediction type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type)


def diffusion_target(noise_scheduler, images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict for ``images`` noised with ``noise`` at timesteps ``t``: the noise
    ("epsilon") or the velocity sqrt(a) noise - sqrt(1 - a) images ("v_prediction")."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(images, noise, t)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")


@torch.no_grad()
def sample_images(unet, condition: torch.Tensor, null_condition: torch.Tensor, noise: torch.Tensor, *,
                  noise_scheduler, steps: int, guidance_scale: float) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, ``steps`` steps) from ``noise`` with classifier-free guidance, configured as
    Stable Diffusion's DDIM (leading timestep spacing, steps_offset 1, final alpha not forced to one, and no
    clipping of the predicted x0, so that noise patterns are not hidden); images clamped to [-1, 1] at the end.

    ``condition`` / ``null_condition``: (B, tokens, dim) encoder_hidden_states (or (1, tokens, dim), broadcast).
    The UNet runs as it is (call ``eval()`` first: a Bayesian layer then uses its posterior mean).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, timestep_spacing="leading",
                                          steps_offset=1, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    batch = noise.shape[0]
    condition = condition.expand(batch, -1, -1)
    guided = guidance_scale != 1.0
    states = torch.cat([null_condition.expand(batch, -1, -1), condition]) if guided else condition
    x = noise
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        prediction = unet(model_in, t, encoder_hidden_states=states).sample
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        x = scheduler.step(prediction, t, x).prev_sample
    return x.clamp(-1, 1)
