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


@pytest.mark.parametrize("guidance_embed", [False, True], ids=["fixed_cfg", "w_conditioned"])
def test_student_starts_as_the_teacher_and_trains(small_teacher, tmp_path, guidance_embed):
  """Two steps at lr 1e-6 from the session's small teacher: the student's parameters are the
  teacher's EMA plus at most two AdamW updates (|update| <= lr (1 + wd |w|) each), and the loss
  is finite. The fixed-cfg student trains on embedding batches (``objective.inputs=embeddings``:
  zero unconditional context, no encoders in the step, no preview); the w-conditioned one
  (scales drawn in cfg_range) on the production pipeline (the frozen VAE and CLIP in the step,
  the unconditional context CLIP's ""): it starts from a zero cond_proj, which trains too, and
  its preview grid runs the real guidance-embedded UNet through generate with the 4-step lcm
  sampler."""
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top
  import train_toy  # pylint: disable=g-import-not-at-top
  teacher_dir = small_teacher
  config = _student_config(teacher_dir)
  make_data = None
  if guidance_embed:
    config.model.guidance_embed = True
    config.objective.cfg_range = (1.0, 6.0)
  else:  # each input path once; a plain UNet's preview is the tiny_run's (lcm: vs diffusers)
    config.objective.inputs = "embeddings"
    make_data = train_toy.make_embedding_data
  lr = 1e-6
  # seed 1: the student's own random init is far from the teacher's weights, so a start_from
  # that did nothing would fail the bound below by orders of magnitude.
  config.train.update(steps=2, lr=lr, warmup_steps=0, ema_decay=0.95, log_every=1, seed=1,
                      checkpoint_every=2, sample_every=2 if guidance_embed else 0,
                      async_checkpointing=False)
  result = trainer.train(config, str(tmp_path), make_data=make_data)
  assert result.step == 2 and np.isfinite(result.metrics["loss"]) and result.metrics["loss"] > 0
  _, teacher = checkpoint.load_weights(str(teacher_dir), which="ema")
  _, student = checkpoint.load_weights(str(tmp_path), which="params")
  trained = unet.without_guidance(student["unet"])
  assert ("cond_proj" in student["unet"]["time_embedding"]) == guidance_embed
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                       teacher["unet"], trained))
  bound = 2 * lr * (1 + config.train.weight_decay * max(
      float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(teacher["unet"]))) * 1.01
  assert max(diffs) <= bound, (max(diffs), bound)
  assert max(diffs) > 0  # it did train
  if guidance_embed:  # from zeros, two updates
    proj = np.abs(np.asarray(student["unet"]["time_embedding"]["cond_proj"]["kernel"]))
    assert 0 < proj.max() <= bound, (proj.max(), bound)
  assert os.path.isfile(tmp_path / "samples" / "step_0000002.png") == guidance_embed


