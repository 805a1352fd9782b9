"""The results table: the contract between evaluation and analysis.

One row per evaluated cell = (run, checkpoint step, objective, sampler, steps, cfg, scale
schedule). Every cell is written as its own small JSON file ``<table>/rows/<cell id>.json``
(unique temporary + fsync + rename: atomic and durable locally, one object write on GCS), so

* a killed job loses at most the cell in flight, a rerun skips every cell that has a row, and
  two hosts evaluating different cells never write the same file;
* the same cell evaluated twice overwrites its own row: the table cannot hold duplicates;
* a row file that cannot be read (e.g. left empty by a crash of an older version) is named in a
  :class:`CorruptRowWarning` and counts as missing: the table loads without it and the next eval
  evaluates its cell again.

A row records in :data:`KEY_COLUMN` a digest of everything that determined its values (samples,
seed, sampler settings, FID reference, CLIP, the checkpoint and run config: see
``ldm_scaling.eval.grid.cell_settings``), so an eval with other settings re-evaluates the cell
instead of keeping a stale row. Rows written before the column existed load as usual.

Uncertainty columns (:data:`UNCERTAINTY_COLUMNS`: ``fid_ci95``, ``kid``, ``kid_ci95``, and
``clip_score_ci95[<model>]`` next to each ``clip_score[<model>]``) are written by the eval grid
but not required of a row: rows made before them stay valid (and, keyed by the same settings,
done), and :func:`load` gives them NaN there.

``results.jsonl`` and ``results.csv`` next to ``rows/`` are regenerated from the rows
(``write_tables``; safe with concurrent writers such as the shards of one grid); ``load`` reads
any of them into a pandas DataFrame.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping
import warnings

from etils import epath
import pandas as pd

from ldm_scaling import files
from ldm_scaling.errors import UserError

# The key of a cell: rows with equal keys are the same measurement.
CELL_KEYS = ("run", "checkpoint_step", "objective", "sampler", "steps", "cfg_scale",
             "scale_schedule")

# Columns every row has (metrics columns such as clip_score[<model>] come in addition).
COLUMNS = CELL_KEYS + (
    "width", "params", "norm_cost", "sampling_cost", "fid", "n", "seed", "prompts",
    "fid_reference", "config_hash", "wall_s", "time")

# Written by the eval grid beside fid / clip_score[...], not required (rows from before lack them;
# load() fills NaN): 95 % half-widths over the cell's samples, and KID (ldm_scaling.eval.frechet).
UNCERTAINTY_COLUMNS = ("fid_ci95", "kid", "kid_ci95")
CLIP_CI_PREFIX = "clip_score_ci95["

# Extra columns of rows written by the eval grid: the digest of what determined the row's values,
# and those settings as JSON (to say what changed when they differ). Not in COLUMNS: tables from
# before (and hand-made ones) do not have them.
KEY_COLUMN = "eval_key"
SETTINGS_COLUMN = "eval_settings"

# write_tables regenerates the tables while other writers keep changing the rows, this many times
# at most (each of those writers regenerates them again after its own change).
_MAX_REGENERATIONS = 20


class CorruptRowWarning(UserWarning):
  """A row file that cannot be read: left out of the table; its cell counts as not evaluated."""


def cell_id(row: Mapping[str, Any]) -> str:
  key = json.dumps([row.get(k) for k in CELL_KEYS], sort_keys=True, default=str)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


class Table:
  """A results table rooted at a directory (local path or ``gs://...``)."""

  def __init__(self, root: str):
    self.root = epath.Path(root)
    self.rows_dir = self.root / "rows"

  def path(self, cell: Mapping[str, Any]) -> epath.Path:
    """The file holding ``cell``'s row."""
    return self.rows_dir / f"{cell_id(cell)}.json"

  def row(self, cell: Mapping[str, Any]) -> dict[str, Any] | None:
    """``cell``'s row, or None when it has none or only an unreadable one (warned)."""
    return _read_row(self.path(cell))

  def has(self, cell: Mapping[str, Any], key: str | None = None) -> bool:
    """Whether ``cell`` has a readable row (made with evaluation key ``key``, if given)."""
    row = self.row(cell)
    return row is not None and (key is None or row.get(KEY_COLUMN) == key)

  def add(self, row: Mapping[str, Any]) -> None:
    missing = [k for k in COLUMNS if k not in row]
    if missing:
      raise ValueError(f"results row lacks columns {missing}")
    self.rows_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(self.path(row),
                            json.dumps(dict(row), sort_keys=True, default=_json_default))

  def remove(self, cell: Mapping[str, Any]) -> None:
    """Deletes ``cell``'s row if it has one (a stale row stored under another run id)."""
    path = self.path(cell)
    if path.exists():
      path.unlink()

  def rows(self) -> list[dict[str, Any]]:
    """Every readable row, sorted by cell; unreadable row files are warned about by name."""
    if not self.rows_dir.exists():
      return []
    out = [r for r in (_read_row(p) for p in sorted(self.rows_dir.glob("*.json")))
           if r is not None]
    return sorted(out, key=lambda r: [str(r.get(k)) for k in CELL_KEYS])

  def write_tables(self) -> None:
    """Regenerates ``results.jsonl`` and ``results.csv`` from the rows, each written atomically
    under a unique temporary name.

    Shards of one grid call this concurrently, and a writer that read the rows before another
    shard's last row appeared could otherwise replace a complete table with an older one (last
    writer wins). So after writing, the rows are read again, and while they changed meanwhile
    the tables are regenerated: whoever writes last has read every row."""
    self.root.mkdir(parents=True, exist_ok=True)
    rows = self.rows()
    for _ in range(_MAX_REGENERATIONS):
      self._write(rows)
      now = self.rows()
      if _jsonl(now) == _jsonl(rows):
        return
      rows = now

  def _write(self, rows: list[dict[str, Any]]) -> None:
    files.atomic_write_text(self.root / "results.jsonl", _jsonl(rows))
    frame = pd.DataFrame(rows, columns=_ordered_columns(rows))
    files.atomic_write_text(self.root / "results.csv", frame.to_csv(index=False))


def _read_row(path: epath.Path) -> dict[str, Any] | None:
  """The row in ``path``; None if there is none, or (with a :class:`CorruptRowWarning` naming the
  file) if it is empty, not JSON or not a row: one bad file must not take the table down."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError) as e:
    return _bad_row(path, f"cannot be read: {e}")
  if not text.strip():
    return _bad_row(path, "is empty")
  try:
    row = json.loads(text)
  except ValueError as e:
    return _bad_row(path, f"is not JSON ({e})")
  if not isinstance(row, dict) or any(k not in row for k in CELL_KEYS):
    return _bad_row(path, f"is not a results row (needs the columns {', '.join(CELL_KEYS)})")
  return row


def _bad_row(path: epath.Path, problem: str) -> None:
  warnings.warn(f"results row {path} {problem}: it is left out of the table, and `ldm-scaling "
                f"eval` evaluates its cell again (delete the file if that cell is no longer "
                f"wanted)", CorruptRowWarning, stacklevel=3)
  return None


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
  return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _json_default(value):
  if hasattr(value, "item"):
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def _ordered_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  present = {k for r in rows for k in r}
  uncertainty = [c for c in UNCERTAINTY_COLUMNS if c in present]
  return list(COLUMNS) + uncertainty + sorted(present - set(COLUMNS) - set(uncertainty))


def with_uncertainty_columns(frame: pd.DataFrame) -> pd.DataFrame:
  """``frame`` with every uncertainty column (:data:`UNCERTAINTY_COLUMNS`, and
  ``clip_score_ci95[m]`` for each ``clip_score[m]``) present: NaN where rows lack it."""
  clips = [c for c in frame.columns if c.startswith("clip_score[")]
  wanted = list(UNCERTAINTY_COLUMNS) + [CLIP_CI_PREFIX + c[len("clip_score["):] for c in clips]
  missing = [c for c in wanted if c not in frame.columns]
  if not missing:
    return frame
  return frame.assign(**{c: float("nan") for c in missing})


class EmptyTableError(UserError, ValueError):
  """A results table without rows."""


def load(path: str):
  """A DataFrame from a table directory, its ``results.csv`` / ``results.jsonl``, or a CSV/JSONL
  file anywhere (e.g. the example table shipped with the repository). Raises
  :class:`EmptyTableError` with a hint when there is nothing to analyse. An unreadable row file
  of a table directory is left out with a :class:`CorruptRowWarning` naming it. Uncertainty
  columns a table's rows lack are NaN (:func:`with_uncertainty_columns`)."""
  p = epath.Path(path)
  if p.is_dir() and not (p / "rows").exists() and (p / "results.csv").exists():
    return load(str(p / "results.csv"))  # a copied table (e.g. docs/study/results): CSV only
  if p.is_dir():
    rows = Table(str(p)).rows()
    frame = pd.DataFrame(rows, columns=_ordered_columns(rows)) if rows else pd.DataFrame()
  elif not p.exists():
    raise FileNotFoundError(f"results table {path!r} not found; run `ldm-scaling eval` first or "
                            f"point to a results directory / results.csv")
  elif p.suffix == ".jsonl":
    lines = [l for l in p.read_text().splitlines() if l.strip()]
    frame = pd.DataFrame([json.loads(l) for l in lines])
  else:
    with p.open() as f:
      frame = pd.read_csv(f)
  if frame.empty:
    raise EmptyTableError(f"results table {path!r} has no rows; evaluate some checkpoints with "
                          f"`ldm-scaling eval` (or `ldm-scaling study`) first")
  return with_uncertainty_columns(frame)
