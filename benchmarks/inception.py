"""FID feature extraction speed: our Inception-v3 beside pytorch-fid's on the same machine, and
FID's own cost.

  python benchmarks/inception.py [--out benchmarks/results/] [--batch_sizes 1 8 32] [--repeats 2]

Both networks get the same random weights (pytorch-fid's FID Inception built without its
weight download, converted with our converter) and the same uint8 32x32x3 images, resized to
299 inside each (pytorch-fid: `InceptionV3([3])`, resize_input and normalize_input on, as its
fid_score feeds it), with BatchNorm statistics that keep activations at unit scale as the real
weights do. Per batch size: first call (compilation for ours) and the best steady-state
images/s of each, in one run, alternating the two calls so that the ratio is fair on a shared
machine; and the largest relative difference of their features. Also times the FID metric's
parts at D = 2048: one `from_model_output` of a batch of features and the float64 Fréchet
distance (one 2048x2048 eigenvalue solve). Prints a table; writes inception.json.
"""
import argparse
import json
import os
import sys
import time
import unittest.mock

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # torch_reference
from dsno_jax.evaluation import FID, fid, inception  # noqa: E402


def _timed_pair(fns, repeats):
  """[(first call seconds, best of `repeats` further calls in seconds)] of each function, the
  calls alternating between the functions so that both see the same load."""
  first, best = [], [float("inf")] * len(fns)
  for fn in fns:
    start = time.perf_counter()
    fn()
    first.append(time.perf_counter() - start)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  return list(zip(first, best))


def pytorch_fid_model(seed: int = 0):
  """pytorch-fid's `InceptionV3([3])` (FID blocks, resize and normalisation on) with random
  weights, and its network's state dict as numpy (the input of our converter)."""
  import torch
  from pytorch_fid import inception as pfi
  from torch_reference import fid_inception_v3_random  # benchmarks/ is on sys.path
  torch.manual_seed(seed)
  net = fid_inception_v3_random(pfi)
  with unittest.mock.patch.object(pfi, "fid_inception_v3", lambda: net):
    model = pfi.InceptionV3([3])
  # BatchNorm statistics from a batch of random images, so that every layer sees unit-scale
  # activations as with the real weights (default statistics shrink them into denormals, which
  # x86 runs far slower unless flushed to zero, as XLA does and PyTorch does not).
  generator = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = None
      module.weight.data.uniform_(0.5, 1.5, generator=generator)
      module.bias.data.normal_(0.5, 0.2, generator=generator)
  with torch.no_grad():
    model.train()
    model(torch.rand((8, 3, 32, 32), generator=generator))
  model.eval()
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  return model, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/results/")
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                      help="PyTorch's intra-op threads (XLA:CPU uses every core)")
  args = parser.parse_args()

  import torch
  torch.set_num_threads(args.torch_threads)
  model, state = pytorch_fid_model()
  params = inception.flax_params_from_state_dict(state, source="random pytorch-fid weights")
  rng = np.random.default_rng(0)
  rows = []
  for batch_size in args.batch_sizes:
    images = rng.integers(0, 256, size=(batch_size, 32, 32, 3), dtype=np.uint8)
    x01 = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 255.0

    def ours():
      return np.asarray(inception.inception_features(params, images))

    def theirs():
      with torch.no_grad():
        return model(x01)[0][:, :, 0, 0].numpy()

    (ours_first, ours_s), (theirs_first, theirs_s) = _timed_pair((ours, theirs), args.repeats)
    a, b = ours(), theirs()
    rows.append({"batch_size": batch_size,
                 "ours_first_s": ours_first, "ours_step_s": ours_s,
                 "ours_images_per_s": batch_size / ours_s,
                 "pytorch_fid_first_s": theirs_first, "pytorch_fid_step_s": theirs_s,
                 "pytorch_fid_images_per_s": batch_size / theirs_s,
                 "speed_ratio_ours_over_pytorch_fid": theirs_s / ours_s,
                 "max_rel_diff": float(np.max(np.abs(a - b)) / np.max(np.abs(b)))})

  features = rng.normal(size=(256, inception.FEATURE_DIM)).astype(np.float32)
  update = jax.jit(lambda f: FID.from_model_output(features=f))
  ((_, update_s),) = _timed_pair([lambda: jax.block_until_ready(update(features))],
                                 args.repeats)
  stats = FID.from_model_output(features=rng.normal(size=(2100, inception.FEATURE_DIM)))
  mu, sigma = stats.statistics()
  start = time.perf_counter()
  fid.frechet_distance(mu, sigma, mu + 0.1, sigma)
  frechet_s = time.perf_counter() - start

  best = max(r["ours_images_per_s"] for r in rows)
  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
      "input": "uint8 32x32x3, resized to 299 inside each network", "weights": "random",
      "inception": rows, "fid_update_256x2048_s": update_s,
      "frechet_distance_2048_s": frechet_s, "extrapolated_50k_images_s": 50000 / best,
  }
  print(f"Inception-v3 (FID) pool3 on {result['device']} ({result['backend']}); "
        f"torch {result['torch']} with {result['torch_threads']} threads")
  print("| batch | ours images/s | pytorch-fid images/s | ours / pytorch-fid | ours first call s "
        "| max rel. diff |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch_size']} | {r['ours_images_per_s']:.2f} | "
          f"{r['pytorch_fid_images_per_s']:.2f} | {r['speed_ratio_ours_over_pytorch_fid']:.2f} | "
          f"{r['ours_first_s']:.1f} | {r['max_rel_diff']:.1e} |")
  print(f"FID update, 256 x 2048 features (jit): {update_s * 1e3:.1f} ms")
  print(f"Frechet distance at D = 2048 (float64): {frechet_s:.2f} s")
  print(f"50k images at our best rate: {result['extrapolated_50k_images_s'] / 60:.0f} min")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "inception.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
