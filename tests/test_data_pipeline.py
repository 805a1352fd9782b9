"""The embedded dataset and the grain pipeline: determinism, resume, per-host sharding, preprocessing."""

import hashlib

import grain
import numpy as np
import pytest
from PIL import Image

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import data
from ldm_scaling.data import preprocess, shapes
from ldm_scaling.models import offline

SIZES = (96, 40)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **data_kw):
  config = offline.apply(cfglib.base_config())
  config.data.update(data_dir=data_dir, shapes_sizes=SIZES, threads=2, **data_kw)
  experiment.validate(config)
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _key(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# -------------------------------------------------------------------------------------------------
# The generator.


def test_shapes_generator_is_deterministic_and_captions_state_the_content():
  a = shapes.example(0, "train", 7, 32)
  b = shapes.example(0, "train", 7, 32)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"]
  assert not np.array_equal(shapes.example(0, "test", 7, 32)["image"], a["image"])
  assert not np.array_equal(shapes.example(0, "train", 8, 32)["image"], a["image"])
  # Every single-object scene: the named colour is at the named cell, the background elsewhere.
  checked = 0
  for i in range(200):
    scene = shapes.sample_scene(0, "train", i)
    if scene["kind"] != "single":
      continue
    obj = scene["objects"][0]
    cap = shapes.caption(scene)
    assert cap.startswith(f"a {obj['size']} {obj['colour']} {obj['shape']} ")
    assert cap.endswith(f"on a {scene['background']} background")
    img = shapes.render(scene, 64).astype(float)
    row, col = obj["cell"]
    cy, cx = [int(((v + 0.5) / 3 + j) * 64) for v, j in zip((row, col), obj["jitter"][::-1])]
    centre = img[cy, cx]
    assert np.abs(centre - shapes.COLOURS[obj["colour"]]).max() <= shapes.COLOUR_JITTER + 2
    corner = img[0, 0] if (row, col) != (0, 0) else img[-1, -1]
    assert np.abs(corner - shapes.BACKGROUNDS[scene["background"]]).max() <= \
        shapes.COLOUR_JITTER + 2
    checked += 1
  assert checked > 50


def test_resolutions_render_the_same_scene():
  """32 px is the area-downscale of the 64 px rendering up to edge rasterisation (the shapes are
  drawn on 4x canvases whose pixel grids differ)."""
  for i in range(8):
    hi = shapes.example(0, "train", i, 64)["image"].astype(float)
    lo = shapes.example(0, "train", i, 32)["image"].astype(float)
    diff = np.abs(hi.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)) - lo)
    assert diff.mean() < 1.0 and np.median(diff) == 0 and diff.max() < 40


# -------------------------------------------------------------------------------------------------
# The pipeline.


def test_batches_have_the_documented_layout(data_dir):
  config = _config(data_dir)
  # Positional, as the trainer calls it: (config, split, batch_size, seed, process_index, count).
  batch = next(data.make_pipeline(config, "train", 8, 0, 0, 1))
  assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].dtype == np.float32
  assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0
  assert batch["captions"].shape == (8,)
  assert batch["tokens"].shape == (8, config.text.max_length)
  assert batch["tokens"].dtype == np.int32
  assert (batch["tokens"][:, 0] == 49406).all()  # <|startoftext|>


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  config = _config(data_dir, flip="caption_aware", crop="random", caption_dropout=0.2)
  kw = dict(batch_size=16, process_index=0, process_count=1)
  a = _take(data.make_pipeline(config, "train", seed=3, **kw), 8)  # crosses an epoch boundary
  b = _take(data.make_pipeline(config, "train", seed=3, **kw), 8)
  c = _take(data.make_pipeline(config, "train", seed=4, **kw), 8)
  for x, y in zip(a, b):
    _same(x, y)
  assert not all(np.array_equal(x["images"], y["images"]) for x, y in zip(a, c))


def test_resume_from_iterator_state_gives_the_same_next_batches(data_dir):
  config = _config(data_dir, flip="caption_aware", caption_dropout=0.2)
  kw = dict(batch_size=16, seed=1, process_index=0, process_count=1)
  it = data.make_pipeline(config, "train", **kw)
  _take(it, 5)
  state = it.get_state()
  want = _take(it, 4)
  resumed = data.make_pipeline(config, "train", **kw)
  resumed.set_state(state)
  for x, y in zip(want, _take(resumed, 4)):
    _same(x, y)


def test_resume_through_orbax_checkpoint_manager(data_dir, tmp_path):
  """The way the trainer saves it: the iterator as one item of an orbax composite."""
  import orbax.checkpoint as ocp
  config = _config(data_dir)
  kw = dict(batch_size=8, seed=2, process_index=0, process_count=1)
  it = data.make_pipeline(config, "train", **kw)
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = _take(it, 2)
  fresh = data.make_pipeline(config, "train", **kw)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for x, y in zip(want, _take(fresh, 2)):
    _same(x, y)


def test_two_processes_see_disjoint_shards_covering_the_epoch(data_dir):
  config = _config(data_dir, flip="none")
  src = data.source(config, "train")
  every = {_key(preprocess.process(r["image"], "", preprocess.Options(32), None)[0])
           for r in (src.records[i] for i in range(len(src.records)))}
  assert len(every) == SIZES[0]  # images are unique, so a hash identifies an example
  seen = []
  for p in range(2):
    it = data.make_pipeline(config, "train", batch_size=7, seed=5, process_index=p,
                            process_count=2, num_epochs=1, drop_remainder=False, tokenizer=None)
    seen.append([_key(img) for batch in it for img in batch["images"]])
  # Alternate blocks of 7 of the global stream: 96 = 13 blocks of 7 (7 for process 0, 6 for
  # process 1) + a last block of 5, which falls to process 1.
  assert [len(s) for s in seen] == [len(set(s)) for s in seen] == [7 * 7, 6 * 7 + 5]
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == every


