"""What every subcommand shares: the ``--config`` argument, overrides, loading, logging."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ldm_scaling.errors import ConfigError, UserError

# Errors that are the user's to fix: one line, exit code 2. FileNotFoundError covers paths given
# on the command line (results tables, image folders) that do not exist.
USER_ERRORS = (UserError, FileNotFoundError)

CONFIG_HELP = ("experiment config: path.py or path.py:arg (e.g. configs/t2i.py:width=128); "
               "override single keys with --config.section.key=value")


def add_config_arg(p: argparse.ArgumentParser, required: bool, example: str = "",
                   default_help: str = " (default: the base config)") -> None:
  """``--config`` with the one help text; a required config is checked by :func:`load_config`
  (so the error is a one-line user error, not argparse's usage dump)."""
  text = CONFIG_HELP if not example else CONFIG_HELP.replace("configs/t2i.py:width=128", example)
  p.add_argument("--config", required=False, default=None,
                 help=text + ("" if required else default_help))


def split_overrides(unknown: Sequence[str]) -> list[str]:
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


def load_config(args, required: bool = True, example: str = "configs/t2i.py"):
  """The validated config of ``args.config`` + ``args.overrides`` (None when not given and not
  ``required``)."""
  from ldm_scaling import experiment  # pylint: disable=g-import-not-at-top  # see cli/__init__
  if args.config is None:
    if required:
      raise ConfigError(f"--config is required (e.g. --config {example})")
    if args.overrides:
      raise ConfigError("--config.* overrides need a --config file to apply to")
    return None
  return experiment.load(args.config, args.overrides)


def log(message: str) -> None:
  """Progress lines go to stderr (stdout carries each command's result)."""
  print(message, file=sys.stderr, flush=True)


def run(func, args, prog: str) -> int:
  """``func(args)``, with a user error reported as one line (``prog: error: ...``) and code 2."""
  try:
    return func(args)
  except USER_ERRORS as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
