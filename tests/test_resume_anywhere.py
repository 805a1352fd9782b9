"""Resume anywhere: a checkpoint written on one mesh / number of hosts resumes on another and
restores on one CPU, with the losses of an uninterrupted run.

What makes it possible is the data layout (``data/pipeline.py``): the examples of global step
``s`` are a function of ``s`` alone, in the same row order for any number of processes, so the
iterator position is the step and no per-process iterator state is needed on restore. The
pipeline is checked directly (1, 2 and 4 processes against one), then the trainer end to end on
the toy regression fed by the real ``make_pipeline`` (``train_toy.py --images``, noisy loss: its
value depends on the row order of each global batch).
"""

import json
import os
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling.data import pipeline
from ldm_scaling.models import offline
from ldm_scaling.train import checkpoint as ckpt_lib
from ldm_scaling.train import trainer

import train_toy
from test_train import TOY, _env, _finish, _free_port, _losses, _start

GLOBAL_BATCH, STEPS = 8, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tokenizer(data_dir):
  from ldm_scaling.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.load_tokenizer(_pipeline_config(data_dir).text)  # once: seconds


def _pipeline_config(data_dir):
  config = offline.apply(cfglib.base_config())
  # 40 examples: 5 global batches per epoch, so 8 steps cross an epoch boundary.
  config.data.update(data_dir=data_dir, shapes_sizes=(40, 8), threads=2,
                     flip="caption_aware", caption_dropout=0.3)
  experiment.validate(config)
  return config


def _batches(config, process_count, process_index, n, tokenizer):
  it = pipeline.make_pipeline(config, "train", batch_size=GLOBAL_BATCH // process_count, seed=3,
                              process_index=process_index, process_count=process_count,
                              tokenizer=tokenizer)
  return [next(it) for _ in range(n)]


def test_global_batches_are_the_same_for_any_number_of_processes(data_dir, tokenizer):
  """For 2 and 4 processes, the processes' step-s batches concatenated in process order are the
  one-process step-s batch: the same images (flips included), captions (caption-aware flips and
  dropout included) and tokens, in the same rows."""
  config = _pipeline_config(data_dir)
  one = _batches(config, 1, 0, STEPS, tokenizer)
  assert sum(np.sum(b["captions"] == "") for b in one) > 0  # dropout happened: rng is exercised
  for count in (2, 4):
    parts = [_batches(config, count, p, STEPS, tokenizer) for p in range(count)]
    for s in range(STEPS):
      for key in ("images", "captions", "tokens"):
        np.testing.assert_array_equal(np.concatenate([part[s][key] for part in parts]),
                                      one[s][key], err_msg=f"{count} processes, step {s}, {key}")


def test_setting_the_position_from_the_step_equals_iterating(data_dir, tokenizer):
  """What the trainer does on resume: process 1 of 2 set to step 5 yields batches 5, 6 of an
  iterator read from the start, reading nothing before; its state then says where it is."""
  config = _pipeline_config(data_dir)
  want = _batches(config, 2, 1, 7, tokenizer)[5:]
  it = pipeline.make_pipeline(config, "train", batch_size=GLOBAL_BATCH // 2, seed=3,
                              process_index=1, process_count=2, tokenizer=tokenizer)
  ckpt_lib.set_data_position(it, 5)
  for w in want:
    got = next(it)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])
  assert it.get_state() == {"next_index": 7}
  with pytest.raises(TypeError, match="cannot be set to a position"):
    ckpt_lib.set_data_position(iter([1, 2]), 1)


@pytest.mark.parametrize("workers", [2, 3])
def test_setting_the_position_of_a_worker_interleave_equals_iterating(workers):
  """``data.workers > 0``: ``mp_prefetch`` reads worker w's slice ``[w::workers]`` of the batches
  and interleaves them round robin, an iterator grain cannot set by index. The same interleave of
  slices without processes (grain's ``InterleaveIterDataset``, whose state ``mp_prefetch``'s
  iterator keeps) set to step s yields batches s, s+1, ... of the plain stream. (With real worker
  processes: checked by hand; each start costs seconds.)"""
  stream = grain.MapDataset.range(50).shuffle(seed=1).repeat().random_map(
      lambda x, rng: x * 1000 + int(rng.integers(1000)), seed=2)
  batches = pipeline.process_batches(stream, 3, 1, 2)
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
  for step in (0, 1, workers - 1, workers, 7):
    it = iter(grain.experimental.InterleaveIterDataset(
        [batches[w::workers].to_iter_dataset(read) for w in range(workers)],
        cycle_length=workers))
    ckpt_lib.set_data_position(it, step)
    for k in range(step, step + 2 * workers):
      np.testing.assert_array_equal(next(it), batches[k], err_msg=f"step {step}, batch {k}")


