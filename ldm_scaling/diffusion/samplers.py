"""Samplers: one registry entry = a grid builder (host, numpy) + a trajectory program (jax).

A sampler sees the model only through ``denoise(x, i) -> Denoised``: the (guided) network output
at step ``i`` of its grid, already converted to ``x0``, ``eps`` and the flow velocity. It gets a
:class:`Grid` (per-step model timesteps, the noise level the model sees, and the sampler's own
per-step update coefficients, all computed on the host in float64 from the float32 schedule
tables) and one PRNG key per sample. Its ``run`` is traced once into a single program over the
whole trajectory (``lax.scan``), compiled once per (sampler, steps, shapes).

Grids reproduce diffusers 0.35's schedulers (see docs/diffusion.md for the details and quirks):

* ``ddim``: ``DDIMScheduler`` (eta in [0, 1]); the step from ``t`` lands on ``t - T // steps``
  (or ``final_alpha_cumprod``), as diffusers does for every spacing;
* ``ddpm``: ``DDPMScheduler`` ancestral sampling, ``variance_type="fixed_small"``;
* ``dpm++``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``,
  midpoint, ``lower_order_final``, ``final_sigmas_type="zero"`` (DPM-Solver++(2M));
* ``euler``: ``FlowMatchEulerDiscreteScheduler`` (rectified-flow schedules only);
* ``lcm``: ``LCMScheduler`` multistep consistency sampling, for consistency-distilled students
  (``ldm_scaling.diffusion.consistency``; 1 to ``solver_steps`` evaluations);
* ``swd``: scale-wise sampling of SwD students (``ldm_scaling.diffusion.scalewise``): one step per
  ``Options.swd_scales`` entry, the latent growing from the first scale to full size; on
  ``rectified_flow`` it is ``FlowMatchLCMScheduler(scale_factors=...)``.

On a ``rectified_flow`` schedule every sampler steps the same shifted sigma grid (diffusers'
``FlowMatchEulerDiscreteScheduler``); there deterministic DDIM is the Euler step.

Adding a sampler: write ``grid(schedule, steps, options) -> Grid`` and ``run(denoise, x, grid,
keys, options) -> x``, add ``SAMPLERS[name] = Sampler(...)``, add tests. Nothing else changes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.diffusion import consistency, scalewise
from ldm_scaling.diffusion.schedules import Schedule
from ldm_scaling.errors import ConfigError


class Denoised(NamedTuple):
  x0: jax.Array        # predicted clean sample
  eps: jax.Array       # predicted noise
  velocity: jax.Array  # eps - x0, the rectified-flow velocity d x / d sigma
  out: jax.Array       # the raw (guided) network output


Denoise = Callable[[jax.Array, jax.Array], Denoised]


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
  """Per-step arrays of a sampler, each of shape (steps,)."""
  t: np.ndarray                  # model-input timestep at step i (float32)
  alpha: np.ndarray              # alpha of the noise level the model sees at step i (float32)
  sigma: np.ndarray              # sigma of that level (float32)
  coef: Mapping[str, np.ndarray]  # the sampler's update coefficients (float32)

  @property
  def steps(self) -> int:
    return len(self.t)


@dataclasses.dataclass(frozen=True)
class Options:
  """Sampler settings beyond (sampler, steps); hashable (part of the compiled-program key)."""
  eta: float = 0.0  # ddim: 0 = deterministic DDIM, 1 = DDPM-like posterior noise
  lcm_solver_steps: int = 50          # lcm: the distillation's solver grid (objective.solver_steps)
  lcm_timestep_scaling: float = 10.0  # lcm: the boundary scalings' s (objective.timestep_scaling)
  swd_scales: tuple[int, ...] = ()    # swd: latent side of each step (objective.scales)
  swd_sigmas: tuple[float, ...] = ()  # swd: noise level of each step (objective.sigmas)


@dataclasses.dataclass(frozen=True)
class Sampler:
  grid: Callable[[Schedule, int, Options], Grid]
  run: Callable[[Denoise, jax.Array, Grid, jax.Array, Options], jax.Array]
  stochastic: Callable[[Options], bool]
  evals_per_step: int = 1        # network evaluations per step (the sampling-cost convention)
  schedules: str = "any"         # "any", "flow" or "discrete": the schedules it integrates


def step_noise(keys: jax.Array, i, shape) -> jax.Array:
  """The standard-normal noise a stochastic sampler adds at step ``i``: one draw per sample key
  (``fold_in(key_b, i)``), so a sample's trajectory does not depend on its batch neighbours."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:]))(keys)


def _f32(a) -> np.ndarray:
  return np.asarray(a, np.float64).astype(np.float32)


