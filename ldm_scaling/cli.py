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
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_jax()
  try:
    args.overrides = _split_overrides(unknown)
    return args.func(args)
  except ConfigError as e:
    print(f"ldm-scaling {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
