"""The embedded captioned dataset: procedurally rendered scenes whose captions state their content.

Every example is a pure function of ``(seed, split, index, resolution)``: a scene is sampled from
``numpy.random.default_rng([seed, split_code, index])`` and rendered with PIL at 4x the target
resolution, then area-downsampled (antialiased edges). The same scene renders at every resolution,
so ``shapes`` at 32 px is the area-downscale of ``shapes`` at 64 px up to rounding.

A scene is one of three kinds (probabilities 0.4 / 0.3 / 0.3):

- ``single``: one object, ``"a large red circle at the top left on a black background"``;
- ``pair``: two different objects in different cells, listed in reading order,
  ``"a small blue square at the left and a large yellow triangle at the bottom right on a gray
  background"``;
- ``count``: 2-4 identical objects in distinct cells, ``"three small green triangles on a white
  background"``.

Objects: 4 shapes x 7 colours x 2 sizes, placed in a 3x3 grid of cells (with jitter) named by
position words (``top left`` ... ``bottom right``, ``center``); 3 background colours. Colours carry
a small per-image jitter so pixel statistics are continuous. Every word of a caption is grounded in
the pixels, so text conditioning matters (colour, shape, size, count and position must all be
followed) and FID of a generator that ignores the text is visibly worse than one that follows it.
Captions mention ``left``/``right`` only as positions, so a horizontal flip with those two words
swapped keeps caption and image consistent (``data.flip="caption_aware"``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 50),
    "green": (50, 170, 70), "blue": (50, 90, 230), "purple": (150, 70, 200),
    "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (125, 125, 125), "white": (245, 245, 245)}
SIZES = {"small": 0.17, "large": 0.29}  # object diameter as a fraction of the image side
CELLS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "at the left", (1, 1): "in the center", (1, 2): "at the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
KINDS = (("single", 0.4), ("pair", 0.3), ("count", 0.3))
NUMBERS = {2: "two", 3: "three", 4: "four"}
SPLIT_CODES = {"train": 0, "test": 1}
SUPERSAMPLE = 4
COLOUR_JITTER = 12
POSITION_JITTER = 0.05  # of the image side


def _object(rng: np.random.Generator, background: str) -> dict[str, Any]:
  colours = [c for c in COLOURS if c != background]
  return dict(shape=SHAPES[rng.integers(len(SHAPES))], colour=colours[rng.integers(len(colours))],
              size=("small", "large")[rng.integers(2)])


def sample_scene(seed: int, split: str, index: int) -> dict[str, Any]:
  """The scene (background, objects with cells and jitter) of one example; deterministic."""
  if split not in SPLIT_CODES:
    raise ValueError(f"shapes has splits {sorted(SPLIT_CODES)}, not {split!r}")
  rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
  kind = KINDS[rng.choice(len(KINDS), p=[p for _, p in KINDS])][0]
  background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  cells = [tuple(c) for c in rng.permutation(np.array(list(CELLS)))]
  if kind == "single":
    objects = [_object(rng, background)]
  elif kind == "pair":
    first = _object(rng, background)
    second = _object(rng, background)
    while (second["shape"], second["colour"]) == (first["shape"], first["colour"]):
      second = _object(rng, background)
    objects = [first, second]
  else:
    n = int(rng.integers(2, 5))
    objects = [_object(rng, background)] * n
  placed = []
  for obj, cell in zip(objects, sorted(cells[:len(objects)])):
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    tint = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    placed.append(dict(obj, cell=cell, jitter=tuple(jitter), tint=tuple(int(t) for t in tint)))
  bg_tint = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
  return dict(kind=kind, background=background, bg_tint=tuple(int(t) for t in bg_tint),
              objects=placed)


def caption(scene: dict[str, Any]) -> str:
  """The caption that states the scene's content."""
  objs = scene["objects"]
  on = f"on a {scene['background']} background"
  describe = lambda o: f"{o['size']} {o['colour']} {o['shape']}"
  if scene["kind"] == "count":
    o = objs[0]
    return f"{NUMBERS[len(objs)]} {describe(o)}s {on}"
  parts = [f"a {describe(o)} {CELLS[o['cell']]}" for o in objs]
  return f"{' and '.join(parts)} {on}"


def _clip(rgb, tint):
  return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(rgb, tint))


def render(scene: dict[str, Any], resolution: int) -> np.ndarray:
  """(resolution, resolution, 3) uint8 image of a scene."""
  side = resolution * SUPERSAMPLE
  image = Image.new("RGB", (side, side), _clip(BACKGROUNDS[scene["background"]], scene["bg_tint"]))
  draw = ImageDraw.Draw(image)
  for o in scene["objects"]:
    row, col = o["cell"]
    cx = (col + 0.5) / 3 + o["jitter"][0]
    cy = (row + 0.5) / 3 + o["jitter"][1]
    r = SIZES[o["size"]] / 2
    fill = _clip(COLOURS[o["colour"]], o["tint"])
    x0, y0, x1, y1 = [v * side for v in (cx - r, cy - r, cx + r, cy + r)]
    if o["shape"] == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o["shape"] == "square":
      s = r / math.sqrt(1.25) * side  # equal-area-ish with the circle, looks balanced
      draw.rectangle((cx * side - s, cy * side - s, cx * side + s, cy * side + s), fill=fill)
    elif o["shape"] == "triangle":
      draw.polygon([(cx * side, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
      draw.polygon([(cx * side, y0), (x1, cy * side), (cx * side, y1), (x0, cy * side)], fill=fill)
  return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def example(seed: int, split: str, index: int, resolution: int) -> dict[str, Any]:
  """``{"image": uint8 (r, r, 3), "caption": str}`` for one index of a split."""
  scene = sample_scene(seed, split, index)
  return dict(image=render(scene, resolution), caption=caption(scene))
