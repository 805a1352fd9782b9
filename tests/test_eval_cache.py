"""What the eval job keeps between runs: which cells are done (keyed on the settings that made
them), the FID reference-statistics cache (keyed on the dataset's identity, written whole through
epath), and the results table's files (durable, readable despite one bad row, safe with
concurrent writers). All on hand-made inputs: nothing is trained or sampled."""

import json
import os
import stat
import threading
import types
import warnings

from etils.epath import gpath
from etils.epath import testing as epath_testing
import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling import files
from ldm_scaling.eval import fid, grid, results

STEP = 3
CELL = grid.Cell("ddim", 2, 3.0)
CHECKPOINT = dict(step=STEP, committed=1700000000000000000, config_hash="abc")
DATASET = dict(dataset="captioned_shapes/32px_2000_256/1.0.0", split="test", num_examples=256,
               num_bytes=123456)
REFERENCE = dict(dataset=DATASET, resolution=32, n=16, feature_extractor="pt_inception-2015-12-05",
                 preprocessing=fid.PREPROCESSING)
COMPONENTS = dict(clip_score=grid.OFFLINE_CLIP_LABEL, offline_clip="c1ip", trained_vae="vae1")


def _config(**eval_section):
  config = cfglib.base_config()
  config.eval.update(dict(dict(num_samples=8, fid_reference_n=16), **eval_section))
  return config


def _settings(config, checkpoint=CHECKPOINT, reference=REFERENCE, components=COMPONENTS):
  return grid.cell_settings(config, config.eval, checkpoint_id=checkpoint, reference=reference,
                            components=components)


def _write_row(table, run, config, cell=CELL, settings=None, **values):
  """A row as the grid writes it (keyed when ``settings`` is given, else as before keys)."""
  row = {c: 1 for c in results.COLUMNS}
  row.update(grid._key(run, config, STEP, cell), n=config.eval.num_samples, **values)
  if settings is not None:
    row[results.KEY_COLUMN] = grid.cell_key(settings)
    row[results.SETTINGS_COLUMN] = json.dumps(settings, sort_keys=True)
  table.add(row)
  return row


def _paths(tmp_path):
  return str(tmp_path / "study" / "runs" / "w32"), str(tmp_path / "study" / "results")


def _state(table, workdir, table_dir, config, settings, cell=CELL):
  return grid.cell_state(table, grid.run_ids(workdir, table_dir), config, STEP, cell,
                         grid.cell_key(settings))[0]


# -------------------------------------------------------------------------------------------------
# Cell keys.


def test_a_cell_is_done_only_when_made_with_the_same_settings(tmp_path):
  workdir, table_dir = _paths(tmp_path)
  table = results.Table(table_dir)
  quick = _config()
  _write_row(table, grid.run_id(workdir, table_dir), quick, settings=_settings(quick))
  assert _state(table, workdir, table_dir, quick, _settings(quick)) == "done"
  # What chooses the cells or how fast they run does not change a cell's value: the study's
  # training-curve pass (other samplers / checkpoints lists) finds the cells of its grid pass.
  same = _config(samplers=("ddim", "dpm++"), checkpoints="all", batch_size=3,
                 stats_dir="/elsewhere", grid_images=2)
  assert grid.cell_key(_settings(same)) == grid.cell_key(_settings(quick))

  changed = {
      "num_samples": _settings(_config(num_samples=30000)),
      "seed": _settings(_config(seed=1)),
      "ddim_eta": _settings(_config(ddim_eta=0.5)),
      "clip model": _settings(quick, components=dict(COMPONENTS, clip_score="openai/clip")),
      "reference n": _settings(quick, reference=dict(REFERENCE, n=30000)),
      "reference data": _settings(quick, reference=dict(
          REFERENCE, dataset=dict(DATASET, num_examples=300))),
      "retrained checkpoint": _settings(quick, checkpoint=dict(CHECKPOINT, committed=2)),
  }
  other_run = _config()
  other_run.diffusion.prediction = "v"
  changed["run config"] = _settings(other_run)
  for what, settings in changed.items():
    assert _state(table, workdir, table_dir, quick, settings) == "stale", what
  assert len({grid.cell_key(s) for s in changed.values()}) == len(changed)


