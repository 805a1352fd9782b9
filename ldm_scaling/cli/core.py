"""``ldm-scaling cost | config | train | sample | eval | study``: the experiment commands.

Handlers import the library when they run (not when the parser is built), so ``ldm-scaling
--help`` and argument errors answer at once, without importing JAX.
"""

from __future__ import annotations

import json
import sys

from ldm_scaling.cli import common
from ldm_scaling.errors import ConfigError

def cmd_cost(args) -> int:
  from ldm_scaling import config as cfglib
  from ldm_scaling.models import cost
  config = common.load_config(args, required=False)
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
  from ldm_scaling import config as cfglib
  config = common.load_config(args)
  if args.json:
    print(json.dumps(dict(config=config.to_dict(), hash=cfglib.config_hash(config)),
                     default=list))
  else:
    print(config)
    print(f"# config hash: {cfglib.config_hash(config)}")
  return 0


def cmd_train(args) -> int:
  from ldm_scaling.train import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  config = common.load_config(args)
  from ldm_scaling.train import trainer
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
  from ldm_scaling.diffusion import generate
  config = common.load_config(args, required=not args.checkpoint)
  summary = generate.main(
      config, prompts=args.prompt or [generate.DEFAULT_PROMPT], sampler=args.sampler,
      steps=args.steps, cfg_scales=_floats(args.cfg_scale) if args.cfg_scale else None,
      seed=args.seed, out=args.out, checkpoint=args.checkpoint, batch_size=args.batch_size,
      latent_size=args.latent_size, step_progress=args.step_progress, log=common.log)
  print(json.dumps(summary))
  return 0


def cmd_eval(args) -> int:
  """Without --config, each run's own eval section defines its grid. Joins the multi-process job
  if there is one (a TPU slice's workers); each process then evaluates its share of the cells."""
  shard = None
  if args.shard is not None:
    try:
      index, count = (int(x) for x in args.shard.split("/"))
    except ValueError:
      raise ConfigError(f"--shard must look like 0/4, got {args.shard!r}") from None
    shard = (index, count)
  from ldm_scaling.train import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  from ldm_scaling.eval import grid
  config = common.load_config(args, required=False)
  table = grid.evaluate(args.workdir, args.results, eval_config=config, shard=shard,
                        log=common.log)
  print(f"ldm-scaling eval: {len(table.rows())} rows in {args.results}/results.csv")
  return 0


def cmd_study(args) -> int:
  from ldm_scaling import experiment, study
  from ldm_scaling.train import trainer
  if args.config is None:
    raise ConfigError("--config is required (e.g. --config configs/study/cpu_mini.py)")
  spec = args.config
  if args.quick:
    spec += ",quick" if ":" in spec else ":quick"
  config = experiment.load(spec, args.overrides)
  workdir = args.workdir or ("runs/study-quick" if args.quick else "runs/study")
  command = " ".join(["ldm-scaling", "study", "--config", args.config,
                      *(["--quick"] if args.quick else []), "--workdir", workdir,
                      *args.overrides])
  try:
    summary = study.run(config, workdir, command=command, log=common.log)
  except trainer.NonFiniteError as e:
    print(f"ldm-scaling study: training stopped: {e}", file=sys.stderr)
    return 3
  print(json.dumps(summary))
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser("cost", help="parameters, GFLOPs and normalised cost per width vs the paper",
                     description="Parameters (eval_shape), forward GFLOPs (XLA cost_analysis of "
                     "the compiled forward) and normalised cost per UNet width, next to Mei et al. "
                     "Table 1. Without --config and --widths: all 11 paper widths.")
  common.add_config_arg(p, required=False)
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
  common.add_config_arg(p, required=True)
  p.add_argument("--json", action="store_true", help="print as JSON")
  p.set_defaults(func=cmd_config)
  p = sub.add_parser("train", help="train (or resume) a config in a workdir",
                     description="Trains the config's objective in --workdir, resuming from its "
                     "latest complete checkpoint. SIGTERM saves a checkpoint and exits 0. On TPU "
                     "VMs, multi-host is detected; elsewhere pass the three coordinator flags.")
  common.add_config_arg(p, required=True)
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
  common.add_config_arg(p, required=False)
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
  common.add_config_arg(p, required=False)
  p.add_argument("--workdir", action="append", required=True,
                 help="a training workdir (repeat for several runs)")
  p.add_argument("--results", required=True, help="results table directory (local or gs://)")
  p.add_argument("--shard", help="i/n: evaluate every n-th cell starting at i (default: this "
                 "process of a multi-process job, e.g. a TPU slice's worker; else 0/1)")
  p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
  p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
  p.add_argument("--process-id", type=int, help="this process's index (multi-process runs)")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("study", help="the end-to-end scaling study (train sizes, eval grid, report)",
                     description="Trains the offline CLIP/VAE if absent, one UNet per study.widths "
                     "(equal steps, or study.schedule=equal_compute), evaluates the grid and writes figures and report.md. "
                     "Resumable: rerun the same command after an interruption.")
  common.add_config_arg(p, required=True)
  p.add_argument("--workdir", default=None,
                 help="study directory (default runs/study, runs/study-quick with --quick)")
  p.add_argument("--quick", action="store_true",
                 help="the config's CI-sized variant (its `quick` argument; minutes)")
  p.set_defaults(func=cmd_study)
