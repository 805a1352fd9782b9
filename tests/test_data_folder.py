"""Users' data (manifest -> array_record) on real images shipped by scikit-image, bad input, and the
code path for public tfds datasets (coco_captions)."""

import csv
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import data
from ldm_scaling.data import manifest as manifest_lib
from ldm_scaling.models import offline

# Images that ship inside the scikit-image wheel (test-only dependency), with captions written from
# skimage.data's descriptions. Modes: RGB PNG, RGB JPEG, L (grayscale), RGBA.
SKIMAGE = {
    "astronaut.png": "Eileen Collins, an astronaut, in her flight suit",
    "camera.png": "a black and white photo of a man with a camera on a tripod",
    "chelsea.png": "a tabby cat named Chelsea",
    "coffee.png": "a cup of coffee on a saucer",
    "coins.png": "greek coins from Pompeii on a dark background",
    "horse.png": "the black silhouette of a horse",
    "logo.png": "the scikit-image logo, a snake",
    "hubble_deep_field.jpg": "the Hubble deep field, hundreds of distant galaxies",
    "rocket.jpg": "a rocket on its launch pad",
    "motorcycle_left.png": "a motorcycle in a garage",
    "moon.png": "the cratered surface of the moon",
    "brick.png": "a brick wall",
}
TEST_SPLIT = ("coffee.png", "moon.png", "rocket.jpg")


def _skimage_dir():
  spec = importlib.util.find_spec("skimage")
  if spec is None:
    pytest.skip("scikit-image (test extra) is not installed")
  return os.path.join(os.path.dirname(spec.origin), "data")


def _reference_rgb(path):
  """Independent expectation: PIL's own conversion, alpha composited on white."""
  im = Image.open(path)
  if im.mode == "RGBA":
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    bg.alpha_composite(im)
    im = bg
  return np.asarray(im.convert("RGB"))


def _config(tmp_path, name, **data_kw):
  config = offline.apply(cfglib.base_config())
  config.data.update(name=name, data_dir=str(tmp_path / "tfds"), threads=2, **data_kw)
  experiment.validate(config)
  return config


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _records(config, split):
  src = data.source(config, split)
  return [src.records[i] for i in range(len(src.records))]


def test_folder_builder_on_real_images(tmp_path):
  sk = _skimage_dir()
  manifest = tmp_path / "manifest.jsonl"
  _write_jsonl(manifest, [dict(image=os.path.join(sk, f), caption=c,
                               **({"split": "test"} if f in TEST_SPLIT else {}))
                          for f, c in SKIMAGE.items()])
  config = _config(tmp_path, f"folder:{manifest}", resolution=32)
  summary = data.prepare(config)
  assert summary["splits"] == {"train": len(SKIMAGE) - 3, "test": 3}
  report = summary["report"]
  assert report["num_skipped"] == 0
  assert report["converted"] == {"L -> RGB": 4, "RGBA composited on white": 2}
  by_caption = {r["caption"].decode(): r for s in ("train", "test") for r in _records(config, s)}
  for fname, caption in SKIMAGE.items():
    rec = by_caption[caption]
    np.testing.assert_array_equal(rec["image"], _reference_rgb(os.path.join(sk, fname)))
  # The pipeline resizes (area) and centre-crops them like any dataset.
  batch = next(data.make_pipeline(config, "test", batch_size=3, seed=0, process_index=0,
                                  process_count=1, num_epochs=1))
  assert batch["images"].shape == (3, 32, 32, 3)
  assert sorted(batch["captions"]) == sorted(SKIMAGE[f] for f in TEST_SPLIT)
  # Prepared once: a second prepare reuses it.
  assert data.prepare(config)["already_prepared"]


def test_csv_manifest_with_relative_paths(tmp_path):
  sk = _skimage_dir()
  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  for f in ("chelsea.png", "coins.png"):
    (img_dir / f).write_bytes(open(os.path.join(sk, f), "rb").read())
  manifest = tmp_path / "captions.csv"
  with open(manifest, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["image", "caption"])
    w.writerow(["imgs/chelsea.png", "a cat, with a comma"])
    w.writerow(["imgs/coins.png", 'coins "quoted"'])
  config = _config(tmp_path, f"folder:{manifest}")
  recs = _records(config, "train")
  assert sorted(r["caption"].decode() for r in recs) == ["a cat, with a comma", 'coins "quoted"']


