"""Scale-wise distillation (SwD; Starodubcev et al. 2025): pure functions.

A scale-wise student samples in ``K`` steps whose latent side grows, ``s_1 <= ... <= s_K = R``,
while the noise level falls, ``sigma_1 > ... > sigma_K``. Each step predicts ``x0`` at the
current scale, upscales ``x0`` bicubically to the next scale and noises it afresh to the next
level ("upscale, then noise"); the last ``x0`` is the sample. A step at side ``s`` costs about
``(s / R)^2`` of a full-size step (the cost model measures it exactly).

This module holds what the sampler and the objective share, all pure and shape-static:

* :func:`resize`: ``torch.nn.functional.interpolate(mode="bicubic" | "area",
  align_corners=False)`` on NHWC arrays, as per-axis matrices. ``jax.image.resize`` is not that:
  its cubic kernel has ``A = -0.5`` (torch: ``-0.75``) and it renormalises edge weights (torch
  clamps indices);
* :func:`levels`, :func:`flow_grid_sigmas`, :data:`PRESETS`, :func:`check`: the per-step scales and
  noise levels, and the errors for ones that cannot work;
* :func:`training_inputs`: the student's input at step ``k`` from the data at step ``k-1``'s
  scale, in the paper's order (upscale, then noise) or the ablation's (noise, then upscale);
* :func:`dmd_loss`, :func:`mmd_loss`, :class:`DiscriminatorHead`, :func:`gan_generator_loss`,
  :func:`gan_discriminator_loss`: the terms; :func:`student_loss` and :func:`fake_loss`: the
  student's and the fake-score network's losses at one scale, the networks passed as functions.

Noise levels are given as fractions ``sigma`` in (0, 1] of the schedule: on ``rectified_flow`` the
flow sigma itself (model timestep ``sigma * T``), on a discrete schedule the timestep
``min(round(sigma * T), T - 1)`` (SD-XL's SwD uses ``1000 * (1, .8, .6, .4)``).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.diffusion import parametrisation as _param
from ldm_scaling.diffusion import schedules as schedules_lib
from ldm_scaling.diffusion.schedules import Schedule
from ldm_scaling.errors import ConfigError

CUBIC_A = -0.75          # torch's bicubic coefficient (Keys' A; jax.image.resize uses -0.5)
METHODS = ("bicubic", "area")
ORDERS = ("upscale_then_noise", "noise_then_upscale")


# --- Resizing, as torch.nn.functional.interpolate(align_corners=False, antialias=False) ----------


def _cubic(t: np.ndarray) -> tuple[np.ndarray, ...]:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position ``t`` (float64)."""
  a = CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
  """The (out_size, in_size) float32 matrix of a 1-D resize, exactly torch's arithmetic."""
  if method not in METHODS:
    raise ConfigError(f"unknown resize method {method!r}; available: {', '.join(METHODS)}")
  if in_size < 1 or out_size < 1:
    raise ConfigError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == "area":  # adaptive average pooling: [floor(i in/out), ceil((i+1) in/out))
    for i in rows:
      lo, hi = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
      m[i, lo:hi] = 1.0 / (hi - lo)
    return m.astype(np.float32)
  if in_size == out_size:  # torch copies the input (the cubic weights at t = 0 are 0, 1, 0, 0)
    return np.eye(in_size, dtype=np.float32)
  src = (rows + 0.5) * (in_size / out_size) - 0.5  # not clamped for cubic, as in torch
  base = np.floor(src).astype(np.int64)
  for offset, w in zip(range(-1, 3), _cubic(src - base)):
    np.add.at(m, (rows, np.clip(base + offset, 0, in_size - 1)), w)
  return m.astype(np.float32)


def resize(x: jax.Array, size: int | Sequence[int], method: str = "bicubic") -> jax.Array:
  """Resizes the spatial axes of ``x`` (..., H, W, C) to ``size`` (side or (h, w)) as torch's
  ``F.interpolate(x, size, mode=method, align_corners=False)`` does on NCHW."""
  h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if x.ndim < 3:
    raise ConfigError(f"resize needs (..., H, W, C), got shape {x.shape}")
  if (x.shape[-3], x.shape[-2]) == (h, w):  # torch copies the input (both methods)
    return x
  mh = jnp.asarray(resize_matrix(x.shape[-3], h, method), x.dtype)
  mw = jnp.asarray(resize_matrix(x.shape[-2], w, method), x.dtype)
  hi = jax.lax.Precision.HIGHEST  # TPUs otherwise multiply f32 in bf16 passes
  x = jnp.einsum("oh,...hwc->...owc", mh, x, precision=hi)
  return jnp.einsum("pw,...owc->...opc", mw, x, precision=hi)


