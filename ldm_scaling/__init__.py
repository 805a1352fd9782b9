"""ldm-scaling: scaling studies of latent diffusion models in JAX/Flax."""

__version__ = "0.1.0"
