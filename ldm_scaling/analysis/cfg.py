"""Optimal classifier-free guidance scale per (model, checkpoint, sampler, steps).

Mei et al. (Sec. 3.3.1) find that the best CFG scale differs between model sizes and step counts,
so every comparison across sizes is made at each model's own optimal scale: by FID (lowest) or by
CLIP score (highest). Ties go to the smaller scale (the cheaper-to-tune, less saturated choice).
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from ldm_scaling.analysis import table

# One optimum per group: a model at one checkpoint, sampled with one sampler and step count.
GROUP = ("model", "run", "objective", "scale_schedule", "width", "checkpoint_step", "sampler",
         "steps")


def best_rows(data: pd.DataFrame, m: table.Metric, keys: Sequence[str]) -> pd.DataFrame:
  """The best row (by ``m``) of each ``keys`` group of prepared rows, with the CFG range scanned.

  ``cfg_at_edge`` marks optima at the smallest or largest scale tried: the true optimum may lie
  outside the grid."""
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
  best["cfg_at_edge"] = (best["n_cfg"] > 1) & ((best["cfg_scale"] == best["cfg_min"]) |
                                                (best["cfg_scale"] == best["cfg_max"]))
  return best.reset_index(drop=True)


def optimal_cfg(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "all",
                sampler: str | None = None) -> pd.DataFrame:
  """One row per (model, checkpoint, sampler, steps): the row at the CFG scale that optimises
  ``metric`` (``fid``: min, ``clip``: max), all its columns kept, plus ``n_cfg``, ``cfg_min``,
  ``cfg_max`` and ``cfg_at_edge``. ``checkpoint``: ``"all"``, ``"latest"`` or a step."""
  data, m = table.prepare(frame, metric)
  data = table.select_sampler(table.select_checkpoint(data, checkpoint), sampler)
  out = best_rows(data, m, GROUP)
  front = [*GROUP, "cfg_scale", m.column, "sampling_cost", "norm_cost", "train_compute"]
  out = out[front + [c for c in out.columns if c not in front and c != "model_rank"]]
  out.attrs["metric"] = m.column
  return out


def optimal_cfg_both(frame: pd.DataFrame, checkpoint: Any = "latest") -> pd.DataFrame:
  """FID-optimal and (when the table has one CLIP column) CLIP-optimal scales side by side:
  ``cfg_fid``, ``fid``, ``cfg_clip``, ``<clip column>`` per (model, checkpoint, sampler, steps)."""
  by_fid = optimal_cfg(frame, "fid", checkpoint)
  keep = [*GROUP, "sampling_cost", "cfg_scale", "fid", "cfg_at_edge"]
  out = by_fid[keep].rename(columns={"cfg_scale": "cfg_fid", "cfg_at_edge": "cfg_fid_at_edge"})
  if len(table.clip_columns(frame)) == 1:
    by_clip = optimal_cfg(frame, "clip", checkpoint)
    column = by_clip.attrs["metric"]
    clip = by_clip[[*GROUP, "cfg_scale", column, "cfg_at_edge"]].rename(
        columns={"cfg_scale": "cfg_clip", "cfg_at_edge": "cfg_clip_at_edge"})
    out = out.merge(clip, on=list(GROUP), how="left")
  return out
