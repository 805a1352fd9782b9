"""diffusers Stable Diffusion 2.x pipelines in and out of a workdir (``ldm-scaling
import-diffusers`` / ``export-diffusers``).

**Import** reads a pipeline directory (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; local or ``gs://``) and writes a workdir that
``sample``, ``eval`` and ``train`` use as they use a run of their own:

- the configs become the experiment config: ``unet/config.json`` -> ``model`` (width and
  channel_mult from ``block_out_channels``, the head layout from ``attention_head_dim``, attention
  levels from the block types, ...), ``scheduler/scheduler_config.json`` -> ``diffusion`` (betas,
  prediction, timestep spacing; the scheduler class picks ``eval.samplers`` when it is one of ours),
  ``vae/config.json`` -> ``vae``, the tokenizer's length -> ``text.max_length``. Every setting this
  UNet does not implement is refused with an error naming the field (SDXL's ``addition_embed_type``
  and second text encoder, SD3's ``transformer/``, ...); SD-1.x (1x1-conv projections,
  ``use_linear_projection=false``) imports onto the same network, whose linear projections compute
  the same thing;
- the UNet's weights are converted by renaming (``models.convert``) and saved as checkpoint 0 in
  the trainer's layout, with the project's own :class:`~ldm_scaling.train.checkpoint.Checkpointer`:
  the weights as params and EMA, a fresh optimiser state of ``train.*`` and the data item at the
  start, so ``sample`` / ``eval`` read them like a trained run's and ``train`` resumes from them
  (fine-tuning);
- the VAE, text encoder, tokenizer and scheduler are copied byte for byte to
  ``<workdir>/pipeline/`` (with ``model_index.json`` and the UNet's ``config.json``) and
  ``vae.weights`` / ``text.encoder`` point there, so the workdir stands alone;
- ``config.json`` is written as the trainer writes it, and ``config.py`` beside it reproduces that
  config, so ``ldm-scaling train --config <workdir>/config.py --workdir <workdir>`` fine-tunes.

**Export** is the inverse: the checkpoint's UNet (EMA by default) converted back to diffusers keys
(``convert.to_state_dict``: transposes only, bit-exact), the configs written back in diffusers'
vocabulary over the imported ones, the copied components copied out again (a VAE trained here is
converted the same way). Export -> import reproduces every parameter bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_scaling import config as cfglib
from ldm_scaling import files
from ldm_scaling.errors import ConfigError, UserError, WeightsError
from ldm_scaling.models import convert

PIPELINE = "pipeline"            # <workdir>/pipeline: the copied components
UNET_WEIGHTS = "diffusion_pytorch_model"
FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FLAX_TEXT_WEIGHTS = "flax_model.msgpack"  # added beside the copied text tower (not exported)

# diffusers scheduler class <-> our sampler of the same updates (ldm_scaling.diffusion.samplers).
SAMPLER_OF_SCHEDULER = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                        "DPMSolverMultistepScheduler": "dpm++", "LCMScheduler": "lcm"}
SCHEDULER_OF_SAMPLER = {v: k for k, v in SAMPLER_OF_SCHEDULER.items()}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear",
                  "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers' defaults for keys a scheduler_config.json may leave out (per class where they differ).
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                           beta_schedule="linear", prediction_type="epsilon",
                           timestep_spacing="leading", steps_offset=0, set_alpha_to_one=False,
                           clip_sample=False, thresholding=False, rescale_betas_zero_snr=False,
                           trained_betas=None)
_CLASS_DEFAULTS = {"DDIMScheduler": dict(set_alpha_to_one=True, clip_sample=True),
                   "DDPMScheduler": dict(clip_sample=True),
                   "LCMScheduler": dict(set_alpha_to_one=True)}
# Pipelines that are not SD-1.x/2.x: refused by model_index.json's _class_name.
_OTHER_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL (two text encoders, size/crop conditioning)",
    "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusion3Pipeline": "SD3 (an MMDiT transformer, not a UNet)",
    "FluxPipeline": "Flux (a transformer, not a UNet)",
}
# UNet2DConditionModel settings this UNet implements only at their SD values: field -> allowed.
_UNET_FIXED = {
    "act_fn": ("silu",), "center_input_sample": (False,), "flip_sin_to_cos": (True,),
    "freq_shift": (0,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",), "class_embed_type": (None,),
    "num_class_embeds": (None,), "addition_embed_type": (None,), "time_embedding_type":
    ("positional",), "time_embedding_dim": (None,), "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "attention_type": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "norm_eps": (1e-5,), "class_embeddings_concat": (False,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,), "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,), "addition_embed_type_num_heads": (64,),
}
_VAE_FIXED = {"in_channels": (3,), "out_channels": (3,), "act_fn": ("silu",),
              "shift_factor": (None, 0, 0.0), "latents_mean": (None,), "latents_std": (None,),
              "use_quant_conv": (True,), "use_post_quant_conv": (True,)}


class PipelineError(UserError, ValueError):
  """A diffusers pipeline directory this project cannot import (or a workdir it cannot export)."""


# -------------------------------------------------------------------------------------------------
# Reading (local or gs://): every failure of the storage layer becomes one line.


def _path(location: str) -> epath.Path:
  return epath.Path(os.path.expanduser(location) if "://" not in location else location)


def _io(what: str, fn: Callable[[], Any]) -> Any:
  try:
    return fn()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # gcs/auth/OS errors: one clear line
    text = (str(e).strip().splitlines() or [""])[0][:300]
    raise WeightsError(f"cannot read {what} ({type(e).__name__}: {text}); check the path and, "
                       f"for gs://, your credentials (gcloud auth application-default login)") \
        from None


def _read_json(path: epath.Path) -> dict:
  text = _io(str(path), path.read_text)
  try:
    return json.loads(text)
  except ValueError as e:
    raise PipelineError(f"{path} is not valid JSON ({e}); re-save the pipeline with "
                        f"save_pretrained") from None


def _exists(path: epath.Path) -> bool:
  return bool(_io(str(path), path.exists))


def _check_pipeline(src: epath.Path) -> dict:
  """model_index.json (or {}), after refusing what is not an SD-1.x/2.x UNet pipeline."""
  if not _io(str(src), src.is_dir):
    remote = "" if files.is_local(src) else (" or cannot be read with your credentials "
                                             "(gcloud auth application-default login)")
    raise PipelineError(f"pipeline directory {src} does not exist{remote}; give a diffusers "
                        f"pipeline directory (saved with save_pretrained or downloaded from the "
                        f"hub)")
  index = _read_json(src / "model_index.json") if _exists(src / "model_index.json") else {}
  name = index.get("_class_name", "")
  if name in _OTHER_PIPELINES:
    raise PipelineError(f"{src}: model_index.json _class_name={name!r} is {_OTHER_PIPELINES[name]}"
                        f"; only Stable Diffusion 1.x/2.x UNet pipelines can be imported")
  if "text_encoder_2" in index or _exists(src / "text_encoder_2"):
    raise PipelineError(f"{src}: text_encoder_2 is an SDXL-style second text encoder; only "
                        f"single-encoder SD-1.x/2.x pipelines can be imported")
  if _exists(src / "transformer") and not _exists(src / "unet"):
    raise PipelineError(f"{src} has transformer/ instead of unet/ (SD3/DiT-style); only Stable "
                        f"Diffusion 1.x/2.x UNet pipelines can be imported")
  for folder in FOLDERS:
    if not _io(str(src / folder), (src / folder).is_dir):
      raise PipelineError(f"{src} has no {folder}/ folder; a Stable Diffusion pipeline directory "
                          f"holds {', '.join(f + '/' for f in FOLDERS)} and model_index.json")
  return index


def _load_safetensors(folder: epath.Path, stem: str) -> dict[str, np.ndarray]:
  """A component's weights: ``<stem>.safetensors``, its fp16 variant or a sharded index."""
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top  # with transformers
  for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
    if _exists(folder / name):
      data = _io(str(folder / name), (folder / name).read_bytes)
      return st.load(data)
  index = folder / f"{stem}.safetensors.index.json"
  if _exists(index):
    out = {}
    for shard in sorted(set(_read_json(index)["weight_map"].values())):
      out.update(st.load(_io(str(folder / shard), (folder / shard).read_bytes)))
    return out
  pickled = _exists(folder / f"{stem}.bin")
  raise WeightsError(f"{folder} has no {stem}.safetensors" + (
      f" (only {stem}.bin, a pickle, which is not read: re-save with save_pretrained("
      f"safe_serialization=True))" if pickled else "; save the pipeline with save_pretrained"))


