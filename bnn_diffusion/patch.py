"""Turn a diffusers model into a Bayesian one in place, and back: ``patch``, ``kl_loss``, ``merge``, ``unpatch``.

Target selection
----------------
A preset (or the ``targets`` argument, which replaces the preset's patterns) is a list of **glob patterns**
(``fnmatch`` syntax: ``*`` matches any characters, dots included; ``?``, ``[seq]``) matched against the **suffixes of
a module's qualified name taken at dot boundaries**: ``"attn1.to_q"`` matches
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` but not ``...attn1.to_q_extra`` nor
``...xattn1.to_q``; ``"*"`` matches everything.  A pattern that starts with ``re:`` is a regular expression that must
match such a suffix entirely (``re.fullmatch``), e.g. ``"re:attn[12]\\.to_(q|k|v)"``.

Only modules of the preset's layer types are candidates (``nn.Linear``; ``nn.Conv2d`` too for "all" and the LoRA
presets, whose own patterns name only linears but whose ``targets`` may name convs).
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

from bnn_kernels.checks import check_choice, check_positive_float, check_prior_sigma
from bnn_kernels.sigma import ESTIMATORS, SIGMA_PARAMS

from .layers import (LORA_FACTORS, BayesConv2d, BayesianModule, BayesLinear, BayesLoRAConv2d,
                     BayesLoRALinear)

__all__ = ["Preset", "PRESETS", "patch", "kl_loss", "merge", "unpatch", "bayesian_modules"]

_ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# The LoRA presets: every attention projection.  UNet / DiT (BasicTransformerBlock): self-attention attn1 and
# cross-attention attn2; SD3 / Flux joint blocks: both streams of the joint attention; Flux single blocks: q/k/v.
_LORA_PATTERNS = (tuple(f"attn{i}.{p}" for i in (1, 2) for p in _ATTN_PROJECTIONS)
                  + tuple(f"transformer_blocks.*.attn.{p}" for p in _ATTN_PROJECTIONS + _JOINT_TEXT_PROJECTIONS)
                  + tuple(f"single_transformer_blocks.*.attn.{p}" for p in ("to_q", "to_k", "to_v")))


@dataclass(frozen=True)
class Preset:
    """A named target set: which layers (``patterns`` over ``layer_types``) become which kind of Bayesian layer.

    ``kind`` is ``"full"`` (full-rank posterior over the layer's weight) or ``"lora"`` (frozen layer + LoRA factors,
    one of them Bayesian; ``bayes`` is the factor taken when ``patch`` is not given one).
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
    "all": Preset("all", ("*",), "full", (nn.Linear, nn.Conv2d),
                  "every nn.Linear and nn.Conv2d of the model, full-rank posterior"),
    "paper-lora": Preset(
        "paper-lora", _LORA_PATTERNS, "lora", (nn.Linear, nn.Conv2d),
        "the paper's LoRA set: LoRA (rank 4) on the q/k/v/out projections of every attention layer (UNet: attn1 "
        "and attn2; SD3/Flux: both streams of the joint attention; Flux single blocks: q/k/v), the B factor "
        "Bayesian (mean init 0) with prior N(0, 0.01^2), sigma direct 0.01", bayes="B"),
    "bayes-lora": Preset(
        "bayes-lora", _LORA_PATTERNS, "lora", (nn.Linear, nn.Conv2d),
        "BLoB-style LoRA on the same projections as paper-lora, the A factor Bayesian (mean init kaiming-uniform) "
        "with prior N(0, prior_sigma^2)", bayes="A"),
}

# (kind, layer type) -> factory(module, **options) -> BayesianModule.  The options are patch's keyword arguments:
# sigma_init, prior_sigma, sigma_param, estimator, prior_dtype (full-rank), rank, lora_alpha, bayes, lora_dtype
# (LoRA).  A new layer kind registers here.

