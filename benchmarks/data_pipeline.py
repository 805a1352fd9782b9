"""Input pipeline throughput: examples/s of the grain pipeline at 64 px, next to a bare loop.

  .venv/bin/python benchmarks/data_pipeline.py                      # 64 px, batch 64, 2 cores
  .venv/bin/python benchmarks/data_pipeline.py --resolution 32 --workers 2

Measured side by side in one run: (a) a bare single-threaded Python loop that reads records from
the array_record data source (decode), preprocesses and tokenizes them — the work with no
pipeline around it; (b) ``data.make_pipeline`` with ``data.threads`` read threads; (c) the same
with ``--workers`` grain worker processes. Rounds alternate the variants so that load from other
processes hits each alike; the median per variant is reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from ldm_scaling import config as cfglib
from ldm_scaling import data, runtime
from ldm_scaling.data import pipeline, preprocess
from ldm_scaling.models import offline, text


def _bare(config, n: int) -> float:
  src = data.source(config, config.data.train_split)
  tok = text.Tokenize(text.load_tokenizer(config.text), config.text.max_length)
  opts = pipeline.options(config, train=True)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i in range(n):
    image, caption = src.to_example(src.records[i % len(src.records)], rng)
    image, caption = preprocess.process(image, caption, opts, rng)
    tok([caption])
  return n / (time.perf_counter() - start)


def _grain(config, n: int, batch: int, workers: int, seed: int) -> float:
  it = data.make_pipeline(config, "train", batch_size=batch, seed=seed, process_index=0,
                          process_count=1, workers=workers)
  next(it)  # start-up (threads, worker processes) is not throughput
  start = time.perf_counter()
  steps = max(1, n // batch)
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--examples", type=int, default=3000, help="per measurement")
  parser.add_argument("--threads", type=int, default=4)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  runtime.configure_jax()
  config = offline.apply(cfglib.base_config(), resolution=args.resolution)
  config.data.update(threads=args.threads, flip="caption_aware", caption_dropout=0.1)
  data.prepare(config)
  results = {"bare_loop": [], "grain_threads": [], "grain_workers": []}
  for r in range(args.rounds):
    results["bare_loop"].append(_bare(config, args.examples // 2))
    results["grain_threads"].append(_grain(config, args.examples, args.batch, 0, r))
    if args.workers:
      results["grain_workers"].append(_grain(config, args.examples, args.batch, args.workers, r))
  med = {k: statistics.median(v) for k, v in results.items() if v}
  for k, v in med.items():
    print(f"{k:>14}: {v:8.0f} examples/s  (rounds: {', '.join(f'{x:.0f}' for x in results[k])})")
  print(json.dumps(dict(
      benchmark="data_pipeline", resolution=args.resolution, batch=args.batch,
      cores=os.cpu_count(), threads=args.threads, workers=args.workers,
      examples_per_s={k: round(v) for k, v in med.items()},
      speedup_vs_bare_loop=round(max(med.values()) / med["bare_loop"], 2))))


if __name__ == "__main__":
  main()