# -------------------------------------------------------------------------------------------------
# Config mapping (pure functions of the JSON dicts).


def _refuse(where: str, field: str, value: Any, why: str) -> PipelineError:
  return PipelineError(f"{where}: {field}={value!r} {why}")


def _uniform(where: str, field: str, value: Any) -> Any:
  """A per-level setting given once or as a list of equal values."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise _refuse(where, field, list(value), "varies per level; this UNet uses one value for "
                    "every level (SDXL-style layouts are not supported)")
    return value[0]
  return value


def unet_fields(ucfg: dict) -> tuple[dict, bool]:
  """(``model`` section fields, use_linear_projection) of a ``UNet2DConditionModel`` config."""
  where = "unet/config.json"
  cls = ucfg.get("_class_name", "UNet2DConditionModel")
  if cls != "UNet2DConditionModel":
    raise _refuse(where, "_class_name", cls, "is not the UNet2DConditionModel this project "
                  "implements")
  for field, allowed in _UNET_FIXED.items():
    value = ucfg.get(field, allowed[0])
    if value not in allowed:
      raise _refuse(where, field, value, f"is not implemented by this UNet (it needs "
                    f"{allowed[0]!r}); SDXL/LCM/class-conditional UNets cannot be imported")
  widths = list(ucfg.get("block_out_channels", (320, 640, 1280, 1280)))
  levels = len(widths)
  if not widths or any(w % widths[0] for w in widths):
    raise _refuse(where, "block_out_channels", widths, "must be multiples of the first width "
                  "(width x channel_mult)")
  down = list(ucfg.get("down_block_types", ()))
  up = list(ucfg.get("up_block_types", ()))
  kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
  if len(down) != levels or any(d not in kinds for d in down):
    raise _refuse(where, "down_block_types", down, f"must be {levels} of CrossAttnDownBlock2D / "
                  f"DownBlock2D")
  attn = [kinds[d] for d in down]
  want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
  if up != want_up:
    raise _refuse(where, "up_block_types", up, f"must mirror down_block_types ({want_up})")
  layers = _uniform(where, "layers_per_block", ucfg.get("layers_per_block", 2))
  depth = _uniform(where, "transformer_layers_per_block",
                   ucfg.get("transformer_layers_per_block", 1))
  cross = _uniform(where, "cross_attention_dim", ucfg.get("cross_attention_dim", 1280))
  # diffusers' legacy naming: attention_head_dim is the number of heads per level.
  heads = ucfg.get("attention_head_dim", 8)
  heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
  used = [i for i in range(levels) if attn[i]] + [levels - 1]  # the mid block: the last level's
  dims = {widths[i] // heads[i] for i in used}
  counts = {heads[i] for i in used}
  if any(widths[i] % heads[i] for i in used):
    raise _refuse(where, "attention_head_dim", heads, f"(heads per level) does not divide "
                  f"block_out_channels {widths}")
  if len(dims) == 1:
    head_layout = dict(head_dim=dims.pop(), num_heads=0)
  elif len(counts) == 1:
    head_layout = dict(head_dim=64, num_heads=counts.pop())
  else:
    raise _refuse(where, "attention_head_dim", heads, "gives neither one head width nor one head "
                  "count at every attention level, which this UNet needs")
  fields = dict(width=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                layers_per_block=int(layers), attn_levels=tuple(attn), transformer_depth=int(depth),
                cross_attn_dim=int(cross), norm_groups=int(ucfg.get("norm_num_groups", 32)),
                in_channels=int(ucfg.get("in_channels", 4)),
                out_channels=int(ucfg.get("out_channels", 4)),
                dropout=float(ucfg.get("dropout", 0.0)), **head_layout)
  return fields, bool(ucfg.get("use_linear_projection", False))


def unet_config(model: ml_collections.ConfigDict, sample_size: int,
                base: dict | None = None) -> dict:
  """diffusers' ``UNet2DConditionModel`` config of a ``model`` section (over ``base``, the
  imported config, so keys we do not model keep their values)."""
  widths = [model.width * m for m in model.channel_mult]
  if model.num_heads > 0:
    heads = [model.num_heads] * len(widths)
  else:
    heads = [max(1, w // model.head_dim) for w in widths]
  attn = [bool(a) for a in model.attn_levels]
  out = dict(base or {})
  out.update(
      _class_name="UNet2DConditionModel", sample_size=int(sample_size),
      in_channels=model.in_channels, out_channels=model.out_channels,
      block_out_channels=widths, layers_per_block=model.layers_per_block,
      down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=model.cross_attn_dim,
      attention_head_dim=heads, num_attention_heads=None, use_linear_projection=True,
      transformer_layers_per_block=model.transformer_depth, norm_num_groups=model.norm_groups,
      norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, dropout=model.dropout)
  return out


def scheduler_fields(scfg: dict) -> tuple[dict, str | None]:
  """(``diffusion`` section fields, our sampler for the scheduler class or None)."""
  where = "scheduler/scheduler_config.json"
  cls = scfg.get("_class_name", "")
  values = dict(_SCHEDULER_DEFAULTS, **_CLASS_DEFAULTS.get(cls, {}))
  values.update({k: v for k, v in scfg.items() if k in _SCHEDULER_DEFAULTS})
  if values["trained_betas"] is not None:
    raise _refuse(where, "trained_betas", "[...]", "(explicit betas) is not supported; only "
                  "scaled_linear, linear and squaredcos_cap_v2 schedules are")
  if values["beta_schedule"] not in BETA_SCHEDULES:
    raise _refuse(where, "beta_schedule", values["beta_schedule"],
                  f"is not supported; use one of {', '.join(BETA_SCHEDULES)}")
  if values["prediction_type"] not in PREDICTIONS:
    raise _refuse(where, "prediction_type", values["prediction_type"],
                  f"is not supported; use one of {', '.join(PREDICTIONS)}")
  if values["timestep_spacing"] not in ("leading", "trailing", "linspace"):
    raise _refuse(where, "timestep_spacing", values["timestep_spacing"],
                  "is not supported; use leading, trailing or linspace")
  for field in ("clip_sample", "thresholding"):
    if values[field]:
      raise _refuse(where, field, True, "is not implemented by this project's samplers (they "
                    "never clip or threshold x0); set it to false in scheduler_config.json")
  fields = dict(schedule=BETA_SCHEDULES[values["beta_schedule"]],
                num_train_timesteps=int(values["num_train_timesteps"]),
                beta_start=float(values["beta_start"]), beta_end=float(values["beta_end"]),
                prediction=PREDICTIONS[values["prediction_type"]],
                timestep_spacing=values["timestep_spacing"],
                steps_offset=int(values["steps_offset"]),
                set_alpha_to_one=bool(values["set_alpha_to_one"]),
                zero_terminal_snr=bool(values["rescale_betas_zero_snr"]))
  return fields, SAMPLER_OF_SCHEDULER.get(cls)


def scheduler_config(diffusion: ml_collections.ConfigDict, sampler: str,
                     base: dict | None = None) -> dict:
  """A diffusers scheduler config of a ``diffusion`` section (over ``base``, the imported one)."""
  if diffusion.schedule not in BETA_SCHEDULES.values():
    raise PipelineError(f"diffusion.schedule={diffusion.schedule!r} has no SD-2.x scheduler; "
                        f"only discrete (scaled_linear, linear, cosine) schedules export")
  out = dict(base or {})
  if "_class_name" not in out:
    out["_class_name"] = SCHEDULER_OF_SAMPLER.get(sampler, "DDIMScheduler")
  names = {v: k for k, v in BETA_SCHEDULES.items()}
  preds = {v: k for k, v in PREDICTIONS.items()}
  if diffusion.prediction not in preds:
    raise PipelineError(f"diffusion.prediction={diffusion.prediction!r} has no diffusers "
                        f"prediction_type; use eps, v or x0")
  out.update(num_train_timesteps=diffusion.num_train_timesteps,
             beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
             beta_schedule=names[diffusion.schedule],
             prediction_type=preds[diffusion.prediction],
             timestep_spacing=diffusion.timestep_spacing, steps_offset=diffusion.steps_offset,
             set_alpha_to_one=diffusion.set_alpha_to_one, clip_sample=False,
             rescale_betas_zero_snr=diffusion.zero_terminal_snr, trained_betas=None)
  return out


def vae_fields(vcfg: dict) -> dict:
  """``vae`` section fields of an ``AutoencoderKL`` config."""
  where = "vae/config.json"
  cls = vcfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise _refuse(where, "_class_name", cls, "is not the AutoencoderKL this project implements")
  for field, allowed in _VAE_FIXED.items():
    value = vcfg.get(field, allowed[0])
    if value not in allowed:
      raise _refuse(where, field, value, f"is not implemented by this VAE (it needs "
                    f"{allowed[0]!r})")
  widths = list(vcfg.get("block_out_channels", (64,)))
  if any(w % widths[0] for w in widths):
    raise _refuse(where, "block_out_channels", widths, "must be multiples of the first width")
  for field, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
    kinds = list(vcfg.get(field, [want] * len(widths)))
    if kinds != [want] * len(widths):
      raise _refuse(where, field, kinds, f"must be {len(widths)} x {want}")
  return dict(width=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
              layers_per_block=int(vcfg.get("layers_per_block", 1)),
              latent_channels=int(vcfg.get("latent_channels", 4)),
              norm_groups=int(vcfg.get("norm_num_groups", 32)),
              mid_attention=bool(vcfg.get("mid_block_add_attention", True)), scaling_factor=0.0)


# -------------------------------------------------------------------------------------------------
# Weights.


def _linear_projections(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """SD-1.x's 1x1-conv ``proj_in`` / ``proj_out`` (``(C, C, 1, 1)``) as the linear layers they
  equal (``(C, C)``): GroupNorm -> 1x1 conv -> flatten is GroupNorm -> flatten -> linear."""
  out = {}
  for key, value in state.items():
    if (".proj_in.weight" in key or ".proj_out.weight" in key) and value.ndim == 4:
      if value.shape[2:] != (1, 1):
        raise PipelineError(f"unet weight {key} has a {value.shape[2:]} kernel; only 1x1 "
                            f"projections equal linear ones")
      value = value[:, :, 0, 0]
    out[key] = value
  return out


def unet_template(config: ml_collections.ConfigDict):
  """The UNet's parameter shapes (boxed ``ShapeDtypeStruct``s) for ``config.model``."""
  from ldm_scaling import models  # pylint: disable=g-import-not-at-top  # models imports us not
  from ldm_scaling.models import unet  # pylint: disable=g-import-not-at-top
  model = models.build(config.model)
  side = unet.down_factor(config.model)
  x = jax.ShapeDtypeStruct((1, side, side, config.model.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, 1, config.model.cross_attn_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]


def _train_state(config: ml_collections.ConfigDict, params: Any):
  """Checkpoint 0 in the trainer's layout: the weights as params and EMA (where the objective
  keeps one), each network's fresh optimiser state of ``train.*``."""
  from ldm_scaling.train import objectives, optim  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train.state import TrainState  # pylint: disable=g-import-not-at-top
  networks = objectives.build(config).networks()
  if set(networks) != {"unet"}:
    raise ConfigError(f"objective.name={config.objective.name!r} trains {sorted(networks)}; an "
                      f"imported UNet starts a 'denoising' run (set objective.name=denoising)")
  net = networks["unet"]
  tx = optim.optimizer(optim.settings(config.train, net.optimizer))
  weights = {"unet": jax.device_put(params)}
  # One compiled program instead of an eager op per leaf (seconds for a UNet's ~700 leaves).
  opt_state = jax.jit(tx.init)(weights["unet"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=weights,
                    ema=dict(weights) if net.ema else {}, opt_state={"unet": opt_state})


def _fresh_data_state(config: ml_collections.ConfigDict):
  """A grain iterator at the start (state ``{"next_index": 0}``) for the checkpoint's ``data``
  item, which the trainer writes with every checkpoint. A resume does not read it back into the
  data iterator (the position is set from the step, ``train/checkpoint.py``), so a stand-in
  dataset gives it without reading any data."""
  import grain  # pylint: disable=g-import-not-at-top
  d = config.data
  return iter(grain.MapDataset.range(1).batch(1).to_iter_dataset(
      grain.ReadOptions(num_threads=d.threads, prefetch_buffer_size=d.prefetch)))


def _write_checkpoint(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
  from ldm_scaling.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  state = _train_state(config, params)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                       best_metric=None, async_save=False)
  try:
    meta = dict(config_hash=cfglib.config_hash(config), objective=config.objective.name,
                state_layout=ckpt_lib.STATE_LAYOUT)
    checkpointer.save(0, state, _fresh_data_state(config), meta)
    checkpointer.wait()
  finally:
    checkpointer.close()


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``config.json`` exactly as the trainer writes it, and ``config.py`` that loads it (the
  ``--config`` of a fine-tuning run in this workdir)."""
  root = epath.Path(workdir)
  files.atomic_write_text(root / "config.json",
                          json.dumps(cfglib.run_record(config), indent=1, default=list))
  files.atomic_write_text(root / "config.py", _CONFIG_PY.format(
      config=json.dumps(config.to_dict(), indent=1, default=list)))


_CONFIG_PY = '''"""The config of a diffusers pipeline imported by `ldm-scaling import-diffusers`.

Fine-tune it: ldm-scaling train --config <this file> --workdir <its workdir> \\
    --config.data.name=... --config.train.steps=...
"""
import json

from ldm_scaling import config as cfglib

CONFIG = json.loads(r"""{config}""")


def get_config(arg=None):
  del arg
  return cfglib.with_defaults(CONFIG)
'''


# -------------------------------------------------------------------------------------------------
# Import.


def _copy_tree(src: epath.Path, dst: epath.Path, skip: tuple[str, ...] = ()) -> None:
  """Copies a component folder byte for byte (with its subfolders), except the names in
  ``skip``."""
  dst.mkdir(parents=True, exist_ok=True)
  for item in _io(str(src), lambda: list(src.iterdir())):
    if item.name in skip:
      continue
    if _io(str(item), item.is_dir):
      _copy_tree(item, dst / item.name)
    else:
      files.atomic_write_bytes(dst / item.name, _io(str(item), item.read_bytes))


def _local_workdir(workdir: str) -> str:
  if not files.is_local(workdir):
    raise ConfigError(f"workdir {workdir!r}: import into a local directory (the VAE and text "
                      f"encoder are read from local paths), then copy the workdir where you need "
                      f"it")
  return os.path.abspath(os.path.expanduser(workdir))


def _add_flax_text_weights(config: ml_collections.ConfigDict) -> None:
  """Loads the copied text tower once (checking it against the UNet) and stores its Flax weights
  beside the PyTorch ones: transformers then reads ``flax_model.msgpack`` directly instead of
  converting ``model.safetensors`` at every load (5 s for the tiny test tower; export leaves it
  out)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import text  # pylint: disable=g-import-not-at-top
  encoder = text.load_text_encoder(config)
  folder = os.path.join(config.text.encoder, config.text.subfolder)
  model = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(folder), _do_init=False)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, params=encoder.params)
    shutil.copyfile(os.path.join(tmp, FLAX_TEXT_WEIGHTS),
                    os.path.join(folder, FLAX_TEXT_WEIGHTS))


