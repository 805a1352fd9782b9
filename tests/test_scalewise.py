"""Scale-wise distillation's pure parts against installed references.

Resizes against torch's ``F.interpolate``; the ``swd`` sampler against diffusers'
``FlowMatchLCMScheduler(scale_factors=...)`` driven by the exact Gaussian denoiser
(tests/diffusion_refs.py, which runs at any latent size) with the same injected noise; presets
against diffusers' flow grid; the losses against torch implementations of their formulas.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_scaling.diffusion import sampling, scalewise
from ldm_scaling.diffusion.samplers import Options, build_grid
from ldm_scaling.diffusion.schedules import Schedule
from ldm_scaling.errors import ConfigError

from conftest import SMALL_TEACHER_STEPS
import diffusion_refs as refs

SIDES = (4, 8, 12, 16)


def _torch_resize(x, size, mode):
  """NHWC numpy -> torch F.interpolate(NCHW, align_corners=False / area) -> NHWC numpy."""
  t = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
  kw = {} if mode == "area" else dict(align_corners=False)
  out = torch.nn.functional.interpolate(t, size=size, mode=mode, **kw)
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_resize_equals_torch_for_every_scale_pair(mode):
  rng = np.random.RandomState(0)
  pairs = list(itertools.product(SIDES, SIDES)) + [(5, 7), (7, 3), (9, 16), (16, 9)]
  for a, b in pairs:
    x = rng.randn(2, a, a, 3).astype(np.float32)
    got = np.asarray(scalewise.resize(jnp.asarray(x), b, mode))
    np.testing.assert_allclose(got, _torch_resize(x, (b, b), mode), atol=1e-5, rtol=1e-5,
                               err_msg=f"{mode} {a}->{b}")
  x = rng.randn(1, 6, 10, 2).astype(np.float32)  # non-square, both axes
  np.testing.assert_allclose(np.asarray(scalewise.resize(jnp.asarray(x), (9, 4), mode)),
                             _torch_resize(x, (9, 4), mode), atol=1e-5, rtol=1e-5)


def test_resize_is_not_jax_image_resize():
  # Why the module exists: jax's cubic kernel (A = -0.5, edge renormalisation) differs.
  x = np.random.RandomState(1).randn(1, 8, 8, 1).astype(np.float32)
  ours = np.asarray(scalewise.resize(jnp.asarray(x), 12))
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (1, 12, 12, 1), "bicubic"))
  assert np.max(np.abs(ours - theirs)) > 1e-2


def test_presets_are_diffusers_flow_grid_points():
  import diffusers  # pylint: disable=g-import-not-at-top
  ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  ref.set_timesteps(28)
  sig = ref.sigmas.numpy()
  for name, idx in (("sd35_4", (0, 7, 14, 18)), ("sd35_6", (0, 4, 7, 12, 14, 18))):
    scales, sigmas = scalewise.PRESETS[name]
    np.testing.assert_allclose(sigmas, sig[list(idx)], atol=1e-6)
    scalewise.check(scales, sigmas, latent_size=128, down_factor=8)
  # The published values (swd_facts.md, 4 decimals) and the cost "about two full steps".
  np.testing.assert_allclose(scalewise.PRESETS["sd35_4"][1], (1, .8959, .7371, .6022), atol=1e-4)
  want = (64 ** 2 + 80 ** 2 + 96 ** 2 + 128 ** 2) / 128 ** 2  # 2.20
  assert scalewise.relative_cost(scalewise.PRESETS["sd35_4"][0]) == pytest.approx(want)
  assert scalewise.relative_cost(scalewise.PRESETS["sd35_6"][0]) == pytest.approx(2.40625)


def _diffusers_swd(schedule, scales, sigmas, x_start, ctx, uncond, w, step_noise):
  """diffusers' FlowMatchLCMScheduler with scale factors, over the same model function (NCHW
  inside the scheduler, as its pipelines run it); ``randn_tensor`` patched to ``step_noise(i)``."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from diffusers.schedulers import scheduling_flow_match_lcm as lcm_mod  # pylint: disable=all
  apply_fn = jax.jit(refs.analytic_apply(schedule, "flow"))
  factors = [s / scales[0] for s in scales[1:]]
  sched = diffusers.FlowMatchLCMScheduler(shift=1.0, scale_factors=factors,
                                          upscale_mode="bicubic")
  sched.set_timesteps(sigmas=list(sigmas))
  x = torch.from_numpy(np.ascontiguousarray(x_start.transpose(0, 3, 1, 2)))
  wt = torch.from_numpy(w)[:, None, None, None]
  current = {}
  original = lcm_mod.randn_tensor
  lcm_mod.randn_tensor = lambda shape, **k: current["noise"]
  try:
    for i, t in enumerate(sched.timesteps):
      tt = np.full((x.shape[0],), float(t), np.float32)
      xh = x.numpy().transpose(0, 2, 3, 1)
      out_c = np.asarray(apply_fn(None, xh, tt, ctx))
      out_u = np.asarray(apply_fn(None, xh, tt, np.broadcast_to(uncond, ctx.shape)))
      out = torch.from_numpy(np.ascontiguousarray((out_c).transpose(0, 3, 1, 2)))
      out_u = torch.from_numpy(np.ascontiguousarray(out_u.transpose(0, 3, 1, 2)))
      out = out_u + wt * (out - out_u)
      nxt = scales[min(i + 1, len(scales) - 1)]
      current["noise"] = torch.from_numpy(
          np.ascontiguousarray(step_noise(i, nxt).transpose(0, 3, 1, 2)))
      x = sched.step(out, t, x).prev_sample
  finally:
    lcm_mod.randn_tensor = original
  return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("scales", [(4, 8, 12, 16), (8, 12, 16), (16, 16, 16), (8, 16)])
