"""The KL-VAE against diffusers' PyTorch AutoencoderKL; import of saved diffusers weights; training,
the computed scaling factor, held-out PSNR and the latent cache."""

import json
import os

import flax
import jax
import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import data
from ldm_scaling import runtime
from ldm_scaling.models import convert, cost, offline, text
from ldm_scaling.models import vae as vae_lib
from ldm_scaling.components import vae as vae_component

SMALL = dict(width=32, channel_mult=(1, 2, 2), layers_per_block=1, latent_channels=4,
             norm_groups=16, mid_attention=True)


def _diffusers_vae(width, channel_mult, layers_per_block, latent_channels, norm_groups,
                   mid_attention=True):
  from diffusers import AutoencoderKL
  n = len(channel_mult)
  return AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=tuple(width * m for m in channel_mult), layers_per_block=layers_per_block,
      latent_channels=latent_channels, norm_num_groups=norm_groups,
      mid_block_add_attention=mid_attention)


def _vae_cfg(**kw):
  config = cfglib.base_config()
  config.vae.update(dict(SMALL, **kw))
  return config.vae


def _perturb(ref):
  """Random init leaves GroupNorm at identity and biases at zero; randomise them too so the test
  sees every parameter."""
  import torch
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("mid_attention", [True, False])
def test_matches_diffusers_autoencoderkl(mid_attention):
  import torch
  torch.manual_seed(0)
  ref = _diffusers_vae(**dict(SMALL, mid_attention=mid_attention)).eval()
  _perturb(ref)
  cfg = _vae_cfg(mid_attention=mid_attention)
  module = vae_lib.from_config(cfg)
  params = convert.convert_state_dict(ref.state_dict(), vae_lib.abstract_params(module))
  assert cost.count_params(params) == sum(p.numel() for p in ref.parameters())
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, x)
  dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, z)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    want_dec = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(mean, nhwc(dist.mean), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar, nhwc(dist.logvar), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dec, nhwc(want_dec), atol=1e-4, rtol=1e-4)


def test_sd_vae_layout_has_diffusers_parameter_count():
  import torch
  config = cfglib.base_config()  # vae defaults = SD's KL-f8
  module = vae_lib.from_config(config.vae)
  ours = cost.count_params(vae_lib.abstract_params(module, 64))
  with torch.device("meta"):
    ref = _diffusers_vae(**vae_lib.preset("sd"))
  assert ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
  assert module.down_factor == 8


