"""Analysis layer: optimal CFG, Pareto front, crossovers, advice, figures and CLI on a hand-made
table whose answers are worked out by hand below, plus the shipped example table."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ldm_scaling import analysis, cli
from ldm_scaling.analysis import table as tablelib
from ldm_scaling.eval import results

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLE = os.path.join(REPO, "notebooks", "example_results", "results.csv")
CLIP = "clip_score[local-clip-small]"

# Normalised costs are powers of two so that log-cost interpolation is easy by hand: with 8 and
# 32 steps, log2(sampling cost) is w64: 0, 2; w128: 1, 3; w320: 3, 5.
NORM = {64: 0.125, 128: 0.25, 320: 1.0}
# (width, checkpoint, steps) -> FID at CFG 2, 4, 6. Optimum marked; ties go to the smaller scale.
FID = {
    (64, 1000, 8): (29.0, 28.0, 28.5),    # CFG 4 -> 28      cost 1
    (64, 1000, 32): (25.0, 24.0, 23.5),   # CFG 6 -> 23.5    cost 4   (edge of the grid)
    (128, 1000, 8): (27.0, 26.0, 26.0),   # tie: CFG 4 -> 26 cost 2
    (128, 1000, 32): (22.0, 20.0, 21.0),  # CFG 4 -> 20      cost 8
    (320, 1000, 8): (27.0, 25.0, 26.0),   # CFG 4 -> 25      cost 8
    (320, 1000, 32): (19.5, 19.0, 20.0),  # CFG 4 -> 19      cost 32
    (64, 500, 8): (27.5, 27.0, 27.2),     # an earlier checkpoint, *better* than the latest at
}                                         # cost 1: only checkpoint="all" may use it
CFGS = (2.0, 4.0, 6.0)


def _row(width, step, steps, cfg, fid, clip):
  return dict(run=f"/runs/w{width}", checkpoint_step=step, objective="denoising", sampler="ddim",
              steps=steps, cfg_scale=cfg, scale_schedule="", width=width,
              params=width * 1_000_000, norm_cost=NORM[width],
              sampling_cost=NORM[width] * steps, fid=fid, n=100, seed=0, prompts="hand",
              fid_reference="hand", config_hash="x", wall_s=0.0, time=0.0, **{CLIP: clip})


def hand_rows():
  rows = []
  for (width, step, steps), fids in FID.items():
    for cfg, fid in zip(CFGS, fids):
      # CLIP grows with the scale (optimum 6) except for w320 at 8 steps (optimum 4).
      clip = 27.0 if (width, steps, cfg) == (320, 8, 4.0) else 20.0 + cfg
      rows.append(_row(width, step, steps, cfg, fid, clip))
  # A failed cell (NaN metrics) must be ignored, never chosen.
  rows.append(_row(320, 1000, 32, 8.0, math.nan, math.nan))
  return rows


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
  """The hand table as the analysis sees it in practice: written to CSV and read by load()."""
  path = tmp_path_factory.mktemp("hand") / "results.csv"
  pd.DataFrame(hand_rows()).to_csv(path, index=False)
  return results.load(str(path))


def test_optimal_cfg_by_fid_and_clip(hand):
  opt = analysis.optimal_cfg(hand, "fid")
  got = {(r.width, r.checkpoint_step, r.steps): (r.cfg_scale, r.fid, r.cfg_at_edge, r.n_cfg)
         for r in opt.itertuples()}
  assert got == {(64, 1000, 8): (4.0, 28.0, False, 3), (64, 1000, 32): (6.0, 23.5, True, 3),
                 (128, 1000, 8): (4.0, 26.0, False, 3), (128, 1000, 32): (4.0, 20.0, False, 3),
                 (320, 1000, 8): (4.0, 25.0, False, 3), (320, 1000, 32): (4.0, 19.0, False, 3),
                 (64, 500, 8): (4.0, 27.0, False, 3)}
  assert list(dict.fromkeys(opt["model"])) == ["w64", "w128", "w320"]  # by size, not by label
  clip = analysis.optimal_cfg(hand, "clip", checkpoint="latest")
  assert {(r.width, r.steps): r.cfg_scale for r in clip.itertuples()} == {
      (64, 8): 6.0, (64, 32): 6.0, (128, 8): 6.0, (128, 32): 6.0, (320, 8): 4.0, (320, 32): 6.0}
  assert clip.attrs["metric"] == CLIP


def test_pareto_front_and_owners(hand):
  front = analysis.pareto_front(hand, "fid")
  # Points (cost, FID): w64 (1, 28) (4, 23.5); w128 (2, 26) (8, 20); w320 (8, 25) (32, 19).
  # Sorted by cost, each kept point beats every cheaper one; (8, 25) loses to (8, 20).
  assert list(zip(front["model"], front["sampling_cost"], front["fid"])) == [
      ("w64", 1.0, 28.0), ("w128", 2.0, 26.0), ("w64", 4.0, 23.5), ("w128", 8.0, 20.0),
      ("w320", 32.0, 19.0)]
  segments = analysis.frontier_segments(front)
  assert list(segments["model"]) == ["w64", "w128", "w64", "w128", "w320"]
  assert list(segments["cost_from"]) == [1.0, 2.0, 4.0, 8.0, 32.0]
  assert segments["cost_to"].tolist()[:4] == [2.0, 4.0, 8.0, 32.0]
  assert math.isnan(segments["cost_to"].iloc[-1])
  # The earlier checkpoint's better point (1, 27) counts only when asked for.
  every = analysis.pareto_front(hand, "fid", checkpoint="all")
  assert (every["sampling_cost"].iloc[0], every["fid"].iloc[0]) == (1.0, 27.0)


def test_crossovers_by_hand(hand):
  cross = analysis.crossovers(hand, "fid").set_index(["small", "big"])
  # w64 vs w128, common log2-cost range [1, 2]. w64 at x=1 (halfway 28 -> 23.5): 25.75; w128 at
  # x=1: 26 -> difference big - small = +0.25. At x=2: w128 halfway 26 -> 20 = 23, w64 23.5 ->
  # -0.5. Zero at x = 1 + 0.25 / 0.75 = 4/3: cost 2 ** (4/3).
  row = cross.loc[("w64", "w128")]
  assert row["status"] == "crossover"
  assert row["crossover_cost"] == pytest.approx(2 ** (4 / 3), rel=1e-12)
  assert row["small_steps"] == pytest.approx(2 ** (4 / 3) / 0.125)
  assert (row["overlap_from"], row["overlap_to"]) == pytest.approx((2.0, 4.0))
  # w64 (costs 1-4) and w320 (8-32) share no cost.
  assert cross.loc[("w64", "w320"), "status"] == "no_overlap"
  assert math.isnan(cross.loc[("w64", "w320"), "crossover_cost"])
  # w128 vs w320 meet only at cost 8, where w128 (20) beats w320 (25): never.
  assert cross.loc[("w128", "w320"), "status"] == "never"
  assert math.isnan(cross.loc[("w128", "w320"), "crossover_cost"])


def test_crossover_bigger_better_throughout_and_clip_direction():
  small = pd.DataFrame({"sampling_cost": [1.0, 4.0], "v": [30.0, 26.0]})
  big = pd.DataFrame({"sampling_cost": [2.0, 8.0], "v": [25.0, 20.0]})
  result = analysis.crossover(small, big, "v")
  assert (result.status, result.cost, result.overlap) == ("bigger_better_throughout", 2.0,
                                                          (2.0, 4.0))
  # Higher is better (CLIP): the same curves negated cross at the same cost as with FID.
  small = pd.DataFrame({"sampling_cost": [1.0, 4.0], "v": [-28.0, -23.5]})
  big = pd.DataFrame({"sampling_cost": [2.0, 8.0], "v": [-26.0, -20.0]})
  result = analysis.crossover(small, big, "v", higher_is_better=True)
  assert result.status == "crossover" and result.cost == pytest.approx(2 ** (4 / 3))


def test_noise_aware_comparisons_by_hand(hand):
  """Latest-checkpoint optima (cost: FID): w64 1: 28, 4: 23.5 (CFG 6, top of the grid); w128
  2: 26, 8: 20; w320 8: 25, 32: 19. Every curve improves with steps, so without CIs the noise
  estimate is 0 and every gap counts, except wins over w64's top-of-grid point."""
  opt = analysis.optimal_cfg(hand, "fid", checkpoint="latest")
  assert {(r.width, r.steps) for r in opt.itertuples() if r.at_grid_edge} == {(64, 32)}
  assert set(opt["grid_edge"]) == {"", "top"}
  assert analysis.noise_estimate(hand) == 0.0
  comp = analysis.budget_comparisons(hand)
  got = {(r.small, r.big, r.budget): (r.small_value, r.big_value, r.winner, r.loser_at_edge)
         for r in comp.itertuples()}
  assert got == {
      ("w64", "w128", 2.0): (28.0, 26.0, "big", False),
      ("w64", "w128", 4.0): (23.5, 26.0, "small", False),
      ("w64", "w128", 8.0): (23.5, 20.0, "none", True),    # w64's 23.5 is a top-of-grid optimum
      ("w64", "w320", 8.0): (23.5, 25.0, "small", False),
      ("w64", "w320", 32.0): (23.5, 19.0, "none", True),
      ("w128", "w320", 8.0): (20.0, 25.0, "small", False),
      ("w128", "w320", 32.0): (20.0, 19.0, "big", False)}
  assert set(comp["u_source"]) == {"noise estimate"} and (comp["u"] == 0).all()
  evidence = analysis.pair_evidence(comp).set_index(["small", "big"])["outcome"].to_dict()
  assert evidence == {("w64", "w128"): "contradicts",    # w128 wins at the lowest budget
                      ("w64", "w320"): "within noise",
                      ("w128", "w320"): "supports"}       # w128 at 8, w320 at 32
  # With 95 % half-widths of 1.5 everywhere a win needs a gap > 1.5 * sqrt(2) = 2.12.
  noisy = hand.assign(fid_ci95=1.5)
  comp = analysis.budget_comparisons(noisy)
  assert set(comp["u_source"]) == {"table interval"}
  assert comp["u"].to_numpy() == pytest.approx(1.5 * math.sqrt(2))
  assert {(r.small, r.big, r.budget) for r in comp.itertuples() if r.winner != "none"} == {
      ("w64", "w128", 4.0), ("w128", "w320", 8.0)}
  assert set(analysis.pair_evidence(comp)["outcome"]) == {"within noise"}
  front = analysis.front_significance(analysis.pareto_front(noisy, "fid", "ddim"), noisy)
  assert list(front["model"]) == ["w64", "w128", "w64", "w128", "w320"]
  assert math.isnan(front["lead"][0])  # w64 at cost 1: no other model fits; uncontested
  assert list(front["significant"]) == [False, False, True, True, False]
  assert list(front["lead"].round(2))[1:] == [2.0, 2.5, 3.5, 1.0]
  assert list(front["runner_up"]) == ["", "w64", "w128", "w64", "w128"]
  assert list(analysis.frontier_segments(front)["significant"]) == [False, False, True, True,
                                                                    False]
  effect = analysis.size_effect(noisy)  # budget 32: w320's 19 vs w64's 23.5 (a top-edge point)
  assert (effect["small_value"], effect["big_value"], effect["budget"]) == (23.5, 19.0, 32.0)
  assert effect["ratio"] == pytest.approx(4.5 / (1.5 * math.sqrt(2)))  # 2.12: not > 3
  assert not effect["met"] and analysis.size_effect(noisy, factor=2.0)["met"]
  assert effect["at_grid_edge"] == ["w64"]


