"""Flax linen layers shared by the UNet and the VAE, each parameter born with logical axis names.

Names follow diffusers' PyTorch modules (``to_q``, ``conv_shortcut``, ``time_emb_proj``, ...), so a
PyTorch state dict maps onto these parameters by renaming alone (see ``models.convert``).
"""

from __future__ import annotations

import contextlib
import functools
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


class Dense(nn.Dense):
  """``nn.Dense`` (same parameters) applied to the input flattened to (rows, features).

  The same values, but XLA:CPU runs the backward pass of a 2-D matmul ~4x faster than that of
  the (batch, length, features) contraction (gradient of a 8x1024x128 -> 2048 projection: 49 vs
  215 ms); on TPU both lower to the same matmul.
  """

  def __call__(self, inputs):
    lead = inputs.shape[:-1]
    out = super().__call__(inputs.reshape((-1, inputs.shape[-1])))
    return out.reshape(lead + out.shape[-1:])


def dense(features: int, *, name: str, axes=(sh.EMBED, sh.MLP), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """``nn.Dense`` with kernel axes ``(in, out)`` and bias axes ``(out,)`` (as :class:`Dense`)."""
  return Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(KERNEL_INIT, axes),
      bias_init=_partitioned(nn.initializers.zeros_init(), (axes[1],)), name=name)


_TARGET: list[str] = []  # the platform being built for, when not this process's (plans)


def target_backend() -> str:
  """The platform the programs being traced will run on: this process's backend, or the one a
  :func:`building_for` block names (``ldm-scaling plan`` compiles TPU programs on a CPU host; the
  CPU-only choices below must not follow it there)."""
  return _TARGET[-1] if _TARGET else jax.default_backend()


@contextlib.contextmanager
def building_for(platform: str):
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


# On XLA:CPU the weight gradient of a 3x3 convolution over many pixels runs several times slower
# than its forward pass, and faster one example at a time: at 32x32, 8 examples, 128 -> 128
# channels, 42 ms batched vs 14 ms as 8 per-example gradients summed (forward 10 ms); at 64x64,
# 4 examples, 320 -> 320, 746 vs 250 ms. Below these sizes the batched form wins (16x16x256: 14 vs
# 20 ms; 32x32 128 -> 4: 4 vs 19 ms). Thresholds from timing these shapes alone; the effect on
# the whole train step is in benchmarks/README.md.
CPU_SPLIT_WEIGHT_GRAD_MIN_PIXELS = 1024
CPU_SPLIT_WEIGHT_GRAD_MIN_CHANNELS = 32
CPU_SPLIT_WEIGHT_GRAD_MAX_PIECES = 8


def split_weight_grad_pieces(lhs_shape, rhs_shape) -> int:
  """How many batch pieces :func:`conv_general_dilated` computes the weight gradient in, for an
  NHWC input and HWIO kernel of these shapes: 1 (XLA's own batched gradient) off CPU, for 1x1
  kernels and below the sizes above; else up to ``CPU_SPLIT_WEIGHT_GRAD_MAX_PIECES``, dividing
  the batch."""
  b, h, w, _ = lhs_shape
  kh, kw, cin, cout = rhs_shape
  if (target_backend() != "cpu" or kh * kw == 1 or h * w < CPU_SPLIT_WEIGHT_GRAD_MIN_PIXELS
      or min(cin, cout) < CPU_SPLIT_WEIGHT_GRAD_MIN_CHANNELS):
    return 1
  return max(d for d in range(1, min(b, CPU_SPLIT_WEIGHT_GRAD_MAX_PIECES) + 1) if b % d == 0)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, padding):
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_split_weight_grad(x, w, padding, pieces):
  return _conv(x, w, padding)


def _split_fwd(x, w, padding, pieces):
  return _conv(x, w, padding), (x, w)


def _split_bwd(padding, pieces, res, dy):
  x, w = res
  dx = jax.vjp(lambda x: _conv(x, w, padding), x)[1](dy)[0]
  xs, dys = jnp.split(x, pieces), jnp.split(dy, pieces)
  dw = sum(jax.vjp(lambda w, x=x: _conv(x, w, padding), w)[1](d)[0].astype(jnp.float32)
           for x, d in zip(xs, dys))
  return dx, dw.astype(w.dtype)