def test_every_epoch_is_a_new_permutation_of_the_same_examples(data_dir):
  config = _config(data_dir, flip="none")
  it = data.make_pipeline(config, "train", batch_size=SIZES[0], seed=0, process_index=0,
                          process_count=1, num_epochs=2, tokenizer=None)
  first, second = [[_key(x) for x in next(it)["images"]] for _ in range(2)]
  assert set(first) == set(second) and first != second


def test_eval_split_is_held_out_and_read_in_order(data_dir):
  config = _config(data_dir, flip="random", caption_dropout=0.5)
  kw = dict(batch_size=SIZES[1], process_index=0, process_count=1, num_epochs=1, tokenizer=None)
  a = next(data.make_pipeline(config, "test", seed=0, **kw))
  b = next(data.make_pipeline(config, "test", seed=9, **kw))
  _same(a, b)  # no shuffle, no flip, no caption dropout outside training
  assert all(a["captions"])
  src = data.source(config, "test")
  assert str(a["captions"][3]) == src.records[3]["caption"].decode()
  train = {_key(x) for x in next(data.make_pipeline(
      config, "train", seed=0, batch_size=SIZES[0], process_index=0, process_count=1,
      num_epochs=1, shuffle=False, tokenizer=None))["images"]}
  assert not train & {_key(x) for x in a["images"]}


def test_caption_dropout_rate_and_caption_aware_flip(data_dir):
  config = _config(data_dir, flip="caption_aware", caption_dropout=0.25)
  it = data.make_pipeline(config, "train", batch_size=SIZES[0], seed=0, process_index=0,
                          process_count=1, tokenizer=None, shuffle=False)
  batches = _take(it, 10)
  captions = np.concatenate([b["captions"] for b in batches])
  rate = np.mean(captions == "")
  assert abs(rate - 0.25) < 0.05, rate  # 960 draws: 4 sigma is 0.056
  src = data.source(config, "train")
  flipped = kept = 0
  for b in batches[:2]:
    for i, (img, cap) in enumerate(zip(b["images"], b["captions"])):
      raw = src.records[i]
      orig = raw["image"].astype(np.float32) / 127.5 - 1
      if np.array_equal(img, orig[:, ::-1]) and not np.array_equal(img, orig):
        flipped += 1
        if cap:
          assert cap == preprocess.swap_left_right(raw["caption"].decode())
      else:
        np.testing.assert_array_equal(img, orig)
        kept += 1
        if cap:
          assert cap == raw["caption"].decode()
  assert flipped > 50 and kept > 50


# -------------------------------------------------------------------------------------------------
# Preprocessing against independent computations.


def test_area_downsampling_is_block_averaging():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
  out = preprocess.resize_short_side(img, 32)
  assert out.shape == (32, 48, 3)
  want = img.astype(float).reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
  assert np.abs(out - want).max() <= 1.0


def test_upsampling_is_bicubic_and_crops_are_square():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  out = preprocess.resize_short_side(img, 40)
  want = np.asarray(Image.fromarray(img).resize((60, 40), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out, want)
  centre = preprocess.crop(out, 40, "center", None)
  np.testing.assert_array_equal(centre, out[:, 10:50])
  x, cap = preprocess.process(img[:, :, :1], "a", preprocess.Options(16), np.random.default_rng(0))
  assert x.shape == (16, 16, 3) and cap == "a"  # grayscale -> RGB


def test_swap_left_right_whole_words_only():
  assert preprocess.swap_left_right("a cat at the left and a Right-handed dog at the right") == \
      "a cat at the right and a Left-handed dog at the left"
  assert preprocess.swap_left_right("leftover bright") == "leftover bright"


# -------------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("update,match", [
    (dict(data=dict(flip="sideways")), "data.flip='sideways'"),
    (dict(data=dict(bad_examples="ignore")), "data.bad_examples='ignore'"),
    (dict(data=dict(caption_dropout=1.0)), "caption_dropout must be in"),
    (dict(data=dict(name="folder")), "needs a path"),
    (dict(data=dict(resolution=34)), "resolution=34 is not divisible by the VAE.s down factor 4"),
    (dict(data=dict(resolution=48)), "latent size 12 .* not divisible by 2\\*\\*\\(levels-1\\)=8"),
    (dict(model=dict(cross_attn_dim=1024)), "clip.width=128 but model.cross_attn_dim=1024"),
    (dict(vae=dict(latent_channels=8)), "vae.latent_channels=8 but model.in_channels=4"),
    (dict(clip=dict(patch_size=5)), "not divisible by clip.patch_size"),
])
def test_bad_data_and_conditioning_configs(update, match):
  config = offline.apply(cfglib.base_config())
  for section, values in update.items():
    config[section].update(values)
  with pytest.raises(cfglib.ConfigError, match=match):
    experiment.validate(config)


def test_base_and_offline_configs_validate():
  experiment.validate(cfglib.base_config())
  experiment.validate(offline.apply(cfglib.base_config()))
