"""Plans before launch: the trainer's real step compiled ahead of time for a TPU slice, here.

With ``libtpu`` installed (``pip install 'ldm-scaling[tpu]'``), ``jax.experimental.topologies``
describes the chips of a named slice on any host, CPU included, and ``jax.jit(...).lower(abstract
args).compile()`` runs the TPU compiler on them. The executable's ``memory_analysis()`` is what each
chip must hold (arguments, outputs not aliased to donated arguments, temporaries, code) and its
``cost_analysis()`` the FLOPs per chip; its HLO names the collectives. This is how large JAX
trainers check a launch (MaxText's ahead-of-time compile). The programs are
``trainer.build_program``'s: the objective's loss, optimisers, EMA, shardings and donation, as
``ldm-scaling train`` jits them.

Slices are named as the launcher names them (``v5litepod-16`` or ``v5e-16``, ``v5p-256``: the
number counts TensorCores, so ``v5p-256`` is 128 chips, ``v5p:4x4x8``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import time
from typing import Any, Callable

import flax
import jax
import numpy as np

from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError
from ldm_scaling.launch import estimate as est
from ldm_scaling.launch import topology as topo_lib
from ldm_scaling.launch.estimate import plannable, shard_bytes  # pylint: disable=unused-import
from ldm_scaling.models import layers

LIBTPU_PIN = "libtpu==0.0.52"   # the version this was verified with (jax 0.10.2); setup.py's extra
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
GIB = 2**30
TRAIN_FLOPS_PER_FORWARD = 3   # a training step's forward + backward, in forwards


def slice_shape(topo: topo_lib.Topology) -> str:
  """The chip grid of a slice as libtpu names it: v5e/v6e are 2-D (``v5litepod-16`` -> ``4x4``),
  v4/v5p 3-D (``v5p-256`` = 128 chips -> ``4x4x8``). Grids grow from 2x2(x1) by doubling their
  smallest side, the shapes of the Cloud TPU docs' slice tables."""
  dims = [2, 2, 1] if topo.generation in ("v4", "v5p") else [2, 2]
  chips = topo.chips
  if chips == 1 and len(dims) == 2:
    return "1x1"
  if chips < 4 or chips & (chips - 1):
    example = f"{topo.generation}-{4 * topo_lib.CORES_PER_CHIP[topo.generation]}"
    raise ConfigError(f"{topo.accelerator_type}: {chips} chips; plans know slices of 4 x 2^k "
                      f"chips (e.g. {example})")
  while int(np.prod(dims)) < chips:
    i = min(range(len(dims)), key=lambda k: (dims[k], -k))
    dims[i] *= 2
  return "x".join(str(d) for d in dims)


def parse_topology(name: str) -> topo_lib.Topology:
  """``v5e-4`` (an alias of the launcher's ``v5litepod-4``), ``v5p-256``, ..."""
  return topo_lib.parse(name)


def tpu_devices(topo: topo_lib.Topology) -> list:
  """The slice's devices (``jax.experimental.topologies``; no TPU needed, libtpu is)."""
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise ConfigError(f"planning for TPU needs the TPU compiler: pip install 'ldm-scaling[tpu]' "
                      f"(or {LIBTPU_PIN}) on this host; training on CPU does not need it")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name = f"{topo.generation}:{slice_shape(topo)}"
  # v4 and v5p chips have two TensorCores that JAX runs as one device (megacore), as on the VMs.
  kw = dict(chip_config_name="megacore") if topo_lib.CORES_PER_CHIP[topo.generation] == 2 else {}
  # While libtpu loads and describes the slice: TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES
  # spare it its probe of this host (GCE metadata lookups, logged as errors off GCE), and
  # ALLOW_MULTIPLE_LIBTPU_LOAD its lock on the chips (a plan drives none; two planning processes
  # at once would otherwise fail on /tmp/libtpu_lockfile). Only then: the first two also say
  # "this is a TPU VM" (to JAX's cluster detection, to distributed.on_tpu_vm and to every
  # process started from here).
  with _environment(TPU_ACCELERATOR_TYPE=os.environ.get("TPU_ACCELERATOR_TYPE")
                    or topo.accelerator_type,
                    TPU_WORKER_HOSTNAMES=os.environ.get("TPU_WORKER_HOSTNAMES") or "localhost",
                    ALLOW_MULTIPLE_LIBTPU_LOAD="1"):
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices)


