"""Consistency distillation of a trained text-to-image UNet (``objective.name=consistency``).

The teacher is a finished denoising run (``objective.teacher`` = its workdir; its EMA weights by
default). The student has the teacher's architecture and starts as the teacher; it learns to map
any point of the teacher's classifier-free-guided (``objective.cfg_scale``) probability-flow ODE
to the trajectory's start in one evaluation (``ldm_scaling.diffusion.consistency``). The target
network is the trainer's EMA of the student, so ``train.ema_decay`` is the target's decay (LCM
used 0.95; the 0.9999 of pretraining makes the target nearly frozen).

Batches, text encoder and VAE are those of the denoising objective (``conditioning``, same
``objective.inputs``).
The unconditional context is the text encoder's embedding of ``""``; with
``objective.inputs=embeddings`` (no text encoder) it is all zeros. Sample a student with the
``lcm`` sampler at cfg 1 (``--config.eval.samplers='("lcm",)' eval.cfg_scales='(1.0,)'
eval.steps='(1,2,4)'``): it needs no guidance pass.
"""

from __future__ import annotations

import json
import logging

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling import config as cfglib
from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling import sharding as sh
from ldm_scaling.diffusion import consistency as cd
from ldm_scaling.errors import ConfigError
from ldm_scaling.train import checkpoint
from ldm_scaling.train.objectives import base
from ldm_scaling.train.objectives import conditioning

log = logging.getLogger(__name__)

# Teacher and student must agree on these (the student starts as the teacher, and both see the
# same latents, timesteps and text embeddings). Keys that change how, not what, are ignored.
_MATCH = ("model", "diffusion", "text", "vae")
_HOW_NOT_WHAT = ("remat", "attn_query_chunk", "dtype", "dir")


@base.register("consistency")
class Consistency(base.Objective):
  """``loss = d(f_student(x_t, t), f_ema(DDIM_teacher,w(x_t, t -> t - k), t - k))``."""

  sample_network = "unet"

  @staticmethod
  def validate(config) -> None:
    conditioning.validate(config)
    o = config.objective
    if not o.teacher:
      raise ConfigError("objective.name=consistency needs objective.teacher: the workdir of the "
                        "trained denoising run to distil (--config.objective.teacher=PATH)")
    if o.teacher_weights not in ("ema", "params"):
      raise ConfigError(f"objective.teacher_weights must be 'ema' or 'params', got "
                        f"{o.teacher_weights!r}")
    if o.loss not in cd.LOSSES:
      raise ConfigError(f"unknown objective.loss {o.loss!r}; available: {', '.join(cd.LOSSES)}")
    if o.huber_c <= 0:
      raise ConfigError(f"objective.huber_c must be > 0, got {o.huber_c}")
    if o.cfg_scale < 0:
      raise ConfigError(f"objective.cfg_scale must be >= 0 (1 = no guidance), got {o.cfg_scale}")
    if o.timestep_scaling <= 0:
      raise ConfigError(f"objective.timestep_scaling must be > 0, got {o.timestep_scaling}")
    if o.teacher_step < -1:
      raise ConfigError(f"objective.teacher_step must be -1 (the finished teacher's last "
                        f"checkpoint) or a step, got {o.teacher_step}")
    cd.check(diffusion.schedule_from_config(config.diffusion), int(o.solver_steps))

  def __init__(self, config):
    super().__init__(config)
    self.unet = models.build(config.model)
    self.schedule = diffusion.schedule_from_config(config.diffusion)
    if config.data.caption_dropout > 0 and config.objective.cfg_scale != 1:
      log.warning("data.caption_dropout=%g: that share of examples has an empty caption, where "
                  "the guided teacher is unguided; LCM distils without (set it to 0)",
                  config.data.caption_dropout)

  def networks(self):
    # The student starts as the teacher; its EMA is the consistency target.
    return {"unet": base.Network(start_from="teacher")}

  def init(self, rng):
    side, channels = conditioning.latent_geometry(self.config)
    x = jnp.zeros((1, side, side, channels), jnp.float32)
    ctx = jnp.zeros((1, self.config.text.max_length, self.config.model.cross_attn_dim),
                    jnp.float32)
    return {"unet": self.unet.init(rng, x, jnp.zeros((1,)), ctx)["params"]}

  def frozen(self):
    """The text encoder and VAE, the teacher (its logical axis names kept, so it is sharded like
    the student) and the unconditional context (the encoder's ``""``). Checks first that the
    teacher run can be distilled into this config (the trainer loads frozen networks before it
    writes anything)."""
    o = self.config.objective
    step = check_teacher(self.config)
    frozen = conditioning.frozen(self.config)
    step, weights = checkpoint.load_weights(o.teacher, step=step, which=o.teacher_weights)
    if "unet" not in weights:
      raise ConfigError(f"teacher run {o.teacher!r} has no 'unet' network (it has "
                        f"{sorted(weights)}); is it a denoising run?")
    log.info("teacher: %s step %d (%s weights)", o.teacher, step, o.teacher_weights)
    boxed = jax.eval_shape(self.init, jax.random.key(0))["unet"]
    frozen["teacher"] = base.Frozen(self.unet, sh.replace_values(boxed,
                                                                 jax.device_get(weights["unet"])))
    shape = (1, self.config.text.max_length, self.config.model.cross_attn_dim)
    if conditioning.from_pipeline(self.config):
      uncond = np.asarray(frozen["text"].module.embed_text([""]), np.float32).reshape(shape)
    else:
      uncond = np.zeros(shape, np.float32)
    frozen["uncond"] = base.Frozen(None, uncond)
    return frozen

  def phases(self):
    return (base.Phase("distil", ("unet",), self.loss),)

  def batch_spec(self, batch_size):
    return conditioning.batch_spec(self.config, batch_size)

  def loss(self, params, frozen, ema, batch, rng):
    enc_rng, drop_rng, loss_rng = jax.random.split(rng, 3)
    latents, context = conditioning.inputs(frozen, batch, enc_rng)
    apply = self.unet.apply
    o, d = self.config.objective, self.config.diffusion

    def student(x, t, c):
      return apply({"params": params["unet"]}, x, t, c, train=True, rngs={"dropout": drop_rng})

    def target(x, t, c):
      return apply({"params": jax.lax.stop_gradient(ema["unet"])}, x, t, c)

    def teacher(x, t, c):
      return apply({"params": frozen["teacher"].params}, x, t, c)

    return cd.distillation_loss(
        student, target, teacher, latents, context, frozen["uncond"].params, loss_rng,
        schedule=self.schedule, prediction=d.prediction, solver_steps=int(o.solver_steps),
        cfg_scale=float(o.cfg_scale), timestep_scaling=float(o.timestep_scaling), loss=o.loss,
        huber_c=float(o.huber_c))

  def preview(self, weights, frozen, step):
    return conditioning.preview(self.config, self.unet, weights["unet"], frozen, step, "lcm",
                                min(4, int(self.config.objective.solver_steps)), 1.0, "EMA")

  def train_flops_per_example(self, phase):
    """Every UNet pass of a step: student forward + backward (3 forwards), the guided teacher
    (2 forwards: conditional and unconditional; 1 at cfg_scale 1) and the target (1 forward)."""
    del phase
    teacher = 2 if float(self.config.objective.cfg_scale) != 1.0 else 1
    return (3 + teacher + 1) * conditioning.unet_flops(self.config)


