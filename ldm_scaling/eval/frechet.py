"""Many FIDs (and KIDs) against one reference, fast and exact, with bootstrap uncertainties.

pytorch-fid's formula ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))`` costs a 2048x2048
``scipy.linalg.sqrtm`` per score (12-30 s on 2 CPU cores). An eval grid scores hundreds of cells
against the same reference, so :class:`Reference` factors the reference once,
``S_r = U diag(l) U^T``, ``R = S_r^(1/2)``, and uses

    Tr(sqrtm(S_g S_r)) = Tr(sqrtm(R S_g R)) = sum_i sqrt(lambda_i(R S_g R)).

With ``S_g = X^T X / (n - 1)`` for the n centred generated features ``X``, the non-zero eigenvalues
of ``R S_g R = (X R)^T (X R) / (n - 1)`` are those of the n x n Gram matrix
``(X R)(X R)^T / (n - 1)``: one (n, d) x (d, d) product and an n x n eigen-decomposition, i.e.
milliseconds for n in the hundreds. The identity is exact; ``tests/test_eval_grid.py`` checks it
against :func:`ldm_scaling.eval.fid.frechet_distance`.

**Uncertainty** (:meth:`Reference.uncertainty`): ``num`` resamples of the cell's n generated
features (:func:`resample_indices`, a fixed seed), the statistic recomputed on each, and the
half-width of the central 95 % percentile interval (:func:`ci95`) reported. The reference
statistics (and features) stay fixed: the interval says how much the cell's number moves with
*which* n images were generated, not with which reference images were drawn. The resamples are
**half-samples** by default (``method="half"``: n // 2 features without replacement, the
delete-half jackknife of Shao & Wu 1989, whose variance needs no rescaling for even n), not the
n-with-replacement bootstrap (``method="bootstrap"``): a bootstrap resample holds only ~0.63 n
distinct features, which moves FID's large small-n bias from resample to resample, and its
interval came out 3-6x wider than the spread of FIDs of fresh samples (measured in
``docs/metrics.md``); half-samples were within 1.25-1.5x.

A resample with counts ``w`` (``sum w = k``) needs no new features: with ``Y = X0 R`` (``X0`` the
features centred once) computed once per cell, its ``R S_g R`` is
``sum_i w_i (y_i - m)(y_i - m)^T / (k - 1)``, whose non-zero eigenvalues are those of
``diag(sqrt w) Gc diag(sqrt w) / (k - 1)`` on the resample's support (n / 2 rows, ~0.63 n for
the bootstrap), ``Gc`` the Gram matrix ``Y Y^T`` centred at the weighted mean. So a resample costs
an O(n^2) re-weighting and an (n / 2)^2 eigen-decomposition, not a d x d one; when the support
exceeds the feature dimension the d x d covariance is used instead (O(n d^2) a resample: large n
costs more; lower ``eval.bootstrap`` there).

**KID** (Binkowski et al. 2018): the unbiased estimator of the squared MMD with the polynomial
kernel ``k(x, y) = (x . y / d + 1)^3`` between the generated features and the reference
*features* (stored with the reference statistics), computed on all of them at once (not
averaged over subsets, as torch-fidelity does): generated-generated pairs ``i != j``, reference
pairs ``i != j``, all cross pairs. The reference-reference term does not change between cells
and is computed once, in blocks. Its resamples reweight the same kernel matrices with the
resample's counts, leaving out pairs of copies of one sample (a bootstrap's repeats, whose kernel
value would bias the estimate upward): the unbiased estimator on each resample.
"""

from __future__ import annotations

import numpy as np

from ldm_scaling.eval import fid

# Every resampling of the package draws from this seed: the same features give the
# same interval on every host and rerun.
BOOTSTRAP_SEED = 0
METHOD = "half"  # half | bootstrap: how resamples are drawn (see the module docstring)
_BLOCK = 2048  # reference rows per block of the KID reference-reference term


