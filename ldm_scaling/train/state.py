"""The training state: everything an exact resume needs except the data iterator."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """``params`` and ``ema`` are dicts of trainable networks by name (e.g. ``{"unet": ...}``).

  Randomness is ``fold_in(key(train.seed), step)`` inside the step, so no key is stored; frozen
  networks (VAE, text encoder, teachers) are not part of the state and are never checkpointed.
  """
  step: jax.Array
  params: Any
  ema: Any
  opt_state: Any