def test_pending_evaluates_stale_cells_again_and_says_what_changed(tmp_path):
  workdir, table_dir = _paths(tmp_path)
  table = results.Table(table_dir)
  quick, full = _config(), _config(num_samples=30000)
  cells = [CELL, grid.Cell("ddim", 2, 7.5)]
  for cell in cells:
    _write_row(table, grid.run_id(workdir, table_dir), quick, cell, _settings(quick))
  items = [(workdir, config, config.eval, STEP, cell) for config in (quick, full)
           for cell in cells]
  keys = {id(item[1]): (grid.cell_key(_settings(item[1])), _settings(item[1]))
          for item in items}
  todo, notes = grid.pending(table, table_dir, items, lambda item: keys[id(item[1])])
  assert todo == items[2:]  # the same settings: done; 30000 samples: evaluated again
  assert len(notes) == 1 and "2 row(s)" in notes[0] and "other settings" in notes[0]
  assert "eval.num_samples 8 -> 30000" in notes[0]


def test_pending_refuses_to_replace_another_seeds_rows(tmp_path):
  """A table keeps one row per cell: evaluating it at another eval.seed would replace the first
  seed's measurements. Refused before anything is evaluated; every row file is left as it was."""
  workdir, table_dir = _paths(tmp_path)
  table = results.Table(table_dir)
  seed0, seed1 = _config(), _config(seed=1)
  cells = [CELL, grid.Cell("ddim", 2, 7.5)]
  for cell in cells:
    _write_row(table, grid.run_id(workdir, table_dir), seed0, cell, _settings(seed0), fid=12.5)
  before = {p.name: p.read_text() for p in table.rows_dir.iterdir()}
  items = [(workdir, seed1, seed1.eval, STEP, cell) for cell in cells]
  key = (grid.cell_key(_settings(seed1)), _settings(seed1))
  with pytest.raises(grid.OtherSeedError, match=r"2 cell\(s\) .* eval.seed 0 .* seed 1") as err:
    grid.pending(table, table_dir, items, lambda item: key)
  assert f"--results {table_dir}/seed1" in str(err.value)
  assert {p.name: p.read_text() for p in table.rows_dir.iterdir()} == before
  # Into a table of its own, seed 1 is simply pending; seed 0 again is done.
  assert grid.pending(results.Table(table_dir + "1"), table_dir + "1", items,
                      lambda item: key)[0] == items
  same = (grid.cell_key(_settings(seed0)), _settings(seed0))
  assert grid.pending(table, table_dir, [(workdir, seed0, seed0.eval, STEP, c) for c in cells],
                      lambda item: same)[0] == []


def test_rows_from_before_keys_load_and_are_evaluated_again_with_one_warning(tmp_path):
  workdir, table_dir = _paths(tmp_path)
  table = results.Table(table_dir)
  config = _config()
  cells = [CELL, grid.Cell("dpm++", 2, 3.0)]
  _write_row(table, grid.run_id(workdir, table_dir), config, cells[0])
  _write_row(table, os.path.abspath(workdir), config, cells[1])  # the older absolute run id
  table.write_tables()
  frame = results.load(table_dir)
  assert len(frame) == 2 and results.KEY_COLUMN not in frame.columns
  items = [(workdir, config, config.eval, STEP, cell) for cell in cells]
  key = (grid.cell_key(_settings(config)), _settings(config))
  todo, notes = grid.pending(table, table_dir, items, lambda item: key)
  assert todo == items
  assert len(notes) == 1 and "2 row(s)" in notes[0] and "written before" in notes[0]


# -------------------------------------------------------------------------------------------------
# Row files: durable writes, one bad row, concurrent table writers.


