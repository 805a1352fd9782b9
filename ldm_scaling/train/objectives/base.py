"""The objective contract: networks + phases, declared; losses, pure.

The trainer owns the loop, sharding, optimisers, EMAs, checkpoints, metrics and guards for every
network it trains. An :class:`Objective` declares

* its trainable **networks** (:meth:`Objective.networks`): name -> :class:`Network` (optimiser
  settings over ``train.*``, EMA or not, start-from a frozen network, a post-update projection),
  and their initial values (:meth:`Objective.init`, pure, boxed with logical axis names);
* its **frozen** networks (:meth:`Objective.frozen`): name -> :class:`Frozen` (a host object the
  loss calls, and its parameters), loaded once, sharded by the same logical-axis rules as the
  trainable ones and never saved;
* its **phases** (:meth:`Objective.phases`): :class:`Phase` (name, the networks it updates, its
  loss, how many consecutive steps per cycle, an optional per-step static choice). Which phase
  runs at step ``s`` (and its choice) is :func:`phase_at`, a pure function of ``s``, so a resumed
  run continues exactly;
* the batches it consumes (:meth:`Objective.batch_spec`, :meth:`Objective.make_data`), the network
  evaluation samples from (:attr:`Objective.sample_network`), its FLOPs per example (MFU) and an
  optional preview.

Losses are pure: ``loss(params, frozen, ema, batch, rng) -> (loss, metrics)`` where ``params`` holds
every trainable network (those the phase does not update are constants), ``frozen`` the
:class:`Frozen` networks with their parameters, ``ema`` the EMAs. An objective holds no state set
by call order: everything a loss needs arrives in its arguments.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Hashable, Mapping, NamedTuple

from ldm_scaling import data
from ldm_scaling.errors import ConfigError

# Optimiser keys of the ``train`` section a network may override (ldm_scaling.train.optim).
OPTIMIZER_KEYS = ("lr", "schedule", "warmup_steps", "end_lr_factor", "b1", "b2", "eps",
                  "weight_decay", "grad_clip", "steps")


@dataclasses.dataclass(frozen=True)
class Network:
  """How one trainable network is trained.

  ``optimizer``: overrides of ``train.*`` optimiser keys (:data:`OPTIMIZER_KEYS`); ``steps``
  there is the length of the learning-rate schedule, counted in this network's own updates.
  ``ema``: keep an EMA (decay ``ema_decay``, default ``train.ema_decay``). ``start_from``: the
  name of a frozen network whose values this one starts from (a student starts as its teacher).
  ``post_update``: a pure projection applied after each update (e.g. a clamp)."""
  optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  ema: bool = True
  ema_decay: float | None = None
  start_from: str | None = None
  post_update: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Phase:
  """A kind of training step: updates ``updates`` with the gradient of ``loss``.

  Phases run in a cycle, each for ``every`` consecutive steps. ``choice``, when given, is a pure
  function of the step returning a hashable static value passed to ``loss`` as the keyword
  ``choice`` (e.g. a resolution index); one program is compiled per (phase, choice)."""
  name: str
  updates: tuple[str, ...]
  loss: Callable[..., Any]
  every: int = 1
  choice: Callable[[int], Hashable] | None = None


class Frozen(NamedTuple):
  """A frozen network: ``module`` is what the loss calls (a text encoder, a VAE, a flax module;
  never traced as data), ``params`` its parameters (may carry logical-axis boxes, which decide how
  the trainer shards them; unannotated leaves follow ``sharding.frozen_shardings``)."""
  module: Any
  params: Any


class Objective(abc.ABC):
  """Base class; see the module docstring."""

  # Config sections whose change makes an existing workdir's checkpoints another experiment.
  structural: tuple[str, ...] = ("model", "objective", "diffusion")
  # Keys of those sections that change how the same numbers are computed, not what is trained.
  how_not_what: Mapping[str, tuple[str, ...]] = {
      "model": ("remat", "attn_query_chunk", "attn_kernel")}
  # The trainable network evaluation and previews sample from (None: not a generator).
  sample_network: str | None = None

  def __init__(self, config):
    self.config = config

  @staticmethod
  def validate(config) -> None:
    """Checks the config sections the objective uses (raise ConfigError); no loading."""
    del config

  @abc.abstractmethod
  def networks(self) -> dict[str, Network]:
    ...

  @abc.abstractmethod
  def init(self, rng) -> dict[str, Any]:
    """Initial parameters of every trainable network (boxed); pure, traced under jit."""

  def frozen(self) -> dict[str, Frozen]:
    return {}

  @abc.abstractmethod
  def phases(self) -> tuple[Phase, ...]:
    ...

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` of every batch entry the losses consume."""

  def make_data(self, config, split: str, *, batch_size: int, seed: int, process_index: int,
                process_count: int):
    """A checkpointable iterator of this host's batches (default: the config's data pipeline)."""
    return data.make_pipeline(config, split, batch_size=batch_size, seed=seed,
                              process_index=process_index, process_count=process_count)

  def train_flops_per_example(self, phase: str) -> float:
    """FLOPs of one example's step in ``phase`` (for MFU); 0 when not measured."""
    del phase
    return 0.0

  def preview(self, weights: dict[str, Any], frozen: dict[str, Frozen], step: int):
    """Images showing progress (``dict(images, prompts, label)``) from the sampling weights (the
    EMA where kept), or None."""
    del weights, frozen, step
    return None


