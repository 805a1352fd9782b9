"""Tokenizer (offline CLIP BPE) and the frozen text tower loaded from local transformers checkpoints,
against transformers' PyTorch CLIPTextModel."""

import concurrent.futures
import os

import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling.models import offline, text
from ldm_scaling.models import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.bpe_tokenizer(77)


def test_bpe_vocab_is_openai_clips(tokenizer):
  vocab, merges = tokenizer_lib.bpe_vocab()
  assert len(vocab) == tokenizer_lib.VOCAB_SIZE == 49_408 and len(merges) == 48_894
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  # Ids as published for OpenAI CLIP (e.g. transformers' CLIP docs): "a photo of a cat".
  ids = tokenizer("a photo of a cat")["input_ids"]
  assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenize_pads_truncates_and_is_thread_safe(tokenizer):
  caps = ["a large red circle at the top left on a black background", "", "word " * 100,
          "Café naïve — émojis 😀 and CAPS!"] * 25
  want = tokenizer_lib.tokenize(tokenizer, caps, 16)
  assert want.shape == (100, 16) and want.dtype == np.int32
  assert (want[2] != 49407).sum() == 15 and want[2, -1] == 49407  # truncated, EOS kept
  assert list(want[1][:3]) == [49406, 49407, 49407]               # empty caption: BOS, EOS, pad
  tok = tokenizer_lib.Tokenize(tokenizer, 16)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = np.concatenate(list(pool.map(lambda c: tok([c]), caps)))
  np.testing.assert_array_equal(got, want)
  import pickle
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(caps), want)


def test_missing_or_broken_vocab_is_a_clear_error(tmp_path):
  with pytest.raises(text.WeightsError, match="is missing; it ships with the package"):
    tokenizer_lib.bpe_vocab(str(tmp_path / "absent.txt.gz"))
  bad = tmp_path / "bad.txt.gz"
  bad.write_bytes(b"not gzip")
  with pytest.raises(text.WeightsError, match="unreadable"):
    tokenizer_lib.bpe_vocab(str(bad))


def _pt_text_model(hidden=32):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(0)
  cfg = CLIPTextConfig(vocab_size=tokenizer_lib.VOCAB_SIZE, hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  return CLIPTextModel(cfg).eval()


def _config(encoder, subfolder, hidden):
  config = offline.apply(cfglib.base_config())
  config.text.update(encoder=encoder, subfolder=subfolder, max_length=77)
  config.model.cross_attn_dim = hidden
  return config


@pytest.mark.parametrize("layout", ["plain", "pipeline"])
def test_flax_text_encoder_matches_pytorch_from_a_local_checkpoint(tmp_path, tokenizer, layout):
  """A transformers PyTorch checkpoint (safetensors) saved locally, loaded by our code into
  FlaxCLIPTextModel: same last hidden states as the PyTorch model."""
  import torch
  pt = _pt_text_model()
  root = tmp_path / "ckpt"
  sub = "text_encoder" if layout == "pipeline" else ""
  pt.save_pretrained(root / sub, safe_serialization=True)
  tokenizer.save_pretrained(root / ("tokenizer" if layout == "pipeline" else ""))
  config = _config(str(root), sub, 32)
  enc = text.load_text_encoder(config)
  caps = ["a small blue square at the left on a gray background", "", "three red circles"]
  ids = enc.tokenize(caps)
  np.testing.assert_array_equal(ids, tokenizer_lib.tokenize(tokenizer, caps, 77))
  got = np.asarray(enc.embed(ids))
  with torch.no_grad():
    want = pt(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert got.shape == (3, 77, 32)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # The cached path returns the same embeddings and reuses the file.
  cache = tmp_path / "emb"
  a = enc.embed_cached(caps, str(cache))
  assert len(os.listdir(cache)) == 1
  np.testing.assert_allclose(enc.embed_cached(caps, str(cache)), a)
  np.testing.assert_allclose(a, got, atol=1e-6)


def test_text_encoder_errors(tmp_path):
  pt = _pt_text_model()
  pt.save_pretrained(tmp_path / "ok", safe_serialization=True)
  tokenizer_lib.bpe_tokenizer().save_pretrained(tmp_path / "ok")
  with pytest.raises(cfglib.ConfigError, match="hidden size 32 but model.cross_attn_dim=24; set "
                     "model.cross_attn_dim=32"):
    text.load_text_encoder(_config(str(tmp_path / "ok"), "", 24))
  with pytest.raises(text.WeightsError, match="does not exist"):
    text.load_text_encoder(_config(str(tmp_path / "absent"), "", 32))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(text.WeightsError, match="has no weights"):
    text.load_text_encoder(_config(str(tmp_path / "empty"), "", 32))
  config = offline.apply(cfglib.base_config())
  config.clip.dir = str(tmp_path / "no_clip")
  with pytest.raises(text.WeightsError, match="ldm-scaling train-clip"):
    text.load_text_encoder(config)
