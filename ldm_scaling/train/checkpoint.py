"""Orbax checkpoints of a run: sharded train state + data-iterator state + metadata, per step.

Layout: ``<workdir>/checkpoints/<step>/{state,data,meta}``. Saves are asynchronous and atomic
(orbax writes to a temporary directory and renames it when complete), so a run killed mid-save
resumes from the last complete step. Retention keeps the last ``keep`` steps plus the best step by
the recorded metric (lower is better).

A checkpoint resumes anywhere: the state is restored onto the shardings of the abstract state it
is given (the restoring run's mesh, whatever mesh, device or host count saved it; one CPU device
for sampling, :func:`load_weights`), and the data position is *not* read back. The input pipeline
makes the examples of global step ``s`` a function of ``s`` alone, the same for any number of
processes (``data/pipeline.py``), so the trainer sets every process's iterator from the restored
step. The ``data`` item -- grain's ``process_<i>-of-<n>.json``, one per saving process -- is still
written: it records where each process was (``{"next_index": s}``) for inspection, and restoring
parses one of those files as a check (a damaged file is damage, like any other), but no restore
needs the file of its own process index and count. Requiring it would make a checkpoint of ``n``
hosts unreadable on ``m != n`` hosts (grain's handler looks up ``process_<i>-of-<m>.json``) --
exactly the resume this layout exists for; checkpoints written before it resume the same way.

A checkpoint that is listed but cannot be read (a truncated or damaged file, an empty step
directory: on gcsfuse/NFS the rename that marks a step complete is not atomic) does not block a
run: :meth:`Checkpointer.restore_newest_readable` names it, moves it aside to
``<step>.corrupt-<time>`` and goes on with the next older step, every process agreeing. A failed
asynchronous save is reported as one :class:`CheckpointWriteError` line naming step and directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
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


class CheckpointWriteError(UserError, OSError):
  """An (asynchronous) checkpoint save failed: disk full, permissions, a vanished bucket."""


class UnreadableCheckpointError(UserError):
  """A checkpoint step that exists but cannot be restored."""


class IncompatibleCheckpointError(UserError):
  """A readable checkpoint of another model (its arrays have other shapes): not damage."""


# orbax / tensorstore's words for an array stored with another shape than the one restored.
_OTHER_SHAPE = "not compatible with the stored shape"


def reason(error: BaseException, limit: int = 300) -> str:
  """One line of an exception (tensorstore's run to dozens of lines): its innermost cause's
  type and first line."""
  while error.__cause__ is not None and not str(error).strip():
    error = error.__cause__
  text = (str(error).strip().splitlines() or [""])[0]
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _all_processes(ok: bool) -> bool:
  """True when ``ok`` holds on every process (one collective; trivially local on one)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _warn(line: str) -> None:
  """A warning the user must see (the console, not only the log)."""
  log.info("%s", line)
  print(line, file=sys.stderr, flush=True)


def _move_aside(directory: str, step: int) -> str:
  """``<directory>/<step>`` -> ``<step>.corrupt-<UTC time>`` (orbax lists integer names only, so
  the step is no longer seen and nothing is deleted); where a rename is impossible (object
  stores cannot rename directories) the step is deleted instead, which is said."""
  src = epath.Path(directory) / str(step)
  dst = epath.Path(directory) / f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
  try:
    src.rename(dst)
    return f"moved aside to {dst}"
  except Exception as e:  # pylint: disable=broad-except
    try:
      src.rmtree()
      return f"deleted (it could not be moved aside: {reason(e)})"
    except Exception as e2:  # pylint: disable=broad-except
      return f"left in place (it could not be moved or deleted: {reason(e2)})"


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
    self._saving: int | None = None  # the step whose (asynchronous) save may still be running

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
    if self._saving is not None:
      self.wait()  # orbax waits for the previous save anyway: its failure is named as its own
    self._saving = step
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if saved:
      log.info("checkpoint %d: saving (async) to %s", step, self.directory)
    return saved

  def _write_error(self, step: int, error: BaseException) -> CheckpointWriteError:
    latest = [s for s in self.manager.all_steps() if s != step]
    return CheckpointWriteError(
        f"checkpoint {step} could not be written to {self.directory}: {reason(error)}. The run "
        f"stopped; the newest complete checkpoint is "
        f"{max(latest) if latest else 'none'}. Free space (or fix access) and run the same "
        f"command again to resume.")

  def check(self) -> None:
    """Raises :class:`CheckpointWriteError` if an asynchronous save has failed (cheap: called at
    every log interval, so a full disk stops the run within one interval)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._saving, e) from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto ``abstract_state``'s shardings (which may be another mesh, device count or
    process count than the save's). The data iterator is not touched: its position is a function
    of the step (module docstring); the saved iterator state is only checked to be readable."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    self.saved_data_state(step)
    return restored["state"], restored["meta"]

  def saved_data_state(self, step: int) -> Any:
    """The data-iterator state that one saving process recorded at ``step`` (``None`` when the
    checkpoint has no data item): that of this process's index modulo the saving processes'
    count, so with as many processes as the save every file is read by one of them. Raises when
    the file is not JSON (a damaged checkpoint)."""
    directory = epath.Path(self.directory) / str(step) / "data"
    if not directory.is_dir():
      return None
    saved = sorted(directory.glob("process_*-of-*.json"),
                   key=lambda p: int(p.name.split("_")[1].split("-")[0]))
    if not saved:
      return None
    return json.loads(saved[jax.process_index() % len(saved)].read_text())

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_newest_readable(self, restore: Callable[[int], Any]) -> tuple[int | None, Any]:
    """``(step, restore(step))`` of the newest step that every process can restore, or
    ``(None, None)`` if there is no checkpoint. Each unreadable newer step is named in a warning
    and moved aside (process 0, after all processes have tried it). Raises when steps exist but
    none is readable (they were all moved aside: running again starts from step 0).

    ``restore`` may raise a :class:`UserError` (e.g. an incompatible layout): that is not damage
    and propagates."""
    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out, why = restore(step), None
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if _OTHER_SHAPE in str(e):  # the same on every process: all raise, nothing is moved
          raise IncompatibleCheckpointError(
              f"checkpoint {step} in {self.directory} holds another model's arrays ({reason(e)}):"
              f" this workdir has a run of a different model (config.json missing or replaced?)."
              f" Use a new --workdir, or the settings that run was trained with.") from e
        out, why = None, reason(e)
      if _all_processes(why is None):
        if bad:
          self.manager.reload()
        return step, out
      if jax.process_index() == 0:
        fate = _move_aside(self.directory, step)
        _warn(f"checkpoint {step} in {self.directory} is unreadable"
              f"{': ' + why if why else ' on another process (see its log)'}; {fate}; trying "
              f"the previous step")
      elif why:
        _warn(f"checkpoint {step} in {self.directory} is unreadable on process "
              f"{jax.process_index()}: {why}")
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"ldm_scaling_aside_{step}")
      bad.append(step)
    self.manager.reload()
    if bad:
      raise UnreadableCheckpointError(
          f"no readable checkpoint in {self.directory}: steps {bad} are damaged (moved aside as "
          f"<step>.corrupt-*). Run the same command again to start from step 0, or put back a "
          f"good copy of a step.")
    return None, None

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; raises :class:`CheckpointWriteError` if one
    of them failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._saving, e) from e
    self.check()

  def close(self) -> None:
    self.manager.close()


def set_data_position(data_iter: Any, batches: int) -> None:
  """Sets a fresh grain iterator to yield its batch ``batches`` next, reading no data to get there.

  ``grain.experimental.set_next_index`` where grain supports it (``ds.to_iter_dataset()``); the
  worker-process iterator of ``mp_prefetch`` (``data.workers > 0``) interleaves one slice of the
  batches per worker, round robin, and grain does not set its index, so its state is written as
  grain records it: worker ``w`` of ``W`` has yielded ``ceil((batches - w) / W)`` batches of its
  slice, and the round continues at worker ``batches % W``."""
  try:
    grain.experimental.set_next_index(data_iter, batches)
    return
  except NotImplementedError:
    pass
  except AttributeError as e:
    raise TypeError(f"the data iterator ({type(data_iter).__name__}) cannot be set to a position "
                    f"({reason(e)}); make_data must return the iterator of a grain MapDataset "
                    f"(ds.to_iter_dataset(), optionally .mp_prefetch())") from e
  state = data_iter.get_state()
  workers = state.get("iterators_in_use_states") if isinstance(state, dict) else None
  fresh = (workers and state.get("next_index_in_cycle") == 0
           and not any(state.get("exhausted", [1])) and not state.get("future_states")
           and all(isinstance(w, dict) and w.get("next_index") == 0 for w in workers))
  if not fresh:
    raise TypeError(f"cannot set the position of a {type(data_iter).__name__} in state {state}; "
                    f"make_data must return a fresh iterator of a grain MapDataset "
                    f"(ds.to_iter_dataset(), optionally .mp_prefetch())")
  n = len(workers)
  data_iter.set_state(dict(
      state, next_index_in_cycle=batches % n,
      iterators_in_use_states=[dict(w, next_index=(batches - i + n - 1) // n)
                               for i, w in enumerate(workers)]))


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
    steps = sorted(manager.all_steps())
    if not steps:
      raise RunNotFoundError(f"no complete checkpoint in {directory!r}; the run has not saved yet "
                             f"(train.checkpoint_every) or the path is wrong")
    if step is not None and step not in steps:
      raise RunNotFoundError(f"no checkpoint for step {step} in {directory!r}; have {steps}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for candidate in ([step] if step is not None else steps[::-1]):
      try:
        return candidate, _restore_weights(manager, candidate, which, sharding)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise UnreadableCheckpointError(
              f"checkpoint {step} in {directory} is unreadable: {reason(e)}; pick another step "
              f"(have {steps})") from e
        _warn(f"checkpoint {candidate} in {directory} is unreadable: {reason(e)}; using the "
              f"previous step")
    raise UnreadableCheckpointError(f"no readable checkpoint in {directory}: steps {steps} are "
                                    f"all damaged")
  finally:
    manager.close()


def _restore_weights(manager, step: int, which: str, sharding) -> Any:
  tree = manager.item_metadata(step)["state"]
  tree = dict(getattr(tree, "tree", tree))
  if which not in tree:
    raise RunNotFoundError(f"checkpoint {step} in {manager.directory} has no {which!r} weights "
                           f"(it has {sorted(tree)}); ask for which='params'")
  abstract = {which: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[which])}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), abstract)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=restore_args, partial_restore=True)))
  return restored["state"][which]
