"""Metric writers (clu: TensorBoard + logging, plus JSON lines in the workdir), throughput, MFU,
and the console progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

from etils import epath
import numpy as np

from ldm_scaling import files

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow


def _jsonable(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def make_writer(workdir: str, is_main: bool):
  """clu ``MultiWriter``: TensorBoard events + logging (+ ``metrics.jsonl``) on the main process,
  nothing but logging elsewhere."""
  # clu's writers import TensorFlow (~6 s; once per process): only a training run pays for it.
  # Not imported in a background thread: concurrent with transformers' own TensorFlow probe that
  # deadlocked (seen on a fresh install).
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu.metric_writers import interface  # pylint: disable=g-import-not-at-top

  class JsonlWriter(interface.MetricWriter):
    """One JSON object per ``write_scalars`` call: ``{"step": s, "loss": ..., ...}``. Appends to
    a local file; object stores (``gs://``) cannot append, so there the file is rewritten whole
    at each flush (it stays small: one line per ``train.log_every`` steps)."""

    def __init__(self, path: str):
      self._path = epath.Path(path)
      self._remote = "://" in path
      self._lines = (self._path.read_text().splitlines(keepends=True)
                     if self._remote and self._path.exists() else [])
      # Line-buffered: a killed run keeps every line it logged.
      self._file = None if self._remote else open(path, "a", encoding="utf-8", buffering=1)

    def _write(self, line: str):
      if self._remote:  # rewritten whole: an object cannot be appended to, and a hard kill
        self._lines.append(line)  # must not lose what was logged
        self._path.write_text("".join(self._lines))
      else:
        self._file.write(line)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      row = {"step": int(step), "time": time.time()}
      row.update({k: _jsonable(v) for k, v in scalars.items()})
      self._write(json.dumps(row) + "\n")

    def write_summaries(self, step, values, metadata=None):
      self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

    def write_images(self, step, images):
      pass  # images go to TensorBoard and to <workdir>/samples as PNG

    def write_videos(self, step, videos):
      pass

    def write_audios(self, step, audios, *, sample_rate):
      pass

    def write_texts(self, step, texts):
      pass

    def write_histograms(self, step, arrays, num_buckets=None):
      pass

    def write_hparams(self, hparams):
      self._write(json.dumps({"hparams": {k: _jsonable(v) if isinstance(v, (int, float))
                                          else str(v) for k, v in hparams.items()}}) + "\n")

    def flush(self):
      if self._file is not None:
        self._file.flush()

    def close(self):
      if self._file is not None:
        self._file.close()

  default = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                 asynchronous=False)
  if not is_main:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir,
                                                                       "metrics.jsonl"))])


def _parse(lines: list[str]) -> list[dict[str, Any] | None]:
  """Each line's JSON object, None for a line that is not one (a killed run's torn last line)."""
  out = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    out.append(row if isinstance(row, dict) else None)
  return out


def history(workdir: str) -> list[dict[str, float]]:
  """A run's logged training metrics (``metrics.jsonl``), one row per log interval."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  rows = [r for r in _parse(path.read_text(encoding="utf-8").splitlines()) if r]
  return [{k: v for k, v in r.items() if k != "time"} for r in rows if "loss" in r]


def drop_rows_after(workdir: str, step: int) -> int:
  """Removes the ``metrics.jsonl`` rows of steps after ``step`` (and torn lines), returning how
  many: a run killed after its last checkpoint logged steps that the resumed run trains and logs
  again, and the history must hold each step once."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return 0
  lines = path.read_text(encoding="utf-8").splitlines()
  keep = [line for line, row in zip(lines, _parse(lines))
          if row is not None and not (isinstance(row.get("step"), int) and row["step"] > step)]
  if len(keep) != len(lines):
    files.atomic_write_text(path, "".join(line + "\n" for line in keep))
  return len(lines) - len(keep)


class Throughput:
  """Steps/s, examples/s, per-device TFLOP/s and MFU over the window since the last report.

  :meth:`add` counts one step of a phase with its FLOPs per example (phases may differ)."""

  def __init__(self, *, start_step: int, total_steps: int, batch_size: int, num_devices: int,
               peak_tflops: float):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.num_devices = num_devices
    self.peak_tflops = peak_tflops
    self._t0 = self._t = time.perf_counter()
    self._step0 = self._step = start_step
    self._flops = 0.0

  def add(self, flops_per_example: float) -> None:
    self._flops += flops_per_example * self.batch_size

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt, dsteps, flops = now - self._t, step - self._step, self._flops
    self._t, self._step, self._flops = now, step, 0.0
    if dsteps <= 0 or dt <= 0:
      return {}
    steps_per_s = dsteps / dt
    out = dict(steps_per_s=steps_per_s, examples_per_s=steps_per_s * self.batch_size)
    if flops > 0:
      tflops = flops / dt / self.num_devices / 1e12
      out["tflops_per_device"] = tflops
      if self.peak_tflops > 0:
        out["mfu"] = tflops / self.peak_tflops
    return out

  def eta_seconds(self, step: int) -> float:
    elapsed = time.perf_counter() - self._t0
    done = step - self._step0
    return (self.total_steps - step) * elapsed / done if done > 0 else float("nan")


def format_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, scalars: Mapping[str, float], eta: float) -> str:
  pct = 100.0 * step / max(total, 1)
  bar = "#" * int(pct // 5)
  parts = [f"[{bar:<20}] step {step}/{total} ({pct:.0f}%)"]
  shown = [(k, f"{k} {{:.4f}}") for k in scalars if k.endswith("/loss")]  # one per phase
  for key, fmt in (("loss", "loss {:.4f}"), *shown, ("grad_norm", "|g| {:.3f}"),
                   ("lr", "lr {:.2e}"), ("examples_per_s", "{:.1f} ex/s"), ("mfu", "MFU {:.1%}")):
    if key in scalars:
      parts.append(fmt.format(float(scalars[key])))
  parts.append(f"ETA {format_duration(eta)}")
  return " | ".join(parts)


def console(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
