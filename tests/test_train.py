"""The trainer on toy objectives: exact resume after SIGKILL, SIGTERM, NaN guard, bad configs,
gradient accumulation, a UNet sharded over 8 fake devices (toy meshes and 2 jax.distributed
processes: tests/test_resume_anywhere.py); two
networks trained in phases (each phase leaves the other network bit-identical); checkpoints
written before networks + phases resume.

Kill points are drawn from ``random.Random(SEED)``: set ``LDM_SCALING_TEST_SEED`` to try others.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ldm_scaling.errors import ConfigError
from ldm_scaling.train import trainer

import train_toy

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = os.path.join(HERE, "train_toy.py")
SEED = int(os.environ.get("LDM_SCALING_TEST_SEED", "0"))


def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _start(workdir, *overrides, devices=1, extra=(), cwd=None):
  return subprocess.Popen([sys.executable, TOY, str(workdir), *extra, *overrides],
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd)


def _finish(proc, check=True):
  out, err = proc.communicate(timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"rc={proc.returncode}\n{out}\n{err[-4000:]}")
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(workdir, *overrides, devices=1, extra=(), check=True, cwd=None):
  return _finish(_start(workdir, *overrides, devices=devices, extra=extra, cwd=cwd), check)


def _run_together(*runs):
  """Independent runs ``(workdir, overrides, devices)`` at the same time: tracing and XLA's CPU
  compile are mostly single-threaded, so concurrent processes use the 2 cores better than runs
  one after another (the results do not depend on it)."""
  return [_finish(p) for p in [_start(w, *o, devices=d) for w, o, d in runs]]


def _restore_here(manager, step):
  """A checkpoint's whole state on this process's first device, whatever mesh saved it."""
  tree = manager.item_metadata(step)["state"]
  tree = dict(getattr(tree, "tree", tree))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return jax.tree.map(np.asarray, dict(state["state"]))


def _manager(workdir):
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_handlers={"state": ocp.StandardCheckpointHandler()})


def _final_state(workdir):
  manager = _manager(workdir)
  step = manager.latest_step()
  state = _restore_here(manager, step)
  manager.close()
  return step, state


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _logged_steps(workdir):
  return {r["step"] for r in _rows(workdir) if any(k.endswith("loss") for k in r)}


def _wait_for_step(workdir, proc, step, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path) and max(_logged_steps(workdir), default=0) >= step:
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def _kill_and_resume(tmp_path, steps: int, *overrides, devices=1, seed=SEED):
  """Runs the toy straight and, in another workdir, SIGKILLs it at a seeded step and resumes it;
  returns both final states."""
  args = (f"train.steps={steps}", *overrides)
  # The uninterrupted run (a relative workdir) runs alongside the killed one.
  straight = _start("straight", *args, extra=["--delay", "0.05"], cwd=tmp_path, devices=devices)
  kill_at = random.Random(seed).randint(3, steps - 3)
  workdir = tmp_path / "killed"
  try:
    proc = subprocess.Popen([sys.executable, TOY, str(workdir), "--delay", "0.3", *args],
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
      _wait_for_step(workdir, proc, kill_at)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    finally:
      proc.kill()
    assert proc.returncode == -signal.SIGKILL
    _run(workdir, *args, devices=devices)
    _finish(straight)
  finally:
    straight.kill()
  step_a, a = _final_state(tmp_path / "straight")
  step_b, b = _final_state(workdir)
  assert step_a == step_b == steps
  # The steps logged between the last checkpoint and the kill were trained again: logged once.
  logged = [r["step"] for r in _rows(workdir) if any(k.endswith("loss") for k in r)]
  assert logged == list(range(1, steps + 1)), logged
  return a, b


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bitwise: params, EMA, optimiser state, step


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
  _assert_bitwise(*_kill_and_resume(tmp_path, 14))


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, TOY, str(workdir), "--delay", "0.2", "train.steps=500",
                           "train.checkpoint_every=1000"],
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_step(workdir, proc, 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "stopped=preempted" in out
  step, _ = _final_state(workdir)
  assert step >= 4 and "stop requested at step" in err
  out = _run(workdir, f"train.steps={step + 3}", "train.checkpoint_every=1000").stdout
  assert f"RESULT step={step + 3} stopped=done" in out
  losses = _losses(workdir)
  assert sorted(losses)[-3:] == [step + 1, step + 2, step + 3]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = train_toy.toy_config(steps=10, checkpoint_every=2, async_checkpointing=False)
  with pytest.raises(trainer.NonFiniteError, match="non-finite loss or gradient at step 5"):
    trainer.train(config, str(tmp_path), make_data=train_toy.make_data(nan_at=5))
  step, state = _final_state(tmp_path)
  assert step == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_gradient_accumulation_equals_full_batch(tmp_path):
  finals = []
  for accum in (1, 4):
    config = train_toy.toy_config(steps=3, grad_accum_steps=accum, async_checkpointing=False)
    config.objective.name = "toy_regression_exact"
    trainer.train(config, str(tmp_path / f"a{accum}"), make_data=train_toy.make_data())
    finals.append(_final_state(tmp_path / f"a{accum}")[1]["params"])
  for x, y in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update,match", [
    (dict(batch_size=6, grad_accum_steps=4), "not divisible by train.grad_accum_steps=4"),
    (dict(schedule="exponential"), "train.schedule must be one of"),
    (dict(ema_decay=1.0), "train.ema_decay must be in"),
])
def test_bad_train_configs(tmp_path, update, match):
  config = train_toy.toy_config(**update)
  with pytest.raises(ConfigError, match=match):
    trainer.train(config, str(tmp_path), make_data=train_toy.make_data())
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing written before validation


def test_bad_mesh_and_objective(tmp_path):
  config = train_toy.toy_config()
  config.mesh.update(data=2, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match=r"needs 2 devices but 1 are available"):
    trainer.train(config, str(tmp_path), make_data=train_toy.make_data())
  config = train_toy.toy_config()
  config.objective.name = "nope"
  with pytest.raises(ConfigError, match="unknown objective.name 'nope'"):
    trainer.train(config, str(tmp_path), make_data=train_toy.make_data())


def test_workdir_of_another_experiment_is_refused(tmp_path):
  config = train_toy.toy_config(steps=2)
  trainer.train(config, str(tmp_path), make_data=train_toy.make_data())
  config.model.width = 64
  with pytest.raises(ConfigError, match="different model settings"):
    trainer.train(config, str(tmp_path), make_data=train_toy.make_data())
  config.model.width = 320
  config.train.steps = 4  # extending a run is fine
  assert trainer.train(config, str(tmp_path), make_data=train_toy.make_data()).step == 4
  config.model.attn_query_chunk = 0  # so is changing how attention is computed (same values)
  config.train.steps = 5
  assert trainer.train(config, str(tmp_path), make_data=train_toy.make_data()).step == 5


def test_batch_not_divisible_by_mesh_on_8_devices(tmp_path):
  proc = _run(tmp_path, "train.batch_size=12", devices=8, check=False)
  assert proc.returncode != 0
  assert "cannot be split over data x fsdp = 8 x 1 = 8 devices" in proc.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_unet_denoising_same_trajectory_on_meshes(tmp_path):
  """The real thing, small: denoising a tiny UNet on (1,1,1) and (2,4,1) meshes gives the same
  losses; FSDP really splits the UNet's weights and Adam moments 4 ways. (Pure data parallelism,
  (8,1,1), is covered on the toy objective.)"""
  _run_together((tmp_path / "m111", ("--unet", "mesh.data=1"), 1),
                (tmp_path / "m241", ("--unet", "mesh.data=2", "mesh.fsdp=4"), 8))
  layout = json.load(open(tmp_path / "m241" / "partitioning.json"))
  conv = layout["leaves"][".params['unet']['mid_block']['resnets_0']['conv1']['kernel']"]
  assert conv["spec"] == "P(None, None, 'fsdp', 'tensor')"
  assert conv["bytes_per_device"] * 4 == conv["bytes"]
  assert layout["bytes_per_device"] < 0.3 * layout["total_bytes"]  # norms etc. stay replicated
  ref = _losses(tmp_path / "m111")
  assert len(ref) == 4 and ref[4] < ref[1]  # it learns
  got = _losses(tmp_path / "m241")
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                             rtol=2e-4)


def test_denoising_on_embedded_data_with_frozen_encoders(tiny_run, capsys):
  """The production path in one process (the ``tiny_run`` fixture): grain batches of images +
  tokens, the frozen VAE and CLIP text tower run inside the jitted step, only the UNet is
  trained and checkpointed."""
  from ldm_scaling.train import checkpoint  # pylint: disable=g-import-not-at-top
  workdir, result = tiny_run
  assert result.step == 3 and np.isfinite(result.metrics["loss"])
  assert (workdir / "samples" / "step_0000003.png").exists()  # periodic sample grid
  step, weights = checkpoint.load_weights(str(workdir))
  assert step == 3 and set(weights) == {"unet"}  # frozen networks are never saved
  saved = checkpoint.load_run_config(str(workdir))
  assert saved.model.width == 32 and saved.text.encoder == "clip-small"
  # Sampling the run: its EMA UNet, its text encoder and its VAE (decoded 32 px images).
  from ldm_scaling import cli  # pylint: disable=g-import-not-at-top
  out = workdir / "grid.png"
  assert cli.main(["sample", "--checkpoint", str(workdir), "--prompt", "a red circle",
                   "--cfg-scale", "1,4", "--steps", "3", "--out", str(out)]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["conditioning"].startswith("text encoder")
  assert summary["decoder"].startswith("VAE") and "at step 3" in summary["model"]
  assert summary["latent_size"] == 8 and out.exists()


def test_format_duration_by_hand():
  from ldm_scaling.train import metrics  # pylint: disable=g-import-not-at-top
  assert [metrics.format_duration(s) for s in (0, 59.9, 61, 3599, 3600, 3 * 3600 + 125)] == [
      "0m00s", "0m59s", "1m01s", "59m59s", "1h00m", "3h02m"]
  assert metrics.format_duration(float("nan")) == "?"


def test_atomic_write_text_replaces_whole_files_and_leaves_no_temporary(tmp_path):
  from ldm_scaling import files  # pylint: disable=g-import-not-at-top
  path = tmp_path / "config.json"
  files.atomic_write_text(path, "old")
  files.atomic_write_text(str(path), "new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


# -------------------------------------------------------------------------------------------------
# Two networks, phases, frozen networks.


def _states(workdir):
  manager = _manager(workdir)
  out = {s: _restore_here(manager, s) for s in manager.all_steps()}
  manager.close()
  return out


def _same(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_phase_updates_only_its_networks(tmp_path):
  """A critic step leaves the generator's params, optimiser state and EMA bitwise unchanged, and
  a generator step the critic's; 3 critic steps per generator step, each network with its own
  learning rate counted in its own updates."""
  config = train_toy.toy_config(steps=8, checkpoint_every=1, keep_checkpoints=20,
                                async_checkpointing=False)
  config.objective.name = "toy_two_networks"
  trainer.train(config, str(tmp_path), make_data=train_toy.make_data())
  states = _states(tmp_path)
  assert sorted(states) == list(range(1, 9)) and set(states[8]["ema"]) == {"gen"}
  for k in range(1, 8):  # checkpoint k -> k + 1 is step index k
    before, after = states[k], states[k + 1]
    phase = "critic" if k % (train_toy.CRITIC_EVERY + 1) < train_toy.CRITIC_EVERY else "gen"
    other = {"critic": "gen", "gen": "critic"}[phase]
    assert _same(before["params"][other], after["params"][other]), (k, phase)
    assert _same(before["opt_state"][other], after["opt_state"][other]), (k, phase)
    assert _same(before["ema"]["gen"], after["ema"]["gen"]) == (phase == "critic"), k
    assert not _same(before["params"][phase], after["params"][phase]), (k, phase)
  counts = {n: int(states[8]["opt_state"][n][1][0]["count"]) for n in ("critic", "gen")}
  assert counts == {"critic": 6, "gen": 2}  # steps 0-2, 4-6 and 3, 7
  rows = {r["step"]: r for r in _rows(tmp_path)}
  # The critic's cosine schedule counts its own updates (0..5 at steps 1, 2, 3, 5, 6, 7).
  want = [train_toy.CRITIC_LR * 0.5 * (1 + np.cos(np.pi * c / train_toy.CRITIC_STEPS))
          for c in range(6)]
  np.testing.assert_allclose([rows[s]["lr/critic"] for s in (1, 2, 3, 5, 6, 7)], want, rtol=1e-6)
  assert [rows[s]["lr/gen"] for s in (4, 8)] == [pytest.approx(train_toy.GEN_LR)] * 2
  assert "gen/fit" in rows[4] and "critic/loss" in rows[1] and "loss" not in rows[1]


def test_two_networks_resume_after_sigkill_is_bitwise_identical(tmp_path):
  """SIGKILL at a seeded step and resume on a (2, 4, 1) mesh of 8 devices: the same final state
  of both networks, bitwise, as an uninterrupted run; the frozen teacher is split over fsdp, not
  replicated. (One device runs the same restore code: the one-network toy above; two networks
  on one device: the phase and layout-1 tests below, in process.)"""
  a, b = _kill_and_resume(tmp_path, 12, "objective.name=toy_two_networks", "mesh.data=2",
                          "mesh.fsdp=4", devices=8, seed=SEED + 8)
  _assert_bitwise(a, b)
  frozen = json.load(open(tmp_path / "killed" / "partitioning.json"))["frozen"]["leaves"]
  teacher = frozen["['teacher']['w']"]
  assert teacher["spec"] == "P('fsdp', 'tensor')"
  assert teacher["bytes_per_device"] * 4 == teacher["bytes"]


def _write_layout_1(workdir, step, train_cfg):
  """Rewrites checkpoint ``step`` as the trainer wrote it before networks + phases: one optimiser
  state over the dict of networks, and no ``state_layout`` in its meta (the data iterator's
  position is kept as it is)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import optim  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train.state import TrainState  # pylint: disable=g-import-not-at-top
  state = _states(workdir)[step]
  (name,) = state["params"]
  old_tree = optim.optimizer(train_cfg).init({name: state["params"][name]})
  old_opt = jax.tree.unflatten(jax.tree.structure(old_tree),
                               jax.tree.leaves(state["opt_state"][name]))
  old = TrainState(step=state["step"], params=state["params"], ema=state["ema"], opt_state=old_opt)
  staging = os.path.join(workdir, "layout1")
  manager = ocp.CheckpointManager(staging)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                             meta=ocp.args.JsonSave(dict(objective="toy"))))
  manager.wait_until_finished()
  manager.close()
  for item in ("state", "meta"):
    target = os.path.join(workdir, "checkpoints", str(step), item)
    shutil.rmtree(target)
    shutil.move(os.path.join(staging, str(step), item), target)


