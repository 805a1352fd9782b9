"""configs/t2i.py, the paper's setting (512 px -> SD-2.x VAE 64x64x4 latents, SD-2.x text tower,
77 tokens), its loaders on tiny stand-ins saved here in the SD-2 pipeline layout (no SD weights
are reachable offline), and the latent cache written and read through a gs:// bucket.

The bucket is etils' own epath mock mapped onto a local folder (as tests/test_eval_cache.py does):
every gs:// access goes through epath's backend, never through a local folder named ``gs:``.
"""

import json
import os
import shutil

from etils.epath import gpath
from etils.epath import testing as epath_testing
import numpy as np
import pytest

from ldm_scaling import cli
from ldm_scaling import data
from ldm_scaling import experiment
from ldm_scaling import files
from ldm_scaling.data import latents
from ldm_scaling.errors import ConfigError, DataError, WeightsError
from ldm_scaling.models import text
from ldm_scaling.models import tokenizer as tokenizer_lib
from ldm_scaling.models import vae as vae_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(REPO, "configs", "t2i.py")
# A tiny VAE of the SD topology's kind (f = 4) and a 32-wide text tower: saved below as a diffusers
# pipeline directory (vae/, text_encoder/, tokenizer/), the layout of the SD-2 hub repository.
TINY_VAE = dict(width=16, channel_mult=(1, 2, 2), layers_per_block=1, latent_channels=4,
                norm_groups=8, mid_attention=True)
HIDDEN = 32


def test_t2i_is_the_papers_setting(capsys):
  assert cli.main(["config", "--config", f"{T2I}:width=320,data=latents:gs://bucket/latents",
                   "--json"]) == 0
  c = json.loads(capsys.readouterr().out)["config"]
  config = experiment.load(f"{T2I}:width=320,data=latents:gs://bucket/latents")
  down = vae_lib.down_factor(config.vae)
  assert (data.latent_size(config), data.latent_size(config), config.vae.latent_channels) == (
      64, 64, 4)                                           # 512 px / f8: 64x64x4 latents
  assert c["data"]["name"] == "latents:gs://bucket/latents" and c["data"]["resolution"] == 512
  assert down == 8 and c["model"]["in_channels"] == c["model"]["out_channels"] == 4
  assert c["text"]["max_length"] == 77 and c["model"]["cross_attn_dim"] == 1024
  assert (c["vae"]["weights"], c["vae"]["subfolder"]) == ("stabilityai/stable-diffusion-2-1-base",
                                                          "vae")
  assert (c["text"]["encoder"], c["text"]["subfolder"]) == (
      "stabilityai/stable-diffusion-2-1-base", "text_encoder")
  assert c["cost"]["latent_size"] == 64 and c["cost"]["text_len"] == 77  # Table 1's setting
  assert c["model"]["width"] == 320


def test_t2i_data_argument():
  coco = experiment.load(f"{T2I}:width=64")  # the default: COCO captions, held out = val
  assert (coco.data.name, coco.data.eval_split) == ("coco_captions", "val")
  folder = experiment.load(f"{T2I}:width=64,data=folder:/x/m.jsonl,data_dir=gs://b/tfds,"
                           "resolution=256")
  assert (folder.data.name, folder.data.eval_split, folder.data.data_dir) == (
      "folder:/x/m.jsonl", "test", "gs://b/tfds")
  assert data.latent_size(folder) == folder.cost.latent_size == 32
  with pytest.raises(ConfigError, match="needs a dataset name"):
    experiment.load(f"{T2I}:data=tfds:")
  with pytest.raises(ConfigError, match="renders at most 128 px"):
    experiment.load(f"{T2I}:data=shapes")  # the embedded dataset cannot give 512 px
  local = experiment.load(f"{T2I}:vae=~/sd2,text=~/sd2")
  assert (local.vae.weights, local.text.encoder) == ("~/sd2", "~/sd2")
  # A bucket is taken as given (nothing is read at config time; the loaders copy it when used).
  bucket = experiment.load(f"{T2I}:vae=gs://b/sd2,text=gs://b/sd2")
  assert (bucket.vae.weights, bucket.vae.subfolder, bucket.text.encoder,
          bucket.text.subfolder) == ("gs://b/sd2", "vae", "gs://b/sd2", "text_encoder")


