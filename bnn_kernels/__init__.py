"""bnn_kernels: fused Bayesian ops that sample weight noise on the fly and never store a weight sample.

Public API (see README): ``philox_normal``, ``gaussian_kl``, ``bayes_linear``, ``bayes_conv2d``, ``backends``,
``use_backend``, ``set_debug_checks``, ``bayes_lora_linear``, ``bayes_lora_conv2d``.
"""
from .registry import backends, use_backend
from .ops import bayes_conv2d, bayes_linear, gaussian_kl, philox_normal, set_debug_checks
from .ops import bayes_lora_conv2d, bayes_lora_linear

__all__ = ["philox_normal", "gaussian_kl", "bayes_linear", "bayes_conv2d", "backends", "use_backend",
           "set_debug_checks", "bayes_lora_linear", "bayes_lora_conv2d"]
__version__ = "0.1.0"
