"""Plans before launch (ldm_scaling/launch/plan.py): the trainer's step compiled ahead of time for a
TPU slice by libtpu's compiler on this CPU host, its memory, FLOPs and collectives."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_scaling import sharding as sh
from ldm_scaling.errors import ConfigError
from ldm_scaling.launch import plan as plan_lib

# Slice grids of the Cloud TPU docs' tables (v4/v5p: 3-D, v5e/v6e: 2-D; names count cores).
SLICES = {"v4-8": "2x2x1", "v4-32": "2x2x4", "v5p-8": "2x2x1", "v5p-16": "2x2x2",
          "v5p-32": "2x2x4", "v5p-64": "2x4x4", "v5p-128": "4x4x4", "v5p-256": "4x4x8",
          "v5p-512": "4x8x8", "v5litepod-1": "1x1", "v5e-4": "2x2", "v5litepod-8": "2x4",
          "v5e-16": "4x4", "v5e-32": "4x8", "v5e-64": "8x8", "v5e-128": "8x16",
          "v5e-256": "16x16", "v6e-8": "2x4", "v6e-256": "16x16"}


def test_slice_shapes_are_the_cloud_tpu_tables_and_libtpu_knows_them():
  for name, shape in SLICES.items():
    topo = plan_lib.parse_topology(name)
    assert plan_lib.slice_shape(topo) == shape, name
    assert int(np.prod([int(d) for d in shape.split("x")])) == topo.chips
  for name in ("v5p-256", "v5e-4", "v4-32", "v6e-16"):  # the compiler's own device count
    topo = plan_lib.parse_topology(name)
    assert len(plan_lib.tpu_devices(topo)) == topo.chips
  # The variable that quiets libtpu's probe is not left behind: it would make later processes
  # believe they run on a TPU VM (distributed.on_tpu_vm).
  assert "TPU_ACCELERATOR_TYPE" not in os.environ and "TPU_WORKER_HOSTNAMES" not in os.environ
  # A second process planning at the same time (CI's other worker, a user's second shell).
  script = ("from ldm_scaling.launch import plan as p\n"
            "print(len(p.tpu_devices(p.parse_topology('v5e-4'))))\n")
  other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True)
  assert other.stdout.split() == ["4"]
  assert "TPU worker hostnames" not in other.stderr, other.stderr[-2000:]  # no probe errors
  with pytest.raises(ConfigError, match="4 x 2\\^k chips"):
    plan_lib.slice_shape(plan_lib.parse_topology("v5p-12"))
  with pytest.raises(ConfigError, match="unknown TPU accelerator type"):
    plan_lib.parse_topology("v7-8")


_HLO = """HloModule m

%all-reduce-scatter.1 (input_0: f32[8,16]) -> f32[2,16] {
  %input_0 = f32[8,16]{1,0} parameter(0)
  %all-reduce.9 = f32[8,16]{1,0} all-reduce(%input_0), channel_id=1, to_apply=%add
  ROOT %ds = f32[2,16]{1,0} dynamic-slice(%all-reduce.9, %c, %c), dynamic_slice_sizes={2,16}
}

ENTRY %main (p0: f32[2,16], p1: bf16[4]) -> f32[] {
  %p0 = f32[2,16]{1,0} parameter(0)
  %all-gather.1 = f32[8,16]{1,0:T(8,128)} all-gather(%p0), channel_id=2, dimensions={0}
  %ags = (bf16[4]{0}, bf16[16]{0}) all-gather-start(%p1), channel_id=3, dimensions={0}
  %agd = bf16[16]{0} all-gather-done(%ags)
  %all-reduce.2 = (f32[]{:T(128)}, f32[3,5]{1,0}) all-reduce(%a, %b), channel_id=4
  %fusion.7 = f32[2,16]{1,0:T(8,128)S(1)} fusion(%x), kind=kCustom, calls=%all-reduce-scatter.1
}
"""


def test_collectives_of_a_hand_written_module():
  """Sizes by hand: all-gathers 8*16*4 and 16*2 bytes (the async one counted once, its result
  half), the tuple all-reduce 4 + 15*4, the fused reduce-scatter once (2*16*4), not as the
  all-reduce in its body."""
  got = plan_lib.collectives(_HLO)
  assert got == {"all-gather": dict(count=2, bytes=512 + 32, largest=512),
                 "all-reduce": dict(count=1, bytes=64, largest=64),
                 "reduce-scatter": dict(count=1, bytes=128, largest=128)}


def _small_config(width=64):
  """A one-level UNet (every layer kind but attention) whose weights all shard over fsdp = 4 (only
  the 1-D norm scales and biases stay whole); the TPU compile takes under a minute here."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(width=width)
  config.model.update(channel_mult=(1,), attn_levels=(False,), layers_per_block=1, norm_groups=8)
  config.objective.inputs = "embeddings"
  config.mesh.update(data=1, fsdp=4)
  config.train.update(batch_size=8, seed=5)
  config.text.max_length = 8
  return config


