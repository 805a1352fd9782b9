"""Manifest reading and per-row checks on hostile input (issue 21 item 9): each case is a counted
skip or an error naming the manifest line and the reason, never a crash; and the rows held in
flight are bounded whatever the worker count. Images are made here with PIL/numpy; only one test
builds a (three-row) dataset."""

import io
import json
import os
import re
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm_scaling.data import builders
from ldm_scaling.data import manifest as manifest_lib
from ldm_scaling.errors import DataError


def _png(path, size=(20, 20)):
  Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(path)
  return str(path)


def _bomb_png(path, width=20_000, height=20_000):
  """A valid PNG header claiming width x height pixels with a tiny IDAT: a few hundred bytes that
  PIL refuses to open (its decompression-bomb guard), made without allocating the pixels."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                   + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
  return str(path)


def _row(image, line=2, caption="a caption"):
  return manifest_lib.Row(line=line, image=str(image), caption=caption, split="train")


def _jsonl(path, items):
  path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
  return str(path)


# -- the errors are the package's data errors --------------------------------------------------


def test_manifest_errors_are_data_errors():
  assert issubclass(manifest_lib.ManifestError, DataError)
  assert issubclass(manifest_lib.BadExampleError, DataError)


# -- decompression bomb --------------------------------------------------------------------------


def test_decompression_bomb_is_a_bad_row_naming_the_pixel_limit(tmp_path):
  bomb = _bomb_png(tmp_path / "bomb.png")
  assert os.path.getsize(bomb) < 1000
  c = manifest_lib.check(_row(bomb, line=7), min_image_size=16)
  assert c.encoded is None
  assert c.reason.startswith("image over PIL's pixel limit (")
  assert "400000000 pixels" in c.reason and str(2 * Image.MAX_IMAGE_PIXELS) in c.reason
  report = manifest_lib.Report()
  report.add(c)
  assert report.to_dict()["skipped"] == {"train": {"image over PIL's pixel limit": 1}}
  message = str(manifest_lib.bad_example_error(c, "/data/m.jsonl"))
  assert message.startswith("/data/m.jsonl:7: image over PIL's pixel limit")
  assert bomb in message and "--bad-examples skip" in message


def test_a_lowered_pixel_limit_applies_to_real_images(tmp_path, monkeypatch):
  """The same path for a real, decodable image over a (lowered) limit."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  c = manifest_lib.check(_row(_png(tmp_path / "a.png", (20, 20))), min_image_size=16)
  assert c.reason.startswith("image over PIL's pixel limit (") and "200 pixels" in c.reason


# -- manifest encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,text,line", [
    ("m.jsonl", b'{"image": "a.png", "caption": "a cat"}\n'
                b'{"image": "b.png", "caption": "caf\xe9"}\n', 2),
    ("m.csv", b"image,caption\na.png,a cat\nb.png,caf\xe9 au lait\n", 3)])
def test_latin1_byte_names_file_and_line(tmp_path, name, text, line):
  path = tmp_path / name
  path.write_bytes(text)
  with pytest.raises(manifest_lib.ManifestError) as e:
    manifest_lib.read(str(path))
  assert str(e.value).startswith(f"{path}:{line}: byte 0xe9 at column ")
  assert "is not UTF-8; the manifest must be UTF-8" in str(e.value)


def test_csv_with_a_byte_order_mark_is_accepted(tmp_path):
  path = tmp_path / "excel.csv"
  path.write_bytes(b"\xef\xbb\xbfimage,caption,split\r\na.png,a cat,train\r\nb.png,a dog,test\r\n")
  rows = manifest_lib.read(str(path))
  assert [(os.path.basename(r.image), r.caption, r.split, r.line) for r in rows] == [
      ("a.png", "a cat", "train", 2), ("b.png", "a dog", "test", 3)]


def test_jsonl_with_a_byte_order_mark_is_accepted(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "caption": "a cat"}\n')
  [row] = manifest_lib.read(str(path))
  assert row.caption == "a cat" and row.line == 1


# -- field types and split names -----------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("split", 1), ("split", ["test"]), ("split", False),
                                         ("image", 5)])
def test_non_string_field_names_line_and_field(tmp_path, field, value):
  good = dict(image="a.png", caption="x")
  path = _jsonl(tmp_path / "m.jsonl", [good, {**good, field: value}])
  with pytest.raises(manifest_lib.ManifestError,
                     match=rf"m.jsonl:2: field '{field}' must be a string.*got "
                           rf"{re.escape(repr(value))}"):
    manifest_lib.read(path)


@pytest.mark.parametrize("split", ["my split", "all", "ALL", "a/b", "---", "x+y", "train[:10]"])
def test_invalid_split_fails_at_its_row(tmp_path, split):
  """The bad split on line 2 fails reading the manifest at line 2: line 3 (not even JSON) is never
  reached, and no image is opened (a.png does not exist)."""
  path = tmp_path / "m.jsonl"
  path.write_text(json.dumps(dict(image="a.png", caption="x")) + "\n"
                  + json.dumps(dict(image="a.png", caption="x", split=split)) + "\nnot json\n")
  with pytest.raises(manifest_lib.ManifestError) as e:
    manifest_lib.read(str(path))
  assert str(e.value).startswith(f"{path}:2: split {split!r} cannot be a dataset split")
  assert "letters, digits, '_' and '-'" in str(e.value)


