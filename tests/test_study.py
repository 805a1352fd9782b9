"""The end-to-end study (`ldm-scaling study --quick`): interrupted, rerun, nothing recomputed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ldm_scaling import cli
from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import study
from ldm_scaling.eval import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "study", "cpu_mini.py")


def test_quick_study_resumes_after_kill(tmp_path, offline_components):
  """The quick study, cut to one width, on the session's offline components (the same data, CLIP
  and VAE recipes, trained once per test session): killed in its eval phase, rerun, nothing
  recomputed. (CI runs the whole quick study from cold as a new user: .ci/run.)"""
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
  root = tmp_path / "study"
  components = offline_components.config
  overrides = ["study.widths=(16,)",
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
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  rows = root / "results" / "rows"
  deadline = time.time() + 900
  while time.time() < deadline:  # interrupt it in the eval phase, after a few cells
    if rows.exists() and len(list(rows.glob("*.json"))) >= 2:
      break
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  else:
    proc.kill()
    pytest.fail("the study evaluated no 2 cells within 900 s")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {p.name: p.read_text() for p in rows.glob("*.json")}
  ckpts = {w: study.finished_step(str(root / "runs" / f"w{w}")) for w in widths}

  out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  # Nothing recomputed: components and runs are found, finished cells are skipped.
  assert "train-clip" not in out.stderr and "train-vae" not in out.stderr
  assert f"offline CLIP: {components.clip.dir}" in out.stderr
  for w in widths:
    assert f"width {w}: already trained ({ckpts[w]} steps)" in out.stderr
  assert f"{len(before)} already in" in out.stderr
  after = {p.name: p.read_text() for p in rows.glob("*.json")}
  assert all(after[k] == v for k, v in before.items())

  frame = results.load(str(root / "results"))
  e = config.eval
  grid_cells = len(widths) * len(e.samplers) * len(e.steps) * len(e.cfg_scales)  # last checkpoint
  curve_cells = len(widths) * (config.study.checkpoints - 1)  # fid_curve_cell, earlier checkpoints
  assert len(frame) == grid_cells + curve_cells == 1 * 1 * 2 * 2 + 1
  assert not frame.duplicated(list(results.CELL_KEYS)).any()
  assert sorted(frame["width"].unique()) == widths
  assert {p.steps for p in study.plan(config, str(root))} == {int(s) for s in ckpts.values()}
  # Compute-matched (the quick study's two widths): steps x normalised cost equal across widths
  # (to rounding of the steps).
  computes = [p.train_compute for p in study.plan(experiment.load(CONFIG + ":quick"), str(root))]
  assert len(computes) == 2 and max(computes) / min(computes) < 1.1

  summary = json.loads(out.stdout.strip().splitlines()[-1])
  report = (root / "report.md").read_text()
  assert summary["verdict"] in report and "local-clip-small" in report
  for path in summary["figures"]:
    assert os.path.getsize(path) > 1000
  timings = json.loads((root / "timings.json").read_text())
  assert len(timings) == 2 and "eval" in timings[1]["phases"]


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


def _frame(fids):
  """A hand-made table: {(width, steps): fid} for one sampler at CFG 3; norm cost = width / 100."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  rows = []
  for (width, steps), value in fids.items():
    row = {c: None for c in results.COLUMNS}
    row.update(run=f"/runs/w{width}", checkpoint_step=100, objective="denoising", sampler="ddim",
               steps=steps, cfg_scale=3.0, scale_schedule="", width=width, params=width * 1000,
               norm_cost=width / 100, sampling_cost=width / 100 * steps, fid=value, n=64)
    rows.append(row)
  return pd.DataFrame(rows)


def test_verdict_rule_on_hand_made_tables():
  # w1 (cost 0.01/step) vs w2 (0.02/step). Common costs 0.08 (w1 8 steps, w2 4 steps) and 0.16.
  crossing = _frame({(1, 4): 50, (1, 8): 40, (1, 16): 35,
                     (2, 4): 45, (2, 8): 30, (2, 16): 20})
  outcome, lines = study.verdict(crossing)
  # At cost 0.08 w1 has 40 < w2's 45; at 0.16 w2 has 30 < w1's 35: a crossover in between.
  assert outcome == "reproduced" and "w2 beats w1 beyond cost" in lines[0]
  beyond = _frame({(1, 4): 50, (1, 8): 40, (1, 16): 30,
                   (2, 4): 45, (2, 8): 35, (2, 16): 20})  # w2 better only past w1's costs
  outcome, lines = study.verdict(beyond)
  assert outcome == "partly reproduced" and "no crossover" in lines[0]
  small_wins = _frame({(1, 4): 30, (1, 8): 20, (1, 16): 10,
                       (2, 4): 45, (2, 8): 35, (2, 16): 25})
  assert study.verdict(small_wins)[0] == "not reproduced"
  noisy = _frame({(1, 4): 50, (1, 8): 53, (1, 16): 35, (2, 4): 45, (2, 8): 30, (2, 16): 20})
  assert "rises by up to 3.0" in study.verdict(noisy)[1][-1]
