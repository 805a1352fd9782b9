"""E1's per-seed rows: seed 2 of teacher/swd/full from the results table; seeds 0 and 1 from the
eval job's own per-cell log lines (the table kept one row per cell, so later seeds replaced them).

Run once, in the session that made E1, on that session's logs under /tmp/e1 (their cell lines are
in eval_cells.log next to this file) and tables under runs/e1:
    python docs/swd/e1/assemble.py docs/swd/e1/fid_by_seed.csv
"""
import re, sys, glob
import pandas as pd
CELL = re.compile(r"^\[\d+/\d+\] (\S+) step (\d+) (\S+) (\d+) steps cfg ([\d.]+): FID ([\d.]+) ± ([\d.]+), "
                  r"KID ([\d.]+), clip_score\[local-clip-small\] ([\d.]+), cost")
STAMP = re.compile(r"^\[e1 [\d:]+\] eval (\S+) seed (\d)")
logged = []
for log in ("/tmp/e1/run.log", "/tmp/e1/par.log", "/tmp/e1/watch2.log"):
  seed = None
  for line in open(log, errors="replace"):
    m = STAMP.match(line)
    if m:
      seed = int(m.group(2)); continue
    m = CELL.match(line)
    if m and seed is not None:
      run, step, sampler, steps, cfg, fid, ci, kid, clip = m.groups()
      logged.append(dict(run=run, sampler=sampler, steps=int(steps), cfg_scale=float(cfg), seed=seed,
                         fid=float(fid), fid_ci95=float(ci), kid=float(kid), clip=float(clip)))
logged = pd.DataFrame(logged).drop_duplicates(["run", "sampler", "steps", "cfg_scale", "seed"], keep="last")
table = pd.read_csv("/work/main/runs/e1/results/results.csv")
table["name"] = table["run"].str.rstrip("/").str.split("/").str[-1]
clipcol = "clip_score[local-clip-small]"
rows = []
for _, t in table.iterrows():
  for _, l in logged[(logged.run == t["name"]) & (logged.sampler == t.sampler) & (logged.steps == t.steps)
                     & (logged.cfg_scale == t.cfg_scale)].iterrows():
    if l.seed == t.seed:  # the table's row: the log agrees with it (to the log's 2 decimals)
      assert abs(l.fid - t.fid) < 0.006 and abs(l[ "clip"] - t[clipcol]) < 0.006, (l, t)
      rows.append(t.drop(labels=["name"]).to_dict()); continue
    r = t.drop(labels=["name"]).to_dict()
    r.update(seed=int(l.seed), fid=l.fid, fid_ci95=l.fid_ci95, kid=l.kid, **{clipcol: l["clip"]})
    for k in ("kid_ci95", "clip_score_01[local-clip-small]", "clip_score_ci95[local-clip-small]",
              "eval_key", "eval_settings", "wall_s", "time"):
      r[k] = float("nan") if k not in ("eval_key", "eval_settings") else "from the eval log"
    rows.append(r)
lcm = pd.concat([pd.read_csv(p) for p in sorted(glob.glob("/work/main/runs/e1/lcm_seed*/results.csv"))] or [pd.DataFrame()])
out = pd.concat([pd.DataFrame(rows), lcm], ignore_index=True)
out = out.sort_values(["objective", "run", "sampler", "steps", "cfg_scale", "seed"])
out.to_csv(sys.argv[1], index=False)
print(out[["run", "sampler", "steps", "cfg_scale", "seed", "fid"]].to_string())