def one_vm(topo: topo_lib.Topology) -> list:
  """The devices of a one-VM slice of ``topo``'s generation (``v5litepod-8``, ``v5p-8``): what a
  process of ``topo`` has locally. libtpu does not compile a program for part of a v5e slice
  ("device assignment should include all slice devices" on platforms with limited ICI routing),
  so a per-VM program is planned on a slice of one VM; its per-chip figures are the same."""
  generation = topo.generation
  prefix = {"v5e": "v5litepod"}.get(generation, generation)
  cores = topo_lib.CHIPS_PER_HOST[generation] * topo_lib.CORES_PER_CHIP[generation]
  return tpu_devices(parse_topology(f"{prefix}-{cores}"))


@contextlib.contextmanager
def _environment(**values: str):
  """Environment variables set for the block, then restored (or removed)."""
  previous = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


# -------------------------------------------------------------------------------------------------
# What a compiled program needs.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
# The TPU compiler fuses a reduce-scatter as an all-reduce + slice: a fusion calling a computation
# named all-reduce-scatter*.
_FUSED = re.compile(r"=\s*(.*?)\sfusion\(.*calls=%all-reduce-scatter")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """``{kind: {"count", "bytes", "largest"}}`` of the collectives in an HLO module's text: async
  pairs counted once, at their start; the TPU compiler's fused reduce-scatters (a fusion calling
  ``all-reduce-scatter*``) as reduce-scatter, not as the all-reduce inside them; copies of one
  collective (one ``channel_id``) once. An op's bytes are
  those of its results (all buffers of a combined collective; a reduce-scatter's scattered
  pieces); ``largest`` is the largest op."""
  out: dict[str, dict[str, int]] = {}
  fused_bodies = set(re.findall(r"^%(all-reduce-scatter[\w.\-]*) ", hlo_text, re.M))
  body, seen = None, set()
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      name = re.match(r"(?:ENTRY )?%([\w.\-]+)", line)
      body = name.group(1) if name else None
    if body in fused_bodies:
      continue  # the all-reduce of a fused reduce-scatter: counted at its call
    fused = _FUSED.search(line)
    m = None if fused else _OP.search(line)
    if not (fused or m):
      continue
    kind = "reduce-scatter" if fused else m.group(2)
    channel = re.search(r"channel_id=(\d+)", line)
    if channel and (kind, channel.group(1)) in seen:
      continue  # a copy of the same collective (the TPU compiler clones them into async fusions)
    if channel:
      seen.add((kind, channel.group(1)))
    result = (fused or m).group(1)
    sizes = [_DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
             for d, dims in _SHAPE.findall(result)]
    if m and m.group(3):  # an async start's result: (operands, results)
      sizes = sizes[len(sizes) // 2:]
    size = sum(sizes)  # a combined collective's result is a tuple of buffers
    entry = out.setdefault(kind, dict(count=0, bytes=0, largest=0))
    entry["count"] += 1
    entry["bytes"] += size
    entry["largest"] = max(entry["largest"], size)
  return out


@dataclasses.dataclass
class Compiled:
  """One compiled program's needs per chip (bytes) and FLOPs."""
  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int          # outputs written into donated arguments (counted once)
  temp_bytes: int
  code_bytes: int
  flops: float              # per chip: XLA's cost_analysis of the partitioned program (of a
                            # loop, its body once: a sampler's per step), plus
  kernel_flops: float       # the Pallas attention kernels' (which XLA does not count), per chip
  collectives: dict[str, dict[str, int]]
  lower_s: float
  compile_s: float
  chips: int = 0            # the chips it runs on when not the whole slice (sampling: one host's)
  # The compiler's message when it refused the program for want of HBM (then temp_bytes is the
  # figure it names, argument_bytes the arguments' shards, the rest 0: the total is a lower bound).
  out_of_memory: str = ""

  @property
  def total_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @classmethod
  def of(cls, name: str, lowered, lower_s: float = 0.0,
         log: Callable[[str], None] = lambda _: None, kernel_flops: float = 0.0,
         args: Any = None) -> "Compiled":
    """Compiles ``lowered``; ``args``: its abstract arguments (with shardings), whose bytes per
    chip stand in for the executable's when the compiler runs out of HBM."""
    start = time.perf_counter()
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
      needed = out_of_memory_bytes(str(err))
      if needed is None:
        raise
      compile_s = time.perf_counter() - start
      message = next((line for line in str(err).splitlines() if "memory" in line), str(err))
      log(f"{name}: the TPU compiler ran out of HBM after {compile_s:.1f} s: {message}")
      return cls(name=name, argument_bytes=_arg_bytes(args), output_bytes=0, alias_bytes=0,
                 temp_bytes=needed, code_bytes=0, flops=0.0, kernel_flops=kernel_flops,
                 collectives={}, lower_s=lower_s, compile_s=compile_s,
                 out_of_memory=message.strip())
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = cls(name=name, argument_bytes=int(mem.argument_size_in_bytes),
              output_bytes=int(mem.output_size_in_bytes),
              alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
              code_bytes=int(mem.generated_code_size_in_bytes),
              flops=float(cost.get("flops", float("nan"))) + kernel_flops,
              kernel_flops=kernel_flops,
              collectives=collectives(compiled.as_text()), lower_s=lower_s, compile_s=compile_s)
    log(f"compiled {name} in {compile_s:.1f} s")
    return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# The TPU compiler's refusals: "... the total memory required for HLO temporaries (15.90G) exceeds
# available HBM (15.75G)" (libtpu 0.0.52), or older "Used 20.5G of 15.48G hbm".
_OOM = (re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm"))


def out_of_memory_bytes(message: str) -> int | None:
  """The bytes a TPU compiler's out-of-HBM error says it needed (None: not such an error)."""
  if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
    return None
  for pattern in _OOM:
    m = pattern.search(message)
    if m:
      return int(float(m.group(1)) * _UNITS[m.group(2)])
  return None


def _arg_bytes(args) -> int:
  """Bytes per chip of abstract arguments (their shardings' shards; the largest device's)."""
  if args is None:
    return 0
  shape = lambda a: a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) else a.shape
  return sum(a.dtype.itemsize * int(np.prod(shape(a))) for a in jax.tree.leaves(args))


@dataclasses.dataclass
class Plan:
  topology: str             # accelerator type
  slice_shape: str
  chips: int
  hbm_bytes_per_device: int
  mesh: dict[str, int]
  batch: int
  programs: list[Compiled]
  state_bytes_per_device: int   # the training state's shards, from its shardings
  state_bytes: int              # the whole training state
  notes: list[str]
  overrides: list[str]
  estimate: Any = None          # launch.estimate.Estimate of the same setting, when searched
  abstract_state: Any = dataclasses.field(default=None, repr=False)    # the trainer's, unboxed
  state_shardings: Any = dataclasses.field(default=None, repr=False)

  @property
  def bytes_per_device(self) -> int:
    return max(p.total_bytes for p in self.programs)

  @property
  def fits(self) -> bool:
    return (self.bytes_per_device <= self.hbm_bytes_per_device
            and not any(p.out_of_memory for p in self.programs))

  @property
  def flops_per_step(self) -> float:
    """FLOPs of the heaviest training program, all chips together."""
    return max(p.flops for p in self.programs if p.name.startswith("train/")) * self.chips

  def to_json(self) -> dict[str, Any]:
    return dict(fits=self.fits, bytes_per_device=self.bytes_per_device,
                hbm_bytes_per_device=self.hbm_bytes_per_device,
                flops_per_step=self.flops_per_step, mesh=self.mesh, overrides=self.overrides,
                topology=self.topology, slice_shape=self.slice_shape, chips=self.chips,
                batch=self.batch, state_bytes_per_device=self.state_bytes_per_device,
                state_bytes=self.state_bytes, notes=self.notes,
                programs=[dict(dataclasses.asdict(p), total_bytes=p.total_bytes)
                          for p in self.programs],
                libtpu=_libtpu_version(),
                estimate=self.estimate.to_json() if self.estimate is not None else None)


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def plan_train(config, accelerator_type: str, *, batch: int | None = None,
               log: Callable[[str], None] = lambda _: None, devices=None,
               sample: bool = False) -> Plan:
  """Compiles every training program of ``config`` (one per phase and choice) for the slice
  ``accelerator_type`` (``devices``: other devices, e.g. this host's CPUs) and reports its needs;
  with ``sample``, also the eval grid's sampling program on one TPU VM's chips
  (:func:`plan_sample`)."""
  from ldm_scaling.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import objectives, trainer  # pylint: disable=g-import-not-at-top
  topo = parse_topology(accelerator_type)
  config, notes = plannable(config)
  if batch is not None:
    with config.unlocked():
      config.train.batch_size = int(batch)
  hosts = topo.hosts if devices is None else 1
  devices = tpu_devices(topo) if devices is None else list(devices)
  trainer.check_batch_layout(config, len(devices), hosts)
  objective = objectives.build(config)
  mesh = sh.make_mesh(config.mesh, devices)
  # A teacher is read (on the host) for its shapes; the plan compiles with abstract values.
  frozen = {k: objectives.Frozen(f.module, jax.eval_shape(lambda p=f.params: p))
            for k, f in objective.frozen().items()}
  programs = []
  platform = devices[0].platform  # "tpu": the model's CPU-only choices are off, as on the VMs
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES), \
       layers.building_for(platform):
    program = trainer.build_program(config, objective, frozen, mesh)
    state = ckpt_lib.abstract_with_shardings(program.abstract, program.state_sh)
    batch_args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.batch_sh[k])
                  for k, v in program.batch_spec.items()}
    frozen_args = {k: ckpt_lib.abstract_with_shardings(sh.unbox(f.params), program.frozen_sh[k])
                   for k, f in frozen.items()}
    for key, fn in program.steps.each(config.train.steps):
      start = time.perf_counter()
      with layers.counting_kernel_flops() as kernel:
        lowered = fn.lower(state, batch_args, frozen_args)
      lower_s = time.perf_counter() - start
      # Forward + backward of the kernels' attention, dense-equivalent (as XLA counts dense).
      programs.append(Compiled.of(f"train/{key}", lowered, lower_s, log,
                                  kernel_flops=TRAIN_FLOPS_PER_FORWARD * kernel[0] / len(devices),
                                  args=(state, batch_args, frozen_args)))
  if sample:  # one VM's chips (each process samples its own cells on its own devices)
    programs.append(plan_sample(config, one_vm(topo) if hosts > 1 else devices, log=log))
  per, total = shard_bytes(program.abstract, program.state_sh)
  sizes = {a: int(mesh.shape[a]) for a in sh.MESH_AXES}
  return Plan(topology=topo.accelerator_type, slice_shape=slice_shape(topo), chips=topo.chips,
              hbm_bytes_per_device=int(topo.hbm_gib_per_chip * GIB), mesh=sizes,
              batch=int(config.train.batch_size), programs=programs,
              state_bytes_per_device=per, state_bytes=total, notes=notes,
              abstract_state=program.abstract, state_shardings=program.state_sh,
              overrides=[f"--config.mesh.{a}={v}" for a, v in sizes.items()])


