"""Cells evaluated at several seeds: the mean and the spread, optimal CFG and the Pareto front on
the means, and the scale-wise check of issue 17's E1 (SwD vs its full-scale counterpart).

A seed is a row's ``seed`` (``eval.seed``: which noise and prompts' order the cell sampled from);
the spread of a cell is ``max - min`` of its FIDs over seeds, the honest width of "within noise"
when only a few seeds exist (no interval is estimated from three values).

    python -m ldm_scaling.analysis.seeds runs/e1/results/seed0 runs/e1/results/seed1 ... \
        [--out summary.md]

A results table holds one row per cell: evaluating it again at another seed would replace the
row (the eval job refuses: ``grid.OtherSeedError``). So each seed is evaluated into its own
table, and the summary reads them all (``docs/swd/e1.sh`` does).
"""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from ldm_scaling.analysis import cfg as cfglib
from ldm_scaling.analysis import efficiency
from ldm_scaling.analysis import table

CELL = (*cfglib.GROUP, "cfg_scale")


def seed_spread(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest"
                ) -> pd.DataFrame:
  """One row per cell (model, checkpoint, sampler, steps, CFG): the metric's mean over seeds (in
  the metric's own column), ``<metric>_min`` / ``_max`` / ``_spread`` and ``n_seeds``, and the
  cell's ``sampling_cost``. Two rows of one cell at one seed (a duplicate evaluation) are
  refused."""
  data, m = table.prepare(frame, metric)
  data = table.select_checkpoint(data, checkpoint)
  if "seed" not in data.columns:
    raise table.AnalysisError("the results table has no 'seed' column")
  keys = list(CELL)
  dup = data.duplicated(keys + ["seed"])
  if dup.any():
    raise table.AnalysisError(f"{int(dup.sum())} rows repeat a cell at a seed it already has "
                              f"(e.g. {data.loc[dup, keys].iloc[0].to_dict()})")
  grouped = data.groupby(keys, sort=False)
  out = grouped.agg(**{m.column: (m.column, "mean"), f"{m.name}_min": (m.column, "min"),
                       f"{m.name}_max": (m.column, "max"), "n_seeds": ("seed", "nunique"),
                       "sampling_cost": ("sampling_cost", "first"),
                       "model_rank": ("model_rank", "first"),
                       "norm_cost": ("norm_cost", "first")}).reset_index()
  out[f"{m.name}_spread"] = out[f"{m.name}_max"] - out[f"{m.name}_min"]
  out.attrs["metric"] = m.column
  return out


def optimal_means(spread: pd.DataFrame, metric: str = "fid") -> pd.DataFrame:
  """Each (model, sampler, steps)'s best CFG by the mean over seeds, with ``on_front``: the point
  lies on the lower-left (cost, mean) frontier of all of them."""
  m = table.metric(spread, metric)
  best = cfglib.best_rows(spread, m, cfglib.GROUP)
  front = efficiency.front_of(best, m)
  on = set(zip(front["model"], front["sampler"], front["steps"]))
  best["on_front"] = [k in on for k in zip(best["model"], best["sampler"], best["steps"])]
  return best.sort_values(["sampling_cost", m.column], kind="mergesort").reset_index(drop=True)


def _run_names(points: pd.DataFrame) -> pd.Series:
  return points["run"].map(table.run_name)


def scalewise_check(points: pd.DataFrame, swd_run: str, full_run: str, metric: str = "fid",
                    max_cost_ratio: float = 0.75) -> dict[str, Any]:
  """Issue 17's success test: the SwD student (``swd_run``, a run directory's name) on the front,
  at < ``max_cost_ratio`` of its full-scale counterpart's sampling cost, with a mean within the
  counterpart's seed spread (or better)."""
  m = table.metric(points, metric)
  names = _run_names(points)
  rows = {}
  for name in (swd_run, full_run):
    hit = points[names == name]
    if len(hit) != 1:
      raise table.AnalysisError(f"expected one optimal point of run {name!r}, found {len(hit)} "
                                f"(runs: {sorted(set(names))})")
    rows[name] = hit.iloc[0]
  swd, full = rows[swd_run], rows[full_run]
  sign = -1.0 if m.higher_is_better else 1.0
  diff = float(swd[m.column] - full[m.column])          # > 0: worse FID (or better CLIP)
  spread = float(full[f"{m.name}_spread"])
  cost_ratio = float(swd["sampling_cost"] / full["sampling_cost"])
  within = sign * diff <= spread
  out = dict(swd=float(swd[m.column]), swd_spread=float(swd[f"{m.name}_spread"]),
             full=float(full[m.column]), full_spread=spread, difference=diff,
             cost_ratio=cost_ratio, cheap_enough=cost_ratio < max_cost_ratio,
             within_spread_or_better=bool(within), on_front=bool(swd["on_front"]))
  out["success"] = bool(out["cheap_enough"] and within and out["on_front"])
  return out


def markdown(points: pd.DataFrame, metric: str = "fid") -> str:
  m = table.metric(points, metric)
  lines = [f"| model | sampler | steps | CFG | sampling cost | {m.label} mean [min-max] | seeds "
           f"| on front |", "|---|---|---|---|---|---|---|---|"]
  for r in points.itertuples(index=False):
    d = r._asdict()
    lines.append(f"| {d['model']} | {d['sampler']} | {d['steps']} | {d['cfg_scale']:g} | "
                 f"{d['sampling_cost']:.4g} | {d[m.column]:.1f} [{d[m.name + '_min']:.1f}-"
                 f"{d[m.name + '_max']:.1f}] | {d['n_seeds']} | {'yes' if d['on_front'] else ''} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  from ldm_scaling.eval import results
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("results", nargs="+", help="results tables (one per seed) or results.csv files")
  p.add_argument("--metric", default="fid")
  p.add_argument("--swd", default="swd", help="the SwD student's run directory name")
  p.add_argument("--full", default="full", help="its full-scale counterpart's run directory name")
  p.add_argument("--out", help="also write the markdown here")
  args = p.parse_args(argv)
  frame = pd.concat([results.load(path) for path in args.results], ignore_index=True)
  points = optimal_means(seed_spread(frame, args.metric), args.metric)
  text = markdown(points, args.metric)
  names = set(_run_names(points))
  if {args.swd, args.full} <= names:
    check = scalewise_check(points, args.swd, args.full, args.metric)
    text += "\nSwD vs full scale: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()) + "\n"
  print(text, end="")
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
