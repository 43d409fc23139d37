"""Plain formulations that dsno_jax.models' faster ones are checked against.

`group_norm_film_plain` computes GroupNorm+FiLM+swish as flax's nn.GroupNorm does;
`plain_group_norms()` makes every models.norm.GroupNorm inside a model compute it that way
(flax method interception), so a whole model can be compared without a switch in it.
"""
import contextlib
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsno_jax.models import norm


def group_norm_film_plain(x, scale, bias, num_groups: int, epsilon: float,
                          film_scale=None, film_shift=None, swish: bool = False):
  """models.norm.group_norm_film written as nn.GroupNorm computes it: statistics over a
  (N, H, W, G, C/G) view, then affine, FiLM, swish."""
  n, h, w, c = x.shape
  grouped = x.astype(jnp.float32).reshape(n, h, w, num_groups, c // num_groups)
  mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
  y = ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias
  if film_scale is not None:
    y = y * (1 + film_scale[:, None, None, :])
  if film_shift is not None:
    y = y + film_shift[:, None, None, :]
  return (nn.swish(y) if swish else y).astype(x.dtype)


def _plain_group_norm(next_fun, args, kwargs, context):
  module = context.module
  if (not isinstance(module, norm.GroupNorm) or context.method_name != "__call__"
      or module.is_initializing()):
    return next_fun(*args, **kwargs)
  call = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
  call.apply_defaults()
  a = call.arguments
  return group_norm_film_plain(
      a["x"].astype(module.dtype), module.get_variable("params", "scale"),
      module.get_variable("params", "bias"), module.num_groups, module.epsilon,
      a["film_scale"], a["film_shift"], a["swish"])


@contextlib.contextmanager
def plain_group_norms():
  """Within it (while a model is applied or traced), models.norm.GroupNorm computes
  `group_norm_film_plain` on its own parameters; initialisation is left alone."""
  with nn.intercept_methods(_plain_group_norm):
    yield
