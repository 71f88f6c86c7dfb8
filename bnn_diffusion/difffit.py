"""DiffFit (Xie et al. 2023): parameter-efficient fine-tuning of a diffusion transformer by biases, norms, condition
embeddings and per-channel scale factors on the residual branches.

``prepare(model)`` makes a model DiffFit-trainable in place:

* every residual branch of a transformer block gets a per-channel scale gamma (initialised to 1.0, so the model's
  outputs are unchanged): the block computes ``x + gamma * branch(x)`` instead of ``x + branch(x)``.  The branch's
  last linear layer (``attn.to_out.0``, ``ff.net.2``, ...) is replaced by a ``ScaledLinear`` that multiplies its
  output by gamma; everything after that layer in the branch (dropout, the adaLN gate, the residual add) commutes
  with a per-channel scale, so this is exactly gamma on the branch;
* trainable: the gammas, every bias, the parameters of every normalisation layer, and the condition embeddings
  (time / class / text-condition embedding modules); everything else is frozen.

The blocks covered and the branch outputs scaled in each (a missing one, e.g. SD3's last block has no text-stream
output, is skipped):

==============================  ==================================================================================
block (diffusers class)         scaled branch outputs
==============================  ==================================================================================
``BasicTransformerBlock``       ``attn1.to_out.0`` (self-attention), ``attn2.to_out.0`` (cross-attention),
(UNet2DConditionModel, DiT,     ``ff.net.2`` (feed-forward)
PixArt)
``JointTransformerBlock``       ``attn.to_out.0`` / ``attn.to_add_out`` (image / text stream of the joint
(SD3)                           attention), ``attn2.to_out.0`` (SD3.5 dual attention), ``ff.net.2``,
                                ``ff_context.net.2``
``FluxTransformerBlock``        ``attn.to_out.0``, ``attn.to_add_out``, ``ff.net.2``, ``ff_context.net.2``
``FluxSingleTransformerBlock``  ``proj_out`` (the fused attention + MLP branch)
==============================  ==================================================================================

Blocks are recognised by class name (subclasses included); a model with none of them is refused.  Normalisation
layers are the leaf modules whose class name ends in ``Norm`` (LayerNorm, GroupNorm, RMSNorm, ...) and torch's
batch/instance norms; adaptive norms (AdaLayerNormZero, ...) are not leaves: only their biases train.  Condition
embeddings are the modules of ``CONDITION_EMBEDDING_TYPES`` and the modules sitting at an attribute named in
``CONDITION_EMBEDDING_NAMES``.

``merge(model)`` folds every gamma into its layer's weight and bias (W' = diag(gamma) W, b' = gamma b) and puts
plain ``nn.Linear`` layers back: the fine-tuned model then has the architecture, state-dict keys and inference cost of
the original.  State-dict keys of a prepared model are the original ones plus ``<layer>.gamma`` per scaled layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import BayesianModule

__all__ = ["SCALED_BRANCHES", "CONDITION_EMBEDDING_TYPES", "CONDITION_EMBEDDING_NAMES", "ScaledLinear", "prepare",
           "merge", "scaled_layers"]

SCALED_BRANCHES = {
    "BasicTransformerBlock": ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2"),
    "JointTransformerBlock": ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2", "ff_context.net.2"),
    "FluxTransformerBlock": ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"),
    "FluxSingleTransformerBlock": ("proj_out",),
}

CONDITION_EMBEDDING_TYPES = (
    "TimestepEmbedding", "LabelEmbedding", "CombinedTimestepLabelEmbeddings", "CombinedTimestepTextProjEmbeddings",
    "CombinedTimestepGuidanceTextProjEmbeddings", "PixArtAlphaTextProjection",
    "PixArtAlphaCombinedTimestepSizeEmbeddings", "TextTimeEmbedding", "TextImageTimeEmbedding", "TextImageProjection",
)
CONDITION_EMBEDDING_NAMES = (
    "time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj",  # UNet2DConditionModel
    "time_text_embed", "context_embedder",                                    # SD3, Flux
    "adaln_single", "caption_projection",                                     # PixArt
)

_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def _class_names(module: nn.Module) -> list:
    return [cls.__name__ for cls in type(module).__mro__]


class ScaledLinear(nn.Module):
    """A linear layer whose output is scaled per channel: ``y = gamma * (x @ weight.T + bias)``.

    ``weight`` and ``bias`` are the wrapped ``nn.Linear``'s own parameters (shared, not copied); ``gamma``
    (out_features,) starts at 1.0, in float32 over a 16-bit weight (bfloat16 steps by 2^-7 at 1.0: an update of
    Adam's learning rate would round away), else in the weight's dtype; a later ``model.to(dtype)`` casts it
    with the rest.  ``to_linear()`` folds gamma into a plain ``nn.Linear``
    (the very module that was wrapped, with new parameters).  State-dict keys: ``weight``, ``bias`` (as the wrapped
    layer), ``gamma``.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.gamma = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device,
                                             dtype=torch.promote_types(linear.weight.dtype, torch.float32)))
        self.__dict__["_original"] = linear  # not a submodule: handed back by to_linear
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y * self.gamma.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """The wrapped ``nn.Linear`` holding diag(gamma) W and gamma b (computed in float32, stored in the weight's
        dtype), with this layer's ``requires_grad`` flags."""
        linear = self.__dict__["_original"]
        with torch.no_grad():
            gamma = self.gamma.float()
            weight = (self.weight.float() * gamma[:, None]).to(self.weight.dtype)
            linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
            if self.bias is not None:
                bias = (self.bias.float() * gamma).to(self.bias.dtype)
                linear.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.gamma.device.type != "meta" and self.gamma.numel():
            with torch.no_grad():
                gamma = self.gamma.float()
                text += f", gamma(mean={gamma.mean().item():.3g}, min={gamma.min().item():.3g}, " \
                        f"max={gamma.max().item():.3g})"
        return text


