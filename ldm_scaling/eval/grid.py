"""The evaluation grid: every (run, checkpoint, sampler, steps, CFG scale) cell -> one results row.

For each cell: ``eval.num_samples`` images for the first ``num_samples`` captions of
``data.eval_split`` (the same prompts and the same initial noise in every cell:
``fold_in(key(eval.seed), prompt index)``), sampled from the checkpoint's EMA UNet and decoded by
the run's VAE; FID against the reference statistics of ``eval.fid_reference_n`` real images of the
eval split (cached per prepared dataset identity/split/resolution/n), and KID against those images'
features; CLIP score with the named CLIP; the sampling cost from the cost model. Each of them with
the half-width of its 95 % interval over the cell's samples (``fid_ci95``, ``kid_ci95``:
``eval.bootstrap`` half-samples of the generated features, :mod:`frechet`; ``clip_score_ci95[...]``:
normal, :mod:`clip_score`). :func:`real_data_floor` measures the same numbers for held-out *real*
images: what a perfect generator scores at that n. Cells are independent and idempotent
(``results.Table``): a rerun skips every cell whose row was made with the same settings
(:func:`cell_settings`: samples, seed, sampler settings, FID reference, CLIP, the checkpoint and the
run's config, digested into the row's ``eval_key``) and evaluates again, with a warning, a cell
whose row was made otherwise (or before rows recorded their settings). ``shard=(i, n)`` lets n
processes split the cells: process i takes cells i, i + n, i + 2n, ... of the plan (interleaved, so
every process gets about as many cells of each step count, the cost of a cell); the default is this
process of a multi-process JAX job (``jax.process_index()``, ``jax.process_count()``: the workers of
a TPU slice), and (0, 1) for a single process. Rows are files of their own, written atomically
(``results.Table``), so processes never write the same file.

The UNet is sharded over the process's local devices (``parallel.model_mesh``,
``generate.place_unet``): an EMA larger than one device is evaluated as it was trained, each
device holding 1/n of every split weight; ``eval.param_dtype="bfloat16"`` halves it again (a
measuring setting: it enters the cell key when not the default float32).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import itertools
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from ldm_scaling import config as cfglib
from ldm_scaling import data
from ldm_scaling import files
from ldm_scaling import models
from ldm_scaling.diffusion import generate
from ldm_scaling.diffusion import samplers
from ldm_scaling.errors import ConfigError, UserError
from ldm_scaling.eval import clip_score, fid, fid_weights, frechet, parallel, results
from ldm_scaling.models import clip as clip_model
from ldm_scaling.models import cost as costlib
from ldm_scaling.models import tokenizer
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.train import checkpoint
from ldm_scaling.train.metrics import format_duration

OFFLINE_CLIP_LABEL = "local-clip-small"


@dataclasses.dataclass(frozen=True)
class Cell:
  sampler: str
  steps: int
  cfg_scale: float


def cells(eval_cfg) -> list[Cell]:
  return [Cell(s, int(n), float(w)) for s, n, w in
          itertools.product(eval_cfg.samplers, eval_cfg.steps, eval_cfg.cfg_scales)]


def checkpoint_steps(workdir: str, which: str) -> list[int]:
  """``latest`` | ``all`` | comma-separated steps -> the run's checkpoint steps to evaluate."""
  directory = checkpoint.checkpoints_dir(workdir)
  if not checkpoint.is_dir(directory):
    raise checkpoint.RunNotFoundError(f"no checkpoints in {workdir!r}; train it first")
  available = checkpoint.available_steps(workdir)
  if not available:
    raise checkpoint.RunNotFoundError(f"no complete checkpoint in {directory!r}")
  if which == "latest":
    return available[-1:]
  if which == "all":
    return available
  wanted = [int(s) for s in which.split(",") if s.strip()]
  missing = sorted(set(wanted) - set(available))
  if missing:
    raise checkpoint.RunNotFoundError(f"{workdir!r} has no checkpoints for steps {missing}; it "
                                      f"has {available}")
  return wanted


def validate(config) -> None:
  e = config.eval
  if e.num_samples < 2:
    raise ConfigError(f"eval.num_samples must be >= 2 (FID needs a covariance), got "
                      f"{e.num_samples}")
  if e.fid_reference_n < 2:
    raise ConfigError(f"eval.fid_reference_n must be >= 2, got {e.fid_reference_n}")
  if e.batch_size < 1:
    raise ConfigError(f"eval.batch_size must be >= 1, got {e.batch_size}")
  if not (e.checkpoints in ("latest", "all") or
          all(s.strip().isdigit() for s in e.checkpoints.split(","))):
    raise ConfigError(f"eval.checkpoints must be 'latest', 'all' or steps like '1000,2000', got "
                      f"{e.checkpoints!r}")
  for name in ("samplers", "steps", "cfg_scales"):
    if not len(e[name]):
      raise ConfigError(f"eval.{name} is empty; the grid needs at least one value")
  parallel.param_dtype(e.param_dtype)
  if e.bootstrap < 0:
    raise ConfigError(f"eval.bootstrap must be >= 0 (0 = no intervals), got {e.bootstrap}")


