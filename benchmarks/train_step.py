"""Train-step throughput: our jitted step vs diffusers' PyTorch UNet2DConditionModel, side by side.

Both run the same thing: the SD-2.x UNet at one width (cross-attention dim 1024, 77 text tokens),
the eps-prediction denoising loss, backward, AdamW, on the same batch shape, on this machine's CPU.
Ours is the trainer's real step (``trainer.make_phase_step`` with the denoising objective, EMA and
clipping included); torch's is the usual ``loss.backward(); opt.step()``. Also prints our MFU
against a measured f32 matmul peak: model FLOPs (the cost model's forward FLOPs x 3 for forward +
backward, the usual MFU convention), with XLA's cost analysis of the compiled step for comparison
(it counts a loop body once, so it undercounts chunked attention, and it counts rematerialised
work).

  python benchmarks/train_step.py [--width 128] [--batch 8] [--latent 32] [--steps 5]

Last line: one JSON object.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("USE_TF", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def matmul_peak_tflops(n=2048, reps=10, dtype=jnp.float32) -> float:
  """Best matmul throughput of this JAX backend (TFLOP/s)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e12


def torch_matmul_peak_tflops(dtype_name, n=2048, reps=10) -> float:
  """The same measurement in torch (oneDNN/MKL; bf16 uses AMX where the CPU has it)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  a = torch.ones(n, n, dtype=getattr(torch, dtype_name))
  a @ a
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e12


def ours(args):
  from ldm_scaling import config as cfglib, runtime  # pylint: disable=g-import-not-at-top
  from ldm_scaling.models import unet, vae  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train import objectives, optim, trainer  # pylint: disable=g-import-not-at-top
  from ldm_scaling.train.state import TrainState  # pylint: disable=g-import-not-at-top
  from ldm_scaling import sharding as sh  # pylint: disable=g-import-not-at-top
  runtime.configure_jax()
  config = cfglib.base_config()
  config.model.update(unet.preset(args.width))
  config.objective.inputs = "embeddings"
  config.data.resolution = args.latent * vae.down_factor(config.vae)
  config.train.update(batch_size=args.batch, warmup_steps=0, lr=1e-4)
  objective = objectives.build(config)
  networks, (phase,) = objective.networks(), objective.phases()
  txs = {n: optim.optimizer(optim.settings(config.train, net.optimizer))
         for n, net in networks.items()}
  step_fn = trainer.make_phase_step(phase, None, networks, txs, {}, config)
  spec = objective.batch_spec(args.batch)
  init_key, _ = trainer.run_keys(0)

  def init(key):
    params = sh.unbox(objective.init(key))
    return TrainState(jnp.zeros((), jnp.int32), params, dict(params),
                      {n: txs[n].init(params[n]) for n in params})

  state = jax.jit(init)(init_key)
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) for k, v in spec.items()}
  step = jax.jit(step_fn, donate_argnums=(0,))
  t = time.perf_counter()
  compiled = step.lower(state, batch, {}).compile()
  compile_s = time.perf_counter() - t
  analysis = compiled.cost_analysis()
  step_flops = float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])
  for _ in range(2):
    state, m = compiled(state, batch, {})
  jax.block_until_ready(m)

  def run(n):
    nonlocal state
    t = time.perf_counter()
    for _ in range(n):
      state, m = compiled(state, batch, {})
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / n
  return run, step_flops, objective.train_flops_per_example(phase.name) * args.batch, compile_s


def torch_ref(args):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  w = args.width
  heads = tuple(w * m // 64 for m in (1, 2, 4, 4)) if w % 64 == 0 else (8,) * 4
  model = UNet2DConditionModel(
      block_out_channels=tuple(w * m for m in (1, 2, 4, 4)), layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
      attention_head_dim=heads, use_linear_projection=True, norm_num_groups=32,
      sample_size=args.latent).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  b, s = args.batch, args.latent
  x = torch.randn(b, 4, s, s)
  ctx = torch.randn(b, 77, 1024)
  alphas = torch.linspace(0.999, 0.01, 1000)

  def one():
    t = torch.randint(0, 1000, (b,))
    eps = torch.randn_like(x)
    a = alphas[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps
    loss = torch.nn.functional.mse_loss(model(x_t, t, ctx).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  for _ in range(2):
    one()

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      one()
    return (time.perf_counter() - t) / n
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--latent", type=int, default=32)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()

  peak = matmul_peak_tflops()
  # What each framework's matmuls can reach here, f32 and bf16: where the CPU has AMX, torch's
  # bf16 uses it and XLA:CPU's does not, so mixed precision cannot close the gap on such a host.
  peaks = dict(jax_f32=peak, jax_bf16=matmul_peak_tflops(dtype=jnp.bfloat16),
               torch_f32=torch_matmul_peak_tflops("float32"),
               torch_bf16=torch_matmul_peak_tflops("bfloat16"))
  run_ours, xla_flops, model_flops, compile_s = ours(args)
  run_torch = torch_ref(args)
  t_ours, t_torch = [], []
  for _ in range(args.rounds):  # interleaved, best of rounds: the machine is noisy
    t_ours.append(run_ours(args.steps))
    t_torch.append(run_torch(args.steps))
  ours_s, torch_s = min(t_ours), min(t_torch)
  ex_ours, ex_torch = args.batch / ours_s, args.batch / torch_s
  tflops = model_flops / ours_s / 1e12  # one device
  mfu = tflops / peak
  torch_mfu = model_flops / torch_s / 1e12 / peak  # torch's step, same FLOPs, same peak
  target = 1.5
  print(f"width {args.width}, batch {args.batch}, latent {args.latent}x{args.latent}x4, "
        f"77 tokens x 1024, f32, {jax.device_count()} device(s) ({jax.devices()[0].platform})")
  print(f"compile (ours): {compile_s:.1f} s")
  print(f"ours : {ours_s * 1e3:8.1f} ms/step  {ex_ours:7.2f} examples/s")
  print(f"torch: {torch_s * 1e3:8.1f} ms/step  {ex_torch:7.2f} examples/s")
  print(f"speedup vs torch: {ex_ours / ex_torch:.2f}x")
  print(f"step FLOPs: XLA {xla_flops / 1e9:.1f} G, cost model 3 x forward {model_flops / 1e9:.1f} G")
  print(f"f32 matmul peak {peak:.3f} TFLOP/s; ours {tflops:.3f} TFLOP/s of model FLOPs = "
        f"MFU {mfu:.1%}")
  print(f"torch's step on the same FLOPs and peak: MFU {torch_mfu:.1%}; {target}x torch would "
        f"need MFU {target * torch_mfu:.1%}")
  print("matmul peaks (TFLOP/s, 2048^2): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))
  print(json.dumps(dict(benchmark="train_step", width=args.width, batch=args.batch,
                        latent=args.latent, examples_per_s=round(ex_ours, 3),
                        torch_examples_per_s=round(ex_torch, 3),
                        speedup_vs_torch=round(ex_ours / ex_torch, 3), target=target,
                        mfu=round(mfu, 4), mfu_target=0.4, peak_tflops=round(peak, 4),
                        torch_mfu=round(torch_mfu, 4),
                        mfu_needed_for_target=round(target * torch_mfu, 4),
                        matmul_peaks_tflops={k: round(v, 4) for k, v in peaks.items()})))


if __name__ == "__main__":
  main()
