"""DSNO train-step throughput and memory of a config (default: bench), per dtype and device count.

Each (dtype, device count) runs in its own subprocess with that many virtual CPU devices (or
the real accelerators when they exist), times `--steps` steps after a warm-up step, and
saves its parameters; the table reports examples/s, compile time, the compiled step's
per-device memory (XLA's memory analysis), the process's peak RSS, and the largest
parameter difference from the 1-device run of the same dtype (devices must agree).

  python benchmarks/train_step.py [--config bench] [--batch 0] [--devices 1,2,4,8]
      [--dtypes float32,bfloat16] [--steps 2] [--out benchmarks/results/train_step.json]

The configs/cifar10.py architecture at batch 1 on one CPU device (issue 7):
  python benchmarks/train_step.py --config cifar10 --batch 1 --devices 1 --dtypes float32
A perceptual loss (cifar10 trains with "vgg") runs on random VGG16 weights of the real shapes.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
  """Runs in the subprocess: compile, warm up, time, save the parameters."""
  import importlib
  import jax
  import numpy as np
  from dsno_jax import diffusion  # importing dsno_jax adds the XLA:CPU flag, as main runs
  from dsno_jax import parallel
  from dsno_jax.training import objectives, perceptual
  from dsno_jax.training import step as step_lib

  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.model.dtype = args.dtype
  config.train.init_from_teacher = False
  if args.batch:
    config.train.batch_size = args.batch
  if config.train.loss in perceptual.KINDS:
    config.train.perceptual_weights = perceptual.write_random_weights(
        args.params_out + ".perceptual.npz", config.train.loss)
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  k = len(config.trajectory.save_times)
  objective = objectives.student_objective(config, diffusion.save_logsnrs(config))
  mesh = parallel.make_mesh()
  run = step_lib.jit_run(config, objective, mesh)
  state = run.init_state(objective.fresh_params(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      "noise": rng.standard_normal((b, s, s, c)).astype(np.float32),
      "targets": rng.uniform(-1, 1, (b, k, s, s, c)).astype(np.float32),
      "label": np.zeros((b,), np.int32)}, mesh)
  start = time.perf_counter()
  step = run.train_step.lower(state, batch, None).compile()
  compile_s = time.perf_counter() - start
  memory = step.memory_analysis()
  state, metrics = step(state, batch, None)  # warm-up
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch, None)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / args.steps
  params = jax.tree_util.tree_leaves(jax.device_get(state.params))
  np.savez(args.params_out, *params)
  device_stats = jax.devices()[0].memory_stats() or {}
  result = {
      "dtype": args.dtype, "devices": jax.device_count(), "platform": jax.devices()[0].platform,
      "batch": b, "step_s": seconds, "examples_per_s": b / seconds, "compile_s": compile_s,
      "loss": float(metrics["loss"]),
      "step_memory_mib": None if memory is None else (
          memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2 ** 20,
      "device_peak_mib": device_stats.get("peak_bytes_in_use", 0) / 2 ** 20 or None,
      "host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }
  print("RESULT " + json.dumps(result), flush=True)


def run_one(args, dtype: str, devices: int, params_out: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--dtype", dtype,
                        "--steps", str(args.steps), "--params_out", params_out,
                        "--config", args.config, "--batch", str(args.batch)],
                       env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=args.timeout_s)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    raise RuntimeError(f"{dtype} on {devices} devices failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def max_difference(a_path: str, b_path: str) -> float:
  import numpy as np
  a, b = np.load(a_path), np.load(b_path)
  return max(float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max())
             for k in a.files)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--params_out", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--config", default="bench", help="a module of configs/")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
  parser.add_argument("--timeout_s", type=int, default=900, help="per configuration")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "train_step.json"))
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in args.dtypes.split(","):
      reference = None
      for devices in [int(d) for d in args.devices.split(",")]:
        params = os.path.join(tmp, f"{dtype}_{devices}.npz")
        result = run_one(args, dtype, devices, params)
        reference = reference or params
        result["max_param_diff_vs_first"] = max_difference(reference, params)
        results.append(result)
        print(f"{dtype:9s} {devices} devices: {result['examples_per_s']:.2f} examples/s",
              flush=True)

  header = ("dtype", "devices", "examples/s", "step s", "compile s", "step MiB/device",
            "host peak RSS MiB", "max |dparam| vs first")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in results:
    memory = "-" if r["step_memory_mib"] is None else f"{r['step_memory_mib']:.0f}"
    print(f"| {r['dtype']} | {r['devices']} | {r['examples_per_s']:.2f} | {r['step_s']:.2f} | "
          f"{r['compile_s']:.1f} | {memory} | {r['host_peak_rss_mib']:.0f} | "
          f"{r['max_param_diff_vs_first']:.2e} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"config": f"configs/{args.config}.py", "batch": args.batch or "config",
               "results": results}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
