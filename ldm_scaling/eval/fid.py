"""Fréchet Inception Distance, pinned to pytorch-fid's definition.

- Network: pytorch-fid's FID InceptionV3 with the TF 2015-12-05 weights (``pt_inception-2015-12-05``,
  :mod:`~ldm_scaling.eval.fid_weights`), 2048-d pool features, f32.
- Input: uint8 RGB (or floats in [0, 1]) -> bilinear resize to 299x299 as ``F.interpolate(...,
  align_corners=False)`` -> ``2 x - 1`` (:func:`ldm_scaling.eval.inception.preprocess`).
- Statistics: float64 mean and ``np.cov(rowvar=False)`` of the features, as pytorch-fid.
- Distance: pytorch-fid's ``calculate_frechet_distance`` (scipy ``sqrtm``; an ``eps * I`` offset
  when the product is singular; a small imaginary part is dropped, a large one is an error).

Every statistics file records how it was made (network, weights digest, n, and for reference
statistics the dataset, split and resolution, and the dataset's identity where the caller knows
it); comparing statistics made differently is an error. Files are read and written through
``etils.epath`` (local paths or ``gs://``), written whole under a unique temporary name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence
import warnings
import zipfile

from etils import epath
import numpy as np
from scipy import linalg
import scipy

from ldm_scaling import files
from ldm_scaling.errors import UserError
from ldm_scaling.eval import fid_weights, inception, parallel
from ldm_scaling.eval import images as imagelib

PREPROCESSING = "uint8/255 -> bilinear 299x299 (torch align_corners=False, no antialias) -> 2x-1"


class StatsMismatchError(UserError, ValueError):
  """Statistics that cannot be computed or compared: too few samples, another dimension, network,
  dataset, resolution or sample count."""


class UnreadableStatsError(StatsMismatchError):
  """A statistics file that is not a readable ``.npz`` with ``mu`` and ``sigma`` (e.g. one
  truncated by a crash): a cache of them is recomputed."""


class RankDeficientWarning(UserWarning):
  """Fewer samples than feature dimensions: the covariance is singular and the FID biased."""


# -------------------------------------------------------------------------------------------------
# Features.


class FeatureExtractor:
  """2048-d FID features of uint8 RGB images, batch-parallel over devices.

  ``weights``: a :class:`~ldm_scaling.eval.fid_weights.FIDWeights`, a weights file, or None for
  :func:`fid_weights.load`'s search (which fetches them into the cache when missing, reporting to
  ``log``). ``batch_size`` is the global batch (rounded up to a multiple
  of the device count); ``devices`` (count or list) or ``mesh`` choose the devices.
  """

  def __init__(self, weights: fid_weights.FIDWeights | str | None = None, *,
               batch_size: int = 50, devices: int | Sequence[Any] | None = None,
               mesh=None, log: Callable[[str], None] | None = None):
    if not isinstance(weights, fid_weights.FIDWeights):
      weights = fid_weights.load(weights, log=log)  # fetched into the cache when missing
    self.weights = weights
    mesh = mesh or parallel.data_mesh(devices)
    # Same features either way; per-example spatial convolutions are ~1.7x faster on XLA:CPU.
    model = inception.InceptionV3(
        per_example_convs=mesh.devices.flat[0].platform == "cpu")

    def features(params, images):
      return model.apply({"params": params}, inception.preprocess(images))

    self._mapper = parallel.BatchMapper(features, weights.params, batch_size, mesh)

  @property
  def batch_size(self) -> int:
    return self._mapper.batch_size

  @property
  def num_devices(self) -> int:
    return self._mapper.num_devices

  @property
  def definition(self) -> dict[str, str]:
    """What makes two sets of features comparable: network, weight values, preprocessing."""
    return dict(feature_extractor=fid_weights.FEATURE_EXTRACTOR,
                weights_sha256=self.weights.params_sha256, preprocessing=PREPROCESSING)

  @property
  def provenance(self) -> dict[str, str]:
    """:attr:`definition` plus where the weights were read from (recorded, not compared)."""
    return dict(self.weights.provenance, **self.definition)

  def __call__(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """An (N, H, W, 3) array or an iterable of such batches -> (N, 2048) float32."""
    batches = (_check_range(b) for b in imagelib.iter_array_batches(images, self.batch_size))
    out = list(self._mapper.map_batches((b,) for b in batches))
    if not out:
      raise imagelib.ImageError("no images to compute FID features of")
    return np.concatenate(out)

  def features_of_files(self, files: Sequence[str]) -> np.ndarray:
    return self(imagelib.iter_batches(files, self.batch_size))


def _check_range(batch: np.ndarray) -> np.ndarray:
  if batch.dtype == np.uint8:
    return batch
  if not np.issubdtype(batch.dtype, np.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or floats in [0, 1], got {batch.dtype}")
  lo, hi = float(batch.min()), float(batch.max())
  if lo < -1e-3 or hi > 1 + 1e-3:
    raise ValueError(f"float images must lie in [0, 1] (pytorch-fid's input), got [{lo:.3g}, "
                     f"{hi:.3g}]; map [-1, 1] samples with (x + 1) / 2, or pass uint8")
  return batch


# -------------------------------------------------------------------------------------------------
# Statistics.


@dataclasses.dataclass(frozen=True)
class FIDStats:
  mu: np.ndarray                  # (D,) float64
  sigma: np.ndarray               # (D, D) float64
  n: int                          # samples the statistics were computed from
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # (N, D) float32 features themselves, kept by reference statistics for KID (None: not kept, or
  # a file written before they were, or pytorch-fid's).
  features: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)


def compute_stats(features: np.ndarray, metadata: Mapping[str, Any] | None = None, *,
                  keep_features: bool = False) -> FIDStats:
  """Mean and covariance of (N, D) features in float64 (pytorch-fid's ``np.cov(rowvar=False)``);
  ``keep_features``: the features too (as float32), for KID.

  Warns (:class:`RankDeficientWarning`) when N <= D: the covariance then has rank < D, and the
  FID is biased upward and not comparable to FIDs from more samples."""
  kept = np.asarray(features, np.float32) if keep_features else None
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}")
  n, d = features.shape
  if n < 2:
    raise StatsMismatchError(f"FID statistics need at least 2 samples (a covariance), got {n}")
  if n <= d:
    warnings.warn(
        f"FID statistics from {n} samples of {d}-d features: the covariance has rank <= {n - 1} "
        f"< {d} (singular), so the FID is biased upward and not comparable to FIDs computed "
        f"from more samples. Use more than {d} samples (the standard is 10k-50k).",
        RankDeficientWarning, stacklevel=2)
  meta = dict(metadata or {})
  meta["n"] = n
  return FIDStats(np.mean(features, axis=0), np.cov(features, rowvar=False), n, meta, kept)


def save_stats(path: str, stats: FIDStats) -> str:
  """``.npz`` with ``mu``, ``sigma`` (as pytorch-fid's), ``n``, JSON ``metadata`` and, when the
  statistics keep them, the float32 ``features`` (n x 2048 x 4 bytes: 245 MB at 30k), written whole
  (``files.atomic_write_bytes``: a unique temporary, so concurrent saves of one path both succeed
  and the last one wins) to a local path or a ``gs://`` URL."""
  buf = io.BytesIO()
  extra = {} if stats.features is None else dict(features=np.asarray(stats.features, np.float32))
  np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
           metadata=np.array(json.dumps(dict(stats.metadata), sort_keys=True)), **extra)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write_bytes(target, buf.getvalue())
  return path


def load_stats(path: str, expect: Mapping[str, Any] | None = None) -> FIDStats:
  """Reads statistics (ours, or pytorch-fid's ``mu``/``sigma`` files), local or ``gs://``.

  ``expect``: metadata the file must carry; any difference raises :class:`StatsMismatchError`
  naming each field. A file without metadata (pytorch-fid's) cannot be checked: with ``expect``
  it is an error, without it a warning at comparison time."""
  p = epath.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"statistics file {path!r} not found")
  try:
    with np.load(io.BytesIO(p.read_bytes()), allow_pickle=False) as f:
      mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
      meta = json.loads(str(f["metadata"])) if "metadata" in f.files else {}
      n = int(f["n"]) if "n" in f.files else int(meta.get("n", 0))
      features = f["features"].astype(np.float32) if "features" in f.files else None
  except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise UnreadableStatsError(f"{path}: not an FID statistics file with 'mu' and 'sigma' "
                               f"({e})") from None
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise StatsMismatchError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit")
  if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
    raise UnreadableStatsError(f"{path}: features {features.shape} do not fit mu {mu.shape}")
  if expect:
    if not meta:
      raise StatsMismatchError(
          f"{path} has no metadata (made by pytorch-fid or by hand), so it cannot be checked "
          f"against {dict(expect)}; recompute it with this package")
    diffs = [f"{k}: file has {meta.get(k, '<missing>')!r}, expected {v!r}"
             for k, v in expect.items() if _normal(meta.get(k)) != _normal(v)]
    if diffs:
      raise StatsMismatchError(
          f"statistics {path} do not match this evaluation — " + "; ".join(diffs)
          + ". Recompute them: delete the file (reference_stats(..., recompute=True)), or "
          f"`ldm-scaling fid --save-stats FOLDER {path}` for a folder of images.")
  return FIDStats(mu, sigma, n, meta, features)


