"""Text-to-image from scratch on 2 CPU cores: the embedded 32 px dataset, the offline small CLIP
and small VAE (8x8x4 latents), a width-parameterised SD-2.x UNet. Trains to recognisable samples
in minutes (see docs/training.md for the measured run).

  ldm-scaling train-clip --config configs/cpu_t2i.py      # once, minutes (skipped if present)
  ldm-scaling train-vae  --config configs/cpu_t2i.py      # once, minutes (skipped if present)
  ldm-scaling train      --config configs/cpu_t2i.py:width=64 --workdir runs/cpu_w64
  ldm-scaling sample     --checkpoint runs/cpu_w64 --prompt "a red circle" --cfg-scale 1,3,6

Arguments: width (any multiple of 32; the paper's widths are TPU-sized, configs/t2i.py), steps.
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import offline, unet


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, width=64, steps=3000)
  config = offline.apply(cfglib.base_config())
  config.model.update(unet.preset(arg.width, config.model.channel_mult))
  config.train.update(
      steps=arg.steps, batch_size=64, lr=1e-3, warmup_steps=200, schedule="cosine",
      end_lr_factor=0.1, ema_decay=0.999, log_every=100, checkpoint_every=500,
      sample_every=1000, sample_steps=20, sample_cfg=3.0)
  config.eval.update(samplers=("ddim",), steps=(20,), cfg_scales=(3.0,))
  return config
