"""The ``gcloud`` command sequence that runs a sweep on every worker of a TPU VM slice.

:func:`plan` turns runs into steps, each an argument list (printed with ``shlex.join``):

1. create the slice: ``gcloud compute tpus tpu-vm create`` or, with ``queued``, a queued resource
   (``queued-resources create --node-id ... [--spot | --best-effort]``) and a wait until ACTIVE;
2. install the package on all workers (``tpu-vm ssh --worker=all``): a tarball copied with
   ``tpu-vm scp --worker=all`` (by default ``git archive HEAD`` of this checkout) or a
   ``git clone`` of a URL at a ref, then ``pip install -e`` with ``jax[tpu]`` at the pinned version
   into a Python 3.11 virtual environment that uv makes beside the checkout (``<remote_dir>-venv``;
   see :func:`install_command`), or into ``--remote-python`` when the image has a Python >= 3.11;
3. start the runs, one after another, on all workers at once (``--worker=all``): every worker
   executes the same ``<venv>/bin/python -m ldm_scaling train ... --workdir gs://...`` under
   ``nohup``, with the ``--env`` variables and ``JAX_COMPILATION_CACHE_DIR`` (on the bucket, so a
   relaunch after a Spot preemption does not compile again) exported; its output goes to
   ``~/ldm-scaling-logs/<run>.log``, copied to ``<workdir>/logs/<worker hostname>.log`` every
   ``log_every`` seconds while it runs and once more when it ends; a finished run leaves
   ``<workdir>/launch.done`` (its time and a checksum of its command) and is skipped next time
   unless its command changed.

:func:`teardown` deletes the slice (``tpu-vm delete`` or ``queued-resources delete --force``).

Multi-host slices: every worker is one JAX process of the same program, so every worker must read
and write the same checkpoint directory: a host-local workdir is refused (``gs://`` or a shared
file system declared with ``workdir_is_shared``). The processes find each other either through the
trainer's own detection (``distributed="auto"``) or, by default, through variables the launcher
sets from the TPU VM metadata server (``LDM_SCALING_COORDINATOR`` = worker 0's address,
``_NUM_PROCESSES``, ``_PROCESS_ID`` = this worker's number, read by
``ldm_scaling.train.distributed``) -- the same values ``jax.distributed.initialize()`` finds
itself on a TPU VM, made explicit because the trainer's TPU detection keys on environment variables
that GKE sets and a plain TPU VM may not. A variable already set on the worker wins over its
lookup; an empty or non-numeric lookup stops the script with one line naming the metadata key and
the variable that overrides it.

Every value the user gives ends up in the workers' bash script or a gcloud argument, so a newline
or other control character in any of them is refused (:func:`check_text`), and ``--remote-dir``,
deleted and recreated by each install, must stay under the home directory (relative, no ``..``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import time
from typing import Callable, Sequence

from ldm_scaling import experiment
from ldm_scaling.errors import ConfigError, UserError
from ldm_scaling.launch import topology as topo_lib
from ldm_scaling.launch.local import SUCCESS
from ldm_scaling.launch.sweeps import Run

LOG_DIR = "ldm-scaling-logs"            # on each worker, relative to the home directory
REMOTE_TARBALL = "ldm-scaling-src.tar.gz"
DEFAULT_TARBALL = "/tmp/ldm-scaling-src.tar.gz"
COORDINATOR_PORT = 8482                 # the port jax.distributed uses on Cloud TPU VMs
COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # read by JAX itself (see runtime.py)
JAX_CACHE = "jax_cache"                 # under the gs:// workdir root (default_compilation_cache)
# The Python of the workers' environment: setup.py's python_requires (jax 0.10.2, flax, orbax,
# grain and numpy need >= 3.11), which the TPU images' python3 (3.10 on tpu-ubuntu2204-base and
# the v2-alpha-tpuv5/v6e images) is not. 3.11 is also the version the pinned set is tested with.
PYTHON_VERSION = "3.11"
UV_SPEC = "uv==0.13.8"                  # installs that Python (PyPI wheel; see install_command)
GCLOUD_INSTALL_HINT = (
    "gcloud (the Google Cloud CLI) is not on PATH: install it (https://cloud.google.com/sdk/docs/"
    "install, or `sudo apt-get install google-cloud-cli`), run `gcloud auth login` and `gcloud "
    "config set project PROJECT`, then launch again; --dry-run prints the commands without it")


class LaunchError(UserError, ValueError):
  """A launch that cannot go ahead (tool missing, unsafe workdir, a step that failed)."""


@dataclasses.dataclass(frozen=True)
class TpuOptions:
  tpu_name: str                  # "{run}" in it: one slice per run
  zone: str
  accelerator_type: str
  project: str = ""
  runtime_version: str = ""      # "" = the generation's (topology.RUNTIME_VERSIONS)
  queued: bool = False           # queued resource instead of tpu-vm create
  spot: bool = False
  best_effort: bool = False      # queued only; gcloud alpha
  source_git: str = ""           # git URL to clone on the workers ...
  source_ref: str = ""           # ... at this branch, tag or commit
  source_tarball: str = ""       # ... or this local tarball; neither: git archive HEAD
  remote_dir: str = "ldm-scaling"  # on each worker, relative to the home directory
  python: str = ""               # "" = a uv-made Python 3.11 venv, <remote_dir>-venv; else an
                                 # interpreter >= 3.11 on the workers to install into and run with
  env: tuple[tuple[str, str], ...] = ()  # (NAME, VALUE): exported on every worker for the runs
  compilation_cache: str = ""    # JAX_COMPILATION_CACHE_DIR of the runs ("" = the runs' default)
  log_every: int = 60            # seconds between copies of a running run's log to <logdir>/logs
  jax_spec: str = ""             # "" = jax[tpu] at the version setup.py pins
  skip_create: bool = False      # the slice exists already
  workdir_is_shared: bool = False  # a non-gs:// workdir that all workers share (NFS, gcsfuse)
  distributed: str = "metadata"  # metadata | auto (see the module docstring)
  auto_mesh: bool = True         # add mesh.fsdp when the model needs it (topology.default_mesh)
  plan: str = "estimate"         # estimate | compile | off: check that each train run fits the
                                 # slice's HBM before creating it (launch.estimate / launch.plan)


@dataclasses.dataclass(frozen=True)
class Step:
  argv: tuple[str, ...]
  comment: str
  kind: str = "gcloud"           # gcloud | local | wait (poll argv until it prints ACTIVE)

  @property
  def shell(self) -> str:
    return shlex.join(self.argv)


def dquote(arg: str) -> str:
  """Shell-quotes ``arg`` for the remote script, preferring double quotes: the script is itself
  single-quoted inside the ssh ``--command``, and double quotes nest there without escapes.
  Strings with ``$`` or a backtick (expanded inside double quotes) get shlex's single quotes."""
  quoted = shlex.quote(arg)
  if quoted == arg or "$" in arg or "`" in arg:
    return quoted
  return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dquote_join(argv: Sequence[str]) -> str:
  return " ".join(dquote(a) for a in argv)


