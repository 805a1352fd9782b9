"""Networks chosen by name from a config: the denoising UNet (and later VAE, text encoder)."""

from __future__ import annotations

import ml_collections

from ldm_scaling.errors import ConfigError
from ldm_scaling.models import clip, text, unet, vae

# name -> (build from a model section, validate a model section)
MODELS = {
    "unet": (unet.from_config, unet.validate),
}


def _entry(cfg: ml_collections.ConfigDict):
  try:
    return MODELS[cfg.name]
  except KeyError:
    raise ConfigError(f"unknown model.name {cfg.name!r}; available: {', '.join(MODELS)}") from None


def build(cfg: ml_collections.ConfigDict):
  """The flax module described by a config's ``model`` section."""
  return _entry(cfg)[0](cfg)


def validate(cfg: ml_collections.ConfigDict) -> None:
  _entry(cfg)[1](cfg)


def validate_conditioning(config: ml_collections.ConfigDict) -> None:
  """Checks the ``text``, ``clip`` and ``vae`` sections against each other and the UNet."""
  text.validate(config)
  clip.validate(config)
  vae.validate(config)