def test_advise(hand):
  # Budget 5: cells of cost 1, 2 and 4 fit; the best is w64, 32 steps, CFG 6 (FID 23.5, cost 4).
  advice = analysis.advise(hand, 5)
  assert {k: advice[k] for k in ("width", "sampler", "steps", "cfg_scale", "fid",
                                 "sampling_cost")} == dict(
      width=64, sampler="ddim", steps=32, cfg_scale=6.0, fid=23.5, sampling_cost=4.0)
  assert [(r["model"], r["value"]) for r in advice["per_model"]] == [("w64", 23.5),
                                                                      ("w128", 26.0)]
  # A budget equal to a cost fits: budget 8 -> w128, 32 steps, CFG 4 (20 beats w320's 25).
  assert (analysis.advise(hand, 8)["width"], analysis.advise(hand, 8)["fid"]) == (128, 20.0)
  assert analysis.advise(hand, 5, metric="clip")["cfg_scale"] == 6.0
  json.dumps(advice)  # plain Python values only


def test_advise_budget_rounding():
  frame = pd.DataFrame([dict(_row(64, 1, 50, 4.0, 20.0, 0.0), norm_cost=0.07,
                             sampling_cost=0.07 * 50)])  # 3.5000000000000004
  assert analysis.advise(frame, 3.5)["steps"] == 50