def _normal(value):
  return json.loads(json.dumps(value)) if value is not None else None


# -------------------------------------------------------------------------------------------------
# Distance.


def _sqrtm(a: np.ndarray) -> np.ndarray:
  # pytorch-fid calls sqrtm(..., disp=False); SciPy >= 1.16 deprecates `disp` and never prints.
  if tuple(int(x) for x in scipy.__version__.split(".")[:2]) >= (1, 16):
    return linalg.sqrtm(a)
  return linalg.sqrtm(a, disp=False)[0]


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), exactly as pytorch-fid computes it."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise StatsMismatchError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: the covariance product is singular; adding {eps} to the diagonal of "
                  f"both covariances (as pytorch-fid)", RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise StatsMismatchError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}; "
                       f"the statistics are not valid covariances")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


_COMPAT_KEYS = ("feature_extractor", "weights_sha256", "preprocessing")


def fid_from_stats(stats1: FIDStats, stats2: FIDStats) -> float:
  """FID between two sets of statistics made by the same network (checked when both record it)."""
  m1, m2 = stats1.metadata, stats2.metadata
  known1, known2 = (all(k in m for k in _COMPAT_KEYS) for m in (m1, m2))
  if known1 and known2:
    diffs = [f"{k}: {m1[k]!r} vs {m2[k]!r}" for k in _COMPAT_KEYS if m1[k] != m2[k]]
    if diffs:
      raise StatsMismatchError("the two statistics come from different feature networks ("
                               + "; ".join(diffs) + "); recompute one of them")
  elif known1 or known2:
    warnings.warn("FID between statistics of which one records no provenance (e.g. a "
                  "pytorch-fid .npz): the feature network cannot be checked", UserWarning,
                  stacklevel=2)
  for s in (stats1, stats2):
    if s.n and s.n <= s.mu.size:
      warnings.warn(f"FID from statistics of {s.n} samples <= {s.mu.size} feature dims: "
                    f"biased upward, not comparable to FIDs from more samples",
                    RankDeficientWarning, stacklevel=2)
  return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


