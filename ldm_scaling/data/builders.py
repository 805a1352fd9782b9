"""tfds builders (array_record, read TF-free through ``as_data_source``) for this project's data.

- :class:`CaptionedShapes`: the embedded procedural dataset (:mod:`ldm_scaling.data.shapes`), one
  builder config per native resolution (``32px``, ``64px``, ``128px``) and split sizes; splits
  ``train`` and ``test`` (held out: drawn from a different random stream).
- :class:`CaptionedFolder`: users' images + captions listed in a manifest
  (:mod:`ldm_scaling.data.manifest`); rows are checked in parallel, bad rows raise or are counted
  (``data.bad_examples``), and the counts are stored in the dataset's metadata and printed.

Features of both: ``image`` (RGB uint8, PNG or the original JPEG/PNG bytes), ``caption`` (text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ldm_scaling.data import manifest as manifest_lib
from ldm_scaling.data import shapes

SHAPES_RESOLUTIONS = (32, 64, 128)
SHAPES_SIZES = (20_000, 2_000)  # (train, test)
SHAPES_SEED = 0


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  resolution: int = 64
  train_size: int = SHAPES_SIZES[0]
  test_size: int = SHAPES_SIZES[1]


def shapes_config(resolution: int, sizes=SHAPES_SIZES) -> ShapesConfig:
  """The builder config for a native resolution and (train, test) sizes."""
  name = f"{resolution}px"
  if tuple(sizes) != SHAPES_SIZES:
    name += f"_{sizes[0]}_{sizes[1]}"
  return ShapesConfig(name=name, resolution=resolution, train_size=int(sizes[0]),
                      test_size=int(sizes[1]),
                      description=f"{resolution}x{resolution} px, {sizes[0]} train / {sizes[1]} "
                                  f"test examples")


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """Procedurally rendered shape scenes whose captions state their content (ldm_scaling.data.shapes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "4 shapes x 7 colours x 2 sizes, single/pair/count scenes."}
  BUILDER_CONFIGS = [shapes_config(r) for r in SHAPES_RESOLUTIONS]

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=shapes.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "index": np.int64,
        }),
        homepage="https://github.com/ldm-scaling (embedded, generated locally)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.train_size),
            "test": self._generate_examples("test", cfg.test_size)}

  def _generate_examples(self, split: str, n: int):
    r = self.builder_config.resolution
    for i in range(n):
      ex = shapes.example(SHAPES_SEED, split, i, r)
      yield i, {"image": Image.fromarray(ex["image"]), "caption": ex["caption"], "index": i}


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  manifest: str = ""
  bad_examples: str = "error"
  min_image_size: int = 16
  workers: int = 0


def folder_config(manifest: str, bad_examples: str = "error", min_image_size: int = 16,
                  workers: int = 0) -> FolderConfig:
  """A config named after the manifest and a hash of its path and content: editing the manifest
  makes a new dataset instead of silently reusing the old one."""
  path = os.path.abspath(manifest)
  if not os.path.isfile(path):
    raise manifest_lib.ManifestError(
        f"manifest {manifest!r} not found; give a .jsonl or .csv file with image and caption "
        f"fields (data.name=folder:<manifest>, see docs/data.md)")
  digest = hashlib.sha256(path.encode())
  with open(path, "rb") as f:
    digest.update(f.read())
  digest.update(f"{bad_examples}/{min_image_size}".encode())
  stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
  return FolderConfig(name=f"{stem.lower()[:40]}_{digest.hexdigest()[:10]}", manifest=path,
                      bad_examples=bad_examples, min_image_size=min_image_size, workers=workers,
                      description=f"images and captions listed in {path}")


class CaptionedFolder(tfds.core.GeneratorBasedBuilder):
  """Users' images + captions from a JSONL/CSV manifest (ldm_scaling.data.manifest)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "image + caption from a manifest; bad rows raise or are counted."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=manifest_lib.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "line": np.int64,
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if cfg.bad_examples not in manifest_lib.POLICIES:
      raise ValueError(f"data.bad_examples must be one of {manifest_lib.POLICIES}, "
                       f"got {cfg.bad_examples!r}")
    rows = manifest_lib.read(cfg.manifest)
    by_split: dict[str, list] = {}
    for row in rows:
      by_split.setdefault(row.split, []).append(row)
    self._report = manifest_lib.Report()
    self._pending = set(by_split)
    return {split: self._generate_examples(split, split_rows)
            for split, split_rows in sorted(by_split.items())}

  def _generate_examples(self, split: str, rows):
    cfg = self.builder_config
    for c in manifest_lib.checked_rows(rows, cfg.min_image_size, cfg.workers):
      self._report.add(c)
      if c.reason is not None:
        if cfg.bad_examples == "error":
          raise manifest_lib.bad_example_error(c, cfg.manifest)
        logging.warning("skipping %s:%d (%s): %s", cfg.manifest, c.row.line, c.row.image,
                        c.reason)
        continue
      yield c.row.line, {"image": c.encoded, "caption": c.caption, "line": c.row.line}
    self._pending.discard(split)
    if not self._pending:
      report = self._report.to_dict()
      self.info.metadata["prepare_report"] = report
      if sum(report["written"].values()) == 0:
        raise manifest_lib.BadExampleError(
            f"{cfg.manifest}: no usable rows ({self._report.summary()}); see the reasons above")


def prepared_report(builder: tfds.core.DatasetBuilder) -> dict | None:
  """The preparation report stored with a prepared folder dataset (None for other builders)."""
  path = os.path.join(builder.data_dir, "metadata.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f).get("prepare_report")
  return None

