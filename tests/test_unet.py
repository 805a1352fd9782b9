"""The width-parameterised SD-2.x UNet against diffusers' PyTorch UNet2DConditionModel."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling import models
from ldm_scaling import runtime
from ldm_scaling import sharding
from ldm_scaling.errors import ConfigError
from ldm_scaling.models import convert, cost, unet

from conftest import tiny_config


def _inputs(batch=2, size=16, ctx_dim=24, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(batch, size, size, 4).astype(np.float32)
  t = np.array([10.0, 500.0][:batch], np.float32)
  ctx = rng.randn(batch, 7, ctx_dim).astype(np.float32)
  return x, t, ctx


def _two_level_config():
  """A two-level UNet with one block per level: every layer kind (ResNet, self- and cross-
  attention, down/up sampling, mid block) in a graph that compiles in seconds, for the properties
  that do not depend on the topology."""
  config = tiny_config()
  config.model.update(channel_mult=(1, 2), attn_levels=(True, False), layers_per_block=1)
  return config


def _init(model, key, *inputs):
  return runtime.run_once(model.init, jax.random.key(key), *inputs)


def _diffusers_sd2(width, heads, cross_attn_dim=1024, **kw):
  """diffusers' SD-2.x UNet config at a given width (diffusers' ``attention_head_dim`` is the
  number of heads per level in this legacy config)."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  return UNet2DConditionModel(
      block_out_channels=tuple(width * m for m in (1, 2, 4, 4)), layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      cross_attention_dim=cross_attn_dim, attention_head_dim=heads, use_linear_projection=True,
      norm_num_groups=32, **kw)


def _two_level_forward():
  """(config, variables, inputs, f32 output) of the two-level UNet."""
  config = _two_level_config()
  model = models.build(config.model)
  x, t, ctx = _inputs()
  variables = _init(model, 0, x, t, ctx)
  return config, variables, (x, t, ctx), jax.jit(model.apply)(variables, x, t, ctx)


def test_forward_shapes():
  config, variables, (x, t, ctx), y = _two_level_forward()
  model = models.build(config.model)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y)))
  # A scalar timestep broadcasts over the batch.
  y0 = jax.jit(model.apply)(variables, x, 10.0, ctx)
  np.testing.assert_allclose(np.asarray(y0)[0], np.asarray(y)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two more UNet compiles (~10 s cold)
def test_bfloat16_compute_keeps_f32_master_weights():
  config, variables, (x, t, ctx), y = _two_level_forward()
  config.model.dtype = "bfloat16"
  model16 = models.build(config.model)
  y16 = jax.jit(model16.apply)(variables, x, t, ctx)
  assert y16.dtype == jnp.bfloat16
  params = flax.linen.unbox(variables["params"])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # f32 master weights
  # bf16 compute tracks the f32 result (loose: bf16 has 8 mantissa bits).
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y)).mean() / np.abs(np.asarray(y)).mean()
  assert err < 0.05