def default_jax_spec() -> str:
  """``jax[tpu]==<the jax version this package pins>`` (libtpu matching that jax)."""
  try:
    for req in importlib.metadata.requires("ldm-scaling") or ():
      match = re.fullmatch(r"jax\s*==\s*([\w.]+)", req.split(";")[0].strip())
      if match:
        return f"jax[tpu]=={match.group(1)}"
  except importlib.metadata.PackageNotFoundError:
    pass
  return "jax[tpu]"


# Characters no launcher input may contain: they would end a line of the workers' script or of
# a gcloud argument (C0 and C1 controls, DEL; newline and tab included).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# TpuOptions fields that are text the user gave, and their flags.
_TEXT_FLAGS = {"tpu_name": "--tpu-name", "zone": "--zone", "accelerator_type": "--accelerator-type",
               "project": "--project", "runtime_version": "--runtime-version",
               "source_git": "--source-git", "source_ref": "--source-ref",
               "source_tarball": "--source-tarball", "remote_dir": "--remote-dir",
               "python": "--remote-python", "jax_spec": "--jax-spec"}


def check_text(what: str, value: str) -> None:
  """Refuses a value with a newline or other control character: the launcher writes every value
  into the workers' bash script or a gcloud argument, where such a character would split or
  corrupt the command (and a multi-line value cannot be shown as one shell line)."""
  match = _CONTROL.search(value)
  if match:
    raise ConfigError(f"{what} {value!r} contains the control character {match.group()!r} "
                      f"(newline, tab, ...), which the TPU launcher cannot put into the workers' "
                      f"script or a gcloud argument: remove it")


def check_remote_dir(remote_dir: str) -> None:
  """``--remote-dir`` is deleted and recreated under the home directory of every worker, so it
  must stay inside it: relative, without ``..``, and not the home directory itself."""
  hint = "give a directory relative to the home directory on the workers, e.g. ldm-scaling"
  if posixpath.isabs(remote_dir) or remote_dir.startswith("~"):
    raise ConfigError(f"--remote-dir {remote_dir!r} is not relative: it is a directory under "
                      f"the home directory of every worker (deleted and recreated on each "
                      f"install); {hint}")
  if ".." in remote_dir.split("/"):
    raise ConfigError(f"--remote-dir {remote_dir!r} has a '..' component, which could leave the "
                      f"home directory (the directory is deleted and recreated on each "
                      f"install); {hint}")
  if posixpath.normpath(remote_dir or ".") == ".":
    raise ConfigError(f"--remote-dir {remote_dir!r} names the home directory itself, which each "
                      f"install would empty; {hint}")


