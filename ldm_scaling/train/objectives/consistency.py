"""Consistency distillation of a trained text-to-image UNet (``objective.name=consistency``).

The teacher is a finished denoising run (``objective.teacher`` = its workdir; its EMA weights by
default). The student has the teacher's architecture and starts as the teacher; it learns to map
any point of the teacher's classifier-free-guided (``objective.cfg_scale``) probability-flow ODE
to the trajectory's start in one evaluation (``ldm_scaling.diffusion.consistency``). The target
network is the trainer's EMA of the student, so ``train.ema_decay`` is the target's decay (LCM
used 0.95; the 0.9999 of pretraining makes the target nearly frozen).

Guidance-conditioned student (LCM): with ``model.guidance_embed=True`` and
``objective.cfg_range=(lo, hi)`` each example draws its own scale ``w ~ U[lo, hi)``; the teacher
steps with ``w`` and the student and target take ``w`` as input (``models.unet``'s w embedding).
The student is the teacher plus a zero-initialised ``cond_proj``, so at step 0 it computes what
the teacher does at every ``w``. Sampled by ``generate`` with each cell's scale as ``w``, one
forward per step, it can be swept over a CFG grid like any model (scales outside ``[lo, hi]``
were never trained). :func:`distillation_compute` is its training compute with the teacher's
passes, and the teacher's own training beside it.

Batches, text encoder and VAE are those of the denoising objective (``conditioning``, same
``objective.inputs``).
The unconditional context is the text encoder's embedding of ``""``; with
``objective.inputs=embeddings`` (no text encoder) it is all zeros. Sample a student with the
``lcm`` sampler at cfg 1 (``--config.eval.samplers='("lcm",)' eval.cfg_scales='(1.0,)'
eval.steps='(1,2,4)'``): it needs no guidance pass (a guidance-conditioned one: at the scales of
``objective.cfg_range``, e.g. ``eval.cfg_scales='(1.5,3.0,4.5,6.0)'``).
"""

from __future__ import annotations

import json
import logging

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling import config as cfglib
from ldm_scaling import data
from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling import sharding as sh
from ldm_scaling.diffusion import consistency as cd
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import cost as costlib
from ldm_scaling.models import unet as unet_lib
from ldm_scaling.train import checkpoint
from ldm_scaling.train.objectives import base
from ldm_scaling.train.objectives import conditioning

log = logging.getLogger(__name__)

# Teacher and student must agree on these (the student starts as the teacher, and both see the
# same latents, timesteps and text embeddings). Keys that change how, not what, are ignored.
_MATCH = ("model", "diffusion", "text", "vae")
_HOW_NOT_WHAT = ("remat", "attn_query_chunk", "attn_kernel", "dtype", "dir")
_STUDENT_ONLY = ("guidance_embed",)  # the student's w input (the teacher has none)


