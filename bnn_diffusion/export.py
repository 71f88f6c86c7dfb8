"""Export the posterior means of a Bayesian-LoRA model as a LoRA file that diffusers and PEFT load.

``save_lora(model, path)`` writes a safetensors file in the PEFT / diffusers key format::

    <prefix>.<module name>.lora_A.weight    (rank, in_features)         or (rank, in_channels, kh, kw) for a conv
    <prefix>.<module name>.lora_B.weight    (out_features, rank)        or (out_channels, rank, 1, 1)

holding the posterior means, with the LoRA scale (lora_alpha / rank) folded into ``lora_B``: the file loads with
the loaders' default alpha = rank (scale 1), with or without metadata, and reproduces the merged model
(``bnn_diffusion.merge``) up to float rounding::

    unet.load_lora_adapter("out/pytorch_lora_weights.safetensors", prefix="unet")   # a diffusers model
    pipe.load_lora_weights("out")                                                   # a pipeline (prefix "unet")
    transformer.load_lora_adapter("out/x.safetensors", prefix="transformer")        # SD3 / Flux (save_lora prefix)

Only the LoRA layers are exported: a model that also holds full-rank Bayesian layers is refused (their means are not
low-rank; ``merge`` the model and save it whole instead), and so is a LoRA over a dilated conv (PEFT builds its
``lora_A`` without the base's dilation: the file would load and compute something else).  Parameters trained outside
the LoRA layers (e.g. with ``patch(..., freeze_others=False)``) are not part of a LoRA file either.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
import torch.nn as nn

from .layers import BayesLoRAConv2d, BayesLoRALinear
from .patch import bayesian_modules

__all__ = ["save_lora", "lora_state_dict", "LORA_WEIGHT_NAME"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' loaders look for in a directory
_LORA_LAYERS = (BayesLoRALinear, BayesLoRAConv2d)


def _export_name(name: str) -> str:
    """The module's name in the model without PEFT wrappers (``<layer>.base_layer`` -> ``<layer>``)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def lora_state_dict(model: nn.Module, *, prefix: Optional[str] = "unet",
                    dtype: Optional[torch.dtype] = None) -> dict:
    """The tensors ``save_lora`` writes: ``{"<prefix>.<name>.lora_A.weight": A, "<prefix>.<name>.lora_B.weight":
    scale * B}`` for every Bayesian LoRA layer (posterior means, contiguous copies, in ``dtype`` or the factors'
    dtype).  ``prefix=None`` leaves the keys unprefixed (what ``load_lora_adapter(..., prefix=None)`` takes)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if prefix is not None and (not isinstance(prefix, str) or not prefix or prefix.endswith(".")):
        raise ValueError(f"prefix must be a non-empty name without a trailing dot, or None; got {prefix!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    modules = bayesian_modules(model)
    lora = [(name, m) for name, m in modules if isinstance(m, _LORA_LAYERS)]
    full = [name for name, m in modules if not isinstance(m, _LORA_LAYERS)]
    if not lora:
        raise ValueError(f"{type(model).__name__} has no Bayesian LoRA layer: patch it with a LoRA preset "
                         f"(\"paper-lora\", \"bayes-lora\") before saving a LoRA file")
    if full:
        raise ValueError(f"{type(model).__name__} also has full-rank Bayesian layers, which a LoRA file cannot "
                         f"hold: {full[:3]}{' ...' if len(full) > 3 else ''}; merge the model "
                         f"(bnn_diffusion.merge) and save it whole instead")
    dilated = [name for name, m in lora if isinstance(m, BayesLoRAConv2d) and m.dilation != (1, 1)]
    if dilated:
        raise ValueError(f"{type(model).__name__} has LoRA layers over dilated convs, which PEFT's LoRA format "
                         f"cannot hold (its lora_A has no dilation): {dilated[:3]}{' ...' if len(dilated) > 3 else ''}"
                         f"; merge the model (bnn_diffusion.merge) and save it whole instead")
    state = {}
    head = f"{prefix}." if prefix else ""
    with torch.no_grad():
        for name, layer in lora:
            out_dtype = dtype or layer.lora_A.dtype
            key = f"{head}{_export_name(name)}"
            state[f"{key}.lora_A.weight"] = layer.lora_A.detach().to(out_dtype).contiguous().clone()
            state[f"{key}.lora_B.weight"] = (layer.scale * layer.lora_B.detach().float()).to(out_dtype).contiguous()
    return state


def save_lora(model: nn.Module, path: Union[str, os.PathLike], *, prefix: Optional[str] = "unet",
              dtype: Optional[torch.dtype] = None) -> str:
    """Write the posterior-mean LoRA factors of ``model`` to ``path`` as safetensors; returns the file written.

    ``path``: a file name ending in ``.safetensors``, or a directory (created if needed) that receives
    ``pytorch_lora_weights.safetensors``, where ``pipe.load_lora_weights(directory)`` looks.  ``prefix``: the
    component the keys start with: ``"unet"`` (default; ``unet.load_lora_adapter(path, prefix="unet")`` and
    Stable Diffusion pipelines), ``"transformer"`` for SD3 / Flux (a DiT's diffusers class has no LoRA loader: its
    keys still follow the same layout), or None.  ``dtype``: the saved dtype (default: the factors').  See
    ``lora_state_dict`` for the content and the models it refuses (ValueError).
    """
    from safetensors.torch import save_file

    state = lora_state_dict(model, prefix=prefix, dtype=dtype)
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, LORA_WEIGHT_NAME)
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ranks = sorted({int(v.shape[0]) for k, v in state.items() if k.endswith("lora_A.weight")})
    metadata = {"format": "pt", "bnn_diffusion": json.dumps({"ranks": ranks, "scale": "folded into lora_B",
                                                             "content": "posterior means"})}
    save_file(state, path, metadata=metadata)
    return path
