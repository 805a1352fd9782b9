"""Diffusion core: schedules, parametrisations, training targets, samplers and guidance.

* ``schedules``: the forward process (SD's scaled-linear, linear, cosine; rectified flow with
  SD3's shift; zero-terminal-SNR rescale) and diffusers-exact inference grids;
* ``parametrisation``: eps / v / x0 / flow predictions and exact conversions;
* ``training``: denoising loss, targets, uniform and min-SNR-gamma weightings;
* ``samplers``: the sampler registry (``ddim``, ``ddpm``, ``dpm++``, ``euler``, ``lcm``, ``swd``);
* ``consistency``: consistency distillation (boundary scalings, teacher step, loss);
* ``scalewise``: scale-wise distillation (SwD): torch-exact resizes, scales and noise levels,
  training inputs, DMD / MMD / GAN losses;
* ``guidance``: per-sample classifier-free guidance in one batched call;
* ``sampling``: ``run`` / ``sample``: the whole trajectory as one compiled program, with cost.

See docs/diffusion.md.
"""

from __future__ import annotations

import ml_collections

from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion import (consistency, parametrisation, samplers, scalewise, schedules,
                                   training)
from ldm_scaling.diffusion.samplers import SAMPLERS, Options, options_from_config
from ldm_scaling.diffusion.sampling import Samples, run, sample
from ldm_scaling.diffusion.schedules import Schedule, schedule_from_config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the ``diffusion`` section and the sampler settings of ``eval``; errors say what to
  change. Called by ``ldm_scaling.config.validate``."""
  d = config.diffusion
  schedule = schedule_from_config(d)  # checks schedule, timesteps, spacing, betas, shift
  parametrisation.check(d.prediction)
  if d.prediction == "flow" and not schedule.is_flow:
    raise ConfigError("diffusion.prediction='flow' is the rectified-flow velocity eps - x0 and "
                      "needs diffusion.schedule='rectified_flow'; for a discrete schedule use "
                      "'eps', 'v' or 'x0'")
  if d.prediction == "eps" and d.zero_terminal_snr:
    raise ConfigError("diffusion.zero_terminal_snr=True with prediction='eps' cannot work: at the "
                      "terminal step alpha = 0 and the noise is the input itself, so x0 = "
                      "(x - sigma * eps) / alpha is undefined; use prediction='v' (Lin et al. "
                      "2023) or zero_terminal_snr=False")
  if d.loss_weighting not in training.WEIGHTINGS:
    raise ConfigError(f"unknown diffusion.loss_weighting {d.loss_weighting!r}; available: "
                      f"{', '.join(training.WEIGHTINGS)}")
  if d.min_snr_gamma <= 0:
    raise ConfigError(f"diffusion.min_snr_gamma must be > 0, got {d.min_snr_gamma}")
  options = options_from_config(config)
  if options.swd_scales or options.swd_sigmas:
    from ldm_scaling import data  # pylint: disable=g-import-not-at-top  # (import cycle)
    from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
    scalewise.check(options.swd_scales, options.swd_sigmas, latent_size=data.latent_size(config),
                    down_factor=unet.down_factor(config.model))
  for steps in config.eval.steps:
    schedules.check_steps(int(steps), schedule)
  for name in config.eval.samplers:
    samplers.check(name, schedule, d.prediction, options)
    for steps in config.eval.steps:  # host-side grids (milliseconds): catches what cannot work
      samplers.build_grid(name, schedule, int(steps), d.prediction, options)


__all__ = ["SAMPLERS", "Options", "Samples", "Schedule", "consistency", "options_from_config",
           "parametrisation", "run", "sample", "samplers", "scalewise", "schedule_from_config",
           "schedules", "training", "validate"]