def _tiny_sd2_pipeline(root):
  """vae/ (diffusers AutoencoderKL), text_encoder/ (transformers CLIPTextModel), tokenizer/ (the
  CLIP BPE vocabulary): the PyTorch references, saved as safetensors."""
  import torch
  from diffusers import AutoencoderKL
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(0)
  n = len(TINY_VAE["channel_mult"])
  vae = AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=tuple(TINY_VAE["width"] * m for m in TINY_VAE["channel_mult"]),
      layers_per_block=TINY_VAE["layers_per_block"], latent_channels=4,
      norm_num_groups=TINY_VAE["norm_groups"]).eval()
  vae.register_to_config(scaling_factor=0.5)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=tokenizer_lib.VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
  encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
  tokenizer_lib.bpe_tokenizer().save_pretrained(root / "tokenizer")
  return vae, encoder


def _tiny_overrides(tmp_path):
  return [f"vae.{k}={v}" for k, v in TINY_VAE.items() if k != "mid_attention"] + [
      f"model.cross_attn_dim={HIDDEN}", f"data.data_dir={tmp_path / 'tfds'}",
      "data.shapes_sizes=(12,6)", "data.flip=none"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd2")
  return root, _tiny_sd2_pipeline(root)


@pytest.mark.slow  # ~8 s on 2 idle cores, most of it the first Flax CLIP load; the fast tier
# covers the VAE and tokenizer wiring through test_latent_cache_through_a_gs_bucket
def test_t2i_loads_the_vae_and_text_tower_from_a_pipeline_directory(pipeline_dir, tmp_path,
                                                                    monkeypatch):
  """configs/t2i.py:vae=DIR,text=DIR reads vae/, text_encoder/ and tokenizer/ as it would from
  the hub repository; outputs equal the PyTorch models'. The same pipeline on a (fake) gs://
  bucket gives the same outputs, its three subfolders copied to the local cache."""
  import torch
  root, (ref_vae, ref_text) = pipeline_dir
  config = experiment.load(f"{T2I}:width=64,vae={root},text={root},data=shapes,resolution=32",
                           _tiny_overrides(tmp_path))
  vae = vae_lib.load(config)
  assert vae.scaling_factor == 0.5 and vae.source.endswith("vae/diffusion_pytorch_model."
                                                           "safetensors")
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref_vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
  np.testing.assert_allclose(vae.encode_images(x), 0.5 * want.permute(0, 2, 3, 1).numpy(),
                             atol=1e-4, rtol=1e-4)
  enc = text.load_text_encoder(config)
  ids = enc.tokenize(["a red circle at the top left", ""])
  assert ids.shape == (2, 77)
  with torch.no_grad():
    want = ref_text(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state
  np.testing.assert_allclose(np.asarray(enc.embed(ids)), want.numpy(), atol=1e-4, rtol=1e-4)

  shutil.copytree(root, tmp_path / "gcs" / "b" / "sd2")
  monkeypatch.setenv("LDM_SCALING_CACHE", str(tmp_path / "cache"))
  bucket = _Bucket(tmp_path / "gcs", monkeypatch)
  with bucket.mock():
    gs_config = experiment.load(
        f"{T2I}:width=64,vae=gs://b/sd2,text=gs://b/sd2,data=shapes,resolution=32",
        _tiny_overrides(tmp_path))
    gs_vae = vae_lib.load(gs_config)
    gs_enc = text.load_text_encoder(gs_config)
  read = {p for op, p in bucket.seen if op == "open"}
  assert read == {f"gs://b/sd2/{n}" for n in ("vae/config.json",
                                              "vae/diffusion_pytorch_model.safetensors")} | {
      f"gs://b/sd2/{d}/{f.name}" for d in ("text_encoder", "tokenizer")
      for f in (root / d).iterdir()}
  assert gs_vae.source.startswith(str(tmp_path / "cache" / "remote"))
  assert len(os.listdir(tmp_path / "cache" / "remote")) == 3  # vae/, text_encoder/, tokenizer/
  assert gs_vae.scaling_factor == 0.5 and gs_enc.source == "gs://b/sd2"
  np.testing.assert_array_equal(gs_vae.encode_images(x), vae.encode_images(x))
  np.testing.assert_array_equal(gs_enc.tokenize(["a red circle at the top left", ""]), ids)
  np.testing.assert_array_equal(np.asarray(gs_enc.embed(ids)), np.asarray(enc.embed(ids)))


class _Bucket:
  """gs://X as the folder ``root/X`` through etils' epath mock; records every gs:// path used."""

  def __init__(self, root, monkeypatch):
    self.root, self.seen = root, []
    # With TensorFlow installed epath sends gs:// to tf.io.gfile, past mock_epath's backends.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def local(self, path, op=""):
    path = os.fspath(path)
    if path.startswith("gs://"):
      self.seen.append((op, path))
      return str(self.root / path[len("gs://"):])
    return path

  def mock(self):
    def wrap(op, n):
      def fn(original, *args, **kwargs):
        args = [self.local(a, op) if i < n else a for i, a in enumerate(args)]
        return original(*args, **kwargs)
      return fn
    one = {op: wrap(op, 1) for op in ("open", "exists", "isdir", "glob", "listdir", "makedirs",
                                     "mkdir", "remove", "stat", "rmtree", "walk")}
    two = {op: wrap(op, 2) for op in ("rename", "replace", "copy")}
    return epath_testing.mock_epath(**one, **two)


def test_latent_cache_through_a_gs_bucket(pipeline_dir, tmp_path, monkeypatch, capsys):
  """`ldm-scaling cache-latents --out gs://...` writes the cache on the bucket; a run with
  data=latents:gs://... copies each split once to the local cache and reads it; the moments
  equal the PyTorch VAE's; a rewritten cache on the bucket is copied again."""
  import torch
  root, (ref_vae, _) = pipeline_dir
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("LDM_SCALING_CACHE", str(tmp_path / "cache"))
  overrides = _tiny_overrides(tmp_path)
  spec = f"{T2I}:width=64,vae={root},text={root},data=shapes,resolution=32"
  images_config = experiment.load(spec, overrides)
  images = next(data.make_pipeline(images_config, "test", batch_size=6, seed=0, process_index=0,
                                   process_count=1, num_epochs=1, shuffle=False, tokenizer=None))
  bucket = _Bucket(tmp_path / "gcs", monkeypatch)
  capsys.readouterr()  # tfds's preparation messages
  with bucket.mock():
    assert cli.main(["cache-latents", "--config", spec, *[f"--config.{o}" for o in overrides],
                     "--out", "gs://b/lat", "--splits", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"test": 6} and printed["latent_shape"] == [8, 8, 4]
    assert printed["data_name"] == "latents:gs://b/lat" and printed["scaling_factor"] == 0.5

    config = experiment.load(f"{T2I}:width=64,text={root},data=latents:gs://b/lat,resolution=32",
                             overrides + ["data.eval_split=test"])
    records = latents.latent_cache_source("gs://b/lat", "test")
    batch = next(data.make_pipeline(config, "test", batch_size=6, seed=0, process_index=0,
                                    process_count=1, num_epochs=1, shuffle=False))
    opened = [p for op, p in bucket.seen if op == "open" and p.endswith(".array_record")]
    again = latents.latent_cache_source("gs://b/lat", "test")  # the local copy is reused
    assert [p for op, p in bucket.seen if op == "open" and p.endswith(".array_record")] == opened
    # Rewritten on the bucket (another scaling factor): copied again, the new factor read.
    meta_file = tmp_path / "gcs" / "b" / "lat" / latents.LATENT_META
    meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), scaling_factor=0.25)))
    rewritten = latents.latent_cache_source("gs://b/lat", "test")
    with pytest.raises(DataError, match="ldm-scaling cache-latents"):
      latents.latent_cache_source("gs://b/none", "test")
  assert len(opened) == 1  # one copy from the bucket for all the reads before the rewrite
  assert rewritten.scaling_factor == 0.25 and again.path == records.path == rewritten.path
  assert records.path.startswith(str(tmp_path / "cache")) and os.path.isfile(records.path)
  with open(records.path, "rb") as f, open(tmp_path / "gcs" / "b" / "lat" / "test.array_record",
                                           "rb") as g:
    assert f.read() == g.read()
  assert not os.path.exists(cwd / "gs:") and os.listdir(cwd) == []

  # The cached moments are the PyTorch VAE's (float16 storage); the pipeline's latents are
  # samples of them, scaled; captions are those of the images.
  with torch.no_grad():
    dist = ref_vae.encode(torch.from_numpy(images["images"]).permute(0, 3, 1, 2)).latent_dist
  mean = np.stack([records[i]["mean"] for i in range(6)]).astype(np.float32)
  np.testing.assert_allclose(mean, dist.mean.permute(0, 2, 3, 1).numpy(), atol=2e-3, rtol=2e-3)
  assert [records[i]["caption"] for i in range(6)] == list(images["captions"])
  assert batch["latents"].shape == (6, 8, 8, 4)
  logvar = np.stack([records[i]["logvar"] for i in range(6)]).astype(np.float32)
  z = batch["latents"] / 0.5
  assert np.all(np.abs(z - mean) < 6 * np.exp(0.5 * logvar) + 1e-2)


