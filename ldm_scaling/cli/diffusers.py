"""``ldm-scaling import-diffusers | export-diffusers``: Stable Diffusion 2.x pipelines in and out.

The work is ``ldm_scaling.models.diffusers_io``; see docs/diffusers.md.
"""

from __future__ import annotations

import json

from ldm_scaling.cli import common


def cmd_import(args) -> int:
  from ldm_scaling.models import diffusers_io  # deferred: imports JAX (see cli/core.py)
  config = common.load_config(args, required=False)
  summary = diffusers_io.import_pipeline(args.dir, args.workdir, base_config=config,
                                         log=common.log)
  print(json.dumps(summary))
  return 0


def cmd_export(args) -> int:
  from ldm_scaling.models import diffusers_io  # deferred: imports JAX (see cli/core.py)
  summary = diffusers_io.export_pipeline(args.workdir, args.out, step=args.step,
                                         which=args.weights, log=common.log)
  print(json.dumps(summary))
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser(
      "import-diffusers", help="turn a diffusers SD-2.x pipeline directory into a workdir",
      description="Reads a diffusers Stable Diffusion 1.x/2.x pipeline directory (unet/, vae/, "
      "text_encoder/, tokenizer/, scheduler/; local or gs://) and writes a workdir that `sample`, "
      "`eval` and `train` (fine-tuning, with --config WORKDIR/config.py) use directly: the UNet as "
      "checkpoint 0 (params and EMA), the other components copied, the config mapped from the "
      "pipeline's. Settings this project does not implement (SDXL, SD3, ...) are refused.")
  p.add_argument("dir", help="the diffusers pipeline directory")
  p.add_argument("--workdir", required=True, help="the new workdir (a local directory)")
  common.add_config_arg(p, required=False, default_help=". It gives the sections the pipeline "
                        "does not describe: data, train, eval (default: the base config)")
  p.set_defaults(func=cmd_import)

  p = sub.add_parser(
      "export-diffusers", help="write a workdir's UNet, VAE, text encoder as a diffusers pipeline",
      description="Writes a workdir (imported or trained) as a diffusers StableDiffusionPipeline "
      "directory: the checkpoint's UNet converted back to diffusers' keys, its VAE, text encoder, "
      "tokenizer and scheduler config.")
  p.add_argument("workdir", help="an imported or trained workdir")
  p.add_argument("--out", required=True, help="the pipeline directory to write (new or empty)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--weights", choices=("ema", "params"), default="ema",
                 help="which weights of the checkpoint (default: ema)")
  p.set_defaults(func=cmd_export)
