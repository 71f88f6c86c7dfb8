"""One fine-tuning step of a diffusers UNet2DConditionModel, for each way of fine-tuning that the benchmarks compare.

The pieces (model configs, the five variants, the batch, the step) are shared by ``e2e_unet.py``, which measures
them, and by this file's own ``main``, which takes one step on every process of a distributed launch and writes
what each rank saw (the multi-process test in ``tests/test_accelerate.py``):

    accelerate launch --multi_gpu --num_processes 2 benchmarks/e2e_step.py --cpu --out DIR   # 2 CPU processes, gloo
    accelerate launch --multi_gpu --num_processes 2 benchmarks/e2e_step.py --out DIR         # 2 GPUs, nccl

Variants (the letters are those of the end-to-end table):

    (a) full-ft          deterministic fine-tune of the paper-dreambooth layers (only those layers trainable)
    (b) paper            the paper's own implementation (``paper_bayes.py``): materialised mu + sigma * eps,
                         KL against a frozen copy of the whole UNet
    (c) ours-dreambooth  ``bnn_diffusion.patch(unet, "paper-dreambooth")`` + ``bnn_diffusion.kl_loss``
    (c') ours-dreambooth-bf16prior   the same with ``prior_dtype=torch.bfloat16`` (prior means in half the bytes)
    (d) peft-lora        plain LoRA through PEFT: rank 4 on attn1 and attn2 to_q/to_k/to_v/to_out.0
    (e) ours-lora        ``bnn_diffusion.patch(unet, "paper-lora")`` + ``bnn_diffusion.kl_loss``
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bnn_diffusion as bd  # noqa: E402
from bnn_diffusion.patch import _Pattern  # noqa: E402
import paper_bayes  # noqa: E402

# Stable Diffusion 1.5's UNet (its published config.json), built with random weights: weights change neither
# speed nor memory.  "tiny" keeps the block structure at a size a CPU steps through in well under a second.
UNET_CONFIGS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
        attention_head_dim=8),
    "tiny": dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=8),
}
TEXT_LENGTH = {"sd15": 77, "tiny": 8}  # CLIP's 77 tokens for SD 1.5
LORA_TARGETS = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
LORA_RANK = 4


class VariantUnavailable(RuntimeError):
    """A variant that cannot run with the installed code (reported as "unavailable: <reason>", not as a failure)."""


@dataclass
class Setup:
    """A model made ready for one variant: what the optimizer trains, how its KL is computed (None: no KL term),
    and facts about it for the report (counts of layers and parameters, inherent extra bytes)."""

    trainable: list
    kl: Optional[Callable[[], torch.Tensor]] = None
    info: dict = field(default_factory=dict)


def build_unet(config: str, device: torch.device) -> nn.Module:
    """A randomly initialised UNet2DConditionModel of ``config`` ("sd15" or "tiny") in float32 on ``device``
    (built there directly, without a CPU copy)."""
    from diffusers import UNet2DConditionModel
    if config not in UNET_CONFIGS:
        raise ValueError(f"config must be one of {sorted(UNET_CONFIGS)}, got {config!r}")
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[config])
    return unet.train()


def preset_layer_names(model: nn.Module, preset: str) -> list:
    """Qualified names of the layers that ``bnn_diffusion.patch(model, preset)`` would replace (same patterns)."""
    spec = bd.PRESETS[preset]
    patterns = [_Pattern(p) for p in spec.patterns]
    return [name for name, module in model.named_modules()
            if isinstance(module, spec.layer_types) and any(p.matches(name) for p in patterns)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _setup_full_ft(unet: nn.Module) -> Setup:
    names = preset_layer_names(unet, "paper-dreambooth")
    unet.requires_grad_(False)
    trainable = []
    for name in names:
        layer = unet.get_submodule(name)
        layer.requires_grad_(True)
        trainable += list(layer.parameters())
    return Setup(trainable, None, {"layers": len(names), "trainable_params": sum(p.numel() for p in trainable)})


def _setup_paper(unet: nn.Module) -> Setup:
    names = preset_layer_names(unet, "paper-dreambooth")
    bayes = paper_bayes.patch(unet, names)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    return Setup(trainable, bayes.kl, {
        "layers": len(names), "trainable_params": sum(p.numel() for p in trainable),
        "frozen_copy_bytes": _bytes(bayes.frozen.parameters()) + _bytes(bayes.frozen.buffers()),
        "kl_kind": "reverse KL(prior || q) against the frozen copy's weights (the paper's orientation)"})


def _setup_ours(unet: nn.Module, preset: str, **options) -> Setup:
    expected = preset_layer_names(unet, preset) if bd.PRESETS[preset].kind == "full" else None
    replaced = bd.patch(unet, preset, **options)
    if expected is not None and sorted(replaced) != sorted(expected):
        # the deterministic baseline (a) trains the layers that preset_layer_names finds: both must be the same set
        raise RuntimeError(f"bnn_diffusion.patch({preset!r}) replaced other layers than the baseline trains: "
                           f"{sorted(set(replaced) ^ set(expected))[:5]}")
    trainable = [p for p in unet.parameters() if p.requires_grad]
    modules = [module for _, module in bd.bayesian_modules(unet)]
    rho = [p for module in modules for name, p in module.named_parameters() if name.endswith("rho")]
    priors = [b for module in modules for name, b in module.named_buffers() if name.startswith("prior")]
    return Setup(trainable, lambda: bd.kl_loss(unet), {
        "layers": len(replaced), "trainable_params": sum(p.numel() for p in trainable),
        "sigma_params": sum(p.numel() for p in rho),
        # what a Bayesian posterior must add to a deterministic fine-tune of the same layers, exactly: sigma's
        # parameters, their gradients and AdamW's two moment estimates (each sigma's own dtype and size) ...
        "inherent_sigma_bytes": 4 * _bytes(rho),
        # ... and, since mu starts as a copy of the pretrained weights, the prior means (the pretrained weights)
        "prior_mean_bytes": _bytes(priors)})


def _setup_peft_lora(unet: nn.Module) -> Setup:
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise VariantUnavailable(f"peft is not installed ({error})") from None
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    layers = sum(1 for name, _ in unet.named_modules() if name.endswith(".lora_A"))
    return Setup(trainable, None, {"layers": layers, "trainable_params": sum(p.numel() for p in trainable)})


VARIANTS = {
    "full-ft": ("a", "deterministic full fine-tune of the paper-dreambooth layers", _setup_full_ft),
    "paper": ("b", "paper's implementation (materialised W, frozen UNet copy)", _setup_paper),
    "ours-dreambooth": ("c", "bnn_diffusion paper-dreambooth", lambda unet: _setup_ours(unet, "paper-dreambooth")),
    "ours-dreambooth-bf16prior": ("c'", "bnn_diffusion paper-dreambooth, prior means stored in bf16",
                                  lambda unet: _setup_ours(unet, "paper-dreambooth", prior_dtype=torch.bfloat16)),
    "peft-lora": ("d", f"PEFT LoRA rank {LORA_RANK} on attn1+attn2 q/k/v/out", _setup_peft_lora),
    "ours-lora": ("e", "bnn_diffusion paper-lora", lambda unet: _setup_ours(unet, "paper-lora")),
}


def setup_variant(variant: str, unet: nn.Module) -> Setup:
    """Prepare ``unet`` in place for ``variant`` (a key of VARIANTS); raises VariantUnavailable when it cannot run."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    setup = VARIANTS[variant][2](unet)
    if not setup.trainable:
        raise RuntimeError(f"variant {variant!r} left nothing trainable")
    return setup