@pytest.fixture(scope="module")
def small_plan():
  return plan_lib.plan_train(_small_config(), "v5e-4")


@pytest.mark.slow
def test_small_unet_planned_for_v5e_4_with_fsdp(small_plan):
  """The real train step on a 4-chip v5e slice, mesh (1, 4, 1): each chip holds a quarter of the
  training state (within 5 %: the 1-D norm and bias parameters stay whole), the step gathers
  parameters and reduce-scatters gradients (FSDP; at batch 8 the compiler may gather activations
  for some weight gradients instead), and no all-gather is larger than the largest parameter (the
  full set is never gathered at once)."""
  plan = small_plan
  assert plan.chips == 4 and plan.slice_shape == "2x2"
  assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert plan.state_bytes_per_device == pytest.approx(plan.state_bytes / 4, rel=0.05)
  whole = [a.shape for a, s in zip(jax.tree.leaves(plan.abstract_state),
                                   jax.tree.leaves(plan.state_shardings))
           if s.shard_shape(a.shape) == a.shape]
  assert whole and all(len(shape) <= 1 for shape in whole)  # every weight matrix/kernel shards
  (step,) = plan.programs
  assert step.name == "train/denoise" and step.flops > 0
  assert step.argument_bytes > 0 and step.temp_bytes > 0 and step.alias_bytes > 0  # donated
  c = step.collectives
  assert c["all-gather"]["count"] > 0 and c["reduce-scatter"]["count"] > 0
  from ldm_scaling.train import objectives  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(objectives.build(_small_config()).init, jax.random.key(0))
  leaves = [np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
            for x in jax.tree.leaves(sh.unbox(params))]
  assert c["all-gather"]["largest"] <= max(leaves) < sum(leaves)
  assert plan.fits and plan.bytes_per_device == step.total_bytes
  keys = plan.to_json()
  assert {"fits", "bytes_per_device", "hbm_bytes_per_device", "flops_per_step", "mesh",
          "overrides"} <= set(keys)
  assert keys["flops_per_step"] == pytest.approx(4 * step.flops)
  assert "--config.mesh.fsdp=4" in keys["overrides"]
  # The estimate's training state is the trainer's, sharded by the same rules: the compiler's
  # figure to the byte; the gradients are the parameters' share of it (params, EMA, Adam m, v).
  from ldm_scaling.launch import estimate as est  # pylint: disable=g-import-not-at-top
  state, grads, total = est.state_bytes(_small_config(), (1, 4, 1))
  assert (state, total) == (plan.state_bytes_per_device, plan.state_bytes)
  assert grads == pytest.approx(state / 4, rel=1e-4)  # (the state also holds its step counter)


@pytest.mark.slow
def test_a_plan_that_does_not_fit_is_refused_with_need_and_hbm(small_plan, monkeypatch, capsys):
  from ldm_scaling import cli  # pylint: disable=g-import-not-at-top
  tight = dataclasses.replace(small_plan, hbm_bytes_per_device=small_plan.bytes_per_device - 1)
  assert not tight.fits
  monkeypatch.setattr(plan_lib, "plan_train", lambda *a, **k: tight)
  assert cli.main(["plan", "--config", "configs/t2i.py:width=64", "--topology", "v5e-4"]) == 2
  out = capsys.readouterr().out
  assert "does NOT fit: needs" in out and "per chip, has" in out


def test_the_planned_step_is_the_objectives_loss_on_one_cpu():
  """``trainer.build_program``'s step (what ``train`` and ``plan`` both jit) on this host's one
  CPU device: its loss is the objective's loss evaluated directly with the step's key, and the
  parameters it returns are one AdamW step away (not the same)."""
  from ldm_scaling.train import objectives, trainer  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  config = _small_config(width=16)
  config.mesh.update(data=-1, fsdp=1)
  config.train.warmup_steps = 0  # (a warmup's first step has learning rate 0)
  objective = objectives.build(config)
  mesh = sh.make_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.RandomState(0)
  batch = {"latents": rng.randn(8, 8, 8, 4).astype(np.float32),
           "context": rng.randn(8, 8, config.model.cross_attn_dim).astype(np.float32)}
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sh.LOGICAL_RULES):
    program = trainer.build_program(config, objective, {}, mesh)
    init_key, step_key = trainer.run_keys(config.train.seed)
    state = jax.jit(lambda k: sh.unbox(program.init_state(k, {})))(init_key)
    params = jax.tree.map(np.asarray, state.params)  # the step donates the state
    (phase,) = objective.phases()
    want, _ = jax.jit(phase.loss)(params, {}, state.ema, batch, jax.random.fold_in(step_key, 0))
    new, metrics = program.steps.at(0)[1](state, batch, {})
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)
  assert int(new.step) == 1
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a - b)).max()),
                                       new.params, params))
  assert max(moved) > 0


