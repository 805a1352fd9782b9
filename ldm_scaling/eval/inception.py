"""The FID InceptionV3 in Flax: pytorch-fid's ``FIDInceptionV3`` up to the 2048-d pool features.

Topology and names follow pytorch-fid (``torchvision``'s ``Inception3`` with the FID patches), so the
official ``pt_inception-2015-12-05`` state dict maps onto these parameters by renaming alone
(``eval.fid_weights``):

- ``FIDInceptionA/C/E_1``: the pool branch averages over a 3x3 window *without* the zero padding
  (``count_include_pad=False``, TensorFlow's average pool);
- ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch is a 3x3 *max* pool (stride 1, padding 1);
- every ``BasicConv2d`` is a bias-free conv, BatchNorm (eps 1e-3, running statistics) and ReLU.
  The BatchNorm is folded into the conv's kernel and bias inside the forward pass (one fused op
  instead of three; equal up to float rounding).

Input: NHWC float in [-1, 1], 299x299 (see :func:`preprocess`). Output: (N, 2048) float32.
Convolutions run at ``Precision.HIGHEST`` so TPUs compute them in f32 as the FID definition does.

Two layout choices that change speed, not results (``benchmarks/fid_features.py``): 1x1
convolutions are written as matrix products (XLA:CPU runs them 2-2.7x faster than as
convolutions), and ``per_example_convs=True`` (what :class:`~ldm_scaling.eval.fid.FeatureExtractor`
picks on CPU) runs the spatial convolutions at resolutions >= 35 one image at a time: XLA:CPU's
convolution kernel is 3-4x faster per image at batch 1 than at batch 32 for these shapes
(measured on a 2-core AVX-512 machine: 149x149 32->32 3x3, 3.3 vs 14.1 ms/image). TPUs and GPUs
want the batched form, which is the default.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_scaling import sharding as sh

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (inference statistics) + ReLU, as torchvision's BasicConv2d.

  Parameters: ``kernel`` (kh, kw, in, out) and the BatchNorm's ``bn_scale``, ``bn_bias``,
  ``bn_mean``, ``bn_var``.
  """
  features: int
  kernel_size: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST
  per_example: bool = False

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    part = lambda init, names: nn.with_logical_partitioning(init, names)
    kernel = self.param("kernel", part(nn.initializers.lecun_normal(),
                                       (sh.KERNEL_H, sh.KERNEL_W, sh.EMBED, sh.MLP)),
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    vec = lambda name, init: self.param(name, part(init, (sh.NORM,)), (self.features,),
                                        jnp.float32)
    scale = vec("bn_scale", nn.initializers.ones_init())
    bias = vec("bn_bias", nn.initializers.zeros_init())
    mean = vec("bn_mean", nn.initializers.zeros_init())
    var = vec("bn_var", nn.initializers.ones_init())
    inv = scale * jax.lax.rsqrt(var + BN_EPS)
    w = kernel * inv
    if (kh, kw) == (1, 1) and self.stride == 1 and self.padding == (0, 0):
      y = jnp.einsum("nhwc,cd->nhwd", x, w[0, 0], precision=self.precision)
    else:
      ph, pw = self.padding
      conv = lambda v: jax.lax.conv_general_dilated(
          v, w, window_strides=(self.stride, self.stride),
          padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=self.precision)
      y = _per_example(conv, x) if self.per_example and x.shape[1] >= 35 else conv(x)
    return jax.nn.relu(y + (bias - mean * inv))


_UNROLL = 64


def _per_example(fn, x):
  """``fn`` applied to one example at a time (unrolled; in chunks of ``_UNROLL`` under a loop for
  bigger batches), results stacked: the same values as ``fn(x)``."""
  n = x.shape[0]
  unrolled = lambda v: jnp.concatenate([fn(v[i:i + 1]) for i in range(v.shape[0])])
  if n <= _UNROLL:
    return unrolled(x)
  chunk = next(d for d in range(_UNROLL, 0, -1) if n % d == 0)
  y = jax.lax.map(unrolled, x.reshape((n // chunk, chunk) + x.shape[1:]))
  return y.reshape((n,) + y.shape[2:])


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST
  per_example_convs: bool = False

  def conv(self, features, kernel_size, name, stride=1, padding=None):
    if padding is None:  # "same" for stride 1, valid for stride 2
      padding = (0, 0) if stride > 1 else (kernel_size[0] // 2, kernel_size[1] // 2)
    return BasicConv2d(features, kernel_size, stride, padding, self.precision,
                       self.per_example_convs, name=name)


class InceptionA(_Block):
  """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(64, (1, 1), "branch1x1")(x)
    b5 = self.conv(48, (1, 1), "branch5x5_1")(x)
    b5 = self.conv(64, (5, 5), "branch5x5_2")(b5)
    b3 = self.conv(64, (1, 1), "branch3x3dbl_1")(x)
    b3 = self.conv(96, (3, 3), "branch3x3dbl_2")(b3)
    b3 = self.conv(96, (3, 3), "branch3x3dbl_3")(b3)
    bp = self.conv(self.pool_features, (1, 1), "branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a: grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(384, (3, 3), "branch3x3", stride=2)(x)
    bd = self.conv(64, (1, 1), "branch3x3dbl_1")(x)
    bd = self.conv(96, (3, 3), "branch3x3dbl_2")(bd)
    bd = self.conv(96, (3, 3), "branch3x3dbl_3", stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b..6e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv(192, (1, 1), "branch1x1")(x)
    b7 = self.conv(c7, (1, 1), "branch7x7_1")(x)
    b7 = self.conv(c7, (1, 7), "branch7x7_2")(b7)
    b7 = self.conv(192, (7, 1), "branch7x7_3")(b7)
    bd = self.conv(c7, (1, 1), "branch7x7dbl_1")(x)
    bd = self.conv(c7, (7, 1), "branch7x7dbl_2")(bd)
    bd = self.conv(c7, (1, 7), "branch7x7dbl_3")(bd)
    bd = self.conv(c7, (7, 1), "branch7x7dbl_4")(bd)
    bd = self.conv(192, (1, 7), "branch7x7dbl_5")(bd)
    bp = self.conv(192, (1, 1), "branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(192, (1, 1), "branch3x3_1")(x)
    b3 = self.conv(320, (3, 3), "branch3x3_2", stride=2)(b3)
    b7 = self.conv(192, (1, 1), "branch7x7x3_1")(x)
    b7 = self.conv(192, (1, 7), "branch7x7x3_2")(b7)
    b7 = self.conv(192, (7, 1), "branch7x7x3_3")(b7)
    b7 = self.conv(192, (3, 3), "branch7x7x3_4", stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (``pool="avg"``, FIDInceptionE_1) and Mixed_7c (``pool="max"``, FIDInceptionE_2)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(320, (1, 1), "branch1x1")(x)
    b3 = self.conv(384, (1, 1), "branch3x3_1")(x)
    b3 = jnp.concatenate([self.conv(384, (1, 3), "branch3x3_2a")(b3),
                          self.conv(384, (3, 1), "branch3x3_2b")(b3)], axis=-1)
    bd = self.conv(448, (1, 1), "branch3x3dbl_1")(x)
    bd = self.conv(384, (3, 3), "branch3x3dbl_2")(bd)
    bd = jnp.concatenate([self.conv(384, (1, 3), "branch3x3dbl_3a")(bd),
                          self.conv(384, (3, 1), "branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.conv(192, (1, 1), "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3 up to the final average pool: (N, 299, 299, 3) in [-1, 1] -> (N, 2048).

  ``per_example_convs``: the CPU layout described in the module docstring (same values)."""
  precision: Any = jax.lax.Precision.HIGHEST
  per_example_convs: bool = False

  @nn.compact
  def __call__(self, x):
    kw = dict(precision=self.precision, per_example_convs=self.per_example_convs)
    conv = lambda f, k, name, stride=1, pad=(0, 0): BasicConv2d(
        f, k, stride, pad, self.precision, self.per_example_convs, name=name)
    x = conv(32, (3, 3), "Conv2d_1a_3x3", stride=2)(x)
    x = conv(32, (3, 3), "Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), "Conv2d_2b_3x3", pad=(1, 1))(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), "Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), "Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)
    x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
    x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
    return jnp.mean(x, axis=(1, 2))


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """pytorch-fid's input pipeline: [0, 255] uint8 (or [0, 1] float) NHWC -> [-1, 1] at size^2.

  As pytorch-fid: scale to [0, 1] (``ToTensor``), resize bilinearly (``F.interpolate(...,
  mode="bilinear", align_corners=False)``: half-pixel centres, no antialiasing, edges clamped —
  which is ``jax.image.resize(method="linear", antialias=False)``), then ``2 x - 1``.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {images.shape}")
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  n, h, w, c = x.shape
  if (h, w) != (size, size):
    x = jax.image.resize(x, (n, size, size, c), method="linear", antialias=False)
  return 2.0 * x - 1.0


def param_shapes() -> dict:
  """Abstract parameter tree (no compute): what the weight loaders must produce."""
  model = InceptionV3()
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return sh.unbox(shapes)["params"]


def conv_names() -> Sequence[str]:
  """Every BasicConv2d path as ``"Mixed_5b/branch1x1"`` (sorted)."""
  flat = flax.traverse_util.flatten_dict(param_shapes())
  return list(dict.fromkeys("/".join(k[:-1]) for k in flat))
