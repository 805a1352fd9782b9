"""The small offline CLIP: trained briefly on the embedded dataset, it must retrieve held-out captions
far above chance, save as a loadable transformers checkpoint and serve as the text encoder."""

import json
import os

import numpy as np
import pytest

from ldm_scaling import config as cfglib
from ldm_scaling.components import clip as clip_component
from ldm_scaling.models import clip, offline, text


@pytest.fixture
def trained(offline_components):
  """The session's CLIP, trained for 150 steps on the embedded dataset."""
  o = offline_components
  return o.config, o.clip_dir, o.clip_logs


def test_retrieval_far_above_chance(trained):
  config, directory, _ = trained
  with open(os.path.join(directory, clip.META)) as f:
    meta = json.load(f)
  m = meta["retrieval"]
  assert m["n"] == 256
  # Chance is computed from the captions themselves (repeated captions count as hits).
  assert m["top1"] > 3 * m["chance_top1"], m
  assert m["top5"] > 3 * m["chance_top5"], m
  assert "stand-in" in meta["note"]
  again = clip_component.retrieval(config, directory, n=256, log=lambda *_: None)
  assert again == pytest.approx(m)


def test_saved_as_a_plain_transformers_checkpoint(trained):
  from transformers import CLIPProcessor, FlaxCLIPModel
  config, directory, _ = trained
  model = FlaxCLIPModel.from_pretrained(directory)
  processor = CLIPProcessor.from_pretrained(directory)
  img = np.zeros((32, 32, 3), np.uint8)
  inputs = processor(text=["two small red circles on a black background"], images=[img],
                     return_tensors="np", padding="max_length", max_length=32)
  np.testing.assert_allclose(inputs["pixel_values"], np.full((1, 3, 32, 32), -1.0), atol=1e-6)
  out = model(**inputs)
  assert out.logits_per_image.shape == (1, 1)
  # Same as our own preprocessing of a [-1, 1] image.
  feats = model.get_image_features(pixel_values=clip.pixel_values(np.full((1, 32, 32, 3), -1.0)))
  np.testing.assert_allclose(model.get_image_features(pixel_values=inputs["pixel_values"]), feats,
                             atol=1e-5)


def test_text_tower_conditions_the_unet(trained):
  config, directory, logs = trained
  enc = text.load_text_encoder(config)
  assert enc.hidden_size == config.model.cross_attn_dim == 128
  emb = enc.embed_text(["a large red circle at the left on a black background",
                        "a large red circle at the right on a black background"])
  assert emb.shape == (2, config.text.max_length, 128)
  assert not np.allclose(emb[0], emb[1])  # the position word changes the conditioning
  assert any("train-clip: done" in line for line in logs)
  again = []
  assert clip_component.ensure(config, log=again.append) == directory and not again  # not retrained
  other = offline.apply(cfglib.base_config())
  other.clip.update(dir=directory, layers=3)
  with pytest.raises(cfglib.ConfigError, match="layers: 2 vs 3"):
    clip_component.ensure(other)


@pytest.mark.slow  # two CLIP compiles: ~15 s
def test_the_trainers_clip_step_is_the_plain_optax_clip_step():
  """The ``clip`` objective's phase step (the one trainer) against a hand-written optax step of the
  same recipe (AdamW b2 0.98, weight decay 0.05, global-norm clip 1, warmup-cosine to 5 %,
  logit scale clamped at log 100): same init and batches -> the same parameters, step by step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import optim, trainer  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train.objectives import contrastive  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train.state import TrainState  # pylint: disable=g-import-not-at-top

  config = cfglib.base_config()
  config.clip.update(width=16, heads=2, layers=1, vision_width=16, vision_heads=2,
                     vision_layers=1, image_size=16, patch_size=8, embed_dim=8, train_length=8,
                     steps=8, warmup_steps=2, batch_size=4, lr=3e-3)
  run = contrastive.training_config(config)
  objective = contrastive.Contrastive(run)
  # Compiled without backend optimisation (runtime.run_once): half the compile time of jax.jit;
  # both steps below start from these same values.
  params = runtime.run_once(objective.init, jax.random.key(0))["clip"]

  c = config.clip
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.lr, 2, c.steps, end_value=c.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05))

  def plain_loss(p, batch):
    logits = objective.model(input_ids=batch["tokens"],
                             pixel_values=jnp.transpose(batch["images"], (0, 3, 1, 2)), params=p,
                             train=False).logits_per_text
    labels = jnp.arange(logits.shape[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
            optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2

  @jax.jit
  def plain_step(p, s, batch):
    loss, g = jax.value_and_grad(plain_loss)(p, batch)
    updates, s = tx.update(g, s, p)
    p = optax.apply_updates(p, updates)
    return dict(p, logit_scale=jnp.clip(p["logit_scale"], 0.0, np.log(100.0))), s, loss

  networks, (phase,) = objective.networks(), objective.phases()
  txs = {"clip": optim.optimizer(optim.settings(run.train, networks["clip"].optimizer))}
  step = jax.jit(trainer.make_phase_step(phase, None, networks, txs, {}, run))
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"clip": params}, ema={},
                     opt_state={"clip": txs["clip"].init(params)})
  p, s = params, tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(c.steps):
    batch = {"tokens": jnp.asarray(rng.integers(0, 1000, (4, 8)), jnp.int32),
             "images": jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)}
    p, s, want = plain_step(p, s, batch)
    state, metrics = step(state, batch, {})
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p,
               state.params["clip"])
  assert not np.allclose(p["logit_scale"], params["logit_scale"])  # it did train
