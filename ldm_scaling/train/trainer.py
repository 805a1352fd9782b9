"""The one trainer: sharded ``jax.jit`` training of any objective's networks, with exact resume.

``train(config, workdir)`` is the whole job (``ldm-scaling train``, ``train-vae``, ``train-clip`` and
the study call it):

1. validate the config against the devices before anything compiles;
2. build the mesh, the objective (its trainable networks, frozen networks and phases) and the data
   pipeline (this host's share of each batch);
3. derive every sharding from the logical axis names (``ldm_scaling.sharding``), frozen networks
   included, and create the state already sharded (``jax.jit(init, out_shardings=...)``), or
   restore it from the latest readable checkpoint onto this run's shardings (any mesh, device or
   host count may have written it) and set the data iterator to that step's batch (the global
   batch of a step is a function of the step alone, ``data/pipeline.py``);
4. run, at each step, the jitted, state-donating program of the phase the objective schedules for
   that step (:func:`objectives.phase_at`); it updates that phase's networks only (their
   optimiser states and EMAs) and leaves every other network bit-identical;
   ``rng = fold_in(key(seed), step)`` inside it, so a resumed run draws exactly the numbers an
   uninterrupted one would;
5. guard: a step whose loss or gradient norm is not finite is not applied, and the run stops
   naming that step (the last checkpoint is the last good state); SIGTERM or a platform
   preemption notice saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_scaling import config as cfglib
from ldm_scaling import files, runtime
from ldm_scaling import sharding as sh
from ldm_scaling.diffusion import generate
from ldm_scaling.errors import ConfigError
from ldm_scaling.train import checkpoint as ckpt_lib
from ldm_scaling.train import metrics as metrics_lib
from ldm_scaling.train import objectives, optim
from ldm_scaling.train.state import TrainState

log = logging.getLogger(__name__)


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


# (key, smallest value, what it counts): every cadence and count the loop divides by or keeps.
_COUNTS = (("steps", 1, "training steps"),
           ("batch_size", 1, "examples per step"),
           ("log_every", 1, "steps between metric lines"),
           ("checkpoint_every", 1, "steps between checkpoints (the last step and a preemption "
                                   "always save; to save only at the end set it to train.steps)"),
           ("keep_checkpoints", 1, "checkpoints kept (0 would keep none)"),
           ("sample_every", 0, "steps between preview grids (0: none)"),
           ("profile_steps", 0, "steps profiled (0: none)"),
           ("sample_steps", 1, "sampler steps of the preview grid"))


def check_cadence(train_cfg) -> None:
  """Every count/cadence of the ``train`` section is an integer in range (checked before anything
  compiles or is written: ``checkpoint_every=0`` used to divide by zero after compiling, and
  ``keep_checkpoints=0`` to keep no checkpoint at all)."""
  for key, low, what in _COUNTS:
    value = train_cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ConfigError(f"train.{key} must be an integer >= {low} ({what}), got {value!r}; set "
                        f"--config.train.{key}=N")


def _check_workdir(workdir: str, config, objective) -> None:
  """Refuses to resume a workdir created by a structurally different experiment."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  old = cfglib.with_defaults(json.loads(path.read_text())["config"])
  changed = [s for s in objective.structural
             if cfglib.section_changes(old, config, s, objective.how_not_what.get(s, ()))]
  if changed:
    raise ConfigError(
        f"workdir {workdir!r} holds a run with different {', '.join(changed)} settings; resuming "
        f"it with this config would mix two experiments. Use a new --workdir (or restore the "
        f"old settings).")
  others = [s for s in config if s not in changed and cfglib.section_changes(old, config, s)]
  if others:
    log.warning("resuming %s with changed %s settings", workdir, ", ".join(others))