def test_a_corrupt_row_is_named_left_out_and_its_cell_evaluated_again(tmp_path):
  workdir, table_dir = _paths(tmp_path)
  table = results.Table(table_dir)
  config = _config()
  settings = _settings(config)
  run = grid.run_id(workdir, table_dir)
  cells = [grid.Cell("ddim", 2, w) for w in (1.0, 3.0, 7.5)]
  for cell in cells:
    _write_row(table, run, config, cell, settings)
  empty = table.path(grid._key(run, config, STEP, cells[0]))
  garbage = table.path(grid._key(run, config, STEP, cells[1]))
  empty.write_text("")  # what a power loss left before row writes were fsynced
  garbage.write_text('{"run": ')
  with pytest.warns(results.CorruptRowWarning) as caught:
    frame = results.load(table_dir)
  messages = " ".join(str(w.message) for w in caught)
  assert str(empty) in messages and "is empty" in messages
  assert str(garbage) in messages and "not JSON" in messages
  assert list(frame["cfg_scale"]) == [7.5]  # the good row still loads
  with pytest.warns(results.CorruptRowWarning, match=str(empty.name)):
    state = _state(table, workdir, table_dir, config, settings, cells[0])
  assert state == "missing"  # so the grid evaluates it again
  assert _state(table, workdir, table_dir, config, settings, cells[2]) == "done"
  _write_row(table, run, config, cells[0], settings)  # evaluated again: replaces the bad file
  garbage.unlink()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert sorted(results.load(table_dir)["cfg_scale"]) == [1.0, 7.5]


def test_atomic_writes_fsync_the_file_and_its_directory(tmp_path, monkeypatch):
  synced = []
  real_fsync = os.fsync

  def fsync(fd):
    synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  files.atomic_write_text(tmp_path / "row.json", '{"a": 1}')
  assert synced == ["file", "dir"]
  assert (tmp_path / "row.json").read_text() == '{"a": 1}'
  assert os.listdir(tmp_path) == ["row.json"]


def test_table_regenerated_by_a_late_writer_keeps_every_row(tmp_path, monkeypatch):
  """Shard B reads the rows, shard A adds its last row and writes the whole table, then B writes
  what it read: B must notice the new row and write again (not last-writer-wins)."""
  config = _config()
  b, a = results.Table(str(tmp_path)), results.Table(str(tmp_path))
  _write_row(b, "w32", config, grid.Cell("ddim", 2, 1.0))
  write = results.Table._write
  raced = []

  def racing_write(self, rows):
    if not raced:
      raced.append(True)
      _write_row(a, "w32", config, grid.Cell("ddim", 2, 3.0))
      write(a, a.rows())
    write(self, rows)

  monkeypatch.setattr(results.Table, "_write", racing_write)
  b.write_tables()
  assert raced
  assert sorted(results.load(str(tmp_path / "results.csv"))["cfg_scale"]) == [1.0, 3.0]
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(lines) == 2


def test_concurrent_table_writers_all_succeed_and_the_table_is_complete(tmp_path):
  config = _config()
  errors = []
  barrier = threading.Barrier(4)

  def shard(i):
    try:
      table = results.Table(str(tmp_path))
      barrier.wait()
      for k in range(3):
        _write_row(table, f"w{i}", config, grid.Cell("ddim", 2, float(k)))
        table.write_tables()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=shard, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert len(results.load(str(tmp_path / "results.csv"))) == 12
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# -------------------------------------------------------------------------------------------------
# FID reference-statistics cache.


class _MeanColour:
  """A stand-in feature extractor (3-d mean colour): what ``reference_stats`` needs of one."""
  definition = dict(feature_extractor="mean-colour", weights_sha256="0" * 8, preprocessing="none")
  provenance = dict(definition, weights_source="test")

  def __init__(self):
    self.calls = 0

  def __call__(self, batches):
    self.calls += 1
    return np.concatenate([np.asarray(b, np.float32).reshape(len(b), -1, 3).mean(1)
                           for b in batches])


def _images():
  rng = np.random.default_rng(0)
  yield rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  yield rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)


def _fake_source(full_name, num_examples):
  split = types.SimpleNamespace(num_examples=num_examples, num_bytes=1000 * num_examples)
  info = types.SimpleNamespace(full_name=full_name, splits={"test": split})
  return types.SimpleNamespace(records=types.SimpleNamespace(dataset_info=info),
                               description=full_name)


