"""Logical axis names and the one table that maps them onto mesh axes.

Models annotate parameters (and a few activations) with the logical names below only; nothing in a
model mentions a mesh axis. ``LOGICAL_RULES`` maps each name onto the mesh axes ``data``, ``fsdp``
and ``tensor``: parameters are split over ``fsdp`` along their input features and over ``tensor``
along their output features (heads / hidden units); batches over ``data`` x ``fsdp``. The same
rules serve 1 CPU, 8 fake devices and a TPU pod slice: a mesh axis of size 1 shards nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from ldm_scaling.errors import ConfigError

# Parameter axes.
EMBED = "embed"          # input features of a dense/conv layer
MLP = "mlp"              # output features (hidden units, GEGLU width, conv filters)
HEADS = "heads"          # attention projections: heads x head_dim, flattened
CONTEXT = "context"      # text-embedding features entering cross-attention
NORM = "norm"            # GroupNorm/LayerNorm scale and bias
KERNEL_H = "kernel_h"    # spatial taps of a convolution (rows)
KERNEL_W = "kernel_w"    # (columns)

# Activation axes.
BATCH = "batch"
LENGTH = "length"        # tokens (H*W or text)
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (CONTEXT, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (NORM, None),
    (KERNEL_H, None),
    (KERNEL_W, None),
    (LENGTH, None),
    (HEIGHT, None),
    (WIDTH, None),
    (CHANNELS, None),
)


# -------------------------------------------------------------------------------------------------
# Meshes and shardings.


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """``{"data": -1, "fsdp": 2, "tensor": 1}`` -> concrete sizes for ``num_devices`` devices."""
  sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1 (fill), got {sizes}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
  fixed = 1
  for a, s in sizes.items():
    if s != -1:
      fixed *= s
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {sizes} does not fit {num_devices} devices: the fixed axes "
                        f"({fixed} devices) must divide the device count")
    sizes[free[0]] = num_devices // fixed
  total = 1
  for s in sizes.values():
    total *= s
  if total != num_devices:
    raise ConfigError(f"mesh {sizes} needs {total} devices but {num_devices} are available; set "
                      f"one axis to -1 (e.g. --config.mesh.data=-1) or change the sizes")
  return sizes


def make_mesh(mesh_cfg, devices=None):
  """A ``jax.sharding.Mesh`` with axes (data, fsdp, tensor), Auto axis types (jit-propagated
  shardings, the modern form of pjit). ``jax.make_mesh`` orders devices along the TPU topology."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def fit_spec(spec, shape, mesh):
  """Drops mesh axes that do not divide a dimension (that dimension is then replicated), so any
  width runs on any mesh; the big, divisible weights stay sharded."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for n in names:
      size *= mesh.shape[n]
    out.append(axes if names and dim % size == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def unbox(tree):
  """Strips flax's logical-axis boxes without adding sharding constraints (placement is decided
  by ``tree_shardings``, which also handles dimensions a mesh axis does not divide)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def replace_values(boxed, values):
  """``boxed`` (a tree with logical-axis boxes) holding ``values`` (the same tree, unboxed) instead:
  keeps the axis names, so the new values shard like the old. Shapes must match."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  def put(old, new):
    old_value = old.unbox(apply_constraint=False) if is_box(old) else old
    if old_value.shape != new.shape:
      raise ValueError(f"shape {new.shape} does not fit a parameter of shape {old_value.shape}")
    new = new.astype(old_value.dtype)
    return old.replace_boxed(new) if is_box(old) else new
  return jax.tree.map(put, boxed, values, is_leaf=is_box)


def tree_shardings(abstract_boxed, mesh, rules=LOGICAL_RULES):
  """NamedShardings for a (possibly boxed) abstract tree: logical names -> mesh axes by ``rules``,
  unannotated leaves replicated, non-dividing axes dropped."""
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = unbox(abstract_boxed)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  return jax.tree.map(
      lambda spec, leaf: jax.sharding.NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
      mesh_specs, shapes, is_leaf=is_spec)


def frozen_shardings(tree, mesh, rules=LOGICAL_RULES):
  """Shardings of a frozen network's parameters (a teacher, the VAE, a text tower), so a large one
  is not replicated on every chip: leaves with logical axis names follow ``rules`` like trainable
  parameters; an unannotated leaf of two or more dimensions (e.g. a transformers model) is split
  over ``fsdp`` along its largest dimension that ``fsdp`` divides; the rest is replicated."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  annotated = tree_shardings(tree, mesh, rules)
  fsdp = mesh.shape["fsdp"]

  def one(leaf, sharding):
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)  # arrays or abstract
    if is_box(leaf) or len(shape) < 2 or fsdp == 1:
      return sharding
    dims = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if not dims:
      return sharding
    d = max(dims, key=lambda i: shape[i])
    return jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*["fsdp" if i == d else None for i in range(len(shape))]))
  return jax.tree.map(one, tree, annotated, is_leaf=is_box)


def batch_sharding(mesh, ndim: int = 1):
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
