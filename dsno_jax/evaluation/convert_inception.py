"""Converts pytorch-fid's Inception weight file (.pth) to the Flax .npz of `inception.load_params`.

  python -m dsno_jax.evaluation.convert_inception \
      --src pt_inception-2015-12-05-6726825d.pth --dst inception_fid.npz

Needs no PyTorch: the .pth is read by `torch_weights` (restricted unpickler). The state dict
must be exactly torchvision's `Inception3` with pytorch-fid's FID blocks (every conv/BatchNorm
of the trunk, with their shapes; the 1008-way `fc` head and `num_batches_tracked` counters
are allowed and dropped); anything else is rejected.
"""
import argparse
import hashlib
import sys
from typing import Dict, Optional, Sequence, Tuple

import flax
import numpy as np

from dsno_jax.evaluation import inception, torch_weights

_TORCH_FROM_FLAX_LEAF = {
    ("conv", "kernel"): ("conv", "weight"),
    ("bn", "scale"): ("bn", "weight"),
    ("bn", "bias"): ("bn", "bias"),
    ("bn", "mean"): ("bn", "running_mean"),
    ("bn", "var"): ("bn", "running_var"),
}
# The 2015 TF graph classifies into 1008 classes; torchvision's own Inception has 1000.
_DROPPED_HEAD = {"fc.weight": (1008, inception.FEATURE_DIM), "fc.bias": (1008,)}
_PUBLISHED_SHA256_PREFIX = "6726825d"


def torch_name(flax_path: Tuple[str, ...]) -> str:
  """('Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  return ".".join(flax_path[:-2] + _TORCH_FROM_FLAX_LEAF[flax_path[-2:]])


def flax_params_from_state_dict(state_dict: Dict[str, np.ndarray], source: str = "state dict"):
  """Flax `InceptionV3` parameters from a torchvision-named FID Inception state dict.

  Conv kernels go from torch's (O, I, kH, kW) to Flax's (kH, kW, I, O). Raises ValueError
  naming missing, unexpected or mis-shaped entries.
  """
  expected = inception.param_shapes()
  flax_path_of = {torch_name(p): p for p in expected}
  missing = sorted(flax_path_of.keys() - state_dict.keys())
  unexpected = sorted(
      k for k in state_dict.keys() - flax_path_of.keys()
      if not k.endswith(".num_batches_tracked")
      and not (k in _DROPPED_HEAD and tuple(state_dict[k].shape) == _DROPPED_HEAD[k]))
  if missing or unexpected:
    raise ValueError(
        f"{source} is not pytorch-fid's FID Inception-v3 state dict: {len(missing)} expected "
        f"entries missing (e.g. {missing[:4]}), {len(unexpected)} unexpected entries (e.g. "
        f"{unexpected[:4]}). Expected the torchvision Inception3 names of "
        f"{inception.WEIGHTS_SOURCE_FILE}.")
  flat = {}
  for name, path in flax_path_of.items():
    value = np.asarray(state_dict[name], np.float32)
    shape = expected[path]
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
    if value.shape != torch_shape:
      raise ValueError(f"{source}: {name} has shape {value.shape}; the FID Inception-v3 has "
                       f"{torch_shape}")
    flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  return flax.traverse_util.unflatten_dict(flat)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def convert(src: str, dst: str) -> Dict:
  """Reads `src` (.pth), checks it is the FID Inception, writes `dst` (.npz); returns params."""
  params = flax_params_from_state_dict(torch_weights.load_state_dict(src), source=src)
  inception.save_params(dst, params)
  return params


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True,
                      help=f"pytorch-fid's {inception.WEIGHTS_SOURCE_FILE} ({inception.WEIGHTS_URL})")
  parser.add_argument("--dst", default=inception.default_weights_path(),
                      help="output .npz (default: %(default)s)")
  args = parser.parse_args(argv)
  try:
    params = convert(args.src, args.dst)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = sum(np.size(v) for v in flax.traverse_util.flatten_dict(params).values())
  print(f"wrote {args.dst}: {count:,} parameters of the FID Inception-v3")
  if not sha256_of(args.src).startswith(_PUBLISHED_SHA256_PREFIX):
    print(f"note: {args.src} is not the published file (its SHA-256 does not start with "
          f"{_PUBLISHED_SHA256_PREFIX}); FID values are only comparable with the published "
          "weights.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
