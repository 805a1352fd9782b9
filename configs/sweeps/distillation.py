"""Distillation sweep: for each teacher width, a student per distillation objective.

  ldm-scaling sweep --config configs/sweeps/distillation.py --dry-run

NEEDS the objectives ``consistency`` and ``scale_wise`` (``objective.name``), which the trainer
does not register yet: until it does, a dry run lists every run as INVALID with the trainer's
"unknown objective.name" message, and nothing can be launched. The axis key ``objective.name``
itself is a schema key, so the sweep expands today.

Teachers are the runs of ``configs/sweeps/model_size.py`` (same ``steps``/``base``/``root``): the
student ``w<width>-<objective>`` inherits its teacher's model overrides (same width and heads) and
trains for ``student_steps``. The teacher's workdir is listed next to each run; once the
objectives define the config key that takes it (e.g. ``objective.teacher_workdir``), pass it as
``teacher_key=objective.teacher_workdir`` and every run gets ``--config.<key>=<teacher workdir>``.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.launch import sweeps

TEACHERS = (128, 320, 768)
OBJECTIVES = ("consistency", "scale_wise")


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=TEACHERS, objectives=OBJECTIVES, steps=500_000,
                         student_steps=50_000, base="configs/t2i.py",
                         root=sweeps.DEFAULT_WORKDIR_ROOT, teacher_key="")
  sweep = sweeps.sweep_config()
  sweep.name = "distillation"
  sweep.command = "train"
  sweep.base = f"{arg.base}:steps={arg.student_steps}"
  sweep.source = sweeps.model_size_source(arg)
  sweep.source_overrides = True
  sweep.source_key = arg.teacher_key
  sweep.axes = (("objective.name", tuple(arg.objectives)),)
  sweep.labels = (("objective.name", ""),)
  sweep.workdir_root = arg.root
  return sweep