def test_budget_too_small_and_bad_budget(hand):
  with pytest.raises(analysis.BudgetError, match=r"cheapest evaluated configuration costs 1 "):
    analysis.advise(hand, 0.5)
  with pytest.raises(analysis.AnalysisError, match="positive"):
    analysis.advise(hand, -1)


def test_empty_and_unusable_tables(hand, tmp_path):
  with pytest.raises(results.EmptyTableError, match="no rows"):
    analysis.optimal_cfg(pd.DataFrame())
  header_only = tmp_path / "empty.csv"
  header_only.write_text(",".join(results.COLUMNS) + "\n")
  with pytest.raises(results.EmptyTableError, match="no rows"):
    results.load(str(header_only))
  nan = hand.assign(fid=np.nan)
  for call in (lambda: analysis.pareto_front(nan), lambda: analysis.advise(nan, 10),
               lambda: analysis.plot_all(nan, str(tmp_path / "figs"))):
    with pytest.raises(tablelib.NoUsableRowsError, match="none with a finite 'fid'"):
      call()
  assert issubclass(tablelib.NoUsableRowsError, results.EmptyTableError)
  with pytest.raises(analysis.AnalysisError, match="unknown metric"):
    analysis.optimal_cfg(hand, "lpips")


def test_training_compute_curve(hand):
  curves = analysis.training_curves(hand)
  # Default setting: ddim at 8 steps, the step count evaluated at the most (model, checkpoint)
  # pairs (4, against 3 for 32 steps). Training compute = norm. cost x checkpoint step.
  assert list(zip(curves["model"], curves["train_compute"], curves["fid"])) == [
      ("w64", 62.5, 27.0), ("w64", 125.0, 28.0), ("w128", 250.0, 26.0), ("w320", 1000.0, 25.0)]
  fixed = analysis.training_curves(hand, steps=32, cfg_scale=2)
  assert list(fixed["fid"]) == [25.0, 22.0, 19.5]


