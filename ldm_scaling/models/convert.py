"""PyTorch (diffusers) state dicts -> this project's Flax parameters, by renaming alone.

Our parameter paths are diffusers' PyTorch keys with every ``.N`` index joined to the name before
it (``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/kernel``). The leaf
is renamed ``weight`` -> ``kernel`` (transposed: linear ``(out, in)`` -> ``(in, out)``, conv
``OIHW`` -> ``HWIO``) or ``scale`` (norms), ``bias`` stays. Nothing else is rearranged, so the same
table serves the UNet and the VAE.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import numpy as np
from safetensors.numpy import load_file

from ldm_scaling import sharding
from ldm_scaling.errors import UserError


class ConversionError(UserError, ValueError):
  """A checkpoint whose keys or shapes do not fit the target model."""


def torch_key_to_path(key: str, ndim: int) -> tuple[str, ...]:
  """``"a.b.0.c.weight"`` (of an ``ndim`` tensor) -> ``("a", "b_0", "c", "kernel")``."""
  parts: list[str] = []
  for token in key.split("."):
    if token.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{token}"
    else:
      parts.append(token)
  leaf = parts[-1]
  if leaf == "weight":
    parts[-1] = "scale" if ndim == 1 else "kernel"
  elif leaf != "bias":
    raise ConversionError(f"unexpected tensor {key!r}: only weights and biases are parameters")
  return tuple(parts)


def torch_to_flax_array(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if value.ndim == 2:
    return value.T
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def convert_state_dict(state_dict: Mapping[str, Any], template: Any) -> dict:
  """Maps a PyTorch ``state_dict`` (tensors or arrays) onto ``template``'s parameter tree.

  ``template`` is the params tree (arrays or ``jax.ShapeDtypeStruct``, boxed or not); the result
  has its structure, shapes and dtypes. Missing, unexpected and mis-shaped keys are all reported.
  """
  target = flax.traverse_util.flatten_dict(sharding.unbox(template))
  out, seen, unexpected, bad_shape = {}, set(), [], []
  for key, tensor in state_dict.items():
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    path = torch_key_to_path(key, array.ndim)
    if path not in target:
      unexpected.append(key)
      continue
    seen.add(path)
    array = torch_to_flax_array(array)
    if tuple(array.shape) != tuple(target[path].shape):
      bad_shape.append(f"{key}: {tuple(array.shape)} vs {tuple(target[path].shape)}")
      continue
    out[path] = array.astype(target[path].dtype)
  missing = ["/".join(p) for p in target if p not in seen]
  if unexpected or bad_shape or missing:
    raise ConversionError(
        "checkpoint does not match the model config"
        + (f"; shape mismatches: {bad_shape[:5]}" if bad_shape else "")
        + (f"; unexpected keys ({len(unexpected)}): {unexpected[:5]}" if unexpected else "")
        + (f"; missing parameters ({len(missing)}): {missing[:5]}" if missing else "")
        + ". Check model.width / channel_mult / cross_attn_dim against the checkpoint's config.")
  return flax.traverse_util.unflatten_dict(out)


def load_safetensors(path: str, template: Any) -> dict:
  """Reads a diffusers ``*.safetensors`` file (e.g. ``unet/diffusion_pytorch_model.safetensors``)
  and converts it onto ``template``. No pickle is executed."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"weights file {path!r} not found; download it (e.g. `huggingface-cli download "
        f"stabilityai/stable-diffusion-2-1-base unet/diffusion_pytorch_model.safetensors`) or "
        f"point to a local copy")
  return convert_state_dict(load_file(path), template)


# -------------------------------------------------------------------------------------------------
# The inverse: our Flax parameters -> a diffusers PyTorch state dict (``ldm-scaling
# export-diffusers``). Every ``name_N`` component is an index (``.N``) except diffusers' own names
# that end in a number (``time_embedding.linear_1``); ``torch_key_to_path`` of the result gives the
# path back, which :func:`to_state_dict` checks for every parameter.

NAMES_WITH_NUMBERS = ("linear_1", "linear_2")


def path_to_torch_key(path: tuple[str, ...]) -> str:
  """``("a", "b_0", "c", "kernel")`` -> ``"a.b.0.c.weight"`` (the inverse of
  :func:`torch_key_to_path`)."""
  parts = []
  for name in path[:-1]:
    head, sep, tail = name.rpartition("_")
    if sep and tail.isdigit() and head and name not in NAMES_WITH_NUMBERS:
      parts += [head, tail]
    else:
      parts.append(name)
  leaf = path[-1]
  if leaf not in ("kernel", "scale", "bias"):
    raise ConversionError(f"unexpected parameter {'/'.join(path)!r}: only kernels, scales and "
                          f"biases have diffusers names")
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def flax_to_torch_array(value: np.ndarray) -> np.ndarray:
  """Inverse of :func:`torch_to_flax_array`: ``(in, out)`` -> ``(out, in)``, ``HWIO`` -> ``OIHW``
  (C-contiguous, as safetensors stores it)."""
  value = np.asarray(value)
  if value.ndim == 2:
    value = value.T
  elif value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  return np.ascontiguousarray(value)


def to_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Our parameter tree (boxed or not) -> diffusers' ``{key: array}``; values are copied
  bit-exactly (transposes only)."""
  flat = flax.traverse_util.flatten_dict(sharding.unbox(params))
  out = {}
  for path, value in flat.items():
    key = path_to_torch_key(path)
    array = flax_to_torch_array(value)
    if torch_key_to_path(key, array.ndim) != path:
      raise ConversionError(f"parameter {'/'.join(path)!r} has no unambiguous diffusers name "
                            f"(got {key!r})")
    out[key] = array
  return out
