"""bnn_diffusion: Bayesian few-shot fine-tuning of diffusers models on top of bnn_kernels.

``patch`` turns chosen layers of a model (a diffusers UNet or transformer, or any nn.Module) into Bayesian layers
in place; ``kl_loss`` sums their KL terms; ``merge`` folds the posterior means back into plain layers (zero
inference cost); ``unpatch`` restores the pretrained model; ``save_lora`` writes the posterior-mean LoRA factors
as a diffusers-loadable file.  ``cep.perturb`` is condition-embedding perturbation
for training; ``difffit.prepare`` / ``difffit.merge`` the DiffFit baseline.  Imports torch and bnn_kernels, never
triton.
"""
from . import cep, difffit
from .export import save_lora
from .layers import BayesConv2d, BayesianModule, BayesLinear, BayesLoRAConv2d, BayesLoRALinear
from .patch import PRESETS, Preset, bayesian_modules, kl_loss, merge, patch, unpatch

__all__ = ["patch", "unpatch", "merge", "kl_loss", "bayesian_modules", "PRESETS", "Preset", "BayesianModule",
           "BayesLinear", "BayesConv2d", "BayesLoRALinear", "BayesLoRAConv2d", "save_lora", "cep", "difffit"]
__version__ = "0.1.0"
