"""Sweeps: one config file describes a family of runs; expanding it gives their command lines.

A sweep config (``configs/sweeps/*.py``) is a module whose ``get_config(arg)`` edits
:func:`sweep_config` and returns it. Its fields:

* ``name``: runs live under ``{workdir_root}/{name}/{run name}``;
* ``command``: ``train`` or ``eval`` (the ``ldm-scaling`` subcommand every run calls);
* ``base``: the experiment config every run starts from, e.g. ``configs/t2i.py:steps=1000``;
* ``axes``: ``((dotted key, values), ...)``; the runs are their product, first axis outermost;
* ``zip``: ``((dotted key, values), ...)`` of equal lengths, stepped together as one more axis;
* ``overrides``: ``((dotted key, value), ...)`` set in every run;
* ``when``: ``((axis key, value, ((dotted key, value), ...)), ...)``: overrides set only in the
  runs whose axis has that value (over ``overrides``), e.g. each distillation objective's recipe;
* ``derive``: names of rules (:data:`DERIVE_RULES`) adding overrides computed from a run's values,
  such as the attention-head layout a width needs;
* ``labels``: ``((dotted key, prefix), ...)``: a run is named by its values, ``w224-cfg1.5``;
* ``workdir_root``: a local directory or ``gs://bucket/path``;
* ``source``: another sweep config whose runs this one is applied to: an eval sweep evaluates each
  source run's workdir, a distillation sweep trains a student per teacher run;
* ``source_overrides``: each run also inherits its source run's overrides (the same model);
* ``source_key``: ``""`` or the config key that receives the source run's workdir.

Axis keys must be keys of the schema (:func:`ldm_scaling.config.base_config`): a typo is an error
naming the closest keys. Values are checked by loading every run's config strictly
(:func:`validate_runs`, done by a dry run), so a sweep fails before anything is launched.
Config paths are relative to the directory the command runs in (the repository root).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import functools
import importlib.util
import itertools
import json
import os
import posixpath
import re
import shlex
from typing import Any, Callable, Iterable, Sequence

import ml_collections

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import unet

COMMANDS = ("train", "eval")
DEFAULT_WORKDIR_ROOT = "/tmp/ldm-scaling/sweeps"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def sweep_config() -> ml_collections.ConfigDict:
  """Every field a sweep config may set, with its default (locked: a misspelt field is an error)."""
  c = ml_collections.ConfigDict(dict(
      name="",
      command="train",
      base="",
      axes=(),
      zip=(),
      overrides=(),
      when=(),
      derive=(),
      labels=(),
      workdir_root=DEFAULT_WORKDIR_ROOT,
      source="",
      source_overrides=False,
      source_key="",
  ))
  c.lock()
  return c


def model_size_source(arg: Any) -> str:
  """``sweep.source`` naming the model-size sweep's runs for ``arg``'s widths, steps, base and root
  (what the eval and distillation sweeps run on)."""
  widths = ",".join(str(int(w)) for w in arg.widths)
  return (f"configs/sweeps/model_size.py:widths=({widths},),steps={arg.steps},"
          f"base={arg.base},root={arg.root}")


def is_sweep(config: Any) -> bool:
  return (isinstance(config, ml_collections.ConfigDict) and "axes" in config
          and "command" in config and "base" in config)


@dataclasses.dataclass(frozen=True)
class Run:
  """One process to launch: ``ldm-scaling <command> --config ... --workdir ...``."""
  sweep: str
  name: str
  command: str
  config: str                       # config spec: path.py[:arg]
  overrides: tuple[str, ...]        # "section.key=value", passed as --config.section.key=value
  workdir: str                      # train: the run's workdir; eval: the training run evaluated
  logdir: str                       # launch.log and the launch.done marker go here
  results: str = ""                 # eval: the results table (shared by the sweep's runs)
  values: tuple[tuple[str, Any], ...] = ()  # the axis values that define this run
  notes: tuple[str, ...] = ()

  @property
  def args(self) -> list[str]:
    """The arguments after the program name."""
    out = [self.command, "--config", self.config]
    out += [f"--config.{o}" for o in self.overrides]
    out += ["--workdir", self.workdir]
    if self.results:
      out += ["--results", self.results]
    return out

  @property
  def argv(self) -> list[str]:
    return ["ldm-scaling", *self.args]

  @property
  def shell(self) -> str:
    return shlex.join(self.argv)


# -------------------------------------------------------------------------------------------------
# Loading and checking.


def _import_file(path: str):
  name = "_ldm_scaling_sweep_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"cannot import config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> Any:
  """Calls ``get_config(arg)`` of ``path.py[:arg]`` without validating the result."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found (give a path such as "
                      f"configs/sweeps/model_size.py, optionally followed by :arg)")
  module = _import_file(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  return module.get_config(arg or None)


def load_sweep(spec: str) -> ml_collections.ConfigDict | None:
  """The checked sweep of ``path.py[:arg]``, or None when the file is an experiment config."""
  config = load_config_file(spec)
  if not is_sweep(config):
    return None
  check_sweep(config, spec)
  return config


@functools.lru_cache(maxsize=1)
def schema_keys() -> dict[str, Any]:
  """``{"model.width": 320, ...}``: the schema's leaf keys and defaults (do not modify)."""
  return cfglib.flatten(cfglib.base_config())


def check_key(key: str, what: str = "sweep axis") -> None:
  """Raises unless ``key`` is a leaf of the config schema, naming the closest keys if not."""
  schema = schema_keys()
  if key in schema:
    return
  inside = [k for k in schema if k.startswith(key + ".")]
  if inside:
    raise ConfigError(f"{what} {key!r} is a config section, not a key; name a key inside it, "
                      f"such as {inside[0]}")
  close = difflib.get_close_matches(key, list(schema), n=3, cutoff=0.6)
  if not close:  # a misspelt last part: compare within the section
    section = key.rsplit(".", 1)[0]
    close = difflib.get_close_matches(key, [k for k in schema if k.startswith(section + ".")],
                                      n=3, cutoff=0.0)
  hint = (f"; closest valid keys: {', '.join(close)}" if close else
          "; `ldm-scaling config --config configs/t2i.py` lists the keys")
  raise ConfigError(f"unknown {what} {key!r}: not a key of the config schema{hint}")


def _pairs(value: Any, field: str, spec: str) -> list[tuple[str, Any]]:
  out = []
  for item in value:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ConfigError(f"sweep {spec}: {field} must be ((dotted key, value), ...), got "
                        f"{item!r}")
    out.append((item[0], item[1]))
  return out


def check_sweep(sweep: ml_collections.ConfigDict, spec: str = "") -> None:
  """Checks the sweep's fields; axis keys against the schema (values are checked per run)."""
  spec = spec or sweep.name or "<sweep>"
  if not _NAME_RE.match(sweep.name or ""):
    raise ConfigError(f"sweep {spec}: name must be letters, digits, '.', '_' or '-', got "
                      f"{sweep.name!r}")
  if sweep.command not in COMMANDS:
    raise ConfigError(f"sweep {spec}: command must be one of {', '.join(COMMANDS)}, got "
                      f"{sweep.command!r}")
  if not sweep.base:
    raise ConfigError(f"sweep {spec}: base (the experiment config every run starts from) is "
                      f"empty")
  if not os.path.isfile(sweep.base.split(":", 1)[0]):
    raise ConfigError(f"sweep {spec}: base config {sweep.base.split(':', 1)[0]!r} not found "
                      f"(paths are relative to the directory you run from: the repo root)")
  seen: set[str] = set()
  for field in ("axes", "zip", "overrides"):
    for key, values in _pairs(sweep[field], field, spec):
      check_key(key, "sweep axis" if field != "overrides" else "sweep override")
      if key in seen:
        raise ConfigError(f"sweep {spec}: key {key!r} is set twice (axes, zip and overrides "
                          f"must name different keys)")
      seen.add(key)
      if field != "overrides" and (not isinstance(values, (tuple, list)) or not values):
        raise ConfigError(f"sweep {spec}: {field} {key!r} needs a non-empty tuple of values, "
                          f"got {values!r}")
  lengths = {len(v) for _, v in _pairs(sweep.zip, "zip", spec)}
  if len(lengths) > 1:
    raise ConfigError(f"sweep {spec}: zip axes step together and need equal lengths, got "
                      f"{dict((k, len(v)) for k, v in sweep.zip)}")
  axis_values = {k: list(v) for k, v in list(sweep.axes) + list(sweep.zip)}
  for item in sweep.when:
    if not (isinstance(item, (tuple, list)) and len(item) == 3):
      raise ConfigError(f"sweep {spec}: when entries are (axis key, value, ((key, value), ...)), "
                        f"got {item!r}")
    key, value, overrides = item
    if key not in axis_values:
      raise ConfigError(f"sweep {spec}: when {key!r}: not an axis (axes: "
                        f"{', '.join(axis_values) or 'none'})")
    if value not in axis_values[key]:
      raise ConfigError(f"sweep {spec}: when {key}={value!r}: not one of the axis values "
                        f"{axis_values[key]}")
    for okey, _ in _pairs(overrides, "when", spec):
      check_key(okey, "sweep override")
      if okey in axis_values:
        raise ConfigError(f"sweep {spec}: when {key}={value!r} sets the axis {okey!r}")
  for rule in sweep.derive:
    if rule not in DERIVE_RULES:
      raise ConfigError(f"sweep {spec}: unknown derive rule {rule!r}; available: "
                        f"{', '.join(sorted(DERIVE_RULES))}")
  axis_keys = {k for k, _ in list(sweep.axes) + list(sweep.zip)}
  for key, _ in _pairs(sweep.labels, "labels", spec):
    if key not in axis_keys:
      raise ConfigError(f"sweep {spec}: label for {key!r}, which is not an axis")
  if sweep.command == "eval" and not sweep.source:
    raise ConfigError(f"sweep {spec}: an eval sweep evaluates the runs of a training sweep; set "
                      f"source (e.g. 'configs/sweeps/model_size.py')")
  if not sweep.workdir_root:
    raise ConfigError(f"sweep {spec}: workdir_root is empty")


# -------------------------------------------------------------------------------------------------
# Derived overrides: values a run needs because of its axis values.


def _unet_heads(get: Callable[[str], Any]) -> dict[str, Any]:
  """The head layout ``configs/t2i.py``'s preset gives a width: 64-wide heads where every level
  width is a multiple of 64, else 8 fixed heads (widths 96, 160, 224, 288 of the paper)."""
  preset = unet.preset(int(get("model.width")), tuple(get("model.channel_mult")))
  return {f"model.{k}": v for k, v in preset.items() if k != "width"}


DERIVE_RULES: dict[str, Callable[[Callable[[str], Any]], dict[str, Any]]] = {
    "unet_heads": _unet_heads,
}


# -------------------------------------------------------------------------------------------------
# Expansion.


def format_value(value: Any) -> str:
  """A value as ``--config.key=VALUE`` text that config_flags parses back to the same value."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):  # ("ddim", 'x') reads better in a shell than ('ddim',)
    items = [json.dumps(v) if isinstance(v, str) else repr(v) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  return str(value)


def _typed(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _as_schema_type(key: str, value: Any) -> Any:
  """A single value for a tuple-typed key (``eval.cfg_scales``) becomes a 1-tuple."""
  if isinstance(schema_keys()[key], tuple) and not isinstance(value, (tuple, list)):
    return (value,)
  return value


def _label(key: str, value: Any, prefixes: dict[str, str]) -> str:
  prefix = prefixes.get(key, key.rsplit(".", 1)[-1] + "=")
  if isinstance(value, (tuple, list)):
    text = "_".join(_label_value(v) for v in value)
  else:
    text = _label_value(value)
  return re.sub(r"[^A-Za-z0-9._+=-]", "_", prefix + text)


def _label_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def _combinations(sweep) -> list[list[tuple[str, Any]]]:
  axes = [[(k, v) for v in values] for k, values in sweep.axes]
  if sweep.zip:
    axes.append([list(zip([k for k, _ in sweep.zip], step))
                 for step in zip(*[values for _, values in sweep.zip])])
  combos = []
  for choice in itertools.product(*axes):
    flat: list[tuple[str, Any]] = []
    for item in choice:
      flat.extend(item if isinstance(item, list) else [item])
    combos.append(flat)
  return combos


def _split_override(item: str) -> tuple[str, str]:
  item = item.strip()
  for prefix in ("--config.", "config."):
    if item.startswith(prefix):
      item = item[len(prefix):]
  key, sep, value = item.partition("=")
  if not sep:
    raise ConfigError(f"override {item!r} needs a value (section.key=VALUE)")
  return key.strip(), value


_BASE_CACHE: dict[str, ml_collections.ConfigDict] = {}


def _base(spec: str) -> ml_collections.ConfigDict:
  if spec not in _BASE_CACHE:
    _BASE_CACHE[spec] = cfglib.read(spec)
  return _BASE_CACHE[spec]


def expand(sweep: ml_collections.ConfigDict, *, workdir_root: str | None = None,
           extra_overrides: Sequence[str] = ()) -> list[Run]:
  """The sweep's runs, in axis order. ``extra_overrides`` (``"train.steps=10"``) go into every
  run; ``workdir_root`` replaces the sweep's (and its source's)."""
  check_sweep(sweep)
  root = (workdir_root or sweep.workdir_root).rstrip("/")
  sweep_dir = posixpath.join(root, sweep.name)
  sources: list[Run | None] = [None]
  if sweep.source:
    source = load_sweep(sweep.source)
    if source is None:
      raise ConfigError(f"sweep {sweep.name}: source {sweep.source!r} is not a sweep config")
    sources = list(expand(source, workdir_root=root))
  base = _base(sweep.base)
  base_flat = cfglib.flatten(base)
  extra = [_split_override(o) for o in extra_overrides]
  axis_keys = {k for k, _ in list(sweep.axes) + list(sweep.zip)}
  for key, _ in extra:
    check_key(key, "override")
    if key in axis_keys:
      raise ConfigError(f"--config.{key} would give every run of sweep {sweep.name} the same "
                        f"value of its axis {key!r}; change the sweep's argument instead")
  prefixes = dict(sweep.labels)

  runs = []
  for src in sources:
    for combo in _combinations(sweep):
      typed: dict[str, Any] = {}
      texts: dict[str, str] = {}
      if src is not None and sweep.source_overrides:
        for item in src.overrides:
          key, text = _split_override(item)
          typed[key], texts[key] = _typed(text), text
      values = [(k, _as_schema_type(k, v)) for k, v in combo]
      for key, value in values + [(k, _as_schema_type(k, v)) for k, v in sweep.overrides]:
        typed[key], texts[key] = value, format_value(value)
      for axis, value, overrides in sweep.when:
        if typed.get(axis) == value:
          for key, v in overrides:
            typed[key], texts[key] = _as_schema_type(key, v), format_value(_as_schema_type(key, v))
      for key, text in extra:
        typed[key], texts[key] = _typed(text), text

      def get(key, typed=typed):
        return typed[key] if key in typed else base_flat[key]

      for rule in sweep.derive:
        for key, value in DERIVE_RULES[rule](get).items():
          if key not in texts and value != base_flat[key]:
            typed[key], texts[key] = value, format_value(value)
      notes = []
      if src is not None:
        role = "evaluates" if sweep.command == "eval" else "teacher"
        notes.append(f"{role}: {src.workdir}")
        if sweep.source_key:
          texts[sweep.source_key] = src.workdir
      own = "-".join(_label(k, v, prefixes) for k, v in values)
      name = "-".join(p for p in ((src.name if src else ""), own) if p) or "run"
      overrides = tuple(f"{k}={v}" for k, v in texts.items())
      if sweep.command == "eval":
        runs.append(Run(sweep=sweep.name, name=name, command="eval", config=sweep.base,
                        overrides=overrides, workdir=src.workdir,
                        logdir=posixpath.join(sweep_dir, name),
                        results=posixpath.join(sweep_dir, "results"), values=tuple(values),
                        notes=tuple(notes)))
      else:
        workdir = posixpath.join(sweep_dir, name)
        runs.append(Run(sweep=sweep.name, name=name, command="train", config=sweep.base,
                        overrides=overrides, workdir=workdir, logdir=workdir,
                        values=tuple(values), notes=tuple(notes)))
  names = [r.name for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ConfigError(f"sweep {sweep.name}: run names {dupes} repeat; give the axes distinct "
                      f"labels (sweep.labels)")
  return runs


def single_run(spec: str, overrides: Sequence[str], workdir: str, command: str = "train",
               results: str = "") -> Run:
  """An experiment config (not a sweep) as one run, named after its workdir."""
  if command not in COMMANDS:
    raise ConfigError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
  if not workdir:
    raise ConfigError(f"{spec} is an experiment config, not a sweep: give --workdir for its run")
  if command == "eval" and not results:
    raise ConfigError("an eval run needs --results (the results table directory)")
  texts = tuple("=".join(_split_override(o)) for o in overrides)
  name = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(workdir.rstrip("/")) or "run")
  logdir = workdir if command == "train" else posixpath.join(results, "logs", name)
  return Run(sweep=name, name=name, command=command, config=spec, overrides=texts,
             workdir=workdir, logdir=logdir, results=results)


def select(runs: Sequence[Run], patterns: Iterable[str]) -> list[Run]:
  """Runs whose name matches one of the shell patterns (all runs when there are none)."""
  patterns = [p for p in patterns if p]
  if not patterns:
    return list(runs)
  chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
  if not chosen:
    raise ConfigError(f"--only {','.join(patterns)} matches none of the runs: "
                      f"{', '.join(r.name for r in runs)}")
  return chosen


def validate_runs(runs: Sequence[Run]) -> list[str | None]:
  """Loads every run's config strictly; the error message per run (None when it loads)."""
  errors: list[str | None] = []
  for run in runs:
    try:
      experiment.load(run.config, run.overrides)
      errors.append(None)
    except (ConfigError, FileNotFoundError) as e:
      errors.append(str(e))
  return errors


def describe(runs: Sequence[Run], errors: Sequence[str | None] | None = None) -> str:
  """The dry-run listing: a comment header, then one shell command per run (a run's notes, such
  as the teacher it distils, follow as a comment); invalid runs are listed at the end."""
  if not runs:
    return "# no runs"
  lines = [f"# sweep {runs[0].sweep}: {len(runs)} {runs[0].command} run(s)"]
  for run in runs:
    lines.append(run.shell + (f"  # {'; '.join(run.notes)}" if run.notes else ""))
  for run, error in zip(runs, errors or ()):
    if error:
      lines.append(f"# INVALID {run.name}: {error}")
  return "\n".join(lines)
