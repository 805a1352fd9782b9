"""Nothing lost: cadence keys checked up front, a damaged latest checkpoint skipped (each kind of
damage), a failed save reported in one line with the metrics flushed, a resumed run's metrics
holding each step once, SIGTERM on a 2-process job checkpointing within seconds whatever
``log_every`` is, and a workdir that the processes do not share refused.

The toy objective of ``train_toy.py`` stands in for a UNet (the trainer does not know the
difference); runs are in-process except the multi-process ones (``slow``).
"""

import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from etils import epath
from flax import linen as nn
import jax
import numpy as np
import pytest

from ldm_scaling.errors import ConfigError
from ldm_scaling import sharding as sh
from ldm_scaling.train import objectives
from ldm_scaling.train import checkpoint as ckpt_lib
from ldm_scaling.train import metrics as metrics_lib
from ldm_scaling.train import trainer

import train_toy

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_toy.py")


@pytest.mark.parametrize("key,value", [("checkpoint_every", 0), ("keep_checkpoints", 0),
                                       ("log_every", 0), ("sample_every", -1), ("steps", 0)])
def test_cadence_and_count_keys_are_checked_before_anything_is_written(tmp_path, key, value):
  config = train_toy.toy_config(**{key: value})
  with pytest.raises(ConfigError, match=rf"train\.{key} must be .*got {value}"):
    trainer.train(config, str(tmp_path / "run"), make_data=train_toy.make_data())
  assert not os.path.exists(tmp_path / "run")  # nothing written: not even the workdir


def test_drop_rows_after_keeps_each_step_once(tmp_path):
  rows = [{"hparams": {"lr": 1}}] + [{"step": s, "loss": float(s)} for s in range(1, 8)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo'  # a torn last line
  (tmp_path / "metrics.jsonl").write_text(text)
  assert metrics_lib.drop_rows_after(str(tmp_path), 4) == 4  # steps 5, 6, 7 and the torn line
  kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert kept == rows[:5]
  assert metrics_lib.drop_rows_after(str(tmp_path), 4) == 0  # idempotent, file untouched


# -------------------------------------------------------------------------------------------------
# A damaged latest checkpoint.


def _chunks(step_dir):
  """Every OCDBT data file of the step. Orbax keeps copies (``state/d/`` and
  ``state/ocdbt.process_0/d/``) and restore reads only some of them: damaging only the first that
  glob lists (CI, 2026-12-01), then only the largest ones (a fast-tier run, 2026-12-01), left a
  readable checkpoint now and then."""
  return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def _truncate(step_dir):
  for path in _chunks(step_dir):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _flip_bytes(step_dir):
  for path in _chunks(step_dir):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _empty_metadata(step_dir):
  open(os.path.join(step_dir, "state", "_METADATA"), "w").close()


def _garbage_iterator_state(step_dir):
  (path,) = glob.glob(os.path.join(step_dir, "data", "process_*.json"))
  open(path, "w").write("{garbage")


def _empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGE = dict(truncated=_truncate, flipped=_flip_bytes, empty_metadata=_empty_metadata,
              garbage_iterator=_garbage_iterator_state, empty_dir=_empty_step_dir)


def _train(workdir, steps, **kw):
  config = train_toy.toy_config(steps=steps, checkpoint_every=3, async_checkpointing=False, **kw)
  return trainer.train(config, str(workdir), make_data=train_toy.make_data())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 6-step run (checkpoints 3 and 6) and, for reference, the same run straight to 9 steps."""
  root = tmp_path_factory.mktemp("recovery")
  _train(root / "six", 6)
  _train(root / "nine", 9)
  return root


def _params(workdir):
  return ckpt_lib.load_weights(str(workdir), which="params")


@pytest.mark.parametrize("damage", [  # one kind in the fast tier, all in the full suite
    pytest.param(d, marks=[] if d == "truncated" else pytest.mark.slow) for d in sorted(DAMAGE)])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumed(
    runs, tmp_path, capsys, damage):
  workdir = tmp_path / "run"
  shutil.copytree(runs / "six", workdir)
  DAMAGE[damage](str(workdir / "checkpoints" / "6"))
  result = _train(workdir, 9)
  err = capsys.readouterr().err
  assert result.step == 9 and result.stopped == "done"
  assert f"checkpoint 6 in {workdir / 'checkpoints'} is unreadable: " in err
  assert "resumed from step 3 of 9" in err
  (aside,) = glob.glob(str(workdir / "checkpoints" / "6.corrupt-*"))  # kept, not deleted
  assert ckpt_lib.available_steps(str(workdir)) == [3, 6, 9]
  # Resumed from step 3 exactly: the same parameters as the uninterrupted 9-step run.
  step, got = _params(workdir)
  _, want = _params(runs / "nine")
  assert step == 9
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  # Steps 4-6 were logged twice (before the damage and after the resume): once in the history.
  logged = [r["step"] for r in metrics_lib.history(str(workdir))]
  assert logged == list(range(1, 10))


def test_readers_fall_back_to_a_readable_step_unless_one_was_asked_for(runs, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(runs / "six", workdir)
  _truncate(str(workdir / "checkpoints" / "6"))
  step, _ = ckpt_lib.load_weights(str(workdir))  # what sample / eval / a teacher read
  assert step == 3 and "checkpoint 6 in" in capsys.readouterr().err
  with pytest.raises(ckpt_lib.UnreadableCheckpointError,
                     match=r"checkpoint 6 in .* is unreadable: .*pick another step "
                           r"\(have \[3, 6\]"):
    ckpt_lib.load_weights(str(workdir), step=6)
  assert os.path.isdir(workdir / "checkpoints" / "6")  # readers move nothing


def test_no_readable_checkpoint_is_an_error_that_loses_nothing(runs, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(runs / "six", workdir)
  for step in (3, 6):
    _garbage_iterator_state(str(workdir / "checkpoints" / str(step)))
  with pytest.raises(ckpt_lib.UnreadableCheckpointError, match=r"steps \[6, 3\] are damaged"):
    _train(workdir, 9)
  assert len(glob.glob(str(workdir / "checkpoints" / "*.corrupt-*"))) == 2


@objectives.register("toy_regression_wider")
class _ToyWider(train_toy.ToyRegression):
  """The toy regression with a bias of another shape: another model's checkpoint."""

  def init(self, rng):
    params = super().init(rng)
    params["linear"]["b"] = nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (sh.MLP,))(rng, (2 * train_toy.OUT,))
    return params

  def loss(self, params, frozen, ema, batch, rng):
    cut = {"linear": dict(params["linear"], b=params["linear"]["b"][:train_toy.OUT])}
    return super().loss(cut, frozen, {"linear": dict(ema["linear"],
                                                     b=ema["linear"]["b"][:train_toy.OUT])},
                        batch, rng)


