"""Small file helpers shared by the trainer, the study and the tables (local paths or ``gs://``)."""

from __future__ import annotations

import os
import uuid

from etils import epath


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` via a temporary file beside ``path`` and a rename: a reader (another host, an
  interrupted run resuming) sees the old or the new file, never half of one.

  The temporary's name is unique (across hosts, processes and threads), so concurrent writers of
  one path never collide: the last rename wins, whole. Locally the data is fsynced before the
  rename and the directory after it, so a power loss cannot leave an empty file under the final
  name (a rename is journaled before the data it points to reaches the disk). Object stores
  (``gs://``) write an object whole, so nothing is needed there."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{uuid.uuid4().hex}"
  try:
    if is_local(path):
      _write_synced(os.fspath(tmp), data)
      os.replace(tmp, path)
      _fsync_dir(os.fspath(path.parent))
    else:
      tmp.write_bytes(data)
      tmp.replace(path)
  except BaseException:
    _remove_quietly(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """:func:`atomic_write_bytes` of UTF-8 text."""
  atomic_write_bytes(path, text.encode("utf-8"))


def is_local(path: str | os.PathLike) -> bool:
  """Whether ``path`` names the local file system (not ``gs://``, ``s3://`` ...)."""
  return "://" not in os.fspath(path)


def _write_synced(path: str, data: bytes) -> None:
  """A new file (``x``: never someone else's) holding ``data``, on the disk when this returns."""
  with open(path, "xb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
  """Makes a rename inside ``directory`` durable, where the platform allows it (Windows cannot
  open a directory; some network file systems refuse to fsync one: then the rename is as durable
  as that file system makes it)."""
  try:
    fd = os.open(directory or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _remove_quietly(path: epath.Path) -> None:
  """Removes a temporary left by a failed write (best effort: the error that matters is the
  write's)."""
  try:
    if path.exists():
      path.unlink()
  except Exception:  # pylint: disable=broad-except
    pass


def cache_root() -> str:
  """Where the package keeps what it makes or fetches (trained components, FID weights and
  statistics, tokenizers, compiled programs): ``$LDM_SCALING_CACHE``, else
  ``$XDG_CACHE_HOME/ldm_scaling`` (``~/.cache/ldm_scaling``)."""
  return os.environ.get("LDM_SCALING_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ldm_scaling")
