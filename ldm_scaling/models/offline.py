"""The offline defaults in one place: the embedded data, the small CLIP and the small VAE.

``offline.apply(config)`` switches a config from the real assets (SD-2.x text tower and VAE by hub
id) to what this project trains itself on 2 CPU cores: 32 px images of the embedded dataset, the
small CLIP's text tower (``text.encoder="clip-small"``, hidden size ``clip.width``) and the
``small-f4`` VAE (8x8x4 latents). Study and test configs call it; the UNet part is theirs, or
``offline.cpu_unet(config, width)``: the CPU-scale UNet those configs share.
"""

from __future__ import annotations

import ml_collections

from ldm_scaling.models import text, unet, vae

# The CPU-scale SD-2.x UNet (configs/cpu_t2i.py, configs/study/cpu_mini.py, configs/swd_e1.py):
# three levels, attention at the first two, one block per level.
CPU_UNET = dict(channel_mult=(1, 2, 2), attn_levels=(True, True, False), layers_per_block=1,
                norm_groups=16)


def apply(config: ml_collections.ConfigDict, resolution: int = 32,
          max_length: int = 32) -> ml_collections.ConfigDict:
  """Edits ``config`` in place (and returns it)."""
  config.data.update(name="shapes", resolution=resolution, flip="caption_aware")
  config.text.update(encoder=text.OFFLINE, subfolder="", tokenizer="", max_length=max_length)
  config.vae.update(weights=vae.TRAINED, subfolder="", **vae.preset("small-f4"))
  # L2 at a higher rate: +1.4 dB held-out PSNR over SD's L1 after 300 steps here (no LPIPS/GAN).
  config.vae.update(rec_loss="l2", lr=2e-3)
  config.clip.image_size = resolution
  config.model.cross_attn_dim = config.clip.width
  config.model.in_channels = config.vae.latent_channels
  config.model.out_channels = config.vae.latent_channels
  return config


def cpu_unet(config: ml_collections.ConfigDict, width: int,
             topology: dict | None = None) -> ml_collections.ConfigDict:
  """Edits ``config``'s model to ``topology`` (default :data:`CPU_UNET`) at ``width`` (heads as
  ``unet.preset`` chooses them), and its cost to the setting actually sampled (the VAE's latent
  size, the text encoder's tokens), still normalised to width 320 of the same topology. Call it
  after :func:`apply` (it reads the data resolution and text length)."""
  topology = CPU_UNET if topology is None else topology
  config.model.update(topology)
  config.model.update(unet.preset(width, topology["channel_mult"]))
  config.cost.update(latent_size=config.data.resolution // vae.down_factor(config.vae),
                     text_len=config.text.max_length)
  return config
