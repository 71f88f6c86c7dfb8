"""Bayesian layers: modules that replace a pretrained layer by a Gaussian posterior over (part of) its weight.

``BayesianModule`` is what ``bnn_diffusion.patch`` relies on (``kl_loss``, ``merge``, ``unpatch``) and holds the
behaviour every Bayesian layer shares: the sample / mean switch, a fresh seed per sampling forward, autocast
handling, the KL, sigma statistics in ``repr``, and keeping the replaced module for ``unpatch``.  Four layers:

* ``BayesLinear`` / ``BayesConv2d``: full-rank posterior N(mu, sigma^2) over an ``nn.Linear`` / ``nn.Conv2d``
  weight, prior N(pretrained weight, prior_sigma^2); the bias is trained deterministically.
* ``BayesLoRALinear`` / ``BayesLoRAConv2d``: the pretrained layer frozen plus a LoRA update
  ``scale * B @ A`` (scale = lora_alpha / rank); one factor (``bayes="B"``, the paper; ``"A"``, BLoB) is Gaussian
  with prior N(0, prior_sigma^2), the other deterministic.  A starts as PEFT's (kaiming-uniform), B at 0, so the
  patched model starts as the pretrained one.

State-dict keys (stable; a checkpoint of a patched model loads into a freshly patched one):

``BayesLinear`` / ``BayesConv2d``

==============  =========  =====================================================================================
key             kind       meaning
==============  =========  =====================================================================================
``weight_mu``   parameter  posterior mean of the weight (the wrapped layer's weight shape); initialised from the
                           pretrained weight
``weight_rho``  parameter  sigma parameter, same shape: sigma = rho ("direct", clamped at 1e-7) or softplus(rho)
``bias``        parameter  deterministic bias (trained, not Bayesian); absent when the layer has no bias
``prior_mu``    buffer     prior mean of the weight = the pretrained weight (optionally in a smaller dtype)
``prior_bias``  buffer     the pretrained bias (what ``restore`` puts back); absent without a bias
==============  =========  =====================================================================================

``BayesLoRALinear`` / ``BayesLoRAConv2d``

==============  =========  =====================================================================================
key             kind       meaning
==============  =========  =====================================================================================
``weight``      parameter  the pretrained weight, frozen (``requires_grad=False``): same key as the wrapped layer
``bias``        parameter  the pretrained bias, frozen; absent when the layer has no bias
``lora_A``      parameter  down factor: (rank, in_features), or (rank, in_channels, kh, kw) for a conv (a conv
                           with the base's kernel, stride, padding and dilation)
``lora_B``      parameter  up factor: (out_features, rank), or (out_channels, rank, 1, 1) for a conv (1x1)
``lora_rho``    parameter  sigma parameter of the Bayesian factor (``bayes``), that factor's shape
==============  =========  =====================================================================================
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import bnn_kernels as bk
from bnn_kernels.checks import check_choice, check_positive_float, check_prior_sigma
from bnn_kernels.ops import LORA_FACTORS, explicit_conv_padding
from bnn_kernels.sigma import ESTIMATORS, SIGMA_PARAMS, sigma_from_rho

__all__ = ["BayesianModule", "BayesLinear", "BayesConv2d", "BayesLoRALinear", "BayesLoRAConv2d", "rho_for_sigma",
           "draw_seed", "LORA_FACTORS"]

SEED_HIGH = 2**62  # per-forward seeds are drawn uniformly from [0, SEED_HIGH)


def rho_for_sigma(sigma: float, sigma_param: str) -> float:
    """The rho whose sigma is ``sigma``: sigma itself ("direct") or softplus^-1(sigma) = log(expm1(sigma)),
    computed as sigma + log(1 - exp(-sigma)), which does not overflow for a large sigma."""
    return sigma if sigma_param == "direct" else sigma + math.log(-math.expm1(-sigma))


def draw_seed(device=None) -> torch.Tensor:
    """A fresh 0-dim int64 seed drawn on ``device`` (default CPU) from torch's default generator of that device:
    ``torch.manual_seed`` reproduces a run, and ``torch.utils.checkpoint`` (which saves and restores the
    generators of the CPU and of its inputs' GPUs) recomputes with the same noise.  Drawn on the GPU of the layer's
    input, the seed needs no host-to-device copy, which would wait for the GPU to finish its queued work at every
    layer."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)


def _check_dtype_option(name: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x cast to the autocast dtype when autocast is on for its device, as nn.Linear / nn.Conv2d would run."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


# --------------------------------------------------------------------------------------------------------------
# the shared base
# --------------------------------------------------------------------------------------------------------------

class BayesianModule(nn.Module):
    """What every Bayesian layer provides to ``bnn_diffusion.patch``, and the behaviour they share.

    * ``sample``: ``None`` (default) samples in ``train()`` mode and uses the mean in ``eval()`` mode; ``True`` /
      ``False`` force either (``True`` for Monte-Carlo evaluation).  ``sampling`` is the resolved value.
    * ``forward``: when sampling, the fused ``bnn_kernels`` op with a fresh seed from torch's default generator of
      the input's device (``draw_seed``; one sample per call, shared by the batch; the noise is regenerated from
      the seed in backward, never stored); under ``torch.autocast`` the input is cast to the autocast dtype
      first.  When not sampling, the plain deterministic computation with the posterior mean: the cost of the
      original layer.
    * ``last_kl``: the KL(q || p) that the op returned in the last sampling forward (a float32 0-dim tensor,
      attached to the autograd graph of that forward), or ``None`` when no sampling forward has run since the
      last mean forward (a mean forward does not compute a KL).
    * ``kl()``: the same KL computed directly from the current parameters (one pass over them).
    * ``mu`` / ``rho`` / ``prior_mu``: the Bayesian tensor's posterior mean, sigma parameter and prior mean (None
      means 0); ``sigma`` = s(rho).
    * ``to_plain()``: a plain deterministic module holding the posterior mean (``bnn_diffusion.merge``): the
      module ``patch`` replaced, handed over for good (a later ``restore`` makes a new one), or a new one.
    * ``restore()``: the original module with the pretrained weights (``bnn_diffusion.unpatch``).
    * ``keep_original(module)``: called by ``patch`` with the module being replaced, so that ``restore`` can hand
      that very object back; its weights are not kept alive (they live on in this module).

    Seeds under ``torch.compile`` with inductor: ``torch.randint`` is generated by inductor's own RNG (still seeded
    from torch's generator, so ``torch.manual_seed`` still reproduces a compiled run, but the seeds differ from an
    eager run's unless ``torch._inductor.config.fallback_random = True``).
    """

    sample: Optional[bool]
    last_kl: Optional[torch.Tensor]

    def _init_posterior(self, sigma_init: float, prior_sigma: float, sigma_param: str, estimator: str) -> None:
        self.sigma_init = check_positive_float("sigma_init", sigma_init)
        self.prior_sigma = check_prior_sigma(prior_sigma)
        check_choice("sigma_param", sigma_param, SIGMA_PARAMS)
        check_choice("estimator", estimator, ESTIMATORS)
        self.sigma_param = sigma_param
        self.estimator = estimator
        self.sample = None
        self.last_kl = None
        self._kl_versions = None  # _posterior_versions() when last_kl was computed
        self._kl_pending = False  # whether current_kl may still hand out last_kl (_pending_until_backward)

    # --- what a layer defines ---------------------------------------------------------------------------------
    @property
    def mu(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def rho(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _mean_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _sample_forward(self, x: torch.Tensor, seed: torch.Tensor):  # pragma: no cover - interface
        """(y, kl) from the fused op."""
        raise NotImplementedError

    plain_type: type  # nn.Linear / nn.Conv2d: what the layer wraps and what merge gives back

    def _plain_layer(self, device, dtype, bias: bool) -> nn.Module:  # pragma: no cover - interface
        """A plain layer of this layer's geometry (nn.Linear / nn.Conv2d), parameters initialised on ``device``."""
        raise NotImplementedError

    def to_plain(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def restore(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    # --- shared behaviour -------------------------------------------------------------------------------------
    @property
    def sampling(self) -> bool:
        return self.training if self.sample is None else bool(self.sample)

    @property
    def sigma(self) -> torch.Tensor:
        """sigma = s(rho), differentiable."""
        return sigma_from_rho(self.rho, self.sigma_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            self.last_kl = None
            return self._mean_forward(x)
        # the fused op runs in the dtypes it is given (autocast is off inside it): x in the autocast dtype, as
        # nn.Linear / nn.Conv2d would take it, the parameters in theirs
        x = _autocast_input(x)
        y, kl = self._sample_forward(x, draw_seed(x.device if x.is_cuda else None))
        self.last_kl = kl
        self._kl_versions = self._posterior_versions()
        self._kl_pending = _pending_until_backward(self, kl)
        return y

    def kl(self) -> torch.Tensor:
        """KL(q || p) summed over the Bayesian tensor, computed now from the current parameters (float32,
        differentiable)."""
        return bk.gaussian_kl(self.mu, self.rho, self.prior_mu, self.prior_sigma, sigma_param=self.sigma_param)

    def current_kl(self) -> torch.Tensor:
        """The KL of the current parameters: ``last_kl`` while it still is that and backward can still run through
        it (after an eager forward with autograd, until backward has run through that forward's op, and with no
        in-place change of mu, rho or the prior since), else ``kl()``."""
        if self.last_kl is None or not self._kl_pending or self._kl_versions != self._posterior_versions():
            return self.kl()
        return self.last_kl

    def _posterior_versions(self) -> tuple:
        """The autograd version counters of mu, rho and the prior mean (bumped by every in-place change except
        through ``.data``), and their dtypes (a cast)."""
        prior = self.prior_mu
        return (self.mu._version, self.rho._version, None if prior is None else prior._version,
                self.mu.dtype, None if prior is None else prior.dtype)

    def keep_original(self, module: nn.Module) -> None:
        """Remember ``module`` (the layer this one replaces) so ``restore`` can hand the same object back.

        Its weight and bias are swapped for meta tensors: the pretrained values live on in this module (restored
        from there), so the kept module holds no memory and never goes stale when the model is moved or cast.  It
        is not a submodule: it appears in no state dict and no ``named_modules``.
        """
        bias = module.bias
        self.__dict__["_original_requires_grad"] = (module.weight.requires_grad,
                                                    bias.requires_grad if bias is not None else False)
        module.weight = nn.Parameter(module.weight.detach().to("meta"), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to("meta"), requires_grad=False)
        self.__dict__["_original"] = module

    def _restored(self, weight: torch.Tensor, bias: Optional[torch.Tensor], requires_grad=None) -> nn.Module:
        """The kept original module (or a new plain one) holding ``weight`` / ``bias`` (shared, not copied) with
        the ``requires_grad`` flags it had before patching, or ``requires_grad`` (a pair) if given."""
        original = self.__dict__.get("_original")
        grads = requires_grad or self.__dict__.get("_original_requires_grad", (True, True))
        if original is None:
            original = self._plain_layer("meta", weight.dtype, bias is not None)
        original.weight = nn.Parameter(weight.detach(), requires_grad=grads[0])
        if bias is not None:
            original.bias = nn.Parameter(bias.detach(), requires_grad=grads[1])
        original.train(self.training)
        return original

    def _merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor], requires_grad) -> nn.Module:
        """``_restored`` with the merged ``weight``, handing the kept original over for good: a later ``restore``
        builds a new layer instead of overwriting the merged one's weights."""
        merged = self._restored(weight, bias, requires_grad)
        self.__dict__.pop("_original", None)
        return merged

    @classmethod
    def _pretrained_weight(cls, module: nn.Module) -> torch.Tensor:
        """``module``'s weight (detached), after checking that this class can wrap it."""
        if not isinstance(module, cls.plain_type):
            raise TypeError(f"{cls.__name__} wraps an nn.{cls.plain_type.__name__}, got {type(module).__name__}")
        weight = module.weight.detach()
        if weight.device.type == "meta":
            raise ValueError(f"the {cls.plain_type.__name__} has weights on the meta device; load or materialise "
                             f"them before patching")
        return weight

    def _plain_with(self, weight: torch.Tensor, bias: Optional[torch.Tensor], requires_grad) -> nn.Module:
        """A new plain layer of this geometry holding ``weight`` and ``bias`` (shared, not copied)."""
        layer = self._plain_layer("meta", weight.dtype, bias is not None)
        layer.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad[0])
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad[1])
        layer.train(self.training)
        return layer

    def _posterior_repr(self) -> str:
        text = f"estimator={self.estimator}, sigma_param={self.sigma_param}, prior_sigma={self.prior_sigma:g}"
        rho = self.rho
        if rho.device.type != "meta" and rho.numel():
            with torch.no_grad():
                sigma = self.sigma.float()
                text += (f", sigma(mean={sigma.mean().item():.3g}, min={sigma.min().item():.3g}, "
                         f"max={sigma.max().item():.3g})")
        if self.prior_mu is not None and self.prior_mu.dtype != self.mu.dtype:
            text += f", prior_dtype={self.prior_mu.dtype}"
        if self.sample is not None:
            text += f", sample={self.sample}"
        return text

    def __getstate__(self):
        # last_kl belongs to the autograd graph of one forward: deepcopy/pickle would fail on it (and should not
        # carry it), so copies start without one.
        state = dict(super().__getstate__())
        state["last_kl"] = None
        state["_kl_pending"] = False
        return state


def _pending_until_backward(layer: nn.Module, kl: torch.Tensor) -> bool:
    """Whether ``layer.current_kl`` may hand out this forward's ``kl``, and a hook that ends that when backward runs
    through the op: its graph is spent then (a second backward through it would fail), and an optimizer step may
    follow that bumps no version counter (fused AdamW, ``param.data`` updates).  Only in an eager forward with
    autograd: not under torch.compile (no node to hook), without autograd (reentrant checkpointing's first pass), or
    inside backward (a checkpointed forward recomputed); current_kl then computes the KL afresh."""
    if torch.compiler.is_compiling() or kl.grad_fn is None or torch._C._current_graph_task_id() != -1:
        return False
    layer_ref, forward_kl = weakref.ref(layer), weakref.ref(kl)  # no reference cycle through the graph

    def spent(_grad_outputs):
        owner = layer_ref()
        if owner is not None and owner.last_kl is not None and owner.last_kl is forward_kl():
            owner._kl_pending = False

    kl.grad_fn.register_prehook(spent)
    return True


# --------------------------------------------------------------------------------------------------------------
# geometry: what linear and conv layers need, whatever the posterior
# --------------------------------------------------------------------------------------------------------------

class _LinearGeometry:
    """in_features / out_features, F.linear, and nn.Linear as the plain layer."""

    plain_type = nn.Linear

    def _set_geometry(self, in_features: int, out_features: int) -> None:
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    @staticmethod
    def _geometry_of(linear: nn.Linear) -> dict:
        return dict(in_features=linear.in_features, out_features=linear.out_features)

    def _plain_layer(self, device, dtype, bias: bool) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias, device=device, dtype=dtype)

    def _plain_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _Conv2dGeometry:
    """nn.Conv2d's geometry (kernel, stride, padding, dilation, groups), F.conv2d, and nn.Conv2d as the plain layer.
    Only ``padding_mode="zeros"`` (what the fused ops implement) is accepted."""

    plain_type = nn.Conv2d

    def _set_geometry(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                      groups: int = 1) -> None:
        # nn.Conv2d's own normalisation (pairs, "same" / "valid", divisibility checks), on the meta device
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False,
                         device="meta")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    @staticmethod
    def _geometry_of(conv: nn.Conv2d) -> dict:
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; the Bayesian conv supports only 'zeros'")
        # the ops' padding rule, checked before the model is touched ("same" only where it is symmetric)
        explicit_conv_padding(conv.padding, conv.kernel_size, list(conv.stride), list(conv.dilation))
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def _conv_options(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def _plain_layer(self, device, dtype, bias: bool) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias, device=device, dtype=dtype)

    def _plain_forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, groups=self.groups, **self._conv_options())

    def _geometry_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text


