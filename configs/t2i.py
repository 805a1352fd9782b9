"""Text-to-image LDM at one of Mei et al.'s widths (Table 1), trained from scratch.

  ldm-scaling cost   --config configs/t2i.py:width=128
  ldm-scaling config --config configs/t2i.py:width=320,steps=1000 --config.train.lr=2e-4

Arguments (after the colon): width (64, 96, ..., 320, 512, 768 or any multiple of 32; the
attention-head layout follows the width, see ldm_scaling.models.unet.preset) and steps (training
iterations; the paper trains 500K at batch 2048).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import unet


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, width=320, steps=500_000)
  config = cfglib.base_config()
  config.model.update(unet.preset(arg.width, config.model.channel_mult))
  config.train.steps = arg.steps
  return config
