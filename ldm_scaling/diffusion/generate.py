"""``ldm-scaling sample``: prompts -> conditioning -> sampler -> decoder -> a labelled PNG grid.

Conditioning (prompts -> context embeddings, and the empty prompt's for guidance) and decoding
(latents -> images) are pluggable :class:`Conditioning` / :class:`Decoding` values, each with a
label that is printed and drawn on the grid. From a trained run (``--checkpoint WORKDIR``) they are
the run's text encoder and VAE and the UNet is its EMA. Without a checkpoint the UNet is a random
init and, when the config's text encoder / VAE cannot be loaded, the stand-ins say exactly what
they are: deterministic *random* per-prompt context vectors (not text conditioning) and the raw
latents (first 3 channels, normalised per image).

Parameters larger than a device: :func:`place_unet` shards the UNet over a mesh of the local
devices (``eval.parallel.model_mesh``: FSDP by the trainer's logical-axis rules, XLA gathering
each layer's weights inside the compiled sampler), optionally stored in bfloat16
(``eval.param_dtype``); a checkpoint's EMA is read into host memory first
(:func:`from_checkpoint`), so no device ever holds all of it. :func:`generate` takes the mesh from
sharded parameters and splits each batch's rows over it too; with parameters sharded over the
devices of several processes (a pod's training state: the trainer's preview) every process runs
the same program and gets all images back. On one device nothing is placed differently from a
plain call, so single-device results do not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import time
from typing import Callable, Sequence

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from ldm_scaling import data
from ldm_scaling import diffusion
from ldm_scaling import models
from ldm_scaling import runtime
from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError, WeightsError
from ldm_scaling.eval import parallel
from ldm_scaling.models import cost as costlib
from ldm_scaling.models import text
from ldm_scaling.models import unet
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.train import checkpoint

DEFAULT_PROMPT = "a red circle above a blue square"


@dataclasses.dataclass(frozen=True)
class Conditioning:
  encode: Callable[[Sequence[str]], np.ndarray]  # prompts -> (B, L, D) float32 context
  label: str


@dataclasses.dataclass(frozen=True)
class Decoding:
  decode: Callable[[np.ndarray], np.ndarray]  # latents (B, h, w, C) -> uint8 (B, H, W, 3)
  label: str


def random_conditioning(text_len: int, dim: int) -> Conditioning:
  """A stand-in text encoder: each prompt maps to fixed random vectors seeded by its SHA-256, so
  the same prompt always gets the same context (and "" the same unconditional one)."""
  def encode(prompts):
    out = []
    for p in prompts:
      seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
      out.append(np.random.default_rng(seed).standard_normal((text_len, dim), np.float32))
    return np.stack(out)
  return Conditioning(encode, "RANDOM per-prompt context vectors (no text encoder loaded): "
                              "not text conditioning")


def latent_preview() -> Decoding:
  """Latents shown as an image: the first 3 channels, each image min-max normalised."""
  def decode(latents):
    x = np.asarray(latents, np.float32)[..., :3]
    if x.shape[-1] < 3:
      x = np.concatenate([x] + [x[..., :1]] * (3 - x.shape[-1]), axis=-1)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return np.round(255 * (x - lo) / np.maximum(hi - lo, 1e-8)).astype(np.uint8)
  return Decoding(decode, "latents (no VAE loaded)")


def text_conditioning(config) -> Conditioning:
  """The config's frozen text encoder (e.g. the offline small CLIP's text tower)."""
  encoder = text.load_text_encoder(config)
  return Conditioning(lambda prompts: encoder.embed_text(list(prompts)),
                      f"text encoder {encoder.source}")


def to_uint8(images) -> np.ndarray:
  """Decoder output in [-1, 1] (unclipped) -> uint8."""
  x = np.asarray(images, np.float32)
  return np.round(np.clip((x + 1) * 127.5, 0, 255)).astype(np.uint8)


def vae_decoding(config) -> Decoding:
  """The config's VAE decoder (its scaling factor included)."""
  vae = vae_lib.load(config)
  return Decoding(lambda latents: to_uint8(vae.decode_latents(latents)), f"VAE {vae.source}")


