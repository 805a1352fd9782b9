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

Each student's own ``eval`` section is the ``lcm`` sampler at cfg 1 and ``eval_steps`` steps, so
``ldm-scaling eval --workdir <student>`` (without ``--config``) evaluates it as a consistency
model.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.launch import sweeps

TEACHERS = (128, 320, 768)
OBJECTIVES = ("consistency",)


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=TEACHERS, objectives=OBJECTIVES, steps=500_000,
                         student_steps=50_000, base="configs/t2i.py",
                         root=sweeps.DEFAULT_WORKDIR_ROOT, teacher_key="objective.teacher",
                         ema_decay=0.95, lr=1e-6, eval_steps=(1, 2, 4, 8))
  sweep = sweeps.sweep_config()
  sweep.name = "distillation"
  sweep.command = "train"
  sweep.base = f"{arg.base}:steps={arg.student_steps}"
  sweep.source = sweeps.model_size_source(arg)
  sweep.source_overrides = True
  sweep.source_key = arg.teacher_key
  sweep.axes = (("objective.name", tuple(arg.objectives)),)
  sweep.labels = (("objective.name", ""),)
  # The students' own eval section: consistency sampling without guidance, 1-8 steps.
  # LCM's full-UNet recipe: lr 1e-6, no weight decay, target EMA 0.95, no empty captions (on
  # those the guided teacher would be unguided).
  sweep.overrides = (("train.ema_decay", float(arg.ema_decay)), ("train.lr", float(arg.lr)),
                     ("train.weight_decay", 0.0), ("data.caption_dropout", 0.0),
                     ("eval.samplers", ("lcm",)), ("eval.cfg_scales", (1.0,)),
                     ("eval.steps", tuple(int(s) for s in arg.eval_steps)))
  sweep.workdir_root = arg.root
  return sweep