def check_teacher(config) -> int:
  """The teacher checkpoint to distil, after checking that the student can start from it (the
  teacher's config matches, the run is finished or the step pinned); ConfigError otherwise."""
  return teacher_step(config, _teacher_config(config))


def _teacher_config(config):
  """The teacher run's config, after checking that the student can start from it."""
  teacher = config.objective.teacher
  try:
    tcfg = checkpoint.load_run_config(teacher)
  except checkpoint.RunNotFoundError as e:
    raise ConfigError(f"objective.teacher: {e}") from None
  if tcfg.objective.name != "denoising":
    raise ConfigError(f"objective.teacher {teacher!r} is a {tcfg.objective.name!r} run; distil "
                      f"a denoising run")
  for section in _MATCH:
    diff = cfglib.section_changes(tcfg, config, section, _HOW_NOT_WHAT)
    if diff:
      value = lambda c, k: json.loads(json.dumps(c[section].get(k), default=list))
      shown = ", ".join(f"{section}.{k}: teacher {value(tcfg, k)!r}, here {value(config, k)!r}"
                        for k in diff[:4])
      raise ConfigError(f"the student must have its teacher's {section} settings ({shown}); "
                        f"start from the teacher's config ({epath.Path(teacher) / 'config.json'})")
  return tcfg


def teacher_step(config, tcfg) -> int:
  """The teacher checkpoint to distil: ``objective.teacher_step``, or (-1) the last one of a
  finished teacher -- never a teacher that is still training, whose latest step would change
  between the student's start and its resumptions."""
  teacher, step = config.objective.teacher, int(config.objective.teacher_step)
  steps = checkpoint.available_steps(teacher)
  if not steps:
    raise ConfigError(f"objective.teacher {teacher!r} has no complete checkpoint yet")
  if step >= 0:
    if step not in steps:
      raise ConfigError(f"objective.teacher_step={step}: {teacher!r} has checkpoints {steps}")
    return step
  if max(steps) < tcfg.train.steps:
    raise ConfigError(f"objective.teacher {teacher!r} is at step {max(steps)} of "
                      f"{tcfg.train.steps}: distil a finished teacher, or pin a checkpoint with "
                      f"objective.teacher_step={max(steps)}")
  return max(steps)
