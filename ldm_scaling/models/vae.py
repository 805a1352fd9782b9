"""KL autoencoder: diffusers' ``AutoencoderKL`` (the SD VAE) topology at any size, in flax linen.

Topology: encoder = conv_in -> ``len(channel_mult)`` levels of ``layers_per_block`` ResNet blocks
(``width * channel_mult`` filters, a stride-2 conv between levels) -> mid block (ResNet,
single-head self-attention, ResNet) -> GroupNorm, SiLU, conv to 2 x ``latent_channels`` (mean,
log-variance) -> 1x1 ``quant_conv``; decoder = 1x1 ``post_quant_conv`` -> conv_in -> mid block ->
mirrored levels of ``layers_per_block + 1`` ResNets with nearest-neighbour upsampling -> GroupNorm,
SiLU, conv_out. Down factor ``2 ** (len(channel_mult) - 1)``; SD-2.x's is width 128,
``(1, 2, 4, 4)``, 2 layers, 4 latent channels (f = 8).

Parameter paths are diffusers' PyTorch names with ``.N`` written ``_N`` (``encoder/down_blocks_0/
resnets_1/conv1/kernel`` <-> ``encoder.down_blocks.0.resnets.1.conv1.weight``), so SD's weights
import through ``models.convert`` by renaming alone (:func:`load_diffusers`).

Latents for diffusion are ``z * scaling_factor``; the factor is a property of the weights (SD's
0.18215 from its ``config.json``; for a VAE trained here, 1 / std of training latents, computed
by ``ldm_scaling.components.vae``) and travels with them (:class:`VAE`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

import flax
import flax.linen as nn
from huggingface_hub import hf_hub_download
import jax
import jax.numpy as jnp
import ml_collections

from ldm_scaling import files
from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError, WeightsError
from ldm_scaling.models import convert, layers

TRAINED = "trained"  # vae.weights value: the VAE this project trains (ldm-scaling train-vae)

# Named sizes; configs do ``config.vae.update(vae.preset("small-f4"))``.
PRESETS = {
    "sd": dict(width=128, channel_mult=(1, 2, 4, 4), layers_per_block=2, latent_channels=4,
               norm_groups=32, mid_attention=True),
    # The offline default: 32 px images -> 8x8x4 latents (compression 12; SD's f8 is 48), 0.24 M
    # parameters, ~0.1 GFLOP per image forward: trained in minutes on 2 CPU cores.
    "small-f4": dict(width=16, channel_mult=(1, 2, 2), layers_per_block=1, latent_channels=4,
                     norm_groups=8, mid_attention=True),
}
NORM_EPS = 1e-6


def preset(name: str) -> dict[str, Any]:
  try:
    return dict(PRESETS[name])
  except KeyError:
    raise ConfigError(f"unknown VAE preset {name!r}; available: {', '.join(PRESETS)}") from None


class ResnetBlock(nn.Module):
  """diffusers ``ResnetBlock2D`` without a time embedding (eps 1e-6)."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype)
    h = nn.silu(layers.group_norm(name="norm1", groups=self.groups, epsilon=NORM_EPS, **kw)(x))
    h = layers.conv(self.out_channels, name="conv1", **kw)(h)
    h = nn.silu(layers.group_norm(name="norm2", groups=self.groups, epsilon=NORM_EPS, **kw)(h))
    h = layers.conv(self.out_channels, name="conv2", axes=(sh.MLP, sh.EMBED), **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, name="conv_shortcut", kernel_size=1, **kw)(x)
    return x + h


