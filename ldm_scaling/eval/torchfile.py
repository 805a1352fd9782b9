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

A crafted file cannot make the reader touch memory outside what it read, nor allocate much more
than its own size, nor spin:

- every tensor view is checked before numpy sees it: offset, sizes and strides are non-negative
  integers, at most ``MAX_NDIM`` dimensions, and the last element it reaches lies inside its
  storage; tensor and storage records are immutable tuples, so a later BUILD cannot undo that;
- the elements all views materialise are capped (:class:`_Budget`: twice the stored bytes plus
  ``VIEW_ALLOWANCE_BYTES``), so zero strides cannot turn a few bytes into gigabytes;
- zip members must be stored uncompressed (as torch writes them; refused from the header, before
  inflating), each storage member must hold exactly ``numel x itemsize`` bytes, and the storages
  together no more than the file;
- the object graph is walked once per object (:class:`_Materialiser`), so shared references
  ("billion laughs") cost their pickle size, and nesting deeper than ``MAX_DEPTH`` (or a cycle) is
  refused;
- any parse failure becomes a :class:`TorchFileError` naming the file and what is wrong.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ldm_scaling.errors import UserError


class TorchFileError(UserError, ValueError):
  """A file that is not a readable PyTorch checkpoint (corrupt, truncated or crafted)."""


class UnsafePickleError(TorchFileError, pickle.UnpicklingError):
  """A pickle that references a global outside the allow-list (it would run code to load)."""


class _Malformed(Exception):
  """A structural problem found while parsing; :func:`load` turns it into a
  :class:`TorchFileError` that names the file (callbacks deep in the unpickler do not know it)."""


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

MAX_NDIM = 32                    # dimensions of one tensor view (numpy's historical limit)
MAX_DEPTH = 64                   # nesting of containers in the object graph; deeper is refused
VIEW_ALLOWANCE_BYTES = 64 << 20  # what views may materialise beyond twice the stored bytes

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ADVICE = ("the file is corrupt, truncated or not a PyTorch checkpoint: use the weights from their "
           "official source (download them again)")
# What parsing a hostile byte string can raise from pickle, zipfile, struct and numpy.
_PARSE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                 AttributeError, OverflowError, struct.error, zipfile.BadZipFile, RecursionError)


class _StorageType(NamedTuple):
  """``torch.FloatStorage`` & co. as pickled: the dtype marker of a storage record."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(STORAGE_DTYPES[self.name])


class _Storage(NamedTuple):
  """A storage record. Immutable (a tuple has no ``__dict__``), so a pickle cannot BUILD new
  fields into it after the checks; its bytes live in the reader's ``arrays`` by key."""
  key: str
  dtype: np.dtype
  numel: int

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


def _index(value: Any, what: str) -> int:
  """A non-negative int from the pickle: offsets, sizes and strides reach numpy's pointer
  arithmetic, so a negative or non-integer one is refused here."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise _Malformed(f"{what} {value!r:.60} is not a non-negative integer")
  return value


def _indices(values: Any, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or len(values) > MAX_NDIM:
    raise _Malformed(f"{what} {values!r:.80} is not a sequence of at most {MAX_NDIM} integers")
  return tuple(_index(v, what) for v in values)


class _TensorRef(NamedTuple):
  """A tensor record: a strided view into a storage, bounds-checked when it is built. Immutable
  like :class:`_Storage`: a pickle's BUILD opcode cannot change its offset or strides later."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def numel(self) -> int:
    return math.prod(self.shape)

  @property
  def extent(self) -> int:
    """Storage elements the view needs: one past the last element it reaches (0 when empty)."""
    if self.numel == 0:
      return 0
    return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

  def describe(self) -> str:
    return (f"tensor view (offset {self.offset}, shape {self.shape}, stride {self.stride}) of "
            f"storage {self.storage.key!r} ({self.storage.numel} elements)")