def test_swd_sampler_equals_diffusers_flow_match_lcm(scales):
  schedule = Schedule(name="rectified_flow", flow_shift=3.0)
  sigmas = scalewise.flow_grid_sigmas(28, 3.0, (0, 7, 14, 18)[:len(scales)])
  rng = np.random.RandomState(len(scales))
  b, r, c = 4, scales[-1], 4
  noise = rng.randn(b, r, r, c).astype(np.float32)
  ctx = rng.randn(b, 3, c).astype(np.float32)
  uncond = np.zeros((1, 3, c), np.float32)
  w = np.array([1.0, 3.0, 7.5, 0.0], np.float32)
  keys = jax.random.split(jax.random.key(3), b)
  options = Options(swd_scales=scales, swd_sigmas=sigmas)
  got = sampling.run(refs.analytic_apply(schedule, "flow"), None, noise, ctx, key=keys,
                     schedule=schedule, prediction="flow", sampler="swd", steps=len(scales),
                     options=options, uncond_context=uncond, cfg_scale=w)
  assert got.shape == (b, r, r, c)

  def step_noise(i, side):
    return np.asarray(jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(k, i), (side, side, c)))(keys))
  want = _diffusers_swd(schedule, scales, sigmas, noise[:, :scales[0], :scales[0]], ctx, uncond,
                        w, step_noise)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_swd_sampler_on_a_discrete_schedule_by_hand():
  # VP teachers (SD-XL's SwD): x0 from eps, torch-bicubic upscale, re-noise with alpha/sigma of
  # timestep round(sigma T); written out with torch's resize and numpy arithmetic.
  schedule = Schedule()
  scales, fracs = (4, 8), (0.999, 0.6)
  apply_fn = refs.analytic_apply(schedule, "eps")
  rng = np.random.RandomState(5)
  noise = rng.randn(2, 8, 8, 4).astype(np.float32)
  ctx = rng.randn(2, 3, 4).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 2)
  got = sampling.run(apply_fn, None, noise, ctx, key=keys, schedule=schedule, prediction="eps",
                     sampler="swd", steps=2, options=Options(swd_scales=scales, swd_sigmas=fracs))
  ab = schedule.alphas_cumprod.astype(np.float64)
  ts = (999, 600)
  x = noise[:, :4, :4]
  for i, t in enumerate(ts):
    eps = np.asarray(apply_fn(None, x, np.full((2,), t, np.float32), ctx), np.float64)
    x0 = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
    if i == 1:
      break
    up = _torch_resize(x0.astype(np.float32), (8, 8), "bicubic")
    n = np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (8, 8, 4)))(keys))
    x = (np.sqrt(ab[ts[1]]) * up + np.sqrt(1 - ab[ts[1]]) * n).astype(np.float32)
  np.testing.assert_allclose(np.asarray(got), x0, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scales,sigmas,kw,match", [
    ((), (), {}, "scales is empty"),
    ((8, 12, 16), (1.0, 0.8), {}, "3 entries but .*sigmas has 2"),
    ((8, 16, 12), (1.0, 0.8, 0.6), {}, "must not decrease"),
    ((8, 12, 16), (1.0, 0.8, 0.6), dict(latent_size=32), "end at the latent size 32"),
    ((6, 12, 16), (1.0, 0.8, 0.6), dict(latent_size=16, down_factor=4), r"\[6\] are not multiples"),
    ((8, 12, 16), (1.0, 0.8, 0.8), {}, "strictly decrease"),
    ((8, 12, 16), (1.2, 0.8, 0.6), {}, r"lie in \(0, 1\]"),
    ((8, 12.5, 16), (1.0, 0.8, 0.6), {}, "positive integers"),
])
def test_bad_scales_are_clear_errors_naming_the_key(scales, sigmas, kw, match):
  with pytest.raises(ConfigError, match=match) as e:
    scalewise.check(scales, sigmas, **kw)
  assert "objective." in str(e.value)


