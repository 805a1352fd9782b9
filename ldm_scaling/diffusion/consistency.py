"""Consistency distillation of a guided teacher (latent consistency distillation; pure functions).

A consistency model maps any point of the teacher's probability-flow ODE trajectory to its start:
``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)``, where ``x0_hat`` is the student network's
output converted to x0 (any parametrisation) and the boundary scalings

  ``c_skip(t) = sd^2 / ((s t)^2 + sd^2)``,  ``c_out(t) = s t / sqrt((s t)^2 + sd^2)``

(``sd = sigma_data = 0.5``, ``s = timestep_scaling``) give ``f(x, 0) = x`` exactly. These are
diffusers' ``LCMScheduler`` scalings, so a student sampled here and there agrees.

Distillation (Song et al. 2023, as latent consistency models train it, Luo et al. 2023) runs on
the teacher's ``N = solver_steps`` point grid ``tau_n = (n + 1) k - 1`` with ``k = T // N``:

1. draw ``n`` uniformly, ``t = tau_n``, ``s = max(t - k, 0)``; noise the data to ``x_t``;
2. one DDIM step of the teacher, classifier-free guided with scale ``w`` (1 = no guidance), from
   ``t`` to ``s``: ``x_s = alpha_s x0_T + sigma_s eps_T``;
3. loss = ``d(f_student(x_t, t), stopgrad f_target(x_s, s))`` with the target network = the
   trainer's EMA of the student, and ``d`` pseudo-Huber ``sqrt(e^2 + c^2) - c`` (per element,
   averaged) or squared error.

A guidance-conditioned student (LCM) draws ``w`` per example (:func:`sample_scales`, uniform in
``objective.cfg_range``); the teacher's step uses each example's ``w`` and the student and target
get it as their input (``model.guidance_embed``), so one student samples any scale in its range
with one forward per step. :func:`unet_forwards` counts a step's UNet passes (the objective's MFU
and ``ldm_scaling.train.objectives.consistency.distillation_compute``).

Sampling a student is :func:`lcm_timesteps` + the ``lcm`` sampler
(``ldm_scaling.diffusion.samplers``): denoise with ``f``, re-noise to the next timestep, repeat;
1 to ``N`` network evaluations.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion import guidance
from ldm_scaling.diffusion import parametrisation as param
from ldm_scaling.diffusion.schedules import Schedule

SIGMA_DATA = 0.5
LOSSES = ("huber", "l2")


def check(schedule: Schedule, solver_steps: int) -> None:
  if schedule.is_flow:
    raise ConfigError("consistency distillation here follows the discrete-time LCM recipe and "
                      "needs a discrete diffusion.schedule (scaled_linear, linear, cosine); got "
                      "'rectified_flow'")
  if not 1 <= solver_steps <= schedule.num_train_timesteps:
    raise ConfigError(f"objective.solver_steps must be in [1, {schedule.num_train_timesteps}] "
                      f"(the teacher's training timesteps), got {solver_steps}")


def solver_timesteps(num_train_timesteps: int, solver_steps: int) -> np.ndarray:
  """The teacher's ODE-solver grid, ascending: ``tau_n = (n + 1) k - 1``, ``k = T // N``."""
  k = num_train_timesteps // solver_steps
  return np.arange(1, solver_steps + 1, dtype=np.int64) * k - 1


def lcm_timesteps(num_train_timesteps: int, solver_steps: int, steps: int) -> np.ndarray:
  """Descending timesteps of a ``steps``-evaluation consistency sampler: evenly spaced indices into
  the reversed solver grid (diffusers ``LCMScheduler.set_timesteps``)."""
  if not 1 <= steps <= solver_steps:
    raise ConfigError(f"the lcm sampler takes 1 to objective.solver_steps={solver_steps} steps "
                      f"(the distillation grid), got {steps}")
  grid = solver_timesteps(num_train_timesteps, solver_steps)[::-1]
  index = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
  return grid[index].copy()


def boundary_scalings(t, timestep_scaling: float, sigma_data: float = SIGMA_DATA):
  """``(c_skip, c_out)`` at timestep(s) ``t`` (numpy or jax, float64 on the host)."""
  xp = jnp if isinstance(t, jax.Array) else np
  scaled = xp.asarray(t, xp.float32 if xp is jnp else np.float64) * timestep_scaling
  c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
  c_out = scaled / xp.sqrt(scaled ** 2 + sigma_data ** 2)
  return c_skip, c_out


def consistency_fn(prediction: str, out: jax.Array, x: jax.Array, t, alpha, sigma,
                   timestep_scaling: float) -> jax.Array:
  """``f(x, t) = c_skip x + c_out x0(out)`` for a network output ``out`` at ``x``."""
  x0, _ = param.to_x0_eps(prediction, out, x, alpha, sigma)
  c_skip, c_out = boundary_scalings(t, timestep_scaling)
  return param.per_sample(c_skip, x) * x + param.per_sample(c_out, x) * x0


def teacher_step(prediction: str, out: jax.Array, x_t: jax.Array, alpha_t, sigma_t, alpha_s,
                 sigma_s) -> jax.Array:
  """One deterministic DDIM step from ``(alpha_t, sigma_t)`` to ``(alpha_s, sigma_s)``."""
  x0, eps = param.to_x0_eps(prediction, out, x_t, alpha_t, sigma_t)
  return param.per_sample(alpha_s, x_t) * x0 + param.per_sample(sigma_s, x_t) * eps


