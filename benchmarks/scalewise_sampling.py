"""Scale-wise sampling: a K-step SwD trajectory vs K full-size steps, time ratio next to FLOP ratio.

  .venv/bin/python benchmarks/scalewise_sampling.py                       # 16x16 latents, 4-8-12-16
  .venv/bin/python benchmarks/scalewise_sampling.py --latent 32 --scales 16,20,24,32 --width 64

time_ratio = time(the compiled ``swd`` trajectory at ``--scales``) / time(the same sampler with
every step at full size, ``R,R,...,R``: the full-scale counterpart, same program shape and
arithmetic); flop_ratio = the cost model's ``sum step_costs`` / K (XLA's FLOPs at each side over
those at full size). Scale-wise sampling pays off as its FLOPs promise when time_ratio <= 1.1 x
flop_ratio (the target). Both programs are timed back to back in random order each round; the
reported ratio is the median of the paired ratios (load on a shared machine hits both alike).
Also printed: ``sum (s/R)^2 / K``, the first-order estimate. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling import config as cfglib
from ldm_scaling import diffusion, runtime
from ldm_scaling.diffusion import generate, sampling, scalewise
from ldm_scaling.diffusion.samplers import Options
from ldm_scaling.models import cost

TARGET = 1.1  # time_ratio <= TARGET x flop_ratio


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--latent", type=int, default=16, help="full latent side R")
  p.add_argument("--scales", default="4,8,12,16", help="latent side of each step")
  p.add_argument("--text-len", type=int, default=77)
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args(argv)
  runtime.configure_jax()
  random.seed(0)
  scales = tuple(int(s) for s in args.scales.split(","))
  k = len(scales)
  sigmas = scalewise.flow_grid_sigmas(28, 3.0, (0, 7, 14, 18, 21, 24)[:k]) if k <= 6 else None
  if sigmas is None:
    raise SystemExit("at most 6 scales")

  config = cfglib.base_config()
  config.model.update(width=args.width, head_dim=16, num_heads=0, cross_attn_dim=64,
                      channel_mult=(1, 2, 2), attn_levels=(True, True, False),
                      layers_per_block=1, norm_groups=16)
  config.cost.update(latent_size=args.latent, text_len=args.text_len)
  scalewise.check(scales, sigmas, latent_size=args.latent, down_factor=4)
  apply_fn, params = generate.random_init(config, seed=0)
  rng = np.random.RandomState(0)
  b = args.batch
  noise = jnp.asarray(rng.randn(b, args.latent, args.latent, 4).astype(np.float32))
  ctx = jnp.asarray(rng.randn(b, args.text_len, 64).astype(np.float32))
  schedule = diffusion.Schedule(name="rectified_flow", flow_shift=3.0)

  progs = {}
  for name, sides in (("scale_wise", scales), ("full_scale", (args.latent,) * k)):
    exe, call_args, _, _ = sampling.prepare(
        apply_fn, params, noise, ctx, key=jax.random.key(0), schedule=schedule,
        prediction="flow", sampler="swd", steps=k,
        options=Options(swd_scales=sides, swd_sigmas=sigmas))
    progs[name] = lambda exe=exe, call_args=call_args: exe(*call_args)
    jax.block_until_ready(progs[name]())  # warm
  ratios, times = [], {n: [] for n in progs}
  for _ in range(args.rounds):
    t = {n: _timed(progs[n]) for n in random.sample(sorted(progs), len(progs))}
    ratios.append(t["scale_wise"] / t["full_scale"])
    for n in t:
      times[n].append(t[n])
  time_ratio = float(np.median(ratios))
  step_costs = cost.step_costs(config.model, config.cost, scales)
  flop_ratio = float(sum(step_costs) / k)
  quad_ratio = scalewise.relative_cost(scales) / k
  print(f"UNet width {args.width}, batch {b}, latent {args.latent}x{args.latent}x4, scales "
        f"{'-'.join(map(str, scales))} vs {args.latent} x {k}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
  print(f"scale-wise {1e3 * np.median(times['scale_wise']):.1f} ms, full-scale "
        f"{1e3 * np.median(times['full_scale']):.1f} ms per trajectory (median of "
        f"{args.rounds}); time ratio {time_ratio:.3f} (paired: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}); FLOP ratio {flop_ratio:.3f} (step costs "
        f"{', '.join(f'{c:.3f}' for c in step_costs)}); sum (s/R)^2 / K {quad_ratio:.3f}; "
        f"time / FLOP ratio {time_ratio / flop_ratio:.3f} (target <= {TARGET})", file=sys.stderr)
  result = dict(benchmark="scalewise_sampling", time_ratio=round(time_ratio, 4),
                flop_ratio=round(flop_ratio, 4), target=TARGET,
                time_over_flop=round(time_ratio / flop_ratio, 4),
                meets_target=bool(time_ratio <= TARGET * flop_ratio),
                quadratic_ratio=round(quad_ratio, 4), scales=list(scales), latent=args.latent,
                width=args.width, batch=b, paired_ratios=[round(r, 4) for r in ratios],
                load_avg=round(os.getloadavg()[0], 2), cpus=os.cpu_count())
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
