"""The DSNO loss's VGG16 feature distances: LPIPS (learned heads) and the plain unit-normalised one.

Both compare the five taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16 (torchvision's
ImageNet weights) on images in [-1, 1] scaled as LPIPS v0.1 does, with each tap unit-normalised
along channels at every pixel (`f / (|f|_2 + 1e-10)`). Per image, with D_l = (f_l(x) - f_l(y))^2
at tap l, of size (H_l, W_l, C_l):
- `lpips_distance`: sum_l mean_{h,w} sum_c w_lc D_lhwc, the learned heads w_l >= 0 (no bias);
  exactly `lpips.LPIPS(net='vgg')(x, y)` (version 0.1, spatial=False, eval mode);
- `vgg_feature_distance`: sum_l mean_{h,w,c} D_lhwc, no heads. (`lpips.LPIPS(lpips=False)`
  sums over channels instead of averaging; here every tap counts alike whatever its width.)
Everything is float32; the normalisation has finite gradients where a tap is all zero.
"""
import os
from typing import Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax.models import vgg

# LPIPS v0.1's ScalingLayer: (x - shift) / scale per RGB channel, on inputs in [-1, 1].
LPIPS_SHIFT = np.array([-.030, -.088, -.188], np.float32)
LPIPS_SCALE = np.array([.458, .448, .450], np.float32)
NORMALIZE_EPSILON = 1e-10  # lpips.normalize_tensor's

HEAD_NAMES = tuple(f"lin{i}" for i in range(len(vgg.TAPS)))  # LPIPS's NetLinLayer per tap
KINDS = ("vgg", "lpips")  # the DSNO losses (train.loss) this module provides
VGG16_SOURCE_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_SOURCE_FILE
LPIPS_SOURCE_FILE = "lpips/weights/v0.1/vgg.pth"


def lpips_scaling(images):
  """(N, H, W, 1 or 3) in [-1, 1] -> (N, H, W, 3) VGG input; grey images repeated to RGB first."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images of shape {images.shape}; expected (N, H, W, 1 or 3) in [-1, 1]")
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - LPIPS_SHIFT) / LPIPS_SCALE


def unit_normalize(features):
  """(..., C) -> features / (|features|_2 + 1e-10) along C, as `lpips.normalize_tensor`."""
  sum_sq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  # sqrt'(0) is infinite: an all-zero ReLU tap would make the gradient NaN without the where.
  positive = sum_sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
  return features / (norm + NORMALIZE_EPSILON)


def tap_differences(vgg_params, x, y) -> Dict[str, jax.Array]:
  """{tap: (N, H_l, W_l, C_l)} squared differences of the unit-normalised VGG16 taps of x, y.

  x, y: (N, H, W, 1 or 3) in [-1, 1], H, W >= 16; one VGG pass over both.
  """
  if x.shape != y.shape:
    raise ValueError(f"images of shapes {x.shape} and {y.shape}; expected equal shapes")
  taps = vgg.VGG16Features().apply({"params": vgg_params},
                                   lpips_scaling(jnp.concatenate([x, y])))
  n = x.shape[0]
  return {name: jnp.square(unit_normalize(t[:n]) - unit_normalize(t[n:]))
          for name, t in taps.items()}


def vgg_feature_distance(weights, x, y):
  """(N,) plain VGG feature distance: sum over taps of the mean over (h, w, c) of the squared
  difference of unit-normalised features. weights: {"vgg": trunk params, ...}."""
  diffs = tap_differences(weights["vgg"], x, y)
  return sum(jnp.mean(d, axis=(1, 2, 3)) for d in diffs.values())


def lpips_distance(weights, x, y):
  """(N,) LPIPS(net='vgg'): sum over taps of the spatial mean of the head-weighted channel sum
  of the squared difference of unit-normalised features. weights: {"vgg": ..., "lpips": heads}."""
  if "lpips" not in weights:
    raise ValueError("these weights hold no LPIPS heads; convert them with --kind lpips")
  diffs = tap_differences(weights["vgg"], x, y)
  return sum(
      jnp.mean(jnp.einsum("nhwc,c->nhw", diffs[tap], weights["lpips"][head],
                          precision=jax.lax.Precision.HIGHEST), axis=(1, 2))
      for tap, head in zip(vgg.TAPS, HEAD_NAMES))


IMAGE_DISTANCES = {"vgg": vgg_feature_distance, "lpips": lpips_distance}


def per_time_distance(image_distance: Callable, weights) -> Callable:
  """The losses.py convention: distance(prediction, target) (B, K, H, W, C) x2 -> (K,), the
  per-image `image_distance(weights, x, y)` averaged over the batch; weights closed over."""

  def distance(prediction, target):
    if prediction.ndim != 5 or prediction.shape != target.shape:
      raise ValueError(f"prediction {prediction.shape} and target {target.shape}; expected "
                       "(B, K, H, W, C) both")
    b, k = prediction.shape[:2]
    flat = lambda a: a.reshape((b * k,) + a.shape[2:]).astype(jnp.float32)
    per_image = image_distance(weights, flat(prediction), flat(target))
    return jnp.mean(per_image.reshape(b, k), axis=0)

  return distance


# --- weights --------------------------------------------------------------------------------------


def head_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{('lpips', 'lin0'): (64,), ...}: one non-negative weight per channel of each tap."""
  return {("lpips", head): (c,) for head, c in zip(HEAD_NAMES, vgg.TAP_CHANNELS)}


