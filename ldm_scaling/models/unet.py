"""The SD-2.x text-conditional UNet, parameterised by its base width (Mei et al. 2024, Table 1).

Topology (diffusers' ``UNet2DConditionModel`` with the SD-2.x config, at any width ``c``):
conv_in -> 4 levels of ``layers_per_block`` ResNet blocks with widths ``c * channel_mult``
(default ``[c, 2c, 4c, 4c]``), a spatial transformer (self-attention, cross-attention to the text,
GEGLU feed-forward; linear in/out projections) after each ResNet block at the levels flagged in
``attn_levels`` and in the middle, a stride-2 conv between levels -> middle block -> mirrored up
path with skip concatenations and nearest-neighbour upsampling -> GroupNorm, SiLU, conv_out.
The timestep embedding has width ``4c``.

Guidance-scale input (``model.guidance_embed``, off by default; LCM, Luo et al. 2023): the UNet
also takes the classifier-free guidance scale ``w`` (B,) it should imitate -- a consistency student
distilled over a range of scales. ``w`` enters as diffusers' ``time_cond_proj_dim`` does: the
sinusoidal embedding of ``(w - 1) * 1000`` (:func:`guidance_embedding`, LCM's
``get_guidance_scale_embedding``, :data:`GUIDANCE_EMBED_DIM` = 256 features as LCM's released
students) goes through a bias-free linear map ``time_embedding/cond_proj`` and is added to the
timestep's sinusoidal features before ``linear_1``. Without it nothing changes (parameters,
outputs). ``w = 1`` (no guidance) embeds to the embedding of 0, not to nothing: the student knows
every scale it was trained on, 1 included.

Parameter paths are diffusers' PyTorch names with ``.N`` written ``_N`` (``down_blocks_0/resnets_1/
conv1/kernel`` <-> ``down_blocks.0.resnets.1.conv1.weight``): see ``models.convert``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import layers

# The paper's model sizes (Table 1): base width -> the parameter count it reports.
PAPER_SIZES = {
    64: "39M", 96: "83M", 128: "145M", 160: "223M", 192: "318M", 224: "430M", 256: "558M",
    288: "704M", 320: "866M", 512: "2B", 768: "5B",
}
SD_HEAD_DIM = 64
FIXED_HEADS = 8  # SD-1.5's head count, for widths that 64-wide heads do not divide
GUIDANCE_EMBED_DIM = 256  # LCM's time_cond_proj_dim (its released SD students)


def preset(width: int, channel_mult: Sequence[int] = (1, 2, 4, 4)) -> dict[str, Any]:
  """Model-config fields for a base width: 64-wide heads as SD-2.x where every level width is a
  multiple of 64, otherwise SD-1.5's fixed 8 heads (parameters do not depend on the choice)."""
  if all(width * m % SD_HEAD_DIM == 0 for m in channel_mult):
    return dict(width=width, head_dim=SD_HEAD_DIM, num_heads=0)
  return dict(width=width, head_dim=SD_HEAD_DIM, num_heads=FIXED_HEADS)


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ConfigError(f"unknown dtype {name!r} (use float32 or bfloat16)") from None


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int = 32
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(layers.group_norm(name="norm1", groups=self.groups, **kw)(x))
    h = layers.conv(self.out_channels, name="conv1", **kw)(h)
    t = layers.dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = nn.silu(layers.group_norm(name="norm2", groups=self.groups, **kw)(h))
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = layers.conv(self.out_channels, name="conv2", axes=(sh.MLP, sh.EMBED), **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, name="conv_shortcut", kernel_size=1, **kw)(x)
    return layers.constrain(x + h, (sh.BATCH, sh.HEIGHT, sh.WIDTH, sh.CHANNELS))


class BasicTransformerBlock(nn.Module):
  heads: int
  head_dim: int
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  query_chunk: int = 0
  attn_kernel: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, head_dim=self.head_dim, dropout=self.dropout, **kw)
    chunked = dict(attn, query_chunk=self.query_chunk, kernel=self.attn_kernel)
    d = self.deterministic
    x = x + layers.Attention(**chunked, name="attn1")(layers.layer_norm(name="norm1", **kw)(x),
                                                   deterministic=d)
    x = x + layers.Attention(**attn, name="attn2")(layers.layer_norm(name="norm2", **kw)(x),
                                                   context, deterministic=d)
    x = x + layers.FeedForward(dropout=self.dropout, name="ff", **kw)(
        layers.layer_norm(name="norm3", **kw)(x), deterministic=d)
    return x


