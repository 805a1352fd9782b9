"""CLIP score: how well images match their prompts, under a named CLIP.

Convention (Hessel et al. 2021, as torchmetrics and most T2I papers report it)::

    clip_score = mean_i 100 * max(cos(E_image(x_i), E_text(c_i)), 0)

``clip_score_01`` is the same mean on the 0-1 scale (``max(cos, 0)``), the scale of Mei et al.'s
Table 1 (0.305-0.314 with ViT-L/14-class CLIPs). ``clip_score_ci95`` is the half-width of the normal
95 % interval of that mean over the cell's samples, ``1.96 s / sqrt(n)`` with ``s`` the sample
standard deviation of the per-sample scores ``100 max(cos, 0)`` (a mean of n >= 64 bounded scores is
close to normal, so no resampling is needed; the prompts are fixed). Every column carries the CLIP
it was computed with: ``clip_score[openai/clip-vit-large-patch14]`` for a hub model,
``clip_score[local-<dir name>]`` for a local directory such as the small CLIP this project trains
offline. Scores from different CLIPs are not comparable, and a small locally trained CLIP is a
stand-in, not OpenAI-CLIP.

Images are preprocessed by transformers' ``CLIPImageProcessor`` (resize of the shortest side,
bicubic; centre crop; CLIP mean/std) from the model's own ``preprocessor_config.json`` when it has
one, else with the CLIP defaults at the model's ``vision_config.image_size``. The towers run in
float32 matmul precision, batch-parallel over devices (:mod:`ldm_scaling.eval.parallel`).
transformers is imported where it is used (see ``models/text.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_scaling.errors import WeightsError
from ldm_scaling.eval import parallel
from ldm_scaling.models import text


@dataclasses.dataclass(frozen=True)
class CLIPScore:
  label: str                 # which CLIP: a hub name or local-<dir>
  score: float               # mean 100 * max(cos, 0)
  score_01: float            # mean max(cos, 0) (the paper's scale)
  n: int
  cosine: np.ndarray         # per-pair raw cosine similarities (N,)

  @property
  def ci95(self) -> float:
    """Half-width of the normal 95 % interval of :attr:`score` (NaN for fewer than 2 pairs)."""
    per_sample = 100.0 * np.maximum(np.asarray(self.cosine, np.float64), 0.0)
    if per_sample.size < 2:
      return float("nan")
    return float(1.96 * per_sample.std(ddof=1) / np.sqrt(per_sample.size))

  def columns(self) -> dict[str, float | int]:
    """Results-table columns, named after the CLIP that produced them."""
    return {f"clip_score[{self.label}]": self.score,
            f"clip_score_01[{self.label}]": self.score_01,
            f"clip_n[{self.label}]": self.n}

  def uncertainty_columns(self) -> dict[str, float]:
    """``clip_score_ci95[<label>]``: the eval grid's rows carry it next to :meth:`columns`."""
    return {f"clip_score_ci95[{self.label}]": self.ci95}


def score_from_cosine(cosine: np.ndarray, label: str) -> CLIPScore:
  cosine = np.asarray(cosine, np.float64)
  clipped = np.maximum(cosine, 0.0)
  return CLIPScore(label, float(100.0 * clipped.mean()), float(clipped.mean()), int(cosine.size),
                   cosine)


def label_for(name_or_path: str) -> str:
  """Hub names label themselves; a local directory becomes ``local-<dir name>`` (never mistaken
  for the hub model it might have started from)."""
  if os.path.isdir(name_or_path):
    return "local-" + os.path.basename(os.path.normpath(name_or_path))
  return name_or_path


def default_image_processor(model):
  """CLIP's standard preprocessing at the model's input size."""
  from transformers import CLIPImageProcessor  # deferred: see module docstring
  size = int(model.config.vision_config.image_size)
  return CLIPImageProcessor(size={"shortest_edge": size},
                            crop_size={"height": size, "width": size})


