"""Samplers against diffusers' PyTorch schedulers, an analytic Gaussian check, CFG, bad input.

Every sampler is driven by the same model function as the diffusers loop: the exact denoiser of
Gaussian data (tests/diffusion_refs.py), so the comparison isolates the sampler arithmetic.
"""

import jax
import numpy as np
import pytest

from ldm_scaling import diffusion
from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion import guidance, samplers, sampling

import diffusion_refs as refs

# diffusers 0.35's DPM-Solver calls np.array(tensor, copy=False), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

B, H, W, C = 4, 8, 8, 4
SCALES = np.array([1.0, 3.0, 7.5, 0.0], np.float32)  # one batch mixes guidance scales


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(B, H, W, C).astype(np.float32)
  ctx = rng.randn(B, 3, C).astype(np.float32)
  uncond = np.zeros((1, 3, C), np.float32)
  return x, ctx, uncond


# (sampler, schedule settings, prediction, steps, eta)
CASES = (
    [("ddim", dict(timestep_spacing=sp), "eps", n, 0.0)
     for sp in ("leading", "trailing", "linspace") for n in (7, 20, 50)]
    + [("ddim", dict(timestep_spacing="leading"), "eps", 20, 0.5),
       ("ddim", dict(timestep_spacing="trailing", set_alpha_to_one=True), "eps", 10, 1.0),
       ("ddim", dict(timestep_spacing="trailing", zero_terminal_snr=True), "v", 25, 0.0),
       ("ddim", dict(name="cosine", timestep_spacing="linspace"), "x0", 30, 0.0),
       ("ddim", dict(name="linear", beta_start=1e-4, beta_end=0.02, steps_offset=0), "v", 15,
        0.0)]
    + [("ddpm", dict(timestep_spacing=sp), "eps", n, 0.0)
       for sp in ("leading", "trailing", "linspace") for n in (10, 50)]
    + [("ddpm", dict(timestep_spacing="trailing", zero_terminal_snr=True), "x0", 20, 0.0)]
    + [("dpm++", dict(timestep_spacing=sp), "eps", n, 0.0)
       for sp in ("leading", "trailing", "linspace") for n in (5, 10, 20)]
    + [("dpm++", dict(timestep_spacing="trailing", zero_terminal_snr=True), "v", 12, 0.0),
       ("dpm++", dict(name="cosine"), "x0", 16, 0.0)]
    + [("euler", dict(name="rectified_flow", flow_shift=shift), "flow", n, 0.0)
       for shift in (1.0, 3.0) for n in (4, 28)]
    + [("lcm", {}, "eps", n, 0.0) for n in (1, 2, 4, 8)]
    + [("lcm", dict(name="cosine"), "v", 4, 0.0), ("lcm", {}, "x0", 3, 0.0)]
)


def _case_id(case):
  sampler, kw, pred, n, eta = case
  extra = ",".join(f"{k}={v}" for k, v in kw.items())
  return f"{sampler}-{pred}-{n}-{extra}" + (f"-eta{eta}" if eta else "")


# The fast tier runs every sampler, spacing, parametrisation and option once; the same settings
# at other step counts (a compile each, ~3 s) run in the full suite.
FAST = [c for i, c in enumerate(CASES)
        if not any(c[:3] == d[:3] and c[4] == d[4] for d in CASES[:i])]


