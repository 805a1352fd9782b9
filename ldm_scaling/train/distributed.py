"""Multi-host start-up: ``jax.distributed.initialize`` auto-detected on TPU VMs, explicit
coordinator arguments (or ``LDM_SCALING_COORDINATOR`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID``)
elsewhere, nothing for a single process."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_initialized = False


def on_tpu_vm() -> bool:
  """GKE sets the TPU_* variables; a plain Cloud TPU VM has none of them but shows its chips on
  the PCI bus, which JAX's own check reads (Google's vendor id and a TPU device id, so a GCE VM's
  gVNIC does not count). There ``jax.distributed.initialize()`` finds its peers through the
  metadata server."""
  if (os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID")
      or os.environ.get("TPU_ACCELERATOR_TYPE")):
    return True
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):  # a private module: absent in another jax
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the multi-process job if there is one. Safe to call more than once."""
  global _initialized
  if _initialized:
    return
  coordinator = coordinator or os.environ.get("LDM_SCALING_COORDINATOR")
  if num_processes is None and os.environ.get("LDM_SCALING_NUM_PROCESSES"):
    num_processes = int(os.environ["LDM_SCALING_NUM_PROCESSES"])
  if process_id is None and os.environ.get("LDM_SCALING_PROCESS_ID"):
    process_id = int(os.environ["LDM_SCALING_PROCESS_ID"])
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("multi-process run: give all of --coordinator-address, --num-processes "
                       "and --process-id (or none of them on a TPU VM, where they are detected)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif on_tpu_vm():
    jax.distributed.initialize()
  else:
    return
  _initialized = True
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