def import_pipeline(src_dir: str, workdir: str,
                    base_config: ml_collections.ConfigDict | None = None,
                    log: Callable[[str], None] = print) -> dict:
  """Imports the diffusers SD-1.x/2.x pipeline in ``src_dir`` into ``workdir`` (see the module
  docstring); ``base_config`` gives every section the pipeline does not describe (data, train,
  eval; default the base config). Returns a summary."""
  from ldm_scaling import experiment  # pylint: disable=g-import-not-at-top  # above the stages
  from ldm_scaling.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  src = _path(src_dir)
  index = _check_pipeline(src)
  workdir = _local_workdir(workdir)
  if ckpt_lib.available_steps(workdir) or os.path.isfile(os.path.join(workdir, "config.json")):
    raise ConfigError(f"workdir {workdir!r} already holds a run; import into a new directory")

  ucfg = _read_json(src / "unet" / "config.json")
  model, linear = unet_fields(ucfg)
  diffusion, sampler = scheduler_fields(_read_json(src / "scheduler" / "scheduler_config.json"))
  vae = vae_fields(_read_json(src / "vae" / "config.json"))
  tcfg = _read_json(src / "text_encoder" / "config.json")
  hidden = tcfg.get("hidden_size")
  if tcfg.get("model_type", "clip_text_model") != "clip_text_model":
    raise _refuse("text_encoder/config.json", "model_type", tcfg.get("model_type"),
                  "is not a CLIP text tower (CLIPTextModel)")
  if hidden != model["cross_attn_dim"]:
    raise _refuse("unet/config.json", "cross_attention_dim", model["cross_attn_dim"],
                  f"differs from the text encoder's hidden_size={hidden}")
  tok_path = src / "tokenizer" / "tokenizer_config.json"
  max_length = int(_read_json(tok_path).get("model_max_length", 77)) if _exists(tok_path) else 77
  max_length = max_length if 1 <= max_length <= 512 else 77

  config = cfglib.base_config() if base_config is None else cfglib.with_defaults(
      base_config.to_dict())
  config.model.update(model)
  config.diffusion.update(diffusion)
  config.vae.update(vae)
  pipeline = os.path.join(workdir, PIPELINE)
  config.vae.update(weights=pipeline, subfolder="vae", dir="")
  config.text.update(encoder=pipeline, subfolder="text_encoder", tokenizer="",
                     max_length=max_length)
  config.objective.name = "denoising"
  if sampler:
    config.eval.samplers = (sampler,) + tuple(s for s in config.eval.samplers if s != sampler)
  resolution = int(ucfg.get("sample_size", 64)) * 2 ** (len(vae["channel_mult"]) - 1)
  if not (config.data.name.startswith("shapes") and resolution > 128):
    config.data.resolution = resolution
  else:
    log(f"data.resolution stays {config.data.resolution} (the embedded shapes data renders at most "
        f"128 px); sample at the pipeline's {resolution} px with --latent-size "
        f"{ucfg.get('sample_size', 64)}")
  experiment.validate(config)

  log(f"reading {src}/unet ...")
  state = _load_safetensors(src / "unet", UNET_WEIGHTS)
  if not linear:
    state = _linear_projections(state)
  params = convert.convert_state_dict(state, unet_template(config))
  del state  # a UNet's worth of host memory (3.5 GB for SD-2.x) before the optimiser state

  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  for folder in ("vae", "text_encoder", "tokenizer", "scheduler"):
    log(f"copying {folder}/ ...")
    _copy_tree(src / folder, root / PIPELINE / folder)
  (root / PIPELINE / "unet").mkdir(parents=True, exist_ok=True)
  files.atomic_write_text(root / PIPELINE / "unet" / "config.json", json.dumps(ucfg, indent=2))
  files.atomic_write_text(root / PIPELINE / "model_index.json",
                          json.dumps(index or _model_index(None, None), indent=2))
  log("converting the text encoder to Flax ...")
  _add_flax_text_weights(config)
  write_run_config(workdir, config)
  log("writing checkpoint 0 ...")
  _write_checkpoint(workdir, config, params)
  return dict(workdir=workdir, source=str(src), width=config.model.width,
              channel_mult=list(config.model.channel_mult), prediction=config.diffusion.prediction,
              sampler=config.eval.samplers[0], params=int(sum(np.size(p) for p in
                                                              jax.tree.leaves(params))))


