"""Scale-wise distillation (SwD) of a trained text-to-image UNet (``objective.name=scale_wise``).

The teacher is a finished denoising run (``objective.teacher``, as for ``consistency``). Three
trainable networks:

* ``unet``, the student: starts as the teacher; samples in ``K = len(objective.scales)`` steps
  whose latent grows from ``scales[0]`` to the full size (the ``swd`` sampler). Its EMA is what
  eval reads; ``objective.swd.ema_decay=0`` (default, as SwD: no EMA) makes it the weights;
* ``fake``, the fake-score network: starts as the teacher, learns the student's distribution;
* ``head``, the GAN discriminator head on the fake network's mid-block features.

Two phases run in a cycle: ``fake`` (``fake`` + ``head``, ``objective.swd.fake_updates`` steps in
a row), then ``student`` (``unet``, one step). The scale index of a cycle, ``k = cycle % K``, is
the phases' static choice (one program per phase and scale), a pure function of the step, so a
resumed run continues exactly. Losses: ``ldm_scaling.diffusion.scalewise.student_loss`` /
``fake_loss``. Without DMD and GAN (``dmd_weight = gan_weight = 0``: "MMD only") there is no fake
network to train: one phase, and MMD reads the teacher's features (what the fake network would
be, untrained).

Clean data at scale ``s_k`` is the batch's latent area-downscaled to ``s_k`` (SwD downscales the
image in pixel space and encodes each scale with the VAE; in latent space the same step works for
``objective.inputs=embeddings`` and cached latents, and costs no encoder passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling.diffusion import scalewise as swd
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import cost as costlib
from ldm_scaling.train.objectives import base
from ldm_scaling.train.objectives import conditioning
from ldm_scaling.train.objectives import consistency

FEATURE_BLOCK = "mid_block"  # the UNet block whose output MMD and the GAN head read


@base.register("scale_wise")
class ScaleWise(base.Objective):
  """Student ``L = dmd_weight DMD + mmd_weight MMD + gan_weight GAN``; fake-score network: x0
  regression on the student's samples + ``fake_gan_weight`` discriminator loss."""

  sample_network = "unet"

  @staticmethod
  def validate(config) -> None:
    o, s = config.objective, config.objective.swd
    if not o.scales:
      raise ConfigError("objective.name=scale_wise needs objective.scales and objective.sigmas: "
                        "the latent side and noise level of each sampling step, e.g. "
                        "--config.objective.scales='(8,12,16)' "
                        "--config.objective.sigmas='(1.0,0.9,0.75)'")
    conditioning.validate(config)  # also objective.scales / sigmas against the latent and UNet
    consistency.check_teacher_settings(config)
    if config.model.guidance_embed:
      raise ConfigError("objective.name=scale_wise trains a student that samples without "
                        "guidance; set model.guidance_embed=False")
    if o.cfg_scale < 0:
      raise ConfigError(f"objective.cfg_scale must be >= 0 (the teacher's guidance in DMD), got "
                        f"{o.cfg_scale}")
    for key in ("dmd_weight", "mmd_weight", "gan_weight", "fake_gan_weight", "ema_decay"):
      if s[key] < 0:
        raise ConfigError(f"objective.swd.{key} must be >= 0, got {s[key]}")
    if not (s.dmd_weight or s.mmd_weight or s.gan_weight):
      raise ConfigError("objective.swd: dmd_weight, mmd_weight and gan_weight are all 0; the "
                        "student would learn nothing")
    if s.ema_decay >= 1:
      raise ConfigError(f"objective.swd.ema_decay must be < 1, got {s.ema_decay}")
    if int(s.fake_updates) < 1:
      raise ConfigError(f"objective.swd.fake_updates must be >= 1, got {s.fake_updates}")
    if s.input_order not in swd.ORDERS:
      raise ConfigError(f"unknown objective.swd.input_order {s.input_order!r}; available: "
                        f"{', '.join(swd.ORDERS)}")
    if s.mmd_kernel not in ("linear", "rbf"):
      raise ConfigError(f"unknown objective.swd.mmd_kernel {s.mmd_kernel!r}; available: linear, "
                        f"rbf")
    schedule = diffusion.schedule_from_config(config.diffusion)
    for key in ("dmd_indices", "mmd_indices"):
      rng = tuple(s[key])
      if len(rng) != 2:
        raise ConfigError(f"objective.swd.{key} must be (lo, hi), got {rng}")
      try:
        swd.grid_levels(schedule, int(s.noise_grid), *rng)
      except ConfigError as e:
        raise ConfigError(f"objective.swd.{key}: {e}") from None

  def __init__(self, config):
    super().__init__(config)
    o, s = config.objective, config.objective.swd
    self.unet = models.build(config.model)
    self.schedule = diffusion.schedule_from_config(config.diffusion)
    self.scales = tuple(int(v) for v in o.scales)
    self.step_levels = swd.levels(self.schedule, o.sigmas)
    grid = int(s.noise_grid)
    self.dmd_levels = swd.grid_levels(self.schedule, grid, *s.dmd_indices)
    self.mmd_levels = swd.grid_levels(self.schedule, grid, *s.mmd_indices)
    self.fake_levels = swd.grid_levels(self.schedule, grid, 0, grid)
    self.trains_fake = bool(s.dmd_weight or s.gan_weight)
    self.head = swd.DiscriminatorHead() if s.gan_weight else None

  # --- declaration --------------------------------------------------------------------------------

  def networks(self):
    nets = {"unet": base.Network(start_from="teacher", ema_decay=float(
        self.config.objective.swd.ema_decay))}
    if self.trains_fake:
      nets["fake"] = base.Network(start_from="teacher", ema=False)
    if self.head is not None:
      nets["head"] = base.Network(ema=False)
    return nets

  def feature_channels(self) -> int:
    m = self.config.model
    return int(m.width * m.channel_mult[-1])

  def init(self, rng):
    side, channels = conditioning.latent_geometry(self.config)
    x = jnp.zeros((1, side, side, channels), jnp.float32)
    ctx = jnp.zeros((1, self.config.text.max_length, self.config.model.cross_attn_dim),
                    jnp.float32)
    unet_rng, head_rng = jax.random.split(rng)
    unet = self.unet.init(unet_rng, x, jnp.zeros((1,)), ctx)["params"]
    out = {"unet": unet}
    if self.trains_fake:
      out["fake"] = unet
    if self.head is not None:
      out["head"] = self.head.init(head_rng, jnp.zeros((1, self.feature_channels())))["params"]
    return out

  def frozen(self):
    """The text encoder and VAE, the teacher and the unconditional context (as consistency
    distillation loads them; the teacher run is checked first)."""
    return consistency.load_teacher(self.config, self.unet,
                                    jax.eval_shape(self.init, jax.random.key(0))["unet"])

  def scale_index(self, step: int) -> int:
    """The scale a step trains: one per cycle of phases, cycling through the K scales."""
    cycle = int(self.config.objective.swd.fake_updates) + 1 if self.trains_fake else 1
    return (step // cycle) % len(self.scales)

  def phases(self):
    student = base.Phase("student", ("unet",), self.student_loss, choice=self.scale_index)
    if not self.trains_fake:
      return (student,)
    updates = ("fake", "head") if self.head is not None else ("fake",)
    fake = base.Phase("fake", updates, self.fake_loss,
                      every=int(self.config.objective.swd.fake_updates), choice=self.scale_index)
    return (fake, student)

  def batch_spec(self, batch_size):
    return conditioning.batch_spec(self.config, batch_size)

  # --- losses -------------------------------------------------------------------------------------

  def _nets(self, params, frozen, *, student_const: bool, fake_const: bool):
    apply = self.unet.apply
    teacher_params = frozen["teacher"].params
    student_params = params["unet"]
    if student_const:
      student_params = jax.lax.stop_gradient(student_params)
    if self.trains_fake:
      fake_params = params["fake"]
      if fake_const:
        fake_params = jax.lax.stop_gradient(fake_params)
    else:
      fake_params = teacher_params

    def student(x, t, c):
      return apply({"params": student_params}, x, t, c)

    def teacher(x, t, c):
      return apply({"params": teacher_params}, x, t, c)

    def fake(x, t, c):
      out, state = apply({"params": fake_params}, x, t, c, mutable=["intermediates"],
                         capture_intermediates=lambda m, method: (
                             m.name == FEATURE_BLOCK and method == "__call__"))
      return out, state["intermediates"][FEATURE_BLOCK]["__call__"][0]
    return student, teacher, fake

  def _head(self, params, const: bool):
    if self.head is None:
      return None
    p = jax.lax.stop_gradient(params["head"]) if const else params["head"]
    return lambda h: self.head.apply({"params": p}, h)

  def student_loss(self, params, frozen, ema, batch, rng, choice):
    del ema
    o, s = self.config.objective, self.config.objective.swd
    enc_rng, loss_rng = jax.random.split(rng)
    latents, context = conditioning.inputs(frozen, batch, enc_rng)
    student, teacher, fake = self._nets(params, frozen, student_const=False, fake_const=True)
    return swd.student_loss(
        student, teacher, fake, self._head(params, const=True), latents, context,
        frozen["uncond"].params, loss_rng, k=choice, scales=self.scales,
        step_levels=self.step_levels, dmd_levels=self.dmd_levels, mmd_levels=self.mmd_levels,
        prediction=self.config.diffusion.prediction, cfg_scale=float(o.cfg_scale),
        dmd_weight=float(s.dmd_weight), mmd_weight=float(s.mmd_weight),
        gan_weight=float(s.gan_weight), order=s.input_order, mmd_kernel=s.mmd_kernel,
        mmd_c=float(s.mmd_c), mmd_bandwidth=float(s.mmd_bandwidth))

  def fake_loss(self, params, frozen, ema, batch, rng, choice):
    del ema
    s = self.config.objective.swd
    enc_rng, loss_rng = jax.random.split(rng)
    latents, context = conditioning.inputs(frozen, batch, enc_rng)
    student, _, fake = self._nets(params, frozen, student_const=True, fake_const=False)
    return swd.fake_loss(
        student, fake, self._head(params, const=False), latents, context, loss_rng, k=choice,
        scales=self.scales, step_levels=self.step_levels, fake_levels=self.fake_levels,
        prediction=self.config.diffusion.prediction,
        gan_weight=float(s.fake_gan_weight) if self.head is not None else 0.0,
        order=s.input_order)

  # --- evaluation ---------------------------------------------------------------------------------

  def preview(self, weights, frozen, step):
    return conditioning.preview(self.config, self.unet, weights["unet"], frozen, step, "swd",
                                len(self.scales), 1.0, "student")

  def relative_step_costs(self) -> tuple[float, ...]:
    """Each sampling step's share of a full-size forward, as the sampling cost counts it."""
    return costlib.step_costs(self.config.model, self.config.cost, self.scales)

  def train_flops_per_example(self, phase):
    """UNet passes of a step (:func:`unet_passes`) at the mean scale's share of a full forward."""
    share = float(np.mean(self.relative_step_costs()))
    return sum(unet_passes(self.config, phase).values()) * share * conditioning.unet_flops(
        self.config)


def unet_passes(config, phase: str) -> dict[str, float]:
  """UNet forward-pass equivalents per example of one step of ``phase`` (a backward ~ 2 forwards):

  * ``student``: its forward + backward (3); DMD: the guided teacher (2, 1 at cfg 1) and the fake
    net (1); GAN: the fake net with a backward to its input (3); MMD: the feature net on real data
    (1) and on the sample with a backward (3);
  * ``fake``: the student's forward (1); the fake net's forward + backward (3); the discriminator's
    real pass with a backward (3)."""
  s = config.objective.swd
  if phase == "fake":
    return dict(student=1.0, fake=3.0 + (3.0 if s.gan_weight and s.fake_gan_weight else 0.0))
  out = dict(student=3.0, teacher=0.0, fake=0.0)
  if s.dmd_weight:
    out["teacher"] += 1.0 if config.objective.cfg_scale == 1.0 else 2.0
    out["fake"] += 1.0
  if s.gan_weight:
    out["fake"] += 3.0
  if s.mmd_weight:
    out["fake"] += 4.0
  return out


def distillation_compute(config, step: int, *, teacher_config=None,
                         teacher_steps: int | None = None) -> dict[str, float]:
  """Training compute of a SwD student at ``step`` in the results table's units (one unit = a
  forward + backward, 3 UNet forwards, at normalised cost 1 per example), as
  ``consistency.distillation_compute`` counts it: ``student`` = every UNet pass of its steps
  (:func:`unet_passes` of each step's phase, the fake-score network's and the teacher's included,
  at the scales' mean measured share of a full-size forward); ``teacher_training`` = the teacher's
  own training, reported apart; ``total``."""
  if teacher_config is None:
    teacher_config = consistency._teacher_config(config)  # pylint: disable=protected-access
  if teacher_steps is None:
    teacher_steps = consistency.teacher_step(config, teacher_config)
  objective = ScaleWise(config)
  phases = objective.phases()
  norm_cost = costlib.model_cost(config.model, config.cost).norm_cost
  share = float(np.mean(objective.relative_step_costs()))
  passes = 0.0
  for phase in phases:
    count = base.updates_before(phases, phase.updates[0], step)
    passes += count * sum(unet_passes(config, phase.name).values())
  out = dict(student=norm_cost * share * passes / 3)
  teacher_cost = costlib.model_cost(teacher_config.model, teacher_config.cost).norm_cost
  out["teacher_training"] = (teacher_cost * teacher_steps * teacher_config.train.batch_size
                             / config.train.batch_size)
  out["total"] = out["student"] + out["teacher_training"]
  return {k: float(v) for k, v in out.items()}


__all__ = ["FEATURE_BLOCK", "ScaleWise", "distillation_compute", "unet_passes"]
