"""The paper's figures from a results table, as matplotlib ``Figure`` objects and PNG files.

* ``fig3_<metric>_vs_training_compute.png`` (paper Fig. 3): metric vs norm. cost x iterations, one
  line per model;
* ``fig8_<metric>_vs_cfg.png`` (Fig. 8): metric vs CFG scale per model, a panel per step count;
* ``fig9_<metric>_vs_sampling_cost.png`` (Fig. 9): metric at the optimal CFG vs sampling cost per
  model, with the Pareto front over sizes; a panel per sampler;
* ``fig11_<metric>_samplers.png`` (Fig. 11): each sampler against the reference one (DDIM), and
  every sampler's Pareto front;
* ``fig13_<metric>_distillation.png`` (Fig. 13; tables with distilled and undistilled models):
  each width at ``steps`` (4) steps, distilled vs not, and both against sampling cost.

Figures are built on the Agg canvas without ``pyplot``: no global state, no GUI, and a notebook's
inline backend is left alone (``display(fig)`` shows them). Cost axes are logarithmic, as the
paper's. Colours follow model size (viridis, small = dark), the same in every figure.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import pandas as pd
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import matplotlib
import matplotlib.ticker

from ldm_scaling.analysis import cfg as cfglib
from ldm_scaling.analysis import efficiency
from ldm_scaling.analysis import samplers as samplerlib
from ldm_scaling.analysis import table
from ldm_scaling.analysis import training

_PANEL = (4.2, 3.4)  # inches per panel


def _figure(n_panels: int, cols: int | None = None,
            panel: tuple[float, float] = _PANEL) -> tuple[Figure, list[Any]]:
  cols = cols or min(n_panels, 3)
  rows = -(-n_panels // cols)
  fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  return fig, axes[:n_panels]


def _colors(order: Sequence[str]) -> dict[str, Any]:
  cmap = matplotlib.colormaps["viridis"]
  positions = np.linspace(0.0, 0.9, max(len(order), 2))
  return {model: cmap(positions[i]) for i, model in enumerate(order)}


def _legend(fig: Figure, axes: list[Any]) -> None:
  handles, labels = {}, []
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      if label not in handles:
        handles[label] = handle
        labels.append(label)
  if handles:
    fig.legend([handles[l] for l in labels], labels, loc="outside right center", fontsize=8)


def _pick(values: Sequence[int], most: int) -> list[int]:
  values = sorted(values)
  if len(values) <= most:
    return values
  return [values[int(round(i))] for i in np.linspace(0, len(values) - 1, most)]


def fig_cfg(frame: pd.DataFrame, metric: str = "fid", sampler: str | None = None,
            checkpoint: Any = "latest", max_panels: int = 6) -> Figure:
  """Fig. 8: the metric vs CFG scale, one line per model, one panel per step count (at most
  ``max_panels``, spread over the range); a star marks each line's optimum."""
  data, m = table.prepare(frame, metric)
  order = table.models(data)
  sampler, _ = training.default_setting(data, sampler)
  data = table.select_sampler(table.select_checkpoint(data, checkpoint), sampler)
  best = cfglib.best_rows(data, m, cfglib.GROUP)
  colors = _colors(order)
  steps = _pick(data["steps"].unique().tolist(), max_panels)
  fig, axes = _figure(len(steps))
  for ax, n in zip(axes, steps):
    for model in order:
      line = data[(data["model"] == model) & (data["steps"] == n)].sort_values("cfg_scale")
      if line.empty:
        continue
      ax.plot(line["cfg_scale"], line[m.column], "o-", ms=3, color=colors[model],
              label=table.legend_label(data, model))
      star = best[(best["model"] == model) & (best["steps"] == n)]
      ax.plot(star["cfg_scale"], star[m.column], "*", ms=11, color=colors[model], mec="k",
              mew=0.5)
    ax.set_title(f"{sampler}, {n} steps", fontsize=10)
    ax.set_xlabel("CFG scale")
    ax.set_ylabel(m.label)
    ax.grid(alpha=0.3)
  fig.suptitle(f"{m.label} vs classifier-free guidance (star: optimum)", fontsize=11)
  _legend(fig, axes)
  return fig


def _cost_panel(ax, points: pd.DataFrame, m: table.Metric, colors, data, order,
                front: pd.DataFrame | None = None, style: str = "o-", label: bool = True,
                alpha: float = 1.0) -> None:
  for model in order:
    line = points[points["model"] == model].sort_values("sampling_cost")
    if line.empty:
      continue
    ax.plot(line["sampling_cost"], line[m.column], style, ms=3.5, color=colors[model],
            alpha=alpha, label=table.legend_label(data, model) if label else None)
  if front is not None and not front.empty:
    ax.step(front["sampling_cost"], front[m.column], where="post", ls="--", color="k", lw=1.2,
            label="Pareto front")
  ax.set_xscale("log")
  ax.set_xlabel("sampling cost (norm. cost x steps)")
  ax.set_ylabel(f"{m.label} at optimal CFG")
  ax.grid(alpha=0.3, which="both")


