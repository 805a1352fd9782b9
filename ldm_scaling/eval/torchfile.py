"""Tensors out of PyTorch files, without PyTorch and without running pickle code.

Two layouts are read:

- the zip layout of ``torch.save`` (PyTorch >= 1.6) and of TorchScript ``torch.jit.save``: a zip
  holding ``<prefix>/data.pkl`` (the object graph) and ``<prefix>/data/<key>`` (raw storage bytes);
- the legacy layout of ``torch.save(..., _use_new_zipfile_serialization=False)`` (PyTorch < 1.6):
  consecutive pickles (magic number, protocol, system info, object graph, storage keys) followed by
  each storage's bytes.

The object graph is unpickled by :class:`SafeUnpickler`, whose ``find_class`` resolves only an
explicit allow-list: tensor rebuild records (turned into numpy arrays), storage dtype markers,
``collections.OrderedDict``, TorchScript list builders, and TorchScript module classes
(``__torch__.*``), which become inert :class:`ScriptObject` records of their attributes. Any other
global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError` before it is
called, so a malicious file cannot execute code.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

from ldm_scaling.errors import UserError


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle that references a global outside the allow-list (it would run code to load)."""


class TorchFileError(UserError, ValueError):
  """A file that is not a readable PyTorch checkpoint."""


# Storage class names (as pickled: ``torch.FloatStorage``) -> numpy dtype.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _Storage:
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None  # 1-D, filled once the bytes are read


@dataclasses.dataclass
class _TensorRef:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def materialise(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise TorchFileError(f"storage {self.storage.key!r} has no data in the file")
    if not self.shape:
      return np.array(data[self.offset])
    needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
    if min(self.shape) > 0 and needed > data.size:
      raise TorchFileError(f"tensor view {self.shape} runs past its storage {self.storage.key!r}")
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.shape, strides=[s * itemsize for s in self.stride],
        writeable=False)
    return np.array(view)  # a contiguous copy that owns its memory


class ScriptObject:
  """An inert record of a TorchScript module (``__torch__.<qualname>``): its pickled attributes."""
  qualname = "?"

  def __setstate__(self, state):
    self.attrs = dict(state) if isinstance(state, dict) else {"state": state}

  def __repr__(self) -> str:
    return f"ScriptObject({self.qualname})"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
  if qualname not in _SCRIPT_CLASSES:
    _SCRIPT_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (ScriptObject,),
                                     {"qualname": qualname})
  return _SCRIPT_CLASSES[qualname]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise TorchFileError("tensor record without a storage reference")
  return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                    tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class SafeUnpickler(pickle.Unpickler):
  """Unpickles a PyTorch object graph through an allow-list; see the module docstring."""

  def __init__(self, file: BinaryIO, source: str = "<pickle>"):
    super().__init__(file)
    self.source = source
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if module.startswith("__torch__.") or module == "__torch__":
      return _script_class(f"{module}.{name}")
    raise UnsafePickleError(
        f"{self.source}: refusing to load global {module}.{name}: only tensors, dicts and "
        f"TorchScript module records are read from weight files (loading this would run code "
        f"from the file). Use the weights from their official source.")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise TorchFileError(f"{self.source}: unsupported persistent id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"{self.source}: storage of unsupported type {storage_type!r}")
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
    storage = self.storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # legacy views: (view_key, offset, size) into the root storage
      raise TorchFileError(f"{self.source}: legacy storage views are not supported")
    return storage


def _materialise(obj: Any) -> Any:
  """Replaces every tensor record in a nested structure by its numpy array."""
  if isinstance(obj, _TensorRef):
    return obj.materialise()
  if isinstance(obj, ScriptObject):
    obj.attrs = {k: _materialise(v) for k, v in getattr(obj, "attrs", {}).items()}
    return obj
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialise(v)
    return out
  if isinstance(obj, list):
    return [_materialise(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialise(v) for v in obj)
  return obj


def _read_zip(zf: zipfile.ZipFile, source: str) -> Any:
  pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise TorchFileError(f"{source}: a zip without exactly one <prefix>/data.pkl is not a "
                         f"PyTorch checkpoint")
  prefix = pickles[0][:-len("data.pkl")]
  order = "<"
  if prefix + "byteorder" in zf.namelist():
    order = ">" if zf.read(prefix + "byteorder").strip() == b"big" else "<"
  unpickler = SafeUnpickler(io.BytesIO(zf.read(pickles[0])), source)
  obj = unpickler.load()
  for key, storage in unpickler.storages.items():
    try:
      raw = zf.read(f"{prefix}data/{key}")
    except KeyError:
      raise TorchFileError(f"{source}: storage {key!r} is missing from the zip") from None
    storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder(order),
                                 count=storage.numel).astype(storage.dtype, copy=False)
  return _materialise(obj)


def _read_legacy(f: BinaryIO, source: str) -> Any:
  def plain_load():
    return SafeUnpickler(f, source).load()

  try:
    magic = plain_load()
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise TorchFileError(f"{source}: not a PyTorch checkpoint ({e})") from None
  if magic != _LEGACY_MAGIC:
    raise TorchFileError(f"{source}: not a PyTorch checkpoint (bad magic number)")
  protocol = plain_load()
  if protocol != _LEGACY_PROTOCOL:
    raise TorchFileError(f"{source}: unsupported legacy protocol {protocol!r}")
  sys_info = plain_load()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise TorchFileError(f"{source}: big-endian legacy checkpoints are not supported")
  unpickler = SafeUnpickler(f, source)
  obj = unpickler.load()
  keys = plain_load()
  for key in keys:
    storage = unpickler.storages[str(key)]
    (numel,) = struct.unpack("<q", f.read(8))
    raw = f.read(numel * storage.dtype.itemsize)
    if len(raw) != numel * storage.dtype.itemsize:
      raise TorchFileError(f"{source}: truncated storage {key!r}")
    storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<")).astype(
        storage.dtype, copy=False)
  return _materialise(obj)


def load(path_or_bytes: str | os.PathLike | bytes, source: str | None = None) -> Any:
  """Reads a ``torch.save`` / ``torch.jit.save`` file into plain Python + numpy objects.

  Tensors become numpy arrays; state dicts stay (Ordered)dicts; TorchScript modules become
  :class:`ScriptObject` records (``.attrs``: submodules and parameters by name).
  """
  if isinstance(path_or_bytes, (bytes, bytearray)):
    f: BinaryIO = io.BytesIO(path_or_bytes)
    source = source or "<bytes>"
  else:
    source = source or os.fspath(path_or_bytes)
    if not os.path.isfile(path_or_bytes):
      raise FileNotFoundError(f"weights file {source!r} not found")
    f = open(path_or_bytes, "rb")
  with f:
    if zipfile.is_zipfile(f):
      f.seek(0)
      with zipfile.ZipFile(f) as zf:
        return _read_zip(zf, source)
    f.seek(0)
    return _read_legacy(f, source)


def named_tensors(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Flattens a state dict or TorchScript module record into ``{"a.b.weight": array}``."""
  out: dict[str, np.ndarray] = {}
  items = obj.attrs.items() if isinstance(obj, ScriptObject) else (
      obj.items() if isinstance(obj, dict) else ())
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[name] = value
    elif isinstance(value, (dict, ScriptObject)):
      out.update(named_tensors(value, name + "."))
  return out
