"""A frozen CLIP text tower (transformers' Flax CLIP) that conditions the UNet.

Where the weights come from is ``config.text.encoder``:

- a hub id (``stabilityai/stable-diffusion-2-1-base`` with ``text.subfolder="text_encoder"``: the
  SD-2.x OpenCLIP-ViT-H text tower, hidden size 1024) or a local or gs:// directory holding a
  transformers checkpoint (``config.json`` + ``flax_model.msgpack`` or ``model.safetensors``; a
  gs:// one is copied once to the local cache, ``files.local_dir``);
- ``"clip-small"``: the small CLIP this project trains on the embedded dataset
  (``ldm-scaling train-clip``, :mod:`ldm_scaling.models.clip`), stored with ``save_pretrained`` in
  ``config.clip.dir``.

The tokenizer is CLIP's BPE (:mod:`ldm_scaling.models.tokenizer`). transformers is imported
where it is used: it imports PyTorch whenever PyTorch is installed (4 s here), which processes
that never load a text encoder (most trainer runs of the tests, the VAE, the launchers) need not
pay. Interfaces other stages use:
:func:`load_clip_model` (a full ``FlaxCLIPModel``, e.g. for the CLIP score),
:func:`load_text_encoder` (the frozen tower the UNet is conditioned on) and :class:`TextEncoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_scaling.errors import ConfigError, WeightsError  # WeightsError re-exported
from ldm_scaling.models import clip
from ldm_scaling.models.tokenizer import OFFLINE, hub_or_dir, load_tokenizer, tokenize

def _load_flax(cls, location: str, subfolder: str, what: str, dtype: str = "float32"):
  from transformers.utils import logging as hf_logging  # deferred: see module docstring
  kw = hub_or_dir(location, subfolder, what)
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
  verbosity = hf_logging.get_verbosity()
  # Loading the text tower from a full CLIP checkpoint leaves the vision tower unused, which
  # transformers reports as a long warning; that is the intended use here.
  hf_logging.set_verbosity_error()
  try:
    try:
      # Without _do_init transformers does not first initialise random weights under jit (5 s
      # for the small CLIP here; the loaded values are the same); missing weights are checked
      # below. Converting a PyTorch checkpoint needs the initialised model.
      model, params = cls.from_pretrained(**kw, dtype=jnp.dtype(dtype), _do_init=False)
    except ValueError as e:
      if "_do_init" not in str(e):
        raise
      model = cls.from_pretrained(**kw, dtype=jnp.dtype(dtype))
      params = model.params
  except OSError as e:
    raise WeightsError(f"cannot load {what} from {location!r}: {e}. Offline, point to a local "
                       f"directory or train the project's small CLIP (ldm-scaling train-clip)") \
        from None
  finally:
    hf_logging.set_verbosity(verbosity)
  expected = jax.eval_shape(lambda key: model.init_weights(key, model.input_shape),
                            jax.random.key(0))
  missing = sorted(set(flax.traverse_util.flatten_dict(expected, sep="/"))
                   - set(flax.traverse_util.flatten_dict(params, sep="/")))
  if missing:
    raise WeightsError(f"{what} checkpoint {location!r} lacks {len(missing)} weights "
                       f"({', '.join(missing[:4])}, ...); it is not a {cls.__name__}")
  return model, params


def load_clip_model(location: str, dtype: str = "float32"):
  """(a full ``FlaxCLIPModel`` (both towers), its parameters) from a hub id or directory, e.g. the
  offline CLIP's directory (``components.clip.ensure(config)`` returns it) or
  ``openai/clip-vit-large-patch14``. Pass the parameters to the model's calls (``params=``)."""
  from transformers import FlaxCLIPModel  # deferred: see module docstring
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
    ids = jnp.asarray(ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1])[None], ids.shape)
    out = self.module.apply({"params": params}, ids, jnp.ones_like(ids), pos)
    return out[0]

  @functools.cached_property
  def _jitted(self):
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
  (``components.clip.ensure`` trains it when absent).
  """
  from transformers import FlaxCLIPTextModel  # deferred: see module docstring
  text = config.text
  if text.encoder == OFFLINE:
    location = clip_dir or clip.default_dir(config)
    clip.check_trained(config, location)
    model, params = _load_flax(FlaxCLIPTextModel, location, "", "offline CLIP", text.dtype)
    tokenizer = load_tokenizer(location, text.max_length)
  else:
    location = text.encoder
    model, params = _load_flax(FlaxCLIPTextModel, location, text.subfolder, "text encoder",
                               text.dtype)
    tokenizer = load_tokenizer(text)
  hidden = model.config.hidden_size
  if hidden != config.model.cross_attn_dim:
    raise ConfigError(f"text encoder {location!r} has hidden size {hidden} but "
                      f"model.cross_attn_dim={config.model.cross_attn_dim}; set "
                      f"model.cross_attn_dim={hidden}")
  if text.max_length > model.config.max_position_embeddings:
    raise ConfigError(f"text.max_length={text.max_length} exceeds the encoder's "
                      f"{model.config.max_position_embeddings} positions")
  return TextEncoder(module=model.module, params=params, tokenizer=tokenizer,
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