class _Budget:
  """Bytes the tensors of one file may take once materialised: twice what the file stores plus a
  fixed allowance. Legitimate views (slices, transposes, tied weights) stay within it; zero strides
  or many overlapping views that would turn a small file into gigabytes do not."""

  def __init__(self, stored_bytes: int):
    self.left = 2 * stored_bytes + VIEW_ALLOWANCE_BYTES

  def spend(self, nbytes: int, ref: _TensorRef) -> None:
    if nbytes > self.left:
      raise _Malformed(f"{ref.describe()} would materialise {nbytes} bytes, more than the file's "
                       f"tensors may take ({self.left} left: twice the stored bytes + "
                       f"{VIEW_ALLOWANCE_BYTES})")
    self.left -= nbytes


def _array(ref: _TensorRef, data: np.ndarray | None, budget: _Budget) -> np.ndarray:
  """The view of ``data`` (its storage's elements) as a contiguous array that owns its memory;
  as_strided only sees bounds checked against the array itself."""
  if data is None:
    raise _Malformed(f"storage {ref.storage.key!r} has no data in the file")
  if data.size != ref.storage.numel or ref.extent > data.size:
    raise _Malformed(f"{ref.describe()} runs past the {data.size} elements read")
  budget.spend(ref.numel * data.dtype.itemsize, ref)
  if ref.numel == 0:
    return np.empty(ref.shape, data.dtype)
  # A dimension of size 1 never steps, so its stride (unbounded by the extent check) is not used.
  strides = [s * data.dtype.itemsize if n > 1 else 0 for n, s in zip(ref.shape, ref.stride)]
  view = np.lib.stride_tricks.as_strided(data[ref.offset:], shape=ref.shape, strides=strides,
                                         writeable=False)
  return np.array(view, order="C")


