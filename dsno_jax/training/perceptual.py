"""The DSNO loss's VGG16 feature distances: LPIPS (learned heads) and the plain unit-normalised one.

Both compare the five taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16 (torchvision's
ImageNet weights) on images in [-1, 1] scaled as LPIPS v0.1 does, with each tap unit-normalised
along channels at every pixel (`f / (|f|_2 + 1e-10)`). Per image, with D_l = (f_l(x) - f_l(y))^2
at tap l, of size (H_l, W_l, C_l):
- `lpips_distance`: sum_l mean_{h,w} sum_c w_lc D_lhwc, the learned heads w_l >= 0 (no bias);
  exactly `lpips.LPIPS(net='vgg')(x, y)` (version 0.1, spatial=False, eval mode);
- `vgg_feature_distance`: sum_l mean_{h,w} sum_c D_lhwc, no heads: exactly
  `lpips.LPIPS(net='vgg', lpips=False)(x, y)`, the loss (`loss: vgg`, `lpips: False`) that DSNO's
  CIFAR-10 result was trained with.
Everything is float32; the normalisation has finite gradients where a tap is all zero.
"""
import os
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import trees
from dsno_jax.models import vgg
from dsno_jax.weights import npz, torch_layout, torch_pickle

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
  """(N,) LPIPS(net='vgg', lpips=False): sum over taps of the spatial mean of the channel sum
  of the squared difference of unit-normalised features. weights: {"vgg": trunk params, ...}."""
  diffs = tap_differences(weights["vgg"], x, y)
  return sum(jnp.mean(jnp.sum(d, axis=3), axis=(1, 2)) for d in diffs.values())


def lpips_distance(weights, x, y):
  """(N,) LPIPS(net='vgg'): sum over taps of the spatial mean of the head-weighted channel sum
  of the squared difference of unit-normalised features. weights: {"vgg": ..., "lpips": heads}."""
  if "lpips" not in weights:
    raise ValueError("these weights hold no LPIPS heads; convert them with "
                     "`python -m dsno_jax.convert --kind lpips`")
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
             f"  python -m dsno_jax.convert --kind vgg16 --src {VGG16_SOURCE_FILE} "
             f"--dst {path or 'vgg16.npz'}\n")
  else:
    steps = (f"It needs {vgg16} and the LPIPS linear heads vgg.pth, which ship inside the "
             f"`lpips` pip package as {LPIPS_SOURCE_FILE} (pip install lpips, or "
             "github.com/richzhang/PerceptualSimilarity); then run\n"
             f"  python -m dsno_jax.convert --kind lpips --src vgg.pth "
             f"--vgg16 {VGG16_SOURCE_FILE} --dst {path or 'lpips_vgg.npz'}\n")
  return (steps + "(no PyTorch needed) and set --config.train.perceptual_weights to the .npz. "
          "An LPIPS .npz serves both losses.")


def missing_weights_message(path: str, kind: str) -> str:
  """Why `train.loss=kind` cannot start without the file at `path`, and how to make it."""
  what = ("train.perceptual_weights is not set" if not path
          else f"train.perceptual_weights={path!r} is not a file")
  return (f"train.loss={kind!r} needs converted VGG16 weights, and {what}. "
          + how_to_convert(path, kind))


def check_weights(flat, source: str) -> bool:
  """Raises ValueError unless `flat` (keys: '/'-joined paths or tuples, or a nested tree) is the
  VGG16 trunk, optionally with all LPIPS heads, all non-negative; returns whether the heads are
  there, so that a wrong file fails before training starts."""
  flat = npz.flat_paths(flat)
  with_heads = any(path.split("/")[0] == "lpips" for path in flat)
  npz.check_shapes(flat, weight_shapes(with_heads),
                   f"{source} is not a converted VGG16{' + LPIPS' if with_heads else ''} file")
  for head in HEAD_NAMES if with_heads else ():
    value = flat[f"lpips/{head}"]
    if np.min(value) < 0:
      raise ValueError(f"{source}: LPIPS head {head} has negative weights (min "
                       f"{np.min(value):.3g}); LPIPS's heads are non-negative")
  return with_heads


def load_weights(path: str, kind: str = "lpips"):
  """{"vgg": trunk params, ["lpips": heads]} as float32 jax arrays from a converted .npz.

  Raises FileNotFoundError (saying what to download and how to convert it) for a missing
  file, ValueError for a file that is not this network, or that lacks the heads for "lpips".
  """
  if kind not in KINDS:
    raise ValueError(f"perceptual distance {kind!r}; expected one of {KINDS}")
  path = os.path.expanduser(path)
  flat = {p: np.asarray(v, np.float32)
          for p, v in npz.load(path, missing_weights_message(path, kind)).items()}
  with_heads = check_weights(flat, source=path)
  if kind == "lpips" and not with_heads:
    raise ValueError(f"{path} holds only the VGG16 trunk; train.loss='lpips' also needs the "
                     "LPIPS heads. " + how_to_convert("lpips_vgg.npz", kind))
  if kind == "vgg":
    flat = {p: v for p, v in flat.items() if p.split("/")[0] == "vgg"}
  return trees.unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def write_random_weights(path: str, kind: str, seed: int = 0) -> str:
  """A converted-format .npz of random VGG16 (+ LPIPS heads for "lpips") weights at `path`:
  the real file's shapes and cost, for benchmarks and memory estimates without the download."""
  rng = np.random.default_rng(seed)
  npz.save(path, {p: 0.01 * np.abs(rng.standard_normal(shape))
                  for p, shape in weight_shapes(kind == "lpips").items()})
  return path


