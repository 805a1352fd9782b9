"""The one trainer: sharded ``jax.jit`` training of any objective, with exact resume.

``train(config, workdir)`` is the whole job (the CLI's ``ldm-scaling train`` calls it):

1. validate the config against the devices before anything compiles;
2. build the mesh, the objective and the data pipeline (this host's share of each batch);
3. derive every sharding from the logical axis names (``ldm_scaling.sharding``) and create the
   state already sharded (``jax.jit(init, out_shardings=...)``), or restore it from the latest
   complete checkpoint together with the data-iterator position;
4. run the jitted, state-donating step; ``rng = fold_in(key(seed), step)`` inside it, so a resumed
   run draws exactly the numbers an uninterrupted one would;
5. guard: a step whose loss or gradient norm is not finite is not applied, and the run stops
   naming that step (the last checkpoint is the last good state); SIGTERM or a platform
   preemption notice saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
from typing import Any, Callable

import flax
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_scaling import config as cfglib
from ldm_scaling import files
from ldm_scaling import runtime
from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError
from ldm_scaling.train import checkpoint as ckpt_lib
from ldm_scaling.train import metrics as metrics_lib
from ldm_scaling.train import objectives
from ldm_scaling.train import optim
from ldm_scaling.train.state import TrainState

log = logging.getLogger(__name__)

# Sections whose change makes an existing workdir's checkpoints a different experiment.
_STRUCTURAL = ("model", "objective", "diffusion")
# Keys of structural sections that change how the same numbers are computed, not what is trained.
_HOW_NOT_WHAT = {"model": ("remat", "attn_query_chunk")}


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient; the state was not updated."""


@dataclasses.dataclass
class Result:
  step: int
  stopped: str            # "done" | "preempted"
  metrics: dict[str, float]


# -------------------------------------------------------------------------------------------------
# Validation before compiling.


def check_batch_layout(config, num_devices: int, process_count: int) -> dict[str, int]:
  """Mesh sizes for ``num_devices``; raises if the batch cannot be split over them."""
  sizes = sh.resolve_mesh_shape(config.mesh, num_devices)
  batch, accum = config.train.batch_size, config.train.grad_accum_steps
  shards = sizes["data"] * sizes["fsdp"]
  if batch % accum:
    raise ConfigError(f"train.batch_size={batch} is not divisible by "
                      f"train.grad_accum_steps={accum}")
  if (batch // accum) % shards:
    raise ConfigError(
        f"train.batch_size={batch} / grad_accum_steps={accum} = {batch // accum} examples per "
        f"micro-batch cannot be split over data x fsdp = {sizes['data']} x {sizes['fsdp']} = "
        f"{shards} devices; use a batch size that is a multiple of {shards * accum}")
  if batch % process_count:
    raise ConfigError(f"train.batch_size={batch} is not divisible by the {process_count} "
                      f"processes; each host loads batch_size / process_count examples")
  return sizes


def _check_workdir(workdir: str, config) -> None:
  """Refuses to resume a workdir created by a structurally different experiment."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  old = cfglib.with_defaults(json.loads(path.read_text())["config"])
  changed = [s for s in _STRUCTURAL
             if cfglib.section_changes(old, config, s, _HOW_NOT_WHAT.get(s, ()))]
  if changed:
    raise ConfigError(
        f"workdir {workdir!r} holds a run with different {', '.join(changed)} settings; resuming "
        f"it with this config would mix two experiments. Use a new --workdir (or restore the "
        f"old settings).")
  others = [s for s in config if s not in changed and cfglib.section_changes(old, config, s)]
  if others:
    log.warning("resuming %s with changed %s settings", workdir, ", ".join(others))


def _write_partitioning(workdir: str, abstract, shardings) -> None:
  """``partitioning.json``: every state leaf's mesh spec and bytes per device, and the totals
  (what to read first when a pod runs out of memory)."""
  if jax.process_index() != 0:
    return
  rows, total, per_device = {}, 0, 0
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    shard = sharding.shard_shape(leaf.shape)
    local = int(np.prod(shard)) * leaf.dtype.itemsize
    rows[jax.tree_util.keystr(path)] = dict(shape=list(leaf.shape), spec=str(sharding.spec),
                                            bytes=nbytes, bytes_per_device=local)
    total, per_device = total + nbytes, per_device + local
  _dump_json(epath.Path(workdir) / "partitioning.json",
             dict(total_bytes=total, bytes_per_device=per_device, leaves=rows))
  log.info("train state: %.2f GB total, %.2f GB per device", total / 1e9, per_device / 1e9)


def _write_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  _dump_json(epath.Path(workdir) / "config.json",
             dict(config=config.to_dict(), hash=cfglib.config_hash(config)))


def _dump_json(path: epath.Path, obj) -> None:
  """Writes via a temporary file and a rename (local or ``gs://``): other hosts that read the file
  while the primary writes it (``_check_workdir`` on a shared workdir) see the old or the new
  file, never half of one."""
  files.atomic_write_text(path, json.dumps(obj, indent=1, default=list))


# -------------------------------------------------------------------------------------------------
# The step.


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, step key): step ``s`` draws from ``fold_in(step key, s)``."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  return init_key, step_key


def make_train_step(objective, tx, config, lr_fn) -> Callable:
  accum = config.train.grad_accum_steps
  decay = config.train.ema_decay
  _, step_key = run_keys(config.train.seed)

  def loss_and_grads(params, frozen, ema, batch, rng):
    fn = jax.value_and_grad(objective.loss, has_aux=True)
    if accum == 1:
      (loss, aux), grads = fn(params, frozen, ema, batch, rng)
      return loss, aux, grads

    def micro(i, b):
      return jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:])[:, i],
                          b)

    def body(carry, i):
      loss_sum, aux_sum, grad_sum = carry
      (loss, aux), grads = fn(params, frozen, ema, micro(i, batch), jax.random.fold_in(rng, i))
      return (loss_sum + loss, jax.tree.map(jnp.add, aux_sum, aux),
              jax.tree.map(jnp.add, grad_sum, grads)), None

    (loss0, aux0), grads0 = fn(params, frozen, ema, micro(0, batch), jax.random.fold_in(rng, 0))
    (loss, aux, grads), _ = jax.lax.scan(body, (loss0, aux0, grads0), jnp.arange(1, accum))
    scale = 1.0 / accum
    return loss * scale, jax.tree.map(lambda a: a * scale, aux), jax.tree.map(
        lambda g: g * scale, grads)

  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(step_key, state.step)
    loss, aux, grads = loss_and_grads(state.params, frozen, state.ema, batch, rng)
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(step=state.step + 1, params=params,
                        ema=optim.ema_update(state.ema, params, decay), opt_state=opt_state)

    # NaN guard: a non-finite step leaves the state exactly as it was. A cond, not a per-leaf
    # jnp.where: the where reads every old optimizer moment twice, so XLA copies each donated
    # buffer before updating it in place (w128: 2,059 copies, the update 486 -> 276 ms).
    new = jax.lax.cond(finite, update, lambda state: state, state)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=lr_fn(state.step),
                   finite=finite.astype(jnp.float32))
    return new, metrics

  return train_step


# -------------------------------------------------------------------------------------------------
# The job.


class _StopFlag:
  """Set by SIGTERM; every process agrees on it before acting (multi-host safe)."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    local = self.event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


def _global_batch(local: dict[str, Any], spec: dict[str, Any], mesh) -> dict[str, jax.Array]:
  """This host's rows -> global arrays sharded over data x fsdp (only the entries the objective
  consumes; captions and other host-side fields stay behind)."""
  missing = sorted(set(spec) - set(local))
  if missing:
    raise KeyError(f"the data pipeline's batches lack {missing} (have {sorted(local)}); the "
                   f"objective needs {sorted(spec)}")
  return {k: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, len(spec[k].shape)),
                                                    np.asarray(local[k]))
          for k in spec}


