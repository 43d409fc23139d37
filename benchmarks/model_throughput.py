"""Compile time, one-step forward and train-step time, and peak memory of DSNO on the bench config.

python benchmarks/model_throughput.py [--dtype float32|bfloat16] [--repeats 5] [--out DIR]
"""
import argparse
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import bench
from dsno_jax import diffusion, models


def timed(fn, *args, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(dtype: str, repeats: int):
  config = bench.get_config()
  config.model.dtype = dtype
  model = models.student_from_config(config)
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  k = len(config.trajectory.save_times)
  params = models.init_student(config, jax.random.PRNGKey(0))
  noise = jax.random.normal(jax.random.PRNGKey(1), (b, s, s, c))
  targets = jax.random.normal(jax.random.PRNGKey(2), (b, k, s, s, c))
  logsnr = jnp.asarray(diffusion.save_logsnrs(config))
  opt = optax.adam(2e-4)
  opt_state = opt.init(params)

  forward = jax.jit(lambda p, z: model.apply({"params": p}, z, logsnr, train=False))

  def step(p, o, z, t):
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean((model.apply({"params": p}, z, logsnr, train=False) - t) ** 2))(p)
    updates, o = opt.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  train_step = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled_fwd = forward.lower(params, noise).compile()
  compile_fwd = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled_step = train_step.lower(params, opt_state, noise, targets).compile()
  compile_step = time.perf_counter() - t0
  jax.block_until_ready(compiled_fwd(params, noise))
  fwd = timed(compiled_fwd, params, noise, repeats=repeats)
  step_times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled_step(params, opt_state, noise, targets)
    jax.block_until_ready(loss)
    step_times.append(time.perf_counter() - t0)
  flops = compiled_step.cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
  return {
      "dtype": dtype,
      "compile_forward_s": compile_fwd,
      "compile_train_step_s": compile_step,
      "forward_s": fwd,
      "train_step_s": statistics.median(step_times[1:]),
      "train_step_gflop": flops / 1e9,
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "params": models.count_params(params),
      "backend": jax.default_backend(),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  result = run(args.dtype, args.repeats)
  print("| dtype | compile fwd (s) | compile step (s) | forward (s) | train step (s) | step GFLOP | peak RSS (GiB) |")
  print("|---|---|---|---|---|---|---|")
  r = result
  print(f"| {r['dtype']} | {r['compile_forward_s']:.1f} | {r['compile_train_step_s']:.1f} | "
        f"{r['forward_s']:.3f} | {r['train_step_s']:.3f} | {r['train_step_gflop']:.1f} | "
        f"{r['peak_rss_gib']:.2f} |")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"model_throughput_{args.dtype}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
