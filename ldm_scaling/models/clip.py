"""The small CLIP this project trains offline: its architecture and where it is stored.

A transformers ``FlaxCLIPModel`` with a small config (``config.clip``), trained contrastively on the
embedded captioned dataset in minutes on CPU (``ldm-scaling train-clip``: the ``clip`` objective in
``ldm_scaling.train.objectives.contrastive``, exported by ``ldm_scaling.components.clip``). Its text
tower conditions the UNet when ``text.encoder="clip-small"``; both towers serve the CLIP-score
*stand-in* in eval (a real CLIP score uses e.g. ViT-L/14 by hub id; this one is labelled as a
stand-in wherever it is reported).

The trained model is a plain transformers checkpoint directory (``save_pretrained``: config.json,
flax_model.msgpack, the tokenizer built from the shipped BPE vocabulary, and a
``preprocessor_config.json`` mapping uint8 pixels to [-1, 1]), so
``FlaxCLIPModel.from_pretrained(dir)`` / ``CLIPProcessor.from_pretrained(dir)`` load it, plus
``ldm_scaling.json`` (the config it was trained from and its retrieval metrics). transformers is
imported where it is used (see ``models/text.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from ldm_scaling import files
from ldm_scaling.errors import ConfigError, WeightsError
from ldm_scaling.models import tokenizer

META = "ldm_scaling.json"
ARCH_KEYS = ("width", "layers", "heads", "vision_width", "vision_layers", "vision_heads",
             "image_size", "patch_size", "embed_dim", "max_length")


def default_dir(config: ml_collections.ConfigDict) -> str:
  """``clip.dir``, or a cache directory keyed by everything that determines the trained model."""
  if config.clip.dir:
    return os.path.expanduser(config.clip.dir)
  return os.path.join(files.cache_root(), "clip", _key(config))


def _key(config: ml_collections.ConfigDict) -> str:
  clip = {k: v for k, v in config.clip.to_dict().items() if k != "dir"}
  data = {k: config.data[k] for k in ("name", "shapes_sizes", "flip")}
  text = json.dumps(dict(clip=clip, data=data), sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def clip_config(cfg: ml_collections.ConfigDict):
  """The transformers ``CLIPConfig`` of a ``clip`` config section."""
  from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig  # deferred: see module docstring
  tc = CLIPTextConfig(
      vocab_size=tokenizer.VOCAB_SIZE, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
      max_position_embeddings=cfg.max_length, projection_dim=cfg.embed_dim,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  vc = CLIPVisionConfig(
      hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
      num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.embed_dim)
  return CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                    projection_dim=cfg.embed_dim)


def pixel_values(images) -> Any:
  """Images NHWC in [-1, 1] (this project's convention) -> the model's NCHW ``pixel_values``.
  (The saved ``preprocessor_config.json`` does the same from uint8: rescale 1/255, mean=std=0.5.)"""
  return jnp.transpose(jnp.asarray(images, jnp.float32), (0, 3, 1, 2))


def check_trained(config: ml_collections.ConfigDict, directory: str) -> None:
  """Raises :class:`WeightsError` if ``directory`` holds no trained offline CLIP, and
  :class:`ConfigError` if it was trained with another architecture."""
  needed = ("config.json", "flax_model.msgpack", META)
  if not os.path.isdir(directory) or any(
      not os.path.isfile(os.path.join(directory, f)) for f in needed):
    raise WeightsError(
        f"the offline CLIP (text.encoder={tokenizer.OFFLINE!r}) is not in {directory!r}; train it "
        f"with `ldm-scaling train-clip --config <your config>` (minutes on CPU) or call "
        f"ldm_scaling.components.clip.ensure(config)")
  with open(os.path.join(directory, META), encoding="utf-8") as f:
    meta = json.load(f)
  trained = {k: v for k, v in meta["clip"].items() if k != "dir"}
  want = {k: v for k, v in config.clip.to_dict().items() if k != "dir"}
  diff = [f"{k}: {trained.get(k)} vs {want[k]}" for k in ARCH_KEYS
          if _norm(trained.get(k)) != _norm(want[k])]
  if diff:
    raise ConfigError(f"the CLIP in {directory!r} was trained with another clip config "
                      f"({'; '.join(diff)}); use another clip.dir or delete it to retrain")


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def validate(config: ml_collections.ConfigDict) -> None:
  c = config.clip
  for key in ("width", "layers", "heads", "vision_width", "vision_layers", "vision_heads",
              "image_size", "patch_size", "embed_dim", "max_length", "train_length", "steps",
              "batch_size"):
    if c[key] < 1:
      raise ConfigError(f"clip.{key} must be >= 1, got {c[key]}")
  if c.width % c.heads or c.vision_width % c.vision_heads:
    raise ConfigError(f"clip.width ({c.width}) / vision_width ({c.vision_width}) must be "
                      f"divisible by clip.heads ({c.heads}) / vision_heads ({c.vision_heads})")
  if c.image_size % c.patch_size:
    raise ConfigError(f"clip.image_size={c.image_size} is not divisible by clip.patch_size="
                      f"{c.patch_size}")
  if c.train_length > c.max_length:
    raise ConfigError(f"clip.train_length={c.train_length} exceeds clip.max_length={c.max_length}")
  if c.lr <= 0:
    raise ConfigError(f"clip.lr must be > 0, got {c.lr}")