def _grid(t, alpha, sigma, **coef) -> Grid:
  return Grid(t=_f32(t), alpha=_f32(alpha), sigma=_f32(sigma),
              coef={k: _f32(v) for k, v in coef.items()})


def _vp(alpha_bar) -> tuple[np.ndarray, np.ndarray]:
  ab = np.asarray(alpha_bar, np.float64)
  return np.sqrt(ab), np.sqrt(1.0 - ab)


def _flow_points(schedule: Schedule, steps: int):
  """(model t, sigma at each step, sigma after each step) of a flow schedule, float32."""
  s = schedule.flow_sigmas(steps)
  s_next = np.concatenate([s[1:], np.zeros(1, np.float32)])
  return s * np.float32(schedule.num_train_timesteps), s, s_next


def _scan(step, carry, grid: Grid):
  """Runs ``step(carry, i, coef_i) -> carry`` over the grid as one ``lax.scan``."""
  xs = (jnp.arange(grid.steps), {k: jnp.asarray(v) for k, v in grid.coef.items()})
  return jax.lax.scan(lambda c, x: (step(c, x[0], x[1]), None), carry, xs)[0]


# --- DDIM ----------------------------------------------------------------------------------------


def _posterior(a_t, s_t, a_p, s_p):
  """For steps from (a_t, s_t) to a less noisy (a_p, s_p): the transition variance
  ``s_t^2 - (a_t/a_p)^2 s_p^2`` and the posterior q(x_p | x_t, x0) variance (float64)."""
  ratio = a_t / a_p
  var_tp = np.maximum(s_t ** 2 - ratio ** 2 * s_p ** 2, 0.0)
  return ratio, var_tp, var_tp * s_p ** 2 / s_t ** 2


def ddim_grid(schedule: Schedule, steps: int, options: Options) -> Grid:
  if schedule.is_flow:
    t, s, s_next = _flow_points(schedule, steps)
    s, s_next = s.astype(np.float64), s_next.astype(np.float64)
    a_t, s_t, a_p, s_p = 1 - s, s, 1 - s_next, s_next
  else:
    ts = schedule.discrete_timesteps(steps, "ddim")
    ab = schedule.alphas_cumprod
    prev = ts - schedule.num_train_timesteps // steps
    final = np.float32(1.0) if schedule.set_alpha_to_one else ab[0]
    ab_prev = np.where(prev >= 0, ab[np.maximum(prev, 0)], final)
    t = ts
    (a_t, s_t), (a_p, s_p) = _vp(ab[ts]), _vp(ab_prev)
  _, _, var = _posterior(a_t, s_t, a_p, s_p)
  std = options.eta * np.sqrt(var)
  return _grid(t, a_t, s_t, x0=a_p, eps=np.sqrt(np.maximum(s_p ** 2 - std ** 2, 0.0)), noise=std)


def ddim(denoise: Denoise, x: jax.Array, grid: Grid, keys: jax.Array, options: Options):
  def step(x, i, c):
    d = denoise(x, i)
    x_next = c["x0"] * d.x0 + c["eps"] * d.eps
    if options.eta > 0:
      x_next = x_next + c["noise"] * step_noise(keys, i, x.shape).astype(x.dtype)
    return x_next
  return _scan(step, x, grid)


# --- DDPM ----------------------------------------------------------------------------------------


def ddpm_grid(schedule: Schedule, steps: int, options: Options) -> Grid:
  del options
  if schedule.is_flow:
    t, s, s_next = _flow_points(schedule, steps)
    s, s_next = s.astype(np.float64), s_next.astype(np.float64)
    a_t, s_t, a_p, s_p = 1 - s, s, 1 - s_next, s_next
    noisy = s_next > 0
  else:
    ts = schedule.discrete_timesteps(steps, "ddim")
    ab = schedule.alphas_cumprod
    ab_prev = np.concatenate([ab[ts[1:]], np.ones(1, np.float32)])  # after the last step: x0
    t = ts
    (a_t, s_t), (a_p, s_p) = _vp(ab[ts]), _vp(ab_prev)
    noisy = ts > 0
  ratio, var_tp, var = _posterior(a_t, s_t, a_p, s_p)
  return _grid(t, a_t, s_t, x0=a_p * var_tp / s_t ** 2, x=ratio * s_p ** 2 / s_t ** 2,
               noise=np.where(noisy, np.sqrt(var), 0.0))


def ddpm(denoise: Denoise, x: jax.Array, grid: Grid, keys: jax.Array, options: Options):
  del options

  def step(x, i, c):
    d = denoise(x, i)
    z = step_noise(keys, i, x.shape).astype(x.dtype)
    return c["x0"] * d.x0 + c["x"] * x + c["noise"] * z
  return _scan(step, x, grid)


