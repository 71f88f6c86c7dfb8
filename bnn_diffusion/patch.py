"""Turn a diffusers model into a Bayesian one in place, and back: ``patch``, ``kl_loss``, ``merge``, ``unpatch``.

Target selection
----------------
A preset (or the ``targets`` argument, which replaces the preset's patterns) is a list of **glob patterns**
(``fnmatch`` syntax: ``*`` matches any characters, dots included; ``?``, ``[seq]``) matched against the **suffixes of
a module's qualified name taken at dot boundaries**: ``"attn1.to_q"`` matches
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` but not ``...attn1.to_q_extra`` nor
``...xattn1.to_q``; ``"*"`` matches everything.  A pattern that starts with ``re:`` is a regular expression that must
match such a suffix entirely (``re.fullmatch``), e.g. ``"re:attn[12]\\.to_(q|k|v)"``.

Only modules of the preset's layer types are candidates (``nn.Linear`` for the presets this version supports).
Layers that PEFT already wrapped are looked through: a PEFT tuner layer is matched by its own name and the layer it
wraps (at ``<name>.base_layer``) is the one replaced; its adapter layers (``lora_A``, ``lora_B``, ...) are never
candidates.  The projections of ``nn.MultiheadAttention`` are skipped (it reads their weights without calling them).

Every pattern given in ``targets`` must match at least one candidate (a typo fails loudly); a preset must match at
least one module of the model.  All checks run before the model is touched: an error leaves it unchanged.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from bnn_kernels.checks import check_choice, check_positive_float
from bnn_kernels.sigma import ESTIMATORS, SIGMA_PARAMS

from .layers import BayesianModule, BayesLinear

__all__ = ["Preset", "PRESETS", "patch", "kl_loss", "merge", "unpatch", "bayesian_modules"]

_ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Preset:
    """A named target set: which layers (``patterns`` over ``layer_types``) become which kind of Bayesian layer.

    ``kind`` is ``"full"`` (full-rank posterior over the layer's weight) or ``"lora"`` (frozen layer + LoRA factors,
    one of them Bayesian; ``bayes`` overrides ``patch``'s ``bayes`` argument when set).
    """

    name: str
    patterns: tuple
    kind: str
    layer_types: tuple
    description: str
    bayes: Optional[str] = None


PRESETS = {
    "paper-dreambooth": Preset(
        "paper-dreambooth",
        # UNet2DConditionModel, DiT, PixArt (BasicTransformerBlock): self-attention attn1 and the feed-forward.
        tuple(f"attn1.{p}" for p in _ATTN_PROJECTIONS) + ("ff.net.0.proj", "ff.net.2")
        # SD3 / Flux joint blocks: the image-stream projections of the joint attention (add_*_proj, to_add_out and
        # ff_context are the text stream, left out as cross-attention is in the UNet); ff is matched above.
        + tuple(f"transformer_blocks.*.attn.{p}" for p in _ATTN_PROJECTIONS)
        # Flux single-stream blocks: the attention projections and the fused MLP-in / (attention+MLP)-out linears.
        + tuple(f"single_transformer_blocks.*.attn.{p}" for p in ("to_q", "to_k", "to_v"))
        + ("single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out"),
        "full", (nn.Linear,),
        "the paper's DreamBooth set: self-attention q/k/v/out and the feed-forward linears of every transformer "
        "block (SD3/Flux: image-stream attention projections and feed-forward; Flux single blocks: attention "
        "q/k/v, proj_mlp, proj_out); full-rank posterior, sigma direct 0.01, prior sigma 0.01"),
    "all-linear": Preset("all-linear", ("*",), "full", (nn.Linear,),
                         "every nn.Linear of the model, full-rank posterior"),
    "paper-lora": Preset(
        "paper-lora", tuple(f"attn{i}.{p}" for i in (1, 2) for p in _ATTN_PROJECTIONS), "lora", (nn.Linear,),
        "LoRA (rank 4) on attn1 and attn2 q/k/v/out, the B factor Bayesian with prior N(0, 0.01^2)", bayes="B"),
    "bayes-lora": Preset(
        "bayes-lora", tuple(f"attn{i}.{p}" for i in (1, 2) for p in _ATTN_PROJECTIONS), "lora", (nn.Linear,),
        "BLoB-style LoRA on attn1 and attn2 q/k/v/out, the A factor Bayesian", bayes="A"),
    "all": Preset("all", ("*",), "full", (nn.Linear, nn.Conv2d),
                  "every nn.Linear and nn.Conv2d of the model, full-rank posterior"),
}

# (kind, layer type) -> factory(module, **options) -> BayesianModule.  A preset whose layers have no factory yet is
# refused with a clear message; new layer kinds (BayesConv2d, BayesLoRALinear, ...) register here.  The options are
# patch's keyword arguments: sigma_init, prior_sigma, sigma_param, estimator, rank, bayes, prior_dtype.

def _make_bayes_linear(module: nn.Linear, *, sigma_init, prior_sigma, sigma_param, estimator, prior_dtype, **_):
    return BayesLinear.from_linear(module, sigma_init=sigma_init, prior_sigma=prior_sigma, sigma_param=sigma_param,
                                   estimator=estimator, prior_dtype=prior_dtype)


_FACTORIES: dict = {("full", nn.Linear): _make_bayes_linear}
_MISSING = {  # what a (kind, type) without a factory is waiting for, for the error message
    ("full", nn.Conv2d): "BayesConv2d (on bnn_kernels.bayes_conv2d)",
    ("lora", nn.Linear): "BayesLoRALinear (on bnn_kernels.bayes_lora_linear)",
    ("lora", nn.Conv2d): "BayesLoRAConv2d (on bnn_kernels.bayes_lora_conv2d)",
}


def _supported(preset: Preset) -> list:
    return [t for t in preset.layer_types if (preset.kind, t) in _FACTORIES]


def _check_preset(preset) -> Preset:
    if isinstance(preset, Preset):
        spec = preset
    elif isinstance(preset, str) and preset in PRESETS:
        spec = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    missing = [t for t in spec.layer_types if (spec.kind, t) not in _FACTORIES]
    if missing:
        needs = ", ".join(_MISSING.get((spec.kind, t), f"a {spec.kind} Bayesian {t.__name__}") for t in missing)
        usable = sorted(name for name, p in PRESETS.items() if not [t for t in p.layer_types
                                                                    if (p.kind, t) not in _FACTORIES])
        raise ValueError(f"preset {spec.name!r} is not supported yet: it needs {needs}, which this version of "
                         f"bnn_diffusion does not provide; supported presets: {usable}")
    return spec


# --------------------------------------------------------------------------------------------------------------
# name matching
# --------------------------------------------------------------------------------------------------------------

class _Pattern:
    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise TypeError(f"targets must be non-empty strings, got {text!r}")
        self.text = text
        if text.startswith("re:"):
            try:
                regex = re.compile(text[3:])
            except re.error as exc:
                raise ValueError(f"targets pattern {text!r} is not a valid regular expression: {exc}") from None
            self._match = lambda suffix: regex.fullmatch(suffix) is not None
        else:
            self._match = lambda suffix: fnmatch.fnmatchcase(suffix, text)

    def matches(self, name: str) -> bool:
        parts = name.split(".")
        return any(self._match(".".join(parts[i:])) for i in range(len(parts)))


def _patterns(targets) -> list:
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Iterable):
        raise TypeError(f"targets must be a list of name patterns, got {type(targets).__name__}")
    patterns = [_Pattern(t) for t in targets]
    if not patterns:
        raise ValueError("targets must hold at least one name pattern")
    return patterns


def _peft_base(module: nn.Module) -> Optional[nn.Module]:
    """The layer a PEFT tuner layer wraps (``module.base_layer``), or None for any other module."""
    base = module._modules.get("base_layer")
    return base if isinstance(base, nn.Module) else None


@dataclass
class _Site:
    """One place a layer sits: ``match_name`` is what patterns see (PEFT's ``.base_layer`` left out), ``name`` the
    qualified name of the layer itself, which lives at ``parent.<attr>``."""

    match_name: str
    name: str
    parent: nn.Module
    attr: str
    module: nn.Module


def _sites(model: nn.Module) -> list:
    """Every module of ``model`` with where it sits, in ``named_modules`` order, looking through PEFT wrappers."""
    sites = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, (BayesianModule, nn.MultiheadAttention)):
            return
        for attr, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            base = _peft_base(child)
            if base is None:
                sites.append(_Site(name, name, module, attr, child))
                visit(child, name)
                continue
            parent, layer_name = child, f"{name}.base_layer"
            while _peft_base(base) is not None:  # PEFT layers can nest
                parent, base, layer_name = base, _peft_base(base), f"{layer_name}.base_layer"
            sites.append(_Site(name, layer_name, parent, "base_layer", base))
            visit(base, layer_name)

    visit(model, "")
    return sites


def bayesian_modules(model: nn.Module) -> list:
    """``(qualified name, module)`` of every Bayesian module of ``model`` (each once), in ``named_modules`` order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BayesianModule)]


