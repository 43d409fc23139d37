"""Trajectories/s and MB/s one host's input pipeline delivers, for CIFAR-10- and ImageNet-64-shaped
trajectories (synthetic values, the real format 2 files), with 0, 1 and 2 worker processes.

  python benchmarks/input_pipeline.py [--examples 4096] [--batch 256] [--batches 24]
      [--workers 0,1,2] [--out benchmarks/results/input_pipeline.json]

Writes one dataset per shape under a temporary directory (float16 targets, seeded noise, as
`--mode=generate` writes them), then times `trajectories.batch_iterator` after a warm-up batch.
The rates one 8-GPU host needs are in benchmarks/README.md.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsno_jax.data import trajectories  # noqa: E402

SHAPES = {"cifar10": (32, 32, 3), "imagenet64": (64, 64, 3)}
NUM_TIMES = 4


def write_dataset(directory: str, image_shape, num_examples: int, shard_size: int) -> int:
  """A format-2 dataset of smooth random targets; returns its bytes on disk."""
  plan = {"format": trajectories.FORMAT, "noise": "seeded", "seed": 0, "num_classes": 10,
          "num_examples": num_examples, "shard_size": shard_size,
          "image_shape": list(image_shape), "num_times": NUM_TIMES, "targets_dtype": "float16",
          "save_times": [0.5625, 0.25, 0.0625, 0.0], "teacher": "synthetic"}
  trajectories.prepare(directory, plan)
  rng = np.random.default_rng(0)
  for shard in range(trajectories.num_shards(num_examples, shard_size)):
    indices = trajectories.shard_range(shard, num_examples, shard_size)
    n = len(indices)
    noise = rng.standard_normal((n,) + tuple(image_shape)).astype(np.float32)
    targets = np.tanh(np.linspace(0.3, 1.0, NUM_TIMES)[None, :, None, None, None] * noise[:, None])
    trajectories.write_shard(directory, plan, shard, {
        "noise": noise, "targets": targets, "label": rng.integers(0, 10, n),
        "index": np.asarray(indices)})
  trajectories.finalize(directory, plan)
  total = trajectories.num_shards(num_examples, shard_size)
  return sum(os.path.getsize(trajectories.shard_path(directory, s, total)) for s in range(total))


def rate(directory: str, batch: int, batches: int, workers: int) -> float:
  """Trajectories/s over `batches` batches after one warm-up batch."""
  iterator = trajectories.batch_iterator(directory, global_batch_size=batch, seed=0,
                                         process_index=0, process_count=1, num_workers=workers)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    out = next(iterator)
  elapsed = time.perf_counter() - start
  assert out["targets"].dtype == np.float32
  return batches * batch / elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--out", default="benchmarks/results/input_pipeline.json")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, shape in SHAPES.items():
      directory = os.path.join(tmp, name)
      size = write_dataset(directory, shape, args.examples, shard_size=1024)
      per_example = size / args.examples
      for workers in (int(w) for w in args.workers.split(",")):
        examples_per_s = rate(directory, args.batch, args.batches, workers)
        rows.append({"shape": name, "workers": workers, "bytes_per_trajectory": per_example,
                     "trajectories_per_s": examples_per_s,
                     "mb_per_s": examples_per_s * per_example / 1e6})
        print(f"| {name} | {workers} | {per_example:,.0f} | {examples_per_s:,.0f} | "
              f"{rows[-1]['mb_per_s']:.1f} |", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"batch": args.batch, "batches": args.batches, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
