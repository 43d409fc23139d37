"""Converts published PyTorch weights (.pth) to this project's .npz: no run needs PyTorch."""
import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from dsno_jax import trees
from dsno_jax.evaluation import inception
from dsno_jax.training import perceptual
from dsno_jax.weights import npz, torch_pickle

KINDS = ("inception", "vgg16", "lpips")
_EXAMPLES = f"""examples:
  python -m dsno_jax.convert --kind inception --src {inception.WEIGHTS_SOURCE_FILE} \\
      --dst inception_fid.npz
  python -m dsno_jax.convert --kind vgg16 --src {perceptual.VGG16_SOURCE_FILE} --dst vgg16.npz
  python -m dsno_jax.convert --kind lpips --src vgg.pth --vgg16 {perceptual.VGG16_SOURCE_FILE} \\
      --dst lpips_vgg.npz

Each .pth is read by a restricted unpickler that runs no code from the file, and is checked
to be exactly the named network's state dict; anything else is refused with the entries that
do not fit. inception: pytorch-fid's FID Inception-v3 (its 1008-way fc head is dropped).
vgg16: torchvision's vgg16() (its classifier is dropped). lpips: the heads file of the `lpips`
package ({perceptual.LPIPS_SOURCE_FILE}) with --vgg16 (torchvision's .pth or a converted
vgg16 .npz), or a whole lpips.LPIPS(net='vgg') state dict on its own."""


def convert(kind: str, src: str, dst: str, vgg16: Optional[str] = None) -> Dict:
  """Reads `src` (and `vgg16` for a heads-only LPIPS file), checks it is the network `kind`,
  writes `dst`; returns the parameters, so that nothing is written for a wrong file."""
  if vgg16 is not None and kind != "lpips":
    raise ValueError("--vgg16 is only for --kind lpips")
  if kind == "inception":
    params = inception.flax_params_from_state_dict(torch_pickle.load_state_dict(src), source=src)
  elif kind == "vgg16":
    params = perceptual.read_vgg16(src)
  elif kind == "lpips":
    trunk = None if vgg16 is None else perceptual.read_vgg16(vgg16)
    params = perceptual.lpips_from_state_dict(torch_pickle.load_state_dict(src), trunk,
                                              source=src)
  else:
    raise ValueError(f"--kind {kind!r}; expected one of {KINDS}")
  npz.save(dst, params)
  return params


def _published_note(kind: str, src: str, vgg16: Optional[str]) -> Optional[str]:
  """A note when the source is not the published file, whose values alone are comparable."""
  if kind == "inception":
    if not npz.sha256_of(src).startswith(inception.PUBLISHED_SHA256_PREFIX):
      return (f"note: {src} is not the published file (its SHA-256 does not start with "
              f"{inception.PUBLISHED_SHA256_PREFIX}); FID values are only comparable with the "
              "published weights.")
    return None
  trunk_file = src if kind == "vgg16" else vgg16
  prefix = perceptual.PUBLISHED_VGG16_SHA256_PREFIX
  if (trunk_file and trunk_file.endswith(".pth")
      and not npz.sha256_of(trunk_file).startswith(prefix)):
    return (f"note: {trunk_file} is not torchvision's published {perceptual.VGG16_SOURCE_FILE} "
            f"(its SHA-256 does not start with {prefix}); distances are only comparable with "
            "the published weights.")
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line: 0 when `--dst` was written, 1 (with the reason on stderr) otherwise."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=_EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kind", required=True, choices=KINDS,
                      help="inception: the FID network (eval.inception_weights); vgg16: the "
                           "trunk (loss 'vgg'); lpips: trunk + heads (both perceptual losses)")
  parser.add_argument("--src", required=True,
                      help=f"inception: pytorch-fid's {inception.WEIGHTS_SOURCE_FILE} "
                           f"({inception.WEIGHTS_URL}); vgg16: torchvision's "
                           f"{perceptual.VGG16_SOURCE_FILE} ({perceptual.VGG16_URL}); lpips: the "
                           f"`lpips` package's {perceptual.LPIPS_SOURCE_FILE} or a whole LPIPS "
                           "state dict")
  parser.add_argument("--vgg16", default=None,
                      help="lpips with a heads-only --src: torchvision's VGG16 .pth or a "
                           "converted vgg16 .npz")
  parser.add_argument("--dst", default=None,
                      help="output .npz (inception: default $DSNO_JAX_INCEPTION_WEIGHTS, else "
                           f"{inception.DEFAULT_WEIGHTS_FILE}; vgg16, lpips: required, then "
                           "passed as train.perceptual_weights)")
  args = parser.parse_args(argv)
  dst = args.dst
  if dst is None:
    if args.kind != "inception":
      parser.error(f"--dst is required for --kind {args.kind}")
    dst = inception.default_weights_path()
  try:
    params = convert(args.kind, args.src, dst, args.vgg16)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = sum(np.size(v) for v in trees.flatten(params).values())
  what = {"inception": "of the FID Inception-v3", "vgg16": "(VGG16 trunk)",
          "lpips": "(VGG16 trunk + LPIPS heads)"}[args.kind]
  print(f"wrote {dst}: {count:,} parameters {what}")
  note = _published_note(args.kind, args.src, args.vgg16)
  if note:
    print(note)
  return 0


if __name__ == "__main__":
  sys.exit(main())
