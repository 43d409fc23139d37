"""GroupNorm fused with the FiLM modulation and swish that follow it in the UNet.

Same parameters ("scale", "bias" of shape (C,)) and numbers as flax's nn.GroupNorm followed by
`* (1 + film_scale) + film_shift` and swish, computed differently: the statistics are sums
over the pixel axis with the channels kept contiguous (then summed within groups, a tiny
array), and the normalisation, affine and FiLM fold into one per-(image, channel) multiply-add.
nn.GroupNorm's reduction of a (N, H, W, G, C/G) view over three non-adjacent axes is several
times slower on XLA:CPU, and accelerators fuse either form equally well (benchmarks/README.md).
The variance is computed around the mean (two passes), not as E[x^2] - E[x]^2, which cancels
catastrophically for activations with a large mean.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm_film(x, scale, bias, num_groups: int, epsilon: float,
                    film_scale=None, film_shift=None, swish: bool = False):
  """x (N, H, W, C); scale, bias (C,); film_scale/film_shift (N, C) or None.

  Statistics in float32; the result has x's dtype.
  """
  n, h, w, c = x.shape
  if c % num_groups:
    raise ValueError(f"{c} channels do not split into {num_groups} groups")
  per_group = h * w * (c // num_groups)
  rows = x.reshape(n, h * w, c).astype(jnp.float32)
  group_sum = lambda t: jnp.sum(t.reshape(n, num_groups, c // num_groups), axis=-1)
  mean = group_sum(jnp.sum(rows, axis=1)) / per_group  # (N, G)
  centred = rows - jnp.repeat(mean, c // num_groups, axis=1)[:, None, :]
  var = group_sum(jnp.sum(centred * centred, axis=1)) / per_group
  inv = jnp.repeat(jax.lax.rsqrt(var + epsilon), c // num_groups, axis=1)  # (N, C)
  a = inv * scale.astype(jnp.float32)
  b = jnp.broadcast_to(bias.astype(jnp.float32), a.shape)
  if film_scale is not None:
    a = a * (1 + film_scale.astype(jnp.float32))
    b = b * (1 + film_scale.astype(jnp.float32))
  if film_shift is not None:
    b = b + film_shift.astype(jnp.float32)
  y = centred * a[:, None, :] + b[:, None, :]
  if swish:
    y = nn.swish(y)
  return y.reshape(x.shape).astype(x.dtype)


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters, optionally followed by FiLM ((N, C) scale and shift) and swish."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, film_scale: Optional[jax.Array] = None,
               film_shift: Optional[jax.Array] = None, swish: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm_film(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon,
                           film_scale, film_shift, swish)
