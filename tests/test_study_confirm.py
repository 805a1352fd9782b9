"""``study.confirm_n``: each model's best grid cell evaluated again with fresh samples, and the
size-effect check reading those cells (hand-made tables; the grid itself is tested elsewhere)."""

import math
import os

import pandas as pd
import pytest

import hand_tables

from ldm_scaling import experiment
from ldm_scaling import study
from ldm_scaling.errors import ConfigError
from ldm_scaling.eval import grid
from ldm_scaling.eval import results

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "study", "cpu_mini.py")


def _rows(cells, *, n=64, ci=1.0, checkpoint=100):
  """{(width, steps, cfg): fid} -> a results frame (every fid_ci95 ``ci``)."""
  return hand_tables.frame(cells, ci=ci, n=n, checkpoint=checkpoint)


GRID = {(1, 8, 2.0): 40, (1, 16, 2.0): 36, (1, 16, 4.0): 35,
        (2, 8, 2.0): 30, (2, 16, 2.0): 25, (2, 16, 4.0): 20}


def test_best_cells_take_each_models_lowest_fid_at_its_latest_checkpoint():
  frame = pd.concat([_rows(GRID), _rows({(2, 16, 4.0): 5}, checkpoint=50)])  # earlier: ignored
  best = study.best_cells(frame, [1, 2, 3])  # width 3 has no cells: skipped
  assert [(r.width, r.steps, r.cfg_scale, r.fid) for r in best.itertuples()] == [
      (1, 16, 4.0, 35), (2, 16, 4.0, 20)]


def test_confirm_evaluates_each_best_cell_with_fresh_samples(tmp_path, monkeypatch):
  config = experiment.load(CONFIG + ":quick")
  config.study.update(widths=(1, 2), confirm_n=200, real_floor=False)
  runs = [study.RunPlan(w, 10, f"/runs/w{w}", 1000 * w, w / 100) for w in (1, 2)]
  table = tmp_path / "results"
  monkeypatch.setattr(results, "load", lambda path: _rows(GRID))
  calls = []
  monkeypatch.setattr(grid, "evaluate", lambda workdirs, table_dir, *, eval_config, log,
                      extractor: calls.append((workdirs, table_dir, eval_config.eval)))
  assert study.confirm(config, runs, str(table), str(tmp_path / "confirm"), log=print) == 2
  got = [(w, d, tuple(e.samplers), tuple(e.steps), tuple(e.cfg_scales), e.num_samples, e.seed,
          e.checkpoints) for w, d, e in calls]
  fresh = config.eval.seed + 1
  assert got == [(["/runs/w1"], str(tmp_path / "confirm"), ("ddim",), (16,), (4.0,), 200, fresh,
                  "latest"),
                 (["/runs/w2"], str(tmp_path / "confirm"), ("ddim",), (16,), (4.0,), 200, fresh,
                  "latest")]
  config.study.confirm_n = 0  # off: nothing evaluated
  assert study.confirm(config, runs, str(table), str(tmp_path / "c2")) == 0 and len(calls) == 2
  config.study.confirm_n = 1
  with pytest.raises(ConfigError, match="confirm_n"):
    study.validate(config)


def test_size_effect_reads_the_confirmed_cells_when_there_are_some():
  frame = _rows(GRID)  # on the grid: w2 20 vs w1 35, 15 / sqrt(2) -> met
  assert study.size_effect_line(frame)[0]["met"]
  # Fresh samples (n=512, CIs of 2): the picked cells regress, w2 30 vs w1 33 -> 3 / 2.83, not met.
  confirmed = _rows({(1, 16, 4.0): 33, (2, 16, 4.0): 30}, n=512, ci=2.0)
  effect, text = study.size_effect_line(frame, confirmed=confirmed)
  assert not effect["met"] and effect["ratio"] == pytest.approx(3 / math.hypot(2, 2))
  assert effect["confirmed_n"] == 512 and "n=512 fresh samples" in text
  assert "criterion **not met**" in text
  # Grid-edge flags come from the grid (a one-cell table has no CFG scan): CFG 4 is w1's and
  # w2's top scale at 16 steps.
  assert effect["at_grid_edge"] == ["w1", "w2"] and "optimum at the top of the CFG grid" in text
  # An empty confirmation table: the grid's cells decide.
  assert study.size_effect_line(frame, confirmed=confirmed.iloc[:0])[0]["met"]