class AttentionBlock(nn.Module):
  """diffusers' VAE mid-block ``Attention``: GroupNorm, single-head self-attention with biased
  q/k/v/out projections, residual."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype)
    y = layers.group_norm(name="group_norm", groups=self.groups, epsilon=NORM_EPS, **kw)(x)
    y = y.reshape(b, 1, h * w, c)  # (B, heads=1, L, C) -> keep the (B, L, H, D) layout below
    y = y.transpose(0, 2, 1, 3)
    q = layers.dense(c, name="to_q", axes=(sh.EMBED, sh.HEADS), **kw)(y)
    k = layers.dense(c, name="to_k", axes=(sh.EMBED, sh.HEADS), **kw)(y)
    v = layers.dense(c, name="to_v", axes=(sh.EMBED, sh.HEADS), **kw)(y)
    out = jax.nn.dot_product_attention(q, k, v)
    out = layers.dense(c, name="to_out_0", axes=(sh.HEADS, sh.EMBED), **kw)(out)
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with diffusers' asymmetric (0, 1) padding."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(
        layers.KERNEL_INIT, (sh.KERNEL_H, sh.KERNEL_W, sh.EMBED, sh.MLP))
    bias = nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.MLP,))
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                   dtype=self.dtype, kernel_init=init, bias_init=bias, name="conv")(x)


class Upsample(nn.Module):
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.conv(self.channels, name="conv", dtype=self.dtype)(layers.upsample_nearest(x))


class DownBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.downsample:
      x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.upsample:
      x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  widths: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype)
    x = layers.conv(self.widths[0], name="conv_in", **kw)(x)
    for i, w in enumerate(self.widths):
      x = DownBlock(w, self.layers_per_block, self.groups, i < len(self.widths) - 1,
                    name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock(self.widths[-1], self.groups, self.mid_attention, name="mid_block", **kw)(x)
    x = nn.silu(layers.group_norm(name="conv_norm_out", groups=self.groups, epsilon=NORM_EPS,
                                  **kw)(x))
    return layers.conv(2 * self.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  widths: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype)
    x = layers.conv(self.widths[-1], name="conv_in", **kw)(z)
    x = MidBlock(self.widths[-1], self.groups, self.mid_attention, name="mid_block", **kw)(x)
    rev = list(reversed(self.widths))
    for i, w in enumerate(rev):
      x = UpBlock(w, self.layers_per_block + 1, self.groups, i < len(rev) - 1,
                  name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(layers.group_norm(name="conv_norm_out", groups=self.groups, epsilon=NORM_EPS,
                                  **kw)(x))
    return layers.conv(self.out_channels, name="conv_out", axes=(sh.EMBED, sh.CHANNELS), **kw)(x)


# Initial log-variance of the posterior (the bias of quant_conv's log-variance half). With zeros
# (PyTorch's init) the decoder starts from posterior samples with std 1 around means of order 0.1,
# i.e. mostly noise, and with the tiny KL weight only the optimiser's step size walks the bias
# down: thousands of steps on CPU. Starting at std e^-3 lets reconstruction learn at once; the KL
# term moves it back up where the data wants. Initialisation only: imported weights are unaffected.
LOGVAR_INIT = -6.0


def _moments_bias(key, shape, dtype=jnp.float32):
  del key
  half = shape[0] // 2
  return jnp.concatenate([jnp.zeros((half,), dtype), jnp.full((half,), LOGVAR_INIT, dtype)])


def _conv1x1(features: int, dtype, bias_init=nn.initializers.zeros_init()) -> nn.Conv:
  """``layers.conv(kernel_size=1)`` for ``setup`` (which names submodules by attribute)."""
  return nn.Conv(features, (1, 1), dtype=dtype,
                 kernel_init=nn.with_logical_partitioning(
                     layers.KERNEL_INIT, (sh.KERNEL_H, sh.KERNEL_W, sh.EMBED, sh.MLP)),
                 bias_init=nn.with_logical_partitioning(bias_init, (sh.MLP,)))


class AutoencoderKL(nn.Module):
  """``apply(params, x, method="encode") -> (mean, logvar)``; ``method="decode"`` maps latents
  (unscaled) to images; ``__call__(x, rng)`` samples a latent and decodes it (training).

  Images are NHWC in [-1, 1]; latents NHWC with ``latent_channels`` channels."""
  width: int = 128
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_groups: int = 32
  mid_attention: bool = True
  in_channels: int = 3
  dtype: Any = jnp.float32

  def setup(self):
    widths = [self.width * m for m in self.channel_mult]
    self.encoder = Encoder(widths, self.layers_per_block, self.latent_channels, self.norm_groups,
                           self.mid_attention, self.dtype)
    self.decoder = Decoder(widths, self.layers_per_block, self.in_channels, self.norm_groups,
                           self.mid_attention, self.dtype)
    self.quant_conv = _conv1x1(2 * self.latent_channels, self.dtype, _moments_bias)
    self.post_quant_conv = _conv1x1(self.latent_channels, self.dtype)

  @property
  def down_factor(self) -> int:
    return down_factor(self)

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def __call__(self, x, rng=None):
    mean, logvar = self.encode(x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(
        rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


def from_config(cfg: ml_collections.ConfigDict, dtype: str = "float32") -> AutoencoderKL:
  """The module described by a ``vae`` config section."""
  return AutoencoderKL(width=cfg.width, channel_mult=tuple(cfg.channel_mult),
                       layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                       norm_groups=cfg.norm_groups, mid_attention=cfg.mid_attention,
                       dtype=jnp.dtype(dtype))


def abstract_params(module: AutoencoderKL, resolution: int = 32):
  x = jax.ShapeDtypeStruct((1, resolution, resolution, module.in_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


# -------------------------------------------------------------------------------------------------
# Loaded weights.


@dataclasses.dataclass
class VAE:
  """A VAE with its weights and scaling factor; frozen in LDM training.

  ``encode(params, images, rng)`` / ``decode(params, latents)`` are pure functions (call them
  inside a jitted step with ``self.params``): ``encode`` returns *scaled* latents
  (sample x scaling_factor), ``decode`` takes scaled latents and returns images in [-1, 1]
  (unclipped)."""
  module: AutoencoderKL
  params: Any
  scaling_factor: float
  source: str

  @property
  def down_factor(self) -> int:
    return self.module.down_factor

  @property
  def latent_channels(self) -> int:
    return self.module.latent_channels

  def encode(self, params, images, rng=None):
    mean, logvar = self.module.apply({"params": params}, images, method="encode")
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(
        rng, mean.shape, mean.dtype)
    return z * self.scaling_factor

  def decode(self, params, latents):
    return self.module.apply({"params": params}, latents / self.scaling_factor, method="decode")

  @functools.cached_property
  def _jit_encode(self):
    return jax.jit(self.encode)

  @functools.cached_property
  def _jit_decode(self):
    return jax.jit(self.decode)

  def encode_images(self, images, rng=None):
    return self._jit_encode(self.params, images, rng)

  def decode_latents(self, latents):
    return self._jit_decode(self.params, latents)


def _diffusers_files(location: str, subfolder: str) -> tuple[str, str | None]:
  """(safetensors path, config.json path or None) for a file, directory (local or gs://, copied
  once to the local cache by ``files.local_dir``) or hub id."""
  name = "diffusion_pytorch_model.safetensors"
  if not files.is_local(location):
    if location.endswith(".safetensors"):
      raise WeightsError(f"VAE weights {location!r}: from a bucket give the directory holding "
                         f"it (config.json + {name}), or copy the file to a local path")
    # A pipeline directory: only its VAE subfolder is copied; else the VAE's own directory.
    sub = subfolder and files.local_dir(f"{location.rstrip('/')}/{subfolder}", missing_ok=True)
    location, subfolder = sub or files.local_dir(location), ""
  loc = os.path.expanduser(location)
  if loc.endswith(".safetensors"):
    if not os.path.isfile(loc):
      raise WeightsError(f"VAE weights file {loc!r} not found")
    cfg = os.path.join(os.path.dirname(loc), "config.json")
    return loc, cfg if os.path.isfile(cfg) else None
  if loc.startswith((".", "/")) or os.path.isdir(loc):
    d = os.path.join(loc, subfolder) if subfolder and os.path.isdir(
        os.path.join(loc, subfolder)) else loc
    if not os.path.isdir(d):
      raise WeightsError(f"VAE weights directory {d!r} does not exist; give a diffusers VAE "
                         f"directory (config.json + {name}), a .safetensors file or a hub id")
    path = os.path.join(d, name)
    if not os.path.isfile(path):
      raise WeightsError(f"VAE weights directory {d!r} has no {name}; save it with diffusers' "
                         f"save_pretrained (safetensors) or give the file")
    cfg = os.path.join(d, "config.json")
    return path, cfg if os.path.isfile(cfg) else None
  try:
    path = hf_hub_download(location, name, subfolder=subfolder or None)
    cfg = hf_hub_download(location, "config.json", subfolder=subfolder or None)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"cannot download the VAE from hub id {location!r} ({type(e).__name__}: "
                       f"{e}); offline, download it elsewhere and set vae.weights to the "
                       f"directory or .safetensors file") from None
  return path, cfg


def check_diffusers_config(cfg: ml_collections.ConfigDict, diffusers_cfg: dict) -> None:
  """Raises if a diffusers ``config.json`` describes another topology than ``cfg``."""
  want = [cfg.width * m for m in cfg.channel_mult]
  have = list(diffusers_cfg.get("block_out_channels", want))
  pairs = [("block_out_channels", have, want),
           ("layers_per_block", diffusers_cfg.get("layers_per_block", cfg.layers_per_block),
            cfg.layers_per_block),
           ("latent_channels", diffusers_cfg.get("latent_channels", cfg.latent_channels),
            cfg.latent_channels),
           ("norm_num_groups", diffusers_cfg.get("norm_num_groups", cfg.norm_groups),
            cfg.norm_groups),
           ("mid_block_add_attention", diffusers_cfg.get("mid_block_add_attention", True),
            cfg.mid_attention)]
  bad = [f"{k}: checkpoint {a} vs config {b}" for k, a, b in pairs if a != b]
  if bad:
    raise ConfigError("VAE checkpoint does not match the vae config (" + "; ".join(bad) +
                      "); set vae.width / channel_mult / layers_per_block / latent_channels / "
                      "norm_groups accordingly (vae.preset('sd') for SD's VAE)")


def load_diffusers(cfg: ml_collections.ConfigDict, location: str | None = None,
                   subfolder: str | None = None) -> VAE:
  """Imports a diffusers ``AutoencoderKL`` (safetensors; no pickle is executed) onto our module:
  a hub id (``stabilityai/stable-diffusion-2-1-base`` with subfolder ``vae``), a directory or a
  file. The scaling factor is ``cfg.scaling_factor`` if > 0, else the checkpoint config's."""
  location = location or cfg.weights
  subfolder = cfg.subfolder if subfolder is None else subfolder
  path, cfg_path = _diffusers_files(location, subfolder)
  scaling = 0.18215
  if cfg_path:
    with open(cfg_path, encoding="utf-8") as f:
      dcfg = json.load(f)
    check_diffusers_config(cfg, dcfg)
    scaling = float(dcfg.get("scaling_factor", scaling))
  module = from_config(cfg)
  params = convert.load_safetensors(path, abstract_params(module))
  return VAE(module, params, cfg.scaling_factor or scaling, source=path)