def _check_shared_workdir(workdir: str) -> None:
  """Every process must see the same workdir (a bucket or a shared filesystem): with host-local
  directories the hosts would disagree on the latest checkpoint and hang in the first collective.
  Process 0 writes a random token there; after a barrier every process reads it back."""
  if jax.process_count() == 1:
    return
  token = int.from_bytes(os.urandom(3), "little") if jax.process_index() == 0 else 0
  token = int(multihost_utils.broadcast_one_to_all(np.array(token, np.int32)))
  path = epath.Path(workdir) / ".shared_workdir_check"
  if jax.process_index() == 0:
    files.atomic_write_text(path, str(token))
  multihost_utils.sync_global_devices("ldm_scaling_shared_workdir")
  try:
    seen = path.read_text().strip() == str(token)
  except OSError:
    seen = False
  ok = multihost_utils.process_allgather(np.array(seen))
  if not ok.all():
    blind = [i for i, v in enumerate(np.ravel(ok)) if not v]
    raise ConfigError(
        f"workdir {workdir!r} is not shared by the {jax.process_count()} processes: process(es) "
        f"{blind} cannot see the file process 0 wrote there, so they would disagree on the "
        f"checkpoints. Give every host the same workdir: a gs:// bucket or a shared filesystem.")


def _write_partitioning(workdir: str, trees: dict[str, tuple[Any, Any]]) -> None:
  """``partitioning.json``: every leaf's mesh spec and bytes per device, of the train state and
  of the frozen networks, and their totals (what to read first when a pod runs out of memory)."""
  if jax.process_index() != 0:
    return
  out = {}
  for name, (abstract, shardings) in trees.items():
    rows, total, per_device = {}, 0, 0
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
      nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
      local = int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
      rows[jax.tree_util.keystr(path)] = dict(shape=list(leaf.shape), spec=str(sharding.spec),
                                              bytes=nbytes, bytes_per_device=local)
      total, per_device = total + nbytes, per_device + local
    out[name] = dict(total_bytes=total, bytes_per_device=per_device, leaves=rows)
    log.info("%s: %.2f GB total, %.2f GB per device", name, total / 1e9, per_device / 1e9)
  state = out.pop("state")
  _dump_json(epath.Path(workdir) / "partitioning.json", dict(state, **out))


def _write_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  _dump_json(epath.Path(workdir) / "config.json", cfglib.run_record(config))


def _dump_json(path: epath.Path, obj) -> None:
  """Written whole or not at all (``files.atomic_write_text``): other hosts reading it while the
  primary writes (``_check_workdir`` on a shared workdir) never see half a file."""
  files.atomic_write_text(path, json.dumps(obj, indent=1, default=list))


# -------------------------------------------------------------------------------------------------
# The step of a phase.


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, step key): step ``s`` draws from ``fold_in(step key, s)``."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  return init_key, step_key


