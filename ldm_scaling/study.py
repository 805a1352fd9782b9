"""The end-to-end scaling study: a model-size sweep trained and evaluated in one resumable job.

``ldm-scaling study --config configs/study/cpu_mini.py --workdir runs/study`` runs four phases,
each of which skips what an earlier (possibly interrupted) invocation finished:

1. components: the offline CLIP and VAE the config names are trained if absent;
2. training: one run per ``study.widths`` under ``<workdir>/runs/w<width>`` with the steps the
   schedule gives it (a finished run is not reopened; an interrupted one resumes from its last
   checkpoint);
3. evaluation: the config's eval grid over every run's final checkpoint (plus, with
   ``study.fid_curve_cell``, one cell over every kept checkpoint for FID vs training compute) into
   ``<workdir>/results`` — cells already in the table are skipped; with ``study.extend_cfg``, CFG
   scales past the grid for the cells whose optimum sits at an end of it (above the top; below
   the bottom down to CFG 1); the real-data floor (held-out
   real images vs the FID reference at the cells' n, ``<workdir>/real_data_floor.json``);
4. analysis: figures and ``<workdir>/report.md`` regenerated from the table, with the verdict of
   :func:`verdict` (a rule fixed in code: reproduced / not reproduced / inconclusive at this noise)
   and the size-effect check of :func:`size_effect_line`.

Every invocation appends its commit and phase wall times to ``<workdir>/timings.json``; the report
sums the times and names the commit of each invocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from ldm_scaling.analysis import cfg as analysis_cfg
from ldm_scaling.analysis import efficiency
from ldm_scaling.analysis import report as analysis_report
from ldm_scaling.components import clip as clip_component
from ldm_scaling.components import vae as vae_component
from ldm_scaling.errors import ConfigError, UserError
from ldm_scaling.eval import fid, frechet, grid
from ldm_scaling.eval import results
from ldm_scaling.models import cost as costlib
from ldm_scaling.models import tokenizer
from ldm_scaling.models import unet
from ldm_scaling.models import vae
from ldm_scaling.train import checkpoint
from ldm_scaling.train import trainer
from ldm_scaling.train.metrics import format_duration

SCHEDULES = ("equal_compute", "equal_steps")
CONFIRM_DIR = "confirm"  # study.confirm_n's table, beside results/
FLOOR_JSON = "real_data_floor.json"  # real_floor's copy, read by write_report


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
  if s.extend_cfg < 0:
    raise ConfigError(f"study.extend_cfg must be >= 0 (extra CFG scales), got {s.extend_cfg}")
  if s.confirm_n < 0 or s.confirm_n == 1:
    raise ConfigError(f"study.confirm_n must be 0 (off) or >= 2 samples, got {s.confirm_n}")
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
    self.invocation = dict(started=time.time(), commit=environment()["commit"], phases={})
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

  def commits(self) -> str:
    """The code of every invocation: one commit, or each in order with its invocation numbers
    (``unknown`` for records written before invocations kept theirs)."""
    seen: dict[str, list[int]] = {}
    for i, inv in enumerate(self.history, 1):
      seen.setdefault(inv.get("commit", "unknown"), []).append(i)
    if len(seen) == 1:
      return f"Commit: `{next(iter(seen))}`"
    return "Commits: " + ", ".join(
        f"`{c}` (invocation{'s' if len(n) > 1 else ''} {', '.join(map(str, n))})"
        for c, n in seen.items())


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
  extend_cfg(config, runs, table_dir, log=log, extractor=extractor)
  floor = real_floor(config, root, table_dir, log=log, extractor=extractor)
  confirm(config, runs, table_dir, os.path.join(root, CONFIRM_DIR), log=log, extractor=extractor)
  clock.phase("eval", time.perf_counter() - t0)

  # 4. Analysis and report (always regenerated: cheap, and reflects the whole table).
  t0 = time.perf_counter()
  summary = write_report(root, table_dir, runs, config, clock, command=command, floor=floor)
  clock.phase("report", time.perf_counter() - t0)
  summary["wall_s"] = round(clock.total(), 1)
  log(f"study done: {summary['report']} (wall time over all invocations "
      f"{summary['wall_s'] / 60:.1f} min)")
  return summary


def extend_cfg(config, runs: list[RunPlan], table_dir: str, *, log=print, extractor=None) -> int:
  """Brackets the optimal CFG: while a run's latest-checkpoint FID optimum (per sampler and steps
  of the grid) sits at an open end of the scales evaluated (``analysis.cfg.best_rows``), evaluates
  the next scale past it -- the grid's last spacing above the top, its first spacing below the
  bottom (never below CFG 1, the conditional model alone: ``cfg.CFG_FLOOR``) -- at most
  ``study.extend_cfg`` scales past each end. Returns the cells added (0 when ``extend_cfg`` is 0 or
  the grid has one scale)."""
  scales = sorted(float(x) for x in config.eval.cfg_scales)
  extra = int(config.study.extend_cfg)
  if extra <= 0 or len(scales) < 2:
    return 0
  floor = analysis_cfg.CFG_FLOOR
  up, down = scales[-1] - scales[-2], scales[1] - scales[0]
  top_limit = scales[-1] + extra * up + 1e-9
  bottom_limit = max(floor, scales[0] - extra * down) - 1e-9
  workdir = {r.width: r.workdir for r in runs}
  added = 0
  for _ in range(extra):
    opt = analysis.optimal_cfg(results.load(table_dir), "fid", checkpoint="latest")
    opt = opt[opt["open_edge"] & opt["width"].isin(list(workdir)) &
              opt["sampler"].isin([str(x) for x in config.eval.samplers]) &
              opt["steps"].isin([int(x) for x in config.eval.steps])]
    cells = []
    for row in opt.itertuples():
      if row.grid_edge == "top":
        scale, end = round(float(row.cfg_scale) + up, 6), "top"
      else:
        scale, end = round(max(float(row.cfg_scale) - down, floor), 6), "bottom"
      if bottom_limit <= scale <= top_limit:
        cells.append((row, scale, end))
    if not cells:
      break
    for row, scale, end in cells:
      log(f"CFG grid extension: w{row.width} {row.sampler} {row.steps} steps had its optimum at "
          f"the grid's {end} (CFG {row.cfg_scale:g}); evaluating CFG {scale:g}")
      cell = ml_collections.ConfigDict(config.to_dict())
      cell.eval.update(checkpoints="latest", samplers=(str(row.sampler),),
                       steps=(int(row.steps),), cfg_scales=(scale,))
      grid.evaluate([workdir[int(row.width)]], table_dir, eval_config=cell, log=log,
                    extractor=extractor)
      added += 1
  return added


def best_cells(frame: pd.DataFrame, widths) -> pd.DataFrame:
  """Each width's lowest-FID cell at its run's latest checkpoint (any sampler, steps and CFG): its
  best within the table's highest sampling budget, the cell :func:`confirm` evaluates again."""
  rows = []
  for w in widths:
    mine = frame[frame["width"] == int(w)]
    if mine.empty:
      continue
    mine = mine[mine["checkpoint_step"] == mine["checkpoint_step"].max()]
    mine = mine[pd.to_numeric(mine["fid"], errors="coerce").notna()]
    if len(mine):
      rows.append(mine.loc[pd.to_numeric(mine["fid"]).idxmin()])
  return pd.DataFrame(rows)


