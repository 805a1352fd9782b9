"""The sample API on a tiny UNet and the ``ldm-scaling sample`` command."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_scaling import cli
from ldm_scaling import diffusion
from ldm_scaling.diffusion import generate

from conftest import tiny_config

T2I = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "t2i.py")
TINY = [f"--config={T2I}:width=32,resolution=64", "--config.model.num_heads=0",
        "--config.model.head_dim=16", "--config.model.cross_attn_dim=24"]  # 8x8 latents
# Two levels, one block each: every layer kind, compiled in seconds.
TWO_LEVEL = TINY + ["--config.model.channel_mult=(1,2)", "--config.model.attn_levels=(True,False)",
                    "--config.model.layers_per_block=1"]


@pytest.fixture(scope="module")
def tiny_unet():
  config = tiny_config()
  # Two levels, one block each: every layer kind, compiled in seconds (the API does not depend on
  # the topology).
  config.model.update(channel_mult=(1, 2), attn_levels=(True, False), layers_per_block=1)
  apply_fn, params = generate.random_init(config, seed=0)
  return config, apply_fn, params


def test_sample_api_on_a_unet_prices_each_sample(tiny_unet):
  config, apply_fn, params = tiny_unet
  rng = np.random.RandomState(0)
  # The shapes `ldm-scaling sample` uses below (8x8 latents, 77 tokens, batch 2): one compile.
  noise = rng.randn(2, 8, 8, 4).astype(np.float32)
  ctx = rng.randn(2, 77, 24).astype(np.float32)
  uncond = np.zeros((77, 24), np.float32)
  kw = dict(key=jax.random.key(0), uncond_context=uncond, sampler="dpm++", steps=3,
            norm_cost=0.25)
  messages = []
  out = diffusion.sample(config, apply_fn, params, noise, ctx, cfg_scale=[1.0, 7.5],
                         log=messages.append, **kw)
  assert out.compile_s > 0 and messages[0].startswith("compiling the sampler program")
  assert messages[1].startswith("compiled in")
  assert out.x.shape == (2, 8, 8, 4) and np.all(np.isfinite(np.asarray(out.x)))
  assert out.sampler == "dpm++" and out.steps == 3
  # Paper convention: a guided step counts once -> norm cost x steps for every sample.
  np.testing.assert_allclose(out.cost, [0.75, 0.75])
  config.cost.count_uncond_pass = True
  out2 = diffusion.sample(config, apply_fn, params, noise, ctx, cfg_scale=[1.0, 7.5], **kw)
  np.testing.assert_allclose(out2.cost, [0.75, 1.5])
  assert out2.compile_s == 0.0  # same program and shapes: compiled once
  np.testing.assert_array_equal(np.asarray(out2.x), np.asarray(out.x))
  # The scale-1 sample equals the unguided program's sample (on the same UNet).
  alone = diffusion.sample(config, apply_fn, params, noise[:1], ctx[:1], cfg_scale=None, **kw)
  np.testing.assert_allclose(np.asarray(alone.x)[0], np.asarray(out.x)[0], atol=1e-4)
  np.testing.assert_allclose(alone.cost, [0.75])
  # Defaults come from the config's eval section.
  config.eval.samplers, config.eval.steps = ("dpm++",), (3,)
  default = diffusion.sample(config, apply_fn, params, noise, ctx, key=jax.random.key(0),
                             uncond_context=uncond, cfg_scale=3.0, norm_cost=1.0)
  assert (default.sampler, default.steps) == ("dpm++", 3)
  assert default.compile_s == 0.0
  np.testing.assert_allclose(default.cost, [6.0, 6.0])  # 1.0 x 3 steps x 2 passes


def test_random_conditioning_and_latent_preview_are_deterministic_and_labelled():
  cond = generate.random_conditioning(7, 5)
  a, b = cond.encode(["a cat", "a dog"]), cond.encode(["a cat"])
  assert a.shape == (2, 7, 5) and a.dtype == np.float32
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[0], a[1])
  assert "RANDOM" in cond.label and "no text encoder loaded" in cond.label
  dec = generate.latent_preview()
  lat = np.random.RandomState(0).randn(2, 4, 4, 4).astype(np.float32)
  img = dec.decode(lat)
  assert img.shape == (2, 4, 4, 3) and img.dtype == np.uint8
  assert img.min() == 0 and img.max() == 255
  assert dec.label == "latents (no VAE loaded)"


@pytest.mark.slow  # samples twice through the CLI (~30 s); the fast tier samples through the API
def test_sample_command_writes_a_labelled_png_grid(tmp_path, capsys):
  out = tmp_path / "grid.png"
  argv = ["sample", *TWO_LEVEL, "--prompt", "a red circle", "--prompt", "a blue square",
          "--prompt", "a green triangle", "--cfg-scale", "1,5", "--sampler", "dpm++",
          "--steps", "3", "--seed", "3", "--batch-size", "2", "--out", str(out)]
  assert cli.main(argv) == 0
  captured = capsys.readouterr()
  summary = json.loads(captured.out.strip().splitlines()[-1])
  assert summary["images"] == 6 and summary["sampler"] == "dpm++" and summary["steps"] == 3
  assert summary["decoder"] == "latents (no VAE loaded)"
  assert "RANDOM" in summary["conditioning"] and "random-init" in summary["model"]
  n = summary["norm_cost"]
  assert summary["sampling_cost"] == {"1": pytest.approx(3 * n), "5": pytest.approx(3 * n)}
  log = captured.err
  assert "batch 3/3" in log and "ETA" in log
  assert "sampled 6 images" in log and "latents (no VAE loaded)" in log
  image = Image.open(out)
  assert image.mode == "RGB" and image.size[0] > 2 * 96 and image.size[1] > 3 * 96
  # Same seed, same images.
  out2 = tmp_path / "again.png"
  assert cli.main(argv[:-1] + [str(out2)]) == 0
  np.testing.assert_array_equal(np.asarray(Image.open(out2)), np.asarray(image))


@pytest.mark.parametrize("extra,match", [
    (["--checkpoint", "/tmp/no_such_run"], "is not a training workdir (no config.json)"),
    (["--sampler", "heun"], "unknown sampler 'heun'"),
    (["--steps", "0"], "sampling steps must be a positive integer, got 0"),
    (["--cfg-scale", "high"], "expected numbers like 7.5"),
    (["--latent-size", "12"], "latent size 12 must be a positive multiple of 8"),
])
def test_sample_command_bad_input(extra, match, capsys, tmp_path):
  rc = cli.main(["sample", *TINY, "--out", str(tmp_path / "x.png"), *extra])
  assert rc == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()


def test_sample_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["sample", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--prompt", "--sampler", "--steps", "--cfg-scale", "--seed", "--out",
               "--checkpoint"):
    assert flag in out
