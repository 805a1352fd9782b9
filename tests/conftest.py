"""Shared test setup: tiny configs and a hermetic environment (no TF import, no network)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compiled programs (a tiny UNet's init alone compiles for ~25 s on CPU) are shared by every test
# and subprocess of a run through JAX's persistent cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax-tests"))

import pytest  # pylint: disable=g-import-not-at-top

from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_jax()


def tiny_config(width: int = 32, cross_attn_dim: int = 24):
  """The base config shrunk to a UNet that initialises in a second (test-only size)."""
  config = cfglib.base_config()
  config.model.update(width=width, head_dim=16, num_heads=0, cross_attn_dim=cross_attn_dim)
  return config


@pytest.fixture
def repo_dir():
  return REPO