def confirm(config, runs: list[RunPlan], table_dir: str, confirm_dir: str, *, log=print,
            extractor=None) -> int:
  """With ``study.confirm_n``: each run's best grid cell (:func:`best_cells`) evaluated again with
  ``confirm_n`` samples and a fresh seed (``eval.seed + 1``) into its own table ``confirm_dir``,
  plus the real-data floor at that n. The best of many noisy cells is biased low (it was picked
  for its noise, too); fresh samples are not, and more of them shrink the interval, so the
  size-effect check reads these cells. Resumable like every grid. Returns the cells evaluated."""
  n = int(config.study.confirm_n)
  if n <= 0:
    return 0
  best = best_cells(results.load(table_dir), [r.width for r in runs])
  workdir = {r.width: r.workdir for r in runs}
  for row in best.itertuples():
    cell = ml_collections.ConfigDict(config.to_dict())
    cell.eval.update(checkpoints="latest", samplers=(str(row.sampler),), steps=(int(row.steps),),
                     cfg_scales=(float(row.cfg_scale),), num_samples=n,
                     seed=int(config.eval.seed) + 1)
    log(f"confirmation: w{row.width}'s best cell ({row.sampler} {int(row.steps)} steps CFG "
        f"{float(row.cfg_scale):g}, FID {float(row.fid):.1f} at n={int(row.n)}) again with n={n}, "
        f"seed {cell.eval.seed}")
    grid.evaluate([workdir[int(row.width)]], confirm_dir, eval_config=cell, log=log,
                  extractor=extractor)
  real_floor(config, confirm_dir, confirm_dir, log=log, extractor=extractor, n=n)
  return len(best)


