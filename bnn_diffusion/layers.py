"""Bayesian layers: modules that replace a pretrained layer by a Gaussian posterior over its weight.

``BayesianModule`` is the small protocol ``bnn_diffusion.patch`` relies on (``kl_loss``, ``merge``, ``unpatch``);
every Bayesian layer implements it, so new layer kinds (conv, LoRA) slot in without touching the patcher.

``BayesLinear`` wraps an ``nn.Linear``.  Its state dict keys are stable and documented:

==============  =========  =====================================================================================
key             kind       meaning
==============  =========  =====================================================================================
``weight_mu``   parameter  posterior mean of the weight, (out_features, in_features); initialised from the
                           pretrained weight
``weight_rho``  parameter  sigma parameter, same shape: sigma = rho ("direct", clamped at 1e-7) or softplus(rho)
``bias``        parameter  deterministic bias (trained, not Bayesian), (out_features,); absent when the layer
                           has no bias
``prior_mu``    buffer     prior mean of the weight = the pretrained weight (optionally in a smaller dtype)
``prior_bias``  buffer     the pretrained bias (what ``restore`` puts back); absent without a bias
==============  =========  =====================================================================================
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import bnn_kernels as bk
from bnn_kernels.checks import check_choice, check_positive_float
from bnn_kernels.sigma import ESTIMATORS, SIGMA_PARAMS, sigma_from_rho

SEED_HIGH = 2**62  # per-forward seeds are drawn uniformly from [0, SEED_HIGH)


def rho_for_sigma(sigma: float, sigma_param: str) -> float:
    """The rho whose sigma is ``sigma``: sigma itself ("direct") or softplus^-1(sigma) = log(expm1(sigma))."""
    return sigma if sigma_param == "direct" else math.log(math.expm1(sigma))


def draw_seed() -> torch.Tensor:
    """A fresh 0-dim int64 seed from torch's default CPU generator: ``torch.manual_seed`` reproduces a run, and
    ``torch.utils.checkpoint`` (which saves and restores that generator) recomputes with the same noise."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64)


