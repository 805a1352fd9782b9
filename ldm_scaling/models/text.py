"""Text conditioning: the CLIP tokenizer and a frozen CLIP text tower (transformers' Flax CLIP).

Where the weights come from is ``config.text.encoder``:

- a hub id (``stabilityai/stable-diffusion-2-1-base`` with ``text.subfolder="text_encoder"``: the
  SD-2.x OpenCLIP-ViT-H text tower, hidden size 1024) or a local directory holding a transformers
  checkpoint (``config.json`` + ``flax_model.msgpack`` or ``model.safetensors``);
- ``"clip-small"``: the small CLIP this project trains on the embedded dataset
  (``ldm-scaling train-clip``, :mod:`ldm_scaling.models.clip`), stored with ``save_pretrained`` in
  ``config.clip.dir``.

The tokenizer is CLIP's BPE. Offline it is built from ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI
CLIP's vocabulary, shipped in ``ldm_scaling/data/assets`` from the open-clip-torch wheel, MIT):
the first 48,894 merges after the header give the 49,408-token vocabulary. By hub id or directory
it is ``CLIPTokenizerFast.from_pretrained``.

Interfaces other stages use: :func:`load_tokenizer`, :func:`load_clip_model` (a full
``FlaxCLIPModel``, e.g. for the CLIP score), :func:`load_text_encoder` (the frozen tower the UNet is
conditioned on) and :class:`TextEncoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import ml_collections
import numpy as np

from ldm_scaling.errors import ConfigError, WeightsError  # WeightsError re-exported

os.environ.setdefault("USE_TF", "0")  # transformers must not import TensorFlow

OFFLINE = "clip-small"   # text.encoder value naming the project's own small CLIP
BPE = "bpe"              # text.tokenizer value naming the shipped BPE vocabulary
BPE_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets",
                        "bpe_simple_vocab_16e6.txt.gz")
BPE_MERGES = 48_894      # 49152 - 256 - 2
VOCAB_SIZE = 49_408


# -------------------------------------------------------------------------------------------------
# Tokenizer.


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable-unicode table."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def bpe_vocab(path: str = BPE_FILE) -> tuple[dict[str, int], list[str]]:
  """(token -> id, merge lines) of OpenAI CLIP's BPE from the gzipped merges file."""
  if not os.path.isfile(path):
    raise WeightsError(
        f"CLIP BPE vocabulary {path!r} is missing; it ships with the package "
        f"(ldm_scaling/data/assets/bpe_simple_vocab_16e6.txt.gz, from the open-clip-torch wheel): "
        f"reinstall ldm-scaling, or set text.tokenizer to a hub id / directory holding a CLIP "
        f"tokenizer")
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise WeightsError(f"CLIP BPE vocabulary {path!r} is unreadable ({e}); reinstall ldm-scaling")
  merges = lines[1:1 + BPE_MERGES]
  if len(merges) != BPE_MERGES:
    raise WeightsError(f"CLIP BPE vocabulary {path!r} has {len(merges)} merges, expected "
                       f"{BPE_MERGES}; the file is truncated, reinstall ldm-scaling")
  byte_tokens = list(_bytes_to_unicode().values())
  tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
  tokens += ["".join(m.split()) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def bpe_tokenizer(max_length: int = 77, path: str = BPE_FILE):
  """``CLIPTokenizerFast`` built offline from the shipped BPE vocabulary.

  Building the fast tokenizer from vocab + merges takes seconds, so the result is kept (as a
  ``save_pretrained`` directory keyed by the vocabulary's hash) in ``~/.cache/ldm_scaling``."""
  from transformers import CLIPTokenizerFast  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    bpe_vocab(path)  # raises the explanatory error
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                       "ldm_scaling", "tokenizer", f"clip-bpe-{digest}")
  if os.path.isfile(os.path.join(cache, "tokenizer.json")):
    try:
      tok = CLIPTokenizerFast.from_pretrained(cache)
      tok.model_max_length = max_length
      return tok
    except (OSError, ValueError):
      pass  # a damaged cache is rebuilt below
  vocab, merges = bpe_vocab(path)
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file,
                            model_max_length=max_length)
  try:
    staging = f"{cache}.tmp{os.getpid()}"
    tok.save_pretrained(staging)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.replace(staging, cache)
  except OSError:
    pass  # read-only cache: build again next time
  return tok


def _hub_or_dir(location: str, subfolder: str, what: str) -> dict[str, Any]:
  """``from_pretrained`` arguments for a hub id or a directory; a missing directory is an error."""
  looks_local = location.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(location))
  if looks_local:
    path = os.path.join(os.path.expanduser(location), subfolder)
    if not os.path.isdir(path):
      raise WeightsError(f"{what} directory {path!r} does not exist; give a directory holding a "
                         f"transformers checkpoint (config.json + weights) or a hub id")
    return dict(pretrained_model_name_or_path=path)
  kw = dict(pretrained_model_name_or_path=location)
  if subfolder:
    kw["subfolder"] = subfolder
  return kw


