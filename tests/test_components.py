"""The offline components (``train-vae``, ``train-clip``) are objectives of the one trainer: killed
with SIGKILL mid-run and run again, each ends bitwise where an uninterrupted run does, and exports
the same weights.

Cost: the uninterrupted run goes first, in this process (the same ``cli.main`` the command runs);
it compiles the step once and fills the session's persistent compilation cache, so the killed run
and its resumption (two processes, as a user would see them) load their programs from it. Both
runs read one prepared copy of a small embedded dataset, and the components are cut to a size
whose step, scaling factor / retrieval and export take a fraction of a second (what is tested is
the resume, not the quality: tests/test_vae.py and tests/test_text_clip.py check that)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ldm_scaling import cli

SEED = int(os.environ.get("LDM_SCALING_TEST_SEED", "0"))
CONFIG = "configs/offline_components.py:runlocal"
# log_every = 1 and checkpoint_every = 2 (a fifth of the run): a kill between steps 4 and 7 leaves
# checkpoints behind it, steps after them to replay and at least 5 steps before the end.
STEPS = 12
SMALLER = {"train-vae": ["--config.vae.width=8", "--config.vae.norm_groups=4"],
           "train-clip": ["--config.clip.layers=1", "--config.clip.vision_layers=1",
                          "--config.clip.width=32", "--config.clip.vision_width=32",
                          "--config.clip.embed_dim=32", "--config.model.cross_attn_dim=32"]}


def _args(kind, out, tfds):
  section = "vae" if kind == "train-vae" else "clip"
  return [kind, "--config", CONFIG, "--out", str(out), f"--config.data.data_dir={tfds}",
          "--config.data.shapes_sizes=(256,64)", f"--config.{section}.steps={STEPS}",
          f"--config.{section}.batch_size=8", *SMALLER[kind]]


def _logged_step(run_dir) -> int:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  rows = [json.loads(l) for l in open(path) if l.strip() and l.endswith("\n")]
  return max((r["step"] for r in rows if "loss" in r), default=0)


def _state(run_dir):
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, jax.tree.map(np.asarray, dict(state["state"]))


@pytest.mark.parametrize("kind,exported", [("train-vae", "params.msgpack"),
                                           ("train-clip", "flax_model.msgpack")])
def test_component_training_resumes_after_sigkill_exactly(kind, exported, tmp_path, repo_dir,
                                                          monkeypatch, capsys):
  monkeypatch.chdir(repo_dir)
  tfds = tmp_path / "tfds"  # prepared by the first run, read by all three
  assert cli.main(_args(kind, tmp_path / "straight", tfds)) == 0  # uninterrupted, in-process
  capsys.readouterr()

  env = dict(os.environ, PYTHONUNBUFFERED="1")
  command = [sys.executable, "-m", "ldm_scaling", *_args(kind, tmp_path / "killed", tfds)]
  kill_at = random.Random(SEED).randint(4, 7)
  out = tmp_path / "killed"
  proc = subprocess.Popen(command, cwd=repo_dir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while _logged_step(out / "train") < kill_at:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, "no progress"
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    proc.kill()
  killed_step, _ = _state(out / "train")
  assert killed_step < STEPS and not (out / exported).exists()  # killed mid-run
  again = subprocess.run(command, cwd=repo_dir, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stderr or killed_step == 0

  (step_a, a), (step_b, b) = _state(tmp_path / "straight" / "train"), _state(out / "train")
  assert step_a == step_b == STEPS
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert (tmp_path / "straight" / exported).read_bytes() == (out / exported).read_bytes()
  summary = json.loads(again.stdout.strip().splitlines()[-1])
  assert summary["dir"] == str(out)