# --- DPM-Solver++(2M) ----------------------------------------------------------------------------


def dpm_grid(schedule: Schedule, steps: int, options: Options) -> Grid:
  del options
  if schedule.is_flow:
    t, s, s_next = _flow_points(schedule, steps)
    sig = np.concatenate([s, s_next[-1:]]).astype(np.float64)
    alpha, sigma = 1 - sig, sig
  else:
    ts = schedule.discrete_timesteps(steps, "dpm")
    ab = schedule.alphas_cumprod.copy()
    if schedule.zero_terminal_snr:
      ab[-1] = 2.0 ** -24  # diffusers: keeps log-SNR finite at the terminal step
    rho = np.sqrt((np.float32(1) - ab) / ab)  # sigma / alpha, float32 as diffusers
    rho = np.concatenate([rho[ts], [0.0]]).astype(np.float32).astype(np.float64)
    alpha = 1.0 / np.sqrt(rho ** 2 + 1)
    sigma = rho * alpha
    t = ts
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = np.log(alpha) - np.log(sigma)          # log-SNR / 2; +inf at sigma = 0
    h = lam[1:] - lam[:-1]                       # (steps,)
    phi = -alpha[1:] * np.expm1(-h)              # alpha_t * (1 - exp(-h))
    c_x = sigma[1:] / sigma[:-1]
    h_prev = np.concatenate([[np.inf], h[:-1]])  # no history at the first step
    second = np.arange(steps) < steps - 1        # lower_order_final: the last step is 1st order
    half_over_r = np.where(second & np.isfinite(h_prev), 0.5 * h / h_prev, 0.0)
  return _grid(t, alpha[:-1], sigma[:-1], x=c_x, m0=phi * (1 + half_over_r),
               m1=-phi * half_over_r)


def dpm_solver_pp_2m(denoise: Denoise, x: jax.Array, grid: Grid, keys: jax.Array,
                     options: Options):
  del keys, options

  def step(carry, i, c):
    x, m_prev = carry
    m = denoise(x, i).x0
    return c["x"] * x + c["m0"] * m + c["m1"] * m_prev, m
  return _scan(step, (x, jnp.zeros_like(x)), grid)[0]


# --- Euler (flow matching) -----------------------------------------------------------------------


def euler_grid(schedule: Schedule, steps: int, options: Options) -> Grid:
  del options
  t, s, s_next = _flow_points(schedule, steps)
  return _grid(t, np.float32(1) - s, s, dt=s_next - s)


def euler(denoise: Denoise, x: jax.Array, grid: Grid, keys: jax.Array, options: Options):
  del keys, options
  return _scan(lambda x, i, c: x + c["dt"] * denoise(x, i).velocity, x, grid)


# --- LCM (multistep consistency sampling) -------------------------------------------------------


def lcm_grid(schedule: Schedule, steps: int, options: Options) -> Grid:
  consistency.check(schedule, options.lcm_solver_steps)
  ts = consistency.lcm_timesteps(schedule.num_train_timesteps, options.lcm_solver_steps, steps)
  ab = schedule.alphas_cumprod
  c_skip, c_out = consistency.boundary_scalings(ts, options.lcm_timestep_scaling)
  # After the last step the sample is the denoised one (no re-noising), as diffusers does.
  a_next, s_next = _vp(np.concatenate([ab[ts[1:]], np.ones(1, np.float32)]))
  return _grid(ts, *_vp(ab[ts]), skip=c_skip, out=c_out, x0=a_next, noise=s_next)


def lcm(denoise: Denoise, x: jax.Array, grid: Grid, keys: jax.Array, options: Options):
  del options

  def step(x, i, c):
    denoised = c["skip"] * x + c["out"] * denoise(x, i).x0
    return c["x0"] * denoised + c["noise"] * step_noise(keys, i, x.shape).astype(x.dtype)
  return _scan(step, x, grid)


# --- SwD (scale-wise sampling) -------------------------------------------------------------------


def swd_grid(schedule: Schedule, steps: int, options: Options) -> Grid:
  scales, sigmas = options.swd_scales, options.swd_sigmas
  scalewise.check(scales, sigmas)
  if steps != len(scales):
    raise ConfigError(f"sampler 'swd' takes one step per scale: {len(scales)} steps for "
                      f"objective.scales={tuple(scales)}, got {steps}")
  t, alpha, sigma = scalewise.levels(schedule, sigmas)
  # After the last step the sample is its x0 (alpha 1, sigma 0), as diffusers does.
  a_next = np.concatenate([alpha[1:], np.ones(1, np.float32)])
  s_next = np.concatenate([sigma[1:], np.zeros(1, np.float32)])
  return _grid(t, alpha, sigma, x0=a_next, noise=s_next)