def _bayesian_sites(model: nn.Module) -> list:
    """(name, parent, attr, module) of every place a Bayesian module sits (a shared module is listed per place)."""
    found = []

    def visit(module: nn.Module, prefix: str) -> None:
        for attr, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, BayesianModule):
                found.append((name, module, attr, child))
            else:
                visit(child, name)

    visit(model, "")
    return found


# --------------------------------------------------------------------------------------------------------------
# the public functions
# --------------------------------------------------------------------------------------------------------------

def patch(model: nn.Module, preset: Union[str, Preset] = "paper-dreambooth", *, targets: Optional[Sequence[str]] = None,
          sigma_init: float = 0.01, prior_sigma: float = 0.01, sigma_param: str = "direct",
          estimator: str = "reparam", rank: int = 4, bayes: str = "B", prior_dtype: Optional[torch.dtype] = None,
          freeze_others: bool = True) -> list:
    """Replace the target layers of ``model`` by Bayesian ones, in place; returns their qualified names.

    ``preset``: a name of ``PRESETS`` ("paper-dreambooth", "all-linear"; "paper-lora", "bayes-lora" and "all" are
    refused until their kernels exist) or a ``Preset``.  ``targets``: name patterns that replace the preset's (see
    the module docstring for the syntax); the preset still decides the layer kind and types.
    ``sigma_init`` / ``prior_sigma`` / ``sigma_param`` / ``estimator``: the posterior and prior of every patched
    layer.  ``rank`` / ``bayes``: the LoRA presets' rank and Bayesian factor ("A" or "B").  ``prior_dtype``: store
    the prior means in this dtype (e.g. ``torch.bfloat16``) instead of sharing the pretrained weights' storage.
    ``freeze_others``: set ``requires_grad=False`` on every parameter that is not part of a Bayesian module
    (``unpatch`` turns them back on).  Layers that are already Bayesian are left as they are.

    The returned names are where the Bayesian modules now sit (``model.get_submodule(name)``): for a layer wrapped
    by PEFT that is ``<wrapper>.base_layer``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = _check_preset(preset)
    options = dict(sigma_init=check_positive_float("sigma_init", sigma_init),
                   prior_sigma=check_positive_float("prior_sigma", prior_sigma), sigma_param=sigma_param,
                   estimator=estimator, rank=rank, bayes=spec.bayes or bayes, prior_dtype=prior_dtype)
    check_choice("sigma_param", sigma_param, SIGMA_PARAMS)
    check_choice("estimator", estimator, ESTIMATORS)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    check_choice("bayes", bayes, ("A", "B"))
    if prior_dtype is not None and not (isinstance(prior_dtype, torch.dtype) and prior_dtype.is_floating_point):
        raise TypeError(f"prior_dtype must be a floating torch.dtype or None, got {prior_dtype!r}")
    patterns = _patterns(targets) if targets is not None else [_Pattern(p) for p in spec.patterns]
    layer_types = tuple(_supported(spec))

    chosen, hits = [], {p.text: 0 for p in patterns}
    near = {p.text: [] for p in patterns}  # matched names that are not patchable, for the error message
    for site in _sites(model):
        matched = [p for p in patterns if p.matches(site.match_name)]
        if not matched:
            continue
        if isinstance(site.module, layer_types):
            chosen.append(site)
            for p in matched:
                hits[p.text] += 1
        elif isinstance(site.module, (BayesianModule, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "already Bayesian" if isinstance(site.module, BayesianModule) else type(site.module).__name__
            for p in matched:
                near[p.text].append(f"{site.match_name} ({kind})")
    unmatched = [text for text, count in hits.items() if count == 0]
    if not chosen or (targets is not None and unmatched):
        what = f"targets patterns {unmatched}" if targets is not None else f"preset {spec.name!r}"
        others = [name for text in (unmatched or hits) for name in near[text]]
        hint = ""
        if others:
            hint = (f"; what they match cannot be patched by this preset: {others[:4]}"
                    f"{' ...' if len(others) > 4 else ''}")
        wanted = " or ".join(t.__name__ for t in layer_types)
        raise ValueError(f"{what} matched no {wanted} module of {type(model).__name__}{hint}")

    factory = {t: _FACTORIES[(spec.kind, t)] for t in layer_types}
    replaced, made = [], {}
    for site in chosen:
        module = site.module
        layer = made.get(id(module))
        if layer is None:  # a module shared by several parents becomes one shared Bayesian module
            make = next(f for t, f in factory.items() if isinstance(module, t))
            layer = make(module, **options)
            layer.keep_original(module)
            made[id(module)] = layer
        setattr(site.parent, site.attr, layer)
        replaced.append(site.name)

    if freeze_others:
        bayes_params = {id(p) for _, m in bayesian_modules(model) for p in m.parameters()}
        frozen = model.__dict__.setdefault("_bnn_frozen_parameters", set())
        for name, param in model.named_parameters():
            if id(param) not in bayes_params and param.requires_grad:
                param.requires_grad_(False)
                frozen.add(name)
    return replaced


def kl_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the KL(q || p) of every Bayesian module: the KL each computed in its last forward (attached to that
    forward's graph: no second pass over the weights), or computed now from the parameters for a module whose last
    forward did not sample (or that has not run yet).  A float32 0-dim tensor; ValueError if nothing is Bayesian."""
    modules = bayesian_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no Bayesian module: call bnn_diffusion.patch first")
    total = None
    for _, module in modules:
        kl = module.last_kl if module.last_kl is not None else module.kl()
        total = kl if total is None else total + kl.to(total.device)
    return total


def merge(model: nn.Module) -> list:
    """Replace every Bayesian module by a plain module holding the posterior mean (``nn.Linear`` for
    ``BayesLinear``), in place; returns the qualified names replaced.  The merged model has the parameters and
    outputs of an unpatched model with those weights: zero inference cost.  The plain modules share the means'
    storage (no copy); the priors and sigmas are dropped."""
    return _replace_all(model, lambda module: module.to_plain())


def unpatch(model: nn.Module) -> list:
    """Restore the original modules with their pretrained weights and biases (put back from the prior means, no
    copy), in place; returns the qualified names restored.  Parameters that ``patch`` froze get
    ``requires_grad=True`` back.  The trained posterior is discarded: ``merge`` keeps it."""
    restored = _replace_all(model, lambda module: module.restore())
    frozen = model.__dict__.pop("_bnn_frozen_parameters", set())
    if frozen:
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(True)
    return restored


def _replace_all(model: nn.Module, convert) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names, done = [], {}
    for name, parent, attr, module in _bayesian_sites(model):
        new = done.get(id(module))
        if new is None:
            new = done[id(module)] = convert(module)
        setattr(parent, attr, new)
        names.append(name)
    return names