def test_swd_sampler_bad_input():
  schedule = Schedule(name="rectified_flow")
  options = Options(swd_scales=(4, 8), swd_sigmas=(1.0, 0.6))
  with pytest.raises(ConfigError, match="one step per scale: 2 steps"):
    build_grid("swd", schedule, 4, "flow", options)
  with pytest.raises(ConfigError, match="empty"):
    build_grid("swd", schedule, 2, "flow", Options())
  apply_fn = refs.analytic_apply(schedule, "flow")
  x = np.zeros((1, 16, 16, 4), np.float32)  # a teacher with another latent size
  with pytest.raises(ConfigError, match="ends at scale 8 but the latents are 16x16"):
    sampling.run(apply_fn, None, x, np.zeros((1, 3, 4), np.float32), key=jax.random.key(0),
                 schedule=schedule, prediction="flow", sampler="swd", steps=2, options=options)


@pytest.mark.parametrize("order", scalewise.ORDERS)
def test_training_inputs_both_orders(order):
  rng = np.random.RandomState(2)
  x_prev = rng.randn(3, 8, 8, 4).astype(np.float32)
  alpha = np.array([0.9, 0.5, 0.2], np.float32)
  sigma = np.sqrt(1 - alpha ** 2).astype(np.float32)
  a4, s4 = alpha[:, None, None, None], sigma[:, None, None, None]
  if order == "upscale_then_noise":
    noise = rng.randn(3, 12, 12, 4).astype(np.float32)
    want = a4 * _torch_resize(x_prev, (12, 12), "bicubic") + s4 * noise
  else:
    noise = rng.randn(3, 8, 8, 4).astype(np.float32)
    want = _torch_resize(a4 * x_prev + s4 * noise, (12, 12), "bicubic")
  got = scalewise.training_inputs(jnp.asarray(x_prev), 12, alpha, sigma, jnp.asarray(noise), order)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ConfigError, match="unknown scale-wise input order"):
    scalewise.training_inputs(jnp.asarray(x_prev), 12, alpha, sigma, jnp.asarray(noise), "x")


def test_upscaled_noise_is_off_distribution():
  # The premise of upscale-then-noise: bicubic-upscaled white noise is correlated (neighbours) and
  # has less than unit variance, unlike fresh noise at the new scale.
  n = jax.random.normal(jax.random.key(0), (256, 8, 8, 1))
  up = np.asarray(scalewise.resize(n, 16)).reshape(256, 16, 16)
  assert up.var() < 0.9
  corr = np.corrcoef(up[:, 4, 4], up[:, 4, 5])[0, 1]
  assert corr > 0.5


# --- Losses against torch implementations of the same formulas ----------------------------------


def _torch_dmd(x, x0_real, x0_fake):
  x = torch.tensor(x, requires_grad=True)
  with torch.no_grad():
    p_real = x - torch.tensor(x0_real)
    p_fake = x - torch.tensor(x0_fake)
    g = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
    g = torch.nan_to_num(g)
  loss = 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach(), reduction="mean")
  loss.backward()
  return loss.item(), x.grad.numpy()


def test_dmd_loss_value_and_gradient_equal_torch():
  rng = np.random.RandomState(0)
  x, xr, xf = (rng.randn(3, 6, 6, 4).astype(np.float32) for _ in range(3))
  value, grad = jax.value_and_grad(scalewise.dmd_loss)(jnp.asarray(x), xr, xf)
  want_value, want_grad = _torch_dmd(x, xr, xf)
  assert float(value) == pytest.approx(want_value, rel=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-9)
  # No gradient reaches the teacher's or the fake net's predictions.
  gr, gf = jax.grad(scalewise.dmd_loss, argnums=(1, 2))(jnp.asarray(x), xr, xf)
  assert not np.any(np.asarray(gr)) and not np.any(np.asarray(gf))


def test_dmd_gradient_is_zero_when_fake_equals_real():
  x, xr = (np.random.RandomState(i).randn(2, 4, 4, 4).astype(np.float32) for i in range(2))
  value, grad = jax.value_and_grad(scalewise.dmd_loss)(jnp.asarray(x), xr, xr)
  assert float(value) == 0.0 and not np.any(np.asarray(grad))
  # p_real = 0 (0/0) is made finite, not NaN.
  grad = jax.grad(scalewise.dmd_loss)(jnp.asarray(xr), xr, x)
  assert np.all(np.isfinite(np.asarray(grad)))


