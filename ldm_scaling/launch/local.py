"""Runs a sweep's commands as subprocesses on this machine, one at a time or N at a time.

Each run's output goes to ``<logdir>/launch.log`` (appended, one header per attempt; a ``gs://``
logdir is replaced by ``<log_root>/<sweep>/<run>/launch.log`` here). A run that succeeded gets a
marker ``<logdir>/launch.done`` that records its command; a later launch skips a run whose marker
records the same command (``force`` reruns them) and runs it again when the command changed (other
overrides, e.g. more steps). Without a marker the run is started again, which is always safe: the
trainer resumes from its latest complete checkpoint and ``ldm-scaling eval`` skips cells already in
its results table; the marker only saves their start-up (restoring a 5B checkpoint takes minutes).

"Succeeded" is stricter than exit code 0, because the trainer also exits 0 when it was stopped
(SIGTERM: checkpoint saved, run unfinished): a train run must have printed
``ldm-scaling train: done at step``, an eval run ``ldm-scaling eval:``, in this attempt.

Processes run as ``python -m ldm_scaling`` with this interpreter, so the sweep uses the same
environment as the launcher whether or not ``ldm-scaling`` is on PATH; ``--env NAME=VALUE`` adds
variables to it (:data:`KNOWN_ENV` lists the ones the package reads).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import posixpath
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

from ldm_scaling.errors import ConfigError
from ldm_scaling.launch.sweeps import Run

MARKER = "launch.done"
LOG = "launch.log"
DEFAULT_LOG_ROOT = "/tmp/ldm-scaling/logs"
# What a command prints when it finished its work (see the module docstring).
SUCCESS = {"train": "ldm-scaling train: done at step", "eval": "ldm-scaling eval:"}


# Variables the package and its libraries read that a launch typically sets for its runs
# (``--env``): where tfds datasets are (a gs:// directory works), the Hugging Face cache (weights
# of hub ids; a local directory), the package's own cache (trained components, FID statistics,
# tokenizers; ``files.cache_root``) and JAX's persistent compilation cache (``runtime``).
KNOWN_ENV = ("TFDS_DATA_DIR", "HF_HOME", "LDM_SCALING_CACHE", "JAX_COMPILATION_CACHE_DIR")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(items: Sequence[str], environ: Mapping[str, str] | None = None
              ) -> tuple[tuple[str, str], ...]:
  """``--env NAME=VALUE`` / ``--env NAME`` (the value this process has) -> ((NAME, VALUE), ...),
  in order; a bad name, a bare name that is not set here, or a name given twice is an error."""
  environ = os.environ if environ is None else environ
  out: dict[str, str] = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not _ENV_NAME.fullmatch(name):
      raise ConfigError(f"--env {item!r}: {name!r} is not a variable name; give NAME=VALUE or "
                        f"NAME (e.g. --env TFDS_DATA_DIR=gs://BUCKET/tfds)")
    if not sep:
      if name not in environ:
        raise ConfigError(f"--env {name}: {name} is not set here; give its value, "
                          f"--env {name}=VALUE")
      value = environ[name]
    if name in out:
      raise ConfigError(f"--env {name} is given twice; keep one")
    out[name] = value
  return tuple(out.items())


@dataclasses.dataclass
class Outcome:
  run: Run
  status: str               # done | incomplete (exit 0, not finished) | failed | skipped
  returncode: int | None
  log: str
  seconds: float = 0.0


def is_remote(path: str) -> bool:
  return "://" in path


def local_logdir(run: Run, log_root: str = DEFAULT_LOG_ROOT) -> str:
  """Where this machine writes the run's log and marker."""
  if is_remote(run.logdir):
    return posixpath.join(log_root, run.sweep, run.name)
  return run.logdir


def command(run: Run, python: str = sys.executable) -> list[str]:
  """The argv actually executed: ``run.argv`` with ``ldm-scaling`` as ``python -m ldm_scaling``."""
  return [python, "-m", "ldm_scaling", *run.args]


