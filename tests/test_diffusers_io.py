"""diffusers pipelines in and out (``ldm_scaling.models.diffusers_io``) against diffusers itself.

One tiny random SD-2.x pipeline (v-prediction, DDIM, linear projections) is built once with every
norm scale and bias randomised (a dropped norm or bias changes every output), saved with
``save_pretrained`` and imported; the project's sampling path must then reproduce diffusers'
``StableDiffusionPipeline`` from the same initial latents, and export -> import must be bit-exact.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling.models import diffusers_io

PROMPTS = ["a red circle above a blue square", "two green triangles"]
CFG, STEPS, SEED = 5.0, 4, 3


def _perturb(module, rng):
  """Every bias and every norm scale randomised (diffusers initialises them to 0 / 1)."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias") or (p.ndim == 1 and "norm" in name):
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(torch.from_numpy(base + 0.3 * rng.standard_normal(p.shape).astype(np.float32)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """(pipeline dir, diffusers pipeline, imported workdir)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import tokenizer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      sample_size=16)
  for m in (unet, vae):
    _perturb(m, rng)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      max_position_embeddings=77, vocab_size=tokenizer.VOCAB_SIZE, hidden_act="gelu"))
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
      set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer.bpe_tokenizer(77), unet=unet,
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  root = tmp_path_factory.mktemp("diffusers")
  src = str(root / "sd2")
  pipe.save_pretrained(src)
  workdir = str(root / "imported")
  base = cfglib.base_config()  # the sections a pipeline does not describe: a tiny training run
  base.data.update(data_dir=str(root / "data"), shapes_sizes=(16, 8))
  base.train.update(batch_size=2, steps=2, async_checkpointing=False)
  diffusers_io.import_pipeline(src, workdir, base_config=base, log=lambda _: None)
  return src, pipe, workdir


@pytest.mark.slow  # the module's pipeline fixture builds and imports (~13 s)
def test_import_maps_the_configs(pipeline):
  src, _, workdir = pipeline
  from ldm_scaling.train import checkpoint  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_run_config(workdir)
  assert config.model.width == 32 and tuple(config.model.channel_mult) == (1, 2)
  assert tuple(config.model.attn_levels) == (True, False)
  assert (config.model.head_dim, config.model.num_heads) == (16, 0)  # 32 / 2 = 64 / 4 heads
  assert config.model.norm_groups == 8 and config.model.cross_attn_dim == 32
  assert (config.diffusion.prediction, config.diffusion.steps_offset) == ("v", 1)
  assert config.eval.samplers[0] == "ddim" and config.data.resolution == 16
  assert (config.vae.width, tuple(config.vae.channel_mult)) == (16, (1, 2))
  # The copies are byte for byte.
  for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
    with open(os.path.join(src, rel), "rb") as a, \
        open(os.path.join(workdir, "pipeline", rel), "rb") as b:
      assert a.read() == b.read()
  assert checkpoint.available_steps(workdir) == [0]
  # config.py beside config.json is the --config of a fine-tuning run: the same config.
  from ldm_scaling import experiment  # pylint: disable=g-import-not-at-top
  loaded = experiment.load(os.path.join(workdir, "config.py"))
  assert cfglib.config_hash(loaded) == cfglib.config_hash(config)


@pytest.mark.slow  # the sampler compiles and the text encoder loads (~15 s)
def test_sample_path_matches_stable_diffusion_pipeline(pipeline):
  """`ldm-scaling sample`'s path (checkpoint EMA, text encoder, sampler, VAE of the workdir)
  against StableDiffusionPipeline with the same DDIM scheduler, steps, scale, prompts and initial
  latents; the UNet's norms and biases are perturbed, so each one counts."""
  import torch  # pylint: disable=g-import-not-at-top
  from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  _, pipe, workdir = pipeline
  config, apply_fn, params, step = generate.from_checkpoint(workdir)
  assert step == 0
  conditioning, decoding = generate.components(config, required=True)
  result = generate.generate(
      config, PROMPTS, apply_fn=apply_fn, params=params, sampler="ddim", steps=STEPS,
      cfg_scales=[CFG], seed=SEED, batch_size=2, latent_size=8, conditioning=conditioning,
      decoding=decoding, norm_cost=1.0, log=lambda _: None)
  # generate()'s initial noise: prompt p starts from fold_in(fold_in(key(seed), p), 0).
  base = jax.random.key(SEED)
  noise = np.stack([np.asarray(jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(base, p), 0), (8, 8, 4))) for p in range(2)])
  with torch.no_grad():
    want = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=CFG, output_type="np",
                latents=torch.from_numpy(noise.transpose(0, 3, 1, 2))).images
  ours = np.asarray(vae_lib.load(config).decode_latents(result.latents))
  ours = np.clip((ours + 1) / 2, 0, 1)
  assert ours.shape == want.shape == (2, 16, 16, 3)
  assert np.abs(ours - want).max() <= 1e-3
  assert want.std() > 0.05  # not a constant image
  # The PNG path's uint8 images are the same pictures.
  assert np.abs(result.images.astype(int) - np.round(want * 255).astype(int)).max() <= 1