def real_floor(config, root: str, table_dir: str, *, log=print, extractor=None,
               n: int | None = None) -> dict | str:
  """The real-data floor: held-out real images vs the FID reference at ``n`` images (default: the
  cells' ``eval.num_samples``; what FID a perfect model would get at this n), via
  ``grid.real_data_floor`` (which caches it in the table directory); also written to
  ``<root>/real_data_floor.json`` for :func:`write_report`. A string says why there is none
  (``study.real_floor=False``, an eval module without the function, or a config/data error such
  as too few held-out images)."""
  path = os.path.join(root, FLOOR_JSON)
  n = int(config.eval.num_samples if n is None else n)
  if not config.study.real_floor:
    return "not computed (study.real_floor=False)"
  compute = getattr(grid, "real_data_floor", None)
  if compute is None:
    return "not computed (this version of ldm_scaling.eval.grid has no real_data_floor)"
  try:
    floor = dict(compute(config, table_dir, n=n, extractor=extractor, log=log))
  except UserError as e:
    log(f"real-data floor not computed: {e}")
    return f"not computed ({e})"
  files.atomic_write_text(path, json.dumps(floor, indent=1, default=str))
  return floor


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

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = (
    "reproduced", "not reproduced", "inconclusive at this noise")
PROTOCOLS = {
    "equal_steps": "every size trains the same number of optimizer steps (Mei et al.'s protocol: "
                   "500K steps for every size)",
    "equal_compute": "every size gets the same training compute: the widest trains train.steps "
                     "steps and a narrower one proportionally more (normalised cost x steps "
                     "equal; not the paper's protocol)",
}


def _combine(outcomes: list[str]) -> str:
  """Reproduced when something supports the finding and nothing contradicts it; not reproduced
  when the reverse; else inconclusive (no decisive evidence, or evidence both ways)."""
  yes = any(o in (REPRODUCED, efficiency.SUPPORTS) for o in outcomes)
  no = any(o in (NOT_REPRODUCED, efficiency.CONTRADICTS) for o in outcomes)
  if yes and not no:
    return REPRODUCED
  if no and not yes:
    return NOT_REPRODUCED
  return INCONCLUSIVE


