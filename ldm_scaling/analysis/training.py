"""Metric vs training compute per model size (Mei et al. Fig. 3).

Training compute = ``norm_cost x checkpoint_step`` (relative cost x iterations, the paper's axis;
batch size is constant within a study and left out). Every checkpoint is evaluated at one common
sampling setting, as in the paper: one sampler and step count, and either one fixed CFG scale or
each checkpoint's optimal scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ldm_scaling.analysis import cfg as cfglib
from ldm_scaling.analysis import table


def default_setting(data: pd.DataFrame, sampler: str | None = None,
                    steps: int | None = None) -> tuple[str, int]:
  """``ddim`` if present (the paper's default) else the most used sampler; the step count
  evaluated at the most (model, checkpoint) pairs, the largest among equals."""
  if sampler is None:
    counts = data["sampler"].value_counts()
    sampler = "ddim" if "ddim" in counts.index else str(counts.index[0])
  rows = table.select_sampler(data, sampler)
  if steps is None:
    coverage = rows.drop_duplicates(["steps", "model", "checkpoint_step"]).groupby("steps").size()
    steps = int(max(coverage.index, key=lambda s: (coverage[s], s)))
  return sampler, int(steps)


def training_curves(frame: pd.DataFrame, metric: str = "fid", sampler: str | None = None,
                    steps: int | None = None, cfg_scale: float | str = "optimal") -> pd.DataFrame:
  """One row per (model, checkpoint): ``train_compute`` and the metric at the common setting
  (see :func:`default_setting`); ``cfg_scale="optimal"`` picks each checkpoint's best scale."""
  data, m = table.prepare(frame, metric)
  sampler, steps = default_setting(data, sampler, steps)
  rows = table.select_sampler(data, sampler)
  rows = rows[rows["steps"] == steps]
  if rows.empty:
    raise table.AnalysisError(f"no {sampler} rows with {steps} steps; the table has steps "
                              f"{sorted(table.select_sampler(data, sampler)['steps'].unique())}")
  if cfg_scale == "optimal":
    rows = cfglib.best_rows(rows, m, cfglib.GROUP)
  else:
    try:
      scale = float(cfg_scale)
    except (TypeError, ValueError):
      raise table.AnalysisError(f"cfg_scale must be 'optimal' or a number, got "
                                f"{cfg_scale!r}") from None
    rows = rows[np.isclose(rows["cfg_scale"], scale)]
    if rows.empty:
      raise table.AnalysisError(f"no rows at CFG scale {scale:g}; the table has "
                                f"{sorted(data['cfg_scale'].unique())}")
  order = {model: i for i, model in enumerate(table.models(data))}
  out = (rows.assign(_rank=rows["model"].map(order))
         .sort_values(["_rank", "train_compute"], kind="mergesort"))
  keep = ["model", "width", "run", "objective", "checkpoint_step", "train_compute", "sampler",
          "steps", "cfg_scale", m.column, "sampling_cost"]
  out = out[keep].reset_index(drop=True)
  out.attrs["metric"] = m.column
  return out