@pytest.mark.slow  # the module's pipeline fixture builds and imports (~13 s)
def test_unet_forward_equals_diffusers_with_perturbed_norms(pipeline):
  """The imported UNet (SD-2.x linear projections) and an SD-1.x-style one (1x1 convs) against
  diffusers' forward; every norm and bias is perturbed, so each one counts."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ldm_scaling.diffusion import generate  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import convert  # pylint: disable=g-import-not-at-top
  _, pipe, workdir = pipeline
  config, apply_fn, params, _ = generate.from_checkpoint(workdir, which="params")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([17.0, 901.0], np.float32)
  ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
  forward = jax.jit(apply_fn)
  got = np.asarray(forward(params, x, t, ctx))

  def reference(unet):
    with torch.no_grad():
      return unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, reference(pipe.unet), atol=1e-4, rtol=1e-4)

  # SD-1.x: 1x1-conv proj_in/proj_out (use_linear_projection=False) import onto our linear ones.
  ucfg = dict(pipe.unet.config, use_linear_projection=False)
  torch.manual_seed(1)
  sd1 = diffusers.UNet2DConditionModel.from_config(ucfg).eval()
  _perturb(sd1, np.random.default_rng(2))
  assert sd1.state_dict()["down_blocks.0.attentions.0.proj_in.weight"].ndim == 4
  fields, linear = diffusers_io.unet_fields(dict(ucfg))
  assert not linear and all(config.model[k] == v for k, v in fields.items())
  state = diffusers_io._linear_projections(  # pylint: disable=protected-access
      {k: v.numpy() for k, v in sd1.state_dict().items()})
  params = convert.convert_state_dict(state, diffusers_io.unet_template(config))
  np.testing.assert_allclose(np.asarray(forward(params, x, t, ctx)), reference(sd1), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.slow  # loads the text encoder and prepares data (~15 s)
def test_trainer_resumes_from_the_imported_checkpoint(pipeline, capsys):
  """`ldm-scaling train` on the workdir resumes from checkpoint 0 (fine-tuning starts from the
  imported weights): the trainer restores its whole state -- params, EMA, optimiser state of its
  own train.* settings -- with its own code; a checkpoint it cannot read would be moved aside and
  the run would raise."""
  from ldm_scaling.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top
  _, _, workdir = pipeline
  config = cfglib.with_defaults(checkpoint.load_run_config(workdir).to_dict())
  result = trainer.train(config, workdir, max_steps=0)  # restore, no step
  assert result.step == 0
  assert "resumed from step 0" in capsys.readouterr().err
  assert checkpoint.available_steps(workdir) == [0]
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "corrupt" in d]


@pytest.mark.slow  # the module's pipeline fixture builds and imports (~13 s)
def test_inverse_conversion_gives_diffusers_state_dicts_back(pipeline):
  """convert.to_state_dict is the exact inverse of convert_state_dict for the UNet and the VAE:
  the same keys as diffusers' modules, every tensor bit for bit."""
  from ldm_scaling.models import convert, vae  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import checkpoint  # pylint: disable=g-import-not-at-top
  _, pipe, workdir = pipeline
  config = checkpoint.load_run_config(workdir)
  template = vae.abstract_params(vae.from_config(config.vae), 16)
  for module, tmpl in ((pipe.unet, diffusers_io.unet_template(config)), (pipe.vae, template)):
    ref = {k: v.numpy() for k, v in module.state_dict().items()}
    back = convert.to_state_dict(convert.convert_state_dict(ref, tmpl))
    assert set(back) == set(ref)
    for k, v in ref.items():
      assert back[k].shape == v.shape and np.array_equal(back[k], v), k