def _bad_manifest(tmp_path):
  """Good real images plus one row of every kind of bad input."""
  sk = _skimage_dir()
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(open(os.path.join(sk, "astronaut.png"), "rb").read()[:2000])
  sixteen = tmp_path / "sixteen_bit.png"
  Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(sixteen)
  rows = [
      dict(image=os.path.join(sk, "chelsea.png"), caption="a tabby cat"),
      dict(image=str(truncated), caption="truncated file"),                          # corrupt
      dict(image=os.path.join(sk, "multipage_rgb.tif"), caption="unreadable tiff"),  # corrupt
      dict(image=os.path.join(sk, "coffee.png"), caption="   "),                     # empty
      dict(image=os.path.join(sk, "coins.png")),                                     # missing
      dict(image=str(tmp_path / "nope.png"), caption="no such file"),                # missing file
      dict(image=os.path.join(sk, "multipage.tif"), caption="10x15 pixels"),         # too small
      dict(image=str(sixteen), caption="16-bit grayscale"),                          # bad mode
      dict(image=os.path.join(sk, "astronaut.png"), caption="an astronaut"),
  ]
  manifest = tmp_path / "bad.jsonl"
  _write_jsonl(manifest, rows)
  return manifest


def test_bad_rows_are_an_error_by_default(tmp_path):
  manifest = _bad_manifest(tmp_path)
  config = _config(tmp_path, f"folder:{manifest}")
  with pytest.raises(manifest_lib.BadExampleError,
                     match=r"bad.jsonl:2: corrupt image .*data.bad_examples=skip"):
    data.prepare(config)


def test_bad_rows_are_skipped_and_counted(tmp_path):
  manifest = _bad_manifest(tmp_path)
  config = _config(tmp_path, f"folder:{manifest}", bad_examples="skip")
  summary = data.prepare(config)
  report = summary["report"]
  assert summary["splits"] == {"train": 2}
  assert report["num_skipped"] == 7
  assert report["skipped"]["train"] == {
      "corrupt image": 2, "empty caption": 1, "missing caption": 1, "image file not found": 1,
      "image 10x15 is smaller than data.min_image_size=16": 1,
      "unsupported image mode 'I;16'": 1}
  assert any("line 3" in e and "multipage_rgb.tif" in e for e in report["skipped_examples"])
  assert sorted(r["caption"].decode() for r in _records(config, "train")) == [
      "a tabby cat", "an astronaut"]


def test_manifest_errors_are_clear(tmp_path):
  with pytest.raises(manifest_lib.ManifestError, match="not found"):
    data.prepare(_config(tmp_path, f"folder:{tmp_path}/missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
  with pytest.raises(manifest_lib.ManifestError, match="bad.jsonl:2: not valid JSON"):
    data.prepare(_config(tmp_path, f"folder:{bad}"))
  txt = tmp_path / "m.txt"
  txt.write_text("x")
  with pytest.raises(manifest_lib.ManifestError, match="unknown format '.txt'"):
    data.prepare(_config(tmp_path, f"folder:{txt}"))


# -------------------------------------------------------------------------------------------------
# Public tfds datasets: the code path (no download). A coco_captions directory is prepared from a
# few fake examples with the real builder's features, then read by name like the real one.


def _fake_coco(data_dir):
  from tensorflow_datasets.object_detection import coco_captions

  def png(i):
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), i * 10, np.uint8)).save(buf, "PNG")
    return buf.getvalue()

  class FakeCoco(coco_captions.CocoCaptions, skip_registration=True):
    name = "coco_captions"

    def _split_generators(self, dl_manager):
      return {"train": self._gen(6), "val": self._gen(4)}

    def _gen(self, n):
      for i in range(n):
        yield i, {"image": png(i), "image/filename": f"{i}.jpg", "image/id": i,
                  "objects": {"id": [], "area": [], "bbox": np.zeros((0, 4), np.float32),
                              "label": [], "is_crowd": []},
                  "captions": {"text": [f"image {i} caption {j}" for j in range(5)],
                               "id": list(range(5))}}

  FakeCoco(data_dir=data_dir).download_and_prepare(file_format="array_record")


def test_public_tfds_name_reads_a_prepared_dataset(tmp_path):
  config = _config(tmp_path, "coco_captions", eval_split="val", resolution=32)
  with pytest.raises(data.DataError, match="tfds build coco_captions --file_format=array_record"):
    data.make_pipeline(config, "train", batch_size=2, process_index=0, process_count=1)
  _fake_coco(config.data.data_dir)
  it = data.make_pipeline(config, "val", batch_size=4, seed=0, process_index=0, process_count=1,
                          num_epochs=1)
  batch = next(it)
  assert batch["images"].shape == (4, 32, 32, 3)  # 20x24 images, bicubic up + centre crop
  for img, cap in zip(batch["images"], batch["captions"]):
    i = int(cap.split()[1])  # one of the image's own five captions
    np.testing.assert_allclose(img, np.full((32, 32, 3), i * 10 / 127.5 - 1), atol=1e-6)
  with pytest.raises(data.DataError, match="has splits .* not 'nope'"):
    data.make_pipeline(config, "nope", batch_size=2, process_index=0, process_count=1)


def test_unknown_dataset_name(tmp_path):
  config = _config(tmp_path, "no_such_dataset_xyz")
  with pytest.raises(data.DataError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.source(config, "train")
