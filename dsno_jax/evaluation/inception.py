"""Inception-v3 of FID (the 2015 TF graph as ported by pytorch-fid) in Flax: images -> pool3 (N, 2048).

Module and parameter names mirror torchvision's `Inception3` attributes (`Mixed_5b.branch1x1`,
...), so that the converter is a rename plus a kernel transpose. The blocks are pytorch-fid's
FID variants: average pools exclude the zero padding (`FIDInceptionA`, `FIDInceptionC`,
`FIDInceptionE_1`) and the last block max-pools (`FIDInceptionE_2`).
"""
import functools
import os
from typing import Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import trees
from dsno_jax.weights import npz, torch_layout

FEATURE_DIM = 2048
INPUT_SIZE = 299
BATCH_NORM_EPSILON = 1e-3  # torchvision's BasicConv2d
WEIGHTS_SOURCE_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_SOURCE_FILE)
WEIGHTS_ENV = "DSNO_JAX_INCEPTION_WEIGHTS"
DEFAULT_WEIGHTS_FILE = os.path.join("~", ".cache", "dsno_jax", "inception_fid.npz")


class FrozenBatchNorm(nn.Module):
  """Inference-only BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    gain = scale * jax.lax.rsqrt(var + BATCH_NORM_EPSILON)
    return x * gain + (bias - mean * gain)


class ConvBN(nn.Module):
  """torchvision's BasicConv2d: bias-free conv (symmetric zero padding), BatchNorm, ReLU."""
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=[(self.padding[0],) * 2, (self.padding[1],) * 2], use_bias=False,
                precision=self.precision, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3_same(x):
  # TF's average pool divides by the number of real pixels under the window, not by 9.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """pytorch-fid's FIDInceptionA (Mixed_5b/c/d): 35x35, 1x1 | 5x5 | double 3x3 | avg pool."""
  pool_features: int
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): 35x35 -> 17x17 reduction."""
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch3x3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
  """pytorch-fid's FIDInceptionC (Mixed_6b..e): 17x17, factorised 7x7 branches, avg pool."""
  channels_7x7: int
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): 17x17 -> 8x8 reduction."""
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
    branch_pool = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (pool="avg", Mixed_7b) and FIDInceptionE_2 ("max", Mixed_7c)."""
  pool: str
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      # The FID graph max-pools here (a quirk of the 2015 TF graph; the paper says average).
      pooled = _max_pool_3x3(x, stride=1, pad=1)
    else:
      raise ValueError(f"pool={self.pool!r}; expected 'avg' or 'max'")
    branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 trunk: (N, 299, 299, 3) in [-1, 1] -> pool3 features (N, 2048).

  `precision` is passed to every convolution; "highest" keeps float32 accuracy on TPU/GPU
  (where the default would use bfloat16/TF32 passes and shift FID values).
  """
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    precision = self.precision
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, stride=2, pad=0)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, stride=2, pad=0)
    x = InceptionA(32, precision=precision, name="Mixed_5b")(x)
    x = InceptionA(64, precision=precision, name="Mixed_5c")(x)
    x = InceptionA(64, precision=precision, name="Mixed_5d")(x)
    x = InceptionB(precision=precision, name="Mixed_6a")(x)
    x = InceptionC(128, precision=precision, name="Mixed_6b")(x)
    x = InceptionC(160, precision=precision, name="Mixed_6c")(x)
    x = InceptionC(160, precision=precision, name="Mixed_6d")(x)
    x = InceptionC(192, precision=precision, name="Mixed_6e")(x)
    x = InceptionD(precision=precision, name="Mixed_7a")(x)
    x = InceptionE("avg", precision=precision, name="Mixed_7b")(x)
    x = InceptionE("max", precision=precision, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of torch's bilinear `interpolate(align_corners=False)`.

  Source coordinate `(dst + 0.5) * in/out - 0.5`, clamped at 0, two taps, no antialiasing:
  what pytorch-fid's `InceptionV3(resize_input=True)` does. The arithmetic copies torch's
  float32 kernel (float32 scale, one fused multiply-add, float32 fraction), so the weights
  are bit-identical to torch's rather than merely close.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32) + f32(0.5)
  # A float32 x float32 product is exact in float64, so this rounds once, like an FMA.
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1))
  weights = np.zeros((out_size, in_size), f32)
  np.add.at(weights, (np.arange(out_size), lo), f32(1) - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights


def preprocess(images, value_range: Tuple[float, float] = (-1.0, 1.0)):
  """(N, H, W, C) images -> (N, 299, 299, 3) float32 in [-1, 1], as pytorch-fid feeds Inception.

  uint8 images are read as [0, 255]; float images as `value_range`. Like pytorch-fid
  (`resize_input=True, normalize_input=True` on [0, 1] images): map to [0, 1], bilinear resize
  to 299 (align_corners=False, no antialiasing), then 2x - 1. One channel is repeated to three.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images of shape {images.shape}; expected (N, H, W, 1 or 3)")
  if images.dtype == jnp.uint8:
    lo, hi = 0.0, 255.0
  else:
    lo, hi = map(float, value_range)
    if not hi > lo:
      raise ValueError(f"value_range={value_range}; expected (low, high) with high > low")
  x = (images.astype(jnp.float32) - lo) / (hi - lo)
  _, h, w, _ = images.shape
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", resize_matrix(h, INPUT_SIZE), x, precision=highest)
  x = jnp.einsum("pw,nowc->nopc", resize_matrix(w, INPUT_SIZE), x, precision=highest)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnames=("value_range", "precision"))