# --------------------------------------------------------------------------------------------------------------
# full-rank posteriors
# --------------------------------------------------------------------------------------------------------------

class _FullRank(BayesianModule):
    """A factorised Gaussian posterior N(mu, sigma^2) over a layer's whole weight; prior N(prior_mu, prior_sigma^2).

    Memory: ``weight_mu`` is a new tensor; ``prior_mu`` / ``prior_bias`` share the storage of the wrapped layer's
    weight and bias (no copy) unless ``prior_dtype`` differs from the weight's.  Relative to the wrapped layer the
    module therefore adds exactly ``weight_rho`` and the prior means (the bias prior is out-channels elements).
    """

    def _init_full(self, weight_shape: tuple, out_features: int, bias: bool, *, sigma_init, prior_sigma,
                   sigma_param, estimator, prior_dtype, device, dtype) -> None:
        self._init_posterior(sigma_init, prior_sigma, sigma_param, estimator)
        _check_dtype_option("prior_dtype", prior_dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight_mu = nn.Parameter(torch.empty(weight_shape, **factory))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        prior_factory = {"device": device, "dtype": prior_dtype or dtype}
        self.register_buffer("prior_mu", torch.empty(weight_shape, **prior_factory))
        self.register_buffer("prior_bias", torch.empty(out_features, **prior_factory) if bias else None)
        if self.weight_mu.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The plain layer's initialisation for mu and bias, sigma = sigma_init, prior = this initial mean and
        bias.  The prior means become new tensors: a wrapped layer's share the pretrained weight's storage, which
        is left intact."""
        reference = self._plain_layer(self.weight_mu.device, self.weight_mu.dtype, self.bias is not None)
        with torch.no_grad():
            self.weight_mu.copy_(reference.weight)
            self.weight_rho.fill_(rho_for_sigma(self.sigma_init, self.sigma_param))
            self.prior_mu = reference.weight.detach().to(self.prior_mu.dtype)
            if self.bias is not None:
                self.bias.copy_(reference.bias)
                self.prior_bias = reference.bias.detach().to(self.prior_bias.dtype)
        self.last_kl = None

    @classmethod
    def _wrap(cls, module: nn.Module, *, sigma_init, prior_sigma, sigma_param, estimator, prior_dtype):
        weight = cls._pretrained_weight(module)
        has_bias = module.bias is not None
        layer = cls(**cls._geometry_of(module), bias=has_bias, sigma_init=sigma_init, prior_sigma=prior_sigma,
                    sigma_param=sigma_param, estimator=estimator, prior_dtype=prior_dtype, device="meta",
                    dtype=weight.dtype)
        layer.weight_mu = nn.Parameter(weight.clone())
        layer.weight_rho = nn.Parameter(torch.full_like(weight, rho_for_sigma(layer.sigma_init, sigma_param)))
        layer.prior_mu = weight if prior_dtype is None else weight.to(prior_dtype)
        if has_bias:
            bias = module.bias.detach()
            layer.bias = nn.Parameter(bias.clone())
            layer.prior_bias = bias if prior_dtype is None else bias.to(prior_dtype)
        layer.train(module.training)
        return layer

    @property
    def mu(self) -> torch.Tensor:
        return self.weight_mu

    @property
    def rho(self) -> torch.Tensor:
        return self.weight_rho

    @property
    def weight(self) -> torch.Tensor:
        """The posterior mean (read-only alias of ``weight_mu``) for code that inspects a layer's ``.weight``
        (dtype / device look-ups).  Code that computes with ``.weight`` directly gets the mean, never a sample."""
        return self.weight_mu

    def _mean_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._plain_forward(x, self.weight_mu.to(x.dtype), bias)

    def _plain_copy(self, copy: bool) -> nn.Module:
        mu = self.weight_mu.detach()
        bias = None if self.bias is None else self.bias.detach()
        flags = (self.weight_mu.requires_grad, self.bias is not None and self.bias.requires_grad)
        if copy:
            mu, bias = mu.clone(), None if bias is None else bias.clone()
        return self._plain_with(mu, bias, flags)

    def to_plain(self) -> nn.Module:
        """A plain layer holding the posterior mean and the bias (sharing this module's storage, with their
        ``requires_grad`` flags): the module ``bnn_diffusion.patch`` replaced (its class, hooks and attributes
        kept) when there is one, otherwise a new one."""
        mu = self.weight_mu.detach()
        bias = None if self.bias is None else self.bias.detach()
        return self._merged(mu, bias, (self.weight_mu.requires_grad,
                                       self.bias is not None and self.bias.requires_grad))

    def restore(self) -> nn.Module:
        """The layer with the pretrained weight and bias (from ``prior_mu`` / ``prior_bias``, in mu's dtype; no copy
        when they already have it).  When ``bnn_diffusion.patch`` made this layer, the very module object it
        replaced comes back (its class, hooks and attributes kept); otherwise a new plain layer.  With a prior
        stored in a smaller dtype (``prior_dtype``) the restored weights are the pretrained ones rounded to it."""
        dtype = self.weight_mu.dtype
        bias = None if self.bias is None else self.prior_bias.to(dtype)
        return self._restored(self.prior_mu.to(dtype), bias)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, bias={self.bias is not None}, {self._posterior_repr()}"


class BayesLinear(_LinearGeometry, _FullRank):
    """A linear layer with a factorised Gaussian posterior N(mu, sigma^2) over its weight.

    Sampling forward: ``bnn_kernels.bayes_linear`` (estimator "reparam": one weight sample per call; "lrt": noise on
    the output) with prior N(``prior_mu``, ``prior_sigma``^2).  Mean forward: ``F.linear(x, mu, bias)`` with mu and
    bias cast to x's dtype.  See ``BayesianModule`` for the shared behaviour and ``_FullRank`` for the memory.

    Build one with ``BayesLinear.from_linear(linear, ...)``; the constructor makes a freshly initialised layer
    (nn.Linear's initialisation, prior mean = that initial weight), e.g. as a target for ``load_state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sigma_init: float = 0.01,
                 prior_sigma: float = 0.01, sigma_param: str = "direct", estimator: str = "reparam",
                 prior_dtype: Optional[torch.dtype] = None, device=None, dtype=None) -> None:
        super().__init__()
        self._set_geometry(in_features, out_features)
        self._init_full((self.out_features, self.in_features), self.out_features, bias, sigma_init=sigma_init,
                        prior_sigma=prior_sigma, sigma_param=sigma_param, estimator=estimator,
                        prior_dtype=prior_dtype, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, sigma_init: float = 0.01, prior_sigma: float = 0.01,
                    sigma_param: str = "direct", estimator: str = "reparam",
                    prior_dtype: Optional[torch.dtype] = None) -> "BayesLinear":
        """A BayesLinear whose mean starts at ``linear``'s weight and bias and whose prior mean is that weight.

        ``linear`` is left intact: ``prior_mu`` (and ``prior_bias``) share its weight's (bias's) storage unless
        ``prior_dtype`` asks for another dtype (e.g. ``torch.bfloat16`` halves the prior's memory).
        """
        return cls._wrap(linear, sigma_init=sigma_init, prior_sigma=prior_sigma, sigma_param=sigma_param,
                         estimator=estimator, prior_dtype=prior_dtype)

    def _sample_forward(self, x, seed):
        return bk.bayes_linear(x, self.weight_mu, self.weight_rho, self.bias, seed=seed, prior_mu=self.prior_mu,
                               prior_sigma=self.prior_sigma, sigma_param=self.sigma_param, estimator=self.estimator)

    def to_linear(self, copy: bool = False) -> nn.Linear:
        """A plain nn.Linear holding the posterior mean and the bias.  Its parameters share this module's storage
        unless ``copy=True``."""
        return self._plain_copy(copy)


class BayesConv2d(_Conv2dGeometry, _FullRank):
    """A 2-D convolution with a factorised Gaussian posterior N(mu, sigma^2) over its kernel.

    Sampling forward: ``bnn_kernels.bayes_conv2d`` (reparam: one kernel sample per call; lrt: noise on the output)
    with prior N(``prior_mu``, ``prior_sigma``^2).  Mean forward: ``F.conv2d`` with mu.  Any stride, padding (ints,
    pairs, "same", "valid"), dilation and groups; ``padding_mode="zeros"`` only.  See ``BayesianModule`` for the
    shared behaviour and ``_FullRank`` for the memory.  Build one with ``BayesConv2d.from_conv(conv, ...)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, sigma_init: float = 0.01, prior_sigma: float = 0.01,
                 sigma_param: str = "direct", estimator: str = "reparam", prior_dtype: Optional[torch.dtype] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_full(shape, self.out_channels, bias, sigma_init=sigma_init, prior_sigma=prior_sigma,
                        sigma_param=sigma_param, estimator=estimator, prior_dtype=prior_dtype, device=device,
                        dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, sigma_init: float = 0.01, prior_sigma: float = 0.01,
                  sigma_param: str = "direct", estimator: str = "reparam",
                  prior_dtype: Optional[torch.dtype] = None) -> "BayesConv2d":
        """A BayesConv2d whose mean starts at ``conv``'s kernel and bias and whose prior mean is that kernel
        (shared with ``conv``, not copied, unless ``prior_dtype`` asks for another dtype)."""
        return cls._wrap(conv, sigma_init=sigma_init, prior_sigma=prior_sigma, sigma_param=sigma_param,
                         estimator=estimator, prior_dtype=prior_dtype)

    def _sample_forward(self, x, seed):
        return bk.bayes_conv2d(x, self.weight_mu, self.weight_rho, self.bias, groups=self.groups, seed=seed,
                               prior_mu=self.prior_mu, prior_sigma=self.prior_sigma, sigma_param=self.sigma_param,
                               estimator=self.estimator, **self._conv_options())

    def to_conv(self, copy: bool = False) -> nn.Conv2d:
        """A plain nn.Conv2d holding the posterior mean and the bias (sharing storage unless ``copy=True``)."""
        return self._plain_copy(copy)


# --------------------------------------------------------------------------------------------------------------
# LoRA with one Bayesian factor
# --------------------------------------------------------------------------------------------------------------

class _LoRA(BayesianModule):
    """Frozen pretrained layer plus ``scale * B @ A``, the factor named by ``bayes`` Gaussian with prior
    N(0, prior_sigma^2).

    Memory: ``weight`` / ``bias`` are the wrapped layer's own tensors (frozen, not copied); the module adds exactly
    ``lora_A``, ``lora_B`` and ``lora_rho``.
    """

    prior_mu = None  # the Bayesian factor's prior is centred at 0

    def _init_lora(self, weight_shape: tuple, out_features: int, bias: bool, a_shape: tuple, b_shape: tuple, *,
                   rank, lora_alpha, bayes, sigma_init, prior_sigma, sigma_param, estimator, lora_dtype, device,
                   dtype) -> None:
        self._init_posterior(sigma_init, prior_sigma, sigma_param, estimator)
        check_choice("bayes", bayes, LORA_FACTORS)
        _check_dtype_option("lora_dtype", lora_dtype)
        self.rank = rank
        self.lora_alpha = float(rank) if lora_alpha is None else check_positive_float("lora_alpha", lora_alpha)
        self.scale = self.lora_alpha / rank
        self.bayes = bayes
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        lora_factory = {"device": device, "dtype": lora_dtype or dtype}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **lora_factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **lora_factory))
        self.lora_rho = nn.Parameter(torch.empty(a_shape if bayes == "A" else b_shape, **lora_factory))
        if self.weight.device.type != "meta":
            reference = self._plain_layer(device, dtype, bias)
            with torch.no_grad():
                self.weight.copy_(reference.weight)
                if bias:
                    self.bias.copy_(reference.bias)
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as PEFT initialises it (kaiming-uniform, a = sqrt(5)), B = 0 (so the update starts at 0), sigma of the
        Bayesian factor = sigma_init."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            self.lora_rho.fill_(rho_for_sigma(self.sigma_init, self.sigma_param))
        self.last_kl = None

    @classmethod
    def _wrap(cls, module: nn.Module, *, rank, lora_alpha, bayes, sigma_init, prior_sigma, sigma_param, estimator,
              lora_dtype):
        weight = cls._pretrained_weight(module)
        layer = cls(**cls._geometry_of(module), bias=module.bias is not None, rank=rank, lora_alpha=lora_alpha,
                    bayes=bayes, sigma_init=sigma_init, prior_sigma=prior_sigma, sigma_param=sigma_param,
                    estimator=estimator, lora_dtype=lora_dtype, device="meta", dtype=weight.dtype)
        # the pretrained tensors themselves, frozen (new Parameter objects: the wrapped module's flags are untouched)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        factory = {"device": weight.device, "dtype": lora_dtype or weight.dtype}
        for name in ("lora_A", "lora_B", "lora_rho"):
            setattr(layer, name, nn.Parameter(torch.empty(getattr(layer, name).shape, **factory)))
        layer.reset_lora_parameters()
        layer.train(module.training)
        return layer

    @staticmethod
    def _check_rank(rank) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        return rank

    @property
    def mu(self) -> torch.Tensor:
        return self.lora_A if self.bayes == "A" else self.lora_B

    @property
    def rho(self) -> torch.Tensor:
        return self.lora_rho

    def _mean_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        base = self._plain_forward(x, self.weight.to(x.dtype), bias)
        return base + self.scale * self._lora_path(x, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        """weight + scale * B @ A with the posterior means, computed in float32 and returned in the weight's dtype."""
        with torch.no_grad():
            delta = self._lora_delta(self.lora_A.float(), self.lora_B.float())
            return (self.weight.float() + self.scale * delta).to(self.weight.dtype)

    def to_plain(self) -> nn.Module:
        """A plain layer holding ``merged_weight()`` and the bias (shared), frozen as the base was: the module
        ``bnn_diffusion.patch`` replaced (its class, hooks and attributes kept) when there is one, otherwise a new
        one."""
        return self._merged(self.merged_weight(), self.bias, (False, False))

    def restore(self) -> nn.Module:
        """The layer with the pretrained weight and bias (this module's frozen tensors, not copied): the very module
        ``bnn_diffusion.patch`` replaced when it made this layer, otherwise a new plain layer."""
        return self._restored(self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, bias={self.bias is not None}, rank={self.rank}, "
                f"lora_alpha={self.lora_alpha:g}, bayes={self.bayes}, {self._posterior_repr()}")


class BayesLoRALinear(_LinearGeometry, _LoRA):
    """A frozen ``nn.Linear`` plus a LoRA update ``scale * B @ A`` with one Bayesian factor.

    ``lora_A`` (rank, in_features), ``lora_B`` (out_features, rank), ``scale = lora_alpha / rank`` (``lora_alpha``
    defaults to rank: scale 1).  Sampling forward: ``bnn_kernels.bayes_lora_linear`` (the base GEMM and the
    low-rank path in one op).  Mean forward: ``F.linear(x, W, b) + scale * (x @ A.T) @ B.T``.  ``lora_dtype`` stores
    the factors in another dtype than the base weight (e.g. float32 factors over a bfloat16 model).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 4,
                 lora_alpha: Optional[float] = None, bayes: str = "B", sigma_init: float = 0.01,
                 prior_sigma: float = 0.01, sigma_param: str = "direct", estimator: str = "reparam",
                 lora_dtype: Optional[torch.dtype] = None, device=None, dtype=None) -> None:
        super().__init__()
        self._set_geometry(in_features, out_features)
        rank = self._check_rank(rank)
        self._init_lora((self.out_features, self.in_features), self.out_features, bias, (rank, self.in_features),
                        (self.out_features, rank), rank=rank, lora_alpha=lora_alpha, bayes=bayes,
                        sigma_init=sigma_init, prior_sigma=prior_sigma, sigma_param=sigma_param, estimator=estimator,
                        lora_dtype=lora_dtype, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int = 4, lora_alpha: Optional[float] = None, bayes: str = "B",
                    sigma_init: float = 0.01, prior_sigma: float = 0.01, sigma_param: str = "direct",
                    estimator: str = "reparam", lora_dtype: Optional[torch.dtype] = None) -> "BayesLoRALinear":
        """LoRA over ``linear`` (its weight and bias kept as the frozen base, not copied); A kaiming-uniform,
        B = 0, so the layer starts as ``linear``."""
        return cls._wrap(linear, rank=rank, lora_alpha=lora_alpha, bayes=bayes, sigma_init=sigma_init,
                         prior_sigma=prior_sigma, sigma_param=sigma_param, estimator=estimator, lora_dtype=lora_dtype)

    def _lora_path(self, x, lora_a, lora_b):
        return F.linear(F.linear(x, lora_a), lora_b)

    @staticmethod
    def _lora_delta(lora_a, lora_b):
        return lora_b @ lora_a

    def _sample_forward(self, x, seed):
        return bk.bayes_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_rho,
                                    scale=self.scale, bayes=self.bayes, seed=seed, prior_sigma=self.prior_sigma,
                                    sigma_param=self.sigma_param, estimator=self.estimator)


class BayesLoRAConv2d(_Conv2dGeometry, _LoRA):
    """A frozen ``nn.Conv2d`` plus a LoRA update with one Bayesian factor: ``lora_A`` (rank, in_channels, kh, kw) is
    a conv with the base's kernel, stride, padding and dilation and ``lora_B`` (out_channels, rank, 1, 1) a 1x1
    conv, as PEFT's LoRA for convolutions (whose ``lora_A`` has no dilation, though: ``save_lora`` refuses a dilated
    layer).  The base must be ungrouped (``groups=1``).  Sampling forward:
    ``bnn_kernels.bayes_lora_conv2d``.  Mean forward: ``conv(x, W, b) + scale * conv1x1(conv(x, A), B)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, rank: int = 4, lora_alpha: Optional[float] = None,
                 bayes: str = "B", sigma_init: float = 0.01, prior_sigma: float = 0.01, sigma_param: str = "direct",
                 estimator: str = "reparam", lora_dtype: Optional[torch.dtype] = None, device=None, dtype=None) -> None:
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if self.groups != 1:
            raise ValueError(f"a LoRA conv needs an ungrouped base conv (groups=1), got groups={self.groups}")
        rank = self._check_rank(rank)
        self._init_lora((self.out_channels, self.in_channels, *self.kernel_size), self.out_channels, bias,
                        (rank, self.in_channels, *self.kernel_size), (self.out_channels, rank, 1, 1), rank=rank,
                        lora_alpha=lora_alpha, bayes=bayes, sigma_init=sigma_init, prior_sigma=prior_sigma,
                        sigma_param=sigma_param, estimator=estimator, lora_dtype=lora_dtype,
                        device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, rank: int = 4, lora_alpha: Optional[float] = None, bayes: str = "B",
                  sigma_init: float = 0.01, prior_sigma: float = 0.01, sigma_param: str = "direct",
                  estimator: str = "reparam", lora_dtype: Optional[torch.dtype] = None) -> "BayesLoRAConv2d":
        """LoRA over ``conv`` (its kernel and bias kept as the frozen base, not copied); A kaiming-uniform, B = 0."""
        return cls._wrap(conv, rank=rank, lora_alpha=lora_alpha, bayes=bayes, sigma_init=sigma_init,
                         prior_sigma=prior_sigma, sigma_param=sigma_param, estimator=estimator, lora_dtype=lora_dtype)

    def _lora_path(self, x, lora_a, lora_b):
        return F.conv2d(F.conv2d(x, lora_a, **self._conv_options()), lora_b)

    @staticmethod
    def _lora_delta(lora_a, lora_b):
        return torch.einsum("or,rikl->oikl", lora_b[:, :, 0, 0], lora_a)

    def _sample_forward(self, x, seed):
        return bk.bayes_lora_conv2d(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_rho,
                                    scale=self.scale, bayes=self.bayes, seed=seed, prior_sigma=self.prior_sigma,
                                    sigma_param=self.sigma_param, estimator=self.estimator, **self._conv_options())