def plan_sample(config, devices, *, batch: int | None = None,
                log: Callable[[str], None] = lambda _: None) -> Compiled:
  """Compiles the eval grid's sampling program (``diffusion.sampling.program``: the whole
  trajectory of ``eval.samplers[0]`` at ``eval.steps[0]`` steps, guided at ``eval.cfg_scales``)
  for ``devices``, one TPU VM's chips: as ``eval.grid`` / ``ldm-scaling sample`` run it there, the
  UNet's parameters in ``eval.param_dtype`` are sharded over them (``eval.parallel.model_mesh``,
  the trainer's logical-axis rules) and ``batch`` rows (default ``eval.batch_size``, rounded up to
  a multiple of the chips) are split over them. The noise, prompts' context, empty prompt's
  context, guidance scales and keys are abstract (no weights are read)."""
  from ldm_scaling import data, diffusion, models  # pylint: disable=g-import-not-at-top
  from ldm_scaling.diffusion import generate, sampling  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import parallel  # pylint: disable=g-import-not-at-top
  devices = list(devices)
  e = config.eval
  sampler, steps = e.samplers[0], int(e.steps[0])
  mesh = sh.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  n = len(devices)
  rows = -(-int(batch or e.batch_size) // n) * n
  row = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sh.batch_sharding(mesh, len(shape)))
  whole = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh.replicated(mesh))
  model = models.build(config.model)
  side = data.latent_size(config)
  text = (rows, int(config.cost.text_len), int(config.model.cross_attn_dim))
  dtype = parallel.param_dtype(e.param_dtype)
  # Shapes, shardings and the sampler's grid first, on this host (nothing runs on the slice).
  shardings = generate.unet_shardings(config, mesh)
  abstract = sh.unbox(generate.abstract_params(model))
  floating = lambda a: jax.numpy.issubdtype(a.dtype, jax.numpy.floating)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
      a.shape, dtype if floating(a) else a.dtype, sharding=s), abstract, shardings)
  apply_fn = generate.unet_apply(model)
  embedded = generate.guidance_embedded(config)
  none = whole((0,), jax.numpy.float32)
  if embedded:  # the scales are an input of the UNet: one unguided forward per step
    apply_fn = generate.scale_input_apply(apply_fn)
    params = {"unet": params, "w": row((rows,), jax.numpy.float32)}
  prog, _ = sampling.program(apply_fn, diffusion.schedule_from_config(config.diffusion),
                             config.diffusion.prediction, sampler, steps,
                             diffusion.options_from_config(config), guided=not embedded)
  key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
  args = (params, row((rows, side, side, config.model.in_channels), jax.numpy.float32),
          row(text, jax.numpy.float32), none if embedded else whole(text, jax.numpy.float32),
          none if embedded else row((rows,), jax.numpy.float32), row(key.shape, key.dtype))
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES), \
       layers.building_for(devices[0].platform):
    start = time.perf_counter()
    with layers.counting_kernel_flops() as kernel:
      lowered = prog.lower(*args)
    lower_s = time.perf_counter() - start
  guided = "" if embedded else ", guided"
  out = Compiled.of(f"sample/{sampler}-{steps} ({rows} images{guided}, {e.param_dtype} weights)",
                    lowered, lower_s, log, kernel_flops=kernel[0] / n, args=args)
  out.chips = n
  return out


