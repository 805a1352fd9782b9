"""Reading a VAE latent cache (``data.name="latents:<dir>"``): posterior moments per image (and
of the mirrored image when ``data.flip`` is on) in ``<dir>/<split>.array_record``, sampled and
scaled when read. ``ldm_scaling.components.vae.cache_latents`` writes it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import grain
import numpy as np

from ldm_scaling.data import preprocess
from ldm_scaling.errors import DataError

LATENT_META = "latents.json"


class LatentRecords:
  """Random access over a cached split, decoding msgpack records and carrying the scaling factor."""

  def __init__(self, directory: str, split: str):
    meta_path = os.path.join(directory, LATENT_META)
    path = os.path.join(directory, f"{split}.array_record")
    if not (os.path.isfile(meta_path) and os.path.isfile(path)):
      raise DataError(f"no latent cache for split {split!r} in {directory!r}; write one with "
                      f"ldm_scaling.components.vae.cache_latents(config, vae, directory)")
    with open(meta_path, encoding="utf-8") as f:
      self.meta = json.load(f)
    self.scaling_factor = float(self.meta["scaling_factor"])
    self._source = grain.sources.ArrayRecordDataSource([path])

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    rec = flax.serialization.msgpack_restore(self._source[index])
    rec["scaling_factor"] = self.scaling_factor
    return rec


def latent_cache_source(directory: str, split: str) -> LatentRecords:
  return LatentRecords(os.path.expanduser(directory), split)


def latent_record(rec: dict, rng: np.random.Generator, opts) -> dict[str, Any]:
  """A cached record -> {"latents": scaled posterior sample (float32), "captions": str}, with the
  same flip (caption-aware) and caption-dropout rules as images."""
  caption = str(rec["caption"])
  mean, logvar = rec["mean"], rec["logvar"]
  if opts.flip != "none" and "flip_mean" in rec and rng.random() < 0.5:
    mean, logvar = rec["flip_mean"], rec["flip_logvar"]
    if opts.flip == "caption_aware":
      caption = preprocess.swap_left_right(caption)
  if opts.caption_dropout > 0 and rng.random() < opts.caption_dropout:
    caption = ""
  mean = np.asarray(mean, np.float32)
  std = np.exp(0.5 * np.asarray(logvar, np.float32))
  z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
  return {"latents": z * rec["scaling_factor"], "captions": caption}

