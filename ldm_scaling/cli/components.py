"""``ldm-scaling train-clip`` / ``train-vae``: the offline conditioning components.

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
