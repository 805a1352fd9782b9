"""SwD's premise (its Table 1, issue 17's E0), measured without training: can a teacher finish a
sample from an *upscaled* noisy latent as well as from a true noisy latent of that size?

For held-out latents ``x`` (the eval split, VAE-encoded) at full size, one scale step
``s_from -> s_to`` and each noise level ``sigma``:

* ``true``: ``a x_to + s eps`` (``x_to``: ``x`` area-downscaled to ``s_to``), what the teacher was
  trained on;
* ``upscale_then_noise`` (SwD): ``a up(x_from) + s eps`` (``x_from`` at ``s_from``, bicubic up);
* ``noise_then_upscale`` (the ablation): ``up(a x_from + s eps')`` (noise at ``s_from``).

The teacher (its EMA, guided with ``cfg_scale`` by the prompts of the same images) then finishes
each input with ``finish_steps`` deterministic DDIM steps from ``sigma`` to 0 at side ``s_to``,
and the decoded images of each input kind are compared by FID with those finished from ``true``
inputs of the same seed (SwD's "FID against true noisy latents"). ``floor``: ``true`` inputs with
another seed's noise against the same reference, the FID two equally good sets give at this n.
Expected if the premise holds: ``upscale_then_noise`` near the floor, ``noise_then_upscale`` far
above it. Seeds change the noise; the latents and prompts are the same.

  ldm-scaling swd-premise --teacher runs/w32-64px --scales 8,16 --sigmas 0.9,0.75,0.6 \\
      --n 256 --seeds 3 --out docs/swd_premise.csv
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ldm_scaling import data
from ldm_scaling.diffusion import generate, guidance, schedules, scalewise
from ldm_scaling.diffusion import parametrisation as param
from ldm_scaling.errors import ConfigError
from ldm_scaling.eval import fid, frechet, grid
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.train import checkpoint

KINDS = ("true", "upscale_then_noise", "noise_then_upscale")


@dataclasses.dataclass(frozen=True)
class Setting:
  scales: tuple[int, int]        # (s_from, s_to)
  sigmas: tuple[float, ...]      # noise levels, fractions of the schedule (scalewise.levels)
  n: int = 256
  seeds: tuple[int, ...] = (0, 1, 2)
  finish_steps: int = 10
  cfg_scale: float = 1.0
  batch_size: int = 64


def check(setting: Setting, latent_size: int, down_factor: int) -> None:
  s_from, s_to = setting.scales
  if not 1 <= s_from < s_to <= latent_size:
    raise ConfigError(f"--scales must be two sides s_from < s_to <= the latent size "
                      f"{latent_size}, got {setting.scales}")
  scalewise.check((s_from, s_to), (1.0, 0.5), down_factor=down_factor, key="swd-premise")
  if not setting.sigmas or any(not 0.0 < s < 1.0 for s in setting.sigmas):
    raise ConfigError(f"--sigmas must be noise levels in (0, 1), got {setting.sigmas}")
  if len(setting.seeds) < 2:
    raise ConfigError("--seeds needs at least 2 (the floor compares two seeds' true inputs)")
  if setting.finish_steps < 1 or setting.n < 2:
    raise ConfigError("--finish-steps must be >= 1 and --n >= 2")


def finish_levels(schedule: schedules.Schedule, t0: float, steps: int) -> np.ndarray:
  """The (5, steps) table of :func:`finish_with`: per step the model's timestep, alpha and sigma at
  ``t0 (1 - i/steps)``, and the next step's alpha and sigma (1 and 0 after the last)."""
  fracs = np.asarray(t0, np.float64) * (1.0 - np.arange(steps) / steps)
  t, alpha, sigma = scalewise.levels(schedule, np.maximum(fracs, 1e-3))
  a_next = np.concatenate([alpha[1:], np.ones(1, np.float32)])
  s_next = np.concatenate([sigma[1:], np.zeros(1, np.float32)])
  return np.stack([t, alpha, sigma, a_next, s_next]).astype(np.float32)


def finish_with(apply_fn: Callable, prediction: str, x, levels):
  """Deterministic DDIM through the steps of ``levels`` (:func:`finish_levels`, possibly traced):
  one model evaluation in a loop, so one program serves every level and step count of a shape."""
  levels = jnp.asarray(levels, jnp.float32)

  def step(i, x):
    t, alpha, sigma, a_next, s_next = (levels[j, i] for j in range(5))
    out = apply_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)
    x0, eps = param.to_x0_eps(prediction, out, x, alpha, sigma)
    return a_next * x0 + s_next * eps
  return jax.lax.fori_loop(0, levels.shape[1], step, x)


def finish(apply_fn: Callable, schedule: schedules.Schedule, prediction: str, x, t0: float,
           steps: int):
  """Deterministic DDIM from the level ``t0`` (a fraction of the schedule) to the clean sample:
  ``steps`` model evaluations at ``t0 (1 - i/steps)``; ``apply_fn(x, t) -> output``."""
  return finish_with(apply_fn, prediction, x, finish_levels(schedule, t0, steps))