def make_phase_step(phase: objectives.Phase, choice, networks: dict[str, objectives.Network],
                    txs: dict[str, optax.GradientTransformation], frozen_modules: dict[str, Any],
                    config) -> Callable:
  """``step(state, batch, frozen_params) -> (state, metrics)`` of one phase: the gradient of its
  loss with respect to the networks it updates, their optimiser and EMA updates, the NaN guard."""
  accum = config.train.grad_accum_steps
  seed = config.train.seed
  decays = {n: config.train.ema_decay if net.ema_decay is None else net.ema_decay
            for n, net in networks.items() if net.ema}
  kwargs = {} if phase.choice is None else dict(choice=choice)

  def loss(trainable, params, frozen_params, ema, batch, rng):
    frozen = {k: objectives.Frozen(frozen_modules[k], v) for k, v in frozen_params.items()}
    return phase.loss(dict(params, **trainable), frozen, ema, batch, rng, **kwargs)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def loss_and_grads(trainable, params, frozen_params, ema, batch, rng):
    if accum == 1:
      (value, aux), grads = grad_fn(trainable, params, frozen_params, ema, batch, rng)
      return value, aux, grads

    def micro(i, b):
      return jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:])[:, i],
                          b)

    def one(i):
      return grad_fn(trainable, params, frozen_params, ema, micro(i, batch),
                     jax.random.fold_in(rng, i))

    def body(carry, i):
      (value, aux), grads = one(i)
      return jax.tree.map(jnp.add, carry, (value, aux, grads)), None

    (value0, aux0), grads0 = one(0)
    total, _ = jax.lax.scan(body, (value0, aux0, grads0), jnp.arange(1, accum))
    return jax.tree.map(lambda a: a / accum, total)

  def train_step(state: TrainState, batch, frozen_params):
    # The key is made in the trace: no array is placed before the program's shardings say where.
    rng = jax.random.fold_in(run_keys(seed)[1], state.step)
    trainable = {n: state.params[n] for n in phase.updates}
    value, aux, grads = loss_and_grads(trainable, state.params, frozen_params, state.ema, batch,
                                       rng)
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)

    def update(state):
      params, ema, opt_state = dict(state.params), dict(state.ema), dict(state.opt_state)
      for n in phase.updates:
        updates, opt_state[n] = txs[n].update(grads[n], state.opt_state[n], state.params[n])
        params[n] = optax.apply_updates(state.params[n], updates)
        if networks[n].post_update is not None:
          params[n] = networks[n].post_update(params[n])
        if n in decays:
          ema[n] = optim.ema_update(state.ema[n], params[n], decays[n])
      return TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)

    # NaN guard: a non-finite step leaves the state exactly as it was. A cond, not a per-leaf
    # jnp.where, so XLA updates the donated buffers in place (benchmarks/README.md).
    new = jax.lax.cond(finite, update, lambda state: state, state)
    metrics = dict(aux, loss=value, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return new, metrics

  return train_step


class _Steps:
  """The jitted program of each (phase, choice), compiled on first use."""

  def __init__(self, objective_phases, networks, txs, frozen_modules, config, shardings):
    self.phases = objective_phases
    self._make = lambda phase, choice: jax.jit(
        make_phase_step(phase, choice, networks, txs, frozen_modules, config),
        in_shardings=shardings, out_shardings=(shardings[0], None), donate_argnums=(0,))
    self._jitted: dict[tuple[str, Any], Callable] = {}

  def each(self, steps: int, scan: int = 10_000) -> list[tuple[str, Callable]]:
    """``(name, jitted)`` of every (phase, choice) that steps ``0 .. steps - 1`` run (the first
    ``scan`` steps are looked at: phases cycle), named ``phase`` or ``phase@choice``."""
    out, seen = [], set()
    for step in range(min(steps, scan)):
      phase, choice = objectives.phase_at(self.phases, step)
      if (phase.name, choice) not in seen:
        seen.add((phase.name, choice))
        name = phase.name if choice is None else f"{phase.name}@{choice}"
        out.append((name, self.at(step)[1]))
    return out

  def at(self, step: int) -> tuple[objectives.Phase, Callable]:
    phase, choice = objectives.phase_at(self.phases, step)
    key = (phase.name, choice)
    if key not in self._jitted:
      self._jitted[key] = self._make(phase, choice)
    return phase, self._jitted[key]


# -------------------------------------------------------------------------------------------------
# Restoring, including checkpoints written before networks + phases.


def _restore(checkpointer, step: int, abstract: TrainState, state_sh: TrainState,
             txs) -> TrainState:
  """The state of checkpoint ``step`` on this run's shardings ``state_sh`` (any mesh, device or
  process count may have saved it; the data position is set from the step by the caller). Layout 1
  (one optimiser state over the dict of networks, written before ``STATE_LAYOUT`` 2) is converted:
  for a single network its leaves are those of the per-network state in the same order."""
  layout = checkpointer.restore_meta(step).get("state_layout", 1)
  if layout == ckpt_lib.STATE_LAYOUT:
    return checkpointer.restore(step, ckpt_lib.abstract_with_shardings(abstract, state_sh))[0]
  if layout != 1 or len(abstract.params) != 1:
    raise ConfigError(
        f"checkpoint {step} in {checkpointer.directory} has state layout {layout}, which this "
        f"objective ({len(abstract.params)} networks) cannot resume; train in a new --workdir")
  (name,) = abstract.params
  old_opt = jax.eval_shape(txs[name].init, {name: abstract.params[name]})
  treedef, new_leaves = jax.tree.structure(abstract.opt_state[name]), jax.tree.leaves(
      abstract.opt_state[name])
  if [(x.shape, x.dtype) for x in jax.tree.leaves(old_opt)] != [(x.shape, x.dtype)
                                                               for x in new_leaves]:
    raise ConfigError(f"checkpoint {step} in {checkpointer.directory} was written with another "
                      f"optimiser; train in a new --workdir")
  old_opt_sh = jax.tree.unflatten(jax.tree.structure(old_opt),
                                  jax.tree.leaves(state_sh.opt_state[name]))
  old = dataclasses.replace(abstract, opt_state=old_opt)
  old_sh = dataclasses.replace(state_sh, opt_state=old_opt_sh)
  restored = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(old, old_sh))[0]
  log.info("converted checkpoint %d from state layout 1", step)
  return dataclasses.replace(restored, opt_state={
      name: jax.tree.unflatten(treedef, jax.tree.leaves(restored.opt_state))})