def verdict(frame) -> tuple[str, list[str]]:
  """Whether Mei et al.'s finding — smaller models are better at low sampling cost, larger ones at
  high cost — holds in ``frame``, by a rule fixed here before any data:

  1. Points: each model at its latest checkpoint, per sampler and step count, at its FID-optimal
     CFG scale. Each point's uncertainty u is its ``fid_ci95`` (95 % half-width from resampling
     the samples, ``eval.frechet.METHOD``) where the table has one, else the noise estimate /
     sqrt(2), where the noise estimate is the largest rise of a model's optimal-CFG FID when its
     steps grow (FID should not rise).
  2. For every pair (smaller, bigger) and every sampling budget both can meet, each model's best
     FID within the budget; one *wins* when its FID is lower by more than sqrt(u_a^2 + u_b^2), and
     only if the loser's optimum is not at the top of its CFG grid (there its FID is only an upper
     bound). (``analysis.budget_comparisons``.)
  3. Each pair is judged at the two ends of its common budgets (``analysis.pair_evidence``): it
     *supports* the finding when the smaller model wins at the lowest budget and the bigger one at
     the highest; it *contradicts* it when the bigger one wins at the lowest, or the smaller one at
     the highest; otherwise it is *within noise*. (Only the ends, so that many budgets do not
     produce a decisive-looking win by chance.)
  4. Per sampler, then over samplers: **reproduced** when some pair (sampler) supports and none
     contradicts; **not reproduced** when some contradicts and none supports; otherwise
     **inconclusive at this noise**.

  Returns (one of ``reproduced``, ``not reproduced``, ``inconclusive at this noise``; the lines
  that explain it)."""
  lines = []
  noise = analysis.noise_estimate(frame, "fid")
  comparisons = analysis.budget_comparisons(frame, "fid", noise=noise)
  evidence = analysis.pair_evidence(comparisons)
  opt = analysis.optimal_cfg(frame, "fid", checkpoint="latest")
  outcomes = []
  for sampler in sorted(opt["sampler"].unique()):
    front = analysis.front_significance(analysis.pareto_front(frame, "fid", sampler), frame,
                                        "fid", sampler, noise=noise)
    segments = analysis.frontier_segments(front, "fid")
    order = " → ".join(
        r.model + ("" if r.significant else " (within noise)" if r.contested
                   else " (uncontested)") for r in segments.itertuples())
    mine = evidence[evidence["sampler"] == sampler]
    outcome = _combine(list(mine["outcome"])) if len(mine) else INCONCLUSIVE
    outcomes.append(outcome)
    pairs = []
    for r in mine.itertuples():
      ends = []
      for end, budget, winner, adv, u, edge in (
          ("lowest", r.low_budget, r.low_winner, r.low_advantage, r.low_u, r.low_edge),
          ("highest", r.high_budget, r.high_winner, r.high_advantage, r.high_u, r.high_edge)):
        would = r.big if adv > 0 else r.small
        who = {"small": f"{r.small} wins", "big": f"{r.big} wins"}.get(
            winner, f"{would}'s win not counted (the other's CFG optimum is at an open end of "
                    f"its grid)"
            if edge else "no decisive win")
        ends.append(f"at the {end} common budget ({budget:.3g}) {who} (FID {r.small} − "
                    f"{r.big} = {adv:+.1f} ± {u:.1f})")
      edge = (f"; {r.edge_discounted} win(s) against a CFG optimum at an open grid end not "
              f"counted"
              if r.edge_discounted else "")
      pairs.append(f"{r.small} vs {r.big}: {', '.join(ends)}{edge} (pair: {r.outcome})")
    lines.append(f"**{sampler}**: {outcome}. Pareto-front owners from low to high sampling cost: "
                 f"{order or '–'}. " + ("; ".join(pairs) or "Fewer than two sizes") + ".")
  outcome = _combine(outcomes) if outcomes else INCONCLUSIVE

  known = (pd.to_numeric(opt["fid_ci95"], errors="coerce").notna()
           if "fid_ci95" in opt.columns else pd.Series(False, index=opt.index))
  n = int(pd.to_numeric(frame["n"], errors="coerce").max()) if "n" in frame.columns else 0
  if known.all():
    lines.append(f"Uncertainty: each FID's 95 % interval from {frechet.METHOD}-sample resampling "
                 f"(`fid_ci95`, n={n} samples per cell; median half-width "
                 f"{opt['fid_ci95'].median():.1f} FID at the optimal CFG); a win needs a gap "
                 f"larger than the two half-widths combined.")
  else:
    missing = "no cell" if not known.any() else f"{int((~known).sum())} of {len(opt)} cells"
    if noise == 0:
      fallback = ("the noise estimate instead, which is 0 (no model's optimal-CFG FID rises as its "
                  "steps grow; a lower bound on the noise): every gap counts")
    elif math.isfinite(noise):
      fallback = (f"the noise estimate instead: a model's optimal-CFG FID rises by up to "
                  f"{noise:.1f} when its steps grow (it should not), so a gap must exceed "
                  f"{noise:.1f} FID")
    else:
      fallback = "no noise estimate either (no model has two step counts): nothing is decisive"
    lines.append(f"Uncertainty: {missing} has a resampling interval (`fid_ci95`), so the verdict "
                 f"uses {fallback} (n={n} samples per cell).")
  floor = analysis_cfg.CFG_FLOOR
  for edge, words in (("top", "the largest scale evaluated"),
                      ("bottom", f"the smallest scale evaluated, above CFG {floor:g}")):
    cells = opt[opt["open_edge"] & (opt["grid_edge"] == edge)]
    if len(cells):
      lines.append(f"CFG grid: {len(cells)} of {len(opt)} optimal-CFG cells have their optimum at "
                   f"{words} ({_per_model(cells)}): their FID is an upper bound, and a win "
                   f"against such a cell is not counted.")
  floored = opt[(opt["grid_edge"] == "bottom") & ~opt["open_edge"]]
  if len(floored):
    lines.append(f"CFG grid: {len(floored)} of {len(opt)} optimal-CFG cells are best at CFG "
                 f"{analysis_cfg.CFG_FLOOR:g} or below (no guidance; {_per_model(floored)}): "
                 f"guidance does not help them, nothing lower is sampled.")
  return outcome, lines


