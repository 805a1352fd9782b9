"""What a training step needs per TPU chip, estimated in seconds without compiling it.

The TPU compiler (``launch.plan``) takes minutes per program on a small host, so a search over
meshes, remat, attention kernel and dtype ranks its candidates with this estimate first and
compiles only the best. Per chip:

- **training state**: exact, from the trainer's own abstract state and shardings
  (``trainer.build_program`` on an abstract mesh of the slice's shape);
- **gradients**: one f32 copy of the trainable parameters, sharded like them;
- **activations**: the residuals the backward pass keeps, per example, read from the traced
  gradient of the UNet (``jax.vjp`` under ``jax.eval_shape``: the backward function's closure holds
  exactly the saved arrays; batch 2 less batch 1 removes the weights), for the programs the TPU
  runs (``layers.building_for("tpu")``: dense attention unless ``attn_kernel=splash``). With
  ``remat=block`` add the largest block's own residuals, alive while it is recomputed.
  Times :data:`ACTIVATION_FACTOR` of the remat mode, fitted on the compiler (docs/tpu_plan.md
  states the fits and the error on other plans), and on a mesh with a tensor axis by the share of
  them a chip keeps (:data:`TENSOR_SHARE`, measured on a small UNet);
- **code**: :data:`CODE_BYTES`.

FLOPs are the cost model's (``models.cost``: XLA's count of the forward at the config's latent
size), times 3 for forward + backward, plus one forward with remat. Time per step assumes
:data:`ASSUMED_MFU` of the chip's bf16 peak (:data:`PEAK_BF16_TFLOPS`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling import sharding as sh
from ldm_scaling.launch import topology as topo_lib
from ldm_scaling.models import layers

GIB = 2**30
# Peak dense bf16 matmul throughput per chip (Cloud TPU system-architecture pages).
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
ASSUMED_MFU = 0.40          # a stated assumption, not a measurement: no TPU was used
CODE_BYTES = int(0.75 * GIB)  # generated code (the compiler's: 0.65 GiB for width 320)
# The TPU compiler's temporaries less the gradients, over the traced residuals (per remat mode; XLA
# fuses elementwise work into its consumers and keeps fewer buffers than the trace names):
# - none: 0.520 on width 320, v5p-256, batch 2048, fsdp 8, dense f32 (55.18 GiB - 0.40 over
#   105.4 GiB); the same width with splash attention then came out at 28.61 GiB per chip against
#   the compiler's 28.33 (+1.0 %).
# - block: 0.752 on width 768, v5p-256, batch 2048, fsdp 16, splash, f32 (18.24 GiB - 1.14 over
#   22.73 GiB); checked on width 320 in docs/tpu_plan.md.
ACTIVATION_FACTOR = {"none": 0.52, "block": 0.75}
# What a chip keeps of its batch's activations on a mesh with a tensor axis of that size: the
# axis splits the weights' output features and heads, not every activation. Measured on the
# compiler's plans of one small UNet (width 64, 2 levels with attention, batch 8, v5e-4): the
# temporaries less the gradients at meshes (1, 2, 2) and (1, 1, 4) over (1, 4, 1), divided by the
# batch ratio (docs/tpu_plan.md). Not checked on a large model; other sizes are not searched.
TENSOR_SHARE = {1: 1.0, 2: 0.79, 4: 0.45}
PAPER_STEPS = 500_000
REMATS = ("none", "block")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Setting:
  """The knobs a search turns, as config values."""
  fsdp: int
  tensor: int
  remat: str
  attn_kernel: str
  dtype: str

  def overrides(self, chips: int) -> list[str]:
    data = chips // (self.fsdp * self.tensor)
    return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={self.fsdp}",
            f"--config.mesh.tensor={self.tensor}", f"--config.model.remat={self.remat}",
            f"--config.model.attn_kernel={self.attn_kernel}", f"--config.model.dtype={self.dtype}"]

  def apply(self, config, chips: int):
    config = copy.deepcopy(config)
    with config.unlocked():
      config.mesh.update(data=chips // (self.fsdp * self.tensor), fsdp=self.fsdp,
                         tensor=self.tensor)
      config.model.update(remat=self.remat, attn_kernel=self.attn_kernel, dtype=self.dtype)
    return config

  @classmethod
  def of(cls, config, chips: int) -> "Setting":
    sizes = sh.resolve_mesh_shape(config.mesh, chips)
    return cls(fsdp=sizes["fsdp"], tensor=sizes["tensor"], remat=config.model.remat,
               attn_kernel=config.model.get("attn_kernel", "xla"), dtype=config.model.dtype)


@dataclasses.dataclass
class Estimate:
  topology: str
  chips: int
  batch: int
  setting: Setting
  state_bytes: int            # per chip, exact
  gradient_bytes: int         # per chip
  activation_bytes: int       # per chip, estimated
  code_bytes: int
  hbm_bytes_per_device: int
  flops_per_step: float       # all chips

  @property
  def bytes_per_device(self) -> int:
    return self.state_bytes + self.gradient_bytes + self.activation_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.bytes_per_device <= self.hbm_bytes_per_device

  @property
  def step_seconds(self) -> float:
    generation = topo_lib.topology(self.topology).generation
    return self.flops_per_step / (self.chips * PEAK_BF16_TFLOPS[generation] * 1e12 * ASSUMED_MFU)

  def chip_hours(self, steps: int = PAPER_STEPS) -> float:
    return self.step_seconds * steps * self.chips / 3600.0

  def to_json(self) -> dict[str, Any]:
    return dict(topology=self.topology, chips=self.chips, batch=self.batch,
                setting=dataclasses.asdict(self.setting), fits=self.fits,
                bytes_per_device=self.bytes_per_device, state_bytes=self.state_bytes,
                gradient_bytes=self.gradient_bytes, activation_bytes=self.activation_bytes,
                code_bytes=self.code_bytes, hbm_bytes_per_device=self.hbm_bytes_per_device,
                flops_per_step=self.flops_per_step, step_seconds=self.step_seconds,
                assumed_mfu=ASSUMED_MFU, chip_hours_500k=self.chip_hours(),
                overrides=self.setting.overrides(self.chips))


def shard_bytes(abstract_tree, shardings) -> tuple[int, int]:
  """(bytes of one device's shards, bytes of the whole tree)."""
  per, total = 0, 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    item = a.dtype.itemsize  # a typed PRNG key's dtype has its data's (threefry: 8)
    total += item * int(np.prod(a.shape))
    per += item * int(np.prod(s.shard_shape(a.shape)))
  return per, total


def plannable(config) -> tuple[Any, list[str]]:
  """The config the plan compiles and what it changed. Frozen networks whose weights would be read
  from disk (the text tower and VAE of ``objective.inputs=pipeline``) are left out: the plan
  compiles the step on precomputed embeddings, the latent-cache path of large runs."""
  notes = []
  config = copy.deepcopy(config)
  if config.objective.get("inputs") == "pipeline":
    with config.unlocked():
      config.objective.inputs = "embeddings"
    notes.append("planned on precomputed embeddings and latents (objective.inputs=embeddings): "
                 "the frozen text tower and VAE of inputs=pipeline are not in these figures")
  return config, notes


def _nbytes(tree) -> int:
  return sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _residuals(fn, params, *inputs) -> int:
  """Bytes per example that the backward pass of ``fn(params, *inputs)`` keeps: its vjp closure
  (traced, not run) at batch 2 less at batch 1 (``inputs`` have batch 1). What does not grow with
  the batch cancels: the weights, and their casts to a bf16 compute dtype."""
  sizes = []
  for b in (1, 2):
    args = [jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype) for a in inputs]
    with layers.building_for("tpu"):
      closure = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], params, *args)
    sizes.append(_nbytes(closure))
  return sizes[1] - sizes[0]


