"""What the network predicts, and exact conversions between the parametrisations.

With ``x = alpha * x0 + sigma * eps`` (any schedule, see ``schedules``):

=========  ==============================  =========================================
name       the network predicts            x0 from the prediction ``p``
=========  ==============================  =========================================
``eps``    the noise ``eps``               ``(x - sigma * p) / alpha``
``v``      ``alpha * eps - sigma * x0``    ``(alpha * x - sigma * p) / (alpha^2 + sigma^2)``
``x0``     the clean sample                ``p``
``flow``   ``eps - x0`` (rectified flow)   ``(x - sigma * p) / (alpha + sigma)``
=========  ==============================  =========================================

``v`` is Salimans & Ho's velocity (``alpha^2 + sigma^2 = 1`` on variance-preserving schedules);
``flow`` is the flow-matching velocity ``d x / d sigma`` of the rectified-flow path
(``alpha + sigma = 1`` there). Every map is affine in ``p`` given ``x``, so classifier-free
guidance on the raw prediction equals guidance on ``x0`` or ``eps``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_scaling.errors import ConfigError

PREDICTIONS = ("eps", "v", "x0", "flow")


def check(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ConfigError(f"unknown diffusion.prediction {prediction!r}; available: "
                      f"{', '.join(PREDICTIONS)}")


def per_sample(a, x):
  """Broadcasts a scalar or per-sample (B,) coefficient against x of shape (B, ...)."""
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def to_x0_eps(prediction: str, out: jax.Array, x: jax.Array, alpha, sigma):
  """(x0, eps) implied by the network output ``out`` at the noisy sample ``x``."""
  a, s = per_sample(alpha, x), per_sample(sigma, x)
  if prediction == "eps":
    return (x - s * out) / a, out
  if prediction == "x0":
    return out, (x - a * out) / s
  if prediction == "v":
    norm = a * a + s * s
    return (a * x - s * out) / norm, (s * x + a * out) / norm
  if prediction == "flow":
    norm = a + s
    return (x - s * out) / norm, (x + a * out) / norm
  check(prediction)
  raise AssertionError(prediction)


def target(prediction: str, x0: jax.Array, eps: jax.Array, alpha, sigma) -> jax.Array:
  """The training target of a parametrisation (what the network should output)."""
  a, s = per_sample(alpha, x0), per_sample(sigma, x0)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return a * eps - s * x0
  if prediction == "flow":
    return eps - x0
  check(prediction)
  raise AssertionError(prediction)


def convert(prediction: str, out: jax.Array, x: jax.Array, alpha, sigma, to: str) -> jax.Array:
  """The same prediction in another parametrisation (e.g. a teacher's ``eps`` as ``v``)."""
  x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
  return target(to, x0, eps, alpha, sigma)


def velocity(prediction: str, out: jax.Array, x: jax.Array, alpha, sigma) -> jax.Array:
  """The rectified-flow velocity ``eps - x0`` (exactly ``out`` when the network predicts it)."""
  if prediction == "flow":
    return out
  x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
  return eps - x0


def x0_gain(prediction: str, alpha, sigma):
  """``|d x0 / d p|``: an error ``e`` in the prediction is an error ``x0_gain * e`` in x0.

  Used by loss weightings that are defined on the x0 error (min-SNR-gamma)."""
  if prediction == "eps":
    return sigma / alpha
  if prediction == "x0":
    return jnp.ones_like(jnp.asarray(alpha, jnp.float32))
  if prediction == "v":
    return sigma / (alpha * alpha + sigma * sigma)
  if prediction == "flow":
    return sigma / (alpha + sigma)
  check(prediction)
  raise AssertionError(prediction)