@base.register("consistency")
class Consistency(base.Objective):
  """``loss = d(f_student(x_t, t), f_ema(DDIM_teacher,w(x_t, t -> t - k), t - k))``."""

  sample_network = "unet"

  @staticmethod
  def validate(config) -> None:
    conditioning.validate(config)
    o = config.objective
    check_teacher_settings(config)
    if o.loss not in cd.LOSSES:
      raise ConfigError(f"unknown objective.loss {o.loss!r}; available: {', '.join(cd.LOSSES)}")
    if o.huber_c <= 0:
      raise ConfigError(f"objective.huber_c must be > 0, got {o.huber_c}")
    if o.cfg_scale < 0:
      raise ConfigError(f"objective.cfg_scale must be >= 0 (1 = no guidance), got {o.cfg_scale}")
    cd.check_cfg_range(o.cfg_range, bool(config.model.guidance_embed))
    if o.timestep_scaling <= 0:
      raise ConfigError(f"objective.timestep_scaling must be > 0, got {o.timestep_scaling}")
    cd.check(diffusion.schedule_from_config(config.diffusion), int(o.solver_steps))

  def __init__(self, config):
    super().__init__(config)
    self.unet = models.build(config.model)
    # The teacher's UNet: the student's without the w input.
    self.teacher_unet = self.unet.clone(guidance_embed=False)
    self.schedule = diffusion.schedule_from_config(config.diffusion)
    self.cfg_range = cd.check_cfg_range(config.objective.cfg_range,
                                        bool(config.model.guidance_embed))
    if config.data.caption_dropout > 0 and cd.teacher_forwards(config.objective.cfg_scale,
                                                               self.cfg_range) == 2:
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
    w = dict(w=jnp.ones((1,), jnp.float32)) if self.cfg_range else {}
    return {"unet": self.unet.init(rng, x, jnp.zeros((1,)), ctx, **w)["params"]}

  def frozen(self):
    """The text encoder and VAE, the teacher (its logical axis names kept, so it is sharded like
    the student; a guidance-conditioned student's teacher gets a zero ``cond_proj``, which the
    student starts from and the teacher's forward leaves out) and the unconditional context (the
    encoder's ``""``): :func:`load_teacher`."""
    return load_teacher(self.config, self.teacher_unet,
                        jax.eval_shape(self.init, jax.random.key(0))["unet"])

  def phases(self):
    return (base.Phase("distil", ("unet",), self.loss),)

  def batch_spec(self, batch_size):
    return conditioning.batch_spec(self.config, batch_size)

  def loss(self, params, frozen, ema, batch, rng):
    enc_rng, drop_rng, loss_rng = jax.random.split(rng, 3)
    latents, context = conditioning.inputs(frozen, batch, enc_rng)
    apply = self.unet.apply
    o, d = self.config.objective, self.config.diffusion
    # A guidance-conditioned student: one scale per example, for the teacher and as the input of
    # the student and the target (a key of its own: the other draws are as without it).
    w = None
    scale = float(o.cfg_scale)
    if self.cfg_range:
      w = scale = cd.sample_scales(jax.random.fold_in(rng, 1), latents.shape[0], self.cfg_range)

    def student(x, t, c):
      return apply({"params": params["unet"]}, x, t, c, train=True, w=w,
                   rngs={"dropout": drop_rng})

    def target(x, t, c):
      return apply({"params": jax.lax.stop_gradient(ema["unet"])}, x, t, c, w=w)

    teacher_params = unet_lib.without_guidance(frozen["teacher"].params)

    def teacher(x, t, c):
      return self.teacher_unet.apply({"params": teacher_params}, x, t, c)

    value, metrics = cd.distillation_loss(
        student, target, teacher, latents, context, frozen["uncond"].params, loss_rng,
        schedule=self.schedule, prediction=d.prediction, solver_steps=int(o.solver_steps),
        cfg_scale=scale, timestep_scaling=float(o.timestep_scaling), loss=o.loss,
        huber_c=float(o.huber_c))
    if w is not None:
      metrics = dict(metrics, cfg_scale_mean=jnp.mean(w))
    return value, metrics

  def preview_scale(self) -> float:
    """The scale the preview samples at: 1 (the guidance is distilled in), or the middle of a
    guidance-conditioned student's ``cfg_range``."""
    return 1.0 if not self.cfg_range else float(sum(self.cfg_range) / 2)

  def preview(self, weights, frozen, step):
    return conditioning.preview(self.config, self.unet, weights["unet"], frozen, step, "lcm",
                                min(4, int(self.config.objective.solver_steps)),
                                self.preview_scale(), "EMA")

  def train_flops_per_example(self, phase):
    """Every UNet pass of a step (:func:`cd.unet_forwards`): student forward + backward (3
    forwards), the guided teacher (2 forwards: conditional and unconditional; 1 at a fixed
    cfg_scale of 1) and the target (1 forward)."""
    del phase
    o = self.config.objective
    return sum(cd.unet_forwards(o.cfg_scale, self.cfg_range).values()) * conditioning.unet_flops(
        self.config)


def check_teacher_settings(config) -> None:
  """The ``objective.teacher*`` keys every distillation objective reads (no loading)."""
  o = config.objective
  if not o.teacher:
    raise ConfigError(f"objective.name={o.name} needs objective.teacher: the workdir of the "
                      f"trained denoising run to distil (--config.objective.teacher=PATH)")
  if o.teacher_weights not in ("ema", "params"):
    raise ConfigError(f"objective.teacher_weights must be 'ema' or 'params', got "
                      f"{o.teacher_weights!r}")
  if o.teacher_step < -1:
    raise ConfigError(f"objective.teacher_step must be -1 (the finished teacher's last "
                      f"checkpoint) or a step, got {o.teacher_step}")