def _make_full(layer_cls):
    def make(module, *, sigma_init, prior_sigma, sigma_param, estimator, prior_dtype, **_):
        return layer_cls._wrap(module, sigma_init=sigma_init, prior_sigma=prior_sigma, sigma_param=sigma_param,
                               estimator=estimator, prior_dtype=prior_dtype)
    return make


def _make_lora(layer_cls):
    def make(module, *, sigma_init, prior_sigma, sigma_param, estimator, rank, lora_alpha, bayes, lora_dtype, **_):
        return layer_cls._wrap(module, rank=rank, lora_alpha=lora_alpha, bayes=bayes, sigma_init=sigma_init,
                               prior_sigma=prior_sigma, sigma_param=sigma_param, estimator=estimator,
                               lora_dtype=lora_dtype)
    return make


_FACTORIES: dict = {
    ("full", nn.Linear): _make_full(BayesLinear),
    ("full", nn.Conv2d): _make_full(BayesConv2d),
    ("lora", nn.Linear): _make_lora(BayesLoRALinear),
    ("lora", nn.Conv2d): _make_lora(BayesLoRAConv2d),
}


def _check_preset(preset) -> Preset:
    if isinstance(preset, Preset):
        spec = preset
    elif isinstance(preset, str) and preset in PRESETS:
        spec = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    missing = [t.__name__ for t in spec.layer_types if (spec.kind, t) not in _FACTORIES]
    if missing or not spec.layer_types:
        kinds = sorted({(kind, t.__name__) for kind, t in _FACTORIES})
        raise ValueError(f"preset {spec.name!r} asks for kind {spec.kind!r} on layer types {missing or '()'}; "
                         f"bnn_diffusion has Bayesian layers for (kind, type) {kinds}")
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


_PATCHABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_not_in_ddp(model: nn.Module) -> None:
    """TypeError if DistributedDataParallel wraps ``model`` (at any depth of the training wrappers)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("cannot patch a model inside DistributedDataParallel: DDP averages the gradients of the "
                            "parameters it was built with, which would leave out the Bayesian ones; patch the model "
                            "first, then wrap it (accelerator.prepare after bnn_diffusion.patch)")
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, nn.DataParallel):
            model = model.module
        else:
            return


def _replaces_more_than_the_plain_layer(module: nn.Module) -> Optional[str]:
    """Why replacing this ``nn.Linear`` / ``nn.Conv2d`` (subclass) by a Bayesian layer, which computes the plain
    layer's function, would drop part of what it computes, or None.  diffusers' ``LoRACompatibleLinear`` / ``Conv``
    override ``forward`` but compute the plain function while their ``lora_layer`` is None."""
    children = [name for name, child in module.named_children() if child is not None]
    if children:
        return f"its {type(module).__name__} has submodules ({', '.join(children[:3])}) that its forward uses"
    plain = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not plain.forward and getattr(module, "lora_layer", False) is not None:
        return f"{type(module).__name__} has a forward of its own"
    return None


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


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers of training: torch.compile's module (``_orig_mod``) and (Distributed)
    DataParallel (``module``).  Every public function works on it, so names (``save_lora``'s keys among them) and
    what ``patch`` records for ``unpatch`` are the model's own, whichever wrapper is passed."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def bayesian_modules(model: nn.Module) -> list:
    """``(qualified name, module)`` of every Bayesian module of ``model`` (each once), in ``named_modules`` order;
    names as in the model inside torch.compile / DDP wrappers."""
    return [(name, module) for name, module in unwrapped(model).named_modules() if isinstance(module, BayesianModule)]


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
          estimator: str = "reparam", rank: int = 4, bayes: Optional[str] = None,
          lora_alpha: Optional[float] = None, prior_dtype: Optional[torch.dtype] = None,
          lora_dtype: Optional[torch.dtype] = None, freeze_others: bool = True) -> list:
    """Replace the target layers of ``model`` by Bayesian ones, in place; returns their qualified names.

    ``preset``: a name of ``PRESETS`` or a ``Preset``.  ``targets``: name patterns that replace the preset's (see
    the module docstring for the syntax); the preset still decides the layer kind and types.
    ``sigma_init`` / ``prior_sigma`` / ``sigma_param`` / ``estimator``: the posterior and prior of every patched
    layer.  Full-rank presets: ``prior_dtype`` stores the prior means in this dtype (e.g. ``torch.bfloat16``)
    instead of sharing the pretrained weights' storage.  LoRA presets: ``rank``; ``lora_alpha`` (scale =
    lora_alpha / rank; default rank, scale 1); ``bayes`` the Bayesian factor, "A" or "B" (default: the preset's,
    "B" for "paper-lora", "A" for "bayes-lora"); ``lora_dtype`` the factors' dtype (default: the base weight's).
    ``freeze_others``: set ``requires_grad=False`` on every parameter that is not trained by a Bayesian module
    (``unpatch`` turns them back on); the frozen base of a LoRA layer is frozen regardless.  Layers that are already
    Bayesian are left as they are; every ``targets`` pattern (or, without ``targets``, the preset as a whole) must
    match at least one layer that is not, else ValueError.

    The returned names are where the Bayesian modules now sit (``model.get_submodule(name)``): for a layer wrapped
    by PEFT that is ``<wrapper>.base_layer``.  A model wrapped by torch.compile or DataParallel is patched inside
    the wrapper, with the names of the model inside (``unwrapped``); one passed wrapped by DistributedDataParallel
    is refused (TypeError): DDP averages the gradients of the parameters it was built with, which would leave out
    every Bayesian one, so patch first and wrap after (the module inside a DDP, passed alone, is not detected).
    A subclass of ``nn.Linear`` / ``nn.Conv2d`` with submodules or its own ``forward`` (which a Bayesian layer would
    drop) is refused (ValueError), except diffusers' ``LoRACompatible*`` layers without a LoRA layer, which compute
    the plain function.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_not_in_ddp(model)
    model = unwrapped(model)
    spec = _check_preset(preset)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if bayes is not None:
        check_choice("bayes", bayes, LORA_FACTORS)
    options = dict(sigma_init=check_positive_float("sigma_init", sigma_init),
                   prior_sigma=check_prior_sigma(prior_sigma), sigma_param=sigma_param,
                   estimator=estimator, rank=rank, bayes=bayes or spec.bayes or "B", prior_dtype=prior_dtype,
                   lora_alpha=None if lora_alpha is None else check_positive_float("lora_alpha", lora_alpha),
                   lora_dtype=lora_dtype)
    check_choice("sigma_param", sigma_param, SIGMA_PARAMS)
    check_choice("estimator", estimator, ESTIMATORS)
    for name, dtype in (("prior_dtype", prior_dtype), ("lora_dtype", lora_dtype)):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
    patterns = _patterns(targets) if targets is not None else [_Pattern(p) for p in spec.patterns]
    layer_types = spec.layer_types

    chosen, hits = [], {p.text: 0 for p in patterns}
    near = {p.text: [] for p in patterns}  # matched names that are not patchable, for the error message
    sites = _sites(model)
    for site in sites:
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

    # a module used at several places is patched at all of them or none: the places left would hold the replaced
    # module, whose weights move into the Bayesian layer (keep_original)
    chosen_modules = {id(site.module): site for site in chosen}
    chosen_places = {id(site) for site in chosen}
    for site in sites:
        first = chosen_modules.get(id(site.module))
        if first is not None and id(site) not in chosen_places:
            raise ValueError(f"cannot patch {first.name}: the same module is also used at {site.name}, which the "
                             f"targets do not match; patch both places (add {site.match_name!r} to targets) or "
                             f"neither")

    # build every Bayesian layer first (this reads the model and may still refuse a layer), then swap them in
    factory = {t: _FACTORIES[(spec.kind, t)] for t in layer_types}
    made = {}
    for site in chosen:
        module = site.module
        if id(module) not in made:  # a module shared by several parents becomes one shared Bayesian module
            make = next(f for t, f in factory.items() if isinstance(module, t))
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype not in _PATCHABLE_DTYPES:
                raise ValueError(f"cannot patch {site.name}: its weight is {weight.dtype} (a quantised or "
                                 "float8-cast layer?); Bayesian layers need float32, float16, bfloat16 or float64 "
                                 "weights: patch before quantising or casting")
            why = _replaces_more_than_the_plain_layer(module)
            if why:
                raise ValueError(f"cannot patch {site.name}: {why}; a Bayesian layer computes the plain "
                                 f"{'Linear' if isinstance(module, nn.Linear) else 'Conv2d'} only (leave it out "
                                 f"of targets)")
            try:
                made[id(module)] = make(module, **options)
            except (TypeError, ValueError) as error:
                raise type(error)(f"cannot patch {site.name}: {error}") from None
    replaced, kept = [], set()
    for site in chosen:
        layer = made[id(site.module)]
        if id(layer) not in kept:
            layer.keep_original(site.module)
            kept.add(id(layer))
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
    """Sum of the KL(q || p) of every Bayesian module at its current parameters: the KL each computed in its last
    forward (attached to that forward's graph: no second pass over the weights) until backward has run through
    that forward, else computed now from the parameters (a module whose last forward did not sample or has not
    run, whose graph is spent or parameters changed since, e.g. ``kl_loss`` written before this step's forward,
    whose forward ran without autograd, or under torch.compile).  A float32 0-dim tensor; ValueError if nothing is
    Bayesian."""
    modules = bayesian_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no Bayesian module: call bnn_diffusion.patch first")
    total = None
    for _, module in modules:
        kl = module.current_kl()
        total = kl if total is None else total + kl.to(total.device)
    return total


