"""Shared test setup: tiny configs, a hermetic environment (no TF import, no network), and the
test tiers.

A test is marked ``slow`` automatically when it uses a fixture that trains components or a UNet
(``SLOW_FIXTURES``) or when it spawns processes (it calls ``subprocess`` itself or through a helper
of its module); other expensive tests carry ``@pytest.mark.slow`` by hand. ``pytest -m "not slow"``
is the fast tier (minutes); ``pytest`` runs everything (CI).
"""

import ast
import inspect
import os
import pathlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compiled programs (a tiny UNet's init alone compiles for ~25 s on CPU) are shared by every test
# and subprocess of a run through JAX's persistent cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax-tests"))

import pytest  # pylint: disable=g-import-not-at-top

from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_jax()


def tiny_config(width: int = 32, cross_attn_dim: int = 24):
  """The base config shrunk to a UNet that initialises in a second (test-only size)."""
  config = cfglib.base_config()
  config.model.update(width=width, head_dim=16, num_heads=0, cross_attn_dim=cross_attn_dim)
  return config


@pytest.fixture
def repo_dir():
  return REPO


class Offline:
  """The offline components trained once per test session (the real recipes, fewer steps):
  ``config`` points at them (data.data_dir, clip.dir, vae.dir); logs say what training did. The
  VAE trains in a second process (``offline_setup.py``) while the CLIP trains here."""

  def __init__(self, root):
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    from ldm_scaling import data  # pylint: disable=g-import-not-at-top
    from ldm_scaling.components import clip, vae  # pylint: disable=g-import-not-at-top
    import offline_setup  # pylint: disable=g-import-not-at-top
    config = offline_setup.offline_config(str(root))
    self.config = config
    data.prepare(config)  # once, before two processes read it
    with open(root / "vae.log", "w+") as out:
      proc = subprocess.Popen([sys.executable, offline_setup.__file__, str(root)], stdout=out,
                              stderr=subprocess.STDOUT, text=True)
      try:
        self.clip_logs = []
        self.clip_dir = clip.ensure(config, log=self.clip_logs.append)
        proc.wait(timeout=1800)
      finally:
        proc.kill()
      out.seek(0)
      text = out.read()
    if proc.returncode:
      raise RuntimeError(f"training the offline VAE failed (rc={proc.returncode}):\n"
                         f"{text[-4000:]}")
    self.vae_logs = [line for line in text.splitlines() if line.startswith("train-vae")]
    self.vae_dir = vae.ensure(config, log=self.vae_logs.append)  # trained: loads and checks it


@pytest.fixture(scope="session")
def offline_components(tmp_path_factory):
  """Embedded data + small CLIP (150 steps) + small VAE (200 steps), shared by every test that
  needs conditioning (quality tests, trainer, sampling, evaluation, the study)."""
  # LDM_SCALING_TEST_OFFLINE_DIR: a root an earlier session trained (components are only trained
  # where absent), to iterate on the tests that use it without the ~8 min setup.
  root = os.environ.get("LDM_SCALING_TEST_OFFLINE_DIR")
  return Offline(pathlib.Path(root) if root else tmp_path_factory.mktemp("offline"))


@pytest.fixture(scope="session")
def tiny_run(offline_components, tmp_path_factory):
  """A trained (3 steps) tiny-UNet run on the offline components, with periodic samples: the
  workdir that sampling, evaluation and the study tests read."""
  import copy  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import trainer  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(offline_components.config)
  # Two levels, one block each: every layer kind, in a graph that compiles in seconds.
  config.model.update(channel_mult=(1, 2), attn_levels=(True, False), layers_per_block=1)
  config.model.update(unet.preset(32, config.model.channel_mult))
  config.train.update(steps=3, batch_size=8, lr=1e-3, warmup_steps=0, log_every=1,
                      checkpoint_every=3, async_checkpointing=False, sample_every=3,
                      sample_steps=2)
  workdir = tmp_path_factory.mktemp("tiny_run")
  result = trainer.train(config, str(workdir))
  return workdir, result


SMALL_TEACHER_STEPS = 2


@pytest.fixture(scope="session")
def small_teacher(offline_components, tmp_path_factory):
  """A VP teacher run (2 steps, 8x8 latents) on the offline components with the smallest UNet
  that has the mid block (SwD's features come from it): one level, width 16, attention in the
  middle only. Distillation tests train students from it: their programs (student, teacher, fake
  net and losses) compile 2-3x faster than on tiny_run's two-level UNet."""
  import copy  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import trainer  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(offline_components.config)
  config.model.update(width=16, head_dim=16, num_heads=0, channel_mult=(1,), attn_levels=(False,),
                      layers_per_block=1, norm_groups=8)
  config.train.update(steps=SMALL_TEACHER_STEPS, batch_size=8, lr=1e-3, warmup_steps=0,
                      log_every=1, checkpoint_every=SMALL_TEACHER_STEPS,
                      async_checkpointing=False, sample_every=0)
  workdir = tmp_path_factory.mktemp("small_teacher")
  trainer.train(config, str(workdir))
  return workdir


# -------------------------------------------------------------------------------------------------
# Test tiers.

SLOW_FIXTURES = {"offline_components", "tiny_run", "small_teacher"}
_SPAWN_CALLS = {"run", "Popen", "check_call", "check_output", "call"}


def _spawning_functions(module) -> set[str]:
  """Names of the module-level functions of a test module that start processes, directly or by
  calling another such function of the module."""
  try:
    tree = ast.parse(inspect.getsource(module))
  except (OSError, TypeError):
    return set()
  funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

  def direct(f):
    return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
               and n.value.id == "subprocess" and n.attr in _SPAWN_CALLS for n in ast.walk(f))

  spawning = {name for name, f in funcs.items() if direct(f)}
  calls = {name: {n.func.id for n in ast.walk(f)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
           for name, f in funcs.items()}
  while True:
    more = {name for name, c in calls.items() if c & spawning} - spawning
    if not more:
      return spawning
    spawning |= more


def _xdist_group(item) -> str | None:
  """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's command) tests are spread over
  worker processes one by one, except those sharing an expensive fixture: every user of the
  session's offline components runs on one worker (trained once, not once per worker), and the
  tests of a module with a module-scoped fixture stay together (it is built once)."""
  if SLOW_FIXTURES & set(item.fixturenames):
    return "offline_components"
  defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
  if any(d.scope == "module" for ds in defs.values() for d in ds):
    return item.module.__name__
  return None


# tryfirst: xdist's worker plugin (registered after this conftest, so called before it) turns the
# xdist_group marks into node ids in this same hook; the marks must be there by then.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  spawning = {}
  for item in items:
    module = item.module
    if module not in spawning:
      spawning[module] = _spawning_functions(module)
    name = getattr(item, "originalname", item.name)
    group = _xdist_group(item)
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
    if SLOW_FIXTURES & set(item.fixturenames) or name in spawning[module]:
      item.add_marker(pytest.mark.slow)
  # Long tests first (a stable sort keeps the rest in order). xdist hands out the largest group
  # first (the offline components') and then single tests in this order: a long test starting
  # last would run alone at the end while the other worker idles.
  items.sort(key=lambda item: item.get_closest_marker("long") is None)