def components(config, required: bool, log=print) -> tuple[Conditioning, Decoding]:
  """(conditioning, decoding) of the config; the labelled stand-ins if ``required`` is False and
  the real ones cannot be loaded (the reason is logged)."""
  try:
    conditioning = text_conditioning(config)
  except (WeightsError, OSError, ConfigError) as e:
    if required:
      raise
    log(f"text encoder unavailable ({e}); using random context vectors")
    conditioning = random_conditioning(config.text.max_length, config.model.cross_attn_dim)
  try:
    decoding = vae_decoding(config)
  except (WeightsError, OSError, ConfigError) as e:
    if required:
      raise
    log(f"VAE unavailable ({e}); showing latents")
    decoding = latent_preview()
  return conditioning, decoding


def host_sharding() -> jax.sharding.Sharding:
  """Where checkpoint weights are read to before :func:`place_unet` shards them: host memory (the
  CPU backend) when the process has one besides its accelerators, else the first local device (a
  CPU-only process: the same device as before)."""
  try:
    return jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_unet(workdir: str, step: int | None = None, which: str = "ema"):
  """(step, UNet parameters) of a run's checkpoint, in host memory (:func:`host_sharding`)."""
  step, weights = checkpoint.load_weights(workdir, step=step, which=which,
                                          sharding=host_sharding())
  if "unet" not in weights:
    raise ConfigError(f"run {workdir!r} has no 'unet' network (it has {sorted(weights)})")
  return step, weights["unet"]


def from_checkpoint(workdir: str, which: str = "ema"):
  """(config, apply_fn, params, step) of a training run's latest checkpoint; the parameters are in
  host memory until :func:`place_unet` puts them on devices."""
  config = checkpoint.load_run_config(workdir)
  step, params = load_unet(workdir, which=which)
  return config, unet_apply(models.build(config.model)), params, step


def _init_inputs(model):
  """The smallest valid UNet input (parameter shapes do not depend on the input size), with a
  guidance scale when the UNet takes one."""
  side = 2 ** (len(model.channel_mult) - 1)
  inputs = (jnp.zeros((1, side, side, model.in_channels), jnp.float32), jnp.zeros((1,)),
            jnp.zeros((1, 1, model.cross_attn_dim), jnp.float32))
  return inputs + ((jnp.ones((1,), jnp.float32),) if model.guidance_embed else ())


def _init_fn(model):
  """``init(key, *_init_inputs(model))``."""
  if model.guidance_embed:
    return lambda key, x, t, ctx, w: model.init(key, x, t, ctx, w=w)
  return model.init


def abstract_params(model):
  """The UNet's parameters as shapes and dtypes (``jax.eval_shape`` of its init; nothing is
  computed), with their logical-axis boxes."""
  return jax.eval_shape(_init_fn(model), jax.random.key(0), *_init_inputs(model))["params"]


def random_init(config, seed: int):
  """A random-init UNet: (apply_fn(params, x, t, context), params). Parameter shapes do not depend
  on the input size, so init runs on the smallest valid input."""
  model = models.build(config.model)
  params = runtime.run_once(_init_fn(model), jax.random.key(seed), *_init_inputs(model))["params"]
  return unet_apply(model), params


_SHARDINGS: dict = {}


def unet_shardings(config, mesh) -> dict:
  """The UNet's parameter shardings on ``mesh``, from its logical axis names and the trainer's
  rules (``sharding.tree_shardings``; axes that do not divide a dimension are dropped). Traced
  once per (model section, mesh)."""
  key = (repr(sorted(config.model.to_dict().items())), mesh)
  if key not in _SHARDINGS:
    model = models.build(config.model)
    _SHARDINGS[key] = sh.tree_shardings(abstract_params(model), mesh)
  return _SHARDINGS[key]


def place_unet(config, params, mesh=None, dtype: str = "float32"):
  """UNet ``params`` (host memory, one device or sharded) on ``mesh`` (default: every local
  device, ``parallel.model_mesh``), stored as ``dtype`` (``eval.param_dtype``: float32 |
  bfloat16; the layers compute in the activations' float32 either way). One device: the plain
  placement on it, nothing else, so results equal an unsharded call's."""
  mesh = mesh if mesh is not None else parallel.model_mesh()
  cast = parallel.param_dtype(dtype)
  devices = mesh.devices.flatten()
  if devices.size == 1:
    one = jax.sharding.SingleDeviceSharding(devices[0])
    return parallel.place(params, jax.tree.map(lambda _: one, params), cast)
  shardings = unet_shardings(config, mesh)
  params = sh.unbox(params)  # a random init's logical-axis boxes; checkpoints hold plain arrays
  if jax.tree.structure(shardings) != jax.tree.structure(params):
    raise ConfigError("the checkpoint's UNet parameters do not match the config's model section; "
                      "sample it with the run's own config")
  return parallel.place(params, shardings, cast)


