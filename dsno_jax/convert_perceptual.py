"""Converts VGG16 / LPIPS PyTorch weights (.pth) to the .npz of `training.perceptual.load_weights`.

  python -m dsno_jax.convert_perceptual --kind vgg16 --src vgg16-397923af.pth --dst vgg16.npz
  python -m dsno_jax.convert_perceptual --kind lpips --src vgg.pth --vgg16 vgg16-397923af.pth \
      --dst lpips_vgg.npz

Needs no PyTorch: a .pth is read by `evaluation.torch_weights` (restricted unpickler). Accepted:
- `--kind vgg16`: torchvision's `vgg16()` state dict (`features.N.weight/bias` of the 13 convs;
  the `classifier.*` layers, if there, are checked and dropped);
- `--kind lpips`: LPIPS's heads file (`lin0..lin4.model.1.weight`, as shipped in the `lpips`
  package at lpips/weights/v0.1/vgg.pth) together with `--vgg16` (torchvision's .pth or an .npz
  written by `--kind vgg16`), or a whole `lpips.LPIPS(net='vgg')` state dict (trunk
  `net.sliceK.N.*`, heads, and the ScalingLayer buffers) on its own.
Anything else, e.g. another network's weights, is rejected with the entries that do not fit.
"""
import argparse
import sys
from typing import Dict, Optional, Sequence, Tuple

import flax
import numpy as np

from dsno_jax.evaluation import convert_inception, inception, torch_weights
from dsno_jax.models import vgg
from dsno_jax.training import perceptual