def _params():
  return [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", _params(), ids=[_case_id(c) for c in CASES])
def test_matches_diffusers(case):
  sampler, kw, prediction, steps, eta = case
  schedule = diffusion.Schedule(**kw)
  apply_fn = refs.analytic_apply(schedule, prediction)
  x, ctx, uncond = _inputs()
  keys = jax.random.split(jax.random.key(7), B)
  options = diffusion.Options(eta=eta)
  ours = sampling.run(apply_fn, None, x, ctx, key=keys, schedule=schedule,
                      prediction=prediction, sampler=sampler, steps=steps, options=options,
                      uncond_context=uncond, cfg_scale=SCALES)
  stochastic = samplers.SAMPLERS[sampler].stochastic(options)
  noise = (lambda i: samplers.step_noise(keys, i, x.shape)) if stochastic else None
  ref = refs.diffusers_sample(refs.diffusers_scheduler(sampler, schedule, prediction), apply_fn,
                              x, ctx, uncond, SCALES, steps, eta=eta, step_noise=noise)
  ours = np.asarray(ours)
  assert np.all(np.isfinite(ours))
  err = np.abs(ours - ref).max()
  assert err < 2e-5 * max(1.0, np.abs(ref).max()), f"max abs diff {err:.3g}"


def test_ddim_on_flow_schedule_is_the_euler_step():
  schedule = diffusion.Schedule(name="rectified_flow", flow_shift=3.0)
  apply_fn = refs.analytic_apply(schedule, "flow")
  x, ctx, uncond = _inputs()
  kw = dict(key=jax.random.key(0), schedule=schedule, prediction="flow", steps=12,
            uncond_context=uncond, cfg_scale=SCALES)
  a = sampling.run(apply_fn, None, x, ctx, sampler="euler", **kw)
  b = sampling.run(apply_fn, None, x, ctx, sampler="ddim", **kw)
  np.testing.assert_allclose(a, b, atol=2e-5)


# --- analytic check: Gaussian data, exact denoiser -----------------------------------------------


def _standard_normal(shape, seed):
  """Noise standardised per channel (mean 0, variance 1 exactly), so the moments of a linear map
  of it are exact rather than estimates."""
  z = np.random.RandomState(seed).randn(*shape)
  z = (z - z.mean(axis=(0, 1, 2))) / z.std(axis=(0, 1, 2))
  return z.astype(np.float32)


def _ddim_gain(scheduler, steps, s):
  """Hand computation on diffusers' alpha_bar table: deterministic DDIM maps the deviation
  d = x / alpha - mu of Gaussian data (std S) linearly; one step from tau = sigma/alpha to tau'
  multiplies it by (S^2 + tau tau') / (S^2 + tau^2). Returns (std of d at the start, gain)."""
  ab = scheduler.alphas_cumprod.numpy().astype(np.float64)
  scheduler.set_timesteps(steps)
  ts = scheduler.timesteps.numpy()
  t_max = scheduler.config.num_train_timesteps
  tau = lambda a: np.sqrt((1 - a) / a)
  gain = np.ones_like(s, np.float64)
  for t in ts:
    prev = t - t_max // steps
    ab_prev = ab[prev] if prev >= 0 else float(scheduler.final_alpha_cumprod)
    t0, t1 = tau(ab[t]), tau(ab_prev)
    gain *= (s ** 2 + t0 * t1) / (s ** 2 + t0 ** 2)
  return np.sqrt(s.astype(np.float64) ** 2 + tau(ab[ts[0]]) ** 2), gain


@pytest.mark.parametrize("steps", [10, 1000])
def test_ddim_lands_on_the_gaussian_data_distribution(steps):
  schedule = diffusion.Schedule(timestep_spacing="trailing", set_alpha_to_one=True)
  apply_fn = refs.analytic_apply(schedule, "eps")
  n = 256
  z = _standard_normal((n, H, W, C), seed=1)
  ctx = np.zeros((n, 1, C), np.float32)  # data mean = MU
  _, grid = sampling.program(apply_fn, schedule, "eps", "ddim", steps, guided=False)
  a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
  # Start on the exact marginal of the first noise level (SD's schedule does not reach SNR 0).
  x_start = a0 * refs.MU + np.sqrt(a0 ** 2 * refs.S ** 2 + s0 ** 2) * z
  x = np.asarray(sampling.run(apply_fn, None, x_start, ctx, key=jax.random.key(0),
                              schedule=schedule, sampler="ddim", steps=steps))
  mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
  start_std, gain = _ddim_gain(refs.diffusers_scheduler("ddim", schedule, "eps"), steps, refs.S)
  # Exact: the mean is preserved and the std is what the hand computation predicts.
  np.testing.assert_allclose(mean, refs.MU, atol=2e-4)
  np.testing.assert_allclose(std, start_std * gain, rtol=2e-4)
  if steps == 1000:
    # Many steps: the data distribution itself (first-order DDIM leaves < 1% std here).
    np.testing.assert_allclose(std, refs.S, rtol=1e-2)
    assert np.all(gain * start_std / refs.S > 0.99)
  else:
    assert np.all(std < 0.9 * refs.S)  # 10 steps visibly under-disperse, as predicted


def test_ddpm_many_steps_samples_the_gaussian_data_distribution():
  schedule = diffusion.Schedule(timestep_spacing="trailing")
  apply_fn = refs.analytic_apply(schedule, "eps")
  n = 256
  x_start = _standard_normal((n, H, W, C), seed=2)  # x_T ~ N(0, 1): the chain forgets it
  ctx = np.zeros((n, 1, C), np.float32)
  x = np.asarray(sampling.run(apply_fn, None, x_start, ctx, key=jax.random.key(3),
                              schedule=schedule, sampler="ddpm", steps=1000))
  count = n * H * W
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(mean, refs.MU, atol=5 * refs.S.max() / np.sqrt(count))
  np.testing.assert_allclose(var, refs.S ** 2, rtol=5 * np.sqrt(2 / count) + 0.01)


# --- determinism and batch independence ----------------------------------------------------------


def test_stochastic_sampler_is_deterministic_given_keys_and_batch_independent():
  schedule = diffusion.Schedule()
  apply_fn = refs.analytic_apply(schedule, "eps")
  x, ctx, uncond = _inputs()
  kw = dict(schedule=schedule, sampler="ddpm", steps=10, uncond_context=uncond)
  keys = jax.random.split(jax.random.key(5), B)
  a = np.asarray(sampling.run(apply_fn, None, x, ctx, key=keys, cfg_scale=SCALES, **kw))
  b = np.asarray(sampling.run(apply_fn, None, x, ctx, key=keys, cfg_scale=SCALES, **kw))
  np.testing.assert_array_equal(a, b)
  c = np.asarray(sampling.run(apply_fn, None, x, ctx, key=jax.random.key(6), cfg_scale=SCALES,
                              **kw))
  assert np.abs(a - c).max() > 0.1
  # Sample 2 alone, with its own key and scale, gives the same result as inside the batch.
  alone = np.asarray(sampling.run(apply_fn, None, x[2:3], ctx[2:3], key=keys[2:3],
                                  cfg_scale=SCALES[2:3], **kw))
  np.testing.assert_allclose(alone[0], a[2], atol=1e-5)


_SHARDED = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ldm_scaling import diffusion, runtime
import diffusion_refs as refs
runtime.configure_jax()
assert len(jax.devices()) == 8
schedule = diffusion.Schedule()
apply_fn = refs.analytic_apply(schedule, "eps")
rng = np.random.RandomState(0)
x = rng.randn(8, 8, 8, 4).astype(np.float32)
ctx = rng.randn(8, 3, 4).astype(np.float32)
keys = jax.random.split(jax.random.key(1), 8)
kw = dict(schedule=schedule, sampler="ddpm", steps=6, uncond_context=np.zeros((3, 4), np.float32),
          cfg_scale=np.linspace(0, 7, 8).astype(np.float32))
one = diffusion.run(apply_fn, None, x, ctx, key=keys, **kw)
shard = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
put = lambda a: jax.device_put(a, shard)
out = diffusion.run(apply_fn, None, put(x), put(ctx), key=put(keys), **kw)
assert len(out.sharding.device_set) == 8, out.sharding
print("MAXDIFF", float(np.abs(np.asarray(out) - np.asarray(one)).max()))
"""


def test_batch_sharded_over_8_devices_gives_the_same_samples(tmp_path):
  """The trajectory program is batch-parallel: sharding the batch over 8 (fake CPU) devices keeps
  it sharded and changes no sample (per-sample keys, partitionable threefry)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = tmp_path / "sharded.py"
  script.write_text(_SHARDED)
  tests = os.path.dirname(os.path.abspath(__file__))
  result = subprocess.run([sys.executable, str(script), tests], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  diff = float(result.stdout.split("MAXDIFF")[1])
  assert diff < 1e-5


# --- classifier-free guidance --------------------------------------------------------------------


def test_guidance_formula_and_scale_one_is_exactly_conditional():
  rng = np.random.RandomState(0)
  c, u = rng.randn(3, 2, 2, 4).astype(np.float32), rng.randn(3, 2, 2, 4).astype(np.float32)
  w = np.array([1.0, 0.0, 7.5], np.float32)
  out = np.asarray(guidance.combine(c, u, w))
  np.testing.assert_array_equal(out[0], c[0])  # bit for bit
  np.testing.assert_allclose(out[1], u[1], atol=1e-6)
  np.testing.assert_allclose(out[2], u[2] + 7.5 * (c[2] - u[2]), rtol=1e-5, atol=1e-5)


def test_mixed_scales_in_one_batch_equal_separate_runs_and_one_batched_call():
  schedule = diffusion.Schedule()
  base = refs.analytic_apply(schedule, "eps")
  batches = []

  def apply_fn(params, x, t, ctx):
    batches.append(x.shape[0])  # runs at trace time: one entry per traced model call
    return base(params, x, t, ctx)

  x, ctx, uncond = _inputs()
  kw = dict(key=jax.random.key(0), schedule=schedule, sampler="dpm++", steps=8,
            uncond_context=uncond)
  mixed = np.asarray(sampling.run(apply_fn, None, x, ctx, cfg_scale=SCALES, **kw))
  assert batches == [2 * B]  # conditional + unconditional in one call of batch 2B
  for b, w in enumerate(SCALES):
    alone = np.asarray(sampling.run(base, None, x[b:b + 1], ctx[b:b + 1], cfg_scale=float(w),
                                    **kw))
    np.testing.assert_allclose(alone[0], mixed[b], atol=1e-5)
  # Scale 1 everywhere needs no unconditional pass (and no uncond context).
  unguided = np.asarray(sampling.run(base, None, x, ctx, cfg_scale=1.0,
                                     **{**kw, "uncond_context": None}))
  np.testing.assert_allclose(unguided[0], mixed[0], atol=1e-5)


# --- bad input -----------------------------------------------------------------------------------


def _run(**overrides):
  schedule = overrides.pop("schedule", diffusion.Schedule())
  prediction = overrides.pop("prediction", "eps")
  x, ctx, uncond = _inputs()
  kw = dict(key=jax.random.key(0), schedule=schedule, prediction=prediction, sampler="ddim",
            steps=5, uncond_context=uncond, cfg_scale=SCALES)
  kw.update(overrides)
  return sampling.run(refs.analytic_apply(schedule, prediction), None, x, ctx, **kw)


@pytest.mark.parametrize("overrides,match", [
    (dict(steps=0), "sampling steps must be a positive integer, got 0"),
    (dict(steps=2.5), "positive integer"),
    (dict(steps=1001), "exceed the 1000 training timesteps"),
    (dict(sampler="heun"), r"unknown sampler 'heun'; available: ddim, ddpm, dpm\+\+, euler"),
    (dict(sampler="dpm++", schedule=diffusion.Schedule(name="rectified_flow")),
     r"sampler 'dpm\+\+' cannot use prediction='eps' on this schedule.*alpha = 0"),
    (dict(sampler="euler"), "needs diffusion.schedule='rectified_flow'"),
    (dict(cfg_scale=np.ones(3) * 2), r"guidance scale has shape \(3,\) but the batch has 4"),
    (dict(cfg_scale=np.ones((4, 1)) * 2), r"one scale per sample \(shape \(4,\)\)"),
    (dict(uncond_context=None), "needs uncond_context"),
    (dict(options=diffusion.Options(eta=1.5)), r"eta must be in \[0, 1\]"),
    (dict(prediction="noise"), "unknown diffusion.prediction 'noise'"),
    (dict(key=jax.random.split(jax.random.key(0), 3)), "one key or one per sample"),
])
def test_bad_input_is_a_clear_error(overrides, match):
  with pytest.raises(ConfigError, match=match):
    _run(**overrides)


def test_leading_spacing_past_the_last_timestep_is_an_error():
  with pytest.raises(ConfigError, match="reach timestep 1000"):
    diffusion.Schedule().discrete_timesteps(1000)
