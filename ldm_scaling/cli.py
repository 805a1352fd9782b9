"""``ldm-scaling`` command line. Thin: every subcommand calls importable library functions.

Configs are given as ``--config path.py[:arg]`` plus any number of ``--config.section.key=value``
overrides (see ``ldm_scaling.config``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ldm_scaling.config import ConfigError

_CONFIG_HELP = ("experiment config: path.py or path.py:arg (e.g. configs/t2i.py:width=128); "
                "override single keys with --config.section.key=value")


def _split_overrides(unknown: Sequence[str]) -> list[str]:
  """Collects ``--config.x=y`` / ``--config.x y`` overrides; anything else is an error."""
  overrides, i = [], 0
  while i < len(unknown):
    item = unknown[i]
    if not item.startswith("--config."):
      raise ConfigError(f"unrecognised argument {item!r}")
    if "=" not in item:
      if i + 1 >= len(unknown):
        raise ConfigError(f"override {item!r} needs a value ({item}=VALUE)")
      item = f"{item}={unknown[i + 1]}"
      i += 1
    overrides.append(item)
    i += 1
  return overrides


def _load_config(args, required: bool = True):
  from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
  if args.config is None:
    if required:
      raise ConfigError("--config is required (e.g. --config configs/t2i.py)")
    if args.overrides:
      raise ConfigError("--config.* overrides need a --config file to apply to")
    return None
  return cfglib.load(args.config, args.overrides)


# -------------------------------------------------------------------------------------------------
# Subcommands.


def cmd_cost(args) -> int:
  from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
  config = _load_config(args, required=False)
  if args.widths:
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
  elif config is not None:
    widths = [config.model.width]
  else:
    widths = sorted(cost.PAPER_TABLE1)
  config = config if config is not None else cfglib.base_config()
  rows = cost.table(config, widths, steps=args.steps, cfg_scale=args.cfg_scale)
  if args.json:
    print(json.dumps(rows))
  else:
    print(cost.format_table(rows))
    conv = ("a guided step counts 2 passes" if config.cost.count_uncond_pass
            else "a guided step counts once (paper convention)")
    print(f"\nforward at {config.cost.latent_size}x{config.cost.latent_size}x"
          f"{config.model.in_channels} latent, {config.cost.text_len} text tokens, batch 1, "
          f"f32 (XLA cost_analysis); normalised to width {config.cost.reference_width}; "
          f"sampling cost = norm cost x steps, {conv}.")
  return 0


def cmd_config(args) -> int:
  from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
  config = _load_config(args)
  if args.json:
    print(json.dumps(dict(config=config.to_dict(), hash=cfglib.config_hash(config)),
                     default=list))
  else:
    print(config)
    print(f"# config hash: {cfglib.config_hash(config)}")
  return 0


def cmd_train(args) -> int:
  from ldm_scaling.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  config = _load_config(args)
  from ldm_scaling.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    result = trainer.train(config, args.workdir)
  except trainer.NonFiniteError as e:
    print(f"ldm-scaling train: stopped: {e}", file=sys.stderr)
    return 3
  print(f"ldm-scaling train: {result.stopped} at step {result.step} ({args.workdir})")
  return 0


def _floats(text: str) -> list[float]:
  try:
    return [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"--cfg-scale {text!r}: expected numbers like 7.5 or 1,3,7.5") from None


def cmd_sample(args) -> int:
  from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
  config = _load_config(args, required=not args.checkpoint)
  summary = generate.main(
      config, prompts=args.prompt or [generate.DEFAULT_PROMPT], sampler=args.sampler,
      steps=args.steps, cfg_scales=_floats(args.cfg_scale) if args.cfg_scale else None,
      seed=args.seed, out=args.out, checkpoint=args.checkpoint, batch_size=args.batch_size,
      latent_size=args.latent_size, step_progress=args.step_progress,
      log=lambda msg: print(msg, file=sys.stderr, flush=True))
  print(json.dumps(summary))
  return 0


def cmd_eval(args) -> int:
  """Without --config, each run's own eval section defines its grid."""
  from ldm_scaling.eval import grid  # pylint: disable=g-import-not-at-top
  config = _load_config(args, required=False)
  try:
    index, count = (int(x) for x in args.shard.split("/"))
  except ValueError:
    raise ConfigError(f"--shard must look like 0/4, got {args.shard!r}") from None
  table = grid.evaluate(args.workdir, args.results, eval_config=config, shard=(index, count),
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
  print(f"ldm-scaling eval: {len(table.rows())} rows in {args.results}/results.csv")
  return 0


def cmd_study(args) -> int:
  from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
  from ldm_scaling import study  # pylint: disable=g-import-not-at-top
  if args.config is None:
    raise ConfigError("--config is required (e.g. --config configs/study/cpu_mini.py)")
  spec = args.config
  if args.quick:
    spec += ",quick" if ":" in spec else ":quick"
  config = cfglib.load(spec, args.overrides)
  workdir = args.workdir or ("runs/study-quick" if args.quick else "runs/study")
  command = " ".join(["ldm-scaling", "study", "--config", args.config,
                      *(["--quick"] if args.quick else []), "--workdir", workdir,
                      *args.overrides])
  from ldm_scaling.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    summary = study.run(config, workdir, command=command,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
  except trainer.NonFiniteError as e:
    print(f"ldm-scaling study: training stopped: {e}", file=sys.stderr)
    return 3
  print(json.dumps(summary))
  return 0


# -------------------------------------------------------------------------------------------------


def _add_config_arg(p: argparse.ArgumentParser, required: bool) -> None:
  p.add_argument("--config", required=False, default=None,
                 help=_CONFIG_HELP + ("" if required else " (default: the base config)"))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ldm-scaling",
      description="Scaling studies of latent diffusion models (JAX/Flax).")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  p = sub.add_parser("cost", help="parameters, GFLOPs and normalised cost per width vs the paper",
                     description="Parameters (eval_shape), forward GFLOPs (XLA cost_analysis of "
                     "the compiled forward) and normalised cost per UNet width, next to Mei et al. "
                     "Table 1. Without --config and --widths: all 11 paper widths.")
  _add_config_arg(p, required=False)
  p.add_argument("--widths", help="comma-separated base widths (default: the paper's 11 widths, "
                 "or the config's width when --config is given)")
  p.add_argument("--steps", type=int, help="also print the sampling cost of this many steps")
  p.add_argument("--cfg-scale", type=float, default=None,
                 help="guidance scale used for the sampling cost (matters only with "
                 "--config.cost.count_uncond_pass=true)")
  p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
  p.set_defaults(func=cmd_cost)

  p = sub.add_parser("config", help="print a resolved config and its hash",
                     description="Loads a config (with overrides), validates it and prints it.")
  _add_config_arg(p, required=True)
  p.add_argument("--json", action="store_true", help="print as JSON")
  p.set_defaults(func=cmd_config)
  p = sub.add_parser("train", help="train (or resume) a config in a workdir",
                     description="Trains the config's objective in --workdir, resuming from its "
                     "latest complete checkpoint. SIGTERM saves a checkpoint and exits 0. On TPU "
                     "VMs, multi-host is detected; elsewhere pass the three coordinator flags.")
  _add_config_arg(p, required=True)
  p.add_argument("--workdir", required=True, help="run directory (local path or gs://...); "
                 "checkpoints, config.json, metrics.jsonl and TensorBoard events go here")
  p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
  p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
  p.add_argument("--process-id", type=int, help="this process's index (multi-process runs)")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("sample", help="sample a PNG grid (one image per prompt x guidance scale)",
                     description="Samples one image per (prompt, guidance scale) with a config's "
                     "schedule and parametrisation; the whole trajectory is one compiled program. "
                     "With --checkpoint WORKDIR: the run's EMA UNet, text encoder and VAE (the "
                     "run's config; --config is optional). Without: a random-init UNet and, if the "
                     "config's text encoder / VAE cannot be loaded, random per-prompt context "
                     "vectors and latents instead of images, all labelled so.")
  _add_config_arg(p, required=False)
  p.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
  p.add_argument("--sampler",
                 help="ddim | ddpm | dpm++ | euler | lcm (default: eval.samplers[0])")
  p.add_argument("--steps", type=int, help="sampling steps (default: eval.steps[0])")
  p.add_argument("--cfg-scale", help="guidance scale(s), comma-separated: one grid column each "
                 "(default: eval.cfg_scales)")
  p.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
  p.add_argument("--out", default="samples.png", help="PNG grid to write")
  p.add_argument("--checkpoint", metavar="WORKDIR",
                 help="a training workdir: sample its latest checkpoint's EMA weights")
  p.add_argument("--batch-size", type=int, default=8, help="images per compiled batch")
  p.add_argument("--latent-size", type=int,
                 help="latent side (default: data.resolution / the VAE's down factor)")
  p.add_argument("--step-progress", action="store_true",
                 help="report every ~10%% of the steps from inside the compiled program")
  p.set_defaults(func=cmd_sample)

  p = sub.add_parser("eval", help="evaluate checkpoints over a sampler x steps x CFG grid",
                     description="FID and CLIP score of every (run, checkpoint, sampler, steps, "
                     "CFG) cell, one row each in a results table (CSV + JSON lines). Cells already "
                     "in the table are skipped, so a killed job resumes where it stopped.")
  _add_config_arg(p, required=False)
  p.add_argument("--workdir", action="append", required=True,
                 help="a training workdir (repeat for several runs)")
  p.add_argument("--results", required=True, help="results table directory (local or gs://)")
  p.add_argument("--shard", default="0/1", help="i/n: evaluate every n-th cell starting at i "
                 "(one process per host of a slice)")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("study", help="the end-to-end scaling study (train sizes, eval grid, report)",
                     description="Trains the offline CLIP/VAE if absent, one UNet per study.widths "
                     "(compute-matched), evaluates the grid and writes figures and report.md. "
                     "Resumable: rerun the same command after an interruption.")
  _add_config_arg(p, required=True)
  p.add_argument("--workdir", default=None,
                 help="study directory (default runs/study, runs/study-quick with --quick)")
  p.add_argument("--quick", action="store_true",
                 help="the config's CI-sized variant (its `quick` argument; minutes)")
  p.set_defaults(func=cmd_study)

  from ldm_scaling.eval import commands as eval_commands  # pylint: disable=g-import-not-at-top
  eval_commands.add_parsers(sub)  # fid, fid-weights
  from ldm_scaling.data import commands as data_commands  # pylint: disable=g-import-not-at-top
  data_commands.add_parsers(sub)  # prepare-data
  from ldm_scaling.models import commands as model_commands  # pylint: disable=g-import-not-at-top
  model_commands.add_parsers(sub)  # train-clip, train-vae
  from ldm_scaling.launch import commands as launch_commands  # pylint: disable=g-import-not-at-top
  launch_commands.add_parsers(sub)  # sweep
  from ldm_scaling.analysis import commands as analysis_cmds  # pylint: disable=g-import-not-at-top
  analysis_cmds.add_parsers(sub)  # analyze, advise
  return parser


def _user_errors() -> tuple[type[BaseException], ...]:
  """Errors caused by the input (config, paths, data, weights): reported in one line, exit 2.
  Anything else is a bug and keeps its traceback."""
  from ldm_scaling.data import manifest, pipeline  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import fid, images  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import convert  # pylint: disable=g-import-not-at-top
  from ldm_scaling.analysis import table as analysis_table  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import results  # pylint: disable=g-import-not-at-top
  return (ConfigError, FileNotFoundError, pipeline.DataError, manifest.ManifestError,
          manifest.BadExampleError, convert.ConversionError, fid.StatsMismatchError,
          images.ImageError, results.EmptyTableError, analysis_table.AnalysisError)


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_jax()
  try:
    args.overrides = _split_overrides(unknown)
    return args.func(args)
  except _user_errors() as e:
    print(f"ldm-scaling {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
