"""The offline components of a test session: their config, and (run as a script) the VAE's
training, which ``conftest.Offline`` runs in a second process beside the CLIP's -- on 2 cores the
two trainings together take less wall time than one after the other.

  python tests/offline_setup.py ROOT      # trains (or finds) ROOT/vae; prints its log lines
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
from ldm_scaling import experiment  # pylint: disable=g-import-not-at-top


def offline_config(root: str):
  """The embedded data and the offline CLIP and VAE recipes, with fewer steps, under ``root``."""
  from ldm_scaling.models import offline  # pylint: disable=g-import-not-at-top
  config = offline.apply(cfglib.base_config())
  config.data.update(data_dir=os.path.join(root, "tfds"), shapes_sizes=(2000, 256), threads=2)
  # Steps measured against the quality tests' thresholds (test_text_clip.py, test_vae.py) on the
  # 256 test images; the two trainings take about the same time. CLIP, held-out retrieval hits of
  # 256 (chance x 3: top-1 3.3, top-5 16.5): 60 steps 5 / 18, 100: 5 / 23, 125: 6 / 32,
  # 150: 9 / 50. VAE PSNR vs the mean-colour baseline + 1 dB (20.79 dB): 100 steps 20.37 (fails),
  # 200: 21.55, 300: 21.84 (untrained 9.15, latent std 0.99 and cache error 0.04 at any of them).
  config.clip.update(steps=150, batch_size=64, lr=1e-3, dir=os.path.join(root, "clip"))
  config.vae.update(steps=200, batch_size=32, lr=2e-3, dir=os.path.join(root, "vae"))
  experiment.validate(config)
  return config


def main(root: str) -> None:
  from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top
  from ldm_scaling.components import vae  # pylint: disable=g-import-not-at-top
  runtime.configure_jax()
  vae.ensure(offline_config(root), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  main(sys.argv[1])
