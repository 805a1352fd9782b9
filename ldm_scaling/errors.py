"""The package's user errors: one base class, caught once by the CLI (one line, exit code 2).

A :class:`UserError` is caused by the input -- a config, a path, data, weights -- and its message
says what was wrong and what to do. Anything else that escapes is a bug and keeps its traceback.
This module imports nothing from the package, so every module may use it.
"""

from __future__ import annotations


class UserError(Exception):
  """An error the user can fix; the message names the input and what to do about it."""


class ConfigError(UserError, ValueError):
  """A config (file, argument string or override) that cannot describe an experiment."""


class WeightsError(UserError, FileNotFoundError):
  """Weights (or a tokenizer) that are absent, unreachable or corrupt; the message says how to
  get them."""


class DataError(UserError, ValueError):
  """A dataset that cannot be found or read; the message says how to prepare it."""