# -------------------------------------------------------------------------------------------------
# Export.


def _model_index(scheduler: dict | None, base: dict | None) -> dict:
  out = dict(base or {})
  out.update(_class_name=out.get("_class_name", "StableDiffusionPipeline"),
             unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
             text_encoder=["transformers", "CLIPTextModel"],
             tokenizer=out.get("tokenizer", ["transformers", "CLIPTokenizer"]))
  if scheduler and "_class_name" in scheduler:
    out["scheduler"] = ["diffusers", scheduler["_class_name"]]
  out.setdefault("safety_checker", [None, None])
  out.setdefault("feature_extractor", [None, None])
  out.setdefault("requires_safety_checker", False)
  return out


def _optional_json(path: str) -> dict | None:
  return json.loads(epath.Path(path).read_text()) if epath.Path(path).is_file() else None


def _export_vae(config, dst: epath.Path) -> None:
  from ldm_scaling.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  v = config.vae
  dst.mkdir(parents=True, exist_ok=True)
  if v.weights == vae_lib.TRAINED:
    loaded = vae_lib.load_trained(config)
    vcfg = vae_lib.diffusers_config(v, loaded.scaling_factor, {})
    vcfg.pop("ldm_scaling", None)
    files.atomic_write_text(dst / "config.json", json.dumps(vcfg, indent=2))
    data = st.save({k: a for k, a in convert.to_state_dict(loaded.params).items()})
    files.atomic_write_bytes(dst / f"{UNET_WEIGHTS}.safetensors", data)
    return
  loc = os.path.expanduser(v.weights)
  folder = os.path.join(loc, v.subfolder) if os.path.isdir(os.path.join(loc, v.subfolder)) else loc
  if not os.path.isdir(folder):
    raise PipelineError(f"vae.weights={v.weights!r} is not a local directory; download the VAE "
                        f"(or train one) before exporting")
  _copy_tree(epath.Path(folder), dst)


