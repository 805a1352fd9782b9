"""The project's trained KL-VAE: trained by the one trainer, exported with its scaling factor.

- :func:`train`: the ``vae`` objective (``ldm_scaling.train.objectives.autoencoder``) run by
  ``trainer.train`` in ``<dir>/train`` (so it is sharded, resumes exactly after an interruption,
  honours SIGTERM and the NaN guard, logs to TensorBoard and ``metrics.jsonl``), then exported.
- The scaling factor is computed, not guessed: ``1 / std`` of posterior samples of training
  images, so scaled latents have unit variance as the diffusion prior assumes (SD's 0.18215 was
  obtained the same way). It is stored with the weights.
- Storage (``models.vae``): ``params.msgpack`` + ``config.json`` in diffusers' AutoencoderKL
  vocabulary + training metadata, written last so a directory holding ``params.msgpack`` is
  complete.
- :func:`ensure` trains only when absent; :func:`psnr` measures held-out reconstruction;
  :func:`cache_latents` writes posterior moments for ``data.name="latents:<dir>"``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from array_record.python import array_record_module
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_scaling import data
from ldm_scaling import files
from ldm_scaling.data import latents
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.train import checkpoint
from ldm_scaling.train import metrics as metrics_lib
from ldm_scaling.train import trainer
from ldm_scaling.train.objectives import autoencoder


def workdir(directory: str) -> str:
  """The training run of the VAE stored in ``directory``."""
  return os.path.join(directory, "train")


def ensure(config: ml_collections.ConfigDict, directory: str | None = None,
           log: Callable[[str], None] = print) -> str:
  """The trained VAE's directory; trains it first (or finishes an interrupted run) if absent."""
  directory = directory or vae_lib.default_dir(config)
  if os.path.isfile(os.path.join(directory, vae_lib.PARAMS)):
    vae_lib.load_trained(config, directory)  # checks that it fits the config
    return directory
  train(config, directory, log=log)
  return directory


def train(config: ml_collections.ConfigDict, directory: str, log: Callable[[str], None] = print,
          force: bool = False) -> dict[str, Any]:
  """Trains the VAE of ``config.vae`` on ``config.data`` (resuming ``<directory>/train``) and
  exports it to ``directory`` with its scaling factor; returns the metadata stored with it."""
  cfg = config.vae
  run = autoencoder.training_config(config)
  if force:
    for name in (vae_lib.PARAMS, vae_lib.CONFIG):
      if os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
    shutil.rmtree(workdir(directory), ignore_errors=True)
  log(f"train-vae: {cfg.steps} steps x batch {cfg.batch_size} on {config.data.name} at "
      f"{config.data.resolution} px, f={vae_lib.down_factor(cfg)}, {cfg.latent_channels} latent "
      f"channels -> {directory}")
  start = time.time()
  result = trainer.train(run, workdir(directory))
  if result.stopped != "done":
    raise SystemExit(f"train-vae stopped ({result.stopped}) at step {result.step}; run it again "
                     f"to resume from {workdir(directory)}")
  train_seconds = time.time() - start
  _, weights = checkpoint.load_weights(workdir(directory), which="params")
  params = jax.device_get(weights["vae"])
  module = vae_lib.from_config(cfg)
  scaling = compute_scaling_factor(config, module, params)
  trained = vae_lib.VAE(module, params, scaling, source=directory)
  metrics = psnr(config, trained)
  extra = dict(vae=cfg.to_dict(), data=dict(name=config.data.name,
                                            resolution=config.data.resolution,
                                            shapes_sizes=list(config.data.shapes_sizes)),
               train_seconds=round(train_seconds, 1),
               history=metrics_lib.history(workdir(directory)),
               heldout=metrics, trained_in=workdir(directory),
               scaling_factor_from="1/std of posterior samples of 2048 training images")
  os.makedirs(directory, exist_ok=True)
  files.atomic_write_text(os.path.join(directory, vae_lib.CONFIG), json.dumps(
      vae_lib.diffusers_config(cfg, scaling, extra), indent=1, default=list))
  files.atomic_write_bytes(os.path.join(directory, vae_lib.PARAMS),
                           flax.serialization.to_bytes(params))  # last: marks it complete
  log(f"train-vae: done in {train_seconds:.0f}s; scaling factor {scaling:.4f}; held-out PSNR "
      f"{metrics['psnr']:.2f} dB on {metrics['n']} images")
  return extra


def compute_scaling_factor(config: ml_collections.ConfigDict, module, params,
                           n: int = 2048) -> float:
  """1 / std of posterior samples z ~ q(z | x) over ``n`` training images."""
  split = config.data.train_split
  n = min(n, len(data.source(config, split).records))
  it = data.make_pipeline(config, split, batch_size=min(256, n), seed=12345, process_index=0,
                          process_count=1, num_epochs=1, shuffle=True, tokenizer=None, workers=0)

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
  split = config.data.eval_split
  n = min(n, len(data.source(config, split).records))
  it = data.make_pipeline(config, split, batch_size=min(128, n), seed=0, process_index=0,
                          process_count=1, num_epochs=1, shuffle=False, tokenizer=None, workers=0,
                          drop_remainder=False)
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
# Latent caching (array_record), read back through data.name = "latents:<dir>" (data.latents).


def cache_latents(config: ml_collections.ConfigDict, vae: vae_lib.VAE, directory: str,
                  splits: tuple[str, ...] | None = None, batch_size: int = 128,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Encodes ``config.data`` once and writes posterior moments (float16) + captions per split to
  ``directory/<split>.array_record``; with ``data.flip`` on, the mirrored image's moments too, so
  flip augmentation survives caching. Latents are sampled (and scaled) when read.

  ``directory`` is local or ``gs://``: each split is written to a local file (array_record writes
  local files only) and then copied there; ``latents.json`` is written last, so a directory that
  has it is complete (``data.latents``)."""
  splits = splits or (config.data.train_split, config.data.eval_split)
  flip = config.data.flip != "none"
  module, params = vae.module, vae.params

  @jax.jit
  def moments(images):
    mean, logvar = module.apply({"params": params}, images, method="encode")
    return mean, logvar

  out = epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  counts, latent_shape = {}, None
  with tempfile.TemporaryDirectory(prefix="ldm-scaling-latents-") as staging:
    for split in splits:
      n = len(data.source(config, split).records)
      it = data.make_pipeline(config, split, batch_size=min(batch_size, n), seed=0,
                              process_index=0, process_count=1, num_epochs=1, shuffle=False,
                              tokenizer=None, workers=0, drop_remainder=False)
      local = os.path.join(staging, f"{split}.array_record")
      writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
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
        latent_shape = list(mean.shape[1:])
      writer.close()
      _put(local, latents.split_file(out, split))
      counts[split] = count
      if log:
        log(f"cache-latents: {split}: {count} examples -> {latents.split_file(out, split)}")
  meta = dict(scaling_factor=vae.scaling_factor, vae=vae.source, counts=counts,
              data=dict(name=config.data.name, resolution=config.data.resolution),
              flip=flip, latent_shape=latent_shape)
  files.atomic_write_text(out / latents.LATENT_META, json.dumps(meta, indent=1))
  return meta


def _put(local: str, dest: epath.Path) -> None:
  """Moves a finished local file to ``dest`` whole: a rename beside it locally, an upload to an
  object store (which shows the object only once it is complete)."""
  if files.is_local(dest):
    tmp = f"{os.fspath(dest)}.tmp"
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)
  else:
    epath.Path(local).copy(dest, overwrite=True)
