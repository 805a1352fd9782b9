"""The offline components (``train-vae``, ``train-clip``) are objectives of the one trainer: killed
with SIGKILL mid-run and run again, each ends bitwise where an uninterrupted run does, and exports
the same weights."""

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

SEED = int(os.environ.get("LDM_SCALING_TEST_SEED", "0"))
CONFIG = "configs/offline_components.py:runlocal"
STEPS = 24


def _command(kind, out, tfds):
  section = "vae" if kind == "train-vae" else "clip"
  smaller = (["--config.clip.layers=1", "--config.clip.vision_layers=1"]
             if section == "clip" else [])
  return [sys.executable, "-m", "ldm_scaling", kind, "--config", CONFIG, "--out", str(out),
          f"--config.data.data_dir={tfds}", f"--config.{section}.steps={STEPS}",
          f"--config.{section}.batch_size=16", *smaller]


def _logged_step(run_dir) -> int:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  rows = [json.loads(l) for l in open(path) if l.strip()]
  return max((r["step"] for r in rows if "loss" in r), default=0)


def _state(run_dir):
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, jax.tree.map(np.asarray, dict(state["state"]))


@pytest.mark.parametrize("kind,exported", [("train-vae", "params.msgpack"),
                                           ("train-clip", "flax_model.msgpack")])
def test_component_training_resumes_after_sigkill_exactly(kind, exported, tmp_path, repo_dir):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  tfds = tmp_path / "tfds"
  # The uninterrupted run goes alongside the one to be killed (tracing and XLA's CPU compile are
  # mostly single-threaded: two processes use the 2 cores better than one after another). Each
  # prepares the embedded dataset in its own directory (the same deterministic records).
  straight_log = open(tmp_path / "straight.log", "w+")  # a file: a full pipe would stall it
  straight_proc = subprocess.Popen(
      _command(kind, tmp_path / "straight", tmp_path / "tfds_straight"), cwd=repo_dir, env=env,
      stdout=subprocess.DEVNULL, stderr=straight_log, text=True)

  kill_at = random.Random(SEED).randint(8, STEPS - 8)
  out = tmp_path / "killed"
  proc = subprocess.Popen(_command(kind, out, tfds), cwd=repo_dir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while _logged_step(out / "train") < kill_at:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, "no progress"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    proc.kill()
    try:
      straight_proc.wait(timeout=900)
    finally:
      straight_proc.kill()
      straight_log.seek(0)
      straight_err = straight_log.read()
      straight_log.close()
  assert straight_proc.returncode == 0, straight_err[-3000:]
  killed_step, _ = _state(out / "train")
  assert killed_step < STEPS and not (out / exported).exists()  # killed mid-run
  again = subprocess.run(_command(kind, out, tfds), cwd=repo_dir, env=env, capture_output=True,
                         text=True, timeout=900)
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
