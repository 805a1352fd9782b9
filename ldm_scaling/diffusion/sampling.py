"""The sample API: a whole trajectory as one compiled program, plus its sampling cost.

``run`` is the config-free core: ``(apply_fn, params, noise, context, uncond context, guidance
scales, schedule, key) -> samples``, compiled once per (apply_fn, schedule, prediction, sampler,
steps, options, guided?) and input shapes. ``sample`` reads those settings from a config and adds
the sampling cost of every sample from ``ldm_scaling.models.cost``:
``norm_cost x steps x evals_per_step x passes_per_step(w_b, cost.count_uncond_pass)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.diffusion import guidance, schedules
from ldm_scaling.diffusion import parametrisation as param
from ldm_scaling.diffusion import samplers as samplers_lib
from ldm_scaling.diffusion.samplers import Denoised, Grid, Options
from ldm_scaling.diffusion.schedules import Schedule
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import cost


def make_denoise(fn: Callable[[jax.Array, jax.Array], jax.Array], prediction: str, grid: Grid,
                 on_step: Callable[[Any], None] | None = None) -> samplers_lib.Denoise:
  """The helper every sampler gets: ``denoise(x, i)`` evaluates the (guided) model at grid step
  ``i`` and converts its output to x0 / eps / velocity at that step's noise level."""
  t, alpha, sigma = (jnp.asarray(a) for a in (grid.t, grid.alpha, grid.sigma))

  def denoise(x, i):
    if on_step is not None:
      jax.debug.callback(on_step, i)
    out = fn(x, t[i]).astype(x.dtype)
    x0, eps = param.to_x0_eps(prediction, out, x, alpha[i], sigma[i])
    vel = out if prediction == "flow" else eps - x0
    return Denoised(x0, eps, vel, out)
  return denoise


@functools.lru_cache(maxsize=64)
def program(apply_fn: guidance.ApplyFn, schedule: Schedule, prediction: str, sampler: str,
            steps: int, options: Options = Options(), guided: bool = True,
            on_step: Callable[[Any], None] | None = None):
  """``(jitted fn(params, noise, context, uncond_context, scales, keys) -> x, grid)``.

  Checks the combination and builds the grid on the host first, so bad input fails before
  anything is traced."""
  param.check(prediction)
  spec = samplers_lib.get(sampler)
  grid = samplers_lib.build_grid(sampler, schedule, steps, prediction, options)

  def fn(params, noise, context, uncond_context, scales, keys):
    model = guidance.model_fn(apply_fn, params, context, uncond_context if guided else None,
                              scales if guided else None)
    denoise = make_denoise(model, prediction, grid, on_step)
    return spec.run(denoise, noise, grid, keys, options)
  return jax.jit(fn), grid


