"""2-D convolution with a choice of kernel-gradient algorithm (parameters as flax's nn.Conv).

XLA:CPU computes the forward pass and the input gradient of a convolution at a reasonable
speed, but its kernel gradient ("backward filter") is slow: on the 2-core machines here a 3x3,
32x32, 64->64 convolution at batch 32 takes about 40 ms forward and 40 ms for the input
gradient, and about 950 ms for the kernel gradient (benchmarks/conv.py). The "shifted" algorithm
keeps XLA's forward and input gradient and computes the kernel gradient as one matmul per kernel
tap: dK[i, j] = sum over pixels of x_shifted(i, j)^T g. For stride 1 the shifted inputs are
contiguous row ranges of the zero-padded input flattened to (pixels, C) (the output gradient
is laid out on the same padded grid), so each tap is a plain (C, P) @ (P, O) matmul.

That holds for XLA's default CPU code. With YNNPACK dots enabled (the flag dsno_jax.main adds,
dsno_jax/xla_flags.py) XLA's own kernel gradient is the faster one at every size measured.

`impl`: "xla" (XLA's own gradient) | "shifted" | "auto": shifted on CPU for inputs of at least
32x32 pixels when YNNPACK dots are off, XLA's otherwise. Measured fwd+bwd (ms, XLA vs shifted,
2-core CPU), XLA's default code / with YNNPACK dots: 32x32x64 batch 32: 1020 vs 234 / 104 vs
183; 64x64x32 batch 16: 156 vs 154 / 58 vs 149; 32x32x64 batch 8: 63 vs 45 / 25 vs 35;
16x16x128 batch 32: 120 vs 130 / 82 vs 138; 8x8x64 batch 256: 104 vs 150 / 61 vs 124.
TPU and GPU compilers have fast native kernel gradients and keep them (on an H200 the shifted
gradient made the step 28% slower: benchmarks/gpu.py).
"""
import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dsno_jax import xla_flags

IMPLS = ("auto", "xla", "shifted")
AUTO_MIN_PIXELS = 32  # "auto" uses "shifted" on CPU for inputs at least this many pixels square
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str, image_shape=None) -> str:
  """The algorithm for `impl` ("auto" decides by backend and the (H, W) of the input; without
  a shape it stays "auto"); ValueError for an unknown name."""
  if impl not in IMPLS:
    raise ValueError(f"model.conv_impl={impl!r}; expected one of {IMPLS}")
  if impl != "auto" or image_shape is None:
    return impl
  large = min(image_shape) >= AUTO_MIN_PIXELS
  slow_xla = jax.default_backend() == "cpu" and not xla_flags.ynn_dot_enabled()
  return "shifted" if slow_xla and large else "xla"


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS)


def _tap_inputs_stride1(x, kernel_shape, padding):
  """For stride 1: (flat padded input (P + extra, C), row offset of each tap, P, padded grid).

  Pixel (n, h, w) of the output sits at row n*Hp*Wp + h*Wp + w of the padded grid, and the
  input it sees through tap (i, j) at that row + i*Wp + j.
  """
  kh, kw = kernel_shape
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, hp, wp, c = xp.shape
  rows = n * hp * wp
  flat = jnp.pad(xp.reshape(rows, c), ((0, (kh - 1) * wp + kw - 1), (0, 0)))
  offsets = [i * wp + j for i in range(kh) for j in range(kw)]
  return flat, offsets, rows, (hp, wp)


def kernel_gradient(x, g, kernel_shape: Tuple[int, int], strides, padding):
  """dL/dK (kh, kw, C, O) of conv(x, K) given the output gradient g, as one matmul per tap.

  Accumulates in float32 and returns float32.
  """
  kh, kw = kernel_shape
  n, ho, wo, o = g.shape
  c = x.shape[-1]
  dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  if tuple(strides) == (1, 1):
    flat, offsets, rows, (hp, wp) = _tap_inputs_stride1(x, kernel_shape, padding)
    # g on the padded grid: zeros where no output pixel sits
    gp = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(rows, o)
    g_t = gp.T
    taps = [dot(g_t, lax.slice_in_dim(flat, off, off + rows)) for off in offsets]  # (O, C) each
    return jnp.stack(taps).reshape(kh, kw, o, c).transpose(0, 1, 3, 2)
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  g_rows = g.reshape(-1, o)
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                         (1, sh, sw, 1))
      taps.append(dot(window.reshape(-1, c).T, g_rows))  # (C, O)
  return jnp.stack(taps).reshape(kh, kw, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_shifted(x, kernel, strides, padding):
  """XLA's convolution whose kernel gradient is computed by `kernel_gradient`."""
  return _conv(x, kernel, strides, padding)


def _conv_shifted_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_shifted_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, padding), x)
  (dx,) = input_vjp(g)
  dk = kernel_gradient(x, g, kernel.shape[:2], strides, padding)
  return dx, dk.astype(kernel.dtype)


conv_shifted.defvjp(_conv_shifted_fwd, _conv_shifted_bwd)


def conv2d(x, kernel, strides: Sequence[int] = (1, 1), padding: Any = "SAME",
           impl: str = "auto"):
  """NHWC x HWIO -> NHWC convolution; padding "SAME" | "VALID" | ((lo, hi), (lo, hi))."""
  strides = tuple(strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if resolve_impl(impl, x.shape[1:3]) == "shifted":
    return conv_shifted(x, kernel, strides, padding)
  return _conv(x, kernel, strides, padding)


class Conv(nn.Module):
  """nn.Conv's parameters ("kernel" (kh, kw, C, O), "bias" (O,)) and initialisers, computed
  by `conv2d` with the chosen kernel-gradient algorithm."""
  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  strides: Tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding,
               self.impl)
    return y + bias.astype(self.dtype)
