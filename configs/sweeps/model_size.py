r"""The paper's model-size sweep: one training run per UNet width of Mei et al. Table 1.

  ldm-scaling sweep --config configs/sweeps/model_size.py --dry-run
  ldm-scaling sweep --config "configs/sweeps/model_size.py:widths=(64,128),steps=1000" \
      --parallel 2
  python launch/tpu_vm.py --config configs/sweeps/model_size.py --tpu-name ldm \
      --zone us-central2-b --accelerator-type v4-32 --bucket gs://BUCKET --dry-run

Arguments: widths (default: the 11 widths of Table 1, 64 ... 768), steps (training iterations,
500K in the paper), base (the experiment config of every run; configs/cpu_t2i.py gives the
CPU-scale study, whose widths are multiples of 16), root (the workdir root). Runs are named
``w<width>`` under ``<root>/model_size/``. Widths whose levels are not all multiples of 64 (96,
160, 224, 288) train with 8 fixed heads, as ``configs/t2i.py:width=...`` would: the
``unet_heads`` rule adds ``model.num_heads=8`` to those runs.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.launch import sweeps
from ldm_scaling.models import cost


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, widths=tuple(sorted(cost.PAPER_TABLE1)), steps=500_000,
                         base="configs/t2i.py", root=sweeps.DEFAULT_WORKDIR_ROOT)
  sweep = sweeps.sweep_config()
  sweep.name = "model_size"
  sweep.command = "train"
  sweep.base = f"{arg.base}:steps={arg.steps}"
  sweep.axes = (("model.width", tuple(int(w) for w in arg.widths)),)
  sweep.derive = ("unet_heads",)
  sweep.labels = (("model.width", "w"),)
  sweep.workdir_root = arg.root
  return sweep
