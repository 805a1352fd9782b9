"""Batch-parallel evaluation over devices: one jitted function, the batch split on a ``data`` axis.

Evaluation networks (the FID InceptionV3, CLIP towers) are small next to their inputs, so
parameters are replicated and every device takes a slice of each batch. The same code runs on one
CPU, on 8 fake CPU devices and on every local chip of a TPU host. On a multi-host slice each
process maps its own images over its local devices (the mesh holds only addressable devices);
gathering per-host results is the caller's step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all local devices; an int: the first
  that many local devices)."""
  local = jax.local_devices()
  if devices is None:
    devices = local
  elif isinstance(devices, int):
    if not 1 <= devices <= len(local):
      raise ValueError(f"asked for {devices} devices but this process has {len(local)} "
                       f"({local[0].platform}); pass a count between 1 and {len(local)}")
    devices = local[:devices]
  return Mesh(np.asarray(list(devices)), (DATA_AXIS,))


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