def _torch_mmd(real, fake, c=1e-3):
  fake = torch.tensor(fake, requires_grad=True)
  mu_r = torch.tensor(real).flatten(1, -2).mean(1)
  mu_f = fake.flatten(1, -2).mean(1)
  d = (mu_r - mu_f) ** 2
  loss = (torch.sqrt(d + c * c) - c).mean()
  loss.backward()
  return loss.item(), fake.grad.numpy()


def test_mmd_loss_equals_torch_and_its_properties():
  rng = np.random.RandomState(1)
  real, fake = (rng.randn(3, 5, 5, 8).astype(np.float32) for _ in range(2))
  value, grad = jax.value_and_grad(scalewise.mmd_loss, argnums=1)(real, jnp.asarray(fake))
  want_value, want_grad = _torch_mmd(real, fake)
  assert float(value) == pytest.approx(want_value, rel=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-8)
  assert float(scalewise.mmd_loss(real, real)) == 0.0
  assert float(scalewise.mmd_loss(real, real, kernel="rbf")) == 0.0
  for kernel in ("linear", "rbf"):
    assert float(scalewise.mmd_loss(real, fake, kernel=kernel)) > 0.0
  assert not np.any(np.asarray(jax.grad(scalewise.mmd_loss)(jnp.asarray(real), fake)))
  # rbf by hand: 2 - 2 exp(-|mu_r - mu_f|^2 / (2 h^2)) per pair.
  mu_r, mu_f = real.reshape(3, -1, 8).mean(1), fake.reshape(3, -1, 8).mean(1)
  want = np.mean(2 - 2 * np.exp(-((mu_r - mu_f) ** 2).sum(-1) / (2 * 0.5 ** 2)))
  got = float(scalewise.mmd_loss(real, fake, kernel="rbf", bandwidth=0.5))
  assert got == pytest.approx(want, rel=1e-5)
  with pytest.raises(ConfigError, match="unknown MMD kernel"):
    scalewise.mmd_loss(real, fake, kernel="cosine")


def test_gan_head_and_losses_equal_torch():
  d = 16
  head = scalewise.DiscriminatorHead()
  h = np.random.RandomState(2).randn(5, d).astype(np.float32)
  params = jax.jit(head.init)(jax.random.key(0), h)["params"]  # jitted: eager init is ~10 s
  # Perturb the LayerNorm affine parameters so the comparison covers them.
  rng = np.random.RandomState(3)
  params = jax.tree.map(lambda p: p + 0.1 * rng.randn(*p.shape).astype(np.float32), params)
  widths = scalewise.head_widths(d)
  assert widths == (16, 12, 8, 5, 1)
  layers = []
  for i, (a, b) in enumerate(zip(widths, widths[1:])):
    ln, lin = torch.nn.LayerNorm(a, eps=1e-5), torch.nn.Linear(a, b)
    with torch.no_grad():
      ln.weight.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["scale"])))
      ln.bias.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["bias"])))
      lin.weight.copy_(torch.from_numpy(np.array(params[f"dense_{i}"]["kernel"]).T.copy()))
      lin.bias.copy_(torch.from_numpy(np.array(params[f"dense_{i}"]["bias"])))
    layers += [ln, torch.nn.GELU(), lin]
  ref = torch.nn.Sequential(*layers)

  @jax.jit  # one compile instead of one per eager op
  def ours(params, real, fake):
    lr = head.apply({"params": params}, real)
    lf = head.apply({"params": params}, fake)
    return (scalewise.gan_discriminator_loss(lr, lf), scalewise.gan_generator_loss(lf))

  fake = h[::-1].copy() * 0.5
  (d_loss, g_loss) = ours(params, h, fake)
  hr = torch.tensor(h, requires_grad=True)
  hf = torch.tensor(fake, requires_grad=True)
  lr, lf = ref(hr)[:, 0], ref(hf)[:, 0]
  sp = torch.nn.functional.softplus
  want_d = sp(-lr).mean() + sp(lf).mean()
  want_g = sp(-lf).mean()
  assert float(d_loss) == pytest.approx(want_d.item(), rel=1e-5)
  assert float(g_loss) == pytest.approx(want_g.item(), rel=1e-5)
  # Gradients: the discriminator loss in the head's parameters, the generator loss in its input.
  g_params = jax.jit(jax.grad(lambda p: ours(p, h, fake)[0]))(params)
  want_d.backward()
  np.testing.assert_allclose(np.asarray(g_params["dense_0"]["kernel"]).T,
                             ref[2].weight.grad.numpy(), rtol=1e-4, atol=1e-6)
  g_in = jax.jit(jax.grad(lambda f: ours(params, h, f)[1]))(jnp.asarray(fake))
  hf.grad = None
  sp(-ref(hf)[:, 0]).mean().backward()
  np.testing.assert_allclose(np.asarray(g_in), hf.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_swd_settings_leave_older_results_current():
  # Rows name the settings that made them (eval_key). The SwD keys are left out at their defaults,
  # so rows made before they existed stay current: these two values were computed at commit
  # 877cef5, before objective.scales / sigmas and Options.swd_* were added.
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
  from ldm_scaling.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import grid  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "data", "workdir_v1_toy", "config.json")
  with open(path, encoding="utf-8") as f:
    config = cfglib.with_defaults(json.load(f)["config"])

  def key(config):
    options = samplers.options_from_config(config)
    return grid.cell_key(grid._normal(dict(sampler=grid._sampler_options(options),
                                           run_config=grid._sampling_config_hash(config))))
  assert grid._sampling_config_hash(config) == "8aa4f9541b49"
  assert key(config) == "e80216978fc4be32"
  config.objective.update(scales=(4, 8), sigmas=(1.0, 0.6))  # a SwD student's rows differ
  assert key(config) != "e80216978fc4be32"


