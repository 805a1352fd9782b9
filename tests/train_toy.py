"""A toy objective and data pipeline for trainer tests, runnable as a subprocess.

The objective is a noisy linear regression whose weights carry logical axis names, so the trainer
shards, checkpoints and resumes it exactly like a UNet, in seconds. Data is a grain pipeline (the
production iterator type and row layout) over deterministic examples; ``nan_at`` poisons one global
step. ``--images`` fits the same regression to features of the real pipeline's image batches
(``make_pipeline`` on the embedded dataset in ``data.data_dir``).

  python tests/train_toy.py WORKDIR [--max-steps N] [--nan-at K] [--images]
                            [key=value config overrides ...]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax-tests"))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import grain  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from ldm_scaling import config as cfglib  # pylint: disable=g-import-not-at-top
from ldm_scaling import sharding as sh  # pylint: disable=g-import-not-at-top
from ldm_scaling.train import objectives  # pylint: disable=g-import-not-at-top

IN, OUT = 16, 8
TRUE_W = (np.arange(IN * OUT, dtype=np.float32).reshape(IN, OUT) % 7 - 3) / 4


@objectives.register("toy_regression")
class ToyRegression(objectives.Objective):

  def networks(self):
    return {"linear": objectives.Network()}

  def init(self, rng):
    w = nn.with_logical_partitioning(nn.initializers.normal(0.5), (sh.EMBED, sh.MLP))
    b = nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.MLP,))
    k1, k2 = jax.random.split(rng)
    return {"linear": {"w": w(k1, (IN, OUT)), "b": b(k2, (OUT,))}}

  def phases(self):
    return (objectives.Phase("fit", ("linear",), self.loss),)

  def batch_spec(self, batch_size):
    return dict(x=jax.ShapeDtypeStruct((batch_size, IN), jnp.float32),
                y=jax.ShapeDtypeStruct((batch_size, OUT), jnp.float32))

  noise = 0.1

  def loss(self, params, frozen, ema, batch, rng):
    p = params["linear"]
    pred = batch["x"] @ p["w"] + p["b"]
    noise = self.noise * jax.random.normal(rng, pred.shape)  # exercises the per-step RNG
    loss = jnp.mean((pred + noise - batch["y"]) ** 2)
    return loss, {"ema_dist": sum(jnp.sum((a - b) ** 2) for a, b in
                                  zip(jax.tree.leaves(params), jax.tree.leaves(ema)))}

  def train_flops_per_example(self, phase):
    return 3 * 2 * IN * OUT


@objectives.register("toy_regression_exact")
class ToyRegressionExact(ToyRegression):
  noise = 0.0


@objectives.register("toy_regression_images")
class ToyRegressionImages(ToyRegression):
  """The noisy regression on batches of the production pipeline (``make_pipeline``: global
  shuffle, random flips, this process's rows): x = the means of ``IN`` slices of each image."""

  def batch_spec(self, batch_size):
    r = self.config.data.resolution
    return dict(images=jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.float32))

  def loss(self, params, frozen, ema, batch, rng):
    images = batch["images"]
    x = 4 * images.reshape(images.shape[0], IN, -1).mean(-1)
    return super().loss(params, frozen, ema, dict(x=x, y=x @ TRUE_W), rng)

  def make_data(self, config, split, *, batch_size, seed, process_index, process_count):
    # Imported here: the pipeline loads tensorflow_datasets (seconds) that other toys never need.
    from ldm_scaling.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.make_pipeline(config, split, batch_size=batch_size, seed=seed,
                                  process_index=process_index, process_count=process_count,
                                  tokenizer=None)


def images_config(**train):
  """The image toy on a small embedded dataset (64 train examples: 4 steps of 16 per epoch)."""
  config = toy_config(**train)
  config.objective.name = "toy_regression_images"
  config.data.update(name="shapes", resolution=32, shapes_sizes=(64, 16), flip="random",
                     threads=1, prefetch=4)
  return config


CRITIC_LR, GEN_LR, CRITIC_EVERY, CRITIC_STEPS = 0.01, 0.05, 3, 6


@objectives.register("toy_two_networks")
class ToyTwoNetworks(objectives.Objective):
  """A generator (linear map, with EMA) fits the output of a frozen teacher (a fixed linear map
  with logical axis names, so the trainer shards it); a critic (linear score, no EMA, its own
  learning rate) learns to score the generator's outputs, and the generator is also pushed to
  lower that score. ``CRITIC_EVERY`` critic updates per generator update; the critic's learning
  rate decays (cosine) over ``CRITIC_STEPS`` of its own updates, the generator's is constant."""

  def networks(self):
    return {"gen": objectives.Network(optimizer=dict(lr=GEN_LR, warmup_steps=0)),
            "critic": objectives.Network(ema=False, optimizer=dict(
                lr=CRITIC_LR, warmup_steps=0, schedule="cosine", steps=CRITIC_STEPS))}

  def init(self, rng):
    k1, k2 = jax.random.split(rng)
    w = nn.with_logical_partitioning(nn.initializers.normal(0.5), (sh.EMBED, sh.MLP))
    c = nn.with_logical_partitioning(nn.initializers.normal(0.5), (sh.EMBED, None))
    return {"gen": {"w": w(k1, (IN, OUT))}, "critic": {"w": c(k2, (OUT, 1))}}

  def frozen(self):
    teacher = nn.LogicallyPartitioned(TRUE_W, (sh.EMBED, sh.MLP))
    return {"teacher": objectives.Frozen(None, {"w": teacher})}

  def phases(self):
    return (objectives.Phase("critic", ("critic",), self.critic_loss, every=CRITIC_EVERY),
            objectives.Phase("gen", ("gen",), self.gen_loss))

  def batch_spec(self, batch_size):
    return dict(x=jax.ShapeDtypeStruct((batch_size, IN), jnp.float32))

  def critic_loss(self, params, frozen, ema, batch, rng):
    del ema
    fake = batch["x"] @ params["gen"]["w"]
    real = batch["x"] @ frozen["teacher"].params["w"]
    score = lambda z: (z @ params["critic"]["w"])[:, 0]
    noise = 0.01 * jax.random.normal(rng, fake.shape)
    loss = jnp.mean((score(fake + noise) - 1.0) ** 2) + jnp.mean((score(real) + 1.0) ** 2)
    return loss, {}

  def gen_loss(self, params, frozen, ema, batch, rng):
    del ema, rng
    fake = batch["x"] @ params["gen"]["w"]
    real = batch["x"] @ frozen["teacher"].params["w"]
    fit = jnp.mean((fake - real) ** 2)
    adversarial = jnp.mean((fake @ params["critic"]["w"]) ** 2)
    return fit + 0.1 * adversarial, {"fit": fit}


