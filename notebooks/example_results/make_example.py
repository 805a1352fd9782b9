"""Writes ``results.csv`` next to this file: a SYNTHETIC results table for the notebook and docs.

No model was trained or sampled to make it. Every number comes from the small parametric model
below, shaped after the findings of Mei et al. (2024) so the analyses have something paper-like to
show; it is not a measurement and must not be cited as one. Real tables come from
``ldm-scaling eval`` and have the same columns.

The model, per (width w, checkpoint t, sampler s, steps k, CFG scale g):

    FID  = F(w) + A_s / k**p_s + 6 * ln(g / g*(w, k))**2 + D(w) * ((T / t)**0.6 - 1) + noise
    F(w) = 19.5 + 4 * (64 / w)**0.8             quality limit: bigger is better
    A_ddim, p_ddim = 70, 1.3; A_dpm++, p_dpm++ = 35, 1.6   few steps hurt, DPM-Solver++ less
    g*   = (2 + 0.9 * ln(k / 4)) * (320 / w)**0.1    optimal CFG grows with steps, a bit for small w
    D(w) = 4 * (64 / w)**0.3, T = 200000        undertrained checkpoints are worse
    CLIP = 22 + ln(w / 64) + 4 * (1 - exp(-(g - 1) / 2)) - 0.08 * max(g - 6, 0)**2 - 6 / k + noise

noise: uniform in +-0.12 (FID) / +-0.05 (CLIP) from a hash of the cell, so the file is the same on
every machine. Widths, parameter counts and normalised costs are Mei et al.'s Table 1; sampling
cost = normalised cost x steps (the paper's convention). The grid: the last checkpoint (200K) with
DDIM at 4-50 steps and DPM-Solver++ at 4-20 steps (the paper stops DPM++ at 20), CFG 1.5-8;
earlier checkpoints with DDIM 50 steps only (for the training-compute figure).

Run: ``python notebooks/example_results/make_example.py`` (needs only the standard library).
"""

import csv
import hashlib
import math
import os

# Mei et al. Table 1: width -> (parameters, normalised cost).
WIDTHS = {64: (39e6, 0.07), 96: (83e6, 0.13), 128: (145e6, 0.20), 192: (318e6, 0.40),
          256: (558e6, 0.67), 320: (866e6, 1.00)}
STEPS = {"ddim": (4, 8, 12, 20, 30, 50), "dpm++": (4, 8, 12, 20)}
CFG_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
FINAL, EARLY = 200_000, (25_000, 50_000, 100_000)
STEP_PENALTY = {"ddim": (70.0, 1.3), "dpm++": (35.0, 1.6)}
CLIP = "clip_score[local-clip-small]"
COLUMNS = ("run", "checkpoint_step", "objective", "sampler", "steps", "cfg_scale",
           "scale_schedule", "width", "params", "norm_cost", "sampling_cost", "fid", "n", "seed",
           "prompts", "fid_reference", "config_hash", "wall_s", "time", CLIP,
           "clip_score_01[local-clip-small]", "clip_n[local-clip-small]", "train_compute")


def noise(*key) -> float:
  """Uniform in [-1, 1], a fixed function of the cell (no RNG state, no numpy)."""
  digest = hashlib.sha256(repr(key).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**63 - 1.0


def fid(width, step, sampler, steps, cfg) -> float:
  limit = 19.5 + 4.0 * (64 / width) ** 0.8
  amplitude, power = STEP_PENALTY[sampler]
  best_cfg = (2.0 + 0.9 * math.log(steps / 4)) * (320 / width) ** 0.1
  training = 4.0 * (64 / width) ** 0.3 * ((FINAL / step) ** 0.6 - 1.0)
  value = (limit + amplitude / steps ** power + 6.0 * math.log(cfg / best_cfg) ** 2 + training +
           0.12 * noise("fid", width, step, sampler, steps, cfg))
  return round(value, 3)


def clip(width, step, sampler, steps, cfg) -> float:
  value = (22.0 + math.log(width / 64) + 4.0 * (1 - math.exp(-(cfg - 1) / 2)) -
           0.08 * max(cfg - 6.0, 0.0) ** 2 - 6.0 / steps - 0.5 * ((FINAL / step) ** 0.6 - 1.0) +
           0.05 * noise("clip", width, step, sampler, steps, cfg))
  return round(value, 3)


def rows():
  for width, (params, norm_cost) in WIDTHS.items():
    for step in (*EARLY, FINAL):
      grid = STEPS if step == FINAL else {"ddim": (50,)}
      for sampler, steps_list in grid.items():
        for steps in steps_list:
          for cfg in CFG_SCALES:
            score = clip(width, step, sampler, steps, cfg)
            yield dict(
                run=f"synthetic/w{width:03d}", checkpoint_step=step, objective="denoising",
                sampler=sampler, steps=steps, cfg_scale=cfg, scale_schedule="", width=width,
                params=int(params), norm_cost=norm_cost,
                sampling_cost=round(norm_cost * steps, 6),
                fid=fid(width, step, sampler, steps, cfg), n=0, seed=0,
                prompts="SYNTHETIC (make_example.py, no images)", fid_reference="SYNTHETIC",
                config_hash="synthetic", wall_s=0.0, time=0.0, **{
                    CLIP: score, "clip_score_01[local-clip-small]": round(score / 100, 5),
                    "clip_n[local-clip-small]": 0},
                train_compute=round(norm_cost * step, 6))


def main(path: str | None = None) -> str:
  path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows())
  return path


if __name__ == "__main__":
  print(main())