# --- conversion from torchvision's and LPIPS's .pth -----------------------------------------------

PUBLISHED_VGG16_SHA256_PREFIX = "397923af"
# torchvision's vgg16 classifier, accepted and dropped: Linear(512*7*7, 4096), Linear(4096, 4096),
# Linear(4096, 1000).
_VGG16_CLASSIFIER = {
    "classifier.0.weight": (4096, 512 * 7 * 7), "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}
# LPIPS's ScalingLayer buffers, each of shape (1, 3, 1, 1) in a whole state dict.
_SCALING_BUFFERS = {"scaling_layer.shift": LPIPS_SHIFT, "scaling_layer.scale": LPIPS_SCALE}


def _torch_conv_names(prefix_of_block) -> Dict[str, Tuple[str, ...]]:
  """{torch name: flax path} of the trunk; prefix_of_block(b) is the torch module prefix of
  block b (0-based), since LPIPS's slices keep torchvision's feature indices."""
  names = {}
  for conv, index in vgg.torch_feature_indices().items():
    block = int(conv[len("conv")]) - 1
    names[f"{prefix_of_block(block)}{index}.weight"] = (conv, "kernel")
    names[f"{prefix_of_block(block)}{index}.bias"] = (conv, "bias")
  return names


TORCHVISION_NAMES = _torch_conv_names(lambda block: "features.")
LPIPS_TRUNK_NAMES = _torch_conv_names(lambda block: f"net.slice{block + 1}.")
LPIPS_HEAD_NAMES = {f"{head}.model.1.weight": head for head in HEAD_NAMES}
# LPIPS also registers its heads in a ModuleList, so a whole state dict names each twice.
LPIPS_HEAD_ALIASES = {f"lins.{i}.model.1.weight": name
                      for i, name in enumerate(LPIPS_HEAD_NAMES)}


def _trunk_torch_shapes(names: Dict[str, Tuple[str, ...]]) -> Dict[str, Tuple[int, ...]]:
  return torch_layout.torch_shapes(names, vgg.param_shapes())


def _trunk(state_dict, names: Dict[str, Tuple[str, ...]]):
  """Flax `VGG16Features` params from the (shape-checked) entries `names` of a state dict."""
  return trees.unflatten({"/".join(p): v
                          for p, v in torch_layout.to_flax(state_dict, names).items()})


def vgg16_from_state_dict(state_dict: Dict[str, np.ndarray], source: str = "state dict"):
  """{"vgg": trunk params} from torchvision's vgg16 state dict (its classifier dropped); a
  ValueError listing what does not fit for anything else, so no other network is misread."""
  given = {k: v for k, v in state_dict.items()
           if not (k in _VGG16_CLASSIFIER and tuple(np.shape(v)) == _VGG16_CLASSIFIER[k])}
  npz.check_shapes(given, _trunk_torch_shapes(TORCHVISION_NAMES),
                   f"{source} is not torchvision's VGG16 state dict ({VGG16_SOURCE_FILE})")
  return {"vgg": _trunk(state_dict, TORCHVISION_NAMES)}


def lpips_from_state_dict(state_dict: Dict[str, np.ndarray], trunk=None,
                          source: str = "state dict"):
  """{"vgg": trunk, "lpips": heads} from LPIPS's heads file plus `trunk` ({"vgg": params}), or
  from a whole `lpips.LPIPS(net='vgg')` state dict (trunk=None); a ValueError listing what does
  not fit otherwise, so no other network is misread."""
  whole = any(k.startswith("net.") for k in state_dict)
  expected = {name: (1, c, 1, 1) for name, c in zip(LPIPS_HEAD_NAMES, vgg.TAP_CHANNELS)}
  if whole:
    expected.update(_trunk_torch_shapes(LPIPS_TRUNK_NAMES))
    expected.update({name: (1, 3, 1, 1) for name in _SCALING_BUFFERS})
  given = {k: v for k, v in state_dict.items() if k not in LPIPS_HEAD_ALIASES}
  npz.check_shapes(given, expected,
                   f"{source} is not LPIPS(net='vgg') weights (its heads file {LPIPS_SOURCE_FILE}, "
                   "or a whole LPIPS(net='vgg') state dict)")
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
                     f"torchvision's {VGG16_SOURCE_FILE} ({VGG16_URL}): pass it with --vgg16")
  trunk = {"vgg": _trunk(state_dict, LPIPS_TRUNK_NAMES)} if whole else trunk
  heads = {head: np.asarray(state_dict[name], np.float32).reshape(-1)
           for name, head in LPIPS_HEAD_NAMES.items()}
  weights = {"vgg": trunk["vgg"], "lpips": heads}
  check_weights(weights, source)
  return weights


def read_vgg16(path: str):
  """{"vgg": trunk} from torchvision's .pth or from an .npz converted before (vgg16 or lpips),
  so that the LPIPS heads can be joined to a trunk in either form."""
  if path.endswith(".npz"):
    return {"vgg": load_weights(path, "vgg")["vgg"]}
  return vgg16_from_state_dict(torch_pickle.load_state_dict(path), source=path)


def distance_from_file(kind: str, path: str) -> Callable:
  """The per-time distance (B, K, H, W, C) x2 -> (K,) of `kind` ("vgg" | "lpips") with the
  weights of the converted .npz at `path`."""
  weights = load_weights(path, kind)
  return per_time_distance(IMAGE_DISTANCES[kind], weights)
