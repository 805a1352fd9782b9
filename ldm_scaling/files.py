"""Small file helpers shared by the trainer, the study and the tables (local paths or ``gs://``)."""

from __future__ import annotations

import os
import uuid

from etils import epath


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` via a temporary file beside ``path`` and a rename: a reader (another host, an
  interrupted run resuming) sees the old or the new file, never half of one."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{uuid.uuid4().hex}"  # unique across hosts and processes
  tmp.write_text(text)
  tmp.replace(path)