def load_tokenizer(text: ml_collections.ConfigDict | str = BPE, max_length: int = 77,
                   subfolder: str = ""):
  """The tokenizer of a ``text`` config section, or of a location string.

  ``"bpe"`` (or the offline ``"clip-small"`` encoder): the shipped BPE vocabulary. Otherwise a hub
  id or directory (``CLIPTokenizerFast.from_pretrained``); for a diffusers pipeline layout
  (``text.subfolder="text_encoder"``) the tokenizer is read from its ``tokenizer`` subfolder.
  """
  if isinstance(text, ml_collections.ConfigDict):
    location = text.tokenizer or text.encoder
    if not text.tokenizer and text.subfolder:
      subfolder = "tokenizer" if text.subfolder == "text_encoder" else text.subfolder
    max_length = text.max_length
  else:
    location = text
  if location in (BPE, OFFLINE):
    return bpe_tokenizer(max_length)
  from transformers import CLIPTokenizerFast  # pylint: disable=g-import-not-at-top
  kw = _hub_or_dir(location, subfolder, "tokenizer")
  try:
    tok = CLIPTokenizerFast.from_pretrained(**kw)
  except OSError as e:
    raise WeightsError(
        f"cannot load a CLIP tokenizer from {location!r}{'/' + subfolder if subfolder else ''}: "
        f"{e}. Offline, use a local directory (saved with save_pretrained) or text.tokenizer=bpe "
        f"for the vocabulary shipped with the package") from None
  tok.model_max_length = max_length
  return tok


def tokenize(tokenizer, captions: Sequence[str], max_length: int) -> np.ndarray:
  """(N, max_length) int32 ids, padded and truncated as SD does."""
  ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")["input_ids"]
  return ids.astype(np.int32)


class Tokenize:
  """``Tokenize(tokenizer, max_length)(captions) -> (N, max_length) int32``, safe to call from many
  threads at once (the data pipeline's): a private copy of the fast tokenizer's Rust backend with
  padding and truncation fixed once (transformers' ``__call__`` re-sets them per call, which races
  across threads). Equal to :func:`tokenize`; picklable for worker processes."""

  def __init__(self, tokenizer, max_length: int):
    self.max_length = max_length
    self._slow = None if getattr(tokenizer, "is_fast", False) else tokenizer
    self._json = None if self._slow else tokenizer.backend_tokenizer.to_str()
    self._pad = (tokenizer.pad_token_id, tokenizer.pad_token)
    self._backend = None

  def __getstate__(self):
    return dict(self.__dict__, _backend=None)

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    if self._slow is not None:
      return tokenize(self._slow, captions, self.max_length)
    if self._backend is None:
      from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
      backend = Tokenizer.from_str(self._json)
      backend.enable_truncation(self.max_length)
      backend.enable_padding(length=self.max_length, pad_id=self._pad[0], pad_token=self._pad[1])
      self._backend = backend
    return np.asarray([e.ids for e in self._backend.encode_batch(list(captions))], np.int32)


# -------------------------------------------------------------------------------------------------
# Models.


def _load_flax(cls, location: str, subfolder: str, what: str, dtype: str = "float32"):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  kw = _hub_or_dir(location, subfolder, what)
  path = kw["pretrained_model_name_or_path"]
  if os.path.isdir(path):
    files = set(os.listdir(path))
    if "config.json" not in files:
      raise WeightsError(f"{what} directory {path!r} has no config.json; it is not a "
                         f"transformers checkpoint (save one with save_pretrained)")
    if not files & {"flax_model.msgpack", "model.safetensors", "pytorch_model.bin"}:
      raise WeightsError(f"{what} directory {path!r} has no weights (flax_model.msgpack or "
                         f"model.safetensors)")
    if "flax_model.msgpack" not in files and "model.safetensors" not in files:
      raise WeightsError(f"{what} directory {path!r} holds only pytorch_model.bin (pickle); "
                         f"re-save it as safetensors (save_pretrained(safe_serialization=True))")
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  verbosity = hf_logging.get_verbosity()
  # Loading the text tower from a full CLIP checkpoint leaves the vision tower unused, which
  # transformers reports as a long warning; that is the intended use here.
  hf_logging.set_verbosity_error()
  try:
    model = cls.from_pretrained(**kw, dtype=jnp.dtype(dtype))
  except OSError as e:
    raise WeightsError(f"cannot load {what} from {location!r}: {e}. Offline, point to a local "
                       f"directory or train the project's small CLIP (ldm-scaling train-clip)") \
        from None
  finally:
    hf_logging.set_verbosity(verbosity)
  return model