def test_reference_stats_are_not_reused_after_the_dataset_changes(tmp_path, monkeypatch):
  """An edited manifest (same data.name, so the old cache key) makes another prepared dataset
  (its tfds config name carries the manifest's digest): new statistics, not the old ones."""
  config = _config()
  config.data.update(name="folder:/data/manifest.jsonl", resolution=4)
  sources = {"v1": _fake_source("captioned_folder/manifest_0123456789/1.0.0", 12),
             "v2": _fake_source("captioned_folder/manifest_abcdefabcd/1.0.0", 12)}
  version = ["v1"]
  monkeypatch.setattr(grid.data, "source", lambda c, split: sources[version[0]], raising=False)
  extractor = _MeanColour()

  def stats():
    return fid.reference_stats(_images, dataset=config.data.name, split="test", resolution=4,
                               n=10, extractor=extractor, directory=str(tmp_path),
                               identity=grid.dataset_identity(config, "test"))

  first = stats()
  assert extractor.calls == 1 and first.metadata["dataset_identity"]["num_examples"] == 12
  stats()
  assert extractor.calls == 1  # the same dataset: cached
  version[0] = "v2"
  stats()
  assert extractor.calls == 2  # the manifest changed: recomputed, in a file of its own
  names = sorted(os.listdir(tmp_path))
  assert len(names) == 2 and all(":" not in n and n.startswith("folder_data_manifest") for n in names)
  version[0] = "v1"
  stats()
  assert extractor.calls == 2
  # The grid's cell key moves with the dataset too.
  before = grid.reference_identity(config, config.eval)
  version[0] = "v2"
  assert grid.reference_identity(config, config.eval) != before


def test_concurrent_saves_of_the_same_stats_both_succeed(tmp_path):
  stats = fid.compute_stats(np.random.default_rng(0).normal(size=(20, 3)))
  path = str(tmp_path / "stats" / "ref.npz")
  for _ in range(10):
    barrier, errors = threading.Barrier(2), []

    def save():
      try:
        barrier.wait()
        fid.save_stats(path, stats)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert not errors
  np.testing.assert_array_equal(fid.load_stats(path).sigma, stats.sigma)
  assert os.listdir(tmp_path / "stats") == ["ref.npz"]  # no temporaries left


def test_a_truncated_stats_cache_is_recomputed(tmp_path):
  extractor = _MeanColour()
  kw = dict(dataset="shapes", split="test", resolution=4, n=10, extractor=extractor,
            directory=str(tmp_path), identity=DATASET)
  fid.reference_stats(_images, **kw)
  path = fid.reference_stats_path(str(tmp_path), "shapes", "test", 4, 10, DATASET)
  with open(path, "r+b") as f:
    f.truncate(40)
  with pytest.warns(UserWarning, match="not an FID statistics file.*recomputing"):
    fid.reference_stats(_images, **kw)
  assert extractor.calls == 2 and fid.load_stats(path).n == 10


def test_gs_stats_dir_and_table_go_through_epath(tmp_path, monkeypatch):
  """``gs://bucket/x`` is written through epath's backend (here mapped onto a local folder by
  etils' own mock), never as a local folder named ``gs:``."""
  bucket = tmp_path / "gcs"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past mock_epath's backends.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  seen = []

  def local(path):
    path = os.fspath(path)
    if path.startswith("gs://"):
      seen.append(path)
      return str(bucket / path[len("gs://"):])
    return path

  def one(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  with epath_testing.mock_epath(
      open=one, exists=one, isdir=one, glob=one, listdir=one, makedirs=one, mkdir=one,
      remove=one, stat=one, rmtree=one, walk=one, rename=two, replace=two, copy=two):
    extractor = _MeanColour()
    kw = dict(dataset="shapes", split="test", resolution=4, n=10, extractor=extractor,
              directory="gs://bucket/x", identity=DATASET)
    fid.reference_stats(_images, **kw)
    again = fid.reference_stats(_images, **kw)
    assert extractor.calls == 1 and again.n == 10  # read back through gs://
    table = results.Table("gs://bucket/results")
    _write_row(table, "w32", _config())
    table.write_tables()
    assert len(results.load("gs://bucket/results")) == 1
  assert any(p.startswith("gs://bucket/x/shapes-test-4px-n10-") for p in seen)
  assert len(list((bucket / "bucket" / "x").glob("*.npz"))) == 1
  assert (bucket / "bucket" / "results" / "results.csv").exists()
  assert not os.path.exists(cwd / "gs:") and os.listdir(cwd) == []
