"""Hand-made results tables for the study and analysis tests (one sampler, ddim)."""

import pandas as pd

from ldm_scaling.eval import results


def frame(cells, *, ci=None, n=64, checkpoint=100) -> pd.DataFrame:
  """{(width, steps, cfg): fid} -> a results frame: run ``/runs/w<width>``, norm cost
  width / 100, params width * 1000. ``ci``: every cell's fid_ci95 (None: no such column, as in
  tables written before uncertainties)."""
  rows = []
  for (width, steps, cfg), value in cells.items():
    row = {c: None for c in results.COLUMNS}
    row.update(run=f"/runs/w{width}", checkpoint_step=checkpoint, objective="denoising",
               sampler="ddim", steps=steps, cfg_scale=cfg, scale_schedule="", width=width,
               params=width * 1000, norm_cost=width / 100, sampling_cost=width / 100 * steps,
               fid=value, n=n)
    if ci is not None:
      row["fid_ci95"] = ci
    rows.append(row)
  return pd.DataFrame(rows)
