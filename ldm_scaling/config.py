"""Experiment configs: one schema with a default for every key, strict loading, a stable hash.

A config file is a Python module with ``get_config(arg=None)`` that starts from
:func:`base_config` and edits it. It is loaded as ``path.py`` or ``path.py:a=1,b=x`` (the part after
the colon is handed to ``get_config``; :func:`parse_arg` turns it into typed fields), and
``--config.section.key=value`` flags override single keys. Loading goes through
``ml_collections.config_flags`` so overrides are parsed with the type of the key they replace.
Unknown keys and wrong types are errors that name the key. This module is the schema only: it
imports no stage (``ldm_scaling.experiment`` composes the stages' checks).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from ldm_scaling.errors import ConfigError  # re-exported: config.ConfigError




def base_config() -> ml_collections.ConfigDict:
  """The schema: every key an experiment may set, with its default.

  Sections: ``model`` (the denoising UNet), ``cost`` (how FLOPs and sampling cost are measured),
  ``diffusion``, ``data``, ``train``, ``eval``, ``mesh``. Later stages add keys here, never in a
  config file: a key a config file adds is rejected by :func:`check_schema`.
  """
  c = ml_collections.ConfigDict()

  # The SD-2.x text-conditional UNet, parameterised by its base width (ldm_scaling.models.unet).
  c.model = ml_collections.ConfigDict(dict(
      name="unet",
      width=320,                    # base filters c; block widths c * channel_mult
      channel_mult=(1, 2, 4, 4),
      layers_per_block=2,
      attn_levels=(True, True, True, False),  # spatial transformer per level (+ always the middle)
      head_dim=64,                  # used when num_heads == 0
      num_heads=0,                  # > 0: a fixed head count at every level (SD-1.5 style)
      transformer_depth=1,
      cross_attn_dim=1024,          # text-encoder hidden size
      norm_groups=32,
      in_channels=4,                # latent channels
      out_channels=4,
      dropout=0.0,
      dtype="float32",              # compute dtype
      param_dtype="float32",        # master weights
      remat="none",                 # none | block (rematerialise every res/transformer block)
      attn_query_chunk=-1,          # self-attention queries per chunk: -1 auto (128 on CPU, dense
                                    # on TPU/GPU), 0 dense, n > 0 chunks of n (same values)
      attn_kernel="xla",            # self-attention: xla (as attn_query_chunk says) | splash (the
                                    # Pallas TPU kernel at >= 512 tokens, no logits held; the XLA
                                    # path off TPU; same values)
      guidance_embed=False,         # True: the UNet also takes the CFG scale w (LCM's w embedding;
                                    # a consistency student with objective.cfg_range)
  ))

  # The measurement setting of Mei et al. Table 1 and the sampling-cost convention.
  c.cost = ml_collections.ConfigDict(dict(
      latent_size=64,               # FLOPs are measured on a latent_size^2 x in_channels input
      text_len=77,                  # text tokens of the conditioning
      reference_width=320,          # normalised cost = GFLOPs / GFLOPs(reference_width)
      # Paper convention (False): sampling cost = normalised cost x steps; a guided step counts
      # once, as in Mei et al. whose every model samples with CFG. True: a guided step whose
      # unconditional pass runs as a separate forward counts twice.
      count_uncond_pass=False,
  ))

  # The forward process, parametrisation and loss (ldm_scaling.diffusion, docs/diffusion.md).
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear",     # scaled_linear (SD) | linear | cosine | rectified_flow
      num_train_timesteps=1000,
      beta_start=0.00085,           # SD's betas; DDPM's linear schedule used 1e-4 .. 0.02
      beta_end=0.012,
      zero_terminal_snr=False,      # rescale betas so alpha_bar[T-1] = 0 (needs prediction v/x0)
      flow_shift=1.0,               # rectified_flow: SD3's sigma shift (SD3 uses 3.0)
      prediction="eps",             # eps | v | x0 | flow (rectified_flow only)
      loss_weighting="uniform",     # uniform | min_snr
      min_snr_gamma=5.0,
      timestep_spacing="leading",   # leading | trailing | linspace (diffusers' set_timesteps)
      steps_offset=1,               # added to leading timesteps (SD: 1)
      set_alpha_to_one=False,       # ddim: the last step lands on alpha_bar = 1 (else [0]; SD)
  ))

  # Images + captions and the grain pipeline (ldm_scaling.data, docs/data.md).
  c.data = ml_collections.ConfigDict(dict(
      name="shapes",                # shapes (embedded) | folder:<manifest> | latents:<dir> | tfds name
      resolution=64,                # pixels; latent_size = resolution / vae downsampling
      caption_dropout=0.1,          # training captions replaced by "" (CFG's unconditional)
      crop="center",                # center | random (training split; eval is always center)
      flip="none",                  # none | random | caption_aware (swaps left/right in captions)
      train_split="train",
      eval_split="test",            # held-out split (coco_captions: val)
      data_dir="",                  # tfds data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      shapes_sizes=(20_000, 2_000),  # embedded dataset: (train, test) examples
      bad_examples="error",         # folder data: error | skip (skipped rows are counted)
      min_image_size=16,            # folder data: shorter side below this is a bad example
      prepare_workers=0,            # folder data: threads checking images (0 = all cores, at most 32)
      threads=4,                    # grain read threads
      prefetch=64,                  # grain prefetch buffer (examples)
      workers=0,                    # grain worker processes (0 = none; > 0 needs a __main__ guard)
  ))

  # Text conditioning (ldm_scaling.models.text, docs/conditioning.md): a frozen CLIP text tower.
  c.text = ml_collections.ConfigDict(dict(
      encoder="stabilityai/stable-diffusion-2-1-base",  # hub id | local dir | clip-small (offline)
      subfolder="text_encoder",     # inside a diffusers pipeline repo/dir; "" for a plain checkpoint
      tokenizer="",                 # "" = next to the encoder; bpe = the vocab shipped here; id | dir
      max_length=77,
      dtype="float32",
  ))

  # The small CLIP the project trains offline (text.encoder=clip-small; CLIP-score stand-in).
  c.clip = ml_collections.ConfigDict(dict(
      dir="",                       # "" = ~/.cache/ldm_scaling/clip/<hash of this section + data>
      width=128,                    # text hidden size = the UNet's cross_attn_dim
      layers=2,
      heads=2,
      vision_width=128,
      vision_layers=2,
      vision_heads=2,
      image_size=32,
      patch_size=4,
      embed_dim=128,                # joint (projection) space
      max_length=77,                # text positions
      train_length=32,              # tokens per caption while training (captions here are short)
      steps=600,
      batch_size=128,
      lr=1e-3,
      warmup_steps=50,
      seed=0,
  ))

  # KL autoencoder (ldm_scaling.models.vae): SD's AutoencoderKL topology at any size.
  c.vae = ml_collections.ConfigDict(dict(
      weights="stabilityai/stable-diffusion-2-1-base",  # hub id | dir | .safetensors | trained
      subfolder="vae",              # inside a diffusers pipeline repo/dir
      dir="",                       # weights=trained: "" = ~/.cache/ldm_scaling/vae/<hash>
      width=128,                    # block_out_channels = width * channel_mult (SD: 128,256,512,512)
      channel_mult=(1, 2, 4, 4),    # down factor = 2**(len - 1)
      layers_per_block=2,
      latent_channels=4,
      norm_groups=32,
      mid_attention=True,
      scaling_factor=0.0,           # 0: stored with the weights (computed after training); > 0 wins
      steps=2000,                   # weights=trained: training
      batch_size=32,
      lr=1e-3,
      kl_weight=1e-6,               # SD's: KL summed over latents vs reconstruction summed over pixels
      rec_loss="l1",                # l1 | l2
      seed=0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=500_000,                # optimizer updates (Mei et al.: 500K at batch 2048, lr 1e-4)
      batch_size=2048,              # global batch, split over data x fsdp and over hosts
      lr=1e-4,
      seed=0,
      schedule="constant",          # constant | cosine | linear (after warmup)
      warmup_steps=1000,
      end_lr_factor=0.0,            # cosine/linear: final lr = lr * end_lr_factor
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip=1.0,                # global-norm clipping; <= 0 disables
      grad_accum_steps=1,           # micro-batches per update (scan inside the step)
      ema_decay=0.9999,
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=3,           # latest k, plus the best by best_metric
      best_metric="loss",           # "" keeps only the latest k
      async_checkpointing=True,
      peak_tflops_per_device=0.0,   # > 0: report MFU against this peak
      profile_steps=0,              # > 0: capture a profile of that many steps
      sample_every=0,               # > 0: write a sample grid of the EMA every N steps
      sample_prompts=(),            # () = the first 8 captions of data.eval_split
      sample_steps=20,              # with eval.samplers[0]
      sample_cfg=3.0,
  ))

  # Training objective (ldm_scaling.train.objectives): denoising | consistency (docs/training.md).
  c.objective = ml_collections.ConfigDict(dict(
      name="denoising",
      # pipeline: batches of images/latents + tokens, frozen VAE and text encoder run in the step;
      # embeddings: batches of latents + text embeddings (precomputed, or synthetic in benchmarks)
      inputs="pipeline",
      # consistency distillation (ldm_scaling.diffusion.consistency); the student starts as the
      # teacher, its target network is the trainer's EMA (train.ema_decay; LCM used 0.95)
      teacher="",                   # the teacher's training workdir (same model and diffusion)
      teacher_weights="ema",        # ema | params: which of the teacher's weights
      teacher_step=-1,              # -1: the finished teacher's last checkpoint; or a step
      solver_steps=50,              # the teacher's DDIM grid; also the lcm sampler's grid
      cfg_scale=8.0,                # the teacher's guidance scale (the student needs none)
      # (lo, hi): the teacher's scale is drawn per example uniformly in [lo, hi] and given to the
      # student as its input w (needs model.guidance_embed=True; LCM); () = cfg_scale for all
      cfg_range=(),
      loss="huber",                 # huber | l2
      huber_c=0.001,
      timestep_scaling=10.0,        # boundary scalings c_skip, c_out (as diffusers' LCMScheduler)
      # scale-wise (SwD) students and the swd sampler (ldm_scaling.diffusion.scalewise): the latent
      # side of each sampling step (non-decreasing, ending at the latent size) and its noise level
      # as a fraction of the schedule (flow sigma; t/T on a discrete schedule), strictly falling
      scales=(),
      sigmas=(),
      # scale-wise distillation (objective.name=scale_wise, docs/training.md): the student and a
      # fake-score network start as objective.teacher; see ldm_scaling.diffusion.scalewise
      swd=ml_collections.ConfigDict(dict(
          fake_updates=5,           # fake-score (+ GAN head) updates per student update
          dmd_weight=1.0,           # student: dmd_weight DMD + mmd_weight MMD + gan_weight GAN
          mmd_weight=1.0,
          gan_weight=5e-3,
          fake_gan_weight=1e-2,     # fake-score net: x0 regression + fake_gan_weight D loss
          input_order="upscale_then_noise",  # or noise_then_upscale (the paper's ablation)
          mmd_kernel="linear",      # linear (pseudo-Huber, mmd_c) | rbf (mmd_bandwidth)
          mmd_c=1e-3,
          mmd_bandwidth=100.0,
          noise_grid=28,            # the inference grid the DMD / MMD / fake noise is drawn from
          dmd_indices=(12, 28),     # [lo, hi) of that grid (SwD: sigma <= .79 on SD3.5's)
          mmd_indices=(18, 28),     # (SwD: sigma <= .60)
          ema_decay=0.0,            # the student's EMA (what eval reads); 0 = the weights (SwD)
      )),
  ))

  c.eval = ml_collections.ConfigDict(dict(
      samplers=("ddim",),
      steps=(50,),
      cfg_scales=(7.5,),
      num_samples=30_000,           # images per cell (prompts: the first N eval captions)
      ddim_eta=0.0,                 # ddim sampler: 0 deterministic .. 1 DDPM-like noise
      batch_size=64,                # images per compiled sampling batch
      seed=0,                       # image i starts from fold_in(key(seed), i) in every cell
      fid_reference_n=30_000,       # real eval-split images in the FID reference statistics
      stats_dir="",                 # reference-stats cache; "" = ~/.cache/ldm_scaling/fid_stats
      clip_model="",                # hub id / dir; "" = the run's offline small CLIP (labelled)
      checkpoints="latest",         # latest | all | comma-separated steps
      grid_images=16,               # samples saved as a PNG per cell
      param_dtype="float32",        # float32 | bfloat16: the UNet weights while sampling
      bootstrap=200,                # resamples for fid_ci95 / kid_ci95 (0: none, NaN); not in keys
  ))

  # `ldm-scaling study` (ldm_scaling.study): a model-size sweep trained and evaluated end to end;
  # every other section describes each run (model.width is replaced per run).
  c.study = ml_collections.ConfigDict(dict(
      widths=(),                    # UNet base widths to train and evaluate
      # equal_steps: every width trains train.steps (Mei et al.: 500K steps for every size);
      # equal_compute: the widest trains train.steps, a narrower one as many more steps as keeps
      # steps x normalised cost equal
      schedule="equal_steps",
      fid_curve_cell=(),            # (sampler, steps, cfg): also evaluate every kept checkpoint
      checkpoints=4,                # checkpoints per run: the points of the training-compute curve
      extend_cfg=0,                 # up to this many CFG scales added past either end of the
                                    # grid while a latest-checkpoint optimum sits there (never
                                    # below CFG 1; 0: only flag it)
      real_floor=True,              # report the real-data FID floor (held-out real images)
      # > 0: each model's best latest-checkpoint cell is evaluated again with this many samples
      # and a fresh seed (eval.seed + 1) into <workdir>/confirm; the size-effect check uses these
      # (fresh samples: no winner's-curse bias from picking the best of many noisy cells)
      confirm_n=0,
  ))

  # Device mesh: axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


# -------------------------------------------------------------------------------------------------
# Config strings: "width=128,steps=1000" -> typed ConfigDict (big_vision's parse_arg idea).


def _parse_value(text: str, default: Any, key: str) -> Any:
  if isinstance(default, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config argument {key}={text!r}: expected a boolean (true/false)")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"config argument {key}={text!r}: expected an integer") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"config argument {key}={text!r}: expected a number") from None
  if isinstance(default, tuple):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if default and all(isinstance(v, str) for v in default):  # names: (ddim,dpm++) is fine
        return tuple(w.strip().strip("'\"") for w in text.strip().strip("()[]").split(",")
                     if w.strip())
      raise ConfigError(f"config argument {key}={text!r}: expected a tuple like (1,2)") from None
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
  return text


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside brackets, so ``mult=(1,2),width=3`` gives two items."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "(["
    depth -= ch in ")]"
    if ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  items.append(text[start:])
  return items


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x"`` into a ConfigDict typed like ``defaults``; unknown names are errors.

  A bare word ``name`` (no ``=``) sets a boolean default to True, so ``:runlocal`` works.
  """
  values = dict(defaults)
  for item in filter(None, (s.strip() for s in _split_top_level(arg or ""))):
    name, sep, text = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ConfigError(f"unknown config argument {name!r}; this config accepts: "
                        f"{', '.join(sorted(defaults)) or 'nothing'}")
    if not sep:
      if not isinstance(defaults[name], bool):
        raise ConfigError(f"config argument {name!r} needs a value ({name}=...)")
      values[name] = True
    else:
      values[name] = _parse_value(text.strip(), defaults[name], name)
  return ml_collections.ConfigDict(values)


