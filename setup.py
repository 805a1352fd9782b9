"""ldm-scaling: scaling studies of latent diffusion models in JAX/Flax."""
import setuptools

# One pinned set, verified together on CPU (see docs/environment.md). transformers must stay < 5:
# v5 removed the Flax models this project uses for the text encoder and CLIP score.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "huggingface-hub==0.36.2",
    "absl-py",
    "numpy>=2.0",
    "pillow",
    "importlib_resources",
]

# Test/benchmark-only references. torch is pinned to the CPU build that ships on the machines here;
# an unpinned `torch` would pull a multi-GB CUDA build.
TEST_REQUIRES = [
    "pytest",
    "torch==2.13.0",
    "diffusers==0.35.2",
]

setuptools.setup(
    name="ldm-scaling",
    version="0.1.0",
    description="JAX/Flax framework for scaling studies of latent diffusion models.",
    packages=setuptools.find_packages(include=["ldm_scaling", "ldm_scaling.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["ldm-scaling=ldm_scaling.cli:main"]},
)
