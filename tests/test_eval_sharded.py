"""Evaluation at scale: the UNet sharded over the local devices, bf16 weights, cells split over
processes.

The device checks run in one subprocess (8 fake CPU devices need XLA_FLAGS before JAX starts). A
real InceptionV3 FID there costs ~35 s more (the network's compile on a loaded 2-core machine),
over this file's budget, so the check compares what FID is a function of: the sampled latents and
the uint8 images, against the same UNet sampled on one device. A two-process eval job is not run
here either (minutes; run by hand, see docs/eval.md); the split of the cells is tested in-process.
"""

import json
import os
import subprocess
import sys

from flax import traverse_util
import jax
import numpy as np
import pytest

from ldm_scaling import sharding as sh
from ldm_scaling.diffusion import generate
from ldm_scaling.errors import ConfigError
from ldm_scaling.eval import grid, parallel

from conftest import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))

_SHARDED = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from flax import traverse_util
from ldm_scaling import models, runtime
runtime.configure_jax()
from ldm_scaling.diffusion import generate
from ldm_scaling.eval import parallel
from conftest import tiny_config
assert jax.local_device_count() == 8, jax.local_devices()
config = tiny_config()
config.model.update(channel_mult=(1, 2), attn_levels=(True, False), layers_per_block=1)
apply_fn = generate.unet_apply(models.build(config.model))
params = traverse_util.unflatten_dict(dict(np.load(sys.argv[3])), sep="/")
total = sum(x.nbytes for x in jax.tree.leaves(params))
kw = dict(apply_fn=apply_fn, sampler="ddim", steps=2, cfg_scales=[1.0, 3.0], seed=0,
          batch_size=8, latent_size=8, norm_cost=1.0, log=lambda _: None,
          conditioning=generate.random_conditioning(config.text.max_length,
                                                    config.model.cross_attn_dim),
          decoding=generate.latent_preview())
prompts = ["a", "b", "c"]  # 6 images: padded to 8 rows on 8 devices, the pad dropped
one = generate.generate(config, prompts, **kw,
                        params=generate.place_unet(config, params, parallel.model_mesh(1)))
mesh = parallel.model_mesh()
sharded = generate.place_unet(config, params, mesh)
per_device = parallel.bytes_per_device(sharded)
# What the shardings promise, leaf by leaf: its bytes over the devices its spec splits it on.
expected = 0
for leaf in jax.tree.leaves(sharded):
  axes = [a for names in leaf.sharding.spec if names
          for a in ((names,) if isinstance(names, str) else names)]
  expected += leaf.nbytes // int(np.prod([mesh.shape[a] for a in axes]))
eight = generate.generate(config, prompts, params=sharded, **kw)
bf16 = generate.place_unet(config, params, parallel.model_mesh(1), "bfloat16")
half = sum(x.nbytes for x in jax.tree.leaves(bf16))
bf16_out = generate.generate(config, prompts, params=bf16, **kw)
np.savez(sys.argv[2], one_latents=one.latents, one_images=one.images,
         eight_latents=eight.latents, eight_images=eight.images, bf16_latents=bf16_out.latents)
print("RESULT" + json.dumps(dict(
    total=total, per_device=sorted(int(v) for v in per_device.values()), expected=int(expected),
    bf16_bytes=int(half),
    bf16_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(bf16)}),
    shard_devices=len(jax.tree.leaves(sharded)[-1].sharding.device_set))))