class Transformer2D(nn.Module):
  """Spatial transformer with linear projections (SD-2.x ``use_linear_projection=True``)."""
  heads: int
  head_dim: int
  depth: int = 1
  groups: int = 32
  dropout: float = 0.0
  deterministic: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  query_chunk: int = 0
  attn_kernel: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, ch = x.shape
    h = layers.group_norm(name="norm", groups=self.groups, epsilon=1e-6, **kw)(x)
    h = h.reshape(b, hgt * wid, ch)
    h = layers.dense(ch, name="proj_in", **kw)(h)
    h = layers.constrain(h, (sh.BATCH, sh.LENGTH, sh.CHANNELS))
    block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.depth):
      h = block(self.heads, self.head_dim, self.dropout, self.deterministic,
                query_chunk=self.query_chunk, attn_kernel=self.attn_kernel,
                name=f"transformer_blocks_{i}", **kw)(h, context)
    h = layers.dense(ch, name="proj_out", axes=(sh.MLP, sh.EMBED), **kw)(h)
    return x + h.reshape(b, hgt, wid, ch)


def guidance_embedding(scale: jax.Array, dim: int = GUIDANCE_EMBED_DIM) -> jax.Array:
  """LCM's guidance-scale embedding (diffusers ``get_guidance_scale_embedding``) of CFG scales
  ``scale`` (B,) in this project's convention (1 = no guidance), i.e. of LCM's ``w' = scale - 1``:
  ``[sin(1000 w' f_k), cos(1000 w' f_k)]``, ``f_k = 10000^(-k / (dim/2 - 1))``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = ((jnp.asarray(scale, jnp.float32) - 1.0) * 1000.0)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers' ``TimestepEmbedding``; with ``cond`` (the guidance embedding) ``cond_proj``
  (bias-free) maps it onto the sinusoidal features first (``time_cond_proj_dim``)."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, emb, cond=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if cond is not None:
      emb = emb + layers.dense(emb.shape[-1], name="cond_proj", use_bias=False, **kw)(
          cond.astype(self.dtype))
    emb = nn.silu(layers.dense(self.features, name="linear_1", **kw)(emb))
    return layers.dense(self.features, name="linear_2", axes=(sh.MLP, sh.EMBED), **kw)(emb)


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Builds the blocks every level uses with the settings they share."""
  groups: int
  dropout: float
  deterministic: bool
  remat: bool
  dtype: Any
  param_dtype: Any
  query_chunk: int = 0
  attn_kernel: str = "xla"

  def resnet(self, out_channels, name):
    cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return cls(out_channels, self.groups, self.dropout, self.deterministic, self.dtype,
               self.param_dtype, name=name)

  def transformer(self, heads, name):
    return Transformer2D(heads[0], heads[1], heads[2], self.groups, self.dropout,
                         self.deterministic, self.remat, self.dtype, self.param_dtype,
                         self.query_chunk, self.attn_kernel, name=name)

  def conv(self, features, name, **kw):
    return layers.conv(features, name=name, dtype=self.dtype, param_dtype=self.param_dtype, **kw)


