"""Per-example preprocessing: resize, crop, flip, caption dropout; numpy + PIL, no TensorFlow.

All randomness comes from the ``numpy.random.Generator`` grain hands to a ``random_map`` (seeded
by the pipeline seed and the example's position in the stream), so it is reproducible and resumes
exactly.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

CROPS = ("center", "random")
FLIPS = ("none", "random", "caption_aware")

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT",
         "RIGHT": "LEFT"}


@dataclasses.dataclass(frozen=True)
class Options:
  """What the pipeline does to each example (from the ``data`` config section)."""
  resolution: int
  crop: str = "center"
  flip: str = "none"
  caption_dropout: float = 0.0


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 from grayscale (H, W) / (H, W, 1) or RGBA (H, W, 4) arrays."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    return image[..., :3]
  if image.shape[-1] != 3:
    raise ValueError(f"expected 1, 3 or 4 channels, got image of shape {image.shape}")
  return image


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
  """Scales so the shorter side is ``size``: area (box) filter down, bicubic up."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new = (max(size, round(w * scale)), max(size, round(h * scale)))
  method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
  return np.asarray(Image.fromarray(image).resize(new, method))


def crop(image: np.ndarray, size: int, mode: str, rng: np.random.Generator | None) -> np.ndarray:
  h, w = image.shape[:2]
  if mode == "random":
    top = int(rng.integers(h - size + 1))
    left = int(rng.integers(w - size + 1))
  else:
    top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def swap_left_right(caption: str) -> str:
  """``"a dog at the left"`` -> ``"a dog at the right"`` (whole words, case kept)."""
  return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], caption)


def process(image: np.ndarray, caption: str, options: Options,
            rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """One example -> ((r, r, 3) float32 in [-1, 1], caption)."""
  image = to_rgb(image)
  image = resize_short_side(image, options.resolution)
  image = crop(image, options.resolution, options.crop, rng)
  if options.flip != "none" and rng.random() < 0.5:
    image = image[:, ::-1]
    if options.flip == "caption_aware":
      caption = swap_left_right(caption)
  if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
    caption = ""
  return image.astype(np.float32) / 127.5 - 1.0, caption
