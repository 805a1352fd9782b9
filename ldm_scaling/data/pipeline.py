"""Sources by name and the grain input pipeline.

``data.name`` picks a source from :data:`SOURCES` by its prefix (``shapes``, ``folder:<manifest>``,
``latents:<dir>``); any other name is a tfds dataset prepared in array_record format in
``data.data_dir`` (e.g. ``coco_captions``), adapted to (image, caption) by :data:`ADAPTERS`.

:func:`make_pipeline` builds one *global* stream of examples, the same on every host, and lets
each process read its own rows of it::

  source
    .shuffle(seed)                            # a new permutation every epoch
    .repeat(num_epochs)
    .random_map(decode + preprocess + tokenize, seed)   # RNG of global position g: reproducible
    .batch(b)                                 # b = batch_size = B / P rows per process
    [process_index::process_count]            # process p's k-th batch = global block k*P + p
    .to_iter_dataset(ReadOptions(threads))    # [+ mp_prefetch(worker processes)]

Every grain ``MapDataset`` step is lazy and random-access, so :func:`process_batches` (the last
two lines before the iterator) costs nothing: process ``p`` of ``P`` decodes only its rows, and its
batch ``s`` holds the global positions ``[s*B + p*b, s*B + (p+1)*b)`` where ``B = b*P`` is the
global batch. The global batch of step ``s`` -- the processes' batches concatenated in process
order, which is how ``jax.make_array_from_process_local_data`` lays them out -- therefore holds
the same examples, augmented the same way, in the same row order for any number of processes:
example ``g``'s shuffle slot, crop, flip, caption choice and caption dropout depend on ``(seed,
g)`` only.

So the position in the stream is a function of the training step alone: a run resumed at step
``s`` sets the iterator to batch ``s`` (``train.checkpoint.set_data_position``: grain's
``set_next_index``, or the equivalent state of ``mp_prefetch``'s workers; no data is read to get
there) on any number of hosts, instead of restoring a per-process iterator state.
The state also still round-trips (``get_state`` / ``set_state``, ``{"next_index": s}``) and the
trainer keeps saving it with each checkpoint for inspection; see ``train/checkpoint.py``.
Splits read in order (no shuffle: evaluation, reference statistics) are the same stream read from
the start; with one process, as all of those callers use, batch ``k`` is simply examples
``[k*b, (k+1)*b)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ldm_scaling.data import builders
from ldm_scaling.data import latents
from ldm_scaling.data import preprocess
from ldm_scaling.errors import ConfigError, DataError  # DataError re-exported
from ldm_scaling.models import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Source:
  """A random-access sequence of records and how to read (image, caption) from one.

  ``to_example(record, rng) -> (uint8 (H, W, C) image, caption str)``; ``rng`` serves sources
  with several captions per image (one is drawn per visit)."""
  records: Sequence[Any]
  to_example: Callable[[Any, np.random.Generator], tuple[np.ndarray, str]]
  description: str
  kind: str = "images"   # "images" | "latents"


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def _image_caption(record, rng) -> tuple[np.ndarray, str]:
  del rng
  return record["image"], _text(record["caption"])


def data_dir(config: ml_collections.ConfigDict) -> str | None:
  return os.path.expanduser(config.data.data_dir) if config.data.data_dir else None


def _as_source(builder, split: str, prepare: bool) -> Any:
  if not builder.is_prepared():
    if not prepare:
      raise DataError(f"dataset {builder.info.full_name} is not prepared in "
                      f"{builder.data_dir_root}; run `ldm-scaling prepare-data --config ...`")
    builder.download_and_prepare(file_format="array_record")
  if split not in builder.info.splits:
    raise DataError(f"dataset {builder.info.full_name} has splits {sorted(builder.info.splits)}, "
                    f"not {split!r}; set data.train_split / data.eval_split")
  return builder.as_data_source(split=split)


def shapes_builder(config: ml_collections.ConfigDict):
  res = _shapes_resolution(config.data.resolution)
  cfg = builders.shapes_config(res, config.data.shapes_sizes)
  registered = {c.name for c in builders.CaptionedShapes.BUILDER_CONFIGS}
  return builders.CaptionedShapes(config=cfg.name if cfg.name in registered else cfg,
                                  data_dir=data_dir(config))


def _shapes_resolution(resolution: int) -> int:
  for r in builders.SHAPES_RESOLUTIONS:
    if r >= resolution:
      return r
  raise ConfigError(f"data.resolution={resolution} is above the embedded dataset's largest native "
                    f"resolution {max(builders.SHAPES_RESOLUTIONS)}; use <= "
                    f"{max(builders.SHAPES_RESOLUTIONS)} or another dataset")


def folder_builder(config: ml_collections.ConfigDict, manifest: str | None = None):
  manifest = manifest or config.data.name.split(":", 1)[1]
  d = config.data
  return builders.CaptionedFolder(
      config=builders.folder_config(manifest, d.bad_examples, d.min_image_size,
                                    d.prepare_workers),
      data_dir=data_dir(config))


def _shapes_source(config, split, prepare=True) -> Source:
  builder = shapes_builder(config)
  return Source(_as_source(builder, split, prepare), _image_caption,
                f"{builder.info.full_name}[{split}]")


def _folder_source(config, split, prepare=True) -> Source:
  builder = folder_builder(config)
  return Source(_as_source(builder, split, prepare), _image_caption,
                f"{builder.info.full_name}[{split}] ({builder.builder_config.manifest})")


def _latent_source(config, split, prepare=True) -> Source:
  del prepare
  directory = config.data.name.split(":", 1)[1]
  records = latents.latent_cache_source(directory, split)
  return Source(records, latents.latent_record, f"latents {directory}[{split}]", kind="latents")


def _coco(record, rng) -> tuple[np.ndarray, str]:
  texts = record["captions"]["text"]
  if len(texts) == 0:  # pylint: disable=g-explicit-length-test
    return record["image"], ""
  return record["image"], _text(texts[int(rng.integers(len(texts)))])


def _generic(record, rng) -> tuple[np.ndarray, str]:
  del rng
  for key in ("caption", "text", "captions"):
    if key in record:
      value = record[key]
      if isinstance(value, dict):
        value = value.get("text", [""])
      if isinstance(value, (list, np.ndarray)):
        value = value[0] if len(value) else ""
      return record["image"], _text(value)
  raise DataError(f"cannot find a caption in records with keys {sorted(record)}; add an adapter "
                  f"for this dataset to ldm_scaling.data.pipeline.ADAPTERS")


# tfds name (before '/') -> record -> (image, caption). COCO has 5 captions per image: one is drawn
# per visit with the example's RNG.
ADAPTERS = {"coco_captions": _coco}


def _tfds_source(config, split, prepare=True) -> Source:
  del prepare  # public datasets are never downloaded implicitly
  name = config.data.name
  try:
    builder = tfds.builder(name, data_dir=data_dir(config))
  except Exception as e:  # tfds raises several types for unknown names  # pylint: disable=broad-except
    raise DataError(f"unknown dataset {name!r}: {e}; data.name is 'shapes', 'folder:<manifest>', "
                    f"'latents:<dir>' or a tfds name such as 'coco_captions'") from None
  if not builder.is_prepared():
    raise DataError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare it once in "
        f"array_record format (on a machine with the raw data: `tfds build {name} "
        f"--file_format=array_record --data_dir=DIR`, or copy a prepared directory) and set "
        f"data.data_dir=DIR")
  if split not in builder.info.splits:
    raise DataError(f"tfds dataset {name!r} has splits {sorted(builder.info.splits)}, not "
                    f"{split!r}; set data.train_split / data.eval_split")
  try:
    records = builder.as_data_source(split=split)
  except (NotImplementedError, ValueError) as e:
    raise DataError(f"tfds dataset {name!r} in {builder.data_dir} cannot be read randomly "
                    f"({e}); re-prepare it with --file_format=array_record") from None
  adapter = ADAPTERS.get(name.split("/")[0].split(":")[0], _generic)
  return Source(records, adapter, f"{builder.info.full_name}[{split}]")


# data.name prefix (before ':') -> (config, split, prepare) -> Source. Anything else: a tfds name.
SOURCES = {"shapes": _shapes_source, "folder": _folder_source, "latents": _latent_source}


def source(config: ml_collections.ConfigDict, split: str, prepare: bool = True) -> Source:
  """The records of ``config.data.name`` for ``split``; embedded/folder data is prepared on first
  use (``prepare=True``), public tfds datasets never are."""
  prefix = config.data.name.split(":", 1)[0]
  return SOURCES.get(prefix, _tfds_source)(config, split, prepare)


# -------------------------------------------------------------------------------------------------


def options(config: ml_collections.ConfigDict, train: bool,
            resolution: int | None = None) -> preprocess.Options:
  """Preprocessing of a split: augmentation and caption dropout only for training."""
  d = config.data
  return preprocess.Options(
      resolution=resolution or d.resolution,
      crop=d.crop if train else "center",
      flip=d.flip if train else "none",
      caption_dropout=d.caption_dropout if train else 0.0)


class _Transform:
  """Picklable per-example transform (worker processes receive a copy)."""

  def __init__(self, src: Source, opts: preprocess.Options, tokenize):
    self.to_example = src.to_example
    self.kind = src.kind
    self.opts = opts
    self.tokenize = tokenize

  def __call__(self, record, rng: np.random.Generator) -> dict[str, Any]:
    if self.kind == "latents":
      out = self.to_example(record, rng, self.opts)
      caption = out["captions"]
    else:
      image, caption = self.to_example(record, rng)
      image, caption = preprocess.process(image, caption, self.opts, rng)
      out = {"images": image, "captions": caption}
    if self.tokenize is not None:
      out["tokens"] = self.tokenize([caption])[0]
    return out


def make_dataset(config: ml_collections.ConfigDict, split: str | None, batch_size: int,
                 seed: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, *, num_epochs: int | None = None,
                 shuffle: bool | None = None, drop_remainder: bool = True,
                 tokenizer: Any = "auto", resolution: int | None = None) -> grain.MapDataset:
  """The batched ``grain.MapDataset`` of :func:`make_pipeline` (before the iterator is made)."""
  split = split or config.data.train_split
  train = split == config.data.train_split
  shuffle = train if shuffle is None else shuffle
  seed = config.train.seed if seed is None else seed
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  src = source(config, split)
  if isinstance(tokenizer, str) and tokenizer == "auto":
    tokenizer = tokenizer_lib.load_tokenizer(config.text)
  tokenize = (tokenizer_lib.Tokenize(tokenizer, config.text.max_length)
              if tokenizer is not None else None)
  n = len(src.records)
  if n < process_count:
    raise DataError(f"{src.description} has {n} examples, fewer than {process_count} processes")
  if n < batch_size * process_count and drop_remainder:
    raise DataError(f"{src.description}: {n} examples, fewer than one global batch of "
                    f"{batch_size * process_count} ({batch_size} per process x {process_count} "
                    f"processes); lower the batch size")
  ds = grain.MapDataset.source(src.records)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  opts = options(config, train, resolution)
  ds = ds.random_map(_Transform(src, opts, tokenize), seed=seed)
  return process_batches(ds, batch_size, process_index, process_count,
                         drop_remainder=drop_remainder)


def process_batches(ds: grain.MapDataset, batch_size: int, process_index: int,
                    process_count: int, *, drop_remainder: bool = True) -> grain.MapDataset:
  """Process ``process_index``'s batches of the global stream ``ds``: its batch ``k`` holds the
  global positions ``[k*B + p*b, k*B + (p+1)*b)`` (``b = batch_size``, ``B = b * process_count``,
  ``p = process_index``), so the processes' ``k``-th batches, concatenated in process order, are
  global batch ``k`` whatever the number of processes. Only ``p``'s rows are ever read.

  ``drop_remainder``: every process has the same number of batches (the last partial global batch
  is dropped). Otherwise the final global batch is split in order: process ``p`` gets what falls
  in its block (possibly a short batch, or none)."""
  if process_count == 1:
    return ds.batch(batch_size, drop_remainder=drop_remainder)
  if drop_remainder:  # whole global batches only (a no-op for an infinite stream)
    ds = ds[:len(ds) // (batch_size * process_count) * batch_size * process_count]
  return ds.batch(batch_size, drop_remainder=drop_remainder)[process_index::process_count]


def make_pipeline(config: ml_collections.ConfigDict, split: str | None, batch_size: int,
                  seed: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, *, num_epochs: int | None = None,
                  shuffle: bool | None = None, drop_remainder: bool = True,
                  tokenizer: Any = "auto", resolution: int | None = None,
                  workers: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of per-process batches.

  Each batch is a dict of numpy arrays: ``images`` (B, r, r, 3) float32 in [-1, 1] (or ``latents``
  (B, h, w, c) float32, already multiplied by the VAE scaling factor, for ``latents:<dir>``
  sources), ``captions`` (B,) str (after flip / caption dropout: ``""`` is the unconditional
  caption), ``tokens`` (B, text.max_length) int32 (unless ``tokenizer=None``).

  Args:
    config: the experiment config (sections ``data``, ``text``; ``train.seed`` is the default seed).
    split: defaults to ``data.train_split``; the training split is shuffled and augmented, others
      are read in order with centre crops and no caption dropout.
    batch_size: examples per batch *per process* (global batch / process_count).
    seed: shuffling and augmentation seed (default ``config.train.seed``).
    process_index, process_count: this host's rows (default ``jax.process_index()`` /
      ``jax.process_count()``): its block of each global batch (module docstring), so the global
      batch of every step is the same for any process count.
    num_epochs: ``None`` repeats forever; the shuffle differs every epoch.
    tokenizer: ``"auto"`` loads ``config.text``'s tokenizer, ``None`` skips tokens, or an object.
    resolution: overrides ``data.resolution`` (e.g. the small CLIP's image size).
    workers: worker processes (default ``data.workers``; > 0 needs an ``if __name__ ==
      "__main__"`` guard in the calling script). Threads (``data.threads``) are used either way.

  The position is batch ``k`` of global batch ``k`` on every process: set it with
  ``train.checkpoint.set_data_position(it, k)`` (what the trainer does on resume), or save /
  restore it with ``it.get_state()`` / ``it.set_state(state)`` or inside an orbax
  ``CheckpointManager`` composite with ``grain.checkpoint.CheckpointSave(it)`` /
  ``CheckpointRestore(it)``.
  """
  ds = make_dataset(config, split, batch_size=batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, num_epochs=num_epochs, shuffle=shuffle,
                    drop_remainder=drop_remainder, tokenizer=tokenizer, resolution=resolution)
  d = config.data
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.threads,
                                            prefetch_buffer_size=d.prefetch))
  workers = d.workers if workers is None else workers
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()   # (our CLI uses argparse) their defaults are what we want
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def prepare(config: ml_collections.ConfigDict, manifest: str | None = None) -> dict[str, Any]:
  """Prepares ``config.data`` (or a folder manifest) as array_record; returns a summary.

  The embedded dataset and folder manifests are built locally; a public tfds name is only checked
  (its raw data must be prepared where it is available, see :func:`_tfds_source`).
  """
  name = config.data.name
  if manifest:
    builder = folder_builder(config, manifest)
  elif name.split(":", 1)[0] == "shapes":
    builder = shapes_builder(config)
  elif name.split(":", 1)[0] == "folder":
    builder = folder_builder(config)
  else:
    src = source(config, config.data.train_split, prepare=False)
    return dict(dataset=src.description, examples=len(src.records), prepared=True)
  was_prepared = builder.is_prepared()
  if not was_prepared:
    builder.download_and_prepare(file_format="array_record")
  out = dict(dataset=builder.info.full_name, data_dir=builder.data_dir,
             splits={k: v.num_examples for k, v in builder.info.splits.items()},
             already_prepared=was_prepared)
  report = builders.prepared_report(builder)
  if report is not None:
    out["report"] = report
    if report["num_skipped"]:
      logging.warning("%s: skipped %d bad rows: %s", builder.info.full_name,
                      report["num_skipped"], json.dumps(report["skipped"]))
  return out
