"""Small file helpers shared by the trainer, the study and the tables (local paths or ``gs://``)."""

from __future__ import annotations

import os
import uuid

from etils import epath


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` via a temporary file beside ``path`` and a rename: a reader (another host, an
  interrupted run resuming) sees the old or the new file, never half of one."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{uuid.uuid4().hex}"  # unique across hosts and processes
  tmp.write_bytes(data)
  tmp.replace(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """:func:`atomic_write_bytes` of UTF-8 text."""
  atomic_write_bytes(path, text.encode("utf-8"))


def cache_root() -> str:
  """Where the package keeps what it makes or fetches (trained components, FID weights and
  statistics, tokenizers, compiled programs): ``$LDM_SCALING_CACHE``, else
  ``$XDG_CACHE_HOME/ldm_scaling`` (``~/.cache/ldm_scaling``)."""
  return os.environ.get("LDM_SCALING_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ldm_scaling")