# --- Sampling cost -------------------------------------------------------------------------------


def _swd_config(attention: bool):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(width=16)
  config.model.update(channel_mult=(1, 2), attn_levels=(attention, False), layers_per_block=1,
                      norm_groups=8)
  config.cost.update(latent_size=16, text_len=8)
  return config


def test_swd_step_costs_are_measured_flops_per_scale():
  from ldm_scaling import models  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
  sides = (4, 8, 12, 16)
  config = _swd_config(False)
  conv_only = cost.step_costs(config.model, config.cost, sides)
  # XLA's own count of the forward at each side, lowered here directly.
  model = models.build(config.model)

  def flops(side):
    x = jax.ShapeDtypeStruct((1, side, side, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = jax.ShapeDtypeStruct((1, 8, config.model.cross_attn_dim), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, c)["params"]
    return jax.jit(model.apply).lower({"params": params}, x, t, c).cost_analysis()["flops"]
  np.testing.assert_allclose(conv_only, [flops(s) / flops(16) for s in sides], rtol=1e-6)
  # Near (s/R)^2 but below it at small sides: XLA counts no multiply-adds on a convolution's
  # zero padding, and a 3x3 kernel's border taps are a larger share of a small latent (a 4x4
  # input keeps (10/12)^2 of its taps, a 16x16 one (46/48)^2; the down level halves the side).
  quad = np.array([(s / 16) ** 2 for s in sides])
  assert conv_only[-1] == 1.0 and np.all(np.diff(conv_only) > 0)
  assert np.all(conv_only <= quad * 1.01) and np.all(conv_only >= quad * 0.6)
  # Attention's logits grow with (H W)^2: smaller scales are cheaper still, relative to full size.
  config = _swd_config(True)
  with_attn = cost.step_costs(config.model, config.cost, sides)
  assert all(a < b for a, b in zip(with_attn[:3], conv_only[:3]))
  # Full size at every step is the ordinary convention: norm_cost x steps.
  assert cost.sampling_cost(0.5, 3, relative_steps=(1.0, 1.0, 1.0)) == cost.sampling_cost(0.5, 3)
  with pytest.raises(ConfigError, match="2 relative step costs for 3 steps"):
    cost.sampling_cost(0.5, 3, relative_steps=(1.0, 1.0))


def test_swd_samples_carry_their_scale_wise_cost():
  from ldm_scaling.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
  config = _swd_config(True)
  config.diffusion.update(schedule="rectified_flow", prediction="flow", flow_shift=3.0)
  config.objective.update(scales=(8, 12, 16),
                          sigmas=scalewise.flow_grid_sigmas(28, 3.0, (0, 7, 14)))
  schedule = Schedule(name="rectified_flow", flow_shift=3.0)
  rng = np.random.RandomState(0)
  noise = rng.randn(2, 16, 16, 4).astype(np.float32)
  ctx = rng.randn(2, 3, 4).astype(np.float32)
  out = sampling.sample(config, refs.analytic_apply(schedule, "flow"), None, noise, ctx,
                        key=jax.random.key(0), sampler="swd", steps=3, norm_cost=0.25)
  relative = cost.step_costs(config.model, config.cost, (8, 12, 16))
  np.testing.assert_allclose(out.cost, 0.25 * sum(relative), rtol=1e-6)
  assert out.cost[0] < 0.25 * 3 * 0.75  # well under three full-size steps
  options = samplers.options_from_config(config)
  assert samplers.scale_schedule("swd", options) == "8-12-16"
  assert samplers.scale_schedule("ddim", options) == ""


# --- The scale_wise objective -------------------------------------------------------------------


def _objective_config(**swd):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(width=16)
  # One level: the smallest UNet that still has the mid block the features come from.
  config.model.update(channel_mult=(1,), attn_levels=(False,), layers_per_block=1,
                      norm_groups=8)
  config.diffusion.update(schedule="rectified_flow", prediction="flow", flow_shift=3.0)
  config.objective.update(name="scale_wise", teacher="/nowhere", inputs="embeddings",
                          scales=(4, 6, 8), sigmas=(1.0, 0.8, 0.6), cfg_scale=3.0)
  config.objective.swd.update(fake_updates=2, **swd)
  config.eval.update(samplers=("swd",), steps=(3,))
  config.text.max_length = 5
  return config


def _objective_inputs(objective, config, seed=0):
  params = jax.jit(objective.init)(jax.random.key(seed))
  from ldm_scaling import sharding as sh  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train.objectives import base  # pylint: disable=g-import-not-at-top
  params = sh.unbox(params)
  # The teacher: another init (a student and fake net starting elsewhere still get gradients).
  teacher = sh.unbox(jax.jit(objective.init)(jax.random.key(seed + 1)))["unet"]
  frozen = {"teacher": base.Frozen(objective.unet, teacher),
            "uncond": base.Frozen(None, np.zeros((1, 5, config.model.cross_attn_dim), np.float32))}
  rng = np.random.RandomState(seed)
  batch = {"latents": rng.randn(2, 8, 8, 4).astype(np.float32),
           "context": rng.randn(2, 5, config.model.cross_attn_dim).astype(np.float32)}
  return params, frozen, batch


def test_scale_wise_phases_cycle_and_gradients_reach_only_the_phases_networks():
  from ldm_scaling.train import objectives  # pylint: disable=g-import-not-at-top
  config = _objective_config()
  objectives.validate(config)
  objective = objectives.OBJECTIVES["scale_wise"](config)
  assert set(objective.networks()) == {"unet", "fake", "head"}
  assert objective.networks()["unet"].start_from == "teacher"
  assert objective.networks()["fake"].start_from == "teacher"
  phases = objective.phases()
  # fake x2 then student, the scale index advancing once per cycle: a function of the step.
  got = [(objectives.phase_at(phases, s)[0].name, objectives.phase_at(phases, s)[1])
         for s in range(10)]
  assert got == [("fake", 0), ("fake", 0), ("student", 0), ("fake", 1), ("fake", 1),
                 ("student", 1), ("fake", 2), ("fake", 2), ("student", 2), ("fake", 0)]
  params, frozen, batch = _objective_inputs(objective, config)
  by_name = {p.name: p for p in phases}
  # The fake net at a middle scale, the student at the last (its input upscaled from the previous
  # scale); the student at the first scale (no previous one) is the MMD-only test's.
  for phase, k in ((by_name["fake"], 1), (by_name["student"], 2)):
    grads, metrics = jax.jit(jax.grad(lambda p: phase.loss(p, frozen, None, batch,
                                                           jax.random.key(k), choice=k),
                                      has_aux=True))(params)
    norms = {n: float(optax_global_norm(g)) for n, g in grads.items()}
    for name in norms:
      if name in phase.updates:
        assert norms[name] > 0, (phase.name, k, norms)
      else:
        assert norms[name] == 0, (phase.name, k, norms)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    if phase.name == "student":
      student_metrics = metrics
    else:
      fake_metrics = metrics
  # The student's loss has every term; the fake net's, regression + discriminator.
  assert {"dmd", "mmd", "gan_g", "x0_mse"} <= set(student_metrics)
  assert {"denoise", "gan_d"} <= set(fake_metrics)


def optax_global_norm(tree):
  import optax  # pylint: disable=g-import-not-at-top
  return optax.tree.norm(tree)


def test_mmd_only_student_trains_alone_on_the_teachers_features():
  from ldm_scaling.train import objectives  # pylint: disable=g-import-not-at-top
  config = _objective_config(dmd_weight=0.0, gan_weight=0.0)
  objective = objectives.OBJECTIVES["scale_wise"](config)
  assert set(objective.networks()) == {"unet"}
  phases = objective.phases()
  assert [p.name for p in phases] == ["student"]
  assert [objectives.phase_at(phases, s)[1] for s in range(4)] == [0, 1, 2, 0]
  params, frozen, batch = _objective_inputs(objective, config)
  # At the first scale: no previous one, the input is the data at that scale, noised.
  loss, metrics = jax.jit(lambda p: phases[0].loss(p, frozen, None, batch, jax.random.key(0),
                                                   choice=0))(params)
  assert set(metrics) == {"loss", "mmd", "x0_mse"} and float(loss) > 0
  # With the student equal to the teacher... the MMD term still compares samples to data: > 0.
  assert float(metrics["mmd"]) > 0


@pytest.mark.parametrize("change,match", [
    (dict(scales=(), sigmas=()), "needs objective.scales and objective.sigmas"),
    (dict(teacher=""), "needs objective.teacher"),
    (dict(scales=(4, 6, 16), sigmas=(1.0, 0.8, 0.6)), "end at the latent size 8"),
    (dict(sigmas=(1.0, 0.8)), "3 entries but objective.sigmas has 2"),
    (dict(scales=(6, 4, 8)), "must not decrease"),
    (dict(swd=dict(input_order="sideways")), "unknown objective.swd.input_order"),
    (dict(swd=dict(fake_updates=0)), "fake_updates must be >= 1"),
    (dict(swd=dict(dmd_weight=0.0, mmd_weight=0.0, gan_weight=0.0)), "would learn nothing"),
    (dict(swd=dict(dmd_indices=(12, 40))), r"objective.swd.dmd_indices: .*\[12, 40\)"),
    (dict(swd=dict(mmd_kernel="cosine")), "unknown objective.swd.mmd_kernel"),
])
def test_bad_scale_wise_settings_are_clear_errors(change, match):
  from ldm_scaling.train import objectives  # pylint: disable=g-import-not-at-top
  config = _objective_config()
  swd_change = change.pop("swd", {})
  config.objective.update(**change)
  config.objective.swd.update(**swd_change)
  with pytest.raises(ConfigError, match=match):
    objectives.validate(config)


def test_scale_wise_student_trains_resumes_exactly_and_evaluates(small_teacher, tmp_path, capsys):
  """The whole SwD pipeline at CI size on the small VP teacher (8x8 latents):
  2 steps (the fake net, then the student, at scale 4: each phase program compiles once, and
  compiles dominate; the cycle through scales is test_scale_wise_phases_cycle_..., scale 8's
  losses are compiled there). Resumed from its step-1 checkpoint (what a SIGKILL after it
  leaves: a copy of the run without the later checkpoint, restored by a fresh trainer), every
  network ends bit-identical to the uninterrupted run's (the phase of step 2 comes from the
  restored step). The student is then evaluated with the swd sampler: its row carries
  scale_schedule 4-8 and the sampling cost of the two measured step costs."""
  import copy  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from ldm_scaling import cli  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import results  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top
  teacher_dir = small_teacher
  config = copy.deepcopy(checkpoint.load_run_config(str(teacher_dir)))
  config.unlock()
  config.objective.update(name="scale_wise", teacher=str(teacher_dir), scales=(4, 8),
                          sigmas=(1.0, 0.6), cfg_scale=3.0)
  config.objective.swd.fake_updates = 1
  config.train.update(steps=2, lr=1e-4, warmup_steps=0, log_every=1, checkpoint_every=1,
                      sample_every=0, async_checkpointing=False, seed=3)
  config.eval.update(samplers=("swd",), steps=(2,), cfg_scales=(1.0,), num_samples=8,
                     fid_reference_n=16, batch_size=8, grid_images=4,
                     stats_dir=str(tmp_path / "stats"))
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  previewed = copy.deepcopy(config)
  previewed.train.sample_every = 2  # the student's preview grid: the swd sampler via generate
  result = trainer.train(previewed, str(straight))
  assert result.step == 2 and np.isfinite(result.metrics["student/loss"])
  assert (straight / "samples" / "step_0000002.png").is_file()
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "2")
  capsys.readouterr()
  assert trainer.train(config, str(resumed)).step == 2
  assert "resumed from step 1 of 2" in capsys.readouterr().err
  _, a = checkpoint.load_weights(str(straight), which="params")
  _, b = checkpoint.load_weights(str(resumed), which="params")
  assert set(a) == {"unet", "fake", "head"}
  jax.tree.map(np.testing.assert_array_equal, a, b)
  _, teacher = checkpoint.load_weights(str(teacher_dir), which="ema")
  moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x - y)).max()),
                                       a["unet"], teacher["unet"]))
  assert max(moved) > 0  # the student trained
  table_dir = tmp_path / "results"
  assert cli.main(["eval", "--workdir", str(straight), "--results", str(table_dir)]) == 0
  row = results.load(str(table_dir)).iloc[0]
  assert row["objective"] == "scale_wise" and row["sampler"] == "swd"
  assert row["scale_schedule"] == "4-8" and np.isfinite(row["fid"])
  relative = cost.step_costs(config.model, config.cost, (4, 8))
  assert row["sampling_cost"] == pytest.approx(row["norm_cost"] * sum(relative), rel=1e-6)
  assert row["sampling_cost"] < 2 * row["norm_cost"]
  # Training compute, counted by hand: 1 fake-phase step (student forward 1, fake net forward +
  # backward 3, discriminator's real pass with backward 3) and 1 student step (forward + backward
  # 3, guided teacher 2, fake net 1 for DMD, 3 for GAN, 4 for MMD), at the scales' mean share of a
  # full forward (the average over whole cycles through the scales, which long runs are; these 2
  # steps were both at scale 4), in units of 3 forwards; the teacher's own steps apart.
  share = (relative[0] + relative[1]) / 2
  passes = (1 + 3 + 3) + (3 + 2 + 1 + 3 + 4)
  assert row["train_compute"] == pytest.approx(row["norm_cost"] * share * passes / 3, rel=1e-6)
  assert row["teacher_train_compute"] == pytest.approx(
      row["norm_cost"] * SMALL_TEACHER_STEPS, rel=1e-6)


