"""Consistency distillation: the math against diffusers and an exact Gaussian ODE; the objective
end to end in the trainer (a student of the session's tiny teacher); bad input.

The ``lcm`` sampler itself is compared with diffusers' ``LCMScheduler`` in
test_diffusion_samplers.py (same model function, same noise).
"""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_scaling import diffusion
from ldm_scaling.errors import ConfigError
from ldm_scaling.diffusion import consistency as cd
from ldm_scaling.diffusion import guidance
from ldm_scaling.diffusion import parametrisation as param
from ldm_scaling.train import objectives
from ldm_scaling.train.objectives import consistency

import diffusion_refs as refs


def test_boundary_scalings_are_diffusers_lcm_and_exact_at_zero():
  import diffusers  # pylint: disable=g-import-not-at-top
  ref = diffusers.LCMScheduler(timestep_scaling=10.0)
  for t in (0, 1, 19, 259, 999):
    want = ref.get_scalings_for_boundary_condition_discrete(t)
    got = cd.boundary_scalings(np.array(t), 10.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
  c_skip, c_out = cd.boundary_scalings(jnp.zeros(3), 10.0)
  assert np.all(c_skip == 1) and np.all(c_out == 0)  # f(x, 0) = x exactly


def test_solver_and_sampler_timesteps_are_diffusers_lcm():
  import diffusers  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(cd.solver_timesteps(1000, 50), np.arange(19, 1000, 20))
  for solver_steps in (50, 25):
    ref = diffusers.LCMScheduler(original_inference_steps=solver_steps)
    for steps in (1, 2, 3, 4, 8, solver_steps):
      ref.set_timesteps(steps)
      np.testing.assert_array_equal(cd.lcm_timesteps(1000, solver_steps, steps),
                                    ref.timesteps.numpy())
  with pytest.raises(ConfigError, match="1 to objective.solver_steps=50"):
    cd.lcm_timesteps(1000, 50, 51)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("index", [0, 7, 49])
def test_teacher_step_is_diffusers_ddim_on_the_solver_grid(prediction, index):
  """The teacher's step tau_n -> tau_n - k is DDIM with N steps (at n = 0 it lands on t = 0, which
  is DDIM's final step with set_alpha_to_one=False)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  schedule = diffusion.Schedule()
  ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                 prediction_type=refs.DIFFUSERS_PREDICTION[prediction])
  ddim.set_timesteps(50)
  t = int(cd.solver_timesteps(1000, 50)[index])
  s = max(t - 20, 0)
  rng = np.random.RandomState(index)
  x, out = rng.randn(2, 2, 4, 4, 3).astype(np.float32)
  want = ddim.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
  ab = schedule.alphas_cumprod
  got = cd.teacher_step(prediction, jnp.asarray(out), jnp.asarray(x), np.sqrt(ab[t]),
                        np.sqrt(1 - ab[t]), np.sqrt(ab[s]), np.sqrt(1 - ab[s]))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def _exact_consistency_net(schedule, prediction):
  """A network whose consistency function is the exact PF-ODE map to t = 0 for the Gaussian data
  of diffusion_refs: ``F(x_t) = a_0 mu + sqrt(v_0 / v_t) (x_t - a_t mu)``, ``v = a^2 S^2 + s^2``
  (per channel). Returns ``net(x, t, ctx) -> output`` and ``F``."""
  ab = jnp.asarray(schedule.alphas_cumprod)
  a0, s0 = np.sqrt(schedule.alphas_cumprod[0]), np.sqrt(1 - schedule.alphas_cumprod[0])

  def levels(t):
    a = jnp.sqrt(ab[t.astype(jnp.int32)])[:, None, None, None]
    return a, jnp.sqrt(1 - a ** 2)

  def exact(x, t, ctx):
    a, s = levels(t)
    mu = refs.data_mean(ctx)
    return a0 * mu + jnp.sqrt((a0 ** 2 * refs.S ** 2 + s0 ** 2) / (a ** 2 * refs.S ** 2 + s ** 2)
                              ) * (x - a * mu)

  def net(x, t, ctx, gain=1.0):
    a, s = levels(t)
    c_skip, c_out = cd.boundary_scalings(t, 10.0)
    c_skip, c_out = c_skip[:, None, None, None], c_out[:, None, None, None]
    f = exact(x, t, ctx) * gain
    # Where c_out = 0 (t = 0) any output gives f = x; use the exact denoiser there.
    x0 = jnp.where(c_out > 0, (f - c_skip * x) / jnp.where(c_out > 0, c_out, 1.0),
                   refs.analytic_apply(schedule, "x0")(None, x, t, ctx))
    return param.target(prediction, x0, (x - a * x0) / s, a, s)
  return net, exact


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_minimal_at_the_exact_consistency_function(prediction):
  """With the exact denoiser as teacher (cfg 1) and the exact ODE map as student and target, the
  loss is only the teacher's one-step DDIM error (it shrinks with finer solver grids); scaling the
  student's map by 1 +- 2 % raises it by two orders of magnitude."""
  schedule = diffusion.Schedule()
  net, _ = _exact_consistency_net(schedule, prediction)
  teacher = lambda x, t, c: refs.analytic_apply(schedule, prediction)(None, x, t, c)
  rng = np.random.RandomState(0)
  ctx = jnp.asarray(rng.randn(256, 3, 4).astype(np.float32))
  x0 = refs.data_mean(ctx) + refs.S * jnp.asarray(rng.randn(256, 4, 4, 4).astype(np.float32))
  uncond = jnp.zeros((1, 3, 4))

  def loss(gain, solver_steps=50):
    student = lambda x, t, c: net(x, t, c, gain)
    value, metrics = cd.distillation_loss(
        student, net, teacher, x0, ctx, uncond, jax.random.key(1), schedule=schedule,
        prediction=prediction, solver_steps=solver_steps, cfg_scale=1.0, timestep_scaling=10.0,
        loss="l2")
    return float(value), metrics

  exact, metrics = loss(1.0)
  assert float(metrics["loss"]) == exact
  for gain in (0.98, 1.02):
    assert exact < 1e-2 * loss(gain)[0], (exact, loss(gain)[0])
  # The residual is the DDIM step's discretisation error: 4x finer steps shrink it.
  assert loss(1.0, solver_steps=200)[0] < exact / 10


def test_guided_teacher_is_the_cfg_combination_and_only_the_student_gets_gradients():
  """At cfg w the loss equals the loss with a teacher that returns ``u + w (c - u)`` itself at cfg
  1 (the conditional and unconditional halves are not swapped, the unconditional context is
  broadcast); the gradient reaches the student's parameter only."""
  schedule = diffusion.Schedule()
  exact = refs.analytic_apply(schedule, "eps")
  rng = np.random.RandomState(1)
  ctx = jnp.asarray(rng.randn(16, 3, 4).astype(np.float32))
  uncond = jnp.asarray(rng.randn(1, 3, 4).astype(np.float32))
  x0 = refs.data_mean(ctx) + refs.S * jnp.asarray(rng.randn(16, 4, 4, 4).astype(np.float32))
  kw = dict(schedule=schedule, prediction="eps", solver_steps=50, timestep_scaling=10.0,
            loss="huber", huber_c=0.001)

  def loss(p_student, p_target, p_teacher, cfg, teacher=None):
    net = lambda p: (lambda x, t, c: p * exact(None, x, t, c))
    return cd.distillation_loss(net(p_student), net(p_target), teacher or net(p_teacher), x0, ctx,
                                uncond, jax.random.key(2), cfg_scale=cfg, **kw)[0]

  w = 3.0
  pre_guided = lambda x, t, c: guidance.combine(
      exact(None, x, t, c), exact(None, x, t, jnp.broadcast_to(uncond, c.shape)), w)
  np.testing.assert_allclose(float(loss(1.1, 1.0, 1.0, w)),
                             float(loss(1.1, 1.0, 1.0, 1.0, teacher=pre_guided)), rtol=1e-5)
  assert abs(float(loss(1.1, 1.0, 1.0, w)) - float(loss(1.1, 1.0, 1.0, 1.0))) > 1e-4
  grads = jax.grad(loss, argnums=(0, 1, 2))(1.1, 1.0, 1.0, w)
  assert float(grads[0]) != 0 and float(grads[1]) == 0 and float(grads[2]) == 0


def test_pseudo_huber_distance_by_hand():
  a = jnp.array([[0.0, 3.0]])
  b = jnp.array([[4.0, 3.0]])
  c = 0.5
  want = ((np.sqrt(16 + c * c) - c) + 0.0) / 2
  np.testing.assert_allclose(np.asarray(cd.distance(a, b, "huber", c)), [want], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cd.distance(a, b, "l2", c)), [8.0])