def weight_shapes(with_heads: bool) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{('vgg', 'conv1_1', 'kernel'): (3, 3, 3, 64), ...}: every array of a converted .npz."""
  shapes = {("vgg",) + path: shape for path, shape in vgg.param_shapes().items()}
  return {**shapes, **head_shapes()} if with_heads else shapes


def how_to_convert(path: str, kind: str) -> str:
  """What to download and the command that converts it into `path`, for `train.loss=kind`."""
  vgg16 = f"torchvision's ImageNet VGG16 weights {VGG16_SOURCE_FILE} ({VGG16_URL})"
  if kind == "vgg":
    steps = (f"It needs {vgg16}; download that file, then run\n"
             f"  python -m dsno_jax.convert_perceptual --kind vgg16 --src {VGG16_SOURCE_FILE} "
             f"--dst {path or 'vgg16.npz'}\n")
  else:
    steps = (f"It needs {vgg16} and the LPIPS linear heads vgg.pth, which ship inside the "
             f"`lpips` pip package as {LPIPS_SOURCE_FILE} (pip install lpips, or "
             "github.com/richzhang/PerceptualSimilarity); then run\n"
             f"  python -m dsno_jax.convert_perceptual --kind lpips --src vgg.pth "
             f"--vgg16 {VGG16_SOURCE_FILE} --dst {path or 'lpips_vgg.npz'}\n")
  return (steps + "(no PyTorch needed) and set --config.train.perceptual_weights to the .npz. "
          "An LPIPS .npz serves both losses.")


def missing_weights_message(path: str, kind: str) -> str:
  """Why `train.loss=kind` cannot start without the file at `path`, and how to make it."""
  what = ("train.perceptual_weights is not set" if not path
          else f"train.perceptual_weights={path!r} is not a file")
  return (f"train.loss={kind!r} needs converted VGG16 weights, and {what}. "
          + how_to_convert(path, kind))


def check_weights(flat: Dict[Tuple[str, ...], np.ndarray], source: str) -> bool:
  """Raises ValueError unless `flat` is the VGG16 trunk, optionally with all LPIPS heads (all
  non-negative); returns whether the heads are there."""
  with_heads = any(path[0] == "lpips" for path in flat)
  expected = weight_shapes(with_heads)
  missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
  unexpected = sorted("/".join(p) for p in flat.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(f"{source} is not a converted VGG16{' + LPIPS' if with_heads else ''} file: "
                     f"missing {len(missing)} arrays {missing[:5]}, unexpected {len(unexpected)} "
                     f"{unexpected[:5]}")
  for path, shape in expected.items():
    if tuple(np.shape(flat[path])) != shape:
      raise ValueError(f"{source}: {'/'.join(path)} has shape {tuple(np.shape(flat[path]))}; "
                       f"expected {shape}")
    if path[0] == "lpips" and np.min(flat[path]) < 0:
      raise ValueError(f"{source}: LPIPS head {path[1]} has negative weights (min "
                       f"{np.min(flat[path]):.3g}); LPIPS's heads are non-negative")
  return with_heads


def load_weights(path: str, kind: str = "lpips"):
  """{"vgg": trunk params, ["lpips": heads]} as float32 jax arrays from a converted .npz.

  Raises FileNotFoundError (saying what to download and how to convert it) for a missing
  file, ValueError for a file that is not this network, or that lacks the heads for "lpips".
  """
  if kind not in KINDS:
    raise ValueError(f"perceptual distance {kind!r}; expected one of {KINDS}")
  path = os.path.expanduser(path)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path, kind))
  with np.load(path, allow_pickle=False) as npz:
    flat = {tuple(k.split("/")): np.asarray(npz[k], np.float32) for k in npz.files}
  with_heads = check_weights(flat, source=path)
  if kind == "lpips" and not with_heads:
    raise ValueError(f"{path} holds only the VGG16 trunk; train.loss='lpips' also needs the "
                     "LPIPS heads. " + how_to_convert("lpips_vgg.npz", kind))
  if kind == "vgg":
    flat = {p: v for p, v in flat.items() if p[0] == "vgg"}
  return flax.traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})


def write_random_weights(path: str, kind: str, seed: int = 0) -> str:
  """A converted-format .npz of random VGG16 (+ LPIPS heads for "lpips") weights at `path`:
  the real file's shapes and cost, for benchmarks and memory estimates without the download."""
  rng = np.random.default_rng(seed)
  flat = {"/".join(p): (0.01 * np.abs(rng.standard_normal(shape))).astype(np.float32)
          for p, shape in weight_shapes(kind == "lpips").items()}
  np.savez(path, **flat)
  return path


def distance_from_file(kind: str, path: str) -> Callable:
  """The per-time distance (B, K, H, W, C) x2 -> (K,) of `kind` ("vgg" | "lpips") with the
  weights of the converted .npz at `path`."""
  weights = load_weights(path, kind)
  return per_time_distance(IMAGE_DISTANCES[kind], weights)
