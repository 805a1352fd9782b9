"""Datasets (tfds array_record builders) and the grain input pipeline.

``data.name`` selects the source: ``shapes`` (embedded, procedural; default), ``folder:<manifest>``
(users' images + captions), ``latents:<dir>`` (a VAE latent cache), or a tfds name such as
``coco_captions``. The entry points are :func:`make_pipeline` (a checkpointable iterator of
per-process batches), :func:`source` and :func:`prepare`; see ``pipeline.py`` and docs/data.md.

The pipeline's names are loaded on first use: validation imports this package, and the pipeline
imports grain and tensorflow_datasets (seconds), which only reading data needs.
"""

from __future__ import annotations

import ml_collections

from ldm_scaling.errors import ConfigError
from ldm_scaling.models import unet
from ldm_scaling.models import vae

CROPS = ("center", "random")
FLIPS = ("none", "random", "caption_aware")
BAD_EXAMPLES = ("error", "skip")

_LAZY = ("make_pipeline", "make_dataset", "source", "prepare", "DataError", "SOURCES",
         "ADAPTERS")


def __getattr__(name):
  if name in _LAZY:
    from ldm_scaling.data import pipeline  # pylint: disable=g-import-not-at-top  # see above
    return getattr(pipeline, name)
  raise AttributeError(f"module 'ldm_scaling.data' has no attribute {name!r}")


def latent_size(config: ml_collections.ConfigDict) -> int:
  """Side of the UNet's input: data.resolution / the VAE's down factor."""
  return config.data.resolution // vae.down_factor(config.vae)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the ``data`` section and that the latent size fits the UNet; errors say what to do."""
  d = config.data
  if not d.name:
    raise ConfigError("data.name is empty; use 'shapes', 'folder:<manifest>', 'latents:<dir>' or "
                      "a tfds name")
  prefix, _, arg = d.name.partition(":")
  if prefix in ("folder", "latents") and not arg:
    raise ConfigError(f"data.name={d.name!r} needs a path: {prefix}:<path>")
  if d.resolution < 8:
    raise ConfigError(f"data.resolution must be >= 8, got {d.resolution}")
  if prefix == "shapes" and d.resolution > 128:
    raise ConfigError(f"data.resolution={d.resolution}: the embedded shapes dataset renders at "
                      f"most 128 px; use <= 128 or another dataset")
  if len(d.shapes_sizes) != 2 or min(d.shapes_sizes) < 1:
    raise ConfigError(f"data.shapes_sizes must be (train, test) positive counts, got "
                      f"{tuple(d.shapes_sizes)}")
  if not 0.0 <= d.caption_dropout < 1.0:
    raise ConfigError(f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}")
  for key, allowed in (("crop", CROPS), ("flip", FLIPS), ("bad_examples", BAD_EXAMPLES)):
    if d[key] not in allowed:
      raise ConfigError(f"data.{key}={d[key]!r}; use one of {', '.join(allowed)}")
  for key in ("threads", "prefetch"):
    if d[key] < 1:
      raise ConfigError(f"data.{key} must be >= 1, got {d[key]}")
  for key in ("workers", "prepare_workers", "min_image_size"):
    if d[key] < 0:
      raise ConfigError(f"data.{key} must be >= 0, got {d[key]}")

  down = vae.down_factor(config.vae)
  if d.resolution % down:
    raise ConfigError(f"data.resolution={d.resolution} is not divisible by the VAE's down factor "
                      f"{down} (2**(len(vae.channel_mult)-1)); use a multiple of {down}")
  size = d.resolution // down
  unet_div = unet.down_factor(config.model)
  if size % unet_div:
    raise ConfigError(
        f"latent size {size} (data.resolution={d.resolution} / VAE down factor {down}) is not "
        f"divisible by 2**(levels-1)={unet_div} of the UNet (model.channel_mult has "
        f"{len(config.model.channel_mult)} levels); use data.resolution a multiple of "
        f"{down * unet_div} or fewer UNet levels")