def test_premise_experiment_runs_on_the_small_teacher(small_teacher, tmp_path, capsys):
  """E0's pipeline at CI size (n = 8, 2 seeds, one level): every (seed, kind) row is a finite FID
  against the same seed's true inputs; the CSV has them; bad settings are clear errors."""
  from ldm_scaling import cli  # pylint: disable=g-import-not-at-top
  from ldm_scaling.eval import scalewise_premise as premise  # pylint: disable=g-import-not-at-top
  out = tmp_path / "premise.csv"
  assert cli.main(["swd-premise", "--teacher", str(small_teacher), "--scales", "4,8",
                   "--sigmas", "0.6", "--n", "8", "--seeds", "2", "--finish-steps", "2",
                   "--batch-size", "8", "--out", str(out)]) == 0
  import pandas as pd  # pylint: disable=g-import-not-at-top
  rows = pd.read_csv(out)
  assert len(rows) == 2 * 3 and set(rows["kind"]) == {"floor", "upscale_then_noise",
                                                      "noise_then_upscale"}
  assert np.all(np.isfinite(rows["fid_vs_true"])) and np.all(rows["fid_vs_true"] >= 0)
  assert "upscale_then_noise" in capsys.readouterr().out
  with pytest.raises(ConfigError, match="--seeds needs at least 2"):
    premise.check(premise.Setting(scales=(4, 8), sigmas=(0.6,), seeds=(0,)), 8, 2)
  with pytest.raises(ConfigError, match="s_from < s_to"):
    premise.check(premise.Setting(scales=(8, 4), sigmas=(0.6,)), 8, 2)
  with pytest.raises(ConfigError, match=r"\[5\] are not multiples"):
    premise.check(premise.Setting(scales=(5, 8), sigmas=(0.6,)), 8, 2)