def test_checkpoints_written_before_networks_and_phases_resume(tmp_path, repo_dir):
  """A layout-1 checkpoint (one optimiser state over the dict of networks) is converted on
  restore: made from this code's own state at step 6, the resumed run ends bitwise where an
  uninterrupted one does. A workdir the previous version wrote (tests/data) resumes too, its
  losses equal to this version's to float rounding."""
  import shutil  # pylint: disable=g-import-not-at-top
  config = train_toy.toy_config(steps=12, async_checkpointing=False)
  trainer.train(config, str(tmp_path / "straight"), make_data=train_toy.make_data())
  trainer.train(config, str(tmp_path / "old"), make_data=train_toy.make_data(), max_steps=6)
  _write_layout_1(tmp_path / "old", 6, config.train)
  assert trainer.train(config, str(tmp_path / "old"), make_data=train_toy.make_data()).step == 12
  _assert_bitwise(_states(tmp_path / "straight")[12], _states(tmp_path / "old")[12])

  real = tmp_path / "real"
  shutil.copytree(os.path.join(repo_dir, "tests", "data", "workdir_v1_toy"), real)
  before = _losses(real)
  config = train_toy.toy_config(steps=12, async_checkpointing=False)
  assert trainer.train(config, str(real), make_data=train_toy.make_data()).step == 12
  ref = _losses(tmp_path / "straight")
  assert sorted(before) == list(range(1, 7))
  np.testing.assert_allclose([before[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                             rtol=1e-6)
  after = _losses(real)
  np.testing.assert_allclose([after[s] for s in range(7, 13)], [ref[s] for s in range(7, 13)],
                             rtol=1e-5)
