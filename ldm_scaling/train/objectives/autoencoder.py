"""Training the project's KL-VAE (``objective.name=vae``; ``ldm-scaling train-vae``).

Reconstruction (L1 or L2) + KL with SD's weighting: ``vae.kl_weight`` times the KL summed over
latent elements, against the reconstruction summed over pixels, both divided by the number of pixel
values. No adversarial or perceptual term. :func:`training_config` turns an experiment's config
into the VAE run's (its ``train`` section from ``vae.*``); ``ldm_scaling.components.vae`` runs it
with the trainer and exports the weights with their scaling factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_scaling import data
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.train.objectives import base

NAME = "vae"


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The VAE run of ``config``: its data and ``vae`` section, trained as ``vae.*`` says (AdamW
  without weight decay, global-norm clipping 1, cosine decay to 5 % after a warmup of a tenth of
  the steps, at most 100)."""
  run = ml_collections.ConfigDict(config.to_dict())
  v = run.vae
  run.objective.name = NAME
  run.train.update(
      steps=v.steps, batch_size=v.batch_size, seed=v.seed, lr=v.lr, schedule="cosine",
      warmup_steps=max(1, min(100, v.steps // 10)), end_lr_factor=0.05, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, grad_clip=1.0, grad_accum_steps=1,
      log_every=max(1, v.steps // 10), checkpoint_every=max(1, v.steps // 5), keep_checkpoints=1,
      best_metric="", sample_every=0, profile_steps=0)
  return run


def loss_terms(module, params, images, rng, rec_loss: str):
  """(reconstruction per pixel value, KL per pixel value) of one batch."""
  recon, mean, logvar = module.apply({"params": params}, images, rng)
  diff = recon - images
  rec = jnp.abs(diff).mean() if rec_loss == "l1" else jnp.square(diff).mean()
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  return rec, kl.mean() / np.prod(images.shape[1:])


@base.register(NAME)
class Autoencoder(base.Objective):
  """``loss = rec + vae.kl_weight * kl`` of ``vae(images)`` (one network, no EMA)."""

  structural = ("vae", "objective")
  how_not_what = {"vae": ("dir", "weights", "subfolder", "scaling_factor")}

  @staticmethod
  def validate(config) -> None:
    data.validate(config)
    vae_lib.validate(config)

  def __init__(self, config):
    super().__init__(config)
    self.module = vae_lib.from_config(config.vae)

  def networks(self):
    return {"vae": base.Network(ema=False)}

  def init(self, rng):
    r = self.config.data.resolution
    return {"vae": self.module.init(rng, jnp.zeros((1, r, r, 3), jnp.float32))["params"]}

  def phases(self):
    return (base.Phase("reconstruct", ("vae",), self.loss),)

  def batch_spec(self, batch_size):
    r = self.config.data.resolution
    return {"images": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.float32)}

  def make_data(self, config, split, *, batch_size, seed, process_index, process_count):
    return data.make_pipeline(config, split, batch_size=batch_size, seed=seed,
                              process_index=process_index, process_count=process_count,
                              tokenizer=None)

  def loss(self, params, frozen, ema, batch, rng):
    del frozen, ema
    v = self.config.vae
    rec, kl = loss_terms(self.module, params["vae"], batch["images"], rng, v.rec_loss)
    value = rec + v.kl_weight * kl
    return value, {"loss": value, v.rec_loss: rec, "kl": kl}
