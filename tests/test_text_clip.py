"""The small offline CLIP: trained briefly on the embedded dataset, it must retrieve held-out captions
far above chance, save as a loadable transformers checkpoint and serve as the text encoder."""

import json
import os

import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling.components import clip as clip_component
from ldm_scaling.models import clip, offline, text


@pytest.fixture
def trained(offline_components):
  """The session's CLIP, trained for 150 steps on the embedded dataset."""
  o = offline_components
  return o.config, o.clip_dir, o.clip_logs


def test_retrieval_far_above_chance(trained):
  config, directory, _ = trained
  with open(os.path.join(directory, clip.META)) as f:
    meta = json.load(f)
  m = meta["retrieval"]
  assert m["n"] == 256
  # Chance is computed from the captions themselves (repeated captions count as hits).
  assert m["top1"] > 3 * m["chance_top1"], m
  assert m["top5"] > 3 * m["chance_top5"], m
  assert "stand-in" in meta["note"]
  again = clip_component.retrieval(config, directory, n=256, log=lambda *_: None)
  assert again == pytest.approx(m)


def test_saved_as_a_plain_transformers_checkpoint(trained):
  from transformers import CLIPProcessor, FlaxCLIPModel
  config, directory, _ = trained
  model = FlaxCLIPModel.from_pretrained(directory)
  processor = CLIPProcessor.from_pretrained(directory)
  img = np.zeros((32, 32, 3), np.uint8)
  inputs = processor(text=["two small red circles on a black background"], images=[img],
                     return_tensors="np", padding="max_length", max_length=32)
  np.testing.assert_allclose(inputs["pixel_values"], np.full((1, 3, 32, 32), -1.0), atol=1e-6)
  out = model(**inputs)
  assert out.logits_per_image.shape == (1, 1)
  # Same as our own preprocessing of a [-1, 1] image.
  feats = model.get_image_features(pixel_values=clip.pixel_values(np.full((1, 32, 32, 3), -1.0)))
  np.testing.assert_allclose(model.get_image_features(pixel_values=inputs["pixel_values"]), feats,
                             atol=1e-5)


def test_text_tower_conditions_the_unet(trained):
  config, directory, logs = trained
  enc = text.load_text_encoder(config)
  assert enc.hidden_size == config.model.cross_attn_dim == 128
  emb = enc.embed_text(["a large red circle at the left on a black background",
                        "a large red circle at the right on a black background"])
  assert emb.shape == (2, config.text.max_length, 128)
  assert not np.allclose(emb[0], emb[1])  # the position word changes the conditioning
  assert any("train-clip: done" in line for line in logs)
  again = []
  assert clip_component.ensure(config, log=again.append) == directory and not again  # not retrained
  other = offline.apply(cfglib.base_config())
  other.clip.update(dir=directory, layers=3)
  with pytest.raises(cfglib.ConfigError, match="layers: 2 vs 3"):
    clip_component.ensure(other)