def test_another_models_checkpoint_is_refused_and_nothing_is_moved_aside(runs, tmp_path):
  """A workdir whose config.json is gone (deleted while its trainer still saved on SIGTERM):
  the structural check cannot see the old model, so restoring meets arrays of other shapes.
  That is another model's run, not damage: a clear error, every step left where it was."""
  workdir = tmp_path / "run"
  shutil.copytree(runs / "six", workdir)
  os.remove(workdir / "config.json")
  config = train_toy.toy_config(steps=9, checkpoint_every=3, async_checkpointing=False)
  config.objective.name = "toy_regression_wider"
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r"checkpoint 6 in .* holds another model's arrays .*new --workdir"):
    trainer.train(config, str(workdir), make_data=train_toy.make_data())
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_a_failed_save_is_one_error_naming_step_and_directory_and_metrics_survive(
    tmp_path, monkeypatch):
  """The disk fills while orbax finalises checkpoint 3 (its ``_CHECKPOINT_METADATA``, written in
  the background): the run stops at the next log interval naming step 3 and the directory, and
  every step logged so far is in ``metrics.jsonl``."""
  write_text = epath.Path.write_text

  def full(self, *args, **kwargs):
    if self.name == "_CHECKPOINT_METADATA":
      raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", full)
  config = train_toy.toy_config(steps=30, checkpoint_every=3)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
    trainer.train(config, str(tmp_path), make_data=train_toy.make_data(delay=0.02))
  message = str(info.value)
  assert message.startswith(f"checkpoint 3 could not be written to {tmp_path / 'checkpoints'}: ")
  assert "No space left on device" in message and "\n" not in message
  logged = [r["step"] for r in metrics_lib.history(str(tmp_path))]
  assert logged[:3] == [1, 2, 3] and logged[-1] < 30  # flushed; stopped soon after step 3