def test_import_saved_diffusers_vae(tmp_path):
  """diffusers save_pretrained (config.json + safetensors) -> vae.load_diffusers."""
  import torch
  torch.manual_seed(0)
  ref = _diffusers_vae(**SMALL).eval()
  _perturb(ref)
  ref.register_to_config(scaling_factor=0.5)
  ref.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
  cfg = _vae_cfg(weights=str(tmp_path / "pipe"), subfolder="vae")
  loaded = vae_lib.load_diffusers(cfg)
  assert loaded.scaling_factor == 0.5
  x = np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
  np.testing.assert_allclose(loaded.encode_images(x), 0.5 * want.permute(0, 2, 3, 1).numpy(),
                             atol=1e-4, rtol=1e-4)
  # The .safetensors file alone works too; a config override of the scaling factor wins.
  f = str(tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors")
  assert vae_lib.load_diffusers(_vae_cfg(weights=f, scaling_factor=0.25)).scaling_factor == 0.25
  with pytest.raises(cfglib.ConfigError, match="layers_per_block: checkpoint 1 vs config 2"):
    vae_lib.load_diffusers(_vae_cfg(weights=str(tmp_path / "pipe"), layers_per_block=2))
  with pytest.raises(text.WeightsError, match="does not exist"):
    vae_lib.load_diffusers(_vae_cfg(weights=str(tmp_path / "absent"), subfolder="vae"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(text.WeightsError, match="has no diffusion_pytorch_model.safetensors"):
    vae_lib.load_diffusers(_vae_cfg(weights=str(tmp_path / "empty"), subfolder=""))


@pytest.fixture
def trained(offline_components):
  """The session's VAE, trained for a short while on the embedded dataset (the real recipe,
  fewer steps)."""
  o = offline_components
  return o.config, o.vae_dir, o.vae_logs


def test_trained_vae_reconstructs_held_out_images(trained):
  config, directory, _ = trained
  with open(os.path.join(directory, vae_lib.CONFIG)) as f:
    stored = json.load(f)
  vae = vae_lib.load(config)
  assert vae.scaling_factor == stored["scaling_factor"]
  metrics = vae_component.psnr(config, vae, n=256)
  # Baseline: every image replaced by its own mean colour (what a VAE that learnt nothing but
  # colour statistics would give), computed independently here. After this short run (200 steps;
  # the full recipe's numbers are in docs/conditioning.md) the VAE must already beat it, and the
  # reconstruction must be far better than an untrained VAE's.
  it = data.make_pipeline(config, "test", batch_size=256, seed=0, process_index=0,
                          process_count=1, num_epochs=1, tokenizer=None)
  x = (next(it)["images"] + 1) / 2
  base = np.mean((x - x.mean(axis=(1, 2), keepdims=True)) ** 2, axis=(1, 2, 3))
  base_psnr = float(np.mean(10 * np.log10(1 / base)))
  # The untrained VAE gets the trained one's scaling factor (it cancels between encode and
  # decode), so its encode/decode are the same programs with other weights: no new compile.
  init = runtime.run_once(vae.module.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  untrained = vae_lib.VAE(vae.module, flax.linen.unbox(init["params"]), vae.scaling_factor, "init")
  init_psnr = vae_component.psnr(config, untrained, n=256)["psnr"]
  assert metrics["psnr"] > base_psnr + 1.0, (metrics, base_psnr)
  assert metrics["psnr"] > init_psnr + 8.0, (metrics, init_psnr)
  assert stored["ldm_scaling"]["heldout"]["psnr"] == pytest.approx(metrics["psnr"], abs=1e-3)


def test_scaling_factor_gives_unit_variance_latents(trained):
  """Computed from latent statistics, not guessed: an independent batch of scaled posterior
  samples has std ~1."""
  config, _, _ = trained
  vae = vae_lib.load(config)
  it = data.make_pipeline(config, "train", batch_size=512, seed=7, process_index=0,
                          process_count=1, tokenizer=None)
  z = np.asarray(vae.encode_images(next(it)["images"], jax.random.key(3)))
  assert z.shape == (512, 8, 8, 4)
  assert 0.9 < z.std() < 1.1, z.std()


def test_ensure_vae_does_not_retrain_and_checks_the_config(trained):
  config, directory, logs = trained
  assert any("train-vae: done" in line for line in logs)
  again = []
  assert vae_component.ensure(config, log=again.append) == directory and not again
  other = offline.apply(cfglib.base_config())
  other.vae.update(dir=directory, width=64)
  with pytest.raises(cfglib.ConfigError, match="block_out_channels"):
    vae_lib.load(other)
  missing = offline.apply(cfglib.base_config())
  missing.vae.dir = directory + "_absent"
  with pytest.raises(text.WeightsError, match="ldm-scaling train-vae"):
    vae_lib.load(missing)


def test_latent_cache_feeds_the_pipeline(trained, tmp_path):
  config, _, _ = trained
  vae = vae_lib.load(config)
  meta = vae_component.cache_latents(config, vae, str(tmp_path / "lat"), splits=("test",))
  assert meta["counts"] == {"test": 256} and meta["flip"]
  lconf = offline.apply(cfglib.base_config())
  lconf.data.update(name=f"latents:{tmp_path / 'lat'}", eval_split="test", caption_dropout=0.0)
  experiment.validate(lconf)
  batch = next(data.make_pipeline(lconf, "test", batch_size=256, seed=0, process_index=0,
                                  process_count=1, num_epochs=1))
  assert batch["latents"].shape == (256, 8, 8, 4) and batch["tokens"].shape == (256, 32)
  # Equal (up to float16 storage and sampling noise) to encoding the images directly.
  imgs = next(data.make_pipeline(config, "test", batch_size=256, seed=0, process_index=0,
                                 process_count=1, num_epochs=1, tokenizer=None))
  assert list(batch["captions"]) == list(imgs["captions"])
  direct = np.asarray(vae.encode_images(imgs["images"]))
  err = np.abs(batch["latents"] - direct).mean() / np.abs(direct).mean()
  assert err < 0.2, err


def test_vae_params_have_logical_axes():
  module = vae_lib.from_config(_vae_cfg())
  boxed = vae_lib.abstract_params(module)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert leaves and all(isinstance(x, flax.linen.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