@dataclasses.dataclass
class Search:
  """``--search``: every candidate's estimate (cheapest first) and the compiler's plans of the
  best ones, in the order tried; ``plan`` is the first that fits (None: none did)."""
  ranked: list  # [estimate.Estimate]
  compiled: list[Plan]

  @property
  def plan(self) -> Plan | None:
    return next((p for p in self.compiled if p.fits), None)


def search(config, accelerator_type: str, *, batch: int | None = None, compile_top: int = 1,
           log: Callable[[str], None] = lambda _: None, sample: bool = False) -> Search:
  """Ranks meshes, remat, attention kernel and dtype by the estimate (``launch.estimate``), then
  compiles the best fitting candidates, one after another, until the compiler agrees one fits
  (at most ``compile_top``; 0 = estimates only)."""
  topo = parse_topology(accelerator_type)
  ranked = est.rank(config, accelerator_type, batch=batch, log=log)
  compiled = []
  for e in [e for e in ranked if e.fits][:compile_top]:
    log(f"compiling the candidate {' '.join(e.setting.overrides(topo.chips))} (estimated "
        f"{e.bytes_per_device / GIB:.1f} GiB per chip)")
    plan = plan_train(e.setting.apply(config, topo.chips), accelerator_type, batch=batch, log=log,
                      sample=sample)
    plan.overrides = e.setting.overrides(topo.chips)
    plan.estimate = e
    compiled.append(plan)
    if plan.fits:
      break
  return Search(ranked=ranked, compiled=compiled)


