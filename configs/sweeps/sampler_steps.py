"""The paper's sampler sweep: every model-size run sampled with DDIM, DDPM and DPM++ at 4 ... 50
steps (an eval sweep).

  ldm-scaling sweep --config configs/sweeps/sampler_steps.py --dry-run
  ldm-scaling sweep --config configs/sweeps/sampler_steps.py:widths=(64,),cfg=3.0

Evaluates the runs of ``configs/sweeps/model_size.py`` (same ``widths``/``steps``/``base``/``root``)
at one guidance scale (``cfg``, default 7.5, the paper's Table 1 setting). One eval job per
(width, sampler, steps), named ``w<width>-<sampler>-s<steps>``; rows go to ``<root>/sampler_steps/
results``.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.launch import sweeps
from ldm_scaling.models import cost

SAMPLERS = ("ddim", "ddpm", "dpm++")
STEPS = (4, 6, 8, 10, 20, 50)


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=tuple(sorted(cost.PAPER_TABLE1)), steps=500_000,
                         base="configs/t2i.py", root=sweeps.DEFAULT_WORKDIR_ROOT,
                         samplers=SAMPLERS, sampling_steps=STEPS, cfg=7.5)
  sweep = sweeps.sweep_config()
  sweep.name = "sampler_steps"
  sweep.command = "eval"
  sweep.base = arg.base
  sweep.source = sweeps.model_size_source(arg)
  sweep.axes = (("eval.samplers", tuple(arg.samplers)),
                ("eval.steps", tuple(int(s) for s in arg.sampling_steps)))
  sweep.overrides = (("eval.cfg_scales", (float(arg.cfg),)),)
  sweep.labels = (("eval.samplers", ""), ("eval.steps", "s"))
  sweep.workdir_root = arg.root
  return sweep
