"""The cost model: parameters, forward FLOPs, normalised cost and sampling cost of a config.

The one source of these numbers for the CLI table, the trainer's MFU, eval rows and sweep plans.

* parameters: counted on ``jax.eval_shape`` of the model's init, so a 5B model costs no memory;
* forward GFLOPs per sample: XLA's ``cost_analysis()["flops"]`` of the lowered forward at Mei et
  al.'s setting (``cost.latent_size``^2 x ``model.in_channels`` latent, ``cost.text_len`` tokens,
  batch 1, f32), lowered from abstract shapes, never compiled or allocated;
* normalised cost: GFLOPs / GFLOPs of the same topology at ``cost.reference_width`` (320);
* sampling cost: normalised cost x steps x passes per step, where a guided step counts 2 passes
  only if ``cost.count_uncond_pass`` (default False, the paper's convention). A guidance-embedded
  student (``model.guidance_embed``) takes its scale as an input: 1 pass per step at any scale
  (``ldm_scaling.diffusion.generate`` samples it unguided); its parameters and FLOPs include the
  w embedding's ``cond_proj``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from ldm_scaling.errors import ConfigError
from ldm_scaling import models
from ldm_scaling import sharding
from ldm_scaling.models import unet

# Mei et al. 2024, "Bigger is not Always Better", Table 1 (64x64x4 latent, f32). The paper rounds
# 2.19B and 4.90B to "2B" and "5B"; its 25.3 GFLOPs at width 64 contradicts its own normalised cost
# 0.07 (= 55 GFLOPs / 789.3), see docs/cost_model.md.
PAPER_TABLE1 = {
    64: dict(params=39e6, gflops=25.3, norm_cost=0.07, fid=25.30, clip=0.305),
    96: dict(params=83e6, gflops=102.7, norm_cost=0.13, fid=24.30, clip=0.308),
    128: dict(params=145e6, gflops=161.5, norm_cost=0.20, fid=24.18, clip=0.310),
    160: dict(params=223e6, gflops=233.5, norm_cost=0.30, fid=23.76, clip=0.310),
    192: dict(params=318e6, gflops=318.5, norm_cost=0.40, fid=22.83, clip=0.311),
    224: dict(params=430e6, gflops=416.6, norm_cost=0.53, fid=22.35, clip=0.312),
    256: dict(params=558e6, gflops=527.8, norm_cost=0.67, fid=22.15, clip=0.312),
    288: dict(params=704e6, gflops=652.0, norm_cost=0.83, fid=21.82, clip=0.312),
    320: dict(params=866e6, gflops=789.3, norm_cost=1.00, fid=21.55, clip=0.312),
    512: dict(params=2e9, gflops=1887.5, norm_cost=2.39, fid=20.98, clip=0.312),
    768: dict(params=5e9, gflops=4082.6, norm_cost=5.17, fid=20.14, clip=0.314),
}


@dataclasses.dataclass(frozen=True)
class ModelCost:
  width: int
  params: int
  gflops: float
  norm_cost: float


def _abstract_inputs(model_cfg, cost_cfg, batch: int = 1):
  size = cost_cfg.latent_size
  return (jax.ShapeDtypeStruct((batch, size, size, model_cfg.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, cost_cfg.text_len, model_cfg.cross_attn_dim), jnp.float32))


def _abstract_kwargs(model_cfg, batch: int = 1) -> dict:
  """The guidance scale ``w`` of a guidance-embedded UNet (``model.guidance_embed``)."""
  if model_cfg.get("guidance_embed", False):
    return dict(w=jax.ShapeDtypeStruct((batch,), jnp.float32))
  return {}


def abstract_params(model_cfg: ml_collections.ConfigDict, cost_cfg: ml_collections.ConfigDict):
  """Boxed ``jax.ShapeDtypeStruct`` tree of the model's parameters (no memory)."""
  model = models.build(model_cfg)
  inputs = _abstract_inputs(model_cfg, cost_cfg)
  return jax.eval_shape(model.init, jax.random.key(0), *inputs,
                        **_abstract_kwargs(model_cfg))["params"]


def count_params(params: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(sharding.unbox(params))))