@functools.lru_cache(maxsize=256)
def _activations(model_json: str, latent: int, text_len: int) -> tuple[int, int]:
  """(residuals per example of the whole UNet, of its largest block alone) for a ``model``
  section (JSON) at ``latent``^2 latents and ``text_len`` tokens."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(json.loads(model_json))
  net = unet.from_config(cfg)
  dtype = jnp.dtype(cfg.dtype)
  ctx_dim = cfg.cross_attn_dim

  x = jax.ShapeDtypeStruct((1, latent, latent, cfg.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, text_len, ctx_dim), jnp.float32)
  params = jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros((1,)), ctx)
  whole = _residuals(lambda p, x, c: net.apply(p, x, jnp.zeros((x.shape[0],)), c), params, x,
                     ctx)
  # The largest blocks: level 0's resnet and (if it has attention) transformer, alone.
  width = cfg.width * cfg.channel_mult[0]
  h = jax.ShapeDtypeStruct((1, latent, latent, width), jnp.float32)
  blocks = [(unet.ResnetBlock2D(width, cfg.norm_groups, dtype=dtype),
             jax.ShapeDtypeStruct((1, 4 * cfg.width), jnp.float32))]
  if cfg.attn_levels[0]:
    heads = net.heads(width)
    blocks.append((unet.Transformer2D(heads[0], heads[1], heads[2], cfg.norm_groups, dtype=dtype,
                                      query_chunk=cfg.attn_query_chunk,
                                      attn_kernel=cfg.get("attn_kernel", "xla")), ctx))
  largest = 0
  for block, second in blocks:
    p = jax.eval_shape(block.init, jax.random.key(0), h, second)
    largest = max(largest, _residuals(block.apply, p, h, second))
  return whole, largest


def activations(config) -> tuple[int, int]:
  """Per-example residual bytes of ``config``'s UNet (whole, largest block), as the TPU runs it."""
  model = dict(config.model.to_dict())
  return _activations(json.dumps(model, sort_keys=True, default=list),
                      int(config.cost.latent_size), int(config.cost.text_len))