def load_teacher(config, teacher_module, boxed) -> dict[str, base.Frozen]:
  """The frozen networks of a distillation: the text encoder and VAE (``conditioning.frozen``),
  ``teacher`` (``objective.teacher``'s weights as the values of ``boxed``, the student's boxed
  abstract parameters, so the teacher is sharded like the student; a zero ``cond_proj`` where the
  student has a w input) called as ``teacher_module``, and ``uncond`` (the text encoder's ``""``,
  zeros without one). Checks first that the teacher run can be distilled into this config (the
  trainer loads frozen networks before it writes anything)."""
  o = config.objective
  step = check_teacher(config)
  frozen = conditioning.frozen(config)
  step, weights = checkpoint.load_weights(o.teacher, step=step, which=o.teacher_weights)
  if "unet" not in weights:
    raise ConfigError(f"teacher run {o.teacher!r} has no 'unet' network (it has "
                      f"{sorted(weights)}); is it a denoising run?")
  log.info("teacher: %s step %d (%s weights)", o.teacher, step, o.teacher_weights)
  values = unet_lib.with_zero_guidance(jax.device_get(weights["unet"]), boxed)
  frozen["teacher"] = base.Frozen(teacher_module, sh.replace_values(boxed, values))
  shape = (1, config.text.max_length, config.model.cross_attn_dim)
  if conditioning.from_pipeline(config):
    uncond = np.asarray(frozen["text"].module.embed_text([""]), np.float32).reshape(shape)
  else:
    uncond = np.zeros(shape, np.float32)
  frozen["uncond"] = base.Frozen(None, uncond)
  return frozen


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
  mine, theirs = data.latent_size(config), data.latent_size(tcfg)
  if mine != theirs:
    raise ConfigError(f"objective.teacher {teacher!r} was trained on {theirs}x{theirs} latents "
                      f"(data.resolution {tcfg.data.resolution}); here they are {mine}x{mine} "
                      f"(data.resolution {config.data.resolution}): set data.resolution to the "
                      f"teacher's")
  for section in _MATCH:
    diff = cfglib.section_changes(tcfg, config, section, _HOW_NOT_WHAT + _STUDENT_ONLY)
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


def distillation_compute(config, step: int, *, teacher_config=None,
                         teacher_steps: int | None = None) -> dict[str, float]:
  """Training compute of a consistency student at ``step``, in the results table's units: a
  denoising run's ``train_compute`` is ``norm_cost x step``, one step being a forward + backward
  (3 forward passes) at the run's ``train.batch_size``. Here one unit = 3 UNet forwards at
  normalised cost 1 per example of the student's batch, so

  * ``student_passes``: its own forward + backward, ``norm_cost x step`` (what the table wrote);
  * ``teacher_forwards``: the guided teacher's passes (``cd.unet_forwards``: 2 per example, 1 at a
    fixed cfg 1) at the teacher's normalised cost, ``x forwards / 3``;
  * ``target_forwards``: the target's one forward, ``norm_cost x step / 3``;
  * ``student``: the sum of those three, the student's training compute;
  * ``teacher_training``: the teacher's own training to the distilled checkpoint, ``teacher
    norm_cost x teacher steps x teacher batch / student batch`` (= its own row's
    ``train_compute`` when the batch sizes agree), reported separately;
  * ``total``: ``student + teacher_training``.

  ``teacher_config`` / ``teacher_steps`` default to ``objective.teacher``'s config and the
  checkpoint it distils (read from its workdir)."""
  o = config.objective
  if teacher_config is None:
    teacher_config = _teacher_config(config)
  if teacher_steps is None:
    teacher_steps = teacher_step(config, teacher_config)
  cfg_range = cd.check_cfg_range(o.cfg_range, bool(config.model.get("guidance_embed", False)))
  passes = cd.unet_forwards(o.cfg_scale, cfg_range)
  student_cost = costlib.model_cost(config.model, config.cost).norm_cost
  teacher_cost = costlib.model_cost(teacher_config.model, teacher_config.cost).norm_cost
  per_step = lambda cost, forwards: cost * step * forwards / 3
  out = dict(student_passes=per_step(student_cost, passes["student"]),
             teacher_forwards=per_step(teacher_cost, passes["teacher"]),
             target_forwards=per_step(student_cost, passes["target"]))
  out["student"] = sum(out.values())
  out["teacher_training"] = (teacher_cost * teacher_steps * teacher_config.train.batch_size
                             / config.train.batch_size)
  out["total"] = out["student"] + out["teacher_training"]
  return {k: float(v) for k, v in out.items()}