def check_options(opts: TpuOptions) -> topo_lib.Topology:
  """Refuses options that cannot make a launch (before anything else is done); the topology."""
  for field, flag in _TEXT_FLAGS.items():
    check_text(flag, getattr(opts, field))
  for field in ("tpu_name", "zone", "accelerator_type"):
    if not getattr(opts, field):
      raise ConfigError(f"the TPU launcher needs --{field.replace('_', '-')}")
  check_remote_dir(opts.remote_dir)
  if opts.best_effort and not opts.queued:
    raise ConfigError("--best-effort is a queued-resource tier: add --queued")
  if opts.spot and opts.best_effort:
    raise ConfigError("choose one of --spot and --best-effort")
  if opts.source_git and opts.source_tarball:
    raise ConfigError("choose one source: --source-git URL or --source-tarball PATH")
  if opts.source_ref and not opts.source_git:
    raise ConfigError("--source-ref needs --source-git")
  if opts.distributed not in ("metadata", "auto"):
    raise ConfigError(f"--distributed must be metadata or auto, got {opts.distributed!r}")
  check_text("--compilation-cache", opts.compilation_cache)
  names = [name for name, _ in opts.env]
  for name, value in opts.env:
    check_text(f"--env {name}", f"{name}={value}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or names.count(name) > 1:
      raise ConfigError(f"--env {name!r}: give each variable once, as NAME=VALUE")
  if opts.compilation_cache and COMPILATION_CACHE_ENV in names:
    raise ConfigError(f"--compilation-cache and --env {COMPILATION_CACHE_ENV} both set the "
                      f"compilation cache: keep one")
  if opts.log_every < 1:
    raise ConfigError(f"--log-every must be >= 1 second, got {opts.log_every}")
  return topo_lib.topology(opts.accelerator_type)


def default_compilation_cache(runs: Sequence[Run], workdir_root: str | None = None) -> str:
  """Where the runs keep JAX's persistent compilation cache: ``<root>/jax_cache`` for a gs://
  workdir root, else ``gs://<bucket>/ldm-scaling/jax_cache`` of the first run with a gs://
  workdir, else "" (the runs' default, ``~/.cache/ldm_scaling/jax``, is on the worker's disk and
  is lost with a Spot VM). On the bucket, a relaunch after a preemption reads the programs
  compiled before instead of compiling them again (minutes for a large UNet)."""
  if workdir_root and workdir_root.startswith("gs://"):
    return workdir_root.rstrip("/") + "/" + JAX_CACHE
  for run in runs:
    if run.workdir.startswith("gs://"):
      bucket = run.workdir[len("gs://"):].split("/", 1)[0]
      return f"gs://{bucket}/ldm-scaling/{JAX_CACHE}"
  return ""


def worker_env(opts: TpuOptions) -> list[tuple[str, str]]:
  """The variables the start script exports on every worker: ``--env`` and the compilation
  cache."""
  env = list(opts.env)
  if opts.compilation_cache:
    env.append((COMPILATION_CACHE_ENV, opts.compilation_cache))
  return env


def _shell_value(value: str) -> str:
  """A variable's value as a word of the start script; a leading ``~/`` is the worker's home."""
  if value.startswith("~/"):
    return '"$HOME"/' + dquote(value[2:])
  return dquote(value)


def check_run_text(runs: Sequence[Run]) -> None:
  """Refuses runs with a control character in any value the workers' script holds (names,
  config, overrides, workdir, logdir, results): see :func:`check_text`."""
  for run in runs:
    values = [("run name", run.name), ("sweep name", run.sweep), ("--config", run.config)]
    values += [("override", f"--config.{o}") for o in run.overrides]
    values += [("workdir", run.workdir), ("logdir", run.logdir), ("results", run.results)]
    for what, value in values:
      check_text(f"run {run.name!r}: {what}" if what != "run name" else what, value)


def _scope(opts: TpuOptions) -> list[str]:
  return [f"--zone={opts.zone}"] + ([f"--project={opts.project}"] if opts.project else [])


def _gcloud(*args: str, alpha: bool = False) -> list[str]:
  return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", *args]


def slice_name(opts: TpuOptions, run: Run | None = None) -> str:
  """The TPU name; ``{run}`` in ``tpu_name`` becomes the run's name made TPU-legal (lowercase
  letters, digits, hyphens; a letter first)."""
  if "{run}" not in opts.tpu_name:
    return opts.tpu_name
  label = re.sub(r"[^a-z0-9-]+", "-", (run.name if run else "run").lower()).strip("-")
  name = opts.tpu_name.replace("{run}", label)
  return name if name[:1].isalpha() else "t" + name


# -------------------------------------------------------------------------------------------------
# Steps.


def create_steps(opts: TpuOptions, name: str, topo: topo_lib.Topology) -> list[Step]:
  version = opts.runtime_version or topo.runtime_version
  if opts.queued:
    argv = _gcloud("queued-resources", "create", name, f"--node-id={name}", *_scope(opts),
                   f"--accelerator-type={opts.accelerator_type}", f"--runtime-version={version}",
                   alpha=opts.best_effort)
    argv += ["--spot"] if opts.spot else []
    argv += ["--best-effort"] if opts.best_effort else []
    describe = _gcloud("queued-resources", "describe", name, *_scope(opts),
                       "--format=value(state.state)")
    return [Step(tuple(argv), f"request {opts.accelerator_type} slice {name} "
                 f"({topo.chips} chips, {topo.hosts} host(s)) as a queued resource"),
            Step(tuple(describe), f"wait until queued resource {name} is ACTIVE", kind="wait")]
  argv = _gcloud("tpu-vm", "create", name, *_scope(opts),
                 f"--accelerator-type={opts.accelerator_type}", f"--version={version}")
  argv += ["--spot"] if opts.spot else []
  return [Step(tuple(argv), f"create {opts.accelerator_type} slice {name} ({topo.chips} chips, "
               f"{topo.hosts} host(s))")]


def _ssh(opts: TpuOptions, name: str, remote_command: str, worker: str = "all") -> list[str]:
  return _gcloud("tpu-vm", "ssh", name, *_scope(opts), f"--worker={worker}", "--command",
                 remote_command)


def pack_step(opts: TpuOptions) -> Step | None:
  """The local step that builds the source tarball (None when a tarball or git URL is given)."""
  if opts.source_git or opts.source_tarball:
    return None
  return Step(("git", "archive", "--format=tar.gz", f"--output={DEFAULT_TARBALL}", "HEAD"),
              "pack the committed HEAD of this checkout (commit first: uncommitted changes are "
              "not in it)", kind="local")


def venv_dir(opts: TpuOptions) -> str:
  """The workers' virtual environment, relative to the home directory: beside the checkout, not in
  it, because each install deletes the checkout and a rerun should reuse the environment (and the
  jax, libtpu, TensorFlow wheels in it) rather than download them again."""
  return posixpath.normpath(opts.remote_dir) + "-venv"


def run_python(opts: TpuOptions) -> str:
  """The interpreter of the runs, as a word of the start script (which runs in the checkout, so
  the venv is named from ``$HOME``, expanded on the worker)."""
  if opts.python:
    return dquote(opts.python)
  return '"$HOME"/' + dquote(f"{venv_dir(opts)}/bin/python")


# The install step's shell functions: constant text (double quotes only, like _HELPERS below), with
# the version and the uv requirement filled in. new_enough is the test of python_requires.
_INSTALL_HELPERS = r"""fail() {
  echo "ldm-scaling install on $(hostname): $*" >&2
  exit 1
}
new_enough() {
  "$1" -c "import sys; sys.exit(sys.version_info < (MAJOR, MINOR))" 2>/dev/null
}"""
# make_venv VENV: uv from PyPI for the image's python3 (a --user install, run as `python3 -m uv`,
# so that ~/.local/bin need not be on PATH; PIP_BREAK_SYSTEM_PACKAGES lets pip do it on images
# whose Python is marked externally managed, and older pip ignores it), then VENV with Python
# VERSION: uv takes one the image has or downloads a standalone CPython. A VENV whose python
# passes new_enough is kept (a rerun reuses it); anything else there is replaced.
_MAKE_VENV = r"""make_venv() {
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user --no-warn-script-location \
    "UV_SPEC" || fail "could not install UV_SPEC with the image python3 -m pip: install pip" \
    "(sudo apt-get install -y python3-pip), or give --remote-python, a Python >= VERSION with pip"
  new_enough "$1/bin/python" && return 0
  rm -rf "$1" && python3 -m uv venv -q --python VERSION "$1" || fail "uv could not create a" \
    "Python VERSION environment in ~/$1 (it downloads CPython when the image has none): check" \
    "that the worker reaches the internet, or give --remote-python, a Python >= VERSION"
}"""
# need_python PY: the --remote-python the user gave must pass new_enough on every worker.
_NEED_PYTHON = r"""need_python() {
  new_enough "$1" && return 0
  version=$("$1" --version 2>&1) || version="not found"
  fail "--remote-python $1 ($version) is not a Python >= VERSION, which jax, flax, orbax and" \
    "grain need: give one that is, or leave --remote-python out to install Python VERSION" \
    "with uv"
}"""


def _fill(helpers: str) -> str:
  major, minor = PYTHON_VERSION.split(".")
  return (helpers.replace("UV_SPEC", UV_SPEC).replace("VERSION", PYTHON_VERSION)
          .replace("MAJOR", major).replace("MINOR", minor))


def install_command(opts: TpuOptions, fetch: str, fetched: str) -> str:
  """The install step's remote script: ``fetch`` (a shell command that puts the source in
  ``remote_dir``; ``fetched`` says what it does, for its error), then the package with jax[tpu]
  into a Python >= 3.11. Each command is checked: a failure stops the worker with one line
  ``ldm-scaling install on HOST: what failed and what to do`` (under the tool's own output),
  and gcloud's non-zero exit stops the launch."""
  spec = opts.jax_spec or default_jax_spec()
  if opts.python:
    helpers, python = _NEED_PYTHON, f"need_python {dquote(opts.python)}"
    install = [opts.python, "-m", "pip", "install", "-q", "-e", opts.remote_dir, spec]
    where = f"with {opts.python} -m pip (pip says why above)"
  else:
    venv = venv_dir(opts)
    helpers, python = _MAKE_VENV, f"make_venv {dquote(venv)}"
    install = ["python3", "-m", "uv", "pip", "install", "-q", "--python", f"{venv}/bin/python",
               "-e", opts.remote_dir, spec]
    where = f"into ~/{venv} (uv says why above)"
  message = f"could not install ~/{opts.remote_dir} and {spec} {where}"
  return "\n".join([_fill(_INSTALL_HELPERS), _fill(helpers),
                    f"{fetch} || fail {dquote(f'could not {fetched}')}", python,
                    f"{dquote_join(install)} || fail {dquote(message)}"])


def _into(opts: TpuOptions) -> str:
  """Where the install step puts the package, for its comment."""
  if opts.python:
    return f"for {opts.python}"
  return f"into a Python {PYTHON_VERSION} venv (uv), ~/{venv_dir(opts)},"


def install_steps(opts: TpuOptions, name: str) -> list[Step]:
  d = dquote(opts.remote_dir)
  spec = opts.jax_spec or default_jax_spec()
  if opts.source_git:
    source = f"{opts.source_git}{'@' + opts.source_ref if opts.source_ref else ''}"
    fetch = (f"rm -rf {d} && git clone -q {dquote(opts.source_git)} {d}"
             + (f" && git -C {d} checkout -q {dquote(opts.source_ref)}"
                if opts.source_ref else ""))
    command = install_command(opts, fetch, f"clone {source} into ~/{opts.remote_dir}")
    return [Step(tuple(_ssh(opts, name, command)),
                 f"clone {source} and install it with {spec} {_into(opts)} on every worker of "
                 f"{name}")]
  tarball = opts.source_tarball or DEFAULT_TARBALL
  scp = _gcloud("tpu-vm", "scp", tarball, f"{name}:{REMOTE_TARBALL}", *_scope(opts),
                "--worker=all")
  unpack = f"rm -rf {d} && mkdir -p {d} && tar -xzf {REMOTE_TARBALL} -C {d}"
  command = install_command(opts, unpack, f"unpack ~/{REMOTE_TARBALL} into ~/{opts.remote_dir}")
  return [Step(tuple(scp), f"copy {tarball} to every worker of {name}"),
          Step(tuple(_ssh(opts, name, command)),
               f"unpack it and install it with {spec} {_into(opts)} on every worker of {name}")]


# Shell helpers of the remote script: constant text (no user data, no single quotes, so that the
# script nests in the ssh --command with one level of quoting), quoted once as a whole.
# run_one runs a command in the background, its output in ~/LOG_DIR/<run>.log, while `stream`
# copies that file to <logdir>/logs/<host>.log every $log_every seconds; at the run's end the
# streamer is stopped (its TERM trap runs after a copy in flight, so no stale copy lands after the
# final one; `sleep & wait` lets the trap end a pause at once) and the log is copied a last time.
_HELPERS = r"""exists() {
  case "$1" in gs://*) gcloud storage ls "$1" >/dev/null 2>&1 ;; *) test -e "$1" ;; esac
}
get() {
  case "$1" in gs://*) gcloud storage cat "$1" 2>/dev/null ;; *) cat "$1" 2>/dev/null ;; esac
}
put() {
  case "$2" in
    gs://*) gcloud storage cp "$1" "$2" >/dev/null 2>&1 ;;
    *) mkdir -p "$(dirname "$2")" && cp "$1" "$2" ;;
  esac
}
stream() {
  trap "exit 0" TERM
  while :; do
    sleep "$3" & wait $!
    put "$1" "$2"
  done
}
run_one() {
  name=$1; logdir=$2; kind=$3; shift 3
  case "$kind" in train) success="TRAIN_DONE" ;; *) success="EVAL_DONE" ;; esac
  log="$HOME/LOGDIR/$name.log"
  sum=$(echo "$*" | cksum)
  if exists "$logdir/launch.done"; then
    if [ "$(get "$logdir/launch.done" | sed -n 2p)" = "$sum" ]; then
      echo "$name: finished earlier, skipped"; return 0
    fi
    echo "$name: launch.done records another command, running this one"
  fi
  echo "$name: start $(date -u +%FT%TZ) on $(hostname)"
  copy="$logdir/logs/$(hostname).log"
  "$@" > "$log" 2>&1 &
  pid=$!
  stream "$log" "$copy" "${log_every:-60}" > /dev/null 2>&1 &
  streamer=$!
  wait "$pid"; rc=$?
  kill "$streamer" 2>/dev/null; wait "$streamer" 2>/dev/null
  echo "$name: exit $rc $(date -u +%FT%TZ)"
  put "$log" "$copy" || echo "$name: could not copy $log to $logdir/logs/"
  if [ "$rc" -eq 0 ] && grep -q "$success" "$log"; then
    { date -u +%FT%TZ; echo "$sum"; } > "$log.done" && put "$log.done" "$logdir/launch.done"
  fi
}""".replace("LOGDIR", LOG_DIR).replace("TRAIN_DONE", SUCCESS["train"]).replace(
    "EVAL_DONE", SUCCESS["eval"])

# Worker 0's address and this worker's number from the TPU VM metadata server, parsed as
# jax._src.clusters.cloud_tpu_cluster.GceTpuCluster does (endpoints: "host" or "name:id:ip").
# A LDM_SCALING_* variable already set on the worker wins over its lookup. Every value is checked
# here: an empty lookup (no metadata server, a key missing) would otherwise become
# "COORDINATOR=:8482 NUM_PROCESSES=0" and fail later in the trainer with advice about flags the
# user never passed; instead the script stops with one line naming the key and the variables that
# override it. Constant text like _HELPERS (double quotes only).
_METADATA_ENV = r"""fail() {
  echo "ldm-scaling launch: $*; no run started" >&2
  exit 1
}
override="in the environment on each worker to override it"
md() {
  curl -sf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}
numeric() {
  case "${!1}" in
    ""|*[!0-9]*) fail "$1=\"${!1}\" ($2) is not a number: set $1 to a whole number" "$override" ;;
  esac
}
num_from="set on the worker"; id_from="set on the worker"
if [ -z "${LDM_SCALING_COORDINATOR:-}" ] || [ -z "${LDM_SCALING_NUM_PROCESSES:-}" ]; then
  value=$(md worker-network-endpoints)
  IFS=, read -ra endpoints <<< "$value"
  host=${endpoints[0]##*:}
  [ -n "$host" ] || fail "TPU metadata key worker-network-endpoints is empty or has no" \
    "address (got \"$value\"): set LDM_SCALING_COORDINATOR=HOST:PORT and" \
    "LDM_SCALING_NUM_PROCESSES=N" "$override"
  [ -n "${LDM_SCALING_NUM_PROCESSES:-}" ] || num_from="from metadata key worker-network-endpoints"
  : "${LDM_SCALING_COORDINATOR:=$host:PORT}" "${LDM_SCALING_NUM_PROCESSES:=${#endpoints[@]}}"
fi
if [ -z "${LDM_SCALING_PROCESS_ID:-}" ]; then
  LDM_SCALING_PROCESS_ID=$(md agent-worker-number)
  [ -n "$LDM_SCALING_PROCESS_ID" ] || fail "TPU metadata key agent-worker-number is empty:" \
    "set LDM_SCALING_PROCESS_ID=N (this worker, 0 to NUM_PROCESSES-1)" "$override"
  id_from="from metadata key agent-worker-number"
fi
numeric LDM_SCALING_NUM_PROCESSES "$num_from"
numeric LDM_SCALING_PROCESS_ID "$id_from"
[ "$LDM_SCALING_NUM_PROCESSES" -ge 1 ] || fail \
  "LDM_SCALING_NUM_PROCESSES=$LDM_SCALING_NUM_PROCESSES ($num_from) is below 1:" \
  "set it to the number of workers" "$override"
[ "$LDM_SCALING_PROCESS_ID" -lt "$LDM_SCALING_NUM_PROCESSES" ] || fail \
  "LDM_SCALING_PROCESS_ID=$LDM_SCALING_PROCESS_ID ($id_from) is not below" \
  "LDM_SCALING_NUM_PROCESSES=$LDM_SCALING_NUM_PROCESSES ($num_from): set both" "$override"
export LDM_SCALING_COORDINATOR LDM_SCALING_NUM_PROCESSES LDM_SCALING_PROCESS_ID""".replace(
    "PORT", str(COORDINATOR_PORT))


def remote_script(runs: Sequence[Run], opts: TpuOptions, topo: topo_lib.Topology,
                  plans: dict[str, dict] | None = None) -> str:
  """The bash script every worker runs (under nohup): the runs one after another, each run's plan
  (``plans``, by run name) first written to its workdir as ``plan.json``."""
  lines = [f"cd {dquote(opts.remote_dir)} || exit 1", f'mkdir -p "$HOME/{LOG_DIR}"']
  lines += [f"export {name}={_shell_value(value)}" for name, value in worker_env(opts)]
  lines += [f"log_every={int(opts.log_every)}", _HELPERS]
  if topo.multi_host and opts.distributed == "metadata":
    lines.append(_METADATA_ENV)
  for run in runs:
    if plans and run.name in plans and run.workdir:
      local = f"$HOME/{LOG_DIR}/{run.name}.{PLAN_FILE}"
      lines.append(f"printf '%s\\n' {shlex.quote(json.dumps(plans[run.name]))} > \"{local}\" && "
                   f"put \"{local}\" {dquote(posixpath.join(run.workdir, PLAN_FILE))}")
    lines.append(" ".join([dquote_join(["run_one", run.name, run.logdir, run.command]),
                           run_python(opts), dquote_join(["-m", "ldm_scaling", *run.args])]))
  lines.append('echo "all runs ended $(date -u +%FT%TZ)"')
  return "\n".join(lines)


def start_command(runs: Sequence[Run], opts: TpuOptions, topo: topo_lib.Topology,
                  plans: dict[str, dict] | None = None) -> str:
  """The ``--command`` of the start step: the script in the background, logging per worker."""
  sweep_log = f"{LOG_DIR}/{runs[0].sweep}.log"
  script = remote_script(runs, opts, topo, plans)
  return (f"mkdir -p {LOG_DIR} && nohup bash -c {shlex.quote(script)} "
          f"> {dquote(sweep_log)} 2>&1 < /dev/null &")


def _check_runs(runs: Sequence[Run], opts: TpuOptions, topo: topo_lib.Topology) -> list[str]:
  """Refuses what cannot work on the slice; returns warnings for what works but may surprise."""
  check_run_text(runs)
  warnings = []
  for run in runs:
    paths = {"workdir": run.workdir, "logdir": run.logdir, "results": run.results}
    local = {k: v for k, v in paths.items() if v and not v.startswith("gs://")}
    if local and topo.multi_host and not opts.workdir_is_shared:
      key, value = next(iter(local.items()))
      raise LaunchError(
          f"run {run.name}: {key} {value!r} is host-local, but {opts.accelerator_type} has "
          f"{topo.hosts} hosts, each a process of the same run: every worker must write the "
          f"same checkpoint directory. Use a gs:// workdir (--bucket gs://BUCKET or "
          f"--workdir-root gs://BUCKET/path), or pass --workdir-is-shared if {value!r} is a "
          f"file system all workers mount")
    if local and not opts.workdir_is_shared:
      warnings.append(f"run {run.name}: {', '.join(local.values())} is on the TPU VM's disk and "
                      f"is deleted with the slice; copy it off or use gs://")
  return warnings


def with_mesh(runs: Sequence[Run], topo: topo_lib.Topology) -> list[Run]:
  """Adds ``mesh.fsdp=k`` to train runs whose model needs FSDP on this slice
  (:func:`topology.default_mesh`), unless the run sets the mesh itself."""
  out = []
  for run in runs:
    if run.command != "train" or any(o.startswith("mesh.") for o in run.overrides):
      out.append(run)
      continue
    config = experiment.load(run.config, run.overrides)
    if (config.mesh.fsdp, config.mesh.tensor) != (1, 1):
      out.append(run)
      continue
    mesh = topo_lib.default_mesh(topo, topo_lib.approx_params(config.model.width))
    if mesh["fsdp"] > 1:
      run = dataclasses.replace(run, overrides=run.overrides + (f"mesh.fsdp={mesh['fsdp']}",))
    out.append(run)
  return out


PLAN_MODES = ("estimate", "compile", "off")
PLAN_FILE = "plan.json"


def plan_runs(runs: Sequence[Run], opts: TpuOptions,
              log: Callable[[str], None] = lambda _: None) -> dict[str, dict]:
  """Each train run's memory plan on the slice (``opts.plan``: the analytic estimate, or the TPU
  compiler's plan, which needs libtpu here), as JSON by run name; recorded in the run's workdir as
  ``plan.json`` by the start step. A run that does not fit is refused here, before any VM exists:
  the error gives the need against the HBM per chip and the settings a search finds."""
  from ldm_scaling.launch import estimate as est  # pylint: disable=g-import-not-at-top
  from ldm_scaling.launch import plan as plan_lib  # pylint: disable=g-import-not-at-top
  if opts.plan not in PLAN_MODES:
    raise ConfigError(f"--plan must be one of {', '.join(PLAN_MODES)}, got {opts.plan!r}")
  if opts.plan == "off":
    return {}
  plans = {}
  for run in runs:
    if run.command != "train":
      continue
    config = experiment.load(run.config, run.overrides)
    if opts.plan == "estimate" and config.objective.name != "denoising":
      log(f"run {run.name} not planned: the estimate models the denoising UNet, not objective "
          f"{config.objective.name!r} (its teacher, fake-score network); --plan compile plans it")
      continue
    log(f"planning run {run.name} on {opts.accelerator_type} ({opts.plan})")
    try:
      result = (plan_lib.plan_train(config, opts.accelerator_type, log=log)
                if opts.plan == "compile" else est.estimate(config, opts.accelerator_type))
    except UserError as e:  # e.g. a teacher that an earlier run of the sweep trains
      log(f"run {run.name} not planned: {e}")
      continue
    need, fits, record = result.bytes_per_device, result.fits, result.to_json()
    record["method"] = opts.plan
    if not fits:
      hbm = plan_lib.parse_topology(opts.accelerator_type).hbm_gib_per_chip
      found = plan_lib.search(config, opts.accelerator_type, compile_top=0).ranked
      fitting = [e for e in found if e.fits]
      if fitting:
        hint = ("settings that fit by the estimate: "
                + " ".join(fitting[0].setting.overrides(fitting[0].chips)))
      else:
        hint = ("no mesh, remat, attention kernel or dtype fits by the estimate: use a bigger "
                "slice or a smaller train.batch_size")
      how = "the TPU compiler" if opts.plan == "compile" else "the estimate"
      raise LaunchError(
          f"run {run.name} does not fit on {opts.accelerator_type}: it needs "
          f"{need / 2**30:.1f} GiB per chip by {how}, the chip has {hbm:.0f} GiB of HBM; "
          f"{hint} (ldm-scaling plan --config ... --topology {opts.accelerator_type} --search "
          f"asks the compiler); nothing was created")
    plans[run.name] = record
  return plans


def prepare_runs(runs: Sequence[Run], opts: TpuOptions) -> list[Run]:
  """The runs as the slice will run them: checked (:func:`plan` refuses the same), with the mesh
  added where the model needs FSDP (``auto_mesh``)."""
  topo = check_options(opts)
  _check_runs(runs, opts, topo)
  return with_mesh(runs, topo) if opts.auto_mesh else list(runs)


def plan(runs: Sequence[Run], opts: TpuOptions,
         log: Callable[[str], None] = lambda _: None) -> list[Step]:
  """Every step from creating the slice(s) to starting the runs (teardown: :func:`teardown`)."""
  topo = check_options(opts)
  if not runs:
    raise ConfigError("no runs to launch")
  warnings = _check_runs(runs, opts, topo)
  if opts.auto_mesh:
    runs = with_mesh(runs, topo)
  plans = plan_runs(runs, opts, log)  # refuses a run that does not fit, before any VM exists
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(slice_name(opts, run), []).append(run)
  steps = [Step((), f"WARNING: {w}", kind="note") for w in warnings]
  pack = pack_step(opts)
  if pack:
    steps.append(pack)
  for name, group in groups.items():
    if not opts.skip_create:
      steps += create_steps(opts, name, topo)
    steps += install_steps(opts, name)
    steps.append(Step(tuple(_ssh(opts, name, start_command(group, opts, topo, plans))),
                      f"start {len(group)} run(s) on every worker of {name} "
                      f"(one after another, in the background)"))
  return steps


def teardown(opts: TpuOptions, runs: Sequence[Run] = ()) -> list[Step]:
  """The steps that delete the slice(s)."""
  check_options(opts)
  if "{run}" in opts.tpu_name and not runs:
    raise ConfigError(f"--tpu-name {opts.tpu_name!r} names one slice per run: give the sweep's "
                      f"--config so that teardown knows the runs")
  names = list(dict.fromkeys(slice_name(opts, r) for r in runs)) or [slice_name(opts)]
  steps = []
  for name in names:
    if opts.queued:
      argv = _gcloud("queued-resources", "delete", name, *_scope(opts), "--force", "--quiet",
                     alpha=opts.best_effort)
      steps.append(Step(tuple(argv), f"delete queued resource {name} and its TPU"))
    else:
      argv = _gcloud("tpu-vm", "delete", name, *_scope(opts), "--quiet")
      steps.append(Step(tuple(argv), f"delete TPU {name}"))
  return steps


def monitor_commands(opts: TpuOptions, runs: Sequence[Run]) -> list[str]:
  """How to follow the runs: the sweep's progress on worker 0 (ssh), and the log of the first run
  with a gs:// logdir as streamed to the bucket (worker 0's copy: TPU VM host names end in
  ``-w-<worker>``, so it sorts first), without ssh."""
  name = slice_name(opts, runs[0]) if runs else slice_name(opts)
  tail = f"tail -n 20 {LOG_DIR}/{runs[0].sweep if runs else '*'}.log"
  out = [shlex.join(_ssh(opts, name, tail, worker="0"))]
  remote = [r for r in runs if r.logdir.startswith("gs://")]
  if remote:
    logs = remote[0].logdir.rstrip("/") + "/logs/*.log"
    out.append(f"gcloud storage ls {shlex.quote(logs)} | head -n 1 | xargs gcloud storage cat "
               f"| tail -n 20")
  return out


def format_plan(steps: Sequence[Step], teardown_steps: Sequence[Step] = (),
                monitor: Sequence[str] = ()) -> str:
  """The dry-run text: one shell line per step, each after a comment saying what it does."""
  lines = []
  for step in steps:
    if step.kind == "note":
      lines.append(f"# {step.comment}")
    elif step.kind == "wait":
      lines.append(f"# {step.comment}: repeat until it prints ACTIVE")
      lines.append(step.shell)
    else:
      lines.append(f"# {step.comment}")
      lines.append(step.shell)
  if monitor:
    lines.append("# follow the runs (worker 0's progress over ssh; a run's log as streamed to "
                 "its logdir):")
    lines += [f"#   {m}" for m in monitor]
  if teardown_steps:
    lines.append("# when the runs have ended, delete the slice:")
    lines += [f"#   {s.shell}" for s in teardown_steps]
  return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Execution.


def require_gcloud() -> str:
  path = shutil.which("gcloud")
  if not path:
    raise LaunchError(GCLOUD_INSTALL_HINT)
  return path


def execute(steps: Sequence[Step], *, log: Callable[[str], None] = print,
            run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
            poll_seconds: float = 60.0, wait_timeout: float = 24 * 3600.0) -> None:
  """Runs the steps in order; stops at the first that fails."""
  if any(s.kind in ("gcloud", "wait") for s in steps):
    require_gcloud()
  for step in steps:
    if step.kind == "note":
      log(f"# {step.comment}")
      continue
    log(f"# {step.comment}\n{step.shell}")
    if step.kind == "wait":
      deadline = time.monotonic() + wait_timeout
      while True:
        state = run(list(step.argv), capture_output=True, text=True, check=False).stdout.strip()
        if state == "ACTIVE":
          break
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
          raise LaunchError(f"queued resource is {state}: delete it (--teardown) and launch "
                            f"again, or inspect it with `gcloud compute tpus queued-resources "
                            f"describe`")
        if time.monotonic() > deadline:
          raise LaunchError(f"queued resource not ACTIVE after {wait_timeout:.0f} s (state "
                            f"{state or 'unknown'}); it stays queued: launch again with "
                            f"--skip-create once it is ACTIVE")
        log(f"  state {state or 'unknown'}; checking again in {poll_seconds:.0f} s")
        time.sleep(poll_seconds)
      continue
    proc = run(list(step.argv), check=False)
    if proc.returncode != 0:
      raise LaunchError(f"step failed with exit code {proc.returncode}: {step.shell}")
