"""Text-to-image LDM at one of Mei et al.'s widths (Table 1), trained from scratch, in the paper's
setting: 512 px images -> the SD-2.x VAE's 64x64x4 latents, captions -> 77 tokens -> the SD-2.x
text tower (OpenCLIP ViT-H/14's, hidden size 1024 = model.cross_attn_dim).

  ldm-scaling cost   --config configs/t2i.py:width=128
  ldm-scaling config --config configs/t2i.py:width=320,steps=1000 --config.train.lr=2e-4
  # once: encode the dataset with the VAE (posterior moments, float16) -> a latent cache
  ldm-scaling cache-latents --config configs/t2i.py:data=tfds:coco_captions \\
      --out gs://BUCKET/latents/coco512
  # train on the cache (no VAE encoder in the step, no image decoding on the host)
  ldm-scaling train --workdir gs://BUCKET/runs/w320 \\
      --config configs/t2i.py:width=320,data=latents:gs://BUCKET/latents/coco512,eval_split=val

Arguments (after the colon):
- width (64, 96, ..., 320, 512, 768 or any multiple of 32; the attention-head layout follows the
  width, see ldm_scaling.models.unet.preset) and steps (training iterations; the paper trains
  500K at batch 2048);
- data: ``tfds:NAME`` (a tfds dataset prepared in array_record format in data_dir or
  $TFDS_DATA_DIR; default tfds:coco_captions, whose held-out split is ``val``),
  ``folder:<manifest>`` (your images + captions), ``latents:<dir>`` (a cache written by
  ``ldm-scaling cache-latents``; a gs:// directory works) or any other ``data.name``;
- data_dir: the tfds data_dir (local or gs://; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets);
- eval_split: the held-out split ("" = the dataset's: val for coco_captions, else test; a latent
  cache has the splits of the data it encoded, e.g. eval_split=val for one of COCO);
- resolution: pixels (512: 64x64 latents; 256 gives 32x32);
- vae: where the SD-2.x VAE is: a hub id or a diffusers pipeline directory (read from its ``vae``
  subfolder), or the VAE's own directory ("" = the hub's stabilityai/stable-diffusion-2-1-base);
- text: where the text tower is: a hub id or a pipeline directory (``text_encoder`` and
  ``tokenizer`` subfolders; "" = the same hub repository). For a directory holding only the
  encoder, add --config.text.subfolder= --config.text.tokenizer=DIR.
  A gs:// directory works too (vae=gs://BUCKET/sd2,text=gs://BUCKET/sd2): each machine copies
  the subfolders it reads once to its local cache (ldm_scaling.files.local_dir).

Nothing is read or downloaded when the config loads: the weights are fetched when a run builds
the VAE and the text encoder (ldm_scaling.models.vae.load, models.text.load_text_encoder).
"""

from ldm_scaling import config as cfglib
from ldm_scaling.models import unet
from ldm_scaling.models import vae as vae_lib

SD2 = "stabilityai/stable-diffusion-2-1-base"  # the SD-2.x VAE and text tower (OpenCLIP ViT-H)
DEFAULT_DATA = "tfds:coco_captions"
EVAL_SPLITS = {"coco_captions": "val"}          # tfds datasets whose held-out split is not test


def data_name(data: str) -> str:
  """The ``data`` argument as ``data.name``: ``tfds:NAME`` -> ``NAME``; anything else as given
  (``folder:...``, ``latents:...``, ``shapes`` or a bare tfds name)."""
  prefix, sep, rest = data.partition(":")
  if sep and prefix == "tfds":
    if not rest:
      raise cfglib.ConfigError("config argument data='tfds:' needs a dataset name, e.g. "
                               "data=tfds:coco_captions")
    return rest
  return data


def weights_location(value: str) -> str:
  """``vae=`` / ``text=``: a hub id, a local directory (``~`` allowed) or a gs:// directory (the
  loaders copy what they read to the local cache, ``files.local_dir``); "" = :data:`SD2`."""
  return value or SD2


def get_config(arg=None):
  arg = cfglib.parse_arg(arg, width=320, steps=500_000, data=DEFAULT_DATA, data_dir="",
                         eval_split="", resolution=512, vae="", text="")
  config = cfglib.base_config()
  config.model.update(unet.preset(arg.width, config.model.channel_mult))
  config.train.steps = arg.steps

  name = data_name(arg.data)
  config.data.update(name=name, resolution=arg.resolution, data_dir=arg.data_dir)
  config.data.eval_split = arg.eval_split or EVAL_SPLITS.get(name.split("/")[0],
                                                             config.data.eval_split)

  # SD-2.x's KL-f8 VAE: 512 px -> 64x64x4 latents, scaled by the factor stored with the weights.
  config.vae.update(vae_lib.preset("sd"))
  config.vae.update(weights=weights_location(arg.vae), subfolder="vae",
                    scaling_factor=0.0)
  # SD-2.x's text tower: OpenCLIP ViT-H/14, hidden size 1024, 77 tokens, its own tokenizer.
  config.text.update(encoder=weights_location(arg.text), subfolder="text_encoder",
                     tokenizer="", max_length=77)
  config.model.cross_attn_dim = 1024
  config.model.in_channels = config.model.out_channels = config.vae.latent_channels
  # FLOPs and sampling cost at the setting trained (Table 1's is 64x64 latents, 77 tokens).
  config.cost.update(latent_size=arg.resolution // vae_lib.down_factor(config.vae),
                     text_len=config.text.max_length)
  return config
