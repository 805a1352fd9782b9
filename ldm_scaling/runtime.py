"""Process-wide JAX settings, applied once by every entry point (CLI, tests, notebooks)."""

from __future__ import annotations

import importlib.util
import os

import jax

from ldm_scaling import files


def default_cache_dir() -> str:
  return os.path.join(files.cache_root(), "jax")


def configure_jax(compilation_cache: str | None = None) -> None:
  """Random numbers independent of sharding (big_vision's habit) and a persistent compilation
  cache: XLA's CPU compile of a model's init (hundreds of RNG calls) takes 20 s+ and is paid once
  per shape instead of once per process. ``JAX_COMPILATION_CACHE_DIR`` wins if set."""
  jax.config.update("jax_threefry_partitionable", True)
  _skip_tpu_probe()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", compilation_cache or default_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_once(fn, *args, out_shardings=None, static_argnums=()):
  """``jax.jit(fn)(*args)`` for a program that runs once, such as a model's initialisation.

  On CPU it is compiled without backend optimisation: XLA:CPU then compiles a UNet's init (a
  hundred random-number calls) in half the time, and the values are bitwise the same (both
  measured in benchmarks/README.md). Other backends compile it as usual."""
  jitted = jax.jit(fn, out_shardings=out_shardings, static_argnums=static_argnums)
  dynamic = [a for i, a in enumerate(args) if i not in static_argnums]
  if jax.default_backend() != "cpu":
    return jitted(*args)
  compiled = jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
  return compiled(*dynamic)


def _skip_tpu_probe() -> None:
  """With libtpu installed (the ``tpu`` extra, for ``ldm-scaling plan``) JAX would try a TPU
  backend on every host, and on one without TPU chips libtpu probes the host and logs errors
  before JAX falls back. Where no chip is attached and ``JAX_PLATFORMS`` is unset, the platforms
  are this host's (CPU, or CUDA with its plugin): runs behave as without libtpu. Planning still
  reaches the TPU compiler (``jax.experimental.topologies``)."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except (ImportError, AttributeError):  # a private module: absent in another jax
    return
  if chips:
    return
  cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
  jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")