# --- Scales and noise levels ---------------------------------------------------------------------


def flow_grid_sigmas(steps: int, shift: float, indices: Sequence[int]) -> tuple[float, ...]:
  """Noise levels picked from a rectified-flow inference grid: diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps).sigmas[indices]``."""
  grid = Schedule(name=schedules_lib.FLOW, flow_shift=float(shift)).flow_sigmas(int(steps))
  bad = [i for i in indices if not 0 <= i < steps]
  if bad:
    raise ConfigError(f"grid indices {bad} outside the {steps}-step grid")
  return tuple(float(grid[i]) for i in indices)


# SwD's published schedules (SD3.5 at 1024 px: 128 x 128 latents), as (scales, sigmas).
PRESETS = {
    "sd35_4": ((64, 80, 96, 128), flow_grid_sigmas(28, 3.0, (0, 7, 14, 18))),
    "sd35_6": ((32, 48, 64, 80, 96, 128), flow_grid_sigmas(28, 3.0, (0, 4, 7, 12, 14, 18))),
}


def check(scales: Sequence[int], sigmas: Sequence[float], latent_size: int | None = None,
          down_factor: int = 1, key: str = "objective") -> None:
  """Raises ConfigError, naming ``<key>.scales`` / ``<key>.sigmas``, for levels that cannot work.

  Scales may repeat (a full-size step, e.g. the full-scale counterpart ``(R, R, R, R)``) but
  never shrink; noise levels strictly fall."""
  scales, sigmas = tuple(scales), tuple(sigmas)
  if not scales:
    raise ConfigError(f"{key}.scales is empty; give the latent side of every sampling step, "
                      f"ending at the latent size (e.g. (8, 12, 16) for 16x16 latents)")
  if len(scales) != len(sigmas):
    raise ConfigError(f"{key}.scales has {len(scales)} entries but {key}.sigmas has "
                      f"{len(sigmas)}: give one noise level per scale")
  if any(isinstance(s, bool) or int(s) != s or s < 1 for s in scales):
    raise ConfigError(f"{key}.scales must be positive integers (latent sides), got {scales}")
  if any(b < a for a, b in zip(scales, scales[1:])):
    raise ConfigError(f"{key}.scales must not decrease (the latent grows step by step), got "
                      f"{scales}")
  if latent_size is not None and scales[-1] != latent_size:
    raise ConfigError(f"{key}.scales must end at the latent size {latent_size} (the last step "
                      f"samples at full size), got {scales}")
  if down_factor > 1 and any(s % down_factor for s in scales):
    bad = [s for s in scales if s % down_factor]
    raise ConfigError(f"{key}.scales {bad} are not multiples of the UNet's down factor "
                      f"{down_factor} (2^(levels-1)); a UNet cannot run on those sides")
  if any(not 0.0 < s <= 1.0 for s in sigmas):
    raise ConfigError(f"{key}.sigmas must lie in (0, 1] (fractions of the schedule), got "
                      f"{sigmas}")
  if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
    raise ConfigError(f"{key}.sigmas must strictly decrease (each step is less noisy), got "
                      f"{sigmas}")


def levels(schedule: Schedule, sigmas: Sequence[float]) -> tuple[np.ndarray, ...]:
  """(model timestep, alpha, sigma) of each noise level, float32, shape (K,)."""
  frac = np.asarray(sigmas, np.float64)
  t_max = schedule.num_train_timesteps
  if schedule.is_flow:
    s = frac.astype(np.float32)
    return s * np.float32(t_max), np.float32(1) - s, s
  t = np.minimum(np.round(frac * t_max), t_max - 1).astype(np.int64)
  ab = schedule.alphas_cumprod[t].astype(np.float64)
  return (t.astype(np.float32), np.sqrt(ab).astype(np.float32),
          np.sqrt(1 - ab).astype(np.float32))


def relative_cost(scales: Sequence[int]) -> float:
  """``sum_k (s_k / R)^2``: a scale-wise trajectory in full-size steps, to first order (the
  cost model measures the exact FLOPs at every scale)."""
  r = float(scales[-1])
  return float(sum((s / r) ** 2 for s in scales))


