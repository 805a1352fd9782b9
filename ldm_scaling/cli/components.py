"""``ldm-scaling train-clip`` / ``train-vae``: the offline conditioning components;
``ldm-scaling cache-latents``: a dataset encoded once by the config's VAE (``latents:<dir>``).

The library is imported when a handler runs (see ``cli/core.py``)."""

from __future__ import annotations

import json

from ldm_scaling.cli import common

_EXAMPLE = "configs/offline_components.py"


def cmd_train_clip(args) -> int:
  from ldm_scaling.components import clip
  from ldm_scaling.models import clip as clip_model
  config = common.load_config(args, example=_EXAMPLE)
  directory = args.out or clip_model.default_dir(config)
  if args.force:
    meta = clip.train(config, directory, log=common.log, force=True)
  else:
    clip.ensure(config, directory, log=common.log)
    with open(f"{directory}/{clip_model.META}", encoding="utf-8") as f:
      meta = json.load(f)
  print(json.dumps(dict(dir=directory, retrieval=meta["retrieval"],
                        train_seconds=meta["train_seconds"])))
  return 0


def cmd_train_vae(args) -> int:
  from ldm_scaling.components import vae
  from ldm_scaling.models import vae as vae_model
  config = common.load_config(args, example=_EXAMPLE)
  directory = args.out or vae_model.default_dir(config)
  if args.force:
    vae.train(config, directory, log=common.log, force=True)
  else:
    vae.ensure(config, directory, log=common.log)
  with open(f"{directory}/{vae_model.CONFIG}", encoding="utf-8") as f:
    stored = json.load(f)
  extra = stored["ldm_scaling"]
  print(json.dumps(dict(dir=directory, scaling_factor=stored["scaling_factor"],
                        heldout=extra["heldout"], train_seconds=extra["train_seconds"])))
  return 0


def cmd_cache_latents(args) -> int:
  from ldm_scaling.components import vae
  from ldm_scaling.data import latents
  from ldm_scaling.errors import ConfigError
  from ldm_scaling.models import vae as vae_model
  config = common.load_config(args, example="configs/t2i.py:data=tfds:coco_captions")
  if config.data.name.startswith("latents:"):
    raise ConfigError(f"data.name={config.data.name!r} is already a latent cache; give the "
                      f"config of the images to encode (e.g. data=tfds:coco_captions)")
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
  splits = tuple(s.strip() for s in args.splits.split(",") if s.strip()) if args.splits else None
  common.log(f"cache-latents: VAE {config.vae.weights} ({config.vae.subfolder or '-'}), data "
             f"{config.data.name} at {config.data.resolution} px -> {args.out}")
  model = vae_model.load(config)
  meta = vae.cache_latents(config, model, args.out, splits=splits, batch_size=args.batch_size,
                           log=common.log)
  print(json.dumps(dict(dir=args.out, data_name=f"latents:{args.out}", **meta)))
  common.log(f"cache-latents: train on it with data.name=latents:{args.out} (e.g. "
             f"configs/t2i.py:data=latents:{args.out}); {latents.LATENT_META} is written last")
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser(
      "train-clip", help="train the small offline CLIP (text encoder + CLIP-score stand-in)",
      description="Trains a small transformers FlaxCLIPModel (config.clip) contrastively on "
      "config.data and saves it with save_pretrained (plus tokenizer and image processor) to "
      "clip.dir (default ~/.cache/ldm_scaling/clip/<hash>). Skips training if that directory "
      "already holds it (unless --force). Prints held-out retrieval top-1/top-5.")
  common.add_config_arg(p, required=True, example=_EXAMPLE)
  p.add_argument("--out", help="output directory (default: clip.dir or the cache)")
  p.add_argument("--force", action="store_true", help="retrain even if present")
  p.set_defaults(func=cmd_train_clip)

  p = sub.add_parser(
      "train-vae", help="train the project's KL-VAE and compute its scaling factor",
      description="Trains the AutoencoderKL of config.vae (L1/L2 + KL) on config.data, computes "
      "the latent scaling factor (1/std of posterior samples) and saves params.msgpack + a "
      "diffusers-style config.json to vae.dir (default ~/.cache/ldm_scaling/vae/<hash>). Skips "
      "training if present (unless --force). Prints held-out PSNR.")
  common.add_config_arg(p, required=True, example=_EXAMPLE)
  p.add_argument("--out", help="output directory (default: vae.dir or the cache)")
  p.add_argument("--force", action="store_true", help="retrain even if present")
  p.set_defaults(func=cmd_train_vae)

  p = sub.add_parser(
      "cache-latents", help="encode a config's dataset once with its VAE (a latent cache)",
      description="Encodes config.data (train and eval splits, or --splits) with the config's "
      "VAE (vae.weights: a hub id such as stabilityai/stable-diffusion-2-1-base, a directory, or "
      "trained) and writes posterior moments (float16, also of the mirrored image when "
      "data.flip is on) + captions to OUT/<split>.array_record and OUT/latents.json (last). "
      "OUT may be gs://. Train on it with data.name=latents:OUT "
      "(configs/t2i.py:data=latents:OUT); see docs/data.md.")
  common.add_config_arg(p, required=True, example="configs/t2i.py:data=tfds:coco_captions")
  p.add_argument("--out", required=True, help="cache directory (local or gs://)")
  p.add_argument("--splits", default="", help="comma-separated splits (default: "
                 "data.train_split and data.eval_split)")
  p.add_argument("--batch-size", type=int, default=128, help="images per encoder call "
                 "(default: 128)")
  p.set_defaults(func=cmd_cache_latents)