def inception_features(params, images, value_range: Tuple[float, float] = (-1.0, 1.0),
                       precision: Optional[str] = "highest"):
  """pool3 features (N, 2048) of images (N, H, W, C), uint8 or float in `value_range`."""
  x = preprocess(images, value_range)
  return InceptionV3(precision=precision).apply({"params": params}, x)


def init_params(seed: int = 0):
  """Random Inception parameters (tests, benchmarks; FID needs the converted weights).

  He-normal kernels and identity BatchNorms, drawn with numpy: compiling the 299x299 init
  would cost more than the benchmark it serves.
  """
  rng = np.random.default_rng(seed)
  leaves = {}
  for path, shape in param_shapes().items():
    if path[-1] == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      value = np.ones(shape) if path[-1] in ("scale", "var") else np.zeros(shape)
    leaves[path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(leaves)


@functools.lru_cache(maxsize=1)
def param_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{flattened parameter path: shape} of `InceptionV3`, without computing anything."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)["params"]
  return {path: tuple(v.shape) for path, v in flax.traverse_util.flatten_dict(shapes).items()}


def default_weights_path() -> str:
  """$DSNO_JAX_INCEPTION_WEIGHTS, else ~/.cache/dsno_jax/inception_fid.npz."""
  return os.path.expanduser(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_FILE)


def missing_weights_message(path: str) -> str:
  """Why FID cannot run without the file at `path`, and the command that makes it."""
  return (f"Inception FID weights not found at {path}. They are converted once from "
          f"pytorch-fid's published {WEIGHTS_SOURCE_FILE} (GitHub releases of mseitzer/pytorch-fid:"
          f" {WEIGHTS_URL}); download that file, then run\n"
          f"  python -m dsno_jax.convert --kind inception --src {WEIGHTS_SOURCE_FILE} "
          f"--dst {path}\n(no PyTorch needed), or set ${WEIGHTS_ENV} to the converted .npz.")


def load_params(path: Optional[str] = None):
  """Converted FID Inception parameters from an .npz (default: `default_weights_path()`).

  Raises FileNotFoundError saying which file to download and how to convert it, and
  ValueError when the .npz does not hold exactly this network's parameters.
  """
  path = default_weights_path() if path is None else os.path.expanduser(path)
  flat = npz.load(path, missing_weights_message(path))
  check_params(flat, source=path)
  return trees.unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def check_params(flat, source: str) -> None:
  """Raises ValueError listing every missing, unexpected and wrongly shaped parameter of a flat
  dict (keys: '/'-joined paths or tuples), so that a wrong file fails before any FID is computed."""
  npz.check_shapes(flat, param_shapes(), f"{source} is not the FID Inception-v3")


# --- conversion from pytorch-fid's .pth -----------------------------------------------------------

_TORCH_FROM_FLAX_LEAF = {
    ("conv", "kernel"): ("conv", "weight"),
    ("bn", "scale"): ("bn", "weight"),
    ("bn", "bias"): ("bn", "bias"),
    ("bn", "mean"): ("bn", "running_mean"),
    ("bn", "var"): ("bn", "running_var"),
}
# The 2015 TF graph classifies into 1008 classes (torchvision's own Inception has 1000); FID
# reads pool3, so this head is accepted and dropped.
DROPPED_TORCH_HEAD = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}
PUBLISHED_SHA256_PREFIX = "6726825d"


def torch_name(flax_path: Tuple[str, ...]) -> str:
  """('Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  return ".".join(flax_path[:-2] + _TORCH_FROM_FLAX_LEAF[flax_path[-2:]])


def flax_params_from_state_dict(state_dict: Dict[str, np.ndarray], source: str = "state dict"):
  """Flax `InceptionV3` parameters from a torchvision-named FID Inception state dict.

  The state dict must be exactly torchvision's `Inception3` with pytorch-fid's FID blocks
  (the 1008-way `fc` head and `num_batches_tracked` counters are allowed and dropped), so that
  another network's weights are refused rather than misread: ValueError listing every missing,
  unexpected and wrongly shaped entry otherwise.
  """
  names = {torch_name(p): p for p in param_shapes()}
  given = {k: v for k, v in state_dict.items()
           if not k.endswith(".num_batches_tracked")
           and not (k in DROPPED_TORCH_HEAD and tuple(np.shape(v)) == DROPPED_TORCH_HEAD[k])}
  npz.check_shapes(given, torch_layout.torch_shapes(names, param_shapes()),
                   f"{source} is not pytorch-fid's FID Inception-v3 state dict (the torchvision "
                   f"Inception3 names of {WEIGHTS_SOURCE_FILE})")
  return trees.unflatten({"/".join(p): v
                          for p, v in torch_layout.to_flax(state_dict, names).items()})