def test_cpu_runs_skip_the_tpu_probe_with_libtpu_installed():
  """libtpu is installed here (the test extra). A CPU process configured by the package sees its
  CPU only, and libtpu's host probe (its errors about TPU worker hostnames) does not run; the TPU
  compiler is still reachable for plans."""
  script = ("from ldm_scaling import runtime; runtime.configure_jax()\n"
            "import jax; print(jax.default_backend(), jax.device_count())\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE")}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300, check=True)
  assert proc.stdout.split() == ["cpu", "1"]
  assert "TPU" not in proc.stderr, proc.stderr[-2000:]


def test_plans_build_the_tpu_programs_not_this_hosts():
  """The model's CPU-only choices (attention in query chunks, weight gradients split by example)
  follow the platform being built for: a plan's TPU programs keep attention dense, as on the VMs;
  nothing changes outside the block."""
  from ldm_scaling.models import layers  # pylint: disable=g-import-not-at-top
  shapes = ((8, 64, 64, 320), (3, 3, 320, 320))
  assert layers.query_chunk_for(-1, 4096) == layers.CPU_QUERY_CHUNK
  assert layers.split_weight_grad_pieces(*shapes) == 8
  with layers.building_for("tpu"):
    assert layers.target_backend() == "tpu"
    assert layers.query_chunk_for(-1, 4096) == 0
    assert layers.split_weight_grad_pieces(*shapes) == 1
    assert layers.query_chunk_for(256, 4096) == 256  # an explicit setting is kept
  assert layers.target_backend() == "cpu"


def test_residuals_per_example_by_hand():
  """The estimate's activations: what the backward of ``sum((x @ W)^2)`` keeps per example is x
  (16 floats, for dW) and x @ W (8 floats, for the square's derivative); W itself, which does not
  grow with the batch, cancels. A bf16 cast of x halves its part."""
  from ldm_scaling.launch import estimate as est  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  w = jax.ShapeDtypeStruct((16, 8), jnp.float32)
  x = jax.ShapeDtypeStruct((1, 16), jnp.float32)
  assert est._residuals(lambda w, x: ((x @ w) ** 2).sum(), w, x) == 4 * (16 + 8)
  half = lambda w, x: ((x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32)
                       ** 2).sum()
  assert est._residuals(half, w, x) == 2 * 16 + 4 * 8


