"""Formulations the benchmarks time against the package's, which the package does not ship.

  - the "shifted" convolution kernel gradient: XLA's forward and input gradient, and the
    kernel gradient as one matmul per kernel tap (`conv2d(..., impl="shifted")`);
  - the plain GroupNorm+FiLM+swish (tests/reference_formulations.py), against the fused one
    of dsno_jax/models/norm.py.

`formulations(conv, norm)` applies them to a whole model while it is traced (flax method
interception of nn.Conv and models.norm.GroupNorm), so the model needs no switch for them.

The shifted gradient: dK[i, j] = sum over pixels of x_shifted(i, j)^T g. For stride 1 the
shifted inputs are contiguous row ranges of the zero-padded input flattened to (pixels, C)
(the output gradient is laid out on the same padded grid), so each tap is a plain
(C, P) @ (P, O) matmul. It only pays where XLA's own kernel gradient is slow: XLA:CPU
without the YNNPACK flag of dsno_jax/backend.py (measurements: benchmarks/README.md).
"""
import contextlib
import functools
import os
import sys
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.reference_formulations import plain_group_norms  # noqa: E402

CONVS = ("xla", "shifted")
NORMS = ("fused", "plain")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


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


def _pads(x, kernel, strides, padding):
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def conv2d(x, kernel, strides: Sequence[int] = (1, 1), padding: Any = "SAME",
           impl: str = "xla"):
  """NHWC x HWIO -> NHWC convolution with XLA's kernel gradient ("xla") or the shifted one;
  padding "SAME" | "VALID" | ((lo, hi), (lo, hi))."""
  if impl not in CONVS:
    raise ValueError(f"convolution {impl!r}; expected one of {CONVS}")
  strides = tuple(strides)
  padding = _pads(x, kernel, strides, padding)
  if impl == "shifted":
    return conv_shifted(x, kernel, strides, padding)
  return _conv(x, kernel, strides, padding)


def _shifted_conv(next_fun, args, kwargs, context):
  """nn.Conv.__call__ with the shifted kernel gradient, on the module's own parameters (plain
  2-D convolutions only; anything else, and initialisation, is left to nn.Conv)."""
  module = context.module
  plain_2d = (isinstance(module, nn.Conv) and context.method_name == "__call__"
              and not module.is_initializing() and len(args) == 1 and not kwargs
              and args[0].ndim == 4 and module.feature_group_count == 1
              and module.input_dilation in (None, 1, (1, 1))
              and module.kernel_dilation in (None, 1, (1, 1)))
  if not plain_2d:
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  x, kernel, bias = nn.dtypes.promote_dtype(args[0], kernel, bias, dtype=module.dtype)
  strides = module.strides if module.strides is not None else (1, 1)
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  padding = module.padding
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    return next_fun(*args, **kwargs)
  y = conv2d(x, kernel, strides, padding, impl="shifted")
  return y if bias is None else y + bias


@contextlib.contextmanager
def formulations(conv: str = "xla", norm: str = "fused"):
  """Within it, models traced compute their convolutions with `conv` ("xla": nn.Conv as is;
  "shifted": the shifted kernel gradient) and their GroupNorms with `norm` ("fused": as the
  package does; "plain": tests/reference_formulations.py)."""
  if conv not in CONVS or norm not in NORMS:
    raise ValueError(f"formulations({conv!r}, {norm!r}); expected conv in {CONVS}, "
                     f"norm in {NORMS}")
  with contextlib.ExitStack() as stack:
    if conv == "shifted":
      stack.enter_context(nn.intercept_methods(_shifted_conv))
    if norm == "plain":
      stack.enter_context(plain_group_norms())
    yield