@functools.lru_cache(maxsize=64)
def _boxed_state(config_json: str):
  """The trainer's abstract training state (boxed: it shards on any mesh) for a config (JSON);
  built on a one-device abstract mesh, no devices needed."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import objectives, trainer  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.loads(config_json))
  mesh = _abstract_mesh((1,) * len(sh.MESH_AXES))
  objective = objectives.build(config)
  frozen = {k: objectives.Frozen(f.module, jax.eval_shape(lambda p=f.params: p))
            for k, f in objective.frozen().items()}
  with jax.sharding.use_abstract_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES):
    return trainer.build_program(config, objective, frozen, mesh).boxed


def _abstract_mesh(shape):
  return jax.sharding.AbstractMesh(tuple(shape), sh.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(sh.MESH_AXES))


def state_bytes(config, mesh_shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(training-state bytes per chip, trainable-parameter bytes per chip, state bytes) on a mesh of
  ``mesh_shape`` (data, fsdp, tensor): the trainer's state sharded by ``sharding.LOGICAL_RULES``,
  exactly as ``train`` places it."""
  config, _ = plannable(config)
  with config.unlocked():  # what does not change the state's shapes
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.model.update(remat="none", attn_kernel="xla", dtype="float32", attn_query_chunk=0)
  return _state_bytes(json.dumps(config.to_dict(), sort_keys=True, default=list),
                      tuple(mesh_shape))


@functools.lru_cache(maxsize=256)
def _state_bytes(config_json: str, mesh_shape: tuple[int, ...]) -> tuple[int, int, int]:
  boxed = _boxed_state(config_json)
  with flax.linen.logical_axis_rules(sh.LOGICAL_RULES):
    shardings = sh.tree_shardings(boxed, _abstract_mesh(mesh_shape))
  abstract = sh.unbox(boxed)
  per, total = shard_bytes(abstract, shardings)
  params, _ = shard_bytes(abstract.params, shardings.params)
  return per, params, total


