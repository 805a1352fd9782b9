"""Training the project's own KL-VAE (``ldm-scaling train-vae``), its scaling factor, and latents.

- :func:`train`: reconstruction (L1 or L2) + KL, SD's weighting (``vae.kl_weight`` times the KL
  summed over latent elements, against the reconstruction summed over pixels; both divided by the
  number of pixel values). No adversarial or perceptual term (a patch GAN can come later).
- The scaling factor is computed, not guessed: ``1 / std`` of posterior samples of training
  images, so scaled latents have unit variance as the diffusion prior assumes (SD's 0.18215 was
  obtained the same way). It is stored with the weights.
- Storage: ``params.msgpack`` (flax serialization) + ``config.json`` in diffusers' AutoencoderKL
  vocabulary (block_out_channels, layers_per_block, latent_channels, norm_num_groups,
  scaling_factor, ...) + training metadata.
- :func:`ensure_vae` trains only when absent; :func:`psnr` measures held-out reconstruction.
- :func:`cache_latents` writes posterior moments (and those of the mirrored image when
  ``data.flip`` is on) to array_record, read back by ``data.name="latents:<dir>"``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from ldm_scaling import sharding
from ldm_scaling.models import vae as vae_lib

PARAMS = "params.msgpack"
CONFIG = "config.json"
ARCH_KEYS = ("width", "channel_mult", "layers_per_block", "latent_channels", "norm_groups",
             "mid_attention")


def default_dir(config: ml_collections.ConfigDict) -> str:
  """``vae.dir``, or a cache directory keyed by the vae section and the training data."""
  if config.vae.dir:
    return os.path.expanduser(config.vae.dir)
  import hashlib  # pylint: disable=g-import-not-at-top
  v = {k: v for k, v in config.vae.to_dict().items()
       if k not in ("dir", "weights", "subfolder", "scaling_factor")}
  d = {k: config.data[k] for k in ("name", "resolution", "shapes_sizes")}
  key = hashlib.sha256(json.dumps(dict(vae=v, data=d), sort_keys=True, default=list).encode())
  root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                      "ldm_scaling")
  return os.path.join(root, "vae", key.hexdigest()[:12])


def _diffusers_config(cfg: ml_collections.ConfigDict, scaling: float, extra: dict) -> dict:
  n = len(cfg.channel_mult)
  return dict(
      _class_name="AutoencoderKL", in_channels=3, out_channels=3,
      down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
      block_out_channels=[cfg.width * m for m in cfg.channel_mult],
      layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
      norm_num_groups=cfg.norm_groups, mid_block_add_attention=cfg.mid_attention,
      act_fn="silu", scaling_factor=scaling, ldm_scaling=extra)


def load_trained(config: ml_collections.ConfigDict, directory: str | None = None) -> vae_lib.VAE:
  """The trained VAE in ``directory`` (default :func:`default_dir`), checked against the config."""
  import flax  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models.text import WeightsError  # pylint: disable=g-import-not-at-top
  directory = directory or default_dir(config)
  params_path, cfg_path = os.path.join(directory, PARAMS), os.path.join(directory, CONFIG)
  if not (os.path.isfile(params_path) and os.path.isfile(cfg_path)):
    raise WeightsError(
        f"no trained VAE in {directory!r} (vae.weights={vae_lib.TRAINED!r}); train it with "
        f"`ldm-scaling train-vae --config <your config>` (minutes on CPU) or call "
        f"ldm_scaling.models.vae_train.ensure_vae(config)")
  with open(cfg_path, encoding="utf-8") as f:
    stored = json.load(f)
  vae_lib.check_diffusers_config(config.vae, stored)
  module = vae_lib.from_config(config.vae)
  template = sharding.unbox(vae_lib.abstract_params(module))
  with open(params_path, "rb") as f:
    try:
      params = flax.serialization.from_bytes(template, f.read())
    except (ValueError, KeyError) as e:
      raise WeightsError(f"VAE weights {params_path!r} do not match the vae config ({e}); "
                         f"retrain or fix vae.*") from None
  scaling = config.vae.scaling_factor or float(stored["scaling_factor"])
  return vae_lib.VAE(module, params, scaling, source=directory)


def ensure_vae(config: ml_collections.ConfigDict, directory: str | None = None,
               log=print) -> str:
  """The trained VAE's directory; trains it first if absent."""
  directory = directory or default_dir(config)
  if os.path.isfile(os.path.join(directory, PARAMS)):
    load_trained(config, directory)  # checks that it fits the config
    return directory
  train(config, directory, log=log)
  return directory