def format_search(result: Search, top: int = 8) -> str:
  g = lambda b: f"{b / GIB:.1f} GiB"
  lines = [f"{len(result.ranked)} candidates estimated; the {min(top, len(result.ranked))} "
           f"cheapest (per chip; step time at {_mfu()} of the bf16 peak):"]
  for e in result.ranked[:top]:
    s = e.setting
    lines.append(f"  {'fits' if e.fits else 'no  '} {g(e.bytes_per_device):>9} mesh "
                 f"({e.chips // (s.fsdp * s.tensor)}, {s.fsdp}, {s.tensor}) remat={s.remat} "
                 f"attn_kernel={s.attn_kernel} dtype={s.dtype}: {e.step_seconds:.3f} s/step")
  for plan in result.compiled:
    lines.append(format_plan(plan))
  best = result.plan
  if best is not None:
    lines.append(f"cheapest setting that fits: {' '.join(best.overrides)}")
  elif result.compiled:
    lines.append("no compiled candidate fits; see the figures above")
  else:
    fitting = [e for e in result.ranked if e.fits]
    lines.append(f"cheapest setting that fits by the estimate: "
                 f"{' '.join(fitting[0].setting.overrides(fitting[0].chips))}" if fitting else
                 "no candidate fits by the estimate: a bigger slice, or a smaller batch")
  return "\n".join(lines)