def test_figures_and_summary(hand, tmp_path):
  fig = analysis.fig_cost(hand)
  ax = fig.axes[0]
  assert ax.get_xscale() == "log"
  # one line per model + the Pareto front
  assert [l.get_label() for l in ax.get_lines()] == ["w64 (64M)", "w128 (128M)", "w320 (320M)",
                                                       "Pareto front"]
  paths = analysis.plot_all(hand, str(tmp_path / "figs"))
  assert sorted(os.path.basename(p) for p in paths) == sorted([
      "fig8_fid_vs_cfg.png", "fig9_fid_vs_sampling_cost.png", "fig11_fid_samplers.png",
      "fig3_fid_vs_training_compute.png", "fig8_clip_vs_cfg.png"])
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = analysis.summary_markdown(hand, source="hand")
  assert f"| ddim | w64 | w128 | {2 ** (4 / 3):.4g} | crossover |" in text
  # CFG* by FID (no CI in this table: "–"; interior: no edge) and by CLIP.
  assert "| w128 | ddim | 8 | 2 | 4 | 26 | – |  | 6 | 26 |" in text
  assert "| w64 | ddim | 32 | 4 | 6 | 23.5 | – | top | 6 | 26 |" in text
  assert ("| ddim | w128 | w320 | supports | 8 | -5 ± 0 | small | 32 | +1 ± 0 | big | 1 | 1 | 2 "
          "| 0 |") in text  # see test_noise_aware_comparisons_by_hand


