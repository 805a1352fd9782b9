"""Seed summaries (ldm_scaling.analysis.seeds) on a hand-made table: means, spreads, optimal CFG
on the means, the front, and issue 17's SwD-vs-full-scale check, all computed by hand here."""

import pandas as pd
import pytest

from ldm_scaling.analysis import seeds
from ldm_scaling.analysis import table


def _row(run, objective, sampler, steps, cfg, cost, fid, seed, schedule=""):
  return dict(run=f"/e1/{run}", checkpoint_step=10, objective=objective, sampler=sampler,
              steps=steps, cfg_scale=cfg, scale_schedule=schedule, width=32, params=1,
              norm_cost=0.01, sampling_cost=cost, fid=fid, n=256, seed=seed)


def hand_frame():
  rows = []
  # teacher: 2 steps at CFG 3 / 6 (best 6 by the mean: 100 vs 110), 20 steps at CFG 3 only.
  for seed, (a, b, c) in enumerate([(108, 99, 50), (110, 100, 52), (112, 101, 54)]):
    rows += [_row("teacher", "denoising", "dpm++", 2, 3.0, 0.02, a, seed),
             _row("teacher", "denoising", "dpm++", 2, 6.0, 0.02, b, seed),
             _row("teacher", "denoising", "dpm++", 20, 3.0, 0.20, c, seed)]
  # SwD at cost 0.018 (mean 80, spread 4), its full-scale counterpart at 0.03 (mean 78, spread 6).
  for seed, (s, f) in enumerate([(78, 75), (80, 78), (82, 81)]):
    rows += [_row("swd", "scale_wise", "swd", 3, 1.0, 0.018, s, seed, "8-12-16"),
             _row("full", "scale_wise", "swd", 3, 1.0, 0.03, f, seed, "16-16-16")]
  return pd.DataFrame(rows)


def test_seed_spread_means_and_spreads_by_hand():
  spread = seeds.seed_spread(hand_frame())
  assert len(spread) == 5
  cell = spread[(spread["sampler"] == "dpm++") & (spread["steps"] == 2) &
                (spread["cfg_scale"] == 6.0)].iloc[0]
  assert (cell["fid"], cell["fid_min"], cell["fid_max"], cell["fid_spread"], cell["n_seeds"]) == \
      (100.0, 99.0, 101.0, 2.0, 3)


def test_optimal_means_front_and_scalewise_check():
  points = seeds.optimal_means(seeds.seed_spread(hand_frame()))
  # teacher 2 steps: CFG 6 (mean 100) beats CFG 3 (110).
  t2 = points[(points["sampler"] == "dpm++") & (points["steps"] == 2)].iloc[0]
  assert t2["cfg_scale"] == 6.0 and t2["fid"] == 100.0
  # By cost: swd 0.018 (80), teacher-2 0.02 (100: beaten by cheaper swd), full 0.03 (78),
  # teacher-20 0.2 (52): front = swd, full, teacher-20.
  front = {r.split("/")[-1] + f"-{s}" for r, s, on in
           zip(points["run"], points["steps"], points["on_front"]) if on}
  assert front == {"swd-3", "full-3", "teacher-20"}
  check = seeds.scalewise_check(points, "swd", "full")
  assert check["cost_ratio"] == pytest.approx(0.6)
  assert check["difference"] == pytest.approx(2.0) and check["full_spread"] == 6.0
  assert check["within_spread_or_better"] and check["on_front"] and check["success"]
  md = seeds.markdown(points)
  assert "| 80.0 [78.0-82.0] | 3 | yes |" in md


def test_a_cell_worse_than_the_spread_fails_and_duplicates_are_refused():
  frame = hand_frame()
  worse = frame.assign(fid=[f + 10 if r.endswith("/swd") else f
                            for f, r in zip(frame["fid"], frame["run"])])
  check = seeds.scalewise_check(seeds.optimal_means(seeds.seed_spread(worse)), "swd", "full")
  assert check["difference"] == pytest.approx(12.0) and not check["within_spread_or_better"]
  assert not check["success"]
  with pytest.raises(table.AnalysisError, match="repeat a cell"):
    seeds.seed_spread(pd.concat([frame, frame.iloc[:1]]))
  with pytest.raises(table.AnalysisError, match="expected one optimal point of run 'nope'"):
    seeds.scalewise_check(seeds.optimal_means(seeds.seed_spread(frame)), "nope", "full")


def test_the_command_reads_one_table_per_seed(tmp_path, capsys):
  """A table keeps one row per cell, so each seed is its own table; the command joins them."""
  frame = hand_frame()
  paths = []
  for seed, part in frame.groupby("seed"):
    paths.append(str(tmp_path / f"seed{seed}.csv"))
    part.to_csv(paths[-1], index=False)
  out = tmp_path / "summary.md"
  assert seeds.main([*paths, "--out", str(out)]) == 0
  text = out.read_text()
  assert text == capsys.readouterr().out
  assert "| 80.0 [78.0-82.0] | 3 | yes |" in text and "cost_ratio 0.6" in text
