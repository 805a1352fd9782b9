"""What the UNet objectives (denoising, consistency) share: their batches, the frozen text encoder
and VAE, a batch's (latents, context), the preview grid and the UNet's FLOPs.

Batches come from the data pipeline as ``images`` (pixels in [-1, 1]) or ``latents`` (already
scaled, ``data.name=latents:<dir>``), plus ``tokens``; the frozen VAE encoder and text encoder run
inside the jitted step (``objective.inputs="pipeline"``). With ``objective.inputs="embeddings"``
batches carry ``latents`` and ``context`` (text embeddings) directly -- precomputed, or synthetic
for tests and benchmarks -- and nothing frozen is loaded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_scaling import data
from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling import sharding as sh
from ldm_scaling.diffusion import generate
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import cost
from ldm_scaling.models import text
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.train.objectives.base import Frozen

INPUTS = ("pipeline", "embeddings")


def validate(config) -> None:
  """The UNet, the diffusion process, the data, the conditioning and ``objective.inputs``."""
  models.validate(config.model)
  diffusion.validate(config)  # also checks the eval section's samplers against the schedule
  data.validate(config)
  models.validate_conditioning(config)
  if config.objective.inputs not in INPUTS:
    raise ConfigError(f"objective.inputs must be one of {INPUTS}, got {config.objective.inputs!r}")


def latent_geometry(config) -> tuple[int, int]:
  """(latent side, latent channels) of the training data."""
  return data.latent_size(config), config.model.in_channels


def from_pipeline(config) -> bool:
  return config.objective.inputs == "pipeline"


def pixels(config) -> bool:
  """Whether batches hold images (encoded by the frozen VAE in the step) rather than latents."""
  return from_pipeline(config) and not config.data.name.startswith("latents:")


def batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  s, c = latent_geometry(config)
  spec = {}
  if pixels(config):
    r = config.data.resolution
    spec["images"] = jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.float32)
  else:
    spec["latents"] = jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32)
  if from_pipeline(config):
    spec["tokens"] = jax.ShapeDtypeStruct((batch_size, config.text.max_length), jnp.int32)
  else:
    spec["context"] = jax.ShapeDtypeStruct(
        (batch_size, config.text.max_length, config.model.cross_attn_dim), jnp.float32)
  return spec


def frozen(config) -> dict[str, Frozen]:
  """The frozen text encoder (``text``) and VAE (``vae``) the batches need; the VAE's parameters
  carry their logical axis names, so the trainer shards them like trainable ones."""
  if not from_pipeline(config):
    return {}
  encoder = text.load_text_encoder(config)
  out = {"text": Frozen(encoder, encoder.params)}
  if pixels(config):
    vae = vae_lib.load(config)
    out["vae"] = Frozen(vae, sh.replace_values(vae_lib.abstract_params(vae.module), vae.params))
  return out


def inputs(frozen: dict[str, Frozen], batch, rng):
  """(latents, context) of a batch, encoding with the frozen networks where needed."""
  if "context" in batch:
    context = batch["context"]
  else:
    t = frozen["text"]
    context = jax.lax.stop_gradient(t.module.apply(t.params, batch["tokens"]))
  if "latents" in batch:
    latents = batch["latents"]
  else:
    v = frozen["vae"]
    latents = jax.lax.stop_gradient(v.module.encode(v.params, batch["images"], rng))
  return latents, context


def preview(config, unet, params, frozen: dict[str, Frozen], step: int, sampler: str,
            steps: int, cfg: float, label: str):
  """A grid of samples for fixed prompts and seed (rows: prompts; one guidance scale); None
  without a text encoder and VAE to condition and decode with."""
  if not from_pipeline(config):
    return None
  encoder = frozen["text"].module
  prompts = list(config.train.sample_prompts) or eval_captions(config, 8)
  conditioning = generate.Conditioning(lambda ps: encoder.embed_text(list(ps)),
                                       f"text encoder {encoder.source}")
  if "vae" in frozen:
    vae = frozen["vae"].module
    decoding = generate.Decoding(lambda z: generate.to_uint8(vae.decode_latents(z)),
                                 f"VAE {vae.source}")
  else:
    decoding = generate.latent_preview()
  result = generate.generate(
      config, prompts, apply_fn=generate.unet_apply(unet), params=params, sampler=sampler,
      steps=steps, cfg_scales=[cfg], seed=0, batch_size=len(prompts),
      latent_size=latent_geometry(config)[0], conditioning=conditioning, decoding=decoding,
      norm_cost=1.0, log=lambda _: None)
  return dict(images=result.images, prompts=prompts,
              label=f"step {step}: {label}, {sampler} {steps} steps, cfg {cfg:g}")


def eval_captions(config, n: int) -> list[str]:
  batch = next(data.make_pipeline(config, config.data.eval_split, batch_size=n, num_epochs=1,
                                  shuffle=False, tokenizer=None, process_index=0,
                                  process_count=1))
  return [str(c) for c in batch["captions"]]


def unet_flops(config) -> float:
  """FLOPs of one UNet forward pass at the training latent size (the cost model). Frozen encoders
  are not counted (MFU of the networks that run at UNet cost)."""
  cost_cfg = config.cost.copy_and_resolve_references()
  cost_cfg.latent_size = latent_geometry(config)[0]
  cost_cfg.text_len = config.text.max_length
  _, gflops = cost.measure(config.model, cost_cfg)
  return gflops * 1e9