# -------------------------------------------------------------------------------------------------
# The objective in the trainer.


def _student_config(teacher_dir):
  from ldm_scaling.train import checkpoint  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(checkpoint.load_run_config(str(teacher_dir)))
  config.unlock()
  config.objective.update(name="consistency", teacher=str(teacher_dir), solver_steps=10,
                          cfg_scale=4.0)
  return config


def test_student_starts_as_the_teacher_and_trains(tiny_run, tmp_path):
  """Two steps at lr 1e-6 from the session's tiny teacher: the student's parameters are the
  teacher's EMA plus at most two AdamW updates (|update| <= lr (1 + wd |w|) each), the loss is
  finite, and the preview grid is sampled with the 4-step lcm sampler."""
  from ldm_scaling.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top
  teacher_dir, _ = tiny_run
  config = _student_config(teacher_dir)
  lr = 1e-6
  # seed 1: the student's own random init is far from the teacher's weights, so a start_from
  # that did nothing would fail the bound below by orders of magnitude.
  config.train.update(steps=2, lr=lr, warmup_steps=0, ema_decay=0.95, log_every=1, seed=1,
                      checkpoint_every=2, sample_every=2, async_checkpointing=False)
  result = trainer.train(config, str(tmp_path))
  assert result.step == 2 and np.isfinite(result.metrics["loss"]) and result.metrics["loss"] > 0
  _, teacher = checkpoint.load_weights(str(teacher_dir), which="ema")
  _, student = checkpoint.load_weights(str(tmp_path), which="params")
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                       teacher["unet"], student["unet"]))
  bound = 2 * lr * (1 + config.train.weight_decay * max(
      float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(teacher["unet"]))) * 1.01
  assert max(diffs) <= bound, (max(diffs), bound)
  assert max(diffs) > 0  # it did train
  assert os.path.isfile(tmp_path / "samples" / "step_0000002.png")