def test_every_parameter_has_logical_axes():
  config = tiny_config()
  model = models.build(config.model)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_inputs())["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert leaves
  known = {name for name, _ in sharding.LOGICAL_RULES}
  for leaf in leaves:
    assert isinstance(leaf, flax.linen.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
    assert set(leaf.names) <= known, leaf.names
  specs = flax.linen.get_partition_spec(boxed)
  assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) \
      == len(leaves)


# Fixed head width (the paper's) in the fast tier; a fixed head count in the full suite.
@pytest.mark.parametrize("num_heads", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_matches_diffusers_pytorch_unet(num_heads):
  """Our forward equals diffusers' PyTorch UNet2DConditionModel with the same weights, moved
  over by the rename table alone."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = tiny_config()
  config.model.num_heads = num_heads
  model = models.build(config.model)
  heads = tuple(model.heads(32 * m)[0] for m in (1, 2, 4, 4))
  ref = _diffusers_sd2(32, heads, cross_attn_dim=24, sample_size=16).eval()
  x, t, ctx = _inputs()
  template = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]
  params = convert.convert_state_dict(ref.state_dict(), template)
  assert cost.count_params(params) == sum(p.numel() for p in ref.parameters())
  y = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx))
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
               torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-4)


def test_conversion_reports_mismatches():
  import torch  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  model = models.build(config.model)
  template = jax.eval_shape(model.init, jax.random.key(0), *_inputs())["params"]
  state = _diffusers_sd2(32, (2, 4, 8, 8), cross_attn_dim=24).state_dict()
  state["extra.weight"] = torch.zeros(3)
  del state["conv_in.bias"]
  state["conv_out.weight"] = torch.zeros(4, 32, 5, 5)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict(state, template)
  msg = str(e.value)
  assert "conv_out.weight: (5, 5, 32, 4) vs (3, 3, 32, 4)" in msg
  assert "extra.weight" in msg and "conv_in/bias" in msg


def test_chunked_attention_equals_dense_attention_and_its_gradient():
  """The query-chunked attention (lax.map + remat) against jax.nn.dot_product_attention."""
  from ldm_scaling.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 64, 3, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 64, 3, 8)), jnp.float32) for _ in range(2))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  ref = jax.nn.dot_product_attention
  for chunk in (0, 16, 32):
    got = lambda q, k, v, c=chunk: layers.attention(q, k, v, c)
    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.grad(loss(got), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  assert layers.query_chunk_for(0, 1024) == 0
  assert layers.query_chunk_for(128, 1024) == 128
  assert layers.query_chunk_for(128, 128) == 0    # one chunk: nothing to split
  assert layers.query_chunk_for(96, 1000) == 0    # does not divide: dense
  assert layers.query_chunk_for(-1, 1024) == (128 if jax.default_backend() == "cpu" else 0)


def test_split_weight_grad_conv_equals_lax_conv_and_its_gradients(monkeypatch):
  """layers.conv_general_dilated (weight gradient summed over batch pieces on CPU) against
  lax.conv_general_dilated: same forward values and input gradient, weight gradient equal up to
  summation order, in f32 and bf16; and which shapes take the split."""
  from ldm_scaling.models import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # the rule is a CPU rule
  monkeypatch.setattr(layers, "CPU_SPLIT_WEIGHT_GRAD_MIN_PIXELS", 64)
  assert layers.split_weight_grad_pieces((6, 8, 8, 32), (3, 3, 32, 48)) == 6
  assert layers.split_weight_grad_pieces((12, 8, 8, 32), (3, 3, 32, 48)) == 6  # divides, <= 8
  assert layers.split_weight_grad_pieces((7, 8, 8, 32), (3, 3, 32, 48)) == 7
  assert layers.split_weight_grad_pieces((6, 8, 8, 32), (1, 1, 32, 48)) == 1  # 1x1: a matmul
  assert layers.split_weight_grad_pieces((6, 4, 8, 32), (3, 3, 32, 48)) == 1  # too few pixels
  assert layers.split_weight_grad_pieces((6, 8, 8, 32), (3, 3, 32, 4)) == 1   # too few channels
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 8, 8, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 32, 48)) / 17, jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  pad = ((1, 1), (1, 1))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn)
  got = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn)
  assert "custom_vjp" in str(jax.make_jaxpr(got)(x, w))       # the split path is taken
  assert "custom_vjp" not in str(jax.make_jaxpr(  # strided: XLA's own gradient
      lambda x, w: layers.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=dn))(x, w))
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    xd, wd = x.astype(dtype), w.astype(dtype)
    np.testing.assert_array_equal(jax.jit(got)(xd, wd), jax.jit(ref)(xd, wd))
    loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w).astype(jnp.float32)))
    (gx, gw), (rx, rw) = (jax.jit(jax.grad(loss(fn), (0, 1)))(xd, wd) for fn in (got, ref))
    assert gw.dtype == dtype
    np.testing.assert_array_equal(gx, rx)
    np.testing.assert_allclose(np.float32(gw), np.float32(rw), rtol=tol,
                               atol=tol * float(jnp.abs(rw.astype(jnp.float32)).max()))


@pytest.mark.slow  # compiles the UNet twice (~15-25 s); the fast tier builds it in other tests
def test_attention_chunking_changes_neither_outputs_nor_cost():
  config = _two_level_config()
  x, t, ctx = _inputs()
  outs = []
  for chunk in (0, 64):
    config.model.attn_query_chunk = chunk
    model = models.build(config.model)
    params = _init(model, 0, x, t, ctx)
    outs.append(jax.jit(model.apply)(params, x, t, ctx))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  config.model.attn_query_chunk = 0
  dense = cost.measure(config.model, config.cost)
  config.model.attn_query_chunk = 64
  assert cost.measure(config.model, config.cost) == dense


@pytest.mark.slow  # compiles the UNet twice (~15-25 s); the fast tier builds it in other tests
def test_remat_changes_nothing_numerically():
  config = _two_level_config()
  x, t, ctx = _inputs()
  plain = models.build(config.model)
  config.model.remat = "block"
  remat = models.build(config.model)
  variables = _init(plain, 1, x, t, ctx)
  params = variables["params"]

  def loss(module):
    return lambda p: jnp.mean(module.apply({"params": p}, x, t, ctx) ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(loss(plain)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(flax.linen.unbox(g0)), jax.tree.leaves(flax.linen.unbox(g1))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # compiles the UNet twice (~15-25 s); the fast tier builds it in other tests
def test_dropout_is_active_only_in_training():
  config = _two_level_config()
  config.model.dropout = 0.5
  model = models.build(config.model)
  x, t, ctx = _inputs()
  variables = _init(model, 0, x, t, ctx)
  train = jax.jit(lambda v, key: model.apply(v, x, t, ctx, train=True, rngs={"dropout": key}))
  infer = jax.jit(lambda v: model.apply(v, x, t, ctx))
  a, b = train(variables, jax.random.key(1)), train(variables, jax.random.key(2))
  c, d = infer(variables), infer(variables)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(c, d)


# The fast tier counts the smallest, the reference (320) and the largest width; the full suite
# every width of Table 1 (each traces a full-size UNet: ~5 s unless already measured).
@pytest.mark.parametrize("width", [
    w if w in (64, 320, 768) else pytest.param(w, marks=pytest.mark.slow)
    for w in sorted(cost.PAPER_TABLE1)])
def test_param_count_equals_diffusers_at_every_paper_width(width):
  """Counted on abstract shapes (cached per config: the full suite's `cost --json` test has
  measured every width by now); diffusers' model is built on torch's meta device (no memory)."""
  import torch  # pylint: disable=g-import-not-at-top
  config = cfglib.base_config()
  config.model.update(unet.preset(width))
  ours = cost.measure(config.model, config.cost)[0]  # the count `ldm-scaling cost` reports
  heads = (8,) * 4 if config.model.num_heads else tuple(width * m // 64 for m in (1, 2, 4, 4))
  with torch.device("meta"):
    ref = _diffusers_sd2(width, heads)
  assert ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("update,match", [
    (dict(width=48), "level width 48 is not divisible by model.norm_groups=32"),
    (dict(width=96, head_dim=64, num_heads=0), "attention width 96 is not a multiple"),
    (dict(width=96, num_heads=5), "not divisible by model.num_heads=5"),
    (dict(channel_mult=(1, 2)), "attn_levels has 4 entries but channel_mult has 2"),
    (dict(dtype="float8x"), "unknown dtype"),
    (dict(attn_query_chunk=-2), "attn_query_chunk must be -1 \\(auto\\), 0 \\(dense\\)"),
    (dict(name="dit"), "unknown model.name 'dit'; available: unet"),
])
def test_bad_model_configs(update, match):
  config = cfglib.base_config()
  config.model.update(update)
  with pytest.raises(ConfigError, match=match):
    models.build(config.model)