def _mfu() -> str:
  return f"{est.ASSUMED_MFU:.0%} (assumed)"


def format_plan(plan: Plan) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"
  lines = [f"plan for {plan.topology} ({plan.chips} chips, {plan.slice_shape}), mesh "
           f"{plan.mesh}, batch {plan.batch}, per chip:"]
  for p in plan.programs:
    where = f" on one VM's {p.chips} chips" if p.chips else ""
    per = " per sampler step" if p.name.startswith("sample/") else ""
    if p.out_of_memory:
      lines.append(f"  {p.name}{where}: does NOT compile: the TPU compiler ran out of HBM "
                   f"({p.out_of_memory}); arguments {g(p.argument_bytes)} + temporaries "
                   f"{g(p.temp_bytes)} = {g(p.total_bytes)} at least, of "
                   f"{g(plan.hbm_bytes_per_device)} HBM; compiler ran {p.compile_s:.1f} s")
      continue
    lines.append(f"  {p.name}{where}: arguments {g(p.argument_bytes)} + outputs "
                 f"{g(p.output_bytes)} - donated {g(p.alias_bytes)} + temporaries "
                 f"{g(p.temp_bytes)} + code {g(p.code_bytes)} = {g(p.total_bytes)} of "
                 f"{g(plan.hbm_bytes_per_device)} HBM; {p.flops / 1e12:.3f} TFLOP{per}; "
                 f"compiled in {p.compile_s:.1f} s")
    if p.kernel_flops:
      lines.append(f"    of the FLOPs, {p.kernel_flops / 1e12:.3f} TFLOP are the attention "
                   f"kernels' (counted as dense attention: XLA does not see inside them)")
    for kind, c in sorted(p.collectives.items()):
      lines.append(f"    {kind}: {c['count']} ops, {g(c['bytes'])} (largest {g(c['largest'])})")
  lines.append(f"  training state: {g(plan.state_bytes_per_device)} per chip of "
               f"{g(plan.state_bytes)}")
  lines += [f"  note: {n}" for n in plan.notes]
  verdict = "fits" if plan.fits else "does NOT fit"
  lines.append(f"{verdict}: needs {g(plan.bytes_per_device)} per chip, has "
               f"{g(plan.hbm_bytes_per_device)}; settings: {' '.join(plan.overrides)}")
  return "\n".join(lines)
