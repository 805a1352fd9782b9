"""Quality of trained offline components: FID and PSNR of VAE reconstructions, CLIP retrieval.

Measures directories written by ``ldm-scaling train-vae`` / ``train-clip`` (by any version of the
project: the stored format is the same), so components trained by two versions of the code, or
with several seeds, are compared with one measurement::

  ldm-scaling train-vae  --config configs/study/cpu_mini.py --out /tmp/cq/vae_s0 --config.vae.seed=0
  ldm-scaling train-clip --config configs/study/cpu_mini.py --out /tmp/cq/clip_s0 --config.clip.seed=0
  python benchmarks/components_quality.py --config configs/study/cpu_mini.py \
      --vae /tmp/cq/vae_s0 /tmp/cq/vae_s1 --clip /tmp/cq/clip_s0 /tmp/cq/clip_s1

Reconstruction FID: the first ``--n`` held-out images against their reconstructions
(encode to the posterior mean, decode), pytorch-fid's network. Retrieval: image -> caption top-1
/ top-5 among ``--n`` held-out examples (``components.clip.retrieval``). The last line is one JSON
object.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from ldm_scaling import data, experiment, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.components import clip as clip_component  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.components import vae as vae_component  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.eval import fid  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_scaling.models import vae as vae_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _images(config, n):
  it = data.make_pipeline(config, config.data.eval_split, batch_size=min(250, n), seed=0,
                          process_index=0, process_count=1, num_epochs=1, shuffle=False,
                          tokenizer=None, workers=0, drop_remainder=False)
  out, seen = [], 0
  for batch in it:
    out.append(batch["images"])
    seen += len(batch["images"])
    if seen >= n:
      break
  return np.concatenate(out)[:n]


def _uint8(x):
  return np.round(np.clip((np.asarray(x) + 1) * 127.5, 0, 255)).astype(np.uint8)


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/study/cpu_mini.py")
  p.add_argument("--vae", nargs="*", default=[])
  p.add_argument("--clip", nargs="*", default=[])
  p.add_argument("--n", type=int, default=1000)
  args = p.parse_args(argv)
  runtime.configure_jax()
  config = experiment.load(args.config)
  out = dict(benchmark="components_quality", n=args.n, vae={}, clip={})
  if args.vae:
    real = _images(config, args.n)
    extractor = fid.FeatureExtractor(batch_size=50, log=print)
    ref = fid.compute_stats(extractor(_uint8(real)))
    for d in args.vae:
      vae = vae_lib.load_trained(config, d)
      recon = np.concatenate([np.asarray(vae.decode_latents(vae.encode_images(real[i:i + 250])))
                              for i in range(0, len(real), 250)])
      row = dict(recon_fid=fid.fid_from_stats(fid.compute_stats(extractor(_uint8(recon))), ref),
                 psnr=vae_component.psnr(config, vae, n=args.n)["psnr"],
                 scaling_factor=vae.scaling_factor)
      out["vae"][d] = row
      print(f"VAE {d}: reconstruction FID {row['recon_fid']:.2f}, PSNR {row['psnr']:.2f} dB, "
            f"scaling factor {row['scaling_factor']:.4f}", flush=True)
  for d in args.clip:
    m = clip_component.retrieval(config, d, n=args.n, log=lambda _: None)
    out["clip"][d] = m
    print(f"CLIP {d}: top-1 {m['top1']:.3f}, top-5 {m['top5']:.3f} (chance {m['chance_top1']:.4f}"
          f" / {m['chance_top5']:.4f}, n={m['n']})", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
