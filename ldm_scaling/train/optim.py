"""Optimiser, learning-rate schedule and EMA, built from the ``train`` config section (or from a
network's :func:`settings`: ``train.*`` with the network's own overrides)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_scaling.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")


def settings(train_cfg, overrides=None) -> ml_collections.ConfigDict:
  """A network's optimiser settings: the ``train`` section with ``overrides`` (lr, schedule,
  warmup_steps, end_lr_factor, b1, b2, eps, weight_decay, grad_clip, steps) applied."""
  cfg = ml_collections.ConfigDict(train_cfg.to_dict())
  cfg.update(dict(overrides or {}))
  validate(cfg)
  return cfg


def learning_rate(cfg) -> optax.Schedule:
  """Linear warmup over ``warmup_steps`` to ``lr``, then constant / cosine / linear decay to
  ``lr * end_lr_factor`` at ``steps``."""
  if cfg.schedule not in SCHEDULES:
    raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  warmup = min(cfg.warmup_steps, cfg.steps)
  decay_steps = max(cfg.steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_factor
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_factor)
  else:
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (``grad_clip <= 0`` disables it)."""
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def ema_update(ema, params, decay: float):
  """``ema <- decay * ema + (1 - decay) * params`` (f32 master copies, sharded like params)."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def validate(cfg) -> None:
  if cfg.schedule not in SCHEDULES:
    raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  if cfg.lr <= 0:
    raise ConfigError(f"train.lr must be > 0, got {cfg.lr}")
  if not 0.0 <= cfg.ema_decay < 1.0:
    raise ConfigError(f"train.ema_decay must be in [0, 1), got {cfg.ema_decay}")
  if cfg.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
  if cfg.grad_accum_steps < 1:
    raise ConfigError(f"train.grad_accum_steps must be >= 1, got {cfg.grad_accum_steps}")