class DownBlock(nn.Module):
  """``CrossAttnDownBlock2D`` (with ``heads``) or ``DownBlock2D`` (``heads=None``)."""
  blocks: _Blocks
  out_channels: int
  num_layers: int
  heads: tuple[int, int, int] | None
  downsample: bool

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.num_layers):
      x = self.blocks.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.heads:
        x = self.blocks.transformer(self.heads, f"attentions_{i}")(x, context)
      skips.append(x)
    if self.downsample:
      x = Downsample(self.blocks, self.out_channels, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class Downsample(nn.Module):
  blocks: _Blocks
  channels: int

  @nn.compact
  def __call__(self, x):
    return self.blocks.conv(self.channels, "conv", stride=2)(x)


class Upsample(nn.Module):
  blocks: _Blocks
  channels: int

  @nn.compact
  def __call__(self, x):
    return self.blocks.conv(self.channels, "conv")(layers.upsample_nearest(x))


class UpBlock(nn.Module):
  """``CrossAttnUpBlock2D`` / ``UpBlock2D``: ``num_layers`` ResNets, each eating one skip."""
  blocks: _Blocks
  out_channels: int
  num_layers: int
  heads: tuple[int, int, int] | None
  upsample: bool

  @nn.compact
  def __call__(self, x, skips, temb, context):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self.blocks.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.heads:
        x = self.blocks.transformer(self.heads, f"attentions_{i}")(x, context)
    if self.upsample:
      x = Upsample(self.blocks, self.out_channels, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  """``UNetMidBlock2DCrossAttn``: ResNet, transformer, ResNet."""
  blocks: _Blocks
  channels: int
  heads: tuple[int, int, int]

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.blocks.resnet(self.channels, "resnets_0")(x, temb)
    x = self.blocks.transformer(self.heads, "attentions_0")(x, context)
    return self.blocks.resnet(self.channels, "resnets_1")(x, temb)


class UNet(nn.Module):
  """Text-conditional UNet: ``apply(params, x, t, context, train=False)``.

  ``x``: (B, H, W, in_channels) latents, H and W divisible by 2**(levels-1); ``t``: scalar or (B,)
  timesteps; ``context``: (B, L, cross_attn_dim) text embeddings; ``w``: scalar or (B,) guidance
  scales, required with ``guidance_embed`` and refused without. Returns (B, H, W, out_channels).
  """
  width: int = 320
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  layers_per_block: int = 2
  attn_levels: Sequence[bool] = (True, True, True, False)
  head_dim: int = 64
  num_heads: int = 0
  transformer_depth: int = 1
  cross_attn_dim: int = 1024
  norm_groups: int = 32
  in_channels: int = 4
  out_channels: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  attn_query_chunk: int = -1
  attn_kernel: str = "xla"
  guidance_embed: bool = False

  def heads(self, channels: int) -> tuple[int, int, int]:
    """(heads, head_dim, depth) of the transformer at ``channels`` features."""
    if self.num_heads > 0:
      return self.num_heads, channels // self.num_heads, self.transformer_depth
    return channels // self.head_dim, self.head_dim, self.transformer_depth

  @nn.compact
  def __call__(self, x, t, context, train: bool = False, w=None):
    blocks = _Blocks(self.norm_groups, self.dropout, not train, self.remat == "block",
                     self.dtype, self.param_dtype, self.attn_query_chunk, self.attn_kernel)
    widths = [self.width * m for m in self.channel_mult]
    levels = len(widths)
    x = x.astype(self.dtype)
    context = context.astype(self.dtype)
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    temb = layers.timestep_embedding(t, self.width).astype(self.dtype)
    if self.guidance_embed and w is None:
      raise ConfigError("model.guidance_embed=True: this UNet needs the guidance scale w of each "
                        "sample (a consistency student with objective.cfg_range)")
    if not self.guidance_embed and w is not None:
      raise ConfigError("a guidance scale w was given to a UNet without model.guidance_embed; "
                        "guide it with classifier-free guidance instead")
    cond = None
    if self.guidance_embed:
      cond = guidance_embedding(jnp.broadcast_to(jnp.asarray(w, jnp.float32), (x.shape[0],)))
    temb = TimestepEmbedding(4 * self.width, self.dtype, self.param_dtype,
                             name="time_embedding")(temb, cond)

    x = blocks.conv(widths[0], "conv_in")(x)
    x = layers.constrain(x, (sh.BATCH, sh.HEIGHT, sh.WIDTH, sh.CHANNELS))
    skips = [x]
    for i, w in enumerate(widths):
      heads = self.heads(w) if self.attn_levels[i] else None
      x, s = DownBlock(blocks, w, self.layers_per_block, heads, downsample=i < levels - 1,
                       name=f"down_blocks_{i}")(x, temb, context)
      skips += s

    x = MidBlock(blocks, widths[-1], self.heads(widths[-1]), name="mid_block")(x, temb, context)

    for i, w in enumerate(reversed(widths)):
      level = levels - 1 - i
      heads = self.heads(w) if self.attn_levels[level] else None
      x = UpBlock(blocks, w, self.layers_per_block + 1, heads, upsample=level > 0,
                  name=f"up_blocks_{i}")(x, skips, temb, context)

    x = nn.silu(layers.group_norm(name="conv_norm_out", groups=self.norm_groups,
                                  dtype=self.dtype, param_dtype=self.param_dtype)(x))
    x = blocks.conv(self.out_channels, "conv_out", axes=(sh.EMBED, sh.CHANNELS))(x)
    return x


def from_config(cfg: ml_collections.ConfigDict) -> UNet:
  """The UNet described by a config's ``model`` section (validated first)."""
  validate(cfg)
  return UNet(
      width=cfg.width, channel_mult=tuple(cfg.channel_mult), layers_per_block=cfg.layers_per_block,
      attn_levels=tuple(bool(a) for a in cfg.attn_levels), head_dim=cfg.head_dim,
      num_heads=cfg.num_heads, transformer_depth=cfg.transformer_depth,
      cross_attn_dim=cfg.cross_attn_dim, norm_groups=cfg.norm_groups,
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, dropout=cfg.dropout,
      dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), remat=cfg.remat,
      attn_query_chunk=cfg.attn_query_chunk, attn_kernel=cfg.get("attn_kernel", "xla"),
      guidance_embed=bool(cfg.get("guidance_embed", False)))


def without_guidance(params):
  """A guidance-embedded UNet's parameters less ``time_embedding/cond_proj``: those of the same
  UNet without ``guidance_embed`` (unchanged when there is none)."""
  temb = params["time_embedding"]
  if "cond_proj" not in temb:
    return params
  return {**params, "time_embedding": {k: v for k, v in temb.items() if k != "cond_proj"}}


def with_zero_guidance(params, template):
  """``params`` of a UNet without ``guidance_embed``, completed to ``template``'s (a guidance-
  embedded UNet's, abstract or not) by a zero ``cond_proj``: the embedded UNet then computes
  exactly what ``params`` did, at every ``w`` (a student starting as its teacher)."""
  proj = template["time_embedding"].get("cond_proj")
  if proj is None or "cond_proj" in params["time_embedding"]:
    return params
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), sh.unbox(proj))
  return {**params, "time_embedding": {**params["time_embedding"], "cond_proj": zeros}}


