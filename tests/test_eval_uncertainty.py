"""Uncertainties of the eval grid's numbers: resampled FID (fast path = scipy on each resample),
KID (= a hand-written unbiased estimator), CLIP-score intervals, the reference features' cache,
rows from before the new columns, and the real-data floor."""

import itertools
import json
import os

import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling.errors import ConfigError
from ldm_scaling.eval import clip_score, fid, frechet, grid, results


def _gaussian(rng, n, d, shift=0.0):
  mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)  # correlated, not isotropic
  return rng.normal(size=(n, d)) @ mix + shift


def _reference(features, keep=True):
  return frechet.Reference(fid.compute_stats(features, keep_features=keep))


# -------------------------------------------------------------------------------------------------
# FID bootstrap.


# Support <= d: the Gram route; > d: the covariance route.
@pytest.mark.parametrize("n,d,method", [(40, 64, "half"), (300, 32, "half"),
                                        (300, 32, "bootstrap")])
def test_resampled_fid_equals_scipy_fid_of_each_resample(n, d, method):
  rng = np.random.default_rng(1)
  ref_feats = _gaussian(rng, 600, d)
  ref = fid.compute_stats(ref_feats)
  gen = _gaussian(rng, n, d, shift=0.1) * 1.2
  idx = frechet.resample_indices(n, 4, method=method)
  got = frechet.Reference(ref).resampled_fid(gen, idx)
  for b in range(4):
    x = gen[idx[b]]
    if method == "half":  # n // 2 distinct samples
      assert len(x) == n // 2 and len(np.unique(idx[b])) == n // 2
    else:  # n samples with repeats
      assert len(x) == n and len(np.unique(idx[b])) < n
    want = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref.mu, ref.sigma)
    assert got[b] == pytest.approx(want, rel=1e-6), b
  # The reported half-width is that of the percentile interval of these values, reproducibly.
  unc = frechet.Reference(ref).uncertainty(gen, 50, method=method)
  values = frechet.Reference(ref).resampled_fid(
      gen, frechet.resample_indices(n, 50, method=method))
  lo, hi = np.percentile(values, [2.5, 97.5])
  assert unc["fid_ci95"] == pytest.approx((hi - lo) / 2) and unc["fid_ci95"] > 0
  assert frechet.Reference(ref).uncertainty(gen, 50, method=method)["fid_ci95"] == unc["fid_ci95"]
  assert np.isnan(frechet.Reference(ref).uncertainty(gen, 0)["fid_ci95"])  # 0 disables


def test_fid_ci95_shrinks_as_one_over_sqrt_n():
  rng = np.random.default_rng(2)
  d = 8
  ref = _reference(_gaussian(rng, 20_000, d), keep=False)
  widths = {n: ref.uncertainty(_gaussian(rng, n, d, shift=0.3), 200)["fid_ci95"]
            for n in (200, 3200)}
  ratio = widths[200] / widths[3200]  # 16x the samples: 1/4 the width
  print(f"\nfid_ci95 {widths}, ratio {ratio:.2f} (1/sqrt(n): 4)")
  assert 2.8 < ratio < 5.7


# -------------------------------------------------------------------------------------------------
# KID.


def _kid_by_hand(x, y):
  """Binkowski et al.'s unbiased MMD^2, pair by pair."""
  d = x.shape[1]
  k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
  n, m = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
  xy = sum(k(a, b) for a in x for b in y) / (n * m)
  return xx + yy - 2 * xy


def test_kid_equals_a_hand_written_unbiased_estimator():
  rng = np.random.default_rng(3)
  gen, real = _gaussian(rng, 12, 5, shift=0.4), _gaussian(rng, 15, 5)
  real = real.astype(np.float32).astype(np.float64)  # the reference keeps float32 features
  ref = _reference(real)
  assert ref.kid(gen) == pytest.approx(_kid_by_hand(gen, real), rel=1e-9)
  # A bootstrap resample: pairs of two copies of one sample are left out, every other pair counts.
  idx = frechet.resample_indices(12, 1, method="bootstrap")[0]
  x = gen[idx]
  d = x.shape[1]
  pairs = [(a, b) for a, b in itertools.permutations(range(12), 2) if idx[a] != idx[b]]
  xx = np.mean([(x[a] @ x[b] / d + 1) ** 3 for a, b in pairs])
  yy = (_kid_by_hand(real, real) + 2 * np.mean((real @ real.T / d + 1) ** 3)) / 2
  xy = np.mean((x @ real.T / d + 1) ** 3)
  got = ref.resampled_kid(gen, idx[None])[0]
  assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
  half = frechet.resample_indices(12, 1)[0]  # a half-sample: the estimator on those 6
  assert ref.resampled_kid(gen, half[None])[0] == pytest.approx(_kid_by_hand(gen[half], real),
                                                                rel=1e-9)
  # Statistics without features (an old cache, pytorch-fid's): KID is NaN, FID still works.
  old = frechet.Reference(fid.compute_stats(real))
  assert np.isnan(old.kid(gen)) and np.isnan(old.uncertainty(gen, 10)["kid_ci95"])