@pytest.mark.slow
def test_plan_estimate_and_search_from_the_command_line(capsys):
  """``plan --estimate --json``: one JSON object (no libtpu, no compile); ``--search --estimate``
  ranks candidates and names the cheapest that fits as overrides; a batch no setting fits exits
  2 and says so."""
  from ldm_scaling import cli  # pylint: disable=g-import-not-at-top
  base = ["plan", "--config", "configs/cpu_t2i.py:width=32", "--topology", "v5e-4", "--estimate"]
  assert cli.main(base + ["--batch", "8", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["fits"] and out["bytes_per_device"] < out["hbm_bytes_per_device"] == 16 * 2**30
  assert out["setting"] == dict(fsdp=1, tensor=1, remat="none", attn_kernel="xla",
                                dtype="float32")
  assert out["chip_hours_500k"] == pytest.approx(out["step_seconds"] * 500_000 * 4 / 3600)
  assert cli.main(base + ["--batch", "8", "--search"]) == 0
  text = capsys.readouterr().out
  assert "candidates estimated" in text and "cheapest setting that fits by the estimate: " \
      "--config.mesh.data=4 --config.mesh.fsdp=1" in text
  assert "--config.mesh.data=4 --config.mesh.fsdp=1 --config.mesh.tensor=1" in text
  # A batch of 2 cannot split over 4 chips: only a tensor axis of 2 (or more) uses them all.
  assert cli.main(base + ["--batch", "2", "--search"]) == 0
  assert "cheapest setting that fits by the estimate: --config.mesh.data=2 " \
      "--config.mesh.fsdp=1 --config.mesh.tensor=2" in capsys.readouterr().out
  assert cli.main(base + ["--batch", str(2**20), "--search"]) == 2
  assert "no candidate fits by the estimate" in capsys.readouterr().out


@pytest.mark.slow
def test_the_eval_samplers_program_planned_on_one_vm():
  """The eval grid's sampling program (the whole guided DDIM trajectory, one ``lax.scan``) for one
  v5e VM's chips: 6 images round up to 8 rows over 4 chips; XLA counts the loop body once, so the
  FLOPs are those of one step whatever the step count, and one guided step is two UNet forwards
  per image (the cost model's count, measured apart) give or take the sampler's elementwise
  arithmetic; bfloat16 weights save at least half the per-chip parameter bytes; each weight is gathered where used (FSDP), never the whole set at once."""
  from ldm_scaling import data  # pylint: disable=g-import-not-at-top
  from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import cost  # pylint: disable=g-import-not-at-top
  config = _small_config()
  config.eval.update(batch_size=6, steps=(4,), samplers=("ddim",), cfg_scales=(3.0,))
  config.cost.update(latent_size=data.latent_size(config), text_len=config.cost.text_len)
  # A process of a 256-chip slice has one VM's chips: 8 on v5e, 4 on v5p.
  assert len(plan_lib.one_vm(plan_lib.parse_topology("v5e-256"))) == 8
  assert len(plan_lib.one_vm(plan_lib.parse_topology("v5p-256"))) == 4
  devices = plan_lib.tpu_devices(plan_lib.parse_topology("v5e-4"))
  f32 = plan_lib.plan_sample(config, devices)
  assert f32.name.startswith("sample/ddim-4 (8 images, guided") and f32.chips == 4
  _, gflops = cost.measure(config.model, config.cost)
  assert f32.flops * 4 == pytest.approx(2 * 8 * gflops * 1e9, rel=0.05)
  config.eval.steps = (8,)
  assert plan_lib.plan_sample(config, devices).flops == f32.flops
  config.eval.update(steps=(4,), param_dtype="bfloat16")
  bf16 = plan_lib.plan_sample(config, devices)
  mesh = sh.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  model = generate.models.build(config.model)
  abstract = sh.unbox(generate.abstract_params(model))
  per_chip, whole = plan_lib.shard_bytes(abstract, generate.unet_shardings(config, mesh))
  # The TPU pads small arrays to its tiles (f32 8x128, bf16 16x128), and this UNet's are small:
  # the saving is at least half the unpadded f32 bytes, at most all of them.
  saved = f32.argument_bytes - bf16.argument_bytes
  assert per_chip / 2 <= saved <= per_chip
  c = f32.collectives["all-gather"]
  assert c["count"] > 0 and c["largest"] < whole / 2


def test_a_program_the_compiler_refuses_for_want_of_hbm_is_reported_not_raised():
  """The TPU compiler refuses a program whose temporaries exceed a chip's HBM before it has a
  memory analysis. The plan keeps its figure: ``cumsum(outer(x, x))`` over n = 98,304 floats
  holds the n x n product and its running sum, 2 x 36 GiB, on a 16 GiB v5e chip; the argument
  is x, replicated (n x 4 bytes). Such a plan does not fit and says why; other compile errors
  are raised."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 3 * 2**15
  mesh = jax.sharding.Mesh(np.array(plan_lib.tpu_devices(plan_lib.parse_topology("v5e-4"))),
                           ("x",))
  x = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sh.replicated(mesh))
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda x: jnp.cumsum(jnp.outer(x, x), axis=0)[-1]).lower(x)
  big = plan_lib.Compiled.of("train/big", lowered, args=(x,))
  assert big.out_of_memory.startswith("RESOURCE_EXHAUSTED")
  assert big.temp_bytes == pytest.approx(2 * n * n * 4, rel=0.01)
  assert big.argument_bytes == 4 * n and big.total_bytes == big.temp_bytes + 4 * n
  plan = plan_lib.Plan(topology="v5litepod-4", slice_shape="2x2", chips=4,
                       hbm_bytes_per_device=16 * 2**30, mesh={"data": 1, "fsdp": 4, "tensor": 1},
                       batch=8, programs=[big], state_bytes_per_device=0, state_bytes=0,
                       notes=[], overrides=[])
  assert not plan.fits
  assert "does NOT compile: the TPU compiler ran out of HBM" in plan_lib.format_plan(plan)
  assert json.loads(json.dumps(plan.to_json()))["programs"][0]["out_of_memory"]
  assert plan_lib.out_of_memory_bytes("INTERNAL: something else") is None