# -------------------------------------------------------------------------------------------------
# The job.


def _jax_owns_sigterm() -> bool:
  """True when ``jax.distributed`` started JAX's preemption service: its notifier catches
  SIGTERM and agrees on a sync step that ``reached_preemption`` reports (checked every step). A
  Python handler would replace that C++ handler (it cannot be chained), so none is installed."""
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    return jax_distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):  # a private module: absent in another jax
    return False


class _StopFlag:
  """SIGTERM -> a checkpoint and a clean exit, agreed by every process.

  Without JAX's preemption service a Python handler sets a flag (and calls a previous Python
  handler, if any). With several processes the flag is agreed in an allgather every
  ``poll_seconds`` of wall time -- the interval in steps is recomputed at each agreement from the
  slowest process's step time, so every process computes the same next step -- so a Spot VM's
  ~30 s notice is met whatever ``train.log_every`` is."""

  def __init__(self, poll_seconds: float = 2.0):
    self.event = threading.Event()
    self.poll_seconds = poll_seconds
    self._previous = None
    self._installed = False
    self._next = 0
    self._last = None  # (step, time) of the last agreement

  def __enter__(self):
    if _jax_owns_sigterm():
      log.info("SIGTERM is left to JAX's preemption service (checked every step)")
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame):
    self.event.set()
    if callable(self._previous):
      self._previous(signum, frame)

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    local = self.event.is_set()
    if jax.process_count() == 1:
      return local
    if step < self._next:
      return False
    now = time.monotonic()
    # Seconds per step since the last agreement (-1 at the first: no estimate yet, check again
    # at the next step).
    per_step = -1.0 if self._last is None else (now - self._last[1]) / max(step - self._last[0], 1)
    gathered = np.asarray(multihost_utils.process_allgather(
        np.array([float(local), per_step], np.float32))).reshape(-1, 2)
    self._last = (step, now)
    slowest = float(gathered[:, 1].max())
    interval = 1 if slowest <= 0 else int(np.clip(np.ceil(self.poll_seconds / slowest), 1, 10_000))
    self._next = step + interval
    return bool(gathered[:, 0].any())


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


@dataclasses.dataclass
class Program:
  """What the trainer compiles for a config on a mesh: the per-network optimisers, the training
  state's abstract value and shardings, the batch's and the frozen networks' shardings, and the
  jitted step of every (phase, choice) (``steps.at(step)``). ``ldm-scaling plan`` lowers these same
  programs for a TPU topology (launch/plan.py)."""
  settings: dict[str, Any]
  txs: dict[str, optax.GradientTransformation]
  init_state: Callable          # (init key, frozen params) -> boxed TrainState
  abstract: TrainState          # unboxed ShapeDtypeStructs
  state_sh: TrainState
  boxed: TrainState             # ShapeDtypeStructs in their logical-axis boxes (shard on any mesh)
  batch_spec: dict[str, jax.ShapeDtypeStruct]
  batch_sh: dict[str, Any]
  frozen_sh: dict[str, Any]
  steps: "_Steps"


