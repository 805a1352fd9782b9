"""``ldm-scaling prepare-data``: builds a config's dataset (or a folder manifest) as array_record.

The library is imported when the handler runs (see ``cli/core.py``)."""

from __future__ import annotations

import json
import sys

from ldm_scaling.cli import common


def cmd_prepare_data(args) -> int:
  from ldm_scaling import config as cfglib
  from ldm_scaling.data import pipeline
  config = common.load_config(args, required=False) or cfglib.base_config()
  if args.data_dir:
    config.data.data_dir = args.data_dir
  if args.bad_examples:
    config.data.bad_examples = args.bad_examples
  summary = pipeline.prepare(config, manifest=args.manifest)
  print(json.dumps(summary, indent=1, default=str))
  report = summary.get("report") or {}
  if report.get("num_skipped"):
    print(f"prepare-data: SKIPPED {report['num_skipped']} bad rows: "
          f"{json.dumps(report['skipped'])} (see report.skipped_examples)", file=sys.stderr)
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser(
      "prepare-data", help="build a dataset (embedded shapes or a folder manifest) as array_record",
      description="Prepares config.data (default: the embedded shapes dataset at data.resolution) "
      "or, with --manifest, users' images + captions listed in a JSONL/CSV manifest, as tfds "
      "array_record shards in data.data_dir. Bad rows of a manifest stop preparation "
      "(--bad-examples error) or are skipped and counted (skip). Public tfds names are only "
      "checked: prepare them with `tfds build NAME --file_format=array_record`.")
  common.add_config_arg(p, required=False)
  p.add_argument("--manifest", help="JSONL/CSV with image, caption[, split] per row "
                 "(paths relative to the manifest)")
  p.add_argument("--data-dir", help="tfds data_dir (default: data.data_dir, else "
                 "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--bad-examples", choices=("error", "skip"),
                 help="what to do with bad manifest rows (default: data.bad_examples)")
  p.set_defaults(func=cmd_prepare_data)