def estimate(config, accelerator_type: str, *, batch: int | None = None,
             setting: Setting | None = None) -> Estimate:
  """The estimate for ``config`` (its mesh, remat, kernel and dtype, or ``setting``'s) on the
  slice ``accelerator_type`` at global ``batch`` (default ``train.batch_size``)."""
  from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
  topo = topo_lib.parse(accelerator_type)
  config, _ = plannable(config)
  if batch is not None:
    with config.unlocked():
      config.train.batch_size = int(batch)
  setting = setting or Setting.of(config, topo.chips)
  config = setting.apply(config, topo.chips)
  sizes = sh.resolve_mesh_shape(config.mesh, topo.chips)
  state, params, _ = state_bytes(config, tuple(sizes[a] for a in sh.MESH_AXES))
  whole, largest = activations(config)
  batch_shards = sizes["data"] * sizes["fsdp"]
  per_chip = -(-config.train.batch_size // batch_shards)
  # With remat, the block being recomputed holds its own residuals too (for the chip's batch).
  act = per_chip * (whole + (largest if setting.remat == "block" else 0))
  act = int(ACTIVATION_FACTOR[setting.remat] * act * tensor_share(sizes["tensor"]))
  forwards = 3 + (1 if setting.remat == "block" else 0)
  model = copy.deepcopy(config.model)
  with model.unlocked():  # the same forward FLOPs; one measurement per model
    model.update(remat="none", attn_kernel="xla", dtype="float32")
  _, gflops = cost.measure(model, config.cost)
  return Estimate(topology=topo.accelerator_type, chips=topo.chips,
                  batch=int(config.train.batch_size), setting=setting, state_bytes=state,
                  gradient_bytes=params, activation_bytes=act, code_bytes=CODE_BYTES,
                  hbm_bytes_per_device=int(topo.hbm_gib_per_chip * GIB),
                  flops_per_step=forwards * gflops * 1e9 * config.train.batch_size)


def tensor_share(tensor: int) -> float:
  """:data:`TENSOR_SHARE` (a config's own tensor axis of another size: ``1 / tensor``, an
  optimistic guess)."""
  return TENSOR_SHARE.get(tensor, 1.0 / tensor)


def candidates(config, chips: int, batch: int) -> Iterable[Setting]:
  """Meshes (fsdp a power of two, tensor 1, 2 or 4 (:data:`TENSOR_SHARE`), the rest data; the
  batch must split over data x fsdp), remat, attention kernel and dtype. By the estimate a tensor
  axis costs more activations than an fsdp axis of the same size (the measured shares times the
  larger batch per chip exceed 1), so it wins only where the batch cannot split over every chip."""
  sizes = [2**k for k in range(int(np.log2(chips)) + 1)]
  tensors = sorted({t for t in TENSOR_SHARE if t <= chips} | {max(1, int(config.mesh.tensor))})
  for tensor, fsdp in itertools.product(tensors, sizes):
    if chips % (fsdp * tensor) or batch % (chips // tensor):
      continue
    for remat, kernel, dtype in itertools.product(REMATS, layers.ATTN_KERNELS, DTYPES):
      yield Setting(fsdp, tensor, remat, kernel, dtype)


def rank(config, accelerator_type: str, *, batch: int | None = None,
         log=lambda _: None) -> list[Estimate]:
  """Every candidate's estimate, cheapest first: fitting before not, then by step time (remat
  costs a forward), then the fewest changes to the config (its own dtype, attention kernel and
  tensor axis), then the smallest fsdp (the least communication)."""
  topo = topo_lib.parse(accelerator_type)
  batch = int(batch or config.train.batch_size)
  own = Setting.of(config, topo.chips)
  out = []
  for setting in candidates(config, topo.chips, batch):
    out.append(estimate(config, accelerator_type, batch=batch, setting=setting))
    log(f"estimated {setting}: {out[-1].bytes_per_device / GIB:.1f} GiB per chip")
  key = lambda e: (not e.fits, round(e.step_seconds, 6), e.setting.dtype != own.dtype,
                   e.setting.attn_kernel != own.attn_kernel, e.setting.tensor != own.tensor,
                   e.setting.fsdp)
  return sorted(out, key=key)


def format_estimate(e: Estimate) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"
  s = e.setting
  return "\n".join([
      f"estimate for {e.topology} ({e.chips} chips), batch {e.batch}, mesh "
      f"({e.chips // (s.fsdp * s.tensor)}, {s.fsdp}, {s.tensor}), remat={s.remat}, "
      f"attn_kernel={s.attn_kernel}, dtype={s.dtype}, per chip:",
      f"  state {g(e.state_bytes)} + gradients {g(e.gradient_bytes)} + activations "
      f"{g(e.activation_bytes)} + code {g(e.code_bytes)} = {g(e.bytes_per_device)} of "
      f"{g(e.hbm_bytes_per_device)} HBM",
      f"  {e.flops_per_step / 1e15:.2f} PFLOP per step: {e.step_seconds:.3f} s at "
      f"{ASSUMED_MFU:.0%} (assumed) of the bf16 peak; {e.chip_hours():,.0f} chip-hours for "
      f"{PAPER_STEPS:,} steps",
      f"{'fits' if e.fits else 'does NOT fit'} by the estimate (the compiler decides: drop "
      f"--estimate)"])


def preference(config, chips: int, batch: int) -> list[Setting]:
  """The candidates in :func:`rank`'s order without their estimates: no remat first (a step costs
  3 forwards, not 4), then the config's dtype, kernel and tensor axis, then the smallest fsdp."""
  own = Setting.of(config, chips)
  key = lambda s: (s.remat != "none", s.dtype != own.dtype, s.attn_kernel != own.attn_kernel,
                   s.tensor != own.tensor, s.fsdp)
  return sorted(candidates(config, chips, batch), key=key)


def first_fit(config, accelerator_type: str, *, batch: int) -> Estimate | None:
  """The first candidate in :func:`preference` order that fits by the estimate (only those before
  it are estimated), or None."""
  chips = topo_lib.parse(accelerator_type).chips
  for setting in preference(config, chips, batch):
    e = estimate(config, accelerator_type, batch=batch, setting=setting)
    if e.fits:
      return e
  return None


def table(config, widths: Iterable[int], slices: Iterable[str], *, batch: int,
          log=lambda _: None) -> str:
  """Markdown: for each width (``unet.preset``) and slice, the first setting that fits by the
  estimate, its bytes per chip, step FLOPs, step time at :data:`ASSUMED_MFU` of the bf16 peak, and
  chip-hours for :data:`PAPER_STEPS` steps."""
  from ldm_scaling.models import cost, unet  # pylint: disable=g-import-not-at-top
  rows = ["| width | params | slice | fits with | GiB/chip (of HBM) | PFLOP/step | s/step | "
          "chip-hours, 500K steps |", "|---|---|---|---|---|---|---|---|"]
  for width in widths:
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.model.update(unet.preset(width, tuple(cfg.model.channel_mult)))
    params, _ = cost.measure(cfg.model, cfg.cost)
    for name in slices:
      e = first_fit(cfg, name, batch=batch)
      log(f"width {width} on {name}: {e.setting if e else 'does not fit'}")
      if e is None:
        rows.append(f"| {width} | {params / 1e6:,.0f}M | {name} | does not fit | | | | |")
        continue
      s = e.setting
      fsdp = f"fsdp {s.fsdp}" + (f", tensor {s.tensor}" if s.tensor > 1 else "")
      rows.append(
          f"| {width} | {params / 1e6:,.0f}M | {name} | {fsdp}, remat {s.remat}, {s.attn_kernel}, "
          f"{'bf16' if s.dtype == 'bfloat16' else 'f32'} | {e.bytes_per_device / GIB:.1f} "
          f"({e.hbm_bytes_per_device / GIB:.0f}) | {e.flops_per_step / 1e15:.2f} | "
          f"{e.step_seconds:.3f} | {e.chip_hours():,.0f} |")
  return "\n".join(rows)
