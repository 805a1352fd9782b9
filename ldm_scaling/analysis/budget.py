""""Which size for my budget": the best evaluated configuration within a sampling-cost budget.

The answer is a measured cell of the table, never an interpolation: (model/width, sampler, steps,
CFG scale) with ``sampling_cost <= budget`` and the best metric; ties go to the cheaper cell, then
the smaller model, then the smaller CFG scale. By default only each model's latest checkpoint
counts (the one you would deploy).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ldm_scaling.analysis import table

# A budget equal to a cost computed in floating point (0.07 x 50 = 3.5000000000000004) fits.
_RTOL = 1e-9


class BudgetError(table.AnalysisError):
  """No evaluated configuration fits the budget."""


def _plain(value: Any) -> Any:
  """JSON-ready Python scalars."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _describe(row: pd.Series, m: table.Metric, extra: list[str]) -> dict[str, Any]:
  out = {k: _plain(row[k]) for k in ("model", "width", "sampler", "steps", "cfg_scale")}
  out["value"] = _plain(row[m.column])
  out["sampling_cost"] = _plain(row["sampling_cost"])
  for k in extra:
    out[k] = _plain(row[k])
  return out


def advise(frame: pd.DataFrame, budget: float, metric: str = "fid", sampler: str | None = None,
           checkpoint: Any = "latest") -> dict[str, Any]:
  """The best cell with ``sampling_cost <= budget``: a dict with ``width``, ``sampler``,
  ``steps``, ``cfg_scale``, ``fid``, ``sampling_cost`` (and ``model``, ``run``,
  ``checkpoint_step``, ``params``, ``value`` of the metric, CLIP columns), plus ``per_model``: each
  model's best cell within the budget, smallest model first.

  Raises :class:`BudgetError` naming the cheapest evaluated cost when nothing fits."""
  try:
    budget = float(budget)
  except (TypeError, ValueError):
    raise table.AnalysisError(f"budget must be a number, got {budget!r}") from None
  if not math.isfinite(budget) or budget <= 0:
    raise table.AnalysisError(f"budget must be a positive sampling cost (normalised cost x "
                              f"steps), got {budget:g}")
  data, m = table.prepare(frame, metric)
  data = table.select_sampler(table.select_checkpoint(data, checkpoint), sampler)
  fits = data[data["sampling_cost"] <= budget * (1 + _RTOL)]
  if fits.empty:
    cheapest = data.loc[data["sampling_cost"].idxmin()]
    raise BudgetError(
        f"nothing fits a sampling-cost budget of {budget:g}: the cheapest evaluated configuration "
        f"costs {cheapest['sampling_cost']:.4g} ({cheapest['model']}, {cheapest['sampler']}, "
        f"{int(cheapest['steps'])} steps); raise the budget to at least "
        f"{cheapest['sampling_cost']:.4g} or evaluate fewer steps / smaller models")
  ranked = fits.sort_values([m.column, "sampling_cost", "norm_cost", "width", "cfg_scale"],
                            ascending=[m.sort_ascending(), True, True, True, True],
                            kind="mergesort")
  best = ranked.iloc[0]
  extra = [c for c in ("fid", *table.clip_columns(data)) if c in data.columns]
  out: dict[str, Any] = dict(metric=m.name, metric_column=m.column, budget=budget)
  out.update(_describe(best, m, extra))
  for k in ("run", "objective", "checkpoint_step", "params", "norm_cost"):
    if k in best.index:
      out[k] = _plain(best[k])
  order = {model: i for i, model in enumerate(table.models(data))}
  firsts = ranked.groupby("model", sort=False).head(1)
  firsts = firsts.assign(_rank=firsts["model"].map(order)).sort_values("_rank")
  out["per_model"] = [_describe(row, m, extra) for _, row in firsts.iterrows()]
  return out


def format_advice(advice: dict[str, Any]) -> str:
  """Human-readable answer for the CLI."""
  label = "FID" if advice["metric"] == "fid" else advice["metric_column"]
  lines = [f"best within sampling cost {advice['budget']:g} by {label}: {advice['model']} "
           f"(width {advice['width']}), {advice['sampler']} {advice['steps']} steps, CFG "
           f"{advice['cfg_scale']:g} -> {label} {advice['value']:.4g} at cost "
           f"{advice['sampling_cost']:.4g}", "", "each model's best within the budget:"]
  for row in advice["per_model"]:
    lines.append(f"  {row['model']:<12} {row['sampler']:<6} {row['steps']:>4} steps  CFG "
                 f"{row['cfg_scale']:<5g} {label} {row['value']:.4g}  cost "
                 f"{row['sampling_cost']:.4g}")
  return "\n".join(lines)
