"""Classifier-free guidance with a per-sample scale, conditional + unconditional in one call.

``guided = out_u + w * (out_c - out_u)``, computed as ``out_c + (w - 1) * (out_c - out_u)`` so
that ``w == 1`` returns the conditional prediction bit for bit. ``w`` has shape (B,): one batch
may mix scales (a CFG sweep in one compiled program, guided distillation with a scale drawn per
example). The network runs once on a batch of 2B: ``[x, x]`` with ``[context, uncond_context]``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion.parametrisation import per_sample

# apply_fn(params, x (B,H,W,C), t (B,), context (B,L,D)) -> prediction (B,H,W,C)
ApplyFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def combine(out_cond: jax.Array, out_uncond: jax.Array, scale: jax.Array) -> jax.Array:
  """``out_u + w * (out_c - out_u)`` with ``w`` scalar or (B,); exact at ``w == 1``."""
  w = per_sample(scale, out_cond)
  return out_cond + (w - 1) * (out_cond - out_uncond)


def model_fn(apply_fn: ApplyFn, params, context: jax.Array, uncond_context: jax.Array | None,
             scale: jax.Array | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``fn(x, t) -> prediction`` for a scalar timestep ``t``; guided when ``scale`` is given."""
  if scale is None:
    return lambda x, t: apply_fn(params, x, jnp.full((x.shape[0],), t, jnp.float32), context)
  both = jnp.concatenate([context, uncond_context.astype(context.dtype)], axis=0)

  def fn(x, t):
    b = x.shape[0]
    out = apply_fn(params, jnp.concatenate([x, x], axis=0), jnp.full((2 * b,), t, jnp.float32),
                   both)
    return combine(out[:b], out[b:], scale)
  return fn


def check_scales(cfg_scale, batch: int) -> np.ndarray | None:
  """Normalises a guidance scale to a (B,) float32 array, or None when no sample is guided.

  Accepts None, a number, or an array of shape (B,); anything else is an error that says so."""
  if cfg_scale is None:
    return None
  w = np.asarray(cfg_scale, np.float32)
  if w.ndim == 0:
    w = np.full((batch,), w, np.float32)
  elif w.shape != (batch,):
    raise ConfigError(f"guidance scale has shape {w.shape} but the batch has {batch} samples; "
                      f"give one number, or one scale per sample (shape ({batch},))")
  if not np.all(np.isfinite(w)):
    raise ConfigError(f"guidance scales must be finite, got {w}")
  return None if np.all(w == 1.0) else w


def check_uncond(uncond_context, context_shape: tuple[int, ...]) -> jax.Array:
  """Broadcasts the unconditional context ((L, D), (1, L, D) or (B, L, D)) to the batch."""
  if uncond_context is None:
    raise ConfigError("classifier-free guidance (a scale != 1) needs uncond_context: the text "
                      "embedding of the empty prompt")
  u = jnp.asarray(uncond_context)
  if u.ndim == len(context_shape) - 1:
    u = u[None]
  if u.shape[1:] != tuple(context_shape[1:]) or u.shape[0] not in (1, context_shape[0]):
    raise ConfigError(f"uncond_context has shape {tuple(u.shape)}; it must match the context "
                      f"{tuple(context_shape)} (or be one (1, L, D) embedding for the batch)")
  return jnp.broadcast_to(u, context_shape)
