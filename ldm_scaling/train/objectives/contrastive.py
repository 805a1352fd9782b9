"""Training the small offline CLIP (``objective.name=clip``; ``ldm-scaling train-clip``).

Symmetric InfoNCE over a batch's (caption, image) pairs with CLIP's learned temperature, clamped at
log 100 after every update. :func:`training_config` turns an experiment's config into the CLIP
run's (captions at ``clip.train_length`` tokens, no caption dropout: an empty caption has no
partner; images at ``clip.image_size``); ``ldm_scaling.components.clip`` runs it with the trainer
and exports a transformers checkpoint. transformers is imported where it is used (see
``models/text.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_scaling import data
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import clip as clip_lib
from ldm_scaling.models import tokenizer
from ldm_scaling.train.objectives import base

if TYPE_CHECKING:  # transformers is imported where used (see the module docstring)
  from transformers import FlaxCLIPModel

NAME = "clip"
MAX_LOGIT_SCALE = float(np.log(100.0))


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CLIP run of ``config``: AdamW (b2 0.98, weight decay 0.05), global-norm clipping 1, cosine
  decay to 5 % after ``clip.warmup_steps`` (at most half the run)."""
  run = ml_collections.ConfigDict(config.to_dict())
  c = run.clip
  run.objective.name = NAME
  run.data.caption_dropout = 0.0
  run.text.max_length = c.train_length
  run.train.update(
      steps=c.steps, batch_size=c.batch_size, seed=c.seed, lr=c.lr, schedule="cosine",
      warmup_steps=min(c.warmup_steps, max(1, c.steps // 2)), end_lr_factor=0.05, b1=0.9,
      b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip=1.0, grad_accum_steps=1,
      log_every=max(1, c.steps // 10), checkpoint_every=max(1, c.steps // 5), keep_checkpoints=1,
      best_metric="", sample_every=0, profile_steps=0)
  return run


def model(cfg: ml_collections.ConfigDict) -> FlaxCLIPModel:
  """The transformers model of a ``clip`` section, without weights (``init_weights`` makes them)."""
  from transformers import FlaxCLIPModel  # deferred: see module docstring
  return FlaxCLIPModel(clip_lib.clip_config(cfg), input_shape=_shapes(cfg), seed=cfg.seed,
                       _do_init=False)


def _shapes(cfg) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
  return (1, cfg.train_length), (1, cfg.image_size, cfg.image_size, 3)


def _clamp_logit_scale(params):
  return dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE))


@base.register(NAME)
class Contrastive(base.Objective):
  """``loss = (CE(text -> image) + CE(image -> text)) / 2`` (one network, no EMA)."""

  structural = ("clip", "objective")
  how_not_what = {"clip": ("dir",)}

  @staticmethod
  def validate(config) -> None:
    data.validate(config)
    clip_lib.validate(config)
    if config.clip.batch_size < 2:
      raise ConfigError(f"clip.batch_size={config.clip.batch_size}: a contrastive loss "
                        f"needs at least 2 pairs per batch")

  def __init__(self, config):
    super().__init__(config)
    self.model = model(config.clip)

  def networks(self):
    return {"clip": base.Network(ema=False, post_update=_clamp_logit_scale)}

  def init(self, rng):
    return {"clip": self.model.init_weights(rng, _shapes(self.config.clip))}

  def phases(self):
    return (base.Phase("contrast", ("clip",), self.loss),)

  def batch_spec(self, batch_size):
    c = self.config.clip
    return {"tokens": jax.ShapeDtypeStruct((batch_size, c.train_length), jnp.int32),
            "images": jax.ShapeDtypeStruct((batch_size, c.image_size, c.image_size, 3),
                                           jnp.float32)}

  def make_data(self, config, split, *, batch_size, seed, process_index, process_count):
    c = config.clip
    return data.make_pipeline(config, split, batch_size=batch_size, seed=seed,
                              process_index=process_index, process_count=process_count,
                              tokenizer=tokenizer.bpe_tokenizer(c.max_length),
                              resolution=c.image_size)

  def loss(self, params, frozen, ema, batch, rng):
    del frozen, ema, rng
    out = self.model(input_ids=batch["tokens"], pixel_values=clip_lib.pixel_values(batch["images"]),
                     params=params["clip"], train=False)
    logits = out.logits_per_text
    labels = jnp.arange(logits.shape[0])
    lt = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    li = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    value = (lt + li) / 2
    return value, {"loss": value, "batch_top1": (jnp.argmax(logits, -1) == labels).mean()}