_APPLY = {}


def unet_apply(model):
  """One apply function per model (the compiled-program cache is keyed on it). A guidance-embedded
  UNet's takes the guidance scales as a fifth argument: ``apply(params, x, t, ctx, w)``."""
  if model not in _APPLY:
    if getattr(model, "guidance_embed", False):
      _APPLY[model] = lambda params, x, t, ctx, w: model.apply({"params": params}, x, t, ctx, w=w)
    else:
      _APPLY[model] = lambda params, x, t, ctx: model.apply({"params": params}, x, t, ctx)
  return _APPLY[model]


_SCALE_INPUT = {}


def scale_input_apply(apply_fn):
  """``apply(params, x, t, ctx, w)`` of a guidance-embedded UNet as the samplers' four-argument
  ``fn({"unet": params, "w": w}, x, t, ctx)``: the guidance scales ride with the parameters into
  the compiled program, which then runs the UNet once per step, unguided (no unconditional pass),
  whatever the scales. One function per ``apply_fn`` (the compiled-program cache is keyed on it)."""
  if apply_fn not in _SCALE_INPUT:
    _SCALE_INPUT[apply_fn] = lambda p, x, t, ctx: apply_fn(p["unet"], x, t, ctx, p["w"])
  return _SCALE_INPUT[apply_fn]


def guidance_embedded(config) -> bool:
  """Whether the config's UNet takes the guidance scale as an input (``model.guidance_embed``): it
  is sampled with one forward per step at every scale (:func:`generate`)."""
  return bool(config.model.get("guidance_embed", False))


@dataclasses.dataclass
class Result:
  images: np.ndarray      # (prompts * scales, H, W, 3) uint8, prompt-major
  latents: np.ndarray     # (prompts * scales, h, w, C)
  cost: np.ndarray        # sampling cost per image
  seconds: float
  compile_s: float


