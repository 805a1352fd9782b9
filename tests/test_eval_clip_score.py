"""CLIP score vs transformers' PyTorch CLIPModel on the same locally saved (tiny, random) weights.

The reference is independent of our JAX code path: torch's CLIPModel loads the Flax checkpoint
(``from_flax=True``), embeds the same pixel values and token ids, and the test applies the
convention 100 * max(cos, 0) itself.
"""

import jax
import numpy as np
import pytest

from ldm_scaling import runtime
from ldm_scaling.eval import clip_score

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, BOS, EOS, PAD, CTX = 99, 97, 98, 0, 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  text = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=CTX, bos_token_id=BOS, eos_token_id=EOS,
      pad_token_id=PAD)
  vision = transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4)
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                   projection_dim=16)
  path = tmp_path_factory.mktemp("clips") / "clip-tiny"
  # Initialised by one jitted program (transformers' eager init dispatches op by op: 2x slower).
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  params = runtime.run_once(model.init_weights, jax.random.key(0), model.input_shape,
                            static_argnums=(1,))
  model.save_pretrained(path, params=jax.device_get(params))
  return str(path)


def _torch_clip(path):
  """transformers' PyTorch CLIPModel holding the saved Flax weights, converted by transformers'
  own Flax->PyTorch converter (``from_pretrained(from_flax=True)`` initialises on the meta device
  with torch 2.13 and drops the weights, so the converter is called directly)."""
  import os  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "flax_model.msgpack"), "rb") as f:
    state = serialization.msgpack_restore(f.read())
  model = transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(path))
  return load_flax_weights_in_pytorch_model(model, state).eval()


def _tokens(n, seed):
  """BOS, random words, EOS, then padding: the layout a CLIP tokenizer produces."""
  rng = np.random.default_rng(seed)
  ids = np.full((n, CTX), PAD, np.int64)
  mask = np.zeros((n, CTX), np.int64)
  for i in range(n):
    length = int(rng.integers(1, CTX - 2))
    ids[i, :length + 2] = [BOS, *rng.integers(1, BOS, length), EOS]
    mask[i, :length + 2] = 1
  return ids, mask


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 40, 52, 3), dtype=np.uint8)


def test_clip_score_equals_torch_clipmodel(clip_dir):
  scorer = clip_score.CLIPScorer.from_pretrained(clip_dir, batch_size=4)
  assert scorer.label == "local-clip-tiny"
  images, (ids, mask) = _images(6, 0), _tokens(6, 1)
  ours = scorer.cosine(images, input_ids=ids, attention_mask=mask)

  model = _torch_clip(clip_dir)
  pixels = transformers.CLIPImageProcessor(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
          images=list(images), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=pixels)
  ref = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()  # both L2-normalised
  print(f"\ncos ours vs torch: max diff {np.abs(ours - ref).max():.1e}; cos = {np.round(ref, 3)}")
  np.testing.assert_allclose(ours, ref, atol=1e-5)

  result = scorer.score(images, input_ids=ids, attention_mask=mask)
  expected = 100 * np.mean(np.maximum(ref, 0))
  assert result.score == pytest.approx(expected, abs=1e-3)
  assert result.score_01 == pytest.approx(expected / 100, abs=1e-5)
  assert result.columns() == {"clip_score[local-clip-tiny]": result.score,
                              "clip_score_01[local-clip-tiny]": result.score_01,
                              "clip_n[local-clip-tiny]": 6}


def test_convention_clips_negative_cosines():
  result = clip_score.score_from_cosine(np.array([-0.5, 0.2, 0.4]), "some-clip")
  assert result.score == pytest.approx(20.0)
  assert result.score_01 == pytest.approx(0.2)
  assert "clip_score[some-clip]" in result.columns()


def test_texts_batching_and_bad_input(clip_dir):
  images, (ids, mask) = _images(5, 2), _tokens(5, 3)
  words = {f"w{i}": i for i in range(1, BOS)}

  def tokenizer(texts, padding, max_length, truncation, return_tensors):
    """A stand-in tokenizer with CLIPTokenizer's call signature and output layout."""
    assert padding == "max_length" and max_length == CTX and truncation
    out_ids = np.full((len(texts), max_length), PAD, np.int64)
    out_mask = np.zeros_like(out_ids)
    for i, text in enumerate(texts):
      toks = [BOS, *[words[w] for w in text.split()], EOS]
      out_ids[i, :len(toks)], out_mask[i, :len(toks)] = toks, 1
    return {"input_ids": out_ids, "attention_mask": out_mask}

  texts = [" ".join(f"w{t}" for t in row[1:m.sum() - 1]) for row, m in zip(ids, mask)]
  big = clip_score.CLIPScorer.from_pretrained(clip_dir, batch_size=8, tokenizer=tokenizer)
  small = clip_score.CLIPScorer.from_pretrained(clip_dir, batch_size=2, label="x")
  by_text = big.cosine(images, texts)
  np.testing.assert_allclose(by_text, small.cosine(images, input_ids=ids, attention_mask=mask),
                             atol=1e-6)  # padding of the last batch is dropped

  with pytest.raises(ValueError, match="5 images but 4 prompts"):
    big.cosine(images, texts[:4])
  with pytest.raises(ValueError, match="uint8"):
    big.cosine(images.astype(np.float32), texts)
  with pytest.raises(ValueError, match="no tokenizer"):
    small.cosine(images, texts)
  with pytest.raises(ValueError, match="needs a label"):
    clip_score.CLIPScorer(big.model, label="")
  with pytest.raises(OSError, match="cannot load a Flax CLIP"):
    clip_score.CLIPScorer.from_pretrained(clip_dir + "-missing")


def test_labels_name_the_clip(clip_dir):
  assert clip_score.label_for(clip_dir) == "local-clip-tiny"
  assert clip_score.label_for("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
