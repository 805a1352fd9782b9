"""``ldm-scaling analyze`` and ``advise``: thin wrappers over :mod:`ldm_scaling.analysis`,
imported when a handler runs (see ``cli/core.py``)."""

from __future__ import annotations

import argparse
import json

_RESULTS_HELP = ("results table: a directory written by `ldm-scaling eval`, its results.csv / "
                 "results.jsonl, or any such file (local or gs://)")
_METRIC_HELP = ("fid (lower is better), clip (the table's clip_score[<CLIP>] column, higher is "
                "better) or an exact clip_score[<CLIP>] column name")


def cmd_analyze(args) -> int:
  from ldm_scaling.analysis import report
  from ldm_scaling.eval import results
  frame = results.load(args.results)
  written = report.analyze(frame, args.out, metric=args.metric, source=args.results)
  for path in written["figures"]:
    print(path)
  print(written["summary"])
  return 0


def cmd_advise(args) -> int:
  from ldm_scaling.analysis import budget
  from ldm_scaling.eval import results
  frame = results.load(args.results)
  advice = budget.advise(frame, args.budget, metric=args.metric, sampler=args.sampler)
  print(json.dumps(advice) if args.json else budget.format_advice(advice))
  return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # pylint: disable=protected-access
  p = sub.add_parser("analyze", help="figures + markdown summary of a results table",
                     description="Optimal CFG per (model, sampler, steps), metric vs sampling "
                     "cost at each model's optimal CFG with the Pareto front over sizes, "
                     "crossovers between sizes, sampler comparison and metric vs training "
                     "compute: PNG figures after Mei et al. Figs 3, 8, 9, 11 and summary.md in "
                     "--out. See docs/analysis.md.")
  p.add_argument("--results", required=True, help=_RESULTS_HELP)
  p.add_argument("--out", required=True, help="directory for the figures and summary.md "
                 "(local or gs://)")
  p.add_argument("--metric", default="fid", help=_METRIC_HELP + " (default: fid)")
  p.set_defaults(func=cmd_analyze)

  p = sub.add_parser("advise", help="which model size / sampler / steps / CFG for a cost budget",
                     description="The best evaluated cell (each model's latest checkpoint) "
                     "whose sampling cost (normalised cost x steps; width 320 = 1 per step) is "
                     "at most --budget, and each model's best within it. Exit code 2 when "
                     "nothing fits (the message names the cheapest cost).")
  p.add_argument("--results", required=True, help=_RESULTS_HELP)
  p.add_argument("--budget", required=True, type=float,
                 help="sampling cost budget, e.g. 10 = ten steps of the width-320 model")
  p.add_argument("--metric", default="fid", help=_METRIC_HELP + " (default: fid)")
  p.add_argument("--sampler", help="only consider this sampler (default: any)")
  p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
  p.set_defaults(func=cmd_advise)