def resample_indices(n: int, num: int, seed: int = BOOTSTRAP_SEED, *,
                     method: str = METHOD) -> np.ndarray:
  """``num`` reproducible resamples of ``n`` items: ``half``: (num, n // 2) indices without
  replacement; ``bootstrap``: (num, n) with replacement."""
  rng = np.random.default_rng(seed)
  if method == "bootstrap":
    return rng.integers(0, n, size=(num, n))
  if method == "half":
    if n < 4:
      raise ValueError(f"half-samples need at least 4 samples, got {n}")
    return np.argsort(rng.random((num, n)), axis=1)[:, :n // 2]
  raise ValueError(f"unknown resampling method {method!r}: use 'half' or 'bootstrap'")


def ci95(values, *, scale: float = 1.0) -> float:
  """Half-width of the central 95 % percentile interval of resampled ``values``, times ``scale``
  (NaN if fewer than two are finite)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size < 2:
    return float("nan")
  lo, hi = np.percentile(values, [2.5, 97.5])
  return float((hi - lo) / 2 * scale)


def _scale(n: int, method: str) -> float:
  """The delete-d jackknife's variance factor r / (n - r) for subsets of r = n // 2 (1 for even
  n), as a factor of the half-width; the bootstrap needs none."""
  return float(np.sqrt((n // 2) / (n - n // 2))) if method == "half" else 1.0


def kid_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Binkowski et al.'s polynomial kernel ``(x . y / d + 1)^3`` of rows of x and y, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  k = x @ y.T
  k /= x.shape[1]
  k += 1.0
  return k * k * k  # ~10x faster than ** 3 (a pow call per element)


class Reference:
  """Reference statistics with their covariance square root precomputed (and, when the
  statistics carry the reference features, what KID needs of them)."""

  def __init__(self, stats: fid.FIDStats):
    self.stats = stats
    self.mu = np.asarray(stats.mu, np.float64)
    sigma = np.asarray(stats.sigma, np.float64)
    evals, evecs = np.linalg.eigh((sigma + sigma.T) / 2)
    self.sqrt_sigma = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    self.trace = float(np.trace(sigma))
    self.features = getattr(stats, "features", None)  # (m, d) float32, or None (an old cache)
    self._kid_rr: float | None = None

  @property
  def has_features(self) -> bool:
    return self.features is not None and len(self.features) >= 2

  def distance(self, features: np.ndarray) -> float:
    """FID of generated ``features`` (n, d) against the reference."""
    x = np.asarray(features, np.float64)
    n = x.shape[0]
    if n < 2:
      raise ValueError(f"FID needs at least 2 generated samples, got {n}")
    mu = x.mean(axis=0)
    xc = x - mu
    y = xc @ self.sqrt_sigma
    small = (y @ y.T) / (n - 1) if n <= x.shape[1] else (y.T @ y) / (n - 1)
    lam = np.linalg.eigvalsh((small + small.T) / 2)
    tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0, None))))
    tr_gen = float(np.sum(xc * xc) / (n - 1))
    diff = mu - self.mu
    return float(diff @ diff + tr_gen + self.trace - 2 * tr_covmean)

  def resampled_fid(self, features: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The FID of each resample ``features[indices[b]]`` (see the module docstring), (B,);
    resamples may be smaller than n (half-samples)."""
    x = np.asarray(features, np.float64)
    n, d = x.shape
    x0 = x - x.mean(axis=0)  # centred once: the sums below stay well conditioned
    mu_r0 = self.mu - x.mean(axis=0)
    y = x0 @ self.sqrt_sigma
    sq = np.einsum("ij,ij->i", x0, x0)
    gram = None
    out = np.empty(len(indices))
    for b, idx in enumerate(np.asarray(indices)):
      k = len(idx)  # the resample's size (n for the bootstrap; fewer for a subsample)
      w = np.bincount(idx, minlength=n).astype(np.float64)
      s = np.flatnonzero(w)
      ws = w[s]
      m0 = ws @ x0[s] / k
      diff = m0 - mu_r0
      tr_gen = (ws @ sq[s] - k * (m0 @ m0)) / (k - 1)
      if len(s) <= d:
        if gram is None:
          gram = y @ y.T
        g = gram[np.ix_(s, s)]
        a = g @ ws / k
        gc = g - a[:, None] - a[None, :] + (ws @ a) / k
        root = np.sqrt(ws)
        small = root[:, None] * gc * root[None, :] / (k - 1)
      else:
        ys = y[s] - ws @ y[s] / k
        small = (ys * ws[:, None]).T @ ys / (k - 1)
      lam = np.linalg.eigvalsh((small + small.T) / 2)
      tr_covmean = np.sum(np.sqrt(np.clip(lam, 0, None)))
      out[b] = diff @ diff + tr_gen + self.trace - 2 * tr_covmean
    return out

  # KID.

  def _reference_term(self) -> float:
    """Mean kernel value over pairs i != j of reference features (computed once, in blocks)."""
    if self._kid_rr is None:
      r = self.features
      m, total, diag = len(r), 0.0, 0.0
      for i in range(0, m, _BLOCK):
        k = kid_kernel(r[i:i + _BLOCK], r)
        total += float(k.sum())
        diag += float(np.trace(k[:, i:i + _BLOCK]))
      self._kid_rr = (total - diag) / (m * (m - 1))
    return self._kid_rr

  def _kid_parts(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Generated-generated kernel matrix (n, n) and each sample's mean kernel value against the
    reference features (n,)."""
    x = np.asarray(features, np.float64)
    if x.shape[0] < 2:
      raise ValueError(f"KID needs at least 2 generated samples, got {x.shape[0]}")
    cross = np.zeros(len(x))
    for i in range(0, len(self.features), _BLOCK):
      cross += kid_kernel(x, self.features[i:i + _BLOCK]).sum(axis=1)
    return kid_kernel(x, x), cross / len(self.features)

  def _kid_weighted(self, kgg, cross, w) -> float:
    n = w.sum()
    pairs = w @ kgg @ w - (w * w) @ np.diagonal(kgg)  # pairs of distinct samples
    return float(pairs / (n * n - w @ w) + self._reference_term() - 2 * (w @ cross) / n)

  def kid(self, features: np.ndarray) -> float:
    """Unbiased KID (squared MMD, polynomial kernel) of ``features`` against the reference
    features; NaN when the reference statistics carry no features."""
    if not self.has_features:
      return float("nan")
    kgg, cross = self._kid_parts(features)
    return self._kid_weighted(kgg, cross, np.ones(len(kgg)))

  def resampled_kid(self, features: np.ndarray, indices: np.ndarray, *,
                    parts=None) -> np.ndarray:
    """The KID of each resample ``features[indices[b]]`` (pairs of copies of one sample left
    out), (B,); NaNs without reference features."""
    if not self.has_features:
      return np.full(len(indices), np.nan)
    kgg, cross = parts or self._kid_parts(features)
    n = len(kgg)
    return np.array([self._kid_weighted(kgg, cross, np.bincount(i, minlength=n).astype(float))
                     for i in np.asarray(indices)])

  def uncertainty(self, features: np.ndarray, num: int, seed: int = BOOTSTRAP_SEED, *,
                  method: str = METHOD) -> dict[str, float]:
    """``fid_ci95``, ``kid``, ``kid_ci95`` of generated ``features``: 95 % half-widths from
    ``num`` resamples (``method``; 0: NaN); KID NaN without reference features."""
    nan = float("nan")
    out = dict(fid_ci95=nan, kid=nan, kid_ci95=nan)
    parts = self._kid_parts(features) if self.has_features else None
    if parts is not None:
      out["kid"] = self._kid_weighted(*parts, np.ones(len(parts[0])))
    if num > 0 and len(features) >= 4:
      idx = resample_indices(len(features), num, seed, method=method)
      scale = _scale(len(features), method)
      out["fid_ci95"] = ci95(self.resampled_fid(features, idx), scale=scale)
      if parts is not None:
        out["kid_ci95"] = ci95(self.resampled_kid(features, idx, parts=parts), scale=scale)
    return out