def build_program(config, objective, frozen: dict[str, objectives.Frozen], mesh) -> Program:
  """The training programs of ``config``'s ``objective`` on ``mesh`` (under ``jax.set_mesh`` and
  the logical axis rules). ``frozen``'s parameters may be abstract (``jax.ShapeDtypeStruct``s): only
  their shapes are read here."""
  tcfg = config.train
  networks, phases = objective.networks(), objective.phases()
  settings = {n: optim.settings(tcfg, net.optimizer) for n, net in networks.items()}
  txs = {n: optim.optimizer(s) for n, s in settings.items()}

  def init_state(rng, frozen_params):
    params = objective.init(rng)
    for n, net in networks.items():
      if net.start_from:
        params[n] = sh.replace_values(params[n], frozen_params[net.start_from])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema={n: params[n] for n, net in networks.items() if net.ema},
                      opt_state={n: txs[n].init(params[n]) for n in networks})

  frozen_sh = {k: sh.frozen_shardings(f.params, mesh) for k, f in frozen.items()}
  frozen_abstract = jax.eval_shape(lambda: {k: sh.unbox(f.params) for k, f in frozen.items()})
  init_key = jax.eval_shape(lambda: run_keys(tcfg.seed)[0])
  boxed = jax.eval_shape(init_state, init_key, frozen_abstract)
  state_sh = sh.tree_shardings(boxed, mesh)
  batch_spec = objective.batch_spec(tcfg.batch_size)
  batch_sh = {k: sh.batch_sharding(mesh, len(v.shape)) for k, v in batch_spec.items()}
  frozen_modules = {k: f.module for k, f in frozen.items()}
  steps = _Steps(phases, networks, txs, frozen_modules, config, (state_sh, batch_sh, frozen_sh))
  return Program(settings=settings, txs=txs, init_state=init_state, abstract=sh.unbox(boxed),
                 state_sh=state_sh, boxed=boxed, batch_spec=batch_spec, batch_sh=batch_sh,
                 frozen_sh=frozen_sh, steps=steps)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          make_data: Callable | None = None, max_steps: int | None = None) -> Result:
  """Trains ``config``'s objective in ``workdir``, resuming from its latest complete checkpoint.

  ``make_data(config, split, *, batch_size, seed, process_index, process_count)`` returns a
  checkpointable grain iterator of host-local numpy batches (default: the objective's
  ``make_data``). ``max_steps`` stops early (tests); the schedule still follows ``train.steps``.
  """
  cfglib.check_schema(config)
  optim.validate(config.train)
  check_cadence(config.train)
  objective = objectives.build(config)  # checks the sections its networks and data use
  num_devices, process_count = jax.device_count(), jax.process_count()
  check_batch_layout(config, num_devices, process_count)
  networks, phases = objective.networks(), objective.phases()
  frozen = objective.frozen()  # loaded once on the host, before anything is written; never saved
  objectives.check_declaration(networks, phases, frozen)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  _check_shared_workdir(workdir)
  _check_workdir(workdir, config, objective)
  _write_config(workdir, config)

  mesh = sh.make_mesh(config.mesh)
  tcfg = config.train
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES):
    program = build_program(config, objective, frozen, mesh)
    frozen_params = jax.device_put({k: sh.unbox(f.params) for k, f in frozen.items()},
                                   program.frozen_sh)
    _write_partitioning(workdir, dict(state=(program.abstract, program.state_sh),
                                      frozen=(jax.eval_shape(lambda: frozen_params),
                                              program.frozen_sh)))

    local_batch = tcfg.batch_size // process_count
    data_iter = (make_data or objective.make_data)(
        config, config.data.train_split, batch_size=local_batch, seed=tcfg.seed,
        process_index=jax.process_index(), process_count=process_count)

    checkpointer = ckpt_lib.Checkpointer(
        workdir, keep=tcfg.keep_checkpoints,
        best_metric=tcfg.best_metric or None, async_save=tcfg.async_checkpointing)
    start, state = checkpointer.restore_newest_readable(
        lambda step: _restore(checkpointer, step, program.abstract, program.state_sh,
                              program.txs))
    if start is not None:
      # Batch s of every process is its share of global batch s, whatever the process count
      # (data/pipeline.py), and each step draws one batch (gradient accumulation splits it on
      # device): the position is the step.
      ckpt_lib.set_data_position(data_iter, start)
      if jax.process_index() == 0:
        metrics_lib.console(f"resumed from step {start} of {tcfg.steps} ({workdir})")
    else:
      start = 0
      init_key, _ = run_keys(tcfg.seed)
      state = runtime.run_once(lambda k, f: sh.unbox(program.init_state(k, f)), init_key,
                               frozen_params, out_shardings=program.state_sh)

    lrs = {n: optim.learning_rate(s) for n, s in program.settings.items()}
    flops = {p.name: objective.train_flops_per_example(p.name) for p in phases}
    loop = _Loop(config, workdir, objective, phases, frozen, frozen_params, flops, lrs, mesh,
                 program.batch_spec)
    result = loop.run(state, program.steps, data_iter, checkpointer, start, max_steps)
  return result