def test_invalid_split_in_csv_names_its_line(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text('image,caption,split\na.png,"two\nlines",test\nb.png,x,no good\n')
  with pytest.raises(manifest_lib.ManifestError, match=r"m.csv:4: split 'no good'"):
    manifest_lib.read(str(path))


def test_usable_split_names_and_blank_default(tmp_path):
  items = [dict(image="a.png", caption="x", split=s) for s in ("val-2", "test_1", " test ", "")]
  items.append(dict(image="a.png", caption="x", split=None))
  rows = manifest_lib.read(_jsonl(tmp_path / "m.jsonl", items))
  assert [r.split for r in rows] == ["val-2", "test_1", "test", "train", "train"]


# -- image files ---------------------------------------------------------------------------------


def test_empty_image_file_names_the_file(tmp_path):
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  c = manifest_lib.check(_row(empty, line=4), min_image_size=16)
  assert c.reason == "empty image file (0 bytes)"
  message = str(manifest_lib.bad_example_error(c, "m.jsonl"))
  assert message.startswith(f"m.jsonl:4: empty image file (0 bytes) ({empty})")
  assert "BytesIO" not in message


def test_unidentifiable_image_names_the_file_not_a_buffer(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image at all")
  c = manifest_lib.check(_row(text), min_image_size=16)
  assert c.reason.startswith("corrupt image (") and "BytesIO" not in c.reason
  assert str(text) in str(manifest_lib.bad_example_error(c, "m.jsonl"))


def _tiff_second_frame_without_height():
  """A TIFF whose second frame's header has ImageWidth but no ImageLength."""
  buf = io.BytesIO()
  Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(buf, "TIFF")
  raw = bytearray(buf.getvalue())
  ifd = struct.unpack("<I", raw[4:8])[0]
  next_ifd = ifd + 2 + 12 * struct.unpack("<H", raw[ifd:ifd + 2])[0]
  raw[next_ifd:next_ifd + 4] = struct.pack("<I", len(raw))
  raw += struct.pack("<H", 1) + struct.pack("<HHII", 256, 3, 1, 20) + struct.pack("<I", 0)
  return bytes(raw)


def _gif_cut_in_second_frame():
  """A two-frame GIF cut just before its second frame's LZW code size byte."""
  frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (50, 200)]
  buf = io.BytesIO()
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
  image = Image.open(io.BytesIO(buf.getvalue()))
  image.seek(1)
  return buf.getvalue()[:image.tile[0][2] - 1]


@pytest.mark.parametrize("name,make,error", [
    ("two_frames.tif", _tiff_second_frame_without_height, "TypeError: Missing dimensions"),
    ("cut.gif", _gif_cut_in_second_frame, "IndexError: index out of range")])
def test_broken_later_frame_is_a_corrupt_image(tmp_path, name, make, error):
  """Found by fuzzing: counting frames parses every frame's header, and PIL raises TypeError or
  IndexError for broken ones, which used to escape ``check`` (and the build) even under skip."""
  path = tmp_path / name
  path.write_bytes(make())
  Image.open(path).load()  # the first frame alone decodes
  c = manifest_lib.check(_row(path), min_image_size=16)
  assert c.reason == f"corrupt image ({error})"


def test_bad_row_hint_names_the_cli_flag(tmp_path):
  c = manifest_lib.check(_row(tmp_path / "missing.png"), min_image_size=16)
  message = str(manifest_lib.bad_example_error(c, "m.jsonl"))
  assert "rerun with --bad-examples skip" in message
  assert "data.bad_examples=skip" in message  # the config key, for config-file users


def test_build_skips_and_counts_bomb_and_empty_file(tmp_path):
  """End to end (the one build here, three rows): under skip, the decompression bomb and the empty
  file are counted, not a crash, in a CSV with a byte-order mark."""
  _png(tmp_path / "good.png")
  _bomb_png(tmp_path / "bomb.png")
  (tmp_path / "empty.png").write_bytes(b"")
  manifest = tmp_path / "m.csv"
  manifest.write_bytes("\ufeffimage,caption\ngood.png,a grey square\nbomb.png,a bomb\n"
                       "empty.png,nothing\n".encode("utf-8"))
  builder = builders.CaptionedFolder(
      config=builders.folder_config(str(manifest), "skip", workers=2),
      data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(file_format="array_record")
  report = builders.prepared_report(builder)
  assert report["written"] == {"train": 1}
  assert report["skipped"] == {"train": {"image over PIL's pixel limit": 1,
                                         "empty image file": 1}}


# -- rows in flight ------------------------------------------------------------------------------


def test_in_flight_bound_is_small_whatever_the_worker_count():
  assert manifest_lib.in_flight_limit(240) == 64
  assert manifest_lib.in_flight_limit(0) <= 64
  assert manifest_lib.in_flight_limit(2) == 4
  assert manifest_lib.pool_size(240) == manifest_lib.MAX_WORKERS
  assert manifest_lib.pool_size(1) == 1


@pytest.mark.parametrize("workers", [2, 240])
def test_checked_rows_holds_at_most_the_bound(monkeypatch, workers):
  """Counts rows started by the (fake) check but not yet consumed. The consumer pauses on the first
  row so unbounded submission would show (the old code queued 1024 x workers rows)."""
  started, lock = [0], threading.Lock()

  def fake_check(row, min_image_size):
    with lock:
      started[0] += 1
    return manifest_lib.Checked(row, encoded=b"x", caption=row.caption)

  monkeypatch.setattr(manifest_lib, "check", fake_check)
  rows = [_row(f"{i}.png", line=i + 1) for i in range(600)]
  limit = manifest_lib.in_flight_limit(workers)
  lines, most = [], 0
  for consumed, c in enumerate(manifest_lib.checked_rows(rows, 16, workers)):
    if consumed == 0:
      time.sleep(0.1)
    with lock:
      most = max(most, started[0] - consumed)
    lines.append(c.row.line)
  assert lines == [r.line for r in rows]  # manifest order
  assert 1 < most <= limit
