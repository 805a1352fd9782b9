"""Noise schedules: the forward process ``x_t = alpha_t * x0 + sigma_t * eps`` and its time grids.

Two families, both described by ``(alpha_t, sigma_t)``:

* discrete variance-preserving schedules (``scaled_linear`` = SD's, ``linear``, ``cosine``):
  ``num_train_timesteps`` betas, ``alpha_bar = cumprod(1 - beta)``, ``alpha = sqrt(alpha_bar)``,
  ``sigma = sqrt(1 - alpha_bar)``; the model sees the integer timestep ``t`` in ``[0, T)``.
  ``zero_terminal_snr`` rescales the betas so that ``alpha_bar[T-1] = 0`` (Lin et al. 2023).
* ``rectified_flow`` (flow matching, SD3): ``alpha = 1 - s``, ``sigma = s`` for ``s`` in
  ``(0, 1]`` shifted by ``s' = shift * s / (1 + (shift - 1) * s)``; the model sees the continuous
  timestep ``t = T * s`` in ``(0, T]``.

The tables are computed as diffusers 0.35 computes them (betas as float32, ``alpha_bar`` as the
float64-accumulated product of the float32 ``1 - beta`` rounded to float32, exactly what torch's
CPU ``cumprod`` does), and the inference time grids follow diffusers' ``set_timesteps`` of the
scheduler each sampler is compared against (``leading`` / ``trailing`` / ``linspace`` spacing,
``steps_offset``). See docs/diffusion.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.errors import ConfigError

FLOW = "rectified_flow"
SPACINGS = ("leading", "trailing", "linspace")


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """SD's schedule: betas linear in sqrt(beta)."""
  root = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64)
  return root.astype(np.float32) ** 2


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """DDPM's schedule (Ho et al. 2020 use beta 1e-4 .. 0.02)."""
  return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)


