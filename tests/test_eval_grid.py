"""The eval grid: exact fast FID, resumable idempotent cells, one row per cell, clear errors."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from ldm_scaling import cli
from ldm_scaling.eval import fid, frechet, results

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("n,d", [(40, 64), (200, 64),
                                 pytest.param(30, 2048, marks=pytest.mark.slow)])
def test_fast_frechet_equals_pytorch_fid_formula(n, d):
  rng = np.random.default_rng(0)
  ref_feats = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
  ref = fid.compute_stats(ref_feats) if d < 300 else fid.FIDStats(
      ref_feats.mean(0), np.cov(ref_feats, rowvar=False), 300)
  gen = rng.normal(size=(n, d)) * 1.3 + 0.2
  with warnings.catch_warnings():  # singular generated covariance when n <= d: as pytorch-fid
    warnings.simplefilter("ignore")
    want = fid.frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mu, ref.sigma)
  got = frechet.Reference(ref).distance(gen)
  assert got == pytest.approx(want, rel=1e-5)


def _eval_config(path, run, **eval_section):
  path.write_text(textwrap.dedent(f"""
      from ldm_scaling.train import checkpoint
      def get_config(arg=None):
        config = checkpoint.load_run_config({str(run)!r})
        config.eval.update({eval_section!r})
        return config
  """))
  return str(path)


GRID = dict(samplers=("ddim", "dpm++"), steps=(2,), cfg_scales=(1.0, 3.0), num_samples=8,
            fid_reference_n=16, batch_size=8, grid_images=4)
CELLS = 4  # 2 samplers x 1 step count x 2 CFG scales


def test_grid_resumes_after_kill_without_recomputing(tiny_run, tmp_path, capsys):
  """Killed (a process of its own) after 2 of 4 cells; the reruns, new invocations that know only
  what is on disk, run here (``cli.main``): no interpreter start-up each."""
  run = tmp_path / "study" / "runs" / "w32"
  shutil.copytree(tiny_run[0], run)
  cfg = _eval_config(tmp_path / "grid.py", run, stats_dir=str(tmp_path / "stats"), **GRID)
  table_dir = tmp_path / "study" / "results"
  argv = ["eval", "--workdir", str(run), "--results", str(table_dir), "--config", cfg]
  log = tmp_path / "killed_run.log"
  with open(log, "w", encoding="utf-8") as f:
    proc = subprocess.Popen([sys.executable, "-m", "ldm_scaling", *argv], stdout=f,
                            stderr=subprocess.STDOUT, text=True)
  rows_dir = table_dir / "rows"
  deadline = time.time() + 600
  while time.time() < deadline:
    if rows_dir.exists() and len(list(rows_dir.glob("*.json"))) >= 2:
      break
    assert proc.poll() is None, log.read_text()[-3000:]
    time.sleep(0.1)
  else:
    proc.kill()
    pytest.fail("the eval job wrote no 2 rows within 600 s")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {p.name: p.read_text() for p in rows_dir.glob("*.json")}
  assert 2 <= len(before) < CELLS
  capsys.readouterr()
  code, out = cli.main(argv), capsys.readouterr()
  assert code == 0, out.err[-3000:]
  assert f"{len(before)} already in" in out.err and f"{CELLS - len(before)} to do" in out.err
  after = {p.name: p.read_text() for p in rows_dir.glob("*.json")}
  assert len(after) == CELLS
  assert all(after[k] == v for k, v in before.items())  # finished cells were not recomputed
  frame = results.load(str(table_dir / "results.csv"))
  assert len(frame) == CELLS and not frame.duplicated(list(results.CELL_KEYS)).any()
  assert set(frame["sampler"]) == {"ddim", "dpm++"} and set(frame["cfg_scale"]) == {1.0, 3.0}
  assert np.isfinite(frame["fid"]).all() and (frame["n"] == 8).all()
  assert "clip_score[local-clip-small]" in frame.columns
  # Sampling cost from the cost model: norm cost x steps (the paper's convention).
  np.testing.assert_allclose(frame["sampling_cost"], frame["norm_cost"] * frame["steps"],
                             rtol=1e-6)
  assert len(list((table_dir / "grids").glob("*.png"))) == CELLS
  assert set(frame["run"]) == {os.path.join("..", "runs", "w32")}  # relative to the table
  # A third run finds nothing to do, also after the study (runs + results) moved elsewhere.
  moved = tmp_path / "moved"
  shutil.move(tmp_path / "study", moved)
  cfg = _eval_config(tmp_path / "grid_moved.py", moved / "runs" / "w32",
                     stats_dir=str(tmp_path / "stats"), **GRID)
  code = cli.main(["eval", "--workdir", str(moved / "runs" / "w32"), "--results",
                   str(moved / "results"), "--config", cfg])
  again = capsys.readouterr()
  assert code == 0 and ", 0 to do" in again.err, again.err[-3000:]


def test_run_ids_relative_to_a_local_table_absolute_otherwise(tmp_path):
  from ldm_scaling.eval import grid  # pylint: disable=g-import-not-at-top
  run, table = str(tmp_path / "s" / "runs" / "w16"), str(tmp_path / "s" / "results")
  assert grid.run_id(run, table) == os.path.join("..", "runs", "w16")
  assert grid.run_id(run) == run and grid.run_id(run, "gs://b/results") == run
  assert grid.run_id("gs://b/runs/w16/", table) == "gs://b/runs/w16"
  # Tables written before relative ids keyed cells by the absolute path: still found.
  assert grid.run_ids(run, table) == [os.path.join("..", "runs", "w16"), run]


def test_grid_bad_input(tiny_run, tmp_path, capsys):
  run, _ = tiny_run
  empty = tmp_path / "not_a_run"
  empty.mkdir()
  assert cli.main(["eval", "--workdir", str(empty), "--results", str(tmp_path / "t")]) == 2
  assert "is not a training workdir" in capsys.readouterr().err
  cfg = _eval_config(tmp_path / "bad.py", run, samplers=("heun",))
  assert cli.main(["eval", "--workdir", str(run), "--results", str(tmp_path / "t"),
                   "--config", cfg]) == 2
  assert "unknown sampler 'heun'" in capsys.readouterr().err
  cfg = _eval_config(tmp_path / "bad2.py", run, checkpoints="7")
  assert cli.main(["eval", "--workdir", str(run), "--results", str(tmp_path / "t"),
                   "--config", cfg]) == 2
  assert "has no checkpoints for steps [7]" in capsys.readouterr().err
  cfg = _eval_config(tmp_path / "bad3.py", run, num_samples=8, fid_reference_n=100_000)
  assert cli.main(["eval", "--workdir", str(run), "--results", str(tmp_path / "t"),
                   "--config", cfg]) == 2
  assert "lower eval.fid_reference_n" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="run `ldm-scaling eval` first"):
    results.load(str(tmp_path / "t"))  # nothing was written
  (tmp_path / "t").mkdir()
  with pytest.raises(results.EmptyTableError, match="has no rows"):
    results.load(str(tmp_path / "t"))


def test_table_directory_with_only_a_csv_loads(tmp_path):
  """A copied table (docs/study/results holds results.csv, not rows/) reads like the original."""
  table = results.Table(str(tmp_path / "orig"))
  row = {c: 1 for c in results.COLUMNS}
  for steps in (4, 8):
    table.add(dict(row, steps=steps, run="r", sampler="ddim"))
  table.write_tables()
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / "results.csv").write_text((tmp_path / "orig" / "results.csv").read_text())
  frame = results.load(str(copy))
  assert sorted(frame["steps"]) == [4, 8]
  assert frame.equals(results.load(str(tmp_path / "orig" / "results.csv")))


def test_available_steps_lists_only_complete_checkpoints(tmp_path):
  from ldm_scaling.eval import grid  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, best_metric=None, async_save=False,
                                 data=False)
  for step in (2, 4):
    ckpt.save(step, {"w": np.full(3, step, np.float32)}, None, {"step": step})
  ckpt.close()
  # What a save killed before orbax's final rename leaves behind does not count.
  (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000").mkdir()
  assert checkpoint.available_steps(str(tmp_path)) == [2, 4]
  assert checkpoint.available_steps(str(tmp_path / "never_trained")) == []
  assert grid.checkpoint_steps(str(tmp_path), "latest") == [4]
  assert grid.checkpoint_steps(str(tmp_path), "all") == [2, 4]
  with pytest.raises(checkpoint.RunNotFoundError, match=r"no checkpoints for steps \[6\]"):
    grid.checkpoint_steps(str(tmp_path), "2,6")