def swd(denoise: Denoise, x: jax.Array, grid: Grid, keys: jax.Array, options: Options):
  """Unrolled (the latent's shape changes between steps): the first scale's noise is the top-left
  corner of ``x`` (a crop of white noise is white noise); each step's x0 is upscaled to the next
  scale (torch's bicubic), then noised to the next level with fresh noise."""
  scales = options.swd_scales
  if x.shape[1:3] != (scales[-1], scales[-1]):
    raise ConfigError(f"sampler 'swd' ends at scale {scales[-1]} but the latents are "
                      f"{x.shape[1]}x{x.shape[2]}; objective.scales must end at the latent size")
  x = x[:, :scales[0], :scales[0], :]
  for i in range(grid.steps - 1):
    x0 = scalewise.resize(denoise(x, i).x0, scales[i + 1])
    noise = step_noise(keys, i, x0.shape).astype(x0.dtype)
    x = grid.coef["x0"][i] * x0 + grid.coef["noise"][i] * noise
  return denoise(x, grid.steps - 1).x0  # the last step's x0 is the sample


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(ddim_grid, ddim, stochastic=lambda o: o.eta > 0),
    "ddpm": Sampler(ddpm_grid, ddpm, stochastic=lambda o: True),
    "dpm++": Sampler(dpm_grid, dpm_solver_pp_2m, stochastic=lambda o: False),
    "euler": Sampler(euler_grid, euler, stochastic=lambda o: False, schedules="flow"),
    "lcm": Sampler(lcm_grid, lcm, stochastic=lambda o: True, schedules="discrete"),
    "swd": Sampler(swd_grid, swd, stochastic=lambda o: True),
}


def step_sides(name: str, options: Options) -> tuple[int, ...]:
  """The latent side of each step of a scale-wise sampler (``swd``); () for the others, whose
  every step runs at full size."""
  return tuple(options.swd_scales) if name == "swd" else ()


def scale_schedule(name: str, options: Options) -> str:
  """The results table's ``scale_schedule`` of a cell: the sides joined by ``-`` ("8-12-16")
  for ``swd``, "" for full-size samplers."""
  return "-".join(str(s) for s in step_sides(name, options))


def get(name: str) -> Sampler:
  try:
    return SAMPLERS[name]
  except KeyError:
    raise ConfigError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}") from None


def check(name: str, schedule: Schedule, prediction: str, options: Options) -> None:
  """Raises ConfigError for a sampler / schedule / parametrisation / option set that cannot work."""
  spec = get(name)
  if spec.schedules == "flow" and not schedule.is_flow:
    raise ConfigError(
        f"sampler {name!r} integrates the rectified-flow ODE and needs "
        f"diffusion.schedule='rectified_flow' (got {schedule.name!r}); for a discrete schedule "
        f"use 'ddim', the same first-order step of its probability-flow ODE")
  if spec.schedules == "discrete" and schedule.is_flow:
    raise ConfigError(f"sampler {name!r} samples consistency-distilled models of a discrete "
                      f"schedule; diffusion.schedule='rectified_flow' has none")
  if not 0.0 <= options.eta <= 1.0:
    raise ConfigError(f"ddim eta must be in [0, 1], got {options.eta}")


def build_grid(name: str, schedule: Schedule, steps: int, prediction: str,
               options: Options = Options()) -> Grid:
  """The grid of a sampler, after checking that the combination can work."""
  check(name, schedule, prediction, options)
  grid = get(name).grid(schedule, steps, options)
  if prediction == "eps" and np.any(grid.alpha <= 0):
    step = int(np.argmax(grid.alpha <= 0))
    raise ConfigError(
        f"sampler {name!r} cannot use prediction='eps' on this schedule: at step {step} the model "
        f"sees alpha = 0 (pure noise, sigma = 1), where x0 = (x - sigma * eps) / alpha is "
        f"undefined; sample a model trained with prediction 'v', 'x0' or 'flow' (or a schedule "
        f"whose grid stays below sigma = 1)")
  return grid


def options_from_config(config) -> Options:
  o = config.objective
  return Options(eta=float(config.eval.ddim_eta), lcm_solver_steps=int(o.solver_steps),
                 lcm_timestep_scaling=float(o.timestep_scaling),
                 swd_scales=tuple(int(v) for v in o.scales),
                 swd_sigmas=tuple(float(v) for v in o.sigmas))
