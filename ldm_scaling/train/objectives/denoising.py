"""Denoising training of the text-conditional UNet (the paper's pretraining objective).

One network (``unet``, with an EMA), one phase. Batches, the frozen text encoder and VAE are
described in ``conditioning``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling.train.objectives import base
from ldm_scaling.train.objectives import conditioning


@base.register("denoising")
class Denoising(base.Objective):
  """``loss = E_t w(t) || unet(x_t, t, text) - target ||^2`` (``ldm_scaling.diffusion.training``)."""

  sample_network = "unet"

  @staticmethod
  def validate(config) -> None:
    conditioning.validate(config)

  def __init__(self, config):
    super().__init__(config)
    self.unet = models.build(config.model)
    self.loss_fn = diffusion.training.loss_from_config(config.diffusion)

  def networks(self):
    return {"unet": base.Network()}

  def init(self, rng):
    side, channels = conditioning.latent_geometry(self.config)
    x = jnp.zeros((1, side, side, channels), jnp.float32)
    ctx = jnp.zeros((1, self.config.text.max_length, self.config.model.cross_attn_dim),
                    jnp.float32)
    return {"unet": self.unet.init(rng, x, jnp.zeros((1,)), ctx)["params"]}

  def frozen(self):
    return conditioning.frozen(self.config)

  def phases(self):
    return (base.Phase("denoise", ("unet",), self.loss),)

  def batch_spec(self, batch_size):
    return conditioning.batch_spec(self.config, batch_size)

  def loss(self, params, frozen, ema, batch, rng):
    del ema
    enc_rng, drop_rng, loss_rng = jax.random.split(rng, 3)
    latents, context = conditioning.inputs(frozen, batch, enc_rng)

    def model_fn(x, t, c):
      return self.unet.apply({"params": params["unet"]}, x, t, c, train=True,
                             rngs={"dropout": drop_rng})
    return self.loss_fn(model_fn, latents, context, loss_rng)

  def preview(self, weights, frozen, step):
    t = self.config.train
    return conditioning.preview(self.config, self.unet, weights["unet"], frozen, step,
                                self.config.eval.samplers[0], int(t.sample_steps),
                                float(t.sample_cfg), "EMA")

  def train_flops_per_example(self, phase):
    """Forward + backward ~ 3 UNet forwards, at the training latent size."""
    del phase
    return 3.0 * conditioning.unet_flops(self.config)