def sample_keys(key: jax.Array, batch: int) -> jax.Array:
  """One key per sample: a (B,) batch of keys is used as is, a single key is split."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.shape == ():
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ConfigError(f"key has shape {key.shape}; give one key or one per sample ({batch},)")
  return key


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_MAX_COMPILED = 32  # executables kept (least recently used dropped first)


def _signature(args) -> Any:
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a))),
                      getattr(a, "sharding", None)) for a in leaves)


def compiled(prog, args, log: Callable[[str], None] | None = None) -> tuple[Any, float]:
  """AOT-compiles ``prog`` for ``args`` once (cached); returns (executable, compile seconds)."""
  key = (prog, _signature(args))
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key], 0.0
  if log:
    log("compiling the sampler program (once per sampler, steps and shapes)...")
  start = time.perf_counter()
  exe = prog.lower(*args).compile()
  seconds = time.perf_counter() - start
  if log:
    log(f"compiled in {seconds:.1f} s")
  _COMPILED[key] = exe
  while len(_COMPILED) > _MAX_COMPILED:
    _COMPILED.popitem(last=False)
  return exe, seconds


def run(apply_fn: guidance.ApplyFn, params, noise, context, *, key, schedule: Schedule,
        prediction: str = "eps", sampler: str = "ddim", steps: int = 50,
        options: Options = Options(), uncond_context=None, cfg_scale=None,
        on_step: Callable[[Any], None] | None = None,
        log: Callable[[str], None] | None = None) -> jax.Array:
  """Samples from ``noise`` (B, H, W, C) (standard normal: the start of every schedule).

  ``cfg_scale``: None, a number or a (B,) array; scales of 1 need no unconditional context.
  ``key``: one PRNG key, or one per sample (what stochastic samplers draw their noise from).
  """
  exe, args, _, _ = prepare(apply_fn, params, noise, context, key=key, schedule=schedule,
                            prediction=prediction, sampler=sampler, steps=steps, options=options,
                            uncond_context=uncond_context, cfg_scale=cfg_scale, on_step=on_step,
                            log=log)
  return exe(*args)


def prepare(apply_fn: guidance.ApplyFn, params, noise, context, *, key, schedule: Schedule,
            prediction: str = "eps", sampler: str = "ddim", steps: int = 50,
            options: Options = Options(), uncond_context=None, cfg_scale=None,
            on_step: Callable[[Any], None] | None = None,
            log: Callable[[str], None] | None = None):
  """What ``run`` does short of running: checks the inputs and returns ``(executable, args,
  guidance scales or None, compile seconds)``; ``executable(*args)`` samples (benchmarks time
  exactly that)."""
  noise = jnp.asarray(noise)
  context = jnp.asarray(context)
  if noise.ndim < 2:
    raise ConfigError(f"noise must be a batch (B, ...), got shape {noise.shape}")
  batch = noise.shape[0]
  if context.shape[0] != batch:
    raise ConfigError(f"context has batch {context.shape[0]} but noise has {batch}")
  scales = guidance.check_scales(cfg_scale, batch)
  guided = scales is not None
  uncond = guidance.check_uncond(uncond_context, context.shape) if guided else jnp.zeros((0,))
  prog, _ = program(apply_fn, schedule, prediction, sampler, steps, options, guided, on_step)
  args = (params, noise, context, uncond, jnp.asarray(scales if guided else np.zeros(0)),
          sample_keys(key, batch))
  exe, compile_s = compiled(prog, args, log)
  return exe, args, scales, compile_s


@dataclasses.dataclass
class Samples:
  x: jax.Array            # (B, H, W, C) final latents
  cost: np.ndarray        # (B,) sampling cost of each sample (normalised cost units)
  cfg_scale: np.ndarray   # (B,) guidance scale of each sample (1 = unguided)
  sampler: str
  steps: int
  compile_s: float        # seconds spent compiling (0 when the program was cached)
  run_s: float            # seconds of the trajectory itself


def sample_cost(norm_cost: float, sampler: str, steps: int, scales: np.ndarray,
                count_uncond_pass: bool, relative_steps=None) -> np.ndarray:
  """Per-sample sampling cost under the cost model's convention; ``relative_steps``: a
  scale-wise trajectory's per-step cost relative to a full-size step (``cost.step_costs``)."""
  evals = steps * samplers_lib.get(sampler).evals_per_step
  return np.array([cost.sampling_cost(norm_cost, evals, float(w), count_uncond_pass,
                                      relative_steps) for w in scales])


def sample(config, apply_fn: guidance.ApplyFn, params, noise, context, *, key,
           uncond_context=None, cfg_scale=None, sampler: str | None = None,
           steps: int | None = None, norm_cost: float | None = None,
           on_step: Callable[[Any], None] | None = None,
           log: Callable[[str], None] | None = None) -> Samples:
  """Samples with a config's schedule, parametrisation and eval defaults, and prices each sample.

  ``sampler`` / ``steps`` default to the first of ``config.eval.samplers`` / ``eval.steps``;
  ``norm_cost`` (the model's normalised cost) is measured from ``config.model`` when not given.
  """
  sampler = sampler if sampler is not None else config.eval.samplers[0]
  steps = steps if steps is not None else int(config.eval.steps[0])
  schedule = schedules.schedule_from_config(config.diffusion)
  options = samplers_lib.options_from_config(config)
  # Check everything cheap before measuring the model's cost (which compiles a forward).
  samplers_lib.build_grid(sampler, schedule, steps, config.diffusion.prediction, options)
  batch = np.shape(noise)[0]
  scales = guidance.check_scales(cfg_scale, batch)
  if norm_cost is None:
    norm_cost = cost.model_cost(config.model, config.cost).norm_cost
  exe, args, _, compile_s = prepare(
      apply_fn, params, noise, context, key=key, schedule=schedule,
      prediction=config.diffusion.prediction, sampler=sampler, steps=steps, options=options,
      uncond_context=uncond_context, cfg_scale=cfg_scale, on_step=on_step, log=log)
  start = time.perf_counter()
  x = jax.block_until_ready(exe(*args))
  run_s = time.perf_counter() - start
  w = scales if scales is not None else np.ones(batch, np.float32)
  sides = samplers_lib.step_sides(sampler, options)
  relative = cost.step_costs(config.model, config.cost, sides) if sides else None
  return Samples(x=x, cost=sample_cost(norm_cost, sampler, steps, w,
                                       config.cost.count_uncond_pass, relative),
                 cfg_scale=w, sampler=sampler, steps=steps, compile_s=compile_s, run_s=run_s)
