"""``ldm-scaling sweep`` and the ``launch/local.py`` / ``launch/tpu_vm.py`` scripts: argument
parsing and printing only; the work is in :mod:`ldm_scaling.launch` (``sweeps``, ``local``,
``tpu``), imported when a handler runs (see ``cli/core.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from ldm_scaling.cli import common
from ldm_scaling.errors import ConfigError

DESCRIPTION = (
    "Expands a sweep config (configs/sweeps/*.py) into runs and launches them: here as "
    "subprocesses (--launcher local) or on every worker of a TPU VM slice (--launcher tpu). "
    "An experiment config with --workdir is launched as a single run. --dry-run prints the "
    "commands (and, for tpu, the whole gcloud sequence) after loading every run's config "
    "strictly; it needs neither gcloud nor a GPU/TPU. --config.section.key=value overrides go "
    "into every run. See docs/launch.md.")


def add_arguments(p: argparse.ArgumentParser, launcher: str | None = None) -> None:
  p.add_argument("--config", help="sweep config (configs/sweeps/model_size.py[:arg]) or "
                 "experiment config (configs/t2i.py[:arg], with --workdir)")
  if launcher is None:
    p.add_argument("--launcher", choices=("local", "tpu"), default="local",
                   help="where the runs go (default: local)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the runs / gcloud commands; launch nothing")
  p.add_argument("--no-validate", action="store_true",
                 help="skip loading every run's config before launching")
  p.add_argument("--only", action="append", default=[],
                 help="launch only runs whose name matches (shell pattern, e.g. 'w2*'; "
                 "comma-separated or repeated)")
  p.add_argument("--workdir-root", help="replaces the sweep's workdir_root (local dir or gs://)")
  p.add_argument("--bucket", help="gs://BUCKET: workdir root gs://BUCKET/ldm-scaling")
  p.add_argument("--workdir", help="experiment config only: the run's workdir (a relative path "
                 "is placed under --workdir-root / --bucket when given)")
  p.add_argument("--command", choices=("train", "eval"), default="train",
                 help="experiment config only: the subcommand to run (default: train)")
  p.add_argument("--results", help="experiment config with --command eval: results table dir")
  p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                 help="a variable for every run (repeat it): NAME=VALUE, or NAME to pass this "
                 "shell's value, e.g. --env TFDS_DATA_DIR=gs://BUCKET/tfds --env HF_HOME; the "
                 "package reads TFDS_DATA_DIR, HF_HOME, LDM_SCALING_CACHE, "
                 "JAX_COMPILATION_CACHE_DIR (TPU: a leading ~/ is the worker's home)")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="JAX_COMPILATION_CACHE_DIR of the runs; 'none' leaves the runs' default "
                 "(~/.cache/ldm_scaling/jax). TPU default: <gs:// workdir root>/jax_cache, so a "
                 "relaunch (Spot) reuses the compiled programs; local default: none")

  g = p.add_argument_group("local launcher")
  g.add_argument("--parallel", type=int, default=1, help="runs at a time (default: 1)")
  g.add_argument("--force", action="store_true",
                 help="also rerun runs that have a launch.done marker")
  g.add_argument("--log-root", default=None,
                 help="where logs of runs with a gs:// workdir go here (default: "
                 "/tmp/ldm-scaling/logs)")

  g = p.add_argument_group("TPU VM launcher")
  g.add_argument("--tpu-name", help="TPU (and queued resource) name; '{run}' in it: one slice "
                 "per run")
  g.add_argument("--zone", help="e.g. us-central2-b")
  g.add_argument("--accelerator-type", help="e.g. v4-32, v5litepod-16, v5p-8, v6e-8 "
                 "(docs/launch.md lists the presets)")
  g.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  g.add_argument("--runtime-version", default="",
                 help="TPU software version (default: the generation's, e.g. "
                 "tpu-ubuntu2204-base for v4)")
  g.add_argument("--queued", action="store_true",
                 help="create the slice as a queued resource (waits until ACTIVE)")
  g.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, cheaper)")
  g.add_argument("--best-effort", action="store_true",
                 help="queued resource in the best-effort tier (gcloud alpha)")
  g.add_argument("--source-git", default="", help="git URL the workers clone (default: a "
                 "tarball of this checkout's HEAD, copied with scp)")
  g.add_argument("--source-ref", default="", help="branch, tag or commit of --source-git")
  g.add_argument("--source-tarball", default="", help="a source tarball to copy instead")
  g.add_argument("--remote-dir", default="ldm-scaling",
                 help="checkout on each worker, relative to home, without '..' (deleted and "
                 "recreated on each install; default: ldm-scaling)")
  g.add_argument("--remote-python", default="",
                 help="a Python >= 3.11 on the workers (on PATH or an absolute path) to install "
                 "into with its pip and run with, skipping uv (default: a Python 3.11 venv that "
                 "uv makes beside --remote-dir, <remote-dir>-venv; the images' python3 is 3.10)")
  g.add_argument("--jax-spec", default="",
                 help="pip requirement for JAX on TPU (default: jax[tpu] at the pinned version)")
  g.add_argument("--skip-create", action="store_true", help="the slice exists already")
  g.add_argument("--workdir-is-shared", action="store_true",
                 help="accept a non-gs:// workdir on a multi-host slice (a file system every "
                 "worker mounts)")
  g.add_argument("--distributed", choices=("metadata", "auto"), default="metadata",
                 help="multi-host: pass worker 0's address and the worker number read from the "
                 "metadata server (default), or leave detection to the trainer")
  g.add_argument("--no-auto-mesh", action="store_true",
                 help="do not add mesh.fsdp for models that need FSDP on the slice")
  g.add_argument("--plan", choices=("estimate", "compile", "off"), default="estimate",
                 help="before creating anything, check that each train run fits the chips' HBM: "
                 "by the analytic estimate (default, seconds), by the TPU compiler (needs "
                 "libtpu here; minutes per config) or not at all; the plan is recorded as "
                 "<workdir>/plan.json. See docs/tpu_plan.md")
  g.add_argument("--log-every", type=int, default=60, metavar="SECONDS",
                 help="copy each running run's log to <logdir>/logs/<host>.log this often "
                 "(default: 60; and once more at its end)")
  g.add_argument("--teardown", action="store_true",
                 help="delete the slice(s) instead of launching")


def _tpu_options(args):
  from ldm_scaling.launch import local, tpu
  return tpu.TpuOptions(
      tpu_name=args.tpu_name or "", zone=args.zone or "",
      accelerator_type=args.accelerator_type or "", project=args.project,
      runtime_version=args.runtime_version, queued=args.queued, spot=args.spot,
      best_effort=args.best_effort, source_git=args.source_git, source_ref=args.source_ref,
      source_tarball=args.source_tarball, remote_dir=args.remote_dir, python=args.remote_python,
      jax_spec=args.jax_spec, skip_create=args.skip_create,
      workdir_is_shared=args.workdir_is_shared, distributed=args.distributed,
      auto_mesh=not args.no_auto_mesh, plan=args.plan, env=local.parse_env(args.env),
      compilation_cache=_compilation_cache(args) or "", log_every=args.log_every)


def _run_env(args) -> list[tuple[str, str]]:
  """The runs' extra variables: ``--env``, plus ``--compilation-cache`` when given (the TPU
  launcher adds its default itself, see :func:`run_command`)."""
  from ldm_scaling.launch import local, tpu
  env = list(local.parse_env(args.env))
  cache = _compilation_cache(args)
  if cache and any(name == tpu.COMPILATION_CACHE_ENV for name, _ in env):
    raise ConfigError(f"--compilation-cache and --env {tpu.COMPILATION_CACHE_ENV} both set the "
                      f"compilation cache: keep one")
  return env + ([(tpu.COMPILATION_CACHE_ENV, cache)] if cache else [])


def _compilation_cache(args) -> str | None:
  """``--compilation-cache``: None when not given (the launcher's default), "" for none."""
  if args.compilation_cache is None:
    return None
  return "" if args.compilation_cache.lower() == "none" else args.compilation_cache


def _workdir_root(args) -> str | None:
  if args.workdir_root:
    return args.workdir_root
  if args.bucket:
    if not args.bucket.startswith("gs://"):
      raise ConfigError(f"--bucket must look like gs://BUCKET, got {args.bucket!r}")
    return args.bucket.rstrip("/") + "/ldm-scaling"
  return None


def build_runs(args):
  """The runs ``args`` describe: a sweep's, or the single run of an experiment config."""
  from ldm_scaling.launch import sweeps
  if not args.config:
    raise ConfigError("--config is required (e.g. --config configs/sweeps/model_size.py)")
  sweep = sweeps.load_sweep(args.config)
  root = _workdir_root(args)
  if sweep is not None:
    for flag in ("workdir", "results"):
      if getattr(args, flag):
        raise ConfigError(f"--{flag} is for an experiment config; a sweep places its runs under "
                          f"--workdir-root / --bucket")
    runs = sweeps.expand(sweep, workdir_root=root, extra_overrides=args.overrides)
  else:
    workdir = args.workdir
    if workdir and root and "://" not in workdir and not workdir.startswith("/"):
      workdir = f"{root.rstrip('/')}/{workdir}"
    runs = [sweeps.single_run(args.config, args.overrides, workdir or "", args.command,
                              args.results or "")]
  patterns = [p.strip() for item in args.only for p in item.split(",")]
  return sweeps.select(runs, patterns)


def run_command(args, launcher: str, prog: str) -> int:
  from ldm_scaling.launch import local, sweeps, tpu
  env = _run_env(args)  # a bad --env is refused before anything else
  if launcher == "tpu":
    # Refuse bad TPU flags (a control character, an absolute --remote-dir) before loading every
    # run's config, which takes seconds for a large sweep.
    opts = _tpu_options(args)
    tpu.check_options(opts)
  if launcher == "tpu" and args.teardown:
    runs = build_runs(args) if args.config else []
    steps = tpu.teardown(opts, runs)
    if args.dry_run:
      print(tpu.format_plan(steps))
      return 0
    tpu.execute(steps)
    return 0

  runs = build_runs(args)
  if launcher == "tpu":
    tpu.check_run_text(runs)  # a newline in an override: one clear error, not a config error
  errors = [None] * len(runs) if args.no_validate else sweeps.validate_runs(runs)
  bad = sum(e is not None for e in errors)
  if bad:
    print(sweeps.describe(runs, errors))
    print(f"{prog}: error: {bad} of {len(runs)} run(s) have configs that do not load (listed "
          f"above); nothing launched", file=sys.stderr)
    return 2
  if launcher == "tpu":
    runs = tpu.prepare_runs(runs, opts)  # as the slice runs them (mesh added)
    if _compilation_cache(args) is None and not any(
        name == tpu.COMPILATION_CACHE_ENV for name, _ in opts.env):
      opts = dataclasses.replace(opts, compilation_cache=tpu.default_compilation_cache(
          runs, _workdir_root(args)))
  print(sweeps.describe(runs))

  if launcher == "tpu":
    steps = tpu.plan(runs, opts, log=common.log)  # adding the mesh again is a no-op
    text = tpu.format_plan(steps, tpu.teardown(opts, runs), tpu.monitor_commands(opts, runs))
    if args.dry_run:
      print(text)
      return 0
    tpu.execute(steps)
    print("\n".join(line for line in text.splitlines() if line.startswith("#   ")))
    return 0

  if args.dry_run:
    return 0
  outcomes = local.run_all(runs, parallel=args.parallel, force=args.force,
                           log_root=args.log_root or local.DEFAULT_LOG_ROOT,
                           log=lambda msg: print(msg, flush=True), env=env)
  print(f"{prog}: {local.summary(outcomes)}")
  return 1 if any(o.status in ("failed", "incomplete") for o in outcomes) else 0


def cmd_sweep(args) -> int:
  return run_command(args, args.launcher, "ldm-scaling sweep")


def cmd_plan(args) -> int:
  from ldm_scaling.launch import estimate as est  # pylint: disable=g-import-not-at-top
  from ldm_scaling.launch import plan as plan_lib  # pylint: disable=g-import-not-at-top
  config = common.load_config(args, example="configs/t2i.py:width=768")
  if args.table:
    from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
    widths = ([int(w) for w in args.widths.split(",")] if args.widths
              else sorted(cost.PAPER_TABLE1))
    print(est.table(config, widths, args.topology.split(","), batch=args.batch or
                    config.train.batch_size, log=common.log))
    return 0
  if args.search:
    result = plan_lib.search(config, args.topology, batch=args.batch,
                             compile_top=0 if args.estimate else args.compile_top, log=common.log,
                             sample=not args.no_sample)
    best = result.plan
    fitting = [e for e in result.ranked if e.fits]
    if args.json:
      if best:
        out = best.to_json()
      else:  # estimates only (or no compiled candidate fit): the best estimate
        out = (fitting or result.ranked)[0].to_json()
        out["fits"] = bool(fitting) and not result.compiled
      out["candidates"] = [e.to_json() for e in result.ranked]
      print(json.dumps(out))
    else:
      print(plan_lib.format_search(result))
    return 0 if best or (fitting and not result.compiled) else 2
  if args.estimate:
    e = est.estimate(config, args.topology, batch=args.batch)
    if args.json:
      print(json.dumps(e.to_json()))
    else:
      print(est.format_estimate(e))
    return 0 if e.fits else 2
  plan = plan_lib.plan_train(config, args.topology, batch=args.batch, log=common.log,
                             sample=not args.no_sample)
  if args.json:
    print(json.dumps(plan.to_json()))
  else:
    print(plan_lib.format_plan(plan))
  return 0 if plan.fits else 2


def add_parsers(sub) -> None:
  p = sub.add_parser(
      "plan", help="compile the training step for a TPU slice here and check it fits",
      description="Compiles the config's training programs (the trainer's own: loss, optimiser, "
      "EMA, shardings, donation) and the eval grid's sampling program ahead of time for a TPU "
      "slice with the TPU compiler, on this "
      "host (no TPU needed; needs libtpu: pip install 'ldm-scaling[tpu]'), and prints per chip "
      "the argument, output, temporary and code bytes against the chip's HBM, the FLOPs and the "
      "collectives. Exit status 2 when it does not fit. See docs/tpu_plan.md.")
  common.add_config_arg(p, required=True, example="configs/t2i.py:width=768")
  p.add_argument("--topology", required=True,
                 help="the slice as the launcher names it: v5litepod-16 (or v5e-16), v5p-256, "
                      "v4-32, v6e-8 (the number counts TensorCores: v5p-256 is 128 chips)")
  p.add_argument("--batch", type=int, help="global batch (default: train.batch_size)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--search", action="store_true",
                 help="try meshes (data/fsdp/tensor), remat, attention kernel and dtype: rank "
                      "them by the estimate, compile the best, print the cheapest that fits as "
                      "--config overrides")
  p.add_argument("--estimate", action="store_true",
                 help="the analytic estimate only (seconds, no libtpu needed); with --search: "
                      "rank without compiling")
  p.add_argument("--table", action="store_true",
                 help="estimates only: for each width (--widths, default Table 1's 11) and each "
                      "slice in --topology (comma-separated), the first setting that fits, as a "
                      "markdown table (docs/tpu_plan.md)")
  p.add_argument("--widths", default="", help="--table: comma-separated widths")
  p.add_argument("--no-sample", action="store_true",
                 help="compile the training programs only, not also the eval grid's sampling "
                      "program (eval.samplers[0] at eval.steps[0], eval.batch_size images, "
                      "eval.param_dtype weights, on one TPU VM's chips)")
  p.add_argument("--compile-top", type=int, default=1,
                 help="--search: compile at most this many candidates, best first, until one "
                      "fits (default 1)")
  p.set_defaults(func=cmd_plan)

  p = sub.add_parser("sweep", help="launch a sweep's runs here or on a TPU VM slice (or print "
                     "them with --dry-run)", description=DESCRIPTION)
  add_arguments(p)
  p.set_defaults(func=cmd_sweep)


def main(argv: Sequence[str] | None = None, *, launcher: str, prog: str) -> int:
  """Entry point of the ``launch/*.py`` scripts (the launcher fixed, otherwise as ``sweep``)."""
  parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
  add_arguments(parser, launcher=launcher)
  args, unknown = parser.parse_known_args(argv)

  def command(args):
    args.overrides = common.split_overrides(unknown)
    return run_command(args, launcher, prog)
  return common.run(command, args, prog)