def marker_command(run: Run, log_root: str = DEFAULT_LOG_ROOT) -> str | None:
  """The command line recorded in the run's marker ("<time> <command>"), or None without one."""
  try:
    with open(os.path.join(local_logdir(run, log_root), MARKER), encoding="utf-8") as f:
      line = f.readline().rstrip("\n")
  except FileNotFoundError:
    return None
  return line.split(" ", 2)[2] if line.count(" ") >= 2 else ""


def finished(run: Run, log_root: str = DEFAULT_LOG_ROOT) -> bool:
  """Whether this exact command succeeded before (a marker for other overrides does not count)."""
  return marker_command(run, log_root) == run.shell


def _succeeded(run: Run, returncode: int, output: str) -> bool:
  pattern = SUCCESS.get(run.command)
  return returncode == 0 and (pattern is None or pattern in output)


def run_one(run: Run, *, log_root: str = DEFAULT_LOG_ROOT, python: str = sys.executable,
            env: dict[str, str] | None = None) -> Outcome:
  """Runs one command to completion, output appended to its launch.log; writes the marker on
  success."""
  logdir = local_logdir(run, log_root)
  os.makedirs(logdir, exist_ok=True)
  log_path = os.path.join(logdir, LOG)
  argv = command(run, python)
  started = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.shell}\n")
    log.flush()
    start_offset = log.tell()
    proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
  with open(log_path, encoding="utf-8", errors="replace") as log:
    log.seek(start_offset)
    output = log.read()
  seconds = time.time() - started
  if _succeeded(run, proc.returncode, output):
    with open(os.path.join(logdir, MARKER), "w", encoding="utf-8") as f:
      f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {run.shell}\n")
    return Outcome(run, "done", proc.returncode, log_path, seconds)
  status = "incomplete" if proc.returncode == 0 else "failed"
  return Outcome(run, status, proc.returncode, log_path, seconds)


def run_all(runs: Sequence[Run], *, parallel: int = 1, force: bool = False,
            log_root: str = DEFAULT_LOG_ROOT, python: str = sys.executable,
            log: Callable[[str], None] = print,
            env: Sequence[tuple[str, str]] = ()) -> list[Outcome]:
  """Runs every run not finished before (all with ``force``), ``parallel`` at a time, in this
  process's environment plus ``env`` (``--env``; see :func:`parse_env`).

  With ``parallel > 1`` every process gets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless it is
  set: by default each JAX process reserves 75% of a GPU's memory, so a second one would fail."""
  if parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {parallel}")
  extra = dict(env)
  env = dict(os.environ)
  env.update(extra)
  if parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  outcomes: dict[int, Outcome] = {}
  todo = []
  for i, run in enumerate(runs):
    recorded = None if force else marker_command(run, log_root)
    if recorded == run.shell:
      outcomes[i] = Outcome(run, "skipped", None,
                            os.path.join(local_logdir(run, log_root), LOG))
      log(f"[skip] {run.name}: finished earlier ({MARKER} in {local_logdir(run, log_root)})")
    else:
      if recorded is not None:
        log(f"[rerun] {run.name}: its {MARKER} records another command ({recorded}); "
            f"running this one")
      todo.append(i)
  lock = threading.Lock()

  def work(i: int) -> Outcome:
    run = runs[i]
    with lock:
      log(f"[start] {run.name}: {run.shell}")
    outcome = run_one(run, log_root=log_root, python=python, env=env)
    with lock:
      log(f"[{outcome.status}] {run.name}: exit {outcome.returncode} after "
          f"{outcome.seconds:.0f} s (log: {outcome.log})")
    return outcome

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    for i, outcome in zip(todo, pool.map(work, todo)):
      outcomes[i] = outcome
  return [outcomes[i] for i in range(len(runs))]


def summary(outcomes: Sequence[Outcome]) -> str:
  counts = {s: sum(o.status == s for o in outcomes)
            for s in ("done", "skipped", "incomplete", "failed")}
  text = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "done")
  bad = [o for o in outcomes if o.status in ("failed", "incomplete")]
  if bad:
    text += "; see " + ", ".join(f"{o.run.name} ({o.log})" for o in bad)
  return text