def distance(a: jax.Array, b: jax.Array, loss: str, huber_c: float) -> jax.Array:
  """Per-sample distance, averaged over the non-batch axes."""
  d2 = (a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2
  if loss == "huber":
    d = jnp.sqrt(d2 + huber_c ** 2) - huber_c
  elif loss == "l2":
    d = d2
  else:
    raise ConfigError(f"unknown objective.loss {loss!r}; available: {', '.join(LOSSES)}")
  return jnp.mean(d, axis=tuple(range(1, a.ndim)))


Net = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, t (B,), context) -> output


def check_cfg_range(cfg_range, guidance_embed: bool) -> tuple[float, float] | None:
  """``objective.cfg_range`` as (lo, hi), or None (the fixed ``objective.cfg_scale``); ConfigError
  when it is malformed or does not fit ``model.guidance_embed``."""
  cfg_range = tuple(float(v) for v in cfg_range)
  if not cfg_range:
    if guidance_embed:
      raise ConfigError("model.guidance_embed=True needs objective.cfg_range=(lo, hi): the range "
                        "of guidance scales drawn per example, e.g. (1.0, 6.0)")
    return None
  if len(cfg_range) != 2 or not all(np.isfinite(cfg_range)):
    raise ConfigError(f"objective.cfg_range must be two finite numbers (lo, hi), got {cfg_range}")
  lo, hi = cfg_range
  if not 1.0 <= lo <= hi:
    raise ConfigError(f"objective.cfg_range must satisfy 1 <= lo <= hi (1 = no guidance), got "
                      f"{cfg_range}")
  if not guidance_embed:
    raise ConfigError("objective.cfg_range draws a guidance scale per example, which the student "
                      "must take as input: set model.guidance_embed=True (or use cfg_scale)")
  return lo, hi


def sample_scales(rng: jax.Array, batch: int, cfg_range: tuple[float, float]) -> jax.Array:
  """Per-example guidance scales, uniform in ``[lo, hi)`` (LCM's ``w ~ U[w_min, w_max]``)."""
  lo, hi = cfg_range
  return jax.random.uniform(rng, (batch,), jnp.float32, minval=lo, maxval=hi)


def teacher_forwards(cfg_scale: float, cfg_range=None) -> int:
  """UNet passes per example of the guided teacher (:func:`distillation_loss`): 2 (conditional +
  unconditional, one batched call) unless one fixed scale of 1 lets it skip the unconditional."""
  return 2 if cfg_range or float(cfg_scale) != 1.0 else 1


def unet_forwards(cfg_scale: float, cfg_range=None) -> dict[str, int]:
  """UNet passes (in forward-pass units) per example of one distillation step: the student's
  forward + backward (3), the guided teacher (:func:`teacher_forwards`) and the target (1)."""
  return dict(student=3, teacher=teacher_forwards(cfg_scale, cfg_range), target=1)


def distillation_loss(student: Net, target: Net, teacher: Net, x0: jax.Array,
                      context: jax.Array, uncond_context: jax.Array, rng: jax.Array, *,
                      schedule: Schedule, prediction: str, solver_steps: int,
                      cfg_scale: float | jax.Array, timestep_scaling: float, loss: str = "huber",
                      huber_c: float = 0.001):
  """``(loss, metrics)`` of one batch. ``student`` closes over the trained parameters, ``target``
  over the EMA, ``teacher`` over the frozen teacher; all three return the raw network output in
  ``prediction``'s parametrisation. ``uncond_context`` has shape (1 or B, L, D). ``cfg_scale``: one
  number, or one per example (B,) -- a guidance-conditioned student's, whose ``student`` and
  ``target`` close over the same scales as their input."""
  b = x0.shape[0]
  n_rng, eps_rng = jax.random.split(rng)
  grid = jnp.asarray(solver_timesteps(schedule.num_train_timesteps, solver_steps))
  k = schedule.num_train_timesteps // solver_steps
  ab = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  t = grid[jax.random.randint(n_rng, (b,), 0, solver_steps)]
  s = jnp.maximum(t - k, 0)
  alpha_t, sigma_t = jnp.sqrt(ab[t]), jnp.sqrt(1 - ab[t])
  alpha_s, sigma_s = jnp.sqrt(ab[s]), jnp.sqrt(1 - ab[s])
  t_f, s_f = t.astype(jnp.float32), s.astype(jnp.float32)

  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
  x_t = param.per_sample(alpha_t, x0) * x0 + param.per_sample(sigma_t, x0) * eps
  pred = consistency_fn(prediction, student(x_t, t_f, context).astype(jnp.float32), x_t, t_f,
                        alpha_t, sigma_t, timestep_scaling)

  if isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0:  # unguided: no unconditional pass
    guided = teacher(x_t, t_f, context).astype(jnp.float32)
  else:
    uncond = jnp.broadcast_to(uncond_context.astype(context.dtype), context.shape)
    both = teacher(jnp.concatenate([x_t, x_t]), jnp.concatenate([t_f, t_f]),
                   jnp.concatenate([context, uncond])).astype(jnp.float32)
    guided = guidance.combine(both[:b], both[b:], jnp.asarray(cfg_scale, jnp.float32))
  x_s = jax.lax.stop_gradient(
      teacher_step(prediction, guided, x_t, alpha_t, sigma_t, alpha_s, sigma_s))
  tgt = consistency_fn(prediction, target(x_s, s_f, context).astype(jnp.float32), x_s, s_f,
                       alpha_s, sigma_s, timestep_scaling)
  per_sample = distance(pred, jax.lax.stop_gradient(tgt), loss, huber_c)
  value = jnp.mean(per_sample)
  return value, {"loss": value, "mse_to_target": jnp.mean((pred - tgt) ** 2)}
