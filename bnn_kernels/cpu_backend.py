"""The ``cpu`` backend: the C++/OpenMP operators of ``bnn_kernels._C`` (csrc/), called as ``torch.ops.bnn_cpu.*``.

Follows the conventions of ``bnn_kernels.registry``.  The operators work one block of weight rows (of output
channels, for conv) at a time (eps and the weight sample exist only for one block of 64-256 rows, then are dropped;
a small weight is one block), draw the same
Philox normals as ``bnn_kernels.rng`` and compute the KL and its gradient inside the linear / conv op.  Usable when
the extension was built (``pip install --no-build-isolation .`` or ``-e .``).
"""
from __future__ import annotations

import torch

NAME = "cpu"

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.bnn_cpu)
    IMPORT_ERROR = None
except ImportError as error:  # not built (or built against another torch): the backend reports itself unusable
    _C = None
    IMPORT_ERROR = f"bnn_kernels._C could not be imported ({error}); build it with `pip install --no-build-isolation .`"


def is_available() -> bool:
    return _C is not None


def philox_normal(seed: torch.Tensor, numel: int, offset: int, device) -> torch.Tensor:
    return torch.ops.bnn_cpu.philox_normal(seed, int(numel), int(offset))


def gaussian_kl_fwd(mu, rho, prior_mu, prior_sigma: float, sigma_param: str) -> torch.Tensor:
    return torch.ops.bnn_cpu.gaussian_kl_fwd(mu, rho, prior_mu, float(prior_sigma), sigma_param)


def gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, prior_sigma: float, sigma_param: str):
    dmu, drho = torch.ops.bnn_cpu.gaussian_kl_bwd(grad_kl, mu, rho, prior_mu, float(prior_sigma), sigma_param)
    return dmu, drho


def linear_fwd(x, mu, rho, bias, prior_mu, seed, prior_sigma: float, sigma_param: str, estimator: str):
    y, kl, std = torch.ops.bnn_cpu.linear_fwd(x, mu, rho, bias, prior_mu, seed, float(prior_sigma), sigma_param,
                                              estimator)
    return y, kl, std


def linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, prior_sigma: float, sigma_param: str,
               estimator: str, need_dx: bool):
    dx, dmu, drho = torch.ops.bnn_cpu.linear_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std,
                                                 float(prior_sigma), sigma_param, estimator, bool(need_dx))
    return (dx if need_dx else None), dmu, drho


def conv_fwd(x, mu, rho, bias, prior_mu, seed, stride, padding, dilation, groups: int, prior_sigma: float,
             sigma_param: str, estimator: str):
    y, kl, std = torch.ops.bnn_cpu.conv_fwd(x, mu, rho, bias, prior_mu, seed, list(stride), list(padding),
                                            list(dilation), int(groups), float(prior_sigma), sigma_param, estimator)
    return y, kl, std


def conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, stride, padding, dilation, groups: int,
             prior_sigma: float, sigma_param: str, estimator: str, need_dx: bool):
    dx, dmu, drho = torch.ops.bnn_cpu.conv_bwd(grad_y, grad_kl, x, mu, rho, prior_mu, seed, std, list(stride),
                                               list(padding), list(dilation), int(groups), float(prior_sigma),
                                               sigma_param, estimator, bool(need_dx))
    return (dx if need_dx else None), dmu, drho


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, scale: float, bayes: str, prior_sigma: float,
                    sigma_param: str, estimator: str):
    return torch.ops.bnn_cpu.lora_linear_fwd(x, weight, bias, lora_a, lora_b, rho, seed, float(scale), bayes,
                                             float(prior_sigma), sigma_param, estimator)


def lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, scale: float, bayes: str,
                    prior_sigma: float, sigma_param: str, estimator: str, need_dx: bool):
    dx, da, db, drho = torch.ops.bnn_cpu.lora_linear_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h,
                                                         aux, float(scale), bayes, float(prior_sigma), sigma_param,
                                                         estimator, bool(need_dx))
    return (dx if need_dx else None), da, db, drho


def lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, stride, padding, dilation, scale: float, bayes: str,
                    prior_sigma: float, sigma_param: str, estimator: str):
    return torch.ops.bnn_cpu.lora_conv2d_fwd(x, weight, bias, lora_a, lora_b, rho, seed, list(stride), list(padding),
                                             list(dilation), float(scale), bayes, float(prior_sigma), sigma_param,
                                             estimator)


def lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h, aux, stride, padding, dilation,
                    scale: float, bayes: str, prior_sigma: float, sigma_param: str, estimator: str, need_dx: bool):
    dx, da, db, drho = torch.ops.bnn_cpu.lora_conv2d_bwd(grad_y, grad_kl, x, weight, lora_a, lora_b, rho, seed, h,
                                                         aux, list(stride), list(padding), list(dilation),
                                                         float(scale), bayes, float(prior_sigma), sigma_param,
                                                         estimator, bool(need_dx))
    return (dx if need_dx else None), da, db, drho
