"""Users' images + captions: manifest reading and per-example checks (the folder builder's input).

A manifest is JSONL (one object per line) or CSV (with a header row), UTF-8 (a leading byte-order
mark is accepted), with fields

- ``image``: path of the image file, relative to the manifest's directory or absolute;
- ``caption``: its caption (non-empty);
- ``split`` (optional): ``train`` (default), ``test``, or any name of letters, digits, ``_`` and
  ``-`` other than ``all`` (what tfds can write and read back).

A manifest that cannot be read -- not UTF-8, not JSON, a field of the wrong type, an unusable split
name -- is an error naming the file and line before any image is read. Every row is then checked
when the dataset is prepared: the file must exist, be non-empty and decode (within PIL's
decompression-bomb pixel limit), its mode must be convertible to RGB (1, L, LA, P, PA, RGB, RGBA,
CMYK, YCbCr; alpha is composited on white; a multi-frame file uses its first frame), its shorter
side must be at least ``min_image_size``, and its caption must be non-empty. A bad row either stops
preparation with an error naming the row and the reason (``--bad-examples error``, config
``data.bad_examples="error"``, default) or is skipped and counted in the preparation report
(``skip``); nothing is dropped silently. At most :func:`in_flight_limit` rows are held at once,
whatever the number of workers.
"""

from __future__ import annotations

import collections
from concurrent import futures
import csv
import dataclasses
import io
import json
import os
import re
import struct
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from ldm_scaling.errors import DataError

CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
POLICIES = ("error", "skip")
SPLIT_NAME = re.compile(r"[\w-]+")  # what tfds writes as a file name and parses in a split spec
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a non-UTF-8 byte, as errors="surrogateescape" keeps it
MAX_WORKERS = 32          # threads checking rows: beyond this the GIL, not the cores, is the limit
IN_FLIGHT_PER_WORKER = 2  # rows queued per thread so none idles while the writer catches up
# What PIL's parsers raise on bad bytes: Image.open's own format probe treats SyntaxError,
# IndexError, TypeError and struct.error so; fuzzing found a truncated GIF's next frame raising
# IndexError, a TIFF frame's unknown compression KeyError, one without dimensions TypeError.
PIL_DATA_ERRORS = (OSError, EOFError, ValueError, SyntaxError, IndexError, KeyError, TypeError,
                   struct.error)


class BadExampleError(DataError):
  """A manifest row that cannot become an example (with ``--bad-examples error``, the default)."""