def load(config: ml_collections.ConfigDict, vae_dir: str | None = None) -> VAE:
  """The VAE of ``config.vae``: imported weights, or the project's trained one
  (``vae.weights="trained"``, from ``vae_dir`` / ``vae.dir``; ``components.vae.ensure`` trains it
  when absent)."""
  if config.vae.weights == TRAINED:
    return load_trained(config, vae_dir)
  return load_diffusers(config.vae)


# -------------------------------------------------------------------------------------------------
# The VAE this project trains (``ldm-scaling train-vae``), stored as ``params.msgpack`` (flax
# serialization) + ``config.json`` in diffusers' AutoencoderKL vocabulary (block_out_channels,
# layers_per_block, latent_channels, norm_num_groups, scaling_factor, ...) + training metadata.

PARAMS = "params.msgpack"
CONFIG = "config.json"


def default_dir(config: ml_collections.ConfigDict) -> str:
  """``vae.dir``, or a cache directory keyed by the vae section and the training data."""
  if config.vae.dir:
    return os.path.expanduser(config.vae.dir)
  v = {k: v for k, v in config.vae.to_dict().items()
       if k not in ("dir", "weights", "subfolder", "scaling_factor")}
  d = {k: config.data[k] for k in ("name", "resolution", "shapes_sizes")}
  key = hashlib.sha256(json.dumps(dict(vae=v, data=d), sort_keys=True, default=list).encode())
  return os.path.join(files.cache_root(), "vae", key.hexdigest()[:12])