_conv_split_weight_grad.defvjp(_split_fwd, _split_bwd)


def _ones(values) -> bool:
  return values is None or all(v == 1 for v in values)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs):
  """``lax.conv_general_dilated`` (the ``nn.Conv`` hook), the same forward values and input
  gradient; for stride-1 NHWC convolutions where :func:`split_weight_grad_pieces` says so, the
  weight gradient is summed over batch pieces (equal up to float summation order)."""
  plain = functools.partial(
      jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  if (kwargs or precision is not None or feature_group_count != 1 or not _ones(window_strides)
      or not _ones(lhs_dilation) or not _ones(rhs_dilation) or isinstance(padding, str)
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return plain()
  pieces = split_weight_grad_pieces(lhs.shape, rhs.shape)
  if pieces == 1:
    return plain()
  return _conv_split_weight_grad(lhs, rhs, tuple(tuple(p) for p in padding), pieces)


def conv(features: int, *, name: str, kernel_size: int = 3, stride: int = 1,
         axes=(sh.EMBED, sh.MLP), dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """NHWC convolution with 'same'-style symmetric padding; kernel ``(kh, kw, in, out)``. Through
  :func:`conv_general_dilated`: on CPU, large stride-1 convolutions take their weight gradient in
  batch pieces (same values up to summation order)."""
  pad = kernel_size // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype,
      conv_general_dilated=conv_general_dilated,
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


CPU_QUERY_CHUNK = 128


def query_chunk_for(setting: int, length: int) -> int:
  """The query chunk :func:`attention` uses for ``model.attn_query_chunk = setting`` at ``length``
  queries: 0 (dense) when chunking would not split anything or does not divide the length.
  ``-1`` (auto) chunks by :data:`CPU_QUERY_CHUNK` on CPU, where it is faster (measured in
  ``benchmarks/train_step.py``), and keeps TPUs/GPUs dense."""
  if setting < 0:
    setting = CPU_QUERY_CHUNK if target_backend() == "cpu" else 0
  if setting <= 0 or length <= setting or length % setting:
    return 0
  return setting


def attention(q, k, v, query_chunk: int = 0):
  """Softmax attention on ``(batch, length, heads, head_dim)`` arrays, softmax in f32.

  ``query_chunk > 0`` computes it ``query_chunk`` queries at a time under ``lax.map``, each chunk
  rematerialised in the backward pass (Rabe & Staats' memory-efficient attention): the same values,
  but the (heads x queries x keys) probabilities are never held whole, which on CPU keeps them in
  cache (self-attention at 1024 tokens: forward + backward 2.5x faster than
  ``jax.nn.dot_product_attention``) and on any device bounds their memory."""
  scale = q.shape[-1] ** -0.5
  # Heads-major layouts, made once: each einsum below is then a plain batched matmul. Inside
  # lax.map, XLA:CPU would otherwise re-transpose k and v for every chunk.
  kt = k.transpose(0, 2, 3, 1)  # (batch, heads, head_dim, keys)
  vt = v.transpose(0, 2, 1, 3)  # (batch, heads, keys, head_dim)

  def dense(q):  # (batch, heads, queries, head_dim)
    logits = jnp.einsum("bnth,bnhs->bnts", q, kt).astype(jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsh->bnth", probs, vt)

  b, t, n, h = q.shape
  q = q.transpose(0, 2, 1, 3)
  if not query_chunk or t <= query_chunk or t % query_chunk:
    return dense(q).transpose(0, 2, 1, 3)
  chunks = q.reshape(b, n, t // query_chunk, query_chunk, h).transpose(2, 0, 1, 3, 4)
  out = jax.lax.map(jax.checkpoint(dense), chunks)  # (chunks, batch, heads, chunk, head_dim)
  return out.transpose(1, 0, 3, 2, 4).reshape(b, t, n, h)


# -------------------------------------------------------------------------------------------------
# Splash attention: the Pallas TPU kernel (jax.experimental.pallas.ops.tpu) that computes softmax
# attention block by block (flash attention) without holding the (queries x keys) logits.

ATTN_KERNELS = ("xla", "splash")
SPLASH_BLOCK = 512        # query/key block of the kernel (a multiple of 128, dividing the length)
SPLASH_MIN_TOKENS = 512   # shorter self-attention stays dense: its logits are small
_INTERPRET: list[bool] = []
_KERNEL_FLOPS: list[list[float]] = []


@contextlib.contextmanager
def splash_interpret():
  """Runs splash attention in Pallas' interpreter off TPU (tests: the kernel's own code on CPU)
  instead of falling back to the XLA path."""
  _INTERPRET.append(True)
  try:
    yield
  finally:
    _INTERPRET.pop()


@contextlib.contextmanager
def counting_kernel_flops():
  """Collects the forward FLOPs of the attention kernels traced in the block (``[total]``): XLA's
  ``cost_analysis`` does not see inside a Pallas call, so a plan adds these (dense-equivalent:
  ``4 t^2 h`` per head and example, as XLA counts dense attention)."""
  box = [0.0]
  _KERNEL_FLOPS.append(box)
  try:
    yield box
  finally:
    _KERNEL_FLOPS.pop()


def splash_block(length: int) -> int:
  """The kernel's block for ``length`` tokens, 0 when splash does not apply (fewer than
  :data:`SPLASH_MIN_TOKENS`, or no multiple of 128 up to :data:`SPLASH_BLOCK` divides it)."""
  if length < SPLASH_MIN_TOKENS:
    return 0
  return next((b for b in range(SPLASH_BLOCK, 0, -128) if length % b == 0), 0)


def uses_splash(kernel: str, length: int) -> bool:
  """Whether :class:`Attention` with ``kernel`` runs the Pallas kernel at ``length`` tokens: on TPU
  (or in :func:`splash_interpret`), for self-attention with a :func:`splash_block`."""
  return (kernel == "splash" and bool(splash_block(length))
          and (target_backend() == "tpu" or bool(_INTERPRET)))


def splash_attention(q, k, v, interpret: bool = False):
  """:func:`attention` (no chunking) by the splash kernel: ``(batch, length, heads, head_dim)``
  self-attention, softmax in f32 inside the kernel. Under a mesh (``jax.set_mesh``) it runs per
  shard (``shard_map``): batch over the mesh axes the logical rules give ``batch``, heads over
  those of ``heads``, where they divide; a Pallas call is not partitioned by XLA itself."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, t, n, h = q.shape
  block = splash_block(t)
  if not block or k.shape[1] != t:
    raise ValueError(f"splash attention needs self-attention over a multiple of 128 tokens "
                     f">= {SPLASH_MIN_TOKENS}, got {t} queries and {k.shape[1]} keys")
  if _KERNEL_FLOPS:
    _KERNEL_FLOPS[-1][0] += 4.0 * b * n * t * t * h
  sizes = dict.fromkeys(("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq",
                         "block_kv_dq"), block)
  scale = h ** -0.5

  def local(q, k, v):  # one shard: (b', t, n', h)
    heads = q.shape[2]
    kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.FullMask((t, t))] * heads), head_shards=1,
                                q_seq_shards=1, block_sizes=sa.BlockSizes(**sizes),
                                interpret=interpret)
    tr = lambda a: a.transpose(0, 2, 1, 3)
    out = jax.vmap(kernel)(tr(q * jnp.asarray(scale, q.dtype)), tr(k), tr(v))
    return tr(out)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v)
  spec = nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH, sh.HEADS, None))
  spec = sh.fit_spec(spec, q.shape, mesh)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


class Attention(nn.Module):
  """Multi-head attention with bias-free q/k/v and a biased output projection (``to_out.0``).

  ``query_chunk``: as ``model.attn_query_chunk`` (see :func:`query_chunk_for`). ``kernel``: as
  ``model.attn_kernel``: ``"xla"``, or ``"splash"`` (the Pallas TPU kernel for self-attention
  where :func:`uses_splash`; elsewhere the XLA path, the same values)."""
  heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  query_chunk: int = 0
  kernel: str = "xla"

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
    if context is x and uses_splash(self.kernel, x.shape[1]):
      out = splash_attention(split(q), split(k), split(v),
                             interpret=target_backend() != "tpu")
    else:
      out = attention(split(q), split(k), split(v),
                      query_chunk_for(self.query_chunk, x.shape[1]))
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
