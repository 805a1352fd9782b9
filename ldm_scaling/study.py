"""The end-to-end scaling study: a model-size sweep trained and evaluated in one resumable job.

``ldm-scaling study --config configs/study/cpu_mini.py --workdir runs/study`` runs four phases,
each of which skips what an earlier (possibly interrupted) invocation finished:

1. components: the offline CLIP and VAE the config names are trained if absent;
2. training: one run per ``study.widths`` under ``<workdir>/runs/w<width>`` with the steps the
   schedule gives it (a finished run is not reopened; an interrupted one resumes from its last
   checkpoint);
3. evaluation: the config's eval grid over every run's final checkpoint (plus, with
   ``study.fid_curve_cell``, one cell over every kept checkpoint for FID vs training compute) into
   ``<workdir>/results`` — cells already in the table are skipped;
4. analysis: figures and ``<workdir>/report.md`` regenerated from the table.

Every invocation appends its phase wall times to ``<workdir>/timings.json``; the report sums them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from typing import Callable

import jax
import ml_collections
import pandas as pd

from ldm_scaling import analysis
from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import files
from ldm_scaling.analysis import report as analysis_report
from ldm_scaling.components import clip as clip_component
from ldm_scaling.components import vae as vae_component
from ldm_scaling.errors import ConfigError
from ldm_scaling.eval import fid, grid
from ldm_scaling.eval import results
from ldm_scaling.models import cost as costlib
from ldm_scaling.models import tokenizer
from ldm_scaling.models import unet
from ldm_scaling.models import vae
from ldm_scaling.train import checkpoint
from ldm_scaling.train import trainer
from ldm_scaling.train.metrics import format_duration

SCHEDULES = ("equal_compute", "equal_steps")


@dataclasses.dataclass(frozen=True)
class RunPlan:
  width: int
  steps: int
  workdir: str
  params: int
  norm_cost: float

  @property
  def train_compute(self) -> float:
    """Normalised cost x optimizer steps (batch size is the same for every run)."""
    return self.norm_cost * self.steps


def validate(config: ml_collections.ConfigDict) -> None:
  s = config.study
  if not s.widths:
    raise ConfigError("study.widths is empty; list the UNet widths to compare, e.g. (16,32,48)")
  if len(set(s.widths)) != len(s.widths):
    raise ConfigError(f"study.widths has duplicates: {tuple(s.widths)}")
  if s.schedule not in SCHEDULES:
    raise ConfigError(f"study.schedule must be one of {SCHEDULES}, got {s.schedule!r}")
  if s.checkpoints < 1:
    raise ConfigError(f"study.checkpoints must be >= 1, got {s.checkpoints}")
  if s.fid_curve_cell and len(s.fid_curve_cell) != 3:
    raise ConfigError(f"study.fid_curve_cell must be (sampler, steps, cfg_scale) or (), got "
                      f"{tuple(s.fid_curve_cell)}")
  for w in s.widths:
    experiment.validate(width_config(config, int(w), config.train.steps))


def width_config(config: ml_collections.ConfigDict, width: int,
                 steps: int) -> ml_collections.ConfigDict:
  """The study's experiment at one width (heads chosen as the SD-2.x preset would)."""
  run = ml_collections.ConfigDict(config.to_dict())
  run.model.update(unet.preset(width, tuple(config.model.channel_mult)))
  run.train.steps = int(steps)
  run.train.warmup_steps = min(run.train.warmup_steps, max(run.train.steps // 10, 1))
  # study.checkpoints per run, whatever its length: the points of the training-compute curve.
  points = int(config.study.checkpoints)
  run.train.checkpoint_every = max(1, -(-run.train.steps // points))
  run.train.keep_checkpoints = max(run.train.keep_checkpoints, points)
  return run


def plan(config: ml_collections.ConfigDict, root: str) -> list[RunPlan]:
  """Each width's run: its workdir, its cost and, from the schedule, its training steps."""
  costs = {}
  for w in config.study.widths:
    c = width_config(config, int(w), config.train.steps)
    costs[int(w)] = costlib.model_cost(c.model, c.cost)
  widest = max(costs)
  out = []
  for w, c in sorted(costs.items()):
    if config.study.schedule == "equal_compute":
      steps = max(1, round(config.train.steps * costs[widest].norm_cost / c.norm_cost))
    else:
      steps = config.train.steps
    out.append(RunPlan(w, steps, os.path.join(root, "runs", f"w{w}"), c.params, c.norm_cost))
  return out


def finished_step(workdir: str) -> int | None:
  """The run's latest complete checkpoint step (None without one), read without compiling."""
  steps = checkpoint.available_steps(workdir)
  return steps[-1] if steps else None


class _Clock:
  """Phase wall times, appended to ``timings.json`` as each phase ends (survives interrupts)."""

  def __init__(self, root: str, log: Callable[[str], None]):
    self.path = os.path.join(root, "timings.json")
    self.log = log
    self.started = time.perf_counter()
    self.invocation = dict(started=time.time(), phases={})
    self.history = []
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        self.history = json.load(f)
    self.history.append(self.invocation)

  def phase(self, name: str, seconds: float) -> None:
    self.invocation["phases"][name] = round(seconds, 1)
    files.atomic_write_text(self.path, json.dumps(self.history, indent=1))

  def total(self) -> float:
    return sum(sum(inv["phases"].values()) for inv in self.history)


def _eta_line(done: float, total: float, elapsed: float) -> str:
  if done <= 0:
    return "ETA unknown"
  return f"ETA {format_duration(elapsed / done * (total - done))}"


def run(config: ml_collections.ConfigDict, root: str, *, log: Callable[[str], None] = print,
        command: str = "") -> dict:
  """Runs (or resumes) the study in ``root``; returns a summary (paths, wall times, verdict)."""
  validate(config)
  if "://" in root:
    raise ConfigError(f"--workdir {root!r}: the study writes a local directory (it is a one-machine "
                      f"job); for gs:// runs on a TPU slice use `ldm-scaling sweep` + "
                      f"`ldm-scaling eval` (docs/launch.md)")
  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  clock = _Clock(root, log)
  _write_study_config(root, config)

  # 1. Offline components (skipped when present).
  t0 = time.perf_counter()
  _ensure_components(config, log)
  clock.phase("components", time.perf_counter() - t0)

  # 2. Training, one width at a time (each uses every device).
  t0 = time.perf_counter()
  runs = plan(config, root)
  log("study plan: " + "; ".join(
      f"width {r.width}: {r.params / 1e6:.2f}M params, norm cost {r.norm_cost:.5f}, "
      f"{r.steps} steps" for r in runs))
  total_compute = sum(r.train_compute for r in runs)
  done_compute = 0.0
  for r in runs:
    step = finished_step(r.workdir)
    if step is not None and step >= r.steps:
      log(f"width {r.width}: already trained ({step} steps) in {r.workdir}")
      total_compute -= r.train_compute
      continue
    _train(width_config(config, r.width, r.steps), r.workdir, log)
    done_compute += r.train_compute
    log(f"study training: width {r.width} done "
        f"({_eta_line(done_compute, total_compute, time.perf_counter() - t0)} for training)")
  clock.phase("train", time.perf_counter() - t0)

  # 3. Evaluation grid (cells already in the table are skipped).
  t0 = time.perf_counter()
  table_dir = os.path.join(root, "results")
  extractor = fid.FeatureExtractor(batch_size=grid.feature_batch(config.eval.num_samples),
                                   log=log)
  workdirs = [r.workdir for r in runs]
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.eval.checkpoints = "latest"
  grid.evaluate(workdirs, table_dir, eval_config=eval_config, log=log, extractor=extractor)
  if config.study.fid_curve_cell:
    sampler, steps, cfg_scale = config.study.fid_curve_cell
    eval_config.eval.update(checkpoints="all", samplers=(str(sampler),), steps=(int(steps),),
                            cfg_scales=(float(cfg_scale),))
    log(f"training curves: {sampler} {steps} steps cfg {cfg_scale} at every kept checkpoint")
    grid.evaluate(workdirs, table_dir, eval_config=eval_config, log=log, extractor=extractor)
  clock.phase("eval", time.perf_counter() - t0)

  # 4. Analysis and report (always regenerated: cheap, and reflects the whole table).
  t0 = time.perf_counter()
  summary = write_report(root, table_dir, runs, config, clock, command=command)
  clock.phase("report", time.perf_counter() - t0)
  summary["wall_s"] = round(clock.total(), 1)
  log(f"study done: {summary['report']} (wall time over all invocations "
      f"{summary['wall_s'] / 60:.1f} min)")
  return summary


def _write_study_config(root: str, config) -> None:
  """Refuses to continue a study directory created by a different study config."""
  path = os.path.join(root, "study_config.json")
  now = dict(config=json.loads(json.dumps(config.to_dict(), default=list)),
             hash=cfglib.config_hash(config))
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if old["hash"] != now["hash"]:
      before = cfglib.flatten(cfglib.with_defaults(old["config"]))
      changed = sorted(k for k, v in cfglib.flatten(cfglib.with_defaults(now["config"])).items()
                       if before.get(k) != v)
      if not changed:  # written before keys were added to the schema; same study
        return
      raise ConfigError(f"{root!r} holds a study with a different config (changed: "
                        f"{', '.join(changed[:8])}); use another --workdir or the old config")
    return
  files.atomic_write_text(path, json.dumps(now, indent=1))


def _ensure_components(config, log) -> None:
  if config.text.encoder == tokenizer.OFFLINE or not config.eval.clip_model:
    directory = clip_component.ensure(config, config.clip.dir or None, log=log)
    log(f"offline CLIP: {directory}")
  if config.vae.weights == vae.TRAINED:
    directory = vae_component.ensure(config, config.vae.dir or None, log=log)
    log(f"offline VAE: {directory}")


def _train(config, workdir: str, log) -> None:
  log(f"training width {config.model.width} for {config.train.steps} steps in {workdir}")
  result = trainer.train(config, workdir)
  if result.stopped != "done":
    raise SystemExit(f"training of {workdir} stopped ({result.stopped}) at step {result.step}; "
                     f"rerun the study to resume")


# -------------------------------------------------------------------------------------------------
# The report.


def verdict(frame) -> tuple[str, list[str]]:
  """Whether the paper's finding holds in ``frame``, per sampler, from FID at each model's optimal
  CFG vs sampling cost (latest checkpoints):

  * *holds*: the Pareto front over sizes is owned by the smallest model at its cheap end and by a
    bigger one at its expensive end, **and** somewhere both were sampled a bigger model beats a
    smaller one at equal cost (a crossover);
  * *partly*: the front pattern holds, but the bigger model only wins at costs beyond the smaller
    one's most expensive sample (no crossover inside the common range);
  * otherwise it does not hold.

  Also states the noise scale: the largest rise of a model's optimal-CFG FID when its steps grow
  (FID should not get worse with more steps), below which differences are not meaningful.
  Returns (reproduced | partly reproduced | not reproduced, lines)."""
  lines, outcomes = [], []
  smallest = int(frame["width"].min())
  opt = analysis.optimal_cfg(frame, "fid", checkpoint="latest")
  rises = [float(max(0.0, part.sort_values("steps")["fid"].diff().max()))
           for _, part in opt.groupby(["model", "sampler"]) if len(part) > 1]
  noise = max(rises) if rises else float("nan")
  cross = analysis.crossovers(frame, "fid")
  for sampler in sorted(frame["sampler"].unique()):
    segments = analysis.frontier_segments(analysis.pareto_front(frame, "fid", sampler), "fid")
    owners = list(segments["width"])
    front = owners[0] == smallest and owners[-1] > owners[0]
    mine = cross[cross["sampler"] == sampler]
    crossing = mine[mine["status"].isin(["crossover", "bigger_better_throughout"])]
    order = " -> ".join(f"w{w}" for w in owners)
    line = f"**{sampler}**: Pareto-front owners from low to high sampling cost: {order}. "
    if front and len(crossing):
      outcomes.append("holds")
      pairs = ", ".join(f"{r.big} beats {r.small} beyond cost {r.crossover_cost:.3g}"
                        for r in crossing.itertuples())
      line += f"The smallest model owns the cheap end and bigger ones win at higher cost ({pairs})."
    elif front:
      outcomes.append("partly")
      line += (f"The smallest model owns the cheap end and w{owners[-1]} the expensive end, but "
               f"only at costs beyond the smaller models' most expensive samples: where both "
               f"were sampled at equal cost, no bigger model beats a smaller one (no crossover).")
    else:
      outcomes.append("no")
      line += (f"Not the paper's pattern: w{owners[0]} owns the cheapest end and w{owners[-1]} "
               f"the most expensive one.")
    lines.append(line)
  if rises and noise > 0:
    lines.append(f"Noise: a model's optimal-CFG FID rises by up to {noise:.1f} when its steps "
                 f"grow (it should not), so differences below about {noise:.1f} FID are within "
                 f"this study's noise (n={int(frame['n'].max())} samples per cell).")
  outcome = ("reproduced" if all(o == "holds" for o in outcomes)
             else "partly reproduced" if any(o != "no" for o in outcomes) else "not reproduced")
  return outcome, lines


def write_report(root: str, table_dir: str, runs: list[RunPlan], config, clock: _Clock, *,
                 command: str = "") -> dict:
  """Figures + the analysis summary (``<root>/analysis``) and ``<root>/report.md``."""
  frame = results.load(table_dir)
  out_dir = os.path.join(root, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  made = analysis.analyze(frame, out_dir, "fid", source="results")
  outcome, lines = verdict(frame)
  env = environment()
  phases: dict[str, float] = {}
  for inv in clock.history:
    for name, sec in inv["phases"].items():
      phases[name] = phases.get(name, 0.0) + sec
  plan_rows = pd.DataFrame([dict(width=r.width, params=f"{r.params / 1e6:.2f}M",
                                 norm_cost=r.norm_cost, steps=r.steps,
                                 train_compute=r.train_compute) for r in runs])
  e = config.eval
  figures = [os.path.relpath(p, root) for p in made["figures"]]
  text = [
      "# CPU scaling study", "",
      f"Command: `{command or 'ldm-scaling study'}`  ", f"Commit: `{env['commit']}`; "
      f"{env['devices']} ({env['cpus']} cores, {env['machine']}), jax {env['jax']}.  ",
      f"Wall time: {clock.total() / 60:.1f} min over {len(clock.history)} invocation(s) ("
      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items()) + ").", "",
      "## Verdict", "",
      f"Mei et al.'s finding — smaller models give better FID at low sampling cost, larger ones "
      f"at high cost — is **{outcome}** at this scale (computed from the table; see "
      f"`ldm_scaling.study.verdict` for the rule):", "",
      *[f"- {line}" for line in lines], "",
      "Scale caveats: 32 px synthetic shapes, UNets of "
      f"{min(r.params for r in runs) / 1e6:.1f}–{max(r.params for r in runs) / 1e6:.1f}M "
      f"parameters trained for minutes, FID from {e.num_samples} samples per cell against "
      f"{e.fid_reference_n} real images (biased upward below 2048 samples; compare cells, not "
      "papers), CLIP score from the locally trained small CLIP (`local-clip-small`), not "
      "OpenAI-CLIP.", "",
      "## Runs", "",
      f"Schedule `{config.study.schedule}`, batch {config.train.batch_size}, lr "
      f"{config.train.lr:g} ({config.train.schedule}), EMA {config.train.ema_decay}. "
      "Normalised cost = forward FLOPs at the sampled setting relative to width 320 of the same "
      "topology; training compute = normalised cost x steps.", "",
      analysis_report.markdown_table(plan_rows), "",
      "## Figures", "", *[f"![{os.path.basename(p)}]({p})" for p in figures], "",
      f"The full analysis (optimal CFG, Pareto fronts, crossovers, sampler comparison, training "
      f"curves) is in [analysis/summary.md](analysis/summary.md); the table in "
      f"[results/results.csv](results/results.csv).", ""]
  path = os.path.join(root, "report.md")
  files.atomic_write_text(path, "\n".join(text))
  return dict(report=path, verdict=outcome, figures=made["figures"],
              results=os.path.join(table_dir, "results.csv"))


def environment() -> dict:
  """What the report records about where it ran."""
  here = os.path.dirname(__file__)
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=here).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", here],
                           capture_output=True, text=True, check=False, cwd=here).stdout.strip()
    if commit and dirty:
      commit += " + uncommitted changes"
  except OSError:
    commit = ""
  return dict(commit=commit or "unknown", machine=platform.machine(), cpus=os.cpu_count(),
              devices=f"{jax.device_count()} x {jax.devices()[0].platform}",
              jax=jax.__version__, python=platform.python_version())
