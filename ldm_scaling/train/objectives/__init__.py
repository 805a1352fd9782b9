"""Training objectives, chosen by ``config.objective.name``.

An objective supplies what differs between denoising training and distillation; the trainer owns
the loop, sharding, optimiser, EMA, checkpoints, metrics and guards. The contract
(:class:`Objective`):

* ``batch_spec(batch_size)``: the ``jax.ShapeDtypeStruct`` of each batch entry it consumes;
* ``init(rng, batch)``: its trainable networks, a dict name -> params (boxed with logical axis
  names); traced under ``jax.eval_shape`` / ``jax.jit``, so it must be pure;
* ``frozen()``: networks it uses but does not train (loaded from disk, host side; never saved);
* ``start_from(params, frozen)`` (optional): the initial values of ``params`` given the frozen
  networks (a distillation student starts as its teacher); traced like ``init``; default: as
  initialised;
* ``loss(params, frozen, ema, batch, rng) -> (loss, metrics)``: pure; ``ema`` is the trainer's
  EMA of ``params`` (a consistency-distillation target, for instance);
* ``train_flops_per_example()``: FLOPs of one example's forward+backward, from the cost model, for
  MFU reporting;
* ``preview(ema, step)`` (optional): images showing the model's progress (uint8 grid), written by
  the trainer every ``train.sample_every`` steps; ``None`` when the objective cannot draw.

Adding an objective = one module + one entry in ``OBJECTIVES``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from ldm_scaling.errors import ConfigError


class Objective(abc.ABC):
  """Base class; see the module docstring for the contract."""

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, Any]:
    ...

  @abc.abstractmethod
  def init(self, rng, batch) -> dict[str, Any]:
    ...

  def frozen(self) -> dict[str, Any]:
    return {}

  def start_from(self, params, frozen):
    del frozen
    return params

  @abc.abstractmethod
  def loss(self, params, frozen, ema, batch, rng):
    ...

  def train_flops_per_example(self) -> float:
    return 0.0

  def preview(self, ema, step: int):
    del ema, step
    return None


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register(name: str):
  def wrap(cls):
    OBJECTIVES[name] = cls
    return cls
  return wrap


def validate(config) -> None:
  name = config.objective.name
  if name not in OBJECTIVES:
    raise ConfigError(f"unknown objective.name {name!r}; available: "
                      f"{', '.join(sorted(OBJECTIVES)) or 'none'}")
  check = getattr(OBJECTIVES[name], "validate", None)
  if check is not None:
    check(config)


def build(config) -> Objective:
  validate(config)
  return OBJECTIVES[config.objective.name](config)


# Registrations (each module adds its entry to OBJECTIVES).
from ldm_scaling.train.objectives import denoising  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.train.objectives import consistency  # pylint: disable=g-import-not-at-top,wrong-import-position
