"""The small CLIP this project trains offline (``ldm-scaling train-clip``).

A transformers ``FlaxCLIPModel`` with a small config (``config.clip``), trained contrastively on the
embedded captioned dataset in minutes on CPU. Its text tower conditions the UNet when
``text.encoder="clip-small"``; both towers serve the CLIP-score *stand-in* in eval (a real CLIP
score uses e.g. ViT-L/14 by hub id; this one is labelled as a stand-in wherever it is reported).

The trained model is a plain transformers checkpoint directory (``save_pretrained``: config.json,
flax_model.msgpack, the tokenizer built from the shipped BPE vocabulary, and a
``preprocessor_config.json`` mapping uint8 pixels to [-1, 1]), so
``FlaxCLIPModel.from_pretrained(dir)`` / ``CLIPProcessor.from_pretrained(dir)`` load it, plus
``ldm_scaling.json`` (the config it was trained from and its retrieval metrics).

:func:`ensure_clip` trains only when the directory is absent; :func:`retrieval` measures
image -> caption retrieval on the held-out split.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from ldm_scaling.errors import ConfigError
from ldm_scaling.models import text as text_lib

META = "ldm_scaling.json"


def default_dir(config: ml_collections.ConfigDict) -> str:
  """``clip.dir``, or a cache directory keyed by everything that determines the trained model."""
  if config.clip.dir:
    return os.path.expanduser(config.clip.dir)
  return os.path.join(_cache_root(), "clip", _key(config))


def _cache_root() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                      "ldm_scaling")


def _key(config: ml_collections.ConfigDict) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  clip = {k: v for k, v in config.clip.to_dict().items() if k != "dir"}
  data = {k: config.data[k] for k in ("name", "shapes_sizes", "flip")}
  text = json.dumps(dict(clip=clip, data=data), sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def clip_config(cfg: ml_collections.ConfigDict):
  """The transformers ``CLIPConfig`` of a ``clip`` config section."""
  from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig  # pylint: disable=g-import-not-at-top
  tc = CLIPTextConfig(
      vocab_size=text_lib.VOCAB_SIZE, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
      max_position_embeddings=cfg.max_length, projection_dim=cfg.embed_dim,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  vc = CLIPVisionConfig(
      hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
      num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.embed_dim)
  return CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                    projection_dim=cfg.embed_dim)


def pixel_values(images) -> Any:
  """Images NHWC in [-1, 1] (this project's convention) -> the model's NCHW ``pixel_values``.
  (The saved ``preprocessor_config.json`` does the same from uint8: rescale 1/255, mean=std=0.5.)"""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.transpose(jnp.asarray(images, jnp.float32), (0, 3, 1, 2))


def check_trained(config: ml_collections.ConfigDict, directory: str) -> None:
  """Raises :class:`text.WeightsError` if ``directory`` holds no trained offline CLIP."""
  needed = ("config.json", "flax_model.msgpack", META)
  if not os.path.isdir(directory) or any(
      not os.path.isfile(os.path.join(directory, f)) for f in needed):
    raise text_lib.WeightsError(
        f"the offline CLIP (text.encoder={text_lib.OFFLINE!r}) is not in {directory!r}; train it "
        f"with `ldm-scaling train-clip --config <your config>` (minutes on CPU) or call "
        f"ldm_scaling.models.clip.ensure_clip(config)")
  with open(os.path.join(directory, META), encoding="utf-8") as f:
    meta = json.load(f)
  trained = {k: v for k, v in meta["clip"].items() if k != "dir"}
  want = {k: v for k, v in config.clip.to_dict().items() if k != "dir"}
  arch = ("width", "layers", "heads", "vision_width", "vision_layers", "vision_heads",
          "image_size", "patch_size", "embed_dim", "max_length")
  diff = [f"{k}: {trained.get(k)} vs {want[k]}" for k in arch
          if _norm(trained.get(k)) != _norm(want[k])]
  if diff:
    raise ConfigError(f"the CLIP in {directory!r} was trained with another clip config "
                      f"({'; '.join(diff)}); use another clip.dir or delete it to retrain")


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def ensure_clip(config: ml_collections.ConfigDict, directory: str | None = None,
                log=print) -> str:
  """The offline CLIP's directory; trains it first if absent. Returns the directory."""
  directory = directory or default_dir(config)
  if os.path.isfile(os.path.join(directory, META)):
    check_trained(config, directory)
    return directory
  train(config, directory, log=log)
  return directory


def _lr_schedule(cfg):
  import optax  # pylint: disable=g-import-not-at-top
  warm = min(cfg.warmup_steps, max(1, cfg.steps // 2))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(cfg.steps, warm + 1),
                                            end_value=cfg.lr * 0.05)


def train(config: ml_collections.ConfigDict, directory: str, log=print) -> dict[str, Any]:
  """Trains the small CLIP (contrastive, symmetric InfoNCE with a learned temperature) and saves it
  to ``directory``; returns the metadata written next to it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from transformers import CLIPImageProcessor, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top

  cfg = config.clip
  if cfg.steps < 1 or cfg.batch_size < 2:
    raise ConfigError(f"clip.steps ({cfg.steps}) must be >= 1 and clip.batch_size "
                      f"({cfg.batch_size}) >= 2 for a contrastive loss")
  start = time.time()
  tokenizer = text_lib.bpe_tokenizer(cfg.max_length)
  dconf = _train_data_config(config)
  it = data_lib.make_pipeline(dconf, dconf.data.train_split, batch_size=cfg.batch_size,
                              seed=cfg.seed, process_index=0, process_count=1,
                              tokenizer=tokenizer, resolution=cfg.image_size, workers=0)
  model = FlaxCLIPModel(clip_config(cfg), input_shape=(
      (1, cfg.train_length), (1, cfg.image_size, cfg.image_size, 3)), seed=cfg.seed,
                        _do_init=False)
  shapes = ((1, cfg.train_length), (1, cfg.image_size, cfg.image_size, 3))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(cfg.seed), shapes)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(_lr_schedule(cfg), b2=0.98, weight_decay=0.05))
  opt_state = opt.init(params)

  def loss_fn(p, ids, images):
    out = model(input_ids=ids, pixel_values=pixel_values(images), params=p, train=False)
    logits = out.logits_per_text
    labels = jnp.arange(logits.shape[0])
    lt = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    li = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    acc = (jnp.argmax(logits, -1) == labels).mean()
    return (lt + li) / 2, acc

  @jax.jit
  def step(p, s, ids, images):
    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ids, images)
    updates, s = opt.update(g, s, p)
    p = optax.apply_updates(p, updates)
    # Keep the temperature sane (CLIP clamps logit_scale at log 100).
    p["logit_scale"] = jnp.clip(p["logit_scale"], 0.0, np.log(100.0))
    return p, s, loss, acc

  log(f"train-clip: {cfg.steps} steps x batch {cfg.batch_size} on {dconf.data.name} at "
      f"{cfg.image_size} px -> {directory}")
  history = []
  for i in range(cfg.steps):
    batch = next(it)
    ids = batch["tokens"][:, :cfg.train_length]
    params, opt_state, loss, acc = step(params, opt_state, ids, batch["images"])
    if (i + 1) % max(1, cfg.steps // 10) == 0 or i == 0:
      loss, acc = float(loss), float(acc)
      if not np.isfinite(loss):
        raise FloatingPointError(f"train-clip: loss is {loss} at step {i + 1}; lower clip.lr")
      history.append(dict(step=i + 1, loss=loss, batch_top1=acc))
      log(f"  step {i + 1}/{cfg.steps}  loss {loss:.3f}  in-batch top-1 {acc:.2f}  "
          f"({time.time() - start:.0f}s)")
  train_seconds = time.time() - start

  tmp = directory.rstrip("/") + f".tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  model.save_pretrained(tmp, params=jax.device_get(params))
  tokenizer.save_pretrained(tmp)
  CLIPImageProcessor(
      size={"shortest_edge": cfg.image_size},
      crop_size={"height": cfg.image_size, "width": cfg.image_size},
      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp)
  metrics = retrieval(config, tmp, log=log)
  meta = dict(clip=config.clip.to_dict(), data=dict(name=config.data.name,
                                                    shapes_sizes=list(config.data.shapes_sizes)),
              train_seconds=round(train_seconds, 1), history=history, retrieval=metrics,
              note="stand-in CLIP trained on the embedded dataset; not comparable to real CLIP "
                   "scores")
  with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1, default=list)
  os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  log(f"train-clip: done in {train_seconds:.0f}s; held-out retrieval top-1 "
      f"{metrics['top1']:.3f} top-5 {metrics['top5']:.3f} (chance {metrics['chance_top1']:.4f} / "
      f"{metrics['chance_top5']:.4f}, {metrics['n']} images)")
  return meta


def _train_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data config the CLIP trains on: no caption dropout (an empty caption has no partner)."""
  dconf = copy.deepcopy(config)
  dconf.data.caption_dropout = 0.0
  dconf.text.max_length = config.clip.train_length
  return dconf


def retrieval(config: ml_collections.ConfigDict, directory: str, n: int = 1000,
              log=print) -> dict[str, float]:
  """Image -> caption retrieval among ``n`` held-out examples (``data.eval_split``).

  A hit is a retrieved caption whose *text* equals the image's own (captions can repeat, e.g.
  "two small red circles on a black background"); chance is computed the same way."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ldm_scaling import data as data_lib  # pylint: disable=g-import-not-at-top

  model = text_lib.load_clip_model(directory)
  tokenizer = text_lib.load_tokenizer(directory, config.clip.max_length)
  size = model.config.vision_config.image_size
  src_n = len(data_lib.source(config, config.data.eval_split).records)
  n = min(n, src_n)
  it = data_lib.make_pipeline(config, config.data.eval_split, batch_size=n, seed=0,
                              process_index=0, process_count=1, num_epochs=1, shuffle=False,
                              tokenizer=tokenizer, resolution=size, workers=0)
  batch = next(it)
  captions = [str(c) for c in batch["captions"]]

  @jax.jit
  def embed(params, ids, images):
    t = model.get_text_features(input_ids=ids, params=params)
    v = model.get_image_features(pixel_values=pixel_values(images), params=params)
    return t / jnp.linalg.norm(t, axis=-1, keepdims=True), v / jnp.linalg.norm(
        v, axis=-1, keepdims=True)

  t_emb, v_emb = [], []
  for i in range(0, n, 250):
    t, v = embed(model.params, batch["tokens"][i:i + 250], batch["images"][i:i + 250])
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


def validate(config: ml_collections.ConfigDict) -> None:
  c = config.clip
  for key in ("width", "layers", "heads", "vision_width", "vision_layers", "vision_heads",
              "image_size", "patch_size", "embed_dim", "max_length", "train_length", "steps",
              "batch_size"):
    if c[key] < 1:
      raise ConfigError(f"clip.{key} must be >= 1, got {c[key]}")
  if c.width % c.heads or c.vision_width % c.vision_heads:
    raise ConfigError(f"clip.width ({c.width}) / vision_width ({c.vision_width}) must be "
                      f"divisible by clip.heads ({c.heads}) / vision_heads ({c.vision_heads})")
  if c.image_size % c.patch_size:
    raise ConfigError(f"clip.image_size={c.image_size} is not divisible by clip.patch_size="
                      f"{c.patch_size}")
  if c.train_length > c.max_length:
    raise ConfigError(f"clip.train_length={c.train_length} exceeds clip.max_length={c.max_length}")
  if c.lr <= 0:
    raise ConfigError(f"clip.lr must be > 0, got {c.lr}")