def fig_cost(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest") -> Figure:
  """Fig. 9: the metric at each model's optimal CFG vs sampling cost, one panel per sampler, with
  the Pareto front across sizes (dashed)."""
  data, m = table.prepare(frame, metric)
  order = table.models(data)
  points = efficiency.cost_curves(frame, metric, checkpoint)
  colors = _colors(order)
  samplers = sorted(points["sampler"].unique())
  fig, axes = _figure(len(samplers))
  for ax, sampler in zip(axes, samplers):
    mine = points[points["sampler"] == sampler]
    _cost_panel(ax, mine, m, colors, data, order, front=efficiency.front_of(mine, m))
    ax.set_title(sampler, fontsize=10)
  fig.suptitle(f"{m.label} vs sampling cost at each model's optimal CFG", fontsize=11)
  _legend(fig, axes)
  return fig


def fig_samplers(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest",
                 reference: str = "ddim") -> Figure:
  """Fig. 11: each sampler (solid) against the reference sampler (dashed) per model, then every
  sampler's Pareto front in one panel."""
  data, m = table.prepare(frame, metric)
  order = table.models(data)
  points = efficiency.cost_curves(frame, metric, checkpoint)
  colors = _colors(order)
  samplers = sorted(points["sampler"].unique())
  if reference not in samplers:
    reference = samplers[0]
  others = [s for s in samplers if s != reference]
  fig, axes = _figure(len(others) + 1)
  for ax, sampler in zip(axes, others):
    _cost_panel(ax, points[points["sampler"] == reference], m, colors, data, order, style="o--",
                label=False, alpha=0.55)
    _cost_panel(ax, points[points["sampler"] == sampler], m, colors, data, order)
    ax.set_title(f"{sampler} (solid) vs {reference} (dashed)", fontsize=10)
  ax = axes[-1]
  fronts = samplerlib.sampler_fronts(frame, metric, checkpoint)
  styles = ["-", "--", ":", "-."]
  for k, sampler in enumerate(samplers):
    front = fronts[fronts["sampler"] == sampler]
    ax.step(front["sampling_cost"], front[m.column], where="post", ls=styles[k % len(styles)],
            color="k", lw=1.3, label=f"{sampler} front")
    ax.plot(front["sampling_cost"], front[m.column], "o", ms=4, color="k")
  ax.set_xscale("log")
  ax.set_xlabel("sampling cost (norm. cost x steps)")
  ax.set_ylabel(f"best {m.label} over sizes")
  ax.set_title("Pareto front per sampler", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.suptitle(f"Samplers: {m.label} vs sampling cost at the optimal CFG", fontsize=11)
  _legend(fig, axes[:-1])
  return fig


def fig_training(frame: pd.DataFrame, metric: str = "fid", sampler: str | None = None,
                 steps: int | None = None, cfg_scale: float | str = "optimal") -> Figure:
  """Fig. 3: the metric vs training compute (norm. cost x checkpoint step), one line per model,
  all checkpoints sampled with one common setting."""
  data, m = table.prepare(frame, metric)
  order = table.models(data)
  curves = training.training_curves(frame, metric, sampler, steps, cfg_scale)
  colors = _colors(order)
  fig, (ax,) = _figure(1, panel=(6.0, 4.0))
  for model in order:
    line = curves[curves["model"] == model]
    if line.empty:
      continue
    ax.plot(line["train_compute"], line[m.column], "o-", ms=4, color=colors[model],
            label=table.legend_label(data, model))
  ax.set_xscale("log")
  ax.set_xlabel("training compute (norm. cost x iterations)")
  cfg_text = "optimal CFG" if cfg_scale == "optimal" else f"CFG {float(cfg_scale):g}"
  first = curves.iloc[0]
  ax.set_ylabel(m.label)
  fig.suptitle(f"{m.label} vs training compute ({first['sampler']}, {int(first['steps'])} steps, "
               f"{cfg_text})", fontsize=11)
  ax.grid(alpha=0.3, which="both")
  _legend(fig, [ax])
  return fig


DISTILLED = efficiency.DISTILLED   # the objectives whose models count as distilled in Fig. 13
UNDISTILLED = efficiency.UNDISTILLED
# Fig. 13's style per objective: (left-panel marker, right-panel style, colour).
_DISTILLED_STYLE = {"consistency": ("s--", "s--", "tab:red"),
                    "scale_wise": ("^:", "^:", "tab:blue")}


def distillation_points(frame: pd.DataFrame, metric: str = "fid", checkpoint: Any = "latest"
                        ) -> pd.DataFrame:
  """Per (width, objective, steps): the best optimal-CFG point over samplers (undistilled: the
  best sampler at that step count; distilled: its own sampler), with its sampling cost."""
  return efficiency.best_by_steps(frame, metric, checkpoint)


def _error_bars(ax, x, points: pd.DataFrame, column: str, color) -> None:
  """Vertical 95 % intervals where the table has them (``u_source`` = table interval); no caps,
  so the axes' lines stay the plotted curves."""
  known = (points["u_source"] == efficiency.TABLE_INTERVAL).to_numpy()
  if known.any():
    ax.errorbar(np.asarray(x)[known], points[column].to_numpy(float)[known],
                yerr=points["u"].to_numpy(float)[known], fmt="none", ecolor=color, alpha=0.6,
                capsize=0, lw=1)


def fig_distillation(frame: pd.DataFrame, metric: str = "fid", steps: int = 4,
                     checkpoint: Any = "latest") -> Figure:
  """Fig. 13: left, the metric of each width at ``steps`` steps, undistilled (best sampler and
  CFG) vs each distilled objective; right, all against sampling cost (undistilled solid,
  consistency dashed, scale-wise dotted), colours by width; 95 % intervals as bars where the table
  has them. Distilled = an objective of :data:`DISTILLED`, paired with the undistilled model of
  the same width."""
  data, m = table.prepare(frame, metric)
  best = distillation_points(frame, metric, checkpoint)
  have = set(best["objective"])
  distilled = [o for o in DISTILLED if o in have]
  if UNDISTILLED not in have or not distilled:
    raise table.AnalysisError(f"Fig. 13 needs both {UNDISTILLED!r} and distilled "
                              f"({' or '.join(map(repr, DISTILLED))}) rows; the table has "
                              f"objectives {sorted(set(data['objective']))}")
  widths = sorted(best["width"].unique())
  colors = _colors(widths)
  fig, (left, right) = _figure(2, cols=2)
  at = best[best["steps"] == steps]
  left_styles = [(UNDISTILLED, "o-", "undistilled", "k")] + [
      (o, _DISTILLED_STYLE[o][0], o, _DISTILLED_STYLE[o][2]) for o in distilled]
  for objective, marker, name, color in left_styles:
    mine = at[at["objective"] == objective].sort_values("width")
    if mine.empty and objective != UNDISTILLED:
      continue  # e.g. a scale-wise student sampled at another step count
    left.plot(mine["width"], mine[m.column], marker, color=color, label=f"{name}, {steps} steps")
    _error_bars(left, mine["width"], mine, m.column, color)
  left.set_xscale("log", base=2)
  left.set_xticks(widths, [str(w) for w in widths])
  left.set_xlabel("UNet width")
  left.set_ylabel(f"{m.label} at optimal CFG")
  left.set_title(f"{steps}-step sampling", fontsize=10)
  left.legend(fontsize=8)
  left.grid(alpha=0.3)
  right_styles = [(UNDISTILLED, "o-", "")] + [(o, _DISTILLED_STYLE[o][1], f" {o}")
                                              for o in distilled]
  for w in widths:
    for objective, style, name in right_styles:
      line = best[(best["width"] == w) & (best["objective"] == objective)]
      line = line.sort_values("sampling_cost")
      if not line.empty:
        right.plot(line["sampling_cost"], line[m.column], style, ms=3.5, color=colors[w],
                   label=f"w{w}{name}")
        _error_bars(right, line["sampling_cost"], line, m.column, colors[w])
  right.set_xscale("log")
  right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
  right.set_xlabel("sampling cost (norm. cost x steps)")
  right.set_ylabel(f"{m.label} at optimal CFG (best sampler)")
  right.set_title("vs sampling cost", fontsize=10)
  right.grid(alpha=0.3, which="both")
  fig.suptitle(f"{m.label}: distilled ({', '.join(distilled)}) vs undistilled models",
               fontsize=11)
  _legend(fig, [right])
  return fig


def save(fig: Figure, path: str, dpi: int = 120) -> str:
  """PNG to a local path or ``gs://`` (written in one piece)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
  return str(target)


def all_figures(frame: pd.DataFrame, metric: str = "fid") -> dict[str, Figure]:
  """Every figure the table supports, by file name (a CLIP Fig. 8 is added next to FID's when the
  table has one CLIP column)."""
  m = table.metric(frame, metric)
  name = m.name
  out = {f"fig8_{name}_vs_cfg.png": fig_cfg(frame, metric),
         f"fig9_{name}_vs_sampling_cost.png": fig_cost(frame, metric),
         f"fig11_{name}_samplers.png": fig_samplers(frame, metric),
         f"fig3_{name}_vs_training_compute.png": fig_training(frame, metric)}
  objectives = set(table.prepare(frame, metric)[0]["objective"])
  if UNDISTILLED in objectives and objectives & set(DISTILLED):
    out[f"fig13_{name}_distillation.png"] = fig_distillation(frame, metric)
  if name == "fid" and len(table.clip_columns(frame)) == 1:
    try:
      out["fig8_clip_vs_cfg.png"] = fig_cfg(frame, "clip")
    except table.NoUsableRowsError:
      pass  # CLIP column present but empty: FID figures only
  return out


def plot_all(frame: pd.DataFrame, out_dir: str, metric: str = "fid") -> list[str]:
  """Writes every figure as a PNG into ``out_dir`` (local or ``gs://``); returns their paths."""
  return [save(fig, str(epath.Path(out_dir) / name))
          for name, fig in all_figures(frame, metric).items()]