def generate(config, prompts: Sequence[str], *, apply_fn, params, sampler: str, steps: int,
             cfg_scales: Sequence[float], seed: int, batch_size: int, latent_size: int,
             conditioning: Conditioning, decoding: Decoding, norm_cost: float | None = None,
             step_progress: bool = False, log: Callable[[str], None] = print,
             mesh: jax.sharding.Mesh | None = None) -> Result:
  """One image per (prompt, scale), prompt-major. All scales of a prompt share its initial noise
  and sampler key (``fold_in(key(seed), prompt index)``), so a row is a clean CFG sweep; a batch
  mixes scales in one compiled program. The last batch is padded, so everything compiles once.

  A guidance-embedded UNet (``model.guidance_embed``: ``apply_fn(params, x, t, ctx, w)``, as
  :func:`unet_apply` makes it) gets each cell's scale as its input ``w`` and runs once per step,
  unguided; its sampling cost is that of unguided steps (1 forward each) at every scale.

  ``mesh`` (default: the mesh of ``params`` when they are sharded over several devices, see
  :func:`place_unet`): each batch's rows are split over its batch axes (padded to a multiple of
  their size); the images come back whole to every process."""
  _check_request(config, prompts, batch_size, latent_size)
  mesh = mesh if mesh is not None else _params_mesh(params)
  rows = _row_sharding(mesh) if mesh is not None and mesh.devices.size > 1 else None
  cells = [(p, float(w)) for p in range(len(prompts)) for w in cfg_scales]
  base = jax.random.key(seed)
  shape = (latent_size, latent_size, config.model.in_channels)
  context = conditioning.encode(list(prompts))
  uncond = conditioning.encode([""])
  if norm_cost is None:
    norm_cost = costlib.model_cost(config.model, config.cost).norm_cost
  on_step = _step_logger(steps, log) if step_progress else None
  embedded = guidance_embedded(config)
  fn = scale_input_apply(apply_fn) if embedded else apply_fn

  chunks = [cells[i:i + batch_size] for i in range(0, len(cells), batch_size)]
  latents, costs, compile_s, run_s, start = [], [], 0.0, 0.0, time.perf_counter()
  for k, chunk in enumerate(chunks):
    n = len(chunk)
    size = batch_size if len(chunks) > 1 else n
    if rows is not None:  # every device gets the same number of rows
      parts = _row_count(rows)
      size = -(-size // parts) * parts
    padded = chunk + [chunk[-1]] * (size - n)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.array([p for p, _ in padded]))
    noise = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, 0), shape))(keys)
    step_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 1))(keys)
    ctx, unc = context[[p for p, _ in padded]], uncond
    scales = np.array([w for _, w in padded], np.float32)
    if rows is not None:
      noise, ctx = _global(noise, rows), _global(ctx, rows)
      step_keys = jax.random.wrap_key_data(_global(jax.random.key_data(step_keys), rows))
      unc = _global(uncond, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    if embedded:  # the scales are the UNet's input: one unguided forward per step
      w = _global(scales, rows) if rows is not None else jnp.asarray(scales)
      net, unc, scales = {"unet": params, "w": w}, None, None
    else:
      net = params
    out = diffusion.sample(
        config, fn, net, noise, ctx, key=step_keys, uncond_context=unc, cfg_scale=scales,
        sampler=sampler, steps=steps, norm_cost=norm_cost, on_step=on_step, log=log)
    compile_s += out.compile_s
    run_s += out.run_s
    latents.append(_to_host(out.x)[:n])
    costs.append(out.cost[:n])
    done = sum(len(c) for c in chunks[:k + 1])
    if len(chunks) > 1:
      eta = run_s / (k + 1) * (len(chunks) - k - 1)
      log(f"batch {k + 1}/{len(chunks)}: {done}/{len(cells)} images, {out.run_s:.1f} s this "
          f"batch, ETA {eta:.0f} s")
  seconds = time.perf_counter() - start
  latents = np.concatenate(latents)
  log(f"sampled {len(cells)} images in {seconds - compile_s:.1f} s "
      f"(+ {compile_s:.1f} s compiling)")
  return Result(images=decoding.decode(latents), latents=latents, cost=np.concatenate(costs),
                seconds=seconds, compile_s=compile_s)


def _params_mesh(params) -> jax.sharding.Mesh | None:
  """The mesh ``params`` are sharded on (the first leaf with a NamedSharding), or None."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return None


def _row_sharding(mesh) -> jax.sharding.NamedSharding:
  """Batch rows over the mesh's batch axes (``sharding.batch_sharding``: data x fsdp), or over
  all its axes when it has neither."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or tuple(mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def _row_count(rows: jax.sharding.NamedSharding) -> int:
  return math.prod(rows.mesh.shape[a] for a in rows.spec[0])


def _global(x, sharding) -> jax.Array:
  """A host value every process holds alike -> one array laid out by ``sharding`` (each process
  supplies its own devices' slices)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(x) -> np.ndarray:
  """An array -> numpy on this process, gathered from the other processes where it spans them."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_request(config, prompts, batch_size: int, latent_size: int) -> None:
  if not prompts:
    raise ConfigError("give at least one prompt")
  if batch_size < 1:
    raise ConfigError(f"batch size must be >= 1, got {batch_size}")
  down = unet.down_factor(config.model)
  if latent_size < 1 or latent_size % down:
    raise ConfigError(f"latent size {latent_size} must be a positive multiple of {down} (the "
                      f"UNet downsamples {len(config.model.channel_mult) - 1} times)")


def _step_logger(steps: int, log):
  every = max(1, steps // 10)

  def on_step(i):
    i = int(i)
    if (i + 1) % every == 0 or i + 1 == steps:
      log(f"  step {i + 1}/{steps}")
  return on_step


def save_grid(path: str, images: np.ndarray, row_labels: Sequence[str],
              col_labels: Sequence[str], header: Sequence[str], min_cell: int = 96) -> np.ndarray:
  """Writes a labelled grid (rows x cols cells, row-major ``images``) as PNG; returns it (uint8
  RGB)."""
  rows, cols = len(row_labels), len(col_labels)
  h, w = images.shape[1:3]
  scale = max(1, math.ceil(min_cell / min(h, w)))
  ch, cw = h * scale, w * scale
  line, pad, left = 12, 4, 150
  top = pad + line * (len(header) + 1) + pad
  width = max(left + cols * (cw + pad) + pad, 7 * max(len(s) for s in header) + 2 * pad)
  canvas = Image.new("RGB", (width, top + rows * (ch + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i, label in enumerate(header):
    draw.text((pad, pad + i * line), label, fill="black")
  for c, label in enumerate(col_labels):
    draw.text((left + c * (cw + pad), top - line - 2), label, fill="black")
  for r, label in enumerate(row_labels):
    y = top + r * (ch + pad)
    for j in range(0, min(len(label), 4 * 22), 22):
      draw.text((pad, y + (j // 22) * line), label[j:j + 22], fill="black")
    for c in range(cols):
      cell = Image.fromarray(images[r * cols + c]).resize((cw, ch), Image.NEAREST)
      canvas.paste(cell, (left + c * (cw + pad), y))
  out, buf = epath.Path(path), io.BytesIO()  # local or gs://
  canvas.save(buf, format="PNG")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(buf.getvalue())
  return np.asarray(canvas)


def main(config, *, prompts: Sequence[str], sampler: str | None, steps: int | None,
         cfg_scales: Sequence[float] | None, seed: int, out: str, checkpoint: str | None,
         batch_size: int, latent_size: int | None, step_progress: bool = False,
         log: Callable[[str], None] = print) -> dict:
  """What ``ldm-scaling sample`` does; returns the summary it prints as JSON."""
  # How the weights are stored while sampling is a choice of this command, not of the run.
  asked = config
  if checkpoint:
    run_config, apply_fn, params, step = from_checkpoint(checkpoint)
    if config is not None and config.model.to_dict() != run_config.model.to_dict():
      log("note: the model section of --config differs from the run's; using the run's")
    config = run_config
  dtype = (asked if asked is not None else config).eval.param_dtype
  parallel.param_dtype(dtype)
  sampler = sampler or config.eval.samplers[0]
  steps = int(steps if steps is not None else config.eval.steps[0])
  cfg_scales = [float(w) for w in (cfg_scales or config.eval.cfg_scales)]
  latent_size = latent_size or data.latent_size(config)
  # Everything that can be checked without compiling is checked first.
  _check_request(config, prompts, batch_size, latent_size)
  schedule = diffusion.schedule_from_config(config.diffusion)
  diffusion.samplers.build_grid(sampler, schedule, steps, config.diffusion.prediction,
                                diffusion.options_from_config(config))

  conditioning, decoding = components(config, required=bool(checkpoint), log=log)
  if checkpoint:
    weights = f"EMA of {checkpoint} at step {step} (width {config.model.width})"
  else:
    weights = (f"random-init UNet (width {config.model.width}, seed {config.train.seed}; "
               f"no checkpoint)")
  log(f"model: {weights}")
  log(f"conditioning: {conditioning.label}")
  log(f"output: {decoding.label}")
  if not checkpoint:
    log("initialising the UNet...")
    apply_fn, params = random_init(config, config.train.seed)
  mesh = parallel.model_mesh()
  params = place_unet(config, params, mesh, dtype)
  if mesh.devices.size > 1 or dtype != "float32":
    log(f"UNet parameters: {dtype}, sharded over {mesh.devices.size} "
        f"{mesh.devices.flat[0].platform} device(s)")
  norm_cost = costlib.model_cost(config.model, config.cost).norm_cost
  log(f"sampling {len(prompts)} prompt(s) x {len(cfg_scales)} guidance scale(s) with {sampler}, "
      f"{steps} steps, {latent_size}x{latent_size} latents, seed {seed}")
  result = generate(config, prompts, apply_fn=apply_fn, params=params, sampler=sampler,
                    steps=steps, cfg_scales=cfg_scales, seed=seed, batch_size=batch_size,
                    latent_size=latent_size, conditioning=conditioning, decoding=decoding,
                    norm_cost=norm_cost, step_progress=step_progress, log=log)
  header = [f"{decoding.label} | {weights}", conditioning.label,
            f"{sampler}, {steps} steps, seed {seed}"]
  save_grid(out, result.images, list(prompts), [f"cfg {w:g}" for w in cfg_scales], header)
  cost_by_scale = {f"{w:g}": float(c) for w, c in zip(cfg_scales, result.cost[:len(cfg_scales)])}
  log(f"wrote {out}; sampling cost per image (normalised cost {norm_cost:.4f} x {steps} steps"
      f"{' x 2 for guided steps' if config.cost.count_uncond_pass else ''}): {cost_by_scale}")
  return dict(out=out, images=int(len(result.images)), prompts=list(prompts), sampler=sampler,
              steps=steps, cfg_scales=cfg_scales, seed=seed, latent_size=latent_size,
              norm_cost=norm_cost, sampling_cost=cost_by_scale, model=weights,
              param_dtype=dtype,
              conditioning=conditioning.label, decoder=decoding.label,
              seconds=round(result.seconds, 3), compile_seconds=round(result.compile_s, 3))

