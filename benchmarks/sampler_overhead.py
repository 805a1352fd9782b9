"""Sampler overhead: an N-step sampler program vs N jitted UNet forwards, measured side by side.

  .venv/bin/python benchmarks/sampler_overhead.py                 # width 32, N=50, all samplers
  .venv/bin/python benchmarks/sampler_overhead.py --width 64 --latent 32 --batch 4

ratio = time(one compiled N-step trajectory) / time(N calls of the jitted UNet forward on the same
batch); 1.0 means the trajectory costs exactly its network evaluations. Guided sampling is
compared with forwards of the 2B batch it runs. Also reported: the ratio to a bare compiled loop
of N forwards (the trajectory minus the sampler's arithmetic), and CPU-time ratios. Each round
times all programs back to back in random order, and a reported ratio is the median over rounds
of these paired ratios, so that load from other processes on a shared machine hits both sides
alike ("ratio" is wall clock). Target: ratio <= 1.05 at N = 50.
The last line is one JSON object.
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
from ldm_scaling.diffusion import generate, sampling

TARGET = 1.05


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of ``fn()`` run to completion."""
  w, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--latent", type=int, default=16, help="latent side")
  p.add_argument("--text-len", type=int, default=77)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--samplers", default="ddim,ddpm,dpm++,euler,ddim+cfg")
  args = p.parse_args(argv)
  runtime.configure_jax()
  random.seed(0)

  config = cfglib.base_config()
  config.model.update(width=args.width, head_dim=16, num_heads=0, cross_attn_dim=64)
  apply_fn, params = generate.random_init(config, seed=0)
  rng = np.random.RandomState(0)
  b, n = args.batch, args.steps
  noise = jnp.asarray(rng.randn(b, args.latent, args.latent, 4).astype(np.float32))
  ctx = jnp.asarray(rng.randn(b, args.text_len, 64).astype(np.float32))
  uncond = jnp.zeros((1, args.text_len, 64), jnp.float32)

  forward = jax.jit(apply_fn)
  t_b = jnp.full((b,), 500.0)
  x2, t2, c2 = (jnp.concatenate([a, a]) for a in (noise, t_b, ctx))
  jax.block_until_ready(forward(params, noise, t_b, ctx))
  jax.block_until_ready(forward(params, x2, t2, c2))
  print(f"UNet width {args.width}, batch {b}, {args.latent}x{args.latent}x4 latent, "
        f"{args.text_len} tokens, {n} steps, median of {args.rounds} paired rounds; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)

  vp = diffusion.Schedule()
  flow = diffusion.Schedule(name="rectified_flow", flow_shift=3.0)
  ratios, ratios_cpu, ratios_scan, forward_ms = {}, {}, {}, {}

  def bare_scan(steps):
    """N forwards in one compiled loop, each fed the previous output at its own timestep: the
    trajectory program minus the sampler's own arithmetic."""
    def fn(params, x, t, c):
      ts = jnp.linspace(999.0, 0.0, steps)
      body = lambda y, ti: (apply_fn(params, y, jnp.full_like(t, ti), c), None)
      return jax.lax.scan(body, x, ts)[0]
    return jax.jit(fn)
  for name in args.samplers.split(","):
    guided = name.endswith("+cfg")
    sampler = name[:-len("+cfg")] if guided else name
    schedule = flow if sampler == "euler" else vp
    prediction = "flow" if sampler == "euler" else "eps"
    scale = np.full((b,), 7.5, np.float32) if guided else None
    exe, call_args, _, _ = sampling.prepare(
        apply_fn, params, noise, ctx, key=jax.random.key(0), schedule=schedule,
        prediction=prediction, sampler=sampler, steps=n,
        uncond_context=uncond if guided else None, cfg_scale=scale)
    jax.block_until_ready(exe(*call_args))
    fwd_args = (params, x2, t2, c2) if guided else (params, noise, t_b, ctx)
    scan_n = bare_scan(n)

    def forwards(fwd_args=fwd_args):
      for _ in range(n):
        y = forward(*fwd_args)
      return y

    progs = {"forwards": forwards,
             "scan": lambda fwd_args=fwd_args, scan_n=scan_n: scan_n(*fwd_args),
             "trajectory": lambda exe=exe, call_args=call_args: exe(*call_args)}
    jax.block_until_ready(progs["scan"]())
    wall, cpu, wall_scan = [], [], []
    for _ in range(args.rounds):
      t = {k: _timed(progs[k]) for k in random.sample(sorted(progs), len(progs))}
      wall.append(t["trajectory"][0] / t["forwards"][0])
      cpu.append(t["trajectory"][1] / t["forwards"][1])
      wall_scan.append(t["trajectory"][0] / t["scan"][0])
      forward_ms.setdefault(name, []).append(1e3 * t["forwards"][0] / n)
    ratios[name] = round(float(np.median(wall)), 4)
    ratios_cpu[name] = round(float(np.median(cpu)), 4)
    ratios_scan[name] = round(float(np.median(wall_scan)), 4)
    forward_ms[name] = round(float(np.median(forward_ms[name])), 3)
    print(f"{name:>9}: ratio {ratios[name]:.3f} (wall; CPU time {ratios_cpu[name]:.3f}); vs a "
          f"bare scan of {n} forwards {ratios_scan[name]:.3f}; one forward "
          f"{forward_ms[name]:.1f} ms; paired wall ratios "
          f"{', '.join(f'{r:.3f}' for r in wall)}", file=sys.stderr)
  main_name = "ddim" if "ddim" in ratios else next(iter(ratios))
  result = dict(benchmark="sampler_overhead", sampler=main_name, steps=n,
                ratio=ratios[main_name], target=TARGET, ratios=ratios, ratios_cpu=ratios_cpu,
                ratios_vs_bare_scan=ratios_scan,
                forward_ms=forward_ms, width=args.width, batch=b, latent=args.latent,
                load_avg=round(os.getloadavg()[0], 2), cpus=os.cpu_count())
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