def _lr_schedule(cfg):
  import optax  # pylint: disable=g-import-not-at-top
  warm = max(1, min(100, cfg.steps // 10))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(cfg.steps, warm + 1),
                                            end_value=cfg.lr * 0.05)


def loss_terms(module, params, images, rng, rec_loss: str):
  """(reconstruction per pixel value, KL per pixel value) of one batch."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  recon, mean, logvar = module.apply({"params": params}, images, rng)
  diff = recon - images
  rec = jnp.abs(diff).mean() if rec_loss == "l1" else jnp.square(diff).mean()
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  return rec, kl.mean() / np.prod(images.shape[1:])


def train(config: ml_collections.ConfigDict, directory: str, log=print) -> dict[str, Any]:
  """Trains the VAE of ``config.vae`` on ``config.data`` and saves it with its scaling factor."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top

  cfg = config.vae
  start = time.time()
  module = vae_lib.from_config(cfg)
  it = data_lib.make_pipeline(config, config.data.train_split, batch_size=cfg.batch_size,
                              seed=cfg.seed, process_index=0, process_count=1, tokenizer=None,
                              workers=0)
  r = config.data.resolution
  params = sharding.unbox(jax.jit(module.init)(
      jax.random.key(cfg.seed), np.zeros((1, r, r, 3), np.float32))["params"])
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_lr_schedule(cfg)))
  opt_state = opt.init(params)

  @jax.jit
  def step(p, s, images, rng):
    def loss_fn(p):
      rec, kl = loss_terms(module, p, images, rng, cfg.rec_loss)
      return rec + cfg.kl_weight * kl, (rec, kl)
    (loss, (rec, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, rec, kl

  log(f"train-vae: {cfg.steps} steps x batch {cfg.batch_size} on {config.data.name} at {r} px, "
      f"f={module.down_factor}, {cfg.latent_channels} latent channels -> {directory}")
  key = jax.random.key(cfg.seed + 1)
  history = []
  for i in range(cfg.steps):
    batch = next(it)
    params, opt_state, loss, rec, kl = step(params, opt_state, batch["images"],
                                            jax.random.fold_in(key, i))
    if (i + 1) % max(1, cfg.steps // 10) == 0 or i == 0:
      loss, rec, kl = float(loss), float(rec), float(kl)
      if not np.isfinite(loss):
        raise FloatingPointError(f"train-vae: loss is {loss} at step {i + 1}; lower vae.lr")
      history.append(dict(step=i + 1, loss=loss, rec=rec, kl=kl))
      log(f"  step {i + 1}/{cfg.steps}  loss {loss:.4f}  {cfg.rec_loss} {rec:.4f}  kl {kl:.3f}  "
          f"({time.time() - start:.0f}s)")
  train_seconds = time.time() - start

  scaling = compute_scaling_factor(config, module, params)
  trained = vae_lib.VAE(module, params, scaling, source=directory)
  metrics = psnr(config, trained)
  extra = dict(vae=cfg.to_dict(), data=dict(name=config.data.name, resolution=r,
                                            shapes_sizes=list(config.data.shapes_sizes)),
               train_seconds=round(train_seconds, 1), history=history, heldout=metrics,
               scaling_factor_from="1/std of posterior samples of 2048 training images")
  tmp = directory.rstrip("/") + f".tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, PARAMS), "wb") as f:
    f.write(flax.serialization.to_bytes(jax.device_get(params)))
  with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
    json.dump(_diffusers_config(cfg, scaling, extra), f, indent=1, default=list)
  os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  log(f"train-vae: done in {train_seconds:.0f}s; scaling factor {scaling:.4f}; held-out PSNR "
      f"{metrics['psnr']:.2f} dB on {metrics['n']} images")
  return extra


def compute_scaling_factor(config: ml_collections.ConfigDict, module, params,
                           n: int = 2048) -> float:
  """1 / std of posterior samples z ~ q(z | x) over ``n`` training images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top
  split = config.data.train_split
  n = min(n, len(data_lib.source(config, split).records))
  it = data_lib.make_pipeline(config, split, batch_size=min(256, n), seed=12345,
                              process_index=0, process_count=1, num_epochs=1, shuffle=True,
                              tokenizer=None, workers=0)

  @jax.jit
  def sample(images, rng):
    mean, logvar = module.apply({"params": params}, images, method="encode")
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)

  zs, seen = [], 0
  for i, batch in enumerate(it):
    zs.append(np.asarray(sample(batch["images"], jax.random.key(i))))
    seen += len(batch["images"])
    if seen >= n:
      break
  z = np.concatenate(zs).astype(np.float64)
  return float(1.0 / z.std())


def psnr(config: ml_collections.ConfigDict, vae: vae_lib.VAE, n: int = 512) -> dict[str, float]:
  """Mean per-image PSNR (dB, images in [0, 1]) of encode(mean) -> decode on held-out images."""
  from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top
  split = config.data.eval_split
  n = min(n, len(data_lib.source(config, split).records))
  bs = min(128, n)
  it = data_lib.make_pipeline(config, split, batch_size=bs, seed=0, process_index=0,
                              process_count=1, num_epochs=1, shuffle=False, tokenizer=None,
                              workers=0, drop_remainder=False)
  values, mse_all = [], []
  for batch in it:
    x = batch["images"]
    y = np.asarray(vae.decode_latents(vae.encode_images(x)))
    mse = np.mean((np.clip((y + 1) / 2, 0, 1) - (x + 1) / 2) ** 2, axis=(1, 2, 3))
    values.append(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))
    mse_all.append(mse)
    if sum(len(v) for v in values) >= n:
      break
  values = np.concatenate(values)[:n]
  return dict(psnr=float(values.mean()), n=int(len(values)), split=split,
              rmse=float(np.sqrt(np.concatenate(mse_all)[:n].mean())))


# -------------------------------------------------------------------------------------------------
# Latent caching (array_record), read back through data.name = "latents:<dir>".

LATENT_META = "latents.json"


def cache_latents(config: ml_collections.ConfigDict, vae: vae_lib.VAE, directory: str,
                  splits: tuple[str, ...] | None = None, batch_size: int = 128) -> dict[str, Any]:
  """Encodes ``config.data`` once and writes posterior moments (float16) + captions per split to
  ``directory/<split>.array_record``; with ``data.flip`` on, the mirrored image's moments too, so
  flip augmentation survives caching. Latents are sampled (and scaled) when read."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top
  splits = splits or (config.data.train_split, config.data.eval_split)
  flip = config.data.flip != "none"
  module, params = vae.module, vae.params

  @jax.jit
  def moments(images):
    mean, logvar = module.apply({"params": params}, images, method="encode")
    return mean, logvar

  os.makedirs(directory, exist_ok=True)
  counts = {}
  for split in splits:
    n = len(data_lib.source(config, split).records)
    it = data_lib.make_pipeline(config, split, batch_size=min(batch_size, n), seed=0,
                                process_index=0, process_count=1, num_epochs=1, shuffle=False,
                                tokenizer=None, workers=0, drop_remainder=False)
    path = os.path.join(directory, f"{split}.array_record")
    writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
    count = 0
    for batch in it:
      x = batch["images"]
      mean, logvar = (np.asarray(a, np.float16) for a in moments(x))
      if flip:
        fmean, flogvar = (np.asarray(a, np.float16) for a in moments(x[:, :, ::-1]))
      for j, caption in enumerate(batch["captions"]):
        rec = dict(mean=mean[j], logvar=logvar[j], caption=str(caption))
        if flip:
          rec.update(flip_mean=fmean[j], flip_logvar=flogvar[j])
        writer.write(flax.serialization.msgpack_serialize(rec))
        count += 1
    writer.close()
    os.replace(path + ".tmp", path)
    counts[split] = count
  meta = dict(scaling_factor=vae.scaling_factor, vae=vae.source, counts=counts,
              data=dict(name=config.data.name, resolution=config.data.resolution),
              flip=flip, latent_shape=list(mean.shape[1:]))
  with open(os.path.join(directory, LATENT_META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  return meta


class LatentRecords:
  """Random access over a cached split, decoding msgpack records and carrying the scaling factor."""

  def __init__(self, directory: str, split: str):
    import grain  # pylint: disable=g-import-not-at-top
    from ldm_scaling.data.pipeline import DataError  # pylint: disable=g-import-not-at-top
    meta_path = os.path.join(directory, LATENT_META)
    path = os.path.join(directory, f"{split}.array_record")
    if not (os.path.isfile(meta_path) and os.path.isfile(path)):
      raise DataError(f"no latent cache for split {split!r} in {directory!r}; write one with "
                      f"ldm_scaling.models.vae_train.cache_latents(config, vae, directory)")
    with open(meta_path, encoding="utf-8") as f:
      self.meta = json.load(f)
    self.scaling_factor = float(self.meta["scaling_factor"])
    self._source = grain.sources.ArrayRecordDataSource([path])

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    import flax  # pylint: disable=g-import-not-at-top
    rec = flax.serialization.msgpack_restore(self._source[index])
    rec["scaling_factor"] = self.scaling_factor
    return rec


def latent_cache_source(directory: str, split: str) -> LatentRecords:
  return LatentRecords(os.path.expanduser(directory), split)


def latent_record(rec: dict, rng: np.random.Generator, opts) -> dict[str, Any]:
  """A cached record -> {"latents": scaled posterior sample (float32), "captions": str}, with the
  same flip (caption-aware) and caption-dropout rules as images."""
  from ldm_scaling.data import preprocess  # pylint: disable=g-import-not-at-top
  caption = str(rec["caption"])
  mean, logvar = rec["mean"], rec["logvar"]
  if opts.flip != "none" and "flip_mean" in rec and rng.random() < 0.5:
    mean, logvar = rec["flip_mean"], rec["flip_logvar"]
    if opts.flip == "caption_aware":
      caption = preprocess.swap_left_right(caption)
  if opts.caption_dropout > 0 and rng.random() < opts.caption_dropout:
    caption = ""
  mean = np.asarray(mean, np.float32)
  std = np.exp(0.5 * np.asarray(logvar, np.float32))
  z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
  return {"latents": z * rec["scaling_factor"], "captions": caption}

