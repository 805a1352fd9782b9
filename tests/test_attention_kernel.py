"""Splash attention (``model.attn_kernel=splash``): the Pallas TPU kernel equals the project's dense
attention in values and gradients (run here by Pallas' interpreter), a UNet with it computes what
the XLA path computes, and for TPU it compiles per shard without holding the logits."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_scaling import sharding as sh
from ldm_scaling.models import layers


def _qkv(b=2, t=512, n=2, h=64, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))


def _grads(fn, q, k, v):
  weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))  # a loss that is not symmetric
  return jax.grad(lambda q, k, v: (fn(q, k, v) * weights).sum(), argnums=(0, 1, 2))(q, k, v)


def test_splash_equals_dense_attention_values_and_gradients():
  q, k, v = _qkv()
  splash = lambda q, k, v: layers.splash_attention(q, k, v, interpret=True)
  np.testing.assert_allclose(splash(q, k, v), layers.attention(q, k, v), atol=1e-5, rtol=1e-5)
  for got, want in zip(_grads(splash, q, k, v), _grads(layers.attention, q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splash_under_a_mesh_runs_per_shard_and_counts_its_flops():
  """Under ``jax.set_mesh`` and the logical rules the kernel runs in ``shard_map`` (here a one-
  device mesh: the same values); its dense-equivalent FLOPs are collected for plans."""
  q, k, v = _qkv(b=2, t=1024, n=1)
  mesh = sh.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES), \
       layers.counting_kernel_flops() as flops:
    got = jax.jit(lambda q, k, v: layers.splash_attention(q, k, v, interpret=True))(q, k, v)
  np.testing.assert_allclose(got, layers.attention(q, k, v), atol=1e-5, rtol=1e-5)
  assert flops[0] == 4 * 2 * 1 * 1024 * 1024 * 64


def test_which_attention_runs_where():
  assert [layers.splash_block(t) for t in (256, 512, 640, 1024, 4096, 4100)] == [
      0, 512, 128, 512, 512, 0]
  assert not layers.uses_splash("splash", 4096)       # on CPU: the XLA path ...
  with layers.building_for("tpu"):                    # ... on TPU the kernel
    assert layers.uses_splash("splash", 4096) and not layers.uses_splash("xla", 4096)
    assert not layers.uses_splash("splash", 256)      # short: dense
  with layers.splash_interpret():
    assert layers.uses_splash("splash", 1024)
  with pytest.raises(ValueError, match="self-attention"):
    layers.splash_attention(*_qkv(t=256), interpret=True)


@pytest.mark.slow
def test_unet_with_splash_equals_the_xla_path():
  """A one-level UNet with attention at 32x32 latents (1,024 tokens): ``attn_kernel=splash`` (the
  kernel, interpreted) against ``xla`` (dense), same parameters, forward and parameter gradient."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(width=32).model
  cfg.update(channel_mult=(1,), attn_levels=(True,), layers_per_block=1, num_heads=0, head_dim=32,
             cross_attn_dim=16, attn_query_chunk=0)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 4)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  xla_net = unet.from_config(cfg)
  params = xla_net.init(jax.random.key(0), x, jnp.array([3, 500]), ctx)
  cfg.attn_kernel = "splash"
  splash_net = unet.from_config(cfg)
  loss = lambda net: lambda p: (net.apply(p, x, jnp.array([3, 500]), ctx) ** 2).mean()
  want, want_g = jax.value_and_grad(loss(xla_net))(params)
  with layers.splash_interpret(), layers.counting_kernel_flops() as flops:
    got, got_g = jax.value_and_grad(loss(splash_net))(params)
  assert flops[0] > 0  # the kernel ran (self-attention at 1,024 tokens; cross-attention dense)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=2e-4)


@pytest.mark.slow
def test_splash_compiles_for_tpu_per_shard_without_the_logits():
  """The gradient of self-attention at 4,096 tokens (8 examples, 5 heads of 64, bf16) compiled for
  a 4-chip v5e slice with the batch over fsdp = 4: dense holds the (heads x 4096 x 4096) logits
  and probabilities, splash only its blocks; splash gathers nothing (it runs per shard)."""
  from ldm_scaling.launch import plan as plan_lib  # pylint: disable=g-import-not-at-top
  devices = plan_lib.tpu_devices(plan_lib.parse_topology("v5e-4"))
  mesh = sh.make_mesh(dict(data=1, fsdp=4, tensor=1), devices)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  arg = jax.ShapeDtypeStruct((8, 4096, 5, 64), jnp.bfloat16, sharding=spec)
  temp = {}
  for name, fn in (("dense", layers.attention), ("splash", layers.splash_attention)):
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: (fn(q, k, v).astype(jnp.float32) ** 2).sum(),
                            argnums=(0, 1, 2)))
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES), \
         layers.building_for("tpu"):
      compiled = grad.lower(arg, arg, arg).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
    if name == "splash":
      assert "all-gather" not in plan_lib.collectives(compiled.as_text())
  logits = 2 * 5 * 4096 * 4096 * 4   # one example's logits per chip, f32
  assert temp["dense"] > logits > 100 * temp["splash"], temp