# -------------------------------------------------------------------------------------------------
# Loading.


def _normalise_override(item: str) -> str:
  item = item.strip()
  if item.startswith("--config."):
    return item
  if item.startswith("config."):
    return "--" + item
  return "--config." + item


def read(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Reads ``path.py[:arg]`` and applies overrides (``"train.steps=10"`` or ``"--config.x=y"``).

  The result is checked against the schema (:func:`check_schema`) and locked: reading or setting
  a key that does not exist raises. ``ldm_scaling.experiment.load`` adds every stage's checks.
  """
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found (give a path such as configs/t2i.py, "
                      f"optionally followed by :arg)")

  argv = ["ldm-scaling", f"--config={spec}"]
  for item in overrides:
    argv.append(_normalise_override(item))
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    config = fv.config
  except ConfigError:
    raise
  except flags.UnrecognizedFlagError as e:
    raise ConfigError(f"{e}; known keys are listed by `ldm-scaling config --config {spec}`") from None
  except (AttributeError, KeyError) as e:
    bad = _first_unknown_override(spec, overrides)
    raise ConfigError(f"unknown config key {bad or e}; run `ldm-scaling config --config {spec}` "
                      f"to list the keys") from None
  except (flags.IllegalFlagValueError, TypeError, ValueError) as e:
    raise ConfigError(_inner_message(e)) from None
  check_schema(config)
  return config


def _inner_message(error: Exception) -> str:
  """absl wraps errors raised inside ``get_config`` in a flag error carrying the traceback text;
  surface the original message (ours or Python's) instead."""
  text = str(error)
  match = re.search(r"ConfigError: (.+)", text)
  if match:
    return match.group(1).strip()
  if "Error whilst parsing config file" in text:
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f"config file failed to load: {last.strip()}"
  return f"bad config value: {text}"


def _first_unknown_override(spec: str, overrides: Iterable[str]) -> str | None:
  schema = flatten(base_config())
  for item in overrides:
    key = _normalise_override(item)[len("--config."):].split("=", 1)[0]
    if key not in schema and not any(k.startswith(key + ".") for k in schema):
      return repr(key)
  return None


def with_defaults(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as a dict (config.json, study_config.json), completed with today's defaults
  for keys added to the schema since it was written (so older runs still compare equal)."""
  config = base_config()
  config.update_from_flattened_dict(flatten(ml_collections.ConfigDict(saved)))
  return config


def section_changes(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict, section: str,
                    ignore: Iterable[str] = ()) -> list[str]:
  """Keys of ``section`` whose values differ between configs ``a`` and ``b`` (compared as their
  JSON values, so a tuple equals the list it was saved as), except ``ignore``."""
  ignore = set(ignore)
  plain = lambda c: {k: v for k, v in json.loads(json.dumps(c[section].to_dict(), default=list))
                     .items() if k not in ignore}
  x, y = plain(a), plain(b)
  return sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """``{"model.width": 320, ...}`` for every leaf key."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


# -------------------------------------------------------------------------------------------------
# Validation: schema first (unknown keys, types), then each section's own checks.


def _same_type(default: Any, value: Any) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(default, bool) and isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first unknown key, wrong type or missing key, and for
  counts that must be positive. The stages' own checks are composed in
  :func:`ldm_scaling.experiment.validate`."""
  schema = flatten(base_config())
  values = flatten(config)
  for key, value in values.items():
    if key not in schema:
      section = key.rsplit(".", 1)[0]
      known = sorted(k for k in schema if k.startswith(section + "."))
      raise ConfigError(f"unknown config key {key!r}"
                        + (f"; keys in {section!r}: {', '.join(known)}" if known else ""))
    if not _same_type(schema[key], value):
      raise ConfigError(f"config key {key!r} must be {type(schema[key]).__name__}, "
                        f"got {value!r}")
  missing = sorted(set(schema) - set(values))
  if missing:
    raise ConfigError(f"config is missing keys {missing}; start config files from base_config()")

  for key in ("train.steps", "train.batch_size"):
    if values[key] < 1:
      raise ConfigError(f"{key} must be >= 1, got {values[key]}")
  for s in config.eval.steps:
    if int(s) < 1:
      raise ConfigError(f"eval.steps must all be >= 1, got {tuple(config.eval.steps)}")


def run_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a workdir's ``config.json`` holds: the config and its :func:`config_hash`."""
  return dict(config=config.to_dict(), hash=config_hash(config))


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short stable hash of the whole config (stamped on workdirs and results rows)."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]