class CLIPScorer:
  """Scores (image, prompt) pairs with a ``transformers.FlaxCLIPModel``.

  ``label`` names the CLIP in every output column. ``tokenizer`` (a CLIP tokenizer, or any
  callable with its signature) is needed only to score raw strings; token ids can be passed
  instead. ``params`` overrides ``model.params`` (for models built with ``_do_init=False``).
  """

  def __init__(self, model, *, label: str, params: Any = None, image_processor=None,
               tokenizer: Callable[..., Any] | None = None, batch_size: int = 64,
               devices: int | Sequence[Any] | None = None, mesh=None):
    if not label:
      raise ValueError("CLIPScorer needs a label naming the CLIP (e.g. "
                       "'openai/clip-vit-large-patch14' or 'local-clip-small')")
    self.model = model
    self.label = label
    self.image_processor = image_processor or default_image_processor(model)
    self.tokenizer = tokenizer
    self.max_length = int(model.config.text_config.max_position_embeddings)

    def cosine(params, pixel_values, input_ids, attention_mask):
      with jax.default_matmul_precision("float32"):
        img = model.get_image_features(pixel_values, params=params)
        txt = model.get_text_features(input_ids, attention_mask, params=params)
      img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
      txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
      return jnp.sum(img * txt, axis=-1)

    self._mapper = parallel.BatchMapper(cosine, params if params is not None else model.params,
                                        batch_size, mesh or parallel.data_mesh(devices))

  @classmethod
  def from_pretrained(cls, name_or_path: str, *, label: str | None = None, **kwargs):
    """A hub name (e.g. ``openai/clip-vit-large-patch14``, what TPU users run) or a local
    directory saved with ``save_pretrained`` (the offline default: the project's small CLIP)."""
    from transformers import CLIPImageProcessor, CLIPTokenizer  # deferred: see module docstring
    try:
      model, params = text.load_clip_model(name_or_path)
    except (OSError, ValueError) as e:
      raise WeightsError(f"cannot load a Flax CLIP from {name_or_path!r} ({e}). Give a hub name "
                         f"(needs internet or the HF cache) or a directory written by "
                         f"FlaxCLIPModel.save_pretrained") from None
    kwargs.setdefault("params", params)
    if "image_processor" not in kwargs:
      try:
        kwargs["image_processor"] = CLIPImageProcessor.from_pretrained(name_or_path)
      except (OSError, ValueError):
        kwargs["image_processor"] = default_image_processor(model)
    if "tokenizer" not in kwargs:
      try:
        kwargs["tokenizer"] = CLIPTokenizer.from_pretrained(name_or_path)
      except (OSError, ValueError, TypeError):
        kwargs["tokenizer"] = None  # token ids must then be passed to score()
    return cls(model, label=label or label_for(name_or_path), **kwargs)

  def pixel_values(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, S, S) float32 as CLIPImageProcessor makes them."""
    images = [np.asarray(im) for im in images]
    for im in images:
      if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
        raise ValueError(f"CLIP score takes uint8 RGB images (H, W, 3), got {im.dtype} "
                         f"{im.shape}; quantise samples as they would be saved")
    out = self.image_processor(images=images, return_tensors="np",
                               input_data_format="channels_last")
    return np.asarray(out["pixel_values"], np.float32)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if self.tokenizer is None:
      raise ValueError(f"no tokenizer for {self.label!r}: pass input_ids/attention_mask, or "
                       f"build the scorer with tokenizer=...")
    enc = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length,
                         truncation=True, return_tensors="np")
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])

  def cosine(self, images, texts: Sequence[str] | None = None, *, input_ids=None,
             attention_mask=None) -> np.ndarray:
    """Per-pair cosine similarity of image i and prompt i (N,)."""
    if (texts is None) == (input_ids is None):
      raise ValueError("give either texts or input_ids")
    if texts is not None:
      input_ids, attention_mask = self.tokenize(texts)
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else np.asarray(attention_mask, np.int32))
    n = len(images)
    if len(input_ids) != n:
      raise ValueError(f"{n} images but {len(input_ids)} prompts; CLIP score pairs them 1:1")
    out = []
    for i in range(0, n, self._mapper.batch_size):
      sl = slice(i, i + self._mapper.batch_size)
      out.append(self._mapper(self.pixel_values(images[sl]), input_ids[sl], attention_mask[sl]))
    return np.concatenate(out).astype(np.float64)

  def score(self, images, texts: Sequence[str] | None = None, **kwargs) -> CLIPScore:
    return score_from_cosine(self.cosine(images, texts, **kwargs), self.label)
