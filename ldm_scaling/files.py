"""Small file helpers shared by the trainer, the study and the tables (local paths or ``gs://``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid

from etils import epath

from ldm_scaling.errors import WeightsError

REMOTE_LISTING = ".ldm_scaling_listing.json"  # in a local copy of a remote directory: what it holds


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


def local_dir(location: str, root: str | None = None, missing_ok: bool = False) -> str | None:
  """A remote (``gs://`` ...) directory tree as a local directory, for readers that need local
  files (``from_pretrained``, safetensors); a local path is returned as given.

  The copy is ``<cache_root>/remote/<sha256(location)[:16]>``, made once per machine: its
  :data:`REMOTE_LISTING` file records the remote names and sizes it was copied from, and a later
  call whose listing matches returns it without reading the files again; a different listing
  (the directory was rewritten) copies it again. A copy is built in a temporary directory beside
  it and renamed into place, so a reader never sees half of one. Unreadable or absent remote
  paths raise :class:`WeightsError` (an absent one gives None with ``missing_ok``)."""
  if is_local(location):
    return location
  location = location.rstrip("/")
  src = epath.Path(location)
  try:
    listing = _remote_listing(src)
  except Exception as e:  # pylint: disable=broad-except  (auth, network, permission errors)
    why = (str(e).strip().splitlines() or [""])[0][:200]
    raise WeightsError(
        f"cannot read {location!r} ({type(e).__name__}: {why}); check the path and that this "
        f"machine can read the bucket (gcloud auth application-default login), or copy it to a "
        f"local directory and give that") from None
  if not listing:
    if missing_ok:
      return None
    raise WeightsError(f"{location!r} does not exist or holds no files; check the path (a "
                       f"diffusers pipeline directory has vae/, text_encoder/ and tokenizer/)")
  key = hashlib.sha256(location.encode()).hexdigest()[:16]
  dest = os.path.join(root or cache_root(), "remote", key)
  record = {"source": location, "files": [[name, size] for name, size in listing]}
  if _read_listing(dest) == record:
    return dest
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{key}.tmp", dir=os.path.dirname(dest))
  old = f"{dest}.old{uuid.uuid4().hex}"
  try:
    for name, size in listing:
      target = os.path.join(tmp, *name.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with src.joinpath(name).open("rb") as f, open(target, "wb") as g:
        shutil.copyfileobj(f, g, length=16 << 20)
      if os.path.getsize(target) != size:
        raise WeightsError(f"copying {location}/{name} gave {os.path.getsize(target)} bytes, not "
                           f"{size}; run again (it may be being rewritten)")
    with open(os.path.join(tmp, REMOTE_LISTING), "w", encoding="utf-8") as f:
      json.dump(record, f)
    try:
      os.rename(dest, old)  # a stale copy: out of the way (readers holding its files keep them)
    except FileNotFoundError:
      pass
    try:
      os.rename(tmp, dest)
    except OSError:
      if _read_listing(dest) != record:  # another process installed the same copy meanwhile
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
  return dest


def _remote_listing(src: epath.Path) -> list[tuple[str, int]]:
  """Sorted (relative name with ``/``, size) of the files under ``src``; [] if it is absent."""
  if not src.is_dir():
    return []
  out, todo = [], [("", src)]
  while todo:
    prefix, d = todo.pop()
    for child in d.iterdir():
      name = f"{prefix}{child.name}"
      if child.is_dir():
        todo.append((f"{name}/", child))
      else:
        out.append((name, int(child.stat().length)))
  return sorted(out)


def _read_listing(dest: str) -> dict | None:
  try:
    with open(os.path.join(dest, REMOTE_LISTING), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
