"""``ldm-scaling analyze``: figures plus a markdown summary of a results table.

The summary holds the numbers behind the figures: the table's provenance, the optimal CFG per
(model, sampler, steps), the Pareto front and who owns it, the crossovers between sizes, the
sampler comparison and the training-compute curve, each at each model's latest checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
from etils import epath

from ldm_scaling.analysis import cfg as cfglib
from ldm_scaling.analysis import efficiency
from ldm_scaling.analysis import figures
from ldm_scaling.analysis import samplers as samplerlib
from ldm_scaling.analysis import table
from ldm_scaling.analysis import training


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "–"
  if isinstance(value, bool):
    return "yes" if value else ""
  if isinstance(value, (int,)) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
    return str(int(value))
  if isinstance(value, float) or hasattr(value, "dtype"):
    value = float(value)
    return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
  return str(value)


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None,
                   headers: Sequence[str] | None = None) -> str:
  """A GitHub markdown table (no extra dependency)."""
  columns = list(columns or frame.columns)
  headers = list(headers or columns)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  for _, row in frame.iterrows():
    lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
  return "\n".join(lines)


def _values(frame: pd.DataFrame, column: str) -> str:
  if column not in frame.columns:
    return "–"
  unique = frame[column].dropna().unique().tolist()
  try:
    unique = sorted(unique)
  except TypeError:
    unique = sorted(unique, key=str)
  values = [_fmt(v) if isinstance(v, float) else str(v) for v in unique]
  return ", ".join(values[:10]) + (f", … ({len(values)} in all)" if len(values) > 10 else "")


def summary_markdown(frame: pd.DataFrame, metric: str = "fid", source: str | None = None,
                     figure_files: Sequence[str] = ()) -> str:
  """The markdown summary (see the module docstring)."""
  data, m = table.prepare(frame, metric)
  latest = table.select_checkpoint(data, "latest")
  out = [f"# Results analysis{f': `{source}`' if source else ''}", ""]
  models = (latest.groupby("model", sort=False)
            .agg(width=("width", "first"), params=("params", "first"),
                 norm_cost=("norm_cost", "first"), checkpoint=("checkpoint_step", "max"))
            .reindex(table.models(data)).reset_index())
  models["params"] = models["params"].map(table.format_params)
  models["checkpoints"] = [
      len(data[data["model"] == model]["checkpoint_step"].unique()) for model in models["model"]]
  out += [f"{len(frame)} rows, {len(data)} usable for {m.column}. Samplers: "
          f"{_values(data, 'sampler')}; steps: {_values(data, 'steps')}; "
          f"CFG scales: {_values(data, 'cfg_scale')}. Samples per cell (n): {_values(data, 'n')}; "
          f"FID reference: {_values(data, 'fid_reference')}; prompts: {_values(data, 'prompts')}.",
          "",
          "Conventions: sampling cost = normalised cost (FLOPs relative to width 320) x steps, as "
          "the eval job wrote it (a guided step counted once unless `cost.count_uncond_pass`); "
          "training compute = normalised cost x checkpoint step (batch size constant within a "
          "study); each model at its latest checkpoint unless stated; optimal CFG = "
          "lowest FID / highest CLIP over the scales evaluated (ties: smaller scale). See "
          "docs/analysis.md.", "",
          markdown_table(models, ["model", "width", "params", "norm_cost", "checkpoint",
                                  "checkpoints"],
                         ["model", "width", "params", "norm. cost", "latest checkpoint",
                          "checkpoints evaluated"]), ""]

  both = cfglib.optimal_cfg_both(frame) if m.name == "fid" else None
  opt = cfglib.optimal_cfg(frame, metric, "latest")
  edges = int(opt["at_grid_edge"].sum())
  out += ["## Optimal CFG scale", "",
          "Per (model, sampler, steps). *edge* (`at_grid_edge`): the optimum is the smallest "
          "(bottom) or largest (top) scale evaluated, so the true optimum may lie outside the "
          f"grid and the value is only a bound — {edges} of {len(opt)} cells here. ± : the 95 % "
          "half-width of the metric (the eval's half-sample resampling; – where the table has "
          "none).", ""]
  if both is not None and "cfg_clip" in both.columns:
    clip = [c for c in both.columns if c.startswith("clip_score[")][0]
    out.append(markdown_table(
        both, ["model", "sampler", "steps", "sampling_cost", "cfg_fid", "fid", "fid_ci95",
               "cfg_fid_grid_edge", "cfg_clip", clip],
        ["model", "sampler", "steps", "sampling cost", "CFG* (FID)", "FID", "±", "edge",
         "CFG* (CLIP)", clip]))
  else:
    out.append(markdown_table(opt, ["model", "sampler", "steps", "sampling_cost", "cfg_scale",
                                    m.column, m.ci_column, "grid_edge"],
                              ["model", "sampler", "steps", "sampling cost", "CFG*", m.column,
                               "±", "edge"]))
  out.append("")

  out += ["## Pareto front over sizes (optimal CFG)", "",
          "Segments of the lower-left frontier of (sampling cost, metric): the owner is the best "
          "model from `cost from` up to `cost to` (the next owner's first point). *beyond noise*: "
          "somewhere in the segment the owner leads the best other model within the same budget "
          "by more than their combined uncertainty (see below).", ""]
  noise = efficiency.noise_estimate(frame, metric)
  for sampler in sorted(data["sampler"].unique()):
    front = efficiency.front_significance(efficiency.pareto_front(frame, metric, sampler), frame,
                                          metric, sampler, noise=noise)
    segments = efficiency.frontier_segments(front, m.column)
    out += [f"**{sampler}**", "", markdown_table(
        segments, ["model", "cost_from", "cost_to", "steps", f"{m.column}_from",
                   f"{m.column}_to", "significant"],
        ["owner", "cost from", "cost to", "steps on front", f"{m.column} from", f"{m.column} to",
         "beyond noise"]), ""]

  cross = efficiency.crossovers(frame, metric)
  out += ["## Crossovers between sizes", "",
          "The sampling cost beyond which the bigger model is better at its optimal CFG (curves "
          "interpolated linearly in log cost, compared only where both were measured; "
          "`bigger_better_throughout`: the cost given is the start of the common range). "
          "`small steps` / `big steps`: steps each model affords at that cost.", ""]
  if cross.empty:
    out.append("(fewer than two models per sampler)")
  else:
    out.append(markdown_table(
        cross, ["sampler", "small", "big", "crossover_cost", "status", "small_steps",
                "big_steps", "overlap_from", "overlap_to"],
        ["sampler", "small", "big", "crossover cost", "status", "small steps", "big steps",
         "common range from", "to"]))
  out.append("")

  comparisons = efficiency.budget_comparisons(frame, metric, noise=noise)
  sources = set(comparisons["u_source"])
  out += ["## Wins beyond the uncertainty", "",
          "Each pair of sizes at every sampling budget both can meet: each model's best measured "
          "point within the budget; a model wins when better by more than sqrt(u_a² + u_b²), u "
          "being the 95 % half-width of each point (the table's interval, from the eval's "
          "half-sample resampling), or where the table has none, the "
          f"noise estimate / √2 (noise estimate: {_fmt(noise, 3)}, the largest move of a model's "
          f"optimal-CFG {m.column} in the wrong direction as its steps grow). Uncertainties used: "
          f"{', '.join(sorted(sources)) or '–'}. A win against an optimum at the top of its CFG "
          "grid is not counted. The pair's outcome for the paper's pattern, judged at the lowest "
          "and the highest common budget: `supports` (the smaller wins at the lowest and the bigger "
          "at the highest), `contradicts` (the bigger wins at the lowest or the smaller at the "
          "highest), else `within noise`; `small wins` / `big wins` count the decisive wins at "
          "every budget. Advantage: how much better the bigger model is (± combined u).", ""]
  if comparisons.empty:
    out.append("(fewer than two models per sampler)")
  else:
    evidence = efficiency.pair_evidence(comparisons)
    for end in ("low", "high"):
      evidence[f"{end}_adv"] = [f"{a:+.3g} ± {u:.2g}" for a, u in
                                zip(evidence[f"{end}_advantage"], evidence[f"{end}_u"])]
    out.append(markdown_table(
        evidence, ["sampler", "small", "big", "outcome", "low_budget", "low_adv", "low_winner",
                   "high_budget", "high_adv", "high_winner", "small_wins", "big_wins", "budgets",
                   "edge_discounted"],
        ["sampler", "small", "big", "outcome", "lowest budget", "advantage", "winner",
         "highest budget", "advantage", "winner", "small wins", "big wins", "budgets",
         "wins vs edge (not counted)"]))
  out.append("")

  if data["sampler"].nunique() > 1:
    comp = samplerlib.sampler_comparison(frame, metric)
    samplers = sorted(data["sampler"].unique())
    out += ["## Sampler comparison (optimal CFG)", "", markdown_table(
        comp, ["model", "steps", "sampling_cost", *samplers, "best_sampler"],
        ["model", "steps", "sampling cost", *samplers, "best"]), ""]

  distilled = efficiency.distillation_comparison(frame, metric, noise=noise)
  if not distilled.empty:
    out += _distillation_section(distilled, m)

  curves = training.training_curves(frame, metric)
  first = curves.iloc[0]
  out += ["## Training compute", "",
          f"{m.label} at {first['sampler']}, {int(first['steps'])} steps, optimal CFG, per "
          f"checkpoint.", "", markdown_table(
              curves, ["model", "checkpoint_step", "train_compute", "cfg_scale", m.column],
              ["model", "checkpoint", "training compute", "CFG*", m.column]), ""]
  if figure_files:
    out += ["## Figures", ""] + [f"![{name}]({name})" for name in figure_files] + [""]
  return "\n".join(out)


def _distillation_section(comp: pd.DataFrame, m) -> list[str]:
  """The student-vs-teacher table of :func:`efficiency.distillation_comparison`."""
  def value(v, u, cfg, edge):
    if not math.isfinite(v):
      return "–"
    return f"{v:.4g} ± {_fmt(u, 2)} (CFG {cfg:g}{', ' + edge + ' edge' if edge else ''})"
  view = pd.DataFrame({
      "width": comp["width"], "objective": comp["objective"], "steps": comp["steps"],
      "student": [value(*r) for r in zip(comp["student"], comp["student_u"], comp["student_cfg"],
                                         comp["student_edge"])]})
  for ref, name in (("same", "teacher, same steps"), ("most", "teacher, most steps")):
    view[name] = [f"{value(v, u, c, e)} {sampler} {steps}" if math.isfinite(v) else "–"
                  for v, u, c, e, sampler, steps in zip(
                      comp[f"{ref}_value"], comp[f"{ref}_u"], comp[f"{ref}_cfg"],
                      comp[f"{ref}_edge"], comp[f"{ref}_sampler"], comp[f"{ref}_steps"])]
    view[f"{name}: student advantage"] = [
        f"{a:+.3g} ± {_fmt(u, 2)} → {o}" if math.isfinite(a) else o for a, u, o in zip(
            comp[f"{ref}_advantage"], comp[f"{ref}_u_combined"],
            comp[f"{ref}_outcome"])]
  return ["## Distilled vs undistilled (optimal CFG)", "",
          f"Each distilled ({', '.join(f'`{o}`' for o in efficiency.DISTILLED)}) model at each "
          f"of its step counts against the "
          f"undistilled model of the same width at the same steps and at its most steps, every "
          f"point at its optimal CFG and the undistilled at its best sampler. ± : 95 % "
          f"half-widths; advantage > 0: the student is better ({m.column}), by more than the "
          "combined uncertainty or else *within noise*. *edge*: the optimum is at an end of its "
          "CFG grid.", "", markdown_table(view), ""]


def analyze(frame: pd.DataFrame, out_dir: str, metric: str = "fid",
            source: str | None = None) -> dict[str, Any]:
  """Writes the figures and ``summary.md`` into ``out_dir`` (local or ``gs://``)."""
  paths = figures.plot_all(frame, out_dir, metric)
  names = [epath.Path(p).name for p in paths]
  text = summary_markdown(frame, metric, source=source, figure_files=names)
  summary = epath.Path(out_dir) / "summary.md"
  summary.write_text(text)
  return dict(figures=paths, summary=str(summary))