def train(config: ml_collections.ConfigDict, workdir: str, *,
          make_data: Callable | None = None, max_steps: int | None = None) -> Result:
  """Trains ``config`` in ``workdir``, resuming from its latest complete checkpoint.

  ``make_data(config, split, *, batch_size, seed, process_index, process_count)`` returns a
  checkpointable grain iterator of host-local numpy batches (default: ``ldm_scaling.data``).
  ``max_steps`` stops early (tests); the schedule still follows ``train.steps``.
  """
  cfglib.check_schema(config)
  optim.validate(config.train)
  objectives.validate(config)  # the sections the objective's networks and data use
  num_devices, process_count = jax.device_count(), jax.process_count()
  check_batch_layout(config, num_devices, process_count)
  objective = objectives.build(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  _check_workdir(workdir, config)
  _write_config(workdir, config)

  mesh = sh.make_mesh(config.mesh)
  tcfg = config.train
  tx = optim.optimizer(tcfg)
  lr_fn = optim.learning_rate(tcfg)
  batch_spec = objective.batch_spec(tcfg.batch_size)
  flops_per_example = objective.train_flops_per_example()  # compiles a single-device forward
  frozen = objective.frozen()  # VAE, text encoder, teachers: loaded on the host, never saved

  def init_state(rng, frozen):
    params = objective.start_from(objective.init(rng, batch_spec), frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                      opt_state=tx.init(params))

  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES):
    frozen_sh = jax.tree.map(lambda _: sh.replicated(mesh), frozen)
    frozen = jax.device_put(frozen, frozen_sh)
    init_key, _ = run_keys(tcfg.seed)
    abstract = jax.eval_shape(init_state, init_key, frozen)
    state_sh = sh.tree_shardings(abstract, mesh)
    abstract = sh.unbox(abstract)
    _write_partitioning(workdir, abstract, state_sh)

    local_batch = tcfg.batch_size // process_count
    if make_data is None:
      from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top
      make_data = data_lib.make_pipeline
    data_iter = make_data(config, config.data.train_split, batch_size=local_batch, seed=tcfg.seed,
                          process_index=jax.process_index(), process_count=process_count)

    checkpointer = ckpt_lib.Checkpointer(
        workdir, keep=tcfg.keep_checkpoints,
        best_metric=tcfg.best_metric or None, async_save=tcfg.async_checkpointing)
    start = checkpointer.latest_step()
    if start is not None:
      state, _ = checkpointer.restore(
          start, ckpt_lib.abstract_with_shardings(abstract, state_sh), data_iter)
      log.info("resumed from step %d", start)
    else:
      start = 0
      state = runtime.run_once(lambda k, f: sh.unbox(init_state(k, f)), init_key, frozen,
                               out_shardings=state_sh)

    batch_sh = {k: sh.batch_sharding(mesh, len(v.shape)) for k, v in batch_spec.items()}
    step_fn = jax.jit(make_train_step(objective, tx, config, lr_fn),
                      in_shardings=(state_sh, batch_sh, frozen_sh),
                      out_shardings=(state_sh, sh.replicated(mesh)), donate_argnums=(0,))

    result = _loop(config, workdir, objective, state, step_fn, frozen, data_iter, checkpointer,
                   mesh, batch_spec, flops_per_example, start, max_steps)
  return result


