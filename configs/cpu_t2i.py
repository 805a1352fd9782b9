"""Text-to-image from scratch on 2 CPU cores: the embedded 32 px dataset, the offline small CLIP
and small VAE (8x8x4 latents), a width-parameterised SD-2.x UNet. Trains to recognisable samples
in minutes (see docs/training.md for the measured run).

  ldm-scaling train-clip --config configs/cpu_t2i.py      # once, minutes (skipped if present)
  ldm-scaling train-vae  --config configs/cpu_t2i.py      # once, minutes (skipped if present)
  ldm-scaling train      --config configs/cpu_t2i.py:width=32 --workdir runs/cpu_w32
  ldm-scaling sample     --checkpoint runs/cpu_w32 --prompt "a red circle" --cfg-scale 1,3,6

The UNet is the SD-2.x block design scaled down for 8x8 latents: 3 levels (widths c, 2c, 2c),
one ResNet (+ transformer) per level and side, GroupNorm with 16 groups; width stays the scaling
axis. Arguments: width (a multiple of 16), steps, resolution (32; 64 gives 16x16x4 latents, with
its own offline CLIP and VAE trained at 64 px: the scale-wise distillation path, whose scales
need room), flow (false; true: rectified flow with the flow prediction, SD3's parametrisation,
sampled with euler).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import offline


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, width=32, steps=2000, resolution=32, flow=False)
  config = offline.apply(cfglib.base_config(), resolution=int(arg.resolution))
  offline.cpu_unet(config, arg.width)
  config.train.update(
      steps=arg.steps, batch_size=64, lr=1e-3, warmup_steps=100, schedule="cosine",
      end_lr_factor=0.1, ema_decay=0.995, log_every=100, checkpoint_every=500,
      sample_every=500, sample_steps=20, sample_cfg=3.0)
  config.eval.update(samplers=("ddim",), steps=(20,), cfg_scales=(3.0,))
  if arg.flow:
    config.diffusion.update(schedule="rectified_flow", prediction="flow")
    config.eval.samplers = ("euler",)
  return config
