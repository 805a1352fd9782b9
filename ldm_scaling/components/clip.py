"""The small offline CLIP: trained by the one trainer, exported as a transformers checkpoint.

- :func:`train`: the ``clip`` objective (``ldm_scaling.train.objectives.contrastive``) run by
  ``trainer.train`` in ``<dir>/train`` (sharded, exact resume, SIGTERM, NaN guard, TensorBoard and
  ``metrics.jsonl``), then exported with ``save_pretrained`` (model, the tokenizer built from the
  shipped BPE vocabulary, an image processor mapping uint8 pixels to [-1, 1]) and
  ``ldm_scaling.json`` (the config it was trained from and its held-out retrieval), written last
  so a directory holding it is complete.
- :func:`ensure` trains only when absent; :func:`retrieval` measures image -> caption retrieval
  on the held-out split.

transformers is imported where it is used (see ``models/text.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_scaling import data
from ldm_scaling import files
from ldm_scaling.models import clip as clip_lib
from ldm_scaling.models import text
from ldm_scaling.models import tokenizer as tokenizer_lib
from ldm_scaling.train import checkpoint
from ldm_scaling.train import metrics as metrics_lib
from ldm_scaling.train import trainer
from ldm_scaling.train.objectives import contrastive

_EXPORTED = ("config.json", "flax_model.msgpack", clip_lib.META)


def workdir(directory: str) -> str:
  """The training run of the CLIP stored in ``directory``."""
  return os.path.join(directory, "train")


def ensure(config: ml_collections.ConfigDict, directory: str | None = None,
           log: Callable[[str], None] = print) -> str:
  """The offline CLIP's directory; trains it first (or finishes an interrupted run) if absent."""
  directory = directory or clip_lib.default_dir(config)
  if os.path.isfile(os.path.join(directory, clip_lib.META)):
    clip_lib.check_trained(config, directory)
    return directory
  train(config, directory, log=log)
  return directory


def train(config: ml_collections.ConfigDict, directory: str, log: Callable[[str], None] = print,
          force: bool = False) -> dict:
  """Trains the small CLIP (contrastive, symmetric InfoNCE with a learned temperature), resuming
  ``<directory>/train``, and exports it to ``directory``; returns the metadata written with it."""
  cfg = config.clip
  run = contrastive.training_config(config)
  if force:
    for name in _EXPORTED:
      if os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
    shutil.rmtree(workdir(directory), ignore_errors=True)
  log(f"train-clip: {cfg.steps} steps x batch {cfg.batch_size} on {config.data.name} at "
      f"{cfg.image_size} px -> {directory}")
  start = time.time()
  result = trainer.train(run, workdir(directory))
  if result.stopped != "done":
    raise SystemExit(f"train-clip stopped ({result.stopped}) at step {result.step}; run it again "
                     f"to resume from {workdir(directory)}")
  train_seconds = time.time() - start
  _, weights = checkpoint.load_weights(workdir(directory), which="params")
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, clip_lib.META)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # a directory holding META is complete
  export(cfg, weights["clip"], directory)
  metrics = retrieval(config, directory, log=log)
  meta = dict(clip=cfg.to_dict(), data=dict(name=config.data.name,
                                            shapes_sizes=list(config.data.shapes_sizes)),
              train_seconds=round(train_seconds, 1),
              history=metrics_lib.history(workdir(directory)),
              retrieval=metrics, trained_in=workdir(directory),
              note="stand-in CLIP trained on the embedded dataset; not comparable to real CLIP "
                   "scores")
  files.atomic_write_text(meta_path, json.dumps(meta, indent=1, default=list))
  log(f"train-clip: done in {train_seconds:.0f}s; held-out retrieval top-1 "
      f"{metrics['top1']:.3f} top-5 {metrics['top5']:.3f} (chance {metrics['chance_top1']:.4f} / "
      f"{metrics['chance_top5']:.4f}, {metrics['n']} images)")
  return meta


def export(cfg: ml_collections.ConfigDict, params, directory: str) -> None:
  """Writes a transformers checkpoint of the ``clip`` section ``cfg`` with ``params``: the model,
  the tokenizer built from the shipped BPE vocabulary, an image processor mapping uint8 pixels to
  [-1, 1] (without ``ldm_scaling.json``, which marks a trained, measured directory)."""
  from transformers import CLIPImageProcessor  # deferred: see module docstring
  contrastive.model(cfg).save_pretrained(directory, params=jax.device_get(params))
  tokenizer_lib.bpe_tokenizer(cfg.max_length).save_pretrained(directory)
  CLIPImageProcessor(
      size={"shortest_edge": cfg.image_size},
      crop_size={"height": cfg.image_size, "width": cfg.image_size},
      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(directory)


def retrieval(config: ml_collections.ConfigDict, directory: str, n: int = 1000,
              log=print) -> dict[str, float]:
  """Image -> caption retrieval among ``n`` held-out examples (``data.eval_split``).

  A hit is a retrieved caption whose *text* equals the image's own (captions can repeat, e.g.
  "two small red circles on a black background"); chance is computed the same way."""

  model, params = text.load_clip_model(directory)
  tokenizer = tokenizer_lib.load_tokenizer(directory, config.clip.max_length)
  size = model.config.vision_config.image_size
  src_n = len(data.source(config, config.data.eval_split).records)
  n = min(n, src_n)
  it = data.make_pipeline(config, config.data.eval_split, batch_size=n, seed=0,
                              process_index=0, process_count=1, num_epochs=1, shuffle=False,
                              tokenizer=tokenizer, resolution=size, workers=0)
  batch = next(it)
  captions = [str(c) for c in batch["captions"]]

  @jax.jit
  def embed(params, ids, images):
    t = model.get_text_features(input_ids=ids, params=params)
    v = model.get_image_features(pixel_values=clip_lib.pixel_values(images), params=params)
    return t / jnp.linalg.norm(t, axis=-1, keepdims=True), v / jnp.linalg.norm(
        v, axis=-1, keepdims=True)

  t_emb, v_emb = [], []
  for i in range(0, n, 250):
    t, v = embed(params, batch["tokens"][i:i + 250], batch["images"][i:i + 250])
    t_emb.append(np.asarray(t))
    v_emb.append(np.asarray(v))
  t_emb, v_emb = np.concatenate(t_emb), np.concatenate(v_emb)
  sims = v_emb @ t_emb.T                       # (images, captions)
  order = np.argsort(-sims, axis=1)
  cap = np.array(captions)
  same = cap[order] == cap[:, None]            # retrieved caption text == own caption text
  top1 = float(same[:, 0].mean())
  top5 = float(same[:, :5].any(axis=1).mean())
  dup = (cap[None, :] == cap[:, None]).sum(1)  # captions (incl. its own) that count as a hit
  chance1 = float((dup / n).mean())
  chance5 = float((1 - np.prod([(n - dup - j) / (n - j) for j in range(5)], axis=0)).mean())
  out = dict(n=n, top1=top1, top5=top5, chance_top1=chance1, chance_top5=chance5,
             split=config.data.eval_split)
  log(f"clip retrieval on {n} held-out images: top-1 {top1:.3f}, top-5 {top5:.3f}")
  return out