def _key(model_cfg, cost_cfg) -> str:
  # FLOPs are counted on dense attention: chunked attention computes the same thing under a loop
  # (whose body XLA's cost analysis would count once) and rematerialises it.
  model = dict(model_cfg.to_dict(), attn_query_chunk=0, attn_kernel="xla")
  return json.dumps([model, cost_cfg.to_dict()], sort_keys=True, default=list)


@functools.lru_cache(maxsize=64)
def _measure(key: str) -> tuple[int, float]:
  model_dict, cost_dict = json.loads(key)
  model_cfg = ml_collections.ConfigDict(model_dict)
  cost_cfg = ml_collections.ConfigDict(cost_dict)
  model = models.build(model_cfg)
  params = sharding.unbox(abstract_params(model_cfg, cost_cfg))
  inputs = _abstract_inputs(model_cfg, cost_cfg)
  # The lowered (unoptimised) module's count: within 0.02% of the compiled one's at every paper
  # width (fusion does not change FLOPs), without the compile (0.2 vs 2.5 s a width here).
  # A guidance-embedded UNet's one forward includes its w embedding (``cond_proj``).
  analysis = jax.jit(lambda p, *a, **k: model.apply({"params": p}, *a, **k)).lower(
      params, *inputs, **_abstract_kwargs(model_cfg)).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per computation
    analysis = analysis[0]
  return count_params(params), float(analysis["flops"]) / 1e9


def measure(model_cfg: ml_collections.ConfigDict,
            cost_cfg: ml_collections.ConfigDict) -> tuple[int, float]:
  """(parameter count, forward GFLOPs per sample) of a model section; cached per config."""
  models.validate(model_cfg)
  return _measure(_key(model_cfg, cost_cfg))


def reference_model(model_cfg: ml_collections.ConfigDict,
                    reference_width: int) -> ml_collections.ConfigDict:
  """The same topology at the reference width, with that width's head preset."""
  ref = ml_collections.ConfigDict(model_cfg.to_dict())
  ref.update(unet.preset(reference_width, tuple(model_cfg.channel_mult)))
  return ref


def model_cost(model_cfg: ml_collections.ConfigDict,
               cost_cfg: ml_collections.ConfigDict) -> ModelCost:
  params, gflops = measure(model_cfg, cost_cfg)
  _, ref_gflops = measure(reference_model(model_cfg, cost_cfg.reference_width), cost_cfg)
  return ModelCost(model_cfg.width, params, gflops, gflops / ref_gflops)


def step_costs(model_cfg: ml_collections.ConfigDict, cost_cfg: ml_collections.ConfigDict,
               sides: Sequence[int]) -> tuple[float, ...]:
  """The forward cost of each step of a scale-wise trajectory relative to a full-size step: XLA's
  FLOP count of the model at each latent side over its count at the last (full) side. Close to
  ``(s / R)^2``; attention's quadratic terms make smaller sides cheaper still."""
  def gflops(side):
    return measure(model_cfg, ml_collections.ConfigDict(dict(cost_cfg.to_dict(),
                                                             latent_size=int(side))))[1]
  full = gflops(sides[-1])
  return tuple(gflops(s) / full for s in sides)


def passes_per_step(cfg_scale: float | None, count_uncond_pass: bool) -> int:
  """Forward passes a sampling step is charged: 2 for a guided step when the convention counts
  the unconditional pass, else 1. A scale of 1 (or None) needs no unconditional pass."""
  guided = cfg_scale is not None and cfg_scale != 1.0
  return 2 if (guided and count_uncond_pass) else 1


def sampling_cost(norm_cost: float, steps: int, cfg_scale: float | None = None,
                  count_uncond_pass: bool = False,
                  relative_steps: Sequence[float] | None = None) -> float:
  """Normalised cost x steps (x 2 for guided steps if ``count_uncond_pass``). A scale-wise
  trajectory counts each step at its :func:`step_costs` (``relative_steps``, one per step)."""
  if int(steps) != steps or steps < 1:
    raise ConfigError(f"sampling steps must be a positive integer, got {steps!r}")
  if relative_steps is not None:
    if len(relative_steps) != steps:
      raise ConfigError(f"{len(relative_steps)} relative step costs for {steps} steps")
    return norm_cost * float(sum(relative_steps)) * passes_per_step(cfg_scale, count_uncond_pass)
  return norm_cost * steps * passes_per_step(cfg_scale, count_uncond_pass)


