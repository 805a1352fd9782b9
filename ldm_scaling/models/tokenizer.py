"""CLIP's BPE tokenizer: offline from the vocabulary shipped here, or by hub id / directory.

Offline it is built from ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP's vocabulary, shipped in
``ldm_scaling/data/assets`` from the open-clip-torch wheel, MIT): the first 48,894 merges after the
header give the 49,408-token vocabulary. By hub id or directory (local, or gs:// copied once to the
local cache by ``files.local_dir``) it is ``CLIPTokenizerFast.from_pretrained``. :class:`Tokenize`
is the data pipeline's thread-safe form. transformers is imported where it is used (see
``models/text.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import ml_collections
import numpy as np
from tokenizers import Tokenizer

from ldm_scaling import files
from ldm_scaling.errors import WeightsError

BPE = "bpe"              # text.tokenizer value naming the shipped BPE vocabulary
OFFLINE = "clip-small"   # text.encoder value naming the project's own small CLIP (its tokenizer: bpe)
BPE_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets",
                        "bpe_simple_vocab_16e6.txt.gz")
BPE_MERGES = 48_894      # 49152 - 256 - 2
VOCAB_SIZE = 49_408


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
  from transformers import CLIPTokenizerFast  # deferred: see module docstring
  if not os.path.isfile(path):
    bpe_vocab(path)  # raises the explanatory error
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
  cache = os.path.join(files.cache_root(), "tokenizer", f"clip-bpe-{digest}")
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


def hub_or_dir(location: str, subfolder: str, what: str) -> dict[str, Any]:
  """``from_pretrained`` arguments for a hub id or a directory; a missing directory is an error.
  A remote (gs://) directory's ``subfolder`` is copied once to the local cache
  (``files.local_dir``) and read from there."""
  if not files.is_local(location):
    location = files.local_dir(f"{location.rstrip('/')}/{subfolder}" if subfolder else location)
    subfolder = ""
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
  from transformers import CLIPTokenizerFast  # deferred: see module docstring
  if isinstance(text, ml_collections.ConfigDict):
    location = text.tokenizer or text.encoder
    if not text.tokenizer and text.subfolder:
      subfolder = "tokenizer" if text.subfolder == "text_encoder" else text.subfolder
    max_length = text.max_length
  else:
    location = text
  if location in (BPE, OFFLINE):
    return bpe_tokenizer(max_length)
  kw = hub_or_dir(location, subfolder, "tokenizer")
  try:
    tok = CLIPTokenizerFast.from_pretrained(**kw)
  except (OSError, TypeError) as e:
    # Offline with HF_HUB_OFFLINE=1 and nothing cached, transformers finds no vocabulary file and
    # fails inside the tokenizer's constructor (TypeError: vocab_file is None).
    why = str(e) if isinstance(e, OSError) else "no vocabulary files found"
    raise WeightsError(
        f"cannot load a CLIP tokenizer from {location!r}{'/' + subfolder if subfolder else ''}: "
        f"{why}. Offline, use a local directory (saved with save_pretrained) or text.tokenizer=bpe "
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
      backend = Tokenizer.from_str(self._json)
      backend.enable_truncation(self.max_length)
      backend.enable_padding(length=self.max_length, pad_id=self._pad[0], pad_token=self._pad[1])
      self._backend = backend
    return np.asarray([e.ids for e in self._backend.encode_batch(list(captions))], np.int32)