def _per_model(cells: pd.DataFrame) -> str:
  return ", ".join(f"{model} {count}" for model, count in
                   cells.groupby("model", sort=False).size().items())


def size_effect_line(frame, factor: float = 3.0,
                     confirmed: pd.DataFrame | None = None) -> tuple[dict | None, str]:
  """Issue 20's criterion that model size matters measurably: the largest model's best FID at the
  highest sampling budget beats the smallest model's by more than ``factor`` x the combined
  uncertainty (``analysis.size_effect``). With ``confirmed`` (the table of :func:`confirm`: each
  model's best cell again, fresh samples), the comparison reads those cells; CFG-grid-edge flags
  still come from ``frame``'s grid. Returns (its dict or None, a sentence)."""
  use = confirmed if confirmed is not None and len(confirmed) else None
  effect = analysis.size_effect(frame if use is None else use, "fid", factor=factor)
  if effect is None:
    return None, "Size effect: one model only, nothing to compare."
  e = effect
  if use is not None:
    grid_effect = analysis.size_effect(frame, "fid", factor=factor)
    e["at_grid_edge"] = [] if grid_effect is None else [
        m for m in grid_effect["at_grid_edge"] if m in (e["small"], e["big"])]
    e["grid_edges"] = {} if grid_effect is None else grid_effect.get("grid_edges", {})
    e["confirmed_n"] = int(pd.to_numeric(use["n"], errors="coerce").max())
  verdict_word = "met" if e["met"] else "not met"
  where = (f"each model's best grid cell evaluated again with n={e['confirmed_n']} fresh samples "
           f"(seed + 1), largest budget among them {e['budget']:.3g}" if use is not None
           else f"at the highest sampling budget ({e['budget']:.3g})")
  text = (f"Size effect ({factor:g}× criterion; {where}):"
          f" the largest model {e['big']} reaches FID {e['big_value']:.1f} ± {e['big_u']:.1f} "
          f"({e['big_setting']}) and the smallest {e['small']} {e['small_value']:.1f} ± "
          f"{e['small_u']:.1f} ({e['small_setting']}): {e['big']} is "
          f"{'better' if e['advantage'] >= 0 else 'worse'} by {abs(e['advantage']):.1f}, "
          f"{e['ratio']:+.1f}× the combined uncertainty {e['u']:.1f} "
          f"({e['u_source']}) — "
          f"criterion **{verdict_word}**.")
  if e["at_grid_edge"]:
    edges = e.get("grid_edges") or {}
    by_end = {}
    for model in e["at_grid_edge"]:
      by_end.setdefault(edges.get(model, "top"), []).append(model)
    text += " (" + "; ".join(f"{', '.join(models)}: optimum at the {end} of the CFG grid"
                             for end, models in by_end.items()) + ".)"
  return effect, text