# -------------------------------------------------------------------------------------------------
# The trainer: 2 processes x 4 devices on mesh (2, 4, 1) -> 1 process on (4, 2, 1) and on 1 device.


def _toy_args(data_dir, *more):
  return ("--images", f"data.data_dir={data_dir}", "train.batch_size=16", f"train.steps={STEPS}",
          "train.checkpoint_every=4", *more)


def _two_processes(workdir, *args):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, TOY, str(workdir), "--coordinator", f"localhost:{port}",
       "--num-processes", "2", "--process-id", str(i), *args],
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish_all(procs):
  try:
    return [_finish(p) for p in procs]
  finally:
    for proc in procs:
      proc.kill()


def _data_item(workdir, step):
  directory = os.path.join(workdir, "checkpoints", str(step), "data")
  return {name: json.load(open(os.path.join(directory, name)))
          for name in sorted(os.listdir(directory)) if name.startswith("process_")}


@pytest.mark.slow
def test_resume_on_another_mesh_another_process_count_and_one_cpu(tmp_path, capsys):
  """Saved at step 4 by 2 jax.distributed processes x 4 devices on mesh (2, 4, 1); resumed to
  step 8 by one process on (4, 2, 1) over 8 devices and on 1 device: every loss equals the
  uninterrupted run's (one process, 8 devices, pure data parallelism (8, 1, 1)) to float rounding
  (the first 4, logged by the 2 processes, too), and the checkpoints' weights restore on this
  process's single CPU device."""
  data_dir = str(tmp_path / "tfds")
  config = train_toy.images_config(batch_size=16, steps=STEPS, checkpoint_every=4,
                                   async_checkpointing=False)
  config.data.data_dir = data_dir
  pipeline.prepare(config)  # once, before the processes read it
  saving = _two_processes(tmp_path / "mp", *_toy_args(data_dir, "--max-steps", "4"),
                          "mesh.data=2", "mesh.fsdp=4")
  # The uninterrupted reference, at the same time: pure data parallelism, mesh (8, 1, 1).
  straight = _start(tmp_path / "straight", *_toy_args(data_dir), "mesh.data=8", devices=8)
  _finish_all([*saving, straight])
  # FSDP really splits the weights (and Adam's moments) 4 ways on the saving mesh.
  layout = json.loads((tmp_path / "mp" / "partitioning.json").read_text())["leaves"]
  w = layout[".params['linear']['w']"]
  assert w["spec"] == "P('fsdp', 'tensor')" and w["bytes_per_device"] * 4 == w["bytes"]
  assert layout[".opt_state['linear'][1][0].mu['w']"]["spec"] == w["spec"]
  # A position per saving process: grain's own restore would look for process_0-of-1.json.
  assert _data_item(tmp_path / "mp", 4) == {"process_0-of-2.json": {"next_index": 4},
                                            "process_1-of-2.json": {"next_index": 4}}
  for name in ("m421", "m111"):
    shutil.copytree(tmp_path / "mp", tmp_path / name)
  m421 = _start(tmp_path / "m421", *_toy_args(data_dir), "mesh.data=4", "mesh.fsdp=2", devices=8)
  try:
    capsys.readouterr()
    trainer.train(config, str(tmp_path / "m111"))  # 1 device, in this process
    assert "resumed from step 4 of 8" in capsys.readouterr().err
  finally:
    (out,) = _finish_all([m421])
  assert "resumed from step 4 of 8" in out.stderr, out.stderr[-2000:]
  ref = _losses(tmp_path / "straight")
  assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1] / 2  # it learns
  for name in ("m421", "m111"):  # steps 1-4 logged by the 2 processes, 5-8 after the resume
    got = _losses(tmp_path / name)
    assert sorted(got) == sorted(ref), name
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                               rtol=1e-5, err_msg=name)
  assert _data_item(tmp_path / "m421", STEPS) == {"process_0-of-1.json": {"next_index": 8}}
  # Sampling reads a checkpoint on one CPU device, whatever wrote it.
  assert len(jax.devices()) == 1
  (step, got), (_, want) = [ckpt_lib.load_weights(str(tmp_path / name), step=4, which="params")
                            for name in ("mp", "straight")]
  assert step == 4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
