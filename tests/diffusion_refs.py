"""Shared references for the diffusion tests: an exact analytic denoiser and diffusers' schedulers.

The denoiser is the exact posterior mean for Gaussian data ``x0 ~ N(mu(c), diag(S^2))`` per
channel, where the mean depends on the conditioning ``c`` (so guidance changes the result). It is
one fixed model function that both our samplers and diffusers' PyTorch schedulers drive.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.diffusion import parametrisation

MU = np.array([0.5, -1.0, 0.2, 1.5], np.float32)
S = np.array([0.6, 1.0, 1.4, 0.8], np.float32)

DIFFUSERS_BETAS = {"scaled_linear": "scaled_linear", "linear": "linear",
                   "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def data_mean(ctx):
  return MU + 0.5 * jnp.tanh(jnp.mean(ctx[..., :MU.shape[0]], axis=1))[:, None, None, :]


def analytic_apply(schedule, prediction):
  """``apply_fn(params, x, t, context)`` of the exact denoiser, predicting ``prediction``.

  The timestep convention is the schedule's: integer t in [0, T) indexes alpha_bar; for
  rectified flow sigma = t / T."""
  t_max = schedule.num_train_timesteps
  table = None if schedule.is_flow else jnp.asarray(schedule.alphas_cumprod)

  def apply_fn(params, x, t, ctx):
    del params
    if table is None:
      s = t / t_max
      a = 1.0 - s
    else:
      ab = table[jnp.clip(jnp.round(t).astype(jnp.int32), 0, t_max - 1)]
      a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    a, s = a[:, None, None, None], s[:, None, None, None]
    mu = data_mean(ctx)
    x0 = mu + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (x - a * mu)
    eps = (x - a * x0) / s
    return parametrisation.target(prediction, x0, eps, a, s)
  return apply_fn


def diffusers_scheduler(sampler, schedule, prediction):
  """diffusers' scheduler that our ``sampler`` reproduces, with the same settings."""
  import diffusers  # pylint: disable=g-import-not-at-top
  if schedule.is_flow:
    return diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=schedule.num_train_timesteps, shift=schedule.flow_shift)
  common = dict(num_train_timesteps=schedule.num_train_timesteps,
                beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                beta_schedule=DIFFUSERS_BETAS[schedule.name],
                prediction_type=DIFFUSERS_PREDICTION[prediction],
                timestep_spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset,
                rescale_betas_zero_snr=schedule.zero_terminal_snr)
  if sampler == "ddim":
    return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=schedule.set_alpha_to_one,
                                   **common)
  if sampler == "ddpm":
    return diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)
  if sampler == "dpm++":
    return diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", **common)
  if sampler == "lcm":
    return diffusers.LCMScheduler(original_inference_steps=50, timestep_scaling=10.0,
                                  clip_sample=False, **common)
  raise ValueError(sampler)


def diffusers_sample(scheduler, apply_fn, x_start, context, uncond, scales, steps, eta=0.0,
                     step_noise=None):
  """diffusers' sampling loop (as its pipelines run it) over the same model function: separate
  conditional and unconditional evaluations, guidance on the model output, ``scheduler.step``.
  ``step_noise(i)`` supplies the noise a stochastic step draws (DDIM ``variance_noise``; for
  DDPM and LCM, ``randn_tensor`` is patched to return it)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.schedulers import scheduling_ddpm  # pylint: disable=g-import-not-at-top
  from diffusers.schedulers import scheduling_lcm  # pylint: disable=g-import-not-at-top
  apply_fn = jax.jit(apply_fn)
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(np.array(x_start, np.float32))
  w = torch.from_numpy(np.array(scales, np.float32))[:, None, None, None]
  uncond = np.broadcast_to(uncond, context.shape)
  patched = (scheduling_ddpm, scheduling_lcm)
  originals = [m.randn_tensor for m in patched]
  current = {}
  if step_noise is not None:
    for m in patched:
      m.randn_tensor = lambda *a, **k: current["noise"]
  try:
    for i, t in enumerate(scheduler.timesteps):
      tt = np.full((x.shape[0],), float(t), np.float32)
      out_c = torch.from_numpy(np.array(apply_fn(None, x.numpy(), tt, context)))
      out_u = torch.from_numpy(np.array(apply_fn(None, x.numpy(), tt, uncond)))
      out = out_u + w * (out_c - out_u)
      kw = {"eta": eta} if "eta" in _step_args(scheduler) else {}
      if step_noise is not None:
        current["noise"] = torch.from_numpy(np.array(step_noise(i), np.float32))
        if "variance_noise" in _step_args(scheduler):
          kw["variance_noise"] = current["noise"]
      x = scheduler.step(out, t, x, **kw).prev_sample
  finally:
    for m, original in zip(patched, originals):
      m.randn_tensor = original
  return x.numpy()


def _step_args(scheduler):
  import inspect  # pylint: disable=g-import-not-at-top
  return inspect.signature(scheduler.step).parameters
