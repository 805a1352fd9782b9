"""Reading a VAE latent cache (``data.name="latents:<dir>"``): posterior moments per image (and
of the mirrored image when ``data.flip`` is on) in ``<dir>/<split>.array_record``, sampled and
scaled when read. ``ldm_scaling.components.vae.cache_latents`` (``ldm-scaling cache-latents``)
writes it, last ``<dir>/latents.json`` (scaling factor, counts, latent shape, provenance), so a
directory holding that file is complete.

The directory may be local or ``gs://`` (paths go through ``etils.epath``). A ``gs://`` split is
copied once to a local cache, ``<cache root>/latents/<hash of the directory>/`` (the cache root is
``$LDM_SCALING_CACHE`` or ``~/.cache/ldm_scaling``), and read there: training reads records in
random order, and array_record's own GCS reader (present in array_record 0.8.6) would send one
request per record, tens of milliseconds each, where a local read takes microseconds. The copy is
reused while its ``latents.json`` equals the bucket's and the split's size matches; a changed
cache on the bucket is copied again. Copies go through a unique temporary name and a rename, so
processes copying the same split at once do not see half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any

from etils import epath
import flax
import grain
import numpy as np

from ldm_scaling import files
from ldm_scaling.data import preprocess
from ldm_scaling.errors import DataError

LATENT_META = "latents.json"
WRITE_HINT = "write one with `ldm-scaling cache-latents --config <config> --out DIR`"


def split_file(directory: str | os.PathLike, split: str) -> epath.Path:
  return epath.Path(directory) / f"{split}.array_record"


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The cache's ``latents.json``; a missing one is a :class:`DataError` saying how to write it."""
  path = epath.Path(directory) / LATENT_META
  if not path.exists():
    raise DataError(f"no latent cache in {os.fspath(directory)!r} (no {LATENT_META}); "
                    f"{WRITE_HINT}")
  return json.loads(path.read_text())


def local_copy(directory: str, split: str, meta: dict[str, Any],
               root: str | None = None) -> str:
  """The split of a remote (``gs://``) cache as a local file, copied on first use (see the module
  docstring); returns its path."""
  remote = split_file(directory, split)
  size = remote.stat().length
  key = hashlib.sha256(directory.rstrip("/").encode()).hexdigest()[:16]
  local_dir = os.path.join(root or files.cache_root(), "latents", key)
  path = os.path.join(local_dir, f"{split}.array_record")
  meta_path = os.path.join(local_dir, f"{split}.{LATENT_META}")
  if os.path.isfile(path) and os.path.getsize(path) == size and os.path.isfile(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      if json.load(f) == meta:
        return path
  os.makedirs(local_dir, exist_ok=True)
  tmp = f"{path}.tmp{uuid.uuid4().hex}"
  try:
    with remote.open("rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, length=16 << 20)
    if os.path.getsize(tmp) != size:
      raise DataError(f"copying {os.fspath(remote)!r} gave {os.path.getsize(tmp)} bytes, not "
                      f"{size}; run again (the cache on the bucket may be being rewritten)")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  files.atomic_write_text(meta_path, json.dumps(meta))
  return path


class LatentRecords:
  """Random access over a cached split, decoding msgpack records and carrying the scaling factor."""

  def __init__(self, directory: str, split: str):
    self.meta = read_meta(directory)
    remote = split_file(directory, split)
    if not remote.exists():
      raise DataError(f"the latent cache in {directory!r} has no split {split!r} (it has "
                      f"{sorted(self.meta.get('counts', {}))}); set data.train_split / "
                      f"data.eval_split, or {WRITE_HINT} --splits {split}")
    self.scaling_factor = float(self.meta["scaling_factor"])
    self.path = local_copy(directory, split, self.meta) if not files.is_local(directory) else (
        os.fspath(remote))
    self._source = grain.sources.ArrayRecordDataSource([self.path])

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    rec = flax.serialization.msgpack_restore(self._source[index])
    rec["scaling_factor"] = self.scaling_factor
    return rec


def latent_cache_source(directory: str, split: str) -> LatentRecords:
  return LatentRecords(os.path.expanduser(directory) if files.is_local(directory) else directory,
                       split)


def latent_record(rec: dict, rng: np.random.Generator, opts) -> dict[str, Any]:
  """A cached record -> {"latents": scaled posterior sample (float32), "captions": str}, with the
  same flip (caption-aware) and caption-dropout rules as images."""
  caption = str(rec["caption"])
  mean, logvar = rec["mean"], rec["logvar"]
  if opts.flip != "none" and "flip_mean" in rec and rng.random() < 0.5:
    mean, logvar = rec["flip_mean"], rec["flip_logvar"]
    if opts.flip == "caption_aware":
      caption = preprocess.swap_left_right(caption)
  if opts.caption_dropout > 0 and rng.random() < opts.caption_dropout:
    caption = ""
  mean = np.asarray(mean, np.float32)
  std = np.exp(0.5 * np.asarray(logvar, np.float32))
  z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
  return {"latents": z * rec["scaling_factor"], "captions": caption}
