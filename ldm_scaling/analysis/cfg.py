"""Optimal classifier-free guidance scale per (model, checkpoint, sampler, steps).

Mei et al. (Sec. 3.3.1) find that the best CFG scale differs between model sizes and step counts,
so every comparison across sizes is made at each model's own optimal scale: by FID (lowest) or by
CLIP score (highest). Ties go to the smaller scale (the cheaper-to-tune, less saturated choice).

An optimum at the smallest or largest scale evaluated is not bracketed: the true optimum may lie
outside the grid, and the metric there is only a bound on the optimal one. Such rows are flagged
(``at_grid_edge``; ``grid_edge`` says which end). CFG 1 is the end of the useful range (the
conditional model alone; below it the sample moves toward the unconditional model's, which nobody
samples), so an optimum at a smallest scale of 1 or less is bracketed by that range; every other
edge optimum is *open* (``open_edge``): reports and verdicts discount those, and ``ldm-scaling
study`` extends the grid past them, in both directions (``study.extend_cfg``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ldm_scaling.analysis import table

# The smallest CFG scale worth sampling: 1 is the conditional model alone (no guidance).
CFG_FLOOR = 1.0

# One optimum per group: a model at one checkpoint, sampled with one sampler and step count.
GROUP = ("model", "run", "objective", "scale_schedule", "width", "checkpoint_step", "sampler",
         "steps")


def best_rows(data: pd.DataFrame, m: table.Metric, keys: Sequence[str]) -> pd.DataFrame:
  """The best row (by ``m``) of each ``keys`` group of prepared rows, with the CFG range scanned.

  ``at_grid_edge`` marks optima at the smallest or largest scale tried (of a scan of at least two
  scales): the true optimum may lie outside the grid. ``grid_edge`` is ``"top"``, ``"bottom"`` or
  ``""``; ``open_edge`` excludes a bottom at or below :data:`CFG_FLOOR` (nothing lower is worth
  sampling); ``cfg_at_edge`` is the older name of ``at_grid_edge``."""
  keys = list(keys)
  order = ["model_rank" if k == "model" else k for k in keys]  # models by size, not by label
  ordered = data.sort_values([*order, m.column, "cfg_scale"],
                             ascending=[True] * len(keys) + [m.sort_ascending(), True],
                             kind="mergesort")
  grouped = ordered.groupby(keys, sort=False)
  best = grouped.head(1).copy()
  scan = grouped["cfg_scale"].agg(["count", "min", "max"])
  scan.columns = ["n_cfg", "cfg_min", "cfg_max"]
  best = best.merge(scan, left_on=keys, right_index=True, how="left")
  scanned = best["n_cfg"] > 1
  top = scanned & (best["cfg_scale"] == best["cfg_max"])
  bottom = scanned & (best["cfg_scale"] == best["cfg_min"])
  best["grid_edge"] = np.where(top, "top", np.where(bottom, "bottom", ""))
  best["at_grid_edge"] = top | bottom
  best["open_edge"] = top | (bottom & (best["cfg_scale"] > CFG_FLOOR + 1e-9))
  best["cfg_at_edge"] = best["at_grid_edge"]
  return best.reset_index(drop=True)


def optimal_cfg(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "all",
                sampler: str | None = None) -> pd.DataFrame:
  """One row per (model, checkpoint, sampler, steps): the row at the CFG scale that optimises
  ``metric`` (``fid``: min, ``clip``: max), all its columns kept, plus ``n_cfg``, ``cfg_min``,
  ``cfg_max``, ``at_grid_edge`` (bool), ``grid_edge`` (top | bottom | ""), ``open_edge`` (bool:
  at the top, or at the bottom above :data:`CFG_FLOOR`; the optimum may lie beyond the grid) and
  ``cfg_at_edge`` (= ``at_grid_edge``). ``checkpoint``: ``"all"``, ``"latest"`` or a step."""
  data, m = table.prepare(frame, metric)
  data = table.select_sampler(table.select_checkpoint(data, checkpoint), sampler)
  out = best_rows(data, m, GROUP)
  front = [*GROUP, "cfg_scale", m.column, m.ci_column, "at_grid_edge", "sampling_cost", "norm_cost",
           "train_compute"]
  out = out[front + [c for c in out.columns if c not in front and c != "model_rank"]]
  out.attrs["metric"] = m.column
  return out


def optimal_cfg_both(frame: pd.DataFrame, checkpoint: Any = "latest") -> pd.DataFrame:
  """FID-optimal and (when the table has one CLIP column) CLIP-optimal scales side by side:
  ``cfg_fid``, ``fid``, ``cfg_clip``, ``<clip column>`` per (model, checkpoint, sampler, steps)."""
  by_fid = optimal_cfg(frame, "fid", checkpoint)
  keep = [*GROUP, "sampling_cost", "cfg_scale", "fid", "fid_ci95", "cfg_at_edge", "grid_edge"]
  out = by_fid[keep].rename(columns={"cfg_scale": "cfg_fid", "cfg_at_edge": "cfg_fid_at_edge",
                                     "grid_edge": "cfg_fid_grid_edge"})
  if len(table.clip_columns(frame)) == 1:
    by_clip = optimal_cfg(frame, "clip", checkpoint)
    column = by_clip.attrs["metric"]
    clip = by_clip[[*GROUP, "cfg_scale", column, "cfg_at_edge"]].rename(
        columns={"cfg_scale": "cfg_clip", "cfg_at_edge": "cfg_clip_at_edge"})
    out = out.merge(clip, on=list(GROUP), how="left")
  return out
