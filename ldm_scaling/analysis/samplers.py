"""Sampler comparison (Mei et al. Fig. 11): the same models, steps and costs, different samplers.

The paper's finding to check: a sampler changes how good each model is at a given cost (DPM-Solver++
beats DDIM at few steps), not which sizes are the most efficient.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ldm_scaling.analysis import efficiency
from ldm_scaling.analysis import table


def sampler_comparison(frame: pd.DataFrame, metric: str = "fid",
                       checkpoint: Any = "latest") -> pd.DataFrame:
  """One row per (model, checkpoint, steps): the metric at the optimal CFG under each sampler (one
  column per sampler, NaN where not evaluated), ``sampling_cost`` and ``best_sampler``."""
  points = efficiency.cost_curves(frame, metric, checkpoint)
  column = points.attrs["metric"]
  m = table.metric(points, "fid" if column == "fid" else column)
  samplers = sorted(points["sampler"].unique())
  keys = ["model", "width", "checkpoint_step", "steps"]
  wide = points.pivot_table(index=keys, columns="sampler", values=column, aggfunc="first",
                            sort=False)
  cost = points.groupby(keys, sort=False)["sampling_cost"].first()
  wide = wide.reindex(columns=samplers)
  wide.columns.name = None
  best = wide.idxmax(axis=1) if m.higher_is_better else wide.idxmin(axis=1)
  out = wide.assign(sampling_cost=cost, best_sampler=best).reset_index()
  order = {model: i for i, model in enumerate(dict.fromkeys(points["model"]))}
  out = (out.assign(_rank=out["model"].map(order))
         .sort_values(["_rank", "checkpoint_step", "steps"], kind="mergesort")
         .drop(columns="_rank").reset_index(drop=True))
  out = out[keys + ["sampling_cost"] + samplers + ["best_sampler"]]
  out.attrs["metric"] = column
  return out


def sampler_fronts(frame: pd.DataFrame, metric: str = "fid",
                   checkpoint: Any = "latest") -> pd.DataFrame:
  """The Pareto front over all model sizes, once per sampler (rows carry their ``sampler``)."""
  data, m = table.prepare(frame, metric)
  fronts = [efficiency.pareto_front(frame, metric, sampler, checkpoint)
            for sampler in sorted(data["sampler"].unique())]
  out = pd.concat(fronts, ignore_index=True)
  out.attrs["metric"] = m.column
  return out
