"""``ldm-scaling`` command line. Thin: every subcommand calls importable library functions.

Configs are given as ``--config path.py[:arg]`` plus any number of ``--config.section.key=value``
overrides (see ``ldm_scaling.config``). A :class:`ldm_scaling.errors.UserError` (bad config, path,
data or weights) is printed as one line and exits with code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ldm_scaling.cli import analysis
from ldm_scaling.cli import common
from ldm_scaling.cli import components
from ldm_scaling.cli import core
from ldm_scaling.cli import data
from ldm_scaling.cli import diffusers
from ldm_scaling.cli import fid
from ldm_scaling.cli import launch


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ldm-scaling",
      description="Scaling studies of latent diffusion models (JAX/Flax).")
  sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
  sub.required = True
  core.add_parsers(sub)        # cost, config, train, sample, eval, study
  fid.add_parsers(sub)         # fid, fid-weights, swd-premise
  data.add_parsers(sub)        # prepare-data
  components.add_parsers(sub)  # train-clip, train-vae
  launch.add_parsers(sub)      # plan, sweep
  analysis.add_parsers(sub)    # analyze, advise
  diffusers.add_parsers(sub)   # import-diffusers, export-diffusers
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  from ldm_scaling import runtime  # deferred: imports JAX (see cli/core.py)
  runtime.configure_jax()

  def command(args):
    args.overrides = common.split_overrides(unknown)
    return args.func(args)
  return common.run(command, args, f"ldm-scaling {args.subcommand}")


if __name__ == "__main__":
  sys.exit(main())