def _export_text(config, out: epath.Path) -> None:
  from ldm_scaling.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  t = config.text
  loc = os.path.expanduser(t.encoder)
  if t.encoder == tok_lib.OFFLINE or not os.path.isdir(loc):
    raise PipelineError(f"text.encoder={t.encoder!r}: export copies a local transformers CLIP "
                        f"text tower (a PyTorch model.safetensors that diffusers loads); the "
                        f"project's small CLIP and hub ids are not exported")
  encoder = os.path.join(loc, t.subfolder)
  if not os.path.isfile(os.path.join(encoder, "model.safetensors")):
    raise PipelineError(f"{encoder} has no model.safetensors (diffusers' CLIPTextModel needs it)")
  _copy_tree(epath.Path(encoder), out / "text_encoder", skip=(FLAX_TEXT_WEIGHTS,))
  tok = t.tokenizer or (os.path.join(loc, "tokenizer") if t.subfolder == "text_encoder" else loc)
  if tok in (tok_lib.BPE, tok_lib.OFFLINE):
    tok_lib.bpe_tokenizer(t.max_length).save_pretrained(os.fspath(out / "tokenizer"))
  elif os.path.isdir(os.path.expanduser(tok)):
    _copy_tree(epath.Path(os.path.expanduser(tok)), out / "tokenizer")
  else:
    raise PipelineError(f"text.tokenizer {tok!r} is not a local directory; cannot export it")