def inputs(kind: str, x_from, x_to, alpha, sigma, key):
  """The noisy latent at side ``x_to.shape[1]`` of one input kind."""
  eps = jax.random.normal(key, x_to.shape, x_to.dtype)
  if kind == "true":
    return alpha * x_to + sigma * eps
  if kind == "upscale_then_noise":
    return scalewise.training_inputs(x_from, x_to.shape[1], alpha, sigma, eps, kind)
  eps_from = jax.random.normal(key, x_from.shape, x_from.dtype)
  return scalewise.training_inputs(x_from, x_to.shape[1], alpha, sigma, eps_from, kind)


def run(teacher: str, setting: Setting, *, extractor=None, log=print) -> pd.DataFrame:
  """One row per (sigma, seed, kind): FID of the finished images against those finished from
  ``true`` inputs of the same seed (``floor``: another seed's ``true`` inputs)."""
  config = checkpoint.load_run_config(teacher)
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  check(setting, data.latent_size(config), unet.down_factor(config.model))
  schedule = schedules.schedule_from_config(config.diffusion)
  prediction = config.diffusion.prediction
  _, model_apply, params, step = generate.from_checkpoint(teacher)
  params = generate.place_unet(config, params)
  conditioning, decoding = generate.components(config, required=True, log=log)
  vae = vae_lib.load(config)
  prompts, images = grid.eval_prompts_and_images(config, setting.n)
  pixels = np.concatenate(list(images(setting.n)()))[:setting.n]
  extractor = extractor or fid.FeatureExtractor(batch_size=grid.feature_batch(setting.n), log=log)
  log(f"swd-premise: teacher {teacher} step {step}; {setting.n} held-out images, scales "
      f"{setting.scales[0]} -> {setting.scales[1]}, sigmas {setting.sigmas}, seeds "
      f"{setting.seeds}, {setting.finish_steps} DDIM steps, CFG {setting.cfg_scale:g}")
  s_from, s_to = setting.scales
  b = setting.batch_size
  context = np.asarray(conditioning.encode(prompts), np.float32)
  uncond = np.asarray(conditioning.encode([""]), np.float32)
  scales = None if setting.cfg_scale == 1.0 else np.full((b,), setting.cfg_scale, np.float32)

  def batch_latents(lo):
    imgs = jnp.asarray(pixels[lo:lo + b], jnp.float32) / 127.5 - 1.0
    z = vae.encode_images(imgs)
    return scalewise.resize(z, s_from, "area"), scalewise.resize(z, s_to, "area")

  @jax.jit
  def finisher(params, x, ctx, unc, levels):
    model = guidance.model_fn(model_apply, params, ctx, unc if scales is not None else None,
                              jnp.asarray(scales)[:ctx.shape[0]] if scales is not None else None)
    return finish_with(model, prediction, x, levels)

  make_inputs = jax.jit(inputs, static_argnums=0)
  rows = []
  for frac in setting.sigmas:
    feats = {}
    _, alpha, sigma = (float(v[0]) for v in scalewise.levels(schedule, [frac]))
    levels = finish_levels(schedule, frac, setting.finish_steps)
    for seed in setting.seeds:
      for kind in KINDS:
        out = []
        for lo in range(0, setting.n, b):
          x_from, x_to = batch_latents(lo)
          ctx = jnp.asarray(context[lo:lo + b])
          unc = jnp.broadcast_to(jnp.asarray(uncond), ctx.shape)
          key = jax.random.fold_in(jax.random.key(seed), lo)
          x = make_inputs(kind, x_from, x_to, alpha, sigma, key)
          out.append(np.asarray(decoding.decode(np.asarray(
              finisher(params, x, ctx, unc, levels)))))
        feats[(seed, kind)] = extractor(np.concatenate(out))
    for i, seed in enumerate(setting.seeds):
      ref = frechet.Reference(fid.compute_stats(feats[(seed, "true")]))
      other = setting.seeds[(i + 1) % len(setting.seeds)]
      for kind, f in (("floor", feats[(other, "true")]),
                      ("upscale_then_noise", feats[(seed, "upscale_then_noise")]),
                      ("noise_then_upscale", feats[(seed, "noise_then_upscale")])):
        rows.append(dict(sigma=frac, seed=seed, kind=kind, fid_vs_true=ref.distance(f),
                         n=setting.n, scales=f"{s_from}-{s_to}", teacher_step=step))
    log(summary(pd.DataFrame(rows)[lambda d: d["sigma"] == frac]).to_string(index=False))
  return pd.DataFrame(rows)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
  """Mean and spread (min-max) over seeds per (sigma, kind)."""
  g = frame.groupby(["sigma", "kind"], sort=False)["fid_vs_true"]
  out = g.agg(["mean", "min", "max", "count"]).reset_index()
  out["spread"] = out["max"] - out["min"]
  return out


__all__ = ["KINDS", "Setting", "check", "finish", "finish_levels", "finish_with", "inputs", "run",
           "summary"]
