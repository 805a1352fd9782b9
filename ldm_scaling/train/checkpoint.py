"""Orbax checkpoints of a run: sharded train state + data-iterator state + metadata, per step.

Layout: ``<workdir>/checkpoints/<step>/{state,data,meta}``. Saves are asynchronous and atomic
(orbax writes to a temporary directory and renames it when complete), so a run killed mid-save
resumes from the last complete step. Retention keeps the last ``keep`` steps plus the best step by
the recorded metric (lower is better).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from etils import epath
import grain
import jax
from orbax.checkpoint import checkpoint_managers as cm
import orbax.checkpoint as ocp

from ldm_scaling import config as cfglib
from ldm_scaling.errors import UserError

log = logging.getLogger(__name__)

# The train state's layout, recorded in each checkpoint's meta. 2: one optimiser state (and EMA
# where kept) per network; 1 (no record): one optimiser state over the dict of networks.
STATE_LAYOUT = 2


def _grain_handler():
  return grain.checkpoint.CheckpointHandler()


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the items of a training run."""

  def __init__(self, workdir: str, *, keep: int, best_metric: str | None,
               async_save: bool = True, data: bool = True):
    self.directory = checkpoints_dir(workdir)
    self.best_metric = best_metric
    policies = [cm.LatestN(keep)]
    if best_metric:
      policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
                               keep_checkpoints_without_metrics=False))
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if data:
      handlers["data"] = _grain_handler()
    self.has_data = data
    # The trainer decides when to save (interval, preemption, end of run); orbax keeps what the
    # preservation policy says.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True on every host once the platform (TPU maintenance) announced a preemption."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> bool:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if self.has_data:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=True)
    if saved:
      log.info("checkpoint %d: saving (async) to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores onto ``abstract_state``'s shardings (which may be another mesh than the save's)
    and sets ``data_iter`` to the saved position."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if self.has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; raises if one of them failed."""
    self.manager.wait_until_finished()
    self.manager.check_for_errors()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying the target shardings, for restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# -------------------------------------------------------------------------------------------------
# Reading a run's weights (sampling, evaluation, distillation teachers): params or EMA only.


class RunNotFoundError(UserError, FileNotFoundError):
  """A workdir without a (complete) checkpoint."""


def absolute(path: str) -> str:
  """orbax needs absolute checkpoint paths: a local path made absolute; URLs (gs://) as given."""
  return path if "://" in path else os.path.abspath(path)


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(absolute(workdir), "checkpoints")


def available_steps(workdir: str) -> list[int]:
  """The run's complete checkpoint steps, ascending ([] without a checkpoints directory), listed
  read-only without restoring anything."""
  directory = checkpoints_dir(workdir)
  if not is_dir(directory):
    return []
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_run_config(workdir: str):
  """The config a run was trained with (``<workdir>/config.json``), validated and locked."""
  path = epath.Path(workdir) / "config.json"
  if not path.is_file():
    raise RunNotFoundError(f"{workdir!r} is not a training workdir (no config.json); train one "
                           f"with `ldm-scaling train --config ... --workdir {workdir}`")
  config = cfglib.with_defaults(json.loads(path.read_text())["config"])
  cfglib.check_schema(config)
  config.lock()
  return config


def load_weights(workdir: str, step: int | None = None, which: str = "ema",
                 sharding: jax.sharding.Sharding | None = None) -> tuple[int, Any]:
  """(step, trainable networks) of a run's checkpoint -- the EMA (default) or the raw params --
  without reading optimiser state. ``step=None`` takes the latest complete checkpoint."""
  if which not in ("ema", "params"):
    raise ValueError(f"which must be 'ema' or 'params', got {which!r}")
  directory = checkpoints_dir(workdir)
  if not is_dir(directory):
    raise RunNotFoundError(f"no checkpoints in {workdir!r}; train first with `ldm-scaling train "
                           f"--config ... --workdir {workdir}`")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    steps = list(manager.all_steps())
    if not steps:
      raise RunNotFoundError(f"no complete checkpoint in {directory!r}; the run has not saved yet "
                             f"(train.checkpoint_every) or the path is wrong")
    step = max(steps) if step is None else step
    if step not in steps:
      raise RunNotFoundError(f"no checkpoint for step {step} in {directory!r}; have {steps}")
    tree = manager.item_metadata(step)["state"]
    tree = dict(getattr(tree, "tree", tree))
    abstract = {which: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                    dict(tree)[which])}
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  return step, restored["state"][which]