def test_local_dir_copies_a_bucket_directory_once(tmp_path, monkeypatch):
  """files.local_dir: a gs:// tree copied byte for byte to the cache, reused while the bucket's
  listing is unchanged, copied again after a change; absent or unreadable paths are one-line
  WeightsErrors naming them; a local path is returned as given."""
  tree = tmp_path / "gcs" / "b" / "sd2" / "vae"
  (tree / "sub").mkdir(parents=True)
  (tree / "config.json").write_text('{"a": 1}')
  (tree / "sub" / "w.bin").write_bytes(bytes(range(256)) * 3)
  bucket = _Bucket(tmp_path / "gcs", monkeypatch)
  cache = str(tmp_path / "cache")

  def contents(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs if f != files.REMOTE_LISTING}

  def opened():
    return [p for op, p in bucket.seen if op == "open"]

  with bucket.mock():
    first = files.local_dir("gs://b/sd2/vae", root=cache)
    n = len(opened())
    again = files.local_dir("gs://b/sd2/vae/", root=cache)  # same directory: the copy is reused
    assert len(opened()) == n == 2
    (tree / "config.json").write_text('{"a": 22}')  # rewritten on the bucket: another size
    (tree / "new.txt").write_text("x")
    changed = files.local_dir("gs://b/sd2/vae", root=cache)
    assert len(opened()) == n + 3
    with pytest.raises(WeightsError, match=r"'gs://b/none' does not exist") as missing:
      files.local_dir("gs://b/none", root=cache)
    assert files.local_dir("gs://b/none", root=cache, missing_ok=True) is None

    def locked(path):
      if os.fspath(path).startswith("gs://locked"):
        raise PermissionError("403 caller does not have storage.objects.list access")
      return bucket.local(path)
    monkeypatch.setattr(bucket, "local", lambda path, op="": locked(path))
    with pytest.raises(WeightsError, match=r"cannot read 'gs://locked/sd2' \(PermissionError: "
                       r"403 .*gcloud auth application-default login") as unreadable:
      files.local_dir("gs://locked/sd2", root=cache)
  assert first == again == changed and first.startswith(os.path.join(cache, "remote"))
  assert contents(changed) == {os.path.relpath(os.path.join(r, f), tree):
                               open(os.path.join(r, f), "rb").read()
                               for r, _, fs in os.walk(tree) for f in fs}
  assert contents(changed)["config.json"] == b'{"a": 22}' and len(contents(changed)) == 3
  assert os.listdir(os.path.join(cache, "remote")) == [os.path.basename(first)]  # no leftovers
  assert "\n" not in str(missing.value) and "\n" not in str(unreadable.value)
  assert files.local_dir(str(tree)) == str(tree)  # local: unchanged, nothing copied