def test_distillation_figure_pairs_students_with_their_undistilled_width(hand, tmp_path):
  """Fig. 13 from the hand table plus consistency students of w64 and w128 (lcm, cfg 1): at 8
  steps the undistilled points are the optimal-CFG FIDs worked out above (28, 26, 25), the
  students' are their own; the cost panel has one solid and one dashed line per width."""
  students = []
  for width, fids in ((64, {4: 27.0, 8: 24.0}), (128, {4: 25.0, 8: 21.5})):
    for steps, fid in fids.items():
      row = _row(width, 200, steps, 1.0, fid, 25.0)
      row.update(run=f"/runs/w{width}-consistency", objective="consistency", sampler="lcm")
      students.append(row)
  path = tmp_path / "results.csv"
  pd.DataFrame(hand_rows() + students).to_csv(path, index=False)
  frame = results.load(str(path))
  points = analysis.distillation_points(frame)
  at8 = points[points["steps"] == 8].set_index(["objective", "width"])["fid"]
  assert at8.to_dict() == {("consistency", 64): 24.0, ("consistency", 128): 21.5,
                           ("denoising", 64): 28.0, ("denoising", 128): 26.0,
                           ("denoising", 320): 25.0}
  fig = analysis.fig_distillation(frame, steps=8)
  left, right = fig.axes[:2]
  undistilled, distilled = left.get_lines()
  assert list(undistilled.get_xdata()) == [64, 128, 320]
  assert list(undistilled.get_ydata()) == [28.0, 26.0, 25.0]
  assert list(distilled.get_ydata()) == [24.0, 21.5]
  assert [l.get_label() for l in right.get_lines()] == [
      "w64", "w64 consistency", "w128", "w128 consistency", "w320"]
  assert "fig13_fid_distillation.png" in analysis.all_figures(frame)
  with pytest.raises(tablelib.AnalysisError, match="needs both 'denoising' and distilled"):
    analysis.fig_distillation(hand)


def test_scale_wise_students_sit_beside_consistency_students(hand, tmp_path):
  """A SwD student of w64 (4 scale-wise steps, cost 2.2 full steps) beside the consistency
  student: both are compared with the w64 teacher at 4 steps and drawn as their own lines."""
  rows = hand_rows()
  for objective, sampler, fid, schedule, cost in (("consistency", "lcm", 27.0, "", 4.0),
                                                  ("scale_wise", "swd", 26.0, "8-10-12-16", 2.2)):
    row = _row(64, 200, 4, 1.0, fid, 25.0)
    row.update(run=f"/runs/w64-{objective}", objective=objective, sampler=sampler,
               scale_schedule=schedule)
    row["sampling_cost"] = row["norm_cost"] * cost
    rows.append(row)
  path = tmp_path / "results.csv"
  pd.DataFrame(rows).to_csv(path, index=False)
  frame = results.load(str(path))
  comp = analysis.distillation_comparison(frame)
  assert list(comp["objective"]) == ["consistency", "scale_wise"]
  assert list(comp["student"]) == [27.0, 26.0] and set(comp["steps"]) == {4}
  fig = analysis.fig_distillation(frame, steps=4)
  left, right = fig.axes[:2]
  assert [l.get_label() for l in left.get_lines()] == [
      "undistilled, 4 steps", "consistency, 4 steps", "scale_wise, 4 steps"]
  assert "w64 scale_wise" in [l.get_label() for l in right.get_lines()]
  swd = [l for l in right.get_lines() if l.get_label() == "w64 scale_wise"][0]
  norm = frame[frame["objective"] == "scale_wise"]["norm_cost"].iloc[0]
  assert list(swd.get_xdata()) == pytest.approx([norm * 2.2])  # its measured cost, not 4 steps
  assert "| 64 | scale_wise | 4 | 26" in analysis.summary_markdown(frame)