def _branch_outputs(block: nn.Module, block_type: str, block_name: str) -> list:
    """(qualified name, parent, attribute) of each branch output layer present in ``block``."""
    found = []
    for path in SCALED_BRANCHES[block_type]:
        *parent_path, attr = path.split(".")
        try:
            parent = block.get_submodule(".".join(parent_path)) if parent_path else block
        except AttributeError:
            continue
        layer = parent._modules.get(attr)
        if layer is None:
            continue
        name = f"{block_name}.{path}" if block_name else path
        if not isinstance(layer, (nn.Linear, ScaledLinear)):
            raise TypeError(f"DiffFit scales the output of a plain nn.Linear at {name}, found "
                            f"{type(layer).__name__}; prepare the model before adding other adapters (or merge them)")
        found.append((name, parent, attr))
    return found


def _block_type(module: nn.Module) -> Optional[str]:
    return next((name for name in _class_names(module) if name in SCALED_BRANCHES), None)


def _is_norm(module: nn.Module) -> bool:
    if next(module.children(), None) is not None:
        return False
    return isinstance(module, _TORCH_NORMS) or any(name.endswith("Norm") for name in _class_names(module))


def _is_condition_embedding(name: str, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] in CONDITION_EMBEDDING_NAMES or any(
        cls in CONDITION_EMBEDDING_TYPES for cls in _class_names(module))


def scaled_layers(model: nn.Module) -> list:
    """``(qualified name, ScaledLinear)`` of every DiffFit-scaled layer of ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ScaledLinear)]


def prepare(model: nn.Module) -> list:
    """Make ``model`` DiffFit-trainable in place; returns the names of its trainable parameters.

    Adds a ``ScaledLinear`` (gamma = 1.0) at every branch output of the transformer blocks listed in
    ``SCALED_BRANCHES`` (outputs are unchanged), then sets ``requires_grad=True`` on the gammas, the biases, the
    normalisation layers' parameters and the condition embeddings' parameters, and ``False`` on every other parameter.
    Calling it again keeps the existing gammas.  ValueError if the model has no supported transformer block;
    TypeError if it already holds adapters (Bayesian layers, PEFT layers), whose parameters this would freeze:
    prepare first, then ``bnn_diffusion.patch(..., freeze_others=False)`` keeps DiffFit's trainable set.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapters = [name for name, module in model.named_modules()
                if isinstance(module, BayesianModule) or isinstance(module._modules.get("base_layer"), nn.Module)]
    if adapters:
        raise TypeError(f"{type(model).__name__} already has adapter layers, which DiffFit would freeze: "
                        f"{adapters[:3]}{' ...' if len(adapters) > 3 else ''}; prepare the model before adding "
                        f"adapters (bnn_diffusion.patch(..., freeze_others=False) after prepare keeps both trainable)")
    sites = []
    for name, module in model.named_modules():
        block_type = _block_type(module)
        if block_type is not None:
            sites += _branch_outputs(module, block_type, name)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no transformer block DiffFit knows how to scale; supported "
                         f"blocks: {sorted(SCALED_BRANCHES)}")
    for _, parent, attr in sites:
        layer = parent._modules[attr]
        if isinstance(layer, nn.Linear):
            setattr(parent, attr, ScaledLinear(layer))

    trainable = set()
    for name, module in model.named_modules():
        if isinstance(module, ScaledLinear):
            trainable.add(id(module.gamma))
        if _is_norm(module) or _is_condition_embedding(name, module):
            trainable.update(id(p) for p in module.parameters())
    names = []
    for name, param in model.named_parameters():
        train = id(param) in trainable or name.rsplit(".", 1)[-1] == "bias"
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


def merge(model: nn.Module) -> list:
    """Fold every gamma into its layer (plain ``nn.Linear`` again), in place; returns the qualified names merged.
    The merged model has the original architecture and state-dict keys and the prepared model's outputs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    merged, done = [], {}

    def visit(module: nn.Module, prefix: str) -> None:
        for attr, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, ScaledLinear):
                if id(child) not in done:
                    done[id(child)] = child.to_linear()
                setattr(module, attr, done[id(child)])
                merged.append(name)
            else:
                visit(child, name)

    visit(model, "")
    return merged