@pytest.mark.parametrize("change, match", [
    (dict(teacher=""), "needs objective.teacher"),
    (dict(loss="l1"), "unknown objective.loss"),
    (dict(solver_steps=0), "objective.solver_steps must be in"),
    (dict(teacher_weights="best"), "teacher_weights must be"),
    (dict(cfg_range=(1.0, 6.0)), "set model.guidance_embed=True"),
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
  config = _student_config(tiny_run[0])  # a teacher of another latent size (SwD's 64 px path)
  from ldm_scaling import data  # pylint: disable=g-import-not-at-top
  side = data.latent_size(config)
  config.data.resolution *= 2
  with pytest.raises(ConfigError, match=f"trained on {side}x{side} latents .* here they are "
                                        f"{2 * side}x{2 * side}"):
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


# -------------------------------------------------------------------------------------------------
# The guidance-conditioned student (LCM's w embedding): model, objective, sampling, compute.


def _two_level(guidance_embed):
  """The two-level UNet of the session's tiny teacher (every layer kind; compiles in seconds)."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.model.update(channel_mult=(1, 2), attn_levels=(True, False), layers_per_block=1,
                      guidance_embed=guidance_embed)
  return config


def _unet_inputs(batch=2, side=8, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(batch, side, side, 4).astype(np.float32),
          np.array([10.0, 500.0, 900.0, 250.0][:batch], np.float32),
          rng.randn(batch, 7, 24).astype(np.float32))


def test_guidance_embedding_is_lcm_diffusers():
  """The w embedding is diffusers' LCM pipeline's ``get_guidance_scale_embedding(w - 1, 256)``
  (LCM writes the scale as w - 1): 0 at cfg 1 is [sin 0, cos 0] = [0..., 1...]."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  scales = np.array([1.0, 1.5, 3.0, 4.25, 6.0, 8.0], np.float32)
  ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding
  want = ref(None, torch.from_numpy(scales - 1), embedding_dim=unet.GUIDANCE_EMBED_DIM).numpy()
  got = np.asarray(unet.guidance_embedding(jnp.asarray(scales)))
  assert got.shape == (6, 256)
  # Arguments up to 7000 rad in float32: the two exp() roundings differ by an ulp of the phase.
  np.testing.assert_allclose(got, want, atol=2e-3)
  np.testing.assert_array_equal(got[0], np.r_[np.zeros(128), np.ones(128)])


def test_guidance_embedded_unet_is_diffusers_time_cond_proj_unet():
  """With ``model.guidance_embed`` the UNet equals diffusers' UNet2DConditionModel with
  ``time_cond_proj_dim=256`` fed ``timestep_cond`` = LCM's embedding of w - 1, weights moved over
  by the rename table alone (``time_embedding.cond_proj.weight``); different w give different
  outputs. With a zero ``cond_proj`` (a student starting as its teacher) it is bit for bit the
  UNet without the w input, at every w. w is required with the embedding and refused without."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ldm_scaling import models  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import convert, cost, unet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = _two_level(True)
  model = models.build(config.model)
  heads = tuple(model.heads(32 * m)[0] for m in (1, 2))
  ref = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
      attention_head_dim=heads, use_linear_projection=True, norm_num_groups=32, sample_size=8,
      time_cond_proj_dim=unet.GUIDANCE_EMBED_DIM).eval()
  x, t, ctx = _unet_inputs()
  w = np.array([1.5, 6.0], np.float32)
  template = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, w=w)["params"]
  params = convert.convert_state_dict(ref.state_dict(), template)
  assert cost.count_params(params) == sum(p.numel() for p in ref.parameters())
  apply = jax.jit(lambda p, w: model.apply({"params": p}, x, t, ctx, w=w))
  y = np.asarray(apply(params, w))
  cond = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
      None, torch.from_numpy(w - 1), embedding_dim=unet.GUIDANCE_EMBED_DIM)
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
               torch.from_numpy(ctx), timestep_cond=cond).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-4)
  swapped = np.asarray(apply(params, w[::-1]))
  assert np.abs(swapped - y).max() > 1e-3  # each row reads its own w

  # A zero cond_proj: the UNet without guidance_embed, exactly.
  plain = models.build(_two_level(False).model)
  teacher = unet.without_guidance(params)
  assert "cond_proj" not in teacher["time_embedding"]
  assert cost.count_params(params) - cost.count_params(teacher) == 256 * 32
  y_teacher = np.asarray(jax.jit(lambda p: plain.apply({"params": p}, x, t, ctx))(teacher))
  student = unet.with_zero_guidance(jax.device_get(teacher), template)
  np.testing.assert_array_equal(np.asarray(apply(student, w)), y_teacher)
  np.testing.assert_array_equal(np.asarray(apply(student, w[::-1])), y_teacher)
  with pytest.raises(ConfigError, match="needs the guidance scale w"):
    model.apply({"params": params}, x, t, ctx)
  with pytest.raises(ConfigError, match="without model.guidance_embed"):
    plain.apply({"params": teacher}, x, t, ctx, w=w)


def test_per_example_scales_reach_the_teacher_target():
  """With one scale per example the loss equals the loss of a teacher that returns
  ``u + w_b (c - u)`` with each row's own scale, written out by hand, at cfg 1; giving the rows
  each other's scales, or all the mean scale, changes it."""
  schedule = diffusion.Schedule()
  exact = refs.analytic_apply(schedule, "eps")
  rng = np.random.RandomState(3)
  b = 8
  ctx = jnp.asarray(rng.randn(b, 3, 4).astype(np.float32))
  uncond = jnp.asarray(rng.randn(1, 3, 4).astype(np.float32))
  x0 = refs.data_mean(ctx) + refs.S * jnp.asarray(rng.randn(b, 4, 4, 4).astype(np.float32))
  w = jnp.asarray(np.linspace(1.0, 6.0, b, dtype=np.float32))
  kw = dict(schedule=schedule, prediction="eps", solver_steps=50, timestep_scaling=10.0,
            loss="l2")
  net = lambda p: (lambda x, t, c: p * exact(None, x, t, c))

  def loss(cfg, teacher=None):
    return cd.distillation_loss(net(1.1), net(1.0), teacher or net(1.0), x0, ctx, uncond,
                                jax.random.key(4), cfg_scale=cfg, **kw)[0]

  def by_hand(x, t, c):
    cond = exact(None, x, t, c)
    unc = exact(None, x, t, jnp.broadcast_to(uncond, c.shape))
    return unc + w[:, None, None, None] * (cond - unc)

  guided = jax.jit(loss)
  per_example = float(guided(w))
  np.testing.assert_allclose(per_example, float(jax.jit(lambda: loss(1.0, by_hand))()),
                             rtol=1e-5)
  assert abs(per_example - float(guided(w[::-1]))) > 1e-3 * per_example
  assert abs(per_example - float(guided(jnp.full_like(w, jnp.mean(w))))) > 1e-3 * per_example


class _TagNet:
  """A stand-in UNet for wiring checks: its output is the parameter ``tag`` plus 100 w (when it
  takes w), so an output says which parameters and which scales it got."""

  def __init__(self, embedded):
    self.embedded = embedded

  def apply(self, variables, x, t, c, train=False, w=None, rngs=None):
    del t, c, train, rngs
    assert (w is not None) == self.embedded
    p = variables["params"]
    assert ("cond_proj" in p["time_embedding"]) == self.embedded  # the teacher's has none
    out = jnp.zeros_like(x) + p["tag"]
    return out if w is None else out + 100 * w[:, None, None, None]


def test_objective_draws_a_scale_per_example_for_teacher_student_and_target(monkeypatch):
  """The objective's loss hands the teacher a (B,) scale drawn in objective.cfg_range; its
  student and target are the student UNet at those same scales with their own parameters; its
  teacher is the UNet without the w input, on the teacher's parameters less cond_proj. (UNets
  replaced by :class:`_TagNet`: the real one's w input is tested against diffusers above.)"""
  config = _two_level(True)
  config.data.resolution = 64  # 8x8 latents
  config.objective.update(name="consistency", inputs="embeddings", teacher="unused",
                          cfg_scale=4.0, cfg_range=(1.5, 6.0), solver_steps=10)
  obj = objectives.build(config)
  obj.unet, obj.teacher_unet = _TagNet(True), _TagNet(False)
  tree = lambda tag: {"tag": jnp.float32(tag), "time_embedding": {"cond_proj": jnp.zeros(2)}}
  params, ema = {"unet": tree(1.0)}, {"unet": tree(2.0)}
  from ldm_scaling.train.objectives import base  # pylint: disable=g-import-not-at-top
  frozen = {"teacher": base.Frozen(None, tree(3.0)), "uncond": base.Frozen(None, jnp.zeros(1))}
  x, _, ctx = _unet_inputs(batch=4)
  seen = {}

  def capture(student, target, teacher, x0, context, uncond, rng, **kw):
    seen.update(student=student, target=target, teacher=teacher, **kw)
    return jnp.float32(0), {}
  monkeypatch.setattr(cd, "distillation_loss", capture)
  obj.loss(params, frozen, ema, {"latents": x, "context": ctx}, jax.random.key(7))
  w = np.asarray(seen["cfg_scale"])
  assert w.shape == (4,) and np.all((1.5 <= w) & (w < 6.0)) and np.ptp(w) > 0
  first = lambda net: np.asarray(net(x, np.zeros(4), ctx))[:, 0, 0, 0]
  np.testing.assert_allclose(first(seen["student"]), 1.0 + 100 * w, rtol=1e-6)
  np.testing.assert_allclose(first(seen["target"]), 2.0 + 100 * w, rtol=1e-6)
  np.testing.assert_array_equal(first(seen["teacher"]), np.full(4, 3.0))
  assert obj.preview_scale() == 3.75


@pytest.mark.parametrize("model_embed, cfg_range, match", [
    (False, (1.0, 6.0), "set model.guidance_embed=True"),
    (True, (), "needs objective.cfg_range"),
    (True, (0.5, 6.0), r"1 <= lo <= hi"),
    (True, (6.0, 2.0), r"1 <= lo <= hi"),
    (True, (1.0, 2.0, 3.0), "two finite numbers"),
])
def test_bad_cfg_range_settings_are_clear_errors(model_embed, cfg_range, match):
  with pytest.raises(ConfigError, match=match) as e:
    cd.check_cfg_range(cfg_range, model_embed)
  assert "\n" not in str(e.value)
  assert cd.check_cfg_range((1.0, 6.0), True) == (1.0, 6.0)
  assert cd.check_cfg_range((), False) is None


def test_one_student_sampled_over_a_cfg_grid_with_one_forward_per_step():
  """generate.generate gives each cell's scale to a guidance-embedded model as its input: the
  cell at scale w equals the model sampled unguided with its input fixed at w (same noise and
  keys, by hand), so equal scales give the same images and different ones different images;
  every model call sees the B rows (no unconditional half), and every cell costs 1 forward per
  step even when the convention counts guided steps twice (a plain model at cfg 3 is called on
  2B rows and costs 2 per step). The model is a stand-in whose eps depends on w (the real UNet's
  w input is tested against diffusers above)."""
  from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
  config = _two_level(True)
  config.objective.solver_steps = 10
  config.cost.count_uncond_pass = True
  rows = []

  def model(p, x, t, ctx, w):  # an eps-predictor that depends on the context and on w
    rows.append((x.shape[0], w.shape))
    return p * x + 0.1 * w[:, None, None, None] * jnp.mean(ctx, axis=(1, 2))[:, None, None, None]
  scales = [1.5, 3.0, 3.0, 6.0]
  conditioning = generate.random_conditioning(config.text.max_length, 24)
  kw = dict(sampler="lcm", steps=2, seed=0, batch_size=8, latent_size=8, norm_cost=0.5,
            conditioning=conditioning, decoding=generate.latent_preview(), log=lambda _: None)
  out = generate.generate(config, ["a", "b"], apply_fn=model, params=jnp.float32(0.3),
                          cfg_scales=scales, **kw)
  assert rows and all(r == (8, (8,)) for r in rows), rows
  np.testing.assert_array_equal(out.cost, np.full(8, 0.5 * 2))
  lat = out.latents.reshape(2, 4, *out.latents.shape[1:])
  np.testing.assert_array_equal(lat[:, 1], lat[:, 2])
  for i, j in ((0, 1), (1, 3), (0, 3)):
    assert np.abs(lat[:, i] - lat[:, j]).max() > 1e-3, (i, j)
  # By hand: prompt p's noise and keys (generate's convention), the model's w fixed at 6.
  keys = [jax.random.fold_in(jax.random.key(0), p) for p in (0, 1)]
  noise = jnp.stack([jax.random.normal(jax.random.fold_in(k, 0), (8, 8, 4)) for k in keys])
  fixed = lambda p, x, t, ctx: model(p, x, t, ctx, jnp.full((x.shape[0],), 6.0))
  want = diffusion.run(fixed, jnp.float32(0.3), noise, conditioning.encode(["a", "b"]),
                       key=jnp.stack([jax.random.fold_in(k, 1) for k in keys]),
                       schedule=diffusion.Schedule(), sampler="lcm", steps=2,
                       options=diffusion.options_from_config(config))
  np.testing.assert_allclose(lat[:, 3], np.asarray(want), rtol=1e-5, atol=1e-6)

  plain_config = _two_level(False)
  plain_config.objective.solver_steps = 10
  plain_config.cost.count_uncond_pass = True
  plain_rows = []

  def plain(p, x, t, ctx):
    plain_rows.append(x.shape[0])
    return p * x
  out = generate.generate(plain_config, ["a"], apply_fn=plain, params=jnp.float32(0.3),
                          cfg_scales=[1.0, 3.0], **dict(kw, batch_size=2))
  assert plain_rows and all(r == 4 for r in plain_rows), plain_rows
  np.testing.assert_array_equal(out.cost, [0.5 * 2, 0.5 * 2 * 2])


def test_distillation_compute_counts_the_teachers_passes(monkeypatch):
  """In the table's units (norm_cost x step per forward + backward): a guided step costs the
  student's 3 forwards + the teacher's 2 (at the teacher's cost) + the target's 1, over 3; at a
  fixed cfg 1 the teacher runs once; the teacher's own training is priced apart, rescaled by the
  batch sizes."""
  from ldm_scaling.models import cost as costlib  # pylint: disable=g-import-not-at-top
  costs = {True: 0.30, False: 0.25}  # student (w embedding), teacher: told apart by the model
  monkeypatch.setattr(costlib, "model_cost", lambda m, c: costlib.ModelCost(
      m.width, 0, 0.0, costs[bool(m.guidance_embed)]))
  teacher = _two_level(False)
  teacher.train.batch_size = 64
  student = _two_level(True)
  student.train.batch_size = 32
  student.objective.update(name="consistency", cfg_range=(1.0, 6.0))
  got = consistency.distillation_compute(student, 100, teacher_config=teacher, teacher_steps=1500)
  want = dict(student_passes=0.30 * 100, teacher_forwards=0.25 * 100 * 2 / 3,
              target_forwards=0.30 * 100 / 3, teacher_training=0.25 * 1500 * 64 / 32)
  want["student"] = want["student_passes"] + want["teacher_forwards"] + want["target_forwards"]
  want["total"] = want["student"] + want["teacher_training"]
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)
  plain = _two_level(False)
  plain.objective.update(name="consistency", cfg_scale=1.0)
  got = consistency.distillation_compute(plain, 100, teacher_config=teacher, teacher_steps=1500)
  np.testing.assert_allclose(got["teacher_forwards"], 0.25 * 100 / 3)
  np.testing.assert_allclose(got["student"], 0.25 * 100 * (3 + 1 + 1) / 3)
