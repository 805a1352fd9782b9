"""TPU slice presets and the default mesh for a model size on them.

A slice is named by its accelerator type (``v4-32``, ``v5litepod-16``, ...). What the launcher
needs from it: chips (= JAX devices: v4 and v5p run one device per chip, their two TensorCores
fused as a megacore, which is why ``v4-32`` has 16 chips), hosts (= TPU VM workers = JAX
processes), the TPU software ("runtime") version to create it with, and HBM per chip for the
memory check behind :func:`default_mesh`. Sources: Cloud TPU docs, "TPU software versions" and
the v4/v5e/v5p/v6e system-architecture pages (v5e/v6e: 8 chips per host, v4/v5p: 4).
"""

from __future__ import annotations

import dataclasses
import math
import re

from ldm_scaling.errors import ConfigError
from ldm_scaling.models import cost

# Runtime (software) versions per generation, from the Cloud TPU docs.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
HBM_GIB_PER_CHIP = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
CHIPS_PER_HOST = {"v4": 4, "v5e": 8, "v5p": 4, "v6e": 8}
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}  # the number in "v4-32" counts cores
_PREFIX = {"v4": "v4", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}

# Training state per parameter: f32 params, EMA, Adam m and v (16 bytes, as DESIGN.md) plus the
# f32 gradient alive during the update.
STATE_BYTES_PER_PARAM = 20
# Share of HBM the state may take; the rest is for activations (remat for the largest widths).
STATE_HBM_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Topology:
  accelerator_type: str
  generation: str           # v4 | v5e | v5p | v6e
  chips: int                # = JAX devices
  hosts: int                # = TPU VM workers = JAX processes

  @property
  def devices_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def runtime_version(self) -> str:
    return RUNTIME_VERSIONS[self.generation]

  @property
  def hbm_gib_per_chip(self) -> float:
    return HBM_GIB_PER_CHIP[self.generation]

  @property
  def multi_host(self) -> bool:
    return self.hosts > 1


# The presets of docs/launch.md; any other "<generation>-<cores>" is derived the same way.
PRESET_NAMES = ("v4-8", "v4-32", "v5litepod-8", "v5litepod-16", "v5litepod-256", "v5p-8",
                "v5p-32", "v6e-8", "v6e-16")


def topology(accelerator_type: str) -> Topology:
  """The slice ``accelerator_type`` names, e.g. ``v4-32`` -> 16 chips on 4 hosts."""
  match = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", accelerator_type)
  if not match:
    raise ConfigError(f"unknown TPU accelerator type {accelerator_type!r}; use "
                      f"<v4|v5litepod|v5p|v6e>-<cores>, e.g. {', '.join(PRESET_NAMES)}")
  generation = _PREFIX[match.group(1)]
  cores = int(match.group(2))
  if cores % CORES_PER_CHIP[generation]:
    raise ConfigError(f"{accelerator_type}: {generation} counts {CORES_PER_CHIP[generation]} "
                      f"cores per chip; the number must be a multiple of it")
  chips = cores // CORES_PER_CHIP[generation]
  hosts = max(1, math.ceil(chips / CHIPS_PER_HOST[generation]))
  return Topology(accelerator_type, generation, chips, hosts)


def presets() -> list[Topology]:
  return [topology(name) for name in PRESET_NAMES]


def approx_params(width: int) -> float:
  """Parameters of the SD-2.x UNet at ``width``: Mei et al.'s Table 1 where it has the width,
  else the width-320 count scaled by width^2 (planning accuracy is enough here)."""
  if width in cost.PAPER_TABLE1:
    return float(cost.PAPER_TABLE1[width]["params"])
  return cost.PAPER_TABLE1[320]["params"] * (width / 320) ** 2


def default_mesh(topo: Topology, params: float) -> dict[str, int]:
  """``{"data": -1, "fsdp": k, "tensor": 1}``: the smallest FSDP degree ``k`` (a divisor of the
  chip count) at which the training state of ``params`` parameters fits the HBM share
  :data:`STATE_HBM_FRACTION`; the rest of the devices do data parallelism. Raises when even
  ``k = chips`` does not fit: the slice is too small for the model."""
  budget = STATE_HBM_FRACTION * topo.hbm_gib_per_chip * 2**30
  need = STATE_BYTES_PER_PARAM * params
  for k in range(1, topo.chips + 1):
    if topo.chips % k == 0 and need / k <= budget:
      return dict(data=-1, fsdp=k, tensor=1)
  raise ConfigError(
      f"{params / 1e9:.2f}B parameters need {need / 2**30:.0f} GiB of training state "
      f"({STATE_BYTES_PER_PARAM} B/param); {topo.accelerator_type} has {topo.chips} chips x "
      f"{topo.hbm_gib_per_chip:g} GiB, of which {STATE_HBM_FRACTION:.0%} is budgeted for state "
      f"({topo.chips * budget / 2**30:.0f} GiB): use a larger slice, or set --config.mesh.* "
      f"yourself (and --no-auto-mesh) if you know it fits")


def parse(name: str) -> Topology:
  """:func:`topology`, also accepting ``v5e-N`` for ``v5litepod-N`` (plans, estimates)."""
  return topology(re.sub(r"^v5e-", "v5litepod-", name))