def test_premise_finish_is_the_probability_flow_to_the_data():
  """``finish`` from true noisy samples of Gaussian data with its exact denoiser: the deterministic
  DDIM path keeps the marginals, so 100 steps land on the data's per-channel mean and std (2048
  values a channel: the std's sampling error is ~1.6 %)."""
  from ldm_scaling.eval import scalewise_premise as premise  # pylint: disable=g-import-not-at-top
  # (A batch of 512: the discrete denoiser's table lookups at constant timesteps are constant-
  # folded by XLA, whose memory grows with batch x steps.)
  for schedule, prediction in ((Schedule(name="rectified_flow"), "flow"), (Schedule(), "eps")):
    apply_fn = refs.analytic_apply(schedule, prediction)
    ctx = np.zeros((512, 3, 4), np.float32)
    mu = np.asarray(refs.data_mean(jnp.asarray(ctx[:1])))[0, 0, 0]
    rng = np.random.RandomState(0)
    x0 = mu + refs.S * rng.randn(512, 2, 2, 4).astype(np.float32)
    _, a, s = scalewise.levels(schedule, [0.7])
    x = a[0] * x0 + s[0] * rng.randn(*x0.shape).astype(np.float32)
    out = jax.jit(lambda x: premise.finish(lambda y, t: apply_fn(None, y, t, ctx), schedule,
                                           prediction, x, 0.7, 100))(jnp.asarray(x))
    out = np.asarray(out).reshape(-1, 4)
    np.testing.assert_allclose(out.mean(0), mu, atol=0.08)
    np.testing.assert_allclose(out.std(0), refs.S, rtol=0.06)