_PUBLISHED_VGG16_SHA256_PREFIX = "397923af"
# torchvision's vgg16 classifier (dropped): Linear(512*7*7, 4096), Linear(4096, 4096),
# Linear(4096, 1000).
_VGG16_CLASSIFIER = {
    "classifier.0.weight": (4096, 512 * 7 * 7), "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}
_SCALING_BUFFERS = {"scaling_layer.shift": perceptual.LPIPS_SHIFT,
                    "scaling_layer.scale": perceptual.LPIPS_SCALE}


def _torch_conv_names(prefix_of_block) -> Dict[str, Tuple[str, ...]]:
  """{torch name: flax path} of the trunk; prefix_of_block(b) is the torch module prefix of
  block b (0-based) -- LPIPS's slices keep torchvision's feature indices."""
  names = {}
  for conv, index in vgg.torch_feature_indices().items():
    block = int(conv[len("conv")]) - 1
    names[f"{prefix_of_block(block)}{index}.weight"] = (conv, "kernel")
    names[f"{prefix_of_block(block)}{index}.bias"] = (conv, "bias")
  return names


TORCHVISION_NAMES = _torch_conv_names(lambda block: "features.")
LPIPS_TRUNK_NAMES = _torch_conv_names(lambda block: f"net.slice{block + 1}.")
LPIPS_HEAD_NAMES = {f"{head}.model.1.weight": head for head in perceptual.HEAD_NAMES}
# LPIPS also registers its heads in a ModuleList, so a whole state dict names each twice.
LPIPS_HEAD_ALIASES = {f"lins.{i}.model.1.weight": name
                      for i, name in enumerate(LPIPS_HEAD_NAMES)}


def _reject(source: str, what: str, missing, unexpected) -> None:
  raise ValueError(
      f"{source} is not {what}: {len(missing)} expected entries missing (e.g. "
      f"{sorted(missing)[:4]}), {len(unexpected)} unexpected entries (e.g. "
      f"{sorted(unexpected)[:4]}).")


def _trunk(state_dict, names: Dict[str, Tuple[str, ...]], source: str):
  """Flax `VGG16Features` params from the entries `names` of a state dict; kernels go from
  torch's (O, I, kH, kW) to Flax's (kH, kW, I, O)."""
  shapes = vgg.param_shapes()
  flat = {}
  for name, path in names.items():
    value = np.asarray(state_dict[name], np.float32)
    shape = shapes[path]
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
    if value.shape != torch_shape:
      raise ValueError(f"{source}: {name} has shape {value.shape}; VGG16 has {torch_shape}")
    flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  return flax.traverse_util.unflatten_dict(flat)


def _heads(state_dict, source: str):
  heads = {}
  for name, head in LPIPS_HEAD_NAMES.items():
    value = np.asarray(state_dict[name], np.float32)
    channels = perceptual.head_shapes()[("lpips", head)][0]
    if value.shape != (1, channels, 1, 1):
      raise ValueError(f"{source}: {name} has shape {value.shape}; LPIPS(net='vgg') has "
                       f"{(1, channels, 1, 1)}")
    heads[head] = value.reshape(channels)
  return heads


def vgg16_from_state_dict(state_dict: Dict[str, np.ndarray], source: str = "state dict"):
  """{"vgg": trunk params} from torchvision's vgg16 state dict; ValueError for anything else."""
  classifier = {k for k in state_dict.keys() & _VGG16_CLASSIFIER.keys()
                if tuple(np.shape(state_dict[k])) == _VGG16_CLASSIFIER[k]}
  missing = TORCHVISION_NAMES.keys() - state_dict.keys()
  unexpected = state_dict.keys() - TORCHVISION_NAMES.keys() - classifier
  if missing or unexpected:
    _reject(source, "torchvision's VGG16 state dict (vgg16-397923af.pth)", missing, unexpected)
  return {"vgg": _trunk(state_dict, TORCHVISION_NAMES, source)}


def lpips_from_state_dict(state_dict: Dict[str, np.ndarray], trunk=None,
                          source: str = "state dict"):
  """{"vgg": trunk, "lpips": heads} from LPIPS's heads file plus `trunk` ({"vgg": params}), or
  from a whole `lpips.LPIPS(net='vgg')` state dict (trunk=None); ValueError otherwise."""
  whole = any(k.startswith("net.") for k in state_dict)
  expected = set(LPIPS_HEAD_NAMES)
  if whole:
    expected |= LPIPS_TRUNK_NAMES.keys() | _SCALING_BUFFERS.keys()
  missing = expected - state_dict.keys()
  unexpected = state_dict.keys() - expected - LPIPS_HEAD_ALIASES.keys()
  if missing or unexpected:
    _reject(source, "LPIPS(net='vgg') weights (its heads file lpips/weights/v0.1/vgg.pth, or a "
            "whole LPIPS(net='vgg') state dict)", missing, unexpected)
  for alias, name in LPIPS_HEAD_ALIASES.items():
    if alias in state_dict and not np.array_equal(state_dict[alias], state_dict[name]):
      raise ValueError(f"{source}: {alias} differs from {name}; LPIPS holds one set of heads")
  for name, value in _SCALING_BUFFERS.items():
    if whole and not np.array_equal(np.asarray(state_dict[name]).reshape(-1), value):
      raise ValueError(f"{source}: {name} is {np.asarray(state_dict[name]).reshape(-1)}; LPIPS "
                       f"v0.1 has {value}")
  if whole and trunk is not None:
    raise ValueError(f"{source} already holds the VGG16 trunk; give --vgg16 only with the "
                     "heads-only file")
  if not whole and trunk is None:
    raise ValueError(f"{source} holds only the LPIPS heads; the VGG16 trunk must come from "
                     f"torchvision's {perceptual.VGG16_SOURCE_FILE} ({perceptual.VGG16_URL}): "
                     "pass it with --vgg16")
  trunk = {"vgg": _trunk(state_dict, LPIPS_TRUNK_NAMES, source)} if whole else trunk
  weights = {"vgg": trunk["vgg"], "lpips": _heads(state_dict, source)}
  perceptual.check_weights(flax.traverse_util.flatten_dict(weights), source)
  return weights


def read_vgg16(path: str):
  """{"vgg": trunk} from torchvision's .pth or from an .npz written by --kind vgg16 (or lpips)."""
  if path.endswith(".npz"):
    return {"vgg": perceptual.load_weights(path, "vgg")["vgg"]}
  return vgg16_from_state_dict(torch_weights.load_state_dict(path), source=path)


def convert(kind: str, src: str, dst: str, vgg16: Optional[str] = None):
  """Reads `src` (.pth) (and `vgg16` for a heads-only LPIPS file), checks it, writes `dst`."""
  if kind == "vgg16":
    if vgg16 is not None:
      raise ValueError("--vgg16 is only for --kind lpips")
    weights = read_vgg16(src)
  elif kind == "lpips":
    trunk = None if vgg16 is None else read_vgg16(vgg16)
    weights = lpips_from_state_dict(torch_weights.load_state_dict(src), trunk, source=src)
  else:
    raise ValueError(f"--kind {kind!r}; expected 'vgg16' or 'lpips'")
  inception.save_params(dst, weights)  # a generic '/'-joined .npz writer (temporary file, renamed)
  return weights


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kind", required=True, choices=("vgg16", "lpips"),
                      help="vgg16: the trunk (loss 'vgg'); lpips: trunk + heads (both losses)")
  parser.add_argument("--src", required=True,
                      help=f"vgg16: torchvision's {perceptual.VGG16_SOURCE_FILE} "
                           f"({perceptual.VGG16_URL}); lpips: the `lpips` package's "
                           f"{perceptual.LPIPS_SOURCE_FILE} or a whole LPIPS state dict")
  parser.add_argument("--vgg16", default=None,
                      help="lpips with a heads-only --src: torchvision's VGG16 .pth or a "
                           "converted vgg16 .npz")
  parser.add_argument("--dst", required=True, help="output .npz (train.perceptual_weights)")
  args = parser.parse_args(argv)
  try:
    weights = convert(args.kind, args.src, args.dst, args.vgg16)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = sum(np.size(v) for v in flax.traverse_util.flatten_dict(weights).values())
  what = "VGG16 trunk + LPIPS heads" if "lpips" in weights else "VGG16 trunk"
  print(f"wrote {args.dst}: {count:,} parameters ({what})")
  trunk_file = args.src if args.kind == "vgg16" else args.vgg16
  if trunk_file and trunk_file.endswith(".pth"):
    if not convert_inception.sha256_of(trunk_file).startswith(_PUBLISHED_VGG16_SHA256_PREFIX):
      print(f"note: {trunk_file} is not torchvision's published {perceptual.VGG16_SOURCE_FILE} "
            f"(its SHA-256 does not start with {_PUBLISHED_VGG16_SHA256_PREFIX}); distances "
            "are only comparable with the published weights.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
