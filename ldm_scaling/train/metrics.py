"""Metric writers (clu: TensorBoard + logging, plus JSON lines in the workdir), throughput, MFU,
and the console progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow


def _jsonable(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def make_writer(workdir: str, is_main: bool):
  """clu ``MultiWriter``: TensorBoard events + logging (+ ``metrics.jsonl``) on the main process,
  nothing but logging elsewhere."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu.metric_writers import interface  # pylint: disable=g-import-not-at-top

  class JsonlWriter(interface.MetricWriter):
    """One JSON object per ``write_scalars`` call: ``{"step": s, "loss": ..., ...}``. Appends to
    a local file; object stores (``gs://``) cannot append, so there the file is rewritten whole
    at each flush (it stays small: one line per ``train.log_every`` steps)."""

    def __init__(self, path: str):
      from etils import epath  # pylint: disable=g-import-not-at-top
      self._path = epath.Path(path)
      self._remote = "://" in path
      self._lines = (self._path.read_text().splitlines(keepends=True)
                     if self._remote and self._path.exists() else [])
      self._file = None if self._remote else open(path, "a", encoding="utf-8")

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


class Throughput:
  """Steps/s, examples/s, per-device TFLOP/s and MFU over the window since the last report."""

  def __init__(self, *, start_step: int, total_steps: int, batch_size: int,
               flops_per_example: float, num_devices: int, peak_tflops: float):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.flops_per_example = flops_per_example
    self.num_devices = num_devices
    self.peak_tflops = peak_tflops
    self._t0 = self._t = time.perf_counter()
    self._step0 = self._step = start_step

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt, dsteps = now - self._t, step - self._step
    self._t, self._step = now, step
    if dsteps <= 0 or dt <= 0:
      return {}
    steps_per_s = dsteps / dt
    out = dict(steps_per_s=steps_per_s, examples_per_s=steps_per_s * self.batch_size)
    if self.flops_per_example > 0:
      tflops = steps_per_s * self.batch_size * self.flops_per_example / self.num_devices / 1e12
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
  for key, fmt in (("loss", "loss {:.4f}"), ("grad_norm", "|g| {:.3f}"), ("lr", "lr {:.2e}"),
                   ("examples_per_s", "{:.1f} ex/s"), ("mfu", "MFU {:.1%}")):
    if key in scalars:
      parts.append(fmt.format(float(scalars[key])))
  parts.append(f"ETA {format_duration(eta)}")
  return " | ".join(parts)


def console(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