def diffusers_config(cfg: ml_collections.ConfigDict, scaling: float, extra: dict) -> dict:
  """The ``config.json`` of a trained VAE: diffusers' AutoencoderKL keys + ``ldm_scaling``."""
  n = len(cfg.channel_mult)
  return dict(
      _class_name="AutoencoderKL", in_channels=3, out_channels=3,
      down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
      block_out_channels=[cfg.width * m for m in cfg.channel_mult],
      layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
      norm_num_groups=cfg.norm_groups, mid_block_add_attention=cfg.mid_attention,
      act_fn="silu", scaling_factor=scaling, ldm_scaling=extra)


def load_trained(config: ml_collections.ConfigDict, directory: str | None = None) -> VAE:
  """The trained VAE in ``directory`` (default :func:`default_dir`), checked against the config."""
  directory = directory or default_dir(config)
  params_path, cfg_path = os.path.join(directory, PARAMS), os.path.join(directory, CONFIG)
  if not (os.path.isfile(params_path) and os.path.isfile(cfg_path)):
    raise WeightsError(
        f"no trained VAE in {directory!r} (vae.weights={TRAINED!r}); train it with "
        f"`ldm-scaling train-vae --config <your config>` (minutes on CPU) or call "
        f"ldm_scaling.components.vae.ensure(config)")
  with open(cfg_path, encoding="utf-8") as f:
    stored = json.load(f)
  check_diffusers_config(config.vae, stored)
  module = from_config(config.vae)
  template = sh.unbox(abstract_params(module))
  with open(params_path, "rb") as f:
    try:
      params = flax.serialization.from_bytes(template, f.read())
    except (ValueError, KeyError) as e:
      raise WeightsError(f"VAE weights {params_path!r} do not match the vae config ({e}); "
                         f"retrain or fix vae.*") from None
  scaling = config.vae.scaling_factor or float(stored["scaling_factor"])
  return VAE(module, params, scaling, source=directory)


