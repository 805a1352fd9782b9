"""Many FIDs against one reference, fast and exact.

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
"""

from __future__ import annotations

import numpy as np

from ldm_scaling.eval import fid


class Reference:
  """Reference statistics with their covariance square root precomputed."""

  def __init__(self, stats: fid.FIDStats):
    self.stats = stats
    self.mu = np.asarray(stats.mu, np.float64)
    sigma = np.asarray(stats.sigma, np.float64)
    evals, evecs = np.linalg.eigh((sigma + sigma.T) / 2)
    self.sqrt_sigma = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    self.trace = float(np.trace(sigma))

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
