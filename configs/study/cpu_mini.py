"""The CPU scaling study (the README's main job): a model-size sweep on 2 CPU cores.

  ldm-scaling study --config configs/study/cpu_mini.py --workdir runs/study          # see below
  ldm-scaling study --config configs/study/cpu_mini.py:quick --workdir runs/quick    # <= 5 min

Time (docs/study/README.md): 134 min measured on a 2-core host with a 0.115 TFLOP/s f32 matmul
peak (components 16.5, training 72, evaluation 45 min); estimated 40-50 min on a 0.48 TFLOP/s one.

Embedded 32 px captioned-shapes data, the offline small CLIP and small-f4 VAE (8x8x4 latents;
trained first if absent), and three widths (16, 32, 64: 0.4-5.9M parameters) of the CPU-scale
SD-2.x UNet (3 levels c, 2c, 2c; see configs/cpu_t2i.py) each trained for the same
``train.steps`` (``study.schedule=equal_steps``, the paper's protocol;
``--config.study.schedule=equal_compute`` gives narrower models proportionally more steps instead,
for equal training FLOPs). The eval grid is 2 samplers x 4 step counts x 3 CFG scales per model
at 64 samples per cell, FID against the held-out split; a model whose optimal CFG is at an end of
the grid gets up to two more scales past it (``study.extend_cfg``; never below CFG 1). Each
model's best cell is then evaluated again with 512 fresh samples (``study.confirm_n``), which the
size-effect check reads: at n=64 a cell's FID interval is about +-8, at n=512 about a third of that.

Arguments: quick (CI-sized: tiny components, few steps, small grid), steps (every run's).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import offline, unet


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, quick=False, steps=0)
  config = offline.apply(cfglib.base_config())
  offline.cpu_unet(config, 32)
  config.clip.steps = 400           # 2 min (0.48 TFLOP/s host) - 7 min (0.13); the conditioning
  config.vae.steps = 800            # 3 - 8 min
  config.train.update(
      steps=1200, batch_size=64, lr=1e-3, warmup_steps=50, schedule="cosine",
      end_lr_factor=0.1, ema_decay=0.99, log_every=100, keep_checkpoints=4, best_metric="",
      sample_every=0)
  # Widths 4x apart at the ends: the 3x size-effect criterion needs a gap well above the noise.
  config.study.update(widths=(16, 32, 64), fid_curve_cell=("ddim", 16, 4.0), extend_cfg=2,
                      confirm_n=512)
  # 2 samplers x 4 step counts x 3 CFG scales per model. 64 samples per cell is what 2 cores
  # afford (InceptionV3 runs at ~11 images/s here): FIDs are biased upward at n << 2048 and
  # comparable between cells, not with papers.
  config.eval.update(
      samplers=("ddim", "dpm++"), steps=(4, 8, 16, 32), cfg_scales=(2.0, 4.0, 6.0),
      num_samples=64, fid_reference_n=512, batch_size=64, grid_images=16)
  if arg.quick:
    # CI-sized (<= 5 min from cold components on 2 cores): compiles dominate, so fewer and
    # smaller programs -- a one-level UNet at two widths, small components, one sampler, no CFG
    # extension (equal_steps: both widths train 8 steps).
    config.data.shapes_sizes = (2000, 256)
    config.clip.update(steps=20, batch_size=64, layers=1, vision_layers=1, warmup_steps=4)
    config.vae.update(steps=16, batch_size=16)
    config.model.update(channel_mult=(1,), attn_levels=(True,))
    config.model.update(unet.preset(16, (1,)))
    config.train.update(steps=8, warmup_steps=2, log_every=4)
    # No training-curve cells (the resume test in tests/test_study.py evaluates one) and 8
    # samples per cell: the cold run measured 318 s with them (the limit is 300).
    config.study.update(widths=(16, 32), fid_curve_cell=(), checkpoints=2, extend_cfg=0,
                        confirm_n=0)
    config.eval.update(samplers=("ddim",), steps=(2, 4), cfg_scales=(1.0, 4.0), num_samples=8,
                       fid_reference_n=32, batch_size=8, grid_images=4)
  if arg.steps:
    config.train.steps = arg.steps
  return config
