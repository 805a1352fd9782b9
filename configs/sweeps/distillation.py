"""Distillation sweep: for each teacher width, a student per distillation objective.

  ldm-scaling sweep --config configs/sweeps/distillation.py --dry-run
  ldm-scaling sweep --config configs/sweeps/distillation.py:objectives=(consistency,scale_wise) \
      --dry-run

Teachers are the runs of ``configs/sweeps/model_size.py`` (same ``steps``/``base``/``root``): the
student ``w<width>-<objective>`` inherits its teacher's model overrides (same width and heads),
gets the teacher's workdir as ``objective.teacher`` (``teacher_key``) and trains for
``student_steps``, no caption dropout. Each objective has its own recipe (``sweep.when``):

* ``consistency`` (consistency distillation, LCM's settings): target-network EMA decay
  ``ema_decay`` (0.95), learning rate ``lr`` (1e-6), no weight decay. Students are
  guidance-conditioned by default (LCM's ``w`` input: ``model.guidance_embed=True``,
  ``objective.cfg_range=cfg_range``, w drawn per example), so like every other model they are
  evaluated over a CFG grid: the ``lcm`` sampler at ``eval_steps`` steps and the scales
  ``eval_cfg`` (the CFG sweep's grid plus 1). ``guidance=false``: distilled at the fixed
  ``objective.cfg_scale`` instead, evaluated at cfg 1 only (the guidance is baked in).
* ``scale_wise`` (SwD, ``docs/training.md``): SwD's settings (AdamW lr ``swd_lr`` 5e-6, weight
  decay 1e-2, no EMA, 5 fake-score updates per student update, the teacher's DMD guidance
  ``swd_cfg`` 7) and ``swd_scales`` / ``swd_sigmas``: SwD's 4-step SD3.5 schedule (sides 64, 80,
  96, 128 of 128) halved for the 64x64 latents of ``configs/t2i.py``, at SD-XL's (VP) noise levels
  ``1000 (1, .8, .6, .4)``. Evaluated with the ``swd`` sampler at its 4 steps, cfg 1 (the student
  samples without guidance).

``ldm-scaling eval --workdir <student>`` (without ``--config``) evaluates the student's own grid.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.diffusion import consistency
from ldm_scaling.launch import sweeps

TEACHERS = (128, 320, 768)
OBJECTIVES = ("consistency",)  # objectives=(consistency,scale_wise) adds SwD students
EVAL_CFG = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # configs/sweeps/cfg.py's grid plus 1


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=TEACHERS, objectives=OBJECTIVES, steps=500_000,
                         student_steps=50_000, base="configs/t2i.py",
                         root=sweeps.DEFAULT_WORKDIR_ROOT, teacher_key="objective.teacher",
                         ema_decay=0.95, lr=1e-6, eval_steps=(1, 2, 4, 8), guidance=True,
                         cfg_range=(1.0, 8.0), eval_cfg=EVAL_CFG, swd_lr=5e-6, swd_cfg=7.0,
                         swd_scales=(32, 40, 48, 64), swd_sigmas=(1.0, 0.8, 0.6, 0.4))
  sweep = sweeps.sweep_config()
  sweep.name = "distillation"
  sweep.command = "train"
  sweep.base = f"{arg.base}:steps={arg.student_steps}"
  sweep.source = sweeps.model_size_source(arg)
  sweep.source_overrides = True
  sweep.source_key = arg.teacher_key
  sweep.axes = (("objective.name", tuple(arg.objectives)),)
  sweep.labels = (("objective.name", ""),)
  sweep.overrides = (("data.caption_dropout", 0.0),)  # on empty captions CFG does nothing
  # LCM's full-UNet recipe: lr 1e-6, no weight decay, target EMA 0.95; consistency sampling at
  # 1-8 steps, over a CFG grid when the student takes the scale as its input, else at cfg 1
  # (the guidance is distilled in).
  lcm = [("train.ema_decay", float(arg.ema_decay)), ("train.lr", float(arg.lr)),
         ("train.weight_decay", 0.0)]
  if arg.guidance:
    cfg_range = consistency.check_cfg_range(arg.cfg_range, guidance_embed=True)
    lcm += [("model.guidance_embed", True), ("objective.cfg_range", cfg_range)]
    scales = tuple(float(s) for s in arg.eval_cfg)
  else:
    scales = (1.0,)
  lcm += [("eval.samplers", ("lcm",)), ("eval.cfg_scales", scales),
          ("eval.steps", tuple(int(s) for s in arg.eval_steps))]
  # SwD's recipe (its reference trains LoRAs at lr 5e-6, weight decay 1e-2, no EMA, 5 fake-score
  # updates per student update): scale-wise sampling at its K steps, no guidance.
  swd = [("train.lr", float(arg.swd_lr)), ("train.weight_decay", 1e-2),
         ("objective.cfg_scale", float(arg.swd_cfg)),
         ("objective.scales", tuple(int(s) for s in arg.swd_scales)),
         ("objective.sigmas", tuple(float(s) for s in arg.swd_sigmas)),
         ("eval.samplers", ("swd",)), ("eval.cfg_scales", (1.0,)),
         ("eval.steps", (len(arg.swd_scales),))]
  sweep.when = tuple((("objective.name", name, tuple(recipe)))
                     for name, recipe in (("consistency", lcm), ("scale_wise", swd))
                     if name in tuple(arg.objectives))
  sweep.workdir_root = arg.root
  return sweep