class _Loop:
  """The host side of training: feed batches, check, log, save, stop."""

  def __init__(self, config, workdir, objective, phases, frozen, frozen_params, flops, lrs, mesh,
               batch_spec):
    self.config, self.workdir, self.objective = config, workdir, objective
    self.phases, self.frozen, self.frozen_params = phases, frozen, frozen_params
    self.flops, self.lrs, self.mesh, self.batch_spec = flops, lrs, mesh, batch_spec
    self.prefix = len(phases) > 1  # metrics named "<phase>/<metric>" when there are several

  def _named(self, phase, metrics, step: int) -> dict[str, Any]:
    """A step's metrics under their logged names, with the learning rates of its networks."""
    out = {(f"{phase.name}/{k}" if self.prefix and k != "finite" else k): v
           for k, v in metrics.items()}
    for n in phase.updates:
      count = objectives.updates_before(self.phases, n, step)
      out["lr" if len(self.lrs) == 1 else f"lr/{n}"] = self.lrs[n](count)
    return out

  def run(self, state, steps: _Steps, data_iter, checkpointer, start: int,
          max_steps: int | None) -> Result:
    tcfg = self.config.train
    total = tcfg.steps
    end = total if max_steps is None else min(total, max_steps)
    is_main = jax.process_index() == 0
    if is_main:  # steps logged after the checkpoint resumed from (a killed run) are redone
      metrics_lib.drop_rows_after(self.workdir, start)
    writer = metrics_lib.make_writer(self.workdir, is_main)
    throughput = metrics_lib.Throughput(start_step=start, total_steps=total,
                                        batch_size=tcfg.batch_size,
                                        num_devices=jax.device_count(),
                                        peak_tflops=tcfg.peak_tflops_per_device)
    hooks = []
    if is_main:
      from clu import periodic_actions  # pylint: disable=g-import-not-at-top  # imports TensorFlow
      hooks.append(periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                                   every_steps=tcfg.log_every, every_secs=None))
      if tcfg.profile_steps > 0:
        hooks.append(periodic_actions.Profile(logdir=self.workdir,
                                              num_profile_steps=tcfg.profile_steps,
                                              first_profile=start + 5, every_secs=None))
    meta = dict(config_hash=cfglib.config_hash(self.config),
                objective=self.config.objective.name, state_layout=ckpt_lib.STATE_LAYOUT)
    window: list[dict[str, Any]] = []
    step, stopped, last, previous = start, "done", {}, None
    with _StopFlag() as stop:
      try:
        while step < end:
          batch = _global_batch(next(data_iter), self.batch_spec, self.mesh)
          phase, fn = steps.at(step)
          state, metrics = fn(state, batch, self.frozen_params)
          # Checking the previous step's flag keeps the host one step ahead of the device.
          if previous is not None:
            _check_finite(previous, step, checkpointer)
          previous = metrics
          window.append(self._named(phase, metrics, step))
          throughput.add(self.flops[phase.name])
          step += 1
          for hook in hooks:
            hook(step)
          if step % tcfg.log_every == 0 or step == end:
            _check_finite(previous, step, checkpointer)
            checkpointer.check()  # a failed asynchronous save stops the run here
            last = _summarise(window)
            window = []
            last.update(throughput.report(step))
            writer.write_scalars(step, last)
            if is_main:
              metrics_lib.console(metrics_lib.progress_line(step, total, last,
                                                            throughput.eta_seconds(step)))
          if tcfg.sample_every and step % tcfg.sample_every == 0:  # every process: sharded
            self._write_preview(state, step, writer)
          preempted = stop.agreed(step) or checkpointer.reached_preemption(step)
          if preempted or step == end or step % tcfg.checkpoint_every == 0:
            _check_finite(previous, step, checkpointer)  # never save a step that was skipped
            checkpointer.save(step, state, data_iter, meta,
                              metrics=_ckpt_metrics(last, tcfg.best_metric))
          if preempted:
            stopped = "preempted"
            log.warning("stop requested at step %d: checkpoint saved, exiting", step)
            break
      except BaseException:
        _close(checkpointer, writer, failing=True)
        raise
      _close(checkpointer, writer, failing=False)
    return Result(step=step, stopped=stopped, metrics=last)

  def _write_preview(self, state, step: int, writer) -> None:
    """``<workdir>/samples/step_<step>.png`` and a TensorBoard image of the objective's preview.
    Every process calls this: the EMA stays sharded as trained and the sampler runs on the whole
    mesh (``generate.generate`` splits the rows too and gathers the images on every process);
    process 0 writes the files."""
    weights = {n: state.ema.get(n, p) for n, p in state.params.items()}
    preview = self.objective.preview(weights, self.frozen, step)
    if preview is None or jax.process_index() != 0:
      return
    path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
    image = generate.save_grid(path, preview["images"], preview["prompts"], [""],
                               [preview["label"]])
    writer.write_images(step, {"samples": image[None]})
    log.info("wrote %s", path)