"""


def test_unet_sharded_over_8_devices_and_bf16(tmp_path):
  """An EMA that does not fit one device's budget (here: half the EMA's bytes) is sampled sharded
  FSDP-style over 8 fake devices: each device holds ~1/8 of it (< budget / 2), and the samples --
  hence the FID, a function of the images alone -- equal the unsharded one-device samples.

  ``eval.param_dtype=bfloat16`` halves the bytes and moves the samples by about bf16's
  rounding: each weight is off by <= 2^-9 relative, so each layer's output by about that much,
  accumulating over the UNet's layers and 2 sampler steps. Measured: RMS difference 0.16% of the
  samples' RMS (2^-9 = 0.2%); the bound, 2%, leaves a factor 10 for that accumulation."""
  # The UNet is initialised here, on one device, where its compiled init is shared with the
  # other tests through the persistent cache (8 devices would compile it again).
  config = tiny_config()
  config.model.update(channel_mult=(1, 2), attn_levels=(True, False), layers_per_block=1)
  _, params = generate.random_init(config, 0)
  flat = traverse_util.flatten_dict(sh.unbox(params), sep="/")
  np.savez(tmp_path / "params.npz", **{k: np.asarray(v) for k, v in flat.items()})
  script = tmp_path / "sharded.py"
  script.write_text(_SHARDED)
  out = tmp_path / "samples.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(script), HERE, str(out), tmp_path / "params.npz"],
                          capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.split("RESULT")[1])
  # The fake devices' memory budget: half the EMA, so by construction one device cannot hold it.
  budget = r["total"] // 2
  assert len(r["per_device"]) == r["shard_devices"] == 8
  assert max(r["per_device"]) < budget // 2  # every device holds < 1/4 of the EMA
  # ~1/8 of the EMA per device: the split weights exactly as the shardings say, plus the small
  # replicated leaves (norms, biases, the 4-channel input conv).
  assert r["per_device"] == [r["expected"]] * 8
  assert r["total"] / 8 <= r["expected"] < 1.2 * r["total"] / 8
  s = np.load(out)
  assert s["eight_images"].shape == s["one_images"].shape == (6, 8, 8, 3)
  np.testing.assert_allclose(s["eight_latents"], s["one_latents"], atol=1e-4)
  # One uint8 level at most (measured: identical).
  assert np.abs(s["eight_images"].astype(int) - s["one_images"]).max() <= 1

  assert r["bf16_dtypes"] == ["bfloat16"]
  assert 2 * r["bf16_bytes"] == r["total"]
  a, b = s["one_latents"], s["bf16_latents"]
  assert np.all(np.isfinite(b))
  rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a ** 2))
  print(f"bf16 vs f32 weights: RMS difference {rel:.2e} of the samples' RMS")
  assert 0 < rel < 0.02


def test_one_device_placement_keeps_parameters_as_they_are():
  """On one device nothing is resharded or copied (the sampler sees today's arrays); a cast
  happens on the host; an unknown dtype is refused."""
  config = tiny_config()
  params = {"dense": {"kernel": jax.device_put(np.arange(6, dtype=np.float32).reshape(2, 3)),
                      "count": jax.device_put(np.arange(3, dtype=np.int32))}}
  mesh = parallel.model_mesh(1)
  placed = generate.place_unet(config, params, mesh)
  assert all(p is q for p, q in zip(jax.tree.leaves(placed), jax.tree.leaves(params)))
  half = generate.place_unet(config, params, mesh, "bfloat16")
  assert half["dense"]["kernel"].dtype == jax.numpy.bfloat16
  assert half["dense"]["count"].dtype == np.int32  # only floating leaves are cast
  np.testing.assert_array_equal(np.asarray(half["dense"]["kernel"], np.float32),
                                np.asarray(params["dense"]["kernel"]))
  with pytest.raises(ConfigError, match="eval.param_dtype must be one of float32, bfloat16"):
    generate.place_unet(config, params, mesh, "float16")


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_cells_split_over_processes_disjoint_and_balanced(count):
  """Every cell is evaluated by exactly one process; shares differ by at most one cell and every
  process gets cells of each step count (interleaved plan)."""
  plan = [(s, w) for s in (2, 4, 8, 16) for w in range(5)]  # (steps, cfg) in plan order
  shares = [grid.shard_plan(plan, i, count) for i in range(count)]
  flat = [c for share in shares for c in share]
  assert sorted(flat) == sorted(plan) and len(flat) == len(set(flat))
  sizes = [len(s) for s in shares]
  assert max(sizes) - min(sizes) <= 1
  if count <= 5:
    assert all({s for s, _ in share} == {2, 4, 8, 16} for share in shares)
  with pytest.raises(ConfigError, match="need 0 <= index < count"):
    grid.shard_plan(plan, count, count)


def test_default_shard_is_this_process_of_the_job(monkeypatch):
  assert grid.default_shard() == (0, 1)
  monkeypatch.setattr(jax, "process_index", lambda: 3)
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  assert grid.default_shard() == (3, 4)


def test_param_dtype_enters_the_cell_key_only_when_not_the_default():
  config = tiny_config()
  ids = dict(checkpoint_id={"step": 1}, reference={"n": 2}, components={})
  default = grid.cell_settings(config, config.eval, **ids)
  assert "param_dtype" not in default["eval"]  # rows made before the key existed stay done
  config.eval.param_dtype = "bfloat16"
  bf16 = grid.cell_settings(config, config.eval, **ids)
  assert bf16["eval"]["param_dtype"] == "bfloat16"
  assert grid.cell_key(bf16) != grid.cell_key(default)
