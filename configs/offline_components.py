"""The offline conditioning components: embedded 32 px data, the small CLIP, the small-f4 VAE.

  ldm-scaling prepare-data --config configs/offline_components.py
  ldm-scaling train-clip   --config configs/offline_components.py
  ldm-scaling train-vae    --config configs/offline_components.py
  ldm-scaling train-clip   --config configs/offline_components.py:runlocal   # a 1-minute smoke run

Arguments: resolution (32 or 64; the VAE's f=4 gives resolution/4 latents), runlocal (tiny
dataset and few steps). A study config gets the same components with
``ldm_scaling.models.offline.apply(config)``; both train-* commands skip work already done.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import offline


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, resolution=32, runlocal=False)
  config = offline.apply(cfglib.base_config(), resolution=arg.resolution)
  if arg.runlocal:
    config.data.shapes_sizes = (2000, 500)
    config.clip.steps = 60
    config.vae.steps = 60
  return config