def default_shard() -> tuple[int, int]:
  """(this process, number of processes) of the JAX job: each worker of a slice its own cells."""
  return jax.process_index(), jax.process_count()


def shard_plan(plan: Sequence, index: int, count: int) -> list:
  """Process ``index`` of ``count``'s share of the plan: every ``count``-th item from ``index``.
  The shares are disjoint, cover the plan and differ in size by at most one."""
  if not 0 <= index < count:
    raise ConfigError(f"shard {index}/{count}: need 0 <= index < count")
  return [p for i, p in enumerate(plan) if i % count == index]


class _Memo:
  """Prompt embeddings computed once per run (every cell uses the same prompts)."""

  def __init__(self, encode: Callable[[Sequence[str]], np.ndarray]):
    self._encode = encode
    self._cache: dict[tuple[str, ...], np.ndarray] = {}

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    key = tuple(prompts)
    if key not in self._cache:
      self._cache[key] = np.asarray(self._encode(list(prompts)))
    return self._cache[key]


def eval_prompts_and_images(config, n: int) -> tuple[list[str], Callable[[], Iterable]]:
  """The first ``n`` captions of the eval split, and a generator factory of its uint8 images."""

  def batches(count: int, batch: int = 256):
    it = data.make_pipeline(config, config.data.eval_split, batch_size=min(batch, count),
                            num_epochs=1, shuffle=False, drop_remainder=False, tokenizer=None,
                            process_index=0, process_count=1)
    seen = 0
    for b in it:
      yield b
      seen += len(b["captions"])
      if seen >= count:
        return

  prompts = []
  for b in batches(n):
    prompts += [str(c) for c in b["captions"]]
  if len(prompts) < n:
    raise ConfigError(f"eval.num_samples={n} but {config.data.eval_split!r} has only "
                      f"{len(prompts)} captions; lower eval.num_samples")

  def images(count: int):
    def gen():
      for b in batches(count):
        yield np.round((np.asarray(b["images"]) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return gen
  return prompts[:n], images


def clip_scorer(config, eval_cfg):
  """The CLIP named by ``eval.clip_model``; "" = the run's offline small CLIP, labelled so."""
  if eval_cfg.clip_model:
    return clip_score.CLIPScorer.from_pretrained(eval_cfg.clip_model)
  directory = config.clip.dir or clip_model.default_dir(config)
  clip_model.check_trained(config, directory)
  return clip_score.CLIPScorer.from_pretrained(directory, label=OFFLINE_CLIP_LABEL)


def _save_png(path, image: np.ndarray) -> None:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())


def feature_batch(num_samples: int, largest: int = 64) -> int:
  """The FID feature batch for cells of ``num_samples`` images: the last batch is padded to a
  full one, so a batch that divides the count wastes nothing (16 -> 16, 128 -> 64, 100 -> 50)."""
  if num_samples <= largest:
    return num_samples
  for d in range(largest, largest // 2 - 1, -1):
    if num_samples % d == 0:
      return d
  return largest


def tile(images: np.ndarray, cols: int = 4) -> np.ndarray:
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full((rows * h, cols * w, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, k = divmod(i, cols)
    out[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
  return out


def evaluate(workdirs: Sequence[str], table_dir: str, *, eval_config=None,
             shard: tuple[int, int] | None = None, log: Callable[[str], None] = print,
             extractor=None, mesh=None) -> results.Table:
  """Evaluates every cell of every run (see the module docstring); returns the table.

  ``eval_config``: a config whose ``eval`` section replaces each run's own (same grid for all
  runs); ``None`` uses each run's. ``shard``: (i, n), default :func:`default_shard`.
  ``extractor``: a ``fid.FeatureExtractor`` to reuse. ``mesh``: the devices the UNet is sharded
  over (default ``parallel.model_mesh()``: every local device)."""
  index, count = shard if shard is not None else default_shard()
  shard_plan([], index, count)
  table = results.Table(table_dir)
  plan = []
  for workdir in dict.fromkeys(workdirs):
    config = checkpoint.load_run_config(workdir)
    e = (eval_config or config).eval
    validate(eval_config or config)
    for step in checkpoint_steps(workdir, e.checkpoints):
      for cell in cells(e):
        plan.append((workdir, config, e, step, cell))
  key_of = _key_function()
  collective = jax.process_count() > 1
  if collective:
    # One JAX job (the workers of a slice): checkpoint reads end in a barrier of all processes
    # (orbax), so every process reads the same checkpoints in the same order. The processes agree
    # on the plan and on process 0's view of which cells are pending, then split those.
    keys = {_item_id(p): key_of(p) for p in plan}
    todo, notes = pending(table, table_dir, plan, lambda p: keys[_item_id(p)])
    todo = _agreed(plan, todo)
    reads = _blocks(todo)
    log(f"eval grid: {len(plan)} cells, {len(plan) - len(todo)} already in {table_dir}, "
        f"{len(todo)} to do; process {index} of {count} takes "
        f"{len(shard_plan(todo, index, count))}")
    todo = shard_plan(todo, index, count)
  else:
    mine = shard_plan(plan, index, count)
    keys = {_item_id(p): key_of(p) for p in mine}
    todo, notes = pending(table, table_dir, mine, lambda p: keys[_item_id(p)])
    reads = _blocks(todo)
    log(f"eval grid: {len(plan)} cells, {len(mine)} in shard {index}/{count}, "
        f"{len(mine) - len(todo)} already in {table_dir}, {len(todo)} to do")
  for note in notes:
    log(note)
  if not reads:
    table.write_tables()
    return table

  if todo:
    extractor = extractor or fid.FeatureExtractor(
        batch_size=feature_batch(max(p[2].num_samples for p in todo)), log=log)
  small = sorted({p[2].num_samples for p in todo if p[2].num_samples <= 2048})
  if small:
    log(f"note: {small} samples per cell <= 2048 feature dimensions: the generated covariance is "
        f"singular, so FIDs are biased upward and comparable only between cells with the same "
        f"number of samples (the paper uses 30k)")
  done_s, started, done = 0.0, time.perf_counter(), 0
  loaded: dict = {}
  shared: dict = dict(mesh=mesh if mesh is not None else parallel.model_mesh())
  mine = _groups(todo)
  for group in (g for block in reads for g in _visit(block, mine)):
    workdir, config, e, step, first = group[0]
    t0 = time.perf_counter()
    if loaded.get("key") != (workdir, step, e.param_dtype):
      loaded = {}  # the previous weights leave the devices before the next arrive
      loaded = _load(workdir, step, config, e, extractor, log, shared)
    # The CFG scales of one (sampler, steps) are sampled together: one compiled program, and
    # every prompt keeps its own noise whatever the scale (generate.generate).
    scales = [cell.cfg_scale for *_, cell in group]
    n = len(loaded["prompts"])
    out = generate.generate(
        sampling_config(config, e), loaded["prompts"], apply_fn=loaded["apply_fn"],
        params=loaded["params"], sampler=first.sampler, steps=first.steps, cfg_scales=scales,
        seed=e.seed, batch_size=min(e.batch_size, n * len(scales)),
        latent_size=loaded["latent_size"], conditioning=loaded["conditioning"],
        decoding=loaded["decoding"], norm_cost=loaded["norm_cost"], log=lambda _: None)
    for j, item in enumerate(group):
      cell = item[-1]
      images = out.images[j::len(scales)]
      key, settings = keys[_item_id(item)]
      ids = run_ids(workdir, table_dir)
      row = _key(ids[0], config, step, cell)
      feats = extractor(images)
      row.update(
          width=config.model.width, params=loaded["params_count"], norm_cost=loaded["norm_cost"],
          sampling_cost=float(out.cost[j]), train_compute=loaded["train_compute"],
          teacher_train_compute=loaded["teacher_train_compute"],
          fid=loaded["reference"].distance(feats), n=len(images), seed=e.seed,
          prompts=f"{config.data.name}/{config.data.eval_split}[:{len(images)}]",
          fid_reference=loaded["reference_id"], config_hash=cfglib.config_hash(config),
          wall_s=round((time.perf_counter() - t0) / (j + 1), 3), time=time.time())
      row[results.KEY_COLUMN], row[results.SETTINGS_COLUMN] = key, _settings_json(settings)
      row.update(loaded["reference"].uncertainty(feats, e.bootstrap))
      clip = loaded["scorer"].score(images, loaded["prompts"])
      row.update(clip.columns(), **clip.uncertainty_columns())
      _save_png(table.root / "grids" / f"{results.cell_id(row)}.png",
                tile(images[:e.grid_images]))
      table.add(row)
      for old in ids[1:]:  # a stale row under the absolute path older tables used
        table.remove(_key(old, config, step, cell))
      if count == 1:  # one process: keep the CSV current; shards regenerate it when they finish
        table.write_tables()
      done += 1
      eta = (done_s + time.perf_counter() - t0) / done * (len(todo) - done)
      clip_col = next(c for c in row if c.startswith("clip_score["))
      log(f"[{done}/{len(todo)}] {os.path.basename(workdir.rstrip('/'))} step {step} "
          f"{cell.sampler} {cell.steps} steps cfg {cell.cfg_scale:g}: FID {row['fid']:.2f} "
          f"± {row['fid_ci95']:.2f}, KID {row['kid']:.4f}, {clip_col} {row[clip_col]:.2f}, "
          f"cost {row['sampling_cost']:.3f} "
          f"({time.perf_counter() - t0:.1f} s, ETA {format_duration(eta)})")
    done_s += time.perf_counter() - t0
  table.write_tables()
  log(f"eval grid: {len(todo)} cells in {format_duration(time.perf_counter() - started)}")
  return table


def _blocks(items) -> list[tuple]:
  """The checkpoints ``(workdir, step)`` of plan items, in plan order (each once)."""
  return list(dict.fromkeys((workdir, step) for workdir, _, _, step, _ in items))


def _visit(block: tuple, groups: list[list]) -> list[list]:
  """This process's groups of one checkpoint; with none, it only reads the checkpoint (a
  collective read: every process of a JAX job takes part in every read, :func:`evaluate`)."""
  mine = [g for g in groups if (g[0][0], g[0][3]) == block]
  if not mine:
    generate.load_unet(*block)
  return mine


def _agreed(plan: Sequence[tuple], todo: Sequence[tuple]) -> list[tuple]:
  """Process 0's pending items, on every process of a JAX job (their reads of the table happen
  at different times); raises on every process if their plans differ (checkpoints listed while
  training still saves: name the steps, or evaluate when it has finished)."""
  ids = repr([(w, s, dataclasses.astuple(c)) for w, _, _, s, c in plan]).encode()
  digest = np.frombuffer(hashlib.sha256(ids).digest()[:8], np.uint32)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  if not np.all(digests == digests[0]):
    raise ConfigError("the eval processes see different checkpoints (training still saving?); "
                      "pass eval.checkpoints as steps, or evaluate when training has finished")
  pending_ids = {id(item) for item in todo}
  mask = np.array([id(item) in pending_ids for item in plan], np.int32)
  mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
  return [item for item, m in zip(plan, mask) if m]


def _groups(todo) -> list[list]:
  """Consecutive cells of one (run, checkpoint, sampler, steps): sampled together."""
  groups: list[tuple[tuple, list]] = []
  for item in todo:
    workdir, _, _, step, cell = item
    key = (workdir, step, cell.sampler, cell.steps)
    if groups and groups[-1][0] == key:
      groups[-1][1].append(item)
    else:
      groups.append((key, [item]))
  return [items for _, items in groups]


def run_id(workdir: str, table_dir: str | None = None) -> str:
  """The ``run`` column: a remote (``gs://``) workdir's URL; a local workdir's path relative to a
  local results directory (``../runs/w16``), so a study moved or copied as a whole keeps its cells
  (and hosts that mount it elsewhere agree); else the absolute path."""
  if "://" in workdir:
    return workdir.rstrip("/")
  path = os.path.abspath(workdir)
  if table_dir is None or "://" in table_dir:
    return path
  return os.path.relpath(path, os.path.abspath(table_dir))


def run_ids(workdir: str, table_dir: str) -> list[str]:
  """The ``run`` values under which a finished cell may be stored: :func:`run_id`, then the
  absolute path that tables written before relative ids used."""
  return list(dict.fromkeys([run_id(workdir, table_dir), run_id(workdir)]))


def _key(run: str, config, step, cell) -> dict:
  return dict(run=run, checkpoint_step=int(step),
              objective=config.objective.name, sampler=cell.sampler, steps=cell.steps,
              cfg_scale=cell.cfg_scale,
              scale_schedule=samplers.scale_schedule(cell.sampler,
                                                     samplers.options_from_config(config)))


# -------------------------------------------------------------------------------------------------
# Cell keys: a row counts as done only if it was made with the settings asked for now.

KEY_VERSION = 1  # bump when the evaluation itself changes what a cell measures

# Sections of a run's config that do not change what its checkpoint samples: the eval section is
# replaced by the evaluated one, and training acts through the checkpoint (identified itself).
_NOT_SAMPLING_SECTIONS = ("eval", "train", "study", "mesh")
# eval fields that choose the cells or how fast they run, not what a cell measures (so the
# study's training-curve pass finds the cells its grid pass evaluated).
# bootstrap: how many resamples estimate a row's intervals, not what fid/clip/kid measure (rows
# made before intervals existed keep their key; they read back with NaN intervals).
_NOT_MEASURING_FIELDS = ("samplers", "steps", "cfg_scales", "checkpoints", "batch_size",
                         "stats_dir", "grid_images", "bootstrap")


def cell_settings(config, e, *, checkpoint_id: Mapping[str, Any],
                  reference: Mapping[str, Any], components: Mapping[str, Any]) -> dict:
  """Everything besides a cell's coordinates (``results.CELL_KEYS``) that its row's values
  depend on: the measuring ``eval`` fields (num_samples, seed, ddim_eta, fid_reference_n,
  clip_model, ...), the sampler options they give, a hash of the run's sampling-relevant config,
  and the identities of the checkpoint (:func:`checkpoint_identity`), the FID reference
  (:func:`reference_identity`) and the trained components (:func:`components_identity`).

  Paths where things live (stats_dir, the workdir itself) are left out: a study moved as a whole
  keeps its rows."""
  measuring = {k: v for k, v in e.to_dict().items() if k not in _NOT_MEASURING_FIELDS}
  if measuring.get("param_dtype") == "float32":  # the default: rows made before it keep their key
    del measuring["param_dtype"]
  options = samplers.options_from_config(sampling_config(config, e))
  return _normal(dict(version=KEY_VERSION, eval=measuring, sampler=_sampler_options(options),
                      run_config=_sampling_config_hash(config), checkpoint=dict(checkpoint_id),
                      reference=dict(reference), components=dict(components)))


def cell_key(settings: Mapping[str, Any]) -> str:
  """The ``eval_key`` of rows made with ``settings`` (:func:`cell_settings`)."""
  return hashlib.sha256(_settings_json(settings).encode()).hexdigest()[:16]


def cell_state(table: results.Table, runs: Sequence[str], config, step: int, cell: Cell,
               key: str) -> tuple[str, dict | None]:
  """Whether a cell needs evaluating: ``("done", row)`` if a row under one of ``runs`` (the
  cell's run ids, :func:`run_ids`) was made with ``key``; ``("stale", row)`` if made with other
  settings; ``("unkeyed", row)`` if written before rows recorded theirs; ``("missing", None)``
  if there is no readable row (an unreadable one is warned about by name)."""
  found = None
  for run in runs:
    row = table.row(_key(run, config, step, cell))
    if row is None:
      continue
    if row.get(results.KEY_COLUMN) == key:
      return "done", row
    found = found or row
  if found is None:
    return "missing", None
  return ("stale" if results.KEY_COLUMN in found else "unkeyed"), found


def pending(table: results.Table, table_dir: str, items: Sequence[tuple],
            key_of: Callable[[tuple], tuple[str, dict]]) -> tuple[list[tuple], list[str]]:
  """The plan items ``(workdir, config, e, step, cell)`` whose cells need evaluating, and one
  warning line per kind of row that is evaluated again (made with other settings; made before
  rows recorded their settings).

  A row made at another ``eval.seed`` is not evaluated again: a table holds one row per cell, so
  the new seed's row would replace that measurement. :class:`OtherSeedError` says so before
  anything is evaluated (each seed goes to a table of its own; ``analysis.seeds`` reads them)."""
  todo, stale, unkeyed, other_seed = [], [], 0, []
  for item in items:
    workdir, config, _, step, cell = item
    key, settings = key_of(item)
    state, row = cell_state(table, run_ids(workdir, table_dir), config, step, cell, key)
    if state == "done":
      continue
    todo.append(item)
    if state == "stale":
      stale.append((row, settings))
      seed = _recorded_seed(row)
      if seed is not None and seed != settings["eval"].get("seed"):
        other_seed.append((row, settings["eval"].get("seed")))
    unkeyed += state == "unkeyed"
  if other_seed:
    row, seed = other_seed[0]
    raise OtherSeedError(
        f"{len(other_seed)} cell(s) in {table_dir} hold rows made at eval.seed "
        f"{_recorded_seed(row)} (e.g. {row['run']} step {row['checkpoint_step']} "
        f"{row['sampler']} {row['steps']} steps cfg {row['cfg_scale']:g}), and this evaluation asks for seed {seed}: a table keeps one "
        f"row per cell, so those measurements would be replaced. Evaluate each seed into a table "
        f"of its own (e.g. --results {str(table_dir).rstrip('/')}/seed{seed}) and read them "
        f"together with `python -m ldm_scaling.analysis.seeds TABLE...`; or delete the rows "
        f"under {table_dir}/rows to replace them. Nothing was evaluated or changed.")
  notes = []
  if stale:
    row, settings = stale[0]
    notes.append(
        f"warning: {len(stale)} row(s) in {table_dir} were evaluated with other settings than "
        f"these (e.g. {row['run']} step {row['checkpoint_step']} {row['sampler']} "
        f"{row['steps']} steps cfg {row['cfg_scale']:g}: "
        f"{_changes(row.get(results.SETTINGS_COLUMN), settings)}); evaluating them again")
  if unkeyed:
    notes.append(
        f"warning: {unkeyed} row(s) in {table_dir} were written before rows recorded the settings "
        f"they were made with ({results.KEY_COLUMN!r}), so they may be stale; evaluating them "
        f"again")
  return todo, notes


class OtherSeedError(UserError):
  """A table's rows were made at another ``eval.seed`` than the one asked for (see
  :func:`pending`)."""


def _recorded_seed(row: Mapping[str, Any]) -> Any:
  """The ``eval.seed`` a row's recorded settings name (None when not recorded)."""
  try:
    return json.loads(row.get(results.SETTINGS_COLUMN))["eval"]["seed"]
  except (TypeError, ValueError, KeyError):
    return None


def _key_function() -> Callable[[tuple], tuple[str, dict]]:
  """Plan item -> (eval_key, settings), reading each identity once (small files, the prepared
  dataset's info); the settings of a checkpoint are the same for all its cells."""
  memo: dict = {}

  def settings_of(workdir, config, e, step):
    components_key = repr((tuple(config[s].to_dict() for s in ("text", "clip", "vae", "data")),
                           e.clip_model))
    settings = cell_settings(
        config, e,
        checkpoint_id=checkpoint_identity(workdir, step),
        reference=_memo(memo, ("reference", repr(config.data.to_dict()), e.fid_reference_n),
                        lambda: reference_identity(config, e)),
        components=_memo(memo, ("components", components_key),
                         lambda: components_identity(config, e)))
    return cell_key(settings), settings

  def key_of(item):
    workdir, config, e, step, _ = item
    return _memo(memo, ("settings", workdir, id(e), step),
                 lambda: settings_of(workdir, config, e, step))
  return key_of


def _item_id(item: tuple) -> tuple:
  workdir, _, e, step, cell = item
  return workdir, id(e), step, cell


def sampling_config(config, e):
  """The run's config with the evaluated eval section: the sampler reads ``eval.ddim_eta`` from
  the config it samples with, so an ``eval_config``'s eta would otherwise be ignored."""
  if e.to_dict() == config.eval.to_dict():
    return config
  out = copy.deepcopy(config)
  with out.unlocked():
    out.eval.update(e.to_dict())
  return out


def checkpoint_identity(workdir: str, step: int) -> dict:
  """What tells a checkpoint from another one saved at the same step of the same workdir (a run
  trained again): orbax's commit time and the config hash the trainer saved with it. Missing
  records give None (the run's config hash is in the key anyway)."""
  directory = epath.Path(checkpoint.checkpoints_dir(workdir)) / str(int(step))
  commit = _read_json(directory / "_CHECKPOINT_METADATA")
  meta = _read_json(directory / "meta" / "metadata")
  return dict(step=int(step),
              committed=commit.get("commit_timestamp_nsecs") or commit.get("init_timestamp_nsecs"),
              config_hash=meta.get("config_hash"))


def dataset_identity(config, split: str) -> dict:
  """What identifies the prepared images of ``split`` (not just ``data.name``): the tfds full
  name (builder, config -- for a folder dataset a digest of the manifest's path and content --,
  version), the split's example count and size; for other sources their description, length and
  metadata. Prepares embedded/folder data if needed, as evaluating does."""
  src = data.source(config, split)
  info = getattr(src.records, "dataset_info", None)
  if info is not None:
    split_info = info.splits[split]
    return dict(dataset=info.full_name, split=split, num_examples=int(split_info.num_examples),
                num_bytes=int(split_info.num_bytes))
  return _normal(dict(dataset=src.description, split=split, num_examples=len(src.records),
                      meta=getattr(src.records, "meta", None)))


def reference_identity(config, e) -> dict:
  """The FID reference statistics a cell is measured against: the dataset identity, resolution,
  size and the feature network."""
  return dict(dataset=dataset_identity(config, config.data.eval_split),
              resolution=int(config.data.resolution), n=int(e.fid_reference_n),
              feature_extractor=fid_weights.FEATURE_EXTRACTOR, preprocessing=fid.PREPROCESSING)


def components_identity(config, e) -> dict:
  """The CLIP that scores the cell, and digests of the metadata of the components trained here
  that the cell uses (the offline CLIP: text encoder or scorer; a trained VAE): a component trained
  again in the same directory records another training, so its cells are evaluated again."""
  out = dict(clip_score=e.clip_model or OFFLINE_CLIP_LABEL)
  if config.text.encoder == tokenizer.OFFLINE or not e.clip_model:
    out["offline_clip"] = _file_digest(epath.Path(clip_model.default_dir(config)) /
                                       clip_model.META)
  if config.vae.weights == vae_lib.TRAINED:
    out["trained_vae"] = _file_digest(epath.Path(vae_lib.default_dir(config)) / vae_lib.CONFIG)
  return out


# Keys added after rows existed: at their default they are left out of the keys, so older rows
# stay current (a non-default value is part of the key).
_ADDED_OPTIONS = {"swd_scales": (), "swd_sigmas": ()}
_ADDED_CONFIG = {("objective", "scales"): (), ("objective", "sigmas"): (),
                 ("objective", "swd"): None,  # None: the base config's value
                 ("model", "attn_kernel"): "xla"}


def _sampler_options(options) -> dict:
  return {k: v for k, v in dataclasses.asdict(options).items()
          if not (k in _ADDED_OPTIONS and tuple(v) == _ADDED_OPTIONS[k])}


def _sampling_config_hash(config) -> str:
  sections = {k: v for k, v in config.to_dict().items() if k not in _NOT_SAMPLING_SECTIONS}
  base = _normal(cfglib.base_config().to_dict())
  for (section, key), default in _ADDED_CONFIG.items():
    default = _normal(base[section][key] if default is None else default)
    if section in sections and _normal(sections[section].get(key, default)) == default:
      sections[section] = {k: v for k, v in sections[section].items() if k != key}
  return hashlib.sha256(_settings_json(sections).encode()).hexdigest()[:12]


def _settings_json(settings: Mapping[str, Any]) -> str:
  return json.dumps(settings, sort_keys=True, default=list)


def _normal(value):
  """``value`` as it reads back from JSON (tuples -> lists): stored and fresh settings compare."""
  return json.loads(json.dumps(value, default=list))


def _read_json(path: epath.Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _file_digest(path: epath.Path) -> str | None:
  try:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
  except OSError:
    return None


def _changes(old_json: str | None, new: Mapping[str, Any], limit: int = 4) -> str:
  """``"eval.num_samples 8 -> 30000, ..."``: what differs between a row's settings and ``new``."""
  try:
    old = _flat(json.loads(old_json))
  except (TypeError, ValueError):
    return "its settings were not recorded"
  now = _flat(_normal(dict(new)))
  diffs = [f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(old) | set(now))
           if old.get(k) != now.get(k)]
  more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return ", ".join(diffs[:limit]) + more if diffs else "no difference in the recorded settings"


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _load(workdir, step, config, e, extractor, log, shared: dict) -> dict:
  """Everything a checkpoint's cells share. ``shared`` memoises across checkpoints and runs what
  does not depend on the weights: encoders, prompts and reference statistics (per data /
  conditioning / eval settings), the UNet apply function (per model). The cost model caches its
  own compiled measurements."""
  _, params = generate.load_unet(workdir, step=step)  # host memory, then sharded
  params = generate.place_unet(config, params, shared["mesh"], e.param_dtype)
  inputs = tuple(config[s].to_dict() for s in ("data", "text", "vae", "clip"))
  run = _memo(shared, repr(("inputs", inputs, e.to_dict())),
              lambda: _load_run(config, e, extractor, log))
  apply_fn = _memo(shared, repr(("model", config.model.to_dict())),
                   lambda: generate.unet_apply(models.build(config.model)))
  cost = costlib.model_cost(config.model, config.cost)
  devices = shared["mesh"].devices.size
  log(f"loaded {workdir} step {step}: width {config.model.width}, {cost.params / 1e6:.2f}M "
      f"params ({e.param_dtype}, {f'sharded over {devices} devices' if devices > 1 else '1 device'}"
      f"), normalised cost {cost.norm_cost:.4f}; {len(run['prompts'])} prompts; FID "
      f"reference {run['reference_id']}")
  return dict(run, key=(workdir, step, e.param_dtype), params=params, params_count=cost.params,
              norm_cost=cost.norm_cost, apply_fn=apply_fn,
              **_train_compute(config, step, cost.norm_cost, log))


def _train_compute(config, step: int, norm_cost: float, log) -> dict:
  """The checkpoint's training compute (normalised cost x steps). A distilled student's counts
  the teacher's and the target's (SwD: the fake-score network's) passes of every step; its
  teacher's own training is the separate ``teacher_train_compute``
  (``consistency.distillation_compute``, ``scalewise.distillation_compute``). When the
  teacher's workdir is gone, only the student's own passes are known: said, and NaN beside."""
  if config.objective.name not in ("consistency", "scale_wise"):
    return dict(train_compute=norm_cost * step, teacher_train_compute=float("nan"))
  from ldm_scaling.train import objectives  # pylint: disable=g-import-not-at-top
  module = (objectives.consistency if config.objective.name == "consistency"
            else objectives.scalewise)
  try:
    c = module.distillation_compute(config, step)
  except (UserError, OSError) as err:
    log(f"training compute of the student without its teacher's passes ({err})")
    return dict(train_compute=norm_cost * step, teacher_train_compute=float("nan"))
  return dict(train_compute=c["student"], teacher_train_compute=c["teacher_training"])


def _memo(cache: dict, key, make):
  if key not in cache:
    cache[key] = make()
  return cache[key]


def _load_run(config, e, extractor, log) -> dict:
  conditioning, decoding = generate.components(config, required=True, log=log)
  prompts, images = eval_prompts_and_images(config, e.num_samples)
  available = len(data.source(config, config.data.eval_split).records)
  if available < e.fid_reference_n:
    raise ConfigError(f"eval.fid_reference_n={e.fid_reference_n} but {config.data.eval_split!r} "
                      f"has only {available} images; lower eval.fid_reference_n")
  return dict(
      prompts=prompts,
      conditioning=generate.Conditioning(_Memo(conditioning.encode), conditioning.label),
      decoding=decoding, latent_size=data.latent_size(config),
      reference=frechet.Reference(_reference_stats(config, e, extractor, images)),
      reference_id=_reference_label(config, e), scorer=clip_scorer(config, e))


def _reference_stats(config, e, extractor, images) -> fid.FIDStats:
  """The cell's FID/KID reference: the first ``eval.fid_reference_n`` eval-split images (cached,
  with their features)."""
  return fid.reference_stats(images(e.fid_reference_n), dataset=config.data.name,
                             split=config.data.eval_split, resolution=config.data.resolution,
                             n=e.fid_reference_n, extractor=extractor,
                             directory=e.stats_dir or None,
                             identity=dataset_identity(config, config.data.eval_split),
                             with_features=True)


def _reference_label(config, e) -> str:
  return (f"{config.data.name}/{config.data.eval_split}@{config.data.resolution}px "
          f"n={e.fid_reference_n}")


# -------------------------------------------------------------------------------------------------
# The real-data floor: what a perfect model would score at the cells' n.

FLOOR_FILE = "real_floor.json"


def real_data_floor(config, table_dir: str, *, n: int, extractor=None,
                    log: Callable[[str], None] = print) -> dict:
  """FID and KID (with their 95 % half-widths, ``eval.bootstrap`` resamples) of ``n`` held-out
  *real* images against the cells' reference statistics: the noise floor of a cell of ``n``
  samples (a perfect generator scores this, not 0).

  The reference is the first ``eval.fid_reference_n`` images of ``data.eval_split``, as for every
  cell; the held-out images are the next ``n`` of that split (``[fid_reference_n,
  fid_reference_n + n)``: the same distribution and preprocessing, none of them in the
  reference). Cached in ``<table_dir>/real_floor.json`` under a digest of the reference identity
  (:func:`reference_identity`), ``n``, that slice and the resampling (``eval.bootstrap``,
  ``frechet.METHOD``), so it is computed once.
  Returns ``fid, fid_ci95, kid, kid_ci95, n, source, reference``."""
  e = config.eval
  validate(config)
  if n < 2:
    raise ConfigError(f"the real-data floor needs n >= 2 images, got {n}")
  start, split = int(e.fid_reference_n), config.data.eval_split
  source = f"{config.data.name}/{split}[{start}:{start + n}]"
  identity = _normal(dict(reference=reference_identity(config, e), n=int(n), source=source,
                          bootstrap=int(e.bootstrap), method=frechet.METHOD))
  key = hashlib.sha256(_settings_json(identity).encode()).hexdigest()[:16]
  path = epath.Path(table_dir) / FLOOR_FILE
  cache = _read_json(path)
  floors = cache.get("floors") if isinstance(cache.get("floors"), dict) else {}
  if isinstance(floors.get(key), dict):
    return dict(floors[key]["floor"])
  available = len(data.source(config, split).records)
  if available < start + n:
    raise ConfigError(f"the real-data floor needs {start + n} images of {split!r} "
                      f"(eval.fid_reference_n={start} for the reference + {n} held out), it has "
                      f"{available}; lower eval.fid_reference_n or n")
  t0 = time.perf_counter()
  extractor = extractor or fid.FeatureExtractor(batch_size=feature_batch(n), log=log)
  reference = frechet.Reference(_reference_stats(
      config, e, extractor, lambda count: _split_images(config, split, 0, count)))
  feats = extractor(_split_images(config, split, start, n)())
  if len(feats) != n:
    raise ConfigError(f"{split!r} yielded {len(feats)} held-out images, expected {n}")
  floor = dict(fid=reference.distance(feats), **reference.uncertainty(feats, e.bootstrap),
               n=int(n), source=source, reference=_reference_label(config, e))
  floors[key] = dict(identity=identity, floor=floor)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write_text(path, json.dumps(dict(floors=floors), indent=1, sort_keys=True) + "\n")
  log(f"real-data floor at n={n} ({source} vs {floor['reference']}): FID {floor['fid']:.2f} ± "
      f"{floor['fid_ci95']:.2f}, KID {floor['kid']:.4f} ± {floor['kid_ci95']:.4f} "
      f"({time.perf_counter() - t0:.1f} s)")
  return dict(floor)


def _split_images(config, split: str, start: int, count: int) -> Callable[[], Iterable]:
  """A generator factory of images ``[start, start + count)`` of ``split`` (uint8 batches, in
  the split's order, eval preprocessing: centre crop, no flip)."""

  def gen():
    it = data.make_pipeline(config, split, batch_size=min(256, start + count), num_epochs=1,
                            shuffle=False, drop_remainder=False, tokenizer=None,
                            process_index=0, process_count=1)
    seen = 0
    for b in it:
      images = np.asarray(b["images"])
      lo, hi = max(start - seen, 0), min(start + count - seen, len(images))
      seen += len(images)
      if hi > lo:
        yield np.round((images[lo:hi] + 1) * 127.5).clip(0, 255).astype(np.uint8)
      if seen >= start + count:
        return
  return gen
