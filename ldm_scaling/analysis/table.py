"""What every analysis does first: check the table, pick the metric, label the models.

Conventions (see docs/analysis.md):

* **sampling cost** is the row's ``sampling_cost`` as the eval job wrote it: normalised cost
  (forward FLOPs relative to the same UNet at width 320) x steps, a guided step counted once
  (Mei et al.'s convention) unless the run set ``cost.count_uncond_pass``. The analysis never
  recomputes it, so a table and its figures cannot disagree.
* **training compute** is ``norm_cost x checkpoint_step``: the paper's Fig. 3 axis (relative cost x
  iterations). Batch size is constant within a study, so it is left out; compare only runs trained
  with the same batch size.
* **a model** is one run: ``(run, objective, scale_schedule)``, labelled by its width
  (``w64``; the objective and scale schedule are added when the table has several).

Only ``pandas`` and ``numpy`` are needed here (no JAX), so a notebook can import the analysis with
a light install.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import numpy as np
import pandas as pd

from ldm_scaling.errors import UserError
from ldm_scaling.eval import results

MODEL_KEYS = ("run", "objective", "scale_schedule")
REQUIRED = ("run", "checkpoint_step", "sampler", "steps", "cfg_scale", "width", "norm_cost",
            "sampling_cost")
_NUMERIC = ("checkpoint_step", "steps", "cfg_scale", "width", "params", "norm_cost",
            "sampling_cost", "fid", "n")
_CLIP = re.compile(r"clip_score\[.+\]")


class AnalysisError(UserError, ValueError):
  """The table cannot answer the question asked (missing column, unknown metric, ...)."""


class NoUsableRowsError(results.EmptyTableError, AnalysisError):
  """The table has rows, but none with a finite metric and sampling cost."""


@dataclasses.dataclass(frozen=True)
class Metric:
  """The quantity being optimised: which column, and which direction is better."""
  name: str                 # "fid" | "clip"
  column: str               # "fid" | "clip_score[<CLIP label>]"
  higher_is_better: bool

  @property
  def label(self) -> str:
    """Axis label; a CLIP score keeps the name of the CLIP that computed it (scores from
    different CLIPs are not comparable, and the offline one is a stand-in)."""
    if self.name == "fid":
      return "FID"
    return f"CLIP score ({self.column[len('clip_score['):-1]})"

  def sort_ascending(self) -> bool:
    """Sort order that puts the best value first."""
    return not self.higher_is_better

  @property
  def ci_column(self) -> str:
    """The column holding the half-width of the metric's 95 % interval (``fid_ci95``,
    ``clip_score_ci95[<CLIP>]``); tables written before uncertainties lack it."""
    if self.name == "fid":
      return "fid_ci95"
    return "clip_score_ci95[" + self.column[len("clip_score["):]

  def best(self, values) -> float:
    values = np.asarray(values, float)
    return float(values.max() if self.higher_is_better else values.min())


def clip_columns(frame: pd.DataFrame) -> list[str]:
  return sorted(c for c in frame.columns if _CLIP.fullmatch(str(c)))


def metric(frame: pd.DataFrame, name: str = "fid") -> Metric:
  """``fid``, ``clip`` (the table's one ``clip_score[...]`` column) or an exact column name."""
  if name == "fid":
    if "fid" not in frame.columns:
      raise AnalysisError("the results table has no 'fid' column")
    return Metric("fid", "fid", higher_is_better=False)
  if name == "clip":
    columns = clip_columns(frame)
    if not columns:
      raise AnalysisError("the results table has no CLIP score column (clip_score[<CLIP>]); "
                          "use --metric fid")
    if len(columns) > 1:
      raise AnalysisError(f"the results table has several CLIP score columns {columns}; name one "
                          f"of them as the metric")
    return Metric("clip", columns[0], higher_is_better=True)
  if _CLIP.fullmatch(name):
    if name not in frame.columns:
      raise AnalysisError(f"no column {name!r} in the results table; CLIP columns: "
                          f"{clip_columns(frame)}")
    return Metric("clip", name, higher_is_better=True)
  raise AnalysisError(f"unknown metric {name!r}: use 'fid', 'clip' or a clip_score[<CLIP>] column")


def prepare(frame: pd.DataFrame, metric_name: str = "fid") -> tuple[pd.DataFrame, Metric]:
  """A typed copy of the usable rows, with ``model`` and ``train_compute`` columns, and the metric.

  Raises :class:`results.EmptyTableError` for an empty frame and :class:`NoUsableRowsError` when
  no row has a finite metric and a positive sampling cost (e.g. every FID is NaN)."""
  if frame is None or len(frame) == 0:
    raise results.EmptyTableError("the results table has no rows; evaluate some checkpoints "
                                  "with `ldm-scaling eval` first")
  missing = [c for c in REQUIRED if c not in frame.columns]
  if missing:
    raise AnalysisError(f"the results table lacks columns {missing}; is it a table written by "
                        f"`ldm-scaling eval` (ldm_scaling.eval.results)?")
  m = metric(frame, metric_name)
  data = frame.copy()
  if m.ci_column not in data.columns:  # an older table: no uncertainties (NaN: unknown)
    data[m.ci_column] = math.nan
  for column in _NUMERIC + (m.column, m.ci_column, "kid", "kid_ci95"):
    if column in data.columns:
      data[column] = pd.to_numeric(data[column], errors="coerce")
  for column in MODEL_KEYS + ("sampler",):
    if column not in data.columns:
      data[column] = ""
    # CSV reads an empty scale_schedule back as NaN: normalise to "".
    data[column] = ["" if pd.isna(v) else str(v) for v in data[column]]
  usable = (np.isfinite(data[m.column]) & np.isfinite(data["sampling_cost"]) &
            (data["sampling_cost"] > 0) & np.isfinite(data["cfg_scale"]) &
            np.isfinite(data["steps"]) & np.isfinite(data["width"]) &
            np.isfinite(data["checkpoint_step"]))
  data = data[usable].copy()
  if data.empty:
    raise NoUsableRowsError(
        f"the results table has {len(frame)} rows but none with a finite {m.column!r}, a positive "
        f"sampling_cost and numeric steps/cfg_scale/width/checkpoint_step; check the eval logs "
        f"(a cell whose FID is NaN failed)")
  for column in ("checkpoint_step", "steps", "width"):
    data[column] = data[column].astype(int)
  data["train_compute"] = data["norm_cost"] * data["checkpoint_step"]
  data["model"] = _model_labels(data)
  rank = {model: i for i, model in enumerate(models(data))}
  data["model_rank"] = data["model"].map(rank)  # sorts models by size wherever "model" would
  data = data.sort_values(["model_rank", "checkpoint_step", "sampler", "steps", "cfg_scale"],
                          kind="mergesort").reset_index(drop=True)
  return data, m


def run_name(run) -> str:
  """A row's run directory name (``../e1/swd`` -> ``swd``): how labels tell runs apart."""
  return os.path.basename(str(run).rstrip("/")) or str(run)


def _model_labels(data: pd.DataFrame) -> pd.Series:
  """``w64``, plus objective / scale schedule / run name only where needed to tell runs apart."""
  keys = data[list(MODEL_KEYS) + ["width"]].drop_duplicates()
  several_objectives = keys["objective"].nunique() > 1
  labels = {}
  for run, objective, schedule, width in keys.itertuples(index=False):
    label = f"w{width}"
    if several_objectives and objective:
      label += f" {objective}"
    if schedule:
      label += f" [{schedule}]"
    labels[(run, objective, schedule)] = label
  counts = pd.Series(list(labels.values())).value_counts()
  for key, label in labels.items():
    if counts[label] > 1:  # e.g. two seeds of one width: add the run directory's name
      labels[key] = f"{label} ({run_name(key[0])})"
  if len(set(labels.values())) < len(labels):
    labels = {key: f"{label} ({key[0]})" for key, label in labels.items()}
  return pd.Series([labels[k] for k in zip(*(data[c] for c in MODEL_KEYS))], index=data.index)


def models(data: pd.DataFrame) -> list[str]:
  """Model labels from the smallest to the largest (normalised cost, then width, then label)."""
  order = (data.groupby("model")[["norm_cost", "width"]].min().reset_index()
           .sort_values(["norm_cost", "width", "model"], na_position="last"))
  return list(order["model"])


def select_checkpoint(data: pd.DataFrame, checkpoint: Any = "latest") -> pd.DataFrame:
  """``"latest"`` (each model's last evaluated checkpoint), ``"all"``, or one step number."""
  if checkpoint == "all":
    return data
  if checkpoint == "latest":
    last = data.groupby("model")["checkpoint_step"].transform("max")
    return data[data["checkpoint_step"] == last]
  try:
    step = int(checkpoint)
  except (TypeError, ValueError):
    raise AnalysisError(f"checkpoint must be 'latest', 'all' or a step number, got "
                        f"{checkpoint!r}") from None
  out = data[data["checkpoint_step"] == step]
  if out.empty:
    raise AnalysisError(f"no rows at checkpoint step {step}; the table has steps "
                        f"{sorted(data['checkpoint_step'].unique().tolist())}")
  return out


def select_sampler(data: pd.DataFrame, sampler: str | None) -> pd.DataFrame:
  if sampler is None:
    return data
  out = data[data["sampler"] == sampler]
  if out.empty:
    raise AnalysisError(f"no rows for sampler {sampler!r}; the table has "
                        f"{sorted(data['sampler'].unique().tolist())}")
  return out


def format_params(params: float) -> str:
  if not math.isfinite(params):
    return "?"
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if params >= scale:
      return f"{params / scale:.3g}{unit}"
  return f"{params:.0f}"


def legend_label(data: pd.DataFrame, model: str) -> str:
  """``w64 (39M)``: the model label with its parameter count, as the paper's legends."""
  rows = data[data["model"] == model]
  if "params" in rows.columns and rows["params"].notna().any():
    return f"{model} ({format_params(float(rows['params'].dropna().iloc[0]))})"
  return model
