"""Distillation sweep: for each teacher width, a student per distillation objective.

  ldm-scaling sweep --config configs/sweeps/distillation.py --dry-run

Teachers are the runs of ``configs/sweeps/model_size.py`` (same ``steps``/``base``/``root``): the
student ``w<width>-<objective>`` inherits its teacher's model overrides (same width and heads),
gets the teacher's workdir as ``objective.teacher`` (``teacher_key``) and trains for
``student_steps`` with LCM's settings: target-network EMA decay ``ema_decay`` (0.95), learning
rate ``lr`` (1e-6), no weight decay, no caption dropout.

Objectives: ``consistency`` (consistency distillation, ``docs/training.md``). ``scale_wise``
(SwD) is not implemented yet: ``objectives=(consistency,scale_wise)`` lists its runs as INVALID
("unknown objective.name") and the sweep refuses to launch.

Students are guidance-conditioned by default (LCM's ``w`` input: ``model.guidance_embed=True``,
``objective.cfg_range=cfg_range``, w drawn per example), so like every other model they are
evaluated over a CFG grid: their own ``eval`` section is the ``lcm`` sampler at ``eval_steps``
steps and the scales ``eval_cfg`` (the CFG sweep's grid plus 1), and
``ldm-scaling eval --workdir <student>`` (without ``--config``) evaluates that grid.
``guidance=false``: students distilled at the fixed ``objective.cfg_scale`` instead, evaluated at
cfg 1 only (the guidance is baked in).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.diffusion import consistency
from ldm_scaling.launch import sweeps

TEACHERS = (128, 320, 768)
OBJECTIVES = ("consistency",)
EVAL_CFG = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # configs/sweeps/cfg.py's grid plus 1


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=TEACHERS, objectives=OBJECTIVES, steps=500_000,
                         student_steps=50_000, base="configs/t2i.py",
                         root=sweeps.DEFAULT_WORKDIR_ROOT, teacher_key="objective.teacher",
                         ema_decay=0.95, lr=1e-6, eval_steps=(1, 2, 4, 8), guidance=True,
                         cfg_range=(1.0, 8.0), eval_cfg=EVAL_CFG)
  sweep = sweeps.sweep_config()
  sweep.name = "distillation"
  sweep.command = "train"
  sweep.base = f"{arg.base}:steps={arg.student_steps}"
  sweep.source = sweeps.model_size_source(arg)
  sweep.source_overrides = True
  sweep.source_key = arg.teacher_key
  sweep.axes = (("objective.name", tuple(arg.objectives)),)
  sweep.labels = (("objective.name", ""),)
  # LCM's full-UNet recipe: lr 1e-6, no weight decay, target EMA 0.95, no empty captions (on
  # those the guided teacher would be unguided).
  overrides = [("train.ema_decay", float(arg.ema_decay)), ("train.lr", float(arg.lr)),
               ("train.weight_decay", 0.0), ("data.caption_dropout", 0.0)]
  # The students' own eval section: consistency sampling at 1-8 steps, over a CFG grid when the
  # student takes the scale as its input, else at cfg 1 (the guidance is distilled in).
  if arg.guidance:
    cfg_range = consistency.check_cfg_range(arg.cfg_range, guidance_embed=True)
    overrides += [("model.guidance_embed", True), ("objective.cfg_range", cfg_range)]
    scales = tuple(float(s) for s in arg.eval_cfg)
  else:
    scales = (1.0,)
  overrides += [("eval.samplers", ("lcm",)), ("eval.cfg_scales", scales),
                ("eval.steps", tuple(int(s) for s in arg.eval_steps))]
  sweep.overrides = tuple(overrides)
  sweep.workdir_root = arg.root
  return sweep