class ManifestError(DataError):
  """A manifest that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class Row:
  line: int        # 1-based line of the manifest (CSV: counting the header)
  image: str       # absolute path
  caption: str | None
  split: str


def read(path: str) -> list[Row]:
  """All rows of a JSONL or CSV manifest (format from the extension: .jsonl/.json or .csv).

  Every row is parsed and validated here, before any image is read, so a malformed manifest fails
  at its first bad line instead of after hours of image checks."""
  if not os.path.isfile(path):
    raise ManifestError(f"manifest {path!r} not found; give a .jsonl or .csv file with image and "
                        f"caption fields (see docs/data.md)")
  base = os.path.dirname(os.path.abspath(path))
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json"):
    rows = _read_jsonl(path, base)
  elif ext == ".csv":
    rows = _read_csv(path, base)
  else:
    raise ManifestError(f"manifest {path!r}: unknown format {ext!r}; use .jsonl or .csv")
  if not rows:
    raise ManifestError(f"manifest {path!r} has no rows")
  return rows


def _read_jsonl(path: str, base: str) -> list[Row]:
  rows = []
  with _open_text(path) as f:
    for line_no, line in enumerate(_utf8_lines(f, path), 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
      if not isinstance(item, dict):
        raise ManifestError(f"{path}:{line_no}: expected an object with image and caption")
      rows.append(_row(item, line_no, base, path))
  return rows


def _read_csv(path: str, base: str) -> list[Row]:
  rows = []
  with _open_text(path) as f:
    reader = csv.DictReader(_utf8_lines(f, path))
    if not reader.fieldnames or "image" not in reader.fieldnames:
      raise ManifestError(f"{path}: the CSV header must name an 'image' and a 'caption' column, "
                          f"got {reader.fieldnames}")
    for item in reader:
      rows.append(_row(item, reader.line_num, base, path))  # line_num: the row's (last) line
  return rows


def _open_text(path: str):
  """The manifest as text whatever its bytes: ``utf-8-sig`` drops the byte-order mark spreadsheet
  programs write (else the first CSV column is named '\\ufeffimage'), and ``surrogateescape``
  keeps a non-UTF-8 byte for :func:`_utf8_lines` to report with its line instead of raising a
  UnicodeDecodeError without one. ``newline=""`` is what the csv module needs."""
  return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _utf8_lines(f, path: str) -> Iterator[str]:
  """The lines of ``f``, failing at the first one holding a byte that is not UTF-8."""
  for line_no, line in enumerate(f, 1):
    bad = NOT_UTF8.search(line)
    if bad:
      byte = ord(bad.group()) - 0xdc00
      raise ManifestError(
          f"{path}:{line_no}: byte 0x{byte:02x} at column {bad.start() + 1} is not UTF-8; the "
          f"manifest must be UTF-8 (convert it, e.g. `iconv -f latin1 -t utf-8 in > out`)")
    yield line


def _row(item: dict[str, Any], line: int, base: str, path: str) -> Row:
  image = item.get("image")
  if image is not None and not isinstance(image, str):
    raise ManifestError(f"{path}:{line}: field 'image' must be a string (a path), got {image!r}")
  if not image:
    raise ManifestError(f"{path}:{line}: missing 'image' field")
  caption = item.get("caption")
  if caption is not None and not isinstance(caption, str):
    caption = str(caption)
  return Row(line=line, image=os.path.join(base, os.path.expanduser(image)), caption=caption,
             split=_split(item.get("split"), line, path))


def _split(value: Any, line: int, path: str) -> str:
  """The row's split (``train`` when absent or blank), checked here because tfds only fails on a
  bad name when it writes or reads the split back, after every row was processed."""
  if value is None:
    return "train"
  if not isinstance(value, str):
    raise ManifestError(f"{path}:{line}: field 'split' must be a string such as \"train\" or "
                        f"\"test\", got {value!r}")
  split = value.strip() or "train"
  if (not SPLIT_NAME.fullmatch(split) or not any(c.isalnum() for c in split)
      or split.lower() == "all"):
    raise ManifestError(f"{path}:{line}: split {split!r} cannot be a dataset split; use letters, "
                        f"digits, '_' and '-' (e.g. train, test, val-2), and not 'all'")
  return split


@dataclasses.dataclass
class Checked:
  """A row that passed (``encoded`` RGB image bytes, ``caption``) or failed (``reason``)."""
  row: Row
  encoded: bytes | None = None
  caption: str | None = None
  reason: str | None = None
  converted: str | None = None  # what was converted to reach RGB, for the report


def check(row: Row, min_image_size: int) -> Checked:
  """Loads and checks one row; never raises for bad data (the policy decides)."""
  caption = (row.caption or "").strip()
  if not caption:
    return Checked(row, reason="empty caption" if row.caption is not None else "missing caption")
  if not os.path.isfile(row.image):
    return Checked(row, reason="image file not found")
  try:
    with open(row.image, "rb") as f:
      raw = f.read()
  except OSError as e:
    return Checked(row, reason=f"image file unreadable ({type(e).__name__}: {e.strerror or e})")
  image, frames, reason = _decode(raw)
  if reason is not None:
    return Checked(row, reason=reason)
  w, h = image.size
  if min(w, h) < max(1, min_image_size):
    return Checked(row, reason=f"image {w}x{h} is smaller than data.min_image_size="
                               f"{min_image_size}")
  converted = f"first of {frames} frames" if frames > 1 else None
  if image.mode not in CONVERTIBLE_MODES:
    return Checked(row, reason=f"unsupported image mode {image.mode!r} (16/32-bit or float "
                               f"images need an explicit scaling; convert them to 8-bit RGB)")
  if image.mode == "RGB" and image.format in ("JPEG", "PNG") and not converted:
    return Checked(row, encoded=raw, caption=caption)  # stored as is, no re-encoding
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    rgb = flat.convert("RGB")
    converted = ", ".join(filter(None, [converted, f"{image.mode} composited on white"]))
  else:
    rgb = image.convert("RGB")
    if image.mode != "RGB":
      converted = ", ".join(filter(None, [converted, f"{image.mode} -> RGB"]))
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return Checked(row, encoded=buf.getvalue(), caption=caption, converted=converted or "re-encoded")


def _decode(raw: bytes) -> tuple[Image.Image | None, int, str | None]:
  """The decoded image and its number of frames, or why not. PIL's decompression-bomb guard (a few
  KB of PNG can claim 20000x20000 pixels) is a bad row like any other, not the end of the whole
  build; so is a later frame that PIL cannot parse (counting frames reads every frame's header).
  The reasons never quote PIL's in-memory buffer: the error around them names the file."""
  if not raw:
    return None, 0, "empty image file (0 bytes)"
  try:
    image = Image.open(io.BytesIO(raw))
    image.load()
    frames = getattr(image, "n_frames", 1)
  except Image.DecompressionBombError as e:
    return None, 0, (f"image over PIL's pixel limit ({e} Downscale the image, or leave the row "
                     f"out; the limit is 2 x PIL.Image.MAX_IMAGE_PIXELS)")
  except UnidentifiedImageError:
    return None, 0, "corrupt image (not in an image format PIL can read)"
  except PIL_DATA_ERRORS as e:
    return None, 0, f"corrupt image ({type(e).__name__}: {e})"
  return image, frames, None


class Report:
  """Counts of written, converted and skipped rows per split, with reasons and examples."""

  def __init__(self):
    self.written = collections.Counter()
    self.converted = collections.Counter()
    self.skipped = collections.defaultdict(collections.Counter)
    self.examples: list[str] = []

  def add(self, c: Checked) -> None:
    if c.reason is None:
      self.written[c.row.split] += 1
      if c.converted and c.converted != "re-encoded":
        self.converted[c.converted] += 1
      return
    kind = c.reason.split(" (")[0]
    self.skipped[c.row.split][kind] += 1
    if len(self.examples) < 20:
      self.examples.append(f"line {c.row.line} ({c.row.image}): {c.reason}")

  def num_skipped(self) -> int:
    return sum(sum(v.values()) for v in self.skipped.values())

  def to_dict(self) -> dict[str, Any]:
    return dict(written=dict(self.written), skipped={k: dict(v) for k, v in self.skipped.items()},
                num_skipped=self.num_skipped(), converted=dict(self.converted),
                skipped_examples=list(self.examples))

  def summary(self) -> str:
    text = f"wrote {sum(self.written.values())} examples ({dict(self.written)})"
    if self.converted:
      text += f"; converted {sum(self.converted.values())} ({dict(self.converted)})"
    if self.num_skipped():
      reasons = collections.Counter()
      for v in self.skipped.values():
        reasons.update(v)
      text += f"; SKIPPED {self.num_skipped()} bad rows ({dict(reasons)})"
    return text


def bad_example_error(c: Checked, manifest: str) -> BadExampleError:
  return BadExampleError(
      f"{manifest}:{c.row.line}: {c.reason} ({c.row.image}). Fix or remove the row, or rerun with "
      f"--bad-examples skip (config: data.bad_examples=skip) to skip bad rows; they are counted in "
      f"the preparation report")


def pool_size(workers: int) -> int:
  """Threads checking rows: ``workers`` (0: all cores), at most :data:`MAX_WORKERS`."""
  return max(1, min(workers or os.cpu_count() or 1, MAX_WORKERS))


def in_flight_limit(workers: int) -> int:
  """How many rows may be submitted but not yet consumed. Each holds a whole encoded image, so
  this, not the manifest's length or the host's core count, bounds the memory of preparation: at
  most ``IN_FLIGHT_PER_WORKER * MAX_WORKERS`` (64) images, on a 240-core host as on a laptop."""
  return IN_FLIGHT_PER_WORKER * pool_size(workers)


def checked_rows(rows: list[Row], min_image_size: int, workers: int) -> Iterator[Checked]:
  """``check`` over rows in a thread pool (PIL decodes without the GIL), in manifest order, with at
  most ``in_flight_limit(workers)`` rows submitted and not yet consumed."""
  if pool_size(workers) == 1:
    yield from (check(r, min_image_size) for r in rows)
    return
  limit = in_flight_limit(workers)
  with futures.ThreadPoolExecutor(pool_size(workers)) as pool:
    pending: collections.deque[futures.Future] = collections.deque()
    for row in rows:
      if len(pending) == limit:
        yield pending.popleft().result()
      pending.append(pool.submit(check, row, min_image_size))
    while pending:
      yield pending.popleft().result()