# -------------------------------------------------------------------------------------------------
# Several processes (slow: they spawn jax.distributed jobs).


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _job(workdirs, *overrides, env=None):
  """A 2-process jax.distributed job of the toy (one CPU device each); ``workdirs`` per process."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONUNBUFFERED="1", **(env or {}))
  return [subprocess.Popen(
      [sys.executable, TOY, str(w), "--coordinator", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i), *overrides], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i, w in enumerate(workdirs)]


def _wait_for_checkpoint(workdir, procs, step, timeout=300):
  """Until a complete checkpoint >= ``step`` exists (a directory listing: cheap to poll)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    for p in procs:
      assert p.poll() is None, p.communicate()[1][-3000:]
    names = os.listdir(workdir / "checkpoints") if os.path.isdir(workdir / "checkpoints") else []
    if max([int(n) for n in names if n.isdigit()], default=-1) >= step:
      return
    time.sleep(0.2)
  raise TimeoutError(f"no checkpoint {step} in {workdir}")


@pytest.mark.slow
def test_sigterm_on_two_processes_checkpoints_within_seconds_whatever_log_every(tmp_path):
  """Spot-VM preemption: SIGTERM to both processes of a job logging every 10,000 steps. JAX's
  preemption service (started by ``jax.distributed``) keeps SIGTERM -- the trainer no longer
  replaces its handler -- and the job saves a checkpoint past the signal and exits 0 within
  seconds. (Without that service the trainer's own flag is agreed on time: the test below.)"""
  procs = _job([tmp_path] * 2, "--delay", "0.05", "train.steps=100000", "train.log_every=10000",
               "train.checkpoint_every=5")
  try:
    _wait_for_checkpoint(tmp_path, procs, 5)
    signalled = time.time()
    for p in procs:
      p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.time() - signalled
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  assert all("stopped=preempted" in o[0] for o in outs)
  assert elapsed < 20, elapsed  # agreement, save and shutdown
  # The preemption checkpoint is the step the job stopped at (it may coincide with a periodic one
  # when the agreed step happens to be a multiple of checkpoint_every).
  stopped = {int(re.search(r"RESULT step=(\d+) stopped=preempted", o[0]).group(1)) for o in outs}
  assert len(stopped) == 1, outs
  assert ckpt_lib.available_steps(str(tmp_path))[-1] == stopped.pop()


def test_the_stop_flag_is_agreed_on_wall_time_by_every_process(monkeypatch):
  """Without JAX's preemption service, processes agree on the SIGTERM flag in an allgather whose
  interval (in steps) is recomputed from the slowest process's step time, the same on every
  process: here a simulated peer is 4x slower than this process and gets the signal."""
  clock = {"now": 0.0}
  peer = {"flag": 0.0}
  calls = []

  def allgather(x):
    calls.append(int(clock["step"]))
    mine = np.asarray(x, np.float32)
    return np.stack([mine, np.array([peer["flag"], 4 * mine[1] if mine[1] > 0 else mine[1]],
                                    np.float32)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(trainer.multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(trainer.time, "monotonic", lambda: clock["now"])
  flag = trainer._StopFlag(poll_seconds=2.0)
  stopped_at = None
  for step in range(1, 200):
    clock["step"], clock["now"] = step, step * 0.1  # this process: 0.1 s per step, peer 0.4 s
    if step == 30:
      peer["flag"] = 1.0  # SIGTERM reaches the other process
    if flag.agreed(step):
      stopped_at = step
      break
  # First agreement at step 1, then again at 2 (no estimate before), then every
  # ceil(2 s / 0.4 s) = 5 steps: 7, 12, ..., 32 -- the first check after the signal.
  assert calls == [1, 2, 7, 12, 17, 22, 27, 32]
  assert stopped_at == 32


@pytest.mark.slow
def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  """Host-local workdirs (each process its own directory) would disagree on the checkpoints and
  hang: both processes stop with the same error before anything compiles."""
  procs = _job([tmp_path / "host0", tmp_path / "host1"], "train.steps=3")
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode != 0
    assert ("is not shared by the 2 processes: process(es) [1] cannot see the file"
            in err), err[-2000:]
  assert not os.path.exists(tmp_path / "host0" / "checkpoints")