def down_factor(vae_cfg) -> int:
  """How much the VAE shrinks each side: ``2 ** (len(channel_mult) - 1)`` (of a ``vae`` config
  section or a module)."""
  return 2 ** (len(vae_cfg.channel_mult) - 1)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the ``vae`` section and that its latents fit the UNet."""
  v = config.vae
  if not v.weights:
    raise ConfigError(f"vae.weights is empty; give a hub id, a directory, a .safetensors file or "
                      f"{TRAINED!r}")
  mult = tuple(v.channel_mult)
  if not mult or min(mult) < 1 or v.width < 1:
    raise ConfigError(f"vae.width ({v.width}) and vae.channel_mult {mult} must be positive")
  for key in ("layers_per_block", "latent_channels", "norm_groups", "steps", "batch_size"):
    if v[key] < 1:
      raise ConfigError(f"vae.{key} must be >= 1, got {v[key]}")
  for w in (v.width * m for m in mult):
    if w % v.norm_groups:
      raise ConfigError(f"vae block width {w} (vae.width={v.width} x channel_mult) is not "
                        f"divisible by vae.norm_groups={v.norm_groups}")
  if v.scaling_factor < 0:
    raise ConfigError(f"vae.scaling_factor must be >= 0 (0 = stored with the weights), got "
                      f"{v.scaling_factor}")
  if v.rec_loss not in ("l1", "l2"):
    raise ConfigError(f"vae.rec_loss must be l1 or l2, got {v.rec_loss!r}")
  if v.latent_channels != config.model.in_channels:
    raise ConfigError(f"vae.latent_channels={v.latent_channels} but model.in_channels="
                      f"{config.model.in_channels}; the UNet denoises the VAE's latents, set them "
                      f"equal")
