"""Trajectories/s and MB/s one host's input pipeline delivers, for CIFAR-10- and ImageNet-64-shaped
trajectories (synthetic values, the real format 2 files), with 0, 1 and 2 worker processes, from
local files and from gs:// through a Cloud Storage emulator on 127.0.0.1, and the most bytes
its cache held against the data set's.

  python benchmarks/input_pipeline.py [--examples 4096] [--shard_size 256] [--cache_shards 4]
      [--batch 256] [--batches 24] [--workers 0,1,2] [--sources local,gs]
      [--out benchmarks/results/input_pipeline.json]

Writes one dataset per shape (float16 targets, seeded noise, as `--mode=generate` writes them)
under a temporary directory and into the emulator's bucket, then times
`trajectories.batch_iterator` after a warm-up batch, with data.cache_gb = cache_shards shards'
bytes (so the reads go through several groups). The rates one 8-GPU host needs are in
benchmarks/README.md.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from dsno_jax import storage  # noqa: E402
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
  return sum(storage.getsize(trajectories.shard_path(directory, s, total)) for s in range(total))


def cache_bytes(directory: str) -> int:
  total = 0
  for root, _, names in os.walk(directory):
    for name in names:
      with contextlib.suppress(FileNotFoundError):  # deleted while listed
        total += os.path.getsize(os.path.join(root, name))
  return total


def rate(directory: str, batch: int, batches: int, workers: int, cache_gb: float):
  """(trajectories/s over `batches` batches after one warm-up batch, most bytes cached)."""
  largest, done = [0], threading.Event()
  cache = storage.cache_path(directory)

  def watch():
    while not done.wait(0.002):
      largest[0] = max(largest[0], cache_bytes(cache))

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  iterator = trajectories.batch_iterator(directory, global_batch_size=batch, seed=0,
                                         process_index=0, process_count=1, num_workers=workers,
                                         cache_gb=cache_gb)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    out = next(iterator)
  elapsed = time.perf_counter() - start
  iterator.close()
  done.set()
  watcher.join()
  assert out["targets"].dtype == np.float32
  return batches * batch / elapsed, largest[0] if storage.is_remote(directory) else 0


@contextlib.contextmanager
def emulator(log_path: str):
  """A Cloud Storage emulator on 127.0.0.1 (the tests'), in use meanwhile: its bucket's URL."""
  from gcs_helpers import BUCKET, running_emulator
  with running_emulator(log_path) as url:
    os.environ[storage.EMULATOR_ENV] = url
    storage.configure_emulator()
    yield f"gs://{BUCKET}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=4096)
  parser.add_argument("--shard_size", type=int, default=256)
  parser.add_argument("--cache_shards", type=float, default=4,
                      help="data.cache_gb as this many shards' bytes")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--sources", default="local,gs")
  parser.add_argument("--out", default="benchmarks/results/input_pipeline.json")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
    os.environ[storage.CACHE_ENV] = os.path.join(tmp, "cache")
    sources = args.sources.split(",")
    bucket = stack.enter_context(emulator(os.path.join(tmp, "emulator.log"))) if (
        "gs" in sources) else None
    print("| shape | source | workers | bytes/trajectory | trajectories/s | MB/s | most cached "
          "MB | data set MB |", flush=True)
    for name, shape in SHAPES.items():
      for source in sources:
        directory = os.path.join(tmp, name) if source == "local" else f"{bucket}/{name}"
        size = write_dataset(directory, shape, args.examples, args.shard_size)
        per_example = size / args.examples
        cache_gb = args.cache_shards * size / trajectories.num_shards(
            args.examples, args.shard_size) / 1e9
        for workers in (int(w) for w in args.workers.split(",")):
          examples_per_s, cached = rate(directory, args.batch, args.batches, workers, cache_gb)
          rows.append({"shape": name, "source": source, "workers": workers,
                       "bytes_per_trajectory": per_example, "trajectories_per_s": examples_per_s,
                       "mb_per_s": examples_per_s * per_example / 1e6, "cache_gb": cache_gb,
                       "most_cached_bytes": cached, "dataset_bytes": size})
          print(f"| {name} | {source} | {workers} | {per_example:,.0f} | {examples_per_s:,.0f} | "
                f"{rows[-1]['mb_per_s']:.1f} | {cached / 1e6:.1f} | {size / 1e6:.1f} |",
                flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"batch": args.batch, "batches": args.batches, "shard_size": args.shard_size,
               "cache_shards": args.cache_shards, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