_PAPER_TOPOLOGY = dict(channel_mult=(1, 2, 4, 4), layers_per_block=2,
                       attn_levels=(True, True, True, False), transformer_depth=1,
                       cross_attn_dim=1024, in_channels=4, out_channels=4)


def is_paper_setting(config: ml_collections.ConfigDict) -> bool:
  """Whether the config measures the paper's topology at the paper's setting (so its Table 1
  numbers are a fair comparison)."""
  m, c = config.model, config.cost
  same = all(tuple(m[k]) == v if isinstance(v, tuple) else m[k] == v
             for k, v in _PAPER_TOPOLOGY.items())
  return same and c.latent_size == 64 and c.text_len == 77 and c.reference_width == 320


def _rel(ours: float, paper: float) -> float:
  return (ours - paper) / paper


def table(config: ml_collections.ConfigDict, widths: Sequence[int],
          steps: int | None = None, cfg_scale: float | None = None) -> list[dict[str, Any]]:
  """One row per width: our params / GFLOPs / normalised cost next to the paper's Table 1."""
  if steps is not None:
    sampling_cost(1.0, steps)  # validate before compiling anything
  rows = []
  compare = is_paper_setting(config)
  for width in widths:
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    model_cfg.update(unet.preset(width, tuple(model_cfg.channel_mult)))
    cost = model_cost(model_cfg, config.cost)
    row = dict(width=width, params=cost.params, gflops=round(cost.gflops, 3),
               norm_cost=round(cost.norm_cost, 4))
    if steps is not None:
      row["steps"] = steps
      row["sampling_cost"] = round(sampling_cost(cost.norm_cost, steps, cfg_scale,
                                                 config.cost.count_uncond_pass), 4)
    paper = PAPER_TABLE1.get(width) if compare else None
    if paper:
      row.update(paper_params=paper["params"], paper_gflops=paper["gflops"],
                 paper_norm_cost=paper["norm_cost"],
                 params_rel_err=round(_rel(cost.params, paper["params"]), 4),
                 gflops_rel_err=round(_rel(cost.gflops, paper["gflops"]), 4))
    rows.append(row)
  return rows


def _fmt_params(n: float) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_table(rows: Iterable[dict[str, Any]]) -> str:
  """Human-readable table (the CLI's default output)."""
  rows = list(rows)
  steps = any("sampling_cost" in r for r in rows)
  head = (f"{'width':>5} {'params':>8} {'paper':>6} {'err':>6}   {'GFLOPs':>8} {'paper':>7} "
          f"{'err':>6}   {'norm':>5} {'paper':>5}" + (f"   {'steps':>5} {'samp.cost':>9}"
                                                       if steps else ""))
  lines = [head, "-" * len(head)]
  for r in rows:
    has = "paper_params" in r
    pp = _fmt_params(r["paper_params"]) if has else "-"
    pe = f"{100 * r['params_rel_err']:+.1f}%" if has else "-"
    pg = f"{r['paper_gflops']:.1f}" if has else "-"
    ge = f"{100 * r['gflops_rel_err']:+.1f}%" if has else "-"
    pn = f"{r['paper_norm_cost']:.2f}" if has else "-"
    mark = " *" if r["width"] == 64 and has else ""
    line = (f"{r['width']:>5} {_fmt_params(r['params']):>8} {pp:>6} {pe:>6}   "
            f"{r['gflops']:>8.1f} {pg:>7} {ge:>6}   {r['norm_cost']:>5.2f} {pn:>5}")
    if steps:
      line += f"   {r['steps']:>5} {r['sampling_cost']:>9.2f}"
    lines.append(line + mark)
  if any(r["width"] == 64 and "paper_params" in r for r in rows):
    lines.append("* the paper prints 25.3 GFLOPs for width 64, but its own normalised cost 0.07 "
                 "implies 0.07 x 789.3 = 55 GFLOPs; the measured value agrees with 0.07.")
  return "\n".join(lines)