# -------------------------------------------------------------------------------------------------
# The schedule: which phase runs at a step (pure functions of the step).


def phase_at(phases: tuple[Phase, ...], step: int) -> tuple[Phase, Hashable]:
  """(phase, choice) of step ``step`` (0-based): phases cycle, each ``every`` steps in a row."""
  cycle = sum(p.every for p in phases)
  k = step % cycle
  for p in phases:
    if k < p.every:
      return p, (p.choice(step) if p.choice is not None else None)
    k -= p.every
  raise AssertionError("unreachable")


def updates_before(phases: tuple[Phase, ...], network: str, step: int) -> int:
  """How many of the steps ``0 .. step - 1`` update ``network`` (its optimiser's count)."""
  cycle = sum(p.every for p in phases)
  per_cycle = sum(p.every for p in phases if network in p.updates)
  full, rest = divmod(step, cycle)
  count, k = full * per_cycle, 0
  for p in phases:
    n = min(p.every, max(0, rest - k))
    count += n if network in p.updates else 0
    k += p.every
  return count


def check_declaration(networks: Mapping[str, Network], phases: tuple[Phase, ...],
                      frozen_names=None) -> None:
  """Raises ValueError for a malformed objective (a programming error, not a user error)."""
  if not phases:
    raise ValueError("an objective needs at least one phase")
  names = [p.name for p in phases]
  if len(set(names)) != len(names):
    raise ValueError(f"phase names repeat: {names}")
  for p in phases:
    if p.every < 1:
      raise ValueError(f"phase {p.name!r}: every must be >= 1, got {p.every}")
    unknown = sorted(set(p.updates) - set(networks))
    if not p.updates or unknown:
      raise ValueError(f"phase {p.name!r} updates {p.updates}; networks are {sorted(networks)}")
  for name, net in networks.items():
    bad = sorted(set(net.optimizer) - set(OPTIMIZER_KEYS))
    if bad:
      raise ValueError(f"network {name!r}: unknown optimizer keys {bad}")
    if frozen_names is not None and net.start_from and net.start_from not in frozen_names:
      raise ValueError(f"network {name!r} starts from {net.start_from!r}, which is not a frozen "
                       f"network ({sorted(frozen_names)})")


# -------------------------------------------------------------------------------------------------
# The registry.

OBJECTIVES: dict[str, type[Objective]] = {}


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
  OBJECTIVES[name].validate(config)


def build(config) -> Objective:
  validate(config)
  return OBJECTIVES[config.objective.name](config)
