"""Image folders for evaluation: listing, decoding to uint8 RGB, batching (pytorch-fid's reader).

As pytorch-fid: files with an image extension directly inside the folder, sorted by name, opened
with PIL and converted to RGB. A file PIL cannot decode is an error that names it; nothing is
skipped silently.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ldm_scaling.errors import UserError

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


class ImageError(UserError, ValueError):
  """An unreadable image or an unusable image folder."""


def list_images(folder: str) -> list[str]:
  """Image files directly in ``folder`` (by extension, case-insensitive), sorted."""
  if not os.path.isdir(folder):
    raise ImageError(f"{folder!r} is not a folder of images")
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
                 and os.path.isfile(os.path.join(folder, f)))
  if not files:
    raise ImageError(f"no images in {folder!r} (looked for *.{{{','.join(IMAGE_EXTENSIONS)}}}); "
                     f"write samples there first, or pass a .npz of statistics")
  return files


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB; names the file when PIL cannot decode it."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for corrupt/truncated files
    raise ImageError(f"cannot read image {path!r}: {e}. Remove or regenerate it.") from None


def iter_batches(files: Sequence[str], batch_size: int) -> Iterator[np.ndarray]:
  """(B, H, W, 3) uint8 batches in file order; a batch is cut early where the image size
  changes, so folders of mixed sizes work (one compile per size)."""
  batch: list[np.ndarray] = []
  for path in files:
    image = read_image(path)
    if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
      yield np.stack(batch)
      batch = []
    batch.append(image)
  if batch:
    yield np.stack(batch)


def iter_array_batches(images: np.ndarray | Iterable[np.ndarray],
                       batch_size: int) -> Iterator[np.ndarray]:
  """An (N, H, W, 3) array, or an iterable of such arrays, re-cut into batches <= batch_size."""
  if isinstance(images, np.ndarray) or hasattr(images, "shape"):
    images = [np.asarray(images)]
  for chunk in images:
    chunk = np.asarray(chunk)
    if chunk.ndim != 4 or chunk.shape[-1] != 3:
      raise ImageError(f"image batches must be (N, H, W, 3) RGB, got shape {chunk.shape}")
    for i in range(0, len(chunk), batch_size):
      yield chunk[i:i + batch_size]
