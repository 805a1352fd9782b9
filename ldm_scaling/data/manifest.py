"""Users' images + captions: manifest reading and per-example checks (the folder builder's input).

A manifest is JSONL (one object per line) or CSV (with a header row) with fields

- ``image``: path of the image file, relative to the manifest's directory or absolute;
- ``caption``: its caption (non-empty);
- ``split`` (optional): ``train`` (default), ``test``, or any name.

Every row is checked when the dataset is prepared: the file must exist and decode, its mode must
be convertible to RGB (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr; alpha is composited on white; a
multi-frame file uses its first frame), its shorter side must be at least ``min_image_size``, and
its caption must be non-empty. A bad row either stops preparation with an error naming the row and
the reason (``data.bad_examples="error"``, default) or is skipped and counted in the preparation
report (``"skip"``); nothing is dropped silently.
"""

from __future__ import annotations

import collections
from concurrent import futures
import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from ldm_scaling.errors import UserError

CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
POLICIES = ("error", "skip")


class BadExampleError(UserError, ValueError):
  """A manifest row that cannot become an example (with ``data.bad_examples="error"``)."""


class ManifestError(UserError, ValueError):
  """A manifest that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class Row:
  line: int        # 1-based line of the manifest (CSV: counting the header)
  image: str       # absolute path
  caption: str | None
  split: str


def read(path: str) -> list[Row]:
  """All rows of a JSONL or CSV manifest (format from the extension: .jsonl/.json or .csv)."""
  if not os.path.isfile(path):
    raise ManifestError(f"manifest {path!r} not found; give a .jsonl or .csv file with image and "
                        f"caption fields (see docs/data.md)")
  base = os.path.dirname(os.path.abspath(path))
  ext = os.path.splitext(path)[1].lower()
  rows = []
  if ext in (".jsonl", ".json"):
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise ManifestError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
          raise ManifestError(f"{path}:{line_no}: expected an object with image and caption")
        rows.append(_row(item, line_no, base, path))
  elif ext == ".csv":
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or "image" not in reader.fieldnames:
        raise ManifestError(f"{path}: the CSV header must name an 'image' and a 'caption' column, "
                            f"got {reader.fieldnames}")
      for i, item in enumerate(reader):
        rows.append(_row(item, i + 2, base, path))
  else:
    raise ManifestError(f"manifest {path!r}: unknown format {ext!r}; use .jsonl or .csv")
  if not rows:
    raise ManifestError(f"manifest {path!r} has no rows")
  return rows


def _row(item: dict[str, Any], line: int, base: str, path: str) -> Row:
  image = item.get("image")
  if not image or not isinstance(image, str):
    raise ManifestError(f"{path}:{line}: missing 'image' field")
  caption = item.get("caption")
  if caption is not None and not isinstance(caption, str):
    caption = str(caption)
  split = (item.get("split") or "train").strip()
  return Row(line=line, image=os.path.join(base, os.path.expanduser(image)), caption=caption,
             split=split)


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
    image = Image.open(io.BytesIO(raw))
    image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    return Checked(row, reason=f"corrupt image ({type(e).__name__}: {e})")
  w, h = image.size
  if min(w, h) < max(1, min_image_size):
    return Checked(row, reason=f"image {w}x{h} is smaller than data.min_image_size="
                               f"{min_image_size}")
  converted = None
  if getattr(image, "n_frames", 1) > 1:
    converted = f"first of {image.n_frames} frames"
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
      f"{manifest}:{c.row.line}: {c.reason} ({c.row.image}). Fix or remove the row, or set "
      f"data.bad_examples=skip to skip bad rows (they are counted in the preparation report)")


def checked_rows(rows: list[Row], min_image_size: int, workers: int) -> Iterator[Checked]:
  """``check`` over rows in a thread pool (PIL decodes without the GIL), in manifest order."""
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    yield from (check(r, min_image_size) for r in rows)
    return
  with futures.ThreadPoolExecutor(workers) as pool:
    chunk = 4 * workers
    for start in range(0, len(rows), 256 * chunk):
      yield from pool.map(lambda r: check(r, min_image_size), rows[start:start + 256 * chunk])