def down_factor(cfg) -> int:
  """How much the UNet shrinks each side: ``2 ** (levels - 1)``; its input side must be a multiple
  (of a ``model`` config section)."""
  return 2 ** (len(cfg.channel_mult) - 1)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks a ``model`` section before anything is built; errors say what to change."""
  width, groups = cfg.width, cfg.norm_groups
  if width < 1 or groups < 1:
    raise ConfigError(f"model.width ({width}) and model.norm_groups ({groups}) must be positive")
  mult = tuple(cfg.channel_mult)
  if not mult or any(m < 1 for m in mult):
    raise ConfigError(f"model.channel_mult must be positive integers, got {mult}")
  if len(cfg.attn_levels) != len(mult):
    raise ConfigError(f"model.attn_levels has {len(cfg.attn_levels)} entries but channel_mult "
                      f"has {len(mult)} levels; give one flag per level")
  for key in ("layers_per_block", "transformer_depth", "in_channels", "out_channels",
              "cross_attn_dim"):
    if cfg[key] < 1:
      raise ConfigError(f"model.{key} must be >= 1, got {cfg[key]}")
  if not 0.0 <= cfg.dropout < 1.0:
    raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
  if cfg.attn_query_chunk < -1:
    raise ConfigError(f"model.attn_query_chunk must be -1 (auto), 0 (dense) or a chunk size, got "
                      f"{cfg.attn_query_chunk}")
  if cfg.get("attn_kernel", "xla") not in layers.ATTN_KERNELS:
    raise ConfigError(f"model.attn_kernel must be one of {', '.join(layers.ATTN_KERNELS)}, got "
                      f"{cfg.attn_kernel!r}")
  if cfg.remat not in ("none", "block"):
    raise ConfigError(f"model.remat must be 'none' or 'block', got {cfg.remat!r}")
  for key in ("dtype", "param_dtype"):
    _dtype(cfg[key])
  widths = [width * m for m in mult]
  for w in widths:
    if w % groups:
      raise ConfigError(
          f"model.width={width}: level width {w} is not divisible by model.norm_groups={groups} "
          f"(GroupNorm); use a width that is a multiple of {groups}, e.g. {_round(width, groups)}")
  attn_widths = [w for w, a in zip(widths, cfg.attn_levels) if a] + [widths[-1]]
  if cfg.num_heads > 0:
    for w in attn_widths:
      if w % cfg.num_heads:
        raise ConfigError(
            f"model.width={width}: attention width {w} is not divisible by "
            f"model.num_heads={cfg.num_heads}; pick num_heads dividing {width} or set "
            f"num_heads=0 to use head_dim")
  else:
    if cfg.head_dim < 1:
      raise ConfigError(f"model.head_dim must be >= 1 when num_heads=0, got {cfg.head_dim}")
    for w in attn_widths:
      if w % cfg.head_dim:
        raise ConfigError(
            f"model.width={width}: attention width {w} is not a multiple of model.head_dim="
            f"{cfg.head_dim}; set model.num_heads={FIXED_HEADS} (fixed heads, as SD-1.5) or use "
            f"configs/t2i.py:width={width}, whose preset does so")


def _round(width: int, multiple: int) -> int:
  return max(multiple, round(width / multiple) * multiple)