def merge(model: nn.Module) -> list:
    """Replace every Bayesian module by a plain ``nn.Linear`` / ``nn.Conv2d`` holding the posterior mean, in place
    (the very module ``patch`` replaced, its hooks and attributes kept, where there is one); returns the qualified
    names replaced.  Full-rank layers: the mean and bias (sharing their storage, no copy);
    LoRA layers: the base weight + scale * B @ A with the factors' means (a new tensor).  The merged model has the
    parameters and outputs of an unpatched model with those weights: zero inference cost.  The priors and sigmas
    are dropped.  What ``patch(freeze_others=True)`` froze stays frozen, so the merged layers train alone as the
    Bayesian ones did (a plain fine-tune of the same layer set: patch, then merge); ``unpatch`` afterwards gives
    those parameters their gradients back.  The merged layers keep the posterior mean's flags (LoRA layers:
    frozen, as their base was)."""
    return _replace_all(model, lambda module: module.to_plain())


def unpatch(model: nn.Module) -> list:
    """Restore the original modules with their pretrained weights and biases (put back from the prior means or the
    frozen LoRA base, no copy), in place; returns the qualified names restored.  Parameters that ``patch`` froze get
    ``requires_grad=True`` back.  The trained posterior is discarded: ``merge`` keeps it."""
    restored = _replace_all(model, lambda module: module.restore())
    _unfreeze_others(model)
    return restored


def _unfreeze_others(model: nn.Module) -> None:
    """``requires_grad=True`` back on the parameters ``patch(freeze_others=True)`` froze, and forget them."""
    model = unwrapped(model)
    frozen = model.__dict__.pop("_bnn_frozen_parameters", set())
    if frozen:
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(True)


def _replace_all(model: nn.Module, convert) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrapped(model)
    names, done = [], {}
    for name, parent, attr, module in _bayesian_sites(model):
        new = done.get(id(module))
        if new is None:
            new = done[id(module)] = convert(module)
        setattr(parent, attr, new)
        names.append(name)
    return names
