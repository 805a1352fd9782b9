"""The end-to-end study (`ldm-scaling study --quick`): interrupted, rerun, nothing recomputed."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import hand_tables

from ldm_scaling import analysis
from ldm_scaling import cli
from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import study
from ldm_scaling.eval import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "study", "cpu_mini.py")


def test_quick_study_resumes_after_kill(tmp_path, offline_components, monkeypatch, capsys):
  """The quick study, cut to one width, on the session's offline components (the same data, CLIP
  and VAE recipes, trained once per test session): killed in its eval phase, rerun, nothing
  recomputed. (CI runs the whole quick study from cold as a new user: .ci/run.)

  Cut further to what resuming needs, as compiles dominate: 4 training steps (checkpoints at 2
  and 4), one step count (2) in the grid and the FID curve (one sampler program), and 8 samples
  in batches of 8 (the InceptionV3 program of test_eval_grid/test_eval_fid, so its compile can
  come from the session's compilation cache). It is killed once the 2-cell grid is in, before the
  FID-curve cell at step 2; the rerun, a new invocation that knows only what is on disk, runs
  here (``cli.main``), which saves a second interpreter start-up."""
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
  root = tmp_path / "study"
  components = offline_components.config
  overrides = ["study.widths=(16,)", "train.steps=4", "train.log_every=2", "eval.steps=(2,)",
               "study.fid_curve_cell=('ddim',2,4.0)", "eval.num_samples=8",
               "eval.fid_reference_n=16", "eval.batch_size=8",
               f"data.data_dir={components.data.data_dir}", f"clip.dir={components.clip.dir}",
               f"vae.dir={components.vae.dir}"]
  # The session's components were trained with the test recipe, not the quick study's (smaller):
  # the study must be told so, or it rightly refuses them as trained with another config.
  quick = experiment.load(CONFIG + ":quick")
  overrides += [f"{section}.{key}={value}" for section in ("clip", "vae")
                for key, value in components[section].items()
                if key != "dir" and value != quick[section][key]]
  argv = [sys.executable, "-m", "ldm_scaling", "study", "--config", CONFIG, "--quick",
          "--workdir", str(root), *(f"--config.{o}" for o in overrides)]
  config = experiment.load(CONFIG + ":quick", overrides)
  widths = list(config.study.widths)
  log = tmp_path / "killed_run.log"
  with open(log, "w", encoding="utf-8") as f:
    proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
  rows = root / "results" / "rows"
  deadline = time.time() + 900
  while time.time() < deadline:  # interrupt it in the eval phase, after a few cells
    if rows.exists() and len(list(rows.glob("*.json"))) >= 2:
      break
    assert proc.poll() is None, log.read_text()[-3000:]
    time.sleep(0.2)
  else:
    proc.kill()
    pytest.fail("the study evaluated no 2 cells within 900 s")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {p.name: p.read_text() for p in rows.glob("*.json")}
  ckpts = {w: study.finished_step(str(root / "runs" / f"w{w}")) for w in widths}

  monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
  capsys.readouterr()
  code = cli.main(argv[3:])
  out = capsys.readouterr()
  assert code == 0, out.err[-3000:]
  # Nothing recomputed: components and runs are found, finished cells are skipped.
  assert "train-clip" not in out.err and "train-vae" not in out.err
  assert f"offline CLIP: {components.clip.dir}" in out.err
  for w in widths:
    assert f"width {w}: already trained ({ckpts[w]} steps)" in out.err
  assert f"{len(before)} already in" in out.err
  after = {p.name: p.read_text() for p in rows.glob("*.json")}
  assert all(after[k] == v for k, v in before.items())

  frame = results.load(str(root / "results"))
  e = config.eval
  grid_cells = len(widths) * len(e.samplers) * len(e.steps) * len(e.cfg_scales)  # last checkpoint
  curve_cells = len(widths) * (config.study.checkpoints - 1)  # fid_curve_cell, earlier checkpoints
  assert len(frame) == grid_cells + curve_cells == 1 * 1 * 1 * 2 + 1
  assert not frame.duplicated(list(results.CELL_KEYS)).any()
  assert sorted(frame["width"].unique()) == widths
  assert {p.steps for p in study.plan(config, str(root))} == {int(s) for s in ckpts.values()}
  # The paper's protocol (equal_steps, the default): both of the quick study's widths train
  # train.steps; equal_compute gives the narrower one as many more as equalise steps x cost.
  quick = experiment.load(CONFIG + ":quick")
  assert [p.steps for p in study.plan(quick, str(root))] == [quick.train.steps] * 2
  quick.study.schedule = "equal_compute"
  computes = [p.train_compute for p in study.plan(quick, str(root))]
  assert len(computes) == 2 and max(computes) / min(computes) < 1.1

  summary = json.loads(out.out.strip().splitlines()[-1])
  report = (root / "report.md").read_text()
  assert summary["verdict"] in report and "local-clip-small" in report
  assert summary["verdict"] in ("reproduced", "not reproduced", "inconclusive at this noise")
  assert "captioned-shapes dataset at 32 px (2,000 train / 256 held-out)" in report
  assert "Protocol `equal_steps`" in report and "Real-data floor" in report
  for path in summary["figures"]:
    assert os.path.getsize(path) > 1000
  timings = json.loads((root / "timings.json").read_text())
  assert len(timings) == 2 and "eval" in timings[1]["phases"]
  assert timings[0]["commit"] == timings[1]["commit"] == study.environment()["commit"]


def test_study_bad_input(tmp_path, capsys):
  assert cli.main(["study", "--config", CONFIG, "--quick", "--workdir", str(tmp_path),
                   "--config.study.widths=()"]) == 2
  assert "study.widths is empty" in capsys.readouterr().err
  assert cli.main(["study", "--config", CONFIG, "--workdir", str(tmp_path),
                   "--config.study.schedule=equal_flops"]) == 2
  assert "study.schedule must be one of" in capsys.readouterr().err
  assert cli.main(["study", "--config", CONFIG, "--workdir", str(tmp_path),
                   "--config.study.widths=(32,40)"]) == 2
  assert "not divisible by model.norm_groups=16" in capsys.readouterr().err
  assert cli.main(["study", "--config", CONFIG, "--quick", "--workdir", "gs://bucket/study"]) == 2
  assert "the study writes a local directory" in capsys.readouterr().err


def test_study_refuses_other_config_in_same_workdir(tmp_path):
  config = experiment.load(CONFIG + ":quick")
  study._write_study_config(str(tmp_path), config)
  other = experiment.load(CONFIG + ":quick", ["train.lr=0.01"])
  with pytest.raises(cfglib.ConfigError, match=r"different config \(changed: train.lr"):
    study._write_study_config(str(tmp_path), other)


def _frame(fids, ci=None):
  """A hand-made table for one sampler: {(width, steps): fid} at CFG 3, or {(width, steps):
  {cfg: fid}} (see hand_tables.frame)."""
  return hand_tables.frame({(width, steps, cfg): value for (width, steps), values in fids.items()
                            for cfg, value in (values.items() if isinstance(values, dict)
                                               else [(3.0, values)])}, ci=ci)


# w1 (cost 0.01/step) vs w2 (0.02/step), 4/8/16 steps: common budgets 0.08, 0.16, 0.32. At 0.08
# w1's best is 40 (8 steps) vs w2's 45 (4 steps); at 0.16, 35 vs 30; at 0.32, 35 vs 20.
CROSSING = {(1, 4): 50, (1, 8): 40, (1, 16): 35, (2, 4): 45, (2, 8): 30, (2, 16): 20}


def test_verdict_rule_on_hand_made_tables():
  # CIs of 1 (combined sqrt(2) = 1.41): w1 wins by 5 at 0.08, w2 by 5 and 15 above -> reproduced.
  outcome, lines = study.verdict(_frame(CROSSING, ci=1.0))
  assert outcome == "reproduced"
  assert ("at the lowest common budget (0.08) w1 wins (FID w1 − w2 = -5.0 ± 1.4), at the "
          "highest common budget (0.32) w2 wins (FID w1 − w2 = +15.0 ± 1.4)") in lines[0]
  assert "(pair: supports)" in lines[0]
  assert "95 % interval from half-sample resampling" in lines[1]
  # The same FIDs with CIs of 5 (combined 7.07): only the 15 at 0.32 is decisive, and a bigger
  # model winning at the highest budget alone decides nothing.
  outcome, lines = study.verdict(_frame(CROSSING, ci=5.0))
  assert outcome == "inconclusive at this noise" and "(pair: within noise)" in lines[0]
  # A win in the middle of the range only (w1 30 vs w2 41 at 0.16; 40 vs 41 at 0.08 and 30 vs 30
  # at 0.32 are within noise): only the two ends are judged.
  middle = {(1, 4): 50, (1, 8): 40, (1, 16): 30, (2, 4): 41, (2, 8): 41, (2, 16): 30}
  assert study.verdict(_frame(middle, ci=1.0))[0] == "inconclusive at this noise"
  # The opposite pattern, beyond CIs of 1: w2 better at 0.08 (28 vs 30), w1 at 0.16 and 0.32.
  opposite = {(1, 4): 40, (1, 8): 30, (1, 16): 25, (2, 4): 28, (2, 8): 35, (2, 16): 36}
  outcome, lines = study.verdict(_frame(opposite, ci=1.0))
  assert outcome == "not reproduced" and "(pair: contradicts)" in lines[0]
  # The smaller model better everywhere: size never helps in the measured range.
  small_wins = {(1, 4): 30, (1, 8): 20, (1, 16): 10, (2, 4): 45, (2, 8): 35, (2, 16): 25}
  assert study.verdict(_frame(small_wins, ci=1.0))[0] == "not reproduced"


def test_verdict_falls_back_to_the_noise_estimate():
  # No fid_ci95 column: w1's FID rises by 3 from 8 to 16 steps, so u = 3 / sqrt(2) per point and
  # a win needs a gap > 3. Gaps: 0.08: 46 vs 47; 0.16: 46 vs 44; 0.32: 46 vs 43 (= 3, not > 3).
  noisy = {(1, 4): 50, (1, 8): 46, (1, 16): 49, (2, 4): 47, (2, 8): 44, (2, 16): 43}
  outcome, lines = study.verdict(_frame(noisy))
  assert outcome == "inconclusive at this noise"
  assert "rises by up to 3.0" in lines[-1] and "no cell has a resampling interval" in lines[-1]
  # Monotone curves and no CIs: the estimate is 0, so the crossing table decides at face value.
  assert study.verdict(_frame(CROSSING))[0] == "reproduced"


def test_verdict_discounts_wins_against_an_optimum_at_the_cfg_grid_top():
  # w1 evaluated at CFG 1 and 3 only, its optimum always at 3 (the top): w2's wins over it are not
  # counted; w2's optima are interior (CFG 3 of 1, 3, 6), so w1's win over w2 at 0.08 counts.
  fids = {(w, k): ({1.0: v + 10, 3.0: v} if w == 1 else {1.0: v + 10, 3.0: v, 6.0: v + 5})
          for (w, k), v in CROSSING.items()}
  frame = _frame(fids, ci=1.0)
  opt = analysis.optimal_cfg(frame, "fid", checkpoint="latest")
  assert {(r.width, r.at_grid_edge, r.grid_edge) for r in opt.itertuples()} == {
      (1, True, "top"), (2, False, "")}
  outcome, lines = study.verdict(frame)
  assert outcome == "inconclusive at this noise"
  assert "2 win(s) against a CFG optimum at an open grid end not counted" in lines[0]
  assert "3 of 6 optimal-CFG cells have their optimum at the largest scale" in lines[-1]


def test_size_effect_criterion_on_hand_made_numbers():
  # Highest budget 0.32: w2's best 20 vs w1's best 35, a 15 FID advantage.
  effect, text = study.size_effect_line(_frame(CROSSING, ci=1.0))
  assert effect["met"] and effect["ratio"] == pytest.approx(15 / math.sqrt(2))
  assert "criterion **met**" in text
  effect, text = study.size_effect_line(_frame(CROSSING, ci=5.0))  # 15 < 3 x 7.07
  assert not effect["met"] and effect["ratio"] == pytest.approx(15 / math.sqrt(50))
  assert "criterion **not met**" in text
  assert effect["small_value"] == 35 and effect["big_value"] == 20 and effect["budget"] == 0.32
  assert study.size_effect_line(_frame({(1, 4): 50}, ci=1.0))[0] is None


def test_report_derives_the_setting_from_the_config():
  config = experiment.load(CONFIG + ":quick")
  assert config.study.schedule == "equal_steps"
  assert study.data_description(config) == (
      "the embedded captioned-shapes dataset at 32 px (2,000 train / 256 held-out)")
  config.data.update(name="folder:/data/pets.jsonl", resolution=64)
  assert study.data_description(config) == "the image folder `/data/pets.jsonl` at 64 px"
  floor_line = study._floor_line  # pylint: disable=protected-access
  assert "FID 1.5 ± 0.3, KID 0.002 ± 0.001" in floor_line(
      dict(fid=1.5, fid_ci95=0.3, kid=0.002, kid_ci95=0.001, n=64, source="test split"))


def _fake_grid(monkeypatch, frame, fid, record=(0, 1, 2)):
  """grid.evaluate and results.load faked over ``frame``: each evaluated cell gets
  ``fid(width, steps, cfg)``; the (width, steps, cfg) fields ``record`` go to ``calls``."""
  table, calls = {"frame": frame}, []
  def evaluate(workdirs, table_dir, *, eval_config, log, extractor):
    del table_dir, log, extractor
    (workdir,), e = workdirs, eval_config.eval
    cell = (int(workdir.rsplit("w", 1)[1]), e.steps[0], e.cfg_scales[0])
    calls.append(tuple(cell[i] for i in record))
    table["frame"] = pd.concat([table["frame"], _frame({cell[:2]: {cell[2]: fid(*cell)}})])
  monkeypatch.setattr(study.grid, "evaluate", evaluate)
  monkeypatch.setattr(study.results, "load", lambda table_dir: table["frame"])
  return table, calls


def test_extend_cfg_brackets_the_optimum_from_above(monkeypatch):
  """study.extend_cfg on a fake eval: FID = base + (cfg - best)^2 with w1's best scale 4 and w2's
  9; grid (1, 3), spacing 2, so extensions go 5, 7, ... up to 3 + 2 x extend_cfg."""
  best = {1: 4.0, 2: 9.0}
  def fid(width, steps, cfg):
    return 50 - steps + (cfg - best[width]) ** 2
  frame = _frame({(w, k): {c: fid(w, k, c) for c in (1.0, 3.0)} for w in (1, 2) for k in (4, 8)})
  table, calls = _fake_grid(monkeypatch, frame, fid)
  config = experiment.load(CONFIG + ":quick", ["eval.cfg_scales=(1.0,3.0)", "eval.steps=(4,8)",
                                               "study.extend_cfg=2"])
  runs = [study.RunPlan(w, 10, f"/runs/w{w}", 1, w / 100) for w in (1, 2)]
  assert study.extend_cfg(config, runs, "/table", log=lambda _: None) == 6
  # w1: 3 was the top; 5 ties with 3 (both 1 away from 4: the smaller scale wins) -> interior.
  # w2: 5, then 7 (the limit, 3 + 2 x 2), still the top there: flagged, not extended further.
  assert sorted(calls) == [(1, 4, 5.0), (1, 8, 5.0), (2, 4, 5.0), (2, 4, 7.0), (2, 8, 5.0),
                           (2, 8, 7.0)]
  opt = analysis.optimal_cfg(table["frame"], "fid", checkpoint="latest")
  assert {(r.width, r.cfg_scale, r.grid_edge) for r in opt.itertuples()} == {
      (1, 3.0, ""), (2, 7.0, "top")}
  config.study.extend_cfg = 0
  assert study.extend_cfg(config, runs, "/table") == 0


def test_extend_cfg_brackets_the_optimum_from_below_down_to_cfg_1(monkeypatch):
  """Grid (2, 4, 6) with FID = base + (cfg - best)^2: w1's best 2.9 (at the bottom, 2: extended
  to 1 -- the first spacing below, clamped at CFG 1 -- which is worse, so 2 is interior), w2's
  best 0.5 (extended to 1, still best there: the floor, not open; reported, not extended), w3's
  best 7.5 (the top: 8, better, then 10, worse -> interior at 8)."""
  best = {1: 2.9, 2: 0.5, 3: 7.5}
  def fid(width, cfg):
    return 50 + (cfg - best[width]) ** 2
  frame = _frame({(w, 4): {c: fid(w, c) for c in (2.0, 4.0, 6.0)} for w in best})
  table, calls = _fake_grid(monkeypatch, frame, lambda w, k, c: fid(w, c), record=(0, 2))
  config = experiment.load(CONFIG + ":quick", ["eval.cfg_scales=(2.0,4.0,6.0)", "eval.steps=(4,)",
                                               "study.extend_cfg=2"])
  runs = [study.RunPlan(w, 10, f"/runs/w{w}", 1, w / 100) for w in best]
  logs = []
  assert study.extend_cfg(config, runs, "/table", log=logs.append) == 4
  assert sorted(calls) == [(1, 1.0), (2, 1.0), (3, 8.0), (3, 10.0)]
  assert "the grid's bottom (CFG 2); evaluating CFG 1" in logs[0]
  opt = analysis.optimal_cfg(table["frame"], "fid", checkpoint="latest")
  assert {(r.width, r.cfg_scale, r.grid_edge, r.open_edge) for r in opt.itertuples()} == {
      (1, 2.0, "", False), (2, 1.0, "bottom", False), (3, 8.0, "", False)}
  lines = study.verdict(table["frame"])[1]
  assert any("1 of 3 optimal-CFG cells are best at CFG 1 or below" in x for x in lines)
  assert not any("upper bound" in x for x in lines)
  # A bottom above CFG 1 is open: the verdict does not count a win against it.
  opt = analysis.optimal_cfg(frame, "fid", checkpoint="latest")
  assert {(r.width, r.grid_edge, r.open_edge) for r in opt.itertuples()} == {
      (1, "bottom", True), (2, "bottom", True), (3, "top", True)}
  lines = study.verdict(frame)[1]
  assert any("2 of 3 optimal-CFG cells have their optimum at the smallest scale evaluated, above "
             "CFG 1 (w1 1, w2 1)" in x for x in lines)


def test_real_floor_is_saved_and_optional(tmp_path, monkeypatch):
  config = experiment.load(CONFIG + ":quick")
  monkeypatch.delattr(study.grid, "real_data_floor", raising=False)
  assert "no real_data_floor" in study.real_floor(config, str(tmp_path), "/table")
  calls = []
  def floor(cfg, table_dir, *, n, extractor=None, log=print):
    del cfg, extractor, log
    calls.append((table_dir, n))
    return dict(fid=3.0, fid_ci95=0.5, kid=0.01, kid_ci95=0.002, n=n, source="test split")
  monkeypatch.setattr(study.grid, "real_data_floor", floor, raising=False)
  got = study.real_floor(config, str(tmp_path), "/table")
  assert got["fid"] == 3.0 and calls == [("/table", config.eval.num_samples)]
  with open(tmp_path / "real_data_floor.json", encoding="utf-8") as f:  # what write_report reads
    assert json.load(f) == got
  assert "FID 3 ± 0.5" in study._floor_line(got)  # pylint: disable=protected-access
  config.study.real_floor = False
  assert "study.real_floor=False" in study.real_floor(config, str(tmp_path / "x"), "/table")


def test_report_names_the_commit_of_every_invocation(tmp_path, monkeypatch):
  """Each invocation records its commit in timings.json; the report's line names one commit, or
  each with the invocations that ran it (records from before commits were kept: ``unknown``)."""
  (tmp_path / "timings.json").write_text(json.dumps([
      dict(started=0, phases={"train": 60.0}), dict(started=1, commit="0151b37", phases={})]))
  monkeypatch.setattr(study, "environment", lambda: dict(commit="0151b37"))
  clock = study._Clock(str(tmp_path), log=lambda _: None)  # pylint: disable=protected-access
  assert clock.commits() == "Commits: `unknown` (invocation 1), `0151b37` (invocations 2, 3)"
  clock.phase("eval", 1.0)
  assert json.loads((tmp_path / "timings.json").read_text())[2]["commit"] == "0151b37"
  (tmp_path / "timings.json").unlink()
  clock = study._Clock(str(tmp_path), log=print)  # pylint: disable=protected-access
  assert clock.commits() == "Commit: `0151b37`"
