"""A whole experiment's config: the schema (``ldm_scaling.config``) plus every stage's checks.

This is the one place where the section checks are composed. It sits above the stages (it imports
them; none of them imports it), so ``config.py`` stays a schema that imports no stage::

    config = experiment.load("configs/t2i.py:width=128", ["train.steps=10"])
    experiment.validate(config)          # a config built or edited in code

Both raise :class:`ldm_scaling.errors.ConfigError` naming the first bad key, before anything
is compiled.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from ldm_scaling import config as cfglib
from ldm_scaling.eval import grid
from ldm_scaling.train import objectives
from ldm_scaling.train import optim


def validate(config: ml_collections.ConfigDict) -> None:
  """Schema first (unknown keys, types), then each stage's checks of its sections: the
  objective's (which checks the sections its networks and data use, see
  ``ldm_scaling.train.objectives``), the optimiser's and the eval grid's."""
  cfglib.check_schema(config)
  optim.validate(config.train)
  objectives.validate(config)
  grid.validate(config)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Reads ``path.py[:arg]`` with overrides (:func:`ldm_scaling.config.read`) and validates it;
  the result is locked."""
  config = cfglib.read(spec, overrides)
  validate(config)
  return config