def test_kid_is_zero_within_its_interval_for_one_distribution_positive_for_shifted():
  rng = np.random.default_rng(4)
  d = 16
  ref = _reference(_gaussian(np.random.default_rng(5), 800, d))
  # The same seed draws the same mixing matrix and, in rows 800-999, 200 fresh samples.
  same = ref.uncertainty(_gaussian(np.random.default_rng(5), 1000, d)[800:], 200)
  shifted = ref.uncertainty(_gaussian(rng, 200, d, shift=0.5), 200)
  print(f"\nsame: {same}\nshifted: {shifted}")
  assert abs(same["kid"]) <= same["kid_ci95"]
  assert shifted["kid"] > 5 * shifted["kid_ci95"] > 0


# -------------------------------------------------------------------------------------------------
# CLIP score.


def test_clip_ci95_matches_a_bootstrap_of_the_mean():
  cosine = np.random.default_rng(6).normal(0.25, 0.1, size=400)
  result = clip_score.score_from_cosine(cosine, "some-clip")
  per_sample = 100 * np.maximum(cosine, 0)
  idx = np.random.default_rng(0).integers(0, 400, size=(4000, 400))
  lo, hi = np.percentile(per_sample[idx].mean(1), [2.5, 97.5])
  assert result.ci95 == pytest.approx((hi - lo) / 2, rel=0.08)
  assert result.uncertainty_columns() == {"clip_score_ci95[some-clip]": result.ci95}


# -------------------------------------------------------------------------------------------------
# Reference features in the statistics cache.


class _Quadrants:
  """A stand-in feature extractor: mean colour of each image quadrant (12-d)."""
  definition = dict(feature_extractor="quadrants", weights_sha256="0" * 8, preprocessing="none")
  provenance = dict(definition, weights_source="test")

  def __init__(self):
    self.calls = 0

  def __call__(self, batches):
    self.calls += 1
    out = []
    for b in batches:
      b = np.asarray(b, np.float64) / 255
      h, w = b.shape[1] // 2, b.shape[2] // 2
      out.append(np.concatenate([b[:, i:i + h, j:j + w].mean((1, 2))
                                 for i in (0, h) for j in (0, w)], axis=1))
    return np.concatenate(out).astype(np.float32)


def _images():
  rng = np.random.default_rng(0)
  for _ in range(3):
    yield rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)


def test_reference_cache_keeps_features_and_recomputes_an_old_one_for_kid(tmp_path):
  extractor = _Quadrants()
  kw = dict(dataset="shapes", split="test", resolution=4, n=15, extractor=extractor,
            directory=str(tmp_path))
  stats = fid.reference_stats(_images, **kw)
  path = fid.reference_stats_path(str(tmp_path), "shapes", "test", 4, 15)
  loaded = fid.load_stats(path)
  want = extractor(_images())[:15]
  np.testing.assert_array_equal(loaded.features, want)
  np.testing.assert_allclose(loaded.mu, want.astype(np.float64).mean(0))
  # A cache written before files kept features: still loads; recomputed only when KID needs it.
  fid.save_stats(path, fid.FIDStats(stats.mu, stats.sigma, stats.n, stats.metadata))
  extractor.calls = 0
  assert fid.reference_stats(_images, **kw).features is None and extractor.calls == 0
  with pytest.warns(UserWarning, match="no reference features.*recomputing"):
    again = fid.reference_stats(_images, with_features=True, **kw)
  assert extractor.calls == 1 and again.features.shape == (15, 12)
  np.testing.assert_allclose(again.sigma, stats.sigma)
  assert fid.reference_stats(_images, with_features=True, **kw).features is not None
  assert extractor.calls == 1


# -------------------------------------------------------------------------------------------------
# Results rows from before the uncertainty columns.

STEP = 3
CELL = grid.Cell("ddim", 2, 3.0)
SETTINGS = dict(checkpoint_id=dict(step=STEP, committed=1, config_hash="abc"),
                reference=dict(n=16), components=dict(clip_score="local-clip-small"))


def _row(run, config, settings, **values):
  row = {c: 1.0 for c in results.COLUMNS}
  row.update(grid._key(run, config, STEP, CELL), **values)
  row[results.KEY_COLUMN] = grid.cell_key(settings)
  row[results.SETTINGS_COLUMN] = json.dumps(settings, sort_keys=True)
  return row