# -------------------------------------------------------------------------------------------------
# Paths (the command line) and cached reference statistics (the eval job).


def stats_of_path(path: str, extractor: FeatureExtractor | None = None) -> FIDStats:
  """A ``.npz`` of statistics, or a folder of images (features computed with ``extractor``)."""
  if path.endswith(".npz"):
    return load_stats(path)
  files = imagelib.list_images(path)
  extractor = extractor or FeatureExtractor()
  feats = extractor.features_of_files(files)
  return compute_stats(feats, dict(extractor.provenance, source=os.path.abspath(path)))


def fid_of_paths(path1: str, path2: str, extractor: FeatureExtractor | None = None) -> float:
  """pytorch-fid's ``calculate_fid_given_paths``: each path a folder of images or a ``.npz``."""
  for p in (path1, path2):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p!r} does not exist (give a folder of images or a .npz)")
  if extractor is None and not (path1.endswith(".npz") and path2.endswith(".npz")):
    extractor = FeatureExtractor()
  return fid_from_stats(stats_of_path(path1, extractor), stats_of_path(path2, extractor))


def identity_digest(identity: Mapping[str, Any]) -> str:
  """A short digest of a dataset's identity (what tells two builds of a dataset apart)."""
  text = json.dumps(_normal(dict(identity)), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def reference_stats_path(directory: str, dataset: str, split: str, resolution: int, n: int,
                         identity: Mapping[str, Any] | None = None) -> str:
  """The cache file of reference statistics. With ``identity`` (e.g. the prepared dataset's
  name, version, example count and size) its digest is part of the name, so a rebuilt or edited
  dataset (the same ``data.name``) gets new statistics instead of the old ones. ``dataset`` is
  made file-name safe (``folder:/path/m.jsonl`` holds a colon and slashes)."""
  name = f"{_file_safe(dataset)}-{_file_safe(split)}-{resolution}px-n{n}-" \
         f"{fid_weights.FEATURE_EXTRACTOR}"
  if identity is not None:
    name += f"-{identity_digest(identity)}"
  return os.fspath(epath.Path(directory) / f"{name}.npz")


def _file_safe(text: str, limit: int = 80) -> str:
  safe = re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(text)).strip("_.")
  return safe[-limit:] or "dataset"