def load_clip_model(location: str, dtype: str = "float32"):
  """A full ``FlaxCLIPModel`` (both towers) from a hub id or directory, e.g. the offline CLIP's
  directory (``models.clip.ensure_clip(config)`` returns it) or ``openai/clip-vit-large-patch14``."""
  from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  return _load_flax(FlaxCLIPModel, location, "", "CLIP model", dtype)


@dataclasses.dataclass
class TextEncoder:
  """A frozen CLIP text tower: ``embed(ids) -> (B, L, hidden)`` last hidden states.

  ``module`` / ``params`` are exposed so a trainer can call ``module.apply({"params": params},
  ids)`` inside its own jitted step (``apply`` below does exactly that); ``params`` are never
  trained and never saved with a checkpoint.
  """
  module: Any
  params: Any
  tokenizer: Any
  max_length: int
  hidden_size: int
  source: str

  def apply(self, params, ids):
    """Pure function of (params, ids): the last hidden states, (B, L, hidden)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    ids = jnp.asarray(ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1])[None], ids.shape)
    out = self.module.apply({"params": params}, ids, jnp.ones_like(ids), pos)
    return out[0]

  @functools.cached_property
  def _jitted(self):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.jit(self.apply)

  def embed(self, ids) -> Any:
    return self._jitted(self.params, ids)

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    return tokenize(self.tokenizer, captions, self.max_length)

  def embed_text(self, captions: Sequence[str]) -> np.ndarray:
    return np.asarray(self.embed(self.tokenize(captions)))

  def embed_cached(self, captions: Sequence[str], cache_dir: str) -> np.ndarray:
    """Embeddings of a fixed caption list (eval prompts, the empty caption), computed once and
    kept in ``cache_dir`` keyed by the encoder, the length and the captions themselves."""
    key = hashlib.sha256(json.dumps([self.source, self.max_length, list(captions)]).encode())
    path = os.path.join(cache_dir, f"text-emb-{key.hexdigest()[:16]}.npy")
    if os.path.isfile(path):
      return np.load(path)
    out = np.concatenate([self.embed_text(captions[i:i + 256])
                          for i in range(0, len(captions), 256)]) if captions else np.zeros(
                              (0, self.max_length, self.hidden_size), np.float32)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npy"
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def load_text_encoder(config: ml_collections.ConfigDict, clip_dir: str | None = None) -> TextEncoder:
  """The frozen text tower of ``config.text`` (checked against ``model.cross_attn_dim``).

  For ``text.encoder="clip-small"`` the weights are the project's trained CLIP in ``clip_dir``
  (default ``models.clip.default_dir(config)``); a missing one is an error that says how to train it
  (``models.clip.ensure_clip`` trains it when absent).
  """
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  text = config.text
  if text.encoder == OFFLINE:
    from ldm_scaling.models import clip  # pylint: disable=g-import-not-at-top
    location = clip_dir or clip.default_dir(config)
    clip.check_trained(config, location)
    model = _load_flax(FlaxCLIPTextModel, location, "", "offline CLIP", text.dtype)
    tokenizer = load_tokenizer(location, text.max_length)
  else:
    location = text.encoder
    model = _load_flax(FlaxCLIPTextModel, location, text.subfolder, "text encoder", text.dtype)
    tokenizer = load_tokenizer(text)
  hidden = model.config.hidden_size
  if hidden != config.model.cross_attn_dim:
    raise ConfigError(f"text encoder {location!r} has hidden size {hidden} but "
                      f"model.cross_attn_dim={config.model.cross_attn_dim}; set "
                      f"model.cross_attn_dim={hidden}")
  if text.max_length > model.config.max_position_embeddings:
    raise ConfigError(f"text.max_length={text.max_length} exceeds the encoder's "
                      f"{model.config.max_position_embeddings} positions")
  return TextEncoder(module=model.module, params=model.params, tokenizer=tokenizer,
                     max_length=text.max_length, hidden_size=hidden, source=location)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the ``text`` section (without loading anything)."""
  text = config.text
  if not text.encoder:
    raise ConfigError(f"text.encoder is empty; give a hub id, a directory or {OFFLINE!r}")
  if not 1 <= text.max_length <= 512:
    raise ConfigError(f"text.max_length must be in [1, 512], got {text.max_length}")
  if text.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"text.dtype must be float32 or bfloat16, got {text.dtype!r}")
  if text.encoder == OFFLINE:
    if config.clip.width != config.model.cross_attn_dim:
      raise ConfigError(
          f"text.encoder={OFFLINE!r} has hidden size clip.width={config.clip.width} but "
          f"model.cross_attn_dim={config.model.cross_attn_dim}; set them equal")
    if text.max_length > config.clip.max_length:
      raise ConfigError(f"text.max_length={text.max_length} exceeds clip.max_length="
                        f"{config.clip.max_length} (the offline CLIP's positions)")