def export_pipeline(workdir: str, out_dir: str, *, step: int | None = None, which: str = "ema",
                    log: Callable[[str], None] = print) -> dict:
  """Writes ``workdir``'s UNet (``which`` weights of checkpoint ``step``, default the latest EMA),
  VAE, text encoder, tokenizer and scheduler as a diffusers pipeline directory ``out_dir``."""
  from ldm_scaling.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  config = ckpt_lib.load_run_config(workdir)
  if config.objective.name not in ("denoising", "consistency"):
    raise PipelineError(f"{workdir!r} is a {config.objective.name!r} run, not a UNet; nothing to "
                        f"export as a Stable Diffusion pipeline")
  out = epath.Path(out_dir)
  if out.exists() and list(out.iterdir()):
    raise ConfigError(f"output directory {out_dir!r} is not empty; give a new directory")
  imported = os.path.join(ckpt_lib.absolute(workdir), PIPELINE)
  sampler = config.eval.samplers[0]
  scfg = scheduler_config(config.diffusion, sampler,
                          _optional_json(os.path.join(imported, "scheduler",
                                                      "scheduler_config.json")))
  from ldm_scaling.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  sample_size = config.data.resolution // vae_lib.down_factor(config.vae)
  base_unet = _optional_json(os.path.join(imported, "unet", "config.json"))
  if base_unet and "sample_size" in base_unet:
    sample_size = base_unet["sample_size"]
  ucfg = unet_config(config.model, sample_size, base_unet)
  got_step, weights = ckpt_lib.load_weights(workdir, step=step, which=which)
  if "unet" not in weights:
    raise PipelineError(f"{workdir!r} checkpoint {got_step} has no 'unet' ({sorted(weights)})")

  out.mkdir(parents=True, exist_ok=True)
  log(f"writing unet/ (step {got_step}, {which}) ...")
  (out / "unet").mkdir(parents=True, exist_ok=True)
  files.atomic_write_text(out / "unet" / "config.json", json.dumps(ucfg, indent=2))
  state = convert.to_state_dict(jax.device_get(weights["unet"]))
  files.atomic_write_bytes(out / "unet" / f"{UNET_WEIGHTS}.safetensors", st.save(state))
  (out / "scheduler").mkdir(parents=True, exist_ok=True)
  files.atomic_write_text(out / "scheduler" / "scheduler_config.json", json.dumps(scfg, indent=2))
  log("writing vae/, text_encoder/, tokenizer/ ...")
  _export_vae(config, out / "vae")
  _export_text(config, out)
  index = _model_index(scfg, _optional_json(os.path.join(imported, "model_index.json")))
  files.atomic_write_text(out / "model_index.json", json.dumps(index, indent=2))
  return dict(out=str(out), workdir=workdir, step=got_step, weights=which,
              scheduler=scfg["_class_name"])
