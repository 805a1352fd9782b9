"""How much the small CLIP's held-out retrieval depends on its initialisation draw.

The one trainer initialises a run from ``split(key(seed))[0]`` (``trainer.run_keys``); the CLIP
loop it replaced used ``key(seed)``. Their update is the same program (the trainer's phase step
equals the old loop's optax step to float rounding: ``tests/test_text_clip.py``), so the only
difference between the two is which random numbers the initial weights are drawn from. This
trains the cpu_mini CLIP recipe (``contrastive.training_config``: 400 steps x batch 128) with the
trainer's step on the same batches (the data seed is ``clip.seed`` either way) from both keys, for
each ``--seeds``, and measures image -> caption retrieval on ``--n`` held-out examples::

  python benchmarks/clip_seed_spread.py --seeds 0 1 2 3 --keys old trainer

~5 min per run on the 2-core host. Prints one line per run and, last, one JSON object with the
per-key means and standard deviations and the difference of means in units of its standard error.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from ldm_scaling import experiment, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.components import clip as clip_component  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.train import optim, trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.train.objectives import contrastive  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.train.state import TrainState  # pylint: disable=g-import-not-at-top,wrong-import-position

KEYS = {"old": jax.random.key, "trainer": lambda seed: trainer.run_keys(seed)[0]}


def train_and_measure(config, seed: int, key: str, n: int) -> dict:
  config = copy.deepcopy(config)
  config.clip.seed = seed
  c = config.clip
  run = contrastive.training_config(config)
  objective = contrastive.Contrastive(run)
  params = jax.jit(objective.init)(KEYS[key](seed))["clip"]
  networks, (phase,) = objective.networks(), objective.phases()
  txs = {"clip": optim.optimizer(optim.settings(run.train, networks["clip"].optimizer))}
  step = jax.jit(trainer.make_phase_step(phase, None, networks, txs, {}, run), donate_argnums=0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"clip": params}, ema={},
                     opt_state={"clip": txs["clip"].init(params)})
  batches = objective.make_data(run, run.data.train_split, batch_size=c.batch_size, seed=c.seed,
                                process_index=0, process_count=1)
  start, losses = time.time(), []
  for i in range(c.steps):
    b = next(batches)
    state, metrics = step(state, {"tokens": jnp.asarray(b["tokens"][:, :c.train_length]),
                                  "images": jnp.asarray(b["images"])}, {})
    if (i + 1) % (c.steps // 10) == 0:
      losses.append(round(float(metrics["loss"]), 3))
  with tempfile.TemporaryDirectory() as d:
    clip_component.export(c, state.params["clip"], d)
    m = clip_component.retrieval(config, d, n=n, log=lambda _: None)
  return dict(key=key, seed=seed, top1=m["top1"], top5=m["top5"], losses=losses,
              seconds=round(time.time() - start, 1))


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/study/cpu_mini.py")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--keys", nargs="+", choices=sorted(KEYS), default=["old", "trainer"])
  p.add_argument("--n", type=int, default=1000)
  args = p.parse_args(argv)
  runtime.configure_jax()
  config = experiment.load(args.config)
  rows = []
  for seed in args.seeds:
    for key in args.keys:
      rows.append(train_and_measure(config, seed, key, args.n))
      print(json.dumps(rows[-1]), flush=True)
  summary = {}
  for key in args.keys:
    top1 = np.array([r["top1"] for r in rows if r["key"] == key])
    summary[key] = dict(n=len(top1), top1_mean=float(top1.mean()),
                        top1_sd=float(top1.std(ddof=1)) if len(top1) > 1 else None)
  out = dict(benchmark="clip_seed_spread", config=args.config, n_eval=args.n, runs=len(rows),
             by_key=summary)
  if len(args.keys) == 2 and all(s["top1_sd"] is not None for s in summary.values()):
    a, b = (summary[k] for k in args.keys)
    se = float(np.sqrt(a["top1_sd"] ** 2 / a["n"] + b["top1_sd"] ** 2 / b["n"]))
    out["top1_difference"] = a["top1_mean"] - b["top1_mean"]
    out["difference_in_se"] = out["top1_difference"] / se if se else None
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
