"""Evaluation over the local devices: batch-parallel networks and FSDP-sharded generators.

Evaluation networks (the FID InceptionV3, CLIP towers) are small next to their inputs, so
:class:`BatchMapper` replicates their parameters and every device takes a slice of each batch on a
``data`` axis. The generator being evaluated need not fit one device (a width-768 UNet's f32 EMA
is 19.6 GB, a v5e chip has 16 GB): :func:`model_mesh` is the trainer's ``(data, fsdp, tensor)``
mesh over the local devices with every device on ``fsdp``, and :func:`place` puts a parameter tree
onto the shardings the project's logical-axis rules give it there (``sharding.tree_shardings``:
each weight split along its input features), optionally cast to ``bfloat16`` first. Inside the
jitted sampler XLA gathers each layer's weights when it runs; batch rows are split over the same
devices. The same code runs on one CPU, on 8 fake CPU devices and on every local chip of a TPU
host. On a multi-host slice each process works on its own cells with its own devices (the meshes
hold only addressable devices); the eval grid splits the cells between processes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError

DATA_AXIS = "data"
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all local devices; an int: the first
  that many local devices)."""
  return Mesh(np.asarray(_local(devices)), (DATA_AXIS,))


def _local(devices) -> list:
  local = jax.local_devices()
  if devices is None:
    return local
  if isinstance(devices, int):
    if not 1 <= devices <= len(local):
      raise ValueError(f"asked for {devices} devices but this process has {len(local)} "
                       f"({local[0].platform}); pass a count between 1 and {len(local)}")
    return local[:devices]
  return list(devices)


def model_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
  """The trainer's ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all local devices;
  an int: the first that many) with every device on ``fsdp``: parameters split FSDP-style by
  ``sharding.LOGICAL_RULES``, batch rows over ``data x fsdp`` (``sharding.batch_sharding``)."""
  return sh.make_mesh(dict(data=1, fsdp=-1, tensor=1), _local(devices))


def param_dtype(name: str):
  """``eval.param_dtype`` -> a dtype: the one floating parameters are stored in while sampling."""
  if name not in PARAM_DTYPES:
    raise ConfigError(f"eval.param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {name!r}")
  return PARAM_DTYPES[name]


def place(tree: Any, shardings: Any, dtype=None) -> Any:
  """``tree`` (on the host, one device, or sharded otherwise) onto ``shardings`` leaf by leaf,
  floating leaves cast to ``dtype`` first. Leaves go through host memory (numpy: no per-shape
  resharding program to compile, and a bf16 tree never exists in f32 on the devices); each device
  receives only its shards. A leaf already placed so is kept as it is."""
  def one(x, sharding):
    cast = (dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
            and np.dtype(x.dtype) != np.dtype(dtype))
    if (not cast and isinstance(x, jax.Array)
        and x.sharding.is_equivalent_to(sharding, x.ndim)):
      return x
    x = np.asarray(x)
    return jax.device_put(x.astype(dtype) if cast else x, sharding)
  return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree: Any) -> dict:
  """``{device: bytes of the tree's shards it holds}`` (what sharding saved, measured)."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


class BatchMapper:
  """Applies ``fn(params, *arrays) -> array(s)`` to arrays of any length, ``batch_size`` rows per
  call, rows sharded over the mesh's ``data`` axis, parameters replicated.

  Every call sees the same padded shape (``batch_size`` rounded up to a multiple of the device
  count), so it compiles once per input shape; padded rows are dropped from the results. ``fn``
  runs under ``jax.shard_map``: each device applies it to its own rows (so ``fn`` must treat rows
  independently, and may slice its batch without cross-device traffic).
  """

  def __init__(self, fn: Callable[..., Any], params: Any, batch_size: int,
               mesh: Mesh | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.mesh = mesh or data_mesh()
    n_dev = self.mesh.devices.size
    self.batch_size = -(-batch_size // n_dev) * n_dev
    self._rows = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    replicated = NamedSharding(self.mesh, P())
    self.params = jax.device_put(params, replicated)
    self._fn = jax.jit(self._per_device(fn), out_shardings=self._rows)

  def _per_device(self, fn):
    rows = P(tuple(self.mesh.axis_names))

    def mapped(params, *arrays):
      in_specs = (P(),) + (rows,) * len(arrays)
      return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=rows)(params, *arrays)
    return mapped

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  def _call(self, arrays: Sequence[np.ndarray]):
    n = len(arrays[0])
    pad = self.batch_size - n
    padded = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
              for a in arrays]
    return self._fn(self.params, *[jax.device_put(a, self._rows) for a in padded]), n

  def map_batches(self, batches: Iterable[Sequence[np.ndarray]]) -> Iterator[Any]:
    """Yields host results per input batch (each at most ``batch_size`` rows), one batch ahead:
    the next batch is dispatched before the previous result is fetched."""
    pending = None
    for arrays in batches:
      arrays = [np.asarray(a) for a in arrays]
      if not 1 <= len(arrays[0]) <= self.batch_size:
        raise ValueError(f"a batch of {len(arrays[0])} rows; expected 1..{self.batch_size}")
      current = self._call(arrays)
      if pending is not None:
        yield _fetch(*pending)
      pending = current
    if pending is not None:
      yield _fetch(*pending)

  def __call__(self, *arrays: np.ndarray) -> Any:
    """All rows of ``arrays`` (same length) -> the results stacked in order."""
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
      raise ValueError(f"arrays of different lengths {[len(a) for a in arrays]}")
    chunks = ([a[i:i + self.batch_size] for a in arrays] for i in range(0, n, self.batch_size))
    results = list(self.map_batches(chunks))
    if not results:
      raise ValueError("no rows to evaluate")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *results)


def _fetch(out, n):
  return jax.tree.map(lambda x: np.asarray(x)[:n], out)
