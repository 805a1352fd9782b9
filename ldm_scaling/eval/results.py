"""The results table: the contract between evaluation and analysis.

One row per evaluated cell = (run, checkpoint step, objective, sampler, steps, cfg, scale
schedule). Every cell is written as its own small JSON file ``<table>/rows/<cell id>.json``
(temp file + rename: atomic locally, one object write on GCS), so

* a killed job loses at most the cell in flight, a rerun skips every cell that has a row, and
  two hosts evaluating different cells never write the same file;
* the same cell evaluated twice overwrites its own row: the table cannot hold duplicates.

``results.jsonl`` and ``results.csv`` next to ``rows/`` are regenerated from the rows after each
cell (``write_tables``); ``load`` reads any of them into a pandas DataFrame.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

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


def cell_id(row: Mapping[str, Any]) -> str:
  key = json.dumps([row.get(k) for k in CELL_KEYS], sort_keys=True, default=str)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


class Table:
  """A results table rooted at a directory (local path or ``gs://...``)."""

  def __init__(self, root: str):
    self.root = epath.Path(root)
    self.rows_dir = self.root / "rows"

  def has(self, cell: Mapping[str, Any]) -> bool:
    return (self.rows_dir / f"{cell_id(cell)}.json").exists()

  def add(self, row: Mapping[str, Any]) -> None:
    missing = [k for k in COLUMNS if k not in row]
    if missing:
      raise ValueError(f"results row lacks columns {missing}")
    self.rows_dir.mkdir(parents=True, exist_ok=True)
    path = self.rows_dir / f"{cell_id(row)}.json"
    files.atomic_write_text(path, json.dumps(dict(row), sort_keys=True, default=_json_default))

  def rows(self) -> list[dict[str, Any]]:
    if not self.rows_dir.exists():
      return []
    out = []
    for path in sorted(self.rows_dir.glob("*.json")):
      out.append(json.loads(path.read_text()))
    return sorted(out, key=lambda r: [str(r.get(k)) for k in CELL_KEYS])

  def write_tables(self) -> None:
    """Regenerates ``results.jsonl`` and ``results.csv`` from the rows (atomically)."""
    rows = self.rows()
    self.root.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(self.root / "results.jsonl",
                  "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    frame = pd.DataFrame(rows, columns=_ordered_columns(rows))
    files.atomic_write_text(self.root / "results.csv", frame.to_csv(index=False))


def _json_default(value):
  if hasattr(value, "item"):
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def _ordered_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  extra = sorted({k for r in rows for k in r} - set(COLUMNS))
  return list(COLUMNS) + extra


class EmptyTableError(UserError, ValueError):
  """A results table without rows."""


def load(path: str):
  """A DataFrame from a table directory, its ``results.csv`` / ``results.jsonl``, or a CSV/JSONL
  file anywhere (e.g. the example table shipped with the repository). Raises
  :class:`EmptyTableError` with a hint when there is nothing to analyse."""
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
  return frame