class ScriptObject:
  """An inert record of a TorchScript module (``__torch__.<qualname>``): its pickled attributes."""
  qualname = "?"

  def __setstate__(self, state):
    self.attrs = dict(state) if isinstance(state, dict) else {"state": state}

  def __repr__(self) -> str:
    return f"ScriptObject({self.qualname})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise _Malformed("tensor record without a storage reference")
  ref = _TensorRef(storage, _index(storage_offset, "storage offset"), _indices(size, "size"),
                   _indices(stride, "stride"))
  if len(ref.shape) != len(ref.stride):
    raise _Malformed(f"{ref.describe()}: sizes and strides differ in length")
  if ref.extent > storage.numel:
    raise _Malformed(f"{ref.describe()} reaches element {ref.extent}, past the storage's end")
  return ref


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
  """Unpickles a PyTorch object graph through an allow-list; see the module docstring.

  TorchScript classes are made per unpickler: nothing one file does to its classes outlives it, and
  a file's distinct class names do not accumulate in the process."""

  def __init__(self, file: BinaryIO, source: str = "<pickle>"):
    super().__init__(file)
    self.source = source
    self.storages: dict[str, _Storage] = {}
    self._script_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if module.startswith("__torch__.") or module == "__torch__":
      return self._script_class(f"{module}.{name}")
    raise UnsafePickleError(
        f"{self.source}: refusing to load global {module}.{name}: only tensors, dicts and "
        f"TorchScript module records are read from weight files (loading this would run code "
        f"from the file). Use the weights from their official source.")

  def _script_class(self, qualname: str) -> type:
    if qualname not in self._script_classes:
      self._script_classes[qualname] = type(qualname.rsplit(".", 1)[-1], (ScriptObject,),
                                            {"qualname": qualname})
    return self._script_classes[qualname]

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise _Malformed(f"unsupported persistent id {pid!r:.100}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise _Malformed(f"storage of unsupported type {storage_type!r:.60}")
    if not isinstance(key, (str, int)):
      raise _Malformed(f"storage key {key!r:.60} is not a name")
    key, numel = str(key), _index(numel, "storage size")
    storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
    if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
      raise _Malformed(f"storage {key!r} is declared twice with different types or sizes")
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # legacy views: (view_key, offset, size) into the root storage
      raise _Malformed("legacy storage views are not supported")
    return storage


_CONTAINERS = (_TensorRef, ScriptObject, dict, list, tuple)


class _Materialiser:
  """Replaces every tensor record in the unpickled object graph by its numpy array.

  Each object is converted once (memoised by identity), so a pickle whose containers share
  references -- 30 levels of lists holding the level below 10 times, a few hundred bytes -- costs
  its size, not 10**30 visits; identical views share one array. Nesting deeper than ``MAX_DEPTH``
  (which is also what a self-referencing container looks like) is refused."""

  def __init__(self, arrays: dict[str, np.ndarray], budget: _Budget):
    self.arrays = arrays
    self.budget = budget
    self.memo: dict[int, tuple[Any, Any]] = {}  # id -> (object, result): the object keeps its id
    self.views: dict[tuple, np.ndarray] = {}

  def __call__(self, obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, (_Storage, _StorageType)) or not isinstance(obj, _CONTAINERS):
      return obj
    if depth > MAX_DEPTH:
      raise _Malformed(f"the object graph nests deeper than {MAX_DEPTH} levels (or refers to "
                       f"itself)")
    hit = self.memo.get(id(obj))
    if hit is None:
      hit = self.memo[id(obj)] = (obj, self._convert(obj, depth))
    return hit[1]

  def _convert(self, obj: Any, depth: int) -> Any:
    if isinstance(obj, _TensorRef):
      key = tuple(obj)
      if key not in self.views:
        self.views[key] = _array(obj, self.arrays.get(obj.storage.key), self.budget)
      return self.views[key]
    if isinstance(obj, ScriptObject):
      obj.attrs = {k: self(v, depth + 1) for k, v in getattr(obj, "attrs", {}).items()}
      return obj
    if isinstance(obj, dict):
      out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
      for k, v in obj.items():
        out[k] = self(v, depth + 1)
      return out
    items = [self(v, depth + 1) for v in obj]
    return items if isinstance(obj, list) else tuple(items)


def _check_stored(info: zipfile.ZipInfo, archive_size: int) -> None:
  """Refuses a member from its header unless stored uncompressed (as torch writes every member):
  what a compressed member inflates to is not bounded by the file's size."""
  if info.compress_type != zipfile.ZIP_STORED:
    raise _Malformed(f"member {info.filename!r} is compressed (method {info.compress_type}); "
                     f"torch stores members uncompressed, and a compressed one can inflate to far "
                     f"more memory than the file's size")
  if info.flag_bits & 0x1:
    raise _Malformed(f"member {info.filename!r} is encrypted")
  if info.file_size != info.compress_size or info.file_size > archive_size:
    raise _Malformed(f"member {info.filename!r} declares {info.file_size} bytes "
                     f"({info.compress_size} stored) in a {archive_size}-byte file")


def _stored_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> bytes:
  _check_stored(info, archive_size)
  return zf.read(info)


def _read_zip(zf: zipfile.ZipFile, archive_size: int, source: str) -> Any:
  infos = {info.filename: info for info in zf.infolist()}
  pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise _Malformed("a zip without exactly one <prefix>/data.pkl is not a PyTorch checkpoint")
  prefix = pickles[0][:-len("data.pkl")]
  order = "<"
  if prefix + "byteorder" in infos:
    order = ">" if _stored_member(zf, infos[prefix + "byteorder"], archive_size).strip() == b"big" \
        else "<"
  unpickler = SafeUnpickler(io.BytesIO(_stored_member(zf, infos[pickles[0]], archive_size)), source)
  obj = unpickler.load()
  arrays: dict[str, np.ndarray] = {}
  stored = 0
  for key, storage in unpickler.storages.items():
    info = infos.get(f"{prefix}data/{key}")
    if info is None:
      raise _Malformed(f"storage {key!r} is missing from the zip")
    if info.file_size != storage.nbytes:
      raise _Malformed(f"storage member {info.filename!r} holds {info.file_size} bytes, but its "
                       f"record declares {storage.numel} x {storage.dtype.itemsize} = "
                       f"{storage.nbytes}")
    _check_stored(info, archive_size)
    stored += storage.nbytes
    if stored > archive_size:
      raise _Malformed(f"the storages add up to more than the file's {archive_size} bytes "
                       f"(overlapping members)")
    raw = zf.read(info)
    arrays[key] = np.frombuffer(raw, dtype=storage.dtype.newbyteorder(order)).astype(
        storage.dtype, copy=False)
  return _materialise(obj, arrays)


def _read_legacy(f: BinaryIO, size: int, source: str) -> Any:
  def plain_load():
    return SafeUnpickler(f, source).load()

  if plain_load() != _LEGACY_MAGIC:
    raise _Malformed("not a PyTorch checkpoint (bad magic number)")
  protocol = plain_load()
  if protocol != _LEGACY_PROTOCOL:
    raise _Malformed(f"unsupported legacy protocol {protocol!r:.40}")
  sys_info = plain_load()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise _Malformed("big-endian legacy checkpoints are not supported")
  unpickler = SafeUnpickler(f, source)
  obj = unpickler.load()
  keys = plain_load()
  if not isinstance(keys, list):
    raise _Malformed("the storage key list is not a list")
  arrays: dict[str, np.ndarray] = {}
  for key in keys:
    storage = unpickler.storages.get(str(key))
    if storage is None:
      raise _Malformed(f"storage {key!r:.40} is listed but no tensor refers to it")
    (numel,) = struct.unpack("<q", f.read(8))
    if numel != storage.numel:
      raise _Malformed(f"storage {key!r} holds {numel} elements, its record declares "
                       f"{storage.numel}")
    if storage.nbytes > size - f.tell():
      raise _Malformed(f"storage {key!r} needs {storage.nbytes} bytes, the file has "
                       f"{size - f.tell()} left (truncated)")
    arrays[storage.key] = np.frombuffer(f.read(storage.nbytes), dtype=storage.dtype.newbyteorder(
        "<")).astype(storage.dtype, copy=False)
  return _materialise(obj, arrays)


def _materialise(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
  return _Materialiser(arrays, _Budget(sum(a.nbytes for a in arrays.values())))(obj)


def _parse(data: bytes, source: str) -> Any:
  f = io.BytesIO(data)
  if zipfile.is_zipfile(f):
    f.seek(0)
    with zipfile.ZipFile(f) as zf:
      return _read_zip(zf, len(data), source)
  if data[:4] == b"PK\x03\x04":
    raise _Malformed("a truncated or damaged zip archive (no central directory)")
  f.seek(0)
  return _read_legacy(f, len(data), source)


def load(path_or_bytes: str | os.PathLike | bytes, source: str | None = None) -> Any:
  """Reads a ``torch.save`` / ``torch.jit.save`` file into plain Python + numpy objects.

  Tensors become numpy arrays; state dicts stay (Ordered)dicts; TorchScript modules become
  :class:`ScriptObject` records (``.attrs``: submodules and parameters by name). A file that cannot
  be read raises :class:`TorchFileError` (:class:`UnsafePickleError` for one that would run code).
  """
  if isinstance(path_or_bytes, (bytes, bytearray)):
    data, source = bytes(path_or_bytes), source or "<bytes>"
  else:
    source = source or os.fspath(path_or_bytes)
    if not os.path.isfile(path_or_bytes):
      raise FileNotFoundError(f"weights file {source!r} not found")
    with open(path_or_bytes, "rb") as f:
      data = f.read()
  try:
    return _parse(data, source)
  except TorchFileError:
    raise
  except _Malformed as e:
    raise TorchFileError(f"{source}: {e}; {_ADVICE}") from None
  except _PARSE_ERRORS as e:
    detail = f"{type(e).__name__}: {e}"[:200]
    raise TorchFileError(f"{source}: not a readable PyTorch checkpoint ({detail}); "
                         f"{_ADVICE}") from None


def named_tensors(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Flattens a state dict or TorchScript module record into ``{"a.b.weight": array}``.

  A container reached twice (a shared submodule) is named once, under its first path, as torch's
  ``named_parameters`` does: so the walk is linear in the graph however its references are shared.
  """
  out: dict[str, np.ndarray] = {}
  _flatten(obj, prefix, out, set())
  return out


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], seen: set[int]) -> None:
  if id(obj) in seen:
    return
  seen.add(id(obj))
  items = obj.attrs.items() if isinstance(obj, ScriptObject) else (
      obj.items() if isinstance(obj, dict) else ())
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[name] = value
    elif isinstance(value, (dict, ScriptObject)):
      _flatten(value, name + ".", out, seen)
