"""bnn_diffusion: Bayesian few-shot fine-tuning of diffusers models on top of bnn_kernels."""
__version__ = "0.1.0"