# --- Training inputs -----------------------------------------------------------------------------


def training_inputs(x_prev: jax.Array, size: int, alpha, sigma, noise: jax.Array,
                    order: str = "upscale_then_noise") -> jax.Array:
  """The student's noisy input at a step of side ``size`` from clean data ``x_prev`` at the
  previous step's side.

  ``upscale_then_noise`` (SwD): ``alpha * up(x_prev) + sigma * noise``, ``noise`` at ``size``;
  ``noise_then_upscale`` (the ablation): ``up(alpha * x_prev + sigma * noise)``, ``noise`` at
  ``x_prev``'s side (bicubically upscaled noise is correlated and off-distribution).
  ``alpha``, ``sigma``: scalars or (B,)."""
  alpha = _per_sample(alpha, x_prev)
  sigma = _per_sample(sigma, x_prev)
  if order == "upscale_then_noise":
    return alpha * resize(x_prev, size) + sigma * noise
  if order == "noise_then_upscale":
    return resize(alpha * x_prev + sigma * noise, size)
  raise ConfigError(f"unknown scale-wise input order {order!r}; available: {', '.join(ORDERS)}")


def _per_sample(a, x):
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


# --- Losses --------------------------------------------------------------------------------------


def dmd_loss(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> jax.Array:
  """Distribution matching (DMD2's normalised form) for the student's samples ``x`` (B, H, W, C).

  ``x0_real`` / ``x0_fake``: the teacher's (guided) and the fake-score network's x0 predictions
  from ``x`` noised; both are constants here. With ``p = x - x0`` the gradient direction is
  ``g = (p_real - p_fake) / mean_{H,W,C} |p_real|`` (NaN/inf -> 0), and the loss
  ``0.5 * mean((x - stopgrad(x - g))^2)`` has gradient ``g / x.size`` in ``x``."""
  x0_real, x0_fake = jax.lax.stop_gradient(x0_real), jax.lax.stop_gradient(x0_fake)
  p_real = x - x0_real
  p_fake = x - x0_fake
  axes = tuple(range(1, x.ndim))
  norm = jnp.mean(jnp.abs(p_real), axis=axes, keepdims=True)
  g = jnp.nan_to_num((p_real - p_fake) / norm, nan=0.0, posinf=0.0, neginf=0.0)
  g = jax.lax.stop_gradient(g)
  target = jax.lax.stop_gradient(x - g)
  return 0.5 * jnp.mean((x - target) ** 2)


def token_mean(features: jax.Array) -> jax.Array:
  """(B, ..., D) features -> (B, D): the mean over every position (tokens or H x W)."""
  return jnp.mean(features.reshape(features.shape[0], -1, features.shape[-1]), axis=1)


def mmd_loss(real: jax.Array, fake: jax.Array, c: float = 1e-3, kernel: str = "linear",
             bandwidth: float = 100.0) -> jax.Array:
  """Maximum mean discrepancy between features of real and generated samples, per image pair.

  ``linear``: ``d = (mean_tokens(real) - mean_tokens(fake))^2`` per feature, the loss
  ``mean(sqrt(d + c^2) - c)`` (pseudo-Huber; 0 for identical features, never negative).
  ``rbf``: ``2 - 2 exp(-||mu_r - mu_f||^2 / (2 bandwidth^2))`` per image pair, averaged (the
  squared RKHS distance of the two means' kernel embeddings). ``real`` is a constant."""
  mu_r = token_mean(jax.lax.stop_gradient(real)).astype(jnp.float32)
  mu_f = token_mean(fake).astype(jnp.float32)
  if kernel == "linear":
    d = (mu_r - mu_f) ** 2
    return jnp.mean(jnp.sqrt(d + c * c) - c)
  if kernel == "rbf":
    sq = jnp.sum((mu_r - mu_f) ** 2, axis=-1)
    return jnp.mean(2.0 - 2.0 * jnp.exp(-sq / (2.0 * bandwidth ** 2)))
  raise ConfigError(f"unknown MMD kernel {kernel!r}; available: linear, rbf")


class DiscriminatorHead(nn.Module):
  """SwD's GAN head on token-mean features (B, D): 4 x (LayerNorm -> GELU -> Dense), widths
  ``linspace(D, 1, 5)``; returns logits (B,)."""
  depth: int = 4

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    widths = head_widths(h.shape[-1], self.depth)
    for i, width in enumerate(widths[1:]):
      h = nn.LayerNorm(epsilon=1e-5, name=f"norm_{i}")(h)
      h = nn.gelu(h, approximate=False)
      h = nn.Dense(width, name=f"dense_{i}")(h)
    return h[..., 0]


def head_widths(features: int, depth: int = 4) -> tuple[int, ...]:
  """``linspace(features, 1, depth + 1)`` rounded: the GAN head's layer widths."""
  return tuple(int(round(v)) for v in np.linspace(features, 1, depth + 1))


def gan_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating generator loss ``mean softplus(-D(fake))``."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def gan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """``mean softplus(-D(real)) + mean softplus(D(fake))``."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


# --- The objective's two losses (pure; the networks arrive as functions) --------------------------

# A network as the losses call it: (x, t (B,), context) -> output. The fake-score network also
# returns its features (B, h, w, D) of one block: (x, t, context) -> (output, features).
Net = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
FeatureNet = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def grid_levels(schedule: Schedule, grid_steps: int, lo: int, hi: int) -> tuple[np.ndarray, ...]:
  """(t, alpha, sigma) of points ``lo .. hi-1`` of the schedule's ``grid_steps``-point inference
  grid (flow: the shifted sigmas; discrete: ``discrete_timesteps / T``), where the DMD / MMD /
  fake-score noise is drawn (SwD: 28 points, DMD 12-27, MMD 18-27, fake all)."""
  if not 0 <= lo < hi <= grid_steps:
    raise ConfigError(f"noise index range [{lo}, {hi}) is not within the {grid_steps}-point grid")
  if schedule.is_flow:
    frac = schedule.flow_sigmas(grid_steps)
  else:
    frac = schedule.discrete_timesteps(grid_steps) / schedule.num_train_timesteps
  return levels(schedule, frac[lo:hi])


def _draw(rng, table, batch):
  idx = jax.random.randint(rng, (batch,), 0, len(table[0]))
  return tuple(jnp.asarray(a)[idx] for a in table)


def _noised(x0, alpha, sigma, eps):
  return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * eps


def _guided(net: Net, x, t, context, uncond, scale: float):
  """``net`` once on [x, x] with [context, uncond]: ``out_c + (w - 1) (out_c - out_u)``."""
  if scale == 1.0:
    return net(x, t, context)
  u = jnp.broadcast_to(uncond.astype(context.dtype), context.shape)
  out = net(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([context, u]))
  out_c, out_u = jnp.split(out, 2)
  return out_c + (scale - 1.0) * (out_c - out_u)


def student_inputs(latents: jax.Array, k: int, scales: Sequence[int], alpha_k, sigma_k,
                   noise_rng, order: str):
  """(clean target at scale k, the student's noisy input there): the data area-downscaled to
  ``scales[k]`` and to the previous scale (k = 0: the same), the latter upscaled and noised."""
  x_k = resize(latents, scales[k], "area")
  x_prev = resize(latents, scales[max(k - 1, 0)], "area")
  side = scales[k] if order == "upscale_then_noise" else x_prev.shape[1]
  noise = jax.random.normal(noise_rng, x_prev.shape[:1] + (side, side) + x_prev.shape[3:],
                            latents.dtype)
  return x_k, training_inputs(x_prev, scales[k], alpha_k, sigma_k, noise, order)


def student_loss(student: Net, teacher: Net, fake: FeatureNet, head: Callable, latents, context,
                 uncond, rng, *, k: int, scales: Sequence[int], step_levels, dmd_levels,
                 mmd_levels, prediction: str, cfg_scale: float, dmd_weight: float = 1.0,
                 mmd_weight: float = 1.0, gan_weight: float = 5e-3,
                 order: str = "upscale_then_noise", mmd_kernel: str = "linear",
                 mmd_c: float = 1e-3, mmd_bandwidth: float = 100.0):
  """The student's loss at scale index ``k``: ``dmd_weight L_DMD + mmd_weight L_MMD + gan_weight
  L_GAN`` on its x0 prediction at ``scales[k]`` (see the module docstring).

  ``step_levels``: (t, alpha, sigma) of the K sampling steps; ``dmd_levels`` / ``mmd_levels``:
  (t, alpha, sigma) tables the DMD / MMD noise is drawn from (:func:`grid_levels`). ``teacher`` is
  guided with ``cfg_scale``; ``fake`` is unguided and its weights are constants here (the caller
  passes them under ``stop_gradient``), but gradients flow through it to the sample."""
  b = latents.shape[0]
  in_rng, dmd_rng, dmd_eps_rng, mmd_rng, mmd_eps_rng = jax.random.split(rng, 5)
  t_k, a_k, s_k = (jnp.full((b,), v[k], jnp.float32) for v in step_levels)
  x_real, x_in = student_inputs(latents, k, scales, a_k, s_k, in_rng, order)
  out = student(x_in, t_k, context).astype(jnp.float32)
  x0, _ = _param.to_x0_eps(prediction, out, x_in, a_k, s_k)
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  if dmd_weight or gan_weight:
    t, a, s = _draw(dmd_rng, dmd_levels, b)
    eps = jax.random.normal(dmd_eps_rng, x0.shape, x0.dtype)
    x_n = _noised(x0, a, s, eps)
    if dmd_weight:
      real_out = _guided(teacher, jax.lax.stop_gradient(x_n), t, context, uncond, cfg_scale)
      x0_real, _ = _param.to_x0_eps(prediction, real_out.astype(jnp.float32), x_n, a, s)
      fake_out, _ = fake(jax.lax.stop_gradient(x_n), t, context)
      x0_fake, _ = _param.to_x0_eps(prediction, fake_out.astype(jnp.float32), x_n, a, s)
      metrics["dmd"] = dmd_loss(x0, x0_real, x0_fake)
      total = total + dmd_weight * metrics["dmd"]
    if gan_weight:
      _, feats = fake(x_n, t, context)
      metrics["gan_g"] = gan_generator_loss(head(token_mean(feats)))
      total = total + gan_weight * metrics["gan_g"]
  if mmd_weight:
    t, a, s = _draw(mmd_rng, mmd_levels, b)
    eps = jax.random.normal(mmd_eps_rng, x0.shape, x0.dtype)
    _, f_real = fake(_noised(x_real, a, s, eps), t, context)
    _, f_fake = fake(_noised(x0, a, s, eps), t, context)
    metrics["mmd"] = mmd_loss(f_real, f_fake, c=mmd_c, kernel=mmd_kernel,
                              bandwidth=mmd_bandwidth)
    total = total + mmd_weight * metrics["mmd"]
  metrics["x0_mse"] = jnp.mean((x0 - x_real) ** 2)
  return total, {"loss": total, **metrics}


def fake_loss(student: Net, fake: FeatureNet, head: Callable, latents, context, rng, *, k: int,
              scales: Sequence[int], step_levels, fake_levels, prediction: str,
              gan_weight: float = 1e-2, order: str = "upscale_then_noise"):
  """The fake-score network's loss at scale index ``k``: x0 regression on the student's samples
  (constants) noised at a level drawn from ``fake_levels``, plus ``gan_weight`` times the
  discriminator loss of ``head`` on its features of the real scale-k data vs the student's
  samples, noised with the same noise and level."""
  b = latents.shape[0]
  in_rng, lvl_rng, eps_rng = jax.random.split(rng, 3)
  t_k, a_k, s_k = (jnp.full((b,), v[k], jnp.float32) for v in step_levels)
  x_real, x_in = student_inputs(latents, k, scales, a_k, s_k, in_rng, order)
  out = student(x_in, t_k, context).astype(jnp.float32)
  x0 = jax.lax.stop_gradient(_param.to_x0_eps(prediction, out, x_in, a_k, s_k)[0])
  t, a, s = _draw(lvl_rng, fake_levels, b)
  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
  x_n = _noised(x0, a, s, eps)
  fake_out, f_fake = fake(x_n, t, context)
  x0_fake, _ = _param.to_x0_eps(prediction, fake_out.astype(jnp.float32), x_n, a, s)
  metrics = {"denoise": jnp.mean((x0_fake - x0) ** 2)}
  total = metrics["denoise"]
  if gan_weight:
    _, f_real = fake(_noised(x_real, a, s, eps), t, context)
    metrics["gan_d"] = gan_discriminator_loss(head(token_mean(f_real)), head(token_mean(f_fake)))
    total = total + gan_weight * metrics["gan_d"]
  return total, {"loss": total, **metrics}