def test_a_row_from_before_the_uncertainty_columns_loads_and_stays_done(tmp_path):
  table_dir = str(tmp_path / "results")
  table = results.Table(table_dir)
  old_config = cfglib.base_config()
  with old_config.eval.unlocked():
    del old_config.eval["bootstrap"]  # the config as it was when the row was made
  old = _row("../runs/w16", old_config, grid.cell_settings(old_config, old_config.eval, **SETTINGS),
             **{"clip_score[local-clip-small]": 20.0})
  table.add(old)
  for bootstrap in (200, 0, 1000):  # how many resamples does not make a cell stale
    config = cfglib.base_config()
    config.eval.bootstrap = bootstrap
    key = grid.cell_key(grid.cell_settings(config, config.eval, **SETTINGS))
    state, _ = grid.cell_state(table, ["../runs/w16"], config, STEP, CELL, key)
    assert state == "done", bootstrap
  frame = results.load(table_dir)
  for column in ("fid_ci95", "kid", "kid_ci95", "clip_score_ci95[local-clip-small]"):
    assert np.isnan(frame[column]).all(), column
  # Next to a row that has them: the old row's are NaN, the new row's kept.
  config = cfglib.base_config()
  new = _row("../runs/w32", config, grid.cell_settings(config, config.eval, **SETTINGS),
             fid_ci95=2.5, kid=0.01, kid_ci95=0.002,
             **{"clip_score[local-clip-small]": 21.0, "clip_score_ci95[local-clip-small]": 0.4})
  table.add(new)
  table.write_tables()
  for source in (table_dir, os.path.join(table_dir, "results.csv"),
                 os.path.join(table_dir, "results.jsonl")):
    frame = results.load(source).set_index("run")
    assert frame.loc["../runs/w32", "fid_ci95"] == 2.5 and frame.loc["../runs/w32", "kid"] == 0.01
    assert np.isnan(frame.loc["../runs/w16", "fid_ci95"])
    assert np.isnan(frame.loc["../runs/w16", "clip_score_ci95[local-clip-small]"])
  with pytest.raises(ConfigError, match="eval.bootstrap must be >= 0"):
    config.eval.bootstrap = -1
    grid.validate(config)


# -------------------------------------------------------------------------------------------------
# The real-data floor.


def test_real_data_floor_is_held_out_real_images_against_the_reference_once(tmp_path):
  config = cfglib.base_config()
  config.data.update(data_dir=str(tmp_path / "tfds"), shapes_sizes=(8, 24), resolution=16,
                     threads=2)
  config.eval.update(fid_reference_n=14, num_samples=8, stats_dir=str(tmp_path / "stats"),
                     bootstrap=50)
  extractor = _Quadrants()
  table_dir = str(tmp_path / "results")
  logs = []
  floor = grid.real_data_floor(config, table_dir, n=8, extractor=extractor, log=logs.append)
  assert floor["n"] == 8 and floor["source"] == "shapes/test[14:22]" and len(logs) == 1
  # Independently: every test image read once, features of [14, 22) vs statistics of [0, 14).
  every = np.concatenate(list(grid._split_images(config, "test", 0, 24)()))
  assert every.shape == (24, 16, 16, 3)
  feats = extractor([every]).astype(np.float64)
  ref, held = feats[:14], feats[14:22]
  want = fid.frechet_distance(held.mean(0), np.cov(held, rowvar=False), ref.mean(0),
                              np.cov(ref, rowvar=False))
  assert floor["fid"] == pytest.approx(want, rel=1e-6)
  assert floor["kid"] == pytest.approx(_kid_by_hand(held, ref), rel=1e-6)
  assert floor["fid_ci95"] > 0 and floor["kid_ci95"] > 0
  # Cached in the table directory: the same call computes nothing; another n is another entry.
  calls = extractor.calls
  assert grid.real_data_floor(config, table_dir, n=8, extractor=extractor) == floor
  assert extractor.calls == calls
  other = grid.real_data_floor(config, table_dir, n=10, extractor=extractor, log=logs.append)
  assert other["source"] == "shapes/test[14:24]" and extractor.calls > calls
  with open(os.path.join(table_dir, grid.FLOOR_FILE)) as f:
    assert len(json.load(f)["floors"]) == 2
  with pytest.raises(ConfigError, match="needs 34 images of 'test'"):
    grid.real_data_floor(config, table_dir, n=20, extractor=extractor)


def test_intervals_match_the_spread_over_fresh_samples():
  """Calibration: the half-width from one cell's samples against 1.96 x the standard deviation
  of FID / KID over 40 independent cells (fresh samples, the same reference). Resampling errs on
  the wide side (near-degenerate statistics: docs/metrics.md), never narrow."""
  rng = np.random.default_rng(0)
  d, n = 8, 400
  mix = np.eye(d) + 0.5 * rng.normal(size=(d, d)) / np.sqrt(d)
  draw = lambda k, shift=0.0: np.abs(rng.normal(size=(k, d)) @ mix + shift)
  ref = _reference(draw(4000))
  cells = [draw(n, 0.2) for _ in range(40)]
  spread = {m: 1.96 * np.std([f(x) for x in cells], ddof=1)
            for m, f in (("fid", ref.distance), ("kid", ref.kid))}
  widths = [ref.uncertainty(x, 200) for x in cells[:4]]
  for m in ("fid", "kid"):
    ratio = np.mean([w[f"{m}_ci95"] for w in widths]) / spread[m]
    print(f"\n{m}: ci95 / spread over fresh cells = {ratio:.2f}")
    assert 0.7 < ratio < 2.5, m
