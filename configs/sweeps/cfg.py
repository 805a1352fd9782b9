"""The paper's guidance sweep: every model-size run evaluated at each CFG scale (an eval sweep).

  ldm-scaling sweep --config configs/sweeps/cfg.py --dry-run
  ldm-scaling sweep --config configs/sweeps/cfg.py:widths=(64,128),per_scale=false --parallel 1

Evaluates the runs of ``configs/sweeps/model_size.py`` (same ``widths``/``steps``/``base`` and the
same workdir root, so ``<root>/model_size/w<width>`` must hold trained checkpoints) with 50-step
DDIM, as the paper's CFG study, at scales 1.5 ... 8. One eval job per (width, scale), named
``w<width>-cfg<scale>``; ``per_scale=false`` makes one job per width with all scales in its grid
(each job loads the checkpoint once). Every job adds its rows to one results table,
``<root>/cfg/results`` (one file per cell: concurrent jobs never write the same file).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.launch import sweeps
from ldm_scaling.models import cost

SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=tuple(sorted(cost.PAPER_TABLE1)), steps=500_000,
                         base="configs/t2i.py", root=sweeps.DEFAULT_WORKDIR_ROOT,
                         scales=SCALES, sampler="ddim", sampling_steps=50, per_scale=True)
  sweep = sweeps.sweep_config()
  sweep.name = "cfg"
  sweep.command = "eval"
  sweep.base = arg.base
  sweep.source = sweeps.model_size_source(arg)
  scales = tuple(float(s) for s in arg.scales)
  fixed = [("eval.samplers", (arg.sampler,)), ("eval.steps", (arg.sampling_steps,))]
  if arg.per_scale:
    sweep.axes = (("eval.cfg_scales", scales),)
    sweep.labels = (("eval.cfg_scales", "cfg"),)
  else:
    fixed.append(("eval.cfg_scales", scales))
  sweep.overrides = tuple(fixed)
  sweep.workdir_root = arg.root
  return sweep
