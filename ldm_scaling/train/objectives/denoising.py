"""Denoising training of the text-conditional UNet (the paper's pretraining objective).

Batches come from the data pipeline as ``images`` (pixels in [-1, 1]) or ``latents`` (already
scaled), plus ``tokens``; the frozen VAE encoder and text encoder run inside the jitted step
(``objective.inputs="pipeline"``). With ``objective.inputs="embeddings"`` batches carry
``latents`` and ``context`` (text embeddings) directly -- precomputed, or synthetic for tests and
benchmarks -- and nothing frozen is loaded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_scaling import data
from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import cost
from ldm_scaling.train import objectives

INPUTS = ("pipeline", "embeddings")


def latent_geometry(config) -> tuple[int, int]:
  """(latent side, latent channels) of the training data."""
  return data.latent_size(config), config.model.in_channels


@objectives.register("denoising")
class Denoising(objectives.Objective):
  """``loss = E_t w(t) || unet(x_t, t, text) - target ||^2`` (``ldm_scaling.diffusion.training``)."""

  @staticmethod
  def validate(config) -> None:
    """The UNet, the diffusion process, the data and the conditioning (text encoder, VAE)."""
    models.validate(config.model)
    diffusion.validate(config)
    data.validate(config)
    models.validate_conditioning(config)
    if config.objective.inputs not in INPUTS:
      raise ConfigError(f"objective.inputs must be one of {INPUTS}, got "
                        f"{config.objective.inputs!r}")

  def __init__(self, config):
    super().__init__(config)
    self.unet = models.build(config.model)
    self.loss_fn = diffusion.training.loss_from_config(config.diffusion)
    self.latent_size, self.channels = latent_geometry(config)
    self.text_len = config.text.max_length

  @property
  def from_pipeline(self) -> bool:
    return self.config.objective.inputs == "pipeline"

  @property
  def pixels(self) -> bool:
    return self.from_pipeline and not self.config.data.name.startswith("latents:")

  def batch_spec(self, batch_size):
    s, c = self.latent_size, self.channels
    spec = {}
    if self.pixels:
      r = self.config.data.resolution
      spec["images"] = jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.float32)
    else:
      spec["latents"] = jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32)
    if self.from_pipeline:
      spec["tokens"] = jax.ShapeDtypeStruct((batch_size, self.text_len), jnp.int32)
    else:
      spec["context"] = jax.ShapeDtypeStruct(
          (batch_size, self.text_len, self.config.model.cross_attn_dim), jnp.float32)
    return spec

  def init(self, rng, batch):
    x = jnp.zeros((1, self.latent_size, self.latent_size, self.channels), jnp.float32)
    ctx = jnp.zeros((1, self.text_len, self.config.model.cross_attn_dim), jnp.float32)
    return {"unet": self.unet.init(rng, x, jnp.zeros((1,)), ctx)["params"]}

  def frozen(self):
    if not self.from_pipeline:
      return {}
    from ldm_scaling.models import text  # pylint: disable=g-import-not-at-top
    self._text = text.load_text_encoder(self.config)
    frozen = {"text": self._text.params}
    if self.pixels:
      from ldm_scaling.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
      self._vae = vae_lib.load(self.config)
      frozen["vae"] = self._vae.params
    return frozen

  def inputs(self, frozen, batch, rng):
    """(latents, context) of a batch, encoding with the frozen networks where needed."""
    if "context" in batch:
      context = batch["context"]
    else:
      context = jax.lax.stop_gradient(self._text.apply(frozen["text"], batch["tokens"]))
    if "latents" in batch:
      latents = batch["latents"]
    else:
      latents = jax.lax.stop_gradient(self._vae.encode(frozen["vae"], batch["images"], rng))
    return latents, context

  def loss(self, params, frozen, ema, batch, rng):
    enc_rng, drop_rng, loss_rng = jax.random.split(rng, 3)
    latents, context = self.inputs(frozen, batch, enc_rng)

    def model_fn(x, t, c):
      return self.unet.apply({"params": params["unet"]}, x, t, c, train=True,
                             rngs={"dropout": drop_rng})
    return self.loss_fn(model_fn, latents, context, loss_rng)

  def preview(self, ema, step):
    """A grid of EMA samples for fixed prompts and seed (rows: prompts; one guidance scale)."""
    if not self.from_pipeline:
      return None  # no text encoder / VAE to condition and decode with
    from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
    t = self.config.train
    sampler, steps, cfg = self.preview_sampling()
    prompts = list(t.sample_prompts) or self._eval_captions(8)
    conditioning = generate.Conditioning(
        lambda ps: self._text.embed_text(list(ps)), f"text encoder {self._text.source}")
    if self.pixels:
      decoding = generate.Decoding(
          lambda z: generate.to_uint8(self._vae.decode_latents(z)), f"VAE {self._vae.source}")
    else:
      decoding = generate.latent_preview()
    result = generate.generate(
        self.config, prompts, apply_fn=generate.unet_apply(self.unet), params=ema["unet"],
        sampler=sampler, steps=steps, cfg_scales=[cfg], seed=0, batch_size=len(prompts),
        latent_size=self.latent_size, conditioning=conditioning, decoding=decoding,
        norm_cost=1.0, log=lambda _: None)
    return dict(images=result.images, prompts=prompts,
                label=f"step {step}: EMA, {sampler} {steps} steps, cfg {cfg:g}")

  def preview_sampling(self) -> tuple[str, int, float]:
    """(sampler, steps, cfg scale) of the preview grids."""
    t = self.config.train
    return self.config.eval.samplers[0], int(t.sample_steps), float(t.sample_cfg)

  def _eval_captions(self, n: int) -> list[str]:
    from ldm_scaling import data  # pylint: disable=g-import-not-at-top
    batch = next(data.make_pipeline(self.config, self.config.data.eval_split, batch_size=n,
                                    num_epochs=1, shuffle=False, tokenizer=None, process_index=0,
                                    process_count=1))
    return [str(c) for c in batch["captions"]]

  def train_flops_per_example(self):
    """3 x the UNet forward (forward + backward ~ 3 forwards) at the training latent size, from
    the cost model. Frozen encoders are not counted (MFU of the trained network)."""
    cost_cfg = self.config.cost.copy_and_resolve_references()
    cost_cfg.latent_size = self.latent_size
    cost_cfg.text_len = self.text_len
    _, gflops = cost.measure(self.config.model, cost_cfg)
    return 3.0 * gflops * 1e9
