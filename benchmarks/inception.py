"""FID feature extraction speed: Inception-v3 pool3 images/s (random weights), and FID's own cost.

  python benchmarks/inception.py [--out benchmarks/results/] [--batch_sizes 1 4] [--repeats 3]

Times `inception.inception_features` (uint8 32x32 input, bilinear resize to 299 included)
on whatever backend JAX picks, per batch size: compile time and steady-state images/s.
Also times the FID metric's parts at D = 2048: one jitted `from_model_output` of a batch
of features and the float64 Fréchet distance (one 2048x2048 eigenvalue solve), and
extrapolates the feature extraction time of 50k images. Prints a table; writes inception.json.
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from dsno_jax.evaluation import FID, fid, inception


def _timed(fn, repeats):
  """(first call seconds, mean seconds of `repeats` further calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return first, (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/results/")
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  params = inception.init_params(seed=0)
  rng = np.random.default_rng(0)
  rows = []
  for batch_size in args.batch_sizes:
    images = rng.integers(0, 256, size=(batch_size, 32, 32, 3), dtype=np.uint8)
    first, steady = _timed(lambda: inception.inception_features(params, images), args.repeats)
    rows.append({"batch_size": batch_size, "compile_and_first_s": first, "step_s": steady,
                 "images_per_s": batch_size / steady})

  features = rng.normal(size=(256, inception.FEATURE_DIM)).astype(np.float32)
  update = jax.jit(lambda f: FID.from_model_output(features=f))
  _, update_s = _timed(lambda: update(features), args.repeats)
  stats = FID.from_model_output(features=rng.normal(size=(2100, inception.FEATURE_DIM)))
  mu, sigma = stats.statistics()
  start = time.perf_counter()
  fid.frechet_distance(mu, sigma, mu + 0.1, sigma)
  frechet_s = time.perf_counter() - start

  best = max(rows, key=lambda r: r["images_per_s"])
  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "input": "uint8 32x32x3, resized to 299", "weights": "random",
      "inception": rows,
      "fid_update_256x2048_s": update_s,
      "frechet_distance_2048_s": frechet_s,
      "extrapolated_50k_images_s": 50000 / best["images_per_s"],
  }
  print(f"Inception-v3 (FID) pool3 on {result['device']} ({result['backend']})")
  print(f"{'batch':>6} {'compile+first s':>16} {'step s':>9} {'images/s':>9}")
  for r in rows:
    print(f"{r['batch_size']:>6} {r['compile_and_first_s']:>16.2f} {r['step_s']:>9.3f} "
          f"{r['images_per_s']:>9.2f}")
  print(f"FID update, 256 x 2048 features (jit): {update_s * 1e3:.1f} ms")
  print(f"Frechet distance at D = 2048 (float64): {frechet_s:.2f} s")
  print(f"50k images at the best rate: {result['extrapolated_50k_images_s'] / 60:.0f} min")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "inception.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