def _loop(config, workdir, objective, state, step_fn, frozen, data_iter, checkpointer, mesh,
          batch_spec, flops_per_example, start, max_steps) -> Result:
  tcfg = config.train
  total = tcfg.steps
  end = total if max_steps is None else min(total, max_steps)
  is_main = jax.process_index() == 0
  writer = metrics_lib.make_writer(workdir, is_main)
  throughput = metrics_lib.Throughput(
      start_step=start, total_steps=total, batch_size=tcfg.batch_size,
      flops_per_example=flops_per_example, num_devices=jax.device_count(),
      peak_tflops=tcfg.peak_tflops_per_device)
  hooks = []
  if is_main:
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    hooks.append(periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                                 every_steps=tcfg.log_every, every_secs=None))
    if tcfg.profile_steps > 0:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=tcfg.profile_steps,
                                            first_profile=start + 5, every_secs=None))
  meta = dict(config_hash=cfglib.config_hash(config), objective=config.objective.name)
  window: list[dict[str, jax.Array]] = []
  step, stopped, last, previous = start, "done", {}, None
  multi_host = jax.process_count() > 1
  with _StopFlag() as stop:
    try:
      while step < end:
        batch = _global_batch(next(data_iter), batch_spec, mesh)
        state, metrics = step_fn(state, batch, frozen)
        # Checking the previous step's flag keeps the host one step ahead of the device.
        if previous is not None:
          _check_finite(previous, step, checkpointer)
        previous = metrics
        window.append(metrics)
        step += 1
        for hook in hooks:
          hook(step)
        if step % tcfg.log_every == 0 or step == end:
          _check_finite(previous, step, checkpointer)
          last = _summarise(window)
          window = []
          last.update(throughput.report(step))
          writer.write_scalars(step, last)
          if is_main:
            metrics_lib.console(metrics_lib.progress_line(step, total, last,
                                                          throughput.eta_seconds(step)))
        if tcfg.sample_every and step % tcfg.sample_every == 0 and not multi_host:
          _write_preview(objective, state, step, workdir, writer)
        check_stop = not multi_host or step % tcfg.log_every == 0
        preempted = (check_stop and stop.agreed()) or checkpointer.reached_preemption(step)
        if preempted or step == end or step % tcfg.checkpoint_every == 0:
          _check_finite(previous, step, checkpointer)  # never save a step that was skipped
          checkpointer.save(step, state, data_iter, meta, metrics=_ckpt_metrics(last))
        if preempted:
          stopped = "preempted"
          log.warning("stop requested at step %d: checkpoint saved, exiting", step)
          break
    finally:
      checkpointer.wait()
      checkpointer.close()
      writer.flush()
      writer.close()
  return Result(step=step, stopped=stopped, metrics=last)


def _write_preview(objective, state, step: int, workdir: str, writer) -> None:
  """``<workdir>/samples/step_<step>.png`` and a TensorBoard image of the objective's preview.
  (Single-process runs; on a pod, sample a checkpoint with ``ldm-scaling sample``.)"""
  preview = objective.preview(state.ema, step)
  if preview is None:
    return
  from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  generate.save_grid(path, preview["images"], preview["prompts"], [""], [preview["label"]])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("rb") as f:
    image = np.asarray(Image.open(f).convert("RGB"))
  writer.write_images(step, {"samples": image[None]})
  log.info("wrote %s", path)


def _check_finite(metrics, step: int, checkpointer) -> None:
  """``step`` is the 1-based number of the step that produced ``metrics``."""
  if bool(metrics["finite"]):
    return
  raise NonFiniteError(
      f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
      f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the run "
      f"stopped. The last checkpoint ({checkpointer.latest_step()}) holds good parameters: "
      f"lower train.lr, check the data, or tighten train.grad_clip.")


def _summarise(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(window)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0] if k != "finite"}


def _ckpt_metrics(last: dict[str, float]) -> dict[str, float] | None:
  return {"loss": last["loss"]} if "loss" in last else None
