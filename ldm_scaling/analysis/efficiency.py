"""Sampling efficiency across model sizes: metric vs sampling cost at each model's optimal CFG.

This is Mei et al.'s Fig. 9 analysis. Three views of the same optimal-CFG points:

* :func:`cost_curves`: per model and sampler, one point per step count (cost = norm. cost x steps);
* :func:`pareto_front`: the lower-left frontier over all sizes (no cheaper point is better), and
  :func:`frontier_segments`: which model owns which stretch of sampling cost;
* :func:`crossovers`: for each pair (smaller, bigger), the sampling cost beyond which the bigger
  model is better.

Crossover convention: each model's curve is interpolated linearly in log(sampling cost) between its
measured points (no extrapolation), the two curves are compared on the cost range both were
measured on, and the crossover is the last point of that range where the bigger model stops being
worse: beyond it, up to the largest common cost, the bigger model is strictly better. Curves that
cross several times (noise) report the last crossing and the count in ``crossings``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from ldm_scaling.analysis import cfg as cfglib
from ldm_scaling.analysis import table

CURVE = ("model", "checkpoint_step", "sampler")


def _optimal(frame, metric, checkpoint, sampler) -> tuple[pd.DataFrame, table.Metric, list[str]]:
  data, m = table.prepare(frame, metric)
  order = table.models(data)
  data = table.select_sampler(table.select_checkpoint(data, checkpoint), sampler)
  return cfglib.best_rows(data, m, cfglib.GROUP), m, order


def _sorted(points: pd.DataFrame, order: list[str]) -> pd.DataFrame:
  rank = {model: i for i, model in enumerate(order)}
  return (points.assign(_rank=points["model"].map(rank))
          .sort_values(["_rank", "checkpoint_step", "sampler", "sampling_cost"], kind="mergesort")
          .drop(columns="_rank").reset_index(drop=True))


def cost_curves(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest",
                sampler: str | None = None) -> pd.DataFrame:
  """Optimal-CFG points, sorted per (model, checkpoint, sampler) curve by sampling cost, models
  from the smallest to the largest."""
  points, m, order = _optimal(frame, metric, checkpoint, sampler)
  out = _sorted(points, order)
  out.attrs["metric"] = m.column
  return out


def front_of(points: pd.DataFrame, m: table.Metric) -> pd.DataFrame:
  """Points no cheaper-or-equal point beats: sorted by cost, each strictly better than all
  before it (equal cost: the better point first, so only it survives)."""
  ordered = points.sort_values(["sampling_cost", m.column, "width"],
                               ascending=[True, m.sort_ascending(), True], kind="mergesort")
  sign = 1.0 if m.higher_is_better else -1.0
  keep, best = [], -math.inf
  for index, value in zip(ordered.index, ordered[m.column]):
    if sign * value > best:
      keep.append(index)
      best = sign * value
  return ordered.loc[keep].reset_index(drop=True)


def pareto_front(frame: pd.DataFrame, metric: str = "fid", sampler: str | None = None,
                 checkpoint: Any = "latest") -> pd.DataFrame:
  """The lower-left frontier of (sampling cost, metric) over every model's optimal-CFG points
  (``sampler=None``: over all samplers together), sorted by cost."""
  points, m, _ = _optimal(frame, metric, checkpoint, sampler)
  front = front_of(points, m)
  front.attrs["metric"] = m.column
  return front


def frontier_segments(front: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
  """Runs of consecutive frontier points from one (model, sampler): who owns which costs.

  ``cost_from`` is the segment's first point; ``cost_to`` the next segment's first point (NaN for
  the last: the owner of the largest measured costs)."""
  column = metric or front.attrs.get("metric", "fid")
  if front.empty:
    return pd.DataFrame(columns=["model", "width", "sampler", "cost_from", "cost_to", "steps",
                                 f"{column}_from", f"{column}_to"])
  owner = list(zip(front["model"], front["sampler"]))
  starts = [i for i in range(len(front)) if i == 0 or owner[i] != owner[i - 1]]
  rows = []
  for k, start in enumerate(starts):
    end = starts[k + 1] if k + 1 < len(starts) else len(front)
    part = front.iloc[start:end]
    rows.append(dict(
        model=part["model"].iloc[0], width=int(part["width"].iloc[0]),
        sampler=part["sampler"].iloc[0], cost_from=float(part["sampling_cost"].iloc[0]),
        cost_to=float(front["sampling_cost"].iloc[end]) if end < len(front) else math.nan,
        steps=",".join(str(int(s)) for s in part["steps"]),
        **{f"{column}_from": float(part[column].iloc[0]),
           f"{column}_to": float(part[column].iloc[-1])}))
  return pd.DataFrame(rows)


@dataclasses.dataclass(frozen=True)
class Crossover:
  """Where a bigger model's curve gets below a smaller one's (see the module docstring).

  status: ``crossover`` (``cost`` is the crossing), ``bigger_better_throughout`` (the bigger model
  is better on the whole common range; ``cost`` is its start, an upper bound), ``never`` (the
  bigger model is not better at the largest common cost; ``cost`` None) or ``no_overlap`` (the
  curves share no cost range; ``cost`` None)."""
  cost: float | None
  status: str
  overlap: tuple[float, float] | None
  crossings: int = 0


def crossover(small: pd.DataFrame, big: pd.DataFrame, column: str,
              higher_is_better: bool = False) -> Crossover:
  """The crossover of two curves given as frames with ``sampling_cost`` and ``column``."""
  def curve(points):
    best = (points.groupby("sampling_cost")[column].max() if higher_is_better
            else points.groupby("sampling_cost")[column].min())
    x = np.log(best.index.to_numpy(float))
    y = best.to_numpy(float) * (-1.0 if higher_is_better else 1.0)  # lower is better from here
    return x, y
  xs, ys = curve(small)
  xb, yb = curve(big)
  lo, hi = max(xs[0], xb[0]), min(xs[-1], xb[-1])
  if lo > hi:
    return Crossover(None, "no_overlap", None)
  knots = np.unique(np.concatenate([[lo, hi], xs[(xs >= lo) & (xs <= hi)],
                                    xb[(xb >= lo) & (xb <= hi)]]))
  # Both curves are linear between consecutive knots, so their difference is too: its zeros
  # between knots are exact.
  diff = np.interp(knots, xb, yb) - np.interp(knots, xs, ys)  # < 0: the bigger model is better
  overlap = (float(math.exp(lo)), float(math.exp(hi)))
  crossings = int(np.sum((diff[:-1] >= 0) & (diff[1:] < 0)))
  if diff[-1] >= 0:
    return Crossover(None, "never", overlap, crossings)
  worse = np.nonzero(diff >= 0)[0]
  if not len(worse):
    return Crossover(overlap[0], "bigger_better_throughout", overlap, crossings)
  k = int(worse[-1])
  t = diff[k] / (diff[k] - diff[k + 1])
  return Crossover(float(math.exp(knots[k] + t * (knots[k + 1] - knots[k]))), "crossover",
                   overlap, crossings)


def crossovers(frame: pd.DataFrame, metric: str = "fid", sampler: str | None = None,
               checkpoint: Any = "latest") -> pd.DataFrame:
  """Every (smaller, bigger) pair of models, per sampler (``sampler=None``: each sampler in the
  table), compared at their optimal-CFG curves. ``small_steps`` / ``big_steps`` are the step counts
  each model affords at the crossover cost (cost / normalised cost)."""
  points, m, order = _optimal(frame, metric, checkpoint, sampler)
  rows = []
  for sampler_name in sorted(points["sampler"].unique()):
    by_model = {model: part for model, part in points[points["sampler"] == sampler_name]
                .groupby("model")}
    present = [model for model in order if model in by_model]
    for i, small in enumerate(present):
      for big in present[i + 1:]:
        result = crossover(by_model[small], by_model[big], m.column, m.higher_is_better)
        small_cost = float(by_model[small]["norm_cost"].iloc[0])
        big_cost = float(by_model[big]["norm_cost"].iloc[0])
        cost = result.cost if result.cost is not None else math.nan
        rows.append(dict(
            sampler=sampler_name, small=small, big=big,
            small_width=int(by_model[small]["width"].iloc[0]),
            big_width=int(by_model[big]["width"].iloc[0]),
            crossover_cost=cost, status=result.status, crossings=result.crossings,
            overlap_from=result.overlap[0] if result.overlap else math.nan,
            overlap_to=result.overlap[1] if result.overlap else math.nan,
            small_steps=cost / small_cost if small_cost > 0 else math.nan,
            big_steps=cost / big_cost if big_cost > 0 else math.nan))
  out = pd.DataFrame(rows, columns=[
      "sampler", "small", "big", "small_width", "big_width", "crossover_cost", "status",
      "crossings", "overlap_from", "overlap_to", "small_steps", "big_steps"])
  out.attrs["metric"] = m.column
  return out
