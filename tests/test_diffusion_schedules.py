"""Schedules, grids, parametrisations and losses against diffusers and hand computations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling import diffusion
from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion import parametrisation as param
from ldm_scaling.diffusion import training

import diffusion_refs as refs

# diffusers 0.35's DPM-Solver calls np.array(tensor, copy=False), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T2I = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "t2i.py")


@pytest.mark.parametrize("name,start,end", [("scaled_linear", 0.00085, 0.012),
                                            ("linear", 1e-4, 0.02), ("cosine", 0.0001, 0.02)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alpha_bar_matches_diffusers(name, start, end, zero_snr):
  import diffusers  # pylint: disable=g-import-not-at-top
  ours = diffusion.Schedule(name=name, beta_start=start, beta_end=end, zero_terminal_snr=zero_snr)
  ref = diffusers.DDPMScheduler(beta_start=start, beta_end=end,
                                beta_schedule=refs.DIFFUSERS_BETAS[name],
                                rescale_betas_zero_snr=zero_snr)
  ab, ab_ref = ours.alphas_cumprod, ref.alphas_cumprod.numpy()
  assert ab.dtype == np.float32
  # torch's float32 linspace rounds a few betas 1 ulp differently; the product stays within 1e-6.
  np.testing.assert_allclose(ab, ab_ref, rtol=1e-6, atol=1e-9)
  if zero_snr:
    assert ab[-1] == 0.0
    np.testing.assert_allclose(ab[0], diffusion.Schedule(name=name, beta_start=start,
                                                         beta_end=end).alphas_cumprod[0],
                               rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 999])
def test_discrete_timesteps_match_diffusers(spacing, steps):
  import diffusers  # pylint: disable=g-import-not-at-top
  schedule = diffusion.Schedule(timestep_spacing=spacing, steps_offset=0)
  for solver, cls in [("ddim", diffusers.DDIMScheduler), ("ddim", diffusers.DDPMScheduler),
                      ("dpm", diffusers.DPMSolverMultistepScheduler)]:
    ref = cls(timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.discrete_timesteps(steps, solver),
                                  ref.timesteps.numpy(), err_msg=f"{cls.__name__}")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_sigmas_match_diffusers(shift, steps):
  import diffusers  # pylint: disable=g-import-not-at-top
  schedule = diffusion.Schedule(name="rectified_flow", flow_shift=shift)
  ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  np.testing.assert_array_equal(schedule.train_sigmas, ref.sigmas.numpy())
  ref.set_timesteps(steps)
  np.testing.assert_array_equal(schedule.flow_sigmas(steps), ref.sigmas.numpy()[:-1])
  grid = diffusion.samplers.build_grid("euler", schedule, steps, "flow")
  np.testing.assert_array_equal(grid.t, ref.timesteps.numpy())  # t = 1000 sigma, in (0, 1000]
  assert grid.sigma[0] == 1.0


def test_shift_moves_noise_levels_up():
  a = diffusion.Schedule(name="rectified_flow", flow_shift=1.0).flow_sigmas(10)
  b = diffusion.Schedule(name="rectified_flow", flow_shift=3.0).flow_sigmas(10)
  assert a[0] == b[0] == 1.0 and np.all(b[1:] > a[1:])
  # Hand computation: s' = 3 s / (1 + 2 s) on a linspace from 1 down to the smallest training
  # level, which diffusers takes already shifted (so the last level is shifted twice).
  shift = lambda s: 3 * s / (1 + 2 * s)
  np.testing.assert_allclose(b, shift(np.linspace(1, shift(1e-3), 10)), rtol=1e-5)
  np.testing.assert_allclose(a, np.linspace(1, 1e-3, 10), rtol=1e-5)


# --- parametrisations ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [diffusion.Schedule(),
                                      diffusion.Schedule(name="rectified_flow", flow_shift=3.0)],
                         ids=["vp", "flow"])
def test_conversions_are_exact_round_trips(schedule):
  rng = np.random.RandomState(0)
  x0 = rng.randn(6, 4, 4, 3).astype(np.float64)
  eps = rng.randn(6, 4, 4, 3).astype(np.float64)
  _, alpha, sigma = (np.asarray(a, np.float64)[[1, 100, 400, 700, 900, 998]]
                     for a in schedule.train_points())
  x = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
  with jax.enable_x64(True):
    for p in param.PREDICTIONS:
      out = param.target(p, x0, eps, alpha, sigma)
      got_x0, got_eps = param.to_x0_eps(p, out, x, alpha, sigma)
      np.testing.assert_allclose(got_x0, x0, atol=1e-9, err_msg=p)
      np.testing.assert_allclose(got_eps, eps, atol=1e-9, err_msg=p)
      np.testing.assert_allclose(param.velocity(p, out, x, alpha, sigma), eps - x0, atol=1e-9)
      for q in param.PREDICTIONS:
        np.testing.assert_allclose(param.convert(p, out, x, alpha, sigma, to=q),
                                   param.target(q, x0, eps, alpha, sigma), atol=1e-9)


def test_v_target_equals_diffusers_velocity():
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  schedule = diffusion.Schedule()
  ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  rng = np.random.RandomState(1)
  x0, eps = rng.randn(3, 4, 4, 2).astype(np.float32), rng.randn(3, 4, 4, 2).astype(np.float32)
  ts = np.array([0, 500, 999])
  _, alpha, sigma = (a[ts] for a in schedule.train_points())
  v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(ts))
  np.testing.assert_allclose(param.target("v", x0, eps, alpha, sigma), v_ref.numpy(), atol=1e-6)
  x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(ts))
  x = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
  np.testing.assert_allclose(x, x_ref.numpy(), atol=1e-6)


# --- training targets and weightings -------------------------------------------------------------


def test_min_snr_weights_equal_the_papers_closed_forms():
  schedule = diffusion.Schedule()
  _, alpha, sigma = schedule.train_points()
  snr = schedule.snr()
  gamma = 5.0
  expected = {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
              "x0": np.minimum(snr, gamma)}
  for p, want in expected.items():
    got = training.loss_weight("min_snr", p, alpha, sigma, gamma)
    np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=p)
  np.testing.assert_array_equal(training.loss_weight("uniform", "eps", alpha, sigma), 1.0)
  # Flow velocity: the same min(SNR, gamma) * ||x0 error||^2 -- here x0 error = sigma * u error.
  flow = diffusion.Schedule(name="rectified_flow")
  _, a, s = flow.train_points()
  np.testing.assert_allclose(training.loss_weight("min_snr", "flow", a, s, gamma),
                             np.minimum(flow.snr(), gamma) * s.astype(np.float64) ** 2, rtol=2e-5)


@pytest.mark.parametrize("prediction,schedule", [
    ("eps", diffusion.Schedule()), ("v", diffusion.Schedule(zero_terminal_snr=True)),
    ("x0", diffusion.Schedule(name="cosine")),
    ("flow", diffusion.Schedule(name="rectified_flow", flow_shift=3.0))])
def test_denoising_loss_is_zero_for_an_oracle_and_has_gradients(prediction, schedule):
  """An oracle that knows x0 (and reads alpha, sigma off the timestep with the schedule's
  convention) has zero loss; a scaled oracle has a positive loss with a gradient."""
  x0 = jnp.asarray(np.random.RandomState(0).randn(8, 4, 4, 3).astype(np.float32))
  t_all, a_all, s_all = (jnp.asarray(a) for a in schedule.train_points())

  def oracle(scale):
    def model_fn(x_t, t, ctx):
      del ctx
      idx = jnp.argmin(jnp.abs(t_all[None, :] - t[:, None]), axis=1)
      a, s = param.per_sample(a_all[idx], x_t), param.per_sample(s_all[idx], x_t)
      return scale * param.target(prediction, x0, (x_t - a * x0) / s, a, s)
    return model_fn

  for weighting in ("uniform", "min_snr"):
    kw = dict(schedule=schedule, prediction=prediction, weighting=weighting)
    loss, metrics = training.denoising_loss(oracle(1.0), x0, None, jax.random.key(0), **kw)
    assert float(loss) < 1e-8 and float(metrics["mse"]) < 1e-8
    grad = jax.grad(lambda c: training.denoising_loss(oracle(c), x0, None, jax.random.key(0),
                                                      **kw)[0])(1.5)
    assert float(grad) > 0


# --- config --------------------------------------------------------------------------------------


def test_schedule_from_config_reads_every_diffusion_key():
  config = cfglib.base_config()
  config.diffusion.update(schedule="linear", num_train_timesteps=500, beta_start=1e-4,
                          beta_end=0.02, timestep_spacing="trailing", steps_offset=0,
                          set_alpha_to_one=True)
  s = diffusion.schedule_from_config(config.diffusion)
  assert (s.name, s.num_train_timesteps, s.beta_start, s.beta_end, s.timestep_spacing,
          s.steps_offset, s.set_alpha_to_one) == ("linear", 500, 1e-4, 0.02, "trailing", 0, True)
  config.diffusion.update(schedule="rectified_flow", flow_shift=3.0, prediction="flow",
                          loss_weighting="min_snr", min_snr_gamma=2.0)
  config.eval.ddim_eta = 0.3
  assert diffusion.schedule_from_config(config.diffusion).flow_shift == 3.0
  assert diffusion.options_from_config(config).eta == pytest.approx(0.3)
  loss = training.loss_from_config(config.diffusion)
  assert callable(loss)


@pytest.mark.parametrize("overrides,match", [
    (["diffusion.schedule=quadratic"], "unknown diffusion.schedule 'quadratic'"),
    (["diffusion.prediction=noise"], "unknown diffusion.prediction 'noise'"),
    (["diffusion.prediction=flow"], "needs diffusion.schedule='rectified_flow'"),
    (["diffusion.zero_terminal_snr=true"], "with prediction='eps' cannot work"),
    (["diffusion.schedule=rectified_flow", "diffusion.prediction=flow",
      "diffusion.zero_terminal_snr=true"], "rectified_flow already ends at SNR 0"),
    (["diffusion.timestep_spacing=uniform"], "unknown diffusion.timestep_spacing 'uniform'"),
    (["diffusion.loss_weighting=p2"], "unknown diffusion.loss_weighting 'p2'"),
    (["diffusion.beta_end=0.0001"], "0 < beta_start < beta_end < 1"),
    (["diffusion.flow_shift=0", "diffusion.schedule=rectified_flow",
      "diffusion.prediction=flow"], "diffusion.flow_shift must be > 0"),
    (["eval.samplers=('ddim','heun')"], "unknown sampler 'heun'"),
    (["eval.samplers=('euler',)"], "needs diffusion.schedule='rectified_flow'"),
    (["diffusion.schedule=rectified_flow", "eval.samplers=('dpm++',)"],
     r"sampler 'dpm\+\+' cannot use prediction='eps' on this schedule"),
    (["eval.ddim_eta=2.0"], r"eta must be in \[0, 1\]"),
    (["eval.steps=(50,2000)"], "2000 sampling steps exceed the 1000 training timesteps"),
])
def test_config_rejects_bad_diffusion_settings(overrides, match):
  with pytest.raises(ConfigError, match=match):
    experiment.load(f"{T2I}:width=128", overrides)


def test_config_accepts_a_flow_matching_teacher():
  config = experiment.load(f"{T2I}:width=128", [
      "diffusion.schedule=rectified_flow", "diffusion.prediction=flow", "diffusion.flow_shift=3.0",
      "eval.samplers=('euler','dpm++','ddim')", "diffusion.loss_weighting=min_snr"])
  assert config.diffusion.flow_shift == 3.0