def make_batch(config: str, batch_size: int, device: torch.device, *, seed: int = 0,
               latent_size: Optional[int] = None) -> dict:
    """Random latents, timesteps, text embeddings and the noise target: the tensors a training step consumes."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    spec = UNET_CONFIGS[config]
    size = latent_size or spec["sample_size"]
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch_size, spec["in_channels"], size, size, generator=generator).to(device),
        "timestep": torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
        "encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH[config], spec["cross_attention_dim"],
                                             generator=generator).to(device),
        "target": torch.randn(batch_size, spec["out_channels"], size, size, generator=generator).to(device),
    }


def forward_loss(unet: nn.Module, batch: dict, setup: Setup, *, kl_weight: float,
                 autocast_dtype: Optional[torch.dtype] = torch.bfloat16):
    """Forward pass and loss: MSE of the predicted noise (in float32) + ``kl_weight`` * KL.  Returns
    (loss, kl or None), both attached to the graph."""
    device_type = batch["sample"].device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        prediction = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"]).sample
    loss = F.mse_loss(prediction.float(), batch["target"])
    kl = setup.kl() if setup.kl is not None else None
    if kl is not None:
        loss = loss + kl_weight * kl.float()
    return loss, kl


def training_step(unet: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, setup: Setup, *,
                  kl_weight: float, autocast_dtype: Optional[torch.dtype] = torch.bfloat16,
                  backward: Optional[Callable] = None):
    """One step: forward, loss, backward (``backward(loss)``, default ``loss.backward()``), AdamW step, gradients
    freed.  Returns the detached (loss, kl) tensors; reading them is left to the caller (no device sync here)."""
    loss, kl = forward_loss(unet, batch, setup, kl_weight=kl_weight, autocast_dtype=autocast_dtype)
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), None if kl is None else kl.detach()


# --------------------------------------------------------------------------------------------------------------
# one step on every process of a distributed launch
# --------------------------------------------------------------------------------------------------------------

def _digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def _probe(tensors) -> float:
    """A fixed random linear functional of the tensors (float64): the probe of a mean of gradients is the mean
    of their probes, which lets the ranks check the all-reduce without exchanging whole gradients."""
    generator = torch.Generator().manual_seed(1234)
    total = 0.0
    for tensor in tensors:
        weights = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        total += float((tensor.detach().double().cpu() * weights).sum())
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="one training step per process of a distributed launch")
    parser.add_argument("--out", required=True, help="directory for one rank-<i>.json per process")
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="tiny")
    parser.add_argument("--variant", choices=list(VARIANTS), default="ours-dreambooth")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--latent-size", type=int, default=None)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU processes (gloo) even where GPUs exist")
    args = parser.parse_args(argv)

    from accelerate import Accelerator
    accelerator = Accelerator(cpu=args.cpu)
    rank = accelerator.process_index
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    unet = build_unet(args.config, accelerator.device)
    setup = setup_variant(args.variant, unet)
    optimizer = torch.optim.AdamW(setup.trainable, lr=1e-4)
    model, optimizer = accelerator.prepare(unet, optimizer)
    params_before = _digest(setup.trainable)
    batch = make_batch(args.config, args.batch_size, accelerator.device, seed=args.seed + 1 + rank,
                       latent_size=args.latent_size)  # different data on every rank
    autocast_dtype = torch.bfloat16

    # This rank's own gradient (no all-reduce), then the same forward again (same weight noise: the seeds come from
    # torch's generator, restored) with the all-reduce: the second must be the mean of the first over the ranks.
    rng = torch.get_rng_state()
    with accelerator.no_sync(model):
        local_loss, _ = forward_loss(model, batch, setup, kl_weight=args.kl_weight, autocast_dtype=autocast_dtype)
        accelerator.backward(local_loss)
    local_probe = _probe(p.grad for p in setup.trainable)
    optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    loss, kl = forward_loss(model, batch, setup, kl_weight=args.kl_weight, autocast_dtype=autocast_dtype)
    accelerator.backward(loss)
    grads = [p.grad for p in setup.trainable]
    report = {
        "rank": rank, "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "device": str(accelerator.device), "variant": args.variant, "config": args.config,
        "loss": float(loss), "local_loss": float(local_loss), "kl": None if kl is None else float(kl),
        "missing_grads": sum(g is None for g in grads),
        "local_grad_probe": local_probe, "grad_probe": _probe(g for g in grads if g is not None),
        "grad_digest": _digest(g for g in grads if g is not None),
        "params_before": params_before,
    }
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    report["params_after"] = _digest(setup.trainable)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank-{rank}.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main()