def cosine_betas(num_train_timesteps: int, beta_start: float = 0.0, beta_end: float = 0.0,
                 max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine ``alpha_bar`` (diffusers' ``squaredcos_cap_v2``); the beta range
  is not used."""
  del beta_start, beta_end

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  t = num_train_timesteps
  betas = [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)]
  return np.asarray(betas, np.float32)


# Discrete schedule name -> betas(num_train_timesteps, beta_start, beta_end).
BETAS = {
    "scaled_linear": scaled_linear_betas,
    "linear": linear_betas,
    "cosine": cosine_betas,
}
SCHEDULES = (*BETAS, FLOW)


def _cumprod(x: np.ndarray) -> np.ndarray:
  """float32 cumulative product accumulated in float64 (torch's CPU cumprod)."""
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale ``sqrt(alpha_bar)`` so that it ends at 0 and
  starts where it did (float32 arithmetic as diffusers)."""
  root = np.sqrt(_cumprod(np.float32(1) - betas))
  first, last = root[0].copy(), root[-1].copy()
  root = root - last
  root = root * (first / (first - last))
  alpha_bar = root ** 2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (np.float32(1) - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A forward process plus the inference-grid settings (hashable: programs are cached on it).

  ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` are diffusers' scheduler
  settings of the same names (SD uses leading / 1 / False); they apply to discrete schedules.
  """
  name: str = "scaled_linear"
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  zero_terminal_snr: bool = False
  flow_shift: float = 1.0
  timestep_spacing: str = "leading"
  steps_offset: int = 1
  set_alpha_to_one: bool = False

  def __post_init__(self):
    check(self)

  @property
  def is_flow(self) -> bool:
    return self.name == FLOW

  # --- tables -----------------------------------------------------------------------------------

  @functools.cached_property
  def betas(self) -> np.ndarray:
    if self.is_flow:
      raise ConfigError("a rectified_flow schedule has no betas")
    betas = BETAS[self.name](self.num_train_timesteps, self.beta_start, self.beta_end)
    return rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """``alpha_bar[t]`` (float32, shape (T,)) of a discrete schedule."""
    return _cumprod(np.float32(1) - self.betas)

  @functools.cached_property
  def train_sigmas(self) -> np.ndarray:
    """Flow schedule: the T shifted noise levels training draws from (diffusers'
    ``FlowMatchEulerDiscreteScheduler.sigmas`` before ``set_timesteps``), descending, float32."""
    t = self.num_train_timesteps
    s = np.linspace(1, t, t, dtype=np.float32)[::-1] / np.float32(t)
    return shift_sigmas(s, self.flow_shift)

  def train_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model timestep, alpha, sigma) of every training noise level, float32, shape (T,)."""
    if self.is_flow:
      s = self.train_sigmas
      return s * np.float32(self.num_train_timesteps), np.float32(1) - s, s
    ab = self.alphas_cumprod.astype(np.float64)
    t = np.arange(self.num_train_timesteps, dtype=np.float32)
    return t, np.sqrt(ab).astype(np.float32), np.sqrt(1 - ab).astype(np.float32)

  def sample_train_points(self, rng: jax.Array, batch: int):
    """Uniformly drawn training noise levels: ``(t, alpha, sigma)``, each (batch,) float32."""
    t, alpha, sigma = (jnp.asarray(a) for a in self.train_points())
    idx = jax.random.randint(rng, (batch,), 0, self.num_train_timesteps)
    return t[idx], alpha[idx], sigma[idx]

  def snr(self) -> np.ndarray:
    """``alpha^2 / sigma^2`` at every training noise level (float64)."""
    _, alpha, sigma = self.train_points()
    with np.errstate(divide="ignore"):
      return alpha.astype(np.float64) ** 2 / sigma.astype(np.float64) ** 2

  # --- inference grids ---------------------------------------------------------------------------

  def discrete_timesteps(self, steps: int, solver: str = "ddim") -> np.ndarray:
    """Descending integer timesteps of ``steps`` model evaluations, as diffusers'
    ``DDIMScheduler`` / ``DDPMScheduler`` (``solver="ddim"``) or ``DPMSolverMultistepScheduler``
    (``solver="dpm"``, which spaces ``steps + 1`` points and drops the last) set them."""
    check_steps(steps, self)
    t, n = self.num_train_timesteps, steps
    spacing = self.timestep_spacing
    if spacing == "linspace":
      if solver == "dpm":
        ts = np.linspace(0, t - 1, n + 1).round()[::-1][:-1]
      else:
        ts = np.linspace(0, t - 1, n).round()[::-1]
    elif spacing == "leading":
      if solver == "dpm":
        ts = (np.arange(0, n + 1) * (t // (n + 1))).round()[::-1][:-1] + self.steps_offset
      else:
        ts = (np.arange(0, n) * (t // n)).round()[::-1] + self.steps_offset
    else:  # trailing
      ts = np.round(np.arange(t, 0, -t / n)) - 1
    ts = ts.astype(np.int64).copy()
    if ts.max() >= t:
      raise ConfigError(f"{steps} steps with timestep_spacing='{spacing}' and steps_offset="
                        f"{self.steps_offset} reach timestep {ts.max()} >= num_train_timesteps "
                        f"({t}); use fewer steps, steps_offset=0 or 'trailing' spacing")
    return ts

  def flow_sigmas(self, steps: int) -> np.ndarray:
    """``steps`` descending noise levels of a flow schedule, float32, as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (without the appended final 0)."""
    check_steps(steps, self)
    t = self.num_train_timesteps
    s_max, s_min = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
    s = np.linspace(s_max * t, s_min * t, steps) / t
    return shift_sigmas(s, self.flow_shift).astype(np.float32)


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
  """SD3's resolution shift of flow noise levels (in the dtype of ``s``)."""
  return (shift * s / (1 + (shift - 1) * s)).astype(s.dtype)


def check_steps(steps, schedule: Schedule) -> None:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ConfigError(f"sampling steps must be a positive integer, got {steps!r}")
  if not schedule.is_flow and steps > schedule.num_train_timesteps:
    raise ConfigError(f"{steps} sampling steps exceed the {schedule.num_train_timesteps} "
                      f"training timesteps of the {schedule.name!r} schedule; use at most "
                      f"{schedule.num_train_timesteps}")


def check(s: Schedule) -> None:
  """Raises ConfigError naming the bad ``diffusion.*`` key."""
  if s.name not in SCHEDULES:
    raise ConfigError(f"unknown diffusion.schedule {s.name!r}; available: {', '.join(SCHEDULES)}")
  if s.num_train_timesteps < 2:
    raise ConfigError(f"diffusion.num_train_timesteps must be >= 2, got {s.num_train_timesteps}")
  if s.timestep_spacing not in SPACINGS:
    raise ConfigError(f"unknown diffusion.timestep_spacing {s.timestep_spacing!r}; available: "
                      f"{', '.join(SPACINGS)}")
  if s.steps_offset < 0:
    raise ConfigError(f"diffusion.steps_offset must be >= 0, got {s.steps_offset}")
  if s.is_flow:
    if s.flow_shift <= 0:
      raise ConfigError(f"diffusion.flow_shift must be > 0, got {s.flow_shift}")
    if s.zero_terminal_snr:
      raise ConfigError("diffusion.zero_terminal_snr applies to discrete schedules; "
                        "rectified_flow already ends at SNR 0 (sigma = 1): set it to False")
    return
  if s.name != "cosine" and not 0.0 < s.beta_start < s.beta_end < 1.0:
    raise ConfigError(f"diffusion.beta_start ({s.beta_start}) and beta_end ({s.beta_end}) must "
                      f"satisfy 0 < beta_start < beta_end < 1 (SD: 0.00085, 0.012)")


def schedule_from_config(cfg) -> Schedule:
  """The :class:`Schedule` of a config's ``diffusion`` section."""
  return Schedule(
      name=cfg.schedule, num_train_timesteps=int(cfg.num_train_timesteps),
      beta_start=float(cfg.beta_start), beta_end=float(cfg.beta_end),
      zero_terminal_snr=bool(cfg.zero_terminal_snr), flow_shift=float(cfg.flow_shift),
      timestep_spacing=cfg.timestep_spacing, steps_offset=int(cfg.steps_offset),
      set_alpha_to_one=bool(cfg.set_alpha_to_one))
