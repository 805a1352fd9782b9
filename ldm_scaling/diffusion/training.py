"""The denoising loss: noise levels, targets and loss weightings (pure functions).

``loss = mean_b w(t_b) * mean((net(x_t, t, c) - target)^2)`` with ``x_t = alpha x0 + sigma eps``,
noise levels drawn uniformly from the schedule's training levels, and a weighting:

* ``uniform``: ``w = 1`` (the "simple" loss of Ho et al. in the chosen parametrisation);
* ``min_snr``: min-SNR-gamma (Hang et al. 2023): the loss equals ``min(SNR, gamma) * ||x0_hat -
  x0||^2`` whatever the parametrisation, i.e. ``w = min(SNR, gamma) * x0_gain^2`` -- for ``eps``
  that is ``min(SNR, gamma) / SNR``, for ``v`` on a VP schedule ``min(SNR, gamma) / (SNR + 1)``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion import parametrisation as param
from ldm_scaling.diffusion.schedules import Schedule, schedule_from_config


def _uniform(prediction, alpha, sigma, gamma):
  del prediction, sigma, gamma
  return jnp.ones_like(alpha)


def _min_snr(prediction, alpha, sigma, gamma):
  snr = (alpha / sigma) ** 2
  return jnp.minimum(snr, gamma) * param.x0_gain(prediction, alpha, sigma) ** 2


# diffusion.loss_weighting -> w(prediction, alpha, sigma, gamma), per sample.
WEIGHTINGS = {
    "uniform": _uniform,
    "min_snr": _min_snr,
}


def loss_weight(weighting: str, prediction: str, alpha, sigma, gamma: float = 5.0) -> jax.Array:
  if weighting not in WEIGHTINGS:
    raise ConfigError(f"unknown diffusion.loss_weighting {weighting!r}; available: "
                      f"{', '.join(WEIGHTINGS)}")
  alpha = jnp.asarray(alpha, jnp.float32)
  return WEIGHTINGS[weighting](prediction, alpha, jnp.asarray(sigma, jnp.float32), gamma)


def denoising_loss(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                   x0: jax.Array, context: jax.Array, rng: jax.Array, *, schedule: Schedule,
                   prediction: str = "eps", weighting: str = "uniform", gamma: float = 5.0):
  """``(loss, metrics)`` of one batch. ``model_fn(x_t, t, context) -> prediction`` closes over the
  parameters being trained (so ``jax.grad`` of a wrapper gives their gradient)."""
  t_rng, eps_rng = jax.random.split(rng)
  t, alpha, sigma = schedule.sample_train_points(t_rng, x0.shape[0])
  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
  x_t = param.per_sample(alpha, x0) * x0 + param.per_sample(sigma, x0) * eps
  out = model_fn(x_t, t, context).astype(jnp.float32)
  tgt = param.target(prediction, x0, eps, alpha, sigma)
  mse = jnp.mean((out - tgt) ** 2, axis=tuple(range(1, x0.ndim)))
  w = loss_weight(weighting, prediction, alpha, sigma, gamma)
  loss = jnp.mean(w * mse)
  return loss, {"loss": loss, "mse": jnp.mean(mse)}


def loss_from_config(diffusion_cfg):
  """``denoising_loss`` with a config's ``diffusion`` section filled in."""
  schedule = schedule_from_config(diffusion_cfg)

  def loss(model_fn, x0, context, rng):
    return denoising_loss(model_fn, x0, context, rng, schedule=schedule,
                          prediction=diffusion_cfg.prediction,
                          weighting=diffusion_cfg.loss_weighting,
                          gamma=diffusion_cfg.min_snr_gamma)
  return loss
