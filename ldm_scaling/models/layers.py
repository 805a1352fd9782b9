"""Flax linen layers shared by the UNet and the VAE, each parameter born with logical axis names.

Names follow diffusers' PyTorch modules (``to_q``, ``conv_shortcut``, ``time_emb_proj``, ...), so a
PyTorch state dict maps onto these parameters by renaming alone (see ``models.convert``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_scaling import sharding as sh

Dtype = Any


# PyTorch's default for Linear/Conv weights (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)),
# the initialisation diffusers' UNet and VAE train from.
KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, *, name: str, axes=(sh.EMBED, sh.MLP), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """``nn.Dense`` with kernel axes ``(in, out)`` and bias axes ``(out,)``."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(KERNEL_INIT, axes),
      bias_init=_partitioned(nn.initializers.zeros_init(), (axes[1],)), name=name)


def conv(features: int, *, name: str, kernel_size: int = 3, stride: int = 1,
         axes=(sh.EMBED, sh.MLP), dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """NHWC convolution with 'same'-style symmetric padding; kernel ``(kh, kw, in, out)``."""
  pad = kernel_size // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(KERNEL_INIT, (sh.KERNEL_H, sh.KERNEL_W) + tuple(axes)),
      bias_init=_partitioned(nn.initializers.zeros_init(), (axes[1],)), name=name)


def group_norm(*, name: str, groups: int = 32, epsilon: float = 1e-5,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  return nn.GroupNorm(
      num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=_partitioned(nn.initializers.ones_init(), (sh.NORM,)),
      bias_init=_partitioned(nn.initializers.zeros_init(), (sh.NORM,)), name=name)


def layer_norm(*, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=_partitioned(nn.initializers.ones_init(), (sh.NORM,)),
      bias_init=_partitioned(nn.initializers.zeros_init(), (sh.NORM,)), name=name)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding as SD's UNet uses it (cos first, frequency shift 0)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Attention(nn.Module):
  """Multi-head attention with bias-free q/k/v and a biased output projection (``to_out.0``)."""
  heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, deterministic=True):
    inner = self.heads * self.head_dim
    ctx_axis = sh.EMBED if context is None else sh.CONTEXT
    context = x if context is None else context
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, use_bias=False, axes=(sh.EMBED, sh.HEADS), name="to_q", **kw)(x)
    k = dense(inner, use_bias=False, axes=(ctx_axis, sh.HEADS), name="to_k", **kw)(context)
    v = dense(inner, use_bias=False, axes=(ctx_axis, sh.HEADS), name="to_v", **kw)(context)
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    out = out.reshape(out.shape[:2] + (inner,))
    out = dense(x.shape[-1], axes=(sh.HEADS, sh.EMBED), name="to_out_0", **kw)(out)
    return nn.Dropout(self.dropout, deterministic=deterministic)(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward: ``net.0.proj`` to 2 x 4C, exact GELU gate, ``net.2`` back to C."""
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    dim = x.shape[-1]
    inner = dim * self.mult
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(inner, name="net_0", **kw)(x)
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    return dense(dim, axes=(sh.MLP, sh.EMBED), name="net_2", **kw)(h)


class GEGLU(nn.Module):
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = dense(2 * self.features, axes=(sh.EMBED, sh.MLP), dtype=self.dtype,
              param_dtype=self.param_dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Activation sharding hint by logical names (a no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))