def data_description(config) -> str:
  """The data as the config names it (the report states it; nothing hard-coded)."""
  d = config.data
  res = f"{d.resolution} px"
  if d.name == "shapes":
    train, test = (int(x) for x in d.shapes_sizes)
    return f"the embedded captioned-shapes dataset at {res} ({train:,} train / {test:,} held-out)"
  if d.name.startswith("folder:"):
    return f"the image folder `{d.name[len('folder:'):]}` at {res}"
  if d.name.startswith("latents:"):
    return f"precomputed latents `{d.name[len('latents:'):]}` ({res} images)"
  return f"TFDS `{d.name}` at {res} (train split `{d.train_split}`, eval `{d.eval_split}`)"


def _clip_label(config) -> str:
  if config.eval.clip_model:
    return f"CLIP score from `{config.eval.clip_model}`"
  return (f"CLIP score from the locally trained small CLIP (`{grid.OFFLINE_CLIP_LABEL}`), not "
          f"OpenAI-CLIP")


def _floor_line(floor: dict | str | None) -> str:
  if floor is None:
    return "Real-data floor: not computed in this invocation."
  if isinstance(floor, str):
    return f"Real-data floor: {floor}."
  def pm(key):
    value, ci = floor.get(key), floor.get(f"{key}_ci95")
    if value is None or not math.isfinite(float(value)):
      return "–"
    return f"{float(value):.3g}" + (f" ± {float(ci):.2g}" if ci is not None and
                                    math.isfinite(float(ci)) else "")
  source = f" ({floor['source']})" if floor.get("source") else ""
  return (f"Real-data floor: held-out real images vs the FID reference at n={floor.get('n')}"
          f"{source}: FID {pm('fid')}, KID {pm('kid')} — what a perfect model would score at "
          f"this n (FID is biased upward at small n).")