def _close(checkpointer, writer, *, failing: bool) -> None:
  """Waits for pending saves and closes the writers -- the metrics are flushed whatever happens.
  When the run is already failing, a second error from the pending save is logged, not raised
  (the first one is the one to report)."""
  try:
    checkpointer.wait()
  except Exception as e:  # pylint: disable=broad-except
    if not failing:
      raise
    log.error("%s", e)
  finally:
    try:
      checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      log.error("closing the checkpointer: %s", e)
    writer.flush()
    writer.close()


def _check_finite(metrics, step: int, checkpointer) -> None:
  """``step`` is the 1-based number of the step that produced ``metrics``."""
  if bool(metrics["finite"]):
    return
  raise NonFiniteError(
      f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
      f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the run "
      f"stopped. The last checkpoint ({checkpointer.latest_step()}) holds good parameters: "
      f"lower train.lr, check the data, or tighten train.grad_clip.")


def _summarise(window: list[dict[str, Any]]) -> dict[str, float]:
  """Mean of each metric over the steps of the window that have it."""
  stacked = jax.device_get(window)
  keys = dict.fromkeys(k for m in stacked for k in m if k != "finite")
  return {k: float(np.mean([m[k] for m in stacked if k in m])) for k in keys}


def _ckpt_metrics(last: dict[str, float], best_metric: str) -> dict[str, float] | None:
  return {best_metric: last[best_metric]} if best_metric and best_metric in last else None
