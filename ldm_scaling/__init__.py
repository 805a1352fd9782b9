"""ldm-scaling: scaling studies of latent diffusion models in JAX/Flax."""

import os

# TensorFlow is installed for clu's TensorBoard writer only: keep transformers off it and quiet.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
