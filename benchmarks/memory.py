"""Per-device memory of the DSNO train step for the paper configs, with and without remat.

For each config the real train step (dsno_jax.training.step.jit_run: sharded state, donated,
FSDP as the config says) is lowered on abstract inputs and compiled for `--devices` virtual
CPU devices; nothing is allocated. Reported per device:
  - state: parameters, EMA and Adam moments, from jax.eval_shape and each array's shard shape;
  - XLA's memory analysis of the compiled step: arguments, outputs, temporaries (activations
    kept for the backward pass and workspace), and the peak estimate args + temps + outputs -
    aliased (donated) bytes.
The model is compiled as the package builds it for accelerators (model.time_conv_impl="fft",
not the CPU's DFT matmuls). XLA:CPU schedules differently from TPU/GPU
compilers, so the temporaries are an estimate of what an accelerator needs, not its exact
figure; the state bytes are exact.

  python benchmarks/memory.py [--configs cifar10,imagenet64] [--devices 8] [--remat both]
      [--out benchmarks/results]
The paper-scale runs: `--configs cifar10 --devices 8` (batch 256: 32 per device) and
`--configs imagenet64 --devices 64` (batch 2048: 32 per device, e.g. a v4-128 slice).
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
import time


def parse():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="cifar10,imagenet64")
  parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (one mesh)")
  parser.add_argument("--remat", default="both", choices=["off", "on", "both"])
  parser.add_argument("--batch", type=int, default=0,
                      help="global batch (default: the config's train.batch_size)")
  parser.add_argument("--out", default="benchmarks/results")
  return parser.parse_args()


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and "jax" not in sys.modules:  # the device count is fixed at jax import
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsno_jax import diffusion, models  # noqa: E402
from dsno_jax import parallel  # noqa: E402
from dsno_jax.training import objectives, perceptual, step  # noqa: E402  # noqa: E402

GIB = 2.0 ** 30


def per_device_bytes(abstract, shardings) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
  total = 0
  for a, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
  return total


def measure(name: str, remat: bool, batch: int, scratch: str) -> dict:
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.remat = remat
  config.model.time_conv_impl = "fft"  # as built on TPU/GPU (dsno_jax/backend.py)
  config.train.init_from_teacher = False
  if batch:
    config.train.batch_size = batch
  if config.train.loss in ("vgg", "lpips"):
    config.train.perceptual_weights = perceptual.write_random_weights(
        os.path.join(scratch, f"{config.train.loss}.npz"), config.train.loss)
  mesh = parallel.make_mesh()
  objective = objectives.student_objective(config, diffusion.save_logsnrs(config))
  run = step.jit_run(config, objective, mesh)
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  k = len(config.trajectory.save_times)
  spec = parallel.batch_sharding(mesh)
  batch_shapes = {
      "noise": jax.ShapeDtypeStruct((b, s, s, c), np.float32, sharding=spec),
      "targets": jax.ShapeDtypeStruct((b, k, s, s, c), np.float32, sharding=spec),
      "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=spec)}
  state_shapes = jax.tree_util.tree_map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      run.abstract_state, run.state_shardings)
  start = time.perf_counter()
  compiled = run.train_step.lower(state_shapes, batch_shapes, None).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  st, sh = run.abstract_state, run.state_shardings
  result = {
      "config": name, "remat": remat, "devices": mesh.devices.size, "global_batch": b,
      "batch_per_device": b // mesh.devices.size, "K": k, "fsdp": bool(config.train.fsdp),
      "params": models.count_params(st.params),
      "params_gib": per_device_bytes(st.params, sh.params) / GIB,
      "ema_gib": per_device_bytes(st.ema_params, sh.ema_params) / GIB,
      "opt_state_gib": per_device_bytes(st.opt_state, sh.opt_state) / GIB,
      "compile_s": compile_s,
  }
  if memory is not None:
    args, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
    temp, alias = memory.temp_size_in_bytes, memory.alias_size_in_bytes
    result.update(arguments_gib=args / GIB, outputs_gib=out / GIB, temps_gib=temp / GIB,
                  aliased_gib=alias / GIB, peak_gib=(args + temp + out - alias) / GIB)
  return result


def main():
  args = ARGS
  os.makedirs(args.out, exist_ok=True)
  remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    for name in args.configs.split(","):
      for remat in remats:
        r = measure(name, remat, args.batch, scratch)
        results.append(r)
        print(f"{name} remat={remat}: peak {r.get('peak_gib', float('nan')):.2f} GiB/device "
              f"(compiled in {r['compile_s']:.0f} s)", flush=True)
  print(f"\nPer-device memory of the DSNO train step, {args.devices} devices "
        f"({jax.default_backend()} compiler's memory analysis)\n")
  print("| config | remat | batch/device | FSDP | params | params+EMA+Adam GiB | "
        "activations+workspace GiB | peak GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    state = r["params_gib"] + r["ema_gib"] + r["opt_state_gib"]
    print(f"| {r['config']} | {'on' if r['remat'] else 'off'} | {r['batch_per_device']} | "
          f"{'yes' if r['fsdp'] else 'no'} | {r['params'] / 1e6:.1f}M | {state:.2f} | "
          f"{r.get('temps_gib', float('nan')):.2f} | {r.get('peak_gib', float('nan')):.2f} | "
          f"{r['compile_s']:.0f} |")
  path = os.path.join(args.out, f"memory_{args.configs.replace(',', '_')}_{args.devices}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
