"""Issue 17's E1 (configs/swd_e1.py, docs/swd/e1.sh): every run's config, and the CI-sized
variant of the whole pipeline (components, teacher, SwD / full-scale / consistency students, each
evaluated, the seed summary)."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from ldm_scaling import experiment
from ldm_scaling.analysis import seeds
from ldm_scaling.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "swd_e1.py")
TEACHER = ["--config.objective.teacher=runs/e1/teacher"]


def _load(run, quick=False):
  arg = f"{CONFIG}:run={run}" + (",quick" if quick else "")
  return experiment.load(arg, [] if run == "teacher" else TEACHER)


def test_every_run_is_a_valid_config_with_its_recipe():
  teacher = _load("teacher")
  assert teacher.objective.name == "denoising"
  assert teacher.diffusion.schedule != "rectified_flow"  # VP: the consistency student needs it
  assert teacher.data.resolution == 64 and teacher.cost.latent_size == 16
  swd, full, lcm = _load("swd"), _load("full"), _load("lcm")
  assert swd.objective.scales == (8, 12, 16) and full.objective.scales == (16, 16, 16)
  assert swd.objective.sigmas == full.objective.sigmas
  # The same number of student updates: SwD's student updates once per fake_updates + 1 steps.
  assert swd.train.steps == lcm.train.steps * (swd.objective.swd.fake_updates + 1)
  mmd, mmd_full = _load("mmd_only"), _load("mmd_only_full")
  assert mmd.train.steps == mmd_full.train.steps == lcm.train.steps  # no fake phase
  assert mmd.objective.swd.dmd_weight == mmd_full.objective.swd.gan_weight == 0.0
  assert mmd.objective.scales == swd.objective.scales
  assert mmd_full.objective.scales == full.objective.scales
  assert _load("noise_then_upscale").objective.swd.input_order == "noise_then_upscale"
  assert _load("no_gan").objective.swd.gan_weight == 0.0
  for c in (swd, full, lcm):
    assert c.objective.cfg_scale == 4.5 and c.data.caption_dropout == 0.0
  # Components are shared: every run keys the same CLIP / VAE (data and recipe equal).
  from ldm_scaling.models import clip, vae
  dirs = {(clip.default_dir(c), vae.default_dir(c)) for c in (teacher, swd, lcm)}
  assert len(dirs) == 1
  with pytest.raises(ConfigError, match="run must be one of teacher, swd"):
    _load("swf")


@pytest.mark.slow
@pytest.mark.long
def test_quick_e1_pipeline_end_to_end(tmp_path):
  """``QUICK=1 docs/swd/e1.sh``: cold 64 px components, the teacher, the SwD student, each
  evaluated, the analysis and the seed summary, as a user runs it. The other students are left
  out here (1-3 min of compiles each in CI: the full-scale one is the same program at other
  sizes; the consistency pipeline is tested in test_consistency; every run's config above)."""
  root = tmp_path / "e1"
  bin_dir = os.path.dirname(sys.executable)
  env = dict(os.environ, QUICK="1", RUNS="swd", HOME=str(tmp_path / "home"),
             LDM_SCALING_CACHE=str(tmp_path / "cache"), PATH=bin_dir + os.pathsep +
             os.environ.get("PATH", ""), TFDS_DATA_DIR=str(tmp_path / "tfds"))
  proc = subprocess.run(["bash", os.path.join(REPO, "docs", "swd", "e1.sh"), str(root)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  frame = pd.read_csv(root / "results" / "seed0" / "results.csv")  # one table per seed
  runs = {os.path.basename(r.rstrip("/")): g for r, g in frame.groupby("run")}
  assert set(runs) == {"teacher", "swd"}
  swd = runs["swd"].iloc[0]
  assert swd["objective"] == "scale_wise" and swd["scale_schedule"] == "8-12-16"
  # The exact per-scale cost: SwD's 3 steps cost about sum((s/16)^2) / 3 = 0.60 of 3 full-size
  # steps of the same UNet (measured FLOPs at each size, not the formula).
  ratio = swd["sampling_cost"] / (3 * swd["norm_cost"])
  assert 0.5 < ratio < 0.7
  teacher = runs["teacher"].iloc[0]
  assert teacher["sampling_cost"] == pytest.approx(teacher["norm_cost"] * teacher["steps"])
  summary = (root / "e1_summary.md").read_text()
  assert "w16 scale_wise [8-12-16]" in summary and "SwD vs full scale" not in summary
  points = seeds.optimal_means(seeds.seed_spread(frame))
  assert len(points) == 2  # teacher at 2 steps, swd
