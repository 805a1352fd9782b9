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

Noise-aware comparisons (what the study's verdict uses). Every optimal-CFG point carries an
uncertainty ``u``: the half-width of its metric's 95 % interval (``fid_ci95`` /
``clip_score_ci95[...]``, the eval job's half-sample resampling) where the table has it, else the
*noise estimate* divided by sqrt(2): the largest move of a model's optimal-CFG metric in the wrong
direction when its steps grow (FID should not rise with more steps), so that two such points
differ meaningfully only by more than that move. One model *wins* over another only when the
difference exceeds the combined uncertainty sqrt(u_a^2 + u_b^2). Comparisons are made at equal
sampling *budgets*: a model's value at budget c is its best measured point costing <= c (as
:func:`ldm_scaling.analysis.advise` picks; no interpolation, no extrapolation), at every budget
where both models have a point. A win against a point whose CFG optimum is at the *top* of the
grid it was chosen on does not count: that value is only an upper bound on the model's optimal one.
:func:`pair_evidence` reads a pair's comparisons at the lowest and the highest common budget.
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
  the last: the owner of the largest measured costs). A front from :func:`front_significance`
  adds ``significant`` (some point of the segment leads the runner-up beyond the uncertainties)
  and ``contested`` (some other model could meet one of its budgets at all)."""
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
    if "significant" in front.columns:  # from front_significance: does the owner lead beyond noise?
      rows[-1]["significant"] = bool(part["significant"].any())
      rows[-1]["contested"] = bool((part["runner_up"] != "").any())
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


# -------------------------------------------------------------------------------------------------
# Noise-aware comparisons (see the module docstring).


def noise_estimate(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest",
                   sampler: str | None = None) -> float:
  """The largest move of a model's optimal-CFG metric in the wrong direction (FID up, CLIP down)
  between consecutive step counts of one (model, sampler) curve: 0 when every curve improves
  monotonically, NaN when no curve has two step counts."""
  points, m, _ = _optimal(frame, metric, checkpoint, sampler)
  sign = -1.0 if m.higher_is_better else 1.0
  rises = [float(max(0.0, (sign * part.sort_values("steps")[m.column]).diff().max()))
           for _, part in points.groupby(["model", "checkpoint_step", "sampler"]) if len(part) > 1]
  return max(rises) if rises else math.nan


TABLE_INTERVAL = "table interval"  # u from the table's *_ci95 column (the eval's resampling)
NOISE_ESTIMATE = "noise estimate"  # u from the noise estimate (no *_ci95 in the table)


def _joint_source(a, b) -> str:
  """The ``u_source`` of a comparison: ``table interval`` only when both points have one."""
  return TABLE_INTERVAL if a["u_source"] == b["u_source"] == TABLE_INTERVAL else NOISE_ESTIMATE


def with_uncertainty(points: pd.DataFrame, m: table.Metric, noise: float) -> pd.DataFrame:
  """``points`` plus ``u`` (95 % half-width of the metric) and ``u_source`` (``table interval``
  where the table has the CI, ``noise estimate`` = ``noise`` / sqrt(2) elsewhere)."""
  out = points.copy()
  ci = (pd.to_numeric(out[m.ci_column], errors="coerce") if m.ci_column in out.columns
        else pd.Series(math.nan, index=out.index))
  known = np.isfinite(ci.to_numpy(float))
  out["u"] = np.where(known, ci.to_numpy(float), noise / math.sqrt(2.0))
  out["u_source"] = np.where(known, TABLE_INTERVAL, NOISE_ESTIMATE)
  return out


def _noisy_points(frame, metric, checkpoint, sampler, noise):
  points, m, order = _optimal(frame, metric, checkpoint, sampler)
  if noise is None:
    noise = noise_estimate(frame, metric, checkpoint)
  return with_uncertainty(points, m, noise), m, order, noise


def best_within(points: pd.DataFrame, column: str, budget: float,
                higher_is_better: bool = False) -> pd.Series | None:
  """The best row of ``points`` costing at most ``budget`` (ties: the cheaper), or None."""
  fits = points[points["sampling_cost"] <= budget * (1 + 1e-9)]
  if fits.empty:
    return None
  ordered = fits.sort_values([column, "sampling_cost"], ascending=[not higher_is_better, True],
                             kind="mergesort")
  return ordered.iloc[0]


def _compare(a: pd.Series, b: pd.Series, m: table.Metric) -> dict:
  """b vs a: ``diff`` > 0 when b is better (in either metric direction), ``u`` combined."""
  sign = 1.0 if m.higher_is_better else -1.0
  diff = sign * (float(b[m.column]) - float(a[m.column]))
  u = math.hypot(float(a["u"]), float(b["u"]))
  return dict(diff=diff, u=u)


def budget_comparisons(frame: pd.DataFrame, metric: str = "fid", sampler: str | None = None,
                       checkpoint: Any = "latest", noise: float | None = None) -> pd.DataFrame:
  """Each (smaller, bigger) pair of models, per sampler, at every budget both can meet (the costs
  either measured, from the dearer of their cheapest points up): each model's best point within
  the budget, their difference, the combined uncertainty and the winner (``small``, ``big`` or
  ``none``: within noise, or the loser's optimum at an open end of its CFG grid, where it may
  improve beyond the grid — ``loser_at_edge``; see ``cfg.best_rows``).
  ``advantage`` = how much better the bigger model is (> 0: bigger better)."""
  points, m, order, noise = _noisy_points(frame, metric, checkpoint, sampler, noise)
  rows = []
  for sampler_name in sorted(points["sampler"].unique()):
    by_model = {model: part for model, part in
                points[points["sampler"] == sampler_name].groupby("model")}
    present = [model for model in order if model in by_model]
    for i, small in enumerate(present):
      for big in present[i + 1:]:
        a, b = by_model[small], by_model[big]
        start = max(a["sampling_cost"].min(), b["sampling_cost"].min())
        budgets = sorted({float(c) for c in pd.concat([a["sampling_cost"], b["sampling_cost"]])
                          if c >= start})
        for budget in budgets:
          pa = best_within(a, m.column, budget, m.higher_is_better)
          pb = best_within(b, m.column, budget, m.higher_is_better)
          c = _compare(pa, pb, m)
          winner = "big" if c["diff"] > c["u"] else "small" if -c["diff"] > c["u"] else "none"
          loser = pa if winner == "big" else pb if winner == "small" else None
          at_edge = bool(loser is not None and loser["open_edge"])
          rows.append(dict(
              sampler=sampler_name, small=small, big=big, budget=budget,
              small_steps=int(pa["steps"]), big_steps=int(pb["steps"]),
              small_value=float(pa[m.column]), big_value=float(pb[m.column]),
              small_u=float(pa["u"]), big_u=float(pb["u"]), advantage=c["diff"], u=c["u"],
              winner="none" if at_edge else winner, loser_at_edge=at_edge,
              u_source=_joint_source(pa, pb)))
  out = pd.DataFrame(rows, columns=[
      "sampler", "small", "big", "budget", "small_steps", "big_steps", "small_value", "big_value",
      "small_u", "big_u", "advantage", "u", "winner", "loser_at_edge", "u_source"])
  out.attrs.update(metric=m.column, noise=noise)
  return out


# Pair outcomes of :func:`pair_evidence`.
SUPPORTS, CONTRADICTS, WITHIN_NOISE = "supports", "contradicts", "within noise"


def pair_evidence(comparisons: pd.DataFrame) -> pd.DataFrame:
  """Per (sampler, small, big) of :func:`budget_comparisons`, what the pair says about the paper's
  pattern (smaller better at low cost, bigger better at high cost), judged at the two ends of the
  budgets both models can meet — the lowest (``low_*``: the smaller model with the most steps it
  affords vs the bigger one's cheapest point) and the highest (``high_*``: each at its best):

  * ``supports``: the smaller model wins at the lowest budget and the bigger one at the highest;
  * ``contradicts``: the bigger model wins at the lowest budget, or the smaller one at the highest;
  * ``within noise``: otherwise (no decisive win at either end, or only the expected one).

  Only the two ends are judged, so that a study with many budgets does not find a "win" by chance
  (with 95 % intervals, about one comparison in twenty is decisive on noise alone); the wins at
  every budget are counted (``small_wins``, ``big_wins``) for the reader. ``low_edge`` /
  ``high_edge``: the end's win was not counted because the loser's CFG optimum is at the top of
  its grid."""
  rows = []
  for (sampler, small, big), part in comparisons.groupby(["sampler", "small", "big"], sort=False):
    part = part.sort_values("budget")
    low, high = part.iloc[0], part.iloc[-1]
    supports = low["winner"] == "small" and high["winner"] == "big"
    against = low["winner"] == "big" or high["winner"] == "small"
    rows.append(dict(
        sampler=sampler, small=small, big=big,
        outcome=SUPPORTS if supports else CONTRADICTS if against else WITHIN_NOISE,
        low_budget=float(low["budget"]), low_winner=low["winner"],
        low_edge=bool(low["loser_at_edge"]), high_edge=bool(high["loser_at_edge"]),
        low_advantage=float(low["advantage"]), low_u=float(low["u"]),
        high_budget=float(high["budget"]), high_winner=high["winner"],
        high_advantage=float(high["advantage"]), high_u=float(high["u"]),
        small_wins=int((part["winner"] == "small").sum()),
        big_wins=int((part["winner"] == "big").sum()), budgets=len(part),
        edge_discounted=int(part["loser_at_edge"].sum())))
  return pd.DataFrame(rows, columns=[
      "sampler", "small", "big", "outcome", "low_budget", "low_winner", "low_advantage", "low_u",
      "high_budget", "high_winner", "high_advantage", "high_u", "low_edge", "high_edge",
      "small_wins", "big_wins", "budgets", "edge_discounted"])


def front_significance(front: pd.DataFrame, frame: pd.DataFrame, metric: str = "fid",
                       sampler: str | None = None, checkpoint: Any = "latest",
                       noise: float | None = None) -> pd.DataFrame:
  """``front`` (from :func:`pareto_front`) plus, per point, the runner-up: the best other model's
  best point within the same budget (``runner_up``, ``runner_up_value``), the owner's ``lead`` over
  it, the combined uncertainty ``lead_u`` and ``significant`` (lead > lead_u; False when no other
  model can meet the budget: the point is uncontested, not a win)."""
  points, m, _, noise = _noisy_points(frame, metric, checkpoint, sampler, noise)
  sign = -1.0 if m.higher_is_better else 1.0
  out = front.copy()
  extra = dict(runner_up=[], runner_up_value=[], lead=[], lead_u=[], significant=[], u=[])
  for _, point in out.iterrows():
    mine = points[(points["model"] == point["model"]) & (points["sampler"] == point["sampler"]) &
                  (points["sampling_cost"] == point["sampling_cost"])].iloc[0]
    rival = best_within(points[points["model"] != point["model"]], m.column,
                        float(point["sampling_cost"]), m.higher_is_better)
    extra["u"].append(float(mine["u"]))
    if rival is None:
      for key, value in (("runner_up", ""), ("runner_up_value", math.nan), ("lead", math.nan),
                         ("lead_u", math.nan), ("significant", False)):
        extra[key].append(value)
      continue
    lead = sign * (float(rival[m.column]) - float(point[m.column]))
    lead_u = math.hypot(float(mine["u"]), float(rival["u"]))
    extra["runner_up"].append(rival["model"])
    extra["runner_up_value"].append(float(rival[m.column]))
    extra["lead"].append(lead)
    extra["lead_u"].append(lead_u)
    extra["significant"].append(bool(lead > lead_u))
  for key, values in extra.items():
    out[key] = values
  out.attrs.update(front.attrs, noise=noise)
  return out


def size_effect(frame: pd.DataFrame, metric: str = "fid", factor: float = 3.0,
                sampler: str | None = None, checkpoint: Any = "latest",
                noise: float | None = None) -> dict | None:
  """Does model size matter measurably? The largest model's best value within the highest
  sampling budget of the table (its largest measured cost; any sampler unless ``sampler``) vs the
  smallest model's best within the same budget: ``met`` when the largest is better by more than
  ``factor`` x the combined uncertainty (issue 20's criterion, factor 3). None with one model."""
  points, m, order, noise = _noisy_points(frame, metric, checkpoint, sampler, noise)
  present = [model for model in order if model in set(points["model"])]
  if len(present) < 2:
    return None
  budget = float(points["sampling_cost"].max())
  small = best_within(points[points["model"] == present[0]], m.column, budget, m.higher_is_better)
  big = best_within(points[points["model"] == present[-1]], m.column, budget, m.higher_is_better)
  c = _compare(small, big, m)
  return dict(metric=m.column, budget=budget, factor=factor, small=present[0], big=present[-1],
              small_value=float(small[m.column]), big_value=float(big[m.column]),
              small_u=float(small["u"]), big_u=float(big["u"]),
              small_setting=f"{small['sampler']} {int(small['steps'])} steps CFG "
                            f"{float(small['cfg_scale']):g}",
              big_setting=f"{big['sampler']} {int(big['steps'])} steps CFG "
                          f"{float(big['cfg_scale']):g}",
              advantage=c["diff"], u=c["u"],
              ratio=_ratio(c["diff"], c["u"]), met=bool(c["diff"] > factor * c["u"]),
              at_grid_edge=[x["model"] for x in (small, big) if x["open_edge"]],
              grid_edges={x["model"]: x["grid_edge"] for x in (small, big) if x["open_edge"]},
              u_source=_joint_source(small, big), noise=noise)


def _ratio(diff: float, u: float) -> float:
  if not math.isfinite(u):
    return math.nan
  if u > 0:
    return diff / u
  return math.copysign(math.inf, diff) if diff else math.nan


DISTILLED = ("consistency", "scale_wise")  # the objectives whose models count as distilled
UNDISTILLED = "denoising"


def best_by_steps(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest",
                  noise: float | None = None) -> pd.DataFrame:
  """Per (width, objective, steps): the best optimal-CFG point over samplers (undistilled: the
  best sampler at that step count; distilled: its own sampler), with ``u`` / ``u_source``."""
  points, m, _, _ = _noisy_points(frame, metric, checkpoint, None, noise)
  points = points[points["objective"].isin([*DISTILLED, UNDISTILLED])]
  keys = ["width", "objective", "steps"]
  ordered = points.sort_values([*keys, m.column], ascending=[True] * 3 + [m.sort_ascending()],
                               kind="mergesort")
  out = ordered.groupby(keys, sort=False).head(1).reset_index(drop=True)
  out.attrs["metric"] = m.column
  return out


def distillation_comparison(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest",
                            noise: float | None = None) -> pd.DataFrame:
  """Each distilled model's (``objective`` in :data:`DISTILLED`) optimal-CFG point at each of its
  step counts against the undistilled model of the same width: at the same steps (``same``) and at the undistilled model's most
  steps (``most``), each at its best sampler and optimal CFG. ``<ref>_advantage`` > 0: the
  student is better; ``<ref>_u``: the reference's 95 % half-width, ``<ref>_u_combined``: both
  points' together; ``<ref>_outcome``: ``student better`` / ``teacher better`` / ``within
  noise`` (a difference no larger than the combined uncertainty). ``*_edge``: the CFG optimum
  sits at an end of its grid (a bound, not an optimum). Empty when the table has no matched
  pair."""
  best = best_by_steps(frame, metric, checkpoint, noise)
  m = table.metric(frame, metric)
  rows = []
  for width, part in best.groupby("width", sort=True):
    teacher = part[part["objective"] == UNDISTILLED]
    students = part[part["objective"].isin(DISTILLED)]
    if teacher.empty or students.empty:
      continue
    most = teacher.loc[teacher["steps"].idxmax()]
    order = {name: i for i, name in enumerate(DISTILLED)}
    students = students.assign(_order=students["objective"].map(order))
    for _, s in students.sort_values(["_order", "steps"], kind="mergesort").iterrows():
      row = dict(width=int(width), objective=s["objective"], steps=int(s["steps"]),
                 student=s[m.column], student_u=s["u"],
                 student_cfg=float(s["cfg_scale"]), student_edge=s["grid_edge"],
                 student_cost=float(s["sampling_cost"]))
      same = teacher[teacher["steps"] == s["steps"]]
      for ref, t in (("same", same.iloc[0] if len(same) else None), ("most", most)):
        if t is None:
          row.update({f"{ref}_{k}": math.nan for k in ("value", "u", "advantage", "u_combined",
                                                       "cost")})
          row.update({f"{ref}_sampler": "", f"{ref}_cfg": math.nan, f"{ref}_edge": "",
                      f"{ref}_steps": 0, f"{ref}_outcome": "not measured"})
          continue
        c = _compare(t, s, m)
        row.update({f"{ref}_value": t[m.column], f"{ref}_u": t["u"], f"{ref}_sampler": t["sampler"],
                    f"{ref}_steps": int(t["steps"]), f"{ref}_cfg": float(t["cfg_scale"]),
                    f"{ref}_edge": t["grid_edge"], f"{ref}_cost": float(t["sampling_cost"]),
                    f"{ref}_advantage": c["diff"], f"{ref}_u_combined": c["u"],
                    f"{ref}_outcome": ("within noise" if abs(c["diff"]) <= c["u"] else
                                       "student better" if c["diff"] > 0 else "teacher better")})
      rows.append(row)
  out = pd.DataFrame(rows)
  out.attrs["metric"] = m.column
  return out