def test_distillation_comparison_by_hand(tmp_path):
  """A guidance-conditioned student of w64 (lcm, CFG 1/2/3) against its teacher, every cell with
  fid_ci95 1 (combined sqrt(2)): the teacher's optimal-CFG points are 28 at 8 steps and 23.5 at
  its most (32) steps, with CFG 6 at the top of its grid; it has no 4-step cells."""
  rows = [dict(r, fid_ci95=1.0) for r in hand_rows()]
  for steps, fids in ((4, (30.0, 24.0, 26.0)), (8, (23.0, 22.0, 22.5))):
    for cfg, fid in zip((1.0, 2.0, 3.0), fids):
      rows.append(dict(_row(64, 200, steps, cfg, fid, 25.0), run="/runs/w64-cd",
                       objective="consistency", sampler="lcm", fid_ci95=1.0))
  path = tmp_path / "results.csv"
  pd.DataFrame(rows).to_csv(path, index=False)
  frame = results.load(str(path))
  comp = analysis.distillation_comparison(frame).set_index("steps")
  assert list(comp.index) == [4, 8] and set(comp["width"]) == {64}  # w128/w320: no student
  four, eight = comp.loc[4], comp.loc[8]
  assert (four["student"], four["student_cfg"], four["student_edge"]) == (24.0, 2.0, "")
  assert four["same_outcome"] == "not measured" and math.isnan(four["same_advantage"])
  # 4 steps vs the teacher's 32: 24 vs 23.5, -0.5 within sqrt(2).
  assert four["most_steps"] == 32 and four["most_edge"] == "top"
  assert four["most_advantage"] == pytest.approx(-0.5)
  assert four["most_u_combined"] == pytest.approx(math.sqrt(2))
  assert four["most_outcome"] == "within noise"
  # 8 steps: 22 vs 28 (same steps) and vs 23.5 (32 steps): +6 and +1.5, both beyond sqrt(2).
  assert (eight["same_value"], eight["same_cfg"], eight["same_sampler"]) == (28.0, 4.0, "ddim")
  assert eight["same_advantage"] == pytest.approx(6.0) and eight["same_outcome"] == "student better"
  assert eight["most_advantage"] == pytest.approx(1.5) and eight["most_outcome"] == "student better"
  text = analysis.summary_markdown(frame)
  assert "## Distilled vs undistilled (optimal CFG)" in text
  assert ("| 64 | consistency | 8 | 22 ± 1 (CFG 2) | 28 ± 1 (CFG 4) ddim 8 | +6 ± 1.4 → student "
          "better | 23.5 ± 1 (CFG 6, top edge) ddim 32 | +1.5 ± 1.4 → student better |") in text
  assert "## Distilled vs undistilled" not in analysis.summary_markdown(frame[
      frame["objective"] == "denoising"])
  # Fig. 13 draws the 95 % intervals: 8-step points 28 / 26 / 25 (teachers) and 22 (student), ± 1.
  left = analysis.fig_distillation(frame, steps=8).axes[0]
  bars = [[tuple(map(tuple, seg)) for seg in c.get_segments()] for c in left.collections]
  assert bars == [[((64, 27), (64, 29)), ((128, 25), (128, 27)), ((320, 24), (320, 26))],
                  [((64, 21), (64, 23))]]


def test_cli(hand, tmp_path):
  csv = tmp_path / "hand.csv"
  hand.to_csv(csv, index=False)
  env = dict(os.environ, USE_TF="0")
  run = lambda *args: subprocess.run([sys.executable, "-m", "ldm_scaling", *args], cwd=REPO,
                                     env=env, capture_output=True, text=True)
  # The example table: the answer must be the cheapest best cell within the budget, found here
  # with plain pandas on the raw CSV.
  out = run("advise", "--results", EXAMPLE, "--budget", "10", "--json")
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout)
  raw = pd.read_csv(EXAMPLE)
  raw = raw[raw["checkpoint_step"] == raw.groupby("run")["checkpoint_step"].transform("max")]
  want = raw[raw["sampling_cost"] <= 10].sort_values(["fid", "sampling_cost"]).iloc[0]
  assert (got["width"], got["sampler"], got["steps"], got["cfg_scale"], got["fid"],
          got["sampling_cost"]) == (want["width"], want["sampler"], want["steps"],
                                    want["cfg_scale"], want["fid"], want["sampling_cost"])
  out = run("advise", "--results", str(csv), "--budget", "0.5")
  assert out.returncode == 2
  assert "nothing fits a sampling-cost budget of 0.5" in out.stderr and "costs 1 " in out.stderr
  assert cli.main(["analyze", "--results", str(csv), "--out", str(tmp_path / "out")]) == 0
  assert (tmp_path / "out" / "summary.md").exists()
  assert (tmp_path / "out" / "fig9_fid_vs_sampling_cost.png").exists()
  assert cli.main(["advise", "--results", str(tmp_path / "missing.csv"), "--budget", "1"]) == 2


def test_example_table_is_reproducible(tmp_path):
  sys.path.insert(0, os.path.dirname(EXAMPLE))
  try:
    import make_example  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  with open(make_example.main(str(tmp_path / "results.csv"))) as f, open(EXAMPLE) as g:
    assert f.read() == g.read()
  frame = results.load(EXAMPLE)
  assert set(results.COLUMNS) <= set(frame.columns) and CLIP in frame.columns
  assert (frame["fid_reference"] == "SYNTHETIC").all()