def make_data(nan_at=None, delay=0.0):
  def factory(config, split, batch_size, seed, process_index, process_count):
    def example(i):
      x = np.random.default_rng(int(i)).normal(size=IN).astype(np.float32)
      return dict(x=x, y=x @ TRUE_W, index=np.int32(i))

    def poison(step, batch):
      time.sleep(delay)  # lets a test signal the process mid-run
      if nan_at is not None and step + 1 == nan_at:
        batch = dict(batch, x=np.full_like(batch["x"], np.nan))
      return batch

    ds = _rows_of_process(grain.MapDataset.range(10_000).shuffle(seed=seed).repeat().map(example),
                          batch_size, process_index, process_count).map_with_index(poison)
    return iter(ds.to_iter_dataset())

  return factory


def make_embedding_data(config, split, batch_size, seed, process_index, process_count):
  """Synthetic (latents, context) batches for the denoising objective with inputs=embeddings:
  smooth per-example latents whose mean depends on the context, so the loss can go down."""
  from ldm_scaling.train.objectives import conditioning  # pylint: disable=g-import-not-at-top
  size, channels = conditioning.latent_geometry(config)
  text_len, dim = config.text.max_length, config.model.cross_attn_dim

  def example(i):
    r = np.random.default_rng(int(i))
    ctx = r.normal(size=(text_len, dim)).astype(np.float32)
    grid = np.linspace(-1, 1, size, dtype=np.float32)
    lat = np.stack([np.outer(grid, grid) * ctx[0, c % dim] for c in range(channels)], -1)
    return dict(latents=lat + 0.1 * r.normal(size=lat.shape).astype(np.float32), context=ctx)

  ds = _rows_of_process(grain.MapDataset.range(4096).shuffle(seed=seed).repeat().map(example),
                        batch_size, process_index, process_count)
  return iter(ds.to_iter_dataset())


def _rows_of_process(ds, batch_size, process_index, process_count):
  """``data.pipeline.process_batches`` of an infinite stream (the pipeline module is not imported
  here: it loads tensorflow_datasets, seconds per toy process): process p's batch s is its block
  of global batch s, so the global batches are the same for any number of processes."""
  return ds.batch(batch_size)[process_index::process_count]


def unet_config(**train):
  """The denoising objective on a tiny one-level UNet (8x8 latents, 8-token context): every kind
  of parameter (convs, norms, time embedding, the middle block's self- and cross-attention and
  feed-forward), compiled in seconds. A second level would add only a stride-2 and an upsampling
  conv, sharded like every other conv."""
  config = cfglib.base_config()
  config.model.update(width=32, head_dim=16, num_heads=0, cross_attn_dim=32, channel_mult=(1,),
                      attn_levels=(False,), layers_per_block=1)
  config.objective.inputs = "embeddings"
  config.text.max_length = 8
  config.data.resolution = 64  # / 8 (the VAE's down factor) = 8x8 latents
  config.train.update(dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, log_every=1,
                           checkpoint_every=100, best_metric=""), **train)
  return config


def toy_config(**train):
  config = cfglib.base_config()
  config.objective.name = "toy_regression"
  config.train.update(dict(steps=12, batch_size=8, lr=0.05, warmup_steps=2, log_every=1,
                           checkpoint_every=3, ema_decay=0.9, best_metric=""), **train)
  return config


def main(argv):
  from ldm_scaling import runtime  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import distributed, trainer  # pylint: disable=g-import-not-at-top
  runtime.configure_jax()
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("--nan-at", type=int)
  p.add_argument("--unet", action="store_true", help="the denoising objective on a tiny UNet")
  p.add_argument("--images", action="store_true", help="the regression on real image batches")
  p.add_argument("--max-steps", type=int, help="stop early (the schedule follows train.steps)")
  p.add_argument("--delay", type=float, default=0.0, help="seconds per batch")
  p.add_argument("--coordinator")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("overrides", nargs="*")
  args = p.parse_intermixed_args(argv)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = unet_config() if args.unet else images_config() if args.images else toy_config()
  for item in args.overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    old = config[section][name]
    config[section][name] = value if isinstance(old, str) else type(old)(value)
  data = (make_embedding_data if args.unet else None if args.images  # None: the objective's
          else make_data(args.nan_at, args.delay))
  result = trainer.train(config, args.workdir, make_data=data, max_steps=args.max_steps)
  print(f"RESULT step={result.step} stopped={result.stopped}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