@pytest.mark.slow  # an export, an import and diffusers' from_pretrained (~10 s)
def test_export_then_import_is_exact(pipeline, tmp_path):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import checkpoint  # pylint: disable=g-import-not-at-top
  src, pipe, workdir = pipeline
  out, again = str(tmp_path / "exported"), str(tmp_path / "reimported")
  diffusers_io.export_pipeline(workdir, out, log=lambda _: None)
  # The same data / train / eval sections as the first import, so whole configs compare.
  diffusers_io.import_pipeline(out, again, base_config=checkpoint.load_run_config(workdir),
                               log=lambda _: None)
  for which in ("params", "ema"):
    a = jax.tree.leaves_with_path(checkpoint.load_weights(workdir, which=which)[1])
    b = jax.tree.leaves_with_path(checkpoint.load_weights(again, which=which)[1])
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
      assert np.array_equal(np.asarray(x), np.asarray(y)), path
  paths = ("vae.weights", "text.encoder")
  first, second = (cfglib.flatten(checkpoint.load_run_config(w)) for w in (workdir, again))
  assert {k: v for k, v in first.items() if k not in paths} == \
      {k: v for k, v in second.items() if k not in paths}
  for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "tokenizer/vocab.json"):
    with open(os.path.join(src, rel), "rb") as a, open(os.path.join(out, rel), "rb") as b:
      assert a.read() == b.read(), rel
  assert sorted(os.listdir(os.path.join(out, "text_encoder"))) == ["config.json",
                                                                   "model.safetensors"]
  # diffusers loads the export, and its UNet is the original one bit for bit.
  loaded = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  assert isinstance(loaded.scheduler, diffusers.DDIMScheduler)
  assert loaded.scheduler.config.prediction_type == "v_prediction"
  ref = pipe.unet.state_dict()
  got = loaded.unet.state_dict()
  assert set(ref) == set(got)
  assert all(torch.equal(ref[k], got[k]) for k in ref)


def _write_configs(root, index, unet=None, folders=("unet", "vae", "text_encoder", "tokenizer",
                                                    "scheduler")):
  os.makedirs(root)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump(index, f)
  for folder in folders:
    os.makedirs(os.path.join(root, folder))
  if unet is not None:
    with open(os.path.join(root, "unet", "config.json"), "w") as f:
      json.dump(unet, f)
  return str(root)


SD2_UNET = dict(_class_name="UNet2DConditionModel", block_out_channels=[320, 640, 1280, 1280],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                use_linear_projection=True)


def test_sd2_and_sd1_unet_configs_map_onto_the_model():
  fields, linear = diffusers_io.unet_fields(SD2_UNET)
  assert linear and fields["width"] == 320 and fields["channel_mult"] == (1, 2, 4, 4)
  assert (fields["head_dim"], fields["num_heads"]) == (64, 0)
  sd1 = dict(SD2_UNET, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)
  fields, linear = diffusers_io.unet_fields(sd1)
  assert not linear and fields["num_heads"] == 8 and fields["cross_attn_dim"] == 768
  # The exported config maps back onto the same fields.
  config = cfglib.base_config()
  config.model.update(fields)
  assert diffusers_io.unet_fields(diffusers_io.unet_config(config.model, 64))[0] == fields


@pytest.mark.parametrize("index, unet, folders, field", [
    (dict(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "x"]), None,
     ("unet",), "_class_name"),
    (dict(_class_name="StableDiffusionPipeline"),
     dict(SD2_UNET, addition_embed_type="text_time", cross_attention_dim=2048), None,
     "addition_embed_type"),
    (dict(_class_name="StableDiffusionPipeline"),
     dict(SD2_UNET, transformer_layers_per_block=[1, 2, 10, 10]), None,
     "transformer_layers_per_block"),
    (dict(_class_name="StableDiffusion3Pipeline"), None, ("transformer",), "_class_name"),
    (dict(_class_name="StableDiffusionPipeline"), None, ("transformer", "vae"), "transformer/"),
    (dict(_class_name="StableDiffusionPipeline"), None, ("vae", "text_encoder", "tokenizer",
                                                         "scheduler"), "unet/"),
])
def test_other_architectures_are_refused_naming_the_field(tmp_path, index, unet, folders, field):
  src = _write_configs(tmp_path / "p", index, unet, folders or diffusers_io.FOLDERS)
  with pytest.raises(diffusers_io.PipelineError, match=re.escape(field)) as e:
    diffusers_io.import_pipeline(src, str(tmp_path / "w"), log=lambda _: None)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
  from ldm_scaling import cli  # pylint: disable=g-import-not-at-top
  rc = cli.main(["import-diffusers", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1
  assert "does not exist" in err and "import-diffusers" in err
  scfg = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "clip_sample": True}
  with pytest.raises(diffusers_io.PipelineError, match="clip_sample"):
    diffusers_io.scheduler_fields(scfg)
