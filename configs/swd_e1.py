"""Issue 17's E1: a scale-wise (SwD) student vs its full-scale counterpart, a consistency student
and the teacher, on FID vs sampling cost, at 64 px (16x16x4 latents) on 2 CPU cores.

  bash docs/swd/e1.sh runs/e1              # every run and eval cell (docs/swd/e1.md)
  QUICK=1 bash docs/swd/e1.sh runs/e1q     # CI-sized (tests/test_swd_e1.py)

One config, one ``run`` per training run; each carries its own eval grid, and ``e1.sh`` evaluates
it at three seeds (``--config.eval.seed``):

* ``teacher``: the CPU-scale SD-2.x UNet (configs/cpu_t2i.py) at width 16 and 64 px, 1,000 steps
  (1.5 s a step here: the 2-core budget), **VP / eps** (SD-2.x's scaled-linear schedule). VP, not
  rectified flow: one teacher has to serve both students, and the consistency objective follows
  LCM's discrete-time recipe (it refuses a flow schedule); the swd sampler takes VP levels as t/T
  fractions (SwD's SD-XL students: 1000 x (1, .8, .6, .4)). Evaluated with DPM-Solver++ at 2, 4
  and 20 steps over CFG 3 / 4.5 / 6.
* ``swd``: SwD at scales (8, 12, 16) and levels t/T (1, .8, .6): SwD's first three SD-XL levels,
  each step to the next side 1.5x / 1.33x (SwD's SD3.5 steps are 1.25-1.33x; E0 measured that a
  2x step at 0.6 costs quality here). Sampling cost ~(1/4 + 9/16 + 1) = 1.81 full steps.
* ``full``: the same objective with scales (16, 16, 16): 3 full steps, SwD's ablation baseline.
* ``noise_then_upscale`` / ``mmd_only`` / ``no_gan``: SwD's ablations (Table 1, loss terms);
  ``mmd_only_full``: MMD only at scales (16, 16, 16), the MMD-only student's full-scale
  counterpart.
* ``lcm``: consistency distillation (LCM's recipe, guidance 4.5 distilled in), lcm at 2 and 4 steps.

Students: the teacher's DMD / consistency guidance ``cfg`` (4.5), no caption dropout, and the same
number of student updates: an SwD student updates every ``fake_updates + 1`` = 6 steps, so it
trains 6x the steps of the consistency student (which updates every step); MMD only has no fake
network, so it updates every step.

Arguments: run, width (16), steps (0: the run's default), quick (CI-sized components, runs and a
one-level UNet).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import offline

# quick: one level, attention in the mid block only (SwD's MMD / GAN features come from it): the
# same pipeline, with programs that compile ~3x faster (CI time is compile time).
QUICK_UNET = dict(channel_mult=(1,), attn_levels=(False,), layers_per_block=1, norm_groups=8)
SWD_RUNS = ("swd", "full", "noise_then_upscale", "mmd_only", "no_gan", "mmd_only_full")
RUNS = ("teacher", *SWD_RUNS, "lcm")
SCALES = (8, 12, 16)
SIGMAS = (1.0, 0.8, 0.6)
CFG = 4.5
TEACHER_STEPS = 1000
STUDENT_UPDATES = 80   # the consistency student's steps; an SwD student's student updates


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, run="teacher", width=16, steps=0, quick=False)
  if arg.run not in RUNS:
    raise cfglib.ConfigError(f"configs/swd_e1.py: run must be one of {', '.join(RUNS)}, "
                             f"got {arg.run!r}")
  config = offline.apply(cfglib.base_config(), resolution=64)
  offline.cpu_unet(config, arg.width, QUICK_UNET if arg.quick else None)  # 16x16 latents
  config.clip.steps = 300           # 64 px components on a 0.19 TFLOP/s host: 669 s
  config.vae.steps = 600            # 577 s
  config.train.update(
      steps=TEACHER_STEPS, batch_size=64, lr=1e-3, warmup_steps=100, schedule="cosine",
      end_lr_factor=0.1, ema_decay=0.995, log_every=50, checkpoint_every=250, sample_every=0,
      keep_checkpoints=2, best_metric="")
  # n = 256 per cell and seed; FID against 2,000 held-out images (biased upward at n << 2048:
  # comparable between cells of this experiment only).
  config.eval.update(samplers=("dpm++",), steps=(2, 4, 20), cfg_scales=(3.0, 4.5, 6.0),
                     num_samples=256, fid_reference_n=2000, batch_size=64, grid_images=16)
  updates = STUDENT_UPDATES
  if arg.quick:
    config.data.shapes_sizes = (2000, 256)
    config.clip.update(steps=20, batch_size=64, layers=1, vision_layers=1, warmup_steps=4)
    config.vae.update(steps=8, batch_size=8)
    config.train.update(steps=4, warmup_steps=1, log_every=2)
    config.eval.update(steps=(2,), cfg_scales=(4.5,), num_samples=8, fid_reference_n=32,
                       batch_size=8, grid_images=4)
    updates = 1
  if arg.run != "teacher":
    config.data.caption_dropout = 0.0  # on empty captions CFG does nothing
    config.train.update(lr=1e-4, warmup_steps=0, schedule="constant")
    config.objective.cfg_scale = CFG
  if arg.run in SWD_RUNS:
    swd = config.objective.swd
    config.objective.update(name="scale_wise", scales=SCALES, sigmas=SIGMAS)
    mmd_only = arg.run.startswith("mmd_only")
    cycle = 1 if mmd_only else swd.fake_updates + 1  # MMD only: no fake phase
    config.train.update(steps=updates * cycle, weight_decay=1e-2)
    if arg.run.endswith("full"):
      config.objective.scales = (SCALES[-1],) * len(SCALES)
    if mmd_only:
      swd.update(dmd_weight=0.0, gan_weight=0.0)
    if arg.run == "noise_then_upscale":
      swd.input_order = "noise_then_upscale"
    if arg.run == "no_gan":
      swd.update(gan_weight=0.0, fake_gan_weight=0.0)
    config.eval.update(samplers=("swd",), steps=(len(SCALES),), cfg_scales=(1.0,))
  elif arg.run == "lcm":
    config.objective.name = "consistency"
    config.train.update(steps=updates, ema_decay=0.95, weight_decay=0.0)
    config.eval.update(samplers=("lcm",), steps=(2, 4), cfg_scales=(1.0,))
  if arg.quick and arg.run != "teacher":
    config.eval.steps = config.eval.steps[:1]
  if arg.steps:
    config.train.steps = arg.steps
  if arg.quick or arg.run != "teacher":  # minutes-long runs: one checkpoint, at the end
    config.train.checkpoint_every = config.train.steps
  return config