@pytest.mark.parametrize("change, match", [
    (dict(teacher=""), "needs objective.teacher"),
    (dict(loss="l1"), "unknown objective.loss"),
    (dict(solver_steps=0), "objective.solver_steps must be in"),
    (dict(teacher_weights="best"), "teacher_weights must be"),
])
def test_bad_objective_settings_are_clear_errors(tiny_run, change, match):
  config = _student_config(tiny_run[0])
  config.objective.update(**change)
  with pytest.raises(ConfigError, match=match):
    objectives.build(config)


def test_teacher_must_be_finished_or_pinned(tiny_run, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  teacher = tmp_path / "teacher"
  shutil.copytree(tiny_run[0], teacher)
  saved = json.loads((teacher / "config.json").read_text())
  saved["config"]["train"]["steps"] = 10  # as if it were still training (at step 3 of 10)
  (teacher / "config.json").write_text(json.dumps(saved))
  config = _student_config(teacher)
  with pytest.raises(ConfigError, match="is at step 3 of 10: distil a finished teacher"):
    consistency.check_teacher(config)
  config.objective.teacher_step = 3
  assert consistency.check_teacher(config) == 3
  config.objective.teacher_step = 2
  with pytest.raises(ConfigError, match=r"teacher_step=2: .* has checkpoints \[3\]"):
    consistency.check_teacher(config)


def test_teacher_must_exist_and_match(tiny_run, tmp_path):
  config = _student_config(tiny_run[0])
  config.objective.teacher = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="not a training workdir"):
    consistency.check_teacher(config)
  config = _student_config(tiny_run[0])
  config.model.width = 64
  with pytest.raises(ConfigError, match="model.width: teacher 32, here 64"):
    consistency.check_teacher(config)
  config = _student_config(tiny_run[0])
  config.diffusion.prediction = "v"
  with pytest.raises(ConfigError, match="diffusion.prediction: teacher 'eps', here 'v'"):
    consistency.check_teacher(config)
  config = _student_config(tiny_run[0])
  length = config.text.max_length
  config.text.max_length = length // 2
  with pytest.raises(ConfigError, match=f"text.max_length: teacher {length}, here {length // 2}"):
    consistency.check_teacher(config)
  config = _student_config(tiny_run[0])
  config.diffusion.update(schedule="rectified_flow", prediction="flow")
  with pytest.raises(ConfigError, match="discrete diffusion.schedule"):
    objectives.build(config)  # validation: no teacher needed


def test_workdirs_written_before_the_consistency_keys_still_resume(tmp_path):
  """config.json files from before objective.teacher etc. existed compare equal to today's
  defaults (no 'different objective settings' refusal); a real change is still refused."""
  import json  # pylint: disable=g-import-not-at-top
  from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import trainer  # pylint: disable=g-import-not-at-top
  config = cfglib.base_config()
  old = json.loads(json.dumps(config.to_dict(), default=list))
  old["objective"] = {"name": "denoising", "inputs": "pipeline"}  # the schema of 2026-11-29
  (tmp_path / "config.json").write_text(json.dumps(dict(config=old)))
  objective = objectives.build(config)
  trainer._check_workdir(str(tmp_path), config, objective)  # pylint: disable=protected-access
  config.model.width = 64
  with pytest.raises(ConfigError, match="different model settings"):
    trainer._check_workdir(str(tmp_path), config, objective)  # pylint: disable=protected-access