def reference_stats(images: Callable[[], Iterable[np.ndarray]], *, dataset: str, split: str,
                    resolution: int, n: int, extractor: FeatureExtractor,
                    directory: str | None = None, recompute: bool = False,
                    identity: Mapping[str, Any] | None = None,
                    with_features: bool = False) -> FIDStats:
  """Statistics of ``n`` real images, computed once per (dataset, split, resolution, n, network,
  and the dataset's ``identity`` when given) and cached as ``.npz`` with that metadata in
  ``directory`` (local or ``gs://``; default ``<cache>/fid_stats``).

  ``images()`` is called only on a cache miss and yields (B, H, W, 3) uint8 batches (at least
  ``n`` images; the first ``n`` are used). A cache file whose metadata differs raises
  :class:`StatsMismatchError`; ``recompute=True`` overwrites it. An unreadable cache file (e.g.
  truncated) is recomputed, with a warning naming it.

  The file keeps the reference features too (for KID). ``with_features``: they are needed, so a
  cache file written before files kept them is recomputed (with a warning naming it; the same
  images and network give the same mean and covariance), not used without them."""
  directory = directory or os.path.join(os.path.dirname(fid_weights.cache_dir()), "fid_stats")
  path = reference_stats_path(directory, dataset, split, resolution, n, identity)
  expect = dict(dataset=dataset, split=split, resolution=int(resolution), n=int(n),
                **extractor.definition)
  if identity is not None:
    expect["dataset_identity"] = dict(identity)
  if epath.Path(path).exists() and not recompute:
    try:
      cached = load_stats(path, expect=expect)
      if cached.features is not None or not with_features:
        return cached
      warnings.warn(f"{path} has no reference features (written before the cache kept them; "
                    f"KID needs them): recomputing the reference statistics", UserWarning,
                    stacklevel=2)
    except UnreadableStatsError as e:
      warnings.warn(f"{e}; recomputing the reference statistics", UserWarning, stacklevel=2)

  def first_n():
    left = n
    for batch in images():
      if left <= 0:
        return
      batch = np.asarray(batch)[:left]
      if batch.ndim != 4 or batch.shape[1:3] != (resolution, resolution):
        raise ValueError(f"{dataset}/{split} yielded images of shape {batch.shape[1:]}, but the "
                         f"statistics are labelled resolution={resolution}; pass the resolution "
                         f"the images have")
      left -= len(batch)
      yield batch

  feats = extractor(first_n())
  if len(feats) < n:
    raise ValueError(f"{dataset}/{split} yielded {len(feats)} images, fewer than n={n}; lower n "
                     f"or use a larger split")
  meta = dict(extractor.provenance, **{k: v for k, v in expect.items() if k != "n"})
  stats = compute_stats(feats, meta, keep_features=True)
  save_stats(path, stats)
  return stats