class BayesianModule(nn.Module):
    """What every Bayesian layer provides to ``bnn_diffusion.patch``.

    * ``sample``: ``None`` (default) samples in ``train()`` mode and uses the mean in ``eval()`` mode; ``True`` /
      ``False`` force either (``True`` for Monte-Carlo evaluation).  ``sampling`` is the resolved value.
    * ``last_kl``: the KL(q || p) that the fused op returned in the last sampling forward (a float32 0-dim tensor,
      attached to the autograd graph of that forward), or ``None`` when no sampling forward has run since the
      last mean forward (a mean forward runs the plain deterministic op and does not compute a KL).
    * ``kl()``: the same KL computed directly from the current parameters (one pass over them).
    * ``to_plain()``: a plain deterministic module holding the posterior mean (``bnn_diffusion.merge``).
    * ``restore()``: the original module with the pretrained weights (``bnn_diffusion.unpatch``).
    * ``keep_original(module)``: called by ``patch`` with the module being replaced, so that ``restore`` can hand
      that very object back; an implementation must not keep its weights alive (they live on as the prior mean).
    """

    sample: Optional[bool]
    last_kl: Optional[torch.Tensor]

    @property
    def sampling(self) -> bool:
        return self.training if self.sample is None else bool(self.sample)

    def kl(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def to_plain(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def restore(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def keep_original(self, module: nn.Module) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __getstate__(self):
        # last_kl belongs to the autograd graph of one forward: deepcopy/pickle would fail on it (and should not
        # carry it), so copies start without one.
        state = dict(super().__getstate__())
        state["last_kl"] = None
        return state


class BayesLinear(BayesianModule):
    """A linear layer with a factorised Gaussian posterior N(mu, sigma^2) over its weight.

    Forward when sampling: ``bnn_kernels.bayes_linear`` with a fresh seed drawn from torch's default CPU generator
    (one weight sample per call, shared by the batch; the noise is regenerated from the seed in backward, never
    stored), prior N(``prior_mu``, ``prior_sigma``^2); the returned KL is kept in ``last_kl``.  Under
    ``torch.autocast`` the input is cast to the autocast dtype first, as ``nn.Linear`` would run.
    Forward when not sampling: ``F.linear(x, mu, bias)`` with mu and bias cast to x's dtype: exactly the cost of
    the original layer; ``last_kl`` becomes ``None`` (``bnn_diffusion.kl_loss`` then computes it directly).

    Seeds: under ``torch.compile`` with inductor, ``torch.randint`` is generated by inductor's own RNG (still seeded
    from torch's generator, so ``torch.manual_seed`` still reproduces a compiled run, but the seeds differ from an
    eager run's unless ``torch._inductor.config.fallback_random = True``).

    Build one with ``BayesLinear.from_linear(linear, ...)``; the constructor makes a freshly initialised layer
    (nn.Linear's initialisation, prior mean = that initial weight), e.g. as a target for ``load_state_dict``.

    Memory: ``weight_mu`` is a new tensor; ``prior_mu`` / ``prior_bias`` share the storage of the wrapped layer's
    weight and bias (no copy) unless ``prior_dtype`` differs from the weight's.  Relative to the wrapped layer the
    module therefore adds exactly ``weight_rho`` and the prior means (the bias prior is out_features elements).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sigma_init: float = 0.01,
                 prior_sigma: float = 0.01, sigma_param: str = "direct", estimator: str = "reparam",
                 prior_dtype: Optional[torch.dtype] = None, device=None, dtype=None) -> None:
        super().__init__()
        self.sigma_init = check_positive_float("sigma_init", sigma_init)
        self.prior_sigma = check_positive_float("prior_sigma", prior_sigma)
        check_choice("sigma_param", sigma_param, SIGMA_PARAMS)
        check_choice("estimator", estimator, ESTIMATORS)
        if prior_dtype is not None and not (isinstance(prior_dtype, torch.dtype) and prior_dtype.is_floating_point):
            raise TypeError(f"prior_dtype must be a floating torch.dtype or None, got {prior_dtype!r}")
        self.sigma_param = sigma_param
        self.estimator = estimator
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.sample = None
        self.last_kl = None
        factory = {"device": device, "dtype": dtype}
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.weight_rho = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        prior_factory = {"device": device, "dtype": prior_dtype or dtype}
        self.register_buffer("prior_mu", torch.empty(out_features, in_features, **prior_factory))
        self.register_buffer("prior_bias", torch.empty(out_features, **prior_factory) if bias else None)
        if self.weight_mu.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for mu and bias, sigma = sigma_init, prior = this initial mean and bias."""
        reference = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                              device=self.weight_mu.device, dtype=self.weight_mu.dtype)
        with torch.no_grad():
            self.weight_mu.copy_(reference.weight)
            self.weight_rho.fill_(rho_for_sigma(self.sigma_init, self.sigma_param))
            self.prior_mu.copy_(reference.weight)
            if self.bias is not None:
                self.bias.copy_(reference.bias)
                self.prior_bias.copy_(reference.bias)
        self.last_kl = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, sigma_init: float = 0.01, prior_sigma: float = 0.01,
                    sigma_param: str = "direct", estimator: str = "reparam",
                    prior_dtype: Optional[torch.dtype] = None) -> "BayesLinear":
        """A BayesLinear whose mean starts at ``linear``'s weight and bias and whose prior mean is that weight.

        ``linear`` is left intact: ``prior_mu`` (and ``prior_bias``) share its weight's (bias's) storage unless
        ``prior_dtype`` asks for another dtype (e.g. ``torch.bfloat16`` halves the prior's memory).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.device.type == "meta":
            raise ValueError("linear has weights on the meta device; load or materialise them before patching")
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, has_bias, sigma_init=sigma_init,
                    prior_sigma=prior_sigma, sigma_param=sigma_param, estimator=estimator, prior_dtype=prior_dtype,
                    device="meta", dtype=weight.dtype)
        layer.weight_mu = nn.Parameter(weight.clone())
        layer.weight_rho = nn.Parameter(torch.full_like(weight, rho_for_sigma(layer.sigma_init, sigma_param)))
        layer.prior_mu = weight if prior_dtype is None else weight.to(prior_dtype)
        if has_bias:
            bias = linear.bias.detach()
            layer.bias = nn.Parameter(bias.clone())
            layer.prior_bias = bias if prior_dtype is None else bias.to(prior_dtype)
        layer.train(linear.training)
        return layer

    # ---------------------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The posterior mean (read-only alias of ``weight_mu``) for code that inspects a layer's ``.weight``
        (dtype / device look-ups).  Code that computes with ``.weight`` directly gets the mean, never a sample."""
        return self.weight_mu

    @property
    def sigma(self) -> torch.Tensor:
        """sigma = s(rho), differentiable."""
        return sigma_from_rho(self.weight_rho, self.sigma_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            self.last_kl = None
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight_mu.to(x.dtype), bias)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        y, kl = bk.bayes_linear(x, self.weight_mu, self.weight_rho, self.bias, seed=draw_seed(),
                                prior_mu=self.prior_mu, prior_sigma=self.prior_sigma, sigma_param=self.sigma_param,
                                estimator=self.estimator)
        self.last_kl = kl
        return y

    def kl(self) -> torch.Tensor:
        """KL(q || p) summed over the weight, computed now from the current parameters (float32, differentiable)."""
        return bk.gaussian_kl(self.weight_mu, self.weight_rho, self.prior_mu, self.prior_sigma,
                              sigma_param=self.sigma_param)

    def to_linear(self, copy: bool = False) -> nn.Linear:
        """A plain nn.Linear holding the posterior mean and the bias.  Its parameters share this module's storage
        unless ``copy=True``."""
        mu = self.weight_mu.detach()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta",
                           dtype=mu.dtype)
        linear.weight = nn.Parameter(mu.clone() if copy else mu, requires_grad=self.weight_mu.requires_grad)
        if self.bias is not None:
            bias = self.bias.detach()
            linear.bias = nn.Parameter(bias.clone() if copy else bias, requires_grad=self.bias.requires_grad)
        linear.train(self.training)
        return linear

    def to_plain(self) -> nn.Module:
        return self.to_linear()

    def restore(self) -> nn.Module:
        """The layer with the pretrained weight and bias (from ``prior_mu`` / ``prior_bias``, in mu's dtype; no copy
        when they already have it).  When ``bnn_diffusion.patch`` made this layer, the very module object it
        replaced comes back (its class, hooks and attributes kept); otherwise a new nn.Linear.  With a prior stored
        in a smaller dtype (``prior_dtype``) the restored weights are the pretrained ones rounded to that dtype."""
        original = self.__dict__.get("_original")
        dtype = self.weight_mu.dtype
        grads = self.__dict__.get("_original_requires_grad", (True, True))
        if original is None:
            original = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta",
                                 dtype=dtype)
        original.weight = nn.Parameter(self.prior_mu.to(dtype), requires_grad=grads[0])
        if self.bias is not None:
            original.bias = nn.Parameter(self.prior_bias.to(dtype), requires_grad=grads[1])
        original.train(self.training)
        return original

    def keep_original(self, linear: nn.Linear) -> None:
        """Remember ``linear`` (the module this layer replaces) so ``restore`` can hand the same object back.

        Its weight and bias are swapped for meta tensors: the pretrained values live on in ``prior_mu`` /
        ``prior_bias`` (restored from there), so the kept module holds no memory and never goes stale when the
        model is moved or cast.  It is not a submodule: it appears in no state dict and no ``named_modules``.
        """
        self.__dict__["_original_requires_grad"] = (linear.weight.requires_grad,
                                                    linear.bias.requires_grad if linear.bias is not None else False)
        linear.weight = nn.Parameter(linear.weight.detach().to("meta"), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().to("meta"), requires_grad=False)
        self.__dict__["_original"] = linear

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"estimator={self.estimator}, sigma_param={self.sigma_param}, prior_sigma={self.prior_sigma:g}")
        if self.weight_rho.device.type != "meta" and self.weight_rho.numel():
            with torch.no_grad():
                sigma = self.sigma.float()
                text += (f", sigma(mean={sigma.mean().item():.3g}, min={sigma.min().item():.3g}, "
                         f"max={sigma.max().item():.3g})")
        if self.prior_mu is not None and self.prior_mu.dtype != self.weight_mu.dtype:
            text += f", prior_dtype={self.prior_mu.dtype}"
        if self.sample is not None:
            text += f", sample={self.sample}"
        return text