def _saved_floor(directory: str) -> dict | None:
  """The floor :func:`real_floor` wrote to ``<directory>/real_data_floor.json``, if any."""
  path = os.path.join(directory, FLOOR_JSON)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_report(root: str, table_dir: str, runs: list[RunPlan], config, clock: _Clock, *,
                 command: str = "", floor: dict | str | None = None) -> dict:
  """Figures + the analysis summary (``<root>/analysis``) and ``<root>/report.md``. ``floor``:
  :func:`real_floor`'s result (None: read ``<root>/real_data_floor.json`` if present)."""
  frame = results.load(table_dir)
  out_dir = os.path.join(root, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  made = analysis.analyze(frame, out_dir, "fid", source="results")
  outcome, lines = verdict(frame)
  confirm_dir = os.path.join(root, CONFIRM_DIR)
  confirmed = (results.load(confirm_dir)
               if os.path.exists(os.path.join(confirm_dir, "results.csv")) else None)
  effect, effect_text = size_effect_line(frame, confirmed=confirmed)
  if floor is None:
    floor = _saved_floor(root)
  confirm_floor = _saved_floor(confirm_dir)
  env = environment()
  phases: dict[str, float] = {}
  for inv in clock.history:
    for name, sec in inv["phases"].items():
      phases[name] = phases.get(name, 0.0) + sec
  plan_rows = pd.DataFrame([dict(width=r.width, params=f"{r.params / 1e6:.2f}M",
                                 norm_cost=r.norm_cost, steps=r.steps,
                                 train_compute=r.train_compute) for r in runs])
  e, s = config.eval, config.study
  widths = ", ".join(f"w{r.width}" for r in runs)
  steps = sorted({r.steps for r in runs})
  trained = (f"{steps[0]} steps each" if len(steps) == 1
             else f"{steps[0]}–{steps[-1]} steps")
  grid_words = (f"{len(e.samplers)} sampler(s) ({', '.join(e.samplers)}) × steps "
                f"{tuple(int(x) for x in e.steps)} × CFG {tuple(float(x) for x in e.cfg_scales)}"
                + (f" (+ up to {s.extend_cfg} scales past either end where an optimum sits there, "
                   f"never below CFG {analysis_cfg.CFG_FLOOR:g})"
                   if s.extend_cfg else ""))
  figures = [os.path.relpath(p, root) for p in made["figures"]]
  text = [
      "# Scaling study", "",
      f"Command: `{command or 'ldm-scaling study'}`  ", f"{clock.commits()}; "
      f"{env['devices']} ({env['cpus']} cores, {env['machine']}), jax {env['jax']}.  ",
      f"Wall time: {clock.total() / 60:.1f} min over {len(clock.history)} invocation(s) ("
      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items()) + ").", "",
      "## Verdict", "",
      f"Mei et al.'s finding — smaller models give better FID at low sampling cost, larger ones "
      f"at high cost — is **{outcome}** here (computed from the table by the rule in "
      f"`ldm_scaling.study.verdict`: a size wins at a sampling budget only when its FID is lower "
      f"by more than the combined 95 % uncertainty):", "",
      *[f"- {line}" for line in lines], f"- {effect_text}", f"- {_floor_line(floor)}",
      *([f"- {_floor_line(confirm_floor)}"] if confirm_floor else []), "",
      f"Setting: {data_description(config)}; UNets {widths} "
      f"({min(r.params for r in runs) / 1e6:.2f}–{max(r.params for r in runs) / 1e6:.2f}M "
      f"parameters) trained {trained}; eval grid {grid_words}; FID from {e.num_samples} samples "
      f"per cell against {e.fid_reference_n} real held-out images (biased upward below 2048 "
      f"samples: compare cells, not papers); {_clip_label(config)}.", "",
      "## Runs", "",
      f"Protocol `{s.schedule}`: {PROTOCOLS[s.schedule]}. Batch {config.train.batch_size}, lr "
      f"{config.train.lr:g} ({config.train.schedule}), EMA {config.train.ema_decay}. "
      "Normalised cost = forward FLOPs at the sampled setting relative to width 320 of the same "
      "topology; training compute = normalised cost x steps.", "",
      analysis_report.markdown_table(plan_rows), "",
      "## Figures", "", *[f"![{os.path.basename(p)}]({p})" for p in figures], "",
      "The full analysis (optimal CFG, Pareto fronts, crossovers, sampler comparison, training "
      "curves) is in [analysis/summary.md](analysis/summary.md); the table in "
      "[results/results.csv](results/results.csv).", ""]
  path = os.path.join(root, "report.md")
  files.atomic_write_text(path, "\n".join(text))
  return dict(report=path, verdict=outcome, figures=made["figures"],
              results=os.path.join(table_dir, "results.csv"),
              size_effect=None if effect is None else dict(
                  met=effect["met"], ratio=effect["ratio"], advantage=effect["advantage"],
                  u=effect["u"]))


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
